"""
The tests' LMTP client.

It has two faces over one reply parser (L{ReplyReader}):

 - L{LMTPTestClient}, connected with L{connectClient}, runs in the reactor:
   trial tests send it raw bytes (pipelined, malformed, cut off: whatever
   the test is about) and wait for replies with Deferreds;
 - L{BlockingLMTPClient} uses a blocking socket, for tests that drive a
   server in another process without running the reactor; it also speaks
   whole transactions (L{BlockingLMTPClient.transaction}, L{lmtpDeliver}).

Both reach a port on 127.0.0.1 (an C{int}), C{(host, port)} or the path of a
unix socket. The bytes of the commands come from L{commands}, L{mail} and
L{transaction}.
"""

import socket

from twisted.internet import defer, protocol, reactor

BODY = b"Subject: test\r\n\r\nhello\r\n"


class Reply(object):
    """
    One reply, of one or more lines.

    @ivar lines: its lines, decoded as latin-1, without their CRLF.
    """

    def __init__(self, lines):
        self.lines = lines

    @property
    def line(self):
        """
        The last line.
        """
        return self.lines[-1]

    @property
    def code(self):
        """
        The reply code, as an C{int}.
        """
        return int(self.line[:3])

    @property
    def text(self):
        """
        The last line after its code and separator.
        """
        return self.line[4:]

    def __repr__(self):
        return "<Reply %r>" % ("\n".join(self.lines),)


class ReplyReader(object):
    """
    Splits what an LMTP server sends into lines and complete replies.

    @ivar lines: every complete line received so far, decoded as latin-1,
        without its CRLF.
    @ivar replies: every complete L{Reply} received so far, in order.
    """

    def __init__(self):
        self.lines = []
        self.replies = []
        self._buffer = b""
        self._pending = []

    def collect(self, data):
        """
        Add C{data}, the next bytes received, to the lines and replies.
        """
        *complete, self._buffer = (self._buffer + data).split(b"\r\n")
        for raw in complete:
            line = raw.decode("latin-1")
            self.lines.append(line)
            self._pending.append(line)
            if line[3:4] != "-":
                self.replies.append(Reply(self._pending))
                self._pending = []


def _address(target):
    """
    C{target} as C{(host, port)}, or as the path of a unix socket: a bare
    port is on 127.0.0.1.
    """
    if isinstance(target, int):
        return ("127.0.0.1", target)
    return target


def commands(sender, recipients, mailParams=b"", rcptParams=b""):
    """
    The MAIL, RCPT and DATA commands of one transaction, in that order, each
    a line of bytes with its CRLF.
    """
    lines = [b"MAIL FROM:<" + sender + b">" + mailParams + b"\r\n"]
    lines += [b"RCPT TO:<" + r + b">" + rcptParams + b"\r\n" for r in recipients]
    lines.append(b"DATA\r\n")
    return lines


def mail(recipients, body=BODY, sender=b"s@example.test", mailParams=b"", rcptParams=b""):
    """
    The bytes of one pipelined MAIL transaction (no LHLO, no QUIT).
    """
    return b"".join(commands(sender, recipients, mailParams, rcptParams)) + body + b".\r\n"


def transaction(recipients, body=BODY, sender=b"s@example.test", quit=True):
    """
    The bytes of a whole pipelined LMTP session.
    """
    data = b"LHLO client.test\r\n" + mail(recipients, body, sender)
    if quit:
        data += b"QUIT\r\n"
    return data


def dotStuff(message):
    """
    Turn a message (bytes, CRLF lines) into DATA content including the
    terminating ".\\r\\n": lines starting with "." get another ".", and a
    missing final CRLF is added.
    """
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1]
    out = [(b"." + l) if l.startswith(b".") else l for l in lines]
    return b"\r\n".join(out) + b"\r\n.\r\n"


class LMTPTestClient(ReplyReader, protocol.Protocol):
    """
    The in-reactor face: sends raw bytes and collects complete replies.

    @ivar lost: fires with C{None} when the connection is closed.
    """

    def __init__(self):
        ReplyReader.__init__(self)
        self.lost = defer.Deferred()
        self._waiting = []

    def connectionLost(self, reason):
        self.lost.callback(None)
        self._check()

    def dataReceived(self, data):
        self.collect(data)
        self._check()

    def _check(self):
        for entry in list(self._waiting):
            count, d = entry
            if len(self.replies) >= count or self.lost.called:
                self._waiting.remove(entry)
                d.callback([r.line for r in self.replies[:count]])

    def send(self, data):
        """
        Send the bytes C{data} as they are.
        """
        self.transport.write(data)

    def waitReplies(self, count):
        """
        Fire with the last line of each of the first C{count} replies (or
        with what came before the connection closed).
        """
        d = defer.Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def codes(self):
        """
        The code of every reply so far.
        """
        return [r.code for r in self.replies]

    def startTLS(self, options):
        """
        Turn the connection to TLS with C{options} (from
        L{twisted.internet.ssl.optionsForClientTLS}), after the server's
        220 to STARTTLS.
        """
        self.transport.startTLS(options)


def connectClient(testcase, target, tls=None, bindAddress=None, preamble=b""):
    """
    Connect an L{LMTPTestClient} to C{target}; fires with it after the
    greeting. The connection is aborted at cleanup.

    @param tls: client TLS options, for TLS from the first byte.
    @param bindAddress: the C{(host, port)} to connect from.
    @param preamble: bytes sent before the greeting is awaited (a PROXY
        header).
    """
    creator = protocol.ClientCreator(reactor, LMTPTestClient)
    address = _address(target)
    if isinstance(address, str):
        d = creator.connectUNIX(address)
    elif tls is not None:
        d = creator.connectSSL(*address, tls, bindAddress=bindAddress)
    else:
        d = creator.connectTCP(*address, bindAddress=bindAddress)

    def connected(client):
        testcase.addCleanup(client.transport.abortConnection)
        if preamble:
            client.send(preamble)
        return client.waitReplies(1).addCallback(lambda _: client)

    return d.addCallback(connected)


@defer.inlineCallbacks
def exchange(client, data, count):
    """
    Send C{data} from the L{LMTPTestClient} C{client} and fire with the last
    lines of the next C{count} replies.
    """
    start = len(client.replies)
    client.send(data)
    replies = yield client.waitReplies(start + count)
    return replies[start:]


def connect(target, timeout):
    """
    A blocking socket connected to C{target}, with a C{timeout} in seconds.
    """
    address = _address(target)
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return s
    return socket.create_connection(tuple(address), timeout=timeout)


class LMTPError(Exception):
    """
    The server closed the connection while a reply was awaited.
    """


class BlockingLMTPClient(ReplyReader):
    """
    The blocking face, for a server in another process::

        c = BlockingLMTPClient(target)      # reads the greeting
        c.lhlo()
        result = c.transaction("a@x", ["b@y", "c@z"], message)
        c.quit()

    @ivar greeting: the greeting L{Reply}.
    """

    def __init__(self, target, timeout=30.0):
        ReplyReader.__init__(self)
        self.sock = connect(target, timeout=timeout)
        self._read = 0
        self.greeting = self.readReply()

    def send(self, data):
        """
        Send the bytes C{data} as they are.
        """
        self.sock.sendall(data)

    def readReply(self):
        """
        The next reply not read yet; wait for it if it has not come.
        """
        while self._read == len(self.replies):
            data = self.sock.recv(65536)
            if not data:
                raise LMTPError("server closed the connection; lines so far: %r" % (self.lines,))
            self.collect(data)
        self._read += 1
        return self.replies[self._read - 1]

    def startTLS(self, caFile, hostname="localhost"):
        """
        Turn the connection to TLS (after the server's 220 to STARTTLS),
        trusting the CA in C{caFile} and checking C{hostname}.
        """
        import ssl

        context = ssl.create_default_context(cafile=caFile)
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def command(self, line):
        """
        Send the command C{line} (text, without CRLF) and read its reply.
        """
        self.send(line.encode("utf-8") + b"\r\n")
        return self.readReply()

    def lhlo(self, name="client.e2e.test"):
        """
        Send LHLO and read its reply.
        """
        return self.command("LHLO " + name)

    def transaction(self, sender, recipients, message, raw=False):
        """
        MAIL, RCPT..., DATA in a single write (RFC 2920 pipelining), then
        the message, and one reply per accepted recipient. With raw=True
        the message is sent as is (it must contain its own dot-stuffing and
        terminator); otherwise it is dot-stuffed and terminated here.

        @return: dict with keys mail, rcpt (list of Reply, RCPT order),
            data (Reply) and final (list of (recipient, Reply) for accepted
            recipients, RCPT order).
        """
        self.send(b"".join(commands(sender.encode(), [r.encode() for r in recipients])))
        result = {"mail": self.readReply()}
        result["rcpt"] = [self.readReply() for r in recipients]
        result["data"] = self.readReply()
        result["final"] = []
        if result["data"].code != 354:
            return result
        self.send(message if raw else dotStuff(message))
        for r, reply in zip(recipients, result["rcpt"]):
            if reply.code // 100 == 2:
                result["final"].append((r, self.readReply()))
        return result

    def quit(self):
        """
        Send QUIT, read its reply if one comes, and close.
        """
        try:
            self.command("QUIT")
        except (LMTPError, OSError):
            pass
        finally:
            self.close()

    def close(self):
        """
        Close the connection at once.
        """
        self.sock.close()


def lmtpDeliver(target, sender, recipients, message, raw=False):
    """
    One complete LMTP session (greeting, LHLO, transaction, QUIT) with a
    L{BlockingLMTPClient}; the transaction's result also has "lines", every
    line received.
    """
    c = BlockingLMTPClient(target)
    try:
        c.lhlo()
        result = c.transaction(sender, recipients, message, raw=raw)
        result["lines"] = c.lines
    finally:
        c.quit()
    return result
