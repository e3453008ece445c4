# Set-up and the everyday commands. Every target builds .venv from pyproject.toml when needed,
# so a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
.PHONY: venv lint test demo clean-demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) is pinned by the test extra; installing it first keeps pip from
	# resolving a multi-GB CUDA build.
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	# --no-compile: bytecode is written on first import, for the modules used, not for all of them.
	$(PY) -m pip install -q --no-compile -e ".[test,plots]"
	touch $@

venv: $(VENV)/.installed

# The main job on the bundled tiny default: write the demo task's data, train its tokenizer, then
# SFT -> gate -> DPO -> eval base/SFT/DPO -> report -> HF export (configs/demo.yaml). Re-running
# skips finished stages; `make clean-demo` starts over.
DEMO := runs/demo
demo: $(VENV)/.installed
	$(PY) tools/make_demo_data.py --out $(DEMO)/data --n-sft 8000 --n-pref 3000 --n-eval 256
	$(PY) tools/train_tokenizer.py --input $(DEMO)/data/sft.jsonl --input $(DEMO)/data/preference.jsonl \
		--vocab-size 400 --out $(DEMO)/tokenizer
	$(VENV)/bin/jaxalign pipeline --config configs/demo.yaml

clean-demo:
	rm -rf $(DEMO)

# Undefined and unused names, syntax errors ([tool.ruff] in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check jaxalign tests tools benchmarks

# The suite's environment (8 virtual CPU devices, XLA's thread pools, one compilation cache) is set
# in tests/conftest.py, so a bare `pytest` runs the same way. Two workers, one test file each at a
# time (module fixtures are built once), the longest files first (tests/conftest.py orders them;
# --no-loadscope-reorder keeps xdist from putting the files with the most tests first instead).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests

# The training-step benchmarks (benchmarks/run.py --help): jaxalign SFT and DPO steps beside PyTorch's,
# MFU against the matmul peak measured in the same run, compile time vs depth, data loading; ~15 min on
# 2 CPU cores. Each measurement waits for a quiet machine; the table is appended to benchmarks/RESULTS.md.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --wait-quiet 0.15 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
