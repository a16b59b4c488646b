"""Test-only torchvision placeholder (tests/ascend_real/bootstrap.py).

transformers imports a few torchvision names when vLLM's Qwen3-VL module is
imported (through vllm-ascend's worker patches). They exist here so that the
import succeeds; any call raises, naming it. No test runs vision code."""


def placeholder(name: str):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"torchvision.{name}: only a test placeholder is installed")

    missing.__name__ = name.rsplit(".", 1)[-1]
    return missing
