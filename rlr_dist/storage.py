"""Local paths and ``s3://`` URIs behind one interface, with checksums.

A folder written by the project carries ``manifest.json`` (sha256 and size of every file), written
*last*: a folder without it is incomplete and is never loaded. ``resolve(uri)`` returns a local folder:
local paths as they are, ``s3://bucket/prefix`` downloaded into a cache (boto3; endpoint, keys and region
from the usual ``AWS_*`` variables) and verified against the manifest (or, for folders the project did
not write, against sizes and single-part ETags). ``upload(local, uri)`` sends the files, manifest last,
between a marker object ``.rlr-incomplete`` put first and removed last: a prefix with the marker and no
manifest is an interrupted upload, refused by ``download`` (without the marker it would pass for a folder
the project did not write).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

MANIFEST = "manifest.json"
INCOMPLETE = ".rlr-incomplete"  # S3 only: put before an upload's first object, deleted after its manifest
T = TypeVar("T")


class StorageError(RuntimeError):
    """A path or object is missing, incomplete or corrupt; the message names it."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = str(uri)[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def cache_root() -> Path:
    return Path(os.environ.get("RLR_DIST_CACHE", Path.home() / ".cache" / "rlr-dist"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digests(root: str | Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root`` but the manifest."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "size": p.stat().st_size} for p in _files(root)}


def write_manifest(root: str | Path, extra: dict | None = None, elsewhere: dict[str, dict] | None = None) -> dict:
    """Write ``root/manifest.json`` listing sha256 and size of every other file (atomically). ``elsewhere``:
    digests of files that other writers put beside these (e.g. other ranks' shards, merged later)."""
    root = Path(root)
    files = {**(elsewhere or {}), **file_digests(root)}
    manifest = {"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    return manifest


def verify_manifest(root: str | Path, what: str | None = None) -> dict:
    """Check every file listed in ``root/manifest.json``; raise :class:`StorageError` naming the first bad one."""
    root = Path(root)
    what = what or str(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise StorageError(f"{what}: no {MANIFEST} (incomplete or not written by rlr-dist)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{what}: {MANIFEST} is unreadable (damaged)") from None
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            raise StorageError(f"{what}: file {rel!r} listed in the manifest is missing")
        if p.stat().st_size != info["size"] or sha256(p) != info["sha256"]:
            raise StorageError(f"{what}: file {rel!r} does not match its checksum")
    return manifest


def atomic_dir(final: str | Path, write: Callable[[Path], T], extra: dict | None = None) -> T:
    """Call ``write(tmpdir)``, add the manifest, then rename ``tmpdir`` to ``final`` (replacing it).

    A crash leaves at most a ``.tmp-*`` sibling, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        out = write(tmp)
        write_manifest(tmp, extra)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- S3
def s3_client():
    """A boto3 S3 client; endpoint/credentials from the environment, standard retries with backoff.

    ``RLR_DIST_S3_ATTEMPTS`` (5) tries per call, each waiting at most ``RLR_DIST_S3_TIMEOUT`` (60 s, botocore's
    default) to connect or per read; :func:`_retry` makes 3 such calls. So a server that refuses connections
    fails a transfer in seconds; one that accepts but never answers in at most about
    3 x attempts x (2 x timeout + 2 s), measured on a frozen RADOS gateway (a PUT waits for ``100-continue``
    and then for the answer): about 30 min with the defaults, 37 s with 2 tries of 2 s."""
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("RLR_DIST_S3_ATTEMPTS", "5"))
    timeout = float(os.environ.get("RLR_DIST_S3_TIMEOUT", "60"))
    return boto3.client("s3", config=Config(retries={"max_attempts": attempts, "mode": "standard"},
                                            connect_timeout=timeout, read_timeout=timeout))


def _retry(what: str, fn: Callable[[], T], attempts: int = 3, base: float = 0.5) -> T:
    """Retry transient errors beyond botocore's own (connection drops) with backoff, then name ``what``."""
    from botocore.exceptions import BotoCoreError, ClientError

    for i in range(attempts):
        try:
            return fn()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404", "403", "AccessDenied", "InvalidAccessKeyId"):
                raise StorageError(f"{what}: {code}") from None
            if i == attempts - 1:
                raise StorageError(f"{what}: {e}") from None
        except BotoCoreError as e:
            if i == attempts - 1:
                raise StorageError(f"{what}: {e}") from None
        time.sleep(base * 2**i)
    raise AssertionError("unreachable")


def _list(client, bucket: str, prefix: str) -> list[dict]:
    out, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix + "/" if prefix else ""}
        if token:
            kw["ContinuationToken"] = token
        page = client.list_objects_v2(**kw)
        out += page.get("Contents", [])
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def download(uri: str, dest: str | Path | None = None) -> Path:
    """Download the folder ``s3://bucket/prefix`` to ``dest`` (default: the cache) and verify it."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    objs = _retry(f"listing {uri}", lambda: _list(client, bucket, prefix))
    if not objs:
        return _download_file(client, uri, bucket, prefix, dest)
    dest = Path(dest) if dest else cache_root() / "s3" / bucket / (prefix or "_root")
    keys = {o["Key"][len(prefix) + 1 if prefix else 0:]: o for o in objs}
    if INCOMPLETE in keys and MANIFEST not in keys:
        raise StorageError(f"{uri}: incomplete (an upload was interrupted before its {MANIFEST}); refused")
    if MANIFEST in keys and (dest / MANIFEST).is_file():
        remote = json.loads(_retry(f"reading {uri}/{MANIFEST}", lambda: client.get_object(
            Bucket=bucket, Key=keys[MANIFEST]["Key"])["Body"].read()))
        if remote.get("files") == json.loads((dest / MANIFEST).read_text()).get("files"):
            try:
                verify_manifest(dest, uri)
                return dest  # cache hit
            except StorageError:
                pass

    def write(tmp: Path) -> None:
        for rel, o in keys.items():
            if not rel or rel in (MANIFEST, INCOMPLETE) or rel.endswith("/"):  # "": the folder's own marker
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _retry(f"downloading s3://{bucket}/{o['Key']}", lambda: client.download_file(bucket, o["Key"], str(target)))
            if target.stat().st_size != o["Size"]:
                raise StorageError(f"s3://{bucket}/{o['Key']}: size mismatch after download")
            etag = o.get("ETag", "").strip('"')
            if etag and "-" not in etag and hashlib.md5(target.read_bytes()).hexdigest() != etag:
                raise StorageError(f"s3://{bucket}/{o['Key']}: checksum (ETag) mismatch after download")
        if MANIFEST in keys:
            _retry(f"downloading {uri}/{MANIFEST}",
                   lambda: client.download_file(bucket, keys[MANIFEST]["Key"], str(tmp / MANIFEST)))
            verify_manifest(tmp, uri)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _download_file(client, uri: str, bucket: str, key: str, dest: str | Path | None) -> Path:
    """A single object ``s3://bucket/key`` (no folder under that prefix) into the cache."""
    head = _retry(f"{uri}: no such object or folder", lambda: client.head_object(Bucket=bucket, Key=key))
    dest = Path(dest) if dest else cache_root() / "s3" / bucket / key
    etag = head.get("ETag", "").strip('"')
    if dest.is_file() and dest.stat().st_size == head["ContentLength"] and etag and "-" not in etag \
            and hashlib.md5(dest.read_bytes()).hexdigest() == etag:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    try:
        _retry(f"downloading {uri}", lambda: client.download_file(bucket, key, str(tmp)))
        if tmp.stat().st_size != head["ContentLength"] or (
                etag and "-" not in etag and hashlib.md5(tmp.read_bytes()).hexdigest() != etag):
            raise StorageError(f"{uri}: checksum mismatch after download")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def upload(local: str | Path, uri: str) -> None:
    """Upload folder ``local`` to ``s3://bucket/prefix``: a manifest is written if absent and sent last."""
    local = Path(local)
    if not local.is_dir():
        raise StorageError(f"{local}: not a folder")
    if not (local / MANIFEST).is_file():
        write_manifest(local)
    bucket, prefix = split_s3(uri)
    client = s3_client()
    key = (lambda rel: f"{prefix}/{rel}" if prefix else rel)
    # a stale manifest must not vouch for a half-replaced folder: remove it first, send it last; until then
    # the marker tells this folder from one the project did not write (which may lack a manifest)
    _retry(f"marking {uri} incomplete", lambda: client.put_object(Bucket=bucket, Key=key(INCOMPLETE), Body=b""))
    _retry(f"deleting {uri}/{MANIFEST}", lambda: client.delete_object(Bucket=bucket, Key=key(MANIFEST)))
    for p in _files(local):
        rel = p.relative_to(local).as_posix()
        _retry(f"uploading {p} to s3://{bucket}/{key(rel)}", lambda: client.upload_file(str(p), bucket, key(rel)))
    _retry(f"uploading {uri}/{MANIFEST}", lambda: client.upload_file(str(local / MANIFEST), bucket, key(MANIFEST)))
    _retry(f"unmarking {uri}", lambda: client.delete_object(Bucket=bucket, Key=key(INCOMPLETE)))


def resolve(uri: str | os.PathLike) -> Path:
    """A local folder or file for ``uri`` (local path, or ``s3://`` downloaded and verified)."""
    if is_s3(uri):
        return download(str(uri))
    p = Path(uri).expanduser()
    if not p.exists():
        raise StorageError(f"{str(uri)!r} does not exist")
    return p


def put(local: str | Path, uri: str | os.PathLike) -> None:
    """Copy folder ``local`` to ``uri`` (a local path, atomically, or ``s3://``)."""
    if is_s3(uri):
        upload(local, str(uri))
        return
    atomic_dir(uri, lambda tmp: shutil.copytree(local, tmp, dirs_exist_ok=True,
                                                ignore=shutil.ignore_patterns(MANIFEST)))


def _bucket_answers(uri: str, what: str) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(str(uri))
    client = boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=5))
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "?")
        raise StorageError(f"{what}: {uri}: bucket {bucket!r} answered {code} (does it exist, may these "
                           "credentials use it?)") from None
    except BotoCoreError as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS default endpoint")
        raise StorageError(f"{what}: {uri}: cannot reach S3 at {endpoint}: {type(e).__name__}") from None


def check_readable(uri: str | os.PathLike, what: str) -> None:
    """Fail fast unless ``uri`` can be read: a local path that exists, or an ``s3://`` bucket that answers."""
    if is_s3(uri):
        _bucket_answers(str(uri), what)
    elif not Path(uri).expanduser().exists():
        raise StorageError(f"{what}: {str(uri)!r} does not exist")


def check_writable(uri: str | os.PathLike, what: str) -> None:
    """Fail fast (a few seconds, not a minute of retries) unless ``uri`` — a local folder or ``s3://bucket/...``
    — can be written: the folder is created and a probe file written and removed; the bucket must answer."""
    if is_s3(uri):
        _bucket_answers(str(uri), what)
        return
    p = Path(uri)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".rlr-write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{what}: {uri}: cannot write there ({e.strerror or e})") from None
