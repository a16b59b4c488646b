"""Several hosts on one machine: network namespaces (:mod:`.netns`), a
loopback relay into a host (:mod:`.relay`) and vLLM's own multi-node launch
across them (:mod:`.serve`).  Used by the tests, the benchmarks and
``python -m vllm_ascend_ext.tools.multinode`` (try it yourself)."""
