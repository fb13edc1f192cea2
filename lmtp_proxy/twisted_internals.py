"""
Every use this project makes of Twisted's private names, in one place.

Twisted may rename or change anything private in any release, without a
deprecation period. So nothing else in C{lmtp_proxy} touches a private
Twisted name; each item here says what it relies on and which test fails
first when Twisted changes that. C{setup.cfg} bounds Twisted to the releases
these tests passed on, and C{README.rst} ("Checking a newer Twisted") says
how to widen the bound.

The items:

  - L{sendOnSocket}: writing to a connection's socket directly
    (C{tests.test_outbox.SendNowTests}).
  - L{adoptSharedUNIXPort}: serving a unix listening socket that another
    process owns (C{tests.test_twisted_internals.SharedUNIXPortTests}).
  - L{listenUNIXQuietly}: a unix port that does not log its raw name when
    it closes (C{tests.test_twisted_internals.QuietUNIXPortTests}).
  - L{proxyHeaderFactory} and L{ProxyHeaderWrapper}: a HAProxy PROXY
    header read with Twisted's own parser before the session begins
    (C{tests.test_twisted_internals.ProxyHeaderTests}).
  - L{discardLineBuffer}: dropping the unread part of a
    C{LineOnlyReceiver}'s input (C{tests.test_twisted_internals.LineBufferTests}).
  - L{startTLS}: a connection's TLS records sent on its socket directly
    (C{tests.test_outbox.TLSSendTests}).
  - L{dispatchEventsLightly}: an epoll reactor's events dispatched without
    Twisted's per-event context copies, with the outbox held for each turn
    of several events (C{tests.test_twisted_internals.LightDispatchTests}).
  - L{cacheLogTimestamps}: twistd's text log observer formatting each
    second's timestamp once
    (C{tests.test_twisted_internals.LogTimestampTests}).
  - L{formatPlainLogLines}: twistd's text log observer writing a line
    whose text is formatted already without Twisted's formatter
    (C{tests.test_twisted_internals.PlainLogLineTests}).
  - L{TextLogLines}: lines written straight into the file of twistd's text
    log observer, those of one turn of the reactor in one write
    (C{tests.test_twisted_internals.TextLogLineTests}).
"""

import errno
import threading
import time

from twisted.internet import tcp, unix
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)
from twisted.python import context, log
from zope.interface import implementer


def sendOnSocket(transport, data):
    """
    Send C{data} on the socket of C{transport} now, if the transport is a
    plain TCP or UNIX connection that is open, neither closing nor aborted,
    without TLS, and with nothing queued ahead of C{data}.

    Relies on L{tcp.Connection} (the base of TCP and UNIX connections)
    keeping what C{write} queued in the private C{_tempDataBuffer} and what
    a partial send left in C{dataBuffer}, marking C{abortConnection} in the
    private C{_aborting}, and on its C{socket}. A renamed private attribute
    makes every write fall back to C{transport.write}, slower but still
    right: C{tests.test_outbox.SendNowTests.test_sentWithoutWaitingForTheReactor}
    fails first. Data that Twisted holds anywhere else would be overtaken:
    C{test_queuedDataKeepsItsPlace} (written, not yet sent) or
    C{test_partlySentDataKeepsItsPlace} (partly sent) of the same class
    fails.

    @return: how many bytes of C{data} the socket took; C{0} whenever the
        transport must be left to write all of it.
    """
    # getattr's defaults read a missing attribute as "not safe to send".
    if getattr(transport, "TLS", True):
        return 0
    return _sendOnConnection(transport, data)


def _sendOnConnection(transport, data):
    """
    L{sendOnSocket} for the bytes that go on the wire as they are: plain
    data, or the records of the connection's own TLS layer.
    """
    if not (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_aborting", True)
        and not transport.dataBuffer
        and not getattr(transport, "_tempDataBuffer", True)
    ):
        return 0
    try:
        return transport.socket.send(data)
    except OSError:
        # Twisted's own write reports the error the same way it always does.
        return 0


def startTLS(transport, options):
    """
    C{transport.startTLS(options)}, with what is written afterwards
    encrypted and sent on the socket at once, as L{sendOnSocket} sends
    plain data.

    Twisted's TLS layer holds each write until the reactor's next turn, to
    join small writes into one record, and then leaves the record to the
    connection's C{write}, which the reactor sends on the turn after: two
    turns, a timer and two C{epoll_ctl} per reply. The L{Outbox} already
    joins what one chunk of input causes, so both waits only add latency.

    Relies on C{tcp.Connection.startTLS} making the connection's C{protocol}
    a C{twisted.protocols.tls.BufferingTLSTransport}, whose private
    C{_aggregator} keeps the unbuffered write as C{_write}, and giving it a
    private C{twisted.internet._newtls._BypassTLS} transport that writes
    around the TLS layer. When Twisted changes either, TLS connections are
    written Twisted's way, slower but still right:
    C{tests.test_outbox.TLSSendTests.test_sentWhenTheWriteReturns} fails
    first.
    """
    transport.startTLS(options)
    if isinstance(transport, tcp.Connection):
        _sendRecordsAtOnce(transport.protocol, transport)


def sendRecordsAtOnce(transport):
    """
    For a protocol whose C{transport} is a TLS layer wrapped around a TCP
    connection (C{wrapClientTLS}), what L{startTLS} does: writes encrypted
    and sent on the socket at once. Nothing for any other transport.
    """
    connection = getattr(transport, "transport", None)
    if isinstance(connection, tcp.Connection):
        _sendRecordsAtOnce(transport, connection)


def _sendRecordsAtOnce(layer, connection):
    from twisted.internet._newtls import _BypassTLS
    from twisted.protocols.tls import BufferingTLSTransport, _AggregateSmallWrites

    if not isinstance(layer, BufferingTLSTransport):
        return
    below = getattr(layer, "transport", None)
    aggregator = getattr(layer, "_aggregator", None)
    if not (
        (type(below) is _BypassTLS or below is connection)
        and isinstance(aggregator, _AggregateSmallWrites)
    ):
        return
    sending = layer.transport = _SendingBypass(below, connection)
    encrypt = aggregator._write

    def write(data):
        sending.writeThrough(encrypt, data)

    layer.write = write
    layer.writeSequence = lambda data: write(b"".join(data))


class _SendingBypass:
    """
    The TLS layer's way to the socket, trying the socket first: otherwise
    what it replaces (a C{_BypassTLS}, or the connection itself).
    """

    def __init__(self, bypass, connection):
        self._bypass = bypass
        self._connection = connection
        self._records = None

    def __getattr__(self, name):
        return getattr(self._bypass, name)

    def write(self, data):
        if self._records is not None:
            self._records.append(data)
        else:
            self._send(data)

    def writeThrough(self, encrypt, data):
        """
        Call C{encrypt(data)}, the TLS layer's own write, and send the
        records it makes (one per 16 KB) in one piece.
        """
        if self._records is not None:
            # Written from inside another write: its records leave with
            # that write's.
            encrypt(data)
            return
        self._records = records = []
        try:
            encrypt(data)
        finally:
            self._records = None
            if records:
                self._send(records[0] if len(records) == 1 else b"".join(records))

    def _send(self, data):
        sent = _sendOnConnection(self._connection, data)
        if sent < len(data):
            self._bypass.write(data[sent:] if sent else data)


def dispatchEventsLightly(reactor, outbox=None):
    """
    Make C{reactor}, if it is Twisted's epoll reactor, dispatch each event
    as its own C{doPoll} does, in the same log context, at a fraction of
    the cost.

    For every readable or writable socket, Twisted's C{doPoll} calls
    C{log.callWithLogger}, which copies the current log context into a new
    dict, wraps it in another, and pushes it through four nested calls
    before the protocol sees its data. The proxy handles one small event
    per command and per backend reply, so this bookkeeping was a
    measurable share of each message. Here the outer context is read once
    per poll, and each event pushes one dict with the selectable's
    C{logPrefix} as C{system}: legacy log events emitted while an event is
    handled carry the same C{system} as under Twisted's own dispatch, and
    an exception that escapes the handling is logged the same way.

    Relies on L{EPollReactor.doPoll} being the reactor's C{doIteration}
    and reading its private C{_poller} and C{_selectables}, on its private
    C{_doReadOrWrite}, and on the context tracker's C{contexts} stack.
    When Twisted changes them, the reactor is left as it is, or
    C{tests.test_twisted_internals.LightDispatchTests} fails first: its
    tests run each case through Twisted's own dispatch and this one and
    compare what was logged, raised and left in the context.

    @param outbox: an L{lmtp_proxy.outbox.Outbox} held for each turn that
        found several events (L{lmtp_proxy.outbox.Outbox.holdTurn}), or
        C{None}.
    @return: whether the reactor now dispatches this way.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:
        # No epoll on this system.
        return False
    if type(reactor) is not EPollReactor or not all(
        hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")
    ):
        return False
    if not hasattr(context.theContextTracker.currentContext(), "contexts"):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    doReadOrWrite = reactor._doReadOrWrite
    logContext = log.ILogContext

    def doPoll(timeout):
        if timeout is None:
            timeout = -1
        try:
            events = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        if not events:
            return
        outer = context.get(logContext)
        contexts = context.theContextTracker.currentContext().contexts
        if outbox is None or len(events) == 1:
            # One event's writes are joined by its own hold already.
            dispatch(events, outer, contexts)
            return
        outbox.holdTurn()
        try:
            dispatch(events, outer, contexts)
        finally:
            try:
                outbox.releaseTurn()
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system="-")

    def dispatch(events, outer, contexts):
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                system = selectable.logPrefix()
            except KeyboardInterrupt:
                raise
            except BaseException:
                system = "(buggy logPrefix method)"
                log.err(system=system)
            eventContext = outer.copy()
            eventContext["system"] = system
            contexts.append({logContext: eventContext})
            try:
                try:
                    doReadOrWrite(selectable, fd, event)
                finally:
                    contexts.pop()
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=system)

    reactor.doPoll = reactor.doIteration = doPoll
    return True


class _TimestampsBySecond:
    """
    Twisted's C{formatTime}, remembering the text of the last second it
    formatted.
    """

    def __init__(self, formatTime):
        self.formatTime = formatTime
        self._last = (None, None, None)

    def __call__(self, when, timeFormat=timeFormatRFC3339, default="-"):
        """
        Format C{when} as C{twisted.logger.formatTime} does.
        """
        try:
            second = int(when)
            fraction = when - second
        except (TypeError, ValueError, OverflowError):
            return self.formatTime(when, timeFormat, default)
        # Past 0.999999 the datetime rounds up to the next second. A format
        # with %f shows more than the second.
        if not 0 <= fraction < 0.999999 or timeFormat is None or "%f" in timeFormat:
            return self.formatTime(when, timeFormat, default)
        last = self._last
        if last[0] == second and last[1] == timeFormat:
            return last[2]
        text = self.formatTime(when, timeFormat, default)
        # One tuple, swapped whole: an event logged from another thread
        # reads the old second or the new one, never a mix.
        self._last = (second, timeFormat, text)
        return text


def cacheLogTimestamps():
    """
    Make twistd's text log observer (C{textFileLogObserver}, which writes
    the log file or standard output) format the timestamp of each second
    once, not once per line.

    Twisted's C{formatTime} builds a time zone and a datetime and calls
    C{strftime} for every line it writes, which was close to half of what
    twistd's observer spent on a recipient's outcome line. Lines logged
    within the same second share one text, which is the text
    C{formatTime} gives for each of them: a time zone's offset changes
    only on a whole second, a time that rounds up to the next second is
    formatted afresh, and so is a format that shows fractions of a second.
    The one difference: a change of C{TZ} made while the proxy runs shows
    from the next second on.

    Relies on the observer's C{formatEvent} calling the name C{formatTime}
    of the private module C{twisted.logger._file} for every line. When
    Twisted changes that, nothing is replaced, or
    C{tests.test_twisted_internals.LogTimestampTests} fails first.

    @return: whether the observer now formats timestamps this way.
    """
    return _inFrontOfTextObserver("formatTime", formatTime, _TimestampsBySecond)


def _plainText(event):
    """
    The text of C{event} when its format is one field holding text, or has
    no field at all; L{None} when it needs Twisted's formatter.
    """
    if "log_failure" in event or "log_flattened" in event:
        return None
    format = event.get("log_format")
    if type(format) is not str:
        return None
    if format[:1] == "{" and format[-1:] == "}" and format[1:-1].isidentifier():
        text = event.get(format[1:-1])
        return text if type(text) is str else None
    if "{" in format or "}" in format:
        return None
    return format


def _plainSystem(event):
    """
    The system C{event} is shown under, as Twisted names it from
    C{log_system}, or C{log_namespace} and C{log_level}; L{None} when any of
    them is not what Twisted's own loggers put there.
    """
    system = event.get("log_system")
    if system is not None:
        return system if type(system) is str else None
    namespace = event.get("log_namespace", "-")
    level = event.get("log_level")
    if type(namespace) is not str:
        return None
    if level is None:
        return namespace + "#-"
    name = getattr(level, "name", None)
    return namespace + "#" + name if type(name) is str else None


def _classicLine(timestamp, system, text):
    """
    The line C{formatEventAsClassicLogText} makes of an event's timestamp,
    system and text, each line after the first indented by a tab.
    """
    line = timestamp + " [" + system + "] " + text
    return line.replace("\n", "\n\t") + "\n"


class _PlainLines:
    """
    Twisted's C{formatEventAsClassicLogText}, with a short way for an event
    whose text needs no formatting.
    """

    def __init__(self, formatEventAsClassicLogText):
        self.formatEventAsClassicLogText = formatEventAsClassicLogText

    def __call__(self, event, formatTime=formatTime):
        """
        Format C{event} as C{twisted.logger.formatEventAsClassicLogText}
        does.
        """
        text = _plainText(event)
        system = _plainSystem(event) if text is not None else None
        if system is None:
            return self.formatEventAsClassicLogText(event, formatTime)
        if not text:
            return None
        return _classicLine(formatTime(event.get("log_time")), system, text)


def formatPlainLogLines():
    """
    Make twistd's text log observer write an event whose format is one
    field holding text (how each recipient's outcome line is logged), or
    has no field at all, without Twisted's general formatter.

    Twisted's formatter parses the format string in Python for every line,
    and evaluates type hints at run time to name the line's system; for the
    outcome line, whose text is formatted already, all that work gives back
    the text it was given. Every other event, and any event with a failure,
    goes through Twisted's own C{formatEventAsClassicLogText}, and the
    short way writes the same line it would.

    Relies on the observer's C{formatEvent} calling the name
    C{formatEventAsClassicLogText} of the private module
    C{twisted.logger._file} for every line. When Twisted changes that,
    nothing is replaced, or C{tests.test_twisted_internals.PlainLogLineTests}
    fails first.

    @return: whether the observer now writes such lines this way.
    """
    return _inFrontOfTextObserver(
        "formatEventAsClassicLogText", formatEventAsClassicLogText, _PlainLines
    )


def _inFrontOfTextObserver(name, original, wrapper):
    """
    Put C{wrapper(original)} in the place of the name C{name} of
    C{twisted.logger._file}, which twistd's text observer calls for every
    line, once, and only while that name is still Twisted's C{original}.

    @return: whether the name is now a C{wrapper}.
    """
    from twisted.logger import _file

    current = getattr(_file, name, None)
    if isinstance(current, wrapper):
        return True
    if current is not original:
        return False
    setattr(_file, name, wrapper(current))
    return True


class TextLogLines:
    """
    Lines that one L{Logger} logs at the info level as a single field of
    text (each recipient's outcome line), written straight into the file of
    twistd's text log observer when that observer is the only one and
    would write the very same line; logged through the logger otherwise.

    Through the logger, one such line cost more than all the rest of the
    recipient's outcome: C{Logger.emit} builds the event and checks its
    level against a freshly sorted list of levels, the global publisher
    calls the observer, the observer formats the line and goes through the
    log file's lock twice, and the file, unbuffered, makes one C{write}
    system call per line. Here the line is formatted with the observer's
    own timestamps, and the lines logged while the outbox holds its writes
    (one input, or one turn of the reactor) are kept back and written in
    one call before the outbox sends anything it held
    (L{lmtp_proxy.outbox.Outbox.beforeSending}). So a reply never leaves
    before its outcome line is in the log file, whatever happens to the
    process next, and no line waits longer than the turn that logged it.
    A line logged outside a hold is written at once. The observer's file
    is wrapped so that any line the observer writes itself from the
    reactor's thread (a backend marked down later in the same turn) first
    writes the lines kept back: the file stays in the order things were
    logged.

    Relies on the global log publisher's private list C{_observers}, where
    twistd puts its observer, on C{FileLogObserver} writing each line to
    its private C{_outFile} (which is replaced by the wrapper), encoded by
    its private C{_encoding}, then flushing that file, and on the private
    module C{twisted.logger._file}
    whose C{formatTime} the observer calls. An observer is written to
    directly only when its own C{formatEvent} gives, for an event this
    logger emits, the line written here (checked again whenever the
    observers change); any other observer, or more than one, gets the
    logger's event as before. When Twisted changes those names, lines are
    logged through the logger, or
    C{tests.test_twisted_internals.TextLogLineTests} fails first.

    Used from the reactor's thread only, as the outbox is: made there,
    and called there.

    @ivar thread: the identity of the reactor's thread.
    """

    log = Logger()

    def __init__(self, logger, field, outbox, publisher=globalLogPublisher, now=time.time):
        """
        @param logger: the L{Logger} a line is logged with when it cannot
            be written directly, as C{logger.info("{field}", field=text)}.
        @param field: the name of that event's one field.
        @param outbox: the L{lmtp_proxy.outbox.Outbox} whose holds keep the
            lines back.
        @param publisher: the log publisher whose only observer may be
            written to: the lines are written directly only when it is
            also the logger's.
        @param now: the clock of the lines' timestamps, C{time.time} as
            the logger's.
        """
        self._logger = logger
        self._field = field
        self._format = "{" + field + "}"
        self._system = "%s#%s" % (logger.namespace, LogLevel.info.name)
        self._outbox = outbox
        self._publisher = publisher if logger.observer is publisher else None
        self._now = now
        self._observer = None
        # The observer's own file and encoding, while it is written to
        # directly.
        self._file = None
        self._encoding = None
        self._lines = []
        self.thread = threading.get_ident()
        try:
            from twisted.logger import _file
        except ImportError:
            _file = None
        self._observerModule = _file
        outbox.beforeSending(self.writeKept)

    def info(self, text, **fields):
        """
        Log the line C{text} (L{str}); C{fields} go with the logger's event
        when the line is logged through the logger.
        """
        if text and self._directObserver() is not None:
            self._lines.append(self._line(self._now(), text))
            if not self._outbox.held:
                self.writeKept()
        else:
            fields[self._field] = text
            self._logger.info(self._format, **fields)

    def writeKept(self):
        """
        Write the lines kept back to the observer's file, in one call.
        """
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._write("".join(lines))
        except UnicodeEncodeError:
            # A file whose encoding lacks a character of one line (standard
            # output in an ASCII locale): the observer would have lost that
            # line only. Nothing was written, since the text is encoded
            # before any of it is.
            for line in lines:
                try:
                    self._write(line)
                except Exception:
                    self.log.failure("log line not written")
        except Exception:
            # As when the observer's own write raises: the lines are lost
            # to it, and the replies held behind them still leave.
            self.log.failure("log lines not written")

    def _write(self, text):
        if self._encoding is not None:
            text = text.encode(self._encoding)
        self._file.write(text)
        self._file.flush()

    def _line(self, when, text):
        """
        The line of C{text} logged at C{when}, as twistd's text observer
        writes it.
        """
        return _classicLine(self._observerModule.formatTime(when), self._system, text)

    def _directObserver(self):
        """
        The publisher's only observer, when it writes the lines written
        here; L{None} otherwise.
        """
        observers = getattr(self._publisher, "_observers", None)
        observer = observers[0] if type(observers) is list and len(observers) == 1 else None
        if observer is not self._observer:
            # Lines kept for the observer before go to it first.
            self.writeKept()
            self._observer = observer
            self._file = None
            if observer is not None and self._writesTheSameLines(observer):
                try:
                    self._writeBefore(observer)
                except Exception:
                    # An observer whose file can no longer be replaced
                    # gets the logger's events: a line must never fail
                    # the delivery it records.
                    self._file = None
        return observer if self._file is not None else None

    def _writesTheSameLines(self, observer):
        """
        Whether C{observer} is a file observer that writes, for an event
        of the logger, the line L{_line} makes of its text.
        """
        if (
            type(observer) is not FileLogObserver
            or not hasattr(self._observerModule, "formatTime")
            or not all(hasattr(observer, name) for name in ("_outFile", "_encoding"))
        ):
            return False
        emitted = []
        probe = Logger(self._logger.namespace, self._logger.source, emitted.append)
        text = "a line\nand the next"
        probe.info(self._format, **{self._field: text})
        try:
            return observer.formatEvent(emitted[0]) == self._line(emitted[0]["log_time"], text)
        except Exception:
            return False

    def _writeBefore(self, observer):
        """
        Write to C{observer}'s file from now on, and have the observer
        write the lines kept back before any line of its own: another
        event logged later in the same turn (a backend marked down, a
        traceback) stays after the outcome lines logged before it.
        """
        file = observer._outFile
        if not (isinstance(file, _AfterKeptLines) and file.lines is self):
            file = observer._outFile = _AfterKeptLines(file, self)
        self._file = file.file
        self._encoding = observer._encoding


class _AfterKeptLines:
    """
    The file of a text log observer that a L{TextLogLines} writes to:
    what the observer writes itself from the reactor's thread goes after
    the lines kept back.
    """

    def __init__(self, file, lines):
        self.file = file
        self.lines = lines

    def write(self, data):
        # The lines are kept by the reactor's thread alone; another
        # thread's event is written as it comes.
        if threading.get_ident() == self.lines.thread:
            self.lines.writeKept()
        self.file.write(data)

    def flush(self):
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.file, name)


class _SharedUNIXPort(unix.Port):
    """
    A unix listening socket adopted from another process. When a unix port
    closes, Twisted shuts the socket down (which would stop the other
    process's copy from accepting too) and removes its file; both belong to
    the process that made the socket.
    """

    _shouldShutdown = False

    def startListening(self):
        """
        Serve the adopted socket as it is: Twisted's own would chmod the
        file, which fails (EPERM) after twistd dropped privileges, and would
        change the owner's mode anyway.
        """
        tcp._reservedFD.reserve()
        self.factory.doStart()
        self.socket, self._preexistingSocket = self._preexistingSocket, None
        self.socket.setblocking(False)
        self.fileno = self.socket.fileno
        self.connected = True
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason):
        """
        Close the socket, leaving its file: C{unix.Port.connectionLost}
        would remove it.
        """
        tcp.Port.connectionLost(self, reason)


def adoptSharedUNIXPort(reactor, fd, factory):
    """
    Serve connections for C{factory} from the listening unix socket C{fd},
    which another process made and keeps: its file, mode and listening
    state stay as they are, also once this port stops.

    Relies on L{unix.Port}'s private C{_fromListeningDescriptor},
    C{_preexistingSocket} and C{_shouldShutdown}, on
    C{tcp._reservedFD}, on what C{unix.Port.startListening} sets up
    besides binding (C{socket}, C{fileno}, C{connected}, C{numberAccepts})
    and on C{unix.Port.connectionLost} being what removes the file.
    C{tests.test_twisted_internals.SharedUNIXPortTests} fails first when
    one changes (C{tests.test_workers.WorkerTests.test_workerEndingKeepsUnixSocket}
    then checks the same with real worker processes).

    @return: the listening port.
    """
    port = _SharedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
    port.startListening()
    return port


class _QuietUNIXPort(unix.Port):
    """
    A unix port that does not log its name when it closes: Twisted logs
    the raw name, and an abstract name begins with a NUL byte, which turns
    a log file into a binary file for grep.
    """

    def _logConnectionLostMsg(self):
        pass


def discardLineBuffer(receiver):
    """
    Drop what a L{twisted.protocols.basic.LineOnlyReceiver} has read but not
    yet split into lines: after a backend's 220 to STARTTLS, bytes that came
    with it in clear are not the backend's (RFC 3207 4.2), and the next
    bytes are TLS.

    Relies on C{LineOnlyReceiver} keeping its unsplit input in the private
    C{_buffer} (bytes) and reading it again on the next C{dataReceived}.
    C{tests.test_twisted_internals.LineBufferTests.test_partialLineDropped}
    fails first when that changes.
    """
    receiver._buffer = b""


def listenUNIXQuietly(reactor, address, factory, mode):
    """
    Listen for C{factory} on the unix socket C{address} (a path, or an
    abstract name beginning with NUL) with C{mode}, as
    C{reactor.listenUNIX} does, but log nothing when the port closes.

    Relies on L{unix.Port} logging its closing through the private
    C{_logConnectionLostMsg} alone (its start message gives the name's
    C{repr}, which has no NUL byte).
    C{tests.test_twisted_internals.QuietUNIXPortTests.test_abstractNameNotLogged}
    fails first when that changes.

    @return: the listening port.
    @raise twisted.internet.error.CannotListenError: as C{listenUNIX}.
    """
    port = _QuietUNIXPort(address, factory, mode=mode, reactor=reactor)
    port.startListening()
    return port


def proxyHeaderFactory(factory):
    """
    The C{WrappingFactory} that L{ProxyHeaderWrapper}s of C{factory}'s
    protocols register with. Twisted's only public way to the PROXY
    protocol is a listening endpoint (C{proxyEndpoint}); the proxy decides
    per connection (a reload may change the setting, and worker processes
    adopt their socket), so the wrapper is made by the server factory, from
    the private C{twisted.protocols.haproxy._wrapper} module.
    """
    return HAProxyWrappingFactory(factory)


class _Held:
    """
    Keeps what Twisted's parser passes on after the PROXY header.
    """

    def __init__(self):
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)


@implementer(IHandshakeListener)
class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """
    Twisted's PROXY protocol wrapper, which tells the wrapped protocol
    (C{proxyHeaderReceived()}) when the header has been read, before it
    passes on anything that followed the header: the wrapped protocol may
    start TLS then, and those bytes (the client's TLS hello) belong to the
    TLS layer.

    Relies on the private C{_proxyInfo} (set once the header is parsed),
    on C{HAProxyProtocolWrapper.dataReceived} handing the rest of the data
    to C{wrappedProtocol}, and on C{startTLS} making the TLS layer the
    connection's C{protocol}.
    C{tests.test_twisted_internals.ProxyHeaderTests} fails first when one
    changes.
    """

    def dataReceived(self, data):
        """
        See L{IProtocol.dataReceived}.
        """
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        wrapped, held = self.wrappedProtocol, _Held()
        self.wrappedProtocol = held
        try:
            HAProxyProtocolWrapper.dataReceived(self, data)
        finally:
            self.wrappedProtocol = wrapped
        if self._proxyInfo is None:
            return
        wrapped.proxyHeaderReceived()
        if held.data and self.connected:
            # The connection's protocol: this wrapper, or the TLS layer
            # that proxyHeaderReceived put in front of it.
            self.transport.protocol.dataReceived(b"".join(held.data))

    def handshakeCompleted(self):
        """
        See L{IHandshakeListener.handshakeCompleted}: TLS started below this
        wrapper; the wrapped protocol is told.
        """
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
