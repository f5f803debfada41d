"""/api/v1/ml: model versions, training jobs, activation, performance and cost prediction.

Training runs `pgsage train NAME --json` in a child process, as `proxy/retrain.py` does, and
counts the run in `pgsage_model_training_runs{trigger="api"}`. Heavy model libraries are
imported in a worker thread on first use, so the proxy's loop never waits for an import.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..clock import CLOCK
from ..metadata import dsn_of
from .common import Context, errors, invalid, jsonable, not_configured
from .explain import explain_checked
from .jobs import JobFailed, JobRunning, json_output, last_line, run_child

TRAIN_TIMEOUT = 3600.0
NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"

VERSIONS_SQL = """
SELECT model_name, version, model_id, status, is_active, created_at, activated_at,
    training_start, training_end, row_count, reason, metrics,
    artifact_path IS NOT NULL AS has_artifact
FROM ml.model_registry WHERE model_name = $1 ORDER BY version DESC
"""

ONLINE_SQL = """
SELECT model_version, count(*) AS predictions,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY q) AS qerror_p50,
    percentile_cont(0.9) WITHIN GROUP (ORDER BY q) AS qerror_p90
FROM (
    SELECT model_version, greatest(predicted_cost_ms, 0.001) / greatest(duration_ms, 0.001) AS r
    FROM metadata.query_logs
    WHERE predicted_cost_ms IS NOT NULL AND status = 'ok' AND started_at >= now() - $1::interval
) x, LATERAL (SELECT greatest(r, 1 / r) AS q) y
GROUP BY model_version ORDER BY model_version
"""


class TrainRequest(BaseModel):
    max_rows: int = Field(200_000, ge=100, le=10_000_000)
    n_iter: int = Field(8, ge=1, le=100)
    min_rows: int = Field(200, ge=1, le=1_000_000)


class PredictRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)


async def _import(name: str) -> Any:
    return await asyncio.to_thread(importlib.import_module, name)


async def trainers() -> list[str]:
    return list((await _import("models.train")).TRAINERS)


def add_ml_routes(api: APIRouter, ctx: Context) -> None:
    service = ctx.service

    @api.get("/ml/models/{name}/versions", tags=["ml"], responses=errors(404))
    async def model_versions(name: str = Path(pattern=NAME_PATTERN)) -> dict[str, Any]:
        async with ctx.connection() as conn:
            rows = await conn.fetch(VERSIONS_SQL, name)
        if not rows:
            raise HTTPException(404, f"no model named {name!r} in ml.model_registry")
        return {"model_name": name, "versions": jsonable([dict(r) for r in rows])}

    async def start_training(name: str, body: TrainRequest | None) -> JSONResponse:
        known = await trainers()
        if name != "all" and name not in known:
            raise invalid(
                ("path", "name"), f"unknown model {name!r}; known: all, {', '.join(known)}"
            )
        req = body or TrainRequest.model_validate({})
        args = [
            "-m", "proxy.cli", "train", name, "--json", "--dsn", dsn_of(service.metadata_args),
            "--max-rows", str(req.max_rows), "--n-iter", str(req.n_iter),
            "--min-rows", str(req.min_rows),
        ]  # fmt: skip

        async def work() -> Any:
            _code, out, err = await run_child(args, TRAIN_TIMEOUT)
            results = json_output(out)
            if not isinstance(results, list) or not results:
                results = [{"name": name, "status": "failed", "reason": last_line(err)}]
            for r in results:
                service.retrainer.runs.labels(r.get("name", name), "api", r["status"]).inc()
            failed = [r for r in results if r.get("status") == "failed"]
            if failed:
                reasons = "; ".join(f"{r.get('name')}: {r.get('reason')}" for r in failed)
                raise JobFailed(f"training failed: {reasons}", results)
            return results

        try:
            job = ctx.jobs.start("train", name, work)
        except JobRunning as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse(
            {"job_id": job.id, "status": job.status, "model": name,
             "status_url": f"/api/v1/ml/train/status?job_id={job.id}"},
            status_code=202,
        )  # fmt: skip

    @api.post("/ml/train", tags=["ml"], status_code=202, responses=errors(409))
    async def train_all(body: TrainRequest | None = None) -> JSONResponse:
        """Train every model in a child process; returns a job id (see /ml/train/status)."""
        return await start_training("all", body)

    @api.get("/ml/train/status", tags=["ml"], responses=errors(404))
    async def train_status(job_id: int | None = Query(None, ge=1, le=2**63 - 1)) -> dict[str, Any]:
        if job_id is not None:
            job = ctx.jobs.get(job_id)
            if job is None or job.kind != "train":
                raise HTTPException(404, f"no training job {job_id}")
            return job.as_dict()
        return {"jobs": [j.as_dict() for j in ctx.jobs.list(("train",))]}

    @api.post("/ml/train/{name}", tags=["ml"], status_code=202, responses=errors(409))
    async def train_one(
        name: str = Path(pattern=NAME_PATTERN), body: TrainRequest | None = None
    ) -> JSONResponse:
        """Train one model (a name of models/train.py's TRAINERS) in a child process."""
        return await start_training(name, body)

    @api.post("/ml/models/{name}/activate/{version}", tags=["ml"], responses=errors(404, 409))
    async def activate(
        name: str = Path(pattern=NAME_PATTERN), version: int = Path(ge=1, le=2**31 - 1)
    ) -> dict[str, Any]:
        from models.registry import Registry, RegistryError, model_dir

        async with ctx.connection() as conn:
            try:
                entry = await Registry(conn, model_dir()).activate(
                    name, version, "activated through the HTTP API"
                )
            except RegistryError as exc:
                code = 404 if str(exc).startswith("no version") else 409
                raise HTTPException(code, str(exc)) from None
        return {"model_name": entry.name, "version": entry.version, "status": entry.status,
                "is_active": entry.is_active}  # fmt: skip

    @api.get("/ml/models/{name}/performance", tags=["ml"], responses=errors(404))
    async def performance(
        name: str = Path(pattern=NAME_PATTERN), hours: float = Query(24.0, gt=0, le=24 * 90)
    ) -> dict[str, Any]:
        """The active version's offline metrics (its card) and, for the cost model, the online
        q-error: the live gauge and realised q-error over the last `hours` of the log."""
        async with ctx.connection() as conn:
            row = await conn.fetchrow(
                "SELECT version, metrics, activated_at FROM ml.model_registry"
                " WHERE model_name = $1 AND is_active",
                name,
            )
            known = row is not None or await conn.fetchval(
                "SELECT true FROM ml.model_registry WHERE model_name = $1 LIMIT 1", name
            )
            online = await conn.fetch(ONLINE_SQL, timedelta(hours=hours)) if name == "cost" else []
        if not known:
            raise HTTPException(404, f"no model named {name!r} in ml.model_registry")
        body: dict[str, Any] = {
            "model_name": name,
            "active_version": None if row is None else row["version"],
            "activated_at": None if row is None else row["activated_at"],
            "offline": None if row is None else row["metrics"],
        }
        if name == "cost":
            gauge = service.metrics.cost_prediction_qerror._value.get()
            body["online"] = {
                "qerror_gauge": gauge if gauge > 0 else None,
                "window_hours": hours,
                "by_version": [dict(r) for r in online],
            }
        return jsonable(body)

    @api.post("/ml/predict", tags=["ml"], responses=errors(404, 504))
    async def predict(req: PredictRequest) -> dict[str, Any]:
        """Predicted latency (ms) of a statement from the active cost model."""
        serve = await _import("models.serve")
        fp_mod = await _import("optimizer.fingerprint")
        fp = fp_mod.compute_fingerprint(req.sql)
        if fp.command not in serve.MODELLED_COMMANDS:
            raise invalid(
                ("body", "sql"),
                f"the cost model predicts {', '.join(serve.MODELLED_COMMANDS)}; got {fp.command}",
            )
        timeout_ms = service.settings.cost_explain_timeout_ms
        server = serve.CostServer(ttl=60.0)
        async with ctx.connection() as meta:
            await server.refresh_model(meta)
        if server.model is None:
            raise not_configured("no active cost model; train one with POST /api/v1/ml/train/cost")
        plan = None
        if fp.command == "SELECT":  # a clear 422 (or 504) when it does not plan
            plan = await explain_checked(ctx, req.sql, ("body", "sql"))
        async with ctx.connection(warehouse=True) as conn:
            server.predicted(fp.id, fp.command, req.sql, fp.normalized)
            stats = {s.fingerprint: s for s in service.recorder.stats.top(100_000)}
            seen = stats.get(fp.id)
            history = {}
            if seen is not None:
                mean = getattr(seen, "mean_time", None)
                history[fp.id] = serve.History(
                    int(seen.calls), None, None, None if mean is None else mean * 1000.0
                )
            await server.fill(conn, history, CLOCK.now(), statement_timeout_ms=timeout_ms)
        ms = server.predicted(fp.id, fp.command, req.sql, fp.normalized)
        if ms is None or not math.isfinite(ms):
            raise invalid(("body", "sql"), "the warehouse could not plan it: no prediction")
        return {
            "predicted_ms": round(float(ms), 3),
            "model_version": server.version,
            "fingerprint": fp.id,
            "command": fp.command,
            "normalized": fp.normalized,
            "plan_total_cost": None if plan is None else plan["total_cost"],
            "history_calls": history[fp.id].calls if fp.id in history else 0,
        }
