"""Rewrite rules on their fixture files (tests/data/rewrites/<rule>.yaml): each positive case
rewrites to the expected SQL, each negative case is left alone, the input tree is never
modified, and every output parses. The same fixtures run on PostgreSQL in
tests/integration/test_rewrite_equivalence.py."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlglot
import yaml

from optimizer.parse import parse_statement
from optimizer.rules import RULES, RuleContext, apply_rule, rewrite

DATA = Path(__file__).resolve().parents[1] / "data" / "rewrites"


@dataclass(frozen=True)
class Case:
    rule: str
    name: str
    original: str
    rewritten: str | None
    unsafe: str | None
    ctx: RuleContext
    #: values for $1.. when the statement has parameters
    params: tuple[Any, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.rule}:{self.name}"


def make_context(overrides: dict[str, Any] | None = None) -> RuleContext:
    raw = yaml.safe_load((DATA / "context.yaml").read_text())
    raw.update(overrides or {})
    pays = raw.pop("cost_pays", True)
    return RuleContext(
        not_null={k: frozenset(v) for k, v in raw["not_null"].items()},
        primary_keys={k: tuple(v) for k, v in raw["primary_keys"].items()},
        gold_watermarks=raw["gold_watermarks"],
        gold_complete=frozenset(raw.get("gold_complete", ())),
        search_path=tuple(raw["search_path"]),
        cost_pays=lambda original, rewritten: bool(pays),
    )


def load_cases() -> list[Case]:
    cases = []
    for rule in RULES:
        doc = yaml.safe_load((DATA / f"{rule}.yaml").read_text())
        assert doc["rule"] == rule
        for c in doc["cases"]:
            cases.append(
                Case(
                    rule,
                    c["name"],
                    c["original"],
                    c.get("rewritten"),
                    c.get("unsafe"),
                    make_context(c.get("context")),
                    tuple(c.get("params", ())),
                )
            )
    return cases


CASES = load_cases()


def normal(sql: str) -> str:
    return sqlglot.parse_one(sql, read="postgres").sql(dialect="postgres")


def test_every_rule_has_positive_and_negative_fixtures() -> None:
    for rule in RULES:
        mine = [c for c in CASES if c.rule == rule]
        assert sum(c.rewritten is not None for c in mine) >= 3, rule
        assert sum(c.rewritten is None for c in mine) >= 3, rule


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fixture(case: Case) -> None:
    tree = parse_statement(case.original)
    assert tree is not None
    before, snapshot = tree.sql(dialect="postgres"), tree.copy()
    out = apply_rule(case.rule, tree, case.ctx)
    assert tree == snapshot and tree.sql(dialect="postgres") == before, "input was mutated"
    if case.rewritten is None:
        assert out is None
        assert rewrite(case.original, case.ctx, enabled={case.rule}) == []
        return
    assert out is not None
    sql = out.sql(dialect="postgres")
    assert parse_statement(sql) is not None
    assert sql == normal(case.rewritten)
    assert rewrite(case.original, case.ctx, enabled={case.rule}) == [(case.rule, sql)]
    # a rewrite is a fixed point of its own rule only where the rule removed what it matches
    again = apply_rule(case.rule, out, case.ctx)
    if case.rule != "or_to_union":
        assert again is None


def test_rule_modules_expose_name_and_apply() -> None:
    for name, module in RULES.items():
        assert name == module.NAME
        assert callable(module.apply)


def test_rewrite_reuses_a_given_tree_without_changing_it() -> None:
    sql = "SELECT id FROM customers WHERE id NOT IN (SELECT cid FROM blocked)"
    tree = parse_statement(sql)
    assert tree is not None
    snapshot = tree.copy()
    out = rewrite(sql, make_context(), tree=tree)
    assert [name for name, _ in out] == ["not_in_to_not_exists"]
    assert tree == snapshot


def test_rewrite_keeps_parameters() -> None:
    ctx = make_context()
    out = dict(rewrite("SELECT * FROM items WHERE a = $1 OR c = $2", ctx))
    assert out["or_to_union"] == (
        "SELECT * FROM items WHERE a = $1 UNION SELECT * FROM items WHERE c = $2"
    )


def test_cost_model_sees_both_statements() -> None:
    seen: list[tuple[str, str]] = []

    def pays(original: str, rewritten: str) -> bool:
        seen.append((original, rewritten))
        return False

    ctx = RuleContext(primary_keys={"public.items": ("id",)}, cost_pays=pays)
    assert rewrite("SELECT id FROM items WHERE a = 1 OR b = 2", ctx) == []
    assert seen == [
        (
            "SELECT id FROM items WHERE a = 1 OR b = 2",
            "SELECT id FROM items WHERE a = 1 UNION SELECT id FROM items WHERE b = 2",
        )
    ]


def test_unparseable_and_empty_context() -> None:
    assert rewrite("SELEKT nonsense") == []
    assert rewrite("SELECT 1; SELECT 2") == []
    # no catalog facts: nothing that needs them is rewritten
    assert rewrite("SELECT id FROM customers WHERE id NOT IN (SELECT cid FROM blocked)") == []


def test_gold_watermark_as_datetime_excludes_its_own_day() -> None:
    sql = (
        "SELECT sum(net_amount) FROM silver.sales_cleaned"
        " WHERE sold_at >= '2025-01-01' AND sold_at < '2025-01-11'"
    )
    on_day = RuleContext(gold_watermarks={"gold.sales_summary": dt.datetime(2025, 1, 10, 12)})
    after = RuleContext(gold_watermarks={"gold.sales_summary": dt.datetime(2025, 1, 11, 1)})
    assert rewrite(sql, on_day) == []
    assert [n for n, _ in rewrite(sql, after)] == ["gold_aggregate"]


def test_hostile_identifiers_stay_quoted() -> None:
    sql = (
        'SELECT "c""x".id, (SELECT count(*) FROM orders o WHERE o.cid = "c""x".id) AS "n; DROP"'
        ' FROM customers "c""x"'
    )
    ((_, out),) = rewrite(sql, RuleContext(), enabled={"correlated_scalar_subquery"})
    assert '"c""x"' in out and '"n; DROP"' in out
    assert parse_statement(out) is not None


def test_gold_order_by_name_that_an_output_alias_would_capture_is_refused() -> None:
    # ORDER BY channel over gold would sort by the output column "channel", i.e. the region
    swapped = (
        "SELECT s.channel AS region, c.region AS channel, sum(s.net_amount)"
        " FROM silver.sales_cleaned s"
        " JOIN silver.customer_cleaned c ON c.customer_id = s.customer_id"
        " WHERE s.sold_at < '2025-01-02' GROUP BY 1, 2 ORDER BY s.channel"
    )
    assert rewrite(swapped, make_context(), enabled={"gold_aggregate"}) == []
    plain = swapped.replace(", c.region AS channel", "").replace("GROUP BY 1, 2", "GROUP BY 1")
    ((_, out),) = rewrite(plain, make_context(), enabled={"gold_aggregate"})
    assert out.endswith("ORDER BY channel")
