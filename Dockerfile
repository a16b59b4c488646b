# vllm-ascend-ext on Ascend NPU: FlashComm2 o_proj + o_shared on a vllm-ascend release image.
#
# Base: a vllm-ascend *release image*, not the bare CANN image.  A release
# image carries CANN, NNAL, torch, torch_npu, vLLM and vllm-ascend that were
# validated together; rebuilding that stack from the CANN image would make this
# project responsible for a compatibility matrix it cannot test.  This image
# only adds a pure-Python plugin on top (and the patches declared for Ascend:
# none today; the CPU-only ones are never applied here).
#
# BASE_IMAGE default: vllm-ascend v0.25.1rc1 (vLLM 0.25.1, torch 2.10.0,
# torch_npu 2.10.0.post2, CANN 9.0.1), the first line without vllm-ascend's own
# FlashComm2, inside the plugin's vLLM range.  Tag scheme and variants
# (-openeuler, -a3, -a3-openeuler, -310p, -310p-openeuler) as vllm-ascend
# documents them; pick yours with
#   docker build --build-arg BASE_IMAGE=quay.io/ascend/vllm-ascend:v0.25.1rc1-a3 .
# The build gate below refuses any base whose vLLM / vllm-ascend / torch /
# torch_npu is not a row of ASCEND_LINES in vllm_ascend_ext/version_check.py
# (v0.25.1rc1, releases/v0.26.0rc, main), and any vllm-ascend that still has
# its own FlashComm2 (v0.23.x, v0.24.0rc1).
#
# FlashComm2 / o_shared stay off by default: this file sets none of their
# environment variables; pass them to `docker run` (see docs/user_guide.md).
ARG BASE_IMAGE=quay.io/ascend/vllm-ascend:v0.25.1rc1
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="vllm-ascend-ext" \
      org.opencontainers.image.description="FlashComm2 o_proj + o_shared weight sharing for vLLM on Ascend" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# patches/apply.py drives GNU patch; Ubuntu and openEuler bases may lack it.
RUN if ! command -v patch >/dev/null 2>&1; then \
        if command -v apt-get >/dev/null 2>&1; then \
            apt-get update -y && apt-get install -y --no-install-recommends patch && \
            rm -rf /var/lib/apt/lists/*; \
        else \
            yum install -y patch && yum clean all; \
        fi; \
    fi

WORKDIR /workspace/vllm-ascend-ext
# Only what the install needs (keeps a local .venv out of the image).
COPY setup.py pyproject.toml ./
COPY requirements/ requirements/
COPY patches/ patches/
COPY scripts/ scripts/
COPY vllm_ascend_ext/ vllm_ascend_ext/

# 1. Gate first: refuse a base image whose stack this project does not support.
RUN python3 scripts/check_stack_versions.py --platform ascend

# 2. The plugin itself; torch_npu, vLLM and vllm-ascend come from the base image.
RUN python3 -m pip install --no-deps --no-build-isolation --no-cache-dir . && \
    python3 -c "import importlib.metadata as m; \
assert 'vllm_ascend_ext' in {e.name for e in m.entry_points(group='vllm.general_plugins')}, \
'vllm_ascend_ext plugin entry point missing'"

# 3. The patches declared for this vLLM on Ascend, applied where the vllm
#    package actually lives (release images install vLLM from source,
#    editable, outside site-packages).  CPU-only patches are skipped by
#    their declaration.
RUN VLLM_SITE="$(python3 -c 'import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec("vllm").origin)))')" && \
    VLLM_VERSION="$(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))')" && \
    python3 patches/apply.py apply --platform ascend --site "$VLLM_SITE" --vllm-version "$VLLM_VERSION" && \
    python3 patches/apply.py check --platform ascend --site "$VLLM_SITE" --vllm-version "$VLLM_VERSION"
