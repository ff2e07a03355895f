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

.PHONY: test test-all test-kube lint fmt venv debs etcd-builds kube-builds clean demo dist docs

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
	$(BIN)/lint-imports --no-cache

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `slow` tests build and install the release artifacts (about a minute); test-all runs them too.
test: venv debs lint
	LOCK_OVERLAP_TRIALS=$${LOCK_OVERLAP_TRIALS:-3} $(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The wheel and sdist a release publishes (.github/workflows/release.yml), checked as PyPI would.
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# Builds only what is missing or stale (a progress line per build); a cold build takes about 2 minutes.
etcd-builds:
	scripts/build-etcd

# kube-apiserver and kube-controller-manager at the release tools/kubernetes pins, and helm at the
# release tools/helm pins for the chart tests (cached outside the tree; a cold build takes long, a
# warm one nothing: docs/kubernetes-tests.md, docs/helm.md).
kube-builds:
	scripts/build-kubernetes
	scripts/build-helm

# Everything: every etcd release, the real control plane, the slow release tests, and 20 trials of
# the NOSPACE lock proof per release.
test-all: venv debs lint etcd-builds kube-builds
	ETCD_VERSIONS=$(ETCD_VERSIONS_ALL) LOCK_OVERLAP_TRIALS=20 $(BIN)/pytest $(PYTEST_ARGS)

# The tests against a real kube-apiserver and kube-controller-manager (docs/kubernetes-tests.md):
# builds them first when missing or when tools/kubernetes pins another release (cached outside the tree).
test-kube: venv debs kube-builds
	$(BIN)/pytest -m kube $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# KEEP=1 leaves the demo's etcd, service, Prometheus and Alertmanager running until Ctrl-C.
demo: venv debs
	KEEP="$(KEEP)" $(BIN)/python demo/run.py

# Rewrite the reference docs generated from the code (tests/test_docs.py fails while they are stale).
docs: venv debs
	REGENERATE_DOCS=1 $(BIN)/pytest -q tests/test_docs.py
