"""
Tests for L{lmtp_proxy.pool}: which connection a transaction gets, and when
an idle one is let go.
"""

import yaml
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.clientid import ClientIdentity
from lmtp_proxy.pool import EXCESS_IDLE, BackendPool


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
        self.xclientFor = None

    @property
    def usable(self):
        return not self.transport.closed

    def sendLine(self, line):
        self.lines.append(line)


def configured(idle=10, size=2):
    return configuration.parse(
        yaml.safe_dump(
            {
                "config": {"socket": "/s", "pool_size": size, "pool_idle_timeout": idle},
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
        The idle connection whose XCLIENT named the C{prefer} session is
        handed out before one released after it; the others keep their
        order.
        """
        session = object()
        first, second = self.releaseAll(2, told=session)
        preferred = self.pool.acquire(self.backend, self.config, session)
        self.assertEqual(self.successResultOf(preferred), (first, True))
        self.assertEqual(self.acquire(), (second, True))

    def test_nonePreferred(self):
        """
        When no idle connection had XCLIENT for the C{prefer} session, the
        one released last is handed out.
        """
        first, second = self.releaseAll(2, told=object())
        preferred = self.pool.acquire(self.backend, self.config, object())
        self.assertEqual(self.successResultOf(preferred), (second, True))

    def test_unusablePreferredSkipped(self):
        """
        A preferred connection that the backend closed meanwhile is dropped
        and another is handed out.
        """
        session = object()
        first, second = self.releaseAll(2, told=session)
        first.transport.closed = True
        preferred = self.pool.acquire(self.backend, self.config, session)
        self.assertEqual(self.successResultOf(preferred), (second, True))
        self.assertFalse(self.acquire()[1])

    def test_preferredTakenByAnotherNotHandedOutAgain(self):
        """
        A connection that had a session's XCLIENT, handed out meanwhile to a
        transaction that preferred nothing, is in use: the session that
        prefers it gets another.
        """
        session = object()
        (told,) = self.releaseAll(1, told=session)
        self.assertEqual(self.acquire(), (told, True))
        preferred = self.pool.acquire(self.backend, self.config, session)
        client, reused = self.successResultOf(preferred)
        self.assertIsNot(client, told)
        self.assertFalse(reused)

    def test_expiredPreferredNotHandedOut(self):
        """
        A connection that had a session's XCLIENT and got QUIT when its idle
        time was over is not handed out to that session.
        """
        session = object()
        (told,) = self.releaseAll(1, told=session)
        self.clock.advance(10)
        self.assertEqual(told.lines, [b"QUIT"])
        preferred = self.pool.acquire(self.backend, self.config, session)
        self.assertFalse(self.successResultOf(preferred)[1])

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

    def releaseAll(self, count, told=None):
        """
        Acquire C{count} connections at once, then release them in order:
        the first after an XCLIENT for the client session C{told}, if one
        is given, the others after XCLIENTs for other sessions.
        """
        clients = [self.acquire()[0] for _ in range(count)]
        if told is not None:
            for client, session in zip(clients, [told] + [object() for _ in clients[1:]]):
                client.xclientFor = ClientIdentity(session=session)
        for client in clients:
            self.pool.release(self.backend, client, self.config)
        return clients

    def test_excessKeptBriefly(self):
        """
        A connection released while C{pool_size} others are idle is kept
        L{EXCESS_IDLE} seconds, not C{pool_idle_timeout}; those within
        C{pool_size} stay.
        """
        first, second, third = self.releaseAll(3)
        self.clock.advance(EXCESS_IDLE)
        self.assertEqual(
            [c.lines for c in (first, second, third)], [[], [], [b"QUIT"]]
        )
        self.clock.advance(10 - EXCESS_IDLE)
        self.assertEqual(
            [c.lines for c in (first, second, third)], [[b"QUIT"], [b"QUIT"], [b"QUIT"]]
        )

    def test_excessReusedWithinItsTime(self):
        """
        A connection kept beyond C{pool_size} serves the next transaction,
        without a new connection.
        """
        first, second, third = self.releaseAll(3)
        self.clock.advance(EXCESS_IDLE / 2)
        self.assertEqual(self.acquire(), (third, True))
        self.assertEqual(len(self.made), 3)

    def test_excessAfterALongerTimeout(self):
        """
        A connection kept for C{pool_idle_timeout} before, released again
        as excess, goes after L{EXCESS_IDLE} seconds: its earlier timer does
        not keep it longer.
        """
        first, second = self.releaseAll(2)
        self.assertEqual(self.acquire(), (second, True))
        self.assertEqual(self.acquire(), (first, True))
        self.pool.release(self.backend, self.acquire()[0], self.config)
        self.pool.release(self.backend, second, self.config)
        self.pool.release(self.backend, first, self.config)
        self.clock.advance(EXCESS_IDLE)
        self.assertEqual((first.lines, first.usable), ([b"QUIT"], False))
        self.assertEqual(second.lines, [])

    def test_excessStaysWhenTheOthersWent(self):
        """
        A connection released as excess, of which an elder idle connection
        was used and closed meanwhile, is one of the C{pool_size} that stay:
        it is kept C{pool_idle_timeout}.
        """
        session = object()
        first, second, third = self.releaseAll(3, told=session)
        taken = self.pool.acquire(self.backend, self.config, session)
        self.assertEqual(self.successResultOf(taken), (first, True))
        first.transport.closed = True
        self.clock.advance(EXCESS_IDLE)
        self.assertEqual((second.lines, third.lines), ([], []))
        self.clock.advance(10 - EXCESS_IDLE)
        self.assertEqual((second.lines, third.lines), ([b"QUIT"], [b"QUIT"]))

    def test_noPoolNoExcess(self):
        """
        With C{pool_size} 0 a released connection gets QUIT at once.
        """
        self.config = configured(size=0)
        client = self.acquire()[0]
        self.pool.release(self.backend, client, self.config)
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

    def test_closedByCloseIdleNotPreferred(self):
        """
        After C{closeIdle}, a connection it closed is not handed out to the
        session whose XCLIENT it had; one released since is.
        """
        session = object()
        (told,) = self.releaseAll(1, told=session)
        self.pool.closeIdle()
        (later,) = self.releaseAll(1)
        preferred = self.pool.acquire(self.backend, self.config, session)
        self.assertEqual(self.successResultOf(preferred), (later, True))
