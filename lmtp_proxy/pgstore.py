"""
The PostgreSQL routing store: its schema and every statement run against
it, as plain blocking calls (no Twisted).

The command line calls these directly; the proxy calls them from one
thread of its own (L{lmtp_proxy.pgsource}), so the reactor never waits on
the database. Only this module imports C{psycopg}, and only once a
configuration names C{routing.database}: everything else works without the
C{postgresql} extra installed.

The schema, for C{routing.table: T}::

    T              (key text primary key, backend text not null,
                    address text null)       -- the routes
    T_generation   one row: the generation counter
    T_changes      (generation, key): which keys each generation changed;
                   a NULL key means "everything" (an import)
    T_nodes        one row per proxy: what it has in force, its transactions
                   in flight, its heartbeat (the cluster barrier's input)

A row trigger on C{T} bumps the generation once per transaction, records
the changed keys and notifies the channel C{T}; the generation row stays
locked until the transaction ends, so writers commit in generation order
and a node that has read generation G has seen every change up to G.
"""

import re

from lmtp_proxy.routing import REJECT

__all__ = [
    "StoreError",
    "connect",
    "redact",
]

# Seconds a command-line or follower statement may take before it fails
# (a database that hangs must become an error, not a hang).
STATEMENT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5
# Changes older than this are pruned by writers: a node follows changes
# within a second while connected and reloads everything on reconnection.
CHANGES_KEPT = "1 hour"


class StoreError(Exception):
    """
    The database refused or failed; C{str()} is one line without secrets.
    """


def redact(uri):
    """
    What of C{uri} may be shown in a log line or an error message: the
    fields libpq parses from it, without C{password} or C{sslpassword}.

    Only libpq's own parser can tell where a password ends (a "#", "/" or
    "?" in it moves the boundaries), so a URI it cannot parse, or one that
    seems to hold a password libpq did not find as one, is not shown.
    """
    hidden = "(routing.database not shown)"
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(uri)
    except Exception:
        return hidden
    scheme, separator, rest = uri.partition("://")
    userinfo = rest.rpartition("@")[0] if separator else ""
    if ":" in userinfo and "password" not in params:
        return hidden
    return " ".join(
        "%s=%s" % (key, value)
        for key, value in sorted(params.items())
        if key not in ("password", "sslpassword")
    )


def _oneLine(error):
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "routing.database needs the PostgreSQL client: "
            "pip install 'lmtp-proxy[postgresql]'"
        ) from None
    return psycopg


def _password(config):
    path = config.routing_password_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise StoreError(
            "cannot read routing.password_file %s: %s" % (path, e.strerror or e)
        ) from None


def connect(config, autocommit=False, application="lmtp-proxy"):
    """
    A blocking C{psycopg} connection to C{config.routing_database}.

    @raise StoreError: it cannot be made (the message names the redacted
        URI, never the password).
    """
    psycopg = _psycopg()
    kwargs = dict(
        autocommit=autocommit,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=application,
        options="-c statement_timeout=%d" % (STATEMENT_TIMEOUT * 1000,),
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
    )
    password = _password(config)
    if password is not None:
        kwargs["password"] = password
    try:
        return psycopg.connect(config.routing_database, **kwargs)
    except psycopg.ProgrammingError:
        # libpq's message about a URI it cannot parse quotes the URI.
        raise StoreError("routing.database is not a valid libpq URI") from None
    except psycopg.Error as e:
        raise StoreError(
            "cannot connect to %s: %s" % (redact(config.routing_database), _oneLine(e))
        ) from None


def failed(config, error):
    """
    A L{StoreError} for a C{psycopg} error on C{config}'s database.
    """
    return StoreError("database %s: %s" % (redact(config.routing_database), _oneLine(error)))


class Names:
    """
    The SQL names of one routing table's schema.
    """

    def __init__(self, table):
        # config.py only admits [a-z_][a-z0-9_]*: safe to put in SQL text.
        if not re.match(r"\A[a-z_][a-z0-9_]{0,39}\Z", table):
            raise ValueError("bad table name %r" % (table,))
        self.routes = table
        self.generation = table + "_generation"
        self.changes = table + "_changes"
        self.nodes = table + "_nodes"
        self.channel = table

    def schema(self):
        """
        The statements of C{db init}, each idempotent.
        """
        n = self
        return [
            f"""CREATE TABLE IF NOT EXISTS {n.routes} (
                key text PRIMARY KEY CHECK (key = lower(key) AND key <> ''),
                backend text NOT NULL CHECK (backend <> ''),
                address text NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {n.generation} (
                id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
                generation bigint NOT NULL DEFAULT 1,
                xid xid8 NULL)""",
            f"INSERT INTO {n.generation} (id) VALUES (1) ON CONFLICT DO NOTHING",
            f"""CREATE TABLE IF NOT EXISTS {n.changes} (
                generation bigint NOT NULL,
                key text NULL,
                at timestamptz NOT NULL DEFAULT now())""",
            f"CREATE INDEX IF NOT EXISTS {n.changes}_by_generation ON {n.changes} (generation)",
            f"""CREATE TABLE IF NOT EXISTS {n.nodes} (
                name text PRIMARY KEY,
                generation bigint NOT NULL,
                oldest bigint NULL,
                fenced boolean NOT NULL DEFAULT false,
                lease double precision NOT NULL,
                data_timeout double precision NOT NULL,
                heartbeat timestamptz NOT NULL,
                started timestamptz NOT NULL DEFAULT now())""",
            # One generation per transaction: the row lock on the counter
            # serializes writers, so generations commit in order.
            f"""CREATE OR REPLACE FUNCTION {n.routes}_bump() RETURNS bigint
                LANGUAGE plpgsql AS $$
                DECLARE g bigint;
                BEGIN
                    UPDATE {n.generation}
                       SET generation = CASE WHEN xid IS NOT DISTINCT FROM pg_current_xact_id()
                                             THEN generation ELSE generation + 1 END,
                           xid = pg_current_xact_id()
                     WHERE id = 1
                    RETURNING generation INTO g;
                    PERFORM pg_notify('{n.channel}', g::text);
                    RETURN g;
                END $$""",
            f"""CREATE OR REPLACE FUNCTION {n.routes}_changed() RETURNS trigger
                LANGUAGE plpgsql AS $$
                DECLARE g bigint;
                BEGIN
                    IF current_setting('lmtp_proxy.bulk', true) = 'on' THEN
                        RETURN NULL;
                    END IF;
                    g := {n.routes}_bump();
                    IF TG_OP <> 'INSERT' THEN
                        INSERT INTO {n.changes} (generation, key) VALUES (g, OLD.key);
                    END IF;
                    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.key <> OLD.key) THEN
                        INSERT INTO {n.changes} (generation, key) VALUES (g, NEW.key);
                    END IF;
                    RETURN NULL;
                END $$""",
            f"""CREATE OR REPLACE FUNCTION {n.routes}_truncated() RETURNS trigger
                LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO {n.changes} (generation, key) VALUES ({n.routes}_bump(), NULL);
                    RETURN NULL;
                END $$""",
            f"""CREATE OR REPLACE TRIGGER {n.routes}_notify
                AFTER INSERT OR UPDATE OR DELETE ON {n.routes}
                FOR EACH ROW EXECUTE FUNCTION {n.routes}_changed()""",
            f"""CREATE OR REPLACE TRIGGER {n.routes}_truncate
                AFTER TRUNCATE ON {n.routes}
                FOR EACH STATEMENT EXECUTE FUNCTION {n.routes}_truncated()""",
        ]


def _value(backend, address):
    """
    A route as L{lmtp_proxy.routing.RoutingTable} stores it.
    """
    return backend if address is None else (backend, address)


class Store:
    """
    Blocking operations on one configuration's routing store.
    """

    def __init__(self, config, connection=None):
        self.config = config
        self.names = Names(config.routing_table)
        self._conn = connection

    @property
    def conn(self):
        if self._conn is None:
            self._conn = connect(self.config)
        return self._conn

    def close(self):
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _run(self, work):
        """
        Run C{work(cursor)} in one transaction; a database error becomes a
        L{StoreError}.
        """
        psycopg = _psycopg()
        conn = self.conn
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    return work(cur)
        except psycopg.Error as e:
            if conn.closed:
                self._conn = None
            raise failed(self.config, e) from None

    # -- db init / import / export --

    def init(self):
        def work(cur):
            for statement in self.names.schema():
                cur.execute(statement)

        self._run(work)

    def generation(self):
        n = self.names

        def work(cur):
            cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
            row = cur.fetchone()
            return row[0] if row else None

        return self._run(work)

    def replaceAll(self, users):
        """
        Replace every route with C{users} (key to backend name or
        C{(backend, address)}), in one transaction: one generation, and
        one "everything changed" record instead of one per row.

        @return: the new generation.
        """
        n = self.names

        def work(cur):
            cur.execute("SET LOCAL lmtp_proxy.bulk = 'on'")
            cur.execute(f"SELECT {n.routes}_bump()")
            generation = cur.fetchone()[0]
            cur.execute(f"DELETE FROM {n.routes}")
            with cur.copy(f"COPY {n.routes} (key, backend, address) FROM STDIN") as copy:
                for key, value in users.items():
                    if value.__class__ is str:
                        copy.write_row((key, value, None))
                    else:
                        copy.write_row((key, value[0], value[1]))
            cur.execute(
                f"INSERT INTO {n.changes} (generation, key) VALUES (%s, NULL)", (generation,)
            )
            self._prune(cur)
            return generation

        return self._run(work)

    def _prune(self, cur):
        cur.execute(
            f"DELETE FROM {self.names.changes} WHERE at < now() - interval '{CHANGES_KEPT}'"
        )

    def routes(self, pattern=None):
        """
        Every route as C{(key, backend, address)}, sorted by key; with
        C{pattern} (an SQL LIKE pattern), only the keys matching it.
        """
        n = self.names

        def work(cur):
            if pattern is None:
                cur.execute(f"SELECT key, backend, address FROM {n.routes} ORDER BY key")
            else:
                cur.execute(
                    f"SELECT key, backend, address FROM {n.routes} WHERE key LIKE %s ORDER BY key",
                    (pattern,),
                )
            return cur.fetchall()

        return self._run(work)

    # -- users set / delete --

    def set(self, key, backend, address=None):
        """
        Route C{key} to C{backend}, in one transaction.

        @return: the generation it is part of.
        """
        n = self.names

        def work(cur):
            cur.execute(
                f"""INSERT INTO {n.routes} (key, backend, address) VALUES (%s, %s, %s)
                    ON CONFLICT (key) DO UPDATE
                    SET backend = EXCLUDED.backend, address = EXCLUDED.address""",
                (key, backend, address),
            )
            self._prune(cur)
            cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
            return cur.fetchone()[0]

        return self._run(work)

    def delete(self, key):
        """
        Remove the route of C{key}.

        @return: C{(generation, whether a route was removed)}.
        """
        n = self.names

        def work(cur):
            cur.execute(f"DELETE FROM {n.routes} WHERE key = %s", (key,))
            removed = cur.rowcount > 0
            cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
            return cur.fetchone()[0], removed

        return self._run(work)

    # -- what the proxy (its follower thread) reads and writes --

    def load(self):
        """
        The whole table as one consistent snapshot.

        @return: C{(generation, users)}, C{users} mapping keys to
            L{_value}s (backend name strings shared between rows).
        """
        n = self.names
        conn = self.conn
        psycopg = _psycopg()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = conn.cursor()
                cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
                generation = cur.fetchone()[0]
                names = {REJECT: REJECT}
                users = {}
                # A server-side cursor: a million rows arrive in batches,
                # not as one list.
                with conn.cursor(name="lmtp_proxy_load") as rows:
                    rows.itersize = 20000
                    rows.execute(f"SELECT key, backend, address FROM {n.routes}")
                    for key, backend, address in rows:
                        backend = names.setdefault(backend, backend)
                        users[key] = backend if address is None else (backend, address)
                return generation, users
        except psycopg.Error as e:
            raise failed(self.config, e) from None

    def changesSince(self, generation):
        """
        What changed after C{generation}.

        @return: C{(latest generation, changes)}; C{changes} is C{None}
            when the whole table must be loaded again, else a list of
            C{(key, value or None)}, in order.
        """
        n = self.names

        def work(cur):
            cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
            latest = cur.fetchone()[0]
            if latest <= generation:
                return latest, []
            cur.execute(
                f"""SELECT c.generation, c.key, r.backend, r.address
                      FROM {n.changes} c LEFT JOIN {n.routes} r ON r.key = c.key
                     WHERE c.generation > %s AND c.generation <= %s
                     ORDER BY c.generation""",
                (generation, latest),
            )
            rows = cur.fetchall()
            # Generations are gap-free (a rolled-back bump is rolled back
            # too): one without a record was pruned. Then, or after a bulk
            # replace, the whole table is loaded again.
            seen = {g for g, _, _, _ in rows}
            if len(seen) < latest - generation or any(key is None for _, key, _, _ in rows):
                return latest, None
            changes = [
                (key, None if backend is None else _value(backend, address))
                for _, key, backend, address in rows
            ]
            return latest, changes

        return self._run(work)

    def heartbeat(self, node, generation, oldest, fenced, lease, dataTimeout):
        """
        Record that C{node} is alive with C{generation} in force and its
        oldest transaction in flight of generation C{oldest} (or C{None}).
        """
        n = self.names

        def work(cur):
            cur.execute(
                f"""INSERT INTO {n.nodes}
                        (name, generation, oldest, fenced, lease, data_timeout, heartbeat)
                    VALUES (%s, %s, %s, %s, %s, %s, now())
                    ON CONFLICT (name) DO UPDATE SET
                        generation = EXCLUDED.generation, oldest = EXCLUDED.oldest,
                        fenced = EXCLUDED.fenced, lease = EXCLUDED.lease,
                        data_timeout = EXCLUDED.data_timeout, heartbeat = now()""",
                (node, generation, oldest, fenced, lease, dataTimeout),
            )

        self._run(work)

    def nodes(self):
        """
        Every node's row, with its silence measured on the database's clock.

        @return: C{(generation, rows)}: the current generation, and
            C{(name, generation, oldest, fenced, lease, data_timeout,
            seconds since its heartbeat)} per node.
        """
        n = self.names

        def work(cur):
            cur.execute(f"SELECT generation FROM {n.generation} WHERE id = 1")
            generation = cur.fetchone()[0]
            cur.execute(
                f"""SELECT name, generation, oldest, fenced, lease, data_timeout,
                           extract(epoch FROM now() - heartbeat)::float8
                      FROM {n.nodes} ORDER BY name"""
            )
            return generation, cur.fetchall()

        return self._run(work)
