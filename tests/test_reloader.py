"""
Loading a configuration for a reload, and its serialized form.
"""

import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.reloader import deserialize, inThread, serialize

TEXT = """\
config:
  socket: [127.0.0.1, 24024]
  fallback_backend: old
  recipient_delimiter: "+-"
  workers: 2
backends:
  old: {host: 127.0.0.1, port: 24101}
  new: {socket: /run/new.sock, user: u, password: secret}
users:
  alice@example.com: new
  "@example.org": old
  carol: reject
"""


class SerializeTests(unittest.TestCase):
    """
    The serialized configuration carries everything, unchanged.
    """

    def test_roundTrip(self):
        """
        Deserializing gives back an equal configuration and its routing
        table.
        """
        loaded = configuration.parse(TEXT, "/etc/test.yaml")
        again, table = deserialize(serialize(loaded))
        self.assertEqual(again, loaded)
        self.assertEqual(dict(again.users), dict(loaded.users))
        self.assertEqual(again.backends["new"].password, "secret")
        self.assertEqual(table.lookup("alice", "example.com").backend, "new")

    def test_backendNamesShared(self):
        """
        All users of one backend share one name string, so a large table
        costs one object per user, not two.
        """
        loaded = configuration.parse(
            TEXT + "".join("  u%d@example.com: old\n" % (i,) for i in range(50)), "<t>"
        )
        again, _ = deserialize(serialize(loaded))
        names = {id(v) for k, v in again.users.items() if v == "old"}
        self.assertEqual(len(names), 1)


class InThreadTests(unittest.TestCase):
    """
    Work handed to a thread during a reload keeps the event loop responsive.
    """

    @defer.inlineCallbacks
    def test_shortSwitchIntervalMeanwhile(self):
        """
        While the function runs, the GIL switch interval is short; after,
        it is what it was.
        """
        before = sys.getswitchinterval()
        seen = yield inThread(reactor, sys.getswitchinterval)
        self.assertLess(seen, before)
        self.assertEqual(sys.getswitchinterval(), before)

    @defer.inlineCallbacks
    def test_restoredOnError(self):
        """
        The switch interval is restored when the function fails, and the
        failure is passed on.
        """
        before = sys.getswitchinterval()
        yield self.assertFailure(inThread(reactor, lambda: 1 / 0), ZeroDivisionError)
        self.assertEqual(sys.getswitchinterval(), before)
