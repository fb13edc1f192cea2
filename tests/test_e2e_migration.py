"""
End-to-end tests of the migration that README.rst ("Migrating a user with no
lost mail") describes, played against real peers: a private Postfix instance
(Debian's postfix, on loopback) delivering over LMTP through the installed
proxy (``twistd -n lmtp-proxy``) to two real Dovecot LMTP backends, with the
``lmtp-proxy reload [--wait]`` command driving the switch.

Every peer and the proxy run as separate processes (see tests/peers.py), so
the tests are plain blocking code; every process is stopped by its PID at
cleanup. Skipped when a peer is missing (failed when CI=true).
"""

import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from twisted.trial import unittest

from tests import peers
from tests.lmtpclient import BlockingLMTPClient, lmtpDeliver

SENDER = "sender@origin.test"
MOVER = "mover@example.test"
STAYER = "stayer@example.test"
SEQ_HEADER = b"X-Mig-Seq: "
HELD = 1000000  # the number of the message held open across step 1


def lmtpProxyCommand():
    """
    The lmtp-proxy console script of the Python running the tests (the one
    installed next to the twistd the Proxy fixture starts).
    """
    path = os.path.join(os.path.dirname(sys.executable), "lmtp-proxy")
    if not os.access(path, os.X_OK):
        peers._unavailable("no lmtp-proxy console script next to %s"
                           % (sys.executable,))
    return path


def proxyConfig(backends, users, **options):
    """
    A proxy config dict listening on a free 127.0.0.1 port (chosen here, so
    that the dict can be rewritten and written again for a reload).
    """
    config = {"socket": ["127.0.0.1", peers.freePort()],"ignoreDomain": False, "hostname": "proxy.test",
              "connect_timeout": 5, "shutdown_grace": 2}
    config.update(options)
    return {"config": config, "backends": backends, "users": users}


def seqNumbers(backend, address):
    """
    The X-Mig-Seq numbers of the messages in backend's maildir for
    address, one entry per file (duplicates kept), in file order.
    """
    numbers = []
    for data in backend.messages(address):
        m = re.search(rb"^X-Mig-Seq: (\d+)\r?$", data, re.M)
        if m is None:
            raise AssertionError("message without %r in %s: %r"
                                 % (SEQ_HEADER, backend.name, data[:400]))
        numbers.append(int(m.group(1)))
    return numbers


def finalSync(old, new, address):
    """
    The final imapsync, reduced to what it does to a maildir: copy every
    message file of address from old's new/ and cur/ into new's cur/ (same
    file name, owned by the harness user, as Dovecot would store it).
    Creates new's Maildir (new/, cur/, tmp/) if Dovecot has not yet.
    """
    dst = new.maildir(address)
    uid, gid = new.user.pw_uid, new.user.pw_gid
    # home (mail/domain/local) and Maildir must belong to the harness user
    home = os.path.dirname(dst)
    for d in (os.path.dirname(home), home, dst,
              os.path.join(dst, "new"), os.path.join(dst, "cur"),
              os.path.join(dst, "tmp")):
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
            os.chown(d, uid, gid)
    copied = 0
    for path in old.messagePaths(address):
        target = os.path.join(dst, "cur", os.path.basename(path))
        if os.path.exists(target):
            raise AssertionError("final sync: %s already exists" % (target,))
        tmp = os.path.join(dst, "tmp", os.path.basename(path))
        shutil.copyfile(path, tmp)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, 0o600)
        os.rename(tmp, target)
        copied += 1
    return copied


class Sender(threading.Thread):
    """
    Submits numbered messages over SMTP to a PostfixClient, one every
    `interval` seconds, until stop(): message N goes to MOVER; every
    `stayerEvery`-th tick another one goes to STAYER. Records which numbers
    Postfix accepted (and when), and any submission error.
    """

    def __init__(self, mta, interval=0.06, stayerEvery=4):
        threading.Thread.__init__(self, daemon=True)
        self.mta = mta
        self.interval = interval
        self.stayerEvery = stayerEvery
        self.accepted = {}        # MOVER number -> monotonic submit time
        self.stayerAccepted = {}  # STAYER number -> monotonic submit time
        self.errors = []
        self._halt = threading.Event()

    def _submit(self, address, n, record):
        try:
            refused = self.mta.send(
                SENDER, [address], "migration message %d\r\n" % (n,),
                subject="msg %d" % (n,),
                headers=["X-Mig-Seq: %d" % (n,),
                         "X-Mig-To: %s" % (address,)])
        except Exception as e:
            self.errors.append((address, n, repr(e)))
            return
        if refused:
            self.errors.append((address, n, repr(refused)))
        else:
            record[n] = time.monotonic()

    def run(self):
        n = 0
        while not self._halt.is_set():
            n += 1
            self._submit(MOVER, n, self.accepted)
            if n % self.stayerEvery == 0:
                self._submit(STAYER, n, self.stayerAccepted)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(30)


class MigrationTests(unittest.TestCase):
    # trial's default is 120 s; each test here needs well under 60 s.
    timeout = 90

    def reload(self, proxy, wait=False, timeout=30):
        """
        Run `lmtp-proxy reload [--wait] -c FILE` against the proxy; the
        SIGUSR1 fallback (plain reload) may only ever signal this proxy.
        """
        cmd = [lmtpProxyCommand(), "reload", "-c", proxy.configPath,
               "--pidfile", proxy.pidPath]
        if wait:
            cmd += ["--wait", "--timeout", str(timeout)]
        return subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout + 30)

    def test_migrationUnderContinuousMail(self):
        """
        The whole migration of one user while mail keeps arriving for them
        (a message every ~60 ms submitted to a real Postfix that delivers
        over LMTP through the proxy to two real Dovecot stores): (1) the
        user's row becomes `reject` and `lmtp-proxy reload --wait` returns
        0, while one more delivery to the old store (an LMTP client holding
        its message open) is in flight and ends 3 s later; (2) the final
        sync copies the old maildir to the new one; (3) the row becomes
        `new`, `lmtp-proxy reload`, `postqueue -f`; more mail; then the
        sender stops and Postfix's queue drains.

        Every message Postfix accepted for the user is in the new store
        exactly once (none lost, none duplicated); the old store holds
        exactly what it held when the final sync ran (nothing reached it
        after the barrier), including the message that was in flight, and
        some, but not all, messages; Postfix logged 451 4.2.1 deferrals for
        the user during the window; its queue is empty at the end; and
        another user on the old store kept receiving mail, each message
        exactly once, throughout.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        new = peers.DovecotBackend(self, "new", tcp=True)
        backends = {"old": old.backendConfig("tcp"),
                    "new": new.backendConfig("tcp")}
        config = proxyConfig(backends, {MOVER: "old", STAYER: "old"})
        proxy = peers.Proxy(self, config)
        lmtpProxyCommand()
        mta = peers.PostfixClient(self, proxy.target, domains=["example.test"])

        sender = Sender(mta)
        self.addCleanup(sender.stop)
        sender.start()
        t0 = time.monotonic()
        timeline = []

        def mark(what):
            timeline.append("%6.2fs %s" % (time.monotonic() - t0, what))

        def context():
            return ("\ntimeline:\n  %s\nsender errors: %r\nproxy log tail:\n%s"
                    "\nmaillog tail:\n%s" % (
                        "\n  ".join(timeline), sender.errors[:5],
                        proxy.log()[-4000:], mta.log()[-4000:]))

        # mail flows to the old store first
        peers.waitFor(lambda: len(old.messages(MOVER)) >= 5, 30,
                      what="5 messages for %s in the old store" % (MOVER,))
        mark("%d in old before step 1" % (len(old.messages(MOVER)),))

        # one more delivery to the old store is in flight when step 1
        # begins (an LMTP client holding its message open after DATA), and
        # ends 3 s into the reload --wait: the barrier must wait for it
        held = BlockingLMTPClient(proxy.target)
        self.addCleanup(held.close)
        held.lhlo()
        held.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                  % (SENDER.encode(), MOVER.encode()))
        self.assertEqual([held.readReply().code for i in range(3)],
                         [250, 250, 354], held.lines)
        held.send(b"X-Mig-Seq: %d\r\nSubject: msg held\r\n\r\nheld\r\n"
                  % (HELD,))
        heldReply = []

        def finishHeld():
            time.sleep(3.0)
            held.send(b"open across the reload\r\n.\r\n")
            heldReply.append(held.readReply())
        finisher = threading.Thread(target=finishHeld, daemon=True)

        # 1. defer new mail for the user and wait for the barrier
        config["users"] = {MOVER: "reject", STAYER: "old"}
        proxy.writeConfig(config)
        started = time.monotonic()
        finisher.start()
        run = self.reload(proxy, wait=True)
        mark("reload --wait took %.3fs: rc=%s %r %r" % (
            time.monotonic() - started, run.returncode, run.stdout, run.stderr))
        self.assertEqual(run.returncode, 0, run.stderr + context())
        self.assertIn("drained", run.stdout, context())

        # 2. final sync, right after the barrier
        snapshot = seqNumbers(old, MOVER)
        stayerAtSync = len(old.messages(STAYER))
        copied = finalSync(old, new, MOVER)
        mark("final sync: %d in old, %d copied" % (len(snapshot), copied))
        finisher.join(30)
        self.assertEqual([r.code for r in heldReply], [250], held.lines)
        self.assertEqual(copied, len(snapshot))
        # the delivery that was in flight is complete before the final sync
        self.assertIn(HELD, snapshot, context())

        # the window: Postfix really queues the user's mail (451 4.2.1)
        def deferred():
            return [l for l in mta.deliveries(MOVER)
                    if "status=deferred" in l and "451 4.2.1" in l]
        try:
            peers.waitFor(deferred, 30, interval=0.2,
                          what="a 451 4.2.1 deferral for %s" % (MOVER,))
        except self.failureException as e:
            self.fail(str(e) + context())
        time.sleep(1.0)
        mark("%d deferral(s) logged" % (len(deferred()),))

        # 3. deliver to the new store; Postfix's queued mail follows
        config["users"] = {MOVER: "new", STAYER: "old"}
        proxy.writeConfig(config)
        run = self.reload(proxy)
        mark("reload: rc=%s %r %r" % (run.returncode, run.stdout, run.stderr))
        self.assertEqual(run.returncode, 0, run.stderr + context())
        self.assertTrue(run.stdout.startswith("ok "), run.stdout + context())
        mta.flush()

        # keep sending to the new store for a while, then stop
        time.sleep(2.0)
        sender.stop()
        mark("sender stopped: %d for %s, %d for %s accepted by Postfix" % (
            len(sender.accepted), MOVER, len(sender.stayerAccepted), STAYER))
        self.assertEqual(sender.errors, [], context())

        # wait until Postfix's queue is empty, flushing what is deferred
        deadline = time.monotonic() + 60
        while not mta.isEmpty():
            if time.monotonic() > deadline:
                self.fail("Postfix's queue is not empty after 60 s:\n%s%s"
                          % (mta.queue(), context()))
            mta.flush()
            time.sleep(1.0)
        mark("queue empty")
        self.assertIn("Mail queue is empty", mta.queue())

        sent = set(sender.accepted) | {HELD}
        inNew = collections.Counter(seqNumbers(new, MOVER))
        inOld = collections.Counter(seqNumbers(old, MOVER))
        self.assertTrue(sent, context())
        # none lost: every accepted message is in the new store
        self.assertEqual(sorted(sent - set(inNew)), [], "lost" + context())
        # none duplicated, nothing unexpected
        self.assertEqual(
            sorted(n for n, c in inNew.items() if c != 1), [],
            "duplicated in new: %r%s" % (
                dict((n, c) for n, c in inNew.items() if c != 1), context()))
        self.assertEqual(sorted(set(inNew) - sent), [], context())
        # the barrier held: nothing reached the old store after the sync
        self.assertEqual(sorted(inOld.elements()), sorted(snapshot),
                         "old store changed after the barrier" + context())
        self.assertEqual(len(inOld), sum(inOld.values()), context())
        # the migration really split the mail between the stores
        self.assertTrue(snapshot, context())
        self.assertTrue(sent - set(snapshot), context())
        self.assertEqual(new.messages(STAYER), [], context())

        # the other user kept getting mail on the old store, exactly once
        stayer = collections.Counter(seqNumbers(old, STAYER))
        self.assertEqual(sorted(stayer.elements()),
                         sorted(sender.stayerAccepted), context())
        self.assertGreater(len(old.messages(STAYER)), stayerAtSync, context())
        self.assertFalse(
            [l for l in mta.deliveries(STAYER) if "status=sent" not in l],
            context())

    def holdOpen(self, proxy, start):
        """
        Begin a delivery for MOVER through the proxy and send C{start} of its
        message, leaving it open; return the client.
        """
        c = BlockingLMTPClient(proxy.target)
        self.addCleanup(c.close)
        c.lhlo()
        c.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
               % (SENDER.encode(), MOVER.encode()))
        replies = [c.readReply() for i in range(3)]
        self.assertEqual([r.code for r in replies], [250, 250, 354], c.lines)
        c.send(start)
        return c

    def test_reloadWaitWaitsForDeliveryInFlight(self):
        """
        `lmtp-proxy reload --wait` does not return while a transaction begun
        under the old configuration is still delivering to the old store: a
        client holds a message open after DATA (half of it sent to Dovecot
        through the proxy) while the user is switched to `reject`; reload
        --wait is still running 1.5 s later and nothing is stored yet; once
        the client finishes the message (250), reload --wait exits 0 with
        "drained", and by then the message is in the old maildir.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        config = proxyConfig({"old": old.backendConfig("tcp")},
                             {MOVER: "old"})
        proxy = peers.Proxy(self, config)
        command = lmtpProxyCommand()

        c = self.holdOpen(proxy, b"X-Mig-Seq: 1\r\nSubject: in flight\r\n\r\n"
                          + b"first half of the message\r\n" * 200)

        config["users"] = {MOVER: "reject"}
        proxy.writeConfig(config)
        started = time.monotonic()
        reload = subprocess.Popen(
            [command, "reload", "--wait", "--timeout", "30",
             "-c", proxy.configPath],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(peers.stopPid, reload.pid, 5, reload)
        time.sleep(1.5)
        if reload.poll() is not None:
            self.fail("reload --wait returned while a delivery was in "
                      "flight: %r" % (reload.communicate(),))
        self.assertEqual(old.messages(MOVER), [])

        c.send(b"second half\r\n.\r\n")
        final = c.readReply()
        finished = time.monotonic()
        self.assertEqual(final.code, 250, c.lines)
        out, err = reload.communicate(timeout=30)
        returned = time.monotonic()
        self.assertEqual(reload.returncode, 0, (out, err))
        self.assertIn("drained", out)
        # it waited for the transaction: longer than the client held it
        self.assertGreaterEqual(returned - started, 1.5)
        self.assertLess(returned - finished, 10)
        self.assertEqual(seqNumbers(old, MOVER), [1])
        c.quit()

    def test_reloadWaitTimesOutWhileDeliveryInFlight(self):
        """
        `lmtp-proxy reload --wait --timeout 1` while a transaction begun
        under the old configuration stays open exits 1 and says "timeout"
        on stderr (the migration script must not run the final sync yet);
        the new configuration is in force anyway (a new RCPT for the user
        gets 451 4.2.1), and the open transaction still delivers to the old
        store when the client finishes it.
        """
        old = peers.DovecotBackend(self, "old", tcp=True)
        config = proxyConfig({"old": old.backendConfig("tcp")},
                             {MOVER: "old"})
        proxy = peers.Proxy(self, config)
        lmtpProxyCommand()

        c = self.holdOpen(proxy, b"X-Mig-Seq: 7\r\nSubject: held open\r\n\r\nbody\r\n")

        config["users"] = {MOVER: "reject"}
        proxy.writeConfig(config)
        started = time.monotonic()
        run = self.reload(proxy, wait=True, timeout=1)
        took = time.monotonic() - started
        self.assertEqual(run.returncode, 1, (run.stdout, run.stderr))
        self.assertIn("timeout", run.stderr)
        self.assertEqual(run.stdout, "")
        self.assertGreaterEqual(took, 0.9)

        probe = lmtpDeliver(proxy.target, SENDER, [MOVER],
                            b"Subject: probe\r\n\r\nprobe\r\n")
        self.assertEqual(probe["rcpt"][0].code, 451, probe["lines"])
        self.assertTrue(probe["rcpt"][0].text.startswith("4.2.1"), probe["lines"])

        c.send(b".\r\n")
        final = c.readReply()
        self.assertEqual(final.code, 250, c.lines)
        c.quit()
        self.assertEqual(seqNumbers(old, MOVER), [7])
