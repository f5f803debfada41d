"""The rate rule flags sustained bursts, not the pile-up a lock or a stall releases at once."""

from __future__ import annotations

import numpy as np

from models.anomaly import AnomalyModel, Execution

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def _traffic(rng: np.random.Generator, days: int) -> list[Execution]:
    fps = [f"q{i}" for i in range(10)]
    out = []
    for t in np.sort(rng.uniform(T0, T0 + days * DAY, days * 24 * 60)):
        fp = fps[int(rng.integers(len(fps)))]
        out.append(Execution(float(t), fp, "SELECT", 2.0, 1, False, 100, None, False, None, "app"))
    return out


def _rate_flags(extra: list[Execution], rng: np.random.Generator) -> tuple[set[int], set[int]]:
    out = _traffic(rng, 3) + extra
    out.sort(key=lambda e: e.ts)
    cut = next(k for k, e in enumerate(out) if e.ts >= T0 + 2 * DAY)
    model = AnomalyModel(n_estimators=20, random_state=0).fit(out[:cut])
    flags = model.detector().process(out[cut:])
    burst = {f.seq for f in flags if f.kind == "rate_burst"}
    planted = {k for k, e in enumerate(out[cut:]) if e.label == "b"}
    return burst, planted


def _arrivals(rng: np.random.Generator, seconds: float, n: int, label: str) -> list[Execution]:
    """`n` extra executions of q1 at random times within `seconds`, half a day into day 3."""
    t0 = T0 + 2.5 * DAY
    return [Execution(t0 + float(x), "q1", "SELECT", 2.0, 1, False, 100, None, False, label, "app")
            for x in np.sort(rng.uniform(0, seconds, n))]  # fmt: skip


def test_a_pile_up_released_at_once_is_not_a_burst() -> None:
    """Fifteen statements a lock held back reach the server within twenty seconds."""
    rng = np.random.default_rng(5)
    burst, _ = _rate_flags(_arrivals(rng, 20, 15, "p"), rng)
    assert not burst


def test_a_sustained_burst_is_flagged_from_its_start() -> None:
    """Thirty extra arrivals over ten minutes: flagged once sustained, the early ones too."""
    rng = np.random.default_rng(6)
    burst, planted = _rate_flags(_arrivals(rng, 600, 30, "b"), rng)
    assert len(burst & planted) >= 25 and len(burst - planted) <= 3


def _after_silence(rng: np.random.Generator, extra: list[Execution]) -> tuple[set[int], set[int]]:
    """Day 3's q1 falls silent for the two hours before `extra` arrive (held back: a lock)."""
    t0 = T0 + 2.5 * DAY
    out = [e for e in _traffic(rng, 3) if not (e.fingerprint == "q1" and t0 - 7200 <= e.ts < t0)]
    out = sorted(out + extra, key=lambda e: e.ts)
    cut = next(k for k, e in enumerate(out) if e.ts >= T0 + 2 * DAY)
    model = AnomalyModel(n_estimators=20, random_state=0).fit(out[:cut])
    flags = model.detector().process(out[cut:])
    return ({f.seq for f in flags if f.kind == "rate_burst"},
            {k for k, e in enumerate(out[cut:]) if e.label == "b"})  # fmt: skip


def test_a_release_after_a_long_silence_repays_the_deficit_and_is_not_a_burst() -> None:
    """Two hours without q1 (about twelve arrivals held back), then twelve over three minutes:
    as many as the silence owed. Judged on the trailing window alone (more than five where one
    is expected, sustained past `burst_min_span_s`) it would be a burst."""
    rng = np.random.default_rng(7)
    burst, _ = _after_silence(rng, _arrivals(rng, 180, 12, "p"))
    assert not burst


def test_a_burst_after_a_long_silence_beyond_the_deficit_is_flagged() -> None:
    rng = np.random.default_rng(8)
    burst, planted = _after_silence(rng, _arrivals(rng, 600, 45, "b"))
    assert len(burst & planted) >= 35 and len(burst - planted) <= 3, (len(burst), len(planted))


def test_the_burst_bound_skips_the_quantile_only_where_it_cannot_win() -> None:
    """`_burst_upper` equals max(Poisson quantile, factor x mean) everywhere; past the Chernoff
    bound it does not ask SciPy."""
    from models import anomaly

    rng = np.random.default_rng(5)
    for mu in np.exp(rng.uniform(-4.0, 13.0, 3000)):
        for alpha, factor in ((1e-3, 3.0), (1e-2, 1.5), (1e-4, 2.0)):
            exact = max(anomaly._poisson_upper(float(mu), alpha), factor * float(mu))
            assert anomaly._burst_upper(float(mu), alpha, factor) == exact
    anomaly._POISSON.clear()
    anomaly._burst_upper(50_000.0, 1e-3, 3.0)  # far past the bound: no quantile computed
    assert not anomaly._POISSON
    anomaly._burst_upper(1.0, 1e-3, 3.0)  # a small mean needs the quantile
    assert anomaly._POISSON


def test_a_steady_window_s_median_is_its_value() -> None:
    from collections import deque

    from models.anomaly import _small_median, _steady_median

    assert _steady_median(deque([2.0] * 64)) == 2.0
    rng = np.random.default_rng(3)
    for _ in range(200):
        values = deque(float(v) for v in rng.integers(0, 3, int(rng.integers(1, 65))))
        assert _steady_median(values) == _small_median(values)
    assert _steady_median(deque()) == 0.0
