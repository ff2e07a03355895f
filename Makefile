# Every target installs what it needs, so a fresh Debian/Ubuntu machine needs nothing but `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian package : command it provides
TEST_DEBS := etcd-server:etcd etcd-client:etcdctl prometheus:promtool prometheus-alertmanager:amtool

.PHONY: test test-all lint fmt venv debs clean demo dist docs

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

# `slow` tests build and install the release artifacts (about a minute); test-all runs them too.
test: venv debs lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv debs lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The wheel and sdist a release publishes (.github/workflows/release.yml), checked as PyPI would.
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# KEEP=1 leaves the demo's etcd, service, Prometheus and Alertmanager running until Ctrl-C.
demo: venv debs
	KEEP="$(KEEP)" $(BIN)/python demo/run.py

# Rewrite the reference docs generated from the code (tests/test_docs.py fails while they are stale).
docs: venv debs
	REGENERATE_DOCS=1 $(BIN)/pytest -q tests/test_docs.py
