"""
Recipient routing: which backend a recipient address goes to (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from zope.interface import implementer

from lmtp_proxy.interfaces import IRoutingSource

__all__ = ["REJECT", "Route", "RoutingTable", "describeRoute", "rewriteAddress"]

REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Route:
    """
    The outcome of a lookup: the C{backend} name (possibly L{REJECT}), the
    C{users} key that matched (None for the fallback) and C{how} it matched:
    C{"address"}, C{"domain"}, C{"localpart"} or C{"fallback"}.

    C{address}, when not None, is the address the backend knows the
    recipient by (Dovecot's C{destuser}): its RCPT names that address, with
    the original's C{+detail} kept (L{rewriteAddress}), while the MTA's
    replies and the log keep the original. A routing source fills it from
    a C{users} value C{{backend: X, address: Y}}; a database source fills
    it from a nullable column (NULL: no rewrite).
    """

    backend: str
    key: str | None
    how: str
    address: str | None = None


@implementer(IRoutingSource)
class RoutingTable:
    """
    An immutable, case-insensitive map from recipients to backends.

    @param users: users keys (C{"user@domain"}, C{"localpart"} or
        C{"@domain"}) to backend names, or to C{(backend, address)} pairs
        for a recipient rewritten for its backend (see L{Route.address}).
        A plain name is stored as it is, so the common row costs no more
        than before.
    @param ignoreDomain: look up the local part only.
    @param fallback: backend for recipients no key matches, or None.
    @param delimiter: recipient delimiter characters (Postfix semantics: any
        one of them starts the address extension); C{""} turns them off.
    """

    __slots__ = ("_users", "_ignoreDomain", "_fallback", "_delimiter")

    def __init__(
        self,
        users: Mapping[str, str | tuple[str, str]],
        ignoreDomain: bool,
        fallback: str | None,
        delimiter: str = "+",
    ) -> None:
        table = {k.lower(): v for k, v in users.items()}
        if len(table) != len(users):
            seen: dict[str, str] = {}
            for k, v in users.items():
                if seen.setdefault(k.lower(), v) != v:
                    raise ValueError(f"users key {k!r} differs only by case from another key with a different backend")
        setattr_ = object.__setattr__
        setattr_(self, "_users", MappingProxyType(table))
        setattr_(self, "_ignoreDomain", bool(ignoreDomain))
        setattr_(self, "_fallback", fallback)
        setattr_(self, "_delimiter", frozenset(delimiter))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def fromConfig(cls, config) -> RoutingTable:
        """
        The routing table a L{lmtp_proxy.config.Config} describes (read for
        its C{users}, C{ignore_domain}, C{fallback_backend} and
        C{recipient_delimiter}, so this module needs nothing of the
        configuration's own).
        """
        users = config.users
        if isinstance(users, MappingProxyType) and not any(k != k.lower() for k in users):
            # A configuration's users mapping is read-only and its keys are
            # folded already (config.py): share it rather than copy every
            # key and entry, which halves what a large table costs a
            # process (bench/scale.py).
            table = cls({}, config.ignore_domain, config.fallback_backend, config.recipient_delimiter)
            object.__setattr__(table, "_users", users)
            return table
        return cls(
            users,
            config.ignore_domain,
            config.fallback_backend,
            config.recipient_delimiter,
        )

    @property
    def users(self) -> Mapping[str, str | tuple[str, str]]:
        """A read-only view of the (lower-cased) users table."""
        return self._users

    @property
    def ignoreDomain(self) -> bool:
        return self._ignoreDomain

    @property
    def fallback(self) -> str | None:
        return self._fallback

    @property
    def delimiter(self) -> str:
        return "".join(sorted(self._delimiter))

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return (
            f"<RoutingTable {len(self._users)} users ignoreDomain={self._ignoreDomain} "
            f"fallback={self._fallback!r} delimiter={self.delimiter!r}>"
        )

    def _strip(self, local: str) -> str | None:
        """
        C{local} without its extension, or None when it has none (or when
        removing it would leave nothing, as for C{"+foo"}).
        """
        if self._delimiter:
            for i, c in enumerate(local):
                if c in self._delimiter:
                    return local[:i] if i else None
        return None

    def route(self, address: str) -> Route | None:
        """
        See L{IRoutingSource.route}: the route for C{address} (a mailbox
        C{local@domain}, or a bare local part), found synchronously.
        """
        local, at, domain = address.rpartition("@")
        if not at:
            return self.lookup(address, None)
        return self.lookup(local, domain)

    def lookup(self, local: str, domain: str | None) -> Route | None:
        """
        The route for recipient C{local@domain} (C{domain} None for an address
        without C{@}), or None when no key matches and there is no fallback.

        Lookup order, case-insensitive: the full address, the full address
        without the extension, C{"@domain"}; or, with C{ignoreDomain} or no
        domain, the local part and the local part without the extension.
        Then the fallback.
        """
        users = self._users
        local = local.lower()
        base = self._strip(local)
        if domain is not None and not self._ignoreDomain:
            domain = domain.lower()
            candidates = [(f"{local}@{domain}", "address")]
            if base is not None:
                candidates.append((f"{base}@{domain}", "address"))
            candidates.append((f"@{domain}", "domain"))
        else:
            candidates = [(local, "localpart")]
            if base is not None:
                candidates.append((base, "localpart"))
        for key, how in candidates:
            value = users.get(key)
            if value is not None:
                if value.__class__ is str:
                    return Route(value, key, how)
                return Route(value[0], key, how, value[1])
        if self._fallback is not None:
            return Route(self._fallback, None, "fallback")
        return None


def rewriteAddress(original: str, rewritten: str, delimiter: str = "+") -> str:
    """
    The address a backend gets for C{original} when its route rewrites it
    to C{rewritten}: the original's extension (from its first delimiter
    character on, Postfix semantics) kept, so C{alice+x@old.example}
    rewritten to C{alice@new.example} becomes C{alice+x@new.example}.
    """
    local = original.rpartition("@")[0] if "@" in original else original
    for i, c in enumerate(local):
        if c in delimiter:
            if not i:
                break
            newLocal, at, domain = rewritten.rpartition("@")
            if not at:
                return rewritten + local[i:]
            return newLocal + local[i:] + "@" + domain
    return rewritten


def describeRoute(route: Route | None, address: str | None = None) -> str:
    """
    A human-readable account of C{route}, for C{lmtp-proxy route}; with the
    C{address} looked up, a rewrite names the address the backend gets.
    """
    if route is None:
        return "no route (would be refused with 550 5.1.1)"
    if route.how == "fallback":
        why = "fallback_backend"
    else:
        why = f"matched users key {route.key!r}"
    text = f"backend {route.backend} ({why})"
    if route.backend == REJECT:
        text += ": deferred with a 4xx temporary failure"
    elif route.address is not None:
        target = route.address if address is None else rewriteAddress(address, route.address)
        text += f", rewritten to {target}"
    return text
