"""
The proxy's Prometheus metrics, built with C{prometheus_client}, and the
HTTP listener that serves them at C{/metrics} (C{config.metrics}).

Each serving process counts in its own L{Metrics}: counters and histograms
moved on the hot path through label children bound once per label values.
What is a state rather than a count (sessions, transactions in flight,
pooled connections, backends down, the generation) is not kept up to date
on the hot path at all: it is read from the process's
L{lmtp_proxy.status.processView} when scraped.

One consistent view over every process: the master asks each worker for its
samples and its view over the worker's standard input and output, adds them
to its own (L{exposition}), and serves the sum, so every recipient counts
once, in the process that handled it. C{docs/design.rst} says why this
rather than C{prometheus_client}'s multiprocess mode.
"""

import queue

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import address, defer
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from lmtp_proxy.listening import removeStaleSocket
from lmtp_proxy.recorder import IRecorder

PREFIX = "lmtp_proxy_"

# MAIL to final verdict: milliseconds for a local store, up to data_timeout.
DELIVERY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@implementer(IRecorder)
class Metrics:
    """
    The counters and histograms of one process, in its own registry.

    @ivar registry: the C{CollectorRegistry} holding them.
    """

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self._rcptReplies = Counter(
            PREFIX + "rcpt_replies",
            "Replies given to RCPT, by backend and reply class (2xx, 4xx, 5xx).",
            ["backend", "class"],
            registry=registry,
        )
        self._recipients = Counter(
            PREFIX + "recipients",
            "Recipients by backend and final outcome (sent, deferred, bounced, aborted).",
            ["backend", "outcome"],
            registry=registry,
        )
        self._messages = Counter(
            PREFIX + "messages",
            "Messages relayed to a backend up to their final dot.",
            ["backend"],
            registry=registry,
        )
        self._bytes = Counter(
            PREFIX + "message_bytes",
            "Bytes of the messages relayed to a backend, as sent (dot-stuffed).",
            ["backend"],
            registry=registry,
        )
        self._delivery = Histogram(
            PREFIX + "delivery_duration_seconds",
            "Seconds from MAIL to a recipient's final verdict after DATA, by backend.",
            ["backend"],
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self._connect = Histogram(
            PREFIX + "backend_connect_duration_seconds",
            "Seconds to connect to a backend and finish its greeting, LHLO and AUTH.",
            ["backend"],
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            PREFIX + "backend_connect_failures",
            "Connections to a backend that could not be made ready, by reason.",
            ["backend", "reason"],
            registry=registry,
        )
        self._reuses = Counter(
            PREFIX + "backend_connection_reuses",
            "Transactions served by a pooled backend connection.",
            ["backend"],
            registry=registry,
        )
        self._reloads = Counter(
            PREFIX + "reloads",
            "Configuration reloads by result (ok, refused, failed).",
            ["result"],
            registry=registry,
        )
        self._reloadSeconds = Gauge(
            PREFIX + "last_reload_duration_seconds",
            "Seconds the last reload took, until every process used it.",
            registry=registry,
        )
        # Label children, bound once per label values (binding costs several
        # times what an increment does), by metric and key: the hot path is
        # one dictionary lookup and the increment.
        self._bound = {
            metric: {}
            for metric in (
                self._rcptReplies,
                self._recipients,
                self._delivery,
                self._messages,
                self._bytes,
                self._connect,
                self._reuses,
            )
        }

    def _bind(self, metric, key, *labels):
        """
        The child of C{metric} for C{labels}, bound on first use under
        C{key}.
        """
        child = self._bound[metric][key] = metric.labels(*labels)
        return child

    def rcptReply(self, backend, code):
        """
        See L{IRecorder.rcptReply}.
        """
        # Keyed by the code itself: a handful of codes, no formatting.
        try:
            child = self._bound[self._rcptReplies][backend, code]
        except KeyError:
            child = self._bind(
                self._rcptReplies, (backend, code), backend, "%dxx" % (code // 100,)
            )
        child.inc()

    def recipient(self, backend, outcome):
        """
        See L{IRecorder.recipient}.
        """
        try:
            child = self._bound[self._recipients][backend, outcome]
        except KeyError:
            child = self._bind(self._recipients, (backend, outcome), backend, outcome)
        child.inc()

    def delivered(self, backend, seconds):
        """
        See L{IRecorder.delivered}.
        """
        try:
            child = self._bound[self._delivery][backend]
        except KeyError:
            child = self._bind(self._delivery, backend, backend)
        child.observe(seconds)

    def relayed(self, backend, size):
        """
        See L{IRecorder.relayed}.
        """
        try:
            messages = self._bound[self._messages][backend]
            sizes = self._bound[self._bytes][backend]
        except KeyError:
            messages = self._bind(self._messages, backend, backend)
            sizes = self._bind(self._bytes, backend, backend)
        messages.inc()
        sizes.inc(size)

    def connected(self, backend, seconds):
        """
        See L{IRecorder.connected}.
        """
        try:
            child = self._bound[self._connect][backend]
        except KeyError:
            child = self._bind(self._connect, backend, backend)
        child.observe(seconds)

    def reused(self, backend):
        """
        See L{IRecorder.reused}.
        """
        try:
            child = self._bound[self._reuses][backend]
        except KeyError:
            child = self._bind(self._reuses, backend, backend)
        child.inc()

    def connectFailed(self, backend, reason):
        """
        See L{IRecorder.connectFailed}.
        """
        # Not the hot path: a failure costs a connection attempt.
        self._failures.labels(backend, reason).inc()

    def reloaded(self, result, seconds):
        """
        See L{IRecorder.reloaded}.
        """
        self._reloads.labels(result).inc()
        if result == "ok":
            self._reloadSeconds.set(seconds)

    def samples(self):
        """
        This process's counters and histograms as JSON-ready data, for the
        master to add up. The C{_created} samples are left out: the time
        each series was created in one process means nothing in a sum.
        """
        return [
            {
                "name": family.name,
                "type": family.type,
                "help": family.documentation,
                "samples": [
                    [sample.name, sample.labels, sample.value]
                    for sample in family.samples
                    if not sample.name.endswith("_created")
                ],
            }
            for family in self.registry.collect()
        ]


def exposition(sampleLists, status):
    """
    The metric families of the whole proxy: the counters and histograms of
    every process added up, and the gauges of its status.

    @param sampleLists: each process's L{Metrics.samples}.
    @param status: the proxy's status, from L{lmtp_proxy.status.combine},
        with the master's C{routes}.
    @return: a list of C{prometheus_client} metric families.
    """
    merged = {}
    for samples in sampleLists:
        for family in samples:
            name = family["name"]
            if name not in merged:
                merged[name] = (Metric(name, family["help"], family["type"]), {})
            values = merged[name][1]
            for sampleName, labels, value in family["samples"]:
                key = (sampleName, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + value
    families = []
    for metric, values in merged.values():
        for (sampleName, labels), value in values.items():
            metric.add_sample(sampleName, dict(labels), value)
        families.append(metric)

    def gauge(name, documentation, labels=()):
        family = GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels))
        families.append(family)
        return family

    gauge("config_generation", "Generation of the configuration in force.").add_metric(
        [], status["generation"]
    )
    gauge("routes", "Recipient keys in the routing table in force.").add_metric(
        [], status["routes"]
    )
    gauge("processes", "Serving processes that answered (the master and its workers).").add_metric(
        [], status["processes"]
    )
    gauge("sessions", "MTA sessions open.").add_metric([], status["sessions"])
    transactions = gauge(
        "transactions_in_flight",
        "Transactions running, by the generation they began under.",
        ["generation"],
    )
    for generation, count in sorted(status["generations"].items()):
        transactions.add_metric([generation], count)
    byBackend = gauge(
        "backend_transactions_in_flight",
        "Transactions running with recipients at a backend, by generation.",
        ["generation", "backend"],
    )
    for entry in status["in_flight"]:
        byBackend.add_metric([str(entry["generation"]), entry["backend"]], entry["count"])
    pooled = gauge("backend_pooled_connections", "Idle pooled backend connections.", ["backend"])
    busy = gauge("backend_busy_connections", "Backend connections in use.", ["backend"])
    down = gauge("backend_down", "1 while a backend is marked down.", ["backend"])
    for name, entry in sorted(status["backends"].items()):
        pooled.add_metric([name], entry["pooled"])
        busy.add_metric([name], entry["busy"])
        down.add_metric([name], 1 if entry["state"] == "down" else 0)
    return families


class ProxyCollector:
    """
    A C{prometheus_client} collector of the whole proxy's metrics.

    C{prometheus_client}'s Twisted resource runs the exposition in a thread
    of the reactor's pool; the processes' counters, views and workers all
    belong to the reactor thread, so they are gathered there, in one step.
    """

    # Seconds a scrape waits for the reactor thread: past the workers' own
    # STATUS_TIME. Not forever, unlike blockingCallFromThread: a scrape
    # caught by a stop must not hold the thread pool's join, and with it
    # the stop, for ever.
    GATHER_TIME = 15.0

    def __init__(self, reactor, gather):
        """
        @param gather: returns a L{Deferred} (or a value) of the arguments
            of L{exposition}, C{(sampleLists, status)}; called in the
            reactor thread.
        """
        self._reactor = reactor
        self._gather = gather

    def collect(self):
        """
        The metric families, see L{exposition}.
        """
        answers = queue.Queue(1)

        def gather():
            defer.maybeDeferred(self._gather).addBoth(answers.put)

        self._reactor.callFromThread(gather)
        try:
            result = answers.get(timeout=self.GATHER_TIME)
        except queue.Empty:
            raise RuntimeError("metrics not gathered within %s s" % (self.GATHER_TIME,))
        if isinstance(result, Failure):
            result.raiseException()
        sampleLists, status = result
        return exposition(sampleLists, status)


class _QuietSite(Site):
    """
    A site that logs no access line: one scrape every few seconds would
    fill the proxy's log.
    """

    noisy = False

    def log(self, request):
        pass


class _LocalRequest(Request):
    """
    A request on a unix socket, which has neither host nor port; the WSGI
    resource reads both from each end for its environment.
    """

    _here = address.IPv4Address("TCP", "127.0.0.1", 0)

    def getClientAddress(self):
        return self._here

    def getHost(self):
        return self._here


class MetricsListener(service.Service):
    """
    Serves C{/metrics} over HTTP on C{config.metrics} while the proxy runs.

    @ivar port: the listening port, once bound.
    """

    name = "metrics"
    port = None

    def __init__(self, reactor, where, collector):
        """
        @param where: C{config.metrics}: a unix socket path or C{(host,
            port)}.
        @param collector: what is exposed (a L{ProxyCollector}).
        """
        self._reactor = reactor
        self._where = where
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def privilegedStartService(self):
        """
        Bind the HTTP socket while still root; a failure ends start-up with
        one line.

        @see: L{twisted.application.service.IService.privilegedStartService}
        """
        # Imported here: it picks the global reactor at import time.
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.registry))
        site = _QuietSite(root)
        where = self._where
        try:
            if isinstance(where, str):
                site.requestFactory = _LocalRequest
                removeStaleSocket(where)
                self.port = self._reactor.listenUNIX(where, site, mode=0o660)
            else:
                host, number = where
                self.port = self._reactor.listenTCP(number, site, interface=host)
        except (CannotListenError, OSError) as e:
            shown = where if isinstance(where, str) else "%s:%d" % where
            raise SystemExit("lmtp-proxy: cannot serve metrics on %s: %s" % (shown, e))
        service.Service.privilegedStartService(self)

    def stopService(self):
        """
        Stop serving.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class Retained:
    """
    Each worker's last samples, by process id, kept after it ends or while
    it does not answer: a worker started again counts from zero, and a sum
    over processes that lost the old one's counts would go down, which
    Prometheus takes for a reset.
    """

    def __init__(self):
        self._byPid = {}

    def update(self, reports):
        """
        Take the samples in the workers' C{reports} (see
        L{lmtp_proxy.workers.Workers.status}).

        @return: the samples of every worker there has been, a list of
            L{Metrics.samples}.
        """
        for report in reports.values():
            if report and report["status"]:
                self._byPid[report["status"]["pid"]] = report["samples"]
        return list(self._byPid.values())
