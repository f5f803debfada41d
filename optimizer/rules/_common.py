"""Scope and catalog helpers shared by the rewrite rules (no rule lives here)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

if TYPE_CHECKING:
    from optimizer.rules import RuleContext

DIALECT = "postgres"

#: functions whose value changes between calls: moving or duplicating them changes results
VOLATILE_FUNCTIONS = frozenset(
    {
        "random",
        "setseed",
        "nextval",
        "setval",
        "clock_timestamp",
        "timeofday",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "txid_current",
        "pg_sleep",
    }
)

_FROM_KEYS = ("from_", "from")
#: words the tokenizer treats specially: quoted when used as names, to be safe
_KEYWORDS = frozenset(w.upper() for k in Postgres.Tokenizer.KEYWORDS for w in k.split())


def ident_name(ident: exp.Expr | str | None) -> str:
    """An identifier as PostgreSQL resolves it: unquoted names fold to lower case."""
    if ident is None:
        return ""
    if isinstance(ident, str):
        return ident.lower()
    if isinstance(ident, exp.Identifier):
        return str(ident.this) if ident.quoted else str(ident.this).lower()
    return ident.name.lower()


def from_clause(select: exp.Select) -> exp.From | None:
    for key in _FROM_KEYS:
        node = select.args.get(key)
        if isinstance(node, exp.From):
            return node
    return None


def joins(select: exp.Select) -> list[exp.Join]:
    return list(select.args.get("joins") or [])


def source_nodes(select: exp.Select) -> list[exp.Expr]:
    """The FROM item and each joined item, in order."""
    frm = from_clause(select)
    if frm is None:
        return []
    return [frm.this, *(j.this for j in joins(select))]


def source_name(node: exp.Expr) -> str | None:
    """The name a FROM item is referenced by: its alias, else a table's own name."""
    alias = node.args.get("alias")
    if isinstance(alias, exp.TableAlias) and alias.this is not None:
        return ident_name(alias.this)
    if isinstance(node, exp.Table):
        return ident_name(node.this)
    return None


def sources(select: exp.Select) -> dict[str, exp.Expr] | None:
    """Reference name -> FROM item (a Table, or a derived table) or None when a name repeats or
    an item has no name (such a scope is left alone)."""
    out: dict[str, exp.Expr] = {}
    for node in source_nodes(select):
        name = source_name(node)
        if name is None or name in out:
            return None
        out[name] = node
    return out


def is_comma_join(join: exp.Join) -> bool:
    return not (
        join.args.get("on")
        or join.args.get("using")
        or join.args.get("kind")
        or join.args.get("side")
    )


def nullable_sources(select: exp.Select) -> set[str] | None:
    """Names whose columns may be NULL-extended by an outer join; None means all of them."""
    out: set[str] = set()
    for join in joins(select):
        side = str(join.args.get("side") or "").upper()
        if side in ("RIGHT", "FULL"):
            return None
        if side == "LEFT":
            name = source_name(join.this)
            if name is None:
                return None
            out.add(name)
    return out


def table_key(table: exp.Table, ctx: RuleContext) -> str | None:
    """'schema.table' of a table reference: its own schema, else the first schema of the search
    path whose table the catalog knows."""
    if table.args.get("catalog"):
        return None
    name = ident_name(table.this)
    db = table.args.get("db")
    if db is not None:
        return f"{ident_name(db)}.{name}"
    for schema in ctx.search_path:
        key = f"{schema}.{name}"
        if key in ctx.not_null or key in ctx.primary_keys:
            return key
    return None


def conjuncts(node: exp.Expr | None) -> list[exp.Expr]:
    """The AND-ed parts of a predicate, parentheses removed."""
    if node is None:
        return []
    node = unparen(node)
    if isinstance(node, exp.And):
        return conjuncts(node.this) + conjuncts(node.expression)
    return [node]


def disjuncts(node: exp.Expr) -> list[exp.Expr]:
    node = unparen(node)
    if isinstance(node, exp.Or):
        return disjuncts(node.this) + disjuncts(node.expression)
    return [node]


def unparen(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def and_all(parts: list[exp.Expr]) -> exp.Expr | None:
    """The conjunction of `parts` (OR-ed parts are parenthesised), or None for no parts."""
    out: exp.Expr | None = None
    for part in parts:
        part = exp.Paren(this=part) if isinstance(part, exp.Or) else part
        out = part if out is None else exp.And(this=out, expression=part)
    return out


def is_volatile(node: exp.Expr) -> bool:
    for fn in node.find_all(exp.Func):
        if isinstance(fn, exp.Rand):
            return True
        name = fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()
        if name.lower() in VOLATILE_FUNCTIONS:
            return True
    return False


def has_subquery(node: exp.Expr) -> bool:
    return any(True for _ in node.find_all(exp.Subquery, exp.Exists)) or any(
        n is not node for n in node.find_all(exp.Query)
    )


def enclosing_select(node: exp.Expr) -> exp.Select | None:
    parent = node.parent
    while parent is not None and not isinstance(parent, exp.Select):
        parent = parent.parent
    return parent


def clause_of(node: exp.Expr, select: exp.Select) -> str | None:
    """The arg name of `select` (where, expressions, having...) that holds `node`."""
    child: exp.Expr = node
    parent = node.parent
    while parent is not None and parent is not select:
        child, parent = parent, parent.parent
    return child.arg_key if parent is select else None


def pg_output_name(node: exp.Expr) -> str:
    """The column name PostgreSQL gives a select-list item (FigureColname, simplified)."""
    if isinstance(node, exp.Alias):
        return ident_name(node.args.get("alias"))
    if isinstance(node, exp.Column):
        return "?column?" if isinstance(node.this, exp.Star) else ident_name(node.this)
    if isinstance(node, exp.Paren):
        return pg_output_name(node.this)
    if isinstance(node, exp.Cast):
        inner = pg_output_name(node.this)
        return inner if inner != "?column?" else node.to.sql(DIALECT).lower().split("(")[0]
    if isinstance(node, exp.Case):
        return "case"
    if isinstance(node, exp.Filter):
        return pg_output_name(node.this)
    if isinstance(node, exp.Subquery) and isinstance(node.this, exp.Select):
        items = node.this.expressions
        return pg_output_name(items[0]) if len(items) == 1 else "?column?"
    if isinstance(node, exp.Func):
        rendered = node.sql(DIALECT)
        match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(", rendered)
        if match:
            return match.group(1).lower()
    return "?column?"


def alias_as(node: exp.Expr, name: str) -> exp.Alias:
    return exp.Alias(this=node, alias=identifier(name))


def columns(node: exp.Expr) -> Iterator[exp.Column]:
    for col in node.find_all(exp.Column):
        if not isinstance(col.this, exp.Star):
            yield col


def qualifier(col: exp.Column) -> str | None:
    table = col.args.get("table")
    if table is None:
        return None
    if col.args.get("db") is not None:
        return None  # schema-qualified column references: not worth resolving
    return ident_name(table)


def identifier(name: str) -> exp.Identifier:
    """An identifier that PostgreSQL resolves to exactly `name` (quoted only when it must be)."""
    plain = re.fullmatch(r"[a-z_][a-z0-9_]*", name) is not None and name.upper() not in _KEYWORDS
    return exp.Identifier(this=name, quoted=not plain)


def column_ref(name: str, table: str | None = None) -> exp.Column:
    return exp.Column(this=identifier(name), table=None if table is None else identifier(table))


def fresh_name(tree: exp.Expr, stem: str) -> str:
    """A name not used as an identifier anywhere in `tree`."""
    used = {ident_name(i) for i in tree.find_all(exp.Identifier)}
    n = 1
    while f"{stem}{n}" in used:
        n += 1
    return f"{stem}{n}"
