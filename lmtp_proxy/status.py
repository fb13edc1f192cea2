"""
What one serving process is doing right now: the view behind C{lmtp-proxy
status} and the gauges of the metrics.

Each process (the master and every worker) takes its own L{processView}; the
master gathers the workers' views over their standard input and output
(L{lmtp_proxy.workers}) and L{combine}s them with its own.
"""

import os
import time
from collections import Counter


def processView(state, factory, pool):
    """
    A JSON-ready dict of this process's sessions, transactions in flight
    and backend connections.

    @param state: the process's L{lmtp_proxy.state.ProxyState}.
    @param factory: its server factory (from
        L{lmtp_proxy.serving.serverFactory}).
    @param pool: its L{lmtp_proxy.pool.BackendPool}.
    """
    generations = Counter()
    inFlight = Counter()
    for transaction in factory.delivery.running:
        generations[str(transaction.generation)] += 1
        # A transaction before its first routed RCPT has no backend yet.
        for backend in transaction.sessions or ("none",):
            inFlight[transaction.generation, backend] += 1
    backends = {}
    for name, backend in state.config.backends.items():
        entry = {"address": backend.describe()}
        entry.update(pool.describe(backend))
        backends[name] = entry
    return {
        "pid": os.getpid(),
        "generation": state.generation,
        "sessions": len(factory.sessions),
        "routes": len(state.table),
        "transactions": len(factory.delivery.running),
        "generations": dict(generations),
        "in_flight": [
            {"generation": generation, "backend": backend, "count": count}
            for (generation, backend), count in sorted(inFlight.items())
        ],
        "backends": backends,
    }


def combine(master, workers):
    """
    The status of the whole proxy: C{master}'s view (L{processView}) with
    totals over every process (a backend is down if any process has it
    down), and each worker's view under C{workers}.

    @param workers: a mapping of worker numbers to their views, C{None} for
        one that did not answer.
    """
    views = [master] + [view for view in workers.values() if view is not None]
    generations = Counter()
    inFlight = Counter()
    for view in views:
        generations.update(view["generations"])
        for entry in view["in_flight"]:
            inFlight[entry["generation"], entry["backend"]] += entry["count"]
    backends = {}
    for name, entry in master["backends"].items():
        total = dict(entry)
        for view in views[1:]:
            other = view["backends"].get(name)
            if other is None:
                continue
            total["pooled"] += other["pooled"]
            total["busy"] += other["busy"]
            if other["state"] == "down":
                total["state"] = "down"
            if other["last_failure"] and (
                not total["last_failure"]
                or other["last_failure"]["at"] > total["last_failure"]["at"]
            ):
                total["last_failure"] = other["last_failure"]
        backends[name] = total
    return {
        "generation": master["generation"],
        "routes": master["routes"],
        "processes": len(views),
        "sessions": sum(view["sessions"] for view in views),
        "transactions": sum(view["transactions"] for view in views),
        "generations": dict(generations),
        "in_flight": [
            {"generation": generation, "backend": backend, "count": count}
            for (generation, backend), count in sorted(inFlight.items())
        ],
        "backends": backends,
        "master": master,
        "workers": {str(number): view for number, view in sorted(workers.items())},
    }


def _backendLines(backends, indent):
    lines = []
    width = max((len(name) for name in backends), default=0)
    for name, entry in sorted(backends.items()):
        lines.append(
            "%s%-*s  %-4s  pooled %d  busy %d  %s"
            % (
                indent,
                width,
                name,
                entry["state"],
                entry["pooled"],
                entry["busy"],
                entry["address"],
            )
        )
        failure = entry["last_failure"]
        if failure:
            lines.append(
                "%s%*s  last failure %s: %s"
                % (indent, width, "", _when(failure["at"]), failure["error"])
            )
    return lines


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _processLines(title, view):
    return [
        "%s (pid %d): %d session(s), %d transaction(s) in flight"
        % (title, view["pid"], view["sessions"], view["transactions"])
    ] + _backendLines(view["backends"], "  ")


def formatStatus(status):
    """
    The lines of C{lmtp-proxy status} for humans, from the dict of
    L{combine}.
    """
    lines = [
        "generation %d, %d process(es), %d session(s), %d transaction(s) in flight"
        % (status["generation"], status["processes"], status["sessions"], status["transactions"])
    ]
    byGeneration = {}
    for entry in status["in_flight"]:
        byGeneration.setdefault(entry["generation"], []).append(
            "%s %d" % (entry["backend"], entry["count"])
        )
    for generation, counts in sorted(byGeneration.items()):
        lines.append("  generation %d: %s" % (generation, ", ".join(counts)))
    lines.append("backends:")
    lines.extend(_backendLines(status["backends"], "  "))
    lines.extend(_processLines("master", status["master"]))
    for number, view in status["workers"].items():
        if view is None:
            lines.append("worker %s: did not answer" % (number,))
        else:
            lines.extend(_processLines("worker %s" % (number,), view))
    return lines
