"""Activation-memory benchmark: the saved-tensor counter, and the memory ordering of the estimators."""
import pytest
import torch

from rlr_dist.bench.memory import activation_memory
from rlr_dist.memory import SavedTensorMeter

T = 8
LATENT_BYTES = 1 * 4 * 16 * 16 * 4  # batch 1, float32


def test_meter_counts_a_storage_once_and_releases_it():
    a = torch.randn(100, requires_grad=True)
    with SavedTensorMeter([a]) as m:
        b = a * 2                       # a is excluded; b is new
        s = b.sin()                     # saves b
        c = b.view(10, 10).cos()        # saves a view of b: same storage
        assert m.live == m.peak == 100 * 4
        (s.sum() + c.sum()).backward()
    assert m.live == 0 and m.peak == 400


@pytest.fixture(scope="module")
def rows():
    out = activation_memory(T=T, batch=1, hs=(1, 2), truncated_Ks=(1, 4), progress=None, device="cpu")
    return {r["estimator"]: r for r in out}


def test_rows_and_fields(rows):
    assert list(rows) == ["rlr h=1 zo=lr", "rlr h=2 zo=lr", "rlr h=2 zo=lr_sampled K=4", "lr (DDPO)",
                          "truncated_bp K=1", "truncated_bp K=4", "full_bp", "full_bp checkpoint"]
    for r in rows.values():
        assert r["cuda_peak_bytes"] is None and r["seconds"] > 0 and r["peak_bytes"] > 0
    assert rows["full_bp"]["ratio_vs_full_bp"] == 1.0 and rows["full_bp checkpoint"]["ratio_vs_full_bp_ckpt"] == 1.0


def test_model_calls(rows):
    calls = {k: r["model_calls_backpropagated"] for k, r in rows.items()}
    assert calls == {"rlr h=1 zo=lr": T, "rlr h=2 zo=lr": T, "rlr h=2 zo=lr_sampled K=4": 1 + 2 + 4,
                     "lr (DDPO)": T, "truncated_bp K=1": 1, "truncated_bp K=4": 4, "full_bp": T,
                     "full_bp checkpoint": T}  # checkpoint recomputation is not counted twice


def test_memory_ordering(rows):
    call = rows["lr (DDPO)"]["model_call_bytes"]
    peak = {k: r["peak_bytes"] for k, r in rows.items()}
    # full backprop holds every call's activations at once: it grows with T
    assert peak["full_bp"] > (T - 0.5) * call
    assert peak["full_bp"] > peak["rlr h=2 zo=lr"] > peak["rlr h=1 zo=lr"]
    # RLR: one term at a time, the largest being the h-step block
    assert 1.5 * call < peak["rlr h=2 zo=lr"] < 2.5 * call
    assert peak["rlr h=2 zo=lr_sampled K=4"] == pytest.approx(peak["rlr h=2 zo=lr"], rel=0.05)
    assert peak["rlr h=1 zo=lr"] == pytest.approx(peak["lr (DDPO)"], rel=0.05)
    assert 0.9 * call < peak["lr (DDPO)"] < 1.1 * call
    assert peak["truncated_bp K=1"] < peak["truncated_bp K=4"]
    assert peak["truncated_bp K=4"] > 3.5 * call


def test_checkpointed_full_bp_is_accounted(rows):
    r = rows["full_bp checkpoint"]
    # the counter sees only the latents each checkpoint keeps (x_T is the record itself) ...
    assert (T - 1) * LATENT_BYTES <= r["counted_peak_bytes"] < 0.5 * r["model_call_bytes"]
    # ... so one recomputed model call is added, and the row says so
    assert r["peak_bytes"] == r["counted_peak_bytes"] + r["model_call_bytes"]
    assert "checkpoint" in r["note"] and not rows["full_bp"]["note"]
    assert r["peak_bytes"] < rows["full_bp"]["peak_bytes"] / 4


def test_selective_recording(rows):
    tb = {k: r["trajectory_bytes"] for k, r in rows.items()}
    assert tb["rlr h=2 zo=lr_sampled K=4"] < tb["lr (DDPO)"]
    assert tb["truncated_bp K=1"] < tb["truncated_bp K=4"] < tb["full_bp"]
