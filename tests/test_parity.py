"""trainer/recipes/PARITY.md: the "project" column of every table row equals what the recipe loads, every reference
recipe has its table, and every row names the reference's file:line and a reason wherever it flags a deviation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_recipes import REFERENCE_RECIPES
from trainer import config

PARITY = Path(__file__).resolve().parents[1] / "trainer" / "recipes" / "PARITY.md"
RECIPES = REFERENCE_RECIPES  # the nine reference recipes, listed once (tests/test_recipes.py)


def tables() -> dict[str, list[list[str]]]:
    """Section name ('shared' before the first recipe heading) -> the table rows' cells."""
    out: dict[str, list[list[str]]] = {"shared": []}
    section = "shared"
    for line in PARITY.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            out[section] = []
        elif line.startswith("| ") and not line.startswith("| hyper-parameter"):
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
