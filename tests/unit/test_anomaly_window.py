"""A fingerprint's baseline keeps its latency window in order as it goes: the median and the
median deviation read from it are the numbers two sorts of the window gave."""

from __future__ import annotations

import math
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from models import accel
from models import anomaly as compiled

SOURCE = accel.load_source("models.anomaly")


def _median(values: list[float]) -> float:  # what refresh computed before (sorted, middle)
    v = sorted(values)
    n = len(v)
    if not n:
        return 0.0
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def _check(mod: object, window: int, values: list[float], preload: list[float]) -> None:
    st_ = mod._Fp(window)  # type: ignore[attr-defined]
    st_.lat.extend(preload)  # as a trained model's baselines fill it: out of step at first
    if preload:
        st_.refresh()
    for x in values:
        st_.add(x, 0.0, 1.0)
        st_.refresh()  # at every execution (add refreshes on its own cadence too)
        lat = list(st_.lat)
        med = _median(lat)
        mad = _median([abs(v - med) for v in lat]) * 1.4826
        if any(math.isnan(v) for v in lat):
            assert math.isnan(st_.med) or st_.med == med
            continue
        assert st_.med == med, (lat, st_.med, med)
        assert st_.spread == max(mad, 0.15), (lat, st_.spread, mad)
        assert st_.ordered == sorted(lat)


LATENCIES = st.one_of(
    st.sampled_from([-1.5, 0.0, 0.25, 0.25, 1.0, 3.0]),  # ties
    st.floats(min_value=-7.0, max_value=12.0, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=12),
    st.lists(LATENCIES, max_size=60),
    st.lists(LATENCIES, max_size=12),
)
def test_the_ordered_window_gives_the_sorted_windows_median_and_spread(
    window: int, values: list[float], preload: list[float]
) -> None:
    for mod in (compiled, SOURCE):
        _check(mod, window, values, preload[:window])


def test_a_nan_latency_falls_back_to_sorting_and_recovers_once_it_leaves() -> None:
    for mod in (compiled, SOURCE):
        st_ = mod._Fp(4)
        for x in (1.0, 2.0, math.nan, 3.0):
            st_.add(x, 0.0, 0.0)
        assert st_.ordered == []  # out of step while the NaN is in the window
        for x in (4.0, 5.0, 6.0, 7.0):  # the NaN leaves; the next refresh sorts again
            st_.add(x, 0.0, 0.0)
        st_.refresh()
        assert st_.ordered == [4.0, 5.0, 6.0, 7.0] and st_.med == 5.5
        assert st_.lat == deque([4.0, 5.0, 6.0, 7.0], maxlen=4)
