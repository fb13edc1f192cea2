"""
The ways an administrator starts the proxy as a process: the original
command line (C{lmtp-proxy -c FILE [-D]}) and twistd, daemonized or not,
logging to stdout, a file or syslog, and a real SIGTERM with a transaction
in flight.

Every process runs from the scripts installed next to C{sys.executable}
(the virtualenv's C{lmtp-proxy} and C{twistd}), listens on 127.0.0.1 only,
and is stopped by its PID: the child we started, or the PID a daemon wrote
to its pid file. Nothing is ever stopped by name.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import yaml
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.peers import pidAlive, readPidFile, stopPid
from tests.lmtpclient import BlockingLMTPClient, connectClient, transaction
from tests.support import FakeBackend, deadPort

BIN = os.path.dirname(sys.executable)


def script(name):
    """The console script C{name} installed next to C{sys.executable}."""
    path = os.path.join(BIN, name)
    if not os.access(path, os.X_OK):
        raise unittest.SkipTest(
            "no %s next to %s (pip install . into that environment)"
            % (name, sys.executable))
    return path


def parentOf(pid):
    with open("/proc/%d/stat" % (pid,), "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def refuses(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return True
    return False


@defer.inlineCallbacks
def poll(predicate, timeout=20.0, what="condition"):
    """
    Poll predicate() without blocking the reactor (an in-process
    FakeBackend may be serving the proxy meanwhile); returns its value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        yield task.deferLater(reactor, 0.05, lambda: None)


def readFile(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class OutputReader(threading.Thread):
    """Collects a child's stdout, line by line, as it comes."""

    def __init__(self, process):
        threading.Thread.__init__(self, daemon=True)
        self.stream = process.stdout
        process.reader = self
        self.lines = []
        self.start()

    def run(self):
        for raw in iter(self.stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace"))

    def text(self):
        return "".join(self.lines)


class DaemonTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = deadPort()
        self.configPath = os.path.join(self.dir, "proxy.yaml")
        self.pidPath = os.path.join(self.dir, "proxy.pid")
        self.env = dict(os.environ)

    def writeConfig(self, backends=None, users=None, **settings):
        config = {"socket": ["127.0.0.1", self.port], "hostname": "proxy.test",
                  "pid": self.pidPath, "shutdown_grace": 2, "connect_timeout": 5}
        config.update(settings)
        with open(self.configPath, "w") as f:
            yaml.safe_dump({"config": config, "backends": backends or {},
                            "users": users or {}}, f)

    def start(self, argv, stdout=None):
        """Start argv in its own session; stopped by its PID at cleanup."""
        if stdout is None:
            stdout = open(os.path.join(self.dir, "command.out"), "wb")
            self.addCleanup(stdout.close)
        process = subprocess.Popen(
            argv, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(self._stop, process)
        return process

    def _stop(self, process):
        # Stop first, then close our end of its stdout pipe (if any): a
        # reader thread blocked in readline() holds the file's lock until
        # the child is gone.
        stopPid(process.pid, 15.0, process)
        if process.stdout is not None:
            reader = getattr(process, "reader", None)
            if reader is not None:
                reader.join(5)
            process.stdout.close()

    @defer.inlineCallbacks
    def daemonPid(self, process, pidPath):
        """
        Wait for the daemonizing command to return (status 0) and for the
        pid file; register the daemon's stop; return its PID.
        """
        out = os.path.join(self.dir, "command.out")
        yield poll(lambda: process.poll() is not None, 30,
                   "the daemonizing command to return")
        self.assertEqual(process.returncode, 0, readFile(out))
        pid = yield poll(lambda: readPidFile(pidPath), 20, "the pid file %s" % (pidPath,))
        self.addCleanup(stopPid, pid, 15.0)
        return pid

    @defer.inlineCallbacks
    def waitExit(self, pid, popen=None, timeout=30):
        if popen is not None:
            yield poll(lambda: popen.poll() is not None, timeout,
                       "process %d to exit" % (pid,))
        else:
            yield poll(lambda: not pidAlive(pid), timeout,
                       "process %d to exit" % (pid,))

    @defer.inlineCallbacks
    def startLogging(self):
        """
        Start C{twistd -n --logfile L lmtp-proxy --config FILE} and wait
        until it listens.

        @return: a L{Deferred} firing with the process and L.
        """
        logPath = os.path.join(self.dir, "proxy.log")
        process = self.start([script("twistd"), "-n",
                              "--pidfile", os.path.join(self.dir, "twistd.pid"),
                              "--logfile", logPath, "lmtp-proxy",
                              "--config", self.configPath])
        yield poll(lambda: "listening on" in readFile(logPath)
                   or process.poll() is not None, 30, "the proxy to listen")
        self.assertIsNone(process.poll(), readFile(logPath))
        return process, logPath

    @defer.inlineCallbacks
    def test_originalCommandLineDaemonizes(self):
        """
        C{lmtp-proxy -c FILE -D}: the command itself returns with status 0,
        the pid file named by config.pid appears, and the PID in it is a
        live process that is neither the command nor our child, in a session
        of its own; it answers 220 on its TCP socket; SIGTERM to that PID
        stops it and removes the pid file.
        """
        self.writeConfig()
        command = self.start([script("lmtp-proxy"), "-c", self.configPath, "-D"])
        pid = yield self.daemonPid(command, self.pidPath)
        self.assertNotEqual(pid, command.pid)
        self.assertTrue(pidAlive(pid))
        self.assertNotEqual(parentOf(pid), os.getpid())
        self.assertNotEqual(os.getsid(pid), os.getsid(0))
        yield poll(lambda: not refuses(self.port), 20, "the daemon to listen")
        client = BlockingLMTPClient(self.port, timeout=5.0)
        client.quit()
        self.assertTrue(client.greeting.lines[0].startswith("220 proxy.test"))
        os.kill(pid, signal.SIGTERM)
        yield self.waitExit(pid)
        yield poll(lambda: not os.path.exists(self.pidPath), 5,
                   "the pid file to be removed")
        self.assertTrue(refuses(self.port))

    @defer.inlineCallbacks
    def test_originalCommandLineForeground(self):
        """
        C{lmtp-proxy -c FILE} without C{-D} stays in the foreground as our
        child and logs to its stdout (the "listening on" line appears
        there), delivers a message to its backend, and exits on SIGTERM,
        logging its shutdown to stdout too.
        """
        backend = FakeBackend(self)
        self.writeConfig({"a": backend.entry}, {"alice@x.test": "a"})
        process = self.start([script("lmtp-proxy"), "-c", self.configPath],
                             stdout=subprocess.PIPE)
        out = OutputReader(process)
        yield poll(lambda: "listening on" in out.text() or process.poll() is not None,
                   30, "the 'listening on' line on stdout")
        self.assertIsNone(process.poll(), out.text())
        listening = [l for l in out.lines if "listening on" in l][0]
        self.assertIn("127.0.0.1", listening)
        self.assertIn(str(self.port), listening)
        self.assertFalse(os.path.exists(self.pidPath),
                         "the foreground form wrote config.pid")

        client = yield connectClient(self, self.port)
        client.send(transaction([b"alice@x.test"]))
        yield client.lost
        self.assertEqual([r.line[:3] for r in client.replies],
                         ["220", "250", "250", "250", "354", "250", "221"])
        self.assertEqual(len(backend.messages), 1)
        yield poll(lambda: "to=<alice@x.test>" in out.text(), 10,
                   "the outcome line on stdout")

        process.send_signal(signal.SIGTERM)
        yield self.waitExit(process.pid, process)
        self.assertIn(process.returncode, (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", out.text())

    @defer.inlineCallbacks
    def test_twistdDaemonizedWithLogfile(self):
        """
        C{twistd --pidfile P --logfile L lmtp-proxy --config FILE}: twistd
        returns, the pid file appears, the log file gets the "listening on"
        line, then exactly one outcome line per recipient of a delivery
        (two recipients) to an in-process backend, each status=sent;
        SIGTERM to the PID stops it and removes the pid file.
        """
        backend = FakeBackend(self)
        self.writeConfig({"a": backend.entry},
                         {"alice@x.test": "a", "bob@x.test": "a"})
        pidPath = os.path.join(self.dir, "twistd.pid")
        logPath = os.path.join(self.dir, "proxy.log")
        command = self.start([script("twistd"), "--pidfile", pidPath,
                              "--logfile", logPath, "lmtp-proxy",
                              "--config", self.configPath])
        pid = yield self.daemonPid(command, pidPath)
        self.assertNotEqual(pid, command.pid)
        yield poll(lambda: "listening on" in readFile(logPath), 20,
                   "'listening on' in the log file")

        client = yield connectClient(self, self.port)
        client.send(transaction([b"alice@x.test", b"bob@x.test"]))
        yield client.lost
        self.assertEqual([r.line[:3] for r in client.replies],
                         ["220", "250", "250", "250", "250", "354", "250", "250", "221"])
        self.assertEqual(len(backend.messages), 1)

        def outcomes():
            lines = [l for l in readFile(logPath).splitlines() if " to=<" in l]
            return lines if len(lines) >= 2 else None
        lines = yield poll(outcomes, 10, "two outcome lines in the log file")
        yield task.deferLater(reactor, 0.3, lambda: None)
        lines = outcomes()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("to=<alice@x.test>", lines[0])
        self.assertIn("to=<bob@x.test>", lines[1])
        for line in lines:
            self.assertIn("backend=a", line)
            self.assertIn("status=sent", line)

        os.kill(pid, signal.SIGTERM)
        yield self.waitExit(pid)
        yield poll(lambda: not os.path.exists(pidPath), 5, "the pid file to be removed")
        self.assertIn("Server Shut Down.", readFile(logPath))

    @defer.inlineCallbacks
    def test_sigtermWithTransactionInFlight(self):
        """
        A real SIGTERM to C{twistd -n lmtp-proxy} while a message is half
        sent: the proxy stops listening at once, but the client may finish
        the message; it gets its recipient's 250, then 421 4.3.2, the
        backend holds exactly one message, and the process exits.
        """
        backend = FakeBackend(self)
        self.writeConfig({"a": backend.entry}, {"alice@x.test": "a"},
                         shutdown_grace=20)
        process, logPath = yield self.startLogging()

        client = yield connectClient(self, self.port)
        client.send(b"LHLO client.test\r\nMAIL FROM:<s@example.test>\r\n"
                    b"RCPT TO:<alice@x.test>\r\nDATA\r\n")
        replies = yield client.waitReplies(5)
        self.assertEqual([r[:3] for r in replies], ["220", "250", "250", "250", "354"])
        client.send(b"Subject: in flight\r\n\r\n" + b"first half\r\n" * 100)

        process.send_signal(signal.SIGTERM)
        yield poll(lambda: refuses(self.port), 10, "the proxy to stop listening")
        self.assertIsNone(process.poll(), "exited before the transaction ended")
        self.assertEqual(backend.messages, [])

        client.send(b"second half\r\n" * 100 + b".\r\n")
        replies = yield client.waitReplies(7)
        yield client.lost
        self.assertEqual(len(client.replies), 7, client.replies)
        self.assertTrue(replies[5].startswith("250 "), replies)
        self.assertTrue(replies[6].startswith("421 4.3.2"), replies)
        self.assertEqual(len(backend.messages), 1)
        self.assertIn(b"second half\r\n", backend.messages[0])
        yield self.waitExit(process.pid, process)
        self.assertEqual(len(backend.messages), 1)
        self.assertEqual(len([l for l in readFile(logPath).splitlines()
                              if "to=<alice@x.test>" in l and "status=sent" in l]), 1)

    @defer.inlineCallbacks
    def test_outcomeLinesLoggedBeforeTheReplies(self):
        """
        C{twistd -n --logfile L lmtp-proxy}: once the client has the final
        replies for two recipients, both outcome lines are in the log file,
        even when the process is killed (SIGKILL) at that moment.
        """
        backend = FakeBackend(self)
        self.writeConfig({"a": backend.entry}, {"alice@x.test": "a", "bob@x.test": "a"})
        process, logPath = yield self.startLogging()

        client = yield connectClient(self, self.port)
        client.send(b"LHLO client.test\r\nMAIL FROM:<s@example.test>\r\n"
                    b"RCPT TO:<alice@x.test>\r\nRCPT TO:<bob@x.test>\r\nDATA\r\n")
        yield client.waitReplies(6)
        client.send(b"Subject: logged\r\n\r\nbody\r\n.\r\n")
        replies = yield client.waitReplies(8)
        process.kill()
        yield self.waitExit(process.pid, process)
        self.assertEqual([r[:3] for r in replies[6:]], ["250", "250"])
        lines = [l for l in readFile(logPath).splitlines() if "status=sent" in l]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("to=<alice@x.test>", lines[0])
        self.assertIn("to=<bob@x.test>", lines[1])

    @defer.inlineCallbacks
    def test_twistdSyslogForeground(self):
        """
        C{twistd -n --syslog --prefix lmtp-proxy lmtp-proxy --config FILE}
        starts (with or without a syslog daemon on the machine), answers
        220 on its TCP socket, and exits on SIGTERM.
        """
        self.writeConfig()
        process = self.start([script("twistd"), "-n", "--syslog", "--prefix",
                              "lmtp-proxy", "--pidfile",
                              os.path.join(self.dir, "twistd.pid"),
                              "lmtp-proxy", "--config", self.configPath])
        out = os.path.join(self.dir, "command.out")
        yield poll(lambda: process.poll() is not None or not refuses(self.port),
                   30, "the proxy to listen")
        self.assertIsNone(process.poll(), readFile(out))
        client = BlockingLMTPClient(self.port, timeout=5.0)
        client.quit()
        self.assertTrue(client.greeting.lines[0].startswith("220 proxy.test"))
        process.send_signal(signal.SIGTERM)
        yield self.waitExit(process.pid, process)
        self.assertIn(process.returncode, (0, -signal.SIGTERM))
        self.assertTrue(refuses(self.port))
