# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing,
# install the CPU build of torch first where no torch is present, then install inkwash.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out
DEMO_MINUTES ?= 5

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,serve]"
	touch $@

install: $(VENV)/.installed

# The browser tests drive Debian's chromium through playwright-python (never 'playwright install').
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

demo: install
	$(BIN)/inkwash demo --out $(DEMO_OUT) --minutes $(DEMO_MINUTES)
	@echo "see the results in a browser: $(BIN)/inkwash serve --checkpoint $(DEMO_OUT)/run"

test: install $(CHROMIUM)
	INKWASH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
