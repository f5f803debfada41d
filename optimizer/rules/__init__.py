"""Rewrite rules: one per module, each a pure function from a sqlglot tree to a sqlglot tree.

Every rule module exposes ``NAME`` and ``apply(expr, ctx)``, which returns a rewritten copy of
``expr`` or None when the rule does not apply; the input tree is never modified. Catalog facts
(NOT NULL columns, primary keys, gold freshness, the cost model's opinion) come in through a
``RuleContext``; rules do no IO. A rewrite is only a candidate: the proxy proves it equivalent
with ``optimizer.equivalence.shadow_check`` before serving it.

>>> ctx = RuleContext(not_null={"public.t": {"a"}, "public.u": {"b"}})
>>> rewrite("SELECT a FROM t WHERE a NOT IN (SELECT b FROM u)", ctx, {"not_in_to_not_exists"})
[('not_in_to_not_exists', 'SELECT a FROM t WHERE NOT EXISTS(SELECT 1 FROM u WHERE b = t.a)')]
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from sqlglot import exp

from optimizer.parse import parse_statement
from optimizer.rules import (
    correlated_scalar_subquery,
    gold_aggregate,
    in_distinct_to_exists,
    not_in_to_not_exists,
    or_to_union,
)
from optimizer.rules._common import DIALECT

log = logging.getLogger(__name__)


def _always(original_sql: str, rewritten_sql: str) -> bool:
    return True


@dataclass(frozen=True)
class RuleContext:
    """What the rules may assume about the database, supplied by the caller.

    Table keys are ``"schema.table"`` in lower case (as PostgreSQL folds unquoted names).
    """

    #: NOT NULL columns per table; list every table the rules should know, even with no columns
    not_null: Mapping[str, Collection[str]] = field(default_factory=dict)
    #: primary key (or any unique NOT NULL key) columns per table
    primary_keys: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: per gold table, the last day it answers exactly (gold equals silver for every day up to
    #: and including it); a datetime means the days strictly before its date
    gold_watermarks: Mapping[str, dt.date] = field(default_factory=dict)
    #: gold tables that hold every day silver holds (no silver line loaded after their last
    #: refresh): only these answer queries with no upper bound on the day
    gold_complete: Collection[str] = ()
    #: the cost model's verdict on a candidate: does rewritten_sql beat original_sql?
    cost_pays: Callable[[str, str], bool] = _always
    #: schemas unqualified table names resolve in, in order
    search_path: Sequence[str] = ("public",)

    def watermark(self, table: str) -> dt.date | None:
        mark = self.gold_watermarks.get(table)
        if isinstance(mark, dt.datetime):
            return mark.date() - dt.timedelta(days=1)
        return mark


#: rule name -> module, in the order rewrite() tries them
RULES: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        correlated_scalar_subquery,
        not_in_to_not_exists,
        in_distinct_to_exists,
        or_to_union,
        gold_aggregate,
    )
}


def apply_rule(name: str, tree: exp.Expr, ctx: RuleContext) -> exp.Expr | None:
    """One rule on a tree: the rewritten tree, or None when it does not apply (or fails)."""
    try:
        out: exp.Expr | None = RULES[name].apply(tree, ctx)
    except Exception:  # a rule bug must cost only its rewrite, never the statement
        log.exception("rewrite rule %s failed", name)
        return None
    if out is None or out is tree or out == tree:
        return None
    return out


def rewrite(
    sql: str,
    ctx: RuleContext | None = None,
    enabled: Collection[str] | None = None,
    tree: exp.Expr | None = None,
) -> list[tuple[str, str]]:
    """(rule name, rewritten SQL) for every enabled rule that applies to `sql`, each applied to
    the original statement on its own. `tree` is a parse of `sql` to reuse (never modified)."""
    ctx = ctx or RuleContext()
    if tree is None:
        tree = parse_statement(sql)
    if tree is None:
        return []
    out: list[tuple[str, str]] = []
    for name in RULES:
        if enabled is not None and name not in enabled:
            continue
        new = apply_rule(name, tree, ctx)
        if new is not None:
            out.append((name, new.sql(dialect=DIALECT)))
    return out


__all__ = ["RULES", "RuleContext", "apply_rule", "rewrite"]
