"""Bad input, as a table: every case must end with exit status 2, exactly one line `error: ...` on stderr that
names the key or file and says what is allowed, no traceback, and NO file created, changed or removed.

Each case runs the real command line (`trainer.__main__.main`, or k8s/render.py in a child process) with its
working directory in a fresh workspace; the workspace and the dataset it reads are snapshotted (every path, its
type, size, mode, mtime and content hash) before and after. The cases cover configs, recipes, `--set`,
datasets, world sizes, run directories, local and S3 checkpoint locations, metrics ports, `eval` and job specs.
Every check must run before the run directory is touched: a failed start leaves it as it was, so the corrected
command then runs (tested at the end).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import FMNIST, ROOT, cli_env, run_cli, run_torchrun
from trainer.config import load, to_dict


@dataclass
class Ctx:
    ws: Path  # the workspace: the working directory, run directories live here
    ds: Path  # a converted 500-image Fashion-MNIST (read-only for the cases)
    request: pytest.FixtureRequest
    env: dict = field(default_factory=dict)

    def train(self, *sets: str, recipe: str = "debug-cpu", run_dir: str | None = None) -> list[str]:
        base = [f"data.path={self.ds}", f"run.dir={run_dir or self.ws / 'run'}", *sets]
        return ["train", "--recipe", recipe, *[a for s in base for a in ("--set", s)]]

    def memory(self, *sets: str) -> list[str]:
        return self.train("data.loader=memory", f"data.path=fashion-mnist:{FMNIST}", "data.augment=none", *sets)

    def recipe(self, text: str) -> str:
        path = self.ws / "recipe.yaml"
        path.write_text(text)
        return str(path)

    def dataset_copy(self) -> Path:
        out = self.ws / "ds"
        shutil.copytree(self.ds, out)
        return out

    def saved_config(self, text: str | None = None, **changes) -> Path:
        """ws/run/config.yaml as a run of debug-cpu (with `changes`) would have written it, or `text`."""
        run = self.ws / "run"
        run.mkdir(exist_ok=True)
        if text is None:
            data = to_dict(load("debug-cpu", [f"data.path={self.ds}", f"run.dir={run}"]))
            for key, value in changes.items():
                section, name = key.split("__")
                data[section][name] = value
            text = yaml.safe_dump(data, sort_keys=False)
        (run / "config.yaml").write_text(text)
        return run

    def s3(self):
        server = self.request.getfixturevalue("s3_env")
        return server


def _busy_port(ctx: Ctx) -> list[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    ctx.request.addfinalizer(sock.close)
    port = sock.getsockname()[1]
    return ctx.train("metrics.prometheus=true", "metrics.addr=127.0.0.1", f"metrics.port={port}")


def _s3_missing_bucket(ctx: Ctx) -> list[str]:
    ctx.s3()
    return ctx.train(f"checkpoint.uri=s3://missing-{uuid.uuid4().hex[:8]}/run")


def _s3_wrong_key(ctx: Ctx) -> list[str]:
    server = ctx.s3()
    bucket = server.create_bucket()
    ctx.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    return ctx.train(f"checkpoint.uri=s3://{bucket}/run")


def _truncated_beton(ctx: Ctx) -> list[str]:
    ds = ctx.dataset_copy()
    beton = ds / "train.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    return ctx.train(f"data.path={ds}")


def _bad_meta(ctx: Ctx) -> list[str]:
    ds = ctx.dataset_copy()
    (ds / "meta.json").write_text("{not json")
    return ctx.train(f"data.path={ds}")


def _file(ctx: Ctx, name: str) -> Path:
    path = ctx.ws / name
    path.write_text("a file, not a folder")
    return path


def _job_spec(ctx: Ctx, text: str) -> list[str]:
    spec = ctx.ws / "job.yaml"
    spec.write_text(text)
    return ["render", "render", str(spec)]


def _eval_config_not_utf8(ctx: Ctx) -> list[str]:
    run = ctx.saved_config()
    (run / "config.yaml").write_bytes(b"loop: {}\n# \xff\n")
    return ["eval", "--run", str(run)]


def _recipe_bytes(ctx: Ctx, data: bytes) -> str:
    path = ctx.ws / "recipe.yaml"
    path.write_bytes(data)
    return str(path)


def _recipe_folder(ctx: Ctx) -> list[str]:
    (ctx.ws / "recipe.yaml").mkdir()
    return ctx.train(recipe=str(ctx.ws / "recipe.yaml"))


def _recipe_broken_link(ctx: Ctx) -> list[str]:
    (ctx.ws / "recipe.yaml").symlink_to(ctx.ws / "gone.yaml")
    return ctx.train(recipe=str(ctx.ws / "recipe.yaml"))


def _recipe_fifo(ctx: Ctx) -> list[str]:
    os.mkfifo(ctx.ws / "recipe.yaml")  # reading it would block forever: must be refused unread
    return ctx.train(recipe=str(ctx.ws / "recipe.yaml"))


def _fresh(ctx: Ctx, run_dir: str) -> list[str]:
    """run.fresh=true on an existing run (a config.yaml in the working directory) at `run_dir`."""
    (ctx.ws / "config.yaml").write_text("recipe: debug-cpu\n")
    return ctx.train("run.fresh=true", run_dir=run_dir)


# S3 URIs a server refuses on every request: refused before any connection (the endpoint is a closed port,
# so a check that connected would fail differently, and slowly).
NO_S3 = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
DEEP = "[" * 3000 + "]" * 3000  # a RecursionError in PyYAML's composer without the depth check
BIG = str(10**20)  # beyond int64

# (id, build argv from the context, extra environment, fragments the one line must contain)
Case = tuple[str, Callable[[Ctx], list[str]], dict, tuple[str, ...]]
CASES: list[Case] = [
    # recipes and --set
    ("recipe-unknown", lambda c: ["train", "--recipe", "debug-cpux"], {}, ("--recipe", "did you mean 'debug-cpu'")),
    ("recipe-file-missing", lambda c: ["train", "--recipe", str(c.ws / "none.yaml")], {}, ("--recipe", "none.yaml")),
    ("recipe-invalid-yaml", lambda c: c.train(recipe=c.recipe("loop: [1,\n")), {}, ("recipe.yaml", "not valid YAML")),
    (
        "recipe-duplicate-section",
        lambda c: c.train(recipe=c.recipe("loop:\n  epochs: 1\nloop:\n  epochs: 2\n")),
        {},
        ("recipe.yaml", "line 3", "duplicate key 'loop'", "once"),
    ),
    (
        "recipe-duplicate-key",
        lambda c: c.train(recipe=c.recipe("model:\n  name: resnet_debug\nloop:\n  epochs: 1\n  epochs: 2\n")),
        {},
        ("recipe.yaml", "line 5", "duplicate key 'epochs'", "first at line 4"),
    ),
    (
        "recipe-duplicate-flow",
        lambda c: c.train(recipe=c.recipe("model: {name: resnet_debug, name: vgg_debug}\n")),
        {},
        ("recipe.yaml", "duplicate key 'name'"),
    ),
    ("recipe-not-mapping", lambda c: c.train(recipe=c.recipe("- a\n- b\n")), {}, ("recipe.yaml", "mapping")),
    (
        "recipe-unknown-section",
        lambda c: c.train(recipe=c.recipe("loops:\n  epochs: 1\n")),
        {},
        ("loops", "did you mean 'loop'", "allowed"),
    ),
    ("set-unknown-key", lambda c: c.train("loop.epoch=1"), {}, ("loop.epoch", "did you mean 'epochs'")),
    ("set-no-equals", lambda c: c.train("loop.epochs"), {}, ("--set", "section.key=value")),
    ("set-empty-part", lambda c: c.train("loop..epochs=1"), {}, ("--set", "empty key part")),
    ("set-wrong-type", lambda c: c.train("loop.epochs=abc"), {}, ("loop.epochs", "expected an integer")),
    ("set-not-bool", lambda c: c.train("loop.compile=3"), {}, ("loop.compile", "true or false")),
    ("set-duplicate-key", lambda c: c.train("model.kwargs={a: 1, a: 2}"), {}, ("--set", "duplicate key 'a'")),
    # values
    ("epochs-zero", lambda c: c.train("loop.epochs=0"), {}, ("loop.epochs", "integer >= 1")),
    ("lr-negative", lambda c: c.train("optim.lr=-1"), {}, ("optim.lr", ">= 0")),
    ("hybrid-p-zero", lambda c: c.train("gnp.hybrid_p=0"), {}, ("gnp.hybrid_p", "(0, 1]")),
    ("keep-one", lambda c: c.train("checkpoint.keep=1"), {}, ("checkpoint.keep", ">= 2")),
    ("uri-scheme", lambda c: c.train("checkpoint.uri=ftp://host/x"), {}, ("checkpoint.uri", "s3://bucket/prefix")),
    ("port-range", lambda c: c.train("metrics.port=70000"), {}, ("metrics.port", "1..65471")),
    ("loader-typo", lambda c: c.train("data.loader=memroy"), {}, ("data.loader", "did you mean 'memory'")),
    ("augment-memory", lambda c: c.memory("data.augment=imagenet"), {}, ("data.augment", "data.loader=memory")),
    ("label-noise-ffcv", lambda c: c.train("data.label_noise=0.1"), {}, ("data.label_noise", "data.loader=ffcv")),
    # model
    ("model-typo", lambda c: c.train("model.name=resnet_debgu"), {}, ("model.name", "did you mean 'resnet_debug'")),
    ("model-option", lambda c: c.train("model.kwargs={foo: 1}"), {}, ("model.kwargs", "'foo'", "allowed")),
    # datasets
    ("data-path-empty", lambda c: c.train("data.path="), {}, ("data.path", "missing", "convert")),
    ("data-path-missing", lambda c: c.train(f"data.path={c.ws / 'nope'}"), {}, ("nope",)),
    ("memory-source", lambda c: c.memory("data.path=fashion-mnist"), {}, ("data.path", "expected")),
    ("meta-json-damaged", _bad_meta, {}, ("meta.json",)),
    ("beton-truncated", _truncated_beton, {}, ("train.beton",)),
    ("batch-over-dataset", lambda c: c.train("loop.batch_size=4096"), {}, ("loop.batch_size", "at most 500")),
    ("batch-over-memory-dataset", lambda c: c.memory("data.limit=512", "loop.batch_size=4096"), {}, ("512",)),
    # world sizes (the checks run before the rendezvous, so one process stands for rank 0 of W)
    (
        "world-odd-batch",
        lambda c: c.train("loop.batch_size=33"),
        {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
        ("loop.batch_size", "multiple of the world size (2)"),
    ),
    (
        "world-three",
        lambda c: c.train("loop.batch_size=32"),
        {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
        ("loop.batch_size", "multiple of the world size (3)"),
    ),
    (
        "world-per-rank-share",
        lambda c: c.train("loop.batch_size_mode=per_rank", "loop.batch_size=300"),
        {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
        ("loop.batch_size", "at most 250"),
    ),
    ("world-garbage", lambda c: c.train(), {"WORLD_SIZE": "two"}, ("WORLD_SIZE", "integer")),
    # run directories
    ("run-dir-is-file", lambda c: c.train(run_dir=str(_file(c, "f"))), {}, ("run.dir", "not a folder")),
    ("run-dir-under-file", lambda c: c.train(run_dir=str(_file(c, "f") / "run")), {}, ("run.dir", "is a file")),
    (
        "run-dir-other-config",
        lambda c: (c.saved_config(loop__epochs=5), c.train())[1],
        {},
        ("run.dir", "different config", "loop.epochs: 5 -> 2", "run.fresh=true"),
    ),
    (
        "run-dir-config-damaged",
        lambda c: (c.saved_config("loop: [\n"), c.train())[1],
        {},
        ("run.dir", "config.yaml", "unreadable", "run.fresh=true"),
    ),
    (
        "run-dir-config-duplicate",
        lambda c: (c.saved_config("loop: {}\nloop: {}\n"), c.train())[1],
        {},
        ("run.dir", "duplicate key 'loop'"),
    ),
    # checkpoint locations
    (
        "checkpoint-dir-is-file",
        lambda c: c.train(f"checkpoint.uri={_file(c, 'ck')}"),
        {},
        ("checkpoint.uri", "not a folder"),
    ),
    (
        "default-checkpoint-dir-is-file",
        lambda c: ((c.ws / "run").mkdir(), _file(c, "run/checkpoints"), c.train())[2],
        {},
        ("checkpoint.uri", "checkpoints", "not a folder"),
    ),
    ("s3-no-bucket-name", lambda c: c.train("checkpoint.uri=s3:///prefix"), {}, ("checkpoint.uri", "s3://bucket")),
    ("s3-missing-bucket", _s3_missing_bucket, {}, ("NoSuchBucket", "create bucket", "checkpoint.uri")),
    ("s3-wrong-credentials", _s3_wrong_key, {}, ("s3://", "check the credentials")),
    # metrics port
    ("port-busy", _busy_port, {}, ("metrics.port", "in use", "free port")),
    (
        "port-foreign-address",
        lambda c: c.train("metrics.prometheus=true", "metrics.addr=203.0.113.7"),
        {},
        ("metrics.port", "203.0.113.7", "metrics.addr"),
    ),
    # eval
    ("eval-no-run", lambda c: ["eval"], {}, ("eval", "--run DIR")),
    ("eval-run-missing", lambda c: ["eval", "--run", str(c.ws / "none")], {}, ("--run", "no config.yaml")),
    (
        "eval-config-duplicate",
        lambda c: ["eval", "--run", str(c.saved_config("loop: {}\nloop: {}\n"))],
        {},
        ("--run", "config.yaml", "duplicate key 'loop'"),
    ),
    (
        "eval-config-not-utf8",
        _eval_config_not_utf8,
        {},
        ("--run", "config.yaml", "line 2", "not UTF-8"),
    ),
    (
        "eval-no-checkpoint",
        lambda c: ["eval", "--run", str(c.saved_config())],
        {},
        ("--run", "no complete checkpoint"),
    ),
    # issue 27: non-finite floats, refused by the config before config.yaml is written (they used to be refused
    # by GNP after it, or to train to NaN with exit 0)
    ("r-inf", lambda c: c.train("gnp.r=.inf"), {}, ("gnp.r", "invalid value inf", "a finite number")),
    ("clip-norm-nan", lambda c: c.train("optim.clip_norm=.nan"), {}, ("optim.clip_norm", "a finite number")),
    ("lr-inf", lambda c: c.train("optim.lr=.inf"), {}, ("optim.lr", "a finite number")),
    ("lr-nan-in-recipe", lambda c: c.train(recipe=c.recipe("optim: {lr: .nan}\n")), {}, ("optim.lr", "finite")),
    ("betas-inf", lambda c: c.train("optim.betas=[0.9, -.inf]"), {}, ("optim.betas[1]", "a finite number")),
    ("milestone-inf", lambda c: c.train("schedule.milestones=[.inf]"), {}, ("schedule.milestones[0]", "finite")),
    ("gr-warmup-inf", lambda c: c.train("gnp.warmup_epochs=.inf"), {}, ("gnp.warmup_epochs", "finite")),
    ("mixup-alpha-inf", lambda c: c.train("data.mixup_alpha=.inf"), {}, ("data.mixup_alpha", "finite")),
    ("model-option-nan", lambda c: c.train("model.kwargs={dropout: .nan}"), {}, ("model.kwargs.dropout", "finite")),
    # issue 27: malformed recipe files: the file, the line and what is allowed
    (
        "recipe-int-key",
        lambda c: c.train(recipe=c.recipe("loop:\n  epochs: 1\n  2: 3\n")),
        {},
        ("recipe.yaml", "line 3", "key '2' is not a string", "expected a name"),
    ),
    (
        "recipe-bool-key",
        lambda c: c.train(recipe=c.recipe("model:\n  name: resnet_debug\non: 1\n")),
        {},
        ("recipe.yaml", "line 3", "key 'on' is not a string"),
    ),
    (
        "recipe-deep",
        lambda c: c.train(recipe=c.recipe(f"loop:\n  epochs: 1\nmodel:\n  kwargs: {{a: {DEEP}}}\n")),
        {},
        ("recipe.yaml", "line 4", "nested deeper than 32 levels"),
    ),
    (
        "recipe-not-utf8",
        lambda c: c.train(recipe=_recipe_bytes(c, b"loop:\n  epochs: 1\n# caf\xe9\n")),
        {},
        ("recipe.yaml", "line 3", "not UTF-8", "byte 0xe9"),
    ),
    (
        "recipe-syntax-line",
        lambda c: c.train(recipe=c.recipe("loop:\n  epochs: 1\n  batch_size: [8\nmodel: {}\n")),
        {},
        ("recipe.yaml", "line 4", "not valid YAML", "expected a mapping of sections"),
    ),
    (
        "recipe-list-line",
        lambda c: c.train(recipe=c.recipe("# a list\n- loop\n")),
        {},
        ("recipe.yaml", "line 2", "mapping of sections", "list"),
    ),
    ("recipe-is-folder", _recipe_folder, {}, ("--recipe", "recipe.yaml", "is a folder", "expected a YAML file")),
    ("recipe-broken-link", _recipe_broken_link, {}, ("--recipe", "recipe.yaml", "broken symbolic link")),
    ("recipe-fifo", _recipe_fifo, {}, ("--recipe", "recipe.yaml", "not a regular file")),
    (
        "recipe-read-error",  # a read error even for root (EIO): chmod 000 does not stop root
        lambda c: c.train(recipe="/proc/self/mem"),
        {},
        ("--recipe", "/proc/self/mem", "cannot be read", "Input/output error"),
    ),
    (
        "recipe-bad-date",
        lambda c: c.train(recipe=c.recipe("loop:\n  epochs: 1\n  seed: 2024-13-45\n")),
        {},
        ("recipe.yaml", "line 3", "'2024-13-45' is not a date"),
    ),
    ("set-deep", lambda c: c.train(f"model.kwargs={DEEP}"), {}, ("--set", "nested deeper than 32 levels")),
    ("set-int-key", lambda c: c.train("model.kwargs={1: 2}"), {}, ("--set", "key '1' is not a string")),
    # issue 27: integers beyond int64 or a seed's range, NUL characters, run.dir that run.fresh cannot move
    ("seed-huge", lambda c: c.train(f"loop.seed={BIG}"), {}, ("loop.seed", "fits in 64 bits")),
    ("seed-negative", lambda c: c.train("loop.seed=-5"), {}, ("loop.seed", "0..4294967295")),
    ("seed-33-bits", lambda c: c.train("loop.seed=4294967296"), {}, ("loop.seed", "0..4294967295")),
    ("init-seed-negative", lambda c: c.train("loop.init_seed=-7"), {}, ("loop.init_seed", "-1 (= loop.seed)")),
    ("epochs-huge", lambda c: c.train(f"loop.epochs={BIG}"), {}, ("loop.epochs", "fits in 64 bits")),
    ("every-steps-huge", lambda c: c.train(f"checkpoint.every_steps={BIG}"), {}, ("checkpoint.every_steps", "64")),
    ("model-option-huge", lambda c: c.train(f"model.kwargs={{width: {BIG}}}"), {}, ("model.kwargs.width", "64")),
    ("image-size-huge", lambda c: c.train("data.image_size=1099511627776"), {}, ("data.image_size", "8..4096")),
    ("num-workers-huge", lambda c: c.train("data.num_workers=1099511627776"), {}, ("data.num_workers", "1..256")),
    ("run-dir-nul", lambda c: c.train('run.dir="run\\0x"'), {}, ("run.dir", "without NUL")),
    ("data-path-nul", lambda c: c.train('data.path="ds\\0"'), {}, ("data.path", "without NUL")),
    ("checkpoint-uri-nul", lambda c: c.train('checkpoint.uri="ck\\0"'), {}, ("checkpoint.uri", "without NUL")),
    ("fresh-dot", lambda c: _fresh(c, "."), {}, ("run.dir", "run.fresh=true", "'.' has no name to rename")),
    ("fresh-root", lambda c: c.train("run.fresh=true", run_dir="/"), {}, ("run.dir", "'/' has no name")),
    (
        "fresh-holds-cwd",
        lambda c: _fresh(c, str(c.ws.parent)),
        {},
        ("run.dir", "run.fresh=true", "holds the working directory"),
    ),
    ("fresh-mount-point", lambda c: c.train("run.fresh=true", run_dir="/proc"), {}, ("run.dir", "mount point")),
    # issue 27: S3 names every server refuses: permanent (exit 2), not 600 s of retried uploads and exit 200
    ("s3-bucket-upper", lambda c: c.train("checkpoint.uri=s3://Ckpt/run"), NO_S3, ("checkpoint.uri", "'Ckpt'", "3-63")),
    ("s3-bucket-short", lambda c: c.train("checkpoint.uri=s3://ab/run"), NO_S3, ("checkpoint.uri", "bucket name 'ab'")),
    ("s3-bucket-ip", lambda c: c.train("checkpoint.uri=s3://10.1.2.3/run"), NO_S3, ("checkpoint.uri", "IP address")),
    ("s3-bucket-dots", lambda c: c.train("checkpoint.uri=s3://my..ck/run"), NO_S3, ("checkpoint.uri", "'..'")),
    ("s3-bucket-underscore", lambda c: c.train("checkpoint.uri=s3://my_ck/r"), NO_S3, ("checkpoint.uri", "'my_ck'")),
    ("s3-key-dotdot", lambda c: c.train("checkpoint.uri=s3://ckpt/a/../b"), NO_S3, ("checkpoint.uri", "'a/../b'")),
    ("s3-key-dot", lambda c: c.train("checkpoint.uri=s3://ckpt/./b"), NO_S3, ("checkpoint.uri", "segment")),
    ("s3-key-empty", lambda c: c.train("checkpoint.uri=s3://ckpt/a//b"), NO_S3, ("checkpoint.uri", "empty")),
    ("s3-key-leading-slash", lambda c: c.train("checkpoint.uri=s3://ckpt//a"), NO_S3, ("checkpoint.uri", "'/a'")),
    # issue 27: compare's integer options (argparse types: one line, no usage block)
    (
        "compare-nproc-zero",
        lambda c: ["compare", "--recipe", "debug-cpu", "--out", str(c.ws / "c"), "--nproc", "0"],
        {},
        ("--nproc", "invalid value 0", "1..1024"),
    ),
    (
        "compare-seeds-zero",
        lambda c: ["compare", "--recipe", "debug-cpu", "--out", str(c.ws / "c"), "--seeds", "0"],
        {},
        ("--seeds", "1..1000"),
    ),
    # job specs (k8s/render.py reads them with the same strict loader)
    (
        "job-spec-duplicate",
        lambda c: _job_spec(c, "recipe: debug-cpu\nnodes: 1\nnodes: 2\n"),
        {},
        ("job.yaml", "line 3", "duplicate key 'nodes'"),
    ),
    ("job-spec-invalid", lambda c: _job_spec(c, "recipe: [\n"), {}, ("job.yaml", "not valid YAML")),
]


def snapshot(*roots: Path) -> dict:
    """{path: (kind, size, mode, mtime_ns, sha256)} of everything under `roots` (the roots included)."""
    out = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            kind = "dir" if path.is_dir() else "file" if path.is_file() else "other"
            out[str(path)] = (kind, st.st_size if kind == "file" else 0, st.st_mode, st.st_mtime_ns, digest)
    return out


def run_case(argv: list[str], ctx: Ctx, monkeypatch, capfd) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command line `argv` run in the workspace."""
    monkeypatch.chdir(ctx.ws)
    monkeypatch.delenv("GNP_TRACEBACK", raising=False)
    for key, value in ctx.env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    if argv[0] == "render":  # k8s/render.py is a script: run it as one
        res = subprocess.run(
            [sys.executable, str(ROOT / "k8s" / "render.py"), *argv[1:]],
            cwd=ctx.ws,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return res.returncode, res.stdout, res.stderr
    from trainer.__main__ import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture
def ctx(fmnist_small, tmp_path, request) -> Ctx:
    ws = tmp_path / "ws"
    ws.mkdir()
    return Ctx(ws=ws, ds=fmnist_small, request=request)


def test_the_table_has_at_least_40_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, monkeypatch, capfd):
    name, build, env, fragments = case
    ctx.env.update(env)
    argv = build(ctx)
    before = snapshot(ctx.ws, ctx.ds)
    status, out, err = run_case(argv, ctx, monkeypatch, capfd)
    after = snapshot(ctx.ws, ctx.ds)
    lines = err.strip().splitlines()
    assert status == 2, (status, err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert after == before, {
        k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)
    }


def test_the_corrected_command_then_runs(ctx: Ctx):
    """A start refused for a too-large batch leaves no config.yaml behind, so fixing the batch is enough
    (before, the refused start wrote config.yaml and the corrected one was refused as a different config)."""
    res = run_cli(*ctx.train("loop.batch_size=4096"), cwd=ctx.ws)
    assert res.returncode == 2 and not (ctx.ws / "run").exists(), res.stderr[-3000:]
    res = run_cli(*ctx.train("loop.max_steps=2", "loop.epochs=1"), cwd=ctx.ws)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ctx.ws / "run" / "config.yaml").is_file()


def test_issue_27_corrected_commands_then_run(ctx: Ctx):
    """A sample of the issue-27 refusals, each as its own process: exit 2, one line, no run directory; then the
    command without the bad setting trains (before, gnp.r=.inf and optim.clip_norm=.nan left a config.yaml and
    the fix was refused as "a different config")."""
    recipe = ctx.recipe("loop:\n  epochs: 1\n  2: 3\n")
    for bad in [
        ["--set", "gnp.r=.inf"],
        ["--set", "optim.clip_norm=.nan"],
        ["--set", "optim.lr=.inf"],
        ["--set", "loop.init_seed=-7"],
        ["--set", "checkpoint.uri=s3://Bad_Bucket/run"],
        ["--recipe", recipe],  # argparse keeps the last --recipe
    ]:
        res = run_cli(*ctx.train("loop.max_steps=2"), *bad, cwd=ctx.ws)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (bad, res.stderr[-3000:])
        assert not (ctx.ws / "run").exists(), bad
    res = run_cli(*ctx.train("loop.max_steps=2", "gnp.r=0.1", "optim.clip_norm=5"), cwd=ctx.ws)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ctx.ws / "run" / "config.yaml").is_file()


def test_a_failing_rank_keeps_rank_0_from_writing(ctx: Ctx):
    """Under torchrun, rank 1 alone finding its metrics port busy stops the start before anything is written:
    the checks run before the rendezvous, which rank 0 cannot pass without it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1] - 1  # rank 0 gets port (free), rank 1 port + 1 (busy)
        res = run_torchrun(
            "-m",
            "trainer",
            *ctx.train("metrics.prometheus=true", "metrics.addr=127.0.0.1", f"metrics.port={port}"),
            cwd=ctx.ws,
            timeout=300,
        )
    assert res.returncode != 0
    assert f"error: metrics.port: cannot listen on 127.0.0.1:{port + 1}" in res.stderr, res.stderr[-3000:]
    assert not (ctx.ws / "run").exists()


@pytest.mark.skipif(os.geteuid() != 0 and not shutil.which("unshare"), reason="needs unshare")
def test_read_only_run_dir_is_one_line(ctx: Ctx, fmnist_small):
    """run.dir on a read-only file system (a real read-only tmpfs in a private mount namespace)."""
    assert shutil.which("unshare"), "util-linux unshare is needed for the file-system fault tests"
    argv = " ".join(ctx.train(run_dir="/mnt/run"))
    script = f"mount -t tmpfs -o ro,size=1m tmpfs /mnt && {sys.executable} -m trainer {argv}; echo status=$?"
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    lines = res.stderr.strip().splitlines()
    assert "status=2" in res.stdout, (res.stdout, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: run.dir: '/mnt'"), res.stderr[-3000:]
    assert "read-only" in lines[0]
