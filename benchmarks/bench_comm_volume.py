"""Bytes each rank sends per layer: FlashComm2 o_proj (k=1, k=2) vs plain TP.

    .venv/bin/python benchmarks/bench_comm_volume.py --out results/bench_comm_volume.json

FlashComm2's bytes are *measured from the op itself*: the real
``FlashComm2RowParallelLinear.forward`` runs on meta tensors (no data, no
compute) with stub groups of the production sizes, and its three collective
entry points are replaced by recorders that note the tensor each call is given
and return a tensor of the real output shape.  Padding, the all-to-all chunking
and the reduce-scatter / all-gather row counts are therefore the op's own.
Per-rank bytes sent, for the standard algorithms:

* all-to-all over D ranks: every chunk but the one a rank keeps, (D-1)/D of the input;
* ring reduce-scatter over k ranks: (k-1)/k of the input;
* ring all-gather over P ranks: (P-1) x the input.

Baselines and the formula in FACTS.md (b = bytes per activation element):

* plain TP, ring all-reduce of [T, h]:      2 (P-1)/P T h b
* FlashComm1, reduce-scatter of [T, h]:     (P-1)/P T h b  (+ the same again as
  the all-gather before the next QKV)
* FlashComm2 formula: all-to-all (D-1)/D T (a/P) b  [k=1: (P-1)/P T (a/P) b]
  + reduce-scatter (k-1) T/P h b + all-gather (P-1)/P T h b.

"int8" means int8 activations on the wire (b = 1); the op itself sends its
activation dtype, so the int8 rows are the same element counts at one byte.
o_shared adds one broadcast per layer of the o_proj shard, W = a h / k bytes-per-
weight; the break-even token count is where FlashComm2's saving over plain TP
reaches W.

Writes JSON to ``--out`` and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dist_utils import run_distributed  # noqa: E402

MODELS = {
    # name: (a = heads x v_head_dim, h = hidden size)
    "DeepSeek-V3": (128 * 128, 7168),
    "Qwen3-235B-A22B": (64 * 128, 4096),
}
WIRE_BYTES = {"bf16": 2, "int8": 1}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1024, 2048, 3000, 4096,
                  8192, 16384]


class _Recorder:
    """Stands in for the op's collective entry points; counts elements sent."""

    def __init__(self):
        self.calls = []

    def all_to_all(self, x, group):
        D = group.world_size
        if D > 1:
            self.calls.append(("all_to_all", D, tuple(x.shape), x.numel() * (D - 1) // D))
        return x.new_empty(x.shape)

    def reduce_scatter(self, x, group):
        k = group.world_size
        if k == 1:
            return x
        self.calls.append(("reduce_scatter", k, tuple(x.shape), x.numel() * (k - 1) // k))
        return x.new_empty((x.shape[0] // k, *x.shape[1:]))

    def all_gather(self, x, group):
        P = group.world_size
        if P == 1:
            return x
        self.calls.append(("all_gather", P, tuple(x.shape), x.numel() * (P - 1)))
        return x.new_empty((x.shape[0] * P, *x.shape[1:]))


def _stub(world_size, rank, name):
    return SimpleNamespace(world_size=world_size, rank_in_group=rank, unique_name=name)


def measure_flashcomm2_elements(a, h, P, k, tokens, tp_rank=0):
    """Per collective, elements this TP rank sends for each token count (real op, meta)."""
    from unittest import mock

    import torch

    import vllm_ascend_ext.ops.flashcomm2_oproj as op_mod

    D = P // k
    j, i = divmod(tp_rank, D)
    with torch.device("meta"):
        layer = op_mod.FlashComm2RowParallelLinear(
            a, h, bias=False, params_dtype=torch.bfloat16,
            prefix="model.layers.0.self_attn.o_proj",
            tp_group=_stub(P, tp_rank, "tp"), otp_group=_stub(k, j, "otp"),
            odp_group=_stub(D, i, "odp"),
        )
    layer.quant_method.process_weights_after_loading(layer)  # meta: plain F.linear
    out = {}
    for T in tokens:
        rec = _Recorder()
        with mock.patch.object(op_mod, "all_to_all_dim0", rec.all_to_all), \
                mock.patch.object(op_mod, "reduce_scatter_dim0", rec.reduce_scatter), \
                mock.patch.object(op_mod, "all_gather_dim0", rec.all_gather):
            y, _ = layer(torch.empty(T, a // P, dtype=torch.bfloat16, device="meta"))
        assert tuple(y.shape) == (T, h), y.shape
        per = {"all_to_all": 0, "reduce_scatter": 0, "all_gather": 0}
        for name, _, _, n in rec.calls:
            per[name] += n
        out[T] = per
    return out


def formula_flashcomm2_elements(a, h, P, k, T):
    """FACTS.md's FlashComm2 volume (elements), generalised to k (exact when P | T)."""
    D = P // k
    return {
        "all_to_all": (D - 1) / D * T * (a / P),
        "reduce_scatter": (k - 1) * T / P * h,
        "all_gather": (P - 1) / P * T * h,
    }


def _worker(rank, world_size, P, ks, tokens):
    return {
        name: {k: measure_flashcomm2_elements(a, h, P, k, tokens) for k in ks}
        for name, (a, h) in MODELS.items()
    }


def build_report(measured, P, ks, tokens):
    rows = []
    for name, (a, h) in MODELS.items():
        for wire, b in WIRE_BYTES.items():
            for T in tokens:
                row = {
                    "model": name, "a": a, "h": h, "P": P, "wire": wire,
                    "bytes_per_element": b, "tokens": T,
                    "tp_allreduce": 2 * (P - 1) / P * T * h * b,
                    "fc1_reduce_scatter": (P - 1) / P * T * h * b,
                    "fc1_total": 2 * (P - 1) / P * T * h * b,
                }
                for k in ks:
                    m = measured[name][k][T]
                    f = formula_flashcomm2_elements(a, h, P, k, T)
                    total = sum(m.values()) * b
                    row[f"fc2_k{k}"] = {
                        "measured": {c: n * b for c, n in m.items()},
                        "measured_total": total,
                        "formula": {c: v * b for c, v in f.items()},
                        "formula_total": sum(f.values()) * b,
                        "vs_tp_allreduce": total / row["tp_allreduce"],
                        "all_to_all_vs_fc1_reduce_scatter":
                            m["all_to_all"] * b / row["fc1_reduce_scatter"],
                    }
                rows.append(row)
    summary = {}
    for name, (a, h) in MODELS.items():
        for k in ks:
            for wire, b in WIRE_BYTES.items():
                # saving per token vs plain TP (large T, P | T), and the o_shared
                # weight broadcast per layer (weights in the same width as `wire`)
                saving_per_token = (2 * (P - 1) / P * h - sum(
                    formula_flashcomm2_elements(a, h, P, k, 1).values())) * b
                w_bytes = a * h // k * b
                summary[f"{name} k={k} {wire}"] = {
                    "saving_per_token_vs_tp_bytes": saving_per_token,
                    "oshared_broadcast_per_layer_bytes": w_bytes,
                    "oshared_break_even_tokens":
                        (w_bytes / saving_per_token) if saving_per_token > 0 else None,
                    "all_to_all_vs_fc1_reduce_scatter_ratio": (P // k - 1) / (P // k)
                    * (a / P) / ((P - 1) / P * h),
                }
    return {"tp_size": P, "otp_sizes": list(ks), "models": {
        n: {"a": a, "h": h} for n, (a, h) in MODELS.items()}, "rows": rows,
        "summary": summary}


def _mib(x):
    return x / (1 << 20)


def markdown(report, show_tokens):
    P = report["tp_size"]
    ks = report["otp_sizes"]
    lines = [f"# o_proj communication per layer, bytes sent per rank (P={P})", ""]
    head = "| model | wire | T | plain TP all-reduce | FC1 RS (+AG) | " + " | ".join(
        f"FC2 k={k} measured (a2a / rs / ag) | k={k} formula | k={k} vs TP" for k in ks
    ) + " |"
    lines += [head, "|" + "---|" * (5 + 3 * len(ks))]
    for r in report["rows"]:
        if r["tokens"] not in show_tokens:
            continue
        cells = [r["model"], r["wire"], str(r["tokens"]),
                 f"{_mib(r['tp_allreduce']):.3f} MiB",
                 f"{_mib(r['fc1_reduce_scatter']):.3f} MiB (x2)"]
        for k in ks:
            f = r[f"fc2_k{k}"]
            m = f["measured"]
            cells += [
                f"{_mib(f['measured_total']):.3f} MiB ({_mib(m['all_to_all']):.3f} / "
                f"{_mib(m['reduce_scatter']):.3f} / {_mib(m['all_gather']):.3f})",
                f"{_mib(f['formula_total']):.3f} MiB",
                f"{f['vs_tp_allreduce']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| setting | FC2 saving / token vs TP | o_shared broadcast / layer | "
              "break-even tokens | a2a / FC1 RS |", "|---|---|---|---|---|"]
    for key, s in report["summary"].items():
        be = s["oshared_break_even_tokens"]
        lines.append(
            f"| {key} | {s['saving_per_token_vs_tp_bytes']:.0f} B | "
            f"{_mib(s['oshared_broadcast_per_layer_bytes']):.0f} MiB | "
            f"{'n/a' if be is None else f'{be:.0f}'} | "
            f"{s['all_to_all_vs_fc1_reduce_scatter_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench_comm_volume.json")
    ap.add_argument("--tp", type=int, default=16)
    ap.add_argument("--otp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    args = ap.parse_args(argv)

    # One spawned process with vLLM's (TP=1) state: vLLM parameters need it to
    # exist; the op itself gets stub groups of size P.
    measured = run_distributed(_worker, 1, args.tp, tuple(args.otp), tuple(args.tokens),
                               timeout=300)[0]
    report = build_report(measured, args.tp, args.otp, args.tokens)

    # The op's counts must equal the formula whenever P divides T (no padding).
    worst = 0.0
    for r in report["rows"]:
        if r["tokens"] % args.tp == 0:
            for k in args.otp:
                f = r[f"fc2_k{k}"]
                worst = max(worst, abs(f["measured_total"] - f["formula_total"])
                            / f["formula_total"])
    report["max_rel_gap_measured_vs_formula_when_P_divides_T"] = worst

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    show = [t for t in (1, 16, 1000, 1024, 4096, 16384) if t in args.tokens]
    md = markdown(report, set(args.tokens))
    out.with_suffix(".md").write_text(md)
    print(markdown(report, set(show)))
    print(f"measured vs formula (P | T): max relative gap {worst:.2e}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if worst > 1e-12:
        raise SystemExit("the op's measured volume disagrees with the formula")


if __name__ == "__main__":
    main()
