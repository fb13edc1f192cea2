"""
TLS on both sides, SASL, client access control and the PROXY protocol, on
loopback with certificates made at test time.
"""

import base64
import os
import struct

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy.access import FailureDelays, readUsersFile
from lmtp_proxy.client import BackendTLSFailed, connectBackend
from lmtp_proxy.reloader import loadChecked
from tests.certificates import Authority, hashPassword, requireTLS
from tests.lmtpclient import connectClient, exchange, mail
from tests.support import FakeBackend, Proxy, readUntil, waitUntil

PASSWORD = "correct horse battery"


class _Logged:
    """
    Collects the log texts emitted during a test.
    """

    def __init__(self, testcase):
        from twisted.logger import formatEvent

        self.texts = []
        self._observer = lambda event: self.texts.append(formatEvent(event))
        globalLogPublisher.addObserver(self._observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observer)

    def matching(self, text):
        return [t for t in self.texts if text in t]


class TLSCase(unittest.TestCase):
    """
    A CA, a certificate for localhost/127.0.0.1 and a users file.
    """

    def setUp(self):
        requireTLS()
        self.dir = self.mktemp()
        self.ca = Authority(self.dir)
        self.certificate, self.key = self.ca.issue("server")
        self.usersFile = os.path.join(self.dir, "clients")
        with open(self.usersFile, "w") as f:
            f.write("# clients\npostfix:%s\n" % (hashPassword(PASSWORD),))

    def clientOptions(self, caFile=None):
        from twisted.internet import ssl

        with open(caFile or self.ca.caFile, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS("localhost", trustRoot=trust)

    def serverOptions(self, certificate=None, key=None):
        from lmtp_proxy.tls import serverOptions

        config = configuration.parse(
            "config:\n  socket: /s\n  tls: {certificate: %s, key: %s}\n"
            % (certificate or self.certificate, key or self.key)
        )
        return serverOptions(config)

    def proxy(self, backend=None, **settings):
        backend = backend or FakeBackend(self)
        self.backend = backend
        settings.setdefault("tls", {"certificate": self.certificate, "key": self.key})
        return Proxy(self, settings, {"b": backend.entry}, {"@a.test": "b"})

    @defer.inlineCallbacks
    def startTLS(self, client):
        """
        STARTTLS on C{client}, then LHLO under TLS; fires with the LHLO
        reply's lines.
        """
        replies = yield exchange(client, b"STARTTLS\r\n", 1)
        self.assertEqual(replies, ["220 2.0.0 Ready to start TLS"])
        client.startTLS(self.clientOptions())
        start = len(client.replies)
        yield exchange(client, b"LHLO client.test\r\n", 1)
        return client.replies[start].lines


class ListenerTLSTests(TLSCase):
    """
    STARTTLS and implicit TLS on the listener.
    """

    @defer.inlineCallbacks
    def test_startTLSOfferedBeforeTLSOnly(self):
        """
        LHLO offers STARTTLS in clear, not AUTH; under TLS it offers AUTH
        and no longer STARTTLS.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile})
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO client.test\r\n", 1)
        clear = client.replies[-1].lines
        secure = yield self.startTLS(client)
        self.assertIn("STARTTLS", [l[4:] for l in clear])
        self.assertFalse([l for l in clear if "AUTH" in l])
        self.assertIn("AUTH PLAIN LOGIN", [l[4:] for l in secure])
        self.assertFalse([l for l in secure if "STARTTLS" in l])

    @defer.inlineCallbacks
    def test_nothingOfferedWithoutTLSConfigured(self):
        """
        Without config.tls, LHLO offers neither, and STARTTLS is not
        implemented: today's behaviour.
        """
        backend = FakeBackend(self)
        proxy = Proxy(self, {}, {"b": backend.entry}, {"@a.test": "b"})
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN\r\n", 3)
        self.assertFalse([l for l in client.replies[1].lines if "STARTTLS" in l or "AUTH" in l])
        self.assertEqual(replies[1:], ["502 5.5.1 Error: command not implemented"] * 2)

    @defer.inlineCallbacks
    def test_commandsPipelinedAfterSTARTTLSDiscarded(self):
        """
        C{STARTTLS\\r\\nRSET\\r\\n} in one write: only the 220 is answered,
        the RSET that came in clear is never run, and after the handshake
        the session starts again (MAIL before a new LHLO is refused).
        """
        proxy = self.proxy()
        client = yield proxy.connect(self)
        yield exchange(client, b"LHLO client.test\r\n", 1)
        replies = yield exchange(client, b"STARTTLS\r\nRSET\r\n", 1)
        self.assertEqual(replies, ["220 2.0.0 Ready to start TLS"])
        client.startTLS(self.clientOptions())
        replies = yield exchange(client, b"MAIL FROM:<s@example.test>\r\n", 1)
        self.assertEqual(replies, ["503 5.5.1 Error: send LHLO first"])
        self.assertEqual(len(client.replies), 4)

    @defer.inlineCallbacks
    def test_deliveryUnderSTARTTLS(self):
        """
        A transaction under TLS reaches the backend; the log names the TLS
        version and cipher of the session once.
        """
        logged = _Logged(self)
        proxy = self.proxy()
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        replies = yield exchange(client, mail([b"x@a.test"]), 4)
        self.assertEqual(replies[-1], "250 2.0.0 <x@a.test> Saved")
        self.assertEqual(len(logged.matching(": TLS TLSv1.")), 1)

    @defer.inlineCallbacks
    def test_requireTLS(self):
        """
        With require_tls, MAIL before STARTTLS gets 530 5.7.0.
        """
        proxy = self.proxy(require_tls=True)
        client = yield proxy.connect(self)
        replies = yield exchange(client, b"LHLO c.test\r\nMAIL FROM:<s@example.test>\r\n", 2)
        self.assertEqual(replies[1], "530 5.7.0 Must issue a STARTTLS command first")

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        """
        With tls.implicit the greeting comes under TLS, and mail is
        delivered.
        """
        proxy = self.proxy(
            tls={"certificate": self.certificate, "key": self.key, "implicit": True}
        )
        client = yield connectClient(self, proxy.address, tls=self.clientOptions())
        replies = yield exchange(client, b"LHLO c.test\r\n" + mail([b"x@a.test"]), 5)
        self.assertTrue(client.replies[0].line.startswith("220 "))
        self.assertNotIn("STARTTLS", " ".join(client.replies[1].lines))
        self.assertEqual(replies[-1], "250 2.0.0 <x@a.test> Saved")


class ResumptionTests(TLSCase):
    """
    A client that kept its TLS session (Postfix with
    C{lmtp_tls_session_cache_database}) resumes it on its next connection
    rather than paying a full handshake again.
    """

    @defer.inlineCallbacks
    def test_implicitTLSSessionResumed(self):
        """
        The second connection of a client that offers the session of its
        first is resumed.
        """
        import socket
        import ssl

        proxy = self.proxy(
            tls={"certificate": self.certificate, "key": self.key, "implicit": True}
        )
        port = proxy.address
        context = ssl.create_default_context(cafile=self.ca.caFile)

        def connect(session):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                    # TLS 1.3 tickets come after the handshake: read the
                    # greeting and a reply before asking for the session.
                    tls.sendall(b"LHLO c.test\r\nQUIT\r\n")
                    readUntil(tls, b"221")
                    return tls.session, tls.session_reused

        first, reused = yield threads.deferToThread(connect, None)
        self.assertFalse(reused)
        _, reused = yield threads.deferToThread(connect, first)
        self.assertTrue(reused)


class SASLTests(TLSCase):
    """
    SASL AUTH through the factory's portal.
    """

    def setUp(self):
        TLSCase.setUp(self)
        self.logged = _Logged(self)

    def plain(self, user="postfix", password=PASSWORD):
        return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())

    @defer.inlineCallbacks
    def test_authPlain(self):
        """
        AUTH PLAIN with the users file's password gets 235, the routing is
        the same, and the log names the login.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile, "required": True})
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        replies = yield exchange(client, b"AUTH PLAIN " + self.plain() + b"\r\n", 1)
        self.assertEqual(replies, ["235 2.7.0 Authentication successful"])
        replies = yield exchange(client, mail([b"x@a.test"]), 4)
        self.assertEqual(replies[-1], "250 2.0.0 <x@a.test> Saved")
        self.assertTrue(self.logged.matching("authenticated as postfix"))

    @defer.inlineCallbacks
    def test_authLogin(self):
        """
        AUTH LOGIN asks for the name and the password in turn.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile})
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        replies = yield exchange(client, b"AUTH LOGIN\r\n", 1)
        self.assertEqual(replies, ["334 VXNlcm5hbWU6"])
        replies = yield exchange(client, base64.b64encode(b"postfix") + b"\r\n", 1)
        self.assertEqual(replies, ["334 UGFzc3dvcmQ6"])
        replies = yield exchange(client, base64.b64encode(PASSWORD.encode()) + b"\r\n", 1)
        self.assertEqual(replies, ["235 2.7.0 Authentication successful"])

    @defer.inlineCallbacks
    def test_authLoginInitialResponse(self):
        """
        AUTH LOGIN with the name as initial response asks for the password
        only (as Python's smtplib sends it).
        """
        proxy = self.proxy(auth={"users_file": self.usersFile})
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        replies = yield exchange(
            client, b"AUTH LOGIN " + base64.b64encode(b"postfix") + b"\r\n", 1
        )
        self.assertEqual(replies, ["334 UGFzc3dvcmQ6"])
        replies = yield exchange(client, base64.b64encode(PASSWORD.encode()) + b"\r\n", 1)
        self.assertEqual(replies, ["235 2.7.0 Authentication successful"])

    @defer.inlineCallbacks
    def test_longLineEndsAuthExchange(self):
        """
        A response line over the command line limit ends the AUTH exchange:
        the next line is a command again, not a response.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile})
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        yield exchange(client, b"AUTH LOGIN\r\n", 1)
        replies = yield exchange(client, b"A" * 5000 + b"\r\nNOOP\r\n", 2)
        self.assertEqual([r[:3] for r in replies], ["500", "250"])

    @defer.inlineCallbacks
    def test_authRequired(self):
        """
        With auth.required, MAIL before AUTH gets 530 5.7.0.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile, "required": True})
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        replies = yield exchange(client, b"MAIL FROM:<s@example.test>\r\n", 1)
        self.assertEqual(replies, ["530 5.7.0 Authentication required"])

    @defer.inlineCallbacks
    def test_authNotBeforeTLS(self):
        """
        AUTH in clear is refused: the password must not cross in clear.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile})
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c.test\r\nAUTH PLAIN " + self.plain() + b"\r\n", 2
        )
        self.assertEqual(replies[1][:9], "538 5.7.1")

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password and an unknown name get the same 535 5.7.8, after
        a delay, and nothing is routed.
        """
        proxy = self.proxy(auth={"users_file": self.usersFile, "required": True})
        backend = self.backend
        # The sessions' timers run on a clock the test moves; the checker
        # keeps the reactor's thread pool.
        clock = task.Clock()
        proxy.factory.reactor = clock
        proxy.factory.loginDelays = FailureDelays(clock)
        client = yield proxy.connect(self)
        yield self.startTLS(client)
        start = len(client.replies)
        client.send(b"AUTH PLAIN " + self.plain(password="wrong") + b"\r\n")
        yield waitUntil(lambda: self.logged.matching("answering in 1 s"))
        self.assertEqual(len(client.replies), start)
        clock.advance(1)
        replies = yield client.waitReplies(start + 1)
        client.send(b"AUTH PLAIN " + self.plain(user="nobody") + b"\r\n")
        yield waitUntil(lambda: self.logged.matching("answering in 2 s"))
        clock.advance(2)
        replies = yield client.waitReplies(start + 2)
        self.assertEqual(replies[start:], ["535 5.7.8 Error: authentication failed"] * 2)
        self.assertEqual(backend.connections, 0)


class UnknownLoginTests(unittest.TestCase):
    """
    A login name that does not exist costs a full bcrypt check, as a wrong
    password does, so the time of the answer says nothing about which part
    was wrong.
    """

    def test_unknownNameChecksARealHash(self):
        """
        For an unknown name a real hash of the users file's cost is checked
        (an invalid one would be refused by bcrypt at once).
        """
        import bcrypt

        from lmtp_proxy import access

        checked = []
        real = bcrypt.checkpw
        self.patch(bcrypt, "checkpw", lambda p, h: checked.append(h) or real(p, h))
        self.assertFalse(access._verify(None, b"guess", 4))
        [hashed] = checked
        self.assertTrue(hashed.startswith(b"$2b$04$"))
        self.assertEqual(len(hashed), 60)


class CheckerBusyTests(unittest.TestCase):
    """
    The users file checker runs at most a few bcrypt checks at once, in a
    thread pool of its own.
    """

    def test_refusedWhenBusy(self):
        """
        Past L{UsersFileChecker.MAX_PENDING} checks in progress, a login is
        refused at once with L{CheckerBusy}, without a check.
        """
        from twisted.cred.credentials import UsernamePassword
        from twisted.internet.task import Clock

        from lmtp_proxy.access import CheckerBusy, UsersFileChecker

        config = configuration.parse("config:\n  socket: /s\n", "<test>")
        checker = UsersFileChecker(Clock(), lambda: config)
        checker._checking = checker.MAX_PENDING
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"u", b"p")), CheckerBusy
        )


class FailureDelaysTests(unittest.TestCase):
    """
    L{FailureDelays} makes repeated failures from one address wait longer.
    """

    def test_growsPerAddressAndForgets(self):
        """
        The delay doubles per failure from one address, up to the limit;
        another address starts at one second; a success ends the count.
        """
        clock = task.Clock()
        delays = FailureDelays(clock)
        grown = [delays.failed("192.0.2.1") for _ in range(7)]
        self.assertEqual(grown, [1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(delays.failed("192.0.2.2"), 1)
        delays.succeeded("192.0.2.1")
        self.assertEqual(delays.failed("192.0.2.1"), 1)
        clock.advance(FailureDelays.FORGET + 1)
        self.assertEqual(delays.failed("192.0.2.1"), 1)


class UsersFileTests(unittest.TestCase):
    """
    The SASL users file.
    """

    def setUp(self):
        requireTLS()

    def test_badLineNamesLineNotHash(self):
        """
        A line that is not C{name:bcrypt hash} is refused by line number;
        the message does not show the line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a:%s\nb:plaintextsecret\n" % (hashPassword("x"),))
        error = self.assertRaises(configuration.ConfigError, readUsersFile, path)
        self.assertIn("line 2", str(error))
        self.assertNotIn("plaintextsecret", str(error))

    def test_dovecotPrefix(self):
        """
        Dovecot's C{{BLF-CRYPT}} prefix (doveadm pw -s BLF-CRYPT) is read.
        """
        path = self.mktemp()
        hashed = hashPassword("x")
        with open(path, "w") as f:
            f.write("a:{BLF-CRYPT}%s\n" % (hashed,))
        self.assertEqual(readUsersFile(path), {b"a": hashed.encode()})


class AccessTests(TLSCase):
    """
    allowed_clients and the PROXY protocol.
    """

    @defer.inlineCallbacks
    def test_refusedPeer(self):
        """
        A TCP peer outside allowed_clients gets 554 5.7.1 at connect, is
        closed, and nothing reaches a backend.
        """
        proxy = self.proxy(tls=None, allowed_clients=["127.0.0.2/32"])
        client = yield proxy.connect(self)
        yield client.lost
        self.assertEqual(client.replies[0].line[:9], "554 5.7.1")
        self.assertEqual(self.backend.connections, 0)

    @defer.inlineCallbacks
    def test_allowedPeer(self):
        """
        A peer inside allowed_clients (here from 127.0.0.2) is greeted.
        """
        proxy = self.proxy(tls=None, allowed_clients=["127.0.0.2", "192.0.2.0/24"])
        client = yield connectClient(self, proxy.address, bindAddress=("127.0.0.2", 0))
        self.assertEqual(client.replies[0].code, 220)

    @defer.inlineCallbacks
    def test_proxyV1(self):
        """
        With proxy_protocol, allowed_clients applies to the address a PROXY
        v1 header carries, not to the connection's.
        """
        proxy = self.proxy(tls=None, proxy_protocol=True, allowed_clients=["192.0.2.0/24"])
        allowed = yield connectClient(
            self, proxy.address, preamble=b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 24\r\n"
        )
        refused = yield connectClient(
            self, proxy.address, preamble=b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 24\r\n"
        )
        self.assertEqual(allowed.replies[0].code, 220)
        self.assertEqual(refused.replies[0].line[:9], "554 5.7.1")

    @defer.inlineCallbacks
    def test_proxyV2WithImplicitTLS(self):
        """
        A PROXY v2 header, then TLS from the next byte: the header's
        address is checked and the session runs under TLS.
        """
        proxy = self.proxy(
            tls={"certificate": self.certificate, "key": self.key, "implicit": True},
            proxy_protocol=True,
            allowed_clients=["192.0.2.0/24"],
        )
        header = (
            b"\r\n\r\n\x00\r\nQUIT\n"
            + b"\x21\x11"
            + struct.pack("!H", 12)
            + bytes([192, 0, 2, 9, 127, 0, 0, 1])
            + struct.pack("!HH", 40000, 24)
        )
        from twisted.internet import protocol
        from tests.lmtpclient import LMTPTestClient

        # The header goes in clear, then the TLS handshake.
        client = yield protocol.ClientCreator(reactor, LMTPTestClient).connectTCP(
            "127.0.0.1", proxy.address
        )
        self.addCleanup(client.transport.abortConnection)
        client.send(header)
        client.startTLS(self.clientOptions())
        replies = yield exchange(client, b"LHLO c.test\r\n" + mail([b"x@a.test"]), 6)
        self.assertEqual(client.replies[0].code, 220)
        self.assertEqual(replies[-1], "250 2.0.0 <x@a.test> Saved")


class BackendTLSTests(TLSCase):
    """
    TLS to backends: STARTTLS and implicit, certificate verified.
    """

    def startTLSBackend(self, certificate=None, key=None):
        options = self.serverOptions(certificate, key)
        backend = FakeBackend(self, extensions=("PIPELINING", "STARTTLS", "AUTH PLAIN"))

        def starttls(proto, line):
            proto._answer(b"220 2.0.0 Go ahead\r\n")
            proto.transport.startTLS(options)

        backend.actions["STARTTLS"] = starttls
        return backend

    def connect(self, backend, **settings):
        entry = dict(backend.entry, **settings)
        config = configuration.parse(
            "config: {socket: /s}\nbackends:\n  b: %s\n" % (entry,)
        )
        return connectBackend(reactor, config.backends["b"], "proxy.test", 5, 5)

    @defer.inlineCallbacks
    def test_starttlsVerified(self):
        """
        tls: starttls with ca_file: the password is sent only under TLS,
        after a second LHLO; the log names the TLS version and cipher.
        """
        logged = _Logged(self)
        backend = self.startTLSBackend()
        client = yield self.connect(
            backend, tls="starttls", ca_file=self.ca.caFile, user="proxy", password="pw"
        )
        self.addCleanup(client.abort)
        self.assertEqual(backend.verbs(), [b"LHLO", b"STARTTLS", b"LHLO", b"AUTH"])
        self.assertNotIn(b"AUTH", b"".join(backend.received[:2]))
        self.assertTrue(logged.matching("backend b: TLS TLSv1."))

    @defer.inlineCallbacks
    def test_starttlsWrongCertificate(self):
        """
        A backend whose certificate another CA signed fails with
        L{BackendTLSFailed} (451 4.4.x), and nothing but LHLO and STARTTLS
        went to it: no credentials, no envelope.
        """
        other = Authority(os.path.join(self.dir, "other"), "another CA")
        backend = self.startTLSBackend(*other.issue("impostor"))
        error = yield self.assertFailure(
            self.connect(
                backend, tls="starttls", ca_file=self.ca.caFile, user="proxy", password="pw"
            ),
            BackendTLSFailed,
        )
        self.assertEqual(error.reply.code, 451)
        self.assertTrue(str(error.reply).startswith("451 4.4."))
        self.assertIn("certificate verify failed", error.detail)
        self.assertEqual(backend.verbs(), [b"LHLO", b"STARTTLS"])

    @defer.inlineCallbacks
    def test_starttlsNotOffered(self):
        """
        A backend that does not offer STARTTLS gets nothing after LHLO:
        never a fallback to clear text.
        """
        backend = FakeBackend(self)
        yield self.assertFailure(
            self.connect(backend, tls="starttls", ca_file=self.ca.caFile, user="p", password="pw"),
            BackendTLSFailed,
        )
        self.assertEqual(backend.verbs(), [b"LHLO"])

    @defer.inlineCallbacks
    def test_implicitVerified(self):
        """
        tls: implicit talks TLS from the first byte.
        """
        backend = FakeBackend(self, tls=self.serverOptions())
        client = yield self.connect(backend, tls="implicit", ca_file=self.ca.caFile)
        self.addCleanup(client.abort)
        self.assertEqual(backend.verbs(), [b"LHLO"])

    @defer.inlineCallbacks
    def test_implicitNameMismatch(self):
        """
        A certificate that does not name server_name is refused.
        """
        backend = FakeBackend(self, tls=self.serverOptions())
        error = yield self.assertFailure(
            self.connect(
                backend, tls="implicit", ca_file=self.ca.caFile, server_name="store.example"
            ),
            BackendTLSFailed,
        )
        self.assertEqual(backend.verbs(), [])
        self.assertTrue(error.detail)

    @defer.inlineCallbacks
    def test_recipientsGet451(self):
        """
        Through the proxy, the recipients of a backend whose certificate is
        refused get 451 4.4.x, and one log line names the reason.
        """
        logged = _Logged(self)
        other = Authority(os.path.join(self.dir, "other"), "another CA")
        backend = self.startTLSBackend(*other.issue("impostor"))
        entry = dict(backend.entry, tls="starttls", ca_file=self.ca.caFile)
        proxy = Proxy(self, {}, {"b": entry}, {"@a.test": "b"})
        client = yield proxy.connect(self)
        replies = yield exchange(
            client, b"LHLO c.test\r\nMAIL FROM:<s@example.test>\r\nRCPT TO:<x@a.test>\r\n", 3
        )
        self.assertTrue(replies[2].startswith("451 4.4."), replies[2])
        self.assertEqual(len(logged.matching("certificate verify failed")), 1)
        self.assertNotIn(b"MAIL", b"".join(backend.received))


class SecurityConfigTests(TLSCase):
    """
    The configuration keys, and what C{lmtp-proxy check} and loading refuse.
    """

    def write(self, text, mode=0o600):
        path = os.path.join(self.dir, "proxy.yaml")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def runCheck(self, path):
        import io
        import sys

        from lmtp_proxy import cli

        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            status = cli.main(["check", "-c", path])
        except SystemExit as e:
            status = e.code
        return status, out.getvalue(), err.getvalue()

    def test_keys(self):
        """
        Every TLS and access key is read, the nested ones into flat settings.
        """
        config = configuration.load(self.write(
            "config:\n"
            "  socket: [127.0.0.1, 2400]\n"
            "  tls: {certificate: %s, key: %s, implicit: true}\n"
            "  require_tls: true\n"
            "  allowed_clients: [127.0.0.0/8, '::1', 192.0.2.0/24]\n"
            "  proxy_protocol: true\n"
            "  auth: {users_file: %s, required: true}\n"
            "backends:\n"
            "  s: {host: 127.0.0.1, port: 24, tls: starttls, verify: true,"
            " server_name: localhost, ca_file: %s, client_certificate: %s,"
            " client_key: %s, user: proxy, password: pw}\n"
            % (self.certificate, self.key, self.usersFile, self.ca.caFile,
               self.certificate, self.key)
        ))
        self.assertEqual(
            (config.tls_certificate, config.tls_key, config.tls_implicit, config.require_tls,
             config.allowed_clients, config.proxy_protocol, config.auth_users_file,
             config.auth_required),
            (self.certificate, self.key, True, True, ("127.0.0.0/8", "::1/128", "192.0.2.0/24"),
             True, self.usersFile, True),
        )
        backend = config.backends["s"]
        self.assertEqual(
            (backend.tls, backend.verify, backend.server_name, backend.ca_file,
             backend.client_certificate, backend.client_key, backend.allow_plaintext_auth),
            ("starttls", True, "localhost", self.ca.caFile, self.certificate, self.key, False),
        )

    def test_withoutKeysAsToday(self):
        """
        Without the new keys nothing of them is in force.
        """
        config = configuration.parse("config: {socket: /s}\nbackends:\n  b: {socket: /b}\n")
        self.assertEqual(
            (config.tls_certificate, config.allowed_clients, config.proxy_protocol,
             config.auth_users_file, config.backends["b"].tls),
            (None, None, False, None, "none"),
        )

    def test_plaintextCredentialsRefused(self):
        """
        C{check} refuses a TCP backend with a password and no tls, in one
        line that does not show the password.
        """
        path = self.write(
            "config: {socket: /s}\nbackends:\n"
            "  b: {host: 192.0.2.1, port: 24, user: proxy, password: hunter2}\n"
        )
        status, out, err = self.runCheck(path)
        self.assertEqual(status, 1)
        self.assertIn("backends.b: credentials would cross the network in clear", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertNotIn("hunter2", err + out)

    def test_plaintextAllowedOrUnix(self):
        """
        C{allow_plaintext_auth: true}, or a unix socket, is accepted.
        """
        configuration.load(self.write(
            "config: {socket: /s}\nbackends:\n"
            "  b: {host: 192.0.2.1, port: 24, user: p, password: x, allow_plaintext_auth: true}\n"
            "  u: {socket: /run/lmtp, user: p, password: x}\n"
        ))

    def test_readableConfigWithPasswordWarned(self):
        """
        A group- or world-readable file holding a password gets one warning
        line from C{check}.
        """
        path = self.write(
            "config: {socket: /s}\nbackends:\n  u: {socket: /run/lmtp, user: p, password: x}\n",
            mode=0o644,
        )
        status, out, err = self.runCheck(path)
        self.assertEqual(status, 0)
        self.assertEqual(len([l for l in err.splitlines() if "warning" in l]), 1)
        self.assertIn("readable by everyone", err)

    def test_brokenCertificateRefused(self):
        """
        A certificate whose key is another's is refused when the file is
        loaded (start, check, reload keep the old one), in one line.
        """
        _, otherKey = self.ca.issue("other")
        path = self.write(
            "config:\n  socket: /s\n  tls: {certificate: %s, key: %s}\n"
            % (self.certificate, otherKey)
        )
        error = self.assertRaises(configuration.ConfigError, loadChecked, path)
        self.assertIn("config.tls", str(error))
        self.assertNotIn("\n", str(error))

    def test_missingCertificateRefused(self):
        """
        A certificate file that cannot be read is refused by name.
        """
        path = self.write(
            "config:\n  socket: /s\n  tls: {certificate: /nonexistent.pem, key: %s}\n" % (self.key,)
        )
        error = self.assertRaises(configuration.ConfigError, loadChecked, path)
        self.assertIn("/nonexistent.pem", str(error))

    def test_certificateReadAgainForNewConfiguration(self):
        """
        A new configuration (a reload) reads the certificate again; one
        that broke since keeps the previous options.
        """
        from lmtp_proxy.tls import serverOptionsFor

        path = self.write(
            "config:\n  socket: /s\n  tls: {certificate: %s, key: %s}\n"
            % (self.certificate, self.key)
        )
        first = serverOptionsFor(configuration.load(path))
        renewed = serverOptionsFor(configuration.load(path))
        self.assertIsNot(first, renewed)
        broken = configuration.load(path)
        with open(self.certificate, "w") as f:
            f.write("garbage\n")
        self.assertIs(serverOptionsFor(broken), renewed)

    def test_authNeedsTLS(self):
        """
        SASL without config.tls is refused: it is offered only after TLS.
        """
        error = self.assertRaises(
            configuration.ConfigError, configuration.parse,
            "config:\n  socket: /s\n  auth: {users_file: /x}\n",
        )
        self.assertIn("config.auth", str(error))


_WITHOUT_TLS = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("OpenSSL", "service_identity", "bcrypt", "cryptography"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
import lmtp_proxy.service, lmtp_proxy.serving, lmtp_proxy.server, lmtp_proxy.client
from lmtp_proxy import config
from lmtp_proxy.reloader import loadChecked
plain, tls = sys.argv[1:3]
loadChecked(plain)
try:
    loadChecked(tls)
except config.ConfigError as e:
    print(e)
"""


class WithoutTLSLibrariesTests(TLSCase):
    """
    Without the C{tls} extra the proxy works as long as TLS is not
    configured, and a TLS configuration says what is missing.
    """

    def test_onlyTLSConfigurationsNeedThem(self):
        """
        With pyOpenSSL, service_identity, cryptography and bcrypt out of
        reach, the service imports and a configuration without TLS loads;
        one with TLS is refused in one line naming the extra.
        """
        import subprocess
        import sys

        plain = os.path.join(self.dir, "plain.yaml")
        with open(plain, "w") as f:
            f.write("config: {socket: /s}\nbackends:\n  b: {host: 127.0.0.1, port: 24}\n")
        tls = os.path.join(self.dir, "tls.yaml")
        with open(tls, "w") as f:
            f.write("config:\n  socket: /s\n  tls: {certificate: %s, key: %s}\n"
                    % (self.certificate, self.key))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            [sys.executable, "-c", _WITHOUT_TLS, plain, tls],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("config.tls: TLS needs the optional libraries: pip install 'lmtp-proxy[tls]'",
                      result.stdout)


class HandshakeFailureTests(TLSCase):
    """
    A client whose TLS handshake fails costs one log line, nothing more.
    """

    @defer.inlineCallbacks
    def test_clientRefusingCertificateLogged(self):
        """
        A client that does not trust the proxy's certificate ends the
        handshake; the proxy logs why in one line and goes on serving.
        """
        logged = _Logged(self)
        proxy = self.proxy()
        client = yield proxy.connect(self)
        yield exchange(client, b"STARTTLS\r\n", 1)
        other = Authority(os.path.join(self.dir, "other"), "another CA")
        client.startTLS(self.clientOptions(other.caFile))
        client.send(b"NOOP\r\n")
        yield client.lost
        yield waitUntil(lambda: logged.matching("TLS handshake failed"))
        self.assertEqual(len(logged.matching("TLS handshake failed")), 1)
        again = yield proxy.connect(self)
        self.assertEqual(again.replies[0].code, 220)


class BackendOptionsTests(TLSCase):
    """
    C{verify: false} and a client certificate.
    """

    connect = BackendTLSTests.connect

    def requiringClientCertificate(self):
        from twisted.internet import ssl

        with open(self.ca.caFile, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        with open(self.certificate, "rb") as f, open(self.key, "rb") as k:
            server = ssl.PrivateCertificate.loadPEM(f.read() + k.read())
        return server.options(ca)

    @defer.inlineCallbacks
    def test_verifyFalse(self):
        """
        With C{verify: false} a certificate no trusted CA signed is taken.
        """
        other = Authority(os.path.join(self.dir, "other"), "another CA")
        backend = FakeBackend(self, tls=self.serverOptions(*other.issue("impostor")))
        client = yield self.connect(backend, tls="implicit", verify=False)
        self.addCleanup(client.abort)
        self.assertEqual(backend.verbs(), [b"LHLO"])

    @defer.inlineCallbacks
    def test_clientCertificate(self):
        """
        A backend that demands a client certificate gets
        C{client_certificate} and C{client_key}; without them the
        handshake fails.
        """
        certificate, key = self.ca.issue("proxy-client", hosts=("proxy.test",))
        backend = FakeBackend(self, tls=self.requiringClientCertificate())
        client = yield self.connect(
            backend, tls="implicit", ca_file=self.ca.caFile,
            client_certificate=certificate, client_key=key,
        )
        self.addCleanup(client.abort)
        yield self.assertFailure(
            self.connect(backend, tls="implicit", ca_file=self.ca.caFile), BackendTLSFailed
        )
        self.assertEqual(backend.verbs(), [b"LHLO"])
