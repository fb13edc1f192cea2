"""
contrib/grafana-lmtp-proxy.json: every query names metrics the proxy
exports, and every exported metric has a place on the dashboard.
"""

import json
import os
import re

from twisted.trial import unittest

from lmtp_proxy.metrics import Metrics, exposition

DASHBOARD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "contrib",
    "grafana-lmtp-proxy.json",
)
METRIC = re.compile(r"\blmtp_proxy_[a-z0-9_]+")


def exported():
    """
    The family and sample names of a proxy whose every metric has moved.
    """
    metrics = Metrics()
    metrics.rcptReply("a", 250)
    metrics.recipient("a", "sent")
    metrics.delivered("a", 0.1)
    metrics.relayed("a", 100)
    metrics.connected("a", 0.01)
    metrics.reused("a")
    metrics.connectFailed("a", "unreachable")
    metrics.reloaded("ok", 0.5)
    backend = {"address": "x", "state": "up", "pooled": 1, "busy": 0, "last_failure": None}
    status = {
        "generation": 1,
        "routes": 1,
        "processes": 1,
        "sessions": 1,
        "generations": {"1": 1},
        "in_flight": [{"generation": 1, "backend": "a", "count": 1}],
        "backends": {"a": backend},
    }
    families = exposition([metrics.samples()], status)
    return (
        {family.name for family in families},
        {sample.name for family in families for sample in family.samples},
    )


def queries(dashboard):
    """
    Every PromQL expression of the dashboard: its panels' targets and its
    annotations.
    """
    found = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    found += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return found


class DashboardTests(unittest.TestCase):
    """
    The Grafana dashboard matches the metrics.
    """

    def setUp(self):
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)
        self.families, self.samples = exported()

    def test_queriesNameExportedMetrics(self):
        """
        Each query names at least one metric, and only metrics the proxy
        exports (sample names: C{_total}, C{_bucket}, ...).
        """
        for expr in queries(self.dashboard):
            names = METRIC.findall(expr)
            self.assertTrue(names, expr)
            self.assertEqual([n for n in names if n not in self.samples], [], expr)

    def test_everyMetricShown(self):
        """
        Every exported metric family appears in some query.
        """
        used = {
            family
            for expr in queries(self.dashboard)
            for name in METRIC.findall(expr)
            for family in self.families
            if name == family or name.startswith(family + "_")
        }
        self.assertEqual(sorted(self.families - used), [])

    def test_panelsForAMigration(self):
        """
        Recipients/s per backend and outcome, the deferral rate, latency
        percentiles, in flight, generation and reloads each have a panel.
        """
        titles = " | ".join(panel["title"] for panel in self.dashboard["panels"]).lower()
        for words in ("recipients/s", "deferral rate", "latency", "in flight",
                      "generation", "reloads"):
            self.assertIn(words, titles)
