"""
Tests for L{lmtp_proxy.twisted_internals}: each fails first when Twisted
changes a private name the item relies on. (The direct send is tested by
L{tests.test_outbox.SendNowTests}.)
"""

import errno
import os
import socket
import stat

from twisted.internet import defer, main, protocol, reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import context, log
from twisted.trial import unittest

from lmtp_proxy.twisted_internals import (
    adoptSharedUNIXPort,
    discardLineBuffer,
    dispatchEventsLightly,
    listenUNIXQuietly,
)
from tests.support import liveSocket, unixPath


class _Accepted(protocol.Factory):
    """
    Records the connections it is offered, and refuses them.
    """

    def __init__(self):
        self.offered = defer.Deferred()

    def buildProtocol(self, addr):
        if not self.offered.called:
            self.offered.callback(addr)
        return None


def connect(testcase, path):
    """
    Connect to the unix socket C{path}; closed at cleanup.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    testcase.addCleanup(client.close)
    client.settimeout(5)
    client.connect(path)
    return client


class SharedUNIXPortTests(unittest.TestCase):
    """
    L{adoptSharedUNIXPort} serves another process's unix listening socket and
    leaves it to that process.
    """

    @defer.inlineCallbacks
    def test_servesWithoutChmod(self):
        """
        The adopted socket accepts connections and its file is not changed:
        after twistd dropped privileges a worker may not own it, and a chmod
        would fail.
        """
        path = unixPath(self)
        listening = liveSocket(self, path)
        os.chmod(path, 0o640)

        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "chmod", refuse)
        factory = _Accepted()
        port = adoptSharedUNIXPort(reactor, listening.fileno(), factory)
        self.addCleanup(port.stopListening)
        connect(self, path)
        yield factory.offered
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    @defer.inlineCallbacks
    def test_stopLeavesSocketToItsOwner(self):
        """
        Once the adopted port stops, the socket file is still there and the
        owner's socket still accepts: Twisted neither removed the file nor
        shut the shared socket down.
        """
        path = unixPath(self)
        listening = liveSocket(self, path)
        port = adoptSharedUNIXPort(reactor, listening.fileno(), _Accepted())
        yield port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        connect(self, path)
        listening.settimeout(5)
        accepted, _ = listening.accept()
        accepted.close()


class QuietUNIXPortTests(unittest.TestCase):
    """
    L{listenUNIXQuietly} listens like C{listenUNIX} but logs no raw socket
    name.
    """

    @defer.inlineCallbacks
    def test_abstractNameNotLogged(self):
        """
        Closing a port on an abstract name (which begins with NUL) puts no
        NUL byte into the log.
        """
        lines = []
        observer = lambda event: lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        address = "\0lmtp-proxy-test:%d:quiet" % (os.getpid(),)
        port = listenUNIXQuietly(reactor, address, _Accepted(), 0o600)
        yield port.stopListening()
        self.assertTrue(lines, "nothing was logged")
        self.assertEqual([line for line in lines if "\0" in line], [])

    @defer.inlineCallbacks
    def test_pathGetsModeAndIsRemoved(self):
        """
        A socket at a path gets the mode asked for, accepts connections, and
        its file is removed when the port stops.
        """
        path = unixPath(self)
        factory = _Accepted()
        port = listenUNIXQuietly(reactor, path, factory, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        connect(self, path)
        yield factory.offered
        yield port.stopListening()
        self.assertFalse(os.path.lexists(path))


class _HeaderRecorder(protocol.Protocol):
    """
    Records what a L{ProxyHeaderWrapper} tells it, in order.
    """

    def __init__(self):
        self.events = []
        self.onHeader = None

    def proxyHeaderReceived(self):
        self.events.append(("header", self.transport.getPeer().host))
        if self.onHeader is not None:
            self.onHeader()

    def dataReceived(self, data):
        self.events.append(("data", data))


class ProxyHeaderTests(unittest.TestCase):
    """
    L{ProxyHeaderWrapper} relies on Twisted's private PROXY header parser
    and wrapper (see L{lmtp_proxy.twisted_internals}).
    """

    def connect(self):
        from lmtp_proxy.twisted_internals import ProxyHeaderWrapper, proxyHeaderFactory

        recorder = _HeaderRecorder()
        wrapper = ProxyHeaderWrapper(proxyHeaderFactory(protocol.Factory()), recorder)
        transport = StringTransport()
        transport.protocol = wrapper
        wrapper.makeConnection(transport)
        return wrapper, recorder, transport

    def test_headerBeforeTheDataAfterIt(self):
        """
        The wrapped protocol hears of the header (and sees the address it
        carries) before the bytes that followed it in the same read.
        """
        wrapper, recorder, _ = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.5 127.0.0.1 4000 24\r\nLHLO x\r\n")
        self.assertEqual(recorder.events, [("header", "192.0.2.5"), ("data", b"LHLO x\r\n")])

    def test_dataAfterHeaderGoesToTheNewProtocol(self):
        """
        When the wrapped protocol puts a TLS layer in front of the wrapper
        as it hears of the header, the bytes after the header go to that
        layer.
        """
        wrapper, recorder, transport = self.connect()
        layer = _HeaderRecorder()
        recorder.onHeader = lambda: setattr(transport, "protocol", layer)
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.5 127.0.0.1 4000 24\r\n\x16\x03\x01")
        self.assertEqual(layer.events, [("data", b"\x16\x03\x01")])
        self.assertEqual(recorder.events, [("header", "192.0.2.5")])


class LineBufferTests(unittest.TestCase):
    """
    L{discardLineBuffer} drops the part of a line a C{LineOnlyReceiver} is
    holding.
    """

    def test_partialLineDropped(self):
        """
        After L{discardLineBuffer}, the bytes of an unfinished line are gone:
        the next input starts a new line.
        """
        lines = []

        class Receiver(LineOnlyReceiver):
            def lineReceived(self, line):
                lines.append(line)

        receiver = Receiver()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(b"one\r\nin clear, unfinished")
        discardLineBuffer(receiver)
        receiver.dataReceived(b"two\r\n")
        self.assertEqual(lines, [b"one", b"two"])


class _Readable:
    """
    One end of a socket pair, as a reactor's reader: records the log
    context each read is handled in, and logs a legacy event.
    """

    def __init__(self, testcase):
        self.socket, self.peer = socket.socketpair()
        testcase.addCleanup(self.socket.close)
        testcase.addCleanup(self.peer.close)
        self.contexts = []
        self.why = None
        self.onLost = None

    def fileno(self):
        return self.socket.fileno()

    def logPrefix(self):
        return "Readable,7"

    def doRead(self):
        self.socket.recv(100)
        self.contexts.append(dict(context.get(log.ILogContext)))
        log.msg("read")
        return self.why

    def connectionLost(self, reason):
        if self.onLost is not None:
            self.onLost()


class _FailingPoller:
    def __init__(self, error):
        self.error = error

    def poll(self, timeout, maxevents):
        raise OSError(self.error, os.strerror(self.error))


class LightDispatchTests(unittest.TestCase):
    """
    L{dispatchEventsLightly} makes an epoll reactor dispatch events without
    C{log.callWithLogger}, in the log context Twisted's own dispatch gives.
    """

    def epollReactor(self, poller=None):
        """
        A new epoll reactor, not installed, that dispatches lightly.
        """
        dispatching = EPollReactor()
        self.addCleanup(dispatching.waker.connectionLost, None)
        self.addCleanup(dispatching._poller.close)
        if poller is not None:
            dispatching._poller = poller
        self.assertTrue(dispatchEventsLightly(dispatching))
        return dispatching

    def readable(self, dispatching):
        """
        A reader of C{dispatching} with one byte waiting.
        """
        reader = _Readable(self)
        dispatching.addReader(reader)
        self.addCleanup(dispatching.removeReader, reader)
        reader.peer.send(b"x")
        return reader

    def test_withoutCallWithLogger(self):
        """
        An event is handled without C{log.callWithLogger}, which Twisted's
        own dispatch calls for every one.
        """
        calls = []
        self.patch(log, "callWithLogger", lambda *a, **kw: calls.append(a))
        dispatching = self.epollReactor()
        reader = self.readable(dispatching)
        dispatching.doIteration(0)
        self.assertEqual((len(reader.contexts), calls), (1, []))

    def test_otherReactorsLeftAlone(self):
        """
        A reactor that is not the epoll reactor keeps its own dispatch.
        """
        other = MemoryReactorClock()
        self.assertFalse(dispatchEventsLightly(other))
        self.assertNotIn("doIteration", vars(other))

    def test_systemIsTheLogPrefix(self):
        """
        A legacy event logged while an event is handled has the
        selectable's C{logPrefix} as its C{system}.
        """
        events = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        dispatching = self.epollReactor()
        self.readable(dispatching)
        dispatching.doIteration(0)
        self.assertEqual(
            [event["system"] for event in events if event.get("message") == ("read",)],
            ["Readable,7"],
        )

    def test_outerContextKept(self):
        """
        What the context around the reactor holds stays in each event's
        context, as with Twisted's dispatch; C{system} is the selectable's.
        """
        dispatching = self.epollReactor()
        reader = self.readable(dispatching)
        log.callWithContext({"system": "outer", "extra": 1}, dispatching.doIteration, 0)
        self.assertEqual(reader.contexts, [{"system": "Readable,7", "extra": 1}])

    def test_escapingErrorLogged(self):
        """
        An exception raised while a selectable is disconnected is logged,
        and the reactor goes on.
        """
        dispatching = self.epollReactor()
        reader = self.readable(dispatching)
        reader.why = main.CONNECTION_DONE
        reader.onLost = lambda: 1 / 0
        dispatching.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_interruptedPollReturns(self):
        """
        A poll interrupted by a signal returns to the reactor's loop.
        """
        dispatching = self.epollReactor(_FailingPoller(errno.EINTR))
        self.assertIsNone(dispatching.doIteration(0))

    def test_failedPollRaises(self):
        """
        Any other error of the poll is raised, as by Twisted's dispatch.
        """
        dispatching = self.epollReactor(_FailingPoller(errno.EBADF))
        self.assertRaises(OSError, dispatching.doIteration, 0)
