"""The vllm-ascend leg (``make test-ascend``): this project's layers inside
vllm-ascend main's own classes, on vLLM CPU 0.27.1. See bootstrap.py."""

from tests.ascend_real.bootstrap import install

install()
