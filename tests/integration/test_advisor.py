"""The index advisor on a real database: a logged workload over tables of realistic size.

`shop.orders` (200k rows) is queried by customer (selective, no index: the index to find), by a
narrow time range (a second good index), and by a non-selective amount filter (no index helps);
`shop.customers` is looked up by email (a unique index exists already) and `shop.tiny` is below
the size threshold. The workload goes straight into metadata.query_logs as pgsage logs it
(fingerprint, normalized text, literal samples). The tests share that database and run in
file order: advice, CLI, what-if fallback, validation (builds one index), reject and recheck.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

from models.advisor import (
    AdvisorConfig,
    advise,
    apply_recommendation,
    list_recommendations,
    recheck,
    reject_recommendation,
)
from models.advisor_cli import advise as advise_command
from optimizer.fingerprint import Fingerprinter
from optimizer.whatif import Candidate, WhatIf, WhatIfConfig
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations

ORDERS = 200_000
CUSTOMERS = 20_000
BUILT_IN = {"orders_pkey", "orders_note_idx", "customers_pkey", "customers_email_key", "tiny_pkey"}

SETUP = f"""
CREATE SCHEMA shop;
CREATE TABLE shop.orders (
    id bigint PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
    created_at timestamptz NOT NULL, amount numeric NOT NULL, note text, region text);
INSERT INTO shop.orders
SELECT i, (i * 7919) % {CUSTOMERS} + 1,
       CASE WHEN i % 100 = 0 THEN 'returned' WHEN i % 3 = 0 THEN 'open' ELSE 'shipped' END,
       timestamptz '2024-01-01' + i * interval '1 minute', (i % 1000) / 10.0 + 1,
       md5(i::text), (ARRAY['north','south','east','west'])[i % 4 + 1]
FROM generate_series(1, {ORDERS}) i;
CREATE INDEX orders_note_idx ON shop.orders (note);
CREATE TABLE shop.customers (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text);
INSERT INTO shop.customers SELECT i, 'c' || i || '@example.com', 'name ' || i
FROM generate_series(1, {CUSTOMERS}) i;
CREATE TABLE shop.tiny (id int PRIMARY KEY, v int);
INSERT INTO shop.tiny SELECT i, i % 7 FROM generate_series(1, 100) i;
ANALYZE;
"""


def _by_customer(r: random.Random) -> str:
    return (
        f"SELECT id, amount, status FROM shop.orders WHERE customer_id = {r.randint(1, CUSTOMERS)}"
    )


def _by_time(r: random.Random) -> str:
    start = datetime(2024, 1, 1) + timedelta(minutes=r.randint(0, ORDERS - 120))
    end = start + timedelta(minutes=60)
    return (
        "SELECT count(*), sum(amount) FROM shop.orders"
        f" WHERE created_at >= '{start:%Y-%m-%d %H:%M}' AND created_at < '{end:%Y-%m-%d %H:%M}'"
    )


def _by_amount(r: random.Random) -> str:
    return f"SELECT count(*) FROM shop.orders WHERE amount > {r.randint(1, 3)}"


def _by_email(r: random.Random) -> str:
    return f"SELECT name FROM shop.customers WHERE email = 'c{r.randint(1, CUSTOMERS)}@example.com'"


def _tiny(r: random.Random) -> str:
    return f"SELECT id FROM shop.tiny WHERE v = {r.randint(0, 6)}"


def _insert(r: random.Random) -> str:
    i = ORDERS + r.randint(1, 10**6)
    return (
        "INSERT INTO shop.orders (id, customer_id, status, created_at, amount)"
        f" VALUES ({i}, 1, 'open', now(), 1)"
    )


#: generator, executions, mean ms
WORKLOAD = [
    (_by_customer, 300, 15.0),
    (_by_time, 200, 12.0),
    (_by_amount, 50, 25.0),
    (_by_email, 300, 0.1),
    (_tiny, 100, 0.05),
    (_insert, 50, 0.2),
]


async def _log_workload(conn: Any, database: str) -> dict[str, str]:
    """query_logs rows as pgsage writes them; returns generator name -> fingerprint."""
    rng = random.Random(3)
    fpr = Fingerprinter()
    now = datetime.now(UTC)
    rows = []
    fps = {}
    for gen, n, mean in WORKLOAD:
        for k in range(n):
            sql = gen(rng)
            fp = fpr.fingerprint(sql)
            fps[gen.__name__] = fp.id
            started = now - timedelta(minutes=k)
            ms = mean * rng.uniform(0.8, 1.2)
            rows.append(
                (
                    started,
                    started + timedelta(milliseconds=ms),
                    ms,
                    fp.id,
                    sql,
                    fp.normalized,
                    fp.command,
                    list(fp.tables),
                    database,
                    "simple",
                    "ok",
                )
            )
    await conn.copy_records_to_table(
        "query_logs",
        schema_name="metadata",
        records=rows,
        columns=[
            "started_at",
            "finished_at",
            "duration_ms",
            "fingerprint",
            "query_text",
            "normalized_text",
            "command",
            "tables_used",
            "database_name",
            "protocol",
            "status",
        ],
    )
    return fps


async def _connect(database: str) -> Any:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def shop() -> Iterator[tuple[str, dict[str, str]]]:
    name = create_database("pgsage_advisor")
    try:

        async def build() -> dict[str, str]:
            conn = await _connect(name)
            try:
                await apply_migrations(conn)
                await conn.execute(SETUP)
                return await _log_workload(conn, name)
            finally:
                await conn.close()

        yield name, _run(build())
    finally:
        drop_database(name)


async def _indexes(conn: Any) -> dict[str, str]:
    rows = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'shop'")
    return {r["indexname"]: r["indexdef"] for r in rows}


CONFIG = AdvisorConfig(replay_samples=4, replay_repeats=4, budget_share=0.5)


def test_hypopg_whatif_finds_the_right_indexes_and_records_them(shop):
    name, fps = shop

    async def go() -> tuple[Any, list[dict[str, Any]], dict[str, str]]:
        conn = await _connect(name)
        try:
            report = await advise(conn, config=CONFIG)
            return report, await list_recommendations(conn), await _indexes(conn)
        finally:
            await conn.close()

    report, listed, indexes = _run(go())
    assert report.method == "hypopg"
    recs = report.recommendations
    assert recs, report
    labels = [r["label"] for r in recs]
    top = recs[0]
    # the heaviest fingerprint's index comes first, and is on the filtered column
    assert top["table"] == "shop.orders"
    assert top["columns"][0] == "customer_id", labels
    assert fps["_by_customer"] in top["fingerprints"]
    assert any(r["columns"][:1] == ["created_at"] for r in recs), labels
    # nothing for the non-selective filter, the existing unique index, or the tiny table
    assert not any(r["columns"] == ["amount"] for r in recs), labels
    assert not any(r["table"] in ("shop.customers", "shop.tiny") for r in recs)
    assert all(0 < r["size_bytes"] <= report.budget_bytes for r in recs)
    assert sum(r["size_bytes"] for r in recs) <= report.budget_bytes
    # hypothetical only: no index was built, and HypoPG was reset
    assert set(indexes) == BUILT_IN
    assert [r["id"] for r in listed if r["op"] == "create"] == [r["id"] for r in recs]
    assert all(r["status"] == "proposed" for r in listed)


def test_cli_advise_prints_json_end_to_end(shop):
    name, _ = shop
    app = typer.Typer()
    app.command("advise")(advise_command)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(
        app, ["advise", "--dsn", _uri(name), "--json", "--budget-share", "0.5"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["method"] == "hypopg"
    assert out["recommendations"]
    assert {"table", "columns", "size_bytes", "fingerprints", "est_gain_ms"} <= set(
        out["recommendations"][0]
    )
    res = CliRunner().invoke(app, ["advise", "--dsn", _uri(name)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "shop.orders" in res.stdout and "hypopg" in res.stdout


def test_transaction_fallback_without_hypopg_agrees_and_leaves_nothing_behind(shop):
    name, _ = shop

    async def go() -> tuple[float, float, dict[Candidate, int], dict[str, str]]:
        conn = await _connect(name)
        try:
            whatif = await WhatIf(conn.fetchval, WhatIfConfig(hypopg=False)).setup()
            assert whatif.method == "transaction"
            sql = {"q": "SELECT id FROM shop.orders WHERE customer_id = 42"}
            base, _ = await whatif.costs(sql)
            cand = Candidate("shop.orders", ("customer_id",))
            big = Candidate("shop.orders", ("amount",))
            with_ix, sizes = await whatif.costs(
                sql, [cand, big], {"shop.orders": _info(conn_size=10**6)}
            )
            return base["q"], with_ix["q"], sizes, await _indexes(conn)
        finally:
            await conn.close()

    base, with_ix, sizes, indexes = _run(go())
    assert with_ix < base / 10
    assert all(s > 100_000 for s in sizes.values())  # real builds of 200k-row indexes
    assert set(indexes) == BUILT_IN


def _info(conn_size: int) -> Any:
    from optimizer.whatif import TableInfo

    return TableInfo(rows=ORDERS, size_bytes=conn_size, columns=("customer_id", "amount"))


def test_validate_keeps_a_significant_index_and_reverts_a_useless_one(shop):
    name, fps = shop

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, str], list[Any]]:
        conn = await _connect(name)
        try:
            recs = await list_recommendations(conn)
            if not recs:
                recs = (await advise(conn, config=CONFIG)).recommendations
            good = next(r for r in recs if r["columns"][:1] == ["customer_id"])
            kept = await apply_recommendation(conn, good["id"], config=CONFIG)
            # a useless index, recorded as if proposed: the amount filter reads ~all rows
            from models.advisor import _record

            cand = Candidate("shop.orders", ("amount",))
            useless = await _record(
                conn,
                {
                    "op": "create",
                    "key": cand.key,
                    "rank": 99,
                    "database": name,
                    "candidate": cand.to_json(),
                    "label": cand.label,
                    "index_name": cand.index_name(),
                    "ddl": cand.statement(cand.index_name(), concurrently=True),
                    "size_bytes": 1,
                    "est_gain_ms": 1.0,
                    "fingerprints": [fps["_by_amount"]],
                },
            )
            reverted = await apply_recommendation(conn, useless["id"], config=CONFIG)
            history = await conn.fetch(
                "SELECT action, status, detail->>'recommendation_id' AS rec"
                " FROM metadata.optimization_history WHERE kind = 'index' ORDER BY id"
            )
            return kept, reverted, await _indexes(conn), history
        finally:
            await conn.close()

    kept, reverted, indexes, history = _run(go())
    assert kept["status"] == "validated", kept["detail"].get("validation")
    assert kept["p_value"] < 0.05
    assert kept["measured_speedup"] > 5
    assert kept["measured_after_ms"] < kept["measured_before_ms"]
    assert kept["index_name"] in indexes
    assert reverted["status"] == "reverted", reverted["detail"]
    assert reverted["index_name"] not in indexes
    # (its fingerprint's plans read all rows without it: no plan uses it, whatever the timings)
    reasons = ("no replayed plan", "not significant", "below", "slower")
    assert any(w in reverted["reason"] for w in reasons), reverted
    events = [(h["action"], h["status"]) for h in history if h["rec"] == str(kept["id"])]
    assert events == [("apply", "applied"), ("validate", "validated")]
    events = [(h["action"], h["status"]) for h in history if h["rec"] == str(reverted["id"])]
    assert events == [("apply", "applied"), ("revert", "reverted")]


def test_reject_and_recheck_never_drop_primary_or_unique_indexes(shop):
    name, _ = shop

    async def go() -> tuple[Any, ...]:
        conn = await _connect(name)
        try:
            recs = await list_recommendations(conn)
            proposed = [r for r in recs if r["status"] == "proposed" and r["op"] == "create"]
            rejected = await reject_recommendation(conn, proposed[-1]["id"], "not now")
            again = await advise(conn, config=CONFIG)
            cfg = AdvisorConfig(unused_days=0.0)
            result = await recheck(conn, config=cfg)
            drops = [r for r in await list_recommendations(conn) if r["op"] == "drop"]
            applied = [await apply_recommendation(conn, d["id"], config=cfg) for d in drops]
            return rejected, again, result, drops, applied, await _indexes(conn)
        finally:
            await conn.close()

    rejected, again, result, drops, applied, indexes = _run(go())
    assert rejected["status"] == "rejected"
    assert rejected["id"] not in [
        r["id"] for r in again.recommendations if r.get("status") == "proposed"
    ]
    dropped_names = {d["index_name"] for d in drops}
    assert "orders_note_idx" in dropped_names
    assert not dropped_names & {"orders_pkey", "customers_pkey", "customers_email_key"}
    assert all(a["status"] == "applied" for a in applied)
    assert "orders_note_idx" not in indexes
    assert "orders_pkey" in indexes and "customers_email_key" in indexes
    assert result["proposed_drops"]


def _uri(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def test_learned_ranker_trains_on_outcomes_and_corrects_what_if(shop, tmp_path):
    """Covering candidates look best to what-if here but measured poorly: the ranker learns it."""
    from models.advisor_rank import MIN_HISTORY, load_active_ranker, train_advisor_rank
    from models.registry import Registry
    from models.train import TRAINERS, TrainConfig

    assert TRAINERS["advisor_rank"] is train_advisor_rank
    name, _ = shop
    rng = random.Random(5)

    def outcome(i: int) -> tuple[str, float, float]:
        covering = i % 2 == 0
        feats = {
            "n_include": 2.0 if covering else 0.0,
            "reason_include": float(covering),
            "mean_cost_ratio": 0.05 if covering else 0.5,
            "best_cost_ratio": 0.05,
            "log_gain_ms": rng.uniform(5, 8),
            "n_columns": 1.0,
            "log_rows": 12.0,
        }
        saved = rng.uniform(0.0, 0.2) if covering else rng.uniform(0.7, 0.9)
        return (
            json.dumps({"op": "create", "key": f"k{i}", "features": feats}),
            10.0,
            10 * (1 - saved),
        )

    async def go() -> tuple[Any, ...]:
        conn = await _connect(name)
        registry = Registry(conn, tmp_path)
        try:
            rows = [outcome(i) for i in range(40)]
            await conn.executemany(
                "INSERT INTO metadata.optimization_history (kind, target, action, status, detail,"
                " measured_before_ms, measured_after_ms)"
                " VALUES ('index', 't', 'recommend', 'validated', $1::jsonb, $2, $3)",
                rows[: MIN_HISTORY - 5],
            )
            few = await train_advisor_rank(conn, None, registry, TrainConfig())
            none = await load_active_ranker(conn, tmp_path)
            await conn.executemany(
                "INSERT INTO metadata.optimization_history (kind, target, action, status, detail,"
                " measured_before_ms, measured_after_ms)"
                " VALUES ('index', 't', 'recommend', 'validated', $1::jsonb, $2, $3)",
                rows[MIN_HISTORY - 5 :],
            )
            enough = await train_advisor_rank(conn, None, registry, TrainConfig())
            return few, none, enough, await load_active_ranker(conn, tmp_path)
        finally:
            await conn.close()

    few, none, enough, ranker = _run(go())
    assert few.status == "candidate" and "what-if order" in few.reason and none is None
    assert enough.status == "active", enough.reason
    assert enough.card["metrics"]["spearman_model"] > enough.card["metrics"]["spearman_whatif"]
    covering = {"n_include": 2.0, "reason_include": 1.0, "mean_cost_ratio": 0.05}
    plain = {"n_include": 0.0, "reason_include": 0.0, "mean_cost_ratio": 0.5}
    # what-if says the covering one saves more; the ranker puts the plain one first
    scores = ranker.predict_gain([covering, plain], [100.0, 80.0])
    assert scores[1] > scores[0]
