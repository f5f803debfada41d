"""/api/v1 metrics (current, queries, models, optimisation, the SSE stream), the optimiser's
settings and A/B state, and the warehouse jobs (generate data, run the ETL)."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..metadata import dsn_of
from .common import Context, errors, invalid, jsonable, not_configured, setting_problem
from .jobs import JobFailed, JobRunning, json_output, last_line, run_child
from .snapshot import Snapshots

OPTIMISER_PREFIXES = ("cache_", "admission_", "steering_", "advisor_")
WAREHOUSE_JOBS = ("generate-data", "run-etl")
JOB_TIMEOUT = 3600.0

STAT_FIELDS = (
    "fingerprint", "normalized", "command", "calls", "total_time", "mean_time", "min_time",
    "max_time", "stddev_time", "p95_time", "rows", "errors",
)  # fmt: skip

ACTIVE_MODELS_SQL = """
SELECT model_name, version, status, activated_at, created_at, row_count, metrics
FROM ml.model_registry WHERE is_active ORDER BY model_name
"""
OPTIMIZATION_COUNTS_SQL = """
SELECT kind, status, count(*) AS count,
    avg(measured_before_ms) AS mean_before_ms, avg(measured_after_ms) AS mean_after_ms,
    max(created_at) AS last_at
FROM metadata.optimization_history
WHERE $1::timestamptz IS NULL OR created_at >= $1
GROUP BY kind, status ORDER BY kind, status
"""


class SettingChange(BaseModel):
    key: str = Field(min_length=1, max_length=100)
    value: str | int | float | bool | list[str]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def add_live_routes(api: APIRouter, ctx: Context) -> None:
    service = ctx.service
    snapshots = Snapshots(service)

    # ------------------------------------------------------------------ metrics

    @api.get("/metrics/current", tags=["metrics"])
    async def metrics_current() -> dict[str, Any]:
        """QPS, errors and latency p50/p95 over the last minute, clients, cache, lanes."""
        return jsonable(snapshots.take())

    @api.get("/metrics/stream", tags=["metrics"])
    async def metrics_stream(
        request: Request,
        interval: float = Query(1.0, ge=0.1, le=60),
        count: int | None = Query(None, ge=1, le=1_000_000),
    ) -> StreamingResponse:
        """Server-Sent Events: `event: metrics` with the /metrics/current snapshot every
        `interval` seconds (`count` events, or until the client goes away)."""

        async def events() -> AsyncIterator[str]:
            sent = 0
            while count is None or sent < count:
                if await request.is_disconnected():
                    return
                body = json.dumps(jsonable(snapshots.take()), default=str)
                sent += 1
                yield f"id: {sent}\nevent: metrics\ndata: {body}\n\n"
                if count is None or sent < count:
                    await asyncio.sleep(interval)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/metrics/queries", tags=["metrics"])
    async def metrics_queries(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """Per-fingerprint statistics, by total time (seconds)."""
        items = [{f: _finite(getattr(s, f, None)) for f in STAT_FIELDS}
                 for s in service.query_stats(limit)]  # fmt: skip
        return {"items": items, "time_unit": "seconds"}

    @api.get("/metrics/models", tags=["metrics"])
    async def metrics_models() -> dict[str, Any]:
        """Active model versions with their offline metrics, and the online counters."""
        async with ctx.connection() as conn:
            rows = await conn.fetch(ACTIVE_MODELS_SQL)
        runs: list[dict[str, Any]] = []
        for fam in service.retrainer.runs.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    runs.append({**s.labels, "count": s.value})
        gauge = service.metrics.cost_prediction_qerror._value.get()
        return jsonable({
            "active": [dict(r) for r in rows],
            "cost_prediction_qerror": gauge if gauge > 0 else None,
            "training_runs": runs,
        })  # fmt: skip

    @api.get("/metrics/optimization", tags=["metrics"])
    async def metrics_optimization(since: datetime | None = None) -> dict[str, Any]:
        """Counts of metadata.optimization_history by kind and status."""
        if since is not None and since.tzinfo is None:
            raise invalid(("query", "since"), "give a time zone (e.g. 2024-01-01T00:00:00Z)")
        async with ctx.connection() as conn:
            rows = await conn.fetch(OPTIMIZATION_COUNTS_SQL, since)
        items = [dict(r) for r in rows]
        totals: dict[str, int] = {}
        for r in items:
            totals[r["kind"]] = totals.get(r["kind"], 0) + int(r["count"])
        return jsonable({"items": items, "by_kind": totals})

    # ------------------------------------------------------------------ optimisation

    def optimiser_items() -> list[dict[str, Any]]:
        return [
            {"key": k, "value": v, "default": d, "reloadable": r}
            for k, v, d, r in service.config_items()
            if k.startswith(OPTIMISER_PREFIXES)
        ]

    @api.get("/optimization/settings", tags=["optimization"])
    async def optimization_settings() -> dict[str, Any]:
        """The optimisers' settings (cache_*, admission_*, steering_*, advisor_*)."""
        return {"items": optimiser_items()}

    @api.put("/optimization/settings", tags=["optimization"])
    async def set_optimization_setting(change: SettingChange) -> dict[str, Any]:
        """Change one reloadable optimiser setting at run time (as SET in the console)."""
        if not change.key.startswith(OPTIMISER_PREFIXES):
            raise invalid(
                ("body", "key"),
                f"{change.key!r} is not an optimiser setting (prefixes: "
                f"{', '.join(OPTIMISER_PREFIXES)}); use /api/v1/admin/config",
            )
        value: Any = change.value
        if isinstance(value, bool):
            value = str(value).lower()
        elif not isinstance(value, list):
            value = str(value)
        problem = service.set_setting(change.key, value)
        if problem is not None:
            raise setting_problem(problem)
        shown = next(i for i in optimiser_items() if i["key"] == change.key)
        return {**shown, "applied": True}

    @api.get("/optimization/ab", tags=["optimization"], responses=errors(404))
    async def optimization_ab(limit: int = Query(100, ge=1, le=5000)) -> dict[str, Any]:
        """Plan steering's A/B state per template: arms, holdout and arm medians, p-value."""
        steering = service.proxy.steering
        if steering is None:
            raise not_configured("plan steering is off (set steering_enabled = true)")
        # the U test needs scipy: import it off the loop; the state itself is read on the loop
        await asyncio.to_thread(importlib.import_module, "scipy.stats")
        rows = ab_rows(steering, limit)
        return {
            "active": bool(service.settings.steering_active),
            "dry_run": bool(service.settings.steering_dry_run),
            "holdout_share": service.settings.steering_holdout,
            "decisions": steering.decisions,
            "applied": steering.applied,
            "templates": jsonable(rows),
        }

    # ------------------------------------------------------------------ warehouse jobs

    def started(job: Any) -> JSONResponse:
        return JSONResponse(
            {"job_id": job.id, "kind": job.kind, "status": job.status,
             "status_url": f"/api/v1/admin/jobs/{job.id}"},
            status_code=202,
        )  # fmt: skip

    def database() -> str:
        return str(ctx.warehouse_args().get("database") or service.settings.warehouse_database)

    @api.post("/admin/generate-data", tags=["admin"], status_code=202, responses=errors(409))
    async def generate_data(batch: int | None = Query(None, ge=1, le=100_000)) -> JSONResponse:
        """Land one more increment of sales in bronze (the next batch, or `batch`), in a child
        process (bench.warehouse); run the ETL afterwards to take it to silver and gold."""
        args = ["-m", "proxy.api.worker", "generate-data", dsn_of(ctx.warehouse_args())]
        if batch is not None:
            args += ["--batch", str(batch)]

        async def work() -> Any:
            code, out, err = await run_child(args, JOB_TIMEOUT)
            result = json_output(out)
            if code != 0 or not isinstance(result, dict):
                raise JobFailed(last_line(err))
            return result

        try:
            return started(ctx.jobs.start("generate-data", database(), work))
        except JobRunning as exc:
            raise HTTPException(409, str(exc)) from None

    @api.post("/admin/run-etl", tags=["admin"], status_code=202, responses=errors(409))
    async def run_etl() -> JSONResponse:
        """One incremental ETL run (bronze -> silver -> gold) on pgsage's own connection."""
        from warehouse_sql import apply_migrations
        from warehouse_sql.etl import run_etl as etl

        async def work() -> Any:
            async with ctx.connection(warehouse=True) as conn:
                await apply_migrations(conn)
                summary = await etl(conn)
            return jsonable(summary.as_dict())

        try:
            return started(ctx.jobs.start("run-etl", database(), work))
        except JobRunning as exc:
            raise HTTPException(409, str(exc)) from None

    @api.get("/admin/jobs", tags=["admin"])
    async def admin_jobs() -> dict[str, Any]:
        """Warehouse jobs (generate-data, run-etl), newest first."""
        return {"jobs": [j.as_dict() for j in ctx.jobs.list(WAREHOUSE_JOBS)]}

    @api.get("/admin/jobs/{job_id}", tags=["admin"], responses=errors(404))
    async def admin_job(job_id: int = Path(ge=1, le=2**63 - 1)) -> dict[str, Any]:
        job = ctx.jobs.get(job_id)
        if job is None or job.kind not in WAREHOUSE_JOBS:
            raise HTTPException(404, f"no warehouse job {job_id}")
        return job.as_dict()


def ab_rows(steering: Any, limit: int) -> list[dict[str, Any]]:
    """One row per template past its first stock runs (as SHOW STEERING), with the A/B
    numbers: the chosen arm's and the holdout's median ms and a one-sided Mann-Whitney U."""
    from models.steering import STOCK, mann_whitney

    out = []
    min_pulls = steering.policy.min_pulls
    for key, st in list(steering.states.items()):
        stock = st.arms[STOCK]
        if stock.n < min_pulls:
            continue
        arm = st.converged
        treated = list(st.samples.get(arm, [])) if arm else []
        control = list(st.holdout)
        p_value = ratio = None
        if arm and arm != STOCK and len(treated) >= 3 and len(control) >= 3:
            p_value, ratio = mann_whitney(treated, control)
        status = (
            "withdrawn" if st.withdrawn
            else "validated" if key in steering.validated
            else f"converged:{arm}" if arm
            else "exploring" if st.decisions else "watching"
        )  # fmt: skip
        out.append({
            "fingerprint": st.fingerprint,
            "template": key[:500],
            "status": status,
            "converged_arm": arm,
            "arms": {a: {"mean_ms": round(math.exp(v.mean), 3), "n": v.n}
                     for a, v in st.arms.items() if v.n},
            "retired": sorted(st.retired),
            "decisions": st.decisions,
            "n_arm": len(treated),
            "n_holdout": len(control),
            "arm_median_ms": _median(treated),
            "holdout_median_ms": _median(control),
            "median_ratio": ratio,
            "p_value": p_value,
        })  # fmt: skip
    out.sort(key=lambda r: -(r["decisions"] + r["n_holdout"]))
    return out[:limit]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
