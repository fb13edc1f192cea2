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


class Outbox:
    """
    Sends what the proxy writes, joining the writes made while one chunk of
    input is handled.

    A chunk of input often produces several writes to one connection: the
    MAIL and first RCPT pipelined to a backend, the last message bytes and
    the final dot, one reply per recipient. Sent one by one they would
    leave as separate segments, which costs the peer a wakeup each and can
    meet its Nagle delay. So every protocol holds the outbox while it
    handles input; writes made meanwhile wait, per transport and in order,
    and leave joined when the last hold is released. Writes made outside
    input handling (timers, connection set-up) leave at once.

    Every write to a transport must go through the same outbox, or one
    made directly could overtake one waiting here.
    """

    log = Logger()

    def __init__(self):
        self._holds = 0
        self._waiting = {}
        self._after = []

    def hold(self):
        """
        Keep writes back until the matching L{release}.
        """
        self._holds += 1

    def release(self):
        """
        End one L{hold}; after the last, send what waited.
        """
        self._holds -= 1
        if self._holds:
            return
        try:
            if self._waiting:
                waiting, self._waiting = self._waiting, {}
                for transport, chunks in waiting.items():
                    sendNow(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        finally:
            while self._after:
                after, self._after = self._after, []
                for call, args, kwargs in after:
                    try:
                        call(*args, **kwargs)
                    except Exception:
                        self.log.failure("after sending")

    def afterSending(self, call, *args, **kwargs):
        """
        Call C{call(*args, **kwargs)} once what waits now has been sent: at
        the end of the current hold, or at once outside one.

        For what must wait until the input being handled is done with (a
        backend connection goes back to the pool only once the read that
        released it is over); it still runs in the same turn of the
        reactor, whatever the sending raised.
        """
        if self._holds:
            self._after.append((call, args, kwargs))
        else:
            call(*args, **kwargs)

    def flush(self, transport):
        """
        Send what waits for C{transport} now, before the current hold ends:
        the reply to STARTTLS must leave before the connection turns to TLS.
        """
        chunks = self._waiting.pop(transport, None)
        if chunks:
            sendNow(transport, b"".join(chunks))

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
