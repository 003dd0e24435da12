"""A checkpoint location belongs to one run (identity.json) and takes one live writer at a time (lease), with
the real CLI on a local folder and on a real S3 server (SeaweedFS), see trainer/ownership.py.

Before: a run with another config pointed at another run's checkpoint.uri exited 0 and reported that run's
model as its own (or, with another model, ended in a traceback after writing config.yaml), and two live
writers shared a location silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FMNIST, ROOT, cli_env, run_cli, torchrun_command
from tests.support.s3server import s3_env, s3_server  # noqa: F401 (fixtures)
from trainer import ownership
from trainer.checkpoint import Checkpointer
from trainer.ownership import IDENTITY, LEASE, FileLock, LeaseHeld, S3Lease
from trainer.storage import StorageError, open_storage

FINAL_STEP = 8  # 2 epochs of 64 synthetic images in batches of 16


def train_args(run_dir: Path, *extra: str) -> list[str]:
    """A small deterministic one-process run with a checkpoint every 2 steps."""
    sets = [
        "data.loader=memory",
        "data.path=synthetic:8x8:3:64",
        "data.limit=0",
        "data.augment=none",
        "loop.epochs=2",
        "loop.batch_size=16",
        "loop.deterministic=true",
        "loop.log_every=1",
        "gnp.hybrid_p=0.7",
        "checkpoint.every_steps=2",
        "checkpoint.keep=3",
        f"run.dir={run_dir}",
        *extra,
    ]
    return ["train", "--recipe", "debug-cpu", *[a for s in sets for a in ("--set", s)]]


def tree(path: Path) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file under `path`: what a refused run must not touch."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def bucket_tree(server, bucket: str) -> dict:
    resp = server.client().list_objects_v2(Bucket=bucket)
    return {o["Key"]: (o["Size"], o["ETag"], o["LastModified"]) for o in resp.get("Contents", [])}


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def starts(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "start"]


def weights(sd: dict) -> dict:
    out = {f"model.{k}": v for k, v in sd["model"].items()}
    for pid, st in sd["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs from the uninterrupted run"


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "change, first_diff",
    [
        (["optim.lr=0.5", "gnp.alpha=0"], "gnp.alpha: 0.8 -> 0.0"),
        (["model.name=resnet18"], "model.name: 'resnet_debug' -> 'resnet18'"),
    ],
)
def test_another_runs_local_location_is_refused_before_any_write(tmp_path, change, first_diff):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*train_args(a)).returncode == 0
    record = json.loads((a / "checkpoints" / IDENTITY).read_text())
    assert record["format"] == 1 and record["config"]["gnp"]["alpha"] == 0.8
    before = tree(a)
    res = run_cli(*train_args(b, f"checkpoint.uri={a / 'checkpoints'}", *change))
    assert res.returncode == 2, res.stderr[-3000:]
    assert one_line(res) == (
        f"error: checkpoint.uri: {str(a / 'checkpoints')!r} holds the checkpoints of another run (identity.json: "
        f"{first_diff}); a checkpoint location belongs to the run that made it: use another checkpoint.uri "
        f"(or run.dir)"
    )
    assert not b.exists() and tree(a) == before
    # The same config from another run directory is the same run: it finds the finished checkpoint.
    res = run_cli(*train_args(tmp_path / "c", f"checkpoint.uri={a / 'checkpoints'}", "loop.max_steps=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert starts(tmp_path / "c")[0]["resumed_from_step"] == FINAL_STEP


def test_another_runs_s3_location_is_refused_before_any_write(tmp_path, s3_env):
    bucket = s3_env.create_bucket()
    uri = f"s3://{bucket}/run"
    res = run_cli(*train_args(tmp_path / "a", f"checkpoint.uri={uri}"), **s3_env.env())
    assert res.returncode == 0, res.stderr[-3000:]
    before = bucket_tree(s3_env, bucket)
    assert "run/identity.json" in before and "run/lease.json" not in before  # released at the clean exit
    res = run_cli(*train_args(tmp_path / "b", f"checkpoint.uri={uri}", "optim.lr=0.5", "gnp.alpha=0"), **s3_env.env())
    assert res.returncode == 2, res.stderr[-3000:]
    assert one_line(res).startswith(
        f"error: checkpoint.uri: 's3://{bucket}/run' holds the checkpoints of another run (identity.json: "
        "gnp.alpha: 0.8 -> 0.0); "
    )
    assert not (tmp_path / "b").exists() and bucket_tree(s3_env, bucket) == before


def test_locations_without_identity_record_are_adopted_only_by_the_same_config(tmp_path):
    """Checkpoints written before identity records: the run directory's config.yaml vouches for them; without
    one (a pod's emptyDir run.dir), the config embedded in the newest checkpoint decides."""
    ref = tmp_path / "ref"
    assert run_cli(*train_args(ref)).returncode == 0
    reference = Checkpointer(ref / "checkpoints").latest()[1]

    old = tmp_path / "old"  # stopped at step 4, then its record removed: as an earlier version left it
    assert run_cli(*train_args(old, "loop.max_steps=4")).returncode == 0
    (old / "checkpoints" / IDENTITY).unlink()
    res = run_cli(*train_args(tmp_path / "other", f"checkpoint.uri={old / 'checkpoints'}", "gnp.alpha=0"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "holds the checkpoints of another run (step 4's config: gnp.alpha: 0.8 -> 0.0)" in one_line(res)
    assert not (tmp_path / "other").exists() and not (old / "checkpoints" / IDENTITY).exists()

    # The same config from a run directory without config.yaml: adopted through the embedded config.
    res = run_cli(*train_args(tmp_path / "pod", f"checkpoint.uri={old / 'checkpoints'}", "loop.max_steps=6"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert starts(tmp_path / "pod")[0]["resumed_from_step"] == 4
    assert json.loads((old / "checkpoints" / IDENTITY).read_text())["config"]["gnp"]["alpha"] == 0.8

    # Vouched for by its own config.yaml: the record removed again, the run finishes where the reference did.
    (old / "checkpoints" / IDENTITY).unlink()
    res = run_cli(*train_args(old))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s["resumed_from_step"] for s in starts(old)] == [None, 6]
    assert (old / "checkpoints" / IDENTITY).is_file()
    step, sd = Checkpointer(old / "checkpoints").latest()
    assert step == FINAL_STEP
    assert_bitwise(sd, reference)


# ---------------------------------------------------------------------------------------------- leases


def _start_writer(run_dir: Path, *extra: str, **env: str) -> subprocess.Popen:
    """A long run (200 epochs) in its own session, returned once it has trained a step."""
    argv = train_args(run_dir, "loop.epochs=200", *extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *argv],
        cwd=ROOT,
        env=cli_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the first writer did not start training: {proc.communicate()[1][-3000:]}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_live_writer_is_refused_and_a_dead_ones_lease_taken_over(tmp_path, where, request):
    env, extra = {}, []
    if where == "s3":
        server = request.getfixturevalue("s3_env")
        bucket = server.create_bucket()
        extra = [f"checkpoint.uri=s3://{bucket}/run"]
        env = {**server.env(), "GNP_LEASE_STALE_S": "4"}
    run_dir = tmp_path / "run"
    first = _start_writer(run_dir, *extra, **env)
    try:
        # Another run directory, same location (S3) or the same run directory (local): either way one writer.
        second_dir = tmp_path / "second" if where == "s3" else run_dir
        before = tree(run_dir)
        res = run_cli(*train_args(second_dir, "loop.epochs=200", *extra), **env)
        assert res.returncode == 200, res.stderr[-3000:]
        line = one_line(res)
        what = f"checkpoint.uri: 's3://{bucket}/run'" if where == "s3" else f"run.dir: {str(run_dir)!r}"
        assert line.startswith(f"error: {what} is in use by another live writer (pid {first.pid} on host "), line
        assert line.endswith("then rerun (retryable: exit 200)")
        assert not (tmp_path / "second").exists()
        after = tree(run_dir)
        assert "metrics.jsonl" in after and after["config.yaml"] == before["config.yaml"]
        assert starts(run_dir) == starts(run_dir)[:1]  # the refused run logged no start
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies without releasing anything
        first.wait()
    # The dead writer's lock is gone with it (local); its S3 lease goes stale after 4 s and is taken over.
    if where == "s3":
        time.sleep(4.5)  # its last renewal was at most 1 s before the kill
    third = tmp_path / "third" if where == "s3" else run_dir
    res = run_cli(*train_args(third, "loop.epochs=200", "loop.max_steps=1", *extra), **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("took over the stale lease" in res.stderr) == (where == "s3"), res.stderr[-3000:]


def test_s3_lease_is_renewed_while_held_and_released(s3_env):
    storage = open_storage(f"s3://{s3_env.create_bucket()}/loc")
    logs = []
    holder = S3Lease(storage, stale_s=1.0, log=logs.append)
    holder.acquire()
    try:
        time.sleep(2.5)  # without renewal (every 0.25 s) the lease would be stale by now
        other = S3Lease(storage, stale_s=1.0, log=logs.append)
        other.owner = "another-host/boot/1@1"
        with pytest.raises(LeaseHeld, match=r"is in use by another live writer \(pid \d+ on host .* stale after 1 s"):
            other.acquire()
    finally:
        holder.release()
    assert LEASE not in storage.list("")
    other.acquire()  # free again: taken without a warning
    other.release()
    assert logs == []


def test_s3_lease_rides_out_an_outage_but_not_a_take_over(s3_env):
    """While renewals fail the lease is unconfirmed (no checkpoint is committed) but the run goes on; the first
    renewal after the outage confirms it again. A lease replaced by another writer ends the holder."""
    storage = open_storage(f"s3://{s3_env.create_bucket()}/loc", max_attempts=1)
    logs, lost = [], []
    holder = S3Lease(storage, stale_s=2.0, log=logs.append)
    holder.on_lost = lambda: lost.append(True)
    holder.acquire()
    try:
        holder.check()
        s3_env.kill()
        time.sleep(2.5)
        with pytest.raises(StorageError, match=r"last renewed \d+ s ago; not committing a checkpoint"):
            holder.check()
        s3_env.restart()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                holder.check()
                break
            except StorageError:
                time.sleep(0.2)
        holder.check()  # confirmed again, still ours
        assert lost == [] and logs == []
        client = s3_env.client()
        client.put_object(Bucket=storage.bucket, Key="loc/" + LEASE, Body=b'{"owner": "someone else"}')
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lost == [True] and "lost the lease on" in logs[-1] and "replaced or removed" in logs[-1]
    finally:
        holder.release()
    assert storage.get(LEASE) == b'{"owner": "someone else"}'  # not deleted: no longer the holder's


def test_local_lock_is_exclusive_within_a_process_and_released(tmp_path):
    lock = FileLock(tmp_path, "run.dir")
    lock.acquire()
    with pytest.raises(LeaseHeld, match=r"run\.dir: .* is in use by another live writer \(pid \d+"):
        FileLock(tmp_path, "run.dir").acquire()
    # and from another process, which the kernel's record lock excludes
    code = "from pathlib import Path; from trainer.ownership import FileLock; FileLock(Path(%r), 'run.dir').acquire()"
    res = subprocess.run([sys.executable, "-c", code % str(tmp_path)], env=cli_env(), capture_output=True, text=True)
    assert res.returncode != 0 and f"(pid {os.getpid()} on host" in res.stderr
    lock.release()
    res = subprocess.run([sys.executable, "-c", code % str(tmp_path)], env=cli_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_owner_of_a_torchrun_rank_is_its_agent(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    mine = ownership.owner_token()
    assert f"/{os.getpid()}@" in mine
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert f"/{os.getppid()}@" in ownership.owner_token()


@pytest.mark.dist
def test_torchrun_restart_after_rank0_is_killed_takes_its_own_s3_lease_back(tmp_path, s3_env):
    """The lease's owner is rank 0's torchrun agent: the worker group it restarts (--max-restarts) after a
    SIGKILLed rank 0 is the same writer and resumes at once, without waiting for the lease to go stale."""
    run_dir, uri = tmp_path / "run", f"s3://{s3_env.create_bucket()}/run"
    argv = train_args(run_dir, "loop.epochs=12", f"checkpoint.uri={uri}")
    agent = subprocess.Popen(
        torchrun_command("--max-restarts=2", "-m", "trainer", *argv),
        cwd=ROOT,
        env=cli_env(**s3_env.env(), GNP_LEASE_STALE_S="600"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, killed = time.monotonic() + 180, None
        while killed is None and time.monotonic() < deadline and agent.poll() is None:
            logged = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").is_file() else ""
            if logged.count('"kind": "checkpoint"') >= 2:  # a checkpoint to resume from has landed
                for pid in subprocess.run(
                    ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
                ).stdout.split():
                    if b"LOCAL_RANK=0\0" in Path(f"/proc/{pid}/environ").read_bytes():
                        killed = int(pid)
                        os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        _, err = agent.communicate(timeout=400)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert killed is not None, err[-3000:]
    assert agent.returncode == 0, err[-3000:]
    assert "in use by another live writer" not in err and "took over the stale lease" not in err, err[-3000:]
    runs = starts(run_dir)
    assert len(runs) >= 2 and runs[-1]["restart"] >= 1 and runs[-1]["resumed_from_step"] is not None, runs
    assert LEASE not in open_storage(uri).list("")  # released at the clean end


def test_the_pre_run_state_fixture_is_adopted_through_its_embedded_config(tmp_path):
    """tests/data/checkpoint_before_run_state (written by an earlier version: no identity record) pointed at
    from a run directory without config.yaml: another config is refused, the same one resumes and records."""
    if not FMNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    loc = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "data" / "checkpoint_before_run_state", loc)
    sets = ["data.loader=memory", f"data.path=fashion-mnist:{FMNIST}", "data.limit=512", "data.augment=none"]
    sets.append(f"checkpoint.uri={loc}")
    argv = ["train", "--recipe", "debug-cpu", *[a for s in sets for a in ("--set", s)]]
    res = run_cli(*argv, "--set", f"run.dir={tmp_path / 'other'}", "--set", "optim.lr=0.5")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "holds the checkpoints of another run (step 16's config: optim.lr: " in one_line(res)
    assert not (loc / IDENTITY).exists() and not (tmp_path / "other").exists()
    res = run_cli(*argv, "--set", f"run.dir={tmp_path / 'pod'}", "--set", "loop.max_steps=17")
    assert res.returncode == 0, res.stderr[-3000:]
    assert starts(tmp_path / "pod")[0]["resumed_from_step"] == 16
    assert json.loads((loc / IDENTITY).read_text())["config"]["model"]["name"] == "resnet_debug"
