"""``x IN (SELECT DISTINCT y FROM t WHERE p)`` -> ``EXISTS (SELECT 1 FROM t WHERE p AND y = x)``.

The DISTINCT makes PostgreSQL sort or hash the whole subquery result before the semi-join; EXISTS
lets it stop at the first match per row. IN and EXISTS differ only when IN is NULL (no match but
a NULL y or x), where EXISTS is FALSE; so the rewrite is made only where NULL and FALSE act alike:
in WHERE, reached through AND and OR only (never under NOT).

>>> from optimizer.rules import RuleContext
>>> import sqlglot
>>> tree = sqlglot.parse_one(
...     "SELECT * FROM c WHERE c.id IN (SELECT DISTINCT cid FROM o WHERE o.total > 10)",
...     read="postgres")
>>> print(apply(tree, RuleContext()).sql("postgres"))
SELECT * FROM c WHERE EXISTS(SELECT 1 FROM o WHERE o.total > 10 AND cid = c.id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlglot import exp

from optimizer.rules._common import (
    and_all,
    columns,
    conjuncts,
    enclosing_select,
    from_clause,
    has_subquery,
    identifier,
    is_volatile,
    qualifier,
    sources,
)

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

NAME = "in_distinct_to_exists"


def apply(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    tree = expr.copy()
    changed = False
    for node in list(tree.find_all(exp.In)):
        if isinstance(node.args.get("query"), exp.Subquery):
            replacement = _exists(node)
            if replacement is not None:
                node.replace(replacement)
                changed = True
    return tree if changed else None


def _in_where_positively(node: exp.Expr) -> exp.Select | None:
    """The select whose WHERE holds `node` under AND/OR/parentheses only, else None."""
    parent = node.parent
    while isinstance(parent, (exp.And, exp.Or, exp.Paren)):
        parent = parent.parent
    if isinstance(parent, exp.Where) and isinstance(parent.parent, exp.Select):
        return parent.parent
    return None


def _exists(node: exp.In) -> exp.Expr | None:
    select = _in_where_positively(node)
    inner = node.args["query"].this
    if select is None or enclosing_select(node) is not select:
        return None
    if not isinstance(inner, exp.Select) or not _inner_ok(inner):
        return None
    inner_names = sources(inner)
    outer_names = sources(select)
    x = node.this
    if inner_names is None or outer_names is None or has_subquery(x) or is_volatile(x):
        return None
    if x.find(exp.AggFunc, exp.Window) or isinstance(x, exp.Tuple):
        return None
    x = x.copy()
    for col in columns(x):
        q = qualifier(col)
        if q is None:
            if col.args.get("table") is not None or len(outer_names) != 1:
                return None
            (q,) = outer_names
            col.set("table", identifier(q))
        if q in inner_names:
            return None  # the inner scope would capture the reference
    item = inner.expressions[0]
    y = item.this if isinstance(item, exp.Alias) else item
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
    return exp.Exists(this=exists)


def _inner_ok(inner: exp.Select) -> bool:
    distinct = inner.args.get("distinct")
    if distinct is None or distinct.args.get("on") is not None:
        return False
    if from_clause(inner) is None or len(inner.expressions) != 1:
        return False
    for arg in ("group", "having", "limit", "offset", "order", "with", "qualify", "windows"):
        if inner.args.get(arg):
            return False
    y = inner.expressions[0]
    if isinstance(y, exp.Star) or y.find(exp.AggFunc, exp.Window) or has_subquery(y):
        return False
    return not is_volatile(inner)
