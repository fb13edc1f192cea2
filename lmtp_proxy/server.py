"""
The LMTP server (RFC 2033) that faces the MTA.

It gets its delivery the way C{twisted.mail}'s servers do: it logs in to a
C{twisted.cred} L{Portal} for each session and uses the
L{IMessageDelivery} avatar; each accepted RCPT gives one message, whose
C{eomReceived} is that recipient's own reply after the final dot (LMTP's
per-recipient model). Messages that provide
L{lmtp_proxy.interfaces.IMessageStream} get the data as raw chunks through
their shared L{lmtp_proxy.interfaces.ITransaction}; any other
C{twisted.mail} message gets it line by line.

The protocol is not a subclass of C{twisted.mail.smtp.ESMTP}: most of what
that class does would have to be undone for LMTP (no LHLO, EHLO crashing on
unix sockets, one reply after the final dot, replies out of order when
pipelined, message bodies run as commands after a long line, header
guessing; see C{docs/twisted-pitfalls.rst} and C{docs/design.rst}). Instead
one protocol object owns the session, in one explicit C{mode} with one
input handler per mode, reads its input itself, and never looks at a
command while the reply to an earlier one is outstanding, so replies always
go out in command order.
"""

import binascii
import re
from collections import deque

from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener, ITCPTransport
from twisted.mail.imap4 import PLAINCredentials
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from lmtp_proxy import clientid
from lmtp_proxy.access import CheckerBusy, FailureDelays, peerAllowed
from lmtp_proxy.config import ConfigError
from lmtp_proxy.envelope import Path, Recipient
from lmtp_proxy.interfaces import (
    ILMTPDelivery,
    IMessageDelivery,
    IMessageStream,
    ITransaction,
)
from lmtp_proxy.outbox import Outbox
from lmtp_proxy.reply import Reply, reply
from lmtp_proxy.tls import describeFailure, describeSession, serverOptionsFor
from lmtp_proxy.twisted_internals import ProxyHeaderWrapper, proxyHeaderFactory, startTLS

MAX_COMMAND_LINE = 4096
# Past this much unread pipelined input, stop reading until the replies
# owed catch up.
MAX_PENDING_INPUT = 65536
# RCPTs started while an earlier one is still at its backend, at most:
# RFC 5321 4.5.3.1.8 has a server take 100 recipients, and Postfix
# pipelines up to lmtp_destination_recipient_limit (50) of them.
MAX_RCPTS_AHEAD = 100

_PATH = re.compile(r"^(FROM|TO):\s*(<[^>]*>|[^\s<>]*)(.*)$", re.IGNORECASE | re.DOTALL)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")
_XTEXT = re.compile(r"^[\x21-\x7e]*$")
# A NUL or bare CR passed on in an address could end the line early at a
# backend that parses differently.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOTIFY = re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I)

OK = reply(250, "2.0.0 Ok")
SENDER_OK = reply(250, "2.1.0 Ok")
RECIPIENT_OK = reply(250, "2.1.5 Ok")
DELIVERED = reply(250, "2.0.0 Ok: delivered")
BAD_SEQUENCE_LHLO = reply(503, "5.5.1 Error: send LHLO first")
NEED_MAIL = reply(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = reply(503, "5.5.1 Error: no valid recipients")
NESTED_MAIL = reply(503, "5.5.1 Error: nested MAIL command")
LINE_TOO_LONG = reply(500, "5.5.2 Error: command line too long")
BAD_CHARACTERS = reply(500, "5.5.2 Error: non-ASCII characters in command")
NOT_UTF8_ENABLED = reply(553, "5.6.7 Error: non-ASCII address without SMTPUTF8")
UNRECOGNISED = reply(500, "5.5.2 Error: command not recognized")
NOT_IMPLEMENTED = reply(502, "5.5.1 Error: command not implemented")
NOT_LMTP = reply(500, "5.5.1 Error: this is an LMTP server, use LHLO")
INTERNAL_ERROR = reply(451, "4.3.0 Error: internal error, try again later")
NOT_AUTHORIZED = reply(550, "5.7.0 Error: insufficient authorization")
FORWARD_IN_TRANSACTION = reply(503, "5.5.1 Error: MAIL transaction in progress")
TOO_MANY_RECEIVED = reply(554, "5.4.6 Too many Received: headers: mail loop?")
SMUGGLING = reply(
    554,
    "5.6.0 Message refused: bare LF, or a lone dot framed by bare CR or LF, "
    "in the message",
)

NEED_TLS = reply(530, "5.7.0 Must issue a STARTTLS command first")
NEED_AUTH = reply(530, "5.7.0 Authentication required")
AUTH_FAILED = reply(535, "5.7.8 Error: authentication failed")

# The session's modes; see docs/design.rst for what moves between them.
PROXY = "proxy"  # waiting for the HAProxy PROXY header
LOGIN = "login"  # waiting for the portal's avatar
SASL = "sasl"  # reading the client's answer to a SASL challenge
COMMAND = "command"  # reading commands
WAITING = "waiting"  # a command's reply is outstanding; input waits
# (but for RCPTs pipelined behind a RCPT, which start at once)
DATA = "data"  # reading the message
VERDICTS = "verdicts"  # past the final dot, relaying the verdicts
CLOSED = "closed"


def _toBytes(text):
    return text.encode("utf-8")


def replyForFailure(failure, log, what):
    """
    The reply a failed delivery call earns the client: the code and text
    of an L{smtp.SMTPServerError} (a refusal), a 451 for anything else
    (logged: it is a fault, and a 4xx keeps the mail queued).
    """
    error = failure.value
    if isinstance(error, smtp.SMTPServerError):
        text = error.resp
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return Reply(error.code, tuple(str(text).split("\n"))).withEnhancedCode()
    log.failure(what, failure)
    return INTERNAL_ERROR


class _Command:
    """
    A parsed MAIL or RCPT argument.
    """

    def __init__(self, address, params):
        self.address = address
        self.params = params


@implementer(ITransaction)
class _LineFeeder:
    """
    The transaction of the plain C{twisted.mail} messages of a transaction:
    what the server streams is handed to each message line by line, without
    its line ending and dot-stuffing, as C{twisted.mail} does.
    """

    def __init__(self, messages):
        self.messages = messages

    def startData(self, pauseClient, resumeClient):
        """
        See L{ITransaction.startData}: nothing to prepare.
        """

    def write(self, data):
        """
        See L{ITransaction.write}: C{data} is whole CRLF lines.
        """
        for line in data.split(b"\r\n")[:-1]:
            if line.startswith(b"."):
                line = line[1:]
            for message in self.messages:
                message.lineReceived(line)

    def endData(self):
        """
        See L{ITransaction.endData}: each message's C{eomReceived} follows.
        """

    def refuse(self, result):
        """
        See L{ITransaction.refuse}: the messages are discarded, once.
        """
        messages, self.messages = self.messages, []
        for message in messages:
            message.connectionLost()


class _FinalReplies:
    """
    The final replies of one message: one per accepted recipient, in RCPT
    order, each sent as soon as it and every earlier one are known.

    A callback on each verdict rather than a generator waiting for one
    after the other: a message has one verdict per recipient, and resuming
    an C{inlineCallbacks} generator costs more than a callback.

    @ivar done: a L{Deferred} that fires once the last is sent, or fails if
        sending one raised.
    """

    __slots__ = ("_send", "_log", "_results", "_next", "_count", "done")

    def __init__(self, send, log, verdicts):
        """
        @param send: called with each L{Reply}, in order.
        @param log: the L{Logger} a failed verdict is logged to.
        @param verdicts: what each recipient's C{IMessage.eomReceived}
            returned (a L{Deferred}), in RCPT order.
        """
        self._send = send
        self._log = log
        self._results = {}
        self._next = 0
        self._count = len(verdicts)
        self.done = defer.Deferred()
        for index, verdict in enumerate(verdicts):
            verdict.addBoth(self._arrived, index)

    def _arrived(self, result, index):
        self._results[index] = result
        try:
            while self._next in self._results:
                self._send(self._reply(self._results.pop(self._next)))
                self._next += 1
        except Exception:
            self.done.errback()
            return
        if self._next == self._count:
            self.done.callback(None)

    def _reply(self, result):
        if isinstance(result, defer.Failure):
            # Each accepted recipient is owed exactly one reply: a missing
            # one would pair every later reply with the wrong command.
            return replyForFailure(result, self._log, "final reply failed")
        if not isinstance(result, Reply):
            # A plain twisted.mail message succeeds with any value.
            return DELIVERED
        return result


@implementer(IHandshakeListener)
class LMTPServer(protocol.Protocol, TimeoutMixin):
    """
    One LMTP session with the MTA.

    @ivar mode: what the session is doing (L{PROXY}, L{LOGIN}, L{COMMAND},
        L{SASL}, L{WAITING}, L{DATA}, L{VERDICTS} or L{CLOSED}).
    @ivar delivery: the L{IMessageDelivery} avatar of this session.
    @ivar proxied: whether a PROXY header comes first (set by the factory).
    @ivar tls: whether the session is under TLS (or its handshake).
    @ivar login: the SASL login (L{bytes}) of the client, or C{None}.
    @ivar loginDelays: the L{FailureDelays} of failed logins, shared by the
        factory's sessions.
    """

    log = Logger()
    proxied = False
    loginDelays = None

    def __init__(self, portal, clock, getConfig, outbox):
        """
        @param portal: the L{Portal} that hands out the delivery.
        @param clock: the L{IReactorTime} for the idle timeout.
        @param getConfig: returns the L{lmtp_proxy.config.Config} in force.
        @param outbox: the L{Outbox} every write goes through.
        """
        self.portal = portal
        self.clock = clock
        # TimeoutMixin's hook: the injected clock, not the global reactor.
        self.callLater = clock.callLater
        self._getConfig = getConfig
        self._outbox = outbox
        self.mode = LOGIN
        self.delivery = None
        self._lmtpDelivery = False
        self._logout = None
        self._buffer = bytearray()
        self._processing = False
        self._greeted = False
        self._helo = (b"", b"")
        self._draining = False
        self._skipping = False
        # Whether the reply awaited is a RCPT's; and the RCPTs pipelined
        # behind it, already started, whose replies follow it in order.
        self._rcptAwaited = False
        self._ahead = deque()
        self._pauses = set()
        self._closeTimer = None
        self.peer = "unknown"
        self.tls = False
        self._handshaken = False
        self.login = None
        self._sasl = None
        # The original client (lmtp_proxy.clientid.ClientIdentity), as LHLO,
        # XCLIENT and XFORWARD tell it; the delivery learns it at MAIL.
        self._identity = None
        self._resetEnvelope()

    @property
    def config(self):
        return self._getConfig()

    # IProtocol

    def connectionMade(self):
        """
        Wait for the PROXY header if one is expected, else begin.
        """
        if ITCPTransport.providedBy(self.transport):
            # Replies to one pipelined group can leave in several writes
            # (one per backend verdict); Nagle would hold each later one
            # back until the client's delayed ACK.
            self.transport.setTcpNoDelay(True)
        self.setTimeout(self.config.idle_timeout)
        if self.proxied:
            self.mode = PROXY
            return
        self._begin()

    def proxyHeaderReceived(self):
        """
        Called by L{ProxyHeaderWrapper}: C{getPeer} now gives the client's
        address that the header carried.
        """
        if self.mode is PROXY:
            self._begin()

    def _begin(self):
        """
        Refuse a client C{allowed_clients} leaves out; start implicit TLS;
        log in to the portal, then greet the client.
        """
        config = self.config
        peer = self.transport.getPeer()
        if isinstance(peer, (IPv4Address, IPv6Address)):
            self.peer = "%s:%d" % (peer.host, peer.port)
            self._helo = (b"", peer.host.encode("ascii"))
        else:
            self.peer = "unix"
            self._helo = (b"", b"unix")
        if not peerAllowed(config.allowed_clients, peer):
            self.log.info("refused {peer}: not in allowed_clients", peer=self.peer)
            self._closeWith(
                reply(554, "5.7.1 %s Error: access denied" % (config.hostname,)),
                "client not allowed",
            )
            return
        self.mode = LOGIN
        if config.tls_certificate is not None and config.tls_implicit:
            try:
                self._startTLS(serverOptionsFor(config))
            except ConfigError as e:
                self.log.error("no TLS for {peer}: {error}", peer=self.peer, error=e)
                self._closeWith(
                    reply(421, "4.7.0 %s TLS not available" % (config.hostname,)),
                    "no TLS",
                )
                return
        self.portal.login(Anonymous(), self.peer, IMessageDelivery).addCallbacks(
            self._loggedIn, self._loginFailed
        )

    def _loggedIn(self, result):
        _, self.delivery, self._logout = result
        if self.mode is CLOSED:
            self._logout()
            return
        self._lmtpDelivery = ILMTPDelivery.providedBy(self.delivery)
        self._send(reply(220, "%s LMTP lmtp-proxy ready" % (self.config.hostname,)))
        self.mode = COMMAND
        self._process()

    def _loginFailed(self, failure):
        self.log.failure("no delivery for a new session", failure)
        self._closeWith(
            reply(421, "4.3.0 %s Service not available" % (self.config.hostname,)),
            "no delivery",
        )

    def dataReceived(self, data):
        """
        Buffer the input and handle as much of it as the replies owed allow.
        """
        if self.mode is CLOSED:
            return
        self._buffer += data
        self.resetTimeout()
        # Replies and backend commands that this input causes leave joined.
        self._outbox.hold()
        try:
            self._process()
        finally:
            self._outbox.release()

    def connectionLost(self, reason=protocol.connectionDone):
        """
        A client that leaves before the final dot delivers nothing anywhere.
        """
        mode, self.mode = self.mode, CLOSED
        self.setTimeout(None)
        self._cancelCloseTimer()
        if self.tls and not self._handshaken and mode is not CLOSED:
            self.log.info(
                "client {peer}: TLS handshake failed: {reason}",
                peer=self.peer,
                reason=describeFailure(reason.value),
            )
        if mode is not VERDICTS:
            self._abandon("connection closed before the end of the message")
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()

    # graceful stop

    def beginShutdown(self):
        """
        Let the transaction in progress finish, then close with 421.
        """
        self._draining = True
        if self.mode is COMMAND and self._origin is None:
            self._shutdownNow()

    def forceShutdown(self):
        """
        The grace period is over: drop a transaction that has not reached the
        final dot (nothing is delivered for it) and close with 421.
        """
        if self.mode is VERDICTS or self.mode is CLOSED:
            return
        self._shutdownNow()

    # input handling: one reader per mode that reads

    def _process(self):
        if self._processing:
            return
        self._processing = True
        try:
            while True:
                mode = self.mode
                if mode is SASL:
                    if not self._readCommand():
                        break
                elif mode is COMMAND:
                    if self._draining and self._origin is None:
                        # A graceful stop waits for the transaction in
                        # progress only: pipelined commands must not begin
                        # another one.
                        self._shutdownNow()
                        break
                    if self._ahead:
                        self._answer(self._ahead.popleft(), rcpt=True)
                    elif not self._readCommand():
                        break
                elif mode is DATA:
                    if not self._readData():
                        break
                elif mode is WAITING and self._rcptAwaited:
                    if not self._readRcptAhead():
                        break
                else:
                    break
        finally:
            self._processing = False
        if (self.mode is WAITING or self.mode is VERDICTS) and len(
            self._buffer
        ) > MAX_PENDING_INPUT:
            self._pause("input")
        else:
            self._resume("input")

    def _readCommand(self):
        """
        The L{COMMAND} mode's reader: run one command line.

        @return: whether a line was consumed.
        """
        buf = self._buffer
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_COMMAND_LINE:
                del buf[:]
                if not self._skipping:
                    self._skipping = True
                    self._refuseLongLine()
            return False
        line = bytes(buf[:end])
        del buf[: end + 1]
        if self._skipping:
            # The tail of a command line that was already refused.
            self._skipping = False
            return True
        if len(line) > MAX_COMMAND_LINE:
            self._refuseLongLine()
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self.mode is SASL:
            self._saslResponse(line)
        else:
            self._command(line)
        return True

    def _readRcptAhead(self):
        """
        The L{WAITING} mode's reader while a RCPT is at its backend: start
        the next command at once if it is a RCPT too, so that a pipelined
        group's RCPTs reach their backends together rather than one round
        trip after another (RFC 2920). Its reply waits its turn in
        L{_ahead}; anything else waits until every reply before it left.

        @return: whether a line was consumed.
        """
        buf = self._buffer
        end = buf.find(b"\n")
        if (
            end < 0
            or end > MAX_COMMAND_LINE
            or len(self._ahead) >= MAX_RCPTS_AHEAD
            or buf[:5].upper() != b"RCPT "
        ):
            return False
        line = bytes(buf[:end])
        del buf[: end + 1]
        # The CR goes with the argument's surrounding space.
        self._ahead.append(self._run(line)[1])
        return True

    def _refuseLongLine(self):
        """
        Refuse a command line over L{MAX_COMMAND_LINE}; an AUTH exchange it
        was part of is over, so the next line is a command again.
        """
        if self.mode is SASL:
            self.mode = COMMAND
            self._sasl = None
        self._send(LINE_TOO_LONG)

    def _command(self, line):
        verb, result = self._run(line)
        self._answer(result, verb == "RCPT")

    def _run(self, line):
        """
        Run one command line.

        @return: its verb in upper case (or C{None}) and its reply, a
            L{Deferred} firing with it, or C{None}.
        """
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = self._decodeAddressLine(line)
            if text is None:
                return None, BAD_CHARACTERS
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "lmtp_" + verb, None)
        if handler is None:
            return verb, UNRECOGNISED
        try:
            return verb, handler(argument.strip())
        except Exception:
            self.log.failure("command {verb} failed", verb=verb)
            return verb, INTERNAL_ERROR

    def _answer(self, result, rcpt=False):
        """
        Send a command's reply, or wait for it.

        @param rcpt: whether the command was a RCPT, behind which RCPTs
            may start while its reply is awaited.
        """
        if isinstance(result, defer.Deferred):
            self._rcptAwaited = rcpt
            self._wait(result)
        elif result is not None:
            self._send(result)

    def _decodeAddressLine(self, line):
        """
        Non-ASCII bytes can only be a UTF-8 address (RFC 6531), in MAIL or
        RCPT; those commands decide whether their transaction allows one.

        @return: the decoded line, or C{None}.
        """
        if line[:5].upper() not in (b"MAIL ", b"RCPT "):
            return None
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _wait(self, deferred, mode=WAITING):
        self.mode = mode
        deferred.addErrback(self._internalError)
        deferred.addCallback(self._waited)

    def _internalError(self, failure):
        self.log.failure("internal error", failure)
        return INTERNAL_ERROR

    def _waited(self, result):
        if self.mode is CLOSED:
            return
        self.mode = COMMAND
        if result is not None:
            self._send(result)
        self.resetTimeout()
        self._process()

    def _send(self, result):
        if self.mode is not CLOSED:
            self._outbox.write(self.transport, result.toBytes())

    # commands

    def lmtp_LHLO(self, argument):
        """
        RFC 2033 4.1: name ourselves and list the extensions.
        """
        if not argument or _CONTROL.search(argument):
            return reply(501, "5.5.4 Syntax: LHLO hostname")
        self._resetTransaction()
        self._greeted = True
        self._helo = (argument.encode("ascii", "replace"), self._helo[1])
        self._identify(self._clientIdentity().withHelo(argument))
        size = self.config.max_message_size
        # DSN is not offered: for a recipient whose backend lacks it, the
        # NOTIFY parameter has to be dropped, and an MTA that saw DSN offered
        # would then leave the success notice it asked for to nobody. DSN
        # parameters a client sends anyway are still passed on where the
        # backend offers DSN.
        extensions = [
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "SIZE %d" % (size,) if size else "SIZE",
            "SMTPUTF8",
        ]
        if self._mayForward():
            # Offered only to the clients allowed to send them, as Postfix
            # and Dovecot do; Postfix sends XFORWARD only when offered.
            extensions += [clientid.XCLIENT_OFFER, clientid.XFORWARD_OFFER]
        extensions += self._securityExtensions()
        return Reply(250, (self.config.hostname,) + tuple(extensions))

    def _securityExtensions(self):
        """
        STARTTLS while the session is in clear, and AUTH once under TLS
        (never before: the password would cross the network in clear).
        """
        config = self.config
        if config.tls_certificate is None:
            return []
        if not self.tls:
            return ["STARTTLS"]
        if config.auth_users_file is not None:
            return ["AUTH PLAIN LOGIN"]
        return []

    def lmtp_XCLIENT(self, argument):
        """
        Postfix's XCLIENT, from a client in C{allowed_xclient}: the original
        client's address, port, greeting name and hop count (C{TTL}) for
        the backends and the loop check. Answered, as Postfix and Dovecot
        do, with a new greeting; the LHLO a client sends next keeps the
        greeting name XCLIENT gave, and MAIL may follow without one.
        """
        result = self._forward(argument, clientid.XCLIENT_ATTRIBUTES)
        if result is not None:
            return result
        return reply(220, "%s LMTP lmtp-proxy ready" % (self.config.hostname,))

    def lmtp_XFORWARD(self, argument):
        """
        Postfix's XFORWARD (C{lmtp_send_xforward_command = yes}), from a
        client in C{allowed_xclient}: the original client, for the backends.
        """
        result = self._forward(argument, clientid.XFORWARD_ATTRIBUTES)
        if result is not None:
            return result
        return OK

    def _forward(self, argument, known):
        """
        Take the attributes of an XCLIENT or XFORWARD command.

        @return: the refusal, or C{None} when they were taken.
        """
        if not self._mayForward():
            return NOT_AUTHORIZED
        if self._origin is not None:
            return FORWARD_IN_TRANSACTION
        try:
            attributes = clientid.parseAttributes(argument, known)
        except clientid.BadAttribute as e:
            return reply(501, str(e))
        self._identify(self._clientIdentity().forwardedAs(attributes))
        return None

    def _mayForward(self):
        return clientid.mayForward(self.config.allowed_xclient, self.transport.getPeer())

    def _clientIdentity(self):
        if self._identity is None:
            self._identity = clientid.ClientIdentity.fromPeer(
                self.transport.getPeer(), object()
            )
        return self._identity

    def _identify(self, identity):
        self._identity = identity

    def lmtp_HELO(self, argument):
        """
        RFC 2033 4.1: an LMTP server must not answer HELO or EHLO with 2xx.
        """
        return NOT_LMTP

    lmtp_EHLO = lmtp_HELO

    def lmtp_NOOP(self, argument):
        return OK

    def lmtp_RSET(self, argument):
        self._resetTransaction()
        return OK

    def lmtp_VRFY(self, argument):
        if not argument:
            return reply(501, "5.5.4 Syntax: VRFY address")
        return reply(252, "2.5.2 Cannot VRFY user, but will attempt delivery")

    def lmtp_HELP(self, argument):
        return reply(214, "2.0.0 Commands: LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def lmtp_QUIT(self, argument):
        self._send(reply(221, "2.0.0 Bye"))
        self._close()

    def lmtp_ETRN(self, argument):
        return NOT_IMPLEMENTED

    lmtp_TURN = lmtp_EXPN = lmtp_BDAT = lmtp_ETRN

    # TLS and SASL

    def lmtp_STARTTLS(self, argument):
        """
        RFC 3207: answer 220, then turn the connection to TLS. What the
        client pipelined after STARTTLS is discarded, never run: it came
        in clear, and an attacker could have put it there (the STARTTLS
        command injection). The session starts again as after the
        greeting: LHLO first.
        """
        config = self.config
        if config.tls_certificate is None:
            return NOT_IMPLEMENTED
        if self.tls:
            return reply(503, "5.5.1 Error: TLS already active")
        if argument:
            return reply(501, "5.5.4 Syntax: STARTTLS")
        try:
            options = serverOptionsFor(config)
        except ConfigError as e:
            self.log.error("no TLS for {peer}: {error}", peer=self.peer, error=e)
            return reply(454, "4.7.0 TLS not available due to temporary reason")
        self._send(reply(220, "2.0.0 Ready to start TLS"))
        # The 220 must leave in clear, ahead of the handshake.
        self._outbox.flush(self.transport)
        del self._buffer[:]
        self._resetTransaction()
        self._greeted = False
        self._helo = (b"", self._helo[1])
        # RFC 3207 4.2: what the client said in clear (XCLIENT, XFORWARD)
        # is forgotten too.
        self._identity = None
        self._startTLS(options)
        return None

    def _startTLS(self, options):
        self.tls = True
        startTLS(self.transport, options)

    def handshakeCompleted(self):
        """
        See L{IHandshakeListener.handshakeCompleted}: log the session's TLS
        version and cipher, once.
        """
        self._handshaken = True
        self.log.info(
            "client {peer}: TLS {session}",
            peer=self.peer,
            session=describeSession(self.transport),
        )

    def lmtp_AUTH(self, argument):
        """
        RFC 4954 SASL AUTH, PLAIN or LOGIN, offered only under TLS: the
        credentials log in to the session's portal, whose avatar then
        replaces the anonymous one.
        """
        config = self.config
        if config.auth_users_file is None:
            return NOT_IMPLEMENTED
        if not self.tls:
            return reply(538, "5.7.11 Encryption required for requested authentication mechanism")
        if not self._greeted:
            return BAD_SEQUENCE_LHLO
        if self.login is not None:
            return reply(503, "5.5.1 Error: already authenticated")
        if self._origin is not None:
            return reply(503, "5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            self._sasl = PLAINCredentials()
        elif mechanism == "LOGIN":
            self._sasl = smtp.LOGINCredentials()
        else:
            return reply(504, "5.5.4 Unrecognized authentication type")
        initial = initial.strip()
        if initial:
            # The initial response answers the first challenge, which is
            # then never sent (as twisted.mail's ext_AUTH does); RFC 4954 4:
            # "=" is an empty initial response.
            self._sasl.getChallenge()
            return self._saslAnswer(b"" if initial == "=" else initial.encode("ascii"))
        return self._challenge()

    def _challenge(self):
        self.mode = SASL
        return Reply(334, (binascii.b2a_base64(self._sasl.getChallenge(), newline=False).decode("ascii"),))

    def _saslResponse(self, line):
        """
        The L{SASL} mode's handler: the client's answer to a challenge.
        """
        self.mode = COMMAND
        self._answer(self._saslAnswer(line))

    def _saslAnswer(self, encoded):
        credentials = self._sasl
        if encoded == b"*":
            self._sasl = None
            return reply(501, "5.0.0 Authentication aborted")
        try:
            credentials.setResponse(binascii.a2b_base64(encoded, strict_mode=True))
        except Exception:
            # Bad base64, a malformed PLAIN response, or more responses
            # than the mechanism has challenges: the exchange is over.
            self._sasl = None
            return reply(501, "5.5.2 Error: cannot decode the AUTH response")
        if credentials.moreChallenges():
            return self._challenge()
        self._sasl = None
        return self.portal.login(credentials, self.peer, IMessageDelivery).addCallbacks(
            self._authenticated, self._authFailed, callbackArgs=(credentials.username,)
        )

    def _authenticated(self, result, login):
        _, delivery, logout = result
        if self.mode is CLOSED:
            logout()
            return None
        previous, self._logout = self._logout, logout
        self.delivery = delivery
        self._lmtpDelivery = ILMTPDelivery.providedBy(delivery)
        if previous is not None:
            previous()
        self.login = login
        self._delays().succeeded(self._helo[1])
        self.log.info(
            "client {peer} authenticated as {login}",
            peer=self.peer,
            login=login.decode("utf-8", "replace"),
        )
        return reply(235, "2.7.0 Authentication successful")

    def _authFailed(self, failure):
        if failure.check(CheckerBusy):
            return reply(454, "4.7.0 Temporary authentication failure, try again later")
        if not failure.check(UnauthorizedLogin, UnhandledCredentials):
            # The users file could not be read: not the client's fault.
            self.log.failure("SASL login from {peer} failed", failure, peer=self.peer)
            return reply(454, "4.7.0 Temporary authentication failure")
        delay = self._delays().failed(self._helo[1])
        self.log.info(
            "SASL login from {peer} failed; answering in {delay:g} s",
            peer=self.peer,
            delay=delay,
        )
        return task.deferLater(self.clock, delay, lambda: AUTH_FAILED)

    def _delays(self):
        if self.loginDelays is None:
            self.loginDelays = FailureDelays(self.clock)
        return self.loginDelays

    def lmtp_MAIL(self, argument):
        if not self._greeted:
            return BAD_SEQUENCE_LHLO
        config = self.config
        if config.require_tls and not self.tls:
            return NEED_TLS
        if config.auth_required and config.auth_users_file is not None and self.login is None:
            return NEED_AUTH
        if self._origin is not None:
            return NESTED_MAIL
        parsed = self._parsePath(argument, "FROM", _MAIL_PARAMETERS)
        if isinstance(parsed, Reply):
            return parsed
        size = self.config.max_message_size
        for key, raw in parsed.params:
            if key == b"SIZE" and size and int(raw[5:]) > size:
                return reply(552, "5.3.4 Message size exceeds fixed limit")
        utf8 = any(key == b"SMTPUTF8" for key, _ in parsed.params)
        if not (utf8 or parsed.address.isascii()):
            return NOT_UTF8_ENABLED
        origin = Path(_toBytes(parsed.address), parsed.address, parsed.params)
        if self._lmtpDelivery:
            self.delivery.identifyClient(self._identity)
        try:
            result = self.delivery.validateFrom(self._helo, origin)
        except Exception:
            return self._senderRefused(defer.Failure(), origin, utf8)
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(
                self._senderAccepted,
                self._senderRefused,
                callbackArgs=(utf8,),
                errbackArgs=(origin, utf8),
            )
        return self._senderAccepted(result, utf8)

    def _senderAccepted(self, origin, utf8):
        self._origin = origin
        self._utf8 = utf8
        return SENDER_OK

    def _senderRefused(self, failure, origin, utf8):
        return replyForFailure(failure, self.log, "sender validation failed")

    def lmtp_RCPT(self, argument):
        if self._origin is None:
            return NEED_MAIL
        parsed = self._parsePath(argument, "TO", _RCPT_PARAMETERS)
        if isinstance(parsed, Reply):
            return parsed
        address = parsed.address
        if not (self._utf8 or address.isascii()):
            return NOT_UTF8_ENABLED
        mailbox = address.rsplit(":", 1)[-1] if address.startswith("@") else address
        if not mailbox or mailbox.startswith("@") or mailbox.endswith("@"):
            return reply(501, "5.1.3 Bad recipient address syntax")
        user = Recipient(
            Path(_toBytes(address), mailbox, parsed.params), self._helo, self, self._origin
        )
        # Pipelined RCPTs can be answered out of order: each recipient has
        # its place in RCPT order from the start.
        accepted = self._accepted
        accepted.append(None)
        place = (accepted, len(accepted) - 1, user)
        try:
            result = self.delivery.validateTo(user)
        except Exception:
            return self._recipientRefused(defer.Failure())
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(
                self._recipientAccepted, self._recipientRefused, callbackArgs=place
            )
        return self._recipientAccepted(result, *place)

    def _recipientAccepted(self, builder, accepted, index, user):
        accepted[index] = (builder, user)
        if IMessageStream.providedBy(builder):
            return builder.rcptReply
        return RECIPIENT_OK

    def _recipientRefused(self, failure):
        return replyForFailure(failure, self.log, "recipient validation failed")

    def lmtp_DATA(self, argument):
        if self._origin is None:
            return NEED_MAIL
        accepted = [recipient for recipient in self._accepted if recipient is not None]
        if not accepted:
            return NEED_RCPT
        # Before any backend is sent DATA: a delivery that fails here leaves
        # nothing half begun.
        header = self.delivery.receivedHeader(
            self._helo, self._origin, [user for _, user in accepted]
        )
        messages = [builder() for builder, _ in accepted]
        transactions = []
        plain = []
        for message in messages:
            if IMessageStream.providedBy(message):
                if message.transaction not in transactions:
                    transactions.append(message.transaction)
            else:
                plain.append(message)
        if plain:
            transactions.append(_LineFeeder(plain))
        self._messages = messages
        self._transactions = transactions
        self._dataError = None
        self._dataSize = 0
        self._inHeaders = True
        self._received = 0
        self._afterCRLF = True
        self._skipping = False
        for transaction in transactions:
            transaction.startData(self._pause, self._resume)
        if header:
            self._relay(_headerLines(header))
        self.mode = DATA
        return reply(354, "Start mail input; end with <CRLF>.<CRLF>")

    # message data

    def _readData(self):
        """
        The L{DATA} mode's reader: relay complete lines of the message,
        still dot-stuffed, checking them on the way.

        @return: whether the message ended.
        """
        buf = self._buffer
        if self._skipping:
            end = buf.find(b"\n")
            if end < 0:
                # Keep the last byte: the CR of a CRLF split from its LF.
                del buf[:-1]
                return False
            self._afterCRLF = buf[end - 1 : end] == b"\r"
            del buf[: end + 1]
            self._skipping = False
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > self.config.max_line_length:
                self._refuseData(self._lineTooLong())
                self._skipping = True
                del buf[:-1]
            return False
        # A dot line ends the message only after a CRLF: after a bare LF
        # that ended the previous piece it is a smuggled end ("\n.\r\n").
        smuggled = False
        if buf.startswith(b".\r\n") and self._afterCRLF:
            end = 0
        else:
            # One scan finds the end and any dot between a CR or LF and a
            # CR before it; only CRLF "." CRLF is not smuggled.
            found = _DOT_CR.search(buf, 0, last + 1)
            if found is None:
                end = -1
            else:
                end = found.start()
                if buf[end - 2 : end] != b"\r\n" or buf[end + 2 : end + 3] != b"\n":
                    smuggled = True
                    end = buf.find(b"\r\n.\r\n", end, last + 1)
                    end = end + 2 if end >= 0 else -1
        body = bytes(buf[: end if end >= 0 else last + 1])
        if self._dataError is None and body:
            self._checkAndRelay(body, smuggled)
        if end < 0:
            self._afterCRLF = buf[last - 1 : last] == b"\r"
            del buf[: last + 1]
            if len(buf) > self.config.max_line_length:
                self._refuseData(self._lineTooLong())
                self._skipping = True
                del buf[:-1]
            return False
        del buf[: end + 3]
        self._endOfData()
        return True

    def _checkAndRelay(self, body, smuggled):
        """
        Relay complete lines of the message unless they are refused.

        @param smuggled: whether the reader already saw a dot line ending
            in CR that was not the end of the message.
        """
        config = self.config
        if smuggled or body.startswith(b".\r") or _BARE_LF.search(body) is not None:
            self._refuseData(SMUGGLING)
            return
        limit = config.max_line_length
        if len(body) > limit and _longestLineOver(body, limit):
            self._refuseData(self._lineTooLong())
            return
        self._dataSize += len(body)
        if config.max_message_size and self._dataSize > config.max_message_size:
            self._refuseData(reply(552, "5.3.4 Message size exceeds fixed limit"))
            return
        if self._inHeaders and self._countReceived(body, config.max_received):
            return
        self._relay(body)

    def _countReceived(self, body, limit):
        """
        Count the C{Received:} headers in C{body} (whole lines, the next
        piece of the header section or past it): a message that passed more
        than C{limit} hops is looping. Only the header section is looked
        at, so once it ended this costs nothing.

        @return: whether the message was refused.
        """
        if body.startswith(b"\r\n"):
            self._inHeaders = False
            return False
        end = body.find(b"\r\n\r\n")
        if end >= 0:
            self._inHeaders = False
            body = body[: end + 2]
        lowered = body.lower()
        self._received += lowered.count(b"\nreceived:") + lowered.startswith(b"received:")
        if self._received > limit:
            self._refuseData(TOO_MANY_RECEIVED)
            return True
        return False

    def _relay(self, data):
        for transaction in self._transactions:
            transaction.write(data)

    def _lineTooLong(self):
        return reply(
            554,
            "5.6.0 Message refused: a line is longer than %d bytes"
            % (self.config.max_line_length,),
        )

    def _refuseData(self, result):
        """
        The message cannot be delivered: stop relaying it and drop it
        everywhere now, so no backend can complete it.
        """
        if self._dataError is None:
            self._dataError = result
            for transaction in self._transactions:
                transaction.refuse(result)

    def _endOfData(self):
        messages, transactions = self._messages, self._transactions
        error = self._dataError
        self._resetEnvelope()
        for transaction in transactions:
            transaction.endData()
        if error is not None:
            self.mode = COMMAND
            for _ in messages:
                self._send(error)
            return
        verdicts = [message.eomReceived() for message in messages]
        self._wait(_FinalReplies(self._send, self.log, verdicts).done, VERDICTS)

    # flow control, timeouts, closing

    def _pause(self, reason):
        if not self._pauses and self.mode is not CLOSED:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason):
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.mode is not CLOSED:
                self.transport.resumeProducing()
                self.resetTimeout()

    def timeoutConnection(self):
        """
        See L{TimeoutMixin.timeoutConnection}: the client said nothing for
        C{idle_timeout} seconds. Time spent waiting for backends, or held
        back by one, does not count: the client owes us nothing then, and
        the count starts again when the wait ends.
        """
        if self.mode is CLOSED:
            return
        if self.mode is WAITING or self.mode is VERDICTS or self._pauses:
            self.setTimeout(self.config.idle_timeout)
            return
        self._closeWith(
            reply(421, "4.4.2 %s Error: timeout exceeded" % (self.config.hostname,)),
            "the client was idle for too long",
        )

    def _shutdownNow(self):
        self._closeWith(
            reply(421, "4.3.2 %s Service shutting down" % (self.config.hostname,)),
            "the proxy stopped before the end of the message",
        )

    def _closeWith(self, result, why):
        """
        Send C{result} and close, then drop the transaction in progress:
        closed first, so the replies its abort fires cannot run the commands
        the client pipelined behind them.
        """
        self._send(result)
        self._close()
        self._abandon(why)

    def _close(self):
        self.setTimeout(None)
        if self.mode is not CLOSED:
            self.mode = CLOSED
            # A TLS transport drops what is written after loseConnection:
            # the last reply must not wait in the outbox.
            self._outbox.flush(self.transport)
            self.transport.loseConnection()
            # A client that stopped reading never lets the last reply out,
            # and the close would wait for it forever.
            self._closeTimer = self.clock.callLater(
                self.config.idle_timeout, self.transport.abortConnection
            )

    def _cancelCloseTimer(self):
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None

    # the transaction

    def _resetEnvelope(self):
        self._origin = None
        self._utf8 = False
        self._accepted = []
        self._messages = None
        self._transactions = ()
        self._dataError = None

    def _resetTransaction(self):
        """
        RSET or LHLO: end the transaction in progress without a message.
        """
        if self._origin is not None and self._lmtpDelivery:
            self.delivery.resetTransaction()
        self._resetEnvelope()

    def _abandon(self, why):
        """
        The session ends before the final dot: nothing of the transaction in
        progress may be delivered.
        """
        if self._origin is None:
            return
        messages = self._messages
        refused = self._dataError is not None
        self._resetEnvelope()
        if self._lmtpDelivery:
            self.delivery.abortTransaction(why)
        elif messages is not None and not refused:
            # A refused message's plain messages were discarded already.
            for message in messages:
                message.connectionLost()

    def _parsePath(self, argument, keyword, allowed):
        if _CONTROL.search(argument):
            return reply(501, "5.5.4 Syntax error: control character in command")
        match = _PATH.match(argument)
        if match is None or match.group(1).upper() != keyword:
            return reply(
                501, "5.5.4 Syntax: %s %s:<address>" % (
                    "MAIL" if keyword == "FROM" else "RCPT", keyword
                )
            )
        address = match.group(2)
        if address.startswith("<"):
            address = address[1:-1]
        params = []
        for token in match.group(3).split():
            key, _, value = token.partition("=")
            if not _KEYWORD.match(key):
                # Not an esmtp-keyword (RFC 5321 4.1.2): a syntax error, and
                # str.upper() must not turn a non-ASCII one into "SIZE".
                return reply(501, "5.5.4 Syntax error in parameters")
            key = key.upper()
            check = allowed.get(key)
            if check is None:
                return reply(555, "5.5.4 Unsupported parameter %s" % (key,))
            # str.upper() and re.I fold some non-ASCII letters into ASCII
            # ones; only an ORCPT of a SMTPUTF8 transaction may be UTF-8
            # (RFC 6533).
            utf8 = key == "ORCPT" and self._utf8
            if not ((value.isascii() or utf8) and check(value)):
                return reply(501, "5.5.4 Bad parameter value for %s" % (key,))
            params.append((key.encode("ascii"), _toBytes(token)))
        return _Command(address, params)


def _headerLines(header):
    """
    A delivery's trace header as whole, dot-stuffed CRLF lines for the
    message. C{twisted.mail}'s own header is one "line" holding "\n\t"
    (trap S6), so a line ends at LF or CRLF; any other control character
    (a bare CR above all, which a backend could take as a line end) becomes
    "?", so nothing in a name the client chose can end the header or the
    message early.
    """
    lines = []
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        line = _HEADER_CONTROL.sub(b"?", line)
        lines.append(b"." + line if line.startswith(b".") else line)
    return b"\r\n".join(lines) + b"\r\n"


_HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# What a backend could take for the end of the message, or the start of a
# line, other than the CRLF "." CRLF we take for it.  Each begins with a
# literal, which CPython's regular expressions search for far faster than
# bytes.count and bytes.find do a needle of two or three bytes; the
# lookbehind runs only where the literal was found.
_DOT_CR = re.compile(rb"\.\r(?<=[\r\n]..)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


def _longestLineOver(body, limit):
    """
    Whether a line of C{body} (complete lines) is longer than C{limit} bytes,
    looking at one window per C{limit} bytes rather than at every line.
    """
    start = 0
    size = len(body)
    while size - start > limit:
        newline = body.rfind(b"\n", start, start + limit)
        if newline < 0:
            return True
        start = newline + 1
    return False


_MAIL_PARAMETERS = {
    # str.isdigit() also accepts digits such as U+00B2 that int() refuses.
    "SIZE": lambda v: v.isascii() and v.isdigit(),
    "BODY": lambda v: v.upper() in ("7BIT", "8BITMIME"),
    "SMTPUTF8": lambda v: v == "",
    "RET": lambda v: v.upper() in ("FULL", "HDRS"),
    "ENVID": lambda v: bool(v) and bool(_XTEXT.match(v)),
}

_RCPT_PARAMETERS = {
    "NOTIFY": lambda v: bool(_NOTIFY.match(v)),
    "ORCPT": lambda v: ";" in v,
}


class LMTPServerFactory(smtp.SMTPFactory):
    """
    Builds L{LMTPServer}s, each logging in to C{portal} for its delivery as
    C{twisted.mail}'s SMTP servers do, and keeps track of them for a
    graceful stop.
    """

    noisy = False
    protocol = LMTPServer
    log = Logger()

    def __init__(self, portal, reactor, getConfig, outbox=None):
        """
        @param portal: the L{Portal} whose avatars are the sessions'
            L{IMessageDelivery}.
        @param reactor: the reactor, for timers.
        @param getConfig: returns the L{lmtp_proxy.config.Config} in force
            (read at each use, so a reload reaches running sessions).
        @param outbox: the L{Outbox} the sessions write through; the one
            the backend connections use, so their writes join.
        """
        smtp.SMTPFactory.__init__(self, portal)
        self.reactor = reactor
        self.getConfig = getConfig
        self.outbox = Outbox() if outbox is None else outbox
        self.sessions = set()
        self._allGone = []
        self.loginDelays = FailureDelays(reactor)
        self._proxyHeaders = proxyHeaderFactory(self)

    def buildProtocol(self, addr):
        """
        See L{IProtocolFactory.buildProtocol}.
        """
        server = _TrackedServer(self.portal, self.reactor, self.getConfig, self.outbox)
        server.factory = self
        server.loginDelays = self.loginDelays
        self.sessions.add(server)
        if self.getConfig().proxy_protocol:
            server.proxied = True
            return ProxyHeaderWrapper(self._proxyHeaders, server)
        return server

    def sessionEnded(self, server):
        self.sessions.discard(server)
        if not self.sessions:
            waiters, self._allGone = self._allGone, []
            for waiter in waiters:
                waiter.callback(None)

    def whenAllGone(self):
        """
        A L{Deferred} that fires when no session is left.
        """
        if not self.sessions:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._allGone.append(waiter)
        return waiter

    def drain(self, grace):
        """
        Let every session finish its transaction, closing it with 421
        afterwards; after C{grace} seconds, close the ones still before the
        final dot (nothing is delivered for them).

        @return: a L{Deferred} that fires when no session is left.
        """
        sessions = list(self.sessions)
        if sessions:
            self.log.info(
                "stopping: {count} session(s) open, {grace} s grace period",
                count=len(sessions),
                grace=grace,
            )
        for session in sessions:
            session.beginShutdown()

        def graceOver():
            for session in list(self.sessions):
                session.forceShutdown()

        timer = self.reactor.callLater(grace, graceOver)
        gone = self.whenAllGone()
        gone.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return gone


class _TrackedServer(LMTPServer):
    def connectionLost(self, reason=protocol.connectionDone):
        LMTPServer.connectionLost(self, reason)
        self.factory.sessionEnded(self)
