"""One sqlglot parse per fingerprint, shared by every consumer (features, rules, advisor).

Parsing is the expensive part of understanding a statement, and every execution of a template
yields the same tree, so trees are memoised by fingerprint in a bounded LRU. Trees are shared:
callers must treat them as read-only (``tree.copy()`` before transforming one).

>>> cache = ParseCache(maxsize=2)
>>> tree = cache.parse("0000000000000001", "select a from t where b = $1")
>>> tree is cache.parse("0000000000000001", "select a from t where b = $2")
True
"""

from __future__ import annotations

from collections import OrderedDict

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

DIALECT = "postgres"


def parse_statement(sql: str) -> exp.Expr | None:
    """The tree of a single statement, or None when sqlglot cannot parse it or it holds several."""
    try:
        trees = sqlglot.parse(sql, read=DIALECT)
    except (ParseError, TokenError, RecursionError, ValueError):
        return None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        return None
    return trees[0]


class ParseCache:
    """Bounded LRU of parse trees keyed by fingerprint (failed parses are remembered too)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._trees: OrderedDict[str, exp.Expr | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._trees)

    def parse(self, fingerprint: str, sql: str) -> exp.Expr | None:
        """The tree of `sql`, parsed only the first time `fingerprint` is seen."""
        trees = self._trees
        if fingerprint in trees:
            self.hits += 1
            trees.move_to_end(fingerprint)
            return trees[fingerprint]
        self.misses += 1
        tree = parse_statement(sql)
        trees[fingerprint] = tree
        if len(trees) > self.maxsize:
            trees.popitem(last=False)
        return tree
