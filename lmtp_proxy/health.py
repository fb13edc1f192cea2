"""
Backends marked down after repeated connection failures, so that their
recipients are deferred at once instead of each waiting C{connect_timeout}.

After C{backend_failures} consecutive failures to connect (refused, timed
out, no greeting), a backend is down for C{backend_retry} seconds: every new
connection to it fails at once with C{451 4.4.1}, and so do the connections
still being attempted when it went down. When the time is up one
connection, the probe, tries it again; the others still fail at once until
the probe succeeds (the backend is up) or fails (down for another
C{backend_retry} seconds). The log says when a backend went down and when it
came back, once each.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmtp_proxy.client import BackendUnavailable


class BackendHealth:
    """
    The up or down state of every backend, by name.
    """

    log = Logger()

    def __init__(self, clock):
        """
        @param clock: the L{IReactorTime} that times C{backend_retry}.
        """
        self._clock = clock
        self._failures = {}
        self._downUntil = {}
        self._probing = set()
        self._waiting = {}

    def isDown(self, name):
        """
        Whether backend C{name} is marked down (a probe may be running).
        """
        return name in self._downUntil

    def admit(self, name):
        """
        Whether a new connection to backend C{name} may be tried now: always
        while it is up; while it is down, only the probe once
        C{backend_retry} is over.
        """
        until = self._downUntil.get(name)
        if until is None:
            return True
        if name in self._probing or self._clock.seconds() < until:
            return False
        self._probing.add(name)
        return True

    def refusal(self, name):
        """
        The error for a connection not tried because C{name} is down.
        """
        return BackendUnavailable("marked down after repeated connection failures")

    def watch(self, name, connecting, late):
        """
        Follow a connection attempt, failing at once if the backend is
        marked down before the attempt ends.

        @param connecting: the attempt's L{Deferred}.
        @param late: called with the attempt's result when it ends after
            the backend was marked down (a connection that made it after
            all is not wasted).
        @return: a L{Deferred} with the attempt's result.
        """
        waiter = defer.Deferred()
        waiters = self._waiting.setdefault(name, set())
        waiters.add(waiter)

        def done(result):
            waiters.discard(waiter)
            if waiter.called:
                late(result)
            elif isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

        connecting.addBoth(done)
        return waiter

    def succeeded(self, name):
        """
        A connection to backend C{name} was made: it is up.
        """
        if self._failures:
            self._failures.pop(name, None)
        if self._downUntil.pop(name, None) is not None:
            self._probing.discard(name)
            self.log.info("backend {backend}: back up, connections resume", backend=name)

    def failed(self, name, limit, retry):
        """
        A connection to backend C{name} failed.

        @param limit: consecutive failures that mark it down
            (C{backend_failures}).
        @param retry: seconds it then stays down (C{backend_retry}).
        """
        if name in self._downUntil:
            if name in self._probing:
                self._probing.discard(name)
                self._downUntil[name] = self._clock.seconds() + retry
            return
        count = self._failures.get(name, 0) + 1
        if count < limit:
            self._failures[name] = count
            return
        self._failures.pop(name, None)
        self._downUntil[name] = self._clock.seconds() + retry
        self.log.warn(
            "backend {backend}: down after {count} consecutive connection "
            "failures; its recipients are deferred (451 4.4.1) for {retry} s, "
            "then one connection tries it again",
            backend=name,
            count=count,
            retry=retry,
        )
        error = self.refusal(name)
        for waiter in list(self._waiting.pop(name, ())):
            if not waiter.called:
                waiter.errback(Failure(error))
