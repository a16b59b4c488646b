"""Test-only (tests/ascend_real/bootstrap.py): every process of the vllm-ascend
leg (pytest's gloo workers, vLLM's own subprocesses) starts with its stand-ins.
This folder is on PYTHONPATH only inside that leg."""

from tests.ascend_real.bootstrap import install

install()
