"""The /api/v1 routes: query history, statistics and EXPLAIN, metrics history, models, admin.

Every SQL statement here is a constant with `$n` parameters; filters that are not given are
passed as NULL and switched off inside the statement, so no request text ever becomes SQL (the
one exception is EXPLAIN of a SELECT text, checked by PostgreSQL's parser first: explain.py).
The ML, live-metrics, optimiser-settings and warehouse-job routes live in ml.py and live.py.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from .auth import make_auth
from .common import Context, errors, invalid, jsonable, setting_problem
from .explain import explain_checked
from .guard import preflight, route_class
from .live import add_live_routes
from .ml import add_ml_routes

MAX_BUCKETS = 10_000
#: PostgreSQL text cannot hold NUL: say so in the schema (guard.py answers 422 for it)
NO_NUL = r"^[^\x00]*$"
BIGINT_MAX = 2**63 - 1
STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}

# Parts of the API that land with later components answer a clear 404 until they do
# (prefix -> message). Everything the seed lays out is built now.
NOT_BUILT: dict[str, str] = {}

_LOG_COLUMNS = """query_id, started_at, finished_at, duration_ms, fingerprint, normalized_text,
    command, is_catalog, tables_used, database_name, user_name, application_name, protocol,
    rows_returned, status, sqlstate, predicted_cost_ms, model_version, label"""

QUERIES_SQL = f"""
SELECT {_LOG_COLUMNS}
FROM metadata.query_logs
WHERE ($1::timestamptz IS NULL OR started_at >= $1)
  AND ($2::timestamptz IS NULL OR started_at < $2)
  AND ($3::float8 IS NULL OR duration_ms >= $3)
  AND ($4::text IS NULL OR command = upper($4))
  AND ($5::text IS NULL OR status = $5)
  AND ($6::text IS NULL OR $6 = ANY (tables_used))
  AND ($7::text IS NULL OR strpos(lower(normalized_text), lower($7)) > 0)
ORDER BY started_at DESC, query_id DESC
LIMIT $8 OFFSET $9
"""  # a constant: only the column list is interpolated, at import time

QUERY_SQL = f"""
SELECT {_LOG_COLUMNS}, query_text, error_message, client_addr, statement_name, bytes_sent,
    session_id, transaction_status, portal_suspensions, hint_set, rewrite_rule, cache_hit
FROM metadata.query_logs WHERE query_id = $1
"""

METRICS_HISTORY_SQL = """
SELECT date_trunc($1, sampled_at) AS bucket, count(*) AS samples,
    avg(cpu_percent) AS cpu_percent, avg(memory_percent) AS memory_percent,
    max(memory_used_bytes) AS memory_used_bytes, avg(cache_hit_ratio) AS cache_hit_ratio,
    avg(backends_active) AS backends_active, max(proxy_clients) AS proxy_clients,
    avg(proxy_queries_per_second) AS proxy_queries_per_second
FROM metadata.system_metrics
WHERE sampled_at >= $2 AND sampled_at < $3
GROUP BY 1 ORDER BY 1
"""

QUERY_COUNTS_SQL = """
SELECT date_trunc($1, started_at) AS bucket, count(*) AS queries,
    count(*) FILTER (WHERE status <> 'ok') AS errors,
    avg(duration_ms) AS mean_ms,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms
FROM metadata.query_logs
WHERE started_at >= $2 AND started_at < $3 AND NOT is_catalog
GROUP BY 1 ORDER BY 1
"""

_MODEL_COLUMNS = """model_name, version, model_id, status, is_active, created_at, activated_at,
    training_start, training_end, row_count, reason, metrics, params"""
MODELS_SQL = f"""
SELECT DISTINCT ON (model_name) {_MODEL_COLUMNS}
FROM ml.model_registry
ORDER BY model_name, is_active DESC, version DESC
"""
MODEL_SQL = f"""
SELECT {_MODEL_COLUMNS}, artifact_path, features, data_snapshot
FROM ml.model_registry WHERE model_name = $1 ORDER BY version DESC
"""

STAT_FIELDS = (
    "fingerprint", "normalized", "command", "calls", "total_time", "mean_time", "min_time",
    "max_time", "stddev_time", "p95_time", "rows", "errors",
)  # fmt: skip


class ExplainRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)


class ConfigChange(BaseModel):
    key: str = Field(min_length=1, max_length=100)
    value: str | int | float | bool


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / Infinity (an unseen min_time is +inf)
    return value


def make_router(service: Any) -> APIRouter:
    """The /api/v1 router for a running `proxy.service.Service` (mount with prefix="/api/v1").

    Every handler is `async def`: it runs on the proxy's event loop, never in a worker thread,
    because the service's state (clients, transports, stats) belongs to that loop.
    """
    ctx = Context(service)
    service.api_jobs = ctx.jobs  # the service cancels them when it stops
    api_route = route_class(service.settings, ctx.limiter)
    router = APIRouter(route_class=api_route)
    api = APIRouter(
        route_class=api_route,
        dependencies=[Depends(make_auth(service.settings))],
        responses=errors(401, 429, 503),
    )
    connection = ctx.connection

    @router.options("/{rest:path}", include_in_schema=False)
    async def cors_preflight(rest: str, request: Request) -> Response:
        return preflight(service.settings, request)

    # ------------------------------------------------------------------ queries

    @api.get("/queries", tags=["queries"])
    async def list_queries(
        start: datetime | None = None,
        end: datetime | None = None,
        min_duration_ms: float | None = Query(None, ge=0),
        command: str | None = Query(None, pattern=r"^[A-Za-z_ ]{1,32}$"),
        status: Literal["ok", "error", "cancelled"] | None = None,
        table: str | None = Query(None, max_length=200, pattern=NO_NUL),
        q: str | None = Query(None, min_length=1, max_length=1000, pattern=NO_NUL),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10_000_000),
    ) -> dict[str, Any]:
        async with connection() as conn:
            rows = await conn.fetch(
                QUERIES_SQL, _aware(start), _aware(end), min_duration_ms, command, status,
                table, q, limit, offset,
            )  # fmt: skip
        items = [dict(r) for r in rows]
        return {
            "items": items,
            "limit": limit,
            "offset": offset,
            "next_offset": offset + limit if len(items) == limit else None,
        }

    @api.get("/queries/stats", tags=["queries"])
    async def query_stats(
        limit: int = Query(20, ge=1, le=1000), include_catalog: bool = False
    ) -> dict[str, Any]:
        top = service.recorder.stats.top(limit, include_catalog=include_catalog)
        items = [{f: _number(getattr(s, f, None)) for f in STAT_FIELDS} for s in top]
        return {"items": items, "time_unit": "seconds"}

    @api.get("/queries/explain", tags=["queries"], responses=errors(404, 409, 504))
    async def explain_logged(query_id: int = Query(ge=1, le=BIGINT_MAX)) -> dict[str, Any]:
        """EXPLAIN (FORMAT JSON, never ANALYZE) of a logged SELECT, on pgsage's own warehouse
        connection with a statement_timeout. Needs the text with its values: log_parameters."""
        async with connection() as conn:
            row = await conn.fetchrow(
                "SELECT query_text, normalized_text, command FROM metadata.query_logs"
                " WHERE query_id = $1",
                query_id,
            )
        if row is None:
            raise HTTPException(404, f"no query with query_id {query_id}")
        if row["query_text"] is None:
            raise HTTPException(
                409,
                f"query {query_id} was logged without its text (log_parameters is off, so only"
                " the normalised text with $n placeholders is kept); set log_parameters = true"
                " to explain logged queries, or POST the SQL to /api/v1/queries/explain",
            )
        found = await explain_checked(ctx, row["query_text"], ("query", "query_id"))
        return {"query_id": query_id, "sql": row["query_text"], **found}

    @api.post("/queries/explain", tags=["queries"], responses=errors(504))
    async def explain_text(req: ExplainRequest) -> dict[str, Any]:
        """EXPLAIN (FORMAT JSON, never ANALYZE) of one SELECT text on the warehouse."""
        return {"sql": req.sql, **await explain_checked(ctx, req.sql, ("body", "sql"))}

    @api.get("/queries/{query_id}", tags=["queries"], responses=errors(404))
    async def one_query(query_id: int = Path(ge=1, le=BIGINT_MAX)) -> dict[str, Any]:
        async with connection() as conn:
            row = await conn.fetchrow(QUERY_SQL, query_id)
        if row is None:
            raise HTTPException(404, f"no query with query_id {query_id}")
        return dict(row)

    # ------------------------------------------------------------------ metrics

    @api.get("/metrics/history", tags=["metrics"])
    async def metrics_history(
        start: datetime | None = None,
        end: datetime | None = None,
        granularity: Literal["minute", "hour", "day"] = "minute",
    ) -> dict[str, Any]:
        end_at = _aware(end) or datetime.now(UTC)
        start_at = _aware(start) or end_at - timedelta(hours=1)
        if start_at >= end_at:
            raise invalid(("query", "start"), "start must be before end")
        if (end_at - start_at) / STEP[granularity] > MAX_BUCKETS:
            raise invalid(
                ("query", "granularity"),
                f"too many {granularity} buckets (at most {MAX_BUCKETS}); widen granularity",
            )
        async with connection() as conn:
            system = await conn.fetch(METRICS_HISTORY_SQL, granularity, start_at, end_at)
            queries = await conn.fetch(QUERY_COUNTS_SQL, granularity, start_at, end_at)
        return {
            "start": start_at,
            "end": end_at,
            "granularity": granularity,
            "system": [dict(r) for r in system],
            "queries": [dict(r) for r in queries],
        }

    # ------------------------------------------------------------------ models

    @api.get("/ml/models", tags=["ml"])
    async def list_models() -> dict[str, Any]:
        async with connection() as conn:
            rows = await conn.fetch(MODELS_SQL)
        return {"items": [dict(r) for r in rows]}

    @api.get("/ml/models/{name}", tags=["ml"], responses=errors(404))
    async def model_detail(name: str = Path(pattern=NO_NUL, max_length=200)) -> dict[str, Any]:
        async with connection() as conn:
            rows = await conn.fetch(MODEL_SQL, name)
        if not rows:
            raise HTTPException(404, f"no model named {name!r} in ml.model_registry")
        versions = [dict(r) for r in rows]
        active = next((v for v in versions if v["is_active"]), None)
        return {"model_name": name, "active": active, "versions": versions}

    # ------------------------------------------------------------------ admin

    @api.get("/admin/status", tags=["admin"])
    async def admin_status() -> dict[str, Any]:
        recorder = service.recorder
        return {
            "version": __version__,
            "ready": service.readiness(),
            "paused": bool(service.proxy.paused),
            "clients": len(service.client_sessions()),
            "queries_logged": getattr(recorder, "executed", None),
            "log_dropped": dict(getattr(recorder, "dropped", {}) or {}),
            "databases": service.database_stats(),
        }

    @api.get("/admin/config", tags=["admin"])
    async def admin_config() -> dict[str, Any]:
        items = [
            {"key": k, "value": v, "default": d, "reloadable": r}
            for k, v, d, r in service.config_items()
        ]
        return {"items": items}

    @api.put("/admin/config", tags=["admin"])
    async def admin_set_config(change: ConfigChange) -> dict[str, Any]:
        value = change.value
        text = str(value).lower() if isinstance(value, bool) else str(value)
        problem = service.set_setting(change.key, text)
        if problem is not None:
            raise setting_problem(problem)
        shown = next((v for k, v, _d, _r in service.config_items() if k == change.key), text)
        return {"key": change.key, "value": shown, "applied": True}

    # ------------------------------------------------------------------ optimisation

    @api.get("/optimization/recommendations", tags=["optimization"])
    async def recommendations(
        include_closed: bool = False, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        recs = await service.optimiser.recommendations(include_closed=include_closed)
        return {"recommendations": [_jsonable(r) for r in recs[:limit]]}

    @api.post(
        "/optimization/recommendations/{rec_id}/apply", tags=["optimization"], responses=errors(404)
    )
    async def apply_recommendation(
        rec_id: int = Path(ge=1, le=BIGINT_MAX), validate: bool = True
    ) -> dict[str, Any]:
        try:
            return _jsonable(await service.optimiser.apply(rec_id, validate=validate))
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None

    @api.post(
        "/optimization/recommendations/{rec_id}/reject",
        tags=["optimization"],
        responses=errors(404),
    )
    async def reject_recommendation(rec_id: int = Path(ge=1, le=BIGINT_MAX)) -> dict[str, Any]:
        try:
            return _jsonable(await service.optimiser.reject(rec_id))
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None

    @api.post("/ml/recommend", tags=["ml"])
    async def recommend_indexes() -> dict[str, Any]:
        """Run the index advisor on the logged workload now (what-if only, nothing is built)."""
        return {"recommendations": [_jsonable(r) for r in await service.optimiser.advise()]}

    @api.get("/optimization/history", tags=["optimization"])
    async def optimization_history(
        kind: str | None = Query(None, max_length=40, pattern=NO_NUL),
        limit: int = Query(100, ge=1, le=5000),
    ) -> dict[str, Any]:
        rows = await service.optimiser.history(kind, limit)
        return {"history": [_jsonable(r) for r in rows]}

    @api.get("/ml/forecast", tags=["ml"])
    async def forecast(
        cluster: str | None = Query(None, max_length=20, pattern=NO_NUL),
    ) -> dict[str, Any]:
        """The newest forecast of the active model: arrivals per 5-minute window, 6 h ahead."""
        rows = await service.optimiser.forecast()
        if cluster is not None:
            rows = [r for r in rows if r["cluster"] == cluster]
        return {"forecast": [_jsonable(r) for r in rows]}

    @api.get("/ml/clusters", tags=["ml"])
    async def clusters() -> dict[str, Any]:
        return {"clusters": [_jsonable(c) for c in await service.optimiser.clusters()]}

    @api.get("/ml/anomalies", tags=["ml"])
    async def anomalies(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """Anomaly incidents detected by the query log worker, newest first."""
        return {"anomalies": [_jsonable(a) for a in await service.optimiser.anomalies(limit)]}

    @api.post("/ml/anomalies/{incident_id}/ack", tags=["ml"], responses=errors(404))
    async def ack_anomaly(incident_id: int = Path(ge=1, le=BIGINT_MAX)) -> dict[str, Any]:
        if not await service.optimiser.ack_anomaly(incident_id):
            raise HTTPException(404, f"no anomaly incident {incident_id}")
        return {"incident_id": incident_id, "acknowledged": True}

    @api.get("/admin/lanes", tags=["admin"], responses=errors(404))
    async def admin_lanes() -> dict[str, Any]:
        lanes = service.admission_lanes()
        if lanes is None:
            raise HTTPException(404, "not configured: admission control is off")
        return dict(lanes)

    @api.get("/admin/cache", tags=["admin"], responses=errors(404))
    async def admin_cache() -> dict[str, Any]:
        stats = service.cache_stats()
        if stats is None:
            raise HTTPException(404, "not configured: the result cache is off (cache_enabled)")
        return stats

    @api.post("/admin/clear-cache", tags=["admin"], responses=errors(404))
    async def admin_clear_cache() -> dict[str, Any]:
        dropped = await service.clear_cache()
        if dropped is None:
            raise HTTPException(404, "not configured: the result cache is off (cache_enabled)")
        return {"cleared": True, "entries_dropped": dropped}

    add_ml_routes(api, ctx)
    add_live_routes(api, ctx)

    # ------------------------------------------------------------------ anything else

    @api.api_route(
        "/{rest:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def not_found(rest: str) -> JSONResponse:
        for prefix in sorted(NOT_BUILT, key=len, reverse=True):
            if rest == prefix or rest.startswith(prefix + "/"):
                return _not_built(prefix)
        return JSONResponse({"detail": f"no such endpoint: /api/v1/{rest}"}, status_code=404)

    router.include_router(api)
    return router


_jsonable = jsonable


def _not_built(prefix: str) -> JSONResponse:
    return JSONResponse({"detail": f"not configured: {NOT_BUILT[prefix]}"}, status_code=404)
