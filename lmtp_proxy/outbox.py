"""
Writes to client and backend connections that leave for the socket at once.

C{FileDescriptor.write} only queues data and asks the reactor to watch the
socket for writability; the data leaves on the reactor's next turn, in a
C{doWrite} that then stops the watching again. For a proxy that writes a
few small lines per reply this doubled the system calls per message (two
C{epoll_ctl} and one more C{epoll_wait} per write) and was the largest
single cost of a delivery. An L{Outbox} sends straight to the socket when
nothing is queued ahead, and leaves anything the socket does not take to
Twisted's own buffering, flow control and error handling.
"""

from twisted.logger import Logger

from lmtp_proxy.twisted_internals import sendOnSocket

# A write at least this large (a piece of a message body) leaves at the end
# of its input even in a turn: the peer has work for its wakeup, and can do
# it while this process reads on.
BULK = 16 * 1024


def sendNow(transport, data):
    """
    Write C{data} to C{transport}, sending it on the socket at once when the
    transport has nothing queued ahead of it.

    Anything else (a transport that is not a plain TCP or UNIX connection,
    one closing or aborted, data already queued, a socket that is full or in
    error) goes through C{transport.write}, so ordering, C{loseConnection},
    C{abortConnection} and error reporting stay Twisted's.
    """
    sent = sendOnSocket(transport, data)
    if sent < len(data):
        transport.write(data[sent:])


def _sendEach(waiting):
    """
    Send what waits for each transport in C{waiting}. A turn's writes go to
    many sessions at once: one transport whose write raises must not keep
    the others' replies back, so the first error is raised once every
    transport had its turn.
    """
    error = None
    for transport, chunks in waiting.items():
        try:
            sendNow(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except Exception as e:
            if error is None:
                error = e
    if error is not None:
        raise error


class Outbox:
    """
    Sends what the proxy writes, joining the writes made while one chunk of
    input is handled, or while one turn of the reactor handles all the
    input it found.

    A chunk of input often produces several writes to one connection: the
    MAIL and first RCPT pipelined to a backend, the last message bytes and
    the final dot, one reply per recipient. Sent one by one they would
    leave as separate segments, which costs the peer a wakeup each and can
    meet its Nagle delay. So every protocol holds the outbox while it
    handles input; writes made meanwhile wait, per transport and in order,
    and leave joined when the last hold is released. Writes made outside
    any hold (timers, a Deferred fired from a thread) leave at once.

    The reactor's dispatch may also hold it for a whole turn
    (L{holdTurn}): then the writes caused by all the connections found
    ready leave together once their input is handled, joined where two
    inputs wrote to one connection (the replies of two backends to one
    client), and no peer is woken to compete for the CPU before this
    process has read everything it was woken for. Nothing leaves later
    than C{transport.write} would send it, which waits for the next turn.
    A write of L{BULK} bytes or more still leaves when its input is done.

    Every write to a transport must go through the same outbox, or one
    made directly could overtake one waiting here.
    """

    log = Logger()

    def __init__(self):
        self._holds = 0
        # How many of the holds are L{holdTurn}'s.
        self._turns = 0
        self._waiting = {}
        # Transports written L{BULK} bytes at once during this input.
        self._bulky = []
        self._after = []
        self._before = []

    @property
    def held(self):
        """
        Whether writes are kept back now.
        """
        return self._holds > 0

    def beforeSending(self, call):
        """
        Call C{call()} each time a hold ends, before what it kept back
        leaves, and before L{flush} sends anything: for what must be
        written before the replies it records are seen. C{call} handles its
        own errors; should it raise, what the hold kept back waits for the
        next release.
        """
        self._before.append(call)

    def hold(self):
        """
        Keep writes back until the matching L{release}.
        """
        self._holds += 1

    def release(self):
        """
        End one L{hold}. After the last hold of an input, send what it
        wrote in L{BULK} and run what waits for its end (L{afterInput});
        after the last of all, send what waited.
        """
        self._holds -= 1
        if self._holds > self._turns:
            return
        try:
            if self._holds:
                bulky, self._bulky = self._bulky, []
                for transport in bulky:
                    self.flush(transport)
            else:
                self._bulky = []
                for call in self._before:
                    call()
                waiting, self._waiting = self._waiting, {}
                _sendEach(waiting)
        finally:
            while self._after:
                after, self._after = self._after, []
                for call, args, kwargs in after:
                    try:
                        call(*args, **kwargs)
                    except Exception:
                        self.log.failure("after the input")

    def holdTurn(self):
        """
        Keep writes back for a turn of the reactor, until the matching
        L{releaseTurn}. Inputs handled meanwhile still end one by one:
        their L{afterInput} calls do not wait for the turn.
        """
        self._turns += 1
        self._holds += 1

    def releaseTurn(self):
        """
        End a L{holdTurn}.
        """
        self._turns -= 1
        self.release()

    def afterInput(self, call, *args, **kwargs):
        """
        Call C{call(*args, **kwargs)} once the input being handled is done
        with: at the end of the current L{hold}, or at once outside one
        (a turn alone is not an input).

        For what must not happen in the middle of a read: a backend
        connection goes back to the pool only once the read that released
        it is over. It still runs in the same turn of the reactor,
        whatever sending raised.
        """
        if self._holds > self._turns:
            self._after.append((call, args, kwargs))
        else:
            call(*args, **kwargs)

    def flush(self, transport):
        """
        Send what waits for C{transport} now, before the current hold ends:
        the reply to STARTTLS must leave before the connection turns to TLS.
        """
        if not self._waiting.get(transport):
            return
        for call in self._before:
            call()
        sendNow(transport, b"".join(self._waiting.pop(transport)))

    def write(self, transport, data):
        """
        Send C{data} on C{transport}, now or at the end of the current hold.
        """
        if not self._holds:
            sendNow(transport, data)
            return
        chunks = self._waiting.get(transport)
        if chunks is None:
            self._waiting[transport] = [data]
        else:
            chunks.append(data)
        if self._turns and len(data) >= BULK:
            self._bulky.append(transport)
