"""Tuned comparison: `python -m trainer tuned --setting clean|noisy` — does GNP beat a tuned SAM and SGD here?

Two `compare` stages on one setting (a recipe plus its common overrides):

1. **Selection** on held-out training images (`data.holdout=0.2`: the test split is never read). SAM and each
   GNP update mix get the same budget, six points each: SAM over rho = r (alpha = 1); GNP over r x alpha in the
   recipes' normalised form (`gnpn`, `gnp.norm_perturbations=true`) and in the paper's (`gnpp`, false). The
   lowest mean held-out error of each grid is selected (`compare.select_best`) -> OUT/select-<setting>/.
2. **Final**, on the test set over `--seeds` seeds (paired): SGD, the three selected points, and the selected
   normalised GNP made cheaper (every-4 and reuse-4: a GNP step every 4th step, plain steps between; reuse-4
   adds the last GNP step's orthogonal part on those) -> OUT/tuned-<setting>/, paired against SGD;
   trainer/study/README.md adds the tables against the tuned SAM and GNP with
   `python -m trainer.study.compare results.json NAME`.

Both stages resume like `compare` (run the same command again). The final stage's methods come from the
selection's results.json, so the choice is the held-out data's, not the reader's.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError
from trainer.study import compare as cmp
from trainer.validate import int_arg


@dataclass(frozen=True)
class Setting:
    recipe: str
    sets: tuple[str, ...] = ()


SETTINGS: dict[str, Setting] = {
    # The CPU settings of trainer/study/README.md: 20,000 Fashion-MNIST images without augmentation (where the
    # methods separate least), and 10,000 images with 30 % symmetric label noise (where SAM-type methods are known
    # to help).
    "clean": Setting("fashion-mnist-compare-cpu", ("data.augment=none",)),
    "noisy": Setting("fashion-mnist-noisy-cpu"),
}
HOLDOUT = 0.2  # fraction of the training images the selection stage evaluates on (and does not train on)
SELECT_METHODS = "sam,gnpn,gnpp"
SELECT_DEFINES = ("gnpn:gnp.norm_perturbations=true", "gnpp:gnp.norm_perturbations=false")
# Six points per method: SAM's one knob spans a wider range than each of GNP's two.
SELECT_GRIDS = (
    "sam:gnp.r=0.025,0.05,0.1,0.2,0.4,0.8",
    "gnpn:gnp.r=0.05,0.2,0.8",
    "gnpn:gnp.alpha=0.5,0.8",
    "gnpp:gnp.r=0.05,0.2,0.8",
    "gnpp:gnp.alpha=0.5,0.8",
)
SELECT_BASELINE = "sam-r0.1"  # the recipes' r under SAM: the selection table's paired column (not the selection)
CHEAPER = (
    ("reuse4", (("gnp.every", 4), ("gnp.reuse", "looksam"))),
    ("every4", (("gnp.every", 4),)),
)


def select_methods() -> dict[str, tuple[tuple[str, object], ...]]:
    return cmp.resolve_methods(SELECT_METHODS, list(SELECT_DEFINES), list(SELECT_GRIDS))


def select_grids() -> dict[str, list[str]]:
    return cmp.grid_families(SELECT_GRIDS)


def final_methods(selection: dict) -> dict[str, tuple[tuple[str, object], ...]]:
    """The final stage's methods from a selection's results.json: sgd, the selected point of each grid (its
    overrides as selected), then the selected normalised GNP with every CHEAPER variant's overrides added."""
    chosen = selection.get("selected", {})
    missing = [g for g in select_grids() if g not in chosen]
    if missing:
        raise ConfigError(f"selection results: no selected point for grid(s) {', '.join(missing)}; rerun selection")
    methods: dict[str, tuple[tuple[str, object], ...]] = {"sgd": cmp.METHODS["sgd"].overrides}
    for grid in select_grids():
        name = chosen[grid]["method"]
        methods[name] = tuple((k, v) for k, v in selection["methods"][name])
    gnp = chosen["gnpn"]["method"]
    for suffix, extra in CHEAPER:
        methods[f"{gnp}-{suffix}"] = methods[gnp] + extra
    return methods


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", required=True, choices=sorted(SETTINGS), help="which CPU setting to tune and compare")
    p.add_argument(
        "--seeds", type=int_arg(1, cmp.MAX_CLI_SEEDS), default=5, help="seeds per method in the final stage (default 5)"
    )
    p.add_argument(
        "--select-seeds",
        type=int_arg(1, cmp.MAX_CLI_SEEDS),
        default=1,
        help="seeds per grid point in the selection (default 1)",
    )
    p.add_argument("--out-root", default="runs", help="parent of select-<setting>/ and tuned-<setting>/ (default runs)")
    p.add_argument("--nproc", type=int_arg(1, cmp.MAX_NPROC), default=1, help="processes per run (torchrun when > 1)")


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, cmp.stop_on_sigterm)
    setting = SETTINGS[args.setting]
    root = Path(args.out_root)
    select_out = root / f"select-{args.setting}"

    def log(m: str) -> None:
        print(m, flush=True)

    try:
        selection = cmp.compare(
            recipe=setting.recipe,
            methods=select_methods(),
            seeds=args.select_seeds,
            out=select_out,
            sets=[*setting.sets, f"data.holdout={HOLDOUT}"],
            nproc=args.nproc,
            baseline=SELECT_BASELINE,
            grids=select_grids(),
            log=log,
        )
        cmp.compare(
            recipe=setting.recipe,
            methods=final_methods(selection),
            seeds=args.seeds,
            out=root / f"tuned-{args.setting}",
            sets=list(setting.sets),
            nproc=args.nproc,
            baseline="sgd",
            log=log,
        )
    except cmp.TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code if 0 < e.code < 256 else 1
    return 0
