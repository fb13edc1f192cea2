"""
Who may deliver: the client addresses C{allowed_clients} lets in, the SASL
users file (one C{name:hash} a line, the hash verified by bcrypt) checked by
a C{twisted.cred} checker, and the growing delay after failed logins.
"""

import functools
import ipaddress

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lmtp_proxy.config import ConfigError


@functools.lru_cache(maxsize=16)
def _networks(allowed):
    return tuple(ipaddress.ip_network(n) for n in allowed)


def peerAllowed(allowed, address):
    """
    Whether a client at C{address} (an L{IAddress}) may connect when
    C{allowed_clients} is C{allowed} (network texts, or C{None}: everyone).
    Unix socket clients always may.
    """
    if allowed is None or not isinstance(address, (IPv4Address, IPv6Address)):
        return True
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(allowed))


def readUsersFile(path, source="<config>"):
    """
    The SASL users of the file C{path}: one C{name:hash} a line; empty
    lines and lines starting with C{#} are skipped. A hash is bcrypt's
    (C{$2b$...}, also with Dovecot's C{{BLF-CRYPT}} prefix).

    @return: a L{dict} of names (L{bytes}) to hashes (L{bytes}).
    @raise ConfigError: for a file that cannot be read, or a bad line (the
        message names the line, never its hash).
    """
    try:
        import bcrypt  # noqa: F401 verify() needs it
    except ImportError:
        raise ConfigError(
            source, None, "config.auth",
            "SASL needs the optional libraries: pip install 'lmtp-proxy[tls]'",
        ) from None
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(
            source, None, "config.auth.users_file",
            "cannot read %s: %s" % (path, e.strerror or e),
        ) from None
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        name, _, hashed = line.partition(b":")
        if hashed.startswith(b"{BLF-CRYPT}"):
            hashed = hashed[len(b"{BLF-CRYPT}"):]
        if not name or not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
            raise ConfigError(
                "%s (config.auth.users_file)" % (path,), number, None,
                "not a 'name:bcrypt hash' line",
            )
        users[name] = hashed
    return users


_unknown = []


def _unknownHash(cost):
    """
    A real hash of the given cost, checked for a name that does not exist,
    so that its answer takes as long as a wrong password's and says nothing
    about which part was wrong (an invalid hash would be refused at once).
    """
    import bcrypt

    for known, hashed in _unknown:
        if known == cost:
            return hashed
    hashed = bcrypt.hashpw(b"", bcrypt.gensalt(cost))
    _unknown.append((cost, hashed))
    return hashed


def _cost(users):
    """
    The bcrypt cost of the users file's first hash ("$2b$12$..."), 12 if
    there is none.
    """
    for hashed in users.values():
        cost = hashed[4:6]
        if cost.isdigit():
            return int(cost)
    return 12


def _verify(hashed, password, unknownCost):
    import bcrypt

    if hashed is None:
        bcrypt.checkpw(password, _unknownHash(unknownCost))
        return False
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """
    Checks a SASL login against the users file of the configuration in
    force (read again for each new configuration), in the reactor's thread
    pool: a bcrypt check takes a quarter of a second of CPU.
    """

    credentialInterfaces = (IUsernamePassword,)
    # A bcrypt check takes about a quarter of a second of one core.
    THREADS = 2
    MAX_PENDING = 8

    def __init__(self, reactor, getConfig):
        self._reactor = reactor
        self._getConfig = getConfig
        self._config = None
        self._users = {}
        self._checking = 0
        self._pool = None

    def _threadPool(self):
        if self._pool is None:
            self._pool = ThreadPool(0, self.THREADS, name="lmtp-proxy bcrypt")
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return self._pool

    def _usersFor(self, config):
        if config is not self._config:
            self._users = readUsersFile(config.auth_users_file, config.source)
            self._config = config
        return self._users

    def requestAvatarId(self, credentials):
        """
        See L{ICredentialsChecker.requestAvatarId}.

        @return: a L{Deferred} firing with the login name (L{bytes}) or
            failing with L{UnauthorizedLogin}.
        """
        config = self._getConfig()
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        users = self._usersFor(config) if config.auth_users_file else {}
        hashed = users.get(username)
        if self._checking >= self.MAX_PENDING:
            # Refused without a check: a flood of AUTH must not queue up
            # seconds of bcrypt, nor starve the reactor's own thread pool
            # (name lookups, reloads), which is why the checks have theirs.
            return defer.fail(CheckerBusy())
        self._checking += 1
        checking = deferToThreadPool(
            self._reactor, self._threadPool(), _verify, hashed, password, _cost(users)
        )

        def done(result):
            self._checking -= 1
            return result

        checking.addBoth(done)

        def checked(valid):
            if valid and hashed is not None:
                return username
            raise UnauthorizedLogin()

        return checking.addCallback(checked)


class CheckerBusy(Exception):
    """
    Too many logins are being checked already; the client may try again.
    """


class FailureDelays:
    """
    How long to wait before answering a failed login: one second after the
    first failure from an address, doubling with each further one up to
    L{LIMIT}; an address with no failure for L{FORGET} seconds starts
    again.
    """

    LIMIT = 30.0
    FORGET = 900.0
    # Addresses remembered; the oldest are forgotten past this.
    SIZE = 10000

    def __init__(self, clock):
        self._clock = clock
        self._failures = {}

    def failed(self, address):
        """
        Record a failure from C{address}; return the delay it earns.
        """
        now = self._clock.seconds()
        count, last = self._failures.pop(address, (0, now))
        if now - last > self.FORGET:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        if len(self._failures) > self.SIZE:
            del self._failures[next(iter(self._failures))]
        return min(2.0 ** (count - 1), self.LIMIT)

    def succeeded(self, address):
        """
        A successful login from C{address} ends its count.
        """
        self._failures.pop(address, None)
