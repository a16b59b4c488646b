"""Tooling around the plugin: nothing here is imported by a vLLM worker.

A worker loads the plugin through the ``vllm.general_plugins`` entry point
(:func:`vllm_ascend_ext.register`) and vLLM then imports the model classes in
:data:`vllm_ascend_ext.models.MODEL_CLASSES`; tests/test_import_graph.py
proves that path never reaches this package.
"""
