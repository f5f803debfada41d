"""TPC-H through pgsage: the 22 queries before and after the index advisor's indexes.

    python -m bench.tpch [--scale 1] [--budget-mb 500] [--timeout 600] [--reload]
    python -m bench.gain --advisor --tpch [same options]

1. Data: ``tpchgen-cli csv --stdout`` (PyPI, the test extras) streamed straight into COPY, one
   table at a time (progress bars), into a database of its own (``pgsage_tpch``); the 8 tables
   get their primary keys only (no secondary indexes, no foreign keys), then ANALYZE. A comment
   on ``lineitem`` records the scale of a complete load, so a rerun skips loading (``--reload``
   forces it; another ``--scale`` reloads).
2. ``pgsage serve`` starts as a subprocess in front of the PostgreSQL with
   ``log_parameters = true`` and its metadata in the TPC-H database. Indexes an earlier run
   built (``pgsage_*``), the query log and the index history are cleared.
3. Before: the 22 queries (`bench.tpch_queries`, the validation parameters) run once through
   pgsage over the simple protocol, each under ``statement_timeout = --timeout``. That run is the
   workload the advisor reads from ``metadata.query_logs``. A query cancelled by the timeout
   counts as the timeout value (``timed_out`` in the row).
4. The advisor (`models.advisor.advise`, HypoPG what-if) under a ``--budget-mb`` budget
   (``budget_share`` = budget / pg_database_size); each recommendation is applied with
   `apply_recommendation`, with the advisor's own replay validation as a deployment runs it
   (``--no-validate``: every index is built and kept); ANALYZE. Validation: each index is
   built, the affected queries are replayed before and after under ``--validate-timeout`` (a
   run cut by it counts as the limit, so Q17 and Q20 can be validated), an index that pays but
   slows a few other queries is kept only if a steering hint set gives each of them its old
   plan back (the pin), else dropped. pgsage then runs with plan steering on, limited to
   applying those pins (``steering_min_ms`` out of reach: no exploration), so the after pass
   runs the pinned queries as a deployment would.
5. After: the 22 queries again through pgsage. Per query: before, after, speedup; the indexes
   with their real size (pg_relation_size). Before and after each take ``--runs`` passes (the
   first before pass is the workload; later passes skip queries that timed out) and a query's
   time is its best pass, so neither side pays alone for cold caches or the proxy's first sight
   of a statement.

Writes ``bench/results/tpch.json`` (``tpch_speedup`` = total before / total after) and sets
``tpch_speedup`` in ``bench/results/advisor.json`` when that file exists; prints a table.
The advisor's indexes are dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.gain import _drop_ours
from bench.overhead import Upstream, free_port, start_pgsage
from bench.tpch_queries import NAMES, queries
from bench.warehouse import connect_kwargs
from models.advisor import AdvisorConfig, active_pins, advise, apply_recommendation
from optimizer.fingerprint import compute_fingerprint
from optimizer.whatif import quote_ident

RESULTS = Path(__file__).parent / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "pgsage_tpch"
MB = 1024 * 1024
PIN_RELOAD_S = 2  # pgsage's steering_eval_interval in a --validate run (it reloads pins)

#: load order, rows per unit of scale (lineitem is approximate), and the primary keys
TABLES: dict[str, tuple[float, tuple[str, ...]]] = {
    "region": (0, ("r_regionkey",)),
    "nation": (0, ("n_nationkey",)),
    "supplier": (10_000, ("s_suppkey",)),
    "customer": (150_000, ("c_custkey",)),
    "part": (200_000, ("p_partkey",)),
    "partsupp": (800_000, ("ps_partkey", "ps_suppkey")),
    "orders": (1_500_000, ("o_orderkey",)),
    "lineitem": (6_000_000, ("l_orderkey", "l_linenumber")),
}
FIXED_ROWS = {"region": 5, "nation": 25}

COLUMNS: dict[str, str] = {
    "region": "r_regionkey integer not null, r_name char(25) not null, r_comment varchar(152)",
    "nation": "n_nationkey integer not null, n_name char(25) not null,"
    " n_regionkey integer not null, n_comment varchar(152)",
    "supplier": "s_suppkey integer not null, s_name char(25) not null,"
    " s_address varchar(40) not null, s_nationkey integer not null, s_phone char(15) not null,"
    " s_acctbal numeric(15, 2) not null, s_comment varchar(101) not null",
    "customer": "c_custkey integer not null, c_name varchar(25) not null,"
    " c_address varchar(40) not null, c_nationkey integer not null, c_phone char(15) not null,"
    " c_acctbal numeric(15, 2) not null, c_mktsegment char(10) not null,"
    " c_comment varchar(117) not null",
    "part": "p_partkey integer not null, p_name varchar(55) not null, p_mfgr char(25) not null,"
    " p_brand char(10) not null, p_type varchar(25) not null, p_size integer not null,"
    " p_container char(10) not null, p_retailprice numeric(15, 2) not null,"
    " p_comment varchar(23) not null",
    "partsupp": "ps_partkey integer not null, ps_suppkey integer not null,"
    " ps_availqty integer not null, ps_supplycost numeric(15, 2) not null,"
    " ps_comment varchar(199) not null",
    "orders": "o_orderkey integer not null, o_custkey integer not null,"
    " o_orderstatus char(1) not null, o_totalprice numeric(15, 2) not null,"
    " o_orderdate date not null, o_orderpriority char(15) not null,"
    " o_clerk char(15) not null, o_shippriority integer not null,"
    " o_comment varchar(79) not null",
    "lineitem": "l_orderkey integer not null, l_partkey integer not null,"
    " l_suppkey integer not null, l_linenumber integer not null,"
    " l_quantity numeric(15, 2) not null, l_extendedprice numeric(15, 2) not null,"
    " l_discount numeric(15, 2) not null, l_tax numeric(15, 2) not null,"
    " l_returnflag char(1) not null, l_linestatus char(1) not null,"
    " l_shipdate date not null, l_commitdate date not null, l_receiptdate date not null,"
    " l_shipinstruct char(25) not null, l_shipmode char(10) not null,"
    " l_comment varchar(44) not null",
}


def _marker(scale: float) -> str:
    return f"pgsage tpch scale={scale:g} complete"


def _tpchgen() -> str:
    here = Path(sys.executable).parent / "tpchgen-cli"
    found = str(here) if here.exists() else shutil.which("tpchgen-cli")
    if not found:
        raise SystemExit("tpchgen-cli not found: pip install tpchgen-cli (the test extras)")
    return found


def _pgsage_bin() -> str:
    here = Path(sys.executable).parent / "pgsage"
    found = str(here) if here.exists() else shutil.which("pgsage")
    if not found:
        raise SystemExit("pgsage not found: pip install -e .")
    return found


# ------------------------------------------------------------------------------ data


async def ensure_database(dsn: str, database: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f"CREATE DATABASE {quote_ident(database)}")
    finally:
        await conn.close()


async def loaded_scale(conn: Any) -> float | None:
    """The scale of a complete earlier load (the comment on lineitem), else None."""
    comment = await conn.fetchval(
        "SELECT obj_description(to_regclass('public.lineitem'), 'pg_class')"
    )
    if not comment or not comment.startswith("pgsage tpch scale=") or "complete" not in comment:
        return None
    return float(comment.split("=", 1)[1].split()[0])


async def _generate(
    scale: float, table: str, advance: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """tpchgen-cli's CSV of one table, chunk by chunk (the header line included).

    A plain Popen read in a worker thread: asyncio's child watcher lost the exit status of
    these short-lived children now and then ("Unknown child process pid")."""
    proc = subprocess.Popen(
        [_tpchgen(), "csv", "-s", f"{scale:g}", "-T", table, "--stdout", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout = cast(io.BufferedReader, proc.stdout)
    loop = asyncio.get_running_loop()
    complete = False
    try:
        while chunk := await loop.run_in_executor(None, stdout.read1, 1 * MB):
            advance(chunk.count(b"\n"))
            yield chunk
        complete = True
    finally:
        if not complete:
            proc.kill()
        rc = await loop.run_in_executor(None, proc.wait)
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        if complete and rc != 0:
            raise RuntimeError(f"tpchgen-cli -T {table} exited {rc}: {err[-500:]}")


async def load(conn: Any, scale: float, console: Console) -> dict[str, Any]:
    """Drop and create the 8 tables, COPY tpchgen-cli's CSV in, primary keys, ANALYZE."""
    t0 = time.perf_counter()
    for table in reversed(TABLES):
        await conn.execute(f"DROP TABLE IF EXISTS public.{quote_ident(table)} CASCADE")
    rows: dict[str, int] = {}
    columns = [
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        tasks = {
            t: bar.add_task(t, total=FIXED_ROWS.get(t) or max(int(per * scale), 1), start=False)
            for t, (per, _) in TABLES.items()
        }
        for table, (_, pk) in TABLES.items():
            task = tasks[table]
            bar.start_task(task)
            await conn.execute(f"CREATE TABLE public.{quote_ident(table)} ({COLUMNS[table]})")
            source = _generate(scale, table, functools.partial(bar.advance, task))
            status = await conn.copy_to_table(
                table, schema_name="public", source=source, format="csv", header=True
            )
            rows[table] = int(status.split()[-1])
            keys = ", ".join(quote_ident(c) for c in pk)
            await conn.execute(f"ALTER TABLE public.{quote_ident(table)} ADD PRIMARY KEY ({keys})")
            bar.update(task, total=rows[table], completed=rows[table])
    console.print("ANALYZE ...")
    await conn.execute("VACUUM (ANALYZE) " + ", ".join(f"public.{quote_ident(t)}" for t in TABLES))
    await conn.execute(f"COMMENT ON TABLE public.lineitem IS '{_marker(scale)}'")
    seconds = time.perf_counter() - t0
    console.print(f"loaded scale {scale:g} in {seconds:.0f} s: {rows}")
    return {"rows": rows, "seconds": seconds}


# ------------------------------------------------------------------------------ running


async def run_queries(
    port: int,
    database: str,
    texts: dict[int, str],
    timeout_s: float,
    label: str,
    console: Console,
) -> list[dict[str, Any]]:
    """Each query once through pgsage (simple protocol) under statement_timeout."""
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database=database, timeout=30
    )
    out = []
    try:
        await conn.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")
        for n, sql in texts.items():
            t = time.perf_counter()
            row: dict[str, Any] = {"query": n, "timed_out": False}
            try:
                tag = await conn.execute(sql)
                row["rows"] = int(tag.split()[-1]) if tag.split()[-1].isdigit() else None
                row["ms"] = (time.perf_counter() - t) * 1000.0
            except asyncpg.QueryCanceledError:
                row.update(ms=timeout_s * 1000.0, timed_out=True, rows=None)
            except asyncpg.PostgresError as exc:
                row.update(ms=None, rows=None, error=f"{type(exc).__name__}: {exc}")
            out.append(row)
            what = "TIMEOUT" if row["timed_out"] else row.get("error") or f"{row['rows']} rows"
            ms = row["ms"]
            console.print(
                f"{label} Q{n:<2} {NAMES[n]:<36} "
                f"{'' if ms is None else f'{ms / 1000:9.2f} s'}  {what}"
            )
    finally:
        await conn.close()
    return out


async def best_of(
    first: list[dict[str, Any]],
    args: argparse.Namespace,
    port: int,
    texts: dict[int, str],
    label: str,
    console: Console,
) -> list[dict[str, Any]]:
    """`--runs` passes in all: each later pass reruns the queries that neither timed out nor
    failed; a query's time is its best pass (a timeout stays the timeout value)."""
    best = {r["query"]: dict(r, runs=[r["ms"]]) for r in first}
    for k in range(2, args.runs + 1):
        again = {n: texts[n] for n, r in best.items() if not r["timed_out"] and r["ms"] is not None}
        for r in await run_queries(
            port, args.database, again, args.timeout, f"{label} #{k}", console
        ):
            b = best[r["query"]]
            b["runs"].append(r["ms"])
            if r["ms"] is not None and not r["timed_out"] and r["ms"] < b["ms"]:
                b.update(ms=r["ms"], rows=r["rows"])
    return [best[r["query"]] for r in first]


async def wait_logged(conn: Any, database: str, n: int, timeout: float = 60.0) -> int:
    """Wait until pgsage's query log worker has written `n` SELECTs of the database."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = int(
            await conn.fetchval(
                "SELECT count(*) FROM metadata.query_logs WHERE database_name = $1"
                " AND command = 'SELECT' AND status = 'ok' AND NOT is_catalog",
                database,
            )
        )
        if count >= n:
            break
        await asyncio.sleep(0.5)
    return count


async def _wait_metadata(conn: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await conn.fetchval("SELECT to_regclass('metadata.optimization_history') IS NOT NULL"):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("pgsage did not create its metadata schema in the TPC-H database")


async def _index_sizes(conn: Any, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in recs:
        schema = r["table"].partition(".")[0]
        size = await conn.fetchval(
            "SELECT pg_relation_size(to_regclass($1))",
            f"{quote_ident(schema)}.{quote_ident(r['index_name'])}",
        )
        out.append(
            {
                "rank": r["rank"],
                "index": r["label"],
                "index_name": r["index_name"],
                "status": r["status"],
                "est_size_bytes": r["size_bytes"],
                "size_bytes": None if size is None else int(size),
                "est_gain_share": r["est_gain_share"],
                "fingerprints": len(r["fingerprints"]),
                "measured_speedup": r.get("measured_speedup"),
                "reason": r.get("reason"),
            }
        )
    return out


def _speedup(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or after <= 0:
        return None
    return before / after


# ------------------------------------------------------------------------------ the bench


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    t0 = time.perf_counter()
    await ensure_database(args.dsn, args.database)
    conn = await asyncpg.connect(**connect_kwargs(args.dsn, args.database))
    result: dict[str, Any] = {
        "mode": "tpch",
        "created_at": datetime.now(UTC).isoformat(),
        "scale": args.scale,
        "database": args.database,
        "timeout_s": args.timeout,
        "budget_bytes": int(args.budget_mb * MB),
        "validate": args.validate,
    }
    workdir = Path(tempfile.mkdtemp(prefix="pgsage-tpch-"))
    pgsage = None
    try:
        have = await loaded_scale(conn)
        if args.reload or have != args.scale:
            console.print(
                f"loading TPC-H scale {args.scale:g} into {args.database}"
                + (" (--reload)" if args.reload and have is not None else "")
            )
            result["load"] = await load(conn, args.scale, console)
        else:
            console.print(f"{args.database} holds TPC-H scale {have:g}: loading skipped")
        up = Upstream(args.upstream_host, args.upstream_port, "postgres")
        port, http_port = free_port(), free_port()
        env = {"PGSAGE_LOG_PARAMETERS": "true"}
        if args.validate:  # pins only: the advisor's, applied by plan steering
            env |= {
                "PGSAGE_STEERING_ENABLED": "true",
                "PGSAGE_STEERING_MIN_MS": "1e12",
                "PGSAGE_STEERING_EVAL_INTERVAL": str(PIN_RELOAD_S),
            }
        pgsage = start_pgsage(
            up, workdir, port, http_port, _pgsage_bin(), args.database, None, env, name="pgsage"
        )
        pgsage.wait_ready(
            "127.0.0.1", port, lambda: up.psql("SELECT 1", args.database, port), timeout=60
        )
        console.print(f"pgsage serving on 127.0.0.1:{port} (log_parameters on, logs {workdir})")
        await _wait_metadata(conn)
        await _drop_ours(conn)
        await conn.execute("TRUNCATE metadata.query_logs")
        # (and their pins: an earlier run's would steer this run's before pass)
        await conn.execute(
            "DELETE FROM metadata.optimization_history WHERE kind = 'index'"
            " OR (kind = 'steering' AND action = 'pin')"
        )
        texts = queries(args.scale)
        if args.only:
            texts = {n: texts[n] for n in args.only}

        first = await run_queries(port, args.database, texts, args.timeout, "before", console)
        ok = sum(1 for r in first if not r["timed_out"] and r["ms"] is not None)
        logged = await wait_logged(conn, args.database, ok)
        console.print(f"pgsage logged {logged} SELECT executions ({ok} queries completed)")
        before = await best_of(first, args, port, texts, "before", console)

        db_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        share = args.budget_mb * MB / db_bytes
        config = AdvisorConfig(
            budget_share=share,
            database=args.database,
            statement_timeout_ms=int(
                (args.validate_timeout if args.validate else args.timeout) * 1000
            ),
            replay_repeats=args.replay_repeats,
            max_pins=args.max_pins if args.validate else 0,
        )

        def say(stage: str, fraction: float) -> None:
            if fraction >= 1.0:
                console.print(f"advisor: {stage} done")

        ta = time.perf_counter()
        report = await advise(conn, config=config, progress=say)
        advise_s = time.perf_counter() - ta
        console.print(
            f"advisor: {len(report.recommendations)} recommendations from {report.candidates}"
            f" candidates ({report.method}, {report.ranker}) in {advise_s:.1f} s"
        )
        for note in report.notes:
            console.print(f"  note: {note}")
        applied = []
        tb = time.perf_counter()
        for rec in report.recommendations:
            console.print(f"building {rec['label']} ...")
            done = await apply_recommendation(
                conn, rec["id"], validate=args.validate, config=config
            )
            applied.append(done)
            console.print(f"  {done['status']}" + (f": {done['reason']}" if done["reason"] else ""))
        await conn.execute("ANALYZE")
        build_s = time.perf_counter() - tb
        pins = await active_pins(conn)
        if pins:  # let pgsage's steering load them before the after pass
            console.print(f"pins: {pins}; waiting for pgsage to load them")
            await asyncio.sleep(2 * PIN_RELOAD_S + 1)
        indexes = await _index_sizes(conn, applied)
        used = sum(ix["size_bytes"] or 0 for ix in indexes)

        after = await run_queries(port, args.database, texts, args.timeout, "after ", console)
        after = await best_of(after, args, port, texts, "after ", console)
        rows = []
        for b, a in zip(before, after, strict=True):
            rows.append(
                {
                    "query": b["query"],
                    "name": NAMES[b["query"]],
                    "before_ms": b["ms"],
                    "after_ms": a["ms"],
                    "speedup": _speedup(b["ms"], a["ms"]),
                    "rows": a["rows"] if a["rows"] is not None else b["rows"],
                    "before_runs_ms": b["runs"],
                    "after_runs_ms": a["runs"],
                    "before_timed_out": b["timed_out"],
                    "after_timed_out": a["timed_out"],
                    **({"error": b.get("error") or a.get("error")} if "error" in b | a else {}),
                }
            )
        total_b = sum(r["before_ms"] or 0.0 for r in rows)
        total_a = sum(r["after_ms"] or 0.0 for r in rows)
        slower = [r["query"] for r in rows if r["speedup"] is not None and r["speedup"] < 1 / 1.1]
        result.update(
            {
                "queries": rows,
                "total_before_s": total_b / 1000.0,
                "total_after_s": total_a / 1000.0,
                "tpch_speedup": total_b / total_a if total_a > 0 else None,
                "timed_out_before": [r["query"] for r in rows if r["before_timed_out"]],
                "timed_out_after": [r["query"] for r in rows if r["after_timed_out"]],
                "slower_by_10pct": slower,
                "over_5s_after": [
                    r["query"] for r in rows if r["after_ms"] is not None and r["after_ms"] > 5000
                ],
                "advisor": {
                    "method": report.method,
                    "ranker": report.ranker,
                    "candidates": report.candidates,
                    "evaluated": report.evaluated,
                    "fingerprints": report.fingerprints,
                    "logged": logged,
                    "budget_share": share,
                    "budget_bytes": report.budget_bytes,
                    "notes": report.notes,
                    "advise_seconds": advise_s,
                    "build_seconds": build_s,
                },
                "indexes": indexes,
                "validation": [_validation(r) for r in applied] if args.validate else None,
                "pins": [
                    {"query": _query_of(fp, texts), "fingerprint": fp, "arm": arm}
                    for fp, arm in pins.items()
                ],
                "storage_used_bytes": used,
                "database_bytes": db_bytes,
                "storage_used_share": used / db_bytes if db_bytes else None,
            }
        )
        if not args.keep:
            await _drop_ours(conn)
            await conn.execute(
                "UPDATE metadata.optimization_history SET status = 'withdrawn'"
                " WHERE kind = 'steering' AND action = 'pin' AND status = 'active'"
            )
    finally:
        if pgsage is not None:
            pgsage.stop()
        await conn.close()
    shutil.rmtree(workdir, ignore_errors=True)  # kept (pgsage.log) when the run failed
    result["seconds"] = time.perf_counter() - t0
    return result


def _validation(rec: dict[str, Any]) -> dict[str, Any]:
    """What the advisor's validation decided for one index, and on what evidence."""
    v = (rec.get("detail") or {}).get("validation") or {}
    return {
        "index": rec["index_name"],
        "status": rec["status"],
        "reason": rec.get("reason"),
        "speedup": v.get("speedup"),
        "p_value": v.get("p_value"),
        "regressions": v.get("regressions", []),
        "pins": {fp: pin["arm"] for fp, pin in (v.get("pins") or {}).items()},
        "timeouts": v.get("timeouts"),
    }


def _query_of(fingerprint: str, texts: dict[int, str]) -> int | None:
    """The TPC-H query number of a logged fingerprint."""
    return next((n for n, sql in texts.items() if compute_fingerprint(sql).id == fingerprint), None)


def render(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"TPC-H SF{result['scale']:g} through pgsage: before / after the advisor's indexes"
    )
    for col in ("Q", "name", "rows", "before", "after", "speedup"):
        table.add_column(col, justify="left" if col == "name" else "right")

    def sec(ms: float | None, timed_out: bool) -> str:
        if ms is None:
            return "error"
        return f"{ms / 1000:.2f} s" + (" (timeout)" if timed_out else "")

    for r in result["queries"]:
        sp = r["speedup"]
        style = "red" if sp is not None and sp < 1 / 1.1 else None
        table.add_row(
            str(r["query"]),
            r["name"],
            "" if r["rows"] is None else str(r["rows"]),
            sec(r["before_ms"], r["before_timed_out"]),
            sec(r["after_ms"], r["after_timed_out"]),
            "" if sp is None else f"{sp:.2f}x",
            style=style,
        )
    ix = "; ".join(
        f"{i['index']} {(i['size_bytes'] or 0) / MB:.0f} MB ({i['status']})"
        for i in result["indexes"]
    )
    sp = result["tpch_speedup"]
    table.caption = (
        f"total {result['total_before_s']:.1f} s -> {result['total_after_s']:.1f} s"
        f" ({'n/a' if sp is None else f'{sp:.2f}x'}); indexes"
        f" {result['storage_used_bytes'] / MB:.0f} MB of a"
        f" {result['budget_bytes'] / MB:.0f} MB budget: {ix or 'none'}"
    )
    reverted = [v for v in result.get("validation") or [] if v["status"] == "reverted"]
    if reverted:
        table.caption += "; reverted by validation: " + "; ".join(
            f"{v['index']} ({v['reason']})" for v in reverted
        )
    return table


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What advisor.json carries of a TPC-H result."""
    return {
        "tpch_speedup": result["tpch_speedup"],
        "tpch": {
            "scale": result["scale"],
            "total_before_s": result["total_before_s"],
            "total_after_s": result["total_after_s"],
            "storage_used_bytes": result["storage_used_bytes"],
            "timed_out_before": result["timed_out_before"],
            "timed_out_after": result["timed_out_after"],
            "slower_by_10pct": result["slower_by_10pct"],
            "validate": result.get("validate"),
            "validation": [
                {k: v[k] for k in ("index", "status", "reason", "speedup")}
                for v in result.get("validation") or []
            ],
            "pins": result.get("pins"),
            "created_at": result["created_at"],
            "details": "bench/results/tpch.json",
        },
    }


def tpch_summary() -> dict[str, Any]:
    """The last saved TPC-H result's summary (for bench.gain --advisor), or nulls."""
    path = RESULTS / "tpch.json"
    if path.exists():
        with contextlib.suppress(ValueError, KeyError):
            return summary(json.loads(path.read_text()))
    return {"tpch_speedup": None, "tpch": "not run: python -m bench.gain --advisor --tpch"}


def update_advisor_json(result: dict[str, Any]) -> bool:
    path = RESULTS / "advisor.json"
    if not path.exists():
        return False
    doc = json.loads(path.read_text())
    doc.update(summary(result))
    path.write_text(json.dumps(doc, default=str, indent=2))
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tpch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL (any database)")
    parser.add_argument("--database", default=DATABASE, help="the TPC-H database (kept)")
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, default=5432)
    parser.add_argument("--scale", type=float, default=1.0, help="TPC-H scale factor")
    parser.add_argument("--reload", action="store_true", help="load the data even if present")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per query")
    parser.add_argument("--budget-mb", type=float, default=500.0, help="index storage budget")
    parser.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the advisor's own replay validation per index (--no-validate: build them all)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=2,
        help="passes before and after (the first before pass is the workload); best counts",
    )
    parser.add_argument(
        "--validate-timeout",
        type=float,
        default=20.0,
        help="seconds per replayed run in --validate (a run cut by it counts as the limit)",
    )
    parser.add_argument("--replay-repeats", type=int, default=4, help="timed runs per query")
    parser.add_argument(
        "--max-pins", type=int, default=3, help="regressed queries an index may pin (--validate)"
    )
    parser.add_argument("--only", type=int, nargs="*", help="run only these query numbers")
    parser.add_argument("--keep", action="store_true", help="leave the advisor's indexes")
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    console = Console(stderr=True)
    result = asyncio.run(run(args, console))
    Console().print(render(result))
    print(json.dumps(result, default=str, indent=2))
    if not args.no_save and not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tpch.json").write_text(json.dumps(result, default=str, indent=2))
        if update_advisor_json(result):
            console.print("tpch_speedup set in bench/results/advisor.json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
