"""
The LMTP client that talks to one backend connection: on an in-memory
transport with a fake clock, and over real sockets to a L{FakeBackend}.
"""

import base64
import gc
import os
import socket
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from lmtp_proxy.client import (
    BackendAuthFailed,
    BackendError,
    BackendLost,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    LMTPClient,
    Reply,
    connectBackend,
    reply,
)
from lmtp_proxy.config import Backend
from tests.support import (
    PASSWORD,
    PLAIN_TOKEN,
    USER,
    FakeBackend,
    deadPort,
    handshaken,
    makeClient,
)



def failureOf(testcase, d, kind):
    """
    The exception C{d} already failed with; it must be a C{kind}.
    """
    return testcase.failureResultOf(d, kind).value


class HandshakeTests(unittest.TestCase):
    """
    Greeting, LHLO and the extensions it lists.
    """

    def test_lhloAfterGreeting(self):
        """
        LHLO goes out only once the 220 greeting arrived, and the handshake
        fires with the client once LHLO is answered.
        """
        client, transport, clock = makeClient()
        d = client.handshake("proxy.test")
        self.assertEqual(transport.value(), b"")
        client.dataReceived(b"220 backend.test LMTP ready\r\n")
        self.assertEqual(transport.value(), b"LHLO proxy.test\r\n")
        self.assertNoResult(d)
        client.dataReceived(b"250-backend.test\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n")
        self.assertIs(self.successResultOf(d), client)

    def test_extensionsParsed(self):
        """
        The LHLO keywords are upper-cased and mapped to their parameters;
        the first line (the backend's name) is not a keyword.
        """
        client, transport, clock, d = handshaken(
            [b"pipelining", b"SIZE 10240000", b"AUTH PLAIN LOGIN", b"8BITMIME"]
        )
        self.successResultOf(d)
        self.assertEqual(
            client.extensions,
            {"PIPELINING": "", "SIZE": "10240000", "AUTH": "PLAIN LOGIN", "8BITMIME": ""},
        )
        self.assertTrue(client.pipelining)

    def test_smtpSinkBareFinalLine(self):
        """
        smtp-sink ends its LHLO reply with a bare C{"250 "}: that empty line
        is ignored rather than refused or taken for a keyword.
        """
        client, transport, clock = makeClient()
        d = client.handshake("proxy.test")
        client.dataReceived(b"220 sink\r\n")
        client.dataReceived(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 \r\n")
        self.successResultOf(d)
        self.assertEqual(client.extensions, {"PIPELINING": "", "8BITMIME": ""})
        self.assertTrue(client.usable)

    def test_noPipeliningExtension(self):
        """
        Without PIPELINING in the LHLO reply the client does not pipeline.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        self.successResultOf(d)
        self.assertFalse(client.pipelining)

    def test_greetingNot220(self):
        """
        A 4xx greeting means the backend is unavailable; LHLO is not sent.
        """
        client, transport, clock = makeClient()
        d = client.handshake("proxy.test")
        client.dataReceived(b"421 4.3.2 busy\r\n")
        failureOf(self, d, BackendUnavailable)
        self.assertEqual(transport.value(), b"")

    def test_lhloRefused(self):
        """
        A backend that refuses LHLO (an SMTP server, say) is a protocol error.
        """
        client, transport, clock = makeClient()
        d = client.handshake("proxy.test")
        client.dataReceived(b"220 smtp\r\n")
        client.dataReceived(b"500 5.5.1 unknown command\r\n")
        failureOf(self, d, BackendProtocolError)

    def test_greetingTimeout(self):
        """
        A backend that never greets fails the handshake with a timeout after
        the command timeout, and the connection is dropped.
        """
        client, transport, clock = makeClient(timeout=2.0)
        d = client.handshake("proxy.test")
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failureOf(self, d, BackendTimeout)
        self.assertTrue(transport.disconnecting)


class ReplyParsingTests(unittest.TestCase):
    """
    Replies as they come off the wire.
    """

    def test_multilineReply(self):
        """
        The lines of a multi-line reply make one L{Reply}, in order.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"NOOP")
        client.dataReceived(b"250-first\r\n250-second\r\n")
        self.assertNoResult(r)
        client.dataReceived(b"250 third\r\n")
        self.assertEqual(self.successResultOf(r), Reply(250, ("first", "second", "third")))

    def test_nonAsciiDigitsAreNoCode(self):
        """
        A reply code must be three ASCII digits: Arabic-Indic digits (which
        int() would read as 233) make a bad reply, not a 2xx.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"RCPT TO:<a@x>")
        client.dataReceived("2\u0663\u0663 weird\r\n".encode("utf-8"))
        self.failureResultOf(r, BackendProtocolError)
        self.assertFalse(client.usable)

    def test_endlessReplyFails(self):
        """
        A reply that keeps sending continuation lines is cut off after
        C{MAX_REPLY_LINES} with a protocol error, instead of holding the
        command forever.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"NOOP")
        client.dataReceived(b"250-more\r\n" * LMTPClient.MAX_REPLY_LINES)
        self.assertNoResult(r)
        client.dataReceived(b"250-more\r\n")
        self.failureResultOf(r, BackendProtocolError)

    def test_421ClosesConnection(self):
        """
        A 421 means the backend is closing: it fails the command and every
        reply still awaited with L{BackendLost} (a 451 4.4.2 for the
        recipients), and the connection is dropped, instead of being passed
        on as a reply of its own.
        """
        client, transport, clock, d = handshaken()
        first = client.command(b"RCPT TO:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        client.dataReceived(b"421 4.3.2 shutting down\r\n")
        for r in (first, second):
            failure = self.failureResultOf(r, BackendLost)
            self.assertEqual(failure.value.reply.code, 451)
            self.assertTrue(failure.value.reply.lines[0].startswith("4.4.2"))
        self.assertFalse(client.usable)

    def test_replyWithoutText(self):
        """
        A bare three-digit code is a valid reply with an empty text.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"NOOP")
        client.dataReceived(b"250\r\n")
        self.assertEqual(self.successResultOf(r), Reply(250, ("",)))

    def test_replySplitAcrossReads(self):
        """
        A reply that arrives a few bytes at a time is still one reply.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"NOOP")
        for byte in b"250 2.0.0 Ok\r\n":
            client.dataReceived(bytes([byte]))
        self.assertEqual(self.successResultOf(r), Reply(250, ("2.0.0 Ok",)))

    def test_repliesGoToWaitersInOrder(self):
        """
        Pipelined commands get their replies in the order they were sent.
        """
        client, transport, clock, d = handshaken()
        first = client.command(b"MAIL FROM:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        client.dataReceived(b"250 2.1.0 sender ok\r\n550 5.1.1 no such user\r\n")
        self.assertEqual(self.successResultOf(first).code, 250)
        self.assertEqual(self.successResultOf(second), Reply(550, ("5.1.1 no such user",)))

    def _assertProtocolError(self, data):
        client, transport, clock, d = handshaken()
        first = client.command(b"MAIL FROM:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        client.dataReceived(data)
        failureOf(self, first, BackendProtocolError)
        failureOf(self, second, BackendProtocolError)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(client.usable)
        # A command after the fault fails at once and is not written.
        transport.clear()
        failureOf(self, client.command(b"RSET"), BackendProtocolError)
        self.assertEqual(transport.value(), b"")

    def test_garbageReply(self):
        """
        A line that is not a reply fails every waiter and drops the
        connection.
        """
        self._assertProtocolError(b"hello there\r\n")

    def test_badCodeClass(self):
        """
        A 1xx code or a non-digit code is not a reply.
        """
        self._assertProtocolError(b"150 go on\r\n")

    def test_badSeparator(self):
        """
        A code followed by anything but a space or a hyphen is not a reply.
        """
        self._assertProtocolError(b"250x ok\r\n")

    def test_shortLine(self):
        """
        A line shorter than a code is not a reply.
        """
        self._assertProtocolError(b"25\r\n")

    def test_inconsistentMultilineCodes(self):
        """
        A multi-line reply whose lines carry different codes is refused.
        """
        self._assertProtocolError(b"250-first\r\n251 second\r\n")

    def test_overlongLine(self):
        """
        A reply line longer than C{MAX_LENGTH} is garbage, not a reply.
        """
        self._assertProtocolError(b"250-" + b"x" * (LMTPClient.MAX_LENGTH + 10))

    def test_unexpectedReply(self):
        """
        A reply nobody waits for is a protocol error: the connection can no
        longer be trusted to pair replies with commands.
        """
        client, transport, clock, d = handshaken()
        client.dataReceived(b"421 4.4.2 idle timeout\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(client.usable)
        failureOf(self, client.command(b"MAIL FROM:<>"), BackendProtocolError)


class TimeoutTests(unittest.TestCase):
    """
    Every awaited reply has a deadline.
    """

    def test_commandTimeout(self):
        """
        No reply within the command timeout fails the command (and the
        others pending) with L{BackendTimeout} and drops the connection.
        """
        client, transport, clock, d = handshaken(timeout=3.0)
        first = client.command(b"MAIL FROM:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        clock.advance(2.9)
        self.assertNoResult(first)
        clock.advance(0.2)
        error = failureOf(self, first, BackendTimeout)
        failureOf(self, second, BackendTimeout)
        self.assertEqual(error.reply.code, 451)
        self.assertTrue(error.reply.lines[0].startswith("4.4.2 "))
        self.assertTrue(transport.disconnecting)

    def test_timerRestartsPerReply(self):
        """
        The deadline runs from the last reply received, so a slow but
        steady backend is not cut off in the middle of a pipeline.
        """
        client, transport, clock, d = handshaken(timeout=3.0)
        first = client.command(b"MAIL FROM:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        clock.advance(2.5)
        client.dataReceived(b"250 ok\r\n")
        self.successResultOf(first)
        clock.advance(2.5)
        self.assertNoResult(second)
        clock.advance(0.6)
        failureOf(self, second, BackendTimeout)

    def test_noTimerWhenIdle(self):
        """
        A connection nobody waits on never times out (the pool owns idle
        connections).
        """
        client, transport, clock, d = handshaken(timeout=3.0)
        self.successResultOf(d)
        clock.advance(1000)
        self.assertTrue(client.usable)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_expectRepliesOwnTimeout(self):
        """
        Replies awaited after the final dot use the timeout given to
        L{LMTPClient.expectReplies}, not the command timeout.
        """
        client, transport, clock, d = handshaken(timeout=1.0)
        data = client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        self.assertEqual(self.successResultOf(data).code, 354)
        client.writeData(b"hello\r\n.\r\n")
        first, second = client.expectReplies(2, 10.0)
        clock.advance(5)
        client.dataReceived(b"250 2.0.0 one\r\n")
        self.assertEqual(self.successResultOf(first), Reply(250, ("2.0.0 one",)))
        clock.advance(9.9)
        self.assertNoResult(second)
        clock.advance(0.2)
        failureOf(self, second, BackendTimeout)


class ConnectionLostTests(unittest.TestCase):
    """
    A connection that goes away fails everything waiting on it.
    """

    def test_lostFailsAllPending(self):
        """
        Every pending command fails with L{BackendLost}, and later ones fail
        at once.
        """
        client, transport, clock, d = handshaken()
        first = client.command(b"MAIL FROM:<a@b>")
        second = client.command(b"RCPT TO:<c@d>")
        client.connectionLost(Failure(ConnectionDone()))
        failureOf(self, first, BackendLost)
        failureOf(self, second, BackendLost)
        failureOf(self, client.command(b"RSET"), BackendLost)
        self.assertFalse(client.usable)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lostBeforeGreeting(self):
        """
        A backend that closes before greeting fails the handshake.
        """
        client, transport, clock = makeClient()
        d = client.handshake("proxy.test")
        client.connectionLost(Failure(ConnectionDone()))
        failureOf(self, d, BackendLost)

    def test_lostWhileMidReply(self):
        """
        A connection lost between the lines of a multi-line reply fails its
        waiter rather than handing it a partial reply.
        """
        client, transport, clock, d = handshaken()
        r = client.command(b"NOOP")
        client.dataReceived(b"250-first\r\n")
        client.connectionLost(Failure(ConnectionDone()))
        failureOf(self, r, BackendLost)

    def test_lostAfterPipelinedXclient(self):
        """
        A connection lost before a pipelining backend answered XCLIENT fails
        what L{LMTPClient.xclient} returned with L{BackendLost}, and leaves
        no failure unhandled.
        """
        client, transport, clock, d = handshaken()
        told = client.xclient(None, b"XCLIENT HELO=client.test")
        client.connectionLost(Failure(ConnectionDone()))
        failureOf(self, told, BackendLost)
        del told
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_abortWritesNothingMore(self):
        """
        After L{LMTPClient.abort} message data is not written any more, the
        connection is dropped and pending waiters fail.
        """
        client, transport, clock, d = handshaken()
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        client.writeData(b"part one\r\n")
        pending = client.expectReplies(1, 10)[0]
        transport.clear()
        client.abort()
        client.writeData(b"part two\r\n.\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        failureOf(self, pending, BackendLost)


class PipeliningTests(unittest.TestCase):
    """
    Commands go out all at once only to a backend that offers PIPELINING.
    """

    def test_withoutPipeliningOneAtATime(self):
        """
        Towards a backend without PIPELINING each command waits for the
        previous reply.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        mail = client.command(b"MAIL FROM:<a@b>")
        rcpt1 = client.command(b"RCPT TO:<c@d>")
        rcpt2 = client.command(b"RCPT TO:<e@f>")
        self.assertEqual(transport.value(), b"MAIL FROM:<a@b>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.successResultOf(mail)
        self.assertEqual(transport.value(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.successResultOf(rcpt1)
        self.assertEqual(
            transport.value(), b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n"
        )
        client.dataReceived(b"250 ok\r\n")
        self.successResultOf(rcpt2)

    def test_withPipeliningAllAtOnce(self):
        """
        Towards a PIPELINING backend every command is written at once.
        """
        client, transport, clock, d = handshaken([b"PIPELINING"])
        for line in (b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"RCPT TO:<e@f>", b"DATA"):
            client.command(line)
        self.assertEqual(
            transport.value(),
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n",
        )

    def test_withoutPipeliningAfterMultilineReply(self):
        """
        The held command goes out only after the last line of a multi-line
        reply, not after its first.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        client.command(b"NOOP")
        client.command(b"RSET")
        client.dataReceived(b"250-one\r\n")
        self.assertEqual(transport.value(), b"NOOP\r\n")
        client.dataReceived(b"250 two\r\n")
        self.assertEqual(transport.value(), b"NOOP\r\nRSET\r\n")

    def test_withoutPipeliningAfterData(self):
        """
        Towards a backend without PIPELINING, a command issued while the
        replies to the final dot are awaited waits for all of them.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        client.writeData(b"x\r\n.\r\n")
        replies = client.expectReplies(2, 10)
        transport.clear()
        rset = client.command(b"RSET")
        self.assertEqual(transport.value(), b"")
        client.dataReceived(b"250 one\r\n")
        self.assertEqual(transport.value(), b"")
        client.dataReceived(b"250 two\r\n")
        self.assertEqual(transport.value(), b"RSET\r\n")
        for r in replies:
            self.successResultOf(r)
        self.assertNoResult(rset)


class AuthTests(unittest.TestCase):
    """
    AUTH PLAIN or LOGIN when credentials are configured; never a credential
    in an error.
    """

    def assertNoSecrets(self, *things):
        for thing in things:
            for text in (str(thing), repr(thing)):
                self.assertNotIn(PASSWORD, text)
                self.assertNotIn(PLAIN_TOKEN.decode(), text)
                self.assertNotIn(base64.b64encode(PASSWORD.encode()).decode(), text)

    def test_plain(self):
        """
        AUTH PLAIN sends the RFC 4616 token in one line; 235 completes the
        handshake.
        """
        client, transport, clock, d = handshaken(
            [b"PIPELINING", b"AUTH PLAIN LOGIN"], user=USER, password=PASSWORD
        )
        self.assertEqual(transport.value(), b"AUTH PLAIN " + PLAIN_TOKEN + b"\r\n")
        self.assertNoResult(d)
        client.dataReceived(b"235 2.7.0 Authenticated\r\n")
        self.assertIs(self.successResultOf(d), client)

    def test_login(self):
        """
        A backend offering only LOGIN gets AUTH LOGIN, then the user name and
        the password, each after its 334.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH LOGIN"], user=USER, password=PASSWORD
        )
        self.assertEqual(transport.value(), b"AUTH LOGIN\r\n")
        transport.clear()
        client.dataReceived(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(transport.value(), base64.b64encode(USER.encode()) + b"\r\n")
        transport.clear()
        client.dataReceived(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(transport.value(), base64.b64encode(PASSWORD.encode()) + b"\r\n")
        self.assertNoResult(d)
        client.dataReceived(b"235 2.7.0 Authenticated\r\n")
        self.assertIs(self.successResultOf(d), client)

    def test_noAuthWithoutCredentials(self):
        """
        Without a configured user no AUTH is sent, whatever the backend
        offers.
        """
        client, transport, clock, d = handshaken([b"AUTH PLAIN"])
        self.successResultOf(d)
        self.assertEqual(transport.value(), b"")

    def test_plainRefusedKeepsSecrets(self):
        """
        A refused AUTH PLAIN fails with L{BackendAuthFailed} (a 4xx for the
        recipients) whose message and repr hold no credential.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH PLAIN"], user=USER, password=PASSWORD
        )
        client.dataReceived(b"535 5.7.8 Authentication credentials invalid\r\n")
        error = failureOf(self, d, BackendAuthFailed)
        self.assertEqual(error.reply.code, 451)
        self.assertNoSecrets(error, error.detail, error.reply, client, vars(client))

    def test_loginRefusedKeepsSecrets(self):
        """
        AUTH LOGIN refused after the password fails with
        L{BackendAuthFailed}, no credential in it.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH LOGIN"], user=USER, password=PASSWORD
        )
        client.dataReceived(b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n")
        client.dataReceived(b"535 5.7.8 no\r\n")
        error = failureOf(self, d, BackendAuthFailed)
        self.assertNoSecrets(error, error.detail, error.reply, client, vars(client))

    def test_loginRefusedAtOnce(self):
        """
        AUTH LOGIN answered with anything but 334 sends no credential at all.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH LOGIN"], user=USER, password=PASSWORD
        )
        client.dataReceived(b"504 5.5.4 mechanism not available\r\n")
        failureOf(self, d, BackendAuthFailed)
        self.assertEqual(transport.value(), b"AUTH LOGIN\r\n")

    def test_timeoutKeepsSecrets(self):
        """
        A backend that never answers AUTH times out without the error
        mentioning the credentials.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH PLAIN"], timeout=1.0, user=USER, password=PASSWORD
        )
        clock.advance(1.1)
        error = failureOf(self, d, BackendTimeout)
        self.assertNoSecrets(error, error.detail, error.reply, client)

    def test_garbageKeepsSecrets(self):
        """
        A protocol error during AUTH does not quote the AUTH line.
        """
        client, transport, clock, d = handshaken(
            [b"AUTH PLAIN"], user=USER, password=PASSWORD
        )
        client.dataReceived(b"what? " + PLAIN_TOKEN + b"\r\n")
        error = failureOf(self, d, BackendProtocolError)
        self.assertNoSecrets(error, error.detail, error.reply, client)

    def test_backendReprHidesPassword(self):
        """
        The backend definition's repr and description leave the password
        out.
        """
        backend = Backend(name="a", host="127.0.0.1", port=24, user=USER, password=PASSWORD)
        self.assertNotIn(PASSWORD, repr(backend))
        self.assertNotIn(PASSWORD, backend.describe())


class ReplyTests(unittest.TestCase):
    """
    L{Reply} values.
    """

    def test_enhancedCodeAdded(self):
        """
        A reply without an enhanced status code gets the generic X.0.0 of
        its class.
        """
        self.assertEqual(reply(250, "Ok").withEnhancedCode(), reply(250, "2.0.0 Ok"))
        self.assertEqual(reply(451, "later").withEnhancedCode(), reply(451, "4.0.0 later"))
        self.assertEqual(reply(550, "").withEnhancedCode(), reply(550, "5.0.0"))

    def test_enhancedCodeKept(self):
        """
        A reply that has an enhanced code on every line is left alone.
        """
        original = Reply(550, ("5.1.1 no such user", "5.1.1 really"))
        self.assertIs(original.withEnhancedCode(), original)

    def test_enhancedCodeOnlyWhereMissing(self):
        """
        In a multi-line reply only the lines without a code get one.
        """
        self.assertEqual(
            Reply(250, ("2.1.5 fine", "no code", "2.0.0")).withEnhancedCode(),
            Reply(250, ("2.1.5 fine", "2.0.0 no code", "2.0.0")),
        )

    def test_notAnEnhancedCode(self):
        """
        Text that merely starts with digits and dots is not taken for an
        enhanced code.
        """
        self.assertEqual(
            reply(250, "2.0.0.1 version").withEnhancedCode(),
            reply(250, "2.0.0 2.0.0.1 version"),
        )

    def test_toBytes(self):
        """
        A multi-line reply uses hyphens on all but its last line.
        """
        self.assertEqual(
            Reply(250, ("a", "b", "c")).toBytes(), b"250-a\r\n250-b\r\n250 c\r\n"
        )
        self.assertEqual(reply(451, "4.4.2 x").toBytes(), b"451 4.4.2 x\r\n")

    def test_backendErrorRepliesAreTransient(self):
        """
        Every backend fault becomes a 451 with its own enhanced code.
        """
        expected = {
            BackendError: "4.4.0",
            BackendUnavailable: "4.4.1",
            BackendTimeout: "4.4.2",
            BackendLost: "4.4.2",
            BackendProtocolError: "4.4.0",
            BackendAuthFailed: "4.7.0",
        }
        for kind, code in expected.items():
            result = kind("detail").reply
            self.assertEqual(result.code, 451)
            self.assertTrue(result.lines[0].startswith(code + " "), result)


class ConnectBackendTests(unittest.TestCase):
    """
    L{connectBackend} over real sockets.
    """

    def connect(self, backend, commandTimeout=2.0):
        d = connectBackend(reactor, backend, "proxy.test", 2.0, commandTimeout)

        def connected(client):
            self.addCleanup(client.abort)
            return client

        return d.addCallback(connected)

    @defer.inlineCallbacks
    def test_tcp(self):
        """
        Over TCP the client greets with LHLO and learns the extensions.
        """
        fake = FakeBackend(self)
        client = yield self.connect(Backend(name="a", **fake.entry))
        self.assertTrue(client.usable)
        self.assertTrue(client.pipelining)
        self.assertIn("8BITMIME", client.extensions)
        self.assertEqual(fake.commands, [b"LHLO proxy.test"])

    @defer.inlineCallbacks
    def test_tcpNoDelay(self):
        """
        Nagle's algorithm is off on backend connections, so a command is
        never held back behind an unacknowledged segment.
        """
        fake = FakeBackend(self)
        client = yield self.connect(Backend(name="a", **fake.entry))
        handle = client.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_nameLookupTimesOut(self):
        """
        A name lookup that never answers ends after the connect timeout as
        an unreachable backend.
        """
        @implementer(IHostResolution)
        class Pending:
            def __init__(self, name):
                self.name = name

            def cancel(self):
                pass

        @implementer(IHostnameResolver)
        class Silent:
            def resolveHostName(self, receiver, hostName, portNumber=0,
                                addressTypes=None, transportSemantics="TCP"):
                receiver.resolutionBegan(Pending(hostName))
                return receiver

        previous = reactor.installNameResolver(Silent())
        self.addCleanup(reactor.installNameResolver, previous)
        d = connectBackend(reactor, Backend(name="a", host="mail.example", port=24), "proxy.test", 0.2, 2.0)
        yield self.assertFailure(d, BackendUnavailable)

    @defer.inlineCallbacks
    def test_hostName(self):
        """
        A backend named by host name (not an address) is resolved and
        reached.
        """
        fake = FakeBackend(self)
        client = yield self.connect(Backend(name="a", host="localhost", port=fake.entry["port"]))
        self.assertEqual(fake.commands, [b"LHLO proxy.test"])
        self.assertTrue(client.usable)

    @defer.inlineCallbacks
    def test_ipv6Literal(self):
        """
        A backend at an IPv6 address literal is reached directly.
        """
        fake = FakeBackend(self)
        try:
            port = reactor.listenTCP(0, fake, interface="::1")
        except Exception as e:
            raise unittest.SkipTest("no IPv6 loopback here: %s" % (e,))
        self.addCleanup(port.stopListening)
        client = yield self.connect(Backend(name="a", host="::1", port=port.getHost().port))
        self.assertEqual(fake.commands, [b"LHLO proxy.test"])
        self.assertTrue(client.usable)

    @defer.inlineCallbacks
    def test_unixSocket(self):
        """
        Over a unix socket the same handshake happens.
        """
        path = tempfile.mktemp(prefix="lmtpc-", suffix=".sock", dir="/tmp")
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        fake = FakeBackend(self, unix=path, extensions=("8BITMIME",))
        client = yield self.connect(Backend(name="u", socket=path))
        self.assertFalse(client.pipelining)
        self.assertEqual(fake.commands, [b"LHLO proxy.test"])
        result = yield client.command(b"NOOP")
        self.assertEqual(result.code, 250)

    @defer.inlineCallbacks
    def test_authenticates(self):
        """
        A backend with credentials gets AUTH PLAIN after LHLO.
        """
        fake = FakeBackend(self, extensions=("PIPELINING", "AUTH PLAIN"))
        yield self.connect(Backend(name="a", user=USER, password=PASSWORD, **fake.entry))
        self.assertEqual(
            fake.commands, [b"LHLO proxy.test", b"AUTH PLAIN " + PLAIN_TOKEN]
        )

    @defer.inlineCallbacks
    def test_authRefusedCloses(self):
        """
        Refused credentials fail with L{BackendAuthFailed} and the connection
        is closed.
        """
        fake = FakeBackend(self, extensions=("PIPELINING", "AUTH PLAIN"))
        fake.actions["AUTH"] = b"535 5.7.8 no\r\n"
        d = self.connect(Backend(name="a", user=USER, password=PASSWORD, **fake.entry))
        error = yield self.assertFailure(d, BackendAuthFailed)
        self.assertNotIn(PASSWORD, str(error))
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(fake.open, set())

    @defer.inlineCallbacks
    def test_deadPort(self):
        """
        A port nothing listens on gives L{BackendUnavailable}.
        """
        d = self.connect(Backend(name="a", host="127.0.0.1", port=deadPort()))
        error = yield self.assertFailure(d, BackendUnavailable)
        self.assertEqual(error.reply.code, 451)
        self.assertTrue(error.reply.lines[0].startswith("4.4.1 "))

    @defer.inlineCallbacks
    def test_missingUnixSocket(self):
        """
        A unix socket path that does not exist gives L{BackendUnavailable}.
        """
        d = self.connect(Backend(name="u", socket="/tmp/lmtpc-does-not-exist.sock"))
        yield self.assertFailure(d, BackendUnavailable)

    @defer.inlineCallbacks
    def test_silentBackendTimesOut(self):
        """
        A backend that accepts the connection but never greets fails with
        L{BackendTimeout} after the command timeout, and is disconnected.
        """
        fake = FakeBackend(self)
        fake.greeting = None
        d = self.connect(Backend(name="a", **fake.entry), commandTimeout=0.2)
        yield self.assertFailure(d, BackendTimeout)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(fake.open, set())
