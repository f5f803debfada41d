"""Equivalence-checked rewrites in the proxy: which text a simple Query is sent as.

The rules are `optimizer/rules/` (sqlglot in, sqlglot out) and the proof is
`optimizer.equivalence.shadow_check`. Here: the first time a SELECT text is seen it is queued;
a background task computes its candidate rewrites, keeps one only if EXPLAIN says it is cheaper,
and shadow-runs original and rewrite on pgsage's own read-only connection (statement_timeout);
results must match as multisets. One mismatch (or error) disables the rule for that template
(recorded in `metadata.optimization_history`). From then on the hot path is a dict lookup from
the exact text to its proven rewrite. A holdout share runs the original; a Mann-Whitney U test
per template validates the rewrite or withdraws it.

Scope: simple-protocol Query messages with one SELECT, outside transactions, in the warehouse
database (where pgsage has its own connection to prove equivalence).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from models.steering import mann_whitney
from optimizer.equivalence import shadow_check
from optimizer.fingerprint import compute_fingerprint, literal_key
from optimizer.rules import RuleContext, rewrite

from .log import get_logger
from .settings import Settings
from .steering import _SELECT, _WRITES

HOLDOUT, APPLY, DRY_RUN = "holdout", "apply", "dry_run"


@dataclass
class TemplateRewrite:
    rule: str | None = None
    fingerprint: str | None = None
    proven: int = 0
    disabled: bool = False
    withdrawn: bool = False
    validated: bool = False
    rewritten: list[float] = field(default_factory=list)
    holdout: list[float] = field(default_factory=list)


class RewriteController:
    def __init__(
        self, settings: Settings, connect: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self.settings = settings
        self.connect = connect
        self.log = get_logger("pgsage.rewrite")
        self.rng = random.Random(settings.steering_seed)
        #: exact text -> (rule, rewritten text) once proven; None: analysed, nothing to do
        self.verdicts: OrderedDict[str, tuple[str, str] | None] = OrderedDict()
        self.templates: OrderedDict[str, TemplateRewrite] = OrderedDict()
        self._queued: set[str] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self.history: list[dict[str, Any]] = []
        self.ctx = RuleContext()
        self._ctx_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- hot path

    def decide(self, sql: str, database: str | None) -> tuple[str | None, str, str] | None:
        """(text to send or None for the original, rule, mode) for a Query about to run."""
        s = self.settings
        if not s.rewrite_active or database != s.warehouse_database:
            return None
        verdict = self.verdicts.get(sql, False)
        if verdict is False:
            self._enqueue(sql)
            return None
        if verdict is None:
            return None
        rule, new_sql = verdict
        st = self.templates.get(literal_key(sql))
        if st is None or st.disabled or st.withdrawn or rule in s.rewrite_disabled_rules:
            return None
        if st.fingerprint in s.rewrite_exclude:
            return None
        if self.rng.random() < s.rewrite_holdout:
            return None, rule, HOLDOUT
        if s.rewrite_dry_run:
            return None, rule, DRY_RUN
        return new_sql, rule, APPLY

    def _enqueue(self, sql: str) -> None:
        if sql in self._queued or len(self._queued) > 10_000:
            return
        if not _SELECT.match(sql) or _WRITES.search(sql) or "pgsage:off" in sql:
            self.verdicts[sql] = None
            return
        key = literal_key(sql)
        st = self.templates.get(key)
        if st is not None and st.disabled:
            self.verdicts[sql] = None
            return
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(sql)
            self._queued.add(sql)

    def observe(self, sql: str | None, decision: tuple[Any, str, str] | None, ms: float) -> None:
        if sql is None or decision is None:
            return
        st = self.templates.get(literal_key(sql))
        if st is None:
            return
        mode = decision[2]
        bucket = st.rewritten if mode == APPLY else st.holdout if mode == HOLDOUT else None
        if bucket is not None:
            bucket.append(ms)
            if len(bucket) > 200:
                del bucket[0]

    # ---------------------------------------------------------------- background proof

    def start(self) -> None:
        if self.connect is not None:
            self._task = asyncio.ensure_future(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _work(self) -> None:
        assert self.connect is not None
        conn = None
        while True:
            try:
                sql: str | None = await asyncio.wait_for(
                    self.queue.get(), self.settings.rewrite_context_interval
                )
            except TimeoutError:
                sql = None  # nothing new to analyse: still keep the watermarks current
            try:
                if conn is None or conn.is_closed():
                    conn = await self.connect()
                    await conn.execute(
                        "SET default_transaction_read_only = on; SET statement_timeout = "
                        f"{int(self.settings.rewrite_timeout_ms)}"
                    )
                if sql is None:
                    await self.refresh_context(conn)
                    continue
                await self.analyse(conn, sql)
            except Exception as exc:  # the database went away: try again later
                self.log.warning("rewrite analysis failed", error=str(exc))
                if sql is not None:
                    self.verdicts[sql] = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            finally:
                if sql is not None:
                    self._queued.discard(sql)

    async def refresh_context(self, conn: Any) -> None:
        """NOT NULL columns and primary keys of every user table, and the gold watermarks, for
        the rules (every `rewrite_context_interval`). A watermark that moved drops every
        verdict, so texts are re-analysed against it: a gold rewrite proven while gold was
        fresh is not applied once gold no longer covers the query's days."""
        interval = self.settings.rewrite_context_interval
        if self._ctx_at and time.monotonic() - self._ctx_at < interval:
            return
        rows = await conn.fetch(
            "SELECT n.nspname || '.' || c.relname AS t, a.attname, a.attnotnull,"
            " coalesce(a.attnum = ANY (i.indkey::int2[]), false) AS pk"
            " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary"
            " WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        )
        not_null: dict[str, set[str]] = {}
        keys: dict[str, list[str]] = {}
        for r in rows:
            not_null.setdefault(r["t"], set())
            if r["attnotnull"]:
                not_null[r["t"]].add(r["attname"])
            if r["pk"]:
                keys.setdefault(r["t"], []).append(r["attname"])
        marks, complete = await gold_freshness(conn)
        moved = (marks, complete) != (dict(self.ctx.gold_watermarks), self.ctx.gold_complete)
        if moved and self._ctx_at:
            self.log.info("gold watermark moved: rewrites re-analysed", watermarks=str(marks),
                          complete=sorted(complete))  # fmt: skip
            self.verdicts.clear()
        self.ctx = RuleContext(not_null=not_null, primary_keys=keys, gold_watermarks=marks,
                               gold_complete=complete)  # fmt: skip
        self._ctx_at = time.monotonic()

    async def analyse(self, conn: Any, sql: str) -> None:
        """Candidates for `sql`; keep the cheapest by EXPLAIN that is proven equivalent."""
        await self.refresh_context(conn)
        key = literal_key(sql)
        st = self.templates.get(key)
        if st is None:
            st = self.templates[key] = TemplateRewrite(fingerprint=compute_fingerprint(sql).id)
            if len(self.templates) > 5000:
                self.templates.popitem(last=False)
        enabled = [r for r in _rule_names() if r not in self.settings.rewrite_disabled_rules]
        if st.rule is not None:
            enabled = [st.rule]  # a template keeps the rule it was proven with
        candidates = rewrite(sql, self.ctx, enabled)
        if not candidates:
            self.verdicts[sql] = None
            return
        base = await _cost(conn, sql)
        priced = [(await _cost(conn, new), rule, new) for rule, new in candidates]
        priced = [p for p in priced if base is not None and p[0] is not None and p[0] < base]
        if not priced:
            self.verdicts[sql] = None
            return
        _, rule, new_sql = min(priced, key=lambda p: p[0])

        async def run(q: str, params: Any) -> list[Any]:
            return list(await conn.fetch(q, *params))

        result = await shadow_check(run, sql, new_sql, [()])
        if not result.equivalent:
            st.disabled = True
            self.verdicts[sql] = None
            self.log.warning("rewrite disabled: results differ", rule=rule,
                             fingerprint=st.fingerprint, reason=result.reason)  # fmt: skip
            self.history.append(self._decision(st, rule, "reject", "rejected", result.reason))
            return
        st.rule = rule
        st.proven += 1
        self.verdicts[sql] = (rule, new_sql)
        if len(self.verdicts) > 20_000:
            self.verdicts.popitem(last=False)

    # ---------------------------------------------------------------- A/B

    def evaluate(self) -> list[dict[str, Any]]:
        s = self.settings
        out = self.history
        self.history = []
        for st in self.templates.values():
            if st.rule is None or st.withdrawn or st.disabled:
                continue
            if len(st.rewritten) < s.steering_ab_min_samples or len(st.holdout) < 3:
                continue
            p, ratio = mann_whitney(st.rewritten, st.holdout)
            better = p < s.steering_ab_alpha and ratio < 1.0 - s.steering_min_gain
            if better and not st.validated:
                st.validated = True
                out.append(self._decision(st, st.rule, "validate", "validated", "", p, ratio))
            elif not better and len(st.rewritten) >= 2 * s.steering_ab_min_samples:
                st.withdrawn = True
                out.append(self._decision(st, st.rule, "revert", "reverted", "", p, ratio))
        return out

    def _decision(
        self, st: TemplateRewrite, rule: str, action: str, status: str, reason: str,
        p: float | None = None, ratio: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        def med(v: list[float]) -> float | None:
            return sorted(v)[len(v) // 2] if v else None

        return {
            "kind": "rewrite",
            "target": st.fingerprint,
            "action": action,
            "status": status,
            "detail": {
                "rule": rule,
                "reason": reason,
                "p_value": p,
                "median_ratio": ratio,
                "n_rewritten": len(st.rewritten),
                "n_holdout": len(st.holdout),
                "proven_texts": st.proven,
            },
            "before_ms": med(st.holdout),
            "after_ms": med(st.rewritten),
        }

    def rows(self) -> list[tuple[Any, ...]]:
        out = []
        for key, st in self.templates.items():
            if st.rule is None and not st.disabled:
                continue
            status = ("disabled" if st.disabled else "withdrawn" if st.withdrawn
                      else "validated" if st.validated else "live")  # fmt: skip
            out.append((st.fingerprint, st.rule, status, st.proven, len(st.rewritten),
                        len(st.holdout), key[:120]))  # fmt: skip
        return out


def _rule_names() -> list[str]:
    from optimizer.rules import RULES

    return list(RULES)


async def _cost(conn: Any, sql: str) -> float | None:
    try:
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql)
    except Exception:
        return None
    import json

    doc = json.loads(plan) if isinstance(plan, str) else plan
    return float(doc[0]["Plan"]["Total Cost"])


async def gold_freshness(conn: Any) -> tuple[dict[str, dt.date], frozenset[str]]:
    """(watermarks, complete gold tables) for the gold rewrite.

    gold.sales_summary is exact for every day but those whose silver sales lines were written
    outside the ETL since its last run (silver.sales_stale_days, kept by triggers; migration
    0080): its watermark is its newest day, or the day before the first stale day, and it is
    complete when no day is stale. Without those tables: nothing (the rule stays off)."""
    present = await conn.fetchval(
        "SELECT to_regclass('gold.sales_summary') IS NOT NULL"
        " AND to_regclass('silver.sales_stale_days') IS NOT NULL"
    )
    if not present:
        return {}, frozenset()
    row = await conn.fetchrow(
        "SELECT (SELECT max(sale_date) FROM gold.sales_summary) AS last_day,"
        " min(sale_date) FILTER (WHERE isfinite(sale_date)) AS first_stale,"
        " coalesce(bool_or(NOT isfinite(sale_date)), false) AS truncated"
        " FROM silver.sales_stale_days"
    )
    last, stale = row["last_day"], row["first_stale"]
    if last is None or row["truncated"]:
        return {}, frozenset()  # empty gold, or a TRUNCATE since the last refresh
    if stale is None:
        return {"gold.sales_summary": last}, frozenset({"gold.sales_summary"})
    return {"gold.sales_summary": min(last, stale - dt.timedelta(days=1))}, frozenset()
