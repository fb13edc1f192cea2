"""
systemd's readiness protocol (sd_notify(3)) without libsystemd.

Under C{Type=notify} systemd names a unix datagram socket in
C{NOTIFY_SOCKET}; each datagram holds newline-separated C{KEY=VALUE}
assignments: C{READY=1} once the proxy listens, C{RELOADING=1} and then
C{READY=1} around a reload, C{STOPPING=1} when it stops. A name starting
with C{@} is a Linux abstract socket.

L{Notifier} sends them, and L{NotifyService} is the child of the proxy's
service that says when it is ready and when it stops.
"""

import os
import socket
import time

from twisted.application import service
from twisted.logger import Logger


class Notifier:
    """
    Sends state changes to systemd, or nothing when not run by systemd.

    @ivar address: the socket, as for C{socket.connect}, or C{None}.
    """

    log = Logger()

    def __init__(self, address):
        self.address = address

    @classmethod
    def fromEnvironment(cls, environ=None):
        """
        The notifier for C{NOTIFY_SOCKET} in C{environ} (by default, this
        process's environment).
        """
        if environ is None:
            environ = os.environ
        name = environ.get("NOTIFY_SOCKET") or None
        if name is not None and name.startswith("@"):
            name = "\0" + name[1:]
        return cls(name)

    def notify(self, *assignments):
        """
        Send one datagram of C{KEY=VALUE} C{assignments}. A failure is
        logged, never raised: systemd's bookkeeping must not stop the mail.
        """
        if self.address is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.address)
            sock.sendall("\n".join(assignments).encode("utf-8"))
        except OSError as e:
            self.log.warn("cannot notify systemd ({error})", error=e)
        finally:
            sock.close()

    def reloading(self):
        """
        A reload begins. C{MONOTONIC_USEC} lets systemd tell this reload's
        C{READY=1} from an earlier one.
        """
        self.notify(
            "RELOADING=1",
            "MONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,),
        )

    def ready(self, status):
        """
        Started, or done reloading; C{status} is shown by C{systemctl
        status}.
        """
        self.notify("READY=1", "STATUS=" + status)


class NotifyService(service.Service):
    """
    The last child of the proxy's service: started after every other one,
    so it tells systemd the proxy is ready; stopped first, so it tells
    systemd at once that the proxy is stopping.
    """

    name = "notify"

    def __init__(self, notifier, describe, serving=None):
        """
        @param notifier: a L{Notifier}.
        @param describe: returns the C{STATUS=} text.
        @param serving: a L{Deferred} that fires once the proxy delivers
            (the database source's first table), or C{None} when it does
            as soon as it listens: units ordered after this one (the MTA)
            start only then.
        """
        self._notifier = notifier
        self._describe = describe
        self._serving = serving

    def startService(self):
        """
        See L{twisted.application.service.IService.startService}.
        """
        service.Service.startService(self)
        if self._serving is None:
            self._notifier.ready(self._describe())
            return

        def serving(result):
            if self.running:
                self._notifier.ready(self._describe())
            return result

        self._serving.addCallback(serving)

    def stopService(self):
        """
        See L{twisted.application.service.IService.stopService}.
        """
        service.Service.stopService(self)
        self._notifier.notify("STOPPING=1")
