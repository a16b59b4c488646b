"""A vllm-ascend with its own FlashComm2 would act on this plugin's flags: detect it.

vllm-ascend v0.23.x and v0.24.0rc1 ship their own FlashComm2 (and v0.23.x its
layer sharding), switched on by the very names this project reads. Two
implementations would act on one flag, so :func:`check_no_builtin_flashcomm2`
stops start-up (in :func:`vllm_ascend_ext.register`, and in the Ascend image
build). Detection reads distribution metadata and scans vllm-ascend's source
files; it never imports vllm_ascend.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from vllm_ascend_ext.version_check import DEFAULT_ASCEND_LINE, release_tuple

__all__ = ["BuiltinFlashComm2", "ConflictingFlashComm2", "builtin_flashcomm2",
           "check_no_builtin_flashcomm2"]

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
