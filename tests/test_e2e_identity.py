"""
End to end with real peers (tests/peers.py): recipient rewriting into a
Dovecot that knows only the new address, XCLIENT reaching Dovecot's log,
Postfix's XFORWARD, two proxies looping into each other, and a black-holed
backend. Skipped when a peer is missing, failed under CI=true.
"""

import time

from twisted.trial import unittest

from tests import peers
from tests.lmtpclient import BlockingLMTPClient, lmtpDeliver
from tests.support import fullBacklog
from tests.test_e2e_peers import SENDER, proxyConfig

MESSAGE = b"Subject: e2e identity\r\n\r\nhello\r\n"


class RewriteE2ETests(unittest.TestCase):
    """
    A user known to the new store by another name.
    """

    timeout = 90

    def test_rewrittenIntoRightMaildir(self):
        """
        Dovecot knows only alice@new.example; alice+x@old.example, rewritten
        by her row, is delivered into alice@new.example's Maildir, and the
        replies name the original address.
        """
        new = peers.DovecotBackend(self, "new", tcp=True, users=["alice@new.example"])
        proxy = peers.Proxy(self, proxyConfig(
            {"new": new.backendConfig("tcp")},
            {"alice@old.example": {"backend": "new", "address": "alice@new.example"},
             "@new.example": "new"}))
        result = lmtpDeliver(proxy.target, SENDER, ["alice+x@old.example"], MESSAGE)
        [(_, final)] = result["final"]
        self.assertEqual(final.code, 250, result)
        self.assertIn("<alice+x@old.example>", final.line)
        self.assertEqual(len(new.messages("alice@new.example")), 1)
        self.assertIn("rewritten=<alice+x@new.example>", proxy.log())

    def test_unknownUserTempfail(self):
        """
        With C{unknown_user: tempfail}, Dovecot's 550 5.1.1 for a user it
        does not know reaches the MTA as 450 4.1.1 with Dovecot's text.
        """
        new = peers.DovecotBackend(self, "new", tcp=True, users=["alice@new.example"])
        backend = dict(new.backendConfig("tcp"), unknown_user="tempfail")
        proxy = peers.Proxy(self, proxyConfig({"new": backend}, {"@new.example": "new"}))
        client = BlockingLMTPClient(proxy.target)
        self.addCleanup(client.close)
        client.lhlo()
        client.command("MAIL FROM:<%s>" % (SENDER,))
        rcpt = client.command("RCPT TO:<bob@new.example>")
        self.assertEqual(rcpt.code, 450, rcpt)
        self.assertTrue(rcpt.text.startswith("4.1.1 "), rcpt)
        self.assertIn("doesn't exist", rcpt.text)


class XclientE2ETests(unittest.TestCase):
    """
    The MTA's client, as Dovecot sees it.
    """

    timeout = 90

    def test_dovecotLogsForwardedAddress(self):
        """
        A Dovecot that trusts the proxy offers XCLIENT; the address the
        MTA forwarded (XFORWARD) is the one Dovecot logs and writes in its
        Received: header.
        """
        new = peers.DovecotBackend(self, "new", tcp=True, trusted="127.0.0.0/8")
        proxy = peers.Proxy(self, proxyConfig(
            {"new": new.backendConfig("tcp")}, {"@example.test": "new"},
            allowed_xclient=["127.0.0.0/8"]))
        client = BlockingLMTPClient(proxy.target)
        self.addCleanup(client.close)
        client.lhlo()
        self.assertEqual(
            client.command("XFORWARD ADDR=192.0.2.77 PORT=4711 HELO=mx.origin.test").code, 250)
        result = client.transaction(SENDER, ["alice@example.test"], MESSAGE)
        self.assertEqual([r.code for _, r in result["final"]], [250], result)
        peers.waitFor(lambda: "rip=192.0.2.77" in new.log(), 10,
                      what="dovecot to log the forwarded address")
        [stored] = new.messages("alice@example.test")
        self.assertIn(b"192.0.2.77", stored.split(b"\n\n", 1)[0])

    def test_postfixXforward(self):
        """
        Postfix with C{lmtp_send_xforward_command = yes} sends XFORWARD to a
        proxy that allows it; the mail is delivered, and the proxy's log
        names Postfix's own SMTP client as the original one.
        """
        new = peers.DovecotBackend(self, "new", tcp=True, trusted="127.0.0.0/8")
        proxy = peers.Proxy(self, proxyConfig(
            {"new": new.backendConfig("tcp")}, {"@example.test": "new"},
            allowed_xclient=["127.0.0.0/8"]))
        mta = peers.PostfixClient(self, proxy.target, domains=["example.test"],
                                  extra="lmtp_send_xforward_command = yes\n")
        self.assertEqual(mta.send(SENDER, ["alice@example.test"], "via postfix\r\n"), {})
        mta.waitEmpty(30)
        self.assertIn("status=sent", mta.deliveries("alice@example.test")[0])
        self.assertEqual(len(new.messages("alice@example.test")), 1)
        # The proxy's outcome line names Postfix's SMTP client, which only
        # XFORWARD told it.
        [line] = [l for l in proxy.log().splitlines() if "to=<alice@example.test>" in l]
        self.assertIn("orig_client=127.0.0.1:", line)
        self.assertIn("status=sent", line)


class LoopE2ETests(unittest.TestCase):
    """
    Two proxies pointing at each other.
    """

    timeout = 90

    def test_twoProxiesLoop(self):
        """
        Proxy A routes to proxy B, B back to A; both allow each other's
        XCLIENT, so the hop count runs out and the MTA gets 554 5.4.6 at
        RCPT within the TTL's few hops.
        """
        portA, portB = peers.freePort(), peers.freePort()
        settings = dict(allowed_xclient=["127.0.0.0/8"], connect_timeout=5)
        a = peers.Proxy(self, {
            "config": dict(settings, socket=["127.0.0.1", portA], hostname="a.test"),
            "backends": {"b": {"host": "127.0.0.1", "port": portB}},
            "users": {"@example.test": "b"}})
        b = peers.Proxy(self, {
            "config": dict(settings, socket=["127.0.0.1", portB], hostname="b.test"),
            "backends": {"a": {"host": "127.0.0.1", "port": portA}},
            "users": {"@example.test": "a"}})
        started = time.monotonic()
        client = BlockingLMTPClient(a.target)
        self.addCleanup(client.close)
        client.lhlo()
        client.command("MAIL FROM:<%s>" % (SENDER,))
        rcpt = client.command("RCPT TO:<alice@example.test>")
        self.assertEqual(rcpt.code, 554, rcpt)
        self.assertIn("5.4.6", rcpt.line)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("Proxy loop detected", a.log() + b.log())


class BlackHoleE2ETests(unittest.TestCase):
    """
    A backend that never answers the TCP handshake.
    """

    timeout = 90

    def test_oneConnectTimeoutInTotal(self):
        """
        Sessions arriving one after another for a black-holed backend (a
        listening socket whose accept queue is full): together they wait
        about one connect timeout, not one each, and the proxy logs the
        backend down once.
        """
        proxy = peers.Proxy(self, proxyConfig(
            {"dead": fullBacklog(self)}, {"@example.test": "dead"}, connect_timeout=2))
        clients = []
        started = time.monotonic()
        for _ in range(8):
            client = BlockingLMTPClient(proxy.target)
            self.addCleanup(client.close)
            client.lhlo()
            client.command("MAIL FROM:<%s>" % (SENDER,))
            client.send(b"RCPT TO:<alice@example.test>\r\n")
            clients.append(client)
            time.sleep(0.2)
        replies = [c.readReply() for c in clients]
        elapsed = time.monotonic() - started
        self.assertEqual([r.code for r in replies], [451] * 8, replies)
        self.assertTrue(all("4.4.1" in r.line for r in replies), replies)
        # One timeout each would end after 1.4 + 2 s.
        self.assertLess(elapsed, 3.0)
        self.assertEqual(proxy.log().count("down after"), 1)
