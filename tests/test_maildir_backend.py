"""
The demo Maildir backend: its delivery against Twisted's interfaces, served
by our LMTP server, and its command line.
"""

import io
import os
import signal
import subprocess
import sys

from twisted.cred.credentials import Anonymous
from twisted.cred.portal import IRealm
from twisted.internet import defer, reactor
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from lmtp_proxy import maildir_backend
from lmtp_proxy.config import Config
from lmtp_proxy.maildir_backend import MaildirDelivery, MaildirRealm, makePortal
from lmtp_proxy.server import LMTPServerFactory
from tests import peers
from tests.lmtpclient import connectClient, lmtpDeliver, transaction
from tests.support import unixPath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipient(address):
    """
    An L{smtp.User} for C{address} (bytes), as a server passes it to
    C{validateTo}.
    """
    return smtp.User(address, b"client.test", None, b"sender@example.test")


def storedMessages(root, domain, user):
    """
    The contents of the files in C{root}'s Maildir of C{user@domain}'s new/.
    """
    new = os.path.join(root, domain, user, "Maildir", "new")
    contents = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            contents.append(f.read())
    return contents


def deliver(delivery, address, lines):
    """
    Validate C{address} and deliver C{lines} to it; the L{Deferred} of
    C{eomReceived}.
    """
    message = delivery.validateTo(recipient(address))()
    for line in lines:
        message.lineReceived(line)
    return message.eomReceived()


class MaildirDeliveryTests(unittest.TestCase):
    """
    L{MaildirDelivery} and L{maildir_backend.MaildirMessage}, with a
    temporary directory as root.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.mkdir(self.root)
        self.delivery = MaildirDelivery(self.root, "test")

    def maildir(self, domain, user):
        return os.path.join(self.root, domain, user, "Maildir")

    def test_providesIMessageDelivery(self):
        """
        The delivery provides L{smtp.IMessageDelivery}.
        """
        self.assertTrue(verifyObject(smtp.IMessageDelivery, self.delivery))

    def test_messageProvidesIMessage(self):
        """
        C{validateTo} returns a callable building an L{smtp.IMessage}.
        """
        message = self.delivery.validateTo(recipient(b"alice@example.test"))()
        self.assertTrue(verifyObject(smtp.IMessage, message))

    def test_anySender(self):
        """
        C{validateFrom} accepts any sender, returning it.
        """
        origin = smtp.Address(b"anyone@example.org")
        self.assertIs(self.delivery.validateFrom(b"client.test", origin), origin)

    def test_noReceivedHeader(self):
        """
        C{receivedHeader} adds no header.
        """
        origin = smtp.Address(b"anyone@example.org")
        users = [recipient(b"alice@example.test")]
        self.assertIsNone(self.delivery.receivedHeader(b"client.test", origin, users))

    def test_storesLinesWithLF(self):
        """
        The message lands in C{ROOT/domain/user/Maildir/new/}, each line
        ending in LF, and the L{Deferred} fires with its path.
        """
        d = deliver(self.delivery, b"alice@example.test", [b"Subject: hi", b"", b"body"])
        path = self.successResultOf(d)
        new = os.path.join(self.maildir("example.test", "alice"), "new")
        self.assertEqual(os.path.dirname(path), new)
        self.assertEqual(
            storedMessages(self.root, "example.test", "alice"), [b"Subject: hi\n\nbody\n"]
        )

    def test_emptyMessage(self):
        """
        A message without lines is stored as an empty file.
        """
        self.successResultOf(deliver(self.delivery, b"alice@example.test", []))
        self.assertEqual(storedMessages(self.root, "example.test", "alice"), [b""])

    def test_lowerCaseDirectories(self):
        """
        The domain and user directories are the address in lower case.
        """
        self.successResultOf(deliver(self.delivery, b"Alice@Example.TEST", [b"x"]))
        self.assertEqual(storedMessages(self.root, "example.test", "alice"), [b"x\n"])

    def test_oneFilePerMessage(self):
        """
        Each delivery to the same recipient is a file of its own.
        """
        self.successResultOf(deliver(self.delivery, b"alice@example.test", [b"one"]))
        self.successResultOf(deliver(self.delivery, b"alice@example.test", [b"two"]))
        stored = storedMessages(self.root, "example.test", "alice")
        self.assertEqual(sorted(stored), [b"one\n", b"two\n"])

    def test_maildirCreatedOnFirstDelivery(self):
        """
        Accepting a recipient creates nothing; its first line creates a
        whole Maildir (tmp, new, cur) holding the message in tmp/ only.
        """
        message = self.delivery.validateTo(recipient(b"alice@example.test"))()
        self.assertEqual(os.listdir(self.root), [])
        message.lineReceived(b"partial")
        maildir = self.maildir("example.test", "alice")
        self.assertEqual(
            [len(os.listdir(os.path.join(maildir, sub))) for sub in ("tmp", "new", "cur")],
            [1, 0, 0],
        )

    def test_connectionLostRemovesPartialMessage(self):
        """
        C{connectionLost} before the end removes the partial message and
        leaves new/ empty.
        """
        message = self.delivery.validateTo(recipient(b"alice@example.test"))()
        message.lineReceived(b"partial")
        message.connectionLost()
        maildir = self.maildir("example.test", "alice")
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(maildir, "new")), [])

    def test_connectionLostAfterEndKeepsMessage(self):
        """
        C{connectionLost} after a successful C{eomReceived} (the client left
        before reading its replies) leaves the delivered message in place.
        """
        message = self.delivery.validateTo(recipient(b"alice@example.test"))()
        message.lineReceived(b"kept")
        self.successResultOf(message.eomReceived())
        message.connectionLost()
        self.assertEqual(storedMessages(self.root, "example.test", "alice"), [b"kept\n"])

    def test_storageErrorIs451(self):
        """
        A Maildir that cannot be created fails C{eomReceived} with
        L{smtp.SMTPServerError} 451, the C{OSError}'s reason in its text.
        """
        with open(os.path.join(self.root, "example.test"), "w"):
            pass
        failure = self.failureResultOf(
            deliver(self.delivery, b"alice@example.test", [b"x"]), smtp.SMTPServerError
        )
        self.assertEqual(failure.value.code, 451)
        self.assertIn("4.3.0 Could not store the message: Not a directory", failure.value.resp)
        self.flushLoggedErrors(NotADirectoryError)

    def test_noDomainRefused(self):
        """
        An address without a domain is refused with 550 5.1.3.
        """
        user = recipient(b"alice")
        # A server gives b"" for a missing domain (smtp.Address itself would
        # fill in this host's name).
        user.dest.domain = b""
        error = self.assertRaises(smtp.SMTPBadRcpt, self.delivery.validateTo, user)
        self.assertEqual((error.code, error.resp), (550, "5.1.3 A domain is required"))

    def test_pathNamesRefused(self):
        """
        A local part or domain that is no plain directory name (C{.},
        C{..}, with C{/}) is refused with 550 5.1.3.
        """
        for address in (
            b"..@example.test",
            b".@example.test",
            b"a/b@example.test",
            b"alice@..",
            b'"../x"@example.test',
        ):
            user = recipient(address)
            user.dest.local, user.dest.domain = address.rsplit(b"@", 1)
            error = self.assertRaises(smtp.SMTPBadRcpt, self.delivery.validateTo, user)
            self.assertEqual(error.code, 550, address)


class RealmTests(unittest.TestCase):
    """
    L{MaildirRealm} and L{makePortal}.
    """

    def setUp(self):
        self.delivery = MaildirDelivery(self.mktemp(), "test")

    def test_providesIRealm(self):
        """
        The realm provides L{IRealm}.
        """
        self.assertTrue(verifyObject(IRealm, MaildirRealm(self.delivery)))

    def test_otherInterfaceRefused(self):
        """
        The realm offers no avatar but an L{smtp.IMessageDelivery}.
        """
        self.assertRaises(
            NotImplementedError,
            MaildirRealm(self.delivery).requestAvatar,
            None,
            "unix",
            smtp.IMessageDeliveryFactory,
        )

    def test_anonymousLogin(self):
        """
        An anonymous login for L{smtp.IMessageDelivery} gets the delivery.
        """
        d = makePortal(self.delivery).login(Anonymous(), "127.0.0.1:5555", smtp.IMessageDelivery)
        interface, avatar, logout = self.successResultOf(d)
        self.assertIs(interface, smtp.IMessageDelivery)
        self.assertIs(avatar, self.delivery)


class ArgumentTests(unittest.TestCase):
    """
    L{maildir_backend.parseArguments}.
    """

    def test_listen(self):
        """
        C{--listen HOST:PORT} is a host and a port number.
        """
        arguments = maildir_backend.parseArguments(
            ["--name", "old", "--listen", "127.0.0.1:24101", "--root", "demo/old"]
        )
        self.assertEqual(arguments.listen, ("127.0.0.1", 24101))
        self.assertIsNone(arguments.socket)

    def test_listenIPv6(self):
        """
        An IPv6 address is written in brackets.
        """
        arguments = maildir_backend.parseArguments(
            ["--name", "old", "--listen", "[::1]:24101", "--root", "r"]
        )
        self.assertEqual(arguments.listen, ("::1", 24101))

    def test_socket(self):
        """
        C{--socket PATH} is a unix socket path.
        """
        arguments = maildir_backend.parseArguments(
            ["--name", "new", "--socket", "demo/new.sock", "--root", "r"]
        )
        self.assertEqual(arguments.socket, "demo/new.sock")
        self.assertIsNone(arguments.listen)

    def test_usageErrors(self):
        """
        A bad port, no address, or both a socket and an address, exit with
        status 2.
        """
        for argv in (
            ["--name", "old", "--listen", "127.0.0.1:lots", "--root", "r"],
            ["--name", "old", "--listen", "127.0.0.1:0", "--root", "r"],
            ["--name", "old", "--root", "r"],
            ["--name", "old", "--listen", "127.0.0.1:24101", "--socket", "s", "--root", "r"],
        ):
            self.patch(sys, "stderr", io.StringIO())
            error = self.assertRaises(SystemExit, maildir_backend.parseArguments, argv)
            self.assertEqual(error.code, 2, argv)


class ServedTests(unittest.TestCase):
    """
    The delivery behind L{LMTPServerFactory} on 127.0.0.1, as
    C{maildir_backend.main} serves it.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.mkdir(self.root)
        config = Config(source="<test>", socket=("127.0.0.1", 0), hostname="test.demo")
        factory = LMTPServerFactory(
            makePortal(MaildirDelivery(self.root, "test")), reactor, lambda: config
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def send(self, recipients, body, replies):
        """
        One pipelined session; the last line of its first C{replies}
        replies.
        """
        client = yield connectClient(self, self.port.getHost().port)
        client.send(transaction(recipients, body))
        received = yield client.waitReplies(replies)
        return received

    @defer.inlineCallbacks
    def test_deliversEachRecipient(self):
        """
        Each recipient gets its own 250 after the final dot and its own
        copy, dot-unstuffed, with LF line endings.
        """
        replies = yield self.send(
            [b"alice@example.test", b"bob@example.org"], b"Subject: hi\r\n\r\n..dot\r\n", 8
        )
        self.assertEqual(
            [r[:3] for r in replies], ["220", "250", "250", "250", "250", "354", "250", "250"]
        )
        stored = b"Subject: hi\n\n.dot\n"
        self.assertEqual(storedMessages(self.root, "example.test", "alice"), [stored])
        self.assertEqual(storedMessages(self.root, "example.org", "bob"), [stored])

    @defer.inlineCallbacks
    def test_refusedRecipient(self):
        """
        A recipient without a domain is refused at RCPT with 550 5.1.3,
        the others delivered.
        """
        replies = yield self.send([b"alice", b"bob@example.org"], b"x\r\n", 7)
        self.assertEqual(replies[3], "550 5.1.3 A domain is required")
        self.assertEqual(replies[6][:3], "250")
        self.assertEqual(storedMessages(self.root, "example.org", "bob"), [b"x\n"])

    @defer.inlineCallbacks
    def test_storageFailureDefersOnlyItsRecipient(self):
        """
        A recipient whose Maildir cannot be written gets 451 after the final
        dot; the other recipient of the message gets 250.
        """
        with open(os.path.join(self.root, "broken.test"), "w"):
            pass
        replies = yield self.send([b"alice@broken.test", b"bob@example.org"], b"x\r\n", 8)
        self.assertEqual([r[:3] for r in replies[6:]], ["451", "250"])
        self.assertEqual(storedMessages(self.root, "example.org", "bob"), [b"x\n"])
        self.flushLoggedErrors(NotADirectoryError)


class MainTests(unittest.TestCase):
    """
    C{python -m lmtp_proxy.maildir_backend}, as C{make run} starts it.
    """

    def start(self):
        """
        Run the backend on a unix socket; its L{subprocess.Popen} once it
        listens.
        """
        self.root = os.path.abspath(self.mktemp())
        self.socket = unixPath(self)
        self.output = os.path.abspath(self.mktemp())
        with open(self.output, "wb") as output:
            backend = subprocess.Popen(
                [sys.executable, "-m", "lmtp_proxy.maildir_backend", "--name", "test",
                 "--socket", self.socket, "--root", self.root],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # SIGINT at its default, as in a terminal.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.addCleanup(peers.stopPid, backend.pid, popen=backend)
        peers.waitFor(lambda: peers.canConnect(self.socket), 30, what="the backend to listen")
        return backend

    def log(self):
        with open(self.output, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def deliverAndStop(self, stop):
        """
        Deliver to alice, stop the backend with signal C{stop}, and check
        that it exits with status 0, its socket gone.
        """
        backend = self.start()
        result = lmtpDeliver(self.socket, "s@example.org", ["alice@example.test"], b"hello\r\n")
        self.assertEqual(result["final"][0][1].code, 250, result["lines"])
        self.assertEqual(storedMessages(self.root, "example.test", "alice"), [b"hello\n"])
        self.assertIn("delivered <alice@example.test> to " + self.root, self.log())
        backend.send_signal(stop)
        self.assertEqual(backend.wait(30), 0, self.log())
        self.assertFalse(os.path.exists(self.socket))

    def test_stopsOnSIGTERM(self):
        """
        The backend delivers, logs to stdout, and stops with status 0 on
        SIGTERM.
        """
        self.deliverAndStop(signal.SIGTERM)

    def test_stopsOnSIGINT(self):
        """
        The backend stops with status 0 on SIGINT (Ctrl-C).
        """
        self.deliverAndStop(signal.SIGINT)

    def test_cannotListen(self):
        """
        A socket that cannot be created is one logged line and exit status 1.
        """
        root = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "lmtp_proxy.maildir_backend", "--name", "test",
             "--socket", os.path.join(root, "missing", "s.sock"), "--root", root],
            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("[maildir_backend.test#error] cannot listen on " + root, result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
