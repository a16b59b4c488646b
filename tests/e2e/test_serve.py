"""`vllm serve` with the FlashComm2 flags, as a user runs it: the real CLI on
127.0.0.1, the openai client, concurrency, and a clean shutdown."""

from __future__ import annotations

import pytest

from tests.e2e.harness import (
    arch_params,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    exercise_openai_api,
    flashcomm2_flags,
    make_prompts,
    served_completion,
    skip_without_cpu_mla,
)
from vllm_ascend_ext.tools.local_server import VllmServer, process_group_alive

OSHARED_FLAGS = flashcomm2_flags(1, oshared=True)
# DeepSeek-V3 is served by test_mtp.py::test_serve_mtp_with_oshared_flags,
# which makes these checks on its MTP server (one server fewer).
@pytest.mark.parametrize("arch", arch_params(["Qwen3ForCausalLM"]))
def test_serve_with_oshared_flags_matches_plain_tp(arch, tiny_model, engines):
    """The o_shared server's answers are plain TP's: prompt logprobs and greedy
    tokens of served token-id prompts against the offline plain TP=2 engine on
    the same checkpoint, with the harness's criteria."""
    skip_without_cpu_mla(arch)
    model = str(tiny_model(arch))
    server = VllmServer(model=model, tp=2, env=OSHARED_FLAGS)
    with server:
        exercise_openai_api(server)
        served = [served_completion(server, ids) for ids in make_prompts(model)]
        log = server.log_text()
    assert not process_group_alive(server.pgid), "vllm serve left processes behind"
    ref = engines.run(arch, tp=2).outputs
    worst = assert_prompt_logprobs_close(ref, served, names=("offline plain TP2", "served"))
    assert_greedy_close(ref, served, names=("offline plain TP2", "served"))
    print(f"\nserved o_shared vs offline plain TP2: max prompt-logprob gap {worst:.2e}")
    # The server really ran the feature and said so at start-up.
    assert "FlashComm2 o_proj installed on 5 layers" in log
    # The storage and its bytes per rank: plain TP's shards plus the ring.
    assert "o_shared storage: tp_shard" in log
    assert "TP-shard storage, 5 layers (0..4)" in log and "plain TP's o_proj" in log


@pytest.mark.vllm_range
def test_serve_rejects_a_bad_flag_at_startup(tiny_model):
    """A misconfiguration stops the server at start-up with a message naming
    the flag, the value and the rule (TP=2 cannot take o_proj TP size 2)."""
    server = VllmServer(model=str(tiny_model("Qwen3ForCausalLM")), tp=2,
                        env={"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2"}, startup_timeout=300)
    with pytest.raises(RuntimeError, match="exited with code"):
        server.start()
    log = server.log_text()
    server.stop()
    assert "FlashComm2ConfigError" in log
    assert "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE" in log
