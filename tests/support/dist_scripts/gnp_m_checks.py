"""Run under `torchrun --standalone --nproc_per_node=2` (gloo, CPU, fp64). Writes <out_dir>/rank<k>.json.

gnp.m across the hardware: three training runs of 3 GNP steps (SGD with Nesterov momentum, a BatchNorm model)
on the same 16-example batches, compared by their final parameters:
  ddp_m8:    2 DDP ranks, each its 8 examples, one perturbation per rank (m = per-rank batch, sub_batches=1);
  single_m8: one process (no DDP, on every rank), all 16 examples, sub_batches=2 (m = 8);
  ddp_m4:    2 DDP ranks with sub_batches=2 (m = 4), against single_m4: one process, sub_batches=4.
tests/test_gnp_m.py asserts; BatchNorm running statistics are not compared (k updates per step vs one).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.optim.gnp import GNP

STEPS, BATCH = 3, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, run: nn.Module, data, k: int, rank: int | None, world: int) -> list[torch.Tensor]:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt = GNP(base, r=0.05, alpha=0.8, norm_perturbations=True)
    for x, y in data:
        if rank is not None:  # this rank's contiguous share of the batch
            n = x.shape[0] // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        m = x.shape[0] // k

        def loss_fn(j=None, x=x, y=y):
            if j is not None:
                x, y = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
            return F.cross_entropy(run(x), y)

        info = opt.train_step(loss_fn, model=run, sub_batches=k)
        assert info.gnp
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    res: dict = {"world_size": world}

    single = {}
    for k in (2, 4):
        model = make_model()
        single[k] = train(model, model, data, k, None, world)

    for k, ref in ((1, single[2]), (2, single[4])):
        model = make_model()
        ddp = DDP(model)
        params = train(model, ddp, data, k, rank, world)
        res[f"ddp_k{k}_vs_single_k{2 * k}"] = max_diff(params, ref)
        gathered = [torch.cat([p.reshape(-1) for p in params]) for _ in range(world)]
        dist.all_gather(gathered, torch.cat([p.reshape(-1) for p in params]))
        res[f"ddp_k{k}_replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
        del ddp, model
        gc.collect()
    # teeth: the one-perturbation step on the whole 16-example batch is a different update
    model = make_model()
    res["single_k1_vs_single_k2"] = max_diff(train(model, model, data, 1, None, world), single[2])
    del model
    gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
