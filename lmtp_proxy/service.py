"""
The twistd service: listening, reload on SIGUSR1, graceful stop.
"""

import gc
import grp
import os
import pwd
import signal
import socket
import stat
import time

from twisted.application import service
from twisted.internet import defer, unix
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from lmtp_proxy import config as configuration
from lmtp_proxy.cli import describeListen
from lmtp_proxy.control import ControlFactory, controlAddress
from lmtp_proxy.delivery import Delivery
from lmtp_proxy.pool import BackendPool
from lmtp_proxy.reloader import reloadConfig, serialize
from lmtp_proxy.server import LMTPServerFactory
from lmtp_proxy.state import DrainTimeout, ProxyState
from lmtp_proxy.workers import Workers, listenFamily


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
    before twistd daemonizes) and build the service.
    """
    from twisted.internet import reactor

    try:
        loaded = configuration.load(options["config"])
        _socketOwner(loaded)
    except configuration.ConfigError as e:
        # twistd only handles UsageError while parsing options; from here
        # anything but SystemExit becomes a traceback.
        raise SystemExit("lmtp-proxy: %s" % (e,))
    return ProxyService(loaded, reactor)


class ProxyService(service.Service):
    """
    Runs the proxy for one configuration file.
    """

    log = Logger()

    def __init__(self, loaded, reactor):
        self.reactor = reactor
        self.state = ProxyState(loaded)
        self.pool = BackendPool(reactor)
        self.factory = LMTPServerFactory(Delivery(reactor, self.state, self.pool))
        self.controlAddress = controlAddress(loaded)
        self._listeners = []
        self._previousSIGUSR1 = None
        self._reloadLock = defer.DeferredLock()
        self.workers = None

    # IService

    def privilegedStartService(self):
        """
        Bind the sockets while still root, and set the unix socket's owner.
        """
        listen = self.state.config
        try:
            if isinstance(listen.socket, str):
                # The connect probe, not a lock file, decides whether a
                # socket is stale: a lock left by a dead proxy, or naming a
                # reused PID, would delete a live socket or refuse a dead one.
                _removeStaleSocket(listen.socket)
                port = self.reactor.listenUNIX(
                    listen.socket,
                    self.factory,
                    mode=0o666 if listen.permissions is None else listen.permissions,
                )
                self._listeners.append(port)
                uid, gid = _socketOwner(listen)
                if (uid, gid) != (-1, -1):
                    os.chown(listen.socket, uid, gid)
            else:
                host, number = listen.socket
                self._listeners.append(
                    self.reactor.listenTCP(number, self.factory, interface=host)
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
        control = self.controlAddress
        if not control.startswith("\0"):
            _removeStaleSocket(control)
        try:
            port = _ControlPort(control, ControlFactory(self), mode=0o600, reactor=self.reactor)
            port.startListening()
            self._listeners.append(port)
        except Exception as e:
            self.log.warn(
                "control socket unavailable ({error}); "
                "reload --wait will not work, SIGUSR1 still reloads",
                error=e,
            )
        service.Service.privilegedStartService(self)

    def startService(self):
        """
        Start the worker processes, if configured. Own SIGUSR1, chaining to
        twistd's log rotation when it installed one.
        """
        service.Service.startService(self)
        config = self.state.config
        if config.workers > 1:
            self.workers = Workers(
                self.reactor, config.workers, self._listeners[0], listenFamily(config.socket)
            )
            self.workers.start(serialize(config), self.state.generation).addCallback(
                lambda _: self.log.info("{count} worker process(es) serving", count=config.workers - 1)
            )
        self._previousSIGUSR1 = signal.signal(signal.SIGUSR1, self._sigusr1)
        self.log.info(
            "lmtp-proxy listening on {socket}, {users} users, backends: {backends}",
            socket=describeListen(self.state.config),
            users=len(self.state.config.users),
            backends=", ".join(
                "%s (%s)" % (b.name, b.describe())
                for b in self.state.config.backends.values()
            )
            or "none",
        )
        # What is loaded by now (Twisted, the configuration, the table) lives
        # as long as the process. Left to the collector, every full pass
        # walks it again: about 30 ms in which no session is served.
        gc.freeze()

    def stopService(self):
        """
        Stop accepting at once, let transactions finish for the grace period,
        then close the sessions that are left with 421.
        """
        service.Service.stopService(self)
        if self._previousSIGUSR1 is not None:
            signal.signal(signal.SIGUSR1, self._previousSIGUSR1)
            self._previousSIGUSR1 = None
        listeners, self._listeners = self._listeners, []
        stopped = [defer.maybeDeferred(port.stopListening) for port in listeners]
        grace = self.state.config.shutdown_grace
        gone = self.factory.drain(grace)
        gone.addBoth(lambda _: self.pool.closeIdle())
        if self.workers is not None:
            stopped.append(self.workers.stop(grace))
        return defer.DeferredList(stopped + [gone])

    def whenDrained(self, generation, timeout):
        """
        Wait until no transaction begun before C{generation} is running in
        any process, for at most C{timeout} seconds.

        @return: a L{Deferred} firing with C{generation}, or failing with
            L{DrainTimeout}.
        """
        counts = [self.state.stillRunning(generation, self.reactor, timeout)]
        if self.workers is not None:
            counts.append(self.workers.running(generation, timeout))

        def total(counts):
            running = sum(counts)
            if running:
                raise DrainTimeout(
                    "%d transaction(s) begun before generation %d still running"
                    % (running, generation)
                )
            return generation

        return defer.gatherResults(counts, consumeErrors=True).addCallback(total)

    # reload

    def _sigusr1(self, signum, frame):
        self.reactor.callFromThread(self._reloadOnSignal)
        if callable(self._previousSIGUSR1):
            self._previousSIGUSR1(signum, frame)

    def _reloadOnSignal(self):
        def failed(failure):
            # A refused file is already logged, in one line, by reload.
            if not failure.check(configuration.ConfigError):
                self.log.failure("reload failed", failure)

        self.reload().addErrback(failed)

    def reload(self):
        """
        Re-read the configuration file; put it in force only if it is valid
        as a whole. Reloads run one after another.

        @return: a L{Deferred} firing with C{(generation, summary)} or failing
            with L{lmtp_proxy.config.ConfigError}.
        """
        return self._reloadLock.run(self._reload)

    def _reload(self):
        started = time.monotonic()
        old = self.state.config
        loading = reloadConfig(self.reactor, old)

        def loaded(result):
            new, table, summary, data = result
            generation = self.state.swap(new, table)
            if self.workers is not None:
                configured = self.workers.configure(data, generation)
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

        return loading.addCallbacks(loaded, refused)


class _ControlPort(unix.Port):
    """
    The control socket's listener. Twisted logs the raw socket name when a
    unix port closes, and an abstract name begins with a NUL byte, which
    would turn the log file into a binary file for grep.
    """

    def _logConnectionLostMsg(self):
        pass


def _removeStaleSocket(path):
    """
    Remove a unix socket left behind by a proxy that died, but never a live
    one or a file that is not a socket.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.remove(path)
    finally:
        probe.close()


def _socketOwner(listen):
    """
    The uid and gid (-1 for unchanged) that the unix socket gets.
    """
    try:
        uid = listen.owner if listen.owner is not None else -1
        if isinstance(uid, str):
            uid = pwd.getpwnam(uid).pw_uid
        gid = listen.group if listen.group is not None else -1
        if isinstance(gid, str):
            gid = grp.getgrnam(gid).gr_gid
    except KeyError as e:
        raise configuration.ConfigError(
            listen.source, None, "config", "no such user or group: %s" % (e,)
        )
    return uid, gid
