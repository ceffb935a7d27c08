"""rlr-dist bench video-memory on small frame counts: memory grows linearly with frames, checkpointing and
the estimators rank as designed, and the planner's estimate stays close to the measurement."""
import pytest

from rlr_dist.bench.video_memory import ROWS, report, run

FRAMES = (2, 4)
KEEP = ("rlr h=1", "full_bp", "full_bp, checkpoint per call", "full_bp, checkpoint per block")


@pytest.fixture(scope="module")
def results():
    return run(FRAMES, [r for r in ROWS if r[0] in KEEP], progress=None)


def _by(results):
    return {(r["layout"], r["row"], r["frames"]): r for r in results}


def test_memory_is_linear_in_frames_and_checkpointing_cuts_it(results):
    by = _by(results)
    for layout, row, F in list(by):
        if F == FRAMES[0]:
            ratio = by[(layout, row, FRAMES[1])]["measured"] / by[(layout, row, F)]["measured"]
            assert 1.7 < ratio < 2.3, (layout, row, ratio)  # twice the frames, twice the activations
    for layout in ("pixel_video_flow", "t2v"):
        full = by[(layout, "full_bp", 4)]["measured"]
        assert by[(layout, "full_bp, checkpoint per call", 4)]["measured"] < full / 3   # T = 6 calls -> ~1
        assert by[(layout, "rlr h=1", 4)]["measured"] < full / 3
    # per-block checkpointing keeps every call's block inputs: between per-call checkpointing and none
    wan = [by[("pixel_video_flow", r, 4)]["measured"] for r in ("full_bp, checkpoint per call",
                                                                   "full_bp, checkpoint per block", "full_bp")]
    assert wan[0] < wan[1] < wan[2]
    per_block = by[("pixel_video_flow", "full_bp, checkpoint per block", 4)]
    assert 0 < per_block["kept"] < per_block["measured"] / 2   # the checkpoints' inputs, counted beside autograd's
    assert ("t2v", "full_bp, checkpoint per block", 4) not in by    # UNets checkpoint per call only


def test_planner_estimate_is_close_to_the_measurement(results):
    for r in results:
        err = r["estimated"] / r["measured"] - 1
        if r["row"] == "full_bp, checkpoint per block":
            # outside the blocks only the output head is counted (not the patch embedding's input nor the chain's
            # per-step tensors), which a 2-block model of width 24 makes a large share: an under-estimate,
            # documented in the report
            assert -0.6 < err < 0, r
        else:
            assert abs(err) < 0.10, r


def test_report_shows_every_case_and_the_ratios(results):
    text = report(results, 1.0)
    assert "## Wan-class transformer" in text and "## UNet3D" in text
    assert text.count("| full_bp |") == 4  # per architecture: the table and the ratio table
    assert "Planner error: largest" in text
