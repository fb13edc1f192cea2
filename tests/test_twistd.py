"""
The real twistd: the plugin as an administrator runs it, signals included.
"""

import os
import signal
import subprocess
import sys

import yaml
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.lmtpclient import connectClient, transaction
from tests.support import FakeBackend, deadPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistdCommand():
    """
    The twistd of the Python running the tests.
    """
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdProcess:
    """
    C{twistd -n lmtp-proxy --config FILE} in a subprocess, logging to a
    file, stopped by its PID.
    """

    def __init__(self, testcase, document):
        self.testcase = testcase
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "proxy.yaml")
        self.logfile = os.path.join(self.dir, "proxy.log")
        self.write(document)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            twistdCommand()
            + [
                "-n",
                "--pidfile=" + os.path.join(self.dir, "twistd.pid"),
                "--logfile=" + self.logfile,
                "lmtp-proxy",
                "--config",
                self.config,
            ],
            cwd=self.dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        testcase.addCleanup(self.stop)

    def write(self, document):
        with open(self.config, "w") as f:
            yaml.safe_dump(document, f)

    def log(self, name=None):
        try:
            with open(name or self.logfile) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @defer.inlineCallbacks
    def waitFor(self, condition, seconds=30):
        for _ in range(int(seconds / 0.05)):
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    "twistd exited: %s\n%s" % (self.process.stdout.read(), self.log())
                )
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("timed out; log:\n" + self.log())

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


class TwistdTests(unittest.TestCase):
    """
    The plugin under the real twistd.
    """

    @defer.inlineCallbacks
    def test_sigusr1ReloadsAndRotatesLog(self):
        """
        One SIGUSR1 to C{twistd --logfile} both reloads the routing table
        and rotates the log file.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        port = deadPort()
        document = {
            "config": {"socket": ["127.0.0.1", port]},
            "backends": {"a": a.entry, "b": b.entry},
            "users": {"alice@x.test": "a"},
        }
        proxy = TwistdProcess(self, document)
        yield proxy.waitFor(lambda: "listening on" in proxy.log())

        client = yield connectClient(self, port)
        client.send(transaction([b"alice@x.test"]))
        yield client.lost
        self.assertEqual(len(a.messages), 1)

        document["users"] = {"alice@x.test": "b"}
        proxy.write(document)
        os.kill(proxy.process.pid, signal.SIGUSR1)
        yield proxy.waitFor(
            lambda: os.path.exists(proxy.logfile + ".1")
            and "reload: generation 2" in proxy.log()
        )
        self.assertIn("listening on", proxy.log(proxy.logfile + ".1"))
        self.assertNotIn("listening on", proxy.log())

        client = yield connectClient(self, port)
        client.send(transaction([b"alice@x.test"]))
        yield client.lost
        self.assertEqual((len(a.messages), len(b.messages)), (1, 1))

    @defer.inlineCallbacks
    def test_sigtermStops(self):
        """
        SIGTERM stops twistd cleanly and removes its pid file.
        """
        a = FakeBackend(self)
        port = deadPort()
        proxy = TwistdProcess(
            self,
            {
                "config": {"socket": ["127.0.0.1", port]},
                "backends": {"a": a.entry},
                "users": {},
            },
        )
        yield proxy.waitFor(lambda: "listening on" in proxy.log())
        # Answered only once the reactor runs, with its signal handlers.
        yield connectClient(self, port)
        proxy.process.send_signal(signal.SIGTERM)
        for _ in range(400):
            if proxy.process.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        # twistd ends by re-raising the signal it stopped on, so that its
        # parent sees why it exited.
        self.assertEqual(proxy.process.returncode, -signal.SIGTERM)
        self.assertIn("Server Shut Down.", proxy.log())
        self.assertFalse(os.path.exists(os.path.join(proxy.dir, "twistd.pid")))

    def test_configErrorReachesTerminal(self):
        """
        A broken config stops twistd before it starts, with the one-line
        message on the terminal and no traceback.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "bad.yaml")
        with open(path, "w") as f:
            f.write("config:\n  socket: [127.0.0.1, 99999]\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        result = subprocess.run(
            twistdCommand() + ["-n", "--pidfile=", "lmtp-proxy", "--config", path],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn("line 2", output)
        self.assertIn("port", output)
        self.assertNotIn("Traceback", output)
