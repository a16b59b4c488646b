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

Wire modes, all measured from the op (bytes = elements x the dtype the op
really hands each collective):

* ``bf16``: bf16 activations everywhere (FlashComm2's default for
  unquantized o_projs);
* ``int8 a2a static``: a W8A8 o_proj with a static per-tensor input scale:
  the all-to-all carries int8, nothing else changes;
* ``int8 a2a dynamic``: per-token scales: int8 all-to-all plus an
  all-reduce(MAX) of one fp32 per padded token over the ODP group (ring:
  2 (D-1)/D of the input), so every rank agrees on the scales first.

The reduce-scatter and all-gather carry the o_proj output (bf16) in every
mode.
o_shared adds one broadcast per layer of the o_proj shard, W = a h / k bytes-per-
weight; the break-even token count is where FlashComm2's saving over plain TP
reaches W.

Writes JSON to ``--out`` and a Markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from _world import run_world, write_results

MODELS = {
    # name: (a = heads x v_head_dim, h = hidden size)
    "DeepSeek-V3": (128 * 128, 7168),
    "Qwen3-235B-A22B": (64 * 128, 4096),
}
#: wire mode -> (int8 all-to-all route, or None; bytes of the o_proj weight)
WIRE_MODES = {"bf16": (None, 2), "int8 a2a static": ("static", 1),
              "int8 a2a dynamic": ("dynamic", 1)}
COLLECTIVES = ("all_to_all", "scale_all_reduce", "reduce_scatter", "all_gather")
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1024, 2048, 3000, 4096,
                  8192, 16384]


class _Recorder:
    """Stands in for the op's collective entry points; counts bytes sent."""

    def __init__(self):
        self.calls = []

    def _note(self, name, x, sent_elements):
        self.calls.append((name, tuple(x.shape), str(x.dtype), sent_elements * x.element_size()))

    def all_to_all(self, x, group):
        D = group.world_size
        if D > 1:
            self._note("all_to_all", x, x.numel() * (D - 1) // D)
        return x.new_empty(x.shape)

    def all_reduce_max(self, x, group):
        D = group.world_size
        if D > 1:  # ring all-reduce: reduce-scatter + all-gather
            self._note("scale_all_reduce", x, 2 * x.numel() * (D - 1) // D)
        return x.new_empty(x.shape)

    def reduce_scatter(self, x, group):
        k = group.world_size
        if k == 1:
            return x
        self._note("reduce_scatter", x, x.numel() * (k - 1) // k)
        return x.new_empty((x.shape[0] // k, *x.shape[1:]))

    def all_gather(self, x, group):
        P = group.world_size
        if P == 1:
            return x
        self._note("all_gather", x, x.numel() * (P - 1))
        return x.new_empty((x.shape[0] * P, *x.shape[1:]))


def _stub(world_size, rank, name):
    return SimpleNamespace(world_size=world_size, rank_in_group=rank, unique_name=name)


def _int8_route(scheme, h):
    """A W8A8 o_proj's int8 route on meta tensors: the op's own quantization
    code runs; only the matmul is a shape."""
    import torch

    from vllm_ascend_ext.ops.int8_all_to_all import Int8Input

    def matmul(layer, x_q, x_s, bias, out_dtype):
        assert x_q.dtype == torch.int8
        return torch.empty(x_q.shape[0], h, dtype=out_dtype, device=x_q.device)

    static_q = (lambda layer, x: x.to(torch.int8)) if scheme == "static" else None
    return Int8Input(f"meta-{scheme}", scheme == "dynamic", static_q, matmul)


def measure_flashcomm2_bytes(a, h, P, k, tokens, scheme=None, tp_rank=0):
    """Per collective, bytes this TP rank sends for each token count (real op, meta)."""
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
            odp_group=_stub(D, i, "odp"), int8_all_to_all=scheme is not None,
        )
    layer.quant_method.process_weights_after_loading(layer)  # meta: plain F.linear
    route = None if scheme is None else _int8_route(scheme, h)
    out = {}
    for T in tokens:
        rec = _Recorder()
        with mock.patch.object(op_mod, "all_to_all_dim0", rec.all_to_all), \
                mock.patch.object(op_mod, "all_reduce_max", rec.all_reduce_max), \
                mock.patch.object(op_mod, "reduce_scatter_dim0", rec.reduce_scatter), \
                mock.patch.object(op_mod, "all_gather_dim0", rec.all_gather), \
                mock.patch.object(op_mod, "int8_input_of", lambda _layer: route):
            y, _ = layer(torch.empty(T, a // P, dtype=torch.bfloat16, device="meta"))
        assert tuple(y.shape) == (T, h), y.shape
        per = dict.fromkeys(COLLECTIVES, 0)
        for name, _, _, n in rec.calls:
            per[name] += n
        out[T] = per
    return out


def formula_flashcomm2_bytes(a, h, P, k, T, scheme=None):
    """FACTS.md's FlashComm2 volume in bytes (bf16 output), generalised to k and
    to the int8 all-to-all (exact when P | T)."""
    D = P // k
    a2a_b = 2 if scheme is None else 1
    return {
        "all_to_all": (D - 1) / D * T * (a / P) * a2a_b,
        "scale_all_reduce": 2 * (D - 1) / D * T * 4 if scheme == "dynamic" else 0.0,
        "reduce_scatter": (k - 1) * T / P * h * 2,
        "all_gather": (P - 1) / P * T * h * 2,
    }


def _worker(rank, world_size, P, ks, tokens):
    return {
        name: {k: {mode: measure_flashcomm2_bytes(a, h, P, k, tokens, scheme)
                   for mode, (scheme, _) in WIRE_MODES.items()} for k in ks}
        for name, (a, h) in MODELS.items()
    }


def build_report(measured, P, ks, tokens):
    rows = []
    b = 2  # bf16 hidden states around o_proj
    for name, (a, h) in MODELS.items():
        for mode, (scheme, _) in WIRE_MODES.items():
            for T in tokens:
                row = {
                    "model": name, "a": a, "h": h, "P": P, "wire": mode, "tokens": T,
                    "tp_allreduce": 2 * (P - 1) / P * T * h * b,
                    "fc1_reduce_scatter": (P - 1) / P * T * h * b,
                    "fc1_total": 2 * (P - 1) / P * T * h * b,
                }
                for k in ks:
                    m = measured[name][k][mode][T]
                    bf16 = measured[name][k]["bf16"][T]
                    f = formula_flashcomm2_bytes(a, h, P, k, T, scheme)
                    total = sum(m.values())
                    a2a_total = m["all_to_all"] + m["scale_all_reduce"]
                    row[f"fc2_k{k}"] = {
                        "measured": m,
                        "measured_total": total,
                        "formula": f,
                        "formula_total": sum(f.values()),
                        "vs_tp_allreduce": total / row["tp_allreduce"],
                        "all_to_all_vs_bf16_all_to_all":
                            a2a_total / bf16["all_to_all"] if bf16["all_to_all"] else None,
                        "all_to_all_vs_fc1_reduce_scatter":
                            a2a_total / row["fc1_reduce_scatter"],
                    }
                rows.append(row)
    summary = {}
    for name, (a, h) in MODELS.items():
        for k in ks:
            for mode, (scheme, wb) in WIRE_MODES.items():
                # saving per token vs plain TP (large T, P | T), and the o_shared
                # weight broadcast per layer (bf16 weights, int8 for W8A8)
                saving_per_token = 2 * (P - 1) / P * h * b - sum(
                    formula_flashcomm2_bytes(a, h, P, k, 1, scheme).values())
                w_bytes = a * h // k * wb
                f = formula_flashcomm2_bytes(a, h, P, k, 1, scheme)
                f16 = formula_flashcomm2_bytes(a, h, P, k, 1, None)
                summary[f"{name} k={k} {mode}"] = {
                    "saving_per_token_vs_tp_bytes": saving_per_token,
                    "oshared_broadcast_per_layer_bytes": w_bytes,
                    "oshared_break_even_tokens":
                        (w_bytes / saving_per_token) if saving_per_token > 0 else None,
                    "all_to_all_vs_bf16_all_to_all_ratio":
                        (f["all_to_all"] + f["scale_all_reduce"]) / f16["all_to_all"],
                    "all_to_all_vs_fc1_reduce_scatter_ratio":
                        (f["all_to_all"] + f["scale_all_reduce"]) / ((P - 1) / P * h * b),
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
        f"FC2 k={k} measured (a2a + scales / rs / ag) | k={k} formula | k={k} vs TP | "
        f"k={k} a2a vs bf16 a2a" for k in ks
    ) + " |"
    lines += [head, "|" + "---|" * (5 + 4 * len(ks))]
    for r in report["rows"]:
        if r["tokens"] not in show_tokens:
            continue
        cells = [r["model"], r["wire"], str(r["tokens"]),
                 f"{_mib(r['tp_allreduce']):.3f} MiB",
                 f"{_mib(r['fc1_reduce_scatter']):.3f} MiB (x2)"]
        for k in ks:
            f = r[f"fc2_k{k}"]
            m = f["measured"]
            ratio = f["all_to_all_vs_bf16_all_to_all"]
            cells += [
                f"{_mib(f['measured_total']):.3f} MiB ({_mib(m['all_to_all']):.3f} + "
                f"{_mib(m['scale_all_reduce']):.4f} / {_mib(m['reduce_scatter']):.3f} / "
                f"{_mib(m['all_gather']):.3f})",
                f"{_mib(f['formula_total']):.3f} MiB",
                f"{f['vs_tp_allreduce']:.3f}",
                "n/a" if ratio is None else f"{ratio:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| setting | FC2 saving / token vs TP | o_shared broadcast / layer | "
              "break-even tokens | a2a vs bf16 a2a | a2a / FC1 RS |", "|---|---|---|---|---|---|"]
    for key, s in report["summary"].items():
        be = s["oshared_break_even_tokens"]
        lines.append(
            f"| {key} | {s['saving_per_token_vs_tp_bytes']:.0f} B | "
            f"{_mib(s['oshared_broadcast_per_layer_bytes']):.0f} MiB | "
            f"{'n/a' if be is None else f'{be:.0f}'} | "
            f"{s['all_to_all_vs_bf16_all_to_all_ratio']:.3f} | "
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
    measured = run_world(_worker, 1, args.tp, tuple(args.otp), tuple(args.tokens),
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

    # The planner's figures for the same layouts must be the op's (P | T).
    from vllm_ascend_ext.tools.planner.model import comm_per_layer
    from vllm_ascend_ext.tools.planner.shapes import ModelShape

    worst_plan = 0.0
    for r in report["rows"]:
        if r["tokens"] % args.tp:
            continue
        for k in args.otp:
            shape = ModelShape(r["model"], "", 1, r["h"], r["a"], 1)  # a = heads x 1
            plan = comm_per_layer(shape, args.tp, k, 2, r["tokens"],
                                  int8_all_to_all=WIRE_MODES[r["wire"]][0] or "off")
            got = r[f"fc2_k{k}"]["measured_total"]
            worst_plan = max(worst_plan, abs(plan["fc2_total"] - got) / got)
    report["max_rel_gap_measured_vs_planner_when_P_divides_T"] = worst_plan
    show = [t for t in (1, 16, 1000, 1024, 4096, 16384) if t in args.tokens]
    side = write_results(args.out, report, markdown(report, set(args.tokens)),
                         suffix=".md", indent=1)
    print(markdown(report, set(show)))
    print(f"measured vs formula (P | T): max relative gap {worst:.2e}")
    print(f"measured vs planner (P | T): max relative gap {worst_plan:.2e}")
    print(f"wrote {args.out} and {side}")
    if worst > 1e-12:
        raise SystemExit("the op's measured volume disagrees with the formula")
    if worst_plan > 1e-12:
        raise SystemExit("the op's measured volume disagrees with the planner")


if __name__ == "__main__":
    main()
