"""DeepSpeed on a Ray learner: the engine around the trained UNet, its checkpoints, and gathered weights.

The estimators back-propagate several loss terms per optimiser step (one graph at a time, so memory is
one segment's, not the chain's). DeepSpeed's default gradient-accumulation bookkeeping reduces on every
``backward``; with ``managed_gradient_accumulation: false`` backward only accumulates and the reduction
happens in ``step()``, which is exact for ZeRO 0–3. The UNet is called *through the engine* so that
ZeRO-3 gathers its partitioned parameters on every forward.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from rlr_dist import storage
from rlr_dist.models.base import DiffusionModel
from rlr_dist.train.config import TrainConfig
from rlr_dist.train.local import make_optimizer

DS_TAG = "ds"
STATE_FILE = "state.json"


def ds_config(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 1 << 30,
    }
    if ds.offload_optimizer:  # DeepSpeed's CPU Adam (JIT-compiled once)
        out["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": cfg.optim.betas,
                                                        "weight_decay": cfg.optim.weight_decay}}
    return _merge(out, copy.deepcopy(ds.extra))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def make_engine(cfg: TrainConfig, model: DiffusionModel):
    """A DeepSpeed engine over ``model.unet`` training ``model.trainable_parameters()``; the model's
    denoiser is rerouted through the engine."""
    if model.device.type == "cpu":  # the shared-memory allreduce op would JIT-compile for ~70 s; gloo is exact
        importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    conf = ds_config(cfg)
    params = model.trainable_parameters()
    # the single-process loop's optimizer, unless DeepSpeed brings its own (CPU offload)
    optimizer = None if "optimizer" in conf else make_optimizer(cfg, params)
    engine, _, _, _ = deepspeed.initialize(model=model.unet, model_parameters=params, optimizer=optimizer,
                                           config=conf)
    model.denoiser.unet = engine
    return engine


@contextlib.contextmanager
def gathered(engine, model: DiffusionModel) -> Iterator[None]:
    """Full trained parameters visible on every rank (a collective under ZeRO-3; no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(model.trainable_parameters()):
            yield
    else:
        yield


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of a trained state (names and float32 values), for weight-sync checks."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(engine, folder: Path, state: dict, rank: int) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 adds the loop state and, last, the manifest, which
    lists every rank's files (Ray Train merges the ranks' folders into one checkpoint), so a checkpoint
    missing any rank's shard is refused at load."""
    import torch.distributed as dist

    engine.save_checkpoint(str(folder), tag=DS_TAG)
    digests = [storage.file_digests(folder)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, storage.file_digests(folder))
    if rank == 0:
        others: dict[str, dict] = {}
        for r, files in enumerate(digests[1:], start=1):
            for rel, info in files.items():
                if rel in digests[0] and digests[0][rel] != info or others.get(rel, info) != info:
                    raise storage.StorageError(f"checkpoint: rank {r}'s {rel} differs from another rank's file "
                                               "of the same name")
                others[rel] = info
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        storage.write_manifest(folder, {"iteration": state["iteration"]}, elsewhere=others)


def load(engine, folder: Path) -> dict:
    """Restore the engine (model + optimizer) and return the loop state. Nothing is read before the manifest
    vouches for every file (sha256 and size, every rank's shards): a folder without one is refused."""
    if not (folder / storage.MANIFEST).is_file():
        raise storage.StorageError(f"checkpoint {folder.name}: no {storage.MANIFEST} (incomplete, or not written "
                                   "by rlr-dist); refused")
    storage.verify_manifest(folder, f"checkpoint {folder.name}")
    engine.load_checkpoint(str(folder), tag=DS_TAG)
    return json.loads((folder / STATE_FILE).read_text())


def restore(engine, candidates: list, fallback: bool = True, say=print) -> tuple[dict, str]:
    """Load the newest of ``candidates`` (Ray Train checkpoints, newest first); a damaged one is refused
    and, with ``fallback``, the next one tried, saying which was used. Returns ``(loop state, its name)``."""
    failures = []
    for ckpt in candidates:
        name = Path(ckpt.path).name
        try:
            with ckpt.as_directory() as d:
                state = load(engine, Path(d))
        except storage.StorageError as e:
            failures.append(str(e))
            if not fallback:
                raise
            say(f"[learner] {e}: not loaded")
            continue
        if failures:
            say(f"[learner] resuming from the newest checkpoint that verifies: {name} (iteration {state['iteration']})")
        return state, name
    raise storage.StorageError("; ".join(failures) + " — and no older checkpoint of this run verifies; start afresh "
                               "without --resume, or repair the folder")


def stored_checkpoints(root: str) -> list:
    """The checkpoints a run has persisted under ``root`` (``<checkpoint.dir>/<run name>``, local or ``s3://``),
    newest first. Read from storage rather than from Ray Train's registry, which misses a checkpoint whose
    report the controller had not yet collected when the learner died."""
    import pyarrow.fs as pafs
    import ray.train

    fs, path = pafs.FileSystem.from_uri(root if storage.is_s3(root) else Path(root).resolve().as_uri())
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_")), reverse=True)
    return [ray.train.Checkpoint(path=f"{path.rstrip('/')}/{n}", filesystem=fs) for n in names]
