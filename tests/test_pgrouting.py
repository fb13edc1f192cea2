"""
The PostgreSQL routing source: the live table, the barrier's
logic, fencing, the configuration keys, and the commands and proxies
against a real PostgreSQL server (L{tests.pgserver}).
"""

import contextlib
import io
import os
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from lmtp_proxy import barrier, cli
from lmtp_proxy import config as configuration
from lmtp_proxy.interfaces import IRoutingSource
from lmtp_proxy.pgsource import LiveTable, decodeChanges, encodeChanges
from lmtp_proxy.pgstore import StoreError, redact
from lmtp_proxy.routing import REJECT, RoutingTable
from lmtp_proxy.state import ProxyState
from lmtp_proxy.yamledit import deleteUser, setUser

BASE = """\
config:
  socket: [127.0.0.1, 24024]
backends:
  old: {host: 127.0.0.1, port: 2401}
  new: {host: 127.0.0.1, port: 2402}
"""


def parse(extra=""):
    return configuration.parse(BASE + extra)


class LiveTableTests(unittest.TestCase):
    """
    L{LiveTable}, the database source's L{IRoutingSource}.
    """

    def table(self, users, extra=""):
        return LiveTable(dict(users), parse(extra))

    def test_providesIRoutingSource(self):
        """
        A L{LiveTable} provides L{IRoutingSource}.
        """
        self.assertTrue(verifyObject(IRoutingSource, self.table({})))

    def test_sameLookupAsYAML(self):
        """
        Keys, C{+detail}, C{@domain} and case match as in the YAML table.
        """
        users = {"alice@example.com": "old", "@example.org": "new", "bob@example.com": ("new", "b@x")}
        live = self.table(users)
        yaml = RoutingTable(users, False, None)
        for address in ("Alice+x@Example.com", "zed@example.org", "bob@example.com", "nobody@else"):
            self.assertEqual(live.route(address), yaml.route(address), address)

    def test_applyChangesInPlace(self):
        """
        L{LiveTable.apply} sets and removes routes in the same table.
        """
        live = self.table({"a@x": "old"})
        live.apply([("a@x", None), ("b@x", "new"), ("b@x", REJECT)])
        self.assertIsNone(live.route("a@x"))
        self.assertEqual(live.route("b@x").backend, REJECT)

    def test_unknownBackendDeferred(self):
        """
        A row naming a backend the configuration lacks is routed like
        C{reject} (4xx), never to a backend that is not there.
        """
        live = self.table({"a@x": "gone"})
        self.assertEqual(live.route("a@x").backend, REJECT)

    def test_badAddressDeferred(self):
        """
        A row whose rewrite address could not stand in a RCPT (a CR, LF or
        angle bracket written by hand) is routed like C{reject}, so it can
        never inject a command at a backend.
        """
        live = self.table({"a@x": ("old", "b@y\r\nRSET"), "c@x": ("old", "d<@y"), "e@x": ("old", "f@y")})
        self.assertEqual(live.route("a@x").backend, REJECT)
        self.assertEqual(live.route("c@x").backend, REJECT)
        self.assertEqual(live.route("e@x").address, "f@y")

    def test_reconfigureFallback(self):
        """
        A reloaded configuration's routing settings reach the live table.
        """
        live = self.table({})
        self.assertIsNone(live.route("a@x"))
        config = configuration.parse(BASE.replace("  socket:", "  fallback_backend: new\n  socket:"))
        live.reconfigure(config)
        self.assertEqual(live.route("a@x").backend, "new")

    def test_changesRoundTrip(self):
        """
        Changes sent to worker processes come back as they were.
        """
        changes = [("a@x", "old"), ("b@x", None), ("c@x", ("new", "c@y"))]
        self.assertEqual(decodeChanges(encodeChanges(changes)), changes)


class BarrierLogicTests(unittest.TestCase):
    """
    L{barrier.assess} and L{barrier.wait}.
    """

    def row(self, name, generation, oldest=None, silence=0.0, lease=10.0, dataTimeout=300.0):
        return (name, generation, oldest, False, lease, dataTimeout, silence)

    def test_readyNode(self):
        """
        A node with the generation in force and nothing older in flight
        does not hold the barrier.
        """
        self.assertEqual(barrier.assess(5, [self.row("a", 5, 5), self.row("b", 6)]), ([], []))

    def test_olderGenerationHolds(self):
        """
        A node without the generation in force holds the barrier.
        """
        holding, out = barrier.assess(5, [self.row("a", 4)])
        self.assertEqual([name for name, _ in holding], ["a"])

    def test_olderTransactionHolds(self):
        """
        A node with a transaction of an older generation in flight holds it.
        """
        holding, out = barrier.assess(5, [self.row("a", 5, oldest=4)])
        self.assertIn("generation 4 in flight", holding[0][1])

    def test_silentNodeCountedOutOnlyAfterLeaseAndDataTimeout(self):
        """
        A silent node is waited for until its lease plus C{data_timeout}
        plus a margin has passed, then counted out.
        """
        limit = barrier.countOutAfter(10, 300)
        self.assertGreater(limit, 310)
        holding, out = barrier.assess(5, [self.row("a", 4, silence=309)])
        self.assertEqual((len(holding), out), (1, []))
        holding, out = barrier.assess(5, [self.row("a", 4, silence=limit + 0.1)])
        self.assertEqual((holding, out), ([], ["a"]))

    def test_waitTimesOutNamingNodes(self):
        """
        L{barrier.wait} gives up after its timeout naming the nodes that
        hold it up.
        """
        rows = [self.row("mx1", 4), self.row("mx2", 5)]

        class Store:
            def nodes(self):
                return 5, rows

            def close(self):
                pass

        now = [0.0]
        e = self.assertRaises(
            barrier.BarrierTimeout, barrier.wait, Store(), 1.0,
            clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
        self.assertIn("mx1 has generation 4 in force", str(e))
        self.assertNotIn("mx2", str(e))

    def test_waitRetriesDatabaseErrors(self):
        """
        A database error during the barrier is retried until the timeout,
        and named when it runs out.
        """
        calls = []

        class Store:
            def nodes(self):
                calls.append(1)
                if len(calls) < 3:
                    raise StoreError("database postgresql://x@/mail: down")
                return 7, [("a", 7, None, False, 10.0, 1.0, 0.0)]

            def close(self):
                pass

        now = [0.0]
        self.assertEqual(
            barrier.wait(Store(), 5.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)),
            (7, []),
        )
        self.assertEqual(len(calls), 3)


class FencingStateTests(unittest.TestCase):
    """
    L{ProxyState}'s fencing and generations.
    """

    def test_fenceStopsLiveTransactions(self):
        """
        L{ProxyState.fence} reaches every transaction still running.
        """
        state = ProxyState(parse())
        fenced = []

        class Transaction:
            def fence(self, why):
                fenced.append(why)

        t = Transaction()
        generation = state.begin(t)
        state.fence("lease expired")
        self.assertEqual((fenced, state.fenced), (["lease expired"], "lease expired"))
        state.end(generation, t)
        state.fence("again")
        self.assertEqual(fenced, ["lease expired"])

    def test_oldest(self):
        """
        L{ProxyState.oldest} is the oldest generation in flight.
        """
        state = ProxyState(parse())
        self.assertIsNone(state.oldest())
        state.advance(3)
        state.begin()
        state.advance(4)
        state.begin()
        self.assertEqual(state.oldest(), 3)

    def test_swapConfigKeepsGeneration(self):
        """
        A reload with the database source keeps the table and generation.
        """
        state = ProxyState(parse())
        table = LiveTable({"a@x": "old"}, state.config)
        state.advance(9, table)
        state.swapConfig(parse())
        self.assertEqual((state.generation, state.table), (9, table))


class ConfigTests(unittest.TestCase):
    """
    The configuration keys of the database source and the cluster.
    """

    DB = 'routing:\n  database: "postgresql://lmtp:s3cret@/mail?host=/run/postgresql"\n'

    def test_defaults(self):
        """
        Without them the YAML source is in force, node_name is the host
        name, the lease 10 s and the table lmtp_routes.
        """
        config = parse()
        self.assertIsNone(config.routing_database)
        self.assertEqual((config.lease, config.routing_table), (10.0, "lmtp_routes"))
        self.assertTrue(config.node_name)

    def test_routingKeys(self):
        """
        routing.database, routing.table, routing.password_file,
        config.node_name and config.lease are read.
        """
        text = (BASE.replace("config:\n", "config:\n  node_name: mx1\n  lease: 4\n")
                + self.DB + "  table: routes2\n  password_file: /etc/pw\n")
        config = configuration.parse(text)
        self.assertEqual(
            (config.node_name, config.lease, config.routing_table, config.routing_password_file),
            ("mx1", 4.0, "routes2", "/etc/pw"),
        )

    def test_usersWithDatabaseRefused(self):
        """
        users next to routing.database is a clear error.
        """
        e = self.assertRaises(
            configuration.ConfigError, configuration.parse, BASE + self.DB + "users:\n  a@x: old\n"
        )
        self.assertIn("users: must be absent when routing.database is set", str(e))

    def test_passwordNotInRepr(self):
        """
        The database URI (which may hold a password) is not in the
        configuration's repr.
        """
        self.assertNotIn("s3cret", repr(configuration.parse(BASE + self.DB)))

    def test_badTable(self):
        """
        routing.table must be a plain SQL name.
        """
        e = self.assertRaises(
            configuration.ConfigError, configuration.parse, BASE + self.DB + '  table: "x; drop"\n'
        )
        self.assertIn("routing.table", str(e))

    def test_redact(self):
        """
        L{redact} shows what libpq parses from a URI without its password,
        in the authority or a parameter, and nothing of a URI whose
        password libpq cannot tell apart.
        """
        self.assertEqual(redact("postgresql://u:pw@h/db"), "dbname=db host=h user=u")
        self.assertEqual(
            redact("postgresql:///db?password=pw&host=/s&sslpassword=k"), "dbname=db host=/s"
        )
        self.assertEqual(redact("postgresql://u:pa#ss@h"), "host=h user=u")
        for uri in ("postgresql://u:pa/ss@h/d", "postgresql://u:S3cret%zz@h", "postgresql://u:pw@h/db?x=1"):
            self.assertEqual(redact(uri), "(routing.database not shown)")


class YAMLEditTests(unittest.TestCase):
    """
    C{users set|delete} on the YAML source edit only their entry.
    """

    TEXT = BASE + "users:\n  # comment\n  alice@example.com: old   # keep\n  carol:\n    backend: old\n    address: c@d\n# end\n"

    def test_setKeepsComments(self):
        """
        Changing an entry keeps the comments and other entries.
        """
        text = setUser(self.TEXT, "Alice@Example.com", "new")
        self.assertIn("  alice@example.com: new   # keep\n", text)
        self.assertIn("# comment", text)
        self.assertEqual(configuration.parse(text).users["carol"], ("old", "c@d"))

    def test_setAdds(self):
        """
        A new key is added to the mapping (quoted when it must be).
        """
        text = setUser(self.TEXT, "@example.org", "new")
        self.assertEqual(configuration.parse(text).users["@example.org"], "new")
        self.assertTrue(text.endswith("# end\n"))

    def test_deleteBlockValue(self):
        """
        Deleting an entry whose value spans lines removes all of it.
        """
        text, found = deleteUser(self.TEXT, "carol")
        self.assertTrue(found)
        self.assertEqual(dict(configuration.parse(text).users), {"alice@example.com": "old"})


# --- against a real PostgreSQL server -------------------------------------------

from tests.lmtpclient import BlockingLMTPClient, exchange  # noqa: E402
from tests.peers import Proxy, SmtpSink, freePort, tempDir, waitFor  # noqa: E402
from tests.pgserver import PostgresServer  # noqa: E402
from tests.support import waitUntil  # noqa: E402


def lmtpProxy(*args):
    """
    Run C{lmtp-proxy ARGS} in this process: C{(status, stdout, stderr)}.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(args))
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def lmtpProxyProcess(*args, **kwargs):
    """
    Start C{lmtp-proxy ARGS} as a process of its own.
    """
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from lmtp_proxy.cli import main; sys.exit(main())"]
        + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])),
        **kwargs,
    )


class DatabaseMixin:
    """
    A PostgreSQL server and configuration files naming it.
    """

    lease = 2
    dataTimeout = 1

    def setUpDatabase(self, backends=None):
        self.pg = PostgresServer(self)
        self.dir = tempDir(self, "lmtppgcfg-")
        self.backends = backends or {
            "old": {"host": "127.0.0.1", "port": 2401},
            "new": {"host": "127.0.0.1", "port": 2402},
        }
        self.configPath = self.writeConfig("admin")
        status, out, err = lmtpProxy("db", "init", "-c", self.configPath)
        self.assertEqual(status, 0, err)

    def configText(self, name, uri=None, extra=""):
        lines = [
            "config:",
            "  socket: [127.0.0.1, %d]" % (freePort(),),
            "  node_name: %s" % (name,),
            "  lease: %s" % (self.lease,),
            "  data_timeout: %s" % (self.dataTimeout,),
            "  shutdown_grace: 1",
            "  control_socket: %s" % (os.path.join(self.dir, name + ".ctl"),),
        ]
        lines += ["  " + line for line in extra.splitlines()]
        lines += ["routing:", '  database: "%s"' % (uri or self.pg.uri,), "backends:"]
        for backend, where in self.backends.items():
            lines.append("  %s: {%s}" % (backend, ", ".join("%s: %s" % kv for kv in where.items())))
        return "\n".join(lines) + "\n"

    def writeConfig(self, name, uri=None, extra=""):
        path = os.path.join(self.dir, name + ".yaml")
        with open(path, "w") as f:
            f.write(self.configText(name, uri, extra))
        return path

    def route(self, key):
        rows = self.pg.execute("SELECT backend FROM lmtp_routes WHERE key = %s", (key,))
        return rows[0][0] if rows else None


class DatabaseCommandTests(DatabaseMixin, unittest.TestCase):
    """
    C{lmtp-proxy db} and C{lmtp-proxy users} on the database.
    """

    def setUp(self):
        self.setUpDatabase()

    def test_initIdempotent(self):
        """
        C{db init} may run again on an initialized database.
        """
        self.pg.execute("INSERT INTO lmtp_routes VALUES ('a@x', 'old', NULL)")
        status, out, err = lmtpProxy("db", "init", "-c", self.configPath)
        self.assertEqual((status, self.route("a@x")), (0, "old"), err)

    def test_importExportRoundTrip(self):
        """
        C{db import} loads a users file in one generation; C{db export}
        prints the same mapping back.
        """
        users = os.path.join(self.dir, "users.yaml")
        with open(users, "w") as f:
            f.write('users:\n  Alice@Example.com: old\n  "@example.org": new\n'
                    "  bob: {backend: new, address: robert@example.net}\n  carol: reject\n")
        before = self.pg.execute("SELECT generation FROM lmtp_routes_generation")[0][0]
        status, out, err = lmtpProxy("db", "import", "-c", self.configPath, users)
        self.assertEqual(status, 0, err)
        after = self.pg.execute("SELECT generation FROM lmtp_routes_generation")[0][0]
        self.assertEqual(after, before + 1)
        status, out, err = lmtpProxy("db", "export", "-c", self.configPath)
        import yaml

        self.assertEqual(yaml.safe_load(out), {"users": {
            "alice@example.com": "old", "@example.org": "new",
            "bob": {"backend": "new", "address": "robert@example.net"}, "carol": "reject"}})

    def test_importAllOrNothing(self):
        """
        A users file naming an unknown backend is refused (status 1) and
        the table is left as it was.
        """
        self.pg.execute("INSERT INTO lmtp_routes VALUES ('keep@x', 'old', NULL)")
        users = os.path.join(self.dir, "users.yaml")
        with open(users, "w") as f:
            f.write("users:\n  a@x: old\n  b@x: nowhere\n")
        status, out, err = lmtpProxy("db", "import", "-c", self.configPath, users)
        self.assertEqual(status, 1)
        self.assertIn("nowhere", err)
        self.assertEqual(self.pg.execute("SELECT key FROM lmtp_routes"), [("keep@x",)])

    def test_usersSetListDelete(self):
        """
        C{users set}, C{list} (with a pattern) and C{delete} change the
        table, each in one generation.
        """
        self.assertEqual(lmtpProxy("users", "set", "-c", self.configPath, "Alice@X", "old")[0], 0)
        self.assertEqual(lmtpProxy("users", "set", "-c", self.configPath, "bob@y", "new")[0], 0)
        self.assertEqual(self.route("alice@x"), "old")
        status, out, err = lmtpProxy("users", "list", "-c", self.configPath, "*@x")
        self.assertEqual((status, out), (0, "alice@x\told\n"))
        self.assertEqual(lmtpProxy("users", "delete", "-c", self.configPath, "alice@x")[0], 0)
        self.assertIsNone(self.route("alice@x"))

    def test_usersRefusals(self):
        """
        An unknown backend or a missing key is refused with status 1; a
        usage error is status 2.
        """
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath, "a@x", "nowhere")
        self.assertEqual(status, 1)
        self.assertIn("'nowhere' is not defined", err)
        self.assertEqual(lmtpProxy("users", "delete", "-c", self.configPath, "zz@x")[0], 1)
        self.assertEqual(lmtpProxy("users", "set", "-c", self.configPath, "a@x")[0], 2)
        self.assertEqual(lmtpProxy("move", "-c", self.configPath, "a@x")[0], 2)

    def test_databaseErrorKeepsPasswordSecret(self):
        """
        A database that cannot be reached is status 1, and the message
        names the database without its password.
        """
        path = self.writeConfig("secret", uri="postgresql://lmtp:Sup3rSecret@/mail?host=%s" % (
            os.path.join(self.dir, "nowhere"),))
        status, out, err = lmtpProxy("users", "list", "-c", path)
        self.assertEqual(status, 1)
        self.assertIn("user=lmtp", err)
        self.assertNotIn("Sup3rSecret", out + err)

    def test_barrierWithoutNodes(self):
        """
        With no node registered the barrier holds at once.
        """
        status, out, err = lmtpProxy("barrier", "-c", self.configPath, "--timeout", "1")
        self.assertEqual(status, 0, err)


class UnixRelay:
    """
    A relay in front of the database's unix socket, for one node: L{cut}
    makes it a black hole (a network partition), L{heal} drops what was
    cut and relays again.
    """

    def __init__(self, testcase, target):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = target
        self.dir = tempDir(testcase, "lmtppgrelay-")
        self.path = os.path.join(self.dir, ".s.PGSQL.5432")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o777)
        self.listener.listen(50)
        self.cutOff = False
        self.connections = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()
        testcase.addCleanup(self.stop)

    def _accept(self):
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(client)
            if self.cutOff:
                continue
            server = self._socket.socket(self._socket.AF_UNIX, self._socket.SOCK_STREAM)
            try:
                server.connect(self.target)
            except OSError:
                client.close()
                continue
            self.connections.append(server)
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if self.cutOff:
                    continue
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.cutOff = True

    def heal(self):
        connections, self.connections = self.connections, []
        for s in connections:
            try:
                s.shutdown(self._socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.cutOff = False

    def stop(self):
        self._stopped = True
        self.listener.close()
        self.heal()


def rcptCode(target, address, keep=False):
    """
    The reply to one RCPT at the proxy at C{target}; with C{keep}, the
    client too, its transaction left open.
    """
    client = BlockingLMTPClient(target, timeout=10)
    client.lhlo()
    client.command("MAIL FROM:<s@example.test>")
    reply = client.command("RCPT TO:<%s>" % (address,))
    if keep:
        return reply, client
    client.quit()
    return reply


class NodeTests(DatabaseMixin, unittest.TestCase):
    """
    Proxies following the database: changes, the cluster barrier, fencing.
    """

    def setUp(self):
        self.old = SmtpSink(self, name="old")
        self.new = SmtpSink(self, name="new")
        self.setUpDatabase({"old": self.old.backendConfig(), "new": self.new.backendConfig()})
        self.assertEqual(lmtpProxy("users", "set", "-c", self.configPath, "alice@example.com", "old")[0], 0)

    def node(self, name, uri=None, extra=""):
        proxy = Proxy(self, self.configText(name, uri, extra))
        waitFor(lambda: rcptCode(proxy.target, "alice@example.com").code == 250, 15,
                what="node %s to load the table and deliver" % (name,))
        return proxy

    def test_changeInForceEverywhereWithinOneSecond(self):
        """
        C{users set --wait} returns once both nodes have the change in
        force, within a second, and both route by it.
        """
        a, b = self.node("mx1"), self.node("mx2")
        started = time.monotonic()
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath,
                                     "alice@example.com", "reject", "--wait", "--timeout", "10")
        elapsed = time.monotonic() - started
        self.assertEqual(status, 0, err)
        self.assertLess(elapsed, 1.0)
        for proxy in (a, b):
            self.assertEqual(rcptCode(proxy.target, "alice@example.com").code, 451)

    def test_barrierWaitsForOlderTransaction(self):
        """
        The barrier waits for a transaction begun under the older
        generation, naming its node, and holds once it ended.
        """
        a = self.node("mx1")
        reply, client = rcptCode(a.target, "alice@example.com", keep=True)
        self.assertEqual(reply.code, 250)
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath,
                                     "alice@example.com", "new", "--wait", "--timeout", "1")
        self.assertEqual(status, 1)
        self.assertIn("mx1 has transactions of generation", err)
        client.command("RSET")
        client.quit()
        status, out, err = lmtpProxy("barrier", "-c", self.configPath, "--timeout", "5")
        self.assertEqual(status, 0, err)

    def test_nodeCutOffIsFencedAndCountedOut(self):
        """
        A node cut off from the database answers 451 4.3.0 once its lease
        expired, drops its transaction that had not reached the final dot
        (nothing reaches the old store), is counted out by the barrier
        after its lease and data_timeout, and routes by the new table once
        it reaches the database again.
        """
        relay = UnixRelay(self, os.path.join(self.pg.dir, ".s.PGSQL.5432"))
        a = self.node("mx1")
        b = self.node("mx2", uri="postgresql://lmtp@/mail?host=%s" % (relay.dir,))
        reply, client = rcptCode(b.target, "alice@example.com", keep=True)
        self.assertEqual(reply.code, 250)
        relay.cut()
        cutAt = time.monotonic()
        waitFor(lambda: rcptCode(b.target, "alice@example.com").code == 451, self.lease + 3,
                what="the cut-off node to refuse with 451")
        self.assertGreaterEqual(time.monotonic() - cutAt, self.lease - 0.5)
        reply = rcptCode(b.target, "alice@example.com")
        self.assertEqual(reply.line[:9], "451 4.3.0")
        # Its open transaction was dropped: the message is refused with
        # 451 after the dot and never reaches the old store.
        self.assertEqual(client.command("DATA").code, 354)
        client.send(b"Subject: stale\r\n\r\nstale route\r\n.\r\n")
        self.assertEqual(client.readReply().code, 451)
        client.quit()
        # The node that still reaches the database takes the change; the
        # barrier proceeds without the cut-off one once it counted it out.
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath,
                                     "alice@example.com", "new", "--wait", "--timeout", "15")
        self.assertEqual(status, 0, err)
        self.assertIn("counted out", out)
        self.assertIn("mx2", out)
        self.assertNotIn("mx1", out)
        # The node that follows the database delivers to the new store.
        client = BlockingLMTPClient(a.target)
        client.lhlo()
        result = client.transaction("s@example.test", ["alice@example.com"], b"Subject: a\r\n\r\na\r\n")
        client.quit()
        self.assertEqual(result["final"][0][1].code, 250)
        self.new.waitDumps(1)
        self.assertGreaterEqual(time.monotonic() - cutAt, barrier.countOutAfter(self.lease, self.dataTimeout))
        self.assertEqual(self.old.messagesReceived(), 0)
        relay.heal()
        waitFor(lambda: rcptCode(b.target, "alice@example.com").code == 250, 15,
                what="the node to deliver again")
        client = BlockingLMTPClient(b.target)
        client.lhlo()
        result = client.transaction("s@example.test", ["alice@example.com"], b"Subject: x\r\n\r\nnew\r\n")
        client.quit()
        self.assertEqual(result["final"][0][1].code, 250)
        self.new.waitDumps(2)
        self.assertEqual(self.old.messagesReceived(), 0)
        # The loss and the recovery are logged once each.
        log = b.log()
        self.assertEqual(
            (log.count("routing database lost"), log.count("routing database reached again")), (1, 1))

    def test_unreachableDatabaseDefersAndKeepsPasswordSecret(self):
        """
        A node that never reached its database answers every RCPT with
        451 4.3.0 (never 5xx), and its log names the database without the
        password.
        """
        node = Proxy(self, self.configText("mx9", uri="postgresql://lmtp:Sup3rSecret@/mail?host=%s"
                                           % (os.path.join(self.dir, "nowhere"),)))
        waitFor(lambda: "routing database lost" in node.log(), 15, what="the loss to be logged")
        self.assertEqual(rcptCode(node.target, "alice@example.com").line[:9], "451 4.3.0")
        log = node.log()
        self.assertIn("user=lmtp", log)
        self.assertNotIn("Sup3rSecret", log + node.output())

    def test_databaseStoppedDuringMove(self):
        """
        With the database stopped after the move set C{reject}, the barrier
        times out: C{move} exits 1 saying how to finish, the user stays on
        C{reject}, and the message in flight is not lost (never 5xx).
        """
        a = self.node("mx1")
        reply, client = rcptCode(a.target, "alice@example.com", keep=True)
        self.assertEqual(reply.code, 250)
        move = lmtpProxyProcess("move", "-c", self.configPath, "alice@example.com",
                                "--to", "new", "--timeout", "3")
        waitFor(lambda: self.route("alice@example.com") == REJECT, 10, what="the move to set reject")
        self.pg.stop()
        out, err = move.communicate(timeout=30)
        self.assertEqual(move.returncode, 1, out + err)
        self.assertIn("stays on reject", err)
        self.assertNotIn("Traceback", err)
        self.assertIn("users set -c %s alice@example.com new --wait" % (self.configPath,), err)
        self.assertIn("users set -c %s alice@example.com old --wait" % (self.configPath,), err)
        self.assertEqual(client.command("DATA").code, 354)
        client.send(b"Subject: held\r\n\r\nheld\r\n.\r\n")
        final = client.readReply()
        client.quit()
        self.assertIn(final.code // 100, (2, 4))
        self.pg.start()
        self.assertEqual(self.route("alice@example.com"), REJECT)
        self.assertEqual(self.new.messagesReceived(), 0)

    def test_nodeRestartedMidMove(self):
        """
        A node restarted while the sync command runs loads the table again
        and the move completes on every node.
        """
        a, b = self.node("mx1"), self.node("mx2")
        marker = os.path.join(self.dir, "syncing")
        move = lmtpProxyProcess(
            "move", "-c", self.configPath, "alice@example.com", "--to", "new", "--timeout", "20",
            "--sync", "touch %s; sleep 3" % (marker,))
        waitFor(lambda: os.path.exists(marker), 20, what="the sync command to run")
        b.stop()
        self.assertEqual(rcptCode(a.target, "alice@example.com").code, 451)
        b2 = Proxy(self, b.configText)
        out, err = move.communicate(timeout=60)
        self.assertEqual(move.returncode, 0, out + err)
        self.assertIn("moved alice@example.com to new", out)
        for proxy in (a, b2):
            client = BlockingLMTPClient(proxy.target)
            client.lhlo()
            result = client.transaction("s@example.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
            client.quit()
            self.assertEqual(result["final"][0][1].code, 250)
        self.new.waitDumps(2)
        self.assertEqual(self.old.messagesReceived(), 0)

    def test_workersShareGenerationAndLease(self):
        """
        With C{workers: 2} every process routes by the new generation once
        the barrier holds, and every process fences when the lease expires.
        """
        relay = UnixRelay(self, os.path.join(self.pg.dir, ".s.PGSQL.5432"))
        a = self.node("mx1", uri="postgresql://lmtp@/mail?host=%s" % (relay.dir,), extra="workers: 2")
        waitFor(lambda: all(rcptCode(a.target, "alice@example.com").code == 250 for _ in range(20)),
                15, what="every worker to deliver")
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath,
                                     "alice@example.com", "reject", "--wait", "--timeout", "10")
        self.assertEqual(status, 0, err)
        codes = {rcptCode(a.target, "alice@example.com").line[:9] for _ in range(30)}
        self.assertEqual(codes, {"451 4.2.1"})
        relay.cut()
        time.sleep(self.lease + 0.5)
        codes = {rcptCode(a.target, "alice@example.com").line[:9] for _ in range(30)}
        self.assertEqual(codes, {"451 4.3.0"})


class PasswordFileTests(DatabaseMixin, unittest.TestCase):
    """
    routing.password_file.
    """

    def test_passwordFromFile(self):
        """
        With password authentication, the password comes from
        routing.password_file; without it the connection is refused.
        """
        self.pg = PostgresServer(self, password="Fil3Secret")
        self.dir = tempDir(self, "lmtppgcfg-")
        self.backends = {"old": {"host": "127.0.0.1", "port": 2401}}
        secret = os.path.join(self.dir, "pw")
        with open(secret, "w") as f:
            f.write("Fil3Secret\n")
        path = self.writeConfig("mx1")
        withFile = path.replace(".yaml", "-pw.yaml")
        with open(path) as f:
            text = f.read()
        with open(withFile, "w") as f:
            f.write(text.replace("routing:\n", "routing:\n  password_file: %s\n" % (secret,)))
        status, out, err = lmtpProxy("db", "init", "-c", withFile)
        self.assertEqual(status, 0, err)
        status, out, err = lmtpProxy("users", "list", "-c", path)
        self.assertEqual(status, 1)
        self.assertNotIn("Fil3Secret", out + err)


class YAMLSourceCommandTests(unittest.TestCase):
    """
    C{users}, C{barrier} and C{move} on the YAML source, with a running
    proxy reloaded through its control socket.
    """

    def setUp(self):
        self.old = SmtpSink(self, name="old")
        self.new = SmtpSink(self, name="new")
        self.dir = tempDir(self, "lmtpyamlcmd-")
        text = (
            "# the proxy's configuration\n"
            "config:\n"
            "  socket: [127.0.0.1, %d]\n"
            "  control_socket: %s\n"
            "  shutdown_grace: 1\n"
            "backends:\n"
            "  old: {host: 127.0.0.1, port: %d}\n"
            "  new: {host: 127.0.0.1, port: %d}\n"
            "users:\n"
            "  # moving soon\n"
            "  alice@example.com: old\n"
            "  bob@example.com: new\n"
        ) % (freePort(), os.path.join(self.dir, "ctl"), self.old.port, self.new.port)
        self.proxy = Proxy(self, text)
        self.path = self.proxy.configPath

    def test_setWaitReloads(self):
        """
        C{users set --wait} rewrites the file (comments kept) and returns
        once the running proxy has it in force.
        """
        status, out, err = lmtpProxy("users", "set", "-c", self.path, "alice@example.com", "reject", "--wait")
        self.assertEqual(status, 0, err)
        with open(self.path) as f:
            text = f.read()
        self.assertIn("  # moving soon\n  alice@example.com: reject\n", text)
        self.assertEqual(rcptCode(self.proxy.target, "alice@example.com").line[:9], "451 4.2.1")
        self.assertEqual(lmtpProxy("users", "list", "-c", self.path, "alice*")[1], "alice@example.com\treject\n")

    def test_unknownBackendLeavesFile(self):
        """
        A refused change leaves the file as it was.
        """
        with open(self.path) as f:
            before = f.read()
        self.assertEqual(lmtpProxy("users", "set", "-c", self.path, "alice@example.com", "nowhere")[0], 1)
        with open(self.path) as f:
            self.assertEqual(f.read(), before)

    def test_deleteAndBarrier(self):
        """
        C{users delete --wait} removes the row; C{barrier} holds.
        """
        self.assertEqual(lmtpProxy("users", "delete", "-c", self.path, "bob@example.com", "--wait")[0], 0)
        self.assertEqual(rcptCode(self.proxy.target, "bob@example.com").code, 550)
        self.assertEqual(lmtpProxy("barrier", "-c", self.path, "--timeout", "5")[0], 0)

    def test_move(self):
        """
        C{move} runs the sync command between the two barriers, and the
        user's mail then goes to the new backend.
        """
        marker = os.path.join(self.dir, "synced")
        status, out, err = lmtpProxy(
            "move", "-c", self.path, "alice@example.com", "--to", "new",
            "--sync", 'test "$LMTP_PROXY_FROM:$LMTP_PROXY_TO" = old:new && touch %s' % (marker,))
        self.assertEqual(status, 0, out + err)
        self.assertTrue(os.path.exists(marker))
        client = BlockingLMTPClient(self.proxy.target)
        client.lhlo()
        result = client.transaction("s@example.test", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
        client.quit()
        self.assertEqual(result["final"][0][1].code, 250)
        self.new.waitDumps(1)
        self.assertEqual(self.old.messagesReceived(), 0)

    def test_moveInterruptedLeavesReject(self):
        """
        A move stopped by SIGTERM during its sync leaves the user on
        C{reject}, exits 1 and says how to finish.
        """
        import signal

        marker = os.path.join(self.dir, "syncing")
        move = lmtpProxyProcess("move", "-c", self.path, "alice@example.com", "--to", "new",
                                "--sync", "touch %s; sleep 30" % (marker,))
        waitFor(lambda: os.path.exists(marker), 20, what="the sync command to run")
        move.send_signal(signal.SIGTERM)
        out, err = move.communicate(timeout=30)
        self.assertEqual(move.returncode, 1, out + err)
        self.assertIn("interrupted (SIGTERM) during: sync", err)
        self.assertNotIn("Traceback", err)
        self.assertIn("users set -c %s alice@example.com new --wait" % (self.path,), err)
        self.assertEqual(rcptCode(self.proxy.target, "alice@example.com").line[:9], "451 4.2.1")

    def test_moveSyncFailsLeavesReject(self):
        """
        A failing sync command leaves the user on C{reject} and says how to
        finish or roll back.
        """
        status, out, err = lmtpProxy("move", "-c", self.path, "alice@example.com", "--to", "new",
                                     "--sync", "exit 3")
        self.assertEqual(status, 1)
        self.assertIn("status 3", err)
        self.assertIn("users set -c %s alice@example.com old --wait" % (self.path,), err)
        self.assertEqual(rcptCode(self.proxy.target, "alice@example.com").line[:9], "451 4.2.1")


class WithoutClientTests(unittest.TestCase):
    """
    The YAML source needs no PostgreSQL client.
    """

    def test_yamlWithoutPsycopg(self):
        """
        The service, the workers and the routing commands import, and
        C{users list} works on a YAML file, with C{psycopg} unimportable.
        """
        path = os.path.join(tempDir(self, "lmtpnopg-"), "p.yaml")
        with open(path, "w") as f:
            f.write(BASE + "users:\n  a@x: old\n")
        code = (
            "import sys; sys.modules['psycopg'] = None\n"
            "import lmtp_proxy.service, lmtp_proxy.workers, lmtp_proxy.routecli\n"
            "from lmtp_proxy import cli\n"
            "status = cli.main(['users', 'list', '-c', %r])\n"
            "sys.exit(status)\n" % (path,)
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
        self.assertEqual((done.returncode, done.stdout), (0, "a@x\told\n"), done.stderr)


class SharedTableTests(unittest.TestCase):
    """
    The YAML table shares the configuration's users mapping rather than
    copying it.
    """

    def test_fromConfigShares(self):
        """
        L{RoutingTable.fromConfig} keeps the configuration's read-only
        mapping instead of a copy, and routes by it.
        """
        config = parse("users:\n  Alice@Example.com: old\n")
        table = RoutingTable.fromConfig(config)
        self.assertIs(table.users, config.users)
        self.assertEqual(table.route("ALICE@example.com").backend, "old")

    def test_unfoldedKeysCopied(self):
        """
        A mapping with keys not folded yet is copied and folded.
        """
        from types import MappingProxyType

        config = parse()
        import dataclasses

        config = dataclasses.replace(config, users=MappingProxyType({"Bob@X": "new"}))
        table = RoutingTable.fromConfig(config)
        self.assertEqual(table.route("bob@x").backend, "new")


class LoadAtStartTests(unittest.TestCase):
    """
    A large configuration is parsed in a child process at start.
    """

    def write(self, text):
        path = os.path.join(tempDir(self, "lmtpload-"), "p.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_largeFileLoadedInChild(self):
        """
        Above the threshold the configuration comes back from the child
        process, the same as loaded here.
        """
        from lmtp_proxy import reloader

        self.patch(reloader, "CHILD_LOAD_BYTES", 10)
        path = self.write(BASE + "users:\n  a@x: old\n  b@x: {backend: new, address: c@y}\n")
        calls = []
        real = subprocess.run
        self.patch(subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
        loaded = reloader.loadAtStart(path)
        self.assertEqual(len(calls), 1)
        self.assertEqual(loaded, configuration.load(path))

    def test_largeFileErrorIsOneLine(self):
        """
        A mistake found by the child is the same one-line error.
        """
        from lmtp_proxy import reloader

        self.patch(reloader, "CHILD_LOAD_BYTES", 10)
        path = self.write(BASE + "users:\n  a@x: nowhere\n")
        e = self.assertRaises(configuration.ConfigError, reloader.loadAtStart, path)
        self.assertEqual(str(e), str(self.assertRaises(configuration.ConfigError, configuration.load, path)))


class LeaseTests(unittest.TestCase):
    """
    L{DatabaseRouting}'s lease, on a fake clock, without a database.
    """

    def setUp(self):
        from twisted.internet.task import Clock

        from lmtp_proxy.pgsource import DatabaseRouting

        self.now = [100.0]
        self.reactor = Clock()
        self.state = ProxyState(parse('routing:\n  database: "postgresql://u@/mail"\n'))
        self.routing = DatabaseRouting(self.reactor, self.state, clock=lambda: self.now[0])
        self.routing._loaded(7, {"a@x": "old"})

    def test_fencedUntilRenewed(self):
        """
        The node starts fenced and delivers once a heartbeat is renewed.
        """
        self.state.fence("not loaded")
        self.routing._renewedAt(self.now[0], 10.0)
        self.assertIsNone(self.state.fenced)

    def test_leaseExpiryFences(self):
        """
        No renewal for C{lease} seconds fences the node.
        """
        self.routing._renewedAt(self.now[0], 10.0)
        self.now[0] += 9.9
        self.routing._checkLease()
        self.assertIsNone(self.state.fenced)
        self.now[0] += 0.2
        self.routing._checkLease()
        self.assertIsNotNone(self.state.fenced)

    def test_leaseOfTheHeartbeatCounts(self):
        """
        The lease that runs is the one recorded with the last acknowledged
        heartbeat (the one the barrier counts this node out by), not a
        longer one a reload put in the configuration since.
        """
        self.routing._renewedAt(self.now[0], 2.0)
        self.now[0] += 2.5
        self.routing._checkLease()
        self.assertIsNotNone(self.state.fenced)

    def test_lateRenewalDoesNotUnfence(self):
        """
        A heartbeat acknowledged after the lease ran out (sent too long
        ago) does not unfence the node.
        """
        self.state.fence("lease expired")
        self.routing._renewedAt(self.now[0] - 11, 10.0)
        self.assertIsNotNone(self.state.fenced)


class FencedDeliveryTests(unittest.TestCase):
    """
    A fenced proxy (L{ProxyState.fence}) over loopback, with an in-process
    backend: nothing it routed can reach a backend any more.
    """

    def setUp(self):
        from tests.support import FakeBackend
        from tests.support import Proxy as LoopbackProxy

        self.backend = FakeBackend(self)
        self.proxy = LoopbackProxy(self, {}, {"a": self.backend.entry}, {"@a.test": "a"})

    @defer.inlineCallbacks
    def test_rcptRefused(self):
        """
        Every RCPT gets 451 4.3.0 while fenced, and none reaches the
        backend.
        """
        self.proxy.state.fence("lease expired")
        client = yield self.proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<u@a.test>\r\n", 3)
        self.assertEqual(replies[2][:9], "451 4.3.0")
        self.assertNotIn("RCPT", self.backend.verbs())

    @defer.inlineCallbacks
    def test_transactionBeforeDotDropped(self):
        """
        A transaction whose recipient the backend accepted, fenced before
        the final dot, is dropped at the backend and its recipient gets 451
        after the dot.
        """
        client = yield self.proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<u@a.test>\r\nDATA\r\nSubject: x\r\n\r\n", 4)
        self.assertEqual([r[:3] for r in replies[1:]], ["250", "250", "354"])
        self.proxy.state.fence("lease expired")
        replies = yield exchange(client, b"body\r\n.\r\n", 1)
        self.assertEqual(replies[0][:3], "451")
        yield waitUntil(lambda: not self.proxy.state.transactions)
        self.assertEqual(self.backend.messages, [])


    @defer.inlineCallbacks
    def test_leaseCheckedAtRcpt(self):
        """
        A lease that ran out fences the node at the next RCPT itself, not
        only when the periodic check comes round: the RCPT gets 451 4.3.0.
        """
        now = [100.0]
        self.proxy.state.leaseClock = lambda: now[0]
        self.proxy.state.leaseDeadline = 105.0
        client = yield self.proxy.connect(self)
        replies = yield exchange(client, b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<u@a.test>\r\n", 3)
        self.assertEqual(replies[2][:3], "250")
        now[0] = 106.0
        replies = yield exchange(client, b"RCPT TO:<v@a.test>\r\n", 1)
        self.assertEqual(replies[0][:9], "451 4.3.0")
        self.assertIsNotNone(self.proxy.state.fenced)

    @defer.inlineCallbacks
    def test_dotNotYetAtBackendDropped(self):
        """
        Fenced after the client's final dot but before a slow backend
        answered DATA (so before the backend had its own dot): the backend
        transaction is dropped and the recipient gets 451, since the
        backend could otherwise store the message a command timeout later.
        """
        self.backend.actions["DATA"] = "hang"
        client = yield self.proxy.connect(self)
        client.send(
            b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<u@a.test>\r\nDATA\r\nbody\r\n.\r\n"
        )
        yield waitUntil(lambda: b"DATA" in self.backend.verbs())
        self.proxy.state.fence("lease expired")
        replies = yield client.waitReplies(6)
        self.assertEqual(replies[-1][:9], "451 4.3.0")
        yield waitUntil(lambda: not self.backend.open)
        self.assertEqual(self.backend.messages, [])


class RouteCommandTests(DatabaseMixin, unittest.TestCase):
    """
    C{lmtp-proxy route} with the database source.
    """

    def test_routeFromDatabase(self):
        """
        C{route} looks recipients up in the database's table.
        """
        self.setUpDatabase()
        self.assertEqual(lmtpProxy("users", "set", "-c", self.configPath, "alice@example.com", "new")[0], 0)
        status, out, err = lmtpProxy("route", "-c", self.configPath, "Alice+x@example.com", "bob@example.com")
        self.assertEqual(status, 1, err)
        self.assertIn("Alice+x@example.com\tbackend new (matched users key 'alice@example.com')", out)
        self.assertIn("bob@example.com\tno route", out)


class CheckCommandTests(unittest.TestCase):
    """
    C{lmtp-proxy check} with the database source.
    """

    def test_checkNamesDatabaseWithoutPassword(self):
        """
        C{check} says where the users are, without the password.
        """
        path = os.path.join(tempDir(self, "lmtpcheck-"), "p.yaml")
        with open(path, "w") as f:
            f.write(BASE + 'routing:\n  database: "postgresql://lmtp:Sup3rSecret@/mail?host=/run/postgresql"\n')
        status, out, err = lmtpProxy("check", "-c", path)
        self.assertEqual(status, 0, err)
        self.assertIn("users: in dbname=mail host=/run/postgresql user=lmtp, table lmtp_routes", out)
        self.assertNotIn("Sup3rSecret", out + err)


class AddressOptionTests(DatabaseMixin, unittest.TestCase):
    """
    C{users set --address} (a route rewritten for its backend).
    """

    def test_databaseAndYAML(self):
        """
        C{--address} fills the database's address column, and writes a
        C{{backend, address}} value into the YAML file.
        """
        self.setUpDatabase()
        status, out, err = lmtpProxy("users", "set", "-c", self.configPath, "bob@x", "new",
                                     "--address", "robert@y")
        self.assertEqual(status, 0, err)
        self.assertEqual(self.pg.execute("SELECT backend, address FROM lmtp_routes"), [("new", "robert@y")])
        path = os.path.join(self.dir, "yaml.yaml")
        with open(path, "w") as f:
            f.write(BASE + "users:\n  bob@x: old\n")
        self.assertEqual(lmtpProxy("users", "set", "-c", path, "bob@x", "new", "--address", "robert@y")[0], 0)
        self.assertEqual(configuration.load(path).users["bob@x"], ("new", "robert@y"))
