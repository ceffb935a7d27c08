"""The `rlr-dist` command."""
from __future__ import annotations

import argparse
import os
import sys


def _bench_estimators(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from rlr_dist.bench.estimators import main

    text = main(Ts=tuple(args.T), batches=args.batches, m=args.batch_size, memory=not args.no_memory,
                memory_T=args.memory_T, schedules=tuple(args.schedules), out=None if args.out == "-" else args.out)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlr-dist", description="RLR fine-tuning of diffusion models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bsub = bench.add_subparsers(dest="what", required=True)
    be = bsub.add_parser("estimators", help="variance, bias and activation memory of every estimator")
    be.add_argument("--T", type=int, nargs="+", default=[20, 50], help="chain lengths of the toy chain (default 20 50)")
    be.add_argument("--batches", type=int, default=2000, help="batch-mean gradients per estimator (default 2000)")
    be.add_argument("--batch-size", type=int, default=64, help="trajectories per batch (default 64)")
    be.add_argument("--memory-T", type=int, default=50, help="sampler steps of the UNet memory benchmark (default 50)")
    be.add_argument("--schedules", nargs="+", default=["logsnr", "sd"], choices=["logsnr", "sd"],
                    help="toy schedules: every T on logsnr, the largest T on the others (default: logsnr sd)")
    be.add_argument("--no-memory", action="store_true", help="skip the UNet activation-memory part")
    be.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 2 shared cores)")
    be.add_argument("--out", default="docs/results/estimators.md", help="report path, '-' for none")
    be.set_defaults(func=_bench_estimators)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
