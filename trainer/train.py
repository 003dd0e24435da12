"""Entry point that wires config -> dist -> data -> model -> GNP -> loop -> checkpoint/metrics.

Run it on one process or under torchrun, identically:
    python -m trainer train --recipe fashion-mnist-demo
    torchrun --standalone --nproc_per_node=2 -m trainer train --recipe fashion-mnist-demo --set loop.epochs=2
This is the only module that sees the whole RunConfig: each component is built from its own section
(`Checkpointer.from_config`, `build_data`, `StepPolicy.from_config`, `build_sink`), and what a checkpoint
holds is one `RunState` (trainer/run_state.py) with `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import crash_budget, dist
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.config import (
    ConfigError,
    RunConfig,
    config_differences,
    from_dict,
    read_text_file,
    strict_yaml_load,
    to_dict,
)
from trainer.data import LoaderFacts, build_data, validate_dataset
from trainer.loop import (
    LoopState,
    LossSpec,
    StepPolicy,
    TrainContext,
    average_bn_buffers,
    evaluate,
    gnp_sub_batches,
    measure_sharpness,
    set_float32_math,
    train_epoch,
)
from trainer.metrics import build_sink
from trainer.models import create_model
from trainer.optim.factory import build_optimizer
from trainer.ownership import identity_refusal, location_of, record_identity, take
from trainer.run_state import RunState, gather_rng_states, git_commit, resume, set_rng_state
from trainer.storage import StorageError
from trainer.validate import fresh_rename_problem

# gather_rng_states, set_rng_state and git_commit moved to trainer.run_state; still importable from here.
__all__ = [
    "train",
    "evaluate_run",
    "measure_run",
    "saved_config",
    "prepare_run_dir",
    "config_differences",
    "check_data",
    "build_optimizer",
    "build_batch_augment",
    "gather_rng_states",
    "set_rng_state",
    "git_commit",
]

FINAL_UPLOAD_TIMEOUT_S = 600
# Test-only fault injection for the crash-budget drills (tests/test_crash_budget.py): "STEP[:RANK]" makes RANK
# (default: the last rank) raise at optimizer step STEP, once the checkpoints before it have landed.
FAULT_CRASH_ENV = "GNP_FAULT_CRASH_AT_STEP"


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run.dir or f"runs/{cfg.recipe or 'run'}")


def _run_dir_refusal(cfg: RunConfig) -> str:
    """Why the run directory cannot be used for `cfg` (a different config made it), or ''. Reads only."""
    path = run_dir_of(cfg)
    saved_file = path / "config.yaml"
    if cfg.run.fresh or not saved_file.is_file():
        return ""
    try:
        saved = strict_yaml_load(saved_file.read_text()) or {}
        if not isinstance(saved, dict):
            raise yaml.YAMLError(f"a {type(saved).__name__}, not a mapping")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        why = " ".join(str(getattr(e, "problem", None) or getattr(e, "strerror", None) or e).split())
        return (
            f"run.dir: {str(saved_file)!r} is unreadable ({why}); expected the config.yaml a run wrote "
            f"(use another run.dir or --set run.fresh=true)"
        )
    diffs = config_differences(saved, to_dict(cfg))
    if diffs:
        return (
            f"run.dir: {str(path)!r} was made by a different config ({'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''}); use another run.dir or --set run.fresh=true"
        )
    return ""


def folder_problem(path: str | os.PathLike) -> str:
    """What keeps this process from writing into folder `path` (creating it and its missing parents), or ''.

    Reads only: a path that is a file, a parent that is a file, a folder without write permission or on a
    read-only file system (os.access reports EROFS as not writable)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{str(p)!r} exists and is not a folder"
    anc = p
    while not anc.exists() and anc != anc.parent:  # "runs/x" ends at ".", "/a/b" at "/"
        anc = anc.parent
    if not anc.is_dir():
        return f"{str(anc)!r} (a parent of {str(p)!r}) is a file, not a folder"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"{str(anc)!r} is not writable by this user (read-only file system or no permission)"
    return ""


def preflight(cfg: RunConfig, environ: dict | None = None) -> dict | None:
    """Every check that needs no process group, before anything is written (run before dist.init()).

    The model name and options, the batch against the world size and (from meta.json) the training set, the
    run directory (a folder this user can write; made by the same config), a local checkpoint folder or the S3
    bucket, the metrics port, then the whole dataset (FFCV: meta.json and the .beton headers). A failing rank
    exits before the rendezvous, so rank 0 never reaches the first write. Raises ConfigError (or StorageConfigError /
    StorageError for the bucket) with one line; returns the FFCV meta.json dict (None for the memory loader).
    """
    environ = os.environ if environ is None else environ
    world, rank, local_rank = (_env_int(environ, n, d) for n, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    from trainer.models import model_options

    try:
        options = model_options(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {' '.join(str(e).split()).removeprefix('model: ')}") from None
    unknown = sorted(set(cfg.model.kwargs) - set(options))
    if unknown and not _takes_any_option(cfg.model.name):
        raise ConfigError(
            f"model.kwargs: unknown option(s) {', '.join(map(repr, unknown))} for {cfg.model.name!r}; "
            f"allowed: {', '.join(sorted(options)) or 'none'}"
        )
    # This process as torchrun describes it (the device does not matter to the checks).
    here = dist.DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=torch.device("cpu"))
    per_rank = _per_rank_batch(cfg, here)
    gnp_sub_batches(cfg.gnp.m, per_rank)  # gnp.m must divide the per-rank batch
    _check_batch_fits(cfg, per_rank, world, _peek_train_size(cfg))
    if rank == 0:
        if problem := folder_problem(run_dir_of(cfg)):
            raise ConfigError(f"run.dir: {problem}; expected a folder this user can write")
        if refusal := _run_dir_refusal(cfg):
            raise ConfigError(refusal)
        # run.fresh renames an existing run aside: the first write, so it must be known to work now (checked for
        # any existing folder, so that '/' or a mount point is refused on the first run, not the second).
        if cfg.run.fresh and run_dir_of(cfg).is_dir():
            if problem := fresh_rename_problem(run_dir_of(cfg)):
                raise ConfigError(
                    f"run.dir: cannot move it aside for run.fresh=true: {problem}; expected a folder below the "
                    f"working directory, not a mount point, whose parent this user can write"
                )
        if not cfg.checkpoint.uri.startswith("s3://"):
            where = cfg.checkpoint.uri or run_dir_of(cfg) / "checkpoints"
            if problem := folder_problem(where):
                raise ConfigError(f"checkpoint.uri: {problem}; expected a folder this user can write")
    from trainer.storage import LocalStorage, open_storage

    storage = LocalStorage(location_of(cfg, run_dir_of(cfg)))
    if cfg.checkpoint.uri.startswith("s3://"):
        ck = cfg.checkpoint
        storage = open_storage(  # lists the prefix once: wrong credentials or a missing bucket fail here
            ck.uri,
            endpoint_url=ck.s3_endpoint,
            region=ck.s3_region,
            retry_mode=ck.s3_retry_mode,
            max_attempts=ck.s3_max_attempts,
        )
    if rank == 0 and (refusal := identity_refusal(cfg, storage, run_dir_of(cfg))):
        raise ConfigError(refusal)  # another run's checkpoints (trainer/ownership.py)
    if cfg.metrics.prometheus:
        _check_port(cfg.metrics.addr, cfg.metrics.port + local_rank)
    # Last: validating an FFCV dataset imports FFCV and numba (seconds), the checks above take milliseconds.
    meta = check_data(cfg)
    _check_batch_fits(cfg, per_rank, world, (meta or {}).get("train_size"))
    return meta


def _peek_train_size(cfg: RunConfig) -> int | None:
    """train_size from an FFCV dataset's meta.json, read as plain JSON (no FFCV import); None if unreadable
    (check_data then says what is wrong with it)."""
    if cfg.data.loader != "ffcv" or not cfg.data.path:
        return None
    try:
        size = json.loads((Path(cfg.data.path) / "meta.json").read_text()).get("train_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_batch_fits(cfg: RunConfig, per_rank: int, world: int, train_size: int | None) -> None:
    """ConfigError when a rank's share of the training set holds no full batch (drop_last: no step at all)."""
    if isinstance(train_size, int) and per_rank > -(-train_size // world):
        most = train_size if cfg.loop.batch_size_mode == "global" else -(-train_size // world)
        raise ConfigError(
            f"loop.batch_size: invalid value {cfg.loop.batch_size}; expected at most {most} ({train_size} "
            f"training images in {cfg.data.path} over {world} rank(s)): a larger batch leaves an epoch without one"
        )


def _env_int(environ, name: str, default: int) -> int:
    value = environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or (name == "WORLD_SIZE" and int(value) < 1):
        raise ConfigError(f"environment variable {name}={value!r}: expected a non-negative integer (set by torchrun)")
    return int(value)


def _takes_any_option(name: str) -> bool:
    import inspect

    from trainer.models.registry import _lookup

    params = inspect.signature(_lookup(name)).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_port(addr: str, port: int) -> None:
    """ConfigError when `addr:port` cannot be bound now (in use, or an address of no interface here)."""
    import socket

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # prometheus_client's server (an http.server.HTTPServer) sets SO_REUSEADDR too: a port in TIME_WAIT is
        # free for it, one that a process listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError as e:
            raise ConfigError(
                f"metrics.port: cannot listen on {addr}:{port} ({e.strerror or e}); expected a free port "
                f"(rank r of a node uses metrics.port + r) on an address of this host (metrics.addr)"
            ) from None


def prepare_run_dir(cfg: RunConfig, env: dist.DistEnv) -> Path:
    """Create the run directory (rank 0), refusing one made by a different config unless run.fresh.

    With run.fresh an existing directory is renamed aside (<dir>.old-<time>), never deleted.
    All ranks return the same answer or raise the same ConfigError.
    """
    path = run_dir_of(cfg)
    error = ""
    if env.is_primary:
        saved_file = path / "config.yaml"
        current = to_dict(cfg)
        if saved_file.is_file() and cfg.run.fresh:
            aside = path.with_name(f"{path.name}.old-{datetime.datetime.now():%Y%m%d-%H%M%S}")
            path.rename(aside)
            print(f"run.fresh: moved the old run directory to {aside}", file=sys.stderr)
        else:
            error = _run_dir_refusal(cfg)
        if not error:
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / ".config.yaml.tmp"
            tmp.write_text(yaml.safe_dump({**current, "git_commit": git_commit()}, sort_keys=False))
            os.replace(tmp, saved_file)
    error = dist.broadcast_object(error, env)
    if error:
        raise ConfigError(error)
    return path


def check_data(cfg: RunConfig) -> dict | None:
    """Fail fast (one line, exit 2) on a missing or malformed dataset, without reading the images; returns
    the FFCV dataset's meta.json (None for the memory loader)."""
    d = cfg.data
    if not d.path:
        raise ConfigError(
            "data.path: missing; expected the folder written by `python -m trainer convert` "
            "(or, with data.loader=memory, NAME:PATH or synthetic:HxW:CLASSES:N)"
        )
    if d.loader == "memory":
        from trainer.data.memory import parse_source

        parse_source(d.path)
        return None
    return validate_dataset(d.path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Per-(epoch, rank) seed: dropout and other model randomness restart identically on resume."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % (2**63)


def amp_dtype_of(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _per_rank_batch(cfg: RunConfig, env: dist.DistEnv) -> int:
    lp = cfg.loop
    if lp.batch_size_mode == "per_rank":
        return lp.batch_size
    if lp.batch_size % env.world_size:
        raise ConfigError(
            f"loop.batch_size: invalid value {lp.batch_size}; expected a multiple of the world size "
            f"({env.world_size}) with loop.batch_size_mode=global"
        )
    return lp.batch_size // env.world_size


class _Held:
    """Holds the DDP model and optimizer (and the RunState that references them) so teardown can drop them
    before destroy_process_group(); also the sink and checkpointer that teardown closes.

    (An exception's traceback keeps a function's locals alive; attributes of this object can be cleared.)
    """

    def clear(self) -> None:
        self.__dict__.clear()


def loader_facts(cfg: RunConfig, env: dist.DistEnv) -> LoaderFacts:
    """The run facts the data builder needs besides cfg.data: per-rank batch sizes, rank, device, seed."""
    per_rank = _per_rank_batch(cfg, env)
    return LoaderFacts(
        batch_size=per_rank,
        eval_batch_size=cfg.loop.eval_batch_size or per_rank,
        seed=cfg.loop.seed,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
        channels_last=cfg.loop.channels_last,
    )


def _build(cfg: RunConfig, env: dist.DistEnv, held: _Held, train: bool = True):
    """Loaders, model (plain and wrapped) and checkpointer for `cfg` (whose data the caller checked)."""
    lp = cfg.loop
    loaders = build_data(cfg.data, loader_facts(cfg, env))
    meta = loaders.meta
    seed_everything(lp.init_seed if lp.init_seed >= 0 else lp.seed)
    image_size = cfg.data.image_size or (meta.get("image_size") or [224])[0]
    module = create_model(
        cfg.model.name, num_classes=meta["num_classes"], in_channels=3, image_size=image_size, **cfg.model.kwargs
    ).to(env.device)
    if lp.channels_last:
        module = module.to(memory_format=torch.channels_last)
    held.module = module
    model = torch.compile(module) if lp.compile else module
    if env.distributed and train:
        # gradient_as_bucket_view: GNP scales .grad in place between the passes, which keeps the views valid.
        model = DDP(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    held.model = model
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_dir_of(cfg) / "checkpoints")
    return loaders, module, model, ckpt


def train(cfg: RunConfig) -> dict:
    """Train according to `cfg` (resuming from the run directory's latest checkpoint); returns the summary."""
    preflight(cfg)  # before the rendezvous: a rank that fails here keeps rank 0 from writing anything
    env = dist.init()
    held = _Held()
    try:
        return _train(cfg, env, held)
    finally:
        # Release the metrics port; give a pending upload its last chance; then the leases (last: the upload
        # thread writes under them).
        for name in ("sink", "ckpt", "lease"):
            if hasattr(held, name):
                getattr(held, name).close()
        held.clear()
        dist.shutdown(env)


def _train(cfg: RunConfig, env: dist.DistEnv, held: _Held) -> dict:
    """Build, claim the run directory, train the remaining epochs, make the final checkpoint land, report."""
    t_start = time.time()
    if cfg.loop.deterministic:
        torch.use_deterministic_algorithms(True)
    t = held.training = _assemble(cfg, env, held)
    last_eval = t.run_epochs()
    if not last_eval:  # stopped by loop.max_steps: evaluate where it stopped, marked as not an epoch's end
        last_eval = {"epoch": t.state.epoch, "partial": True, "step": t.state.step, **t.evaluate_now()}
        t.sink.log("eval", last_eval)
    if env.is_primary:
        _final_checkpoint(t.ckpt, t.sink, t.state, finished=t.state.epoch == cfg.loop.epochs)
    dist.barrier(env)
    if env.is_primary:
        crash_budget.finish(t.budget)
    summary = {
        "run_dir": str(t.run_dir),
        "epochs": t.state.epoch,
        "steps": t.state.step,
        "gnp_steps": t.state.gnp_steps,
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "eval_loss": last_eval["eval_loss"],
        "wall_s": round(time.time() - t_start, 1),
    }
    t.sink.log("done", summary)
    t.sink.close()
    return summary


def _assemble(cfg: RunConfig, env: dist.DistEnv, held: _Held) -> _Training:
    """Everything the epochs need, in the order that keeps refusals ahead of the first write: build and check
    (data, model, optimizer, step policy, batch augmentation), then claim the location (lease, run directory,
    identity), then restore the newest checkpoint and check the crash budget, then start the sinks."""
    # Built before the run directory is touched: what only the built data or model can tell (an epoch
    # without a batch, a bad model option) must neither create nor refuse the directory.
    loaders, module, model, ckpt = _build(cfg, env, held)
    held.ckpt = ckpt
    if len(loaders.train) == 0:
        raise ConfigError(
            f"loop.batch_size: invalid value {cfg.loop.batch_size}; expected at most each rank's share of the "
            f"{loaders.meta['train_size']} training images of {cfg.data.path} (an epoch has no batch)"
        )
    # Also before the run directory: the optimizer, the step policy and the batch augmentation check their
    # arguments as they are built, and a refusal must leave no config.yaml (the fix would be a "different config").
    opt, l2_params = build_optimizer(module, cfg.optim, cfg.gnp)
    held.opt = opt
    spe = len(loaders.train)
    policy = StepPolicy.from_config(cfg.schedule, cfg.gnp, cfg.loop, cfg.optim, spe)
    batch_augment = build_batch_augment(cfg, loaders.meta["num_classes"], env)
    run_dir = _claim(cfg, env, held, ckpt)
    amp_dtype = amp_dtype_of(cfg.loop.precision, env.device)
    set_float32_math(cfg.loop.precision)
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None
    run = held.run = RunState(
        module=module, optimizer=opt, loop=LoopState(), scaler=scaler, env=env, config=to_dict(cfg)
    )
    resumed = resume(ckpt, env, run.load_state_dict)
    # Before any training: a run that keeps crashing from this checkpoint stops here (CrashLoopError, exit 3).
    budget = _begin_budget(cfg, ckpt, resumed, env)
    sink = held.sink = _sink(cfg, env, run_dir)
    loss_spec = LossSpec(
        label_smoothing=cfg.data.label_smoothing, l2=cfg.optim.l2, l2_params=l2_params, batch_augment=batch_augment
    )
    ctx = TrainContext(
        model=model,
        opt=opt,
        env=env,
        policy=policy,
        loss_spec=loss_spec,
        sink=sink,
        amp_dtype=amp_dtype,
        scaler=scaler,
        clip_norm=cfg.optim.clip_norm,
        max_steps=cfg.loop.max_steps,
        log_every=cfg.loop.log_every,
        sub_batches=gnp_sub_batches(cfg.gnp.m, _per_rank_batch(cfg, env)),
    )
    t = _Training(cfg, env, loaders, module, run, ckpt, sink, ctx, run_dir, budget)
    t.log_start(resumed)
    return t


def _claim(cfg: RunConfig, env: dist.DistEnv, held: _Held, ckpt: Checkpointer) -> Path:
    """Take the location for this run: one live writer (trainer/ownership.py), the run directory, the identity."""
    held.lease = take(cfg, env, ckpt.storage, run_dir_of(cfg))
    ckpt.guard = held.lease.check  # commit checkpoints only under a confirmed lease
    run_dir = prepare_run_dir(cfg, env)
    held.lease.follow_moved_run_dir()  # run.fresh renamed the locked run directory aside
    if env.is_primary:
        record_identity(ckpt.storage, cfg, git_commit())  # before the first checkpoint
    return run_dir


def _sink(cfg: RunConfig, env: dist.DistEnv, run_dir: Path):
    m = cfg.metrics
    return build_sink(
        rank=env.rank,
        local_rank=env.local_rank,
        run_dir=run_dir,
        jsonl=m.jsonl,
        progress=m.progress,
        prometheus=m.prometheus,
        port=m.port,
        addr=m.addr,
        job=m.job or os.environ.get("GNP_JOB_NAME", "") or cfg.recipe or "run",
        progress_every_s=m.progress_every_s,
    )


def _final_checkpoint(ckpt: Checkpointer, sink, state: LoopState, finished: bool) -> None:
    """Rank 0: the final upload must land before the process reports success; if storage stays down, exit
    retryable so the job restarts from the last complete checkpoint instead of "succeeding"."""
    landed = ckpt.wait(timeout=FINAL_UPLOAD_TIMEOUT_S)
    sink.log("checkpoint", {"step": state.step, "final": True, **ckpt_stats(ckpt)})
    if not landed:
        raise StorageError(
            f"checkpoint.uri: the final checkpoint (step {state.step}) did not upload within "
            f"{FINAL_UPLOAD_TIMEOUT_S} s: {ckpt.stats.get('last_error', '')}"
        )
    if finished:  # a finished run: its final step must be the newest verified checkpoint
        try:
            ckpt.verify(state.step)
        except CheckpointError as e:
            raise StorageError(f"checkpoint.uri: the final checkpoint does not verify after its upload: {e}") from None


class _Training:
    """The assembled run and its epoch loop: evaluation and checkpoints between epochs (and every
    checkpoint.every_steps within them), each a collective that every rank calls."""

    def __init__(self, cfg, env, loaders, module, run, ckpt, sink, ctx, run_dir, budget) -> None:
        self.cfg, self.env, self.loaders, self.module, self.run = cfg, env, loaders, module, run
        self.ckpt, self.sink, self.ctx, self.run_dir, self.budget = ckpt, sink, ctx, run_dir, budget
        self.state = run.loop
        self.spe = len(loaders.train)
        self.crash_at = _fault_crash_step()

    def log_start(self, resumed: int | None) -> None:
        lp, spe, state = self.cfg.loop, self.spe, self.state
        self.sink.log(
            "start",
            {
                "run_dir": str(self.run_dir),
                "world_size": self.env.world_size,
                "device": str(self.env.device),
                "model": self.cfg.model.name,
                "params": sum(p.numel() for p in self.module.parameters()),
                "train_images": self.loaders.meta["train_size"],
                "steps_per_epoch": spe,
                "total_steps": min(lp.epochs * spe, lp.max_steps) if lp.max_steps else lp.epochs * spe,
                "resumed_from_step": resumed,
                "gnp_steps": state.gnp_steps,
                "step": state.step,
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            },
        )

    def sync_bn(self) -> None:
        """Average the ranks' BatchNorm running buffers (loop.sync_bn_buffers): a collective, every rank calls it."""
        if self.cfg.loop.sync_bn_buffers:
            average_bn_buffers(self.module, self.env)

    def evaluate_now(self) -> dict:
        self.sync_bn()  # evaluate with the ranks' mean buffers, as the reference does
        return evaluate(self.module, self.loaders.val, self.env, self.ctx.amp_dtype)

    def save(self) -> None:
        """Checkpoint at the current step: every rank contributes its RNG state, rank 0 writes."""
        self.sync_bn()  # the checkpoint holds the ranks' mean buffers, not rank 0's
        snapshot = self.run.state_dict()  # a collective: called on every rank
        if self.env.is_primary:
            t0 = time.perf_counter()
            self.ckpt.save(self.state.step, snapshot)
            stats = {"step": self.state.step, "blocking_s": time.perf_counter() - t0, **ckpt_stats(self.ckpt)}
            self.sink.log("checkpoint", stats)

    def after_step(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.state.step % every == 0 and self.state.batch < self.spe:
            self.save()  # mid-epoch; the end of an epoch is handled in run_epochs
        if self.state.step == self.crash_at:
            _injected_crash(self.state.step, self.env, self.ckpt)

    def run_epochs(self) -> dict:
        """Train the remaining epochs; returns the last evaluation ({} when loop.max_steps stopped it first)."""
        lp, ck, state = self.cfg.loop, self.cfg.checkpoint, self.state
        last_eval: dict = {}
        while state.epoch < lp.epochs:
            if not self.run.rng_restored:
                # Fresh epoch: model randomness restarts from (seed, epoch, rank), so resuming at an epoch
                # boundary reproduces it even without the saved generator state.
                torch.manual_seed(epoch_seed(lp.seed, state.epoch, self.env.rank))
            self.run.rng_restored = False
            self.loaders.train.set_epoch(state.epoch)
            if not train_epoch(self.ctx, self.loaders.train, state, self.after_step):
                break
            state.epoch, state.batch = state.epoch + 1, 0
            last = state.epoch == lp.epochs
            if last or (lp.eval_every and state.epoch % lp.eval_every == 0):
                last_eval = {"epoch": state.epoch, **self.evaluate_now()}
                self.sink.log("eval", last_eval)
            if (
                last
                or (ck.every_epochs and state.epoch % ck.every_epochs == 0)
                or (ck.every_steps and state.step % ck.every_steps == 0)
            ):
                self.save()
        return last_eval


def _begin_budget(cfg: RunConfig, ckpt: Checkpointer, resumed: int | None, env: dist.DistEnv) -> crash_budget.Start:
    """crash_budget.begin for this run (a collective), with what the launcher needs to reopen the storage."""
    ck = cfg.checkpoint
    pointer = {
        "uri": ckpt.uri,
        "s3_endpoint": ck.s3_endpoint,
        "s3_region": ck.s3_region,
        "s3_retry_mode": ck.s3_retry_mode,
        "s3_max_attempts": ck.s3_max_attempts,
    }
    return crash_budget.begin(ckpt.storage, resumed, cfg.run.crash_restarts, env, pointer)


def _fault_crash_step() -> int:
    """The step of FAULT_CRASH_ENV (-1: none)."""
    value = os.environ.get(FAULT_CRASH_ENV, "")
    step, _, rank = value.partition(":")
    if value and not (step.isdigit() and (not rank or rank.isdigit())):
        raise ConfigError(f"{FAULT_CRASH_ENV}: invalid value {value!r}; expected STEP or STEP:RANK")
    return int(step) if value else -1


def _injected_crash(step: int, env: dist.DistEnv, ckpt: Checkpointer) -> None:
    """FAULT_CRASH_ENV's crash. Rank 0 first waits for its pending uploads and every rank meets at a barrier,
    so whether a checkpoint landed before the crash (the drills' progress) does not depend on timing."""
    if env.is_primary:
        ckpt.wait()
    dist.barrier(env)
    rank = os.environ[FAULT_CRASH_ENV].partition(":")[2]
    if env.rank == (int(rank) if rank else env.world_size - 1):
        raise RuntimeError(f"{FAULT_CRASH_ENV}: injected crash at step {step} on rank {env.rank}")


def ckpt_stats(ckpt) -> dict:
    """The checkpointer's health counters (uploads, failures, last success) as a plain dict."""
    return dict(getattr(ckpt, "stats", {}) or {})


def build_batch_augment(cfg: RunConfig, num_classes: int, env: dist.DistEnv):
    """The batch-level augmentation of cfg.data.batch_augment, or None."""
    d = cfg.data
    if d.batch_augment == "none":
        return None
    from trainer.data.augment import BatchAugment

    return BatchAugment(
        d.batch_augment,
        num_classes=num_classes,
        cutout=d.batch_cutout,
        alpha=d.mixup_alpha,
        label_smoothing=d.label_smoothing,
        seed=cfg.loop.seed,
        rank=env.rank,
    )


def saved_config(run_dir: str, overrides: dict | None = None) -> RunConfig:
    """The config a run directory was trained with (its config.yaml), with `overrides` ({"data.path": ...})."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--run: {run_dir!r} has no config.yaml; expected a run directory made by `trainer train`")
    try:
        data = strict_yaml_load(read_text_file(saved, "--run")) or {}  # names the file for non-UTF-8 bytes too
    except yaml.YAMLError as e:
        raise ConfigError(f"--run: {str(saved)!r} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--run: {str(saved)!r} must hold a mapping of sections, got {type(data).__name__}")
    data.pop("git_commit", None)
    data.setdefault("run", {})["dir"] = str(run_dir)
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    return from_dict(data)


def _load_latest(cfg, env, held: _Held, run_dir: str, what: str):
    """Loaders and model of `cfg` with the latest complete checkpoint of `run_dir` loaded: (loaders, model, step)."""
    check_data(cfg)
    set_float32_math(cfg.loop.precision)  # evaluate and measure with the math the run trained with (tf32)
    loaders, module, _, ckpt = _build(cfg, env, held, train=False)
    step = resume(ckpt, env, lambda sd: module.load_state_dict(sd["model"]))
    if step is None:
        raise ConfigError(f"--run: {run_dir!r} has no complete checkpoint to {what}")
    return loaders, module, step


def evaluate_run(run_dir: str, overrides: dict | None = None) -> dict:
    """Evaluate the latest checkpoint of `run_dir` on its validation set (works under torchrun too)."""
    cfg = saved_config(run_dir, overrides)
    env = dist.init()
    held = _Held()
    try:
        loaders, module, step = _load_latest(cfg, env, held, run_dir, "evaluate")
        result = {
            "run_dir": str(run_dir),
            "step": step,
            **evaluate(module, loaders.val, env, amp_dtype_of(cfg.loop.precision, env.device)),
        }
        if env.is_primary:
            print(json.dumps(result), flush=True)
        return result
    finally:
        held.clear()
        dist.shutdown(env)


def measure_run(run_dir: str, *, batches: int, r: float | None = None, overrides: dict | None = None) -> dict:
    """Train loss, ||g1|| and sharpness of the latest checkpoint of `run_dir` (see loop.measure_sharpness).

    One process. The batches are the first `batches` of the training set in the order of seed 0, without
    augmentation, so every run of a comparison is measured on the same images; r defaults to the run's gnp.r.
    """
    cfg = saved_config(
        run_dir,
        {"data.augment": "none", "data.batch_augment": "none", "data.cutout": 0, "loop.seed": 0, **(overrides or {})},
    )
    env = dist.init()
    if env.distributed:
        dist.shutdown(env)
        raise ConfigError("measure: runs in one process; do not start it under torchrun")
    held = _Held()
    try:
        loaders, module, step = _load_latest(cfg, env, held, run_dir, "measure")
        loaders.train.set_epoch(0)
        picked = (batch for _, batch in zip(range(batches), loaders.train))
        radius = cfg.gnp.r if r is None else r
        if radius <= 0:
            raise ConfigError(f"measure: r={radius} must be > 0 to measure sharpness")
        out = measure_sharpness(module, picked, r=radius, amp_dtype=amp_dtype_of(cfg.loop.precision, env.device))
        return {"run_dir": str(run_dir), "step": step, **out}
    finally:
        held.clear()
        dist.shutdown(env)
