"""
The control socket behind C{lmtp-proxy reload [--wait]}.

One request line, one reply line (see C{docs/design.rst}). Unless the
configuration names a path, the socket is a Linux abstract socket named after
the configuration file, so the file alone identifies a running proxy and two
proxies never share one.
"""

import hashlib
import os
import socket
import struct

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from lmtp_proxy.config import ConfigError
from lmtp_proxy.state import DrainTimeout


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
        service = self.factory.service
        if words == ["status"]:
            state = service.state
            self._answer(
                "ok generation=%d transactions=%d"
                % (state.generation, state.transactions)
            )
        elif words == ["reload"]:
            service.reload().addCallbacks(self._reloaded, self._failed)
        elif len(words) == 2 and words[0] == "reload-wait" and _isNumber(words[1]):
            timeout = float(words[1])

            def wait(result):
                generation, _ = result
                return service.whenDrained(generation, timeout)

            service.reload().addCallback(wait).addCallbacks(
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
    Builds L{ControlProtocol}s for one L{lmtp_proxy.service.ProxyService}.
    """

    protocol = ControlProtocol

    def __init__(self, service):
        self.service = service
