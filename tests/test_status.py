"""
C{lmtp-proxy status}: what the running proxy is doing, over its control
socket, for humans and as JSON.
"""

import json
import os
import subprocess
import sys

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from lmtp_proxy.control import controlAddress
from lmtp_proxy.status import formatStatus
from tests.lmtpclient import connectClient, transaction
from tests.support import FakeBackend, deadPort, waitUntil
from tests.test_service import RunningProxy, control
from tests.test_workers import WorkerProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runStatus(path, *args):
    """
    Run C{lmtp-proxy status -c PATH ARGS} from the source tree in a thread;
    fire with the completed process.
    """
    return deferToThread(
        subprocess.run,
        [sys.executable, "-m", "lmtp_proxy.cli", "status", "-c", path, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )


class StatusTests(unittest.TestCase):
    """
    The status of one process, and of a proxy with a worker.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_json(self):
        """
        C{--json} prints the generation, sessions, transactions in flight by
        generation and backend, and per backend its address, state, pooled
        and busy connections and last failure.
        """
        a = FakeBackend(self)
        a.dataAction = "hang"
        dead = deadPort()
        proxy = RunningProxy(
            self,
            {"a": a.entry, "gone": {"host": "127.0.0.1", "port": dead}},
            {"@x.test": "a", "@y.test": "gone"},
            backend_failures=1,
        )
        client = yield proxy.connect()
        client.send(transaction([b"one@y.test"]))
        yield client.waitReplies(6)
        holding = yield proxy.connect()
        holding.send(transaction([b"one@x.test"], quit=False))
        yield waitUntil(lambda: a.messages)
        done = yield runStatus(proxy.path, "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        status = json.loads(done.stdout)
        self.assertEqual(status["generation"], 1)
        self.assertEqual(status["sessions"], 1)
        self.assertEqual(status["transactions"], 1)
        self.assertEqual(status["in_flight"], [{"generation": 1, "backend": "a", "count": 1}])
        a_ = status["backends"]["a"]
        self.assertEqual(
            (a_["address"], a_["state"], a_["busy"], a_["pooled"], a_["last_failure"]),
            ("127.0.0.1:%d" % (a.entry["port"],), "up", 1, 0, None),
        )
        gone = status["backends"]["gone"]
        self.assertEqual(gone["state"], "down")
        self.assertIn("backend unavailable", gone["last_failure"]["error"])
        self.assertEqual(status["master"]["pid"], os.getpid())
        self.assertEqual(status["workers"], {})

    @defer.inlineCallbacks
    def test_human(self):
        """
        By default the status is printed as lines for humans: the totals,
        then each backend with its state.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        done = yield runStatus(proxy.path)
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(
            lines[0], "generation 1, 1 process(es), 0 session(s), 0 transaction(s) in flight"
        )
        self.assertIn("backends:", lines)
        self.assertTrue(
            any(line.split()[:2] == ["a", "up"] for line in lines), lines
        )

    @defer.inlineCallbacks
    def test_controlRequest(self):
        """
        The control socket answers C{status-json} with C{ok} and the JSON on
        one line.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        reply = yield control(controlAddress(proxy.service.state.config), "status-json")
        word, _, text = reply.partition(" ")
        self.assertEqual(word, "ok")
        self.assertEqual(json.loads(text)["backends"]["a"]["state"], "up")

    @defer.inlineCallbacks
    def test_workers(self):
        """
        With a worker, the status has its own view under its number, and
        the totals include its session.
        """
        a = FakeBackend(self)
        a.dataAction = "hang"
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"})
        yield proxy.ready()
        client = yield connectClient(self, proxy.port)
        client.send(transaction([b"one@x.test"], quit=False))
        yield waitUntil(lambda: a.messages)
        done = yield runStatus(proxy.path, "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        status = json.loads(done.stdout)
        worker = status["workers"]["1"]
        self.assertNotEqual(worker["pid"], os.getpid())
        self.assertEqual((worker["sessions"], worker["transactions"]), (1, 1))
        self.assertEqual(worker["backends"]["a"]["busy"], 1)
        self.assertEqual((status["processes"], status["sessions"]), (2, 1))
        self.assertEqual(status["backends"]["a"]["busy"], 1)

    @defer.inlineCallbacks
    def test_notRunning(self):
        """
        Without a running proxy the command fails with one line naming the
        control socket.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("config:\n  socket: [127.0.0.1, %d]\n" % (deadPort(),))
        done = yield runStatus(path)
        self.assertEqual(done.returncode, 1)
        self.assertIn("cannot reach the control socket", done.stderr)


class FormatTests(unittest.TestCase):
    """
    L{formatStatus} for humans.
    """

    def test_downBackendWithFailure(self):
        """
        A backend down shows as C{down} with its last failure and when.
        """
        view = {
            "pid": 7,
            "sessions": 0,
            "transactions": 0,
            "backends": {
                "old": {
                    "address": "127.0.0.1:24",
                    "state": "down",
                    "pooled": 0,
                    "busy": 0,
                    "last_failure": {"at": 0.0, "error": "backend unavailable: refused"},
                }
            },
        }
        status = {
            "generation": 4,
            "processes": 1,
            "sessions": 0,
            "transactions": 2,
            "in_flight": [
                {"generation": 3, "backend": "old", "count": 1},
                {"generation": 4, "backend": "new", "count": 1},
            ],
            "backends": view["backends"],
            "master": view,
            "workers": {"1": None},
        }
        lines = formatStatus(status)
        self.assertIn("  generation 3: old 1", lines)
        self.assertIn("  old  down  pooled 0  busy 0  127.0.0.1:24", lines)
        self.assertIn(
            "       last failure 1970-01-01 00:00:00 UTC: backend unavailable: refused", lines
        )
        self.assertIn("worker 1: did not answer", lines)
