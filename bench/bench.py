#!/usr/bin/env python3
"""Throughput matrix: smtp-source -L -> {direct sink | our proxy | Dovecot's
LMTP proxy} -> smtp-sink -L (two sinks, counters on), all on 127.0.0.1.

Targets are interleaved per cell (each run of a cell measures every target in
turn, the order rotating from run to run), the median over the runs is
reported.  After every run the sinks' mesg counters are checked: each message
must have been received exactly once per backend it routes to; anything else
is a FAIL (exit status 1).

    bench/bench.py [--quick] [--no-proxy] [--runs N] [--msgs N]
                   [--msgs-large N] [--sizes 1024,102400] [--sessions 1,10]
                   [--rcpts 1,5] [--conn new,keep] [--workdir DIR]
                   [--results bench/RESULTS.md] [--identity]

Environment: VENV (default REPO/.venv), QUICK=1, NO_PROXY=1, RUNS, MSGS,
MSGS_LARGE, BASELINE_VENV and BASELINE_LABEL (our proxy from that venv, e.g.
an older commit, as the extra target "base": same config, sinks and workers,
interleaved in every run; the table gains ours/base and the run-to-run noise
of both), METRICS=1 or --metrics (our proxy once more with config.metrics on,
as the extra target "metrics", interleaved likewise; the table gains
metrics/ours, the noise of both and the cost per message; with --sizes 1024
for the 1 KB cells only).

--tls measures instead the cells with TLS on both sides (STARTTLS, or with
--tls-mode implicit TLS from the first byte), ours side by side with
Dovecot's LMTP proxy configured the same way, each also without TLS for the
TLS overhead per message (bench/tlscells.py, bench/starttls_shim.py), into
the RESULTS.md section "tls".

--identity measures instead the cost of recipient rewriting and XCLIENT:
the 1 KB cells through two of our proxies side by side, "plain" (plain
rows, sinks that do not offer XCLIENT) and "rw+xclient" (every recipient
rewritten by its row, sinks that offer XCLIENT, so a session's first
transaction on each connection sends one), into the RESULTS.md section
"identity".
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

FROM = "src@harness.test"


def csv(conv):
    return lambda s: [conv(x) for x in s.split(",") if x]


def parse_args():
    env = os.environ
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    default=env.get("QUICK", "") not in ("", "0"))
    ap.add_argument("--no-proxy", action="store_true",
                    default=env.get("NO_PROXY", "") not in ("", "0"),
                    help="skip our proxy (direct and Dovecot only)")
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--metrics", action="store_true",
                    default=os.environ.get("METRICS") == "1",
                    help="also measure our proxy with config.metrics on, as "
                         "the target 'metrics'")
    ap.add_argument("--runs", type=int, default=int(env.get("RUNS", 0)) or None)
    ap.add_argument("--msgs", type=int, default=int(env.get("MSGS", 0)) or None,
                    help="messages per run for sizes <= 10 KB")
    ap.add_argument("--msgs-large", type=int,
                    default=int(env.get("MSGS_LARGE", 0)) or None,
                    help="messages per run for sizes > 10 KB")
    ap.add_argument("--sizes", type=csv(int), default=[1024, 102400])
    ap.add_argument("--sessions", type=csv(int), default=[1, 10])
    ap.add_argument("--rcpts", type=csv(int), default=[1, 5])
    ap.add_argument("--conn", type=csv(str), default=["new", "keep"])
    ap.add_argument("--workdir")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--results", default=os.path.join(C.HERE, "RESULTS.md"))
    ap.add_argument("--identity", action="store_true",
                    help="compare rewriting and XCLIENT on and off (1 KB)")
    ap.add_argument("--tls", action="store_true",
                    help="the cells with TLS on both sides, ours side by side "
                    "with Dovecot's LMTP proxy, each also without TLS")
    ap.add_argument("--tls-mode", choices=("starttls", "implicit"),
                    default=env.get("TLS_MODE") or "starttls",
                    help="with --tls: STARTTLS (default) or TLS from the "
                    "first byte, on both sides")
    ap.add_argument("--timeout", type=float, default=600,
                    help="max seconds for one smtp-source run")
    a = ap.parse_args()
    if a.quick:
        a.runs = a.runs or 1
        a.msgs = a.msgs or 300
        a.msgs_large = a.msgs_large or 150
    a.runs = a.runs or 3
    # --tls measures four targets per cell, through TLS: fewer messages
    # keep the full run near 10 minutes.
    a.msgs = a.msgs or (1000 if a.tls else 3000)
    a.msgs_large = a.msgs_large or (300 if a.tls else 1000)
    return a


def smtp_source(port, n, sessions, rcpts, size, to, keep, timeout):
    argv = ["smtp-source", "-L", "-m", str(n), "-s", str(sessions),
            "-r", str(rcpts), "-l", str(size), "-t", to, "-f", FROM,
            "-M", "harness.test"]
    if keep:
        argv.append("-d")
    argv.append("inet:127.0.0.1:%d" % port)
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    C.track("smtp-source", p)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()                      # our own child, by its Popen handle
        out, _ = p.communicate()
        return None, "timeout after %.0f s: %s" % (timeout, out.decode()[-300:])
    finally:
        C.untrack(p)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        return None, "smtp-source rc=%d: %s" % (p.returncode,
                                                out.decode(errors="replace")[-300:])
    return dt, " ".join(argv)


def routing_check(name, port, sinks):
    """One probe per route; the sinks' counters must move as routed."""
    return probe_routes(name, port, sinks, [
        (["bench@bench.test"], {"sinkA": 1}),
        (["bench@split.test"], {"sinkA": 1}),
        (["2bench@split.test"], {"sinkB": 1}),
        (["5bench@split.test", "4bench@split.test", "3bench@split.test",
          "2bench@split.test", "bench@split.test"], {"sinkA": 1, "sinkB": 1})])


def probe_routes(name, port, sinks, probes):
    """One message per probe [(rcpts, {sink name: messages})], each
    recipient answered 2xx; every sink's counter must move by its count
    (0 for a sink not named).  Returns the problems found."""
    body = C.make_body(500, "routing-check")
    problems = []
    for rcpts, want in probes:
        before = {s.name: s.mesg() for s in sinks}
        full = {s.name: want.get(s.name, 0) for s in sinks}
        try:
            c = C.LMTPClient(port)
            replies = c.send(FROM, rcpts, body)
            c.quit()
        except (OSError, C.LMTPError) as e:
            problems.append("%s: %s" % (rcpts, e))
            continue
        bad = [r for r in replies if not r[0].startswith("2")]
        if bad or len(replies) != len(rcpts):
            problems.append("%s: replies %s" % (rcpts, replies))
        got = C.settle(sinks, {k: before[k] + v for k, v in full.items()}, 3)
        delta = {k: got[k] - before[k] for k in got}
        if delta != full:
            problems.append("%s: sink deltas %s, expected %s"
                            % (",".join(rcpts), delta, full))
    if problems:
        C.log("ROUTING CHECK FAILED for %s:\n  %s" % (name, "\n  ".join(problems)))
    else:
        C.log("routing check ok for %s (%d messages)" % (name, len(probes)))
    return problems


IDENTITY_USERS = [("bench@bench.test", "sinkA", "bench@rewritten.test")] + [
    ("%sbench@split.test" % (i if i > 1 else ""), "sinkB" if i % 2 == 0 else "sinkA",
     "%sbench@rewritten.test" % (i if i > 1 else ""))
    for i in range(1, 6)]


def identity_yaml(port, A, B, rewrite):
    """Our proxy's config for the identity cells: plain rows, or rows
    that rewrite every recipient, with XCLIENT allowed from 127.0.0.1."""
    lines = ["config:", "  socket: [127.0.0.1, %d]" % port,
             "  workers: %d" % int(os.environ.get("WORKERS") or 1),
             "  allowed_xclient: [127.0.0.0/8]",
             "backends:",
             "  sinkA: {host: 127.0.0.1, port: %d}" % A.port,
             "  sinkB: {host: 127.0.0.1, port: %d}" % B.port,
             "users:"]
    for key, backend, address in IDENTITY_USERS:
        if rewrite:
            lines.append('  "%s": {backend: %s, address: "%s"}' % (key, backend, address))
        else:
            lines.append('  "%s": %s' % (key, backend))
    return "\n".join(lines) + "\n"


def identity_main(a, wd):
    """The --identity comparison; returns the list of failures."""
    failures = []
    variants = []
    for name, rewrite, sinkArgs in (("plain", False, ["-C"]), ("rw+xclient", True, [])):
        A = C.Sink(wd, "%s-sinkA" % name, extra=sinkArgs)
        B = C.Sink(wd, "%s-sinkB" % name, extra=sinkArgs)
        port = C.free_port()
        proxy = C.OurProxy(wd, yaml_text=identity_yaml(port, A, B, rewrite),
                           name="proxy-" + name, port=port)
        variants.append((name, proxy, A, B))
    rows = []
    for s in a.sessions:
        for r in a.rcpts:
            for conn in a.conn:
                n = a.msgs
                to = "bench@bench.test" if r == 1 else "bench@split.test"
                rates = {name: [] for name, _, _, _ in variants}
                for run in range(a.runs):
                    order = variants[run % 2:] + variants[:run % 2]
                    for name, proxy, A, B in order:
                        before = {x.name: x.mesg() for x in (A, B)}
                        want = {A.name: n, B.name: n if r > 1 else 0}
                        dt, info = smtp_source(proxy.port, n, s, r, 1024, to,
                                               conn == "keep", a.timeout)
                        got = C.settle([A, B], {k: before[k] + v for k, v in want.items()})
                        delta = {k: got[k] - before[k] for k in got}
                        if dt is None or delta != want:
                            failures.append("identity %s s=%d r=%d %s: %s %s"
                                            % (name, s, r, conn, info.splitlines()[0], delta))
                            continue
                        rates[name].append(n / dt)
                        C.log("%-10s 1K s=%d r=%d %s run %d: %7.1f msg/s"
                              % (name, s, r, conn, run + 1, n / dt))
                plain, on = med(rates["plain"]), med(rates["rw+xclient"])
                cost = (1e3 / on - 1e3 / plain) if plain and on else None
                rows.append("| 1 KB s=%d r=%d %s | %s | %s | %s |" % (
                    s, r, conn, "%.0f" % plain if plain else "-",
                    "%.0f" % on if on else "-",
                    "%+.3f ms" % cost if cost is not None else "-"))
                print(rows[-1], flush=True)
    md = "\n".join([
        "## Recipient rewriting and XCLIENT (identity)", "",
        "`bench/bench.py --identity`: msg/s, median of %d runs of %d messages; "
        "\"rw+xclient\" rewrites every recipient and sends XCLIENT to sinks "
        "that offer it, \"plain\" neither. Cost: the difference in time per "
        "message (1/rate)." % (a.runs, a.msgs), "",
        "| cell | plain | rw+xclient | cost per message |",
        "| --- | --- | --- | --- |"] + rows) + "\n"
    C.update_section(a.results, "identity", md)
    print("\n" + md)
    return failures


def main():
    a = parse_args()
    C.install_cleanup()
    C.raise_nofile()
    wd = a.workdir or tempfile.mkdtemp(prefix="lmtpbench.")
    os.makedirs(wd, exist_ok=True)
    os.chmod(wd, 0o755)     # Dovecot's auth process (user dovecot) reads routes
    C.log("workdir %s" % wd)
    cmdline = os.environ.get("BENCH_CMDLINE") or " ".join(
        [os.path.relpath(sys.argv[0], C.REPO)] + sys.argv[1:])
    envdesc = " ".join("%s=%s" % (k, os.environ[k]) for k in
                       ("QUICK", "NO_PROXY", "VENV", "RUNS", "MSGS", "MSGS_LARGE",
                        "BASELINE_VENV", "BASELINE_LABEL", "METRICS", "WORKERS")
                       if k in os.environ)
    failures = []
    if a.identity or a.tls:
        if a.tls:
            import tlscells
            failures = tlscells.tls_main(a, wd, smtp_source, routing_check, med)
        else:
            failures = identity_main(a, wd)
        C.stop_all()
        if failures:
            print("\n*** FAIL: %s" % "\n  ".join(failures), file=sys.stderr)
            return 1
        return 0

    A = C.Sink(wd, "sinkA")
    B = C.Sink(wd, "sinkB")
    sinks = [A, B]
    targets = [("direct", A.port)]
    proxies = {}      # target name -> OurProxy
    if not a.no_proxy:
        venvs = [("ours", "proxy", C.venv_dir())]
        if C.baseline_venv():
            venvs.append(("base", "base", C.baseline_venv()))
        for tname, dirname, venv in venvs:
            p = start_proxy(wd, tname, dirname, venv, A, B, failures)
            if not p:
                break       # base is only there to be compared with ours
            proxies[tname] = p
            targets.append((tname, p.port))
        if a.metrics and "ours" in proxies:
            p = start_metrics_proxy(wd, A, B, failures)
            if p:
                proxies["metrics"] = p
                targets.append(("metrics", p.port))
    proxy = proxies.get("ours")
    if not a.no_dovecot:
        users = {"bench@split.test": A.port}
        for i in range(2, 21):
            users["%dbench@split.test" % i] = A.port if i % 2 else B.port
        dove = C.DovecotProxy(wd, users, {"bench.test": A.port})
        C.log("dovecot proxy up: pid %d port %d" % (dove.proc.pid, dove.port))
        targets.append(("dovecot", dove.port))

    # The processes whose CPU time each message costs: a proxy's master and
    # workers, Dovecot's master and its children.
    processes = {t: p.proc.pid for t, p in proxies.items()}
    if not a.no_dovecot:
        processes["dovecot"] = dove.proc.pid

    for name, port in targets[1:]:
        probs = routing_check(name, port, sinks)
        failures += ["routing check %s: %s" % (name, p) for p in probs]

    # Per process: the largest of the master and its workers.
    idle_rss = {t: C.largest_kb(C.rss_kb, p.pids()) for t, p in proxies.items()}
    for p in proxies.values():
        for pid in p.pids():
            C.reset_hwm(pid)

    cells = []
    for size in a.sizes:
        for s in a.sessions:
            for r in a.rcpts:
                for conn in a.conn:
                    cells.append((size, s, r, conn))
    results = []      # dicts per cell
    t_start = time.time()
    for ci, (size, s, r, conn) in enumerate(cells):
        n = a.msgs if size <= 10240 else a.msgs_large
        to = "bench@bench.test" if r == 1 else "bench@split.test"
        keep = conn == "keep"
        label = "%s s=%d r=%d %s" % (fmt_size(size), s, r, conn)
        rates = {t: [] for t, _ in targets}
        errs = {t: [] for t, _ in targets}
        cpu = {t: [] for t in processes}
        for run in range(a.runs):
            order = targets[run % len(targets):] + targets[:run % len(targets)]
            for tname, port in order:
                if tname in proxies and not proxies[tname].alive():
                    errs[tname].append("proxy process is gone (exit %s)"
                                       % proxies[tname].proc.returncode)
                    continue
                before = {x.name: x.mesg() for x in sinks}
                if tname == "direct" or r == 1:
                    want = {"sinkA": n, "sinkB": 0}
                else:
                    want = {"sinkA": n, "sinkB": n}
                if tname in processes:
                    cpu0 = C.cpu_s(C.tree(processes[tname]))
                dt, info = smtp_source(port, n, s, r, size, to, keep, a.timeout)
                if tname in processes and dt is not None:
                    cpu[tname].append((C.cpu_s(C.tree(processes[tname])) - cpu0) * 1e6 / n)
                got = C.settle(sinks, {k: before[k] + v for k, v in want.items()})
                delta = {k: got[k] - before[k] for k in got}
                ok = delta == want
                if dt is None:
                    errs[tname].append(info)
                    C.log("FAIL %-8s %s run %d: %s" % (tname, label, run + 1, info))
                    failures.append("%s %s run %d: %s" % (tname, label, run + 1,
                                                          info.splitlines()[0]))
                else:
                    rates[tname].append(n / dt)
                    C.log("%-8s %-24s run %d: %7.1f msg/s %8.1f rcpt/s  sinks %s"
                          % (tname, label, run + 1, n / dt, n * r / dt,
                             " ".join("%s+%d" % kv for kv in sorted(delta.items()))))
                if not ok:
                    msg = ("%s %s run %d: sink mesg deltas %s, expected %s"
                           % (tname, label, run + 1, delta, want))
                    C.log("FAIL " + msg)
                    errs[tname].append("counters " + str(delta))
                    failures.append(msg)
        hwm = C.largest_kb(C.hwm_kb, proxy.pids()) if proxy and proxy.alive() else None
        rss = C.largest_kb(C.rss_kb, proxy.pids()) if proxy and proxy.alive() else None
        res = {"size": size, "s": s, "r": r, "conn": conn, "n": n,
               "rates": rates, "errs": errs, "hwm": hwm, "rss": rss, "cpu": cpu}
        results.append(res)
        print(row_text(res, [t for t, _ in targets]), flush=True)
    elapsed = time.time() - t_start

    counters = {x.name: x.counters() for x in sinks}
    final_hwm = {t: C.largest_kb(C.hwm_kb, p.pids())
                 for t, p in proxies.items() if p.alive()}
    md = render(a, results, [t for t, _ in targets], cmdline, envdesc, wd,
                idle_rss, final_hwm, counters, failures, elapsed, proxies)
    C.update_section(a.results, "machine", "## Machine and versions\n\n"
                     + C.machine_md())
    C.update_section(a.results, "throughput", md)
    C.log("results written to %s" % a.results)
    print("\n" + md)
    C.stop_all()
    if not a.keep_workdir and not a.workdir:
        shutil.rmtree(wd, ignore_errors=True)
    if failures:
        print("\n*** FAIL: %d problem(s):\n  %s" % (len(failures),
                                                    "\n  ".join(failures)),
              file=sys.stderr)
        return 1
    return 0


def start_proxy(wd, tname, dirname, venv, A, B, failures):
    """Our proxy from C{venv} as target C{tname}, or None (a FAIL) if it
    does not start."""
    try:
        p = C.OurProxy(wd, backends={"sinkA": A.port, "sinkB": B.port},
                       name=dirname, venv=venv)
    except C.Fail as e:
        C.log("FAIL: %s proxy did not start:\n%s" % (tname, e))
        failures.append("%s proxy did not start: %s"
                        % (tname, str(e).splitlines()[0]))
        return None
    C.log("%s proxy up in %.2f s: pid %d port %d"
          % (tname, p.startup_s, p.pid, p.port))
    return p


def start_metrics_proxy(wd, A, B, failures):
    """Our proxy from $VENV with config.metrics on, as target "metrics",
    or None (a FAIL) if it does not start or does not serve /metrics."""
    port, http = C.free_port(), C.free_port()
    text = C.proxy_yaml(port, {"sinkA": A.port, "sinkB": B.port}, C.BENCH_USERS,
                        extra_config="  metrics: [127.0.0.1, %d]" % http)
    try:
        p = C.OurProxy(wd, yaml_text=text, name="metrics", port=port)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % http,
                                    timeout=30) as r:
            if b"lmtp_proxy_config_generation" not in r.read():
                raise C.Fail("/metrics has no lmtp_proxy_config_generation")
    except (C.Fail, OSError) as e:
        C.log("FAIL: metrics proxy did not start:\n%s" % (e,))
        failures.append("metrics proxy did not start: %s"
                        % str(e).splitlines()[0])
        return None
    C.log("metrics proxy up in %.2f s: pid %d port %d, /metrics on port %d"
          % (p.startup_s, p.pid, p.port, http))
    return p


def fmt_size(size):
    return "%dKB" % (size // 1024) if size % 1024 == 0 else "%dB" % size


def med(v):
    return C.median(v) if v else None


def cell_fmt(res, t):
    v = med(res["rates"].get(t, []))
    if v is None:
        return "FAIL" if res["errs"].get(t) else "-"
    s = "%.0f" % v
    if res["r"] > 1:
        s += " (%.0f)" % (v * res["r"])
    if res["errs"].get(t):
        s += " FAIL"
    return s


def med_ratio(res, a, b):
    """Median rate of target a over that of b, or None."""
    x, y = med(res["rates"].get(a, [])), med(res["rates"].get(b, []))
    return x / y if x and y else None


def ratio(res, a, b):
    q = med_ratio(res, a, b)
    return "-" if q is None else "%.2f" % q


def spread(v):
    """Run-to-run noise of one target in one cell: (max - min) / median."""
    if len(v) < 2:
        return None
    return (max(v) - min(v)) / C.median(v)


def fmt_pct(x):
    return "-" if x is None else "%.0f%%" % (x * 100)


def beyond_noise(res, a="ours", b="base"):
    """Whether a is slower than b by more than the larger of their spreads
    (the issue's criterion); '-' when that cannot be told."""
    q = med_ratio(res, a, b)
    noise = [spread(res["rates"][t]) for t in (a, b)]
    if q is None or None in noise:
        return "-"
    return "**SLOWER**" if 1 - q > max(noise) else "no"


def cost_us(res, a, b):
    """Wall time per message that a adds over b, in microseconds, from the
    medians (negative: a was faster)."""
    x, y = med(res["rates"].get(a, [])), med(res["rates"].get(b, []))
    return "-" if not (x and y) else "%+.0f" % ((1 / x - 1 / y) * 1e6)


def row_text(res, tnames):
    cols = [fmt_size(res["size"]), str(res["s"]), str(res["r"]), res["conn"]]
    cols += [cell_fmt(res, t) for t in tnames]
    if "base" in tnames:
        cols += [ratio(res, "ours", "base"),
                 fmt_pct(spread(res["rates"]["ours"])),
                 fmt_pct(spread(res["rates"]["base"])), beyond_noise(res)]
    if "metrics" in tnames:
        cols += [ratio(res, "metrics", "ours"),
                 fmt_pct(spread(res["rates"]["metrics"])),
                 fmt_pct(spread(res["rates"]["ours"])),
                 beyond_noise(res, "metrics", "ours"),
                 cost_us(res, "metrics", "ours")]
    if "ours" in tnames:
        cols += [ratio(res, "ours", "dovecot"), ratio(res, "ours", "direct")]
        cols.append(C.mb(res["hwm"]) if res["hwm"] else "-")
    return "| " + " | ".join(cols) + " |"


def proxy_md(p, idle_rss, final_hwm):
    return ("`%s` (pid %d), RSS idle before the matrix %s, peak RSS (VmHWM) "
            "over the whole matrix %s" % (
                " ".join(p.argv), p.pid, C.mb(idle_rss) if idle_rss else "?",
                C.mb(final_hwm) if final_hwm else "? (process gone)"))


def baseline_md(results, proxies, idle_rss, final_hwm):
    """What "base" is, how to read its columns, and the range of ours/base."""
    ratios = [q for q in (med_ratio(r, "ours", "base") for r in results)
              if q is not None]
    slower = ["%s s=%d r=%d %s" % (fmt_size(r["size"]), r["s"], r["r"], r["conn"])
              for r in results if beyond_noise(r) == "**SLOWER**"]
    out = ["Baseline `base` (\"%s\", the same proxy installed in %s; same "
           "config, sinks and workers, interleaved with the other targets in "
           "every run): %s." % (C.baseline_label(), C.baseline_venv(),
                                proxy_md(proxies["base"], idle_rss.get("base"),
                                         final_hwm.get("base"))),
           "",
           "`ours/base` = median ours / median base; `noise ours`, `noise "
           "base` = run-to-run spread of each, (max - min) / median over the "
           "runs of the cell (`-` with one run); `slower beyond noise` = ours "
           "is slower than base by more than the larger of the two spreads."]
    if ratios:
        out.append("Over the cells, ours/base is %.2f-%.2f; cells slower "
                   "beyond noise: %s." % (min(ratios), max(ratios),
                                          ", ".join(slower) or "none"))
    return out


def cpu_md(results, tnames):
    """
    CPU time per message of each target's processes, which the other
    processes on the machine disturb less than they do its throughput.
    """
    if not tnames:
        return []
    ratios = [(x, y) for x, y in (("ours", "base"), ("ours", "dovecot"))
              if x in tnames and y in tnames]
    out = ["CPU per message in microseconds (user + system of the target's "
           "processes, children included; median over the runs):", "",
           "| cell | " + " | ".join(tnames + ["%s/%s" % r for r in ratios]) + " |",
           "|---|" + "---|" * (len(tnames) + len(ratios))]
    for res in results:
        cpu = {t: med(res["cpu"][t]) if res["cpu"][t] else None for t in tnames}
        cells = ["%.0f" % cpu[t] if cpu[t] else "-" for t in tnames]
        cells += ["%.2f" % (cpu[x] / cpu[y]) if cpu[x] and cpu[y] else "-"
                  for x, y in ratios]
        out.append("| %s s=%d r=%d %s | %s |" % (
            fmt_size(res["size"]), res["s"], res["r"], res["conn"], " | ".join(cells)))
    out.append("")
    return out


def render(a, results, tnames, cmdline, envdesc, wd, idle_rss, final_hwm,
           counters, failures, elapsed, proxies):
    out = ["## Throughput (smtp-source -L -> target -> smtp-sink -L)", ""]
    out.append("Command: `%s%s` (run %s, %.0f s)." % (
        (envdesc + " ") if envdesc else "", cmdline,
        time.strftime("%Y-%m-%d %H:%M:%S %Z"), elapsed))
    out.append("")
    out.append("Messages per run: %d (sizes <= 10 KB), %d (larger); %d run(s) "
               "per target and cell, targets interleaved (order rotates each "
               "run); figures are the median msg/s, rcpt/s in brackets when "
               "r > 1.  r=1 sends to `bench@bench.test` (-> sinkA); r=5 sends "
               "`5bench@split.test ... bench@split.test`, which both proxies "
               "split odd -> sinkA, even -> sinkB (direct: all to sinkA).  "
               "`new` = one connection per message, `keep` = smtp-source -d."
               % (a.msgs, a.msgs_large, a.runs))
    out.append("")
    if "ours" in proxies:
        out.append("Our proxy: %s (each figure is the largest of the master's "
                   "and the workers')." % proxy_md(proxies["ours"],
                                                  idle_rss.get("ours"),
                                                  final_hwm.get("ours")))
    else:
        out.append("Our proxy: **not measured** (--no-proxy / NO_PROXY=1, or "
                   "it failed to start).")
    out.append("")
    if "base" in proxies:
        out += baseline_md(results, proxies, idle_rss, final_hwm)
        out.append("")
    if "metrics" in proxies:
        out.append("`metrics` is our proxy once more, from the same venv with "
                   "the same config plus `metrics: [127.0.0.1, PORT]` (nobody "
                   "scrapes it during the runs), interleaved with the other "
                   "targets.  `metrics/ours` = median with metrics / median "
                   "without; `metrics slower beyond noise`: by more than the "
                   "larger run-to-run spread; `metrics cost us/msg` = wall time "
                   "per message added, from the medians.")
        out.append("")
    head = ["size", "sessions", "rcpts", "conn"] + tnames
    if "base" in tnames:
        head += ["ours/base", "noise ours", "noise base", "slower beyond noise"]
    if "metrics" in tnames:
        head += ["metrics/ours", "noise metrics", "noise ours",
                 "metrics slower beyond noise", "metrics cost us/msg"]
    if "ours" in tnames:
        head += ["ours/dovecot", "ours/direct", "proxy VmHWM so far"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for res in results:
        out.append(row_text(res, tnames))
    out.append("")
    out += cpu_md(results, [t for t in tnames if results and t in results[0]["cpu"]])
    out.append("All runs (msg/s):")
    out.append("")
    out.append("| cell | " + " | ".join(tnames) + " |")
    out.append("|---|" + "---|" * len(tnames))
    for res in results:
        out.append("| %s s=%d r=%d %s | %s |" % (
            fmt_size(res["size"]), res["s"], res["r"], res["conn"],
            " | ".join(", ".join("%.0f" % x for x in res["rates"][t]) +
                       ("; ERR: " + "; ".join(e[:80] for e in res["errs"][t])
                        if res["errs"][t] else "") for t in tnames)))
    out.append("")
    out.append("Sink counters at the end: " + "; ".join(
        "%s %s" % (k, " ".join("%s=%d" % kv for kv in v.items()))
        for k, v in counters.items()))
    out.append("")
    if failures:
        out.append("**FAIL** (%d):" % len(failures))
        out.append("")
        out += ["* " + f for f in failures]
    else:
        out.append("Counter check: OK - every run delivered exactly the "
                   "expected number of messages to each sink.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
