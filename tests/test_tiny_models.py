"""The tiny checkpoint factory writes real, loadable, well-shaped checkpoints."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from vllm_ascend_ext.tools.tiny_models import ARCHITECTURES, make_tiny_checkpoint
from vllm_ascend_ext.tools.tiny_models.factory import (
    RECIPE_VERSION,
    TRAINED_RECIPE_VERSION,
    resolve_architecture,
)

# Touches no vLLM class: runs once, on the newest CPU-tested vLLM (Makefile).
pytestmark = pytest.mark.vllm_independent


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shapes_fit_the_parallel_layouts(arch, tiny_model):
    cfg = json.loads((tiny_model(arch) / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert cfg["dtype"] == "float32"
    for tp in (1, 2, 4):
        assert cfg["num_attention_heads"] % tp == 0
        assert cfg["num_key_value_heads"] % tp == 0 or tp % cfg["num_key_value_heads"] == 0
    # A PP=2 split of 5 layers starts stage 1 at a layer that is not a
    # multiple of its own layer count.
    assert cfg["num_hidden_layers"] == 5
    if arch.startswith("Deepseek"):
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
        assert cfg["first_k_dense_replace"] >= 1
    if arch == "DeepseekV2ForCausalLM":
        assert cfg["q_lora_rank"] is None


def test_deepseek_v3_has_an_mtp_layer(tiny_model):
    path = tiny_model("DeepseekV3ForCausalLM")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "self_attn.o_proj.weight",
                 "shared_head.head.weight"):
        assert mtp + name in keys
    # Real hub layout: per-expert tensors, not transformers' fused in-memory form.
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert mtp + "mlp.experts.7.down_proj.weight" in keys
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        # The fitted MTP layer reads the target's own head (tiny_models/mtp.py).
        assert f.get_tensor(mtp + "shared_head.head.weight").equal(f.get_tensor("lm_head.weight"))
        assert f.get_tensor(mtp + "shared_head.norm.weight").equal(
            f.get_tensor("model.norm.weight"))


def test_tokenizer_and_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model("Qwen3ForCausalLM")))
    ids = tok("The river town woke slowly.")["input_ids"]
    assert tok.decode(ids) == "The river town woke slowly."
    assert max(ids) < 512
    text = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\nHello!\n<|assistant|>\n"


def _greedy_misses(path, prompt_len: int = 8) -> tuple[list, int]:
    """Corpus lines the saved checkpoint (loaded by transformers) does not
    continue, greedily, from their first ``prompt_len`` tokens."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from vllm_ascend_ext.tools.tiny_models.corpus import corpus_lines

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    lines = [tok.encode(ln).ids for ln in corpus_lines()]
    batch = torch.tensor([ids[:prompt_len] for ids in lines])
    with torch.no_grad():
        for _ in range(max(len(ids) for ids in lines) - prompt_len):
            nxt = model(batch, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            batch = torch.cat([batch, nxt], 1)
    wrong = [(tok.decode(ids), tok.decode(batch[i, :len(ids)].tolist()))
             for i, ids in enumerate(lines) if batch[i, :len(ids)].tolist() != ids]
    return wrong, len(lines)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_checkpoint_speaks_corpus_text(arch, tiny_model):
    """The suite's and the demo's checkpoints are trained on the corpus: each
    continues every corpus line with the rest of that line."""
    from vllm_ascend_ext.tools.tiny_models.factory import training_summary
    from vllm_ascend_ext.tools.tiny_models.train import TRAIN_STEPS

    path = tiny_model(arch)
    info = training_summary(path)
    assert info["steps"] == TRAIN_STEPS and info["final_loss"] < 0.1, info
    wrong, n = _greedy_misses(path)
    assert not wrong, f"{len(wrong)} of {n} lines not reproduced: {wrong[:3]}"


def test_a_random_checkpoint_does_not_speak(tmp_path):
    """The check above can fail: the random recipe reproduces no corpus line."""
    from vllm_ascend_ext.tools.tiny_models.factory import training_summary

    random = make_tiny_checkpoint("qwen3", tmp_path / "random", train=False)
    assert training_summary(random) is None
    wrong, n = _greedy_misses(random)
    assert len(wrong) == n


def test_training_is_deterministic(tmp_path):
    # two layers: the same recipe at a fraction of the build time
    a = make_tiny_checkpoint("qwen3", tmp_path / "a", num_hidden_layers=2, train=True)
    b = make_tiny_checkpoint("qwen3", tmp_path / "b", num_hidden_layers=2, train=True)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tiny_model.json").read_text())["recipe"] == TRAINED_RECIPE_VERSION


def test_rebuild_is_deterministic_and_cached(tmp_path):
    a = make_tiny_checkpoint("qwen3", tmp_path / "a", train=False)
    b = make_tiny_checkpoint("qwen3", tmp_path / "b", train=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    make_tiny_checkpoint("qwen3", tmp_path / "a", train=False)  # cached: not rewritten
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((a / "tiny_model.json").read_text())["recipe"] == RECIPE_VERSION


def test_two_builders_of_one_missing_checkpoint_write_it_once(tmp_path, monkeypatch):
    """CI runs two pytest streams at once: a checkpoint both find missing is
    written once, and the second waits for it instead of writing over files
    the first one's engines may be reading."""
    import threading
    import time

    from vllm_ascend_ext.tools.tiny_models import factory

    writes = []
    real = factory._write_tiny_checkpoint

    def slow_write(*args):
        writes.append(threading.get_ident())
        time.sleep(0.5)  # the other builder arrives while this one writes
        real(*args)

    monkeypatch.setattr(factory, "_write_tiny_checkpoint", slow_write)
    out = tmp_path / "shared"
    paths = []
    builders = [threading.Thread(target=lambda: paths.append(
        make_tiny_checkpoint("qwen3", out, num_hidden_layers=1, train=False))) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join(timeout=120)
    assert paths == [out, out]
    assert len(writes) == 1, writes
    assert json.loads((out / "tiny_model.json").read_text())["recipe"] == RECIPE_VERSION


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny-model architecture 'llama'"):
        resolve_architecture("llama")


@pytest.mark.parametrize("arch,quantized", [
    ("Qwen3ForCausalLM", ("self_attn.o_proj", "self_attn.q_proj", "mlp.down_proj")),
    ("DeepseekV3ForCausalLM", ("self_attn.o_proj",)),
])
def test_w8a8_checkpoint_is_compressed_tensors_int8(arch, quantized, tiny_model):
    import torch

    from vllm_ascend_ext.tools.tiny_models.w8a8 import tiny_w8a8_checkpoint

    src, path = tiny_model(arch), tiny_w8a8_checkpoint(arch)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    group = qcfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    with safe_open(str(src / "model.safetensors"), "pt") as f_src, \
            safe_open(str(path / "model.safetensors"), "pt") as f:
        for mod in quantized:
            name = f"model.layers.1.{mod}"
            q, scale = f.get_tensor(name + ".weight"), f.get_tensor(name + ".weight_scale")
            w = f_src.get_tensor(name + ".weight")
            assert q.dtype == torch.int8 and scale.shape == (w.shape[0], 1)
            # per-channel symmetric: the dequantized weight is within half a step
            assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-6).all()
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
        if arch.startswith("Deepseek"):  # only o_proj is int8 there
            assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == \
                torch.float32
