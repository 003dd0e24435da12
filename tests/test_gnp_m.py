"""gnp.m (m-sharpness independent of the hardware): GNP.train_step(sub_batches=k) perturbs each of k sub-batches
on its own. Checked in fp64 against a reference written here with torch.autograd.grad, across 1 process and 2
DDP ranks (torchrun + gloo), and through the CLI (a bad m is a one-line error, exit 2)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import run_cli, run_torchrun
from trainer.loop import gnp_sub_batches
from trainer.optim.gnp import GNP

ROOT = Path(__file__).resolve().parents[1]
R, LR = 0.05, 0.1


def make_model(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(10)] if bn else []
    return nn.Sequential(nn.Linear(5, 10), *mid, nn.Tanh(), nn.Linear(10, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def reference_gradient(model: nn.Module, x, y, k: int, alpha: float, normed: bool) -> list[torch.Tensor]:
    """mean_j [(1-α)·c_j·g1_j + α·g2_j], g1_j = ∇L_j(θ), g2_j = ∇L_j(θ + r·g1_j/‖g1_j‖), c_j = 1/‖g1_j‖ or 1."""
    params = list(model.parameters())
    m = x.shape[0] // k
    total = [torch.zeros_like(p) for p in params]
    for j in range(k):
        xj, yj = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        g1 = torch.autograd.grad(F.cross_entropy(model(xj), yj), params)
        norm = torch.sqrt(sum((g * g).sum() for g in g1))
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g1):
                p.add_(R * g / norm)
        g2 = torch.autograd.grad(F.cross_entropy(model(xj), yj), params)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        c = 1 / norm if normed else 1.0
        for i in range(len(params)):
            total[i] += ((1 - alpha) * c * g1[i] + alpha * g2[i]) / k
    return total


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("alpha", [0.8, 1.0])
@pytest.mark.parametrize("k", [2, 3])
def test_sub_batch_step_matches_reference(k: int, alpha: float, normed: bool, bn: bool) -> None:
    x, y = data()
    ref_model = make_model(bn)
    grad = reference_gradient(ref_model, x, y, k, alpha, normed)
    expected = [p.detach() - LR * g for p, g in zip(make_model(bn).parameters(), grad)]

    model = make_model(bn)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=LR), r=R, alpha=alpha, norm_perturbations=normed)
    m = x.shape[0] // k

    def loss_fn(j=None):
        xs, ys = (x, y) if j is None else (x[j * m : (j + 1) * m], y[j * m : (j + 1) * m])
        return F.cross_entropy(model(xs), ys)

    info = opt.train_step(loss_fn, model=model, sub_batches=k)
    assert info.gnp
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-13)
    if bn:  # one update per step, the mean of the sub-batches' (test_sub_batch_batchnorm_statistics_...)
        assert model[1].num_batches_tracked.item() == 1


def reference_bn_after_step(model: nn.Module, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """What k ranks end with (issue 31): k separate copies of the model, each one train-mode forward on its
    sub-batch (= pass 1 on that rank), then their running_mean/var averaged (fp64) and num_batches_tracked + 1."""
    m = x.shape[0] // k
    copies = [copy.deepcopy(model) for _ in range(k)]
    with torch.no_grad():
        for j, c in enumerate(copies):
            c(x[j * m : (j + 1) * m])
    bns = [c[1] for c in copies]
    mean = torch.stack([b.running_mean.double() for b in bns]).mean(0)
    var = torch.stack([b.running_var.double() for b in bns]).mean(0)
    return [mean, var, model[1].num_batches_tracked + 1]


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, weighted by num_batches_tracked
@pytest.mark.parametrize("k", [2, 4])
def test_sub_batch_batchnorm_statistics_are_the_mean_of_k_one_batch_updates(k: int, momentum: float | None) -> None:
    """BatchNorm statistics must not depend on how the k perturbations are spread over GPUs: after each step they
    equal the k-rank reference (each sub-batch updates from the step's starting buffers, then the mean)."""
    x, y = data()
    model = make_model(True)
    model[1].momentum = momentum
    opt = GNP(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), r=R, alpha=0.8)
    m = x.shape[0] // k
    for step in range(3):
        expected = reference_bn_after_step(model, x, k)
        opt.train_step(
            lambda j=None: F.cross_entropy(model(x[j * m : (j + 1) * m]), y[j * m : (j + 1) * m]),
            model=model,
            sub_batches=k,
        )
        bn = model[1]
        torch.testing.assert_close(bn.running_mean, expected[0], rtol=0, atol=1e-14)
        torch.testing.assert_close(bn.running_var, expected[1], rtol=0, atol=1e-14)
        assert bn.num_batches_tracked.item() == expected[2].item() == step + 1
    # teeth: k updates in a row (every pass 1 updating, as before the fix) end elsewhere
    seq = make_model(True)
    with torch.no_grad():
        for j in range(k):
            seq(x[j * m : (j + 1) * m])
    assert seq[1].num_batches_tracked.item() == k
    assert (seq[1].running_mean - reference_bn_after_step(make_model(True), x, k)[0]).abs().max() > 1e-3


def test_one_sub_batch_is_the_plain_gnp_step_bitwise() -> None:
    """sub_batches=1 (gnp.m = 0 or the per-rank batch) takes today's code path: loss_fn() on the whole batch."""
    x, y = data()
    out = []
    for kwargs in ({}, {"sub_batches": 1}):
        model = make_model(True)
        opt = GNP(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), r=R, alpha=0.8)
        for _ in range(2):
            opt.train_step(lambda: F.cross_entropy(model(x), y), model=model, **kwargs)
        out.append(torch.cat([t.reshape(-1) for t in model.state_dict().values()]))
    assert torch.equal(out[0], out[1])


def test_sub_batches_argument_checked() -> None:
    model = make_model(False)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=LR), r=R, alpha=0.8, reuse="looksam")
    with pytest.raises(ValueError, match="reuse"):
        opt.train_step(lambda j=None: model(data()[0]).sum(), model=model, sub_batches=2)
    with pytest.raises(ValueError, match="sub_batches"):
        opt.train_step(lambda: model(data()[0]).sum(), model=model, sub_batches=0)
    # each sub-batch's g1 averaged over the ranks would make one perturbation cover m x world examples
    opt = GNP(torch.optim.SGD(model.parameters(), lr=LR), r=R, alpha=0.8, sync_perturbations=True)
    with pytest.raises(ValueError, match="sync_perturbations"):
        opt.train_step(lambda j=None: model(data()[0]).sum(), model=model, sub_batches=2)


def test_gnp_sub_batches_of_m() -> None:
    assert gnp_sub_batches(0, 64) == 1
    assert gnp_sub_batches(64, 64) == 1
    assert gnp_sub_batches(16, 64) == 4
    for bad in (5, 128):
        with pytest.raises(ValueError, match=r"^gnp\.m: .*divisor of the per-rank batch \(64\)"):
            gnp_sub_batches(bad, 64)


@pytest.mark.dist
def test_one_process_with_sub_batches_equals_ddp_ranks(tmp_path: Path) -> None:
    """2 sub-batches in 1 process == 2 DDP ranks with m = per-rank batch (and 2x2 == 4), fp64, 3 steps."""
    script = ROOT / "tests" / "support" / "dist_scripts" / "gnp_m_checks.py"
    proc = run_torchrun(str(script), str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for k in range(2):
        res = json.loads((tmp_path / f"rank{k}.json").read_text())
        assert res["world_size"] == 2
        assert res["ddp_k1_vs_single_k2"] < 1e-13 and res["ddp_k1_replicas_equal"]
        assert res["ddp_k2_vs_single_k4"] < 1e-13 and res["ddp_k2_replicas_equal"]
        # BatchNorm statistics (ranks' buffers averaged after each step) equal the single process's: issue 31
        assert res["ddp_k1_vs_single_k2_bn"] < 1e-13 and res["ddp_k2_vs_single_k4_bn"] < 1e-13
        assert res["single_k2_num_batches_tracked"] == res["single_k4_num_batches_tracked"] == 3  # one per step
        assert res["ddp_k1_num_batches_tracked"] == res["ddp_k2_num_batches_tracked"] == 3
        assert res["bn_start_differs"] < 1e-13  # every sub-batch starts from rank 0's buffers, as DDP's forward does
        assert res["single_k1_vs_single_k2"] > 1e-4  # m changes the update: the checks above have teeth


def test_m_with_sync_perturbations_is_refused(tmp_path: Path) -> None:
    """gnp.m > 0 with gnp.sync_perturbations=true would average each sub-batch's g1 over the ranks (one perturbation
    per m x world examples, not m): one line naming both keys, exit 2, nothing written."""
    args = ["train", "--recipe", "debug-cpu", "--set", "data.loader=memory"]
    args += ["--set", "data.path=fashion-mnist:/usr/share/datasets/fashion-mnist", "--set", "data.limit=64"]
    args += ["--set", f"run.dir={tmp_path / 'run'}", "--set", "gnp.m=8", "--set", "gnp.sync_perturbations=true"]
    res = run_cli(*args, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gnp.m: invalid value 8"), res.stderr
    assert "gnp.sync_perturbations" in lines[0]
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("sets", [["gnp.m=5"], ["gnp.m=8", "gnp.reuse=looksam"]])
def test_bad_m_is_a_one_line_error(tmp_path: Path, sets: list[str]) -> None:
    args = ["train", "--recipe", "debug-cpu", "--set", "data.loader=memory"]
    args += ["--set", "data.path=fashion-mnist:/usr/share/datasets/fashion-mnist", "--set", "data.limit=64"]
    args += ["--set", f"run.dir={tmp_path / 'run'}"]
    for s in sets:
        args += ["--set", s]
    res = run_cli(*args, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gnp.m: invalid value"), res.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
