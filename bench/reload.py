#!/usr/bin/env python3
"""Reload of a 100,000-user configuration, measured from outside.

Starts two sinks and our proxy with a config of N users (default 100,000),
keeps a client sending NOOP every 5 ms (after LHLO) and records the gap
between consecutive replies, then rewrites the config (the route of
probe@reload.test moves sinkA -> sinkB, plus 1 % of the users move) and
triggers a reload (SIGUSR1 to the proxy's PID, or `lmtp-proxy reload -c FILE`
with --method cli).  Reported per reload:

* the reload duration logged by the proxy ("reload: ..." lines), if any;
* the time until the route really changed: a probe transaction to
  probe@reload.test is repeated until sinkB's counter moves;
* the longest gap between NOOP replies (event-loop stall) during the reload,
  and before it as a baseline.  Target: stall < 100 ms.

    bench/reload.py [--quick] [--users 100000] [--reloads 3]
                    [--method signal|cli] [--results FILE]
"""

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

FROM = "src@harness.test"
PROBE = "probe@reload.test"


def make_config(port, a_port, b_port, users, flip):
    """flip=0/1: which sink gets the probe and every 100th user."""
    lines = ["config:",
             "  socket: [127.0.0.1, %d]" % port,
             "  ignoreDomain: false",
             "backends:",
             "  sinkA: {host: 127.0.0.1, port: %d}" % a_port,
             "  sinkB: {host: 127.0.0.1, port: %d}" % b_port,
             "users:",
             '  "%s": %s' % (PROBE, "sinkB" if flip else "sinkA")]
    for key, be in C.BENCH_USERS:
        lines.append('  "%s": %s' % (key, be))
    for i in range(users):
        be = i % 2
        if i % 100 == 0 and flip:
            be = 1 - be
        lines.append('  "user%06d@reload.test": %s' % (i, "sinkB" if be else "sinkA"))
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Ticker(threading.Thread):
    """NOOP every `every` seconds on one kept session; records reply times."""

    def __init__(self, port, every=0.005):
        super().__init__(daemon=True)
        self.client = C.LMTPClient(port, timeout=60)
        self.every = every
        self.replies = []          # (t_sent, t_reply)
        self.error = None
        self._stop_ev = threading.Event()

    def run(self):
        nxt = time.perf_counter()
        try:
            while not self._stop_ev.is_set():
                t = time.perf_counter()
                self.client.cmd("NOOP")
                self.replies.append((t, time.perf_counter()))
                nxt += self.every
                d = nxt - time.perf_counter()
                if d > 0:
                    time.sleep(d)
                else:
                    nxt = time.perf_counter()
        except (OSError, C.LMTPError) as e:
            self.error = str(e)

    def stop(self):
        self._stop_ev.set()
        self.join(70)
        self.client.quit()

    def window(self, t0, t1):
        """(max gap between replies, max NOOP round trip, replies) in [t0, t1]."""
        rs = [r for r in self.replies if t0 <= r[1] <= t1]
        prev = [r for r in self.replies if r[1] < t0]
        gaps, last = [], prev[-1][1] if prev else None
        for s, e in rs:
            if last is not None:
                gaps.append(e - last)
            last = e
        rtt = [e - s for s, e in rs]
        return (max(gaps) if gaps else float("nan"),
                max(rtt) if rtt else float("nan"), len(rs))


def probe(port, sinks, target, timeout=60.0, every=0.02):
    """Send probe transactions until sink `target`'s counter moves; returns
    the time (perf_counter) of the first reply that was routed there."""
    deadline = time.perf_counter() + timeout
    body = C.make_body(300, "probe")
    c = C.LMTPClient(port)
    try:
        while time.perf_counter() < deadline:
            before = target.mesg()
            c.send(FROM, [PROBE], body)
            t = time.perf_counter()
            got = C.settle([target], {target.name: before + 1}, 0.2)
            if got[target.name] > before:
                return t
            time.sleep(every)
    finally:
        c.quit()
    return None


def log_position(path):
    try:
        st = os.stat(path)
        return (st.st_ino, st.st_size)
    except FileNotFoundError:
        return (None, 0)


def read_log_since(path, pos):
    """Log text written since log_position(); copes with twistd's log
    rotation (proxy.log -> proxy.log.1 at 1 MB)."""
    ino, size = pos
    text = ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return text
    if st.st_ino != ino or st.st_size < size:
        for old in sorted(glob.glob(path + ".*")):
            try:
                if os.stat(old).st_ino == ino:
                    with open(old, errors="replace") as f:
                        f.seek(size)
                        text += f.read()
            except OSError:
                pass
        size = 0
    with open(path, errors="replace") as f:
        f.seek(size)
        text += f.read()
    return text


RELOAD_RE = re.compile(r"(?<![@.\w])reload(?:ed|ing)?\b(?!\.test)", re.I)
DUR_RE = re.compile(r"\bin (\d+(?:\.\d+)?)\s*(ms|s|sec|seconds)\b")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("QUICK", "") not in ("", "0"))
    ap.add_argument("--users", type=int, default=100000)
    ap.add_argument("--reloads", type=int)
    ap.add_argument("--method", choices=("signal", "cli"), default="signal")
    ap.add_argument("--workdir")
    ap.add_argument("--results", default=os.path.join(C.HERE, "RESULTS.md"))
    a = ap.parse_args()
    a.reloads = a.reloads or (1 if a.quick else 3)
    C.install_cleanup()
    wd = a.workdir or tempfile.mkdtemp(prefix="lmtpreload.")
    os.makedirs(wd, exist_ok=True)
    os.chmod(wd, 0o755)
    cmdline = " ".join([os.path.relpath(sys.argv[0], C.REPO)] + sys.argv[1:])
    failures, missed = [], []

    A = C.Sink(wd, "sinkA")
    B = C.Sink(wd, "sinkB")
    sinks = {"sinkA": A, "sinkB": B}
    port = C.free_port()
    texts = [make_config(port, A.port, B.port, a.users, f) for f in (0, 1)]
    out = ["## Reload with %d users" % a.users, ""]
    try:
        proxy = C.OurProxy(wd, yaml_text=texts[0], port=port, timeout=300)
    except C.Fail as e:
        C.log("FAIL: our proxy did not start:\n%s" % e)
        C.update_section(a.results, "reload", "\n".join(out) +
                         "\n**FAIL**: our proxy did not start: `%s`\n"
                         % str(e).splitlines()[0])
        return 1
    size = os.path.getsize(proxy.config)
    time.sleep(0.5)
    rss0 = C.rss_kb(proxy.pid)
    out.append("Command: `%s` (run %s), reload by %s; config %s (%.1f MB); "
               "proxy started (first 220 greeting) in %.2f s, RSS %s."
               % (cmdline, time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "SIGUSR1 to the proxy's PID" if a.method == "signal"
                  else "`lmtp-proxy reload -c FILE`",
                  proxy.config, size / 1e6, proxy.startup_s, C.mb(rss0)))
    out.append("")
    out.append("Each reload rewrites the config (probe@reload.test and 1,000 "
               "users move to the other sink).  'routed after' = time from the "
               "trigger until a probe transaction to probe@reload.test reaches "
               "the new sink (probes every ~20 ms).  Stall = longest gap "
               "between replies to a NOOP sent every 5 ms on a kept session, "
               "from the trigger until 1 s after the route changed; baseline = "
               "the same over the 2 s before the trigger.")
    out.append("")
    out.append("| # | proxy log: reload lines | duration logged | routed after | "
               "stall (max reply gap) | max NOOP RTT | baseline max gap | "
               "RSS after | verdict |")
    out.append("|---|---|---|---|---|---|---|---|---|")

    # the probe is on sinkA at first
    t = probe(port, sinks, A, timeout=10)
    if t is None:
        failures.append("probe@reload.test did not reach sinkA before any reload")
    ticker = Ticker(port)
    ticker.start()
    time.sleep(0.5)
    flip = 0
    cli = os.path.join(proxy.venv, "bin", "lmtp-proxy")
    for i in range(a.reloads):
        flip = 1 - flip
        target = B if flip else A
        time.sleep(2.0)
        logpos = log_position(proxy.logfile)
        write_atomic(proxy.config, texts[flip])
        t_sig = time.perf_counter()
        cli_note = ""
        if a.method == "signal":
            os.kill(proxy.pid, signal.SIGUSR1)
        else:
            r = subprocess.run([cli, "reload", "-c", proxy.config],
                               capture_output=True, text=True, timeout=120)
            cli_note = " cli %.0f ms rc=%d: %s" % (
                (time.perf_counter() - t_sig) * 1000, r.returncode,
                (r.stdout + r.stderr).strip()[:120])
        t_routed = probe(port, sinks, target, timeout=120)
        time.sleep(1.0)
        t_end = time.perf_counter()
        gap, rtt, nrep = ticker.window(t_sig, t_end)
        bgap, _, _ = ticker.window(t_sig - 2.0, t_sig)
        logtext = read_log_since(proxy.logfile, logpos)
        lines = [ln.strip() for ln in logtext.splitlines() if RELOAD_RE.search(ln)]
        durs = []
        for ln in lines:
            m = DUR_RE.findall(RELOAD_RE.split(ln, 1)[-1])
            durs += ["%s %s" % x for x in m]
        routed = ("%.0f ms" % ((t_routed - t_sig) * 1000)) if t_routed else \
            "NOT ROUTED within 120 s"
        verdict = "ok"
        if t_routed is None:
            verdict = "FAIL: route did not change"
            failures.append("reload %d: route did not change" % (i + 1))
        elif gap >= 0.1:
            verdict = "TARGET MISSED (stall >= 100 ms)"
            missed.append("reload %d: stall %.0f ms" % (i + 1, gap * 1000))
        if ticker.error:
            verdict = "FAIL: NOOP session: %s" % ticker.error
            failures.append("reload %d: NOOP session broke: %s" % (i + 1, ticker.error))
        if not proxy.alive():
            failures.append("proxy died during reload %d" % (i + 1))
            verdict = "FAIL: proxy died"
        rss = C.rss_kb(proxy.pid) if proxy.alive() else 0
        shown = "<br>".join("`%s`" % ln[-160:].replace("|", "/") for ln in lines[:3]) \
            or "(none)"
        out.append("| %d | %s%s | %s | %s | **%.0f ms** (%d replies) | %.0f ms | "
                   "%.0f ms | %s | %s |" % (
                       i + 1, shown, cli_note, ", ".join(durs[:3]) or "-", routed,
                       gap * 1000, nrep, rtt * 1000, bgap * 1000, C.mb(rss),
                       verdict))
        C.log("reload %d: logged %s, routed after %s, stall %.0f ms "
              "(baseline %.0f ms)" % (i + 1, durs or "-", routed, gap * 1000,
                                      bgap * 1000))
        if not proxy.alive() or ticker.error:
            break
    ticker.stop()
    out.append("")
    if missed:
        out.append("**TARGET MISSED**: " + "; ".join(missed))
        out.append("")
        C.log("TARGET MISSED: " + "; ".join(missed))
    if failures:
        out.append("**FAIL**: " + "; ".join(failures))
        out.append("")
        out.append("Proxy log tail:\n\n```\n%s```" % C.tail(proxy.logfile, 15))
    md = "\n".join(out) + "\n"
    C.update_section(a.results, "reload", md)
    print(md)
    C.stop_all()
    if not a.workdir:
        shutil.rmtree(wd, ignore_errors=True)
    strict = os.environ.get("STRICT", "") not in ("", "0")
    return 1 if failures or (strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
