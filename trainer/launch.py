"""Launcher of the trainer: torchrun with exit statuses that a restart policy can act on, plus S3 datasets.

    python -m trainer.launch train --recipe NAME [--set k=v ...]   torchrun -m trainer train ... (mapped status)
    python -m trainer.launch convert --dataset D --out DIR [...]   python -m trainer convert ...; upload DIR
    python -m trainer.launch rank MODULE ARGS...                   what each torchrun rank runs (the shim)
    python -m trainer.launch torchrun ARGS...                      torchrun without its ChildFailedError report
    python -m trainer.launch help                                  this text

docker/entrypoint.sh execs this module; it works the same outside the container (set PET_NPROC_PER_NODE, or
pass torchrun's settings in the PET_* variables the Kubeflow training operator sets: torchrun reads them).

Why not torchrun's own status: on any rank failure torchrun raises ChildFailedError and exits 1, which would
make a preempted peer look like a permanent failure and would hide the trainer's 2. So every rank runs through
`rank`, which runs MODULE like `python -m MODULE` and records its exit status in
$GNP_STATUS_DIR/exit.<restart>.<local_rank> (and its start in start.<restart>.<local_rank>, so that the last
attempt is known even when none of its ranks could record anything). `train` maps the statuses of torchrun's
last restart attempt (trainer/exits.py says what each status means):

    0        torchrun succeeded
    2        a rank exited 2 (bad config, unknown recipe, bad or missing dataset): permanent
    3        a rank exited 3: the run crashed run.crash_restarts+1 starts in a row from the same checkpoint
             without progress, so this start refused before training (trainer/crash_budget.py): permanent
    1 / 201  a rank crashed (exited 1-127, not 2 or 3): 1 (permanent), or 201 (retried) with GNP_RETRY_CRASHES=1
    200      no rank exited 1-127: a rank exited >= 128 (200: storage outage), was killed by a signal (the OOM
             killer), or the rendezvous/agent failed: retried
    128+N    the launcher itself got signal N (SIGTERM or SIGINT), passed SIGTERM on and waited for torchrun

On a rank failure the output is the ranks' own lines and one `launch:` line (none for 3: rank 0's line says
it all); torchrun runs through `torchrun`, which drops its ChildFailedError report (a 40-line traceback that
names no cause), its agent's warnings and its "failed (exitcode: N)" line per rank. After a signal (128+N) or
a 200, the launcher records that clean end in the run's crash budget, so a preemption does not count as a crash.
After a crash (1 or 201) it keeps the first failing rank's traceback tail (which the rank shim wrote into
$GNP_STATUS_DIR as error.<restart>.<local_rank>) with the run and as the container's termination message
(GNP_TERMINATION_LOG, default /dev/termination-log when it exists): the replaced pod's log is gone, this is not.

Environment: GNP_MODULE (module the ranks run, default `trainer`), GNP_RETRY_CRASHES (0|1, default 0),
GNP_CRASH_RESTARTS (run.crash_restarts' default, an integer >= 0; checked here before torchrun starts),
GNP_DATA_S3 + GNP_DATA_DIR (train: download the FFCV dataset under that s3:// prefix into GNP_DATA_DIR first;
convert: upload the output there afterwards), GNP_CONVERT_SOURCE_S3 (convert: download this s3:// object or
prefix and pass it as --source). S3 goes through trainer/storage.py (credentials from the standard AWS chain,
AWS_ENDPOINT_URL_S3 for S3-compatible stores); permanent S3 problems (no credentials, access denied, no such
bucket, nothing under the prefix) exit 2 with one line, other S3 failures 200.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainer.exits import (
    EXIT_CRASH,
    EXIT_CRASH_LOOP,
    EXIT_RETRY_CRASH,
    EXIT_RETRYABLE,
    EXIT_USER,
    FIRST_RETRIED,
    signal_status,
)
from trainer.lifeline import die_with_parent

MODES = ("train", "convert", "rank", "torchrun", "help")


def log(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


class UsageError(ValueError):
    """Bad input to the launcher (environment variable, arguments): one line, exit 2."""


# ---------------------------------------------------------------------------------------------- rank shim


def run_rank(module: str, args: Sequence[str]) -> None:
    """Run `module` like `python -m module args...` (runpy, run name __main__) and record a non-zero status.

    A rank killed by a signal records nothing: the mapping reads "no status" as a retryable fault.
    """
    die_with_parent()  # torchrun starts ranks in sessions of their own: a killed agent must take them along
    status_dir = os.environ.get("GNP_STATUS_DIR", "")
    name = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.{os.environ.get('LOCAL_RANK', '0')}"
    if status_dir:
        Path(status_dir, f"start.{name}").touch()
    sys.argv = [sys.argv[0], *args]
    code = EXIT_CRASH  # an exception other than SystemExit ends the interpreter with 1
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_CRASH)
        raise
    except Exception as e:  # the interpreter still prints the whole traceback; the launcher keeps its tail
        if status_dir:
            _record_error(Path(status_dir, f"error.{name}"), e)
        raise
    finally:
        code %= 256  # what the process will actually exit with
        if code and status_dir:
            Path(status_dir, f"exit.{name}").write_text(f"{code}\n")


ERROR_TAIL_LINES = 20  # of a crashed rank's traceback, kept with the run (the exception is at the end)
ERROR_LINE_CHARS = 300
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath
TERMINATION_BYTES = 4096  # the kubelet keeps at most this much of the termination message


def _record_error(path: Path, exc: BaseException) -> None:
    """Write the tail of `exc`'s traceback, this rank and the time as JSON (atomically: the launcher reads it
    after the rank is gone)."""
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    lines = [line for line in lines if line.strip(" ^~")][-ERROR_TAIL_LINES:]  # no caret-only lines
    doc = {
        "rank": int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0),
        "unix": round(time.time(), 3),
        "lines": [line[:ERROR_LINE_CHARS] for line in lines],
    }
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError:
        pass  # the traceback is in the rank's own log either way


def first_error(status_dir: str | os.PathLike) -> dict | None:
    """The crash that came first in torchrun's last restart attempt (the earliest recorded traceback: the
    other ranks often fail after it, on the broken collective), None when no rank recorded one."""
    errors: dict[int, list[dict]] = {}
    for entry in os.scandir(status_dir):
        kind, _, rest = entry.name.partition(".")
        restart = rest.partition(".")[0]
        if kind != "error" or not restart.isdigit():
            continue
        try:
            errors.setdefault(int(restart), []).append(json.loads(Path(entry.path).read_text()))
        except (OSError, ValueError):
            continue
    if not errors:
        return None
    return min(errors[max(errors)], key=lambda e: e.get("unix", 0))


def keep_failure(status_dir: str, status: int) -> None:
    """After a crash (status 1 or 201): keep the first failing rank's traceback tail where a replaced pod cannot
    lose it, with the run (trainer/crash_budget.py, read back by the next start and `make status`), and as the
    container's termination message (pod status `lastState.terminated.message`, `kubectl describe pod`)."""
    from trainer.crash_budget import failure_from_status_dir

    error = first_error(status_dir)
    if error is None:
        return
    failure = {"exit": status, **error}
    failure_from_status_dir(status_dir, failure)
    path = Path(os.environ.get("GNP_TERMINATION_LOG", TERMINATION_LOG))
    if path.is_file():  # the kubelet creates it; elsewhere nothing is written
        text = f"exit {status}: rank {failure['rank']} crashed\n" + "\n".join(failure["lines"]) + "\n"
        try:
            path.write_bytes(text.encode()[-TERMINATION_BYTES:])
        except OSError:
            pass


def run_torchrun(args: Sequence[str]) -> int:
    """torchrun (`python -m torch.distributed.run ARGS`), quiet about a failed rank.

    On a rank failure torchrun raises ChildFailedError out of its main: a ~40-line traceback plus a table of
    pid, host and time that names no cause (the rank's own line above it does), then exits 1. Here that
    exception ends the process with the same 1, silently, and the agent logs only errors; the launcher maps
    the ranks' recorded statuses and says why in one line. A signal that stopped torchrun (the launcher
    passed SIGTERM on) exits 128+N, also without a traceback.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # "Sending process N closing signal SIGTERM" (a warning per rank) and "failed (exitcode: 1) local_rank: 1
    # (pid: ...)" (an error) restate what the launcher's line says; other errors (rendezvous) still show.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("failed (exitcode")
    )
    try:
        torchrun_main(list(args))
    except ChildFailedError:
        return EXIT_CRASH
    except SignalException as e:  # the launcher passed on a SIGTERM: it knows, and exits 128+N itself
        return signal_status(e.sigval)
    return 0


# ---------------------------------------------------------------------------------------------- mapping


def last_attempt_statuses(status_dir: str | os.PathLike) -> list[int]:
    """Statuses the ranks of the last restart attempt recorded (none for ranks that ended without error or
    were killed); an attempt counts from the moment any of its ranks started."""
    attempts: dict[int, list[int]] = {}
    for entry in os.scandir(status_dir):
        kind, _, rest = entry.name.partition(".")
        restart = rest.partition(".")[0]
        if kind not in ("start", "exit") or not restart.isdigit():
            continue
        codes = attempts.setdefault(int(restart), [])
        if kind == "exit":
            text = Path(entry.path).read_text().strip()
            if text.isdigit():  # a rank killed while writing leaves an empty file: no status
                codes.append(int(text))
    return sorted(attempts[max(attempts)]) if attempts else []


def map_status(torchrun_status: int, rank_statuses: Iterable[int], retry_crashes: bool) -> tuple[int, str]:
    """(exit status, message to log) for torchrun's status and the ranks' statuses of its last attempt.

    `torchrun_status` is a Popen returncode (negative: killed by that signal). A user error on any rank wins
    over crashes (a peer of the failing rank may crash on the broken collective), crashes over faults.
    """
    statuses = sorted(rank_statuses)
    if torchrun_status == 0:
        return 0, ""
    if EXIT_USER in statuses:
        return EXIT_USER, f"a rank reported a user error (exit {EXIT_USER}): not retryable"
    if EXIT_CRASH_LOOP in statuses:  # rank 0 printed the one line (steps, starts, how to reset)
        return EXIT_CRASH_LOOP, ""
    if any(0 < s < FIRST_RETRIED for s in statuses):
        if retry_crashes:
            return (
                EXIT_RETRY_CRASH,
                f"a rank crashed; exit {EXIT_RETRY_CRASH} so that the operator retries (GNP_RETRY_CRASHES=1)",
            )
        return EXIT_CRASH, f"a rank crashed; exit {EXIT_CRASH} (permanent; GNP_RETRY_CRASHES=1 makes crashes retryable)"
    if statuses:
        return EXIT_RETRYABLE, (
            f"a rank exited {max(statuses)} (a fault such as a storage outage): exit {EXIT_RETRYABLE} (retryable)"
        )
    shown = signal_status(-torchrun_status) if torchrun_status < 0 else torchrun_status
    return EXIT_RETRYABLE, (
        f"torchrun exited {shown} without a rank status (signal-killed rank or rendezvous failure): "
        f"exit {EXIT_RETRYABLE} (retryable)"
    )


# ---------------------------------------------------------------------------------------------- child + signals


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while no child runs (e.g. during a download): stop, exit 128+N. A BaseException, so that
    storage.py's `except Exception` does not turn it into a StorageError."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Supervisor:
    """Runs one child at a time and passes SIGTERM/SIGINT on to it as SIGTERM.

    As PID 1 of a container, a process gets no default action for SIGTERM: without a handler a pod deletion
    would wait out its grace period and end in SIGKILL. SIGTERM is what torchrun turns into an orderly stop of
    its ranks (and what `python -m trainer convert` dies of), so that is what the child gets either way.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.running = False  # from just before Popen until the child is reaped
        self.got_signal = 0
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.got_signal = signal_status(signum)
        if not self.running:
            raise _Interrupted(self.got_signal)
        if self.child is not None:
            self.child.send_signal(signal.SIGTERM)  # a no-op once the child is reaped

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> int:
        """The child's returncode (negative: killed by a signal); wait() resumes after each handled signal."""
        if self.got_signal:
            raise _Interrupted(self.got_signal)
        self.running = True
        try:
            self.child = subprocess.Popen(list(cmd), env=env)
            if self.got_signal:  # arrived while Popen was starting the child
                self.child.send_signal(signal.SIGTERM)
            return self.child.wait()
        finally:
            self.child, self.running = None, False


def _child_status(returncode: int) -> int:
    return signal_status(-returncode) if returncode < 0 else returncode


# ---------------------------------------------------------------------------------------------- S3 datasets


def _s3_uri(var: str) -> tuple[str, str] | None:
    """(bucket, prefix) of the s3:// URI in environment variable `var`, None if unset."""
    uri = os.environ.get(var, "")
    if not uri:
        return None
    from trainer.storage import parse_s3_uri

    try:
        return parse_s3_uri(uri)
    except ValueError:
        raise UsageError(f"{var}: invalid value {uri!r}; expected an s3://bucket/prefix URI") from None


def _meta_last(key: str) -> tuple[bool, str]:
    # meta.json marks a complete FFCV dataset (readers check for it), so it is transferred last
    return key.rsplit("/", 1)[-1] == "meta.json", key


def fetch(bucket: str, prefix: str, dest: str | os.PathLike) -> int:
    """Download every object under s3://bucket/prefix/ (or the single object s3://bucket/prefix) into `dest`,
    keeping the layout below the prefix; files already there with the object's size are kept. Returns the count.
    """
    from trainer.storage import S3Storage, StorageConfigError

    uri = f"s3://{bucket}/{prefix}"
    store = S3Storage(bucket, prefix)  # lists once: wrong credentials or a missing bucket fail here
    sizes = store.sizes()
    if not sizes and prefix:  # a single object, e.g. s3://bucket/cifar-10-python.tar.gz
        parent, _, name = prefix.rpartition("/")
        store = S3Storage(bucket, parent, check=False)
        sizes = {k: v for k, v in store.sizes(name).items() if k == name}
    # keys ending in "/" are the empty "folder" markers some tools create, not files
    keys = sorted((k for k in sizes if k and not k.endswith("/")), key=_meta_last)
    if not keys:
        raise StorageConfigError(f"{uri}: no objects under this prefix; expected an uploaded dataset", uri=uri)
    dest = Path(dest)
    for key in keys:
        path = dest.joinpath(*key.split("/"))
        if path.is_file() and path.stat().st_size == sizes[key]:
            continue
        store.download_file(key, path)
    log(f"s3: {len(keys)} objects from {uri} in {dest}")
    return len(keys)


def push(src: str | os.PathLike, bucket: str, prefix: str) -> int:
    """Upload every file under folder `src` to s3://bucket/prefix/ (meta.json last). Returns the count."""
    from trainer.storage import S3Storage

    src = Path(src)
    files = sorted((p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()), key=_meta_last)
    store = S3Storage(bucket, prefix)
    for rel in files:
        store.upload_file(src / rel, rel)
    log(f"s3: {len(files)} files from {src} to s3://{bucket}/{prefix}")
    return len(files)


# ---------------------------------------------------------------------------------------------- modes


def _retry_crashes() -> bool:
    value = os.environ.get("GNP_RETRY_CRASHES", "0")
    if value not in ("", "0", "1"):
        raise UsageError(f"GNP_RETRY_CRASHES: invalid value {value!r}; expected 0 or 1")
    return value == "1"


def _check_crash_restarts() -> None:
    """GNP_CRASH_RESTARTS, checked once here: every rank would otherwise print the same error."""
    from trainer.config import ConfigError, crash_restarts_default

    try:
        crash_restarts_default()
    except ConfigError as e:
        raise UsageError(str(e)) from None


def train(args: Sequence[str], sup: _Supervisor) -> int:
    """Fetch the dataset if GNP_DATA_S3 is set, run the ranks under torchrun, map their statuses."""
    retry = _retry_crashes()
    _check_crash_restarts()
    data = _s3_uri("GNP_DATA_S3")
    if data is not None:
        data_dir = os.environ.get("GNP_DATA_DIR", "")
        if not data_dir:
            raise UsageError("GNP_DATA_DIR: must be set with GNP_DATA_S3 (the folder the dataset is fetched into)")
        fetch(*data, data_dir)
    status_dir = ""
    try:
        try:
            status_dir = tempfile.mkdtemp(prefix="gnp-status.")
        except OSError as e:
            log(f"cannot create the rank status folder in {tempfile.gettempdir()}: {e}")
            return EXIT_RETRYABLE
        py = sys.executable
        # torchrun gets no --nnodes/--node_rank/--rdzv_* flags: it reads the operator's PET_* variables
        cmd = [py, "-m", "trainer.launch", "torchrun", "--no-python", py, "-m", "trainer.launch", "rank"]
        cmd += [os.environ.get("GNP_MODULE") or "trainer", "train", *args]
        rc = sup.run(cmd, env={**os.environ, "GNP_STATUS_DIR": status_dir})
        if sup.got_signal:
            end_start(status_dir, "signal")  # a preemption is no crash: it must not use up the crash budget
            return sup.got_signal
        status, message = map_status(rc, last_attempt_statuses(status_dir), retry)
        if message:
            log(message)
        if status == EXIT_RETRYABLE:  # outages and killed ranks have their own retries
            end_start(status_dir, "fault")
        elif status in (EXIT_CRASH, EXIT_RETRY_CRASH):
            keep_failure(status_dir, status)
        return status
    finally:
        if status_dir:
            shutil.rmtree(status_dir, ignore_errors=True)


def end_start(status_dir: str, how: str) -> None:
    """Record the clean end `how` of the start that rank 0 of this node recorded in the run's crash budget."""
    from trainer.crash_budget import end_from_status_dir

    end_from_status_dir(status_dir, how)


def _out_folder(args: Sequence[str]) -> str:
    out = ""
    for prev, arg in zip(["", *args], args):
        if prev == "--out":
            out = arg
        elif arg.startswith("--out="):
            out = arg[len("--out=") :]
    return out


def convert(args: Sequence[str], sup: _Supervisor) -> int:
    """`python -m trainer convert`, with its --source fetched from GNP_CONVERT_SOURCE_S3 and its --out folder
    uploaded to GNP_DATA_S3 when those are set."""
    args = list(args)
    source = _s3_uri("GNP_CONVERT_SOURCE_S3")
    target = _s3_uri("GNP_DATA_S3")
    out = _out_folder(args)
    if target is not None and not out:
        raise UsageError("convert: missing --out; expected --out DIR (the folder uploaded to GNP_DATA_S3)")
    if source is not None:
        src = Path(tempfile.gettempdir(), "gnp-convert-source")
        fetch(*source, src)
        files = [p for p in src.rglob("*") if p.is_file()]
        # a single object (e.g. cifar-10-python.tar.gz) is passed as the file itself
        args += ["--source", str(files[0] if len(files) == 1 else src)]
    rc = sup.run([sys.executable, "-m", "trainer", "convert", *args])
    if sup.got_signal:
        return sup.got_signal
    if rc:
        return _child_status(rc)
    if target is not None:
        push(out, *target)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv else "help"
    if mode.startswith("-") and mode not in ("-h", "--help"):
        mode, argv = "train", ["train", *argv]  # flags alone mean train, as in the entrypoint
    if mode in ("help", "-h", "--help"):
        print(__doc__.strip())
        return 0
    if mode == "rank":
        if len(argv) < 2:
            print("error: rank: missing the module; expected `rank MODULE ARGS...`", file=sys.stderr)
            return EXIT_USER
        run_rank(argv[1], argv[2:])
        return 0
    if mode == "torchrun":
        return run_torchrun(argv[1:])
    if mode not in MODES:
        print(f"error: mode {mode!r}: expected one of {', '.join(MODES)}", file=sys.stderr)
        return EXIT_USER
    from trainer.storage import StorageConfigError, StorageError

    sup = _Supervisor()
    try:
        return train(argv[1:], sup) if mode == "train" else convert(argv[1:], sup)
    except _Interrupted as e:
        return e.status
    except (UsageError, StorageConfigError) as e:  # StorageConfigError first: it is a StorageError too
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_USER
    except StorageError as e:  # outage, timeout: a restart may cure it
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    except ValueError as e:  # e.g. an object key that is no relative path
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_USER
    except OSError as e:  # the local side of a transfer: no space in the emptyDir, no permission
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
