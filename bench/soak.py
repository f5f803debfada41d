"""Soak: many concurrent clients through `pgsage serve` for a long time (issue 13).

`python -m bench.soak --clients 100 --seconds 600` starts pgsage (a subprocess, as
bench/overhead.py does; bench never imports proxy) with an admin token and runs a checksum
workload: every client loops over simple-protocol (client-side binding), extended-protocol and
prepared statements, transactions and an expected error, and compares each result with the
answer PostgreSQL gave directly for the same statement (the data is static, so the direct
answers are computed once up front). Meanwhile the admin API (/api/v1/admin/status, bearer
token) is polled for latency, and the RSS and open file descriptors of the pgsage process are
sampled; RSS growth is measured from the end of the warm-up.

Targets (issue 13): zero unexpected errors, zero mismatches, RSS growth <= 10% after warm-up,
file descriptors flat, API p95 < 500 ms. Prints a rich table and JSON and writes
bench/results/soak.json (clients, seconds, errors, mismatches, rss_growth, api_p95_ms, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import psycopg
from rich.console import Console
from rich.table import Table

from bench.overhead import RESULTS_DIR, BenchError, Upstream, free_port, start_pgsage, tail

ROWS = 20_000
RANGES = 400  # distinct parameter sets per template
RSS_GROWTH_TARGET = 0.10
API_P95_TARGET_MS = 500.0

#: name -> (SQL with %s placeholders, parameters from a range (lo, hi))
TEMPLATES: dict[str, str] = {
    "checksum": "select md5(string_agg(id::text || ':' || v || ':' || n::text, ',' order by id))"
    " from soak_data where id between %s and %s",
    "rows": "select id, v, n from soak_data where id between %s and %s order by id",
    "aggregate": "select count(*), sum(n), min(v), max(v) from soak_data"
    " where id between %s and %s and v like 'v%%'",
}


def digest(rows: Sequence[tuple[Any, ...]]) -> str:
    return hashlib.sha1(repr([tuple(map(str, r)) for r in rows]).encode()).hexdigest()


def ranges(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(RANGES):
        lo = rng.randrange(1, ROWS)
        out.append((lo, min(ROWS, lo + rng.choice([5, 50, 500]))))
    return out


# --------------------------------------------------------------------------- setup


def setup_database(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table soak_data(id int primary key, v text not null, n numeric)")
        conn.execute(
            "insert into soak_data select g, 'v' || md5(g::text), (g * 7919 % 10007) / 7.0"
            f" from generate_series(1, {ROWS}) g"
        )
        conn.execute("analyze soak_data")


def expected_answers(dsn: str, params: list[tuple[int, int]]) -> dict[tuple[str, int], str]:
    """The direct answer of every (template, range) pair."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for name, sql in TEMPLATES.items():
            for i, p in enumerate(params):
                out[(name, i)] = digest(conn.execute(sql, p).fetchall())
    return out


# --------------------------------------------------------------------------- clients


class Stats:
    def __init__(self) -> None:
        self.queries: Counter[str] = Counter()
        self.errors: list[str] = []
        self.error_count = 0
        self.mismatches: list[str] = []
        self.latencies: list[float] = []
        self.expected_errors = 0
        self.reconnects = 0


async def client(
    cid: int,
    dsn: str,
    params: list[tuple[int, int]],
    expected: dict[tuple[str, int], str],
    stop_at: float,
    stats: Stats,
) -> None:
    rng = random.Random(cid)
    conn: psycopg.AsyncConnection[Any] | None = None
    done = 0
    while time.monotonic() < stop_at:
        try:
            if conn is None or done % 300 == 299:  # reconnect now and then
                if conn is not None:
                    await conn.close()
                    stats.reconnects += 1
                conn = await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, application_name=f"soak-{cid}"
                )
            mode = rng.choice(("simple", "extended", "prepared", "transaction", "error"))
            name = rng.choice(list(TEMPLATES))
            i = rng.randrange(len(params))
            t0 = time.perf_counter()
            if mode == "error":
                try:
                    await conn.execute("select 1 / (%s - %s)", (i, i))
                except psycopg.errors.DivisionByZero:
                    stats.expected_errors += 1
                else:
                    stats.mismatches.append("division by zero did not fail")
                rows = None
            elif mode == "simple":
                cur: psycopg.AsyncCursor[Any] = psycopg.AsyncClientCursor(conn)  # a Query message
                await cur.execute(TEMPLATES[name], params[i])
                rows = await cur.fetchall()
            elif mode == "transaction":
                async with conn.transaction():
                    cur = await conn.execute(TEMPLATES[name], params[i])
                    rows = await cur.fetchall()
            else:
                cur = await conn.execute(TEMPLATES[name], params[i], prepare=mode == "prepared")
                rows = await cur.fetchall()
            stats.latencies.append(time.perf_counter() - t0)
            stats.queries[mode] += 1
            done += 1
            if rows is not None and digest(rows) != expected[(name, i)]:
                stats.mismatches.append(f"{mode} {name} {params[i]}")
        except (psycopg.Error, OSError) as exc:
            stats.error_count += 1
            if len(stats.errors) < 20:
                stats.errors.append(f"client {cid}: {exc!r}")
            if conn is not None:
                await conn.close()
            conn = None
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.random() * 0.01)
    if conn is not None:
        await conn.close()


# --------------------------------------------------------------------------- watchers


class ApiPoller(threading.Thread):
    def __init__(self, url: str, token: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.interval = url, token, interval
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(headers=headers, timeout=10) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = http.get(self.url)
                    if r.status_code != 200 or "clients" not in r.json():
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        self.latencies.append(time.perf_counter() - t0)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.stop.wait(self.interval)


class ProcessSampler(threading.Thread):
    """RSS and open file descriptors of pgsage (and RSS of its children) every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, int, int]] = []  # (t, rss, fds, children rss)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                kids = sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.samples.append(
                    (time.monotonic(), self.proc.memory_info().rss, self.proc.num_fds(), kids)
                )
            except psutil.Error:
                pass
            self.stop.wait(1.0)


# --------------------------------------------------------------------------- the run


def run_soak(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    host, _, port_text = args.upstream.rpartition(":")
    up = Upstream(host, int(port_text), args.user)
    tag = uuid.uuid4().hex[:8]
    db, wh = f"pgsage_soak_{tag}", f"pgsage_soak_wh_{tag}"
    up.psql(f'CREATE DATABASE "{db}"')
    up.psql(f'CREATE DATABASE "{wh}"')
    direct = f"host={up.host} port={up.port} user={up.user} dbname={db}"
    max_connections = int(up.psql("SHOW max_connections"))
    if args.clients + 10 > max_connections:
        err.print(f"[yellow]warning:[/yellow] the upstream allows {max_connections} connections; "
                  f"{args.clients} clients plus pgsage's own and other sessions may exceed it "
                  "(its FATAL 53300 then counts as an error)")  # fmt: skip
    token = secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="pgsage_soak_"))
    port, http_port = free_port(), free_port()
    child = None
    try:
        err.print(f"preparing {ROWS:,} rows and the direct answers in {db}")
        setup_database(direct)
        params = ranges(args.seed)
        expected = expected_answers(direct, params)
        env = {"PGSAGE_ADMIN_TOKEN": token, "PGSAGE_MAX_CLIENT_CONNECTIONS": str(args.clients + 50)}
        child = start_pgsage(up, workdir, port, http_port, args.pgsage_bin, wh, None, env)
        proxied = f"host=127.0.0.1 port={port} user={up.user} dbname={db} connect_timeout=10"

        def check() -> None:
            with psycopg.connect(proxied) as c:
                c.execute("select 1")

        def check_http() -> None:
            check()
            try:
                httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).raise_for_status()
            except httpx.HTTPError as exc:
                raise OSError(f"HTTP endpoint not ready: {exc}") from exc

        try:
            child.wait_ready("127.0.0.1", port, check_http, timeout=60)
        except psycopg.Error as exc:
            raise BenchError(f"pgsage not ready: {exc}\n{tail(child.log)}") from exc
        sampler = ProcessSampler(child.proc.pid)
        api = ApiPoller(f"http://127.0.0.1:{http_port}/api/v1/admin/status", token, 0.5)
        stats = Stats()
        sampler.start()
        api.start()
        err.print(f"{args.clients} clients for {args.seconds} s through pgsage on port {port}")
        started = time.monotonic()

        async def all_clients() -> None:
            stop_at = time.monotonic() + args.seconds
            await asyncio.gather(
                *(
                    client(i, proxied, params, expected, stop_at, stats)
                    for i in range(args.clients)
                ),
                progress(stop_at),
            )

        async def progress(stop_at: float) -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(min(10.0, max(0.1, stop_at - time.monotonic())))
                n = sum(stats.queries.values())
                rss = sampler.samples[-1][1] / 2**20 if sampler.samples else 0
                err.print(f"  {time.monotonic() - started:5.0f} s: {n:,} queries, "
                          f"{stats.error_count} errors, {len(stats.mismatches)} mismatches, "
                          f"pgsage RSS {rss:.0f} MiB")  # fmt: skip

        asyncio.run(all_clients())
        seconds = time.monotonic() - started
        time.sleep(2.0)  # closed sessions settle before the last samples
        sampler.stop.set()
        api.stop.set()
        sampler.join(5)
        api.join(15)
        alive = child.proc.poll() is None
    finally:
        if child is not None:
            child.stop()
        for name in (db, wh):
            up.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    doc = summarise(args, stats, sampler, api, (started, started + seconds), alive)
    doc["upstream_max_connections"] = max_connections
    return doc


def summarise(
    args: argparse.Namespace,
    stats: Stats,
    sampler: ProcessSampler,
    api: ApiPoller,
    window: tuple[float, float],
    alive: bool,
) -> dict[str, Any]:
    samples = sampler.samples
    seconds = window[1] - window[0]
    after = [s for s in samples if window[0] + args.warmup <= s[0] <= window[1]] or samples
    rss_warm = after[0][1] if after else 0
    rss_end = after[-1][1] if after else 0
    rss_peak = max((s[1] for s in after), default=0)
    fds = [s[2] for s in after]
    lat = np.array(stats.latencies) * 1000 if stats.latencies else np.zeros(1)
    api_ms = np.array(api.latencies) * 1000 if api.latencies else np.zeros(1)
    queries = sum(stats.queries.values())
    rss_growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    doc = {
        "benchmark": "soak",
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "warmup_seconds": args.warmup,
        "queries": queries,
        "queries_per_second": round(queries / seconds, 1) if seconds else None,
        "by_mode": dict(stats.queries),
        "errors": stats.error_count,
        "error_samples": stats.errors[:10],
        "expected_errors": stats.expected_errors,
        "mismatches": len(stats.mismatches),
        "mismatch_samples": stats.mismatches[:10],
        "reconnects": stats.reconnects,
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "latency_p95_ms": round(float(np.percentile(lat, 95)), 2),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_peak_mib": round(rss_peak / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_growth, 4) if rss_growth is not None else None,
        "worker_rss_end_mib": round(samples[-1][3] / 2**20, 1) if samples else None,
        "fds_after_warmup": fds[0] if fds else None,
        "fds_max": max(fds) if fds else None,
        "fds_end": fds[-1] if fds else None,
        "fds_after_clients_left": samples[-1][2] if samples else None,
        "api_requests": len(api.latencies) + len(api.failures),
        "api_failures": len(api.failures),
        "api_failure_samples": api.failures[:5],
        "api_p50_ms": round(float(np.percentile(api_ms, 50)), 1),
        "api_p95_ms": round(float(np.percentile(api_ms, 95)), 1),
        "proxy_alive": alive,
    }
    doc["targets"] = {
        "errors == 0": doc["errors"] == 0,
        "mismatches == 0": doc["mismatches"] == 0,
        f"rss_growth <= {RSS_GROWTH_TARGET:.0%}": rss_growth is not None
        and rss_growth <= RSS_GROWTH_TARGET,
        "fds flat (end of run <= after warm-up + 5)": bool(fds)
        and doc["fds_end"] <= doc["fds_after_warmup"] + 5,
        f"api_p95_ms < {API_P95_TARGET_MS:g}": doc["api_p95_ms"] < API_P95_TARGET_MS
        and not api.failures,
        "pgsage alive": alive,
    }
    doc["ok"] = all(doc["targets"].values())
    return doc


def render(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pgsage soak: {doc['clients']} clients, {doc['seconds']} s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    keys = ("queries", "queries_per_second", "errors", "expected_errors", "mismatches",
            "latency_p50_ms", "latency_p95_ms", "rss_after_warmup_mib", "rss_end_mib",
            "rss_growth", "fds_after_warmup", "fds_end", "api_requests", "api_p95_ms")  # fmt: skip
    for key in keys:
        table.add_row(key.replace("_", " "), str(doc[key]))
    for target, met in doc["targets"].items():
        table.add_row(f"target {target}", "[green]met[/green]" if met else "[red]missed[/red]")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the RSS baseline")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--upstream", default="127.0.0.1:5432")
    p.add_argument("--user", default="postgres")
    p.add_argument("--pgsage-bin", default=str(Path(sys.executable).with_name("pgsage")))
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/soak.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    try:
        doc = run_soak(args, err)
    except BenchError as exc:
        err.print(f"[red]soak failed:[/red] {exc}")
        return 2
    Console().print(render(doc))
    print(json.dumps(doc, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
