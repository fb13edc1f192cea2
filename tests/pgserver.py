"""
A private PostgreSQL server for the tests of the database routing source.

Debian's C{postgresql} package (installed by C{tools/install-peers.sh});
C{initdb} into a temporary directory, run as an unprivileged user (the
harness user when the tests run as root), listening only on a unix socket
in that directory (C{listen_addresses} empty), and stopped by its PID. When
the server or the C{psycopg} client is missing the test is skipped, naming
the package, or fails under C{CI=true} (as in L{tests.peers}).
"""

import glob
import os
import shutil
import signal
import subprocess

from tests.peers import (
    _unavailable,
    ensureHarnessUser,
    stopPid,
    tempDir,
    waitFor,
)

PACKAGE = "postgresql"


def serverBinaries():
    """
    The directory holding C{initdb} and C{postgres}, or C{None}.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if os.access(os.path.join(directory, "postgres"), os.X_OK):
            return directory
    found = shutil.which("postgres")
    return os.path.dirname(found) if found else None


def requirePostgres():
    """
    The server's binaries directory; skip (or fail under CI=true) when the
    server or the client library is missing.
    """
    directory = serverBinaries()
    if directory is None:
        _unavailable(
            "PostgreSQL server missing (Debian package %s); install it with "
            "tools/install-peers.sh" % (PACKAGE,)
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg missing: pip install '.[postgresql]'")
    return directory


class PostgresServer:
    """
    One PostgreSQL server with a database C{mail} owned by role C{lmtp}
    (trust authentication on its unix socket), stopped at the test's end.

    @ivar uri: the libpq URI of the database.
    """

    def __init__(self, testcase, password=None):
        self._bin = requirePostgres()
        self._testcase = testcase
        self.dir = tempDir(testcase, prefix="lmtppg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        self.process = None
        self._user = None
        if os.geteuid() == 0:
            entry = ensureHarnessUser()
            self._user = entry.pw_uid, entry.pw_gid
            os.chown(self.dir, *self._user)
        self.uri = "postgresql://lmtp@/mail?host=%s" % (self.dir,)
        self._initdb(password)
        self.start()
        self._createDatabase()

    def _demote(self):
        if self._user is not None:
            uid, gid = self._user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    def _run(self, *argv):
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            preexec_fn=self._demote,
            cwd=self.dir,
            env=dict(os.environ, LC_ALL="C.UTF-8", HOME=self.dir),
        )

    def _initdb(self, password):
        args = [
            os.path.join(self._bin, "initdb"),
            "-D", self.data, "-U", "lmtp", "-E", "UTF8", "--no-sync",
            "--auth-local=trust", "--auth-host=reject",
        ]
        if password is not None:
            pwfile = os.path.join(self.dir, "initpw")
            with open(pwfile, "w") as f:
                f.write(password + "\n")
            if self._user is not None:
                os.chown(pwfile, *self._user)
            args[-2:] = ["--auth-local=scram-sha-256", "--auth-host=reject", "--pwfile", pwfile]
        self._run(*args)
        self.password = password

    def start(self):
        """
        Start the server (again), listening on the unix socket only.
        """
        socket = os.path.join(self.dir, ".s.PGSQL.5432")
        logf = open(self.log, "ab")
        self.process = subprocess.Popen(
            [
                os.path.join(self._bin, "postgres"),
                "-D", self.data,
                "-k", self.dir,
                "-c", "listen_addresses=",
                "-c", "fsync=off",
                "-c", "unix_socket_permissions=0777",
                "-c", "max_connections=50",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=self._demote,
            cwd=self.dir,
            env=dict(os.environ, LC_ALL="C.UTF-8"),
        )
        logf.close()
        process = self.process
        self._testcase.addCleanup(stopPid, process.pid, 15, process)
        waitFor(
            lambda: os.path.exists(socket) and self._ready(),
            30,
            what="PostgreSQL to accept connections (log: %s)" % (self.log,),
        )

    def _ready(self):
        import psycopg

        try:
            psycopg.connect(self.adminURI("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def adminURI(self, database="mail"):
        if self.password is None:
            return "postgresql://lmtp@/%s?host=%s" % (database, self.dir)
        return "postgresql://lmtp:%s@/%s?host=%s" % (self.password, database, self.dir)

    def _createDatabase(self):
        import psycopg

        with psycopg.connect(self.adminURI("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE mail")

    def stop(self):
        """
        Stop the server by its PID: a fast shutdown, which ends every
        session at once.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                stopPid(process.pid, 5, process)

    def execute(self, sql, params=None):
        """
        Run one statement as the database owner; the rows, if any.
        """
        import psycopg

        with psycopg.connect(self.adminURI(), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else None
