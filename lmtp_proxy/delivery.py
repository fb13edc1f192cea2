"""
The delivery that joins one client transaction to its backend sessions.

Recipients of one backend share one backend transaction. Nothing here ever
answers 2xx for a recipient on its own: every positive reply given to the
client is the reply its backend gave, and every fault becomes a 4xx for the
recipients it touches.
"""

import random

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from lmtp_proxy.client import BackendError, BackendLost, BackendTimeout
from lmtp_proxy.clientid import xtextEncode
from lmtp_proxy.interfaces import IMessageStream, ITransaction
from lmtp_proxy.recorder import NO_METRICS
from lmtp_proxy.reply import Reply, reply
from lmtp_proxy.routing import REJECT, rewriteAddress
from lmtp_proxy.twisted_internals import TextLogLines

# Message bytes held for a backend that has not answered DATA yet, past
# which reading from the client pauses.
MAX_HELD = 256 * 1024

REJECTED = reply(451, "4.2.1 Mailbox temporarily unavailable, try again later")
UNROUTED = reply(550, "5.1.1 No such user here")
ABORTED = reply(451, "4.3.0 Message not completed")
LOOP = reply(554, "5.4.6 Proxy loop detected")
# This node cannot vouch for its routing table (its lease on the
# routing database ran out, or the table is not loaded yet).
FENCED = reply(451, "4.3.0 Routing table unavailable, try again later")

# Which LHLO keyword a backend must offer before a MAIL or RCPT parameter may
# be passed on to it.
PARAMETER_EXTENSIONS = {
    b"SIZE": "SIZE",
    b"BODY": "8BITMIME",
    b"SMTPUTF8": "SMTPUTF8",
    b"RET": "DSN",
    b"ENVID": "DSN",
    b"NOTIFY": "DSN",
    b"ORCPT": "DSN",
}


def newTransactionId(_random=random.Random().getrandbits):
    """
    A short random id in the spirit of a Postfix queue id. Seeded once from
    the system: not a secret, so no system call per message.
    """
    return "%010X" % (_random(40),)


def _forwarded(params, client):
    return b"".join(
        b" " + raw
        for key, raw in params
        if PARAMETER_EXTENSIONS.get(key) in client.extensions
    )


class Delivery:
    """
    What every client session of one listener shares: the reactor, the
    routing state, the backend connections and the metrics.

    @ivar running: the L{Transaction}s not ended yet, for
        C{lmtp-proxy status}.
    @ivar outcomes: the L{TextLogLines} each recipient's outcome line is
        logged with.
    """

    log = Logger()

    def __init__(self, reactor, state, pool, metrics=NO_METRICS):
        """
        @param metrics: the L{lmtp_proxy.recorder.IRecorder} told of each
            recipient and message.
        """
        self.reactor = reactor
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.outbox = pool.outbox
        self.running = set()
        self.outcomes = TextLogLines(self.log, "outcome", self.outbox)

    def begin(self, client, sender, params, identity=None):
        """
        Start a transaction for C{MAIL FROM:<sender>}.

        @param identity: the original client, an
            L{lmtp_proxy.clientid.ClientIdentity}, or C{None}.
        """
        return Transaction(self, client, sender, params, identity)


@implementer(IPushProducer)
class _Throttle:
    """
    Registered with one backend's transport while the message streams: a
    backend that cannot keep up pauses reading from the client, and one that
    stays stuck for a command timeout is dropped, so a single slow backend
    neither fills our memory nor stalls the others forever.
    """

    def __init__(self, session, pauseClient, resumeClient):
        self._session = session
        self._pauseClient = pauseClient
        self._resumeClient = resumeClient
        self._timer = None

    def pauseProducing(self):
        if self._timer is None:
            self._pauseClient(self)
            self._timer = self._session.clock.callLater(
                self._session.config.command_timeout, self._stuck
            )

    def resumeProducing(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._resumeClient(self)

    def stopProducing(self):
        self.resumeProducing()

    def _stuck(self):
        self._timer = None
        self._resumeClient(self)
        self._session.fail(BackendTimeout("backend stopped reading"))


class BackendSession:
    """
    One backend's share of one transaction: a connection, the MAIL, the
    recipients it accepted.
    """

    def __init__(self, transaction, backend):
        self.transaction = transaction
        self.backend = backend
        self.config = transaction.config
        self.clock = transaction.delivery.reactor
        self.client = None
        self.failure = None
        self.accepted = 0
        self._reused = False
        self._mailSent = False
        self._mailReply = None
        self._repliesFailed = False
        self._throttle = None
        self._goAhead = None
        self._held = None
        self._heldSize = 0
        self._holding = False
        self._unanswered = 0
        self._aborted = False
        # While the first RCPT is out, the RCPTs pipelined behind it: they
        # need its connection, its MAIL, or its retry.
        self._behindFirst = None
        self.dotSent = False

    def rcpt(self, address, params):
        """
        Send one RCPT and return a L{Deferred} firing with the reply for the
        client.

        The first RCPT goes out together with the MAIL FROM, so that a
        backend offering PIPELINING costs one round trip, not two; on an
        idle pooled connection it goes out at once, without a Deferred
        between taking the connection and writing. A RCPT that comes while
        the first is still out goes once that one is answered.
        """
        if self._behindFirst is not None:
            waiting = defer.Deferred()
            self._behindFirst.append((waiting, address, params))
            return waiting
        client = self.client
        if client is not None and self._mailSent:
            return client.command(
                b"RCPT TO:<" + address + b">" + _forwarded(params, client)
            ).addCallbacks(self._rcptAnswered, self._rcptFailed)
        if client is None and self.failure is None and not self._aborted:
            client = self.transaction.delivery.pool.takeIdle(self.backend, self._session())
            if client is not None:
                self.client, self._reused = client, True
        self._behindFirst = []
        if client is not None and (client.pipelining or not self._mustTell(client)):
            return self._sendFirst(client, address, params, 0)
        return self._firstRcpt(address, params, 0).addBoth(self._firstAnswered)

    def _firstAnswered(self, result):
        self._sendBehindFirst()
        return result

    def _sendBehindFirst(self):
        """
        The first RCPT is answered (or failed for good): send the RCPTs that
        waited for it. Once is enough; the first RCPT's callbacks call this
        without a Deferred's callback of its own where they can.
        """
        behind, self._behindFirst = self._behindFirst or (), None
        for waiting, address, params in behind:
            if self._aborted:
                # Dropped meanwhile: no connection is taken or opened for them.
                waiting.callback(self.failure or ABORTED)
            else:
                # One that raises fails alone, as it would unqueued; the
                # others must still get their replies.
                defer.maybeDeferred(self.rcpt, address, params).chainDeferred(waiting)

    @defer.inlineCallbacks
    def _firstRcpt(self, address, params, first):
        """
        The first RCPT where something must be waited for before MAIL: a new
        connection, or the answer to XCLIENT from a backend without
        PIPELINING. A pooled connection found closed earns one more try
        (C{first} is the number of the try).
        """
        for attempt in range(first, 2):
            if self.client is None and self.failure is None:
                try:
                    self.client, self._reused = yield self.transaction.delivery.pool.acquire(
                        self.backend, self.config, self._session()
                    )
                except BackendError as e:
                    self.failure = e.reply
                if self._aborted and self.client is not None:
                    # The transaction ended while connecting: the fresh
                    # connection carries nothing yet, so it can serve another.
                    self.transaction.delivery.pool.release(
                        self.backend, self.client, self.config
                    )
                    self.client = None
                    return ABORTED
            if self.failure is not None:
                return self.failure
            client = self.client
            if not client.pipelining and self._mustTell(client):
                try:
                    yield self._tell(client)
                except BackendError as e:
                    client.abort()
                    self.client = None
                    if self._pooledConnectionLost(e, attempt):
                        continue
                    self.failure = e.reply
                    return self.failure
            result = yield self._sendFirst(client, address, params, attempt)
            return result

    def _sendFirst(self, client, address, params, attempt):
        """
        Send MAIL and the first RCPT on C{client}, behind the XCLIENT that
        the backend still needs if it takes one pipelined.

        @param attempt: the number of this try (L{_firstRcpt}).
        @return: a L{Deferred} firing with the RCPT's reply for the client.
        """
        try:
            if self._mustTell(client):
                # MAIL follows in the same write. A lost connection fails it
                # too; a refused LHLO must as well.
                self._tell(client).addErrback(lambda failure: client.abort())
            self._mailSent = True
            self._mailReply = None
            tx = self.transaction
            # A MAIL that fails fails the RCPT behind it the same way, whose
            # errback handles both.
            client.command(
                b"MAIL FROM:<" + tx.sender + b">" + _forwarded(tx.params, client)
            ).addCallbacks(self._mailAnswered, _ignore)
            return client.command(
                b"RCPT TO:<" + address + b">" + _forwarded(params, client)
            ).addCallbacks(
                self._firstRcptAnswered,
                self._firstRcptFailed,
                errbackArgs=(address, params, attempt),
            )
        except Exception:
            # Which of XCLIENT, MAIL and RCPT went out is unknown: the
            # connection is dropped, and the RCPTs behind get this backend's
            # 4xx, not a RCPT sent behind a MAIL that may never have gone.
            self.fail(BackendError("first RCPT not sent"))
            self._sendBehindFirst()
            raise

    def _mailAnswered(self, result):
        self._mailReply = result
        if result.positive:
            return
        # The backend answers the RCPT with a 503, which is not passed on.
        if 400 <= result.code < 600:
            self.failure = result.withEnhancedCode()
            self.reset()
        else:
            self.fail(BackendError("unexpected MAIL reply %d" % (result.code,)))

    def _firstRcptAnswered(self, result):
        try:
            if not self._mailReply.positive:
                return self.failure
            return self._rcptAnswered(result)
        finally:
            self._sendBehindFirst()

    def _firstRcptFailed(self, failure, address, params, attempt):
        if self._mailReply is None and failure.check(BackendError):
            self.client = None
            if self._pooledConnectionLost(failure.value, attempt):
                self._mailSent = False
                return self._firstRcpt(address, params, attempt + 1).addBoth(
                    self._firstAnswered
                )
        try:
            if self._mailReply is not None:
                # Lost after MAIL was answered; a refused MAIL's failure stays.
                return self._rcptFailed(failure)
            failure.trap(BackendError)
            self.failure = failure.value.reply
            return self.failure
        finally:
            self._sendBehindFirst()

    def _mustTell(self, client):
        """
        Whether the backend connection C{client} must have XCLIENT for this
        transaction's client session before MAIL: once per client session
        on a connection, pooled or not.
        """
        identity = self.transaction.identity
        return (
            identity is not None
            and not identity.sameAs(client.xclientFor)
            and "XCLIENT" in client.extensions
        )

    def _tell(self, client):
        identity = self.transaction.identity
        return client.xclient(identity, identity.xclient(client.extensions["XCLIENT"]))

    def _session(self):
        """
        This transaction's client session, for the pool: several sessions
        that share it each get back the connection that had their XCLIENT,
        where they can, so XCLIENT and the LHLO after it are not sent again
        per message.
        """
        identity = self.transaction.identity
        return identity.session if identity is not None else None

    def _pooledConnectionLost(self, error, attempt):
        """
        Whether C{error} is a pooled connection that the backend closed
        while it was idle (not one this transaction dropped itself), which
        earns the first RCPT one more try on a new connection.
        """
        return (
            isinstance(error, BackendLost)
            and self._reused
            and attempt == 0
            and not self._aborted
        )

    def _rcptAnswered(self, result):
        if result.positive:
            self.accepted += 1
        elif not 400 <= result.code < 600:
            self.fail(BackendError("unexpected RCPT reply %d" % (result.code,)))
            return self.failure
        elif result.code >= 500 and self.backend.unknown_user == "tempfail":
            result = result.withEnhancedCode()
            if result.lines[0].startswith("5.1."):
                return _unknownUserTempfail(result)
            return result
        return result.withEnhancedCode()

    def _rcptFailed(self, failure):
        failure.trap(BackendError)
        self.fail(failure.value)
        return self.failure

    def startData(self, pauseClient, resumeClient):
        """
        Send DATA. The client has its 354 at once: what it sends before this
        backend's own 354 is held (reading from the client pauses past
        L{MAX_HELD} bytes) and relayed when the 354 comes, which saves a
        round trip per message.
        """
        if self.failure is not None or not self.accepted:
            return
        self._pauseClient, self._resumeClient = pauseClient, resumeClient
        self._held = []
        self._goAhead = self.client.command(b"DATA").addCallbacks(
            self._dataAnswered, self._dataFailed
        )

    def _dataAnswered(self, result):
        held, self._held = self._held, None
        self._stopHolding()
        if self.client is None:
            return
        if result.code != 354:
            self.failure = (
                result if 400 <= result.code < 600 else BackendError().reply
            ).withEnhancedCode()
            self._release(self.client, reset=True)
            self.client = None
            return
        self._throttle = _Throttle(self, self._pauseClient, self._resumeClient)
        self.client.transport.registerProducer(self._throttle, True)
        for data in held:
            self.client.writeData(data)

    def _dataFailed(self, failure):
        self._held = None
        self._stopHolding()
        error = failure.value
        self.fail(error if isinstance(error, BackendError) else BackendError(str(error)))

    def _stopHolding(self):
        if self._holding:
            self._holding = False
            self._resumeClient(self)

    def write(self, data):
        """
        Relay message bytes, or hold them until the backend's 354.
        """
        if self._throttle is not None:
            self.client.writeData(data)
        elif self._held is not None:
            self._held.append(data)
            self._heldSize += len(data)
            if self._heldSize > MAX_HELD and not self._holding:
                self._holding = True
                self._pauseClient(self)

    def finish(self):
        """
        Send the final dot (once the backend said 354) and return one
        L{Deferred} per accepted recipient.
        """
        if self._goAhead is None:
            return self._noMessage()
        if self._goAhead.called:
            # The backend's 354 (or its failure) came while the message
            # streamed, as it mostly does.
            return self._sendDot()
        results = [defer.Deferred() for _ in range(self.accepted)]

        def endMessage(ignored):
            for verdict, result in zip(self._sendDot(), results):
                verdict.chainDeferred(result)

        self._goAhead.addCallback(endMessage)
        return results

    def _noMessage(self):
        self.reset()
        return [defer.succeed(self.failure or ABORTED) for _ in range(self.accepted)]

    def _sendDot(self):
        if self._throttle is None:
            return self._noMessage()
        client = self.client
        self._stopStreaming()
        self.dotSent = True
        client.writeData(b".\r\n")
        replies = client.expectReplies(self.accepted, self.config.data_timeout)
        self._unanswered = len(replies)
        return [
            d.addCallbacks(
                self._finalReply,
                self._finalFailure,
                callbackArgs=(client,),
                errbackArgs=(client,),
            )
            for d in replies
        ]

    def fail(self, error):
        """
        Give up on this backend: drop its connection, and remember the reply
        its recipients get.
        """
        if self.failure is None:
            self.failure = error.reply
        self.abort()

    def abort(self):
        """
        Drop the connection without completing anything on it.
        """
        self._aborted = True
        self._stopStreaming()
        if self.client is not None:
            self.client.abort()
            self.client = None

    def reset(self):
        """
        End this backend transaction without a message (client RSET).
        """
        self._stopStreaming()
        if self.client is not None:
            self._release(self.client, reset=True)
            self.client = None

    def _stopStreaming(self):
        if self._throttle is not None:
            self._throttle.stopProducing()
            self._throttle = None
            if self.client is not None and self.client.transport is not None:
                self.client.transport.unregisterProducer()

    def _finalReply(self, result, client):
        if result.positive or 400 <= result.code < 600:
            result = result.withEnhancedCode()
        else:
            self._repliesFailed = True
            result = BackendError("unexpected reply %d after DATA" % (result.code,)).reply
        self._answered(client)
        return result

    def _finalFailure(self, failure, client):
        self._repliesFailed = True
        self._answered(client)
        failure.trap(BackendError)
        return failure.value.reply

    def _answered(self, client):
        self._unanswered -= 1
        if self._unanswered:
            return
        self.client = None
        if self._repliesFailed or not client.usable:
            client.abort()
        else:
            self._release(client)

    def _release(self, client, reset=False):
        pool = self.transaction.delivery.pool
        if not reset:
            pool.release(self.backend, client, self.config)
            return
        if not client.usable:
            return

        def resetDone(result):
            if result.positive:
                pool.release(self.backend, client, self.config)
            else:
                client.abort()

        client.command(b"RSET").addCallbacks(resetDone, lambda f: None)


class Fenced(BackendError):
    """
    This node stopped delivering (its lease on the routing database ran
    out) before the backend had the final dot.
    """

    enhanced = "4.3.0"
    summary = "routing table unavailable"


def _unknownUserTempfail(result):
    """
    A backend's "no such user" (5.1.x) at RCPT, as C{450 4.1.1} with the
    backend's text kept: with C{unknown_user: tempfail}, a user whose row is
    a moment out of date during a move is retried, not bounced.
    """
    return Reply(
        450,
        tuple(
            "4.1.1" + line[line.find(" "):] if " " in line else "4.1.1"
            for line in result.lines
        ),
    )


def _renamed(result, rewritten, original):
    """
    A backend's reply about a rewritten recipient, naming the address the
    MTA knows instead.
    """
    if not any(rewritten in line for line in result.lines):
        return result
    return Reply(result.code, tuple(line.replace(rewritten, original) for line in result.lines))


class RecipientRefused(smtp.SMTPBadRcpt):
    """
    A recipient refused at RCPT, by its backend or by the routing: C{reply}
    is what the client gets, the backend's own code and text where it gave
    them.
    """

    def __init__(self, user, result):
        # Not SMTPBadRcpt.__init__: it would parse the address again.
        Exception.__init__(self, result)
        self.addr = user.dest
        self.code = result.code
        self.resp = "\n".join(result.lines)
        self.reply = result


@implementer(IMessageStream)
class AcceptedRecipient:
    """
    One recipient a backend accepted: the message object that
    C{validateTo} hands out for it (it is its own builder), whose data goes
    to the shared L{Transaction} and whose C{eomReceived} is this
    recipient's own verdict.
    """

    __slots__ = ("address", "route", "transaction", "rcptReply", "verdict", "rewritten")

    def __init__(self, address, route, transaction, rcptReply, rewritten=None):
        """
        @param rewritten: the address the backend got instead of
            C{address}, for a route that rewrites it (text), or C{None}.
        """
        self.address = address
        self.route = route
        self.transaction = transaction
        self.rcptReply = rcptReply
        self.verdict = None
        self.rewritten = rewritten

    def __call__(self):
        return self

    def lineReceived(self, line):
        """
        See L{IMessage.lineReceived}: for a server that feeds lines rather
        than chunks.
        """
        self.transaction.lineReceived(self, line)

    def eomReceived(self):
        """
        See L{IMessage.eomReceived}: a L{Deferred} firing with this
        recipient's L{Reply}.
        """
        if self.verdict is None:
            self.transaction.endData()
        return self.verdict

    def connectionLost(self):
        """
        See L{IMessage.connectionLost}: the client left before the end of
        the message, which is delivered nowhere.
        """
        self.transaction.abort()


def _ignore(reason):
    pass


@implementer(ITransaction)
class Transaction:
    """
    One MAIL transaction of a client session: its recipients' backend
    sessions and the message they share.
    """

    def __init__(self, delivery, client, sender, params, identity=None):
        self.delivery = delivery
        self.client = client
        self.sender = sender
        self.params = params
        self.identity = identity
        # An XCLIENT said TTL=0: the mail went round the proxies.
        self._loop = identity is not None and identity.loop
        self.id = newTransactionId()
        self.started = delivery.reactor.seconds()
        self.generation = delivery.state.begin(self)
        self._fenced = None
        delivery.running.add(self)
        self.config = delivery.state.config
        self.sessions = {}
        self.accepted = []
        self.size = 0
        self._ended = False
        self._dataEnded = False
        self._lineFeeder = None
        self._why = None
        self._unsettled = 0

    def rcpt(self, user):
        """
        Route one recipient and send its RCPT to its backend.

        @param user: an L{lmtp_proxy.envelope.Recipient}.
        @return: a L{Deferred} firing with an L{AcceptedRecipient} once the
            backend accepted it, or failing with L{RecipientRefused}.
        @raise RecipientRefused: at once, for a recipient without a route or
            routed to C{reject}.
        """
        state = self.delivery.state
        state.checkLease()
        if state.fenced is not None:
            self.delivery.metrics.rcptReply("none", FENCED.code)
            self._outcome(user.dest.raw, None, FENCED)
            raise RecipientRefused(user, FENCED)
        if self._loop:
            self.delivery.metrics.rcptReply("none", LOOP.code)
            self._outcome(user.dest.raw, None, LOOP)
            raise RecipientRefused(user, LOOP)
        route = self.delivery.state.table.route(user.dest.mailbox)
        if isinstance(route, defer.Deferred):
            return route.addCallback(self._routed, user)
        return self._routed(route, user)

    def _routed(self, route, user):
        address = user.dest.raw
        if route is None:
            self.delivery.metrics.rcptReply("none", UNROUTED.code)
            self._outcome(address, None, UNROUTED)
            raise RecipientRefused(user, UNROUTED)
        if route.backend == REJECT:
            self.delivery.metrics.rcptReply(REJECT, REJECTED.code)
            self._outcome(address, route, REJECTED)
            raise RecipientRefused(user, REJECTED)
        session = self.sessions.get(route.backend)
        if session is None:
            session = BackendSession(self, self.config.backends[route.backend])
            self.sessions[route.backend] = session
        if route.address is not None:
            return self._rewritten(route, user, session)
        return session.rcpt(address, user.dest.params).addCallback(
            self._rcptAnswered, user, route, session
        )

    def _rewritten(self, route, user, session):
        """
        Send the RCPT of a recipient its route rewrites: the backend gets
        the new address (the detail kept) and, where it offers DSN and the
        client sent none, the original as C{ORCPT}; the client's replies
        name the original.
        """
        original = user.dest.mailbox
        rewritten = rewriteAddress(original, route.address, self.config.recipient_delimiter)
        params = user.dest.params
        if not any(key == b"ORCPT" for key, _ in params):
            params = list(params) + [
                (b"ORCPT", b"ORCPT=rfc822;" + xtextEncode(original).encode("ascii"))
            ]
        return (
            session.rcpt(rewritten.encode("utf-8"), params)
            .addCallback(_renamed, rewritten, original)
            .addCallback(self._rcptAnswered, user, route, session, rewritten)
        )

    def _rcptAnswered(self, result, user, route, session, rewritten=None):
        address = user.dest.raw
        if self._ended or self._why is not None:
            # The client left or reset while this RCPT was at the backend:
            # whatever the backend said, or the BackendLost that dropping it
            # caused, the recipient's outcome is the client's doing.
            session.abort()
            self.delivery.metrics.rcptReply(route.backend, ABORTED.code)
            self._outcome(address, route, None, self._why or "transaction ended")
            raise RecipientRefused(user, ABORTED)
        self.delivery.metrics.rcptReply(route.backend, result.code)
        if result.positive:
            recipient = AcceptedRecipient(address, route, self, result, rewritten)
            self.accepted.append(recipient)
            return recipient
        self._outcome(address, route, result)
        raise RecipientRefused(user, result)

    # ITransaction

    def startData(self, pauseClient, resumeClient):
        """
        See L{ITransaction.startData}: send DATA to every backend that
        accepted a recipient; the message may follow at once.
        """
        if self._fenced is not None:
            return
        for session in self.sessions.values():
            session.startData(pauseClient, resumeClient)

    def write(self, data):
        """
        See L{ITransaction.write}: relay a piece of the message, still
        dot-stuffed, to every backend.
        """
        if self._fenced is not None:
            return
        self.size += len(data)
        for session in self.sessions.values():
            session.write(data)

    def endData(self):
        """
        See L{ITransaction.endData}: end the message on every backend; each
        accepted recipient's C{verdict} then fires with its reply.
        """
        if self._dataEnded:
            return
        self.delivery.state.checkLease()
        if self._fenced is not None:
            self.refuse(FENCED)
            return
        self._dataEnded = True
        metrics = self.delivery.metrics
        for name, session in self.sessions.items():
            if session.accepted and session.failure is None:
                metrics.relayed(name, self.size)
        pending = {name: iter(s.finish()) for name, s in self.sessions.items()}
        for recipient in self.accepted:
            d = next(pending[recipient.route.backend])
            d.addCallback(self._delivered, recipient).addBoth(self._settled)
            recipient.verdict = d
        self._unsettled = len(self.accepted)
        if not self.accepted:
            self._end()

    def refuse(self, result):
        """
        See L{ITransaction.refuse}: drop the message at every backend
        without completing it; every accepted recipient gets C{result}.
        """
        self._dataEnded = True
        for session in self.sessions.values():
            session.abort()
        for recipient in self.accepted:
            self._outcome(recipient.address, recipient.route, result)
            recipient.verdict = defer.succeed(result)
        self._end()

    def lineReceived(self, recipient, line):
        """
        One unstuffed line of the message, from a server that feeds lines
        to every recipient's message: taken from the first recipient only,
        so the message is written once.
        """
        if recipient is not self.accepted[0] or self._dataEnded:
            return
        if self._lineFeeder is None:
            self._lineFeeder = recipient
            self.startData(_ignore, _ignore)
        if line.startswith(b"."):
            line = b"." + line
        self.write(line + b"\r\n")

    # the end of a transaction without its message

    def abort(self, why="connection closed before the end of the message"):
        """
        Drop every backend transaction so nothing is delivered anywhere;
        nothing to do once the final dot went out (the verdicts are coming).
        """
        if self._dataEnded:
            return
        # Before the sessions: dropping them fails a RCPT still at a backend,
        # and that must be logged as aborted, not as a backend fault.
        self._why = why
        for session in self.sessions.values():
            session.abort()
        self._discard(why)

    def fence(self, why):
        """
        This node was fenced: unless the final dot went out
        already, drop every backend transaction at once, so nothing of it
        is delivered by a route that may be stale; its recipients get 451
        after the dot, and new RCPTs are refused.
        """
        if self._fenced is not None:
            return
        if self._dataEnded:
            # The client's dot came, but a backend still to answer DATA has
            # not had its own, and its 354 may take a command timeout: that
            # is longer than the barrier gives a silent node.
            for session in self.sessions.values():
                if not session.dotSent:
                    session.fail(Fenced(why))
            return
        self._fenced = why
        self._why = "fenced: %s" % (why,)
        for session in self.sessions.values():
            session.abort()
        # Nothing of it can be delivered any more: the barrier need not wait
        # for the client to send the rest.
        self._end()

    def reset(self):
        """
        End the transaction without a message (RSET, LHLO).
        """
        self._why = "transaction reset by the client"
        for session in self.sessions.values():
            session.reset()
        self._discard(self._why)

    def _discard(self, why):
        if not self._ended:
            for recipient in self.accepted:
                self._outcome(recipient.address, recipient.route, None, why)
        self._end()

    def _delivered(self, result, recipient):
        self.delivery.metrics.delivered(
            recipient.route.backend, self.delivery.reactor.seconds() - self.started
        )
        if recipient.rewritten is not None:
            result = _renamed(
                result, recipient.rewritten, recipient.address.decode("utf-8", "replace")
            )
        self._outcome(recipient.address, recipient.route, result)
        return result

    def _settled(self, result):
        self._unsettled -= 1
        if not self._unsettled:
            self._end()
        return result

    def _end(self):
        if not self._ended:
            self._ended = True
            self.delivery.running.discard(self)
            self.delivery.state.end(self.generation, self)

    def _outcome(self, address, route, result, why=None):
        if result is None:
            status, text = "aborted", why
        elif result.positive:
            status, text = "sent", str(result)
        elif result.transient:
            status, text = "deferred", str(result)
        else:
            status, text = "bounced", str(result)
        backend = route.backend if route is not None else "none"
        self.delivery.metrics.recipient(backend, status)
        fields = dict(
            txid=self.id,
            rcpt=address.decode("utf-8", "replace"),
            backend=backend,
            client=self.client,
            sender=self.sender.decode("utf-8", "replace"),
            delay=self.delivery.reactor.seconds() - self.started,
            status=status,
            reply=text,
        )
        to = "to=<%(rcpt)s>"
        identity = self.identity
        if identity is not None and identity.forwarded:
            # The MTA's own client, as its XFORWARD or XCLIENT named it.
            fields["orig_client"] = "%s:%s" % (identity.addr, identity.port)
            fields["client"] += ", orig_client=" + fields["orig_client"]
        if route is not None and route.address is not None:
            fields["rewritten"] = rewriteAddress(
                fields["rcpt"], route.address, self.config.recipient_delimiter
            )
            to = "to=<%(rcpt)s>, rewritten=<%(rewritten)s>"
        # Formatted here with %: a format string with a field per item costs
        # the logger's formatter several times as much, once per recipient.
        # Logged before the reply leaves (the outbox holds it until this
        # input is handled), so a crash never loses the line of a recipient
        # the MTA was told about.
        self.delivery.outcomes.info(
            (
                "%(txid)s: " + to + ", backend=%(backend)s, client=%(client)s, "
                "from=<%(sender)s>, delay=%(delay).3f, status=%(status)s (%(reply)s)"
            )
            % fields,
            **fields,
        )
