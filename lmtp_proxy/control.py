"""
The control socket behind C{lmtp-proxy reload [--wait]}.

One request line, one reply line (see C{docs/design.rst}). Unless the
configuration names a path, the socket is a Linux abstract socket named after
the configuration file, so the file alone identifies a running proxy and two
proxies never share one.

L{ControlSocket} is the proxy's child service that listens on it.
"""

import hashlib
import json
import os
import socket
import struct

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from lmtp_proxy.config import ConfigError
from lmtp_proxy.listening import removeStaleSocket
from lmtp_proxy.state import DrainTimeout
from lmtp_proxy.twisted_internals import listenUNIXQuietly


def controlAddress(config):
    """
    The address of the control socket of the proxy that runs C{config}.
    """
    if config.control_socket:
        return config.control_socket
    digest = hashlib.sha1(os.path.realpath(config.source).encode("utf-8"))
    return "\0lmtp-proxy:" + digest.hexdigest()[:20]


def _peerUID(transport):
    handle = transport.getHandle()
    credentials = handle.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    return struct.unpack("3i", credentials)[1]


class ControlProtocol(LineOnlyReceiver):
    """
    Answers one request from C{lmtp-proxy reload} or C{status}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1024
    log = Logger()

    def connectionMade(self):
        """
        Only root and the proxy's own user may reload it.
        """
        uid = _peerUID(self.transport)
        if uid not in (0, os.getuid()):
            self._answer("error permission denied")

    def lineReceived(self, line):
        """
        Run one request.
        """
        words = line.decode("ascii", "replace").split()
        reloader = self.factory.reloader
        if words == ["status"]:
            state = reloader.state
            self._answer(
                "ok generation=%d transactions=%d"
                % (state.generation, state.transactions)
            )
        elif words == ["status-json"]:
            self.factory.status().addCallbacks(
                lambda status: self._answer("ok " + json.dumps(status, sort_keys=True)),
                self._failed,
            )
        elif words == ["reload"]:
            reloader.reload().addCallbacks(self._reloaded, self._failed)
        elif len(words) == 2 and words[0] == "reload-wait" and _isNumber(words[1]):
            timeout = float(words[1])

            def wait(result):
                generation, _ = result
                return reloader.whenDrained(generation, timeout)

            reloader.reload().addCallback(wait).addCallbacks(
                lambda generation: self._answer(
                    "ok generation=%d drained" % (generation,)
                ),
                self._failed,
            )
        else:
            self._answer("error unknown request")

    def _reloaded(self, result):
        generation, summary = result
        self._answer("ok generation=%d %s" % (generation, summary))

    def _failed(self, failure):
        if failure.check(DrainTimeout):
            self._answer("timeout %s" % (failure.value,))
        elif failure.check(ConfigError):
            self._answer("error %s" % (failure.value,))
        else:
            self.log.failure("control request failed", failure)
            self._answer("error internal error, see the log")

    def _answer(self, text):
        self.sendLine(text.replace("\n", " ").encode("utf-8"))
        self.transport.loseConnection()


def _isNumber(text):
    try:
        return float(text) >= 0
    except ValueError:
        return False


class ControlFactory(protocol.Factory):
    """
    Builds L{ControlProtocol}s that ask C{reloader} (the proxy's
    L{lmtp_proxy.service.Reloader}) to reload and wait, and C{status} for
    the proxy's status.
    """

    protocol = ControlProtocol

    def __init__(self, reloader, status):
        """
        @param status: returns a L{Deferred} firing with a JSON-ready dict
            (L{lmtp_proxy.service.ProxyService.status}).
        """
        self.reloader = reloader
        self.status = status


class ControlSocket(service.Service):
    """
    Listens on the control socket while the proxy runs.

    @ivar port: the listening port, once bound.
    """

    name = "control"
    log = Logger()
    port = None

    def __init__(self, reactor, address, reloader, status):
        """
        @param address: the socket, from L{controlAddress}.
        @param reloader: what the requests reach, with C{status}, as for
            L{ControlFactory}.
        """
        self._reactor = reactor
        self.address = address
        self._factory = ControlFactory(reloader, status)

    def privilegedStartService(self):
        """
        Bind the control socket. One that cannot be bound costs only
        C{reload --wait}, so the proxy starts without it.

        @see: L{twisted.application.service.IService.privilegedStartService}
        """
        try:
            if not self.address.startswith("\0"):
                removeStaleSocket(self.address)
            self.port = listenUNIXQuietly(self._reactor, self.address, self._factory, 0o600)
        except Exception as e:
            self.log.warn(
                "control socket unavailable ({error}); "
                "reload --wait will not work, SIGUSR1 still reloads",
                error=e,
            )
        service.Service.privilegedStartService(self)

    def stopService(self):
        """
        Stop answering requests.

        @see: L{twisted.application.service.IService.stopService}
        """
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
