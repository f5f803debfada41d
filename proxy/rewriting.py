"""Equivalence-checked rewrites in the proxy: which text a simple Query is sent as.

The rules are `optimizer/rules/` (sqlglot in, sqlglot out) and the proof is
`optimizer.equivalence.shadow_check`. Here: the first time a SELECT text is seen it is queued;
a background task computes its candidate rewrites, keeps one only if EXPLAIN says it is cheaper,
and shadow-runs original and rewrite on pgsage's own read-only connection (statement_timeout);
results must match as multisets. One mismatch (or error) disables the rule for that template
(recorded in `metadata.optimization_history`). From then on the hot path is a dict lookup from
the exact text to its proven rewrite. A holdout share runs the original; a Mann-Whitney U test
per template validates the rewrite or withdraws it.

Extended protocol: the text of a Parse (with $n parameters) is proven with the values clients
bind to it. The first `rewrite_literal_sets` Binds of a new text lend their values (text format
as sent, binary format rendered as text for the common types); the background task PREPAREs
original and rewrite with the Parse's declared parameter types, checks that both describe alike
(the same parameter types and result columns, as a client that reads the descriptions sees) and
runs both with each value set. Once proven, a Parse of that text (with the same declared types)
is sent with the rewrite in its place: for the unnamed statement the decision is per execution;
a named statement keeps the one made at its Parse (a statement prepared before the proof stays
as the client wrote it).

Scope: one SELECT per Query, or one Parse and at most one Bind per extended request ending in
Sync, outside transactions, in the warehouse database (where pgsage has its own connection to
prove equivalence).
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

from models.steering import EARLY_ALPHA, mann_whitney, mean_ratio
from optimizer.equivalence import shadow_check
from optimizer.fingerprint import compute_fingerprint, literal_key
from optimizer.rules import RuleContext, rewrite

from .log import get_logger
from .prepared import Prepared, ValueSet, literal_sets
from .protocol.frontend import Bind
from .settings import Settings
from .steering import _SELECT, _WRITES

HOLDOUT, APPLY, DRY_RUN = "holdout", "apply", "dry_run"

#: a simple Query's text, or a Parse's (text, declared parameter type OIDs)
Key = str | tuple[str, tuple[int, ...]]
Decision = tuple[str | None, str, str]


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
        self.verdicts: OrderedDict[Key, tuple[str, str] | None] = OrderedDict()
        self.templates: OrderedDict[str, TemplateRewrite] = OrderedDict()
        self._queued: set[Key] = set()
        self.queue: asyncio.Queue[Key] = asyncio.Queue(maxsize=1000)
        #: Parse texts gathering the value sets they are to be proven with (and Binds seen)
        self.pending: OrderedDict[tuple[str, tuple[int, ...]], list[ValueSet]] = OrderedDict()
        self._offers: dict[tuple[str, tuple[int, ...]], int] = {}
        self.history: list[dict[str, Any]] = []
        self.ctx = RuleContext()
        self._ctx_at = 0.0
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- hot path

    def decide(
        self, sql: str, database: str | None, types: tuple[int, ...] | None = None
    ) -> Decision | None:
        """(text to send or None for the original, rule, mode) for a Query about to run, or for
        a Parse of `sql` declaring parameter types `types`. A text not seen before is queued
        for analysis (a Parse's first gathers the value sets it is proven with: `offer`)."""
        s = self.settings
        if not s.rewrite_active or database != s.warehouse_database:
            return None
        key: Key = sql if types is None else (sql, types)
        verdict = self.verdicts.get(key, False)
        if verdict is False:
            if key not in self._queued and key not in self.pending:
                self._consider(key)
            return None
        if verdict is None:
            return None
        return self._mode(sql, verdict)

    def wants(self, key: tuple[str, tuple[int, ...]]) -> bool:
        """Whether a Bind of this Parse text should lend its values (hot path: a dict lookup)."""
        return key in self.pending

    def offer(self, key: tuple[str, tuple[int, ...]], bind: Bind) -> None:
        """A Bind's values for a text gathering value sets; the text is queued for its proof
        once it has `rewrite_literal_sets` different ones (or has been bound as often again
        with nothing new: a text always bound alike is proven with what it has)."""
        sets = self.pending.get(key)
        if sets is None or key in self._queued:
            return
        values: ValueSet = (bind.param_formats, bind.params)
        if values not in sets:
            sets.append(values)
        need = self.settings.rewrite_literal_sets
        offers = self._offers[key] = self._offers.get(key, 0) + 1
        if len(sets) >= need or offers >= 2 * need or not bind.params:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(key)
                self._queued.add(key)
                self._offers.pop(key, None)
                return
            self.pending.pop(key, None)  # the queue is full: forget it, gather again later
            self._offers.pop(key, None)

    def _consider(self, key: Key) -> None:
        """A text seen for the first time: nothing to do unless it is a read-only SELECT of a
        template not disabled; a Query's text is queued, a Parse's starts gathering values."""
        sql = key if isinstance(key, str) else key[0]
        st = self.templates.get(literal_key(sql))
        if (not _SELECT.match(sql) or _WRITES.search(sql) or "pgsage:off" in sql
                or (st is not None and st.disabled)):  # fmt: skip
            self._verdict(key, None)
        elif isinstance(key, tuple):
            if len(self.pending) >= 1000:
                old, _ = self.pending.popitem(last=False)
                self._offers.pop(old, None)
            self.pending[key] = []
        elif len(self._queued) <= 10_000:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(key)
                self._queued.add(key)

    def _mode(self, sql: str, verdict: tuple[str, str]) -> Decision | None:
        s = self.settings
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

    def observe(self, sql: str | None, decision: Decision | None, ms: float) -> None:
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
                sql: Key | None = await asyncio.wait_for(
                    self.queue.get(), self.settings.rewrite_context_interval
                )
            except TimeoutError:
                sql = None  # nothing new to analyse: still keep the watermarks current
            try:
                if conn is None or conn.is_closed():
                    conn = await self.connect()
                    await conn.execute(
                        "SET default_transaction_read_only = on; SET statement_timeout = "
                        f"{int(self.settings.rewrite_timeout_ms)};"
                        " SET standard_conforming_strings = on"
                    )
                if sql is None:
                    await self.refresh_context(conn)
                    continue
                await self.analyse(conn, sql)
            except Exception as exc:  # the database went away: try again later
                self.log.warning("rewrite analysis failed", error=str(exc))
                if sql is not None:
                    self._verdict(sql, None)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
            finally:
                if sql is not None:
                    self._queued.discard(sql)
                    if isinstance(sql, tuple):
                        self.pending.pop(sql, None)

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

    def _template(self, sql: str) -> TemplateRewrite:
        key = literal_key(sql)
        st = self.templates.get(key)
        if st is None:
            st = self.templates[key] = TemplateRewrite(fingerprint=compute_fingerprint(sql).id)
            if len(self.templates) > 5000:
                self.templates.popitem(last=False)
        return st

    def _candidates(self, sql: str, st: TemplateRewrite) -> list[tuple[str, str]]:
        enabled = [r for r in _rule_names() if r not in self.settings.rewrite_disabled_rules]
        if st.rule is not None:
            enabled = [st.rule]  # a template keeps the rule it was proven with
        return rewrite(sql, self.ctx, enabled)

    def _proven(self, key: Key, st: TemplateRewrite, rule: str, new_sql: str) -> None:
        st.rule = rule
        st.proven += 1
        self._verdict(key, (rule, new_sql))

    def _verdict(self, key: Key, verdict: tuple[str, str] | None) -> None:
        """Remember what a text came to (the oldest verdicts go first past 20,000 texts)."""
        self.verdicts[key] = verdict
        if len(self.verdicts) > 20_000:
            self.verdicts.popitem(last=False)

    def _reject(self, key: Key, st: TemplateRewrite, rule: str, reason: str) -> None:
        st.disabled = True
        self._verdict(key, None)
        self.log.warning("rewrite disabled: results differ", rule=rule,
                         fingerprint=st.fingerprint, reason=reason)  # fmt: skip
        self.history.append(self._decision(st, rule, "reject", "rejected", reason))

    async def analyse(self, conn: Any, sql: Key) -> None:
        """Candidates for `sql`; keep the cheapest by EXPLAIN that is proven equivalent."""
        await self.refresh_context(conn)
        if isinstance(sql, tuple):
            await self.analyse_parse(conn, sql, self.pending.pop(sql, []))
            return
        st = self._template(sql)
        candidates = self._candidates(sql, st)
        if not candidates:
            self._verdict(sql, None)
            return
        base = await _cost(conn, sql)
        priced = [(await _cost(conn, new), rule, new) for rule, new in candidates]
        priced = [p for p in priced if base is not None and p[0] is not None and p[0] < base]
        if not priced:
            self._verdict(sql, None)
            return
        _, rule, new_sql = min(priced, key=lambda p: p[0])
        if await _columns(conn, sql) != await _columns(conn, new_sql):
            self._reject(sql, st, rule, "result columns differ (names or types)")
            return

        async def run(q: str, params: Any) -> list[Any]:
            return list(await conn.fetch(q, *params))

        result = await shadow_check(run, sql, new_sql, [()])
        if not result.equivalent:
            self._reject(sql, st, rule, result.reason)
            return
        self._proven(sql, st, rule, new_sql)

    async def analyse_parse(
        self, conn: Any, key: tuple[str, tuple[int, ...]], sets: list[ValueSet]
    ) -> None:
        """A Parse text: PREPARE original and candidates with the declared types, keep the
        cheapest candidate (EXPLAIN EXECUTE, summed over the value sets: a guarded rewrite
        pays only for some values) that describes alike and returns the same rows for every
        value set."""
        sql, declared = key
        st = self._template(sql)
        candidates = self._candidates(sql, st)
        if not candidates:
            self._verdict(key, None)
            return
        async with Prepared(conn, declared) as stmts:
            resolved = await stmts.prepare("pgsage_rw_o", sql)
            if resolved is None:
                self._verdict(key, None)
                return
            values = literal_sets(sets, resolved)
            if not values:
                self._verdict(key, None)  # no value set it could be proven with
                return
            first = values[0]

            async def cost(name: str) -> float | None:
                costs = [await _cost(conn, f"EXECUTE {name} {args}") for args in values]
                return None if None in costs else sum(c for c in costs if c is not None)

            base = await cost("pgsage_rw_o")
            priced = []
            for i, (rule, new_sql) in enumerate(candidates):
                name = f"pgsage_rw_{i}"
                if await stmts.prepare(name, new_sql) != resolved:
                    continue  # parameters typed otherwise: a client would see the difference
                price = await cost(name)
                if base is not None and price is not None and price < base:
                    priced.append((price, rule, new_sql, name))
            if not priced:
                self._verdict(key, None)
                return
            _, rule, new_sql, name = min(priced, key=lambda p: p[0])
            if await _columns(conn, f"EXECUTE pgsage_rw_o {first}") != await _columns(
                conn, f"EXECUTE {name} {first}"
            ):
                self._reject(key, st, rule, "result columns differ (names or types)")
                return

            async def run(statement: str, params: Any) -> list[Any]:
                # not through asyncpg's statement cache: the same EXECUTE text may name
                # another statement at the next analysis (its cached description would not do)
                stmt = await conn.prepare(f"EXECUTE {statement} {params[0]}")
                return list(await stmt.fetch())

            result = await shadow_check(run, "pgsage_rw_o", name, [(v,) for v in values])
            if not result.equivalent:
                self._reject(key, st, rule, result.reason)
                return
            self._proven(key, st, rule, new_sql)

    # ---------------------------------------------------------------- A/B

    def evaluate(self) -> list[dict[str, Any]]:
        s = self.settings
        out = self.history
        self.history = []
        for st in self.templates.values():
            if st.rule is None or st.withdrawn or st.disabled:
                continue
            if len(st.rewritten) < s.steering_ab_min_holdout or len(st.holdout) < 3:
                continue
            p, ratio = mann_whitney(st.rewritten, st.holdout)
            # the full sample, or a gain clear enough to settle it early (see steering)
            if (
                len(st.rewritten) < s.steering_ab_min_samples
                and not p < s.steering_ab_alpha * EARLY_ALPHA
            ):
                continue
            # faster in the middle with confidence, and no slower in total
            better = (p < s.steering_ab_alpha and ratio < 1.0 - s.steering_min_gain
                      and mean_ratio(st.rewritten, st.holdout) < 1.0)  # fmt: skip
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


async def _columns(conn: Any, sql: str) -> list[tuple[str, int]] | None:
    """The result columns (name, type OID) a client would be described, or None if it fails."""
    try:
        stmt = await conn.prepare(sql)
    except Exception:
        return None
    return [(a.name, a.type.oid) for a in stmt.get_attributes()]


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
