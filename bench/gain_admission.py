"""Admission control gain under a mixed load that saturates the database: on vs off, interleaved.

    python -m bench.gain_admission            # or: python -m bench.gain --admission
    python -m bench.gain_admission --short-clients 6 --long-clients 6 --seconds 20 --rounds 2

Two `pgsage serve` processes in front of the same PostgreSQL, one with `admission_enabled`
(at most `--limit` concurrent long statements, default one per upstream core, adapting down to
`--min-limit` from the upstream's load), one without.
Each phase runs, through one of them:

* dashboard clients repeating short queries (point lookups and small aggregates over a
  table of the bench's own) with a short think time, timing each;
* analyst clients running heavy CPU-bound aggregates back to back (about half a second each
  alone on this machine), enough of them to saturate every core.

Phases alternate off, on, off, on. Writes `bench/results/admission.json` with
`short_p95_ratio` (short-query p95 with admission off / on: >= 3 is the target),
`throughput_ratio` (statements completed per second, on / off) and `long_throughput_ratio`
(heavy statements completed, on / off), plus every phase, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.overhead import Upstream, free_port, start_pgsage

RESULTS = Path(__file__).parent / "results" / "admission.json"

SHORT = (
    "SELECT id, v, n FROM bench_adm.items WHERE id = $1",
    "SELECT count(*), avg(n) FROM bench_adm.items WHERE grp = $1",
    "SELECT v FROM bench_adm.items WHERE id BETWEEN $1 AND $1 + 20 ORDER BY id",
)
LONG = (
    "SELECT grp, count(*), avg(length(md5(v || g::text))) FROM bench_adm.items,"
    " generate_series(1, $1) g GROUP BY grp",
    "SELECT sum(sqrt(g::float8) * ln(g + 1)) FROM generate_series(1, $1 * 40000) g",
)
SETUP = """
CREATE SCHEMA IF NOT EXISTS bench_adm;
DROP TABLE IF EXISTS bench_adm.items;
CREATE TABLE bench_adm.items (id int PRIMARY KEY, grp int NOT NULL, v text, n numeric);
INSERT INTO bench_adm.items
    SELECT g, g % 100, md5(g::text), g / 7.0 FROM generate_series(1, 50000) g;
CREATE INDEX ON bench_adm.items (grp);
ANALYZE bench_adm.items;
"""


async def _phase(target: str, args: argparse.Namespace) -> dict[str, Any]:
    short_lat: list[float] = []
    long_lat: list[float] = []
    errors = 0
    stop = time.monotonic() + args.seconds

    async def dashboard(i: int) -> None:
        nonlocal errors
        rng = random.Random(i)
        conn = await asyncpg.connect(target)
        try:
            while time.monotonic() < stop:
                sql = rng.choice(SHORT)
                arg = rng.randint(1, 99) if "grp" in sql else rng.randint(1, 49_000)
                t0 = time.perf_counter()
                try:
                    await conn.fetch(sql, arg)
                    short_lat.append(time.perf_counter() - t0)
                except asyncpg.PostgresError:
                    errors += 1
                await asyncio.sleep(args.think)
        finally:
            await conn.close()

    async def analyst(i: int) -> None:
        nonlocal errors
        rng = random.Random(1000 + i)
        conn = await asyncpg.connect(target, command_timeout=300)
        try:
            while time.monotonic() < stop:
                sql = rng.choice(LONG)
                t0 = time.perf_counter()
                try:
                    await conn.fetch(sql, args.long_size)
                    long_lat.append(time.perf_counter() - t0)
                except asyncpg.PostgresError:
                    errors += 1
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(
        *(dashboard(i) for i in range(args.short_clients)),
        *(analyst(i) for i in range(args.long_clients)),
    )
    elapsed = time.monotonic() - started
    short_lat.sort()

    def q(values: list[float], p: float) -> float | None:
        return 1000 * values[min(len(values) - 1, int(len(values) * p))] if values else None

    return {
        "short_queries": len(short_lat),
        "long_queries": len(long_lat),
        "short_p50_ms": q(short_lat, 0.5),
        "short_p95_ms": q(short_lat, 0.95),
        "short_p99_ms": q(short_lat, 0.99),
        "long_mean_s": statistics.mean(long_lat) if long_lat else None,
        "throughput_qps": (len(short_lat) + len(long_lat)) / elapsed,
        "long_per_minute": 60 * len(long_lat) / elapsed,
        "errors": errors,
        "seconds": elapsed,
    }


async def _warm(target: str, args: argparse.Namespace) -> None:
    """Run each statement twice so admission control knows which are long."""
    conn = await asyncpg.connect(target)
    try:
        for sql in LONG:
            for _ in range(2):
                await conn.fetch(sql, args.long_size)
        for sql in SHORT:
            for _ in range(2):
                await conn.fetch(sql, 5)
    finally:
        await conn.close()


def benchmark(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    u = urlparse(args.dsn)
    host, port = u.hostname or "127.0.0.1", u.port or 5432
    db = args.database

    async def setup() -> None:
        admin = await asyncpg.connect(args.dsn)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
                await admin.execute(f'CREATE DATABASE "{db}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(host=host, port=port, user=u.username or "postgres",
                                     database=db)  # fmt: skip
        try:
            await conn.execute(SETUP)
        finally:
            await conn.close()

    asyncio.run(setup())
    workdir = Path(tempfile.mkdtemp(prefix="pgsage-gain-admission-"))
    upstream = Upstream(host, port, u.username or "postgres")
    limit = args.limit or os.cpu_count() or 2
    children, ports, http_ports = {}, {}, {}
    try:
        for mode, env in (
            ("off", {"PGSAGE_ADMISSION_ENABLED": "false"}),
            (
                "on",
                {
                    "PGSAGE_ADMISSION_ENABLED": "true",
                    "PGSAGE_ADMISSION_MAX_LIMIT": str(limit),
                    # the controller adapts between these from the upstream's load
                    "PGSAGE_ADMISSION_MIN_LIMIT": str(args.min_limit or 1),
                    "PGSAGE_ADMISSION_QUEUE_TIMEOUT": "300",
                },
            ),
        ):
            p, h = free_port(), free_port()
            children[mode] = start_pgsage(
                upstream, workdir, p, h, args.pgsage, db, None, env, name=f"pgsage-adm-{mode}"
            )
            ports[mode] = p
            http_ports[mode] = h
        for mode, child in children.items():
            child.wait_ready("127.0.0.1", ports[mode], lambda: None, timeout=60)
        targets = {m: f"postgresql://postgres@127.0.0.1:{p}/{db}" for m, p in ports.items()}
        for t in targets.values():
            asyncio.run(_warm(t, args))
        phases = []
        order = [m for _ in range(args.rounds) for m in ("off", "on")]
        with Progress(console=console, transient=True) as bars:
            task = bars.add_task("phases", total=len(order))
            for mode in order:
                row = asyncio.run(_phase(targets[mode], args))
                row["mode"] = mode
                if mode == "on":
                    hp = http_ports[mode]
                    row["limit_at_end"] = _gauge(hp, "pgsage_admission_limit")
                    row["load_per_core"] = _gauge(hp, "pgsage_admission_upstream_load")
                phases.append(row)
                bars.advance(task)
    finally:
        for child in children.values():
            child.stop()
    return summarise(phases, args, limit)


def _gauge(port: int, name: str) -> float | None:
    """A gauge's value from a pgsage's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def summarise(phases: list[dict[str, Any]], args: Any, limit: int) -> dict[str, Any]:
    def med(mode: str, key: str) -> float:
        return statistics.median(p[key] for p in phases if p["mode"] == mode)

    return {
        "benchmark": "admission",
        "short_p95_ratio": med("off", "short_p95_ms") / med("on", "short_p95_ms"),
        "short_p50_ratio": med("off", "short_p50_ms") / med("on", "short_p50_ms"),
        "throughput_ratio": med("on", "throughput_qps") / med("off", "throughput_qps"),
        "long_throughput_ratio": med("on", "long_per_minute") / med("off", "long_per_minute"),
        "errors": sum(p["errors"] for p in phases),
        "config": {
            "short_clients": args.short_clients,
            "long_clients": args.long_clients,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "limit": limit,
            "think_s": args.think,
            "cpus": os.cpu_count(),
        },
        "phases": phases,
    }


def render(doc: dict[str, Any]) -> Table:
    t = Table(title="admission control: mixed load, off vs on (interleaved)")
    for col in ("phase", "short p50 ms", "short p95 ms", "short p99 ms", "long/min", "qps",
                "errors", "limit at end"):  # fmt: skip
        t.add_column(col, justify="right")
    for i, p in enumerate(doc["phases"]):
        t.add_row(
            f"{i + 1} {p['mode']}",
            f"{p['short_p50_ms']:.1f}",
            f"{p['short_p95_ms']:.1f}",
            f"{p['short_p99_ms']:.1f}",
            f"{p['long_per_minute']:.0f}",
            f"{p['throughput_qps']:.0f}",
            str(p["errors"]),
            "" if p.get("limit_at_end") is None else f"{p['limit_at_end']:.0f}",
        )
    t.caption = (
        f"short p95 off/on {doc['short_p95_ratio']:.2f}x (target >= 3), throughput on/off "
        f"{doc['throughput_ratio']:.2f}, long statements on/off {doc['long_throughput_ratio']:.2f}"
    )
    return t


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gain_admission", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--database", default="pgsage_bench_admission")
    ap.add_argument("--short-clients", type=int, default=6)
    ap.add_argument("--long-clients", type=int, default=10)
    ap.add_argument("--long-size", type=int, default=60, help="work of one heavy statement")
    ap.add_argument("--think", type=float, default=0.02, help="seconds between short queries")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="long-lane slots (0: one per core)")
    ap.add_argument("--min-limit", type=int, default=0,
                    help="lowest the adaptive limit may go (0: 1)")  # fmt: skip
    ap.add_argument("--pgsage", default=str(Path(sys.executable).with_name("pgsage")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    doc = benchmark(args, Console(stderr=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "phases"}, indent=2))
    Console().print(render(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
