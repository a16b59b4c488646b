"""A tiny DeepSeek MTP layer whose drafts the tiny target model accepts.

A randomly initialised MTP layer almost never guesses what the target model
says next (0 accepted drafts of 21 on the random tiny DeepSeek-V3), so the
speculative-decoding counters would compare zeros: equal whatever the draft
computes. This module fits the MTP layer to the target's own greedy
continuations of fixed prompts (``fit_prompts``), on purpose memorising them
(a trained checkpoint is fitted after its training, so the draft imitates
the trained target),
so that on exactly those prompts most drafts are accepted and the counters
depend on every part of the draft's arithmetic.

The fit reproduces vLLM's MTP forward (``DeepSeekMultiTokenPredictorLayer``
in ``vllm/model_executor/models/deepseek_mtp.py``): the draft at position t
takes token t+1 (its embedding zeroed at position 0) and the target's
final-normed hidden state at t, through ``enorm``/``hnorm``, ``eh_proj`` and
one decoder layer; ``shared_head`` (a copy of the target's final norm and
lm_head here) turns it into the guess for token t+2. It trains ``eh_proj``
and the decoder layer's attention, norms, router and shared expert, with a
KL loss against the target's next-token distribution; the routed experts
stay as initialised (their fused in-memory layout differs from the saved
per-expert tensors).
"""

from __future__ import annotations

from typing import Any

# Prompts: the first tokens of each corpus line; continuations: greedy.
PROMPT_TOKENS = 8
CONTINUATION_TOKENS = 32
FIT_STEPS = 300
FIT_LR = 3e-3
FIT_SEED = 0


def fit_prompts(tokenizer_json: str) -> list[list[int]]:
    """The prompts the MTP layer is fitted on (and the MTP tests use)."""
    from tokenizers import Tokenizer

    from vllm_ascend_ext.tools.tiny_models.corpus import corpus_text

    tok = Tokenizer.from_file(tokenizer_json)
    lines = [ln for ln in corpus_text().splitlines() if ln.strip()]
    return [tok.encode(ln).ids[:PROMPT_TOKENS] for ln in lines]


def _rms(x, eps: float):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def fit_mtp_layer(model: Any, num_hidden_layers: int, prompts: list[list[int]]) -> dict:
    """Fit the MTP layer of ``model`` (a transformers DeepSeek built with one
    extra decoder layer at index ``num_hidden_layers``) and return its tensors
    under vLLM's ``deepseek_mtp`` names (routed experts excluded)."""
    import torch

    inner = model.model
    all_layers = inner.layers
    mtp_block = all_layers[num_hidden_layers]
    eps = model.config.rms_norm_eps
    hidden = model.config.hidden_size

    inner.layers = all_layers[:num_hidden_layers]  # the target model proper
    try:
        with torch.no_grad():
            ids = torch.tensor(prompts)
            for _ in range(CONTINUATION_TOKENS):
                nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
            target_hidden = inner(ids, use_cache=False).last_hidden_state  # after the final norm
            target_logp = torch.log_softmax(model.lm_head(target_hidden), -1)
    finally:
        inner.layers = all_layers

    embed = inner.embed_tokens.weight.detach()
    final_norm = inner.norm.weight.detach()
    lm_head = model.lm_head.weight.detach()
    gen = torch.Generator().manual_seed(FIT_SEED)
    eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
    eh_proj.weight.data.copy_(torch.randn(hidden, 2 * hidden, generator=gen) * 0.05)

    batch, length = ids.shape[0], ids.shape[1] - 1
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    causal = torch.full((length, length), float("-inf")).triu(1).expand(batch, 1, -1, -1)
    next_embeds = embed[ids[:, 1:]].clone()
    next_embeds[:, 0] = 0  # vLLM masks the embedding at position 0
    draft_in = torch.cat([_rms(next_embeds, eps), _rms(target_hidden[:, :-1], eps)], -1)
    want = target_logp[:, 1:]

    trained = [p for n, p in mtp_block.named_parameters() if ".experts." not in f".{n}"]
    params = list(eh_proj.parameters()) + trained
    opt = torch.optim.Adam(params, lr=FIT_LR)
    mtp_block.train()
    for _ in range(FIT_STEPS):
        h = eh_proj(draft_in)
        out = mtp_block(h, attention_mask=causal, position_ids=positions,
                        position_embeddings=inner.rotary_emb(h, positions))
        out = out[0] if isinstance(out, tuple) else out
        logp = torch.log_softmax((_rms(out, eps) * final_norm) @ lm_head.T, -1)
        loss = torch.nn.functional.kl_div(logp, want, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    mtp_block.eval()

    prefix = f"model.layers.{num_hidden_layers}."
    tensors = {prefix + n: t.detach().clone().contiguous()
               for n, t in mtp_block.state_dict().items() if ".experts." not in f".{n}"}
    tensors[prefix + "eh_proj.weight"] = eh_proj.weight.detach().clone().contiguous()
    tensors[prefix + "enorm.weight"] = torch.ones(hidden)
    tensors[prefix + "hnorm.weight"] = torch.ones(hidden)
    tensors[prefix + "shared_head.norm.weight"] = final_norm.clone()
    tensors[prefix + "shared_head.head.weight"] = lm_head.clone()
    return tensors
