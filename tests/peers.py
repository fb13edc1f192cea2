"""
Fixtures for end-to-end tests against real third-party mail software.

Plain, blocking Python built on subprocess: every peer (Dovecot LMTP
backends, Postfix's smtp-sink, a private Postfix instance, swaks) and the
proxy itself (the installed ``twistd -n lmtp-proxy`` entry point) run as
separate processes, so a ``twisted.trial.unittest.TestCase`` can drive them
synchronously.

Rules every fixture follows:

 - every server listens on 127.0.0.1 or on a unix socket, never elsewhere;
 - every server's PID is known (we started it in the foreground, or we read
   its own pid file) and it is stopped by that PID: SIGTERM, wait, SIGKILL.
   Nothing is ever stopped by name;
 - stopping is registered with the test case's ``addCleanup`` as soon as the
   process exists, so a failing test never leaks a server;
 - all files live in a private temporary directory below /tmp (short paths:
   unix socket paths are limited to 108 bytes), removed at cleanup unless
   ``LMTP_E2E_KEEP=1`` is set in the environment.

The peers are installed by ``tools/install-peers.sh``. When one is missing a
test is skipped (naming the Debian package), or fails when ``CI=true``.
"""

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import FailTest, SkipTest

from tests.lmtpclient import connect

HARNESS_USER = "lmtpharness"

# command (or absolute path) -> Debian package providing it
PACKAGES = {
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "postfix": "postfix",
    "postqueue": "postfix",
    "postconf": "postfix",
    "swaks": "swaks",
    "dovecot": "dovecot-core",
    "doveconf": "dovecot-core",
    "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
    "/usr/lib/cyrus/bin/master": "cyrus-imapd",
    "/usr/lib/cyrus/bin/lmtpd": "cyrus-imapd",
    "saslpasswd2": "sasl2-bin",
}

# what each fixture needs
DOVECOT_COMMANDS = ("dovecot", "doveconf", "/usr/lib/dovecot/lmtp")
SINK_COMMANDS = ("smtp-sink",)
POSTFIX_COMMANDS = ("postfix", "postqueue")

_SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin"])


# ---------------------------------------------------------------------------
# availability

def _which(command):
    if command.startswith("/"):
        return command if os.access(command, os.X_OK) else None
    return shutil.which(command, path=_SBIN_PATH)


def _unavailable(reason):
    """
    Skip, or fail when running under CI (CI=true), where a missing peer
    means a broken build environment rather than a developer's laptop.
    """
    if os.environ.get("CI") == "true":
        raise FailTest("CI=true and " + reason)
    raise SkipTest(reason)


def requirePeer(*commands):
    """
    Make sure the given peer commands exist (and that we can run them: the
    peers need root to switch to the throwaway user). Raises SkipTest naming
    the Debian package(s), or FailTest under CI=true.

    @return: dict command -> absolute path
    """
    found, missing = {}, []
    for command in commands:
        path = _which(command)
        if path is None:
            missing.append("%s (Debian package %s)"
                           % (command, PACKAGES.get(command, command)))
        else:
            found[command] = path
    if missing:
        _unavailable("missing peer command(s): %s; install them with "
                     "tools/install-peers.sh" % ", ".join(missing))
    if os.geteuid() != 0:
        _unavailable("the real-peer tests run Dovecot/Postfix/smtp-sink "
                     "instances that switch users, so they need root")
    return found


def ensureHarnessUser():
    """
    Create the throwaway system user that owns delivered mail and that
    smtp-sink switches to. Returns its passwd entry.
    """
    try:
        return pwd.getpwnam(HARNESS_USER)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
         HARNESS_USER],
        check=False, capture_output=True, env=dict(os.environ, PATH=_SBIN_PATH))
    try:
        return pwd.getpwnam(HARNESS_USER)
    except KeyError:
        _unavailable("cannot create the system user %r" % (HARNESS_USER,))


# ---------------------------------------------------------------------------
# small helpers

def freePort():
    """A currently free TCP port on 127.0.0.1."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def tempDir(testcase, prefix="lmtpe2e-"):
    """
    A private, world-traversable (0755) directory under /tmp, removed when
    the test ends (registered first, so it is removed after every server
    started later has been stopped). Paths stay short for unix sockets.
    """
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    if os.environ.get("LMTP_E2E_KEEP") != "1":
        testcase.addCleanup(shutil.rmtree, d, True)
    return d


def targetFor(port=None, socket=None, host="127.0.0.1"):
    """(host, port) for TCP or a path string for a unix socket."""
    if socket is not None:
        return socket
    return (host, port)


def canConnect(target):
    try:
        s = connect(target, timeout=1.0)
    except OSError:
        return False
    s.close()
    return True


def waitFor(predicate, timeout, interval=0.05, what="condition"):
    """Poll predicate() until it is true; FailTest after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise FailTest("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def pidAlive(pid):
    """True if pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % (pid,), "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def stopPid(pid, timeout=10.0, popen=None):
    """
    Stop one process by its PID: SIGTERM, wait up to timeout seconds, then
    SIGKILL. If popen (the subprocess.Popen of that pid) is given it is
    reaped as well.
    """
    if pid is None:
        return
    def alive():
        if popen is not None and popen.pid == pid:
            return popen.poll() is None
        return pidAlive(pid)
    if not alive():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def readPidFile(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _tail(path, limit=4000):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "(no %s)" % (path,)
    return data[-limit:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# swaks

def swaks(target, args=(), pipeline=False, timeout=60):
    """
    Run swaks in LMTP mode against (host, port) or a unix socket path.
    Returns the CompletedProcess; stdout has the whole conversation (stderr
    is merged into it).
    """
    requirePeer("swaks")
    cmd = [_which("swaks"), "--protocol", "LMTP"]
    if isinstance(target, str):
        cmd += ["--socket", target]
    else:
        cmd += ["--server", target[0], "--port", str(target[1])]
    if pipeline:
        cmd.append("--pipeline")
    cmd += ["--helo", "swaks.e2e.test", "--timeout", "30"]
    cmd += list(args)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True,
                          errors="replace", timeout=timeout)


def swaksReplies(output):
    """The server reply lines ("250 ...") of a swaks conversation."""
    out = []
    for line in output.splitlines():
        for prefix in ("<-  ", "<~  ", "<** ", "<-", "<**"):
            if line.startswith(prefix):
                out.append(line[len(prefix):].strip())
                break
    return out


# ---------------------------------------------------------------------------
# Dovecot LMTP backend

class DovecotBackend(object):
    """
    An independent Dovecot instance that only runs LMTP delivery: its own
    dovecot.conf, base_dir, instance name and hostname NAME.test (the
    greeting shows which backend answered). Any user exists; mail for
    user@domain lands in DIR/mail/domain/user/Maildir, owned by
    lmtpharness. Listens on 127.0.0.1:port and/or a unix socket (mode
    0666); with neither given it gets DIR/lmtp.sock.

    Runs in the foreground (dovecot -F) as our child; stopped by its PID.
    """

    def __init__(self, testcase, name, port=None, socket=None, tcp=False,
                 ssl=None, sslPort=None, users=None, trusted=None):
        """
        ssl=(certificate file, key file) sets ssl = required, with
        STARTTLS on the listeners; sslPort adds a listener that speaks TLS
        from the first byte.

        users lists the only addresses that exist (a passwd-file userdb;
        default: every address). trusted sets login_trusted_networks (its
        LHLO then offers XCLIENT to them) and names the remote address in
        each log line as rip=...
        """
        self.users = users
        self.trusted = trusted
        requirePeer(*DOVECOT_COMMANDS)
        self.ssl = ssl
        self.sslPort = sslPort
        self.user = ensureHarnessUser()
        self.name = name
        self.dir = tempDir(testcase, "lmtpe2e-%s-" % (name,))
        if tcp and port is None:
            port = freePort()
        if port is None and socket is None:
            socket = os.path.join(self.dir, "lmtp.sock")
        self.port = port
        self.socket = socket
        self.mailroot = os.path.join(self.dir, "mail")
        self.logPath = os.path.join(self.dir, "log", "dovecot.log")
        for d in ("run", "state", "log", "mail"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        os.chown(self.mailroot, self.user.pw_uid, self.user.pw_gid)
        self.confPath = os.path.join(self.dir, "dovecot.conf")
        with open(self.confPath, "w") as f:
            f.write(self._config())
        check = subprocess.run(["doveconf", "-c", self.confPath, "-n"],
                               capture_output=True, text=True,
                               env=dict(os.environ, PATH=_SBIN_PATH))
        if check.returncode != 0:
            raise FailTest("bad dovecot config %s: %s"
                           % (self.confPath, check.stderr))
        self._stderr = open(os.path.join(self.dir, "log", "stderr"), "wb")
        testcase.addCleanup(self._stderr.close)
        self.process = subprocess.Popen(
            [_which("dovecot"), "-F", "-c", self.confPath],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            start_new_session=True, env=dict(os.environ, PATH=_SBIN_PATH))
        self.pid = self.process.pid
        testcase.addCleanup(self.stop)
        self._waitUp()

    def _config(self):
        listeners = []
        if self.port is not None:
            listeners.append("  inet_listener lmtp {\n"
                             "    address = 127.0.0.1\n"
                             "    port = %d\n  }" % (self.port,))
        if self.socket is not None:
            listeners.append("  unix_listener %s {\n"
                             "    mode = 0666\n  }" % (self.socket,))
        if self.sslPort is not None:
            listeners.append("  inet_listener lmtps {\n"
                             "    address = 127.0.0.1\n"
                             "    port = %d\n    ssl = yes\n  }" % (self.sslPort,))
        ssl = "ssl = no"
        if self.ssl is not None:
            ssl = "ssl = required\nssl_cert = <%s\nssl_key = <%s" % self.ssl
        u = self.user.pw_name
        userdb = ("  driver = static\n"
                  "  args = uid={u} gid={u} home={mail}/%Ld/%Ln allow_all_users=yes"
                  .format(u=u, mail=self.mailroot))
        if self.users is not None:
            path = os.path.join(self.dir, "users")
            with open(path, "w") as f:
                for address in self.users:
                    local, domain = address.lower().rsplit("@", 1)
                    f.write("%s::%d:%d::%s/%s/%s::\n" % (
                        address.lower(), self.user.pw_uid, self.user.pw_gid,
                        self.mailroot, domain, local))
            userdb = "  driver = passwd-file\n  args = username_format=%Lu " + path
        extra = ""
        if self.trusted is not None:
            extra = ("login_trusted_networks = %s\n"
                     "mail_log_prefix = \"%%s(%%u)<%%{pid}><%%{session}> rip=%%{rip}: \"\n"
                     % (self.trusted,))
        return """\
# generated by tests/peers.py: Dovecot LMTP delivery backend {name!r}
instance_name = e2e-{name}-{pid}
hostname = {name}.test
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/log/dovecot.log
info_log_path = {dir}/log/dovecot.log
protocols = lmtp
listen = 127.0.0.1
{ssl}
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
auth_mechanisms = plain
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
{userdb}
}}
mail_location = maildir:~/Maildir
lmtp_save_to_detail_mailbox = no
{extra}service lmtp {{
{listeners}
}}
service doveadm {{
  inet_listener {{
    port = 0
  }}
}}
""".format(name=self.name, pid=os.getpid(), dir=self.dir, u=u,
           mail=self.mailroot, listeners="\n".join(listeners), ssl=ssl,
           userdb=userdb, extra=extra)

    def _waitUp(self, timeout=15):
        def up():
            if self.process.poll() is not None:
                raise FailTest("dovecot %s exited with %s: %s %s"
                               % (self.name, self.process.returncode,
                                  _tail(os.path.join(self.dir, "log", "stderr")),
                                  _tail(self.logPath)))
            return all(canConnect(t) for t in self.targets())
        waitFor(up, timeout, what="dovecot %s to listen" % (self.name,))

    def targets(self):
        out = []
        if self.port is not None:
            out.append(("127.0.0.1", self.port))
        if self.sslPort is not None:
            out.append(("127.0.0.1", self.sslPort))
        if self.socket is not None:
            out.append(self.socket)
        return out

    @property
    def target(self):
        """The unix socket if there is one, else (127.0.0.1, port)."""
        return self.socket if self.socket is not None else ("127.0.0.1", self.port)

    def backendConfig(self, via=None):
        """The proxy's `backends:` entry: via "tcp" or "unix" (default:
        TCP when there is a port)."""
        if via is None:
            via = "tcp" if self.port is not None else "unix"
        if via == "tcp":
            return {"host": "127.0.0.1", "port": self.port}
        return {"socket": self.socket}

    def maildir(self, address):
        local, domain = address.lower().rsplit("@", 1)
        return os.path.join(self.mailroot, domain, local, "Maildir")

    def messagePaths(self, address):
        md = self.maildir(address)
        paths = []
        for sub in ("new", "cur"):
            d = os.path.join(md, sub)
            if os.path.isdir(d):
                paths += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        return paths

    def messages(self, address):
        """The delivered files' contents (new/ and cur/) for address."""
        out = []
        for p in self.messagePaths(address):
            with open(p, "rb") as f:
                out.append(f.read())
        return out

    def allMessages(self):
        """Every delivered file below the mail root: {path: bytes}."""
        out = {}
        for root, dirs, files in os.walk(self.mailroot):
            if os.path.basename(root) in ("new", "cur"):
                for n in files:
                    with open(os.path.join(root, n), "rb") as f:
                        out[os.path.join(root, n)] = f.read()
        return out

    def log(self):
        return _tail(self.logPath, limit=10 ** 7)

    def stop(self):
        stopPid(self.pid, popen=self.process)


def dovecotBody(stored, marker):
    """
    Split a file Dovecot delivered into (trace, message): Dovecot prepends
    Return-Path/Delivered-To/Received; message starts at the line that
    begins with marker (bytes, e.g. b"X-E2E-Id: 1234").
    """
    i = stored.find(b"\n" + marker)
    if stored.startswith(marker):
        return b"", stored
    if i < 0:
        raise FailTest("marker %r not in delivered file %r" % (marker, stored[:500]))
    return stored[:i + 1], stored[i + 1:]


# ---------------------------------------------------------------------------
# smtp-sink

class SmtpSink(object):
    """
    Postfix smtp-sink in LMTP mode (-L), running as lmtpharness, on
    127.0.0.1:port or a unix socket. Always keeps counters (-c). With
    dump=True every transaction is written to its own file under DIR/dump
    (smtp-sink -d), so tests can read what it received.

    Failure injection (class methods build the args):
        SmtpSink(tc, args=SmtpSink.tempfailRcpt())   451 to every RCPT
        SmtpSink(tc, args=SmtpSink.tempfailData())   451 after DATA (one per
                                                     recipient in LMTP)
        SmtpSink(tc, args=SmtpSink.delayData(2))     wait 2 s before DATA's 354
    """

    def __init__(self, testcase, port=None, socket=None, args=(), dump=True,
                 name="sink"):
        requirePeer(*SINK_COMMANDS)
        self.user = ensureHarnessUser()
        self.name = name
        self.dir = tempDir(testcase, "lmtpe2e-%s-" % (name,))
        if port is None and socket is None:
            port = freePort()
        self.port = port
        self.socket = socket
        self.dumpDir = os.path.join(self.dir, "dump")
        os.makedirs(self.dumpDir)
        os.chown(self.dumpDir, self.user.pw_uid, self.user.pw_gid)
        self.outPath = os.path.join(self.dir, "sink.out")
        addr = ("unix:" + socket) if socket is not None else (
            "inet:127.0.0.1:%d" % (port,))
        cmd = [_which("smtp-sink"), "-L", "-4", "-u", self.user.pw_name,
               "-h", "%s.test" % (name,), "-m", "256", "-c"]
        if dump:
            cmd += ["-d", self.dumpDir + "/msg."]
        cmd += list(args) + [addr, "128"]
        self.command = cmd
        self._out = open(self.outPath, "wb")
        testcase.addCleanup(self._out.close)
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
            start_new_session=True)
        self.pid = self.process.pid
        testcase.addCleanup(self.stop)

        def up():
            if self.process.poll() is not None:
                raise FailTest("smtp-sink exited with %s: %s"
                               % (self.process.returncode, _tail(self.outPath)))
            return canConnect(self.target)
        waitFor(up, 10, what="smtp-sink to listen")
        if socket is not None:
            os.chmod(socket, 0o666)
        # the readiness probe above is a session too: wait until smtp-sink
        # has counted it, so sessionsEnded() counts only real clients
        waitFor(lambda: self.counters().get("sess", 0) >= 1, 5,
                what="smtp-sink to count the probe session")
        self._probeSessions = self.counters()["sess"]

    @staticmethod
    def tempfailRcpt(reply="451 4.3.0 e2e tempfail at RCPT"):
        return ["-r", "RCPT", "-b", reply]

    @staticmethod
    def tempfailData(reply="451 4.3.0 e2e tempfail after DATA"):
        return ["-r", ".", "-b", reply]

    @staticmethod
    def delayData(seconds):
        return ["-w", str(int(seconds))]

    @property
    def target(self):
        return self.socket if self.socket is not None else ("127.0.0.1", self.port)

    def backendConfig(self):
        if self.socket is not None:
            return {"socket": self.socket}
        return {"host": "127.0.0.1", "port": self.port}

    def dumps(self):
        """
        The dump files, oldest first, as raw bytes. Each holds smtp-sink's
        own X-Client-*/X-Mail-Args/X-Rcpt-Args/Received headers, then the
        message as received (lines end in LF), then an empty line.
        """
        found = []
        for n in os.listdir(self.dumpDir):
            p = os.path.join(self.dumpDir, n)
            try:
                with open(p, "rb") as f:
                    found.append((os.fstat(f.fileno()).st_mtime_ns, n, f.read()))
            except FileNotFoundError:
                pass  # a cut-off transaction's dump, removed just now
        return [data for mtime, n, data in sorted(found)]

    def waitDumps(self, count, timeout=10):
        """
        Wait until smtp-sink has counted `count` complete messages and
        `count` dump files exist whose contents have stopped changing
        (smtp-sink may still be writing a dump when its reply is out), then
        return them.
        """
        last = [None]

        def ready():
            if self.messagesReceived() < count:
                return False
            dumps = self.dumps()
            if len(dumps) != count or not all(d.endswith(b"\n\n") for d in dumps):
                return False
            if dumps != last[0]:
                last[0] = dumps
                return False
            return dumps
        try:
            return waitFor(ready, timeout, interval=0.1,
                           what="%d complete smtp-sink dump(s)" % (count,))
        except FailTest as e:
            raise FailTest("%s; counters %r, %d dump(s): %r" % (
                e, self.counters(), len(self.dumps()),
                [d[:200] for d in self.dumps()]))

    @staticmethod
    def parseDump(dump):
        """
        Split one dump into (info, message): info is a dict with
        "rcpt" (list of X-Rcpt-Args values), "mail" (X-Mail-Args) and
        "proto"; message is what the client sent in DATA after smtp-sink's
        Received header, with the trailing empty line smtp-sink appends
        removed.
        """
        info = {"rcpt": [], "mail": None, "proto": None, "helo": None}
        rest = dump
        while True:
            line, sep, after = rest.partition(b"\n")
            if line.startswith(b"X-Rcpt-Args: "):
                info["rcpt"].append(line[13:].decode("utf-8", "replace"))
            elif line.startswith(b"X-Mail-Args: "):
                info["mail"] = line[13:].decode("utf-8", "replace")
            elif line.startswith(b"X-Client-Proto: "):
                info["proto"] = line[16:].decode()
            elif line.startswith(b"X-Helo-Args: "):
                info["helo"] = line[13:].decode("utf-8", "replace")
            elif line.startswith(b"Received: "):
                # three-line header: "Received: from ..", "\tby ..", "\tid .."
                rest = after
                while rest[:1] in (b"\t", b" "):
                    rest = rest.partition(b"\n")[2]
                break
            elif line.startswith(b"X-"):
                pass
            else:
                raise FailTest("unexpected smtp-sink dump format: %r" % (dump[:300],))
            rest = after
        if rest.endswith(b"\n\n"):
            rest = rest[:-1]
        return info, rest

    def counters(self):
        """
        The last running counters line (-c), parsed: e.g.
        {"sess": 1, "quit": 1, "mesg": 1}. Empty dict before the first.
        "sess" includes the fixture's own readiness probe (see
        sessionsEnded); a session still open is not counted yet, and its
        dump file (which smtp-sink removes if the transaction is cut off)
        may exist until it ends.
        """
        text = _tail(self.outPath, limit=10 ** 6)
        last = {}
        for chunk in text.replace("\r", "\n").split("\n"):
            parts = dict(p.split("=", 1) for p in chunk.split() if "=" in p)
            if parts:
                try:
                    last = dict((k, int(v)) for k, v in parts.items())
                except ValueError:
                    pass
        return last

    def sessionsEnded(self):
        """Sessions that ended since start-up, not counting our probe."""
        return self.counters().get("sess", 0) - self._probeSessions

    def messagesReceived(self):
        """Messages completed with the final dot (the 'mesg' counter)."""
        return self.counters().get("mesg", 0)

    def output(self):
        return _tail(self.outPath, limit=10 ** 6)

    def stop(self):
        stopPid(self.pid, popen=self.process)


# ---------------------------------------------------------------------------
# the proxy under test: the installed `twistd -n lmtp-proxy`

def _yaml():
    try:
        import yaml
    except ImportError:
        raise SkipTest("PyYAML is not installed")
    return yaml


class Octal(int):
    """An int written to YAML in octal (0660), as config.permissions wants."""


def dumpConfig(config):
    """
    YAML text for a config dict. config.permissions given as an int is
    written in octal (0660): the proxy refuses a decimal mode.
    """
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        pass
    Dumper.add_representer(Octal, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:int", "0%o" % (value,)))
    config = dict(config)
    settings = dict(config.get("config") or {})
    if isinstance(settings.get("permissions"), int):
        settings["permissions"] = Octal(settings["permissions"])
    config["config"] = settings
    return yaml.dump(config, Dumper=Dumper, default_flow_style=False,
                     sort_keys=False)


class Proxy(object):
    """
    The real proxy, started through the installed twistd plugin:

        twistd -n --pidfile=DIR/twistd.pid --logfile=DIR/proxy.log \\
            lmtp-proxy --config DIR/proxy.yaml

    with the twistd next to sys.executable. config is YAML text or a dict;
    in a dict without config.socket a free 127.0.0.1 port is filled in. It
    waits until the listening socket accepts and is stopped by its PID.
    """

    def __init__(self, testcase, config, extraArgs=(), startTimeout=20):
        yaml = _yaml()
        self.testcase = testcase
        self.twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(self.twistd, os.X_OK):
            _unavailable("no twistd next to %s" % (sys.executable,))
        self.dir = tempDir(testcase, "lmtpe2e-proxy-")
        self.configPath = os.path.join(self.dir, "proxy.yaml")
        self.logPath = os.path.join(self.dir, "proxy.log")
        self.pidPath = os.path.join(self.dir, "twistd.pid")
        self.outPath = os.path.join(self.dir, "twistd.out")
        if isinstance(config, dict):
            config = dict(config)
            config["config"] = dict(config.get("config") or {})
            config["config"].setdefault("socket", ["127.0.0.1", freePort()])
        self.writeConfig(config)
        parsed = yaml.safe_load(self.configText)
        sock = parsed["config"]["socket"]
        if isinstance(sock, str):
            self.target = sock
            self.port = None
            self.socket = sock
        else:
            self.target = (str(sock[0]), int(sock[1]))
            self.port = int(sock[1])
            self.socket = None
        self._out = open(self.outPath, "wb")
        testcase.addCleanup(self._out.close)
        self.command = [self.twistd, "-n", "--pidfile=" + self.pidPath,
                        "--logfile=" + self.logPath, "lmtp-proxy",
                        "--config", self.configPath] + list(extraArgs)
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        self.pid = self.process.pid
        testcase.addCleanup(self.stop)

        def up():
            if self.process.poll() is not None:
                output = _tail(self.outPath)
                hint = ""
                if "Unknown command: lmtp-proxy" in output:
                    hint = ("\nhint: the lmtp-proxy twistd plugin is not "
                            "installed next to %s (pip install . into that "
                            "venv; not pip install -e)" % (sys.executable,))
                raise FailTest(
                    "proxy exited with %s before listening.\ncommand: %s\n"
                    "output: %s\nlog: %s%s" % (
                        self.process.returncode, " ".join(self.command),
                        output, _tail(self.logPath), hint))
            return canConnect(self.target)
        try:
            waitFor(up, startTimeout, what="the proxy to listen on %r" % (self.target,))
        except FailTest as e:
            if "timed out" in str(e):
                raise FailTest("%s\nlog: %s" % (e, _tail(self.logPath)))
            raise

    def writeConfig(self, config):
        """(Re)write the config file (text or dict); does not signal."""
        if isinstance(config, dict):
            config = dumpConfig(config)
        self.configText = config
        tmp = self.configPath + ".tmp"
        with open(tmp, "w") as f:
            f.write(config)
        os.rename(tmp, self.configPath)

    def sendSignal(self, sig):
        os.kill(self.pid, sig)

    def reload(self, config=None, timeout=10, marker=None):
        """
        Optionally rewrite the config, send SIGUSR1, and wait until the log
        grew (the proxy logs its reload) or timeout seconds passed.
        """
        if config is not None:
            self.writeConfig(config)
        before = len(self.log())
        self.sendSignal(signal.SIGUSR1)
        def logged():
            text = self.log()
            if marker is not None:
                return marker in text[before:]
            return len(text) > before
        try:
            waitFor(logged, timeout, what="the proxy to log its reload")
        except FailTest:
            pass
        return self.log()[before:]

    def log(self):
        """
        The proxy's whole log text (twistd --logfile), including files that
        twistd rotated away (proxy.log.N, oldest first): twistd rotates its
        log file on SIGUSR1 when it owns that signal.
        """
        rotated = []
        prefix = os.path.basename(self.logPath) + "."
        for name in os.listdir(self.dir):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                rotated.append((int(name[len(prefix):]), name))
        parts = [_tail(os.path.join(self.dir, name), limit=10 ** 7)
                 for n, name in sorted(rotated, reverse=True)]
        parts.append(_tail(self.logPath, limit=10 ** 7))
        return "".join(parts)

    def output(self):
        return _tail(self.outPath, limit=10 ** 6)

    def alive(self):
        return self.process.poll() is None

    def stop(self, timeout=15):
        stopPid(self.pid, timeout=timeout, popen=self.process)
        return self.process.returncode


# ---------------------------------------------------------------------------
# a private Postfix instance in front of an LMTP target

class PostfixClient(object):
    """
    A private Postfix (postfix -c DIR/etc) with its own queue and log, SMTP
    on 127.0.0.1:smtpPort only, that relays `domains` over LMTP to target
    ((host, port) -> lmtp:inet:host:port, a path -> lmtp:unix:path) and
    rejects every other domain. Fast retries (10 s); maillog_file DIR/maillog.
    """

    def __init__(self, testcase, target, domains=("example.test",),
                 smtpPort=None, name="mta", extra=""):
        """
        extra: more main.cf lines (TLS and SASL settings of the lmtp client).
        """
        requirePeer(*POSTFIX_COMMANDS)
        self.extra = extra
        self.dir = tempDir(testcase, "lmtpe2e-pf-")
        self.etc = os.path.join(self.dir, "etc")
        self.spool = os.path.join(self.dir, "spool")
        self.data = os.path.join(self.dir, "data")
        self.maillog = os.path.join(self.dir, "maillog")
        for d in (self.etc, self.spool, self.data):
            os.makedirs(d)
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        self.smtpPort = smtpPort or freePort()
        self.domains = list(domains)
        self.name = name
        self.env = dict(os.environ, PATH=_SBIN_PATH)
        self.env.pop("MAIL_CONFIG", None)
        self.setTarget(target, reload=False)
        self._writeConfig()
        # no separate `postfix check` (3 s): `postfix start` runs the fatal
        # checks itself and reports to the maillog
        testcase.addCleanup(self.stop)
        start = self.postfix("start")
        if start.returncode != 0:
            raise FailTest("postfix start failed: %s %s" % (start.stdout, _tail(self.maillog)))
        self.pid = waitFor(lambda: readPidFile(os.path.join(self.spool, "pid", "master.pid")),
                           10, what="postfix master.pid")
        waitFor(lambda: canConnect(("127.0.0.1", self.smtpPort)), 15,
                what="postfix smtpd on 127.0.0.1:%d" % (self.smtpPort,))

    @staticmethod
    def transportFor(target):
        if isinstance(target, str):
            return "lmtp:unix:" + target
        return "lmtp:inet:%s:%d" % (target[0], target[1])

    def setTarget(self, target, reload=True):
        self.target = target
        with open(os.path.join(self.etc, "transport"), "w") as f:
            for d in self.domains:
                f.write("%s %s\n" % (d, self.transportFor(target)))
        if reload:
            self.postfix("reload")

    def _writeConfig(self):
        doms = " ".join(self.domains)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write("""\
# generated by tests/peers.py
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
multi_instance_name = postfix-e2e-{name}
syslog_name = postfix-e2e-{name}
myhostname = {name}.mta.test
mydomain = mta.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled in e2e tests
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {doms}
transport_maps = texthash:{etc}/transport
default_transport = error:5.7.1 e2e delivers only {doms}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
lmtp_host_lookup = native
smtputf8_enable = no
biff = no
maillog_file = {maillog}
maillog_file_prefixes = {dir}
queue_run_delay = 10s
minimal_backoff_time = 10s
maximal_backoff_time = 60s
lmtp_connection_cache_on_demand = no
""".format(spool=self.spool, data=self.data, name=self.name, doms=doms,
           etc=self.etc, maillog=self.maillog, dir=self.dir) + self.extra)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write("""\
# generated by tests/peers.py
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
""".format(port=self.smtpPort))

    def postfix(self, *args):
        return subprocess.run(["postfix", "-c", self.etc] + list(args),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              errors="replace", env=self.env, timeout=60)

    def send(self, sender, recipients, body, subject="e2e", headers=()):
        """
        Submit one message over SMTP to the instance. body is text or
        bytes (the message body only; headers are generated). Returns the
        dict of refused recipients (smtplib.sendmail).
        """
        if isinstance(recipients, str):
            recipients = [recipients]
        if isinstance(body, str):
            body = body.encode("utf-8")
        head = ["From: <%s>" % sender,
                "To: %s" % ", ".join("<%s>" % r for r in recipients),
                "Subject: %s" % subject,
                "Message-ID: <%s.%s@e2e.test>" % (time.time(), os.getpid())]
        head += list(headers)
        msg = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        with smtplib.SMTP("127.0.0.1", self.smtpPort, timeout=30) as s:
            return s.sendmail(sender, recipients, msg)

    def queue(self):
        """postqueue -p output."""
        return subprocess.run(["postqueue", "-c", self.etc, "-p"],
                              capture_output=True, text=True, errors="replace",
                              env=self.env, timeout=30).stdout

    def isEmpty(self):
        return "Mail queue is empty" in self.queue()

    def flush(self):
        """postqueue -f: retry deferred mail now."""
        subprocess.run(["postqueue", "-c", self.etc, "-f"], capture_output=True,
                       env=self.env, timeout=30)

    def waitEmpty(self, timeout=30):
        """Poll until postqueue says the queue is empty."""
        try:
            waitFor(self.isEmpty, timeout, interval=0.2,
                    what="the postfix queue to be empty")
        except FailTest as e:
            raise FailTest("%s\nqueue:\n%s\nmaillog tail:\n%s"
                           % (e, self.queue(), self.log()[-3000:]))

    def waitLog(self, predicate, timeout=30, what="postfix log line"):
        """Poll the maillog until predicate(text) is true."""
        return waitFor(lambda: predicate(self.log()), timeout, interval=0.2,
                       what=what)

    def log(self):
        return _tail(self.maillog, limit=10 ** 7)

    def deliveries(self, recipient):
        """maillog delivery lines (to=<recipient>) in order."""
        key = "to=<%s>" % (recipient,)
        return [l for l in self.log().splitlines() if key in l and "status=" in l]

    def stop(self):
        pid = readPidFile(os.path.join(self.spool, "pid", "master.pid"))
        if pid is not None:
            stopPid(pid, timeout=10)


# ---------------------------------------------------------------------------
# Cyrus lmtpd backend

class CyrusBackend(object):
    """
    A Cyrus IMAP master running only lmtpd on 127.0.0.1:port, without
    lmtpd's -a: LMTP AUTH is demanded, checked against one user in a
    private sasldb, and offered with STARTTLS (tls_server_cert/key).
    Mail for user@domain goes to the mailbox domain!user.USER (created on
    first delivery). Runs in the foreground as our child; stopped by its
    PID.
    """

    BIN = "/usr/lib/cyrus/bin"

    def __init__(self, testcase, certificate, key, user, password):
        requirePeer(self.BIN + "/master", self.BIN + "/lmtpd", "saslpasswd2")
        self.dir = tempDir(testcase, "lmtpe2e-cyrus-")
        self.port = freePort()
        self.conf = os.path.join(self.dir, "imapd.conf")
        lib = os.path.join(self.dir, "lib")
        for d in ("spool", "sock", "lib") + tuple(
                os.path.join("lib", s) for s in
                ("db", "socket", "proc", "log", "msg", "user", "quota", "sieve")):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        for name, source in (("cert.pem", certificate), ("key.pem", key)):
            shutil.copy(source, os.path.join(self.dir, name))
        sasldb = os.path.join(self.dir, "sasldb2")
        servername = "cyrus.e2e.test"
        made = subprocess.run(
            [_which("saslpasswd2"), "-p", "-c", "-f", sasldb, "-u", servername, user],
            input=password, text=True, capture_output=True)
        if made.returncode != 0:
            raise FailTest("saslpasswd2 failed: %s" % (made.stderr,))
        with open(self.conf, "w") as f:
            f.write("""\
configdirectory: {lib}
partition-default: {dir}/spool
sievedir: {lib}/sieve
servername: {servername}
admins: cyrus {user}
lmtpsocket: {dir}/sock/lmtp
idlesocket: {dir}/sock/idle
notifysocket: {dir}/sock/notify
idlemethod: no
unixhierarchysep: 1
virtdomains: userid
defaultdomain: e2e.test
lmtp_downcase_rcpt: 1
autocreate_post: 1
autocreate_quota: 0
duplicatesuppression: 0
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {sasldb}
sasl_mech_list: PLAIN LOGIN
allowplaintext: 0
tls_server_cert: {dir}/cert.pem
tls_server_key: {dir}/key.pem
syslog_prefix: cyrus-e2e
""".format(lib=lib, dir=self.dir, servername=servername, user=user, sasldb=sasldb))
        with open(os.path.join(self.dir, "cyrus.conf"), "w") as f:
            f.write("""\
START {{
  recover cmd="ctl_cyrusdb -C {conf} -r"
}}
SERVICES {{
  lmtp cmd="lmtpd -C {conf}" listen="127.0.0.1:{port}" prefork=1 maxchild=10
}}
EVENTS {{
}}
""".format(conf=self.conf, port=self.port))
        subprocess.run(["chown", "-R", "cyrus:mail", self.dir], check=True)
        self._out = open(os.path.join(self.dir, "master.out"), "wb")
        testcase.addCleanup(self._out.close)
        self.process = subprocess.Popen(
            [self.BIN + "/master", "-C", self.conf,
             "-M", os.path.join(self.dir, "cyrus.conf"),
             "-p", os.path.join(self.dir, "master.pid")],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
            start_new_session=True)
        self.pid = self.process.pid
        testcase.addCleanup(self.stop)

        def up():
            if self.process.poll() is not None:
                raise FailTest("cyrus master exited with %s: %s" % (
                    self.process.returncode,
                    _tail(os.path.join(self.dir, "master.out"))))
            return canConnect(("127.0.0.1", self.port))
        waitFor(up, 20, what="cyrus lmtpd to listen")

    def messages(self, address):
        """
        The messages delivered to address (user@domain), as bytes.
        """
        local, domain = address.lower().split("@", 1)
        dump = subprocess.run(
            [self.BIN + "/ctl_mboxlist", "-C", self.conf, "-d"],
            capture_output=True, text=True, user="cyrus")
        import json
        try:
            boxes = json.loads(dump.stdout or "{}")
        except ValueError:
            return []
        entry = boxes.get("%s!user.%s" % (domain, local))
        if entry is None:
            return []
        uid = entry["uniqueid"]
        box = os.path.join(self.dir, "spool", "uuid", uid[0], uid[1], uid)
        out = []
        for name in sorted(os.listdir(box)) if os.path.isdir(box) else ():
            if name[:1].isdigit():
                with open(os.path.join(box, name), "rb") as f:
                    out.append(f.read())
        return out

    def stop(self):
        stopPid(self.pid, popen=self.process)
