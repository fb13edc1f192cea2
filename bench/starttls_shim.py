#!/usr/bin/env python3
"""TLS for smtp-source and smtp-sink, which speak none (bench.py --tls).

One process serves any number of listeners, each on 127.0.0.1 with
SO_REUSEPORT, so that bench/tlscells.py can start one process per core on
the same ports and let the kernel spread the connections:

  --client NAME:LISTEN:TARGET:MODE   in front of smtp-source: accepts plain
      LMTP, connects to TARGET (a proxy) and
        starttls: reads the greeting, LHLO (the reply must offer STARTTLS),
                  STARTTLS (220), TLS verifying the bench CA and the name
                  "localhost"; then gives the client the greeting and
                  relays, so that the client's own LHLO goes under TLS
        implicit: TLS as above from the first byte, then relays
        plain:    relays only (the same hops, without TLS)
  --server NAME:LISTEN:SINK:MODE     in front of an smtp-sink: accepts from
      a proxy and
        starttls: greets (220), answers LHLO with PIPELINING and STARTTLS,
                  NOOP and RSET, QUIT; STARTTLS gets 220 and TLS as server
                  with the bench certificate; anything else before it gets
                  530 (counted as "refused": the proxy tried to go on in
                  clear); then it connects to SINK, swallows the sink's
                  greeting and relays (the proxy's LHLO under TLS reaches
                  the sink)
        implicit: TLS as server from the first byte, then relays (the
                  sink's greeting included)
        plain:    relays only

SIGUSR1 writes the counters of every listener to --stats as JSON, with
"seq" one higher than the last time: conns, tls (TLS sessions set up),
resumed (of those, resumed sessions), plain (relayed without TLS), failed,
refused, and bytes (client: from the client to the proxy; server: from the
proxy to the sink, counted only once relaying, that is under TLS unless the
mode is plain); and per listener the TLS sessions by version and cipher.  The file is first written when every listener is bound.
Standard library only (asyncio and ssl).
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import sys

LHLO_REPLY = (b"250-shim.bench.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
              b"250 STARTTLS\r\n")
TIMEOUT = 30.0


class Listener:
    def __init__(self, role, spec):
        name, listen, other, mode = spec.split(":")
        if mode not in ("starttls", "implicit", "plain"):
            raise SystemExit("bad mode %r in %r" % (mode, spec))
        self.role, self.name, self.mode = role, name, mode
        self.port, self.other = int(listen), int(other)
        self.stats = dict(conns=0, tls=0, resumed=0, plain=0, failed=0, refused=0, bytes=0)
        self.errors = 0
        self.sessions = {}          # "TLSv1.3 TLS_AES_256_GCM_SHA384": count

    def error(self, what):
        self.stats["failed"] += 1
        self.errors += 1
        if self.errors <= 20:
            print("%s %s: %s" % (self.role, self.name, what), file=sys.stderr, flush=True)


class Side(asyncio.Protocol):
    """One connection: buffers what arrives until spliced to its peer,
    then passes it on (with flow control both ways)."""

    def __init__(self, stats=None):
        self.transport = None
        self.peer = None
        self.buf = bytearray()
        self.closed = False
        self.waiter = None
        self.stats = stats          # dict whose "bytes" counts what we relay

    def connection_made(self, transport):
        self.transport = transport
        # asyncio sets TCP_NODELAY itself only on sockets whose proto is
        # IPPROTO_TCP; Nagle would hold a reply's later lines back until
        # the peer's delayed ACK (40 ms).
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            if self.stats is not None:
                self.stats["bytes"] += len(data)
        else:
            self.buf += data
            self._wake()

    def eof_received(self):
        self._gone()
        return False

    def connection_lost(self, exc):
        self._gone()

    def _gone(self):
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()      # after what is buffered is written
        self._wake()

    def _wake(self):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self):
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None:
            self.peer.transport.resume_reading()

    async def _more(self):
        if self.closed:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, TIMEOUT)
        finally:
            self.waiter = None

    async def line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return out
            await self._more()

    async def reply(self):
        """One (multi-line) reply: (code, [lines], raw bytes)."""
        lines, raw = [], b""
        while True:
            line = await self.line()
            raw += line
            text = line.rstrip(b"\r\n").decode("latin-1")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return text[:3], lines, raw

    async def start_tls(self, context, server_side, hostname=None):
        # Awaited directly (not through a task, as wait_for would), so that
        # loop.start_tls pauses the transport and takes it over before the
        # loop reads again: a peer's first TLS bytes must not land in buf.
        self.transport.pause_reading()
        if self.buf:
            # RFC 3207: what came in clear after STARTTLS/220 is not kept.
            raise ConnectionError("%d bytes in clear right before TLS" % len(self.buf))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(TIMEOUT):
            self.transport = await loop.start_tls(
                self.transport, self, context, server_side=server_side,
                server_hostname=hostname)
        return self.transport.get_extra_info("ssl_object")


def splice(a, b):
    """Relay both ways between two Sides, with what each had buffered."""
    a.peer, b.peer = b, a
    for x, y in ((a, b), (b, a)):
        if x.buf:
            y.transport.write(bytes(x.buf))
            if x.stats is not None:
                x.stats["bytes"] += len(x.buf)
            x.buf.clear()
    for x, y in ((a, b), (b, a)):
        if x.closed:
            y.transport.close()


def close(*sides):
    for s in sides:
        if s is not None and s.transport is not None:
            s.transport.close()


async def connect(port, stats=None):
    loop = asyncio.get_running_loop()
    side = Side(stats)
    await asyncio.wait_for(loop.create_connection(lambda: side, "127.0.0.1", port), TIMEOUT)
    return side


def tls_used(L, sslobj):
    L.stats["tls"] += 1
    if sslobj is not None:
        if sslobj.session_reused:
            L.stats["resumed"] += 1
        what = "%s %s" % (sslobj.version(), sslobj.cipher()[0])
        L.sessions[what] = L.sessions.get(what, 0) + 1


async def client_conn(L, down, ctx):
    """smtp-source (down) -> proxy (up)."""
    up = None
    try:
        up = await connect(L.other)
        if down.closed:
            raise ConnectionError("the client left before the proxy answered")
        if L.mode == "plain":
            L.stats["plain"] += 1
            splice(down, up)
            return
        if L.mode == "implicit":
            tls_used(L, await up.start_tls(ctx, False, "localhost"))
            splice(down, up)
            return
        code, lines, greeting = await up.reply()
        if code != "220":
            raise ConnectionError("greeting %r" % lines)
        up.transport.write(b"LHLO shim.bench.test\r\n")
        code, lines, _ = await up.reply()
        if code != "250" or not any(x[4:].upper().split()[:1] == ["STARTTLS"]
                                    for x in lines):
            raise ConnectionError("LHLO reply offers no STARTTLS: %r" % lines)
        up.transport.write(b"STARTTLS\r\n")
        code, lines, _ = await up.reply()
        if code != "220":
            raise ConnectionError("STARTTLS answered %r" % lines)
        tls_used(L, await up.start_tls(ctx, False, "localhost"))
        if down.closed:
            raise ConnectionError("the client left during the handshake")
        down.transport.write(greeting)
        splice(down, up)
    except Exception as e:
        L.error("%s: %s" % (type(e).__name__, e))
        close(down, up)


async def sink_conn(port, swallow):
    sink = await connect(port)
    if swallow:
        code, lines, _ = await sink.reply()
        if code != "220":
            raise ConnectionError("sink greeting %r" % lines)
    return sink


async def server_conn(L, up, ctx):
    """proxy (up) -> smtp-sink."""
    sink = None
    task = asyncio.ensure_future(sink_conn(L.other, L.mode == "starttls"))
    try:
        if L.mode == "plain":
            L.stats["plain"] += 1
        elif L.mode == "implicit":
            tls_used(L, await up.start_tls(ctx, True))
        else:
            up.transport.write(b"220 shim.bench.test LMTP (STARTTLS shim)\r\n")
            while True:
                line = await up.line()
                verb = line.split(None, 1)[0].upper() if line.strip() else b""
                if verb in (b"LHLO", b"EHLO"):
                    up.transport.write(LHLO_REPLY)
                elif verb == b"STARTTLS":
                    up.transport.pause_reading()    # until TLS takes over
                    up.transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                    break
                elif verb in (b"NOOP", b"RSET"):
                    up.transport.write(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    up.transport.write(b"221 2.0.0 Bye\r\n")
                    task.cancel()
                    close(up)
                    return
                else:
                    L.stats["refused"] += 1
                    up.transport.write(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            tls_used(L, await up.start_tls(ctx, True))
        sink = await task
        up.stats = L.stats
        splice(up, sink)
    except Exception as e:
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is None:
            sink = task.result()
        if not (isinstance(e, ConnectionError) and up.closed and not up.buf):
            L.error("%s: %s" % (type(e).__name__, e))
        close(up, sink)


class Accepted(Side):
    def __init__(self, L, handler, ctx):
        super().__init__(L.stats if L.role == "client" else None)
        self.L, self.handler, self.ctx = L, handler, ctx

    def connection_made(self, transport):
        super().connection_made(transport)
        self.L.stats["conns"] += 1
        if self.L.role == "server" and self.L.mode == "implicit":
            transport.pause_reading()       # the ClientHello is start_tls's
        asyncio.ensure_future(self.handler(self.L, self, self.ctx))


def bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    s.setblocking(False)
    return s


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", action="append", default=[])
    ap.add_argument("--server", action="append", default=[])
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--stats", required=True)
    a = ap.parse_args()

    cctx = ssl.create_default_context(cafile=a.ca)     # verifies chain and name
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(a.cert, a.key)
    # Neither proxy resumes sessions (the counters' "resumed" shows it):
    # tickets would be work for nothing, the more so for the proxy that
    # opens more backend connections.
    sctx.num_tickets = 0

    loop = asyncio.get_running_loop()
    listeners = [Listener("client", s) for s in a.client] + \
        [Listener("server", s) for s in a.server]
    for L in listeners:
        handler, ctx = (client_conn, cctx) if L.role == "client" else (server_conn, sctx)
        await loop.create_server(lambda L=L, h=handler, c=ctx: Accepted(L, h, c),
                                 sock=bind(L.port))

    seq = [0]

    def dump():
        out = {"seq": seq[0], "pid": os.getpid(),
               "listeners": {"%s:%s" % (L.role, L.name): L.stats for L in listeners},
               "sessions": {"%s:%s" % (L.role, L.name): L.sessions for L in listeners}}
        tmp = a.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, a.stats)
        seq[0] += 1

    loop.add_signal_handler(signal.SIGUSR1, dump)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    dump()
    await stop


if __name__ == "__main__":
    asyncio.run(main())
