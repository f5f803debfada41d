"""The 22 TPC-H query texts of bench.tpch: they parse as PostgreSQL and carry their validation
substitution parameters (no qgen placeholders left)."""

from __future__ import annotations

import re

import pytest
import sqlglot
from sqlglot import exp

from bench.tpch_queries import NAMES, queries

#: qgen's ':1'-style parameters, '&1' (some ports), '{name}' (our Python template), '$1'
PLACEHOLDER = re.compile(r"(?<![:\w]):\d+\b|&\d+\b|\{\w*\}|\$\d+\b")

#: a validation parameter per query (TPC-H specification 2.4.x.3)
PARAMETERS = {
    1: "interval '90 days'",
    2: "'%BRASS'",
    3: "'BUILDING'",
    4: "date '1993-07-01'",
    5: "'ASIA'",
    6: "l_quantity < 24",
    7: "'FRANCE'",
    8: "'ECONOMY ANODIZED STEEL'",
    9: "'%green%'",
    10: "date '1993-10-01'",
    11: "'GERMANY'",
    12: "('MAIL', 'SHIP')",
    13: "'%special%requests%'",
    14: "date '1995-09-01'",
    15: "date '1996-01-01'",
    16: "(49, 14, 23, 45, 19, 3, 36, 9)",
    17: "'MED BOX'",
    18: "> 300",
    19: "'Brand#34'",
    20: "'forest%'",
    21: "'SAUDI ARABIA'",
    22: "('13', '31', '23', '29', '30', '18', '17')",
}


def test_there_are_22_named_queries() -> None:
    assert sorted(queries()) == list(range(1, 23))
    assert sorted(NAMES) == list(range(1, 23))


@pytest.mark.parametrize("n", range(1, 23))
def test_query_parses_as_one_postgres_select(n: int) -> None:
    sql = queries(1.0)[n]
    trees = sqlglot.parse(sql, read="postgres")
    assert len(trees) == 1, "one statement per query"
    tree = trees[0]
    assert isinstance(tree, exp.Select | exp.Union), type(tree)
    tables = {t.name for t in tree.find_all(exp.Table)}
    tpch = {"region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem"}
    assert tables & tpch, tables
    assert not sql.rstrip().endswith(";")


@pytest.mark.parametrize("n", range(1, 23))
def test_parameters_are_substituted(n: int) -> None:
    sql = queries(1.0)[n]
    assert not PLACEHOLDER.search(sql), PLACEHOLDER.search(sql)
    assert PARAMETERS[n] in sql


def test_q11_fraction_scales_with_the_scale_factor() -> None:
    assert "* 0.0001\n" in queries(1.0)[11]
    assert "* 0.001\n" in queries(0.1)[11]
    assert "* 0.00001\n" in queries(10)[11]


def test_limits_of_the_specification() -> None:
    limits = {2: 100, 3: 10, 10: 20, 18: 100, 21: 100}
    for n, sql in queries().items():
        tree = sqlglot.parse_one(sql, read="postgres")
        limit = tree.args.get("limit")
        if n in limits:
            assert limit is not None and int(limit.expression.name) == limits[n], n
        else:
            assert limit is None, n


def test_the_placeholder_check_catches_unfilled_parameters() -> None:
    for text in ("p_size = :1", "r_name = '&2'", "x * {fraction}", "a = $1"):
        assert PLACEHOLDER.search(text), text
    assert not PLACEHOLDER.search("l_shipdate <= date '1998-12-01' - interval '90 days'")
