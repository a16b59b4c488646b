"""`vllm serve` with the FlashComm2 flags, as a user runs it: the real CLI on
127.0.0.1, the openai client, concurrency, and a clean shutdown."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.e2e.harness import (
    arch_params,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    flashcomm2_flags,
    make_prompts,
    served_completion,
    skip_without_cpu_mla,
)
from vllm_ascend_ext.tools.local_server import VllmServer, process_group_alive

OSHARED_FLAGS = flashcomm2_flags(1, oshared=True)
PROMPTS = [
    "The river town woke slowly. Fishermen",
    "Question: what is the capital of the valley? Answer:",
    "Parallel work is faster when each worker",
    "The quick brown fox",
]


def _exercise(server: VllmServer) -> None:
    """Completions, chat, streaming and 32 concurrent requests: every kind of
    request answers, and they agree with each other."""
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    model = server.model
    texts = {}
    for p in PROMPTS:
        r = client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0)
        texts[p] = r.choices[0].text
        assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=10, temperature=0)
    texts["<chat>"] = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"

    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == texts[PROMPTS[0]], "streamed text differs from the non-streamed one"

    def one(i: int) -> str:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300)
        r = c.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
                                 temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(isinstance(t, str) for t in results)
    # Batched temperature-0 answers agree with the one-at-a-time answers'
    # prefixes (max_tokens 8 vs 12).
    for i, t in enumerate(results):
        assert texts[PROMPTS[i % len(PROMPTS)]].startswith(t), (i, t)


@pytest.mark.parametrize("arch", arch_params(["DeepseekV3ForCausalLM", "Qwen3ForCausalLM"]))
def test_serve_with_oshared_flags_matches_plain_tp(arch, tiny_model, engines):
    """The o_shared server's answers are plain TP's: prompt logprobs and greedy
    tokens of served token-id prompts against the offline plain TP=2 engine on
    the same checkpoint, with the harness's criteria."""
    skip_without_cpu_mla(arch)
    model = str(tiny_model(arch))
    server = VllmServer(model=model, tp=2, env=OSHARED_FLAGS)
    with server:
        _exercise(server)
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
