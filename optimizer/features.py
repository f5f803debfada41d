"""Features of a statement for the learned models: its SQL shape, its plan, the catalog, the clock.

Everything here is pure: the parse tree comes from `optimizer.parse`, the EXPLAIN output and the
catalog statistics are fetched by the caller (the proxy's background worker, or the training
pipeline) and passed in. Training and serving call the same functions, so a feature means the same
thing in both. Missing information is NaN, never a guess: LightGBM routes NaN on its own.

Only plain ``EXPLAIN (FORMAT JSON)`` statements are ever produced here (`explain_statement`): the
plan is estimated, the statement is not run, so client DML is never executed by pgsage.

>>> from optimizer.parse import parse_statement
>>> tree = parse_statement("select count(*) from t join u on t.id = u.id where t.a > $1")
>>> shape = sql_shape(tree)
>>> shape.features["n_joins"], shape.features["n_aggregates"], shape.filtered_columns
(1.0, 1.0, (('t', 'a'), ('t', 'id'), ('u', 'id')))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlglot import exp

from . import literals

NAN = float("nan")

SQL_FEATURES: tuple[str, ...] = (
    "stmt_select",
    "stmt_insert",
    "stmt_update",
    "stmt_delete",
    "n_tables",
    "n_table_refs",
    "n_joins",
    "n_inner_joins",
    "n_left_joins",
    "n_right_joins",
    "n_full_joins",
    "n_cross_joins",
    "n_where_conditions",
    "n_eq_predicates",
    "n_range_predicates",
    "n_like_predicates",
    "n_in_predicates",
    "n_or",
    "n_aggregates",
    "n_count_distinct",
    "has_distinct",
    "n_windows",
    "n_subqueries",
    "subquery_depth",
    "n_ctes",
    "n_set_ops",
    "n_group_by",
    "has_having",
    "n_order_by",
    "has_limit",
    "has_offset",
    "n_select_columns",
    "has_star",
    "n_functions",
    "n_case",
    "n_params",
)

CATALOG_FEATURES: tuple[str, ...] = (
    "cat_tables_known",
    "cat_rows_sum",
    "cat_rows_max",
    "cat_rows_min",
    "cat_pages_sum",
    "cat_filtered_columns",
    "cat_filtered_leading_indexed",
    "cat_filtered_in_index",
)

PLAN_FEATURES: tuple[str, ...] = (
    "plan_total_cost",
    "plan_startup_cost",
    "plan_rows",
    "plan_width",
    "plan_nodes",
    "plan_depth",
    "plan_rows_sum",
    "plan_scan_rows_max",
    "plan_top_join_rows",
    "plan_sort_rows",
    "plan_workers",
    "node_seq_scan",
    "node_index_scan",
    "node_index_only_scan",
    "node_bitmap_heap_scan",
    "node_nested_loop",
    "node_hash_join",
    "node_merge_join",
    "node_sort",
    "node_hash_aggregate",
    "node_sorted_aggregate",
    "node_limit",
    "node_gather",
    "node_materialize",
    "node_subplan",
    "node_modify",
)

TEMPORAL_FEATURES: tuple[str, ...] = ("hour", "weekday", "is_weekend", "is_business_hours")

_JOIN_SIDE = {"LEFT": "n_left_joins", "RIGHT": "n_right_joins", "FULL": "n_full_joins"}
_RANGE = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Between)
_LIKE = (exp.Like, exp.ILike, exp.RegexpLike, exp.SimilarTo)
_PREDICATES = (exp.EQ, exp.NEQ, exp.Is, exp.In, *_RANGE, *_LIKE)
_STMT = {exp.Insert: "stmt_insert", exp.Update: "stmt_update", exp.Delete: "stmt_delete"}
_EXPLAINABLE = (exp.Query, exp.Insert, exp.Update, exp.Delete, exp.Merge)
_NODE_FEATURE = {
    "Seq Scan": "node_seq_scan",
    "Index Scan": "node_index_scan",
    "Index Only Scan": "node_index_only_scan",
    "Bitmap Heap Scan": "node_bitmap_heap_scan",
    "Nested Loop": "node_nested_loop",
    "Hash Join": "node_hash_join",
    "Merge Join": "node_merge_join",
    "Sort": "node_sort",
    "Incremental Sort": "node_sort",
    "Limit": "node_limit",
    "Gather": "node_gather",
    "Gather Merge": "node_gather",
    "Materialize": "node_materialize",
    "Memoize": "node_materialize",
    "ModifyTable": "node_modify",
}
_JOINS = frozenset(("Nested Loop", "Hash Join", "Merge Join"))
_SCANS = frozenset(
    ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Tid Scan", "Tid Range Scan")
)

#: a text's literals (string content, number): what `literal_class` reads, found by the compiled
#: scan optimizer.literals.literal_tokens (tests/unit/test_literal_tokens.py holds them together)
_LITERALS = re.compile(r"'((?:[^']|'')*)'|(?<![\w$.])(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)")


@dataclass(frozen=True)
class SqlShape:
    """What one parse of a template says about its cost."""

    features: dict[str, float]
    #: tables as written (schema-qualified when the SQL qualifies them), CTE names excluded
    tables: tuple[str, ...] = ()
    #: (table, column) pairs compared in WHERE / JOIN conditions; table '' when unresolved
    filtered_columns: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TableStats:
    """Catalog statistics of one table (pg_class, pg_index)."""

    reltuples: float
    relpages: float
    #: each index's column names in key order
    indexes: tuple[tuple[str, ...], ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------- SQL


def sql_shape(tree: exp.Expr | None) -> SqlShape:
    """Features of a parse tree (all NaN when the statement did not parse)."""
    if tree is None:
        return SqlShape(dict.fromkeys(SQL_FEATURES, NAN))
    f = dict.fromkeys(SQL_FEATURES, 0.0)
    kind = next((name for cls, name in _STMT.items() if isinstance(tree, cls)), None)
    if kind is None and isinstance(tree, exp.Query):
        kind = "stmt_select"
    if kind is not None:
        f[kind] = 1.0
    cte_names = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    tables = [t for t in tree.find_all(exp.Table) if t.name and t.name not in cte_names]
    names = [_table_name(t) for t in tables]
    f["n_tables"] = float(len(set(names)))
    f["n_table_refs"] = float(len(names))
    f["n_ctes"] = float(len(cte_names))
    _joins(tree, f)
    _predicates(tree, f)
    _aggregates(tree, f)
    _clauses(tree, f)
    f["n_subqueries"] = float(sum(1 for _ in tree.find_all(exp.Subquery)))
    f["subquery_depth"] = float(_query_depth(tree) - 1)
    f["n_set_ops"] = float(sum(1 for _ in tree.find_all(exp.SetOperation)))
    f["n_functions"] = float(sum(1 for _ in tree.find_all(exp.Func)))
    f["n_case"] = float(sum(1 for _ in tree.find_all(exp.Case)))
    f["n_params"] = float(count_params(tree))
    return SqlShape(f, tuple(sorted(set(names))), _filtered_columns(tree, tables))


def _table_name(table: exp.Table) -> str:
    return f"{table.db}.{table.name}" if table.db else table.name


def _joins(tree: exp.Expr, f: dict[str, float]) -> None:
    for join in tree.find_all(exp.Join):
        f["n_joins"] += 1
        side, kind = join.side.upper(), join.kind.upper()
        if kind == "CROSS" or (not side and not join.args.get("on") and not join.args.get("using")):
            f["n_cross_joins"] += 1
        elif side in _JOIN_SIDE:
            f[_JOIN_SIDE[side]] += 1
        else:
            f["n_inner_joins"] += 1


def _predicates(tree: exp.Expr, f: dict[str, float]) -> None:
    for where in tree.find_all(exp.Where):
        for node in where.find_all(*_PREDICATES):
            f["n_where_conditions"] += 1
            if isinstance(node, exp.EQ):
                f["n_eq_predicates"] += 1
            elif isinstance(node, _RANGE):
                f["n_range_predicates"] += 1
            elif isinstance(node, _LIKE):
                f["n_like_predicates"] += 1
            elif isinstance(node, exp.In):
                f["n_in_predicates"] += 1
        f["n_or"] += sum(1 for _ in where.find_all(exp.Or))


def _aggregates(tree: exp.Expr, f: dict[str, float]) -> None:
    for agg in tree.find_all(exp.AggFunc):
        if isinstance(agg.parent, exp.Window):
            continue
        f["n_aggregates"] += 1
        if isinstance(agg.this, exp.Distinct):
            f["n_count_distinct"] += 1
    f["n_windows"] = float(sum(1 for _ in tree.find_all(exp.Window)))


def _clauses(tree: exp.Expr, f: dict[str, float]) -> None:
    for select in tree.find_all(exp.Select):
        if select.args.get("distinct") is not None:
            f["has_distinct"] = 1.0
        group = select.args.get("group")
        if group is not None:
            f["n_group_by"] += len(group.expressions) or 1
        if select.args.get("having") is not None:
            f["has_having"] = 1.0
        if select.args.get("offset") is not None:
            f["has_offset"] = 1.0
        f["has_star"] = max(f["has_star"], float(any(select.find_all(exp.Star))))
    for order in tree.find_all(exp.Order):
        f["n_order_by"] += len(order.expressions)
    f["has_limit"] = float(any(True for _ in tree.find_all(exp.Limit)))
    if isinstance(tree, exp.Query):
        f["n_select_columns"] = float(len(tree.selects))


def _query_depth(node: exp.Expr) -> int:
    """Nesting depth of SELECTs (1 for a flat query)."""
    best = 0
    for child in node.iter_expressions():
        best = max(best, _query_depth(child))
    return best + (1 if isinstance(node, exp.Select) else 0)


def _filtered_columns(tree: exp.Expr, tables: Sequence[exp.Table]) -> tuple[tuple[str, str], ...]:
    alias = {t.alias_or_name: _table_name(t) for t in tables}
    only = _table_name(tables[0]) if len({_table_name(t) for t in tables}) == 1 else ""
    found: set[tuple[str, str]] = set()
    scopes: list[exp.Expr] = list(tree.find_all(exp.Where))
    scopes += [j.args["on"] for j in tree.find_all(exp.Join) if j.args.get("on") is not None]
    for scope in scopes:
        for pred in scope.find_all(*_PREDICATES):
            for col in pred.find_all(exp.Column):
                if col.name:
                    found.add((alias.get(col.table, col.table) if col.table else only, col.name))
    return tuple(sorted(found))


def count_params(tree: exp.Expr) -> int:
    """The highest $n placeholder of the statement (0 when it has none)."""
    best = 0
    for param in tree.find_all(exp.Parameter):
        name = param.name
        if name.isdigit():
            best = max(best, int(name))
    return best


# ------------------------------------------------------------------------------------ catalog


def catalog_features(shape: SqlShape, catalog: Mapping[str, TableStats]) -> dict[str, float]:
    """Table sizes and index coverage of the filtered columns, from statistics keyed by table."""
    known = [catalog[t] for t in shape.tables if t in catalog]
    f = dict.fromkeys(CATALOG_FEATURES, NAN)
    f["cat_tables_known"] = float(len(known))
    f["cat_filtered_columns"] = float(len(shape.filtered_columns))
    rows = [s.reltuples for s in known if s.reltuples >= 0]  # -1 (or NaN): never analysed
    if rows:
        f["cat_rows_sum"], f["cat_rows_max"], f["cat_rows_min"] = sum(rows), max(rows), min(rows)
    if known:
        f["cat_pages_sum"] = float(sum(max(s.relpages, 0.0) for s in known))
    if shape.filtered_columns:
        leading = in_index = 0
        for table, column in shape.filtered_columns:
            stats = [catalog[t] for t in ([table] if table else shape.tables) if t in catalog]
            indexes = [ix for s in stats for ix in s.indexes]
            leading += any(ix[:1] == (column,) for ix in indexes)
            in_index += any(column in ix for ix in indexes)
        n = len(shape.filtered_columns)
        f["cat_filtered_leading_indexed"] = leading / n
        f["cat_filtered_in_index"] = in_index / n
    return f


# --------------------------------------------------------------------------------------- plan


def explain_statement(sql: str, tree: exp.Expr | None) -> str | None:
    """The EXPLAIN (never ANALYZE) to run for `sql`, or None when it has no plan worth asking for.

    >>> from optimizer.parse import parse_statement
    >>> sql = "delete from t where id = 1"
    >>> explain_statement(sql, parse_statement(sql))
    'EXPLAIN (FORMAT JSON) delete from t where id = 1'
    >>> explain_statement("vacuum t", parse_statement("vacuum t")) is None
    True
    """
    if tree is None or not isinstance(tree, _EXPLAINABLE):
        return None
    return f"EXPLAIN (FORMAT JSON) {sql.strip().rstrip(';')}"


def generic_plan_statements(sql: str, n_params: int, name: str) -> tuple[str, str, str]:
    """PREPARE / EXPLAIN EXECUTE / DEALLOCATE for a template whose literals are $n placeholders.

    PostgreSQL 15 has no EXPLAIN (GENERIC_PLAN); run the three in one transaction with
    ``plan_cache_mode = force_generic_plan`` so the NULL arguments do not shape the plan.
    """
    body = sql.strip().rstrip(";")
    args = ", ".join(["NULL"] * n_params)
    execute = f"EXECUTE {name}({args})" if n_params else f"EXECUTE {name}"
    return (
        f"PREPARE {name} AS {body}",
        f"EXPLAIN (FORMAT JSON) {execute}",
        f"DEALLOCATE {name}",
    )


def plan_features(explain_output: Any) -> dict[str, float]:
    """Features of EXPLAIN (FORMAT JSON) output (the parsed JSON, or its text); NaN if absent."""
    f = dict.fromkeys(PLAN_FEATURES, NAN)
    root = _plan_root(explain_output)
    if root is None:
        return f
    f.update(dict.fromkeys(PLAN_FEATURES[11:], 0.0))
    f["plan_total_cost"] = float(root.get("Total Cost", NAN))
    f["plan_startup_cost"] = float(root.get("Startup Cost", NAN))
    f["plan_rows"] = float(root.get("Plan Rows", NAN))
    f["plan_width"] = float(root.get("Plan Width", NAN))
    nodes = depth = 0
    rows_sum = scan_max = sort_rows = workers = 0.0
    top_join = NAN
    queue: list[tuple[Mapping[str, Any], int]] = [(root, 1)]
    while queue:  # breadth first, so the first join met is the top join
        node, level = queue.pop(0)
        nodes += 1
        depth = max(depth, level)
        kind = str(node.get("Node Type", ""))
        rows = float(node.get("Plan Rows", 0.0))
        rows_sum += rows
        if kind in _NODE_FEATURE:
            f[_NODE_FEATURE[kind]] += 1
        if kind == "Aggregate":
            hashed = node.get("Strategy") in ("Hashed", "Mixed")
            f["node_hash_aggregate" if hashed else "node_sorted_aggregate"] += 1
        if kind in _SCANS:
            scan_max = max(scan_max, rows)
        if kind in _JOINS and math.isnan(top_join):
            top_join = rows
        if kind in ("Sort", "Incremental Sort"):
            sort_rows = max(sort_rows, rows)
        if str(node.get("Parent Relationship", "")) in ("SubPlan", "InitPlan"):
            f["node_subplan"] += 1
        workers += float(node.get("Workers Planned", 0.0))
        queue.extend((child, level + 1) for child in node.get("Plans", ()))
    f["plan_nodes"], f["plan_depth"] = float(nodes), float(depth)
    f["plan_rows_sum"], f["plan_scan_rows_max"] = rows_sum, scan_max
    f["plan_top_join_rows"], f["plan_sort_rows"], f["plan_workers"] = top_join, sort_rows, workers
    return f


def _plan_root(explain_output: Any) -> Mapping[str, Any] | None:
    if isinstance(explain_output, str | bytes):
        import json

        try:
            explain_output = json.loads(explain_output)
        except ValueError:
            return None
    if isinstance(explain_output, list) and explain_output:
        explain_output = explain_output[0]
    if isinstance(explain_output, Mapping):
        plan = explain_output.get("Plan")
        if isinstance(plan, Mapping):
            return plan
    return None


def features_from_explain(
    sql: str, tree: exp.Expr | None, explain: Callable[[str], Any]
) -> dict[str, float]:
    """Plan features of `sql`, asking `explain` (the caller's database call) for the plan.

    `explain` receives an ``EXPLAIN (FORMAT JSON) ...`` statement and returns its output; any
    error it raises means "no plan" (NaN features): a failed EXPLAIN never fails feature building.
    """
    statement = explain_statement(sql, tree)
    if statement is None:
        return plan_features(None)
    try:
        return plan_features(explain(statement))
    except Exception:
        return plan_features(None)


# ------------------------------------------------------------------------------ literals, time


def literal_class(sql: str) -> str:
    """A short id of a text's literal values by order of magnitude (and of range widths).

    Executions of one template with literals of similar size share a class, so a plan is
    fetched per class rather than per text, while a 10-row range and a 10^6-row range differ.

    >>> narrow = literal_class("select * from t where id between 100 and 120")
    >>> narrow == literal_class("select * from t where id between 101 and 125")
    True
    >>> narrow == literal_class("select * from t where id between 100 and 90000")
    False
    """
    # the literals' tokens by a compiled scan, a bind parameter's `$n` without any: "generic"
    return literals.literal_class(sql)  # (compiled: optimizer/literals.py)


def temporal_features(ts: datetime) -> dict[str, float]:
    """Calendar features of a (simulated-clock) timestamp, in its own time zone."""
    weekday = ts.weekday()
    return {
        "hour": float(ts.hour),
        "weekday": float(weekday),
        "is_weekend": float(weekday >= 5),
        "is_business_hours": float(weekday < 5 and 9 <= ts.hour < 18),
    }
