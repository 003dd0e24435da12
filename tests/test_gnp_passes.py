"""trainer.optim.passes.pass_policy on its own: what GNP's entry points cannot show.

What a GNP step does through the policy is tested once, through both entry points (``step(closure)`` uses the
global forward pre-hook, ``train_step`` the ``model=`` lists), in tests/test_gnp.py: BatchNorm statistics from
pass 1 only (against a model that ran pass 1 alone), the same randomness in both passes, the true_gradient flag
per pass and its restoring, and everything put back when a pass raises. Here: DDP's synchronisation flag (for
real: one process, gloo), the normalisation of a frozen BatchNorm, which modules the hook reaches, the module
lists, bad arguments.
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

from trainer.optim.passes import FIRST, SECOND, ModelModules, pass_policy

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
# BatchNorm, hook reach, module lists


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
    with pytest.raises(RuntimeError, match="boom"):  # a pass that raises still puts synchronisation back
        with policy(way, FIRST, ddp):
            ddp(x)
            assert ddp.require_backward_grad_sync is False
            raise RuntimeError("boom")
    assert ddp.require_backward_grad_sync is True
    del ddp, pol


def test_bad_pass() -> None:
    with pytest.raises(ValueError, match="pass_ must be"):
        pass_policy(3)
