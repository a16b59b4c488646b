"""Try vLLM's multi-node launch on one machine (root, iproute2).

    python -m vllm_ascend_ext.tools.multinode MODEL [--tp 2] [--layout tp|dp]
        [--link-rate 400mbit] [--env K=V ...] [--head-env K=V ...]
        [--worker-env K=V ...] [--head-arg ARG ...] [--worker-arg ARG ...]

Creates two emulated hosts (network namespaces + a veth pair, private
/dev/shm each), starts ``vllm serve`` on both as vLLM's multi-node launch
(host 1 headless), prints a loopback URL for the head's API server and, on
Ctrl-C, the bytes that crossed the link; then removes everything.
``--env`` goes to both hosts, ``--head-env`` / ``--worker-env`` to one.
"""

from __future__ import annotations

import argparse
import sys
import time


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from vllm_ascend_ext.tools.multinode.netns import TwoHosts
    from vllm_ascend_ext.tools.multinode.serve import TwoHostServer

    p = argparse.ArgumentParser(prog="python -m vllm_ascend_ext.tools.multinode",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layout", choices=("tp", "dp"), default="tp")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--link-rate", default=None, help="tc rate, e.g. 400mbit (default: unshaped)")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--head-env", action="append", default=[])
    p.add_argument("--worker-env", action="append", default=[])
    p.add_argument("--head-arg", action="append", default=[])
    p.add_argument("--worker-arg", action="append", default=[])
    args = p.parse_args(argv)
    both = _pairs(args.env)
    with TwoHosts(rate=args.link_rate) as hosts:
        server = TwoHostServer(hosts, args.model, tp=args.tp, layout=args.layout,
                               dtype=args.dtype,
                               head_env={**both, **_pairs(args.head_env)},
                               worker_env={**both, **_pairs(args.worker_env)},
                               head_args=args.head_arg, worker_args=args.worker_arg)
        print(f"hosts: {hosts.head.address} ({hosts.head.namespace}), "
              f"{hosts.worker.address} ({hosts.worker.namespace}); link "
              f"{args.link_rate or 'unshaped'}; starting ...", flush=True)
        start = None
        try:
            server.start()
            start = hosts.counters()
            print(f"serving: {server.base_url}/v1 (Ctrl-C stops); logs: "
                  f"{server.processes[0].log_path}, {server.processes[1].log_path}",
                  flush=True)
            while not server.any_exited():
                time.sleep(1)
            print("a host exited:\n" + server.log_tails(), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if start is None:
                return 130
            used = hosts.counters() - start
            print(f"\nlink bytes while serving: head sent {used.sent}, "
                  f"received {used.received}")
            return 0
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
