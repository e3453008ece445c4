# Set-up and the everyday commands. Every target builds .venv from pyproject.toml when needed,
# so a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# 8 virtual CPU devices so every sharding path runs on a laptop or CI box. XLA's CPU runtime can
# deadlock collectives of virtual devices; which scheduler avoids it differs by workload, so the
# pipeline tests run in their own process with the concurrency-optimized scheduler off (the
# in-process DPO loop deadlocks with it off, the pipeline's eval with it on).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
PIPELINE_TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false" \
	JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1

.PHONY: venv lint test demo clean-demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) is pinned by the test extra; installing it first keeps pip from
	# resolving a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plots]"
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

test: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m pytest -q --durations=15 tests --ignore=tests/test_pipeline.py
	$(PIPELINE_TEST_ENV) $(PY) -m pytest -q --durations=8 tests/test_pipeline.py

# The training-step benchmarks (benchmarks/run.py --help): jaxalign SFT and DPO steps beside PyTorch's,
# MFU against the matmul peak measured in the same run, compile time vs depth, data loading; ~15 min on
# 2 CPU cores. Each measurement waits for a quiet machine; the table is appended to benchmarks/RESULTS.md.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --wait-quiet 0.15 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
