"""
What a postmaster copies from this tree: the example configuration, the
README's migration script, the service files in contrib/.
"""

import os
import re
import subprocess
import sys

from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.routing import RoutingTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def readmeFunction(name):
    """
    The shell function C{name} as README.rst shows it.
    """
    text = read("README.rst")
    match = re.search(r"^( *)%s\(\) \{\n.*?^\1\}\n" % (re.escape(name),), text, re.M | re.S)
    return match.group(0)


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


class MigrationScriptTests(unittest.TestCase):
    """
    The README's migration script edits the users table safely.
    """

    def setBackend(self, conf, user, backend):
        script = readmeFunction("set_backend") + 'set_backend "$1" "$2"\n'
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["conf"] = conf
        return subprocess.run(
            ["bash", "-euc", 'conf="$conf"\n' + script, "set_backend", user, backend],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def writeConfig(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                "config:\n  socket: [127.0.0.1, 24024]\n"
                "backends:\n  old: {host: 127.0.0.1, port: 24101}\n"
                "  new: {host: 127.0.0.1, port: 24102}\n"
                "users:\n  alice@example.com: old\n  bob@example.com: old\n"
            )
        return path

    def requireCommand(self):
        if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "lmtp-proxy")):
            raise unittest.SkipTest("the lmtp-proxy command is not installed next to this Python")

    def test_setBackendMovesOneUser(self):
        """
        C{set_backend USER BACKEND} changes that user's row and no other.
        """
        self.requireCommand()
        path = self.writeConfig()
        result = self.setBackend(path, "alice@example.com", "reject")
        self.assertEqual(result.returncode, 0, result.stderr)
        table = RoutingTable.fromConfig(configuration.load(path))
        self.assertEqual(table.route("alice", "example.com").backend, "reject")
        self.assertEqual(table.route("bob", "example.com").backend, "old")

    def test_setBackendRefusesInvalidResult(self):
        """
        A backend name the configuration does not define is refused and the
        file is left as it was.
        """
        self.requireCommand()
        path = self.writeConfig()
        before = read(path)
        result = self.setBackend(path, "alice@example.com", "nowhere")
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(read(path), before)


class ContribTests(unittest.TestCase):
    """
    contrib/ service files.
    """

    def test_systemdUnit(self):
        """
        The systemd unit runs twistd in the foreground as Type=simple and
        reloads with SIGUSR1.
        """
        unit = read("contrib", "lmtp-proxy.service")
        self.assertIn("Type=simple", unit)
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
