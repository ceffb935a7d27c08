"""A sweep's outputs: results table (CSV + markdown), reward-versus-divergence Pareto plot, best config."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from rlr_dist.tune.space import SweepConfig, point_overrides
from rlr_dist.tune.tracking import trial_status

COLUMNS = ("eval/heldout", "kl/sampled", "reward/mean", "eval/pairwise_l2", "eval/class_entropy",
           "time/trial", "memory/peak_rss_mb", "memory/peak_activation_mb")
REWARD, DIVERGENCE = "eval/heldout", "kl/sampled"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rows(results, sweep: SweepConfig) -> list[dict]:
    """One row per trial: id, status (completed / stopped early / error), iterations, point, last metrics,
    and whether it is on the Pareto front (highest held-out reward for its KL)."""
    out = []
    for r in results:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id", Path(r.path).name), "status": "error" if r.error else trial_status(m),
               "iterations": m.get("training_iteration", 0)}
        row.update({k: json.dumps(r.config.get(k)) if isinstance(r.config.get(k), dict) else r.config.get(k)
                    for k in sweep.space})
        row.update({c: m.get(c) for c in COLUMNS})
        out.append(row)
    pts = [(row[REWARD], row[DIVERGENCE]) for row in out]
    for row, (y, x) in zip(out, pts):
        row["pareto"] = _finite(y) and _finite(x) and not any(
            _finite(y2) and _finite(x2) and y2 >= y and x2 <= x and (y2, x2) != (y, x) for y2, x2 in pts)
    key = sweep.metric if sweep.metric in COLUMNS else REWARD
    out.sort(key=lambda row: -math.inf if not _finite(row.get(key)) else row[key] * (1 if sweep.mode == "max" else -1),
             reverse=True)
    return out


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def write_table(table: list[dict], out: Path) -> tuple[Path, Path]:
    csv_path, md_path = out / "results.csv", out / "results.md"
    cols = list(table[0]) if table else []
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in table]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def pareto_plot(table: list[dict], path: Path, title: str) -> Path:
    """Held-out reward against sampled KL per trial (x: stopped early); the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [r for r in table if _finite(r[REWARD]) and _finite(r[DIVERGENCE])]
    for r in pts:
        ax.scatter(r[DIVERGENCE], r[REWARD], marker="x" if r["status"] == "stopped early" else "o",
                   color="tab:red" if r["pareto"] else "tab:blue", zorder=3 if r["pareto"] else 2)
        ax.annotate(str(r["trial"])[-5:], (r[DIVERGENCE], r[REWARD]), fontsize=7, alpha=0.7)
    front = sorted((r[DIVERGENCE], r[REWARD]) for r in pts if r["pareto"])
    if front:
        ax.plot(*zip(*front), color="tab:red", lw=1, label="Pareto front")
        ax.legend()
    positive = [r[DIVERGENCE] for r in pts if r[DIVERGENCE] > 0]
    if positive and max(positive) > 100 * min(positive):  # KL spans orders of magnitude across a sweep
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel(f"{DIVERGENCE} (KL to the reference)")
    ax.set_ylabel(REWARD)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_config(grid, sweep: SweepConfig, config: str, overrides: list[str], path: Path) -> tuple[dict, Path] | None:
    """The best trial's point and its resolved training config as YAML (for ``rlr-dist train``)."""
    from rlr_dist.train.config import dump, load_config

    try:
        best = grid.get_best_result(sweep.metric, sweep.mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        return None
    point = {k: best.config[k] for k in sweep.space}
    cfg = load_config(config, overrides + point_overrides(point))
    path.write_text(f"# best of the sweep by {sweep.metric} ({sweep.mode}): {json.dumps(point)}\n" + dump(cfg))
    return point, path
