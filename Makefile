# Two commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 9501

.PHONY: run test lint venv clean bench host-deps

venv: $(VENV)/.installed

# Re-install whenever the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: venv
	$(BIN)/sandboxd serve --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .

# `sandboxd host` needs bubblewrap. As root on Debian it is installed here; anywhere
# else the sandbox tests skip with the reason printed.
host-deps:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; }; } \
	  || echo "bubblewrap is not installed: the sandbox tests (tests/test_host.py) will skip"

test: venv host-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Benchmarks against the limits and the real peers (never part of `make test`).
bench: venv
	sh bench/setup.sh $(BIN)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
