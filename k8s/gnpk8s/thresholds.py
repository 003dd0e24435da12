"""The alert thresholds a job spec may set (`alerts:`), their defaults and their checks.

A leaf module (errors only): spec.py reads `alerts:` with it and alerts.py renders the rules from it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import UserError

# key: (default, kind, meaning). Durations are Prometheus durations (30s, 10m, 1h); None = alert off.
ALERT_DEFAULTS: dict[str, tuple[Any, str, str]] = {
    "scrape_interval": ("15s", "duration", "the PodMonitor's interval; 4x it is the window that detects a step"),
    "pending": ("2m", "duration", "`for:` of the stall, loss, scaler, explosion and checkpoint-age alerts"),
    "stall_factor": (5, "number", "stalled: no step for stall_factor x the job's usual gap between steps"),
    "stall_floor": ("10m", "duration", "stalled: but never less than this (evaluation, checkpoints, startup)"),
    "scaler_skip_fraction": (0.5, "ratio", "GradScaler: share of the steps in scaler_window it skipped"),
    "scaler_window": ("30m", "duration", "GradScaler: over this window"),
    "explode_factor_g1": (10, "number", "exploding: ||g1|| above this x its median over explode_window"),
    "explode_factor_loss": (4, "number", "exploding: the loss above this x its median over explode_window"),
    "explode_window": ("1h", "duration", "exploding: the history the median is taken over"),
    "max_restarts": (3, "count", "restarts: more than this many new training processes of rank 0"),
    "restarts_window": ("1h", "duration", "restarts: within this window"),
    "checkpoint_failing_for": ("1h", "duration", "checkpoints: failures and no success for this long"),
    "checkpoint_stale_factor": (3, "number", "checkpoints: last success older than this x the usual interval"),
    "data_wait_fraction": (0.3, "ratio", "input-bound: share of wall time waiting for the data loader"),
    "data_wait_for": ("15m", "duration", "input-bound: averaged over this window"),
    "gpu_idle_percent": (10, "percent", "GPUs idle: DCGM utilization of the pod's GPUs below this"),
    "gpu_idle_for": ("15m", "duration", "GPUs idle: for this long"),
    "accuracy_drop": (None, "ratio", "accuracy: top-1 below its best by more than this (off by default)"),
    "accuracy_window": ("3d", "duration", "accuracy: the best is taken over this window"),
}
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
_DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ALLOWED = {
    "number": "a number > 0",
    "ratio": "a number between 0 and 1 (exclusive)",
    "percent": "a number in (0, 100]",
    "count": "an integer >= 0",
}


def alert_thresholds(reader: Any | None) -> dict[str, Any]:
    """ALERT_DEFAULTS overridden by the spec's `alerts:` mapping (a spec.Reader; one-line UserError on a bad key
    or value)."""
    out = {k: v[0] for k, v in ALERT_DEFAULTS.items()}
    if reader is None:
        return out
    reader.check_unknown(ALERT_DEFAULTS)
    for key, (_, kind, _) in ALERT_DEFAULTS.items():
        if key not in reader.data:
            continue
        value, full = reader.data[key], f"{reader.where}: {reader.prefix}{key}"
        if value is None and key == "accuracy_drop":
            out[key] = None
        elif kind == "duration":
            if not isinstance(value, str) or not _DURATION.fullmatch(value) or seconds(value) <= 0:
                raise UserError(f"{full}: expected a Prometheus duration such as 30s, 10m or 1h, got {value!r}")
            out[key] = value
        else:
            if not _valid(kind, value):
                raise UserError(f"{full}: expected {_ALLOWED[kind]}, got {value!r}")
            out[key] = value
    return out


def _valid(kind: str, value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return {
        "number": number and value > 0,
        "ratio": number and 0 < value < 1,
        "percent": number and 0 < value <= 100,
        "count": number and isinstance(value, int) and value >= 0,
    }[kind]


def seconds(duration: str) -> float:
    """A Prometheus duration in seconds."""
    m = _DURATION.fullmatch(duration)
    return int(m.group(1)) * _DURATION_S[m.group(2)]


def promdur(secs: float) -> str:
    """Seconds as a Prometheus duration (whole seconds, else milliseconds)."""
    return f"{int(secs * 1000)}ms" if secs < 1 or secs != int(secs) else f"{int(secs)}s"
