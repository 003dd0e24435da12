"""trainer.optim.passes.pass_policy on its own: the module settings of each GNP pass, and their undoing.

Both ways of finding the modules are checked: ``model=`` (what ``train_step`` uses) and the global forward
pre-hook (``model=None``, what ``step(closure)`` uses). DDP runs for real: one process, gloo.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.optim.passes import FIRST, PLAIN, SECOND, ModelModules, pass_policy

WAYS = ("model", "hook")


class Flagged(nn.Module):
    """A layer with a ``true_gradient`` switch (like a Shake-Shake block) that records what its forward saw."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.true_gradient = False
        self.seen: list[object] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.true_gradient)
        return self.lin(x)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Flagged(), nn.Dropout(0.5), nn.Linear(4, 2))


def policy(way: str, pass_: int, model: nn.Module, **kw) -> pass_policy:
    return pass_policy(pass_, model=model if way == "model" else None, **kw)


def bn_state(bn: nn.BatchNorm1d) -> list[torch.Tensor]:
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def gloo(tmp_path: Path) -> Iterator[None]:
    """A real one-process gloo group (file store); torn down after the test has deleted its DDP objects."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # DDP objects first (gloo aborts at exit when they outlive the group)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize("way", WAYS)
def test_pass2_leaves_batchnorm_running_stats_alone(way: str) -> None:
    model = make_model().train()
    bn = model[1]
    x = torch.randn(8, 3)
    before = bn_state(bn)
    with policy(way, SECOND, model):
        model(x)
        model(x)
        assert bn.track_running_stats is False  # batch statistics, nothing written
    assert same(bn_state(bn), before)
    assert bn.track_running_stats is True
    # and tracking works again after the pass: one forward counts one batch and moves the mean
    model(x)
    assert int(bn.num_batches_tracked) == int(before[2]) + 1
    assert not torch.equal(bn.running_mean, before[0])


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("pass_", [PLAIN, FIRST])
def test_other_passes_update_batchnorm(way: str, pass_: int) -> None:
    model = make_model().train()
    bn = model[1]
    with policy(way, pass_, model):
        model(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("way", WAYS)
def test_batchnorm_turned_off_by_the_user_stays_off(way: str) -> None:
    model = make_model().train()
    bn = model[1]
    bn.track_running_stats = False
    with policy(way, SECOND, model):
        model(torch.randn(8, 3))
    assert bn.track_running_stats is False


def test_batchnorm_mean_of_same_batch_equals_pass1_normalisation() -> None:
    """Frozen BN in train mode still normalises with the batch statistics (the output of pass 2 at the same
    θ equals pass 1's), i.e. freezing changes what is written, not what is computed."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(8, 3)
    with pass_policy(FIRST, model=model):
        y1 = model(x)
    with pass_policy(SECOND, model=model):
        y2 = model(x)
    h = model[0](x)
    by_hand = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
    by_hand = by_hand * model[1].weight + model[1].bias
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y2, by_hand)


# ---------------------------------------------------------------------------------------------
# true_gradient


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("before", [False, True])
def test_true_gradient_per_pass_and_restored(way: str, before: bool) -> None:
    model = make_model()
    flagged = model[2]
    flagged.true_gradient = before
    x = torch.randn(8, 3)
    for pass_, expected in ((FIRST, True), (SECOND, False), (PLAIN, False)):
        flagged.seen.clear()
        with policy(way, pass_, model):
            model(x)
        assert flagged.seen == [expected], pass_
        assert flagged.true_gradient is before, pass_


def test_hook_reaches_only_modules_the_body_calls() -> None:
    called, other = Flagged(), Flagged()
    with pass_policy(FIRST):
        called(torch.randn(2, 4))
        assert other.true_gradient is False  # never ran: untouched
    assert called.seen == [True]
    # and the hook is gone after the block
    called(torch.randn(2, 4))
    assert called.seen == [True, False]


def test_model_modules_found_once() -> None:
    model = make_model()
    found = ModelModules(model)
    assert found.is_for(model) and not found.is_for(make_model())
    assert found.batchnorms == [model[1]] and found.flagged == [model[2]] and found.ddps == []


# ---------------------------------------------------------------------------------------------
# RNG


@pytest.mark.parametrize("way", WAYS)
def test_pass2_draws_the_same_dropout_mask(way: str) -> None:
    model = make_model().train()
    drop = model[3]
    masks = []
    drop.register_forward_hook(lambda m, args, out: masks.append(out != 0))
    x = torch.randn(64, 3)
    with policy(way, FIRST, model) as pass1:
        model(x)
    torch.rand(100)  # whatever runs between the passes draws too
    with policy(way, SECOND, model, rng=pass1.rng):
        model(x)
    with policy(way, SECOND, model):  # no snapshot handed over: the RNG runs on
        model(x)
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


# ---------------------------------------------------------------------------------------------
# DDP


def count_allreduces(ddp: DistributedDataParallel) -> list[int]:
    calls = [0]

    def hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
        calls[0] += 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    return calls


@pytest.mark.parametrize("way", WAYS)
def test_pass1_runs_ddp_unsynchronised(gloo: None, way: str) -> None:
    ddp = DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), Flagged(), nn.Linear(4, 2)))
    calls = count_allreduces(ddp)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def run(model: DistributedDataParallel, p: int, **kw) -> pass_policy:
        with policy(way, p, model, **kw) as pol:
            out = model(x)  # the hook way sets the flag at the first forward call
            assert model.require_backward_grad_sync is (p != FIRST or kw.get("sync", False))
            F.cross_entropy(out, y).backward()
        assert model.require_backward_grad_sync is True
        return pol

    pol = run(ddp, FIRST)
    assert calls[0] == 0 and pol.ddps == [ddp]
    run(ddp, SECOND)
    assert calls[0] > 0  # the synchronised pass does all-reduce: the counter sees it
    n = calls[0]
    run(ddp, FIRST, sync=True)  # sync_perturbations: pass 1 synchronised too
    assert calls[0] == 2 * n
    del ddp, pol


@pytest.mark.parametrize("way", WAYS)
def test_everything_restored_when_the_body_raises(gloo: None, way: str) -> None:
    inner = make_model().train()
    ddp = DistributedDataParallel(inner)
    bn, flagged = inner[1], inner[2]
    x = torch.randn(8, 3)
    for p in (FIRST, SECOND):
        with pytest.raises(RuntimeError, match="boom"):
            with policy(way, p, ddp):
                ddp(x)
                raise RuntimeError("boom")
        assert ddp.require_backward_grad_sync is True
        assert bn.track_running_stats is True
        assert flagged.true_gradient is False
    # no hook left behind: a plain forward sees the module's own setting
    flagged.true_gradient = True
    flagged.seen.clear()
    ddp(x)
    assert flagged.seen == [True]
    del ddp


def test_bad_pass() -> None:
    with pytest.raises(ValueError, match="pass_ must be"):
        pass_policy(3)
