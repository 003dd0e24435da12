"""Sinks (metrics.jsonl, Prometheus endpoints per rank) and the run plots.

Every Prometheus check scrapes the real HTTP endpoint and compares with values computed by hand here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.support.prom import documented_metrics, free_ports, parse_exposition, parse_help, scrape
from trainer.metrics import METRICS, Metric, NullSink, PrometheusSink, RunSink, TeeSink, build_sink, markdown_table

ROOT = Path(__file__).resolve().parents[1]
# The document that holds the metrics table (was README.md).
METRICS_DOC = "k8s/monitoring/README.md"

# What dashboards, alerts and users query: family -> (type, labels beyond job_name/rank/local_rank). Written
# out here, not read from trainer.metrics.METRICS, so that renaming or retyping a row of the table fails.
EXPORTED = {
    "gnp_steps_total": ("counter", ()),
    "gnp_gnp_steps_total": ("counter", ()),
    "gnp_images_total": ("counter", ()),
    "gnp_scaler_skipped_steps_total": ("counter", ()),
    "gnp_step_duration_seconds": ("histogram", ()),
    "gnp_data_wait_seconds_total": ("counter", ()),
    "gnp_train_loss": ("gauge", ()),
    "gnp_train_loss_perturbed": ("gauge", ()),
    "gnp_sharpness": ("gauge", ()),
    "gnp_grad_norm_g1": ("gauge", ()),
    "gnp_grad_norm_combined": ("gauge", ()),
    "gnp_alpha": ("gauge", ()),
    "gnp_r": ("gauge", ()),
    "gnp_step_is_gnp": ("gauge", ()),
    "gnp_learning_rate": ("gauge", ()),
    "gnp_epoch": ("gauge", ()),
    "gnp_step": ("gauge", ()),
    "gnp_total_steps": ("gauge", ()),
    "gnp_eval_loss": ("gauge", ()),
    "gnp_eval_top1_accuracy": ("gauge", ()),
    "gnp_eval_top5_accuracy": ("gauge", ()),
    "gnp_checkpoint_duration_seconds": ("gauge", ()),
    "gnp_checkpoint_upload_duration_seconds": ("gauge", ()),
    "gnp_checkpoint_failures_total": ("counter", ()),
    "gnp_checkpoint_last_success_timestamp_seconds": ("gauge", ()),
    "gnp_restarts": ("gauge", ()),
    "gnp_process_start_time_seconds": ("gauge", ()),
    "gnp_gpu_memory_allocated_bytes": ("gauge", ()),
    "gnp_gpu_utilization_ratio": ("gauge", ()),
    "gnp_info": ("gauge", ("model", "device", "world_size")),
}
BASE_LABELS = {"job_name", "rank", "local_rank"}

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
    assert {m.name: (m.type, m.labels) for m in METRICS} == EXPORTED
    sink.log("start", {"world_size": 8, "device": "cpu", "model": "resnet18"})
    text = scrape(sink.port)
    types, samples = parse_exposition(text)
    assert types == documented_metrics() == {name: kind for name, (kind, _) in EXPORTED.items()}
    assert parse_help(text) == {m.name: m.help for m in METRICS}
    for name, labels, _ in samples:  # the labels of every sample present: the base ones plus the row's own
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in EXPORTED else name
        extra = set(labels) - BASE_LABELS - ({"le"} if name.endswith("_bucket") else set())
        assert extra == set(EXPORTED[family][1]) and BASE_LABELS <= set(labels), name


def test_table_drives_the_exporter():
    """Rows added to a copy of the table are exported and fed with no other code: one per type, one with
    labels, one fed by two record kinds; the values are worked out by hand from the records below."""
    extra = (
        Metric("gnp_test_gauge", "gauge", "A gauge from eval.top1_error", "eval", "top1_error"),
        Metric("gnp_test_images_total", "counter", "Counts eval.images", "eval", "images"),
        Metric("gnp_test_seconds", "histogram", "Observes train.laps", "train", "laps", buckets=(0.5, 2.0)),
        Metric("gnp_test_build", "gauge", "Info \\ with a backslash", "start", None, labels=("commit",)),
        Metric("gnp_test_either", "gauge", "Fed by eval and checkpoint", ("eval", "checkpoint"), "step"),
    )
    s = PrometheusSink(
        port=free_ports(1), addr="127.0.0.1", job="j", rank=0, local_rank=0, gpu_reader=None, metrics=METRICS + extra
    )
    try:
        before = scrape(s.port)
        types, samples = parse_exposition(before)
        assert {n: types[n] for n in ("gnp_test_gauge", "gnp_test_images_total", "gnp_test_seconds")} == {
            "gnp_test_gauge": "gauge",
            "gnp_test_images_total": "counter",
            "gnp_test_seconds": "histogram",
        }
        assert parse_help(before)["gnp_test_build"] == "Info \\ with a backslash"
        assert one(samples, "gnp_test_images_total") == 0  # counters exist from the start
        assert "gnp_test_gauge" not in {n for n, _, _ in samples}  # gauges once set
        s.log("start", {"commit": "abc123"})
        s.log("eval", {**EVAL, "step": 7})
        s.log("eval", {**EVAL, "top1_error": 0.25, "images": 200})
        s.log("train", {**TRAIN_1, "laps": [0.1, 1.0, 3.0]})
        s.log("checkpoint", {"step": 9, "blocking_s": 0.5})
        _, samples = parse_exposition(scrape(s.port))
        assert one(samples, "gnp_test_gauge") == 0.25  # the last eval's
        assert one(samples, "gnp_test_images_total") == 1000  # 800 + 200
        assert [one(samples, "gnp_test_seconds_bucket", le=le) for le in ("0.5", "2.0", "+Inf")] == [1, 2, 3]
        assert one(samples, "gnp_test_seconds_sum") == pytest.approx(4.1)
        assert one(samples, "gnp_test_build", commit="abc123") == 1
        assert one(samples, "gnp_test_either") == 9  # the second eval had no step; the checkpoint record had 9
        assert one(samples, "gnp_steps_total") == 3  # the table's own rows unaffected
    finally:
        s.close()


def test_a_table_without_start_rows_keeps_the_resume_baseline():
    # The start record feeds no row here, yet its gnp_steps is the baseline of the next window's delta.
    rows = tuple(m for m in METRICS if m.name == "gnp_gnp_steps_total")
    s = PrometheusSink(
        port=free_ports(1), addr="127.0.0.1", job="j", rank=0, local_rank=0, gpu_reader=None, metrics=rows
    )
    try:
        s.log("start", {"resumed_from_step": 100, "gnp_steps": 90})
        s.log("train", {**TRAIN_1, "gnp_steps": 92})
        types, samples = parse_exposition(scrape(s.port))
        assert types == {"gnp_gnp_steps_total": "counter"}
        assert one(samples, "gnp_gnp_steps_total") == 2
    finally:
        s.close()


def test_metric_rows_are_checked():
    good = dict(name="gnp_x", type="gauge", help="h", record="train", key="k")
    Metric(**good)
    for change, message in (
        ({"name": "x-y"}, "name must match"),
        ({"type": "summary"}, "type 'summary' is not one of counter, gauge, histogram"),
        ({"record": ("train", "trian")}, r"record kind\(s\) \['trian'\]"),
        ({"type": "histogram"}, "a histogram needs buckets"),
        ({"buckets": (1.0,)}, "other types take none"),
        ({"type": "counter", "key": None}, "only a gauge can go without a key"),
        ({"type": "counter", "labels": ("a",)}, "extra labels are supported on gauges only"),
    ):
        with pytest.raises(ValueError, match=r"^metric (gnp_x|x-y): ") as e:
            Metric(**{**good, **change})
        assert re.search(message, str(e.value)), (change, str(e.value))
    row = METRICS[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "gnp_other"  # type: ignore[misc]


def test_documented_table_is_the_rendered_table():
    text = (ROOT / METRICS_DOC).read_text()
    start, end = "<!-- metrics table: `python -m trainer.metrics` prints it -->\n", "<!-- end of metrics table -->"
    assert start in text and end in text, f"{METRICS_DOC} lost the markers around its metrics table"
    block = text.split(start, 1)[1].split(end, 1)[0]
    stale = f"{METRICS_DOC}'s metrics table is stale: paste `.venv/bin/python -m trainer.metrics`"
    assert block == markdown_table(), stale
    # read back independently: one row per exported family, with its type and labels
    rows = [line.split("|")[1:-1] for line in block.splitlines()[2:]]
    parsed = {
        r[0].strip().strip("`"): (r[1].strip(), tuple(x.strip().strip("`") for x in r[2].split(",") if x.strip()))
        for r in rows
    }
    assert parsed == EXPORTED
    cli = subprocess.run([sys.executable, "-m", "trainer.metrics"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and cli.stdout == block, cli.stderr


def test_values_follow_the_records(sink):
    start = {"world_size": 8, "device": "cuda:1", "model": "resnet18", "resumed_from_step": None}
    sink.log("start", {**start, "step": 0, "total_steps": 120})
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_step") == 0 and one(samples, "gnp_total_steps") == 120  # progress from the start
    record = json.loads(json.dumps(TRAIN_1))
    sink.log("train", record)
    assert record == TRAIN_1  # the sink derives its keys on a copy: the RunSink beside it gets the record as is
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
        "gnp_step": TRAIN_2["step"],
        "gnp_total_steps": 120,
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
    sink.log("start", {"resumed_from_step": 100, "gnp_steps": 90, "step": 100, "total_steps": 400})
    _, samples = parse_exposition(scrape(sink.port))
    assert one(samples, "gnp_step") == 100 and one(samples, "gnp_total_steps") == 400  # the resumed progress
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
