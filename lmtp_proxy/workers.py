"""
Extra worker processes that serve from the master's listening socket.

One Python process uses one core. With C{workers: N}, the twistd process
(the master) starts N-1 workers (C{python -m lmtp_proxy.workers FAMILY}),
each of which adopts the listening socket as its file descriptor 3, so the
kernel hands each new connection to whichever process accepts it first.

The master keeps the configuration: it sends each worker the checked
configuration (L{lmtp_proxy.reloader.serialize}) with its generation at
start and on every reload, so all processes route by the same table under
the same generation number. Over the worker's standard input and output,
one request line, one reply line::

    config GENERATION LENGTH\\n<LENGTH bytes>  -> "ok GENERATION"
    wait GENERATION SECONDS                   -> "drained" | "running COUNT"
    stop SECONDS                              -> the worker drains and exits
    status                                    -> "status JSON"

A C{status} reply is answered at once, and may overtake the replies to the
requests before it (a C{wait} can take minutes): the master tells it by its
first word (a tagged request, see L{WorkerProcess.request}). Its JSON holds
the worker's L{lmtp_proxy.status.processView} and its metrics' samples
(L{lmtp_proxy.metrics.Metrics.samples}).

A worker's log events arrive on its standard error and are logged by the
master, each line prefixed with the worker's number.
"""

import gc
import json
import signal
import socket
import sys
from collections import deque

from twisted.application import service
from twisted.internet import defer, protocol, stdio
from twisted.logger import Logger, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineReceiver

from lmtp_proxy.pgworkers import MasterRouting, WorkerRouting
from lmtp_proxy.pgworkers import handleLine as handleDatabaseLine
from lmtp_proxy.pgworkers import rawData as databaseRawData
from lmtp_proxy.pool import BackendPool
from lmtp_proxy.recorder import NO_METRICS
from lmtp_proxy.reloader import childEnvironment, deserialize, inThread, serialize
from lmtp_proxy.serving import serverFactory
from lmtp_proxy.state import ProxyState
from lmtp_proxy.status import processView
from lmtp_proxy.twisted_internals import adoptSharedUNIXPort, dispatchEventsLightly

FAMILIES = {"unix": socket.AF_UNIX, "inet": socket.AF_INET, "inet6": socket.AF_INET6}


def listenFamily(address):
    """
    The name in L{FAMILIES} of the listening socket C{config.socket}.
    """
    if isinstance(address, str):
        return "unix"
    return "inet6" if ":" in address[0] else "inet"


# the master's side


class WorkerProcess(protocol.ProcessProtocol):
    """
    One worker, as the master sees it: requests with their reply
    L{Deferred}s, and the worker's log lines.
    """

    log = Logger()

    def __init__(self, number, ended):
        self.number = number
        self._ended = ended
        self._replies = deque()
        self._tagged = {}
        self._out = b""
        self._err = b""
        self.configured = None
        self.exited = defer.Deferred()

    def request(self, line, payload=b"", tag=None):
        """
        Send one request; fire with the worker's reply line.

        @param tag: for a request whose reply begins with its own word
            (the database source's, L{lmtp_proxy.pgworkers}), that word: its
            reply is then told from the others by it, not by its order.
        """
        waiter = defer.Deferred()
        if tag is None:
            self._replies.append(waiter)
        else:
            self._tagged.setdefault(tag, deque()).append(waiter)
        self.transport.write(line.encode("ascii") + b"\n" + payload)
        return waiter

    def status(self):
        """
        Ask for the worker's status; fire with its decoded JSON.
        """
        return self.request("status", tag=b"status").addCallback(
            lambda line: json.loads(line[len("status ") :])
        )

    def outReceived(self, data):
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            tagged = self._tagged.get(line.split(b" ", 1)[0])
            if tagged:
                waiter = tagged.popleft()
                if not waiter.called:
                    waiter.callback(line.decode("ascii", "replace"))
            elif self._replies:
                self._replies.popleft().callback(line.decode("ascii", "replace"))

    def errReceived(self, data):
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            self.log.info(
                "worker {number}: {line}",
                number=self.number,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason):
        # Exited first: whoever waits on a reply then knows there is
        # nothing left to kill.
        self.exited.callback(None)
        replies, self._replies = self._replies, deque()
        for tagged in self._tagged.values():
            replies.extend(tagged)
        self._tagged = {}
        for waiter in replies:
            if not waiter.called:
                waiter.errback(reason)
        self._ended(self, reason)


class Workers(service.Service):
    """
    The extra worker processes of the proxy: started once its listening
    socket is bound, given every configuration put in force, and stopped
    with it.
    """

    name = "workers"
    log = Logger()
    RESPAWN_DELAY = 1.0
    # Seconds a worker gets to answer a status request: a scrape must not
    # wait long on one that is busy.
    STATUS_TIME = 5.0
    # Seconds a worker gets to answer a request (taking in a configuration
    # of 100,000 users takes it about 2 s), beyond any wait it was asked for.
    ANSWER_TIME = 60.0

    def __init__(self, reactor, state, listener):
        """
        @param state: the master's L{ProxyState}; C{workers} of its
            configuration is the number of processes, the master included.
        @param listener: the service whose C{port} is the listening port
            once privileged start-up is over.
        """
        self._reactor = reactor
        self._state = state
        self._listener = listener
        self._count = state.config.workers
        self._family = listenFamily(state.config.socket)
        self._fd = None
        self._processes = {}
        self._stopping = False
        self._data = None
        self._generation = None
        # The database source's requests, sent by
        # lmtp_proxy.pgsource.DatabaseRouting.
        self.routing = MasterRouting(self, self.ANSWER_TIME)

    def startService(self):
        """
        Start every worker with the configuration in force, on the socket
        that the listener bound during privileged start-up.

        @see: L{twisted.application.service.IService.startService}
        """
        service.Service.startService(self)
        self._fd = self._listener.port.fileno()
        self._data, self._generation = serialize(self._state.config), self._state.generation
        defer.gatherResults(
            [self._spawn(number) for number in range(1, self._count)],
            consumeErrors=True,
        ).addCallback(
            lambda _: self.log.info("{count} worker process(es) serving", count=self._count - 1)
        )

    @property
    def processes(self):
        """
        The running L{WorkerProcess}es.
        """
        return list(self._processes.values())

    def configure(self, data, generation):
        """
        Put a new configuration in force in every worker.

        @return: a L{Deferred} that fires once every worker uses it.
        """
        self._data, self._generation = data, generation
        return defer.gatherResults(
            [self._sendConfig(worker) for worker in self._processes.values()],
            consumeErrors=True,
        )

    def status(self, timeout=STATUS_TIME):
        """
        Ask every worker for its status (see the module docstring).

        @return: a L{Deferred} firing with a dict of worker numbers to their
            decoded replies, C{None} for one that did not answer within
            C{timeout} seconds.
        """
        numbers = sorted(self._processes)
        asked = [
            self._processes[number]
            .status()
            .addTimeout(timeout, self._reactor)
            .addErrback(lambda failure: None)
            for number in numbers
        ]
        return defer.gatherResults(asked).addCallback(lambda replies: dict(zip(numbers, replies)))

    def stillRunning(self, generation, timeout):
        """
        Wait until the workers' transactions begun before C{generation} have
        ended, for at most C{timeout} seconds.

        @return: a L{Deferred} firing with the number still running.
        """
        asked = [
            self._ask(worker, "wait %d %s" % (generation, timeout), timeout + self.ANSWER_TIME)
            .addCallback(lambda line: 0 if line is None else _count(line))
            for worker in self._processes.values()
        ]
        return defer.gatherResults(asked, consumeErrors=True).addCallback(sum)

    def stopService(self):
        """
        Ask every worker to drain for C{shutdown_grace} and exit.

        @see: L{twisted.application.service.IService.stopService}
        @return: a L{Deferred} that fires once every worker has exited.
        """
        service.Service.stopService(self)
        self._stopping = True
        grace = self._state.config.shutdown_grace
        # A worker answers by exiting; one that has not after its grace and
        # ANSWER_TIME is killed, so a stop never waits forever.
        return defer.DeferredList(
            [
                self._ask(worker, "stop %s" % (grace,), grace + self.ANSWER_TIME)
                for worker in list(self._processes.values())
            ]
        )

    def _spawn(self, number):
        worker = WorkerProcess(number, self._ended)
        self._processes[number] = worker
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "lmtp_proxy.workers", self._family],
            env=childEnvironment(),
            childFDs={0: "w", 1: "r", 2: "r", 3: self._fd},
        )
        worker.configured = self._sendConfig(worker)
        if self.routing.spawned is not None:
            # The database source's table and lease.
            self.routing.spawned(worker)
        return worker.configured

    def _sendConfig(self, worker):
        return self._ask(
            worker,
            "config %d %d" % (self._generation, len(self._data)),
            self.ANSWER_TIME,
            self._data,
        )

    def _ask(self, worker, line, timeout, payload=b"", tag=None):
        """
        Send a request that C{worker} must answer within C{timeout} seconds.
        One that does not is hung: it is killed (and started again with the
        configuration in force), so a reload or a barrier never waits on it
        forever.

        @return: a L{Deferred} firing with the reply line, or with C{None}
            once a hung worker has exited.
        """
        asking = worker.request(line, payload, tag).addTimeout(timeout, self._reactor)

        def hung(failure):
            if worker.exited.called:
                # It died meanwhile; _ended starts it again.
                return None
            self.log.error(
                "worker {number} did not answer {request!r} ({error}); killing it",
                number=worker.number,
                request=line,
                error=failure.getErrorMessage(),
            )
            worker.transport.signalProcess("KILL")
            return worker.exited.addCallback(lambda _: None)

        return asking.addErrback(hung)

    def _ended(self, worker, reason):
        if self._processes.get(worker.number) is not worker:
            return
        # Gone at once, so a reload or barrier meanwhile does not wait on it;
        # the new one starts with the configuration then in force.
        del self._processes[worker.number]
        if self._stopping:
            return
        self.log.error(
            "worker {number} ended unexpectedly ({reason}); starting it again",
            number=worker.number,
            reason=reason.getErrorMessage(),
        )
        self._reactor.callLater(self.RESPAWN_DELAY, self._respawn, worker.number)

    def _respawn(self, number):
        if not self._stopping:
            self._spawn(number)


def _count(line):
    words = line.split()
    if words == ["drained"]:
        return 0
    if len(words) == 2 and words[0] == "running" and words[1].isdigit():
        return int(words[1])
    raise ValueError("unexpected worker reply %r" % (line,))


# the worker's side


class WorkerControl(LineReceiver):
    """
    The master's requests, read from standard input.
    """

    delimiter = b"\n"

    def __init__(self, worker):
        self.worker = worker
        self._pending = None

    def lineReceived(self, line):
        words = line.decode("ascii", "replace").split()
        if handleDatabaseLine(self, words):
            pass
        elif words and words[0] == "config" and len(words) == 3:
            self._pending = (int(words[1]), int(words[2]), bytearray())
            self.setRawMode()
        elif words and words[0] == "wait" and len(words) == 3:
            self.worker.running(int(words[1]), float(words[2])).addCallback(
                lambda count: self.sendLine(
                    b"drained" if not count else b"running %d" % (count,)
                )
            )
        elif words == ["status"]:
            self.sendLine(b"status " + json.dumps(self.worker.report()).encode("utf-8"))
        elif words and words[0] == "stop" and len(words) == 2:
            self.worker.stop(float(words[1])).addBoth(lambda _: self.worker.reactor.stop())

    def rawDataReceived(self, data):
        if databaseRawData(self, data):
            return
        generation, length, received = self._pending
        received += data
        if len(received) < length:
            return
        self._pending = None
        rest = bytes(received[length:])
        self.worker.configure(bytes(received[:length]), generation).addCallback(
            lambda _: self.sendLine(b"ok %d" % (generation,))
        )
        self.setLineMode(rest)

    def connectionLost(self, reason):
        # The master is gone: nobody is left to stop this worker.
        if self.worker.reactor.running:
            self.worker.reactor.stop()


class Worker:
    """
    A worker process: the same server as the master's, on the adopted
    listening socket.
    """

    def __init__(self, reactor, family):
        self.reactor = reactor
        self.family = FAMILIES[family]
        self.state = None
        self.factory = None
        self.metrics = NO_METRICS
        self.pool = BackendPool(reactor)
        self.port = None
        self._stopped = None
        # The database source's side; idle with the YAML source.
        self.dbRouting = WorkerRouting(self)

    def configure(self, data, generation):
        building = inThread(self.reactor, deserialize, data)

        def built(result):
            config, table = result
            if config.routing_database is not None and self.state is not None:
                # The database's table stays; the master sends its changes.
                self.state.swapConfig(config)
                return
            if self.state is None:
                if config.routing_database is not None:
                    table = self.dbRouting.newState(config)
                self.state = ProxyState(config, table)
                self.state.generation = generation
                if config.routing_database is not None:
                    self.dbRouting.start()
                if config.metrics is not None:
                    from lmtp_proxy.metrics import Metrics

                    self.metrics = self.pool.metrics = Metrics()
                self.factory = serverFactory(self.reactor, self.state, self.pool, self.metrics)
                if self.family == socket.AF_UNIX:
                    self.port = adoptSharedUNIXPort(self.reactor, 3, self.factory)
                else:
                    self.port = self.reactor.adoptStreamPort(3, self.family, self.factory)
                # As in the master (ProxyService.startService).
                gc.freeze()
            elif generation > self.state.generation:
                # Configurations are built in threads and may finish out of
                # order: an older one must not replace a newer one.
                self.state.swap(config, table, generation)

        return building.addCallback(built)

    def report(self):
        """
        This worker's status and its metrics' samples (none without
        C{config.metrics}).
        """
        if self.state is None:
            return {"status": None, "samples": []}
        return {
            "status": processView(self.state, self.factory, self.pool),
            "samples": [] if self.metrics is NO_METRICS else self.metrics.samples(),
        }

    def running(self, generation, timeout):
        if self.state is None:
            return defer.succeed(0)
        return self.state.stillRunning(generation, self.reactor, timeout)

    def stop(self, grace=None):
        """
        Stop accepting and drain, once; C{grace} defaults to the configured
        C{shutdown_grace}.
        """
        if self._stopped is None:
            if grace is None:
                grace = self.state.config.shutdown_grace if self.state else 0
            self._stopped = self._drain(grace)
        return self._stopped

    @defer.inlineCallbacks
    def _drain(self, grace):
        if self.port is not None:
            yield self.port.stopListening()
        if self.factory is not None:
            yield self.factory.drain(grace)
        self.pool.closeIdle()


def main(argv):
    """
    Run a worker: C{python -m lmtp_proxy.workers FAMILY}.
    """
    from twisted.internet import reactor

    # The master alone answers SIGUSR1 and passes the new table on.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    err = sys.stderr

    def observer(event):
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        err.write(text + "\n")
        err.flush()

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    worker = Worker(reactor, argv[0])
    dispatchEventsLightly(reactor, worker.pool.outbox)
    stdio.StandardIO(WorkerControl(worker), reactor=reactor)
    # SIGTERM or SIGINT (a foreground Ctrl-C reaches every process) drains
    # like a stop from the master.
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
