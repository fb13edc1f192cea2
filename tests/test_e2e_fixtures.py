"""
Checks of the end-to-end fixtures themselves (tests/peers.py and the
blocking face of tests/lmtpclient.py), against the real peers directly,
without the proxy. When a test in test_e2e_peers fails, these tell whether
the peers and the harness work on this machine.
"""

import os
import signal
import subprocess
import sys
import time

from twisted.trial import unittest

from tests import peers
from tests.lmtpclient import BlockingLMTPClient, dotStuff, lmtpDeliver
from tests.test_e2e_peers import SENDER, asStored, transparencyMessage


class RequirePeerTests(unittest.TestCase):

    def setUp(self):
        self.saved = os.environ.get("CI")
        self.addCleanup(self.restore)

    def restore(self):
        if self.saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = self.saved

    def test_missingPeerSkipsNamingThePackage(self):
        """
        Outside CI a missing peer command skips the test, and the reason
        names the Debian package that provides it.
        """
        os.environ.pop("CI", None)
        e = self.assertRaises(unittest.SkipTest, peers.requirePeer,
                              "smtp-sink", "no-such-peer-command-e2e")
        self.assertIn("no-such-peer-command-e2e", str(e))
        self.assertIn("tools/install-peers.sh", str(e))

    def test_missingPeerFailsUnderCI(self):
        """
        With CI=true a missing peer is a test failure (FailTest), not a skip.
        """
        os.environ["CI"] = "true"
        self.assertRaises(self.failureException, peers.requirePeer,
                          "no-such-peer-command-e2e")
        os.environ["CI"] = "false"
        self.assertRaises(unittest.SkipTest, peers.requirePeer,
                          "no-such-peer-command-e2e")

    def test_packageNames(self):
        """
        The skip reason for each peer command names its Debian package.
        """
        self.assertEqual(peers.PACKAGES["smtp-sink"], "postfix")
        self.assertEqual(peers.PACKAGES["dovecot"], "dovecot-core")
        self.assertEqual(peers.PACKAGES["/usr/lib/dovecot/lmtp"], "dovecot-lmtpd")
        self.assertEqual(peers.PACKAGES["swaks"], "swaks")


class HelperTests(unittest.TestCase):

    def test_freePortIsLoopbackAndFree(self):
        """freePort() returns a port that 127.0.0.1 can bind right away."""
        import socket
        port = peers.freePort()
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        finally:
            s.close()

    def test_dotStuff(self):
        """dotStuff doubles leading dots and adds the terminator."""
        self.assertEqual(dotStuff(b"a\r\n.b\r\n..c"),
                         b"a\r\n..b\r\n...c\r\n.\r\n")

    def test_stopPidTermThenKill(self):
        """
        stopPid() stops a process that ignores SIGTERM with SIGKILL, by its
        PID, within the given timeout.
        """
        p = subprocess.Popen([sys.executable, "-c",
                              "import signal, time\n"
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                              "print('ready', flush=True)\n"
                              "time.sleep(60)\n"],
                             stdout=subprocess.PIPE)
        self.addCleanup(p.stdout.close)
        self.assertEqual(p.stdout.readline(), b"ready\n")
        start = time.monotonic()
        peers.stopPid(p.pid, timeout=0.5, popen=p)
        self.assertEqual(p.returncode, -signal.SIGKILL)
        self.assertLess(time.monotonic() - start, 5)


class PeerTests(unittest.TestCase):
    timeout = 60

    def test_dovecotByteExactOverTcpAndUnix(self):
        """
        A Dovecot backend with a TCP and a unix listener delivers a
        pipelined transaction to each recipient's own maildir, greets with
        NAME.test, and stores the message byte for byte (LF line ends, bare
        CR kept) after its trace headers.
        """
        d = peers.DovecotBackend(self, "old", tcp=True,
                                 socket=os.path.join(peers.tempDir(self), "old.sock"))
        message = transparencyMessage(b"direct")
        for target, address in ((("127.0.0.1", d.port), "alice@example.test"),
                                (d.socket, "bob@example.test")):
            r = lmtpDeliver(target, SENDER, [address], message)
            self.assertIn("old.test", r["lines"][0])
            self.assertEqual([x.code for a, x in r["final"]], [250], r["lines"])
            trace, body = peers.dovecotBody(d.messages(address)[0], b"X-E2E-Id: direct")
            self.assertEqual(body, asStored(message))

    def test_swaksViaUnixSocket(self):
        """swaks --socket with --pipeline reaches a Dovecot unix socket."""
        d = peers.DovecotBackend(self, "new")
        run = peers.swaks(d.socket, ["--from", SENDER, "--to", "x@example.test"],
                          pipeline=True)
        self.assertEqual(run.returncode, 0, run.stdout)
        self.assertTrue(peers.swaksReplies(run.stdout)[-2].startswith("250 2.0.0 <x@example.test>"),
                        run.stdout)
        self.assertEqual(len(d.messages("x@example.test")), 1)

    def test_smtpSinkQuirksAndInjection(self):
        """
        smtp-sink in LMTP mode: LHLO ends with a bare "250 " line; its dump
        holds the message with LF line ends and bare CRs dropped; a
        transaction cut off mid-DATA leaves no dump; -r RCPT / -r . inject
        451 at RCPT and one 451 per recipient after DATA.
        """
        s = peers.SmtpSink(self)
        c = BlockingLMTPClient(s.target)
        self.assertEqual(c.lhlo().lines[-1], "250 ")
        c.quit()
        message = transparencyMessage(b"sink")
        r = lmtpDeliver(s.target, SENDER, ["a@sink.test", "b@sink.test"], message)
        self.assertEqual([x.code for a, x in r["final"]], [250, 250])
        info, body = peers.SmtpSink.parseDump(s.waitDumps(1)[0])
        self.assertEqual(info["rcpt"], ["<a@sink.test>", "<b@sink.test>"])
        self.assertEqual(body, asStored(message).replace(b"\r", b""))
        c = BlockingLMTPClient(s.target)
        c.lhlo()
        c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@sink.test>\r\nDATA\r\n")
        self.assertEqual([c.readReply().code for i in range(3)], [250, 250, 354])
        c.send(b"Subject: partial\r\n\r\nhalf")
        c.close()
        peers.waitFor(lambda: s.sessionsEnded() == 3, 5, what="sink session end")
        # the cut-off transaction's dump file is gone, and it was not counted
        self.assertEqual(len(s.dumps()), 1, (s.counters(), s.dumps()))
        self.assertEqual(s.messagesReceived(), 1, s.counters())

        r1 = peers.SmtpSink(self, args=peers.SmtpSink.tempfailRcpt("451 4.3.0 at rcpt"))
        r = lmtpDeliver(r1.target, SENDER, ["a@sink.test"], message)
        self.assertEqual(r["rcpt"][0].line, "451 4.3.0 at rcpt")
        r2 = peers.SmtpSink(self, args=peers.SmtpSink.tempfailData("451 4.3.0 at data"))
        r = lmtpDeliver(r2.target, SENDER, ["a@sink.test", "b@sink.test"], message)
        self.assertEqual([x.line for a, x in r["final"]], ["451 4.3.0 at data"] * 2)

    def test_postfixToDovecotDeferThenFlush(self):
        """
        The private Postfix delivers over lmtp:unix to Dovecot (status=sent,
        queue empty); pointed at a 451-at-RCPT sink it keeps the mail
        deferred in its queue; pointed back and flushed, it delivers.
        """
        d = peers.DovecotBackend(self, "new")
        s = peers.SmtpSink(self, args=peers.SmtpSink.tempfailRcpt("451 4.3.0 e2e at rcpt"))
        mta = peers.PostfixClient(self, d.socket)
        self.assertEqual(mta.send(SENDER, ["a@example.test", "b@example.test"], "hi\r\n"), {})
        mta.waitEmpty(20)
        self.assertIn("status=sent", mta.deliveries("a@example.test")[0])
        self.assertEqual(len(d.messages("b@example.test")), 1)
        mta.setTarget(s.target)
        time.sleep(0.5)
        mta.send(SENDER, "c@example.test", "hi\r\n")
        mta.waitLog(lambda t: "status=deferred" in t, 20)
        self.assertIn("451 4.3.0 e2e at rcpt", mta.queue())
        mta.setTarget(d.socket)
        time.sleep(0.5)
        mta.flush()
        mta.waitEmpty(20)
        self.assertEqual(len(d.messages("c@example.test")), 1)
