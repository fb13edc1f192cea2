"""
The LMTP client that talks to one backend connection.

Twisted's C{SMTPClient} speaks EHLO, expects a single reply after the final
dot, re-encodes the message and keeps every line it sent (AUTH included) for
its error messages; none of that fits a byte-exact LMTP relay. This client is
a small line receiver with a queue of reply waiters: every command gets a
L{Deferred} that fires with that command's L{Reply}, and a connection that
fails for any reason fails every waiter with a L{BackendError} that already
knows the 4xx reply the recipients it touches should get.
"""

import base64
from collections import deque

from twisted.internet import defer, protocol
from twisted.internet.abstract import isIPAddress as isIPv4Address, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, ITCPTransport
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from lmtp_proxy.config import ConfigError

from lmtp_proxy.outbox import Outbox
from lmtp_proxy.twisted_internals import discardLineBuffer, sendRecordsAtOnce, startTLS
from lmtp_proxy.reply import Reply, reply
from lmtp_proxy.tls import clientOptionsFor, describeFailure, describeSession

class BackendError(Exception):
    """
    A backend could not give a verdict. C{reply} is what the recipients it
    touches get: always a 4xx, so the MTA keeps their mail queued.
    """

    enhanced = "4.4.0"
    summary = "backend failed"

    def __init__(self, detail=""):
        Exception.__init__(self, detail)
        self.detail = detail

    @property
    def reply(self):
        return reply(451, "%s %s, try again later" % (self.enhanced, self.summary))


class BackendUnavailable(BackendError):
    """
    The backend could not be reached.
    """

    enhanced = "4.4.1"
    summary = "backend unavailable"


class BackendBusy(BackendUnavailable):
    """
    The backend answered the connection, with a refusal instead of its
    greeting (421 "too many connections"): it is up, so this does not count
    toward marking it down.
    """


class BackendTimeout(BackendError):
    """
    The backend did not answer in time.
    """

    enhanced = "4.4.2"
    summary = "backend timed out"


class BackendLost(BackendError):
    """
    The backend closed the connection before it answered.
    """

    enhanced = "4.4.2"
    summary = "backend connection lost"


class BackendProtocolError(BackendError):
    """
    The backend sent something that is not a valid reply.
    """

    enhanced = "4.4.0"
    summary = "backend protocol error"


class BackendTLSFailed(BackendError):
    """
    TLS with the backend could not be set up: its certificate was refused,
    the handshake failed, or it does not offer STARTTLS. Nothing is sent to
    it in clear instead.
    """

    enhanced = "4.4.2"
    summary = "backend TLS failed"


class BackendAuthFailed(BackendError):
    """
    The backend refused our credentials.
    """

    enhanced = "4.7.0"
    summary = "backend authentication failed"


class _Waiter:
    __slots__ = ("deferred", "timeout")

    def __init__(self, timeout):
        self.deferred = defer.Deferred()
        self.timeout = timeout


@implementer(IHandshakeListener)
class LMTPClient(LineOnlyReceiver):
    """
    One connection to an LMTP backend.

    @ivar extensions: the LHLO keywords (upper case) and their parameters.
    @ivar name: the backend's name, for the log.
    @ivar tls: whether the connection is under TLS (or its handshake).
    """

    log = Logger()
    name = "backend"
    tls = False
    _answeredUnderTLS = False
    _discardClear = False

    delimiter = b"\r\n"
    MAX_LENGTH = 16384
    # Each continuation line moves the reply deadline; a backend sending
    # them without end must not hold a recipient forever.
    MAX_REPLY_LINES = 100

    def __init__(self, clock, commandTimeout, outbox=None, greetingDeadline=None):
        """
        @param greetingDeadline: when (on C{clock}) the greeting must have
            come, or C{None} for a command timeout after the connection.
        """
        self._clock = clock
        self._greetingDeadline = greetingDeadline
        self._outbox = Outbox() if outbox is None else outbox
        self._commandTimeout = commandTimeout
        self._waiters = deque()
        self._unsent = deque()
        self._inFlight = 0
        self._lines = []
        self._timer = None
        self._failure = None
        self.extensions = {}
        self.pipelining = False
        self.greeting = None
        self._greetingWaiter = None
        self.hostname = None
        # The client identity (an lmtp_proxy.clientid.ClientIdentity) this
        # connection last sent XCLIENT for.
        self.xclientFor = None

    # IProtocol

    def connectionMade(self):
        """
        Start waiting for the greeting.
        """
        if ITCPTransport.providedBy(self.transport):
            # Commands and message pieces go out as soon as they are known;
            # Nagle would hold back each one behind the previous segment's
            # ACK.
            self.transport.setTcpNoDelay(True)
        # Under implicit TLS the transport is the TLS layer: its records too
        # leave as soon as they are written.
        sendRecordsAtOnce(self.transport)
        timeout = self._commandTimeout
        if self._greetingDeadline is not None:
            timeout = max(0.0, self._greetingDeadline - self._clock.seconds())
        self._greetingWaiter = self._expect(timeout)
        self.greeting = self._greetingWaiter.deferred

    def connectionLost(self, reason=ConnectionDone):
        """
        Fail every reply still awaited.
        """
        if self.tls and not self._answeredUnderTLS:
            # Under TLS 1.3 the server refuses a client certificate only
            # after the client saw its handshake complete: until the
            # backend said something under TLS, a loss is TLS's failure.
            self._fail(BackendTLSFailed(describeFailure(reason.value)))
        else:
            self._fail(BackendLost(reason.getErrorMessage()))

    def handshakeCompleted(self):
        """
        See L{IHandshakeListener.handshakeCompleted}: log the connection's
        TLS version and cipher, once.
        """
        self.log.info(
            "backend {name}: TLS {session}",
            name=self.name,
            session=describeSession(self.transport),
        )

    def dataReceived(self, data):
        """
        Handle the reply lines with the outbox held, so what they cause to be
        written leaves joined.
        """
        self._outbox.hold()
        try:
            LineOnlyReceiver.dataReceived(self, data)
        finally:
            if self._discardClear:
                # What came in clear after the 220 to STARTTLS is not the
                # backend's (RFC 3207 4.2); the next bytes are TLS.
                self._discardClear = False
                discardLineBuffer(self)
            self._outbox.release()

    def sendLine(self, line):
        """
        Send one command line through the outbox.
        """
        self._outbox.write(self.transport, line + self.delimiter)

    def lineReceived(self, line):
        """
        Parse one reply line; hand a complete reply to the oldest waiter.
        """
        if self._discardClear:
            return
        if self.tls:
            self._answeredUnderTLS = True
        if not self._waiters:
            return self._fail(BackendProtocolError("unexpected reply"))
        text = line.decode("utf-8", "replace")
        # The code is checked as bytes: str.isdigit() and int() also take
        # non-ASCII digits such as U+0663.
        if (
            len(line) < 3
            or not line[:3].isdigit()
            or line[:1] not in (b"2", b"3", b"4", b"5")
            or (len(line) > 3 and line[3:4] not in (b" ", b"-"))
        ):
            return self._fail(BackendProtocolError("bad reply line"))
        code = int(text[:3])
        if not self._lines and text[3:4] != "-":
            result = Reply(code, (text[4:],))
        else:
            if self._lines and code != self._lines[0][0]:
                return self._fail(BackendProtocolError("inconsistent multiline reply"))
            if len(self._lines) >= self.MAX_REPLY_LINES:
                return self._fail(BackendProtocolError("reply too long"))
            self._lines.append((code, text[4:]))
            if text[3:4] == "-":
                # A long reply still arriving is progress: move the deadline.
                self._armTimer()
                return
            result = Reply(code, tuple(t for _, t in self._lines))
            self._lines = []
        if code == 421:
            # The backend is closing the connection. Passed on, a 421 would
            # tell the client that *its* session is closing.
            greeting = self._waiters[0] is self._greetingWaiter
            error = BackendBusy if greeting else BackendLost
            return self._fail(error("backend said %s" % (result,)))
        waiter = self._waiters.popleft()
        self._inFlight = max(0, self._inFlight - 1)
        self._armTimer()
        self._sendUnsent()
        waiter.deferred.callback(result)

    def lineLengthExceeded(self, line):
        """
        A reply line this long is garbage, not a reply.
        """
        self._fail(BackendProtocolError("reply line too long"))

    # the API used by the delivery

    @property
    def usable(self):
        """
        Whether this connection can still carry commands.
        """
        return self._failure is None and self.transport is not None and (
            self.transport.connected
        )

    def command(self, line, timeout=None):
        """
        Send one command line and return a L{Deferred} that fires with its
        L{Reply} or fails with a L{BackendError}.

        Towards a backend that does not offer PIPELINING, a command is held
        until the previous reply arrived.
        """
        waiter = self._expect(self._commandTimeout if timeout is None else timeout)
        if self._failure is None:
            self._unsent.append(line)
            self._sendUnsent()
        return waiter.deferred

    def expectReplies(self, count, timeout):
        """
        Return C{count} L{Deferred}s for replies that data already written
        (the final dot) will produce.
        """
        # They are owed like command replies: a backend without PIPELINING
        # must not get the next command before the last of them.
        self._inFlight += count
        return [self._expect(timeout).deferred for _ in range(count)]

    def writeData(self, data):
        """
        Relay message bytes as they are.
        """
        if self._failure is None:
            self._outbox.write(self.transport, data)

    def abort(self):
        """
        Drop the connection without another byte, so a message in progress
        is never completed.
        """
        self._fail(BackendLost("aborted"))

    @defer.inlineCallbacks
    def handshake(self, hostname, user=None, password=None, starttls=None):
        """
        Wait for the greeting, send LHLO, start TLS if C{starttls} (the
        options of L{lmtp_proxy.tls.clientOptions}) is given, and
        authenticate if credentials are configured.

        @return: a L{Deferred} firing with this client.
        """
        greeting = yield self.greeting
        if greeting.code != 220:
            raise BackendBusy("greeting %d" % (greeting.code,))
        self.hostname = hostname.encode("ascii", "replace")
        yield self._lhlo()
        if starttls is not None:
            yield self._startTLS(starttls)
        if user is not None:
            yield self._authenticate(user, password)
        return self

    def xclient(self, identity, command):
        """
        Tell the backend who the original client is (Postfix's XCLIENT,
        which Dovecot also speaks), between transactions.

        A backend that takes it answers with a new 220 greeting and forgets
        the LHLO (Postfix's protocol, and Dovecot's), so LHLO follows. With
        PIPELINING the LHLO goes out right behind the XCLIENT, and the
        caller may pipeline MAIL behind both: no round trip is spent (a
        backend that refused the XCLIENT just sees LHLO again). A refusal
        leaves the connection as it was: the mail is delivered all the
        same, the backend just logs the proxy as its client.

        @param identity: the L{lmtp_proxy.clientid.ClientIdentity} sent.
        @param command: the XCLIENT line for this backend.
        @return: a L{Deferred} firing when both are answered.
        """
        self.xclientFor = identity
        sent = self.command(command)
        if self.pipelining:
            # The LHLO's reply comes after the XCLIENT's, and a lost
            # connection fails both.
            sent.addErrback(lambda failure: None)
            return self._lhlo()
        return sent.addCallback(lambda result: self._lhlo() if result.code == 220 else None)

    # internals

    @defer.inlineCallbacks
    def _startTLS(self, options):
        """
        RFC 3207: STARTTLS, the handshake, and LHLO again under TLS. A
        backend that does not offer it gets nothing more: never a fallback
        to clear text.
        """
        if "STARTTLS" not in self.extensions:
            raise BackendTLSFailed("STARTTLS not offered")
        result = yield self.command(b"STARTTLS")
        if result.code != 220:
            raise BackendTLSFailed("STARTTLS answered %d" % (result.code,))
        self.tls = True
        self._discardClear = True
        startTLS(self.transport, options)
        yield self._lhlo()

    def _lhlo(self):
        return self.command(b"LHLO " + self.hostname).addCallback(self._lhloAnswered)

    def _lhloAnswered(self, lhlo):
        if not lhlo.positive:
            raise BackendProtocolError("LHLO refused with %d" % (lhlo.code,))
        self.extensions = _parseExtensions(lhlo.lines[1:])
        self.pipelining = "PIPELINING" in self.extensions

    @defer.inlineCallbacks
    def _authenticate(self, user, password):
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(
                b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
            )
            result = yield self.command(b"AUTH PLAIN " + token)
        else:
            result = yield self.command(b"AUTH LOGIN")
            for secret in (user, password):
                if result.code != 334:
                    break
                result = yield self.command(base64.b64encode(secret.encode("utf-8")))
        if result.code != 235:
            raise BackendAuthFailed("AUTH answered %d" % (result.code,))

    def _expect(self, timeout):
        waiter = _Waiter(timeout)
        if self._failure is not None:
            waiter.deferred.errback(self._failure)
            return waiter
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._armTimer()
        return waiter

    def _sendUnsent(self):
        while self._unsent and (self.pipelining or self._inFlight == 0):
            self._inFlight += 1
            self.sendLine(self._unsent.popleft())

    def _armTimer(self):
        """
        Give the oldest reply awaited a full timeout from now.
        C{DelayedCall.reset} to a later time only records the delay, so
        moving the deadline on every reply line costs no timer cancel and
        insert; and with no reply awaited the timer is left to fire and
        find nothing to do, rather than cancelled and made again for the
        next command (a cancel and an insert three times per message).
        """
        if not self._waiters or self._failure is not None:
            return
        timeout = self._waiters[0].timeout
        if self._timer is None:
            self._timer = self._clock.callLater(timeout, self._timedOut)
        else:
            self._timer.reset(timeout)

    def _stopTimer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timedOut(self):
        self._timer = None
        if not self._waiters:
            return
        if self._waiters[0] is self._greetingWaiter:
            self._fail(BackendTimeout("no greeting within connect_timeout"))
            return
        self._fail(BackendTimeout("no reply in time"))

    def _fail(self, error):
        if self._failure is None:
            self._failure = error
            self._stopTimer()
            if self.transport is not None:
                self.transport.abortConnection()
        self._unsent.clear()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.deferred.errback(self._failure)


def _parseExtensions(lines):
    """
    Map LHLO keywords to their parameters. smtp-sink ends its list with an
    empty line, which is ignored rather than refused.
    """
    extensions = {}
    for line in lines:
        words = line.split(None, 1)
        if words:
            extensions[words[0].upper()] = words[1] if len(words) > 1 else ""
    return extensions


def connectBackend(
    reactor, backend, hostname, connectTimeout, commandTimeout, outbox=None
):
    """
    Connect to C{backend} (a L{lmtp_proxy.config.Backend}), wait for its
    greeting, send LHLO and authenticate. The client writes through
    C{outbox} (an L{lmtp_proxy.outbox.Outbox}) if given.

    @return: a L{Deferred} firing with a ready L{LMTPClient}, or failing with
        a L{BackendError}.
    """
    if backend.socket:
        endpoint = UNIXClientEndpoint(reactor, backend.socket, timeout=connectTimeout)
    elif isIPv4Address(backend.host):
        endpoint = TCP4ClientEndpoint(
            reactor, backend.host, backend.port, timeout=connectTimeout
        )
    elif isIPv6Address(backend.host):
        endpoint = TCP6ClientEndpoint(
            reactor, backend.host, backend.port, timeout=connectTimeout
        )
    else:
        # Only a name needs the resolver, which runs in a thread.
        endpoint = HostnameEndpoint(
            reactor, backend.host, backend.port, timeout=connectTimeout
        )
    # README's promise: connect_timeout covers the connection and the
    # greeting; a backend that accepts but never greets is a dead one.
    starttls = None
    if backend.tls != "none":
        try:
            options = clientOptionsFor(backend)
        except ConfigError as e:
            return defer.fail(BackendTLSFailed(str(e)))
        if backend.tls == "implicit":
            endpoint = wrapClientTLS(options, endpoint)
        else:
            starttls = options
    client = LMTPClient(
        reactor, commandTimeout, outbox, reactor.seconds() + connectTimeout
    )
    client.name = backend.name
    client.tls = backend.tls == "implicit"
    factory = protocol.Factory.forProtocol(lambda: client)
    # One connection per transaction would log two lines each otherwise.
    factory.noisy = False
    # The endpoint's own timeout covers each connection attempt, not the
    # name lookup before them.
    connecting = endpoint.connect(factory).addTimeout(connectTimeout, reactor)

    def connectFailed(failure):
        client.abort()
        if failure.check(BackendError):
            return failure
        raise BackendUnavailable(failure.getErrorMessage())

    connecting.addCallbacks(
        lambda _: client.handshake(hostname, backend.user, backend.password, starttls),
    )
    connecting.addErrback(connectFailed)
    return connecting
