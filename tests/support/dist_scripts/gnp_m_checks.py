"""Run under `torchrun --standalone --nproc_per_node=2` (gloo, CPU, fp64). Writes <out_dir>/rank<k>.json.

gnp.m across the hardware: three training runs of 3 GNP steps (SGD with Nesterov momentum, a BatchNorm model)
on the same 16-example batches, compared by their final parameters:
  ddp_m8:    2 DDP ranks, each its 8 examples, one perturbation per rank (m = per-rank batch, sub_batches=1);
  single_m8: one process (no DDP, on every rank), all 16 examples, sub_batches=2 (m = 8);
  ddp_m4:    2 DDP ranks with sub_batches=2 (m = 4), against single_m4: one process, sub_batches=4.
The BatchNorm running statistics are compared too: the DDP runs average their buffers over the ranks after every
step (what loop.sync_bn_buffers does before evaluating and saving), and must then equal the single process's (issue
31: k sub-batches make one update per step, the mean of the k). bn_start_differs: one step of 2 ranks x 2 sub-batches
whose BatchNorm buffers differ at the start (rank 1's shifted) against one process x 4 sub-batches started from rank
0's buffers: DDP's forward broadcasts rank 0's buffers, so every sub-batch must start from those.
tests/test_gnp_m.py asserts.
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


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    bn = model[1]
    return [bn.running_mean.detach().clone(), bn.running_var.detach().clone(), bn.num_batches_tracked.clone()]


def average_bn(model: nn.Module, world: int) -> None:
    """The ranks' mean BatchNorm buffers, as trainer.loop.average_bn_buffers computes them (fp64 sum / world)."""
    bn = model[1]
    for b in (bn.running_mean, bn.running_var):
        flat = b.detach().double().clone()
        dist.all_reduce(flat)
        b.copy_(flat / world)


def train(model: nn.Module, run: nn.Module, data, k: int, rank: int | None, world: int) -> list[torch.Tensor]:
    """Parameters, then the BatchNorm buffers (averaged over the ranks after every step under DDP)."""
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
        if rank is not None:
            average_bn(model, world)
    return [p.detach().clone() for p in model.parameters()] + bn_state(model)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


N_BN = 3  # the BatchNorm entries at the end of train()'s list


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
        out = train(model, ddp, data, k, rank, world)
        params = out[:-N_BN]
        res[f"ddp_k{k}_vs_single_k{2 * k}"] = max_diff(params, ref[:-N_BN])
        res[f"ddp_k{k}_vs_single_k{2 * k}_bn"] = max_diff(out[-N_BN:], ref[-N_BN:])
        res[f"ddp_k{k}_num_batches_tracked"] = int(out[-1])
        res[f"single_k{2 * k}_num_batches_tracked"] = int(ref[-1])
        gathered = [torch.cat([p.reshape(-1) for p in params]) for _ in range(world)]
        dist.all_gather(gathered, torch.cat([p.reshape(-1) for p in params]))
        res[f"ddp_k{k}_replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
        del ddp, model
        gc.collect()
    # bn_start_differs (see the module docstring): one step, no averaging before it
    model = make_model()
    reference = train(model, model, data[:1], 4, None, world)[-N_BN:]  # from rank 0's (unshifted) buffers
    model = make_model()
    ddp = DDP(model)  # (DDP's constructor broadcasts rank 0's buffers: shift rank 1's after it)
    with torch.no_grad():
        model[1].running_mean.add_(float(rank))  # rank 1's buffers differ from rank 0's at the start
    x, y = data[0]
    n = x.shape[0] // world
    x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.05, alpha=0.8)
    opt.train_step(
        lambda j: F.cross_entropy(ddp(x[j * 4 : (j + 1) * 4]), y[j * 4 : (j + 1) * 4]), model=ddp, sub_batches=2
    )
    average_bn(model, world)
    res["bn_start_differs"] = max_diff(bn_state(model), reference)
    del ddp, model, opt
    gc.collect()
    # teeth: the one-perturbation step on the whole 16-example batch is a different update
    model = make_model()
    res["single_k1_vs_single_k2"] = max_diff(train(model, model, data, 1, None, world)[:-N_BN], single[2][:-N_BN])
    del model
    gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
