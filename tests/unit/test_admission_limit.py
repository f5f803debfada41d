"""The admission controller's adaptive limit: upstream load per core (with the forecast's trend)
and the long lane's slowdown move it, with hysteresis; and the forecast trend it is given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.admission import AdmissionController
from proxy.optimise import forecast_trend
from proxy.settings import Settings


def _ctl(**over: Any) -> AdmissionController:
    base: dict[str, Any] = {
        "admission_enabled": True,
        "admission_max_limit": 4,
        "admission_upstream_cores": 2,
        "admission_saturation": 1.0,
        "admission_adjust_interval": 60.0,
    }
    return AdmissionController(Settings(**(base | over)))


def _interval(ctl: AdmissionController, *samples: int) -> None:
    """One adjustment interval's load samples (the interval has passed before the last)."""
    for a in samples[:-1]:
        ctl.observe_load(a)
    ctl._adjusted -= 3600  # the interval is over
    ctl.observe_load(samples[-1])


def _fill(ctl: AdmissionController, queued: int = 0) -> None:
    """Every slot taken, `queued` statements waiting."""
    while ctl.acquire("psql", lambda: None) is True:
        pass
    for _ in range(queued - 1):
        ctl.acquire("psql", lambda: None)


def test_load_above_saturation_shrinks_one_step_per_interval() -> None:
    ctl = _ctl()
    _fill(ctl)
    assert ctl.limit == 4 and ctl.running == 4
    _interval(ctl, 5, 6, 5)  # 5.3 active backends on 2 cores
    assert ctl.limit == 3 and ctl.load is not None and abs(ctl.load - 16 / 6) < 1e-9
    assert "active backends on 2 cores" in ctl.adjustments[-1][2]
    _interval(ctl, 6, 6)  # still saturated, but 3 slots with 4 running is still full
    assert ctl.limit == 2
    ctl.observe_load(9)  # inside the interval: no step
    assert ctl.limit == 2


def test_no_shrink_while_the_long_lane_has_free_slots() -> None:
    ctl = _ctl()
    ctl.acquire("psql", lambda: None)  # 1 of 4 slots used: the load is short queries'
    _interval(ctl, 8, 8)
    assert ctl.limit == 4


def test_grows_only_with_waiters_and_headroom_for_one_more() -> None:
    ctl = _ctl(admission_initial_limit=1)
    _fill(ctl, queued=2)
    assert ctl.limit == 1 and ctl.queued == 2
    _interval(ctl, 2, 1)  # 1.5 active: one more would make 2.5 > 1.0 x 2 cores
    assert ctl.limit == 1
    _interval(ctl, 1, 1)  # 1 active: one more makes 2 <= 2: grow, and a waiter is admitted
    assert ctl.limit == 2 and ctl.running == 2 and ctl.queued == 1
    # without waiters nothing grows, however idle the database
    idle = _ctl(admission_initial_limit=1)
    _interval(idle, 0, 0)
    assert idle.limit == 1


def test_a_rising_forecast_shrinks_earlier_and_blocks_growth() -> None:
    calm, rising = _ctl(), _ctl()
    rising.forecast_trend = 1.5
    for ctl in (calm, rising):
        _fill(ctl)
        _interval(ctl, 2, 2)  # 1.0 per core: at saturation, not above
    assert calm.limit == 4
    assert rising.limit == 3 and "forecast" in rising.adjustments[-1][2]

    grow = _ctl(admission_initial_limit=1)
    grow.forecast_trend = 1.5
    _fill(grow, queued=1)
    _interval(grow, 1, 1)  # 1 + 1 = 2 > 2 cores / 1.5 expected: no room
    assert grow.limit == 1


def test_the_long_lane_slowdown_still_shrinks_by_a_quarter() -> None:
    ctl = _ctl(admission_saturation=0.0)
    _fill(ctl)
    for _ in range(3):
        ctl.observe("SELECT pg_sleep(1)", 1.0, "long")  # learn the template: 1 s
    ctl._adjusted -= 3600
    for _ in range(4):
        ctl.observe("SELECT pg_sleep(1)", 4.0, "long")  # now much slower than usual
    assert ctl.limit == 3 and "usual time" in ctl.adjustments[-1][2]


def test_settings_reject_a_negative_saturation() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="admission_saturation"):
        Settings(admission_saturation=-1)


def _rows(start: datetime, predicted: list[float]) -> list[dict[str, Any]]:
    return [
        {"cluster": "total", "lead": i + 1, "predicted": p,
         "window_start": start + timedelta(minutes=5 * i)}
        for i, p in enumerate(predicted)
    ]  # fmt: skip


def test_forecast_trend() -> None:
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    rows = _rows(t0, [100.0, 130.0, 400.0, 50.0])
    assert forecast_trend(rows, t0 + timedelta(minutes=1)) == 1.3
    assert forecast_trend(rows, t0 + timedelta(minutes=6)) == 2.0  # clipped
    assert forecast_trend(rows, t0 + timedelta(minutes=11)) == 1.0  # falling: never below 1
    assert forecast_trend(rows, t0 - timedelta(hours=1)) == 1.3  # before: the first window
    assert forecast_trend(rows, t0 + timedelta(minutes=16)) == 1.0  # nothing after it
    assert forecast_trend([], t0) == 1.0
    other = [dict(r, cluster="0") for r in rows]
    assert forecast_trend(other, t0) == 1.0
