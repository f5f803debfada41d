"""The warehouse commands: `pgsage warehouse init` and `pgsage warehouse etl`, as functions.

`init_warehouse` creates the database if needed, applies the migrations, generates the synthetic
bronze data (bench.datagen) and takes it through the ETL. It is idempotent: a warehouse that
already holds the initial load for the same (scale, seed) is left as it is (the ETL still runs,
and has nothing to do unless bronze grew); a different (scale, seed), or `reset=True`, rebuilds
bronze, silver and gold from scratch. `load_increment` lands one more week of sales (batch 1, 2,
...) for the incremental ETL to pick up. `run_etl` runs warehouse_sql.etl once.

Each has a synchronous form for a typer command and an `_async` form. The DSN is a libpq DSN, a
URI (``postgresql://postgres@127.0.0.1:5432/postgres``, ``postgresql://postgres@/postgres?host=
/run/dir``) or key=value (``host=/run/dir port=5432 user=postgres``); `database` replaces its
database name (None keeps it).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from bench.datagen import CHUNK_ROWS, TABLES, Datagen, GenerationResult, load_bronze, record_batch
from bench.datagen import make_progress as _make_progress
from warehouse_sql import apply_migrations
from warehouse_sql.etl import ETL_LOCK_KEY, EtlSummary
from warehouse_sql.etl import run_etl as _run_etl

DEFAULT_DATABASE = "warehouse"
#: every table init owns, emptied on a rebuild (metadata and ml are not ours to touch)
OWNED_TABLES = (
    *(f"bronze.{t}_raw" for t in TABLES),
    "bronze.load_batches",
    *(f"silver.{t}_cleaned" for t in TABLES),
    *(f"silver.{t}_rejects" for t in TABLES),
    "silver.data_quality",
    "silver.etl_watermarks",
    "silver.etl_runs",
    "gold.sales_summary",
    "gold.customer_360",
    "gold.product_performance",
    "gold.inventory_insights",
)
_KV = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")


# --------------------------------------------------------------------------- connections


def connect_kwargs(dsn: str, database: str | None = None) -> dict[str, Any]:
    """asyncpg.connect() arguments for a libpq DSN (URI or key=value); `database` wins."""
    kwargs: dict[str, Any] = {}
    if "://" in dsn:
        kwargs["dsn"] = dsn
    elif dsn.strip():
        pos = 0
        text = dsn.strip()
        while pos < len(text):
            m = _KV.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"cannot parse DSN near {text[pos:]!r}")
            key, value = m.group(1), m.group(2)
            if value.startswith("'"):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            pos = m.end()
            _kv_arg(kwargs, key, value)
    if database:
        kwargs["database"] = database
    return kwargs


def _kv_arg(kwargs: dict[str, Any], key: str, value: str) -> None:
    if key in ("host", "hostaddr"):
        kwargs["host"] = value
    elif key == "port":
        kwargs["port"] = int(value)
    elif key in ("user", "password"):
        kwargs[key] = value
    elif key == "dbname":
        kwargs["database"] = value
    elif key == "sslmode":
        kwargs["ssl"] = value
    elif key == "connect_timeout":
        kwargs["timeout"] = float(value)
    elif key == "application_name":
        kwargs.setdefault("server_settings", {})["application_name"] = value
    # other libpq keywords (options, target_session_attrs, ...) do not matter here


async def connect(dsn: str, database: str | None = None) -> Any:
    return await asyncpg.connect(**connect_kwargs(dsn, database))


async def ensure_database(dsn: str, database: str) -> bool:
    """Create `database` on the server of `dsn` unless it exists; True if it was created."""
    try:
        conn = await connect(dsn, database)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await _admin_connection(dsn)
    try:
        await admin.execute(f"CREATE DATABASE {_ident(database)}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True


async def drop_database_async(dsn: str, database: str) -> None:
    admin = await _admin_connection(dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await admin.close()


async def server_version(dsn: str, database: str | None = None) -> str:
    conn = await connect(dsn, database)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def _admin_connection(dsn: str) -> Any:
    """A connection for CREATE/DROP DATABASE: the `postgres` database, else template1."""
    try:
        return await connect(dsn, "postgres")
    except asyncpg.InvalidCatalogNameError:
        return await connect(dsn, "template1")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------- init


@dataclass
class InitResult:
    """What `init_warehouse` did: whether it loaded, what, and the ETL run."""

    database: str
    created_database: bool
    loaded: bool
    rebuilt: bool
    generation: GenerationResult | None
    etl: EtlSummary | None
    seconds: dict[str, float] = field(default_factory=dict)


async def init_warehouse_async(
    dsn: str,
    scale: float = 1.0,
    seed: int = 42,
    database: str | None = DEFAULT_DATABASE,
    *,
    etl: bool = True,
    reset: bool = False,
    progress: Any = True,
    chunk_rows: int = CHUNK_ROWS,
) -> InitResult:
    """Create, migrate, load (unless already loaded with this scale and seed) and ETL.

    `progress`: True for rich progress bars on stderr, False for none, or a rich Progress.
    """
    target = database or str(connect_kwargs(dsn).get("database") or DEFAULT_DATABASE)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    created = await ensure_database(dsn, target)
    conn = await connect(dsn, target)
    try:
        await apply_migrations(conn)
        seconds["migrate"] = time.perf_counter() - t0
        existing = await conn.fetchrow(
            "SELECT scale, seed FROM bronze.load_batches WHERE batch_id = 0"
        )
        same = existing is not None and (existing["scale"], existing["seed"]) == (scale, seed)
        generation = None
        rebuilt = False
        if reset or not same:
            t1 = time.perf_counter()
            rebuilt = existing is not None or reset
            generation = await _load_initial(conn, Datagen(scale, seed, chunk_rows), progress)
            seconds["generate_load"] = time.perf_counter() - t1
        summary = None
        if etl:
            t2 = time.perf_counter()
            summary = await _run_etl(conn)
            seconds["etl"] = time.perf_counter() - t2
    finally:
        await conn.close()
    return InitResult(
        target, created, generation is not None, rebuilt, generation, summary, seconds
    )


async def _load_initial(conn: Any, gen: Datagen, progress: Any) -> GenerationResult:
    """Empty everything init owns, then load batch 0, in one transaction."""
    bars, own = _progress(progress)
    try:
        # the ETL lock keeps a concurrent ETL run from reading a half-emptied warehouse
        await conn.execute("SELECT pg_advisory_lock($1)", ETL_LOCK_KEY)
        async with conn.transaction():
            await conn.execute(f"TRUNCATE {', '.join(OWNED_TABLES)} RESTART IDENTITY")
            await conn.executemany(
                "INSERT INTO silver.etl_watermarks (source_table) VALUES ($1)",
                [(f"bronze.{t}_raw",) for t in TABLES],
            )
            result = await load_bronze(conn, gen, 0, bars)
            await record_batch(conn, result)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ETL_LOCK_KEY)
        if own:
            bars.stop()
    await conn.execute(f"ANALYZE {', '.join(f'bronze.{t}_raw' for t in TABLES)}")
    return result


def _progress(progress: Any) -> tuple[Any, bool]:
    """(rich Progress or None, whether we started it and must stop it)."""
    if progress is True:
        bars = _make_progress(Console(stderr=True))
        bars.start()
        return bars, True
    if progress is False or progress is None:
        return None, False
    return progress, False


async def load_increment_async(
    dsn: str,
    batch: int | None = None,
    database: str | None = DEFAULT_DATABASE,
    *,
    progress: Any = False,
) -> GenerationResult | None:
    """Land increment `batch` (default: the next one) of sales; None if it is already loaded."""
    conn = await connect(dsn, database)
    try:
        base = await conn.fetchrow(
            "SELECT scale, seed, (SELECT max(batch_id) FROM bronze.load_batches) AS last"
            " FROM bronze.load_batches WHERE batch_id = 0"
        )
        if base is None:
            raise RuntimeError("the warehouse has no initial load: run `warehouse init` first")
        batch = int(base["last"]) + 1 if batch is None else batch
        if batch < 1:
            raise ValueError("increment batches start at 1")
        bars, own = _progress(progress)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE bronze.load_batches IN SHARE ROW EXCLUSIVE MODE")
                if await conn.fetchval(
                    "SELECT 1 FROM bronze.load_batches WHERE batch_id = $1", batch
                ):
                    return None
                gen = Datagen(base["scale"], base["seed"])
                result = await load_bronze(conn, gen, batch, bars)
                await record_batch(conn, result)
        finally:
            if own:
                bars.stop()
        return result
    finally:
        await conn.close()


async def run_etl_async(dsn: str, database: str | None = DEFAULT_DATABASE) -> EtlSummary:
    """One ETL run (migrations applied first, so it also works on a fresh database)."""
    conn = await connect(dsn, database)
    try:
        await apply_migrations(conn)
        return await _run_etl(conn)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- sync + output


def init_warehouse(
    dsn: str,
    scale: float = 1.0,
    seed: int = 42,
    database: str | None = DEFAULT_DATABASE,
    *,
    etl: bool = True,
    reset: bool = False,
    progress: bool = True,
    show: bool = True,
) -> InitResult:
    """`pgsage warehouse init`: see init_warehouse_async; prints a summary if `show`."""
    result = asyncio.run(
        init_warehouse_async(dsn, scale, seed, database, etl=etl, reset=reset, progress=progress)
    )
    if show:
        console = Console()
        console.print(render_init(result))
        if result.etl is not None:
            console.print(render_etl_summary(result.etl))
    return result


def run_etl(dsn: str, database: str | None = DEFAULT_DATABASE, *, show: bool = True) -> EtlSummary:
    """`pgsage warehouse etl`: one ETL run; prints the data-quality summary if `show`."""
    summary = asyncio.run(run_etl_async(dsn, database))
    if show:
        Console().print(render_etl_summary(summary))
    return summary


def load_increment(
    dsn: str, batch: int | None = None, database: str | None = DEFAULT_DATABASE
) -> GenerationResult | None:
    return asyncio.run(load_increment_async(dsn, batch, database))


def render_init(result: InitResult) -> Table:
    table = Table(title=f"warehouse {result.database!r}")
    table.add_column("bronze table", no_wrap=True)
    for col in ("rows", "clean", "dirty (rejects)", "rows/s"):
        table.add_column(col, justify="right")
    gen = result.generation
    if gen is None:
        table.caption = "already loaded with this scale and seed: nothing generated"
        return table
    for t in gen.rows:
        rate = gen.rows[t] / gen.seconds[t] if gen.seconds.get(t) else 0
        table.add_row(f"bronze.{t}_raw", f"{gen.rows[t]:,}", f"{gen.clean[t]:,}",
                      f"{gen.rejects(t):,}", f"{rate:,.0f}")  # fmt: skip
    table.caption = "  ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    return table


def render_etl_summary(summary: EtlSummary) -> Table:
    table = Table(title=f"ETL run {summary.run_id}: {summary.seconds:.1f}s")
    table.add_column("silver table", no_wrap=True)
    for col in ("in", "inserted", "updated", "rejected"):
        table.add_column(col, justify="right")
    table.add_column("rejects by reason", no_wrap=True)
    for q in summary.tables:
        reasons = "\n".join(f"{k} {v:,}" for k, v in sorted(q.rejects_by_reason.items()))
        table.add_row(q.table, f"{q.rows_in:,}", f"{q.rows_inserted:,}", f"{q.rows_updated:,}",
                      f"{q.rows_rejected:,}", reasons)  # fmt: skip
    refreshed = ", ".join(summary.refreshed) or "none"
    table.caption = f"gold refreshed: {refreshed}"
    return table
