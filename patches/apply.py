"""Apply or check this project's patch set against an installed vLLM.

Each ``NNNN-*.patch`` in this folder is a unified diff whose paths are relative
to site-packages (``a/vllm/...``), preceded by one declaration line that GNU
patch ignores::

    vllm-ascend-ext patch: vllm=0.32.0 platform=cpu

``vllm`` lists the vLLM releases (X.Y.Z, comma-separated) the patch is written
and tested for; ``platform`` lists the platforms (``cpu``, ``ascend``) whose
vLLM has the bug. A patch is *for* an install when both match; every other
patch is reported as ``not for this stack`` and left alone. The Docker images
and the CPU install script all run this tool, so one mechanism serves every
platform.

    python patches/apply.py apply  --platform cpu [--site DIR] [--vllm-version X.Y.Z]
    python patches/apply.py check  --platform cpu [--site DIR]   # exit 1 unless applied
    python patches/apply.py status --platform cpu [--site DIR]

``apply`` is idempotent: a patch that is already applied is left alone, and a
patch that applies neither forwards nor in reverse is an error naming it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent
PLATFORMS = ("cpu", "ascend")
_DECLARATION = re.compile(r"^vllm-ascend-ext patch:\s*(.*)$", re.M)


class PatchDeclarationError(ValueError):
    pass


@dataclass(frozen=True)
class PatchTarget:
    """What one patch declares it is for."""

    vllm: tuple[str, ...]
    platforms: tuple[str, ...]

    def covers(self, vllm_release: str, platform: str) -> bool:
        return vllm_release in self.vllm and platform in self.platforms


def declaration(patch: Path) -> PatchTarget:
    text = patch.read_text(errors="replace")
    first_hunk = text.find("\n--- ")
    m = _DECLARATION.search(text, 0, first_hunk if first_hunk >= 0 else len(text))
    if not m:
        raise PatchDeclarationError(
            f"{patch.name}: no 'vllm-ascend-ext patch: vllm=X.Y.Z platform=cpu' line "
            "before the diff")
    fields = dict(kv.split("=", 1) for kv in m[1].split() if "=" in kv)
    vllm = tuple(v for v in fields.get("vllm", "").split(",") if v)
    platforms = tuple(p for p in fields.get("platform", "").split(",") if p)
    bad = [v for v in vllm if not re.fullmatch(r"\d+\.\d+\.\d+", v)]
    if not vllm or bad:
        raise PatchDeclarationError(f"{patch.name}: vllm= must list X.Y.Z releases, got {vllm}")
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown:
        raise PatchDeclarationError(
            f"{patch.name}: platform= must list some of {PLATFORMS}, got {platforms}")
    return PatchTarget(vllm=vllm, platforms=platforms)


def patch_files(only: list[str] | None = None) -> list[Path]:
    files = sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if only:
        files = [f for f in files if any(f.name.startswith(o) for o in only)]
    return files


def patches_for(vllm_release: str, platform: str, only: list[str] | None = None) -> list[Path]:
    """The patches declared for this vLLM release on this platform."""
    return [p for p in patch_files(only) if declaration(p).covers(vllm_release, platform)]


def installed_vllm_release(site: Path) -> str:
    """X.Y.Z of the vLLM under ``site``: its generated ``_version.py`` (wheels
    and the editable source installs of vllm-ascend's images both have it),
    else the dist-info next to it."""
    version_py = site / "vllm" / "_version.py"
    if version_py.is_file():
        m = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)""",
                      version_py.read_text(), re.M)
        if m:
            return _release(m[1])
    for info in sorted(site.glob("vllm*.dist-info")):
        meta = info / "METADATA"
        if meta.is_file():
            m = re.search(r"^Version:\s*(\S+)", meta.read_text(errors="replace"), re.M)
            if m:
                return _release(m[1])
    raise PatchDeclarationError(
        f"cannot tell the vLLM version under {site}; pass --vllm-version X.Y.Z")


def _release(version: str) -> str:
    m = re.match(r"\d+\.\d+\.\d+", version)
    if not m:
        raise PatchDeclarationError(f"not a release version: {version!r}")
    return m[0]


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
    ap.add_argument("--platform", choices=PLATFORMS, required=True)
    ap.add_argument("--site", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--vllm-version", help="X.Y.Z (default: read from the vllm under --site)")
    ap.add_argument("--only", nargs="*", help="patch name prefixes")
    args = ap.parse_args(argv)

    if not (args.site / "vllm").is_dir():
        print(f"error: no vllm package under --site {args.site}", file=sys.stderr)
        return 2
    try:
        release = _release(args.vllm_version) if args.vllm_version else \
            installed_vllm_release(args.site)
        targets = {p: declaration(p) for p in patch_files(args.only)}
    except PatchDeclarationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"vLLM {release} on {args.platform} under {args.site}")
    failed = False
    for patch, target in targets.items():
        if not target.covers(release, args.platform):
            print(f"{patch.name}: not for this stack (declared vllm={','.join(target.vllm)} "
                  f"platform={','.join(target.platforms)})")
            continue
        st = state(args.site, patch)
        if args.command == "apply" and st == "pending":
            if not _patch(args.site, patch, "--forward"):
                print(f"error: {patch.name} failed to apply to {args.site}", file=sys.stderr)
                return 1
            st = "applied (now)"
        print(f"{patch.name}: {st}")
        if st == "conflict":
            print(
                f"error: {patch.name} is declared for vLLM {release} on {args.platform} but "
                f"does not apply to the vLLM under {args.site}",
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
