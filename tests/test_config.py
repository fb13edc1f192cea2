"""
Tests for L{lmtp_proxy.config}.
"""

import operator
import os
import socket
import textwrap

from twisted.trial import unittest

from lmtp_proxy import config
from lmtp_proxy.config import Backend, ConfigError, describeChanges, load, parse

SEED = """\
config:
  socket: /var/run/lmtp-proxy.sock
  owner: postfix
  group: mail
  permissions: 0660
  ignoreDomain: false
  fallback_backend: old
backends:
  old:
    socket: /var/run/cyrus/socket/lmtp
  new:
    host: imap-new.example.com
    port: 24
    user: proxy
    password: s3cret
users:
  alice@example.com: new
  Bob@Example.com: old
  carol@example.com: reject
"""


def dedent(text):
    return textwrap.dedent(text).lstrip("\n")


def minimal(extra="", rest=""):
    """
    A valid config: C{extra} lines go into the config section (the first on
    line 3), C{rest} follows it.
    """
    lines = ["config:", "  socket: /run/in.sock"]
    lines += ["  " + line for line in dedent(extra).splitlines() if line.strip()]
    return "\n".join(lines) + "\n" + dedent(rest)


class ParseErrorMixin:
    def assertConfigError(self, text, line, *fragments, source="<string>"):
        """
        Parsing C{text} raises a L{ConfigError} whose one-line message names
        C{source}, C{line} and contains every fragment; returns the message.
        """
        e = self.assertRaises(ConfigError, parse, text, source)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(
            message.startswith(f"{source}, line {line}: "),
            f"expected line {line}: {message!r}",
        )
        self.assertEqual(e.line, line)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class SeedConfigTests(unittest.TestCase):
    """
    The original product's example configuration keeps its meaning.
    """

    def setUp(self):
        self.config = parse(SEED, "seed.yaml")

    def test_unixSocket(self):
        """A string socket is the unix socket path."""
        self.assertEqual(self.config.socket, "/var/run/lmtp-proxy.sock")

    def test_ownerGroup(self):
        """owner and group are kept as given."""
        self.assertEqual((self.config.owner, self.config.group), ("postfix", "mail"))

    def test_permissionsOctal(self):
        """permissions: 0660 is the octal mode 0o660."""
        self.assertEqual(self.config.permissions, 0o660)

    def test_ignoreDomain(self):
        """ignoreDomain is read into ignore_domain."""
        self.assertIs(self.config.ignore_domain, False)
        self.assertIs(parse(minimal("ignoreDomain: yes")).ignore_domain, True)

    def test_fallback(self):
        """fallback_backend names the fallback backend."""
        self.assertEqual(self.config.fallback_backend, "old")

    def test_pidDefault(self):
        """pid defaults to /var/run/lmtp-proxy.pid."""
        self.assertEqual(self.config.pid, "/var/run/lmtp-proxy.pid")

    def test_pidGiven(self):
        """pid may be set."""
        self.assertEqual(parse(minimal("pid: /run/p.pid")).pid, "/run/p.pid")

    def test_source(self):
        """The source name is recorded."""
        self.assertEqual(self.config.source, "seed.yaml")

    def test_backends(self):
        """Backends are read with their settings."""
        self.assertEqual(
            dict(self.config.backends),
            {
                "old": Backend("old", socket="/var/run/cyrus/socket/lmtp"),
                "new": Backend("new", host="imap-new.example.com", port=24, user="proxy", password="s3cret"),
            },
        )

    def test_usersLowercased(self):
        """users keys are lower-cased; values are kept."""
        self.assertEqual(
            dict(self.config.users),
            {"alice@example.com": "new", "bob@example.com": "old", "carol@example.com": "reject"},
        )

    def test_readOnlyMappings(self):
        """backends and users cannot be changed."""
        self.assertRaises(TypeError, operator.setitem, self.config.users, "x", "old")
        self.assertRaises(TypeError, operator.setitem, self.config.backends, "x", None)

    def test_frozen(self):
        """Config attributes cannot be reassigned."""
        self.assertRaises(AttributeError, setattr, self.config, "socket", "/x")

    def test_tcpSocket(self):
        """A [host, port] socket becomes a (str, int) tuple."""
        c = parse("config:\n  socket: [127.0.0.1, 2424]\n")
        self.assertEqual(c.socket, ("127.0.0.1", 2424))

    def test_tcpSocketBlockList(self):
        """A block-style [host, port] list works too."""
        c = parse("config:\n  socket:\n    - localhost\n    - 24\n")
        self.assertEqual(c.socket, ("localhost", 24))

    def test_numericOwner(self):
        """owner and group may be numeric ids."""
        c = parse(minimal("owner: 0\ngroup: 8"))
        self.assertEqual((c.owner, c.group), (0, 8))


class DefaultsTests(unittest.TestCase):
    """
    Optional settings have documented defaults.
    """

    def test_defaults(self):
        """Every optional setting has its default."""
        c = parse(minimal())
        self.assertEqual(
            (c.owner, c.group, c.permissions, c.ignore_domain, c.fallback_backend, c.recipient_delimiter,
             c.connect_timeout, c.command_timeout, c.data_timeout, c.idle_timeout, c.max_message_size,
             c.max_line_length, c.shutdown_grace, c.control_socket, c.pool_size, c.pool_idle_timeout,
             dict(c.backends), dict(c.users)),
            (None, None, None, False, None, "+", 10.0, 60.0, 300.0, 300.0, 0, 65536, 30.0, None, 4, 60.0, {}, {}),
        )

    def test_hostnameDefault(self):
        """hostname defaults to the machine's host name."""
        self.assertEqual(parse(minimal()).hostname, socket.gethostname())

    def test_newKeys(self):
        """The new optional keys are read."""
        c = parse(minimal("""
            recipient_delimiter: "+-"
            hostname: mx.example.com
            connect_timeout: 2.5
            command_timeout: 30
            data_timeout: 599
            idle_timeout: 120
            max_message_size: 1048576
            max_line_length: 1000
            shutdown_grace: 0
            control_socket: /run/ctl.sock
            pool_size: 4
            pool_idle_timeout: 15
        """))
        self.assertEqual(
            (c.recipient_delimiter, c.hostname, c.connect_timeout, c.command_timeout, c.data_timeout,
             c.idle_timeout, c.max_message_size, c.max_line_length, c.shutdown_grace, c.control_socket,
             c.pool_size, c.pool_idle_timeout),
            ("+-", "mx.example.com", 2.5, 30.0, 599.0, 120.0, 1048576, 1000, 0.0, "/run/ctl.sock", 4, 15.0),
        )

    def test_emptyDelimiter(self):
        """recipient_delimiter: '' turns delimiters off."""
        self.assertEqual(parse(minimal("recipient_delimiter: ''")).recipient_delimiter, "")

    def test_permissionsQuoted(self):
        """A quoted '0660' or 0o660 string is octal too."""
        self.assertEqual(parse(minimal("permissions: '0660'")).permissions, 0o660)
        self.assertEqual(parse(minimal("permissions: 0o640")).permissions, 0o640)

    def test_emptySections(self):
        """Empty backends and users sections are allowed."""
        c = parse(minimal(rest="backends:\nusers:\n"))
        self.assertEqual((dict(c.backends), dict(c.users)), ({}, {}))

    def test_onlyRejectWithoutBackends(self):
        """Without backends, every user may map to reject."""
        c = parse(minimal("fallback_backend: reject", "users:\n  a: reject\n"))
        self.assertEqual((dict(c.users), c.fallback_backend), ({"a": "reject"}, "reject"))

    def test_sameBackendDifferentCase(self):
        """Keys differing only by case are fine when they agree."""
        c = parse(minimal(rest="backends:\n  b: {socket: /s}\nusers:\n  A@x: b\n  a@X: b\n"))
        self.assertEqual(dict(c.users), {"a@x": "b"})

    def test_userKeyForms(self):
        """user@domain, localpart and @domain keys are accepted."""
        c = parse(minimal(rest="users:\n  a@x.org: reject\n  b: reject\n  '@y.org': reject\n  yes: reject\n"))
        self.assertEqual(sorted(c.users), ["@y.org", "a@x.org", "b", "yes"])

    def test_usersNotInRepr(self):
        """repr() of a config leaves out the (possibly huge) users table."""
        self.assertNotIn("alice", repr(parse(SEED)))


class BackendTests(unittest.TestCase):
    """
    L{Backend} hides credentials.
    """

    backend = Backend("new", host="imap.example.com", port=24, user="proxy", password="s3cret")

    def test_passwordNotInRepr(self):
        """The password is not in repr()."""
        self.assertNotIn("s3cret", repr(self.backend))
        self.assertIn("proxy", repr(self.backend))

    def test_describeHost(self):
        """describe() gives host:port and no credentials."""
        self.assertEqual(self.backend.describe(), "imap.example.com:24")

    def test_describeUnix(self):
        """describe() gives unix:/path for a unix socket backend."""
        self.assertEqual(Backend("old", socket="/run/lmtp").describe(), "unix:/run/lmtp")

    def test_describeIPv6(self):
        """describe() brackets IPv6 literals."""
        self.assertEqual(Backend("v6", host="::1", port=24).describe(), "[::1]:24")

    def test_socketWins(self):
        """A backend with socket may also carry host/port (ignored, as before)."""
        c = parse(minimal(rest="backends:\n  b: {socket: /s, host: h, port: 24}\n"))
        self.assertEqual(c.backends["b"].describe(), "unix:/s")


class ErrorTests(ParseErrorMixin, unittest.TestCase):
    """
    Each mistake gives a one-line error naming the key and line.
    """

    def test_yamlSyntax(self):
        """A YAML syntax error names the file and line."""
        self.assertConfigError("config:\n  socket: /x\n  owner: [a\n", 4, "YAML syntax error", source="f.yaml")

    def test_yamlTab(self):
        """A tab in indentation is reported with its line."""
        self.assertConfigError("config:\n  socket: /x\n\towner: a\n", 3, "YAML syntax error")

    def test_multipleDocuments(self):
        """More than one YAML document is an error."""
        self.assertConfigError("config: {socket: /x}\n---\nconfig: {socket: /y}\n", 2, "single document")

    def test_emptyFile(self):
        """An empty file is an error without a line."""
        e = self.assertRaises(ConfigError, parse, "", "f.yaml")
        self.assertEqual(str(e), "f.yaml: the file is empty; a 'config' section is required")

    def test_topNotMapping(self):
        """The top level must be a mapping."""
        self.assertConfigError("- a\n- b\n", 1, "must be a mapping")

    def test_missingConfig(self):
        """The config section is required."""
        self.assertConfigError("backends: {}\n", 1, "config: missing required section")

    def test_unknownTopLevel(self):
        """Unknown top-level keys are named with a suggestion."""
        self.assertConfigError(minimal(rest="user:\n  a: reject\n"), 3, "user: unknown key (did you mean 'users'?)")

    def test_unknownConfigKey(self):
        """Unknown config keys are named with a suggestion."""
        self.assertConfigError(minimal("ignore_domain: true"), 3, "config.ignore_domain: unknown key (did you mean 'ignoreDomain'?)")

    def test_unknownKeyCase(self):
        """A key differing only by case suggests the right spelling."""
        self.assertConfigError(minimal("ignoredomain: true"), 3, "did you mean 'ignoreDomain'?")

    def test_unknownKeyNoSuggestion(self):
        """An unknown key with no close match has no suggestion."""
        m = self.assertConfigError(minimal("zzzzqqq: 1"), 3, "config.zzzzqqq: unknown key")
        self.assertNotIn("did you mean", m)

    def test_unknownBackendKey(self):
        """Unknown backend keys are named with a suggestion."""
        self.assertConfigError(
            minimal(rest="backends:\n  b:\n    socket: /s\n    passwd: x\n"),
            6, "backends.b.passwd: unknown key (did you mean 'password'?)",
        )

    def test_duplicateKey(self):
        """A key given twice is an error."""
        self.assertConfigError(minimal("pid: /a\npid: /b"), 4, "config.pid: duplicate key")

    def test_configNotMapping(self):
        """config must be a mapping."""
        self.assertConfigError("config: /x\n", 1, "config: must be a mapping")

    def test_socketMissing(self):
        """config.socket is required."""
        self.assertConfigError("config:\n  pid: /p\n", 2, "config.socket: missing required key")

    def test_socketDict(self):
        """A mapping socket is a type error."""
        self.assertConfigError("config:\n  socket: {path: /x}\n", 2, "config.socket: must be a unix socket path or a list [host, port], not a mapping")

    def test_socketNumber(self):
        """A number socket is a type error."""
        self.assertConfigError("config:\n  socket: 24\n", 2, "config.socket: must be a unix socket path or a list [host, port]")

    def test_socketListLength(self):
        """A socket list needs exactly two items."""
        self.assertConfigError("config:\n  socket: [a, 1, 2]\n", 2, "config.socket: ", "list of 3 items")

    def test_socketPortRange(self):
        """A listening port must be in 1..65535."""
        self.assertConfigError("config:\n  socket: [a, 70000]\n", 2, "config.socket[1]: port must be a whole number from 1 to 65535")

    def test_socketPortString(self):
        """A listening port must be a number."""
        self.assertConfigError("config:\n  socket:\n    - a\n    - lmtp\n", 4, "config.socket[1]: port must be")

    def test_socketHostType(self):
        """A listening host must be a string."""
        self.assertConfigError("config:\n  socket: [[a], 24]\n", 2, "config.socket[0]: must be a single value")

    def test_permissionsDecimal(self):
        """permissions: 660 is refused: it must be octal."""
        self.assertConfigError(minimal("permissions: 660"), 3, "config.permissions: permissions must be octal, e.g. 0660")

    def test_permissionsTooBig(self):
        """permissions above 07777 are refused."""
        self.assertConfigError(minimal("permissions: 017777"), 3, "config.permissions: permissions must be at most 07777")

    def test_permissionsString(self):
        """permissions: rw-rw---- is refused."""
        self.assertConfigError(minimal("permissions: rw-rw----"), 3, "config.permissions: permissions must be octal")

    def test_ownerType(self):
        """owner must be a name or id."""
        self.assertConfigError(minimal("owner: -1"), 3, "config.owner: must be a name or a numeric id")

    def test_groupList(self):
        """group must be a single value, not a list."""
        self.assertConfigError(minimal("group: [a]"), 3, "config.group: must be a single value, not a list")

    def test_ignoreDomainType(self):
        """ignoreDomain must be a boolean."""
        self.assertConfigError(minimal("ignoreDomain: 1"), 3, "config.ignoreDomain: must be true or false")

    def test_fallbackUnknown(self):
        """fallback_backend must name a backend or reject."""
        self.assertConfigError(
            minimal("fallback_backend: nwe", "backends:\n  new: {socket: /s}\n"),
            3, "config.fallback_backend: backend 'nwe' is not defined (did you mean 'new'?)",
        )

    def test_timeoutNegative(self):
        """Timeouts must be greater than zero."""
        self.assertConfigError(minimal("connect_timeout: -1"), 3, "config.connect_timeout: must be a finite number greater than zero")

    def test_timeoutZero(self):
        """A zero command_timeout is refused."""
        self.assertConfigError(minimal("command_timeout: 0"), 3, "config.command_timeout: must be a finite number greater than zero")

    def test_timeoutInfinite(self):
        """An infinite idle_timeout is refused."""
        self.assertConfigError(minimal("idle_timeout: .inf"), 3, "config.idle_timeout: must be a finite number")

    def test_timeoutType(self):
        """A timeout must be a number."""
        self.assertConfigError(minimal("pool_idle_timeout: soon"), 3, "config.pool_idle_timeout: must be a number of seconds")

    def test_shutdownGraceNegative(self):
        """shutdown_grace may be zero but not negative."""
        self.assertConfigError(minimal("shutdown_grace: -5"), 3, "config.shutdown_grace: must be a finite number zero or more")

    def test_dataTimeoutPostfix(self):
        """data_timeout of 600 or more is refused, explaining Postfix's limit."""
        self.assertConfigError(minimal("data_timeout: 600"), 3, "config.data_timeout: must be less than 600 seconds", "lmtp_data_done_timeout")

    def test_maxMessageSizeNegative(self):
        """max_message_size must not be negative."""
        self.assertConfigError(minimal("max_message_size: -1"), 3, "config.max_message_size: must be at least 0")

    def test_maxMessageSizeFloat(self):
        """max_message_size must be a whole number."""
        self.assertConfigError(minimal("max_message_size: 1.5"), 3, "config.max_message_size: must be a whole number")

    def test_maxLineLengthSmall(self):
        """max_line_length must allow RFC 5321's 1000-byte lines."""
        self.assertConfigError(minimal("max_line_length: 999"), 3, "config.max_line_length: must be at least 1000")

    def test_poolSizeType(self):
        """pool_size must be a whole number, not a boolean."""
        self.assertConfigError(minimal("pool_size: true"), 3, "config.pool_size: must be a whole number")

    def test_delimiterNull(self):
        """An empty recipient_delimiter value explains how to turn it off."""
        self.assertConfigError(minimal("recipient_delimiter:"), 3, "config.recipient_delimiter: ", "use ''")

    def test_delimiterAt(self):
        """@ cannot be a recipient delimiter."""
        self.assertConfigError(minimal("recipient_delimiter: '+@'"), 3, "config.recipient_delimiter: must not contain '@'")

    def test_hostnameSpaces(self):
        """hostname must not contain spaces."""
        self.assertConfigError(minimal("hostname: my host"), 3, "config.hostname: must be a host name without spaces")

    def test_pidEmpty(self):
        """pid must not be an empty string."""
        self.assertConfigError(minimal("pid: ''"), 3, "config.pid: must not be empty")

    def test_controlSocketType(self):
        """control_socket must be a string."""
        self.assertConfigError(minimal("control_socket: 5"), 3, "config.control_socket: must be a string")

    def test_unsupportedTag(self):
        """Python-specific YAML tags are refused, not executed."""
        self.assertConfigError(minimal("pid: !!python/name:os.system x"), 3, "config.pid: unsupported YAML tag")

    def test_backendsNotMapping(self):
        """backends must be a mapping."""
        self.assertConfigError(minimal(rest="backends: [a]\n"), 3, "backends: must be a mapping")

    def test_backendReserved(self):
        """A backend named reject is refused."""
        self.assertConfigError(minimal(rest="backends:\n  Reject: {socket: /s}\n"), 4, "backends.Reject: 'reject' is a reserved backend name")

    def test_backendNotMapping(self):
        """A backend entry must be a mapping."""
        self.assertConfigError(minimal(rest="backends:\n  b: /s\n"), 4, "backends.b: must be a mapping")

    def test_backendNoAddress(self):
        """A backend needs socket or host and port."""
        self.assertConfigError(minimal(rest="backends:\n  b:\n    user: u\n    password: p\n"), 4, "backends.b.host: missing")

    def test_backendNoPort(self):
        """A host without port is refused."""
        self.assertConfigError(minimal(rest="backends:\n  b:\n    host: h\n"), 4, "backends.b.port: missing")

    def test_backendPortRange(self):
        """A backend port must be in 1..65535."""
        self.assertConfigError(minimal(rest="backends:\n  b:\n    host: h\n    port: 0\n"), 6, "backends.b.port: port must be a whole number from 1 to 65535")

    def test_backendHostType(self):
        """A backend host must be a string."""
        self.assertConfigError(minimal(rest="backends:\n  b:\n    host: [h]\n    port: 24\n"), 5, "backends.b.host: must be a single value")

    def test_backendUserWithoutPassword(self):
        """user without password is refused."""
        self.assertConfigError(minimal(rest="backends:\n  b:\n    socket: /s\n    user: u\n"), 6, "backends.b.password: missing; 'user' is set")

    def test_backendPasswordWithoutUser(self):
        """password without user is refused, without showing the password."""
        m = self.assertConfigError(minimal(rest="backends:\n  b:\n    socket: /s\n    password: s3cret\n"), 6, "backends.b.user: missing; 'password' is set")
        self.assertNotIn("s3cret", m)

    def test_usersNotMapping(self):
        """users must be a mapping."""
        self.assertConfigError(minimal(rest="users: [a]\n"), 3, "users: must be a mapping")

    def test_userUnknownBackend(self):
        """A user mapped to an unknown backend is named with a suggestion."""
        self.assertConfigError(
            minimal(rest="backends:\n  new: {socket: /s}\nusers:\n  alice@x: nwe\n"),
            6, "users.alice@x: backend 'nwe' is not defined (did you mean 'new'?)",
        )

    def test_userRejectTypo(self):
        """A misspelt reject suggests reject."""
        self.assertConfigError(
            minimal(rest="backends:\n  new: {socket: /s}\nusers:\n  a: rejcet\n"),
            6, "users.a: backend 'rejcet' is not defined (did you mean 'reject'?)",
        )

    def test_userUnknownBackendNoBackends(self):
        """Without backends, only reject is available."""
        self.assertConfigError(minimal(rest="users:\n  a: old\n"), 4, "users.a: backend 'old' is not defined (no backends are defined")

    def test_userNoBackend(self):
        """A user with an empty value is refused."""
        self.assertConfigError(minimal(rest="users:\n  a:\n"), 4, "users.a: must name a backend")

    def test_userBadKey(self):
        """A user key ending in @ is refused."""
        self.assertConfigError(minimal(rest="users:\n  'a@': reject\n"), 4, "users.a@: not a valid user key")

    def test_userCaseConflict(self):
        """Keys differing only by case must not map to different backends."""
        self.assertConfigError(
            minimal(rest="backends:\n  b: {socket: /s}\nusers:\n  a@x: b\n  A@X: reject\n"),
            7, "users.A@X: maps to 'reject' but 'a@x' (line 6) maps to 'b'",
        )


class LoadTests(ParseErrorMixin, unittest.TestCase):
    """
    L{load} reads files.
    """

    def test_load(self):
        """load() parses the file and records its path."""
        path = self.mktemp()
        with open(path, "w") as f:
            # load() refuses a password to a TCP backend in clear unless
            # allowed (tests.test_tls.SecurityConfigTests).
            f.write(SEED.replace("    password: s3cret\n", "    password: s3cret\n    allow_plaintext_auth: true\n"))
        c = load(path)
        self.assertEqual((c.source, c.socket), (path, "/var/run/lmtp-proxy.sock"))

    def test_loadErrorNamesFile(self):
        """Errors from load() name the file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("config:\n  socket: /x\n  sokcet: /y\n")
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}, line 3: config.sokcet: unknown key (did you mean 'socket'?)")

    def test_missingFile(self):
        """A missing file is a ConfigError, not a traceback."""
        path = self.mktemp()
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}: cannot read the file: No such file or directory")

    def test_notUtf8(self):
        """A file that is not UTF-8 is a ConfigError."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"config:\n  socket: /\xff\n")
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("not valid UTF-8", str(e))

    def test_directory(self):
        """A directory is a ConfigError."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertIn("cannot read the file", str(self.assertRaises(ConfigError, load, path)))


class DescribeChangesTests(unittest.TestCase):
    """
    L{describeChanges} summarises a reload in one line.
    """

    def config(self, users, backends="  old: {socket: /o}\n  new: {socket: /n}\n", extra=""):
        text = minimal(extra, "backends:\n" + backends + "users:\n" + "".join(f"  {k}: {v}\n" for k, v in users.items()))
        return parse(text)

    def test_nothing(self):
        """No change gives zero counts."""
        c = self.config({"a": "old"})
        self.assertEqual(describeChanges(c, c), "users: 0 added, 0 removed, 0 moved; backends: 0 added, 0 removed, 0 changed")

    def test_users(self):
        """Users added, removed and moved are counted."""
        old = self.config({"a": "old", "b": "old", "c": "old"})
        new = self.config({"a": "new", "b": "old", "d": "new", "e": "reject"})
        self.assertEqual(describeChanges(old, new), "users: 2 added, 1 removed, 1 moved; backends: 0 added, 0 removed, 0 changed")

    def test_backends(self):
        """Backends added, removed and changed are counted."""
        old = self.config({}, "  old: {socket: /o}\n  gone: {socket: /g}\n")
        new = self.config({}, "  old: {socket: /o2}\n  x: {socket: /x}\n  y: {socket: /y}\n")
        self.assertEqual(describeChanges(old, new), "users: 0 added, 0 removed, 0 moved; backends: 2 added, 1 removed, 1 changed")

    def test_listener(self):
        """A listener change says it needs a restart."""
        old = self.config({})
        new = self.config({}, extra="permissions: 0600")
        self.assertEqual(
            describeChanges(old, new),
            "users: 0 added, 0 removed, 0 moved; backends: 0 added, 0 removed, 0 changed; "
            "needs a restart to change: permissions",
        )

    def test_settings(self):
        """Other changed settings are listed."""
        old = self.config({})
        new = self.config({}, extra="fallback_backend: old\ndata_timeout: 100")
        self.assertTrue(describeChanges(old, new).endswith("; settings changed: fallback_backend, data_timeout"))


class PerformanceTests(unittest.TestCase):
    """
    Large users tables parse quickly.
    """

    def test_manyUsers(self):
        """20,000 users parse with every key lower-cased."""
        lines = ["config:", "  socket: /s", "backends:", "  b: {socket: /b}", "users:"]
        lines += [f"  User{i}@Example.com: b" for i in range(20000)]
        c = parse("\n".join(lines))
        self.assertEqual((len(c.users), c.users["user19999@example.com"]), (20000, "b"))

    def test_libyaml(self):
        """The libyaml parser is used when available."""
        import yaml

        if not yaml.__with_libyaml__:
            raise unittest.SkipTest("PyYAML built without libyaml")
        self.assertIs(config._Loader, yaml.CSafeLoader)


class MetricsKeyTests(ParseErrorMixin, unittest.TestCase):
    """
    C{config.metrics}: where the Prometheus metrics are served.
    """

    def test_absent(self):
        """Without the key there is no metrics listener."""
        self.assertIsNone(parse(minimal()).metrics)

    def test_hostAndPort(self):
        """A list [host, port] is a TCP listener."""
        self.assertEqual(
            parse(minimal("metrics: [127.0.0.1, 9125]")).metrics, ("127.0.0.1", 9125)
        )

    def test_unixPath(self):
        """A string is a unix socket path."""
        self.assertEqual(parse(minimal("metrics: /run/m.sock")).metrics, "/run/m.sock")

    def test_badPort(self):
        """A port out of range is one error naming the key."""
        self.assertConfigError(
            minimal("metrics: [127.0.0.1, 70000]"), 3, "config.metrics[1]"
        )

    def test_needsRestart(self):
        """Changing it is reported as needing a restart."""
        old = parse(minimal("metrics: [127.0.0.1, 9125]"))
        new = parse(minimal("metrics: [127.0.0.1, 9126]"))
        self.assertIn("needs a restart to change: metrics", describeChanges(old, new))
