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
	$(BIN)/pip install -q -e '.[dev]'
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
