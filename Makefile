# NeuroSeed node — developer entry points. `make devnet` and `make test` are the README's two commands.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATADIR ?= .devnet

.PHONY: venv devnet test lint bench clean

$(BIN)/.installed: pyproject.toml
	@$(PY) -c "import sys; assert sys.version_info[:2] == (3, 11), \"Python 3.11 is required\""
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# py-libp2p needs fastecdsa 2.3.2, which has no wheel: it builds with gcc and GMP's headers
	@# (docs/adr/0003-libp2p-builds-fastecdsa.md). Install them where they are missing and we can.
	@if ! printf '#include <gmp.h>\n' | cc -E -x c - >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgmp-dev; \
	  else echo "GMP headers are missing: install libgmp-dev (Debian/Ubuntu) first"; exit 1; fi; \
	fi
	$(BIN)/pip install -q -e '.[dev,p2p,ml]'
	@# trio-typing (a py-libp2p dependency) ships stale stubs for trio that hide trio's own types
	@# from mypy; the runtime package stays, only the stub folders go.
	rm -rf $(VENV)/lib/python3.11/site-packages/trio-stubs \
	  $(VENV)/lib/python3.11/site-packages/outcome-stubs \
	  $(VENV)/lib/python3.11/site-packages/async_generator-stubs
	touch $@

venv: $(BIN)/.installed

devnet: venv
	$(BIN)/neuroseed devnet --datadir $(DATADIR)

test: venv
	CI_PROFILE=1 $(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check node rpc tests benchmarks
	$(BIN)/mypy node rpc

bench: venv
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DATADIR)
