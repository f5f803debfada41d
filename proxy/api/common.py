"""What the /api/v1 route modules share: connections on pgsage's own role, JSON shaping, and
validation errors that name the field the way FastAPI's own do."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from .. import metadata
from .guard import RateLimiter
from .jobs import Jobs

APPLICATION_NAME = "pgsage-api"


@dataclass
class Context:
    """One router's state: the service, its background jobs and the rate limiter."""

    service: Any
    jobs: Jobs = field(default_factory=Jobs)
    limiter: RateLimiter = field(default_factory=RateLimiter)

    @property
    def settings(self) -> Any:
        return self.service.settings

    def warehouse_args(self) -> dict[str, Any]:
        """Connect args of the warehouse database (the metadata one unless metadata_dsn)."""
        s = self.service.settings
        if not s.metadata_dsn:
            return dict(self.service.metadata_args)
        return metadata.metadata_connect_args(s, self.service.upstream, s.warehouse_database)

    @asynccontextmanager
    async def connection(self, warehouse: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A short-lived connection on pgsage's role (503 when the database is unreachable)."""
        args = self.warehouse_args() if warehouse else self.service.metadata_args
        try:
            conn = await metadata.connect(args, APPLICATION_NAME)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            which = "warehouse" if warehouse else "metadata"
            raise HTTPException(
                503, f"{which} database unavailable: {type(exc).__name__}"
            ) from None
        try:
            for typ in ("json", "jsonb"):
                await conn.set_type_codec(
                    typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )
            yield conn
        finally:
            await conn.close()


def invalid(
    loc: tuple[str, ...], message: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 naming the field, shaped like FastAPI's own (`detail[0].loc[-1]` is the field)."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])


def setting_problem(problem: str) -> RequestValidationError:
    """A refused settings change as a 422 naming `key` (unknown, needs a restart) or `value`."""
    on_key = problem.startswith("unknown setting") or "cannot be changed" in problem
    return invalid(("body", "key" if on_key else "value"), problem)


def jsonable(value: Any) -> Any:
    """Datetimes as ISO text, NaN and infinities as null, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def not_configured(what: str) -> HTTPException:
    return HTTPException(404, f"not configured: {what}")


class Problem(BaseModel):
    """An error answer: what went wrong, in words."""

    detail: str


_MEANING = {
    400: "the request cannot be carried out as asked",
    401: "missing or wrong bearer token",
    404: "not found, or the part is not configured",
    409: "conflicts with the current state",
    429: "rate limit exceeded (api_rate_limit_per_minute)",
    503: "no admin token configured, or the database is unavailable",
    504: "the database did not answer within the statement_timeout",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes a route can answer besides 200 and 422."""
    return {code: {"model": Problem, "description": _MEANING[code]} for code in codes}
