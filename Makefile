# vllm-ascend-ext developer entry points (CPU stack).
#   make demo   - tiny DeepSeek-V3 served by `vllm serve` at TP=2, one completion
#   make test   - the whole suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= 0|1
export PYTHONUNBUFFERED = 1

.PHONY: venv demo test test-fast bench clean
venv:
	@scripts/install_cpu.sh $(VENV)

demo: venv
	$(PY) -m vllm_ascend_ext.demo

test: venv
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -ra -m "not e2e" tests

clean:
	rm -rf $(VENV) .pytest_cache
