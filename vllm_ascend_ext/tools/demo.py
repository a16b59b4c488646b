"""``make demo``: a tiny DeepSeek-V3 served by ``vllm serve`` at TP=2 on CPU.

Builds (or reuses) the tiny checkpoint, starts the real ``vllm`` CLI on
127.0.0.1 with the FlashComm2 flags in the environment, sends one OpenAI-style
completion over HTTP, prints the reply and what the plugin reported it
actually ran with, and shuts the server down.

    python -m vllm_ascend_ext.tools.demo [--flags-off] [--arch deepseek_v3] [--dtype bfloat16]

fp32 (the default) runs DeepSeek on vLLM's reference ``CPU_MLA`` backend on
any CPU; ``--dtype bfloat16`` takes ``AMX_MLA``, the fast path, where the CPU
has AMX (``vllm_ascend_ext.cpu_attention``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request

DEMO_FLAGS = {
    "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1",
    "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1",
}

# Lines the plugin logs at start-up (effective settings, o_proj memory).
_REPORT = re.compile(r"\[vllm_ascend_ext\][^\n]*|FlashComm2[^\n]*|o_shared[^\n]*")


_ARCH_NAMES = {
    "DeepseekV2ForCausalLM": "DeepSeek-V2", "DeepseekV3ForCausalLM": "DeepSeek-V3",
    "Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3", "Qwen3MoeForCausalLM": "Qwen3-MoE",
}


def describe_model(path: str) -> str:
    """One line saying what the served tiny model is, so that its reply is
    read for what it is."""
    from pathlib import Path

    from vllm_ascend_ext.tools.tiny_models.factory import training_summary

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    name = _ARCH_NAMES.get(arch, arch)
    info = training_summary(path)
    if info is None:
        return f"model: a tiny {name}, randomly initialised (its reply is noise)"
    return (f"model: a tiny {name} ({info['params'] / 1e6:.1f}M params) trained here for "
            f"{info['steps']} steps on {info['corpus_bytes'] / 1000:.1f} KB of text, "
            "so the reply imitates that text")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="deepseek_v3")
    ap.add_argument("--flags-off", action="store_true", help="serve with plain TP")
    ap.add_argument("--prompt", default="The river town woke slowly. Fishermen")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = ap.parse_args(argv)

    from vllm_ascend_ext.tools.local_server import VllmServer
    from vllm_ascend_ext.tools.tiny_models import tiny_checkpoint

    model = str(tiny_checkpoint(args.arch))
    env = {} if args.flags_off else dict(DEMO_FLAGS)
    print(describe_model(model))
    print(f"checkpoint: {model}")
    print("flags: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "none (plain TP)"))
    server = VllmServer(model=model, tp=2, dtype=args.dtype, env=env)
    from vllm_ascend_ext.cpu_attention import cpu_attention_backend, cpu_has_amx, cpu_model_name

    backend = cpu_attention_backend(model, args.dtype)
    print(f"cpu: {cpu_model_name()} ({'AMX' if cpu_has_amx() else 'no AMX'}); dtype {args.dtype}"
          + (f", attention backend {backend}" if backend else ""))
    print("starting: " + " ".join(server.command()[:3]) + " ... (TP=2, 127.0.0.1)")
    with server:
        body = json.dumps({"model": model, "prompt": args.prompt, "max_tokens": 24,
                           "temperature": 0}).encode()
        req = urllib.request.Request(server.base_url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        log = server.log_text()
    print(f"prompt: {args.prompt!r}")
    print(f"reply:  {reply['choices'][0]['text']!r}")
    print(f"usage:  {reply['usage']}")
    lines = sorted(set(m.group(0).strip() for m in _REPORT.finditer(log)))
    print("in effect (from the server log):")
    for ln in lines[:20] or ["(the plugin reported no FlashComm2 settings)"]:
        print("  " + ln)
    print("server stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
