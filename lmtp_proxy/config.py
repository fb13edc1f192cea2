"""
Configuration file loading and validation (pure data, no Twisted).

The file is YAML.  It is *composed* (not constructed) so every value keeps
the line it came from; each mistake raises L{ConfigError}, whose C{str()} is
one line: C{"<file>, line N: <key path>: <problem>"}.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os.path
import re
import socket as _socket
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "Backend",
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG",
    "DEFAULT_PID",
    "REJECT",
    "describeChanges",
    "load",
    "parse",
]

from lmtp_proxy.routing import REJECT

DEFAULT_CONFIG = "/etc/lmtp-proxy.yaml"
DEFAULT_PID = "/var/run/lmtp-proxy.pid"
# Postfix's lmtp_data_done_timeout: the MTA gives up on us after this long.
POSTFIX_DATA_DONE_TIMEOUT = 600
MIN_LINE_LENGTH = 1000  # RFC 5321 4.5.3.1.6, CRLF included

_Loader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
_constructor = yaml.constructor.SafeConstructor()

_TAG = "tag:yaml.org,2002:"
_NULL = _TAG + "null"
_STR = _TAG + "str"
_MERGE = _TAG + "merge"
_OCTAL = re.compile(r"0(?:[oO][0-7]+|[0-7]*)\Z")
_BAD_USER_KEY = re.compile(r"\A\Z|\s|@\Z")


def isRewriteAddress(address: str) -> bool:
    """
    Whether C{address} can stand for a recipient in a backend's RCPT: a
    mailbox with no blank, control character, angle bracket or empty part,
    which could end the command early or change its syntax.
    """
    return not (
        _BAD_USER_KEY.search(address)
        or address.startswith("@")
        or "<" in address
        or ">" in address
        or not address.isprintable()
    )


class ConfigError(Exception):
    """
    A mistake in the configuration.  C{str()} is a single line naming the
    file, the line (when known), the key path (when known) and the problem.
    """

    def __init__(self, source: str, line: int | None, path: str | None, problem: str) -> None:
        super().__init__(source, line, path, problem)
        self.source = source
        self.line = line
        self.path = path
        self.problem = " ".join(str(problem).split())

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}, line {self.line}"
        if self.path:
            return f"{where}: {self.path}: {self.problem}"
        return f"{where}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Backend:
    """
    One LMTP backend: a unix socket or a host and port, with optional
    credentials.  The password is left out of C{repr()} and L{describe}.
    """

    name: str
    socket: str | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    # "tempfail": a 5.1.x "no such user" at RCPT becomes 450 4.1.1, for a
    # user whose row is a moment out of date during a move.
    unknown_user: str = "pass"
    # TLS to the backend: "none", "starttls" or "implicit".
    tls: str = "none"
    verify: bool = True
    server_name: str | None = None
    ca_file: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None
    allow_plaintext_auth: bool = False

    def describe(self) -> str:
        """
        Where the backend lives, without credentials: C{"unix:/path"} or
        C{"host:port"} (C{"[v6addr]:port"} for IPv6 literals).
        """
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    """
    A validated configuration.  C{backends} and C{users} are read-only
    mappings; C{users} keys are lower case.
    """

    source: str
    socket: str | tuple[str, int]
    owner: str | int | None = None
    group: str | int | None = None
    permissions: int | None = None
    ignore_domain: bool = False
    fallback_backend: str | None = None
    pid: str = DEFAULT_PID
    recipient_delimiter: str = "+"
    hostname: str = field(default_factory=_socket.gethostname)
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    data_timeout: float = 300.0
    idle_timeout: float = 300.0
    max_message_size: int = 0
    max_line_length: int = 65536
    shutdown_grace: float = 30.0
    control_socket: str | None = None
    pool_size: int = 4
    pool_idle_timeout: float = 60.0
    workers: int = 1
    allowed_xclient: tuple[str, ...] = ()
    max_received: int = 50
    add_received_header: bool = False
    backend_failures: int = 3
    backend_retry: float = 10.0
    metrics: str | tuple[str, int] | None = None
    # The PostgreSQL routing source and this proxy as a cluster node
    node_name: str = field(default_factory=_socket.gethostname)
    lease: float = 10.0
    routing_database: str | None = field(default=None, repr=False)
    routing_table: str = "lmtp_routes"
    routing_password_file: str | None = None
    # The listener's TLS, access control and SASL; the nested YAML keys
    # (tls.certificate, auth.users_file...) are flattened so that the
    # configuration stays plain data.
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_implicit: bool = False
    require_tls: bool = False
    allowed_clients: tuple[str, ...] | None = None
    proxy_protocol: bool = False
    auth_users_file: str | None = None
    auth_required: bool = False
    backends: Mapping[str, Backend] = field(default_factory=lambda: MappingProxyType({}))
    # A value is a backend name, or a (backend, address) pair for a
    # recipient rewritten for its backend.
    users: Mapping[str, str | tuple[str, str]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )


# --- helpers -------------------------------------------------------------------


def _line(node: Node | None) -> int | None:
    if node is None or node.start_mark is None:
        return None
    return node.start_mark.line + 1


def _suggest(word: str, choices) -> str:
    choices = list(choices)
    for c in choices:
        if c.lower() == word.lower():
            return f" (did you mean {c!r}?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "empty"
    return f"{node.value!r}"


class _Parser:
    """
    Walks the composed node tree of one file.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: Node | None, path: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, _line(node), path, problem)

    # -- generic node access --

    def items(self, node: MappingNode, path: str | None) -> Iterator[tuple[str, Node, Node]]:
        """
        Yield C{(key text, key node, value node)}, rejecting non-scalar,
        empty, merge and duplicate keys.
        """
        seen: set[str] = set()
        for knode, vnode in node.value:
            if knode.tag == _MERGE:
                raise self.error(knode, path, "merge keys (<<) are not supported")
            if not isinstance(knode, ScalarNode) or knode.tag == _NULL or knode.value == "":
                raise self.error(knode, path, f"keys must be plain names, not {_kind(knode)}")
            key = knode.value
            if key in seen:
                raise self.error(knode, self.join(path, key), "duplicate key")
            seen.add(key)
            yield key, knode, vnode

    @staticmethod
    def join(path: str | None, key: str) -> str:
        return key if not path else f"{path}.{key}"

    def mapping(self, node: Node, path: str | None, what: str = "a mapping of keys to values") -> MappingNode:
        if not isinstance(node, MappingNode):
            raise self.error(node, path, f"must be {what}, not {_kind(node)}")
        return node

    def known(self, node: MappingNode, path: str | None, allowed) -> dict[str, tuple[Node, Node]]:
        out = {}
        for key, knode, vnode in self.items(node, path):
            if key not in allowed:
                raise self.error(
                    knode, self.join(path, key), "unknown key" + _suggest(key, allowed)
                )
            out[key] = (knode, vnode)
        return out

    def scalar(self, node: Node, path: str) -> Any:
        """
        The Python value of a scalar node (None for YAML null).
        """
        if not isinstance(node, ScalarNode):
            raise self.error(node, path, f"must be a single value, not {_kind(node)}")
        construct = _constructor.yaml_constructors.get(node.tag)
        if construct is None:
            raise self.error(node, path, f"unsupported YAML tag {node.tag!r}")
        try:
            return construct(_constructor, node)
        except (yaml.YAMLError, ValueError) as e:
            raise self.error(node, path, f"bad value {node.value!r}: {e}") from None

    def string(self, node: Node, path: str, *, allowEmpty: bool = False) -> str | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(node, path, f"must be a string, not {node.value!r}")
        if not allowEmpty and value == "":
            raise self.error(node, path, "must not be empty")
        return value

    def integer(self, node: Node, path: str, *, minimum: int, maximum: int | None = None) -> int | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, path, f"must be a whole number, not {node.value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            rng = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise self.error(node, path, f"must be {rng}, not {value}")
        return value

    def number(self, node: Node, path: str, *, allowZero: bool = False) -> float | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(node, path, f"must be a number of seconds, not {node.value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allowZero):
            kind = "zero or more" if allowZero else "greater than zero"
            raise self.error(node, path, f"must be a finite number {kind}, not {node.value!r}")
        return value

    def port(self, node: Node, path: str) -> int:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(node, path, f"port must be a whole number from 1 to 65535, not {_kind(node)}")
        return value

    def owner(self, node: Node, path: str) -> str | int | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise self.error(node, path, f"must be a name or a numeric id, not {_kind(node)}")

    # -- sections --

    def parse(self, text: str) -> Config:
        try:
            root = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = e.problem or e.context or "invalid YAML"
            if e.context and e.problem:
                problem = f"{e.context}; {e.problem}"
            raise ConfigError(self.source, line, None, f"YAML syntax error: {problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(self.source, None, None, f"YAML syntax error: {e}") from None
        if root is None:
            raise ConfigError(self.source, None, None, "the file is empty; a 'config' section is required")
        top = self.known(
            self.mapping(root, None, "a mapping with a 'config' section"),
            None,
            ("config", "backends", "users", "routing"),
        )
        if "config" not in top:
            raise self.error(root, "config", "missing required section")
        settings = self.config(top["config"][1])
        self.checkSecurity(top["config"][1], settings)
        if "routing" in top:
            settings.update(self.routing(top["routing"][1]))
            if settings.get("routing_database") is not None and "users" in top:
                raise self.error(
                    top["users"][0], "users",
                    "must be absent when routing.database is set: the database is "
                    "the one source of truth for users (load a users file into it "
                    "with 'lmtp-proxy db import')",
                )

        backends: dict[str, Backend] = {}
        if "backends" in top:
            backends = self.backends(top["backends"][1])
        users: dict[str, str] = {}
        if "users" in top:
            users = self.users(top["users"][1], backends)

        fallback = settings.get("fallback_backend")
        if fallback is not None and fallback != REJECT and fallback not in backends:
            node = top["config"][1]
            fnode = next(v for k, v in node.value if k.value == "fallback_backend")
            raise self.error(
                fnode, "config.fallback_backend", self.unknownBackend(fallback, backends)
            )
        listen = settings["socket"]
        for name, backend in backends.items():
            if isOwnListener(backend, listen):
                bnode = next(
                    v for k, v in top["backends"][1].value if k.value == name
                )
                raise self.error(
                    bnode, f"backends.{name}",
                    f"{backend.describe()} is this proxy's own listener (config.socket): "
                    "mail sent there would loop",
                )

        return Config(
            source=self.source,
            backends=MappingProxyType(backends),
            users=MappingProxyType(users),
            **settings,
        )

    def config(self, node: Node) -> dict[str, Any]:
        path = "config"
        node = self.mapping(node, path)
        keys = self.known(node, path, _CONFIG_KEYS)
        out: dict[str, Any] = {}
        if "socket" not in keys:
            raise self.error(node, "config.socket", "missing required key (a unix socket path or [host, port])")

        for key, (knode, vnode) in keys.items():
            p = f"config.{key}"
            if key in _SECURITY_KEYS:
                self.security(key, vnode, p, out)
            elif key == "socket":
                out["socket"] = self.listenSocket(vnode, p)
            elif key in ("owner", "group"):
                out[key] = self.owner(vnode, p)
            elif key == "permissions":
                out["permissions"] = self.permissions(vnode, p)
            elif key == "ignoreDomain":
                value = self.scalar(vnode, p)
                if value is not None:
                    if not isinstance(value, bool):
                        raise self.error(vnode, p, f"must be true or false, not {_kind(vnode)}")
                    out["ignore_domain"] = value
            elif key in ("fallback_backend", "control_socket"):
                out[key] = self.string(vnode, p)
            elif key == "pid":
                value = self.string(vnode, p)
                if value is not None:
                    out["pid"] = value
            elif key == "hostname":
                value = self.string(vnode, p)
                if value is not None:
                    if any(c.isspace() for c in value) or not value.isprintable():
                        raise self.error(vnode, p, f"must be a host name without spaces, not {value!r}")
                    out["hostname"] = value
            elif key == "recipient_delimiter":
                value = self.string(vnode, p, allowEmpty=True)
                if value is None:
                    raise self.error(vnode, p, "is empty; use '' to turn recipient delimiters off")
                bad = [c for c in value if c == "@" or c.isspace() or not c.isprintable()]
                if bad:
                    raise self.error(vnode, p, f"must not contain {bad[0]!r}")
                out[key] = value
            elif key in _TIMEOUT_KEYS:
                value = self.number(vnode, p, allowZero=(key == "shutdown_grace"))
                if value is not None:
                    if key == "data_timeout" and value >= POSTFIX_DATA_DONE_TIMEOUT:
                        raise self.error(
                            vnode, p,
                            f"must be less than {POSTFIX_DATA_DONE_TIMEOUT} seconds, not {_text(vnode)}: "
                            f"Postfix gives up after lmtp_data_done_timeout ({POSTFIX_DATA_DONE_TIMEOUT}s) "
                            "and would deliver the message again",
                        )
                    out[key] = value
            elif key in ("max_message_size", "pool_size"):
                value = self.integer(vnode, p, minimum=0)
                if value is not None:
                    out[key] = value
            elif key == "max_line_length":
                value = self.integer(vnode, p, minimum=MIN_LINE_LENGTH)
                if value is not None:
                    out[key] = value
            elif key in ("workers", "max_received", "backend_failures"):
                value = self.integer(vnode, p, minimum=1)
                if value is not None:
                    out[key] = value
            elif key == "backend_retry":
                value = self.number(vnode, p)
                if value is not None:
                    out[key] = value
            elif key == "add_received_header":
                value = self.scalar(vnode, p)
                if value is not None:
                    if not isinstance(value, bool):
                        raise self.error(vnode, p, f"must be true or false, not {_kind(vnode)}")
                    out[key] = value
            elif key == "allowed_xclient":
                out[key] = self.allowedXclient(vnode, p)
            elif key == "metrics":
                if not (isinstance(vnode, ScalarNode) and vnode.tag == _NULL):
                    out[key] = self.listenSocket(vnode, p)
            elif key == "node_name":
                value = self.string(vnode, p)
                if value is not None:
                    if not _NODE_NAME.match(value):
                        raise self.error(vnode, p, f"must be a name of letters, digits, '.', '_' or '-', not {value!r}")
                    out[key] = value
            elif key == "lease":
                value = self.number(vnode, p)
                if value is not None:
                    if value < 1:
                        # Heartbeats go out every lease/4 s, at most every 0.2 s.
                        raise self.error(vnode, p, f"must be at least 1 second, not {_text(vnode)}")
                    out[key] = value
        return out

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node, path)
        if value is not None and not isinstance(value, bool):
            raise self.error(node, path, f"must be true or false, not {_kind(node)}")
        return value

    def security(self, key: str, node: Node, path: str, out: dict[str, Any]) -> None:
        """
        The listener's C{tls}, C{require_tls}, C{allowed_clients},
        C{proxy_protocol} and C{auth} settings, into C{out}'s flat keys.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return
        if key in ("require_tls", "proxy_protocol"):
            value = self.boolean(node, path)
            if value is not None:
                out[key] = value
        elif key == "allowed_clients":
            out[key] = self.networks(node, path)
        elif key == "tls":
            keys = self.known(self.mapping(node, path), path, ("certificate", "key", "implicit"))
            for need in ("certificate", "key"):
                if need not in keys or self.string(keys[need][1], f"{path}.{need}") is None:
                    raise self.error(node, f"{path}.{need}", "missing; TLS needs a certificate and its key")
            out["tls_certificate"] = self.string(keys["certificate"][1], f"{path}.certificate")
            out["tls_key"] = self.string(keys["key"][1], f"{path}.key")
            if "implicit" in keys:
                out["tls_implicit"] = bool(self.boolean(keys["implicit"][1], f"{path}.implicit"))
        elif key == "auth":
            keys = self.known(self.mapping(node, path), path, ("users_file", "required"))
            if "users_file" not in keys:
                raise self.error(node, f"{path}.users_file", "missing; SASL needs a users file")
            out["auth_users_file"] = self.string(keys["users_file"][1], f"{path}.users_file")
            if "required" in keys:
                out["auth_required"] = bool(self.boolean(keys["required"][1], f"{path}.required"))

    def checkSecurity(self, node: MappingNode, out: dict[str, Any]) -> None:
        """
        What the listener's security settings need of each other.
        """
        if out.get("tls_certificate") is not None:
            return
        keys = {k.value: k for k, _ in node.value}
        if out.get("auth_users_file") is not None:
            raise self.error(keys["auth"], "config.auth", "SASL is offered only after TLS: config.tls is needed")
        if out.get("require_tls"):
            raise self.error(keys["require_tls"], "config.require_tls", "needs config.tls")

    def networks(self, node: Node, path: str) -> tuple[str, ...]:
        """
        A list of networks (CIDR, or a single address), kept as normalized
        text.
        """
        if not isinstance(node, SequenceNode):
            raise self.error(node, path, "must be a list of networks such as [127.0.0.0/8, '::1']")
        out = []
        for i, item in enumerate(node.value):
            p = f"{path}[{i}]"
            value = self.string(item, p)
            try:
                out.append(str(ipaddress.ip_network(value or "", strict=False)))
            except ValueError:
                raise self.error(item, p, f"must be a network such as 192.0.2.0/24, not {_kind(item)}") from None
        return tuple(out)

    def allowedXclient(self, node: Node, path: str) -> tuple[str, ...]:
        """
        A list of networks (CIDR, or a single address) and C{unix}, kept as
        normalized text so the configuration stays plain data.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return ()
        items = node.value if isinstance(node, SequenceNode) else [node]
        out = []
        for i, item in enumerate(items):
            p = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            value = self.string(item, p)
            if value is None:
                raise self.error(item, p, "must be a network such as 10.0.0.0/8, or 'unix'")
            if value.lower() == "unix":
                out.append("unix")
                continue
            try:
                out.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                raise self.error(
                    item, p, f"must be a network such as 10.0.0.0/8, or 'unix', not {value!r}"
                ) from None
        return tuple(out)

    def listenSocket(self, node: Node, path: str) -> str | tuple[str, int]:
        if isinstance(node, SequenceNode):
            if len(node.value) != 2:
                raise self.error(node, path, f"must be a unix socket path or a list [host, port], not a list of {len(node.value)} items")
            hnode, pnode = node.value
            host = self.string(hnode, path + "[0]", allowEmpty=True)
            if host is None:
                raise self.error(hnode, path + "[0]", "host must be a string (use '' for all addresses)")
            return (host, self.port(pnode, path + "[1]"))
        value = self.scalar(node, path) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self.error(node, path, f"must be a unix socket path or a list [host, port], not {_kind(node)}")
        return value

    def permissions(self, node: Node, path: str) -> int | None:
        value = self.scalar(node, path)
        if value is None:
            return None
        text = node.value.strip()
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not _OCTAL.match(text):
            raise self.error(node, path, f"permissions must be octal, e.g. 0660, not {text!r}")
        mode = int(text.lower().replace("o", "") or "0", 8)
        if mode > 0o7777:
            raise self.error(node, path, f"permissions must be at most 07777, not {text}")
        return mode

    def backends(self, node: Node) -> dict[str, Backend]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return {}
        node = self.mapping(node, "backends", "a mapping of backend names to settings")
        out = {}
        for name, knode, vnode in self.items(node, "backends"):
            path = f"backends.{name}"
            if name.lower() == REJECT:
                raise self.error(knode, path, f"{REJECT!r} is a reserved backend name")
            out[name] = self.backend(name, knode, vnode, path)
        return out

    def backend(self, name: str, knode: Node, node: Node, path: str) -> Backend:
        node = self.mapping(node, path, "a mapping with 'socket' or 'host' and 'port'")
        keys = self.known(node, path, _BACKEND_KEYS)
        values: dict[str, Any] = {}
        for key, (_, vnode) in keys.items():
            if key == "port":
                values["port"] = self.port(vnode, f"{path}.port")
            elif key in ("verify", "allow_plaintext_auth"):
                value = self.boolean(vnode, f"{path}.{key}")
                if value is not None:
                    values[key] = value
            elif key == "tls":
                value = self.string(vnode, f"{path}.tls")
                if value not in (None, "none", "starttls", "implicit"):
                    raise self.error(
                        vnode, f"{path}.tls", f"must be none, starttls or implicit, not {_kind(vnode)}"
                    )
                if value is not None:
                    values[key] = value
            elif key == "unknown_user":
                value = self.string(vnode, f"{path}.unknown_user")
                if value not in (None, "pass", "tempfail"):
                    raise self.error(
                        vnode, f"{path}.unknown_user",
                        f"must be 'pass' or 'tempfail', not {value!r}",
                    )
                if value is not None:
                    values[key] = value
            else:
                values[key] = self.string(vnode, f"{path}.{key}")
        if values.get("socket") is None:
            for need in ("host", "port"):
                if values.get(need) is None:
                    where = keys[need][1] if need in keys else knode
                    raise self.error(where, f"{path}.{need}", "missing; a backend needs 'socket' or both 'host' and 'port'")
        if (values.get("user") is None) != (values.get("password") is None):
            have, missing = ("user", "password") if values.get("user") is not None else ("password", "user")
            raise self.error(keys[have][0], f"{path}.{missing}", f"missing; '{have}' is set, so '{missing}' is needed too")
        if (values.get("client_certificate") is None) != (values.get("client_key") is None):
            have, missing = ("client_certificate", "client_key") if values.get("client_certificate") is not None else ("client_key", "client_certificate")
            raise self.error(keys[have][0], f"{path}.{missing}", f"missing; '{have}' is set, so '{missing}' is needed too")
        return Backend(name=name, **values)

    def users(self, node: Node, backends: Mapping[str, Backend]) -> dict[str, str]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return {}
        node = self.mapping(node, "users", "a mapping of user names to backend names")
        valid = set(backends)
        valid.add(REJECT)
        out: dict[str, str] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode) or knode.tag in (_NULL, _MERGE):
                raise self.error(knode, "users", f"user keys must be addresses or names, not {_kind(knode)}")
            raw = knode.value
            key = raw.lower()
            path = f"users.{raw}"
            if _BAD_USER_KEY.search(key) or not key.isprintable():
                raise self.error(knode, path, "not a valid user key; use 'user@domain', 'localpart' or '@domain'")
            if isinstance(vnode, MappingNode):
                value = self.rewrite(vnode, path, backends, valid)
            else:
                if not isinstance(vnode, ScalarNode) or vnode.tag == _NULL:
                    raise self.error(vnode, path, f"must name a backend (or {REJECT!r}), not {_kind(vnode)}")
                value = vnode.value
                if value not in valid:
                    raise self.error(vnode, path, self.unknownBackend(value, backends))
            previous = out.get(key)
            if previous is not None and previous != value:
                first = next(k for k, _ in node.value if k.value.lower() == key)
                raise self.error(
                    knode, path,
                    f"maps to {value!r} but {first.value!r} (line {_line(first)}) maps to {previous!r}; "
                    "user keys are case-insensitive",
                )
            out[key] = value
        return out

    def rewrite(self, node: MappingNode, path: str, backends, valid) -> tuple[str, str]:
        """
        A C{users} value C{{backend: X, address: Y}}: the recipient goes to
        C{X} as C{Y}.
        """
        keys = self.known(node, path, ("backend", "address"))
        for need in ("backend", "address"):
            if need not in keys:
                raise self.error(node, f"{path}.{need}", "missing; a rewritten user needs 'backend' and 'address'")
        bnode, anode = keys["backend"][1], keys["address"][1]
        backend = self.string(bnode, f"{path}.backend")
        if backend not in valid:
            raise self.error(bnode, f"{path}.backend", self.unknownBackend(str(backend), backends))
        if backend == REJECT:
            raise self.error(bnode, f"{path}.backend", f"{REJECT!r} delivers nowhere: an address makes no sense with it")
        address = self.string(anode, f"{path}.address")
        if address is None or not isRewriteAddress(address):
            raise self.error(anode, f"{path}.address", f"must be an address such as user@example.com, not {_kind(anode)}")
        return (backend, address)

    def routing(self, node: Node) -> dict[str, Any]:
        """
        The C{routing} section: where the routing table lives when
        it is not the C{users} mapping. The database URI is never put in an
        error message: it may hold a password.
        """
        path = "routing"
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return {}
        node = self.mapping(node, path)
        keys = self.known(node, path, _ROUTING_KEYS)
        out: dict[str, Any] = {}
        for key, (knode, vnode) in keys.items():
            p = f"routing.{key}"
            if not isinstance(vnode, ScalarNode) or vnode.tag == _NULL or not vnode.value:
                raise self.error(vnode, p, "must be a non-empty string")
            value = vnode.value
            if key == "database":
                if not value.startswith(("postgresql://", "postgres://")):
                    raise self.error(vnode, p, "must be a libpq URI beginning with 'postgresql://'")
                out["routing_database"] = value
            elif key == "table":
                if not _TABLE_NAME.match(value):
                    raise self.error(vnode, p, f"must be a lower-case SQL name (letters, digits, '_'; at most 40), not {value!r}")
                out["routing_table"] = value
            else:
                out["routing_password_file"] = value
        if out and "routing_database" not in out:
            raise self.error(node, "routing.database", "missing required key (a libpq URI)")
        return out

    @staticmethod
    def unknownBackend(name: str, backends: Mapping[str, Backend]) -> str:
        if not backends:
            return f"backend {name!r} is not defined (no backends are defined; only {REJECT!r} is available)"
        return f"backend {name!r} is not defined" + _suggest(name, [*backends, REJECT])


def _text(node: Node) -> str:
    return node.value if isinstance(node, ScalarNode) else _kind(node)


_TIMEOUT_KEYS = (
    "connect_timeout",
    "command_timeout",
    "data_timeout",
    "idle_timeout",
    "shutdown_grace",
    "pool_idle_timeout",
)
_SECURITY_KEYS = ("tls", "require_tls", "allowed_clients", "proxy_protocol", "auth")
_CONFIG_KEYS = (
    "socket",
    "owner",
    "group",
    "permissions",
    "ignoreDomain",
    "fallback_backend",
    "pid",
    "recipient_delimiter",
    "hostname",
    *_TIMEOUT_KEYS,
    *_SECURITY_KEYS,
    "node_name",
    "lease",
    "max_message_size",
    "max_line_length",
    "control_socket",
    "pool_size",
    "workers",
    "metrics",
    "allowed_xclient",
    "max_received",
    "add_received_header",
    "backend_failures",
    "backend_retry",
)
_ROUTING_KEYS = ("database", "table", "password_file")
_NODE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_TABLE_NAME = re.compile(r"\A[a-z_][a-z0-9_]{0,39}\Z")
_BACKEND_KEYS = (
    "socket", "host", "port", "user", "password", "unknown_user",
    "tls", "verify", "server_name", "ca_file", "client_certificate", "client_key",
    "allow_plaintext_auth",
)


def _localHost(host: str) -> bool:
    """
    Whether C{host} certainly names this machine: a loopback address or
    C{localhost}.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def isOwnListener(backend: Backend, listen: str | tuple[str, int]) -> bool:
    """
    Whether C{backend} is the proxy's own listening socket C{listen}
    (C{config.socket}): the same unix socket path, or the same port on the
    listening address or, for a wildcard or loopback listener, on a
    loopback address it also serves.
    """
    if isinstance(listen, str):
        return backend.socket is not None and os.path.realpath(
            backend.socket
        ) == os.path.realpath(listen)
    if backend.socket is not None or backend.port != listen[1]:
        return False
    host, backendHost = listen[0].lower(), (backend.host or "").lower()
    if host == backendHost:
        return True
    if host in ("", "0.0.0.0", "::"):
        return _localHost(backendHost) or backendHost in ("0.0.0.0", "::")
    # "localhost" is a loopback address by another name.
    return "localhost" in (host, backendHost) and _localHost(host) and _localHost(backendHost)


# --- public API ----------------------------------------------------------------


def parse(text: str, source: str = "<string>") -> Config:
    """
    Parse and validate configuration text.

    @raise ConfigError: for any mistake, with file, line and key.
    """
    return _Parser(source).parse(text)


def load(path: str) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @raise ConfigError: if the file cannot be read or is not valid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), None, None, f"not valid UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise ConfigError(str(path), None, None, f"cannot read the file: {e.strerror or e}") from None
    loaded = parse(text, str(path))
    for backend in loaded.backends.values():
        if (
            backend.password is not None
            and backend.socket is None
            and backend.tls == "none"
            and not backend.allow_plaintext_auth
        ):
            # Refused when the file is loaded (start, check, reload) rather
            # than parsed, so that tests and tools can still parse one.
            raise ConfigError(
                str(path), None, f"backends.{backend.name}",
                "credentials would cross the network in clear: set 'tls' "
                "(starttls or implicit), or 'allow_plaintext_auth: true'",
            )
    return loaded


def usesSecurityFiles(config: Config) -> bool:
    """
    Whether C{config} names certificates, keys or a SASL users file.
    """
    return config.tls_certificate is not None or any(
        b.tls != "none" for b in config.backends.values()
    )


def readableSecrets(config: Config) -> str | None:
    """
    A one-line warning when the file of C{config} holds a password and
    users other than its owner may read it, else C{None}.
    """
    if not any(b.password for b in config.backends.values()):
        return None
    try:
        mode = os.stat(config.source).st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{config.source} holds backend passwords and is readable by "
        f"{'everyone' if mode & 0o004 else 'its group'} (mode {mode & 0o777:04o}); "
        "chmod 600 it"
    )


# Settings a running proxy cannot change: they take effect on a restart.
RESTART_KEYS = (
    "socket", "owner", "group", "permissions", "workers", "metrics",
    "node_name", "routing_database", "routing_table", "routing_password_file",
)
_OTHER = tuple(
    n for n in Config.__dataclass_fields__ if n not in (*RESTART_KEYS, "source", "backends", "users")
)


def describeChanges(old: Config, new: Config) -> str:
    """
    One line summarising what a reload from C{old} to C{new} changes, e.g.
    C{"users: 2 added, 1 removed, 1 moved; backends: 1 added, 0 removed,
    0 changed"}, followed by changed settings and a note when the listener
    (socket, owner, group, permissions) changed, which needs a restart.
    """
    ou, nu = old.users, new.users
    # Plain loops rather than set operations: a reload runs this in a thread,
    # and one set operation over 100,000 keys would hold the GIL (and stall
    # serving) for its whole length.
    added = sum(1 for k in nu if k not in ou)
    removed = sum(1 for k in ou if k not in nu)
    moved = sum(1 for k, v in ou.items() if k in nu and nu[k] != v)
    ob, nb = old.backends, new.backends
    parts = [
        f"users: {added} added, {removed} removed, {moved} moved",
        f"backends: {len(nb.keys() - ob.keys())} added, {len(ob.keys() - nb.keys())} removed, "
        f"{sum(1 for k in ob.keys() & nb.keys() if ob[k] != nb[k])} changed",
    ]
    settings = [n for n in _OTHER if getattr(old, n) != getattr(new, n)]
    if settings:
        parts.append("settings changed: " + ", ".join(settings))
    restart = [n for n in RESTART_KEYS if getattr(old, n) != getattr(new, n)]
    if restart:
        parts.append(f"needs a restart to change: {', '.join(restart)}")
    return "; ".join(parts)
