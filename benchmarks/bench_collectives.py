"""FlashComm2's all-to-all against an all-reduce of the same tensor, 2 gloo ranks.

    # two local ranks over 127.0.0.1
    .venv/bin/python benchmarks/bench_collectives.py --out results/bench_collectives.json
    # one rank per host (run both; rank 0 writes --out)
    GLOO_SOCKET_IFNAME=eth0 .venv/bin/python benchmarks/bench_collectives.py \\
        --rank 0 --world-size 2 --master-addr 10.0.0.1 --master-port 29511 --out r.json
    # (root) two emulated hosts (vllm_ascend_ext.tools.multinode.netns.TwoHosts),
    # their veth shaped to RATE each way
    .venv/bin/python benchmarks/bench_collectives.py --shaped-link 200mbit --out r.json

For each tensor size, in interleaved rounds (the order rotates each round),
the time until both ranks are done with:

* ``all_reduce``: ``dist.all_reduce`` of the tensor -- plain TP's collective
  across hosts (vLLM's shared-memory path does not span nodes);
* ``all_to_all_single``: gloo's own all-to-all of the tensor (half of it
  crosses the link each way at 2 ranks);
* ``ours``: ``torch.ops.vllm_ascend_ext.flashcomm2_all_to_all``, the op
  FlashComm2 runs (on gloo: the pairwise isend/irecv exchange).

Bytes per direction at P = 2: all-reduce N (ring: reduce-scatter N/2, then
all-gather N/2), all-to-all N/2.  Where gloo's interface is a real one
(``GLOO_SOCKET_IFNAME``, not loopback), rank 0 also reads its counters around
every op: the bytes that really crossed the link each way.  At bytes / rate the all-to-all takes 0.5 of
the all-reduce; the target (issue 21) is <= 0.6 on a shaped link.

``--cpu-shm`` (ranks on one host) also gives the two ranks vLLM CPU's
shared-memory communicator on their TP group, as a vLLM CPU worker on one node
has, and adds the one-host paths of the other collectives: the TP all-gather
through gloo vs through ours (shared memory), and vLLM's shared-memory
all-reduce next to gloo's.

Rank 0 writes JSON to ``--out`` and a Markdown table next to it (``.md``).
Medians per op; the per-round ratios' median and range are in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



# --------------------------------------------------------------------------
# one rank
# --------------------------------------------------------------------------


def _link_counters():
    """(tx, rx) bytes of gloo's interface, or None on loopback / no such
    interface (loopback also carries every other process's traffic)."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")
    stats = Path("/sys/class/net") / ifname / "statistics"
    if not ifname or ifname == "lo" or not stats.is_dir():
        return None
    return lambda: (int((stats / "tx_bytes").read_text()),
                    int((stats / "rx_bytes").read_text()))


def _timed_rounds(ops, rounds, warmup, barrier, counters=None):
    """({name: [seconds per round]}, {name: [(tx, rx) per round]}) with the
    op order rotated every round."""
    names = list(ops)
    times = {n: [] for n in names}
    wire = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            prepare, run = ops[name]
            prepare()
            barrier()
            before = counters() if counters else None
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                if counters:
                    after = counters()
                    wire[name].append((after[0] - before[0], after[1] - before[1]))
    return times, wire


def _rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # What vLLM's CPU worker sets before building groups (read if _C is loaded).
    os.environ["VLLM_DIST_IDENT"] = f"bench-collectives-{args.master_port}"
    if args.cpu_shm:
        from vllm.platforms import current_platform

        # The kernel build this CPU runs (AVX2, AVX-512), as vLLM's worker loads it.
        current_platform.import_kernels()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    init = f"tcp://{args.master_addr}:{args.master_port}"
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(
            world_size=args.world_size, rank=args.rank, distributed_init_method=init,
            local_rank=args.local_rank, backend="gloo",
        )
        ps.initialize_model_parallel(tensor_model_parallel_size=args.world_size,
                                     backend="gloo")
        # Not named tp*: vLLM gives it no shared-memory path, as for our ODP.
        group = ps.init_model_parallel_group(
            [list(range(args.world_size))], args.local_rank, "gloo",
            group_name="fc2c_bench_odp",
        )
    from vllm_ascend_ext.compat import cpu_shm_collectives
    from vllm_ascend_ext.distributed.communication import all_gather_dim0, all_to_all_dim0

    P, pg = group.world_size, group.device_group
    cpu_barrier = lambda: dist.barrier(group=group.cpu_group)  # noqa: E731
    dtype = getattr(torch, args.dtype)
    results = []
    for mib in args.sizes_mib:
        cols = 1024
        rows = max(P, int(mib * 2**20 / (cols * dtype.itemsize)) // P * P)
        x = torch.randn(rows, cols).to(dtype)
        red = torch.empty_like(x)
        out = torch.empty_like(x)
        ops = {
            "all_reduce": (lambda: red.copy_(x), lambda: dist.all_reduce(red, group=pg)),
            "all_to_all_single": (lambda: None,
                                  lambda: dist.all_to_all_single(out, x, group=pg)),
            "ours": (lambda: None, lambda: all_to_all_dim0(x, group)),
        }
        tp = ps.get_tp_group()
        shm = cpu_shm_collectives(tp) if args.cpu_shm else None
        if args.cpu_shm:
            if shm is None:
                raise SystemExit("--cpu-shm: vLLM gave the TP group no shared-memory path")
            part = x[: rows // P].contiguous()
            gathered = torch.empty_like(x)
            ops["all_gather gloo"] = (lambda: None, lambda: dist.all_gather_into_tensor(
                gathered, part, group=tp.device_group))
            ops["all_gather ours"] = (lambda: None, lambda: all_gather_dim0(part, tp))
            ops["all_reduce shm"] = (lambda: red.copy_(x), lambda: shm.all_reduce(red))
        counters = _link_counters()
        times, wire = _timed_rounds(ops, args.rounds, args.warmup, cpu_barrier, counters)
        # per round: the slower rank's time (the collective is done when both are)
        mine = torch.tensor([times[n] for n in ops], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group.cpu_group)
        per_op = {n: mine[i].tolist() for i, n in enumerate(ops)}
        med = {n: statistics.median(v) * 1e3 for n, v in per_op.items()}

        def ratio(a, b):
            rs = [p / q for p, q in zip(per_op[a], per_op[b])]
            return {"median_of_medians": med[a] / med[b], "per_round_median":
                    statistics.median(rs), "per_round_min": min(rs), "per_round_max": max(rs)}

        entry = {
            "mib": mib, "dtype": args.dtype, "shape": [rows, cols],
            "bytes_per_direction": {"all_reduce": x.nbytes * 2 * (P - 1) // P,
                                    "all_to_all": x.nbytes * (P - 1) // P},
            "median_ms": med,
            "ratio": {"ours / all_reduce": ratio("ours", "all_reduce"),
                      "all_to_all_single / all_reduce": ratio("all_to_all_single", "all_reduce"),
                      "ours / all_to_all_single": ratio("ours", "all_to_all_single")},
            "samples_ms": {n: [t * 1e3 for t in v] for n, v in per_op.items()},
        }
        if counters:
            # rank 0's interface, median over rounds; includes TCP/IP headers
            entry["link_bytes_rank0"] = {
                n: {"sent": statistics.median(t for t, _ in v),
                    "received": statistics.median(r for _, r in v)}
                for n, v in wire.items()}
        if args.cpu_shm:
            entry["ratio"]["all_gather ours / gloo"] = ratio("all_gather ours", "all_gather gloo")
            entry["ratio"]["all_reduce shm / gloo"] = ratio("all_reduce shm", "all_reduce")
        results.append(entry)
    group.destroy()
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()
    if args.rank == 0 and args.out:
        _write(args, results)


def _write(args, results) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "bench_collectives",
        "mode": args.mode_label,
        "link": args.link_label,
        "world_size": args.world_size,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "cpu": _cpu_name()},
        "sizes": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# bench_collectives: {args.mode_label}, link {args.link_label}, "
             f"{args.rounds} rounds", "",
             "| MiB | dtype | all_reduce ms | all_to_all_single ms | ours ms | "
             "ours / all_reduce | all_to_all_single / all_reduce |",
             "|---|---|---|---|---|---|---|"]
    for e in results:
        m, r = e["median_ms"], e["ratio"]
        lines.append(
            f"| {e['mib']} | {e['dtype']} | {m['all_reduce']:.2f} | "
            f"{m['all_to_all_single']:.2f} | {m['ours']:.2f} | "
            f"{r['ours / all_reduce']['per_round_median']:.3f} | "
            f"{r['all_to_all_single / all_reduce']['per_round_median']:.3f} |")
    if args.cpu_shm:
        lines += ["", "| MiB | all_gather gloo ms | all_gather ours (shm) ms | "
                  "all_reduce gloo ms | all_reduce shm ms |", "|---|---|---|---|---|"]
        for e in results:
            m = e["median_ms"]
            lines.append(f"| {e['mib']} | {m['all_gather gloo']:.3f} | "
                         f"{m['all_gather ours']:.3f} | {m['all_reduce']:.3f} | "
                         f"{m['all_reduce shm']:.3f} |")
    if any("link_bytes_rank0" in e for e in results):
        lines += ["", "Bytes over the link per op (rank 0 sent / received, median):", "",
                  "| MiB | " + " | ".join(results[0]["link_bytes_rank0"]) + " |",
                  "|---|" + "---|" * len(results[0]["link_bytes_rank0"])]
        for e in results:
            cells = [f"{v['sent'] / 2**20:.2f} / {v['received'] / 2**20:.2f} MiB"
                     for v in e["link_bytes_rank0"].values()]
            lines.append(f"| {e['mib']} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_cmd(args, rank, addr, port) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rank", str(rank),
           "--world-size", "2", "--master-addr", addr, "--master-port", str(port),
           "--rounds", str(args.rounds), "--warmup", str(args.warmup),
           "--dtype", args.dtype, "--mode-label", args.mode_label,
           "--link-label", args.link_label,
           "--sizes-mib", *[str(s) for s in args.sizes_mib]]
    if args.out and rank == 0:
        cmd += ["--out", str(Path(args.out).resolve())]
    if args.cpu_shm:
        cmd.append("--cpu-shm")
    return cmd


def _run_pair(cmds: list[list[str]], envs: list[dict], timeout: float) -> None:
    procs = [subprocess.Popen(c, env=e) for c, e in zip(cmds, envs)]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [p.returncode for p in procs if p.returncode]
    if bad:
        raise SystemExit(f"a rank failed with exit code(s) {bad}")


def _local(args) -> None:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmds = [_rank_cmd(args, r, "127.0.0.1", port) for r in range(2)]
    _run_pair(cmds, [env, env], args.timeout)


def _shaped(args) -> None:
    from vllm_ascend_ext.tools.multinode.netns import TwoHosts

    with TwoHosts(rate=args.shaped_link) as hosts:
        port = 29511
        cmds = [h.command(_rank_cmd(args, h.index, hosts.head.address, port))
                for h in hosts.hosts]
        envs = [dict(os.environ, OMP_NUM_THREADS="1", **h.env()) for h in hosts.hosts]
        _run_pair(cmds, envs, args.timeout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON results (rank 0); a .md table goes next to it")
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--cpu-shm", action="store_true",
                   help="ranks on one host: the TP group gets vLLM CPU's shared-memory path")
    p.add_argument("--shaped-link", metavar="RATE",
                   help="(root) run across two fresh namespaces, veth shaped to RATE")
    p.add_argument("--rank", type=int, help="run one rank (with --master-addr/--master-port)")
    p.add_argument("--local-rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29511)
    p.add_argument("--mode-label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--link-label", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.world_size != 2:
        p.error(f"--world-size: this benchmark runs 2 ranks, got {args.world_size}")
    if args.rounds < 1 or args.warmup < 0:
        p.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds}, {args.warmup}")
    if args.cpu_shm and args.shaped_link:
        p.error("--cpu-shm: shared memory is a one-host path; not with --shaped-link")
    if args.rank is not None:
        if args.rank not in (0, 1):
            p.error(f"--rank must be 0 or 1, got {args.rank}")
        args.mode_label = args.mode_label or "one rank per host"
        args.link_label = args.link_label or "as given (--master-addr)"
        _rank_main(args)
    elif args.shaped_link:
        args.mode_label = "two namespaces, shaped veth"
        args.link_label = f"tbf {args.shaped_link} each way, burst 64kb"
        _shaped(args)
    else:
        args.mode_label = "two local ranks" + (" with vLLM CPU shared memory"
                                                if args.cpu_shm else "")
        args.link_label = "loopback"
        _local(args)


if __name__ == "__main__":
    main()
