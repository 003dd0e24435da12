"""Checkpoints in a local folder: manifest written last, corrupt/truncated/partial checkpoints skipped,
retention, background upload with retries (the same Checkpointer serves S3: see test_s3.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch

from trainer.checkpoint import Checkpointer, CheckpointError, LocalCheckpointer
from trainer.storage import LocalStorage, StorageError, open_storage


def state(v: float) -> dict:
    return {"w": torch.full((4, 4), v), "step": int(v), "nested": {"lr": v / 10, "names": ["a", "b"]}}


class Logs(list):
    """A `log` callable that keeps the lines."""

    def __call__(self, msg: str) -> None:
        self.append(msg)


class FlakyStorage(LocalStorage):
    """A real local folder whose puts fail while `failing(key)` says so; records every key written."""

    def __init__(self, root, failing=lambda key: False, gate: threading.Event | None = None):
        super().__init__(root)
        self.failing, self.gate, self.puts = failing, gate, []

    def put(self, key, data, progress=None):
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.failing(key):
            raise StorageError(f"{self.uri}: put {key!r} failed: SlowDown (injected)", code="SlowDown")
        self.puts.append(key)
        super().put(key, data, progress)


def test_round_trip_and_latest(tmp_path):
    ck = LocalCheckpointer(tmp_path, keep=3)
    for s in (1, 2, 3):
        ck.save(s, state(s))
    assert ck.wait(30)
    step, sd = ck.latest()
    assert step == 3 and torch.equal(sd["w"], torch.full((4, 4), 3.0)) and sd["nested"]["names"] == ["a", "b"]
    assert ck.steps() == [3, 2, 1]
    st = ck.stats
    assert st["uploads_total"] == 3 and st["failures_total"] == 0 and st["last_success_step"] == 3
    assert st["pending_step"] == -1 and st["last_success_unix"] > time.time() - 60
    ck.close()


def test_layout_and_manifest_checked_independently(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=2)
    ck.save(7, state(7), extra={"config.yaml": b"model: wrn\n"})
    assert ck.wait(30)
    folder = tmp_path / "step-000000007"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "manifest.json", "state.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 7
    for name in ("state.pt", "config.yaml"):
        blob = (folder / name).read_bytes()
        assert manifest["files"][name] == {
            "object": name,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
    assert ck.load_file(7, "config.yaml") == b"model: wrn\n"
    assert torch.equal(torch.load(folder / "state.pt", weights_only=True)["w"], torch.full((4, 4), 7.0))


def test_keeps_last_k(tmp_path):
    ck = LocalCheckpointer(tmp_path, keep=2)
    for s in range(1, 6):
        ck.save(s, state(s))
    assert ck.wait(30)
    assert ck.steps() == [5, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest", "missing-object"])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
    logs = Logs()
    ck = LocalCheckpointer(tmp_path, keep=3, log=logs)
    ck.save(1, state(1))
    ck.save(2, state(2))
    assert ck.wait(30)
    folder = tmp_path / "step-000000002"
    blob = folder / "state.pt"
    if damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "no-manifest":  # a crash between the state file and the manifest
        (folder / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        blob.unlink()
    step, sd = ck.latest()
    assert step == 1 and sd["step"] == 1
    if damage != "no-manifest":
        assert len(logs) == 1 and "skipping" in logs[0] and "step-000000002" in logs[0], logs
    else:
        assert ck.steps() == [1] and logs == []


def test_default_log_goes_to_stderr(tmp_path, capsys):
    ck = Checkpointer(tmp_path)
    ck.save(1, state(1))
    ck.save(2, state(2))
    assert ck.wait(30)
    (tmp_path / "step-000000002" / "state.pt").write_bytes(b"junk")
    assert ck.latest()[0] == 1
    assert "warning: skipping" in capsys.readouterr().err


def test_loads_weights_only(tmp_path):
    """A pickle that would run code is refused (weights_only=True), even with a matching manifest."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    folder = tmp_path / "step-000000001"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "state.pt")
    data = (folder / "state.pt").read_bytes()
    (folder / "manifest.json").write_text(
        json.dumps({"step": 1, "files": {"state.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}})
    )
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        LocalCheckpointer(tmp_path).load(1)


def test_keep_must_be_two_or_more(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep"):
        LocalCheckpointer(tmp_path, keep=1)


def test_save_returns_while_upload_runs_and_wait_drains(tmp_path):
    gate = threading.Event()
    ck = Checkpointer(tmp_path, storage=FlakyStorage(tmp_path, gate=gate))
    t0 = time.monotonic()
    ck.save(1, state(1))
    assert time.monotonic() - t0 < 5
    assert ck.stats["pending_step"] == 1 and ck.steps() == []  # not committed yet
    assert ck.wait(timeout=0.2) is False
    gate.set()
    assert ck.wait(30) is True
    assert ck.steps() == [1] and ck.stats["pending_step"] == -1


def test_failed_uploads_retry_with_capped_backoff_and_one_line_warnings(tmp_path):
    failures = {"n": 3}

    def failing(key):
        if key.endswith("state.pt") and failures["n"]:
            failures["n"] -= 1
            return True
        return False

    logs = Logs()
    store = FlakyStorage(tmp_path, failing)
    ck = Checkpointer(tmp_path, storage=store, log=logs, retry_base_s=0.01, retry_cap_s=0.025)
    ck.save(4, state(4))
    assert ck.wait(30)
    failed = [m for m in logs if "upload failed" in m]
    # base 0.01 s doubling, capped at 0.025 s: 0.01, 0.02, 0.025
    assert [m.split("retrying in ")[1] for m in failed] == ["0.01 s", "0.02 s", "0.025 s"], logs
    for k, m in enumerate(failed, 1):
        assert m.startswith(f"warning: checkpoint step 4 upload failed (attempt {k}): ") and "SlowDown" in m
        assert "\n" not in m
    assert "uploaded after 4 attempts" in logs[-1]
    st = ck.stats
    assert (st["failures_total"], st["consecutive_failures"], st["uploads_total"]) == (3, 0, 1)
    assert "SlowDown" in st["last_error"]
    assert ck.latest()[0] == 4
    assert len(store.puts) == len(set(store.puts)), "a key was written twice"


def test_gives_up_after_max_upload_tries_and_keeps_previous(tmp_path):
    logs = Logs()
    broken = {"on": False}
    ck = Checkpointer(
        tmp_path,
        storage=FlakyStorage(tmp_path, lambda k: broken["on"]),
        log=logs,
        max_upload_tries=2,
        retry_base_s=0.01,
    )
    ck.save(1, state(1))
    assert ck.wait(30)
    broken["on"] = True
    ck.save(2, state(2))
    assert ck.wait(30) is False
    assert "giving up after 2 attempts" in logs[-1]
    st = ck.stats
    assert st["consecutive_failures"] == 2 and st["abandoned_total"] == 1 and st["last_success_step"] == 1
    assert ck.latest()[0] == 1


def test_newer_save_supersedes_one_waiting_to_retry(tmp_path):
    """An outage longer than the checkpoint interval must not block training: save() does not wait for
    the retries of an older checkpoint, it replaces it."""
    logs = Logs()
    broken = {"on": True}
    ck = Checkpointer(
        tmp_path, storage=FlakyStorage(tmp_path, lambda k: broken["on"]), log=logs, retry_base_s=30, retry_cap_s=30
    )
    ck.save(1, state(1))
    deadline = time.monotonic() + 10
    while ck.stats["failures_total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    broken["on"] = False
    t0 = time.monotonic()
    ck.save(2, state(2))
    assert time.monotonic() - t0 < 10  # far less than the 30 s backoff
    assert ck.wait(30)
    assert ck.steps() == [2] and ck.stats["abandoned_total"] == 1
    assert any("step 1 abandoned" in m and "superseded" in m for m in logs), logs


def test_never_overwrites_a_key_of_an_interrupted_attempt(tmp_path):
    # An earlier process wrote state.pt for step 3 and died before the manifest.
    (tmp_path / "step-000000003").mkdir()
    (tmp_path / "step-000000003" / "state.pt").write_bytes(b"half a checkpoint")
    store = FlakyStorage(tmp_path)
    ck = Checkpointer(tmp_path, storage=store)
    ck.save(3, state(3))
    assert ck.wait(30)
    assert "step-000000003/state.pt" not in store.puts
    manifest = json.loads((tmp_path / "step-000000003" / "manifest.json").read_text())
    assert manifest["files"]["state.pt"]["object"] == "state.1.pt"
    assert ck.load(3)["step"] == 3
    # the stale object is no longer referenced and was cleaned up
    assert sorted(p.name for p in (tmp_path / "step-000000003").iterdir()) == ["manifest.json", "state.1.pt"]


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    logs = Logs()
    ck = Checkpointer(tmp_path, log=logs)
    ck.save(5, state(5))
    assert ck.wait(30)
    ck.save(5, state(99))
    assert ck.wait(30)
    assert ck.load(5)["step"] == 5 and "already exists" in logs[-1] and "verifies" in logs[-1]


def test_partial_prefixes_older_than_newest_complete_are_collected(tmp_path):
    for s in (1, 9):
        (tmp_path / f"step-00000000{s}").mkdir()
        (tmp_path / f"step-00000000{s}" / "state.pt").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    ck = Checkpointer(tmp_path)
    ck.save(5, state(5))
    assert ck.wait(30)
    # step 1 is dead; step 9 is newer than every complete checkpoint, so it is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-000000005", "step-000000009"]


def test_local_storage_contract(tmp_path):
    st = open_storage(tmp_path / "root")
    assert isinstance(st, LocalStorage) and st.list() == []
    st.put("a/b/c.bin", b"123")
    st.put("a/d.bin", b"4")
    (tmp_path / "root" / "a" / ".d.bin.tmp-1-2").write_bytes(b"left by a killed writer")
    assert st.list() == ["a/b/c.bin", "a/d.bin"] and st.list("a/b") == ["a/b/c.bin"]
    assert st.get("a/b/c.bin") == b"123"
    st.abort_incomplete("a/")
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b", "d.bin"]
    st.delete(["a/b/c.bin", "a/missing"])
    assert st.list() == ["a/d.bin"] and not (tmp_path / "root" / "a" / "b").exists()
    with pytest.raises(StorageError, match="does not exist"):
        st.get("a/b/c.bin")
    with pytest.raises(ValueError, match="storage key"):
        st.put("../escape", b"")
    with pytest.raises(ValueError, match="checkpoint.uri"):
        open_storage("gs://bucket/x")


def test_from_config_uses_the_section_and_the_default_dir(tmp_path, monkeypatch):
    from trainer import checkpoint
    from trainer.config import CheckpointConfig

    # Empty uri: the run's default folder; keep comes from the section (3 survive 4 saves).
    ck = Checkpointer.from_config(CheckpointConfig(keep=3), tmp_path / "run" / "checkpoints")
    for s in (1, 2, 3, 4):
        ck.save(s, state(s))
        assert ck.wait(timeout=30)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000000002",
        "step-000000003",
        "step-000000004",
    ]
    ck.close()
    # A set uri wins over the default; the S3 settings reach the storage (recorded, not dialled).
    seen = {}

    def fake_open(uri, **kw):
        seen.update(uri=uri, **kw)
        return open_storage(tmp_path / "other")

    monkeypatch.setattr(checkpoint, "open_storage", fake_open)
    cfg = CheckpointConfig(
        uri="s3://bucket/p", s3_endpoint="http://s3:8333", s3_region="eu-1", s3_retry_mode="adaptive", s3_max_attempts=9
    )
    Checkpointer.from_config(cfg, tmp_path / "unused").close()
    assert seen["uri"] == "s3://bucket/p" and not (tmp_path / "unused").exists()
    assert (seen["endpoint_url"], seen["region"], seen["retry_mode"], seen["max_attempts"]) == (
        "http://s3:8333",
        "eu-1",
        "adaptive",
        9,
    )


def _damage(folder, how: str) -> None:
    blob = folder / "state.pt"
    if how == "truncate":
        blob.write_bytes(blob.read_bytes()[:-100])
    elif how == "flip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif how == "bad-manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        blob.unlink()


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad-manifest", "missing-object"])
def test_a_step_that_does_not_verify_is_written_again(tmp_path, damage):
    """A rerun that reaches a damaged step replaces it (before, the damaged manifest kept the step 'done'
    forever and the newest loadable checkpoint stayed an older one)."""
    logs = Logs()
    ck = Checkpointer(tmp_path, keep=3, log=logs)
    ck.save(1, state(1))
    ck.save(2, state(2))
    assert ck.wait(30)
    _damage(tmp_path / "step-000000002", damage)
    assert ck.latest()[0] == 1
    ck.save(2, state(2.5))
    assert ck.wait(30)
    assert any("writing checkpoint step 2 again" in m and "step-000000002" in m for m in logs), logs
    step, sd = ck.latest()
    assert step == 2 and torch.equal(sd["w"], torch.full((4, 4), 2.5))
    assert ck.stats["uploads_total"] == 3
    # Only the new objects and manifest remain: the damaged objects were collected.
    names = sorted(p.name for p in (tmp_path / "step-000000002").iterdir())
    manifest = json.loads((tmp_path / "step-000000002" / "manifest.json").read_text())
    assert names == sorted(["manifest.json", manifest["files"]["state.pt"]["object"]])


def test_a_verified_step_is_kept_and_not_counted_as_uploaded(tmp_path):
    logs = Logs()
    ck = Checkpointer(tmp_path, log=logs)
    ck.save(5, state(5))
    assert ck.wait(30)
    ck.save(5, state(99))
    assert ck.wait(30)
    assert ck.load(5)["step"] == 5 and "verifies; kept" in logs[-1]
    assert ck.stats["uploads_total"] == 1 and ck.stats["last_success_step"] == 5


def test_verify_checks_every_object_of_the_manifest(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(3, state(3), extra={"config.yaml": b"a: 1\n"})
    assert ck.wait(30)
    ck.verify(3)
    (tmp_path / "step-000000003" / "config.yaml").write_bytes(b"a: 2\n")
    with pytest.raises(CheckpointError, match="config.yaml: size/sha256 mismatch"):
        ck.verify(3)
    with pytest.raises(CheckpointError, match="no manifest"):
        ck.verify(4)


def test_retention_keeps_the_verified_steps_below_a_newer_damaged_one(tmp_path):
    """Steps above the one just written are an earlier attempt's, not verified (the run resumed below them):
    they must not push verified checkpoints out of `keep`."""
    ck = Checkpointer(tmp_path, keep=2)
    for s in (2, 4, 6):
        ck.save(s, state(s))
    assert ck.wait(30) and ck.steps() == [6, 4]
    _damage(tmp_path / "step-000000006", "truncate")
    assert ck.latest()[0] == 4  # the run resumes from 4 ...
    ck.save(5, state(5))  # ... and saves 5: the old rule (keep the 2 newest manifests: 6, 5) deleted 4
    assert ck.wait(30)
    assert ck.steps() == [6, 5, 4]
    ck.save(6, state(6))  # reaching 6 replaces the damaged one; now 4 is beyond keep
    assert ck.wait(30)
    assert ck.steps() == [6, 5] and ck.latest()[0] == 6


def test_local_disk_errors_are_permanent_and_leave_no_temp_file(tmp_path, monkeypatch):
    """ENOSPC at fsync: one LocalWriteError (a ValueError: exit 2), no retry, the temp file removed, and
    every later save and wait raises it."""
    import errno
    import os

    from trainer.storage import LocalWriteError

    logs = Logs()
    ck = Checkpointer(tmp_path / "ck", log=logs, retry_base_s=0.01)
    real_fsync = os.fsync

    def full(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    ck.save(1, state(1))
    with pytest.raises(LocalWriteError) as info:
        ck.wait(30)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    ck_dir = tmp_path / "ck"
    assert msg.startswith(f"checkpoint folder {ck_dir}: cannot write ({ck_dir}/step-000000001/state.pt): ")
    assert "[ENOSPC]" in msg
    assert "free some space" in msg
    assert ck.stats["failures_total"] == 1 and not any("retrying" in m for m in logs), logs
    assert [p.name for p in (tmp_path / "ck").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(LocalWriteError):
        ck.save(2, state(2))


def test_a_checkpoint_folder_under_a_file_is_a_permanent_error(tmp_path):
    from trainer.storage import LocalWriteError

    (tmp_path / "f").write_text("a file")
    ck = Checkpointer(tmp_path / "f" / "ck", log=Logs())
    ck.save(1, state(1))
    with pytest.raises(LocalWriteError, match=r"\[(ENOTDIR|EEXIST)\]"):
        ck.wait(30)


def test_transient_local_errors_are_still_retried(tmp_path, monkeypatch):
    """EIO is not in the permanent set: it stays a retryable StorageError."""
    import errno

    from trainer.storage import LocalWriteError, local_write_error

    e = local_write_error("/x", "k", OSError(errno.EIO, "Input/output error"))
    assert isinstance(e, StorageError) and not isinstance(e, LocalWriteError)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENOTDIR):
        assert isinstance(local_write_error("/x", "k", OSError(code, os_strerror(code))), LocalWriteError)


def os_strerror(code: int) -> str:
    import os

    return os.strerror(code)
