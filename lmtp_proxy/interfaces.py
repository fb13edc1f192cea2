"""
The seams of the proxy, declared as C{zope.interface} interfaces.

The LMTP server (L{lmtp_proxy.server}) talks to its delivery through
C{twisted.mail}'s own L{IMessageDelivery} and L{IMessage}, so any
C{twisted.mail} delivery can be plugged in; the interfaces here are what the
proxy adds where Twisted's are too narrow for a streaming LMTP proxy:

    - L{IRoutingSource}: where a recipient goes (the YAML table is one
      source; a database can be another).
    - L{ILMTPDelivery}: an L{IMessageDelivery} that is told when a
      transaction ends without its message, so it can release what its
      RCPTs opened at the backends.
    - L{IMessageStream} and L{ITransaction}: a message that takes the data as
      raw chunks, shared by the recipients of one transaction, instead of
      one C{lineReceived} call per line and recipient.
"""

from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP as IMessage
from zope.interface import Attribute, Interface

__all__ = [
    "ILMTPDelivery",
    "IMessage",
    "IMessageDelivery",
    "IMessageStream",
    "IRoutingSource",
    "ITransaction",
]


class IRoutingSource(Interface):
    """
    Where recipients are delivered.
    """

    def route(address):
        """
        Find the backend for one recipient.

        @param address: the recipient's mailbox, C{"local@domain"}, or a bare
            local part when the client sent no domain (L{str}, the address
            extension still in place).
        @return: an L{lmtp_proxy.routing.Route}, or C{None} when no route
            matches and there is no fallback; or a L{Deferred} firing with
            one of those.
        """


class ILMTPDelivery(IMessageDelivery):
    """
    An L{IMessageDelivery} whose C{validateFrom} begins a transaction that
    holds resources until it ends.

    C{twisted.mail} simply drops the recipients of a transaction that ends
    before DATA. A proxy has already opened a transaction at a backend for
    each of them (the RCPT reply is the backend's), so the server says when
    that happens.
    """

    def resetTransaction():
        """
        The client ended the transaction in progress without a message
        (RSET, LHLO): end it at every backend, delivering nothing.
        """

    def abortTransaction(why):
        """
        The session ended before the final dot of the transaction in
        progress (the client left, timed out, or the proxy is stopping):
        drop it everywhere, so that nothing is delivered anywhere.

        @param why: a short text for the log.
        """

    def identifyClient(identity):
        """
        Who the session's original client is, as its connection, its LHLO
        and any XCLIENT or XFORWARD tell: told before each MAIL.

        @param identity: an L{lmtp_proxy.clientid.ClientIdentity}.
        """


class ITransaction(Interface):
    """
    The message of one MAIL transaction, as the LMTP server streams it.

    One object serves every recipient whose message shares it
    (L{IMessageStream.transaction}), so each chunk is written once however
    many recipients it is for.
    """

    def startData(pauseClient, resumeClient):
        """
        The client was told to send the message (354).

        @param pauseClient: call with a hashable reason to stop reading from
            the client (a backend is behind).
        @param resumeClient: call with the same reason to read again.
        """

    def write(data):
        """
        Relay a piece of the message.

        @param data: complete lines, CRLF-terminated and still dot-stuffed,
            exactly as the client sent them (L{bytes}).
        """

    def endData():
        """
        The client sent the final dot. The C{eomReceived} of each recipient's
        message then gives that recipient's verdict.
        """

    def refuse(result):
        """
        The message cannot be delivered (it broke a limit or was smuggled):
        drop it everywhere without completing it.

        @param result: the L{lmtp_proxy.reply.Reply} every recipient gets.
        """


class IMessageStream(IMessage):
    """
    An L{IMessage} that takes its data as raw chunks through a shared
    L{ITransaction} rather than line by line.

    A server that knows this interface writes the message to
    C{transaction} and calls only C{eomReceived} (for this recipient's
    verdict) on the message itself; one that does not calls
    C{lineReceived} as C{twisted.mail} does.
    """

    transaction = Attribute("The L{ITransaction} that takes this message's data.")
    rcptReply = Attribute(
        "The L{lmtp_proxy.reply.Reply} the client gets for this recipient's "
        "RCPT (a proxy passes its backend's own on), where the message is "
        "also the builder that C{validateTo} gave."
    )
