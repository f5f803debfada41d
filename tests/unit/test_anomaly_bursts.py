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
