"""
The sender and recipients of a transaction, as the LMTP server hands them
to its L{twisted.mail.smtp.IMessageDelivery}.

They are C{twisted.mail}'s own L{smtp.Address} and L{smtp.User}, so code
written for C{twisted.mail} reads C{local}, C{domain}, C{dest} and C{orig}
as usual, but built from what the server already parsed rather than parsed
again by C{Address}: that parser gives an address without a domain the
server's own host name (C{RCPT TO:<bob>} would become C{bob@proxy}; see
C{docs/twisted-pitfalls.rst}) and refuses UTF-8 addresses. The proxy also
needs what C{Address} drops: the address exactly as sent, and the MAIL and
RCPT parameters.
"""

from twisted.mail import smtp


class Path(smtp.Address):
    """
    A MAIL or RCPT path.

    @ivar raw: the address exactly as the client sent it, without the angle
        brackets (L{bytes}; a source route kept).
    @ivar mailbox: the address without a source route (L{str}), what
        routing looks at.
    @ivar params: the ESMTP parameters, a list of C{(KEYWORD, raw)} pairs of
        L{bytes}, C{raw} being the parameter as sent (C{b"SIZE=1000"}).
    """

    def __init__(self, raw, mailbox, params):
        local, at, domain = mailbox.rpartition("@")
        if not at:
            local, domain = mailbox, ""
        self.addrstr = raw
        self.raw = raw
        self.mailbox = mailbox
        self.local = local.encode("utf-8")
        self.domain = domain.encode("utf-8")
        self.params = params

    def __bytes__(self):
        return self.mailbox.encode("utf-8")

    def __str__(self):
        return self.mailbox


class Recipient(smtp.User):
    """
    One RCPT: an L{smtp.User} whose C{dest} is a L{Path}.
    """

    def __init__(self, dest, helo, protocol, orig):
        self.dest = dest
        self.helo = helo
        self.protocol = protocol
        self.orig = orig

    def __str__(self):
        return str(self.dest)

    def __bytes__(self):
        return bytes(self.dest)
