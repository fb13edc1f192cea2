"""
The twistd service: a tree of small services, each with one job.

L{makeService} returns a L{ProxyService}, a C{MultiService} holding what its
children share (the L{ProxyState}, the L{BackendPool}, the server factory)
and these children, started in this order and stopped in the reverse one:

  - C{"sessions"} (L{Sessions}): ends the MTA sessions gracefully on stop;
  - C{"listener"} (L{Listener}): the MTA-facing socket, bound while still
    root;
  - C{"control"} (L{lmtp_proxy.control.ControlSocket}): the control socket;
  - C{"metrics"} (L{lmtp_proxy.metrics.MetricsListener}, only with
    C{metrics}): the HTTP listener serving C{/metrics};
  - C{"workers"} (L{lmtp_proxy.workers.Workers}, only with C{workers} above
    1): the extra serving processes, started once the listener is bound;
  - C{"reload"} (L{Reloader}): reloads, on SIGUSR1 or from the control
    socket;
  - C{"routing"} (L{lmtp_proxy.pgsource.DatabaseRouting}, only with
    C{routing.database}): follows the routing database, renews this node's
    lease and fences it when the lease runs out (and when it stops);
  - C{"notify"} (L{lmtp_proxy.notify.NotifyService}): tells systemd the
    proxy is ready once every other child has started, and that it stops
    before any other child stops.

twistd binds every socket (C{privilegedStartService}) before it drops
privileges and starts anything (C{startService}). A stop reaches every child
at once: nothing is accepted any more, the workers and the sessions drain.
"""

import gc
import importlib
import os
import signal
import time

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from lmtp_proxy import config as configuration
from lmtp_proxy.control import ControlSocket, controlAddress
from lmtp_proxy.listening import describeListen, removeStaleSocket, socketOwner
from lmtp_proxy.notify import Notifier, NotifyService
from lmtp_proxy.pool import BackendPool
from lmtp_proxy.recorder import NO_METRICS
from lmtp_proxy.reloader import loadAtStart, reloadConfig
from lmtp_proxy.serving import serverFactory
from lmtp_proxy.state import DrainTimeout, ProxyState
from lmtp_proxy.status import combine, processView
from lmtp_proxy.twisted_internals import (
    cacheLogTimestamps,
    dispatchEventsLightly,
    formatPlainLogLines,
)
from lmtp_proxy.workers import Workers


class Options(usage.Options):
    """
    Command line of C{twistd lmtp-proxy}.
    """

    synopsis = "[--config FILE]"
    longdesc = (
        "An LMTP proxy: accepts mail over LMTP and delivers each recipient "
        "to the LMTP backend its routing table names."
    )
    optParameters = [
        ["config", "c", configuration.DEFAULT_CONFIG, "Configuration file (YAML)."],
    ]


def makeService(options):
    """
    Load and check the configuration (so a mistake reaches the terminal
    before twistd daemonizes) and build the service tree.
    """
    from twisted.internet import reactor

    try:
        # A large file is parsed in a child process (see
        # reloader.loadAtStart); a small one here.
        loaded = loadAtStart(options["config"])
        socketOwner(loaded)
        if configuration.usesSecurityFiles(loaded):
            # Built while still root, so that a key only root may read is
            # in force after twistd drops privileges; a reload reads the
            # files again as the proxy's user.
            from lmtp_proxy.tls import prepare

            prepare(loaded)
    except configuration.ConfigError as e:
        # twistd only handles UsageError while parsing options; from here
        # anything but SystemExit becomes a traceback.
        raise SystemExit("lmtp-proxy: %s" % (e,))
    proxy = ProxyService(loaded, reactor)
    dispatchEventsLightly(reactor, proxy.pool.outbox)
    cacheLogTimestamps()
    formatPlainLogLines()
    return proxy


class ProxyService(service.MultiService):
    """
    The proxy for one configuration file: its children (see the module
    docstring) and what they share.

    @ivar state: the L{ProxyState}.
    @ivar pool: the L{BackendPool}.
    @ivar factory: the server factory of the MTA's connections.
    @ivar listener: the L{Listener} child.
    @ivar workers: the L{Workers} child, or C{None} when there are none.
    @ivar reloader: the L{Reloader} child.
    @ivar metrics: the L{lmtp_proxy.recorder.IRecorder} of this process:
        L{lmtp_proxy.metrics.Metrics} with C{metrics} configured.
    """

    log = Logger()

    def __init__(self, loaded, reactor, notifier=None):
        """
        @param notifier: the L{Notifier} telling systemd; by default the one
            C{NOTIFY_SOCKET} names.
        """
        service.MultiService.__init__(self)
        if notifier is None:
            notifier = Notifier.fromEnvironment()
        self.metrics = NO_METRICS
        if loaded.metrics is not None:
            metrics = _metricsModule()
            self.metrics = metrics.Metrics()
        self.state = ProxyState(loaded)
        self.pool = BackendPool(reactor, metrics=self.metrics)
        self.factory = serverFactory(reactor, self.state, self.pool, self.metrics)
        self.listener = Listener(reactor, loaded, self.factory)
        self.workers = None
        if loaded.workers > 1:
            self.workers = Workers(reactor, self.state, self.listener)
        self.reloader = Reloader(reactor, self.state, self.workers, self.metrics, notifier)

        # Children start in the order they are added, and stop in reverse:
        # the workers need the listener's socket.
        Sessions(self.factory, self.pool, self.state).setServiceParent(self)
        self.listener.setServiceParent(self)
        ControlSocket(
            reactor, controlAddress(loaded), self.reloader, self.status
        ).setServiceParent(self)
        if loaded.metrics is not None:
            self._retained = metrics.Retained()
            metrics.MetricsListener(
                reactor, loaded.metrics, metrics.ProxyCollector(reactor, self._gatherMetrics)
            ).setServiceParent(self)
        if self.workers is not None:
            self.workers.setServiceParent(self)
        self.reloader.setServiceParent(self)
        self.routing = None
        if loaded.routing_database is not None:
            # With the database source, the routing table is the
            # database's. Imported only then: psycopg is the optional
            # 'postgresql' extra.
            from lmtp_proxy.pgsource import DatabaseRouting

            self.routing = DatabaseRouting(reactor, self.state, self.workers)
            self.routing.setServiceParent(self)
        NotifyService(
            notifier,
            lambda: "serving, generation %d" % (self.state.generation,),
            None if self.routing is None else self.routing.serving,
        ).setServiceParent(self)

    def status(self):
        """
        The status of the whole proxy, for C{lmtp-proxy status}.

        @return: a L{Deferred} firing with the dict of
            L{lmtp_proxy.status.combine}.
        """
        return self._workerReports().addCallback(self._combine)

    def _workerReports(self):
        if self.workers is None:
            return defer.succeed({})
        return self.workers.status()

    def _combine(self, reports):
        return combine(
            processView(self.state, self.factory, self.pool),
            {number: report and report["status"] for number, report in reports.items()},
        )

    def _gatherMetrics(self):
        def gathered(reports):
            samples = [self.metrics.samples()] + self._retained.update(reports)
            return samples, self._combine(reports)

        return self._workerReports().addCallback(gathered)

    def startService(self):
        """
        Start the children, then keep what is loaded by now out of the
        collector's full passes.

        @see: L{twisted.application.service.IService.startService}
        """
        service.MultiService.startService(self)
        config = self.state.config
        warning = configuration.readableSecrets(config)
        if warning is not None:
            self.log.warn("{warning}", warning=warning)
        self.log.info(
            "lmtp-proxy listening on {socket}, {users} users, backends: {backends}",
            socket=describeListen(config),
            users=len(config.users),
            backends=", ".join(
                "%s (%s)" % (b.name, b.describe()) for b in config.backends.values()
            )
            or "none",
        )
        # What is loaded by now (Twisted, the configuration, the table) lives
        # as long as the process. Left to the collector, every full pass
        # walks it again: about 30 ms in which no session is served.
        gc.freeze()


def _metricsModule():
    """
    L{lmtp_proxy.metrics}, imported only when C{metrics} is configured:
    C{prometheus_client} is an optional extra. Without it, start-up ends
    with one line saying what to install.
    """
    try:
        return importlib.import_module("lmtp_proxy.metrics")
    except ImportError as e:
        raise SystemExit(
            "lmtp-proxy: config.metrics needs prometheus_client "
            "(pip install 'lmtp-proxy[metrics]'): %s" % (e,)
        )


# Connections the kernel may hold for the listener before it accepts them
# (it caps the figure at net.core.somaxconn). Twisted's default of 50 drops
# the SYNs of a burst of MTA connections, which then wait seconds to retry.
LISTEN_BACKLOG = 4096


class Listener(service.Service):
    """
    Accepts the MTA's connections on the configured socket.

    @ivar port: the listening port, once bound.
    """

    name = "listener"
    port = None

    def __init__(self, reactor, listen, factory):
        """
        @param listen: the L{lmtp_proxy.config.Config} whose C{socket},
            C{owner}, C{group} and C{permissions} say where and how to
            listen (a reload does not change them).
        """
        self._reactor = reactor
        self._listen = listen
        self._factory = factory

    def privilegedStartService(self):
        """
        Bind the socket while still root, and give a unix socket its owner.
        A failure ends start-up with one line.

        @see: L{twisted.application.service.IService.privilegedStartService}
        """
        listen = self._listen
        try:
            if isinstance(listen.socket, str):
                removeStaleSocket(listen.socket)
                self.port = self._reactor.listenUNIX(
                    listen.socket,
                    self._factory,
                    backlog=LISTEN_BACKLOG,
                    mode=0o666 if listen.permissions is None else listen.permissions,
                )
                uid, gid = socketOwner(listen)
                if (uid, gid) != (-1, -1):
                    os.chown(listen.socket, uid, gid)
            else:
                host, number = listen.socket
                self.port = self._reactor.listenTCP(
                    number, self._factory, backlog=LISTEN_BACKLOG, interface=host
                )
        except CannotListenError as e:
            # Before the reactor runs, twistd would print a traceback.
            raise SystemExit(
                "lmtp-proxy: cannot listen on %s: %s" % (describeListen(listen), e.socketError)
            )
        except OSError as e:
            # Removing a stale socket or giving it its owner failed.
            raise SystemExit(
                "lmtp-proxy: cannot listen on %s: %s" % (describeListen(listen), e)
            )
        service.Service.privilegedStartService(self)

    def stopService(self):
        """
        Stop accepting connections at once.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class Sessions(service.Service):
    """
    Ends the MTA sessions gracefully when the proxy stops.
    """

    name = "sessions"

    def __init__(self, factory, pool, state):
        self._factory = factory
        self._pool = pool
        self._state = state

    def stopService(self):
        """
        Let the transactions in flight finish for C{shutdown_grace} seconds
        and close every session with 421, then the idle backend connections.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        draining = self._factory.drain(self._state.config.shutdown_grace)
        return draining.addBoth(lambda _: self._pool.closeIdle())


class Reloader(service.Service):
    """
    Puts a re-read configuration in force, in this process and in every
    worker, one reload at a time: on SIGUSR1 while running, and when the
    control socket asks.

    @ivar state: the L{ProxyState} the reloads swap.
    """

    name = "reload"
    log = Logger()

    def __init__(self, reactor, state, workers=None, metrics=NO_METRICS, notifier=None):
        """
        @param workers: the L{Workers} to pass each configuration on to, or
            C{None}.
        @param metrics: the L{lmtp_proxy.recorder.IRecorder} told of each
            reload.
        @param notifier: the L{Notifier} telling systemd of each reload, or
            C{None}.
        """
        self._reactor = reactor
        self.state = state
        self._workers = workers
        self._metrics = metrics
        self._notifier = Notifier(None) if notifier is None else notifier
        self._lock = defer.DeferredLock()
        self._previousSIGUSR1 = None

    def startService(self):
        """
        Own SIGUSR1, chaining to the handler installed before it (twistd's
        log rotation, when it logs to a file).

        @see: L{twisted.application.service.IService.startService}
        """
        service.Service.startService(self)
        self._previousSIGUSR1 = signal.signal(signal.SIGUSR1, self._sigusr1)

    def stopService(self):
        """
        Give SIGUSR1 back to the handler it had before.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        if self._previousSIGUSR1 is not None:
            signal.signal(signal.SIGUSR1, self._previousSIGUSR1)
            self._previousSIGUSR1 = None

    def reload(self):
        """
        Re-read the configuration file; put it in force only if it is valid
        as a whole. Reloads run one after another.

        @return: a L{Deferred} firing with C{(generation, summary)} or failing
            with L{lmtp_proxy.config.ConfigError}.
        """
        return self._lock.run(self._reload)

    def whenDrained(self, generation, timeout):
        """
        Wait until no transaction begun before C{generation} is running in
        any process, for at most C{timeout} seconds.

        @return: a L{Deferred} firing with C{generation}, or failing with
            L{DrainTimeout}.
        """
        counts = [self.state.stillRunning(generation, self._reactor, timeout)]
        if self._workers is not None:
            counts.append(self._workers.stillRunning(generation, timeout))

        def total(counts):
            running = sum(counts)
            if running:
                raise DrainTimeout(
                    "%d transaction(s) begun before generation %d still running"
                    % (running, generation)
                )
            return generation

        return defer.gatherResults(counts, consumeErrors=True).addCallback(total)

    def _sigusr1(self, signum, frame):
        # A signal handler may run between any two bytecodes of the
        # reactor's own work; the reload must wait for the reactor.
        self._reactor.callFromThread(self._reloadOnSignal)
        if callable(self._previousSIGUSR1):
            self._previousSIGUSR1(signum, frame)

    def _reloadOnSignal(self):
        def failed(failure):
            # A refused file is already logged, in one line, by reload.
            if not failure.check(configuration.ConfigError):
                self.log.failure("reload failed", failure)

        self.reload().addErrback(failed)

    def _reload(self):
        started = time.monotonic()
        self._notifier.reloading()
        old = self.state.config
        loading = reloadConfig(self._reactor, old)

        def loaded(result):
            new, table, summary, data = result
            moved = [
                key
                for key in ("routing_database", "routing_table", "routing_password_file")
                if getattr(old, key) != getattr(new, key)
            ]
            if moved:
                # The table in force would be replaced by one from another
                # source (an empty one, for the database): refused whole.
                raise configuration.ConfigError(
                    new.source, None, "routing",
                    "changing the routing source (%s) needs a restart" % (", ".join(moved),),
                )
            if old.routing_database is not None:
                # The database source owns the table and its
                # generation; a reload changes the rest.
                generation = self.state.swapConfig(new)
            else:
                generation = self.state.swap(new, table)
            if self._workers is not None:
                configured = self._workers.configure(data, generation)
            else:
                configured = defer.succeed(None)
            self.log.info(
                "reload: generation {generation} from {source} in {seconds:.3f} s: "
                "{summary}",
                generation=generation,
                source=new.source,
                seconds=time.monotonic() - started,
                summary=summary,
            )
            return configured.addCallback(lambda _: (generation, summary))

        def refused(failure):
            failure.trap(configuration.ConfigError)
            self.log.error(
                "reload refused, keeping the configuration in force: {error}",
                error=failure.value,
            )
            return failure

        def done(result):
            if not isinstance(result, Failure):
                outcome = "ok"
            elif result.check(configuration.ConfigError):
                outcome = "refused"
            else:
                outcome = "failed"
            self._metrics.reloaded(outcome, time.monotonic() - started)
            # Ready again in every case: a refused file leaves the old
            # configuration in force.
            self._notifier.ready("serving, generation %d" % (self.state.generation,))
            return result

        return loading.addCallbacks(loaded, refused).addBoth(done)
