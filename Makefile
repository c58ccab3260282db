# Two entry points for a new machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs: cytoedge and, from
# demo/, cytoedge-demo (again only when a pyproject.toml changes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml demo/pyproject.toml | sha256sum | cut -c1-12)
export QT_QPA_PLATFORM ?= offscreen

.PHONY: demo test testdata lint venv clean wheelhouse offline-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python pyproject.toml demo/pyproject.toml
	bash packaging/system-deps.sh
	$(BIN)/pip install -q -e '.[export,gui,dev]' -e ./demo
	# The tritonserver binary for tests/test_triton_backend.py; without its dependencies,
	# which would pin numpy below 2 (only the server's files are used, docs/triton.md).
	$(BIN)/pip install -q --no-deps 'nvidia-pytriton==0.7.0'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cytoedge demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Real good and broken slides from openslide-python's tests (LGPL: fetched, not committed).
testdata: $(STAMP)
	$(BIN)/python -m tests.fixtures.openslide_files

test: lint testdata
	$(BIN)/python -m pytest -q --durations=25

# Every wheel a site needs for ROLE (cpu, gui, gpu, model-owner), with install.sh and a
# manifest, in dist/wheelhouse-ROLE/ (docs/install.md). Needs PyPI, not the full dev setup.
ROLE ?= cpu
wheelhouse: $(BIN)/python
	$(BIN)/python packaging/wheelhouse.py --role $(ROLE)

# The CPU site's offline install, proven: wheelhouse, install.sh twice, a scan scored.
offline-check: $(STAMP)
	bash .ci/offline-install

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .testdata build dist
