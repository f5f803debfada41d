"""Candidate generation, column order, skipping what exists, DDL quoting, greedy selection."""

from __future__ import annotations

import math

import pytest

from optimizer.parse import parse_statement
from optimizer.whatif import (
    Candidate,
    CandidateConfig,
    CandidateInfo,
    Evaluation,
    ExistingIndex,
    TableInfo,
    WorkloadItem,
    analyze,
    generate_candidates,
    greedy_select,
    has_params,
    plan_total_cost,
    quote_ident,
    quote_literal,
)

ORDERS = (
    "id",
    "customer_id",
    "status",
    "created_at",
    "amount",
    "region",
    "note",
    "channel",
    "sku",
)
CATALOG = {
    "shop.orders": TableInfo(
        rows=1e6,
        size_bytes=10**8,
        columns=ORDERS,
        indexes=(ExistingIndex("orders_pkey", ("id",), primary=True, unique=True),),
        n_distinct={"customer_id": 5e4, "region": 4, "status": 3},
    ),
    "shop.customers": TableInfo(
        rows=5e4,
        size_bytes=10**7,
        columns=("id", "email", "region", "segment"),
        indexes=(
            ExistingIndex("customers_pkey", ("id",), primary=True),
            ExistingIndex("c_region_segment", ("region", "segment")),
        ),
    ),
    "shop.tiny": TableInfo(rows=100, size_bytes=8192, columns=("id", "v")),
}


def labels(sqls: list[str] | str, **cfg: object) -> list[str]:
    if isinstance(sqls, str):
        sqls = [sqls]
    work = [WorkloadItem(f"f{i}", s, 10.0) for i, s in enumerate(sqls)]
    return [c.candidate.label for c in generate_candidates(work, CATALOG, CandidateConfig(**cfg))]  # type: ignore[arg-type]


def test_equality_columns_come_before_range_columns_most_distinct_first():
    out = labels(
        "SELECT id FROM shop.orders WHERE created_at > $1 AND region = $2 AND customer_id = $3"
    )
    assert "shop.orders (customer_id, region, created_at)" in out
    assert "shop.orders (region, customer_id, created_at)" not in out
    # single-column baselines for every filtered column
    assert {"shop.orders (customer_id)", "shop.orders (region)", "shop.orders (created_at)"} <= set(
        out
    )


def test_join_keys_order_by_and_group_by():
    out = labels(
        "SELECT o.status, count(*) FROM shop.orders o JOIN shop.customers c ON c.id = o.customer_id"
        " WHERE c.segment = 'vip' GROUP BY o.status"
    )
    assert "shop.orders (customer_id)" in out  # the join key of the inner side
    assert "shop.orders (status)" in out  # GROUP BY
    assert "shop.customers (segment)" in out
    out = labels(
        "SELECT id, amount FROM shop.orders WHERE region = $1 ORDER BY created_at DESC LIMIT 5"
    )
    assert "shop.orders (region, created_at)" in out
    # an ORDER BY mixing tables or directions gives no sort candidate
    out = labels("SELECT id FROM shop.orders ORDER BY created_at, amount DESC LIMIT 5")
    assert not any("created_at, amount" in x for x in out)


def test_correlated_subquery_column_counts_as_equality():
    out = labels(
        "SELECT c.id, (SELECT max(o.amount) FROM shop.orders o WHERE o.customer_id = c.id)"
        " FROM shop.customers c WHERE c.email = $1"
    )
    assert "shop.orders (customer_id)" in out
    assert "shop.customers (email)" in out


def test_include_only_when_few_further_columns_are_read_and_never_for_star():
    out = labels("SELECT amount FROM shop.orders WHERE customer_id = $1")
    assert "shop.orders (customer_id) INCLUDE (amount)" in out
    out = labels("SELECT * FROM shop.orders WHERE customer_id = $1")
    assert not any("INCLUDE" in x for x in out)
    out = labels(
        "SELECT amount, region, note, channel, sku FROM shop.orders WHERE customer_id = $1"
    )
    assert not any("INCLUDE" in x for x in out)


def test_partial_index_when_a_constant_dominates_the_samples():
    work = [
        WorkloadItem(
            "f", f"SELECT id FROM shop.orders WHERE status = 'returned' AND customer_id = {i}", 5.0
        )
        for i in range(5)
    ]
    out = [c.candidate for c in generate_candidates(work, CATALOG)]
    partial = [c for c in out if c.predicate is not None]
    assert partial == [
        Candidate("shop.orders", ("customer_id",), (), ("status", "=", "'returned'"))
    ]
    assert "WHERE \"status\" = 'returned'" in partial[0].statement("ix")
    # varying values: no partial index
    work = [
        WorkloadItem(
            "g", f"SELECT id FROM shop.orders WHERE status = 's{i}' AND customer_id = {i}", 5.0
        )
        for i in range(5)
    ]
    assert not any(c.candidate.predicate for c in generate_candidates(work, CATALOG))


def test_existing_indexes_and_their_prefixes_and_small_tables_are_skipped():
    assert labels("SELECT * FROM shop.orders WHERE id = $1") == []
    out = labels("SELECT id FROM shop.customers WHERE region = $1")
    assert "shop.customers (region)" not in out  # prefix of (region, segment)
    out = labels("SELECT id FROM shop.customers WHERE region = $1 AND segment = $2")
    assert "shop.customers (region, segment)" not in out
    assert labels("SELECT * FROM shop.tiny WHERE v = 3") == []
    assert labels("SELECT * FROM shop.tiny WHERE v = 3", min_rows=10) == ["shop.tiny (v)"]
    # unknown tables and columns are ignored
    assert labels("SELECT * FROM nowhere WHERE x = 1") == []
    assert labels("SELECT * FROM shop.orders WHERE nope = 1") == []


def test_weights_add_up_per_candidate_once_per_fingerprint():
    work = [
        WorkloadItem("a", "SELECT id FROM shop.orders WHERE customer_id = 1", 10.0),
        WorkloadItem("a", "SELECT id FROM shop.orders WHERE customer_id = 2", 10.0),
        WorkloadItem("b", "SELECT amount FROM shop.orders WHERE customer_id = $1", 5.0),
    ]
    top = generate_candidates(work, CATALOG)[0]
    assert top.candidate.label == "shop.orders (customer_id)"
    assert top.fingerprints == {"a": 10.0, "b": 5.0} and top.weight == 15.0


def test_hostile_identifiers_are_quoted():
    evil = 'x"; DROP TABLE users; --'
    cand = Candidate(f"s{evil}.t{evil}", (evil, "ok"), (evil,), (evil, "=", quote_literal("a'b")))
    ddl = cand.statement(evil, concurrently=True)
    assert ddl == (
        'CREATE INDEX CONCURRENTLY "x""; DROP TABLE users; --" ON "sx""; DROP TABLE users; --".'
        '"tx""; DROP TABLE users; --" USING btree ("x""; DROP TABLE users; --", "ok")'
        ' INCLUDE ("x""; DROP TABLE users; --") WHERE "x""; DROP TABLE users; --" = \'a\'\'b\''
    )
    assert parse_statement(ddl) is not None
    # a generated name is safe, unique and at most 63 bytes
    name = cand.index_name()
    assert len(name) <= 63 and name.replace("_", "").isalnum()
    with pytest.raises(ValueError):
        Candidate("t", ("a",), (), ("a", "=", "1; drop table t")).statement("i")
    with pytest.raises(ValueError):
        quote_ident("a\x00b")
    # identifiers that came from the workload are quoted the same way
    sql = 'SELECT "we""ird" FROM shop.orders WHERE "Mixed Case" = 1'
    cat = {"shop.orders": TableInfo(1e6, 10**8, ('we"ird', "Mixed Case"))}
    out = generate_candidates([WorkloadItem("f", sql, 1.0)], cat)
    assert out[0].candidate.statement("i") == (
        'CREATE INDEX "i" ON "shop"."orders" USING btree ("Mixed Case")'
    )


def test_analyze_resolves_unqualified_columns_through_the_catalog():
    tree = parse_statement(
        "SELECT email FROM shop.customers c JOIN shop.orders o ON o.customer_id = c.id"
        " WHERE segment = 'vip' AND amount > 5"
    )
    acc = {a.table: a for a in analyze(tree, CATALOG)}
    assert acc["shop.customers"].eq == ["segment"]
    assert acc["shop.orders"].range == ["amount"]
    assert acc["shop.orders"].join == ["customer_id"] and acc["shop.customers"].join == ["id"]


def test_helpers():
    assert has_params("select $1, '$2' from t where a = $3") == 3
    assert has_params("select 1") == 0
    assert plan_total_cost('[{"Plan": {"Total Cost": 12.5}}]') == 12.5


def _ev(label: str, size: int, base: dict[str, float], cost: dict[str, float]) -> Evaluation:
    cand = Candidate("shop.orders", (label,))
    info = CandidateInfo(cand, dict.fromkeys(base, 100.0))
    return Evaluation(info, size, base, cost, dict.fromkeys(base, 100.0))


def test_greedy_counts_only_what_a_second_index_adds_and_respects_the_budget():
    a = _ev("a", 1000, {"f": 100.0}, {"f": 10.0})  # saves 90 ms
    b = _ev("b", 1000, {"f": 100.0}, {"f": 20.0})  # the same statement, less well
    c = _ev("c", 5000, {"g": 100.0}, {"g": 50.0})  # another statement, bigger
    assert [e.info.candidate.columns for e in greedy_select([a, b, c], 10_000)] == [("a",), ("c",)]
    assert greedy_select([a, b, c], 1500) == [a]
    c.write_cost = 60.0  # maintenance outweighs its 50 ms gain
    assert greedy_select([a, b, c], 10_000) == [a]
    assert math.isclose(a.gain, 90.0)


def test_a_regression_needs_a_plan_that_uses_the_index() -> None:
    """Validation's verdict: a fingerprint slower after the build is a regression only when
    its plans scan the new index; one planned without it was slowed by something else."""
    from models.advisor import AdvisorConfig, _plan_indexes, compare

    cfg = AdvisorConfig()
    before = {"own": [10.0, 11.0, 10.5, 10.2, 10.8, 10.1], "other": [5.0, 5.1, 5.2, 5.0, 5.1, 5.3]}
    after = {"own": [1.0, 1.1, 1.2, 1.0, 1.1, 1.05], "other": [7.0, 7.2, 7.1, 7.3, 7.0, 7.2]}
    calls = {"own": 10.0, "other": 10.0}
    blind = compare(before, after, calls, ["own"], cfg)
    assert blind["regressions"] == ["other"] and not blind["keep"]
    unused = compare(before, after, calls, ["own"], cfg, affected={"own"})
    assert unused["regressions"] == [] and unused["keep"] and unused["speedup"] > 5
    assert unused["per_fingerprint"]["other"]["uses_index"] is False
    used = compare(before, after, calls, ["own"], cfg, affected={"own", "other"})
    assert used["regressions"] == ["other"] and not used["keep"]

    plan = {"Node Type": "Nested Loop", "Plans": [
        {"Node Type": "Index Scan", "Index Name": "pgsage_a_1"},
        {"Node Type": "Bitmap Heap Scan", "Plans": [
            {"Node Type": "Bitmap Index Scan", "Index Name": "t_pkey"}]}]}  # fmt: skip
    assert _plan_indexes(plan) == {"pgsage_a_1", "t_pkey"}
