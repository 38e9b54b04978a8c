# meta-cni: `make demo` and `make test` set up everything they need on a fresh Debian 12 machine (as root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench provision-demo provision clean

provision-demo:
	@bash tests/infra/provision.sh --demo

provision:
	@bash tests/infra/provision.sh

# The virtualenv is rebuilt when pyproject.toml changes; pip's own cache makes that quick.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
	@touch $@

demo: provision-demo
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/metactl demo

test: provision
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: provision
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/python tests/bench/bench_pod.py
	$(BIN)/python tests/bench/bench_delegates.py
	$(BIN)/python tests/bench/bench_daemon.py
	$(BIN)/python tests/bench/bench_ipam.py

clean:
	rm -rf $(VENV) build *.egg-info
