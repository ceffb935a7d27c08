"""`rlr-dist bench gpu` on CPU: the tiny stand-ins run every code path; OOM is a result; no Ray / DeepSpeed /
MLflow is needed; bad flags are one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlr_dist.bench import gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu.md"
    res = gpu.run(["sd15", "wan21-t2v-1.3b"], str(out), tiny=None, batches=(1, 2), learner_batch=2, say=lambda s: None)
    assert res["tiny"] and res["device"]["type"] == "cpu" and res["peak_tflops"] > 0
    text = out.read_text()
    for heading in ("# GPU benchmark (tiny CPU stand-ins)", "## Sampler", "## Learner", "SavedTensorMeter"):
        assert heading in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["arch"], r["batch"]) for r in data["sampler"]] == [("sd15", 1), ("sd15", 2),
                                                                  ("wan21-t2v-1.3b", 1), ("wan21-t2v-1.3b", 2)]
    assert all(r["status"] == "ok" and 0 < r["fraction_of_peak"] for r in data["sampler"])
    rows = {(r["arch"], r["finetune"], r["estimator"]): r for r in data["learner"]}
    lora = [c[0] for c in gpu.ESTIMATOR_CASES]
    # UNets checkpoint per call only; transformers also per block
    assert {e for a, f, e in rows if a == "sd15" and f.startswith("LoRA")} == set(lora) - {"full_bp ckpt per block"}
    assert {e for a, f, e in rows if a == "wan21-t2v-1.3b" and f.startswith("LoRA")} == set(lora)
    assert {e for a, f, e in rows if f == "full"} == set(gpu.FULL_FT_CASES)
    for key, r in rows.items():
        assert r["status"] == "ok", key
        assert r["peak_bytes"] > 0 and r["planned_activations"] > 0 and r["planned_bytes"] > r["planned_activations"]
        assert f"| {key[0]} | {key[1]} | {key[2]} |" in text
    # the planner's activations beside the measured saved-tensor peak, where the counter sees them all
    assert rows[("sd15", "LoRA r=4", "rlr h=2")]["plan_error"] is not None
    assert rows[("sd15", "LoRA r=4", "full_bp ckpt per call")]["plan_error"] is None
    # rlr's segment grows with h: more memory for a longer block
    assert rows[("sd15", "LoRA r=4", "rlr h=4")]["peak_bytes"] > rows[("sd15", "LoRA r=4", "rlr h=1")]["peak_bytes"]


def test_out_of_memory_is_a_result(tmp_path, monkeypatch):
    real = gpu.learner_step
    calls = []

    def step(model, estimator, batch, seed=0):
        calls.append(type(estimator).__name__)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(model, estimator, batch, seed)

    monkeypatch.setattr(gpu, "learner_step", step)
    lines = []
    res = gpu.run(["sd15"], str(tmp_path / "gpu.md"), tiny=True, batches=(1,), say=lines.append)
    status = [r["status"] for r in res["learner"]]
    assert status[1] == "does not fit" and status.count("does not fit") == 1
    assert all(s == "ok" for i, s in enumerate(status) if i != 1)
    assert len(calls) == len(status)        # every later case still ran
    assert "| sd15 | LoRA r=4 | rlr h=2 | 1 | does not fit |" in (tmp_path / "gpu.md").read_text()
    assert any("rlr h=2: does not fit" in line for line in lines)


def test_module_runs_without_ray_deepspeed_mlflow(tmp_path):
    """``python -m rlr_dist.bench.gpu`` with ray / deepspeed / mlflow made unimportable (as on the bare GPU
    machine; here accelerate would otherwise import the installed deepspeed) — and none of them is loaded."""
    code = ("import sys, runpy\n"
            "for m in ('ray', 'deepspeed', 'mlflow'): sys.modules[m] = None\n"
            f"sys.argv = ['x', '--tiny', '--arch', 'sd15', '--batches', '1', '--out', {str(tmp_path / 'g.md')!r}]\n"
            "try:\n    runpy.run_module('rlr_dist.bench.gpu', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = sorted(m for m, v in sys.modules.items() if m.split('.')[0] in ('ray', 'deepspeed', 'mlflow') and v)\n"
            "assert not bad, bad\nprint('clean')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "clean" in p.stdout and "bench gpu: " in p.stdout
    assert (tmp_path / "g.md").is_file() and (tmp_path / "g.json").is_file()


def test_bad_arch_is_one_line(capsys):
    from rlr_dist.cli import main

    assert main(["bench", "gpu", "--arch", "sd15", "sd99", "--out", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlr-dist bench gpu: --arch: unknown preset 'sd99'")
