# vllm-ascend-ext on Ascend NPU: FlashComm2 o_proj + o_shared for vLLM 0.32.
#
# Base: a vllm-ascend *release image*, not the bare CANN image.  A release
# image carries CANN, NNAL, torch, torch_npu, vLLM and vllm-ascend that were
# validated together; rebuilding that stack from the CANN image would make this
# project responsible for a compatibility matrix it cannot test.  This image
# only adds a pure-Python plugin and one patch set on top.
#
# BASE_IMAGE (placeholder default): this project needs the vllm-ascend release
# line for vLLM 0.32.0.  On 2026-11-28 no such release could be confirmed (the
# newest confirmed line is v0.30.0; FlashComm2 itself left upstream after
# v0.23.0), so the default tag below is the expected name, not a verified
# one.  Pick the image for your hardware (e.g. the -a3 variant) with
#   docker build --build-arg BASE_IMAGE=quay.io/ascend/vllm-ascend:<tag> .
# Whatever the tag, the version check below is the gate: the build fails
# unless vLLM, vllm-ascend and torch_npu are the versions pinned in
# vllm_ascend_ext/version_check.py.
#
# FlashComm2 / o_shared stay off by default: this file sets none of their
# environment variables; pass them to `docker run` (see docs/user_guide.md).
ARG BASE_IMAGE=quay.io/ascend/vllm-ascend:v0.32.0
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

LABEL org.opencontainers.image.title="vllm-ascend-ext" \
      org.opencontainers.image.description="FlashComm2 o_proj + o_shared weight sharing for vLLM 0.32 on Ascend" \
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

# 3. The patch set, applied where the vllm package actually lives (release
#    images install vLLM from source, editable, outside site-packages).
RUN VLLM_SITE="$(python3 -c 'import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec("vllm").origin)))')" && \
    python3 patches/apply.py apply --site "$VLLM_SITE" && \
    python3 patches/apply.py check --site "$VLLM_SITE"
