"""
Packaging: the twistd plugin, setup.cfg, and what a build installs.
"""

from __future__ import annotations

import configparser
import re
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

import lmtp_proxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(args, **kwargs):
    """
    Run C{sys.executable ARGS} in the source tree, with the source tree first
    on the path (as trial has it).
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, **kwargs
    )


def _setupCfg():
    parser = configparser.ConfigParser()
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        parser.read_file(f)
    return parser


def _lines(value):
    return [line.strip() for line in value.splitlines() if line.strip()]


class NamespaceTests(unittest.TestCase):
    """
    C{twisted/} and C{twisted/plugins/} in this project are namespace
    directories: an C{__init__.py} in either would shadow the real Twisted or
    its plugin package.
    """

    def test_noTwistedInit(self):
        """
        twisted/__init__.py does not exist.
        """
        self.assertFalse(os.path.lexists(os.path.join(ROOT, "twisted", "__init__.py")))

    def test_noTwistedPluginsInit(self):
        """
        twisted/plugins/__init__.py does not exist.
        """
        self.assertFalse(os.path.lexists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))

    def test_realTwistedImported(self):
        """
        C{import twisted} finds the real Twisted, not this project's directory.
        """
        import twisted

        self.assertNotEqual(
            os.path.dirname(os.path.abspath(twisted.__file__)), os.path.join(ROOT, "twisted")
        )


class PluginTests(unittest.TestCase):
    """
    The twistd plugin.
    """

    def test_getPluginsFindsLmtpProxy(self):
        """
        C{getPlugins(IServiceMaker)} finds a service maker with tapname
        "lmtp-proxy" whose module is lmtp_proxy.service.
        """
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "lmtp-proxy"]
        self.assertTrue(makers, "no lmtp-proxy service maker found")
        self.assertEqual({m.module for m in makers}, {"lmtp_proxy.service"})

    def test_pluginImportIsLazy(self):
        """
        Importing the plugin file does not import lmtp_proxy.service (twistd
        imports every plugin just to list them).
        """
        result = _python(
            [
                "-c",
                "import sys, twisted.plugins.lmtp_proxy_plugin as p; "
                "print(p.__file__); print('lmtp_proxy.service' in sys.modules)",
            ]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        path, loaded = result.stdout.split()
        # The installed copy may come first on twisted.plugins.__path__.
        self.assertTrue(path.endswith(os.path.join("twisted", "plugins", "lmtp_proxy_plugin.py")), path)
        self.assertEqual(loaded, "False")

    def test_twistdHelpListsPlugin(self):
        """
        C{twistd --help} lists the lmtp-proxy command.
        """
        result = _python(
            ["-c", "import sys; from twisted.scripts.twistd import run; "
                   "sys.argv = ['twistd', '--help']; run()"]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"(?m)^\s+lmtp-proxy\s")

    def test_twistdPluginHelpShowsConfig(self):
        """
        C{twistd -n lmtp-proxy --help} shows the --config option.
        """
        result = _python(
            ["-c", "import sys; from twisted.scripts.twistd import run; "
                   "sys.argv = ['twistd', '-n', 'lmtp-proxy', '--help']; run()"]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)


class SetupConfigTests(unittest.TestCase):
    """
    setup.cfg.
    """

    def test_packagesListedExplicitly(self):
        """
        The packages are lmtp_proxy and twisted.plugins, listed explicitly
        ("find:" cannot see twisted.plugins).
        """
        packages = _lines(_setupCfg()["options"]["packages"])
        self.assertEqual(sorted(packages), ["lmtp_proxy", "twisted.plugins"])

    def test_requirements(self):
        """
        Twisted, PyYAML and zope.interface are required, Twisted within the
        releases the tests of lmtp_proxy/twisted_internals.py passed on.
        """
        requires = _lines(_setupCfg()["options"]["install_requires"])
        names = sorted(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires)
        self.assertEqual(names, ["pyyaml", "twisted", "zope.interface"])
        self.assertIn("Twisted>=26.10,<27", requires)

    def test_consoleScript(self):
        """
        The lmtp-proxy console script is lmtp_proxy.cli:main.
        """
        scripts = _lines(_setupCfg()["options.entry_points"]["console_scripts"])
        self.assertEqual(scripts, ["lmtp-proxy = lmtp_proxy.cli:main"])

    def test_versionFromPackage(self):
        """
        The distribution's version is lmtp_proxy.__version__.
        """
        cfg = _setupCfg()["metadata"]
        self.assertEqual(cfg["name"], "lmtp-proxy")
        self.assertEqual(cfg["version"].strip(), "attr: lmtp_proxy.__version__")
        self.assertRegex(lmtp_proxy.__version__, r"^\d+\.\d+(\.\d+)?")


class BuildTests(unittest.TestCase):
    """
    What setuptools would install.
    """

    def setUp(self):
        try:
            import setuptools  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("setuptools is not installed")
        self.out = tempfile.mkdtemp(prefix="lmtpbuild")
        self.addCleanup(shutil.rmtree, self.out, True)

    def test_buildContainsPluginWithoutInits(self):
        """
        A build holds the plugin file and the lmtp_proxy package, and no
        twisted/__init__.py or twisted/plugins/__init__.py.
        """
        result = _python(
            ["setup.py", "-q", "build_py", "--build-lib", self.out],
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        built = lambda *p: os.path.exists(os.path.join(self.out, *p))  # noqa: E731
        self.assertTrue(built("twisted", "plugins", "lmtp_proxy_plugin.py"))
        self.assertTrue(built("lmtp_proxy", "cli.py"))
        self.assertFalse(built("twisted", "__init__.py"))
        self.assertFalse(built("twisted", "plugins", "__init__.py"))
