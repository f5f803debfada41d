"""Serving computes a template's history features with the function training uses, from the
executions the query log worker shows it (`CostServer.observe`)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.dataset import HISTORY_FEATURES, StaticFeatures, add_history, static_class
from models.serve import CostServer

NORMALIZED = "SELECT count(*) FROM t WHERE id BETWEEN $1 AND $2"


def test_observed_history_matches_the_training_rows_features() -> None:
    rng = np.random.default_rng(3)
    server = CostServer()
    static = StaticFeatures(None, None)
    t0 = datetime(2024, 3, 1, 9, tzinfo=UTC).timestamp()
    texts = [f"SELECT count(*) FROM t WHERE id BETWEEN 1 AND {w}" for w in (10, 100_000)]
    classes = [server.key("fp", t, NORMALIZED)[1] for t in texts]
    costs = dict(zip(classes, (8.0, 900.0), strict=True))
    for lclass, cost in costs.items():
        static.computed[("fp", lclass)] = {"plan_total_cost": cost}
    rows = []
    # more than the rolling window, some over an hour before the last (the frame below has
    # microsecond timestamps, as from asyncpg: the hour must still be an hour)
    for i in range(80):
        started = t0 + i * 60.0
        text = texts[i % 2]
        ms = float(rng.lognormal(0, 0.5) * (1 if i % 2 == 0 else 50))
        server.observe("fp", "SELECT", text, NORMALIZED, started, started + ms / 1e3, ms)
        cost = costs[server.key("fp", text, NORMALIZED)[1]]
        rows.append(("fp", started, started + ms / 1e3, ms, cost))
    server.observe("fp", "BEGIN", "BEGIN", "BEGIN", t0, t0, 1.0)  # not modelled: ignored
    at = t0 + 80 * 60.0
    rows.append(("fp", at, at + 1.0, 1.0, 900.0))  # the execution being predicted
    frame = pd.DataFrame(
        rows, columns=["fingerprint", "started_at", "finished_at", "duration_ms", "plan_total_cost"]
    )
    for col in ("started_at", "finished_at"):
        frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
    training = add_history(frame).iloc[-1]
    served = server._observed(
        ("fp", server.key("fp", texts[1], NORMALIZED)[1]), at, 900.0, static.computed
    )
    assert served is not None
    for name in HISTORY_FEATURES:
        assert served[name] == pytest.approx(training[name], rel=1e-9), name
    assert served["hist_count"] == 80 and served["hist_rate_1h"] == 60
    assert server._observed(("other", "x"), at, 1.0) is None
    server.forget("fp")
    assert server._observed(("fp", "x"), at, 1.0) is None


def test_a_batch_observed_at_once_is_the_executions_observed_one_by_one() -> None:
    """The log worker hands each batch's executions of a template over in one call
    (`observe_many`); the history it leaves is the one a call per execution leaves."""
    rng = np.random.default_rng(5)
    t0 = datetime(2024, 3, 1, 9, tzinfo=UTC).timestamp()
    one, many = CostServer(), CostServer()
    started = t0
    for batch in range(12):  # batches of 0..400 executions, 4,000 s of them in all
        executions = []
        for _ in range(int(rng.integers(0, 400))):
            started += float(rng.exponential(1.0))
            ms = float(rng.lognormal(0, 0.5))
            text = f"SELECT count(*) FROM t WHERE id BETWEEN 1 AND {batch}"
            executions.append((started, started + ms / 1e3, ms, text, NORMALIZED))
        for e in executions:
            one.observe("fp", "SELECT", e[3], e[4], e[0], e[1], e[2])
        many.observe_many("fp", "SELECT", [e[0] for e in executions], executions[-60:])
    assert list(one._recent["fp"]) == list(many._recent["fp"])
    assert list(one._starts["fp"]) == list(many._starts["fp"])
    assert one._count == many._count and one._count["fp"] > 1_000
    key = one.key("fp", "SELECT count(*) FROM t WHERE id BETWEEN 1 AND 3", NORMALIZED)
    at = started + 1.0
    assert many._observed(key, at, 10.0) == pytest.approx(one._observed(key, at, 10.0), nan_ok=True)


TEXT_PARTS = ["select ", "x", " = ", "1", "25", "'a'", "$1", " and ", "1e999", "(", ")", "  ", "\n"]
NORMALIZED_TEXTS = ["SELECT * FROM t WHERE id = $1", "select  x from u\nwhere y = $1", ""]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(TEXT_PARTS), max_size=12).map("".join),
    st.sampled_from(NORMALIZED_TEXTS),
)
def test_the_cache_key_is_the_static_class_training_uses(text: str, normalized: str) -> None:
    """CostServer.key memoises the normalised text's variant and computes the literal class in
    compiled code: still dataset.static_class, for texts seen twice too."""
    server = CostServer()
    for _ in range(2):
        want = static_class(text or normalized, normalized)
        assert server.key("fp", text, normalized) == ("fp", want)
