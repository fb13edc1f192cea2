"""
End to end with TLS on both sides and SASL: the installed proxy between a
real Postfix (STARTTLS and SASL in its lmtp client), swaks, and real
Dovecot and Cyrus backends, with certificates made at test time.
"""

import os
import shutil

from twisted.trial import unittest

from tests import peers
from tests.certificates import Authority, hashPassword
from tests.lmtpclient import BlockingLMTPClient, lmtpDeliver

SENDER = "sender@origin.test"
MESSAGE = b"Subject: tls e2e\r\n\r\nover TLS\r\n"
CLIENT_LOGIN = "postfix-mx"
CLIENT_PASSWORD = "lmtp client secret"
STORE_USER = "proxyuser"
STORE_PASSWORD = "backend secret 42"


class _TLSBase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.dir = peers.tempDir(self, "lmtpe2e-ca-")
        self.ca = Authority(self.dir)
        self.certificate, self.key = self.ca.issue("localhost")
        self.usersFile = os.path.join(self.dir, "clients")
        with open(self.usersFile, "w") as f:
            f.write("%s:%s\n" % (CLIENT_LOGIN, hashPassword(CLIENT_PASSWORD)))

    def proxy(self, backends, **options):
        config = {"hostname": "proxy.test", "connect_timeout": 5, "shutdown_grace": 2}
        config.update(options)
        return peers.Proxy(
            self, {"config": config, "backends": backends, "users": {"@example.test": "store"}}
        )

    def listenerTLS(self, implicit=False):
        return {"certificate": self.certificate, "key": self.key, "implicit": implicit}

    def dovecot(self, **kw):
        return peers.DovecotBackend(self, "store", ssl=(self.certificate, self.key), **kw)


class ListenerTests(_TLSBase):
    """
    Real clients doing STARTTLS, TLS on connect and SASL with the proxy.
    """

    def test_postfixStartTLSAndSASL(self):
        """
        Postfix with lmtp_tls_security_level = encrypt and
        lmtp_sasl_auth_enable = yes delivers through the proxy (auth
        required) to Dovecot; the proxy's log names the TLS session and the
        login.
        """
        backend = peers.DovecotBackend(self, "store")
        proxy = self.proxy(
            {"store": backend.backendConfig()},
            tls=self.listenerTLS(),
            require_tls=True,
            auth={"users_file": self.usersFile, "required": True},
        )
        passwords = os.path.join(self.dir, "sasl_passwd")
        host, port = proxy.target
        with open(passwords, "w") as f:
            for key in (host, "%s:%d" % (host, port), "[%s]:%d" % (host, port),
                        "inet:%s:%d" % (host, port)):
                f.write("%s %s:%s\n" % (key, CLIENT_LOGIN, CLIENT_PASSWORD))
        os.chmod(passwords, 0o644)
        mta = peers.PostfixClient(self, proxy.target, extra="""\
lmtp_tls_security_level = encrypt
lmtp_tls_CAfile = {ca}
lmtp_tls_loglevel = 1
lmtp_sasl_auth_enable = yes
lmtp_sasl_password_maps = texthash:{passwords}
lmtp_sasl_security_options = noanonymous
lmtp_sasl_tls_security_options = noanonymous
""".format(ca=self.ca.caFile, passwords=passwords))
        mta.send(SENDER, ["alice@example.test"], "through TLS and SASL\r\n")
        mta.waitEmpty(60)
        self.assertEqual(len(backend.messages("alice@example.test")), 1)
        log = proxy.log()
        self.assertIn("TLS TLSv1.", log)
        self.assertIn("authenticated as %s" % (CLIENT_LOGIN,), log)
        self.assertTrue(any("status=sent" in l for l in mta.deliveries("alice@example.test")))

    def test_swaksStartTLS(self):
        """
        swaks --tls delivers through the proxy's STARTTLS.
        """
        backend = peers.DovecotBackend(self, "store")
        proxy = self.proxy({"store": backend.backendConfig()}, tls=self.listenerTLS())
        result = peers.swaks(proxy.target, ["--tls", "--to", "bob@example.test",
                                            "--from", SENDER])
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("TLS started", result.stdout)
        self.assertEqual(len(backend.messages("bob@example.test")), 1)

    def test_swaksTLSOnConnect(self):
        """
        swaks --tls-on-connect delivers through the implicit TLS listener.
        """
        backend = peers.DovecotBackend(self, "store")
        proxy = self.proxy({"store": backend.backendConfig()}, tls=self.listenerTLS(True))
        result = peers.swaks(proxy.target, ["--tls-on-connect", "--to", "carol@example.test",
                                            "--from", SENDER])
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertEqual(len(backend.messages("carol@example.test")), 1)

    def test_startTLSInjection(self):
        """
        STARTTLS and RSET in one write to the real proxy: only the 220
        comes, and under TLS the next command gets the next reply (the
        RSET was discarded, not run).
        """
        backend = peers.DovecotBackend(self, "store")
        proxy = self.proxy({"store": backend.backendConfig()}, tls=self.listenerTLS())
        client = BlockingLMTPClient(proxy.target)
        self.addCleanup(client.close)
        client.lhlo()
        client.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(client.readReply().line, "220 2.0.0 Ready to start TLS")
        client.startTLS(self.ca.caFile)
        self.assertEqual(client.command("NOOP").line, "250 2.0.0 Ok")
        self.assertEqual(client.command("MAIL FROM:<s@x.test>").code, 503)


class ReloadTests(_TLSBase):
    """
    Certificates are read again on reload.
    """

    def handshake(self, proxy, caFile):
        client = BlockingLMTPClient(proxy.target)
        self.addCleanup(client.close)
        client.lhlo()
        self.assertEqual(client.command("STARTTLS").code, 220)
        client.startTLS(caFile)
        return client.command("NOOP").code

    def test_renewedThenBrokenCertificate(self):
        """
        A renewed certificate takes effect on SIGUSR1 without a restart; a
        broken one is refused like any mistake, keeping the renewed one.
        """
        backend = peers.DovecotBackend(self, "store")
        proxy = self.proxy({"store": backend.backendConfig()}, tls=self.listenerTLS())
        renewed = Authority(os.path.join(self.dir, "renewed"), "renewed CA")
        certificate, key = renewed.issue("localhost")
        for source, target in ((certificate, self.certificate), (key, self.key)):
            shutil.copy(source, target)
        self.assertIn("reload: generation", proxy.reload(marker="reload: generation"))
        self.assertEqual(self.handshake(proxy, renewed.caFile), 250)
        with open(self.certificate, "w") as f:
            f.write("not a certificate\n")
        log = proxy.reload(marker="reload refused")
        self.assertIn("reload refused", log)
        self.assertEqual(len([l for l in log.splitlines() if "reload refused" in l]), 1)
        self.assertEqual(self.handshake(proxy, renewed.caFile), 250)


class DovecotBackendTests(_TLSBase):
    """
    A Dovecot backend with ssl = required, reached over TLS.
    """

    def deliver(self, entry):
        proxy = self.proxy({"store": entry})
        return proxy, lmtpDeliver(proxy.target, SENDER, ["dora@example.test"], MESSAGE)

    def test_starttlsVerified(self):
        """
        tls: starttls with the test CA delivers; the log names the TLS
        session with the backend.
        """
        backend = self.dovecot(tcp=True)
        proxy, result = self.deliver(
            {"host": "127.0.0.1", "port": backend.port, "tls": "starttls",
             "ca_file": self.ca.caFile})
        self.assertEqual(result["final"][0][1].code, 250, result["lines"])
        self.assertEqual(len(backend.messages("dora@example.test")), 1)
        self.assertIn("backend store: TLS TLSv1.", proxy.log())

    def test_implicitVerified(self):
        """
        tls: implicit to Dovecot's ssl = yes listener delivers.
        """
        backend = self.dovecot(tcp=True, sslPort=peers.freePort())
        proxy, result = self.deliver(
            {"host": "127.0.0.1", "port": backend.sslPort, "tls": "implicit",
             "ca_file": self.ca.caFile})
        self.assertEqual(result["final"][0][1].code, 250, result["lines"])
        self.assertEqual(len(backend.messages("dora@example.test")), 1)

    def test_wrongCertificate(self):
        """
        A backend whose certificate the CA did not sign: 451 4.4.x for its
        recipient, one log line with the reason, nothing delivered.
        """
        other = Authority(os.path.join(self.dir, "other"), "another CA")
        backend = peers.DovecotBackend(self, "store", ssl=other.issue("impostor"), tcp=True)
        proxy = self.proxy({"store": {"host": "127.0.0.1", "port": backend.port,
                                      "tls": "starttls", "ca_file": self.ca.caFile}})
        client = BlockingLMTPClient(proxy.target)
        self.addCleanup(client.close)
        client.lhlo()
        result = client.transaction(SENDER, ["dora@example.test"], MESSAGE)
        self.assertTrue(result["rcpt"][0].line.startswith("451 4.4."), result["rcpt"][0])
        self.assertEqual(proxy.log().count("certificate verify failed"), 1)
        self.assertEqual(backend.allMessages(), {})


class CyrusBackendTests(_TLSBase):
    """
    The original's own backend: Cyrus lmtpd, which demands LMTP AUTH on TCP.
    """

    def test_authOverStartTLS(self):
        """
        tls: starttls and the backend's user and password: Cyrus takes the
        AUTH under TLS and stores the message.
        """
        backend = peers.CyrusBackend(self, self.certificate, self.key,
                                     STORE_USER, STORE_PASSWORD)
        proxy = self.proxy({"store": {
            "host": "127.0.0.1", "port": backend.port, "tls": "starttls",
            "ca_file": self.ca.caFile, "user": STORE_USER, "password": STORE_PASSWORD}})
        result = lmtpDeliver(proxy.target, SENDER, ["erin@example.test"], MESSAGE)
        self.assertEqual(result["final"][0][1].code, 250, result["lines"])
        peers.waitFor(lambda: backend.messages("erin@example.test"), 10,
                      what="the message in Cyrus")
        self.assertIn("backend store: TLS TLSv1.", proxy.log())
        self.assertNotIn(STORE_PASSWORD, proxy.log())
