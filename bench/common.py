"""Shared helpers for the lmtp-proxy benchmarks (standard library only).

Every server is started here as a child process (or, for Dovecot, in the
foreground with ``dovecot -F``), its PID is recorded, and it is stopped by
that PID only: SIGTERM, then SIGKILL after 10 s.  Everything listens on
127.0.0.1.  Nothing here calls pkill/killall.
"""

import atexit
import filecmp
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HARNESS_USER = os.environ.get("HARNESS_USER", "lmtpharness")


def log(msg):
    print("[%s %s] %s" % (os.path.basename(sys.argv[0]),
                           time.strftime("%H:%M:%S"), msg),
          file=sys.stderr, flush=True)


class Fail(Exception):
    pass


# ---------------------------------------------------------------- processes

_children = []          # (name, pid, Popen) in start order


def _stop_pid(name, pid, popen=None, grace=10.0):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        if popen is not None:
            popen.poll()
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                log("%s: stopped pid %d" % (name, pid))
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log("%s: stopped pid %d" % (name, pid))
                return
        time.sleep(0.05)
    log("%s: pid %d ignored SIGTERM, sending SIGKILL" % (name, pid))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def stop(name):
    """Stop one child started by spawn() by its own PID."""
    for i, (n, pid, p) in enumerate(_children):
        if n == name:
            _stop_pid(n, pid, p)
            del _children[i]
            return


def stop_all():
    while _children:
        n, pid, p = _children.pop()
        _stop_pid(n, pid, p)


def _on_signal(signum, frame):
    log("signal %d: stopping everything" % signum)
    stop_all()
    sys.exit(128 + signum)


def install_cleanup():
    atexit.register(stop_all)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)


def track(name, popen):
    """Have stop_all()/signals stop this child (by its PID) too."""
    _children.append((name, popen.pid, popen))


def untrack(popen):
    _children[:] = [c for c in _children if c[2] is not popen]


def spawn(name, argv, logpath, **kw):
    out = open(logpath, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         **kw)
    out.close()
    _children.append((name, p.pid, p))
    log("%s: started pid %d: %s" % (name, p.pid, " ".join(argv)))
    return p


def raise_nofile(want=65536):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < new:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------- net

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port_free(port):
            return port
    raise Fail("no free port found")


def port_free(port):
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def wait_port(port, timeout, proc):
    """Wait until something listens on 127.0.0.1:port (a listener that
    speaks TLS first has no greeting to wait for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Fail("exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Fail("nothing listens on %d after %s s" % (port, timeout))


def wait_greeting(port, timeout=15.0, proc=None):
    """Wait until 127.0.0.1:port answers with a 220 greeting."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Fail("process exited with status %s before listening on %d"
                       % (proc.returncode, port))
        try:
            c = LMTPClient(port, timeout=2, lhlo=False)
        except (OSError, LMTPError) as e:
            last = e
        else:
            c.quit()
            if c.greeting[0] == "220":
                return
            last = c.greeting
        time.sleep(0.05)
    raise Fail("nothing answered 220 on 127.0.0.1:%d within %.0f s (%r)"
               % (port, timeout, last))


# ------------------------------------------------------------------ memory

def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Vm") or k in ("Threads",):
                v = v.strip()
                out[k] = int(v.split()[0]) if v.endswith("kB") else v
    return out


def rss_kb(pid):
    return proc_status(pid)["VmRSS"]


def hwm_kb(pid):
    return proc_status(pid)["VmHWM"]


def largest_kb(read, pids):
    """The largest of C{read(pid)} (rss_kb, hwm_kb) over the C{pids} that
    still exist."""
    values = []
    for pid in pids:
        try:
            values.append(read(pid))
        except OSError:
            pass
    return max(values)


def reset_hwm(pid):
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_s(pids):
    """CPU seconds (user + system) used so far by these processes, with
    their reaped children (Dovecot's lmtp processes come and go)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])     # utime stime cutime cstime
    return total / tick


def tree(pid):
    """C{pid} and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def mb(kb):
    return "%.1f MB" % (kb / 1024.0)


# --------------------------------------------------------------------- sinks

def ensure_user():
    try:
        pwd.getpwnam(HARNESS_USER)
    except KeyError:
        subprocess.check_call(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             HARNESS_USER])
        log("created throwaway system user %s" % HARNESS_USER)


class Sink:
    """smtp-sink -L with running counters (-c) on 127.0.0.1:port."""

    def __init__(self, workdir, name, port=None, extra=()):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.out = os.path.join(self.dir, "sink.out")
        ensure_user()
        argv = ["smtp-sink", "-L", "-4", "-u", HARNESS_USER,
                "-h", "%s.bench.test" % name, "-m", "2048", "-c"]
        argv += list(extra)
        argv += ["inet:127.0.0.1:%d" % self.port, "1024"]
        self.proc = spawn(name, argv, self.out)
        wait_greeting(self.port, 10, self.proc)

    def counters(self):
        """Last counters line of smtp-sink -c, e.g. {'sess': 2, 'mesg': 1}."""
        with open(self.out, "rb") as f:
            try:
                f.seek(-4096, 2)
            except OSError:
                f.seek(0)
            data = f.read().decode("latin-1")
        for rec in reversed(re.split(r"[\r\n]+", data)):
            if "mesg=" in rec:
                return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rec)}
        return {"sess": 0, "quit": 0, "mesg": 0}

    def mesg(self):
        return self.counters().get("mesg", 0)


def settle(sinks, expected, timeout=5.0):
    """Wait until each sink's mesg counter reaches expected[name] (or stops
    moving); return {name: mesg}."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while True:
        now = {s.name: s.mesg() for s in sinks}
        if all(now[k] >= v for k, v in expected.items()):
            # give late duplicates a moment to show up
            time.sleep(0.05)
            return {s.name: s.mesg() for s in sinks}
        if now != last:
            last, stable_since = now, time.monotonic()
        if time.monotonic() > deadline or time.monotonic() - stable_since > 2:
            return now
        time.sleep(0.02)


# ------------------------------------------------------------------ dovecot

class DovecotProxy:
    """Dovecot 2.3 LMTP proxy (lmtp_proxy = yes) routing by passwd-file
    passdbs that return proxy=y host=127.0.0.1 port=N.  Runs in the foreground
    (dovecot -F) so its master PID is our child's PID.

    settings: the ssl lines of dovecot.conf; listener: more lines for its
    LMTP listener (e.g. "ssl = yes"); route(port): a user's passdb extra
    fields (default proxy=y host=127.0.0.1 port=N); extra: appended to
    dovecot.conf; greets: whether it greets in clear, else only its port is
    waited for."""

    def __init__(self, workdir, users, domains, name="dovecot", port=None,
                 settings="ssl = no", listener="", route=None, extra="",
                 greets=True):
        self.dir = d = os.path.join(workdir, name)
        self.name = name
        for sub in ("run", "state", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        self.port = port or free_port()
        self.log = os.path.join(d, "log", "dovecot.log")
        route = route or (lambda p: "proxy=y host=127.0.0.1 port=%d" % p)
        with open(os.path.join(d, "routes-users"), "w") as f:
            for u, p in users.items():
                f.write("%s:::::::%s\n" % (u, route(p)))
        with open(os.path.join(d, "routes-domains"), "w") as f:
            for dom, p in domains.items():
                f.write("%s:::::::%s\n" % (dom, route(p)))
        open(os.path.join(d, "no-local-users"), "w").close()
        self.conf = os.path.join(d, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(
                d=d, name=name, port=self.port, settings=settings, extra=extra,
                listener="".join("\n    " + line for line in listener.splitlines())))
        subprocess.check_call(["doveconf", "-c", self.conf, "-n"],
                              stdout=subprocess.DEVNULL)
        self.proc = spawn(name, ["dovecot", "-F", "-c", self.conf],
                          os.path.join(d, "log", "dovecot.stderr"))
        if greets:
            wait_greeting(self.port, 15, self.proc)
        else:
            wait_port(self.port, 15, self.proc)

    def lmtp_pids(self):
        """PIDs of the master and its descendants (lmtp workers etc.)."""
        return tree(self.proc.pid)


DOVECOT_CONF = """\
# generated by bench/common.py - Dovecot LMTP proxy '{name}'
instance_name = bench-{name}
hostname = {name}.bench.test
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log/dovecot.log
info_log_path = {d}/log/dovecot.log
protocols = lmtp
listen = 127.0.0.1
{settings}
default_internal_user = dovecot
default_login_user = dovenull
auth_mechanisms = plain
lmtp_proxy = yes
passdb {{
  driver = passwd-file
  args = username_format=%Lu {d}/routes-users
}}
passdb {{
  driver = passwd-file
  args = username_format=%Ld {d}/routes-domains
}}
userdb {{
  driver = passwd-file
  args = {d}/no-local-users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}{listener}
  }}
}}
service doveadm {{
  inet_listener {{
    port = 0
  }}
}}
{extra}"""


# ------------------------------------------------------------------- proxy

def venv_dir():
    return os.path.abspath(os.environ.get("VENV") or os.path.join(REPO, ".venv"))


def baseline_venv():
    """The venv of the "before" proxy (BASELINE_VENV), or None: when set,
    bench.py and memory.py measure it as the extra target "base"."""
    venv = os.environ.get("BASELINE_VENV")
    return os.path.abspath(venv) if venv else None


def baseline_label():
    """What the "before" proxy is, e.g. a commit (BASELINE_LABEL)."""
    return os.environ.get("BASELINE_LABEL") or os.path.basename(baseline_venv())


def proxy_yaml(port, backends, users, extra_config="", workers=None):
    """backends: {name: port}; users: list of (key, backend) in order."""
    if workers is None:
        # The default shipped (workers: 1); WORKERS=N measures N serving
        # processes.
        workers = int(os.environ.get("WORKERS") or 1)
    lines = ["config:",
             "  socket: [127.0.0.1, %d]" % port,
             "  ignoreDomain: false",
             "  workers: %d" % workers]
    if extra_config:
        lines.append(extra_config.rstrip("\n"))
    lines.append("backends:")
    for name, p in backends.items():
        lines.append("  %s: {host: 127.0.0.1, port: %d}" % (name, p))
    lines.append("users:")
    for key, be in users:
        lines.append('  "%s": %s' % (key, be))
    return "\n".join(lines) + "\n"


BENCH_USERS = [("@bench.test", "sinkA"),
               ("2bench@split.test", "sinkB"),
               ("4bench@split.test", "sinkB"),
               ("@split.test", "sinkA")]


class OurProxy:
    """twistd -n lmtp-proxy from C{venv} (default $VENV, else REPO/.venv)."""

    def __init__(self, workdir, yaml_text=None, backends=None, users=None,
                 name="proxy", port=None, timeout=60.0, workers=None,
                 venv=None):
        self.dir = d = os.path.join(workdir, name)
        os.makedirs(d, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.config = os.path.join(d, "proxy.yaml")
        if yaml_text is None:
            yaml_text = proxy_yaml(self.port, backends, users or BENCH_USERS,
                                   workers=workers)
        with open(self.config, "w") as f:
            f.write(yaml_text)
        self.venv = venv or venv_dir()
        twistd = os.path.join(self.venv, "bin", "twistd")
        if not os.access(twistd, os.X_OK):
            raise Fail("no %s (set VENV or BASELINE_VENV, or run 'make "
                       "install')" % twistd)
        self.logfile = os.path.join(d, "proxy.log")
        self.pidfile = os.path.join(d, "p.pid")
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        self.argv = [twistd, "-n", "--pidfile=" + self.pidfile,
                     "--logfile=" + self.logfile, "lmtp-proxy",
                     "--config", self.config]
        self.t0 = time.monotonic()
        self.proc = spawn(name, self.argv, os.path.join(d, "twistd.out"),
                          cwd=d)
        try:
            wait_greeting(self.port, timeout, self.proc)
        except Fail as e:
            raise Fail("%s\n  command: %s\n  twistd.out:\n%s\n  proxy.log "
                       "(tail):\n%s" % (e, " ".join(self.argv),
                                        tail(os.path.join(d, "twistd.out")),
                                        tail(self.logfile)))
        self.startup_s = time.monotonic() - self.t0
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def pids(self):
        """The master's PID and its workers'."""
        return tree(self.pid)


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return "(%s)" % e


# -------------------------------------------------------------- LMTP client

class LMTPError(Exception):
    pass


class LMTPClient:
    """Minimal blocking LMTP client: one reply per accepted recipient."""

    def __init__(self, port, host="127.0.0.1", timeout=30.0, lhlo=True):
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        # Closed here rather than by the garbage collector: wait_greeting()
        # keeps the last error, and with it this object, while it retries.
        try:
            self.greeting = self.reply()
        except (OSError, LMTPError):
            self.sock.close()
            raise
        if not self.greeting[0].startswith("2"):
            self.sock.close()
            raise LMTPError("greeting %r" % (self.greeting,))
        if lhlo:
            self.cmd("LHLO bench.client.test")

    def _line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise LMTPError("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("latin-1")

    def reply(self):
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return (line[:3], lines)

    def cmd(self, text, expect="2"):
        self.sock.sendall(text.encode("latin-1") + b"\r\n")
        code, lines = self.reply()
        if expect and not code.startswith(expect):
            raise LMTPError("%s -> %s" % (text, " | ".join(lines)))
        return code, lines

    def send(self, sender, rcpts, body, marks=None):
        """body: bytes (CRLF lines, already dot-safe) or an iterable of
        bytes chunks.  Returns the list of per-recipient final replies.
        marks: a list that gets time.perf_counter() appended after the MAIL
        reply, the last RCPT reply, the DATA reply and the last final reply."""
        mark = marks.append if marks is not None else (lambda t: None)
        self.cmd("MAIL FROM:<%s>" % sender)
        mark(time.perf_counter())
        ok = []
        for r in rcpts:
            code, lines = self.cmd("RCPT TO:<%s>" % r, expect=None)
            if code.startswith("2"):
                ok.append(r)
        mark(time.perf_counter())
        if not ok:
            self.cmd("RSET")
            return []
        self.cmd("DATA", expect="3")
        mark(time.perf_counter())
        if isinstance(body, (bytes, bytearray)):
            self.sock.sendall(bytes(body) + b".\r\n")
        else:
            for chunk in body:
                self.sock.sendall(chunk)
            self.sock.sendall(b".\r\n")
        replies = [self.reply() for _ in ok]
        mark(time.perf_counter())
        return replies

    def send_pipelined(self, sender, rcpts, body):
        """MAIL, every RCPT and DATA in one write, as Postfix's LMTP client
        sends them to a server that offers PIPELINING (RFC 2920), then the
        message.  body: bytes, dot-safe.  Returns the final replies."""
        commands = (["MAIL FROM:<%s>" % sender]
                    + ["RCPT TO:<%s>" % r for r in rcpts] + ["DATA"])
        self.sock.sendall("".join(c + "\r\n" for c in commands).encode("latin-1"))
        replies = [self.reply() for _ in commands]
        if (any(not code.startswith("2") for code, _ in replies[:-1])
                or not replies[-1][0].startswith("3")):
            raise LMTPError("pipelined envelope -> %s"
                            % " | ".join(lines[-1] for _, lines in replies))
        self.sock.sendall(bytes(body) + b".\r\n")
        return [self.reply() for _ in rcpts]

    def quit(self):
        try:
            self.cmd("QUIT", expect=None)
        except (OSError, LMTPError):
            pass
        self.sock.close()


def make_body(size, tag="bench"):
    hdr = ("From: <src@harness.test>\r\nTo: <bench@bench.test>\r\n"
           "Subject: %s\r\nMessage-Id: <%s.%d@harness.test>\r\n\r\n"
           % (tag, tag, os.getpid())).encode()
    line = b"x" * 76 + b"\r\n"
    n = max(1, size // len(line))
    return hdr + line * n


# ------------------------------------------------------------ results file

# A path of the machine a run happened on, once the known prefixes are
# replaced: the run's scratch directories and anything else under these.
_WORKDIR = re.compile(r"/tmp/lmtp[a-z]+\.[A-Za-z0-9_]+")
_MACHINE_PATH = re.compile(r"(?<![\w$])/(?:tmp|work|root|home|opt)/[^\s`'\"|,;)]*")


def portable(text, env=os.environ):
    """
    C{text} naming no path of the machine it ran on: the venvs become
    C{$VENV} and C{$BASELINE_VENV}, the repository C{.}, the run's scratch
    directory C{$WORKDIR}, and any other such path its last part only, so
    that RESULTS.md reads the same whoever ran it.
    """
    for var in ("BASELINE_VENV", "VENV"):
        value = env.get(var, "").rstrip("/")
        if value:
            text = text.replace(value, "$" + var)
    text = text.replace(REPO + "/", "").replace(REPO, ".")
    text = _WORKDIR.sub("$WORKDIR", text)
    return _MACHINE_PATH.sub(
        lambda m: "<%s>" % (os.path.basename(m.group(0).rstrip("/")) or "path",), text)


def update_section(path, name, text):
    """
    Replace (or append) the block between <!-- NAME:begin/end --> markers,
    written with L{portable} paths.
    """
    begin, end = "<!-- %s:begin -->" % name, "<!-- %s:end -->" % name
    block = "%s\n%s\n%s\n" % (begin, portable(text).rstrip("\n"), end)
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = "# lmtp-proxy benchmark results\n\n"
    m = re.search(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", old,
                  re.S)
    new = old[:m.start()] + block + old[m.end():] if m else \
        old.rstrip("\n") + "\n\n" + block
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def _cmd_out(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd="/",
                              timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return "(%s)" % e


def machine_info():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = "%.1f GiB" % (int(line.split()[1]) / 1048576)
    venv = venv_dir()
    pyver, tw, ours = venv_info(venv)
    stale = installed_differs(ours.split(" ", 1)[-1])
    git = _cmd_out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    info = [
        ("host", "%s, nproc=%s, CPU: %s, RAM %s, kernel %s, loadavg at start %s"
         % (os.uname().nodename, os.cpu_count(), cpu, mem, os.uname().release,
            " ".join(open("/proc/loadavg").read().split()[:3]))),
        ("python (venv %s)" % venv, pyver),
        ("Twisted", tw),
        ("Postfix", _cmd_out(["postconf", "-d", "mail_version"])),
        ("Dovecot", _cmd_out(["dovecot", "--version"])),
        ("lmtp-proxy", "%s (git %s)%s" % (
            ours, git or "no commits",
            ("; **installed copy differs from the working tree**: "
             + ", ".join(stale)) if stale else "")),
    ]
    base = baseline_venv()
    if base:
        pyver, tw, theirs = venv_info(base)
        info.append(("baseline lmtp-proxy \"%s\" (venv %s)"
                     % (baseline_label(), base),
                     "%s; python %s, Twisted %s" % (theirs, pyver, tw)))
    info.append(("orchestrator python", sys.version.split()[0]))
    return info


def venv_info(venv):
    """(python version, Twisted version, "lmtp-proxy version and package
    directory") of the venv."""
    py = os.path.join(venv, "bin", "python")
    if not os.access(py, os.X_OK):
        return ("(no venv at %s)" % venv,) * 3
    return (_cmd_out([py, "-c", "import sys; print(sys.version.split()[0])"]),
            _cmd_out([py, "-c", "import twisted; print(twisted.__version__)"]),
            _cmd_out([py, "-c", "import lmtp_proxy, os; print(getattr("
                      "lmtp_proxy, '__version__', '?'), "
                      "os.path.dirname(lmtp_proxy.__file__))"]))


def installed_differs(pkgdir):
    """Modules in which the installed package differs from the working
    tree's lmtp_proxy/: a venv not reinstalled since an edit measures old
    code, which would make a before/after comparison meaningless."""
    tree = os.path.join(REPO, "lmtp_proxy")
    if not os.path.isdir(pkgdir) or os.path.samefile(pkgdir, tree):
        return []
    names = {n for d in (tree, pkgdir) for n in os.listdir(d)
             if n.endswith(".py")}
    return sorted(n for n in names
                  if not _same_file(os.path.join(tree, n),
                                    os.path.join(pkgdir, n)))


def _same_file(a, b):
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def machine_md():
    return "\n".join("* **%s**: %s" % kv for kv in machine_info())


def pct(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def median(values):
    return pct(values, 0.5)
