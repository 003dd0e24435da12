"""Run under `torchrun --standalone --nproc_per_node=2` (gloo, CPU). Writes <out_dir>/rank<k>.json.

Checks GNP under DDP against references computed here with torch.autograd.grad and explicit
all_reduce (never with GNP itself):
  per_rank:  default mode: DDP gradient == mean over ranks of each rank's own GNP gradient
             (each rank perturbs with its own g1); both mixes; DDP with and without
             gradient_as_bucket_view; train_step and step(closure); BN + dropout model.
  sync:      sync_perturbations=True, BN/dropout-free MLP: DDP gradient == single-process GNP on
             the concatenated batch.
  comm:      a comm hook counts all-reduce calls and bytes per step: SGD loop, plain train_step,
             GNP train_step, GNP step(closure), GNP with sync_perturbations.
The test (tests/test_gnp_dist.py) reads the JSON and asserts.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.optim.gnp import GNP

R, ALPHA, EPS = 0.1, 0.8, 1e-12


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradient it applies (the synchronised, mixed gradient)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[list[Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc(self.drop(h))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def batch(kind: str, step: int, rank: int | None, n: int = 8) -> tuple[Tensor, Tensor]:
    """Deterministic data: the global batch of `step`; rank k takes rows [k*n, (k+1)*n)."""
    g = torch.Generator().manual_seed(1000 + step)
    world = dist.get_world_size()
    shape = (world * n, 3, 8, 8) if kind == "bn" else (world * n, 6)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 5, (world * n,), generator=g)
    if rank is None:
        return x, y
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def reference_gnp(model: nn.Module, x: Tensor, y: Tensor, normalized: bool, rng: Tensor | None) -> list[Tensor]:
    """GNP gradient of `model` on (x, y), written out; rng (if given) is reset before each forward."""
    params = list(model.parameters())
    if rng is not None:
        torch.set_rng_state(rng)
    g1 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    n = torch.sqrt(sum((g**2).sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(g * (R / (n + EPS)))
    if rng is not None:
        torch.set_rng_state(rng)
    g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    c = (1 - ALPHA) / (n + EPS) if normalized else 1 - ALPHA
    return [c * a + ALPHA * b for a, b in zip(g1, g2)]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def check_per_rank(rank: int) -> dict:
    out = {}
    for bucket_view in (False, True):
        for entry in ("train_step", "step"):
            torch.manual_seed(0)
            module = BNNet()
            ref = copy.deepcopy(module)
            model = DDP(module, gradient_as_bucket_view=bucket_view)
            base = RecordingSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
            opt = GNP(base, r=R, alpha=ALPHA)
            torch.manual_seed(10 + rank)  # different dropout masks per rank
            diffs = []
            for step in range(3):
                normalized = step == 1
                opt.norm_perturbations = normalized
                x, y = batch("bn", step, rank)
                ref.load_state_dict(model.module.state_dict())
                rng = torch.get_rng_state()

                def loss_fn() -> Tensor:
                    return F.cross_entropy(model(x), y)

                if entry == "train_step":
                    opt.train_step(loss_fn, model=model)
                else:

                    def closure() -> Tensor:
                        loss = loss_fn()
                        loss.backward()
                        return loss

                    opt.step(closure)
                after = torch.get_rng_state()
                expected = reference_gnp(ref, x, y, normalized, rng)
                for g in expected:
                    dist.all_reduce(g)
                    g /= dist.get_world_size()
                diffs.append(max_diff(base.seen[-1], expected))
                torch.set_rng_state(after)
            params_equal = all(bool(_same_on_all_ranks(p.detach())) for p in model.parameters())
            out[f"{entry}_bucketview{int(bucket_view)}"] = {"max_diff": max(diffs), "replicas_equal": params_equal}
            del model, opt, base
            gc.collect()
    return out


def _same_on_all_ranks(t: Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(gathered[0], g) for g in gathered)


def check_sync(rank: int) -> dict:
    out = {}
    for normalized in (False, True):
        results = {}
        for sync in (True, False):
            torch.manual_seed(0)
            module = mlp()
            ref = copy.deepcopy(module)
            model = DDP(module)
            base = RecordingSGD(model.parameters(), lr=0.0)
            opt = GNP(base, r=R, alpha=ALPHA, norm_perturbations=normalized, sync_perturbations=sync)
            x, y = batch("mlp", 0, rank)
            opt.train_step(lambda: F.cross_entropy(model(x), y), model=model)
            xa, ya = batch("mlp", 0, None)  # the concatenated batch, single process
            expected = reference_gnp(ref, xa, ya, normalized, None)
            results[sync] = max_diff(base.seen[-1], expected)
            del model, opt, base
            gc.collect()
        out[f"normalized{int(normalized)}"] = {"sync_diff": results[True], "nosync_diff": results[False]}
    return out


def check_comm(rank: int) -> dict:
    torch.manual_seed(0)
    model = DDP(BNNet(), bucket_cap_mb=0.001)  # tiny buckets: several all-reduces per backward
    counter = {"calls": 0, "bytes": 0}

    def counting_hook(state, bucket):  # no annotations: DDP checks them (strings under __future__)
        state["calls"] += 1
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(counter, counting_hook)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = GNP(base, r=R, alpha=ALPHA)

    def loss_fn(step: int) -> Tensor:
        x, y = batch("bn", step, rank)
        return F.cross_entropy(model(x), y)

    def sgd(step: int) -> None:
        base.zero_grad()
        loss_fn(step).backward()
        base.step()

    def closure_step(step: int) -> None:
        def closure() -> Tensor:
            loss = loss_fn(step)
            loss.backward()
            return loss

        opt.step(closure)

    def sync_step(step: int) -> None:
        opt.sync_perturbations = True
        opt.train_step(lambda: loss_fn(step), model=model)
        opt.sync_perturbations = False

    kinds = {
        "sgd": sgd,
        "plain_train_step": lambda s: opt.train_step(lambda: loss_fn(s), model=model, gnp=False),
        "gnp_train_step": lambda s: opt.train_step(lambda: loss_fn(s), model=model),
        "gnp_closure": closure_step,
        "gnp_sync": sync_step,
    }
    for step in range(3):  # warm up: DDP rebuilds its buckets after the first iteration
        sgd(step)
    out = {}
    for name, fn in kinds.items():
        per_step = []
        for step in range(3):
            before = dict(counter)
            fn(step)
            per_step.append([counter["calls"] - before["calls"], counter["bytes"] - before["bytes"]])
        out[name] = per_step
    out["num_params_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    del model, opt, base
    gc.collect()
    return out


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_default_dtype(torch.float64)  # tight comparisons
    result = {
        "world_size": dist.get_world_size(),
        "per_rank": check_per_rank(rank),
        "sync": check_sync(rank),
        "comm": check_comm(rank),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
