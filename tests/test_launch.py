"""trainer/launch.py (what docker/entrypoint.sh execs) and trainer/exits.py.

What is checked, and against what:
- the status mapping against the policy table written in trainer/exits.py and docker/entrypoint.sh's help
  (Kubeflow's ExitCode policy: 1-127 permanent, >= 128 retried), row by row;
- the rank shim as a real process: the status file it records is the status the process really exits with;
- the launcher standalone (`python -m trainer.launch train`, no container) under a real torchrun: a rank that
  exits 200 gives 200 with a message that says so, the status folder is removed, and ranks die with torchrun;
- bad input: one line `error: ...`, exit 2, no torchrun started;
- the CLI, the launcher and k8s/render.py take their statuses from trainer/exits.py: changed values there
  change what each of them returns or renders;
- the S3 transfers (storage.py's sizes/download_file/upload_file, the launcher's fetch/push) against the real
  SeaweedFS server (tests/support/s3server.py). The entrypoint's own end-to-end tests are in test_k8s.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.support.s3server import s3_env, s3_server  # noqa: F401 (fixtures)
from trainer import exits, launch
from trainer.storage import MiB, S3Storage, StorageConfigError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# the mapping, on its own

# (torchrun's Popen returncode, statuses the ranks of the last attempt recorded, GNP_RETRY_CRASHES) -> status
MAPPING = [
    ((0, [], False), 0),  # success
    ((1, [2], False), 2),  # a user error: permanent ...
    ((1, [2], True), 2),  # ... also when crashes are retried
    ((1, [1, 2], True), 2),  # the user error wins over the crash of a peer
    ((1, [2, 200], False), 2),  # and over a fault
    ((1, [1], False), 1),  # crash: permanent by default
    ((1, [1], True), 201),  # crash: retried on request
    ((1, [4, 127], False), 1),  # every status 1-127 but 2 and 3 is a crash
    ((1, [1, 3], True), 3),  # a crash loop: permanent even with crashes retried (a peer's 1 does not matter)
    ((1, [3, 3], False), 3),
    ((1, [2, 3], True), 2),  # a user error still wins
    ((1, [1, 200], True), 201),  # a crash and a fault: the crash decides
    ((1, [200], False), 200),  # a rank recorded a storage outage: retried
    ((1, [200], True), 200),
    ((1, [143], False), 200),  # a rank that handled SIGTERM and exited 128+15: retried, not a crash
    ((1, [], False), 200),  # no status: a rank was killed by a signal (OOM killer), or the rendezvous failed
    ((1, [], True), 200),
    ((-9, [], False), 200),  # torchrun itself was SIGKILLed
]


@pytest.mark.parametrize("args, expected", MAPPING)
def test_status_mapping_table(args, expected):
    status, message = launch.map_status(*args)
    assert status == expected
    # the policy: 1-127 never retried, >= 128 retried
    assert exits.is_retried(status) == (expected >= 128)
    if expected == exits.EXIT_CRASH_LOOP:
        assert message == ""  # rank 0's line (step, starts, how to reset) is the only one
    elif expected:
        assert message and f"exit {expected}" in message


def test_status_message_names_the_cause():
    _, recorded = launch.map_status(1, [200], False)
    assert "a rank exited 200" in recorded and "without a rank status" not in recorded
    _, killed = launch.map_status(1, [], False)
    assert "torchrun exited 1 without a rank status" in killed
    _, sigkilled = launch.map_status(-9, [], False)
    assert "torchrun exited 137" in sigkilled  # as a shell would report it: 128 + SIGKILL


def test_last_attempt_is_the_highest_restart_number(tmp_path):
    def write(name: str, text: str = "") -> None:
        (tmp_path / name).write_text(text)

    write("start.0.0"), write("start.0.1"), write("exit.0.1", "1\n")
    assert launch.last_attempt_statuses(tmp_path) == [1]
    # restarts 1..10: numbers, not strings ("10" < "9" as text)
    for r in range(1, 10):
        write(f"start.{r}.0"), write(f"exit.{r}.0", "2\n")
    write("start.10.0"), write("start.10.1"), write("exit.10.1", "200\n")
    assert launch.last_attempt_statuses(tmp_path) == [200]
    # an attempt whose ranks started but recorded nothing (all killed) is the last one: no statuses, so 200,
    # not the crash of attempt 0
    write("start.11.0")
    assert launch.last_attempt_statuses(tmp_path) == []
    assert launch.map_status(1, launch.last_attempt_statuses(tmp_path), False)[0] == 200
    write("unrelated.txt", "x")
    write("exit.11.1", "")  # a rank killed halfway through writing its status
    assert launch.last_attempt_statuses(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# the rank shim as a process

SHIM_MODULE = """
import os, signal, sys
open(os.environ["SEEN"], "w").write(repr((__name__, sys.argv[1:])))
how = sys.argv[1]
if how == "exit":
    sys.exit(int(sys.argv[2]))
if how == "message":
    sys.exit("a message")
if how == "raise":
    raise RuntimeError("boom")
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    "how, status",
    [(["ok"], 0), (["exit", "2"], 2), (["exit", "200"], 200), (["message"], 1), (["raise"], 1), (["kill"], -9)],
)
def test_rank_shim_records_the_status_the_process_exits_with(tmp_path, how, status):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "gnp_shim_probe.py").write_text(SHIM_MODULE)
    (tmp_path / "status").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path / 'mod'}{os.pathsep}{ROOT}",
        "GNP_STATUS_DIR": str(tmp_path / "status"),
        "TORCHELASTIC_RESTART_COUNT": "3",
        "LOCAL_RANK": "1",
        "SEEN": str(tmp_path / "seen"),
    }
    p = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "rank", "gnp_shim_probe", *how],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == status, p.stderr
    # it ran like `python -m gnp_shim_probe ...`
    assert (tmp_path / "seen").read_text() == repr(("__main__", how))
    recorded = {f.name: f.read_text() for f in (tmp_path / "status").iterdir()}
    error = json.loads(recorded.pop("error.3.1", "null"))
    expected = {"start.3.1": ""}
    if status > 0:  # 0 records nothing (success), a signal cannot be recorded
        expected["exit.3.1"] = f"{status}\n"
    assert recorded == expected
    if how == ["raise"]:  # an uncaught exception also leaves its traceback tail, for the launcher to keep
        assert error["rank"] == 1 and abs(error["unix"] - time.time()) < 60
        assert error["lines"][0] == "Traceback (most recent call last):" and error["lines"][-1] == "RuntimeError: boom"
    else:
        assert error is None


def test_first_error_is_the_earliest_of_the_last_attempt(tmp_path):
    """The crash that came first in torchrun's last restart attempt: the other ranks fail after it."""
    from trainer.launch import first_error

    def write(name: str, unix: float, line: str) -> None:
        (tmp_path / name).write_text(json.dumps({"rank": int(name[-1]), "unix": unix, "lines": [line]}))

    assert first_error(tmp_path) is None
    write("error.0.1", 10.0, "attempt 0")
    write("error.1.0", 30.0, "gloo: connection closed by peer")
    write("error.1.1", 20.0, "RuntimeError: the cause")
    (tmp_path / "error.1.2").write_text("{half")  # a rank killed while writing: ignored
    assert first_error(tmp_path) == {"rank": 1, "unix": 20.0, "lines": ["RuntimeError: the cause"]}


# ---------------------------------------------------------------------------------------------------
# the launcher standalone, under a real torchrun

RANK_MODULE = """
import os, sys, time
rank = int(os.environ["LOCAL_RANK"])
sys.stdout.write(f"READY {rank} {os.getpid()}\\n")
sys.stdout.flush()
mode = os.environ["FAKE_MODE"]
if mode == "outage" and rank == 0:
    sys.exit(200)  # what the trainer exits with when a storage outage outlasts its retries
if mode == "user" and rank == 1:
    sys.stderr.write("error: rank 1: bad config\\n")
    sys.exit(2)
if mode == "sleep" or rank == 1:
    time.sleep(60)
"""


def _launch_env(tmp_path: Path, **extra: str) -> dict:
    (tmp_path / "mod").mkdir(exist_ok=True)
    (tmp_path / "mod" / "gnp_launch_probe.py").write_text(RANK_MODULE)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": f"{tmp_path / 'mod'}{os.pathsep}{ROOT}",
        "GNP_MODULE": "gnp_launch_probe",
        "PET_NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path / "tmp"),
        **extra,
    }


def test_launcher_standalone_maps_a_recorded_200_and_cleans_up(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "train", "--recipe", "x"],
        env=_launch_env(tmp_path, FAKE_MODE="outage"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 200, p.stderr
    # the launcher's one line, without torchrun's ChildFailedError report or its agent's log lines
    assert p.stderr.splitlines() == [
        "launch: a rank exited 200 (a fault such as a storage outage): exit 200 (retryable)"
    ], p.stderr
    assert not list((tmp_path / "tmp").glob("gnp-status.*"))  # one per run used to pile up


def test_launcher_output_on_a_rank_error_is_the_ranks_line_and_its_own(tmp_path):
    """Issue 27: torchrun's 44-line ChildFailedError traceback used to follow the launcher's line. Now a rank
    that exits 2 with one line gives exactly that line and the launcher's."""
    p = subprocess.run(
        [sys.executable, "-m", "trainer.launch", "train", "--recipe", "x"],
        env=_launch_env(tmp_path, FAKE_MODE="user"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [
        "error: rank 1: bad config",
        "launch: a rank reported a user error (exit 2): not retryable",
    ], p.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_ranks_die_with_a_sigkilled_torchrun(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.launch", "train", "--recipe", "x"],
        env=_launch_env(tmp_path, FAKE_MODE="sleep"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ranks = []
    try:
        deadline = time.monotonic() + 90
        while len(ranks) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            ranks += [int(line.split()[2])] if line.startswith("READY") else []
        assert len(ranks) == 2, proc.stderr.read() if proc.poll() is not None else "ranks did not start"
        (torchrun,) = _children(proc.pid)
        assert set(ranks) <= set(_children(torchrun))
        os.kill(torchrun, signal.SIGKILL)  # the OOM killer's choice, say; the ranks get no signal from it
        assert proc.wait(30) == 200
        deadline = time.monotonic() + 10
        while _alive(ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(ranks) == [], "ranks outlived torchrun"
        # only now: the ranks hold the pipes open, so reading to the end would wait for them
        assert "torchrun exited 137 without a rank status" in proc.stderr.read()
    finally:
        for r in _alive(ranks):
            os.kill(r, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running the probe module (a pid reused by something else does not count)."""
    out = []
    for pid in pids:
        try:
            if "gnp_launch_probe" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                out.append(pid)
        except OSError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["bogus"], {}, "error: mode 'bogus': expected one of train, convert, rank, torchrun, help"),
        (["rank"], {}, "error: rank: missing the module"),
        (["train", "--recipe", "x"], {"GNP_RETRY_CRASHES": "yes"}, "error: GNP_RETRY_CRASHES: invalid value 'yes'"),
        (["train", "--recipe", "x"], {"GNP_CRASH_RESTARTS": "-1"}, "error: GNP_CRASH_RESTARTS: invalid value '-1'"),
        (
            ["train", "--recipe", "x"],
            {"GNP_DATA_S3": "s3://b-1/p"},
            "error: GNP_DATA_DIR: must be set with GNP_DATA_S3",
        ),
        (["train", "--recipe", "x"], {"GNP_DATA_S3": "http://b/p", "GNP_DATA_DIR": "/tmp/d"}, "error: GNP_DATA_S3:"),
        (["convert", "--dataset", "cifar10"], {"GNP_DATA_S3": "s3://b-1/p"}, "error: convert: missing --out"),
        # S3 would refuse these names on every request: refused here, before any download (issue 27)
        (["train", "--recipe", "x"], {"GNP_DATA_S3": "s3://Data_Sets/p"}, "error: GNP_DATA_S3: invalid value"),
        (["train", "--recipe", "x"], {"GNP_DATA_S3": "s3://bkt/a/../p"}, "error: GNP_DATA_S3: invalid value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GNP_")}
    p = subprocess.run(
        [sys.executable, "-m", "trainer.launch", *argv],
        env={**clean, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr
    assert not list(tmp_path.glob("gnp-status.*"))  # stopped before torchrun


def test_help_is_the_module_docstring():
    p = subprocess.run([sys.executable, "-m", "trainer.launch", "help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == launch.__doc__.strip()


# ---------------------------------------------------------------------------------------------------
# one module of statuses

PROBE = """
import json
import trainer.exits as x
x.EXIT_USER, x.EXIT_CRASH, x.EXIT_RETRYABLE, x.EXIT_RETRY_CRASH, x.EXIT_CRASH_LOOP = 42, 41, 242, 243, 43
import trainer.__main__ as cli
import trainer.launch as launch
from gnpk8s import cli as k8s_cli, convert
from gnpk8s.spec import load_job
job = convert.build(load_job("fashion-mnist-demo", image="registry.test/gnp:1"))
print(json.dumps({
    "cli_bad_recipe": cli.main(["train", "--recipe", "no-such-recipe"]),
    "cli_retryable": cli.EXIT_RETRYABLE,
    "cli_crash_loop": cli.EXIT_CRASH_LOOP,
    "launch_user": launch.map_status(1, [42], False)[0],
    "launch_crash": launch.map_status(1, [41], False)[0],
    "launch_retry_crash": launch.map_status(1, [41], True)[0],
    "launch_crash_loop": launch.map_status(1, [41, 43], True)[0],
    "launch_unknown": launch.map_status(1, [], False)[0],
    "render_policy": job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"],
    "render_main": k8s_cli.main(["render", "no-such-spec"]),
}))
"""


def test_cli_launcher_and_renderer_take_their_statuses_from_exits():
    """Changed values in trainer/exits.py show up in what each user returns or renders; a module that kept
    its own literal 2 or 200 would fail here."""
    p = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {
        "cli_bad_recipe": 42,
        "cli_retryable": 242,
        "cli_crash_loop": 43,
        "launch_user": 42,
        "launch_crash": 41,
        "launch_retry_crash": 243,
        "launch_crash_loop": 43,
        "launch_unknown": 242,
        "render_policy": [42],
        "render_main": 42,
    }
    # and the real values are the documented ones
    assert (exits.EXIT_USER, exits.EXIT_CRASH, exits.EXIT_RETRYABLE, exits.EXIT_RETRY_CRASH) == (2, 1, 200, 201)
    assert exits.EXIT_CRASH_LOOP == 3 and not exits.is_retried(exits.EXIT_CRASH_LOOP)
    assert not exits.is_retried(127) and exits.is_retried(128) and exits.signal_status(signal.SIGTERM) == 143


# ---------------------------------------------------------------------------------------------------
# S3 transfers against SeaweedFS


def test_storage_streams_files_multipart_and_lists_sizes(s3_env, tmp_path):
    bucket = s3_env.create_bucket()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB + 3))  # three 5 MiB parts
    store = S3Storage(bucket, "ds", multipart_chunksize=5 * MiB)
    store.upload_file(big, "sub/big.bin")
    head = s3_env.client().head_object(Bucket=bucket, Key="ds/sub/big.bin")
    assert head["ContentLength"] == big.stat().st_size and head["ETag"].strip('"').endswith("-3")
    assert store.sizes() == {"sub/big.bin": big.stat().st_size}
    assert store.sizes("sub/b") == {"sub/big.bin": big.stat().st_size} and store.sizes("other") == {}
    store.download_file("sub/big.bin", tmp_path / "got" / "big.bin")
    assert (tmp_path / "got" / "big.bin").read_bytes() == big.read_bytes()
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["big.bin"]  # no .part left


def test_fetch_and_push_datasets(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket()
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    files = {"meta.json": b"{}", "train.beton": b"t" * 1000, "val.beton": b"v" * 10, "nested/x.bin": b"x"}
    for name, data in files.items():
        (src / name).write_bytes(data)

    order = []
    upload = S3Storage.upload_file
    monkeypatch.setattr(S3Storage, "upload_file", lambda self, path, key: (order.append(key), upload(self, path, key)))
    assert launch.push(src, bucket, "ds/fm") == 4
    assert order[-1] == "meta.json"  # readers take meta.json as "the dataset is complete"
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="ds/fm/folder-marker/", Body=b"")  # what some consoles create

    dest = tmp_path / "dest"
    assert launch.fetch(bucket, "ds/fm", dest) == 4
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files

    # files of the object's size are kept, others fetched again
    (dest / "train.beton").write_bytes(b"T" * 1000)
    (dest / "val.beton").write_bytes(b"short")
    launch.fetch(bucket, "ds/fm/", dest)
    assert (dest / "train.beton").read_bytes() == b"T" * 1000 and (dest / "val.beton").read_bytes() == b"v" * 10

    # a single object rather than a prefix lands as that file
    client.put_object(Bucket=bucket, Key="raw/cifar-10-python.tar.gz", Body=b"archive")
    client.put_object(Bucket=bucket, Key="raw/cifar-10-python.tar.gz.sha256", Body=b"not this one")
    assert launch.fetch(bucket, "raw/cifar-10-python.tar.gz", tmp_path / "one") == 1
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["cifar-10-python.tar.gz"]

    # nothing there, or a missing bucket: permanent (the launcher exits 2)
    with pytest.raises(StorageConfigError, match="no objects under"):
        launch.fetch(bucket, "ds/nothing", tmp_path / "none")
    with pytest.raises(StorageConfigError, match="NoSuchBucket|404"):
        launch.fetch("no-such-bucket-gnp", "x", tmp_path / "none")


def test_sigterm_during_a_dataset_download_exits_143(tmp_path):
    """A pod deleted while the dataset downloads: no child to pass SIGTERM to, so the launcher stops the
    transfer itself and exits 128+15 at once (not after its S3 retries, and without starting torchrun)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(60)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.launch", "train", "--recipe", "x"],
            env=_launch_env(
                tmp_path,
                FAKE_MODE="ok",
                GNP_DATA_S3="s3://bucket/ds",
                GNP_DATA_DIR=str(tmp_path / "data"),
                AWS_ENDPOINT_URL_S3=endpoint,
                AWS_ACCESS_KEY_ID="k",
                AWS_SECRET_ACCESS_KEY="s",
                AWS_EC2_METADATA_DISABLED="true",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = server.accept()  # the launcher's first request: it now waits for an answer that never comes
            with conn:
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=30)
                assert proc.returncode == 143, err
                assert time.monotonic() - t0 < 10 and "Traceback" not in err and "READY" not in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
