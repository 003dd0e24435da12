"""The crash budget (trainer/crash_budget.py): a run that keeps crashing from the same checkpoint stops for good.

What is checked, and against what:
- the counting rule, as a table of recorded starts written out by hand from the rule in the module docstring;
- the record in a local folder and on a real S3 server (SeaweedFS): a start is recorded, the start after
  run.crash_restarts+1 crashes refuses without touching the record, a clean end is recorded, a damaged record
  is kept aside with one warning and counting starts afresh;
- run.crash_restarts and GNP_CRASH_RESTARTS: bad values are one line, exit 2;
- drills with the real launcher (`python -m trainer.launch train`, 2 ranks under torchrun, gloo), each rerun
  standing in for the pod the operator recreates: a rank that crashes at the same step every time stops with
  exit 3 and one line after exactly crash_restarts+1 crashed starts; one that crashes after a new checkpoint
  each time goes on and finishes BITWISE equal (model and optimizer state) to an uninterrupted run made in the
  same test; a preempted start (SIGTERM to the launcher) does not use up the budget.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FMNIST, ROOT, cli_env, run_cli, run_torchrun
from tests.support.s3server import s3_env, s3_server  # noqa: F401 (fixtures)
from trainer import config, crash_budget
from trainer.checkpoint import Checkpointer
from trainer.dist import DistEnv
from trainer.storage import LocalStorage, open_storage

ONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def starts(*spec: tuple[int | None, str | None]) -> list[dict]:
    return [{"from": f, "unix": 0.0, "restart": 0, "end": e} for f, e in spec]


# (recorded starts as (from, end), the checkpoint the new start resumes from) -> crashes counted
COUNTS = [
    ((), None, 0),  # a first start
    (((None, None),), None, 1),  # crashed before any checkpoint
    (((None, None),), 4, 1),  # wrote step 4, then crashed: a crash at 4
    (((None, None), (4, None)), 4, 2),  # and once more from 4
    (((None, None), (4, None), (4, None)), 4, 3),
    (((None, None), (4, None)), 8, 1),  # the second start wrote step 8 before crashing: progress
    (((None, None), (4, None), (8, None)), 8, 2),  # the crash at 4 no longer counts
    (((None, None), (4, "signal"), (4, None)), 4, 2),  # a preemption is skipped: neither counted nor a reset
    (((None, "fault"), (None, "signal")), None, 0),  # an outage, a preemption: no crash
    (((None, None), (4, "done")), 4, 1),  # a finished start is no crash either
    (((None, None), (4, None), (8, None)), 4, 1),  # step 8 did not verify, so this start resumes from 4
]


@pytest.mark.parametrize("recorded, resumed, crashed", COUNTS)
def test_counting_rule(recorded, resumed, crashed):
    record = starts(*recorded)
    assert crash_budget.crashes_at(record, resumed) == crashed
    for limit in range(4):  # the start refuses once the crashes exceed the restarts allowed
        assert bool(crash_budget.refusal(record, resumed, limit, "x")) == (crashed > limit)


def test_refusal_is_one_line_with_the_step_the_count_and_the_way_out():
    line = crash_budget.refusal(starts((None, None), (4, None), (4, None)), 4, 2, "/r/checkpoints/starts.json")
    assert line == (
        "crash loop: 3 starts in a row crashed before a checkpoint newer than step 4 was written "
        "(run.crash_restarts=2); not starting again (exit 3, permanent). To go on: fix the crash, then raise "
        "run.crash_restarts (GNP_CRASH_RESTARTS) or delete /r/checkpoints/starts.json"
    )
    assert "before a first checkpoint" in crash_budget.refusal(starts((None, None)), None, 0, "x")


def budget_round_trip(storage, status_dir: Path, monkeypatch) -> None:
    """Start, crash, refuse, reset, finish and a launcher-recorded end, against `storage`."""
    monkeypatch.setenv("GNP_STATUS_DIR", str(status_dir))
    first = crash_budget.begin(storage, None, 1, ONE, {"uri": storage.uri})
    assert first.index == 0 and [s["from"] for s in crash_budget.read(storage)] == [None]
    crash_budget.begin(storage, 4, 1, ONE)  # the first start crashed after step 4: 1 crash allowed
    before = storage.get(crash_budget.RECORD)
    with pytest.raises(crash_budget.CrashLoopError, match=r"^crash loop: 2 starts .* newer than step 4 "):
        crash_budget.begin(storage, 4, 1, ONE)
    assert storage.get(crash_budget.RECORD) == before  # a refusal records nothing: the next one refuses too
    assert crash_budget.begin(storage, 8, 1, ONE).index == 2  # progress
    pointed = crash_budget.begin(storage, 8, 5, ONE, {"uri": storage.uri})
    assert json.loads((status_dir / crash_budget.POINTER).read_text())["index"] == pointed.index == 3
    crash_budget.end_from_status_dir(status_dir, "signal")  # what the launcher does after a SIGTERM
    done = crash_budget.begin(storage, 8, 5, ONE)
    crash_budget.finish(done)
    assert [(s["from"], s["end"]) for s in crash_budget.read(storage)] == [
        (None, None),
        (4, None),
        (8, None),
        (8, "signal"),
        (8, "done"),
    ]
    crash_budget.end_from_status_dir(status_dir, "fault")  # start 3 is no longer the newest: left alone
    assert crash_budget.read(storage)[3]["end"] == "signal"


def test_record_in_a_local_folder(tmp_path, monkeypatch):
    budget_round_trip(LocalStorage(tmp_path / "checkpoints"), tmp_path, monkeypatch)


def test_record_on_s3(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket()
    storage = open_storage(f"s3://{bucket}/runs/a")
    budget_round_trip(storage, tmp_path, monkeypatch)
    listed = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert f"runs/a/{crash_budget.RECORD}" in [o["Key"] for o in listed]


@pytest.mark.parametrize("damage", [b"{not json", b'{"starts": {"from": 1}}', b'{"starts": [{"end": "x"}]}', b"\xff"])
def test_a_damaged_record_is_kept_aside_and_counting_starts_afresh(tmp_path, capsys, damage):
    storage = LocalStorage(tmp_path)
    storage.put(crash_budget.RECORD, damage)
    start = crash_budget.begin(storage, 4, 0, ONE)  # would refuse with any crash counted
    assert start.index == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: crash budget: {tmp_path}/starts.json is damaged (")
    assert err[1:] == ["run starts: 1 (before this one: 0 crashed, 0 stopped by a signal, 0 faults, 0 finished)"]
    assert storage.get(crash_budget.DAMAGED) == damage
    assert [(s["from"], s["end"]) for s in crash_budget.read(storage)] == [(4, None)]


def test_a_storage_failure_does_not_stop_the_start(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    start = crash_budget.begin(LocalStorage(blocker / "checkpoints"), 4, 0, ONE)  # a parent that is a file
    assert start.storage is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: crash budget: cannot read or write ")


def test_crash_restarts_setting_and_its_environment_default(monkeypatch):
    monkeypatch.delenv(config.CRASH_RESTARTS_ENV, raising=False)
    assert config.load("debug-cpu").run.crash_restarts == 3
    monkeypatch.setenv(config.CRASH_RESTARTS_ENV, "5")
    assert config.load("debug-cpu").run.crash_restarts == 5
    assert config.load("debug-cpu", ["run.crash_restarts=0"]).run.crash_restarts == 0  # --set wins
    with pytest.raises(config.ConfigError, match=r"^run.crash_restarts: invalid value -1; expected an integer >= 0$"):
        config.load("debug-cpu", ["run.crash_restarts=-1"])
    monkeypatch.setenv(config.CRASH_RESTARTS_ENV, "three")
    with pytest.raises(config.ConfigError, match=r"^GNP_CRASH_RESTARTS: invalid value 'three'; expected an integer"):
        config.load("debug-cpu")


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_bad_crash_restarts_is_one_line_exit_2(value):
    res = run_cli("train", "--recipe", "debug-cpu", GNP_CRASH_RESTARTS=value)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: GNP_CRASH_RESTARTS: invalid value {value!r}; expected an integer >= 0")


# ---------------------------------------------------------------------------------------------------
# drills: the real launcher, 2 ranks under torchrun

FINAL_STEP = 2 * (256 // 32)  # 2 epochs of 256 images, global batch 32


def train_sets(run_dir: Path, *extra: str) -> list[str]:
    """A deterministic 2-rank CPU run with a checkpoint every 4 steps (mid-epoch too)."""
    sets = [
        "data.loader=memory",
        f"data.path=fashion-mnist:{FMNIST}",
        "data.limit=256",
        "data.augment=none",
        "loop.epochs=2",
        "loop.batch_size=32",
        "loop.deterministic=true",
        "gnp.hybrid_p=0.7",
        "checkpoint.every_steps=4",
        "checkpoint.keep=3",
        "metrics.progress=lines",
        f"run.dir={run_dir}",
        *extra,
    ]
    return ["--recipe", "debug-cpu", *[a for s in sets for a in ("--set", s)]]


def launcher_env(tmp_path: Path, **extra: str) -> dict:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = cli_env(PET_NPROC_PER_NODE="2", GNP_RETRY_CRASHES="1", TMPDIR=str(tmp_path / "tmp"), **extra)
    for var in ("GNP_FAULT_CRASH_AT_STEP", "GNP_CRASH_RESTARTS"):
        if var not in extra:
            env.pop(var, None)
    return env


def launch(run_dir: Path, tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """One start of the run: what the recreated pod runs."""
    return subprocess.run(
        [sys.executable, "-m", "trainer.launch", "train", *train_sets(run_dir, *extra)],
        cwd=ROOT,
        env=launcher_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def recorded(run_dir: Path) -> list[tuple[int | None, str | None]]:
    return [(s["from"], s["end"]) for s in crash_budget.read(LocalStorage(run_dir / "checkpoints"))]


needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs dataset-fashion-mnist")


@pytest.mark.slow
@needs_fmnist
def test_a_crash_at_the_same_step_stops_after_the_budget(tmp_path):
    """crash_restarts=2 (from GNP_CRASH_RESTARTS, as the Kubernetes renderer sets it): rank 1 crashes at step 6
    of every start, after checkpoint 4. Starts 1-3 crash (201, retried), start 4 refuses: exit 3, one line."""
    run_dir = tmp_path / "run"
    crash = "RuntimeError: GNP_FAULT_CRASH_AT_STEP: injected crash at step 6 on rank 1"
    termination = tmp_path / "termination-log"  # what the kubelet mounts at /dev/termination-log
    statuses = []
    for i in range(4):
        termination.write_text("")
        res = launch(
            run_dir, tmp_path, GNP_FAULT_CRASH_AT_STEP="6", GNP_CRASH_RESTARTS="2", GNP_TERMINATION_LOG=str(termination)
        )
        statuses.append(res.returncode)
        lines = res.stderr.strip().splitlines()
        if i < 3:  # every recorded start says its number in the run's record (make status's restart count)
            counts = f"{i} crashed, 0 stopped by a signal, 0 faults, 0 finished"
            assert f"run starts: {i + 1} (before this one: {counts})" in lines, lines
        if i > 0:  # the crashed pod's log is gone with it: the next start shows the crash the run kept
            head = next(j for j, line in enumerate(lines) if line.startswith("previous start failed: "))
            origin = "started afresh" if i == 1 else "resumed from step 4"
            assert re.fullmatch(rf"previous start failed: exit 201 on rank 1 at \S+Z \(it had {origin}\)", lines[head])
            tail = list(itertools.takewhile(lambda line: line.startswith("  | "), lines[head + 1 :]))
            assert len(tail) == 20 and tail[-1] == f"  | {crash}", tail  # the innermost frames, then the error
            assert any(line.endswith("in _injected_crash") for line in tail) and "^^^" not in str(tail), tail
        if res.returncode == 201:
            assert "injected crash at step 6 on rank 1" in res.stderr
            assert "ChildFailedError" not in res.stderr and "Root Cause" not in res.stderr, res.stderr[-3000:]
            assert lines[-1].startswith("launch: a rank crashed; exit 201")
            assert termination.read_text().startswith("exit 201: rank 1 crashed\n")
            assert termination.read_text().endswith(f"{crash}\n")
    assert statuses == [201, 201, 201, 3], res.stderr[-3000:]
    assert lines[-1] == (  # the report of the last crash, then the one line (which names that crash too)
        "error: crash loop: 3 starts in a row crashed before a checkpoint newer than step 4 was written "
        f"(run.crash_restarts=2); the last crash (rank 1): {crash}; not starting again (exit 3, permanent). To go "
        f"on: fix the crash, then raise run.crash_restarts (GNP_CRASH_RESTARTS) or delete "
        f"{run_dir}/checkpoints/starts.json"
    )
    assert not [line for line in lines[:-1] if not line.startswith(("previous start failed: ", "  | "))], lines
    assert termination.read_text() == ""  # a refusal is no crash: the pod's log says it all
    assert recorded(run_dir) == [(None, None), (4, None), (4, None)]  # the refusal recorded nothing
    failures = [s["failure"] for s in crash_budget.read(LocalStorage(run_dir / "checkpoints"))]
    assert [(f["exit"], f["rank"], f["lines"][-1]) for f in failures] == [(201, 1, crash)] * 3
    # the way out the line names: without the record the run trains again (and here crashes again)
    (run_dir / "checkpoints" / "starts.json").unlink()
    res = launch(run_dir, tmp_path, GNP_FAULT_CRASH_AT_STEP="6", GNP_CRASH_RESTARTS="2")
    assert res.returncode == 201 and recorded(run_dir) == [(4, None)], res.stderr[-3000:]


def tensors(sd: dict) -> dict:
    out = {f"model.{k}": v for k, v in sd["model"].items()}
    for pid, st in sd["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.slow
@needs_fmnist
def test_crashes_with_progress_in_between_go_on_and_finish_bitwise_equal(tmp_path):
    """crash_restarts=1: rank 1 crashes at step 6, 10 and 14, each after a new checkpoint (4, 8, 12); a count
    that progress did not reset would refuse the third start. The fourth start finishes; its final checkpoint
    equals an uninterrupted 2-rank run's bitwise."""
    ref_dir = tmp_path / "ref"
    res = run_torchrun("-m", "trainer", "train", *train_sets(ref_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    ref_step, ref = Checkpointer(ref_dir / "checkpoints").latest()
    assert ref_step == FINAL_STEP

    run_dir = tmp_path / "run"
    for crash in ("6", "10", "14"):
        res = launch(run_dir, tmp_path, "run.crash_restarts=1", GNP_FAULT_CRASH_AT_STEP=crash)
        assert res.returncode == 201, (crash, res.stderr[-3000:])
    res = launch(run_dir, tmp_path, "run.crash_restarts=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert recorded(run_dir) == [(None, None), (4, None), (8, None), (12, "done")]
    step, sd = Checkpointer(run_dir / "checkpoints").latest()
    assert step == FINAL_STEP
    got, want = tensors(sd), tensors(ref)
    assert got.keys() == want.keys() and len(got) > 10
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the uninterrupted run"


@pytest.mark.slow
@needs_fmnist
def test_a_preempted_start_does_not_use_up_the_budget(tmp_path):
    """crash_restarts=0, so a single crash stops the run: a SIGTERM to the launcher once its start is recorded
    (a preemption) ends with 143 and the end "signal", and the next start trains and finishes."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.launch", "train", *train_sets(run_dir, "run.crash_restarts=0")],
        cwd=ROOT,
        env=launcher_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "tmp").glob(f"gnp-status.*/{crash_budget.POINTER}")):
            assert proc.poll() is None and time.monotonic() < deadline, "the start was not recorded"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    # (the start may have written checkpoint 4 before the signal: then it ended at 4, where the next resumes)
    assert recorded(run_dir) == [(None, "signal")], err[-3000:]
    res = launch(run_dir, tmp_path, "run.crash_restarts=0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [end for _, end in recorded(run_dir)] == ["signal", "done"]


def test_launcher_marks_nothing_without_a_pointer(tmp_path):
    """Only rank 0's node holds the pointer; the launchers of other nodes record nothing."""
    crash_budget.end_from_status_dir(tmp_path, "signal")
    assert os.listdir(tmp_path) == []
