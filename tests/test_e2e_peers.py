"""
End-to-end tests of the installed proxy (``twistd -n lmtp-proxy``) against
real third-party peers: Dovecot LMTP delivery backends, Postfix's smtp-sink,
swaks and a private Postfix instance (see tests/peers.py), and the
blocking face of tests/lmtpclient.py.

Every peer and the proxy run as separate processes, so the tests are plain
blocking code. Each test is skipped when a peer is missing (it fails instead
when CI=true); install the peers with tools/install-peers.sh.
"""

import os
import signal
import stat
import time

from twisted.trial import unittest

from tests import peers
from tests.lmtpclient import BlockingLMTPClient, lmtpDeliver

SENDER = "sender@origin.test"

# A message that exercises transparency: 8-bit bytes, lines starting with
# one and two dots (dot-stuffed on the wire, unstuffed by the receiver),
# long-ish lines (990 + CRLF, the RFC 5321 maximum is 1000) and a bare CR
# in the middle of a line, which must be relayed unchanged.
def transparencyMessage(marker):
    return (
        b"X-E2E-Id: " + marker + b"\r\n"
        b"From: <sender@origin.test>\r\n"
        b"Subject: transparency \xc3\xa9\xe2\x82\xac\r\n"
        b"\r\n"
        b"8-bit body: caf\xc3\xa9 \xff\xfe\x80 na\xefve\r\n"
        b".leading dot line\r\n"
        b"..two leading dots\r\n"
        b".\tdot then tab\r\n"
        b"bare\rCR in the middle of a line\r\n"
        + b"L" * 990 + b"\r\n"
        + b"M" * 500 + b" " + b"N" * 400 + b"\r\n"
        b"last line\r\n"
    )


def asStored(message):
    """What a maildir / smtp-sink dump holds for a CRLF message: LF lines."""
    return message.replace(b"\r\n", b"\n")


def proxyConfig(backends, users, **options):
    """A proxy config dict; the listening socket is filled in by Proxy."""
    config = {"ignoreDomain": False, "hostname": "proxy.test",
              "connect_timeout": 5, "shutdown_grace": 2}
    config.update(options)
    return {"config": config, "backends": backends, "users": users}


class _Base(unittest.TestCase):
    # trial's default is 120 s; no test here should need more than 60 s.
    timeout = 90

    def assertDeliveredOnce(self, backend, address, message, marker):
        """
        backend (a DovecotBackend) holds exactly one message for address,
        and its content, after the trace headers Dovecot prepends, is the
        message that was sent, byte for byte (with LF line ends).
        """
        stored = backend.messages(address)
        self.assertEqual(len(stored), 1,
                         "%s: expected 1 message for %s, found %d"
                         % (backend.name, address, len(stored)))
        trace, body = peers.dovecotBody(stored[0], b"X-E2E-Id: " + marker)
        self.assertEqual(body, asStored(message))
        # Dovecot's own trace headers name the backend that delivered it
        self.assertIn(b"by %s.test with LMTP" % (backend.name.encode(),), trace)

    def assertNothingDelivered(self, *backends):
        for b in backends:
            if isinstance(b, peers.DovecotBackend):
                self.assertEqual(b.allMessages(), {},
                                 "Dovecot %s got mail" % (b.name,))
            else:
                self.assertEqual(b.messagesReceived(), 0,
                                 "smtp-sink counted a message: %s" % (b.output(),))
                self.assertEqual(b.dumps(), [], "smtp-sink got a message")


class PipeliningTransparencyTests(_Base):

    def test_swaksPipelinedTwoDovecotBackends(self):
        """
        swaks --protocol LMTP --pipeline through the proxy, one transaction
        for three recipients on two real Dovecot backends (one reached over
        TCP, one over a unix socket): every recipient gets its own 250 after
        the final dot, each message lands in the maildir of the backend its
        route names (and nowhere else), and the delivered message is byte
        for byte what swaks sent: 8-bit bytes, dot-stuffed lines, long lines
        and a bare CR in the middle of a line.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new")  # unix socket only
        proxy = peers.Proxy(self, proxyConfig(
            {"old": old.backendConfig("tcp"), "new": new.backendConfig("unix")},
            {"alice@example.test": "old", "bob@example.test": "new",
             "@new.test": "new"}))
        marker = b"swaks-%d" % (os.getpid(),)
        message = transparencyMessage(marker)
        dataFile = os.path.join(proxy.dir, "message.eml")
        with open(dataFile, "wb") as f:
            # swaks adds the CRLF before its terminating dot itself
            f.write(message[:-2])
        recipients = ["alice@example.test", "bob@example.test", "zed@new.test"]
        run = peers.swaks(proxy.target, [
            "--from", SENDER, "--to", ",".join(recipients),
            "--data", "@" + dataFile], pipeline=True)
        self.assertEqual(run.returncode, 0, run.stdout)
        # the commands really went out pipelined: MAIL, RCPT x3 and DATA
        # before the first reply
        self.assertRegex(run.stdout, r"-> MAIL FROM:<[^\n]*\n -> RCPT TO:<alice"
                         r"[^\n]*\n -> RCPT TO:<bob[^\n]*\n -> RCPT TO:<zed"
                         r"[^\n]*\n -> DATA\n")
        replies = peers.swaksReplies(run.stdout)
        dot = replies.index([r for r in replies if r.startswith("354")][0])
        final = [r for r in replies[dot + 1:] if not r.startswith("221")]
        self.assertEqual(len(final), 3, replies)
        for address, line in zip(recipients, final):
            self.assertTrue(line.startswith("250 "), (address, line, replies))

        self.assertDeliveredOnce(old, "alice@example.test", message, marker)
        self.assertDeliveredOnce(new, "bob@example.test", message, marker)
        self.assertDeliveredOnce(new, "zed@new.test", message, marker)
        self.assertEqual(len(old.allMessages()), 1)
        self.assertEqual(len(new.allMessages()), 2)

    def test_rawClientPipelinedByteExact(self):
        """
        The same transparency check with the raw LMTP client: a pipelined
        MAIL/RCPT/RCPT/DATA in one write, a message whose dot-stuffing the
        client does itself, to two Dovecot backends over TCP and a unix
        socket; the final replies come back one per recipient in RCPT order
        and both maildirs hold the exact message.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new")
        proxy = peers.Proxy(self, proxyConfig(
            {"old": old.backendConfig("tcp"), "new": new.backendConfig("unix")},
            {"alice@example.test": "old", "bob@example.test": "new"}))
        marker = b"raw-%d" % (os.getpid(),)
        message = transparencyMessage(marker)
        result = lmtpDeliver(proxy.target, SENDER,
                             ["bob@example.test", "alice@example.test"],
                             message)
        self.assertEqual(result["mail"].code, 250, result["lines"])
        self.assertEqual([r.code for r in result["rcpt"]], [250, 250], result["lines"])
        self.assertEqual(result["data"].code, 354, result["lines"])
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("bob@example.test", 250), ("alice@example.test", 250)],
                         result["lines"])
        self.assertDeliveredOnce(old, "alice@example.test", message, marker)
        self.assertDeliveredOnce(new, "bob@example.test", message, marker)


class MixedOutcomeTests(_Base):

    def test_perRecipientRepliesInRcptOrder(self):
        """
        One pipelined transaction with seven recipients and mixed fates:
        a Dovecot recipient (delivered), an smtp-sink that answers 451 at
        RCPT (its 451 is passed on at RCPT), an smtp-sink that answers 451
        after DATA (250 at RCPT, 451 after the dot), a backend whose port is
        dead (451 4.4.x at RCPT for that recipient only), a `reject` row
        (451 4.2.1 at RCPT), an unrouted address with no fallback (550
        5.1.1 at RCPT) and a second Dovecot recipient. After the final dot
        there is exactly one reply per accepted recipient, in RCPT order,
        and only the Dovecot recipients are delivered.
        """
        dove = peers.DovecotBackend(self, "old", tcp=True)
        rcptFail = peers.SmtpSink(self, args=peers.SmtpSink.tempfailRcpt(
            "451 4.3.0 e2e tempfail at RCPT"), name="rcpt451")
        dataFail = peers.SmtpSink(self, args=peers.SmtpSink.tempfailData(
            "451 4.3.0 e2e tempfail after DATA"), name="data451")
        deadPort = peers.freePort()
        proxy = peers.Proxy(self, proxyConfig(
            {"dove": dove.backendConfig("tcp"),
             "rcptfail": rcptFail.backendConfig(),
             "datafail": dataFail.backendConfig(),
             "dead": {"host": "127.0.0.1", "port": deadPort}},
            {"alice@example.test": "dove", "bob@example.test": "dove",
             "temprcpt@example.test": "rcptfail",
             "tempdata@example.test": "datafail",
             "down@example.test": "dead",
             "carol@example.test": "reject"}))
        recipients = ["alice@example.test", "temprcpt@example.test",
                      "tempdata@example.test", "down@example.test",
                      "carol@example.test", "nobody@nowhere.test",
                      "bob@example.test"]
        marker = b"mixed-%d" % (os.getpid(),)
        message = transparencyMessage(marker)
        result = lmtpDeliver(proxy.target, SENDER, recipients, message)
        lines = result["lines"]
        rcpt = dict(zip(recipients, result["rcpt"]))

        self.assertEqual(rcpt["alice@example.test"].code, 250, lines)
        self.assertEqual(rcpt["temprcpt@example.test"].code, 451, lines)
        self.assertIn("e2e tempfail at RCPT", rcpt["temprcpt@example.test"].text, lines)
        self.assertEqual(rcpt["tempdata@example.test"].code, 250, lines)
        self.assertEqual(rcpt["down@example.test"].code, 451, lines)
        self.assertTrue(rcpt["down@example.test"].text.startswith("4.4."), lines)
        self.assertEqual(rcpt["carol@example.test"].code, 451, lines)
        self.assertTrue(rcpt["carol@example.test"].text.startswith("4.2.1"), lines)
        self.assertEqual(rcpt["nobody@nowhere.test"].code, 550, lines)
        self.assertTrue(rcpt["nobody@nowhere.test"].text.startswith("5.1.1"), lines)
        self.assertEqual(rcpt["bob@example.test"].code, 250, lines)

        self.assertEqual(result["data"].code, 354, lines)
        self.assertEqual(
            [(a, r.code) for a, r in result["final"]],
            [("alice@example.test", 250), ("tempdata@example.test", 451),
             ("bob@example.test", 250)], lines)
        tempdata = result["final"][1][1]
        self.assertIn("e2e tempfail after DATA", tempdata.text, lines)
        # nothing after the last final reply but QUIT's 221
        self.assertTrue(lines[-1].startswith("221"), lines)

        self.assertDeliveredOnce(dove, "alice@example.test", message, marker)
        self.assertDeliveredOnce(dove, "bob@example.test", message, marker)
        self.assertEqual(len(dove.allMessages()), 2)
        self.assertEqual(rcptFail.dumps(), [])


class SmtpSinkBackendTests(_Base):

    def test_sinkBareLhloLineAndByteExactDump(self):
        """
        smtp-sink as the backend: its LHLO reply ends with a bare "250 "
        line, which the proxy must accept. Two recipients on that backend
        share one backend transaction: both get 250 after the dot, and the
        sink's dump shows both RCPTs, the envelope sender, and the message
        exactly as sent (smtp-sink stores LF line ends and drops bare CRs,
        so this message has none).
        """
        sink = peers.SmtpSink(self, name="sink")
        lhlo = BlockingLMTPClient(sink.target)
        try:
            # the quirk this test is about, checked on the peer itself
            self.assertEqual(lhlo.lhlo().lines[-1], "250 ")
        finally:
            lhlo.quit()
        proxy = peers.Proxy(self, proxyConfig(
            {"sink": sink.backendConfig()}, {"@sink.test": "sink"}))
        marker = b"sink-%d" % (os.getpid(),)
        message = transparencyMessage(marker).replace(b"bare\rCR", b"no bare CR")
        result = lmtpDeliver(proxy.target, SENDER,
                             ["one@sink.test", "two@sink.test"], message)
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("one@sink.test", 250), ("two@sink.test", 250)],
                         result["lines"])
        dumps = sink.waitDumps(1)
        info, body = peers.SmtpSink.parseDump(dumps[0])
        self.assertEqual(info["proto"], "LMTP")
        self.assertEqual(info["mail"].split()[0], "<%s>" % (SENDER,))
        self.assertEqual([r.split()[0] for r in info["rcpt"]],
                         ["<one@sink.test>", "<two@sink.test>"])
        self.assertEqual(body, asStored(message))

    def test_sinkBackendOverUnixSocketWithoutPipelining(self):
        """
        smtp-sink on a unix socket, started with a failure injection option
        that also makes it stop announcing PIPELINING (-r implies -p): the
        proxy still delivers to it (commands one at a time) and relays its
        451-after-DATA reply, once per recipient.
        """
        sock = os.path.join(peers.tempDir(self), "sink.sock")
        sink = peers.SmtpSink(self, socket=sock, name="nopipe",
                              args=peers.SmtpSink.tempfailData(
                                  "451 4.3.0 e2e tempfail after DATA"))
        proxy = peers.Proxy(self, proxyConfig(
            {"sink": sink.backendConfig()}, {"@sink.test": "sink"}))
        result = lmtpDeliver(proxy.target, SENDER,
                             ["one@sink.test", "two@sink.test"],
                             transparencyMessage(b"nopipe"))
        self.assertEqual([r.code for r in result["rcpt"]], [250, 250], result["lines"])
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("one@sink.test", 451), ("two@sink.test", 451)],
                         result["lines"])
        for a, r in result["final"]:
            self.assertIn("e2e tempfail after DATA", r.text)


class ListenerTests(_Base):

    def test_unixListeningSocketMode0660(self):
        """
        With config.socket a path and permissions 0660, the proxy listens on
        a unix socket whose mode is exactly 0660, and a transaction over it
        is delivered.
        """
        sink = peers.SmtpSink(self, name="sink")
        path = os.path.join(peers.tempDir(self), "proxy.sock")
        proxy = peers.Proxy(self, proxyConfig(
            {"sink": sink.backendConfig()}, {"@sink.test": "sink"},
            socket=path, permissions=0o660))
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode), oct(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660, oct(st.st_mode))
        self.assertEqual(proxy.target, path)
        result = lmtpDeliver(path, SENDER, ["one@sink.test"],
                             transparencyMessage(b"unix"))
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("one@sink.test", 250)], result["lines"])


class AbortTests(_Base):

    def test_clientDisconnectMidData(self):
        """
        A client that sends half a message and then drops the connection
        gets nothing delivered: the Dovecot maildir stays empty and the
        smtp-sink never completes a message (no dump, mesg=0). The proxy
        keeps running and serves the next client.
        """
        dove = peers.DovecotBackend(self, "old", tcp=True)
        sink = peers.SmtpSink(self, name="sink")
        proxy = peers.Proxy(self, proxyConfig(
            {"dove": dove.backendConfig(), "sink": sink.backendConfig()},
            {"@example.test": "dove", "@sink.test": "sink"}))
        c = BlockingLMTPClient(proxy.target)
        c.lhlo()
        c.send(b"MAIL FROM:<sender@origin.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\n"
               b"RCPT TO:<one@sink.test>\r\n"
               b"DATA\r\n")
        replies = [c.readReply() for i in range(4)]
        self.assertEqual([r.code for r in replies], [250, 250, 250, 354], c.lines)
        c.send(b"Subject: cut short\r\n\r\n" + b"partial line\r\n" * 2000
               + b"and the connection drops here")
        time.sleep(0.2)
        c.close()
        # wait until both backends saw their session end (or 5 s)
        def backendsClosed():
            return (sink.sessionsEnded() >= 1
                    and "Disconnect from 127.0.0.1" in dove.log())
        try:
            peers.waitFor(backendsClosed, 5, what="backend sessions to close")
        except self.failureException:
            pass  # not required; what matters is that nothing was delivered
        time.sleep(0.3)
        self.assertNothingDelivered(dove, sink)
        self.assertTrue(proxy.alive(), proxy.log())
        after = lmtpDeliver(proxy.target, SENDER, ["two@sink.test"],
                            transparencyMessage(b"after"))
        self.assertEqual([(a, r.code) for a, r in after["final"]],
                         [("two@sink.test", 250)], after["lines"])


class SmugglingTests(_Base):

    def _smuggle(self, payload):
        dove = peers.DovecotBackend(self, "old", tcp=True)
        sink = peers.SmtpSink(self, name="sink")
        proxy = peers.Proxy(self, proxyConfig(
            {"dove": dove.backendConfig(), "sink": sink.backendConfig()},
            {"@example.test": "dove", "@sink.test": "sink"}))
        data = (b"Subject: smuggling\r\n\r\nfirst part\r\n" + payload +
                b"MAIL FROM:<evil@origin.test>\r\nRCPT TO:<victim@example.test>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
        result = lmtpDeliver(proxy.target, SENDER,
                             ["alice@example.test", "one@sink.test"],
                             data, raw=True)
        lines = result["lines"]
        self.assertEqual(result["data"].code, 354, lines)
        self.assertEqual(len(result["final"]), 2, lines)
        for address, reply in result["final"]:
            self.assertEqual(reply.code // 100, 5, (address, lines))
            self.assertTrue(reply.text.startswith("5.6."), (address, lines))
        # nothing was taken as a command: the session ends with QUIT's 221
        self.assertTrue(lines[-1].startswith("221"), lines)
        time.sleep(0.3)
        self.assertNothingDelivered(dove, sink)

    def test_smugglingBareLfDot(self):
        """
        A message containing "\\n.\\r\\n" (a dot line introduced by a bare
        LF) gets one 5.6.x reply per recipient after the final dot, and
        neither backend (Dovecot, smtp-sink) ever receives a message.
        """
        self._smuggle(b"text\n.\r\n")

    def test_smugglingDotBareLf(self):
        """
        A message containing "\\r\\n.\\n" (a dot line ended by a bare LF)
        gets one 5.6.x reply per recipient, and neither backend receives a
        message.
        """
        self._smuggle(b"text\r\n.\n")


class PostfixTests(_Base):

    def test_postfixDeliversToTwoBackends(self):
        """
        A real Postfix delivering over LMTP (lmtp:inet) through the proxy:
        one message to two recipients on two Dovecot backends is delivered
        to both, Postfix logs status=sent for each, and its queue is empty.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new")
        proxy = peers.Proxy(self, proxyConfig(
            {"old": old.backendConfig("tcp"), "new": new.backendConfig("unix")},
            {"alice@example.test": "old", "bob@example.test": "new"}))
        mta = peers.PostfixClient(self, proxy.target, domains=["example.test"])
        refused = mta.send(SENDER, ["alice@example.test", "bob@example.test"],
                           "postfix through the proxy\r\n", subject="two backends")
        self.assertEqual(refused, {})
        mta.waitEmpty(30)
        for address in ("alice@example.test", "bob@example.test"):
            lines = mta.deliveries(address)
            self.assertEqual(len(lines), 1, mta.log())
            self.assertIn("status=sent", lines[0])
        self.assertEqual(len(old.messages("alice@example.test")), 1)
        self.assertEqual(len(new.messages("bob@example.test")), 1)
        self.assertEqual(old.messages("bob@example.test"), [])
        self.assertEqual(new.messages("alice@example.test"), [])
        self.assertIn("Mail queue is empty", mta.queue())

    def test_postfixManyRecipientsPipelined(self):
        """
        Postfix sends one message to twenty recipients, alternating between
        two Dovecot backends, with the envelope pipelined: the RCPTs reach
        both backends at once, and each recipient gets exactly one copy,
        on its own backend only.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new")
        recipients = ["user%d@example.test" % (i,) for i in range(20)]
        proxy = peers.Proxy(self, proxyConfig(
            {"old": old.backendConfig("tcp"), "new": new.backendConfig("unix")},
            {address: ("old", "new")[i % 2] for i, address in enumerate(recipients)}))
        mta = peers.PostfixClient(self, proxy.target, domains=["example.test"])
        refused = mta.send(SENDER, recipients, "twenty recipients\r\n",
                           subject="pipelined")
        self.assertEqual(refused, {})
        mta.waitEmpty(30)
        for i, address in enumerate(recipients):
            lines = mta.deliveries(address)
            self.assertEqual(len(lines), 1, mta.log())
            self.assertIn("status=sent", lines[0])
            mine, other = (old, new) if i % 2 == 0 else (new, old)
            self.assertEqual(len(mine.messages(address)), 1)
            self.assertEqual(other.messages(address), [])

    def test_postfixRejectDefersThenReloadDelivers(self):
        """
        Postfix (lmtp:unix to the proxy's unix socket) sends one message to
        alice (routed to Dovecot old) and carol (routed to `reject`): alice
        is delivered, carol stays deferred in Postfix's queue with the
        proxy's 451 4.2.1. Then the config routes carol to Dovecot new,
        SIGUSR1 makes the proxy reload it, and after a queue flush carol is
        delivered to new and the queue is empty.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new")
        path = os.path.join(peers.tempDir(self), "proxy.sock")
        backends = {"old": old.backendConfig("tcp"),
                    "new": new.backendConfig("unix")}
        config = proxyConfig(backends,
                             {"alice@example.test": "old",
                              "carol@example.test": "reject"},
                             socket=path, permissions=0o666)
        proxy = peers.Proxy(self, config)
        mta = peers.PostfixClient(self, path, domains=["example.test"])
        self.assertEqual(mta.send(SENDER, ["alice@example.test", "carol@example.test"],
                                  "migration in progress\r\n", subject="reject"), {})
        mta.waitLog(lambda t: "to=<alice@example.test>" in t
                    and "to=<carol@example.test>" in t, 30,
                    what="postfix to try both recipients")
        self.assertIn("status=sent", mta.deliveries("alice@example.test")[0])
        carol = mta.deliveries("carol@example.test")
        self.assertIn("status=deferred", carol[0])
        self.assertIn("451 4.2.1", carol[0])
        queue = mta.queue()
        self.assertIn("carol@example.test", queue)
        self.assertNotIn("alice@example.test", queue)
        self.assertIn("451 4.2.1", queue)
        self.assertEqual(len(old.messages("alice@example.test")), 1)
        self.assertEqual(new.allMessages(), {})
        self.assertEqual(old.messages("carol@example.test"), [])

        config["users"] = {"alice@example.test": "old",
                           "carol@example.test": "new"}
        proxy.writeConfig(config)
        proxy.sendSignal(signal.SIGUSR1)
        # the reload has happened once a new session's RCPT for carol is
        # accepted (the proxy connects to new; no message is sent)
        def carolRouted():
            c = BlockingLMTPClient(path)
            try:
                c.lhlo()
                c.command("MAIL FROM:<probe@origin.test>")
                ok = c.command("RCPT TO:<carol@example.test>").code == 250
                c.command("RSET")
                return ok
            finally:
                c.quit()
        try:
            peers.waitFor(carolRouted, 10, interval=0.2,
                          what="the proxy to route carol to new after SIGUSR1")
        except self.failureException as e:
            self.fail("%s\nproxy log:\n%s" % (e, proxy.log()[-6000:]))
        self.assertTrue(proxy.alive())
        mta.flush()
        mta.waitEmpty(30)
        carol = mta.deliveries("carol@example.test")
        self.assertIn("status=sent", carol[-1])
        self.assertEqual(len(new.messages("carol@example.test")), 1)
        self.assertEqual(len(old.messages("alice@example.test")), 1)
        self.assertEqual(old.messages("carol@example.test"), [])


class SinkFaultInjectionTests(_Base):
    """
    Real smtp-sink instances as fault-injecting backends, next to a healthy
    smtp-sink in the same transaction. (smtp-sink's options, as checked
    against Postfix 3.7: "-w N" delays the 354 reply to DATA; "-W .:N"
    delays the reply to the final dot; "-q CMD" disconnects without a reply
    after CMD, where "." is the end of data.)
    """

    def _pair(self, faultArgs, **options):
        """A faulty sink (@bad.test), a healthy sink (@ok.test), the proxy."""
        bad = peers.SmtpSink(self, name="bad", args=faultArgs)
        ok = peers.SmtpSink(self, name="ok")
        proxy = peers.Proxy(self, proxyConfig(
            {"bad": bad.backendConfig(), "ok": ok.backendConfig()},
            {"@bad.test": "bad", "@ok.test": "ok"}, **options))
        return bad, ok, proxy

    def test_sinkSlowerThanDataTimeoutDeferredOthersSentSessionUsable(self):
        """
        A sink that waits 3 s before answering the final dot, behind a proxy
        with data_timeout 1: after the dot its recipient gets 451 4.4.2
        within well under 3 s (the proxy gave up, it did not wait), the
        healthy sink's recipient in the same transaction gets 250 and is
        stored, and a second transaction on the same client connection is
        delivered.
        """
        bad, ok, proxy = self._pair(["-W", ".:3"], data_timeout=1)
        c = BlockingLMTPClient(proxy.target)
        try:
            c.lhlo()
            started = time.monotonic()
            first = c.transaction(SENDER, ["slow@bad.test", "fast@ok.test"],
                                  transparencyMessage(b"slow-1").replace(
                                      b"bare\rCR", b"no bare CR"))
            elapsed = time.monotonic() - started
            self.assertEqual([r.code for r in first["rcpt"]], [250, 250], c.lines)
            self.assertEqual(first["data"].code, 354, c.lines)
            self.assertEqual([(a, r.code) for a, r in first["final"]],
                             [("slow@bad.test", 451), ("fast@ok.test", 250)],
                             c.lines)
            self.assertTrue(first["final"][0][1].text.startswith("4.4.2"), c.lines)
            self.assertLess(elapsed, 2.8, "the proxy waited for the slow sink")
            second = c.transaction(SENDER, ["again@ok.test"],
                                   transparencyMessage(b"slow-2"))
            self.assertEqual([(a, r.code) for a, r in second["final"]],
                             [("again@ok.test", 250)], c.lines)
            self.assertEqual(c.command("NOOP").code, 250, c.lines)
        finally:
            c.quit()
        dumps = ok.waitDumps(2)
        rcpts = [peers.SmtpSink.parseDump(d)[0]["rcpt"] for d in dumps]
        self.assertEqual([[r.split()[0] for r in x] for x in rcpts],
                         [["<fast@ok.test>"], ["<again@ok.test>"]])
        self.assertTrue(proxy.alive(), proxy.log())

    def test_sinkDisconnectsAtRcpt(self):
        """
        A sink that drops the connection, without a reply, on RCPT: its
        recipient gets 451 4.4.x at RCPT (no 5xx), the other recipients of
        the transaction (on a healthy sink, before and after it in RCPT
        order) get 250 after the dot and are stored, and the bad sink
        never completes a message.
        """
        bad, ok, proxy = self._pair(["-q", "rcpt"])
        recipients = ["one@ok.test", "gone@bad.test", "two@ok.test"]
        result = lmtpDeliver(proxy.target, SENDER, recipients,
                             transparencyMessage(b"qrcpt"))
        lines = result["lines"]
        self.assertEqual([r.code for r in result["rcpt"]], [250, 451, 250], lines)
        self.assertTrue(result["rcpt"][1].text.startswith("4.4."), lines)
        self.assertEqual(result["data"].code, 354, lines)
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("one@ok.test", 250), ("two@ok.test", 250)], lines)
        info, body = peers.SmtpSink.parseDump(ok.waitDumps(1)[0])
        self.assertEqual([r.split()[0] for r in info["rcpt"]],
                         ["<one@ok.test>", "<two@ok.test>"])
        self.assertEqual(bad.messagesReceived(), 0, bad.output())

    def test_sinkDisconnectsAfterFinalDot(self):
        """
        A sink that takes the whole message and then drops the connection
        without answering the final dot ("-q ."): each of its two
        recipients gets 451 4.4.2 after the dot (one reply each, in RCPT
        order, interleaved with the healthy sink's), the healthy sink's
        recipient gets 250 and is stored, and the session then ends with
        QUIT's 221.
        """
        bad, ok, proxy = self._pair(["-q", "."])
        recipients = ["a@bad.test", "fine@ok.test", "b@bad.test"]
        result = lmtpDeliver(proxy.target, SENDER, recipients,
                             transparencyMessage(b"qdot"))
        lines = result["lines"]
        self.assertEqual([r.code for r in result["rcpt"]], [250, 250, 250], lines)
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("a@bad.test", 451), ("fine@ok.test", 250),
                          ("b@bad.test", 451)], lines)
        for i in (0, 2):
            self.assertTrue(result["final"][i][1].text.startswith("4.4.2"), lines)
        self.assertTrue(lines[-1].startswith("221"), lines)
        info, body = peers.SmtpSink.parseDump(ok.waitDumps(1)[0])
        self.assertEqual([r.split()[0] for r in info["rcpt"]], ["<fine@ok.test>"])

    def test_sinkDisconnectsAtDataCommand(self):
        """
        A sink that accepts RCPT but drops the connection on the DATA
        command ("-q data"): the client still gets 354 (the healthy sink
        takes the message), the faulty sink's recipient gets 451 4.4.x
        after the dot and the healthy sink's recipient 250.
        """
        bad, ok, proxy = self._pair(["-q", "data"])
        recipients = ["x@bad.test", "y@ok.test"]
        result = lmtpDeliver(proxy.target, SENDER, recipients,
                             transparencyMessage(b"qdata"))
        lines = result["lines"]
        self.assertEqual([r.code for r in result["rcpt"]], [250, 250], lines)
        self.assertEqual(result["data"].code, 354, lines)
        self.assertEqual([(a, r.code) for a, r in result["final"]],
                         [("x@bad.test", 451), ("y@ok.test", 250)], lines)
        self.assertTrue(result["final"][0][1].text.startswith("4.4."), lines)
        info, body = peers.SmtpSink.parseDump(ok.waitDumps(1)[0])
        self.assertEqual([r.split()[0] for r in info["rcpt"]], ["<y@ok.test>"])
        self.assertEqual(bad.messagesReceived(), 0, bad.output())

    def test_swaksPipelinedSlowSinkBelowDataTimeout(self):
        """
        swaks --pipeline through the proxy to three backends: a healthy
        sink, a sink that is slow (1 s before its 354 and 1 s before its
        end-of-data reply) but within data_timeout 10, and a Dovecot whose
        final reply names the recipient. Everyone gets 250 after the dot,
        in RCPT order: Dovecot's reply is third although Dovecot answered
        long before the slow sink; each sink stored the message once, for
        its own recipients.
        """
        slow = peers.SmtpSink(self, name="slow", args=["-w", "1", "-W", ".:1"])
        ok = peers.SmtpSink(self, name="ok")
        dove = peers.DovecotBackend(self, "old", tcp=True)
        proxy = peers.Proxy(self, proxyConfig(
            {"slow": slow.backendConfig(), "ok": ok.backendConfig(),
             "dove": dove.backendConfig()},
            {"@slow.test": "slow", "@ok.test": "ok", "@example.test": "dove"},
            data_timeout=10))
        recipients = ["s1@slow.test", "o1@ok.test", "alice@example.test",
                      "s2@slow.test"]
        started = time.monotonic()
        run = peers.swaks(proxy.target, [
            "--from", SENDER, "--to", ",".join(recipients),
            "--body", "pipelined through a slow sink"], pipeline=True)
        elapsed = time.monotonic() - started
        self.assertEqual(run.returncode, 0, run.stdout)
        self.assertRegex(run.stdout, r"-> MAIL FROM:<[^\n]*\n -> RCPT TO:<s1"
                         r"[^\n]*\n -> RCPT TO:<o1[^\n]*\n -> RCPT TO:<alice"
                         r"[^\n]*\n -> RCPT TO:<s2[^\n]*\n -> DATA\n")
        replies = peers.swaksReplies(run.stdout)
        dot = replies.index([r for r in replies if r.startswith("354")][0])
        self.assertEqual([r[:3] for r in replies[dot - 5:dot]],
                         ["250"] * 5, replies)
        final = [r for r in replies[dot + 1:] if not r.startswith("221")]
        self.assertEqual(len(final), 4, replies)
        for address, line in zip(recipients, final):
            self.assertTrue(line.startswith("250 "), (address, line, replies))
        self.assertIn("<alice@example.test>", final[2], replies)
        for i in (0, 1, 3):
            self.assertNotIn("example.test", final[i], replies)
        self.assertGreaterEqual(elapsed, 2.0, "the slow sink was not slow")
        info, body = peers.SmtpSink.parseDump(slow.waitDumps(1)[0])
        self.assertEqual([r.split()[0] for r in info["rcpt"]],
                         ["<s1@slow.test>", "<s2@slow.test>"])
        info, body = peers.SmtpSink.parseDump(ok.waitDumps(1)[0])
        self.assertEqual([r.split()[0] for r in info["rcpt"]], ["<o1@ok.test>"])
        self.assertEqual(len(dove.messages("alice@example.test")), 1)
