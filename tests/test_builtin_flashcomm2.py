"""Never two FlashComm2s at once: a vllm-ascend that still ships its own
FlashComm2 / layer sharding (v0.23.x, v0.24.0rc1) stops start-up.

The installs are real package metadata (a ``dist-info`` with a METADATA file)
and, for a source build between releases, real package files, in a temporary
site directory; the check reads them exactly as it reads an installed
vllm-ascend.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_ascend_ext import builtin_flashcomm2 as vc

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent


def _site(tmp_path: Path, version: str, files: dict[str, str] | None = None) -> Path:
    site = tmp_path / "site"
    info = site / f"vllm_ascend-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm_ascend\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    for rel, text in (files or {}).items():
        path = site / "vllm_ascend" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return site


@pytest.mark.parametrize("version,fc2,shard", [
    ("0.23.0", True, True),        # v0.23.0: FlashComm2 + layer sharding
    ("0.23.0.post1", True, True),
    ("0.24.0rc1", True, False),    # layer sharding left in #11953, FlashComm2 stayed
])
def test_release_with_builtin_flashcomm2_is_refused(tmp_path, version, fc2, shard):
    site = _site(tmp_path, version)
    found = vc.builtin_flashcomm2([str(site)])
    assert found == vc.BuiltinFlashComm2(version=version, flashcomm2=fc2, layer_sharding=shard)
    with pytest.raises(vc.ConflictingFlashComm2) as e:
        vc.check_no_builtin_flashcomm2([str(site)])
    msg = str(e.value)
    # both implementations, which one would run, and what to do
    assert f"vllm-ascend {version} has its own FlashComm2" in msg
    assert ("layer sharding" in msg) == shard
    assert "would switch on vllm-ascend's implementation, not this plugin's o_shared" in msg
    assert "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE" in msg
    assert "v0.25.1rc1 or later" in msg and "pip uninstall vllm-ascend-ext" in msg


@pytest.mark.parametrize("version", ["0.25.1rc1", "0.26.0", "0.27.1rc1.dev3+g182b75ea"])
def test_lines_without_it_pass(tmp_path, version):
    site = _site(tmp_path, version, {"envs.py": "VLLM_ASCEND_ENABLE_FLASHCOMM1 = 0\n",
                                     "ops/linear.py": ""})
    assert vc.builtin_flashcomm2([str(site)]) is None
    vc.check_no_builtin_flashcomm2([str(site)])


def test_a_source_build_is_judged_by_its_files(tmp_path):
    """A build from a commit between releases may carry any version string;
    its files tell whether FlashComm2 / layer sharding are still in it."""
    site = _site(tmp_path, "0.26.0rc1.dev12", {
        "envs.py": '"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": lambda: 0,\n',
        "ops/layer_shard_linear.py": "",
    })
    found = vc.builtin_flashcomm2([str(site)])
    assert found is not None and found.flashcomm2 and found.layer_sharding


def test_no_vllm_ascend_no_conflict(tmp_path):
    (tmp_path / "empty").mkdir()
    assert vc.builtin_flashcomm2([str(tmp_path / "empty")]) is None


def test_the_plugin_refuses_to_load_next_to_it(tmp_path):
    """vLLM's own plugin loader, in a fresh process that sees the v0.23.0
    metadata on its path: start-up fails with the conflict, before the vLLM
    version check (v0.23 images carry vLLM 0.23, out of range too)."""
    from tests.dist_utils import load_vllm_plugins_in_fresh_process

    site = _site(tmp_path, "0.23.0")
    out = load_vllm_plugins_in_fresh_process(f"import sys\nsys.path.insert(0, {str(site)!r})")
    assert out.returncode != 0
    assert "ConflictingFlashComm2" in out.stderr
    assert "vllm-ascend 0.23.0 has its own FlashComm2 and layer sharding" in out.stderr
