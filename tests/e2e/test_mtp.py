"""DeepSeek MTP speculative decoding with FlashComm2 + o_shared, end to end.

The tiny DeepSeek-V3's MTP layer is fitted to the target's own greedy
continuations of ``fit_prompts`` (``vllm_ascend_ext/tools/tiny_models/mtp.py``), so on
those prompts vLLM accepts most drafts, and the acceptance counters depend on
the draft's arithmetic and on the target's hidden states it reads. A random
MTP layer is accepted 0 times, which would make "equal counters" say nothing.

vLLM builds the draft with its own attention backend setting
(``speculative_config.attention_backend``, vLLM 0.32 ``llm_base_proposer.py``
``_create_draft_vllm_config``: "never inherit"), so the harness states the
engine's backend there too; ``test_mtp_draft_backend_unstated_dies_in_amx_mla``
shows why.
"""

from __future__ import annotations

import pytest

from tests.cpu_features import cpu_has_avx512
from tests.e2e.harness import (
    MEMORY_RPC,
    assert_greedy_close,
    assert_prompt_logprobs_close,
    flashcomm2_flags,
    root_cause,
    run_vllm,
    skip_without_cpu_mla,
)
from vllm_ascend_ext.tools.tiny_models.mtp import CONTINUATION_TOKENS, fit_prompts

ARCH = "DeepseekV3ForCausalLM"
NUM_PROMPTS = 4
OSHARED = flashcomm2_flags(1, True, 1)
# On the trained checkpoint the fitted draft is accepted at position 1 in 64 of
# 64 drafts (1 token) and 44 of 44 (2 tokens), served 64 of 64; on the random
# one it was 56-58 of 68, with a floor of 0.5. Below this the fit failed, and
# equal counters would prove little.
MIN_ACCEPTANCE = 0.9


def mtp_config(num_tokens: int) -> dict:
    return {"method": "deepseek_mtp", "num_speculative_tokens": num_tokens}


def mtp_prompts(model) -> list[list[int]]:
    return fit_prompts(str(model / "tokenizer.json"))[:NUM_PROMPTS]


@pytest.fixture(scope="module")
def mtp_runs(tiny_model):
    """One engine per (TP, speculative tokens, flags, pretend AMX), shared."""
    skip_without_cpu_mla(ARCH)
    model = tiny_model(ARCH)
    cache: dict = {}

    def run(num_tokens: int, env: dict | None = None, *, tp: int = 2,
            pretend_amx: bool | None = None):
        key = (tp, num_tokens, tuple(sorted((env or {}).items())), pretend_amx)
        if key not in cache:
            cache[key] = run_vllm(
                model, mtp_prompts(model), tp=tp, env=env, max_tokens=CONTINUATION_TOKENS,
                llm_kwargs={"speculative_config": mtp_config(num_tokens)},
                spec_decode_metrics=True, pretend_amx=pretend_amx,
                collective_rpc=[MEMORY_RPC])
        return cache[key]

    return run


def _check_workers(result, *, flags_on: bool, num_hidden: int = 5) -> None:
    for worker in result.rpc[MEMORY_RPC]:
        # the draft is vLLM's MTP model with vLLM's own o_proj ...
        assert worker["draft_model_class"] == "DeepSeekMTP", worker
        assert worker["draft_o_proj_classes"] == ["RowParallelLinear"], worker
        if flags_on:
            # ... and the series holds exactly the main model's hidden layers
            assert worker["o_proj_classes"] == ["FlashComm2RowParallelLinear"], worker
            assert worker["series_layers"] == list(range(num_hidden)), worker
        else:
            assert worker["o_proj_classes"] == ["RowParallelLinear"], worker
            assert worker["series_layers"] is None, worker


def _acceptance(result) -> float:
    sd = result.spec_decode
    return sd["num_accepted_tokens_per_pos"][0] / sd["num_drafts"]


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_mtp_with_oshared_matches_plain_tp(num_tokens, mtp_runs):
    plain = mtp_runs(num_tokens)
    got = mtp_runs(num_tokens, OSHARED)
    _check_workers(plain, flags_on=False)
    _check_workers(got, flags_on=True)
    worst = assert_prompt_logprobs_close(plain.outputs, got.outputs,
                                         names=("plain TP2 + MTP", "FC2 + o_shared + MTP"))
    assert_greedy_close(plain.outputs, got.outputs,
                        names=("plain TP2 + MTP", "FC2 + o_shared + MTP"))
    assert _acceptance(plain) >= MIN_ACCEPTANCE, plain.spec_decode
    assert len(plain.spec_decode["num_accepted_tokens_per_pos"]) == num_tokens
    # vLLM's own counters: the same drafts, the same tokens accepted at each position.
    assert got.spec_decode == plain.spec_decode, (plain.spec_decode, got.spec_decode)
    print(f"\nMTP {num_tokens}: {plain.spec_decode}; prompt-logprob gap {worst:.2e}")


def _backends(log: str) -> set[str]:
    return {b for b in ("AMX_MLA", "CPU_MLA") if f"Using {b} backend" in log}


@pytest.mark.skipif(not cpu_has_avx512(), reason="needs vLLM CPU's AVX-512 kernels (avx512f): "
                    "its AVX2 build has no AMX_MLA kernels (torch.ops._C.convert_weight_packed), "
                    "so the AMX machine's failure cannot be reproduced here")
def test_mtp_draft_backend_unstated_dies_in_amx_mla(tiny_model):
    """On a CPU that vLLM believes has AMX (a test-only plugin answers
    ``torch.cpu._is_amx_tile_supported`` with True in every process), vLLM's
    default, no backend in the speculative config: the target takes the
    stated CPU_MLA, the fp32 draft takes AMX_MLA and dies at load."""
    model = tiny_model(ARCH)
    with pytest.raises(RuntimeError) as failed:
        run_vllm(model, mtp_prompts(model)[:1], tp=1, max_tokens=2, pretend_amx=True,
                 llm_kwargs={"speculative_config": mtp_config(1)}, draft_backend_unstated=True)
    assert "expect weight to be bfloat16" in str(failed.value), root_cause(str(failed.value))


def test_mtp_draft_backend_stated_on_an_amx_cpu(mtp_runs):
    """The same pretended AMX CPU with the backend stated for the draft too:
    FlashComm2 + o_shared with MTP runs on CPU_MLA only, with exactly the
    numbers of this CPU's run."""
    got = mtp_runs(1, OSHARED, pretend_amx=True)
    assert _backends(got.log) == {"CPU_MLA"}, _backends(got.log)
    ref = mtp_runs(1, OSHARED)
    assert_prompt_logprobs_close(ref.outputs, got.outputs, atol=0.0,
                                 names=("this CPU", "pretended AMX CPU"))
    assert [o["token_ids"] for o in got.outputs] == [o["token_ids"] for o in ref.outputs]
    assert got.spec_decode == ref.spec_decode


def _served_counters(server) -> dict[str, float]:
    """vLLM's spec-decode counters from the server's Prometheus endpoint."""
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total{" in line:
            name = line.split("{", 1)[0].removeprefix("vllm:spec_decode_").removesuffix("_total")
            if name != "num_accepted_tokens_per_pos":
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def test_serve_mtp_with_oshared_flags(tiny_model, mtp_runs, engines):
    """``vllm serve --speculative-config`` with the FlashComm2 env flags: the
    served answers are plain TP's, and the server's own counters show the
    draft accepted. The same server is the suite's DeepSeek-V3 server (once
    its own case in test_serve.py): every kind of request answers, and its
    answers on the harness's prompts are the offline plain TP2 engine's."""
    from tests.e2e.harness import exercise_openai_api, make_prompts, served_completion
    from vllm_ascend_ext.tools.local_server import VllmServer, process_group_alive

    model = tiny_model(ARCH)
    server = VllmServer(model=str(model), tp=2, env=OSHARED, speculative_config=mtp_config(1),
                        log_stats=True)
    with server:
        served = [served_completion(server, ids, max_tokens=CONTINUATION_TOKENS)
                  for ids in mtp_prompts(model)]
        # Read before other prompts: only the fitted ones are mostly accepted.
        counters = _served_counters(server)
        exercise_openai_api(server)
        served_plain_prompts = [served_completion(server, ids) for ids in make_prompts(str(model))]
        log = server.log_text()
    assert not process_group_alive(server.pgid), "vllm serve left processes behind"
    assert "FlashComm2 o_proj installed on 5 layers" in log
    # The storage and its bytes per rank: plain TP's shards plus the ring.
    assert "o_shared storage: tp_shard" in log
    assert "TP-shard storage, 5 layers (0..4)" in log and "plain TP's o_proj" in log
    ref = mtp_runs(1)
    worst = assert_prompt_logprobs_close(ref.outputs, served,
                                         names=("offline plain TP2 + MTP", "served"))
    assert_greedy_close(ref.outputs, served, names=("offline plain TP2 + MTP", "served"))
    assert counters["num_drafts"] > 0, counters
    assert counters["num_accepted_tokens"] >= MIN_ACCEPTANCE * counters["num_drafts"], counters
    plain = engines.run(ARCH, tp=2).outputs
    worst_plain = assert_prompt_logprobs_close(plain, served_plain_prompts,
                                               names=("offline plain TP2", "served"))
    assert_greedy_close(plain, served_plain_prompts, names=("offline plain TP2", "served"))
    print(f"\nserved MTP + o_shared: {counters}; gap vs offline plain + MTP {worst:.2e}, "
          f"vs offline plain {worst_plain:.2e}")
