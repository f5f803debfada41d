"""An index that speeds up its own fingerprints but slows another: validation finds the
regression, finds the steering hint set that restores the old plan, keeps the index and pins
that hint set; the proxy's plan steering applies the pin; reverting the index withdraws it.

The regression is the classic one: with an index on `created`, the planner walks it backwards
for `WHERE flag = 1 ORDER BY created DESC LIMIT n`, expecting flagged rows to be spread evenly,
but they all sit at the far end, so it reads nearly the whole index (about 70 ms); without the
index, or with index scans off, it reads the flagged rows through the index on `flag` and sorts
them (about 1 ms).
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psycopg

from models.advisor import (
    AdvisorConfig,
    _record,
    active_pins,
    apply_recommendation,
    list_recommendations,
    recheck,
)
from optimizer.fingerprint import Fingerprinter
from optimizer.whatif import Candidate
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations

ROWS = 300_000
SETUP = f"""
CREATE SCHEMA shop;
CREATE TABLE shop.events (id bigint PRIMARY KEY, created int NOT NULL, flag int NOT NULL,
                          payload text);
INSERT INTO shop.events
SELECT i, i, CASE WHEN i <= 2000 THEN 1 ELSE 0 END, md5(i::text) FROM generate_series(1, {ROWS}) i;
CREATE INDEX events_flag ON shop.events (flag);
ANALYZE;
"""
CONFIG = AdvisorConfig(replay_samples=4, replay_repeats=4, max_pins=3)


def _lookup(r: random.Random) -> str:
    return f"SELECT payload FROM shop.events WHERE created = {r.randint(1, ROWS)}"


def _latest_flagged(r: random.Random) -> str:
    return (
        f"SELECT id FROM shop.events WHERE flag = 1 ORDER BY created DESC LIMIT {r.randint(5, 20)}"
    )


async def _log(conn: Any, database: str) -> dict[str, str]:
    rng, fpr, now = random.Random(5), Fingerprinter(), datetime.now(UTC)
    rows, fps = [], {}
    for gen, n, mean in ((_lookup, 200, 20.0), (_latest_flagged, 40, 70.0)):
        for k in range(n):
            sql = gen(rng)
            fp = fpr.fingerprint(sql)
            fps[gen.__name__] = fp.id
            start = now - timedelta(seconds=30 * k)
            end = start + timedelta(milliseconds=mean)
            rows.append((start, end, mean, fp.id, sql, fp.normalized, fp.command,
                         list(fp.tables), database, "simple", "ok"))  # fmt: skip
    await conn.copy_records_to_table(
        "query_logs", schema_name="metadata", records=rows,
        columns=["started_at", "finished_at", "duration_ms", "fingerprint", "query_text",
                 "normalized_text", "command", "tables_used", "database_name", "protocol",
                 "status"],
    )  # fmt: skip
    return fps


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_regression_is_pinned_applied_by_steering_and_released(make_service: Any) -> None:
    db = create_database("pgsage_pins")
    try:

        async def validate() -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
            try:
                await apply_migrations(conn)
                await conn.execute(SETUP)
                fps = await _log(conn, db)
                cand = Candidate("shop.events", ("created",))
                rec = await _record(
                    conn,
                    {"op": "create", "key": cand.key, "rank": 1, "database": db,
                     "candidate": cand.to_json(), "label": cand.label,
                     "index_name": cand.index_name(),
                     "ddl": cand.statement(cand.index_name(), concurrently=True),
                     "size_bytes": 1, "est_gain_ms": 100.0,
                     "fingerprints": [fps["_lookup"]],
                     # what-if saw the other fingerprint on the table: it is re-measured too
                     "whatif": {fps["_latest_flagged"]: [70.0, 70.0]}},
                )  # fmt: skip
                done = await apply_recommendation(conn, rec["id"], config=CONFIG)
                return fps, done, await active_pins(conn)
            finally:
                await conn.close()

        fps, done, pins = asyncio.run(validate())
        flagged = fps["_latest_flagged"]
        validation = done["detail"].get("validation", {})
        why = (done["detail"].get("reason"), validation.get("per_fingerprint"))
        assert done["status"] == "validated", why
        assert validation["regressions"] == [flagged], validation
        assert validation["per_fingerprint"][flagged]["uses_index"] is True
        pin = validation["pins"][flagged]
        arm = pin["arm"]  # the fastest hint set that restores it (no_indexscan, or another
        # that keeps the planner off the backward walk): ties are decided by the machine's noise
        assert (
            pin["pinned_ms"] <= 1.1 * pin["before_ms"]
            or pin["p_slower_than_before"] >= 0.05
            or pin["p_faster_than_regressed"] < 0.05
        ), pin
        assert pins == {flagged: arm}

        # the proxy's plan steering loads the pin and runs the fingerprint with its hint set
        svc = make_service(warehouse_database=db, steering_enabled=True, steering_eval_interval=1)
        steering = svc.service.proxy.steering
        _wait(lambda: steering.pins == pins, 30, "pins not loaded")
        sql = "SELECT id FROM shop.events WHERE flag = 1 ORDER BY created DESC LIMIT 7"
        with psycopg.connect(svc.dsn(), autocommit=True) as c:
            got = [r[0] for r in c.execute(sql).fetchall()]
            plan = "\n".join(r[0] for r in c.execute("EXPLAIN " + sql).fetchall())
        assert got == list(range(2000, 1993, -1))
        assert "Index Scan Backward" in plan  # the client's own EXPLAIN is not steered
        svc.flush()
        with psycopg.connect(svc.dsn(), autocommit=True) as c:
            hint = c.execute(
                "SELECT hint_set FROM metadata.query_logs WHERE fingerprint = %s"
                " AND hint_set IS NOT NULL ORDER BY started_at DESC LIMIT 1",
                (flagged,),
            ).fetchone()
        assert hint == (f"pin:{arm}",)
        with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
            rows = admin.execute("SHOW STEERING").fetchall()
        assert any(r[0] == flagged and r[1] == f"pinned:{arm}" for r in rows), rows

        # the index is reverted (not scanned since its check): its pin goes with it
        async def revert() -> tuple[dict[str, str], list[dict[str, Any]]]:
            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
            try:
                await recheck(conn, config=CONFIG)
                return await active_pins(conn), await list_recommendations(
                    conn, include_closed=True
                )
            finally:
                await conn.close()

        pins_after, recs = asyncio.run(revert())
        assert [r["status"] for r in recs if r["id"] == done["id"]] == ["reverted"]
        assert pins_after == {}
        _wait(lambda: steering.pins == {}, 30, "pin not withdrawn in the proxy")
    finally:
        drop_database(db)
