"""
End to end: the installed proxy (C{twistd -n lmtp-proxy}) with C{metrics}
and a worker process, real Dovecot and smtp-sink backends (tests/peers.py),
and C{/metrics} read over HTTP and parsed by prometheus_client's own parser:
the counters equal what was sent.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from tests import peers
from tests.lmtpclient import lmtpDeliver
from tests.support import unixPath
from tests.test_notify import notifySocket, received

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b"Subject: metrics e2e\r\n\r\nhello\r\n"


def scrape(port):
    """
    The samples at http://127.0.0.1:PORT/metrics:
    C{{(name, sorted label items): value}}.
    """
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % (port,), timeout=30) as r:
        text = r.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrapeOnceUp(port):
    """
    L{scrape}, or nothing while the HTTP port refuses: the proxy binds it
    just after its LMTP socket, which the start-up wait connects to.
    """
    try:
        return scrape(port)
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return {}
        raise


def recipients(samples, backend, outcome):
    return samples.get(
        ("lmtp_proxy_recipients_total", (("backend", backend), ("outcome", outcome))), 0
    )


class MetricsEndToEndTests(unittest.TestCase):
    timeout = 90

    def test_countersEqualWhatWasSent(self):
        """
        Messages to a Dovecot backend, an smtp-sink backend, a sink that
        answers 451 at RCPT and a user routed to C{reject}, served by two
        processes: /metrics counts each recipient once, by backend and
        outcome, as the backends saw them; C{status --json} agrees; and
        systemd's notify socket got C{READY=1}, then C{STOPPING=1}.
        """
        dove = peers.DovecotBackend(self, "old", tcp=True)
        sink = peers.SmtpSink(self)
        busy = peers.SmtpSink(self, args=peers.SmtpSink.tempfailRcpt(), name="busy")
        port = peers.freePort()
        notify = unixPath(self)
        notified = notifySocket(self, notify)
        os.environ["NOTIFY_SOCKET"] = notify
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        proxy = peers.Proxy(self, {
            "config": {"metrics": ["127.0.0.1", port], "workers": 2,
                       "hostname": "proxy.test", "shutdown_grace": 2},
            "backends": {"old": dove.backendConfig("tcp"), "sink": sink.backendConfig(),
                         "busy": busy.backendConfig()},
            "users": {"@old.test": "old", "@sink.test": "sink", "@busy.test": "busy",
                      "carol@old.test": "reject"},
        })
        peers.waitFor(lambda: scrapeOnceUp(port).get(("lmtp_proxy_processes", ())) == 2, 30,
                      what="the worker to answer")
        sent = 6
        for n in range(sent):
            result = lmtpDeliver(proxy.target, "s@origin.test",
                                 ["u%d@old.test" % n, "u%d@sink.test" % n], MESSAGE)
            self.assertEqual([reply.code for _, reply in result["final"]], [250, 250])
        lmtpDeliver(proxy.target, "s@origin.test",
                    ["carol@old.test", "dave@busy.test", "u0@old.test"], MESSAGE)
        samples = scrape(port)
        self.assertEqual(recipients(samples, "old", "sent"), sent + 1)
        self.assertEqual(recipients(samples, "sink", "sent"), sent)
        self.assertEqual(recipients(samples, "reject", "deferred"), 1)
        self.assertEqual(recipients(samples, "busy", "deferred"), 1)
        self.assertEqual(
            samples[("lmtp_proxy_rcpt_replies_total", (("backend", "busy"), ("class", "4xx")))], 1
        )
        self.assertEqual(samples[("lmtp_proxy_messages_total", (("backend", "sink"),))], sent)
        self.assertEqual(
            samples[("lmtp_proxy_message_bytes_total", (("backend", "old"),))],
            (sent + 1) * len(MESSAGE),
        )
        self.assertEqual(
            samples[("lmtp_proxy_delivery_duration_seconds_count", (("backend", "old"),))],
            sent + 1,
        )
        # What the backends themselves saw.
        self.assertEqual(len(dove.allMessages()), sent + 1)
        peers.waitFor(lambda: sink.counters().get("mesg") == sent, 10, what="smtp-sink's count")

        done = subprocess.run(
            [sys.executable, "-m", "lmtp_proxy.cli", "status", "-c", proxy.configPath, "--json"],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        status = json.loads(done.stdout)
        self.assertEqual((status["generation"], status["processes"]), (1, 2))
        self.assertEqual(status["backends"]["old"]["address"], "127.0.0.1:%d" % (dove.port,))
        self.assertEqual(status["backends"]["old"]["state"], "up")

        # systemd's view of the same run: ready once listening, then stopping.
        self.assertEqual(received(notified), [["READY=1", "STATUS=serving, generation 1"]])
        proxy.stop()
        self.assertEqual(received(notified), [["STOPPING=1"]])
