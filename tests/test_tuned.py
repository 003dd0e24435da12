"""`python -m trainer tuned`: SAM and GNP tuned alike on held-out training images, then compared on the test set.

The committed results (tests/data/results/select-*/ and tuned-*/) must be exactly what the command runs: same
recipe, overrides, grid and the final methods derived from the selection, so the tuned answer of
trainer/study/README.md can be reproduced by `make compare-tuned-cpu`."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from tests.conftest import FMNIST, ROOT
from trainer import config
from trainer.config import ConfigError
from trainer.study import tuned

RESULTS = ROOT / "tests" / "data" / "results"


def _as_json(methods):
    return {k: [list(o) for o in v] for k, v in methods.items()}


def test_sam_and_each_gnp_mix_get_the_same_tuning_budget():
    grids = tuned.select_grids()
    assert sorted(grids) == ["gnpn", "gnpp", "sam"]
    assert {len(points) for points in grids.values()} == {6}
    methods = tuned.select_methods()
    for name in grids["sam"]:
        assert dict(methods[name])["gnp.alpha"] == 1.0
    for name in grids["gnpn"] + grids["gnpp"]:
        o = dict(methods[name])
        assert o["gnp.norm_perturbations"] is name.startswith("gnpn") and 0 < o["gnp.alpha"] < 1
    assert tuned.SELECT_BASELINE in methods
    for setting in tuned.SETTINGS.values():  # both stages' configs load; the selection's evaluates held-out images
        held = config.load(setting.recipe, [*setting.sets, f"data.holdout={tuned.HOLDOUT}"])
        assert held.data.holdout == tuned.HOLDOUT > 0


def test_final_methods_follow_the_selection():
    selection = {
        "methods": _as_json(tuned.select_methods()),
        "selected": {
            "sam": {"method": "sam-r0.4"},
            "gnpn": {"method": "gnpn-r0.2-alpha0.8"},
            "gnpp": {"method": "gnpp-r0.05-alpha0.5"},
        },
    }
    got = tuned.final_methods(selection)
    n = "gnpn-r0.2-alpha0.8"
    assert list(got) == ["sgd", "sam-r0.4", n, "gnpp-r0.05-alpha0.5", f"{n}-reuse4", f"{n}-every4"]
    assert got["sgd"] == (("gnp.alpha", 0.0),)
    assert got["sam-r0.4"] == (("gnp.alpha", 1.0), ("gnp.r", 0.4))
    assert got[n] == (("gnp.norm_perturbations", True), ("gnp.r", 0.2), ("gnp.alpha", 0.8))
    assert got[f"{n}-reuse4"] == got[n] + (("gnp.every", 4), ("gnp.reuse", "looksam"))
    assert got[f"{n}-every4"] == got[n] + (("gnp.every", 4),)
    del selection["selected"]["gnpp"]
    with pytest.raises(ConfigError, match="gnpp"):
        tuned.final_methods(selection)


@pytest.mark.parametrize("setting", sorted(tuned.SETTINGS))
def test_committed_results_are_what_the_command_runs(setting):
    s = tuned.SETTINGS[setting]
    sel = json.loads((RESULTS / f"select-{setting}" / "results.json").read_text())
    assert (sel["recipe"], sel["sets"]) == (s.recipe, [*s.sets, f"data.holdout={tuned.HOLDOUT}"])
    assert sel["methods"] == _as_json(tuned.select_methods())
    assert sel["evaluated_on"].startswith("held-out") and set(sel["selected"]) == set(tuned.select_grids())
    final = json.loads((RESULTS / f"tuned-{setting}" / "results.json").read_text())
    assert (final["recipe"], final["sets"], final["evaluated_on"]) == (s.recipe, list(s.sets), "test")
    assert final["methods"] == _as_json(tuned.final_methods(sel))
    assert len(final["seeds"]) >= 5 and final["paired"]["baseline"] == "sgd"
    assert all(len(runs) == len(final["seeds"]) for runs in final["runs"].values())


@pytest.mark.slow
def test_tuned_runs_selection_then_final_on_real_data(tmp_path, monkeypatch, capsys):
    """Both stages end to end on 500 real training images (a 2-point SAM grid, 1-point GNP grids, 1 epoch): the
    selection evaluates on held-out images, the final stage trains what the selection chose."""
    monkeypatch.setattr(
        tuned,
        "SETTINGS",
        {
            "tiny": tuned.Setting(
                "debug-cpu",
                (
                    "data.loader=memory",
                    f"data.path=fashion-mnist:{FMNIST}",
                    "data.limit=500",
                    "data.augment=none",
                    "loop.epochs=1",
                ),
            )
        },
    )
    monkeypatch.setattr(
        tuned,
        "SELECT_GRIDS",
        ("sam:gnp.r=0.05,0.1", "gnpn:gnp.r=0.1", "gnpn:gnp.alpha=0.5", "gnpp:gnp.r=0.1", "gnpp:gnp.alpha=0.5"),
    )
    monkeypatch.setattr(tuned.signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    parser = argparse.ArgumentParser()
    tuned.add_arguments(parser)
    args = parser.parse_args(["--setting", "tiny", "--seeds", "1", "--out-root", str(tmp_path)])
    assert tuned.run(args) == 0, capsys.readouterr().err[-3000:]
    sel = json.loads((tmp_path / "select-tiny" / "results.json").read_text())
    assert sel["evaluated_on"].startswith("held-out") and len(sel["runs"]) == 4
    best_sam = min(("sam-r0.05", "sam-r0.1"), key=lambda m: sel["runs"][m][0]["test_error"])
    assert sel["selected"]["sam"]["method"] == best_sam
    final = json.loads((tmp_path / "tuned-tiny" / "results.json").read_text())
    assert final["evaluated_on"] == "test"
    assert list(final["methods"]) == [
        "sgd",
        best_sam,
        "gnpn-r0.1-alpha0.5",
        "gnpp-r0.1-alpha0.5",
        "gnpn-r0.1-alpha0.5-reuse4",
        "gnpn-r0.1-alpha0.5-every4",
    ]
    for method, runs in final["runs"].items():
        cfg = yaml.safe_load((tmp_path / "tuned-tiny" / method / "seed0" / "config.yaml").read_text())
        assert cfg["data"]["holdout"] == 0 and dict(final["methods"][method])["gnp.alpha"] == cfg["gnp"]["alpha"]
        assert 0 < runs[0]["test_error"] < 100
