"""
The twistd service: reload, the migration barrier, graceful stop.
"""

import gc
import os
import signal
import socket

import yaml
from twisted.application.service import MultiService
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy import reloader, service
from lmtp_proxy.control import controlAddress
from lmtp_proxy.service import ProxyService, makeService
from lmtp_proxy.state import DrainTimeout
from tests.lmtpclient import connectClient, transaction
from tests.support import FakeBackend, deadPort, waitUntil


def captureLog(testcase):
    """
    Collect the text of every log event until the test ends.
    """
    lines = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


class RunningProxy:
    """
    A L{ProxyService} started from a config file on a free loopback port.
    """

    def __init__(self, testcase, backends, users, **settings):
        self.testcase = testcase
        self.path = os.path.abspath(testcase.mktemp())
        self.port = deadPort()
        self.settings = dict({"socket": ["127.0.0.1", self.port]}, **settings)
        self.write(backends, users)
        self.service = ProxyService(configuration.load(self.path), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        # Starting freezes the test process's heap too; give it back.
        testcase.addCleanup(gc.unfreeze)
        testcase.addCleanup(self.stop)

    def write(self, backends, users, text=None):
        if text is None:
            text = yaml.safe_dump(
                {"config": self.settings, "backends": backends, "users": users}
            )
        with open(self.path, "w") as f:
            f.write(text)

    def stop(self):
        if self.service.running:
            for session in list(self.service.factory.sessions):
                session.transport.abortConnection()
            return self.service.stopService()

    def connect(self):
        return connectClient(self.testcase, self.port)


def control(address, request):
    """
    Send one control request from a thread-free blocking socket in a
    thread, returning a Deferred with the reply line.
    """
    from twisted.internet.threads import deferToThread

    def ask():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(address)
        s.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            data += chunk
        s.close()
        return data.decode().strip()

    return deferToThread(ask)


def _fifoHasReader(path):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


class ReloadTests(unittest.TestCase):
    """
    Reloading re-reads the file and swaps the table only when it is valid.
    """

    @defer.inlineCallbacks
    def test_reloadSwapsTable(self):
        """
        After a reload, routing follows the new file.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = RunningProxy(self, backends, {"alice@x.test": "a"})
        proxy.write(backends, {"alice@x.test": "b"})
        generation, summary = yield proxy.service.reloader.reload()
        self.assertEqual(generation, 2)
        self.assertEqual(proxy.service.state.table.lookup("alice", "x.test").backend, "b")

    @defer.inlineCallbacks
    def test_reloadLogsWhatChanged(self):
        """
        The reload log line counts users added, removed and moved.
        """
        log = captureLog(self)
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = RunningProxy(self, backends, {"alice@x.test": "a", "bob@x.test": "a"})
        proxy.write(backends, {"alice@x.test": "b", "carol@x.test": "a"})
        yield proxy.service.reloader.reload()
        [line] = [l for l in log if l.startswith("reload: generation 2")]
        self.assertIn("users: 1 added, 1 removed, 1 moved", line)

    @defer.inlineCallbacks
    def test_reloadSwapsBackendDefinitions(self):
        """
        A reload that moves a backend to another address sends the next
        transaction there, and logs backends added and removed.
        """
        log = captureLog(self)
        old, new, extra = FakeBackend(self), FakeBackend(self), FakeBackend(self)
        proxy = RunningProxy(self, {"a": old.entry, "gone": extra.entry}, {"@x.test": "a"})
        proxy.write({"a": new.entry, "added": extra.entry}, {"@x.test": "a"})
        yield proxy.service.reloader.reload()
        client = yield proxy.connect()
        client.send(transaction([b"one@x.test"]))
        yield client.waitReplies(7)
        self.assertEqual((len(old.messages), len(new.messages)), (0, 1))
        [line] = [l for l in log if l.startswith("reload: generation 2")]
        self.assertIn("backends: 1 added, 1 removed, 1 changed", line)

    @defer.inlineCallbacks
    def test_brokenFileKeepsTable(self):
        """
        A file that does not validate is refused with one log line naming the
        problem, and the table in force stays.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"alice@x.test": "a"})
        proxy.write(None, None, text="config:\n  socket: [127.0.0.1, 1]\nusers:\n  bob: nowhere\n")
        yield self.assertFailure(proxy.service.reloader.reload(), configuration.ConfigError)
        self.assertEqual(proxy.service.state.generation, 1)
        self.assertEqual(proxy.service.state.table.lookup("alice", "x.test").backend, "a")
        refused = [l for l in log if l.startswith("reload refused")]
        self.assertEqual(len(refused), 1)
        self.assertIn("line 4", refused[0])
        self.assertIn("nowhere", refused[0])

    @defer.inlineCallbacks
    def test_hungLoadTimesOut(self):
        """
        A file whose reading hangs (here a FIFO nobody writes) is refused
        after the load timeout with one line, the table stays, the child
        stuck reading it is killed, and the next reload is not held back.
        """
        self.patch(reloader, "LOAD_TIMEOUT", 1.0)
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"alice@x.test": "a"})
        os.remove(proxy.path)
        os.mkfifo(proxy.path)
        yield self.assertFailure(proxy.service.reloader.reload(), configuration.ConfigError)
        # Killed: nobody is left with the FIFO open for reading.
        yield waitUntil(lambda: not _fifoHasReader(proxy.path))
        self.assertEqual(proxy.service.state.generation, 1)
        refused = [l for l in log if l.startswith("reload refused")]
        self.assertEqual(len(refused), 1)
        self.assertIn("not loaded within 1 s", refused[0])
        os.remove(proxy.path)
        proxy.write({"a": a.entry}, {"alice@x.test": "a", "bob@x.test": "a"})
        generation, _ = yield proxy.service.reloader.reload()
        self.assertEqual(generation, 2)

    @defer.inlineCallbacks
    def test_yamlErrorKeepsTable(self):
        """
        A YAML syntax error is refused like any other mistake, with one log
        line naming the file and the line.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"alice@x.test": "a"})
        proxy.write(None, None, text="config: [unclosed\n")
        error = yield self.assertFailure(proxy.service.reloader.reload(), configuration.ConfigError)
        self.assertIn(proxy.path, str(error))
        self.assertEqual(proxy.service.state.generation, 1)
        refused = [l for l in log if l.startswith("reload refused")]
        self.assertEqual(len(refused), 1)
        self.assertIn(proxy.path + ", line ", refused[0])

    @defer.inlineCallbacks
    def test_listenerChangeNeedsRestart(self):
        """
        A changed listening socket is logged as needing a restart, and the
        old listener keeps serving.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"alice@x.test": "a"})
        proxy.settings["socket"] = ["127.0.0.1", deadPort()]
        proxy.write({"a": a.entry}, {"alice@x.test": "a"})
        yield proxy.service.reloader.reload()
        self.assertTrue(any("restart" in l for l in log))
        client = yield proxy.connect()
        self.assertEqual(client.codes(), [220])

    @defer.inlineCallbacks
    def test_routedRecipientKeepsRoute(self):
        """
        A recipient routed before a reload is delivered on its old route; the
        next RCPT of the same transaction uses the new table; the connection
        survives the reload.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = RunningProxy(self, backends, {"@x.test": "a"})
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        proxy.write(backends, {"@x.test": "b"})
        yield proxy.service.reloader.reload()
        client.send(b"RCPT TO:<two@x.test>\r\nDATA\r\nhi\r\n.\r\n")
        replies = yield client.waitReplies(8)
        self.assertEqual([r[:3] for r in replies[4:]], ["250", "354", "250", "250"])
        self.assertEqual(a.messages, [b"hi\r\n"])
        self.assertEqual(b.messages, [b"hi\r\n"])
        self.assertIn(b"RCPT TO:<one@x.test>", a.commands)
        self.assertIn(b"RCPT TO:<two@x.test>", b.commands)

    @defer.inlineCallbacks
    def test_sigusr1Reloads(self):
        """
        SIGUSR1 reloads the file, and a handler that was installed before
        (twistd's log rotation) still runs on the same signal.
        """
        called = []
        previous = signal.signal(signal.SIGUSR1, lambda s, f: called.append(s))
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = RunningProxy(self, backends, {"alice@x.test": "a"})
        proxy.write(backends, {"alice@x.test": "b"})
        os.kill(os.getpid(), signal.SIGUSR1)
        yield waitUntil(lambda: proxy.service.state.generation == 2)
        self.assertEqual(proxy.service.state.table.lookup("alice", "x.test").backend, "b")
        self.assertEqual(called, [signal.SIGUSR1])

    @defer.inlineCallbacks
    def test_sigusr1BrokenFileOneLine(self):
        """
        A broken file reloaded by SIGUSR1 is logged in the one "reload
        refused" line only: no unhandled error and no traceback follow.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"alice@x.test": "a"})
        proxy.write(None, None, text="config:\n  socket: [127.0.0.1, 1]\nusers:\n  bob: nowhere\n")
        os.kill(os.getpid(), signal.SIGUSR1)
        yield waitUntil(lambda: any(l.startswith("reload refused") for l in log))
        gc.collect()
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual([l for l in log if "nhandled" in l or "Traceback" in l], [])
        self.assertEqual(self.flushLoggedErrors(), [])


class BarrierTests(unittest.TestCase):
    """
    A migration can wait until no transaction begun under an older table is
    still running.
    """

    @defer.inlineCallbacks
    def test_waitReturnsAfterOldTransactionsEnd(self):
        """
        C{reload-wait} answers only after the transaction begun before the
        reload has finished.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        answer = control(controlAddress(proxy.service.state.config), "reload-wait 60")
        yield waitUntil(lambda: proxy.service.state.generation == 2)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(answer.called)
        client.send(b"DATA\r\nhi\r\n.\r\n")
        yield client.waitReplies(6)
        reply = yield answer
        self.assertEqual(reply, "ok generation=2 drained")

    @defer.inlineCallbacks
    def test_waitTimesOut(self):
        """
        When old transactions outlast the wait, the answer says so.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\n")
        yield client.waitReplies(3)
        reply = yield control(controlAddress(proxy.service.state.config), "reload-wait 0.2")
        self.assertEqual(
            reply,
            "timeout 1 transaction(s) begun before generation 2 still running",
        )

    def test_drainTimeoutMessage(self):
        """
        L{ProxyState.whenDrained} fails with L{DrainTimeout} after the
        timeout, naming the number of old transactions.
        """
        clock = task.Clock()
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        state = proxy.service.state
        generation = state.begin()
        state.swap(state.config, state.table)
        waiting = state.whenDrained(state.generation, clock, 5)
        clock.advance(5)
        failure = self.failureResultOf(waiting, DrainTimeout)
        self.assertIn("1 transaction(s) begun before generation 2", str(failure.value))
        state.end(generation)

    @defer.inlineCallbacks
    def test_reloadOverControlSocket(self):
        """
        C{reload} over the control socket answers with the generation and the
        summary of changes.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        reply = yield control(controlAddress(proxy.service.state.config), "reload")
        self.assertTrue(reply.startswith("ok generation=2 users: 0 added"), reply)

    @defer.inlineCallbacks
    def test_reloadErrorOverControlSocket(self):
        """
        A broken file is reported to the control client as an error line.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"})
        proxy.write(None, None, text="config:\n  sockt: /x\n")
        reply = yield control(controlAddress(proxy.service.state.config), "reload")
        self.assertTrue(reply.startswith("error "), reply)
        self.assertIn("sockt", reply)


class StartTests(unittest.TestCase):
    def test_startFreezesWhatIsLoaded(self):
        """
        Once started, what was loaded at start (Twisted, the configuration,
        the table) is out of the collector's full passes, which would
        otherwise walk it again and stall every session each time.
        """
        gc.unfreeze()
        backend = FakeBackend(self)
        RunningProxy(self, {"a": backend.entry}, {"x@a.test": "a"})
        self.assertGreater(gc.get_freeze_count(), 0)


class TreeTests(unittest.TestCase):
    """
    L{makeService} builds the proxy as a tree of services, each with one job.
    """

    def setUp(self):
        # Trial's reactor keeps Twisted's own dispatch, and its log
        # observers Twisted's own timestamps and formatter: the tests after
        # these must not run in a process that one of them changed.
        self.lightened = []
        self.patch(
            service, "dispatchEventsLightly", lambda *args: self.lightened.append(args)
        )
        self.timestampsCached = []
        self.patch(service, "cacheLogTimestamps", lambda: self.timestampsCached.append(True))
        self.plainLines = []
        self.patch(service, "formatPlainLogLines", lambda: self.plainLines.append(True))

    def build(self, **settings):
        """
        The service C{makeService} makes of a configuration with
        C{settings}; nothing is bound.
        """
        path = os.path.abspath(self.mktemp())
        settings = dict({"socket": ["127.0.0.1", deadPort()]}, **settings)
        with open(path, "w") as f:
            yaml.safe_dump({"config": settings, "backends": {}, "users": {}}, f)
        return makeService({"config": path})

    def test_children(self):
        """
        L{makeService} returns a C{MultiService} whose children, in the
        order they start, are the sessions, the listener, the control
        socket, the workers, the reload machinery and the systemd notifier.
        """
        svc = self.build(workers=2)
        self.assertIsInstance(svc, MultiService)
        self.assertEqual(
            [child.name for child in svc],
            ["sessions", "listener", "control", "workers", "reload", "notify"],
        )

    def test_noWorkersForOneProcess(self):
        """
        With C{workers: 1} the tree has no workers child.
        """
        svc = self.build(workers=1)
        self.assertEqual(
            [child.name for child in svc],
            ["sessions", "listener", "control", "reload", "notify"],
        )

    def test_reactorDispatchesLightly(self):
        """
        L{makeService} has the reactor twistd runs dispatch its events with
        L{lmtp_proxy.twisted_internals.dispatchEventsLightly}, holding for
        each turn the outbox that the sessions and the backend connections
        write through.
        """
        svc = self.build()
        self.assertEqual(self.lightened, [(reactor, svc.pool.outbox)])
        self.assertIs(svc.factory.outbox, svc.pool.outbox)

    def test_logTimestampsCached(self):
        """
        L{makeService} has twistd's text log observer format each second's
        timestamp once, with
        L{lmtp_proxy.twisted_internals.cacheLogTimestamps}.
        """
        self.build()
        self.assertEqual(self.timestampsCached, [True])

    def test_plainLogLines(self):
        """
        L{makeService} has twistd's text log observer write each
        recipient's outcome line without Twisted's formatter, with
        L{lmtp_proxy.twisted_internals.formatPlainLogLines}.
        """
        self.build()
        self.assertEqual(self.plainLines, [True])

    def test_metricsListener(self):
        """
        With C{metrics} the tree has a metrics child, after the control
        socket.
        """
        svc = self.build(metrics=["127.0.0.1", deadPort()])
        self.assertEqual(
            [child.name for child in svc],
            ["sessions", "listener", "control", "metrics", "reload", "notify"],
        )


class StopTests(unittest.TestCase):
    """
    Stopping lets transactions in flight finish for the grace period.
    """

    @defer.inlineCallbacks
    def test_stopRefusesNewConnections(self):
        """
        Once stopping, the listener is closed at once, while a transaction
        in flight is still draining.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=10)
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        stopping = proxy.service.stopService()
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(stopping.called)
        probe = socket.socket()
        self.addCleanup(probe.close)
        self.assertRaises(OSError, probe.connect, ("127.0.0.1", proxy.port))
        client.send(b"DATA\r\nhi\r\n.\r\n")
        yield stopping

    @defer.inlineCallbacks
    def test_transactionFinishesThenCloses(self):
        """
        A transaction in flight when the stop begins completes, then the
        session is closed with 421 4.3.2.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=10)
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        stopped = proxy.service.stopService()
        client.send(b"DATA\r\nhi\r\n.\r\n")
        replies = yield client.waitReplies(7)
        self.assertEqual([r[:9] for r in replies[4:]], ["354 Start", "250 2.0.0", "421 4.3.2"])
        yield stopped
        self.assertEqual(a.messages, [b"hi\r\n"])

    @defer.inlineCallbacks
    def test_graceExpiryAbortsUnfinished(self):
        """
        A client still before the final dot when the grace period ends gets
        421 4.3.2, and its backend transaction is dropped without a message.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=0.3)
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\nDATA\r\n")
        yield client.waitReplies(5)
        client.send(b"Subject: half\r\n")
        yield proxy.service.stopService()
        replies = yield client.waitReplies(6)
        self.assertTrue(replies[5].startswith("421 4.3.2"), replies)
        yield client.lost
        yield waitUntil(lambda: a.aborted)
        self.assertEqual(a.messages, [])
        self.assertEqual(a.aborted, [b"Subject: half\r\n"])

    @defer.inlineCallbacks
    def test_graceExpiryRunsNoPipelinedCommand(self):
        """
        When the grace period ends while an RCPT waits on its backend, the
        DATA the client pipelined behind it is not run: the backend that
        got the RCPT pipelined after the first has its connection dropped
        without a message, and the client gets the 421 and nothing else.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        a.actions["MAIL"] = a.actions["RCPT"] = "hang"
        proxy = RunningProxy(
            self, {"a": a.entry, "b": b.entry}, {"@x.test": "a", "@y.test": "b"},
            shutdown_grace=0.3,
        )
        client = yield proxy.connect()
        client.send(
            b"LHLO c\r\nMAIL FROM:<s@z>\r\nRCPT TO:<one@x.test>\r\n"
            b"RCPT TO:<two@y.test>\r\nDATA\r\n"
        )
        yield waitUntil(lambda: b"MAIL" in a.verbs() and b"RCPT" in b.verbs())
        yield proxy.service.stopService()
        yield client.lost
        self.assertEqual(client.codes(), [220, 250, 250, 421])
        yield waitUntil(lambda: not b.open)
        self.assertEqual(b.verbs()[-2:], [b"MAIL", b"RCPT"])
        self.assertEqual(b.messages, [])

    @defer.inlineCallbacks
    def test_idleSessionClosedAtOnce(self):
        """
        A session between transactions is closed with 421 4.3.2 as soon as
        the stop begins.
        """
        a = FakeBackend(self)
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=10)
        client = yield proxy.connect()
        yield proxy.service.stopService()
        replies = yield client.waitReplies(2)
        self.assertTrue(replies[1].startswith("421 4.3.2"))


class LogTests(unittest.TestCase):
    """
    One log line per recipient outcome, one per backend connection failure.
    """

    @defer.inlineCallbacks
    def test_outcomeLines(self):
        """
        Each recipient gets a line with the transaction id, client, sender,
        recipient, backend, the backend's reply, delay and status; a dead
        backend gets one connection-failure line.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = RunningProxy(
            self,
            {"a": a.entry, "down": {"host": "127.0.0.1", "port": deadPort()}},
            {"@x.test": "a", "@down.test": "down"},
        )
        client = yield proxy.connect()
        client.send(
            b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n"
            b"RCPT TO:<two@down.test>\r\nDATA\r\nhi\r\n.\r\n"
        )
        yield client.waitReplies(7)
        outcomes = [l for l in log if ": to=<" in l]
        self.assertEqual(len(outcomes), 2)
        self.assertRegex(
            outcomes[1],
            r"^[0-9A-F]{10}: to=<one@x\.test>, backend=a, client=127\.0\.0\.1:\d+, "
            r"from=<s@y>, delay=\d+\.\d{3}, status=sent \(250 2\.0\.0 <one@x\.test> Saved\)$",
        )
        self.assertIn("to=<two@down.test>, backend=down", outcomes[0])
        self.assertIn("status=deferred (451 4.4.1", outcomes[0])
        failures = [l for l in log if "connection failed" in l]
        self.assertEqual(len(failures), 1)
        self.assertIn("backend down (127.0.0.1:", failures[0])
