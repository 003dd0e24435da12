"""Checkpoints: one folder per step, a manifest written last, verified on load.

Layout under the checkpoint location:
    step-000001234/state.pt        torch.save of a dict of tensors and plain values
    step-000001234/manifest.json   {"step", "files": {name: {"size", "sha256"}}} — written LAST, atomically
A checkpoint counts only when its manifest exists and every file matches its size and sha256, so a crash
mid-write (or a truncated/corrupted file) is never resumed from: `latest()` falls back to the previous
complete one with a warning. Every file is written to a temporary name and renamed, so readers never see
half a file. Older complete checkpoints beyond `keep` are deleted only after the new manifest exists.

Loading uses `torch.load(..., weights_only=True)`: a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d{9,})$")
STATE_FILE, MANIFEST = "state.pt", "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LocalCheckpointer:
    """Saves and finds checkpoints in a local folder (the S3 issue adds a remote store behind the same API)."""

    def __init__(self, root: str | os.PathLike, keep: int = 2) -> None:
        if keep < 2:
            raise ValueError(f"checkpoint.keep: invalid value {keep}; expected an integer >= 2")
        self.root, self.keep = Path(root), keep

    def save(self, step: int, state: dict) -> Path:
        """Write `state` as checkpoint `step`; returns its folder. Call on one rank only."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        folder = self.root / f"step-{step:09d}"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / STATE_FILE, data)
        manifest = {"step": step, "files": {STATE_FILE: {"size": len(data), "sha256": _sha256(data)}}}
        _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())  # the commit point
        self._prune()
        return folder

    def steps(self) -> list[int]:
        """Steps of every folder that has a manifest, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        out = [int(m.group(1)) for p in self.root.iterdir()
               if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
        return sorted(out, reverse=True)

    def load(self, step: int, map_location: str | torch.device = "cpu") -> dict:
        """Load checkpoint `step` after verifying sizes and checksums; ValueError if it does not verify."""
        folder = self.root / f"step-{step:09d}"
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            entry = manifest["files"][STATE_FILE]
            data = (folder / STATE_FILE).read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {folder}: unreadable ({e})") from None
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise ValueError(f"checkpoint {folder / STATE_FILE}: size/sha256 mismatch with its manifest "
                             f"(truncated or corrupted)")
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)

    def latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict] | None:
        """The newest checkpoint that verifies, skipping (with a warning) any that does not."""
        for step in self.steps():
            try:
                return step, self.load(step, map_location)
            except ValueError as e:
                print(f"warning: skipping {e}; trying an older checkpoint", file=sys.stderr, flush=True)
        return None

    def _prune(self) -> None:
        complete = self.steps()
        for step in complete[self.keep:]:
            shutil.rmtree(self.root / f"step-{step:09d}", ignore_errors=True)
        # Folders without a manifest older than the newest complete one are dead partial writes.
        if complete and self.root.is_dir():
            for p in self.root.iterdir():
                m = _STEP_DIR.match(p.name)
                if m and int(m.group(1)) < complete[0] and not (p / MANIFEST).is_file():
                    shutil.rmtree(p, ignore_errors=True)
