"""
L{lmtp_proxy.service.ProxyService}'s listening socket on the real reactor:
a unix socket (mode, owner, group, stale and live sockets, files that are
not sockets), IPv6 loopback and IPv4 TCP.
"""

import errno
import grp
import os
import pwd
import socket
import stat
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy import service as proxyservice
from tests.lmtpclient import connectClient
from tests.support import deadPort, liveSocket, unixPath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNER = "nobody"
GROUP = "nogroup"


def writeConfig(testcase, listen):
    """
    A config file whose C{config:} section is the YAML text C{listen}.
    """
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write("config:\n%s\nbackends: {}\nusers: {}\n" % (listen,))
    return path


def startService(testcase, listen):
    """
    Build a L{ProxyService} from C{listen} and bind it (as twistd does while
    still root); stopped at cleanup.
    """
    svc = proxyservice.ProxyService(configuration.load(writeConfig(testcase, listen)), reactor)
    testcase.addCleanup(svc.stopService)
    svc.privilegedStartService()
    return svc


def unixListen(path, extra=""):
    return "  socket: %s\n%s" % (path, extra)


def staleSocket(path):
    """
    Leave a unix socket file at C{path} as a dead process would: bound,
    closed, never unlinked.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def canConnect(path):
    """
    Whether something accepts connections on the unix socket C{path}.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def connectAtOnce(testcase, family, address, count, wait=1.0):
    """
    Open C{count} non-blocking connections to C{address} without letting the
    reactor run (so nothing is accepted), and return how many the kernel
    completed within C{wait} seconds.
    """
    import select
    import time

    pending = []
    refused = 0
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        testcase.addCleanup(s.close)
        s.setblocking(False)
        error = s.connect_ex(address)
        if error == errno.EAGAIN:
            # A unix socket's full backlog refuses at once.
            refused += 1
        elif error == errno.EINPROGRESS:
            pending.append(s)
        elif error:
            raise OSError(error, os.strerror(error))
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
        for s in writable:
            pending.remove(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                refused += 1
    return count - len(pending) - refused


def requireRoot():
    if os.getuid() != 0:
        raise unittest.SkipTest("needs root to chown")


class UnixListenerTests(unittest.TestCase):
    """
    A unix listening socket.
    """


    def test_chownRefusedIsOneLine(self):
        """
        When the socket cannot be given its owner (twistd not started as
        root), startup fails with a one-line SystemExit naming the socket,
        not a traceback.
        """
        def refuse(path, uid, gid):
            raise PermissionError(1, "Operation not permitted", path)

        self.patch(proxyservice.os, "chown", refuse)
        path = unixPath(self)
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path, "  owner: %s\n" % (OWNER,)))),
            reactor,
        )
        self.addCleanup(svc.stopService)
        error = self.assertRaises(SystemExit, svc.privilegedStartService)
        self.assertIn(path, str(error))
        self.assertIn("Operation not permitted", str(error))
        self.assertEqual(len(str(error).splitlines()), 1)

    @defer.inlineCallbacks
    def test_listensAndGreets(self):
        """
        C{privilegedStartService} creates a unix socket at the configured
        path that greets an LMTP client with 220.
        """
        path = unixPath(self)
        startService(self, unixListen(path))
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        client = yield connectClient(self, path)
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_burstOfConnectionsQueued(self):
        """
        Two hundred clients connecting at once to the unix socket, before
        the proxy accepts any, are all queued rather than refused.
        """
        path = unixPath(self)
        startService(self, unixListen(path))
        self.assertEqual(connectAtOnce(self, socket.AF_UNIX, path, 200), 200)

    def test_permissions0660(self):
        """
        C{permissions: 0660} gives the socket mode 0660.
        """
        path = unixPath(self)
        startService(self, unixListen(path, "  permissions: 0660\n"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)

    def test_permissions0600(self):
        """
        C{permissions: 0600} gives the socket mode 0600 (the setting is
        applied, not a fixed default).
        """
        path = unixPath(self)
        startService(self, unixListen(path, "  permissions: 0600\n"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_permissionsDespiteUmask(self):
        """
        A restrictive umask (twistd sets 077 when daemonizing) does not
        narrow the configured mode.
        """
        path = unixPath(self)
        old = os.umask(0o077)
        try:
            startService(self, unixListen(path, "  permissions: 0660\n"))
        finally:
            os.umask(old)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)

    def test_ownerAndGroup(self):
        """
        C{owner} and C{group} names are applied to the socket.
        """
        requireRoot()
        path = unixPath(self)
        startService(self, unixListen(path, "  owner: %s\n  group: %s\n" % (OWNER, GROUP)))
        st = os.stat(path)
        self.assertEqual(st.st_uid, pwd.getpwnam(OWNER).pw_uid)
        self.assertEqual(st.st_gid, grp.getgrnam(GROUP).gr_gid)

    def test_numericOwner(self):
        """
        A numeric C{owner} is used as the uid; the group is left alone.
        """
        requireRoot()
        path = unixPath(self)
        uid = pwd.getpwnam(OWNER).pw_uid
        startService(self, unixListen(path, "  owner: %d\n" % (uid,)))
        st = os.stat(path)
        self.assertEqual(st.st_uid, uid)
        self.assertEqual(st.st_gid, os.getgid())

    def test_groupOnly(self):
        """
        C{group} alone changes the group and leaves the owner root.
        """
        requireRoot()
        path = unixPath(self)
        startService(self, unixListen(path, "  group: %s\n" % (GROUP,)))
        st = os.stat(path)
        self.assertEqual(st.st_uid, os.getuid())
        self.assertEqual(st.st_gid, grp.getgrnam(GROUP).gr_gid)

    @defer.inlineCallbacks
    def test_staleSocketReplaced(self):
        """
        A socket file left by a dead process is removed and replaced by a
        socket that answers.
        """
        path = unixPath(self)
        staleSocket(path)
        self.assertFalse(canConnect(path))
        startService(self, unixListen(path))
        client = yield connectClient(self, path)
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_liveSocketKept(self):
        """
        A socket something is listening on is not removed: startup fails
        with a one-line SystemExit naming the path, and the other listener
        still accepts connections on it.
        """
        path = unixPath(self)
        live = liveSocket(self, path)
        inode = os.stat(path).st_ino
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        error = self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        self.assertIn(path, str(error))
        self.assertIn("in use", str(error))
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertTrue(canConnect(path))
        live.settimeout(5)
        accepted, _ = live.accept()
        accepted.close()

    def test_liveSocketClearErrorUnderTwistd(self):
        """
        Under the real C{twistd -n}, a live socket at the configured path
        stops startup with a clear message (the path and "in use", no
        traceback), and the other listener keeps its socket.
        """
        path = unixPath(self)
        liveSocket(self, path)
        inode = os.stat(path).st_ino
        cfg = writeConfig(self, unixListen(path))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "lmtp-proxy", "--config", cfg],
            cwd=os.path.dirname(cfg), env=env, capture_output=True, text=True, timeout=60,
        )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertTrue(canConnect(path))
        self.assertIn(path, output)
        self.assertIn("in use", output)
        self.assertNotIn("Traceback", output)

    def test_liveSocketKeptDespiteStaleLock(self):
        """
        A live socket is not removed even when a stale Twisted lock file
        (left by a proxy that died) sits beside it: startup fails and the
        other listener keeps its socket.
        """
        path = unixPath(self)
        liveSocket(self, path)
        inode = os.stat(path).st_ino
        # A FilesystemLock symlink naming a PID above any pid_max.
        os.symlink(str(2**22 + 1), path + ".lock")
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        self.assertTrue(os.path.lexists(path), "live socket removed")
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertTrue(canConnect(path))
        self.assertIsNone(svc.listener.port)

    @defer.inlineCallbacks
    def test_staleSocketReplacedDespiteReusedLockPid(self):
        """
        A stale socket is replaced even when the lock file the dead proxy
        left names a PID that now belongs to an unrelated live process (PID
        reuse after a crash or reboot): the socket is provably dead, so
        startup must not fail.
        """
        path = unixPath(self)
        staleSocket(path)
        os.symlink("1", path + ".lock")  # init: alive, not a proxy
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        self.addCleanup(svc.stopService)
        svc.privilegedStartService()
        client = yield connectClient(self, path)
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_regularFileKept(self):
        """
        A regular file at the socket path is never deleted or changed;
        startup fails.
        """
        path = unixPath(self)
        with open(path, "wb") as f:
            f.write(b"not a socket\n")
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        self.assertTrue(stat.S_ISREG(os.lstat(path).st_mode))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"not a socket\n")

    def test_regularFileKeptDespiteStaleLock(self):
        """
        A regular file at the socket path survives even with a stale lock
        beside it (Twisted's wantPID cleanup only removes sockets).
        """
        path = unixPath(self)
        with open(path, "wb") as f:
            f.write(b"not a socket\n")
        os.symlink(str(2**22 + 1), path + ".lock")
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"not a socket\n")

    def test_directoryKept(self):
        """
        A directory at the socket path is left alone; startup fails.
        """
        path = unixPath(self)
        os.mkdir(path)
        self.addCleanup(os.rmdir, path)
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        self.assertTrue(os.path.isdir(path))

    @defer.inlineCallbacks
    def test_socketRemovedOnStop(self):
        """
        Stopping the service removes its socket file.
        """
        path = unixPath(self)
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, unixListen(path))), reactor
        )
        svc.privilegedStartService()
        self.assertTrue(os.path.exists(path))
        yield svc.stopService()
        self.assertFalse(os.path.lexists(path))

    def test_unknownOwner(self):
        """
        A config naming a user that does not exist makes C{makeService}
        raise C{SystemExit} with one line naming that user, before anything
        is bound.
        """
        path = unixPath(self)
        cfg = writeConfig(self, unixListen(path, "  owner: no-such-user-lmtpx\n"))
        error = self.assertRaises(SystemExit, proxyservice.makeService, {"config": cfg})
        self.assertIsInstance(error.code, str)
        self.assertEqual(error.code.splitlines(), [error.code])
        self.assertIn("no-such-user-lmtpx", error.code)
        self.assertIn(cfg, error.code)
        self.assertFalse(os.path.lexists(path))

    def test_unknownGroup(self):
        """
        A config naming a group that does not exist makes C{makeService}
        raise C{SystemExit} with one line naming that group.
        """
        path = unixPath(self)
        cfg = writeConfig(self, unixListen(path, "  group: no-such-group-lmtpx\n"))
        error = self.assertRaises(SystemExit, proxyservice.makeService, {"config": cfg})
        self.assertEqual(error.code.splitlines(), [error.code])
        self.assertIn("no-such-group-lmtpx", error.code)


def ipv6Loopback():
    """
    Whether this machine can bind ::1.
    """
    if not socket.has_ipv6:
        return False
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def freeIPv6Port():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class TCPListenerTests(unittest.TestCase):
    """
    TCP listeners on IPv4 and IPv6 loopback.
    """

    @defer.inlineCallbacks
    def test_ipv4Loopback(self):
        """
        C{socket: [127.0.0.1, PORT]} listens there and greets with 220.
        """
        port = deadPort()
        svc = startService(self, "  socket: [127.0.0.1, %d]\n" % (port,))
        host = svc.listener.port.getHost()
        self.assertEqual((host.host, host.port), ("127.0.0.1", port))
        client = yield connectClient(self, port)
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_burstOfConnectionsQueued(self):
        """
        Two hundred clients connecting at once, before the proxy accepts
        any, are all queued by the kernel: none has its SYN dropped (and
        waits a second or more to try again), as with Twisted's default
        backlog of 50.
        """
        port = deadPort()
        startService(self, "  socket: [127.0.0.1, %d]\n" % (port,))
        self.assertEqual(connectAtOnce(self, socket.AF_INET, ("127.0.0.1", port), 200), 200)

    @defer.inlineCallbacks
    def test_ipv6Loopback(self):
        """
        C{socket: ["::1", PORT]} listens on IPv6 loopback and greets with
        220.
        """
        if not ipv6Loopback():
            raise unittest.SkipTest("no IPv6 loopback on this machine")
        port = freeIPv6Port()
        svc = startService(self, '  socket: ["::1", %d]\n' % (port,))
        host = svc.listener.port.getHost()
        self.assertEqual((host.type, host.host, host.port), ("TCP", "::1", port))
        client = yield connectClient(self, ("::1", port))
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_portInUse(self):
        """
        A TCP port already taken fails startup with a one-line SystemExit.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        svc = proxyservice.ProxyService(
            configuration.load(writeConfig(self, "  socket: [127.0.0.1, %d]\n" % (port,))),
            reactor,
        )
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
