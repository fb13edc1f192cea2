#!/usr/bin/env python3
"""Memory and latency of our proxy (standard library only).

1. RSS while relaying one 50 MB message (peak minus idle; target < 20 MB),
   to one backend and fanned out to two (5 recipients split.test).
2. RSS with 1,000 concurrent idle client sessions (connect, LHLO, hold).
3. Latency added per message at one kept session: median and p99 of the
   per-message round trip (MAIL .. last per-recipient reply) of a small
   Python LMTP client, proxy vs direct sink (and Dovecot's proxy; and, with
   BASELINE_VENV set, our proxy from that venv as "base"), and the median
   of each phase of it (MAIL, the RCPTs, DATA, the message up to the last
   final reply).
4. The same with the envelope pipelined as Postfix sends it (MAIL, every
   RCPT and DATA in one write), for 1, 5 and 50 recipients over two
   backends.

    bench/memory.py [--quick] [--big-mb 50] [--sessions 1000]
                    [--latency-msgs 2000] [--no-dovecot] [--results FILE]
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

FROM = "src@harness.test"
SPLIT5 = ["%sbench@split.test" % (str(i) if i > 1 else "") for i in range(5, 0, -1)]
# Postfix's lmtp_destination_recipient_limit: odd ones to sinkA, even ones
# to sinkB, through both proxies.
SPLIT50 = ["%sbench@split.test" % (str(i) if i > 1 else "") for i in range(50, 0, -1)]
USERS = C.BENCH_USERS[:1] + [("%dbench@split.test" % i, "sinkB")
                             for i in range(2, 51, 2)] + C.BENCH_USERS[3:]


class Sampler(threading.Thread):
    def __init__(self, pid, every=0.005):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self.samples = 0
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            try:
                self.peak = max(self.peak, C.rss_kb(self.pid))
                self.samples += 1
            except (OSError, KeyError):
                return
            time.sleep(self.every)

    def stop(self):
        self._stop_ev.set()
        self.join(2)


def big_body(total_bytes):
    line = b"y" * 998 + b"\r\n"
    chunk = line * 64          # 64000 bytes
    hdr = (b"From: <src@harness.test>\r\nTo: <bench@bench.test>\r\n"
           b"Subject: big\r\n\r\n")
    yield hdr
    sent = len(hdr)
    while sent < total_bytes:
        yield chunk
        sent += len(chunk)


def big_message(proxy, sinks, mbytes, rcpts, want):
    pid = proxy.pid
    time.sleep(0.5)
    idle = C.rss_kb(pid)
    C.reset_hwm(pid)
    before = {s.name: s.mesg() for s in sinks}
    sampler = Sampler(pid)
    sampler.start()
    t0 = time.perf_counter()
    err = None
    replies = []
    try:
        c = C.LMTPClient(proxy.port, timeout=300)
        replies = c.send(FROM, rcpts, big_body(mbytes * 1024 * 1024))
        c.quit()
    except (OSError, C.LMTPError) as e:
        err = str(e)
    dt = time.perf_counter() - t0
    time.sleep(0.3)
    sampler.stop()
    hwm = C.hwm_kb(pid) if proxy.alive() else 0
    after = C.rss_kb(pid) if proxy.alive() else 0
    got = C.settle(sinks, {k: before[k] + v for k, v in want.items()})
    delta = {k: got[k] - before[k] for k in got}
    bad = [r for r in replies if not r[0].startswith("2")]
    ok = err is None and not bad and len(replies) == len(rcpts) and delta == want
    peak = max(hwm, sampler.peak)
    return {"idle": idle, "peak": peak, "after": after, "growth": peak - idle,
            "secs": dt, "ok": ok, "err": err or (bad and str(bad)) or
            ("" if delta == want else "sink deltas %s, expected %s" % (delta, want)),
            "replies": [r[1][-1] for r in replies], "samples": sampler.samples}


def idle_sessions(proxy, count):
    pid = proxy.pid
    time.sleep(0.3)
    base = C.rss_kb(pid)
    base_fds = len(os.listdir("/proc/%d/fd" % pid))
    C.reset_hwm(pid)
    clients, errors = [], []
    t0 = time.perf_counter()
    for i in range(count):
        try:
            clients.append(C.LMTPClient(proxy.port, timeout=30))
        except (OSError, C.LMTPError) as e:
            errors.append("session %d: %s" % (i, e))
            if len(errors) > 20:
                break
    t_open = time.perf_counter() - t0
    time.sleep(1.0)
    held = C.rss_kb(pid)
    fds = len(os.listdir("/proc/%d/fd" % pid))
    # a live transaction while the idle sessions are held
    probe_ms = None
    try:
        t = time.perf_counter()
        c = C.LMTPClient(proxy.port)
        r = c.send(FROM, ["bench@bench.test"], C.make_body(1000, "probe"))
        c.quit()
        probe_ms = (time.perf_counter() - t) * 1000
        if not r or not r[0][0].startswith("2"):
            errors.append("probe transaction: %s" % r)
    except (OSError, C.LMTPError) as e:
        errors.append("probe transaction: %s" % e)
    # and all the held sessions still answer
    dead = 0
    for c in clients:
        try:
            c.cmd("NOOP")
        except (OSError, C.LMTPError):
            dead += 1
    if dead:
        errors.append("%d held sessions did not answer NOOP" % dead)
    hwm = C.hwm_kb(pid)
    for c in clients:
        c.quit()
    time.sleep(1.0)
    after = C.rss_kb(pid) if proxy.alive() else 0
    n = len(clients)
    return {"n": n, "base": base, "held": held, "hwm": hwm, "after": after,
            "per": (held - base) / n if n else 0, "fds": fds,
            "base_fds": base_fds, "t_open": t_open, "probe_ms": probe_ms,
            "errors": errors}


PHASES = ("MAIL", "RCPT", "DATA", "message")


def latency(targets, sinks, msgs, rcpts, block=100, pipelined=False):
    """targets: [(name, port)]; interleave blocks of `block` messages.
    Returns ({name: [round trip]}, {name: {phase: [time]}}, errors): the
    phases are the MAIL round trip, the RCPT round trips together, the DATA
    round trip, and the message up to the last final reply; with
    `pipelined`, the envelope goes in one write and there are no phases."""
    body = C.make_body(1000, "latency")
    conns = {n: C.LMTPClient(p) for n, p in targets}
    times = {n: [] for n, _ in targets}
    phases = {n: {p: [] for p in PHASES} for n, _ in targets}
    errors = []
    done = 0
    while done < msgs:
        k = min(block, msgs - done)
        for name, _ in targets:
            c = conns[name]
            for _ in range(k):
                marks = [time.perf_counter()]
                try:
                    if pipelined:
                        r = c.send_pipelined(FROM, rcpts, body)
                        marks.append(time.perf_counter())
                    else:
                        r = c.send(FROM, rcpts, body, marks)
                except (OSError, C.LMTPError) as e:
                    errors.append("%s: %s" % (name, e))
                    conns[name] = c = C.LMTPClient(dict(targets)[name])
                    continue
                times[name].append(marks[-1] - marks[0])
                if not pipelined:
                    for phase, start, end in zip(PHASES, marks, marks[1:]):
                        phases[name][phase].append(end - start)
                if len(r) != len(rcpts) or any(not x[0].startswith("2") for x in r):
                    errors.append("%s: replies %s" % (name, r))
        done += k
    for c in conns.values():
        c.quit()
    return times, phases, errors


def phase_table(by_phase, names):
    """The median of each phase of the latency runs, per target: where a
    message's round trip goes."""
    out = ["Where that time goes: the median of each phase of the same "
           "messages, in microseconds.  MAIL, DATA: the round trip of the "
           "command (a proxy answers both itself); RCPT: all the RCPT round "
           "trips of a message (a proxy answers each once its backend did); "
           "message: the message and final dot sent, up to the last final "
           "reply.", "",
           "| rcpts | target | %s |" % " | ".join(PHASES),
           "|---|---|%s" % ("---|" * len(PHASES))]
    for rl, phases in by_phase:
        for name in names:
            if not phases[name][PHASES[0]]:
                continue
            out.append("| %s | %s | %s |" % (rl, name, " | ".join(
                "%.0f" % (C.pct(phases[name][p], 0.5) * 1e6) for p in PHASES)))
    out.append("")
    return out


def pipelined_table(targets, msgs, failures):
    """Section 4: the pipelined envelope, 1, 5 and 50 recipients."""
    names = [name for name, _ in targets]
    msgs = max(100, msgs // 4)
    out = ["### Latency per message, one kept session, 1 KB, the envelope "
           "pipelined", "",
           "MAIL, every RCPT and DATA in one write, as Postfix's LMTP client "
           "sends them to a server offering PIPELINING, then the message: the "
           "median round trip (envelope .. last final reply) in microseconds, "
           "%d messages per target, in blocks of 100 interleaved across the "
           "targets.  The recipients alternate between sinkA and sinkB "
           "(direct: all to sinkA)." % msgs, "",
           "| rcpts | %s |%s" % (" | ".join(names),
                                 " ours/dovecot (speed) |" if "dovecot" in names else ""),
           "|---|%s%s" % ("---|" * len(names), "---|" if "dovecot" in names else "")]
    for rl, rcpts in (("1", ["bench@bench.test"]), ("5 split", SPLIT5),
                      ("50 split", SPLIT50)):
        C.log("pipelined %s" % rl)
        times, _, errors = latency(targets, None, msgs, rcpts, pipelined=True)
        failures += errors[:5]
        med = {n: C.pct(times[n], 0.5) * 1e6 if times[n] else None for n in names}
        cells = ["%.0f" % med[n] if med[n] else "FAIL" for n in names]
        if "dovecot" in names:
            cells.append("%.2f" % (med["dovecot"] / med["ours"])
                         if med["dovecot"] and med["ours"] else "-")
        out.append("| %s | %s |" % (rl, " | ".join(cells)))
        if errors:
            out.append("")
            out.append("**FAIL**: " + "; ".join(errors[:3]))
    out.append("")
    return out


def start_baseline(wd, A, B, failures):
    """The "before" proxy from BASELINE_VENV for the latency comparison, or
    None (not set, or a FAIL).  Started only now, so that it is not in the
    way of the memory measurements above."""
    if not C.baseline_venv():
        return None
    try:
        return C.OurProxy(wd, backends={"sinkA": A.port, "sinkB": B.port},
                          users=USERS, name="base", workers=1,
                          venv=C.baseline_venv())
    except C.Fail as e:
        C.log("FAIL: base proxy did not start:\n%s" % e)
        failures.append("base proxy did not start: %s" % str(e).splitlines()[0])
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("QUICK", "") not in ("", "0"))
    ap.add_argument("--big-mb", type=int, default=50)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--latency-msgs", type=int)
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--workdir")
    ap.add_argument("--results", default=os.path.join(C.HERE, "RESULTS.md"))
    a = ap.parse_args()
    a.latency_msgs = a.latency_msgs or (300 if a.quick else 2000)
    C.install_cleanup()
    nofile = C.raise_nofile()
    wd = a.workdir or tempfile.mkdtemp(prefix="lmtpmem.")
    os.makedirs(wd, exist_ok=True)
    os.chmod(wd, 0o755)
    cmdline = os.environ.get("BENCH_CMDLINE_MEM") or " ".join(
        [os.path.relpath(sys.argv[0], C.REPO)] + sys.argv[1:])
    failures = []
    missed = []     # targets not met (exit 1 only with STRICT=1)

    A = C.Sink(wd, "sinkA")
    B = C.Sink(wd, "sinkB")
    sinks = [A, B]
    try:
        # One process, so that every session and message is in the process
        # measured.
        proxy = C.OurProxy(wd, backends={"sinkA": A.port, "sinkB": B.port},
                           users=USERS, workers=1)
    except C.Fail as e:
        C.log("FAIL: our proxy did not start:\n%s" % e)
        C.update_section(a.results, "memory",
                         "## Memory and latency\n\n**FAIL**: our proxy did not "
                         "start: `%s`\n" % str(e).splitlines()[0])
        return 1
    dove = None
    if not a.no_dovecot:
        users = {"bench@split.test": A.port}
        for i in range(2, 51):
            users["%dbench@split.test" % i] = A.port if i % 2 else B.port
        dove = C.DovecotProxy(wd, users, {"bench.test": A.port})
    time.sleep(0.5)
    start_rss = C.rss_kb(proxy.pid)
    out = ["## Memory and latency of our proxy", ""]
    out.append("Command: `%s` (run %s); proxy: `%s`; RLIMIT_NOFILE %d."
               % (cmdline, time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  " ".join(proxy.argv), nofile))
    out.append("")
    out.append("RSS right after start: %s." % C.mb(start_rss))
    out.append("")

    # 1. big message
    out.append("### One %d MB message" % a.big_mb)
    out.append("")
    out.append("VmRSS sampled every 5 ms plus VmHWM (reset through "
               "/proc/PID/clear_refs before each message); growth = peak - "
               "RSS just before the message.  Target: growth < 20 MB.")
    out.append("")
    out.append("| recipients | idle RSS | peak RSS | growth | RSS after | time | "
               "result |")
    out.append("|---|---|---|---|---|---|---|")
    for label, rcpts, want in (
            ("1 (bench@bench.test -> sinkA)", ["bench@bench.test"],
             {"sinkA": 1, "sinkB": 0}),
            ("5 split.test -> sinkA + sinkB", SPLIT5, {"sinkA": 1, "sinkB": 1})):
        C.log("big message: %s" % label)
        r = big_message(proxy, sinks, a.big_mb, rcpts, want)
        verdict = "ok" if r["ok"] else "FAIL: " + str(r["err"])[:200]
        if r["ok"] and r["growth"] >= 20 * 1024:
            verdict = "ok, but TARGET MISSED (growth >= 20 MB)"
            missed.append("50 MB message (%s): RSS growth %s >= 20 MB"
                            % (label, C.mb(r["growth"])))
        if not r["ok"]:
            failures.append("50 MB message (%s): %s" % (label, r["err"]))
        out.append("| %s | %s | %s | **%s** | %s | %.1f s (%.0f MB/s) | %s |" % (
            label, C.mb(r["idle"]), C.mb(r["peak"]), C.mb(r["growth"]),
            C.mb(r["after"]), r["secs"], a.big_mb / r["secs"], verdict))
        C.log("  growth %s, %.1f s, %s" % (C.mb(r["growth"]), r["secs"], verdict))
        if not proxy.alive():
            break
    out.append("")

    # 2. idle sessions
    if proxy.alive():
        C.log("%d idle sessions" % a.sessions)
        r = idle_sessions(proxy, a.sessions)
        out.append("### %d concurrent idle sessions (connect + LHLO, held)"
                   % a.sessions)
        out.append("")
        out.append("| sessions open | RSS before | RSS held | per session | "
                   "VmHWM | RSS after close | proxy fds (before -> held) | "
                   "open time | 1 transaction meanwhile |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        out.append("| %d | %s | %s | %.1f KB | %s | %s | %d -> %d | %.2f s | %s |"
                   % (r["n"], C.mb(r["base"]), C.mb(r["held"]), r["per"],
                      C.mb(r["hwm"]), C.mb(r["after"]), r["base_fds"], r["fds"],
                      r["t_open"], "%.1f ms" % r["probe_ms"] if r["probe_ms"]
                      else "-"))
        if r["errors"]:
            out.append("")
            out.append("**FAIL**: " + "; ".join(r["errors"][:5]))
            failures += r["errors"][:5]
        out.append("")
        C.log("  per session %.1f KB, held %s" % (r["per"], C.mb(r["held"])))

    # 3. latency
    if proxy.alive():
        targets = [("direct", A.port), ("ours", proxy.port)]
        baseline = start_baseline(wd, A, B, failures)
        if baseline:
            targets.append(("base", baseline.port))
        if dove:
            targets.append(("dovecot", dove.port))
        out.append("### Latency per message, one kept session, 1 KB")
        out.append("")
        out.append("Round trip MAIL FROM .. last per-recipient reply after the "
                   "final dot, measured by bench/common.py's LMTPClient (no "
                   "pipelining); %d messages per target, in blocks of 100 "
                   "interleaved across the targets.  'added' = proxy minus "
                   "direct." % a.latency_msgs)
        if baseline:
            out.append("`base` = \"%s\", the same proxy installed in %s "
                       "(`workers: 1` too): `%s`."
                       % (C.baseline_label(), C.baseline_venv(),
                          " ".join(baseline.argv)))
        out.append("")
        out.append("| rcpts | target | median | p90 | p99 | max | added (median) "
                   "| added (p99) |")
        out.append("|---|---|---|---|---|---|---|---|")
        by_phase = []
        for rl, rcpts in (("1", ["bench@bench.test"]),
                          ("5 split", SPLIT5)):
            C.log("latency %s" % rl)
            times, phases, errors = latency(targets, sinks, a.latency_msgs, rcpts)
            by_phase.append((rl, phases))
            if errors:
                failures += errors[:5]
            base = times["direct"]
            for name, _ in targets:
                t = times[name]
                if not t:
                    out.append("| %s | %s | FAIL |  |  |  |  |  |" % (rl, name))
                    continue
                ms = lambda q: C.pct(t, q) * 1000  # noqa: E731
                add = ("%.3f ms" % (ms(0.5) - C.pct(base, 0.5) * 1000),
                       "%.3f ms" % (ms(0.99) - C.pct(base, 0.99) * 1000)) \
                    if name != "direct" else ("", "")
                out.append("| %s | %s | %.3f ms | %.3f ms | %.3f ms | %.3f ms | "
                           "%s | %s |" % (rl, name, ms(0.5), ms(0.9), ms(0.99),
                                          max(t) * 1000, add[0], add[1]))
            if errors:
                out.append("")
                out.append("**FAIL**: " + "; ".join(errors[:3]))
        out.append("")
        out += phase_table(by_phase, [name for name, _ in targets])
        out += pipelined_table(targets, a.latency_msgs, failures)
    if proxy.alive():
        out.append("Proxy RSS at the end %s, VmHWM since last reset %s."
                   % (C.mb(C.rss_kb(proxy.pid)), C.mb(C.hwm_kb(proxy.pid))))
    else:
        out.append("**FAIL**: the proxy process died (exit %s); log tail:\n\n```\n%s```"
                   % (proxy.proc.returncode, C.tail(proxy.logfile)))
        failures.append("proxy died")
    if missed:
        out.append("")
        out.append("**TARGET MISSED**: " + "; ".join(missed))
        C.log("TARGET MISSED: " + "; ".join(missed))
    if failures:
        out.append("")
        out.append("**FAIL** (%d): %s" % (len(failures), "; ".join(failures[:10])))
    md = "\n".join(out) + "\n"
    C.update_section(a.results, "memory", md)
    print(md)
    C.stop_all()
    if not a.workdir:
        shutil.rmtree(wd, ignore_errors=True)
    strict = os.environ.get("STRICT", "") not in ("", "0")
    return 1 if failures or (strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
