# Tunnels developer entry points.  Every target is idempotent and quick when nothing changed:
# the virtualenv is rebuilt only when pyproject.toml is newer than its stamp file.

# The venv's interpreter: the distribution's CPython (/usr/bin/python3) when it is 3.11 or
# newer and can make a venv, else python3 from PATH. Debian's is linked statically and built
# with PGO and LTO; a default source build (pyenv's: a shared libpython, no
# --enable-optimizations) costs the daemons 15-30 % more CPU per connection and request
# (docs/performance.md, "The interpreter"). `make PYTHON=...` chooses another; an existing
# .venv is kept (remove .venv to make it again with another).
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
            "$$p" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1 && { echo "$$p"; exit 0; }; done; echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tunnels-installed
SRC    := tunnel tests bench twisted examples

# Debian packages for the command-line clients the tests drive: command -> package.
# pebble: Let's Encrypt's test ACME server (pebble and pebble-challtestsrv in /usr/bin).
DEB_TOOLS := curl:curl openssl:openssl nc:netcat-openbsd socat:socat nghttpd:nghttp2-server \
             ssh:openssh-client sshd:openssh-server pebble:pebble pebble-challtestsrv:pebble \
             chromium:chromium

.PHONY: all venv deps lint types test fuzz bench profile soak demo clean plugins

all: test

# The package's bytecode, compiled once: an editable install ships none, and where
# PYTHONDONTWRITEBYTECODE is set nothing writes it later, so every start would compile
# tunnel/ again (~40-50 ms of a cold start; docs/performance.md, "Cold start"). compileall
# skips what is up to date, so this is quick when nothing changed.
venv: $(STAMP)
	@$(PY) -m compileall -q tunnel

# A plain PEP 660 editable install hides twisted/plugins from Twisted's plugin discovery (it
# scans sys.path directories for twisted/plugins/), so use the "compat" mode, which puts the
# project root on sys.path through a .pth file. setuptools warns on every install that the
# mode is transitional (and, for any editable install, about folders named like packages):
# known, and not the user's to act on, so the install runs with warnings off.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "venv: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "venv: installing pip and setuptools"
	@$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=77"
	@echo "venv: installing tunnels (editable) and its test tools; a minute the first time"
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@$(MAKE) --no-print-directory plugins
	@touch $@
	@echo "venv: ready; . $(VENV)/bin/activate for tunnel and twistd tunnelrelay/tunnelagent"

# Regenerate Twisted's plugin cache (dropin.cache) so `twistd --help` lists our plugins.
plugins:
	@$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

deps:
	@missing=""; \
	for pair in $(DEB_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "deps: not root, skipping apt-get install of:$$missing (tests needing them skip)"; \
	  exit 0; \
	fi; \
	echo "deps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	{ apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing; } \
	  >/dev/null || echo "deps: apt-get failed; tests needing$$missing will skip"

lint: venv
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

types: venv
	$(VENV)/bin/mypy tunnel

test: deps venv lint types
	$(VENV)/bin/pytest -q

fuzz: venv
	$(PY) -m tests.fuzz

bench: venv
	$(PY) -m bench

# Where the relay's and the agent's CPU goes under load (py-spy; docs/performance.md).
PROFILE_ARGS ?=
profile: venv
	$(PY) -m bench.profile $(PROFILE_ARGS)

SOAK_ARGS ?=
soak: venv
	$(PY) -m bench.soak $(SOAK_ARGS)

demo: venv
	$(PY) -m tunnel.demo

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -f twisted/plugins/dropin.cache $(STAMP)
	find $(SRC) -name __pycache__ -type d -prune -exec rm -rf {} +
