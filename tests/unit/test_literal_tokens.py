"""optimizer.literals.literal_tokens finds exactly what the regular expression it replaced
(optimizer.features._LITERALS) finds, compiled and from source; literal classes stay put."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from models import accel
from optimizer import literals
from optimizer.features import _LITERALS, literal_class
from optimizer.literals import has_parameter, literal_tokens

SOURCE = accel.load_source("optimizer.literals")
# characters where the two could part: quotes (doubled, unterminated), digits of both kinds,
# what may precede a number ($ . _ letters, non-ASCII letters), fractions and exponents
ALPHABET = ["'", "''", "1", "23", "\u0661", ".", "e", "E", "+", "-", "$", "_", "a", "\u00e9", "x",
            " ", "(", ",", "=", "\n", "t1"]  # fmt: skip


def _reference(sql: str) -> list[tuple[str | None, str | None]]:
    return [(m.group(1), m.group(2)) for m in _LITERALS.finditer(sql)]


@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join))
@settings(max_examples=2_000, deadline=None)
def test_the_scan_finds_what_the_expression_finds(sql: str) -> None:
    expected = _reference(sql)
    assert literal_tokens(sql) == expected
    assert SOURCE.literal_tokens(sql) == expected


def test_real_statements() -> None:
    for sql in (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 57232;",
        "select * from t where d between '2024-01-01' and '2024-03-31' and x in (1, 2.5, 3e4)",
        "select 'it''s', 'a''' from t1 where v = .5 and w = 1.e5 and u = $1",
    ):
        assert literal_tokens(sql) == _reference(sql)
    assert accel.compiled(__import__("optimizer.literals", fromlist=["x"]))


def test_literal_classes_as_before() -> None:
    narrow = literal_class("select * from t where id between 100 and 120")
    assert narrow == literal_class("select * from t where id between 101 and 125")
    assert narrow != literal_class("select * from t where id between 100 and 90000")
    assert literal_class("select * from t where id = $1") == "generic"
    assert literal_class("select 1 from t where id = $1") != "generic"
    # the ids the regular expression gave (they key ml.feature_store's rows)
    assert narrow == "81abf0ae159e"
    sql = "select 'it''s', x from t where d > '2024-01-01' and v = 1.5e3"
    assert literal_class(sql) == "367ad46aa533"


_PARAM_RE = re.compile(r"\$(\d+)")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("$0123456789٣a '.,()-e")), max_size=40))
def test_the_compiled_literal_class_is_the_regular_expressions(sql: str) -> None:
    """literals.literal_class (compiled, `$` + a decimal digit by hand) against the formula it
    replaced in optimizer.features: the regular expression's `\\$(\\d+)`."""
    tokens = literal_tokens(sql)
    want = "generic" if not tokens and _PARAM_RE.search(sql) else SOURCE.class_of_tokens(tokens)
    assert literals.literal_class(sql) == want == literal_class(sql)
    assert has_parameter(sql) == bool(_PARAM_RE.search(sql))


def test_literals_too_large_for_a_double_get_a_class() -> None:
    """`1e999` is infinite as a float, and the width between two such literals NaN: each gets
    a bucket (round() raised on them, and took the log worker's batch with it)."""
    assert literals.magnitude(float("1e999")) == literals.INFINITE
    assert literals.magnitude(-float("1e999")) == -literals.INFINITE
    assert literals.magnitude(float("nan")) == 0
    big = literal_class("select * from t where x between 1e999 and 2e999")
    assert big != literal_class("select * from t where x between 1 and 2")
    assert big == literal_class("select * from t where x between 5e400 and 7e999")
