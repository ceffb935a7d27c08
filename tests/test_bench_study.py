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
    with pytest.raises(ConfigError, match=r"only\.lr: names no method"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {rlr: {name: rlr}}\nonly: {lr: [none]}\n"))
    with pytest.raises(ConfigError, match=r"only\.rlr: must list some of the regularisers"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {rlr: {name: rlr}}\nonly: {rlr: [kl]}\n"))
    with pytest.raises(ConfigError, match=r"base: .*nope.yaml does not exist"):
        load_study(_write(tmp_path, "base: nope.yaml\nmethods: {rlr: {name: rlr}}\n"))


def test_shipped_study_resolves_every_cell():
    study, cells = load_study("jobs/configs/study-digits.yaml")
    skipped = sum(len(study.regularisers) - len(regs) for regs in study.only.values())
    assert len(cells) == (len(study.methods) * len(study.regularisers) - skipped) * len(study.seeds) >= 9 * 2 * 3 - 3
    assert {c["regulariser"] for c in cells if c["method"] == "rlr_release"} == {"none"}
    study, cells = load_study("jobs/configs/study-blackbox.yaml")
    assert len(cells) == len(study.methods) * len(study.seeds) and "rlr_bb_value" in study.methods


@pytest.mark.e2e
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
    again = main(p, tmp_path / "out" / "study.md", reuse=True)  # neither the training runs nor the gradients repeated
    assert again.split("## Gradient estimates")[0].split("Base config")[1] == text.split("## Gradient estimates")[0].split("Base config")[1]
    assert again.split("## Gradient estimates")[1] == text.split("## Gradient estimates")[1]
    assert json.loads((tmp_path / "out" / "study.json").read_text())["meta"]["gradient_rows_reused"] == 2
    # a method added later: only its cells run (and only with the regulariser `only` allows), the others are kept
    body = p.read_text().replace("tbp_k1: {name: truncated_bp, K: 1}}",
                                 "tbp_k1: {name: truncated_bp, K: 1}, rlr_value: {name: rlr, h: 2, baseline: value},"
                                 " rlr_release: {name: rlr_release}}")
    p.write_text(body.replace("regularisers: {kl: {name: kl_exact, beta: 0.1}}",
                              "regularisers: {kl: {name: kl_exact, beta: 0.1}, none: {name: none}}\n"
                              "only: {rlr_h2: [kl], tbp_k1: [kl], rlr_release: [none]}\ngradient_warmup: 2\n"
                              "compare_to: rlr_h2"))
    grown = main(p, tmp_path / "out" / "study.md", reuse=True)
    # gradient_warmup changed: every gradient row is redone
    assert json.loads((tmp_path / "out" / "study.json").read_text())["meta"]["gradient_rows_reused"] == 0
    rows2 = list(csv.DictReader(open(tmp_path / "out" / "study.csv")))
    assert [(r["regulariser"], r["method"]) for r in rows2] == [
        ("kl", "rlr_h2"), ("kl", "tbp_k1"), ("kl", "rlr_value"), ("none", "rlr_value"), ("none", "rlr_release")]
    assert rows2[:2] == rows  # taken from the first run, not run again
    grads = grown.split("## Gradient estimates")[1]
    assert "| rlr_value |" in grads and "tr Cov / tr Cov(rlr_h2) |" in grads
    assert [line.rsplit("|", 2)[-2].strip() for line in grads.splitlines() if line.startswith("| rlr_h2 |")] == ["1"]


def test_variants_must_be_override_lists(tmp_path):
    with pytest.raises(ConfigError, match=r"variants\.w"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {rlr: {name: rlr}}\nvariants: {w: 'kind: all'}\n"))
    with pytest.raises(ConfigError, match=r"methods\.rlr with regularisers\.none and variants\.bad: model\.nope"):
        load_study(_write(tmp_path, "base: digits.yaml\nmethods: {rlr: {name: rlr}}\n"
                                    "variants: {ok: [], bad: ['--model.nope=1']}\n"))


def test_shipped_flow_study_crosses_windows_with_methods():
    study, cells = load_study("jobs/configs/study-flow.yaml")
    assert len(cells) == len(study.methods) * len(study.variants) * len(study.seeds) >= 5 * 3 * 3
    windows = {c["variant"]: [o for o in c["overrides"] if o.startswith("--model.flow.window")] for c in cells}
    assert len({tuple(w) for w in windows.values()}) == len(study.variants)


@pytest.mark.e2e
def test_flow_study_with_window_variants_keeps_the_reading(tmp_path):
    """Two SDE windows on the flow toy: a row and a gradient table per window; a rerun keeps the reading."""
    flow = __import__("pathlib").Path(__file__).parents[1] / "jobs/configs/digits-flow.yaml"
    (tmp_path / "digits-flow.yaml").write_text(flow.read_text())
    p = tmp_path / "study.yaml"
    p.write_text("""base: digits-flow.yaml
overrides: ["--train.iterations=2", "--train.samples_per_prompt=4", "--model.num_inference_steps=6"]
variants: {sde1: ["--model.flow.window={kind: random, length: 1, hi: 4}"], all: ["--model.flow.window={kind: all}"]}
methods: {rlr_h1: {name: rlr, h: 1, deterministic: absorb}, full_bp: {name: full_bp}}
regularisers: {kl: {name: kl_exact, beta: 0.3}}
seeds: [0]
eval_every: 2
eval_samples: 8
workers: 1
gradient_draws: 2
""")
    # a window the estimator cannot use (the last step alone: RLR has no stochastic j >= 2) stops the study first
    bad = tmp_path / "bad.yaml"
    bad.write_text(p.read_text().replace("length: 1, hi: 4", "length: 1"))
    with pytest.raises(ConfigError, match=r"methods\.rlr_h1 with regularisers\.kl and variants\.sde1: estimator: "
                                          r"no stochastic block start .* window random \[1\]"):
        load_study(bad)
    md = tmp_path / "out" / "study.md"
    text = main(p, md)
    for row in ("| sde1 | kl | rlr_h1 |", "| sde1 | kl | full_bp |", "| all | kl | rlr_h1 |", "| all | kl | full_bp |"):
        assert row in text
    rows = list(csv.DictReader(open(tmp_path / "out" / "study.csv")))
    assert [(r["variant"], r["method"]) for r in rows] == [("sde1", "rlr_h1"), ("sde1", "full_bp"),
                                                            ("all", "rlr_h1"), ("all", "full_bp")]
    # the training KL sums over the stochastic steps only: one SDE step holds less of it than six; the chain KL
    # is taken with every step stochastic, so it is positive for every trained cell, and larger than the
    # training KL of one SDE step
    kl = {(r["variant"], r["method"]): float(r["kl"]) for r in rows}
    chain = {(r["variant"], r["method"]): float(r["kl_chain"]) for r in rows}
    assert 0 < kl[("sde1", "rlr_h1")] < kl[("all", "rlr_h1")]
    assert all(v > 0 for v in chain.values()) and chain[("sde1", "rlr_h1")] > kl[("sde1", "rlr_h1")]
    grads = text.split("## Gradient estimates")[1]
    assert grads.index("### variant `sde1`") < grads.index("### variant `all`") and grads.count("1 (itself)") == 2
    md.write_text(md.read_text() + "\n## Reading\n\nwritten by hand\n")
    main(p, md, reuse=True)
    assert md.read_text().rstrip().endswith("## Reading\n\nwritten by hand") and md.read_text().count("## Reading") == 1
