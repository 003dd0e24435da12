"""What a checkpoint holds, as one object: `RunState.state_dict()` saves it, `load_state_dict()` restores it.

The object follows the Stateful protocol of torch.distributed.checkpoint (an object with `state_dict()` and
`load_state_dict(sd)`), so saving and restoring are two methods of one thing instead of code spread over the
entry point. The dict it produces is the checkpoint format (every key below is read back by older code too):

    model       the unwrapped module's state_dict
    optimizer   GNP's state_dict (base optimizer state incl. momentum, GNP and reuse buffers)
    loop        LoopState: epoch, batch within the epoch, step, gnp_steps
    scaler      the fp16 GradScaler's state_dict, or None
    rng         every rank's generator states (CPU, CUDA, Python), in rank order
    config      the RunConfig as a plain dict (informational; resuming compares run.dir/config.yaml)
    git_commit  the code's commit

Tensors and plain values only, so a checkpoint loads with `torch.load(weights_only=True)`. Credentials never
enter it: the config holds none (they come from the environment).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

from trainer import dist
from trainer.loop import LoopState

STATE_KEYS = ("model", "optimizer", "loop", "scaler", "rng", "config", "git_commit")


def git_commit() -> str:
    """The code's commit: $GIT_COMMIT (set in the image) or `git rev-parse HEAD` of the checkout, else ''."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def gather_rng_states(env: dist.DistEnv) -> list[dict]:
    """Every rank's generator states (CPU, CUDA, Python), in rank order; a collective on every rank."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if not env.distributed:
        return [mine]
    out: list = [None] * env.world_size
    torch.distributed.all_gather_object(out, mine)
    return out


def set_rng_state(states: list[dict] | None, env: dist.DistEnv) -> bool:
    """Restore this rank's generators from a checkpoint; False when it holds none for this rank (e.g. the
    world size changed), in which case the epoch seed takes over."""
    if not states or len(states) != env.world_size:
        return False
    mine = states[env.rank]
    torch.set_rng_state(mine["torch"])
    random.setstate(_as_tuple(mine["python"]))
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return True


def _as_tuple(x):
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class RunState:
    """The resumable state of a training run: model, optimizer, loop counters, fp16 scaler and RNG.

    `module` is the unwrapped model (its state_dict has no DDP/compile prefixes); `config` is the plain dict
    of the run's config, stored for reference. The commit is read once, here: the code that runs is the
    code that was imported at the start. After `load_state_dict`, `rng_restored` says whether this rank's
    generators came from the checkpoint (False when the world size changed or the checkpoint has none).
    """

    def __init__(
        self,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loop: LoopState,
        scaler: torch.amp.GradScaler | None,
        env: dist.DistEnv,
        config: dict,
        commit: str | None = None,
    ) -> None:
        self.module, self.optimizer, self.loop, self.scaler = module, optimizer, loop, scaler
        self.env, self.config = env, config
        self.commit = git_commit() if commit is None else commit
        self.rng_restored = False

    def state_dict(self) -> dict:
        """The checkpoint dict. A COLLECTIVE under torchrun (it gathers every rank's RNG state): call it on
        every rank; only rank 0's result needs to be written."""
        rng = gather_rng_states(self.env)
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loop": self.loop.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "config": self.config,
            "git_commit": self.commit,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore from a checkpoint dict (also one written before this class existed: same keys). Local to
        this rank: every rank loads the same dict and picks its own RNG entry."""
        self.module.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.loop.load_state_dict(sd["loop"])
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.rng_restored = set_rng_state(sd.get("rng"), self.env)


def resume(ckpt: Any, env: dist.DistEnv, load: Callable[[dict], None]) -> int | None:
    """Rank 0 picks the newest verified checkpoint of `ckpt` (a Checkpointer); every rank loads that one
    and hands it to `load` (e.g. a RunState's load_state_dict). Returns its step, or None when there is none."""
    found = ckpt.latest() if env.is_primary else None
    step = dist.broadcast_object(found[0] if found else None, env)
    if step is None:
        return None
    load(found[1] if env.is_primary else ckpt.load(step))
    return step
