"""
Tests for L{lmtp_proxy.outbox}: writes that leave for the socket at once,
joined while input is handled, and never lost or reordered.
"""

import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from lmtp_proxy.outbox import BULK, Outbox, sendNow
from lmtp_proxy.twisted_internals import sendRecordsAtOnce, startTLS
from tests.certificates import Authority, requireTLS
from tests.support import WriteRecorder, waitUntil


class _Collector(protocol.Protocol):
    """
    Keeps what arrives, one entry per C{dataReceived}.
    """

    def __init__(self):
        self.chunks = []
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.lost.callback(None)

    @property
    def received(self):
        return b"".join(self.chunks)


class LoopbackMixin:
    """
    A real TCP connection on 127.0.0.1: a sending end whose transport is a
    C{tcp.Connection}, and a L{_Collector} end.
    """

    @defer.inlineCallbacks
    def connect(self):
        self.collector = _Collector()
        port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(lambda: self.collector), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        sender = yield protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        yield waitUntil(lambda: self.collector.transport is not None)
        self.addCleanup(self._close, sender)
        return sender.transport

    def _close(self, sender):
        sender.transport.abortConnection()
        if self.collector.transport is not None:
            self.collector.transport.abortConnection()
        return self.collector.lost


class SendNowTests(LoopbackMixin, unittest.TestCase):
    """
    L{sendNow} on real connections. They are the first to fail when Twisted
    changes what L{lmtp_proxy.twisted_internals.sendOnSocket} relies on.
    """

    @defer.inlineCallbacks
    def test_sentWithoutWaitingForTheReactor(self):
        """
        With nothing queued, the data is on the socket when C{sendNow}
        returns: nothing is left in the transport's buffer and the reactor
        is not asked to watch the socket for writability.
        """
        transport = yield self.connect()
        sendNow(transport, b"250 2.1.0 Ok\r\n")
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(transport.dataBuffer, b"")
        self.assertEqual(transport._tempDataBuffer, [])
        yield waitUntil(lambda: self.collector.received == b"250 2.1.0 Ok\r\n")

    @defer.inlineCallbacks
    def test_queuedDataKeepsItsPlace(self):
        """
        Data Twisted still holds is not overtaken: the new data is queued
        behind it.
        """
        transport = yield self.connect()
        transport.write(b"first ")
        sendNow(transport, b"second")
        self.assertIn(transport, reactor.getWriters())
        yield waitUntil(lambda: self.collector.received == b"first second")

    @defer.inlineCallbacks
    def test_partlySentDataKeepsItsPlace(self):
        """
        Data Twisted has begun to send, and holds the rest of, is not
        overtaken once the socket has room again.
        """
        transport = yield self.connect()
        peer = self.collector.transport
        peer.pauseProducing()
        data = bytes(range(256)) * 65536
        sendNow(transport, data)
        drained = bytearray()

        def drain():
            # Read on the peer's socket behind the reactor's back, so the
            # sender's socket has room before Twisted writes again.
            while True:
                try:
                    chunk = peer.socket.recv(1 << 20)
                except BlockingIOError:
                    return
                drained.extend(chunk)

        drain()
        yield waitUntil(lambda: transport.dataBuffer, timeout=30)
        drain()
        sendNow(transport, b"tail")
        peer.resumeProducing()
        total = len(data) + len(b"tail")
        yield waitUntil(
            lambda: len(drained) + len(self.collector.received) == total, timeout=30
        )
        # Not assertEqual: its message would hold 16 MB.
        self.assertTrue(
            bytes(drained) + self.collector.received == data + b"tail",
            "the tail overtook data Twisted held",
        )

    @defer.inlineCallbacks
    def test_fullSocketLeavesTheRestToTwisted(self):
        """
        What a full socket does not take is queued in the transport and
        arrives later, complete and in order.
        """
        transport = yield self.connect()
        self.collector.transport.pauseProducing()
        # More than the socket buffers on both ends of a loopback connection.
        data = bytes(range(256)) * 65536
        sendNow(transport, data)
        self.assertIn(transport, reactor.getWriters())
        self.collector.transport.resumeProducing()
        yield waitUntil(lambda: len(self.collector.received) == len(data), timeout=30)
        self.assertEqual(self.collector.received, data)

    @defer.inlineCallbacks
    def test_closingTransportStillSendsThenCloses(self):
        """
        Data written after C{loseConnection} goes through Twisted, which
        sends it before closing, as it would for C{transport.write}.
        """
        transport = yield self.connect()
        transport.loseConnection()
        sendNow(transport, b"221 2.0.0 Bye\r\n")
        yield self.collector.lost
        self.assertEqual(self.collector.received, b"221 2.0.0 Bye\r\n")

    @defer.inlineCallbacks
    def test_abortedTransportSendsNothing(self):
        """
        After C{abortConnection} nothing more leaves: an aborted backend
        transaction must never get its final dot.
        """
        transport = yield self.connect()
        transport.abortConnection()
        sendNow(transport, b".\r\n")
        yield self.collector.lost
        self.assertEqual(self.collector.received, b"")

    def test_otherTransportsUseWrite(self):
        """
        A transport that is not a TCP or UNIX connection gets a plain
        C{write}.
        """
        transport = StringTransport()
        sendNow(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")


class OutboxTests(LoopbackMixin, unittest.TestCase):
    def test_writesAtOnceWhenNotHeld(self):
        """
        Outside a hold a write is sent at once.
        """
        outbox, transport = Outbox(), StringTransport()
        outbox.write(transport, b"one")
        self.assertEqual(transport.value(), b"one")

    def test_flushSendsOneTransportsWritesNow(self):
        """
        L{Outbox.flush} sends what waits for one transport during a hold
        (the reply to STARTTLS, before TLS starts), and only for it.
        """
        outbox, first, second = Outbox(), StringTransport(), StringTransport()
        outbox.hold()
        outbox.write(first, b"250 Ok\r\n")
        outbox.write(first, b"220 Ready to start TLS\r\n")
        outbox.write(second, b"other\r\n")
        outbox.flush(first)
        self.assertEqual((first.value(), second.value()), (b"250 Ok\r\n220 Ready to start TLS\r\n", b""))
        outbox.release()
        self.assertEqual((first.value().count(b"220"), second.value()), (1, b"other\r\n"))

    def test_heldWhileAHoldLasts(self):
        """
        L{Outbox.held} is true from the first hold to the release of the
        outermost one, a turn's hold included.
        """
        outbox = Outbox()
        seen = [outbox.held]
        outbox.holdTurn()
        outbox.hold()
        seen.append(outbox.held)
        outbox.release()
        seen.append(outbox.held)
        outbox.releaseTurn()
        seen.append(outbox.held)
        self.assertEqual(seen, [False, True, True, False])

    def test_beforeSendingRunsBeforeTheHeldWritesLeave(self):
        """
        A call given to L{Outbox.beforeSending} runs when the outermost
        hold ends, before anything it kept back is sent.
        """
        outbox, transport = Outbox(), StringTransport()
        seen = []
        outbox.beforeSending(lambda: seen.append(transport.value()))
        outbox.hold()
        outbox.hold()
        outbox.write(transport, b"250 2.0.0 Ok\r\n")
        outbox.release()
        self.assertEqual(seen, [])
        outbox.release()
        self.assertEqual((seen, transport.value()), ([b""], b"250 2.0.0 Ok\r\n"))

    def test_beforeSendingRunsWithNothingToSend(self):
        """
        The call runs at the end of every outermost hold, even one that
        wrote nothing, and not for a write made outside a hold.
        """
        outbox, transport = Outbox(), StringTransport()
        seen = []
        outbox.beforeSending(lambda: seen.append("called"))
        outbox.hold()
        outbox.release()
        outbox.write(transport, b"x")
        self.assertEqual(seen, ["called"])

    def test_heldWritesKeptWhenBeforeSendingRaises(self):
        """
        When a call given to L{Outbox.beforeSending} raises, what the hold
        kept back is not lost: it leaves at the next release.
        """
        outbox, transport = Outbox(), StringTransport()
        calls = []

        def before():
            calls.append("called")
            if len(calls) == 1:
                raise KeyboardInterrupt()

        outbox.beforeSending(before)
        outbox.hold()
        outbox.write(transport, b"250 2.0.0 Ok\r\n")
        self.assertRaises(KeyboardInterrupt, outbox.release)
        self.assertEqual(transport.value(), b"")
        outbox.hold()
        outbox.release()
        self.assertEqual(transport.value(), b"250 2.0.0 Ok\r\n")

    def test_beforeSendingRunsBeforeAFlush(self):
        """
        L{Outbox.flush} runs the call before it sends what waits for its
        transport.
        """
        outbox, transport = Outbox(), StringTransport()
        seen = []
        outbox.beforeSending(lambda: seen.append(transport.value()))
        outbox.hold()
        outbox.write(transport, b"220 Ready to start TLS\r\n")
        outbox.flush(transport)
        self.assertEqual(seen, [b""])
        self.assertEqual(transport.value(), b"220 Ready to start TLS\r\n")

    def test_heldWritesLeaveAtRelease(self):
        """
        Writes made while held wait for the release, and leave in order.
        """
        outbox, transport = Outbox(), StringTransport()
        outbox.hold()
        outbox.write(transport, b"MAIL FROM:<a@b>\r\n")
        outbox.write(transport, b"RCPT TO:<c@d>\r\n")
        self.assertEqual(transport.value(), b"")
        outbox.release()
        self.assertEqual(transport.value(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")

    def test_nestedHoldsReleaseAtTheOutermost(self):
        """
        Only the release of the outermost hold sends.
        """
        outbox, transport = Outbox(), StringTransport()
        outbox.hold()
        outbox.hold()
        outbox.write(transport, b"x")
        outbox.release()
        self.assertEqual(transport.value(), b"")
        outbox.release()
        self.assertEqual(transport.value(), b"x")

    def test_eachTransportGetsItsOwn(self):
        """
        Held writes are kept apart per transport.
        """
        outbox, a, b = Outbox(), StringTransport(), StringTransport()
        outbox.hold()
        outbox.write(a, b"a1 ")
        outbox.write(b, b"b1 ")
        outbox.write(a, b"a2")
        outbox.release()
        self.assertEqual((a.value(), b.value()), (b"a1 a2", b"b1 "))

    def test_afterInputRunsOnceTheWritesLeft(self):
        """
        During a hold, L{Outbox.afterInput} calls wait for the outermost
        release, and run after the writes held with them were sent.
        """
        outbox, transport = Outbox(), StringTransport()
        seen = []
        outbox.hold()
        outbox.hold()
        outbox.write(transport, b"250 2.1.5 Ok\r\n")
        outbox.afterInput(lambda *a, **k: seen.append((transport.value(), a, k)), 1, x=2)
        outbox.release()
        self.assertEqual(seen, [])
        outbox.release()
        self.assertEqual(seen, [(b"250 2.1.5 Ok\r\n", (1,), {"x": 2})])

    def test_afterInputOutsideAHoldRunsAtOnce(self):
        """
        Outside a hold an L{Outbox.afterInput} call runs at once.
        """
        outbox = Outbox()
        seen = []
        outbox.afterInput(seen.append, "now")
        self.assertEqual(seen, ["now"])

    def test_afterInputRunsWhenSendingFails(self):
        """
        A write that raises at the release does not lose the calls waiting
        for it, nor does one failing call lose the others.
        """

        class Broken(StringTransport):
            def write(self, data):
                raise RuntimeError("broken")

        outbox = Outbox()
        seen = []
        outbox.hold()
        outbox.write(Broken(), b"x")
        outbox.afterInput(lambda: 1 / 0)
        outbox.afterInput(seen.append, "logged")
        self.assertRaises(RuntimeError, outbox.release)
        self.assertEqual(seen, ["logged"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_turnJoinsTheWritesOfSeveralInputs(self):
        """
        Held for a turn, the writes of several inputs to one transport
        leave together when the turn is released, in the order written.
        """
        outbox, transport = Outbox(), WriteRecorder()
        outbox.holdTurn()
        for data in (b"250 2.2.0 Ok\r\n", b"250 2.2.0 Ok\r\n250 2.2.0 Ok\r\n"):
            outbox.hold()
            outbox.write(transport, data)
            outbox.release()
            self.assertEqual(transport.value(), b"")
        outbox.releaseTurn()
        self.assertEqual(transport.writes, [b"250 2.2.0 Ok\r\n" * 3])

    def test_failedSendKeepsNoOtherBack(self):
        """
        At the end of a turn, a transport whose write raises does not keep
        the writes to the other transports back; the error is raised after
        they were sent.
        """

        class Broken(StringTransport):
            def write(self, data):
                raise RuntimeError("broken")

        outbox, other = Outbox(), StringTransport()
        outbox.holdTurn()
        outbox.write(Broken(), b"250 2.2.0 Ok\r\n")
        outbox.write(other, b"250 2.2.0 Ok\r\n")
        self.assertRaises(RuntimeError, outbox.releaseTurn)
        self.assertEqual(other.value(), b"250 2.2.0 Ok\r\n")

    def test_turnWithoutInputStillHolds(self):
        """
        A write made in a turn outside any input (a connection set up, one
        lost) waits for the end of the turn too.
        """
        outbox, transport = Outbox(), StringTransport()
        outbox.holdTurn()
        outbox.write(transport, b"220 ready\r\n")
        self.assertEqual(transport.value(), b"")
        outbox.releaseTurn()
        self.assertEqual(transport.value(), b"220 ready\r\n")

    def test_bulkWriteLeavesAtTheEndOfItsInput(self):
        """
        In a turn, a write of L{BULK} bytes leaves, with what was written
        to its transport before it, when its input is done; other
        transports still wait for the turn.
        """
        outbox, bulky, other = Outbox(), WriteRecorder(), WriteRecorder()
        body = b"x" * BULK
        outbox.holdTurn()
        outbox.hold()
        outbox.write(bulky, b"354 go ahead\r\n")
        outbox.write(bulky, body)
        outbox.write(other, b"250 2.1.5 Ok\r\n")
        self.assertEqual(bulky.writes, [])
        outbox.release()
        self.assertEqual((bulky.writes, other.writes), ([b"354 go ahead\r\n" + body], []))
        outbox.releaseTurn()
        self.assertEqual(
            (bulky.writes, other.writes), ([b"354 go ahead\r\n" + body], [b"250 2.1.5 Ok\r\n"])
        )

    def test_smallerWritesWaitForTheTurn(self):
        """
        In a turn, a write one byte short of L{BULK} waits for the turn.
        """
        outbox, transport = Outbox(), WriteRecorder()
        outbox.holdTurn()
        outbox.hold()
        outbox.write(transport, b"x" * (BULK - 1))
        outbox.release()
        self.assertEqual(transport.writes, [])
        outbox.releaseTurn()
        self.assertEqual(len(transport.value()), BULK - 1)

    def test_afterInputDoesNotWaitForTheTurn(self):
        """
        In a turn, an L{Outbox.afterInput} call runs when its input's hold
        ends, before the turn's writes leave.
        """
        outbox, transport = Outbox(), StringTransport()
        seen = []
        outbox.holdTurn()
        outbox.hold()
        outbox.hold()
        outbox.write(transport, b"x")
        outbox.afterInput(lambda: seen.append(transport.value()))
        outbox.release()
        self.assertEqual(seen, [])
        outbox.release()
        self.assertEqual(seen, [b""])
        outbox.releaseTurn()
        self.assertEqual((seen, transport.value()), ([b""], b"x"))

    def test_afterInputInATurnOutsideAnInputRunsAtOnce(self):
        """
        In a turn but outside any input, an L{Outbox.afterInput} call runs
        at once: a turn alone is not an input.
        """
        outbox = Outbox()
        seen = []
        outbox.holdTurn()
        outbox.afterInput(seen.append, "now")
        self.assertEqual(seen, ["now"])
        outbox.releaseTurn()

    @defer.inlineCallbacks
    def test_heldWritesLeaveInOneSend(self):
        """
        Writes held together reach the peer in one piece, not one segment
        each.
        """
        transport = yield self.connect()
        outbox = Outbox()
        outbox.hold()
        for n in range(5):
            outbox.write(transport, b"250 2.1.5 recipient %d\r\n" % (n,))
        outbox.release()
        expected = b"".join(b"250 2.1.5 recipient %d\r\n" % (n,) for n in range(5))
        yield waitUntil(lambda: self.collector.received == expected)
        self.assertEqual(self.collector.chunks, [expected])


class _TLSEnd(protocol.Protocol):
    """
    Starts TLS as soon as it is connected, with L{startTLS} or Twisted's
    own C{startTLS}, and keeps what arrives.
    """

    def __init__(self, options, ours):
        self.options = options
        self.ours = ours
        self.received = b""

    def connectionMade(self):
        # As the proxy's connections: Nagle would hold a record back until
        # the peer acknowledged the previous one.
        self.transport.setTcpNoDelay(True)
        if self.ours:
            startTLS(self.transport, self.options)
        else:
            self.transport.startTLS(self.options)

    def dataReceived(self, data):
        self.received += data


class TLSSendTests(unittest.TestCase):
    """
    L{startTLS} sends the TLS layer's records on the socket at once. These
    tests fail first when Twisted changes what it relies on.
    """

    def listen(self):
        """
        A CA, and a server end (L{startTLS}) listening on 127.0.0.1.

        @return: the client's TLS options and the port number.
        """
        from twisted.internet import ssl

        requireTLS()
        authority = Authority(self.mktemp())
        certificate, key = authority.issue("server")
        with open(certificate, "rb") as c, open(key, "rb") as k:
            server = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
        with open(authority.caFile, "rb") as f:
            client = ssl.optionsForClientTLS(
                "localhost", trustRoot=ssl.Certificate.loadPEM(f.read())
            )
        self.server = _TLSEnd(server, ours=True)
        port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(lambda: self.server), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return client, port.getHost().port

    @defer.inlineCallbacks
    def handshake(self, connecting):
        """
        Wait for the client end C{connecting} gives, and for the handshake:
        the client's first bytes under TLS arrive once it is done on both
        ends.
        """
        yield connecting
        self.addCleanup(self._close)
        self.client.transport.write(b"ready")
        yield waitUntil(lambda: self.server.received == b"ready")

    def connect(self):
        """
        A TLS connection, started with STARTTLS on both ends.
        """
        client, port = self.listen()
        connecting = protocol.ClientCreator(reactor, _TLSEnd, client, False).connectTCP(
            "127.0.0.1", port
        )
        connecting.addCallback(lambda end: setattr(self, "client", end))
        return self.handshake(connecting)

    def _close(self):
        for end in (self.client, self.server):
            if end.transport is not None:
                end.transport.abortConnection()
        return task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def test_sentWhenTheWriteReturns(self):
        """
        Under TLS, what the protocol writes is encrypted and on the socket
        when the write returns: the peer's socket can already read it, and
        nothing waits in the connection for the reactor.
        """
        yield self.connect()
        connection = self.server.transport
        connection.write(b"250 2.1.0 Ok\r\n")
        self.assertNotIn(connection, reactor.getWriters())
        self.assertEqual((connection.dataBuffer, connection._tempDataBuffer), (b"", []))
        peer = self.client.transport.socket
        self.assertGreater(len(peer.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)), 0)
        yield waitUntil(lambda: self.client.received == b"250 2.1.0 Ok\r\n")

    @defer.inlineCallbacks
    def test_largeWritesArriveWhole(self):
        """
        A write larger than the socket takes at once is finished by
        Twisted, in order, behind what went out directly.
        """
        yield self.connect()
        data = bytes(range(256)) * 16384
        self.server.transport.write(data)
        self.server.transport.write(b"tail")
        yield waitUntil(lambda: len(self.client.received) >= len(data) + 4, timeout=30)
        self.assertEqual(self.client.received, data + b"tail")

    @defer.inlineCallbacks
    def test_wrappedConnectionSendsAtOnce(self):
        """
        A TLS layer wrapped around a TCP connection from the start (as
        C{wrapClientTLS} makes) sends its records at once after
        L{sendRecordsAtOnce}.
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        options, port = self.listen()
        self.client = _Plain()
        wrapped = TLSMemoryBIOFactory(
            options, True, protocol.Factory.forProtocol(lambda: self.client)
        )
        yield self.handshake(
            protocol.ClientCreator(reactor, lambda: wrapped.buildProtocol(None)).connectTCP(
                "127.0.0.1", port
            )
        )
        self.server.transport.write(b"hello")
        yield waitUntil(lambda: self.client.received == b"hello")
        layer = self.client.transport
        sendRecordsAtOnce(layer)
        connection = layer.transport
        self.client.transport.write(b"250 2.1.0 Ok\r\n")
        self.assertNotIn(connection, reactor.getWriters())
        peer = self.server.transport.socket
        self.assertGreater(len(peer.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)), 0)
        yield waitUntil(lambda: self.server.received == b"ready250 2.1.0 Ok\r\n")


class _Plain(protocol.Protocol):
    """
    Keeps what arrives; sets no option of its own.
    """

    received = b""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data):
        self.received += data
