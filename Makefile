# Set-up and the everyday commands. Every target builds .venv from pyproject.toml when needed,
# so a fresh machine needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# 8 virtual CPU devices so every sharding path runs on a laptop or CI box.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (CPU) is pinned by the test extra; installing it first keeps pip from
	# resolving a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plots]"
	touch $@

venv: $(VENV)/.installed

# The main job on the bundled tiny default: SFT on Anthropic HH-RLHF's chosen transcripts with
# the Llama 2 tokenizer and a tiny model (the full SFT -> DPO -> report pipeline replaces it).
demo: $(VENV)/.installed
	$(VENV)/bin/jaxalign train --config configs/hh_tiny.yaml --overwrite --set train.max_steps=100

test: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
