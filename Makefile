# Every target installs what it needs, so a fresh Debian/Ubuntu machine needs nothing but `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian package : command it provides
TEST_DEBS := etcd-server:etcd etcd-client:etcdctl prometheus:promtool prometheus-alertmanager:amtool

.PHONY: test test-kube lint fmt venv debs clean demo

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

# The tests against a real kube-apiserver and kube-controller-manager (docs/kubernetes-tests.md):
# builds them first when missing or when tools/kubernetes pins another release (cached outside the tree).
test-kube: venv debs
	scripts/build-kubernetes
	$(BIN)/pytest -m kube $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# KEEP=1 leaves the demo's etcd, service, Prometheus and Alertmanager running until Ctrl-C.
demo: venv debs
	KEEP="$(KEEP)" $(BIN)/python demo/run.py
