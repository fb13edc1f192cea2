"""
Recipient routing: which backend a recipient address goes to (pure).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from zope.interface import implementer

from lmtp_proxy.interfaces import IRoutingSource

__all__ = ["REJECT", "Route", "RoutingTable", "describeRoute"]

REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Route:
    """
    The outcome of a lookup: the C{backend} name (possibly L{REJECT}), the
    C{users} key that matched (None for the fallback) and C{how} it matched:
    C{"address"}, C{"domain"}, C{"localpart"} or C{"fallback"}.
    """

    backend: str
    key: str | None
    how: str


@implementer(IRoutingSource)
class RoutingTable:
    """
    An immutable, case-insensitive map from recipients to backends.

    @param users: users keys (C{"user@domain"}, C{"localpart"} or
        C{"@domain"}) to backend names.
    @param ignoreDomain: look up the local part only.
    @param fallback: backend for recipients no key matches, or None.
    @param delimiter: recipient delimiter characters (Postfix semantics: any
        one of them starts the address extension); C{""} turns them off.
    """

    __slots__ = ("_users", "_ignoreDomain", "_fallback", "_delimiter")

    def __init__(
        self,
        users: Mapping[str, str],
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
        return cls(
            config.users,
            config.ignore_domain,
            config.fallback_backend,
            config.recipient_delimiter,
        )

    @property
    def users(self) -> Mapping[str, str]:
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
            backend = users.get(key)
            if backend is not None:
                return Route(backend, key, how)
        if self._fallback is not None:
            return Route(self._fallback, None, "fallback")
        return None


def describeRoute(route: Route | None) -> str:
    """
    A human-readable account of C{route}, for C{lmtp-proxy route}.
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
    return text
