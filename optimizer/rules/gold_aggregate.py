"""Aggregates over ``silver.sales_cleaned`` that ``gold.sales_summary`` answers exactly -> gold.

gold.sales_summary (warehouse_sql/migrations/0013_gold.sql, refreshed by
warehouse_sql/etl/20_gold_sales_summary.sql) holds one row per (sold_at::date, product category,
customer region, channel) that has sales lines, with ``lines = count(*)``, ``units_sold +
units_returned = sum(quantity)`` and ``net_revenue = sum(net_amount)`` over those lines. Every
sales line joins exactly one product and one customer (NOT NULL foreign keys), so a query over
sales lines, optionally joined to silver.customer_cleaned / silver.product_cleaned on their keys,
that groups and filters only by those four dimensions and aggregates only

    sum(net_amount), sum(quantity), count(*), min/max/count(DISTINCT <dimension>)

is answered exactly by summing the gold rows. Filters on the raw timestamp are exact only at day
boundaries: ``sold_at >= 'YYYY-MM-DD'`` and ``sold_at < 'YYYY-MM-DD'`` (or a timestamp literal
at midnight, as client-side binding renders it: ``'YYYY-MM-DD 00:00:00'::timestamp``).
``date_trunc(unit, sold_at)`` for a unit of a day or longer is a dimension too
(``date_trunc(unit, sale_date::timestamp)``: the same timestamps). The rewrite is made only while
gold is fresh: the query's last day (from a literal upper bound) must be on or before the gold
table's watermark in the context; a query with no upper bound only while gold is complete
(`RuleContext.gold_complete`). An aggregate that is not the whole statement but a derived table
(``FROM (SELECT ... GROUP BY ...) m``, under window functions for instance) is rewritten in place.

A bound that is a parameter (``sold_at >= $1::timestamp``, an extended-protocol client's text)
is exact only for values at midnight, and an upper one only up to the watermark: the rewrite
is then guarded, ``SELECT * FROM (<gold>) WHERE <guard> IS TRUE UNION ALL SELECT * FROM
(<original>) WHERE <guard> IS NOT TRUE`` (the ORDER BY outside, by position), where the guard
says every parameter bound is a day boundary (and an upper one at most the day after the
watermark). The guard holds only parameters, so PostgreSQL plans it as a one-time filter (or
folds it away for a custom plan): one branch runs, and the answer is the original's for every
value.

>>> import datetime as dt
>>> from optimizer.rules import RuleContext
>>> import sqlglot
>>> ctx = RuleContext(gold_watermarks={"gold.sales_summary": dt.date(2024, 12, 31)})
>>> tree = sqlglot.parse_one(
...     "SELECT s.channel, sum(s.net_amount) AS revenue FROM silver.sales_cleaned s"
...     " WHERE s.sold_at >= '2024-01-01' AND s.sold_at < '2024-02-01' GROUP BY s.channel",
...     read="postgres")
>>> print(apply(tree, ctx).sql("postgres", pretty=True))
SELECT
  channel,
  SUM(net_revenue) AS revenue
FROM gold.sales_summary
WHERE
  sale_date >= '2024-01-01' AND sale_date < '2024-02-01'
GROUP BY
  channel
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING

from sqlglot import exp

from optimizer.rules._common import (
    alias_as,
    and_all,
    column_ref,
    conjuncts,
    from_clause,
    has_subquery,
    ident_name,
    is_volatile,
    joins,
    pg_output_name,
    qualifier,
    source_name,
    unparen,
)

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

NAME = "gold_aggregate"
GOLD = "gold.sales_summary"
SALES = "silver.sales_cleaned"
CUSTOMER = "silver.customer_cleaned"
PRODUCT = "silver.product_cleaned"

#: the columns of the silver tables (0011_silver.sql), to resolve unqualified references
_COLUMNS = {
    SALES: {
        "transaction_id",
        "line_no",
        "transaction_type",
        "original_transaction_id",
        "customer_id",
        "product_id",
        "warehouse_id",
        "channel",
        "sold_at",
        "quantity",
        "unit_price",
        "discount_pct",
        "net_amount",
        "_bronze_row_id",
        "_etl_run_id",
        "_loaded_at",
    },
    CUSTOMER: {
        "customer_id",
        "first_name",
        "last_name",
        "email",
        "segment",
        "region",
        "city",
        "signup_date",
        "_bronze_row_id",
        "_etl_run_id",
        "_loaded_at",
    },
    PRODUCT: {
        "product_id",
        "sku",
        "name",
        "category",
        "brand",
        "list_price",
        "unit_cost",
        "launched_on",
        "is_active",
        "_bronze_row_id",
        "_etl_run_id",
        "_loaded_at",
    },
}
#: (silver table, column) -> gold dimension column
_DIMENSIONS = {
    (SALES, "channel"): "channel",
    (CUSTOMER, "region"): "region",
    (PRODUCT, "category"): "category",
}
#: the dimension tables and the key they join the sales lines on
_JOIN_KEYS = {CUSTOMER: "customer_id", PRODUCT: "product_id"}
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:[ T]00:00(?::00(?:\.0+)?)?)?")
#: date_trunc units of a day or longer: the truncation of sold_at depends on its day alone
_TRUNC_UNITS = {"DAY", "WEEK", "MONTH", "QUARTER", "YEAR", "DECADE", "CENTURY", "MILLENNIUM"}
#: casts a day-boundary literal may carry (not timestamptz: that depends on the TimeZone)
_DAY_CASTS = (exp.DataType.Type.DATE, exp.DataType.Type.TIMESTAMP)
_BLOCKERS = ("distinct", "with", "qualify", "windows", "locks", "into")


class _NotAnswerable(Exception):
    """The query reads something gold.sales_summary does not hold."""


def apply(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    whole = _apply_select(expr, ctx)
    if whole is not None or not isinstance(expr, exp.Select):
        return whole
    # derived tables: each one gold answers is replaced by its gold form (the same rows)
    out = expr.copy()
    changed = False
    for sub in list(out.find_all(exp.Subquery)):
        if isinstance(sub.parent, (exp.From, exp.Join)) and isinstance(sub.this, exp.Select):
            new = _apply_select(sub.this, ctx)
            if new is not None:
                sub.set("this", new)
                changed = True
    return out if changed else None


def _apply_select(expr: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    if not isinstance(expr, exp.Select) or any(expr.args.get(a) for a in _BLOCKERS):
        return None
    if has_subquery(expr) or expr.find(exp.Window) or is_volatile(expr):
        return None
    if not expr.args.get("group") and not any(i.find(exp.AggFunc) for i in expr.expressions):
        return None  # one row per sales line: gold has one per group
    watermark = ctx.watermark(GOLD)
    scope = _scope(expr)
    if watermark is None or scope is None:
        return None
    tr = _Translator(scope, watermark)
    try:
        gold = _rewrite(expr, tr, watermark, GOLD in ctx.gold_complete)
        return _guarded(expr, gold, tr.guards) if tr.guards else gold
    except _NotAnswerable:
        return None


def _guarded(original: exp.Select, gold: exp.Select, guards: list[exp.Expr]) -> exp.Expr:
    """Gold where the parameters allow it, the original otherwise: one UNION ALL whose
    branches exclude each other (a guard of NULL runs the original)."""
    if original.args.get("limit") or original.args.get("offset"):
        raise _NotAnswerable  # the cut would have to move outside too
    order = original.args.get("order")
    positions = _order_positions(original, order) if order is not None else None
    condition = exp.Paren(this=and_all([g.copy() for g in guards]))

    def branch(select: exp.Select, alias: str, holds: bool) -> exp.Select:
        inner = select.copy()
        inner.set("order", None)
        test: exp.Expr = exp.Is(this=condition.copy(), expression=exp.Boolean(this=True))
        if not holds:
            test = exp.Not(this=test)
        return exp.select("*").from_(exp.Subquery(this=inner, alias=exp.TableAlias(
            this=exp.to_identifier(alias)))).where(test)  # fmt: skip

    union = exp.Union(
        this=branch(gold, "_pgsage_gold", True),
        expression=branch(original, "_pgsage_silver", False),
        distinct=False,
    )
    if positions is not None:
        union.set("order", exp.Order(expressions=positions))
    return union


def _order_positions(select: exp.Select, order: exp.Order) -> list[exp.Expr]:
    """The ORDER BY items as output positions (for outside a UNION)."""
    items = select.expressions
    names = [pg_output_name(i) for i in items]
    values = [i.this if isinstance(i, exp.Alias) else i for i in items]
    out = []
    for o in order.expressions:
        node = unparen(o.this)
        if isinstance(node, exp.Literal) and not node.is_string:
            pos = int(str(node.this))
        elif (isinstance(node, exp.Column) and node.args.get("table") is None
              and names.count(ident_name(node.this)) == 1):  # fmt: skip
            pos = names.index(ident_name(node.this)) + 1
        elif node in values:
            pos = values.index(node) + 1
        else:
            raise _NotAnswerable
        new = o.copy()
        new.set("this", exp.Literal.number(pos))
        out.append(new)
    return out


def _table(node: exp.Expr) -> str | None:
    if not isinstance(node, exp.Table) or node.args.get("db") is None:
        return None
    if node.args.get("catalog") is not None:
        return None
    return f"{ident_name(node.args['db'])}.{ident_name(node.this)}"


def _scope(select: exp.Select) -> dict[str, str] | None:
    """Reference name -> silver table, for sales lines inner-joined to customers/products."""
    frm = from_clause(select)
    if frm is None or _table(frm.this) != SALES:
        return None
    sales = source_name(frm.this) or ""
    scope = {sales: SALES}
    for join in joins(select):
        table = _table(join.this)
        name = source_name(join.this)
        kind = str(join.args.get("kind") or "INNER").upper()
        if table not in _JOIN_KEYS or table in scope.values() or name is None or name in scope:
            return None
        if join.args.get("side") or kind != "INNER" or join.args.get("using"):
            return None
        on = join.args.get("on")
        key = _JOIN_KEYS[table]
        if on is None or not _is_key_join(unparen(on), key, sales, name):
            return None
        scope[name] = table
    return scope


def _is_key_join(on: exp.Expr, key: str, sales: str, dim: str) -> bool:
    if not isinstance(on, exp.EQ):
        return False
    sides = {
        (qualifier(c), ident_name(c.this))
        for c in (on.this, on.expression)
        if isinstance(c, exp.Column)
    }
    return sides == {(sales, key), (dim, key)}


class _Translator:
    """Maps expressions over the silver scope to expressions over gold.sales_summary."""

    def __init__(self, scope: dict[str, str], watermark: dt.date | None = None) -> None:
        self.scope = scope
        self.watermark = watermark
        #: conditions on parameters under which the gold form is exact (parameter bounds)
        self.guards: list[exp.Expr] = []
        #: a parameter bounds the days from above (the guard keeps it within the watermark)
        self.bounded_above = False

    def resolve(self, col: exp.Column) -> tuple[str, str]:
        name = ident_name(col.this)
        q = qualifier(col)
        if q is None:
            if col.args.get("table") is not None:
                raise _NotAnswerable
            owners = [t for t in self.scope.values() if name in _COLUMNS[t]]
            if len(owners) != 1:
                raise _NotAnswerable
            return owners[0], name
        if q not in self.scope:
            raise _NotAnswerable
        return self.scope[q], name

    def is_sold_at(self, node: exp.Expr) -> bool:
        return isinstance(node, exp.Column) and self.resolve(node) == (SALES, "sold_at")

    def is_sale_date(self, node: exp.Expr) -> bool:
        node = unparen(node)
        if isinstance(node, exp.Cast) and node.to.is_type(exp.DataType.Type.DATE):
            return self.is_sold_at(unparen(node.this))
        return isinstance(node, exp.Date) and not node.expressions and self.is_sold_at(node.this)

    def dimension(self, node: exp.Expr) -> exp.Expr | None:
        if self.is_sale_date(node):
            return column_ref("sale_date")
        if isinstance(node, exp.TimestampTrunc) and not node.args.get("zone"):
            unit = node.args.get("unit")
            inner = unparen(node.this)
            if (
                isinstance(unit, exp.Var)
                and str(unit.this).upper() in _TRUNC_UNITS
                and (self.is_sold_at(inner) or self.is_sale_date(inner))
            ):
                day = exp.cast(column_ref("sale_date"), exp.DataType.Type.TIMESTAMP)
                return exp.TimestampTrunc(this=day, unit=unit.copy())
            return None
        if isinstance(node, exp.Column) and not isinstance(node.this, exp.Star):
            gold = _DIMENSIONS.get(self.resolve(node))
            return column_ref(gold) if gold else None
        return None

    def aggregate(self, node: exp.Expr) -> exp.Expr | None:
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Star):
            lines = exp.Coalesce(
                this=exp.Sum(this=column_ref("lines")), expressions=[exp.Literal.number(0)]
            )
            return exp.cast(lines, exp.DataType.Type.BIGINT)
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct):
            values = node.this.expressions
            if len(values) == 1 and (dim := self.dimension(values[0])) is not None:
                return exp.Count(this=exp.Distinct(expressions=[dim]), big_int=True)
            return None
        if isinstance(node, (exp.Min, exp.Max)) and not node.expressions:
            dim = self.dimension(node.this)
            return None if dim is None else node.__class__(this=dim)
        if isinstance(node, exp.Sum) and isinstance(node.this, exp.Column):
            measure = self.resolve(node.this)
            if measure == (SALES, "net_amount"):
                return exp.Sum(this=column_ref("net_revenue"))
            if measure == (SALES, "quantity"):
                units = exp.Add(
                    this=column_ref("units_sold"), expression=column_ref("units_returned")
                )
                return exp.cast(exp.Sum(this=units), exp.DataType.Type.BIGINT)
        return None

    def translate(self, node: exp.Expr) -> exp.Expr:
        """A gold expression computing `node`, or _NotAnswerable."""
        found = self.dimension(node)
        if found is None and isinstance(node, exp.AggFunc):
            found = self.aggregate(node)
            if found is None:
                raise _NotAnswerable
        if found is not None:
            return found
        if isinstance(node, (exp.Column, exp.Star, exp.AggFunc, exp.Filter)):
            raise _NotAnswerable
        out = node.copy()
        for child in list(out.iter_expressions()):
            child.replace(self.translate(child))
        return out


def _rewrite(select: exp.Select, tr: _Translator, watermark: dt.date, complete: bool) -> exp.Select:
    outputs = {pg_output_name(item) for item in select.expressions}
    out = select.copy()
    out.set("joins", None)
    out.set("from_" if "from_" in out.args else "from", exp.From(this=exp.to_table(GOLD)))
    items = []
    for item in select.expressions:
        value = item.this if isinstance(item, exp.Alias) else item
        new = tr.translate(value)
        name = pg_output_name(item)
        if isinstance(item, exp.Alias) or pg_output_name(new) != name:
            new = alias_as(new, name)
        items.append(new)
    out.set("expressions", items)

    where = select.args.get("where")
    parts, last_day = _filters(conjuncts(where.this if where is not None else None), tr)
    if last_day is not None and last_day > watermark:
        raise _NotAnswerable
    if last_day is None and not complete and not tr.bounded_above:
        raise _NotAnswerable
    out.set("where", exp.Where(this=and_all(parts)) if parts else None)

    group = select.args.get("group")
    if group is not None:
        inputs = {c for t in tr.scope.values() for c in _COLUMNS[t]}
        keys = [_by_position_or_name(k, tr, outputs - inputs) for k in group.expressions]
        out.set("group", exp.Group(expressions=keys))
    having = select.args.get("having")
    if having is not None:
        out.set("having", exp.Having(this=tr.translate(having.this)))
    order = select.args.get("order")
    if order is not None:
        ordered = []
        for o in order.expressions:
            new_o = o.copy()
            new_o.set("this", _by_position_or_name(o.this, tr, outputs))
            if _means_another_output(new_o.this, o.this, items):
                raise _NotAnswerable
            ordered.append(new_o)
        out.set("order", exp.Order(expressions=ordered))
    return out


def _means_another_output(new: exp.Expr, old: exp.Expr, items: list[exp.Expr]) -> bool:
    """A bare name in ORDER BY means an output column first: a translated gold column must not
    collide with an output alias naming something else."""
    if not isinstance(new, exp.Column) or new is old or new == old:
        return False
    name = ident_name(new.this)
    for item in items:
        if pg_output_name(item) == name:
            value = item.this if isinstance(item, exp.Alias) else item
            return bool(value != new)
    return False


def _by_position_or_name(node: exp.Expr, tr: _Translator, outputs: set[str]) -> exp.Expr:
    """GROUP BY / ORDER BY items may name an output column or its position: kept as they are."""
    if isinstance(node, exp.Literal) and not node.is_string:
        return node.copy()
    bare = isinstance(node, exp.Column) and node.args.get("table") is None
    if bare and ident_name(node.this) in outputs:
        return node.copy()
    return tr.translate(node)


def _filters(parts: list[exp.Expr], tr: _Translator) -> tuple[list[exp.Expr], dt.date | None]:
    """The WHERE conjuncts over gold, and the last day they let through (None: unbounded)."""
    out: list[exp.Expr] = []
    last: dt.date | None = None
    for part in parts:
        part = unparen(part)
        new = _raw_timestamp_bound(part, tr)
        if new is None:
            new = tr.translate(part)
        out.append(new)
        day = _upper_bound(new)
        if day is not None:
            last = day if last is None else min(last, day)
    return out, last


_FLIP: dict[type[exp.Expr], type[exp.Expr]] = {
    exp.GT: exp.LT,
    exp.GTE: exp.LTE,
    exp.LT: exp.GT,
    exp.LTE: exp.GTE,
    exp.EQ: exp.EQ,
}


def _oriented(part: exp.Expr) -> tuple[type[exp.Expr], exp.Expr, exp.Expr] | None:
    """(operator, column side, value side) of a comparison, the value written on the right."""
    if type(part) not in _FLIP:
        return None
    left, right = part.this, part.expression
    if _date_literal(left) is not None and _date_literal(right) is None:
        return _FLIP[type(part)], right, left
    return type(part), left, right


def _raw_timestamp_bound(part: exp.Expr, tr: _Translator) -> exp.Expr | None:
    """``sold_at >= day`` / ``sold_at < day``: the same rows as the sale_date comparison."""
    oriented = _oriented(part)
    if oriented is None:
        return None
    op, col, value = oriented
    if not tr.is_sold_at(unparen(col)):
        return None
    if op not in (exp.GTE, exp.LT):
        raise _NotAnswerable  # e.g. sold_at <= '2024-01-31' keeps only that day's midnight
    if _date_literal(value) is not None:
        return op(this=column_ref("sale_date"), expression=value.copy())
    if not _is_parameter(value):
        raise _NotAnswerable
    # the same rows only if the value is a midnight (and, from above, within the watermark)
    stamp = exp.Cast(this=value.copy(), to=exp.DataType.build("timestamp"))
    day = exp.Anonymous(this="DATE_TRUNC", expressions=[exp.Literal.string("DAY"), stamp.copy()])
    tr.guards.append(exp.EQ(this=day, expression=stamp.copy()))
    if op is exp.LT:
        if tr.watermark is None:
            raise _NotAnswerable
        limit = (tr.watermark + dt.timedelta(days=1)).isoformat()
        tr.guards.append(exp.LTE(this=stamp.copy(), expression=exp.Cast(
            this=exp.Literal.string(limit), to=exp.DataType.build("timestamp"))))  # fmt: skip
        tr.bounded_above = True
    return op(this=column_ref("sale_date"), expression=stamp)


def _under_day_casts(node: exp.Expr) -> exp.Expr | None:
    """`node` without its casts to date or timestamp (any number of them, as client-side
    binding writes them); None if another cast is in the way."""
    node = unparen(node)
    while isinstance(node, exp.Cast):
        if not any(node.to.is_type(t) for t in _DAY_CASTS):
            return None
        node = unparen(node.this)
    return node


def _is_parameter(node: exp.Expr) -> bool:
    """A $n parameter, possibly cast to date or timestamp."""
    return isinstance(_under_day_casts(node), exp.Parameter)


def _date_literal(node: exp.Expr) -> dt.date | None:
    """The day of a 'YYYY-MM-DD' (or 'YYYY-MM-DD 00:00:00') string literal, possibly cast to
    date or timestamp."""
    node = _under_day_casts(node)
    if not isinstance(node, exp.Literal) or not node.is_string:
        return None
    found = _DATE.fullmatch(str(node.this))
    if not found:
        return None
    try:
        return dt.date.fromisoformat(found.group(1))
    except ValueError:
        return None


def _upper_bound(part: exp.Expr) -> dt.date | None:
    """The last day a gold predicate on sale_date lets through, if it bounds it from above."""
    if isinstance(part, exp.Between) and _is_sale_date(part.this):
        return _date_literal(part.args["high"])
    oriented = _oriented(part)
    if oriented is None or not _is_sale_date(oriented[1]):
        return None
    op, _, value = oriented
    day = _date_literal(value)
    if day is None or op not in (exp.LT, exp.LTE, exp.EQ):
        return None
    return day - dt.timedelta(days=1) if op is exp.LT else day


def _is_sale_date(node: exp.Expr) -> bool:
    node = unparen(node)
    return (
        isinstance(node, exp.Column)
        and qualifier(node) is None
        and ident_name(node.this) == "sale_date"
    )
