"""How far a run is and when it will end: a periodic progress line, and the TrainJob's own status.

Rank 0's `ProgressSink` (one more sink beside metrics.jsonl and Prometheus, see trainer/metrics.py) turns the
loop's records into one snapshot — steps done of the total, percent, estimated time left, the latest loss,
top-1, ||g1||, sharpness, learning rate, epoch and images/s — and publishes it two ways:

  log line     `progress step=120 total=1000 percent=12 epoch=1.20 eta_s=340 loss=0.5300 top1=0.8100 ...`,
               every `metrics.progress_every_s` seconds and after every evaluation, on both job kinds: plain
               key=value words that `make status` reads from rank 0's log (no extra rights needed).
  TrainJob     when the Kubeflow Trainer (v2.2+, the `TrainJobStatus` feature gate) injects its status-server
               variables, the same snapshot is POSTed to the server, which writes it into
               `TrainJob.status.trainerStatus` (read it with `kubectl get trainjob NAME -o
               jsonpath='{.status.trainerStatus}'`).

The status server's contract (kubeflow/trainer v2.3.0, pkg/statusserver and the TrainJob CRD's
`status.trainerStatus`): `POST $KUBEFLOW_TRAINER_SERVER_URL` with `Authorization: Bearer <token>` read from the
file `$KUBEFLOW_TRAINER_SERVER_TOKEN` (a projected service-account token that the kubelet rotates, so it is read
again for every request), TLS verified against `$KUBEFLOW_TRAINER_SERVER_CA_CERT`, a JSON body of at most 64 KiB:
`{"trainerStatus": {"progressPercentage": 0..100, "estimatedRemainingSeconds": >= 0, "metrics": [{"name": 1-64
chars, "value": 1-64 chars}] (<= 256), "lastUpdatedTime": RFC 3339 (required)}}`. Each update replaces the
previous one. Upstream asks for at most one update per ~5 s and for reporting never to interrupt training.

Why a small client and not the Kubeflow SDK's `update_trainjob_status()`: that SDK pins kubernetes<36 (this
project pins 37), and it POSTs synchronously from the caller's thread. Here the training thread only stores
the newest snapshot (microseconds, no I/O); one daemon thread POSTs it with timeouts, at most every
MIN_INTERVAL_S, and swallows every failure (one warning line per kind of failure), so a server that is down,
refuses (403/422/500) or hangs changes neither the run's numbers nor its pace. At the end, a final update (100 %
and 0 s left when the run finished) is sent with a short bound on the wait.

The time left is measured, not modelled: wall-clock seconds per step since the first logged step of this
process, which counts evaluation and checkpoint time once they have happened (they run between steps).
"""

from __future__ import annotations

import datetime
import http.client
import json
import math
import os
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import IO

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"

MIN_INTERVAL_S = 5.0  # upstream's guidance: at most one update per ~5 s
REQUEST_TIMEOUT_S = 5.0  # per socket operation of one POST (connect, send, each read)
FINAL_WAIT_S = 2.0  # how long the end of a run waits for its final update before giving up on it
MAX_BODY = 64 * 1024
MAX_METRICS = 256
MAX_TEXT = 64

# Snapshot keys published as metrics (name in the TrainJob status <- key of the snapshot), in this order.
METRIC_KEYS = (
    ("loss", "loss"),
    ("top1", "top1"),
    ("g1_norm", "g1_norm"),
    ("sharpness", "sharpness"),
    ("lr", "lr"),
    ("epoch", "epoch"),
    ("images_per_s", "images_per_s"),
    ("step", "step"),
    ("total_steps", "total_steps"),
)

TRAIN_KEYS = ("loss", "g1_norm", "sharpness", "lr", "images_per_s", "epoch")  # taken from the `train` records


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """Steps done of the total and the time left, from the loop's `start` and `train` records."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.total = 0
        self.step = 0
        self.finished = False
        self._origin: tuple[float, int] | None = None  # (time, step) of this process's first logged step

    def start(self, step: int, total: int) -> None:
        self.step, self.total = step, max(int(total), 0)

    def observe(self, step: int) -> None:
        if self._origin is None:
            self._origin = (self.clock(), step)
        self.step = step

    def finish(self) -> None:
        self.finished = True
        self.step = max(self.step, self.total)

    def percent(self) -> int | None:
        if self.finished:
            return 100
        if self.total <= 0:
            return None
        return min(100, int(100 * self.step / self.total))

    def eta_s(self) -> int | None:
        if self.finished:
            return 0
        if self._origin is None or self.total <= 0:
            return None
        t0, s0 = self._origin
        done = self.step - s0
        if done <= 0:
            return None
        per_step = (self.clock() - t0) / done
        return max(0, int(round(per_step * max(self.total - self.step, 0))))


def _text(value) -> str:
    """A metric value as the CRD wants it: a string of 1-64 characters."""
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else format(value, ".6g")
    else:
        text = str(value)
    return text[:MAX_TEXT] or "-"


def format_eta(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Snapshot(dict):
    """The newest values: step, total_steps, percent, eta_s and the METRIC_KEYS that have been seen."""

    def line(self) -> str:
        """The log line (`progress` then key=value words; absent values left out)."""
        known = {k: v for k, v in self.items() if v is not None}
        words = [f"{k}={_text(known[k])}" for k in ("step", "total_steps", "percent", "epoch", "eta_s") if k in known]
        if "eta_s" in known:
            words.append(f"eta={format_eta(known['eta_s'])}")
        words += [f"{k}={_text(known[k])}" for k in ("loss", "top1", "lr", "images_per_s") if k in known]
        return "progress " + " ".join(words)

    def trainer_status(self, now: datetime.datetime | None = None) -> dict:
        """The `trainerStatus` object of the TrainJob (CRD-valid: see the module docstring)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        status: dict = {"lastUpdatedTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if self.get("percent") is not None:
            status["progressPercentage"] = int(self["percent"])
        if self.get("eta_s") is not None:
            status["estimatedRemainingSeconds"] = min(int(self["eta_s"]), 2**31 - 1)  # int32 in the CRD
        metrics = [{"name": name, "value": _text(self[key])} for name, key in METRIC_KEYS if self.get(key) is not None]
        if metrics:
            status["metrics"] = metrics[:MAX_METRICS]
        return status


def parse_line(line: str) -> dict[str, str] | None:
    """The key=value words of a progress line (None if `line` is not one): what `make status` shows."""
    text = line.strip()
    at = text.find("progress ")
    if at < 0:
        return None
    words = [w.split("=", 1) for w in text[at + len("progress ") :].split()]
    out = {w[0]: w[1] for w in words if len(w) == 2}
    return out or None


class StatusClient:
    """POSTs a TrainJob's trainerStatus to the Trainer's status server (one request per call, with timeouts)."""

    def __init__(self, url: str, ca_file: str, token_file: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{ENV_URL}: {url!r} is not an https:// URL")
        self.url, self.host, self.port = url, parts.hostname, parts.port or 443
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.ca_file, self.token_file, self.timeout = ca_file, token_file, timeout

    @classmethod
    def from_env(cls, environ=os.environ) -> StatusClient | None:
        """The client the trainjobstatus plugin asked for (all three variables set), else None."""
        url, ca, token = (environ.get(k, "") for k in (ENV_URL, ENV_CA, ENV_TOKEN))
        if not (url and ca and token):
            return None
        return cls(url, ca, token)

    def post(self, trainer_status: dict) -> int:
        """Send one update; returns the HTTP status. Raises OSError/ssl.SSLError/ValueError on failure to talk."""
        body = json.dumps({"trainerStatus": trainer_status}, separators=(",", ":")).encode()
        if len(body) > MAX_BODY:
            raise ValueError(f"status update of {len(body)} bytes exceeds the server's {MAX_BODY}")
        with open(self.token_file) as f:  # read every time: the kubelet rotates the projected token
            token = f.read().strip()
        context = ssl.create_default_context(cafile=self.ca_file)
        conn = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                self.path,
                body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            response.read(MAX_BODY)
            return response.status
        finally:
            conn.close()


class Publisher:
    """Posts the newest trainerStatus from a daemon thread, at most every `interval` s; never raises, never blocks
    the caller (it only swaps in the newest snapshot)."""

    def __init__(self, client: StatusClient, interval: float = MIN_INTERVAL_S, log=_stderr) -> None:
        self.client, self.interval, self.log = client, interval, log
        self._cv = threading.Condition()
        self._pending: dict | None = None
        self._closing = False
        self._warned: set[str] = set()
        self.sent = 0  # successful updates (for tests and the final log line)
        self._thread = threading.Thread(target=self._run, name="trainjob-status", daemon=True)
        self._thread.start()

    def submit(self, trainer_status: dict) -> None:
        with self._cv:
            self._pending = trainer_status
            self._cv.notify()

    def close(self, final: dict | None, wait: float = FINAL_WAIT_S) -> None:
        """Send `final` as the last update (without the rate limit) and wait at most `wait` s for it."""
        with self._cv:
            if final is not None:
                self._pending = final
            self._closing = True
            self._cv.notify()
        self._thread.join(wait)

    def _run(self) -> None:
        last = -math.inf
        while True:
            with self._cv:
                while self._pending is None and not self._closing:
                    self._cv.wait()
                if self._pending is None:  # closing and nothing left to send
                    return
                if not self._closing:  # the rate limit (the final update is sent at once)
                    self._cv.wait_for(lambda: self._closing, timeout=max(0.0, last + self.interval - time.monotonic()))
                update, self._pending, closing = self._pending, None, self._closing
            last = time.monotonic()
            self._send(update)
            if closing:
                return

    def _send(self, update: dict) -> None:
        try:
            status = self.client.post(update)
        except Exception as e:  # noqa: BLE001 — reporting must never stop training; say it once per kind
            self._warn(type(e).__name__, f"{type(e).__name__}: {e}")
            return
        if status == 200:
            self.sent += 1
        else:
            self._warn(str(status), f"HTTP {status}")

    def _warn(self, kind: str, what: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.log(f"warning: TrainJob status update to {self.client.url} failed ({what}); training goes on")


class ProgressSink:
    """Rank 0's progress publisher: the periodic log line, and the TrainJob status when a client is given."""

    def __init__(
        self,
        every_s: float,
        publisher: Publisher | None = None,
        stream: IO[str] = sys.stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s, self.publisher, self.stream, self.clock = every_s, publisher, stream, clock
        self.state = Progress(clock)
        self.snapshot = Snapshot()
        self._last_line = -math.inf

    def log(self, kind: str, record: dict) -> None:
        if kind == "start":
            self.state.start(record.get("step", 0), record.get("total_steps", 0))
        elif kind == "train":
            self.state.observe(record["step"])
            self.snapshot.update({k: record[k] for k in TRAIN_KEYS if record.get(k) is not None})
        elif kind == "eval":
            self.snapshot["top1"] = record.get("top1")
        elif kind == "done":
            self.state.finish()
        else:
            return
        self._refresh()
        if self.publisher is not None:
            self.publisher.submit(self.snapshot.trainer_status())
        now = self.clock()
        if self.every_s > 0 and (kind in ("eval", "done") or now - self._last_line >= self.every_s):
            self._last_line = now
            print(self.snapshot.line(), file=self.stream, flush=True)

    def _refresh(self) -> None:
        s = self.state
        self.snapshot.update(step=s.step, total_steps=s.total, percent=s.percent(), eta_s=s.eta_s())

    def progress(self, done: int, total: int, epoch: int) -> None:
        pass

    def close(self) -> None:
        if self.publisher is not None:
            self._refresh()
            self.publisher.close(self.snapshot.trainer_status())
            self.publisher = None
