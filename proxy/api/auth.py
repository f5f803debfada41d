"""Bearer-token auth for /api/v1.

The token is the `admin_token` setting: `PGSAGE_ADMIN_TOKEN`, or the first line of the file named
by `PGSAGE_ADMIN_TOKEN_FILE`. It is read per request (so a rotated file takes effect without a
restart) and never logged or echoed. Without a token every /api/v1 call answers 503.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request, status

NOT_CONFIGURED = (
    "the admin API is disabled: no admin token is configured; set PGSAGE_ADMIN_TOKEN, or "
    "PGSAGE_ADMIN_TOKEN_FILE to a file holding the token, and restart pgsage"
)


def configured_token(settings: Any = None) -> str | None:
    """The configured token, or None when there is none (empty counts as none)."""
    token = getattr(settings, "admin_token", None) if settings is not None else None
    if not token:
        token = os.environ.get("PGSAGE_ADMIN_TOKEN")
    if not token:
        path = os.environ.get("PGSAGE_ADMIN_TOKEN_FILE")
        if path:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError:
                lines = []
            token = lines[0].strip() if lines else None
    if hasattr(token, "get_secret_value"):
        token = token.get_secret_value()
    return str(token) if token else None


def make_auth(settings: Any = None) -> Any:
    """A FastAPI dependency that admits only `Authorization: Bearer <admin token>`."""

    def require_token(request: Request) -> None:
        expected = configured_token(settings)
        if expected is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, NOT_CONFIGURED)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token
