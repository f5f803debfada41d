"""``SELECT .. WHERE a = 1 OR b = 2`` -> ``SELECT .. WHERE a = 1 UNION SELECT .. WHERE b = 2``.

An OR across different columns defeats a single index scan (PostgreSQL can only BitmapOr); each
UNION branch can use its own index. UNION removes duplicate rows, which is exact only when the
original had none to keep: the select list must carry the table's primary key. A row matching
several disjuncts appears once on both sides. Applied only when the cost model says it pays.

With ORDER BY / LIMIT, each branch keeps them (the first n of a union are among the first n of
its branches), and an outer select over the union orders and limits again; ORDER BY expressions
that are not output columns ride along as hidden columns the outer select leaves out.

>>> from optimizer.rules import RuleContext
>>> import sqlglot
>>> ctx = RuleContext(primary_keys={"public.t": ("id",)})
>>> tree = sqlglot.parse_one("SELECT id, a FROM t WHERE a = 1 OR b = 2", read="postgres")
>>> print(apply(tree, ctx).sql("postgres"))
SELECT id, a FROM t WHERE a = 1 UNION SELECT id, a FROM t WHERE b = 2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from optimizer.rules._common import (
    DIALECT,
    alias_as,
    and_all,
    column_ref,
    columns,
    conjuncts,
    disjuncts,
    fresh_name,
    from_clause,
    ident_name,
    identifier,
    is_volatile,
    joins,
    pg_output_name,
    qualifier,
    source_name,
    table_key,
    unparen,
)

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

NAME = "or_to_union"

_BLOCKERS = ("group", "having", "offset", "distinct", "with", "qualify", "windows", "locks",
             "into", "fetch")  # fmt: skip


def apply(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    if not isinstance(expr, exp.Select) or any(expr.args.get(a) for a in _BLOCKERS):
        return None
    frm = from_clause(expr)
    if frm is None or joins(expr) or not isinstance(frm.this, exp.Table):
        return None
    table = frm.this
    key = table_key(table, ctx)
    pk = ctx.primary_keys.get(key, ()) if key else ()
    if not pk or not _selects_key(expr, set(pk), source_name(table) or ""):
        return None
    if expr.find(exp.AggFunc, exp.Window) or is_volatile(expr):
        return None
    where = expr.args.get("where")
    parts = conjuncts(where.this if where is not None else None)
    ors = [i for i, p in enumerate(parts) if isinstance(unparen(p), exp.Or)]
    if len(ors) != 1:
        return None
    rest = [p for i, p in enumerate(parts) if i != ors[0]]
    branches = disjuncts(parts[ors[0]])
    if not _different_columns(branches):
        return None

    ordered = expr.args.get("order") is not None or expr.args.get("limit") is not None
    plan = _outer_plan(expr) if ordered else None
    if ordered and plan is None:
        return None
    selects: list[exp.Expr] = []
    for branch in branches:
        one = expr.copy()
        one.set("where", exp.Where(this=and_all([*(p.copy() for p in rest), branch.copy()])))
        if plan is not None:
            for hidden_name, hidden in plan[1]:
                one.select(alias_as(hidden.copy(), hidden_name), copy=False)
        selects.append(exp.Subquery(this=one) if ordered else one)
    union: exp.Expr = selects[0]
    for other in selects[1:]:
        union = exp.Union(this=union, expression=other, distinct=True)
    if plan is not None:
        union = _ordered_outer(expr, union, plan[0], fresh_name(expr, "_pgsage_u"))
    if not ctx.cost_pays(expr.sql(dialect=DIALECT), union.sql(dialect=DIALECT)):
        return None
    return union


def _outer_plan(
    select: exp.Select,
) -> tuple[list[exp.Ordered], list[tuple[str, exp.Expr]]] | None:
    """ORDER BY items for the outer select (over output names) and the hidden columns they
    need, or None when an output column has no usable name."""
    names = [pg_output_name(item) for item in select.expressions]
    if "?column?" in names or len(set(names)) != len(names):
        return None
    if any(isinstance(i, exp.Star) or i.find(exp.Star) for i in select.expressions):
        return None
    order = select.args.get("order")
    outer: list[exp.Ordered] = []
    hidden: list[tuple[str, exp.Expr]] = []
    for o in order.expressions if order is not None else []:
        key = o.this
        if isinstance(key, exp.Literal) and not key.is_string:
            position = int(key.name)
            if not 1 <= position <= len(names):
                return None
            ref = column_ref(names[position - 1])
        elif (
            isinstance(key, exp.Column)
            and key.args.get("table") is None
            and (ident_name(key.this) in names)
        ):
            ref = column_ref(ident_name(key.this))
        else:
            hidden_name = f"_pgsage_o{len(hidden) + 1}"
            if hidden_name in names:
                return None
            hidden.append((hidden_name, key))
            ref = column_ref(hidden_name)
        new = o.copy()
        new.set("this", ref)
        outer.append(new)
    return outer, hidden


def _ordered_outer(
    select: exp.Select, union: exp.Expr, order: list[exp.Ordered], name: str
) -> exp.Select:
    names = [pg_output_name(item) for item in select.expressions]
    derived = exp.Subquery(this=union, alias=exp.TableAlias(this=identifier(name)))
    outer = exp.select(*(column_ref(n) for n in names)).from_(derived)
    if order:
        outer = outer.order_by(*order)
    limit = select.args.get("limit")
    if limit is not None:
        outer.set("limit", limit.copy())
    return outer


def _selects_key(select: exp.Select, pk: set[str], name: str) -> bool:
    """Does the select list output every primary key column (as itself)?"""
    seen: set[str] = set()
    for item in select.expressions:
        if isinstance(item, exp.Star):
            return True
        value = item.this if isinstance(item, exp.Alias) else item
        if isinstance(value, exp.Column):
            if isinstance(value.this, exp.Star):
                if qualifier(value) == name:
                    return True
                continue
            if qualifier(value) in (None, name):
                seen.add(ident_name(value.this))
    return pk <= seen


def _different_columns(branches: list[exp.Expr]) -> bool:
    """Each disjunct reads columns, and no column is read by two of them."""
    seen: set[str] = set()
    for branch in branches:
        cols = {ident_name(c.this) for c in columns(branch)}
        if not cols or cols & seen or branch.find(exp.Subquery, exp.Exists):
            return False
        seen |= cols
    return True
