"""
Tests for L{lmtp_proxy.pool}: which connection a transaction gets, and when
an idle one is let go.
"""

import yaml
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.pool import BackendPool


class _Transport:
    def __init__(self):
        self.closed = False

    def loseConnection(self):
        self.closed = True


class _Client:
    """
    What the pool needs of an L{lmtp_proxy.client.LMTPClient}.
    """

    def __init__(self):
        self.transport = _Transport()
        self.lines = []

    @property
    def usable(self):
        return not self.transport.closed

    def sendLine(self, line):
        self.lines.append(line)


def configured(idle=10):
    return configuration.parse(
        yaml.safe_dump(
            {
                "config": {"socket": "/s", "pool_size": 2, "pool_idle_timeout": idle},
                "backends": {"a": {"host": "127.0.0.1", "port": 24}},
                "users": {},
            }
        ),
        "<test>",
    )


class PoolTests(unittest.TestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.made = []

        def connect(reactor, backend, hostname, connectTimeout, commandTimeout, outbox):
            client = _Client()
            self.made.append(client)
            return defer.succeed(client)

        self.pool = BackendPool(self.clock, connect)
        self.config = configured()
        self.backend = self.config.backends["a"]

    def acquire(self):
        return self.successResultOf(self.pool.acquire(self.backend, self.config))

    def test_releasedDuringAReadKeptWhenItEnds(self):
        """
        A connection released while the outbox is held (its last reply is
        being read) joins the pool when that read is over, not before.
        """
        client, reused = self.acquire()
        self.pool.outbox.hold()
        self.pool.release(self.backend, client, self.config)
        self.assertFalse(self.acquire()[1])
        self.pool.outbox.release()
        self.assertEqual(self.acquire(), (client, True))

    def releaseBoth(self):
        """
        Two connections, released in the order made.
        """
        first, _ = self.acquire()
        second, _ = self.acquire()
        self.pool.release(self.backend, first, self.config)
        self.pool.release(self.backend, second, self.config)
        return first, second

    def test_lastReleasedFirst(self):
        """
        Without a preference, the connection released last is handed out
        first.
        """
        first, second = self.releaseBoth()
        self.assertEqual(self.acquire(), (second, True))
        self.assertEqual(self.acquire(), (first, True))

    def test_preferredFirst(self):
        """
        An idle connection that C{prefer} holds true for is handed out
        before one released after it; the others keep their order.
        """
        first, second = self.releaseBoth()
        preferred = self.pool.acquire(self.backend, self.config, lambda c: c is first)
        self.assertEqual(self.successResultOf(preferred), (first, True))
        self.assertEqual(self.acquire(), (second, True))

    def test_nonePreferred(self):
        """
        When C{prefer} holds true for no idle connection, the one released
        last is handed out.
        """
        first, second = self.releaseBoth()
        preferred = self.pool.acquire(self.backend, self.config, lambda c: False)
        self.assertEqual(self.successResultOf(preferred), (second, True))

    def test_unusablePreferredSkipped(self):
        """
        A preferred connection that the backend closed meanwhile is dropped
        and another is handed out.
        """
        first, second = self.releaseBoth()
        first.transport.closed = True
        preferred = self.pool.acquire(self.backend, self.config, lambda c: c is first)
        self.assertEqual(self.successResultOf(preferred), (second, True))
        self.assertFalse(self.acquire()[1])

    def test_idleTimeoutCountsFromTheLastRelease(self):
        """
        A connection used again before its idle timeout expires gets QUIT
        pool_idle_timeout after it was last released, not after the first.
        """
        client, _ = self.acquire()
        self.pool.release(self.backend, client, self.config)
        self.clock.advance(6)
        self.assertEqual(self.acquire(), (client, True))
        self.pool.release(self.backend, client, self.config)
        self.clock.advance(5)
        self.assertEqual((client.lines, client.usable), ([], True))
        self.clock.advance(5)
        self.assertEqual((client.lines, client.usable), ([b"QUIT"], False))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_inUseWhenTheTimerFires(self):
        """
        A connection in use when its idle timer fires is not touched, and
        gets a new timer when it is released.
        """
        client, _ = self.acquire()
        self.pool.release(self.backend, client, self.config)
        self.acquire()
        self.clock.advance(10)
        self.assertEqual((client.lines, client.usable), ([], True))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pool.release(self.backend, client, self.config)
        self.clock.advance(10)
        self.assertEqual(client.lines, [b"QUIT"])

    def test_closeIdleLeavesNoTimer(self):
        """
        C{closeIdle} says QUIT to idle connections and leaves no timer
        running, not even that of a connection in use.
        """
        first, _ = self.acquire()
        second, _ = self.acquire()
        self.pool.release(self.backend, first, self.config)
        self.pool.release(self.backend, second, self.config)
        self.assertEqual(self.acquire(), (second, True))
        self.pool.closeIdle()
        self.assertEqual((first.lines, second.lines), ([b"QUIT"], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])
