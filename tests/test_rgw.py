"""Storage, checkpoints and faults against a real S3 server: Ceph's RADOS gateway (tests/rgw.py), not moto.
Opt-in (`-m rgw`, `make test-rgw`): the first run downloads about 76 MB of Debian packages."""
import os
import re
import threading
import time
from pathlib import Path

import pytest

from rlr_dist import storage

pytestmark = pytest.mark.rgw


def _folder(root: Path, files: dict[str, int]) -> Path:
    """``root`` with random files of the given sizes (bytes)."""
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


def _keys(uri: str) -> list[str]:
    bucket, prefix = storage.split_s3(uri)
    page = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]


def test_storage_round_trip_on_rgw(rgw_server, tmp_path):
    """put/resolve of a folder with a multipart-sized file (RGW's UploadPart needs the checksum env), a cache
    hit, an object corrupted on the server caught by the manifest, a single object, a missing prefix."""
    import boto3

    src = _folder(tmp_path / "src", {"big.bin": 10 << 20, "sub/small.txt": 5, "sub/mid.bin": 300_000})
    uri = f"{rgw_server}/round-trip/m1"
    storage.put(src, uri)
    assert sorted(_keys(uri)) == ["big.bin", "manifest.json", "sub/mid.bin", "sub/small.txt"]
    local = storage.resolve(uri)
    for rel in ("big.bin", "sub/small.txt", "sub/mid.bin"):
        assert (local / rel).read_bytes() == (src / rel).read_bytes()
    assert set(storage.verify_manifest(local, uri)["files"]) == {"big.bin", "sub/small.txt", "sub/mid.bin"}
    # a damaged cached copy is fetched again
    (local / "sub" / "mid.bin").write_bytes(b"x")
    assert storage.resolve(uri) == local and (local / "sub" / "mid.bin").read_bytes() == (src / "sub/mid.bin").read_bytes()
    # an object replaced on the server no longer matches the manifest
    bucket, prefix = storage.split_s3(uri)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/sub/small.txt", Body=b"HELLO")
    with pytest.raises(storage.StorageError, match="small.txt"):
        storage.download(uri, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    # a single object, and a prefix with nothing under it
    boto3.client("s3").put_object(Bucket=bucket, Key="round-trip/single.bin", Body=b"abc" * 100)
    assert storage.resolve(f"{rgw_server}/round-trip/single.bin").read_bytes() == b"abc" * 100
    with pytest.raises(storage.StorageError, match="nothing-here"):
        storage.resolve(f"{rgw_server}/round-trip/nothing-here")


def test_the_generated_secret_is_in_no_log_or_config(rgw, rgw_server):
    """The S3 user's secret (given to radosgw-admin on its command line) appears in none of the daemons' logs,
    their outputs or ceph.conf, nor in the server's repr; the test's S3 calls used it (the bucket answers)."""
    assert storage.s3_client().head_bucket(Bucket=storage.split_s3(rgw_server)[0])
    files = [p for p in rgw.dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".conf")]
    assert any(p.name == "client.rgw.a.log" for p in files) and any(p.name == "ceph.conf" for p in files)
    secret = rgw.secret_key.encode()
    assert [p.name for p in files if secret in p.read_bytes()] == []
    assert rgw.secret_key not in repr(rgw)


def _stop_after_first_object(rgw, uri: str, seen: dict) -> threading.Thread:
    """A thread that kills the gateway as soon as the first file of ``uri`` is listed."""
    import boto3
    from botocore.config import Config

    bucket, prefix = storage.split_s3(uri)
    client = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def watch() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
            if any(not o["Key"].endswith(storage.INCOMPLETE) for o in page.get("Contents", [])):
                seen["at_stop"] = [o["Key"] for o in page["Contents"]]
                rgw.stop()  # SIGKILL, as a crash
                seen["stopped"] = time.monotonic()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_server_stopped_mid_checkpoint(rgw, rgw_server, tmp_path):
    """RGW killed while a 6-file checkpoint uploads: bounded retries, then an error naming the checkpoint;
    the partial folder is never taken for a checkpoint; the previous one still downloads and verifies; after
    a restart the checkpoint uploads."""
    run = f"{rgw_server}/mid/run"
    previous = f"{run}/checkpoint_000001"
    storage.upload(_folder(tmp_path / "c1", {"model.bin": 1 << 20, "state.json": 20}), previous)

    files = {f"shard_{i}.bin": 4 << 20 for i in range(6)} | {"state.json": 20}
    src = _folder(tmp_path / "c2", files)
    uri = f"{run}/checkpoint_000002"
    seen: dict = {}
    watcher = _stop_after_first_object(rgw, uri, seen)
    t0 = time.monotonic()
    try:
        with pytest.raises(storage.StorageError, match=re.escape(uri)):
            storage.upload(src, uri)
        failed_after = time.monotonic() - t0
        watcher.join(5)
        assert "stopped" in seen, "the gateway was not stopped during the upload (upload too fast?)"
        gave_up_after = time.monotonic() - seen["stopped"]
        print(f"\nstopped after {len(seen['at_stop'])} object(s); upload gave up {gave_up_after:.1f} s after the "
              f"stop ({failed_after:.1f} s in all)")
        assert gave_up_after < 60  # retries are bounded
    finally:
        if not rgw.running:
            rgw.start()

    left = _keys(uri)  # partial: the marker and some files, no manifest
    assert storage.INCOMPLETE in left and "manifest.json" not in left and 1 < len(left) <= len(files), left
    with pytest.raises(storage.StorageError, match=r"incomplete"):
        storage.download(uri, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(storage.StorageError, match=re.escape(uri)):
        storage.resolve(uri)
    # the previous checkpoint is the resume point: complete and verified
    back = storage.download(previous, tmp_path / "previous")
    assert set(storage.verify_manifest(back, previous)["files"]) == {"model.bin", "state.json"}
    # the server is back: the same checkpoint uploads and verifies
    storage.upload(src, uri)
    assert sorted(_keys(uri)) == sorted([*files, "manifest.json"])
    got = storage.download(uri, tmp_path / "again")
    assert set(storage.verify_manifest(got, uri)["files"]) == set(files)
    assert (got / "shard_3.bin").read_bytes() == (src / "shard_3.bin").read_bytes()


def test_hung_server_fails_the_upload_within_the_configured_bound(rgw, rgw_server, tmp_path, monkeypatch):
    """A gateway that accepts connections but never answers (SIGSTOP): with 2 s timeouts and 2 tries per call
    the upload gives up, naming the checkpoint, within the bound ``storage.s3_client`` documents
    (3 calls x 2 tries x (2 x 2 s + 2 s)); once thawed the upload goes through."""
    monkeypatch.setenv("RLR_DIST_S3_TIMEOUT", "2")
    monkeypatch.setenv("RLR_DIST_S3_ATTEMPTS", "2")
    src = _folder(tmp_path / "c", {"model.bin": 100_000, "state.json": 20})
    uri = f"{rgw_server}/hung/checkpoint_000001"
    rgw.freeze()
    try:
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match=re.escape(uri)):
            storage.upload(src, uri)
        took = time.monotonic() - t0
    finally:
        rgw.thaw()
    print(f"\nhung server: upload gave up after {took:.1f} s")
    assert 3 * 2 * 2 <= took < 3 * 2 * (2 * 2 + 2) + 5  # every try waited its timeout; the bound held
    storage.upload(src, uri)
    assert set(storage.verify_manifest(storage.download(uri, tmp_path / "back"), uri)["files"]) == {"model.bin", "state.json"}


def test_pipeline_checkpoints_to_rgw_and_resumes(rgw_server, tmp_path):
    """The Ray pipeline (1 learner under Ray Train) with ``checkpoint.dir`` on RGW: 2 iterations checkpointed
    to s3://, then ``--resume`` to 3 restores the iteration-2 checkpoint from RGW and writes the next one."""
    import json

    import ray

    from rlr_dist.bench import faults as F
    from rlr_dist.config import build
    from rlr_dist.models.tiny import build_tiny
    from rlr_dist.pipeline.run import train
    from rlr_dist.train.config import TrainConfig

    assert not ray.is_initialized(), "this test starts its own Ray, with the RGW endpoint in its env"
    model = build_tiny("pixel", tmp_path / "pixel")
    out_dir = tmp_path / "run"
    ckpt_dir = f"{rgw_server}/pipeline"
    data = {"model": {"path": str(model), "num_inference_steps": 4}, "estimator": {"name": "rlr", "h": 1},
            "reward": {"name": "brightness"}, "data": {"prompts": ["zero", "one"]},
            "train": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "eval_every": 0},
            "cluster": {"samplers": {"count": 1, "num_cpus": 0.5},
                        "rewards": {"count": 1, "num_cpus": 0.5}, "learners": {"count": 1, "num_cpus": 0.5}},
            "optim": {"lr": 3e-3}, "checkpoint": {"every": 2, "keep": 3, "dir": ckpt_dir},
            "output_dir": str(out_dir)}
    from rlr_dist.pipeline.run import _env

    # address="local": a Ray of its own, started now so its workers get the RGW endpoint and keys, even when
    # another cluster on this machine (`ray start`) would be picked up by default
    ray.init(address="local", num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": _env()})
    try:
        first = train(build(TrainConfig, data))
        assert first["metrics"]["weights_version"] == 2
        name = json.loads((out_dir / "run.json").read_text())["name"]
        run_uri = f"{ckpt_dir}/{name}"
        keys = _keys(run_uri)
        ckpts = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_") and "/" in k})
        assert len(ckpts) == 1 and f"{ckpts[0]}/manifest.json" in keys and f"{ckpts[0]}/state.json" in keys, keys
        local = storage.download(f"{run_uri}/{ckpts[0]}", tmp_path / "ckpt2")  # what Ray Train wrote verifies
        assert storage.verify_manifest(local)["iteration"] == 2

        data["train"]["iterations"] = 3
        resumed = train(build(TrainConfig, data), resume=True)
    finally:
        ray.shutdown()
    assert resumed["run_id"] == first["run_id"] and resumed["metrics"]["weights_version"] == 3
    attempt, start, restored = F.lineage(out_dir)[-1]
    assert start == 2 and restored == ckpts[0]  # restored from the checkpoint on RGW
    keys = _keys(run_uri)
    later = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_") and "/" in k} - set(ckpts))
    assert later and f"{later[-1]}/manifest.json" in keys
    newest = storage.download(f"{run_uri}/{later[-1]}", tmp_path / "ckpt4")
    assert storage.verify_manifest(newest)["iteration"] == 3
