"""o_shared: a series of isomorphic linear layers stored round-robin across a group.

One concept per module; import from the module that owns the name (this
package file imports nothing, so a module the series calls can import one
piece without pulling in the rest):

================  ==========================================================
``errors``        ``SharedWeightError``
``ring_index``    ownership (``layer_idx % n``) and ring index arithmetic:
                  ``slot_of_position``, ``next_prefetch_position``
``registry``      ``shared_weight_registry``: series by name, for the ops
``hook_ops``      the ``vllm_ascend_ext::shared_weight_wait`` /
                  ``shared_weight_prefetch`` custom ops
``members``       registration: what joining a series records and changes
``materialise``   finalising one member: broadcast raw, post-process, bind
``ring``          ``SlotRing``: resident buffers, slots, wait / prefetch
``report``        ``SharedWeightMemoryReport``
``series``        ``SharedWeightSeries``: the lifecycle over all of the above
``upstream_api``  upstream vllm-ascend's module-level function names
================  ==========================================================

How one processed layer is held in a buffer is ``ops/slot_storage.py``.
The design and its rules: ``docs/shared_weight.md``.
"""
