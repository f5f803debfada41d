"""CORS and the per-client rate limit of /api/v1, applied by the routes' own class.

The router cannot add app middleware (the app belongs to `proxy.http`), so every /api/v1 route
is an `ApiRoute`: it takes a token from the client's bucket first (429 when it is empty), runs
the handler, renders its HTTP and validation errors the way FastAPI does, and adds the CORS
headers for an allowed `Origin`. Settings are read per request: `api_cors_origins` (exact
origins, or "*") and `api_rate_limit_per_minute` (0: off).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

ALLOWED_METHODS = "GET, POST, PUT, DELETE, PATCH, OPTIONS"
ALLOWED_HEADERS = "authorization, content-type"
MAX_CLIENTS = 10_000


class RateLimiter:
    """A token bucket per client address: `per_minute` requests, refilled continuously."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str, per_minute: int) -> float:
        """0.0 when the request may pass, else the seconds until a token is back."""
        if per_minute <= 0:
            return 0.0
        now = self.clock()
        rate = per_minute / 60.0
        tokens, at = self._buckets.get(client, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_full(now, per_minute, rate)
        return 0.0

    def _forget_full(self, now: float, per_minute: int, rate: float) -> None:
        """Drop buckets that have refilled completely (they equal a fresh one)."""
        for client, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * rate >= per_minute:
                del self._buckets[client]


def origin_allowed(settings: Any, origin: str | None) -> bool:
    allowed = list(getattr(settings, "api_cors_origins", None) or [])
    return origin is not None and ("*" in allowed or origin in allowed)


def _cors_headers(settings: Any, origin: str) -> dict[str, str]:
    allowed = list(getattr(settings, "api_cors_origins", None) or [])
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def preflight(settings: Any, request: Request) -> Response:
    """The answer to a CORS preflight (OPTIONS with Origin); never needs the token."""
    origin = request.headers.get("origin")
    if not origin_allowed(settings, origin):
        return JSONResponse(
            {"detail": f"CORS: origin {origin!r} is not allowed (setting api_cors_origins)"},
            status_code=400,
        )
    assert origin is not None
    headers = {
        **_cors_headers(settings, origin),
        "Access-Control-Allow-Methods": ALLOWED_METHODS,
        "Access-Control-Allow-Headers": request.headers.get(
            "access-control-request-headers", ALLOWED_HEADERS
        ),
        "Access-Control-Max-Age": "600",
    }
    return Response(status_code=204, headers=headers)


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def route_class(settings: Any, limiter: RateLimiter) -> type[APIRoute]:
    """An APIRoute subclass bound to these settings and this limiter."""

    class ApiRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                client = request.client.host if request.client else "unknown"
                per_minute = int(getattr(settings, "api_rate_limit_per_minute", 0) or 0)
                wait = limiter.take(client, per_minute)
                response: Response
                if wait > 0:
                    response = JSONResponse(
                        {"detail": f"rate limit exceeded: at most {per_minute} requests per"
                                   " minute per client (api_rate_limit_per_minute)"},
                        status_code=429,
                        headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )  # fmt: skip
                elif (nul := _nul_field(request)) is not None:
                    response = await request_validation_exception_handler(
                        request, RequestValidationError([nul])
                    )
                else:
                    try:
                        response = await handler(request)
                    except HTTPException as exc:
                        response = await http_exception_handler(request, exc)
                    except RequestValidationError as exc:
                        response = await request_validation_exception_handler(request, exc)
                origin = request.headers.get("origin")
                if origin is not None and origin_allowed(settings, origin):
                    for key, value in _cors_headers(settings, origin).items():
                        response.headers[key] = value
                return response

            return guarded

    return ApiRoute


def _nul_field(request: Request) -> dict[str, Any] | None:
    """A NUL character in a query or path parameter (PostgreSQL text cannot hold one)."""
    params = [("query", k, v) for k, v in request.query_params.multi_items()]
    params += [("path", k, str(v)) for k, v in request.path_params.items()]
    for where, key, value in params:
        if "\x00" in value or "\x00" in key:
            return {"loc": (where, key), "msg": "NUL characters are not allowed",
                    "type": "value_error"}  # fmt: skip
    return None
