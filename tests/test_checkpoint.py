"""Local checkpoints: manifest written last, corrupt/truncated/partial checkpoints skipped, retention."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.checkpoint import LocalCheckpointer


def state(v: float) -> dict:
    return {"w": torch.full((4, 4), v), "step": int(v), "nested": {"lr": v / 10, "names": ["a", "b"]}}


def test_round_trip_and_latest(tmp_path):
    ck = LocalCheckpointer(tmp_path, keep=3)
    for s in (1, 2, 3):
        ck.save(s, state(s))
    step, sd = ck.latest()
    assert step == 3 and torch.equal(sd["w"], torch.full((4, 4), 3.0)) and sd["nested"]["names"] == ["a", "b"]


def test_keeps_last_k(tmp_path):
    ck = LocalCheckpointer(tmp_path, keep=2)
    for s in range(1, 6):
        ck.save(s, state(s))
    assert ck.steps() == [5, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "bad-manifest"])
def test_damaged_newest_falls_back_with_warning(tmp_path, capsys, damage):
    ck = LocalCheckpointer(tmp_path, keep=3)
    ck.save(1, state(1))
    folder = ck.save(2, state(2))
    blob = folder / "state.pt"
    if damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "no-manifest":  # a crash between the state file and the manifest
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    step, sd = ck.latest()
    assert step == 1 and sd["step"] == 1
    if damage != "no-manifest":
        assert "skipping" in capsys.readouterr().err


def test_loads_weights_only(tmp_path):
    """A pickle that would run code is refused (weights_only=True), even with a matching manifest."""
    import hashlib
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    folder = tmp_path / "step-000000001"
    folder.mkdir()
    torch.save({"x": Evil()}, folder / "state.pt")
    data = (folder / "state.pt").read_bytes()
    (folder / "manifest.json").write_text(json.dumps(
        {"step": 1, "files": {"state.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        LocalCheckpointer(tmp_path).load(1)


def test_keep_must_be_two_or_more(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep"):
        LocalCheckpointer(tmp_path, keep=1)
