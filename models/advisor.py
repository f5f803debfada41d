"""The index advisor: workload from the query log -> candidates -> what-if -> greedy selection
-> recommendations, validated by real builds, recorded in `metadata.optimization_history`.

Entry points (coroutines on asyncpg connections; `conn` is the metadata database, `warehouse`
the database the indexes belong to, by default the same connection; pass a dedicated one, never
a client's):

``advise(conn, warehouse=None, config=None, progress=...) -> AdviceReport``
    Read the workload, generate and cost candidates, select under the storage budget, order them
    (the learned ranker when one is active) and record each as a recommendation
    (``action='recommend', status='proposed'``). Returns the ranked recommendations.
``list_recommendations(conn) -> list[dict]``
    Current recommendations (proposed, applied, validated; newest advice first, by rank), each a
    dict with ``id, rank, op ('create'|'drop'), table, columns, include, predicate, index_name,
    ddl, size_bytes, est_gain_ms, est_gain_share, fingerprints, status, measured_before_ms,
    measured_after_ms, p_value, regressions, created_at``.
``apply_recommendation(conn, id, *, warehouse=None, validate=True, config=None) -> dict``
    Build the index with CREATE INDEX CONCURRENTLY (or DROP INDEX CONCURRENTLY for a drop
    proposal). With `validate`, replay the affected fingerprints before and after; keep the index
    only if the speedup is significant (one-sided Mann-Whitney U per fingerprint, combined by
    Stouffer's Z weighted by each one's share of the time, p < `alpha`), at least
    `min_speedup`, and no affected fingerprint got slower by more than `max_regression`; else
    drop it again. Returns the updated recommendation dict.
``reject_recommendation(conn, id, reason='') -> dict``
    Mark a proposal rejected (it is not proposed again).
``recheck(conn, *, warehouse=None, config=None, auto_apply=False) -> dict``
    Automatic mode's periodic pass: drop indexes the advisor applied whose benefit disappeared
    (no scans since the last check, or their fingerprints left the workload); propose dropping
    indexes unused for `unused_days` (never primary keys, unique or constraint-backing ones);
    with `auto_apply`, apply (and validate) the pending create proposals.

Every outcome is a row of `metadata.optimization_history` (kind ``index``): the recommendation
row itself carries the current status; ``apply``/``validate``/``revert``/``reject`` rows point to
it with ``detail.recommendation_id``.

Runnable SQL per fingerprint: logged ``query_text`` samples with their literals (log_parameters
= true, simple protocol) are preferred: they give the planner real selectivities and are the
only texts that can be replayed. A fingerprint logged only as normalised text ($n) is costed by
its generic plan (PostgreSQL 15 has no EXPLAIN (GENERIC_PLAN); `optimizer.whatif` uses PREPARE
with ``plan_cache_mode = force_generic_plan``), and cannot be replayed: validation then says so.
Only SELECTs are ever replayed, inside READ ONLY transactions.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from optimizer.whatif import (
    CandidateConfig,
    CandidateInfo,
    Evaluation,
    ExistingIndex,
    TableInfo,
    WhatIf,
    WhatIfConfig,
    WorkloadItem,
    estimate_size,
    generate_candidates,
    greedy_select,
    quote_ident,
    resolve_table,
)

Progress = Callable[[str, float], None]
KIND = "index"
WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE", "COPY")
COSTED = ("SELECT", "UPDATE", "DELETE")
OPEN_STATUSES = ("proposed", "applied", "validated")
QUERY_CANCELED = "57014"  # statement_timeout


def _no_progress(stage: str, fraction: float) -> None:
    return None


@dataclass
class AdvisorConfig:
    #: the workload: logged executions since this (default: the `window_days` before the newest)
    since: datetime | None = None
    window_days: float = 7.0
    database: str | None = None
    max_fingerprints: int = 200
    samples_per_fingerprint: int = 5
    #: samples explained per fingerprint per what-if round
    cost_samples: int = 3
    max_candidates: int = 40
    #: storage budget as a share of the database size
    budget_share: float = 0.2
    min_rows: float = 10_000
    max_columns: int = 3
    #: share of a table's logged write time each extra index is assumed to add
    write_overhead: float = 0.05
    #: a candidate must save at least this share of its fingerprints' estimated cost
    min_cost_share: float = 0.05
    hypopg: bool | None = None
    create_extension: bool = True
    max_build_bytes: int = 256 * 1024 * 1024
    # ---- validation
    replay_samples: int = 5
    replay_repeats: int = 5
    alpha: float = 0.05
    min_speedup: float = 1.2
    max_regression: float = 1.1
    statement_timeout_ms: int = 60_000
    #: fingerprints re-measured per validation (the heaviest ones on the table)
    max_validate_fingerprints: int = 10
    #: keep an index that regresses at most this many fingerprints when a steering hint set
    #: restores each of them (pinned in metadata.optimization_history; 0: always revert)
    max_pins: int = 0
    # ---- automatic mode
    unused_days: float = 30.0
    use_ranker: bool = True


@dataclass
class Fingerprint:
    """One fingerprint of the logged workload."""

    id: str
    command: str
    normalized: str
    calls: int
    mean_ms: float
    tables: tuple[str, ...]
    samples: list[str] = field(default_factory=list)

    @property
    def weight(self) -> float:
        return self.calls * self.mean_ms

    @property
    def texts(self) -> list[str]:
        """What to EXPLAIN: literal samples when logged, else the normalised text."""
        return self.samples or [self.normalized]


@dataclass
class Workload:
    fingerprints: dict[str, Fingerprint]
    #: table -> ms of logged writes in the window
    write_ms: dict[str, float]
    since: datetime
    with_literals: int = 0

    def on_table(self, table: str) -> list[Fingerprint]:
        return [f for f in self.fingerprints.values() if table in f.tables]


@dataclass
class AdviceReport:
    recommendations: list[dict[str, Any]]
    candidates: int
    evaluated: int
    method: str
    budget_bytes: int
    database_bytes: int
    fingerprints: int
    notes: list[str] = field(default_factory=list)
    ranker: str = "what-if gain"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


# ------------------------------------------------------------------------------ workload


async def load_workload(conn: Any, config: AdvisorConfig) -> Workload:
    """Fingerprints of the logged workload (weight = calls x mean ms) and writes per table."""
    since = config.since
    if since is None:
        # the window ends at the newest logged execution, not the wall clock: under the workload
        # simulator's clock the log is stamped in simulated time, possibly months away
        newest = await conn.fetchval("SELECT max(started_at) FROM metadata.query_logs")
        since = (newest or datetime.now(UTC)) - timedelta(days=config.window_days)
    rows = await conn.fetch(
        """
        SELECT fingerprint, command, min(normalized_text) AS normalized, count(*) AS calls,
               avg(duration_ms) AS mean_ms, max(tables_used) AS tables
        FROM metadata.query_logs
        WHERE started_at >= $1 AND NOT is_catalog
          -- a statement cancelled by a timeout is the heaviest kind of workload (its logged
          -- time is a lower bound): leaving it out hides the queries indexes help most
          AND (status = 'ok' OR sqlstate = '57014')
          AND ($2::text IS NULL OR database_name = $2)
        GROUP BY fingerprint, command
        """,
        since,
        config.database,
    )
    fps: dict[str, Fingerprint] = {}
    write_ms: dict[str, float] = defaultdict(float)
    for r in rows:
        tables = tuple(r["tables"] or ())
        if r["command"] in WRITES:
            for t in tables:
                write_ms[t] += float(r["calls"]) * float(r["mean_ms"])
        if r["command"] not in COSTED or not r["normalized"]:
            continue
        old = fps.get(r["fingerprint"])
        if old is not None:  # same fingerprint with other table lists: merge the calls
            total = old.calls + int(r["calls"])
            old.mean_ms = (old.weight + float(r["calls"]) * float(r["mean_ms"])) / total
            old.calls = total
            old.tables = tuple(sorted(set(old.tables) | set(tables)))
            continue
        fps[r["fingerprint"]] = Fingerprint(
            r["fingerprint"],
            r["command"],
            r["normalized"],
            int(r["calls"]),
            float(r["mean_ms"]),
            tables,
        )
    top = sorted(fps.values(), key=lambda f: -f.weight)[: config.max_fingerprints]
    fps = {f.id: f for f in top}
    samples = await conn.fetch(
        r"""
        SELECT fingerprint, query_text FROM (
            SELECT fingerprint, query_text,
                   row_number() OVER (PARTITION BY fingerprint ORDER BY max(started_at) DESC) AS rn
            FROM metadata.query_logs
            WHERE started_at >= $1 AND (status = 'ok' OR sqlstate = '57014')
              AND query_text IS NOT NULL
              AND fingerprint = ANY($2::text[]) AND query_text !~ '\$[0-9]'
              AND ($3::text IS NULL OR database_name = $3)
            GROUP BY fingerprint, query_text
        ) s WHERE rn <= $4
        """,
        since,
        list(fps),
        config.database,
        config.samples_per_fingerprint,
    )
    for r in samples:
        fps[r["fingerprint"]].samples.append(r["query_text"])
    with_literals = sum(1 for f in fps.values() if f.samples)
    return Workload(fps, dict(write_ms), since, with_literals)


# ------------------------------------------------------------------------------ catalog


async def load_catalog(conn: Any) -> dict[str, TableInfo]:
    """User tables of the warehouse: size, columns, B-tree indexes, pg_stats."""
    skip = ("pg_catalog", "information_schema", "pg_toast", "metadata", "ml")
    tables = await conn.fetch(
        """
        SELECT c.oid, n.nspname || '.' || c.relname AS name, greatest(c.reltuples, 0) AS rows,
               pg_table_size(c.oid) AS size,
               array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid
                     AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) AS columns
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname <> ALL($1::text[])
          AND n.nspname NOT LIKE 'pg_temp%'
        """,
        list(skip),
    )
    indexes = await conn.fetch(
        """
        SELECT i.indrelid, ic.relname AS name, i.indisunique, i.indisprimary, i.indnkeyatts,
               array(SELECT coalesce(a.attname::text, '')
                     FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                     LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     ORDER BY k.ord) AS cols,
               pg_get_expr(i.indpred, i.indrelid) AS pred
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_am am ON am.oid = ic.relam
        WHERE am.amname = 'btree' AND i.indisvalid
        """
    )
    stats = await conn.fetch(
        """
        SELECT schemaname || '.' || tablename AS name, attname::text AS col, n_distinct,
               avg_width
        FROM pg_stats WHERE schemaname <> ALL($1::text[])
        """,
        list(skip),
    )
    by_oid: dict[int, list[ExistingIndex]] = defaultdict(list)
    for r in indexes:
        cols = tuple(r["cols"])
        n = int(r["indnkeyatts"])
        by_oid[r["indrelid"]].append(
            ExistingIndex(
                r["name"], cols[:n], cols[n:], r["pred"], r["indisunique"], r["indisprimary"]
            )
        )
    nd: dict[str, dict[str, float]] = defaultdict(dict)
    widths: dict[str, dict[str, float]] = defaultdict(dict)
    for r in stats:
        nd[r["name"]][r["col"]] = float(r["n_distinct"])
        widths[r["name"]][r["col"]] = float(r["avg_width"])
    return {
        r["name"]: TableInfo(
            float(r["rows"]),
            int(r["size"]),
            tuple(r["columns"]),
            tuple(by_oid.get(r["oid"], ())),
            nd.get(r["name"], {}),
            widths.get(r["name"], {}),
        )
        for r in tables
    }


# ------------------------------------------------------------------------------ what-if


async def prepare_whatif(warehouse: Any, config: AdvisorConfig) -> WhatIf:
    if config.create_extension and config.hypopg is not False:
        # not installed or not allowed: the transaction fallback
        with contextlib.suppress(Exception):
            await warehouse.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
    cfg = WhatIfConfig(
        hypopg=config.hypopg,
        max_build_bytes=config.max_build_bytes,
        statement_timeout_ms=config.statement_timeout_ms,
    )
    return await WhatIf(warehouse.fetchval, cfg).setup()


def _sample_sqls(fps: Sequence[Fingerprint], n: int) -> dict[str, str]:
    """key 'fingerprint#i' -> SQL, `n` texts per fingerprint."""
    return {f"{f.id}#{i}": sql for f in fps for i, sql in enumerate(f.texts[:n])}


def _per_fingerprint(costs: Mapping[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for key, c in costs.items():
        groups[key.partition("#")[0]].append(c)
    return {
        fp: (math.nan if any(math.isnan(x) for x in v) else sum(v) / len(v))
        for fp, v in groups.items()
    }


async def evaluate_candidates(
    whatif: WhatIf,
    infos: Sequence[CandidateInfo],
    workload: Workload,
    catalog: Mapping[str, TableInfo],
    config: AdvisorConfig,
    progress: Progress = _no_progress,
) -> list[Evaluation]:
    """One what-if round per candidate over the fingerprints on its table."""
    fps = list(workload.fingerprints.values())
    base_costs, _ = await whatif.costs(_sample_sqls(fps, config.cost_samples))
    base = _per_fingerprint(base_costs)
    out: list[Evaluation] = []
    for i, info in enumerate(infos):
        cand = info.candidate
        related = [f for f in fps if f.id in info.fingerprints or _mentions(f, cand.table, catalog)]
        costs, sizes = await whatif.costs(
            _sample_sqls(related, config.cost_samples), [cand], catalog
        )
        size = sizes.get(cand, -1)
        if whatif.use_hypopg and size >= 0:
            size = max(size, 8192)
        table_info = catalog[cand.table]
        if size == 0:
            size = estimate_size(cand, table_info)
        write = sum(
            ms for t, ms in workload.write_ms.items() if resolve_table(t, catalog) == cand.table
        )
        ev = Evaluation(
            info,
            size,
            {f.id: base.get(f.id, math.nan) for f in related},
            _per_fingerprint(costs),
            {f.id: f.weight for f in related},
            write_cost=write * config.write_overhead,
        )
        out.append(ev)
        progress("what-if", (i + 1) / max(len(infos), 1))
    return out


def _mentions(fp: Fingerprint, table: str, catalog: Mapping[str, TableInfo]) -> bool:
    return any(resolve_table(t, catalog) == table for t in fp.tables)


def features(
    ev: Evaluation, catalog: Mapping[str, TableInfo], workload: Workload
) -> dict[str, float]:
    """What the learned ranker sees of a candidate (also stored with every recommendation)."""
    cand = ev.info.candidate
    info = catalog.get(cand.table)
    ratios = [
        ev.cost[fp] / ev.base[fp]
        for fp in ev.info.fingerprints
        if ev.base.get(fp, 0) > 0 and math.isfinite(ev.cost.get(fp, math.nan))
    ]
    total = sum(f.weight for f in workload.fingerprints.values()) or 1.0
    reasons = ev.info.reasons
    return {
        "log_gain_ms": math.log1p(max(ev.gain, 0.0)),
        "gain_share": max(ev.gain, 0.0) / total,
        "weight_share": ev.info.weight / total,
        "best_cost_ratio": min(ratios) if ratios else 1.0,
        "mean_cost_ratio": sum(ratios) / len(ratios) if ratios else 1.0,
        "log_size": math.log1p(max(ev.size_bytes, 0)),
        "log_rows": math.log1p(info.rows if info else 0.0),
        "n_columns": float(len(cand.columns)),
        "n_include": float(len(cand.include)),
        "partial": float(cand.predicate is not None),
        "n_fingerprints": float(len(ev.info.fingerprints)),
        "n_regressions": float(len(ev.regressions)),
        "write_share": ev.write_cost / (ev.write_cost + ev.info.weight + 1e-9),
        **{
            f"reason_{r}": float(r in reasons)
            for r in ("where", "single", "order_by", "group_by", "join", "include", "partial")
        },
    }


# ------------------------------------------------------------------------------ advise


async def advise(
    conn: Any,
    warehouse: Any | None = None,
    config: AdvisorConfig | None = None,
    progress: Progress = _no_progress,
    *,
    record: bool = True,
    ranker: Any | None = None,
) -> AdviceReport:
    """Recommend indexes for the logged workload (see the module docstring)."""
    cfg = config or AdvisorConfig()
    wh = warehouse if warehouse is not None else conn
    notes: list[str] = []
    workload = await load_workload(conn, cfg)
    progress("workload", 1.0)
    catalog = await load_catalog(wh)
    db_bytes = int(await wh.fetchval("SELECT pg_database_size(current_database())"))
    budget = int(cfg.budget_share * db_bytes)
    no_literals = len(workload.fingerprints) - workload.with_literals
    if no_literals:
        notes.append(
            f"{no_literals} fingerprint(s) have no logged literal samples (log_parameters=false"
            " or extended protocol): costed by their generic plan, not replayable"
        )
    items = [
        WorkloadItem(f.id, sql, f.weight) for f in workload.fingerprints.values() for sql in f.texts
    ]
    ccfg = CandidateConfig(min_rows=cfg.min_rows, max_columns=cfg.max_columns)
    infos = generate_candidates(items, catalog, ccfg)
    progress("candidates", 1.0)
    whatif = await prepare_whatif(wh, cfg)
    if not whatif.use_hypopg:
        notes.append(
            "HypoPG is not available: what-if builds indexes in rolled-back transactions,"
            f" only on tables under {cfg.max_build_bytes // 2**20} MiB"
        )
    chosen_infos = infos[: cfg.max_candidates]
    evaluations = await evaluate_candidates(whatif, chosen_infos, workload, catalog, cfg, progress)
    useful = [ev for ev in evaluations if _worth(ev, cfg)]
    ranker_name = "what-if gain"
    if ranker is None and cfg.use_ranker:
        ranker = await _active_ranker(conn)
    if ranker is not None:
        feats = [features(ev, catalog, workload) for ev in useful]
        for ev, score in zip(
            useful, ranker.predict_gain(feats, [ev.gain for ev in useful]), strict=True
        ):
            ev.score = float(score)
        ranker_name = getattr(ranker, "name", "learned ranker")
    selected = greedy_select(useful, budget)
    selected.sort(key=lambda e: -(e.score if e.score is not None else e.gain))
    progress("select", 1.0)
    db_name = await wh.fetchval("SELECT current_database()")
    closed = await _closed_keys(conn) if record else set()
    skipped = [ev for ev in selected if ev.info.candidate.key in closed]
    if skipped:
        notes.append(f"{len(skipped)} selected index(es) were rejected or reverted before")
    recs = []
    for rank, ev in enumerate((e for e in selected if e not in skipped), 1):
        detail = _detail(ev, rank, catalog, workload, whatif.method, db_name)
        recs.append(await _record(conn, detail) if record else {**detail, "id": None})
    return AdviceReport(
        recs,
        len(infos),
        len(evaluations),
        whatif.method,
        budget,
        db_bytes,
        len(workload.fingerprints),
        notes,
        ranker_name,
    )


def _worth(ev: Evaluation, cfg: AdvisorConfig) -> bool:
    if ev.size_bytes < 0 or ev.gain <= 0:
        return False
    own = [fp for fp in ev.info.fingerprints if ev.base.get(fp, 0) > 0]
    return any(ev.cost.get(fp, math.inf) <= (1 - cfg.min_cost_share) * ev.base[fp] for fp in own)


def _detail(
    ev: Evaluation,
    rank: int,
    catalog: Mapping[str, TableInfo],
    workload: Workload,
    method: str,
    database: str,
) -> dict[str, Any]:
    cand = ev.info.candidate
    name = cand.index_name()
    base_total = sum(ev.weights.get(fp, 0.0) for fp in ev.affected) or 1.0
    return {
        "op": "create",
        "key": cand.key,
        "rank": rank,
        "database": database,
        "candidate": cand.to_json(),
        "label": cand.label,
        "index_name": name,
        "ddl": cand.statement(name, concurrently=True),
        "size_bytes": ev.size_bytes,
        "est_gain_ms": ev.gain,
        "score": ev.score,
        "est_gain_share": max(ev.gain, 0.0) / base_total,
        "fingerprints": ev.affected,
        "source_fingerprints": sorted(ev.info.fingerprints),
        "reasons": sorted(ev.info.reasons),
        "whatif_regressions": ev.regressions,
        "whatif": {fp: [ev.base.get(fp), ev.cost.get(fp)] for fp in ev.cost},
        "method": method,
        "features": features(ev, catalog, workload),
    }


async def _record(conn: Any, detail: dict[str, Any]) -> dict[str, Any]:
    """Insert (or refresh, keeping its id) the recommendation row of a candidate."""
    row = await conn.fetchrow(
        """
        SELECT id, status FROM metadata.optimization_history
        WHERE kind = 'index' AND action = 'recommend' AND detail->>'key' = $1
        ORDER BY id DESC LIMIT 1
        """,
        detail["key"],
    )
    if row is not None and row["status"] == "proposed":
        await conn.execute(
            "UPDATE metadata.optimization_history SET detail = $2::jsonb, created_at = now()"
            " WHERE id = $1",
            row["id"],
            _dumps(detail),
        )
        rec_id = row["id"]
    elif row is not None and row["status"] in ("applied", "validated"):
        return await _get(conn, row["id"])  # nothing new to propose
    else:  # new, or proposed again after a failure
        rec_id = await conn.fetchval(
            "INSERT INTO metadata.optimization_history (kind, target, action, status, detail)"
            " VALUES ('index', $1, 'recommend', 'proposed', $2::jsonb) RETURNING id",
            detail["candidate"]["table"],
            _dumps(detail),
        )
    return await _get(conn, rec_id)


async def _closed_keys(conn: Any) -> set[str]:
    """Candidates rejected by hand or reverted by validation: never proposed again."""
    rows = await conn.fetch(
        "SELECT detail->>'key' AS key FROM metadata.optimization_history WHERE kind = 'index'"
        " AND action = 'recommend' AND status IN ('rejected', 'reverted')"
    )
    return {r["key"] for r in rows}


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, allow_nan=False)


def _json_default(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, set | tuple):
        return list(v)
    raise TypeError(type(v).__name__)


def _clean(v: Any) -> Any:
    """NaN/inf become None, recursively (jsonb has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


# ------------------------------------------------------------------------------ listing


async def _get(conn: Any, rec_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT id, created_at, target, action, status, detail, measured_before_ms,"
        " measured_after_ms FROM metadata.optimization_history WHERE id = $1 AND kind = 'index'",
        rec_id,
    )
    if row is None or row["action"] != "recommend":
        raise LookupError(f"no index recommendation {rec_id}")
    return _rec_dict(row)


def _rec_dict(row: Any) -> dict[str, Any]:
    d = row["detail"]
    d = json.loads(d) if isinstance(d, str) else dict(d)
    cand = d.get("candidate") or {}
    return {
        "id": row["id"],
        "rank": d.get("rank"),
        "op": d.get("op", "create"),
        "table": row["target"],
        "columns": cand.get("columns", []),
        "include": cand.get("include", []),
        "predicate": cand.get("predicate"),
        "label": d.get("label"),
        "index_name": d.get("index_name"),
        "ddl": d.get("ddl"),
        "size_bytes": d.get("size_bytes"),
        "est_gain_ms": d.get("est_gain_ms"),
        "est_gain_share": d.get("est_gain_share"),
        "fingerprints": d.get("fingerprints", []),
        "status": row["status"],
        "measured_before_ms": row["measured_before_ms"],
        "measured_after_ms": row["measured_after_ms"],
        "measured_speedup": d.get("validation", {}).get("speedup"),
        "p_value": d.get("validation", {}).get("p_value"),
        "regressions": d.get("validation", {}).get("regressions", []),
        "reason": d.get("reason"),
        "created_at": row["created_at"],
        "detail": d,
    }


async def list_recommendations(conn: Any, *, include_closed: bool = False) -> list[dict[str, Any]]:
    """Current index recommendations (proposed, applied, validated), best first."""
    statuses = None if include_closed else list(OPEN_STATUSES)
    rows = await conn.fetch(
        """
        SELECT id, created_at, target, action, status, detail, measured_before_ms,
               measured_after_ms
        FROM metadata.optimization_history
        WHERE kind = 'index' AND action = 'recommend'
          AND ($1::text[] IS NULL OR status = ANY($1::text[]))
        ORDER BY (detail->>'op') = 'drop', coalesce((detail->>'rank')::int, 1000000), id DESC
        """,
        statuses,
    )
    return [_rec_dict(r) for r in rows]


async def _event(
    conn: Any,
    rec: Mapping[str, Any],
    action: str,
    status: str,
    detail: Mapping[str, Any],
    before: float | None = None,
    after: float | None = None,
) -> None:
    """Record an outcome and make it the recommendation's current status."""
    payload = _dumps(_clean({**detail, "recommendation_id": rec["id"]}))
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO metadata.optimization_history (kind, target, action, status, detail,"
            " measured_before_ms, measured_after_ms) VALUES ('index', $1, $2, $3, $4::jsonb,"
            " $5, $6)",
            rec["table"],
            action,
            status,
            payload,
            _finite(before),
            _finite(after),
        )
        await conn.execute(
            "UPDATE metadata.optimization_history SET status = $2,"
            " detail = detail || $3::jsonb,"
            " measured_before_ms = coalesce($4, measured_before_ms),"
            " measured_after_ms = coalesce($5, measured_after_ms) WHERE id = $1",
            rec["id"],
            status,
            _dumps(_clean(dict(detail))),
            _finite(before),
            _finite(after),
        )
        if status == "reverted":  # the index is gone: so are the plans pinned around it
            await release_pins(conn, rec["id"], str(detail.get("reason", "index reverted")))


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


async def reject_recommendation(conn: Any, rec_id: int, reason: str = "") -> dict[str, Any]:
    """Mark a proposal rejected; it is not proposed again."""
    rec = await _get(conn, rec_id)
    if rec["status"] != "proposed":
        raise ValueError(f"recommendation {rec_id} is {rec['status']}, not proposed")
    await _event(conn, rec, "reject", "rejected", {"reason": reason or "rejected by hand"})
    return await _get(conn, rec_id)


# ------------------------------------------------------------------------------ measuring


async def measure(
    conn: Any,
    sqls: Mapping[str, Sequence[str]],
    repeats: int,
    timeout_ms: int,
    indexes: dict[str, set[str]] | None = None,
    off: Sequence[str] = (),
    timeouts: dict[str, int] | None = None,
) -> dict[str, list[float]]:
    """Execution + planning ms of each SQL `repeats` times (after one warm-up), per key; with
    `indexes`, also the names of the indexes each key's plans scan (filled in place); `off`:
    planner switches turned off for these runs (a steering arm's, from models.steering.ARMS).

    Every run is an EXPLAIN ANALYZE inside a READ ONLY transaction that is rolled back. A run
    cancelled by `timeout_ms` counts as `timeout_ms` (a censored time: slower than any run that
    finished, which is all a rank test needs; a median over it is a lower bound) and is counted
    in `timeouts` per key (the warm-up's aside); its plan's indexes come from a plain EXPLAIN.
    A query that always times out is still compared: an index that brings it under the limit
    is a real speedup.
    """
    out: dict[str, list[float]] = defaultdict(list)
    for round_ in range(repeats + 1):
        for key, texts in sqls.items():
            for sql in texts:
                timed = await _timed(conn, sql, timeout_ms, off)
                if timed is not None:
                    out[key].append(timed[0])
                    if indexes is not None:
                        indexes.setdefault(key, set()).update(timed[1])
                    if timed[2] and round_ and timeouts is not None:
                        timeouts[key] = timeouts.get(key, 0) + 1
    # the first round was the warm-up
    n = {k: sum(1 for _ in v) for k, v in sqls.items()}
    return {k: v[n[k] :] for k, v in out.items() if len(v) > n[k]}


def _plan_indexes(node: Mapping[str, Any]) -> set[str]:
    names = {str(node["Index Name"])} if "Index Name" in node else set()
    for child in node.get("Plans", ()):
        names |= _plan_indexes(child)
    return names


async def _explain(
    conn: Any, body: str, timeout_ms: int, off: Sequence[str], analyze: bool
) -> dict[str, Any]:
    options = "ANALYZE, TIMING OFF, FORMAT JSON" if analyze else "FORMAT JSON"
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        for switch in off:  # names from models.steering.ARMS only
            await conn.execute(f"SET LOCAL {quote_ident(switch)} = off")
        out = await conn.fetchval(f"EXPLAIN ({options}) {body}")
    doc = json.loads(out) if isinstance(out, str) else out
    return dict(doc[0])


async def _timed(
    conn: Any, sql: str, timeout_ms: int, off: Sequence[str] = ()
) -> tuple[float, set[str], bool] | None:
    """(ms, indexes the plan scans, timed out) of one run, or None if it failed otherwise."""
    body = sql.strip().rstrip(";")
    try:
        doc = await _explain(conn, body, timeout_ms, off, analyze=True)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != QUERY_CANCELED:
            return None
        try:
            plan = await _explain(conn, body, timeout_ms, off, analyze=False)
        except Exception:
            plan = {}
        return float(timeout_ms), _plan_indexes(plan.get("Plan", {})), True
    ms = float(doc.get("Execution Time", 0.0)) + float(doc.get("Planning Time", 0.0))
    return ms, _plan_indexes(doc.get("Plan", {})), False


def compare(
    before: Mapping[str, list[float]],
    after: Mapping[str, list[float]],
    calls: Mapping[str, float],
    own: Sequence[str],
    config: AdvisorConfig,
    affected: Collection[str] | None = None,
) -> dict[str, Any]:
    """Mann-Whitney U verdict: speedup over the candidate's own fingerprints, regressions.

    Significance: each own fingerprint's one-sided Mann-Whitney U (before slower than after)
    as a mid-p, turned into a z-score, combined by Stouffer's weighted Z with weights of calls
    x the median of all its runs (before and after together, so under no effect the weights
    do not depend on which runs were which). Users pay the total, and so does the test: a
    fingerprint that holds most of the time carries most of the evidence, and the cheap ones an
    index barely touches no longer dilute it, as they did when the runs were pooled into one
    rank test (a 9.5x speedup read p=0.085 on a loaded machine that way).

    Only own fingerprints whose plans scan the new index (`affected`, when given) count toward
    the speedup and its significance: one planned without it cannot have been sped up by it (a
    useless index validated once in CI when the load fell between the two measurements).

    A regression is a fingerprint significantly slower after the build, by over
    `max_regression` — among `affected` (those whose plans use the new index) when given: a
    query planned without the index cannot be slowed by it, and counting it would read a
    change in the machine's load between the two measurements as the index's fault."""
    from scipy.stats import mannwhitneyu, norm

    per: dict[str, Any] = {}
    regressions = []
    zs: list[tuple[float, float]] = []  # (weight, z) of each own fingerprint
    tb = ta = 0.0
    used = 0  # own fingerprints measured (and, with `affected`, planned with the index)
    n_calls = 0.0  # their calls
    for fp in before:
        b, a = before[fp], after.get(fp, [])
        if len(b) < 2 or len(a) < 2:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        worse = float(mannwhitneyu(a, b, alternative="greater").pvalue)
        better = float(mannwhitneyu(b, a, alternative="greater").pvalue)
        per[fp] = {"before_ms": mb, "after_ms": ma, "p_faster": better, "p_slower": worse}
        if affected is not None:
            per[fp]["uses_index"] = fp in affected
        if (
            ma > config.max_regression * mb
            and worse < config.alpha
            and (affected is None or fp in affected)
        ):
            regressions.append(fp)
        if fp in own and (affected is None or fp in affected):
            # (an own fingerprint whose plans do not scan the index cannot have been sped up by
            # it: what it reads is the machine's load moving between the two measurements)
            used += 1
            n_calls += calls.get(fp, 1.0)
            tb += calls.get(fp, 1.0) * mb
            ta += calls.get(fp, 1.0) * ma
            # mid-p: P(U > u) + P(U = u) / 2, symmetric in the two tails, never 0 or 1
            mid = min(max((better + 1.0 - worse) / 2.0, 1e-12), 1.0 - 1e-12)
            weight = calls.get(fp, 1.0) * statistics.median([*b, *a])
            zs.append((weight, float(norm.isf(mid))))
    p = math.nan
    norm2 = math.sqrt(sum(w * w for w, _ in zs))
    if norm2 > 0:
        p = float(norm.sf(sum(w * z for w, z in zs) / norm2))
    speedup = tb / ta if ta > 0 else math.nan
    n_calls = n_calls or 1.0
    keep = (
        math.isfinite(p) and p < config.alpha and speedup >= config.min_speedup and not regressions
    )
    return {
        "keep": keep,
        "own_using_index": used,
        "p_value": p,
        "speedup": speedup,
        "before_ms": tb / n_calls,
        "after_ms": ta / n_calls,
        "regressions": regressions,
        "per_fingerprint": per,
    }


# ------------------------------------------------------------------------------ applying


async def _replay_set(
    conn: Any, rec: Mapping[str, Any], config: AdvisorConfig
) -> tuple[dict[str, list[str]], dict[str, float], list[str]]:
    """Literal SELECT samples of the affected fingerprints (and the heaviest others on the
    table, to catch regressions), their call counts, and the candidate's own fingerprints."""
    detail = rec["detail"]
    own = list(
        dict.fromkeys([*detail.get("fingerprints", []), *detail.get("source_fingerprints", [])])
    )
    others = list(detail.get("whatif", {}))
    wanted = list(dict.fromkeys(own + others))
    cfg = AdvisorConfig(**{**vars(config), "max_fingerprints": 10_000})
    workload = await load_workload(conn, cfg)
    fps = [workload.fingerprints[f] for f in wanted if f in workload.fingerprints]
    fps = [f for f in fps if f.command == "SELECT" and f.samples]
    own_fps = [f for f in fps if f.id in own]
    rest = sorted((f for f in fps if f.id not in own), key=lambda f: -f.weight)
    chosen = (own_fps + rest)[: max(config.max_validate_fingerprints, len(own_fps))]
    sqls = {f.id: f.samples[: config.replay_samples] for f in chosen}
    return sqls, {f.id: float(f.calls) for f in chosen}, [f.id for f in own_fps]


async def apply_recommendation(
    conn: Any,
    rec_id: int,
    *,
    warehouse: Any | None = None,
    validate: bool = True,
    config: AdvisorConfig | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Build (or drop) the recommended index; with `validate`, keep it only if it pays."""
    cfg = config or AdvisorConfig()
    wh = warehouse if warehouse is not None else conn
    rec = await _get(conn, rec_id)
    if rec["status"] != "proposed":
        raise ValueError(f"recommendation {rec_id} is {rec['status']}, not proposed")
    if rec["op"] == "drop":
        return await _apply_drop(conn, wh, rec)
    name = rec["index_name"]
    schema = rec["table"].partition(".")[0]
    sqls: dict[str, list[str]] = {}
    calls: dict[str, float] = {}
    own: list[str] = []
    before: dict[str, list[float]] = {}
    timeouts: dict[str, dict[str, int]] = {"before": {}, "after": {}}
    if validate:
        sqls, calls, own = await _replay_set(conn, rec, cfg)
        before = await measure(
            wh, sqls, cfg.replay_repeats, cfg.statement_timeout_ms, timeouts=timeouts["before"]
        )
        progress("measure before", 1.0)
    started = time.monotonic()
    try:
        await wh.execute(rec["ddl"])
    except Exception as exc:
        await _drop_index(wh, schema, name)  # CONCURRENTLY leaves an invalid index behind
        await _event(conn, rec, "apply", "failed", {"error": f"{type(exc).__name__}: {exc}"})
        return await _get(conn, rec_id)
    size = await wh.fetchval(
        "SELECT pg_relation_size(to_regclass($1))", f"{quote_ident(schema)}.{quote_ident(name)}"
    )
    build = {"build_seconds": time.monotonic() - started, "real_size_bytes": size}
    progress("build", 1.0)
    if not validate:
        await _event(conn, rec, "apply", "applied", build)
        return await _get(conn, rec_id)
    await _event(conn, rec, "apply", "applied", build)
    if not own:
        await _drop_index(wh, schema, name)
        await _event(
            conn,
            rec,
            "validate",
            "failed",
            {"reason": "no replayable SELECT samples (log_parameters off?)"},
        )
        return await _get(conn, rec_id)
    scanned: dict[str, set[str]] = {}
    after = await measure(
        wh, sqls, cfg.replay_repeats, cfg.statement_timeout_ms, scanned, timeouts=timeouts["after"]
    )
    progress("measure after", 1.0)
    affected = {fp for fp, names in scanned.items() if name in names}
    verdict = compare(before, after, calls, own, cfg, affected)
    pins: dict[str, dict[str, Any]] = {}
    if _pinnable(verdict, cfg):
        progress("pin regressions", 0.0)
        pins = await find_pins(wh, sqls, before, verdict["regressions"], cfg, after, name)
        if len(pins) == len(verdict["regressions"]):
            verdict["keep"] = True
    validation = {k: v for k, v in verdict.items() if k != "keep"}
    validation["samples"] = {k: len(v) for k, v in sqls.items()}
    if timeouts["before"] or timeouts["after"]:  # times censored at statement_timeout_ms
        validation["timeouts"] = {**timeouts, "limit_ms": cfg.statement_timeout_ms}
    scans = await _idx_scan(wh, schema, name)
    if verdict["keep"]:
        if pins:
            await record_pins(conn, rec, pins)
            validation["pins"] = pins
        await _event(
            conn,
            rec,
            "validate",
            "validated",
            {
                "validation": validation,
                "idx_scan_at_check": scans,
                "checked_at": datetime.now(UTC).isoformat(),
            },
            verdict["before_ms"],
            verdict["after_ms"],
        )
    else:
        await _drop_index(wh, schema, name)
        why = _why_not(verdict, cfg)
        await _event(
            conn,
            rec,
            "revert",
            "reverted",
            {"validation": validation, "reason": why},
            verdict["before_ms"],
            verdict["after_ms"],
        )
    return await _get(conn, rec_id)


def _pinnable(verdict: Mapping[str, Any], cfg: AdvisorConfig) -> bool:
    """Only the regressions stand between the index and a keep, and there are few of them."""
    n = len(verdict["regressions"])
    return (
        0 < n <= cfg.max_pins
        and verdict["p_value"] < cfg.alpha
        and verdict["speedup"] >= cfg.min_speedup
    )


async def find_pins(
    wh: Any,
    sqls: Mapping[str, Sequence[str]],
    before: Mapping[str, list[float]],
    regressions: Sequence[str],
    cfg: AdvisorConfig,
    after: Mapping[str, list[float]] | None = None,
    index: str | None = None,
) -> dict[str, dict[str, Any]]:
    """For each regressed fingerprint, the fastest steering arm (hint set) that gives it back its
    old plan with the new index in place: a plan that does not scan `index`, and times back to
    before the index (within `max_regression`, or not significantly slower: Mann-Whitney U) or
    significantly faster than the regressed runs just measured (`after`) — the machine's load
    moves between measurements, so the old plan is the criterion and the times confirm it."""
    from scipy.stats import mannwhitneyu

    from .steering import ARMS, STOCK

    pins: dict[str, dict[str, Any]] = {}
    for fp in regressions:
        base = statistics.median(before[fp])
        best: tuple[float, str, list[float]] | None = None
        for arm, off in ARMS.items():
            if arm == STOCK:
                continue
            scanned: dict[str, set[str]] = {}
            cut: dict[str, int] = {}
            got = await measure(wh, {fp: sqls[fp]}, cfg.replay_repeats, cfg.statement_timeout_ms,
                                scanned, off=off, timeouts=cut)  # fmt: skip
            times = got.get(fp, [])
            if index is not None and index in scanned.get(fp, set()):
                continue  # still the plan the index brought
            if times and cut.get(fp, 0) >= len(times):
                continue  # never finished: tied with censored before-runs, it proves nothing
            if len(times) >= 2 and (best is None or statistics.median(times) < best[0]):
                best = (statistics.median(times), arm, times)
        if best is None:
            continue
        slower = float(mannwhitneyu(best[2], before[fp], alternative="greater").pvalue)
        faster = math.nan
        if after is not None and len(after.get(fp, [])) >= 2:
            faster = float(mannwhitneyu(best[2], after[fp], alternative="less").pvalue)
        if best[0] <= cfg.max_regression * base or slower >= cfg.alpha or faster < cfg.alpha:
            pins[fp] = {"arm": best[1], "before_ms": base, "pinned_ms": best[0],
                        "p_slower_than_before": slower,
                        "p_faster_than_regressed": faster}  # fmt: skip
    return pins


async def record_pins(
    conn: Any, rec: Mapping[str, Any], pins: Mapping[str, Mapping[str, Any]]
) -> None:
    """Pin each fingerprint's arm for the proxy's plan steering (it reads the active pins)."""
    from .steering import ARMS

    for fp, pin in pins.items():
        detail = {
            "arm": pin["arm"],
            "settings_off": list(ARMS[pin["arm"]]),
            "reason": f"index {rec['index_name']} made it slower; this hint set restores it",
            "index": rec["index_name"],
            "recommendation_id": rec["id"],
        }
        await conn.execute(
            "INSERT INTO metadata.optimization_history (kind, target, action, status, detail,"
            " measured_before_ms, measured_after_ms)"
            " VALUES ('steering', $1, 'pin', 'active', $2::jsonb, $3, $4)",
            fp,
            _dumps(_clean(detail)),
            _finite(pin["before_ms"]),
            _finite(pin["pinned_ms"]),
        )


async def release_pins(conn: Any, recommendation_id: int, why: str) -> int:
    """The index is gone: its pins are withdrawn (the proxy stops applying them)."""
    result = await conn.execute(
        "UPDATE metadata.optimization_history SET status = 'withdrawn',"
        " detail = detail || jsonb_build_object('withdrawn_because', $2::text)"
        " WHERE kind = 'steering' AND action = 'pin' AND status = 'active'"
        " AND (detail->>'recommendation_id')::bigint = $1",
        recommendation_id,
        why,
    )
    return int(result.split()[-1])


async def active_pins(conn: Any) -> dict[str, str]:
    """{fingerprint: arm} of the active pins (the newest per fingerprint)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (target) target, detail->>'arm' AS arm"
        " FROM metadata.optimization_history"
        " WHERE kind = 'steering' AND action = 'pin' AND status = 'active'"
        " ORDER BY target, id DESC"
    )
    return {r["target"]: r["arm"] for r in rows}


def _why_not(verdict: Mapping[str, Any], cfg: AdvisorConfig) -> str:
    if verdict["regressions"]:
        return (
            f"{len(verdict['regressions'])} fingerprint(s) slower by over"
            f" {round((cfg.max_regression - 1) * 100)}%"
            + (" and no hint set restores them" if _pinnable(verdict, cfg) else "")
        )
    if verdict.get("own_using_index") == 0:
        return "no replayed plan of its fingerprints uses the index"
    if not (verdict["p_value"] < cfg.alpha):
        return f"speedup not significant (Mann-Whitney p={verdict['p_value']:.3g})"
    return f"speedup {verdict['speedup']:.2f}x below {cfg.min_speedup}x"


async def _drop_index(wh: Any, schema: str, name: str) -> None:
    await wh.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quote_ident(schema)}.{quote_ident(name)}")


async def _idx_scan(wh: Any, schema: str, name: str) -> int | None:
    # this connection's own scans (the validation's replays) reach the shared statistics only
    # when the backend flushes them; PostgreSQL 15 flushes at its next idle moment on request
    with contextlib.suppress(Exception):
        await wh.execute("SELECT pg_stat_force_next_flush()")
    v = await wh.fetchval(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE schemaname = $1 AND indexrelname = $2",
        schema,
        name,
    )
    return None if v is None else int(v)


async def _apply_drop(conn: Any, wh: Any, rec: Mapping[str, Any]) -> dict[str, Any]:
    d = rec["detail"]
    schema, name = d["schema"], d["index_name"]
    if await _protected(wh, schema, name):
        await _event(conn, rec, "apply", "rejected", {"reason": "index backs a constraint"})
        return await _get(conn, rec["id"])
    await _drop_index(wh, schema, name)
    await _event(conn, rec, "apply", "applied", {"dropped": f"{schema}.{name}"})
    return await _get(conn, rec["id"])


async def _protected(wh: Any, schema: str, name: str) -> bool:
    """Primary keys, unique indexes and indexes backing a constraint are never dropped."""
    v = await wh.fetchval(
        """
        SELECT i.indisprimary OR i.indisunique OR i.indisexclusion
               OR EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = ic.relnamespace
        WHERE n.nspname = $1 AND ic.relname = $2
        """,
        schema,
        name,
    )
    return v is None or bool(v)


# ------------------------------------------------------------------------------ automatic mode


async def recheck(
    conn: Any,
    *,
    warehouse: Any | None = None,
    config: AdvisorConfig | None = None,
    auto_apply: bool = False,
) -> dict[str, Any]:
    """Drop applied indexes whose benefit disappeared; propose dropping unused indexes.

    An index the advisor applied lost its benefit when it was not scanned since the previous
    check, or none of its fingerprints ran in the workload window. Unused indexes: no scan in
    pg_stat_user_indexes while the statistics are older than `unused_days` (or no growth across
    `metadata.index_usage_stats` samples that old).
    """
    cfg = config or AdvisorConfig()
    wh = warehouse if warehouse is not None else conn
    dropped: list[int] = []
    kept: list[int] = []
    workload = await load_workload(conn, cfg)
    ours: set[tuple[str, str]] = set()
    for rec in await list_recommendations(conn):
        if rec["op"] != "create" or rec["status"] not in ("applied", "validated"):
            continue
        schema = rec["table"].partition(".")[0]
        ours.add((schema, rec["index_name"]))
        scans = await _idx_scan(wh, schema, rec["index_name"])
        last = rec["detail"].get("idx_scan_at_check")
        active = any(fp in workload.fingerprints for fp in rec["fingerprints"])
        if scans is None:
            await _event(conn, rec, "revert", "reverted", {"reason": "index no longer exists"})
            dropped.append(rec["id"])
        elif (last is not None and scans <= last) or not active:
            await _drop_index(wh, schema, rec["index_name"])
            why = "not scanned since the last check" if active else "fingerprints left the workload"
            await _event(conn, rec, "revert", "reverted", {"reason": f"benefit gone: {why}"})
            dropped.append(rec["id"])
        else:
            await _event(
                conn,
                rec,
                "validate",
                rec["status"],
                {"idx_scan_at_check": scans, "checked_at": datetime.now(UTC).isoformat()},
            )
            kept.append(rec["id"])
    proposed = await propose_unused_drops(conn, wh, cfg, exclude=ours)
    applied: list[int] = []
    if auto_apply:
        for rec in await list_recommendations(conn):
            if rec["op"] == "create" and rec["status"] == "proposed":
                done = await apply_recommendation(conn, rec["id"], warehouse=wh, config=cfg)
                applied.append(done["id"])
    return {"kept": kept, "dropped": dropped, "proposed_drops": proposed, "applied": applied}


async def unused_indexes(wh: Any, days: float) -> list[dict[str, Any]]:
    """Indexes with no scan for `days` that back no constraint (never PK/unique/exclusion)."""
    rows = await wh.fetch(
        """
        SELECT s.schemaname, s.relname, s.indexrelname, s.idx_scan,
               pg_relation_size(s.indexrelid) AS size
        FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
        WHERE s.idx_scan = 0 AND NOT i.indisprimary AND NOT i.indisunique
          AND NOT i.indisexclusion
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
          AND s.schemaname NOT IN ('metadata', 'ml')
          AND coalesce((SELECT stats_reset FROM pg_stat_database
                        WHERE datname = current_database()), '-infinity')
              < now() - make_interval(secs => $1)
          AND coalesce((SELECT min(u.sampled_at) FROM metadata.index_usage_stats u
                        WHERE u.schema_name = s.schemaname AND u.index_name = s.indexrelname),
                       '-infinity') < now() - make_interval(secs => $1)
        """,
        days * 86400.0,
    )
    return [dict(r) for r in rows]


async def propose_unused_drops(
    conn: Any,
    wh: Any,
    cfg: AdvisorConfig,
    exclude: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
) -> list[int]:
    ids = []
    try:
        found = await unused_indexes(wh, cfg.unused_days)
    except Exception:  # no metadata.index_usage_stats in the warehouse database
        found = await unused_indexes_plain(wh, cfg.unused_days)
    for ix in found:
        if (ix["schemaname"], ix["indexrelname"]) in exclude:
            continue
        key = f"drop:{ix['schemaname']}.{ix['indexrelname']}"
        detail = {
            "op": "drop",
            "key": key,
            "schema": ix["schemaname"],
            "index_name": ix["indexrelname"],
            "label": f"DROP {ix['schemaname']}.{ix['indexrelname']}",
            "ddl": f"DROP INDEX CONCURRENTLY IF EXISTS {quote_ident(ix['schemaname'])}."
            f"{quote_ident(ix['indexrelname'])}",
            "size_bytes": int(ix["size"]),
            "reason": f"no scans for {cfg.unused_days:g} days",
            "candidate": {"table": f"{ix['schemaname']}.{ix['relname']}", "columns": []},
        }
        rec = await _record(conn, detail)
        ids.append(rec["id"])
    return ids


async def unused_indexes_plain(wh: Any, days: float) -> list[dict[str, Any]]:
    rows = await wh.fetch(
        """
        SELECT s.schemaname, s.relname, s.indexrelname, s.idx_scan,
               pg_relation_size(s.indexrelid) AS size
        FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
        WHERE s.idx_scan = 0 AND NOT i.indisprimary AND NOT i.indisunique
          AND NOT i.indisexclusion
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
          AND coalesce((SELECT stats_reset FROM pg_stat_database
                        WHERE datname = current_database()), '-infinity')
              < now() - make_interval(secs => $1)
        """,
        days * 86400.0,
    )
    return [dict(r) for r in rows]


async def _active_ranker(conn: Any) -> Any | None:
    try:
        from .advisor_rank import load_active_ranker

        return await load_active_ranker(conn)
    except Exception:
        return None


__all__ = [
    "AdviceReport",
    "AdvisorConfig",
    "advise",
    "apply_recommendation",
    "list_recommendations",
    "recheck",
    "reject_recommendation",
]
