"""Where the loop's log records go: metrics.jsonl and a progress display, on rank 0 only.

Null-object style: non-primary ranks get a `NullSink`, so the loop never writes `if rank == 0`.
(The observability issue adds a Prometheus sink behind the same two methods.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO


class NullSink:
    """Discards everything (non-primary ranks, or logging disabled)."""

    def log(self, kind: str, record: dict) -> None:
        pass

    def progress(self, done: int, total: int, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunSink:
    """Rank 0: appends every record to metrics.jsonl and shows progress (tqdm bar on a TTY, lines otherwise)."""

    def __init__(self, jsonl_path: Path | None, progress: str = "auto", stream: IO[str] = sys.stderr) -> None:
        self.jsonl = open(jsonl_path, "a", buffering=1) if jsonl_path is not None else None
        self.stream = stream
        self.use_bar = progress == "bar" or (progress == "auto" and stream.isatty())
        self.bar = None
        self.bar_epoch = -1
        self.t0 = time.time()

    def log(self, kind: str, record: dict) -> None:
        rec = {"kind": kind, "time": round(time.time() - self.t0, 3), **record}
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
        return (f"eval  epoch {r['epoch']} | loss {r['eval_loss']:.4f} | top1 {100 * r['top1']:.2f}% "
                f"| top5 {100 * r['top5']:.2f}% | {r['images']} images")
    return f"{kind} " + " | ".join(f"{k} {v}" for k, v in r.items())
