# lora_ref: two commands on a fresh machine with only python3 and make.
#   make tour   the main job (pretrains or reuses the tutorial model, writes runs/tour/)
#   make test   every test, interop included
# Both create or refresh .venv from pyproject.toml when it changed.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

# bitsandbytes on CPU: odd last dimensions otherwise trigger torch.compile.
export TORCHDYNAMO_DISABLE := 1

# QUICK=1 (make book QUICK=1, make tour QUICK=1): every chapter's small configuration (lora_ref/quick.py).
ifdef QUICK
export LORA_REF_QUICK := $(QUICK)
endif

.PHONY: venv test tour book warm-cache lab bench bench-readme bench-compare clean-book

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing lora_ref and its extras into $(VENV) (pip; the CPU torch wheel comes from local disk)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,interop]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

tour: $(STAMP)
	$(BIN)/lora-ref tour $(ARGS)

bench: $(STAMP)
	$(BIN)/lora-ref bench $(ARGS)

# The book: executes every chapter, builds book/_build/html, then checks every page in headless Chromium
# (installs Debian's chromium when missing and run as root). QUICK=1: the chapters' small configurations.
book: $(STAMP)
	$(BIN)/python book/build.py

# Every cached run the chapters use (runs the chapters, with a progress bar); QUICK=1: the small configurations.
warm-cache: $(STAMP)
	$(BIN)/python book/warm_cache.py $(ARGS)

clean-book:
	rm -rf book/_build

lab: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[notebooks]'
	$(BIN)/jupyter lab notebooks/

# Re-measure every benchmark and rewrite the README's performance table from the JSON (run on a quiet machine).
bench-readme: $(STAMP)
	@mkdir -p runs
	$(BIN)/lora-ref bench --json > runs/bench.json
	$(BIN)/python -m lora_ref.bench.report runs/bench.json README.md

# A --quick run compared row by row with the full run of bench-readme (runs/bench.json): exits 1 and names the rows
# whose ratios differ by more than 10 %.
bench-compare: $(STAMP)
	@mkdir -p runs
	$(BIN)/lora-ref bench --quick --json > runs/bench-quick.json
	$(BIN)/python -m lora_ref.bench.report --compare runs/bench-quick.json runs/bench.json
