"""A short, seeded training run that makes the tiny checkpoints speak.

A randomly initialised tiny model answers with byte soup, and its greedy
choices are often near-ties. Here each tiny model (transformers' own class,
fp32, CPU) is trained for ``TRAIN_STEPS`` steps on the shipped corpus
(``data/corpus.txt``) until it has memorised it: a greedy continuation of the
start of a corpus line reproduces the rest of that line (and runs on into the
next one), and the model is confident about every corpus token, so greedy
comparisons no longer lean on near-ties.

The training data are fixed windows of ``TRAIN_WINDOW`` tokens, one starting
at each corpus line, cut from the corpus read as one stream (lines joined by
a newline, wrapping round at the end) — prompts in this project start at a
line, at position 0, without a BOS token. Every step takes ``TRAIN_BATCH``
windows, in an order drawn from a seeded generator; AdamW, linear warm-up,
cosine decay. The same seed on the same machine gives the same weights.
"""

from __future__ import annotations

import math
from typing import Any

TRAIN_STEPS = 160
TRAIN_BATCH = 6
# Longer than the longest corpus line (51 tokens), so each line is learnt
# whole and runs on into the next.
TRAIN_WINDOW = 56
TRAIN_LR = 3e-3
TRAIN_WARMUP = 20
TRAIN_MIN_LR_SHARE = 0.1
TRAIN_SEED = 0
# transformers' default init; the random checkpoints used a wide 0.1 so that
# greedy choices were not near-ties, which training now takes care of.
TRAIN_INIT_RANGE = 0.02


def corpus_windows(tokenizer_json: str, window: int = TRAIN_WINDOW) -> list[list[int]]:
    """One window of ``window`` token ids per corpus line, starting at it."""
    from tokenizers import Tokenizer

    from vllm_ascend_ext.tools.tiny_models.corpus import corpus_lines

    tok = Tokenizer.from_file(tokenizer_json)
    newline = tok.encode("\n").ids
    stream: list[int] = []
    starts = []
    for line in corpus_lines():
        starts.append(len(stream))
        stream += tok.encode(line).ids + newline
    wrapped = stream * (1 + window // len(stream) + 1)
    return [wrapped[s:s + window] for s in starts]


def _lr(step: int, steps: int) -> float:
    if step < TRAIN_WARMUP:
        return TRAIN_LR * (step + 1) / TRAIN_WARMUP
    frac = (step - TRAIN_WARMUP) / max(1, steps - TRAIN_WARMUP)
    share = TRAIN_MIN_LR_SHARE + (1 - TRAIN_MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * frac))
    return TRAIN_LR * share


def train_on_corpus(model: Any, tokenizer_json: str, num_hidden_layers: int, *,
                    steps: int = TRAIN_STEPS) -> list[float]:
    """Train ``model`` (a transformers causal LM) in place on the corpus; only
    its first ``num_hidden_layers`` decoder layers take part (a DeepSeek build
    carries one extra, the MTP layer, fitted later). Returns the loss of
    every step."""
    import torch

    windows = torch.tensor(corpus_windows(tokenizer_json))
    n = windows.shape[0]
    per_epoch = max(1, n // TRAIN_BATCH)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    inner = model.model
    all_layers = inner.layers
    inner.layers = all_layers[:num_hidden_layers]
    params = [p for p in model.parameters() if p.requires_grad]
    # Parameters of the MTP layer are left out (they get no gradient anyway).
    mtp_ids = {id(p) for layer in all_layers[num_hidden_layers:] for p in layer.parameters()}
    params = [p for p in params if id(p) not in mtp_ids]
    opt = torch.optim.AdamW(params, lr=TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(n, generator=gen)
            k = step % per_epoch
            batch = windows[order[k * TRAIN_BATCH:(k + 1) * TRAIN_BATCH]]
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps)
            loss = model(batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
    finally:
        inner.layers = all_layers
        model.eval()
    return losses
