"""Ctrl-C on `rlr-dist train` (a real process with its own local Ray): exit 130 with the resume command, the
MLflow run marked KILLED; `--resume` then finishes the run with every iteration logged once."""
import json
from pathlib import Path

import pytest

from rlr_dist.bench.faults import interrupt_then_resume

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_ctrl_c_marks_the_run_killed_and_resume_finishes_it_without_repeats(tmp_path):
    from mlflow.tracking import MlflowClient

    from rlr_dist.models.tiny import build_tiny

    model = build_tiny("pixel", tmp_path / "model")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "model": {"path": str(model), "num_inference_steps": 4}, "estimator": {"name": "rlr", "h": 1},
        "reward": {"name": "brightness"}, "data": {"prompts": ["zero", "one"]},
        "train": {"iterations": 12, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
        "cluster": {"num_cpus": 3, "samplers": {"count": 1, "num_cpus": 0.5}, "rewards": {"count": 1, "num_cpus": 0.5},
                    "learners": {"count": 1, "num_cpus": 0.5}},
        "checkpoint": {"every": 1}}))
    # 12 iterations of ~1 s: the interrupt after iteration 2 lands mid-run even on a loaded machine (with 5, a
    # run on a machine busy with other jobs finished before the signal arrived)
    r = interrupt_then_resume(str(cfg), [], tmp_path, after_iteration=2)
    assert r["exit_code"] == 130, r["printed"][-2000:]
    hint = next(line for line in r["printed"].splitlines() if line.strip().startswith("rlr-dist train"))
    assert hint.split()[2] == str(cfg) and hint.split()[-1] == "--resume" and "marked KILLED" in r["printed"]
    assert r["status_after_interrupt"] == "KILLED"
    run = json.loads((tmp_path / "interrupted" / "run.json").read_text())
    assert r["resume_exit_code"] == 0, r["resume_output"][-3000:]
    assert r["status_after_resume"] == "FINISHED" and r["duplicates"] == 0 and r["steps"] == list(range(1, 13))
    assert r["lineage"][-1][1] >= 2 and r["lineage"][-1][2].startswith("checkpoint_")  # not from scratch
    assert MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).data.tags["rlr.estimator"].startswith("rlr")
