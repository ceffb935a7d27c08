"""The estimator study's machinery: validation before anything runs, and a two-cell study end to end."""
import csv
import json

import pytest

from rlr_dist.bench.study import load_study, main
from rlr_dist.config import ConfigError

BASE = "digits.yaml"


def _write(tmp_path, body: str):
    (tmp_path / BASE).write_text((__import__("pathlib").Path(__file__).parents[1] / "jobs/configs" / BASE).read_text())
    p = tmp_path / "study.yaml"
    p.write_text(body)
    return p


def test_study_file_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\.bad"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {bad: {h: 2}}\n"))
    with pytest.raises(ConfigError, match=r"methods\.rlr with regularisers\.none: estimator\.hh"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {rlr: {name: rlr, hh: 2}}\n"))
    with pytest.raises(ConfigError, match=r"base: .*nope.yaml does not exist"):
        load_study(_write(tmp_path, "base: nope.yaml\nmethods: {rlr: {name: rlr}}\n"))


def test_shipped_study_resolves_every_cell():
    study, cells = load_study("jobs/configs/study-digits.yaml")
    assert len(cells) == len(study.methods) * len(study.regularisers) * len(study.seeds) >= 7 * 2 * 3


def test_tiny_study_writes_table_csv_and_plot(tmp_path):
    p = _write(tmp_path, """base: digits.yaml
overrides: ["--train.iterations=2", "--train.samples_per_prompt=4", "--model.num_inference_steps=5"]
methods: {rlr_h2: {name: rlr, h: 2}, tbp_k1: {name: truncated_bp, K: 1}}
regularisers: {kl: {name: kl_exact, beta: 0.1}}
seeds: [0]
eval_every: 1
eval_samples: 8
workers: 1
gradient_draws: 2
""")
    text = main(p, tmp_path / "out" / "study.md")
    assert "| kl | rlr_h2 |" in text and "| kl | tbp_k1 |" in text
    rows = list(csv.DictReader(open(tmp_path / "out" / "study.csv")))
    assert [r["method"] for r in rows] == ["rlr_h2", "tbp_k1"]
    assert all(r["queries"] == "8" and 0.0 <= float(r["heldout"]) <= 1.0 and float(r["kl"]) > 0 for r in rows)
    # the truncated method keeps one step's activations, RLR h=2 at least the block's two
    assert float(rows[0]["peak_activation_mb"]) > float(rows[1]["peak_activation_mb"]) > 0
    res = json.loads((tmp_path / "out" / "study.json").read_text())["results"]
    assert [c["queries"] for c in res[0]["curve"]] == [4, 8]
    assert (tmp_path / "out" / "study.png").stat().st_size > 1000
    # gradient estimates at the pretrained weights: one row per method, cosines against itself = 1
    grads = text.split("## Gradient estimates")[1]
    assert "| rlr_h2 |" in grads and "| tbp_k1 |" in grads and "1 (itself)" in grads
    again = main(p, tmp_path / "out" / "study.md", reuse=True)  # the training runs are not repeated
    assert again.split("## Gradient estimates")[0].split("Base config")[1] == text.split("## Gradient estimates")[0].split("Base config")[1]
