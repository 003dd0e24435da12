"""Who may write a checkpoint location: the run that made it (identity record), one live process at a time (lease).

Identity. A checkpoint location (a folder or s3://bucket/prefix) belongs to one run. Rank 0 records that run's
config in `identity.json` at the root of the location, through the storage layer (local and S3 alike), once,
before its first checkpoint:

    {"format": 1, "config": {<RunConfig as a dict>}, "git_commit": "...", "created_unix": 1765000000.0}

A later run that points at the location is compared with the record the way run.dir/config.yaml is compared
(trainer.config.config_differences: settings that may change on resume, such as data.path or loop.max_steps,
and settings added since the record was written, do not count); a difference is refused in preflight, before
anything is written, with one line naming the location and the first differing key (exit 2). checkpoint.uri
and checkpoint.s3_* are not compared either: they say how the location is reached (a bucket seen through
another endpoint inside the cluster), not what the run computes.

Locations written before identity records existed hold checkpoints and no record. They are adopted (and the
record written) when the run directory's config.yaml vouches for them: it exists and matches (preflight has
already refused a config.yaml that differs). Without one -- a Kubernetes pod's run.dir is an emptyDir, so a
restarted pod of an older job has none -- the config that every checkpoint embeds (RunState's "config") of
the newest loadable checkpoint decides: the same config adopts, another is refused like a record would be. A
location with no loadable checkpoint holds nothing to resume and is claimed.

Lease. Two live writers to one location would interleave their checkpoints, so rank 0 takes a lease before
anything is written (after preflight, before run.dir/config.yaml) and holds it until the process ends:

* the run directory and a local checkpoint folder: a POSIX record lock (fcntl.lockf) on `.writer.lock` in
  the folder, holding the owner's host and pid for the refusal message. The kernel drops it when the process
  dies, whatever kills it, so a dead writer never blocks a rerun. lockf rather than flock: flock locks belong
  to the open file description, which forked children (data-loader workers) inherit and may keep for seconds
  after the rank died; record locks belong to the process alone.
* S3: `lease.json` at the root of the location, created with a conditional PUT (If-None-Match: *; SeaweedFS
  and AWS S3 honour it), renewed every stale_s/4 s by a background thread with If-Match on the ETag it last
  wrote, deleted with If-Match at the end. A lease whose last renewal is older than its stale_s (default 60 s,
  GNP_LEASE_STALE_S) belongs to a dead writer and is taken over (conditionally: of two racers, one wins). The
  age is the server's Date minus the object's LastModified, so the hosts' clocks do not matter. A writer
  whose renewal finds its lease replaced or gone stops at once (exit 200) rather than write beside the writer
  that holds it now. An outage does not stop it (checkpoint uploads ride outages out): while its lease is
  unconfirmed for more than stale_s - stale_s/4 (another writer could soon take it over), the checkpointer
  commits no manifest (the upload is retried), and the first renewal after the outage tells which it is.
  The owner is the host, boot and torchrun agent (pid and start time) of rank 0: torchrun restarting its
  worker group after a rank died (--max-restarts) is the same writer and takes its lease back at once.

Refusing a live lease exits 200 (retryable, trainer.exits), not 2: the holder is alive now but will end. On
Kubernetes a recreated pod starts while its predecessor is still terminating (up to its grace period), or
before the lease of a SIGKILLed predecessor went stale; a permanent status would fail the job for good, a
retryable one restarts the pod with back-off until the predecessor is gone. Interactively the one line says
who holds it (host, pid, since when) and what to do, which matters more there than the status. Refusals for
another run's config stay 2: no restart can cure them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainer.exits import EXIT_RETRYABLE
from trainer.storage import ObjectNotFound, StorageError

IDENTITY, LEASE, LOCK = "identity.json", "lease.json", ".writer.lock"
FORMAT = 1
DEFAULT_STALE_S = 60.0
# How the location is reached, not what the run computes: never part of the identity comparison.
_LOCATION_KEYS = ("uri", "s3_endpoint", "s3_region", "s3_retry_mode", "s3_max_attempts")
_LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class LeaseHeld(StorageError):
    """Another live process writes this location; retryable (exit 200): see the module docstring."""


def location_of(cfg, run_dir: Path) -> str:
    """The checkpoint location of `cfg`: checkpoint.uri, or <run.dir>/checkpoints."""
    return cfg.checkpoint.uri or str(run_dir / "checkpoints")


def _where(storage) -> str:
    return storage.uri.rstrip("/")


def _differences(saved: dict, current: dict) -> list[str]:
    from trainer.config import config_differences

    def strip(d: dict) -> dict:
        ck = {k: v for k, v in (d.get("checkpoint") or {}).items() if k not in _LOCATION_KEYS}
        return {**d, "checkpoint": ck}

    return config_differences(strip(saved), strip(current))


def _key(cfg) -> str:
    """The setting that names the location, for messages."""
    return "checkpoint.uri" if cfg.checkpoint.uri else "run.dir"


def _another_run(cfg, storage, diffs: list[str], source: str) -> str:
    return (
        f"{_key(cfg)}: {_where(storage)!r} holds the checkpoints of another run ({source}: {diffs[0]}); "
        f"a checkpoint location belongs to the run that made it: use another checkpoint.uri (or run.dir)"
    )


def identity_refusal(cfg, storage, run_dir: Path) -> str:
    """Why `cfg` may not write the checkpoint location `storage` (another run's), or ''. Reads only."""
    from trainer.config import to_dict

    if not cfg.checkpoint.uri and cfg.run.fresh and (run_dir / "config.yaml").is_file():
        return ""  # the default location moves aside with the run directory
    try:
        raw = storage.get(IDENTITY)
    except ObjectNotFound:
        return _legacy_refusal(cfg, storage, run_dir)
    try:
        saved = json.loads(raw)["config"]
        if not isinstance(saved, dict):
            raise TypeError(f"config is a {type(saved).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        return (
            f"{_key(cfg)}: {_where(storage) + '/' + IDENTITY!r} is unreadable ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); expected the identity record a run wrote: use another checkpoint.uri"
        )
    diffs = _differences(saved, to_dict(cfg))
    return _another_run(cfg, storage, diffs, IDENTITY) if diffs else ""


def _legacy_refusal(cfg, storage, run_dir: Path) -> str:
    """No identity record: a new location, or one written before records existed (module docstring)."""
    from trainer.checkpoint import Checkpointer
    from trainer.config import to_dict

    ck = Checkpointer(storage.uri, storage=storage, log=lambda _msg: None)
    try:
        if not ck.steps() or ((run_dir / "config.yaml").is_file() and not cfg.run.fresh):
            return ""
        found = ck.latest()
    finally:
        ck.close()
    if found is None:
        return ""  # nothing loadable to resume from: the run starts over and claims the location
    saved = found[1].get("config") if isinstance(found[1], dict) else None
    if not isinstance(saved, dict):
        return (
            f"{_key(cfg)}: {_where(storage)!r} holds checkpoints without an identity record or an embedded "
            f"config, and run.dir has no config.yaml to vouch for them: use another checkpoint.uri"
        )
    diffs = _differences(saved, to_dict(cfg))
    return _another_run(cfg, storage, diffs, f"step {found[0]}'s config") if diffs else ""


def record_identity(storage, cfg, commit: str) -> bool:
    """Write the identity record unless the location has one (rank 0, holding the lease); True if written."""
    from trainer.config import to_dict

    try:
        storage.get(IDENTITY)
        return False
    except ObjectNotFound:
        pass
    data = json.dumps(
        {"format": FORMAT, "config": to_dict(cfg), "git_commit": commit, "created_unix": round(time.time(), 3)},
        indent=1,
    ).encode()
    put_if = getattr(storage, "put_if", None)
    if put_if is None:
        storage.put(IDENTITY, data)
        return True
    try:  # S3: never replace a record another writer created meanwhile
        put_if(IDENTITY, data, None)
    except StorageError as e:
        if e.code not in _LOST:
            raise
        return False
    return True


# ---------------------------------------------------------------------------------------------- owner


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


def owner_token() -> str:
    """Who writes: host, boot, and the torchrun agent (a rank's parent) or this process, with its start time.
    A worker group restarted by the same torchrun agent is the same writer."""
    pid = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else os.getpid()
    return f"{socket.gethostname()}/{_boot_id()}/{pid}@{_start_time(pid)}"


def _holder_text(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0) or 0))
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}"


def _me(stale_s: float | None = None) -> dict:
    out = {"owner": owner_token(), "host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3)}
    return out if stale_s is None else {**out, "stale_s": stale_s}


# ---------------------------------------------------------------------------------------------- local lock

_locked_here: set[str] = set()  # record locks do not exclude the same process: remember our own


class FileLock:
    """A POSIX record lock on FOLDER/.writer.lock, held while this object is open (module docstring)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.key = ""

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _locked_here:
            raise LeaseHeld(self._refusal({**_me(), "pid": os.getpid()}), uri=str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise LeaseHeld(self._refusal(info if isinstance(info, dict) else {}), uri=str(self.folder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self.fd, self.key = fd, key
        _locked_here.add(key)

    def _refusal(self, info: dict) -> str:
        return (
            f"{self.what}: {str(self.folder)!r} is in use by another live writer ({_holder_text(info)}); one "
            f"writer at a time: wait until it ends or stop it, then rerun (retryable: exit 200)"
        )

    def moved(self) -> bool:
        """Whether the locked file is no longer at its path (run.fresh renamed the folder aside)."""
        if self.fd is None:
            return False
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except OSError:
            return True

    def release(self) -> None:
        if self.fd is not None:
            _locked_here.discard(self.key)
            os.close(self.fd)  # closing drops the lock; the file stays (deleting lock files races)
            self.fd = None


# ---------------------------------------------------------------------------------------------- S3 lease


def stale_seconds() -> float:
    """GNP_LEASE_STALE_S (seconds without renewal after which a lease is a dead writer's), default 60."""
    text = os.environ.get("GNP_LEASE_STALE_S", "")
    try:
        value = float(text) if text else DEFAULT_STALE_S
    except ValueError:
        value = -1.0
    if not value > 0:
        from trainer.config import ConfigError

        raise ConfigError(f"environment variable GNP_LEASE_STALE_S={text!r}: expected a number of seconds > 0")
    return value


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class S3Lease:
    """lease.json in an S3 location: conditional create/take-over, heartbeat renewal, conditional delete."""

    def __init__(self, storage, stale_s: float | None = None, log=_stderr) -> None:
        self.storage, self.log = storage, log
        self.stale_s = stale_seconds() if stale_s is None else stale_s
        self.renew_s = self.stale_s / 4
        self.owner = owner_token()
        self.etag: str | None = None
        self.last_ok = time.monotonic()  # of the last successful create or renewal
        self.on_lost: Callable[[], None] = lambda: os._exit(EXIT_RETRYABLE)  # tests replace it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**_me(self.stale_s), "owner": self.owner, "renewed_unix": round(time.time(), 3)}).encode()

    def acquire(self) -> None:
        for _ in range(3):  # a lost race re-reads the lease: the winner may be alive or already gone again
            try:
                self.etag = self.storage.put_if(LEASE, self._body(), None)
                break
            except StorageError as e:
                if e.code not in _LOST:
                    raise
            try:
                data, etag, age = self.storage.get_versioned(LEASE)
            except ObjectNotFound:
                continue  # released meanwhile: create it again
            if self._take_over(data, etag, age):
                break
        else:
            raise LeaseHeld(f"checkpoint.uri: {_where(self.storage)!r}: lost the race for {LEASE} three times; rerun")
        self.last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="checkpoint-lease", daemon=True)
        self._thread.start()

    def _take_over(self, data: bytes, etag: str, age: float) -> bool:
        """Replace the lease `etag` if it is ours or stale (True), else LeaseHeld; False: lost a race."""
        try:
            info = json.loads(data)
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}  # unreadable: counts as stale after the default time
        stale_after = info.get("stale_s") if isinstance(info.get("stale_s"), (int, float)) else DEFAULT_STALE_S
        if info.get("owner") != self.owner and age <= stale_after:
            raise LeaseHeld(
                f"checkpoint.uri: {_where(self.storage)!r} is in use by another live writer ({_holder_text(info)}; "
                f"its lease {LEASE} was renewed {age:.0f} s ago, stale after {stale_after:g} s); one writer at a "
                f"time: wait until it ends or stop it, then rerun (retryable: exit 200)"
            )
        try:
            self.etag = self.storage.put_if(LEASE, self._body(), etag)
        except StorageError as e:
            if e.code not in _LOST:
                raise
            return False
        if info.get("owner") != self.owner:
            self.log(
                f"warning: checkpoint.uri: took over the stale lease of {_where(self.storage)!r} "
                f"({_holder_text(info)}, last renewed {age:.0f} s ago)"
            )
        return True

    def _heartbeat(self) -> None:
        # An outage does not end the run (checkpoint uploads ride it out too): while renewals fail, `check()`
        # keeps the checkpointer from committing; when the store answers again, the If-Match renewal tells
        # whether another writer took the lease over meanwhile.
        while not self._stop.wait(self.renew_s):
            try:
                self.etag = self.storage.put_if(LEASE, self._body(), self.etag)
                self.last_ok = time.monotonic()
            except StorageError as e:
                if e.code in _LOST or isinstance(e, ObjectNotFound):
                    self._lost(f"{LEASE} was replaced or removed by another writer")

    def check(self) -> None:
        """StorageError when the lease was last confirmed too long ago to be sure it is still ours (another
        writer may take a lease over once it is stale_s old): a checkpoint is committed only under it."""
        age = time.monotonic() - self.last_ok
        if age > self.stale_s - self.renew_s:
            raise StorageError(
                f"checkpoint.uri: {_where(self.storage)!r}: the lease {LEASE} was last renewed {age:.0f} s ago; "
                f"not committing a checkpoint until it is renewed"
            )

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return  # released meanwhile
        # Another writer may hold the location now: writing on would interleave two runs' checkpoints.
        self.log(f"error: checkpoint.uri: lost the lease on {_where(self.storage)!r}: {why}; stopping (retryable)")
        self._stop.set()
        self.etag = None  # not ours any more: release() must not delete it
        self.on_lost()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.etag is not None:
            try:
                self.storage.delete_if(LEASE, self.etag)
            except StorageError as e:  # it goes stale by itself; the next writer takes it over
                self.log(f"warning: checkpoint.uri: could not release {LEASE} of {_where(self.storage)!r}: {e}")
            self.etag = None


# ---------------------------------------------------------------------------------------------- the run's


class Ownership:
    """The leases rank 0 holds for a run: its run directory, and its checkpoint location (local or S3)."""

    def __init__(self, leases: list) -> None:
        self.leases = leases

    def follow_moved_run_dir(self) -> None:
        """run.fresh renamed the run directory aside after it was locked: lock the new one too."""
        for i, lease in enumerate(self.leases):
            if isinstance(lease, FileLock) and lease.moved():
                lease.release()  # it locks the folder moved aside, which nothing writes any more
                fresh = FileLock(lease.folder, lease.what)
                fresh.acquire()
                self.leases[i] = fresh

    def check(self) -> None:
        """StorageError unless every S3 lease was confirmed recently enough to commit a checkpoint."""
        for lease in self.leases:
            if isinstance(lease, S3Lease):
                lease.check()

    def close(self) -> None:
        for lease in reversed(self.leases):
            lease.release()
        self.leases = []


def _acquire(cfg, storage, run_dir: Path) -> Ownership:
    """Every lease of the run, the S3 one first (it writes nothing when refused), else none."""
    leases = []
    if hasattr(storage, "put_if"):
        leases.append(S3Lease(storage))
    leases.append(FileLock(run_dir, "run.dir"))
    uri = cfg.checkpoint.uri
    if uri and not hasattr(storage, "put_if"):
        folder = Path(uri).resolve()
        if Path(run_dir).resolve() not in (folder, *folder.parents):
            leases.append(FileLock(folder, "checkpoint.uri"))
    taken = []
    try:
        for lease in leases:
            lease.acquire()
            taken.append(lease)
    except BaseException:
        for lease in reversed(taken):
            lease.release()
        raise
    return Ownership(taken)


def take(cfg, env, storage, run_dir: Path) -> Ownership:
    """Rank 0 takes the run's leases before anything is written; every rank raises the same refusal."""
    from trainer import dist

    owned, error = Ownership([]), ("", "")
    if env.is_primary:
        try:
            owned = _acquire(cfg, storage, Path(run_dir))
        except LeaseHeld as e:
            error = ("held", str(e))
        except StorageError as e:
            error = ("storage", str(e))
        except OSError as e:  # the lock file cannot be made (preflight found the folder writable: rare)
            error = ("config", f"run.dir: cannot create {str(Path(run_dir) / LOCK)!r}: {e.strerror or e}")
    kind, message = dist.broadcast_object(error, env)
    if kind == "config":
        from trainer.config import ConfigError

        raise ConfigError(message)
    if kind:
        raise (LeaseHeld if kind == "held" else StorageError)(message)
    return owned
