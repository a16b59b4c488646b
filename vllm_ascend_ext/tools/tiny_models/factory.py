"""Tiny but real checkpoints for the architectures this plugin integrates.

Each checkpoint is written by transformers' own model class (so vLLM loads the
same tensor names a real hub checkpoint has), with a fixed seed, in fp32
safetensors, together with a BPE tokenizer trained locally on text shipped in
this package and a chat template.  Nothing is downloaded.

Shape rules:
- 8 attention heads and 4 KV heads, so TP=1, 2 and 4 all divide;
- 5 hidden layers, so a PP=2 split puts the second stage's first layer at an
  index that is not a multiple of its layer count (the upstream prefetch-index
  bug shows there);
- MLA uses ``kv_lora_rank + qk_rope_head_dim == 576``, the only latent size
  vLLM's CPU MLA backend accepts;
- trained briefly on the shipped corpus before it is saved
  (``tiny_models/train.py``), so that it speaks: a greedy continuation of a
  corpus line reproduces the line, and the model is confident about every
  corpus token, so greedy comparisons do not lean on near-ties.

``train=False`` writes the untrained recipe (a wide random init, so that its
greedy choices are not near-ties either): the throughput benchmarks build
their own shapes with it, where the weights' values do not matter, and
``tests/test_tiny_models.py`` uses it to show that the "it speaks" check can
fail.

CLI:  ``vllm-ascend-ext make-tiny ARCH OUT_DIR`` (or ``--all ROOT``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vllm_ascend_ext.tools.tiny_models.corpus import corpus_text

ARCHITECTURES = (
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)

VOCAB_SIZE = 512
NUM_HIDDEN_LAYERS = 5
SEED = 1234
# Bumped whenever the recipe changes, so cached checkpoints are rebuilt.
RECIPE_VERSION = 4  # random weights (train=False): the throughput benchmarks' shapes
TRAINED_RECIPE_VERSION = 5  # trained on the corpus (train.py): the suite's and the demo's

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass(frozen=True)
class TinySpec:
    architecture: str
    config_kwargs: dict[str, Any]
    # Extra tensors that transformers does not create (DeepSeek's MTP layer):
    # (saved state, saved config, the built model, output dir) -> None.
    add_extra_tensors: Callable[[dict, Any, Any, Path], None] | None = None
    initializer_range: float = 0.1


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    num_attention_heads=8,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_MLA = dict(
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    v_head_dim=32,
    num_key_value_heads=8,
    intermediate_size=512,
    moe_intermediate_size=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    routed_scaling_factor=1.0,
)

_QWEN = dict(num_key_value_heads=4, head_dim=32, intermediate_size=512)


def _deepseek_mtp_tensors(state: dict, config: Any, model: Any, out_dir: Path) -> None:
    """Add the tensors of DeepSeek's multi-token-prediction layer.

    transformers has no MTP module, so the model is built with one extra
    decoder layer (index ``num_hidden_layers``); its tensors and the MTP-only
    projections are fitted to the target's own greedy continuations
    (``tiny_models/mtp.py``), so that speculative decoding accepts most drafts.
    """
    from vllm_ascend_ext.tools.tiny_models.mtp import fit_mtp_layer, fit_prompts

    prompts = fit_prompts(str(out_dir / "tokenizer.json"))
    state.update(fit_mtp_layer(model, config.num_hidden_layers, prompts))


SPECS: dict[str, TinySpec] = {
    "DeepseekV2ForCausalLM": TinySpec(
        "DeepseekV2ForCausalLM",
        dict(**_COMMON, **_MLA, q_lora_rank=None, topk_method="greedy",
             n_group=1, topk_group=1, norm_topk_prob=False),
    ),
    "DeepseekV3ForCausalLM": TinySpec(
        "DeepseekV3ForCausalLM",
        dict(**_COMMON, **_MLA, q_lora_rank=128, n_group=1, topk_group=1,
             topk_method="noaux_tc", scoring_func="sigmoid",
             norm_topk_prob=True, num_nextn_predict_layers=1),
        add_extra_tensors=_deepseek_mtp_tensors,
    ),
    "Qwen2ForCausalLM": TinySpec("Qwen2ForCausalLM", dict(**_COMMON, **_QWEN)),
    "Qwen3ForCausalLM": TinySpec("Qwen3ForCausalLM", dict(**_COMMON, **_QWEN)),
    "Qwen3MoeForCausalLM": TinySpec(
        "Qwen3MoeForCausalLM",
        dict(**_COMMON, **_QWEN, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[],
             norm_topk_prob=True),
    ),
}

SHORT_NAMES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def resolve_architecture(name: str) -> str:
    if name in SPECS:
        return name
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    raise ValueError(
        f"unknown tiny-model architecture {name!r}; choose one of "
        f"{sorted(SHORT_NAMES)} or {list(SPECS)}"
    )


def write_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on the shipped corpus and save it in the
    layout transformers and vLLM load (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} > {VOCAB_SIZE}")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    }, indent=2))


def build_config(arch: str, num_hidden_layers: int = NUM_HIDDEN_LAYERS,
                 hidden_size: int | None = None, initializer_range: float | None = None):
    import transformers

    spec = SPECS[arch]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    init = spec.initializer_range if initializer_range is None else initializer_range
    kwargs = dict(spec.config_kwargs, num_hidden_layers=num_hidden_layers,
                  initializer_range=init)
    if hidden_size is not None:
        kwargs["hidden_size"] = hidden_size
        kwargs["intermediate_size"] = hidden_size * 2
    config = config_cls(**kwargs)
    config.architectures = [arch]
    return config


def make_tiny_checkpoint(arch: str, out_dir: str | os.PathLike, *,
                         num_hidden_layers: int = NUM_HIDDEN_LAYERS,
                         hidden_size: int | None = None, force: bool = False,
                         train: bool = True) -> Path:
    """Write (or reuse) a tiny checkpoint + tokenizer for ``arch`` in ``out_dir``.

    ``train`` (the default) trains the model on the shipped corpus before it
    is saved (``tiny_models/train.py``); ``train=False`` keeps the random
    init."""
    from vllm_ascend_ext.tools.tiny_models import train as training

    arch = resolve_architecture(arch)
    out = Path(out_dir)
    marker = out / "tiny_model.json"
    recipe = {"architecture": arch, "recipe": TRAINED_RECIPE_VERSION if train else RECIPE_VERSION,
              "seed": SEED, "num_hidden_layers": num_hidden_layers, "hidden_size": hidden_size}
    if train:
        recipe["train_steps"] = training.TRAIN_STEPS
    if not force and marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    with exclusive_build(out):
        # Another process may have built it while this one waited.
        if not force and marker.exists() and json.loads(marker.read_text()) == recipe:
            return out
        _write_tiny_checkpoint(arch, out, recipe, num_hidden_layers, hidden_size, train)
    return out


@contextmanager
def exclusive_build(out: Path):
    """Hold the build lock of checkpoint folder ``out``: two processes (CI's
    two test streams, say) that both find it missing build it once, and
    neither reads files the other is still writing."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_tiny_checkpoint(arch: str, out: Path, recipe: dict, num_hidden_layers: int,
                           hidden_size: int | None, train: bool) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from vllm_ascend_ext.tools.tiny_models import train as training

    marker = out / "tiny_model.json"
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    spec = SPECS[arch]
    init_range = training.TRAIN_INIT_RANGE if train else None
    config = build_config(arch, num_hidden_layers, hidden_size, init_range)

    # MTP: build one extra decoder layer; it is saved under index
    # num_hidden_layers, where vLLM's main model skips it.
    build_cfg = config
    n_mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
    if n_mtp:
        build_cfg = build_config(arch, num_hidden_layers + n_mtp, hidden_size, init_range)

    torch.manual_seed(SEED)
    model = getattr(transformers, arch)(build_cfg).to(torch.float32).eval()
    if train:
        # Before the MTP fit: the MTP layer imitates the trained target.
        losses = training.train_on_corpus(model, str(out / "tokenizer.json"),
                                          num_hidden_layers)
        (out / "tiny_training.json").write_text(json.dumps({
            "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
            "corpus_bytes": len(corpus_text().encode()),
            "params": sum(p.numel() for p in model.parameters()) - _extra_layer_params(
                model, num_hidden_layers),
        }, indent=2))
    else:
        (out / "tiny_training.json").unlink(missing_ok=True)
    # save_pretrained writes the hub layout (per-expert MoE tensors), which is
    # what vLLM's loaders expect; the in-memory state_dict is fused.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    if spec.add_extra_tensors is not None:
        shards = sorted(out.glob("*.safetensors"))
        if len(shards) != 1:
            raise RuntimeError(f"expected one safetensors shard in {out}, got {shards}")
        state = load_file(str(shards[0]))
        spec.add_extra_tensors(state, config, model, out)
        save_file(state, str(shards[0]), metadata={"format": "pt"})

    # The saved config must describe the main model, not the MTP-extended build.
    write_model_config(config, out, "float32")
    marker.write_text(json.dumps(recipe))


def _extra_layer_params(model: Any, num_hidden_layers: int) -> int:
    return sum(p.numel() for layer in model.model.layers[num_hidden_layers:]
               for p in layer.parameters())


def training_summary(path: str | os.PathLike) -> dict | None:
    """What ``tiny_training.json`` next to a checkpoint says about its
    training (steps, losses, corpus size, parameters), or None if untrained."""
    f = Path(path) / "tiny_training.json"
    return json.loads(f.read_text()) if f.exists() else None


def write_model_config(config: Any, out: Path, dtype: str) -> None:
    """``config.json`` (with ``dtype``, not the deprecated ``torch_dtype``) and a
    greedy ``generation_config.json`` next to a saved checkpoint."""
    config.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.pop("torch_dtype", None)
    cfg_json["dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2))


def default_cache_root() -> Path:
    root = os.environ.get("VLLM_ASCEND_EXT_TINY_ROOT")
    if root:
        return Path(root)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "vllm-ascend-ext" / "tiny-models"


def checkpoint_dir_name(arch: str, trained: bool = True) -> str:
    """Folder name of the cached checkpoint: architecture and recipe, so a
    recipe change never reuses an old build."""
    arch = resolve_architecture(arch)
    return f"{arch}-trained-r{TRAINED_RECIPE_VERSION}" if trained else f"{arch}-r{RECIPE_VERSION}"


def tiny_checkpoint(arch: str, root: str | os.PathLike | None = None, *,
                    trained: bool = True) -> Path:
    """Path of the cached tiny checkpoint for ``arch``, built on first use:
    trained on the corpus (the suite's and the demo's), or with
    ``trained=False`` the random recipe."""
    root = Path(root) if root is not None else default_cache_root()
    return make_tiny_checkpoint(arch, root / checkpoint_dir_name(arch, trained), train=trained)
