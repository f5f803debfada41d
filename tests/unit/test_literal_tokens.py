"""optimizer.literals.literal_tokens finds exactly what the regular expression it replaced
(optimizer.features._LITERALS) finds, compiled and from source; literal classes stay put."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from models import accel
from optimizer.features import _LITERALS, literal_class
from optimizer.literals import literal_tokens

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
