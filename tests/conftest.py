import os

DEBS_CACHE = os.environ.get("RLR_DIST_CACHE")  # as given, before a fixture points it at a tmp folder

# 2 shared cores; no outbound traffic; no hub downloads (set before torch / ray import).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from rlr_dist.ports import free_port  # noqa: E402



S3_SECRET = "rlr-test-secret-5f0c2e"  # distinctive, so a test can look for it in every log


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real HTTP S3 endpoint (moto's server) on 127.0.0.1 with a bucket ``rlr-test``; sets the AWS_* env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "RLR_DIST_CACHE": str(tmp_path_factory.mktemp("rlr-cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="rlr-test")
    yield "s3://rlr-test"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ---------------------------------------------------------------------------------- real S3 (opt-in)
RGW_BUCKET = "rlr-rgw-test"


@pytest.fixture(scope="session")
def rgw(tmp_path_factory):
    """A Ceph RADOS gateway on 127.0.0.1 (tests/rgw.py) with a bucket ``rlr-rgw-test``; the session's one.
    Tests that stop/restart the gateway take this; the others take ``rgw_server``. A bring-up that fails
    (no apt access, a daemon that does not start) fails the tests that need it, with the reason."""
    import boto3

    from rgw import RGW

    errors = []
    for _ in range(2):  # once more on fresh ports: another process may take a port between pick and bind
        server = RGW(cache=DEBS_CACHE, workdir=tmp_path_factory.mktemp("rgw"))  # cache None: ~/.cache/rlr-dist
        try:
            server.open()
            boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                         aws_secret_access_key=server.secret_key,
                         region_name="us-east-1").create_bucket(Bucket=RGW_BUCKET)
            break
        except Exception as e:  # noqa: BLE001 - reported as the tests' failure, not skipped
            server.close()
            errors.append(f"{type(e).__name__}: {e}")
            print(f"[rgw] bring-up failed: {errors[-1]}")
    else:
        pytest.fail("Ceph RGW bring-up failed twice (tests/rgw.py; needs `apt-get download` access the first "
                    "time): " + " | ".join(errors), pytrace=False)
    server.download_cache = tmp_path_factory.mktemp("rgw-rlr-cache")  # storage's download cache, not the .debs
    yield server
    server.close()


@pytest.fixture
def rgw_server(rgw, monkeypatch):
    """``s3://rlr-rgw-test`` on the session's RGW, with the AWS_* env pointing there for this test (restored
    after, so moto's ``s3_server`` env in the same session is left as it was). The two checksum variables
    make boto3 and pyarrow send Content-Length on UploadPart (RGW answers 411 to aws-chunked bodies)."""
    env = {"AWS_ENDPOINT_URL": rgw.endpoint, "AWS_ACCESS_KEY_ID": rgw.access_key,
           "AWS_SECRET_ACCESS_KEY": rgw.secret_key, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
           "RLR_DIST_CACHE": str(rgw.download_cache)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield f"s3://{RGW_BUCKET}"
