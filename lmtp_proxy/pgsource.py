"""
The PostgreSQL routing source: the routing table in memory, following the
database through C{LISTEN}/C{NOTIFY}, and this node's lease.

L{LiveTable} is the L{IRoutingSource}: the same dict lookup as the YAML
table (L{lmtp_proxy.routing.RoutingTable}), changed in place by the reactor
as changes arrive, so a lookup costs the same at a million routes.

L{DatabaseRouting} is the proxy's child service that keeps it current. The
database work (connecting, loading, C{LISTEN}, reading changes, the
heartbeat) is blocking C{psycopg} in one thread of its own
(L{lmtp_proxy.pgstore}); the reactor gets its results through
C{callFromThread}, in the order they happened, and never waits on the
database. The lease is the reactor's: a node whose last successful
heartbeat was sent more than C{lease} seconds ago (its own monotonic clock)
fences itself (L{lmtp_proxy.state.ProxyState.fence}) until it has reached
the database again, written its heartbeat and caught up. See
C{docs/design.rst}, "Cluster barrier and fencing", for why that is safe.
"""

import json
import threading
import time

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from lmtp_proxy.config import isRewriteAddress
from lmtp_proxy.interfaces import IRoutingSource
from lmtp_proxy.pgstore import Store, StoreError, connect, failed, redact
from lmtp_proxy.routing import REJECT, Route, RoutingTable
from lmtp_proxy.state import LEASE_EXPIRED

# Seconds between two looks at the lease, and between two reports of what
# this node has in force to the database thread.
LEASE_CHECK = 0.1
REPORT_INTERVAL = 0.1
# How long the thread waits for a notification before it looks at what to
# report again.
NOTIFY_POLL = 0.05
# Reconnection backoff: doubled from the first to the last.
BACKOFF = (0.25, 4.0)

NOT_LOADED = "routing table not loaded from the database yet"


@implementer(IRoutingSource)
class LiveTable(RoutingTable):
    """
    A routing table that follows the database: a L{RoutingTable} whose
    users dict is this object's own, changed in place by L{apply} (from the
    reactor thread only), so a change costs what it changes, not a copy of
    a million routes.

    A route naming a backend the configuration does not define, or an
    address that could not stand in a RCPT (rows written by hand), is
    deferred with 4xx, as C{reject} is: the mail waits until the row or the
    configuration is fixed.
    """

    __slots__ = ("_known",)

    def __init__(self, users, config):
        """
        @param users: lower-case keys to backend names or C{(backend,
            address)} pairs; kept, not copied.
        @param config: the L{lmtp_proxy.config.Config} whose routing
            settings (C{ignoreDomain}, C{fallback_backend},
            C{recipient_delimiter}) and backends apply.
        """
        object.__setattr__(self, "_users", users)
        self.reconfigure(config)

    def reconfigure(self, config):
        """
        Apply a reloaded configuration's routing settings and backends.
        """
        setattr_ = object.__setattr__
        setattr_(self, "_ignoreDomain", bool(config.ignore_domain))
        setattr_(self, "_fallback", config.fallback_backend)
        setattr_(self, "_delimiter", frozenset(config.recipient_delimiter))
        setattr_(self, "_known", frozenset(config.backends))

    @property
    def users(self):
        from types import MappingProxyType

        return MappingProxyType(self._users)

    def apply(self, changes):
        """
        Put C{changes} (C{(key, value or None)} pairs, in order) in force.
        """
        users = self._users
        for key, value in changes:
            if value is None:
                users.pop(key, None)
            else:
                users[key] = value

    def route(self, address):
        """
        See L{IRoutingSource.route}.
        """
        route = RoutingTable.route(self, address)
        if route is not None and route.backend != REJECT and (
            route.backend not in self._known
            or (route.address is not None and not isRewriteAddress(route.address))
        ):
            return Route(REJECT, route.key, route.how)
        return route


def encodeChanges(changes):
    """
    The bytes that carry C{changes} (or, for C{None} with C{users}, a whole
    table) to a worker process: one JSON line each.
    """
    return (
        "\n".join(json.dumps(change) for change in changes) + "\n" if changes else ""
    ).encode("utf-8")


def decodeChanges(data):
    """
    The changes L{encodeChanges} wrote; pairs come back as tuples.
    """
    names = {REJECT: REJECT}
    out = []
    for line in data.splitlines():
        key, value = json.loads(line)
        if value is not None:
            if isinstance(value, list):
                value = (names.setdefault(value[0], value[0]), value[1])
            else:
                value = names.setdefault(value, value)
        out.append((key, value))
    return out


def _significant(snapshot):
    if snapshot is None:
        return None
    inForce, oldest, fenced = snapshot
    return inForce, oldest is None or oldest >= inForce, fenced


class DatabaseRouting(service.Service):
    """
    Keeps the L{ProxyState}'s table and generation those of the database,
    heartbeats this node into the nodes table, and fences it when its lease
    runs out.

    @ivar connected: whether the database is reachable (as last seen).
    @ivar inForce: the generation every process of this node has in force.
    """

    name = "routing"
    log = Logger()

    def __init__(self, reactor, state, workers=None, clock=time.monotonic, storeFactory=Store):
        """
        @param state: the L{lmtp_proxy.state.ProxyState}.
        @param workers: the L{lmtp_proxy.workers.Workers}, or C{None}.
        @param clock: the monotonic clock of the lease.
        """
        self._reactor = reactor
        self._state = state
        # Where the database is and who this node is take effect on a
        # restart (config.RESTART_KEYS); the lease and timeouts on a reload.
        self._database = state.config
        self._workers = workers
        self._clock = clock
        self._storeFactory = storeFactory
        self.connected = None
        self.inForce = None
        self._renewed = None
        # The lease recorded with the last acknowledged heartbeat: the one
        # the barrier counts this node out by, whatever a reload made of
        # config.lease since.
        self._lease = None
        self._loadedOnce = False
        # Fires when the node first delivers: the table loaded and the
        # lease renewed (systemd's READY=1 waits for it).
        self.serving = defer.Deferred()
        self._stopping = threading.Event()
        self._thread = None
        self._checks = []
        # What the thread reports: (generation in force, oldest in flight,
        # fenced). Replaced whole, so the thread reads it without a lock.
        self._snapshot = None
        self._reporting = False

    @property
    def config(self):
        return self._state.config

    def startService(self):
        """
        Start fenced, with the database thread loading the table.

        @see: L{twisted.application.service.IService.startService}
        """
        service.Service.startService(self)
        self._state.fence(NOT_LOADED)
        if self._workers is not None:
            self._workers.routing.spawned = self._workerSpawned
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._threadMain, name="lmtp-proxy routing database", daemon=True
        )
        self._thread.start()
        lease = task.LoopingCall(self._checkLease)
        lease.clock = self._reactor
        lease.start(LEASE_CHECK, now=False)
        report = task.LoopingCall(self._report)
        report.clock = self._reactor
        report.start(REPORT_INTERVAL, now=False)
        self._checks = [lease, report]

    def stopService(self):
        """
        Stop following the database.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        # The sessions still draining must not go on routing by a table
        # this node no longer follows: the barrier counts a silent node out
        # after its lease, whatever the drain's grace period.
        self._state.fence("the proxy is stopping")
        self._stopping.set()
        for check in self._checks:
            if check.running:
                check.stop()
        self._checks = []

    # -- the reactor's side --

    def _checkLease(self):
        if self._state.fenced is not None or self._renewed is None:
            return
        if self._clock() - self._renewed > self._lease:
            self.log.error(
                "routing database not reached for {lease:g} s (lease): "
                "refusing every recipient with 451 until it is",
                lease=self._lease,
            )
            self._fence(LEASE_EXPIRED)

    def _fence(self, why):
        self._state.fence(why)
        if self._workers is not None:
            self._workers.routing.sendLease(0)

    def _loaded(self, generation, users):
        table = LiveTable(users, self.config)
        self._state.advance(generation, table)
        self._pushToWorkers(generation, None, users)
        if not self._loadedOnce:
            self._loadedOnce = True
            self.log.info(
                "routing table loaded from {database}: generation {generation}, "
                "{count} routes",
                database=redact(self._database.routing_database),
                generation=generation,
                count=len(users),
            )

    def _changed(self, generation, changes):
        self._state.table.apply(changes)
        self._state.advance(generation)
        self._pushToWorkers(generation, changes, None)

    def _pushToWorkers(self, generation, changes, users):
        if self._workers is None or not self._workers.processes:
            self.inForce = generation
            return
        if users is not None:
            sent = self._workers.routing.sendRoutes(generation, True, encodeChanges(list(users.items())))
        else:
            sent = self._workers.routing.sendRoutes(generation, False, encodeChanges(changes))

        def done(_):
            # Every process has this generation or a later one in force;
            # waiting for the latest to be acknowledged would never move
            # while changes keep coming.
            if self.inForce is None or generation > self.inForce:
                self.inForce = generation

        sent.addCallback(done)

    def _workerSpawned(self, worker):
        # A new (or restarted) worker: the table in force, then its lease.
        if not self._loadedOnce:
            return
        payload = encodeChanges(list(self._state.table._users.items()))
        header = "dbroutes %d 1 %d" % (self._state.generation, len(payload))
        self._workers._ask(worker, header, self._workers.ANSWER_TIME, payload, tag=b"dbroutes")
        if self._renewed is not None and self._state.fenced is None:
            self._workers._ask(
                worker, "dblease %r" % (self._renewed + self._lease,),
                self._workers.ANSWER_TIME, tag=b"dblease",
            )

    def _renewedAt(self, sentAt, lease):
        self._renewed = sentAt
        self._lease = lease
        self._state.leaseClock = self._clock
        self._state.leaseDeadline = sentAt + lease
        if self._workers is not None:
            self._workers.routing.sendLease(sentAt + lease)
        # A heartbeat that took longer than the lease to be acknowledged
        # renews nothing: the lease runs from when it was sent.
        if self._state.fenced is not None and self._clock() - sentAt < lease:
            self._state.unfence()
            if not self.serving.called:
                self.serving.callback(None)
            self.log.info(
                "routing table in force (generation {generation}): delivering again",
                generation=self._state.generation,
            )

    def _lost(self, error):
        if self.connected is not False:
            self.log.error("routing database lost: {error}", error=error)
        self.connected = False

    def _reached(self):
        if self.connected is False:
            self.log.info("routing database reached again")
        self.connected = True

    @defer.inlineCallbacks
    def _report(self):
        # What every process has in force and its oldest transaction, for
        # the thread's next heartbeat.
        if self._reporting:
            return
        self._reporting = True
        try:
            # Read before the transactions: a worker may begin one under an
            # older table until it has the new one, and a generation read
            # afterwards could vouch for a table it did not route by.
            inForce = self.inForce
            oldest = self._state.oldest()
            if self._workers is not None and self._workers.processes:
                theirs = yield self._workers.routing.oldest()
                oldest = min([g for g in [oldest, theirs] if g is not None], default=None)
            if inForce is not None:
                self._snapshot = (inForce, oldest, self._state.fenced is not None)
        finally:
            self._reporting = False

    # -- the database thread --

    def _catchUp(self, store, generation):
        """
        In the database thread: hand the reactor what changed since
        C{generation} (the whole table when the changes log no longer goes
        back that far).

        @return: the generation now in the database.
        """
        latest, changes = store.changesSince(generation)
        if changes is None:
            latest, users = store.load()
            self._call(self._loaded, latest, users)
        elif changes:
            self._call(self._changed, latest, changes)
        return latest

    def _call(self, f, *args):
        self._reactor.callFromThread(f, *args)

    def _threadMain(self):
        """
        The database thread: follow, and on any failure reconnect after a
        backoff, until the service stops.
        """
        delay = BACKOFF[0]
        while not self._stopping.is_set():
            store = None
            try:
                database = self._database
                # Autocommit: LISTEN takes effect at once, and a heartbeat
                # is its own transaction.
                store = self._storeFactory(
                    database,
                    connect(database, autocommit=True, application="lmtp-proxy " + database.node_name),
                )
                self._follow(store)
            except StoreError as e:
                self._call(self._lost, str(e))
            except Exception as e:  # a bug must not end the follower
                import psycopg

                if isinstance(e, psycopg.Error):
                    self._call(self._lost, str(failed(self._database, e)))
                else:
                    self._call(self._lost, "unexpected %s: %s" % (e.__class__.__name__, e))
            finally:
                if store is not None:
                    try:
                        store.close()
                    except Exception:
                        pass
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF[1])

    def _follow(self, store):
        database = self._database
        conn = store.conn
        # LISTEN before the load: a change committed after the snapshot is
        # then notified, not missed.
        conn.execute("LISTEN %s" % (store.names.channel,))
        generation, users = store.load()
        self._call(self._loaded, generation, users)
        self._call(self._reached)
        config = self.config
        interval = max(0.2, min(config.lease / 4, 2.0))
        lastBeat = None
        lastSent = None
        while not self._stopping.is_set():
            notified = False
            for _ in conn.notifies(timeout=NOTIFY_POLL):
                notified = True
            now = self._clock()
            snapshot = self._snapshot
            # Early, for what a barrier waits for: a new generation in force,
            # the last older transaction ended, fenced or not.
            beat = (
                lastBeat is None
                or now - lastBeat >= interval
                or _significant(snapshot) != _significant(lastSent)
            )
            if notified or beat:
                generation = self._catchUp(store, generation)
            if beat:
                sentAt = self._clock()
                inForce, oldest, fenced = snapshot if snapshot is not None else (0, None, True)
                config = self.config
                store.heartbeat(
                    database.node_name, inForce, oldest, fenced, config.lease, config.data_timeout
                )
                lastBeat, lastSent = sentAt, snapshot
                # After the heartbeat, what changed meanwhile: a barrier that
                # counted this node out read the nodes table before this
                # heartbeat, so its generation is at most the one read now,
                # which is in force before the renewal below unfences.
                generation = self._catchUp(store, generation)
                self._call(self._renewedAt, sentAt, config.lease)
