"""patches/: the set applies to the pinned vLLM, and each patch's bug is real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
APPLY = ROOT / "patches/apply.py"
sys.path.insert(0, str(ROOT / "patches"))
import apply  # noqa: E402

sys.path.pop(0)


def _installed_release() -> str:
    import vllm

    return apply._release(vllm.__version__)


def needs_patch(name: str):
    """Run a patch's own test only where the installer applies that patch."""
    target = apply.declaration(ROOT / "patches" / name)
    rel = _installed_release()
    return pytest.mark.skipif(
        not target.covers(rel, "cpu"),
        reason=f"{name} is declared for vLLM {','.join(target.vllm)} on "
               f"{','.join(target.platforms)}, not for the installed vLLM {rel}")


def test_patch_set_is_applied_to_the_installed_vllm():
    out = subprocess.run([sys.executable, str(APPLY), "check", "--platform", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rel = _installed_release()
    assert f"vLLM {rel} on cpu" in out.stdout
    for patch in apply.patch_files():
        want = "applied" if apply.declaration(patch).covers(rel, "cpu") else "not for this stack"
        assert f"{patch.name}: {want}" in out.stdout, out.stdout


def test_every_patch_declares_its_vllm_and_platform():
    for patch in apply.patch_files():
        target = apply.declaration(patch)  # raises when missing or malformed
        assert target.vllm and target.platforms


def test_the_ascend_image_gets_no_cpu_only_patch():
    """The Dockerfile applies with --platform ascend; no patch of today's set
    is for Ascend, whatever vLLM the image carries."""
    for rel in ("0.25.1", "0.26.0", "0.27.1", "0.32.0"):
        assert apply.patches_for(rel, "ascend") == []
    assert [p.name for p in apply.patches_for("0.32.0", "cpu")] == [
        p.name for p in apply.patch_files()]
    assert apply.patches_for("0.27.1", "cpu") == []


def test_a_patch_without_declaration_is_an_error(tmp_path, monkeypatch):
    bad = tmp_path / "9998-undeclared.patch"
    bad.write_text((ROOT / "patches/0001-cpu-rope-3d-query.patch").read_text().split("\n", 2)[2])
    with pytest.raises(apply.PatchDeclarationError, match="9998-undeclared.patch: no"):
        apply.declaration(bad)
    odd = tmp_path / "9997-odd.patch"
    odd.write_text("vllm-ascend-ext patch: vllm=0.32 platform=cuda\n--- a/x\n")
    with pytest.raises(apply.PatchDeclarationError, match="X.Y.Z"):
        apply.declaration(odd)


def test_the_vllm_version_is_read_from_the_site(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm/_version.py").write_text("__version__ = version = '0.26.0+empty'\n")
    assert apply.installed_vllm_release(tmp_path) == "0.26.0"
    out = subprocess.run([sys.executable, str(APPLY), "apply", "--platform", "cpu",
                          "--site", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("not for this stack") == len(apply.patch_files())


def test_every_patch_has_a_readme_row():
    readme = (ROOT / "patches/README.md").read_text()
    for patch in sorted((ROOT / "patches").glob("*.patch")):
        assert patch.name in readme, f"{patch.name} has no row in patches/README.md"


def test_apply_reports_conflict_on_a_foreign_tree(tmp_path):
    target = tmp_path / "vllm/model_executor/layers/rotary_embedding"
    target.mkdir(parents=True)
    (target / "base.py").write_text("# not vLLM 0.32's file\n")
    out = subprocess.run([sys.executable, str(APPLY), "apply", "--platform", "cpu",
                          "--vllm-version", "0.32.0", "--site", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "does not apply" in out.stderr


def test_apply_rejects_an_empty_patch(tmp_path):
    """An empty file reverse-applies cleanly in GNU patch; it must not pass as applied."""
    empty = tmp_path / "9999-empty.patch"
    empty.write_text("")
    (tmp_path / "vllm").mkdir()
    assert apply.state(tmp_path, empty) == "empty"
    assert apply.state(tmp_path, ROOT / "patches/0001-cpu-rope-3d-query.patch") == "conflict"


# --- 0001: CPU rotary embedding on a 3-D query -------------------------------

@pytest.fixture
def rope():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        yield get_rope(64, max_position=256, is_neox_style=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       dtype=torch.float32)


def _mla_like_inputs(T=5, H=4, D=64):
    g = torch.Generator().manual_seed(0)
    q_full = torch.randn(T, H, 32 + D, generator=g)
    q_pe = q_full[..., 32:]  # a strided 3-D view, exactly how MLA passes q_pe
    k_pe = torch.randn(T, 1, D, generator=g)
    return torch.arange(T), q_full, q_pe, k_pe


@needs_patch("0001-cpu-rope-3d-query.patch")
def test_cpu_rope_kernel_is_wrong_on_3d_query(rope):
    """The bug itself, in vLLM's C++ kernel: the reason patch 0001 exists.
    If this starts failing, vLLM fixed the kernel and 0001 can be dropped."""
    from vllm import _custom_ops as ops

    pos, _, q_pe, k_pe = _mla_like_inputs()
    ref_q, _ = rope.forward_native(pos, q_pe.clone(), k_pe.clone())
    q3 = q_pe.contiguous().clone()
    ops.rotary_embedding(pos, q3, k_pe.clone(), 64, rope.cos_sin_cache, False)
    assert (q3 - ref_q).abs().max() > 1e-2


@needs_patch("0001-cpu-rope-3d-query.patch")
def test_forward_cpu_matches_native_on_mla_q_pe(rope):
    """Fails without patch 0001 (error ~7.7 on this input), exact with it."""
    pos, q_full, q_pe, k_pe = _mla_like_inputs()
    ref_q, ref_k = rope.forward_native(pos, q_pe.clone(), k_pe.clone())
    q_nope_before = q_full[..., :32].clone()
    k = k_pe.clone()
    out_q, out_k = rope.forward_cpu(pos, q_pe, k)
    torch.testing.assert_close(out_q, ref_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=0, atol=1e-5)
    # In place, like the kernel: the caller's strided view holds the result,
    # and the neighbouring nope half is untouched.
    torch.testing.assert_close(q_full[..., 32:], ref_q, rtol=0, atol=1e-5)
    assert torch.equal(q_full[..., :32], q_nope_before)


# --- 0003: variable-size all-gather / reduce-scatter on CPU -------------------

# MoE dispatch/combine sizes at DP=2: uneven load, one idle replica, even.
GATHERV_SIZES = [[3, 1], [0, 2], [2, 2]]


def _gatherv_worker(rank, world_size):
    """One DP-style group over the world; the calls MoE dispatch/combine make."""
    from tests.dist_utils import make_group_coordinator

    group = make_group_coordinator([list(range(world_size))], "dp_gatherv_test")
    out = []
    try:
        for sizes in GATHERV_SIZES:
            n = sizes[rank]
            hidden = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * rank
            topk_ids = torch.full((n, 2), rank, dtype=torch.int64)
            gathered = group.all_gatherv([hidden, topk_ids], dim=0, sizes=sizes)
            single = group.all_gatherv(hidden, dim=0, sizes=sizes)
            # combine: every rank holds partial sums for all sum(sizes) tokens
            partial = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3) * (rank + 1)
            scattered = group.reduce_scatterv(partial, dim=0, sizes=sizes)
            out.append(([t.tolist() for t in gathered], single.tolist(), scattered.tolist()))
        return out
    finally:
        group.destroy()


@needs_patch("0003-cpu-moe-dp-gatherv.patch")
def test_cpu_communicator_gatherv_and_reduce_scatterv():
    """Fails without patch 0003 (NotImplementedError from the base communicator),
    which is why a MoE model at DP=2 on vLLM CPU died at its first request."""
    from tests.dist_utils import run_distributed

    out = run_distributed(_gatherv_worker, 2, timeout=600)
    for case, sizes in enumerate(GATHERV_SIZES):
        hidden = [torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * r
                  for r, n in enumerate(sizes)]
        ids = [torch.full((n, 2), r, dtype=torch.int64) for r, n in enumerate(sizes)]
        total = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3) * (1 + 2)
        starts = [0, sizes[0]]
        for rank in range(2):
            gathered, single, scattered = out[rank][case]
            assert gathered[0] == torch.cat(hidden).tolist(), sizes
            assert gathered[1] == torch.cat(ids).tolist(), sizes
            assert single == gathered[0], sizes
            assert scattered == total[starts[rank]:starts[rank] + sizes[rank]].tolist(), sizes
