# lmtp-proxy developer targets (GNU make).  Each target sets itself up: it
# works on a fresh Debian 12 machine as root and on one where everything is
# already installed.
#
#   make run     install into .venv, start two demo Maildir backends and run
#                the proxy in the foreground with examples/lmtp-proxy.yaml
#                (CONFIG=FILE to change)
#   make test    install into .venv, install the real peers (Postfix, swaks,
#                Dovecot) when root and missing, run trial
#   make bench   run bench/run.sh
#   make clean   remove .venv and build output

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

# The distribution's interpreter when it is recent enough (setup.cfg's
# python_requires): a Debian mail host runs the proxy with it, so the tests
# and benchmarks run it too. A python3 ahead of it on PATH (pyenv, a local
# build) may be built differently and run the proxy slower
# (bench/RESULTS.md, "The interpreter"). PYTHON=... overrides.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
VBIN := $(VENV)/bin
CONFIG ?= examples/lmtp-proxy.yaml
TRIAL_ARGS ?=
TESTS ?= tests
# The peers' programs live in sbin directories, which a non-login PATH may lack.
PEER_PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin
PEER_TOOLS := smtp-sink swaks dovecot postfix

# A normal (non-editable) install: twistd's plugin scan does not see the
# import hook of a setuptools editable install.  Reinstalled when sources change.
VENV_STAMP := $(VENV)/.created
INSTALL_STAMP := $(VENV)/.installed
SOURCES := $(wildcard lmtp_proxy/*.py twisted/plugins/*.py) setup.cfg setup.py README.rst

.PHONY: run test bench venv install peers clean

$(VENV_STAMP):
	rm -rf $(VENV)
	@if ! { command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -m venv $(VENV); }; then \
	    if [ "$$(id -u)" != 0 ]; then \
	        echo "make: '$(PYTHON) -m venv' failed: apt-get install python3 python3-venv" >&2; exit 1; \
	    fi; \
	    echo "Installing python3 and python3-venv"; \
	    apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv; \
	    rm -rf $(VENV); \
	    $(PYTHON) -m venv $(VENV); \
	fi
	$(VBIN)/python -m pip install -q --upgrade pip
	touch $@

venv: $(VENV_STAMP)

$(INSTALL_STAMP): $(VENV_STAMP) $(SOURCES)
	$(VBIN)/python -m pip install -q '.[tls,metrics,postgresql]'
	touch $@

install: $(INSTALL_STAMP)

# The demo backends of "make run": a Maildir delivery for each NAME=HOST:PORT,
# storing under $(DEMO_DIR)/NAME; examples/lmtp-proxy.yaml names them.  They
# start with any CONFIG, and stop when the proxy does.
DEMO_DIR ?= demo
DEMO_BACKENDS ?= old=127.0.0.1:24101 new=127.0.0.1:24102

run: $(INSTALL_STAMP)
	bash tools/demo.sh $(VBIN)/python $(DEMO_DIR) "$(DEMO_BACKENDS)" \
	    $(VBIN)/twistd -n --pidfile= lmtp-proxy --config $(CONFIG)

# Installs the third-party peers only when root and one of them is missing;
# otherwise the peer tests skip (and fail under CI=true).
peers:
	@export PATH="$(PEER_PATH)"; \
	missing=""; \
	for tool in $(PEER_TOOLS); do \
	    command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	[ -e /usr/lib/dovecot/lmtp ] || missing="$$missing dovecot-lmtpd"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -e /usr/lib/cyrus/bin/lmtpd ] || missing="$$missing cyrus-imapd"; \
	bash tools/install-peers.sh --check >/dev/null 2>&1 || missing="$$missing (TLS/SASL peers)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing the test peers (missing:$$missing)"; \
	    bash tools/install-peers.sh; \
	else \
	    echo "make: not root, so not installing the missing test peers:$$missing" >&2; \
	    echo "make: their tests will be skipped (or fail when CI=true)" >&2; \
	fi

# The source tree goes first on the path (the venv's trial does not add the
# current directory), so the tests see these sources and this plugin file.
test: $(INSTALL_STAMP) peers
	PATH="$(PEER_PATH)" PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
	    $(VBIN)/trial $(TRIAL_ARGS) $(TESTS)

bench: $(INSTALL_STAMP) peers
	PATH="$(PEER_PATH)" bash bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp twisted/plugins/dropin.cache
