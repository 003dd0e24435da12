"""Checkpoints in a local folder or S3: one prefix per step, a manifest written last, verified on load.

Layout under the checkpoint URI (a folder or s3://bucket/prefix):
    step-000001234/state.pt        torch.save of a dict of tensors and plain values
    step-000001234/<extra files>   optional, e.g. config.yaml
    step-000001234/manifest.json   {"format", "step", "created_unix", "files": {name: {"object", "size", "sha256"}}}
                                   written LAST: a step counts only once its manifest exists
A checkpoint is used only when its manifest exists and every object matches its size and sha256, so a crash
or an S3 outage mid-upload, a truncated or a corrupted object is never resumed from: `latest()` falls back to
the previous complete one with a warning. Object keys are never overwritten (some S3 stores are consistent
only for new keys): if a step prefix already holds an object of the same name (an interrupted attempt), the
new one gets a fresh name (`state.1.pt`) that the manifest records. A step whose manifest already exists is
kept only if it verifies; one that does not (a truncated or corrupted object, a damaged manifest) is written
again: its manifest is deleted first (the step is then merely incomplete), the objects go to fresh keys and a
new manifest commits them, so a rerun replaces a damaged final checkpoint instead of keeping the older one
forever. After a new manifest exists, complete checkpoints beyond the newest `keep` at or below that step are
deleted (manifest first, so a half-deleted one is just incomplete), and so are incomplete step prefixes older
than it; steps above it (left by an earlier attempt, and not verified: resuming starts from the newest that
verifies) are left for the run to replace when it gets there. The step just written verifies, so retention
never deletes the last verified checkpoint.

A local folder that cannot be written for a reason retrying cannot cure (disk full, read-only, no
permission: `storage.LocalWriteError`) stops the uploader at once: `save()` and `wait()` then raise that
error (the CLI exits 2), instead of minutes of retries ending as a retryable outage.

`save()` serializes in the caller's thread (the caller passes CPU copies) and uploads in one background
thread, retrying failed uploads with capped exponential backoff; training waits only for serialization and
for an upload attempt already in progress. A newer save supersedes an older one that is waiting to retry.
Loading uses `torch.load(..., weights_only=True)`: a checkpoint cannot execute code. A step whose state that
loader rejects (a pickled custom class), or whose manifest names an object outside the step
(`../../config.yaml`), counts as damaged: skipped on resume with one warning, written again when the run
reaches it.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from trainer.config import CheckpointConfig
from trainer.storage import LocalWriteError, MiB, ObjectNotFound, Storage, StorageError, open_storage

_STEP_PREFIX = re.compile(r"^step-(\d{9,})/")
STATE_FILE, MANIFEST = "state.pt", "manifest.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated or corrupted (does not match its manifest)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def step_prefix(step: int) -> str:
    """The key prefix of checkpoint `step`: 'step-000001234/'."""
    return f"step-{step:09d}/"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fresh_name(name: str, taken: set[str]) -> str:
    """`name`, or `stem.K.suffix` with the smallest K not in `taken` (never overwrite a key)."""
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, "." + suffix) if dot else (name, "")
    k = 1
    while f"{stem}.{k}{suffix}" in taken:
        k += 1
    return f"{stem}.{k}{suffix}"


@dataclass
class _Job:
    step: int
    files: dict[str, bytes]
    backing_off: bool = False  # between attempts: may be superseded by a newer save
    superseded: bool = False
    attempts: int = 0


@dataclass
class _Stats:
    uploads_total: int = 0  # checkpoints uploaded (manifest written)
    failures_total: int = 0  # failed upload attempts
    consecutive_failures: int = 0  # failed attempts since the last success (0 = healthy)
    abandoned_total: int = 0  # checkpoints given up (superseded, max_upload_tries reached, closed)
    last_success_unix: float = 0.0
    last_success_step: int = -1
    last_duration_s: float = 0.0  # of the last successful upload (all attempts of it)
    last_bytes: int = 0
    last_error: str = ""  # one line, never credentials
    pending_step: int = -1  # step being uploaded or waiting to retry; -1 = idle
    pending_bytes_done: int = 0
    pending_bytes_total: int = 0


_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    # Safety net for callers that forget wait(): the upload thread is a daemon (an S3 outage must not keep a
    # finished process alive forever), so give a pending upload a bounded chance to finish.
    for ck in list(_live):
        ck.close(timeout=120)


class Checkpointer:
    """Saves and finds checkpoints at `uri` (a folder or s3://bucket/prefix).

    Call `save()` on one rank only; every rank may `load()`. Call `wait()` before the process exits (the
    end of training) so the last upload finishes, and `close()` when done.
    """

    def __init__(
        self,
        uri,
        *,
        keep: int = 2,
        s3_endpoint: str = "",
        s3_region: str = "",
        s3_retry_mode: str = "standard",
        s3_max_attempts: int = 5,
        s3_multipart_chunksize: int = 64 * MiB,
        max_upload_tries: int = 0,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 60.0,
        log: Callable[[str], None] = _stderr,
        storage: Storage | None = None,
    ) -> None:
        """Open the storage (an S3 URI is checked now: wrong credentials or a missing bucket raise
        StorageConfigError here, an unreachable endpoint StorageError).

        max_upload_tries: attempts per checkpoint before giving up on it (0 = retry until a newer save
        supersedes it); retry_base_s/retry_cap_s: backoff base and cap between attempts.
        """
        if keep < 2:
            raise ValueError(f"checkpoint.keep: invalid value {keep}; expected an integer >= 2")
        if max_upload_tries < 0:
            raise ValueError(f"max_upload_tries: invalid value {max_upload_tries}; expected an integer >= 0")
        self.storage = (
            storage
            if storage is not None
            else open_storage(
                uri,
                endpoint_url=s3_endpoint,
                region=s3_region,
                retry_mode=s3_retry_mode,
                max_attempts=s3_max_attempts,
                multipart_chunksize=s3_multipart_chunksize,
            )
        )
        self.uri, self.keep, self.log = self.storage.uri, keep, log
        self.max_upload_tries, self.retry_base_s, self.retry_cap_s = max_upload_tries, retry_base_s, retry_cap_s
        self._cv = threading.Condition()
        self._save_lock = threading.Lock()  # one save() at a time
        self._job: _Job | None = None
        self._last_ok = True  # did the last job end with its manifest written?
        self._fatal: LocalWriteError | None = None  # a permanent write error: no more uploads
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stats = _Stats()
        # Called before each manifest is written (the commit); raises StorageError while this process may not
        # commit, e.g. its lease on the location is unconfirmed (trainer/ownership.py). The upload is retried.
        self.guard: Callable[[], None] | None = None
        _live.add(self)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, default_dir: str | os.PathLike, **kwargs) -> Checkpointer:
        """The checkpointer of a run's `checkpoint` section: at cfg.uri, or `default_dir` when it is empty
        (<run.dir>/checkpoints). `kwargs` are the constructor's options that are not settings (log, storage,
        retry timings), for tests and tools."""
        return cls(
            cfg.uri or default_dir,
            keep=cfg.keep,
            s3_endpoint=cfg.s3_endpoint,
            s3_region=cfg.s3_region,
            s3_retry_mode=cfg.s3_retry_mode,
            s3_max_attempts=cfg.s3_max_attempts,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"Checkpointer({self.uri!r}, keep={self.keep})"

    # ------------------------------------------------------------------ saving

    @property
    def stats(self) -> dict:
        """A snapshot of the upload counters (for metrics): uploads_total, failures_total,
        consecutive_failures, abandoned_total, last_success_unix, last_success_step, last_duration_s,
        last_bytes, last_error, pending_step, pending_bytes_done, pending_bytes_total."""
        with self._cv:
            return dict(self._stats.__dict__)

    def save(self, step: int, state: dict, extra: Mapping[str, bytes] | None = None) -> None:
        """Queue checkpoint `step`: serialize `state` now (tensors must be CPU copies that training will not
        modify), upload in the background, return. Waits first for an upload attempt still in progress; an
        older checkpoint that is only waiting to retry is superseded. Never raises for storage problems
        (they are logged and counted in `stats`). `extra`: more objects for the step, e.g. {"config.yaml": b"..."}.
        """
        if step < 0:
            raise ValueError(f"checkpoint step: invalid value {step}; expected an integer >= 0")
        names = {STATE_FILE, *(extra or {})}
        bad = [n for n in names if n == MANIFEST or "/" in n or not n or n.startswith(".")]
        if bad:
            raise ValueError(f"checkpoint extra file {bad[0]!r}: expected a plain file name other than {MANIFEST}")
        with self._save_lock:
            self._await_idle(supersede=True)
            self.raise_fatal()
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            del buf
            job = _Job(step, {STATE_FILE: data, **dict(extra or {})})
            with self._cv:
                if self._closing:
                    raise RuntimeError(f"{self!r} is closed")
                self._job = job
                self._stats.pending_step, self._stats.pending_bytes_done = step, 0
                self._stats.pending_bytes_total = sum(len(b) for b in job.files.values())
                self._cv.notify_all()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._worker, name="checkpoint-upload", daemon=True)
                    self._thread.start()

    def _await_idle(self, supersede: bool, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._job is not None:
                if supersede and self._job.backing_off:
                    self._job.superseded = True
                    self._cv.notify_all()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 1.0)
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no upload is pending (at most `timeout` s). True iff every checkpoint saved so far
        ended uploaded, i.e. the last one's manifest exists. Raises the LocalWriteError that stopped uploads."""
        if not self._await_idle(supersede=False, timeout=timeout):
            return False
        self.raise_fatal()
        with self._cv:
            return self._last_ok

    def raise_fatal(self) -> None:
        """Raise the permanent write error (disk full, read-only, no permission) that stopped the uploader,
        if any."""
        with self._cv:
            fatal = self._fatal
        if fatal is not None:
            raise fatal

    def close(self, timeout: float | None = 0) -> None:
        """Stop the upload thread after waiting up to `timeout` s (None = forever) for a pending upload; a
        checkpoint still not uploaded then is dropped with a warning (the previous complete one remains)."""
        if timeout is None or timeout > 0:
            self._await_idle(supersede=False, timeout=timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            job = self._job
        if job is not None:
            self.log(
                f"warning: checkpoint step {job.step} not uploaded before close; the newest complete "
                f"checkpoint in {self.uri} stays the one to resume from"
            )
        _live.discard(self)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._closing:
                    self._cv.wait()
                if self._job is None:
                    return
                job = self._job
            ok = self._run_job(job)
            with self._cv:
                self._last_ok = ok
                if not ok:
                    self._stats.abandoned_total += 1
                self._job = None
                self._stats.pending_step = -1
                self._cv.notify_all()
                if self._closing:
                    return

    def _run_job(self, job: _Job) -> bool:
        """Upload `job` until it succeeds, is superseded, runs out of tries or the checkpointer closes."""
        t0 = time.monotonic()
        while True:
            job.attempts += 1
            try:
                written = self._upload(job)
            except Exception as e:  # noqa: BLE001 -- any failure is retried; the previous checkpoint stays
                err = " ".join(str(e).split()) if isinstance(e, StorageError) else f"{type(e).__name__}: {e}"
                with self._cv:
                    s = self._stats
                    s.failures_total += 1
                    s.consecutive_failures += 1
                    s.last_error = err[:500]
                    if isinstance(e, LocalWriteError):
                        self._fatal = e
                if isinstance(e, LocalWriteError):  # a restart would hit it again: no retries
                    self.log(f"error: checkpoint step {job.step} not written: {err}")
                    return False
                if self.max_upload_tries and job.attempts >= self.max_upload_tries:
                    self.log(
                        f"warning: checkpoint step {job.step} upload failed (attempt {job.attempts}): {err}; "
                        f"giving up after {job.attempts} attempts"
                    )
                    return False
                delay = min(self.retry_cap_s, self.retry_base_s * 2 ** (job.attempts - 1))
                self.log(
                    f"warning: checkpoint step {job.step} upload failed (attempt {job.attempts}): {err}; "
                    f"retrying in {delay:.3g} s"
                )
                with self._cv:
                    job.backing_off = True
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: job.superseded or self._closing, timeout=delay)
                    job.backing_off = False
                    if job.superseded or self._closing:
                        why = "superseded by a newer checkpoint" if job.superseded else "checkpointer closed"
                        self.log(
                            f"warning: checkpoint step {job.step} abandoned after {job.attempts} failed "
                            f"attempts ({why})"
                        )
                        return False
                continue
            with self._cv:
                s = self._stats
                recovered = s.consecutive_failures
                s.uploads_total += written  # a verified step found in place was not uploaded by this run
                s.consecutive_failures = 0
                s.last_success_unix, s.last_success_step = time.time(), job.step
                s.last_duration_s = time.monotonic() - t0
                s.last_bytes = sum(len(b) for b in job.files.values())
            if recovered:
                self.log(
                    f"checkpoint step {job.step} uploaded after {job.attempts} attempts ({s.last_duration_s:.1f} s)"
                )
            return True

    def _progress(self, n: int) -> None:
        with self._cv:
            self._stats.pending_bytes_done += n

    def _upload(self, job: _Job) -> bool:
        """One attempt: objects under fresh keys, then the manifest (the commit point), then retention.
        False when the step already exists and verifies (kept as it is, nothing uploaded)."""
        pre = step_prefix(job.step)
        existing = set(self.storage.list(pre))
        if pre + MANIFEST in existing:
            try:
                self.verify(job.step)
            except CheckpointError as e:
                self.log(f"warning: {e}; writing checkpoint step {job.step} again")
                # The damaged manifest goes first: until the new one exists the step is merely incomplete.
                self.storage.delete([pre + MANIFEST])
                existing.discard(pre + MANIFEST)
            else:
                self.log(f"checkpoint step {job.step} already exists in {self.uri} and verifies; kept")
                return False
        self.storage.abort_incomplete(pre)
        with self._cv:
            self._stats.pending_bytes_done = 0
        taken = {k[len(pre) :] for k in existing}
        files = {}
        for name, data in job.files.items():
            obj = _fresh_name(name, taken)
            taken.add(obj)
            self.storage.put(pre + obj, data, progress=self._progress)
            files[name] = {"object": obj, "size": len(data), "sha256": _sha256(data)}
        manifest = {"format": FORMAT, "step": job.step, "created_unix": round(time.time(), 3), "files": files}
        if self.guard is not None:
            self.guard()
        self.storage.put(pre + MANIFEST, json.dumps(manifest, indent=1).encode())
        try:
            self._prune(job.step, {pre + f["object"] for f in files.values()} | {pre + MANIFEST})
        except StorageError as e:  # the checkpoint is safe; stale objects are retried at the next save
            self.log(f"warning: checkpoint retention in {self.uri} failed: {e}")
        return True

    def _prune(self, step: int, referenced: set[str]) -> None:
        by_step: dict[int, list[str]] = {}
        for key in self.storage.list(""):
            if m := _STEP_PREFIX.match(key):
                by_step.setdefault(int(m.group(1)), []).append(key)
        # Only steps up to the one just written count: a newer one is an earlier attempt's that did not verify
        # when this run resumed (or it would have resumed from it), so it must not push a verified one out.
        complete = sorted(
            (s for s, keys in by_step.items() if s <= step and step_prefix(s) + MANIFEST in keys), reverse=True
        )
        drop_complete = [s for s in complete[self.keep :] if s != step]
        drop_partial = [s for s in by_step if s < step and s not in complete]
        for s in drop_complete:  # manifest first: an interrupted delete leaves an incomplete step, never a lie
            self.storage.delete([step_prefix(s) + MANIFEST])
        self.storage.delete([k for s in drop_complete + drop_partial for k in by_step[s]])
        # Objects of earlier, failed attempts at this very step.
        self.storage.delete([k for k in by_step.get(step, []) if k not in referenced])

    # ------------------------------------------------------------------ loading

    def _where(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def steps(self) -> list[int]:
        """Steps that have a manifest, newest first (not yet verified)."""
        out = {
            int(m.group(1))
            for key in self.storage.list("")
            if (m := _STEP_PREFIX.match(key)) and key == step_prefix(int(m.group(1))) + MANIFEST
        }
        return sorted(out, reverse=True)

    def _manifest(self, step: int) -> dict:
        pre = step_prefix(step)
        try:
            manifest = json.loads(self.storage.get(pre + MANIFEST))
            files = manifest["files"]
            if not isinstance(files, dict) or STATE_FILE not in files:
                raise KeyError(STATE_FILE)
            for fname, entry in files.items():
                if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                    raise TypeError("size/sha256")
                obj = entry.get("object", fname)
                # An object outside the step ("../../config.yaml") would verify against its own sha256 and be
                # loaded as a checkpoint: only plain names inside the step's prefix are objects of it.
                if not isinstance(obj, str) or "/" in obj or "\\" in obj or obj in ("", ".", ".."):
                    raise ValueError(f"object {obj!r} is not a plain name inside the step")
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint {self._where(pre)}: no manifest (incomplete)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self._where(pre + MANIFEST)}: unreadable manifest ({type(e).__name__}: {e})"
            ) from None
        return manifest

    def load_file(self, step: int, name: str = STATE_FILE) -> bytes:
        """The verified bytes of object `name` of checkpoint `step`; CheckpointError if it does not verify.
        StorageError (an outage) propagates: it says nothing about the checkpoint."""
        entry = self._manifest(step)["files"].get(name)
        pre = step_prefix(step)
        if entry is None:
            raise CheckpointError(f"checkpoint {self._where(pre)}: no {name!r} in its manifest")
        obj = entry.get("object", name)  # format-0 manifests (local checkpointer) name the file itself
        key = pre + obj
        try:
            data = self.storage.get(key)
        except ObjectNotFound:
            raise CheckpointError(f"checkpoint {self._where(key)}: missing (listed in its manifest)") from None
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {self._where(key)}: size/sha256 mismatch with its manifest "
                f"({len(data)} bytes, expected {entry['size']}: truncated or corrupted)"
            )
        return data

    def verify(self, step: int) -> None:
        """Check that checkpoint `step` is complete and loadable: its manifest reads, every object it lists
        matches its size and sha256, and its state loads with weights_only=True (a step that verifies but
        cannot be resumed from must be written again, not kept). CheckpointError if not; StorageError (an
        outage) propagates."""
        for name in self._manifest(step)["files"]:
            data = self.load_file(step, name)
            if name == STATE_FILE:
                self._unpickle(step, data)

    def _unpickle(self, step: int, data: bytes, map_location: str | torch.device = "cpu") -> dict:
        """torch.load(weights_only=True) of a state object; whatever it rejects (a custom class, which is
        never executed, or bytes that are no checkpoint) is a CheckpointError, skipped like a damaged step."""
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 -- the unpickler raises many types; all mean "not loadable"
            first = (str(e).strip().splitlines() or [""])[0][:300]  # torch's explanation runs for lines
            raise CheckpointError(
                f"checkpoint {self._where(step_prefix(step) + STATE_FILE)}: does not load with weights_only=True "
                f"({type(e).__name__}: {first})"
            ) from None

    def load(self, step: int, map_location: str | torch.device = "cpu") -> dict:
        """Load checkpoint `step` after verifying size and sha256 (CheckpointError if it does not verify or
        does not load with weights_only=True)."""
        return self._unpickle(step, self.load_file(step), map_location)

    def latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that verifies, skipping (with a warning) any that does not;
        None if there is none. A storage outage raises StorageError rather than falling back."""
        for step in self.steps():
            try:
                return step, self.load(step, map_location)
            except CheckpointError as e:
                self.log(f"warning: skipping {e}; trying an older checkpoint")
        return None


# The local-only class of the foundation issue; same API.
LocalCheckpointer = Checkpointer
