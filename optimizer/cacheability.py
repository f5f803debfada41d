"""What the result cache needs to know of a statement's text: may its result be cached, which
tables does it read, and which tables may it write.

No IO. One libpg_query parse (pglast) per distinct text; callers memoise by text.

A SELECT is cacheable when its result depends only on table contents the proxy can see change:
one statement; no `FOR UPDATE/SHARE`, no `SELECT INTO`, no data-modifying CTE; no volatile or
time-, session- or server-dependent function (`now()`, `random()`, `CURRENT_DATE`,
`pg_backend_pid()`, ...); and every table schema-qualified in one of the cacheable schemas
(an unqualified name would resolve through the session's search_path, which the proxy does not
track). The comments `/* pgsage:no_cache */` and `/* pgsage:off */` opt a statement out.

Writes are matched by bare table name (a schema-less `UPDATE sales_summary` may reach
`gold.sales_summary`), so invalidation errs on the side of dropping too much. Statements whose
effect cannot be bounded (DDL, `CALL`, `DO`, SQL-level `EXECUTE`, `IMPORT`...) write "everything".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pglast.parser as pg

OPT_OUT = ("pgsage:no_cache", "pgsage:off")

#: functions whose result changes between calls with the same arguments, or reads state the
#: proxy cannot see (time, randomness, sequences, the session, the server, other databases)
VOLATILE_FUNCTIONS = frozenset(
    (
        "now", "random", "random_normal", "setseed", "nextval", "currval", "lastval", "setval",
        "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
        "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp",
        "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v1mc", "uuid_generate_v4",
        "current_setting", "set_config", "current_user", "session_user", "current_role", "user",
        "current_schema", "current_schemas", "current_database", "current_catalog",
        "current_query", "inet_client_addr", "inet_client_port", "inet_server_addr",
        "inet_server_port", "version", "txid_current", "txid_current_if_assigned",
        "txid_current_snapshot", "lo_import", "lo_export", "lo_get", "lo_put", "dblink",
        "dblink_exec", "age", "to_regclass", "has_table_privilege", "has_schema_privilege",
        "has_column_privilege", "has_function_privilege", "row_security_active",
    )
)  # fmt: skip
#: prefixes of families of server-state functions
VOLATILE_PREFIXES = ("pg_", "txid_", "lo_", "dblink")

#: statements that change no table data
_READ_ONLY_STATEMENTS = frozenset(
    (
        "SelectStmt",
        "TransactionStmt",
        "VariableSetStmt",
        "VariableShowStmt",
        "ExplainStmt",
        "PrepareStmt",
        "DeallocateStmt",
        "ListenStmt",
        "UnlistenStmt",
        "NotifyStmt",
        "VacuumStmt",
        "DeclareCursorStmt",
        "FetchStmt",
        "ClosePortalStmt",
        "CheckPointStmt",
        "DiscardStmt",
        "LockStmt",
    )
)
#: statements that write the relations they name (and nothing else)
_TABLE_WRITES = frozenset(
    (
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "MergeStmt",
        "TruncateStmt",
        "CopyStmt",
        "RefreshMatViewStmt",
    )
)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    cacheable: bool
    #: "ok", or why the statement's result may not be cached
    reason: str
    #: relations a cacheable statement reads ("schema.table")
    tables: tuple[str, ...] = ()
    #: bare names of tables the statement may write; None means it may write anything
    writes: tuple[str, ...] | None = ()

    def bare_tables(self) -> tuple[str, ...]:
        return tuple(sorted({t.rpartition(".")[2] for t in self.tables}))


def analyze(sql: str, schemas: Iterable[str] = ("gold",)) -> CacheInfo:
    """Classify one text (a simple Query may hold several statements)."""
    try:
        tree = json.loads(pg.parse_sql_json(sql))
    except (pg.ParseError, ValueError, RecursionError):
        # PostgreSQL rejects it too: it reads and writes nothing
        return CacheInfo(False, "does not parse", (), ())
    stmts = [s.get("stmt") or {} for s in tree.get("stmts") or []]
    writes = _writes(stmts)
    if len(stmts) != 1:
        return CacheInfo(False, "not exactly one statement", (), writes)
    if any(marker in sql for marker in OPT_OUT):
        return CacheInfo(False, "opted out by comment", (), writes)
    kind, body = next(iter(stmts[0].items())) if stmts[0] else ("", {})
    if kind != "SelectStmt":
        return CacheInfo(False, "not a SELECT", (), writes)
    if writes:
        return CacheInfo(False, "writes data", (), writes)
    if body.get("intoClause"):
        return CacheInfo(False, "SELECT INTO", (), None)
    problem = _select_problem(body, frozenset(schemas))
    if problem is not None:
        return CacheInfo(False, problem, (), writes)
    tables = tuple(sorted({f"{s}.{t}" for s, t in _relations(body) if s is not None}))
    if not tables:
        return CacheInfo(False, "reads no table", (), writes)
    return CacheInfo(True, "ok", tables, ())


def _writes(stmts: list[dict[str, Any]]) -> tuple[str, ...] | None:
    names: set[str] = set()
    for stmt in stmts:
        if not stmt:
            continue
        kind, body = next(iter(stmt.items()))
        if kind in _TABLE_WRITES:
            if kind == "CopyStmt" and not body.get("is_from"):
                continue  # COPY ... TO reads
            names.update(t for _, t in _relations(body))
        elif kind == "SelectStmt":
            if body.get("intoClause"):
                return None
            for cte in _ctes(body):
                query = cte.get("ctequery") or {}
                if query and next(iter(query)) != "SelectStmt":
                    names.update(t for _, t in _relations(query))
        elif kind == "ExplainStmt":
            inner = body.get("query") or {}
            options = json.dumps(body.get("options") or []).lower()
            if '"analyze"' in options and inner and next(iter(inner)) != "SelectStmt":
                sub = _writes([inner])
                if sub is None:
                    return None
                names.update(sub)
        elif kind not in _READ_ONLY_STATEMENTS:
            return None  # DDL, CALL, DO, EXECUTE, ...: anything may change
    return tuple(sorted(names))


def _ctes(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            cte = item.get("CommonTableExpr")
            if cte is not None:
                out.append(cte)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _relations(node: Any) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            relname = item.get("relname")
            if isinstance(relname, str):
                out.append((item.get("schemaname"), relname))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _select_problem(body: dict[str, Any], schemas: frozenset[str]) -> str | None:
    cte_names: set[str] = set()
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("lockingClause"):
                return "locks rows (FOR UPDATE/SHARE)"
            if "SQLValueFunction" in item:
                return "reads the clock or the session (CURRENT_...)"
            cte = item.get("CommonTableExpr")
            if cte is not None:
                cte_names.add(cte.get("ctename", ""))
                query = cte.get("ctequery") or {}
                if query and next(iter(query)) != "SelectStmt":
                    return "data-modifying WITH"
            fc = item.get("FuncCall")
            if fc is not None:
                parts = [p.get("String", {}).get("sval", "") for p in fc.get("funcname", [])]
                name = parts[-1].lower() if parts else ""
                if len(parts) > 1 and parts[0] != "pg_catalog":
                    return f"calls a user function {'.'.join(parts)}()"
                if name in VOLATILE_FUNCTIONS or name.startswith(VOLATILE_PREFIXES):
                    return f"calls {name}()"
            rv = item.get("RangeVar")
            if rv is not None:
                schema = rv.get("schemaname")
                if schema is None and rv.get("relname") in cte_names:
                    pass  # a reference to a WITH query
                elif rv.get("relpersistence") == "t":
                    return "reads a temporary table"
                elif schema is None:
                    return f"table {rv.get('relname')} is not schema-qualified"
                elif schema not in schemas:
                    return f"table {schema}.{rv.get('relname')} is outside the cached schemas"
            if "RangeFunction" in item:
                return "selects from a function"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None
