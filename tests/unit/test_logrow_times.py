"""The query log's timestamps in whole microseconds: `_unix_micros` (by hand, with native
truncations once compiled) rounds exactly as `datetime.fromtimestamp` does, half to even on the
exact fraction, and as the floor-and-round formula it replaced."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.telemetry.logrows import PG_EPOCH_SECONDS, _micros, _unix_micros

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

times = (
    st.floats(min_value=-4e9, max_value=4e9, allow_nan=False)
    # exact microseconds and exact half microseconds, where rounding ties
    | st.integers(0, 4_000_000_000_000_000).map(lambda u: u / 1e6)
    | st.integers(-(10**15), 10**15).map(lambda u: u / 2e6)
)


def floor_and_round(t: float) -> int:
    whole = math.floor(t)
    return whole * 1_000_000 + round((t - whole) * 1e6)


@settings(max_examples=3000, deadline=None)
@given(times)
def test_unix_micros_round_as_before(t: float) -> None:
    assert _unix_micros(t) == floor_and_round(t)


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=0.0, max_value=4e9, allow_nan=False))
def test_unix_micros_round_as_datetime_does(t: float) -> None:
    as_datetime = datetime.fromtimestamp(t, UTC) - EPOCH
    assert _unix_micros(t) == as_datetime // timedelta(microseconds=1)


def test_ties_go_to_even_and_negative_times_floor() -> None:
    assert _unix_micros(0.5e-6) == 0 and _unix_micros(1.5e-6) == 2
    assert _unix_micros(-0.25) == -250_000
    assert _unix_micros(-1.0) == -1_000_000
    assert _micros(PG_EPOCH_SECONDS + 1.0) == 1_000_000
