"""`rlr-dist bench study STUDY.yaml`: estimators compared on the same work at an equal reward-query budget.

Every (method, regulariser, seed) cell is one single-process training run (:func:`train_local`, the
loop the Ray pipeline is tested against) of the same base config: same prompts, batch, iterations —
hence the same number of reward queries — and the same learning rate; only the estimator section and the
regulariser section differ. Runs go to a pool of worker processes (one torch thread each).

Per run: held-out evaluator score on fresh samples from fixed seeds every ``eval_every`` iterations (the
reward-vs-queries curve), the training reward, the sampled KL to the reference (Σ_k δ_k / 2 with the
frozen pretrained model, also for unregularised runs), sample diversity (mean pairwise L2 distance of the
evaluation samples, and the entropy of the evaluator's predicted classes), wall time, and peak activation
memory of the learner steps (bytes autograd held for backward, counted with :class:`SavedTensorMeter`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from rlr_dist.config import ConfigError, build, check, load_yaml

# the study's columns <- the metrics the configured evaluation reports (rlr_dist.train.step.eval_metrics)
EVAL_COLUMNS = {"heldout": "eval/heldout", "heldout_logp": "eval/logp_target", "class_entropy": "eval/class_entropy",
                "pairwise_l2": "eval/pairwise_l2"}


@dataclass
class StudyConfig:
    """base: training config (path relative to the study file); overrides: dotted overrides of it.
    methods / regularisers: label -> a whole ``estimator`` / ``regulariser`` section. variants: label ->
    more dotted overrides (e.g. the flow sampler's SDE window), one study axis beside the regularisers. Every
    method runs with every variant, every regulariser and every seed."""

    base: str
    methods: dict[str, dict]
    regularisers: dict[str, dict] = field(default_factory=lambda: {"none": {"name": "none"}})
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=lambda: {"base": []})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_every: int = 5
    eval_samples: int = 64
    workers: int = 2
    gradient_draws: int = 0  # > 0: also that many gradient estimates per method at the pretrained weights
    gradient_warmup: int = 0  # batches each method learns from (a value baseline) before the measured draws
    only: dict[str, list[str]] = field(default_factory=dict)  # method -> the regularisers it runs with (default: all)
    compare_to: str | None = None  # a method: the gradient table adds every method's tr Cov as a ratio to its

    def __post_init__(self) -> None:
        check(len(self.methods) > 0, "methods", "must name at least one estimator")
        check(len(self.seeds) > 0, "seeds", "must list at least one seed")
        check(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.gradient_draws == 0 or self.gradient_draws >= 2, "gradient_draws",
              f"must be 0 (off) or >= 2, got {self.gradient_draws}")
        check(self.gradient_warmup >= 0, "gradient_warmup", f"must be >= 0, got {self.gradient_warmup}")
        check(len(self.variants) > 0, "variants", "must name at least one variant (label: [overrides])")
        for label, ov in self.variants.items():
            check(isinstance(ov, list) and all(isinstance(o, str) and o.startswith("--") for o in ov),
                  f"variants.{label}", "must be a list of dotted overrides, e.g. ['--model.flow.window={kind: all}']")
        check(self.compare_to is None or self.compare_to in self.methods, "compare_to",
              f"names no method; methods are {sorted(self.methods)}")
        for label, regs in self.only.items():
            check(label in self.methods, f"only.{label}", f"names no method; methods are {sorted(self.methods)}")
            bad = [r for r in regs if r not in self.regularisers]
            check(not bad and len(regs) > 0, f"only.{label}",
                  f"must list some of the regularisers {sorted(self.regularisers)}, got {regs}")
        for group in ("methods", "regularisers"):
            for label, section in getattr(self, group).items():
                check(isinstance(section, dict) and "name" in section, f"{group}.{label}",
                      "must be a section with a name, e.g. {name: rlr, h: 2}")


def load_study(path: str | Path):
    """The study and the resolved training config of every cell, validated before anything runs: each cell's
    config, and its estimator against the sampler's chain for every window the cell can draw (from the model
    folder's configs, no weights)."""
    from rlr_dist.models import ModelError, folder_schedule, resolve_model_folder
    from rlr_dist.train.config import load_config

    path = Path(path)
    study = build(StudyConfig, load_yaml(path))
    base = (path.parent / study.base) if not Path(study.base).is_absolute() else Path(study.base)
    if not base.is_file():
        raise ConfigError(f"base: {base} does not exist")
    cells = []
    for var_label, var in study.variants.items():
        for reg_label, reg in study.regularisers.items():
            for label, est in study.methods.items():
                if label in study.only and reg_label not in study.only[label]:
                    continue
                ov = list(study.overrides) + var + [f"--estimator={json.dumps(est)}", f"--regulariser={json.dumps(reg)}",
                                                    "--train.eval_every=0"]
                where = f"methods.{label} with regularisers.{reg_label}" + (
                    f" and variants.{var_label}" if len(study.variants) > 1 else "")
                try:  # every cell validates before any runs
                    cfg = load_config(base, ov)
                    cfg.check_schedule(folder_schedule(resolve_model_folder(cfg.model.path), cfg.model))
                except (ConfigError, ModelError) as e:
                    raise ConfigError(f"{where}: {e}") from None
                cells += [{"variant": var_label, "method": label, "regulariser": reg_label, "seed": seed,
                           "overrides": ov + [f"--train.seed={seed}"], "base": str(base)} for seed in study.seeds]
    return study, cells


def _eval_row(metrics: dict) -> dict:
    return {col: metrics[key] for col, key in EVAL_COLUMNS.items() if key in metrics}


def run_cell(cell: dict, eval_every: int, eval_samples: int) -> dict:
    """One training run; returns its curve and final numbers (runs in a worker process). Evaluation is the
    config's own (its ``eval_reward``), every ``eval_every`` iterations on ``eval_samples`` samples."""
    torch.set_num_threads(1)
    from rlr_dist.memory import SavedTensorMeter
    from rlr_dist.models import load_model
    from rlr_dist.train.config import load_config
    from rlr_dist.train.local import Evaluator, train_local

    cfg = load_config(cell["base"], cell["overrides"] + [f"--train.eval_every={eval_every}",
                                                           f"--train.eval_samples={eval_samples}"])
    eval_prompts = cfg.data.eval_prompts or cfg.data.load_prompts()
    per_it = cfg.train.batch_size
    curve: list[dict] = []

    def on_iteration(i: int, stats: dict) -> None:
        curve.append({"iteration": i, "queries": i * per_it, "reward": stats["reward/mean"],
                      "kl": stats.get("kl/sampled"), **_eval_row(stats)})

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    before = _eval_row(Evaluator(cfg, model)(model))
    t0 = time.perf_counter()
    with SavedTensorMeter(exclude=model.unet.parameters()) as meter:  # weights exist anyway
        train_local(cfg, on_iteration=on_iteration, model=model)
    wall = time.perf_counter() - t0  # includes the evaluations, the same for every method
    last = {**curve[-1], "kl_chain": chain_kl(model, eval_prompts, eval_samples)}
    return {**{k: cell[k] for k in KEYS}, "date": str(date.today()), "before": before, "curve": curve,
            "wall_s": wall, "peak_activation_mb": meter.peak / 2**20, "queries": last["queries"],
            "final": {k: last.get(k) for k in FINAL}}


def chain_kl(model, prompts: list[str], n: int, seed: int = 123_456) -> float:
    """The sampled KL to the pretrained model over the *whole* chain, the same for every cell of a study:
    mean over ``n`` fresh trajectories (fixed seed) of ``Σ_k δ_k / 2`` with every step stochastic (a flow
    sampler's transition on all steps, whatever window training used). The run's ``kl/sampled`` covers only
    the last iteration's window, so it cannot be compared across windows (or across seeds of a random one)."""
    from rlr_dist.chain.flow import FlowSchedule
    from rlr_dist.chain.trajectory import Plan, sample

    schedule = model.schedule()
    if isinstance(schedule, FlowSchedule):
        schedule = schedule.with_window(None)
    g = torch.Generator(device=model.device).manual_seed(seed)
    batch = [prompts[i % len(prompts)] for i in range(n)]
    with torch.no_grad():
        cond = model.encode_prompts(batch)
        traj = sample(model.chain(schedule=schedule), model.initial_noise(n, g), Plan(), cond, g, with_reference=True)
    return float(traj.delta.double().sum(1).mean() / 2)


def gradient_draws(cell: dict, draws: int, warmup: int = 0) -> dict:
    """``draws`` gradient estimates (batches of the study's size) at the pretrained weights: their mean and
    ``tr Cov`` of one estimate (runs in a worker process). After every batch the estimator learns from it as in
    training (``observe``, ``learn_from``: a value baseline fits on the returns seen); the first ``warmup``
    batches are only learned from. Estimators that learn nothing give independent draws."""
    torch.set_num_threads(1)
    from rlr_dist.estimators import Advantages
    from rlr_dist.models import load_model
    from rlr_dist.rewards import build_scorer
    from rlr_dist.train import step
    from rlr_dist.train.config import load_config

    cfg = load_config(cell["base"], cell["overrides"])
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    cfg.check_schedule(model.schedule())
    estimator, regulariser = cfg.make_estimator(), cfg.make_regulariser()
    scorer = build_scorer(cfg.reward, model.decoder())
    params, prompts, t = model.trainable_parameters(), cfg.data.load_prompts(), cfg.train
    grads = []
    t0 = time.perf_counter()
    d = -warmup
    while d < draws:
        if d == 0:
            t0 = time.perf_counter()
        works = step.iteration_work(prompts, 10_000 + d, t.seed, t.prompts_per_iteration, t.samples_per_prompt, 1)
        chunks = [step.score(scorer, step.rollout(model, step.with_plan(w, estimator, model.schedule()), 0),
                             estimator.needs_reward_grad) for w in works]
        for p in params:
            p.grad = None
        stats = step.learn(model, estimator, regulariser, Advantages(t.advantage_baseline, t.advantage_scale), chunks,
                           all_rewards=torch.cat([c.reward for c in chunks]))
        estimator.observe(stats)
        records = estimator.take_records()
        estimator.learn_from([records])
        if d >= 0:
            grads.append(torch.cat([p.grad.flatten().double() for p in params]))
        d = 0 if d < 0 and records is None and not estimator.reads_term_norms else d + 1  # nothing to warm up
    G = torch.stack(grads)
    return {"variant": cell["variant"], "method": cell["method"], "regulariser": cell["regulariser"], "mean": G.mean(0),
            "tr_cov": float(G.var(0).sum()), "draws": draws, "seconds_per_draw": (time.perf_counter() - t0) / draws}


def spread_table(rows: list[dict], reference: str, compare_to: str | None = None) -> list[str]:
    """Variance of one batch's estimate against the ``reference`` method's signal ``S = ‖E ĝ_ref‖²``
    (full backprop: unbiased, least noisy), and the cosine of each method's mean gradient with the
    reference's next to the cosine an *unbiased* estimator would show from noise alone,
    ``1/√((1 + V/(nS))(1 + V_ref/(nS)))`` — a cosine well below it means bias."""
    ref = next(r for r in rows if r["method"] == reference)
    S = float(ref["mean"].pow(2).sum()) - ref["tr_cov"] / ref["draws"]
    base = next((r for r in rows if r["method"] == compare_to), None)
    lines = [f"Signal of `{reference}`: ‖E ĝ‖² = {S:.4g} (debiased).", "",
             f"| method | tr Cov(ĝ) | tr Cov / ‖E ĝ_{reference}‖² | cos(E ĝ, E ĝ_{reference}) | same if unbiased | "
             "s per estimate |" + (f" tr Cov / tr Cov({compare_to}) |" if base else ""),
             "|---|---|---|---|---|---|" + ("---|" if base else "")]
    for r in rows:
        cos = float(torch.nn.functional.cosine_similarity(r["mean"], ref["mean"], dim=0))
        if S > 0:
            unbiased = (1 + r["tr_cov"] / (r["draws"] * S)) ** -0.5 * (1 + ref["tr_cov"] / (ref["draws"] * S)) ** -0.5
            ratio, same = f"{r['tr_cov'] / S:.3g}", f"{unbiased:.3f}"
        else:  # the reference's own mean is noise-dominated: no signal to compare with
            ratio = same = "–"
        lines.append(f"| {r['method']} | {r['tr_cov']:.4g} | {ratio} | {cos:+.3f} | "
                     f"{'1 (itself)' if r is ref else same} | {r['seconds_per_draw']:.2f} |"
                     + (f" {r['tr_cov'] / base['tr_cov']:.3g} |" if base else ""))
    return lines


# ------------------------------------------------------------------------------------------ driver
def _pooled(fn, jobs: list[tuple], workers: int, line) -> list:
    """``fn(*job)`` for every job on ``workers`` spawned processes, a progress line (with ETA) per result."""
    import multiprocessing as mp

    out, t0 = [], time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for fut in futures:  # in submission order: the ETA is a rough one
            out.append(fut.result())
            done, el = len(out), time.perf_counter() - t0
            print(f"[study {done}/{len(jobs)}] {line(out[-1])} | elapsed {el:.0f} s, "
                  f"ETA {el / done * (len(jobs) - done):.0f} s", flush=True)
    return out


def main(path: str | Path, out: str | Path | None = None, workers: int | None = None, reuse: bool = False) -> str:
    """Run every cell of the study at ``path``; write ``<out>.md`` (+ ``.csv``, ``.json``, ``.png``).
    ``reuse``: take the training runs found in an earlier ``<out>.json`` and run only the cells it lacks (e.g.
    methods added to the study); likewise the gradient rows the last run kept in the cache (:func:`_gradient_cache`;
    a row is redone when its method's config, the number of draws or the warm-up changed)."""
    study, cells = load_study(path)
    workers = workers or study.workers
    t0 = time.perf_counter()
    if reuse:
        if out is None or not Path(out).with_suffix(".json").is_file():
            raise ConfigError(f"--reuse needs the results of an earlier run at {Path(out or '-').with_suffix('.json')}")
        saved = json.loads(Path(out).with_suffix(".json").read_text())
        train_s = saved["meta"].get("train_wall_s", saved["meta"]["wall_s"])
        have = {_key(r): {"date": saved["meta"]["date"], **r} for r in saved["results"]}
        reused = [have[_key(c)] for c in cells if _key(c) in have]
        todo = [c for c in cells if _key(c) not in have]
        print(f"[study] {len(reused)} runs taken from {Path(out).with_suffix('.json')}, {len(todo)} to run", flush=True)
    else:
        reused, todo = [], cells
    if todo:
        t_run = time.perf_counter()
        print(f"[study] {len(todo)} runs ({len(study.methods)} methods x {len(study.regularisers)} regularisers x "
              f"{len(study.variants)} variants x {len(study.seeds)} seeds) on {workers} worker process(es)", flush=True)
        new = _pooled(run_cell, [(c, study.eval_every, study.eval_samples) for c in todo],
                      workers, lambda r: f"{r['method']} / {r['regulariser']} / {r['variant']} / seed {r['seed']}: held-out "
                      f"{r['before']['heldout']:.3f} -> {r['final']['heldout']:.3f}, KL {r['final']['kl']:.2f}, "
                      f"{r['wall_s']:.0f} s")
        train_s = (train_s if reuse else 0.0) + time.perf_counter() - t_run
        order = {_key(c): i for i, c in enumerate(cells)}
        results = sorted(reused + new, key=lambda r: order[_key(r)])
    else:
        results = reused
    spread, gradients_reused = [], 0
    if study.gradient_draws:
        first = {}
        for c in cells:  # the first regulariser and seed of every (variant, method)
            first.setdefault((c["variant"], c["method"]), c)
        cache = _gradient_cache(out) if out else None
        kept = torch.load(cache, weights_only=True) if reuse and cache is not None and cache.is_file() else {}
        jobs = {_gradient_key(c, study): c for c in first.values()}
        missing = [(c, study.gradient_draws, study.gradient_warmup) for k, c in jobs.items() if k not in kept]
        print(f"[study] {study.gradient_draws} gradient estimates per method at the pretrained weights "
              f"({len(jobs) - len(missing)} of {len(jobs)} rows taken from {cache})" if reuse else
              f"[study] {study.gradient_draws} gradient estimates per method at the pretrained weights", flush=True)
        done = _pooled(gradient_draws, missing, workers,
                       lambda r: f"gradients of {r['method']} ({r['variant']}): tr Cov {r['tr_cov']:.4g}") if missing else []
        kept.update({_gradient_key(c, study): r for (c, _, _), r in zip(missing, done)})
        rows = [kept[k] for k in jobs]
        gradients_reused = len(jobs) - len(missing)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: kept[k] for k in jobs}, cache)
        for variant in study.variants:
            vrows = [r for r in rows if r["variant"] == variant]
            reference = "full_bp" if any(r["method"] == "full_bp" for r in vrows) else vrows[0]["method"]
            spread += ([f"### variant `{variant}`", ""] if len(study.variants) > 1 else []) + spread_table(vrows, reference, study.compare_to) + [""]
    meta = {"study": str(path), "date": str(date.today()), "cpus": os.cpu_count(), "workers": workers,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "train_wall_s": train_s, "wall_s": time.perf_counter() - t0, "gradient_rows_reused": gradients_reused,
            "config": {k: getattr(study, k) for k in ("base", "overrides", "variants", "methods", "regularisers",
                                                      "seeds", "eval_samples", "gradient_draws")}}
    text = report(results, meta, spread)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "gradients": spread},
                                                       indent=1))
        write_csv(results, out.with_suffix(".csv"))
        plot(results, out.with_suffix(".png"))
        md = out.with_suffix(".md")
        old = md.read_text() if md.is_file() else ""  # the hand-written reading survives a rerun
        reading = old[old.index(READING):] if READING in old else ""
        md.write_text(text.replace("PLOT", out.with_suffix(".png").name) + ("\n" + reading if reading else ""))
    return text


READING = "## Reading"
KEYS = ("variant", "method", "regulariser", "seed")


def _gradient_cache(out: str | Path) -> Path:
    """Where the gradient rows of the report ``out`` are kept for ``--reuse``: the project's cache, not beside the
    report (each row holds a mean gradient, megabytes per method)."""
    from rlr_dist.storage import cache_root

    tag = hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:10]
    return cache_root() / "study" / f"{Path(out).stem}-{tag}.gradients.pt"


def _gradient_key(cell: dict, study) -> str:
    """What a gradient row depends on: the method's run config (base + overrides), the draws and the warm-up."""
    return json.dumps([cell["variant"], cell["method"], str(cell["base"]), list(cell["overrides"]),
                       study.gradient_draws, study.gradient_warmup])


def _key(r: dict) -> tuple:
    """A cell's or a run's identity (runs of studies without variants: variant "base")."""
    return tuple(r.get(k, "base") for k in KEYS)


FINAL = ("heldout", "heldout_logp", "reward", "kl", "kl_chain", "pairwise_l2", "class_entropy")


def write_csv(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*KEYS, "queries", *FINAL, "heldout_before", "wall_s", "peak_activation_mb"])
        for r in results:
            w.writerow([*(r.get(k, "base") for k in KEYS), r["queries"], *(r["final"].get(k) for k in FINAL),
                        r["before"]["heldout"], round(r["wall_s"], 2), round(r["peak_activation_mb"], 3)])


def _groups(results: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(variant, regulariser, method) -> that cell's runs over seeds (results of studies without variants: "base")."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        out.setdefault((r.get("variant", "base"), r["regulariser"], r["method"]), []).append(r)
    return out


def _ms(xs: list[float], spread: bool = True) -> str:
    """``mean ± std`` over seeds (``spread=False``: the mean alone); ``–`` when nothing is finite."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    if not spread:
        return f"{m:.3f}"
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def report(results: list[dict], meta: dict, spread: list[str] = ()) -> str:
    cfg = meta["config"]
    lines = [
        "# Estimator study: the same work at an equal reward-query budget", "",
        f"`rlr-dist bench study {meta['study']}` — {meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, "
        f"{meta['workers']} worker processes of 1 torch thread, torch {meta['torch']}; training runs "
        f"{meta['train_wall_s'] / 60:.1f} min, whole study {meta['wall_s'] / 60:.1f} min.", "",
        f"Base config `{cfg['base']}` with `{' '.join(cfg['overrides'])}`; seeds {cfg['seeds']}. Every run: "
        f"{results[0]['queries']} reward queries, same learning rate and optimiser. Held-out = the base config's `eval_reward` on "
        f"{cfg['eval_samples']} fresh samples (fixed seeds; for the digits world the fraction the MNIST-trained "
        "evaluator reads as the target digit); KL = sampled Σ_k δ_k/2 to "
        "the pretrained model on the last iteration's training trajectories (its stochastic steps only); chain KL = "
        f"the same on {cfg['eval_samples']} fresh trajectories with every step stochastic, fixed seed (comparable "
        "across windows and methods); diversity = mean pairwise L2 of those samples and the entropy (bits) of the "
        "evaluator's predicted classes; memory = peak bytes autograd held for backward in a learner step.", "",
        "Methods: " + "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in cfg["methods"].items()) + ".", "",
        "Regularisers: " + "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in cfg["regularisers"].items()) + ".", "",
    ]
    variants = cfg.get("variants") or {"base": []}
    many = len(variants) > 1
    if many:
        lines += ["Variants: " + "; ".join(f"`{k}` = `{' '.join(v)}`" for k, v in variants.items()) + ".", ""]
    lines += [("| variant " if many else "") + "| regulariser | method | held-out (before → after) | train reward | KL | "
              "chain KL | pairwise L2 | class entropy | wall s | peak act. MB |", ("|---" if many else "") + "|---" * 10 + "|"]
    for (var, reg, method), rs in _groups(results).items():
        f = lambda k: _ms([r["final"].get(k) for r in rs])  # noqa: E731
        lines.append(("| " + var + " " if many else "") + f"| {reg} | {method} | {_ms([r['before']['heldout'] for r in rs], spread=False)} → "
                     f"{f('heldout')} | {f('reward')} | {f('kl')} | {f('kl_chain')} | {f('pairwise_l2')} | {f('class_entropy')} | "
                     f"{_ms([r['wall_s'] for r in rs], spread=False)} | "
                     f"{_ms([r['peak_activation_mb'] for r in rs], spread=False)} |")
    lines += ["", "Mean ± standard deviation over seeds."]
    dates: dict[str, set] = {}
    for r in results:
        dates.setdefault(r.get("date", meta["date"]), set()).add(f"{r['regulariser']}/{r['method']}")
    if len(dates) > 1:  # --reuse kept runs of an earlier code state: say which
        lines += ["", "Runs by date (older ones taken from the previous report with `--reuse`; code changed in between, "
                  "compare them with care): " + "; ".join(f"{d}: {', '.join(sorted(c))}" for d, c in sorted(dates.items())) + "."]
    lines += ["", "![held-out reward vs reward queries](PLOT)", ""]
    if spread:
        lines += [f"## Gradient estimates at the pretrained weights ({cfg['gradient_draws']} independent batches of "
                  f"{results[0]['queries'] // max(1, len(results[0]['curve']))} per method, first regulariser)", "",
                  *spread, ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    """Held-out score vs reward queries, one panel per (variant, regulariser), mean line and min–max band over
    seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    panels = list(dict.fromkeys((var, reg) for var, reg, _ in groups))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for (var, reg, method), rs in groups.items():
            if (var, reg) != panel:
                continue
            pts = [[(0, r["before"]["heldout"])] + [(c["queries"], c["heldout"]) for c in r["curve"] if "heldout" in c]
                   for r in rs]
            n = min(len(p) for p in pts)
            xs = [pts[0][i][0] for i in range(n)]
            ys = torch.tensor([[p[i][1] for i in range(n)] for p in pts])
            line, = ax.plot(xs, ys.mean(0), marker="o", ms=3, label=method)
            ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=line.get_color(), alpha=0.15)
        ax.set_title(f"regulariser: {panel[1]}" + (f", {panel[0]}" if len(set(v for v, _ in panels)) > 1 else ""))
        ax.set_xlabel("reward queries")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out evaluator: fraction of target digit")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
