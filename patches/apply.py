"""Apply or check this project's patch set against an installed vLLM.

Each ``NNNN-*.patch`` in this folder is a unified diff whose paths are relative
to site-packages (``a/vllm/...``).  The Docker images and the CPU install
script both run this tool, so one mechanism serves every platform.

    python patches/apply.py apply  [--site DIR] [--only PREFIX ...]
    python patches/apply.py check  [--site DIR]   # exit 1 unless all applied
    python patches/apply.py status [--site DIR]

``apply`` is idempotent: a patch that is already applied is left alone, and a
patch that applies neither forwards nor in reverse is an error naming it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent


def patch_files(only: list[str] | None = None) -> list[Path]:
    files = sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if only:
        files = [f for f in files if any(f.name.startswith(o) for o in only)]
    return files


def _patch(site: Path, patch: Path, *extra: str) -> bool:
    cmd = ["patch", "-p1", "--batch", "--silent", "-d", str(site), *extra]
    with patch.open("rb") as fh:
        return subprocess.run(cmd, stdin=fh, capture_output=True).returncode == 0


def state(site: Path, patch: Path) -> str:
    """'applied', 'pending', 'conflict' or 'empty'."""
    # GNU patch "reverse-applies" a file with no hunks, which would make an
    # empty (e.g. badly generated) patch look applied.
    if b"\n@@ " not in b"\n" + patch.read_bytes():
        return "empty"
    if _patch(site, patch, "--dry-run", "--reverse", "--force"):
        return "applied"
    if _patch(site, patch, "--dry-run", "--forward"):
        return "pending"
    return "conflict"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["apply", "check", "status"])
    ap.add_argument("--site", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--only", nargs="*", help="patch name prefixes")
    args = ap.parse_args(argv)

    if not (args.site / "vllm").is_dir():
        print(f"error: no vllm package under --site {args.site}", file=sys.stderr)
        return 2
    failed = False
    for patch in patch_files(args.only):
        st = state(args.site, patch)
        if args.command == "apply" and st == "pending":
            if not _patch(args.site, patch, "--forward"):
                print(f"error: {patch.name} failed to apply to {args.site}", file=sys.stderr)
                return 1
            st = "applied (now)"
        print(f"{patch.name}: {st}")
        if st == "conflict":
            print(
                f"error: {patch.name} does not apply to the vLLM under {args.site}; "
                "is it the pinned version (see setup.py SUPPORTED_VLLM)?",
                file=sys.stderr,
            )
            failed = True
        elif st == "empty":
            print(f"error: {patch.name} has no hunks", file=sys.stderr)
            failed = True
        elif st == "pending" and args.command == "check":
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
