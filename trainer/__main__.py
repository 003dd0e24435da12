"""Command line: `python -m trainer {train,convert,eval,plot,compare,tuned,nested,recipes,models,config}`.

Also installed as the `gnp-train` script.

User errors (bad config, bad dataset, unknown recipe, wrong S3 credentials) print one line `error: ...` and
exit with status 2, which Kubeflow's ExitCode restart policy treats as permanent; storage outages exit 200
(>= 128: retryable); a run that crashed too often from the same checkpoint refuses to start with one line
from rank 0 and exit 3 (permanent; trainer/crash_budget.py). Set GNP_TRACEBACK=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.crash_budget import CrashLoopError
from trainer.exits import EXIT_CRASH_LOOP, EXIT_RETRYABLE  # EXIT_RETRYABLE: storage outage, retryable (>= 128)
from trainer.exits import EXIT_USER as EXIT_USAGE  # configuration or data error: permanent (1-127)
from trainer.storage import StorageError


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line `error: ...` (no usage block), like every other user error here;
    the status stays argparse's 2. Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m trainer",
        description="Train image models with Gradient Norm Penalty (GNP) on FFCV data; run under torchrun for DDP.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a recipe (resumes from the run directory's latest checkpoint)")
    t.add_argument("--recipe", required=True, help="recipe name (see `recipes`) or path to a YAML file")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable); values parse as YAML",
    )

    c = sub.add_parser("convert", help="write a dataset as FFCV train.beton/val.beton + meta.json")
    from trainer.data.convert import add_arguments

    add_arguments(c)

    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run directory")
    e.add_argument("--run", dest="run_dir", help="run directory written by `train`")
    # Positional form for torchrun: its own parser takes `--run` for an abbreviation of `--run-path`.
    e.add_argument("run_pos", nargs="?", metavar="RUN_DIR", help="the run directory, positionally")
    e.add_argument("--data", default=None, help="dataset folder, if it moved since training")

    pl = sub.add_parser("plot", help="overlay the curves of run directories into one PNG")
    from trainer.study.plot import add_arguments as plot_arguments

    plot_arguments(pl)

    cmp = sub.add_parser("compare", help="train methods x seeds on one recipe, then a table and a plot")
    from trainer.study.compare import add_arguments as compare_arguments

    compare_arguments(cmp)

    tu = sub.add_parser("tuned", help="tune SAM and GNP on held-out images alike, then compare on the test set")
    from trainer.study.tuned import add_arguments as tuned_arguments

    tuned_arguments(tu)

    ne = sub.add_parser("nested", help="one r x alpha grid with SAM inside it: does an interior alpha beat alpha = 1?")
    from trainer.study.nested import add_arguments as nested_arguments

    nested_arguments(ne)

    sub.add_parser("recipes", help="list the built-in recipes")
    sub.add_parser("models", help="list the registered models")
    sub.add_parser("config", help="list every config key with its default and meaning")
    return p


def main(argv: list[str] | None = None) -> int:
    from trainer.lifeline import die_with_parent, under_torchrun

    if under_torchrun():  # a rank must not outlive a killed torchrun agent (trainer/lifeline.py)
        die_with_parent()
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CrashLoopError as e:  # rank 0 says why; the other ranks exit with the same status, quietly
        if str(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CRASH_LOOP
    except ValueError as e:  # ConfigError and the data layer's input errors are ValueErrors
        if os.environ.get("GNP_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except StorageError as e:  # an outage a restart can cure: retryable under PyTorchJob's ExitCode policy
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from trainer import config

    if args.command == "recipes":
        print(
            f"{'recipe':26s} {'model':28s} {'data':18s} {'epochs':>6s} {'batch':>5s} {'r':>5s} {'alpha':>5s}"
            "  description"
        )
        for name, desc in config.list_recipes().items():
            c = config.load(name)
            print(
                f"{name:26s} {c.model.name:28s} {c.data.path.rsplit('/', 1)[-1]:18s} {c.loop.epochs:6d} "
                f"{c.loop.batch_size:5d} {c.gnp.r:5g} {c.gnp.alpha:5g}  {desc}"
            )
        return 0
    if args.command == "config":
        for key, default, doc in config.describe():
            print(f"{key:32s} {default:14s} {doc}")
        return 0
    if args.command == "models":
        from trainer.models import list_models

        print("\n".join(list_models()))
        return 0
    if args.command == "plot":
        from trainer.study.plot import run as plot_run

        return plot_run(args)
    if args.command == "compare":
        from trainer.study.compare import run as compare_run

        return compare_run(args)
    if args.command == "tuned":
        from trainer.study.tuned import run as tuned_run

        return tuned_run(args)
    if args.command == "nested":
        from trainer.study.nested import run as nested_run

        return nested_run(args)
    if args.command == "convert":
        from trainer.data.convert import run

        return run(args)
    if args.command == "eval":
        from trainer.train import evaluate_run

        run_dir = args.run_dir or args.run_pos
        if not run_dir:
            raise config.ConfigError("eval: missing the run directory; expected --run DIR (or DIR)")
        evaluate_run(run_dir, {"data.path": args.data} if args.data else None)
        return 0
    cfg = config.load(args.recipe, args.overrides)
    from trainer.train import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"final top-1 accuracy {100 * summary['top1']:.2f}% | top-5 {100 * summary['top5']:.2f}% | "
            f"{summary['steps']} steps ({summary['gnp_steps']} GNP) | wall {summary['wall_s']:.0f} s | "
            f"run dir {summary['run_dir']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
