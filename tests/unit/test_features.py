"""Features from SQL (sqlglot), EXPLAIN JSON and the catalog; literal classes; history; splits."""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from models.dataset import (
    add_history,
    concurrency,
    history_features,
    load_slowdown,
    static_class,
    template_split,
    text_variant,
    time_split,
)
from optimizer.features import (
    PLAN_FEATURES,
    SQL_FEATURES,
    TableStats,
    catalog_features,
    explain_statement,
    features_from_explain,
    generic_plan_statements,
    literal_class,
    plan_features,
    sql_shape,
    temporal_features,
)
from optimizer.parse import ParseCache, parse_statement

# EXPLAIN (FORMAT JSON) of a join + hash aggregate + sort + limit, from PostgreSQL 15
PLAN = [
    {
        "Plan": {
            "Node Type": "Limit",
            "Startup Cost": 17.41,
            "Total Cost": 17.41,
            "Plan Rows": 3,
            "Plan Width": 14,
            "Plans": [
                {
                    "Node Type": "Sort",
                    "Parent Relationship": "Outer",
                    "Startup Cost": 17.41,
                    "Total Cost": 17.66,
                    "Plan Rows": 100,
                    "Plan Width": 14,
                    "Plans": [
                        {
                            "Node Type": "Aggregate",
                            "Strategy": "Hashed",
                            "Parent Relationship": "Outer",
                            "Startup Cost": 15.11,
                            "Total Cost": 16.11,
                            "Plan Rows": 100,
                            "Plan Width": 14,
                            "Plans": [
                                {
                                    "Node Type": "Hash Join",
                                    "Parent Relationship": "Outer",
                                    "Startup Cost": 3.54,
                                    "Total Cost": 14.6,
                                    "Plan Rows": 102,
                                    "Plan Width": 6,
                                    "Plans": [
                                        {
                                            "Node Type": "Index Scan",
                                            "Parent Relationship": "Outer",
                                            "Index Name": "cm_large_pkey",
                                            "Relation Name": "cm_large",
                                            "Startup Cost": 0.29,
                                            "Total Cost": 11.07,
                                            "Plan Rows": 102,
                                            "Plan Width": 4,
                                        },
                                        {
                                            "Node Type": "Hash",
                                            "Parent Relationship": "Inner",
                                            "Startup Cost": 2.0,
                                            "Total Cost": 2.0,
                                            "Plan Rows": 100,
                                            "Plan Width": 10,
                                            "Plans": [
                                                {
                                                    "Node Type": "Seq Scan",
                                                    "Parent Relationship": "Outer",
                                                    "Relation Name": "cm_dim",
                                                    "Startup Cost": 0.0,
                                                    "Total Cost": 2.0,
                                                    "Plan Rows": 100,
                                                    "Plan Width": 10,
                                                }
                                            ],
                                        },
                                    ],
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    }
]


def shape(sql: str):
    return sql_shape(parse_statement(sql))


def test_sql_shape_of_a_join_aggregate_query():
    s = shape(
        "SELECT d.name, count(DISTINCT f.id), sum(f.val) FROM sales.facts f"
        " JOIN dim d ON d.id = f.grp LEFT JOIN other o USING (id)"
        " WHERE f.id BETWEEN $1 AND $2 AND f.note LIKE $3 AND (f.cat = $4 OR f.cat IN ($5, $6))"
        " GROUP BY d.name HAVING count(*) > $7 ORDER BY 2 DESC LIMIT 5"
    )
    f = s.features
    assert set(f) == set(SQL_FEATURES)
    assert (f["stmt_select"], f["stmt_insert"]) == (1.0, 0.0)
    assert f["n_tables"] == 3 and f["n_joins"] == 2
    assert (f["n_inner_joins"], f["n_left_joins"], f["n_cross_joins"]) == (1, 1, 0)
    assert f["n_where_conditions"] == 4
    assert (f["n_range_predicates"], f["n_like_predicates"], f["n_in_predicates"]) == (1, 1, 1)
    assert f["n_eq_predicates"] == 1 and f["n_or"] == 1
    assert f["n_aggregates"] == 3 and f["n_count_distinct"] == 1
    assert (f["n_group_by"], f["has_having"], f["n_order_by"], f["has_limit"]) == (1, 1, 1, 1)
    assert f["n_params"] == 7
    assert s.tables == ("dim", "other", "sales.facts")
    assert ("sales.facts", "id") in s.filtered_columns
    assert ("sales.facts", "note") in s.filtered_columns
    assert ("dim", "id") in s.filtered_columns


def test_sql_shape_of_subqueries_windows_ctes_and_dml():
    nested = shape(
        "WITH recent AS (SELECT * FROM t WHERE ts > $1)"
        " SELECT DISTINCT a, row_number() OVER (PARTITION BY b ORDER BY c) FROM recent"
        " WHERE a IN (SELECT a FROM u WHERE b = (SELECT max(b) FROM v))"
    ).features
    assert nested["n_ctes"] == 1 and nested["n_tables"] == 3  # the CTE name is not a table
    assert nested["has_distinct"] == 1 and nested["n_windows"] == 1
    assert nested["n_aggregates"] == 1  # max(); row_number() is a window, not an aggregate
    assert nested["subquery_depth"] == 2
    update = shape("UPDATE t SET v = v + 1 WHERE id = $1").features
    assert (update["stmt_update"], update["stmt_select"], update["n_eq_predicates"]) == (1, 0, 1)
    assert shape("DELETE FROM t").features["stmt_delete"] == 1
    assert shape("INSERT INTO t SELECT * FROM u").features["stmt_insert"] == 1
    assert shape("SELECT 1 UNION ALL SELECT 2").features["n_set_ops"] == 1
    cross = shape("SELECT * FROM a CROSS JOIN b").features
    assert cross["n_cross_joins"] == 1 and cross["n_inner_joins"] == 0


def test_unparsable_sql_gives_nan_not_a_crash():
    assert parse_statement("SELEC broken (") is None
    assert parse_statement("select 1; select 2") is None
    f = sql_shape(None).features
    assert all(math.isnan(v) for v in f.values())


def test_parse_cache_parses_once_per_fingerprint():
    cache = ParseCache(maxsize=2)
    first = cache.parse("a", "select 1 from t where x = $1")
    assert cache.parse("a", "select 1 from t where x = $2") is first
    cache.parse("b", "select 2")
    cache.parse("c", "select 3")  # evicts "a"
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 2)
    assert cache.parse("a", "select 9") is not first


def test_plan_features_from_explain_json():
    f = plan_features(PLAN)
    assert set(f) == set(PLAN_FEATURES)
    assert f["plan_total_cost"] == 17.41 and f["plan_rows"] == 3 and f["plan_width"] == 14
    assert f["plan_nodes"] == 7 and f["plan_depth"] == 6
    assert f["plan_top_join_rows"] == 102
    assert f["plan_scan_rows_max"] == 102 and f["plan_sort_rows"] == 100
    assert (f["node_hash_join"], f["node_index_scan"], f["node_seq_scan"]) == (1, 1, 1)
    assert (f["node_hash_aggregate"], f["node_sorted_aggregate"], f["node_limit"]) == (1, 0, 1)
    assert f["plan_rows_sum"] == 3 + 100 + 100 + 102 + 102 + 100 + 100
    assert plan_features(json.dumps(PLAN)) == f  # the text form, as a driver returns it
    assert all(math.isnan(v) for v in plan_features(None).values())
    assert all(math.isnan(v) for v in plan_features("not json").values())


def test_explain_is_never_analyze_and_only_for_plannable_statements():
    for sql in ("select * from t", "delete from t where id = 1", "insert into t values (1)"):
        stmt = explain_statement(sql, parse_statement(sql))
        assert stmt == f"EXPLAIN (FORMAT JSON) {sql}"
        assert "ANALYZE" not in stmt.upper()
    for sql in ("vacuum t", "create table x (a int)", "set work_mem = '1GB'", "begin"):
        assert explain_statement(sql, parse_statement(sql)) is None
    calls: list[str] = []

    def explain(stmt: str) -> object:
        calls.append(stmt)
        return PLAN

    sql = "select count(*) from t"
    assert features_from_explain(sql, parse_statement(sql), explain)["plan_total_cost"] == 17.41
    assert calls == ["EXPLAIN (FORMAT JSON) select count(*) from t"]

    def broken(stmt: str) -> object:
        raise TimeoutError("statement timeout")

    assert math.isnan(features_from_explain(sql, parse_statement(sql), broken)["plan_rows"])


def test_generic_plan_statements():
    prepare, explain, deallocate = generic_plan_statements("select * from t where a = $1;", 2, "p1")
    assert prepare == "PREPARE p1 AS select * from t where a = $1"
    assert explain == "EXPLAIN (FORMAT JSON) EXECUTE p1(NULL, NULL)"
    assert deallocate == "DEALLOCATE p1"
    assert generic_plan_statements("select 1", 0, "p2")[1] == "EXPLAIN (FORMAT JSON) EXECUTE p2"


def test_catalog_features_sizes_and_index_coverage():
    catalog = {
        "big": TableStats(1_000_000, 8_000, (("id",), ("cat", "grp"))),
        "dim": TableStats(100, 1, (("id",),)),
    }
    s = shape("select * from big b join dim d on d.id = b.grp where b.cat = $1 and b.note = $2")
    f = catalog_features(s, catalog)
    assert (f["cat_tables_known"], f["cat_rows_max"], f["cat_rows_min"]) == (2, 1_000_000, 100)
    assert f["cat_rows_sum"] == 1_000_100 and f["cat_pages_sum"] == 8_001
    # filtered: big.cat (leading), big.grp (in an index, not leading), big.note (none), dim.id
    assert f["cat_filtered_columns"] == 4
    assert f["cat_filtered_leading_indexed"] == pytest.approx(2 / 4)
    assert f["cat_filtered_in_index"] == pytest.approx(3 / 4)
    unknown = catalog_features(shape("select * from missing"), catalog)
    assert unknown["cat_tables_known"] == 0 and math.isnan(unknown["cat_rows_max"])
    never_analyzed = {"big": TableStats(math.nan, 0)}
    assert math.isnan(catalog_features(shape("select * from big"), never_analyzed)["cat_rows_sum"])


def test_literal_class_separates_magnitudes_and_range_widths():
    narrow = literal_class("select * from t where id between 1000 and 1010")
    assert narrow == literal_class("select * from t where id between 1001 and 1012")
    assert narrow != literal_class("select * from t where id between 1000 and 900000")
    assert literal_class("select * from t where name = 'ab'") == literal_class(
        "select * from t where name = 'cd'"
    )
    assert literal_class("select * from t where id = $1") == "generic"


def test_static_features_are_keyed_by_the_text_variant_too():
    """pg_query's fingerprint ignores the name of an aliased table: such texts share a
    fingerprint, but each needs its own catalog statistics and plan."""
    import asyncio

    from models.dataset import StaticFeatures

    a = "SELECT count(*) FROM cm_small f JOIN d ON d.id = f.grp WHERE f.id < $1"
    b = a.replace("cm_small", "cm_large")
    assert text_variant(a) == text_variant(a.replace(" FROM ", "\n  FROM  "))
    assert text_variant(a) != text_variant(b)
    assert static_class(a.replace("$1", "10"), a) != static_class(b.replace("$1", "10"), b)
    static = StaticFeatures(None, None)
    static.catalog.update(
        {
            "cm_small": TableStats(1_000, 10),
            "cm_large": TableStats(50_000, 500),
            "d": TableStats(100, 1),
        }
    )
    small = asyncio.run(static.features("fp", a.replace("$1", "10"), a))
    large = asyncio.run(static.features("fp", b.replace("$1", "10"), b))
    assert (small["cat_rows_max"], large["cat_rows_max"]) == (1_000, 50_000)


def test_temporal_features():
    assert temporal_features(datetime(2024, 6, 3, 10, 30)) == {  # a Monday
        "hour": 10.0,
        "weekday": 0.0,
        "is_weekend": 0.0,
        "is_business_hours": 1.0,
    }
    sunday = temporal_features(datetime(2024, 6, 9, 10, 30))
    assert sunday["is_weekend"] == 1.0 and sunday["is_business_hours"] == 0.0


def test_history_features_only_see_executions_finished_before():
    ns = 10**9
    started = np.array([0, 1, 2, 3]) * ns
    finished = np.array([5, 1.5, 2.5, 3.5]) * ns  # the first one runs long
    duration = np.array([5000.0, 500.0, 500.0, 500.0])
    h = history_features(started.astype(np.int64), finished.astype(np.int64), duration, started)
    assert list(h["hist_count"]) == [0, 0, 1, 2]  # the long one had not finished by t=3
    assert math.isnan(h["hist_median_ms"][0]) and math.isnan(h["hist_median_ms"][1])
    assert list(h["hist_median_ms"][2:]) == [500.0, 500.0]
    assert list(h["hist_rate_1h"]) == [0, 1, 2, 3]
    cost = np.array([10.0, 10.0, 10.0, 100.0])
    cal = history_features(
        started.astype(np.int64), finished.astype(np.int64), duration, started, cost, cost
    )["hist_calibrated_ms"]
    # latency per unit of cost learned from the past, scaled by this row's (10x larger) cost
    assert cal[3] == pytest.approx(500.0 * 101 / 11)


def test_add_history_and_concurrency_on_a_frame():
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    frame = pd.DataFrame(
        {
            "fingerprint": ["a", "b", "a", "a"],
            "started_at": [
                t0,
                t0 + pd.Timedelta(seconds=1),
                t0 + pd.Timedelta(seconds=2),
                t0 + pd.Timedelta(seconds=10),
            ],
            "finished_at": [
                t0 + pd.Timedelta(seconds=5),
                t0 + pd.Timedelta(seconds=3),
                t0 + pd.Timedelta(seconds=6),
                t0 + pd.Timedelta(seconds=11),
            ],
            "duration_ms": [5000.0, 2000.0, 4000.0, 1000.0],
            "plan_total_cost": [1.0, 1.0, 1.0, 1.0],
        }
    )
    out = add_history(frame)
    assert list(out["hist_count"]) == [0, 0, 0, 2]
    assert out["hist_median_ms"].iloc[3] == 4500.0
    assert list(out["concurrent_statements"]) == [0, 1, 2, 0]
    assert list(concurrency(np.array([0, 0]), np.array([1, 1]))) == [1, 1]
    # only the last row has a template median (4500 ms) to compare a finished execution with,
    # and nothing with one had finished before any row started: the load is "as usual"
    assert list(out["load_slowdown"]) == [0.0, 0.0, 0.0, 0.0]
    # rows that are not known feed nobody's history: the last row sees only the first
    frozen = add_history(frame, known=np.array([True, True, False, False]))
    assert list(frozen["hist_count"]) == [0, 0, 0, 1]
    assert frozen["hist_median_ms"].iloc[3] == 5000.0


def test_load_slowdown_is_the_median_of_the_latest_executions_finished_before():
    ns = 10**9
    finished = np.array([1, 2, 3, 4, 5]) * ns
    slowdown = np.array([0.0, np.log(4), np.nan, np.log(2), np.log(8)])
    at = np.array([0, 1, 2.5, 4, 4.5, 6]) * ns
    out = load_slowdown(finished.astype(np.int64), slowdown, at.astype(np.int64), window=2)
    assert out[0] == 0.0 and out[1] == 0.0  # nothing had finished (finished == at is not before)
    assert out[2] == pytest.approx(np.log(2))  # median of log 1 and log 4
    assert out[3] == pytest.approx(np.log(2))  # the NaN (no template median yet) is skipped
    assert out[4] == pytest.approx(np.log(8) / 2)  # the last two with a value: log 4, log 2
    assert out[5] == pytest.approx(np.log(4))  # log 2, log 8
    frame = pd.DataFrame(
        {
            "fingerprint": ["a", "a", "a", "b"],
            "started_at": pd.to_datetime([0, 2, 4, 6], unit="s", utc=True),
            "finished_at": pd.to_datetime([1, 3, 5, 7], unit="s", utc=True),
            "duration_ms": [1000.0, 1000.0, 4000.0, 10.0],
            "plan_total_cost": 1.0,
        }
    )
    out = add_history(frame)["load_slowdown"]
    # the third execution took 4x its template's median: the next row (another template) sees it
    assert list(out[:3]) == [0.0, 0.0, 0.0] and out[3] == pytest.approx(np.log(4) / 2)


def test_splits():
    train, val, test = time_split(100)
    assert (len(train), len(val), len(test)) == (70, 15, 15)
    assert train.max() < val.min() and val.max() < test.min()
    fps = [f"fp{i}" for i in range(20)] * 3
    held = template_split(fps, 0.2, seed=1)
    assert len(held) == 4 and held == template_split(list(reversed(fps)), 0.2, seed=1)
    assert held != template_split(fps, 0.2, seed=2)


def test_static_features_take_the_normalised_text_when_query_text_is_missing() -> None:
    """Rows logged before log_parameters was switched on have NULL query_text (NaN in a frame)."""
    import asyncio
    import math

    from models.dataset import StaticFeatures

    static = StaticFeatures(None, None)
    normalized = "SELECT a FROM t WHERE b = $1"
    from_nan = asyncio.run(static.features("f1", math.nan, normalized))
    from_none = asyncio.run(StaticFeatures(None, None).features("f1", None, normalized))
    assert from_nan == from_none and from_nan
