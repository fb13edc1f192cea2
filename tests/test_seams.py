"""
The declared seams (L{lmtp_proxy.interfaces}): every provider verified with
C{verifyObject}, and the router's behaviour as an L{IMessageDelivery}
against a fake backend over loopback.
"""

from twisted.cred.credentials import Anonymous
from twisted.cred.portal import IRealm
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from lmtp_proxy import config as configuration
from lmtp_proxy.delivery import AcceptedRecipient, Delivery, RecipientRefused, Transaction
from lmtp_proxy.envelope import Path, Recipient
from lmtp_proxy.interfaces import (
    ILMTPDelivery,
    IMessage,
    IMessageDelivery,
    IMessageStream,
    IRoutingSource,
    ITransaction,
)
from lmtp_proxy.pool import BackendPool
from lmtp_proxy.reply import reply
from lmtp_proxy.router import LMTPRealm, Router, deliveryPortal
from lmtp_proxy.routing import Route, RoutingTable
from lmtp_proxy.server import _LineFeeder
from lmtp_proxy.state import ProxyState

from tests.support import FakeBackend, outcomeLines, waitUntil


def routerFor(testcase, backend, users=None):
    """
    A L{Router} over a real L{Delivery} whose one backend C{a} is
    C{backend}.
    """
    document = {
        "config": {"socket": ["127.0.0.1", 1], "hostname": "proxy.test"},
        "backends": {"a": backend.entry},
        "users": users or {"@a.test": "a", "carol@a.test": "reject"},
    }
    import yaml

    state = ProxyState(configuration.parse(yaml.safe_dump(document), "<test>"))
    pool = BackendPool(reactor)
    testcase.addCleanup(pool.closeIdle)
    router = Router(Delivery(reactor, state, pool), "192.0.2.1:4000")
    testcase.addCleanup(router.abortTransaction, "test over")
    return router, state


def sender(address=b"s@example.test"):
    return Path(address, address.decode("utf-8"), [])


def recipient(address, params=()):
    text = address.decode("utf-8")
    return Recipient(Path(address, text, list(params)), (b"c", b"192.0.2.1"), None, sender())


class InterfaceTests(unittest.TestCase):
    """
    Every seam's provider provides its interface.
    """

    def setUp(self):
        self.backend = FakeBackend(self)
        self.router, self.state = routerFor(self, self.backend)

    def test_routerIsAnIMessageDelivery(self):
        """
        The router provides twisted.mail's L{IMessageDelivery}.
        """
        self.assertTrue(verifyObject(IMessageDelivery, self.router))

    def test_routerIsAnILMTPDelivery(self):
        """
        The router provides L{ILMTPDelivery}, so the server tells it when a
        transaction ends without its message.
        """
        self.assertTrue(verifyObject(ILMTPDelivery, self.router))

    def test_realm(self):
        """
        L{LMTPRealm} provides L{IRealm} and hands out a L{Router} for
        L{IMessageDelivery}, with the mind as its client.
        """
        realm = LMTPRealm(self.router.delivery)
        self.assertTrue(verifyObject(IRealm, realm))
        interface, avatar, logout = realm.requestAvatar(None, "unix", IMessageDelivery)
        self.assertIs(interface, IMessageDelivery)
        self.assertIsInstance(avatar, Router)
        self.assertEqual(avatar.client, "unix")

    def test_anonymousLogin(self):
        """
        The portal lets any client in anonymously, with a router as avatar.
        """
        portal = deliveryPortal(self.router.delivery)
        login = portal.login(Anonymous(), "127.0.0.1:5", IMessageDelivery)
        _, avatar, _ = self.successResultOf(login)
        self.assertIsInstance(avatar, Router)

    def test_routingTable(self):
        """
        The YAML routing table provides L{IRoutingSource}.
        """
        self.assertTrue(verifyObject(IRoutingSource, self.state.table))

    def test_transaction(self):
        """
        L{Transaction} provides L{ITransaction}.
        """
        transaction = self.router.validateFrom((b"c", b"h"), sender()) and self.router.transaction
        self.assertIsInstance(transaction, Transaction)
        self.assertTrue(verifyObject(ITransaction, transaction))

    def test_acceptedRecipient(self):
        """
        L{AcceptedRecipient} provides L{IMessageStream} (and so
        L{IMessage}).
        """
        self.router.validateFrom((b"c", b"h"), sender())
        accepted = AcceptedRecipient(
            b"x@a.test", Route("a", "@a.test", "domain"), self.router.transaction, reply(250, "2.1.5 Ok")
        )
        self.assertTrue(verifyObject(IMessageStream, accepted))
        self.assertTrue(verifyObject(IMessage, accepted))

    def test_lineFeeder(self):
        """
        The server's line feeder for plain twisted.mail messages provides
        L{ITransaction}.
        """
        self.assertTrue(verifyObject(ITransaction, _LineFeeder([])))


class RouterTests(unittest.TestCase):
    """
    The router's C{validateTo} fires when the backend answered its RCPT.
    """

    def setUp(self):
        self.backend = FakeBackend(self)
        self.router, self.state = routerFor(self, self.backend)
        self.router.validateFrom((b"c", b"h"), sender())

    @defer.inlineCallbacks
    def test_acceptedGivesMessageBuilder(self):
        """
        An accepted recipient's Deferred fires with a builder whose message
        carries the backend's own RCPT reply.
        """
        builder = yield self.router.validateTo(recipient(b"x@a.test"))
        message = builder()
        self.assertTrue(IMessageStream.providedBy(message))
        self.assertEqual(message.rcptReply, reply(250, "2.1.5 Ok"))

    @defer.inlineCallbacks
    def test_backendRefusalKeepsCodeAndText(self):
        """
        A recipient the backend refuses fails the Deferred with
        L{RecipientRefused}, carrying the backend's code and text.
        """
        self.backend.rcptReplies[b"nobody@a.test"] = b"550 5.1.1 <nobody@a.test> unknown\r\n"
        error = yield self.assertFailure(
            self.router.validateTo(recipient(b"nobody@a.test")), RecipientRefused
        )
        self.assertEqual(error.code, 550)
        self.assertEqual(error.resp, "5.1.1 <nobody@a.test> unknown")

    def test_rejectRaisesAtOnce(self):
        """
        A recipient routed to C{reject} is refused at once with 451 4.2.1,
        as an L{smtp.SMTPBadRcpt}, without a backend connection.
        """
        error = self.assertRaises(
            RecipientRefused, self.router.validateTo, recipient(b"carol@a.test")
        )
        self.assertEqual(error.code, 451)
        self.assertTrue(error.resp.startswith("4.2.1 "))
        self.assertEqual(self.backend.connections, 0)

    @defer.inlineCallbacks
    def test_eomReceivedIsTheRecipientsVerdict(self):
        """
        Each recipient's message gives its own reply from C{eomReceived}
        once the transaction's data ended.
        """
        self.backend.dataReplies[b"y@a.test"] = b"452 4.2.2 <y@a.test> full\r\n"
        first = (yield self.router.validateTo(recipient(b"x@a.test")))()
        second = (yield self.router.validateTo(recipient(b"y@a.test")))()
        transaction = first.transaction
        self.assertIs(second.transaction, transaction)
        transaction.startData(lambda reason: None, lambda reason: None)
        transaction.write(b"Subject: t\r\n\r\nhi\r\n")
        transaction.endData()
        verdicts = yield defer.gatherResults([first.eomReceived(), second.eomReceived()])
        self.assertEqual([v.code for v in verdicts], [250, 452])
        self.assertEqual(self.backend.messages, [b"Subject: t\r\n\r\nhi\r\n"])
        # The connection goes back to the pool on the next turn.
        yield task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def test_abortTransactionDeliversNothing(self):
        """
        C{abortTransaction} drops the backend transaction: the backend has
        no message and sees its connection closed.
        """
        message = (yield self.router.validateTo(recipient(b"x@a.test")))()
        message.transaction.startData(lambda reason: None, lambda reason: None)
        message.transaction.write(b"Subject: t\r\n")
        self.router.abortTransaction("test")
        yield waitUntil(lambda: not self.backend.open)
        self.assertEqual(self.backend.messages, [])

    @defer.inlineCallbacks
    def test_deferredRoutingSource(self):
        """
        A routing source may answer with a L{Deferred}; the RCPT goes out
        once it fires.
        """
        table = self.state.table
        pending = defer.Deferred()

        class Later:
            def route(self, address):
                return pending.addCallback(lambda _: table.route(address))

        self.state.table = Later()
        d = self.router.validateTo(recipient(b"x@a.test"))
        self.assertNoResult(d)
        pending.callback(None)
        builder = yield d
        self.assertEqual(builder().rcptReply.code, 250)


class OutcomeLineTests(unittest.TestCase):
    """
    A recipient's outcome line is logged before the reply it goes with
    leaves.
    """

    def test_loggedBeforeTheHoldEnds(self):
        """
        While the outbox is held (the proxy handling one chunk of input, its
        replies waiting), the outcome line is already logged.
        """
        router, _ = routerFor(self, FakeBackend(self))
        router.validateFrom((b"c", b"h"), sender())
        lines = outcomeLines(self)
        outbox = router.delivery.outbox
        outbox.hold()
        self.addCleanup(outbox.release)
        self.assertRaises(RecipientRefused, router.validateTo, recipient(b"carol@a.test"))
        self.assertEqual(len(lines), 1)
        self.assertIn("to=<carol@a.test>", lines[0])
        self.assertIn("status=deferred", lines[0])


class RoutingSourceTests(unittest.TestCase):
    """
    L{RoutingTable.route} takes the whole address.
    """

    def test_routeSplitsAtLastAt(self):
        """
        The domain is what follows the last C{@}.
        """
        table = RoutingTable({"@b.test": "b", '"a@x"@c.test': "c"}, False, None)
        self.assertEqual(table.route("u@b.test").backend, "b")
        self.assertEqual(table.route('"a@x"@c.test').backend, "c")

    def test_routeBareLocalPart(self):
        """
        An address without C{@} is looked up as a local part.
        """
        table = RoutingTable({"bob": "b"}, True, None)
        self.assertEqual(table.route("bob").backend, "b")
