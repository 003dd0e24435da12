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
