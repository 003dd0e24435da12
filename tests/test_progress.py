"""Progress: the estimate, the log line, and TrainJob status updates against a local TLS server modelled on
Kubeflow Trainer v2.3.0's status server (tests/support/status_server.py): CRD-valid updates from a real
training run, the rate limit, a rotated token, and servers that refuse or hang, which must change nothing in
the run's result and must not stall it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import FMNIST, run_cli
from tests.support.status_server import StatusServer, make_certs, trainer_status_schema
from trainer.checkpoint import Checkpointer
from trainer.progress import (
    ENV_CA,
    ENV_TOKEN,
    ENV_URL,
    MAX_TEXT,
    Progress,
    ProgressSink,
    Publisher,
    Snapshot,
    StatusClient,
    parse_line,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_eta_is_measured_seconds_per_step_since_the_first_logged_step():
    clock = Clock()
    p = Progress(clock)
    p.start(step=40, total=100)  # resumed at step 40
    assert p.percent() == 40 and p.eta_s() is None  # nothing measured yet in this process
    p.observe(45)
    clock.t += 30  # 15 steps in 30 s, an evaluation and a checkpoint included
    p.observe(60)
    assert p.percent() == 60 and p.eta_s() == 80  # 40 steps left at 2 s each
    p.finish()
    assert p.percent() == 100 and p.eta_s() == 0


def test_trainer_status_is_valid_against_the_crd_whatever_the_values():
    validator = jsonschema.Draft7Validator(trainer_status_schema())
    snap = Snapshot(step=3, total_steps=0, percent=None, eta_s=None, loss=float("nan"), lr=1e-300, epoch=0.1)
    snap["top1"] = 0.5
    snap["images_per_s"] = 10**80  # a 81-character number: cut to the CRD's 64
    status = snap.trainer_status()
    assert list(validator.iter_errors(status)) == [] and "lastUpdatedTime" in status
    assert "progressPercentage" not in status and "estimatedRemainingSeconds" not in status  # unknown: left out
    values = {m["name"]: m["value"] for m in status["metrics"]}
    assert values["loss"] == "nan" and values["lr"] == "1e-300" and len(values["images_per_s"]) == MAX_TEXT
    full = Snapshot(step=10, total_steps=10, percent=100, eta_s=10**12).trainer_status()
    assert full["progressPercentage"] == 100 and full["estimatedRemainingSeconds"] == 2**31 - 1  # int32
    assert list(validator.iter_errors(full)) == []


def test_progress_line_reads_back():
    clock = Clock()
    out = io.StringIO()
    sink = ProgressSink(every_s=60, stream=out, clock=clock)
    sink.log("start", {"step": 0, "total_steps": 200})
    sink.log("train", {"step": 10, "loss": 0.5, "lr": 0.1, "epoch": 0.5, "images_per_s": 100.0})
    clock.t += 20
    sink.log("train", {"step": 20, "loss": 0.4, "lr": 0.1, "epoch": 1.0, "images_per_s": 100.0})  # < 60 s: no line
    sink.log("eval", {"top1": 0.75, "epoch": 1})  # after an evaluation: always a line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    got = parse_line("[rank0]: " + lines[-1])
    assert got == {
        "step": "20",
        "total_steps": "200",
        "percent": "10",
        "epoch": "1",
        "eta_s": "360",
        "eta": "6m00s",
        "loss": "0.4",
        "top1": "0.75",
        "lr": "0.1",
        "images_per_s": "100",
    }
    assert parse_line("train step 20 | loss 0.4") is None


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server(certs, tmp_path):
    token = tmp_path / "token"
    token.write_text("token-1\n")
    srv = StatusServer(certs, token)
    yield srv
    srv.close()


def _client(server: StatusServer, ca: Path) -> StatusClient:
    return StatusClient(server.url, str(ca), str(server.token_file), timeout=1.0)


def test_publisher_limits_the_rate_reads_a_rotated_token_and_sends_a_final_update(server, certs):
    pub = Publisher(_client(server, certs[0]), interval=0.5)
    t0 = time.monotonic()
    for step in range(1, 31):  # 30 updates over ~1.5 s: at most one per 0.5 s gets through
        pub.submit(Snapshot(step=step, total_steps=100, percent=step, eta_s=100 - step).trainer_status())
        if step == 15:
            server.token_file.write_text("token-2\n")  # the kubelet rotated the projected token
        time.sleep(0.05)
    pub.close(Snapshot(step=100, total_steps=100, percent=100, eta_s=0).trainer_status())
    times = [t for t, _ in server.updates]
    assert 3 <= len(times) <= 2 + (time.monotonic() - t0) / 0.5, times
    assert all(b - a >= 0.45 for a, b in zip(times[:-2], times[1:-1])), "updates closer than the interval"
    assert all(code == 200 for _, code in server.requests), server.requests  # the new token was read
    last = server.updates[-1][1]
    assert last["progressPercentage"] == 100 and last["estimatedRemainingSeconds"] == 0
    assert pub.sent == len(times)


@pytest.mark.parametrize("mode", ["403", "422", "500", "hang", "untrusted", "down"])
def test_publisher_never_blocks_or_raises_on_a_failing_server(server, certs, tmp_path, mode):
    logged: list[str] = []
    ca = certs[0]
    if mode == "untrusted":  # a CA that did not sign the server's certificate
        ca = make_certs(tmp_path / "other")[0]
    elif mode == "down":
        server.close()
    else:
        server.mode = mode
    pub = Publisher(_client(server, ca), interval=0.1, log=logged.append)
    t0 = time.monotonic()
    for step in range(20):
        pub.submit(Snapshot(step=step, total_steps=20, percent=5 * step).trainer_status())
    submitted = time.monotonic() - t0
    time.sleep(0.5)
    t1 = time.monotonic()
    pub.close(Snapshot(step=20, total_steps=20, percent=100, eta_s=0).trainer_status(), wait=0.5)
    assert submitted < 0.05 and time.monotonic() - t1 < 0.7  # the caller never waits for the server
    assert pub.sent == 0 and server.updates == []
    if mode != "hang":  # a hanging request is still in flight: nothing to say yet
        assert len(logged) == 1 and "training goes on" in logged[0], logged  # one line per kind of failure
    assert all("token" not in line for line in logged)


# ------------------------------------------------------------------------------------ a real training run


def _train(run_dir: Path, **env: str):
    sets = [
        "data.loader=memory",
        f"data.path=fashion-mnist:{FMNIST}",
        "data.limit=512",
        "data.augment=none",
        "loop.epochs=2",
        "loop.log_every=2",
        "loop.deterministic=true",
        f"run.dir={run_dir}",
    ]
    res = run_cli("train", "--recipe", "debug-cpu", *[a for s in sets for a in ("--set", s)], **env)
    assert res.returncode == 0, res.stderr[-3000:]
    done = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert done["kind"] == "done"
    return Checkpointer(run_dir / "checkpoints").latest()[1], done["wall_s"], res.stderr


@pytest.mark.slow
def test_a_training_run_reports_to_its_trainjob_and_a_failing_server_changes_nothing(server, certs, tmp_path):
    env = {ENV_URL: server.url, ENV_CA: str(certs[0]), ENV_TOKEN: str(server.token_file)}
    baseline, wall, _ = _train(tmp_path / "plain")

    reported, _, _ = _train(tmp_path / "ok", **env)
    statuses = [s for _, s in server.updates]
    assert len(statuses) >= 2, statuses
    percents = [s.get("progressPercentage", 0) for s in statuses]
    assert percents == sorted(percents) and percents[-1] == 100 and statuses[-1]["estimatedRemainingSeconds"] == 0
    names = {m["name"] for m in statuses[-1]["metrics"]}
    assert {"loss", "top1", "g1_norm", "sharpness", "lr", "epoch", "images_per_s", "step"} <= names
    times = [t for t, _ in server.updates]
    assert all(b - a >= 4.5 for a, b in zip(times[:-2], times[1:-1])), "more than one update per ~5 s"
    _assert_same(reported, baseline)

    for mode in ("403", "hang"):  # a refusal and a server that never answers (the others: the Publisher tests)
        server.mode = mode
        result, wall_fault, stderr = _train(tmp_path / mode, **env)
        _assert_same(result, baseline)
        # Not a timing test of the trainer, a bound on a stall: a POST in the training thread would add
        # its 5 s timeout per update; the final update waits at most 2 s.
        assert wall_fault < 1.5 * wall + 10, f"{mode}: {wall_fault} s vs {wall} s"
        assert stderr.count("TrainJob status update") <= 1, stderr[-2000:]


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model",):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert a[part][k].equal(b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(sa[i]["momentum_buffer"].equal(sb[i]["momentum_buffer"]) for i in sb)
