"""Where the loop's log records go: metrics.jsonl, a progress display, and Prometheus endpoints.

Null-object style: the loop calls `sink.log(kind, record)` / `sink.progress(...)` on every rank and never
writes `if rank == 0`; `build_sink` decides once what each process does with them:

  rank 0               RunSink (metrics.jsonl + progress), plus a PrometheusSink when metrics.prometheus
  every other rank     a PrometheusSink when metrics.prometheus, else a NullSink

Prometheus: one endpoint per training process ("port per rank"). Each torchrun child serves
prometheus-client's HTTP exporter on `port + LOCAL_RANK` from its own CollectorRegistry, so a pod with 8 GPUs
is 8 targets (container ports `metrics-0` ... `metrics-7`, see k8s/monitoring/podmonitor.yaml). Chosen over
the client's multiprocess mode because that needs PROMETHEUS_MULTIPROC_DIR prepared by the launch shell,
forbids custom collectors and needs per-gauge aggregation modes; per-rank step times and data waits are
exactly what shows a straggler. Every sample carries the labels `job_name`, `rank` (global) and
`local_rank`; never a step label (one series per step would explode the TSDB).

Values change only at log steps (`loop.log_every`): the loop syncs with the device only there, so counters
grow by the window's deltas and the step-time histogram observes each step of the window at once.

Exported metrics: the table `METRICS` below is the only list. PrometheusSink creates one family per row and
updates it from the records; the metrics table of k8s/monitoring/README.md is `python -m trainer.metrics` (a test
compares the two). A row names the record kind(s) and the key it is fed from; its type says how the value is used:

  gauge      set to the value when the key is present and not None (a row without key: set to 1)
  counter    increased by the value, a delta, when it is positive (a counter never goes down)
  histogram  observes every element of the value, a list

Record kinds: `start`, `train`, `eval`, `checkpoint` are the loop's and train.py's records; `process` is the
sink's own at its start (`start_time`, `restart` from $TORCHELASTIC_RESTART_COUNT); `gpu` is the GPU reader's
reading, taken at every train record. A few keys are derived by the sink from the record and what it saw
before (`PrometheusSink._derive`):

  train.window_steps        the record's, else the number of step times
  train.window_gnp_steps    the record's, else the delta of the cumulative `gnp_steps` since the last record
                            (the start record gives the baseline: its `gnp_steps` after a resume, else 0)
  train.gnp                 the record's, as 0/1
  checkpoint.duration_s     `duration_s`, else `blocking_s`
  checkpoint.failures_new   failures since the last record: the rise of the cumulative `failures_total`
                            (or `failures`), else 1 for a failed synchronous save
  checkpoint.last_success_unix    the record's when nonzero, else now for a synchronous save that succeeded
  checkpoint.upload_duration_s    `last_duration_s`, when the record reports a successful upload

Restarts are a gauge, not a counter: a counter lives in the process and restarts at 0 with it, whereas
torchrun hands each new worker generation the count in $TORCHELASTIC_RESTART_COUNT. Container or pod restarts
by Kubernetes (restartPolicy OnFailure/ExitCode) reset that count; they show as `gnp_process_start_time_seconds`
jumping (the dashboard plots process uptime) and in kube-state-metrics' restart counters.

Gauges appear at their first value (no misleading 0 top-1 before the first evaluation); counters and
histograms start at 0 when the endpoint starts, so rate() is defined from the first scrape. The GNP-only
gauges keep the value of the last GNP step during plain steps of a hybrid run.

Checkpoint records (`sink.log("checkpoint", {...})`, rank 0). A synchronous save reports `ok` (bool; absent =
success unless `error` is set), `duration_s` or `blocking_s` and `error`. The asynchronous Checkpointer's
`stats` (trainer/checkpoint.py) take precedence when present: `failures_total` (failed upload attempts so
far; `failures` also accepted), `last_success_unix` (0 = none yet) and `last_duration_s` (that upload's
duration). A `final: true` record without `ok` only reports stats. Stats are snapshots taken at the
record, so an upload failing between two saves shows at the next record.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# Step times range from ~10 ms (tiny CPU models) to seconds (ImageNet ResNets with GNP's two passes).
STEP_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
)
LABELS = ("job_name", "rank", "local_rank")
TYPES = ("counter", "gauge", "histogram")
RECORD_KINDS = ("process", "start", "train", "gpu", "eval", "checkpoint")

GpuReader = Callable[[], dict]  # -> {"memory_allocated_bytes": float, "utilization_ratio": float (optional)}


@dataclass(frozen=True)
class Metric:
    """One exported metric family: what Prometheus shows (name, type, help, labels) and what feeds it.

    `record`: the record kind, or kinds, that update it; `key`: the record key read (None: the value 1 on
    every such record, for info-style gauges); `labels`: labels beyond job_name/rank/local_rank, their
    values read from the record's keys of the same name; `buckets`: a histogram's upper bounds.
    """

    name: str
    type: str
    help: str
    record: str | tuple[str, ...]
    key: str | None
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"gnp_[a-z0-9_]+", self.name):
            problems.append("name must match gnp_[a-z0-9_]+")
        if self.type not in TYPES:
            problems.append(f"type {self.type!r} is not one of {', '.join(TYPES)}")
        if unknown := [k for k in self.kinds if k not in RECORD_KINDS]:
            problems.append(f"record kind(s) {unknown} not in {', '.join(RECORD_KINDS)}")
        if bool(self.buckets) != (self.type == "histogram"):
            problems.append("a histogram needs buckets, other types take none")
        if self.key is None and self.type != "gauge":
            problems.append("only a gauge can go without a key (value 1)")
        if self.labels and self.type != "gauge":
            problems.append("extra labels are supported on gauges only")
        if problems:
            raise ValueError(f"metric {self.name}: {'; '.join(problems)}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.record,) if isinstance(self.record, str) else tuple(self.record)

    @property
    def source(self) -> str:
        """Where the value comes from, for the docs: `kind.key`."""
        where = "/".join(self.kinds)
        return f"{where} (value 1)" if self.key is None else f"{where}.{self.key}"


# The exporter's definitions: PrometheusSink creates and updates exactly these, k8s/monitoring/README.md's table is
# rendered from them (`python -m trainer.metrics`), the tests iterate them. Names, types and labels are what dashboards
# and alerts query: renaming one breaks them.
METRICS: tuple[Metric, ...] = (
    Metric("gnp_steps_total", "counter", "Optimizer steps taken by this process", "train", "window_steps"),
    Metric("gnp_gnp_steps_total", "counter", "Two-pass GNP steps taken by this process", "train", "window_gnp_steps"),
    Metric("gnp_images_total", "counter", "Training images processed by this rank", "train", "window_images"),
    Metric(
        "gnp_scaler_skipped_steps_total",
        "counter",
        "Steps the fp16 GradScaler skipped (inf/NaN gradients); stays 0 without fp16",
        "train",
        "window_skipped_steps",
    ),
    Metric(
        "gnp_step_duration_seconds",
        "histogram",
        "Host wall time of each training step, data wait excluded",
        "train",
        "step_times_s",
        buckets=STEP_BUCKETS,
    ),
    Metric("gnp_data_wait_seconds_total", "counter", "Time spent waiting for the data loader", "train", "data_wait_s"),
    Metric("gnp_train_loss", "gauge", "Cross-entropy at theta on this rank's batch (last log step)", "train", "loss"),
    Metric(
        "gnp_train_loss_perturbed",
        "gauge",
        "Cross-entropy at theta + eps (last GNP step)",
        "train",
        "loss_perturbed",
    ),
    Metric("gnp_sharpness", "gauge", "Loss at theta + eps minus loss at theta (last GNP step)", "train", "sharpness"),
    Metric("gnp_grad_norm_g1", "gauge", "Norm of g1, the penalized gradient (last GNP step)", "train", "g1_norm"),
    Metric(
        "gnp_grad_norm_combined",
        "gauge",
        "Norm of the combined gradient used by the base optimizer",
        "train",
        "grad_norm",
    ),
    Metric("gnp_alpha", "gauge", "GNP alpha of the last step", "train", "alpha"),
    Metric("gnp_r", "gauge", "GNP r of the last step", "train", "r"),
    Metric("gnp_step_is_gnp", "gauge", "1 when the last step was a two-pass GNP step, 0 when plain", "train", "gnp"),
    Metric("gnp_learning_rate", "gauge", "Learning rate of the last step", "train", "lr"),
    Metric("gnp_epoch", "gauge", "Fractional epoch", "train", "epoch"),
    Metric(
        "gnp_step",
        "gauge",
        "Global optimizer step of the run: the resumed step at start, then the last log step's",
        ("start", "train"),
        "step",
    ),
    Metric(
        "gnp_total_steps",
        "gauge",
        "Optimizer steps of the whole run (epochs x steps per epoch, capped by loop.max_steps)",
        "start",
        "total_steps",
    ),
    Metric("gnp_eval_loss", "gauge", "Validation cross-entropy of the last evaluation", "eval", "eval_loss"),
    Metric(
        "gnp_eval_top1_accuracy", "gauge", "Validation top-1 accuracy of the last evaluation (ratio)", "eval", "top1"
    ),
    Metric(
        "gnp_eval_top5_accuracy", "gauge", "Validation top-5 accuracy of the last evaluation (ratio)", "eval", "top5"
    ),
    Metric(
        "gnp_checkpoint_duration_seconds",
        "gauge",
        "Blocking time of the last checkpoint save",
        "checkpoint",
        "duration_s",
    ),
    Metric(
        "gnp_checkpoint_upload_duration_seconds",
        "gauge",
        "Duration of the last successful checkpoint upload",
        "checkpoint",
        "upload_duration_s",
    ),
    Metric(
        "gnp_checkpoint_failures_total",
        "counter",
        "Failed checkpoint saves or upload attempts",
        "checkpoint",
        "failures_new",
    ),
    Metric(
        "gnp_checkpoint_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful checkpoint",
        "checkpoint",
        "last_success_unix",
    ),
    Metric(
        "gnp_restarts",
        "gauge",
        "torchrun worker-group restarts ($TORCHELASTIC_RESTART_COUNT)",
        ("process", "start"),
        "restart",
    ),
    Metric(
        "gnp_process_start_time_seconds", "gauge", "Unix time this training process started", "process", "start_time"
    ),
    Metric(
        "gnp_gpu_memory_allocated_bytes",
        "gauge",
        "torch.cuda.memory_allocated() at the last log step",
        "gpu",
        "memory_allocated_bytes",
    ),
    Metric(
        "gnp_gpu_utilization_ratio",
        "gauge",
        "GPU utilization from NVML at the last log step (ratio)",
        "gpu",
        "utilization_ratio",
    ),
    Metric("gnp_info", "gauge", "Run information (value 1)", "start", None, labels=("model", "device", "world_size")),
)


def markdown_table(metrics: tuple[Metric, ...] = METRICS) -> str:
    """The metrics as a Markdown table (k8s/monitoring/README.md's), one row per family in table order."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| Metric | Type | Extra labels | Fed from | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in metrics:
        labels = ", ".join(f"`{label}`" for label in m.labels)
        lines.append(f"| `{m.name}` | {m.type} | {labels} | `{m.source}` | {cell(m.help)} |")
    return "\n".join(lines) + "\n"


class NullSink:
    """Discards everything (non-primary ranks without Prometheus, or logging disabled)."""

    def log(self, kind: str, record: dict) -> None:
        pass

    def progress(self, done: int, total: int, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunSink:
    """Rank 0: appends every record to metrics.jsonl and shows progress (tqdm bar on a TTY, lines otherwise)."""

    # Per-step lists are for the Prometheus histogram; in the jsonl they would multiply its size by log_every.
    JSONL_DROP = ("step_times_s",)

    def __init__(self, jsonl_path: Path | None, progress: str = "auto", stream: IO[str] = sys.stderr) -> None:
        self.jsonl = open(jsonl_path, "a", buffering=1) if jsonl_path is not None else None
        self.stream = stream
        self.use_bar = progress == "bar" or (progress == "auto" and stream.isatty())
        self.bar = None
        self.bar_epoch = -1
        self.t0 = time.time()

    def log(self, kind: str, record: dict) -> None:
        rec = {
            "kind": kind,
            "time": round(time.time() - self.t0, 3),
            **{k: v for k, v in record.items() if k not in self.JSONL_DROP},
        }
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(rec) + "\n")
        line = _format(kind, record)
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
            if kind != "train":
                self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def progress(self, done: int, total: int, epoch: int) -> None:
        if not self.use_bar:
            return
        if self.bar is None or epoch != self.bar_epoch:
            from tqdm import tqdm

            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}", file=self.stream, leave=False)
            self.bar_epoch = epoch
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _format(kind: str, r: dict) -> str:
    if kind == "train":
        parts = [f"step {r['step']}", f"epoch {r['epoch']:.2f}", f"loss {r['loss']:.4f}"]
        if "sharpness" in r:
            parts.append(f"sharp {r['sharpness']:+.4f}")
        if "g1_norm" in r:
            parts.append(f"|g1| {r['g1_norm']:.3f}")
        parts += [f"lr {r['lr']:.4g}", f"{r['images_per_s']:.0f} img/s"]
        return "train " + " | ".join(parts)
    if kind == "eval":
        return (
            f"eval  epoch {r['epoch']} | loss {r['eval_loss']:.4f} | top1 {100 * r['top1']:.2f}% "
            f"| top5 {100 * r['top5']:.2f}% | {r['images']} images"
        )
    return f"{kind} " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())


def cuda_reader() -> GpuReader | None:
    """A reader of this process's current CUDA device, or None without CUDA.

    Both values are host-side queries (allocator statistics, NVML): no device sync. torch.cuda.utilization
    needs pynvml and NVML access; when it fails once it is not tried again (no error per log step).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    use_nvml = True

    def read() -> dict:
        nonlocal use_nvml
        device = torch.cuda.current_device()
        out = {"memory_allocated_bytes": float(torch.cuda.memory_allocated(device))}
        if use_nvml:
            try:
                out["utilization_ratio"] = float(torch.cuda.utilization(device)) / 100.0
            except Exception as e:  # ModuleNotFoundError (no pynvml), NVML permission or driver errors
                use_nvml = False
                print(
                    f"metrics: GPU utilization unavailable ({type(e).__name__}: {e}); exporting memory only",
                    file=sys.stderr,
                    flush=True,
                )
        return out

    return read


class PrometheusSink:
    """Serves this process's metrics on http://addr:port/metrics from a dedicated registry.

    One family per row of `metrics` (default METRICS), updated from the records by the table alone.
    `gpu_reader` (default: `cuda_reader()`, None on CPU) is called at log steps only. `close()` stops the
    HTTP server so tests and in-process restarts do not leak the port.
    """

    def __init__(
        self,
        *,
        port: int,
        addr: str,
        job: str,
        rank: int,
        local_rank: int,
        gpu_reader: GpuReader | None | str = "auto",
        metrics: tuple[Metric, ...] = METRICS,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(
                f"metrics.port: {port} (base port + LOCAL_RANK {local_rank}) is not a TCP port; expected 1..65535"
            )
        # The _created series double every counter for no use on dashboards; the switch is process-wide,
        # which is fine in a training process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.values = (job, str(rank), str(local_rank))
        self.gpu_reader = cuda_reader() if gpu_reader == "auto" else gpu_reader
        self._gnp_seen: int | None = None  # cumulative gnp_steps at the last record (None = unknown)
        self._ckpt_failures = 0  # cumulative checkpoint failures counted so far
        self.metrics = tuple(metrics)
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._by_kind: dict[str, list[Metric]] = {}
        for m in self.metrics:
            self._families[m.name] = self._make(m)
            for kind in m.kinds:
                self._by_kind.setdefault(kind, []).append(m)
            if m.type != "gauge":  # counters and histograms exist (at 0) from the start
                self._families[m.name].labels(*self.values)
        self.log("process", {"start_time": time.time(), "restart": _env_restarts()})
        try:
            self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise ValueError(
                f"metrics.port: cannot serve Prometheus metrics on {addr}:{port} ({e.strerror or e}); "
                f"expected a free base port (rank r of a node uses port + LOCAL_RANK)"
            ) from None
        self.port = self.server.server_address[1]

    def _make(self, m: Metric) -> Counter | Gauge | Histogram:
        labels = LABELS + m.labels
        if m.type == "counter":
            return Counter(m.name, m.help, labels, registry=self.registry)
        if m.type == "histogram":
            return Histogram(m.name, m.help, labels, buckets=m.buckets, registry=self.registry)
        return Gauge(m.name, m.help, labels, registry=self.registry)

    def log(self, kind: str, record: dict) -> None:
        """Update the metrics fed by this record kind (kinds no row names update nothing)."""
        view = self._derive(kind, record)  # also for kinds without rows: it keeps the baselines of later deltas
        for m in self._by_kind.get(kind, ()):
            value = 1 if m.key is None else view.get(m.key)
            if value is None:
                continue
            child = self._families[m.name].labels(*self.values, *(str(view.get(k, "")) for k in m.labels))
            if m.type == "gauge":
                child.set(float(value))
            elif m.type == "counter":
                if value:
                    child.inc(max(float(value), 0.0))
            else:
                for v in value:
                    child.observe(v)
        if kind == "train":
            self.update_gpu()

    def _derive(self, kind: str, r: dict) -> dict:
        """The record plus the keys computed from it and from earlier records (module docstring's list).

        The record itself is not modified: other sinks receive the same dict.
        """
        view = dict(r)
        if kind == "start":
            if "gnp_steps" in r:  # cumulative count restored from a checkpoint: the baseline for the deltas
                self._gnp_seen = int(r["gnp_steps"])
            elif r.get("resumed_from_step") is None:
                self._gnp_seen = 0
        elif kind == "train":
            times = r.get("step_times_s") or []
            view["step_times_s"] = times
            view["window_steps"] = r.get("window_steps", len(times))
            if "window_gnp_steps" not in r and "gnp_steps" in r:
                # The delta of the cumulative count; after a resume whose start record lacked the baseline, the
                # first window only sets it (undercounts at most one window).
                if self._gnp_seen is not None:
                    view["window_gnp_steps"] = r["gnp_steps"] - self._gnp_seen
                self._gnp_seen = int(r["gnp_steps"])
            if "gnp" in r:
                view["gnp"] = bool(r["gnp"])
        elif kind == "checkpoint":
            view["duration_s"] = r.get("duration_s", r.get("blocking_s"))
            new_failures = 0
            cumulative = r.get("failures_total", r.get("failures"))
            if cumulative is not None:  # the checkpointer's own count (asynchronous uploads): follow it
                new_failures = int(cumulative) - self._ckpt_failures
                self._ckpt_failures = max(self._ckpt_failures, int(cumulative))
            view.pop("last_success_unix", None)
            view.pop("upload_duration_s", None)
            if r.get("last_success_unix"):  # 0 = no upload has succeeded yet
                view["last_success_unix"] = r["last_success_unix"]
                view["upload_duration_s"] = r.get("last_duration_s")
            if "ok" in r:
                ok = bool(r["ok"])
            elif r.get("final"):
                ok = None  # a summary record, not a save
            else:
                ok = not r.get("error")
            if ok and "last_success_unix" not in r:  # a synchronous save: it succeeded now
                view["last_success_unix"] = time.time()
            if ok is False and cumulative is None:
                new_failures += 1
                self._ckpt_failures += 1
            view["failures_new"] = new_failures
        return view

    def update_gpu(self) -> None:
        """Read the GPU gauges now (called at every train record; a reader that fails is dropped)."""
        if self.gpu_reader is None:
            return
        try:
            values = self.gpu_reader()
        except Exception as e:  # observability must never stop training
            print(
                f"metrics: GPU reading failed ({type(e).__name__}: {e}); not reading it again",
                file=sys.stderr,
                flush=True,
            )
            self.gpu_reader = None
            return
        self.log("gpu", values)

    def progress(self, done: int, total: int, epoch: int) -> None:
        pass

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        server, self.server = getattr(self, "server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()
            self.thread.join(timeout=5)


class TeeSink:
    """Sends every call to several sinks (rank 0 with Prometheus: RunSink + PrometheusSink)."""

    def __init__(self, *sinks) -> None:
        self.sinks = sinks

    def log(self, kind: str, record: dict) -> None:
        for s in self.sinks:
            s.log(kind, record)

    def progress(self, done: int, total: int, epoch: int) -> None:
        for s in self.sinks:
            s.progress(done, total, epoch)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _env_restarts() -> int:
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def build_sink(
    *,
    rank: int,
    local_rank: int,
    run_dir: Path,
    jsonl: bool,
    progress: str,
    prometheus: bool,
    port: int,
    addr: str,
    job: str,
    progress_every_s: float = 0.0,
) -> NullSink | RunSink | PrometheusSink | TeeSink:
    """The sink for this process (called on every rank).

    Rank 0 writes metrics.jsonl and shows progress, and publishes its progress line every `progress_every_s`
    and the TrainJob's status when the Kubeflow Trainer asks for it (trainer/progress.py); with `prometheus`
    every rank also serves its metrics on `addr:port + local_rank`, labelled job_name=`job`, rank, local_rank.
    Other ranks without Prometheus discard their records.
    """
    prom = (
        PrometheusSink(port=port + local_rank, addr=addr, job=job, rank=rank, local_rank=local_rank)
        if prometheus
        else None
    )
    if rank == 0:
        run = RunSink(run_dir / "metrics.jsonl" if jsonl else None, progress)
        sinks = [run, _progress_sink(progress_every_s), prom]
        sinks = [s for s in sinks if s is not None]
        return TeeSink(*sinks) if len(sinks) > 1 else run
    return prom if prom is not None else NullSink()


def _progress_sink(every_s: float):
    """The progress line and, where the trainjobstatus plugin injected its variables, the TrainJob status."""
    from trainer.progress import ProgressSink, Publisher, StatusClient

    try:
        client = StatusClient.from_env()
    except ValueError as e:  # the platform's variables, not the user's settings: report, train on
        print(f"warning: TrainJob status updates off: {e}", file=sys.stderr, flush=True)
        client = None
    if client is None and every_s <= 0:
        return None
    return ProgressSink(every_s, Publisher(client) if client is not None else None)


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
