"""GNP optimizer: checked against exact math and hand-written updates (CPU, single process).

References are computed here with ``torch.autograd.grad`` / ``torch.autograd.functional.hessian`` and
plain tensor arithmetic, never with GNP itself. The combined gradient is observed through a base
optimizer that records the gradient it receives and leaves the parameters alone.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.optim.gnp import GNP, StepInfo, exact_gnp_gradient

ENTRIES = ("step", "train_step")


# ---------------------------------------------------------------------------------------------
# helpers


class GradCapture(torch.optim.Optimizer):
    """Base optimizer that records (clones of) the gradients it is asked to apply; no update."""

    def __init__(self, params, lr: float = 0.0) -> None:
        super().__init__(params, {"lr": lr})
        self.seen: list[list[Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def make_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def make_convnet(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    ).to(dtype)


def make_data(kind: str, dtype: torch.dtype = torch.float64, n: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "mlp" else (n, 2, 4, 4)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def grads_at(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    loss = loss_of(model, x, y)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def reference_gnp(
    model: nn.Module, x: Tensor, y: Tensor, r: float, alpha: float, normalized: bool, eps: float = 1e-12
) -> dict:
    """GNP written out: g1, n, eps-perturbation, g2, mix (model parameters are left unchanged)."""
    params = list(model.parameters())
    loss1, g1 = grads_at(model, x, y)
    n = torch.sqrt(sum((g.double() ** 2).sum() for g in g1))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(g * (r / (n + eps)).to(p.dtype))
    loss2, g2 = grads_at(model, x, y)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    c = (1 - alpha) / (n + eps) if normalized else torch.tensor(1 - alpha, dtype=torch.float64)
    mixed = [(c * a.double() + alpha * b.double()).to(a.dtype) for a, b in zip(g1, g2)]
    return {"g": mixed, "g1": g1, "g2": g2, "n": n, "loss1": loss1, "loss2": loss2}


def run_entry(opt: GNP, entry: str, model: nn.Module, loss_fn: Callable[[], Tensor], **kw) -> StepInfo | Tensor:
    """One step through `step(closure)` or `train_step(loss_fn)`."""
    if entry == "step":

        def closure() -> Tensor:
            loss = loss_fn()
            loss.backward()
            return loss

        return opt.step(closure)
    return opt.train_step(loss_fn, model=model, **kw)


def flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# ---------------------------------------------------------------------------------------------
# exact gradient and the finite-difference approximation


def test_exact_gradient_equals_hessian_formula() -> None:
    """exact_gnp_gradient = g + lam*H g/|g| with H from torch.autograd.functional.hessian."""
    model = make_mlp()
    x, y = make_data("mlp")
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = flat([p.detach() for p in model.parameters()])

    def f(vec: Tensor) -> Tensor:
        chunks, i = {}, 0
        for name, shape in zip(names, shapes):
            chunks[name] = vec[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return F.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    g = torch.autograd.functional.jacobian(f, theta)
    h = torch.autograd.functional.hessian(f, theta)
    lam = 0.07
    expected = g + lam * h @ g / g.norm()
    got = flat(exact_gnp_gradient(lambda: loss_of(model, x, y), model.parameters(), lam))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_finite_difference_converges_linearly_in_r(kind: str, entry: str) -> None:
    """Paper mix at fixed lam = alpha*r -> exact gradient, error ~ O(r): r=1e-3 vs 1e-5 differ ~100x."""
    lam = 0.05
    x, y = make_data(kind)
    errors = {}
    for r in (1e-3, 1e-5):
        model = make_mlp() if kind == "mlp" else make_convnet()
        exact = exact_gnp_gradient(lambda: loss_of(model, x, y), model.parameters(), lam)
        base = GradCapture(model.parameters())
        opt = GNP(base, r=r, alpha=lam / r)
        run_entry(opt, entry, model, lambda: loss_of(model, x, y))
        errors[r] = rel_err(base.seen[0], exact)
    ratio = errors[1e-3] / errors[1e-5]
    assert errors[1e-5] < 1e-5, errors
    assert 80 < ratio < 125, (errors, ratio)


# ---------------------------------------------------------------------------------------------
# special cases and the mix formula


class NoisyNet(nn.Module):
    """Dropout + BatchNorm: exercises RNG and buffers in the bitwise comparisons."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("which", ["alpha0", "r0"])
def test_plain_cases_bitwise_equal_base_optimizer(entry: str, which: str) -> None:
    """alpha = 0 (or r = 0): bitwise the base optimizer's steps, closure called once per step."""
    torch.manual_seed(0)
    ref = NoisyNet()
    torch.manual_seed(0)
    model = NoisyNet()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = GNP(base, r=0.0 if which == "r0" else 0.1, alpha=0.0 if which == "alpha0" else 0.8)
    calls = []
    for step in range(4):
        x, y = make_data("mlp", torch.float32, n=16, seed=10 + step)
        torch.manual_seed(100 + step)
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()

        def loss_fn() -> Tensor:
            calls.append(step)
            return loss_of(model, x, y)

        torch.manual_seed(100 + step)
        run_entry(opt, entry, model, loss_fn)
    assert calls == [0, 1, 2, 3]
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ENTRIES)
def test_alpha_one_is_sam(entry: str) -> None:
    """alpha = 1: theta <- theta - lr * grad L(theta + r g1/|g1|), SAM written out here."""
    r, lr = 0.2, 0.1
    sam_model, model = make_mlp(), make_mlp()
    opt = GNP(torch.optim.SGD(model.parameters(), lr=lr), r=r, alpha=1.0)
    for step in range(3):
        x, y = make_data("mlp", seed=step)
        params = list(sam_model.parameters())
        g1 = torch.autograd.grad(loss_of(sam_model, x, y), params)
        norm = torch.sqrt(sum((g**2).sum() for g in g1))
        with torch.no_grad():
            e = [r * g / (norm + 1e-12) for g in g1]
            for p, d in zip(params, e):
                p.add_(d)
        g2 = torch.autograd.grad(loss_of(sam_model, x, y), params)
        with torch.no_grad():
            for p, d, g in zip(params, e, g2):
                p.sub_(d)
                p.sub_(lr * g)
        run_entry(opt, entry, model, lambda: loss_of(model, x, y))
    for a, b in zip(sam_model.parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("alpha", [0.8, 2.5])
def test_mix_equals_hand_formula(entry: str, normalized: bool, alpha: float) -> None:
    """(1-a) g1 + a g2 (paper) and (1-a) g1/(|g1|+eps) + a g2 (reference default); a > 1 allowed."""
    r = 0.1
    for kind in ("mlp", "conv"):
        model = make_mlp() if kind == "mlp" else make_convnet()
        x, y = make_data(kind)
        expected = reference_gnp(model, x, y, r, alpha, normalized)
        base = GradCapture(model.parameters())
        opt = GNP(base, r=r, alpha=alpha, norm_perturbations=normalized)
        run_entry(opt, entry, model, lambda: loss_of(model, x, y))
        for got, want in zip(base.seen[0], expected["g"]):
            assert torch.allclose(got, want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("entry", ENTRIES)
def test_per_group_r_and_alpha(entry: str) -> None:
    """Each group perturbs with its own r (one global norm) and mixes with its own alpha."""
    model = make_mlp()
    x, y = make_data("mlp")
    w = [model[0].weight, model[2].weight]
    b = [model[0].bias, model[2].bias]
    base = GradCapture([{"params": w, "r": 0.05, "alpha": 0.5}, {"params": b, "r": 0.3, "alpha": 0.9}])
    opt = GNP(base, r=1.0, alpha=1.0)  # group values win over the defaults (setdefault)
    seen_params = []

    def loss_fn() -> Tensor:
        seen_params.append([p.detach().clone() for p in w + b])
        return loss_of(model, x, y)

    theta = [p.detach().clone() for p in w + b]
    _, g1 = grads_at(model, x, y)
    g1 = dict(zip([id(p) for p in model.parameters()], g1))
    norm = torch.sqrt(sum((g**2).sum() for g in g1.values()))
    run_entry(opt, entry, model, loss_fn)
    rs = [0.05, 0.05, 0.3, 0.3]
    alphas = [0.5, 0.5, 0.9, 0.9]
    perturbed = [t + r_ * g1[id(p)] / (norm + 1e-12) for t, r_, p in zip(theta, rs, w + b)]
    for got, want in zip(seen_params[1], perturbed):
        assert torch.allclose(got, want, rtol=0, atol=1e-14)
    # g2 at the per-group perturbation, by hand
    with torch.no_grad():
        for p, q in zip(w + b, perturbed):
            p.copy_(q)
    g2 = torch.autograd.grad(loss_of(model, x, y), w + b)
    for got, p, a, g in zip(base.seen[0], w + b, alphas, g2):
        want = (1 - a) * g1[id(p)] + a * g
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-13)


def test_different_alphas_with_a_zero_rejected() -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    opt = GNP(
        GradCapture(
            [{"params": [model[0].weight], "alpha": 0.0}, {"params": [model[0].bias, model[2].weight, model[2].bias]}]
        ),
        r=0.1,
        alpha=0.5,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="different alphas"):
        opt.train_step(lambda: loss_of(model, x, y), model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("entry", ENTRIES)
def test_theta_restored_bitwise(entry: str) -> None:
    torch.manual_seed(3)
    model = NoisyNet()
    x, y = make_data("mlp", torch.float32, n=16)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss_fn() -> Tensor:
        seen.append([p.detach().clone() for p in model.parameters()])
        return loss_of(model, x, y)

    base = GradCapture(model.parameters())
    opt = GNP(base, r=0.3, alpha=0.8, norm_perturbations=True)
    for _ in range(3):
        run_entry(opt, entry, model, loss_fn)
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # pass 2 really was elsewhere


def test_zero_gradient_does_not_give_nan() -> None:
    """g1 = 0: the eps in |g1|+eps keeps the step finite (the reference would divide by 0)."""
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = GNP(torch.optim.SGD([w], lr=0.1), r=0.1, alpha=0.8, norm_perturbations=True)
    info = opt.train_step(lambda: ((w - w.detach()) ** 2).sum(), model=nn.Module())
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))
    assert float(info.grad_norm) == 0.0 and float(info.g1_norm) == 0.0


# ---------------------------------------------------------------------------------------------
# pass structure: calls, BatchNorm, RNG, true_gradient


@pytest.mark.parametrize("entry", ENTRIES)
def test_number_of_passes(entry: str) -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    calls = []

    def loss_fn() -> Tensor:
        calls.append(1)
        return loss_of(model, x, y)

    for r, alpha, expected in ((0.0, 0.8, 1), (0.1, 0.0, 1), (0.1, 0.8, 2), (0.1, 1.0, 2)):
        calls.clear()
        opt = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=r, alpha=alpha)
        run_entry(opt, entry, model, loss_fn)
        assert len(calls) == expected, (r, alpha)
    calls.clear()
    info = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=0.1, alpha=0.8).train_step(
        loss_fn, model=model, gnp=False
    )
    assert len(calls) == 1 and info.gnp is False and info.loss_perturbed is None and info.g1_norm is None


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.bn_cma = nn.BatchNorm1d(16, momentum=None)  # cumulative average: uses num_batches_tracked
        self.bn_off = nn.BatchNorm1d(16, track_running_stats=False)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(torch.relu(self.bn2d(self.conv(x))), 2).flatten(1)
        return self.fc(self.drop(self.bn_off(self.bn_cma(h))))


@pytest.mark.parametrize("entry", ENTRIES)
def test_batchnorm_stats_come_from_pass1_only(entry: str) -> None:
    torch.manual_seed(0)
    model, ref = BNNet(), BNNet()
    ref.load_state_dict(model.state_dict())
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=0.5, alpha=0.8)
    for step in range(3):
        x, y = make_data("conv", torch.float32, n=8, seed=step)
        torch.manual_seed(step)
        ref(x)  # pass 1 alone, at the same theta and with the same dropout draws
        torch.manual_seed(step)
        kw = {"gnp": step != 1} if entry == "train_step" else {}  # a plain step in between
        run_entry(opt, entry, model, lambda: loss_of(model, x, y), **kw)
        for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
    assert int(model.bn2d.num_batches_tracked) == 3
    assert model.bn2d.track_running_stats and model.bn_cma.track_running_stats
    assert not model.bn_off.track_running_stats


@pytest.mark.parametrize("raise_in", [1, 2])
@pytest.mark.parametrize("entry", ENTRIES)
def test_everything_restored_when_a_pass_raises(entry: str, raise_in: int) -> None:
    """θ bitwise, BatchNorm tracking (a layer the user turned off stays off), the true_gradient flag and, for
    step(closure), the global forward pre-hook: all as before the step when pass 1 or pass 2 raises. (DDP's
    synchronisation flag: tests/test_gnp_passes.py, which has the gloo group.)"""
    torch.manual_seed(0)
    probe = NoiseProbe()
    model = nn.Sequential(BNNet(), probe)
    x, y = make_data("conv", torch.float32, n=8)
    before = {k: v.clone() for k, v in model.named_parameters()}
    calls = []

    def loss_fn() -> Tensor:
        calls.append(1)
        if len(calls) == raise_in:
            model(x)  # the pass's settings are in force when it raises
            raise KeyError("boom")
        return loss_of(model, x, y)

    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.5, alpha=0.8)
    with pytest.raises(KeyError):
        run_entry(opt, entry, model, loss_fn)
    assert probe.flags[-1] is (raise_in == 1)  # the pass's own setting was applied ...
    assert model[0].bn2d.track_running_stats and not model[0].bn_off.track_running_stats  # ... and undone
    assert probe.true_gradient is False
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    probe.true_gradient = True  # no hook left behind: a plain forward sees the module's own setting
    model(x)
    assert probe.flags[-1] is True


class NoiseProbe(nn.Module):
    """Adds fresh uniform noise; remembers the draws and its true_gradient flag per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.true_gradient = False
        self.draws: list[Tensor] = []
        self.flags: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.rand(x.shape[-1])
        self.draws.append(noise)
        self.flags.append(self.true_gradient)
        return x + 0.01 * noise


@pytest.mark.parametrize("flag_before", [False, True])
@pytest.mark.parametrize("entry", ENTRIES)
def test_same_randomness_in_both_passes_and_true_gradient_flag(entry: str, flag_before: bool) -> None:
    """Pass 2 draws what pass 1 drew (noise and dropout mask); true_gradient is True in pass 1, False in pass 2
    and in plain steps, and afterwards whatever it was before."""
    torch.manual_seed(0)
    probe = NoiseProbe()
    probe.true_gradient = flag_before
    drop = nn.Dropout(0.5)
    masks: list[Tensor] = []
    drop.register_forward_hook(lambda m, args, out: masks.append(out != 0))
    model = nn.Sequential(nn.Linear(4, 6), probe, drop, nn.Linear(6, 3))
    x, y = make_data("mlp", torch.float32, n=16)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.01), r=0.1, alpha=0.8)
    run_entry(opt, entry, model, lambda: loss_of(model, x, y))
    run_entry(opt, entry, model, lambda: loss_of(model, x, y))
    assert torch.equal(probe.draws[0], probe.draws[1]) and torch.equal(probe.draws[2], probe.draws[3])
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])
    # teeth: the generator advances per step, so an un-restored pass 2 would draw something else
    assert not torch.equal(probe.draws[0], probe.draws[2]) and not torch.equal(masks[0], masks[2])
    assert probe.flags == [True, False, True, False] and probe.true_gradient is flag_before
    probe.flags.clear()
    opt.param_groups[0]["alpha"] = 0.0
    run_entry(opt, entry, model, lambda: loss_of(model, x, y))
    assert probe.flags == [False] and probe.true_gradient is flag_before


def test_dropout_masks_identical_in_both_passes() -> None:
    """With a perturbation below float32 resolution, pass 2 repeats pass 1 exactly iff masks match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    x, y = make_data("mlp", torch.float32, n=16)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=1e-30, alpha=0.5)
    info = opt.train_step(lambda: loss_of(model, x, y), model=model)
    assert torch.equal(info.loss, info.loss_perturbed)


# ---------------------------------------------------------------------------------------------
# StepInfo, clipping, host syncs


def test_step_info_values() -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    expected = reference_gnp(model, x, y, 0.1, 0.8, normalized=False)
    opt = GNP(GradCapture(model.parameters()), r=0.1, alpha=0.8)
    info = opt.train_step(lambda: loss_of(model, x, y), model=model)
    assert info.gnp is True and info.skipped is None
    for t in (info.loss, info.loss_perturbed, info.g1_norm, info.grad_norm):
        assert t.dim() == 0 and not t.requires_grad
    assert torch.allclose(info.loss, expected["loss1"], rtol=1e-14)
    assert torch.allclose(info.loss_perturbed, expected["loss2"], rtol=1e-14)
    assert torch.allclose(info.g1_norm, expected["n"], rtol=1e-13)
    assert torch.allclose(info.grad_norm, flat(expected["g"]).norm(), rtol=1e-12)


@pytest.mark.parametrize("entry_clip", [0.0, -1.0, 1e9, "half"])
def test_clip_applies_to_final_gradient(entry_clip) -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    expected = reference_gnp(model, x, y, 0.1, 0.8, normalized=True)
    full = flat(expected["g"]).norm()
    clip = 0.5 * float(full) if entry_clip == "half" else entry_clip
    base = GradCapture(model.parameters())
    opt = GNP(base, r=0.1, alpha=0.8, norm_perturbations=True)
    info = opt.train_step(lambda: loss_of(model, x, y), model=model, clip_norm=clip)
    factor = min(1.0, clip / (float(full) + 1e-6)) if clip > 0 else 1.0
    for got, want in zip(base.seen[0], expected["g"]):
        assert torch.allclose(got, want * factor, rtol=1e-11, atol=1e-13)
    assert torch.allclose(info.grad_norm, full, rtol=1e-12)  # reported before clipping
    if entry_clip == "half":
        assert math.isclose(float(flat(base.seen[0]).norm()), clip, rel_tol=1e-5)  # +1e-6 in the denominator


def test_train_step_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item()/bool()/float() on tensors inside train_step (GPU pipelines would stall)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    x, y = make_data("mlp", torch.float32, n=16)
    opt = GNP(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        r=0.1,
        alpha=0.8,
        norm_perturbations=True,
    )
    opt.train_step(lambda: loss_of(model, x, y), model=model, clip_norm=1.0)  # lazy setup outside the check

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for gnp in (True, False):
        opt.train_step(lambda: loss_of(model, x, y), model=model, gnp=gnp, clip_norm=1.0)
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------------
# fp16 GradScaler


def _scaler_run(overflow_pass: int | None, normalized: bool):
    model = make_mlp(torch.float32)
    x, y = make_data("mlp", torch.float32)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = GNP(base, r=0.1, alpha=0.8, norm_perturbations=normalized)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt.train_step(lambda: loss_of(model, x, y), model=model, scaler=scaler)  # momentum exists now
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [base.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    seen, calls = [], []

    def loss_fn() -> Tensor:
        calls.append(1)
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = loss_of(model, x, y)
        return loss * 1e38 if len(calls) == overflow_pass else loss  # x 65536 overflows float32

    info = opt.train_step(loss_fn, model=model, scaler=scaler)
    return model, base, scaler, info, params, momentum, seen, (x, y)


@pytest.mark.parametrize("overflow_pass", [1, 2])
@pytest.mark.parametrize("normalized", [False, True])
def test_fp16_scaler_overflow_skips_step(overflow_pass: int, normalized: bool) -> None:
    model, base, scaler, info, params, momentum, seen, (x, y) = _scaler_run(overflow_pass, normalized)
    assert bool(info.skipped) is True
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)
    for a, p in zip(momentum, model.parameters()):
        assert torch.equal(a, base.state[p]["momentum_buffer"])
    assert scaler.get_scale() == 2.0**15  # one backoff per step, not per pass
    if overflow_pass == 1:  # non-finite g1 perturbs by 0: pass 2 ran at theta
        for a, b in zip(seen[1], params):
            assert torch.equal(a, b)
        assert torch.isfinite(info.loss_perturbed)


@pytest.mark.parametrize("normalized", [False, True])
def test_fp16_scaler_without_overflow_matches_fp32_formula(normalized: bool) -> None:
    model = make_mlp(torch.float32)
    x, y = make_data("mlp", torch.float32)
    expected = reference_gnp(model, x, y, 0.1, 0.8, normalized)
    base = GradCapture(model.parameters())
    opt = GNP(base, r=0.1, alpha=0.8, norm_perturbations=normalized)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    info = opt.train_step(lambda: loss_of(model, x, y), model=model, scaler=scaler, clip_norm=0.0)
    assert bool(info.skipped) is False and scaler.get_scale() == 2.0**10
    assert torch.allclose(info.g1_norm.double(), expected["n"], rtol=1e-6)
    for got, want in zip(base.seen[0], expected["g"]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_fp16_autocast_cpu_runs() -> None:
    """Real fp16 autocast + GradScaler on CPU: a finite, non-skipped step close to the fp32 one."""
    model = make_mlp(torch.float32)
    x, y = make_data("mlp", torch.float32)
    expected = reference_gnp(model, x, y, 0.1, 0.8, normalized=False)
    base = GradCapture(model.parameters())
    opt = GNP(base, r=0.1, alpha=0.8)
    scaler = torch.amp.GradScaler("cpu")

    def loss_fn() -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    info = opt.train_step(loss_fn, model=model, scaler=scaler)
    assert bool(info.skipped) is False
    assert rel_err(base.seen[0], expected["g"]) < 1e-2


# ---------------------------------------------------------------------------------------------
# state_dict, schedulers, param groups


@pytest.mark.parametrize("base_name", ["sgd_nesterov", "adamw"])
def test_state_dict_resume_is_bitwise(base_name: str) -> None:
    def build(seed: int, r: float, alpha: float, normalized: bool) -> tuple[nn.Module, GNP]:
        torch.manual_seed(seed)
        model = NoisyNet()
        if base_name == "sgd_nesterov":
            base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        else:
            base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
        return model, GNP(base, r=r, alpha=alpha, norm_perturbations=normalized)

    batches = [make_data("mlp", torch.float32, n=16, seed=s) for s in range(6)]

    def run(model: nn.Module, opt: GNP, steps: range) -> None:
        for i in steps:
            x, y = batches[i]
            opt.param_groups[0]["alpha"] = 0.5 + 0.1 * i  # a schedule writing alpha into the groups
            opt.train_step(lambda: loss_of(model, x, y), model=model, clip_norm=2.0)

    torch.manual_seed(123)
    model_a, opt_a = build(0, 0.1, 0.8, True)
    run(model_a, opt_a, range(6))

    torch.manual_seed(123)
    model_b, opt_b = build(0, 0.1, 0.8, True)
    run(model_b, opt_b, range(3))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    sd_state = ckpt["opt"]["state"]
    allowed = {"momentum_buffer"} if base_name == "sgd_nesterov" else {"step", "exp_avg", "exp_avg_sq"}
    assert len(sd_state) == len(list(model_b.parameters()))
    assert all(set(s) == allowed for s in sd_state.values())  # base state present, no theta copies

    model_c, opt_c = build(7, 0.9, 0.1, False)  # different init and settings: all must come from ckpt
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    assert opt_c.norm_perturbations is True and opt_c.param_groups[0]["r"] == 0.1
    assert opt_c.param_groups is opt_c.base_optimizer.param_groups
    run(model_c, opt_c, range(3, 6))
    for (name, a), b in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, b), name
    for p_a, p_c in zip(model_a.parameters(), model_c.parameters()):
        for key in allowed:
            assert torch.equal(opt_a.state[p_a][key], opt_c.state[p_c][key])


def test_param_groups_shared_with_base_and_scheduler() -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    base = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = GNP(base, r=0.1, alpha=0.8)
    assert opt.param_groups is base.param_groups
    assert base.param_groups[0]["r"] == 0.1 and base.param_groups[0]["alpha"] == 0.8
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    opt.train_step(lambda: loss_of(model, x, y), model=model)
    sched.step()
    assert base.param_groups[0]["lr"] == 0.5
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "r": 0.2})
    assert len(base.param_groups) == 2 and base.param_groups[1]["r"] == 0.2
    assert base.param_groups[1]["alpha"] == 0.8 and "momentum" in base.param_groups[1]


# ---------------------------------------------------------------------------------------------
# errors


def test_invalid_arguments() -> None:
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="r must be"):
        GNP(base, r=-0.1, alpha=0.8)
    with pytest.raises(ValueError, match="alpha must be"):
        GNP(base, r=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        GNP(base, r=0.1, alpha=float("nan"))
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        GNP(model, r=0.1, alpha=0.8)  # type: ignore[arg-type]
    opt = GNP(base, r=0.1, alpha=0.8)
    opt.param_groups[0]["r"] = -1.0  # a broken schedule
    with pytest.raises(ValueError, match=r"r must be .*param_groups\[0\]"):
        opt.train_step(lambda: loss_of(model, *make_data("mlp")), model=model)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_closures(entry: str) -> None:
    model = make_mlp()
    x, y = make_data("mlp")
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.8)
    if entry == "step":
        with pytest.raises(ValueError, match="needs a closure"):
            opt.step()
        with pytest.raises(RuntimeError, match="returned None"):
            opt.step(lambda: loss_of(model, x, y).backward())
        with pytest.raises(RuntimeError, match="no parameter has a gradient"):
            opt.step(lambda: loss_of(model, x, y))  # never calls backward
        calls = []

        def once() -> Tensor:  # backward in pass 1 only
            loss = loss_of(model, x, y)
            if not calls:
                loss.backward()
            calls.append(1)
            return loss

        with pytest.raises(RuntimeError, match="did not call loss.backward"):
            opt.step(once)
    else:
        with pytest.raises(RuntimeError, match="returned None"):
            opt.train_step(lambda: None, model=model)
        with pytest.raises(ValueError, match="clip_norm"):
            opt.train_step(lambda: loss_of(model, x, y), model=model, clip_norm=float("nan"))
    other = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt2 = GNP(torch.optim.SGD([other], lr=0.1), r=0.1, alpha=0.8)  # loss does not use `other`
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        run_entry(opt2, entry, model, lambda: loss_of(model, x, y))


def test_torch_compile_matches_eager() -> None:
    """A torch.compile'd model (aot_eager backend: no C++ toolchain needed) gives the eager results
    bitwise, with BN frozen in pass 2 compiled as a second graph and no further recompiles."""
    import torch._dynamo

    torch._dynamo.reset()

    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    torch.manual_seed(0)
    eager = net()
    compiled_module = net()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, backend="aot_eager")
    opts = [
        GNP(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), r=0.2, alpha=0.8) for m in (eager, compiled_module)
    ]
    for step in range(4):
        x, y = make_data("conv", torch.float32, n=8, seed=step)
        infos = []
        for model, opt in zip((eager, compiled), opts):
            torch.manual_seed(step)
            infos.append(opt.train_step(lambda: loss_of(model, x, y), model=model, gnp=step != 2, clip_norm=1.0))
        assert torch.equal(infos[0].loss, infos[1].loss)
    for (name, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()
