"""
Test fixtures: a scriptable in-process LMTP backend and the proxy on
loopback (L{tests.lmtpclient} is the client that talks to them).
"""

import base64
import os
import re
import socket
import tempfile

import yaml
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver

from lmtp_proxy import config as configuration
from lmtp_proxy.client import LMTPClient
from lmtp_proxy.pool import BackendPool
from lmtp_proxy.recorder import NO_METRICS
from lmtp_proxy.serving import serverFactory
from lmtp_proxy.state import ProxyState
from tests.lmtpclient import connectClient


class FakeBackendProtocol(LineReceiver):
    """
    One connection to a L{FakeBackend}.
    """

    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        backend = self.factory
        backend.connections += 1
        backend.open.add(self)
        self.recipients = []
        self.data = bytearray()
        self.inData = False
        self._answer(backend.greeting)

    def connectionLost(self, reason):
        backend = self.factory
        backend.open.discard(self)
        if self.inData:
            backend.aborted.append(bytes(self.data))

    def dataReceived(self, data):
        self.factory.received.append(data)
        LineReceiver.dataReceived(self, data)

    def _answer(self, text):
        if text is not None:
            self.transport.write(text if isinstance(text, bytes) else text.encode())

    def lineReceived(self, line):
        backend = self.factory
        backend.commands.append(line)
        verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
        action = backend.actions.get(verb)
        if callable(action):
            action(self, line)
            return
        if action == "hang":
            return
        if action == "close":
            self.transport.loseConnection()
            return
        if isinstance(action, bytes):
            self._answer(action)
            return
        if verb == "LHLO":
            lines = [b"fake.test"] + [e.encode() for e in backend.extensions]
            self._answer(
                b"".join(
                    b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", l)
                    for i, l in enumerate(lines)
                )
                + backend.lhloTrailer
            )
        elif verb == "MAIL":
            self.recipients = []
            self._answer(b"250 2.1.0 Ok\r\n")
        elif verb == "RCPT":
            address = re.search(rb"<([^>]*)>", line).group(1)
            answer = backend.rcptReplies.get(address, b"250 2.1.5 Ok\r\n")
            if answer.startswith(b"2"):
                self.recipients.append(address)
            self._answer(answer)
        elif verb == "DATA":
            self._answer(b"354 go ahead\r\n")
            self.inData = True
            self.data = bytearray()
            self.setRawMode()
            if backend.dataAction == "pause":
                self.transport.pauseProducing()
        elif verb == "RSET":
            self.recipients = []
            self._answer(b"250 2.0.0 Ok\r\n")
        elif verb == "AUTH":
            self._answer(b"235 2.7.0 Authenticated\r\n")
        elif verb == "QUIT":
            self._answer(b"221 2.0.0 Bye\r\n")
            self.transport.loseConnection()
        else:
            self._answer(b"250 2.0.0 Ok\r\n")

    def rawDataReceived(self, data):
        backend = self.factory
        # Only the new bytes (and the 4 before them) can complete the end
        # marker; searching the whole message each time is quadratic.
        start = max(0, len(self.data) - 4)
        self.data += data
        if backend.dataAction == "close":
            self.transport.loseConnection()
            return
        if self.data.startswith(b".\r\n"):
            end = 0
        else:
            end = self.data.find(b"\r\n.\r\n", start)
            if end < 0:
                return
            end += 2
        message = bytes(self.data[:end])
        rest = bytes(self.data[end + 3 :])
        self.inData = False
        backend.messages.append(message)
        if backend.dataAction == "hang":
            return
        for address in self.recipients:
            self._answer(backend.dataReplies.get(address, b"250 2.0.0 <%s> Saved\r\n" % (address,)))
        self.setLineMode(rest)


class FakeBackend(protocol.Factory):
    """
    A scriptable LMTP backend listening on 127.0.0.1 or a unix socket.

    @ivar actions: verb -> C{"hang"}, C{"close"}, the raw bytes to answer, or
        a callable C{(protocol, line)} that does the answering itself.
    @ivar dataAction: C{None}, C{"close"} (drop the connection on the first
        message byte), C{"hang"} (never answer after the final dot) or
        C{"pause"} (stop reading from the socket once DATA is answered).
    @ivar messages: each complete message as received (still dot-stuffed).
    @ivar aborted: message bytes of connections closed before the final dot.
    @ivar received: every chunk read from any connection, as read.
    """

    protocol = FakeBackendProtocol
    noisy = False

    def __init__(
        self, testcase, unix=None, extensions=("PIPELINING", "8BITMIME", "SIZE", "DSN"), tls=None
    ):
        """
        @param tls: TLS options (L{CertificateOptions}) for a backend that
            speaks TLS from the first byte.
        """
        self.greeting = b"220 fake.test LMTP ready\r\n"
        self.extensions = list(extensions)
        self.lhloTrailer = b""
        self.actions = {}
        self.rcptReplies = {}
        self.dataReplies = {}
        self.dataAction = None
        self.commands = []
        self.messages = []
        self.aborted = []
        self.received = []
        self.connections = 0
        self.open = set()
        if tls is not None:
            self.port = reactor.listenSSL(0, self, tls, interface="127.0.0.1")
            self.entry = {"host": "127.0.0.1", "port": self.port.getHost().port}
        elif unix is None:
            self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
            self.entry = {"host": "127.0.0.1", "port": self.port.getHost().port}
        else:
            self.port = reactor.listenUNIX(unix, self)
            self.entry = {"socket": unix}
        testcase.addCleanup(self.stop)

    def stop(self):
        for connection in list(self.open):
            connection.transport.abortConnection()
        return self.port.stopListening()

    def verbs(self):
        """
        The verbs received, in order.
        """
        return [c.split(b" ", 1)[0].upper() for c in self.commands]


class WriteRecorder(StringTransport):
    """
    A C{StringTransport} that keeps each write apart, to tell writes that
    left joined from writes that left one by one.
    """

    def __init__(self):
        StringTransport.__init__(self)
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        StringTransport.write(self, data)


def deadPort():
    """
    A 127.0.0.1 port nothing listens on.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Proxy:
    """
    The proxy's server side on 127.0.0.1, built from a config mapping.
    """

    def __init__(self, testcase, settings, backends, users, clock=reactor, metrics=NO_METRICS):
        """
        @param metrics: the L{lmtp_proxy.recorder.IRecorder} the delivery
            and the pool tell.
        """
        document = {
            "config": dict({"socket": ["127.0.0.1", 1]}, **settings),
            "backends": backends,
            "users": users,
        }
        self.config = configuration.parse(yaml.safe_dump(document), "<test>")
        self.state = ProxyState(self.config)
        self.pool = BackendPool(clock, metrics=metrics)
        self.factory = serverFactory(clock, self.state, self.pool, metrics)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        testcase.addCleanup(self.stop)

    @property
    def address(self):
        return self.port.getHost().port

    def stop(self):
        for session in list(self.factory.sessions):
            session.transport.abortConnection()
        self.pool.closeIdle()
        return self.port.stopListening()

    def connect(self, testcase):
        """
        Connect an L{LMTPTestClient}; fires with it after the greeting.
        """
        return connectClient(testcase, self.address)


@defer.inlineCallbacks
def waitUntil(predicate, timeout=10.0):
    """
    Poll C{predicate} until it holds; fail after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in %s seconds" % (timeout,))
        yield task.deferLater(reactor, 0.01, lambda: None)


def unixPath(testcase):
    """
    A short fresh unix socket path under /tmp; it and a C{.lock} beside it
    are removed at cleanup.
    """
    path = tempfile.mktemp(prefix="lmtpt-", suffix=".sock", dir="/tmp")

    def clean():
        for p in (path, path + ".lock"):
            if os.path.lexists(p):
                os.unlink(p)

    testcase.addCleanup(clean)
    return path


USER = "proxyuser"
PASSWORD = "s3cret-Pa55"
PLAIN_TOKEN = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())


def makeClient(timeout=5.0):
    """
    An L{LMTPClient} connected to a L{StringTransport}, with its clock.
    """
    clock = task.Clock()
    client = LMTPClient(clock, timeout)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def handshaken(extensions=(b"PIPELINING",), timeout=5.0, user=None, password=None):
    """
    A client past greeting and LHLO (and AUTH when credentials are given:
    the caller answers it); returns the client, transport, clock and the
    handshake's L{Deferred}.
    """
    client, transport, clock = makeClient(timeout)
    d = client.handshake("proxy.test", user, password)
    client.dataReceived(b"220 backend.test LMTP ready\r\n")
    transport.clear()
    lines = [b"backend.test"] + list(extensions)
    client.dataReceived(
        b"".join(
            b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", line)
            for i, line in enumerate(lines)
        )
    )
    return client, transport, clock, d


def liveSocket(testcase, path):
    """
    A unix socket listening at C{path} until the test ends, as another
    running server (or the master process) would have it.
    """
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    testcase.addCleanup(live.close)
    live.bind(path)
    live.listen(5)
    return live


def fullBacklog(testcase):
    """
    A listening socket whose accept queue is full: connections to it hang
    until they time out (a black-holed backend on loopback).
    """
    full = socket.socket()
    testcase.addCleanup(full.close)
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        testcase.addCleanup(filler.close)
    return {"host": "127.0.0.1", "port": full.getsockname()[1]}


def outcomeLines(testcase):
    """
    Collect the per-recipient outcome lines logged while C{testcase} runs.
    """
    lines = []

    def observer(event):
        if "outcome" in event:
            lines.append(event["outcome"])

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


def outcomesFor(lines, address):
    return [line for line in lines if "to=<%s>" % (address,) in line]


def readUntil(sock, marker):
    """
    What the blocking socket C{sock} receives until C{marker} has come or
    the peer closes.
    """
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
