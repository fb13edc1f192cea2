"""
What a postmaster copies from this tree: the example configuration, the
README's migration script, the service files in contrib/; and the demo that
C{make run} shows a newcomer.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

from twisted.trial import unittest

from lmtp_proxy import config as configuration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


class ExampleConfigTests(unittest.TestCase):
    """
    examples/lmtp-proxy.yaml, which C{make run} starts with.
    """

    def test_loadsAndListensOnLoopback(self):
        """
        The example is a valid configuration listening on 127.0.0.1.
        """
        loaded = configuration.load(os.path.join(ROOT, "examples", "lmtp-proxy.yaml"))
        self.assertEqual(loaded.socket[0], "127.0.0.1")

    def test_documentsEveryNewKey(self):
        """
        Every optional key of the config section appears in the example
        (commented, with its default).
        """
        text = read("examples", "lmtp-proxy.yaml")
        for key in (
            "recipient_delimiter",
            "connect_timeout",
            "command_timeout",
            "data_timeout",
            "idle_timeout",
            "max_message_size",
            "max_line_length",
            "shutdown_grace",
            "control_socket",
            "pool_size",
            "pool_idle_timeout",
            "workers",
        ):
            self.assertIn(key + ":", text)

    def test_makeRunUsesExample(self):
        """
        C{make run} runs twistd in the foreground with the example.
        """
        makefile = read("Makefile")
        self.assertRegex(makefile, r"CONFIG \?= examples/lmtp-proxy.yaml")
        self.assertRegex(makefile, r"twistd -n .*lmtp-proxy --config \$\(CONFIG\)")

    def test_backendsAreTheDemoBackends(self):
        """
        The example's backends are where C{make run} starts its demo
        backends, by the same names.
        """
        loaded = configuration.load(os.path.join(ROOT, "examples", "lmtp-proxy.yaml"))
        demo = re.search(r"^DEMO_BACKENDS \?= (.*)$", read("Makefile"), re.M).group(1).split()
        self.assertEqual(
            sorted("%s=%s:%d" % (name, b.host, b.port) for name, b in loaded.backends.items()),
            sorted(demo),
        )


class MigrationScriptTests(unittest.TestCase):
    """
    The README's migration script changes the users table with the
    command that does it safely for either routing source, whose
    behaviour tests/test_pgrouting.py checks.
    """

    def test_noSedFunction(self):
        """
        The README no longer edits the table with a sed function.
        """
        self.assertNotIn("set_backend", read("README.rst"))

    def test_stepsUseUsersSet(self):
        """
        Steps 3 and 5 use C{lmtp-proxy users set ... --wait}, and the
        README still documents C{reload --wait}.
        """
        text = read("README.rst")
        self.assertIn('lmtp-proxy users set -c "$conf" "$user" reject --wait', text)
        self.assertIn('lmtp-proxy users set -c "$conf" "$user" new --wait', text)
        self.assertIn("reload --wait", text)


class ContribTests(unittest.TestCase):
    """
    contrib/ service files.
    """

    def test_systemdUnit(self):
        """
        The systemd unit runs twistd in the foreground as Type=notify (only
        twistd itself notifies) and reloads with SIGUSR1.
        """
        unit = read("contrib", "lmtp-proxy.service")
        self.assertRegex(unit, r"(?m)^Type=notify$")
        self.assertRegex(unit, r"(?m)^NotifyAccess=main$")
        self.assertRegex(unit, r"ExecStart=\S*twistd -n .*lmtp-proxy --config \S+")
        self.assertRegex(unit, r"ExecReload=\S*kill -USR1 \$MAINPID")

    def test_initScript(self):
        """
        The SysV script is valid shell with start, stop, reload and status,
        and uses the pid file.
        """
        path = os.path.join(ROOT, "contrib", "lmtp-proxy.init")
        subprocess.run(["sh", "-n", path], check=True, timeout=30)
        script = read("contrib", "lmtp-proxy.init")
        for action in ("start)", "stop)", "reload", "status)"):
            self.assertIn(action, script)
        self.assertIn("--pidfile", script)


def listening(port):
    """
    Whether something accepts connections on 127.0.0.1:C{port}.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def groupMembers(pgid):
    """
    The PIDs of the live (not zombie) processes of process group C{pgid}.
    """
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % (entry,), "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry))
    return members


def replyTo(conversation, command):
    """
    The server's reply (C{"451 ..."}) to C{command} in a swaks conversation;
    C{""} when swaks never sent it or got no reply.
    """
    lines = conversation.splitlines()
    if " -> " + command not in lines:
        return ""
    for line in lines[lines.index(" -> " + command) + 1 :]:
        if line.startswith("<"):
            return line.split(None, 1)[1]
    return ""


class MakeRunTests(unittest.TestCase):
    """
    C{make run}, run as a newcomer does: the proxy with
    examples/lmtp-proxy.yaml and the two demo Maildir backends under demo/.
    """

    def setUp(self):
        example = configuration.load(os.path.join(ROOT, "examples", "lmtp-proxy.yaml"))
        self.proxyPort = example.socket[1]
        # The demo backends listen where the example's backends are.
        self.ports = [self.proxyPort] + [backend.port for backend in example.backends.values()]
        self.swaks = shutil.which("swaks")
        if self.swaks is None:
            reason = "swaks is missing (Debian package swaks; tools/install-peers.sh installs it)"
            if os.environ.get("CI") == "true":
                self.fail("CI=true and " + reason)
            raise unittest.SkipTest(reason)
        busy = [port for port in self.ports if listening(port)]
        if busy:
            # Whatever listens there would answer instead of make run's demo.
            self.fail("127.0.0.1 port(s) %s already in use (another make run?)" % (busy,))
        self.demo = os.path.join(ROOT, "demo")
        if not os.path.exists(self.demo):
            self.addCleanup(shutil.rmtree, self.demo, True)

    def startMakeRun(self):
        """
        Start C{make run} in a process group of its own, with SIGINT at its
        default as in a terminal, and wait until the proxy listens.
        """
        # A newcomer's shell has none of the test run's make or Python
        # settings, nor values for the Makefile's variables.
        unset = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH")
        unset += ("CONFIG", "VENV", "DEMO_DIR", "DEMO_BACKENDS")
        environment = {key: value for key, value in os.environ.items() if key not in unset}
        self.output = os.path.abspath(self.mktemp())
        with open(self.output, "wb") as output:
            self.make = subprocess.Popen(
                ["make", "run"],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.addCleanup(self.killLeftovers, self.make.pid)
        # Long enough for make run to reinstall the package first.
        deadline = time.monotonic() + 300
        while not listening(self.proxyPort):
            if self.make.poll() is not None or time.monotonic() > deadline:
                self.fail("make run never listened on port %d:\n%s" % (self.proxyPort, self.log()))
            time.sleep(0.2)

    def killLeftovers(self, pgid):
        for pid in groupMembers(pgid):
            os.kill(pid, signal.SIGKILL)
        self.make.wait(10)

    def log(self):
        with open(self.output, "rb") as f:
            return f.read().decode("utf-8", "replace")[-6000:]

    def delivered(self, backend, user, marker):
        """
        The messages holding C{marker} in C{user@example.test}'s Maildir
        under demo/C{backend}; removed when the test ends.
        """
        new = os.path.join(self.demo, backend, "example.test", user, "Maildir", "new")
        found = []
        for name in os.listdir(new) if os.path.isdir(new) else ():
            path = os.path.join(new, name)
            with open(path, "rb") as f:
                if marker.encode("ascii") in f.read():
                    found.append(path)
                    self.addCleanup(os.remove, path)
        return found

    def test_demoDeliversToMaildirs(self):
        """
        With C{make run}, a mail to alice, bob and carol sent with swaks
        lands in alice's Maildir under demo/old and bob's under demo/new,
        and carol is deferred (451).  Ctrl-C then stops make run and every
        process it started.
        """
        self.startMakeRun()
        marker = "make run test " + uuid.uuid4().hex
        swaks = subprocess.run(
            [
                self.swaks, "--protocol", "LMTP", "--server", "127.0.0.1",
                "--port", str(self.proxyPort), "--timeout", "30",
                "--to", "alice@example.test,bob@example.test,carol@example.test",
                "--header", "Subject: " + marker,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        conversation = swaks.stdout
        self.assertEqual(len(self.delivered("old", "alice", marker)), 1, conversation + self.log())
        self.assertEqual(len(self.delivered("new", "bob", marker)), 1, conversation + self.log())
        misplaced = self.delivered("new", "alice", marker) + self.delivered("old", "bob", marker)
        self.assertEqual(misplaced, [])
        carol = replyTo(conversation, "RCPT TO:<carol@example.test>")
        self.assertRegex(carol, r"^451 ", conversation)

        os.killpg(self.make.pid, signal.SIGINT)
        self.make.wait(120)
        deadline = time.monotonic() + 10
        while groupMembers(self.make.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(groupMembers(self.make.pid), [], self.log())
        self.assertEqual([port for port in self.ports if listening(port)], [], self.log())
        self.assertNotIn("Traceback", self.log())
