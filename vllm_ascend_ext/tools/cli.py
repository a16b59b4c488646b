"""``vllm-ascend-ext`` command line: tiny checkpoints and the capacity planner."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(args: argparse.Namespace) -> int:
    from vllm_ascend_ext.tools.tiny_models.factory import SPECS, make_tiny_checkpoint

    if args.all:
        from pathlib import Path

        for arch in SPECS:
            print(make_tiny_checkpoint(arch, Path(args.out) / arch, force=args.force,
                                       num_hidden_layers=args.layers,
                                       hidden_size=args.hidden_size, train=not args.random))
        return 0
    if not args.arch:
        print("error: give ARCH or --all", file=sys.stderr)
        return 2
    print(make_tiny_checkpoint(args.arch, args.out, force=args.force,
                               num_hidden_layers=args.layers, hidden_size=args.hidden_size,
                               train=not args.random))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vllm_ascend_ext.tools.tiny_models.factory import NUM_HIDDEN_LAYERS, SHORT_NAMES

    ap = argparse.ArgumentParser(prog="vllm-ascend-ext")
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-tiny", help="write a tiny real checkpoint + tokenizer")
    mk.add_argument("arch", nargs="?", help=f"one of {sorted(SHORT_NAMES)} or a class name")
    mk.add_argument("out", help="output folder (with --all: a root folder)")
    mk.add_argument("--all", action="store_true", help="write every architecture under OUT")
    mk.add_argument("--layers", type=int, default=NUM_HIDDEN_LAYERS)
    mk.add_argument("--hidden-size", type=int, default=None)
    mk.add_argument("--force", action="store_true")
    mk.add_argument("--random", action="store_true",
                    help="keep the random init instead of training briefly on the shipped "
                         "corpus (training, the default, takes about 15-45 s per model on "
                         "2 cores; a random model answers with byte soup)")
    mk.set_defaults(func=_make_tiny)

    from vllm_ascend_ext.tools.planner.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
