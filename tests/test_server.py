"""
The LMTP server's protocol logic (L{lmtp_proxy.server.LMTPServer}) against a
stub delivery, on a L{StringTransportWithDisconnection} with a L{Clock}: no
sockets, no backends, every backend answer fired by hand.
"""

import random
import re

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface import implementer

from lmtp_proxy import config as configuration
from lmtp_proxy.envelope import Path, Recipient
from lmtp_proxy.interfaces import (
    ILMTPDelivery,
    IMessage,
    IMessageDelivery,
    IMessageStream,
    ITransaction,
)
from lmtp_proxy.outbox import Outbox
from lmtp_proxy.reply import reply
from lmtp_proxy.server import (
    MAX_COMMAND_LINE,
    MAX_PENDING_INPUT,
    MAX_RCPTS_AHEAD,
    LMTPServer,
    _FinalReplies,
)
from lmtp_proxy.state import ProxyState

CONFIG = """\
config:
  socket: [127.0.0.1, 24]
  hostname: proxy.test
  idle_timeout: 30
  max_line_length: 1000
%s
backends:
  a: {host: 127.0.0.1, port: 2424}
users:
  "@a.test": a
"""

IDLE = 30
LINE_LIMIT = 1000
RCPT_OK = reply(250, "2.1.5 Ok")
RCPT_UNKNOWN = reply(550, "5.1.1 No such user here")
ENHANCED = re.compile(rb"^([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")


def delivered(address):
    return reply(250, "2.0.0 <%s> delivered" % (address.decode("utf-8"),))


class StubBackendSession:
    """
    Stands for one backend's share of a transaction: counts aborts.
    """

    def __init__(self):
        self.aborted = 0

    def abort(self):
        self.aborted += 1


@implementer(IMessageStream)
class StubMessage:
    """
    The message of one accepted recipient of a L{StubTransaction}.
    """

    def __init__(self, transaction, index, rcptReply):
        self.transaction = transaction
        self.index = index
        self.rcptReply = rcptReply

    def __call__(self):
        return self

    def lineReceived(self, line):
        raise AssertionError("a streaming message is never fed lines")

    def eomReceived(self):
        return self.transaction.verdicts[self.index]

    def connectionLost(self):
        raise AssertionError("the server ends an ILMTPDelivery's transaction itself")


@implementer(ITransaction)
class StubTransaction:
    """
    The transaction of a L{StubDelivery}, whose every answer the test
    controls.

    In automatic mode every RCPT gets its reply from C{delivery.rcptReplies}
    (default 250) and each accepted recipient gets L{delivered}; in manual
    mode the Deferreds in C{rcpts} and C{verdicts} wait for the test to fire
    them.

    @ivar failed: the refusals of messages that ended refused, one per
        message, recorded at the final dot.
    """

    def __init__(self, delivery, client, sender, params):
        self.delivery = delivery
        self.client = client
        self.sender = sender
        self.params = params
        self.rcpts = []
        self.accepted = []
        self.sessions = {"a": StubBackendSession()}
        self.written = []
        self.dataStarted = False
        self.pauseClient = self.resumeClient = None
        self.verdicts = None
        self.refused = None
        self.failed = []
        self.aborted = 0
        self.resets = 0

    def rcpt(self, user):
        address = user.dest.raw
        local, at, domain = user.dest.mailbox.rpartition("@")
        if not at:
            local, domain = user.dest.mailbox, None
        d = defer.Deferred()
        d.addCallback(self._rcptDone, address)
        self.rcpts.append((address, local, domain, user.dest.params, d))
        if self.delivery.auto:
            d.callback(self.delivery.rcptReplies.get(address, RCPT_OK))
        return d

    def _rcptDone(self, result, address):
        if not result.positive:
            raise smtp.SMTPServerError(result.code, "\n".join(result.lines))
        self.accepted.append(address)
        return StubMessage(self, len(self.accepted) - 1, result)

    def startData(self, pauseClient, resumeClient):
        self.pauseClient, self.resumeClient = pauseClient, resumeClient
        self.dataStarted = True

    def write(self, data):
        self.written.append(data)

    def endData(self):
        if self.refused is not None:
            # The server answers a refused message itself: no verdicts.
            self.failed.append(self.refused)
            return
        self.verdicts = [defer.Deferred() for _ in self.accepted]
        if self.delivery.auto:
            for d, address in zip(self.verdicts, self.accepted):
                d.callback(delivered(address))

    def refuse(self, result):
        self.refused = result
        self.sessions["a"].abort()

    def abort(self, why=None):
        self.aborted += 1

    def reset(self):
        self.resets += 1

    def body(self):
        return b"".join(self.written)

    def fireRcpt(self, index, result=RCPT_OK):
        self.rcpts[index][4].callback(result)


@implementer(ILMTPDelivery)
class StubDelivery:
    """
    The delivery avatar of one session: a L{StubTransaction} per MAIL.
    """

    def __init__(self, auto):
        self.auto = auto
        self.client = None
        self.rcptReplies = {}
        self.transactions = []

    def validateFrom(self, helo, origin):
        transaction = StubTransaction(self, self.client, origin.raw, origin.params)
        self.transactions.append(transaction)
        return origin

    def validateTo(self, user):
        return self.transactions[-1].rcpt(user)

    def receivedHeader(self, helo, origin, recipients):
        return None

    def resetTransaction(self):
        self.transactions[-1].reset()

    def abortTransaction(self, why):
        self.transactions[-1].abort(why)

    def identifyClient(self, identity):
        self.identity = identity


@implementer(IRealm)
class StubRealm:
    """
    Hands the one L{StubDelivery} of a test session out, naming its client.
    """

    def __init__(self, delivery):
        self.delivery = delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        if isinstance(self.delivery, StubDelivery):
            self.delivery.client = mind
        return IMessageDelivery, self.delivery, lambda: None


def parseReplies(data):
    """
    Split the bytes the server wrote into replies, each a list of lines.
    """
    replies, lines = [], []
    assert data == b"" or data.endswith(b"\r\n"), data
    for line in data.split(b"\r\n")[:-1]:
        lines.append(line)
        if line[3:4] != b"-":
            replies.append(lines)
            lines = []
    assert not lines, data
    return replies


class Session:
    """
    One server connected to a string transport, with a stub delivery.
    """

    def __init__(self, settings="", auto=True, peer=None, delivery=None):
        self.clock = Clock()
        self.state = ProxyState(configuration.parse(CONFIG % (settings,), "<test>"))
        self.delivery = StubDelivery(auto) if delivery is None else delivery
        portal = Portal(StubRealm(self.delivery), [AllowAnonymousAccess()])
        self.server = LMTPServer(portal, self.clock, lambda: self.state.config, Outbox())
        self.transport = StringTransportWithDisconnection(
            peerAddress=peer or IPv4Address("TCP", "192.0.2.1", 40000)
        )
        self.transport.protocol = self.server
        self.server.makeConnection(self.transport)

    def send(self, data):
        self.server.dataReceived(data)

    def replies(self):
        return parseReplies(self.transport.value())

    def codes(self):
        return [int(r[-1][:3]) for r in self.replies()]

    def last(self):
        return self.replies()[-1][-1].decode("utf-8")

    @property
    def transaction(self):
        return self.delivery.transactions[-1]

    @property
    def closed(self):
        return not self.transport.connected


def envelope(recipients, sender=b"s@example.test", lhlo=True):
    """
    The commands of one transaction up to and including DATA.
    """
    lines = [b"LHLO client.test"] if lhlo else []
    lines.append(b"MAIL FROM:<" + sender + b">")
    lines += [b"RCPT TO:<" + r + b">" for r in recipients]
    lines.append(b"DATA")
    return b"".join(line + b"\r\n" for line in lines)


def randomPieces(data, seed, largest=9):
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, largest)
        pieces.append(data[i : i + n])
        i += n
    return pieces


class ReplyAssertions:
    def assertEnhanced(self, line):
        """
        C{line} is a 2xx/4xx/5xx reply line with an RFC 3463 code of the
        same class.
        """
        match = ENHANCED.match(line)
        self.assertIsNotNone(match, line)
        self.assertEqual(match.group(1), match.group(2), line)


class GreetingAndSimpleCommandTests(ReplyAssertions, unittest.TestCase):
    """
    The greeting, LHLO and the commands that need no transaction.
    """

    def test_greeting(self):
        """
        A new connection is greeted with one 220 naming the host.
        """
        s = Session()
        self.assertEqual(s.replies(), [[b"220 proxy.test LMTP lmtp-proxy ready"]])

    def test_lhloExtensions(self):
        """
        LHLO answers 250 with the hostname first, then PIPELINING,
        ENHANCEDSTATUSCODES, 8BITMIME and a bare SIZE when no size limit is
        configured.
        """
        s = Session()
        s.send(b"LHLO client.test\r\n")
        lhlo = s.replies()[1]
        self.assertEqual({int(line[:3]) for line in lhlo}, {250})
        self.assertEqual(lhlo[0], b"250-proxy.test")
        keywords = [line[4:] for line in lhlo[1:]]
        for keyword in (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"8BITMIME", b"SIZE"):
            self.assertIn(keyword, keywords)

    def test_lhloNoDSN(self):
        """
        DSN is not offered: the proxy cannot promise it for every backend.
        """
        s = Session()
        s.send(b"LHLO client.test\r\n")
        keywords = [line[4:] for line in s.replies()[1][1:]]
        self.assertNotIn(b"DSN", keywords)

    def test_lhloSizeLimit(self):
        """
        With max_message_size set, LHLO offers C{SIZE <n>}.
        """
        s = Session("  max_message_size: 10000")
        s.send(b"LHLO client.test\r\n")
        keywords = [line[4:] for line in s.replies()[1]]
        self.assertIn(b"SIZE 10000", keywords)
        self.assertNotIn(b"SIZE", keywords)

    def test_lhloWithoutHostname(self):
        """
        LHLO with no argument is a 501 syntax error and does not greet.
        """
        s = Session()
        s.send(b"LHLO\r\nMAIL FROM:<a@b>\r\n")
        self.assertEqual(s.codes(), [220, 501, 503])

    def test_heloRefused(self):
        """
        HELO gets 500 5.5.1: an LMTP server must not accept it (RFC 2033 4.1).
        """
        s = Session()
        s.send(b"HELO client.test\r\n")
        self.assertEqual(s.codes()[1], 500)
        self.assertTrue(s.last().startswith("500 5.5.1 "), s.last())

    def test_ehloRefused(self):
        """
        EHLO gets 500 5.5.1 and does not count as a greeting.
        """
        s = Session()
        s.send(b"EHLO client.test\r\nMAIL FROM:<a@b>\r\n")
        self.assertEqual(s.codes(), [220, 500, 503])
        self.assertTrue(s.replies()[1][0].startswith(b"500 5.5.1 "))

    def test_noop(self):
        """
        NOOP answers 250 2.0.0, before and after LHLO.
        """
        s = Session()
        s.send(b"NOOP\r\nLHLO c\r\nNOOP hello\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 250])
        self.assertTrue(s.last().startswith("250 2.0.0"))

    def test_rset(self):
        """
        RSET answers 250 and resets the transaction in progress, so a new
        MAIL is accepted.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\nMAIL FROM:<c@d>\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 250, 250])
        first, second = s.delivery.transactions
        self.assertEqual((first.resets, first.aborted), (1, 0))
        self.assertEqual(second.sender, b"c@d")

    def test_vrfy(self):
        """
        VRFY answers 252 2.x.x (cannot verify, will attempt delivery).
        """
        s = Session()
        s.send(b"VRFY bob\r\n")
        self.assertEqual(s.codes(), [220, 252])
        self.assertEnhanced(s.replies()[1][0])

    def test_quit(self):
        """
        QUIT answers 221 2.0.0, closes the connection, and nothing sent after
        it is answered.
        """
        s = Session()
        s.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 221])
        self.assertTrue(s.last().startswith("221 2.0.0"))
        self.assertTrue(s.closed)

    def test_unknownCommand(self):
        """
        An unknown command gets 500 5.5.x and the session goes on.
        """
        s = Session()
        s.send(b"FROB x\r\n\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 500, 500, 250])
        self.assertTrue(s.replies()[1][0].startswith(b"500 5.5."))

    def test_enhancedCodeOnEveryReply(self):
        """
        Every reply but the greeting, LHLO's and the 354 intermediate (RFC
        3463 has no class 3) carries an enhanced status code of its class,
        errors included.
        """
        s = Session("  max_message_size: 10000")
        s.send(
            b"NOOP\r\nMAIL FROM:<a@b>\r\nHELO x\r\nEHLO x\r\nFROB\r\n"
            b"LHLO c\r\nNOOP\r\nVRFY a\r\nVRFY\r\nHELP\r\nRSET\r\nAUTH\r\n"
            b"AUTH PLAIN abc\r\nSTARTTLS\r\nRCPT TO:<u@a.test>\r\nDATA\r\n"
            b"MAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b> SIZE=99999\r\n"
            b"MAIL FROM:<a@b> SIZE=x\r\nMAIL FRM:<a@b>\r\nMAIL FROM:<j\xc3\xb6@b>\r\n"
            b"NOOP \xff\r\n" + b"N" * (MAX_COMMAND_LINE + 10) + b"\r\n"
            b"MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<>\r\n"
            b"RCPT TO:<u@a.test> FOO=1\r\nRCPT TO:<j\xc3\xb6@a.test>\r\nDATA\r\n"
            b"RCPT TO:<u@a.test>\r\nRCPT TO:<v@a.test>\r\nDATA\r\nhello\r\n.\r\n"
            b"MAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\nDATA\r\nbad\nline\r\n.\r\n"
            b"QUIT\r\n"
        )
        replies = s.replies()
        codes = s.codes()
        self.assertEqual(codes[-1], 221)
        self.assertEqual(len(replies), 40)
        lhlo = 6
        self.assertGreater(len(replies[lhlo]), 1)
        for i, lines in enumerate(replies):
            if i in (0, lhlo) or codes[i] == 354:
                continue
            for line in lines:
                self.assertEnhanced(line)

    def test_helpAndUnimplemented(self):
        """
        HELP answers 214; STARTTLS, EXPN, ETRN, TURN and BDAT answer 502.
        """
        s = Session()
        s.send(b"HELP\r\nSTARTTLS\r\nEXPN x\r\nETRN x\r\nTURN\r\nBDAT 10\r\n")
        self.assertEqual(s.codes(), [220, 214, 502, 502, 502, 502, 502])


class SequenceAndSyntaxTests(unittest.TestCase):
    """
    Commands in the wrong order, bad syntax, and the MAIL/RCPT parameters.
    """

    def test_mailBeforeLhlo(self):
        """
        MAIL before LHLO gets 503 5.5.1 and begins no transaction.
        """
        s = Session()
        s.send(b"MAIL FROM:<a@b>\r\n")
        self.assertEqual(s.codes(), [220, 503])
        self.assertTrue(s.last().startswith("503 5.5.1"))
        self.assertEqual(s.delivery.transactions, [])

    def test_nestedMail(self):
        """
        A second MAIL within a transaction gets 503 5.5.1 and leaves the
        first transaction alone.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<c@d>\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 503])
        self.assertTrue(s.last().startswith("503 5.5.1"))
        self.assertEqual(len(s.delivery.transactions), 1)
        self.assertEqual((s.transaction.aborted, s.transaction.resets), (0, 0))

    def test_rcptBeforeMail(self):
        """
        RCPT without MAIL gets 503 5.5.1.
        """
        s = Session()
        s.send(b"LHLO c\r\nRCPT TO:<u@a.test>\r\n")
        self.assertEqual(s.codes(), [220, 250, 503])
        self.assertTrue(s.last().startswith("503 5.5.1"))

    def test_dataWithoutMail(self):
        """
        DATA without MAIL gets 503 5.5.1.
        """
        s = Session()
        s.send(b"LHLO c\r\nDATA\r\n")
        self.assertEqual(s.codes(), [220, 250, 503])
        self.assertTrue(s.last().startswith("503 5.5.1"))

    def test_dataWithoutAcceptedRecipient(self):
        """
        DATA when every RCPT was refused gets 503 5.5.1, does not start the
        data phase, and the following lines are commands again.
        """
        s = Session()
        s.delivery.rcptReplies[b"u@a.test"] = RCPT_UNKNOWN
        s.send(envelope([b"u@a.test"]) + b"NOOP\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 550, 503, 250])
        self.assertTrue(s.replies()[4][0].startswith(b"503 5.5.1"))
        self.assertFalse(s.transaction.dataStarted)

    def test_badMailSyntax(self):
        """
        MAIL without C{FROM:}, with an unclosed path or with a parameter that
        is no esmtp-keyword gets 501.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL\r\nMAIL TO:<a@b>\r\nMAIL FROM:<a@b\r\n"
            b"MAIL FROM:<a@b> =1\r\nMAIL FROM:<a@b> -X=1\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 501, 501, 501, 501, 501])
        self.assertEqual(s.delivery.transactions, [])

    def test_nonAsciiKeyword(self):
        """
        A non-ASCII parameter keyword that str.upper() would turn into an
        ASCII one ("\u017fIZE" -> "SIZE") is a 501, never passed on as SIZE.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> SMTPUTF8 \xc5\xbfIZE=5\r\n")
        self.assertEqual(s.codes(), [220, 250, 501])
        self.assertEqual(s.delivery.transactions, [])

    def test_badRcptSyntax(self):
        """
        RCPT without C{TO:}, with an empty path or a path without a local part
        or domain gets 501, and the backend is not asked.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT\r\nRCPT FROM:<u@a.test>\r\n"
            b"RCPT TO:<>\r\nRCPT TO:<@a.test>\r\nRCPT TO:<u@>\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250, 501, 501, 501, 501, 501])
        self.assertEqual(s.transaction.rcpts, [])

    def test_unknownMailParameter(self):
        """
        An unknown MAIL parameter gets 555 and begins no transaction.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> XFOO=1\r\n")
        self.assertEqual(s.codes(), [220, 250, 555])
        self.assertTrue(s.last().startswith("555 5.5.4"))
        self.assertEqual(s.delivery.transactions, [])

    def test_unknownRcptParameter(self):
        """
        An unknown RCPT parameter (here a MAIL-only one) gets 555.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test> SIZE=10\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 555])
        self.assertEqual(s.transaction.rcpts, [])

    def test_badParameterValue(self):
        """
        A known parameter with a malformed value gets 501.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b> SIZE=ten\r\nMAIL FROM:<a@b> BODY=9BIT\r\n"
            b"MAIL FROM:<a@b> RET=ALL\r\nMAIL FROM:<a@b>\r\n"
            b"RCPT TO:<u@a.test> NOTIFY=SOMETIMES\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 501, 501, 501, 250, 501])

    def test_nonAsciiParameterValue(self):
        """
        A parameter value with non-ASCII letters that case folding would turn
        into a valid one (dotless i, long s) gets 501, even in a SMTPUTF8
        transaction.
        """
        s = Session()
        s.send(
            "LHLO c\r\nMAIL FROM:<a@b> BODY=8b\u0131tm\u0131me\r\n"
            "MAIL FROM:<a@b> SMTPUTF8\r\n"
            "RCPT TO:<u@a.test> NOTIFY=\u017fuccess\r\n".encode("utf-8")
        )
        self.assertEqual(s.codes(), [220, 250, 501, 250, 501])
        self.assertEqual(s.transaction.rcpts, [])

    def test_controlCharacterInAddress(self):
        """
        A NUL or bare CR inside an address gets 501 and is never passed on.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v\x00\rw@a.test>\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 501])
        self.assertEqual(s.transaction.rcpts, [])

    def test_sizeOverLimit(self):
        """
        MAIL with SIZE above max_message_size gets 552 5.3.4 and begins no
        transaction; SIZE at the limit is accepted.
        """
        s = Session("  max_message_size: 10000")
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> SIZE=10001\r\nMAIL FROM:<a@b> SIZE=10000\r\n")
        self.assertEqual(s.codes(), [220, 250, 552, 250])
        self.assertTrue(s.replies()[2][0].startswith(b"552 5.3.4"))
        self.assertEqual(len(s.delivery.transactions), 1)

    def test_sizeWithoutLimit(self):
        """
        Without max_message_size any SIZE is accepted.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> SIZE=99999999999\r\n")
        self.assertEqual(s.codes(), [220, 250, 250])

    def test_nonAsciiSizeDigits(self):
        """
        A SIZE value of non-ASCII digits (U+00B2, which C{str.isdigit}
        accepts) in an SMTPUTF8 MAIL is a 501 syntax error, not an internal
        error.
        """
        s = Session("  max_message_size: 10000")
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> SMTPUTF8 SIZE=\xc2\xb2\r\n")
        self.assertEqual(s.codes(), [220, 250, 501])
        self.assertEqual(s.delivery.transactions, [])

    def test_mailParametersPassedOn(self):
        """
        SIZE, BODY, SMTPUTF8, RET and ENVID reach the transaction as
        (upper-case keyword, raw token) pairs, in order.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b> size=100 BODY=8BITMIME SMTPUTF8 RET=hdrs "
            b"ENVID=QQ314159\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250])
        self.assertEqual(
            s.transaction.params,
            [
                (b"SIZE", b"size=100"),
                (b"BODY", b"BODY=8BITMIME"),
                (b"SMTPUTF8", b"SMTPUTF8"),
                (b"RET", b"RET=hdrs"),
                (b"ENVID", b"ENVID=QQ314159"),
            ],
        )

    def test_rcptParametersPassedOn(self):
        """
        NOTIFY and ORCPT reach C{rcpt} as (keyword, raw token) pairs.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b>\r\n"
            b"RCPT TO:<u@a.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2B@a.test\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250, 250])
        self.assertEqual(
            s.transaction.rcpts[0][3],
            [(b"NOTIFY", b"NOTIFY=SUCCESS,FAILURE"), (b"ORCPT", b"ORCPT=rfc822;u+2B@a.test")],
        )

    def test_senderAndClient(self):
        """
        The transaction gets the sender exactly as sent (the null sender as
        empty bytes) and the client's address.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<Some.One+x@Example.TEST>\r\nRSET\r\nMAIL FROM:<>\r\n")
        first, second = s.delivery.transactions
        self.assertEqual(first.sender, b"Some.One+x@Example.TEST")
        self.assertEqual(first.client, "192.0.2.1:40000")
        self.assertEqual(second.sender, b"")

    def test_bareLocalPart(self):
        """
        C{RCPT TO:<bob>} routes with local "bob" and no domain; no default
        domain is made up (pitfall 13).
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<bob>\r\n")
        address, local, domain, params, _ = s.transaction.rcpts[0]
        self.assertEqual((address, local, domain, params), (b"bob", "bob", None, []))

    def test_addressKeptAsSent(self):
        """
        The recipient address is passed on exactly as sent (case and +detail
        kept) and split at the last "@".
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<Bob.Smith+Lists@Example.TEST>\r\n")
        address, local, domain, _, _ = s.transaction.rcpts[0]
        self.assertEqual(address, b"Bob.Smith+Lists@Example.TEST")
        self.assertEqual((local, domain), ("Bob.Smith+Lists", "Example.TEST"))

    def test_sourceRoute(self):
        """
        An RFC 5321 source route is passed on as sent but routed by the
        mailbox after it.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<@relay.test:u@a.test>\r\n")
        address, local, domain, _, _ = s.transaction.rcpts[0]
        self.assertEqual((address, local, domain), (b"@relay.test:u@a.test", "u", "a.test"))

    def test_rcptReplyPassedOn(self):
        """
        The transaction's reply to RCPT is what the client gets.
        """
        s = Session()
        s.delivery.rcptReplies[b"x@a.test"] = reply(451, "4.2.1 Mailbox busy")
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@a.test>\r\n")
        self.assertEqual(s.last(), "451 4.2.1 Mailbox busy")


class PipeliningTests(unittest.TestCase):
    """
    Replies go out strictly in command order, however late the backends
    answer (pitfalls 7 and 8).
    """

    def test_repliesToOneChunkLeaveInOneWrite(self):
        """
        The replies that one chunk of pipelined commands gets at once leave
        in a single write, not one segment each.
        """
        s = Session()
        writes = []
        s.transport.write = writes.append
        s.send(b"LHLO client.test\r\nNOOP\r\nNOOP\r\nRSET\r\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual([r[-1][:3] for r in parseReplies(writes[0])], [b"250"] * 4)

    def test_lateAnswersInOrder(self):
        """
        A whole transaction and QUIT in one write: each RCPT is answered only
        when its Deferred fires, the final verdicts fired in reverse order
        still go out in RCPT order, one per accepted recipient, and QUIT is
        answered last.
        """
        s = Session(auto=False)
        s.send(envelope([b"x@a.test", b"y@a.test", b"z@a.test"]) + b"hello\r\n.\r\nQUIT\r\n")
        self.assertEqual(s.codes(), [220, 250, 250])
        t = s.transaction
        self.assertEqual(len(t.rcpts), 3)
        t.fireRcpt(0)
        self.assertEqual(s.codes(), [220, 250, 250, 250])
        t.fireRcpt(1, RCPT_UNKNOWN)
        t.fireRcpt(2)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 550, 250, 354])
        self.assertEqual(t.accepted, [b"x@a.test", b"z@a.test"])
        self.assertTrue(t.dataStarted)
        self.assertEqual(t.body(), b"hello\r\n")
        self.assertEqual(len(t.verdicts), 2)
        t.verdicts[1].callback(delivered(b"z@a.test"))
        self.assertEqual(s.codes()[-1], 354)
        self.assertFalse(s.closed)
        t.verdicts[0].callback(delivered(b"x@a.test"))
        replies = s.replies()
        self.assertEqual(
            [r[-1] for r in replies[7:]],
            [b"250 2.0.0 <x@a.test> delivered", b"250 2.0.0 <z@a.test> delivered", b"221 2.0.0 Bye"],
        )
        self.assertTrue(s.closed)

    def test_pipelinedRcptsStartTogether(self):
        """
        RCPTs pipelined behind a RCPT whose backend has not answered are
        started at once, whatever their case; the command after them is
        not run before all of them are answered.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@a.test>\r\n")
        s.send(b"rcpt to:<y@a.test>\r\nRCPT TO:<z@a.test>\r\nRSET\r\n")
        t = s.transaction
        self.assertEqual([r[0] for r in t.rcpts], [b"x@a.test", b"y@a.test", b"z@a.test"])
        self.assertEqual(s.codes(), [220, 250, 250])
        t.fireRcpt(2)
        t.fireRcpt(1)
        self.assertEqual((s.codes(), t.resets), ([220, 250, 250], 0))
        t.fireRcpt(0)
        self.assertEqual((s.codes(), t.resets), ([220, 250, 250, 250, 250, 250, 250], 1))

    def test_pipelinedRcptAnswersInRcptOrder(self):
        """
        Pipelined RCPTs answered by their backends in reverse order, and one
        refused at once, get their replies in RCPT order; so do the final
        replies of the recipients accepted.
        """
        s = Session(auto=False)
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@a.test>\r\nRCPT TO:<y@a.test>\r\n"
            b"RCPT TO:<bad\r\nRCPT TO:<z@a.test>\r\nDATA\r\nhello\r\n.\r\n"
        )
        t = s.transaction
        self.assertEqual(len(t.rcpts), 3)
        t.fireRcpt(2)
        t.fireRcpt(1, RCPT_UNKNOWN)
        self.assertEqual(s.codes(), [220, 250, 250])
        t.fireRcpt(0)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 550, 501, 250, 354])
        self.assertEqual(t.accepted, [b"z@a.test", b"x@a.test"])
        for d, address in zip(t.verdicts, t.accepted):
            d.callback(delivered(address))
        self.assertEqual(
            [r[-1] for r in s.replies()[8:]],
            [b"250 2.0.0 <x@a.test> delivered", b"250 2.0.0 <z@a.test> delivered"],
        )

    def test_rcptsAheadCapped(self):
        """
        At most MAX_RCPTS_AHEAD RCPTs are started behind the one awaited;
        the rest start as replies leave.
        """
        s = Session(auto=False)
        rcpts = b"".join(b"RCPT TO:<u%d@a.test>\r\n" % (i,) for i in range(MAX_RCPTS_AHEAD + 3))
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\n" + rcpts)
        t = s.transaction
        self.assertEqual(len(t.rcpts), MAX_RCPTS_AHEAD + 1)
        t.fireRcpt(0)
        self.assertEqual(len(t.rcpts), MAX_RCPTS_AHEAD + 2)
        self.assertEqual(s.codes(), [220, 250, 250, 250])

    def test_longRcptLineNotReadAhead(self):
        """
        A RCPT line over MAX_COMMAND_LINE pipelined behind a pending RCPT
        is not started: once the replies before it left, it is refused as
        too long.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@a.test>\r\n")
        s.send(b"RCPT TO:<" + b"y" * MAX_COMMAND_LINE + b"@a.test>\r\nNOOP\r\n")
        self.assertEqual(len(s.transaction.rcpts), 1)
        s.transaction.fireRcpt(0)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 500, 250])
        self.assertIn(b"too long", s.replies()[4][-1])
        self.assertEqual(len(s.transaction.rcpts), 1)

    def test_rcptNotReadAheadOfMail(self):
        """
        A RCPT pipelined behind a MAIL whose validation is still pending
        waits for it: only RCPTs behind a RCPT start early.
        """
        s = Session(auto=False)
        pending = defer.Deferred()
        validateFrom = s.delivery.validateFrom
        s.delivery.validateFrom = lambda helo, origin: pending.addCallback(
            lambda _: validateFrom(helo, origin)
        )
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@a.test>\r\n")
        self.assertEqual((s.codes(), s.delivery.transactions), ([220, 250], []))
        pending.callback(None)
        self.assertEqual(s.codes(), [220, 250, 250])
        self.assertEqual(len(s.transaction.rcpts), 1)

    def test_nothingAnsweredWhileRcptPending(self):
        """
        While a RCPT's reply is awaited, the commands after it are neither
        answered nor executed, even when they arrive later.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\nNOOP\r\n")
        s.send(b"RSET\r\nVRFY x\r\n")
        self.assertEqual(s.codes(), [220, 250, 250])
        self.assertEqual(s.transaction.resets, 0)
        s.transaction.fireRcpt(0)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 250, 250, 252])
        self.assertEqual(s.transaction.resets, 1)

    def test_commandsAfterDotWaitForVerdicts(self):
        """
        A MAIL pipelined after the final dot begins no transaction and gets
        no reply before every verdict of the message is sent.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        s.transaction.fireRcpt(0)
        s.send(b"body\r\n.\r\nMAIL FROM:<next@b>\r\n")
        self.assertEqual(len(s.delivery.transactions), 1)
        self.assertEqual(s.codes()[-1], 354)
        s.delivery.transactions[0].verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-2:], [250, 250])
        self.assertEqual(s.replies()[-2][0], b"250 2.0.0 <u@a.test> delivered")
        self.assertEqual(s.transaction.sender, b"next@b")

    def test_severalTransactions(self):
        """
        Several transactions on one connection, pipelined, each get their own
        transaction object, body and verdicts.
        """
        s = Session()
        s.send(
            envelope([b"u@a.test"]) + b"one\r\n.\r\n"
            + envelope([b"v@a.test", b"w@a.test"], sender=b"t@b", lhlo=False)
            + b"two\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(
            s.codes(), [220, 250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 250, 221]
        )
        first, second = s.delivery.transactions
        self.assertEqual((first.body(), first.accepted), (b"one\r\n", [b"u@a.test"]))
        self.assertEqual((second.body(), second.accepted), (b"two\r\n", [b"v@a.test", b"w@a.test"]))
        self.assertEqual(second.sender, b"t@b")

    def test_failedRcptStillAnswered(self):
        """
        A RCPT whose Deferred fails gets a 451 4.3.0 and the session goes on.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\nNOOP\r\n")
        s.transaction.rcpts[0][4].errback(RuntimeError("boom"))
        self.assertEqual(s.codes(), [220, 250, 250, 451, 250])
        self.assertTrue(s.replies()[3][0].startswith(b"451 4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failedVerdictStillAnswered(self):
        """
        A final verdict whose Deferred fails gets a 451 4.3.0 of its own; the
        other recipients still get theirs, so the replies stay in step with
        the commands.
        """
        s = Session(auto=False)
        s.send(envelope([b"x@a.test", b"y@a.test"]))
        t = s.transaction
        t.fireRcpt(0)
        t.fireRcpt(1)
        s.send(b"hi\r\n.\r\nNOOP\r\n")
        t.verdicts[0].errback(RuntimeError("boom"))
        t.verdicts[1].callback(delivered(b"y@a.test"))
        self.assertEqual(s.codes()[-3:], [451, 250, 250])
        self.assertTrue(s.replies()[-3][0].startswith(b"451 4.3.0"))
        self.assertEqual(s.replies()[-2][0], b"250 2.0.0 <y@a.test> delivered")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


BODY = (
    b"no colon on this first line\r\n"
    b"Subject: \xe9t\xe9 \xff\x80\r\n"
    b"\r\n"
    b"..leading dot, stuffed\r\n"
    b"a line ending in a dot.\r\n"
    b"bare\rCR in the middle\r\n"
    b"...\r\n"
    b"\r\n"
    b"last line\r\n"
)


class DataTests(unittest.TestCase):
    """
    The message is relayed byte for byte, still dot-stuffed.
    """

    def deliver(self, pieces):
        s = Session()
        s.send(envelope([b"u@a.test", b"v@a.test"]))
        for piece in pieces:
            s.send(piece)
        return s

    def assertRelayed(self, s):
        t = s.transaction
        self.assertEqual(t.body(), BODY)
        self.assertEqual(t.failed, [])
        self.assertEqual(s.codes()[-2:], [250, 250])
        self.assertEqual(len(s.replies()), 8)

    def test_oneChunk(self):
        """
        The bytes given to write() are the client's dot-stuffed bytes exactly:
        CRLF, 8-bit bytes, ".." lines, a line ending in a dot, a bare CR
        inside a line and a first line without ":" (no header or blank line
        is added, pitfall 6).
        """
        self.assertRelayed(self.deliver([BODY + b".\r\n"]))

    def test_byteByByte(self):
        """
        The same bytes are relayed when the client sends one byte at a time.
        """
        data = BODY + b".\r\n"
        self.assertRelayed(self.deliver([data[i : i + 1] for i in range(len(data))]))

    def test_randomSplits(self):
        """
        The same bytes are relayed whatever the chunking (seeded random
        splits).
        """
        for seed in range(20):
            self.assertRelayed(self.deliver(randomPieces(BODY + b".\r\n", seed)))

    def test_endSplitAcrossChunks(self):
        """
        The final CRLF.CRLF split at every position still ends the message
        exactly once, with nothing of it relayed.
        """
        data = BODY + b".\r\n"
        for cut in range(len(data) - 8, len(data)):
            self.assertRelayed(self.deliver([data[:cut], data[cut:]]))

    def test_emptyMessage(self):
        """
        A message with no line at all ends at the first ".", relays nothing
        and gets its verdicts.
        """
        s = self.deliver([b".\r\nNOOP\r\n"])
        self.assertEqual(s.transaction.written, [])
        self.assertEqual(s.codes()[-3:], [250, 250, 250])

    def test_notEndedByIndentedDot(self):
        """
        " ." and ".x" lines do not end the message.
        """
        s = self.deliver([b"a\r\n .\r\n.x\r\n", b".\r\n"])
        self.assertEqual(s.transaction.body(), b"a\r\n .\r\n.x\r\n")

    def test_messageTooBig(self):
        """
        A message over max_message_size fails with 552 5.3.4 for every
        recipient after the final dot.
        """
        s = Session("  max_message_size: 100")
        s.send(envelope([b"u@a.test", b"v@a.test"]))
        s.send(b"x" * 60 + b"\r\n")
        s.send(b"y" * 60 + b"\r\n")
        self.assertEqual(s.codes()[-1], 354)
        s.send(b".\r\n")
        self.assertEqual(s.codes()[-2:], [552, 552])
        self.assertTrue(s.last().startswith("552 5.3.4"))
        self.assertEqual(s.transaction.verdicts, None)
        self.assertEqual(s.transaction.body(), b"x" * 60 + b"\r\n")


class FinalRepliesTests(unittest.TestCase):
    """
    L{_FinalReplies}: the final replies of a message, in RCPT order.
    """

    def test_sendingRaisesFailsDone(self):
        """
        A reply whose sending raises fails C{done}, and no later reply is
        sent after it.
        """
        sent = []

        def send(result):
            sent.append(result)
            if len(sent) == 1:
                raise RuntimeError("cannot send")

        first, second = defer.Deferred(), defer.Deferred()
        replies = _FinalReplies(send, Logger(), [first, second])
        first.callback(reply(250, "2.0.0 one"))
        self.failureResultOf(replies.done, RuntimeError)
        second.callback(reply(250, "2.0.0 two"))
        self.assertEqual(sent, [reply(250, "2.0.0 one")])


class SmugglingTests(unittest.TestCase):
    """
    A lone dot framed by bare CR or LF, or any bare LF, in the message makes
    it fail with 554 5.6.0, and what follows the smuggled dot is never run
    as commands.
    """

    SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<evil@a.test>\r\nDATA\r\nevil\r\n"

    def check(self, before, pieces=None):
        s = Session()
        s.send(envelope([b"u@a.test", b"v@a.test"]))
        data = before + self.SMUGGLED
        for piece in pieces(data) if pieces else [data]:
            s.send(piece)
        self.assertEqual(s.codes()[-1], 354)
        s.send(b".\r\nNOOP\r\n")
        t = s.transaction
        self.assertEqual(len(s.delivery.transactions), 1)
        self.assertEqual([r[:2] for r in t.rcpts], [(b"u@a.test", "u"), (b"v@a.test", "v")])
        self.assertEqual(len(t.failed), 1)
        self.assertEqual(t.failed[0].code, 554)
        self.assertTrue(t.failed[0].lines[0].startswith("5.6.0 "))
        self.assertIsNone(t.verdicts)
        self.assertGreater(t.sessions["a"].aborted, 0)
        self.assertNotIn(b"evil", t.body())
        self.assertEqual(s.codes()[5:], [354, 554, 554, 250])
        return s

    def test_bareLF(self):
        """
        A bare LF inside the message.
        """
        self.check(b"Subject: x\r\nbare\nLF\r\n")

    def test_lfDotCrlf(self):
        """
        "\\n.\\r\\n".
        """
        self.check(b"Subject: x\n.\r\n")

    def test_crlfDotLf(self):
        """
        "\\r\\n.\\n".
        """
        self.check(b"Subject: x\r\n.\n")

    def test_crDotCrlf(self):
        """
        "\\r.\\r\\n".
        """
        self.check(b"Subject: x\r.\r\n")

    def test_crlfDotCr(self):
        """
        "\\r\\n.\\r" followed by more on the same line.
        """
        self.check(b"Subject: x\r\n.\r")

    def test_dotCrFirstLine(self):
        """
        ".\\r" at the start of the first message line.
        """
        self.check(b".\r")

    def test_lfDotLf(self):
        """
        "\\n.\\n".
        """
        self.check(b"Subject: x\n.\n")

    def test_byteByByte(self):
        """
        Each smuggling form is caught when sent one byte at a time.
        """
        for before in (b"x\n.\r\n", b"x\r\n.\n", b"x\r.\r\n", b"x\r\n.\r", b".\r"):
            self.check(before, lambda data: [data[i : i + 1] for i in range(len(data))])

    def test_bareLFBeforeDotAtChunkStart(self):
        """
        "x\\n" and ".\\r\\n" in separate reads: the dot after a bare LF does
        not end the message, whatever the split.
        """
        for split in (1, 2):
            before = b"Subject: x\n.\r\n"
            cut = len(b"Subject: x\n") + split - 1
            self.check(before, lambda data: [data[:cut], data[cut:]])

    def test_bareLFFirstInRead(self):
        """
        A bare LF that is the first byte of a read, after a read that ended
        in CRLF.
        """
        self.check(b"Subject: x\r\n\nbody\r\n", lambda data: [data[:12], data[12:]])

    def test_bareLFAfterLongLine(self):
        """
        A too-long line ended by a bare LF, then ".\\r\\n" in the next read:
        not the end of the message either.
        """
        self.check(b"y" * 1500 + b"\n.\r\n", lambda data: [data[:1200], data[1200:1501], data[1501:]])

    def test_smuggledDotAndEndInOneRead(self):
        """
        A "\\r\\n.\\r" line and the real end in the same read: the message
        is refused, it ends at the real end, and the command after it runs.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]))
        s.send(b"x\r\n.\r" + self.SMUGGLED + b".\r\nNOOP\r\n")
        self.assertEqual(s.codes()[4:], [354, 554, 250])
        self.assertNotIn(b"evil", s.transaction.body())
        self.assertEqual(len(s.delivery.transactions), 1)

    def test_afterRelayedLines(self):
        """
        Smuggling after lines already relayed still fails the whole message.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]))
        s.send(b"Subject: fine\r\n")
        s.send(b"x\r\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
        self.assertEqual(s.codes()[-1], 554)
        self.assertEqual(s.transaction.written, [b"Subject: fine\r\n"])
        self.assertEqual(len(s.delivery.transactions), 1)


class LongLineTests(ReplyAssertions, unittest.TestCase):
    """
    Over-long lines, odd bytes and odd commands keep the session in sync.
    """

    BODY = b"MAIL FROM:<x@y>\r\nRCPT TO:<evil@a.test>\r\nNOOP\r\n"

    def checkLongDataLine(self, pieces):
        s = Session()
        s.send(envelope([b"u@a.test", b"v@a.test"]))
        for piece in pieces:
            s.send(piece)
        t = s.transaction
        self.assertEqual(s.codes()[5:], [354, 554, 554, 250])
        self.assertIn("longer than %d" % (LINE_LIMIT,), t.failed[0].lines[0])
        self.assertTrue(t.failed[0].lines[0].startswith("5.6.0"))
        self.assertEqual(len(s.delivery.transactions), 1)
        self.assertEqual(len(t.rcpts), 2)
        self.assertIsNone(t.verdicts)
        self.assertFalse(s.closed)

    def test_longDataLineOneChunk(self):
        """
        A DATA line longer than max_line_length fails the whole message, one
        reply per recipient after the final dot; the body lines after it are
        not run as commands and the next NOOP gets 250 (pitfall 9).
        """
        data = b"Subject: x\r\n" + b"x" * 2000 + b"\r\n" + self.BODY + b".\r\nNOOP\r\n"
        self.checkLongDataLine([data])

    def test_longDataLineInPieces(self):
        """
        The same when the long line arrives in pieces, with no LF for more
        than max_line_length bytes.
        """
        data = b"Subject: x\r\n" + b"x" * 2000 + b"\r\n" + self.BODY + b".\r\nNOOP\r\n"
        self.checkLongDataLine([data[i : i + 300] for i in range(0, len(data), 300)])

    def test_longDataLineByteByByte(self):
        """
        The same when everything arrives one byte at a time.
        """
        data = b"x" * 1500 + b"\r\n" + self.BODY + b".\r\nNOOP\r\n"
        self.checkLongDataLine([data[i : i + 1] for i in range(len(data))])

    def test_longLineEndsWithDot(self):
        """
        A long line refused while still incomplete, followed at once by the
        final dot, still ends the message there.
        """
        data = b"x" * 1500
        self.checkLongDataLine([data, b"\r\n.\r\nNOOP\r\n"])

    def test_longLineCRLFSplit(self):
        """
        A long line whose CR and LF arrive in different reads, then the
        final dot: the message ends there.
        """
        self.checkLongDataLine([b"x" * 1500 + b"\r", b"\n.\r\nNOOP\r\n"])

    def test_lineAtLimit(self):
        """
        A line of exactly max_line_length bytes, CRLF included, is relayed.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]))
        line = b"x" * (LINE_LIMIT - 2) + b"\r\n"
        s.send(line + b".\r\n")
        self.assertEqual(s.transaction.body(), line)
        self.assertEqual(s.codes()[-1], 250)

    def test_longCommandLine(self):
        """
        A command line over the limit gets 500 5.5.2 once and the next
        command is answered normally.
        """
        s = Session()
        s.send(b"NOOP " + b"x" * (MAX_COMMAND_LINE + 100) + b"\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 500, 250])
        self.assertTrue(s.replies()[1][0].startswith(b"500 5.5.2"))

    def test_longCommandLineInPieces(self):
        """
        A command line over the limit that arrives in pieces (no LF for more
        than the limit) gets one 500 5.5.2; none of its tail is run.
        """
        s = Session()
        s.send(b"NOOP " + b"x" * (MAX_COMMAND_LINE + 100))
        s.send(b"y" * (MAX_COMMAND_LINE + 100))
        s.send(b" QUIT\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 500, 250])
        self.assertFalse(s.closed)

    def test_nonAsciiCommand(self):
        """
        Non-ASCII bytes in a command get a 500 5.5.x; the connection stays
        open and in sync (pitfall 10).
        """
        s = Session()
        s.send(b"NOOP \xff\xfe\r\n\xc3\xa9HLO x\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 500, 500, 250])
        self.assertEnhanced(s.replies()[1][0])
        self.assertFalse(s.closed)

    def test_utf8Addresses(self):
        """
        A UTF-8 address is accepted in MAIL with SMTPUTF8 and in RCPT of that
        transaction, and passed on as its UTF-8 bytes.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<j\xc3\xb6rg@b.test> SMTPUTF8\r\n"
            b"RCPT TO:<\xc3\xa9l\xc3\xa8ve@a.test>\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250, 250])
        t = s.transaction
        self.assertEqual(t.sender, b"j\xc3\xb6rg@b.test")
        self.assertEqual(t.rcpts[0][:3], (b"\xc3\xa9l\xc3\xa8ve@a.test", "\xe9l\xe8ve", "a.test"))

    def test_nonAsciiRcptWithoutSmtputf8(self):
        """
        A non-ASCII RCPT in a transaction begun without SMTPUTF8 gets
        553 5.6.7 and the backend is not asked.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<\xc3\xa9@a.test>\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 553])
        self.assertTrue(s.last().startswith("553 5.6.7"))
        self.assertEqual(s.transaction.rcpts, [])

    def test_nonAsciiSenderWithoutSmtputf8(self):
        """
        A non-ASCII MAIL address without the SMTPUTF8 parameter gets
        553 5.6.7, even when "smtputf8" appears in the address itself.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<j\xc3\xb6rg@b.test>\r\n"
            b"MAIL FROM:<smtputf8-j\xc3\xb6rg@b.test>\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 553, 553])
        self.assertEqual(s.delivery.transactions, [])

    def test_smtputf8EndsWithTransaction(self):
        """
        SMTPUTF8 holds for one transaction only: after RSET a non-ASCII RCPT
        gets 553 again.
        """
        s = Session()
        s.send(
            b"LHLO c\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@b>\r\n"
            b"RCPT TO:<\xc3\xa9@a.test>\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250, 250, 250, 553])

    def test_authWithoutArgument(self):
        """
        AUTH with no argument answers 502 and raises nothing (pitfall 11).
        """
        s = Session()
        s.send(b"LHLO c\r\nAUTH\r\nAUTH PLAIN\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 250, 502, 502, 250])
        self.assertEqual(self.flushLoggedErrors(), [])


class UnixPeerTests(unittest.TestCase):
    """
    Clients on a unix-socket listener.
    """

    def test_lhloOnUnixSocket(self):
        """
        LHLO and a transaction work when the peer is a L{UNIXAddress}
        (pitfall 2), and the client is named "unix".
        """
        s = Session(peer=UNIXAddress(None))
        s.send(envelope([b"u@a.test"]) + b"hi\r\n.\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 250, 354, 250])
        self.assertEqual(s.transaction.client, "unix")


class IdleTimeoutTests(ReplyAssertions, unittest.TestCase):
    """
    The idle timeout runs on the injected clock, only while the client owes
    us input.
    """

    def test_idleTimeout(self):
        """
        After idle_timeout seconds without input the server sends 421 4.4.2
        and closes.
        """
        s = Session()
        s.clock.advance(IDLE - 0.1)
        self.assertFalse(s.closed)
        s.clock.advance(0.1)
        self.assertEqual(s.codes(), [220, 421])
        self.assertTrue(s.last().startswith("421 4.4.2"))
        self.assertTrue(s.closed)

    def test_closeForcedWhenClientStopsReading(self):
        """
        A close waits for the client to take the last reply only for another
        idle_timeout; a client that stopped reading is then dropped, so the
        session cannot hang a stop forever.
        """
        s = Session()
        aborted = []
        s.transport.loseConnection = lambda: None
        s.transport.abortConnection = lambda: aborted.append(True)
        s.clock.advance(IDLE)
        self.assertEqual(s.codes(), [220, 421])
        s.clock.advance(IDLE - 0.1)
        self.assertEqual(aborted, [])
        s.clock.advance(0.1)
        self.assertEqual(aborted, [True])

    def test_inputRearmsTimer(self):
        """
        Each piece of input, even a partial line, starts the idle time anew.
        """
        s = Session()
        s.clock.advance(IDLE - 1)
        s.send(b"NO")
        s.clock.advance(IDLE - 1)
        s.send(b"OP\r\n")
        s.clock.advance(IDLE - 1)
        self.assertEqual(s.codes(), [220, 250])
        s.clock.advance(1)
        self.assertEqual(s.codes(), [220, 250, 421])

    def test_timeoutMidTransaction(self):
        """
        A timeout in the middle of DATA aborts the transaction.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"partial\r\n")
        s.clock.advance(IDLE)
        self.assertEqual(s.codes()[-1], 421)
        self.assertGreater(s.transaction.aborted, 0)
        self.assertIsNone(s.transaction.verdicts)
        self.assertTrue(s.closed)

    def test_noTimeoutWhileRcptPending(self):
        """
        While a RCPT waits on a backend, far longer than idle_timeout, the
        client is not timed out (pitfall 14); the timer starts again once
        the reply is sent.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        s.clock.advance(IDLE * 10)
        self.assertEqual(s.codes(), [220, 250, 250])
        self.assertFalse(s.closed)
        s.transaction.fireRcpt(0)
        self.assertEqual(s.codes(), [220, 250, 250, 250])
        s.clock.advance(IDLE - 1)
        self.assertFalse(s.closed)
        s.clock.advance(1)
        self.assertEqual(s.codes()[-1], 421)

    def test_noTimeoutWhileVerdictsPending(self):
        """
        While the final verdicts are awaited, the client is not timed out.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        s.transaction.fireRcpt(0)
        s.send(b"hi\r\n.\r\n")
        s.clock.advance(IDLE * 10)
        self.assertFalse(s.closed)
        s.transaction.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-1], 250)
        s.clock.advance(IDLE)
        self.assertEqual(s.codes()[-1], 421)


class DisconnectTests(unittest.TestCase):
    """
    The client going away.
    """

    def test_lostMidData(self):
        """
        A client that disconnects mid-DATA: the transaction is aborted and
        never finished.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"partial\r\n")
        s.transport.loseConnection()
        self.assertEqual(s.transaction.aborted, 1)
        self.assertIsNone(s.transaction.verdicts)

    def test_lostBeforeData(self):
        """
        A client that disconnects after RCPT: the transaction is aborted.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        s.transport.loseConnection()
        self.assertEqual(s.transaction.aborted, 1)

    def test_lostWhileRcptPending(self):
        """
        A client that disconnects while a RCPT is pending: the transaction
        is aborted, and the late reply writes nothing.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\nNOOP\r\n")
        s.transport.loseConnection()
        written = s.transport.value()
        s.transaction.fireRcpt(0)
        self.assertEqual(s.transport.value(), written)
        self.assertEqual(s.transaction.aborted, 1)

    def test_lostAwaitingVerdicts(self):
        """
        A client that disconnects while the final verdicts are awaited: no
        crash, no abort of the message already handed over, and nothing is
        written after the loss.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test", b"v@a.test"]))
        t = s.transaction
        t.fireRcpt(0)
        t.fireRcpt(1)
        s.send(b"hi\r\n.\r\nNOOP\r\n")
        s.transport.loseConnection()
        written = s.transport.value()
        t.verdicts[1].callback(delivered(b"v@a.test"))
        t.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.transport.value(), written)
        self.assertEqual(t.aborted, 0)
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_noTimerAfterLoss(self):
        """
        After the connection is lost no idle timer is left running.
        """
        s = Session()
        s.transport.loseConnection()
        self.assertEqual(s.clock.getDelayedCalls(), [])


class ShutdownTests(ReplyAssertions, unittest.TestCase):
    """
    Graceful stop.
    """

    def test_idleSession(self):
        """
        beginShutdown on an idle session sends 421 4.3.2 and closes.
        """
        s = Session()
        s.send(b"LHLO c\r\n")
        s.server.beginShutdown()
        self.assertEqual(s.codes(), [220, 250, 421])
        self.assertTrue(s.last().startswith("421 4.3.2"))
        self.assertTrue(s.closed)

    def test_transactionCompletes(self):
        """
        beginShutdown during a transaction lets it complete (its replies are
        sent), then sends 421 4.3.2 and closes.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        t = s.transaction
        t.fireRcpt(0)
        s.send(b"hi\r\n")
        s.server.beginShutdown()
        self.assertFalse(s.closed)
        s.send(b".\r\n")
        self.assertFalse(s.closed)
        t.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-2:], [250, 421])
        self.assertTrue(s.last().startswith("421 4.3.2"))
        self.assertTrue(s.closed)
        self.assertEqual(t.aborted, 0)

    def test_noNewTransactionWhileDraining(self):
        """
        A MAIL pipelined after the final dot of the last transaction, while
        the server is draining, begins nothing: the verdicts are followed by
        421 and the close.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        t = s.transaction
        t.fireRcpt(0)
        s.server.beginShutdown()
        s.send(b"hi\r\n.\r\nMAIL FROM:<next@b>\r\n")
        t.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-2:], [250, 421])
        self.assertEqual(len(s.delivery.transactions), 1)
        self.assertTrue(s.closed)

    def test_forceMidData(self):
        """
        forceShutdown mid-DATA aborts the transaction, sends 421 4.3.2 and
        closes.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"partial\r\n")
        s.server.beginShutdown()
        s.server.forceShutdown()
        self.assertEqual(s.transaction.aborted, 1)
        self.assertIsNone(s.transaction.verdicts)
        self.assertEqual(s.codes()[-1], 421)
        self.assertTrue(s.last().startswith("421 4.3.2"))
        self.assertTrue(s.closed)

    def test_forceWhileRcptPending(self):
        """
        forceShutdown while a RCPT is pending aborts the transaction; the late
        reply writes nothing.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        s.server.beginShutdown()
        s.server.forceShutdown()
        written = s.transport.value()
        s.transaction.fireRcpt(0)
        self.assertEqual(s.transport.value(), written)
        self.assertEqual(s.codes()[-1], 421)
        self.assertEqual(s.transaction.aborted, 1)

    def test_forceAwaitingVerdicts(self):
        """
        forceShutdown while the final verdicts are awaited lets them arrive;
        they are sent, then 421.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        t = s.transaction
        t.fireRcpt(0)
        s.send(b"hi\r\n.\r\n")
        s.server.beginShutdown()
        s.server.forceShutdown()
        self.assertFalse(s.closed)
        t.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-2:], [250, 421])
        self.assertEqual(t.aborted, 0)
        self.assertTrue(s.closed)


class FlowControlTests(unittest.TestCase):
    """
    Backpressure from the backends and from our own replies.
    """

    def inData(self):
        s = Session()
        s.send(envelope([b"u@a.test"]))
        self.assertEqual(s.codes()[-1], 354)
        return s

    def test_pauseResume(self):
        """
        The pause/resume callables given to startData pause and resume the
        client transport; it resumes only when every pauser has resumed.
        """
        s = self.inData()
        t = s.transaction
        t.pauseClient("b1")
        self.assertEqual(s.transport.producerState, "paused")
        t.pauseClient("b2")
        t.resumeClient("b1")
        self.assertEqual(s.transport.producerState, "paused")
        t.resumeClient("b2")
        self.assertEqual(s.transport.producerState, "producing")

    def test_pausedSessionDoesNotTimeOut(self):
        """
        While a backend keeps the client paused the idle timer does not run;
        it runs again after the resume.
        """
        s = self.inData()
        s.transaction.pauseClient("b1")
        s.clock.advance(IDLE * 10)
        self.assertFalse(s.closed)
        s.transaction.resumeClient("b1")
        s.clock.advance(IDLE)
        self.assertEqual(s.codes()[-1], 421)

    def test_dataStillRelayedWhilePaused(self):
        """
        Bytes already on their way when the pause came are still relayed.
        """
        s = self.inData()
        s.transaction.pauseClient("b1")
        s.send(b"line\r\n")
        self.assertEqual(s.transaction.body(), b"line\r\n")

    def test_pendingInputPauses(self):
        """
        Unread input past the limit while a reply is awaited pauses the
        transport; it resumes once the reply is sent and every queued command
        is answered.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        self.assertEqual(s.transport.producerState, "producing")
        noops = b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 10)
        s.send(noops)
        self.assertEqual(s.transport.producerState, "paused")
        s.clock.advance(IDLE * 10)
        self.assertFalse(s.closed)
        s.transaction.fireRcpt(0)
        self.assertEqual(s.transport.producerState, "producing")
        self.assertEqual(len(s.replies()), 4 + len(noops) // 6)

    def test_smallPendingInputDoesNotPause(self):
        """
        Pipelined input under the limit does not pause the transport.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n" + b"NOOP\r\n" * 100)
        self.assertEqual(s.transport.producerState, "producing")


class PitfallRegressionTests(ReplyAssertions, unittest.TestCase):
    """
    One test per "Server side" item of docs/twisted-pitfalls.rst.
    """

    def test_pitfall1_lhloNoopVrfy(self):
        """
        Pitfall 1: LHLO, NOOP and VRFY are implemented; HELO and EHLO never
        get a 2xx.
        """
        s = Session()
        s.send(b"HELO x\r\nEHLO x\r\nLHLO x\r\nNOOP\r\nVRFY u\r\n")
        self.assertEqual(s.codes(), [220, 500, 500, 250, 250, 252])

    def test_pitfall2_unixPeer(self):
        """
        Pitfall 2: LHLO on a unix-socket connection (no C{.host}) works.
        """
        s = Session(peer=UNIXAddress(b"/run/lmtp.sock"))
        s.send(b"LHLO x\r\n")
        self.assertEqual(s.codes(), [220, 250])

    def test_pitfall3_extensions(self):
        """
        Pitfall 3: LHLO offers PIPELINING, ENHANCEDSTATUSCODES and 8BITMIME.
        """
        s = Session()
        s.send(b"LHLO x\r\n")
        keywords = {line[4:].split(b" ")[0] for line in s.replies()[1][1:]}
        self.assertTrue({b"PIPELINING", b"ENHANCEDSTATUSCODES", b"8BITMIME"} <= keywords)

    def test_pitfall4_ownDataPath(self):
        """
        Pitfall 4: the server reads the message itself (it is no subclass of
        Twisted's SMTP, whose C{state_DATA} is bound at class creation), so
        message lines reach C{write()} and are never run as commands.
        """
        from twisted.mail import smtp

        self.assertFalse(issubclass(LMTPServer, smtp.SMTP))
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"NOOP\r\nQUIT\r\n.\r\n")
        self.assertEqual(s.transaction.body(), b"NOOP\r\nQUIT\r\n")
        self.assertFalse(s.closed)

    def test_pitfall5_oneTransactionState(self):
        """
        Pitfall 5: the long-line path and the connection-loss path act on the
        same transaction as the DATA path: after a long line, losing the
        connection before the dot aborts that very transaction.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"x" * 2000)
        self.assertEqual(s.transaction.sessions["a"].aborted, 1)
        s.transport.loseConnection()
        self.assertEqual(s.transaction.aborted, 1)
        self.assertEqual(s.transaction.failed, [])

    def test_pitfall6_noHeaderGuessing(self):
        """
        Pitfall 6: a first DATA line without ":" is relayed as is, with no
        blank line or Received header added.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"just text\r\nmore\r\n.\r\n")
        self.assertEqual(s.transaction.body(), b"just text\r\nmore\r\n")

    def test_pitfall7_replyPerRecipient(self):
        """
        Pitfall 7: after the final dot, one reply per accepted recipient in
        RCPT order, not one for the message.
        """
        s = Session()
        s.delivery.rcptReplies[b"n@a.test"] = RCPT_UNKNOWN
        s.send(envelope([b"x@a.test", b"n@a.test", b"y@a.test"]) + b"hi\r\n.\r\n")
        self.assertEqual(
            [r[0] for r in s.replies()[-2:]],
            [b"250 2.0.0 <x@a.test> delivered", b"250 2.0.0 <y@a.test> delivered"],
        )
        self.assertEqual(len(s.replies()), 9)

    def test_pitfall8_quitAfterDot(self):
        """
        Pitfall 8: QUIT pipelined after the dot is answered only after the
        final verdicts, and the connection stays open until then.
        """
        s = Session(auto=False)
        s.send(envelope([b"u@a.test"]))
        s.transaction.fireRcpt(0)
        s.send(b"hi\r\n.\r\nQUIT\r\n")
        self.assertFalse(s.closed)
        self.assertEqual(s.codes()[-1], 354)
        s.transaction.verdicts[0].callback(delivered(b"u@a.test"))
        self.assertEqual(s.codes()[-2:], [250, 221])
        self.assertTrue(s.closed)

    def test_pitfall9_longLineBodyNotExecuted(self):
        """
        Pitfall 9: after a too-long DATA line the rest of the body is not run
        as commands: "MAIL FROM:<x>" in it gets no 250.
        """
        s = Session()
        s.send(envelope([b"u@a.test"]) + b"x" * 20000 + b"\r\nMAIL FROM:<x>\r\n.\r\n")
        self.assertEqual(s.codes()[4:], [354, 554])
        self.assertEqual(len(s.delivery.transactions), 1)

    def test_pitfall10_nonAsciiCommand(self):
        """
        Pitfall 10: non-ASCII command bytes get a 500, not a dropped
        connection.
        """
        s = Session()
        s.send(b"\xff\xff\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 500, 250])
        self.assertFalse(s.closed)

    def test_pitfall11_authNoArgument(self):
        """
        Pitfall 11: AUTH with no argument gets 502, no exception.
        """
        s = Session()
        s.send(b"AUTH\r\n")
        self.assertEqual(s.codes(), [220, 502])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_pitfall12_rcptFailureAnswered(self):
        """
        Pitfall 12: a RCPT whose verdict fails still gets exactly one reply,
        so the client never hangs.
        """
        s = Session(auto=False)
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        s.transaction.rcpts[0][4].errback(TypeError("bytes response"))
        self.assertEqual(s.codes(), [220, 250, 250, 451])
        self.assertEnhanced(s.replies()[-1][0])
        self.flushLoggedErrors(TypeError)

    def test_pitfall13_bareLocalPart(self):
        """
        Pitfall 13: C{RCPT TO:<bob>} is routed as local part "bob" with no
        domain, never "bob@<server host>".
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<bob>\r\n")
        self.assertEqual(s.transaction.rcpts[0][:3], (b"bob", "bob", None))

    def test_pitfall14_injectedClock(self):
        """
        Pitfall 14: the idle timer runs on the delivery's reactor, not the
        global one, and is paused while a backend works.
        """
        from twisted.internet import reactor

        s = Session(auto=False)
        self.assertEqual(len(s.clock.getDelayedCalls()), 1)
        self.assertFalse(
            any(call.func == s.server._checkIdle for call in reactor.getDelayedCalls())
        )
        s.send(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@a.test>\r\n")
        s.clock.advance(IDLE * 10)
        self.assertTrue(s.transport.connected)
        self.assertNotIn(421, s.codes())

    def test_pitfall15_parametersKept(self):
        """
        Pitfall 15: SIZE, BODY and NOTIFY are not thrown away.
        """
        s = Session()
        s.send(b"LHLO c\r\nMAIL FROM:<a@b> SIZE=5 BODY=7BIT\r\nRCPT TO:<u@a.test> NOTIFY=NEVER\r\n")
        self.assertEqual(s.transaction.params, [(b"SIZE", b"SIZE=5"), (b"BODY", b"BODY=7BIT")])
        self.assertEqual(s.transaction.rcpts[0][3], [(b"NOTIFY", b"NOTIFY=NEVER")])


@implementer(IMessage)
class PlainMessage:
    """
    A plain C{twisted.mail} message: lines in, one Deferred out.
    """

    def __init__(self, verdict):
        self.lines = []
        self.verdict = verdict
        self.ended = False
        self.lost = False

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.ended = True
        return self.verdict

    def connectionLost(self):
        self.lost = True


@implementer(IMessageDelivery)
class PlainDelivery:
    """
    An L{IMessageDelivery} written only against C{twisted.mail}'s
    interfaces: no L{ILMTPDelivery}, no L{IMessageStream}.

    @ivar verdicts: address -> the Deferred its message's C{eomReceived}
        returns (default: success with C{None}).
    @ivar refusals: address -> the L{smtp.SMTPBadRcpt} C{validateTo} raises.
    """

    def __init__(self):
        self.messages = {}
        self.verdicts = {}
        self.refusals = {}
        self.header = None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        address = bytes(user.dest)
        if address in self.refusals:
            raise self.refusals[address]

        def build():
            message = PlainMessage(self.verdicts.get(address, defer.succeed(None)))
            self.messages[address] = message
            return message

        return build

    def receivedHeader(self, helo, origin, recipients):
        return self.header


class PlainDeliveryTests(unittest.TestCase):
    """
    The server with a plain C{twisted.mail} delivery: per-recipient replies
    from each message's C{eomReceived}, and the message fed line by line.
    """

    def setUp(self):
        self.plain = PlainDelivery()
        self.session = Session(delivery=self.plain)

    def test_perRecipientReplies(self):
        """
        Each recipient gets the reply its own message's C{eomReceived}
        earned, in RCPT order: a success is 250, an L{smtp.SMTPServerError}
        its code and text.
        """
        self.plain.verdicts[b"y@a.test"] = defer.fail(smtp.SMTPServerError(452, "4.2.2 full"))
        self.session.send(envelope([b"x@a.test", b"y@a.test"]) + b"hi\r\n.\r\n")
        replies = self.session.replies()
        self.assertEqual(self.session.codes(), [220, 250, 250, 250, 250, 354, 250, 452])
        self.assertEqual(replies[-1], [b"452 4.2.2 full"])

    def test_linesUnstuffed(self):
        """
        Each message gets every line without its CRLF and with the
        dot-stuffing removed, as C{twisted.mail} feeds them.
        """
        self.session.send(
            envelope([b"x@a.test", b"y@a.test"]) + b"Subject: s\r\n\r\n..dot\r\nend\r\n.\r\n"
        )
        for address in (b"x@a.test", b"y@a.test"):
            message = self.plain.messages[address]
            self.assertEqual(message.lines, [b"Subject: s", b"", b".dot", b"end"])
            self.assertTrue(message.ended)

    def test_clientLeavesMidMessage(self):
        """
        A client that leaves before the final dot: every message is told
        C{connectionLost} and none ends.
        """
        self.session.send(envelope([b"x@a.test", b"y@a.test"]) + b"Subject: s\r\n")
        self.session.transport.loseConnection()
        for message in self.plain.messages.values():
            self.assertEqual((message.lost, message.ended), (True, False))

    def test_refusedThenLeftLosesMessagesOnce(self):
        """
        A message refused mid-DATA (here a bare LF) and then abandoned by
        the client tells each plain message C{connectionLost} once: Twisted's
        own file messages remove their file, and a second call would fail.
        """
        lost = []
        self.session.send(envelope([b"x@a.test"]))
        message = self.plain.messages[b"x@a.test"]
        message.connectionLost = lambda: lost.append(1)
        self.session.send(b"bare\nLF\r\nmore\r\n")
        self.session.transport.loseConnection()
        self.assertEqual(lost, [1])

    def test_failingHeaderStartsNothing(self):
        """
        A delivery whose C{receivedHeader} fails gets 451 for DATA, and no
        transaction was told the message begins.
        """
        stub = StubDelivery(auto=True)
        stub.receivedHeader = lambda helo, origin, recipients: 1 / 0
        session = Session(delivery=stub)
        session.send(envelope([b"x@a.test"]))
        self.assertEqual(session.codes()[-1], 451)
        self.assertFalse(stub.transactions[-1].dataStarted)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_trapS12_bytesRefusalText(self):
        """
        Trap S12: an L{smtp.SMTPBadRcpt} whose response is L{bytes} still
        gives the client its code and text, never a hang.
        """
        user = Recipient(Path(b"n@a.test", "n@a.test", []), (b"", b""), None, None)
        self.plain.refusals[b"n@a.test"] = smtp.SMTPBadRcpt(user, 550, b"5.1.1 no such user")
        self.session.send(b"LHLO c\r\nMAIL FROM:<s@b>\r\nRCPT TO:<n@a.test>\r\nNOOP\r\n")
        self.assertEqual(self.session.replies()[3], [b"550 5.1.1 no such user"])
        self.assertEqual(self.session.codes()[-1], 250)

    def test_trapS6_receivedHeaderLines(self):
        """
        Trap S6: a delivery's Received header holding C{"\\n\\t"} (as
        C{twisted.mail} builds them) reaches the message as separate lines
        before the message's own first line, which is not guessed at.
        """
        self.plain.header = b"Received: from c\n\tby proxy.test"
        self.session.send(envelope([b"x@a.test"]) + b"no colon here\r\n.\r\n")
        self.assertEqual(
            self.plain.messages[b"x@a.test"].lines,
            [b"Received: from c", b"\tby proxy.test", b"no colon here"],
        )

    def test_receivedHeaderCannotEndMessage(self):
        """
        A bare CR in a delivery's header becomes "?" and a header line that
        begins with a dot is dot-stuffed, so no name in a header can end a
        line, or the message, at a backend.
        """
        self.plain.header = b"Received: from evil\r.\rRSET\n.\n\tby proxy.test"
        self.session.send(envelope([b"x@a.test"]) + b"body\r\n.\r\n")
        self.assertEqual(
            self.plain.messages[b"x@a.test"].lines,
            [b"Received: from evil?.?RSET", b".", b"\tby proxy.test", b"body"],
        )

    def test_lhloControlCharacterRefused(self):
        """
        An LHLO name with a control character (a bare CR) is refused with
        501, so it never reaches a trace header.
        """
        self.session.send(b"LHLO evil\r.\rRSET\r\n")
        self.assertEqual(self.session.codes(), [220, 501])
