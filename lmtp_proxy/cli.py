"""
The C{lmtp-proxy} console script.

Two forms::

    lmtp-proxy [-h] [-c [CONFIG]] [-D]          # the original command line
    lmtp-proxy check  [-c FILE]
    lmtp-proxy route  [-c FILE] ADDRESS...
    lmtp-proxy reload [-c FILE] [--wait] [--timeout SECONDS] [--pidfile FILE]
    lmtp-proxy status [-c FILE] [--json]

The original form validates the configuration and then runs twistd in this
process (C{twistd -n --pidfile= lmtp-proxy --config FILE}, or with C{-D}
C{twistd --pidfile PID --syslog --prefix lmtp-proxy lmtp-proxy --config
FILE}).  The subcommands are plain blocking programs: no reactor runs.

Exit status: 0 success; 1 a configuration error or a failed operation (and,
for C{route}, an address without a route); 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import Callable, Sequence

from lmtp_proxy.config import DEFAULT_CONFIG
from lmtp_proxy.listening import describeListen

PROG = "lmtp-proxy"
DEFAULT_RELOAD_TIMEOUT = 300
# Extra seconds the reload client waits for the reply beyond --timeout.
REPLY_SLACK = 10.0
MAX_REPLY = 65536
# A status reply holds every backend of every process.
MAX_STATUS_REPLY = 16 << 20
STATUS_TIMEOUT = 30.0

DESCRIPTION = (
    "An LMTP Proxy server. Accepts mail via LMTP on an incoming socket and can "
    "forward to different lmtp sockets depending on the destination address."
)
EPILOG = (
    "subcommands: 'lmtp-proxy check -c FILE' validates the configuration, "
    "'lmtp-proxy route -c FILE ADDRESS...' shows where recipients go, "
    "'lmtp-proxy reload -c FILE [--wait]' reloads a running proxy, "
    "'lmtp-proxy status -c FILE [--json]' shows what it is doing, "
    "'lmtp-proxy users set|delete|list -c FILE ...' changes the routing table, "
    "'lmtp-proxy move -c FILE USER --to BACKEND' moves a user, "
    "'lmtp-proxy barrier -c FILE' and 'lmtp-proxy db init|import|export -c FILE' "
    "serve the cluster. "
    "Use 'lmtp-proxy SUBCOMMAND --help' for details."
)


class CommandError(Exception):
    """
    A failure reported as one line C{"lmtp-proxy: <message>"} on stderr.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _out(message: str) -> None:
    print(message, file=sys.stdout)


def loadConfig(path: str):
    """
    Load and validate C{path}; a L{lmtp_proxy.config.ConfigError} becomes a
    L{CommandError} with the same one-line message.
    """
    from lmtp_proxy.config import ConfigError
    from lmtp_proxy.reloader import loadChecked

    try:
        return loadChecked(path)
    except ConfigError as e:
        raise CommandError(str(e)) from None


# --- the original form -----------------------------------------------------------


def originalParser() -> argparse.ArgumentParser:
    """
    The parser of the original command line, C{lmtp-proxy [-h] [-c [CONFIG]]
    [-D]}.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "-c",
        "--config",
        nargs="?",
        const=DEFAULT_CONFIG,
        default=DEFAULT_CONFIG,
        metavar="CONFIG",
        help=f"Configuration file location (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "-D",
        "--daemonize",
        action="store_true",
        help="Daemonize program. If unspecified, run in foreground",
    )
    return parser


def twistdArgv(configPath: str, daemonize: bool, pidfile: str | None = None) -> list[str]:
    """
    The twistd command line (C{sys.argv}, program name included) that runs
    the proxy with the configuration file C{configPath}.

    In the foreground twistd logs to stdout and writes no pid file.
    Daemonized it logs to syslog with the prefix C{lmtp-proxy} and writes
    C{pidfile} (the configuration's C{pid}).
    """
    path = os.path.abspath(configPath)
    if daemonize:
        if not pidfile:
            raise ValueError("a pid file is required to daemonize")
        return ["twistd", "--pidfile", pidfile, "--syslog", "--prefix", PROG, PROG, "--config", path]
    return ["twistd", "-n", "--pidfile=", PROG, "--config", path]


def runTwistd(argv: Sequence[str]) -> int:
    """
    Run twistd in this process with C{sys.argv} set to C{argv}.
    """
    from twisted.scripts.twistd import run

    saved = sys.argv
    sys.argv = list(argv)
    try:
        run()
    finally:
        sys.argv = saved
    return 0


def runProxy(args: Sequence[str], runner: Callable[[Sequence[str]], int] | None = None) -> int:
    """
    The original form: validate the configuration, then run twistd (through
    C{runner}, default L{runTwistd}) with L{twistdArgv}.
    """
    options = originalParser().parse_args(list(args))
    config = loadConfig(options.config)
    if runner is None:
        runner = runTwistd
    return runner(twistdArgv(options.config, options.daemonize, config.pid))


# --- subcommands ----------------------------------------------------------------


def _subParser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=description)
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    return parser


def displayAddress(address: str) -> str:
    """
    A control socket address for humans: abstract names (leading NUL) are
    shown with a leading C{@}, as ss(8) does.
    """
    if address.startswith("\0"):
        return "@" + address[1:]
    return address


def checkCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy check}: validate the configuration and print a summary.
    Passwords are never printed.
    """
    parser = _subParser("check", "Validate the configuration file and print a summary.")
    options = parser.parse_args(list(args))
    config = loadConfig(options.config)
    from lmtp_proxy.config import readableSecrets

    warning = readableSecrets(config)
    if warning is not None:
        _err(f"warning: {warning}")

    _out(f"{config.source}: configuration OK")
    _out(f"listen: {describeListen(config)}")
    _out(f"backends: {len(config.backends)}")
    counts: dict[str, int] = {}
    for backend in config.users.values():
        if backend.__class__ is tuple:
            # A rewritten user: (backend, address).
            backend = backend[0]
        counts[backend] = counts.get(backend, 0) + 1
    for name in sorted(config.backends):
        backend = config.backends[name]
        auth = f", user {backend.user}" if backend.user is not None else ""
        n = counts.get(name, 0)
        _out(f"  {name}: {backend.describe()}{auth} ({n} user{'' if n == 1 else 's'})")
    perBackend = ", ".join(f"{counts[name]} -> {name}" for name in sorted(counts))
    if config.routing_database is not None:
        # With the database source, the users are the database's (the password never shown).
        from lmtp_proxy.pgstore import redact

        _out(
            f"users: in {redact(config.routing_database)}, table {config.routing_table} "
            f"(node {config.node_name}, lease {config.lease:g} s)"
        )
    else:
        _out(f"users: {len(config.users)}" + (f" ({perBackend})" if perBackend else ""))
    if config.fallback_backend is None:
        _out("fallback_backend: none (unknown recipients are refused with 550 5.1.1)")
    else:
        _out(f"fallback_backend: {config.fallback_backend}")
    _out(f"ignoreDomain: {'true' if config.ignore_domain else 'false'}")
    try:
        from lmtp_proxy.control import controlAddress
    except ImportError:
        pass
    else:
        _out(f"control socket: {displayAddress(controlAddress(config))}")
    if isinstance(config.metrics, str):
        _out(f"metrics: /metrics on unix:{config.metrics}")
    elif config.metrics is not None:
        host, port = config.metrics
        host = f"[{host}]" if ":" in host else host or "*"
        _out(f"metrics: http://{host}:{port}/metrics")
    return 0


def splitAddress(address: str) -> tuple[str, str | None]:
    """
    C{(local part, domain)} of C{address}; the domain is None when there is
    no C{@}.  Angle brackets are ignored.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if "@" in text:
        local, _, domain = text.rpartition("@")
        return local, domain
    return text, None


def displayRecipient(address: str) -> str:
    """
    C{address} as given on the command line, without angle brackets.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1]
    return text


def routeCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy route}: print which backend each address goes to and why.
    Exit 0 if every address has a route, 1 otherwise.
    """
    parser = _subParser(
        "route",
        "Show which backend each recipient address is delivered to, and why "
        "(like postmap -q). Exit status 1 if any address has no route.",
    )
    parser.add_argument("addresses", nargs="+", metavar="ADDRESS", help="recipient address")
    options = parser.parse_args(list(args))
    parsed = []
    for address in options.addresses:
        local, domain = splitAddress(address)
        if not local or domain == "":
            parser.error(f"not a recipient address: {address!r}")
        parsed.append((address, local, domain))

    config = loadConfig(options.config)
    from lmtp_proxy.routing import RoutingTable, describeRoute

    if config.routing_database is not None:
        # With the database source, the table is the database's.
        from lmtp_proxy.routecli import databaseTable

        table = databaseTable(config)
    else:
        table = RoutingTable.fromConfig(config)
    status = 0
    for address, local, domain in parsed:
        route = table.lookup(local, domain)
        if route is None:
            status = 1
        _out(f"{address}\t{describeRoute(route, displayRecipient(address))}")
    return status


class ControlUnreachable(Exception):
    """
    The control socket could not be connected to.
    """


def controlRequest(address: str, request: str, timeout: float, limit: int = MAX_REPLY) -> str:
    """
    Send one request line to the control socket at C{address} and return
    the reply line (without its line end), reading at most about C{limit}
    bytes.

    @raise ControlUnreachable: the socket cannot be connected to.
    @raise CommandError: no (complete) reply arrived within C{timeout}.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as e:
            raise ControlUnreachable(e.strerror or str(e)) from None
        shown = displayAddress(address)
        try:
            sock.sendall(request.encode("utf-8"))
            data = b""
            while b"\n" not in data and len(data) < limit:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise CommandError(f"no reply from the control socket {shown} within {timeout:g} seconds") from None
        except OSError as e:
            raise CommandError(f"control socket {shown}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not data:
        raise CommandError(f"the control socket {shown} closed the connection without a reply")
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", "replace")


def readPid(pidfile: str) -> int:
    """
    The process id in C{pidfile}.

    @raise CommandError: the file cannot be read or holds no pid.
    """
    try:
        with open(pidfile, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except OSError as e:
        raise CommandError(f"cannot read the pid file {pidfile}: {e.strerror or e}") from None
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise CommandError(f"the pid file {pidfile} holds no process id: {text[:40]!r}")
    return pid


def _nonNegativeInt(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def reloadCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy reload}: ask the running proxy, through its control socket,
    to reload its configuration (and with C{--wait}, to wait until every
    transaction begun under the old configuration has finished).  Without
    C{--wait} and without a reachable control socket, send SIGUSR1 to the
    pid in the pid file instead.
    """
    parser = _subParser(
        "reload",
        "Reload the configuration of the running lmtp-proxy through its control "
        "socket. With --wait, also wait until no transaction begun under the "
        "previous configuration is still running (the migration barrier).",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until transactions begun before the reload have finished",
    )
    parser.add_argument(
        "--timeout",
        type=_nonNegativeInt,
        default=DEFAULT_RELOAD_TIMEOUT,
        metavar="SECONDS",
        help=f"how long --wait waits (default: {DEFAULT_RELOAD_TIMEOUT})",
    )
    parser.add_argument(
        "--pidfile",
        metavar="FILE",
        help="pid file for the SIGUSR1 fallback (default: the configuration's pid)",
    )
    options = parser.parse_args(list(args))
    config = loadConfig(options.config)

    from lmtp_proxy.control import controlAddress

    address = controlAddress(config)
    shown = displayAddress(address)
    request = f"reload-wait {options.timeout}\n" if options.wait else "reload\n"
    try:
        reply = controlRequest(address, request, options.timeout + REPLY_SLACK)
    except ControlUnreachable as e:
        if options.wait:
            raise CommandError(
                f"cannot reach the control socket {shown} ({e}); --wait needs it: "
                f"is lmtp-proxy running with {config.source}?"
            ) from None
        pidfile = options.pidfile or config.pid
        pid = readPid(pidfile)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise CommandError(
                f"cannot reach the control socket {shown} ({e}), and process {pid} "
                f"from {pidfile} does not exist"
            ) from None
        except OSError as e2:
            raise CommandError(f"cannot signal process {pid} from {pidfile}: {e2.strerror or e2}") from None
        _out(
            f"control socket {shown} not reachable ({e}); sent SIGUSR1 to process {pid} "
            f"from {pidfile} (asynchronous: check the proxy's log)"
        )
        return 0

    word = reply.split(" ", 1)[0]
    if word == "ok":
        _out(reply)
        return 0
    if word in ("error", "timeout"):
        _err(reply)
        return 1
    raise CommandError(f"unexpected reply from the control socket {shown}: {reply!r}")


def statusCommand(args: Sequence[str]) -> int:
    """
    C{lmtp-proxy status}: ask the running proxy, through its control
    socket, what it is doing, and print it for humans or, with C{--json},
    as JSON (the dict of L{lmtp_proxy.status.combine}).
    """
    parser = _subParser(
        "status",
        "Show what the running lmtp-proxy is doing: generation, transactions in "
        "flight by generation and backend, sessions, and per backend its address, "
        "state, pooled and busy connections and last failure, for every process.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    options = parser.parse_args(list(args))
    config = loadConfig(options.config)

    from lmtp_proxy.control import controlAddress
    from lmtp_proxy.status import formatStatus

    address = controlAddress(config)
    shown = displayAddress(address)
    try:
        reply = controlRequest(address, "status-json\n", STATUS_TIMEOUT, MAX_STATUS_REPLY)
    except ControlUnreachable as e:
        raise CommandError(
            f"cannot reach the control socket {shown} ({e}): "
            f"is lmtp-proxy running with {config.source}?"
        ) from None
    word, _, rest = reply.partition(" ")
    if word != "ok":
        raise CommandError(f"unexpected reply from the control socket {shown}: {reply[:200]!r}")
    try:
        status = json.loads(rest)
    except ValueError:
        # A reply cut short (it was longer than the client reads).
        raise CommandError(f"unreadable status from the control socket {shown}") from None
    if options.json:
        _out(json.dumps(status, indent=2, sort_keys=True))
    else:
        for line in formatStatus(status):
            _out(line)
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check": checkCommand,
    "route": routeCommand,
    "reload": reloadCommand,
    "status": statusCommand,
}


def _routingCommand(name: str) -> Callable[[Sequence[str]], int]:
    # The routing-table subcommands live in lmtp_proxy.routecli, imported when used.
    def run(args: Sequence[str]) -> int:
        from lmtp_proxy.routecli import SUBCOMMANDS as routing

        return routing[name](args)

    return run


for _name in ("db", "users", "barrier", "move"):
    SUBCOMMANDS[_name] = _routingCommand(_name)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the C{lmtp-proxy} console script; returns the exit
    status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in SUBCOMMANDS:
            return SUBCOMMANDS[args[0]](args[1:])
        return runProxy(args)
    except CommandError as e:
        _err(str(e))
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # e.g. "lmtp-proxy route ... | head": not an error worth a traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    # "python -m lmtp_proxy.cli": run the imported module's main, whose
    # CommandError is the one the other modules raise (not __main__'s).
    from lmtp_proxy.cli import main as _main

    sys.exit(_main())
