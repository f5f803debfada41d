"""Soak: many concurrent clients through `pgsage serve` for a long time (issue 13).

`python -m bench.soak --private-cluster --clients 100 --seconds 600` first starts a PostgreSQL
cluster of its own (initdb into a temporary directory with --pg-max-connections 300, on a free
port, as the `postgres` OS user when run as root; fsync off: it is thrown away; stopped and
removed at the end), so 100 clients fit whatever a shared server allows. Without
--private-cluster the run uses --upstream, in scratch databases dropped at the end. Then it
starts pgsage (a subprocess, as bench/overhead.py does; bench never imports proxy) with an admin
token in front of that server, and runs two workloads side by side, every answer compared with
the one PostgreSQL gave directly for the same statement (the data is static, so the direct
answers are computed once up front):

* checksum clients loop over simple-protocol (client-side binding), extended-protocol and
  prepared statements, transactions and an expected error on a static table: md5 checksums of
  row ranges, the rows themselves, aggregates;
* warehouse clients (--warehouse-clients, 30% by default) run the workload's read templates
  (bench/workload/templates.py) on a small warehouse built by bench.warehouse (bronze, silver,
  gold at --warehouse-scale), half of them through psycopg (simple, extended, prepared,
  transaction) and half through asyncpg (named prepared statements, binary results), the client
  paths of the workload runner. Parameters are drawn once by the workload's own Sampler; each
  (template, parameters) pair's direct answer is taken twice under different planner settings
  and the pairs whose answer depends on the plan (a LIMIT cutting through ties) are left out.
  Warehouse answers are compared as sorted rows.

Meanwhile the admin API (/api/v1/admin/status, bearer token) is polled for latency, and the RSS
and open file descriptors of the pgsage process are sampled; RSS growth is measured from the end
of the warm-up (--warmup; by default 10% of the run, at least 10 s and at most 60 s).

Targets (issue 13): zero unexpected errors, zero mismatches, RSS growth <= 10% after warm-up,
file descriptors flat, API p95 < 500 ms. Prints a rich table and JSON and writes
bench/results/soak.json (clients, seconds, errors, mismatches, rss_growth, api_p95_ms, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import psutil
import psycopg
from rich.console import Console
from rich.table import Table

from bench.overhead import RESULTS_DIR, BenchError, Upstream, free_port, start_pgsage, tail
from bench.warehouse import connect_kwargs, init_warehouse_async
from bench.workload.templates import REGULAR, Profile, Sampler

ROWS = 20_000
RANGES = 400  # distinct parameter sets per template
RSS_GROWTH_TARGET = 0.10
API_P95_TARGET_MS = 500.0
PG_BIN = Path(os.environ.get("PGSAGE_PGBIN", "/usr/lib/postgresql/15/bin"))
#: a query that has not answered after this long counts as an error (a hang)
QUERY_TIMEOUT = 120.0
#: planner settings of the second direct answer (a pair whose answer changes is left out)
OTHER_PLAN = (
    "SET enable_indexscan = off",
    "SET enable_bitmapscan = off",
    "SET enable_hashjoin = off",
    "SET enable_hashagg = off",
)

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


def sorted_digest(rows: Sequence[Any]) -> str:
    """Rows as a multiset: the order among ties may differ from plan to plan."""
    return hashlib.sha1(repr(sorted(tuple(map(str, r)) for r in rows)).encode()).hexdigest()


def ranges(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(RANGES):
        lo = rng.randrange(1, ROWS)
        out.append((lo, min(ROWS, lo + rng.choice([5, 50, 500]))))
    return out


# --------------------------------------------------------------------------- a private cluster


class PrivateCluster:
    """A throw-away PostgreSQL cluster: initdb into a temporary directory, trust auth, free port.

    initdb and pg_ctl refuse to run as root; as root they run as the `postgres` OS user (the
    approach of tests/fix_pgcluster.py, not imported: bench stands alone). `stop()` stops the
    server and removes the directory.
    """

    def __init__(
        self, pg_bin: Path, max_connections: int, shared_buffers: str, say: Any = print
    ) -> None:
        self.pg_bin = pg_bin
        self.max_connections = max_connections
        self.shared_buffers = shared_buffers
        self.say = say
        self.base: Path | None = None
        self.root = os.geteuid() == 0

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.base
            )
        except FileNotFoundError as exc:
            raise BenchError(f"{cmd[0]}: not found") from exc

    def start(self) -> Upstream:
        base = self.base = Path(tempfile.mkdtemp(prefix="pgsage_soak_pg_"))
        data, sock, log = base / "data", base / "sock", base / "server.log"
        sock.mkdir()
        if self.root:
            for path in (base, sock):
                shutil.chown(path, "postgres", "postgres")
        self.say(
            f"initdb of a private cluster in {base} (max_connections "
            f"{self.max_connections}, shared_buffers {self.shared_buffers})"
        )
        init = self._run(
            [
                str(self.pg_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        if init.returncode != 0:
            raise BenchError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        for _attempt in range(5):  # the port may be taken between choosing and binding it
            port = free_port()
            (data / "postgresql.auto.conf").write_text(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{sock}'\n"
                f"max_connections = {self.max_connections}\n"
                f"shared_buffers = '{self.shared_buffers}'\n"
                # a scratch cluster: durability buys nothing here
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_wal_size = '2GB'\n"
            )
            pg_ctl = [str(self.pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log)]
            if self._run([*pg_ctl, "-w", "-t", "60", "start"]).returncode == 0:
                self.say(f"private cluster up on 127.0.0.1:{port}")
                return Upstream("127.0.0.1", port, "postgres")
            self._stop_server()
        raise BenchError(f"could not start the private cluster:\n{tail(log, 30)}")

    def _stop_server(self) -> None:
        assert self.base is not None
        data = self.base / "data"
        if (data / "postmaster.pid").exists():
            self._run(
                [
                    str(self.pg_bin / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]
            )

    def stop(self) -> None:
        if self.base is None:
            return
        with contextlib.suppress(Exception):
            self._stop_server()
        deadline = time.monotonic() + 15
        while (self.base / "data" / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.base, ignore_errors=True)
        self.say("private cluster stopped and removed")
        self.base = None


@contextlib.contextmanager
def upstream_for(args: argparse.Namespace, say: Any) -> Iterator[tuple[Upstream, bool]]:
    """(the server to soak against, whether it is private)."""
    if not args.private_cluster:
        host, _, port_text = args.upstream.rpartition(":")
        yield Upstream(host, int(port_text), args.user), False
        return
    cluster = PrivateCluster(args.pg_bin, args.pg_max_connections, args.pg_shared_buffers, say)
    try:
        yield cluster.start(), True
    finally:
        cluster.stop()


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


# --------------------------------------------------------------------------- the warehouse

_PLACEHOLDER = re.compile(r"\$(\d+)")


def to_psycopg(sql: str) -> tuple[str, list[int]]:
    """`$n` placeholders to psycopg's `%s` (and the parameter index each one takes)."""
    order = [int(m.group(1)) - 1 for m in _PLACEHOLDER.finditer(sql)]
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%")), order


@dataclass(frozen=True)
class WarehouseQuery:
    """One read template with one parameter set, and its direct answers (sorted rows)."""

    template: str
    sql: str  # $n placeholders (asyncpg)
    params: tuple[Any, ...]
    pg_sql: str  # %s placeholders (psycopg)
    pg_params: tuple[Any, ...]
    want_psycopg: str
    want_asyncpg: str


@dataclass
class Warehouse:
    database: str
    scale: float
    seconds: dict[str, float]
    queries: list[WarehouseQuery]
    templates: int
    excluded: list[str]  # (template, params) pairs whose direct answer depends on the plan


async def prepare_warehouse(
    up: Upstream, database: str, scale: float, seed: int, per_template: int, say: Any
) -> Warehouse:
    """Build the warehouse (bench.warehouse), draw parameters, take the direct answers."""
    dsn = f"host={up.host} port={up.port} user={up.user} dbname={database}"
    t0 = time.perf_counter()
    say(f"building the warehouse {database} at scale {scale} (bench.warehouse)")
    await init_warehouse_async(dsn, scale, seed, database, progress=False)
    seconds = {"build": round(time.perf_counter() - t0, 1)}
    t1 = time.perf_counter()
    aconn = await asyncpg.connect(**connect_kwargs(dsn))
    pconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        sampler = Sampler(await Profile.load(aconn), np.random.default_rng(seed))
        reads = [t for t in REGULAR if not t.writes]
        drawn: list[tuple[Any, tuple[Any, ...]]] = []
        for t in reads:
            seen: list[tuple[Any, ...]] = []
            for _ in range(per_template):
                p = tuple(t.params(sampler))
                if p not in seen:
                    seen.append(p)
            drawn += [(t, p) for p in seen]

        async def answers() -> list[tuple[str, str]]:
            out = []
            for t, p in drawn:
                pg_sql, order = to_psycopg(t.sql)
                cur = await pconn.execute(pg_sql, [p[k] for k in order])
                out.append(
                    (
                        sorted_digest(await cur.fetchall()),
                        sorted_digest(await aconn.fetch(t.sql, *p)),
                    )
                )
            return out

        first = await answers()
        for stmt in OTHER_PLAN:
            await pconn.execute(stmt)
            await aconn.execute(stmt)
        second = await answers()
    finally:
        await aconn.close()
        await pconn.close()
    queries, excluded = [], []
    for (t, p), a, b in zip(drawn, first, second, strict=True):
        if a != b:
            excluded.append(f"{t.name} {p!r}")
            continue
        pg_sql, order = to_psycopg(t.sql)
        queries.append(WarehouseQuery(t.name, t.sql, p, pg_sql, tuple(p[k] for k in order), *a))
    seconds["direct_answers"] = round(time.perf_counter() - t1, 1)
    say(
        f"warehouse ready in {seconds['build']} s; {len(queries)} (template, parameters) pairs "
        f"over {len({q.template for q in queries})} templates, {len(excluded)} plan-dependent "
        "pairs left out"
    )
    return Warehouse(database, scale, seconds, queries, len(reads), excluded)


# --------------------------------------------------------------------------- clients


class Stats:
    def __init__(self) -> None:
        self.queries: Counter[str] = Counter()
        self.errors: list[str] = []
        self.error_count = 0
        self.mismatches: list[str] = []
        self.latencies: list[float] = []
        self.wh_latencies: list[float] = []
        self.expected_errors = 0
        self.reconnects = 0

    def error(self, who: str, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(f"{who}: {exc!r}")


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
            else:
                rows = await asyncio.wait_for(
                    psycopg_rows(conn, mode, TEMPLATES[name], params[i]), QUERY_TIMEOUT
                )
            stats.latencies.append(time.perf_counter() - t0)
            stats.queries[mode] += 1
            done += 1
            if rows is not None and digest(rows) != expected[(name, i)]:
                stats.mismatches.append(f"{mode} {name} {params[i]}")
        except (psycopg.Error, OSError, TimeoutError) as exc:
            stats.error(f"client {cid}", exc)
            if conn is not None:
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()
            conn = None
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.random() * 0.01)
    if conn is not None:
        await conn.close()


async def psycopg_rows(
    conn: psycopg.AsyncConnection[Any], mode: str, sql: str, params: Sequence[Any]
) -> list[Any]:
    """One statement by one of psycopg's paths."""
    if mode == "simple":
        cur: psycopg.AsyncCursor[Any] = psycopg.AsyncClientCursor(conn)  # a Query message
        await cur.execute(sql, params)
        return await cur.fetchall()
    if mode == "transaction":
        async with conn.transaction():
            cur = await conn.execute(sql, params)
            return await cur.fetchall()
    cur = await conn.execute(sql, params, prepare=mode == "prepared")
    return await cur.fetchall()


async def warehouse_client(
    cid: int,
    dsn: str,
    driver: str,
    queries: list[WarehouseQuery],
    stop_at: float,
    stats: Stats,
) -> None:
    """The workload's read templates through one driver, each answer against the direct one."""
    rng = random.Random(1_000_000 + cid)
    conn: Any = None
    done = 0
    while time.monotonic() < stop_at:
        try:
            if conn is None or done % 300 == 299:
                if conn is not None:
                    await conn.close()
                    stats.reconnects += 1
                if driver == "asyncpg":
                    conn = await asyncpg.connect(
                        **connect_kwargs(dsn),
                        server_settings={"application_name": f"soak-wh-{cid}"},
                    )
                else:
                    conn = await psycopg.AsyncConnection.connect(
                        dsn, autocommit=True, application_name=f"soak-wh-{cid}"
                    )
            q = rng.choice(queries)
            t0 = time.perf_counter()
            if driver == "asyncpg":
                mode = "wh_asyncpg"
                rows = await asyncio.wait_for(conn.fetch(q.sql, *q.params), QUERY_TIMEOUT)
                want = q.want_asyncpg
            else:
                mode = rng.choice(("simple", "extended", "prepared", "transaction"))
                rows = await asyncio.wait_for(
                    psycopg_rows(conn, mode, q.pg_sql, q.pg_params), QUERY_TIMEOUT
                )
                mode, want = f"wh_{mode}", q.want_psycopg
            stats.wh_latencies.append(time.perf_counter() - t0)
            stats.queries[mode] += 1
            done += 1
            if sorted_digest(rows) != want:
                stats.mismatches.append(f"{mode} {q.template} {q.params!r}")
        except (
            psycopg.Error,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            OSError,
            TimeoutError,
        ) as exc:
            stats.error(f"warehouse client {cid} ({driver})", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 10)
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


class MetricsSampler(threading.Thread):
    """pgsage's own gauges of what it holds (/metrics, every 5 s): the query log's backlog."""

    NAMES = (
        "pgsage_querylog_queue_records",
        "pgsage_querylog_written_total",
        'pgsage_querylog_dropped_total{reason="queue_full"}',
    )

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    values = {}
                    for line in http.get(self.url).text.splitlines():
                        name, _, value = line.rpartition(" ")
                        if name in self.NAMES:
                            values[name.split("{")[0]] = float(value)
                    self.samples.append((time.monotonic(), values))
                self.stop.wait(5.0)


# --------------------------------------------------------------------------- the run


def split_clients(args: argparse.Namespace) -> tuple[int, int]:
    """(checksum clients, warehouse clients)."""
    share = args.warehouse_clients
    wh = round(args.clients * share) if share < 1 else int(share)
    wh = max(0, min(args.clients, wh)) if args.warehouse_scale > 0 else 0
    return args.clients - wh, wh


def run_soak(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    with upstream_for(args, err.print) as (up, private):
        return soak(args, up, private, err)


def soak(args: argparse.Namespace, up: Upstream, private: bool, err: Console) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    db, wh, whdata = f"pgsage_soak_{tag}", f"pgsage_soak_wh_{tag}", f"pgsage_soak_data_{tag}"
    n_checksum, n_warehouse = split_clients(args)
    max_connections = int(up.psql("SHOW max_connections"))
    if args.clients + 10 > max_connections:
        err.print(
            f"[yellow]warning:[/yellow] the upstream allows {max_connections} connections; "
            f"{args.clients} clients plus pgsage's own and other sessions may exceed it "
            "(its FATAL 53300 then counts as an error): use --private-cluster"
        )
    up.psql(f'CREATE DATABASE "{db}"')
    up.psql(f'CREATE DATABASE "{wh}"')
    direct = f"host={up.host} port={up.port} user={up.user} dbname={db}"
    token = secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="pgsage_soak_"))
    port, http_port = free_port(), free_port()
    child = None
    warehouse: Warehouse | None = None
    try:
        err.print(f"preparing {ROWS:,} rows and the direct answers in {db}")
        setup_database(direct)
        params = ranges(args.seed)
        expected = expected_answers(direct, params)
        if n_warehouse:
            warehouse = asyncio.run(
                prepare_warehouse(
                    up, whdata, args.warehouse_scale, args.seed, args.warehouse_params, err.print
                )
            )
        env = {"PGSAGE_ADMIN_TOKEN": token, "PGSAGE_MAX_CLIENT_CONNECTIONS": str(args.clients + 50)}
        env.update(kv.split("=", 1) for kv in args.pgsage_env)
        child = start_pgsage(up, workdir, port, http_port, args.pgsage_bin, wh, None, env)
        proxied = f"host=127.0.0.1 port={port} user={up.user} dbname={db} connect_timeout=10"
        proxied_wh = f"host=127.0.0.1 port={port} user={up.user} dbname={whdata} connect_timeout=10"

        def check() -> None:
            try:  # a slow start is retried until wait_ready's deadline
                with psycopg.connect(proxied) as c:
                    c.execute("select 1")
            except psycopg.OperationalError as exc:
                raise BenchError(str(exc)) from exc

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
        metrics = MetricsSampler(f"http://127.0.0.1:{http_port}/metrics")
        api = ApiPoller(f"http://127.0.0.1:{http_port}/api/v1/admin/status", token, 0.5)
        stats = Stats()
        sampler.start()
        metrics.start()
        api.start()
        err.print(
            f"{args.clients} clients ({n_checksum} checksum, {n_warehouse} warehouse) for "
            f"{args.seconds:g} s through pgsage on port {port}"
        )
        started = time.monotonic()

        async def all_clients() -> None:
            stop_at = time.monotonic() + args.seconds
            tasks = [
                client(i, proxied, params, expected, stop_at, stats) for i in range(n_checksum)
            ]
            if warehouse is not None:
                tasks += [
                    warehouse_client(
                        i,
                        proxied_wh,
                        ("psycopg", "asyncpg")[i % 2],
                        warehouse.queries,
                        stop_at,
                        stats,
                    )
                    for i in range(n_warehouse)
                ]
            await asyncio.gather(*tasks, progress(stop_at))

        async def progress(stop_at: float) -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(min(10.0, max(0.1, stop_at - time.monotonic())))
                n = sum(stats.queries.values())
                last = sampler.samples[-1] if sampler.samples else (0, 0, 0, 0)
                err.print(
                    f"  {time.monotonic() - started:5.0f} s: {n:,} queries, "
                    f"{stats.error_count} errors, {len(stats.mismatches)} mismatches, "
                    f"pgsage RSS {last[1] / 2**20:.0f} MiB, {last[2]} fds"
                )

        asyncio.run(all_clients())
        seconds = time.monotonic() - started
        time.sleep(2.0)  # closed sessions settle before the last samples
        sampler.stop.set()
        metrics.stop.set()
        api.stop.set()
        sampler.join(5)
        metrics.join(15)
        api.join(15)
        alive = child.proc.poll() is None
    finally:
        if child is not None:
            child.stop()
        if not private:  # a private cluster goes as a whole
            for name in (db, wh, whdata):
                up.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)
    doc = summarise(args, stats, sampler, api, (started, started + seconds), alive)
    doc["querylog"] = querylog_summary(metrics.samples, started + warmup_seconds(args))
    doc["clients_checksum"] = n_checksum
    doc["clients_warehouse"] = n_warehouse
    if warehouse is not None:
        doc["warehouse"] = {
            "scale": warehouse.scale,
            "seconds": warehouse.seconds,
            "templates": warehouse.templates,
            "templates_used": len({q.template for q in warehouse.queries}),
            "pairs": len(warehouse.queries),
            "pairs_left_out_plan_dependent": len(warehouse.excluded),
            "left_out_samples": warehouse.excluded[:10],
        }
    doc["upstream"] = "private cluster" if private else f"{up.host}:{up.port}"
    doc["upstream_max_connections"] = max_connections
    return doc


def querylog_summary(samples: list[tuple[float, dict[str, float]]], warm: float) -> dict[str, Any]:
    """The query log's backlog (records pgsage holds until its writer takes them) over time."""
    queue = [(t, v.get("pgsage_querylog_queue_records")) for t, v in samples]
    after = [q for t, q in queue if t >= warm and q is not None]
    last = samples[-1][1] if samples else {}
    return {
        "queue_after_warmup": after[0] if after else None,
        "queue_max": max(after, default=None),
        "queue_end": after[-1] if after else None,
        "queue_per_minute": [q for _, q in queue][::12],
        "written": last.get("pgsage_querylog_written_total"),
        "dropped_queue_full": last.get("pgsage_querylog_dropped_total"),
    }


def warmup_seconds(args: argparse.Namespace) -> float:
    if args.warmup is not None:
        return float(args.warmup)
    return min(60.0, max(10.0, args.seconds / 10))


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ms = np.array(values) * 1000 if values else np.zeros(1)
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return round(p50, 2), round(p95, 2), round(p99, 2)


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
    warmup = warmup_seconds(args)
    after = [s for s in samples if window[0] + warmup <= s[0] <= window[1]] or samples
    rss_warm = after[0][1] if after else 0
    rss_end = after[-1][1] if after else 0
    rss_peak = max((s[1] for s in after), default=0)
    fds = [s[2] for s in after]
    lat = percentiles(stats.latencies)
    wh_lat = percentiles(stats.wh_latencies)
    api_ms = np.array(api.latencies) * 1000 if api.latencies else np.zeros(1)
    queries = sum(stats.queries.values())
    rss_growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    # RSS once a minute (the shape of the curve, not only its ends)
    per_minute = [round(s[1] / 2**20, 1) for s in samples if s[0] <= window[1]][::60]
    doc = {
        "benchmark": "soak",
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "warmup_seconds": warmup,
        "queries": queries,
        "queries_per_second": round(queries / seconds, 1) if seconds else None,
        "by_mode": dict(sorted(stats.queries.items())),
        "errors": stats.error_count,
        "error_samples": stats.errors[:10],
        "expected_errors": stats.expected_errors,
        "mismatches": len(stats.mismatches),
        "mismatch_samples": stats.mismatches[:10],
        "reconnects": stats.reconnects,
        "latency_p50_ms": lat[0],
        "latency_p95_ms": lat[1],
        "latency_p99_ms": lat[2],
        "warehouse_latency_p50_ms": wh_lat[0],
        "warehouse_latency_p95_ms": wh_lat[1],
        "warehouse_latency_p99_ms": wh_lat[2],
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_peak_mib": round(rss_peak / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_growth, 4) if rss_growth is not None else None,
        "rss_per_minute_mib": per_minute,
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
        "api_max_ms": round(float(api_ms.max()), 1),
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
    keys = (
        "queries",
        "queries_per_second",
        "errors",
        "expected_errors",
        "mismatches",
        "latency_p50_ms",
        "latency_p95_ms",
        "warehouse_latency_p95_ms",
        "rss_after_warmup_mib",
        "rss_end_mib",
        "rss_growth",
        "fds_after_warmup",
        "fds_end",
        "api_requests",
        "api_p95_ms",
    )
    for key in keys:
        table.add_row(key.replace("_", " "), str(doc[key]))
    if "warehouse" in doc:
        w = doc["warehouse"]
        table.add_row("warehouse pairs (templates)", f"{w['pairs']} ({w['templates_used']})")
    q = doc.get("querylog")
    if q:
        table.add_row(
            "query log backlog after warm-up -> max -> end",
            f"{q['queue_after_warmup']} -> {q['queue_max']} -> {q['queue_end']}",
        )
    for target, met in doc["targets"].items():
        table.add_row(f"target {target}", "[green]met[/green]" if met else "[red]missed[/red]")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the RSS baseline (default: 10%% of the run, 10-60 s)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--upstream", default="127.0.0.1:5432")
    p.add_argument("--user", default="postgres")
    p.add_argument(
        "--private-cluster",
        action="store_true",
        help="soak against a PostgreSQL cluster of its own (initdb; removed after)",
    )
    p.add_argument("--pg-bin", type=Path, default=PG_BIN, help="initdb and pg_ctl are here")
    p.add_argument("--pg-max-connections", type=int, default=300)
    p.add_argument("--pg-shared-buffers", default="256MB")
    p.add_argument(
        "--warehouse-clients",
        type=float,
        default=0.3,
        help="clients on the warehouse templates: a share (< 1) or a count",
    )
    p.add_argument(
        "--warehouse-scale",
        type=float,
        default=0.05,
        help="bench.warehouse scale of the warehouse (0: no warehouse clients)",
    )
    p.add_argument(
        "--warehouse-params", type=int, default=8, help="parameter sets drawn per template"
    )
    p.add_argument("--pgsage-bin", default=str(Path(sys.executable).with_name("pgsage")))
    p.add_argument(
        "--pgsage-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of pgsage (repeatable), e.g. PGSAGE_QUERYLOG_ENABLED=false",
    )
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/soak.json")
    return p.parse_args(argv)


class Terminated(Exception):
    """SIGTERM: unwind like Ctrl-C, so the private cluster and pgsage are stopped."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        doc = run_soak(args, err)
    except BenchError as exc:
        err.print(f"[red]soak failed:[/red] {exc}")
        return 2
    except Terminated:
        err.print("[red]soak terminated[/red]")
        return 143
    Console().print(render(doc))
    print(json.dumps(doc, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
