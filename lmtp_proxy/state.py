"""
The configuration and routing table in force, their generation, and the
transactions still running under each generation.
"""

from collections import Counter

from twisted.internet import defer

from lmtp_proxy.routing import RoutingTable


LEASE_EXPIRED = "lease on the routing database expired"


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
        # Fencing. While fenced (the PostgreSQL source's lease ran
        # out, or its table is not loaded yet) every RCPT gets 451 and no
        # transaction reaches its final dot. The live transactions are the
        # ones a fence must stop.
        self.fenced = None
        self._live = set()
        # With the database source: when (on leaseClock, monotonic) this
        # node's lease runs out, or None.
        self.leaseDeadline = None
        self.leaseClock = None

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

    def begin(self, transaction=None):
        """
        Record that a transaction begins; return its generation.

        @param transaction: the transaction, with a C{fence(why)} method, to
            stop if this process is fenced before it ends.
        """
        self._running[self.generation] += 1
        if transaction is not None:
            self._live.add(transaction)
        return self.generation

    def end(self, generation, transaction=None):
        """
        Record that a transaction of C{generation} ended.
        """
        self._running[generation] -= 1
        if not self._running[generation]:
            del self._running[generation]
        self._live.discard(transaction)
        self._wakeDrainWaiters()

    # The PostgreSQL source's generations and fencing

    def oldest(self):
        """
        The oldest generation among the transactions running, or C{None}.
        """
        return min(self._running) if self._running else None

    def swapConfig(self, config):
        """
        Put a new configuration in force but keep the routing table and its
        generation (the routing table is the database's, not the file's).
        A table that follows the configuration's routing settings
        (C{reconfigure}) is told.

        @return: the generation (unchanged).
        """
        self.config = config
        reconfigure = getattr(self.table, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(config)
        return self.generation

    def advance(self, generation, table=None):
        """
        The database's generation C{generation} is in force (with C{table},
        when it is a new table object rather than the same one changed in
        place).
        """
        if table is not None:
            self.table = table
        self.generation = generation

    def fence(self, why):
        """
        Stop delivering: every RCPT from now on is refused with 451, and
        every transaction that has not reached its final dot is dropped at
        its backends (its recipients get 451 after the dot).
        """
        self.fenced = why
        for transaction in list(self._live):
            transaction.fence(why)

    def checkLease(self):
        """
        Fence now if the lease ran out. Called where a route is used (at
        RCPT and at the final dot): the periodic check runs late when the
        reactor is busy, and Twisted handles ready input before overdue
        timers.
        """
        deadline = self.leaseDeadline
        if deadline is not None and self.fenced is None and self.leaseClock() > deadline:
            self.fence(LEASE_EXPIRED)

    def unfence(self):
        """
        Deliver again.
        """
        self.fenced = None

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
