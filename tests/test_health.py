"""
Failing fast on a dead backend (L{lmtp_proxy.health}), the greeting bounded
by C{connect_timeout}, and refusing a backend that is our own listener.
"""

import io
from contextlib import redirect_stderr, redirect_stdout

from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.cli import main
from lmtp_proxy.client import BackendTimeout, BackendUnavailable, LMTPClient
from lmtp_proxy.health import BackendHealth

from tests.lmtpclient import exchange, transaction
from tests.support import FakeBackend, Proxy, fullBacklog


def logged(testcase):
    """
    The text of every log event while C{testcase} runs.
    """
    texts = []

    def observer(event):
        texts.append(event.get("log_format") or "")

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return texts


class HealthTests(unittest.TestCase):
    """
    L{BackendHealth} on a L{task.Clock}.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.health = BackendHealth(self.clock)
        self.log = logged(self)

    def test_downAfterConsecutiveFailures(self):
        """
        The C{limit}th consecutive failure marks the backend down; until
        then connections are tried.
        """
        self.health.failed("a", 3, 10)
        self.health.failed("a", 3, 10)
        self.assertTrue(self.health.admit("a"))
        self.health.failed("a", 3, 10)
        self.assertFalse(self.health.admit("a"))

    def test_successResetsCount(self):
        """
        A success in between starts the count again.
        """
        self.health.failed("a", 2, 10)
        self.health.succeeded("a")
        self.health.failed("a", 2, 10)
        self.assertTrue(self.health.admit("a"))

    def test_oneProbeAfterRetry(self):
        """
        When C{retry} is over, one connection (the probe) is let through;
        the others still are not.
        """
        self.health.failed("a", 1, 10)
        self.clock.advance(9.9)
        self.assertFalse(self.health.admit("a"))
        self.clock.advance(0.1)
        self.assertTrue(self.health.admit("a"))
        self.assertFalse(self.health.admit("a"))

    def test_probeFails(self):
        """
        A failed probe keeps the backend down for another C{retry}.
        """
        self.health.failed("a", 1, 10)
        self.clock.advance(10)
        self.health.admit("a")
        self.health.failed("a", 1, 10)
        self.clock.advance(9)
        self.assertFalse(self.health.admit("a"))
        self.clock.advance(1)
        self.assertTrue(self.health.admit("a"))

    def test_probeSucceeds(self):
        """
        A successful probe brings the backend back.
        """
        self.health.failed("a", 1, 10)
        self.clock.advance(10)
        self.health.admit("a")
        self.health.succeeded("a")
        self.assertTrue(self.health.admit("a"))
        self.assertTrue(self.health.admit("a"))

    def test_loggedOnceEach(self):
        """
        Going down and coming back are logged once each, however many
        probes fail in between.
        """
        for _ in range(3):
            self.health.failed("a", 1, 10)
            self.clock.advance(10)
            self.health.admit("a")
        self.health.succeeded("a")
        self.health.succeeded("a")
        self.assertEqual(len([t for t in self.log if "down after" in t]), 1)
        self.assertEqual(len([t for t in self.log if "back up" in t]), 1)

    def test_attemptsInFlightFail(self):
        """
        Connection attempts still running when the backend goes down fail at
        once; one that connects later is handed to C{late}.
        """
        attempt = defer.Deferred()
        late = []
        watched = self.health.watch("a", attempt, late.append)
        self.health.failed("a", 1, 10)
        self.failureResultOf(watched, BackendUnavailable)
        attempt.callback(("client", False))
        self.assertEqual(late, [("client", False)])


class GreetingTimeoutTests(unittest.TestCase):
    """
    README's promise: C{connect_timeout} covers the connect and the
    greeting.
    """

    def test_greetingDeadline(self):
        """
        A connection that is never greeted fails at its greeting deadline,
        not after the command timeout.
        """
        clock = task.Clock()
        client = LMTPClient(clock, 60.0, greetingDeadline=4.0)
        clock.advance(1)
        client.makeConnection(StringTransport())
        clock.advance(2.9)
        self.assertNoResult(client.greeting)
        clock.advance(0.1)
        self.failureResultOf(client.greeting, BackendTimeout)

    @defer.inlineCallbacks
    def test_silentBackend(self):
        """
        Over loopback: a backend that accepts and never greets costs its
        recipient a 451 after C{connect_timeout}, not C{command_timeout}.
        """
        silent = FakeBackend(self)
        silent.greeting = None
        proxy = Proxy(
            self,
            {"connect_timeout": 0.5, "command_timeout": 30},
            {"a": silent.entry},
            {"@a.test": "a"},
        )
        client = yield proxy.connect(self)
        started = reactor.seconds()
        replies = yield exchange(client, transaction([b"x@a.test"]), 5)
        self.assertTrue(replies[2].startswith("451 4.4."), replies[2])
        self.assertTrue(0.4 <= reactor.seconds() - started < 5, reactor.seconds() - started)


class FailFastTests(unittest.TestCase):
    """
    The pool stops trying a backend after C{backend_failures} consecutive
    failures.
    """

    @defer.inlineCallbacks
    def test_downThenBack(self):
        """
        After two greetings that never came the third recipient gets 451
        4.4.1 without a connection; after C{backend_retry} one probe
        connects and the backend is used again.
        """
        backend = FakeBackend(self)
        backend.greeting = None
        proxy = Proxy(
            self,
            {"backend_failures": 2, "backend_retry": 0.3, "connect_timeout": 0.2},
            {"a": backend.entry},
            {"@a.test": "a"},
        )
        # A greeting that never comes is a timeout (4.4.2), or 4.4.1 once
        # the backend is down; the third recipient costs no connection.
        for expected, code in ((1, "451 4.4."), (2, "451 4.4."), (2, "451 4.4.1")):
            client = yield proxy.connect(self)
            replies = yield exchange(client, transaction([b"x@a.test"]), 5)
            self.assertTrue(replies[2].startswith(code), replies[2])
            self.assertEqual(backend.connections, expected)
        backend.greeting = b"220 fake.test LMTP ready\r\n"
        yield task.deferLater(reactor, 0.35, lambda: None)
        client = yield proxy.connect(self)
        replies = yield exchange(client, transaction([b"x@a.test"]), 6)
        self.assertEqual(replies[4][:3], "250")
        self.assertFalse(proxy.pool.health.isDown("a"))

    @defer.inlineCallbacks
    def test_busyGreetingDoesNotMarkDown(self):
        """
        A backend that answers every connection with 421 is up, only busy:
        each recipient gets its own 451 4.4.1 and a new connection is tried
        each time, rather than the backend marked down.
        """
        backend = FakeBackend(self)
        backend.greeting = b"421 busy\r\n"
        proxy = Proxy(
            self,
            {"backend_failures": 2, "backend_retry": 30},
            {"a": backend.entry},
            {"@a.test": "a"},
        )
        for expected in (1, 2, 3):
            client = yield proxy.connect(self)
            replies = yield exchange(client, transaction([b"x@a.test"]), 5)
            self.assertTrue(replies[2].startswith("451 4.4.1"), replies[2])
            self.assertEqual(backend.connections, expected)
        self.assertFalse(proxy.pool.health.isDown("a"))

    @defer.inlineCallbacks
    def test_blackHoleCostsOneTimeout(self):
        """
        Sessions that reach a black-holed backend one after another while
        earlier attempts still hang: once C{backend_failures} attempts timed
        out, the others fail with them, and later ones at once, so the
        recipients together wait about one connect timeout.
        """
        proxy = Proxy(
            self,
            {"connect_timeout": 1.0, "backend_failures": 3, "backend_retry": 30},
            {"a": fullBacklog(self)},
            {"@a.test": "a"},
        )
        started = reactor.seconds()
        waits = []
        for _ in range(8):
            client = yield proxy.connect(self)
            waits.append(exchange(client, transaction([b"x@a.test"]), 5))
            yield task.deferLater(reactor, 0.1, lambda: None)
        results = yield defer.gatherResults(waits)
        self.assertEqual([r[2][:9] for r in results], ["451 4.4.1"] * 8)
        # Each waiting its own timeout, the last would end after 1.7 s.
        self.assertLess(reactor.seconds() - started, 1.45)
        client = yield proxy.connect(self)
        before = reactor.seconds()
        replies = yield exchange(client, transaction([b"x@a.test"]), 5)
        self.assertTrue(replies[2].startswith("451 4.4.1"), replies[2])
        self.assertLess(reactor.seconds() - before, 0.3)
        # The attempts that failed early still run to their own timeout.
        yield task.deferLater(reactor, 1.0, lambda: None)


class OwnListenerTests(unittest.TestCase):
    """
    A backend that is the proxy's own listener would loop every message.
    """

    def test_sameTcpAddress(self):
        """
        The listening host and port.
        """
        e = self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            "config: {socket: [127.0.0.1, 2400]}\nbackends: {a: {host: 127.0.0.1, port: 2400}}",
        )
        self.assertIn("backends.a", str(e))
        self.assertIn("own listener", str(e))

    def test_wildcardListener(self):
        """
        A wildcard listener also serves loopback.
        """
        self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            "config: {socket: ['', 2400]}\nbackends: {a: {host: localhost, port: 2400}}",
        )

    def test_sameUnixSocket(self):
        """
        The listening unix socket.
        """
        self.assertRaises(
            configuration.ConfigError,
            configuration.parse,
            "config: {socket: /run/p.sock}\nbackends: {a: {socket: /run/p.sock}}",
        )

    def test_otherPortAccepted(self):
        """
        Another port on the same host is another server.
        """
        configuration.parse(
            "config: {socket: [127.0.0.1, 2400]}\nbackends: {a: {host: 127.0.0.1, port: 2401}}"
        )

    def test_check(self):
        """
        C{lmtp-proxy check} refuses it, exit status 1.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("config: {socket: [127.0.0.1, 2400]}\nbackends: {a: {host: 127.0.0.1, port: 2400}}\n")
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            status = main(["check", "-c", path])
        self.assertEqual(status, 1)
        self.assertIn("own listener", err.getvalue())
