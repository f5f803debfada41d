"""The HTTP side of `pgsage serve`: /metrics, /healthz, /readyz (FastAPI on uvicorn).

Runs on the proxy's own event loop. /healthz never touches the database; /readyz reports the
last upstream probe and whether migrations are applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .telemetry.metrics import ProxyMetrics


def create_app(
    metrics: ProxyMetrics,
    ready: Callable[[], dict[str, Any]],
    exposition: Callable[[], bytes] | None = None,
) -> FastAPI:
    """`exposition`: what /metrics serves (default: the registry's; in multi-worker mode, every
    worker's, gathered in the thread pool FastAPI runs this synchronous handler in)."""
    app = FastAPI(title="pgsage", version=__version__, docs_url="/docs", redoc_url=None)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body = exposition() if exposition is not None else generate_latest(metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        state = ready()
        ok = bool(state.get("upstream")) and bool(state.get("migrations"))
        return JSONResponse({"ready": ok, **state}, status_code=200 if ok else 503)

    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `pgsage serve` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_http_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        loop="none",
    )
    return _Server(config)
