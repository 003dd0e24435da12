"""torchrun worker for tests/test_data.py: what each rank's train and eval loaders yield.

Usage: torchrun --standalone --nproc_per_node=2 data_shards.py DATA_DIR OUT_DIR BATCH EVAL_BATCH SEED

The dataset's images carry their own index in pixel (0, 0) (low byte) and (0, 1) (high byte),
so the index of every yielded image can be read back after undoing the normalization. Each rank
writes OUT_DIR/rank<r>.json; the test does the checking.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from trainer.data.loaders import build_loaders  # noqa: E402


def decode(images: torch.Tensor, mean: list[float], std: list[float]) -> tuple[list[int], list[int]]:
    """(image indices, pixel sums) of a normalized batch."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    px = torch.round(images * s + m).to(torch.int64)
    idx = (px[:, 0, 0, 0] + 256 * px[:, 0, 0, 1]).tolist()
    return idx, px.sum(dim=(1, 2, 3)).tolist()


def main() -> None:
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    batch, eval_batch, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loaders = build_loaders(
        data_dir,
        batch_size=batch,
        eval_batch_size=eval_batch,
        num_workers=1,
        seed=seed,
        rank=rank,
        world_size=world,
        device=torch.device("cpu"),
        augment="none",
    )
    mean, std = loaders.meta["mean"], loaders.meta["std"]
    result: dict = {
        "rank": rank,
        "world": world,
        "len_train": len(loaders.train),
        "steps_per_epoch": loaders.steps_per_epoch,
        "len_val": len(loaders.val),
        "epochs": {},
        "train_batch_sizes": [],
        "contiguous": True,
    }

    def run_epoch() -> list[int]:
        seen: list[int] = []
        for images, labels in loaders.train:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            result["contiguous"] &= bool(images.is_contiguous())
            result["train_batch_sizes"].append(int(images.shape[0]))
            seen += decode(images, mean, std)[0]
        return seen

    for epoch in (0, 1):
        assert loaders.train.epoch == epoch
        seen = run_epoch()
        result["epochs"][str(epoch)] = {"seen": seen, "order": loaders.train.epoch_order(epoch).tolist()}
    run_epoch()  # epoch 2, then jump back: the order must depend on (seed, epoch) only
    loaders.train.set_epoch(1)
    result["epoch1_again"] = run_epoch()

    val_idx: list[int] = []
    val_sums: list[int] = []
    val_labels: list[int] = []
    val_batches = 0
    for images, labels in loaders.val:
        i, s = decode(images, mean, std)
        val_idx += i
        val_sums += s
        val_labels += labels.tolist()
        val_batches += 1
    result.update(
        val_idx=val_idx,
        val_sums=val_sums,
        val_labels=val_labels,
        val_batches=val_batches,
        val_indices=loaders.val.indices.tolist(),
    )

    # Every rank must produce the same number of train batches, or DDP would hang: check it
    # with a collective here as well.
    n = torch.tensor([len(loaders.train)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    result["max_len_train"] = int(n.item())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)

    del loaders
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
