"""
One regression test per client-side and twistd trap of
docs/twisted-pitfalls.rst (traps C1-C6 and T1-T9; server-side trap SN is
C{test_pitfallN_*} in L{tests.test_server}).

Index (trap -> test here; existing tests that also cover it):

Client side
  - C1, C2: EHLO/HELO, one reply after DATA then RSET:
      test_client_lhloNotEhlo, test_client_oneReplyPerRecipientAfterData,
      test_client_noRsetAfterData
      (also tests.test_client.HandshakeTests.test_lhloAfterGreeting,
      tests.test_proxy.RoutingDeliveryTests.test_pipelinedTransactionRepliesInOrder)
  - C3: RCPTs not pipelined:
      test_client_rcptsPipelinedToPipeliningBackend,
      test_client_rcptsHeldWithoutPipelining
      (also tests.test_client.PipeliningTests.test_withPipeliningAllAtOnce,
      tests.test_proxy.TransactionTests.test_firstRcptPipelinedWithMail)
  - C4: transformChunk corrupts data (CRLF -> CR CR LF, first-line dot, dot
    at a 16 KiB chunk boundary):
      test_client_writeDataVerbatim, test_client_crlfNotDoubled,
      test_client_leadingDotStuffedAsSent, test_client_dotAtReadBoundaries
      (also tests.test_proxy.ByteExactTests)
  - C5: sendLine keeps every line (AUTH included) in self.log, quoted in
    errors:
      test_client_noLogOfSentLines, test_client_errorsHoldNoSentLines
      (also tests.test_client.AuthTests.test_*KeepsSecrets,
      tests.test_proxy.AuthTests.test_authSentAndNotLogged)
  - C6: connectionLost fails every pending reply:
      test_client_connectionLostFailsEveryPendingReply
      (also tests.test_client.ConnectionLostTests.test_lostFailsAllPending)

twistd
  - T1: plugin file holds only a ServiceMaker, lazy import:
      test_twistd_pluginHoldsOnlyServiceMaker, test_twistd_pluginImportIsLazy
      (also tests.test_packaging.PluginTests.test_pluginImportIsLazy, which
      may load an installed copy of the plugin rather than this tree's)
  - T2: no twisted/__init__.py nor twisted/plugins/__init__.py;
    twisted.plugins listed explicitly in setup.cfg:
      test_twistd_noNamespaceInits, test_twistd_pluginsPackageListed
      (also tests.test_packaging.NamespaceTests,
      tests.test_packaging.SetupConfigTests.test_packagesListedExplicitly)
  - T3: editable install: test_twistd_editableCompatDocumented
  - T4: startup order, makeService validates the config:
      test_twistd_makeServiceBadConfigExits,
      test_twistd_makeServiceMissingFileExits,
      test_twistd_makeServiceDoesNotBind, test_twistd_bindInPrivilegedStart
      (also tests.test_twistd.TwistdTests.test_configErrorReachesTerminal)
  - T5: SIGUSR1 clash, previous handler chained:
      test_twistd_sigusr1ChainsPreviousHandler,
      test_twistd_sigusr1RestoredOnStop
      (also tests.test_service.ReloadTests.test_sigusr1Reloads,
      tests.test_twistd.TwistdTests.test_sigusr1ReloadsAndRotatesLog)
  - T6: work from a signal handler through reactor.callFromThread:
      test_twistd_signalWorkViaCallFromThread
  - T7: unix socket chmod survives the umask, chowned while root:
      test_twistd_socketModeSurvivesUmask,
      test_twistd_socketChownedInPrivilegedStart (more in tests.test_listener)
  - T8: wantPID removes a stale socket only when it is one:
      test_twistd_staleSocketReplaced, test_twistd_nonSocketKept
      (more in tests.test_listener)
  - T9: tests/__init__.py: test_twistd_testsPackageInit,
      test_twistd_trialDiscoversTests
"""

import ast
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from lmtp_proxy import config as configuration
from lmtp_proxy import service as proxyservice
from lmtp_proxy.client import (
    BackendError,
    BackendLost,
    BackendProtocolError,
    BackendTimeout,
    LMTPClient,
)
from tests.lmtpclient import connectClient, transaction
from tests.support import (
    PASSWORD,
    PLAIN_TOKEN,
    USER,
    FakeBackend,
    Proxy,
    deadPort,
    handshaken,
    unixPath,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "twisted", "plugins", "lmtp_proxy_plugin.py")



# -- helpers ------------------------------------------------------------------


def containsBytes(value, needle, seen=None):
    """
    Whether C{needle} (bytes) occurs in C{value} or anything it holds
    (containers, instance attributes), as bytes or as text.
    """
    if seen is None:
        seen = set()
    if id(value) in seen:
        return False
    seen.add(id(value))
    text = needle.decode("latin-1")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return needle in bytes(value)
    if isinstance(value, str):
        return text in value
    if isinstance(value, dict):
        return any(
            containsBytes(k, needle, seen) or containsBytes(v, needle, seen)
            for k, v in value.items()
        )
    if isinstance(value, (list, tuple, set, frozenset, deque)):
        return any(containsBytes(v, needle, seen) for v in value)
    if isinstance(value, BaseException):
        return text in str(value) or text in repr(value) or any(
            containsBytes(a, needle, seen) for a in value.args
        ) or containsBytes(getattr(value, "__dict__", {}), needle, seen)
    return False


def oneBackendProxy(testcase, **backendArgs):
    """
    A L{FakeBackend} C{a} behind a L{Proxy} routing C{@a.test} to it.
    """
    a = FakeBackend(testcase, **backendArgs)
    proxy = Proxy(testcase, {"hostname": "proxy.test"}, {"a": a.entry}, {"@a.test": "a"})
    return a, proxy


@defer.inlineCallbacks
def relay(testcase, body, recipients=(b"x@a.test",)):
    """
    Send one transaction with C{body} through a proxy to one backend; fire
    with the backend and the last lines of the replies.
    """
    a, proxy = oneBackendProxy(testcase)
    client = yield proxy.connect(testcase)
    client.send(transaction(list(recipients), body))
    replies = yield client.waitReplies(1 + 1 + 1 + len(recipients) + 1 + len(recipients) + 1)
    return a, replies


def writeConfig(testcase, text):
    """
    Write config text to a fresh file; return its absolute path.
    """
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


class FakeSignalReactor(task.Clock):
    """
    A clock that records what is handed to L{callFromThread} instead of
    running it.
    """

    def __init__(self):
        task.Clock.__init__(self)
        self.fromThread = []

    def callFromThread(self, f, *args, **kwargs):
        self.fromThread.append((f, args, kwargs))


# -- client side ----------------------------------------------------------------


class ClientPitfallTests(unittest.TestCase):
    """
    Pitfalls of C{SMTPClient}/C{ESMTPClient} that L{LMTPClient} must avoid.
    """

    def test_client_lhloNotEhlo(self):
        """
        Trap C1 "Sends EHLO (falls back to HELO)": the handshake
        sends LHLO and neither EHLO nor HELO.
        """
        clock = task.Clock()
        client = LMTPClient(clock, 5.0)
        transport = StringTransport()
        client.makeConnection(transport)
        d = client.handshake("proxy.test")
        client.dataReceived(b"220 backend.test LMTP ready\r\n")
        self.assertEqual(transport.value(), b"LHLO proxy.test\r\n")
        client.dataReceived(b"250-backend.test\r\n250 PIPELINING\r\n")
        self.assertIs(self.successResultOf(d), client)
        sent = transport.value().upper()
        self.assertNotIn(b"EHLO", sent)
        self.assertNotIn(b"HELO", sent)

    def test_client_oneReplyPerRecipientAfterData(self):
        """
        Trap C2 "expects one reply after DATA": after the final dot
        each accepted recipient's reply goes to its own waiter, in RCPT
        order, and a 5xx for one does not disturb the others.
        """
        client, transport, clock, d = handshaken()
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        client.writeData(b"hi\r\n.\r\n")
        replies = client.expectReplies(3, 10)
        client.dataReceived(
            b"250 2.0.0 <a> Saved\r\n550 5.1.1 <b> unknown\r\n452 4.2.2 <c> full\r\n"
        )
        results = [self.successResultOf(r) for r in replies]
        self.assertEqual([r.code for r in results], [250, 550, 452])
        self.assertEqual(
            [r.lines for r in results],
            [("2.0.0 <a> Saved",), ("5.1.1 <b> unknown",), ("4.2.2 <c> full",)],
        )
        self.assertTrue(client.usable)

    def test_client_noRsetAfterData(self):
        """
        Trap C2 "then sends RSET": after the final dot and its
        per-recipient replies nothing is sent to the backend (no RSET), and
        the next MAIL follows directly.
        """
        client, transport, clock, d = handshaken()
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        client.writeData(b"hi\r\n.\r\n")
        transport.clear()
        replies = client.expectReplies(2, 10)
        client.dataReceived(b"250 2.0.0 one\r\n250 2.0.0 two\r\n")
        for r in replies:
            self.successResultOf(r)
        self.assertEqual(transport.value(), b"")
        client.command(b"MAIL FROM:<s@x>")
        self.assertEqual(transport.value(), b"MAIL FROM:<s@x>\r\n")

    @defer.inlineCallbacks
    def test_client_noRsetAfterDataEndToEnd(self):
        """
        Trap C2 "one reply after DATA and then RSET", through the
        proxy: two recipients on one backend get two replies after the dot
        and the backend sees no RSET after the message.
        """
        a, replies = yield relay(self, b"Subject: x\r\n\r\nhi\r\n", [b"x@a.test", b"y@a.test"])
        self.assertEqual(
            [r[:3] for r in replies], ["220", "250", "250", "250", "250", "354", "250", "250", "221"]
        )
        self.assertIn("<x@a.test>", replies[6])
        self.assertIn("<y@a.test>", replies[7])
        verbs = a.verbs()
        self.assertEqual(verbs[verbs.index(b"DATA"):].count(b"RSET"), 0, verbs)

    def test_client_rcptsPipelinedToPipeliningBackend(self):
        """
        Trap C3 "Does not pipeline RCPTs": towards a backend that
        offers PIPELINING, MAIL and every RCPT are written before any reply,
        and the replies then reach their commands in order.
        """
        client, transport, clock, d = handshaken([b"PIPELINING", b"8BITMIME"])
        self.assertTrue(client.pipelining)
        mail = client.command(b"MAIL FROM:<s@x>")
        rcpts = [client.command(b"RCPT TO:<r%d@x>" % (i,)) for i in range(3)]
        self.assertEqual(
            transport.value(),
            b"MAIL FROM:<s@x>\r\nRCPT TO:<r0@x>\r\nRCPT TO:<r1@x>\r\nRCPT TO:<r2@x>\r\n",
        )
        client.dataReceived(b"250 m\r\n250 r0\r\n550 r1\r\n250 r2\r\n")
        self.assertEqual(self.successResultOf(mail).lines, ("m",))
        results = [self.successResultOf(r) for r in rcpts]
        self.assertEqual(
            [(r.code, r.lines) for r in results],
            [(250, ("r0",)), (550, ("r1",)), (250, ("r2",))],
        )

    def test_client_rcptsHeldWithoutPipelining(self):
        """
        Trap C3 "Does not pipeline RCPTs", other side: a backend
        without PIPELINING gets the second RCPT only after the first reply.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        self.assertFalse(client.pipelining)
        client.command(b"RCPT TO:<a@x>")
        client.command(b"RCPT TO:<b@x>")
        self.assertEqual(transport.value(), b"RCPT TO:<a@x>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.value(), b"RCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n")

    def test_client_writeDataVerbatim(self):
        """
        Trap C4 "transformChunk corrupts data": L{writeData} puts
        the bytes on the wire unchanged: CRLF stays CRLF, a stuffed dot on
        the first line and at the start of a later chunk stays as given.
        """
        client, transport, clock, d = handshaken()
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        transport.clear()
        chunks = [b"..first\r\nline\r\n", b"..\r\n", b"..x\r\nbare\rCR\r\n"]
        for chunk in chunks:
            client.writeData(chunk)
        self.assertEqual(transport.value(), b"".join(chunks))

    @defer.inlineCallbacks
    def test_client_crlfNotDoubled(self):
        """
        Trap C4 "CRLF becomes \\r\\r\\n": through the proxy a
        CRLF-terminated message reaches the backend with no CR added.
        """
        body = b"Subject: crlf\r\nX-A: 1\r\n\r\nline one\r\nline two\r\n\r\n"
        a, replies = yield relay(self, body)
        self.assertEqual(replies[-2][:3], "250")
        self.assertEqual(a.messages, [body])
        self.assertNotIn(b"\r\r\n", a.messages[0])

    @defer.inlineCallbacks
    def test_client_leadingDotStuffedAsSent(self):
        """
        Trap C4 "a leading . on the first line is not stuffed":
        a message whose first line the client dot-stuffed reaches the
        backend still stuffed, exactly as sent.
        """
        body = b"..first line begins with a dot\r\nSubject: x\r\n\r\n.\xe9\r\n"
        a, replies = yield relay(self, body)
        self.assertEqual(replies[-2][:3], "250")
        self.assertEqual(a.messages, [body])
        self.assertTrue(a.messages[0].startswith(b"..first"))

    @defer.inlineCallbacks
    def test_client_dotAtReadBoundaries(self):
        """
        Trap C4 "a . at a 16 KiB FileSender chunk boundary is not
        stuffed, so a lone . can end the message early": a message whose
        client writes (hence the proxy's reads) end at body offsets 16384,
        49152 and 65536, with a stuffed lone dot starting at 16384, a CRLF
        split at 49152 before a stuffed line, and a stuffed lone dot
        straddling 65536, reaches the backend byte for byte and whole.
        """
        boundaries = (16384, 49152, 65536)

        def fill(buf, target):
            while len(buf) < target:
                remaining = target - len(buf)
                if remaining >= 1002:
                    buf += b"a" * 978 + b"\r\n"
                else:
                    buf += b"b" * (remaining - 2) + b"\r\n"

        body = bytearray(b"Subject: boundaries\r\n\r\n")
        fill(body, 16384)
        body += b"..\r\n"  # stuffed lone dot, first byte of a read
        fill(body, 49152 - 2)
        body += b"c\r"  # CR ends one read ...
        self.assertEqual(len(body), 49152)
        body += b"\n..stuffed after a split CRLF\r\n"  # ... LF begins the next
        fill(body, 65535)
        body += b"..\r\n"  # stuffed lone dot straddling 65536
        body += b"..tail\r\nend\r\n"
        body = bytes(body)
        self.assertEqual(body[16384:16386], b"..")
        self.assertEqual(body[49151:49153], b"\r\n")
        self.assertEqual(body[65535:65537], b"..")

        a, proxy = oneBackendProxy(self)
        client = yield proxy.connect(self)
        client.transport.setTcpNoDelay(True)
        client.send(b"LHLO c.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<x@a.test>\r\nDATA\r\n")
        replies = yield client.waitReplies(5)
        self.assertEqual(replies[4][:3], "354")
        start = 0
        for end in boundaries + (len(body),):
            client.send(body[start:end])
            start = end
            yield task.deferLater(reactor, 0.05, lambda: None)
        client.send(b".\r\nQUIT\r\n")
        replies = yield client.waitReplies(7)
        self.assertEqual([r[:3] for r in replies[5:]], ["250", "221"])
        self.assertEqual(len(a.messages), 1)
        self.assertTrue(a.messages[0] == body, "backend got different bytes")
        self.assertNotIn(b"TAIL", b" ".join(a.commands).upper())

    def test_client_noLogOfSentLines(self):
        """
        Trap C5 "sendLine keeps every line sent ... in self.log":
        after AUTH PLAIN and a transaction, nothing reachable from the
        client's attributes holds the AUTH token or a sent command, and it
        has no C{log} of lines.
        """
        client, transport, clock, d = handshaken(
            [b"PIPELINING", b"AUTH PLAIN"], user=USER, password=PASSWORD
        )
        self.assertEqual(transport.value(), b"AUTH PLAIN " + PLAIN_TOKEN + b"\r\n")
        client.dataReceived(b"235 2.7.0 ok\r\n")
        self.successResultOf(d)
        for line in (b"MAIL FROM:<secret-sender@x>", b"RCPT TO:<secret-rcpt@x>"):
            r = client.command(line)
            client.dataReceived(b"250 ok\r\n")
            self.successResultOf(r)
        self.assertFalse(hasattr(client, "log") and isinstance(client.log, (list, deque)))
        state = vars(client)
        for secret in (PLAIN_TOKEN, PASSWORD.encode(), b"secret-sender", b"secret-rcpt"):
            self.assertFalse(containsBytes(state, secret), secret)

    def test_client_errorsHoldNoSentLines(self):
        """
        Trap C5 "self.log ... is embedded in SMTPClientError
        messages": the errors a client fails with (protocol error, timeout,
        lost connection) quote none of the lines sent, AUTH included.
        """
        errors = []
        for provoke, kind in (
            (lambda c, clock: c.dataReceived(b"garbage " + PLAIN_TOKEN + b"\r\n"), BackendProtocolError),
            (lambda c, clock: clock.advance(10), BackendTimeout),
            (lambda c, clock: c.connectionLost(Failure(ConnectionDone())), BackendLost),
        ):
            client, transport, clock, d = handshaken(
                [b"PIPELINING", b"AUTH PLAIN"], timeout=5.0, user=USER, password=PASSWORD
            )
            pending = client.command(b"MAIL FROM:<secret-sender@x>")
            provoke(client, clock)
            for result in (d, pending):
                error = self.failureResultOf(result, kind).value
                errors.append(error)
                self.assertIsInstance(error, BackendError)
        for error in errors:
            for secret in (PLAIN_TOKEN, PASSWORD.encode(), b"secret-sender", b"AUTH PLAIN"):
                self.assertFalse(containsBytes(error, secret), (error, secret))
                self.assertNotIn(secret.decode(), str(error.reply))

    def test_client_connectionLostFailsEveryPendingReply(self):
        """
        Trap C6 "connectionLost fails every pending one": a lost
        connection fails the per-recipient replies after the dot and a
        command still held back (no PIPELINING) with L{BackendLost}, whose
        reply is a 4xx, and leaves no timer behind.
        """
        client, transport, clock, d = handshaken([b"8BITMIME"])
        client.command(b"DATA")
        client.dataReceived(b"354 go ahead\r\n")
        client.writeData(b"hi\r\n.\r\n")
        replies = client.expectReplies(3, 10)
        held = client.command(b"RSET")
        client.dataReceived(b"250 2.0.0 first\r\n")
        first = self.successResultOf(replies[0])
        self.assertEqual(first.code, 250)
        client.connectionLost(Failure(ConnectionDone()))
        for pending in replies[1:] + [held]:
            error = self.failureResultOf(pending, BackendLost).value
            self.assertEqual(error.reply.code // 100, 4)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNotIn(b"RSET", transport.value())


# -- twistd ---------------------------------------------------------------------


GOOD_CONFIG = """\
config:
  socket: [127.0.0.1, {port}]
  hostname: proxy.test
backends:
  a: {{host: 127.0.0.1, port: 1}}
users:
  alice@x.test: a
"""


class TwistdPitfallTests(unittest.TestCase):
    """
    Pitfalls of running under twistd.
    """

    def _python(self, code):
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=120,
        )

    def test_twistd_pluginHoldsOnlyServiceMaker(self):
        """
        Trap T1 "Plugin file ... holding only a ServiceMaker": this
        tree's plugin file has only imports of
        C{twisted.application.service.ServiceMaker} and one assignment of a
        C{ServiceMaker(...)} call naming C{lmtp_proxy.service}.
        """
        with open(PLUGIN) as f:
            tree = ast.parse(f.read())
        makers = []
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            if isinstance(node, ast.ImportFrom):
                self.assertEqual(node.module, "twisted.application.service")
                self.assertEqual([a.name for a in node.names], ["ServiceMaker"])
                continue
            self.assertIsInstance(node, ast.Assign, ast.dump(node))
            call = node.value
            self.assertIsInstance(call, ast.Call)
            self.assertEqual(getattr(call.func, "id", None), "ServiceMaker")
            self.assertTrue(all(isinstance(a, ast.Constant) for a in call.args))
            makers.append([a.value for a in call.args])
        self.assertEqual(len(makers), 1)
        self.assertEqual(makers[0][0], "lmtp-proxy")
        self.assertEqual(makers[0][1], "lmtp_proxy.service")

    def test_twistd_pluginImportIsLazy(self):
        """
        Trap T1 "lazy import of the real module": loading this
        tree's plugin file (by path, not whichever copy is first on
        C{twisted.plugins.__path__}) imports no C{lmtp_proxy} module.
        """
        code = (
            "import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('lmtp_proxy_plugin_probe', %r)\n"
            "m = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "print(m.LMTPProxy.tapname)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'lmtp_proxy'))\n"
            "print('yaml' in sys.modules)\n" % (PLUGIN,)
        )
        result = self._python(code)
        self.assertEqual(result.returncode, 0, result.stderr)
        tapname, loaded, yamlLoaded = result.stdout.splitlines()
        self.assertEqual(tapname, "lmtp-proxy")
        self.assertEqual(loaded, "[]")
        self.assertEqual(yamlLoaded, "False")

    def test_twistd_noNamespaceInits(self):
        """
        Trap T2 "Never add twisted/__init__.py or
        twisted/plugins/__init__.py": neither exists, and in a fresh
        interpreter with this tree first on the path C{twisted} and
        C{twisted.plugins} are the real Twisted's, with this tree's plugin
        directory added to C{twisted.plugins.__path__}.
        """
        self.assertFalse(os.path.lexists(os.path.join(ROOT, "twisted", "__init__.py")))
        self.assertFalse(os.path.lexists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))
        result = self._python(
            "import twisted, twisted.plugins, os\n"
            "print(os.path.dirname(os.path.realpath(twisted.__file__)))\n"
            "print(os.path.realpath(twisted.plugins.__file__))\n"
            "print('|'.join(os.path.realpath(p) for p in twisted.plugins.__path__))\n"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        twistedDir, pluginsInit, pluginsPath = result.stdout.splitlines()
        self.assertNotEqual(twistedDir, os.path.realpath(os.path.join(ROOT, "twisted")))
        self.assertTrue(pluginsInit.startswith(twistedDir + os.sep), pluginsInit)
        self.assertIn(
            os.path.realpath(os.path.join(ROOT, "twisted", "plugins")), pluginsPath.split("|")
        )

    def test_twistd_pluginsPackageListed(self):
        """
        Trap T2 "List twisted.plugins explicitly in setup.cfg
        packages; find: cannot see it".
        """
        import configparser

        parser = configparser.ConfigParser()
        with open(os.path.join(ROOT, "setup.cfg")) as f:
            parser.read_file(f)
        packages = parser["options"]["packages"]
        self.assertNotIn("find:", packages)
        self.assertIn("twisted.plugins", packages.split())

    def test_twistd_editableCompatDocumented(self):
        """
        Trap T3 "pip install -e . ... installs an import-hook
        finder that twistd's plugin scan does not see": the README tells
        whoever needs an editable install to use editable_mode=compat.
        """
        with open(os.path.join(ROOT, "README.rst")) as f:
            readme = " ".join(f.read().split())
        self.assertIn("editable_mode=compat", readme)

    def test_twistd_makeServiceBadConfigExits(self):
        """
        Trap T4 "makeService (load and validate config here, errors
        reach the terminal)": a bad config makes C{makeService} raise
        C{SystemExit} whose message is one line naming the file, the line and
        the key; no service is built and nothing is bound.
        """
        path = writeConfig(self, "config:\n  socket: [127.0.0.1, 99999]\n")
        error = self.assertRaises(
            SystemExit, proxyservice.makeService, {"config": path}
        )
        message = error.code
        self.assertIsInstance(message, str)
        self.assertEqual(message.splitlines(), [message])
        self.assertTrue(message.startswith("lmtp-proxy: "), message)
        self.assertIn(path, message)
        self.assertIn("line 2", message)
        self.assertIn("port", message)
        self.assertNotIn("Traceback", message)

    def test_twistd_makeServiceMissingFileExits(self):
        """
        Trap T4 "makeService (load ... config here)": a config file
        that does not exist is a one-line C{SystemExit}, not a traceback
        later.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(SystemExit, proxyservice.makeService, {"config": path})
        self.assertIsInstance(error.code, str)
        self.assertEqual(len(error.code.splitlines()), 1)
        self.assertIn(path, error.code)

    def test_twistd_makeServiceDoesNotBind(self):
        """
        Trap T4 "Startup order": C{makeService} only loads the
        config and builds the service; the port stays free until
        C{privilegedStartService}.
        """
        port = deadPort()
        path = writeConfig(self, GOOD_CONFIG.format(port=port))
        # Trial's reactor keeps Twisted's own dispatch, and its log
        # observers Twisted's own timestamps and formatter, for the tests
        # after.
        self.patch(proxyservice, "dispatchEventsLightly", lambda *args: False)
        self.patch(proxyservice, "cacheLogTimestamps", lambda: False)
        self.patch(proxyservice, "formatPlainLogLines", lambda: False)
        svc = proxyservice.makeService({"config": path})
        self.assertIsInstance(svc, proxyservice.ProxyService)
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # raises if the service had bound it

    @defer.inlineCallbacks
    def test_twistd_bindInPrivilegedStart(self):
        """
        Trap T4 "privilegedStartService (still root: bind ...)":
        the listener accepts connections after C{privilegedStartService}
        alone, before C{startService} (which runs after privileges drop).
        """
        port = deadPort()
        path = writeConfig(self, GOOD_CONFIG.format(port=port))
        svc = proxyservice.ProxyService(configuration.load(path), reactor)
        svc.privilegedStartService()
        self.addCleanup(svc.stopService)
        self.assertFalse(svc.running)
        client = yield connectClient(self, port)
        self.assertEqual(client.replies[0].line[:3], "220")

    def _signalService(self):
        """
        A L{ProxyService} on a L{FakeSignalReactor}, not listening.
        """
        path = writeConfig(self, GOOD_CONFIG.format(port=deadPort()))
        fake = FakeSignalReactor()
        svc = proxyservice.ProxyService(configuration.load(path), fake)
        return svc, fake

    def _installPrevious(self):
        calls = []
        previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        return calls

    def test_twistd_sigusr1ChainsPreviousHandler(self):
        """
        Trap T5 "SIGUSR1 clash ... chaining to the previous handler
        keeps both working": once the service started, the SIGUSR1 handler
        is the service's, and running it also runs the handler installed
        before (twistd's log rotation), once.
        """
        calls = self._installPrevious()
        previous = signal.getsignal(signal.SIGUSR1)
        svc, fake = self._signalService()
        svc.startService()
        self.addCleanup(svc.stopService)
        handler = signal.getsignal(signal.SIGUSR1)
        self.assertIsNot(handler, previous)
        handler(signal.SIGUSR1, None)
        self.assertEqual(calls, [signal.SIGUSR1])
        self.assertEqual(len(fake.fromThread), 1)

    def test_twistd_sigusr1RestoredOnStop(self):
        """
        Trap T5 "SIGUSR1 clash": stopping the service gives SIGUSR1
        back to the handler that was there before.
        """
        self._installPrevious()
        previous = signal.getsignal(signal.SIGUSR1)
        svc, fake = self._signalService()
        svc.startService()
        self.assertIsNot(signal.getsignal(signal.SIGUSR1), previous)
        svc.stopService()
        self.assertIs(signal.getsignal(signal.SIGUSR1), previous)

    def test_twistd_signalWorkViaCallFromThread(self):
        """
        Trap T6 "Do work from a signal handler with
        reactor.callFromThread": the handler itself only schedules the
        reload through the service's reactor's C{callFromThread}; nothing is
        reloaded until that call runs.
        """
        svc, fake = self._signalService()
        generation = svc.state.generation
        called = []
        svc.reloader.reload = lambda: called.append("reload") or defer.succeed(None)
        svc.startService()
        self.addCleanup(svc.stopService)
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        self.assertEqual(called, [])
        self.assertEqual(svc.state.generation, generation)
        self.assertEqual(len(fake.fromThread), 1)
        f, args, kwargs = fake.fromThread[0]
        self.assertEqual((args, kwargs), ((), {}))
        f()
        self.assertEqual(called, ["reload"])

    def _unixService(self, path, extra=""):
        cfg = writeConfig(
            self,
            "config:\n  socket: %s\n%sbackends: {}\nusers: {}\n" % (path, extra),
        )
        svc = proxyservice.ProxyService(configuration.load(cfg), reactor)
        return svc

    def test_twistd_socketModeSurvivesUmask(self):
        """
        Trap T7 "A unix listening port is chmoded after bind (mode
        survives the umask)": with umask 077 (twistd's when daemonizing) the
        socket still gets the configured 0660.
        """
        path = unixPath(self)
        old = os.umask(0o077)
        try:
            svc = self._unixService(path, "  permissions: 0660\n")
            svc.privilegedStartService()
        finally:
            os.umask(old)
        self.addCleanup(svc.stopService)
        self.assertEqual(os.stat(path).st_mode & 0o7777, 0o660)

    def test_twistd_socketChownedInPrivilegedStart(self):
        """
        Trap T7 "never chowned: do it while still root": the socket
        has the configured owner and group as soon as
        C{privilegedStartService} returned.
        """
        if os.getuid() != 0:
            raise unittest.SkipTest("needs root to chown")
        import grp
        import pwd

        path = unixPath(self)
        svc = self._unixService(path, "  owner: nobody\n  group: nogroup\n")
        svc.privilegedStartService()
        self.addCleanup(svc.stopService)
        st = os.stat(path)
        self.assertEqual(st.st_uid, pwd.getpwnam("nobody").pw_uid)
        self.assertEqual(st.st_gid, grp.getgrnam("nogroup").gr_gid)

    @defer.inlineCallbacks
    def test_twistd_staleSocketReplaced(self):
        """
        Trap T8 "wantPID=True removes a stale socket only when it
        really is one": a socket file left by a dead listener is replaced
        and the new socket answers.
        """
        path = unixPath(self)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.close()
        self.assertTrue(os.path.exists(path))
        svc = self._unixService(path)
        svc.privilegedStartService()
        self.addCleanup(svc.stopService)
        client = yield connectClient(self, path)
        self.assertEqual(client.replies[0].line[:3], "220")

    def test_twistd_nonSocketKept(self):
        """
        Trap T8 "only when it really is one": a regular file at the
        socket path is neither removed nor overwritten; startup fails.
        """
        path = unixPath(self)
        with open(path, "wb") as f:
            f.write(b"precious\n")
        svc = self._unixService(path)
        self.assertRaises(SystemExit, svc.privilegedStartService)
        self.addCleanup(svc.stopService)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"precious\n")

    def test_twistd_testsPackageInit(self):
        """
        Trap T9 "python -m twisted.trial tests needs
        tests/__init__.py": it exists and C{tests} is a regular package.
        """
        import tests

        self.assertTrue(os.path.isfile(os.path.join(ROOT, "tests", "__init__.py")))
        self.assertEqual(os.path.basename(tests.__file__), "__init__.py")

    def test_twistd_trialDiscoversTests(self):
        """
        Trap T9 "python -m twisted.trial tests": a dry run of
        C{python -m twisted.trial tests} from the tree finds this module's
        tests.
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        work = tempfile.mkdtemp(prefix="lmtptrial")
        self.addCleanup(__import__("shutil").rmtree, work, True)
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "--temp-directory",
             os.path.join(work, "_trial_temp"), "-n", "tests"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("test_twistd_trialDiscoversTests", result.stdout)
