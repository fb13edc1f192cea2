"""The throughput cells with TLS on both sides (bench.py --tls): our proxy
side by side with Dovecot's LMTP proxy configured the same way, each also
measured without TLS over the same hops, so that the TLS overhead per
message is that of TLS alone.

    smtp-source -L -> shim client -> proxy -> shim server -> smtp-sink -L

smtp-source and smtp-sink speak no TLS; bench/starttls_shim.py speaks it
for them (one process per core sharing the ports, SO_REUSEPORT), the same
for both proxies.  Four targets, interleaved in every run of every cell:

  ours-tls     STARTTLS offered and required (config.tls without implicit,
               require_tls: true); backends tls: starttls, ca_file,
               server_name: localhost (verified)
  dovecot-tls  ssl = required, a plain listener (LMTP STARTTLS); passdb
               proxy fields starttls=yes host=localhost (verified against
               ssl_client_ca_file)
  ours-plain, dovecot-plain   the same proxies without TLS, the shims
               relaying only

With --tls-mode implicit (TLS_MODE=implicit) TLS starts at the first byte
on both sides instead (ours tls.implicit and backends tls: implicit,
Dovecot an ssl = yes listener and ssl=yes to the backends).

A run counts only if the sinks received exactly the expected messages and
the shims saw TLS on both sides: on the client side every connection of
the run set up TLS (verified chain and name), on the backend side the
message bytes reached the sinks only through shim listeners that relay
nothing before TLS (and refused nothing sent in clear); for the plain
targets, no TLS at all.  Anything else is a FAIL.  The certificates (a CA,
a P-256 certificate for localhost and 127.0.0.1) are made at run time with
openssl in the work directory.
"""

import glob
import json
import os
import signal
import ssl
import subprocess
import sys
import time

import common as C

SHIM = os.path.join(C.HERE, "starttls_shim.py")
USERS = {"bench@split.test": "sinkA"}
USERS.update({"%dbench@split.test" % i: "sinkA" if i % 2 else "sinkB" for i in range(2, 21)})
SINKS = ("sinkA", "sinkB")
TARGETS = ("ours-tls", "dovecot-tls", "ours-plain", "dovecot-plain")


def make_certificates(d):
    """A CA and a certificate for localhost and 127.0.0.1 under d; returns
    (ca, certificate, key) paths."""
    os.makedirs(d, exist_ok=True)

    def run(*argv):
        subprocess.run(["openssl"] + list(argv), cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=lmtp-proxy bench CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    for name in ("ca.pem", "server.pem", "server.key"):
        os.chmod(os.path.join(d, name), 0o644)
    return tuple(os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key"))


# ------------------------------------------------------------------- shims

class Shims:
    """C{procs} processes of starttls_shim.py, each with every listener
    (SO_REUSEPORT), started and stopped by their own PIDs."""

    def __init__(self, wd, certs, clients, servers, procs):
        ca, certificate, key = certs
        self.dir = d = os.path.join(wd, "shims")
        os.makedirs(d, exist_ok=True)
        args = ["--ca", ca, "--cert", certificate, "--key", key]
        for name, (listen, target, mode) in clients.items():
            args += ["--client", "%s:%d:%d:%s" % (name, listen, target, mode)]
        for name, (listen, sink, mode) in servers.items():
            args += ["--server", "%s:%d:%d:%s" % (name, listen, sink, mode)]
        self.procs = []
        for i in range(procs):
            stats = os.path.join(d, "stats%d.json" % i)
            argv = [sys.executable, SHIM, "--stats", stats] + args
            p = C.spawn("shim%d" % i, argv, os.path.join(d, "shim%d.log" % i))
            self.procs.append((p, stats))
        self.argv = " ".join(argv)
        deadline = time.monotonic() + 15
        for p, stats in self.procs:
            while not os.path.exists(stats):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise C.Fail("shim pid %d did not start (exit %s): %s"
                                 % (p.pid, p.poll(), C.tail(os.path.join(d, "shim0.log"))))
                time.sleep(0.02)

    def pids(self):
        return [p.pid for p, _ in self.procs]

    def stats(self):
        """{listener: {counter: total over the processes}}."""
        totals = {}
        self.sessions = {}      # {listener: {"version cipher": count}}
        for p, path in self.procs:
            if p.poll() is not None:
                raise C.Fail("shim pid %d exited with %s" % (p.pid, p.returncode))
            with open(path) as f:
                seq = json.load(f)["seq"]
            os.kill(p.pid, signal.SIGUSR1)          # our own child
            deadline = time.monotonic() + 5
            while True:
                try:
                    with open(path) as f:
                        data = json.load(f)
                    if data["seq"] > seq:
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise C.Fail("shim pid %d wrote no counters" % p.pid)
                time.sleep(0.005)
            for name, counters in data["listeners"].items():
                t = totals.setdefault(name, {})
                for k, v in counters.items():
                    t[k] = t.get(k, 0) + v
            for name, kinds in data["sessions"].items():
                t = self.sessions.setdefault(name, {})
                for k, v in kinds.items():
                    t[k] = t.get(k, 0) + v
        return totals


def delta(after, before):
    return {name: {k: v - before.get(name, {}).get(k, 0) for k, v in c.items()}
            for name, c in after.items()}


def tls_problems(target, d, n, size, sinks_used, mode):
    """What the shims' counters of one run (d: deltas) say against TLS on
    both sides for a TLS target, or against any TLS for a plain one."""
    out = []
    cli = d["client:" + target]
    tls = not target.endswith("-plain")
    if cli["failed"] or cli["refused"]:
        out.append("client shim: %d failed" % cli["failed"])
    if cli["conns"] < 1:
        out.append("client shim saw no connection")
    if tls and (cli["tls"] != cli["conns"] or cli["plain"]):
        out.append("client side: %d of %d connections under TLS"
                   % (cli["tls"], cli["conns"]))
    if not tls and cli["tls"]:
        out.append("client side: %d TLS sessions on a plain target" % cli["tls"])
    if cli["bytes"] < n * size:
        out.append("client shim relayed %d bytes < %d" % (cli["bytes"], n * size))
    for sink in SINKS:
        srv = d["server:%s-%s" % (target, sink)]
        if srv["failed"] or srv["refused"]:
            out.append("%s shim: %d failed, %d commands refused before STARTTLS"
                       % (sink, srv["failed"], srv["refused"]))
        if not tls and srv["tls"]:
            out.append("%s side: %d TLS sessions on a plain target" % (sink, srv["tls"]))
        if tls and srv["plain"]:
            out.append("%s side: %d connections without TLS" % (sink, srv["plain"]))
        if sink in sinks_used and srv["bytes"] < n * size:
            out.append("%s shim relayed %d bytes%s < %d" % (
                sink, srv["bytes"], " under TLS" if tls else "", n * size))
    return out


# ----------------------------------------------------------------- proxies

def dovecot_route(port, mode):
    extra = {"starttls": " starttls=yes", "implicit": " ssl=yes", "plain": ""}[mode]
    return "proxy=y host=localhost hostip=127.0.0.1 port=%d%s" % (port, extra)


def start_dovecot(wd, name, routes, certs, mode):
    """Dovecot's LMTP proxy with TLS on both sides (mode starttls or
    implicit) or none (plain)."""
    ca, certificate, key = certs
    settings = "ssl = no"
    if mode != "plain":
        settings = ("ssl = required\nssl_cert = <%s\nssl_key = <%s\nssl_client_ca_file = %s"
                    % (certificate, key, ca))
    return C.DovecotProxy(wd, routes, {}, name=name, settings=settings,
                          listener="ssl = yes" if mode == "implicit" else "",
                          route=lambda port: dovecot_route(port, mode),
                          greets=mode != "implicit")


def our_yaml(port, sinkPorts, certs, mode):
    """mode: starttls, implicit or plain."""
    ca, certificate, key = certs
    workers = int(os.environ.get("WORKERS") or 1)
    lines = ["config:", "  socket: [127.0.0.1, %d]" % port,
             "  workers: %d" % workers]
    if mode == "starttls":
        lines += ["  tls: {certificate: %s, key: %s}" % (certificate, key),
                  "  require_tls: true"]
    elif mode == "implicit":
        lines.append("  tls: {certificate: %s, key: %s, implicit: true}" % (certificate, key))
    lines.append("backends:")
    for name, p in sinkPorts.items():
        if mode == "plain":
            lines.append("  %s: {host: 127.0.0.1, port: %d}" % (name, p))
        else:
            lines.append("  %s: {host: 127.0.0.1, port: %d, tls: %s, ca_file: %s, "
                         "server_name: localhost}" % (name, p, mode, ca))
    lines.append("users:")
    lines += ['  "%s": %s' % (user, backend) for user, backend in USERS.items()]
    lines.append('  "@bench.test": sinkA')
    return "\n".join(lines) + "\n"


class Ours:
    """twistd -n lmtp-proxy from $VENV (else REPO/.venv), waited for by its
    port (C.OurProxy waits for a greeting in clear)."""

    def __init__(self, wd, name, sinkPorts, certs, mode):
        self.dir = d = os.path.join(wd, name)
        os.makedirs(d, exist_ok=True)
        self.port = C.free_port()
        self.yaml = our_yaml(self.port, sinkPorts, certs, mode)
        config = os.path.join(d, "proxy.yaml")
        with open(config, "w") as f:
            f.write(self.yaml)
        self.log = os.path.join(d, "proxy.log")
        twistd = os.path.join(C.venv_dir(), "bin", "twistd")
        self.proc = C.spawn(name, [twistd, "-n", "--pidfile=", "--logfile=" + self.log,
                                   "lmtp-proxy", "--config", config],
                            os.path.join(d, "twistd.out"), cwd=d)
        C.wait_port(self.port, 60, self.proc)


def count_lines(path, *needles):
    """How many lines of the file, and of its rotated copies (twistd's
    path.1, path.2...), hold every one of C{needles}."""
    n = 0
    for name in glob.glob(glob.escape(path) + "*"):
        try:
            with open(name, errors="replace") as f:
                for line in f:
                    if all(x in line for x in needles):
                        n += 1
        except OSError:
            pass
    return n


# ------------------------------------------------------------------ matrix

def fmt_rate(v):
    return "%.0f" % v if v else "FAIL"


def overhead_us(tls, plain):
    return "%+.0f" % (1e6 / tls - 1e6 / plain) if tls and plain else "-"


def tls_main(a, wd, smtp_source, routing_check, med):
    """The --tls cells; returns the list of failures."""
    mode = getattr(a, "tls_mode", None) or os.environ.get("TLS_MODE") or "starttls"
    if mode not in ("starttls", "implicit"):
        raise C.Fail("--tls-mode must be starttls or implicit, not %r" % mode)
    nshims = int(os.environ.get("TLS_SHIMS") or os.cpu_count() or 1)
    cmdline = os.environ.get("BENCH_CMDLINE") or " ".join(
        [os.path.relpath(sys.argv[0], C.REPO)] + sys.argv[1:])
    envdesc = " ".join("%s=%s" % (k, os.environ[k]) for k in
                       ("QUICK", "VENV", "RUNS", "MSGS", "MSGS_LARGE", "WORKERS",
                        "TLS_MODE", "TLS_SHIMS") if k in os.environ)
    failures = []
    t_start = time.time()
    certs = make_certificates(os.path.join(wd, "tls"))
    A = C.Sink(wd, "sinkA")
    B = C.Sink(wd, "sinkB")
    sinks = {"sinkA": A, "sinkB": B}

    # Ports first: the shims are up before the proxies that connect to them.
    def variant(t):
        return "plain" if t.endswith("-plain") else mode

    servers = {"%s-%s" % (t, s): (C.free_port(), sinks[s].port, variant(t))
               for t in TARGETS for s in SINKS}
    sinkPorts = {t: {s: servers["%s-%s" % (t, s)][0] for s in SINKS} for t in TARGETS}
    proxies = {}
    for t in TARGETS:
        if t.startswith("ours"):
            proxies[t] = Ours(wd, t, sinkPorts[t], certs, variant(t))
        else:
            routes = {user: sinkPorts[t][backend] for user, backend in USERS.items()}
            routes["bench@bench.test"] = sinkPorts[t]["sinkA"]
            proxies[t] = start_dovecot(wd, t, routes, certs, variant(t))
    clients = {t: (C.free_port(), proxies[t].port, variant(t)) for t in TARGETS}
    shims = Shims(wd, certs, clients, servers, nshims)
    targets = [(t, clients[t][0]) for t in TARGETS]
    for t, port in targets:
        C.wait_greeting(port, 15)
        before = shims.stats()
        failures += ["tls routing check %s: %s" % (t, p)
                     for p in routing_check(t, port, [A, B])]
        d = delta(shims.stats(), before)
        failures += ["tls routing check %s: %s" % (t, p)
                     for p in tls_problems(t, d, 1, 0, (), mode)]

    rows, runrows, cpurows = [], [], []
    for size in a.sizes:
        n = a.msgs if size <= 10240 else a.msgs_large
        for s in a.sessions:
            for r in a.rcpts:
                for conn in a.conn:
                    label = "%d KB s=%d r=%d %s" % (size // 1024, s, r, conn)
                    to = "bench@bench.test" if r == 1 else "bench@split.test"
                    want = {"sinkA": n, "sinkB": n if r > 1 else 0}
                    used = [k for k, v in want.items() if v]
                    rates = {t: [] for t in TARGETS}
                    sessions = {t: [] for t in TARGETS}
                    cpu = {t: [] for t in TARGETS}
                    for run in range(a.runs):
                        rot = run % len(targets)
                        for t, port in targets[rot:] + targets[:rot]:
                            before = {x.name: x.mesg() for x in (A, B)}
                            sbefore = shims.stats()
                            cpu0 = (C.cpu_s(C.tree(proxies[t].proc.pid)), C.cpu_s(shims.pids()))
                            dt, info = smtp_source(port, n, s, r, size, to,
                                                   conn == "keep", a.timeout)
                            cpu1 = (C.cpu_s(C.tree(proxies[t].proc.pid)), C.cpu_s(shims.pids()))
                            got = C.settle([A, B], {k: before[k] + v for k, v in want.items()})
                            dsink = {k: got[k] - before[k] for k in got}
                            d = delta(shims.stats(), sbefore)
                            bad = []
                            if dt is None:
                                bad.append(info.splitlines()[0] if info else "failed")
                            if dsink != want:
                                bad.append("sink deltas %s, expected %s" % (dsink, want))
                            bad += tls_problems(t, d, n, size, used, mode)
                            if bad:
                                msg = "tls %s %s run %d: %s" % (t, label, run + 1, "; ".join(bad))
                                C.log("FAIL " + msg)
                                failures.append(msg)
                                continue
                            rates[t].append(n / dt)
                            cpu[t].append(tuple((y - x) * 1e6 / n for x, y in zip(cpu0, cpu1)))
                            sessions[t].append((d["client:" + t]["tls"],
                                                sum(d["server:%s-%s" % (t, x)]["tls"]
                                                    for x in SINKS)))
                            C.log("tls %-13s %-20s run %d: %7.1f msg/s  sinks %s  TLS "
                                  "sessions client %d backend %d"
                                  % (t, label, run + 1, n / dt,
                                     " ".join("%s+%d" % kv for kv in sorted(dsink.items())),
                                     *sessions[t][-1]))
                    m = {t: med(rates[t]) for t in TARGETS}
                    rows.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                        label, fmt_rate(m["ours-plain"]), fmt_rate(m["ours-tls"]),
                        fmt_rate(m["dovecot-plain"]), fmt_rate(m["dovecot-tls"]),
                        "%.2fx" % (m["ours-tls"] / m["dovecot-tls"])
                        if m["ours-tls"] and m["dovecot-tls"] else "-",
                        overhead_us(m["ours-tls"], m["ours-plain"]),
                        overhead_us(m["dovecot-tls"], m["dovecot-plain"])))
                    print(rows[-1], flush=True)
                    cpurows.append("| %s | %s |" % (label, " | ".join(
                        "%.0f / %.0f" % (med([x[0] for x in cpu[t]]), med([x[1] for x in cpu[t]]))
                        if cpu[t] else "-" for t in TARGETS)))
                    runrows.append("| %s | %s |" % (label, " | ".join(
                        ", ".join("%.0f" % x for x in rates[t]) or "FAIL" for t in TARGETS))
                        + " %s |" % " | ".join(
                        ", ".join("%d/%d" % x for x in sessions[t]) or "-"
                        for t in ("ours-tls", "dovecot-tls")))
    elapsed = time.time() - t_start

    # The proxies' own word, over the whole run: ours logs each TLS session,
    # Dovecot each failure.
    totals = shims.stats()
    evidence = [
        "ours-tls log: %d client TLS sessions (shims: %d), %d backend TLS sessions "
        "(shims: %d), %d failed client handshakes"
        % (count_lines(proxies["ours-tls"].log, "client ", ": TLS "),
           totals["client:ours-tls"]["tls"],
           count_lines(proxies["ours-tls"].log, "backend ", ": TLS "),
           sum(totals["server:ours-tls-%s" % x]["tls"] for x in SINKS),
           count_lines(proxies["ours-tls"].log, "TLS handshake failed")),
        "ours-plain log: %d TLS sessions" % count_lines(proxies["ours-plain"].log, ": TLS "),
        "Dovecot logs: %d lines with an error" % sum(
            count_lines(proxies[t].log, "rror") for t in ("dovecot-tls", "dovecot-plain")),
    ]
    kinds = {}
    for name, ks in shims.sessions.items():
        for k, v in ks.items():
            kinds.setdefault(k, []).append("%s %d" % (name, v))
    evidence.append("TLS sessions by version and cipher: " + "; ".join(
        "%s: %s" % (k, ", ".join(v)) for k, v in sorted(kinds.items())))
    md = render(a, mode, nshims, cmdline, envdesc, elapsed, rows, runrows, cpurows,
                proxies, totals, evidence, failures)
    C.update_section(a.results, "tls", md)
    C.log("results written to %s" % a.results)
    print("\n" + md)
    return failures


def tls_versions_md():
    """The TLS libraries of the shims, ours and Dovecot, as list items."""
    py = os.path.join(C.venv_dir(), "bin", "python")
    ours = C._cmd_out([py, "-c", "import OpenSSL, OpenSSL.SSL as S; print('pyOpenSSL', "
                       "OpenSSL.__version__, 'on', S.SSLeay_version(S.SSLEAY_VERSION)"
                       ".decode())"])
    return "\n".join([
        "* **TLS, ours**: %s" % ours,
        "* **TLS, Dovecot**: system %s" % C._cmd_out(["openssl", "version"]),
        "* **TLS, shims**: Python %s ssl on %s" % (sys.version.split()[0],
                                                 ssl.OPENSSL_VERSION)])


def render(a, mode, nshims, cmdline, envdesc, elapsed, rows, runrows, cpurows, proxies,
           totals, evidence, failures):
    ours_yaml = proxies["ours-tls"].yaml.split("users:")[0] + "users: ...\n"
    with open(proxies["dovecot-tls"].conf) as f:
        dconf = f.read()
    dconf = dconf[dconf.index("ssl ="):dconf.index("default_internal_user")]
    route = dovecot_route(0, mode).replace("port=0", "port=SHIM")
    if mode == "starttls":
        how = ("STARTTLS on both sides: smtp-source -> shim client (LHLO, STARTTLS, TLS "
               "verifying the bench CA and the name `localhost`, then the client's own "
               "LHLO under TLS) -> proxy -> STARTTLS to the shim server in front of each "
               "smtp-sink (greets, offers STARTTLS, refuses anything else in clear, "
               "then relays to the sink under TLS)")
    else:
        how = ("TLS from the first byte on both sides: smtp-source -> shim client "
               "(TLS verifying the bench CA and `localhost`) -> proxy -> TLS to the shim "
               "server in front of each smtp-sink")
    out = [
        "## TLS on both sides (tls)", "",
        "Command: `%s%s` (run %s, %.0f s).  Machine and versions:" % (
            (envdesc + " ") if envdesc else "", cmdline,
            time.strftime("%Y-%m-%d %H:%M:%S %Z"), elapsed),
        "", C.machine_md() + "\n" + tls_versions_md(), "",
        "%s.  The shim is `bench/starttls_shim.py` (asyncio + ssl, %d processes "
        "sharing each port with SO_REUSEPORT), the same for every target.  "
        "Targets interleaved in every run of every cell (the order rotates); "
        "`-plain` are the same proxies without TLS through the same shims relaying "
        "only, so the overhead is TLS alone.  msg/s, median of %d run(s) of %d "
        "messages (%d above 10 KB).  r=1 to `bench@bench.test` (-> sinkA), r=5 "
        "`5bench@split.test ... bench@split.test` split odd -> sinkA, even -> "
        "sinkB.  `new` = a connection per message, `keep` = smtp-source -d.  "
        "TLS overhead = 1e6/TLS rate - 1e6/plain rate, in microseconds of wall "
        "time per message.  Target: ours/Dovecot with TLS at least 1.0x in every "
        "cell." % (how, nshims, a.runs, a.msgs, a.msgs_large),
        "",
        "Ours (`ours-tls`; `ours-plain` has neither `tls` nor `require_tls` and "
        "plain backends):", "", "```yaml", ours_yaml.rstrip("\n"), "```", "",
        "Dovecot (`dovecot-tls`; `dovecot-plain` has `ssl = no` and no TLS "
        "field), %s, listener without `ssl = yes`%s, passdb (passwd-file) extra "
        "fields `%s`%s:" % (
            "`dovecot.conf` as in `bench/tlscells.py`", " (LMTP STARTTLS)"
            if mode == "starttls" else " replaced by `ssl = yes`", route,
            ".  Dovecot 2.3 has no setting that refuses LMTP mail in clear "
            "(`ssl = required` is about plaintext authentication: MAIL before "
            "STARTTLS gets 250 there), ours has (`require_tls: true`: 530), which "
            "can only cost ours; the shims make both sides use TLS anyway"
            if mode == "starttls" else ""),
        "", "```", dconf.rstrip("\n"), "```", "",
        "| cell | ours plain | ours TLS | Dovecot plain | Dovecot TLS | ours/Dovecot TLS "
        "| ours TLS overhead us/msg | Dovecot TLS overhead us/msg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"] + rows + [
        "",
        "Every run (msg/s, in run order within the cell), and the TLS sessions set "
        "up in each run as client side/backend side (ours keeps backend connections "
        "in its pool, Dovecot opens them per client session):", "",
        "| cell | %s | TLS sessions ours | TLS sessions Dovecot |" % " | ".join(TARGETS),
        "| --- |" + " --- |" * (len(TARGETS) + 2)] + runrows + [
        "",
        "CPU per message in microseconds (median over the runs), the proxy's "
        "processes (with Dovecot's reaped lmtp processes) / the shims' (both "
        "sides), from /proc: the shims cost the same path for every target.", "",
        "| cell | %s |" % " | ".join(TARGETS),
        "| --- |" + " --- |" * len(TARGETS)] + cpurows + [
        "",
        "TLS check, totals over the run from the shims: " + "; ".join(
            "%s %s" % (name, " ".join("%s=%d" % kv for kv in c.items() if kv[0] != "bytes"))
            for name, c in sorted(totals.items())) + ".  " + "; ".join(evidence) + ".",
        ""]
    if failures:
        out += ["**FAIL** (%d):" % len(failures), ""] + ["* " + f for f in failures]
    else:
        out.append("Check: OK - every run delivered exactly the expected number of "
                   "messages to each sink, and the shims saw TLS on both sides of "
                   "every TLS run (every client connection under verified TLS, the "
                   "message bytes to the sinks relayed only under TLS, nothing "
                   "refused in clear) and none in the plain runs.")
    return "\n".join(out) + "\n"
