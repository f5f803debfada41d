"""Correlated scalar subquery in the select list -> LEFT JOIN to a grouped derived table.

PostgreSQL runs a correlated subquery once per outer row (a nested loop it cannot reorder); the
grouped derived table is aggregated once and hash-joined. count() of no rows is 0 while a LEFT
JOIN that finds no group yields NULL, so counts are wrapped in COALESCE(.., 0); every other
aggregate of no rows is NULL, as the join gives.

>>> from optimizer.rules import RuleContext
>>> import sqlglot
>>> tree = sqlglot.parse_one(
...     "SELECT c.id, (SELECT count(*) FROM orders o WHERE o.cid = c.id) AS n FROM c",
...     read="postgres")
>>> print(apply(tree, RuleContext()).sql("postgres", pretty=True))
SELECT
  c.id,
  COALESCE(_pgsage_sq1.v, 0) AS n
FROM c
LEFT JOIN (
  SELECT
    o.cid AS k1,
    COUNT(*) AS v
  FROM orders AS o
  GROUP BY
    o.cid
) AS _pgsage_sq1
  ON _pgsage_sq1.k1 = c.id
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from optimizer.rules._common import (
    alias_as,
    and_all,
    clause_of,
    column_ref,
    columns,
    conjuncts,
    enclosing_select,
    fresh_name,
    from_clause,
    has_subquery,
    identifier,
    is_comma_join,
    is_volatile,
    joins,
    pg_output_name,
    qualifier,
    sources,
)

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

NAME = "correlated_scalar_subquery"


def apply(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    tree = expr.copy()
    changed = False
    # deepest selects first, so an outer select sees its projections already rewritten
    for select in reversed(list(tree.find_all(exp.Select))):
        if _outer_ok(select):
            changed |= _rewrite_select(tree, select)
    return tree if changed else None


def _outer_ok(select: exp.Select) -> bool:
    if from_clause(select) is None or select.args.get("group") or select.args.get("having"):
        return False
    if any(is_comma_join(j) for j in joins(select)):
        return False  # a JOIN after a comma item may not reference the items before the comma
    for item in select.expressions:
        if isinstance(item, exp.Star):
            return False  # SELECT * would grow the derived table's columns
        for agg in item.find_all(exp.AggFunc):
            if enclosing_select(agg) is select:
                return False
    return True


def _rewrite_select(tree: exp.Expr, select: exp.Select) -> bool:
    outer = sources(select)
    if outer is None:
        return False
    changed = False
    for item in list(select.expressions):
        for sub in list(item.find_all(exp.Subquery)):
            if enclosing_select(sub) is not select or clause_of(sub, select) != "expressions":
                continue
            if isinstance(sub.parent, (exp.In, exp.Exists, exp.Any, exp.All)):
                continue
            changed |= _rewrite_subquery(tree, select, set(outer), sub)
    return changed


def _rewrite_subquery(
    tree: exp.Expr, select: exp.Select, outer: set[str], sub: exp.Subquery
) -> bool:
    inner = sub.this
    if not isinstance(inner, exp.Select) or not _inner_ok(inner):
        return False
    inner_names = sources(inner)
    if inner_names is None:
        return False
    (agg_item,) = inner.expressions
    agg = agg_item.this if isinstance(agg_item, exp.Alias) else agg_item
    count = _is_count(agg)
    if count is None:
        return False

    keys: list[tuple[exp.Expr, exp.Expr]] = []
    local: list[exp.Expr] = []
    for part in conjuncts(inner.args.get("where") and inner.args["where"].this):
        side = _classify(part, set(inner_names), outer)
        if side is None:
            return False
        if isinstance(side, tuple):
            keys.append(side)
        else:
            local.append(part)
    if not keys:
        return False
    # outer columns may appear only in the correlation equalities
    for part in (*inner.expressions, *joins(inner), from_clause(inner)):
        if part is not None and not _refs(part, set(inner_names), outer) <= {"inner"}:
            return False

    name = fresh_name(tree, "_pgsage_sq")
    derived = inner.copy()
    derived.set("where", None)
    derived.set("expressions", [])
    for i, (inner_key, _) in enumerate(keys, 1):
        derived = derived.select(alias_as(inner_key.copy(), f"k{i}"), copy=False)
    derived = derived.select(alias_as(agg.copy(), "v"), copy=False)
    if local:
        derived = derived.where(and_all([p.copy() for p in local]), copy=False)
    derived = derived.group_by(*(k.copy() for k, _ in keys), copy=False)

    on = and_all(
        [
            exp.EQ(this=column_ref(f"k{i}", name), expression=o.copy())
            for i, (_, o) in enumerate(keys, 1)
        ]
    )
    select.join(
        exp.Subquery(this=derived, alias=exp.TableAlias(this=identifier(name))),
        on=on,
        join_type="LEFT",
        copy=False,
    )

    value: exp.Expr = column_ref("v", name)
    if count:
        value = exp.Coalesce(this=value, expressions=[exp.Literal.number(0)])
    if sub.parent is select:
        value = alias_as(value, pg_output_name(sub))
    sub.replace(value)
    return True


def _inner_ok(inner: exp.Select) -> bool:
    if from_clause(inner) is None or len(inner.expressions) != 1:
        return False
    for arg in (
        "group",
        "having",
        "limit",
        "offset",
        "order",
        "distinct",
        "with",
        "qualify",
        "windows",
        "locks",
    ):
        if inner.args.get(arg):
            return False
    if any(n is not inner for n in inner.find_all(exp.Query)) or has_subquery(inner):
        return False
    if inner.find(exp.Window) or is_volatile(inner):
        return False
    return all(
        not isinstance(c.this, exp.Star) or c is inner.expressions[0]
        for c in inner.find_all(exp.Column)
    )


def _is_count(agg: exp.Expr) -> bool | None:
    """True for a count, False for another aggregate, None for anything else."""
    base = agg.this if isinstance(agg, exp.Filter) else agg
    if not isinstance(base, exp.AggFunc):
        return None
    return isinstance(base, exp.Count)


def _refs(node: exp.Expr, inner: set[str], outer: set[str]) -> set[str]:
    """Which scopes the columns of `node` belong to: "inner", "outer", or "unknown"."""
    found: set[str] = set()
    for col in columns(node):
        q = qualifier(col)
        if q is None:
            found.add("unknown")  # unqualified: only a catalog could say which scope it means
        elif q in inner:
            found.add("inner")
        elif q in outer:
            found.add("outer")
        else:
            found.add("unknown")
    return found


def _classify(
    part: exp.Expr, inner: set[str], outer: set[str]
) -> str | tuple[exp.Expr, exp.Expr] | None:
    """ "local" for an inner-only conjunct, (inner key, outer expr) for a correlation equality,
    None for anything else."""
    refs = _refs(part, inner, outer)
    if "unknown" in refs:
        return None
    if "outer" not in refs:
        return "local"
    if not isinstance(part, exp.EQ) or is_volatile(part):
        return None
    for a, b in ((part.this, part.expression), (part.expression, part.this)):
        if _refs(a, inner, outer) == {"inner"} and _refs(b, inner, outer) == {"outer"}:
            return (a, b)
    return None
