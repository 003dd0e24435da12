"""Fault drills on damaged checkpoints and full disks, with the real CLI.

Corrupted checkpoints, in a local folder and on a real S3 server (SeaweedFS): a finished run's newest
checkpoint is damaged, then every one of them; each time the same command is run again and must exit 0 with
the final step as the newest checkpoint that verifies, holding weights and optimizer state BITWISE equal to an
uninterrupted run. (Before, a damaged step was never written again: the rerun retrained from the previous
checkpoint, logged "already exists; not overwritten", exited 0 and left the final step unloadable.)

A local checkpoint folder on a full disk (a real 1 MiB tmpfs in a private mount namespace) ends the run at
once with one line naming the folder and ENOSPC, exit 2, and no temp file left; before, it was retried as a
storage outage for 600 s and ended with the retryable 200.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FMNIST, ROOT, cli_env, run_cli
from trainer.checkpoint import STATE_FILE, Checkpointer, step_prefix

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FMNIST.is_dir(), reason="needs dataset-fashion-mnist"),
]

FINAL_STEP = 2 * (256 // 32)  # 2 epochs of 256 images in batches of 32


def train_args(run_dir: Path, *extra: str) -> list[str]:
    """A deterministic one-process CPU run with hybrid GNP draws and a checkpoint every 4 steps (mid-epoch
    too), so resuming from any of them must restore the model, the optimizer, the loop and the RNG."""
    sets = [
        "data.loader=memory",
        f"data.path=fashion-mnist:{FMNIST}",
        "data.limit=256",
        "data.augment=none",
        "loop.epochs=2",
        "loop.batch_size=32",
        "loop.deterministic=true",
        "loop.log_every=4",
        "gnp.hybrid_p=0.7",
        "checkpoint.every_steps=4",
        "checkpoint.every_epochs=1",
        "checkpoint.keep=3",
        f"run.dir={run_dir}",
        *extra,
    ]
    return ["train", "--recipe", "debug-cpu", *[a for s in sets for a in ("--set", s)]]


def tensors(sd: dict) -> dict:
    out = {f"model.{k}": v for k, v in sd["model"].items()}
    for pid, st in sd["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli(*train_args(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    step, sd = Checkpointer(run_dir / "checkpoints").latest()
    assert step == FINAL_STEP
    return sd


def corrupt(ck: Checkpointer, step: int, how: str) -> None:
    """Damage checkpoint `step` in its storage (local folder or bucket) the way a bad disk or a half-copied
    restore would: truncate or flip a byte of its state object (the manifest stays and claims it complete)."""
    manifest_entry = ck._manifest(step)["files"][STATE_FILE]
    key = step_prefix(step) + manifest_entry["object"]
    data = bytearray(ck.storage.get(key))
    if how == "truncate":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0x55
    ck.storage.put(key, bytes(data))


def drill(run_dir: Path, uri: str, reference: dict, env: dict) -> list[str]:
    """Run, damage the newest checkpoint, rerun, damage every checkpoint, rerun; returns the checks made."""
    extra = (f"checkpoint.uri={uri}",) if uri else ()
    ck = Checkpointer(uri or run_dir / "checkpoints", **({"s3_endpoint": env["AWS_ENDPOINT_URL_S3"]} if uri else {}))
    res = run_cli(*train_args(run_dir, *extra), **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ck.steps()[0] == FINAL_STEP
    done = []
    for round_, targets in (("newest", [FINAL_STEP]), ("every", None)):
        steps = targets or ck.steps()
        assert len(steps) >= 1
        for i, step in enumerate(steps):
            corrupt(ck, step, "truncate" if i % 2 == 0 else "flip")
            with pytest.raises(Exception, match="size/sha256 mismatch"):
                ck.verify(step)
        res = run_cli(*train_args(run_dir, *extra), **env)
        assert res.returncode == 0, (round_, res.stderr[-3000:])
        assert f"writing checkpoint step {FINAL_STEP} again" in res.stderr, res.stderr[-3000:]
        assert "not overwritten" not in res.stderr
        ck.verify(FINAL_STEP)
        step, sd = ck.latest()
        assert step == FINAL_STEP, (round_, ck.steps())
        assert_bitwise(sd, reference)
        done.append(f"{round_}: {len(steps)} corrupted, final step {step} verifies, bitwise equal")
    return done


def test_corrupted_local_checkpoints_are_replaced(tmp_path, reference):
    done = drill(tmp_path / "run", "", reference, {})
    assert len(done) == 2


def test_corrupted_s3_checkpoints_are_replaced(tmp_path, reference, s3_env):
    bucket = s3_env.create_bucket()
    done = drill(tmp_path / "run", f"s3://{bucket}/drill", reference, s3_env.env())
    assert len(done) == 2


def test_local_checkpoint_folder_on_a_full_disk_is_one_line_exit_2(tmp_path):
    """The checkpoint (about 1 MiB) does not fit a 1 MiB tmpfs; config.yaml and metrics.jsonl do."""
    assert shutil.which("unshare"), "util-linux unshare is needed for the file-system fault tests"
    argv = " ".join(train_args(Path("/mnt/run")))
    script = (
        f"mount -t tmpfs -o size=1m tmpfs /mnt && timeout 300 {sys.executable} -m trainer {argv}; "
        "echo status=$?; find /mnt -name '.*.tmp-*' | sed 's/^/left:/'"
    )
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=400
    )
    assert "status=2" in res.stdout, (res.stdout, res.stderr[-3000:])
    assert "Traceback" not in res.stderr and "retrying" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint folder /mnt/run/checkpoints: cannot write (/mnt/run/checkpoints/step-")
    assert "[ENOSPC]" in last and "free some space" in last
    assert "left:" not in res.stdout, res.stdout


def test_a_final_checkpoint_that_does_not_verify_is_not_success(tmp_path):
    """The storage hands back other bytes than were written (a flipped bit on the disk): the finished run's
    read-back of its final checkpoint fails, and the run exits 200 (retried: the restart resumes from the
    newest checkpoint that verifies and writes the final one again) instead of 0."""
    run_dir = tmp_path / "run"
    argv = train_args(run_dir, "data.path=synthetic:8x8:3:64", "data.limit=0", "loop.epochs=1", "loop.batch_size=16")
    code = f"""
import sys
from trainer import checkpoint
from tests.test_fault_drill import corrupt

real = checkpoint.Checkpointer.verify

def verify_after_bit_rot(self, step):
    corrupt(self, step, "flip")
    return real(self, step)

checkpoint.Checkpointer.verify = verify_after_bit_rot
from trainer.__main__ import main
sys.exit(main({argv!r}))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 200, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint.uri: the final checkpoint does not verify after its upload: "), last
    assert "step-000000004/state.pt: size/sha256 mismatch" in last
