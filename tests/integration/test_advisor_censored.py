"""Validation replays that hit the statement timeout count as the timeout (censored times).

TPC-H Q17 and Q20 run for many minutes without secondary indexes: replayed under a limit they
never finish, and before this they were dropped from the comparison, so the index that fixes
them could never be validated. A timed-out run is slower than every run that finished, which is
all Mann-Whitney U needs; the speedup over it is a lower bound.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from models.advisor import AdvisorConfig, compare, measure
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database

SLOW = "SELECT pg_sleep(0.3), a FROM t WHERE a = 5"


async def _measure(db: str) -> dict[str, Any]:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
    try:
        await conn.execute(
            "CREATE TABLE t (a int, pad text);"
            "INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 20000) i;"
            "CREATE INDEX t_a ON t (a); ANALYZE t"
        )
        indexes: dict[str, set[str]] = {}
        timeouts: dict[str, int] = {}
        sqls = {"slow": [SLOW], "fast": ["SELECT a FROM t WHERE a = 7"], "bad": ["SELECT 1/0"]}
        got = await measure(conn, sqls, 3, 50, indexes, timeouts=timeouts)
        return {"got": got, "indexes": indexes, "timeouts": timeouts}
    finally:
        await conn.close()


def test_a_timed_out_run_counts_as_the_limit_with_its_plan() -> None:
    db = create_database("pgsage_advisor_censor")
    try:
        out = asyncio.run(_measure(db))
    finally:
        drop_database(db)
    got, timeouts = out["got"], out["timeouts"]
    assert got["slow"] == [50.0, 50.0, 50.0]  # the warm-up run is not counted
    assert timeouts == {"slow": 3}
    assert out["indexes"]["slow"] == {"t_a"}  # from a plain EXPLAIN of the cancelled statement
    assert len(got["fast"]) == 3 and all(ms < 50 for ms in got["fast"])
    assert out["indexes"]["fast"] == {"t_a"}
    assert "bad" not in got  # other errors still drop the run


def test_censored_before_runs_validate_an_index_and_censored_after_runs_regress() -> None:
    cfg = AdvisorConfig()
    limit = [20_000.0] * 4
    fixed = compare({"q17": limit}, {"q17": [900.0, 950.0, 1000.0, 980.0]}, {"q17": 1.0},
                    ["q17"], cfg, {"q17"})  # fmt: skip
    assert fixed["keep"] and fixed["p_value"] < cfg.alpha
    assert fixed["speedup"] > 20  # a lower bound: the before runs were cut at the limit
    broke = compare(
        {"q17": [900.0, 950.0, 1000.0, 980.0], "q5": [300.0, 310.0, 290.0, 305.0]},
        {"q17": [90.0, 95.0, 100.0, 98.0], "q5": limit},
        {"q17": 1.0, "q5": 1.0},
        ["q17"],
        cfg,
        {"q17", "q5"},
    )
    assert broke["regressions"] == ["q5"] and not broke["keep"]
