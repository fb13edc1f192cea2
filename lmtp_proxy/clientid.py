"""
Who the original client of a session is: Postfix's XCLIENT and XFORWARD
commands, which an MTA (or a proxy in front of us) sends to say it, and the
XCLIENT command we send on to backends that take it, so that their logs
name the MTA's client rather than the proxy (pure, no Twisted).
"""

import functools
import ipaddress
import re

# Dovecot's default hop count when a proxy was given none.
DEFAULT_TTL = 5

XCLIENT_ATTRIBUTES = frozenset(
    ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT", "TTL", "TIMEOUT")
)
XFORWARD_ATTRIBUTES = frozenset(("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"))
# What the server offers in its LHLO reply.
XCLIENT_OFFER = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN TTL"
XFORWARD_OFFER = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"

_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_DIGITS = re.compile(r"^[0-9]{1,10}\Z")


class BadAttribute(ValueError):
    """
    An XCLIENT or XFORWARD argument that cannot be accepted; C{str()} is
    the text of the 501 reply.
    """


def xtextDecode(value):
    """
    The text of an xtext value (RFC 3461): C{+XX} is the byte 0xXX.
    """
    if "+" not in value:
        return value
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtextEncode(value):
    """
    C{value} (L{str}) as xtext: every byte outside C{!} to C{~}, and C{+}
    and C{=}, as C{+XX}.
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else "+%02X" % (b,)
        for b in value.encode("utf-8")
    )


_PRINTABLE = re.compile(r"[\x21-\x7e]*\Z")


def parseAttributes(argument, known):
    """
    The attributes of an XCLIENT or XFORWARD command: upper-case names to
    their decoded values, C{None} for C{[UNAVAILABLE]}.

    @param known: the attribute names the command takes.
    @raise BadAttribute: for a malformed or unknown attribute or value.
    """
    attributes = {}
    words = argument.split()
    if not words:
        raise BadAttribute("5.5.4 Syntax: attribute=value ...")
    for word in words:
        name, equals, value = word.partition("=")
        name = name.upper()
        if not equals or name not in known:
            raise BadAttribute("5.5.4 Bad attribute name: %s" % (name or word,))
        value = xtextDecode(value)
        if not _PRINTABLE.match(value):
            # A decoded CR or LF would end a header line this value goes
            # into (Received:, XCLIENT to a backend) early.
            raise BadAttribute("5.5.4 Bad %s attribute value" % (name,))
        if value.upper() in _UNAVAILABLE:
            attributes[name] = None
            continue
        if name == "ADDR":
            address = value[5:] if value[:5].upper() == "IPV6:" else value
            try:
                value = str(ipaddress.ip_address(address))
            except ValueError:
                raise BadAttribute("5.5.4 Bad ADDR attribute value") from None
        elif name in ("PORT", "TTL", "TIMEOUT", "DESTPORT"):
            if not _DIGITS.match(value):
                raise BadAttribute("5.5.4 Bad %s attribute value" % (name,))
            value = int(value)
        attributes[name] = value
    return attributes


class ClientIdentity:
    """
    The original client of a session, immutable: a session holds a new one
    each time it learns more, and a backend connection tells by
    L{sameAs} whether its backend already knows this one.

    @ivar addr: the client's IP address (text), or C{None}.
    @ivar port: its port, or C{None}.
    @ivar helo: the name it greeted with, or C{None}.
    @ivar ttl: the hop count an XCLIENT gave, or C{None}.
    @ivar forwarded: whether XCLIENT or XFORWARD set it (an LHLO that
        follows is the forwarding proxy's, not the client's).
    @ivar session: an object standing for the client session, the same for
        every identity one session holds.
    """

    __slots__ = ("addr", "port", "helo", "ttl", "forwarded", "session", "_commands")

    def __init__(
        self, addr=None, port=None, helo=None, ttl=None, forwarded=False, session=None
    ):
        self.addr = addr
        self.port = port
        self.helo = helo
        self.ttl = ttl
        self.forwarded = forwarded
        self.session = session
        self._commands = {}

    @classmethod
    def fromPeer(cls, peer, session=None):
        """
        The identity of a client known only by its connection: C{peer} is
        an C{IAddress} (a unix socket has no address or port).
        """
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        if not isinstance(host, str) or not isinstance(port, int):
            return cls(session=session)
        return cls(host, port, session=session)

    def sameAs(self, other):
        """
        Whether C{other} (an identity or C{None}) is this one: the same
        session with the same values. Postfix repeats the same XFORWARD
        before every MAIL; that needs no new XCLIENT. Another session
        always does, even with equal values.
        """
        return other is self or (
            other is not None
            and other.session is self.session
            and other.addr == self.addr
            and other.port == self.port
            and other.helo == self.helo
            and other.ttl == self.ttl
        )

    def withHelo(self, name):
        """
        This identity after LHLO C{name}: a forwarded identity keeps the
        name it was given.
        """
        if self.forwarded and self.helo is not None:
            return self
        return ClientIdentity(
            self.addr, self.port, name, self.ttl, self.forwarded, self.session
        )

    def forwardedAs(self, attributes):
        """
        This identity with the attributes of an XCLIENT or XFORWARD
        command (as L{parseAttributes} gives them) applied.
        """
        values = {"ADDR": self.addr, "PORT": self.port, "HELO": self.helo, "TTL": self.ttl}
        for name in values:
            if name in attributes:
                values[name] = attributes[name]
        return ClientIdentity(
            values["ADDR"], values["PORT"], values["HELO"], values["TTL"], True, self.session
        )

    @property
    def loop(self):
        """
        Whether an XCLIENT said no hop is left: mail from this session is
        looping between proxies.
        """
        return self.ttl == 0

    def xclient(self, offered):
        """
        The XCLIENT command that tells a backend about this client.

        @param offered: the parameter of the backend's XCLIENT keyword in
            its LHLO reply: the attribute names it takes (all of ours when
            it lists none).
        @return: the command line (L{bytes}).
        """
        command = self._commands.get(offered)
        if command is None:
            command = self._commands[offered] = self._xclient(offered)
        return command

    def _xclient(self, offered):
        takes = frozenset(offered.upper().split()) or frozenset(("ADDR", "PORT", "HELO", "TTL"))
        ttl = DEFAULT_TTL if self.ttl is None else max(self.ttl - 1, 0)
        if self.addr is None:
            addr = "[UNAVAILABLE]"
        elif ":" in self.addr:
            addr = "IPV6:" + self.addr
        else:
            addr = self.addr
        attributes = [
            ("ADDR", addr),
            ("PORT", "[UNAVAILABLE]" if self.port is None else str(self.port)),
            ("HELO", "[UNAVAILABLE]" if not self.helo else xtextEncode(self.helo)),
            ("TTL", str(ttl)),
        ]
        return ("XCLIENT " + " ".join(
            "%s=%s" % (name, value) for name, value in attributes if name in takes
        )).encode("ascii")


@functools.lru_cache(maxsize=8)
def _networks(allowed):
    return tuple(ipaddress.ip_network(n) for n in allowed if n != "unix")


def mayForward(allowed, peer):
    """
    Whether a client at C{peer} (an C{IAddress}) may send XCLIENT and
    XFORWARD: its address is in one of the C{allowed} networks
    (C{config.allowed_xclient}), or it came over a unix socket and
    C{allowed} names C{unix}.
    """
    if not allowed:
        return False
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return "unix" in allowed
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(allowed))
