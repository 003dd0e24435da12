"""trainer/recipes/PARITY.md: the "project" column of every table row equals what the recipe loads, every reference
recipe has its table, and every row names the reference's file:line and a reason wherever it flags a deviation.

The "Behaviours" section (what the reference's code does without a recipe key): every behaviour the review of
issue 31 listed has a row, and where the project's side is cheap to check in code (BatchNorm and ViT settings of
the registered models, the crop's padding, the train loader's last partial batch, the normalisation constants and
evaluation interval the recipes load, per-rank batch augmentation, the plain step at alpha = 0), it is checked
against the code, not only the text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_recipes import REFERENCE_RECIPES
from trainer import config

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "trainer" / "recipes" / "PARITY.md"
RECIPES = REFERENCE_RECIPES  # the nine reference recipes, listed once (tests/test_recipes.py)


def tables() -> dict[str, list[list[str]]]:
    """Section name ('shared' before the first recipe heading) -> the table rows' cells."""
    out: dict[str, list[list[str]]] = {"shared": []}
    section = "shared"
    for line in PARITY.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            out[section] = []
        elif line.startswith("| ") and not line.startswith(("| hyper-parameter |", "| behaviour |")):
            out[section].append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def value_at(cfg: config.RunConfig, key: str):
    d = config.to_dict(cfg)
    for part in key.split("."):
        d = d[part]
    return d


def test_every_reference_recipe_has_a_table() -> None:
    t = tables()
    for recipe in RECIPES:
        assert len(t.get(recipe, [])) >= 15, recipe
    assert len(t["shared"]) >= 8


@pytest.mark.parametrize("recipe", RECIPES)
def test_project_column_is_what_the_recipe_loads(recipe: str) -> None:
    t = tables()
    cfg = config.load(recipe)
    for cells in t["shared"] + t[recipe]:
        key = re.fullmatch(r"`([a-z_.0-9]+)`", cells[3]).group(1)
        shown = json.loads(cells[4].strip("`"))
        loaded = value_at(cfg, key)
        assert shown == loaded, f"{recipe}: {key} table {shown!r} != recipe {loaded!r}"


def test_rows_cite_the_reference_and_explain_deviations() -> None:
    t = tables()
    for recipe in RECIPES:
        for cells in t[recipe]:
            assert re.search(r"\.(py|sh)(@[0-9a-f]{7})?:\d", cells[2]), cells  # file:line in the reference
            if "deviation" in cells[5]:
                assert len(cells[5]) > 40, cells  # a reason, not just the flag
    text = PARITY.read_text()
    flagged = text.count("**deviation**")
    assert f"**{flagged} deviations**" in text  # the closing count matches the flagged rows


# ------------------------------------------------------------------------------------------------
# Behaviours
# ------------------------------------------------------------------------------------------------

BEHAVIOURS = (  # every behaviour the review of issue 31 listed, by the id its row starts with
    "bn-momentum-eps",
    "bn-running-variance",
    "vit-dropout",
    "vit-layernorm-eps",
    "cifar-normalization",
    "imagenet-normalization",
    "crop-padding",
    "batch-augment-scope",
    "same-batch-and-rng",
    "bn-state-pass1",
    "true-gradient-pass1",
    "steps-per-epoch",
    "eval-every-epoch",
    "alpha-zero",
)
# Deviations on purpose, each with its reason in the row; a new one must be added here knowingly.
BEHAVIOUR_DEVIATIONS = {"bn-running-variance", "imagenet-normalization", "batch-augment-scope", "alpha-zero"}


def behaviour_rows() -> dict[str, list[str]]:
    rows = {}
    for cells in tables()["Behaviours"]:
        m = re.match(r"`([a-z0-9-]+)` ", cells[0])
        assert m, cells
        assert m.group(1) not in rows, f"behaviour {m.group(1)} has two rows"
        rows[m.group(1)] = cells
    return rows


def test_every_listed_behaviour_has_a_cited_row() -> None:
    rows = behaviour_rows()
    assert set(BEHAVIOURS) <= set(rows), sorted(set(BEHAVIOURS) - set(rows))
    for name, cells in rows.items():
        assert len(cells) == 6, (name, cells)  # behaviour | reference | where | project | where here | reason
        assert cells[1] and cells[3], name
        assert re.search(r"\.(py|sh)@[0-9a-f]{7}:\d", cells[2]), (name, cells[2])  # file:line@commit
        paths = re.findall(r"trainer/[\w/*.-]+\.(?:py|yaml)", cells[4])
        assert paths, (name, cells[4])
        for path in paths:
            assert list(ROOT.glob(path)), f"{name}: {path} does not exist"
        flagged = "**deviation**" in cells[5]
        assert flagged == (name in BEHAVIOUR_DEVIATIONS), name
        if flagged:
            assert len(cells[5]) > 60, cells  # a reason, not just the flag
        else:
            assert cells[5] == "", (name, cells[5])  # same behaviour: nothing to explain


def test_count_covers_the_behaviours() -> None:
    text = PARITY.read_text()
    recipes_part = text[: text.index("## Behaviours")]
    assert text.count("**deviation**") == recipes_part.count("**deviation**") + len(BEHAVIOUR_DEVIATIONS)


def meta_models():
    """Every registered model, built on the meta device (settings only: no memory, no initialisation cost)."""
    from trainer.models import create_model, list_models

    for name in list_models():
        with torch.device("meta"):
            yield name, create_model(name, num_classes=10)


def test_bn_momentum_eps_of_every_registered_model() -> None:
    """Flax momentum 0.9 = torch momentum 0.1 (the weight of the new batch statistic), eps 1e-5."""
    with_bn = 0
    for name, model in meta_models():
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        with_bn += bool(bns)
        for bn in bns:
            assert (bn.momentum, bn.eps) == (0.1, 1e-5), name
            assert bn.track_running_stats and bn.affine, name
    assert with_bn >= 20  # ResNets, WRNs, PyramidNets, VGG-BN, Shake-Shake, the demo CNN


def test_vit_dropout_and_layernorm_eps() -> None:
    from trainer.models.vit import Attention

    vits = [(n, m) for n, m in meta_models() if n.startswith("vit_")]
    assert {"vit_ti", "vit_s", "vit_b", "vit_l"} <= {n for n, _ in vits}
    for name, model in vits:
        drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
        attn = [m.attention_dropout for m in model.modules() if isinstance(m, Attention)]
        eps = [m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert drops and set(drops) == {0.1}, name
        assert attn and set(attn) == {0.1}, name
        assert eps and set(eps) == {1e-6}, name
        assert len(eps) == 2 * len(attn) + 1, name  # two per block and the final one, as in the reference


def test_crop_padding_is_reflect_4() -> None:
    """Every crop is a window of the image padded by 4 in numpy's/TF's REFLECT mode (not edge, not zeros)."""
    from trainer.data.augment import FlipReflectCrop
    from trainer.data.loaders import BASIC_PADDING

    assert BASIC_PADDING == 4
    img = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    windows = {padded[:, y : y + 8, x : x + 8].tobytes() for y in range(9) for x in range(9)}
    for mode in ("edge", "symmetric", "constant"):  # the other padding modes' corner windows are not among them
        assert np.pad(img, ((0, 0), (4, 4), (4, 4)), mode=mode)[:, :8, :8].tobytes() not in windows, mode
    crop = FlipReflectCrop(padding=BASIC_PADDING, flip_prob=0.0, seed=0)
    batch = torch.from_numpy(np.repeat(img[None], 32, axis=0))
    out = crop(batch, step=0).numpy()
    assert all(o.tobytes() in windows for o in out)
    assert len({o.tobytes() for o in out}) > 8  # really random offsets


def test_train_loader_drops_the_last_partial_batch() -> None:
    """floor(N / B) steps, every batch full (memory loader through the trainer's own entry point)."""
    from trainer.data import build_data
    from trainer.data.loaders import LoaderFacts

    cfg = config.DataConfig(path="synthetic:8x8:2:100", loader="memory", augment="none")
    facts = LoaderFacts(
        batch_size=32,
        eval_batch_size=None,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        channels_last=False,
    )
    loaders = build_data(cfg, facts)
    assert loaders.steps_per_epoch == 100 // 32 == 3
    assert [len(y) for _, y in loaders.train] == [32, 32, 32]


def test_cifar_reference_recipes_load_the_reference_normalization() -> None:
    from trainer.data.loaders import normalization_stats

    constants = {  # ds_pipeline/datasets/dataset_source.py:209-213 at e803362
        "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
        "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    }
    for recipe in RECIPES:
        cfg = config.load(recipe)
        dataset = Path(cfg.data.path).name  # data/cifar10, data/imagenet
        if dataset.startswith("cifar"):
            assert cfg.data.normalize == "reference", recipe
            mean, std = normalization_stats(cfg.data.normalize, dataset, [0.0] * 3, [1.0] * 3)
            assert mean == [255 * v for v in constants[dataset][0]], recipe
            assert std == [255 * v for v in constants[dataset][1]], recipe
        else:
            assert cfg.data.normalize == "auto", recipe  # the imagenet-normalization row
    assert config.DataConfig().normalize == "auto"  # other recipes and runs: the loaded images' statistics


def test_reference_recipes_evaluate_every_epoch() -> None:
    for recipe in RECIPES:
        assert config.load(recipe).loop.eval_every == 1, recipe


def test_batch_augment_draws_per_rank() -> None:
    """The batch-augment-scope deviation: each rank draws its own mixup weight (the reference: one per host)."""
    from trainer.data.augment import BatchAugment

    images = torch.randn(8, 3, 8, 8)
    labels = torch.arange(8) % 10
    out = [BatchAugment("mixup", num_classes=10, seed=0, rank=r)(images, labels, 0)[1] for r in (0, 1, 0)]
    assert torch.equal(out[0], out[2])  # (seed, rank, step) decide
    assert not torch.equal(out[0], out[1])


def test_alpha_zero_is_one_plain_pass() -> None:
    """The alpha-zero deviation: r > 0 with alpha = 0 runs one pass and steps along g (the reference: two passes,
    g1/||g1||)."""
    from trainer.optim import GNP

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ref = nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.0, norm_perturbations=True)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    nn.functional.mse_loss(ref(x), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert len(calls) == 1
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
