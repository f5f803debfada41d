"""The admin HTTP API under /api/v1 (mounted on the app from `proxy.http.create_app`)."""

from __future__ import annotations

from .routes import make_router

__all__ = ["make_router"]
