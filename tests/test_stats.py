"""trainer/study/stats.py against published tables and exact forms, not against itself."""

from __future__ import annotations

import math

import pytest

from trainer.study import stats
from trainer.study.compare import _T975


@pytest.mark.parametrize("df", range(1, 31))
def test_t_cdf_matches_the_published_975_quantiles(df):
    q = _T975[df - 1]  # NIST/SEMATECH table, four decimals
    assert stats.t_cdf(q, df) == pytest.approx(0.975, abs=2e-5)
    assert stats.t_cdf(-q, df) == pytest.approx(0.025, abs=2e-5)
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=6e-5)


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 100.0])
def test_t_cdf_exact_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has the closed form 1/2 + t / (2 sqrt(t^2 + 2)).
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    # large df: the normal distribution
    assert stats.t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)


def test_paired_t_by_hand():
    d = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sd sqrt(5/3), se sqrt(5/12)
    r = stats.paired_t(d)
    assert r["t"] == pytest.approx(2.5 / math.sqrt(5 / 12)) and r["df"] == 3
    assert r["p"] == pytest.approx(2 * (1 - stats.t_cdf(r["t"], 3)))
    assert 0.03 < r["p"] < 0.04  # t = 3.873 on 3 df: between the 0.05 (3.182) and 0.02 (4.541) two-sided quantiles


def test_tost_by_hand_and_its_interval_reading():
    d = [0.05, -0.1, 0.12, 0.0, 0.03]  # small differences: equivalent within ±0.3
    r = stats.tost(d, margin=0.3)
    mean, se = sum(d) / 5, math.sqrt(sum((x - sum(d) / 5) ** 2 for x in d) / 4) / math.sqrt(5)
    assert r["p_lower"] == pytest.approx(1 - stats.t_cdf((mean + 0.3) / se, 4))
    assert r["p_upper"] == pytest.approx(stats.t_cdf((mean - 0.3) / se, 4))
    assert r["equivalent"] and -0.3 < r["ci"][0] and r["ci"][1] < 0.3 and r["ci_level"] == pytest.approx(0.9)
    wide = stats.tost([0.5, -0.6, 0.4, -0.3, 0.2], margin=0.3)  # too noisy to show equivalence
    assert not wide["equivalent"] and (wide["ci"][0] < -0.3 or wide["ci"][1] > 0.3)
    shifted = stats.tost([0.45, 0.5, 0.55, 0.5, 0.48], margin=0.3)  # clearly different
    assert not shifted["equivalent"] and shifted["p_upper"] > 0.9


def test_holm_worked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    adj = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adj == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert stats.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}
