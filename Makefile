# Every target installs what it needs, so a fresh Debian/Ubuntu machine needs nothing but `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian package : command it provides
TEST_DEBS := etcd-server:etcd etcd-client:etcdctl prometheus:promtool prometheus-alertmanager:amtool
# The releases `make test-all` runs every etcd test against: Debian's 3.4 and the lines pinned under
# tools/etcd/, which scripts/build-etcd builds with Go (docs/development.md).
ETCD_VERSIONS_ALL := 3.4,3.5,3.6

.PHONY: test test-all lint fmt venv debs etcd-builds clean demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

debs:
	scripts/ensure-debian-packages $(TEST_DEBS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv debs lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Builds only what is missing or stale (a progress line per build); a cold build takes about 2 minutes.
etcd-builds:
	scripts/build-etcd

test-all: venv debs lint etcd-builds
	ETCD_VERSIONS=$(ETCD_VERSIONS_ALL) $(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# KEEP=1 leaves the demo's etcd, service, Prometheus and Alertmanager running until Ctrl-C.
demo: venv debs
	KEEP="$(KEEP)" $(BIN)/python demo/run.py
