"""Run under `torchrun --standalone --nproc_per_node=2` (gloo, CPU): one real training run (trainer.train.train,
debug-cpu recipe, a BatchNorm ResNet) with `loop.sync_bn_buffers` = argv[3]. Writes <out_dir>/rank<k>.json.

The BatchNorm buffers are gathered from both ranks here (all_gather, fp64) at every averaging call and at the entry
of every evaluation; rank 0 also reads the BatchNorm buffers of the last checkpoint. tests/test_bn_sync.py asserts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import trainer.train as T
from trainer import config
from trainer.checkpoint import Checkpointer
from trainer.loop import bn_buffers


def flat_buffers(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().double().reshape(-1) for b in bn_buffers(module)])


def gathered(module: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    own = flat_buffers(module)
    parts = [torch.empty_like(own) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, own)
    return own, parts


def main() -> None:
    out_dir, run_dir, sync = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rec: dict = {"sync": [], "eval": []}
    last: dict = {}
    real_average, real_evaluate = T.average_bn_buffers, T.evaluate

    def recording_average(module, env):
        _, parts = gathered(module)
        mean = torch.stack(parts).mean(0)
        n = real_average(module, env)
        after = flat_buffers(module)
        rec["sync"].append(
            {
                "buffers": n,
                "ranks_spread": max((p - parts[0]).abs().max().item() for p in parts),
                "after_vs_mean": ((after - mean).abs() / (mean.abs() + 1e-3)).max().item(),
            }
        )
        last["mean"] = mean
        return n

    def recording_evaluate(module, loader, env, amp_dtype):
        own, parts = gathered(module)
        entry = {"ranks_spread": max((p - parts[0]).abs().max().item() for p in parts)}
        if "mean" in last:
            entry["vs_last_mean"] = ((own - last["mean"]).abs() / (last["mean"].abs() + 1e-3)).max().item()
        rec["eval"].append(entry)
        last["rank0_at_eval"] = parts[0]
        last["mean_at_eval"] = torch.stack(parts).mean(0)
        return real_evaluate(module, loader, env, amp_dtype)

    T.average_bn_buffers, T.evaluate = recording_average, recording_evaluate
    cfg = config.load(
        "debug-cpu",
        [
            "data.loader=memory",
            "data.path=fashion-mnist:/usr/share/datasets/fashion-mnist",
            "data.limit=256",
            "data.augment=none",
            "loop.epochs=1",
            "loop.batch_size=32",
            "loop.log_every=100",
            f"loop.sync_bn_buffers={sync}",
            f"run.dir={run_dir}",
            "run.fresh=true",
        ],
    )
    rank = int(os.environ["RANK"])
    # train() tears its process group down; gather what we need inside it (the wrappers), then compare here.
    T.train(cfg)
    if rank == 0:
        ckpt = Checkpointer.from_config(cfg.checkpoint, Path(run_dir) / "checkpoints")
        _, state = ckpt.latest()
        module = T.create_model("resnet_debug", num_classes=10, in_channels=3, image_size=28)
        module.load_state_dict(state["model"])
        saved = flat_buffers(module)
        rec["saved_vs_mean"] = ((saved - last["mean_at_eval"]).abs() / (last["mean_at_eval"].abs() + 1e-3)).max().item()
        rec["saved_vs_rank0"] = ((saved - last["rank0_at_eval"]).abs()).max().item()
        if "mean" in last:  # the mean of the buffers the ranks held before the last averaging call
            rec["saved_vs_sync_mean"] = ((saved - last["mean"]).abs() / (last["mean"].abs() + 1e-3)).max().item()
        ckpt.close()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
