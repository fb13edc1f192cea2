"""
The original client's identity: XCLIENT and XFORWARD from the MTA, XCLIENT
to backends, the hop count, and the loop checks on the message.
"""

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.clientid import (
    BadAttribute,
    ClientIdentity,
    XCLIENT_ATTRIBUTES,
    XFORWARD_ATTRIBUTES,
    mayForward,
    parseAttributes,
    xtextDecode,
    xtextEncode,
)

from tests.lmtpclient import BODY, exchange, transaction
from tests.support import FakeBackend, Proxy, handshaken

XCLIENT_EXTENSIONS = ("PIPELINING", "8BITMIME", "XCLIENT ADDR PORT PROTO HELO LOGIN TTL TIMEOUT")


class ParseTests(unittest.TestCase):
    """
    L{parseAttributes} and xtext.
    """

    def test_xclient(self):
        """
        Names are upper-cased, ADDR checked, PORT and TTL made numbers,
        [UNAVAILABLE] made None.
        """
        self.assertEqual(
            parseAttributes(
                "addr=192.0.2.7 PORT=4711 HELO=mx.example TTL=3 NAME=[UNAVAILABLE]",
                XCLIENT_ATTRIBUTES,
            ),
            {"ADDR": "192.0.2.7", "PORT": 4711, "HELO": "mx.example", "TTL": 3, "NAME": None},
        )

    def test_ipv6(self):
        """
        An IPv6 ADDR comes with Postfix's C{IPV6:} prefix, which is dropped.
        """
        self.assertEqual(
            parseAttributes("ADDR=IPV6:2001:db8::1", XFORWARD_ATTRIBUTES), {"ADDR": "2001:db8::1"}
        )

    def test_badAddress(self):
        """
        An ADDR that is not an IP address is refused.
        """
        self.assertRaises(BadAttribute, parseAttributes, "ADDR=mx.example", XCLIENT_ATTRIBUTES)

    def test_controlCharacterRefused(self):
        """
        A value whose xtext decodes to a CR or LF is refused: it would end
        the header line or command it goes into early.
        """
        self.assertRaises(
            BadAttribute, parseAttributes, "HELO=a+0D+0AX-Injected:+20yes", XCLIENT_ATTRIBUTES
        )

    def test_unknownName(self):
        """
        An attribute the command does not take is refused (TTL is XCLIENT's
        only).
        """
        self.assertRaises(BadAttribute, parseAttributes, "TTL=3", XFORWARD_ATTRIBUTES)

    def test_xtext(self):
        """
        xtext round-trips C{+}, C{=} and spaces.
        """
        self.assertEqual(xtextEncode("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtextDecode("a+2Bb+3Dc+20d"), "a+b=c d")


class IdentityTests(unittest.TestCase):
    """
    L{ClientIdentity} and the XCLIENT it sends.
    """

    def test_defaultTtl(self):
        """
        Without a TTL from upstream, XCLIENT sends Dovecot's default 5.
        """
        identity = ClientIdentity("192.0.2.7", 4711, "mx.example")
        self.assertEqual(
            identity.xclient("ADDR PORT HELO TTL"),
            b"XCLIENT ADDR=192.0.2.7 PORT=4711 HELO=mx.example TTL=5",
        )

    def test_ttlDecremented(self):
        """
        A TTL from upstream goes on one less.
        """
        identity = ClientIdentity().forwardedAs({"ADDR": "192.0.2.7", "TTL": 3})
        self.assertIn(b" TTL=2", identity.xclient("ADDR TTL"))
        self.assertFalse(identity.loop)

    def test_ttlZeroIsLoop(self):
        """
        TTL=0 from upstream means a loop.
        """
        self.assertTrue(ClientIdentity().forwardedAs({"TTL": 0}).loop)

    def test_onlyOfferedAttributes(self):
        """
        Only the attributes the backend lists are sent.
        """
        identity = ClientIdentity("192.0.2.7", 4711, "mx.example")
        self.assertEqual(identity.xclient("ADDR TTL"), b"XCLIENT ADDR=192.0.2.7 TTL=5")

    def test_ipv6Prefixed(self):
        """
        An IPv6 address is sent with the C{IPV6:} prefix.
        """
        identity = ClientIdentity("2001:db8::1", 25)
        self.assertIn(b"ADDR=IPV6:2001:db8::1", identity.xclient(""))

    def test_sameAs(self):
        """
        Identities are the same for the same session and values; another
        session with equal values is another client.
        """
        session = object()
        one = ClientIdentity("192.0.2.7", 1, "mx", session=session)
        self.assertTrue(one.sameAs(ClientIdentity("192.0.2.7", 1, "mx", session=session)))
        self.assertFalse(one.sameAs(ClientIdentity("192.0.2.7", 1, "mx", session=object())))
        self.assertFalse(one.sameAs(ClientIdentity("192.0.2.7", 2, "mx", session=session)))
        self.assertFalse(one.sameAs(None))

    def test_lhloKeepsForwardedHelo(self):
        """
        The LHLO of a forwarding proxy does not replace the HELO it
        forwarded.
        """
        identity = ClientIdentity().forwardedAs({"HELO": "mx.example"}).withHelo("proxy")
        self.assertEqual(identity.helo, "mx.example")

    def test_mayForward(self):
        """
        Only addresses in the allowed networks, and unix clients when
        C{unix} is listed, may forward.
        """
        allowed = ("127.0.0.0/8", "unix")
        self.assertTrue(mayForward(allowed, IPv4Address("TCP", "127.0.0.9", 1)))
        self.assertFalse(mayForward(allowed, IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertTrue(mayForward(allowed, UNIXAddress(None)))
        self.assertFalse(mayForward(("127.0.0.0/8",), UNIXAddress(None)))
        self.assertFalse(mayForward((), IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(mayForward(("::1/128",), IPv6Address("TCP", "::1", 1)))

    def test_configNormalized(self):
        """
        C{allowed_xclient} takes networks, single addresses and C{unix}; a
        bad entry is a mistake naming it.
        """
        config = configuration.parse(
            "config: {socket: /tmp/x.sock, allowed_xclient: [127.0.0.1, 10.1.2.0/24, unix]}"
        )
        self.assertEqual(config.allowed_xclient, ("127.0.0.1/32", "10.1.2.0/24", "unix"))
        e = self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            "config: {socket: /tmp/x.sock, allowed_xclient: [nonsense]}",
        )
        self.assertIn("config.allowed_xclient[0]", str(e))


class XclientClientTests(unittest.TestCase):
    """
    L{LMTPClient.xclient} on a L{StringTransport}.
    """

    def test_greetingThenLhlo(self):
        """
        Without PIPELINING, a 220 answer (a new greeting) is followed by
        LHLO again, whose extensions replace the old ones; then the
        connection is ready.
        """
        client, transport, clock, _ = handshaken((b"XCLIENT ADDR",))
        identity = ClientIdentity("192.0.2.7")
        ready = client.xclient(identity, b"XCLIENT ADDR=192.0.2.7")
        self.assertEqual(transport.value(), b"XCLIENT ADDR=192.0.2.7\r\n")
        transport.clear()
        client.dataReceived(b"220 backend.test ready\r\n")
        self.assertEqual(transport.value(), b"LHLO proxy.test\r\n")
        self.assertNoResult(ready)
        client.dataReceived(b"250-backend.test\r\n250 8BITMIME\r\n")
        self.successResultOf(ready)
        self.assertEqual(set(client.extensions), {"8BITMIME"})
        self.assertIs(client.xclientFor, identity)

    def test_refusalLeavesConnection(self):
        """
        Without PIPELINING, a refused XCLIENT is followed by nothing: the
        connection is ready as it was.
        """
        client, transport, clock, _ = handshaken((b"XCLIENT ADDR",))
        ready = client.xclient(ClientIdentity("192.0.2.7"), b"XCLIENT ADDR=192.0.2.7")
        transport.clear()
        client.dataReceived(b"550 5.7.14 You are not from trusted IP\r\n")
        self.successResultOf(ready)
        self.assertEqual(transport.value(), b"")
        self.assertIn("XCLIENT", client.extensions)

    def test_pipelinedLhlo(self):
        """
        With PIPELINING, LHLO leaves together with XCLIENT, and MAIL may
        follow in the same write: no round trip is spent.
        """
        client, transport, clock, _ = handshaken((b"PIPELINING", b"XCLIENT ADDR"))
        ready = client.xclient(ClientIdentity("192.0.2.7"), b"XCLIENT ADDR=192.0.2.7")
        mail = client.command(b"MAIL FROM:<s@x>")
        self.assertEqual(
            transport.value(),
            b"XCLIENT ADDR=192.0.2.7\r\nLHLO proxy.test\r\nMAIL FROM:<s@x>\r\n",
        )
        client.dataReceived(
            b"220 backend.test ready\r\n250-backend.test\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n"
        )
        self.successResultOf(ready)
        self.assertEqual(self.successResultOf(mail).code, 250)


def forwardingProxy(testcase, settings=None, extensions=XCLIENT_EXTENSIONS):
    backend = FakeBackend(testcase, extensions=extensions)
    backend.actions["XCLIENT"] = b"220 fake.test LMTP ready\r\n"
    proxy = Proxy(
        testcase,
        dict({"hostname": "proxy.test", "allowed_xclient": ["127.0.0.0/8"]}, **(settings or {})),
        {"a": backend.entry},
        {"@a.test": "a"},
    )
    return backend, proxy


class ForwardingServerTests(unittest.TestCase):
    """
    What the proxy accepts from its client.
    """

    @defer.inlineCallbacks
    def test_offeredToAllowed(self):
        """
        An allowed client sees XCLIENT and XFORWARD in the LHLO reply.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO c\r\n", 1)
        lines = client.replies[-1].lines
        self.assertTrue(any(l[4:].startswith("XCLIENT ") for l in lines), lines)
        self.assertTrue(any(l[4:].startswith("XFORWARD ") for l in lines), lines)

    @defer.inlineCallbacks
    def test_notOfferedByDefault(self):
        """
        Without C{allowed_xclient} neither is offered, and both are refused.
        """
        backend, proxy = forwardingProxy(self, {"allowed_xclient": []})
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nXCLIENT ADDR=192.0.2.7\r\nXFORWARD ADDR=192.0.2.7\r\n", 3
        )
        self.assertFalse(any("XCLIENT" in l for l in client.replies[1].lines))
        self.assertEqual(replies[1:], ["550 5.7.0 Error: insufficient authorization"] * 2)

    @defer.inlineCallbacks
    def test_xclientAnsweredWithGreeting(self):
        """
        XCLIENT is answered with a new 220 greeting, as Postfix does.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nXCLIENT ADDR=192.0.2.7 PORT=4711\r\n", 2)
        self.assertTrue(replies[1].startswith("220 proxy.test"), replies[1])

    @defer.inlineCallbacks
    def test_notInTransaction(self):
        """
        XFORWARD inside a transaction is refused.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nXFORWARD ADDR=192.0.2.7\r\n", 3
        )
        self.assertEqual(replies[2][:3], "503")

    @defer.inlineCallbacks
    def test_badAttribute(self):
        """
        A malformed attribute gets a 501.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nXFORWARD ADDR=nowhere\r\n", 2)
        self.assertEqual(replies[1][:3], "501")


class XclientToBackendTests(unittest.TestCase):
    """
    What the proxy tells backends about the client.
    """

    @defer.inlineCallbacks
    def test_sentAfterLhloBeforeMail(self):
        """
        A backend offering XCLIENT gets one with the forwarded client's
        address, port and greeting name and TTL=5, answered with 220, then
        LHLO again, then MAIL.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(
            client,
            b"LHLO c\r\nXFORWARD ADDR=192.0.2.7 PORT=4711 HELO=mx.example\r\n"
            + transaction([b"x@a.test"])[len(b"LHLO client.test\r\n"):],
            7,
        )
        self.assertEqual(backend.verbs()[:4], [b"LHLO", b"XCLIENT", b"LHLO", b"MAIL"])
        self.assertEqual(
            backend.commands[1], b"XCLIENT ADDR=192.0.2.7 PORT=4711 HELO=mx.example TTL=5"
        )
        self.assertEqual(backend.messages, [BODY])

    @defer.inlineCallbacks
    def test_pipelinedWithMail(self):
        """
        To a backend offering PIPELINING, XCLIENT, LHLO, MAIL and the first
        RCPT leave in one segment: telling the client costs no round trip.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"]), 6)
        port = client.transport.getHost().port
        self.assertIn(
            b"XCLIENT ADDR=127.0.0.1 PORT=%d HELO=client.test TTL=5\r\nLHLO proxy.test\r\n"
            b"MAIL FROM:<s@example.test>\r\nRCPT TO:<x@a.test>\r\n" % (port,),
            backend.received,
        )

    @defer.inlineCallbacks
    def test_connectionPeerWithoutForwarding(self):
        """
        Without XCLIENT or XFORWARD, the backend is told of the proxy's own
        client and the name it greeted with.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"]), 6)
        port = client.transport.getHost().port
        self.assertEqual(
            backend.commands[1],
            b"XCLIENT ADDR=127.0.0.1 PORT=%d HELO=client.test TTL=5" % (port,),
        )

    @defer.inlineCallbacks
    def test_notSentWhenNotOffered(self):
        """
        A backend that does not offer XCLIENT gets none.
        """
        backend, proxy = forwardingProxy(self, extensions=("PIPELINING",))
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"]), 6)
        self.assertNotIn(b"XCLIENT", backend.verbs())

    @defer.inlineCallbacks
    def test_ttlDecremented(self):
        """
        An upstream TTL goes on one less.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(
            client,
            b"XCLIENT ADDR=192.0.2.7 TTL=3\r\n" + transaction([b"x@a.test"]),
            7,
        )
        self.assertTrue(backend.commands[1].endswith(b" TTL=2"), backend.commands[1])

    @defer.inlineCallbacks
    def test_ttlZeroRefused(self):
        """
        TTL=0 from upstream: its recipients get 554 5.4.6 and nothing
        reaches a backend.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        replies = yield exchange(
            client,
            b"XCLIENT ADDR=192.0.2.7 TTL=0\r\nLHLO c\r\nMAIL FROM:<s@x>\r\n"
            b"RCPT TO:<x@a.test>\r\nRCPT TO:<y@a.test>\r\n",
            5,
        )
        self.assertEqual(replies[3:], ["554 5.4.6 Proxy loop detected"] * 2)
        self.assertEqual(backend.connections, 0)

    @defer.inlineCallbacks
    def test_pooledConnectionNewSession(self):
        """
        A pooled connection gets XCLIENT again when it serves another client
        session.
        """
        backend, proxy = forwardingProxy(self)
        first = yield proxy.connect(self)
        yield exchange(first, b"XFORWARD ADDR=192.0.2.7 PORT=1\r\n" + transaction([b"x@a.test"]), 7)
        yield task.deferLater(reactor, 0.05, lambda: None)
        second = yield proxy.connect(self)
        yield exchange(second, b"XFORWARD ADDR=192.0.2.8 PORT=2\r\n" + transaction([b"z@a.test"]), 7)
        xclients = [c for c in backend.commands if c.startswith(b"XCLIENT")]
        self.assertEqual(backend.connections, 1)
        self.assertEqual(
            xclients,
            [
                b"XCLIENT ADDR=192.0.2.7 PORT=1 HELO=client.test TTL=5",
                b"XCLIENT ADDR=192.0.2.8 PORT=2 HELO=client.test TTL=5",
            ],
        )

    @defer.inlineCallbacks
    def test_oncePerSession(self):
        """
        The same session's next transaction on the same connection sends no
        second XCLIENT.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        yield task.deferLater(reactor, 0.05, lambda: None)
        yield exchange(client, b"MAIL FROM:<s@x>\r\nRCPT TO:<y@a.test>\r\nDATA\r\n" + BODY + b".\r\n", 4)
        self.assertEqual(backend.connections, 1)
        self.assertEqual(backend.verbs().count(b"XCLIENT"), 1)
        self.assertEqual(len(backend.messages), 2)

    @defer.inlineCallbacks
    def test_sessionsKeepTheirPooledConnections(self):
        """
        Two sessions that share a pool each get back, for their next
        transaction, the connection that already had their XCLIENT, even
        when the other session's was released after it: one XCLIENT per
        session, not one per transaction.
        """
        backend, proxy = forwardingProxy(self)
        first = yield proxy.connect(self)
        second = yield proxy.connect(self)
        # The first session holds its connection while the second makes
        # and releases another; the first releases its own last.
        yield exchange(first, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3)
        yield exchange(second, transaction([b"y@a.test"], quit=False), 5)
        yield task.deferLater(reactor, 0.05, lambda: None)
        yield exchange(first, b"DATA\r\n" + BODY + b".\r\n", 2)
        yield task.deferLater(reactor, 0.05, lambda: None)
        yield exchange(second, b"MAIL FROM:<s@x>\r\nRCPT TO:<z@a.test>\r\nDATA\r\n" + BODY + b".\r\n", 4)
        self.assertEqual(backend.connections, 2)
        self.assertEqual(len(backend.messages), 3)
        self.assertEqual(backend.verbs().count(b"XCLIENT"), 2)

    @defer.inlineCallbacks
    def test_repeatedXforwardSentOnce(self):
        """
        Postfix repeats the same XFORWARD before each MAIL of a session: the
        backend connection gets one XCLIENT, not one per transaction.
        """
        backend, proxy = forwardingProxy(self)
        client = yield proxy.connect(self)
        xforward = b"XFORWARD ADDR=192.0.2.7 PORT=1\r\n"
        yield exchange(client, b"LHLO c\r\n" + xforward, 2)
        for rcpt in (b"x@a.test", b"y@a.test"):
            yield exchange(
                client,
                xforward + b"MAIL FROM:<s@x>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n"
                + BODY + b".\r\n",
                5,
            )
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(backend.connections, 1)
        self.assertEqual(backend.verbs().count(b"XCLIENT"), 1)

    @defer.inlineCallbacks
    def test_withoutPipeliningInTurn(self):
        """
        A backend offering XCLIENT but not PIPELINING gets XCLIENT, LHLO and
        MAIL in that order, on a new connection and on a pooled one that
        serves another client session.
        """
        backend, proxy = forwardingProxy(
            self, extensions=("8BITMIME", "XCLIENT ADDR PORT PROTO HELO LOGIN TTL TIMEOUT")
        )
        first = yield proxy.connect(self)
        yield exchange(first, transaction([b"x@a.test"]), 6)
        yield task.deferLater(reactor, 0.05, lambda: None)
        second = yield proxy.connect(self)
        yield exchange(second, transaction([b"y@a.test"]), 6)
        self.assertEqual(backend.connections, 1)
        self.assertEqual(
            backend.verbs(),
            [b"LHLO"] + [b"XCLIENT", b"LHLO", b"MAIL", b"RCPT", b"DATA"] * 2,
        )
        self.assertEqual(backend.messages, [BODY, BODY])

    @defer.inlineCallbacks
    def test_lhloRefusedAfterXclient(self):
        """
        A backend that refuses the LHLO after XCLIENT is a fault: its
        recipient gets a 4xx and nothing is delivered.
        """
        backend, proxy = forwardingProxy(self)
        seen = []

        def lhlo(connection, line):
            seen.append(line)
            if len(seen) % 2:
                connection.transport.write(
                    b"250-fake.test\r\n250-PIPELINING\r\n250 XCLIENT ADDR PORT HELO TTL\r\n"
                )
            else:
                connection.transport.write(b"500 5.5.1 no\r\n")

        backend.actions["LHLO"] = lhlo
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"]), 5)
        self.assertEqual(replies[2][:1], "4", replies)
        self.assertEqual(backend.messages, [])

    @defer.inlineCallbacks
    def test_refusedXclientStillDelivers(self):
        """
        A backend that offers XCLIENT but refuses ours still gets the mail.
        """
        backend, proxy = forwardingProxy(self)
        backend.actions["XCLIENT"] = b"550 5.7.14 You are not from trusted IP\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertEqual(backend.messages, [BODY])


class ReceivedTests(unittest.TestCase):
    """
    Received: headers: counted against C{max_received}, and ours added only
    when C{add_received_header} asks.
    """

    def message(self, count, more=b""):
        return b"".join(b"Received: from hop%d\r\n" % (i,) for i in range(count)) + more + BODY

    @defer.inlineCallbacks
    def deliver(self, settings, body, recipients=(b"x@a.test", b"y@a.test")):
        backend, proxy = forwardingProxy(self, settings, extensions=("PIPELINING",))
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction(list(recipients), body), 4 + 2 * len(recipients))
        return backend, replies

    @defer.inlineCallbacks
    def test_overLimitRefused(self):
        """
        More Received: headers than C{max_received}: 554 5.4.6 for each
        recipient, and the message is completed nowhere.
        """
        backend, replies = yield self.deliver({"max_received": 3}, self.message(4))
        self.assertEqual([r[:9] for r in replies[5:7]], ["554 5.4.6"] * 2)
        self.assertEqual(backend.messages, [])

    @defer.inlineCallbacks
    def test_atLimitDelivered(self):
        """
        Exactly C{max_received} is fine; the headers are counted
        case-insensitively.
        """
        body = self.message(2, b"received: from hop2\r\n")
        backend, replies = yield self.deliver({"max_received": 3}, body)
        self.assertEqual([r[:3] for r in replies[5:7]], ["250"] * 2)
        self.assertEqual(backend.messages, [body])

    @defer.inlineCallbacks
    def test_bodyNotCounted(self):
        """
        Received: lines after the header section are body text.
        """
        body = b"Subject: x\r\n\r\n" + b"".join(b"Received: %d\r\n" % (i,) for i in range(5))
        backend, replies = yield self.deliver({"max_received": 3}, body)
        self.assertEqual([r[:3] for r in replies[5:7]], ["250"] * 2)

    @defer.inlineCallbacks
    def test_defaultLimit(self):
        """
        The default limit is 50.
        """
        backend, replies = yield self.deliver({}, self.message(51))
        self.assertEqual([r[:9] for r in replies[5:7]], ["554 5.4.6"] * 2)

    @defer.inlineCallbacks
    def test_noHeaderByDefault(self):
        """
        By default the backend gets the message byte for byte.
        """
        backend, replies = yield self.deliver({}, BODY)
        self.assertEqual(backend.messages, [BODY])

    @defer.inlineCallbacks
    def test_headerAdded(self):
        """
        With C{add_received_header}, one Received: line naming the client,
        the proxy and the one recipient comes before the message.
        """
        backend, replies = yield self.deliver(
            {"add_received_header": True}, BODY, recipients=(b"x@a.test",)
        )
        [message] = backend.messages
        self.assertTrue(message.endswith(b"\r\n" + BODY))
        header = message[: -len(BODY)]
        self.assertTrue(
            header.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby proxy.test"),
            header,
        )
        self.assertIn(b"\r\n\tfor <x@a.test>; ", header)
        self.assertEqual(header.count(b"Received:"), 1)

    @defer.inlineCallbacks
    def test_headerWithoutRecipientForTwo(self):
        """
        With two recipients the header names neither.
        """
        backend, replies = yield self.deliver({"add_received_header": True}, BODY)
        [message] = backend.messages
        self.assertTrue(message.startswith(b"Received: from "))
        self.assertNotIn(b"for <", message)
