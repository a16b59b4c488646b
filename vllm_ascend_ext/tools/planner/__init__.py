"""The capacity planner, ``vllm-ascend-ext plan``: closed-form answers before a deployment.

One concept per module (this file imports nothing):

==============  ==============================================================
``errors``      ``PlanError``
``shapes``      ``ModelShape``: presets and Hugging Face ``config.json`` parsing
``link_model``  ``LinkModel``: what a collective or a broadcast costs on a link
``model``       o_proj memory per rank, broadcast timing, traffic per layer: ``plan``
``step_model``  step time of plain TP / FlashComm2 / o_shared / adaptive on a link
``text``        the recommendation sentences and the text report
``cli``         the ``plan`` subcommand
==============  ==============================================================
"""
