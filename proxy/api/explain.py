"""EXPLAIN (FORMAT JSON) of one SELECT on pgsage's own warehouse connection, never ANALYZE.

The text is checked with PostgreSQL's own parser (pglast) first: exactly one statement, a
SELECT (or VALUES / set operation) without INTO and without data-modifying WITH parts. It is
then planned inside a READ ONLY transaction with a `SET LOCAL statement_timeout`, through the
extended protocol (which refuses a second statement on its own). A text with `$n` placeholders
gets its generic plan (PREPARE / EXPLAIN EXECUTE with NULLs under force_generic_plan), as the
cost model's Explainer does.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from pglast.parser import ParseError, parse_sql_json

from optimizer.features import generic_plan_statements

_WRITES = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")


class NotExplainable(ValueError):
    """The text is not one read-only SELECT (the message says why)."""


def check_select(sql: str) -> int:
    """The number of `$n` parameters of a single read-only SELECT; NotExplainable otherwise."""
    try:
        tree = json.loads(parse_sql_json(sql))
    except (ParseError, ValueError, RecursionError) as exc:
        raise NotExplainable(f"not valid SQL: {exc}") from None
    stmts = tree.get("stmts") or []
    if len(stmts) != 1:
        raise NotExplainable(f"exactly one statement can be explained, got {len(stmts)}")
    stmt = stmts[0].get("stmt") or {}
    kind = next(iter(stmt), "nothing")
    if kind != "SelectStmt":
        raise NotExplainable(f"only SELECT statements can be explained, got {_command(kind)}")
    found: dict[str, int] = {"params": 0}
    _walk(stmt, found)
    if found.get("into"):
        raise NotExplainable("SELECT ... INTO creates a table: only plain SELECTs are explained")
    if found.get("writes"):
        raise NotExplainable("a WITH part modifies data: only read-only SELECTs are explained")
    return found["params"]


def _walk(node: Any, found: dict[str, int]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "intoClause":
                found["into"] = 1
            elif key in _WRITES:
                found["writes"] = 1
            elif key == "ParamRef" and isinstance(value, dict):
                found["params"] = max(found["params"], int(value.get("number", 0)))
            _walk(value, found)
    elif isinstance(node, list):
        for item in node:
            _walk(item, found)


def _command(kind: str) -> str:
    return kind.removesuffix("Stmt").upper() or "nothing"


async def explain(conn: Any, sql: str, n_params: int, timeout_ms: int) -> Any:
    """The parsed EXPLAIN (FORMAT JSON) output (asyncpg errors propagate)."""
    body = sql.strip().rstrip(";").strip()
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        if n_params == 0:
            out = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {body}")
        else:
            prepare, run, deallocate = generic_plan_statements(body, n_params, "pgsage_api_plan")
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(prepare)
            try:
                out = await conn.fetchval(run)
            finally:
                await conn.execute(deallocate)
    return json.loads(out) if isinstance(out, str) else out


def plan_summary(plan: Any) -> dict[str, Any]:
    """Total cost, rows and root node of EXPLAIN (FORMAT JSON) output."""
    root = plan[0]["Plan"] if isinstance(plan, list) and plan and "Plan" in plan[0] else {}
    return {
        "total_cost": root.get("Total Cost"),
        "plan_rows": root.get("Plan Rows"),
        "node_type": root.get("Node Type"),
    }


async def explain_checked(ctx: Any, sql: str, loc: tuple[str, ...]) -> dict[str, Any]:
    """check_select + explain on the warehouse, with the API's errors: 422 naming `loc` when
    the text is not a SELECT or does not plan, 504 when planning outlives the timeout."""
    from fastapi import HTTPException

    from .common import invalid

    try:
        n_params = check_select(sql)
    except NotExplainable as exc:
        raise invalid(loc, str(exc)) from None
    timeout_ms = int(ctx.settings.cost_explain_timeout_ms)
    async with ctx.connection(warehouse=True) as conn:
        try:
            plan = await explain(conn, sql, n_params, timeout_ms)
        except asyncpg.QueryCanceledError:
            raise HTTPException(
                504, f"planning took longer than the statement_timeout of {timeout_ms} ms"
            ) from None
        except asyncpg.PostgresError as exc:
            raise invalid(loc, f"the warehouse cannot plan it: {exc}") from None
    return {
        **plan_summary(plan),
        "generic_plan": n_params > 0,
        "statement_timeout_ms": timeout_ms,
        "plan": plan,
    }
