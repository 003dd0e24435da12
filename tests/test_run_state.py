"""RunState, the one object a checkpoint is saved from and restored into: a round trip into a freshly built
model/optimizer continues training bit for bit, it reads checkpoints written before it existed, and
`resume` hands the newest verified checkpoint to it."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.checkpoint import Checkpointer
from trainer.dist import DistEnv
from trainer.loop import LoopState
from trainer.models import create_model
from trainer.optim.gnp import GNP
from trainer.run_state import STATE_KEYS, RunState, resume

ENV = DistEnv(0, 0, 1, torch.device("cpu"))
BEFORE = Path(__file__).parent / "data" / "checkpoint_before_run_state"
X, Y = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3


def build(seed: int):
    """A model with dropout (so training draws from the generator) and BatchNorm (buffers), under GNP+SGD."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), r=0.05, alpha=0.5)
    return model, opt


def steps(model, opt, n: int, start: int) -> None:
    for k in range(start, start + n):
        idx = torch.arange(k * 8, k * 8 + 8) % 64
        opt.train_step(lambda idx=idx: F.cross_entropy(model(X[idx]), Y[idx]), model=model, gnp=True)


def through_bytes(sd: dict) -> dict:
    """What a checkpoint hands back: torch.save, then the weights-only load the Checkpointer uses."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_round_trip_into_a_fresh_build_continues_bitwise():
    model, opt = build(seed=0)
    steps(model, opt, 3, start=0)
    random.random()  # move Python's generator off its seeded state too
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    run = RunState(
        module=model,
        optimizer=opt,
        loop=LoopState(epoch=1, batch=3, step=7, gnp_steps=5),
        scaler=scaler,
        env=ENV,
        config={"optim": {"lr": 0.1}},
        commit="abc123",
    )
    sd = through_bytes(run.state_dict())
    assert tuple(sd) == STATE_KEYS
    assert sd["config"] == {"optim": {"lr": 0.1}} and sd["git_commit"] == "abc123"
    momentum = {i: s["momentum_buffer"].clone() for i, s in opt.base_optimizer.state_dict()["state"].items()}
    assert len(momentum) == 6  # weight and bias of both Linear layers and of the BatchNorm
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # The uninterrupted run: two more steps (dropout draws), then one draw of each generator.
    steps(model, opt, 2, start=3)
    expected = ({k: v.clone() for k, v in model.state_dict().items()}, torch.rand(4), random.random())

    fresh_model, fresh_opt = build(seed=99)  # other initial weights, empty optimizer state
    fresh = RunState(
        module=fresh_model,
        optimizer=fresh_opt,
        loop=LoopState(),
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0),
        env=ENV,
        config={},
        commit="",
    )
    torch.manual_seed(12345)  # the generators as a restarted process would have them
    random.seed(12345)
    fresh.load_state_dict(sd)
    assert fresh.rng_restored
    assert fresh.loop.state_dict() == {"epoch": 1, "batch": 3, "step": 7, "gnp_steps": 5}
    assert fresh.scaler is not None and fresh.scaler.get_scale() == 512.0
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved_weights.items())
    restored = fresh_opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i]["momentum_buffer"], m) for i, m in momentum.items())

    steps(fresh_model, fresh_opt, 2, start=3)
    weights, draw, py_draw = expected
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(torch.rand(4), draw) and random.random() == py_draw


def test_rng_of_another_world_size_is_not_applied():
    model, opt = build(seed=0)
    run = RunState(module=model, optimizer=opt, loop=LoopState(), scaler=None, env=ENV, config={}, commit="")
    sd = through_bytes(run.state_dict())
    sd["rng"] = sd["rng"] * 2  # saved by a 2-rank job
    torch.manual_seed(7)
    before = torch.get_rng_state()
    run.load_state_dict(sd)
    assert not run.rng_restored and torch.equal(torch.get_rng_state(), before)


def test_reads_a_checkpoint_written_before_run_state(tmp_path):
    """tests/data/checkpoint_before_run_state: step 16 of the debug-cpu recipe (resnet_debug, Fashion-MNIST
    28x28, SGD+Nesterov under GNP) as the training code wrote it before RunState existed."""
    shutil.copytree(BEFORE, tmp_path / "ck")
    found = Checkpointer(tmp_path / "ck").latest()  # verifies the manifest's sha256 too
    assert found is not None
    step, sd = found
    assert step == 16 and tuple(sorted(sd)) == tuple(sorted(STATE_KEYS))
    torch.manual_seed(3)
    model = create_model("resnet_debug", num_classes=10, in_channels=3, image_size=28)
    o = sd["config"]["optim"]
    base = torch.optim.SGD(
        [{"params": list(model.parameters()), "weight_decay": o["weight_decay"]}],
        lr=o["lr"],
        momentum=o["momentum"],
        nesterov=o["nesterov"],
    )
    opt = GNP(base, r=sd["config"]["gnp"]["r"], alpha=sd["config"]["gnp"]["alpha"])
    run = RunState(module=model, optimizer=opt, loop=LoopState(), scaler=None, env=ENV, config={}, commit="")
    run.load_state_dict(sd)
    assert run.loop.state_dict() == {"epoch": 1, "batch": 0, "step": 16, "gnp_steps": 16}
    assert run.rng_restored and torch.equal(torch.get_rng_state(), sd["rng"][0]["torch"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd["model"].items())
    # Saved again, it is the same checkpoint: same keys, same tensors, same optimizer state.
    again = through_bytes(run.state_dict())
    assert tuple(again) == STATE_KEYS
    assert all(torch.equal(again["model"][k], v) for k, v in sd["model"].items())
    old_state, new_state = sd["optimizer"]["state"], again["optimizer"]["state"]
    assert old_state.keys() == new_state.keys() and old_state
    assert all(torch.equal(new_state[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in old_state.items())
    assert again["loop"] == sd["loop"] and again["scaler"] is None


def test_resume_hands_the_newest_verified_checkpoint_to_load(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    loaded: list[dict] = []
    assert resume(ck, ENV, loaded.append) is None and loaded == []
    for step in (4, 8):
        ck.save(step, {"w": torch.full((2,), float(step))})
        assert ck.wait(timeout=30)
    (tmp_path / "step-000000008" / "state.pt").write_bytes(b"truncated")  # the newest no longer verifies
    assert resume(ck, ENV, loaded.append) == 4
    assert len(loaded) == 1 and torch.equal(loaded[0]["w"], torch.full((2,), 4.0))
    ck.close()
