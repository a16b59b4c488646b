#!/usr/bin/env bash
# Prints the cache key of the CPU venv: a hash of everything that shapes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
{
    python3 --version
    cat requirements/cpu.txt requirements/test.txt scripts/install_cpu.sh \
        scripts/vllm_dist_alias.py patches/apply.py setup.py
    cat patches/*.patch 2>/dev/null || true
} | sha256sum | cut -c1-16
