"""The vendored vllm-ascend source against what this project's Ascend code
depends on (drift guard), and against ``ASCEND_LINES`` (version check).

The drift guard reads the source (``ast``, formatting-independent) and checks
each name and pattern our code relies on, one test per dependency, so a newer
vendored commit fails naming the one that moved. The behaviour behind each is
exercised by the other tests of this leg; this says *which* assumption broke.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.ascend_real.bootstrap import VENDORED

PKG = VENDORED / "vllm_ascend"


def _tree(rel: str) -> ast.Module:
    return ast.parse((PKG / rel).read_text(), filename=rel)


#: Each dependency's source file and an edit that moves what it relies on.
MOVES = {
    "register_oot class-name keys": (
        "utils.py", '"RowParallelLinear": AscendRowParallelLinear',
        '"RowParallelLinearBase": AscendRowParallelLinear'),
    "AscendMLAImpl's o_proj kwarg and call": (
        "attention/mla_v1.py", 'self.o_proj = kwargs["o_proj"]',
        'self.o_proj = kwargs["out_proj"]'),
    "MLA wrapper passes o_proj to MLAAttention": (
        "ops/mla.py", "o_proj=mla_modules.o_proj,", "out_proj=mla_modules.o_proj,"),
    "W8A8-static int8-input skip and rank-0 quant_bias": (
        "quantization/methods/w8a8_static.py", "if x.dtype != torch.int8:", "if True:"),
    "method_adapters rank read": (
        "quantization/method_adapters.py", "tp_rank = get_tensor_model_parallel_rank()",
        "tp_rank = get_otp_group().rank_in_group"),
    "unquantized method and NPUPlatform device type": (
        "platform.py", 'device_type: str = "npu"', 'device_type: str = "ascend"'),
}


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def _method(cls: ast.ClassDef, name: str) -> str:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.unparse(node)
    raise AssertionError(f"{cls.name}.{name} not found")


def _has(code: str, *patterns: str) -> bool:
    missing = [p for p in patterns if not re.search(p, code)]
    assert not missing, f"not found: {missing}"
    return True


# --------------------------------------------------------------------------
# what our code depends on
# --------------------------------------------------------------------------


def _register_oot_keys() -> bool:
    """``CustomOp.register_oot`` swaps vLLM's layers by these class names: our
    o_proj subclasses ``RowParallelLinear`` under another name (built as
    itself), and the MLA wrapper that hands the impl its o_proj is the one
    registered for vLLM's ``MultiHeadLatentAttentionWrapper``."""
    tree = _tree("utils.py")
    ops: dict[str, str] = {}
    for node in ast.walk(tree):  # every `REGISTERED_ASCEND_OPS = {...}` literal
        if (isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "REGISTERED_ASCEND_OPS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            ops.update({ast.literal_eval(k): ast.unparse(v)
                        for k, v in zip(node.value.keys, node.value.values)})
    assert ops.get("RowParallelLinear") == "AscendRowParallelLinear", ops
    assert ops.get("MultiHeadLatentAttentionWrapper") == "AscendMultiHeadLatentAttention", ops
    return _has(ast.unparse(tree), r"CustomOp\.register_oot\(_decorated_op_cls=op_cls, name=name\)")


def _mla_impl_o_proj_kwarg() -> bool:
    """``AscendMLAImpl`` keeps ``kwargs["o_proj"]`` as ``self.o_proj``
    (``replace_module`` rewires ``impl.o_proj``) and calls it with
    ``is_prefill=`` (our forward takes extra keywords)."""
    impl = _class(_tree("attention/mla_v1.py"), "AscendMLAImpl")
    _has(_method(impl, "__init__"), r"self\.o_proj = kwargs\['o_proj'\]")
    return _has(_method(impl, "forward"), r"self\.o_proj\(o_proj_input, is_prefill=")


def _mla_wrapper_passes_o_proj() -> bool:
    """vllm-ascend's MLA wrapper hands the model's o_proj to vLLM's MLAAttention."""
    wrapper = _class(_tree("ops/mla.py"), "AscendMultiHeadLatentAttention")
    return _has(_method(wrapper, "__init__"), r"MLAAttention\(", r"o_proj=mla_modules\.o_proj")


def _w8a8_static_int8_skip() -> bool:
    """W8A8-static quantizes with vllm-ascend's op only when the input is not
    int8 yet (our int8 all-to-all sends it int8), with the per-channel
    vectors our route slices, and adds ``quant_bias`` on ``tp_rank == 0``."""
    from vllm_ascend_ext.ops.int8_all_to_all import ASCEND_W8A8_STATIC_SCHEME

    scheme = _class(_tree("quantization/methods/w8a8_static.py"), ASCEND_W8A8_STATIC_SCHEME)
    _has(_method(scheme, "apply"),
         r"if x\.dtype != torch\.int8:\s+x = torch\.ops\.vllm\.quantize\(x, "
         r"layer\.aclnn_input_scale, layer\.aclnn_input_scale_reciprocal, "
         r"layer\.aclnn_input_offset\)",
         r"quant_bias = layer\.quant_bias if tp_rank == 0 else None")
    return _has(_method(scheme, "process_weights_after_loading"),
                r"layer\.aclnn_input_scale = .*repeat\(expanding_factor\)",
                r"expanding_factor = layer\.weight\.data\.shape\[1\]")


def _method_adapters_rank_read() -> bool:
    """``AscendLinearMethod`` keeps its scheme as ``quant_method`` and, for any
    ``RowParallelLinear``, passes the *global* TP rank to ``scheme.apply``:
    ``ops/quant_terms.py`` calls the scheme itself with the FlashComm2 rank."""
    from vllm_ascend_ext.ops.quant_terms import ASCEND_LINEAR_METHOD

    wrapper = _class(_tree("quantization/method_adapters.py"), ASCEND_LINEAR_METHOD)
    _has(_method(wrapper, "__init__"), r"self\.quant_method = scheme")
    return _has(_method(wrapper, "apply"),
                r"if isinstance\(layer, RowParallelLinear\):",
                r"tp_rank = get_tensor_model_parallel_rank\(\)",
                r"return self\.quant_method\.apply\(layer, x, bias, tp_rank\)")


def _unquantized_method_and_platform() -> bool:
    """``ops/ascend_linear.py`` imports ``AscendUnquantizedLinearMethod`` (what
    vllm-ascend's own linear layers get without a quant config) when
    ``current_platform.device_type`` is ``NPUPlatform``'s."""
    from vllm_ascend_ext.ops.ascend_linear import ASCEND_DEVICE_TYPE

    _has(ast.unparse(_class(_tree("ops/linear.py"), "AscendLinearBase")),
         r"if quant_config is None:\s+self\.quant_method: .* = AscendUnquantizedLinearMethod\(\)")
    platform = _class(_tree("platform.py"), "NPUPlatform")
    return _has(ast.unparse(platform), rf"device_type: str = '{ASCEND_DEVICE_TYPE}'")


@dataclass(frozen=True)
class Dependency:
    name: str
    check: Callable[[], bool]


DEPENDENCIES = (
    Dependency("register_oot class-name keys", _register_oot_keys),
    Dependency("AscendMLAImpl's o_proj kwarg and call", _mla_impl_o_proj_kwarg),
    Dependency("MLA wrapper passes o_proj to MLAAttention", _mla_wrapper_passes_o_proj),
    Dependency("W8A8-static int8-input skip and rank-0 quant_bias", _w8a8_static_int8_skip),
    Dependency("method_adapters rank read", _method_adapters_rank_read),
    Dependency("unquantized method and NPUPlatform device type", _unquantized_method_and_platform),
)


@pytest.mark.parametrize("dep", DEPENDENCIES, ids=[d.name for d in DEPENDENCIES])
def test_vendored_vllm_ascend_still_has(dep):
    try:
        assert dep.check()
    except AssertionError as e:
        pytest.fail(f"vllm-ascend at {VENDORED.name} moved: {dep.name}: {e}", pytrace=False)


@pytest.mark.parametrize("dep", DEPENDENCIES, ids=[d.name for d in DEPENDENCIES])
def test_the_guard_fails_when_its_dependency_moves(dep, tmp_path, monkeypatch):
    """Each check on a copy of the vendored files with that one dependency
    edited away (the guard can fail, and fails on the right check)."""
    import shutil
    import sys

    files = {rel for rel, _, _ in MOVES.values()} | {"ops/linear.py"}
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PKG / rel, tmp_path / rel)
    rel, old, new = MOVES[dep.name]
    text = (tmp_path / rel).read_text()
    assert text.count(old) == 1, (rel, old)
    (tmp_path / rel).write_text(text.replace(old, new))
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    with pytest.raises(AssertionError):
        dep.check()
    for other in DEPENDENCIES:
        if other is not dep and MOVES[other.name][0] != rel:
            assert other.check(), other.name


def test_vendored_main_has_no_flashcomm2_of_its_own():
    """Our plugin's refusal reads the vendored package's files (the leg's
    dist-info carries no release version) and lets main through."""
    from vllm_ascend_ext.builtin_flashcomm2 import _package_dir, _vllm_ascend_dist, builtin_flashcomm2

    dist = _vllm_ascend_dist(None)
    assert _package_dir(dist, None).resolve() == PKG.resolve()
    assert builtin_flashcomm2() is None


# --------------------------------------------------------------------------
# version check
# --------------------------------------------------------------------------


def test_ascend_lines_main_row_is_the_vendored_commit():
    """The folder name carries the commit (``vllm-ascend-<first 8 hex>``), and
    ``vendor/README.md`` beside it the full hash when it records one."""
    from vllm_ascend_ext.version_check import ASCEND_LINES

    vendor = VENDORED.parent
    vendored = sorted(p.name for p in vendor.glob("vllm-ascend-*") if p.is_dir())
    assert vendored == [VENDORED.name], (
        f"{vendor} holds {vendored}; the leg imports {VENDORED.name} "
        "(tests/ascend_real/bootstrap.py VENDORED_DIR_NAME)")
    short = VENDORED.name.removeprefix("vllm-ascend-")
    main = next(line for line in ASCEND_LINES if line.name == "main")
    assert main.commit.startswith(short), (main.commit, VENDORED.name)
    readme = vendor / "README.md"
    if readme.is_file():
        full = set(re.findall(rf"\b{short}[0-9a-f]{{32}}\b", readme.read_text()))
        assert full <= {main.commit}, (full, main.commit)
    assert short in main.source  # the row's prose names the same commit
