"""
The proxy as C{twisted.mail} sees it: an L{IMessageDelivery} that routes
each recipient to its backend, handed out by a C{twisted.cred} realm.

As with C{twisted.mail}'s own servers, the LMTP server logs in to a
L{Portal} for each client session and gets its delivery as the avatar
(anonymously, then again with its credentials after a SASL AUTH).
The avatar is a L{Router}: C{validateFrom} begins a
L{lmtp_proxy.delivery.Transaction}, C{validateTo} sends the recipient's
RCPT to its backend and fires once the backend answered, with a message
whose C{eomReceived} is that recipient's own LMTP reply after the final
dot.
"""

from email.utils import formatdate

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import IRealm, Portal
from zope.interface import implementer

from lmtp_proxy.interfaces import ILMTPDelivery, IMessageDelivery


@implementer(ILMTPDelivery)
class Router:
    """
    The delivery of one client session.

    @ivar transaction: the L{lmtp_proxy.delivery.Transaction} begun by the
        last C{validateFrom}, or C{None}.
    @ivar identity: the original client (an
        L{lmtp_proxy.clientid.ClientIdentity}), or C{None}.
    """

    def __init__(self, delivery, client):
        """
        @param delivery: the L{lmtp_proxy.delivery.Delivery} every session
            shares.
        @param client: the client's address, for the log.
        """
        self.delivery = delivery
        self.client = client
        self.transaction = None
        self.identity = None

    def validateFrom(self, helo, origin):
        """
        See L{IMessageDelivery.validateFrom}: begin a transaction; every
        sender is accepted (the backends judge the message).

        @param origin: an L{lmtp_proxy.envelope.Path}.
        """
        self.transaction = self.delivery.begin(
            self.client, origin.raw, origin.params, self.identity
        )
        return origin

    def validateTo(self, user):
        """
        See L{IMessageDelivery.validateTo}: route the recipient and send its
        RCPT to its backend.

        @param user: an L{lmtp_proxy.envelope.Recipient}.
        @return: a L{Deferred} firing with the recipient's message builder
            (an L{lmtp_proxy.delivery.AcceptedRecipient}, which is its own
            message) or failing with
            L{lmtp_proxy.delivery.RecipientRefused}, which carries the
            backend's reply.
        @raise lmtp_proxy.delivery.RecipientRefused: for a recipient with no
            route, or routed to C{reject}.
        """
        return self.transaction.rcpt(user)

    def receivedHeader(self, helo, origin, recipients):
        """
        See L{IMessageDelivery.receivedHeader}: none, so that the backends
        receive the message exactly as the client sent it, unless
        C{add_received_header} asks for one line naming the proxy, the
        client and, with one recipient, the recipient (as Dovecot's proxy
        writes it).
        """
        config = self.delivery.state.config
        if not config.add_received_header:
            return None
        identity = self.identity
        name = (identity.helo if identity is not None else None) or helo[0].decode(
            "ascii", "replace"
        )
        address = identity.addr if identity is not None else None
        lines = [
            "Received: from %s (%s)" % (name or "unknown", "[%s]" % (address,) if address else "unix"),
            "\tby %s (lmtp-proxy) with LMTP id %s" % (config.hostname, self.transaction.id),
        ]
        if len(recipients) == 1:
            lines.append("\tfor <%s>" % (recipients[0].dest.raw.decode("utf-8", "replace"),))
        lines[-1] += "; " + formatdate(self.delivery.reactor.seconds(), localtime=True)
        return "\r\n".join(lines).encode("utf-8")

    def identifyClient(self, identity):
        """
        See L{ILMTPDelivery.identifyClient}.
        """
        self.identity = identity

    def resetTransaction(self):
        """
        See L{ILMTPDelivery.resetTransaction}.
        """
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            transaction.reset()

    def abortTransaction(self, why):
        """
        See L{ILMTPDelivery.abortTransaction}. A transaction past its final
        dot is left to finish: its verdicts are on their way.
        """
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            transaction.abort(why)

    def logout(self):
        """
        The session is over: nothing it left unfinished is delivered.
        """
        self.abortTransaction("connection closed before the end of the message")


@implementer(IRealm)
class LMTPRealm:
    """
    Hands every client session a L{Router} over the shared delivery.
    """

    def __init__(self, delivery):
        self.delivery = delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        """
        See L{IRealm.requestAvatar}.

        @param mind: the client's address (L{str}), for the log.
        @param avatarId: C{ANONYMOUS}, or the SASL login (L{bytes}) of an
            authenticated client, which the log then names.
        """
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("lmtp-proxy only hands out IMessageDelivery")
        if isinstance(avatarId, bytes):
            mind = "%s (login %s)" % (mind, avatarId.decode("utf-8", "replace"))
        router = Router(self.delivery, mind)
        return IMessageDelivery, router, router.logout


def deliveryPortal(delivery, checkers=()):
    """
    The portal the LMTP server logs in to: any client may deliver
    anonymously, and C{checkers} check the credentials of SASL logins.
    """
    return Portal(LMTPRealm(delivery), [AllowAnonymousAccess(), *checkers])
