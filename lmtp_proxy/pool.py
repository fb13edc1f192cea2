"""
Backend connections, reused across transactions and client sessions when
C{pool_size} allows it.
"""

from collections import defaultdict

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmtp_proxy.client import (
    BackendAuthFailed,
    BackendBusy,
    BackendError,
    BackendLost,
    BackendProtocolError,
    BackendTimeout,
    BackendTLSFailed,
    BackendUnavailable,
    connectBackend,
)
from lmtp_proxy.health import BackendHealth
from lmtp_proxy.outbox import Outbox
from lmtp_proxy.recorder import NO_METRICS

# Idle connections beyond pool_size are kept this many seconds at most.
# With more transactions at once than pool_size, a released connection is
# nearly always wanted again within milliseconds, and closing it only to
# open another costs a connect, a greeting and an LHLO. Postfix keeps its
# cached LMTP connections 2 seconds too (lmtp_connection_cache_time_limit).
# After a burst the excess is gone within this time, and up to pool_size
# connections stay for pool_idle_timeout.
EXCESS_IDLE = 2.0

# The C{reason} label of a failed connection, by its error.
# Failures that show the backend up (it answered, and refused or spoke
# wrongly): they do not count toward backend_failures, which is for
# connections that fail or time out.
_NOT_DOWN = (BackendBusy, BackendAuthFailed, BackendProtocolError)

FAILURE_REASONS = {
    BackendUnavailable: "unreachable",
    BackendTimeout: "timeout",
    BackendLost: "lost",
    BackendProtocolError: "protocol",
    BackendAuthFailed: "auth",
    BackendTLSFailed: "tls",
}


class BackendPool:
    """
    Hands out ready L{lmtp_proxy.client.LMTPClient}s per backend definition.

    A connection goes back to the pool only after a transaction ended
    cleanly on it; one that failed in any way is dropped. Connections are
    keyed by the backend's whole definition, so a reload that changes a
    backend's address or credentials never reuses an old connection.

    @ivar outbox: the L{Outbox} the connections write through, to be shared
        with the client sessions that use them.
    @ivar metrics: the L{lmtp_proxy.recorder.IRecorder} told of connects,
        failures and reuses.
    """

    log = Logger()

    def __init__(self, reactor, connect=connectBackend, metrics=NO_METRICS):
        self._reactor = reactor
        self._connect = connect
        self.metrics = metrics
        self.outbox = Outbox()
        # Per backend definition: its idle connections in the order they
        # were released (a dict, so that finding or dropping one costs the
        # same with a thousand idle as with one), and the same connections
        # by the client session their last XCLIENT named.
        self._idle = defaultdict(dict)
        self._idleFor = defaultdict(dict)
        # Per connection: its expiry timer, and when it last became idle,
        # for how long, and the configuration then in force.
        self._timers = {}
        self._idleSince = {}
        self.health = BackendHealth(reactor)
        # Per backend definition: the connections it handed out, and the
        # last failure to connect since the last success.
        self._open = defaultdict(set)
        self._failures = {}

    def takeIdle(self, backend, prefer=None):
        """
        Hand out an idle connection to C{backend} at once, if there is one.

        @param prefer: a client session (the C{session} of an
            L{lmtp_proxy.clientid.ClientIdentity}): the idle connection
            whose last XCLIENT named it is handed out before the others;
            without one, the last released.
        @return: an L{lmtp_proxy.client.LMTPClient}, or C{None}.
        """
        idle = self._idle.get(backend)
        while idle:
            client = self._idleFor[backend].get(prefer) if prefer is not None else None
            if client is None:
                client = next(reversed(idle))
            self._take(backend, client)
            # Its expiry timer is left to run: it will find the connection
            # in use and let it be (_expire), which costs less than a cancel
            # and a new timer per transaction.
            if client.usable:
                self.metrics.reused(backend.name)
                return client
        return None

    def acquire(self, backend, config, prefer=None):
        """
        Return a L{Deferred} firing with C{(client, reused)}: an idle
        connection (L{takeIdle}) or a new one; or failing with a
        L{BackendError} (logged once here).

        @param prefer: as for L{takeIdle}.
        """
        client = self.takeIdle(backend, prefer)
        if client is not None:
            return defer.succeed((client, True))
        health = self.health
        if not health.admit(backend.name):
            return defer.fail(health.refusal(backend.name))
        started = self._reactor.seconds()
        connecting = self._connect(
            self._reactor,
            backend,
            config.hostname,
            config.connect_timeout,
            config.command_timeout,
            self.outbox,
        )

        def connected(client):
            self.metrics.connected(backend.name, self._reactor.seconds() - started)
            self._failures.pop(backend, None)
            self._track(backend, client)
            health.succeeded(backend.name)
            return client, False

        def failed(failure):
            failure.trap(BackendError)
            error = failure.value
            if not isinstance(error, _NOT_DOWN):
                health.failed(backend.name, config.backend_failures, config.backend_retry)
            self._failures[backend] = (
                self._reactor.seconds(),
                "%s: %s" % (error.summary, error.detail),
            )
            self.metrics.connectFailed(
                backend.name, FAILURE_REASONS.get(type(error), "other")
            )
            self.log.warn(
                "backend {backend} ({address}): connection failed: "
                "{error.summary}: {error.detail}",
                backend=backend.name,
                address=backend.describe(),
                error=failure.value,
            )
            return failure

        def late(result):
            # The backend was marked down meanwhile and this acquire already
            # failed; a connection made all the same serves the next one.
            if not isinstance(result, Failure):
                self.release(backend, result[0], config)

        return health.watch(
            backend.name, connecting.addCallbacks(connected, failed), late
        )

    def _track(self, backend, client):
        # A connection a failed transaction dropped never comes back here;
        # it leaves the set at the next connect to its backend, a sweep that
        # costs far less than the connect itself.
        handed = self._open[backend]
        handed.difference_update([c for c in handed if not c.usable])
        handed.add(client)

    def describe(self, backend):
        """
        The connections to C{backend} (a L{lmtp_proxy.config.Backend}) and
        its last failure, for C{lmtp-proxy status} and the metrics.

        @return: a JSON-ready dict: C{pooled} and C{busy} connections,
            C{state} (C{"down"} while L{BackendHealth} marks it down, else
            C{"up"}) and C{last_failure}
            (C{{"at": seconds since the epoch, "error": text}} or C{None}
            once a connection succeeded again).
        """
        idle = self._idle.get(backend, ())
        pooled = set(idle)
        busy = sum(1 for c in self._open.get(backend, ()) if c.usable and c not in pooled)
        failure = self._failures.get(backend)
        return {
            "pooled": len(idle),
            "busy": busy,
            "state": "down" if self.health.isDown(backend.name) else "up",
            "last_failure": None
            if failure is None
            else {"at": failure[0], "error": failure[1]},
        }

    def release(self, backend, client, config):
        """
        Take back a connection whose transaction ended cleanly: keep it for
        reuse, or say QUIT.
        """
        # This runs while the client still reads the backend's last reply:
        # a stray reply line in the same read must find the connection
        # failed, not answering the next transaction's MAIL. The outbox is
        # held for that read and runs this once it is over.
        self.outbox.afterInput(self._keep, backend, client, config)

    def _keep(self, backend, client, config):
        idle = self._idle[backend]
        if not client.usable:
            return
        if not config.pool_size:
            self._quit(client)
            return
        timeout = config.pool_idle_timeout
        if len(idle) >= config.pool_size:
            timeout = min(timeout, EXCESS_IDLE)
        idle[client] = None
        session = _toldOf(client)
        if session is not None:
            self._idleFor[backend][session] = client
        now = self._reactor.seconds()
        self._idleSince[client] = (now, timeout, config)
        timer = self._timers.get(client)
        if timer is None:
            self._timers[client] = self._reactor.callLater(
                timeout, self._expire, backend, client
            )
        elif timer.getTime() > now + timeout:
            # Kept with a longer timeout before, and excess now.
            timer.reset(timeout)

    def closeIdle(self):
        """
        Say QUIT on every idle connection.
        """
        for idle in self._idle.values():
            for client in idle:
                self._quit(client)
        self._idle.clear()
        self._idleFor.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._idleSince.clear()

    def _expire(self, backend, client):
        del self._timers[client]
        idle = self._idle.get(backend, ())
        if client not in idle:
            # In use since: the next release starts a timer again.
            self._idleSince.pop(client, None)
            return
        since, timeout, config = self._idleSince[client]
        if timeout < config.pool_idle_timeout and len(idle) <= config.pool_size:
            # Excess when it was released; the others went first, and it
            # is one of the pool_size that stay.
            timeout = config.pool_idle_timeout
            self._idleSince[client] = (since, timeout, config)
        left = since + timeout - self._reactor.seconds()
        if left > 0:
            # Used and released again since this timer started, or kept
            # longer as one of the pool_size.
            self._timers[client] = self._reactor.callLater(left, self._expire, backend, client)
            return
        self._take(backend, client)
        del self._idleSince[client]
        self._quit(client)

    def _take(self, backend, client):
        """
        Take the idle connection C{client} out of the pool.
        """
        del self._idle[backend][client]
        session = _toldOf(client)
        told = self._idleFor[backend]
        if session is not None and told.get(session) is client:
            del told[session]

    @staticmethod
    def _quit(client):
        if client.usable:
            client.sendLine(b"QUIT")
            client.transport.loseConnection()


def _toldOf(client):
    """
    The client session (C{ClientIdentity.session}) that the last XCLIENT on
    the connection C{client} named, or C{None}.
    """
    told = client.xclientFor
    return told.session if told is not None else None
