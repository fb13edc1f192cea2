"""
setuptools shim: all metadata lives in setup.cfg.

Install with a normal ``pip install .``.  ``pip install -e .`` with a current
setuptools installs an import-hook finder that twistd's plugin scan does not
see; use ``pip install --config-settings editable_mode=compat -e .`` if you
need an editable install.
"""

from setuptools import setup

setup()
