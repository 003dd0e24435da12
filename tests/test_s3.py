"""S3 checkpoints against a real SeaweedFS server (tests/support/s3server.py): round trip, multipart, retention,
corrupt/truncated/incomplete checkpoints, the server killed mid-upload, wrong credentials.

Credentials reach the code under test only through the environment (AWS_ACCESS_KEY_ID/...), like a pod's
Secret; the server's secret must never show up in an error, a log line or the stats.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import pytest
import torch

from tests.support.s3server import S3Server, s3_env, s3_server  # noqa: F401 (fixtures)
from trainer.checkpoint import Checkpointer
from trainer.storage import MiB, S3Storage, StorageConfigError, StorageError


class Logs(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def state(v: float, n: int = 16) -> dict:
    return {"w": torch.full((n,), float(v)), "step": int(v), "opt": {"lr": v / 10}}


def keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    resp = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_round_trip_layout_and_manifest(s3_env):
    bucket = s3_env.create_bucket()
    # no s3_endpoint argument: it comes from $AWS_ENDPOINT_URL_S3, credentials from the environment
    ck = Checkpointer(f"s3://{bucket}/runs/a", keep=3)
    ck.save(1, state(1))
    ck.save(2, state(2), extra={"config.yaml": b"model: wrn\n"})
    assert ck.wait(30)
    assert keys(s3_env, bucket) == [
        "runs/a/step-000000001/manifest.json",
        "runs/a/step-000000001/state.pt",
        "runs/a/step-000000002/config.yaml",
        "runs/a/step-000000002/manifest.json",
        "runs/a/step-000000002/state.pt",
    ]
    client = s3_env.client()
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/a/step-000000002/manifest.json")["Body"].read())
    blob = client.get_object(Bucket=bucket, Key="runs/a/step-000000002/state.pt")["Body"].read()
    assert manifest["files"]["state.pt"] == {
        "object": "state.pt",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    # a fresh process (new Checkpointer) finds and verifies it
    step, sd = Checkpointer(f"s3://{bucket}/runs/a/", keep=3).latest()
    assert step == 2 and torch.equal(sd["w"], torch.full((16,), 2.0)) and sd["opt"]["lr"] == 0.2
    assert ck.load_file(2, "config.yaml") == b"model: wrn\n"
    st = ck.stats
    assert st["uploads_total"] == 2 and st["failures_total"] == 0 and st["last_success_step"] == 2


def test_multipart_upload_of_a_large_object(s3_env):
    bucket = s3_env.create_bucket()
    ck = Checkpointer(f"s3://{bucket}/big", s3_endpoint=s3_env.endpoint, s3_multipart_chunksize=5 * MiB)
    big = {"w": torch.randn(5_000_000, generator=torch.Generator().manual_seed(0))}  # 20 MB
    ck.save(10, big)
    assert ck.wait(60)
    head = s3_env.client().head_object(Bucket=bucket, Key="big/step-000000010/state.pt")
    # a multipart object's ETag is "<md5 of part md5s>-<number of parts>"
    assert head["ETag"].strip('"').endswith(f"-{math.ceil(head['ContentLength'] / (5 * MiB))}")
    assert head["ContentLength"] > 20_000_000
    assert torch.equal(ck.load(10)["w"], big["w"])


def test_part_size_keeps_multi_gb_checkpoints_under_10000_parts():
    st = S3Storage("any-bucket", "p", endpoint_url="http://127.0.0.1:9", check=False)  # no request made
    assert st.part_size(100 * MiB) == 64 * MiB
    for size in (5 << 30, 700 << 30, 4 << 40):
        part = st.part_size(size)
        assert part % MiB == 0 and math.ceil(size / part) <= 10_000


def test_retention_and_partial_prefix_collection(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # explicit endpoint this time
    bucket = s3_env.create_bucket()
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="r/step-000000002/state.pt", Body=b"left by a crash")
    client.put_object(Bucket=bucket, Key="r/step-000000099/state.pt", Body=b"newer than any complete one")
    client.put_object(Bucket=bucket, Key="r/notes.txt", Body=b"not ours")
    ck = Checkpointer(f"s3://{bucket}/r", keep=2, s3_endpoint=s3_env.endpoint)
    for s in (1, 3, 4, 5):
        ck.save(s, state(s))
    assert ck.wait(30)
    assert ck.steps() == [5, 4]
    assert keys(s3_env, bucket) == [
        "r/notes.txt",
        "r/step-000000004/manifest.json",
        "r/step-000000004/state.pt",
        "r/step-000000005/manifest.json",
        "r/step-000000005/state.pt",
        "r/step-000000099/state.pt",
    ]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest"])
def test_damaged_newest_falls_back_to_previous(s3_env, damage):
    bucket = s3_env.create_bucket()
    logs = Logs()
    ck = Checkpointer(f"s3://{bucket}/d", keep=3, log=logs)
    ck.save(1, state(1))
    ck.save(2, state(2))
    assert ck.wait(30)
    client, key = s3_env.client(), "d/step-000000002/state.pt"
    blob = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if damage == "flip":
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    elif damage == "truncate":
        client.put_object(Bucket=bucket, Key=key, Body=blob[: len(blob) // 2])
    else:  # crash between the state object and the manifest
        client.delete_object(Bucket=bucket, Key="d/step-000000002/manifest.json")
    step, sd = ck.latest()
    assert step == 1 and sd["step"] == 1 and torch.equal(sd["w"], torch.full((16,), 1.0))
    if damage == "no-manifest":
        assert logs == [] and ck.steps() == [1]
    else:
        assert len(logs) == 1 and "step-000000002/state.pt" in logs[0] and "sha256 mismatch" in logs[0], logs


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_step_is_written_again_under_fresh_keys(s3_env, damage):
    """Saving a step whose manifest exists but does not verify replaces it: the damaged object is never
    overwritten (a fresh key, recorded by a new manifest), then collected; a verified step is kept as it is."""
    bucket = s3_env.create_bucket()
    logs = Logs()
    ck = Checkpointer(f"s3://{bucket}/w", keep=3, log=logs)
    ck.save(1, state(1))
    ck.save(2, state(2))
    assert ck.wait(30)
    client, key = s3_env.client(), "w/step-000000002/state.pt"
    blob = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    bad = blob[: len(blob) // 2] if damage == "truncate" else blob[:-1] + bytes([blob[-1] ^ 0x01])
    client.put_object(Bucket=bucket, Key=key, Body=bad)
    ck.save(2, state(2.5))
    assert ck.wait(30)
    assert any("writing checkpoint step 2 again" in m for m in logs), logs
    assert keys(s3_env, bucket, "w/step-000000002/") == [
        "w/step-000000002/manifest.json",
        "w/step-000000002/state.1.pt",
    ]
    step, sd = ck.latest()
    assert step == 2 and torch.equal(sd["w"], torch.full((16,), 2.5))
    assert ck.stats["uploads_total"] == 3
    ck.save(2, state(7))  # verifies now: kept, not uploaded again
    assert ck.wait(30)
    assert "verifies; kept" in logs[-1] and ck.stats["uploads_total"] == 3
    assert torch.equal(ck.load(2)["w"], torch.full((16,), 2.5))


def test_server_killed_mid_upload(s3_env, capfd):
    """kill -9 of the S3 server while a 64 MB checkpoint uploads: save() returns at once, failures are
    logged and counted, the previous checkpoint stays intact and is never replaced by a partial one, and
    after the server comes back (same data dir) the retry completes."""
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/k"
    logs = Logs()
    ck = Checkpointer(
        uri, keep=2, s3_max_attempts=2, s3_multipart_chunksize=5 * MiB, retry_base_s=0.2, retry_cap_s=1.0, log=logs
    )
    one = state(1)
    ck.save(1, one)
    assert ck.wait(30)
    big = {"w": torch.randn(16 * MiB, generator=torch.Generator().manual_seed(1)), "step": 2}  # 64 MB
    t0 = time.monotonic()
    ck.save(2, big)  # must not raise, must not wait for the upload
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 30
    while ck.stats["pending_bytes_done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert 0 < ck.stats["pending_bytes_done"] < ck.stats["pending_bytes_total"], ck.stats
    s3_env.kill()
    while ck.stats["failures_total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    st = ck.stats
    assert st["failures_total"] >= 1 and st["consecutive_failures"] >= 1 and st["pending_step"] == 2, st
    assert st["uploads_total"] == 1 and st["last_success_step"] == 1
    assert any(
        m.startswith("warning: checkpoint step 2 upload failed (attempt 1): ") and "retrying in" in m for m in logs
    ), logs

    s3_env.restart()

    def check_latest() -> int:
        # whatever a resuming job would pick must be a whole checkpoint: step 1 or the complete step 2
        step, sd = Checkpointer(uri, keep=2).latest()
        assert step in (1, 2)
        assert torch.equal(sd["w"], (one if step == 1 else big)["w"])
        return step

    check_latest()
    assert ck.wait(60)
    st = ck.stats
    assert st["uploads_total"] == 2 and st["consecutive_failures"] == 0 and st["last_success_step"] == 2, st
    assert check_latest() == 2
    assert ck.steps() == [2, 1] and ck.load(1)["step"] == 1  # the good checkpoint survived kill -9
    assert not s3_env.client().list_multipart_uploads(Bucket=bucket).get("Uploads")  # interrupted one aborted
    assert any("uploaded after" in m for m in logs), logs
    out = capfd.readouterr()
    for text in (*logs, json.dumps(st), out.out, out.err):
        assert s3_env.secret_key not in text


@pytest.mark.parametrize("wrong", ["secret", "key-id"])
def test_wrong_credentials_give_one_clear_line_without_the_secret(s3_env, monkeypatch, capfd, wrong):
    bucket = s3_env.create_bucket()
    bad_secret = "WRONG-secret-do-not-print-81f3"
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
        code = "SignatureDoesNotMatch"
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NO-SUCH-KEY-ID")
        code = "InvalidAccessKeyId"
    with pytest.raises(StorageConfigError) as info:
        Checkpointer(f"s3://{bucket}/run", s3_max_attempts=1)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI's exit 2: a restart cannot fix it
    assert "\n" not in msg and bucket in msg and code in msg and info.value.code == code, msg
    out = capfd.readouterr()
    for text in (msg, repr(info.value), out.out, out.err):
        assert bad_secret not in text and s3_env.secret_key not in text


def test_missing_bucket_and_unreachable_endpoint(s3_env, monkeypatch):
    with pytest.raises(StorageConfigError, match="no-such-bucket-x1.*NoSuchBucket"):
        Checkpointer("s3://no-such-bucket-x1/run", s3_max_attempts=1)
    # nothing listens on port 9 (discard): an outage, which a restart may cure -> not a config error
    with pytest.raises(StorageError) as info:
        Checkpointer("s3://some-bucket/run", s3_endpoint="http://127.0.0.1:9", s3_max_attempts=1)
    assert not isinstance(info.value, StorageConfigError)
    assert "127.0.0.1:9" in str(info.value) and "some-bucket" in str(info.value)
    assert s3_env.secret_key not in str(info.value)
