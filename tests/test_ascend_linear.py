"""Contract 6 (docs/ascend.md) on vLLM CPU: off vllm-ascend's platform our
o_proj keeps vLLM's own unquantized method.

On vllm-ascend's ``NPUPlatform`` it gets vllm-ascend's
``AscendUnquantizedLinearMethod``, and quantized layers the method of their
quant config: that runs against vllm-ascend's real classes in the vllm-ascend
leg (``tests/ascend_real/test_linear_contracts.py``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_ascend_ext.ops import ascend_linear
from vllm_ascend_ext.ops.flashcomm2_oproj import FlashComm2RowParallelLinear


@pytest.fixture(autouse=True)
def tp_state(monkeypatch):
    """vLLM's parameters read the TP rank at creation; no TP world here."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 2)


def _groups():
    stub = SimpleNamespace
    return dict(tp_group=stub(world_size=2, rank_in_group=0, unique_name="tp"),
                otp_group=stub(world_size=1, rank_in_group=0, unique_name="otp"),
                odp_group=stub(world_size=2, rank_in_group=0, unique_name="odp"))


def test_off_ascend_the_layer_keeps_vllms_method():
    assert not ascend_linear.on_ascend()  # vLLM CPU: device_type "cpu"
    layer = FlashComm2RowParallelLinear(64, 32, bias=False, **_groups())
    assert type(layer.quant_method) is UnquantizedLinearMethod
