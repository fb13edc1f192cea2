"""
The configuration and routing table in force, their generation, and the
transactions still running under each generation.
"""

from collections import Counter

from twisted.internet import defer

from lmtp_proxy.routing import RoutingTable


class DrainTimeout(Exception):
    """
    Transactions begun under an older table were still running when the
    wait ran out.
    """


class ProxyState:
    """
    The one place that knows which routing table is in force.

    A reload replaces C{config} and C{table} together in one step; each
    transaction records the generation it began under, so a migration can
    wait until no transaction of an older generation is left.
    """

    def __init__(self, config, table=None):
        self.config = config
        self.table = RoutingTable.fromConfig(config) if table is None else table
        self.generation = 1
        self._running = Counter()
        self._drainWaiters = []

    @property
    def transactions(self):
        """
        The number of transactions running.
        """
        return sum(self._running.values())

    def swap(self, config, table, generation=None):
        """
        Put a new configuration and its routing table in force, as the next
        generation or (in a worker process) as the master's C{generation}.

        @return: the new generation.
        """
        self.config = config
        self.table = table
        self.generation = self.generation + 1 if generation is None else generation
        return self.generation

    def begin(self):
        """
        Record that a transaction begins; return its generation.
        """
        self._running[self.generation] += 1
        return self.generation

    def end(self, generation):
        """
        Record that a transaction of C{generation} ended.
        """
        self._running[generation] -= 1
        if not self._running[generation]:
            del self._running[generation]
        self._wakeDrainWaiters()

    def olderThan(self, generation):
        """
        The number of running transactions begun before C{generation}.
        """
        return sum(n for g, n in self._running.items() if g < generation)

    def whenDrained(self, generation, clock, timeout):
        """
        Return a L{Deferred} that fires once no transaction begun before
        C{generation} is running, or fails with L{DrainTimeout} after
        C{timeout} seconds.
        """
        if not self.olderThan(generation):
            return defer.succeed(generation)
        waiter = defer.Deferred()
        entry = (generation, waiter)
        self._drainWaiters.append(entry)

        def expire():
            self._drainWaiters.remove(entry)
            waiter.errback(
                DrainTimeout(
                    "%d transaction(s) begun before generation %d still running"
                    % (self.olderThan(generation), generation)
                )
            )

        timer = clock.callLater(timeout, expire)
        waiter.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiter

    def stillRunning(self, generation, clock, timeout):
        """
        Wait, for at most C{timeout} seconds, until no transaction begun
        before C{generation} is running.

        @return: a L{Deferred} firing with the number still running then.
        """

        def timedOut(failure):
            failure.trap(DrainTimeout)
            return self.olderThan(generation)

        return self.whenDrained(generation, clock, timeout).addCallbacks(
            lambda _: 0, timedOut
        )

    def _wakeDrainWaiters(self):
        for entry in list(self._drainWaiters):
            generation, waiter = entry
            if not self.olderThan(generation):
                self._drainWaiters.remove(entry)
                waiter.callback(generation)
