#!/usr/bin/env python3
"""Scale of the routing table, measured from outside.

Database source (--part db; needs Debian's postgresql and the
``postgresql`` extra in the venv):

* a private PostgreSQL (initdb into a temporary directory, as the harness
  user, unix socket only, stopped by its PID) with N routes (default
  1,000,000);
* two proxy nodes (``workers: 1``): time from start to the first RCPT
  answered by a backend (the table loaded), and RSS per node;
* lookup cost per RCPT: ``LiveTable.route`` in this process at N routes
  and at 1,000 routes (it must be flat), and the RCPT round trip through a
  node;
* time for one change (``lmtp-proxy users set``) to be in force on both
  nodes: the command's own ``--wait`` and a probe RCPT on each node.

YAML source (--part yaml): a file of N users, ``workers: 2``: start-up time
and RSS of the master and the worker, and bytes per user against a file
with no users (``--label`` names the row, e.g. before/after a change).

    bench/scale.py [--routes 1000000] [--part db|yaml|both] [--label TEXT]
                   [--results FILE]

Each part runs once; at 1,000,000 routes each takes a few minutes.
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

FROM = "src@harness.test"
PROBE = "probe@scale.test"


def user(i):
    return "user%d@scale.test" % (i,)


# --------------------------------------------------------------- PostgreSQL

class Postgres:
    """A private PostgreSQL server on a unix socket in C{workdir}."""

    def __init__(self, workdir):
        bins = sorted(d for d in (os.path.join("/usr/lib/postgresql", v, "bin")
                                  for v in os.listdir("/usr/lib/postgresql"))
                      if os.path.exists(os.path.join(d, "postgres")))
        if not bins:
            raise C.Fail("PostgreSQL missing (Debian package postgresql)")
        self.bin = bins[-1]
        C.ensure_user()
        import pwd

        entry = pwd.getpwnam(C.HARNESS_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.dir = os.path.join(workdir, "pg")
        os.makedirs(self.dir)
        os.chown(self.dir, self.uid, self.gid)
        self.data = os.path.join(self.dir, "data")
        subprocess.run([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "lmtp",
                        "-E", "UTF8", "--no-sync", "--auth-local=trust"],
                       check=True, capture_output=True, preexec_fn=self._demote, cwd=self.dir,
                       env=dict(os.environ, LC_ALL="C.UTF-8"))
        argv = [os.path.join(self.bin, "postgres"), "-D", self.data, "-k", self.dir,
                "-c", "listen_addresses=", "-c", "fsync=off", "-c", "unix_socket_permissions=0777"]
        self.proc = subprocess.Popen(argv, stdout=open(os.path.join(self.dir, "log"), "wb"),
                                     stderr=subprocess.STDOUT, preexec_fn=self._demote,
                                     cwd=self.dir, env=dict(os.environ, LC_ALL="C.UTF-8"))
        C.track("postgres", self.proc)
        deadline = time.monotonic() + 30
        while not self.psql("postgres", "SELECT 1", check=False):
            if time.monotonic() > deadline:
                raise C.Fail("PostgreSQL did not start: %s" % C.tail(os.path.join(self.dir, "log")))
            time.sleep(0.2)
        self.psql("postgres", "CREATE DATABASE mail")
        self.uri = "postgresql://lmtp@/mail?host=%s" % (self.dir,)

    def _demote(self):
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

    def psql(self, db, sql, check=True):
        done = subprocess.run([os.path.join(self.bin, "psql"), "-h", self.dir, "-U", "lmtp",
                               "-d", db, "-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True)
        if check and done.returncode != 0:
            raise C.Fail("psql %r: %s" % (sql[:80], done.stderr))
        return done.returncode == 0 and (done.stdout or True)

    def stop(self):
        C.stop("postgres")


# ------------------------------------------------------------------- proxies

def lmtp_proxy(venv, *args):
    done = subprocess.run([os.path.join(venv, "bin", "lmtp-proxy")] + list(args),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise C.Fail("lmtp-proxy %s: %s%s" % (" ".join(args), done.stdout, done.stderr))
    return done.stdout


def node_yaml(name, port, pg_uri, sinks, workdir, workers=1):
    return "\n".join([
        "config:",
        "  socket: [127.0.0.1, %d]" % port,
        "  node_name: %s" % name,
        "  workers: %d" % workers,
        "  control_socket: %s" % os.path.join(workdir, name + ".ctl"),
        "routing:",
        '  database: "%s"' % pg_uri,
        "backends:",
    ] + ["  %s: {host: 127.0.0.1, port: %d}" % (s.name, s.port) for s in sinks]) + "\n"


def rcpt(client, address):
    client.cmd("MAIL FROM:<%s>" % FROM)
    client.sock.sendall(("RCPT TO:<%s>\r\n" % address).encode())
    code, _ = client.reply()
    client.cmd("RSET")
    return code


def until_served(port, address, timeout):
    """Seconds until a RCPT for C{address} gets 250 (the table loaded)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            c = C.LMTPClient(port, timeout=5)
            try:
                if rcpt(c, address) == "250":
                    return time.monotonic() - t0
            finally:
                c.sock.close()
        except (OSError, C.LMTPError):
            pass
        time.sleep(0.05)
    raise C.Fail("no 250 for %s within %s s" % (address, timeout))


def lookup_ns(n, samples=200000):
    """ns per LiveTable.route() at n routes, hits and misses mixed."""
    sys.path.insert(0, C.REPO)
    from lmtp_proxy import config as configuration
    from lmtp_proxy.pgsource import LiveTable

    config = configuration.parse(
        "config:\n  socket: [127.0.0.1, 1]\nbackends:\n  sinkA: {host: 127.0.0.1, port: 2}\n")
    return route_ns(LiveTable({user(i): "sinkA" for i in range(n)}, config), n, samples)


def route_ns(table, n, samples=200000):
    """ns per table.route() over a table of user(0) .. user(n - 1), one
    lookup in four a miss; the best of three passes."""
    rng = random.Random(1)
    addresses = [user(rng.randrange(n)) if i % 4 else "nobody%d@scale.test" % i
                 for i in range(samples)]
    route = table.route
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        for a in addresses:
            route(a)
        elapsed = (time.perf_counter() - t0) / samples * 1e9
        best = elapsed if best is None else min(best, elapsed)
    return best


def rcpt_rtt_us(port, address, count=2000):
    c = C.LMTPClient(port)
    try:
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            c.cmd("MAIL FROM:<%s>" % FROM)
            c.sock.sendall(("RCPT TO:<%s>\r\n" % address).encode())
            c.reply()
            times.append(time.perf_counter() - t0)
            c.cmd("RSET")
    finally:
        c.sock.close()
    return C.median(times) * 1e6


def part_db(args, workdir, venv):
    sinks = [C.Sink(workdir, "sinkA"), C.Sink(workdir, "sinkB")]
    pg = Postgres(workdir)
    admin = os.path.join(workdir, "admin.yaml")
    with open(admin, "w") as f:
        f.write(node_yaml("admin", 1, pg.uri, sinks, workdir))
    lmtp_proxy(venv, "db", "init", "-c", admin)
    t0 = time.monotonic()
    pg.psql("mail", "SET lmtp_proxy.bulk = 'on'; INSERT INTO lmtp_routes "
            "SELECT 'user' || i || '@scale.test', 'sinkA', NULL FROM generate_series(0, %d) i; "
            "INSERT INTO lmtp_routes VALUES ('%s', 'sinkA', NULL)" % (args.routes - 1, PROBE))
    C.log("db: %d routes inserted in %.1f s" % (args.routes, time.monotonic() - t0))
    results = {}
    nodes = []
    for name in ("mx1", "mx2"):
        d = os.path.join(workdir, name)
        os.makedirs(d)
        port = C.free_port()
        text = node_yaml(name, port, pg.uri, sinks, workdir)
        proxy = C.OurProxy(workdir, yaml_text=text, name=name, port=port, venv=venv)
        served = proxy.startup_s + until_served(port, user(args.routes // 2), 600)
        time.sleep(1.0)
        rss = sum(C.rss_kb(p) for p in proxy.pids())
        nodes.append(proxy)
        results[name] = (served, rss)
        C.log("db: %s serving after %.2f s, RSS %s" % (name, served, C.mb(rss)))
    smallPort = C.free_port()
    small = C.OurProxy(workdir, yaml_text=C.proxy_yaml(
        smallPort, {s.name: s.port for s in sinks},
        [(user(i), "sinkA") for i in range(1000)] + [(PROBE, "sinkA")], workers=1),
        name="small", port=smallPort, venv=venv)
    ns_big, ns_small = lookup_ns(args.routes), lookup_ns(1000)
    rtt_big = rcpt_rtt_us(nodes[0].port, user(args.routes // 3))
    rtt_small = rcpt_rtt_us(small.port, user(333))
    C.log("db: lookup %.0f ns at %d, %.0f ns at 1000; RCPT rtt %.0f / %.0f us"
          % (ns_big, args.routes, ns_small, rtt_big, rtt_small))
    # One change, in force on both nodes.
    changes = []
    for i in range(5):
        target = "reject" if i % 2 == 0 else "sinkB"
        t0 = time.monotonic()
        lmtp_proxy(venv, "users", "set", "-c", admin, PROBE, target, "--wait", "--timeout", "30")
        waited = time.monotonic() - t0
        want = "451" if target == "reject" else "250"
        seen = []
        for proxy in nodes:
            c = C.LMTPClient(proxy.port)
            try:
                while rcpt(c, PROBE) != want:
                    time.sleep(0.005)
            finally:
                c.sock.close()
            seen.append(time.monotonic() - t0)
        changes.append((waited, max(seen)))
    C.log("db: changes in force on both nodes: %s" % (changes,))
    for proxy in nodes + [small]:
        C.stop(proxy.name)
    pg.stop()
    table = [
        "## Scale: PostgreSQL routing source, %d routes" % (args.routes,),
        "",
        "Command: `%s` (run %s UTC).  Two nodes, `workers: 1`, one private "
        "PostgreSQL on a unix socket, same host." % (" ".join(sys.argv), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())),
        "",
        "| node | start to first delivered RCPT | RSS |",
        "|---|---|---|",
    ] + ["| %s | %.2f s | %s |" % (name, served, C.mb(rss)) for name, (served, rss) in results.items()] + [
        "",
        "| lookup cost | %d routes | 1,000 routes |" % (args.routes,),
        "|---|---|---|",
        "| `LiveTable.route` in process (ns, best of 3 x 200,000) | %.0f | %.0f |" % (ns_big, ns_small),
        "| MAIL+RCPT round trip through a node (us, median of 2000) | %.0f | %.0f |" % (rtt_big, rtt_small),
        "",
        "One change (`lmtp-proxy users set ... --wait`) in force on both nodes, 5 times: "
        "the command returned after %s s; a probe RCPT on each node saw it after %s s."
        % (", ".join("%.3f" % w for w, _ in changes), ", ".join("%.3f" % s for _, s in changes)),
    ]
    C.update_section(args.results, "scale-db", "\n".join(table))


def part_yaml(args, workdir, venv):
    sinks = {"sinkA": C.Sink(workdir, "sinkA").port}
    rows = []
    for n in (0, args.routes):
        users = [(user(i), "sinkA") for i in range(n)] + [(PROBE, "sinkA")]
        port = C.free_port()
        text = C.proxy_yaml(port, sinks, users, workers=2)
        t0 = time.monotonic()
        proxy = C.OurProxy(workdir, yaml_text=text, name="yaml%d" % n, port=port,
                           venv=venv, timeout=900)
        served = time.monotonic() - t0
        # Every process serving: the worker got its configuration.
        deadline = time.monotonic() + 900
        while len(proxy.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        log = proxy.logfile
        while time.monotonic() < deadline:
            with open(log) as f:
                if "worker process(es) serving" in f.read():
                    break
            time.sleep(0.2)
        allServing = time.monotonic() - t0
        time.sleep(2.0)
        rss = [C.rss_kb(p) for p in proxy.pids()]
        rows.append((n, served, allServing, rss))
        C.log("yaml: %d users: listening %.1f s, all serving %.1f s, RSS %s"
              % (n, served, allServing, [C.mb(r) for r in rss]))
        C.stop(proxy.name)
    (n0, _, _, rss0), (n1, served, allServing, rss1) = rows
    perUser = [(b - a) * 1024.0 / n1 for a, b in zip(rss0, rss1)]
    line = "| %s | %d | %.1f s | %.1f s | %s | %s | %s |" % (
        args.label, n1, served, allServing,
        " + ".join(C.mb(r) for r in rss1),
        " + ".join("%.0f" % b for b in perUser), "%.0f" % sum(perUser))
    header = "\n".join([
        "## Scale: YAML source, `workers: 2`",
        "",
        "`bench/scale.py --part yaml --label LABEL`: RSS of the master and the worker two "
        "seconds after both serve, against the same configuration without users; bytes per "
        "user = (RSS - RSS without users) / users, per process and for the node. `before`: "
        "the master parsed the file itself and kept the composed YAML's memory, and every "
        "table copied its configuration's users mapping; `after`: a file over 4 MB is parsed "
        "in a child process (`lmtp_proxy.reloader.loadAtStart`) and the table shares the "
        "mapping (`RoutingTable.fromConfig`).",
        "",
        "| label | users | listening | both processes serving | RSS master + worker | "
        "bytes/user master + worker | bytes/user node |",
        "|---|---|---|---|---|---|---|",
    ])
    C.update_section(args.results, "scale-yaml", header)
    C.update_section(args.results, "scale-yaml-" + args.label, line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=1000000)
    parser.add_argument("--part", choices=("db", "yaml", "both"), default="both")
    parser.add_argument("--label", default="current")
    parser.add_argument("--results", default=os.path.join(C.HERE, "RESULTS.md"))
    args = parser.parse_args()
    C.install_cleanup()
    venv = C.venv_dir()
    workdir = tempfile.mkdtemp(prefix="lmtpscale.")
    os.chmod(workdir, 0o755)
    try:
        if args.part in ("db", "both"):
            part_db(args, workdir, venv)
        if args.part in ("yaml", "both"):
            part_yaml(args, workdir, venv)
    finally:
        C.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
