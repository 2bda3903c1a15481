# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loopcast demo

# ruff, then mypy on the installed package layout (tools/typecheck.py: mypy cannot follow the package-dir
# mapping, so it checks a symlink tree under .typecheck/), tests/, bench/ and tools/; config in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tools/typecheck.py

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile   # tests/conftest.py: files that share a fixture run on one worker

clean:
	rm -rf $(VENV) runs data engines .typecheck
