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

Exported metrics (name, type, meaning; the tests compare what the endpoint exports with this table):

  gnp_steps_total                                 counter    optimizer steps taken by this process
  gnp_gnp_steps_total                             counter    of those, two-pass GNP steps (hybrid runs mix both)
  gnp_images_total                                counter    training images this rank processed
  gnp_step_duration_seconds                       histogram  host wall time of each step (after its batch arrived)
  gnp_data_wait_seconds_total                     counter    time spent waiting for the data loader
  gnp_train_loss                                  gauge      cross-entropy at theta, this rank's batch, last log step
  gnp_train_loss_perturbed                        gauge      cross-entropy at theta + eps (last GNP step)
  gnp_sharpness                                   gauge      loss_perturbed - loss (last GNP step)
  gnp_grad_norm_g1                                gauge      ||g1||, the penalized gradient norm (last GNP step)
  gnp_grad_norm_combined                          gauge      norm of the combined gradient the base optimizer used
  gnp_alpha                                       gauge      alpha (penalty mixing weight) of the last step
  gnp_r                                           gauge      r (finite-difference radius) of the last step
  gnp_step_is_gnp                                 gauge      1 when the last step was a GNP step, 0 when plain
  gnp_learning_rate                               gauge      learning rate of the last step
  gnp_epoch                                       gauge      fractional epoch (2.5 = half way through the 3rd)
  gnp_eval_loss                                   gauge      validation cross-entropy, last evaluation
  gnp_eval_top1_accuracy                          gauge      validation top-1 accuracy, ratio 0-1
  gnp_eval_top5_accuracy                          gauge      validation top-5 accuracy, ratio 0-1
  gnp_checkpoint_duration_seconds                 gauge      blocking time of the last checkpoint save
  gnp_checkpoint_upload_duration_seconds          gauge      duration of the last successful upload (async)
  gnp_checkpoint_failures_total                   counter    failed checkpoint saves/upload attempts
  gnp_checkpoint_last_success_timestamp_seconds   gauge      unix time of the last successful checkpoint
  gnp_restarts                                    gauge      torchrun worker-group restarts so far
  gnp_process_start_time_seconds                  gauge      unix time this training process started
  gnp_gpu_memory_allocated_bytes                  gauge      torch.cuda.memory_allocated() at the last log step (CUDA)
  gnp_gpu_utilization_ratio                       gauge      torch.cuda.utilization() / 100 (CUDA with NVML)
  gnp_info                                        gauge      1, with labels model, device, world_size

Restarts are a gauge, not a counter: a counter lives in the process and restarts at 0 with it, whereas
torchrun hands each new worker generation the count in $TORCHELASTIC_RESTART_COUNT. Container or pod restarts
by Kubernetes (restartPolicy OnFailure/ExitCode) reset that count; they show as `gnp_process_start_time_seconds`
jumping (the dashboard plots process uptime) and in kube-state-metrics' restart counters.

Gauges appear at their first value (no misleading 0 top-1 before the first evaluation); counters and the
histogram start at 0 when the endpoint starts, so rate() is defined from the first scrape. The GNP-only gauges
keep the value of the last GNP step during plain steps of a hybrid run.

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
import sys
import time
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

GpuReader = Callable[[], dict]  # -> {"memory_allocated_bytes": float, "utilization_ratio": float (optional)}

# (name, type, help): the exporter's definitions; the docstring's table documents them for readers and the
# tests check the two against each other.
_METRICS: tuple[tuple[str, str, str], ...] = (
    ("gnp_steps_total", "counter", "Optimizer steps taken by this process"),
    ("gnp_gnp_steps_total", "counter", "Two-pass GNP steps taken by this process"),
    ("gnp_images_total", "counter", "Training images processed by this rank"),
    ("gnp_step_duration_seconds", "histogram", "Host wall time of each training step, data wait excluded"),
    ("gnp_data_wait_seconds_total", "counter", "Time spent waiting for the data loader"),
    ("gnp_train_loss", "gauge", "Cross-entropy at theta on this rank's batch (last log step)"),
    ("gnp_train_loss_perturbed", "gauge", "Cross-entropy at theta + eps (last GNP step)"),
    ("gnp_sharpness", "gauge", "Loss at theta + eps minus loss at theta (last GNP step)"),
    ("gnp_grad_norm_g1", "gauge", "Norm of g1, the penalized gradient (last GNP step)"),
    ("gnp_grad_norm_combined", "gauge", "Norm of the combined gradient used by the base optimizer"),
    ("gnp_alpha", "gauge", "GNP alpha of the last step"),
    ("gnp_r", "gauge", "GNP r of the last step"),
    ("gnp_step_is_gnp", "gauge", "1 when the last step was a two-pass GNP step, 0 when plain"),
    ("gnp_learning_rate", "gauge", "Learning rate of the last step"),
    ("gnp_epoch", "gauge", "Fractional epoch"),
    ("gnp_eval_loss", "gauge", "Validation cross-entropy of the last evaluation"),
    ("gnp_eval_top1_accuracy", "gauge", "Validation top-1 accuracy of the last evaluation (ratio)"),
    ("gnp_eval_top5_accuracy", "gauge", "Validation top-5 accuracy of the last evaluation (ratio)"),
    ("gnp_checkpoint_duration_seconds", "gauge", "Blocking time of the last checkpoint save"),
    ("gnp_checkpoint_upload_duration_seconds", "gauge", "Duration of the last successful checkpoint upload"),
    ("gnp_checkpoint_failures_total", "counter", "Failed checkpoint saves or upload attempts"),
    ("gnp_checkpoint_last_success_timestamp_seconds", "gauge", "Unix time of the last successful checkpoint"),
    ("gnp_restarts", "gauge", "torchrun worker-group restarts ($TORCHELASTIC_RESTART_COUNT)"),
    ("gnp_process_start_time_seconds", "gauge", "Unix time this training process started"),
    ("gnp_gpu_memory_allocated_bytes", "gauge", "torch.cuda.memory_allocated() at the last log step"),
    ("gnp_gpu_utilization_ratio", "gauge", "GPU utilization from NVML at the last log step (ratio)"),
)


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

    `gpu_reader` (default: `cuda_reader()`, None on CPU) is called at log steps only. `close()` stops the
    HTTP server so tests and in-process restarts do not leak the port.
    """

    def __init__(
        self, *, port: int, addr: str, job: str, rank: int, local_rank: int, gpu_reader: GpuReader | None | str = "auto"
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
        self._ckpt_failures = 0
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        for name, kind, doc in _METRICS:
            self._families[name] = self._make(name, kind, doc)
        self._info = Gauge(
            "gnp_info", "Run information (value 1)", LABELS + ("model", "device", "world_size"), registry=self.registry
        )
        for name, kind, _ in _METRICS:  # counters and the histogram exist (at 0) from the start
            if kind != "gauge":
                self._child(name)
        self._set("gnp_process_start_time_seconds", time.time())
        self._set("gnp_restarts", _env_restarts())
        try:
            self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise ValueError(
                f"metrics.port: cannot serve Prometheus metrics on {addr}:{port} ({e.strerror or e}); "
                f"expected a free base port (rank r of a node uses port + LOCAL_RANK)"
            ) from None
        self.port = self.server.server_address[1]

    def _make(self, name: str, kind: str, doc: str) -> Counter | Gauge | Histogram:
        if kind == "counter":
            return Counter(name, doc, LABELS, registry=self.registry)
        if kind == "histogram":
            return Histogram(name, doc, LABELS, buckets=STEP_BUCKETS, registry=self.registry)
        return Gauge(name, doc, LABELS, registry=self.registry)

    def _child(self, name: str):
        return self._families[name].labels(*self.values)

    def _set(self, name: str, value) -> None:
        if value is not None:
            self._child(name).set(float(value))

    def _inc(self, name: str, amount) -> None:
        if amount:
            self._child(name).inc(max(float(amount), 0.0))

    def log(self, kind: str, record: dict) -> None:
        """Update the metrics from one loop record (unknown kinds are ignored)."""
        handler = {
            "start": self._on_start,
            "train": self._on_train,
            "eval": self._on_eval,
            "checkpoint": self._on_checkpoint,
        }.get(kind)
        if handler is not None:
            handler(record)

    def _on_start(self, r: dict) -> None:
        self._info.labels(
            *self.values, str(r.get("model", "")), str(r.get("device", "")), str(r.get("world_size", ""))
        ).set(1)
        if "restart" in r:
            self._set("gnp_restarts", r["restart"])
        if "gnp_steps" in r:  # cumulative count restored from a checkpoint: the baseline for the deltas
            self._gnp_seen = int(r["gnp_steps"])
        elif r.get("resumed_from_step") is None:
            self._gnp_seen = 0

    def _on_train(self, r: dict) -> None:
        times = r.get("step_times_s") or []
        self._inc("gnp_steps_total", r.get("window_steps", len(times)))
        self._inc("gnp_images_total", r.get("window_images", 0))
        self._inc("gnp_data_wait_seconds_total", r.get("data_wait_s", 0.0))
        hist = self._child("gnp_step_duration_seconds")
        for t in times:
            hist.observe(t)
        if "window_gnp_steps" in r:
            self._inc("gnp_gnp_steps_total", r["window_gnp_steps"])
        elif "gnp_steps" in r:
            # The delta of the cumulative count; after a resume whose start record lacked the baseline, the
            # first window only sets it (undercounts at most one window).
            if self._gnp_seen is not None:
                self._inc("gnp_gnp_steps_total", r["gnp_steps"] - self._gnp_seen)
            self._gnp_seen = int(r["gnp_steps"])
        for key, name in (
            ("loss", "gnp_train_loss"),
            ("loss_perturbed", "gnp_train_loss_perturbed"),
            ("sharpness", "gnp_sharpness"),
            ("g1_norm", "gnp_grad_norm_g1"),
            ("grad_norm", "gnp_grad_norm_combined"),
            ("alpha", "gnp_alpha"),
            ("r", "gnp_r"),
            ("lr", "gnp_learning_rate"),
            ("epoch", "gnp_epoch"),
        ):
            self._set(name, r.get(key))
        if "gnp" in r:
            self._set("gnp_step_is_gnp", bool(r["gnp"]))
        self.update_gpu()

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
        self._set("gnp_gpu_memory_allocated_bytes", values.get("memory_allocated_bytes"))
        self._set("gnp_gpu_utilization_ratio", values.get("utilization_ratio"))

    def _on_eval(self, r: dict) -> None:
        self._set("gnp_eval_loss", r.get("eval_loss"))
        self._set("gnp_eval_top1_accuracy", r.get("top1"))
        self._set("gnp_eval_top5_accuracy", r.get("top5"))

    def _on_checkpoint(self, r: dict) -> None:
        self._set("gnp_checkpoint_duration_seconds", r.get("duration_s", r.get("blocking_s")))
        cumulative = r.get("failures_total", r.get("failures"))
        if cumulative is not None:  # the checkpointer's own count (asynchronous uploads): follow it
            self._inc("gnp_checkpoint_failures_total", int(cumulative) - self._ckpt_failures)
            self._ckpt_failures = max(self._ckpt_failures, int(cumulative))
        if r.get("last_success_unix"):  # 0 = no upload has succeeded yet
            self._set("gnp_checkpoint_last_success_timestamp_seconds", r["last_success_unix"])
            self._set("gnp_checkpoint_upload_duration_seconds", r.get("last_duration_s"))
        if "ok" in r:
            ok = bool(r["ok"])
        elif r.get("final"):
            return  # a summary record, not a save
        else:
            ok = not r.get("error")
        if ok and "last_success_unix" not in r:  # a synchronous save: it succeeded now
            self._set("gnp_checkpoint_last_success_timestamp_seconds", time.time())
        if not ok and cumulative is None:
            self._inc("gnp_checkpoint_failures_total", 1)
            self._ckpt_failures += 1

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
) -> NullSink | RunSink | PrometheusSink | TeeSink:
    """The sink for this process (called on every rank).

    Rank 0 writes metrics.jsonl and shows progress; with `prometheus` every rank also serves its metrics
    on `addr:port + local_rank`, labelled job_name=`job`, rank, local_rank. Other ranks without Prometheus
    discard their records.
    """
    prom = (
        PrometheusSink(port=port + local_rank, addr=addr, job=job, rank=rank, local_rank=local_rank)
        if prometheus
        else None
    )
    if rank == 0:
        run = RunSink(run_dir / "metrics.jsonl" if jsonl else None, progress)
        return TeeSink(run, prom) if prom is not None else run
    return prom if prom is not None else NullSink()
