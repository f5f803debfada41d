"""Query fingerprints (libpg_query through pglast), normalised text, command class, catalog tag.

`Fingerprinter.fingerprint(sql)` is memoised in a bounded LRU. Clients that inline literals
(psycopg2, pgbench -M simple, most BI tools) send a new text every time, so the cache is keyed by
the text with its literals masked (`optimizer.literals.literal_key`, a compiled scan of the
characters): texts that differ only in numeric or string literals, comments, or the length of an
IN list share one parse. Masking is only used where it cannot merge texts with different
fingerprints.

Text PostgreSQL would reject still gets a stable id: a hash of its whitespace-normalised text,
flagged `parsed=False`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast import parser as pg

from .literals import LiteralCache, literal_key

__all__ = ["COMMANDS", "Fingerprint", "Fingerprinter", "compute_fingerprint", "literal_key"]

COMMANDS = (
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "COPY",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET",
    "SHOW",
    "DDL",
    "CATALOG",
    "OTHER",
)

_STMT_COMMAND = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "UPDATE",
    "CopyStmt": "COPY",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "ExplainStmt": "OTHER",
}
_TXN_KIND = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "BEGIN",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK",
}
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Grant", "Comment", "Truncate", "Index")
_CATALOG_SCHEMAS = frozenset(("pg_catalog", "information_schema"))
_CATALOG_FUNCS = frozenset(
    (
        "version",
        "current_schema",
        "current_schemas",
        "current_database",
        "current_user",
        "session_user",
        "current_setting",
        "has_table_privilege",
        "has_schema_privilege",
        "format_type",
        "obj_description",
        "col_description",
    )
)
_FIRST_WORD = {
    "SELECT": "SELECT",
    "WITH": "SELECT",
    "VALUES": "SELECT",
    "TABLE": "SELECT",
    "INSERT": "INSERT",
    "UPDATE": "UPDATE",
    "DELETE": "DELETE",
    "MERGE": "UPDATE",
    "COPY": "COPY",
    "BEGIN": "BEGIN",
    "START": "BEGIN",
    "COMMIT": "COMMIT",
    "END": "COMMIT",
    "ROLLBACK": "ROLLBACK",
    "ABORT": "ROLLBACK",
    "SET": "SET",
    "RESET": "SET",
    "SHOW": "SHOW",
    "CREATE": "DDL",
    "ALTER": "DDL",
    "DROP": "DDL",
    "TRUNCATE": "DDL",
    "GRANT": "DDL",
    "REVOKE": "DDL",
    "COMMENT": "DDL",
}

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What the query log needs of a statement's text."""

    id: str  #: 16 hex digits: libpg_query's fingerprint, or a text hash when unparsed
    normalized: str  #: literals replaced by $n (the raw text when it does not parse)
    command: str  #: one of COMMANDS
    parsed: bool
    is_catalog: bool
    tables: tuple[str, ...] = ()


class Fingerprinter:
    """Bounded LRU of fingerprints by text and by literal-masked text (`LiteralCache`)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._lru = LiteralCache(_computed, maxsize)
        #: the fingerprint of a text (the compiled cache's own method: no call in between)
        self.fingerprint: Callable[[str], Fingerprint] = self._lru.lookup

    def __len__(self) -> int:
        return len(self._lru.cache)

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses


def _computed(sql: str) -> tuple[Fingerprint, bool]:
    # unparsed text is identified by its whole text: never merge it by masked literals
    fp = compute_fingerprint(sql)
    return fp, fp.parsed


def compute_fingerprint(sql: str) -> Fingerprint:
    """Fingerprint one text without caching."""
    try:
        fid = pg.fingerprint(sql)
        tree = json.loads(pg.parse_sql_json(sql))
        normalized = pg.normalize(sql)
    except (pg.ParseError, ValueError, RecursionError):
        return _unparsed(sql)
    stmts = tree.get("stmts") or []
    tables: list[tuple[str | None, str]] = []
    funcs: list[str] = []
    _collect(stmts, tables, funcs)
    command = _command(stmts)
    catalog = _is_catalog(command, tables, funcs)
    names = tuple(sorted({f"{s}.{t}" if s else t for s, t in tables}))
    return Fingerprint(
        fid.rjust(16, "0"), normalized, "CATALOG" if catalog else command, True, catalog, names
    )


def _unparsed(sql: str) -> Fingerprint:
    text = _SPACE.sub(" ", sql).strip()
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest()
    first = text.split(" ", 1)[0].upper() if text else ""
    return Fingerprint(digest, text, _FIRST_WORD.get(first, "OTHER"), False, False)


def _command(stmts: list[Any]) -> str:
    if not stmts:
        return "OTHER"
    node = stmts[0].get("stmt") or {}
    if not node:
        return "OTHER"
    kind, body = next(iter(node.items()))
    if kind == "TransactionStmt":
        return _TXN_KIND.get(body.get("kind", ""), "OTHER")
    if kind in _STMT_COMMAND:
        return _STMT_COMMAND[kind]
    if kind.startswith(_DDL_PREFIXES):
        return "DDL"
    return "OTHER"


def _collect(node: Any, tables: list[tuple[str | None, str]], funcs: list[str]) -> None:
    """Walk the JSON parse tree for relation names and function names."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            relname = item.get("relname")
            if isinstance(relname, str):  # a RangeVar, wrapped or as a typed field
                tables.append((item.get("schemaname"), relname))
            fc = item.get("FuncCall")
            if fc is not None:
                parts = [p.get("String", {}).get("sval", "") for p in fc.get("funcname", [])]
                funcs.append(parts[-1] if parts else "")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_catalog(command: str, tables: list[tuple[str | None, str]], funcs: list[str]) -> bool:
    if command not in ("SELECT", "SHOW", "OTHER"):
        return False
    if tables:
        return all(
            (schema in _CATALOG_SCHEMAS) or (schema is None and name.startswith("pg_"))
            for schema, name in tables
        )
    return bool(funcs) and all(f.startswith("pg_") or f in _CATALOG_FUNCS for f in funcs)
