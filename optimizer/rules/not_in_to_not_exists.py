"""``x NOT IN (SELECT y ...)`` -> ``NOT EXISTS (SELECT 1 ... WHERE y = x)``, when both x and y
are provably NOT NULL.

NOT IN is three-valued: one NULL y makes it NULL for every x, and a NULL x is never TRUE; NOT
EXISTS is two-valued. They agree only when neither side can be NULL, which the catalog proves
(NOT NULL columns of tables not on the NULL-extended side of an outer join). PostgreSQL plans
NOT IN (subquery) as a filter over a hashed or, worse, re-scanned subplan; NOT EXISTS becomes an
anti-join.

>>> from optimizer.rules import RuleContext
>>> import sqlglot
>>> ctx = RuleContext(not_null={"public.c": {"id"}, "public.o": {"cid"}})
>>> tree = sqlglot.parse_one("SELECT id FROM c WHERE id NOT IN (SELECT cid FROM o)", "postgres")
>>> print(apply(tree, ctx).sql("postgres"))
SELECT id FROM c WHERE NOT EXISTS(SELECT 1 FROM o WHERE cid = c.id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from optimizer.rules._common import (
    and_all,
    clause_of,
    column_ref,
    conjuncts,
    enclosing_select,
    from_clause,
    has_subquery,
    ident_name,
    nullable_sources,
    qualifier,
    sources,
    table_key,
    unparen,
)

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

NAME = "not_in_to_not_exists"


def apply(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    tree = expr.copy()
    changed = False
    for node in list(tree.find_all(exp.Not)):
        in_ = unparen(node.this)
        if isinstance(in_, exp.In) and isinstance(in_.args.get("query"), exp.Subquery):
            replacement = _not_exists(node, in_, ctx)
            if replacement is not None:
                node.replace(replacement)
                changed = True
    return tree if changed else None


def _not_exists(node: exp.Not, in_: exp.In, ctx: RuleContext) -> exp.Expr | None:
    select = enclosing_select(node)
    if select is None or clause_of(node, select) != "where":
        return None
    outer = _not_null_column(in_.this, select, ctx)
    inner = in_.args["query"].this
    if outer is None or not isinstance(inner, exp.Select) or not _inner_ok(inner):
        return None
    item = inner.expressions[0]
    y = item.this if isinstance(item, exp.Alias) else item
    inner_names = sources(inner)
    if _not_null_column(y, inner, ctx) is None or not inner_names or outer in inner_names:
        return None  # the same reference name inside would capture the outer column
    x = column_ref(ident_name(in_.this.this), outer)
    exists = inner.copy()
    exists.set("distinct", None)
    exists.set("expressions", [exp.Literal.number(1)])
    where = and_all(
        [
            *(p.copy() for p in conjuncts(inner.args.get("where") and inner.args["where"].this)),
            exp.EQ(this=y.copy(), expression=x),
        ]
    )
    exists.set("where", exp.Where(this=where))
    return exp.Not(this=exp.Exists(this=exists))


def _inner_ok(inner: exp.Select) -> bool:
    if from_clause(inner) is None or len(inner.expressions) != 1:
        return False
    for arg in ("group", "having", "limit", "offset", "order", "with", "qualify", "windows"):
        if inner.args.get(arg):
            return False
    distinct = inner.args.get("distinct")
    if distinct is not None and distinct.args.get("on") is not None:
        return False
    return not has_subquery(inner.expressions[0])


def _not_null_column(node: exp.Expr, select: exp.Select, ctx: RuleContext) -> str | None:
    """The reference name of the table whose NOT NULL column `node` is, within `select`."""
    if not isinstance(node, exp.Column) or isinstance(node.this, exp.Star):
        return None
    names = sources(select)
    if not names:
        return None
    q = qualifier(node)
    if q is None:
        if node.args.get("table") is not None or len(names) != 1:
            return None
        (q,) = names
    table = names.get(q)
    if not isinstance(table, exp.Table):
        return None
    key = table_key(table, ctx)
    if key is None or ident_name(node.this) not in ctx.not_null.get(key, ()):
        return None
    nullable = nullable_sources(select)
    if nullable is None or q in nullable:
        return None
    return q
