"""End to end on real (small) Fashion-MNIST: single process, 2-process torchrun with checkpoint + resume,
evaluation of a run, refusal of a foreign run directory, and bad inputs exiting 2 with one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, run_torchrun


def records(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    return [r for r in recs if kind is None or r["kind"] == kind]


def common(ds, run_dir, *extra):
    return [
        "train",
        "--recipe",
        "debug-cpu",
        "--set",
        f"data.path={ds}",
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "data.augment=none",
        *[a for x in extra for a in ("--set", x)],
    ]


def test_single_process_run_writes_config_metrics_checkpoint(fmnist_small, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(*common(fmnist_small, run_dir, "loop.epochs=1", "loop.log_every=4", "gnp.hybrid_p=0.5"))
    assert res.returncode == 0, res.stderr
    assert "final top-1 accuracy" in res.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["gnp"]["hybrid_p"] == 0.5 and "git_commit" in saved
    train = records(run_dir, "train")
    assert train and all(math.isfinite(v) for r in train for v in r.values() if isinstance(v, float))
    # hybrid: both kinds of steps happened, and GNP ones report the perturbed loss and ||g1||
    last = records(run_dir, "done")[0]
    assert 0 < last["gnp_steps"] < last["steps"] == 500 // 32
    assert any("loss_perturbed" in r and "g1_norm" in r for r in train if r["gnp"])
    ev = records(run_dir, "eval")[-1]
    assert ev["images"] == 500  # every validation image exactly once
    assert list((run_dir / "checkpoints").glob("step-*/manifest.json"))
    # `trainer eval` of the finished run reloads the final checkpoint and reproduces the last evaluation.
    res = run_cli("eval", "--run", str(run_dir))
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert again["step"] == last["steps"] and again["images"] == 500
    assert again["top1"] == pytest.approx(ev["top1"]) and again["eval_loss"] == pytest.approx(ev["eval_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_processes_checkpoint_then_resume(fmnist_small, tmp_path):
    run_dir = tmp_path / "run"
    steps_per_epoch = 500 // 32  # global batch 32 over 2 ranks, drop_last on train
    # Run 1 stops after the first epoch's checkpoint (max_steps), like a preempted job.
    res = run_torchrun("-m", "trainer", *common(fmnist_small, run_dir, f"loop.max_steps={steps_per_epoch}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(records(run_dir, "eval")) == 1
    ck = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in ck] == [f"step-{steps_per_epoch:09d}"]
    # Run 2 (same config, max_steps may change) resumes at epoch 1 and finishes epoch 2.
    res = run_torchrun("-m", "trainer", *common(fmnist_small, run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    starts = records(run_dir, "start")
    assert starts[0]["resumed_from_step"] is None and starts[1]["resumed_from_step"] == steps_per_epoch
    assert starts[1]["world_size"] == 2
    done = records(run_dir, "done")[-1]
    assert done["steps"] == 2 * steps_per_epoch and done["epochs"] == 2
    train2 = [r for r in records(run_dir, "train") if r["step"] > steps_per_epoch]
    assert train2 and min(r["epoch"] for r in train2) > 1.0  # no step of epoch 1 was redone
    evals = records(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and all(e["images"] == 500 for e in evals)

    # `eval --run` evaluates the latest checkpoint over the full validation set, on 2 ranks as well
    # (positional: torchrun's own parser would take `--run` for an abbreviation of its `--run-path`)
    res = run_torchrun("-m", "trainer", "eval", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["images"] == 500 and out["step"] == 2 * steps_per_epoch
    assert out["top1"] == pytest.approx(evals[-1]["top1"])


def test_foreign_run_dir_is_refused_then_fresh_moves_it_aside(fmnist_small, tmp_path):
    run_dir = tmp_path / "run"
    args = common(fmnist_small, run_dir, "loop.max_steps=2", "loop.epochs=1")
    assert run_cli(*args).returncode == 0
    res = run_cli(*args, "--set", "gnp.alpha=0.5")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: run.dir:") and "gnp.alpha: 0.8 -> 0.5" in res.stderr
    res = run_cli(*args, "--set", "gnp.alpha=0.5", "--set", "run.fresh=true")
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.glob("run.old-*/config.yaml"))  # the old run was kept, not deleted


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_bad_dataset_exits_2_with_one_line(fmnist_small, tmp_path, damage):
    ds = tmp_path / "ds"
    shutil.copytree(fmnist_small, ds)
    beton = ds / "train.beton"
    if damage == "truncated":
        beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 3])
    elif damage == "garbage":
        beton.write_bytes(b"\x00garbage" * 1000)
    else:
        beton.unlink()
    res = run_cli(*common(ds, tmp_path / "run"))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.beton" in lines[0], res.stderr[-2000:]


def test_import_direction():
    """config -> dist -> data -> models -> optim -> loop -> checkpoint/metrics; only train.py wires them. Leaf
    modules that import nothing of the trainer come first (exits, validate) or right before their one user
    (progress, under metrics)."""
    import ast
    from pathlib import Path

    order = ["exits", "validate", "config", "dist", "data", "models", "optim", "loop", "storage", "checkpoint"]
    order += ["progress", "metrics"]
    pkg = Path(__file__).resolve().parents[1] / "trainer"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).parts
        top = rel[0].removesuffix(".py")
        if top not in order:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer."):
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names if a.name.startswith("trainer.")]
            for m in mods:
                dep = m.split(".")[1]
                if dep == top:
                    continue
                assert (
                    dep in order
                    and order.index(dep) < order.index(top)
                    and not (top in ("checkpoint", "metrics") and dep in ("checkpoint", "metrics"))
                    and not (top == "progress" and dep == "checkpoint")
                ), f"{path.relative_to(pkg)} imports {m}: against the data-flow order"
    # Tools (trainer/bench, trainer/study) stand on the core: they import it and their own package, never the
    # other tool; no core module imports a tool (only the CLI, __main__.py, mounts `plot` and `compare`).
    tools = ("bench", "study")
    assert all((pkg / t / "__init__.py").is_file() for t in tools)
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).parts
        top = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # absolute name of `from X import a, b` (relative X resolved against the file's package);
                # `from trainer import bench` names the module in its imported names
                base = ["trainer", *rel[:-1]][: len(rel) - node.level + 1] if node.level else []
                full = ".".join(base + (node.module.split(".") if node.module else []))
                mods = [f"{full}.{a.name}" for a in node.names] if full.count(".") == 0 else [full]
            else:
                continue
            for m in mods:
                dep = m.split(".")[1] if m.startswith("trainer.") else None
                if dep in tools and dep != top:
                    assert top == "__main__", f"{path.relative_to(pkg)} imports the tool {m}"
    # the GNP optimizer and the models are plain PyTorch: the optimizer's core and plug-ins import only each
    # other (relatively, so a copy of these files works outside the package), never the trainer package
    plain = ("gnp", "passes", "reuse", "grads")
    for name in plain:
        src = (pkg / "optim" / f"{name}.py").read_text()
        assert "from trainer" not in src and "import trainer" not in src, name
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in plain, f"optim/{name}.py imports .{node.module}"


def _import_graph(pkg: Path, name: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports, module-level and inside functions alike (ast): `from . import
    x` counts as importing x, `from .x import y` as importing x (or x.y when that is a module)."""
    import ast

    files = {}
    for path in pkg.rglob("*.py"):
        files[".".join((name, *path.relative_to(pkg).with_suffix("").parts)).removesuffix(".__init__")] = path
    graph = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                full = ".".join(base + (node.module.split(".") if node.module else []))
                names = [full, *(f"{full}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[mod]):
            if dep in path:
                return path[path.index(dep) :] + [dep]
            if dep not in done:
                found = visit(dep, path + [dep])
                if found:
                    return found
        done.add(mod)
        return None

    for mod in sorted(graph):
        found = None if mod in done else visit(mod, [mod])
        if found:
            return found
    return None


@pytest.mark.parametrize("folder, name", [("trainer", "trainer"), ("k8s/gnpk8s", "gnpk8s")])
def test_no_import_cycles(folder, name):
    """trainer/ and the Kubernetes package k8s/gnpk8s import acyclically, counting imports inside functions: a
    deferred import that closes a cycle still ties the two modules into one (and hides the order they need)."""
    graph = _import_graph(Path(__file__).resolve().parents[1] / folder, name)
    assert len(graph) > 5 and _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({**graph, f"{name}.a": {f"{name}.b"}, f"{name}.b": {f"{name}.a"}})  # the check can fail


def test_memory_loader_trains_bitwise_like_the_ffcv_loader(fmnist_small, tmp_path):
    """data.loader=memory reads the raw Fashion-MNIST files itself; without augmentation its batches equal the
    FFCV pipeline's, so one epoch of GNP must end in the same weights, bit for bit."""
    import torch

    weights = {}
    for loader, path in (("ffcv", str(fmnist_small)), ("memory", "fashion-mnist:/usr/share/datasets/fashion-mnist")):
        run_dir = tmp_path / loader
        extra = ["data.limit=500"] if loader == "memory" else []
        res = run_cli(*common(path, run_dir, f"data.loader={loader}", "loop.epochs=1", *extra))
        assert res.returncode == 0, res.stderr[-3000:]
        assert records(run_dir, "eval")[-1]["images"] == 500
        (ckpt,) = (run_dir / "checkpoints").glob("step-*/state.pt")
        weights[loader] = torch.load(ckpt, weights_only=True)["model"]
    assert weights["ffcv"].keys() == weights["memory"].keys()
    assert all(torch.equal(weights["ffcv"][k], weights["memory"][k]) for k in weights["ffcv"])


def test_memory_loader_bad_source_and_limit_exit_2(tmp_path):
    for sets, match in [
        (["data.loader=memory", "data.path=mnist:/nowhere"], "data.path"),
        (["data.loader=ffcv", "data.path=x", "data.limit=5"], "data.limit"),
        (["data.loader=ffcv", "data.path=x", "data.label_noise=0.2"], "data.label_noise"),
        (["data.loader=memory", "data.path=synthetic:8x8:2:10", "data.label_noise=1"], "data.label_noise"),
    ]:
        res = run_cli(
            "train",
            "--recipe",
            "debug-cpu",
            "--set",
            f"run.dir={tmp_path / 'r'}",
            *[a for s in sets for a in ("--set", s)],
        )
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and match in res.stderr, res.stderr
        assert not (tmp_path / "r").exists()


def test_loader_facts_split_the_global_batch_over_the_ranks():
    import torch

    from trainer.config import ConfigError, from_dict
    from trainer.dist import DistEnv
    from trainer.train import loader_facts

    env = DistEnv(rank=1, local_rank=1, world_size=4, device=torch.device("cpu"))
    facts = loader_facts(from_dict({"loop": {"batch_size": 128, "seed": 7, "channels_last": False}}), env)
    assert (facts.batch_size, facts.eval_batch_size, facts.seed, facts.rank, facts.world_size) == (32, 32, 7, 1, 4)
    assert facts.device == env.device and facts.channels_last is False
    facts = loader_facts(
        from_dict({"loop": {"batch_size": 10, "batch_size_mode": "per_rank", "eval_batch_size": 50}}), env
    )
    assert (facts.batch_size, facts.eval_batch_size, facts.channels_last) == (10, 50, True)
    with pytest.raises(ConfigError, match="loop.batch_size: invalid value 130; expected a multiple of the world size"):
        loader_facts(from_dict({"loop": {"batch_size": 130}}), env)


def test_eval_reproduces_the_final_evaluation_with_the_run_s_float32_math(tmp_path):
    """`trainer eval` of a finished run gives the run's own final evaluation (same checkpoint, same images), and
    sets up the fp32 math the run trained with (loop.precision=tf32 allows TF32 matmuls) before evaluating."""
    import torch

    from tests.conftest import FMNIST
    from trainer.train import evaluate_run

    run_dir = tmp_path / "run"
    res = run_cli(
        *common(f"fashion-mnist:{FMNIST}", run_dir, "data.loader=memory", "data.limit=256", "loop.epochs=1"),
        "--set",
        "loop.precision=tf32",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    final = records(run_dir, "eval")[-1]
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = evaluate_run(str(run_dir))
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert out["step"] == records(run_dir, "done")[-1]["steps"]
    assert (out["top1"], out["images"]) == (final["top1"], final["images"])
    assert out["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
