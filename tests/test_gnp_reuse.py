"""GNP gradient reuse (reuse="looksam"): checked against the math written out here.

References use ``torch.autograd.grad`` at θ and at θ + r·g1/(‖g1‖+eps) on a copy of the model and plain
tensor arithmetic on flattened gradients, never GNP itself. The gradient GNP hands to the base optimizer
is observed through an SGD subclass that records it. The DDP case runs this file as a script under
torchrun (2 processes, gloo); its per-rank reference averages g1/g2 with explicit all_reduce.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.conftest import run_torchrun
from tests.support.dist_scripts.gnp_ddp_checks import RecordingSGD  # the same recorder the 2-rank checks use
from trainer.optim.gnp import GNP
from trainer.optim.reuse import REUSE_VARIANTS, LookSAMReuse

R, ALPHA, EPS = 0.1, 0.8, 1e-12
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers (the reference math)


class BNConv(nn.Module):
    """Tiny conv net with BatchNorm (train mode: batch statistics in every pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2).flatten(1))


def make_model(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    return BNConv().to(dtype)


def make_data(kind: str, seed: int, dtype: torch.dtype = torch.float64, n: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "mlp" else (n, 2, 4, 4)
    return torch.randn(shape, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def flat(ts: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(vec: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def grads_at(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Plain autograd gradient of the cross-entropy at the model's current parameters."""
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def g1_g2(model: nn.Module, x: Tensor, y: Tensor, radii: list[float]) -> tuple[Tensor, Tensor]:
    """Flat g1 at θ and g2 at θ + r_i·g1/(‖g1‖+eps) (r per parameter), on a copy of the model."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    g1 = grads_at(ref, x, y)
    n = flat(g1).norm()
    with torch.no_grad():
        for p, g, r in zip(params, g1, radii):
            p.add_(g * (r / (n + EPS)))
    g2 = grads_at(ref, x, y)
    return flat(g1), flat(g2)


def orthogonal_v(g1: Tensor, g2: Tensor) -> Tensor:
    """v = (g2 − <g1,g2>/(‖g1‖+eps)²·g1)/(‖g1‖+eps): g2's part orthogonal to g1, relative to ‖g1‖."""
    n = g1.norm()
    return (g2 - (g1 @ g2) / (n + EPS) ** 2 * g1) / (n + EPS)


def stored_v(opt: GNP, model: nn.Module) -> Tensor:
    """The v the optimizer would checkpoint, flattened in parameter order."""
    saved = opt.state_dict()["reuse"]["v"]
    assert sorted(saved) == list(range(len(list(model.parameters()))))
    return flat([saved[i] for i in range(len(saved))])


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def full_step(opt: GNP, entry: str, model: nn.Module, x: Tensor, y: Tensor, **kw) -> None:
    def loss_fn() -> Tensor:
        return F.cross_entropy(model(x), y)

    if entry == "step":

        def closure() -> Tensor:
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt.train_step(loss_fn, model=model, **kw)


def plain_step(opt: GNP, model: nn.Module, x: Tensor, y: Tensor, **kw):
    return opt.train_step(lambda: F.cross_entropy(model(x), y), model=model, gnp=False, **kw)


# ---------------------------------------------------------------------------------------------
# the stored v


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("entry", ["train_step", "step"])
@pytest.mark.parametrize("kind", ["mlp", "bnconv"])
def test_full_step_stores_orthogonal_component(kind: str, entry: str, normalized: bool) -> None:
    """v = orthogonal part of g2 w.r.t. g1 over ‖g1‖, from raw g1/g2 in both mixes; the mix is unchanged."""
    model = make_model(kind)
    x, y = make_data(kind, 1)
    n_params = len(list(model.parameters()))
    g1, g2 = g1_g2(model, x, y, [R] * n_params)
    base = RecordingSGD(model.parameters(), lr=0.1)
    opt = GNP(base, r=R, alpha=ALPHA, norm_perturbations=normalized, reuse="looksam")
    full_step(opt, entry, model, x, y)

    v_ref = orthogonal_v(g1, g2)
    v = stored_v(opt, model)
    assert rel(v, v_ref) < 1e-10
    assert abs(float(v @ g1)) < 1e-10 * float(v.norm() * g1.norm())  # sanity: orthogonal to g1
    c = (1 - ALPHA) / (g1.norm() + EPS) if normalized else 1 - ALPHA
    assert rel(flat(base.seen[0]), c * g1 + ALPHA * g2) < 1e-12  # reuse does not touch the full step


@pytest.mark.parametrize("entry", ["train_step", "step"])
def test_per_group_r_and_alpha(entry: str) -> None:
    """Groups with their own r and alpha (incl. alpha = 1): ḡ2 is recovered per group before the
    global projection."""
    for alphas in ((0.5, 1.5), (1.0, 1.0)):
        model = make_model("bnconv")
        x, y = make_data("bnconv", 2)
        params = list(model.parameters())
        head = {id(p) for p in model.fc.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in head], "r": 0.1, "alpha": alphas[0]},
            {"params": [p for p in params if id(p) in head], "r": 0.05, "alpha": alphas[1]},
        ]
        order = [p for g in groups for p in g["params"]]
        radii = [0.1 if id(p) not in head else 0.05 for p in params]
        g1, g2 = g1_g2(model, x, y, radii)
        opt = GNP(torch.optim.SGD(groups, lr=0.1), r=R, alpha=ALPHA, reuse="looksam")
        full_step(opt, entry, model, x, y)
        saved = opt.state_dict()["reuse"]["v"]
        # state_dict indices follow the param_group order; map them back to model.parameters() order
        by_id = {id(p): saved[i] for i, p in enumerate(order)}
        v = flat([by_id[id(p)] for p in params])
        assert rel(v, orthogonal_v(g1, g2)) < 1e-10, alphas


# ---------------------------------------------------------------------------------------------
# the plain step


@pytest.mark.parametrize("full_entry", ["train_step", "step"])
@pytest.mark.parametrize("weight", [0.5, 1.0])
@pytest.mark.parametrize("kind", ["mlp", "bnconv"])
def test_plain_step_adds_alpha_w_norm_v(kind: str, weight: float, full_entry: str) -> None:
    """Plain step after a full one: the base optimizer gets g + α·w·‖g‖·v with the group's current α,
    and (SGD without momentum) the parameters move by −lr times that."""
    lr = 0.1
    model = make_model(kind)
    n_params = len(list(model.parameters()))
    xa, ya = make_data(kind, 1)
    xb, yb = make_data(kind, 2)
    g1, g2 = g1_g2(model, xa, ya, [R] * n_params)
    v_ref = orthogonal_v(g1, g2)
    base = RecordingSGD(model.parameters(), lr=lr)
    opt = GNP(base, r=R, alpha=ALPHA, reuse="looksam", reuse_weight=weight)
    full_step(opt, full_entry, model, xa, ya)

    opt.param_groups[0]["alpha"] = 0.6  # a schedule moved alpha: the correction uses the current one
    before = flat([p.detach().clone() for p in model.parameters()])
    g_now = flat(grads_at(copy.deepcopy(model), xb, yb))
    info = plain_step(opt, model, xb, yb)
    expected = g_now + 0.6 * weight * g_now.norm() * v_ref

    assert info.gnp is False
    assert rel(flat(base.seen[1]), expected) < 1e-10
    assert torch.allclose(info.grad_norm, expected.norm(), rtol=1e-10)  # reported after the correction
    after = flat([p.detach() for p in model.parameters()])
    assert torch.allclose(after, before - lr * expected, rtol=0, atol=1e-12)
    assert float((expected - g_now).norm()) > 1e-4 * float(g_now.norm())  # the correction is visible


def test_parameter_without_gradient_at_the_full_step_is_not_corrected() -> None:
    """v covers the parameters that had a gradient at the full step; one that gets its first gradient at a plain
    step keeps it as it is, while ‖g‖ still runs over every gradient of the plain step."""
    model = make_model("mlp")
    shift = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # used by the plain step only
    params = [*model.parameters(), shift]
    xa, ya = make_data("mlp", 1)
    xb, yb = make_data("mlp", 2)
    g1, g2 = g1_g2(model, xa, ya, [R] * 4)
    v_ref = orthogonal_v(g1, g2)
    seen: list[list[Tensor | None]] = []

    class Recording(torch.optim.SGD):  # RecordingSGD, but shift has no gradient at the full step
        def step(self, closure=None):
            seen.append([None if p.grad is None else p.grad.clone() for p in params])
            return super().step(closure)

    opt = GNP(Recording(params, lr=0.1), r=R, alpha=ALPHA, reuse="looksam")
    full_step(opt, "train_step", model, xa, ya)
    assert seen[0][4] is None
    assert sorted(opt.state_dict()["reuse"]["v"]) == [0, 1, 2, 3]  # shift had no gradient: outside v

    ref = copy.deepcopy(model)
    ref_shift = shift.detach().clone().requires_grad_(True)
    g_now = torch.autograd.grad(F.cross_entropy(ref(xb) + ref_shift, yb), [*ref.parameters(), ref_shift])
    opt.train_step(lambda: F.cross_entropy(model(xb) + shift, yb), model=model, gnp=False)
    norm = flat(g_now).norm()
    assert rel(flat(seen[1][:4]), flat(g_now[:4]) + ALPHA * norm * v_ref) < 1e-10
    assert torch.equal(seen[1][4], g_now[4])


def test_correction_comes_before_clipping() -> None:
    model = make_model("mlp")
    xa, ya = make_data("mlp", 1)
    xb, yb = make_data("mlp", 2)
    g1, g2 = g1_g2(model, xa, ya, [R] * 4)
    base = RecordingSGD(model.parameters(), lr=0.0)
    opt = GNP(base, r=R, alpha=ALPHA, reuse="looksam")
    full_step(opt, "train_step", model, xa, ya)
    g_now = flat(grads_at(copy.deepcopy(model), xb, yb))
    expected = g_now + ALPHA * g_now.norm() * orthogonal_v(g1, g2)
    clip = 0.5 * float(expected.norm())
    info = plain_step(opt, model, xb, yb, clip_norm=clip)
    assert torch.allclose(info.grad_norm, expected.norm(), rtol=1e-10)
    assert rel(flat(base.seen[1]), expected * (clip / (float(expected.norm()) + 1e-6))) < 1e-10


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "bnconv"])
def test_same_point_same_batch_replays_the_orthogonal_part(kind: str, normalized: bool) -> None:
    """lr = 0, same batch: the plain step sees g = g1, so with w = 1 it hands over
        G_reuse = g1 + α·‖g1‖·v = g1 + α·(g2 − g2∥),      g2∥ = <g1,g2>/‖g1‖²·g1
    (up to eps). Paper mix, G_full = (1−α)·g1 + α·g2 = g1 + α·(g2∥ − g1) + α·(g2 − g2∥), hence
        G_full − G_reuse = α·(g2∥ − g1),
    i.e. the full step's component along g1 minus what the plain gradient already has; the parts
    orthogonal to g1 agree exactly, in both mixes (the normalised mix only changes the g1 term)."""
    model = make_model(kind)
    x, y = make_data(kind, 3)
    g1, g2 = g1_g2(model, x, y, [R] * len(list(model.parameters())))
    base = RecordingSGD(model.parameters(), lr=0.0)
    opt = GNP(base, r=R, alpha=ALPHA, norm_perturbations=normalized, reuse="looksam", reuse_weight=1.0)
    full_step(opt, "train_step", model, x, y)
    plain_step(opt, model, x, y)
    g_full, g_reuse = flat(base.seen[0]), flat(base.seen[1])

    g2_par = (g1 @ g2) / (g1 @ g1) * g1
    assert rel(g_reuse, g1 + ALPHA * (g2 - g2_par)) < 1e-10
    if not normalized:
        assert rel(g_full - g_reuse, ALPHA * (g2_par - g1)) < 1e-9

    def orth(t: Tensor) -> Tensor:
        return t - (t @ g1) / (g1 @ g1) * g1

    assert rel(orth(g_reuse), orth(g_full)) < 1e-9
    assert float(orth(g_full).norm()) > 1e-3 * float(g_full.norm())  # there is an orthogonal part


@pytest.mark.parametrize(
    "case", ["reuse_none", "weight_zero", "before_first_full_step", "r_zero", "alpha_zero", "checkpoint_without_v"]
)
def test_plain_steps_bitwise_equal_base_optimizer(case: str) -> None:
    """Where no correction is due, a plain train_step equals a plain SGD step on a replica, bitwise
    (parameters and momentum)."""
    model = make_model("bnconv")
    kwargs = (
        {"reuse": "none"}
        if case == "reuse_none"
        else {"reuse": "looksam", "reuse_weight": 0.0 if case == "weight_zero" else 1.0}
    )
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True), r=R, alpha=ALPHA, **kwargs)
    schedule = [False, False] if case == "before_first_full_step" else [True, False, True, False, False]
    for i, use_gnp in enumerate(schedule):
        x, y = make_data("bnconv", 10 + i)
        if use_gnp:
            full_step(opt, "train_step", model, x, y)
            continue
        if case == "r_zero":
            opt.param_groups[0]["r"] = 0.0
        if case == "alpha_zero":
            opt.param_groups[0]["alpha"] = 0.0
        if case == "checkpoint_without_v":  # an older checkpoint: no "reuse" entry
            sd = opt.state_dict()
            opt.load_state_dict({k: v for k, v in sd.items() if k != "reuse"})
            assert opt.state_dict()["reuse"]["v"] == {}
        replica = copy.deepcopy(model)
        sgd = torch.optim.SGD(replica.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        # deepcopy: torch's load_state_dict keeps the very momentum tensors when dtype and device match
        sgd.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
        sgd.zero_grad()
        F.cross_entropy(replica(x), y).backward()
        sgd.step()
        plain_step(opt, model, x, y)
        for a, b in zip(model.parameters(), replica.parameters()):
            assert torch.equal(a, b), (case, i)
            assert torch.equal(opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])
        opt.param_groups[0]["r"], opt.param_groups[0]["alpha"] = R, ALPHA


# ---------------------------------------------------------------------------------------------
# state_dict


def test_state_dict_round_trip_is_bitwise() -> None:
    schedule = [True, False, False, True, False, False]
    batches = [make_data("bnconv", 20 + i) for i in range(len(schedule))]

    def build(seed: int, **kw) -> tuple[nn.Module, GNP]:
        model = make_model("bnconv", seed=seed)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return model, GNP(base, r=R, alpha=ALPHA, **kw)

    def run(model: nn.Module, opt: GNP, steps: range) -> None:
        for i in steps:
            x, y = batches[i]
            opt.train_step(lambda: F.cross_entropy(model(x), y), model=model, gnp=schedule[i], clip_norm=5.0)

    model_a, opt_a = build(0, reuse="looksam", reuse_weight=0.7, norm_perturbations=True)
    run(model_a, opt_a, range(6))

    model_b, opt_b = build(0, reuse="looksam", reuse_weight=0.7, norm_perturbations=True)
    run(model_b, opt_b, range(2))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["gnp"]["reuse"] == "looksam" and ckpt["opt"]["gnp"]["reuse_weight"] == 0.7
    assert sorted(ckpt["opt"]["reuse"]["v"]) == [0, 1, 2, 3, 4, 5]
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["opt"]["state"].values())  # v is not base state

    model_c, opt_c = build(5, reuse="none", reuse_weight=0.1)  # everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.reuse == "looksam" and opt_c.reuse_weight == 0.7 and opt_c.norm_perturbations is True
    run(model_c, opt_c, range(2, 6))  # the first step after the resume is a plain, corrected one
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_c.state[pc]["momentum_buffer"])
    assert torch.equal(stored_v(opt_a, model_a), stored_v(opt_c, model_c))


def test_adamw_state_is_not_disturbed_by_v() -> None:
    """v lives outside the base state, so AdamW still initialises its moments on its first step."""
    model = make_model("mlp")
    x, y = make_data("mlp", 1)
    opt = GNP(torch.optim.AdamW(model.parameters(), lr=1e-2), r=R, alpha=ALPHA, reuse="looksam")
    full_step(opt, "train_step", model, x, y)
    plain_step(opt, model, x, y)
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# fp16 GradScaler, host syncs, errors


def test_fp16_scaler_unscaled_v_and_correction_and_overflow_keeps_v() -> None:
    model = make_model("mlp", torch.float32)
    xa, ya = make_data("mlp", 1, torch.float32)
    xb, yb = make_data("mlp", 2, torch.float32)
    g1, g2 = g1_g2(model, xa, ya, [R] * 4)
    base = RecordingSGD(model.parameters(), lr=0.1)
    opt = GNP(base, r=R, alpha=ALPHA, reuse="looksam", reuse_weight=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    info = opt.train_step(lambda: F.cross_entropy(model(xa), ya), model=model, scaler=scaler)
    assert bool(info.skipped) is False and scaler.get_scale() == 2.0**10
    v = stored_v(opt, model)
    assert rel(v, orthogonal_v(g1, g2)) < 1e-5

    g_now = flat(grads_at(copy.deepcopy(model), xb, yb))
    info = plain_step(opt, model, xb, yb, scaler=scaler)
    assert bool(info.skipped) is False
    assert rel(flat(base.seen[-1]), g_now + ALPHA * 0.5 * g_now.norm() * v) < 1e-5

    for overflow_pass in (1, 2):
        calls: list[int] = []

        def loss_fn() -> Tensor:
            calls.append(1)
            loss = F.cross_entropy(model(xa), ya)
            return loss * 1e38 if len(calls) == overflow_pass else loss  # x 1024 overflows float32

        info = opt.train_step(loss_fn, model=model, scaler=scaler)
        assert bool(info.skipped) is True
        assert torch.equal(stored_v(opt, model), v), overflow_pass


def test_fp16_first_full_step_overflows_leaves_zero_v() -> None:
    model = make_model("mlp", torch.float32)
    x, y = make_data("mlp", 1, torch.float32)
    opt = GNP(RecordingSGD(model.parameters(), lr=0.1), r=R, alpha=ALPHA, reuse="looksam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    info = opt.train_step(lambda: F.cross_entropy(model(x), y) * 1e38, model=model, scaler=scaler)
    assert bool(info.skipped) is True
    assert torch.equal(stored_v(opt, model), torch.zeros(sum(p.numel() for p in model.parameters())))


def test_no_host_sync_with_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = make_data("mlp", 1, torch.float32, n=16)
    opt = GNP(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        r=R,
        alpha=ALPHA,
        norm_perturbations=True,
        reuse="looksam",
    )
    opt.train_step(lambda: F.cross_entropy(model(x), y), model=model)  # lazy setup outside the check

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for gnp in (True, False, False):
        opt.train_step(lambda: F.cross_entropy(model(x), y), model=model, gnp=gnp, clip_norm=1.0)
    monkeypatch.undo()


def test_invalid_reuse_settings() -> None:
    model = make_model("mlp")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ("LookSAM", "", None, 1, "sam"):
        with pytest.raises(ValueError, match=r"gnp\.reuse must be 'none' or 'looksam'"):
            GNP(base, r=R, alpha=ALPHA, reuse=bad)  # type: ignore[arg-type]
    for bad_w in (-0.5, float("nan"), float("inf"), "1", True, None):
        with pytest.raises(ValueError, match=r"gnp\.reuse_weight must be a finite number >= 0"):
            GNP(base, r=R, alpha=ALPHA, reuse_weight=bad_w)  # type: ignore[arg-type]
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=R, alpha=ALPHA, reuse="looksam")
    x, y = make_data("mlp", 1)
    opt.reuse_weight = -1.0  # assigned later: checked at the next step
    with pytest.raises(ValueError, match=r"gnp\.reuse_weight"):
        full_step(opt, "train_step", model, x, y)
    opt.reuse_weight = 1.0
    full_step(opt, "train_step", model, x, y)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"gnp\.reuse must be .* in the state dict"):
        opt.load_state_dict({**sd, "gnp": {**sd["gnp"], "reuse": "bogus"}})
    with pytest.raises(ValueError, match=r"reuse v\[0\] must be a tensor shaped like parameter 0"):
        opt.load_state_dict({**sd, "reuse": {"v": {0: torch.zeros(3)}}})
    with pytest.raises(ValueError, match="reuse v index"):
        opt.load_state_dict({**sd, "reuse": {"v": {99: torch.zeros(3)}}})
    with pytest.raises(ValueError, match="'reuse' must be a dict"):
        opt.load_state_dict({**sd, "reuse": {"w": {}}})
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="share one dtype"):
        opt.load_state_dict({**sd, "reuse": {"v": {0: torch.zeros(shapes[0]), 1: torch.zeros(shapes[1]).double()}}})


def test_registry() -> None:
    """The names the configuration's gnp.reuse accepts, besides "none"."""
    assert REUSE_VARIANTS == {"looksam": LookSAMReuse}


# ---------------------------------------------------------------------------------------------
# DDP: this file runs as the torchrun worker (see _ddp_worker below)

DDP_CASES = {  # name: (norm_perturbations, sync_perturbations, full-step entry, reuse_weight)
    "paper_train_step": (False, False, "train_step", 1.0),
    "paper_closure": (False, False, "step", 0.5),
    "normalized_train_step": (True, False, "train_step", 0.5),
    "normalized_closure": (True, False, "step", 1.0),
    "paper_sync": (False, True, "train_step", 1.0),
    "normalized_sync": (True, True, "train_step", 0.5),
}


@pytest.mark.dist
def test_ddp_v_and_plain_step_match_rank_averaged_math(tmp_path: Path) -> None:
    proc = run_torchrun(__file__, str(tmp_path), timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-8000:]}"
    results = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    tensors = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in range(2)]
    for res in results:
        assert set(res) == set(DDP_CASES)
        for name, r in res.items():
            normalized, sync, _, _ = DDP_CASES[name]
            assert max(r["v_err"]) < 1e-10, (name, r)
            assert max(r["plain_err"]) < 1e-10, (name, r)
            assert max(r["mix_err"]) < 1e-12, (name, r)
            # DDP's own bucket all-reduces: a plain step = one synchronised backward; a full step the
            # same (pass 1 under no_sync) or twice that with sync_perturbations
            plain_calls = r["hook_calls"]["plain"]
            assert plain_calls and len(set(plain_calls)) == 1 and plain_calls[0] > 0, (name, r)
            assert set(r["hook_calls"]["full"]) == {plain_calls[0] * (2 if sync else 1)}, (name, r)
            # reuse's own collective: none on plain steps; one on full steps unless g1 is already averaged
            assert r["extra"]["plain"] == [[]] * len(plain_calls), (name, r)
            want = [] if sync else [r["num_params"] * (2 if normalized else 1)]
            assert r["extra"]["full"] == [want] * len(r["extra"]["full"]), (name, r)
    for name in DDP_CASES:  # identical on both ranks, bitwise
        for key in tensors[0][name]:
            assert torch.equal(tensors[0][name][key], tensors[1][name][key]), (name, key)


def _ddp_batch(kind: str, step: int, rank: int, n: int = 6) -> tuple[Tensor, Tensor]:
    x, y = make_data(kind, 100 + step, n=2 * n)
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def _ddp_mean(t: Tensor) -> Tensor:
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _ddp_case(name: str, rank: int) -> tuple[dict, dict]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    normalized, sync, entry, weight = DDP_CASES[name]
    module = make_model("bnconv")
    model = DDP(module, gradient_as_bucket_view=entry == "step")
    counts = {"hook": 0, "extra": [], "in_hook": False}

    def counting_hook(state, bucket):  # no annotations: DDP inspects them
        state["hook"] += 1
        state["in_hook"] = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            state["in_hook"] = False

    model.register_comm_hook(counts, counting_hook)
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        if not counts["in_hook"]:
            counts["extra"].append(tensor.numel())
        return original_all_reduce(tensor, *args, **kwargs)

    base = RecordingSGD(model.parameters(), lr=0.1)
    opt = GNP(
        base,
        r=R,
        alpha=ALPHA,
        norm_perturbations=normalized,
        sync_perturbations=sync,
        reuse="looksam",
        reuse_weight=weight,
    )
    out: dict = {
        "v_err": [],
        "plain_err": [],
        "mix_err": [],
        "hook_calls": {"full": [], "plain": []},
        "extra": {"full": [], "plain": []},
        "num_params": sum(p.numel() for p in module.parameters()),
    }
    v_ref: Tensor | None = None
    for step, use_gnp in enumerate([True, False, False, True, False]):
        x, y = _ddp_batch("bnconv", step, rank)
        ref = copy.deepcopy(module)  # same parameters on every rank; the reference runs per rank
        if use_gnp:
            # per-rank g1_k; the perturbation uses g1_k (or the averaged ḡ1 with sync_perturbations)
            g1_k = flat(grads_at(ref, x, y))
            g1_pert = _ddp_mean(g1_k) if sync else g1_k
            n = g1_pert.norm()
            with torch.no_grad():
                for p, d in zip(ref.parameters(), unflat(g1_pert * (R / (n + EPS)), list(ref.parameters()))):
                    p.add_(d)
            g2_k = flat(grads_at(ref, x, y))
            c = (1 - ALPHA) / (n + EPS) if normalized else 1 - ALPHA
            mix = _ddp_mean(c * g1_pert + ALPHA * g2_k) if not sync else c * g1_pert + ALPHA * _ddp_mean(g2_k)
            v_ref = orthogonal_v(_ddp_mean(g1_k), _ddp_mean(g2_k))
        else:
            g_bar = _ddp_mean(flat(grads_at(ref, x, y)))
            assert v_ref is not None
            expected = g_bar + ALPHA * weight * g_bar.norm() * v_ref

        hooks_before = counts["hook"]
        counts["extra"] = []
        dist.all_reduce = counting_all_reduce
        try:
            if use_gnp:
                full_step(opt, entry, model, x, y)
            else:
                plain_step(opt, model, x, y)
        finally:
            dist.all_reduce = original_all_reduce
        kind = "full" if use_gnp else "plain"
        out["hook_calls"][kind].append(counts["hook"] - hooks_before)
        out["extra"][kind].append(counts["extra"])
        if use_gnp:
            out["mix_err"].append(rel(flat(base.seen[-1]), mix))
            out["v_err"].append(rel(stored_v(opt, module), v_ref))
        else:
            out["plain_err"].append(rel(flat(base.seen[-1]), expected))
    saved = {"v": stored_v(opt, module), "params": flat([p.detach() for p in module.parameters()])}
    del model, opt, base
    gc.collect()
    return out, saved


def _ddp_worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results, tensors = {}, {}
    for name in DDP_CASES:
        results[name], tensors[name] = _ddp_case(name, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    torch.save(tensors, os.path.join(out_dir, f"rank{rank}.pt"))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
