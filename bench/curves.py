#!/usr/bin/env python3
"""Cost curves: our proxy side by side with Dovecot's LMTP proxy.

Four curves, each its own section of RESULTS.md (and a panel of one PNG
when matplotlib is importable):

* sessions (curves-sessions): 1 KB, 1 recipient, kept connections
  (smtp-source -d -s N), N = 1, 10, 100, 1000 concurrent sessions:
  throughput (msg/s) and the latency of a probe client (one kept session
  of its own sending one message every 20 ms during the load, MAIL ..
  final reply timed): p50 and p99.
* rcpts (curves-rcpts): 1 KB, kept connections, 10 sessions, 1 / 5 / 50
  recipients per message, recipient i routed to backend i mod K over K = 2
  and K = 10 backends (one smtp-sink each): msg/s and rcpt/s.
* table (curves-table): our proxy only, routing tables of 1k, 100k and 1M
  routes from the YAML file and from PostgreSQL: RCPT round trip (median
  and p99) over recipients picked at random from the table, and the
  in-process route() cost.  Dovecot's passwd-file passdb is a different
  lookup altogether, so it is not in this curve.
* size (curves-size): 1 KB, 100 KB, 10 MB, 1 session, 1 recipient, kept
  connection: MB/s and msg/s, our proxy's peak RSS (VmHWM reset per point,
  and RSS sampled) and that of Dovecot's lmtp processes.

Every point runs a warm-up per target (which also sizes the runs: enough
messages that a run lasts --seconds at the faster target's warm-up rate),
then --runs runs with the targets interleaved (the order rotating from run
to run); figures are the median of the runs and every run is listed.
After every run (warm-up included) each sink's mesg counter must have moved
by exactly the messages routed to it; anything else is a FAIL (exit 1).

    bench/curves.py [--quick] [--runs N] [--curves sessions,rcpts,table,size]
                    [--no-dovecot] [--results PATH] [--png PATH | --no-png]
                    [--seconds S] [--sessions 1,10,100,1000] [--rcpts 1,5,50]
                    [--backends 2,10] [--routes 1000,100000,1000000]
                    [--sources yaml,pg] [--sizes 1024,102400,10485760]
                    [--samples N] [--workdir DIR]

The PNG goes to --png (default: curves.png next to the --results file),
drawn by this run's figures, when matplotlib is importable by the Python
running this script; otherwise it says "no PNG: matplotlib not installed"
(matplotlib is no dependency of the project).

Environment: VENV (our proxy's venv, default REPO/.venv), WORKERS (our
proxy's workers; default 1, the default shipped, as bench.py), STRICT=1 (a curve that
is not flat, TARGET MISSED, exits 1 too).
"""

import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402  smtp_source(), probe_routes()
import common as C  # noqa: E402
import scale as S  # noqa: E402  Postgres, user(), node_yaml(), lmtp_proxy(), until_served()

FROM = B.FROM
PROBE_RCPT = "probe@probe.test"
CURVES = ("sessions", "rcpts", "table", "size")
KB, MB = 1024, 1024 * 1024


def parse_args():
    env = os.environ
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    default=env.get("QUICK", "") not in ("", "0"),
                    help="short runs, one run per point, tables up to 100k")
    ap.add_argument("--runs", type=int, default=int(env.get("RUNS", 0)) or None)
    ap.add_argument("--curves", type=B.csv(str), default=list(CURVES))
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--results", default=os.path.join(C.HERE, "RESULTS.md"))
    ap.add_argument("--png", help="default: curves.png next to --results")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--seconds", type=float,
                    help="length of a run at the faster target's warm-up "
                    "rate (default 3, quick 1)")
    ap.add_argument("--sessions", type=B.csv(int), default=[1, 10, 100, 1000])
    ap.add_argument("--rcpts", type=B.csv(int), default=[1, 5, 50])
    ap.add_argument("--backends", type=B.csv(int), default=[2, 10])
    ap.add_argument("--routes", type=B.csv(int))
    ap.add_argument("--sources", type=B.csv(str), default=["yaml", "pg"])
    ap.add_argument("--sizes", type=B.csv(int), default=[KB, 100 * KB, 10 * MB])
    ap.add_argument("--samples", type=int,
                    help="RCPTs per run and table (default 3000, quick 500)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="max seconds for one smtp-source run")
    ap.add_argument("--workdir")
    ap.add_argument("--keep-workdir", action="store_true")
    a = ap.parse_args()
    bad = [c for c in a.curves if c not in CURVES]
    if bad:
        ap.error("unknown curve(s) %s (known: %s)" % (",".join(bad), ",".join(CURVES)))
    bad = [s for s in a.sources if s not in ("yaml", "pg")]
    if bad:
        ap.error("unknown source(s) %s (yaml, pg)" % ",".join(bad))
    if a.quick:
        a.runs = a.runs or 1
        a.seconds = a.seconds or 1.0
        a.routes = a.routes or [1000, 10000, 100000]
        a.samples = a.samples or 500
    a.runs = a.runs or 3
    a.seconds = a.seconds or 3.0
    a.routes = a.routes or [1000, 100000, 1000000]
    a.samples = a.samples or 3000
    if not a.png:
        a.png = os.path.join(os.path.dirname(os.path.abspath(a.results)), "curves.png")
    return a


def workers():
    """Our proxy's workers, and where the number comes from."""
    if os.environ.get("WORKERS"):
        return int(os.environ["WORKERS"]), "from WORKERS"
    return 1, "the default shipped, as bench.py; WORKERS=N to change"


# ------------------------------------------------------------------- Dovecot

# Appended to Dovecot's config: one lmtp process per session (Dovecot's
# client_limit 1 for lmtp), so 1000 sessions need process_limit above the
# default 100, and auth (client_limit = default_client_limit, 1000) one
# connection per lmtp process beyond that.
DOVECOT_LIMITS = """\
# bench/curves.py: room for 1000 concurrent sessions and the probe
default_client_limit = 4000
service lmtp {
  process_limit = 1100
}
"""
DOVECOT_SETTINGS = ("service/lmtp/process_limit", "service/lmtp/client_limit",
                    "default_process_limit", "default_client_limit",
                    "service/auth/client_limit")


class CurvesDovecot(C.DovecotProxy):
    """common.DovecotProxy with DOVECOT_LIMITS appended to its config."""

    def __init__(self, workdir, users, domains, name):
        super().__init__(workdir, users, domains, name=name, extra=DOVECOT_LIMITS)
        done = subprocess.run(["doveconf", "-c", self.conf] + list(DOVECOT_SETTINGS),
                              capture_output=True, text=True)
        self.limits = ", ".join(line.strip() for line in done.stdout.splitlines())

    def lmtp_workers(self):
        """PIDs of the master's lmtp children."""
        out = []
        for pid in C.tree(self.proc.pid)[1:]:
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "lmtp":
                        out.append(pid)
            except OSError:
                pass
        return out

    def warnings(self):
        try:
            with open(self.log, errors="replace") as f:
                lines = [line.strip() for line in f
                         if ("Warning" in line or "Error" in line or "Fatal" in line)
                         # smtp-sink's LHLO reply has an empty parameter
                         and "invalid EHLO response line" not in line]
        except OSError:
            return []
        seen, out = set(), []
        for line in lines:
            key = line.split(": ", 1)[-1]
            if key not in seen:
                seen.add(key)
                out.append(line)
        return out


# ------------------------------------------------------------ measurements

class Probe(threading.Thread):
    """One kept session sending a 1 KB message every C{every} seconds;
    times MAIL .. the final reply."""

    def __init__(self, port, every=0.02):
        super().__init__(daemon=True)
        self.port, self.every = port, every
        self.times, self.errors, self.delivered = [], [], 0
        self._halt = threading.Event()
        self.body = C.make_body(1000, "probe")
        self.client = C.LMTPClient(port)     # connected before the load

    def run(self):
        nxt = time.perf_counter()
        while not self._halt.is_set():
            t0 = time.perf_counter()
            try:
                replies = self.client.send(FROM, [PROBE_RCPT], self.body)
            except (OSError, C.LMTPError) as e:
                self.errors.append("probe: %s" % e)
                try:
                    self.client.sock.close()
                    self.client = C.LMTPClient(self.port)
                except (OSError, C.LMTPError) as e2:
                    self.errors.append("probe reconnect: %s" % e2)
                    return
                continue
            dt = time.perf_counter() - t0
            if len(replies) == 1 and replies[0][0].startswith("2"):
                self.delivered += 1
                self.times.append(dt)
            else:
                self.errors.append("probe replies %r" % (replies,))
            nxt = max(nxt + self.every, time.perf_counter())
            self._halt.wait(max(0.0, nxt - time.perf_counter()))

    def finish(self):
        self._halt.set()
        self.join(120)
        self.client.quit()


class RssSampler(threading.Thread):
    """Largest RSS of one process among C{pids()}, every C{every} s."""

    def __init__(self, pids, every=0.02):
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.peak = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            for pid in self.pids():
                try:
                    self.peak = max(self.peak, C.rss_kb(pid))
                except (OSError, KeyError):
                    pass
            self._halt.wait(self.every)

    def finish(self):
        self._halt.set()
        self.join(5)
        return self.peak


def listen_overflows():
    """The kernel's TcpExt ListenOverflows counter (connections dropped
    because a listener's accept queue was full; the whole network
    namespace), or None."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            if "ListenOverflows" in row:
                return int(row["ListenOverflows"])
    return None


def listen_backlog(port):
    """The accept-queue length of the listener on 127.0.0.1:port (ss's
    Send-Q for a listening socket), or None."""
    try:
        out = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], capture_output=True,
                             text=True, timeout=10).stdout.split()
        return int(out[2])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def nice(x):
    """x rounded up to two significant digits."""
    if x <= 0:
        return 0
    d = 10 ** max(0, int(math.floor(math.log10(x))) - 1)
    return int(math.ceil(x / d) * d)


def run_once(tname, port, sinks, want, n, s, r, size, to, timeout, probe_sink=None):
    """One smtp-source run of C{n} messages into target C{tname} (and, with
    C{probe_sink}, a Probe on the same target meanwhile); the sinks' mesg
    counters are checked against C{want} (plus the probe's deliveries)."""
    before = {x.name: x.mesg() for x in sinks}
    probe = None
    rec = {"target": tname, "n": n, "secs": None, "rate": None, "err": None,
           "probe": None}
    overflows = listen_overflows()
    if probe_sink:
        try:
            probe = Probe(port)
            probe.start()
        except (OSError, C.LMTPError) as e:
            rec["err"] = "probe could not connect: %s" % e
    dt, info = B.smtp_source(port, n, s, r, size, to, True, timeout)
    if overflows is not None:
        rec["overflows"] = listen_overflows() - overflows
    expected = dict(want)
    if probe:
        probe.finish()
        expected[probe_sink] = expected.get(probe_sink, 0) + probe.delivered
        t = probe.times
        rec["probe"] = {"n": len(t), "p50": C.pct(t, 0.5) if t else None,
                        "p99": C.pct(t, 0.99) if t else None, "times": t,
                        "errors": probe.errors}
        if probe.errors:
            rec["err"] = "; ".join(probe.errors[:3])
    got = C.settle(sinks, {k: before[k] + v for k, v in expected.items()}, 10)
    rec["delta"] = {k: got[k] - before[k] for k in got}
    rec["want"] = {x.name: expected.get(x.name, 0) for x in sinks}
    rec["counters_ok"] = rec["delta"] == rec["want"]
    if dt is None:
        rec["err"] = info.splitlines()[0] if info else "smtp-source failed"
    else:
        rec["secs"] = dt
        rec["rate"] = n / dt
    rec["ok"] = rec["counters_ok"] and rec["err"] is None
    return rec


def run_point(a, label, targets, one_run, warm_n, lo, hi, failures, alive):
    """Warm-up per target, then a.runs interleaved runs of the same number
    of messages (sized from the warm-up); returns (n, records)."""
    recs = []

    def record(rec, run):
        rec["run"] = run
        recs.append(rec)
        extra = ""
        if rec.get("probe") and rec["probe"]["n"]:
            extra = "  probe p50 %.1f ms p99 %.1f ms (%d)" % (
                rec["probe"]["p50"] * 1e3, rec["probe"]["p99"] * 1e3, rec["probe"]["n"])
        C.log("%-8s %-22s %-7s %6d msgs %7.2f s %8.1f msg/s  sinks %s %s%s" % (
            rec["target"], label, run, rec["n"], rec["secs"] or 0, rec["rate"] or 0,
            fmt_delta(rec), "ok" if rec["ok"] else "FAIL " + str(rec["err"] or ""), extra))
        if not rec["ok"]:
            why = [rec["err"]] if rec["err"] else []
            if not rec["counters_ok"]:
                why.append("sink deltas %s, expected %s" % (rec["delta"], rec["want"]))
            failures.append("%s %s run %s: %s" % (rec["target"], label, run, "; ".join(why)))

    def go(tname, port, n, run):
        if not alive(tname):
            rec = {"target": tname, "n": n, "secs": None, "rate": None, "probe": None,
                   "err": "process is gone", "delta": {}, "want": {},
                   "counters_ok": False, "ok": False}
        else:
            rec = one_run(tname, port, n)
        record(rec, run)

    for tname, port in targets:
        go(tname, port, warm_n, "warm-up")
    rates = [r["rate"] for r in recs if r["rate"]]
    n = max(lo, min(hi, nice(max(rates) * a.seconds))) if rates else lo
    for k in range(a.runs):
        order = targets[k % len(targets):] + targets[:k % len(targets)]
        for tname, port in order:
            go(tname, port, n, str(k + 1))
    return n, recs


def med_of(recs, tname, key="rate"):
    v = [r[key] for r in recs if r["target"] == tname and r["run"] != "warm-up"
         and r.get(key)]
    return C.median(v) if v else None


def spread(v):
    return (max(v) - min(v)) / C.median(v) if len(v) >= 2 and C.median(v) else None


def fmt_delta(rec):
    if not rec.get("want"):
        return "-"
    return " ".join("%s+%d%s" % (k, rec["delta"].get(k, 0),
                                 "" if rec["delta"].get(k, 0) == v else "(want %d)" % v)
                    for k, v in sorted(rec["want"].items()) if v or rec["delta"].get(k))


def check_routes(tname, port, sinks, cases, failures):
    """bench.probe_routes, its problems added to C{failures}; whether none."""
    problems = B.probe_routes(tname, port, sinks, cases)
    failures += ["routing check %s: %s" % (tname, p) for p in problems]
    return not problems


def start_ours(wd, name, backends, users, W, failures):
    try:
        p = C.OurProxy(wd, backends=backends, users=users, name=name, workers=W)
    except C.Fail as e:
        C.log("FAIL: our proxy did not start:\n%s" % e)
        failures.append("our proxy (%s) did not start: %s" % (name, str(e).splitlines()[0]))
        return None
    wait_workers(p, W, 120)
    C.log("%s up in %.2f s: pid %d port %d" % (name, p.startup_s, p.pid, p.port))
    return p


def wait_workers(proxy, W, timeout):
    """With workers > 1, until the master logs that every worker serves
    (a connection may land on any of them)."""
    if W <= 1:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(proxy.logfile, errors="replace") as f:
                if "worker process(es) serving" in f.read():
                    return True
        except OSError:
            pass
        if not proxy.alive():
            return False
        time.sleep(0.1)
    return False


def start_dovecot(wd, name, users, failures):
    try:
        d = CurvesDovecot(wd, users, {}, name=name)
    except (C.Fail, subprocess.CalledProcessError) as e:
        C.log("FAIL: Dovecot did not start: %s" % e)
        failures.append("Dovecot (%s) did not start: %s" % (name, str(e).splitlines()[0]))
        return None
    C.log("%s up: pid %d port %d; %s" % (name, d.proc.pid, d.port, d.limits))
    return d


def alive_fn(ours, dove):
    def alive(tname):
        obj = ours if tname == "ours" else dove
        return obj is not None and obj.proc.poll() is None
    return alive


# ------------------------------------------------------------------ render

def ms(x):
    return "-" if x is None else "%.1f" % (x * 1e3)


def num(x, fmt="%.0f"):
    return "-" if x is None else fmt % x


def ratio(x, y):
    return "%.2f" % (x / y) if x and y else "-"


def runs_table(points, extra_cols=()):
    """Every run of every point: [(label, recs)]; extra_cols: [(header,
    fn(rec))]."""
    head = ["point", "run", "target", "msgs", "seconds", "msg/s"] + \
        [h for h, _ in extra_cols] + ["sinks: received (expected if not)", "check"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, recs in points:
        for r in recs:
            shown = [(k, v) for k, v in sorted(r["want"].items())
                     if v or r["delta"].get(k, 0)]
            sinks = ", ".join("%s %d%s" % (k, r["delta"].get(k, 0),
                                           "" if r["delta"].get(k, 0) == v else " (%d)" % v)
                              for k, v in shown)
            if len(shown) < len(r["want"]):
                sinks += "%sothers 0" % (", " if shown else "")
            check = "ok" if r["ok"] else "**FAIL**%s" % (
                (": " + r["err"][:120]) if r.get("err") else "")
            out.append("| " + " | ".join(
                [label, r["run"], r["target"], str(r["n"]), num(r["secs"], "%.2f"),
                 num(r["rate"], "%.1f")] + [fn(r) for _, fn in extra_cols] +
                [sinks or "-", check]) + " |")
    return out


def header(title, name, a, ctx, elapsed, W, Wsrc, runs=None):
    return [
        "## %s (%s)" % (title, name), "",
        "Command: `%s` (run %s, this curve %.0f s).  Machine: %s." % (
            ctx["cmdline"], time.strftime("%Y-%m-%d %H:%M:%S %Z"), elapsed, ctx["machine"]),
        "",
        "Our proxy: `workers: %d` (%s), `pool_size` as shipped, from `%s`.  %s" % (
            W, Wsrc, C.venv_dir(), runs or
            "Runs: a warm-up per target (also listed, not in the medians) sizes "
            "the runs (messages for %.0f s at the faster target's warm-up rate); "
            "then %d run(s) per point, targets interleaved, the order rotating "
            "from run to run; figures are medians over the runs.  After every "
            "run each sink's `mesg` counter (smtp-sink -c) must have moved by "
            "exactly the messages routed to it." % (a.seconds, a.runs)),
        "",
    ]


def footer(failures, ctx, what=None):
    out = [""]
    if failures:
        out.append("**FAIL** (%d):" % len(failures))
        out.append("")
        out += ["* " + f for f in failures[:30]]
    else:
        out.append(what or "Counter check: OK - every run (warm-ups included) "
                   "delivered exactly the expected number of messages to each sink.")
    out.append("")
    out.append(ctx["plot"])
    return out


def dovecot_md(dove):
    if dove is None:
        return "Dovecot: **not measured** (--no-dovecot, or it failed to start)."
    warn = dove.warnings()
    return ("Dovecot: %s LMTP proxy (`lmtp_proxy = yes`, passwd-file passdb "
            "returning `proxy=y host=127.0.0.1 port=N`, one lmtp process per "
            "session), config of bench/common.py plus `default_client_limit = "
            "4000` and `service lmtp { process_limit = 1100 }` so that 1000 "
            "sessions fit (doveconf: %s).%s" % (
                C._cmd_out(["dovecot", "--version"]), dove.limits,
                ("  Its log warned: `%s`" % " / ".join(warn[:3])) if warn else ""))


# ------------------------------------------------------------ the curves

def curve_sessions(a, wd, ctx, W, Wsrc):
    t0 = time.monotonic()
    failures = []
    A, P = C.Sink(wd, "sess-sinkA"), C.Sink(wd, "sess-sinkP")
    sinks = [A, P]
    ours = start_ours(wd, "sess-proxy", {"sinkA": A.port, "sinkP": P.port},
                      [("bench@bench.test", "sinkA"), (PROBE_RCPT, "sinkP")], W, failures)
    dove = None if a.no_dovecot else start_dovecot(
        wd, "sess-dovecot", {"bench@bench.test": A.port, PROBE_RCPT: P.port}, failures)
    want0 = {"sess-sinkA": 0, "sess-sinkP": 0}
    targets = [(t, o.port) for t, o in (("ours", ours), ("dovecot", dove)) if o]
    for t, port in targets:
        check_routes(t, port, sinks, [(["bench@bench.test"], {"sess-sinkA": 1}),
                                      ([PROBE_RCPT], {"sess-sinkP": 1})], failures)
    backlog = {t: listen_backlog(port) for t, port in targets}
    alive = alive_fn(ours, dove)
    points = []
    for s in a.sessions:
        label = "%d sessions" % s
        if ours:
            for pid in ours.pids():
                C.reset_hwm(pid)

        def one(tname, port, n, s=s):
            return run_once(tname, port, sinks, dict(want0, **{"sess-sinkA": n}), n, s, 1,
                            KB, "bench@bench.test", a.timeout, probe_sink="sess-sinkP")

        warm = max(100 if a.quick else 500, s * (1 if a.quick else 2))
        lo = max(100 if a.quick else 300, s * (2 if a.quick else 5))
        n, recs = run_point(a, label, targets, one, warm, lo, 100000, failures, alive)
        hwm = C.largest_kb(C.hwm_kb, ours.pids()) if ours and ours.alive() else None
        points.append({"s": s, "n": n, "recs": recs, "hwm": hwm})
    elapsed = time.monotonic() - t0
    out = header("Cost curve: concurrent sessions", "curves-sessions", a, ctx, elapsed, W, Wsrc)
    out.append("1 KB messages (smtp-source -L -l 1024), 1 recipient (`bench@bench.test` -> "
               "sinkA), kept connections (smtp-source -d -s N).  Latency: a probe "
               "client (bench/common.py's LMTPClient, one kept session of its own, "
               "opened before the load) sends one 1 KB message to `%s` (-> sinkP, a "
               "sink of its own) every 20 ms while smtp-source runs, and times MAIL "
               "FROM .. the final reply; p50 / p99 over the probe's messages of all "
               "runs of the point (per run below).  A run sends at least %d "
               "messages per session.  `ours VmHWM`: the largest of our processes', "
               "reset before each point.  RLIMIT_NOFILE %d.  `listen "
               "overflows`: how much the kernel's TcpExt ListenOverflows counter "
               "(/proc/net/netstat, connections dropped because a listener's accept "
               "queue was full, whoever listens) rose during the run; a client "
               "whose connection was dropped so retries after 1 s, 3 s, 7 s...; the "
               "listeners' accept queues (ss, Send-Q): %s." % (
                   PROBE_RCPT, 2 if a.quick else 5, ctx["nofile"], ", ".join(
                       "%s %s" % (t, "?" if b is None else b) for t, b in backlog.items())))
    out.append("")
    out.append(dovecot_md(dove) if not a.no_dovecot else
               "Dovecot: not measured (--no-dovecot).")
    out.append("")
    tn = [t for t, _ in targets]
    head = ["sessions", "msgs/run"] + ["%s msg/s" % t for t in tn]
    if len(tn) == 2:
        head.append("ours/dovecot")
    for t in tn:
        head += ["%s probe p50 ms" % t, "%s probe p99 ms" % t]
    head.append("ours VmHWM")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for p in points:
        row = [str(p["s"]), str(p["n"])]
        meds = {t: med_of(p["recs"], t) for t in tn}
        row += [num(meds[t]) for t in tn]
        if len(tn) == 2:
            row.append(ratio(meds["ours"], meds["dovecot"]))
        lat = {}
        for t in tn:
            times = [x for r in p["recs"] if r["target"] == t and r["run"] != "warm-up"
                     and r["probe"] for x in r["probe"]["times"]]
            lat[t] = (C.pct(times, 0.5) if times else None, C.pct(times, 0.99) if times else None)
            row += [ms(lat[t][0]), ms(lat[t][1])]
        row.append(C.mb(p["hwm"]) if p["hwm"] else "-")
        out.append("| " + " | ".join(row) + " |")
        summary.append({"x": p["s"], "rate": meds, "p99": {t: lat[t][1] for t in tn},
                        "p50": {t: lat[t][0] for t in tn}})
    out += ["", "All runs:", ""]
    out += runs_table([("%d sessions" % p["s"], p["recs"]) for p in points], [
        ("probe msgs", lambda r: str(r["probe"]["n"]) if r["probe"] else "-"),
        ("probe p50 ms", lambda r: ms(r["probe"]["p50"]) if r["probe"] else "-"),
        ("probe p99 ms", lambda r: ms(r["probe"]["p99"]) if r["probe"] else "-"),
        ("listen overflows", lambda r: str(r["overflows"]) if "overflows" in r else "-")])
    out += footer(failures, ctx)
    stop_targets(ours, dove, sinks)
    return "\n".join(out) + "\n", failures, [], summary


def stop_targets(ours, dove, sinks):
    for o in (ours, dove):
        if o is not None:
            C.stop(o.name)
    for s in sinks:
        C.stop(s.name)


def split_addr(i, K):
    return ("%dbench@split%d.test" % (i, K)) if i > 1 else "bench@split%d.test" % K


def curve_rcpts(a, wd, ctx, W, Wsrc):
    t0 = time.monotonic()
    failures = []
    maxK, maxR = max(a.backends), max(a.rcpts)
    sinks = [C.Sink(wd, "rc-s%d" % j) for j in range(maxK)]
    users = []
    dusers = {}
    for K in a.backends:
        for i in range(1, maxR + 1):
            users.append((split_addr(i, K), sinks[i % K].name))
            dusers[split_addr(i, K)] = sinks[i % K].port
    ours = start_ours(wd, "rc-proxy", {s.name: s.port for s in sinks}, users, W, failures)
    dove = None if a.no_dovecot else start_dovecot(wd, "rc-dovecot", dusers, failures)
    targets = [(t, o.port) for t, o in (("ours", ours), ("dovecot", dove)) if o]
    cases = [([split_addr(i, K)], {sinks[i % K].name: 1})
             for K in a.backends for i in range(1, min(maxR, 2 * K) + 1)]
    for t, port in targets:
        check_routes(t, port, sinks, cases, failures)
    alive = alive_fn(ours, dove)
    points = []
    for K in a.backends:
        for r in a.rcpts:
            label = "%d backends, %d rcpt" % (K, r)
            hit = {sinks[i % K].name for i in range(1, r + 1)}

            def one(tname, port, n, K=K, r=r, hit=hit):
                want = {s.name: (n if s.name in hit else 0) for s in sinks}
                return run_once(tname, port, sinks, want, n, 10, r, KB,
                                "bench@split%d.test" % K, a.timeout)

            warm = max(10 if a.quick else 20, (100 if a.quick else 300) // r)
            lo = max(20 if a.quick else 50, (100 if a.quick else 300) // r)
            n, recs = run_point(a, label, targets, one, warm, lo, 100000, failures, alive)
            for rec in recs:
                rec["r"] = r
            points.append({"K": K, "r": r, "n": n, "recs": recs, "hit": len(hit)})
    elapsed = time.monotonic() - t0
    out = header("Cost curve: recipients per message", "curves-rcpts", a, ctx, elapsed, W, Wsrc)
    out.append("1 KB messages, kept connections, 10 sessions (smtp-source -L -d -s 10 "
               "-r R -t bench@splitK.test).  smtp-source numbers its recipients "
               "`Rbench@splitK.test` .. `2bench@splitK.test`, `bench@splitK.test` "
               "(recipient i, the last being i = 1); both proxies route recipient i "
               "to backend i mod K, over K = %s smtp-sink backends, so a message "
               "reaches min(R, K) backends and each of them gets it once (the "
               "exactly-once check below).  50 is Postfix's default "
               "`lmtp_destination_recipient_limit`." % " and ".join(map(str, a.backends)))
    out.append("")
    out.append(dovecot_md(dove) if not a.no_dovecot else
               "Dovecot: not measured (--no-dovecot).")
    out.append("")
    tn = [t for t, _ in targets]
    head = ["backends", "rcpts/msg", "backends hit", "msgs/run"]
    for t in tn:
        head += ["%s msg/s" % t, "%s rcpt/s" % t]
    if len(tn) == 2:
        head.append("ours/dovecot")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for p in points:
        meds = {t: med_of(p["recs"], t) for t in tn}
        row = [str(p["K"]), str(p["r"]), str(p["hit"]), str(p["n"])]
        for t in tn:
            row += [num(meds[t]), num(meds[t] * p["r"] if meds[t] else None)]
        if len(tn) == 2:
            row.append(ratio(meds["ours"], meds["dovecot"]))
        out.append("| " + " | ".join(row) + " |")
        summary.append({"K": p["K"], "x": p["r"], "rate": meds})
    out += ["", "All runs:", ""]
    out += runs_table([("K=%d r=%d" % (p["K"], p["r"]), p["recs"]) for p in points], [
        ("rcpt/s", lambda rec: num(rec["rate"] and rec["rate"] * rec["r"], "%.1f"))])
    out += footer(failures, ctx)
    stop_targets(ours, dove, sinks)
    return "\n".join(out) + "\n", failures, [], summary


def fmt_size(size):
    for unit, div in (("MB", MB), ("KB", KB)):
        if size >= div and size % div == 0:
            return "%d %s" % (size // div, unit)
    return "%d B" % size


def curve_size(a, wd, ctx, W, Wsrc):
    t0 = time.monotonic()
    failures = []
    A = C.Sink(wd, "size-sinkA")
    sinks = [A]
    ours = start_ours(wd, "size-proxy", {"sinkA": A.port}, [("bench@bench.test", "sinkA")],
                      W, failures)
    dove = None if a.no_dovecot else start_dovecot(
        wd, "size-dovecot", {"bench@bench.test": A.port}, failures)
    targets = [(t, o.port) for t, o in (("ours", ours), ("dovecot", dove)) if o]
    for t, port in targets:
        check_routes(t, port, sinks, [(["bench@bench.test"], {A.name: 1})], failures)
    alive = alive_fn(ours, dove)
    hwm_works = bool(ours) and all(C.reset_hwm(p) for p in ours.pids())
    points = []
    for size in a.sizes:
        label = fmt_size(size)
        time.sleep(0.5)
        idle = C.largest_kb(C.rss_kb, ours.pids()) if ours and ours.alive() else None
        if ours:
            for pid in ours.pids():
                C.reset_hwm(pid)
        samplers = {}
        if ours:
            samplers["ours"] = RssSampler(ours.pids)
        if dove:
            for pid in dove.lmtp_workers():
                C.reset_hwm(pid)
            samplers["dovecot"] = RssSampler(dove.lmtp_workers)
        for smp in samplers.values():
            smp.start()

        def one(tname, port, n, size=size):
            return run_once(tname, port, sinks, {A.name: n}, n, 1, 1, size,
                            "bench@bench.test", a.timeout)

        budget = (4 if a.quick else 20) * MB
        warm = max(3, min(300 if not a.quick else 100, budget // size))
        lo = max(5 if a.quick else 10, min(300 if not a.quick else 100, budget // size))
        n, recs = run_point(a, label, targets, one, warm, lo, 100000, failures, alive)
        for rec in recs:
            rec["size"] = size
        peaks = {t: smp.finish() for t, smp in samplers.items()}
        hwm = {}
        if ours and ours.alive():
            hwm["ours"] = max(C.largest_kb(C.hwm_kb, ours.pids()), peaks["ours"])
        if dove and dove.lmtp_workers():
            try:
                hwm["dovecot"] = max(C.largest_kb(C.hwm_kb, dove.lmtp_workers()),
                                     peaks["dovecot"])
            except ValueError:
                hwm["dovecot"] = peaks["dovecot"]
        points.append({"size": size, "n": n, "recs": recs, "idle": idle, "peak": hwm})
    elapsed = time.monotonic() - t0
    out = header("Cost curve: message size", "curves-size", a, ctx, elapsed, W, Wsrc)
    out.append("smtp-source -L -d -s 1 -r 1 -l SIZE (1 session, 1 recipient, kept "
               "connection) -> target -> smtp-sink.  MB/s = messages x SIZE / seconds "
               "(1 MB = 1024 KB = 1,048,576 bytes, the payload smtp-source sends; "
               "headers not counted).  Peak RSS: of the largest process - our "
               "master or a worker; Dovecot's largest lmtp process - VmHWM %s "
               "before each point's warm-up, together with RSS sampled every "
               "20 ms, over the warm-up and the runs of the point; `idle` is our "
               "proxy's RSS just before the point." % (
                   "reset through /proc/PID/clear_refs" if hwm_works else
                   "(**could not be reset** here, so only the sampled RSS counts)"))
    out.append("")
    out.append(dovecot_md(dove) if not a.no_dovecot else
               "Dovecot: not measured (--no-dovecot).")
    out.append("")
    tn = [t for t, _ in targets]
    head = ["size", "msgs/run"]
    for t in tn:
        head += ["%s MB/s" % t, "%s msg/s" % t]
    if len(tn) == 2:
        head.append("ours/dovecot")
    head += ["ours idle RSS", "ours peak RSS"]
    if "dovecot" in tn:
        head.append("dovecot lmtp peak RSS")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for p in points:
        meds = {t: med_of(p["recs"], t) for t in tn}
        row = [fmt_size(p["size"]), str(p["n"])]
        for t in tn:
            row += [num(meds[t] * p["size"] / MB if meds[t] else None, "%.1f"),
                    num(meds[t], "%.1f")]
        if len(tn) == 2:
            row.append(ratio(meds["ours"], meds["dovecot"]))
        row += [C.mb(p["idle"]) if p["idle"] else "-",
                C.mb(p["peak"]["ours"]) if p["peak"].get("ours") else "-"]
        if "dovecot" in tn:
            row.append(C.mb(p["peak"]["dovecot"]) if p["peak"].get("dovecot") else "-")
        out.append("| " + " | ".join(row) + " |")
        summary.append({"x": p["size"], "mbps": {t: meds[t] * p["size"] / MB if meds[t]
                                                 else None for t in tn},
                        "rss": {t: p["peak"].get(t) for t in tn}})
    missed = []
    ours_peaks = [p["peak"].get("ours") for p in points if p["peak"].get("ours")]
    if len(ours_peaks) >= 2:
        growth = max(ours_peaks) - min(ours_peaks)
        verdict = "flat" if growth < 20 * 1024 else "**TARGET MISSED**"
        out += ["", "Our peak RSS from the smallest to the largest message: %s .. %s "
                "(%s apart; flat = under 20 MB apart, memory.py's target for one "
                "message): %s." % (C.mb(min(ours_peaks)), C.mb(max(ours_peaks)),
                                   C.mb(growth), verdict)]
        if growth >= 20 * 1024:
            missed.append("size: our peak RSS grows by %s" % C.mb(growth))
    out += ["", "All runs:", ""]
    out += runs_table([(fmt_size(p["size"]), p["recs"]) for p in points], [
        ("MB/s", lambda rec: num(rec["rate"] and rec["rate"] * rec["size"] / MB, "%.1f"))])
    out += footer(failures, ctx)
    stop_targets(ours, dove, sinks)
    return "\n".join(out) + "\n", failures, missed, summary


# ------------------------------------------------------------------- table

LOOKUP = r"""
import sys
sys.path.insert(0, sys.argv[1])
import scale
import common
sys.path.insert(0, common.REPO)     # the working tree's lmtp_proxy, as scale.lookup_ns
source, n = sys.argv[2], int(sys.argv[3])
if source == "pg":
    print(scale.lookup_ns(n))
else:
    from lmtp_proxy.routing import RoutingTable
    print(scale.route_ns(RoutingTable({scale.user(i): "sinkA" for i in range(n)}, False, None), n))
"""


def lookup_ns(source, n):
    """ns per route() in a process of the venv's Python (scale.lookup_ns
    for the database source's LiveTable, scale.route_ns on RoutingTable)."""
    py = os.path.join(C.venv_dir(), "bin", "python")
    done = subprocess.run([py, "-c", LOOKUP, C.HERE, source, str(n)],
                          capture_output=True, text=True, timeout=600, cwd=C.REPO)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        C.log("lookup_ns %s %d failed: %s" % (source, n, done.stderr[-500:]))
        return None


BLOCK = 50      # RCPTs per node before the next node's turn


def rcpt_block(c, routes, count, rng, rec):
    """MAIL, RCPT (a random user of the table), RSET, C{count} times on the
    kept session C{c}; the times go to C{rec} (RCPT alone, MAIL+RCPT)."""
    for _ in range(count):
        address = S.user(rng.randrange(routes))
        t0 = time.perf_counter()
        c.cmd("MAIL FROM:<%s>" % FROM)
        t1 = time.perf_counter()
        c.sock.sendall(("RCPT TO:<%s>\r\n" % address).encode())
        code, lines = c.reply()
        t2 = time.perf_counter()
        c.cmd("RSET")
        if code != "250":
            rec["bad"].append("RCPT %s: %s" % (address, " | ".join(lines)))
        if not rec.get("warm"):
            rec["rcpt"].append(t2 - t1)
            rec["both"].append(t2 - t0)


def run_table(a, k, nodes, A, rng, failures):
    """Run C{k}: one kept session per node; a warm-up block on each (not
    timed), then blocks of BLOCK RCPTs, node after node (the order rotating
    from run to run), until each has a.samples; then one real message per
    node, which the sink must get exactly once."""
    order = nodes[k % len(nodes):] + nodes[:k % len(nodes)]
    recs, sessions = {}, {}
    for node in order:
        rec = recs[node["label"]] = {"run": str(k + 1), "rcpt": [], "both": [], "bad": [],
                                     "err": None}
        if not node["proxy"].alive():
            rec["err"] = "proxy process is gone (exit %s)" % node["proxy"].proc.returncode
            continue
        try:
            sessions[node["label"]] = c = C.LMTPClient(node["proxy"].port)
            rcpt_block(c, node["routes"], BLOCK, rng, dict(rec, warm=True, bad=rec["bad"]))
        except (OSError, C.LMTPError) as e:
            rec["err"] = "session: %s" % e
            sessions.pop(node["label"], None)
    done = 0
    while done < a.samples:
        count = min(BLOCK, a.samples - done)
        for node in order:
            c = sessions.get(node["label"])
            if c is None:
                continue
            try:
                rcpt_block(c, node["routes"], count, rng, recs[node["label"]])
            except (OSError, C.LMTPError) as e:
                recs[node["label"]]["err"] = "session: %s" % e
                del sessions[node["label"]]
        done += count
    for c in sessions.values():
        c.quit()
    for node in order:
        rec = recs[node["label"]]
        if rec["bad"] and not rec["err"]:
            rec["err"] = "%d non-250 RCPT replies: %s" % (len(rec["bad"]), rec["bad"][0])
        before = A.mesg()
        address = S.user(rng.randrange(node["routes"]))
        try:
            c = C.LMTPClient(node["proxy"].port)
            replies = c.send(FROM, [address], C.make_body(500, "table"))
            c.quit()
            if len(replies) != 1 or not replies[0][0].startswith("2"):
                rec["err"] = rec["err"] or "delivery replies %s" % replies
        except (OSError, C.LMTPError) as e:
            rec["err"] = rec["err"] or "delivery: %s" % e
        got = C.settle([A], {A.name: before + 1}, 5)
        rec["delta"] = got[A.name] - before
        rec["ok"] = rec["err"] is None and rec["delta"] == 1
        node["recs"].append(rec)
        C.log("table %-12s run %s: RCPT median %.0f us p99 %.0f us (%d)  sink +%d %s" % (
            node["label"], rec["run"],
            C.pct(rec["rcpt"], 0.5) * 1e6 if rec["rcpt"] else 0,
            C.pct(rec["rcpt"], 0.99) * 1e6 if rec["rcpt"] else 0, len(rec["rcpt"]),
            rec["delta"], "ok" if rec["ok"] else "FAIL " + str(rec["err"])))
        if not rec["ok"]:
            failures.append("table %s run %s: %s; sink +%d (expected +1)" % (
                node["label"], rec["run"], rec["err"] or "", rec["delta"]))


def every_process_routes(proxy, n, W, timeout):
    """Until `lmtp-proxy status --json` shows C{W} processes each with
    C{n} routes (the node's config has a control_socket)."""
    import json
    status = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads(S.lmtp_proxy(C.venv_dir(), "status", "-c", proxy.config,
                                             "--json"))
            views = [status["master"]] + list(status["workers"].values())
            if len(views) >= W and all(v and v.get("routes") == n for v in views):
                return
        except (C.Fail, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise C.Fail("not every process has %d routes after %d s: %s"
                 % (n, timeout, str(status)[:300]))


def curve_table(a, wd, ctx, W, Wsrc):
    t0 = time.monotonic()
    failures, notes = [], []
    A = C.Sink(wd, "tbl-sinkA")
    sinks = [A]
    nodes = []      # dicts: source, routes, proxy, startup, rss, lookup_ns
    pg = None
    venv = C.venv_dir()
    if "pg" in a.sources:
        try:
            pg = S.Postgres(wd)
            subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import psycopg"],
                           check=True, capture_output=True)
        except (C.Fail, OSError, subprocess.CalledProcessError) as e:
            notes.append("PostgreSQL source **not measured**: %s (needs Debian's "
                         "postgresql and the venv's `postgresql` extra)."
                         % str(e).splitlines()[0])
            C.log("table: " + notes[-1])
            pg = None
    for source in a.sources:
        if source == "pg" and pg is None:
            continue
        for n in a.routes:
            name = "tbl-%s-%d" % (source, n)
            port = C.free_port()
            ts = time.monotonic()
            try:
                if source == "yaml":
                    text = C.proxy_yaml(port, {"sinkA": A.port},
                                        [(S.user(i), "sinkA") for i in range(n)], workers=W)
                else:
                    db = "mail%d" % n
                    pg.psql("postgres", "CREATE DATABASE %s" % db)
                    uri = "postgresql://lmtp@/%s?host=%s" % (db, pg.dir)
                    admin = os.path.join(wd, name + "-admin.yaml")
                    with open(admin, "w") as f:
                        f.write(S.node_yaml(name + "-admin", 1, uri, sinks, wd))
                    S.lmtp_proxy(venv, "db", "init", "-c", admin)
                    pg.psql(db, "SET lmtp_proxy.bulk = 'on'; INSERT INTO lmtp_routes "
                            "SELECT 'user' || i || '@scale.test', '%s', NULL "
                            "FROM generate_series(0, %d) i" % (A.name, n - 1))
                    C.log("table: %d routes inserted into %s in %.1f s"
                          % (n, db, time.monotonic() - ts))
                    text = S.node_yaml(name, port, uri, sinks, wd, workers=W)
                t1 = time.monotonic()
                proxy = C.OurProxy(wd, yaml_text=text, name=name, port=port, timeout=900)
                if not wait_workers(proxy, W, 900):
                    raise C.Fail("workers not serving: %s" % C.tail(proxy.logfile, 5))
                S.until_served(port, S.user(n // 2), 900)
                if source == "pg" and W > 1:
                    # A worker gets the table from the master after start,
                    # and defers (451) until then.
                    every_process_routes(proxy, n, W, 900)
                startup = time.monotonic() - t1
            except (C.Fail, OSError) as e:
                C.log("FAIL: table %s %d: %s" % (source, n, e))
                failures.append("table %s %d routes: %s" % (source, n, str(e).splitlines()[0]))
                continue
            time.sleep(1.0)
            rss = [C.rss_kb(p) for p in proxy.pids()]
            C.log("table: %s %d routes serving after %.1f s, RSS %s"
                  % (source, n, startup, " + ".join(C.mb(r) for r in rss)))
            nodes.append({"source": source, "routes": n, "proxy": proxy, "startup": startup,
                          "rss": rss, "recs": [], "label": "%s %s" % (source, fmt_routes(n))})
    for node in nodes:
        ok = check_routes(node["label"], node["proxy"].port, sinks,
                          [([S.user(node["routes"] - 1)], {A.name: 1})], failures)
        node["routed"] = ok
    rng = random.Random(7)
    for k in range(a.runs):
        run_table(a, k, nodes, A, rng, failures)
    for node in nodes:
        node["rss_end"] = [C.rss_kb(p) for p in node["proxy"].pids()] \
            if node["proxy"].alive() else []
        C.stop(node["proxy"].name)
    if pg is not None:
        pg.stop()
    # in-process cost, with the servers stopped
    for node in nodes:
        node["ns"] = lookup_ns(node["source"], node["routes"])
        C.log("table: route() %s %d: %s ns" % (node["source"], node["routes"], node["ns"]))
    C.stop(A.name)
    elapsed = time.monotonic() - t0
    out = header("Cost curve: routing-table size", "curves-table", a, ctx, elapsed, W, Wsrc,
                 "%d run(s), described below." % a.runs)
    out.append(
        "Our proxy only: Dovecot's passwd-file passdb is a different lookup (a "
        "file read and parsed by its auth process, with its own caches), not a "
        "table of routes, so it is not compared here.  Users `userI@scale.test`, "
        "I = 0 .. N-1, all routed to one smtp-sink.  YAML: a `users` mapping of N "
        "rows in the config file (`bench/common.py` proxy_yaml).  PostgreSQL: one "
        "private server (bench/scale.py's `Postgres`, unix socket only), one "
        "database per size, `lmtp-proxy db init` and N rows inserted in bulk; the "
        "proxy node as in scale.py (`node_yaml`).  All the proxies run at the "
        "same time.  RCPT cost: per run, one kept session per proxy, %d times: "
        "MAIL FROM, RCPT TO a user picked at random from the table (timed alone: "
        "`RCPT`; with the MAIL before it: `MAIL+RCPT`), RSET (not timed), in "
        "blocks of %d taking turns across the proxies (the order rotating from "
        "run to run, after one untimed block each), so that every size sees the "
        "same background load; median and p99 over all runs.  Then one real "
        "message per run and proxy to a random user: the sink must get it "
        "exactly once.  `route() ns`: the table's `route()` in one "
        "process of the venv's Python importing the working tree's `lmtp_proxy` (as "
        "`scale.lookup_ns` does), best of 3 x 200,000 lookups (3/4 hits, "
        "1/4 misses; `scale.lookup_ns` for the database's `LiveTable`, its "
        "`scale.route_ns` on the YAML source's `RoutingTable`), measured after the proxies "
        "stopped.  Start-up: from start to the first RCPT answered 250 and, "
        "with workers, every worker serving (YAML: the master's log says so; "
        "PostgreSQL: `lmtp-proxy status --json` shows the whole table in every "
        "process, as a worker defers RCPTs with 451 until the master has sent "
        "it the table)." % (a.samples, BLOCK))
    if a.quick:
        out.append("")
        out.append("(--quick: tables of %s routes, not 1M.)" % ", ".join(
            fmt_routes(n) for n in a.routes))
    for note in notes:
        out += ["", note]
    out.append("")
    head = ["source", "routes", "start-up", "RSS after start (per process)",
            "RCPT median us", "RCPT p99 us", "MAIL+RCPT median us", "run-to-run spread",
            "route() ns in process"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = []
    for node in nodes:
        rc = [x for r in node["recs"] for x in r["rcpt"]]
        both = [x for r in node["recs"] for x in r["both"]]
        per_run = [C.median(r["rcpt"]) for r in node["recs"] if r["rcpt"]]
        node["med"] = C.median(rc) if rc else None
        node["p99"] = C.pct(rc, 0.99) if rc else None
        node["spread"] = spread(per_run)
        out.append("| %s | %s | %.1f s | %s | %s | %s | %s | %s | %s |" % (
            node["source"], fmt_routes(node["routes"]), node["startup"],
            " + ".join(C.mb(r) for r in node["rss"]),
            num(node["med"] and node["med"] * 1e6), num(node["p99"] and node["p99"] * 1e6),
            num(C.median(both) * 1e6 if both else None),
            "%.0f%%" % (node["spread"] * 100) if node["spread"] is not None else "-",
            num(node["ns"])))
        summary.append({"source": node["source"], "x": node["routes"], "med": node["med"],
                        "p99": node["p99"], "ns": node["ns"]})
    missed = []
    out.append("")
    for source in a.sources:
        mine = [nd for nd in nodes if nd["source"] == source and nd["med"]]
        if len(mine) < 2:
            continue
        small, big = mine[0], mine[-1]
        q = big["med"] / small["med"]
        noise = max([nd["spread"] or 0 for nd in mine] + [0.2])
        flat = q - 1 <= noise
        out.append("%s: RCPT median at %s / at %s = %.2f (flat = at most 1 + the "
                   "larger of 20%% and the run-to-run spread, here %.0f%%): %s." % (
                       source, fmt_routes(big["routes"]), fmt_routes(small["routes"]), q,
                       noise * 100, "flat" if flat else "**TARGET MISSED**"))
        if not flat:
            missed.append("table %s: RCPT median x%.2f from %s to %s" % (
                source, q, fmt_routes(small["routes"]), fmt_routes(big["routes"])))
    out += ["", "All runs (RCPT alone, us):", ""]
    out += ["| point | run | RCPTs | median | p90 | p99 | max | MAIL+RCPT median | "
            "delivery: sink received (expected 1) | check |", "|---|---|---|---|---|---|---|---|---|---|"]
    for node in nodes:
        for r in node["recs"]:
            t = r["rcpt"]
            f = (lambda q: "%.0f" % (C.pct(t, q) * 1e6)) if t else (lambda q: "-")
            out.append("| %s | %s | %d | %s | %s | %s | %s | %s | %d | %s |" % (
                node["label"], r["run"], len(t), f(0.5), f(0.9), f(0.99), f(1.0),
                "%.0f" % (C.median(r["both"]) * 1e6) if r["both"] else "-", r["delta"],
                "ok" if r["ok"] else "**FAIL**: " + str(r["err"])[:120]))
    out += footer(failures, ctx, "Counter check: OK - every run's message reached the "
                  "sink exactly once, and every RCPT was answered 250.")
    return "\n".join(out) + "\n", failures, missed, summary


def fmt_routes(n):
    if n >= 1000000 and n % 1000000 == 0:
        return "%dM" % (n // 1000000)
    if n >= 1000 and n % 1000 == 0:
        return "%dk" % (n // 1000)
    return str(n)


# --------------------------------------------------------------------- PNG

def have_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def write_png(path, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"ours": "tab:blue", "dovecot": "tab:orange"}

    def empty(ax, title):
        ax.set_title(title)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)

    def plain_log(axis):
        """Log scale with plain numbers and no minor labels."""
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())

    def finish(ax, ticks, labels, xlabel, ylabel, title, ax2=None, loc="best"):
        """A panel's log x axis, its labels, y from 0, the legend of both
        its axes and its title."""
        ax.set_xscale("log")
        plain_log(ax.xaxis)
        ax.set_xticks(ticks, labels)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        handles, names = ax.get_legend_handles_labels()
        if ax2 is not None:
            more, moreNames = ax2.get_legend_handles_labels()
            handles, names = handles + more, names + moreNames
        ax.legend(handles, names, fontsize=8, loc=loc)
        ax.set_title(title)

    ax = axes[0][0]
    pts = data.get("sessions")
    if pts:
        ax2 = ax.twinx()
        for t in pts[0]["rate"]:
            xs = [p["x"] for p in pts]
            ax.plot(xs, [p["rate"][t] for p in pts], "o-", color=colors.get(t),
                    label="%s msg/s" % t)
            ax2.plot(xs, [(p["p99"][t] or 0) * 1e3 for p in pts], "s--", color=colors.get(t),
                     label="%s probe p99 ms" % t)
        ax2.set_ylabel("probe p99 latency, ms (dashed)")
        ax2.set_yscale("log")
        plain_log(ax2.yaxis)
        finish(ax, xs, [str(x) for x in xs], "concurrent sessions (1 KB, 1 rcpt, kept)",
               "msg/s (solid)", "Throughput and p99 latency vs sessions", ax2, "upper left")
    else:
        empty(ax, "Sessions")

    ax = axes[0][1]
    pts = data.get("rcpts")
    if pts:
        for K in sorted({p["K"] for p in pts}):
            mine = [p for p in pts if p["K"] == K]
            for t in mine[0]["rate"]:
                ax.plot([p["x"] for p in mine],
                        [(p["rate"][t] or 0) * p["x"] for p in mine],
                        "o-" if K == min(p["K"] for p in pts) else "s--",
                        color=colors.get(t), label="%s, %d backends" % (t, K))
        xs = sorted({p["x"] for p in pts})
        finish(ax, xs, [str(x) for x in xs], "recipients per message (1 KB, 10 sessions)",
               "recipients/s", "Throughput vs recipients per message")
    else:
        empty(ax, "Recipients")

    ax = axes[1][0]
    pts = data.get("table")
    if pts:
        for source, color in (("yaml", "tab:blue"), ("pg", "tab:green")):
            mine = [p for p in pts if p["source"] == source and p["med"]]
            if not mine:
                continue
            xs = [p["x"] for p in mine]
            ax.plot(xs, [p["med"] * 1e6 for p in mine], "o-", color=color,
                    label="%s RCPT median" % source)
            ax.plot(xs, [p["p99"] * 1e6 for p in mine], "s--", color=color,
                    label="%s RCPT p99" % source)
        xs = sorted({p["x"] for p in pts})
        finish(ax, xs, [fmt_routes(x) for x in xs], "routes in the table (ours only)",
               "RCPT round trip, us", "RCPT cost vs routing-table size")
    else:
        empty(ax, "Routing table")

    ax = axes[1][1]
    pts = data.get("size")
    if pts:
        ax2 = ax.twinx()
        xs = [p["x"] / KB for p in pts]
        for t in pts[0]["mbps"]:
            ax.plot(xs, [p["mbps"][t] or 0 for p in pts], "o-", color=colors.get(t),
                    label="%s MB/s" % t)
            ax2.plot(xs, [(p["rss"][t] or 0) / 1024 for p in pts], "s--",
                     color=colors.get(t), label="%s peak RSS MB" % t)
        ax2.set_ylabel("peak RSS of the largest process, MB (dashed)")
        ax2.set_ylim(bottom=0)
        finish(ax, xs, [fmt_size(p["x"]) for p in pts], "message size (1 session, 1 rcpt, kept)",
               "MB/s (solid)", "Throughput and RSS vs message size", ax2, "center left")
    else:
        empty(ax, "Message size")

    fig.suptitle("lmtp-proxy cost curves (bench/curves.py), ours vs Dovecot's LMTP proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------- main

def machine_line():
    keep = []
    for k, v in C.machine_info():
        if k.startswith("python (venv"):
            keep.append("python %s" % v)
        elif k == "host":
            keep.append(v)
        elif k in ("Twisted", "Dovecot", "lmtp-proxy"):
            keep.append("%s %s" % (k, v))
        elif k == "Postfix":
            keep.append("Postfix %s" % v.replace("mail_version = ", ""))
    return "; ".join(keep)


def python_name():
    """How the command line names this interpreter: python3 outside a
    venv, else the venv's (e.g. one that has matplotlib)."""
    if sys.prefix == sys.base_prefix:
        return "python3"
    return sys.executable


def main():
    a = parse_args()
    C.install_cleanup()
    nofile = C.raise_nofile()
    W, Wsrc = workers()
    wd = a.workdir or tempfile.mkdtemp(prefix="lmtpcurves.")
    os.makedirs(wd, exist_ok=True)
    os.chmod(wd, 0o755)     # Dovecot's auth process (user dovecot) reads routes
    C.log("workdir %s" % wd)
    env = " ".join("%s=%s" % (k, os.environ[k]) for k in ("VENV", "WORKERS", "QUICK", "RUNS")
                   if k in os.environ)
    cmdline = os.environ.get("BENCH_CMDLINE") or " ".join(
        [python_name(), os.path.relpath(os.path.abspath(sys.argv[0]), C.REPO)] + sys.argv[1:])
    mpl = have_matplotlib() and not a.no_png
    if a.no_png:
        plot = "No PNG (--no-png)."
    elif mpl:
        plot = "Plot: `%s` (all four curves, made by this run)." % (
            os.path.relpath(a.png, C.REPO) if a.png.startswith(C.REPO + "/") else a.png)
    else:
        plot = "no PNG: matplotlib not installed"
    ctx = {"cmdline": ((env + " ") if env else "") + cmdline, "machine": machine_line(),
           "nofile": nofile, "plot": plot}
    funcs = {"sessions": curve_sessions, "rcpts": curve_rcpts, "table": curve_table,
             "size": curve_size}
    failures, missed, data = [], [], {}
    t_all = time.monotonic()
    for curve in CURVES:
        if curve not in a.curves:
            continue
        C.log("curve %s" % curve)
        try:
            md, fails, miss, summary = funcs[curve](a, wd, ctx, W, Wsrc)
        except C.Fail as e:
            C.log("FAIL: curve %s: %s" % (curve, e))
            md, fails, miss, summary = (
                "## Cost curve %s (curves-%s)\n\n**FAIL**: `%s`\n" % (
                    curve, curve, str(e).splitlines()[0]),
                ["curve %s: %s" % (curve, str(e).splitlines()[0])], [], None)
        C.stop_all()      # anything the curve left running
        failures += fails
        missed += miss
        if summary:
            data[curve] = summary
        C.update_section(a.results, "curves-" + curve, md)
        print("\n" + C.portable(md), flush=True)
    C.log("all curves in %.0f s; results in %s" % (time.monotonic() - t_all, a.results))
    if mpl and data:
        try:
            write_png(a.png, data)
            C.log("PNG written to %s" % a.png)
        except Exception as e:   # a plot must not cost the measurements
            C.log("no PNG: %s: %s" % (type(e).__name__, e))
    elif not a.no_png and not mpl:
        C.log("no PNG: matplotlib not installed")
    if not a.workdir and not a.keep_workdir:
        shutil.rmtree(wd, ignore_errors=True)
    if missed:
        C.log("TARGET MISSED: " + "; ".join(missed))
    if failures:
        print("\n*** FAIL: %d problem(s):\n  %s" % (len(failures), "\n  ".join(failures)),
              file=sys.stderr)
        return 1
    strict = os.environ.get("STRICT", "") not in ("", "0")
    return 1 if strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
