"""
The PostgreSQL routing source in worker processes.

The master alone talks to the database (L{lmtp_proxy.pgsource}); it passes
every table it loads and every change on to the workers, with the
generation, and renews their lease, over the worker pipe
(L{lmtp_proxy.workers}). The requests, each answered by a line beginning
with its own tag (so that they never take another request's reply)::

    dbroutes GENERATION FULL LENGTH\\n<LENGTH bytes>  -> "dbroutes GENERATION"
    dblease DEADLINE                               -> "dblease ok"
    dboldest                                       -> "dboldest N" | "dboldest none"

C{FULL} is 1 for a whole table, 0 for changes; the bytes are
L{lmtp_proxy.pgsource.encodeChanges}'. C{DEADLINE} is a
C{time.monotonic()} value (one clock for every process of a host): the
worker fences itself when it passes, on its own, even if the master is
stuck; 0 fences at once. Routes and leases are applied in the order sent,
so a worker never unfences before it has the table the renewal vouches for.
"""

import time

from twisted.internet import defer, task

from lmtp_proxy.pgsource import LEASE_CHECK, NOT_LOADED, LiveTable, decodeChanges
from lmtp_proxy.reloader import inThread
from lmtp_proxy.state import LEASE_EXPIRED

TAGS = (b"dbroutes", b"dblease", b"dboldest")


class WorkerRouting:
    """
    A worker's side: applies routes and leases to its
    L{lmtp_proxy.state.ProxyState}.
    """

    def __init__(self, worker, clock=time.monotonic):
        self._worker = worker
        self._clock = clock
        # Requests may come before the first configuration is built: they
        # wait for it (L{start}).
        self._ready = defer.Deferred()
        self._chain = self._ready
        self._deadline = 0.0
        self._check = task.LoopingCall(self._checkLease)
        self._check.clock = worker.reactor

    def start(self):
        """
        The worker's first configuration names the database: start fenced,
        watch the lease, and apply what the master sent meanwhile.
        """
        self.state.fence(NOT_LOADED)
        self._check.start(LEASE_CHECK, now=False)
        self._ready.callback(None)

    @property
    def state(self):
        return self._worker.state

    def newState(self, config):
        """
        The table a worker starts with: empty, and fenced until the master
        sends the database's.
        """
        return LiveTable({}, config)

    def routes(self, generation, full, data):
        """
        Apply a table or changes, after everything sent before.

        @return: a L{Deferred} firing once applied.
        """
        def apply(_):
            decoding = inThread(self._worker.reactor, decodeChanges, data)

            def decoded(changes):
                state = self.state
                if full:
                    state.advance(generation, LiveTable(dict(changes), state.config))
                else:
                    state.table.apply(changes)
                    state.advance(generation)

            return decoding.addCallback(decoded)

        self._chain = self._chain.addCallback(apply)
        return self._chain

    def lease(self, deadline):
        """
        Deliver until C{deadline} (monotonic), after everything sent before.
        """
        def renew(_):
            self._deadline = deadline
            state = self.state
            state.leaseClock = self._clock
            state.leaseDeadline = deadline
            if deadline <= self._clock():
                if state.fenced is None:
                    state.fence(LEASE_EXPIRED)
            elif state.fenced is not None:
                state.unfence()

        self._chain = self._chain.addCallback(renew)
        return self._chain

    def oldest(self):
        state = self.state
        return None if state is None else state.oldest()

    def _checkLease(self):
        state = self.state
        if state is not None and state.fenced is None and self._clock() > self._deadline:
            state.fence(LEASE_EXPIRED)


def handleLine(control, words):
    """
    A C{db*} request read by the worker's L{lmtp_proxy.workers.WorkerControl}.

    @return: C{True} when it was one.
    """
    routing = control.worker.dbRouting
    if not words or words[0] not in ("dbroutes", "dblease", "dboldest"):
        return False
    if words[0] == "dbroutes" and len(words) == 4:
        control._dbPending = (int(words[1]), words[2] == "1", int(words[3]), bytearray())
        control.setRawMode()
    elif words[0] == "dblease" and len(words) == 2:
        routing.lease(float(words[1])).addCallback(lambda _: control.sendLine(b"dblease ok"))
    elif words[0] == "dboldest":
        oldest = routing.oldest()
        control.sendLine(b"dboldest " + (b"none" if oldest is None else b"%d" % (oldest,)))
    return True


def rawData(control, data):
    """
    Payload bytes of a C{dbroutes} request; C{True} when they were.
    """
    pending = getattr(control, "_dbPending", None)
    if pending is None:
        return False
    generation, full, length, received = pending
    received += data
    if len(received) < length:
        return True
    control._dbPending = None
    rest = bytes(received[length:])
    control.worker.dbRouting.routes(generation, full, bytes(received[:length])).addCallback(
        lambda _: control.sendLine(b"dbroutes %d" % (generation,))
    )
    control.setLineMode(rest)
    return True


# the master's side


class MasterRouting:
    """
    What L{lmtp_proxy.workers.Workers} does for the database source: send
    each worker the routes, the lease and ask for its oldest transaction.
    """

    def __init__(self, workers, answerTime):
        self._workers = workers
        self._answerTime = answerTime
        self.spawned = None

    def sendRoutes(self, generation, full, payload):
        header = "dbroutes %d %d %d" % (generation, 1 if full else 0, len(payload))
        return defer.gatherResults(
            [
                self._workers._ask(worker, header, self._answerTime, payload, tag=b"dbroutes")
                for worker in self._workers.processes
            ],
            consumeErrors=True,
        )

    def sendLease(self, deadline):
        for worker in self._workers.processes:
            self._workers._ask(
                worker, "dblease %r" % (float(deadline),), self._answerTime, tag=b"dblease"
            )

    def oldest(self):
        def parse(line):
            if line is None:
                return None
            word = line.split()[-1]
            return None if word == "none" else int(word)

        asked = [
            self._workers._ask(worker, "dboldest", self._answerTime, tag=b"dboldest").addCallback(parse)
            for worker in self._workers.processes
        ]
        return defer.gatherResults(asked, consumeErrors=True).addCallback(
            lambda values: min([v for v in values if v is not None], default=None)
        )
