"""
Tests for L{lmtp_proxy.cli}: the original command line, and the C{check},
C{route} and C{reload} subcommands.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

from twisted.trial import unittest

from lmtp_proxy import cli
from tests.support import readUntil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
config:
  socket: [127.0.0.1, 24024]
  ignoreDomain: false
  fallback_backend: old
backends:
  old:
    host: 127.0.0.1
    port: 24101
  new:
    socket: /run/dovecot-new/lmtp
    user: proxy
    password: s3cret-Passw0rd
users:
  alice@example.test: old
  bob@example.test: new
  "@new.example.test": new
  carol@example.test: reject
"""

NO_FALLBACK = """\
config:
  socket: /run/lmtp-proxy.sock
  owner: postfix
  group: postfix
  permissions: 0660
backends:
  old:
    host: 127.0.0.1
    port: 24101
users:
  alice@example.test: old
"""


class CLITestCase(unittest.TestCase):
    """
    Helpers: a short private temporary directory (unix socket paths must stay
    under 108 bytes), config files in it, and L{cli.main} run in-process with
    captured output.
    """

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="lmtpcli")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def writeConfig(self, text, name="proxy.yaml"):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def runMain(self, args):
        """
        Run L{cli.main} with C{args}; return C{(status, stdout, stderr)}.
        argparse's C{SystemExit} becomes its status.
        """
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            status = cli.main(args)
        except SystemExit as e:
            status = e.code
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
            self.patch(sys, "stderr", sys.__stderr__)
        return status, out.getvalue(), err.getvalue()

    def runScript(self, args):
        """
        Run C{python -m lmtp_proxy.cli ARGS} from the source tree; return the
        completed process (text output).
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run(
            [sys.executable, "-m", "lmtp_proxy.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


class CheckTests(CLITestCase):
    """
    C{lmtp-proxy check}.
    """

    def test_summary(self):
        """
        A valid configuration exits 0 and prints the listen socket, every
        backend with where it lives, the user count, the fallback and
        ignoreDomain.
        """
        path = self.writeConfig(CONFIG)
        # A readable file holding a password is warned about on stderr.
        os.chmod(path, 0o600)
        status, out, err = self.runMain(["check", "-c", path])
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("listen: 127.0.0.1:24024", lines)
        self.assertTrue(any(line.strip().startswith("old: 127.0.0.1:24101") for line in lines), out)
        self.assertTrue(
            any(line.strip().startswith("new: unix:/run/dovecot-new/lmtp") for line in lines), out
        )
        self.assertTrue(any(line.startswith("users: 4") for line in lines), out)
        self.assertIn("fallback_backend: old", lines)
        self.assertIn("ignoreDomain: false", lines)

    def test_metricsListener(self):
        """
        C{metrics} is shown as the URL it is served at.
        """
        path = self.writeConfig(NO_FALLBACK.replace("config:\n", "config:\n  metrics: [127.0.0.1, 9125]\n"))
        status, out, err = self.runMain(["check", "-c", path])
        self.assertEqual(status, 0, err)
        self.assertIn("metrics: http://127.0.0.1:9125/metrics", out.splitlines())

    def test_unixListener(self):
        """
        A unix listening socket is shown with its owner, group and octal mode,
        and a missing fallback is shown as "none".
        """
        path = self.writeConfig(NO_FALLBACK)
        status, out, err = self.runMain(["check", "-c", path])
        self.assertEqual(status, 0, err)
        self.assertIn(
            "listen: unix:/run/lmtp-proxy.sock (owner postfix, group postfix, mode 0660)",
            out.splitlines(),
        )
        self.assertTrue(any(line.startswith("fallback_backend: none") for line in out.splitlines()), out)

    def test_neverPrintsPasswords(self):
        """
        Backend passwords appear nowhere in the summary.
        """
        path = self.writeConfig(CONFIG)
        status, out, err = self.runMain(["check", "-c", path])
        self.assertEqual(status, 0)
        self.assertNotIn("s3cret-Passw0rd", out + err)

    def test_errorIsOneLineWithoutTraceback(self):
        """
        An invalid configuration exits 1 with exactly one line on stderr,
        "lmtp-proxy: <file>, line N: <key>: <problem>", and no traceback.
        """
        path = self.writeConfig(CONFIG.replace("port: 24101", "port: lots"))
        result = self.runScript(["check", "-c", path])
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith(f"lmtp-proxy: {path}, line "), lines[0])
        self.assertIn("backends.old.port", lines[0])
        self.assertNotIn("Traceback", result.stderr)

    def test_missingFile(self):
        """
        A configuration file that does not exist exits 1 with a one-line
        message naming it.
        """
        missing = os.path.join(self.tmp, "nope.yaml")
        status, out, err = self.runMain(["check", "-c", missing])
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(missing, err)


class RouteTests(CLITestCase):
    """
    C{lmtp-proxy route}.
    """

    def test_routedAddress(self):
        """
        A routed address prints "ADDRESS<TAB>backend NAME (why)" and exits 0.
        """
        path = self.writeConfig(CONFIG)
        status, out, err = self.runMain(["route", "-c", path, "alice@example.test"])
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            ["alice@example.test\tbackend old (matched users key 'alice@example.test')"],
        )

    def test_caseAndExtension(self):
        """
        The lookup ignores case and the recipient_delimiter extension, and the
        output shows the address as given.
        """
        path = self.writeConfig(CONFIG)
        status, out, _ = self.runMain(["route", "-c", path, "Bob+Lists@Example.TEST"])
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("Bob+Lists@Example.TEST\tbackend new "), out)
        self.assertIn("'bob@example.test'", out)

    def test_domainKey(self):
        """
        An address matched by an "@domain" key says so.
        """
        path = self.writeConfig(CONFIG)
        status, out, _ = self.runMain(["route", "-c", path, "zed@new.example.test"])
        self.assertEqual(status, 0)
        self.assertIn("backend new (matched users key '@new.example.test')", out)

    def test_rejectIsARoute(self):
        """
        A user pointed at "reject" is routed (exit 0) and the output says the
        mail is deferred.
        """
        path = self.writeConfig(CONFIG)
        status, out, _ = self.runMain(["route", "-c", path, "carol@example.test"])
        self.assertEqual(status, 0)
        self.assertIn("backend reject", out)
        self.assertIn("4xx", out)

    def test_fallback(self):
        """
        An unknown address goes to fallback_backend, and the output says so.
        """
        path = self.writeConfig(CONFIG)
        status, out, _ = self.runMain(["route", "-c", path, "unknown@example.test"])
        self.assertEqual(status, 0)
        self.assertIn("backend old (fallback_backend)", out)

    def test_noRouteExits1(self):
        """
        Without a fallback an unknown address has no route: it is reported
        (550 5.1.1) and the exit status is 1, even when other addresses are
        routed.
        """
        path = self.writeConfig(NO_FALLBACK)
        status, out, _ = self.runMain(
            ["route", "-c", path, "alice@example.test", "nobody@example.test"]
        )
        self.assertEqual(status, 1)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertTrue(lines[0].startswith("alice@example.test\tbackend old"), lines[0])
        self.assertTrue(lines[1].startswith("nobody@example.test\tno route"), lines[1])
        self.assertIn("550 5.1.1", lines[1])

    def test_noAddressIsUsageError(self):
        """
        No address at all is a usage error: exit 2.
        """
        path = self.writeConfig(CONFIG)
        status, out, err = self.runMain(["route", "-c", path])
        self.assertEqual(status, 2)
        self.assertIn("usage:", err)

    def test_badAddressIsUsageError(self):
        """
        An address with an empty local part or domain is a usage error: exit 2.
        """
        path = self.writeConfig(CONFIG)
        for bad in ("@example.test", "alice@"):
            status, _, err = self.runMain(["route", "-c", path, bad])
            self.assertEqual(status, 2, bad)
            self.assertIn("not a recipient address", err)

    def test_configErrorExits1(self):
        """
        An invalid configuration makes route exit 1 with the one-line error.
        """
        path = self.writeConfig("config: {}\n")
        status, out, err = self.runMain(["route", "-c", path, "alice@example.test"])
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("lmtp-proxy: "), err)


class OriginalCommandLineTests(CLITestCase):
    """
    The original form, C{lmtp-proxy [-h] [-c [CONFIG]] [-D]}.
    """

    def test_parserAcceptsConfigAndDaemonize(self):
        """
        C{-c FILE -D} and C{--config FILE --daemonize} are accepted.
        """
        parser = cli.originalParser()
        for args in (["-c", "x.yaml", "-D"], ["--config", "x.yaml", "--daemonize"]):
            options = parser.parse_args(args)
            self.assertEqual((options.config, options.daemonize), ("x.yaml", True))

    def test_parserDefaults(self):
        """
        Without options, and with a bare C{-c}, the configuration is
        /etc/lmtp-proxy.yaml and the proxy runs in the foreground.
        """
        parser = cli.originalParser()
        for args in ([], ["-c"]):
            options = parser.parse_args(args)
            self.assertEqual((options.config, options.daemonize), ("/etc/lmtp-proxy.yaml", False))

    def test_foregroundArgv(self):
        """
        In the foreground twistd runs with -n, no pid file, the lmtp-proxy
        plugin and the absolute configuration path.
        """
        self.assertEqual(
            cli.twistdArgv("/etc/x.yaml", False, "/run/x.pid"),
            ["twistd", "-n", "--pidfile=", "lmtp-proxy", "--config", "/etc/x.yaml"],
        )

    def test_daemonArgv(self):
        """
        Daemonized twistd writes the given pid file and logs to syslog with
        the prefix lmtp-proxy.
        """
        self.assertEqual(
            cli.twistdArgv("/etc/x.yaml", True, "/run/x.pid"),
            [
                "twistd", "--pidfile", "/run/x.pid", "--syslog", "--prefix", "lmtp-proxy",
                "lmtp-proxy", "--config", "/etc/x.yaml",
            ],
        )

    def test_relativeConfigMadeAbsolute(self):
        """
        A relative configuration path is passed to twistd as an absolute one.
        """
        argv = cli.twistdArgv("conf/x.yaml", False)
        self.assertEqual(argv[-1], os.path.join(os.getcwd(), "conf/x.yaml"))

    def test_daemonUsesConfigPid(self):
        """
        C{-c FILE -D} runs twistd with the configuration's pid file.
        """
        path = self.writeConfig(CONFIG.replace("  fallback_backend: old\n",
                                               "  fallback_backend: old\n  pid: /tmp/lmtp-x.pid\n"))
        calls = []
        self.patch(cli, "runTwistd", lambda argv: calls.append(list(argv)) or 0)
        status, _, err = self.runMain(["-c", path, "-D"])
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(calls, [cli.twistdArgv(path, True, "/tmp/lmtp-x.pid")])

    def test_foregroundRunsTwistd(self):
        """
        C{-c FILE} runs twistd in the foreground form.
        """
        path = self.writeConfig(CONFIG)
        calls = []
        self.patch(cli, "runTwistd", lambda argv: calls.append(list(argv)) or 0)
        status, _, _ = self.runMain(["-c", path])
        self.assertEqual(status, 0)
        self.assertEqual(calls, [["twistd", "-n", "--pidfile=", "lmtp-proxy", "--config", path]])

    def test_configErrorStopsBeforeTwistd(self):
        """
        An invalid configuration is reported in one line (exit 1) and twistd
        is never started.
        """
        path = self.writeConfig("config:\n  sockt: /x\n")
        calls = []
        self.patch(cli, "runTwistd", lambda argv: calls.append(argv) or 0)
        status, out, err = self.runMain(["-c", path, "-D"])
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith(f"lmtp-proxy: {path}"), err)


class FakeControlServer:
    """
    A control socket on C{address} that accepts one connection, records the
    request line, then sends C{reply} (or, if None, waits for the client to
    give up) and closes.
    """

    def __init__(self, address, reply):
        self.reply = reply
        self.received = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            self.received.append(readUntil(conn, b"\n"))
            if self.reply is not None:
                conn.sendall(self.reply)
            else:
                while conn.recv(1024):
                    pass

    def stop(self):
        self.thread.join(30)
        self.sock.close()


class ReloadTests(CLITestCase):
    """
    C{lmtp-proxy reload}: the control protocol and the SIGUSR1 fallback.
    """

    def setUp(self):
        super().setUp()
        self.control = os.path.join(self.tmp, "control.sock")
        self.pidfile = os.path.join(self.tmp, "proxy.pid")
        self.path = self.writeConfig(
            CONFIG.replace(
                "  fallback_backend: old\n",
                f"  fallback_backend: old\n  control_socket: {self.control}\n"
                f"  pid: {self.pidfile}\n",
            )
        )

    def serve(self, reply, address=None):
        server = FakeControlServer(address or self.control, reply)
        self.addCleanup(server.stop)
        return server

    def child(self):
        """
        A child process that dies of the first signal it gets; its pid is
        written to C{self.pidfile}.
        """
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait()

        self.addCleanup(cleanup)
        with open(self.pidfile, "w") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def test_reloadOk(self):
        """
        C{reload} sends "reload", prints an "ok" reply on stdout and exits 0.
        """
        server = self.serve(b"ok generation=2 users: 1 added, 0 removed, 0 moved\n")
        status, out, err = self.runMain(["reload", "-c", self.path])
        server.stop()
        self.assertEqual(server.received, [b"reload\n"])
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "ok generation=2 users: 1 added, 0 removed, 0 moved\n")

    def test_waitSendsDefaultTimeout(self):
        """
        C{reload --wait} sends "reload-wait 300" (the default timeout).
        """
        server = self.serve(b"ok generation=3 drained\n")
        status, out, _ = self.runMain(["reload", "-c", self.path, "--wait"])
        server.stop()
        self.assertEqual(server.received, [b"reload-wait 300\n"])
        self.assertEqual((status, out), (0, "ok generation=3 drained\n"))

    def test_waitSendsGivenTimeout(self):
        """
        C{reload --wait --timeout 7} sends "reload-wait 7".
        """
        server = self.serve(b"ok generation=3 drained\n")
        status, _, _ = self.runMain(["reload", "-c", self.path, "--wait", "--timeout", "7"])
        server.stop()
        self.assertEqual(server.received, [b"reload-wait 7\n"])
        self.assertEqual(status, 0)

    def test_errorReply(self):
        """
        An "error ..." reply goes to stderr and the exit status is 1.
        """
        self.serve(b"error proxy.yaml, line 3: config.socket: missing required key\n")
        status, out, err = self.runMain(["reload", "-c", self.path])
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertIn("error proxy.yaml, line 3: config.socket: missing required key", err)

    def test_timeoutReply(self):
        """
        A "timeout ..." reply to reload --wait goes to stderr and the exit
        status is 1.
        """
        reply = "timeout 2 transaction(s) begun before generation 4 still running"
        self.serve(reply.encode() + b"\n")
        status, out, err = self.runMain(["reload", "-c", self.path, "--wait", "--timeout", "1"])
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertIn(reply, err)

    def test_noReplyTimesOut(self):
        """
        A control socket that never answers makes reload give up after
        --timeout plus the slack, with exit status 1.
        """
        self.patch(cli, "REPLY_SLACK", 0.3)
        self.serve(None)
        status, out, err = self.runMain(["reload", "-c", self.path, "--timeout", "0"])
        self.assertEqual(status, 1)
        self.assertIn("no reply", err)

    def test_unexpectedReply(self):
        """
        A reply that is neither ok, error nor timeout is an error (exit 1).
        """
        self.serve(b"500 what?\n")
        status, _, err = self.runMain(["reload", "-c", self.path])
        self.assertEqual(status, 1)
        self.assertIn("unexpected reply", err)

    def test_abstractSocket(self):
        """
        Without control_socket the proxy's abstract socket (named after the
        configuration file) is used.
        """
        from lmtp_proxy.control import controlAddress
        from lmtp_proxy.config import load

        path = self.writeConfig(CONFIG, "abstract.yaml")
        address = controlAddress(load(path))
        self.assertTrue(address.startswith("\0"), repr(address))
        server = self.serve(b"ok generation=5 users: 0 added, 0 removed, 0 moved\n", address)
        status, out, _ = self.runMain(["reload", "-c", path])
        server.stop()
        self.assertEqual(server.received, [b"reload\n"])
        self.assertEqual(status, 0)

    def test_fallbackSignalsPidfile(self):
        """
        Without a reachable control socket, reload sends SIGUSR1 to the pid
        in --pidfile, says so and exits 0.
        """
        proc = self.child()
        other = os.path.join(self.tmp, "other.pid")
        os.rename(self.pidfile, other)
        status, out, err = self.runMain(["reload", "-c", self.path, "--pidfile", other])
        self.assertEqual((status, err), (0, ""))
        self.assertIn("SIGUSR1", out)
        self.assertIn(str(proc.pid), out)
        self.assertEqual(proc.wait(30), -signal.SIGUSR1)

    def test_fallbackUsesConfigPid(self):
        """
        Without --pidfile the SIGUSR1 fallback reads the configuration's pid
        file.
        """
        proc = self.child()
        status, out, _ = self.runMain(["reload", "-c", self.path])
        self.assertEqual(status, 0)
        self.assertIn(self.pidfile, out)
        self.assertEqual(proc.wait(30), -signal.SIGUSR1)

    def test_waitNeedsControlSocket(self):
        """
        reload --wait without a reachable control socket fails (exit 1) with a
        clear message, and signals nothing.
        """
        proc = self.child()
        status, out, err = self.runMain(["reload", "-c", self.path, "--wait"])
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertIn("--wait", err)
        self.assertIn(self.control, err)
        self.assertIsNone(proc.poll())

    def test_fallbackWithoutPidfile(self):
        """
        Without a control socket and without a pid file, reload fails with a
        one-line message (exit 1).
        """
        status, out, err = self.runMain(["reload", "-c", self.path])
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(self.pidfile, err)

    def test_negativeTimeoutIsUsageError(self):
        """
        A negative --timeout is a usage error: exit 2.
        """
        status, _, err = self.runMain(["reload", "-c", self.path, "--timeout", "-1"])
        self.assertEqual(status, 2)
        self.assertIn("--timeout", err)
