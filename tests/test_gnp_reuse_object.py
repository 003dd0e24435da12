"""trainer.optim.reuse.LookSAMReuse on its own: capture / store / apply / state_dict, without GNP.

Gradients are set by hand (fp64); the expected v and the corrected gradient are computed here from their
definitions (trainer/optim/reuse.py's docstring), never with the object itself:

    v = (g2 − <g1,g2>/(‖g1‖+eps)²·g1)/(‖g1‖+eps)        the mixed M given to ``store`` is
    M = (1−α)·g1 + α·g2  (paper mix)   or   (1−α)·g1/(‖g1‖+eps) + α·g2  (normalised mix), per group
    apply: g_i ← g_i + α_group·w·‖g‖·v_i   (‖g‖ over every gradient handed in)
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests.test_gnp_passes import gloo  # noqa: F401 -- the fixture
from trainer.optim.reuse import REUSE_VARIANTS, LookSAMReuse

EPS = 0.05  # large enough that a misplaced eps shows up at the tolerances below


def flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Setup:
    """Two param_groups; ``d`` (group 1) has no gradient at the full step, so it is outside v's layout."""

    def __init__(self, alphas: tuple[float, float], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.zeros(3, 2, dtype=torch.float64)
        self.b = torch.zeros(4, dtype=torch.float64)
        self.c = torch.zeros(5, dtype=torch.float64)
        self.d = torch.zeros(2, dtype=torch.float64)
        self.groups = [
            {"params": [self.a, self.b], "alpha": alphas[0]},
            {"params": [self.c, self.d], "alpha": alphas[1]},
        ]
        self.params = [self.a, self.b, self.c, self.d]  # state-dict index order
        self.index = {p: i for i, p in enumerate(self.params)}
        self.with_grad = [self.a, self.b, self.c]
        self.g1 = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in self.with_grad]
        self.g2 = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in self.with_grad]
        self.group_of = [0, 0, 1]

    def collected(self) -> list:
        return [
            (self.groups[0], [self.a, self.b], [self.a.grad, self.b.grad]),
            (self.groups[1], [self.c], [self.c.grad]),
        ]

    def set_grads(self, values: list[Tensor]) -> None:
        for p, v in zip(self.with_grad, values):
            p.grad = v.clone()

    def mixed(self, normalized: bool) -> list[Tensor]:
        n1 = flat(self.g1).norm()
        out = []
        for g1, g2, k in zip(self.g1, self.g2, self.group_of):
            a = self.groups[k]["alpha"]
            u = g1 / (n1 + EPS) if normalized else g1
            out.append((1 - a) * u + a * g2)
        return out

    def v_by_hand(self) -> Tensor:
        g1, g2 = flat(self.g1), flat(self.g2)
        n = g1.norm()
        return (g2 - (g1 @ g2) / (n + EPS) ** 2 * g1) / (n + EPS)

    def full_step(
        self, reuse: LookSAMReuse, normalized: bool, *, scale: float = 1.0, process_group=None, keep=False
    ) -> None:
        """What GNP does around a full step: capture g1 (maybe scaled), put M in .grad, store."""
        self.set_grads([g * scale for g in self.g1])
        reuse.capture(self.collected(), averaged_later=process_group is not None, norm_perturbations=normalized)
        self.set_grads(self.mixed(normalized))
        reuse.store(
            self.collected(),
            g1_norm=flat(self.g1).norm(),
            eps=EPS,
            norm_perturbations=normalized,
            scale_inv=None if scale == 1.0 else torch.tensor(1.0 / scale),
            process_group=process_group,
            keep_on_overflow=keep,
        )


def stored(reuse: LookSAMReuse, s: Setup) -> Tensor:
    saved = reuse.state_dict(s.index)["v"]
    assert sorted(saved) == [0, 1, 2]  # d had no gradient: not in v
    return flat([saved[i] for i in (0, 1, 2)])


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("alphas", [(0.8, 0.8), (0.5, 1.3), (1.0, 0.3)])
def test_store_builds_v_from_g1_and_the_mix(normalized: bool, alphas: tuple[float, float]) -> None:
    s = Setup(alphas)
    reuse = LookSAMReuse()
    s.full_step(reuse, normalized)
    v = stored(reuse, s)
    assert v.dtype == torch.float64
    assert rel(v, s.v_by_hand()) < 1e-12


def test_scaled_g1_is_unscaled() -> None:
    """GradScaler: capture sees g1·S, store gets 1/S (a power of two) and the unscaled ‖g1‖."""
    s = Setup((0.7, 0.7))
    plain, scaled = LookSAMReuse(), LookSAMReuse()
    s.full_step(plain, False)
    s.full_step(scaled, False, scale=2.0**12)
    assert torch.equal(stored(plain, s), stored(scaled, s))


def test_overflow_keeps_the_previous_v() -> None:
    s = Setup((0.8, 0.8))
    reuse = LookSAMReuse()
    s.full_step(reuse, False, keep=True)
    first = stored(reuse, s).clone()
    assert rel(first, s.v_by_hand()) < 1e-12  # finite: written as without keep_on_overflow
    s.g2[1] = s.g2[1].clone()
    s.g2[1][0] = float("inf")
    s.full_step(reuse, False, keep=True)
    assert torch.equal(stored(reuse, s), first)


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_apply_adds_alpha_w_norm_v(weight: float) -> None:
    s = Setup((0.8, 1.5))
    reuse = LookSAMReuse()
    s.full_step(reuse, False)
    v = s.v_by_hand()
    gen = torch.Generator().manual_seed(7)
    g = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in s.params]
    for p, gi in zip(s.params, g):
        p.grad = gi.clone()
    reuse.apply(s.groups, [p.grad for p in s.params], weight=weight)
    norm = flat(g).norm()  # every gradient handed in, d's too
    start = 0
    for p, gi, k in zip(s.with_grad, g, s.group_of):
        vi = v[start : start + p.numel()].view_as(p)
        start += p.numel()
        expected = gi + s.groups[k]["alpha"] * weight * norm * vi
        assert rel(p.grad, expected) < 1e-12
    assert torch.equal(s.d.grad, g[3])  # outside v's layout: untouched


def test_apply_is_a_no_op_without_v_with_w_0_or_alpha_0() -> None:
    s = Setup((0.8, 0.0))
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in s.params]

    def applied(reuse: LookSAMReuse, weight: float) -> list[Tensor]:
        for p, gi in zip(s.params, g):
            p.grad = gi.clone()
        reuse.apply(s.groups, [p.grad for p in s.params], weight=weight)
        return [p.grad for p in s.params]

    fresh = LookSAMReuse()  # before the first full step
    assert all(torch.equal(a, b) for a, b in zip(applied(fresh, 1.0), g))
    reuse = LookSAMReuse()
    s.full_step(reuse, False)
    assert all(torch.equal(a, b) for a, b in zip(applied(reuse, 0.0), g))
    out = applied(reuse, 1.0)
    assert not torch.equal(out[0], g[0])  # group 0 (alpha 0.8) corrected
    assert torch.equal(out[2], g[2]) and torch.equal(out[3], g[3])  # group 1 has alpha 0


def test_state_dict_round_trip() -> None:
    s = Setup((0.8, 0.6))
    reuse = LookSAMReuse()
    s.full_step(reuse, True)
    buf = io.BytesIO()
    torch.save(reuse.state_dict(s.index), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert sorted(saved["v"]) == [0, 1, 2] and saved["v"][0].shape == s.a.shape
    loaded = LookSAMReuse()
    loaded.load_state_dict(saved, s.params)
    assert torch.equal(stored(loaded, s), stored(reuse, s))
    # both correct a plain step identically
    gen = torch.Generator().manual_seed(5)
    g = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in s.params]
    results = []
    for obj in (reuse, loaded):
        for p, gi in zip(s.params, g):
            p.grad = gi.clone()
        obj.apply(s.groups, [p.grad for p in s.params], weight=1.0)
        results.append([p.grad.clone() for p in s.params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # empty state: no v
    loaded.load_state_dict({"v": {}}, s.params)
    assert loaded.v is None and loaded.state_dict(s.index) == {"v": {}}


def test_load_state_dict_rejects_bad_entries() -> None:
    s = Setup((0.8, 0.8))
    reuse = LookSAMReuse()
    with pytest.raises(ValueError, match="'reuse' must be a dict"):
        reuse.load_state_dict({"w": {}}, s.params)
    with pytest.raises(ValueError, match=r"reuse v\[1\] must be a tensor shaped like parameter 1"):
        reuse.load_state_dict({"v": {1: torch.zeros(3)}}, s.params)
    with pytest.raises(ValueError, match="reuse v index"):
        reuse.load_state_dict({"v": {4: torch.zeros(2)}}, s.params)
    with pytest.raises(ValueError, match="share one dtype"):
        reuse.load_state_dict({"v": {0: torch.zeros(6), 1: torch.zeros(4, dtype=torch.float64)}}, s.params)


@pytest.mark.parametrize("normalized", [False, True])
def test_store_with_a_process_group(gloo: None, tmp_path: Path, normalized: bool) -> None:
    """The DDP path (rank-local g1 all-reduced in store; the normalised mix averages g1/(‖g1‖+eps) too) in a
    one-process gloo group, where the rank average is the value itself."""
    import torch.distributed as dist

    s = Setup((0.5, 0.5))
    reuse = LookSAMReuse()
    s.full_step(reuse, normalized, process_group=dist.group.WORLD)
    assert reuse.scratch is not None and reuse.scratch.numel() == (2 if normalized else 1) * 15
    assert rel(stored(reuse, s), s.v_by_hand()) < 1e-12


def test_registry() -> None:
    assert REUSE_VARIANTS == {"looksam": LookSAMReuse}
