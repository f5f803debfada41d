"""The proxy's own connections to the metadata database (asyncpg), and migrations at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from warehouse_sql import apply_migrations

from .settings import Settings
from .upstream import Upstream


def metadata_connect_args(
    settings: Settings, upstream: Upstream, database: str | None = None
) -> dict[str, Any]:
    """asyncpg.connect() keyword arguments for the metadata database."""
    if settings.metadata_dsn and database is None:
        return {"dsn": settings.metadata_dsn}
    db = database or settings.warehouse_database
    if upstream.unix_socket is not None:
        sock = upstream.unix_socket
        port = int(sock.name.rsplit(".", 1)[-1]) if sock.name.startswith(".s.PGSQL.") else 5432
        return {
            "host": str(sock.parent),
            "port": port,
            "user": settings.metadata_user,
            "database": db,
        }
    args: dict[str, Any] = {
        "host": upstream.host,
        "port": upstream.port,
        "user": settings.metadata_user,
        "database": db,
    }
    if settings.upstream_sslmode != "disable":
        # JSON-able (the log worker and training subprocesses get these), made into an
        # SSLContext by asyncpg_args() when connecting
        args["tls"] = {
            "mode": settings.upstream_sslmode,
            "rootcert": str(settings.upstream_sslrootcert or "") or None,
            "cert": str(settings.upstream_sslcert or "") or None,
            "key": str(settings.upstream_sslkey or "") or None,
        }
    return args


def asyncpg_args(args: dict[str, Any]) -> dict[str, Any]:
    """asyncpg.connect() keyword arguments from metadata_connect_args() (TLS made real)."""
    tls = args.get("tls")
    if tls is None:
        return args
    from .upstream import UpstreamTLS

    def path(v: str | None) -> Path | None:
        return Path(v) if v else None

    out = {k: v for k, v in args.items() if k != "tls"}
    out["ssl"] = UpstreamTLS.build(
        tls["mode"], path(tls["rootcert"]), path(tls["cert"]), path(tls["key"])
    ).asyncpg_ssl()
    return out


def describe(args: dict[str, Any]) -> str:
    """A DSN-like string for logs and the admin console (never with a password)."""
    if "dsn" in args:
        dsn = str(args["dsn"])
        return dsn.split("@")[-1] if "@" in dsn else dsn
    return f"{quote(str(args['user']))}@{args['host']}:{args['port']}/{args['database']}"


async def connect(
    args: dict[str, Any], application_name: str, timeout: float = 5.0
) -> asyncpg.Connection:
    return await asyncpg.connect(
        **asyncpg_args(args),
        timeout=timeout,
        server_settings={"application_name": application_name},
    )


async def ensure_database(settings: Settings, upstream: Upstream) -> bool:
    """Create the warehouse database if missing (not for an explicit metadata_dsn)."""
    if settings.metadata_dsn:
        return False
    conn = await connect(metadata_connect_args(settings, upstream, "postgres"), "pgsage-admin")
    try:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", settings.warehouse_database
        )
        if exists:
            return False
        ddl = await conn.fetchval(
            "SELECT format('CREATE DATABASE %I', $1::text)", settings.warehouse_database
        )
        try:
            await conn.execute(ddl)
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


async def migrate(settings: Settings, upstream: Upstream) -> list[str]:
    """Create the database if needed and apply pending migrations; names of those applied."""
    await ensure_database(settings, upstream)
    conn = await connect(metadata_connect_args(settings, upstream), "pgsage-migrate")
    try:
        return [f"{m.version:04d}_{m.name}" for m in await apply_migrations(conn)]
    finally:
        await conn.close()


#: extensions the learned parts use, and what is lost without them
OPTIONAL_EXTENSIONS = {
    "hypopg": "index what-if costs fall back to building indexes inside a rolled-back transaction",
    "pg_stat_statements": "no server-side statement statistics to compare with pgsage's own",
}


async def capabilities(args: dict[str, Any]) -> dict[str, bool]:
    """Which optional extensions the upstream can provide (installed or installable)."""
    conn = await connect(args, "pgsage-capabilities")
    try:
        rows = await conn.fetch(
            "SELECT name FROM pg_available_extensions WHERE name = ANY($1::text[])",
            list(OPTIONAL_EXTENSIONS),
        )
    finally:
        await conn.close()
    present = {r["name"] for r in rows}
    return {name: name in present for name in OPTIONAL_EXTENSIONS}


def dsn_of(args: dict[str, Any]) -> str:
    """A libpq URI for connect args (for child processes such as `pgsage train`)."""
    if "dsn" in args:
        return str(args["dsn"])
    user, db = quote(str(args["user"])), quote(str(args["database"]))
    host = str(args["host"])
    if host.startswith("/"):
        return f"postgresql://{user}@/{db}?host={quote(host)}&port={args['port']}"
    query = ""
    tls = args.get("tls")
    if tls:
        params = {"sslmode": tls["mode"], "sslrootcert": tls.get("rootcert"),
                  "sslcert": tls.get("cert"), "sslkey": tls.get("key")}  # fmt: skip
        query = "?" + "&".join(f"{k}={quote(str(v))}" for k, v in params.items() if v)
    return f"postgresql://{user}@{host}:{args['port']}/{db}{query}"
