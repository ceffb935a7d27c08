"""`rlr-dist bench scale --quick`: stand-in actors on a real multi-node local Ray cluster (about a minute)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from rlr_dist.bench.scale import main

    out = tmp_path_factory.mktemp("scale") / "scale.md"
    text, res = main(str(out), quick=True, command="rlr-dist bench scale --quick")
    return out, text, res


def test_stand_ins_ran_on_several_nodes(quick):
    _, _, res = quick
    for role in ("sampler", "reward", "learner"):
        assert len(set(res["nodes"][role])) >= 2, (role, res["nodes"][role])
    assert max(p["nodes"] for p in res["points"]) >= 2


def test_throughput_grows_with_samplers_and_efficiency_is_sane(quick):
    _, _, res = quick
    serial = sorted((p for p in res["points"] if p["sweep"] == "samplers" and p["sync"] == "serial"),
                    key=lambda p: p["n"])
    assert [p["n"] for p in serial] == [1, 2, 4]
    # sleep-bound stand-ins: 4 samplers do 4 chunks in about the time 1 does one
    assert serial[-1]["throughput"] > 2.0 * serial[0]["throughput"]
    for p in res["points"]:
        assert 0 < p["efficiency"] <= 1.2, p
        assert p["wall"] >= 0.95 * p["ideal"], p          # the stand-ins really slept their planned time
        assert p["mbytes"] > 0 and (p["sync_s"] > 0 or p["sync"] == "off")
    for what in ("rewards", "learners"):                    # strong scaling: 2 actors beat 1
        pts = sorted((p for p in res["points"] if p["sweep"] == what), key=lambda p: p["n"])
        assert pts[-1]["throughput"] > 1.3 * pts[0]["throughput"], what


def test_every_sync_method_delivered(quick):
    _, _, res = quick
    methods = {(s["method"], s["receivers"]) for s in res["sync"]}
    assert {("verified", 4), ("broadcast", 4), ("gloo", 1), ("gloo", 2)} <= methods
    assert all(s["seconds"] > 0 and s["bytes"] > 0 for s in res["sync"])


def test_report_has_tables_plot_and_numbers(quick):
    out, text, res = quick
    assert out.read_text() == text
    assert "| preset | sweep | sync | N |" in text and "| state | MB | tensors | receivers |" in text
    assert text.count("| quick | samplers |") == 4   # 3 serial + 1 concurrent
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert json.loads(out.with_suffix(".json").read_text())["points"] == res["points"]
    assert res["seconds"] < 300   # about a minute on an idle 2-core machine
