"""The ``vllm_ascend_ext::`` torch library and the one way to add an op to it.

Every custom op of the package (the FlashComm2 collectives, o_shared's wait /
prefetch hooks, the adaptive o_proj switch) registers here, so the library
fragment exists once and each op is defined once even when its module is
imported again (a test re-import, or a second plugin load in one process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["OP_NAMESPACE", "register_custom_op"]

OP_NAMESPACE = "vllm_ascend_ext"
_library = torch.library.Library(OP_NAMESPACE, "FRAGMENT")  # noqa: TID251


def register_custom_op(name: str, impl: Callable, fake_impl: Callable,
                       mutates_args: list[str] | None = None) -> None:
    """Define ``torch.ops.vllm_ascend_ext.<name>`` unless it exists already.

    A module imported twice keeps the first definition: torch refuses a
    second one under the same name."""
    if hasattr(getattr(torch.ops, OP_NAMESPACE), name):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name=name, op_func=impl, mutates_args=mutates_args,
                              fake_impl=fake_impl, target_lib=_library)
