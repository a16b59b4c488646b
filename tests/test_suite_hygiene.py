"""The suite's own clean-up: it removes the vLLM shared-memory segments that
appeared during the run, and only those."""

from __future__ import annotations

import os
import uuid

import pytest

from tests import suite_hygiene
from tests.suite_hygiene import SHM, VLLM_SEGMENT_PREFIX, StartCounts

pytestmark = pytest.mark.vllm_independent


@pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")
def test_removes_only_the_segments_that_appeared_during_the_run():
    older = SHM / f"{VLLM_SEGMENT_PREFIX}{uuid.uuid4().hex}-tp:0-[0-1]-cpushm"
    older.write_bytes(b"x")
    newer = SHM / f"{VLLM_SEGMENT_PREFIX}{uuid.uuid4().hex}-tp:0-[0-1]-cpushm"
    busy = SHM / f"{VLLM_SEGMENT_PREFIX}{uuid.uuid4().hex}-tp:0-[0-1]-cpushm"
    other = SHM / f"not-vllm-{uuid.uuid4().hex}"
    try:
        before = suite_hygiene.snapshot()
        for path in (newer, busy, other):
            path.write_bytes(b"x")
        with open(busy, "rb"):  # another run's engine still holds it
            removed = suite_hygiene.remove_leftover_segments(before)
        assert removed == [newer] and not newer.exists()
        assert older.exists() and busy.exists() and other.exists()
    finally:
        for path in (older, newer, busy, other):
            path.unlink(missing_ok=True)


def test_only_a_run_that_started_segment_makers_removes_segments():
    """CI's unit lane starts no engine: it must not delete an init file that
    the engine lane's next engine made and its workers have not opened yet."""
    assert not StartCounts().may_leave_segments()
    assert not StartCounts(gloo_worlds=4).may_leave_segments()
    for maker in ("engines", "servers", "two_host_servers", "shm_worlds"):
        assert StartCounts(**{maker: 1}).may_leave_segments(), maker


def test_counts_are_written_as_one_json_line_per_run(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(suite_hygiene, "COUNTS", StartCounts(engines=3, engine_drivers=1,
                                                             servers=2))
    path = tmp_path / "stats.jsonl"
    suite_hygiene.write_counts(str(path))
    suite_hygiene.write_counts(str(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["engines"] == 3 and lines[0]["servers"] == 2
    assert lines[0]["pid"] == os.getpid()
    suite_hygiene.write_counts(None)  # no path: nothing written, no error


def test_a_legs_counts_add_up_across_its_pytest_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "suite_counts.py"
    spec = importlib.util.spec_from_file_location("suite_counts", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "leg.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in (
        {"pid": 1, "engines": 3, "engine_drivers": 1, "fresh_engine_processes": 0,
         "servers": 2, "two_host_servers": 0},
        {"pid": 2, "engines": 1, "engine_drivers": 1, "fresh_engine_processes": 1,
         "servers": 0, "two_host_servers": 4, "gloo_worlds": 5})) + "\n")
    assert module.summarise(path) == ("4 engines (2 drivers, 1 fresh processes), 2 servers, "
                                      "4 two-host launches, 5 gloo worlds")
    assert module.summarise(tmp_path / "missing.jsonl") == "(no pytest run reported)"
