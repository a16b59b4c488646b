"""ADAPTER: load the upstream seed module so the benchmark can run it as a baseline.

The seed (``../shared/reference/shared_weight_layer.seed.txt``) is upstream
vllm-ascend's ``vllm_ascend/ops/shared_weight_layer.py`` at commit eac72f5f23
(PR #4188), saved from a web page.  The page dump lost every blank line and all
leading whitespace, so the text cannot be executed as it stands.  This adapter
changes nothing else and never edits the file; at run time it

1. skips the page header (commit title, PR text, "253 lines / 11 KiB / Python")
   up to the first ``import``/``from`` line,
2. puts each remaining line's indentation back from :data:`INDENT`, one
   character per line: a digit ``d`` means ``4*d`` spaces, ``c`` marks a
   continuation line inside open brackets (any indentation is legal there; it
   gets the previous line's plus 4).  The table was read off upstream's file
   at eac72f5f23.  Checked once against that file: the re-indented seed's AST
   is identical except for the blank lines missing inside the free-standing
   string literal above ``register_layer_to_shared_weight_series`` (a
   module-level no-op expression, not a docstring),
3. executes the result as module ``upstream_seed_shared_weight_layer``.

Every token executed is the seed's own (only leading spaces are added), so the
timed code paths -- ``reach_layer``, ``wait_weight``, the forward wrapper, the
broadcasts -- are exactly upstream's.  The seed's imports
(``GroupCoordinator``, ``LinearBase``, ``extract_layer_index``) all exist in
vLLM 0.32 and need no patching.

What the *benchmark* does around it (the same for our implementation, so not
an adapter change): the layers are vLLM ``ReplicatedLinear`` with
``_cpu_skip_gemm_dispatch = True``, vLLM CPU's own switch that keeps the
processed weight a plain tensor used through ``F.linear`` (otherwise vLLM CPU
packs it into a oneDNN handle and leaves ``layer.weight`` empty, which neither
design can broadcast).
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

MODULE_NAME = "upstream_seed_shared_weight_layer"
DEFAULT_SEED = Path(__file__).resolve().parents[2] / "shared" / "reference" / (
    "shared_weight_layer.seed.txt")

#: sha256 of the seed's code lines (after the page header), joined by "\n".
SEED_CODE_SHA256 = "c556d30ea53c26906e6e9bdb9fa581349ca93202292115a363b6011b316440bd"

#: Indentation per code line of the seed (see module docstring).
INDENT = (
    "0000000010011111211100111110011111111112112122322223322233333433ccc33334"
    "456665444534456777644522122c222222322c222233331222c222330011110007122210"
    "00000000000111100111101123333333332111123333321111221112210110110111"
)


class SeedError(RuntimeError):
    """The seed file is not the one this adapter's table was made for."""


def seed_code_lines(path: Path) -> list[str]:
    lines = Path(path).read_text().split("\n")
    for i, line in enumerate(lines):
        if line.startswith(("import ", "from ")):
            return lines[i:]
    raise SeedError(f"{path}: no import line found")


def reindented_source(path: Path = DEFAULT_SEED) -> str:
    code = seed_code_lines(path)
    digest = hashlib.sha256("\n".join(code).encode()).hexdigest()
    if digest != SEED_CODE_SHA256 or len(code) != len(INDENT):
        raise SeedError(
            f"{path}: code lines changed (sha256 {digest}, {len(code)} lines); the "
            f"indentation table fits sha256 {SEED_CODE_SHA256}, {len(INDENT)} lines")
    out, prev = [], 0
    for line, mark in zip(code, INDENT):
        assert line == line.lstrip(), "the seed's lines are flush-left"
        width = prev + 4 if mark == "c" else 4 * int(mark)
        out.append(" " * width + line)
        prev = width
    return "\n".join(out) + "\n"


def load_seed(path: Path = DEFAULT_SEED) -> types.ModuleType:
    """Execute the (re-indented) seed as a fresh module and return it."""
    source = reindented_source(path)
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = str(path)
    sys.modules[MODULE_NAME] = module  # dataclasses look their module up here
    exec(compile(source, f"{path} (re-indented)", "exec"), module.__dict__)
    return module
