"""
The routing-table subcommands of C{lmtp-proxy}, dispatched by
L{lmtp_proxy.cli}::

    lmtp-proxy db init|import|export -c FILE [USERS.yaml]
    lmtp-proxy users set -c FILE KEY BACKEND [--wait] [--timeout S]
    lmtp-proxy users delete -c FILE KEY [--wait] [--timeout S]
    lmtp-proxy users list -c FILE [PATTERN]
    lmtp-proxy barrier -c FILE [--timeout S]
    lmtp-proxy move -c FILE USER --to BACKEND [--sync CMD] [--timeout S]

C{users}, C{barrier} and C{move} work on either source: the database
(C{routing.database}: one transaction per change, the cluster barrier of
L{lmtp_proxy.barrier}) or the YAML file (rewritten atomically, validated,
then the running proxy reloaded through its control socket, the barrier
being C{reload --wait}'s). Plain blocking programs: no reactor runs.

Exit status: 0 success; 1 refused or failed; 2 a usage error.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Sequence

from lmtp_proxy import cli
from lmtp_proxy.cli import PROG, CommandError, _err, _out, _subParser, loadConfig
from lmtp_proxy.routing import REJECT

# Longer than the barrier needs to count out a silent node with the
# default lease (10 s) and data_timeout (300 s): lease + data_timeout + a
# margin (lmtp_proxy.barrier.countOutAfter).
DEFAULT_TIMEOUT = 600
_BAD_KEY = re.compile(r"\A\Z|\s|@\Z")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def _timeoutOption(parser):
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the barrier (default: {DEFAULT_TIMEOUT})",
    )


def _configOption(parser, default) -> None:
    # On the command and on its action alike ("users -c F set ..." or
    # "users set -c F ..."): the action's only overrides when given.
    parser.add_argument(
        "-c", "--config", default=default, metavar="FILE",
        help=f"configuration file (default: {cli.DEFAULT_CONFIG})",
    )


def _checkKey(parser, key: str) -> str:
    lowered = key.lower()
    if _BAD_KEY.search(lowered) or not lowered.isprintable():
        parser.error(f"not a valid user key: {key!r} (use 'user@domain', 'localpart' or '@domain')")
    return lowered


def _checkBackend(config, backend: str) -> None:
    if backend != REJECT and backend not in config.backends:
        known = ", ".join(sorted(config.backends)) or "none"
        raise CommandError(
            f"backend {backend!r} is not defined in {config.source} "
            f"(backends: {known}; or {REJECT!r})"
        )


def _store(config):
    from lmtp_proxy.pgstore import Store

    return Store(config)


def _storeCall(f, *args):
    from lmtp_proxy.pgstore import StoreError

    try:
        return f(*args)
    except StoreError as e:
        raise CommandError(str(e)) from None


def databaseTable(config):
    """
    The routing table in C{config}'s database, as a proxy would load it
    (for C{lmtp-proxy route}).
    """
    from lmtp_proxy.pgsource import LiveTable

    store = _store(config)
    try:
        _, users = _storeCall(store.load)
    finally:
        store.close()
    return LiveTable(users, config)


def _requireDatabase(config, what: str) -> None:
    if config.routing_database is None:
        raise CommandError(f"{what} needs routing.database in {config.source}")


# --- the barrier, for either source ----------------------------------------------


def _barrier(config, timeout: float, target: int | None = None) -> str:
    """
    Wait for the barrier; return what to print, or raise L{CommandError}
    naming what holds it up.
    """
    if config.routing_database is not None:
        from lmtp_proxy import barrier

        store = _store(config)
        try:
            generation, countedOut = barrier.wait(store, timeout, target)
        except barrier.BarrierTimeout as e:
            raise CommandError(str(e)) from None
        finally:
            store.close()
        text = f"barrier: generation {generation} in force on every node"
        if countedOut:
            text += " (counted out, silent past their lease: %s)" % (", ".join(countedOut),)
        return text
    reply = _control(config, f"reload-wait {timeout:g}\n", timeout)
    return f"barrier: {reply}"


def _control(config, request: str, timeout: float) -> str:
    from lmtp_proxy.control import controlAddress

    address = controlAddress(config)
    shown = cli.displayAddress(address)
    try:
        reply = cli.controlRequest(address, request, timeout + cli.REPLY_SLACK)
    except cli.ControlUnreachable as e:
        raise CommandError(
            f"cannot reach the control socket {shown} ({e}): is lmtp-proxy running with {config.source}?"
        ) from None
    word = reply.split(" ", 1)[0]
    if word == "ok":
        return reply
    raise CommandError(reply)


def _reloadYAML(config, wait: bool, timeout: float) -> int:
    """
    Have the running proxy put the rewritten file in force (and, with
    C{wait}, the barrier). Without C{wait} a proxy that is not running is
    only reported: the file is what it reads when it starts.
    """
    if wait:
        _out(_control(config, f"reload-wait {timeout:g}\n", timeout))
        return 0
    from lmtp_proxy.control import controlAddress

    try:
        reply = cli.controlRequest(controlAddress(config), "reload\n", 30 + cli.REPLY_SLACK)
    except cli.ControlUnreachable as e:
        _err(f"{config.source} updated; no running proxy reloaded (control socket: {e})")
        return 0
    if reply.split(" ", 1)[0] != "ok":
        raise CommandError(reply)
    _out(reply)
    return 0


# --- lmtp-proxy db ---------------------------------------------------------------


def readUsers(path: str, config) -> dict:
    """
    The C{users} mapping of the YAML file at C{path} (the seed's format: a
    whole configuration file works too), validated against C{config}'s
    backends as the configuration's own would be.
    """
    import yaml

    from lmtp_proxy import config as configuration

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    loader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        raise CommandError(f"{path}: YAML syntax error: {' '.join(str(e).split())}") from None
    node = None
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "users":
                node = v
    if node is None:
        raise CommandError(f"{path}: no 'users' mapping")
    parser = configuration._Parser(path)
    try:
        return parser.users(node, config.backends)
    except configuration.ConfigError as e:
        raise CommandError(str(e)) from None


def dbCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy db init|import|export}.
    """
    parser = argparse.ArgumentParser(
        prog=f"{PROG} db",
        description="Manage the PostgreSQL routing store named by routing.database.",
    )
    _configOption(parser, cli.DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("init", "create the schema (idempotent)"),
        ("import", "replace every route with a YAML file's users mapping, in one transaction"),
        ("export", "print the routes as a YAML users mapping"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        _configOption(p, argparse.SUPPRESS)
        if name == "import":
            p.add_argument("users", metavar="USERS.yaml", help="a YAML file with a users mapping")
    options = parser.parse_args(list(args))
    config = loadConfig(options.config)
    _requireDatabase(config, f"'{PROG} db'")
    store = _store(config)
    try:
        if options.action == "init":
            _storeCall(store.init)
            _out(f"schema of {config.routing_table} ready (generation {_storeCall(store.generation)})")
        elif options.action == "import":
            users = readUsers(options.users, config)
            generation = _storeCall(store.replaceAll, users)
            _out(f"imported {len(users)} routes from {options.users}: generation {generation}")
        else:
            rows = _storeCall(store.routes)
            _writeUsers(rows)
    finally:
        store.close()
    return 0


def _writeUsers(rows) -> None:
    from lmtp_proxy.yamledit import quote

    write = sys.stdout.write
    if not rows:
        write("users: {}\n")
        return
    write("users:\n")
    for key, backend, address in rows:
        if address is None:
            write(f"  {quote(key)}: {quote(backend)}\n")
        else:
            write(f"  {quote(key)}: {{backend: {quote(backend)}, address: {quote(address)}}}\n")


# --- lmtp-proxy users --------------------------------------------------------------


def usersCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy users set|delete|list}.
    """
    parser = argparse.ArgumentParser(
        prog=f"{PROG} users",
        description="Change or show the users routing table, in the database "
        "(routing.database) or the YAML file.",
    )
    _configOption(parser, cli.DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p):
        _configOption(p, argparse.SUPPRESS)

    p = sub.add_parser("set", help="route KEY to BACKEND (or 'reject')")
    common(p)
    p.add_argument("key", metavar="KEY")
    p.add_argument("backend", metavar="BACKEND")
    p.add_argument(
        "--address", metavar="ADDRESS",
        help="the address the backend knows the user by (a rewrite; default: none)",
    )
    p.add_argument("--wait", action="store_true", help="return only after the barrier")
    _timeoutOption(p)
    p = sub.add_parser("delete", help="remove the route of KEY")
    common(p)
    p.add_argument("key", metavar="KEY")
    p.add_argument("--wait", action="store_true", help="return only after the barrier")
    _timeoutOption(p)
    p = sub.add_parser("list", help="print the routes (KEY<TAB>BACKEND[<TAB>ADDRESS])")
    common(p)
    p.add_argument("pattern", nargs="?", metavar="PATTERN", help="a shell-style pattern on keys")
    options = parser.parse_args(list(args))
    key = None
    if options.action in ("set", "delete"):
        key = _checkKey(parser, options.key)
    config = loadConfig(options.config)

    if options.action == "list":
        return _list(config, options.pattern)
    if options.action == "set":
        _checkBackend(config, options.backend)
        if options.address is not None and (options.backend == REJECT or _BAD_KEY.search(options.address)):
            parser.error("--address needs a backend and an address without spaces")
        return setUser(config, key, options.backend, options.wait, options.timeout, options.address)
    return deleteUser(config, key, options.wait, options.timeout)


def _list(config, pattern) -> int:
    if config.routing_database is not None:
        store = _store(config)
        try:
            rows = _storeCall(store.routes)
        finally:
            store.close()
    else:
        rows = []
        for k, v in sorted(config.users.items()):
            rows.append((k, v, None) if isinstance(v, str) else (k, v[0], v[1]))
    if pattern is not None:
        pattern = pattern.lower()
        rows = [row for row in rows if fnmatch.fnmatchcase(row[0], pattern)]
    for key, backend, address in rows:
        _out(f"{key}\t{backend}" + ("" if address is None else f"\t{address}"))
    return 0


def setUser(config, key: str, backend: str, wait: bool, timeout: float, address=None) -> int:
    """
    Route C{key} to C{backend} (with C{address}, rewritten to it) in
    C{config}'s source; with C{wait}, return only after the barrier.
    """
    if config.routing_database is not None:
        store = _store(config)
        try:
            generation = _storeCall(store.set, key, backend, address)
        finally:
            store.close()
        _out(f"{key}: {backend} (generation {generation})")
        if wait:
            _out(_barrier(config, timeout, generation))
        return 0
    from lmtp_proxy.yamledit import setUser as edit

    _rewrite(config, lambda text: edit(text, key, backend, address))
    _out(f"{key}: {backend} ({config.source} rewritten)")
    return _reloadYAML(config, wait, timeout)


def deleteUser(config, key: str, wait: bool, timeout: float) -> int:
    """
    Remove C{key}'s route; exit status 1 when it had none.
    """
    if config.routing_database is not None:
        store = _store(config)
        try:
            generation, removed = _storeCall(store.delete, key)
        finally:
            store.close()
        if not removed:
            raise CommandError(f"no route for {key!r}")
        _out(f"{key}: deleted (generation {generation})")
        if wait:
            _out(_barrier(config, timeout, generation))
        return 0
    from lmtp_proxy.yamledit import deleteUser as edit

    found = []

    def change(text):
        text, removed = edit(text, key)
        found.append(removed)
        return text

    _rewrite(config, change)
    if not found[0]:
        raise CommandError(f"no route for {key!r} in {config.source}")
    _out(f"{key}: deleted ({config.source} rewritten)")
    return _reloadYAML(config, wait, timeout)


def _rewrite(config, change) -> None:
    """
    Apply C{change} to the YAML file's text, validate the result as a
    whole, and replace the file atomically.
    """
    from lmtp_proxy import config as configuration
    from lmtp_proxy.yamledit import EditError, writeAtomically

    path = config.source
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = change(text)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    except EditError as e:
        raise CommandError(f"{path}: {e}") from None
    if new == text:
        return
    try:
        configuration.parse(new, path)
    except configuration.ConfigError as e:
        raise CommandError(f"refused, the result would not be valid: {e}") from None
    try:
        writeAtomically(path, new)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


# --- lmtp-proxy barrier ------------------------------------------------------------


def barrierCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy barrier}: wait until every node has the current generation
    in force and no transaction of an older one.
    """
    parser = _subParser(
        "barrier",
        "Wait until every proxy has the routing table's current generation in "
        "force and no transaction begun under an older one (the migration "
        "barrier). Exit status 1 names the nodes holding it up.",
    )
    _timeoutOption(parser)
    options = parser.parse_args(list(args))
    config = loadConfig(options.config)
    _out(_barrier(config, options.timeout))
    return 0


# --- lmtp-proxy move ---------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _runSync(command, env):
    """
    Run the sync command in a process group of its own and return its exit
    status. A move interrupted meanwhile stops the whole group, not only the
    shell: a copy left running would go on writing to the new store, and
    would hold this command's output open.
    """
    sync = subprocess.Popen(command, shell=True, env=env, start_new_session=True)
    try:
        return sync.wait()
    except BaseException:
        try:
            os.killpg(sync.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        sync.wait()
        raise


def _currentRoute(config, key):
    if config.routing_database is not None:
        store = _store(config)
        try:
            rows = _storeCall(store.routes, key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
        finally:
            store.close()
        return rows[0][1] if rows else None
    value = config.users.get(key)
    return value if value is None or isinstance(value, str) else value[0]


def moveCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy move}: set the user to C{reject}, barrier, run the sync
    command, set the new backend, barrier. Interrupted or failed after the
    first step, the user stays on C{reject}: mail waits in the MTA's queue.
    """
    parser = _subParser(
        "move",
        "Move USER to another backend with no lost mail: reject (mail stays "
        "queued), barrier, run --sync CMD (its exit status decides), set the "
        "new backend, barrier.",
    )
    parser.add_argument("user", metavar="USER", help="the users key to move")
    parser.add_argument("--to", required=True, metavar="BACKEND", help="the new backend")
    parser.add_argument(
        "--sync", metavar="CMD",
        help="shell command copying the mailbox (e.g. imapsync); environment: "
        "LMTP_PROXY_USER, LMTP_PROXY_FROM, LMTP_PROXY_TO",
    )
    _timeoutOption(parser)
    options = parser.parse_args(list(args))
    key = _checkKey(parser, options.user)
    config = loadConfig(options.config)
    _checkBackend(config, options.to)
    if options.to == REJECT:
        raise CommandError("--to must name a backend, not 'reject'")
    old = _currentRoute(config, key)
    source = f"-c {shlex.quote(config.source)}"
    finish = f"{PROG} users set {source} {shlex.quote(key)} {shlex.quote(options.to)} --wait"
    if old is None or old == REJECT:
        rollback = f"{PROG} users delete {source} {shlex.quote(key)} --wait" if old is None else None
    else:
        rollback = f"{PROG} users set {source} {shlex.quote(key)} {shlex.quote(old)} --wait"

    def stranded(why):
        lines = [
            f"move of {key} stopped: {why}",
            f"{key} stays on reject: its mail is deferred (4xx) and stays queued, nothing is lost",
            f"to finish: {finish}",
        ]
        if rollback:
            lines.append(f"to roll back: {rollback}")
        return CommandError("\n".join(lines))

    def interrupt(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    step = "reject"
    try:
        # 1: reject. Nothing changed if this fails.
        _out(f"move {key}: {old or '(no route of its own)'} -> {options.to}")
        setUser(config, key, REJECT, False, options.timeout)
        # 2: no delivery to the old store is left anywhere.
        step = "barrier after reject"
        _out(_barrier(config, options.timeout))
        # 3: copy the mailbox.
        if options.sync:
            step = "sync"
            env = dict(
                os.environ,
                LMTP_PROXY_USER=key,
                LMTP_PROXY_FROM=old or "",
                LMTP_PROXY_TO=options.to,
            )
            _out(f"sync: {options.sync}")
            status = _runSync(options.sync, env)
            if status != 0:
                raise stranded(f"the sync command exited with status {status}")
        # 4 and 5: the new backend, in force everywhere.
        step = "set the new backend"
        setUser(config, key, options.to, False, options.timeout)
        step = "barrier after the new backend"
        _out(_barrier(config, options.timeout))
    except _Interrupted as e:
        if step == "reject":
            raise CommandError(f"move of {key} interrupted ({e}) before it began") from None
        raise stranded(f"interrupted ({e}) during: {step}") from None
    except KeyboardInterrupt:
        if step == "reject":
            raise CommandError(f"move of {key} interrupted before it began") from None
        raise stranded(f"interrupted during: {step}") from None
    except CommandError as e:
        if step == "reject":
            raise
        if step == "barrier after the new backend":
            raise CommandError(
                f"{key} is on {options.to}, but the barrier was not confirmed: {e}; "
                f"run '{PROG} barrier {source}'"
            ) from None
        if step == "set the new backend":
            raise stranded(str(e)) from None
        if "stays on reject" in str(e):
            raise
        raise stranded(str(e)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _out(f"moved {key} to {options.to}")
    return 0


SUBCOMMANDS = {
    "db": dbCommand,
    "users": usersCommand,
    "barrier": barrierCommand,
    "move": moveCommand,
}
