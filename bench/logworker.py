"""The whole query log worker on a fixed stream, its features side by side in one run.

`python -m bench.logworker [--statements N] [--rounds R]` starts the log worker process
(`python -P -m proxy.telemetry.logworker`, as pgsage starts it) four times, with:

- full: cost predictions and anomaly detection on (pgsage's defaults),
- no predictions (`cost_serving = false`),
- no anomalies (`anomaly_enabled = false`),
- bare: neither, only fingerprints, aggregates, metrics and the COPY,

and feeds each the same `pgbench -S -M simple` stream (8 sessions, a random account id in each
text) in batches of one second's statements, as the proxy ships them. What it measures is the
worker's CPU per statement (user + system of its process, from /proc, best round; the sides
alternate within a round), and the CPU of the server backend its COPY runs in beside it. The
per-feature cost is the difference to the full worker. A live `pgbench` through pgsage cannot
tell a 5% change of the worker from the scatter between runs on a shared machine; this can.

Before measuring, predictions are made real: the full worker logs a warm-up, `pgsage train
cost` trains on that log (a scratch model directory), and the run waits until the worker's
rows carry a prediction. The statements are planned in `--dbname` (pgbench's tables, created
with `pgbench -i` when missing). Prints a table and the JSON, writes
`bench/results/logworker.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.logrows import admin
from bench.machine import warn_if_busy
from warehouse_sql import apply_migrations

RESULTS = Path(__file__).parent / "results" / "logworker.json"
META = "pgsage_bench_logworker"
PER_BATCH = 8_000  # statements per batch: about a second of pgbench -S -c 8 through pgsage
VARIANTS = {
    "full": {},
    "no predictions": {"cost_serving": False},
    "no anomalies": {"anomaly_enabled": False},
    "bare": {"cost_serving": False, "anomaly_enabled": False},
}
_LEN = struct.Struct("!I")
#: a batch's session identity as the proxy ships it (client address, database, user,
#: application name, TLS, application class); the database is filled in
SESSION = ("127.0.0.1:50000", "", "postgres", "pgbench", False, "other")


class BenchError(RuntimeError):
    pass


def ticks(pid: int) -> int:
    """User + system clock ticks of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class LogWorker:
    """One log worker process, spoken to as the proxy's logclient speaks to it."""

    def __init__(self, name: str, settings: dict[str, Any], connect: dict[str, Any],
                 model_dir: Path, workdir: Path) -> None:  # fmt: skip
        env = {
            **os.environ,
            "PGSAGE_LOGWORKER_SETTINGS": json.dumps(settings),
            "PGSAGE_LOGWORKER_CONNECT": json.dumps(connect),
            "PGSAGE_MODEL_DIR": str(model_dir),
        }
        self.name = name
        self.log = (workdir / f"{name.replace(' ', '-')}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "proxy.telemetry.logworker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
            cwd=workdir,
        )  # fmt: skip

    def request(self, request: tuple[Any, ...]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        body = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(_LEN.pack(len(body)) + body)
        self.proc.stdin.flush()
        header = self.proc.stdout.read(4)
        if len(header) < 4:
            raise BenchError(f"the {self.name} log worker exited (see {self.log.name})")
        reply = pickle.loads(self.proc.stdout.read(_LEN.unpack(header)[0]))
        return dict(reply[1])

    def stop(self) -> None:
        try:
            self.request(("stop",))
            self.proc.wait(30)
        except (BenchError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def batch(rng: random.Random, n: int, database: str) -> tuple[Any, ...]:
    """n pgbench -S statements over the last second (monotonic times, as the relay takes
    them), with the clock segment that maps them to epoch seconds."""
    now = time.monotonic()
    start = now - 1.0
    rows = []
    for i in range(n):
        t = start + i / n
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, 100_000)};"
        rows.append((1 + i % 8, "simple", sql, None, t, t + rng.uniform(1e-4, 4e-4), 1, "ok",
                     None, None, 0, 120, False, None, None, False))  # fmt: skip
    clock = [(now, time.time(), 1.0)]
    sessions = {sid: (SESSION[0], database, *SESSION[2:]) for sid in range(1, 9)}
    return ("batch", clock, sessions, rows, False)


async def prepare(args: argparse.Namespace) -> None:
    """A fresh metadata database, migrated; pgbench's tables in --dbname."""
    await admin(args, f'DROP DATABASE IF EXISTS "{args.meta}"', f'CREATE DATABASE "{args.meta}"')
    conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user, database=args.meta)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    try:
        conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user,
                                     database=args.dbname)  # fmt: skip
    except asyncpg.InvalidCatalogNameError:
        await admin(args, f'CREATE DATABASE "{args.dbname}"')
        conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user,
                                     database=args.dbname)  # fmt: skip
    try:
        ready = await conn.fetchval("SELECT to_regclass('public.pgbench_accounts') IS NOT NULL")
    finally:
        await conn.close()
    if not ready:
        subprocess.run(["pgbench", "-i", "-q", "-h", args.host, "-p", str(args.port), "-U",
                        args.user, args.dbname], check=True, capture_output=True)  # fmt: skip


async def predicted_rows(args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user, database=args.meta)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM metadata.query_logs WHERE predicted_cost_ms IS NOT NULL"
        ))  # fmt: skip
    finally:
        await conn.close()


async def backend_ticks(args: argparse.Namespace) -> dict[int, int]:
    """Clock ticks of the server backends of the log workers' COPYs, by pid."""
    conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user, database=args.meta)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsage-querylog'"
        )
    finally:
        await conn.close()
    out = {}
    for r in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):  # the server is elsewhere
            out[r["pid"]] = ticks(r["pid"])
    return out


def enable_predictions(args: argparse.Namespace, worker: LogWorker, rng: random.Random,
                       model_dir: Path, say: Any) -> str:  # fmt: skip
    """Log a warm-up, train the cost model on it, wait for predicted rows; the version."""
    for _ in range(3):
        worker.request(batch(rng, PER_BATCH // 4, args.dbname))
    dsn = f"postgresql://{args.user}@{args.host}:{args.port}/{args.meta}"
    say("predictions: pgsage train cost on the warm-up's log")
    out = subprocess.run(
        [sys.executable, "-P", "-m", "proxy.cli", "train", "cost", "--dsn", dsn,
         "--model-dir", str(model_dir), "--max-rows", "20000", "--n-iter", "2", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        trained = json.loads(out.stdout.strip().splitlines()[-1])[0]
    except (ValueError, LookupError) as exc:
        raise BenchError(f"pgsage train cost: {out.stdout[-300:]} {out.stderr[-300:]}") from exc
    if trained.get("status") != "active":
        raise BenchError(f"pgsage train cost: {trained.get('status')} ({trained.get('reason')})")
    deadline = time.monotonic() + 90
    while asyncio.run(predicted_rows(args)) == 0:
        if time.monotonic() > deadline:
            raise BenchError("no logged row carries a prediction 90 s after training")
        worker.request(batch(rng, PER_BATCH // 8, args.dbname))
        time.sleep(1.0)
    return f"{trained['name']}:v{trained['version']}"


def measure(
    args: argparse.Namespace, worker: LogWorker, rng: random.Random
) -> tuple[float, float | None]:
    """CPU µs per statement of the worker and of its COPY backend over `args.batches` batches."""
    before_backend = asyncio.run(backend_ticks(args))
    before = ticks(worker.proc.pid)
    for _ in range(args.batches):
        worker.request(batch(rng, PER_BATCH, args.dbname))
        time.sleep(0.25)  # (the detector scores on its own task, between batches)
    time.sleep(1.5)  # the last batch's scoring
    after = ticks(worker.proc.pid)
    after_backend = asyncio.run(backend_ticks(args))
    hz = os.sysconf("SC_CLK_TCK")
    n = args.batches * PER_BATCH
    ours = (after - before) / hz * 1e6 / n
    spent = [after_backend[p] - before_backend[p] for p in after_backend if p in before_backend]
    # every worker has its own backend; only the one that moved is this worker's
    server = max(spent) / hz * 1e6 / n if spent else None
    return ours, server


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    asyncio.run(prepare(args))
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="pgsage-bench-logworker-"))
    model_dir = workdir / "model-dir"
    connect = {"host": args.host, "port": args.port, "user": args.user, "database": args.meta}
    workers: dict[str, LogWorker] = {}
    completed = False
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    server: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for name, overrides in VARIANTS.items():
            settings = {"warehouse_database": args.meta, "embedded_fallback": False, **overrides}
            workers[name] = LogWorker(name, settings, connect, model_dir, workdir)
        version = enable_predictions(args, workers["full"], rng, model_dir, console.log)
        for worker in workers.values():  # imports, model loads, the first fills
            for _ in range(3):
                worker.request(batch(rng, PER_BATCH // 4, args.dbname))
        time.sleep(6.0)  # the cost servers' refresh (cost_refresh_interval 5 s)
        order = list(VARIANTS)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=args.rounds * len(order))
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    ours, backend = measure(args, workers[name], rng)
                    times[name].append(ours)
                    if backend is not None:
                        server[name].append(backend)
                    progress.advance(task)
        rows_predicted = asyncio.run(predicted_rows(args))
        completed = True
    finally:
        for worker in workers.values():
            worker.stop()
        if not args.keep:
            asyncio.run(admin(args, f'DROP DATABASE IF EXISTS "{args.meta}"'))
        if completed and not args.keep:  # (after a failure the workers' logs tell why)
            shutil.rmtree(workdir, ignore_errors=True)  # the workers' logs, the model directory
    best = {name: min(v) for name, v in times.items()}
    best_server = {name: min(v) for name, v in server.items() if v}
    full = best["full"]
    return {
        "statements_per_round": args.batches * PER_BATCH,
        "rounds": args.rounds,
        "model_version": version,
        "rows_with_prediction": rows_predicted,
        "us_cpu_per_statement": best,
        "server_us_cpu_per_statement": best_server,
        "rounds_us": times,
        "vs_full": {name: round(v / full, 3) for name, v in best.items()},
        "feature_us": {
            "predictions": round(full - best["no predictions"], 2),
            "anomalies": round(full - best["no anomalies"], 2),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=6, help=f"batches of {PER_BATCH:,} per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dbname", default="pgsage_bench", help="pgbench's database (created)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--meta", default=META, help="the workers' metadata database (re-created)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the metadata database and the workers' logs")  # fmt: skip
    ap.add_argument("--no-save", action="store_true",
                    help="do not write bench/results/logworker.json")  # fmt: skip
    args = ap.parse_args(argv)
    load = warn_if_busy("bench.logworker")
    console = Console(stderr=True)
    try:
        result = run(args, console)
    except BenchError as exc:
        raise SystemExit(f"bench.logworker: {exc}") from None
    doc = {"benchmark": "logworker", "at": datetime.now(UTC).isoformat(timespec="seconds"),
           "loadavg_at_start": load, **result}  # fmt: skip
    table = Table(title="query log worker: µs of CPU per statement (best round)")
    for col in ("worker", "log worker", "vs full", "server backend (COPY)"):
        table.add_column(col, justify="right")
    for name in VARIANTS:
        backend = result["server_us_cpu_per_statement"].get(name)
        table.add_row(name, f"{result['us_cpu_per_statement'][name]:.2f}",
                      f"{result['vs_full'][name]:.2f}",
                      "n/a" if backend is None else f"{backend:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"predictions by {result['model_version']}; "
                  f"{result['rows_with_prediction']:,} rows carried one")  # fmt: skip
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
