"""Runs the ETL transforms in `etl/NN_*.sql`: bronze -> silver -> gold, incremental by watermark.

Each transform file starts with header comments the runner reads::

    -- target: silver.sales_cleaned            (silver: validate, cast, dedupe, reject)
    -- source: bronze.sales_raw
    -- target: gold.sales_summary              (gold: aggregates)
    -- inputs: silver.sales_cleaned silver.product_cleaned
    -- refresh: full                           (optional: rebuilt whole every time)

and may use `${run_id}`; silver files `${lo}` / `${hi}`, the bronze `_row_id` range of
this run, (last watermark, highest committed row]. The bounds are read under a SHARE lock on the
bronze tables, which waits for every loading transaction in flight, so a row committed later
always has a higher `_row_id` and no row is ever skipped. They are substituted as literals so the
planner sees the real range (a sequential scan for a first load, an index range scan later).
Gold files get `${full}`: 1 when most of one of their inputs is new in this run (a first
load), so they recompute everything instead of the keys the run touched.

A run is one transaction: silver files always run (they leave `etl_<name>_changed` temp tables
for the gold files), a gold file runs only when one of its inputs changed, and each gold table
refreshed gets `NOTIFY pgsage_refresh, '<schema.table>'`, delivered when the run commits.
The data-quality summary is stored in `silver.data_quality` and `silver.etl_runs.summary`.
Concurrent runs are serialised by an advisory lock; a failed run rolls back and is recorded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

#: pg_advisory_lock key for ETL runs ("pgsetl" in ASCII)
ETL_LOCK_KEY = 0x70677365746C
NOTIFY_CHANNEL = "pgsage_refresh"
#: batches of at least this many rows, and at least as many as the table holds, load in bulk
BULK_MIN_ROWS = 100_000
#: a silver table that gained or changed this many rows is analyzed before the gold steps
ANALYZE_MIN_ROWS = 10_000
_FILE = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")
_HEADER = re.compile(r"^--\s*(target|source|inputs|refresh):\s*(.+?)\s*$", re.MULTILINE)
_VAR = re.compile(r"\$\{([a-z_]+)\}")


@dataclass(frozen=True)
class Transform:
    """One ETL step: the SQL file and what its header says it reads and writes."""

    name: str
    target: str
    sql: str
    source: str | None = None
    inputs: tuple[str, ...] = ()
    #: "full" for a gold table rebuilt whole on every refresh
    refresh: str = "incremental"

    @property
    def layer(self) -> str:
        return self.target.split(".", 1)[0]

    def render(self, **values: int) -> str:
        """The SQL with `${name}` replaced by integer values (the only kind it takes)."""

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise KeyError(f"{self.name}: no value for ${{{m.group(1)}}}")
            return str(int(values[m.group(1)]))

        return _VAR.sub(sub, self.sql)


def load_transforms() -> list[Transform]:
    """The shipped transforms in file order."""
    found = []
    for entry in resources.files(__package__).joinpath("etl").iterdir():
        m = _FILE.match(entry.name)
        if not m:
            continue
        sql = entry.read_text("utf-8")
        header = {k: v for k, v in _HEADER.findall(sql)}
        if "target" not in header:
            raise ValueError(f"{entry.name}: no '-- target:' header")
        found.append(
            Transform(
                name=entry.name,
                target=header["target"],
                sql=sql,
                source=header.get("source"),
                inputs=tuple(header.get("inputs", "").split()),
                refresh=header.get("refresh", "incremental"),
            )
        )
    found.sort(key=lambda t: t.name)
    for t in found:
        if t.layer == "silver" and not t.source:
            raise ValueError(f"{t.name}: a silver transform needs '-- source:'")
    return found


@dataclass
class TableQuality:
    """Rows in, out and rejected (by reason) for one silver table in one run."""

    table: str
    source: str
    rows_in: int
    rows_inserted: int
    rows_updated: int
    rows_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        return self.rows_inserted + self.rows_updated


@dataclass
class EtlSummary:
    """What one ETL run did."""

    run_id: int
    started_at: dt.datetime
    seconds: float
    tables: list[TableQuality]
    refreshed: list[str]
    full_refreshes: list[str]
    gold_rows: dict[str, int]
    step_seconds: dict[str, float]
    watermarks: dict[str, tuple[int, int]]

    def table(self, name: str) -> TableQuality:
        """By name: "silver.sales_cleaned", "sales_cleaned" or "sales"."""
        for t in self.tables:
            short = t.table.split(".", 1)[-1]
            if name in (t.table, short, short.removesuffix("_cleaned")):
                return t
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["started_at"] = self.started_at.isoformat()
        for t, q in zip(out["tables"], self.tables, strict=True):
            t["rows_out"] = q.rows_out
        out["watermarks"] = {k: list(v) for k, v in self.watermarks.items()}
        return out


async def _bounds(conn: Any, sources: list[str]) -> dict[str, tuple[int, int]]:
    """(last watermark, highest committed _row_id) per bronze table."""
    async with conn.transaction():
        # SHARE conflicts with the ROW EXCLUSIVE lock of every writer in flight: once granted,
        # every _row_id up to max() is committed (or rolled back) for good.
        await conn.execute(f"LOCK TABLE {', '.join(sources)} IN SHARE MODE")
        out = {}
        for src in sources:
            hi = await conn.fetchval(f"SELECT coalesce(max(_row_id), 0) FROM {src}")
            lo = await conn.fetchval(
                "SELECT last_row_id FROM silver.etl_watermarks WHERE source_table = $1", src
            )
            out[src] = (int(lo or 0), max(int(hi), int(lo or 0)))
    return out


async def run_etl(
    conn: Any, *, work_mem: str = "256MB", bulk_rows: int = BULK_MIN_ROWS
) -> EtlSummary:
    """One ETL run on an asyncpg connection to the warehouse; returns its summary."""
    transforms = load_transforms()
    sources = [t.source for t in transforms if t.layer == "silver" and t.source]
    await conn.execute("SELECT pg_advisory_lock($1)", ETL_LOCK_KEY)
    try:
        started = time.perf_counter()
        bounds = await _bounds(conn, sources)
        try:
            return await _run(conn, transforms, bounds, started, work_mem, bulk_rows)
        except Exception as exc:
            await _record_failure(conn, exc)
            raise
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", ETL_LOCK_KEY)


@dataclass
class _Run:
    """What a run has done so far, as the steps go."""

    run_id: int
    bulk_rows: int
    changed: set[str] = field(default_factory=set)  # silver tables with rows in or updated
    mostly_new: set[str] = field(default_factory=set)  # ... where those are most of the table
    tables: list[TableQuality] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    full_refreshes: list[str] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)


async def _run(
    conn: Any,
    transforms: list[Transform],
    bounds: dict[str, tuple[int, int]],
    started: float,
    work_mem: str,
    bulk_rows: int,
) -> EtlSummary:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL work_mem = '{_setting(work_mem)}'")
        await conn.execute(f"SET LOCAL maintenance_work_mem = '{_setting(work_mem)}'")
        # JIT compiles the wide validation expressions for a few hundred ms per statement and
        # saves little on these plans; without it small incremental runs stay fast
        await conn.execute("SET LOCAL jit = off")
        run_id, started_at = await conn.fetchrow(
            "INSERT INTO silver.etl_runs DEFAULT VALUES RETURNING run_id, started_at"
        )
        # the stale-days triggers of silver.sales_cleaned leave this run's own writes alone
        await conn.execute("SELECT set_config('pgsage.etl_run', $1, true)", str(run_id))
        run = _Run(run_id, bulk_rows)
        for t in transforms:
            t0 = time.perf_counter()
            if t.layer == "silver":
                await _silver_step(conn, run, t, bounds[t.source or ""])
            elif (stale := await _stale_days(conn, t)) or run.changed.intersection(t.inputs):
                await _gold_step(conn, run, t, after_truncate=stale == "all")
            else:
                continue
            run.steps[t.name] = round(time.perf_counter() - t0, 3)
        gold_rows = {
            t.target: int(await conn.fetchval(f"SELECT count(*) FROM {t.target}"))
            for t in transforms
            if t.layer == "gold"
        }
        summary = EtlSummary(
            run_id=run_id,
            started_at=started_at,
            seconds=round(time.perf_counter() - started, 3),
            tables=run.tables,
            refreshed=run.refreshed,
            full_refreshes=run.full_refreshes,
            gold_rows=gold_rows,
            step_seconds=run.steps,
            watermarks=bounds,
        )
        await conn.execute(
            "UPDATE silver.etl_runs SET finished_at = clock_timestamp(), status = 'succeeded',"
            " summary = $2::jsonb WHERE run_id = $1",
            run_id,
            json.dumps(summary.as_dict()),
        )
    return summary


async def _silver_step(conn: Any, run: _Run, t: Transform, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    restore = await _bulk_begin(conn, t.target, hi - lo, run.bulk_rows)
    await conn.execute(t.render(run_id=run.run_id, lo=lo, hi=hi))
    for statement in restore:
        await conn.execute(statement)
    await conn.execute(
        "UPDATE silver.etl_watermarks SET last_row_id = $2, last_run_id = $3,"
        " updated_at = now() WHERE source_table = $1 AND last_row_id < $2",
        t.source,
        hi,
        run.run_id,
    )
    q = await _quality(conn, run.run_id, t.target)
    run.tables.append(q)
    if q.rows_out:
        run.changed.add(t.target)
    await _analyze_and_size(conn, t.target, q.rows_out, bool(restore), run.mostly_new)


#: gold tables kept exact for days written outside the ETL (migration 0080_gold_freshness)
STALE_DAYS = {"gold.sales_summary": "silver.sales_stale_days"}


async def _stale_days(conn: Any, t: Transform) -> str | None:
    """For a gold table with days of its input written outside the ETL: 'all' (a TRUNCATE)
    or 'some'; None when there are none (or the table does not track them)."""
    table = STALE_DAYS.get(t.target)
    if table is None or not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        return None
    found = await conn.fetchval(
        f"SELECT bool_or(NOT isfinite(sale_date)) FROM {table}"  # a constant of STALE_DAYS
    )
    return None if found is None else "all" if found else "some"


async def _gold_step(conn: Any, run: _Run, t: Transform, after_truncate: bool = False) -> None:
    # a full refresh when most of an input is new: one parallel aggregation beats looking up
    # every key (and the planner sees a literal, not a parameter); or after a TRUNCATE
    full = t.refresh == "full" or bool(run.mostly_new.intersection(t.inputs)) or after_truncate
    await conn.execute(t.render(run_id=run.run_id, full=int(full)))
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, t.target)
    run.refreshed.append(t.target)
    if full:
        run.full_refreshes.append(t.target)


async def _analyze_and_size(
    conn: Any, table: str, rows_out: int, bulk: bool, mostly_new: set[str]
) -> None:
    """ANALYZE a silver table the run changed a lot; note it if most of it is new."""
    size = float(
        await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = $1::regclass", table)
    )
    if rows_out >= ANALYZE_MIN_ROWS or bulk or (rows_out and size < 0):
        # the gold queries are planned next, in this transaction: autovacuum's statistics
        # would come too late (ANALYZE counts the run's own rows)
        await conn.execute(f"ANALYZE {table}")
        size = float(
            await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = $1::regclass", table)
        )
    else:
        size = max(size, 0) + rows_out
    if rows_out and rows_out * 2 >= size:
        mostly_new.add(table)


async def _bulk_begin(conn: Any, table: str, batch_rows: int, bulk_rows: int) -> list[str]:
    """For a batch at least as large as the table, drop its keys, foreign keys and indexes.

    Returns the statements that put them back. Building an index and validating a foreign key
    in one pass each is several times faster than maintaining them row by row (1M sales lines:
    about 6 s instead of 30 s); the rows were checked against the parents and for duplicates
    already, and putting a key back checks it again. A primary key that a foreign key points at
    stays. The price is an ACCESS EXCLUSIVE lock on the table until the run commits, which is
    only paid when the batch is at least as big as the table (first loads).
    """
    if batch_rows < bulk_rows:
        return []
    existing = await conn.fetchval(f"SELECT count(*) FROM {table}")
    if batch_rows < existing:
        return []
    rows = await conn.fetch(
        """
        SELECT CASE contype WHEN 'f' THEN 2 ELSE 0 END AS kind, conname AS name,
               format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname) AS drop,
               format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname,
                      pg_get_constraintdef(oid)) AS restore
        FROM pg_constraint c
        WHERE conrelid = $1::regclass
          AND (contype = 'f'
               OR (contype IN ('p', 'u') AND NOT EXISTS (
                       SELECT 1 FROM pg_constraint r
                       WHERE r.contype = 'f' AND r.conindid = c.conindid)))
        UNION ALL
        SELECT 1, indexrelid::regclass::text, format('DROP INDEX %s', indexrelid::regclass),
               pg_get_indexdef(indexrelid)
        FROM pg_index
        WHERE indrelid = $1::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = indexrelid)
        ORDER BY 1, 2
        """,
        table,
    )
    for row in reversed(rows):  # foreign keys, then indexes, then keys
        await conn.execute(row["drop"])
    return [row["restore"] for row in rows]  # keys, indexes, then foreign keys


async def _record_failure(conn: Any, exc: Exception) -> None:
    """Leave a 'failed' run row; never hide the original error behind a second one."""
    # the connection may be gone: the caller still gets `exc`
    with contextlib.suppress(Exception):
        await conn.execute(
            "INSERT INTO silver.etl_runs (finished_at, status, error) VALUES (now(), 'failed', $1)",
            f"{type(exc).__name__}: {exc}",
        )


async def _quality(conn: Any, run_id: int, table: str) -> TableQuality:
    row = await conn.fetchrow(
        "SELECT source_table, rows_in, rows_inserted, rows_updated, rows_rejected,"
        " rejects_by_reason::text AS reasons FROM silver.data_quality"
        " WHERE run_id = $1 AND table_name = $2",
        run_id,
        table,
    )
    if row is None:
        raise RuntimeError(f"{table}: the transform recorded no data-quality row")
    return TableQuality(
        table=table,
        source=row["source_table"],
        rows_in=row["rows_in"],
        rows_inserted=row["rows_inserted"],
        rows_updated=row["rows_updated"],
        rows_rejected=row["rows_rejected"],
        rejects_by_reason=json.loads(row["reasons"]),
    )


def _setting(value: str) -> str:
    if not re.fullmatch(r"[0-9]+\s*[kMG]?B?", value):
        raise ValueError(f"not a memory setting: {value!r}")
    return value
