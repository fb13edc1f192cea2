"""
Tests for L{lmtp_proxy.twisted_internals}: each fails first when Twisted
changes a private name the item relies on. (The direct send is tested by
L{tests.test_outbox.SendNowTests}.)
"""

import errno
import os
import re
import socket
import stat
import threading
import time
from io import BytesIO, StringIO, TextIOWrapper
from types import SimpleNamespace

from twisted.internet import defer, main, protocol, reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.logger import _file as loggerFile
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial import unittest

from lmtp_proxy.outbox import Outbox
from lmtp_proxy.twisted_internals import (
    TextLogLines,
    _PlainLines,
    _TimestampsBySecond,
    adoptSharedUNIXPort,
    cacheLogTimestamps,
    discardLineBuffer,
    dispatchEventsLightly,
    formatPlainLogLines,
    listenUNIXQuietly,
)
from tests.support import WriteRecorder, liveSocket, unixPath


class _Accepted(protocol.Factory):
    """
    Records the connections it is offered, and refuses them.
    """

    def __init__(self):
        self.offered = defer.Deferred()

    def buildProtocol(self, addr):
        if not self.offered.called:
            self.offered.callback(addr)
        return None


def connect(testcase, path):
    """
    Connect to the unix socket C{path}; closed at cleanup.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    testcase.addCleanup(client.close)
    client.settimeout(5)
    client.connect(path)
    return client


class SharedUNIXPortTests(unittest.TestCase):
    """
    L{adoptSharedUNIXPort} serves another process's unix listening socket and
    leaves it to that process.
    """

    @defer.inlineCallbacks
    def test_servesWithoutChmod(self):
        """
        The adopted socket accepts connections and its file is not changed:
        after twistd dropped privileges a worker may not own it, and a chmod
        would fail.
        """
        path = unixPath(self)
        listening = liveSocket(self, path)
        os.chmod(path, 0o640)

        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "chmod", refuse)
        factory = _Accepted()
        port = adoptSharedUNIXPort(reactor, listening.fileno(), factory)
        self.addCleanup(port.stopListening)
        connect(self, path)
        yield factory.offered
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    @defer.inlineCallbacks
    def test_stopLeavesSocketToItsOwner(self):
        """
        Once the adopted port stops, the socket file is still there and the
        owner's socket still accepts: Twisted neither removed the file nor
        shut the shared socket down.
        """
        path = unixPath(self)
        listening = liveSocket(self, path)
        port = adoptSharedUNIXPort(reactor, listening.fileno(), _Accepted())
        yield port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))
        connect(self, path)
        listening.settimeout(5)
        accepted, _ = listening.accept()
        accepted.close()


class QuietUNIXPortTests(unittest.TestCase):
    """
    L{listenUNIXQuietly} listens like C{listenUNIX} but logs no raw socket
    name.
    """

    @defer.inlineCallbacks
    def test_abstractNameNotLogged(self):
        """
        Closing a port on an abstract name (which begins with NUL) puts no
        NUL byte into the log.
        """
        lines = []
        observer = lambda event: lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        address = "\0lmtp-proxy-test:%d:quiet" % (os.getpid(),)
        port = listenUNIXQuietly(reactor, address, _Accepted(), 0o600)
        yield port.stopListening()
        self.assertTrue(lines, "nothing was logged")
        self.assertEqual([line for line in lines if "\0" in line], [])

    @defer.inlineCallbacks
    def test_pathGetsModeAndIsRemoved(self):
        """
        A socket at a path gets the mode asked for, accepts connections, and
        its file is removed when the port stops.
        """
        path = unixPath(self)
        factory = _Accepted()
        port = listenUNIXQuietly(reactor, path, factory, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        connect(self, path)
        yield factory.offered
        yield port.stopListening()
        self.assertFalse(os.path.lexists(path))


class _HeaderRecorder(protocol.Protocol):
    """
    Records what a L{ProxyHeaderWrapper} tells it, in order.
    """

    def __init__(self):
        self.events = []
        self.onHeader = None

    def proxyHeaderReceived(self):
        self.events.append(("header", self.transport.getPeer().host))
        if self.onHeader is not None:
            self.onHeader()

    def dataReceived(self, data):
        self.events.append(("data", data))


class ProxyHeaderTests(unittest.TestCase):
    """
    L{ProxyHeaderWrapper} relies on Twisted's private PROXY header parser
    and wrapper (see L{lmtp_proxy.twisted_internals}).
    """

    def connect(self):
        from lmtp_proxy.twisted_internals import ProxyHeaderWrapper, proxyHeaderFactory

        recorder = _HeaderRecorder()
        wrapper = ProxyHeaderWrapper(proxyHeaderFactory(protocol.Factory()), recorder)
        transport = StringTransport()
        transport.protocol = wrapper
        wrapper.makeConnection(transport)
        return wrapper, recorder, transport

    def test_headerBeforeTheDataAfterIt(self):
        """
        The wrapped protocol hears of the header (and sees the address it
        carries) before the bytes that followed it in the same read.
        """
        wrapper, recorder, _ = self.connect()
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.5 127.0.0.1 4000 24\r\nLHLO x\r\n")
        self.assertEqual(recorder.events, [("header", "192.0.2.5"), ("data", b"LHLO x\r\n")])

    def test_dataAfterHeaderGoesToTheNewProtocol(self):
        """
        When the wrapped protocol puts a TLS layer in front of the wrapper
        as it hears of the header, the bytes after the header go to that
        layer.
        """
        wrapper, recorder, transport = self.connect()
        layer = _HeaderRecorder()
        recorder.onHeader = lambda: setattr(transport, "protocol", layer)
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.5 127.0.0.1 4000 24\r\n\x16\x03\x01")
        self.assertEqual(layer.events, [("data", b"\x16\x03\x01")])
        self.assertEqual(recorder.events, [("header", "192.0.2.5")])


class LineBufferTests(unittest.TestCase):
    """
    L{discardLineBuffer} drops the part of a line a C{LineOnlyReceiver} is
    holding.
    """

    def test_partialLineDropped(self):
        """
        After L{discardLineBuffer}, the bytes of an unfinished line are gone:
        the next input starts a new line.
        """
        lines = []

        class Receiver(LineOnlyReceiver):
            def lineReceived(self, line):
                lines.append(line)

        receiver = Receiver()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(b"one\r\nin clear, unfinished")
        discardLineBuffer(receiver)
        receiver.dataReceived(b"two\r\n")
        self.assertEqual(lines, [b"one", b"two"])


class _Readable:
    """
    One end of a socket pair, as a reactor's reader: logs a legacy event
    for each read, and can fail in the ways a selectable can.
    """

    def __init__(self, testcase, name, prefix=None, onRead=None, why=None, onLost=None):
        self.socket, self.peer = socket.socketpair()
        testcase.addCleanup(self.socket.close)
        testcase.addCleanup(self.peer.close)
        self.name = name
        self.prefix = name if prefix is None else prefix
        self.onRead = onRead
        self.why = why
        self.onLost = onLost

    def fileno(self):
        return self.socket.fileno()

    def logPrefix(self):
        if isinstance(self.prefix, BaseException):
            raise self.prefix
        return self.prefix

    def doRead(self):
        self.socket.recv(100)
        log.msg("read " + self.name)
        if self.onRead is not None:
            self.onRead()
        return self.why

    def connectionLost(self, reason):
        log.msg("lost " + self.name)
        if self.onLost is not None:
            raise self.onLost


class _RecordingPoller:
    """
    A poller that records its arguments and has nothing ready, or fails
    with C{error}.
    """

    def __init__(self, error=None):
        self.error = error
        self.calls = []

    def poll(self, timeout, maxevents):
        self.calls.append((timeout, maxevents))
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        return []


def _seen(event):
    """
    What of a legacy log event the dispatch decides.
    """
    failure = event.get("failure")
    return (
        event.get("system"),
        event.get("message"),
        event.get("isError"),
        event.get("extra"),
        event.get("changed"),
        None if failure is None else type(failure.value).__name__,
    )


class LightDispatchTests(unittest.TestCase):
    """
    L{dispatchEventsLightly} makes an epoll reactor dispatch events without
    C{log.callWithLogger}, with what Twisted's own dispatch logs, raises
    and leaves in the log context: each case runs through both.
    """

    def epollReactor(self, light, poller=None, outbox=None):
        """
        A new epoll reactor, not installed: Twisted's dispatch, or the
        light one (holding C{outbox} for each turn).
        """
        dispatching = EPollReactor()
        self.addCleanup(dispatching.waker.connectionLost, None)
        self.addCleanup(dispatching._poller.close)
        if poller is not None:
            dispatching._poller = poller
        if light:
            self.assertTrue(dispatchEventsLightly(dispatching, outbox))
        return dispatching

    def dispatch(self, light, readers):
        """
        One turn of a new epoll reactor, inside an outer log context, with
        the readers C{readers(reactor)} makes each holding a byte.

        @return: the legacy events logged (sorted: readers ready at once
            come in any order), the name of the exception that escaped,
            the change in the depth of the context stack and the log
            context afterwards.
        """
        events = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        dispatching = self.epollReactor(light)
        stack = context.theContextTracker.currentContext().contexts
        depth = len(stack)
        escaped = None
        for reader in readers(dispatching):
            dispatching.addReader(reader)
            self.addCleanup(dispatching.removeReader, reader)
            reader.peer.send(b"x")
        try:
            log.callWithContext({"system": "outer", "extra": 1}, dispatching.doIteration, None)
        except BaseException as e:
            escaped = type(e).__name__
        log.removeObserver(events.append)
        return (
            sorted(map(_seen, events), key=repr),
            escaped,
            len(stack) - depth,
            dict(context.get(log.ILogContext)),
        )

    def assertSameAsTwisted(self, readers, *errors):
        """
        C{readers} dispatched lightly gives what Twisted's dispatch gives;
        the errors of the types C{errors} that both logged are flushed.
        """
        twisted = self.dispatch(False, readers)
        light = self.dispatch(True, readers)
        if errors:
            self.flushLoggedErrors(*errors)
        self.assertEqual(light, twisted)
        return light

    def test_withoutCallWithLogger(self):
        """
        An event is handled without C{log.callWithLogger}, which Twisted's
        own dispatch calls for every one.
        """
        calls = []
        self.patch(log, "callWithLogger", lambda *a, **kw: calls.append(a))
        events, escaped, depth, after = self.dispatch(True, lambda r: [_Readable(self, "a")])
        self.assertEqual(([event[1] for event in events], calls), ([("read a",)], []))

    def test_otherReactorsLeftAlone(self):
        """
        A reactor that is not the epoll reactor keeps its own dispatch.
        """
        other = MemoryReactorClock()
        self.assertFalse(dispatchEventsLightly(other))
        self.assertNotIn("doIteration", vars(other))

    def test_eventsOfOneTurn(self):
        """
        Every reader ready in one turn is handled, each with its
        C{logPrefix} as C{system} and the outer context's other items, and
        the context is as before once the turn is over.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [_Readable(self, "a"), _Readable(self, "b")]
        )
        self.assertEqual(
            [event[:4] for event in events],
            [("a", ("read a",), 0, 1), ("b", ("read b",), 0, 1)],
        )
        self.assertEqual((escaped, depth, after), (None, 0, {"system": "-"}))

    def test_readerRemovedInTheSameTurn(self):
        """
        A reader that an earlier event of the same turn removed is not
        handled.
        """

        def readers(dispatching):
            second = _Readable(self, "b")
            # Ready first (its byte is sent first), so handled first.
            first = _Readable(self, "a", onRead=lambda: dispatching.removeReader(second))
            return [first, second]

        events, escaped, depth, after = self.assertSameAsTwisted(readers)
        self.assertEqual([event[1] for event in events], [("read a",)])

    def test_buggyLogPrefix(self):
        """
        A C{logPrefix} that raises is logged, and the event is handled
        under the name Twisted gives such a selectable.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [_Readable(self, "a", prefix=ValueError("prefix"))], ValueError
        )
        self.assertIn(("(buggy logPrefix method)", ("read a",), 0, 1, None, None), events)

    def test_errorEscapingTheHandling(self):
        """
        An exception raised while a selectable is disconnected is logged
        with the selectable's C{system}, and the turn goes on.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [
                _Readable(self, "a", why=main.CONNECTION_DONE, onLost=ZeroDivisionError()),
                _Readable(self, "b"),
            ],
            ZeroDivisionError,
        )
        self.assertIn(("a", (), 1, 1, None, "ZeroDivisionError"), events)
        self.assertEqual((escaped, depth), (None, 0))

    def test_errorAfterTheHandlerChangedItsContext(self):
        """
        An exception that escapes is logged in the context around the
        event, not in the one the handler changed.
        """

        def change():
            context.get(log.ILogContext)["changed"] = True

        self.assertSameAsTwisted(
            lambda r: [
                _Readable(
                    self, "a", onRead=change, why=main.CONNECTION_DONE, onLost=ZeroDivisionError()
                )
            ],
            ZeroDivisionError,
        )

    def test_systemExitLogged(self):
        """
        A C{SystemExit} raised by a handler is logged, as any other error.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [_Readable(self, "a", why=main.CONNECTION_DONE, onLost=SystemExit(2))],
            SystemExit,
        )
        self.assertIsNone(escaped)

    def test_keyboardInterruptRaised(self):
        """
        A C{KeyboardInterrupt} raised by a handler stops the turn, and the
        context is as before.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [
                _Readable(self, "a", why=main.CONNECTION_DONE, onLost=KeyboardInterrupt())
            ]
        )
        self.assertEqual((escaped, depth, after), ("KeyboardInterrupt", 0, {"system": "-"}))

    def test_nestedContext(self):
        """
        A context a handler opens inside the event's holds for what is
        logged in it.
        """
        events, escaped, depth, after = self.assertSameAsTwisted(
            lambda r: [
                _Readable(
                    self,
                    "a",
                    onRead=lambda: log.callWithContext({"system": "inner"}, log.msg, "nested"),
                )
            ]
        )
        self.assertIn(("inner", ("nested",), 0, 1, None, None), events)

    def turn(self, outbox, readers):
        """
        One light turn holding C{outbox}, with the readers C{readers(reactor)}
        makes each holding a byte.
        """
        dispatching = self.epollReactor(True, outbox=outbox)
        for reader in readers(dispatching):
            dispatching.addReader(reader)
            self.addCleanup(dispatching.removeReader, reader)
            reader.peer.send(b"x")
        dispatching.doIteration(None)

    def test_turnHoldsTheOutbox(self):
        """
        Given an outbox, the writes made while the events of one turn are
        handled wait until the last is handled, and leave joined.
        """
        outbox, transport = Outbox(), WriteRecorder()
        seen = []

        def write(data):
            outbox.hold()
            outbox.write(transport, data)
            outbox.release()
            seen.append(transport.value())

        self.turn(
            outbox,
            lambda r: [
                _Readable(self, "a", onRead=lambda: write(b"a")),
                _Readable(self, "b", onRead=lambda: write(b"b")),
            ],
        )
        self.assertEqual((seen, len(transport.writes)), ([b"", b""], 1))
        self.assertEqual(sorted(transport.value()), sorted(b"ab"))

    def test_turnOfOneEventHoldsNothing(self):
        """
        A turn that found one event does not hold the outbox: a write made
        outside the event's own hold leaves at once.
        """
        outbox, transport = Outbox(), WriteRecorder()
        seen = []

        def write():
            outbox.write(transport, b"a")
            seen.append(transport.value())

        self.turn(outbox, lambda r: [_Readable(self, "a", onRead=write)])
        self.assertEqual(seen, [b"a"])

    def test_turnReleasedAfterKeyboardInterrupt(self):
        """
        A C{KeyboardInterrupt} that stops a turn still ends the outbox's
        hold: what was written leaves, and later writes go at once.
        """
        outbox, transport = Outbox(), WriteRecorder()
        self.assertRaises(
            KeyboardInterrupt,
            self.turn,
            outbox,
            lambda r: [
                _Readable(self, "a", onRead=lambda: outbox.write(transport, b"a")),
                _Readable(self, "b", why=main.CONNECTION_DONE, onLost=KeyboardInterrupt()),
            ],
        )
        outbox.write(transport, b"b")
        self.assertEqual(transport.writes, [b"a", b"b"])

    def test_failedSendAtTheEndOfATurnLogged(self):
        """
        A write that raises when the turn's writes leave is logged, and the
        reactor's loop goes on.
        """

        class Broken(WriteRecorder):
            def write(self, data):
                raise RuntimeError("broken")

        outbox = Outbox()
        self.turn(
            outbox,
            lambda r: [
                _Readable(self, "a", onRead=lambda: outbox.write(Broken(), b"a")),
                _Readable(self, "b"),
            ],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        transport = WriteRecorder()
        outbox.write(transport, b"b")
        self.assertEqual(transport.writes, [b"b"])

    def pollCalls(self, light, timeout, error=None):
        poller = _RecordingPoller(error)
        dispatching = self.epollReactor(light, poller)
        dispatching.doIteration(timeout)
        return poller.calls

    def test_pollArguments(self):
        """
        The poller is asked as by Twisted's dispatch: no timeout waits for
        ever (C{-1}), and as many events as there are selectables.
        """
        for timeout in (None, 0, 0.25):
            self.assertEqual(self.pollCalls(True, timeout), self.pollCalls(False, timeout))

    def test_interruptedPollReturns(self):
        """
        A poll interrupted by a signal returns to the reactor's loop.
        """
        self.assertEqual(len(self.pollCalls(True, 0, errno.EINTR)), 1)

    def test_failedPollRaises(self):
        """
        Any other error of the poll is raised, as by Twisted's dispatch.
        """
        error = self.assertRaises(OSError, self.pollCalls, True, 0, errno.EBADF)
        self.assertEqual(error.errno, errno.EBADF)


# A zone with summer time, spelt out so that no tzdata is needed: central
# Europe, whose clocks went forward at 2026-03-29 01:00:00 UTC.
_SUMMER_TIME_ZONE = "CET-1CEST,M3.5.0,M10.5.0/3"
_CLOCKS_FORWARD = 1774746000


def _observerLines(events):
    """
    What twistd's text log observer writes for C{events}.
    """
    written = StringIO()
    observer = textFileLogObserver(written)
    for event in events:
        observer(event)
    return written.getvalue()


class _InFrontOfTwistedMixin:
    """
    The tests every replacement of a function that twistd's text log
    observer calls shares: C{install} puts it in the place of the name
    C{name} of C{twisted.logger._file}, in front of Twisted's C{original},
    which it keeps under the same name.
    """

    def test_installedOnce(self):
        """
        Installing twice keeps one replacement in front of Twisted's own
        function.
        """
        self.assertTrue(self.install())
        installed = getattr(loggerFile, self.name)
        self.assertTrue(self.install())
        self.assertIs(getattr(loggerFile, self.name), installed)
        self.assertIs(getattr(installed, self.name), self.original)

    def test_changedTwistedLeftAlone(self):
        """
        When the observer's module no longer names Twisted's own function,
        nothing is replaced.
        """
        other = lambda *args, **kwargs: None  # noqa: E731
        self.patch(loggerFile, self.name, other)
        self.assertFalse(self.install())
        self.assertIs(getattr(loggerFile, self.name), other)


class LogTimestampTests(_InFrontOfTwistedMixin, unittest.TestCase):
    """
    L{cacheLogTimestamps} has twistd's text log observer format each
    second's timestamp once, with the text of Twisted's C{formatTime}.
    """

    name = "formatTime"
    original = staticmethod(formatTime)
    install = staticmethod(cacheLogTimestamps)

    def setUp(self):
        # Restored after each test, whatever a test installs.
        self.patch(loggerFile, "formatTime", formatTime)
        self.inZone(_SUMMER_TIME_ZONE)

    def inZone(self, zone):
        before = os.environ.get("TZ")

        def restore():
            if before is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = before
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = zone
        time.tzset()

    def counted(self):
        """
        A L{_TimestampsBySecond} and the list of the times its
        C{formatTime} was called for.
        """
        calls = []

        def counting(when, timeFormat=timeFormatRFC3339, default="-"):
            calls.append(when)
            return formatTime(when, timeFormat, default)

        return _TimestampsBySecond(counting), calls

    def test_sameTextAsTwisted(self):
        """
        Times in order, across seconds, back in time, before the epoch and
        across a change to summer time, get the text Twisted's
        C{formatTime} gives each of them.
        """
        cached = _TimestampsBySecond(formatTime)
        times = []
        for start in (_CLOCKS_FORWARD - 3, -2):
            times += [start + step / 8 for step in range(48)]
        times += [_CLOCKS_FORWARD + 0.5, _CLOCKS_FORWARD - 0.5, -1.0, -0.5, 0, 1]
        self.assertNotEqual(formatTime(_CLOCKS_FORWARD - 1)[-5:], formatTime(_CLOCKS_FORWARD)[-5:])
        self.assertEqual([cached(when) for when in times], [formatTime(when) for when in times])

    def test_formattedOncePerSecond(self):
        """
        Lines within one second are formatted once; the next second is
        formatted again.
        """
        cached, calls = self.counted()
        for when in (100.0, 100.25, 100.75, 101.5, 101.9):
            cached(when)
        self.assertEqual(calls, [100.0, 101.5])

    def test_roundedUpTimeFormattedAfresh(self):
        """
        A time within half a microsecond of the next second, which
        C{formatTime} shows as the next second, is formatted on its own
        and leaves the remembered second as it was.
        """
        cached, calls = self.counted()
        cached(100.5)
        self.assertEqual(cached(100.9999997), formatTime(100.9999997))
        self.assertEqual(cached(100.9999997)[:19], formatTime(101)[:19])
        self.assertEqual(cached(100.25), formatTime(100.25))
        self.assertEqual(calls, [100.5, 100.9999997, 100.9999997])

    def test_fractionsFormattedEachTime(self):
        """
        A format that shows fractions of a second is formatted for every
        line.
        """
        cached, calls = self.counted()
        fine = "%H:%M:%S.%f"
        self.assertEqual(
            [cached(100.25, fine), cached(100.5, fine)],
            [formatTime(100.25, fine), formatTime(100.5, fine)],
        )
        self.assertEqual(len(calls), 2)

    def test_eachFormatItsOwnText(self):
        """
        Two formats used in turn within one second each get their own text.
        """
        cached = _TimestampsBySecond(formatTime)
        short = "%H:%M:%S"
        self.assertEqual(
            [cached(100.25), cached(100.5, short), cached(100.75)],
            [formatTime(100.25), formatTime(100.5, short), formatTime(100.75)],
        )

    def test_noTime(self):
        """
        No time, no format, or a time that is not a number gets what
        C{formatTime} gives it.
        """
        cached = _TimestampsBySecond(formatTime)
        self.assertEqual(cached(None), "-")
        self.assertEqual(cached(None, default="?"), "?")
        self.assertEqual(cached(100.5, None, "?"), "?")
        self.assertRaises(ValueError, cached, float("nan"))

    def test_observerLinesUnchanged(self):
        """
        Once installed, twistd's text observer writes the lines it wrote
        with Twisted's own C{formatTime}.
        """
        events = [
            dict(
                log_format="{outcome}",
                outcome="line %d" % (n,),
                log_namespace="lmtp_proxy.delivery.Delivery",
                log_level=LogLevel.info,
                log_time=_CLOCKS_FORWARD - 1 + n / 2,
            )
            for n in range(4)
        ]
        self.assertTrue(cacheLogTimestamps())
        self.assertIsInstance(loggerFile.formatTime, _TimestampsBySecond)
        self.assertEqual(
            _observerLines(events), "".join(formatEventAsClassicLogText(event) for event in events)
        )


class _Text(str):
    """
    Text of a type of its own, which Twisted formats by its C{__format__}.
    """

    def __format__(self, spec):
        return "formatted " + self


class PlainLogLineTests(_InFrontOfTwistedMixin, unittest.TestCase):
    """
    L{formatPlainLogLines} has twistd's text log observer write an event
    whose text needs no formatting without Twisted's formatter, in the line
    Twisted would write.
    """

    name = "formatEventAsClassicLogText"
    original = staticmethod(formatEventAsClassicLogText)
    install = staticmethod(formatPlainLogLines)

    def setUp(self):
        # Restored after each test, whatever a test installs.
        self.patch(loggerFile, "formatEventAsClassicLogText", formatEventAsClassicLogText)

    def outcome(self, **extra):
        """
        An event logged as each recipient's outcome line is.
        """
        event = dict(
            log_format="{outcome}",
            outcome="1A2B3C: to=<a{b}c@example.test>, status=sent (250 2.0.0 Ok)",
            txid="1A2B3C",
            log_namespace="lmtp_proxy.delivery.Delivery",
            log_level=LogLevel.info,
            log_time=_CLOCKS_FORWARD - 0.5,
        )
        event.update(extra)
        return event

    def counted(self):
        """
        A L{_PlainLines} and the list of the events it passed to Twisted's
        formatter.
        """
        passed = []

        def counting(event, formatTime=formatTime):
            passed.append(event)
            return formatEventAsClassicLogText(event, formatTime)

        return _PlainLines(counting), passed

    def test_plainEventsTakeTheShortWay(self):
        """
        An event whose format is one field holding text, or has no field,
        gets the line Twisted's formatter would give it, without that
        formatter.
        """
        events = [
            self.outcome(),
            self.outcome(log_format="Server Shut Down."),
            self.outcome(log_system="worker 1"),
            self.outcome(log_level=None),
            self.outcome(log_time=None),
            self.outcome(outcome="first line\nsecond line"),
            self.outcome(outcome=""),
        ]
        del events[-1]["log_namespace"]
        plain, passed = self.counted()
        self.assertEqual(
            [plain(event) for event in events],
            [formatEventAsClassicLogText(event) for event in events],
        )
        self.assertEqual(passed, [])

    def test_otherEventsFormattedByTwisted(self):
        """
        An event with fields to format, a field that is not text, a
        failure, flattened fields, or a system or level name that is not
        text goes through Twisted's formatter.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        events = [
            self.outcome(log_format="{txid}: {outcome}"),
            self.outcome(log_format="{txid!r}"),
            self.outcome(log_format="{{outcome}}"),
            self.outcome(log_format="{outcome.upper()}", **{"outcome.upper()": "text"}),
            self.outcome(log_format="{missing}"),
            self.outcome(log_format=b"{outcome}"),
            self.outcome(outcome=12),
            self.outcome(outcome=_Text("line")),
            self.outcome(log_failure=failure),
            self.outcome(log_flattened={"outcome!:": "flat"}),
            self.outcome(log_system=7),
            self.outcome(log_level=SimpleNamespace(name=7)),
            self.outcome(log_namespace=None),
        ]
        plain, passed = self.counted()
        self.assertEqual(
            [plain(event) for event in events],
            [formatEventAsClassicLogText(event) for event in events],
        )
        self.assertEqual(passed, events)

    def test_observerLinesUnchanged(self):
        """
        Once installed, twistd's text observer writes the lines it wrote
        with Twisted's own formatter.
        """
        events = [self.outcome(outcome="line %d" % (n,)) for n in range(3)]
        events.append(self.outcome(log_format="{txid}: {outcome}"))
        self.assertTrue(formatPlainLogLines())
        self.assertIsInstance(loggerFile.formatEventAsClassicLogText, _PlainLines)
        self.assertEqual(
            _observerLines(events), "".join(formatEventAsClassicLogText(event) for event in events)
        )


class _LogFile:
    """
    A log file that records each C{write} and C{flush} in C{calls}, which
    it may share with a transport.
    """

    def __init__(self, calls):
        self.calls = calls
        self.fail = False

    def write(self, text):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.calls.append(("write", text))

    def flush(self):
        self.calls.append(("flush",))


class _Transport(StringTransport):
    """
    A transport that records each write in C{calls}, which it shares with
    a L{_LogFile}.
    """

    def __init__(self, calls):
        StringTransport.__init__(self)
        self.calls = calls

    def write(self, data):
        self.calls.append(("send", data))
        StringTransport.write(self, data)


class TextLogLineTests(unittest.TestCase):
    """
    L{TextLogLines} writes a line straight into the file of the only
    observer when that observer would write the same line, the lines of a
    hold of the outbox in one write before the outbox sends, and logs it
    through the logger otherwise.
    """

    when = _CLOCKS_FORWARD - 0.5
    namespace = "lmtp_proxy.delivery.Delivery"

    def setUp(self):
        self.calls = []
        self.file = _LogFile(self.calls)
        self.publisher = LogPublisher()
        self.publisher.addObserver(textFileLogObserver(self.file))
        self.outbox = Outbox()
        self.lines = self.textLines(self.publisher)

    def textLines(self, publisher):
        """
        A L{TextLogLines} for outcome lines, whose logger and own lines
        are published by C{publisher}, at the time L{when}.
        """
        logger = Logger(namespace=self.namespace, observer=publisher)
        return TextLogLines(logger, "outcome", self.outbox, publisher, lambda: self.when)

    def observerLines(self, *texts):
        """
        What twistd's text observer writes for outcome lines C{texts}
        logged at L{when}.
        """
        events = []
        logger = Logger(namespace=self.namespace, observer=events.append)
        for text in texts:
            logger.info("{outcome}", outcome=text)
        for event in events:
            event["log_time"] = self.when
        return _observerLines(events)

    def untimed(self):
        """
        The calls made to the file, each line's timestamp left out: a line
        logged through the logger has the time it was logged.
        """
        return [
            (call[0], re.sub(r"(?m)^\S+ ", "", call[1])) if call[0] == "write" else call
            for call in self.calls
        ]

    def test_theObserversOwnLine(self):
        """
        The line written is the line twistd's text observer writes for the
        logger's event, a text of several lines included.
        """
        written = StringIO()
        publisher = LogPublisher()
        publisher.addObserver(textFileLogObserver(written))
        lines = self.textLines(publisher)
        texts = ["1A2B3C: to=<a{b}c@example.test>, status=sent (250 2.0.0 Ok)", "one\ntwo"]
        for text in texts:
            lines.info(text)
        self.assertEqual(written.getvalue(), self.observerLines(*texts))

    def test_binaryFileGetsEncodedLines(self):
        """
        An observer of a binary file gets the line encoded as it encodes
        its own, in UTF-8.
        """
        written = BytesIO()
        publisher = LogPublisher()
        publisher.addObserver(textFileLogObserver(written))
        self.textLines(publisher).info("to=<j\u00f6rg@example.test>, status=sent")
        self.assertEqual(
            written.getvalue(),
            self.observerLines("to=<j\u00f6rg@example.test>, status=sent").encode("utf-8"),
        )

    def test_linesOutsideAHoldWrittenAtOnce(self):
        """
        A line logged outside a hold is written and flushed at once, one
        write per line.
        """
        self.lines.info("one")
        self.lines.info("two")
        self.assertEqual(
            self.calls,
            [
                ("write", self.observerLines("one")),
                ("flush",),
                ("write", self.observerLines("two")),
                ("flush",),
            ],
        )

    def test_heldLinesWrittenInOneWriteBeforeTheReplies(self):
        """
        The lines logged while the outbox is held are written and flushed
        in one write, in order, when the turn's hold ends, before the
        replies written in the same turn are sent.
        """
        transport = _Transport(self.calls)
        self.outbox.holdTurn()
        self.outbox.hold()
        self.lines.info("to=<a@example.test>, status=sent")
        self.outbox.write(transport, b"250 2.0.0 Ok\r\n")
        self.outbox.release()
        self.lines.info("to=<b@example.test>, status=sent")
        self.outbox.write(transport, b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.calls, [])
        self.outbox.releaseTurn()
        self.assertEqual(
            self.calls,
            [
                (
                    "write",
                    self.observerLines(
                        "to=<a@example.test>, status=sent", "to=<b@example.test>, status=sent"
                    ),
                ),
                ("flush",),
                ("send", b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"),
            ],
        )

    def test_heldLinesWrittenBeforeAFlush(self):
        """
        A reply the outbox sends before its hold ends (the reply to
        STARTTLS) leaves after the lines kept before it.
        """
        transport = _Transport(self.calls)
        self.outbox.hold()
        self.lines.info("to=<a@example.test>, status=sent")
        self.outbox.write(transport, b"220 2.0.0 Ready to start TLS\r\n")
        self.outbox.flush(transport)
        self.assertEqual(
            self.calls,
            [
                ("write", self.observerLines("to=<a@example.test>, status=sent")),
                ("flush",),
                ("send", b"220 2.0.0 Ready to start TLS\r\n"),
            ],
        )
        self.outbox.release()

    def test_failedWriteStillSendsTheReplies(self):
        """
        When the write raises, the failure is logged and the replies held
        behind the lines are still sent.
        """
        transport = _Transport(self.calls)
        self.outbox.hold()
        self.lines.info("to=<a@example.test>, status=sent")
        self.outbox.write(transport, b"250 2.0.0 Ok\r\n")
        self.file.fail = True
        self.outbox.release()
        self.assertEqual(self.calls, [("send", b"250 2.0.0 Ok\r\n")])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_otherObserversGetTheEvent(self):
        """
        With a second observer beside twistd's, both get the logger's
        event: the text observer writes its line itself.
        """
        events = []
        self.publisher.addObserver(events.append)
        self.lines.info("one", rcpt="a@example.test")
        self.assertEqual([(e["outcome"], e["rcpt"]) for e in events], [("one", "a@example.test")])
        self.assertEqual(
            self.untimed(), [("write", "[lmtp_proxy.delivery.Delivery#info] one\n"), ("flush",)]
        )

    def test_observerWritingOtherLinesGetsTheEvent(self):
        """
        An only observer whose lines differ from these (twistd's JSON log,
        a text log with another time format) gets the logger's event, and
        writes it its own way.
        """
        jsonFile, textFile = StringIO(), StringIO()
        for observer in (
            jsonFileLogObserver(jsonFile),
            textFileLogObserver(textFile, timeFormat="%H:%M:%S"),
        ):
            publisher = LogPublisher()
            publisher.addObserver(observer)
            self.textLines(publisher).info("one", rcpt="a@example.test")
        self.assertIn('"rcpt": "a@example.test"', jsonFile.getvalue())
        self.assertRegex(
            textFile.getvalue(), r"^\d\d:\d\d:\d\d \[lmtp_proxy.delivery.Delivery#info\] one\n$"
        )

    def test_emptyTextGetsTheEvent(self):
        """
        An empty line is logged as the logger's event, for which twistd's
        text observer writes nothing.
        """
        self.lines.info("")
        self.assertEqual(self.calls, [])

    def test_keptLinesFirstWhenObserversChange(self):
        """
        Lines kept for twistd's observer are written to it before a line
        logged once another observer has joined it.
        """
        self.outbox.hold()
        self.lines.info("one")
        events = []
        self.publisher.addObserver(events.append)
        self.lines.info("two")
        self.assertEqual(
            self.untimed(),
            [
                ("write", "[lmtp_proxy.delivery.Delivery#info] one\n"),
                ("flush",),
                ("write", "[lmtp_proxy.delivery.Delivery#info] two\n"),
                ("flush",),
            ],
        )
        self.assertEqual([e["outcome"] for e in events], ["two"])
        self.outbox.release()

    def test_laterEventsAfterKeptLines(self):
        """
        An event logged later in the same hold, through twistd's observer
        itself, is written after the outcome lines kept before it.
        """
        self.outbox.hold()
        self.lines.info("to=<a@example.test>, status=sent")
        Logger(namespace="lmtp_proxy.health.BackendHealth", observer=self.publisher).warn(
            "backend b: down"
        )
        self.assertEqual(
            self.untimed(),
            [
                ("write", "[lmtp_proxy.delivery.Delivery#info] to=<a@example.test>, status=sent\n"),
                ("flush",),
                ("write", "[lmtp_proxy.health.BackendHealth#warn] backend b: down\n"),
                ("flush",),
            ],
        )
        self.outbox.release()
        self.assertEqual(len(self.calls), 4)

    def test_otherThreadsEventsDoNotWriteKeptLines(self):
        """
        An event logged from another thread is written as it comes; the
        lines kept by the reactor's thread wait for their hold to end.
        """
        self.outbox.hold()
        self.lines.info("one")
        logger = Logger(namespace="lmtp_proxy.pgsource", observer=self.publisher)
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()
        self.outbox.release()
        self.assertEqual(
            self.untimed(),
            [
                ("write", "[lmtp_proxy.pgsource#info] from a thread\n"),
                ("flush",),
                ("write", "[lmtp_proxy.delivery.Delivery#info] one\n"),
                ("flush",),
            ],
        )

    def test_unencodableLineLostAlone(self):
        """
        On a file whose encoding cannot write one of the lines kept back,
        that line alone is lost, and logged as a failure; the others are
        written.
        """
        raw = BytesIO()
        written = TextIOWrapper(raw, encoding="ascii", write_through=True)
        publisher = LogPublisher()
        publisher.addObserver(textFileLogObserver(written))
        lines = self.textLines(publisher)
        self.outbox.hold()
        for text in ("to=<a@example.test>", "to=<j\u00f6rg@example.test>", "to=<b@example.test>"):
            lines.info(text)
        self.outbox.release()
        self.assertEqual(
            raw.getvalue().decode("ascii"),
            self.observerLines("to=<a@example.test>", "to=<b@example.test>"),
        )
        self.assertEqual(len(self.flushLoggedErrors(UnicodeEncodeError)), 1)

    def test_anotherLoggersObserverGetsTheEvent(self):
        """
        A logger that does not publish to the publisher whose observer
        could be written to gets the event itself.
        """
        events = []
        logger = Logger(namespace=self.namespace, observer=events.append)
        lines = TextLogLines(logger, "outcome", self.outbox, self.publisher)
        lines.info("one")
        self.assertEqual([e["outcome"] for e in events], ["one"])
        self.assertEqual(self.calls, [])

    def test_observerWrappedOnce(self):
        """
        An observer that stops being the only one and becomes it again
        keeps one wrapper in front of its own file.
        """
        observer = self.publisher._observers[0]
        self.lines.info("one")
        events = []
        self.publisher.addObserver(events.append)
        self.lines.info("two")
        self.publisher.removeObserver(events.append)
        self.lines.info("three")
        self.assertIs(observer._outFile.file, self.file)
        self.assertEqual(len(self.calls), 6)

    def test_observerFileNotReplaceableGetsTheEvent(self):
        """
        When the observer's file cannot be replaced, the line is logged as
        the logger's event, which the observer writes itself, and nothing
        raises.
        """
        FileLogObserver._outFile = property(lambda observer: observer.__dict__["_outFile"])
        self.addCleanup(delattr, FileLogObserver, "_outFile")
        self.lines.info("one")
        self.assertEqual(
            self.untimed(), [("write", "[lmtp_proxy.delivery.Delivery#info] one\n"), ("flush",)]
        )
