"""
Worker processes: serving, reload, the migration barrier and stop keep their
meaning across processes.
"""

import os
import signal
import stat

from twisted.internet import defer, reactor
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.reloader import serialize
from lmtp_proxy.state import DrainTimeout, ProxyState
from lmtp_proxy.workers import Worker, Workers
from tests.lmtpclient import connectClient, transaction
from tests.support import FakeBackend, unixPath, waitUntil
from tests.test_service import RunningProxy, captureLog


class WorkerProxy(RunningProxy):
    """
    A proxy with one worker process, whose own listener is paused so that
    every connection goes to the worker.
    """

    def __init__(self, testcase, backends, users, **settings):
        RunningProxy.__init__(self, testcase, backends, users, workers=2, **settings)
        self.service.listener.port.stopReading()

    @defer.inlineCallbacks
    def ready(self):
        yield waitUntil(lambda: self.service.workers.processes, timeout=30)
        [worker] = self.service.workers.processes
        yield waitUntil(lambda: worker.configured.called, timeout=30)
        return worker

    def replaced(self, worker):
        """
        Wait until a new worker took C{worker}'s place and serves.
        """
        return waitUntil(
            lambda: self.service.workers.processes
            and self.service.workers.processes[0] is not worker,
            timeout=30,
        ).addCallback(lambda _: self.ready())


@defer.inlineCallbacks
def deliverToAlice(testcase, proxy):
    """
    One whole transaction for alice@x.test through C{proxy}.
    """
    client = yield connectClient(testcase, proxy.port)
    client.send(transaction([b"alice@x.test"]))
    yield client.waitReplies(7)


class WorkerTests(unittest.TestCase):
    """
    With C{workers: 2}, a second process serves from the same socket.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_workerDelivers(self):
        """
        A transaction accepted by the worker is delivered, and its outcome
        line reaches the master's log.
        """
        log = captureLog(self)
        a = FakeBackend(self)
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"})
        yield proxy.ready()
        client = yield proxy.connect()
        client.send(transaction([b"one@x.test"]))
        replies = yield client.waitReplies(7)
        self.assertTrue(replies[5].startswith("250 2.0.0 <one@x.test>"), replies)
        self.assertEqual(len(a.messages), 1)
        self.assertEqual(proxy.service.factory.sessions, set())
        yield waitUntil(lambda: any("worker 1: " in l and "to=<one@x.test>" in l for l in log))

    @defer.inlineCallbacks
    def test_reloadReachesWorker(self):
        """
        A reload puts the new table in force in the worker before it is
        reported done.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = WorkerProxy(self, backends, {"alice@x.test": "a"})
        yield proxy.ready()
        proxy.write(backends, {"alice@x.test": "b"})
        generation, _ = yield proxy.service.reloader.reload()
        self.assertEqual(generation, 2)
        client = yield proxy.connect()
        client.send(transaction([b"alice@x.test"]))
        yield client.waitReplies(7)
        self.assertEqual((len(a.messages), len(b.messages)), (0, 1))

    @defer.inlineCallbacks
    def test_barrierWaitsForWorkerTransaction(self):
        """
        The migration barrier counts a transaction running in a worker: it
        times out while it runs and is passed once it ended.
        """
        a = FakeBackend(self)
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"})
        yield proxy.ready()
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        generation, _ = yield proxy.service.reloader.reload()
        error = yield self.assertFailure(
            proxy.service.reloader.whenDrained(generation, 0.5), DrainTimeout
        )
        self.assertIn("1 transaction(s) begun before generation 2", str(error))
        client.send(b"DATA\r\nhi\r\n.\r\n")
        yield client.waitReplies(6)
        drained = yield proxy.service.reloader.whenDrained(generation, 10)
        self.assertEqual(drained, generation)

    @defer.inlineCallbacks
    def test_stopEndsWorkers(self):
        """
        Stopping the service lets the worker finish its transaction, then
        the worker process exits.
        """
        a = FakeBackend(self)
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=10)
        worker = yield proxy.ready()
        client = yield proxy.connect()
        client.send(b"LHLO c\r\nMAIL FROM:<s@y>\r\nRCPT TO:<one@x.test>\r\n")
        yield client.waitReplies(4)
        stopping = proxy.service.stopService()
        client.send(b"DATA\r\nhi\r\n.\r\n")
        replies = yield client.waitReplies(7)
        self.assertEqual([r[:9] for r in replies[4:]], ["354 Start", "250 2.0.0", "421 4.3.2"])
        yield stopping
        self.assertTrue(worker.exited.called)
        self.assertEqual(a.messages, [b"hi\r\n"])

    @defer.inlineCallbacks
    def test_deadWorkerRestarted(self):
        """
        A worker that dies is started again with the configuration in
        force, and serves.
        """
        a = FakeBackend(self)
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"})
        worker = yield proxy.ready()
        worker.transport.signalProcess(signal.SIGKILL)
        yield worker.exited
        yield proxy.replaced(worker)
        client = yield proxy.connect()
        client.send(transaction([b"one@x.test"]))
        yield client.waitReplies(7)
        self.assertEqual(len(a.messages), 1)

    @defer.inlineCallbacks
    def test_workerEndingKeepsUnixSocket(self):
        """
        A worker that ends on its own (SIGTERM) leaves the master's unix
        socket in place, listening and with its mode, for the worker started
        in its place.
        """
        path = unixPath(self)
        a = FakeBackend(self)
        proxy = WorkerProxy(
            self, {"a": a.entry}, {"@x.test": "a"}, socket=path, permissions="0660"
        )
        worker = yield proxy.ready()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        worker.transport.signalProcess(signal.SIGTERM)
        yield worker.exited
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        yield proxy.replaced(worker)
        client = yield connectClient(self, path)
        client.send(transaction([b"one@x.test"]))
        yield client.waitReplies(7)
        self.assertEqual(len(a.messages), 1)

    @defer.inlineCallbacks
    def test_hungWorkerDoesNotBlockReload(self):
        """
        A worker that does not answer a reload in time is killed and
        started again with the new table; the reload completes.
        """
        self.patch(Workers, "ANSWER_TIME", 1.0)
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = WorkerProxy(self, backends, {"alice@x.test": "a"})
        worker = yield proxy.ready()
        worker.transport.signalProcess(signal.SIGSTOP)
        proxy.write(backends, {"alice@x.test": "b"})
        generation, _ = yield proxy.service.reloader.reload()
        self.assertEqual(generation, 2)
        self.assertTrue(worker.exited.called)
        yield proxy.replaced(worker)
        yield deliverToAlice(self, proxy)
        self.assertEqual((len(a.messages), len(b.messages)), (0, 1))

    @defer.inlineCallbacks
    def test_reloadWhileWorkerIsBeingRestarted(self):
        """
        A reload while a dead worker waits to be started again does not wait
        on the dead one: it completes at once, and the new worker serves
        with the new table.
        """
        self.patch(Workers, "ANSWER_TIME", 20.0)
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = WorkerProxy(self, backends, {"alice@x.test": "a"})
        worker = yield proxy.ready()
        worker.transport.signalProcess(signal.SIGKILL)
        yield worker.exited
        proxy.write(backends, {"alice@x.test": "b"})
        started = reactor.seconds()
        generation, _ = yield proxy.service.reloader.reload()
        self.assertEqual(generation, 2)
        self.assertLess(reactor.seconds() - started, 10)
        yield waitUntil(lambda: proxy.service.workers.processes, timeout=30)
        yield proxy.ready()
        yield deliverToAlice(self, proxy)
        self.assertEqual((len(a.messages), len(b.messages)), (0, 1))

    @defer.inlineCallbacks
    def test_workerDyingDuringReload(self):
        """
        A worker that dies while a reload waits for its answer does not
        fail the reload: the reload completes, and the worker started
        again serves with the new table.
        """
        a, b = FakeBackend(self), FakeBackend(self)
        backends = {"a": a.entry, "b": b.entry}
        proxy = WorkerProxy(self, backends, {"alice@x.test": "a"})
        worker = yield proxy.ready()
        worker.transport.signalProcess(signal.SIGSTOP)
        proxy.write(backends, {"alice@x.test": "b"})
        reloading = proxy.service.reloader.reload()
        yield waitUntil(lambda: proxy.service.state.generation == 2, timeout=30)
        worker.transport.signalProcess(signal.SIGKILL)
        generation, _ = yield reloading
        self.assertEqual(generation, 2)
        yield proxy.replaced(worker)
        yield deliverToAlice(self, proxy)
        self.assertEqual((len(a.messages), len(b.messages)), (0, 1))


    @defer.inlineCallbacks
    def test_stopKillsWedgedWorker(self):
        """
        A worker that does not exit within its grace and ANSWER_TIME after a
        stop is killed, so the stop ends.
        """
        self.patch(Workers, "ANSWER_TIME", 1.0)
        a = FakeBackend(self)
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"}, shutdown_grace=0.2)
        worker = yield proxy.ready()
        worker.transport.signalProcess(signal.SIGSTOP)
        yield proxy.service.stopService()
        self.assertTrue(worker.exited.called)


class WorkerConfigureTests(unittest.TestCase):
    """
    The worker's side of a configuration.
    """

    @defer.inlineCallbacks
    def test_olderConfigurationNeverReplacesNewer(self):
        """
        Configurations are built in threads and can finish out of order: one
        of an older generation arriving after a newer one is not put in
        force.
        """
        older = configuration.parse("config:\n  socket: [127.0.0.1, 1]\nusers:\n  alice@x.test: a\nbackends:\n  a: {host: 127.0.0.1, port: 3}\n", "<old>")
        newer = configuration.parse("config:\n  socket: [127.0.0.1, 1]\nusers:\n  alice@x.test: b\nbackends:\n  b: {host: 127.0.0.1, port: 2}\n", "<new>")
        worker = Worker(reactor, "inet")
        worker.state = ProxyState(newer)
        worker.state.generation = 3
        yield worker.configure(serialize(older), 2)
        self.assertEqual(worker.state.generation, 3)
        self.assertEqual(worker.state.table.lookup("alice", "x.test").backend, "b")

