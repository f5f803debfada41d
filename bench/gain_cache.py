"""Result cache gain on a dashboard-refresh workload: cache on vs off, interleaved, in one run.

    python -m bench.gain_cache                   # or: python -m bench.gain --cache
    python -m bench.gain_cache --clients 8 --seconds 20 --rounds 2 --scale 0.05

Two `pgsage serve` processes in front of the same PostgreSQL, one with `cache_enabled`, one
without; phases alternate off, on, off, on ... so drift of the machine hits both alike. In each
phase:

* dashboard clients (asyncpg: named prepared statements, as BI drivers use) repeat the gold
  queries of the workload's templates, each with a small fixed set of parameters (a dashboard's
  panels and filters), and record each query's latency;
* a writer updates a canary row of `gold.cache_canary` through the pgsage under test a few times
  a second, and a checker reads it through the same pgsage right after every write returns and
  in between: any value older than the last committed write is a stale read;
* the upstream's committed transactions (pg_stat_database) give the queries per second that
  reached PostgreSQL.

Writes `bench/results/cache.json` (`stale_reads`, `p50_speedup` = p50 off / p50 on,
`upstream_qps_ratio` = upstream QPS on / off, hit ratio, per-phase rows) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.overhead import Upstream, free_port, start_pgsage
from bench.warehouse import init_warehouse_async
from bench.workload.templates import TEMPLATES, Profile, Sampler

RESULTS = Path(__file__).parent / "results" / "cache.json"
CANARY_READ = "SELECT v FROM gold.cache_canary WHERE id = 1"


def dashboard_queries(profile: Profile, per_template: int, seed: int) -> list[tuple[str, tuple]]:
    """Gold-only read templates, each with a few fixed parameter sets (a dashboard's panels)."""
    sampler = Sampler(profile, np.random.default_rng(seed))
    out = []
    for t in TEMPLATES:
        if t.writes or t.anomaly_only or not t.tables:
            continue
        if not all(name.startswith("gold.") for name in t.tables):
            continue
        variants = {t.params(sampler) for _ in range(per_template * 3)}
        out.extend((t.sql, p) for p in sorted(variants, key=repr)[:per_template])
    return out


async def _upstream_xacts(dsn: str, database: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                database,
            )
        )
    finally:
        await conn.close()


async def _phase(
    target: str, args: argparse.Namespace, queries: list[tuple[str, tuple]], stats_dsn: str
) -> dict[str, Any]:
    """One phase against one pgsage; latencies, stale reads and upstream transactions."""
    latencies: list[float] = []
    stale = canary_reads = writes = 0
    committed = 0
    stop = time.monotonic() + args.seconds

    async def dashboard(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        conn = await asyncpg.connect(target, statement_cache_size=256)
        try:
            while time.monotonic() < stop:
                sql, params = rng.choice(queries)
                t0 = time.perf_counter()
                await conn.fetch(sql, *params)
                latencies.append(time.perf_counter() - t0)
        finally:
            await conn.close()

    async def writer() -> None:
        nonlocal writes, committed
        conn = await asyncpg.connect(target)
        try:
            while time.monotonic() < stop:
                value = int(await conn.fetchval(
                    "UPDATE gold.cache_canary SET v = v + 1 WHERE id = 1 RETURNING v"
                ))  # fmt: skip
                committed = value
                writes += 1
                await asyncio.sleep(1.0 / args.writes_per_second)
        finally:
            await conn.close()

    async def checker() -> None:
        nonlocal stale, canary_reads
        conn = await asyncpg.connect(target)
        try:
            while time.monotonic() < stop:
                expect = committed
                got = int(await conn.fetchval(CANARY_READ))
                canary_reads += 1
                if got < expect:
                    stale += 1
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    before = await _upstream_xacts(stats_dsn, args.database)
    started = time.monotonic()
    await asyncio.gather(
        *(dashboard(i) for i in range(args.clients)), writer(), checker()
    )  # fmt: skip
    elapsed = time.monotonic() - started
    after = await _upstream_xacts(stats_dsn, args.database)
    latencies.sort()
    return {
        "queries": len(latencies),
        "qps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p95_ms": 1000 * latencies[int(len(latencies) * 0.95)] if latencies else None,
        "upstream_qps": (after - before) / elapsed,
        "stale_reads": stale,
        "canary_reads": canary_reads,
        "writes": writes,
        "seconds": elapsed,
    }


def _hit_ratio(http_port: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read()
    except OSError:
        return None
    for line in text.decode().splitlines():
        if line.startswith("pgsage_cache_hit_ratio "):
            return float(line.split()[1])
    return None


async def prepare(args: argparse.Namespace, console: Console) -> list[tuple[str, tuple]]:
    await init_warehouse_async(args.dsn, args.scale, args.seed, args.database, progress=True)
    conn = await asyncpg.connect(args.dsn, database=args.database)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS gold.cache_canary (id int PRIMARY KEY, v bigint);"
            "INSERT INTO gold.cache_canary VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
        )
        profile = await Profile.load(conn)
    finally:
        await conn.close()
    queries = dashboard_queries(profile, args.variants, args.seed)
    console.print(f"[dim]{len(queries)} dashboard queries over the gold tables[/]")
    return queries


def benchmark(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    queries = asyncio.run(prepare(args, console))
    host, port = _host_port(args.dsn)
    upstream = Upstream(host, port, "postgres")
    workdir = Path(tempfile.mkdtemp(prefix="pgsage-gain-cache-"))
    children = {}
    ports = {}
    try:
        for mode, env in (
            ("off", {"PGSAGE_CACHE_ENABLED": "false"}),
            ("on", {"PGSAGE_CACHE_ENABLED": "true"}),
        ):
            p, h = free_port(), free_port()
            env = {**env, "PGSAGE_QUERYLOG_ENABLED": str(args.querylog).lower()}
            children[mode] = start_pgsage(
                upstream, workdir, p, h, args.pgsage, args.database, None, env,
                name=f"pgsage-cache-{mode}",
            )  # fmt: skip
            ports[mode] = (p, h)
        for mode, child in children.items():
            p, _ = ports[mode]
            child.wait_ready("127.0.0.1", p, lambda: None, timeout=60)
        phases: list[dict[str, Any]] = []
        order = [m for _ in range(args.rounds) for m in ("off", "on")]
        stats_dsn = _with_database(args.dsn, "postgres")
        with Progress(console=console, transient=True) as bars:
            task = bars.add_task("phases", total=len(order))
            for mode in order:
                p, _ = ports[mode]
                target = f"postgresql://postgres@127.0.0.1:{p}/{args.database}"
                row = asyncio.run(_phase(target, args, queries, stats_dsn))
                row["mode"] = mode
                phases.append(row)
                bars.advance(task)
        hit_ratio = _hit_ratio(ports["on"][1])
    finally:
        for child in children.values():
            child.stop()
    return summarise(phases, hit_ratio, args)


def _host_port(dsn: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    u = urlparse(dsn)
    return u.hostname or "127.0.0.1", u.port or 5432


def _with_database(dsn: str, database: str) -> str:
    from urllib.parse import urlparse, urlunparse

    return urlunparse(urlparse(dsn)._replace(path="/" + database))


def summarise(phases: list[dict[str, Any]], hit_ratio: float | None, args: Any) -> dict[str, Any]:
    def median_of(mode: str, key: str) -> float:
        return statistics.median(p[key] for p in phases if p["mode"] == mode and p[key])

    p50_off, p50_on = median_of("off", "p50_ms"), median_of("on", "p50_ms")
    up_off, up_on = median_of("off", "upstream_qps"), median_of("on", "upstream_qps")
    return {
        "benchmark": "cache",
        "stale_reads": sum(p["stale_reads"] for p in phases),
        "canary_reads": sum(p["canary_reads"] for p in phases),
        "writes": sum(p["writes"] for p in phases),
        "p50_speedup": p50_off / p50_on,
        "p95_speedup": median_of("off", "p95_ms") / median_of("on", "p95_ms"),
        "qps_ratio": median_of("on", "qps") / median_of("off", "qps"),
        "upstream_qps_ratio": up_on / up_off,
        "hit_ratio": hit_ratio,
        "config": {
            "clients": args.clients,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "scale": args.scale,
            "writes_per_second": args.writes_per_second,
            "querylog": args.querylog,
        },
        "phases": phases,
    }


def render(doc: dict[str, Any]) -> Table:
    table = Table(title="result cache: dashboard refresh, cache off vs on (interleaved)")
    for col in ("phase", "queries/s", "p50 ms", "p95 ms", "upstream qps", "stale", "writes"):
        table.add_column(col, justify="right")
    for i, p in enumerate(doc["phases"]):
        table.add_row(
            f"{i + 1} {p['mode']}",
            f"{p['qps']:.0f}",
            f"{p['p50_ms']:.3f}",
            f"{p['p95_ms']:.3f}",
            f"{p['upstream_qps']:.0f}",
            str(p["stale_reads"]),
            str(p["writes"]),
        )
    table.caption = (
        f"p50 speedup {doc['p50_speedup']:.2f}x, upstream QPS on/off "
        f"{doc['upstream_qps_ratio']:.2f}, hit ratio {doc['hit_ratio']}, "
        f"stale reads {doc['stale_reads']} of {doc['canary_reads']}"
    )
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gain_cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--database", default="pgsage_bench_cache")
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", type=int, default=5, help="parameter sets per template")
    ap.add_argument("--writes-per-second", type=float, default=5.0)
    ap.add_argument("--querylog", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--pgsage", default=str(Path(sys.executable).with_name("pgsage")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    doc = benchmark(args, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "phases"}, indent=2, default=str))
    Console().print(render(doc))
    return 0 if doc["stale_reads"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
