"""
A small LMTP delivery agent storing mail in Maildirs: the demo backends
that C{make run} starts next to the proxy.

It is a development aid, never part of the proxy's service: the proxy does
not import it.  Each recipient C{user@domain} is delivered to
C{ROOT/domain/user/Maildir/} (both lower case), created on its first
delivery.  A message is stored as the client sent it, after dot-unstuffing
and with no header added, each line ending in LF as Maildir files usually
do (CRLF becomes LF).  It is written to C{tmp/} and renamed into C{new/}
once complete, so a mail reader never sees part of a message.

Run as::

    python -m lmtp_proxy.maildir_backend --name old --listen 127.0.0.1:24101 --root demo/old
    python -m lmtp_proxy.maildir_backend --name new --socket demo/new.sock --root demo/new

It logs to stdout and stops on SIGINT or SIGTERM.
"""

import argparse
import itertools
import os
import socket
import sys
import time

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.mail import smtp
from twisted.mail.maildir import initializeMaildir
from twisted.python.failure import Failure
from zope.interface import implementer

from lmtp_proxy.config import Config
from lmtp_proxy.server import LMTPServerFactory

_deliveries = itertools.count(1)


def _uniqueName():
    """
    A file name unique to this delivery, as the Maildir specification
    builds them: time, microseconds, process id, a per-process delivery
    count and the host name (with C{/} and C{:} escaped).
    """
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return "%d.M%06dP%dQ%d.%s" % (
        now,
        (now % 1) * 1e6,
        os.getpid(),
        next(_deliveries),
        host,
    )


def _isDirectoryName(name):
    """
    Whether C{name} (bytes from an address) can be one directory below the
    root: anything else (C{..}, a C{/}) would reach outside it.
    """
    return name not in (b"", b".", b"..") and b"/" not in name and b"\0" not in name


@implementer(smtp.IMessage)
class MaildirMessage:
    """
    One recipient's copy of a message, on its way into a Maildir.

    No file is touched before the first line (or the end of an empty
    message), and an error on the way is kept for L{eomReceived}: the
    failure of its L{Deferred} is the one error a server turns into a reply
    (451) for this recipient alone, where an exception raised while the
    message is built or fed could cost the whole session.

    @ivar path: where the message is, once delivered.
    """

    def __init__(self, maildir, recipient, log):
        """
        @param maildir: the Maildir directory; it and its parents are
            created when missing.
        @param recipient: the address, for the log.
        @param log: the L{Logger} of the delivery.
        """
        self._maildir = maildir
        self._recipient = recipient
        self._log = log
        name = _uniqueName()
        self._tmp = os.path.join(maildir, "tmp", name)
        self.path = os.path.join(maildir, "new", name)
        self._file = None
        self._error = None

    def lineReceived(self, line):
        """
        Store one line.  See L{smtp.IMessage.lineReceived}.
        """
        if self._error is None:
            try:
                self._open().write(line + b"\n")
            except OSError:
                self._fail()

    def eomReceived(self):
        """
        Make the message durable and move it into C{new/}.  See
        L{smtp.IMessage.eomReceived}.

        @return: a L{Deferred} firing with the message's path, or failing
            with L{smtp.SMTPServerError} 451 when it could not be stored.
        """
        if self._error is None:
            try:
                stored = self._open()
                stored.flush()
                # The 250 this earns tells the client the message is safe.
                os.fsync(stored.fileno())
                stored.close()
                os.rename(self._tmp, self.path)
            except OSError:
                self._fail()
            else:
                self._file = None
                self._log.info(
                    "delivered <{recipient}> to {path}", recipient=self._recipient, path=self.path
                )
                return defer.succeed(self.path)
        self._log.failure(
            "could not deliver <{recipient}> to {maildir}",
            self._error,
            recipient=self._recipient,
            maildir=self._maildir,
        )
        reason = "4.3.0 Could not store the message: %s" % (self._error.value.strerror,)
        return defer.fail(smtp.SMTPServerError(451, reason))

    def connectionLost(self):
        """
        The message will not be complete: remove what was written.  See
        L{smtp.IMessage.connectionLost}.
        """
        self._discard()

    def _open(self):
        if self._file is None:
            os.makedirs(os.path.dirname(self._maildir), exist_ok=True)
            initializeMaildir(self._maildir)
            self._file = open(self._tmp, "xb")
        return self._file

    def _fail(self):
        self._error = Failure()
        self._discard()

    def _discard(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.remove(self._tmp)
            except FileNotFoundError:
                pass


@implementer(smtp.IMessageDelivery)
class MaildirDelivery:
    """
    Accepts any sender and every recipient with a domain, each to its own
    Maildir below C{root}.
    """

    def __init__(self, root, name):
        """
        @param root: the directory holding one directory per domain.
        @param name: the backend's name, the namespace of its log.
        """
        self.root = root
        self.log = Logger(namespace="maildir_backend." + name)

    def receivedHeader(self, helo, origin, recipients):
        """
        Add no header: the message is stored as it was sent.  See
        L{smtp.IMessageDelivery.receivedHeader}.
        """
        return None

    def validateFrom(self, helo, origin):
        """
        Accept any sender.  See L{smtp.IMessageDelivery.validateFrom}.
        """
        return origin

    def validateTo(self, user):
        """
        Accept a recipient whose address names a directory below the root.
        See L{smtp.IMessageDelivery.validateTo}.

        @raise smtp.SMTPBadRcpt: 550 when the address has no domain, or a
            local part or domain that is no directory name.
        """
        local = user.dest.local.lower()
        domain = user.dest.domain.lower()
        if not domain:
            raise smtp.SMTPBadRcpt(user, 550, "5.1.3 A domain is required")
        if not (_isDirectoryName(local) and _isDirectoryName(domain)):
            raise smtp.SMTPBadRcpt(user, 550, "5.1.3 No mailbox can have this name")
        maildir = os.path.join(self.root, os.fsdecode(domain), os.fsdecode(local), "Maildir")
        recipient = (user.dest.local + b"@" + user.dest.domain).decode("utf-8", "replace")
        return lambda: MaildirMessage(maildir, recipient, self.log)


@implementer(IRealm)
class MaildirRealm:
    """
    Gives every client the same L{MaildirDelivery}.
    """

    def __init__(self, delivery):
        self.delivery = delivery

    def requestAvatar(self, avatarId, mind, *interfaces):
        """
        See L{IRealm.requestAvatar}.

        @raise NotImplementedError: when L{smtp.IMessageDelivery} is not
            among C{interfaces}.
        """
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, self.delivery, lambda: None
        raise NotImplementedError("only IMessageDelivery avatars are offered")


def makePortal(delivery):
    """
    A L{Portal} letting anonymous clients deliver through C{delivery}.
    """
    return Portal(MaildirRealm(delivery), [AllowAnonymousAccess()])


def _hostAndPort(text):
    """
    C{HOST:PORT} or C{[IPV6]:PORT} as C{(host, port)}, for argparse.
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (colon and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError("must be HOST:PORT, not %r" % (text,))
    return host, int(port)


def parseArguments(argv):
    """
    The command line of L{main}; exits with status 2 on a usage error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lmtp_proxy.maildir_backend",
        description="Serve LMTP and deliver each recipient to ROOT/domain/user/Maildir/.",
    )
    parser.add_argument("--name", required=True, help="backend name, for the log and greeting")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--listen", type=_hostAndPort, metavar="HOST:PORT", help="TCP address to listen on"
    )
    where.add_argument("--socket", metavar="PATH", help="unix socket to listen on")
    parser.add_argument("--root", required=True, help="directory holding the Maildirs")
    return parser.parse_args(argv)


def _endpoint(reactor, arguments):
    if arguments.socket is not None:
        # The lock file lets a restart replace the socket of a dead run.
        return UNIXServerEndpoint(reactor, arguments.socket, wantPID=True)
    host, port = arguments.listen
    endpoint = TCP6ServerEndpoint if isIPv6Address(host) else TCP4ServerEndpoint
    return endpoint(reactor, port, interface=host)


@defer.inlineCallbacks
def _serve(reactor, arguments):
    """
    Serve the Maildir delivery with our LMTP server where C{arguments} say.
    """
    delivery = MaildirDelivery(arguments.root, arguments.name)
    listen = arguments.socket if arguments.socket is not None else arguments.listen
    config = Config(source="<demo>", socket=listen, hostname=arguments.name + ".demo")
    factory = LMTPServerFactory(makePortal(delivery), reactor, lambda: config)
    where = arguments.socket or "%s:%d" % arguments.listen
    try:
        yield _endpoint(reactor, arguments).listen(factory)
    except (CannotListenError, OSError) as error:
        delivery.log.error("cannot listen on {where}: {error}", where=where, error=error)
        raise SystemExit(1)
    delivery.log.info(
        "listening on {where}, delivering to Maildirs under {root}",
        where=where,
        root=arguments.root,
    )
    # Serve until SIGINT or SIGTERM stops the reactor.
    yield defer.Deferred()


def main(argv=None):
    """
    Run one Maildir backend until SIGINT or SIGTERM; exit status 0 then, 1
    when it cannot listen, 2 on a usage error.

    @param argv: the arguments, without the program name (default: the
        process's).
    """
    arguments = parseArguments(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    task.react(_serve, [arguments])


if __name__ == "__main__":
    main()
