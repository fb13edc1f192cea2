"""
The Prometheus metrics: each one moves as known traffic says, the processes'
samples add up to one view, and C{/metrics} serves them over HTTP.
"""

import os
import signal
import sys
import threading

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from zope.interface.verify import verifyObject

from lmtp_proxy.metrics import Metrics, ProxyCollector, Retained, exposition
from lmtp_proxy.recorder import NO_METRICS, IRecorder
from lmtp_proxy.status import combine, processView
from tests.lmtpclient import BODY, connectClient, transaction
from tests.support import FakeBackend, Proxy, deadPort, unixPath, waitUntil
from tests.test_service import RunningProxy, TreeTests
from tests.test_workers import WorkerProxy


def value(metrics, name, **labels):
    """
    The sample C{name} with C{labels} in C{metrics}' registry, 0 if absent.
    """
    return metrics.registry.get_sample_value(name, labels) or 0.0


def families(text):
    """
    The samples in the exposition C{text}, parsed by prometheus_client's own
    parser: C{{(sample name, sorted label items): value}}, and the families'
    types by name.
    """
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


def idleStatus():
    """
    The status of an idle proxy of two processes and no backends, as
    L{lmtp_proxy.status.combine} makes it.
    """
    return {
        "generation": 1,
        "routes": 3,
        "processes": 2,
        "sessions": 0,
        "generations": {},
        "in_flight": [],
        "backends": {},
    }


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@defer.inlineCallbacks
def getMetrics(where):
    """
    GET /metrics from C{where} (a TCP port on 127.0.0.1); fire with the
    status code and the body as text.
    """
    response = yield Agent(reactor).request(
        b"GET", b"http://127.0.0.1:%d/metrics" % (where,)
    )
    body = yield readBody(response)
    return response.code, body.decode("utf-8")


class MovementTests(unittest.TestCase):
    """
    Each counter moves by what known traffic through one process does.
    """

    def proxy(self, users, backends=None, **settings):
        self.metrics = Metrics()
        self.backend = FakeBackend(self)
        if backends is None:
            backends = {"a": self.backend.entry}
        return Proxy(self, settings, backends, users, metrics=self.metrics)

    @defer.inlineCallbacks
    def deliver(self, proxy, recipients, count):
        client = yield proxy.connect(self)
        client.send(transaction(recipients))
        replies = yield client.waitReplies(count)
        return replies

    @defer.inlineCallbacks
    def test_sent(self):
        """
        Two recipients delivered by one backend: two sent recipients, two
        2xx RCPT replies, one message of the body's size, two latencies and
        one connect.
        """
        proxy = self.proxy({"@x.test": "a"})
        yield self.deliver(proxy, [b"one@x.test", b"two@x.test"], 8)
        m = self.metrics
        self.assertEqual(value(m, "lmtp_proxy_recipients_total", backend="a", outcome="sent"), 2)
        self.assertEqual(value(m, "lmtp_proxy_rcpt_replies_total", backend="a", **{"class": "2xx"}), 2)
        self.assertEqual(value(m, "lmtp_proxy_messages_total", backend="a"), 1)
        self.assertEqual(value(m, "lmtp_proxy_message_bytes_total", backend="a"), len(BODY))
        self.assertEqual(value(m, "lmtp_proxy_delivery_duration_seconds_count", backend="a"), 2)
        self.assertEqual(
            value(m, "lmtp_proxy_backend_connect_duration_seconds_count", backend="a"), 1
        )

    @defer.inlineCallbacks
    def test_deferredByReject(self):
        """
        A recipient routed to C{reject} counts as deferred, with a 4xx RCPT
        reply, under the backend name C{reject}; no message is relayed.
        """
        proxy = self.proxy({"carol@x.test": "reject", "@x.test": "a"})
        yield self.deliver(proxy, [b"carol@x.test"], 6)
        m = self.metrics
        self.assertEqual(
            value(m, "lmtp_proxy_recipients_total", backend="reject", outcome="deferred"), 1
        )
        self.assertEqual(
            value(m, "lmtp_proxy_rcpt_replies_total", backend="reject", **{"class": "4xx"}), 1
        )
        self.assertEqual(value(m, "lmtp_proxy_messages_total", backend="a"), 0)

    @defer.inlineCallbacks
    def test_refusedUnrouted(self):
        """
        A recipient without a route is bounced at RCPT (5xx) under the
        backend name C{none}.
        """
        proxy = self.proxy({"@x.test": "a"})
        yield self.deliver(proxy, [b"nobody@y.test"], 6)
        m = self.metrics
        self.assertEqual(
            value(m, "lmtp_proxy_recipients_total", backend="none", outcome="bounced"), 1
        )
        self.assertEqual(
            value(m, "lmtp_proxy_rcpt_replies_total", backend="none", **{"class": "5xx"}), 1
        )

    @defer.inlineCallbacks
    def test_refusedByBackend(self):
        """
        A recipient its backend refuses with 550 counts as bounced there,
        with a 5xx RCPT reply, while the other one is sent.
        """
        proxy = self.proxy({"@x.test": "a"})
        self.backend.rcptReplies[b"gone@x.test"] = b"550 5.1.1 no such user\r\n"
        yield self.deliver(proxy, [b"gone@x.test", b"here@x.test"], 8)
        m = self.metrics
        self.assertEqual(value(m, "lmtp_proxy_recipients_total", backend="a", outcome="bounced"), 1)
        self.assertEqual(value(m, "lmtp_proxy_recipients_total", backend="a", outcome="sent"), 1)
        self.assertEqual(value(m, "lmtp_proxy_rcpt_replies_total", backend="a", **{"class": "5xx"}), 1)

    @defer.inlineCallbacks
    def test_aborted(self):
        """
        A client that leaves in the middle of the message: its accepted
        recipient counts as aborted, and no message as relayed.
        """
        proxy = self.proxy({"@x.test": "a"})
        client = yield proxy.connect(self)
        client.send(b"LHLO c.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<one@x.test>\r\nDATA\r\npart")
        yield client.waitReplies(5)
        client.transport.loseConnection()
        yield waitUntil(
            lambda: value(self.metrics, "lmtp_proxy_recipients_total", backend="a", outcome="aborted")
        )
        self.assertEqual(value(self.metrics, "lmtp_proxy_messages_total", backend="a"), 0)

    @defer.inlineCallbacks
    def test_backendDown(self):
        """
        A backend nothing listens at: one connection failure counted as
        C{unreachable}, its recipient deferred, and the backend, marked down
        after C{backend_failures} (1) failures, shown down with its last
        failure.
        """
        proxy = self.proxy(
            {"@x.test": "a"},
            backends={"a": {"host": "127.0.0.1", "port": deadPort()}},
            backend_failures=1,
        )
        yield self.deliver(proxy, [b"one@x.test"], 6)
        m = self.metrics
        self.assertEqual(
            value(m, "lmtp_proxy_backend_connect_failures_total", backend="a", reason="unreachable"), 1
        )
        self.assertEqual(value(m, "lmtp_proxy_recipients_total", backend="a", outcome="deferred"), 1)
        view = processView(proxy.state, proxy.factory, proxy.pool)
        self.assertEqual(view["backends"]["a"]["state"], "down")
        self.assertIn("backend unavailable", view["backends"]["a"]["last_failure"]["error"])
        families = {f.name: f for f in exposition([m.samples()], combine(view, {}))}
        [down] = families["lmtp_proxy_backend_down"].samples
        self.assertEqual((down.labels, down.value), ({"backend": "a"}, 1))

    @defer.inlineCallbacks
    def test_backendUpAgain(self):
        """
        A backend that answers again after a failed connection has no last
        failure any more.
        """
        proxy = self.proxy({"@x.test": "a"})
        backend = proxy.config.backends["a"]
        self.backend.greeting = b"421 4.3.2 not now\r\n"
        yield self.deliver(proxy, [b"one@x.test"], 6)
        self.assertIsNotNone(proxy.pool.describe(backend)["last_failure"])
        self.backend.greeting = b"220 fake.test LMTP ready\r\n"
        yield self.deliver(proxy, [b"two@x.test"], 7)
        entry = proxy.pool.describe(backend)
        self.assertEqual((entry["state"], entry["last_failure"]), ("up", None))

    @defer.inlineCallbacks
    def test_reuse(self):
        """
        A second transaction on the pooled connection counts one reuse and
        no second connect; the connection then shows as pooled.
        """
        proxy = self.proxy({"@x.test": "a"})
        yield self.deliver(proxy, [b"one@x.test"], 7)
        yield waitUntil(lambda: proxy.pool.describe(proxy.config.backends["a"])["pooled"])
        yield self.deliver(proxy, [b"two@x.test"], 7)
        m = self.metrics
        self.assertEqual(value(m, "lmtp_proxy_backend_connection_reuses_total", backend="a"), 1)
        self.assertEqual(
            value(m, "lmtp_proxy_backend_connect_duration_seconds_count", backend="a"), 1
        )

    @defer.inlineCallbacks
    def test_inFlight(self):
        """
        While a backend holds its verdict, the session, the transaction (by
        generation and backend) and the busy connection show in the gauges;
        afterwards they are gone.
        """
        proxy = self.proxy({"@x.test": "a"})
        self.backend.dataAction = "hang"
        client = yield proxy.connect(self)
        client.send(transaction([b"one@x.test"], quit=False))
        yield waitUntil(lambda: self.backend.messages)
        view = processView(proxy.state, proxy.factory, proxy.pool)
        gauges = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in exposition([], combine(view, {}))
            for s in f.samples
        }
        self.assertEqual(gauges["lmtp_proxy_sessions", ()], 1)
        self.assertEqual(gauges["lmtp_proxy_transactions_in_flight", (("generation", "1"),)], 1)
        self.assertEqual(
            gauges[
                "lmtp_proxy_backend_transactions_in_flight",
                (("backend", "a"), ("generation", "1")),
            ],
            1,
        )
        self.assertEqual(gauges["lmtp_proxy_backend_busy_connections", (("backend", "a"),)], 1)
        client.transport.loseConnection()
        yield waitUntil(lambda: not proxy.factory.sessions)
        self.backend.stop()
        yield waitUntil(lambda: not proxy.factory.delivery.running)
        view = processView(proxy.state, proxy.factory, proxy.pool)
        self.assertEqual((view["sessions"], view["transactions"], view["in_flight"]), (0, 0, []))


class RecorderTests(unittest.TestCase):
    """
    Both recorders provide L{IRecorder}.
    """

    def test_metrics(self):
        """
        L{Metrics} provides L{IRecorder}.
        """
        self.assertTrue(verifyObject(IRecorder, Metrics()))

    def test_noMetrics(self):
        """
        L{NO_METRICS} provides L{IRecorder}.
        """
        self.assertTrue(verifyObject(IRecorder, NO_METRICS))


class CollectorTests(unittest.TestCase):
    """
    L{ProxyCollector} gathers in the reactor thread for a scrape in another.
    """

    def test_gathersInReactorThread(self):
        """
        The gathering runs in the reactor thread, and the scrape's thread
        gets the families it makes.
        """
        threads = []

        def gather():
            threads.append(threading.current_thread())
            return defer.succeed(([Metrics().samples()], idleStatus()))

        collector = ProxyCollector(reactor, gather)
        d = deferToThread(lambda: [f.name for f in collector.collect()])

        def check(names):
            self.assertEqual(threads, [threading.main_thread()])
            self.assertIn("lmtp_proxy_config_generation", names)

        return d.addCallback(check)

    def test_givesUp(self):
        """
        A gathering that never ends fails the scrape after C{GATHER_TIME},
        so its thread ends (a stop joins the thread pool).
        """
        collector = ProxyCollector(reactor, defer.Deferred)
        collector.GATHER_TIME = 0.1
        return self.assertFailure(deferToThread(collector.collect), RuntimeError)


class OptionalTests(unittest.TestCase):
    """
    C{prometheus_client} is needed only with C{metrics}.
    """

    def hideMetrics(self):
        # An entry of None makes the next import of that name fail.
        for name in ("prometheus_client", "lmtp_proxy.metrics"):
            self.addCleanup(sys.modules.__setitem__, name, sys.modules[name])
            sys.modules[name] = None

    def test_withoutMetricsNotNeeded(self):
        """
        Without C{metrics} the proxy's service builds with no
        C{prometheus_client} to import.
        """
        self.hideMetrics()
        svc = TreeTests("build").build()
        self.assertIs(svc.metrics, NO_METRICS)

    def test_missingIsOneLine(self):
        """
        With C{metrics} and no C{prometheus_client}, start-up ends with one
        line saying what to install.
        """
        self.hideMetrics()
        e = self.assertRaises(
            SystemExit, TreeTests("build").build, metrics=["127.0.0.1", deadPort()]
        )
        self.assertIn("pip install 'lmtp-proxy[metrics]'", str(e))


class ExpositionTests(unittest.TestCase):
    """
    L{exposition} adds up the processes' samples into one view.
    """

    def test_countersAdd(self):
        """
        The same series in two processes is one series holding the sum;
        a series in only one process is kept as it is.
        """
        first, second = Metrics(), Metrics()
        first.recipient("a", "sent")
        second.recipient("a", "sent")
        second.recipient("a", "sent")
        second.recipient("b", "deferred")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in exposition([first.samples(), second.samples()], idleStatus())
            for s in f.samples
        }
        self.assertEqual(
            samples["lmtp_proxy_recipients_total", (("backend", "a"), ("outcome", "sent"))], 3
        )
        self.assertEqual(
            samples["lmtp_proxy_recipients_total", (("backend", "b"), ("outcome", "deferred"))], 1
        )

    def test_histogramsAdd(self):
        """
        Histogram buckets, counts and sums add up across processes.
        """
        first, second = Metrics(), Metrics()
        first.delivered("a", 0.02)
        second.delivered("a", 2.0)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in exposition([first.samples(), second.samples()], idleStatus())
            for s in f.samples
        }
        self.assertEqual(samples["lmtp_proxy_delivery_duration_seconds_count", (("backend", "a"),)], 2)
        self.assertAlmostEqual(
            samples["lmtp_proxy_delivery_duration_seconds_sum", (("backend", "a"),)], 2.02
        )
        self.assertEqual(
            samples[
                "lmtp_proxy_delivery_duration_seconds_bucket", (("backend", "a"), ("le", "0.025"))
            ],
            1,
        )

    def test_noCreatedSamples(self):
        """
        The per-process C{_created} timestamps are not exposed: their sum
        would mean nothing.
        """
        metrics = Metrics()
        metrics.recipient("a", "sent")
        names = {s.name for f in exposition([metrics.samples()], idleStatus()) for s in f.samples}
        self.assertFalse([n for n in names if n.endswith("_created")])

    def test_retainedAfterWorkerEnds(self):
        """
        A worker that no longer answers keeps its last samples in the sum,
        so the proxy's counters never go down.
        """
        retained = Retained()
        worker = Metrics()
        worker.recipient("a", "sent")
        report = {"status": {"pid": 4242}, "samples": worker.samples()}
        retained.update({1: report})
        self.assertEqual(retained.update({1: None}), [report["samples"]])


class HTTPTests(unittest.TestCase):
    """
    The real proxy service with C{metrics} serves C{/metrics} over HTTP.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_scrape(self):
        """
        GET /metrics answers in the Prometheus text format, which
        prometheus_client's parser reads back: the counters hold what was
        sent, the generation and routes what is in force.
        """
        a = FakeBackend(self)
        where = deadPort()
        proxy = RunningProxy(
            self, {"a": a.entry}, {"@x.test": "a", "carol@x.test": "reject"},
            metrics=["127.0.0.1", where],
        )
        for recipients, count in (([b"one@x.test", b"two@x.test"], 8), ([b"carol@x.test"], 6)):
            client = yield proxy.connect()
            client.send(transaction(recipients))
            yield client.waitReplies(count)
        code, text = yield getMetrics(where)
        self.assertEqual(code, 200)
        samples, types = families(text)
        self.assertEqual(types["lmtp_proxy_recipients"], "counter")
        self.assertEqual(types["lmtp_proxy_delivery_duration_seconds"], "histogram")
        self.assertEqual(sample(samples, "lmtp_proxy_recipients_total", backend="a", outcome="sent"), 2)
        self.assertEqual(
            sample(samples, "lmtp_proxy_recipients_total", backend="reject", outcome="deferred"), 1
        )
        self.assertEqual(sample(samples, "lmtp_proxy_config_generation"), 1)
        self.assertEqual(sample(samples, "lmtp_proxy_routes"), 2)
        self.assertEqual(sample(samples, "lmtp_proxy_processes"), 1)

    @defer.inlineCallbacks
    def test_reloads(self):
        """
        A reload put in force counts as C{ok}, sets the last reload
        duration and the generation; a refused file counts as C{refused}.
        """
        a = FakeBackend(self)
        where = deadPort()
        proxy = RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, metrics=["127.0.0.1", where])
        yield proxy.service.reloader.reload()
        proxy.write({}, {}, text="config: [")
        yield self.assertFailure(proxy.service.reloader.reload(), Exception)
        code, text = yield getMetrics(where)
        samples, _ = families(text)
        self.assertEqual(sample(samples, "lmtp_proxy_reloads_total", result="ok"), 1)
        self.assertEqual(sample(samples, "lmtp_proxy_reloads_total", result="refused"), 1)
        self.assertEqual(sample(samples, "lmtp_proxy_config_generation"), 2)
        self.assertGreater(sample(samples, "lmtp_proxy_last_reload_duration_seconds"), 0)

    @defer.inlineCallbacks
    def test_unixSocket(self):
        """
        C{metrics} as a path serves the same over a unix socket.
        """
        path = unixPath(self)
        a = FakeBackend(self)
        RunningProxy(self, {"a": a.entry}, {"@x.test": "a"}, metrics=path)

        class ToSocket:
            def endpointForURI(self, uri):
                return UNIXClientEndpoint(reactor, path)

        agent = Agent.usingEndpointFactory(reactor, ToSocket())
        response = yield agent.request(b"GET", b"http://localhost/metrics")
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        samples, _ = families(body.decode("utf-8"))
        self.assertEqual(sample(samples, "lmtp_proxy_config_generation"), 1)


class WorkerMetricsTests(unittest.TestCase):
    """
    With C{workers: 2}, /metrics is one view over both processes.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_totalsOverTwoProcesses(self):
        """
        Known traffic served partly by the worker and partly by the master
        is counted once in total: the exposed counters equal what was sent,
        and each process counted some of it.
        """
        a = FakeBackend(self)
        where = deadPort()
        proxy = WorkerProxy(self, {"a": a.entry}, {"@x.test": "a"}, metrics=["127.0.0.1", where])
        yield proxy.ready()
        sent = 0

        @defer.inlineCallbacks
        def send():
            client = yield connectClient(self, proxy.port)
            client.send(transaction([b"r%d@x.test" % (sent,)]))
            yield client.waitReplies(7)

        # The master's listener is paused: these go to the worker.
        for _ in range(3):
            yield send()
            sent += 1
        # Then the worker is stopped, so the master accepts the next ones
        # (with both accepting, an idle worker wins nearly every race).
        [worker] = proxy.service.workers.processes
        os.kill(worker.transport.pid, signal.SIGSTOP)
        try:
            proxy.service.listener.port.startReading()
            for _ in range(2):
                yield send()
                sent += 1
        finally:
            os.kill(worker.transport.pid, signal.SIGCONT)
        local = proxy.service.metrics
        masterCount = value(local, "lmtp_proxy_recipients_total", backend="a", outcome="sent")
        self.assertEqual(masterCount, 2)
        code, text = yield getMetrics(where)
        samples, _ = families(text)
        self.assertEqual(
            sample(samples, "lmtp_proxy_recipients_total", backend="a", outcome="sent"), sent
        )
        self.assertEqual(sample(samples, "lmtp_proxy_messages_total", backend="a"), sent)
        self.assertEqual(sample(samples, "lmtp_proxy_rcpt_replies_total", backend="a", **{"class": "2xx"}), sent)
        self.assertEqual(sample(samples, "lmtp_proxy_processes"), 2)
        self.assertEqual(len(a.messages), sent)
