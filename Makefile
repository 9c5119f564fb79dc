# yimaporc: two commands (make run, make test); see README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The IMAP clients and the reference server of tests/integration/test_imap_real_clients.py.
APT_IMAP_TOOLS := mbsync:isync offlineimap:offlineimap3 dovecot:dovecot-imapd
# command:package pairs the end-to-end tests drive (mail clients, players, a browser
# for the dashboard).
APT_TOOLS := ffmpeg:ffmpeg curl:curl swaks:swaks gst-launch-1.0:gstreamer1.0-tools sox:sox \
  msmtp:msmtp mutt:mutt fetchmail:fetchmail chromium:chromium prometheus:prometheus \
  mpv:mpv cvlc:vlc-bin faketime:faketime iptables:iptables ip:iproute2
# Packages without a command of their own (checked by file below): VLC's demuxers and
# decoders, and PyGObject with GStreamer's introspection data for the playbin client.
APT_EXTRA := gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav \
  vlc-plugin-base python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
APT_EXTRA_FILES := /usr/lib/x86_64-linux-gnu/girepository-1.0/Gst-1.0.typelib \
  /usr/lib/python3/dist-packages/gi/__init__.py
PYTEST_ARGS ?=
FUZZ_INPUTS ?= 100000
FUZZ_TARGET ?= all
FUZZ_SEED ?= 0
FUZZ_WORKERS ?= 32
FUZZ_ARGS ?=
CHAOS_ARGS ?=

.PHONY: install system-tools run test lint typecheck unit integration test-slow bench fuzz chaos clean

install: system-tools $(STAMP)

# System tools the end-to-end tests drive (installed only when missing, only as root).
system-tools:
	@missing=""; for pair in $(APT_TOOLS) $(APT_IMAP_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	for f in $(APT_EXTRA_FILES); do [ -e $$f ] || missing="$$missing python3-gi"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system tools:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing $(APT_EXTRA) >/dev/null; \
	  else echo "warning: missing system tools ($$missing); run as root or install them"; fi; \
	fi

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,plot]' --config-settings editable_mode=compat
	touch $(STAMP)

# make run SMARTHOST=host:port sends the demo's outbound mail through that relay.
run: install
	$(BIN)/yimaporc local-cluster $(if $(SMARTHOST),--smarthost $(SMARTHOST),)

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy src/yimaporc
	PYTHONPATH=src $(BIN)/lint-imports

# The unit tier and the integration tier (in order) side by side, one per core.
test: install lint
	$(BIN)/python tests/run_tiers.py -q $(PYTEST_ARGS)

# Tests marked slow: the long matrices (every player x transport x medium)
# and the long simulator sweeps (hundreds of seeds); then every hypothesis test of
# the unit tier under the `fuzz` profile (1000 examples where a test sets no count).
test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -m hypothesis --ignore=tests/integration $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -q --ignore=tests/integration $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

# The long variants (marker `slow`), left out of `make test`.
bench: install
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,)

# Mutational fuzzing of every front door against real nodes (docs/fuzzing.md);
# reproducers land in fuzz-corpus/, the report in fuzz-report.json.
fuzz: install
	$(BIN)/python -m yimaporc.testing.fuzz --target $(FUZZ_TARGET) --inputs $(FUZZ_INPUTS) \
	  --seed $(FUZZ_SEED) --workers $(FUZZ_WORKERS) --corpus fuzz-corpus --json fuzz-report.json $(FUZZ_ARGS)

# Jepsen-style run (docs/chaos.md): 5 nodes in network namespaces, partitions, pauses,
# kills, clock skew, a rolling restart; needs root. The report lands in chaos-report.json.
chaos: install
	$(BIN)/python -m yimaporc.testing.chaos --schedule full --json chaos-report.json $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
