"""Small, dependency-free statistics for paired seed comparisons: Student's t distribution, paired t tests,
the two one-sided tests (TOST) of equivalence, and Holm's step-down correction.

Why not SciPy: it would be the project's only use of it; the incomplete beta function below is the standard
continued fraction (Numerical Recipes, 3rd ed., section 6.4) and tests/test_stats.py checks it against the
published t tables (the same NIST/SEMATECH values `compare.t_quantile_975` holds) and against exact forms
(df = 1: Cauchy; df = 2: closed form).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

_EPS = 1e-15
_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _mean_se(d: Sequence[float]) -> tuple[float, float]:
    n = len(d)
    if n < 2:
        raise ValueError(f"need at least 2 paired differences, got {n}")
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, sd / math.sqrt(n)


def paired_t(d: Sequence[float]) -> dict:
    """Two-sided paired t test of mean(d) = 0: mean, se, t, df, p."""
    mean, se = _mean_se(d)
    df = len(d) - 1
    if se == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return {"mean": mean, "se": se, "t": t, "df": df, "p": 2 * (1 - t_cdf(abs(t), df))}


def tost(d: Sequence[float], margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided tests of equivalence of paired differences `d` within ±`margin` (Schuirmann 1987).

    H0: |mu| >= margin. p = max of the one-sided p of mu > -margin and of mu < +margin; equivalence is shown
    when p < alpha, which is the same as the (1 - 2 alpha) interval lying inside (-margin, +margin)."""
    if margin <= 0:
        raise ValueError(f"tost: margin must be > 0, got {margin}")
    mean, se = _mean_se(d)
    df = len(d) - 1
    if se == 0:
        p_low = 0.0 if mean > -margin else 1.0
        p_high = 0.0 if mean < margin else 1.0
    else:
        p_low = 1 - t_cdf((mean + margin) / se, df)
        p_high = t_cdf((mean - margin) / se, df)
    half = t_quantile(1 - alpha, df) * se
    p = max(p_low, p_high)
    return {
        "mean": mean,
        "se": se,
        "df": df,
        "margin": margin,
        "p_lower": p_low,
        "p_upper": p_high,
        "p": p,
        "ci": [mean - half, mean + half],
        "ci_level": 1 - 2 * alpha,
        "equivalent": p < alpha,
    }


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (Holm 1979): compare each with the family's alpha."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return {k: out[k] for k in pvalues}
