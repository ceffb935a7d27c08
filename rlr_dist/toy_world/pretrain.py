"""``rlr-dist pretrain ...``: train the toy world's models (:mod:`rlr_dist.toy_world.train`) or measure them
and write the report (:mod:`rlr_dist.toy_world.report`)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlr_dist.toy_world.train import default_asset_dir, pretrain_classifiers, pretrain_model


def main(argv_args) -> int:
    """Entry point of ``rlr-dist pretrain`` (``argv_args``: the parsed argparse namespace)."""
    a = argv_args
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = "rlr-dist " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("rlr-dist") else None
    if a.what in ("digits", "moving-digits", "digits-flow"):
        out = Path(a.out) if a.out else default_asset_dir(a.what)
        pretrain_model(a.what, out, a.steps, a.seed, a.batch_size, log_every=a.log_every, command=cmd)
        if a.what == "digits" and not a.no_classifiers:
            pretrain_classifiers(out.parent, a.classifier_steps, a.seed,
                                 command=f"rlr-dist pretrain classifiers --steps {a.classifier_steps} --seed {a.seed}")
    elif a.what == "classifiers":
        pretrain_classifiers(a.out, a.steps or a.classifier_steps, a.seed, command=cmd)
    elif a.what == "report":
        from rlr_dist.toy_world.report import write_report

        write_report(assets=a.out, doc=a.doc, images=a.images, per_class=a.per_class, seed=a.seed)
    else:  # argparse restricts the choices
        raise ValueError(a.what)
    return 0
