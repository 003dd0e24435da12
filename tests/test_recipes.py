"""Every recipe trains: two real steps through the whole CLI with the recipe's own optimizer, GNP settings,
augmentations and schedule, its model swapped for its family's debug variant (`trainer.models.debug_variant`), on
a small real dataset."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from trainer import config
from trainer.models import debug_variant, list_models


def test_every_recipe_model_is_registered():
    models = set(list_models())
    for name in config.list_recipes():
        cfg = config.load(name)
        assert cfg.model.name in models, f"recipe {name}: model {cfg.model.name!r} is not registered"
        assert debug_variant(cfg.model.name) in models


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(config.list_recipes()))
def test_recipe_runs_two_steps(recipe, fmnist_small, tmp_path):
    cfg = config.load(recipe)
    sets = {
        "model.name": debug_variant(cfg.model.name),
        "data.path": str(fmnist_small),
        "data.image_size": 32,
        "data.num_workers": 1,
        "data.normalize": "auto",  # the CIFAR reference recipes' fixed constants are CIFAR's; this is Fashion-MNIST
        "loop.batch_size": 32,
        "loop.max_steps": 2,
        "loop.log_every": 1,
        "run.dir": str(tmp_path / "run"),
    }
    if cfg.data.loader == "memory":  # device-resident recipes read the raw files: the same 500 images, native size
        sets.update(
            {"data.path": "fashion-mnist:/usr/share/datasets/fashion-mnist", "data.limit": 500, "data.image_size": 0}
        )
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = run_cli("train", "--recipe", recipe, *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] < 50 for r in train)  # finite, not diverged
    # GNP recipes really took two-pass steps (the grwarmup recipe starts with plain "zero"-warmup steps)
    expect_gnp = cfg.gnp.r > 0 and cfg.gnp.warmup != "zero"
    assert any(r["gnp"] for r in train) == expect_gnp
    assert train[0]["alpha"] == pytest.approx(cfg.gnp.alpha)


REFERENCE_RECIPES = (
    "pyramidnet-sd-cifar",
    "resnet-cifar",
    "resnet-imagenet",
    "vggbn-imagenet",
    "vit-cifar-basic",
    "vit-cifar-basic-grwarmup",
    "vit-cifar-heavy",
    "wideresnet-cifar",
    "wideresnet-ss-cifar",
)


def test_vit_recipes_clip_like_the_paper_era_code():
    """07895f1's Adam clipped at its grad_norm_clip 2.0 after the outer 5.0 clip: the effective clip was 2.0.
    The grwarmup recipe exists only in the later code (no clip inside Adam), so it keeps 5.0."""
    assert config.load("vit-cifar-basic").optim.clip_norm == 2.0
    assert config.load("vit-cifar-heavy").optim.clip_norm == 2.0
    assert config.load("vit-cifar-basic-grwarmup").optim.clip_norm == 5.0


@pytest.mark.parametrize("recipe", REFERENCE_RECIPES)
def test_reference_recipes_run_at_jax_default_precision(recipe):
    """fp32 tensors with TF32 matmuls/convolutions (JAX's default on NVIDIA GPUs), not bf16 autocast."""
    assert config.load(recipe).loop.precision == "tf32"
    assert config.load(recipe, ["loop.precision=bf16"]).loop.precision == "bf16"  # one override away


def test_tf32_precision_sets_the_backend_flags():
    import torch

    from trainer.loop import set_float32_math
    from trainer.train import amp_dtype_of

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert amp_dtype_of("tf32", torch.device("cuda")) is None  # no autocast: fp32 tensors
        set_float32_math("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_float32_math("fp32")  # PyTorch's defaults: fp32 matmuls, TF32 cuDNN convolutions
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
