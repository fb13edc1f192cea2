"""
The whole proxy over loopback sockets, with in-process fake backends.
"""

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import FakeBackend, Proxy, deadPort, transaction


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
