"""Sinks (metrics.jsonl, Prometheus endpoints per rank) and the run plots.

Every Prometheus check scrapes the real HTTP endpoint and compares with values computed by hand here.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import zlib

import pytest

from tests.support.prom import documented_metrics, free_ports, parse_exposition, scrape
from trainer.metrics import NullSink, PrometheusSink, RunSink, TeeSink, build_sink

TRAIN_1 = {
    "step": 3,
    "epoch": 0.3,
    "loss": 2.25,
    "objective": 2.5,
    "loss_perturbed": 2.75,
    "sharpness": 0.5,
    "g1_norm": 4.0,
    "grad_norm": 3.0,
    "lr": 0.1,
    "r": 0.05,
    "alpha": 0.8,
    "gnp": True,
    "gnp_steps": 3,
    "images_per_s": 100.0,
    "data_wait_s": 0.25,
    "window_steps": 3,
    "window_images": 48,
    "step_times_s": [0.003, 0.02, 0.6],
}
TRAIN_2 = {
    **TRAIN_1,
    "step": 5,
    "epoch": 0.5,
    "loss": 2.0,
    "gnp": False,
    "gnp_steps": 4,
    "data_wait_s": 0.5,
    "window_steps": 2,
    "window_images": 30,
    "step_times_s": [1.2, 40.0],
    "lr": 0.09,
}
EVAL = {
    "epoch": 1,
    "eval_loss": 1.5,
    "top1": 0.625,
    "top5": 0.875,
    "top1_error": 0.375,
    "top5_error": 0.125,
    "images": 800,
}


def one(samples, name: str, **labels) -> float:
    """The value of the single sample `name` whose labels include `labels`."""
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


@pytest.fixture
def sink(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    s = PrometheusSink(port=free_ports(1), addr="127.0.0.1", job="exp-1", rank=3, local_rank=1, gpu_reader=None)
    yield s
    s.close()


def test_endpoint_exports_exactly_the_documented_families(sink):
    documented = documented_metrics()
    assert len(documented) >= 25  # the table in trainer/metrics.py was parsed, not an empty docstring
    types, _ = parse_exposition(scrape(sink.port))
    assert types == documented


def test_values_follow_the_records(sink):
    sink.log("start", {"world_size": 8, "device": "cuda:1", "model": "resnet18", "resumed_from_step": None})
    sink.log("train", TRAIN_1)
    sink.log("train", TRAIN_2)
    sink.log("eval", EVAL)
    types, samples = parse_exposition(scrape(sink.port))
    lab = {"job_name": "exp-1", "rank": "3", "local_rank": "1"}
    assert all(s[1].items() >= lab.items() for s in samples), "every sample carries job_name/rank/local_rank"
    assert not any("step" in s[1] for s in samples)
    assert one(samples, "gnp_steps_total") == 5
    assert one(samples, "gnp_images_total") == 78
    assert one(samples, "gnp_gnp_steps_total") == 4  # 3 GNP steps, then one of the next two
    assert one(samples, "gnp_data_wait_seconds_total") == pytest.approx(0.75)
    # histogram: 5 observations 0.003, 0.02, 0.6, 1.2, 40.0 (40 s lands only in +Inf)
    assert one(samples, "gnp_step_duration_seconds_count") == 5
    assert one(samples, "gnp_step_duration_seconds_sum") == pytest.approx(41.823)
    for le, count in (
        ("0.005", 1),
        ("0.01", 1),
        ("0.025", 2),
        ("0.5", 2),
        ("0.75", 3),
        ("1.0", 3),
        ("1.5", 4),
        ("30.0", 4),
        ("+Inf", 5),
    ):
        assert one(samples, "gnp_step_duration_seconds_bucket", le=le) == count, le
    # gauges: the last record's values; the GNP-only ones keep the last GNP step's
    expected = {
        "gnp_train_loss": 2.0,
        "gnp_train_loss_perturbed": 2.75,
        "gnp_sharpness": 0.5,
        "gnp_grad_norm_g1": 4.0,
        "gnp_grad_norm_combined": 3.0,
        "gnp_alpha": 0.8,
        "gnp_r": 0.05,
        "gnp_step_is_gnp": 0.0,
        "gnp_learning_rate": 0.09,
        "gnp_epoch": 0.5,
        "gnp_eval_loss": 1.5,
        "gnp_eval_top1_accuracy": 0.625,
        "gnp_eval_top5_accuracy": 0.875,
        "gnp_restarts": 2.0,
    }
    for name, value in expected.items():
        assert one(samples, name) == pytest.approx(value), name
    assert one(samples, "gnp_info", model="resnet18", device="cuda:1", world_size="8") == 1
    assert one(samples, "gnp_checkpoint_failures_total") == 0  # counters exist from the start
    names = {n for n, _, _ in samples}
    assert "gnp_checkpoint_last_success_timestamp_seconds" not in names  # gauges only once set
    assert "gnp_gpu_memory_allocated_bytes" not in names  # no reader (CPU)


def test_gnp_step_count_after_resume(sink):
    # A resumed run's start record carries the restored cumulative count: the first window is exact.
    sink.log("start", {"resumed_from_step": 100, "gnp_steps": 90})
    sink.log("train", {**TRAIN_1, "gnp_steps": 92, "window_steps": 3})
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_gnp_steps_total") == 2


def test_checkpoint_records(sink):
    import time

    t0 = time.time()
    sink.log("checkpoint", {"step": 10, "blocking_s": 1.25})  # the trainer's record: save returned
    t1 = time.time()
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_checkpoint_duration_seconds") == 1.25
    assert t0 <= one(samples, "gnp_checkpoint_last_success_timestamp_seconds") <= t1
    assert one(samples, "gnp_checkpoint_failures_total") == 0
    sink.log("checkpoint", {"step": 20, "ok": False, "duration_s": 3.0, "error": "S3 timeout"})
    sink.log("checkpoint", {"step": 30, "error": "disk full"})
    sink.log("checkpoint", {"step": 30, "final": True})  # a summary, not a save
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_checkpoint_failures_total") == 2
    assert one(samples, "gnp_checkpoint_duration_seconds") == 3.0
    assert t0 <= one(samples, "gnp_checkpoint_last_success_timestamp_seconds") <= t1  # unchanged by failures
    # cumulative fields of an asynchronous checkpointer take over
    sink.log("checkpoint", {"step": 40, "ok": True, "failures": 5, "last_success_unix": 1.7e9})
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_checkpoint_failures_total") == 5
    assert one(samples, "gnp_checkpoint_last_success_timestamp_seconds") == 1.7e9


def test_async_checkpointer_stats(sink):
    # trainer.checkpoint.Checkpointer.stats as logged by train.py: the upload of a save is still pending at
    # its record; its success shows at the next record.
    stats = {
        "uploads_total": 0,
        "failures_total": 0,
        "last_success_unix": 0.0,
        "last_duration_s": 0.0,
        "last_error": "",
    }
    sink.log("checkpoint", {"step": 5, "blocking_s": 0.5, **stats})
    _, samples = parse_exposition(scrape(sink.port))
    names = {n for n, _, _ in samples}
    assert one(samples, "gnp_checkpoint_duration_seconds") == 0.5
    assert "gnp_checkpoint_last_success_timestamp_seconds" not in names  # nothing uploaded yet
    assert "gnp_checkpoint_upload_duration_seconds" not in names
    stats.update(
        uploads_total=1, failures_total=3, last_success_unix=1.75e9, last_duration_s=12.5, last_error="timeout"
    )
    sink.log("checkpoint", {"step": 10, "blocking_s": 0.25, **stats})
    sink.log("checkpoint", {"step": 10, "final": True, **stats, "failures_total": 4})
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_checkpoint_failures_total") == 4
    assert one(samples, "gnp_checkpoint_last_success_timestamp_seconds") == 1.75e9
    assert one(samples, "gnp_checkpoint_upload_duration_seconds") == 12.5
    assert one(samples, "gnp_checkpoint_duration_seconds") == 0.25


def test_gpu_reader_values_and_failures(capsys):
    readings = iter([{"memory_allocated_bytes": 2.5e9, "utilization_ratio": 0.5}])

    def reader() -> dict:
        return next(readings)  # the second call raises StopIteration: a broken NVML must not stop training

    s = PrometheusSink(port=free_ports(1), addr="127.0.0.1", job="j", rank=0, local_rank=0, gpu_reader=reader)
    try:
        s.log("train", TRAIN_1)
        _, samples = parse_exposition(scrape(s.port))
        assert one(samples, "gnp_gpu_memory_allocated_bytes") == 2.5e9
        assert one(samples, "gnp_gpu_utilization_ratio") == 0.5
        s.log("train", TRAIN_2)
        s.log("train", TRAIN_2)
        assert s.gpu_reader is None
        assert capsys.readouterr().err.count("GPU reading failed") == 1
        _, samples = parse_exposition(scrape(s.port))
        assert one(samples, "gnp_gpu_memory_allocated_bytes") == 2.5e9  # last good value stays
        assert one(samples, "gnp_steps_total") == 7
    finally:
        s.close()


def test_close_frees_the_port_and_busy_port_is_a_config_error():
    port = free_ports(1)
    s = PrometheusSink(port=port, addr="127.0.0.1", job="j", rank=0, local_rank=0, gpu_reader=None)
    with pytest.raises(ValueError, match=rf"^metrics\.port: .*127\.0\.0\.1:{port}"):
        PrometheusSink(port=port, addr="127.0.0.1", job="j", rank=1, local_rank=0, gpu_reader=None)
    s.close()
    s.close()  # idempotent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the server still held it
    with pytest.raises(ValueError, match=r"^metrics\.port: 70000 "):
        PrometheusSink(port=70000, addr="127.0.0.1", job="j", rank=0, local_rank=0, gpu_reader=None)


def test_build_sink_per_rank(tmp_path):
    base = free_ports(2)
    common = dict(run_dir=tmp_path, jsonl=True, progress="lines", port=base, addr="127.0.0.1", job="j")
    plain = build_sink(rank=0, local_rank=0, prometheus=False, **common)
    assert type(plain) is RunSink
    plain.close()
    assert type(build_sink(rank=1, local_rank=1, prometheus=False, **common)) is NullSink
    rank0 = build_sink(rank=0, local_rank=0, prometheus=True, **common)
    rank5 = build_sink(rank=5, local_rank=1, prometheus=True, **common)  # second process of node 2
    try:
        assert isinstance(rank0, TeeSink) and isinstance(rank5, PrometheusSink)
        import torch

        assert (rank5.gpu_reader is None) == (not torch.cuda.is_available())  # GPU gauges only with CUDA
        rank0.log("train", TRAIN_1)
        rank5.log("train", TRAIN_2)
        _, s0 = parse_exposition(scrape(base))
        _, s1 = parse_exposition(scrape(base + 1))
        assert one(s0, "gnp_steps_total", rank="0", local_rank="0") == 3
        assert one(s1, "gnp_steps_total", rank="5", local_rank="1") == 2
    finally:
        rank0.close()
        rank5.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["kind"] == "train" and rec["loss"] == 2.25 and rec["window_images"] == 48
    assert "step_times_s" not in rec


def test_run_sink_lines(tmp_path, capsys):
    import sys

    sink = RunSink(tmp_path / "m.jsonl", "lines", stream=sys.stdout)
    sink.log("train", TRAIN_1)
    sink.log("checkpoint", {"step": 3, "blocking_s": 0.123456})
    sink.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train step 3 | epoch 0.30 | loss 2.2500 | sharp +0.5000 | |g1| 4.000")
    assert out[1] == "checkpoint step 3 | blocking_s 0.1235"


# ---------------------------------------------------------------- plots


def write_run(path, offset: float) -> None:
    path.mkdir(parents=True)
    recs = [{"kind": "start", "world_size": 1}]
    for step in range(1, 11):
        loss = 2.0 * math.exp(-step / 5) + offset
        recs.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step / 5,
                "loss": loss,
                "loss_perturbed": loss + 0.1,
                "sharpness": 0.1,
                "g1_norm": 1.0 / step,
                "grad_norm": 0.8 / step,
                "lr": 0.1,
            }
        )
        if step % 5 == 0:
            recs.append(
                {
                    "kind": "eval",
                    "epoch": step // 5,
                    "eval_loss": loss,
                    "top1": 0.5,
                    "top5": 0.9,
                    "top1_error": 0.5,
                    "top5_error": 0.1,
                }
            )
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, checking the signature and the chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", data[8:16])
    assert tag == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(tag + body)
    return struct.unpack(">II", body[:8])


def test_plot_two_runs(tmp_path):
    from trainer.study.plot import add_arguments, run

    write_run(tmp_path / "sgd", 0.3)
    write_run(tmp_path / "gnp", 0.0)
    out = tmp_path / "plots" / "cmp.png"
    # through the subcommand's own arguments, as `python -m trainer plot sgd gnp --out ...` mounts them
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(tmp_path / "sgd"), str(tmp_path / "gnp"), "--out", str(out)])) == 0
    data = out.read_bytes()
    assert png_size(data) == (1600, 900)
    assert data.endswith(b"IEND\xaeB`\x82")
    assert len(data) > 30_000  # six panels of curves and text, not a blank canvas


def test_plot_bad_run_dirs(tmp_path):
    from trainer.study.plot import plot_runs

    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text('{"kind": "start"}\n')
    for bad, match in (
        (tmp_path / "missing", "has no metrics.jsonl"),
        (tmp_path / "empty", "has no metrics.jsonl"),
        (tmp_path / "blank", "holds no train or eval records"),
    ):
        with pytest.raises(ValueError, match=match) as e:
            plot_runs([str(bad)], str(tmp_path / "x.png"))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()
