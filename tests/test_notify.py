"""
systemd readiness: the datagrams the proxy sends to C{NOTIFY_SOCKET}.
"""

import os
import socket
import time

from twisted.internet import defer
from twisted.trial import unittest

from lmtp_proxy.notify import Notifier, NotifyService
from tests.support import FakeBackend, unixPath
from tests.test_service import RunningProxy


def notifySocket(testcase, address):
    """
    A datagram socket bound at C{address}, standing in for systemd's;
    closed at cleanup.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    testcase.addCleanup(sock.close)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def received(sock):
    """
    Every datagram waiting on C{sock}, each as a list of its lines.
    """
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(4096).decode("utf-8").split("\n"))
        except BlockingIOError:
            return datagrams


class NotifierTests(unittest.TestCase):
    """
    L{Notifier} speaks sd_notify(3)'s datagram protocol.
    """

    def test_pathSocket(self):
        """
        C{NOTIFY_SOCKET} naming a path gets one datagram per notification.
        """
        path = unixPath(self)
        sock = notifySocket(self, path)
        Notifier.fromEnvironment({"NOTIFY_SOCKET": path}).ready("serving")
        self.assertEqual(received(sock), [["READY=1", "STATUS=serving"]])

    def test_abstractSocket(self):
        """
        A name starting with C{@} is a Linux abstract socket.
        """
        name = "lmtpt-notify-%d" % (os.getpid(),)
        sock = notifySocket(self, "\0" + name)
        Notifier.fromEnvironment({"NOTIFY_SOCKET": "@" + name}).notify("STOPPING=1")
        self.assertEqual(received(sock), [["STOPPING=1"]])

    def test_reloading(self):
        """
        C{RELOADING=1} comes with C{MONOTONIC_USEC}, the monotonic clock in
        microseconds.
        """
        path = unixPath(self)
        sock = notifySocket(self, path)
        before = int(time.monotonic() * 1e6)
        Notifier(path).reloading()
        [[reloading, monotonic]] = received(sock)
        self.assertEqual(reloading, "RELOADING=1")
        key, _, usec = monotonic.partition("=")
        self.assertEqual(key, "MONOTONIC_USEC")
        self.assertGreaterEqual(int(usec), before)

    def test_notRunBySystemd(self):
        """
        Without C{NOTIFY_SOCKET} nothing is sent and nothing fails.
        """
        notifier = Notifier.fromEnvironment({})
        self.assertIsNone(notifier.address)
        notifier.ready("serving")

    def test_goneSocketIsNotAnError(self):
        """
        A socket nobody listens at is logged, not raised: systemd's
        bookkeeping never stops the mail.
        """
        Notifier(unixPath(self)).notify("READY=1")
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class ServingTests(unittest.TestCase):
    """
    L{NotifyService} with a C{serving} Deferred (the database source's
    first table) says READY=1 only once it fires.
    """

    def test_readyWaitsForServing(self):
        """
        Nothing is sent at start; READY=1 follows when the proxy delivers.
        """
        path = unixPath(self)
        sock = notifySocket(self, path)
        serving = defer.Deferred()
        notifyService = NotifyService(
            Notifier.fromEnvironment({"NOTIFY_SOCKET": path}), lambda: "serving", serving
        )
        notifyService.startService()
        self.assertEqual(received(sock), [])
        serving.callback(None)
        self.assertEqual(received(sock), [["READY=1", "STATUS=serving"]])


class ServiceNotifyTests(unittest.TestCase):
    """
    The proxy's service tree tells systemd when it is ready, reloading and
    stopping.
    """

    def setUp(self):
        self.path = unixPath(self)
        self.sock = notifySocket(self, self.path)
        os.environ["NOTIFY_SOCKET"] = self.path
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        self.proxy = RunningProxy(self, {"a": FakeBackend(self).entry}, {"@x.test": "a"})

    def test_readyOnceListening(self):
        """
        Once started, and listening, the proxy sends C{READY=1}.
        """
        [ready] = received(self.sock)
        self.assertEqual(ready[0], "READY=1")
        self.assertEqual(ready[1], "STATUS=serving, generation 1")
        self.assertIsNotNone(self.proxy.service.listener.port)

    @defer.inlineCallbacks
    def test_reload(self):
        """
        A reload is bracketed by C{RELOADING=1} and C{READY=1}.
        """
        received(self.sock)
        yield self.proxy.service.reloader.reload()
        [reloading, ready] = received(self.sock)
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertEqual(ready, ["READY=1", "STATUS=serving, generation 2"])

    @defer.inlineCallbacks
    def test_refusedReload(self):
        """
        A refused reload also ends with C{READY=1}: the old configuration
        stays in force.
        """
        received(self.sock)
        self.proxy.write({}, {}, text="config: [")
        yield self.assertFailure(self.proxy.service.reloader.reload(), Exception)
        [reloading, ready] = received(self.sock)
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertEqual(ready, ["READY=1", "STATUS=serving, generation 1"])

    @defer.inlineCallbacks
    def test_stopping(self):
        """
        A stop sends C{STOPPING=1} first.
        """
        received(self.sock)
        yield self.proxy.stop()
        self.assertEqual(received(self.sock), [["STOPPING=1"]])
