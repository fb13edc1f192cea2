"""
The whole proxy over loopback sockets, with in-process fake backends.
"""

import re
import socket
from io import StringIO

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher, textFileLogObserver
from twisted.trial import unittest

from lmtp_proxy import delivery
from lmtp_proxy.delivery import MAX_HELD

from tests.lmtpclient import BODY, exchange, mail, transaction
from tests.support import (
    PASSWORD,
    PLAIN_TOKEN,
    USER,
    FakeBackend,
    Proxy,
    deadPort,
    outcomeLines,
    outcomesFor,
    unixPath,
    waitUntil,
)


class RoutingDeliveryTests(unittest.TestCase):
    """
    Recipients reach the backend their row names.
    """

    @defer.inlineCallbacks
    def test_pipelinedTransactionRepliesInOrder(self):
        """
        A whole transaction in one write gets one reply per command, then one
        per accepted recipient after the final dot, in RCPT order.
        """
        a = FakeBackend(self)
        b = FakeBackend(self)
        proxy = Proxy(self, {}, {"a": a.entry, "b": b.entry}, {"@a.test": "a", "@b.test": "b"})
        client = yield proxy.connect(self)
        client.send(transaction([b"x@a.test", b"y@b.test", b"z@a.test"]))
        replies = yield client.waitReplies(11)
        self.assertEqual(
            [r[:3] for r in replies],
            ["220", "250", "250", "250", "250", "250", "354", "250", "250", "250", "221"],
        )
        self.assertIn("<x@a.test>", replies[7])
        self.assertIn("<y@b.test>", replies[8])
        self.assertIn("<z@a.test>", replies[9])
        self.assertEqual(a.messages, [b"Subject: test\r\n\r\nhello\r\n"])
        self.assertEqual(b.messages, [b"Subject: test\r\n\r\nhello\r\n"])


def twoBackends(testcase, settings=None, unix=False, **kw):
    """
    Backends C{a} (TCP) and C{b} (TCP, or a unix socket) behind a proxy
    routing C{@a.test} and C{@b.test} to them.
    """
    a = FakeBackend(testcase, **kw)
    b = FakeBackend(testcase, unix=unixPath(testcase) if unix else None, **kw)
    proxy = Proxy(
        testcase,
        dict({"hostname": "proxy.test"}, **(settings or {})),
        {"a": a.entry, "b": b.entry},
        {"@a.test": "a", "@b.test": "b"},
    )
    return a, b, proxy


class TransactionTests(unittest.TestCase):
    """
    How client transactions map onto backend transactions.
    """

    @defer.inlineCallbacks
    def test_recipientsShareOneBackendTransaction(self):
        """
        All recipients of one backend go into one backend transaction: one
        MAIL, one RCPT each, one DATA, one message.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        recipients = [b"x@a.test", b"y@b.test", b"z@a.test", b"w@a.test", b"v@b.test"]
        replies = yield exchange(client, transaction(recipients), 1 + 1 + 5 + 1 + 5 + 1)
        self.assertEqual([r[:3] for r in replies[-6:]], ["250"] * 5 + ["221"])
        self.assertEqual(
            a.verbs()[:6], [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
        )
        self.assertEqual(b.verbs()[:5], [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"])
        self.assertEqual((a.connections, b.connections), (1, 1))
        self.assertEqual(a.messages, [BODY])
        self.assertEqual(b.messages, [BODY])

    @defer.inlineCallbacks
    def test_mailAndFirstRcptInOneSegment(self):
        """
        The MAIL and the first RCPT that a client's RCPT causes reach a
        PIPELINING backend in one segment.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO client.test\r\n", 1)
        yield exchange(client, b"MAIL FROM:<s@example.test>\r\n", 1)
        yield exchange(client, b"RCPT TO:<x@a.test>\r\n", 1)
        self.assertIn(b"MAIL FROM:<s@example.test>\r\nRCPT TO:<x@a.test>\r\n", a.received)

    @defer.inlineCallbacks
    def test_heldMessageAndDotInOneSegment(self):
        """
        A short message held until the backend's 354 leaves with its final
        dot in one segment.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO client.test\r\n" + mail([b"x@a.test"]), 5)
        self.assertIn(BODY + b".\r\n", a.received)

    @defer.inlineCallbacks
    def test_severalTransactionsPerConnection(self):
        """
        One client connection can carry several transactions; each one
        reaches its backends.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO client.test\r\n", 1)
        for n in range(3):
            body = b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)
            replies = yield exchange(client, mail([b"x@a.test", b"y@b.test"], body), 6)
            self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "354", "250", "250"])
        self.assertEqual(len(a.messages), 3)
        self.assertEqual(b.messages[2], b"Subject: 2\r\n\r\nbody 2\r\n")

    @defer.inlineCallbacks
    def test_rsetEndsBackendTransaction(self):
        """
        RSET after RCPT ends the backend transaction without DATA; the next
        transaction on the same connection is delivered normally.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRSET\r\n", 4
        )
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "250"])
        yield waitUntil(lambda: b"RSET" in a.verbs() or not a.open)
        self.assertNotIn(b"DATA", a.verbs())
        self.assertEqual(a.messages, [])
        replies = yield exchange(client, mail([b"y@a.test"]), 4)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "354", "250"])
        self.assertEqual(a.messages, [BODY])

    @defer.inlineCallbacks
    def test_backendWithoutPipelining(self):
        """
        A backend that does not offer PIPELINING gets the same transaction,
        one command at a time, and delivers.
        """
        a, b, proxy = twoBackends(self, extensions=("8BITMIME",))
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, transaction([b"x@a.test", b"y@a.test"], quit=False), 7
        )
        self.assertEqual([r[:3] for r in replies[4:]], ["354", "250", "250"])
        self.assertEqual(a.verbs()[:5], [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"])
        self.assertEqual(a.messages, [BODY])

    @defer.inlineCallbacks
    def test_unixAndTcpBackendsInOneTransaction(self):
        """
        A TCP backend and a unix-socket backend serve one transaction, each
        getting the message for its own recipients.
        """
        a, b, proxy = twoBackends(self, unix=True)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@b.test", b"y@a.test"]), 8)
        self.assertIn("<x@b.test>", replies[5])
        self.assertIn("<y@a.test>", replies[6])
        self.assertEqual(a.messages, [BODY])
        self.assertEqual(b.messages, [BODY])
        self.assertIn(b"RCPT TO:<x@b.test>", b.commands)


    @defer.inlineCallbacks
    def test_clientConnectionNoDelay(self):
        """
        Nagle's algorithm is off towards the client: the per-recipient
        replies after the final dot leave as each verdict arrives instead of
        waiting for the client's delayed ACK.
        """
        a, b, proxy = twoBackends(self)
        yield proxy.connect(self)
        [session] = proxy.factory.sessions
        handle = session.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_firstRcptPipelinedWithMail(self):
        """
        Towards a backend that offers PIPELINING, the first RCPT goes out
        with MAIL FROM, before the MAIL reply.
        """
        a, b, proxy = twoBackends(self, {"command_timeout": 0.3})
        a.actions["MAIL"] = a.actions["RCPT"] = "hang"
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3)
        self.assertTrue(replies[2].startswith("451 4.4.2"), replies)
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT"])

    @defer.inlineCallbacks
    def test_mailWaitedForWithoutPipelining(self):
        """
        A backend without PIPELINING gets no RCPT before it answered MAIL.
        """
        a, b, proxy = twoBackends(self, {"command_timeout": 0.3}, extensions=("8BITMIME",))
        a.actions["MAIL"] = a.actions["RCPT"] = "hang"
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3)
        self.assertTrue(replies[2].startswith("451 4.4.2"), replies)
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL"])

    @defer.inlineCallbacks
    def test_mailRefusalRelayedAtRcpt(self):
        """
        A backend that refuses MAIL FROM gives its own reply to each of its
        recipients, not the 503 it answers the pipelined RCPT with.
        """
        a, b, proxy = twoBackends(self)
        a.actions["MAIL"] = b"452 4.3.1 Insufficient system storage\r\n"
        a.actions["RCPT"] = b"503 5.5.1 need MAIL\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<y@b.test>\r\n",
            4,
        )
        self.assertEqual(replies[2], "452 4.3.1 Insufficient system storage")
        self.assertTrue(replies[3].startswith("250"), replies)
        # The RCPT to b went out while a's MAIL was still unanswered; a's
        # connection comes back to the pool once its RSET is answered.
        backend = proxy.config.backends["a"]
        yield waitUntil(lambda: proxy.pool.describe(backend)["pooled"] == 1)


class BackendFaultTests(unittest.TestCase):
    """
    A backend fault becomes a 4xx for that backend's recipients only.
    """

    @defer.inlineCallbacks
    def test_finalReply3xxIsFault(self):
        """
        A 3xx where a recipient's final reply belongs is a backend fault,
        451 4.4.0, never passed on (an MTA bounces any non-4xx failure).
        """
        a, b, proxy = twoBackends(self)
        a.dataReplies[b"x@a.test"] = b"334 what\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 8)
        self.assertTrue(replies[5].startswith("451 4.4.0"), replies[5])
        self.assertEqual([r[:3] for r in replies[6:]], ["250", "221"])

    @defer.inlineCallbacks
    def test_mailReply3xxIsFault(self):
        """
        A 3xx answer to MAIL is a backend fault: the recipient gets 451
        4.4.0, not the 3xx as its RCPT reply.
        """
        a, b, proxy = twoBackends(self)
        a.actions["MAIL"] = b"334 huh\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4.4.0"), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])

    @defer.inlineCallbacks
    def test_deadBackend(self):
        """
        A backend nobody listens for gets its recipients 451 4.4.1 at RCPT;
        the other backend's recipients are delivered.
        """
        b = FakeBackend(self)
        proxy = Proxy(
            self,
            {"connect_timeout": 1},
            {"a": {"host": "127.0.0.1", "port": deadPort()}, "b": b.entry},
            {"@a.test": "a", "@b.test": "b"},
        )
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4.4.1 "), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertEqual(b.messages, [BODY])

    @defer.inlineCallbacks
    def test_rcptHangs(self):
        """
        A backend that never answers RCPT gets its recipient 451 4.4.2 after
        the command timeout; the session goes on.
        """
        a, b, proxy = twoBackends(self, {"command_timeout": 0.2})
        a.actions["RCPT"] = "hang"
        client = yield proxy.connect(self)
        started = reactor.seconds()
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertTrue(replies[2].startswith("451 4.4.2 "), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertEqual(b.messages, [BODY])
        self.assertEqual(a.messages, [])

    @defer.inlineCallbacks
    def test_backend421NotRelayed(self):
        """
        A backend's 421 (it is closing) becomes 451 4.4.2 for its recipient:
        passed on, it would tell the MTA its own session is closing. The
        session goes on.
        """
        a, b, proxy = twoBackends(self)
        a.actions["RCPT"] = b"421 4.3.2 shutting down\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4.4.2"), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])

    @defer.inlineCallbacks
    def test_garbageReply(self):
        """
        A backend answering RCPT with garbage gets its recipient a 451 4.4.x.
        """
        a, b, proxy = twoBackends(self)
        a.actions["RCPT"] = b"what is this\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4.4."), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertEqual(b.messages, [BODY])

    @defer.inlineCallbacks
    def test_closesAtData(self):
        """
        A backend that closes at DATA gets its recipients 451 4.4.2 after
        the final dot; the other backend delivers.
        """
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = "close"
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, transaction([b"x@a.test", b"y@b.test", b"z@a.test"]), 9
        )
        self.assertEqual([r[:3] for r in replies[:6]], ["250", "250", "250", "250", "250", "354"])
        self.assertTrue(replies[6].startswith("451 4.4.2 "), replies[6])
        self.assertTrue(replies[7].startswith("250 "), replies[7])
        self.assertTrue(replies[8].startswith("451 4.4.2 "), replies[8])
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [BODY])

    @defer.inlineCallbacks
    def test_closesMidMessage(self):
        """
        A backend that closes while the message streams gets its recipients
        451 4.4.2; the other backend delivers.
        """
        a, b, proxy = twoBackends(self)
        a.dataAction = "close"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 8)
        self.assertTrue(replies[5].startswith("451 4.4.2 "), replies[5])
        self.assertTrue(replies[6].startswith("250 "), replies[6])
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [BODY])

    @defer.inlineCallbacks
    def test_hangsAfterFinalDot(self):
        """
        A backend silent after the final dot gets its recipients 451 4.4.2
        after the data timeout; the other backend's verdict is relayed.
        """
        a, b, proxy = twoBackends(self, {"data_timeout": 0.3})
        a.dataAction = "hang"
        client = yield proxy.connect(self)
        started = reactor.seconds()
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 8)
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertTrue(replies[5].startswith("451 4.4.2 "), replies[5])
        self.assertTrue(replies[6].startswith("250 "), replies[6])
        self.assertEqual(replies[7][:3], "221")

    @defer.inlineCallbacks
    def test_rcpt451Relayed(self):
        """
        A backend's own 451 at RCPT reaches the client unchanged, for that
        recipient only.
        """
        a, b, proxy = twoBackends(self)
        a.rcptReplies[b"x@a.test"] = b"451 4.2.0 mailbox busy\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"z@a.test"]), 7)
        self.assertEqual(replies[2], "451 4.2.0 mailbox busy")
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertIn("<z@a.test>", replies[5])
        self.assertEqual(a.messages, [BODY])

    @defer.inlineCallbacks
    def test_dataRepliesRelayedPerRecipient(self):
        """
        Per-recipient replies after the final dot (a 452 for one, 250 for
        another) are relayed each to its own recipient, in RCPT order.
        """
        a, b, proxy = twoBackends(self)
        a.dataReplies[b"x@a.test"] = b"452 4.2.2 mailbox full\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, transaction([b"x@a.test", b"y@b.test", b"z@a.test"]), 10
        )
        self.assertEqual(replies[6], "452 4.2.2 mailbox full")
        self.assertIn("<y@b.test>", replies[7])
        self.assertIn("<z@a.test>", replies[8])

    @defer.inlineCallbacks
    def test_noRcpt2xxBeforeBackend(self):
        """
        A recipient gets no reply until its backend answered its RCPT, and
        then gets the backend's reply.
        """
        a, b, proxy = twoBackends(self)
        a.actions["RCPT"] = "hang"
        client = yield proxy.connect(self)
        client.send(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n")
        yield waitUntil(lambda: b"RCPT" in a.verbs())
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(client.codes(), [220, 250, 250])
        (backend,) = a.open
        backend.transport.write(b"250 2.1.5 now\r\n")
        replies = yield client.waitReplies(4)
        self.assertEqual(replies[3], "250 2.1.5 now")

    @defer.inlineCallbacks
    def test_noData2xxBeforeBackend(self):
        """
        After the final dot no recipient gets a 2xx before its backend gave
        one.
        """
        a, b, proxy = twoBackends(self)
        a.dataAction = "hang"
        client = yield proxy.connect(self)
        client.send(transaction([b"x@a.test"], quit=False))
        yield waitUntil(lambda: a.messages)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(client.codes(), [220, 250, 250, 250, 354])
        (backend,) = a.open
        backend.transport.write(b"250 2.0.0 stored at last\r\n")
        replies = yield client.waitReplies(6)
        self.assertEqual(replies[5], "250 2.0.0 stored at last")

    @defer.inlineCallbacks
    def test_sessionSurvivesBackendFault(self):
        """
        After a transaction a backend fault spoiled, the next transaction on
        the same client connection is delivered.
        """
        a, b, proxy = twoBackends(self)
        a.dataAction = "close"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        self.assertTrue(replies[4].startswith("451 "), replies[4])
        a.dataAction = None
        replies = yield exchange(client, mail([b"x@a.test", b"y@b.test"]), 6)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "354", "250", "250"])
        self.assertEqual(a.messages, [BODY])
        self.assertFalse(client.lost.called)


def slowGoAhead(delay):
    """
    A FakeBackend DATA action that answers 354 only after C{delay} seconds;
    a message byte arriving before would be taken for a command.
    """

    def action(backend, line):
        def goAhead():
            backend._answer(b"354 go ahead\r\n")
            backend.inData = True
            backend.data = bytearray()
            backend.setRawMode()

        reactor.callLater(delay, goAhead)

    return action


class EarlyGoAheadTests(unittest.TestCase):
    """
    The client gets 354 at once; what it sends before a backend's own 354
    is held and relayed after it.
    """

    @defer.inlineCallbacks
    def test_354BeforeBackend(self):
        """
        The client's 354 does not wait for the backends' 354.
        """
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = "hang"
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nDATA\r\n", 4)
        self.assertTrue(replies[3].startswith("354"), replies)

    @defer.inlineCallbacks
    def test_heldDataRelayedAfterGoAhead(self):
        """
        A message sent whole before a slow backend's 354 reaches that
        backend byte for byte, after its 354 and never before.
        """
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = slowGoAhead(0.3)
        client = yield proxy.connect(self)
        body = b"Subject: held\r\n\r\n..dot\r\n" + b"x" * 500 + b"\r\n"
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"], body=body), 8)
        self.assertEqual([r[:3] for r in replies[4:]], ["354", "250", "250", "221"])
        self.assertEqual(a.messages, [body])
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_goAheadRefused(self):
        """
        A backend that refuses DATA gives its recipients its own reply after
        the final dot; the other backend delivers.
        """
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = b"452 4.3.1 no room\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 8)
        self.assertEqual(replies[5], "452 4.3.1 no room")
        self.assertTrue(replies[6].startswith("250"), replies)
        self.assertEqual((a.messages, b.messages), ([], [BODY]))

    @defer.inlineCallbacks
    def test_goAheadTimeout(self):
        """
        A backend that never answers DATA costs its recipients 451 4.4.2
        after command_timeout; the other backend delivers.
        """
        a, b, proxy = twoBackends(self, {"command_timeout": 0.3})
        a.actions["DATA"] = "hang"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 8)
        self.assertTrue(replies[5].startswith("451 4.4.2"), replies)
        self.assertTrue(replies[6].startswith("250"), replies)
        self.assertEqual((a.messages, b.messages), ([], [BODY]))

    @defer.inlineCallbacks
    def test_heldDataBounded(self):
        """
        Past MAX_HELD bytes held for a backend that has not said 354, the
        proxy stops reading from the client until it does.
        """
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = slowGoAhead(0.5)
        client = yield proxy.connect(self)
        body = (b"y" * 998 + b"\r\n") * 2000
        client.send(transaction([b"x@a.test"], body=body))
        yield waitUntil(lambda: any(s._pauses for s in proxy.factory.sessions))
        [session] = proxy.factory.sessions
        held = session.delivery.transaction.sessions["a"]._heldSize
        self.assertLess(held, MAX_HELD + 2 * 65536)
        replies = yield client.waitReplies(7)
        self.assertTrue(replies[5].startswith("250"), replies)
        self.assertEqual(a.messages, [body])


class ConnectTimeoutTests(unittest.TestCase):
    """
    A backend that never completes the TCP handshake costs its recipients
    a 4xx after connect_timeout.
    """

    @defer.inlineCallbacks
    def test_connectTimeout(self):
        """
        While a backend's accept queue is full, new connections to it hang;
        after connect_timeout its recipient gets 451 4.4.1 and the other
        backend's recipient is delivered.
        """
        full = socket.socket()
        self.addCleanup(full.close)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
            self.addCleanup(filler.close)
        b = FakeBackend(self)
        proxy = Proxy(
            self,
            {"connect_timeout": 0.5, "command_timeout": 30},
            {"a": {"host": "127.0.0.1", "port": full.getsockname()[1]}, "b": b.entry},
            {"@a.test": "a", "@b.test": "b"},
        )
        client = yield proxy.connect(self)
        started = reactor.seconds()
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4.4.1"), replies[2])
        # Refused at once would also give 4.4.1: the wait shows the timeout.
        self.assertTrue(0.4 <= reactor.seconds() - started < 10, reactor.seconds() - started)
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertEqual(b.messages, [BODY])


class ClientAbortTests(unittest.TestCase):
    """
    A client that leaves mid-message delivers nothing anywhere.
    """

    @defer.inlineCallbacks
    def test_disconnectMidMessage(self):
        """
        Every backend connection is dropped without a final dot: each
        backend has the partial data as aborted and no message.
        """
        a, b, proxy = twoBackends(self, unix=True)
        client = yield proxy.connect(self)
        client.send(
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<y@b.test>\r\n"
            b"DATA\r\nSubject: partial\r\n\r\nfirst line\r\n"
        )

        def streaming(backend):
            return any(bytes(p.data).endswith(b"first line\r\n") for p in backend.open)

        yield waitUntil(lambda: streaming(a) and streaming(b))
        client.transport.abortConnection()
        yield waitUntil(lambda: not a.open and not b.open)
        self.assertEqual(a.aborted, [b"Subject: partial\r\n\r\nfirst line\r\n"])
        self.assertEqual(b.aborted, [b"Subject: partial\r\n\r\nfirst line\r\n"])
        self.assertEqual((a.messages, b.messages), ([], []))


    @defer.inlineCallbacks
    def test_disconnectWhileMailPendingOpensNothing(self):
        """
        A client that leaves while MAIL waits on a pooled backend connection
        does not make the proxy open a new connection for the transaction
        that just ended (the retry is for a pooled connection the backend
        closed).
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"]), 6)
        a.actions["MAIL"] = a.actions["RCPT"] = "hang"
        client = yield proxy.connect(self)
        client.send(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n")
        yield waitUntil(lambda: a.verbs().count(b"MAIL") == 2)
        client.transport.abortConnection()
        yield waitUntil(lambda: not a.open)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(a.connections, 1)

    @defer.inlineCallbacks
    def test_abortLogged(self):
        """
        Each accepted recipient of a message the client abandoned gets one
        log line with status=aborted.
        """
        lines = []
        observer = lambda event: lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        yield exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nDATA\r\n",
            4,
        )
        client.transport.abortConnection()
        yield waitUntil(lambda: not a.open)
        outcomes = [l for l in lines if "to=<x@a.test>" in l]
        self.assertEqual(len(outcomes), 1)
        self.assertIn("status=aborted (connection closed before the end of the message)", outcomes[0])


class TwistdLogFileTests(unittest.TestCase):
    """
    Outcome lines when twistd's text log is the only log observer.
    """

    @defer.inlineCallbacks
    def test_outcomeLinesWrittenByTheProxy(self):
        """
        Each recipient's outcome line is in the log file as the observer
        would write it, but written by the proxy: the observer formats
        one event only, the check that its lines are the proxy's.
        """
        written = StringIO()
        observer = textFileLogObserver(written)
        formatted = []
        original = observer.formatEvent

        def formatEvent(event):
            formatted.append(event)
            return original(event)

        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        self.patch(observer, "formatEvent", formatEvent)
        self.patch(globalLogPublisher, "_observers", [observer])
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test", b"z@a.test"]), 10)
        self.assertEqual([r[:3] for r in replies[6:9]], ["250"] * 3)
        lines = written.getvalue().splitlines()
        self.assertEqual(
            sorted(
                re.sub(r"^\S+ (\[[^]]+\]) \w+: (to=<[^>]+>).*(status=\w+).*", r"\1 \2 \3", line)
                for line in lines
            ),
            [
                "[lmtp_proxy.delivery.Delivery#info] to=<%s> status=sent" % (address,)
                for address in ("x@a.test", "y@b.test", "z@a.test")
            ],
        )
        self.assertEqual(len(formatted), 1)


class ClientLeavesTests(unittest.TestCase):
    """
    A client that leaves (RST) before the final dot gives each recipient
    without a final outcome exactly one C{status=aborted} line, whatever
    its backends were doing: the backend faults that dropping them causes
    are the proxy's own doing, not the backend's.
    """

    @defer.inlineCallbacks
    def leave(self, proxy, data, until):
        client = yield proxy.connect(self)
        client.send(data)
        yield waitUntil(until)
        # SO_LINGER 0: the close is a reset, as an MTA killed mid-session sends.
        client.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.transport.abortConnection()

    def assertAborted(self, lines, address):
        found = outcomesFor(lines, address)
        self.assertEqual(len(found), 1, lines)
        self.assertIn("status=aborted", found[0])

    @defer.inlineCallbacks
    def test_rcptPendingAtBackend(self):
        """
        A RCPT still at a healthy backend when the client resets is logged
        as aborted, not as 451 backend connection lost.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self)
        a.actions["RCPT"] = "hang"
        yield self.leave(
            proxy,
            b"LHLO c\r\nMAIL FROM:<rst@x>\r\nRCPT TO:<alice@a.test>\r\n",
            lambda: b"RCPT" in a.verbs(),
        )
        yield waitUntil(lambda: not a.open)
        yield waitUntil(lambda: outcomesFor(lines, "alice@a.test"))
        self.assertAborted(lines, "alice@a.test")

    @defer.inlineCallbacks
    def test_rcptsPendingAtTwoBackends(self):
        """
        With recipients accepted by one backend and a RCPT still at the
        other, every recipient gets one aborted line.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self)
        b.actions["RCPT"] = "hang"
        yield self.leave(
            proxy,
            b"LHLO c\r\nMAIL FROM:<rst@x>\r\nRCPT TO:<x1@a.test>\r\n"
            b"RCPT TO:<x2@a.test>\r\nRCPT TO:<y@b.test>\r\n",
            lambda: b"RCPT" in b.verbs(),
        )
        yield waitUntil(lambda: not a.open and not b.open)
        yield waitUntil(lambda: len(lines) >= 3)
        for address in ("x1@a.test", "x2@a.test", "y@b.test"):
            self.assertAborted(lines, address)

    @defer.inlineCallbacks
    def test_connectPendingReusesConnection(self):
        """
        A client that leaves while its recipient's backend connection is
        still being set up gets an aborted line, and the new connection
        carries no MAIL.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        a.actions["LHLO"] = lambda backend, line: reactor.callLater(
            0.3, backend._answer, b"250 fake.test\r\n"
        )
        yield self.leave(
            proxy,
            b"LHLO c\r\nMAIL FROM:<rst@x>\r\nRCPT TO:<alice@a.test>\r\n",
            lambda: b"LHLO" in a.verbs(),
        )
        yield waitUntil(lambda: outcomesFor(lines, "alice@a.test"))
        self.assertAborted(lines, "alice@a.test")
        self.assertNotIn(b"MAIL", a.verbs())
        self.assertEqual(len(a.open), 1)

    @defer.inlineCallbacks
    def test_dataBeforeGoAhead(self):
        """
        DATA sent to the backends but not yet answered 354: the recipients
        are logged as aborted.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self)
        a.actions["DATA"] = "hang"
        yield self.leave(
            proxy,
            b"LHLO c\r\nMAIL FROM:<rst@x>\r\nRCPT TO:<x@a.test>\r\n"
            b"RCPT TO:<y@b.test>\r\nDATA\r\nSubject: t\r\n",
            lambda: b"DATA" in a.verbs() and b"DATA" in b.verbs(),
        )
        yield waitUntil(lambda: not a.open and not b.open)
        yield waitUntil(lambda: len(lines) >= 2)
        self.assertAborted(lines, "x@a.test")
        self.assertAborted(lines, "y@b.test")

    @defer.inlineCallbacks
    def test_midMessage(self):
        """
        A client that leaves mid-message: one aborted line per recipient.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self)

        def streaming(backend):
            return any(bytes(p.data).endswith(b"first\r\n") for p in backend.open)

        yield self.leave(
            proxy,
            b"LHLO c\r\nMAIL FROM:<rst@x>\r\nRCPT TO:<x@a.test>\r\n"
            b"RCPT TO:<y@b.test>\r\nDATA\r\nSubject: t\r\n\r\nfirst\r\n",
            lambda: streaming(a) and streaming(b),
        )
        yield waitUntil(lambda: not a.open and not b.open)
        yield waitUntil(lambda: len(lines) >= 2)
        self.assertAborted(lines, "x@a.test")
        self.assertAborted(lines, "y@b.test")

    @defer.inlineCallbacks
    def test_backendFaultBeforeLeavingStaysAFault(self):
        """
        A backend that failed a RCPT before the client left is still logged
        as the fault it was (deferred), and only once.
        """
        lines = outcomeLines(self)
        a, b, proxy = twoBackends(self)
        a.actions["RCPT"] = "close"
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3
        )
        self.assertTrue(replies[-1].startswith("451 4.4.2"), replies)
        client.transport.abortConnection()
        yield task.deferLater(reactor, 0.1, lambda: None)
        found = outcomesFor(lines, "x@a.test")
        self.assertEqual(len(found), 1, lines)
        self.assertIn("status=deferred", found[0])


class ByteExactTests(unittest.TestCase):
    """
    Backends receive exactly the client's dot-stuffed bytes.
    """

    @defer.inlineCallbacks
    def test_bytesUnchanged(self):
        """
        8-bit bytes, dot-stuffed lines, a bare CR mid-line and the header
        order reach the backend as sent; nothing is added.
        """
        body = (
            b"X-Last: 1\r\nReceived: from a\r\nFrom: \xc3\xa9l\xc3\xa8ve <e@x>\r\n"
            b"Subject: caf\xe9 \xff\x80\r\n\r\n..leading dot, stuffed\r\n"
            b"...two\r\nbare\rCR mid-line\r\n\x00nul and tab\t\r\n.\xe9\r\n"
        )
        a, b, proxy = twoBackends(self, unix=True)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"], body), 8)
        self.assertEqual([r[:3] for r in replies[5:]], ["250", "250", "221"])
        self.assertEqual(a.messages, [body])
        self.assertEqual(b.messages, [body])

    @defer.inlineCallbacks
    def test_bytesUnchangedWhenTrickled(self):
        """
        A message that arrives a few bytes at a time, split inside CRLFs,
        dot-stuffing and the final dot, reaches the backend unchanged.
        """
        body = b"Subject: t\r\n\r\n..x\r\n.\r\n..\r\nend\rof\r\n"
        body = body.replace(b".\r\n..", b"..\r\n..")
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        client.transport.setTcpNoDelay(True)
        data = transaction([b"x@a.test"], body)
        for i in range(0, len(data), 3):
            client.send(data[i : i + 3])
            yield task.deferLater(reactor, 0.002, lambda: None)
        replies = yield client.waitReplies(7)
        self.assertEqual([r[:3] for r in replies[5:]], ["250", "221"])
        self.assertEqual(a.messages, [body])

    @defer.inlineCallbacks
    def test_noHeaderGuessing(self):
        """
        A message whose first line has no colon gets no blank line or
        header inserted (unlike Twisted's SMTP server).
        """
        body = b"no colon on this first line\r\nsecond\r\n"
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], body), 6)
        self.assertEqual(a.messages, [body])

    @defer.inlineCallbacks
    def test_emptyMessage(self):
        """
        An empty message (the final dot right after 354) arrives empty.
        """
        a, b, proxy = twoBackends(self)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"], b""), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertEqual(a.messages, [b""])

    @defer.inlineCallbacks
    def test_largeMessage(self):
        """
        A 5 MB message with dot-stuffed lines and 8-bit bytes reaches a TCP
        and a unix-socket backend byte for byte.
        """
        line = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
        lines = [b"Subject: big\r\n", b"\r\n"]
        n = total = 0
        while total < 5 * 1024 * 1024:
            prefix = b".." if n % 7 == 0 else b""
            lines.append(prefix + line[n % 50 :] + b"\r\n")
            total += len(lines[-1])
            n += 1
        body = b"".join(lines)
        a, b, proxy = twoBackends(self, unix=True)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"], body), 8)
        self.assertEqual([r[:3] for r in replies[5:]], ["250", "250", "221"])
        self.assertTrue(a.messages[0] == body, "message differs on a")
        self.assertTrue(b.messages[0] == body, "message differs on b")


class RefusedMessageTests(unittest.TestCase):
    """
    A message the proxy refuses gets one 5xx per recipient and is never
    completed on any backend.
    """

    @defer.inlineCallbacks
    def assertRefused(self, body, code, settings=None):
        a, b, proxy = twoBackends(self, settings)
        client = yield proxy.connect(self)
        client.send(transaction([b"x@a.test", b"y@b.test"], body, quit=False))
        replies = yield client.waitReplies(8)
        self.assertEqual([r[:3] for r in replies[:6]], ["220", "250", "250", "250", "250", "354"])
        self.assertEqual([r[:3] for r in replies[6:]], [code, code])
        yield waitUntil(lambda: not a.open and not b.open)
        self.assertEqual((a.messages, b.messages), ([], []))
        self.assertNotIn(b"QUIT", a.verbs())
        # The session goes on.
        replies = yield exchange(client, b"NOOP\r\n", 1)
        self.assertEqual(replies[0][:3], "250")

    def test_smuggling(self):
        """
        A lone dot framed by bare LFs (SMTP smuggling) is refused with 554.
        """
        return self.assertRefused(
            b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\nmore\r\n", "554"
        )

    def test_bareLF(self):
        """
        A bare LF anywhere in the message is refused with 554.
        """
        return self.assertRefused(b"Subject: x\n\r\nhello\r\n", "554")

    def test_dotFramedByBareCR(self):
        """
        A dot between CRs (CR.CR) is refused with 554.
        """
        return self.assertRefused(b"Subject: x\r\n\r\nhi\r.\rbye\r\n", "554")

    def test_lineTooLong(self):
        """
        A line longer than max_line_length is refused with 554.
        """
        return self.assertRefused(
            b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\nend\r\n",
            "554",
            {"max_line_length": 1000},
        )

    def test_messageTooBig(self):
        """
        A message over max_message_size is refused with 552.
        """
        return self.assertRefused(
            b"Subject: x\r\n\r\n" + (b"z" * 98 + b"\r\n") * 500,
            "552",
            {"max_message_size": 10000},
        )


class ParameterTests(unittest.TestCase):
    """
    MAIL and RCPT parameters reach a backend only with the extension that
    defines them.
    """

    @defer.inlineCallbacks
    def test_forwardedByExtension(self):
        """
        A backend offering SIZE, 8BITMIME, SMTPUTF8 and DSN gets every
        parameter as sent; one offering none gets none; one offering SIZE
        and 8BITMIME gets just those.
        """
        full = FakeBackend(self, extensions=("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN"))
        bare = FakeBackend(self, extensions=("PIPELINING",))
        some = FakeBackend(self, unix=unixPath(self), extensions=("SIZE 100000", "8BITMIME"))
        proxy = Proxy(
            self,
            {},
            {"full": full.entry, "bare": bare.entry, "some": some.entry},
            {"@full.test": "full", "@bare.test": "bare", "@some.test": "some"},
        )
        client = yield proxy.connect(self)
        mailParams = b" SIZE=22 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159"
        rcptParams = b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig@full.test"
        data = b"LHLO c\r\n" + mail(
            [b"x@full.test", b"y@bare.test", b"z@some.test"],
            mailParams=mailParams,
            rcptParams=rcptParams,
        )
        replies = yield exchange(client, data, 9)
        self.assertEqual([r[:3] for r in replies], ["250"] * 5 + ["354"] + ["250"] * 3)
        yield waitUntil(lambda: len(some.messages) == 1)
        self.assertIn(b"MAIL FROM:<s@example.test>" + mailParams, full.commands)
        self.assertIn(b"RCPT TO:<x@full.test>" + rcptParams, full.commands)
        self.assertIn(b"MAIL FROM:<s@example.test>", bare.commands)
        self.assertIn(b"RCPT TO:<y@bare.test>", bare.commands)
        self.assertIn(b"MAIL FROM:<s@example.test> SIZE=22 BODY=8BITMIME", some.commands)
        self.assertIn(b"RCPT TO:<z@some.test>", some.commands)


class RoutingTests(unittest.TestCase):
    """
    Routing outcomes as the client sees them.
    """

    def proxyWith(self, users, settings=None):
        a = FakeBackend(self)
        proxy = Proxy(self, settings or {}, {"a": a.entry}, users)
        return a, proxy

    @defer.inlineCallbacks
    def test_rejectRow(self):
        """
        A recipient routed to C{reject} gets 451 4.2.1 at RCPT.
        """
        a, proxy = self.proxyWith({"bad@a.test": "reject", "@a.test": "a"})
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bad@a.test>\r\n", 3
        )
        self.assertTrue(replies[2].startswith("451 4.2.1 "), replies[2])
        self.assertEqual(a.connections, 0)

    @defer.inlineCallbacks
    def test_noRoute(self):
        """
        A recipient no row matches, without a fallback, gets 550 5.1.1.
        """
        a, proxy = self.proxyWith({"@a.test": "a"})
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<who@else.test>\r\n", 3
        )
        self.assertTrue(replies[2].startswith("550 5.1.1 "), replies[2])

    @defer.inlineCallbacks
    def test_fallback(self):
        """
        With a fallback backend an unknown recipient goes there.
        """
        a, proxy = self.proxyWith({}, {"fallback_backend": "a"})
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"who@else.test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertIn(b"RCPT TO:<who@else.test>", a.commands)

    @defer.inlineCallbacks
    def test_detailIgnoredForLookupButForwarded(self):
        """
        C{bob+tag@a.test} routes by C{bob@a.test} and reaches the backend
        with its +tag unchanged.
        """
        a, proxy = self.proxyWith({"bob@a.test": "a"})
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"bob+Tag.1@a.test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertIn(b"RCPT TO:<bob+Tag.1@a.test>", a.commands)

    @defer.inlineCallbacks
    def test_caseInsensitiveLookup(self):
        """
        The lookup ignores case; the address is forwarded as written.
        """
        a, proxy = self.proxyWith({"bob@a.test": "a"})
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"BoB@A.Test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertIn(b"RCPT TO:<BoB@A.Test>", a.commands)


class AuthTests(unittest.TestCase):
    """
    Backends with credentials.
    """

    def captureLog(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def assertNoSecrets(self, events):
        self.assertTrue(events)
        for event in events:
            for text in (formatEvent(event) or "", repr(event)):
                self.assertNotIn(PASSWORD, text)
                self.assertNotIn(PLAIN_TOKEN.decode(), text)

    def authProxy(self, refuse=False):
        a = FakeBackend(self, extensions=("PIPELINING", "AUTH PLAIN LOGIN"))
        if refuse:
            a.actions["AUTH"] = b"535 5.7.8 Authentication credentials invalid\r\n"
        b = FakeBackend(self)
        proxy = Proxy(
            self,
            {},
            {"a": dict(a.entry, user=USER, password=PASSWORD), "b": b.entry},
            {"@a.test": "a", "@b.test": "b"},
        )
        return a, b, proxy

    @defer.inlineCallbacks
    def test_authSentAndNotLogged(self):
        """
        The backend gets AUTH PLAIN before MAIL; the logs of the delivery
        hold no credential.
        """
        events = self.captureLog()
        a, b, proxy = self.authProxy()
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertEqual(a.commands[:3], [b"LHLO " + proxy.config.hostname.encode(), b"AUTH PLAIN " + PLAIN_TOKEN, b"MAIL FROM:<s@example.test>"])
        self.assertNoSecrets(events)

    @defer.inlineCallbacks
    def test_authRefused(self):
        """
        A backend refusing our credentials gets its recipients a 451 at
        RCPT, the others are delivered, and no log event holds the password.
        """
        events = self.captureLog()
        a, b, proxy = self.authProxy(refuse=True)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test", b"y@b.test"]), 7)
        self.assertTrue(replies[2].startswith("451 4."), replies[2])
        self.assertEqual([r[:3] for r in replies[3:]], ["250", "354", "250", "221"])
        self.assertEqual(b.messages, [BODY])
        self.assertNotIn(b"MAIL", a.verbs())
        self.assertNoSecrets(events)


def closeAtNextMail(backend):
    """
    Have the L{FakeBackend} C{backend} drop the connection the next MAIL
    arrives on, and answer every MAIL after it.

    @return: the list that gets the MAIL line it dropped the connection at.
    """
    closed = []

    def closeOnce(connection, line):
        if closed:
            connection.transport.write(b"250 2.1.0 Ok\r\n")
        else:
            closed.append(line)
            connection.transport.loseConnection()

    backend.actions["MAIL"] = closeOnce
    return closed


class PipelinedRcptTests(unittest.TestCase):
    """
    RCPTs a client pipelines reach their backends without waiting for the
    replies before them; each backend still gets its first RCPT behind MAIL
    alone, and the client its replies in RCPT order.
    """

    def raiseAtLine(self, count):
        """
        Make the C{count}th MAIL or RCPT line that backend sessions write
        from now on raise.
        """
        real, calls = delivery._forwarded, []

        def forwarded(params, client):
            calls.append(params)
            if len(calls) == count:
                raise RuntimeError("line %d not written" % (count,))
            return real(params, client)

        self.patch(delivery, "_forwarded", forwarded)

    @defer.inlineCallbacks
    def pooledSession(self, settings):
        """
        A proxy of two backends with C{settings} and a client session whose
        first transaction left one idle connection to backend a.

        @return: a L{Deferred} firing with backends a and b, the proxy and
            the client.
        """
        a, b, proxy = twoBackends(self, dict(settings, pool_size=1))
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        backend = proxy.config.backends["a"]
        yield waitUntil(lambda: proxy.pool.describe(backend)["pooled"] == 1)
        return a, b, proxy, client

    def holdFirstRcpt(self, backend):
        """
        Leave the first RCPT C{backend} gets unanswered; return the list
        that gets its connection.
        """
        held = []

        def hold(connection, line):
            held.append(connection)
            del backend.actions["RCPT"]

        backend.actions["RCPT"] = hold
        return held

    @defer.inlineCallbacks
    def pipelineBehindHeldRcpt(self, second):
        """
        Pipeline LHLO, MAIL, a RCPT for backend a, which leaves it
        unanswered, and a RCPT for C{second}, through a proxy of two
        backends.

        @return: a L{Deferred} firing with backends a and b, the client,
            the list that gets a's connection once it has the RCPT, and a
            L{Deferred} of the four replies.
        """
        a, b, proxy = twoBackends(self)
        held = self.holdFirstRcpt(a)
        client = yield proxy.connect(self)
        pending = exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<%s>\r\n" % (second,),
            4,
        )
        return a, b, client, held, pending

    @defer.inlineCallbacks
    def test_backendsGetTheirRcptsAtOnce(self):
        """
        A RCPT for a second backend goes out while the first backend has
        not answered the RCPT before it.
        """
        a, b, client, held, pending = yield self.pipelineBehindHeldRcpt(b"y@b.test")
        yield waitUntil(lambda: b"RCPT" in b.verbs() and held)
        self.assertEqual(client.codes(), [220, 250, 250])
        held[0].transport.write(b"250 2.1.5 Ok\r\n")
        replies = yield pending
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "250"])

    @defer.inlineCallbacks
    def test_sameBackendRcptWaitsForTheFirst(self):
        """
        A RCPT for a backend whose first RCPT is unanswered goes out once
        that one is answered, on the same connection and transaction.
        """
        a, b, client, held, pending = yield self.pipelineBehindHeldRcpt(b"z@a.test")
        yield waitUntil(lambda: held)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT"])
        held[0].transport.write(b"250 2.1.5 Ok\r\n")
        replies = yield pending
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "250"])
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT", b"RCPT"])
        self.assertEqual(a.connections, 1)

    @defer.inlineCallbacks
    def test_rcptsBehindARetriedFirst(self):
        """
        Pipelined RCPTs behind a first one whose pooled connection turns
        out dead follow it to the new connection: every recipient gets the
        message there, and the client sees no 4xx.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        closed = closeAtNextMail(a)
        replies = yield exchange(client, mail([b"x@a.test", b"z@a.test"]), 6)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "354", "250", "250"])
        self.assertEqual(closed, [b"MAIL FROM:<s@example.test>"])
        self.assertEqual(a.connections, 2)
        self.assertEqual(len(a.messages), 2)
        self.assertEqual(a.verbs()[-4:], [b"MAIL", b"RCPT", b"RCPT", b"DATA"])


    @defer.inlineCallbacks
    def test_rcptBehindTheFirstRaising(self):
        """
        A RCPT that raises when it is sent behind the first gets 451, and
        the RCPTs queued after it still go out and get their replies.
        """
        # MAIL, the first RCPT, then the first queued behind it.
        self.raiseAtLine(3)
        a, b, proxy = twoBackends(self)
        held = self.holdFirstRcpt(a)
        client = yield proxy.connect(self)
        pending = exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n"
            b"RCPT TO:<z@a.test>\r\nRCPT TO:<w@a.test>\r\n",
            5,
        )
        yield waitUntil(lambda: held)
        held[0].transport.write(b"250 2.1.5 Ok\r\n")
        replies = yield pending
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250", "451", "250"])
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT", b"RCPT"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    test_rcptBehindTheFirstRaising.timeout = 10

    @defer.inlineCallbacks
    def test_rcptsBehindAFirstWithoutReply(self):
        """
        When the first RCPT for a backend, sent on a pooled connection, gets
        no reply in time, the RCPT pipelined behind it gets 451 too, and the
        recipient of the other backend, between them, still gets its
        message.
        """
        a, b, proxy, client = yield self.pooledSession({"command_timeout": 0.3})
        a.actions["RCPT"] = "hang"
        replies = yield exchange(
            client,
            b"MAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<y@b.test>\r\n"
            b"RCPT TO:<z@a.test>\r\nDATA\r\nhi\r\n.\r\n",
            6,
        )
        self.assertEqual([r[:3] for r in replies], ["250", "451", "250", "451", "354", "250"])
        self.assertEqual(a.verbs().count(b"RCPT"), 2)
        self.assertEqual((a.messages, b.messages), ([BODY], [b"hi\r\n"]))

    test_rcptsBehindAFirstWithoutReply.timeout = 10


    @defer.inlineCallbacks
    def test_firstRcptRaisingOnANewConnection(self):
        """
        When the first RCPT for a backend raises as it is sent on a new
        connection, it and the RCPT pipelined behind it get 451: the one
        behind is not sent behind a MAIL that never went out (which a
        backend would refuse with a 503, passed on as a bounce).
        """
        a, b, proxy = twoBackends(self)
        self.raiseAtLine(1)
        client = yield proxy.connect(self)
        replies = yield exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<z@a.test>\r\n",
            4,
        )
        self.assertEqual([r[:3] for r in replies], ["250", "250", "451", "451"])
        self.assertNotIn(b"RCPT", a.verbs())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    test_firstRcptRaisingOnANewConnection.timeout = 10

    @defer.inlineCallbacks
    def test_firstRcptRaisingOnAPooledConnection(self):
        """
        When the first RCPT for a backend raises as it is sent on an idle
        pooled connection, it and the RCPT after it get 451, instead of the
        second waiting for ever behind the first.
        """
        a, b, proxy, client = yield self.pooledSession({})
        self.raiseAtLine(1)
        replies = yield exchange(
            client, b"MAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<z@a.test>\r\n", 3
        )
        self.assertEqual([r[:3] for r in replies], ["250", "451", "451"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    test_firstRcptRaisingOnAPooledConnection.timeout = 10

    @defer.inlineCallbacks
    def test_rcptBehindADroppedFirstOpensNothing(self):
        """
        When the client leaves while the first RCPT for a backend still
        waits for its connection, the RCPT pipelined behind it takes or
        opens no connection.
        """
        a, b, proxy = twoBackends(self)
        a.greeting = None
        client = yield proxy.connect(self)
        client.send(
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<z@a.test>\r\n"
        )
        yield waitUntil(lambda: a.open)
        client.transport.abortConnection()
        yield waitUntil(lambda: not proxy.factory.sessions)
        for connection in list(a.open):
            connection.transport.write(b"220 fake.test LMTP ready\r\n")
        yield waitUntil(lambda: b"LHLO" in a.verbs())
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(a.connections, 1)
        self.assertEqual(a.verbs(), [b"LHLO"])


class PoolTests(unittest.TestCase):
    """
    Backend connections reused when pool_size allows it.
    """

    @defer.inlineCallbacks
    def test_reused(self):
        """
        With pool_size 1 a second transaction, even from another client
        connection, reuses the backend connection.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        for n in range(2):
            client = yield proxy.connect(self)
            replies = yield exchange(client, transaction([b"x@a.test"]), 6)
            self.assertEqual(replies[4][:3], "250")
        self.assertEqual(a.connections, 1)
        self.assertEqual(a.verbs().count(b"LHLO"), 1)
        self.assertEqual(len(a.messages), 2)
        self.assertNotIn(b"QUIT", a.verbs())

    @defer.inlineCallbacks
    def test_strayReplyNeverAnswersNextTransaction(self):
        """
        A backend that sends one reply too many after the final dot is not
        reused: the stray line must not become the answer to the next
        (pipelined) transaction's MAIL, shifting every later reply.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        a.dataReplies[b"x@a.test"] = b"250 2.0.0 saved\r\n250 2.0.0 stray\r\n"
        a.rcptReplies[b"y@a.test"] = b"550 5.1.1 unknown\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(
            client,
            b"LHLO c\r\n" + mail([b"x@a.test"]) + mail([b"y@a.test", b"z@a.test"]),
            1 + 4 + 5,
        )
        self.assertEqual(
            [r[:3] for r in replies[1:]],
            ["250", "250", "354", "250", "250", "550", "250", "354", "250"],
        )

    @defer.inlineCallbacks
    def test_rsetConnectionReused(self):
        """
        A backend transaction ended by the client's RSET goes back to the
        pool once the backend answered RSET, and the next transaction uses it.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\nRSET\r\n", 4)
        yield waitUntil(lambda: b"RSET" in a.verbs())
        yield task.deferLater(reactor, 0.05, lambda: None)
        replies = yield exchange(client, mail([b"x@a.test"]), 4)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "354", "250"])
        self.assertEqual(a.connections, 1)
        self.assertEqual(a.verbs(), [b"LHLO", b"MAIL", b"RCPT", b"RSET", b"MAIL", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_closedWhileIdleReplaced(self):
        """
        A pooled connection the backend closed while idle is replaced by a
        new one: the client sees no 4xx.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        yield waitUntil(lambda: len(a.open) == 1)
        for connection in list(a.open):
            connection.transport.loseConnection()
        yield waitUntil(lambda: not a.open)
        replies = yield exchange(client, mail([b"x@a.test"]), 4)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "354", "250"])
        self.assertEqual(a.connections, 2)
        self.assertEqual(len(a.messages), 2)

    @defer.inlineCallbacks
    def test_closedAtMailReplaced(self):
        """
        A pooled connection that turns out dead only when MAIL is sent on it
        is replaced by a new one: the client sees no 4xx.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        closed = closeAtNextMail(a)
        replies = yield exchange(client, mail([b"x@a.test"]), 4)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "354", "250"])
        self.assertEqual(closed, [b"MAIL FROM:<s@example.test>"])
        self.assertEqual(a.connections, 2)
        self.assertEqual(len(a.messages), 2)

    @defer.inlineCallbacks
    def test_secondDeadPooledNotRetried(self):
        """
        A pooled connection found dead at MAIL earns one more try, not two:
        when the connection taken instead is a pooled one found dead too,
        the recipient gets a 4xx.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 2})
        first = yield proxy.connect(self)
        second = yield proxy.connect(self)
        # Two connections, both idle in the pool afterwards.
        yield exchange(first, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3)
        yield exchange(second, transaction([b"y@a.test"], quit=False), 5)
        yield exchange(first, b"DATA\r\n" + BODY + b".\r\n", 2)
        yield task.deferLater(reactor, 0.05, lambda: None)
        closed = []

        def closeTwice(backend, line):
            if len(closed) < 2:
                closed.append(line)
                backend.transport.loseConnection()
            else:
                backend.transport.write(b"250 2.1.0 Ok\r\n")

        a.actions["MAIL"] = closeTwice
        replies = yield exchange(first, b"MAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 2)
        self.assertEqual(replies[1][:4], "451 ", replies)
        self.assertEqual(len(closed), 2)
        self.assertEqual(a.connections, 2)

    @defer.inlineCallbacks
    def test_fencedTransactionTakesNoPooledConnection(self):
        """
        A transaction fenced at RCPT sends its backends nothing more, even
        when the fence lifts before its next RCPT and an idle pooled
        connection is at hand: that recipient gets 451.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 2})
        first = yield proxy.connect(self)
        second = yield proxy.connect(self)
        yield exchange(first, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<x@a.test>\r\n", 3)
        yield exchange(second, transaction([b"y@a.test"], quit=False), 5)
        yield task.deferLater(reactor, 0.05, lambda: None)
        proxy.state.fence("lease expired")
        proxy.state.unfence()
        replies = yield exchange(first, b"RCPT TO:<z@a.test>\r\n", 1)
        self.assertEqual(replies[0][:4], "451 ", replies)
        self.assertEqual(a.verbs().count(b"MAIL"), 2)

    @defer.inlineCallbacks
    def test_noPoolQuits(self):
        """
        With pool_size 0 every backend transaction ends with QUIT and the
        next one opens a new connection.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 0})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        yield waitUntil(lambda: not a.open)
        self.assertEqual(a.verbs()[-1], b"QUIT")
        yield exchange(client, mail([b"x@a.test"]), 4)
        yield waitUntil(lambda: not a.open)
        self.assertEqual(a.connections, 2)
        self.assertEqual(a.verbs().count(b"QUIT"), 2)

    @defer.inlineCallbacks
    def test_idleTimeoutQuits(self):
        """
        A pooled connection unused for pool_idle_timeout gets QUIT.
        """
        a, b, proxy = twoBackends(self, {"pool_size": 1, "pool_idle_timeout": 0.2})
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"x@a.test"], quit=False), 5)
        self.assertNotIn(b"QUIT", a.verbs())
        yield waitUntil(lambda: not a.open)
        self.assertEqual(a.verbs()[-1], b"QUIT")


class BackpressureTests(unittest.TestCase):
    """
    A backend that stops reading slows the client down instead of filling
    the proxy's memory, and is dropped when it stays stuck.
    """

    def countReads(self, proxy):
        (session,) = proxy.factory.sessions
        counted = [0]
        original = session.dataReceived

        def dataReceived(data):
            counted[0] += len(data)
            original(data)

        session.dataReceived = dataReceived
        return session, counted

    @defer.inlineCallbacks
    def test_stuckBackendPausesClientThenDropped(self):
        """
        While a backend does not read, the proxy stops reading the client
        (it holds far less than the message); once the backend has been
        stuck for command_timeout, its recipient gets 451 4.4.2 and the
        other backend still gets the whole message.
        """
        size = 8 * 1024 * 1024
        body = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * (size // 1024)
        stuck = FakeBackend(self, unix=unixPath(self))
        stuck.dataAction = "pause"
        good = FakeBackend(self)
        proxy = Proxy(
            self,
            {"command_timeout": 0.5},
            {"stuck": stuck.entry, "good": good.entry},
            {"@stuck.test": "stuck", "@good.test": "good"},
        )
        client = yield proxy.connect(self)
        session, counted = self.countReads(proxy)
        client.send(transaction([b"x@stuck.test", b"y@good.test"], body, quit=False))
        yield waitUntil(lambda: session.transport not in reactor.getReaders())
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertNotIn(session.transport, reactor.getReaders())
        self.assertLess(counted[0], size // 8)
        replies = yield client.waitReplies(8)
        self.assertTrue(replies[6].startswith("451 4.4.2 "), replies[6])
        self.assertTrue(replies[7].startswith("250 "), replies[7])
        self.assertEqual(good.messages, [body])
        self.assertEqual(stuck.messages, [])

    @defer.inlineCallbacks
    def test_slowBackendCatchesUp(self):
        """
        A backend that pauses for less than command_timeout and then reads
        on gets the whole message; nobody gets a 4xx.
        """
        body = b"Subject: big\r\n\r\n" + (b"y" * 1022 + b"\r\n") * 8192
        slow = FakeBackend(self, unix=unixPath(self))
        slow.dataAction = "pause"
        proxy = Proxy(self, {"command_timeout": 2.0}, {"slow": slow.entry}, {"@slow.test": "slow"})
        client = yield proxy.connect(self)
        session, counted = self.countReads(proxy)
        client.send(transaction([b"x@slow.test"], body, quit=False))
        yield waitUntil(lambda: session.transport not in reactor.getReaders())
        yield task.deferLater(reactor, 0.2, lambda: None)
        (backend,) = slow.open
        backend.transport.resumeProducing()
        replies = yield client.waitReplies(6)
        self.assertEqual(replies[5][:3], "250")
        self.assertEqual(slow.messages, [body])
