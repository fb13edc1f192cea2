"""
Backend connections, reused across transactions and client sessions when
C{pool_size} allows it.
"""

from collections import defaultdict

from twisted.internet import defer
from twisted.logger import Logger

from lmtp_proxy.client import BackendError, connectBackend
from lmtp_proxy.outbox import Outbox


class BackendPool:
    """
    Hands out ready L{lmtp_proxy.client.LMTPClient}s per backend definition.

    A connection goes back to the pool only after a transaction ended
    cleanly on it; one that failed in any way is dropped. Connections are
    keyed by the backend's whole definition, so a reload that changes a
    backend's address or credentials never reuses an old connection.

    @ivar outbox: the L{Outbox} the connections write through, to be shared
        with the client sessions that use them.
    """

    log = Logger()

    def __init__(self, reactor, connect=connectBackend):
        self._reactor = reactor
        self._connect = connect
        self.outbox = Outbox()
        self._idle = defaultdict(list)
        self._timers = {}

    def acquire(self, backend, config):
        """
        Return a L{Deferred} firing with C{(client, reused)}, or failing with
        a L{BackendError} (logged once here).
        """
        idle = self._idle.get(backend)
        while idle:
            client = idle.pop()
            self._timers.pop(client).cancel()
            if client.usable:
                return defer.succeed((client, True))
        connecting = self._connect(
            self._reactor,
            backend,
            config.hostname,
            config.connect_timeout,
            config.command_timeout,
            self.outbox,
        )

        def failed(failure):
            failure.trap(BackendError)
            self.log.warn(
                "backend {backend} ({address}): connection failed: "
                "{error.summary}: {error.detail}",
                backend=backend.name,
                address=backend.describe(),
                error=failure.value,
            )
            return failure

        return connecting.addCallbacks(lambda client: (client, False), failed)

    def release(self, backend, client, config):
        """
        Take back a connection whose transaction ended cleanly: keep it for
        reuse, or say QUIT.
        """
        # This runs while the client still reads the backend's last reply:
        # a stray reply line in the same read must find the connection
        # failed, not answering the next transaction's MAIL.
        self._reactor.callLater(0, self._keep, backend, client, config)

    def _keep(self, backend, client, config):
        idle = self._idle[backend]
        if not client.usable:
            return
        if len(idle) >= config.pool_size:
            self._quit(client)
            return
        idle.append(client)
        self._timers[client] = self._reactor.callLater(
            config.pool_idle_timeout, self._expire, backend, client
        )

    def closeIdle(self):
        """
        Say QUIT on every idle connection.
        """
        for idle in self._idle.values():
            for client in idle:
                self._timers.pop(client).cancel()
                self._quit(client)
        self._idle.clear()

    def _expire(self, backend, client):
        del self._timers[client]
        self._idle[backend].remove(client)
        self._quit(client)

    @staticmethod
    def _quit(client):
        if client.usable:
            client.sendLine(b"QUIT")
            client.transport.loseConnection()
