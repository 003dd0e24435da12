"""Checkpoints that verify against their manifest but cannot be resumed from are skipped like damaged ones.

A manifest naming an object outside its step (`../../config.yaml`: the sha256 matches that file) and a state
that torch.load(weights_only=True) rejects (a pickled custom class, which must never execute) ended every
rerun with a traceback (exit 1). Now the rerun warns once, resumes from the newest loadable checkpoint,
writes the damaged step again and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_ownership import FINAL_STEP, assert_bitwise, starts, train_args
from trainer.checkpoint import MANIFEST, STATE_FILE, Checkpointer, CheckpointError, step_prefix


class Marker:
    """Unpickling this would create the file `path`: proof that a checkpoint executed code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def damage(run_dir: Path, how: str, marker: Path) -> None:
    """Make the final step unloadable while its manifest still matches every object's size and sha256."""
    ck = Checkpointer(run_dir / "checkpoints")
    pre = step_prefix(FINAL_STEP)
    manifest = json.loads(ck.storage.get(pre + MANIFEST))
    if how == "outside":
        data, obj = (run_dir / "config.yaml").read_bytes(), "../../config.yaml"
    else:
        buf = io.BytesIO()
        torch.save({"model": Marker(marker)}, buf)
        data, obj = buf.getvalue(), STATE_FILE
        ck.storage.put(pre + STATE_FILE, data)
    manifest["files"][STATE_FILE] = {"object": obj, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ck.storage.put(pre + MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(CheckpointError):
        ck.load(FINAL_STEP)
    ck.close()


@pytest.mark.parametrize("how", ["outside", "pickle"])
def test_unloadable_final_checkpoint_is_skipped_and_written_again(tmp_path, how):
    ref = tmp_path / "ref"
    assert run_cli(*train_args(ref)).returncode == 0
    reference = Checkpointer(ref / "checkpoints").latest()[1]

    run_dir, marker = tmp_path / "run", tmp_path / "executed"
    assert run_cli(*train_args(run_dir)).returncode == 0
    damage(run_dir, how, marker)
    res = run_cli(*train_args(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not marker.exists()
    skipped = [x for x in res.stderr.splitlines() if x.startswith("warning: skipping")]
    why = "is not a plain name inside the step" if how == "outside" else "does not load with weights_only=True"
    assert len(skipped) == 1 and why in skipped[0], res.stderr[-3000:]
    assert re.search(rf"step-0*{FINAL_STEP}/", skipped[0])
    assert f"writing checkpoint step {FINAL_STEP} again" in res.stderr  # the final-checkpoint rule
    assert [s["resumed_from_step"] for s in starts(run_dir)] == [None, FINAL_STEP - 2]
    assert (run_dir / "config.yaml").is_file()  # the object outside the step was never deleted
    ck = Checkpointer(run_dir / "checkpoints")
    ck.verify(FINAL_STEP)
    step, sd = ck.latest()
    assert step == FINAL_STEP
    assert_bitwise(sd, reference)
