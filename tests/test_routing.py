"""
Tests for L{lmtp_proxy.routing}.
"""

import operator

from twisted.trial import unittest

from lmtp_proxy.config import parse
from lmtp_proxy.routing import REJECT, Route, RoutingTable, describeRoute

USERS = {
    "alice@example.com": "new",
    "alice+list@example.com": "list",
    "bob@example.com": "old",
    "@example.org": "org",
    "carol": "new",
    "dave@example.com": "reject",
}


def table(users=USERS, ignoreDomain=False, fallback=None, delimiter="+"):
    return RoutingTable(users, ignoreDomain, fallback, delimiter)


class AddressRoutingTests(unittest.TestCase):
    """
    With ignoreDomain false, lookups use the full address, then @domain.
    """

    def test_exactAddress(self):
        """The full address matches its key."""
        self.assertEqual(table().lookup("alice", "example.com"), Route("new", "alice@example.com", "address"))

    def test_caseInsensitive(self):
        """Local part and domain are matched case-insensitively."""
        self.assertEqual(table().lookup("ALICE", "Example.COM"), Route("new", "alice@example.com", "address"))

    def test_keysLowercased(self):
        """Mixed-case keys given to the constructor still match."""
        t = table({"Alice@Example.com": "new"})
        self.assertEqual(t.lookup("alice", "example.com"), Route("new", "alice@example.com", "address"))

    def test_exactBeatsStripped(self):
        """A key for the address with its extension wins over the base address."""
        self.assertEqual(table().lookup("alice+list", "example.com"), Route("list", "alice+list@example.com", "address"))

    def test_stripped(self):
        """The extension is removed when the full address has no key."""
        self.assertEqual(table().lookup("alice+news", "example.com"), Route("new", "alice@example.com", "address"))

    def test_strippedAtFirstDelimiter(self):
        """The local part is cut at the first delimiter."""
        self.assertEqual(table().lookup("bob+a+b", "example.com"), Route("old", "bob@example.com", "address"))

    def test_leadingDelimiter(self):
        """A leading delimiter is not an extension: '+foo' is not stripped to ''."""
        t = table({"+foo@example.com": "new", "@example.com": "dom"})
        self.assertEqual(t.lookup("+foo", "example.com"), Route("new", "+foo@example.com", "address"))
        self.assertEqual(t.lookup("+bar", "example.com"), Route("dom", "@example.com", "domain"))

    def test_leadingDelimiterNoEmptyKey(self):
        """'+foo' never looks up the empty local part '@domain' as an address."""
        t = table({"@example.com": "dom"})
        self.assertEqual(t.lookup("+foo", "example.com").how, "domain")

    def test_emptyDelimiter(self):
        """An empty delimiter turns extension stripping off."""
        t = table(delimiter="")
        self.assertIsNone(t.lookup("alice+news", "example.com"))

    def test_otherDelimiter(self):
        """Only the configured delimiter characters split."""
        t = table(delimiter="-")
        self.assertIsNone(t.lookup("alice+news", "example.com"))
        self.assertEqual(t.lookup("alice-news", "example.com"), Route("new", "alice@example.com", "address"))

    def test_multipleDelimiters(self):
        """Each character of the delimiter string is a delimiter."""
        t = table(delimiter="+-")
        self.assertEqual(t.lookup("alice-news", "example.com"), Route("new", "alice@example.com", "address"))
        self.assertEqual(t.lookup("alice+news", "example.com"), Route("new", "alice@example.com", "address"))

    def test_multipleDelimitersFirstWins(self):
        """With several delimiter characters, the first one present splits."""
        t = table({"a@x": "one", "a-b@x": "two"}, delimiter="+-")
        self.assertEqual(t.lookup("a-b+c", "x"), Route("one", "a@x", "address"))

    def test_domainKey(self):
        """@domain matches any user of the domain without a key of their own."""
        self.assertEqual(table().lookup("zed", "EXAMPLE.org"), Route("org", "@example.org", "domain"))

    def test_addressBeatsDomain(self):
        """An address key wins over the @domain key."""
        t = table({"a@x.org": "one", "@x.org": "two"})
        self.assertEqual(t.lookup("a", "x.org"), Route("one", "a@x.org", "address"))

    def test_strippedBeatsDomain(self):
        """The stripped address key wins over the @domain key."""
        t = table({"a@x.org": "one", "@x.org": "two"})
        self.assertEqual(t.lookup("a+z", "x.org"), Route("one", "a@x.org", "address"))

    def test_localpartKeyIgnored(self):
        """A bare localpart key does not match a full address when ignoreDomain is false."""
        self.assertIsNone(table().lookup("carol", "example.com"))

    def test_fallback(self):
        """Unmatched recipients go to the fallback."""
        self.assertEqual(table(fallback="old").lookup("zed", "example.com"), Route("old", None, "fallback"))

    def test_noRoute(self):
        """Unmatched recipients without a fallback have no route."""
        self.assertIsNone(table().lookup("zed", "example.com"))

    def test_reject(self):
        """A user mapped to reject routes to REJECT."""
        self.assertEqual(table().lookup("dave", "example.com"), Route(REJECT, "dave@example.com", "address"))

    def test_fallbackReject(self):
        """The fallback may be reject."""
        self.assertEqual(table(fallback=REJECT).lookup("zed", "x"), Route("reject", None, "fallback"))


class LocalpartRoutingTests(unittest.TestCase):
    """
    With ignoreDomain true, or no domain, lookups use the local part.
    """

    def test_ignoreDomain(self):
        """ignoreDomain matches the local part whatever the domain."""
        self.assertEqual(table(ignoreDomain=True).lookup("Carol", "anything.net"), Route("new", "carol", "localpart"))

    def test_ignoreDomainStripped(self):
        """ignoreDomain strips the extension from the local part."""
        self.assertEqual(table(ignoreDomain=True).lookup("carol+x", "a.net"), Route("new", "carol", "localpart"))

    def test_ignoreDomainSkipsDomainKeys(self):
        """ignoreDomain does not use address or @domain keys."""
        self.assertIsNone(table(ignoreDomain=True).lookup("zed", "example.org"))
        self.assertIsNone(table(ignoreDomain=True).lookup("alice", "example.com"))

    def test_ignoreDomainFallback(self):
        """ignoreDomain falls back when the local part has no key."""
        self.assertEqual(table(ignoreDomain=True, fallback="old").lookup("zed", "x"), Route("old", None, "fallback"))

    def test_noDomain(self):
        """An address without a domain is looked up by its local part."""
        self.assertEqual(table().lookup("CAROL", None), Route("new", "carol", "localpart"))

    def test_noDomainStripped(self):
        """An address without a domain has its extension stripped."""
        self.assertEqual(table().lookup("carol+x", None), Route("new", "carol", "localpart"))

    def test_noDomainExactBeatsStripped(self):
        """Without a domain, the exact local part wins over the stripped one."""
        t = table({"c+x": "one", "c": "two"})
        self.assertEqual(t.lookup("c+x", None), Route("one", "c+x", "localpart"))

    def test_noDomainFallback(self):
        """An unknown local part without a domain falls back."""
        self.assertEqual(table(fallback="old").lookup("zed", None), Route("old", None, "fallback"))


class TableTests(unittest.TestCase):
    """
    L{RoutingTable} is immutable and built from configs.
    """

    def test_copiesUsers(self):
        """Changing the mapping given to the constructor does not change the table."""
        users = {"a@x": "one"}
        t = table(users)
        users["a@x"] = "two"
        self.assertEqual(t.lookup("a", "x").backend, "one")

    def test_usersReadOnly(self):
        """The users view cannot be changed."""
        self.assertRaises(TypeError, operator.setitem, table().users, "z", "new")

    def test_noAttributeAssignment(self):
        """Attributes cannot be set."""
        self.assertRaises(AttributeError, setattr, table(), "_fallback", "old")

    def test_caseConflict(self):
        """Keys differing only by case with different backends are refused."""
        self.assertRaises(ValueError, RoutingTable, {"a": "one", "A": "two"}, False, None)

    def test_len(self):
        """len() is the number of users keys."""
        self.assertEqual(len(table()), len(USERS))

    def test_fromConfig(self):
        """fromConfig uses the users, ignoreDomain, fallback and delimiter of a config."""
        c = parse(
            "config:\n  socket: /s\n  ignoreDomain: true\n  fallback_backend: b\n  recipient_delimiter: '-'\n"
            "backends:\n  b: {socket: /b}\n  c: {socket: /c}\nusers:\n  Alice: c\n"
        )
        t = RoutingTable.fromConfig(c)
        self.assertEqual(
            (t.lookup("alice-x", "y"), t.lookup("alice+x", "y"), t.ignoreDomain, t.fallback, t.delimiter),
            (Route("c", "alice", "localpart"), Route("b", None, "fallback"), True, "b", "-"),
        )


class DescribeRouteTests(unittest.TestCase):
    """
    L{describeRoute} explains a route for C{lmtp-proxy route}.
    """

    def test_key(self):
        """A matched key is named."""
        self.assertEqual(
            describeRoute(Route("new", "alice@example.com", "address")),
            "backend new (matched users key 'alice@example.com')",
        )

    def test_fallback(self):
        """The fallback is named as fallback_backend."""
        self.assertEqual(describeRoute(Route("old", None, "fallback")), "backend old (fallback_backend)")

    def test_none(self):
        """No route would be refused with 550 5.1.1."""
        self.assertEqual(describeRoute(None), "no route (would be refused with 550 5.1.1)")

    def test_reject(self):
        """A reject route says the recipient is deferred."""
        self.assertEqual(
            describeRoute(Route(REJECT, "dave", "localpart")),
            "backend reject (matched users key 'dave'): deferred with a 4xx temporary failure",
        )
