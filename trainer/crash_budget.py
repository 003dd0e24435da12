"""A crash budget that knows progress: a run that keeps crashing from the same checkpoint stops for good.

Why: with `retry_crashes: true` a crashed rank exits 201, the Kubeflow operator recreates the pod and its
backoff counter never trips (ExitCode restarts are not counted), so a deterministic bug loops until the job's
deadline. Counting pod restarts cannot tell that loop from a run that crashes now and then but moves on, so
the count lives with the run and is reset by progress (a newer checkpoint).

The record: one JSON object `starts.json` at the root of the run's checkpoint storage (<run.dir>/checkpoints,
or `checkpoint.uri`: a local folder or s3://bucket/prefix, through trainer/storage.py), so it survives the
pod and moves aside with the run directory on `run.fresh`. Rank 0 writes it (a whole-object put: readers see
the old or the new one, never half):

    {"format": 1, "starts": [{"from": 8, "unix": 1733540000.0, "restart": 0, "end": null}, ...]}

    from     the checkpoint step this start resumed from (null: none, a fresh start)
    restart  torchrun's TORCHELASTIC_RESTART_COUNT (informational)
    end      null until a clean end is recorded: "done" (rank 0, after a successful finish), "signal" (the
             launcher got SIGTERM/SIGINT: preemption, eviction, pod deletion) or "fault" (the launcher mapped
             the attempt to 200: a storage outage or a rank killed by a signal, which have their own retries)
    failure  (only on a start that crashed, written by the launcher of rank 0's node) the crash as the next
             start and `make status` show it: {"exit": 201, "rank": 1, "unix": ..., "lines": [the last
             lines of the first failing rank's traceback]}; see "The last failure" below

The counting rule. A start whose end is null crashed (the process ended without a clean end: an uncaught
exception on any rank, after which torchrun stops the other ranks, or a torchrun restart). A start "ended at"
the checkpoint the next start resumed from (the last one: the checkpoint the current start resumes from).
At each start rank 0, having resumed from checkpoint S, counts the crashed starts among the latest starts
that ended at S (clean ends among them are skipped, not counted: a preemption neither uses up nor resets the
budget). If that count exceeds `run.crash_restarts` = N, the start refuses before training: every rank exits
EXIT_CRASH_LOOP (3, permanent) and rank 0 prints one line. So with N restarts allowed, N+1 starts in a row
crash at S and the next start (the (N+1)-th resumed from S) exits 3; N = 0 never restarts a crash. A start
that refuses is not recorded (the record stays as it was, so every further start refuses the same way).
Progress resets the count: a crash after a newer checkpoint T ends at T, and the starts that ended at S no
longer count. To go on anyway: raise `run.crash_restarts` (or GNP_CRASH_RESTARTS) or delete starts.json.

A damaged record (not JSON, wrong shape) is kept as starts.json.damaged and counting starts afresh, with one
warning line; a storage failure while reading or writing the record is one warning line and the start goes
on without the budget (the budget is a safety net: it must never keep a good run from resuming).

The last failure. A crashed pod is replaced by a new one (PyTorchJob's ExitCode policy, JobSet's restarts), and
its log goes with it. So the launcher keeps the crash with the run: the rank shim writes the traceback tail of
an uncaught exception into $GNP_STATUS_DIR, and after a crash the launcher of rank 0's node stores the first
failing rank's tail in this start's `failure` (`record_failure`). The next start's rank 0 prints it near the top
of its log (`previous start failed: ...` and `  | ` lines: `make status` reads them back from the new pod) and a
refusal (exit 3) names the last crash, so the pod that stays after the loop stopped says why. Every recorded
start also prints its number in the record (`run starts: N (before this one: ...)`): `make status` takes it as
the run's restart count, which replaced pods and expired events cannot reset.

Known limit: on a multi-node job, a restart of the ranks because another node was lost counts as a crash
(only the launcher of rank 0's node can record the end); `checkpoint.every_steps` and N absorb that.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.storage import ObjectNotFound, Storage, StorageError, open_storage

RECORD = "starts.json"
DAMAGED = "starts.json.damaged"
POINTER = "crash_budget.json"  # in $GNP_STATUS_DIR: where the launcher records a clean end
FORMAT = 1
KEEP_STARTS = 1000  # older starts never matter to the count once a newer checkpoint exists
ENDS = ("done", "signal", "fault")


class CrashLoopError(Exception):
    """The run crashed too often from the same checkpoint: exit EXIT_CRASH_LOOP (permanent). The message is
    the one line to print (empty on ranks other than 0, which stay quiet)."""


def warn(message: str) -> None:
    print(f"warning: crash budget: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- record


def _valid(starts: Any) -> bool:
    return isinstance(starts, list) and all(
        isinstance(s, dict)
        and (s.get("from") is None or (isinstance(s["from"], int) and not isinstance(s["from"], bool)))
        and s.get("end") in (None, *ENDS)
        for s in starts
    )


def read(storage: Storage) -> list[dict]:
    """The recorded starts, oldest first ([] when there is no record). A damaged record is kept aside as
    DAMAGED (never deleted: someone may want to read it) and counting starts afresh."""
    try:
        data = storage.get(RECORD)
    except ObjectNotFound:
        return []
    try:
        doc = json.loads(data)
        starts = doc["starts"] if isinstance(doc, dict) else None
        if not _valid(starts):
            raise ValueError("not a list of starts")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        warn(
            f"{storage.uri}/{RECORD} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); kept as "
            f"{DAMAGED}, counting starts afresh"
        )
        storage.put(DAMAGED, data)
        return []
    return starts


def write(storage: Storage, starts: list[dict]) -> list[dict]:
    """Replace the record with `starts` (the newest KEEP_STARTS of them); returns what was written."""
    kept = starts[-KEEP_STARTS:]
    storage.put(RECORD, (json.dumps({"format": FORMAT, "starts": kept}, indent=1) + "\n").encode())
    return kept


def crashes_at(starts: list[dict], resumed: int | None) -> int:
    """How many of the latest starts that ended at checkpoint `resumed` crashed (see the module docstring)."""
    count = 0
    ended_at = resumed  # where the newest recorded start ended: what the current start resumes from
    for start in reversed(starts):
        if ended_at != resumed:
            break
        if start.get("end") is None:
            count += 1
        ended_at = start.get("from")
    return count


def refusal(starts: list[dict], resumed: int | None, limit: int, where: str) -> str:
    """The one line that stops a crash loop, or '' when this start may train."""
    crashed = crashes_at(starts, resumed)
    if crashed <= limit:
        return ""
    at = f"a checkpoint newer than step {resumed}" if resumed is not None else "a first checkpoint"
    failure = (starts[-1].get("failure") or {}) if starts else {}
    last = f"; the last crash (rank {failure.get('rank', '?')}): {failure['lines'][-1]}" if failure.get("lines") else ""
    return (
        f"crash loop: {crashed} starts in a row crashed before {at} was written (run.crash_restarts={limit}){last}; "
        f"not starting again (exit 3, permanent). To go on: fix the crash, then raise run.crash_restarts "
        f"(GNP_CRASH_RESTARTS) or delete {where}"
    )


STARTS_HEADER = "run starts: "  # what `make status` reads as the run's restart count (head of rank 0's log)


def starts_line(starts: list[dict]) -> str:
    """`run starts: 4 (before this one: 2 crashed, 1 stopped by a signal, 0 faults, 0 finished)`: this start's
    number in the run's record, which survives replaced pods (events, which count recreations, expire)."""
    earlier = [s.get("end") for s in starts[:-1]]
    counts = {how: earlier.count(how) for how in (None, "signal", "fault", "done")}
    return (
        f"{STARTS_HEADER}{len(starts)} (before this one: {counts[None]} crashed, {counts['signal']} stopped by a "
        f"signal, {counts['fault']} faults, {counts['done']} finished)"
    )


FAILURE_HEADER = "previous start failed: "  # what `make status` looks for in the head of rank 0's log
FAILURE_LINE = "  | "


def failure_report(starts: list[dict]) -> list[str]:
    """The log lines that show the newest start's recorded crash, [] when it has none:

    previous start failed: exit 201 on rank 1 at 2026-12-07T06:40:01Z (it had resumed from step 4)
      | Traceback (most recent call last):
      | ...
      | RuntimeError: ...
    """
    failure = (starts[-1].get("failure") or {}) if starts else {}
    if not isinstance(failure, dict) or not failure.get("lines"):
        return []
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(failure.get("unix") or 0)))
    origin = starts[-1].get("from")
    resumed = f"resumed from step {origin}" if origin is not None else "started afresh"
    exit_, rank = failure.get("exit", "?"), failure.get("rank", "?")
    head = f"{FAILURE_HEADER}exit {exit_} on rank {rank} at {when} (it had {resumed})"
    return [head, *(FAILURE_LINE + str(line) for line in failure["lines"])]


# ---------------------------------------------------------------------------------------------- the trainer


@dataclass
class Start:
    """This process's start as recorded (rank 0), so that its clean end can be recorded too."""

    storage: Storage | None
    index: int = -1


def begin(storage: Storage, resumed: int | None, limit: int, env, pointer: dict | None = None) -> Start:
    """Count, refuse or record this start. A COLLECTIVE: call it on every rank after resuming; rank 0 reads and
    writes the record and every rank raises CrashLoopError when the start refuses.

    `pointer`: what the launcher needs to reopen the storage (uri and S3 options); written with this start's
    index into $GNP_STATUS_DIR when the launcher set it."""
    from trainer import dist

    start, message = Start(None), ""
    if env.is_primary:
        try:
            starts = read(storage)
            for line in failure_report(starts):  # the crashed pod and its log are gone: the run kept this
                print(line, file=sys.stderr, flush=True)
            message = refusal(starts, resumed, limit, f"{storage.uri.rstrip('/')}/{RECORD}")
            if not message:
                restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                entry = {"from": resumed, "unix": round(time.time(), 3), "restart": int(restart or 0), "end": None}
                written = write(storage, [*starts, entry])
                start = Start(storage, len(written) - 1)
                _write_pointer(pointer, start.index)
                print(starts_line(written), file=sys.stderr, flush=True)
        except StorageError as e:  # an outage: train without the budget rather than not at all
            warn(f"cannot read or write {storage.uri}/{RECORD} ({' '.join(str(e).split())}); going on without it")
    message = dist.broadcast_object(message, env)
    if message:
        raise CrashLoopError(message if env.is_primary else "")
    return start


def _write_pointer(pointer: dict | None, index: int) -> None:
    folder = os.environ.get("GNP_STATUS_DIR", "")
    if pointer is None or not folder:
        return
    tmp = Path(folder, f".{POINTER}.tmp")
    tmp.write_text(json.dumps({**pointer, "index": index}))
    os.replace(tmp, Path(folder, POINTER))  # the launcher never reads half of it


def _set_on_newest(storage: Storage, index: int, key: str, value: Any) -> bool:
    """Set `key` of start `index` if it is still the newest start and has no end; whether it was set. A start
    that a later one followed (torchrun restarted the ranks) is left as it is."""
    starts = read(storage)
    if index != len(starts) - 1 or starts[index].get("end") is not None:
        return False
    starts[index][key] = value
    write(storage, starts)
    return True


def end(storage: Storage, index: int, how: str) -> bool:
    """Record the clean end `how` of start `index` (see _set_on_newest): a later start keeps its crash."""
    return _set_on_newest(storage, index, "end", how)


def record_failure_at(storage: Storage, index: int, failure: dict) -> bool:
    """Store `failure` on start `index`, still the newest and without a clean end (a crash); whether it was."""
    return _set_on_newest(storage, index, "failure", failure)


def finish(start: Start) -> None:
    """Rank 0, after a successful run: this start ended cleanly."""
    if start.storage is None:
        return
    try:
        end(start.storage, start.index, "done")
    except StorageError as e:
        warn(f"cannot record the end of this start in {start.storage.uri}/{RECORD}: {' '.join(str(e).split())}")


# ---------------------------------------------------------------------------------------------- the launcher


def _from_pointer(status_dir: str | os.PathLike, what: str, update) -> None:
    """Reopen the storage of the start that rank 0 of this node wrote into `status_dir` (only rank 0's node has
    a pointer) and call update(storage, index). Failures are one warning line: recording is a courtesy."""
    path = Path(status_dir, POINTER)
    if not path.is_file():
        return
    try:
        p = json.loads(path.read_text())
        storage = open_storage(
            p["uri"],
            endpoint_url=p.get("s3_endpoint", ""),
            region=p.get("s3_region", ""),
            retry_mode=p.get("s3_retry_mode", "standard"),
            max_attempts=p.get("s3_max_attempts", 5),
            check=False,
        )
        update(storage, int(p["index"]))
    except (OSError, ValueError, KeyError, TypeError, StorageError) as e:
        warn(f"cannot record {what}: {' '.join(str(e).split())}")


def end_from_status_dir(status_dir: str | os.PathLike, how: str) -> None:
    """The launcher: record `how` ("signal" or "fault") for this node's rank 0 start. A failure to record is one
    warning line: the start then counts as a crash, which the budget absorbs."""
    _from_pointer(status_dir, f"that the last start ended by {how}", lambda st, i: end(st, i, how))


def failure_from_status_dir(status_dir: str | os.PathLike, failure: dict) -> None:
    """The launcher, after a crash: keep `failure` with this node's rank 0 start (see "The last failure")."""
    _from_pointer(status_dir, "the last crash with the run", lambda st, i: record_failure_at(st, i, failure))
