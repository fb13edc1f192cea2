"""
Recipients rewritten for their backend (a C{users} value
C{{backend: X, address: Y}}), and C{unknown_user: tempfail}.
"""

import io
from contextlib import redirect_stdout

from twisted.internet import defer
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.cli import main
from lmtp_proxy.reloader import deserialize, serialize
from lmtp_proxy.routing import Route, RoutingTable, describeRoute, rewriteAddress

from tests.lmtpclient import exchange, transaction
from tests.support import FakeBackend, Proxy, outcomeLines, outcomesFor

REWRITING = """
config:
  socket: [127.0.0.1, 24999]
backends:
  old: {host: 127.0.0.1, port: 24101}
  new: {host: 127.0.0.1, port: 24102, unknown_user: tempfail}
users:
  alice@old.example: {backend: new, address: alice@new.example}
  bob@old.example: old
"""


class RewriteConfigTests(unittest.TestCase):
    """
    The C{users} value that rewrites, and C{unknown_user}, in the
    configuration.
    """

    def test_mappingValue(self):
        """
        A mapping value is kept as a C{(backend, address)} pair beside the
        plain backend names.
        """
        config = configuration.parse(REWRITING)
        self.assertEqual(config.users["alice@old.example"], ("new", "alice@new.example"))
        self.assertEqual(config.users["bob@old.example"], "old")

    def test_unknownUser(self):
        """
        C{unknown_user} is C{pass} unless a backend says C{tempfail}.
        """
        config = configuration.parse(REWRITING)
        self.assertEqual(config.backends["old"].unknown_user, "pass")
        self.assertEqual(config.backends["new"].unknown_user, "tempfail")

    def test_unknownUserValue(self):
        """
        Any other C{unknown_user} is a mistake naming the key.
        """
        e = self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            REWRITING.replace("unknown_user: tempfail", "unknown_user: bounce"),
        )
        self.assertIn("backends.new.unknown_user", str(e))

    def test_mappingNeedsBothKeys(self):
        """
        A rewriting value without its address is a mistake naming the key.
        """
        e = self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            REWRITING.replace(", address: alice@new.example", ""),
        )
        self.assertIn("users.alice@old.example.address", str(e))

    def test_mappingUnknownBackend(self):
        """
        A rewriting value must name a defined backend.
        """
        e = self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            REWRITING.replace("{backend: new,", "{backend: nwe,"),
        )
        self.assertIn("users.alice@old.example.backend", str(e))

    def test_serializedForWorkers(self):
        """
        A rewriting value survives the JSON form that reloads and worker
        processes use, and routes the same afterwards.
        """
        config = configuration.parse(REWRITING)
        again, table = deserialize(serialize(config))
        self.assertEqual(again, config)
        self.assertEqual(table.route("alice@old.example").address, "alice@new.example")


class RewriteRoutingTests(unittest.TestCase):
    """
    L{Route.address} and L{rewriteAddress}.
    """

    def test_routeCarriesAddress(self):
        """
        A rewriting row gives a route with its C{address}; a plain one gives
        C{None}.
        """
        table = RoutingTable(
            {"alice@old.example": ("new", "alice@new.example"), "bob": "old"}, False, None
        )
        self.assertEqual(
            table.lookup("Alice+x", "old.example"),
            Route("new", "alice@old.example", "address", "alice@new.example"),
        )
        self.assertIsNone(table.route("bob").address)

    def test_detailKept(self):
        """
        The original's extension goes onto the rewritten local part.
        """
        self.assertEqual(
            rewriteAddress("alice+x@old.example", "alice@new.example"), "alice+x@new.example"
        )

    def test_noDetail(self):
        """
        Without an extension the rewritten address is used as it is.
        """
        self.assertEqual(rewriteAddress("alice@old.example", "a@new.example"), "a@new.example")

    def test_describe(self):
        """
        C{lmtp-proxy route} names the address the backend gets.
        """
        route = Route("new", "alice@old.example", "address", "alice@new.example")
        self.assertIn(
            "rewritten to alice+x@new.example", describeRoute(route, "alice+x@old.example")
        )

    def test_routeCommand(self):
        """
        C{lmtp-proxy route} shows the rewrite of each address it is given.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(REWRITING)
        out = io.StringIO()
        with redirect_stdout(out):
            status = main(["route", "-c", path, "alice+x@old.example", "bob@old.example"])
        self.assertEqual(status, 0)
        lines = out.getvalue().splitlines()
        self.assertIn("backend new", lines[0])
        self.assertIn("rewritten to alice+x@new.example", lines[0])
        self.assertNotIn("rewritten", lines[1])


def rewritingProxy(testcase, extensions=("PIPELINING", "8BITMIME", "SIZE", "DSN"), unknown="pass"):
    new = FakeBackend(testcase, extensions=extensions)
    entry = dict(new.entry, unknown_user=unknown)
    proxy = Proxy(
        testcase,
        {"hostname": "proxy.test"},
        {"new": entry},
        {"alice@old.example": {"backend": "new", "address": "alice@new.example"}, "@new.example": "new"},
    )
    return new, proxy


class RewriteDeliveryTests(unittest.TestCase):
    """
    What the backend and the MTA see of a rewritten recipient.
    """

    @defer.inlineCallbacks
    def test_backendGetsRewrittenAddress(self):
        """
        The backend's RCPT names the rewritten address with the detail kept,
        and an ORCPT with the original when it offers DSN.
        """
        new, proxy = rewritingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"alice+x@old.example"]), 6)
        rcpts = [c for c in new.commands if c.startswith(b"RCPT")]
        self.assertEqual(
            rcpts, [b"RCPT TO:<alice+x@new.example> ORCPT=rfc822;alice+2Bx@old.example"]
        )

    @defer.inlineCallbacks
    def test_noOrcptWithoutDsn(self):
        """
        A backend that does not offer DSN gets no ORCPT.
        """
        new, proxy = rewritingProxy(self, extensions=("PIPELINING",))
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"alice@old.example"]), 6)
        self.assertIn(b"RCPT TO:<alice@new.example>", new.commands)

    @defer.inlineCallbacks
    def test_clientOrcptKept(self):
        """
        An ORCPT the client sent is passed on, not replaced.
        """
        new, proxy = rewritingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(
            client,
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<alice@old.example> ORCPT=rfc822;a@orig\r\n",
            3,
        )
        self.assertIn(b"RCPT TO:<alice@new.example> ORCPT=rfc822;a@orig", new.commands)

    @defer.inlineCallbacks
    def test_repliesNameOriginal(self):
        """
        The backend's replies name the rewritten address; the MTA's name the
        original.
        """
        new, proxy = rewritingProxy(self)
        new.rcptReplies[b"alice+x@new.example"] = b"250 2.1.5 <alice+x@new.example> Ok\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"alice+x@old.example"]), 6)
        self.assertEqual(replies[2], "250 2.1.5 <alice+x@old.example> Ok")
        self.assertEqual(replies[4], "250 2.0.0 <alice+x@old.example> Saved")

    @defer.inlineCallbacks
    def test_logNamesBoth(self):
        """
        The outcome line names the original address and the rewritten one.
        """
        lines = outcomeLines(self)
        new, proxy = rewritingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"alice+x@old.example"]), 6)
        [line] = outcomesFor(lines, "alice+x@old.example")
        self.assertIn("rewritten=<alice+x@new.example>", line)
        self.assertIn("status=sent", line)

    @defer.inlineCallbacks
    def test_plainRowUnchanged(self):
        """
        A recipient whose row does not rewrite reaches the backend as sent,
        with no parameter added.
        """
        new, proxy = rewritingProxy(self)
        client = yield proxy.connect(self)
        yield exchange(client, transaction([b"carol@new.example"]), 6)
        self.assertIn(b"RCPT TO:<carol@new.example>", new.commands)


class UnknownUserTests(unittest.TestCase):
    """
    C{unknown_user: tempfail} turns a backend's "no such user" at RCPT
    into a 4xx.
    """

    @defer.inlineCallbacks
    def test_tempfail(self):
        """
        A 550 5.1.1 becomes 450 4.1.1 with the backend's text kept.
        """
        new, proxy = rewritingProxy(self, unknown="tempfail")
        new.rcptReplies[b"zed@new.example"] = b"550 5.1.1 <zed@new.example> User doesn't exist\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"zed@new.example"]), 5)
        self.assertEqual(replies[2], "450 4.1.1 <zed@new.example> User doesn't exist")

    @defer.inlineCallbacks
    def test_otherAddressStatus(self):
        """
        Another 5.1.x (here 5.1.2, bad destination) also becomes 450 4.1.1.
        """
        new, proxy = rewritingProxy(self, unknown="tempfail")
        new.rcptReplies[b"zed@new.example"] = b"553 5.1.2 no such domain\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"zed@new.example"]), 5)
        self.assertEqual(replies[2], "450 4.1.1 no such domain")

    @defer.inlineCallbacks
    def test_otherRefusalPassed(self):
        """
        A 5xx that is not about the address (5.7.1) is relayed as it is.
        """
        new, proxy = rewritingProxy(self, unknown="tempfail")
        new.rcptReplies[b"zed@new.example"] = b"550 5.7.1 policy\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"zed@new.example"]), 5)
        self.assertEqual(replies[2], "550 5.7.1 policy")

    @defer.inlineCallbacks
    def test_passByDefault(self):
        """
        Without C{unknown_user: tempfail} the 550 is relayed as it is.
        """
        new, proxy = rewritingProxy(self)
        new.rcptReplies[b"zed@new.example"] = b"550 5.1.1 <zed@new.example> User doesn't exist\r\n"
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"zed@new.example"]), 5)
        self.assertEqual(replies[2], "550 5.1.1 <zed@new.example> User doesn't exist")
