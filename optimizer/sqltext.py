"""Splitting a simple-query string into its statements, as the server will run them."""

from __future__ import annotations

from pglast import split


def split_statements(sql: str) -> list[str]:
    """Statements of a multi-statement string, using libpg_query's scanner (quotes, $$, comments).

    >>> split_statements("select 1; select $$a;b$$")
    ['select 1', 'select $$a;b$$']
    """
    return list(split(sql, with_parser=False))
