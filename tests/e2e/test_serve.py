"""`vllm serve` with the FlashComm2 flags, as a user runs it: the real CLI on
127.0.0.1, the openai client, concurrency, and a clean shutdown."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from vllm_ascend_ext.local_server import VllmServer, process_group_alive

OSHARED_FLAGS = {
    "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1",
    "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1",
}
PROMPTS = [
    "The river town woke slowly. Fishermen",
    "Question: what is the capital of the valley? Answer:",
    "Parallel work is faster when each worker",
    "The quick brown fox",
]


def _exercise(server: VllmServer) -> dict:
    """Completions, chat, streaming and 32 concurrent requests; returns the
    temperature-0 texts for comparison between servers."""
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
    return texts


def _serve(model: str, env: dict) -> tuple[dict, str, int]:
    server = VllmServer(model=model, tp=2, env=env)
    with server:
        texts = _exercise(server)
        log = server.log_text()
    assert not process_group_alive(server.pgid), "vllm serve left processes behind"
    return texts, log, server.pgid


def test_serve_with_oshared_flags_matches_plain_tp(tiny_model):
    model = str(tiny_model("DeepseekV3ForCausalLM"))
    plain, _, _ = _serve(model, {})
    shared, log, _ = _serve(model, OSHARED_FLAGS)
    assert shared == plain
    # The server really ran the feature and said so at start-up.
    assert "FlashComm2 o_proj installed on 5 layers" in log
    assert "o_shared" in log and "replicated" in log and "floor" in log


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
