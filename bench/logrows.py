"""The query log worker's per-statement work, side by side in one run.

`python -m bench.logrows [--statements N] [--rounds R]` takes a pgbench `-S -M simple`-like
stream (8 sessions, a random account id in each text) as the proxy ships it to the log worker,
and measures this process's CPU per statement (best round; the sides alternate within a round):

- build: flat records -> `metadata.query_logs` rows (fingerprint lookup, metric grouping),
  `proxy.telemetry.logrows.build` from source and as `make accel` compiled it;
- write: those rows into `metadata.query_logs` of a scratch database, with asyncpg's
  `copy_records_to_table` (its generic codecs; timestamps as datetimes, as it needs them: what
  the log did before) and with `CopyEncoder`'s binary payload + `copy_to_table`, source and
  compiled (columns NULL in a whole batch left out, as the log does), with the CPU of the
  server backend that ingests them beside it when the server runs on this host. The tables must
  read back the same.

Prints a table and the JSON, writes `bench/results/logrows.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import asyncpg
import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.machine import warn_if_busy
from models import accel
from optimizer.fingerprint import Fingerprinter
from warehouse_sql import apply_migrations

RESULTS = Path(__file__).parent / "results" / "logrows.json"
MODULE = "proxy.telemetry.logrows"
BATCH = 1_000  # the recorder's SLICE
DATABASE = "pgsage_bench_logrows"


def stream(n: int, seed: int) -> tuple[dict[int, Any], list[tuple[Any, ...]]]:
    """Flat records (querylog.Row) of `n` pgbench -S statements over 8 sessions (with what
    `build` reads of a proxy.records.SessionInfo: bench imports nothing of the proxy's)."""
    rng = random.Random(seed)
    sessions = {
        sid: SimpleNamespace(id=sid, client_addr="127.0.0.1", database="bench", user="postgres",
                             application_name="pgbench", tls=False, app="other")
        for sid in range(1, 9)
    }  # fmt: skip
    t = time.monotonic()
    rows = []
    for i in range(n):
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, 100_000)};"
        end = t + 0.0002 + rng.random() * 0.0002
        rows.append((1 + i % 8, "simple", sql, None, t, end, 1, "ok", None, None, 0, 61,
                     False, None, None, False))  # fmt: skip
        t += 0.0001
    return sessions, rows


def cpu() -> float:
    return time.process_time()


def build_side(mod: ModuleType, sessions: dict[int, Any], records: list[Any]) -> Any:
    """µs of CPU per record for `mod.build`, and the rows it made."""
    anchor = (records[0][4], time.time(), 1.0)  # the proxy's clock in real time (proxy/clock.py)

    def epoch(monotonic: float) -> float:
        return anchor[1] + (monotonic - anchor[0])

    fp = Fingerprinter()
    # (warm: the template's one parse)
    mod.build(sessions, records[:BATCH], fp.fingerprint, epoch, anchor, None, None, None)
    out: list[tuple[Any, ...]] = []
    start = cpu()
    for i in range(0, len(records), BATCH):
        chunk = records[i : i + BATCH]
        out.extend(mod.build(sessions, chunk, fp.fingerprint, epoch, anchor, None, None, None).rows)
    return (cpu() - start) / len(records) * 1e6, out


def server_cpu(conn: Any) -> float | None:
    """CPU seconds of the connection's server process (None when it is not on this host)."""
    try:
        t = psutil.Process(conn.get_server_pid()).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


async def write_side(
    conn: Any, side: str, mod: ModuleType, rows: list[Any]
) -> tuple[float, float | None]:
    """µs of CPU per row to COPY `rows` into an empty query_logs with asyncpg's encoder (`side`
    "asyncpg") or `mod`'s: this process's, and the server backend's (None when unreadable)."""
    await conn.execute("TRUNCATE metadata.query_logs")
    if side == "asyncpg":
        ts = [mod.COLUMNS.index("started_at"), mod.COLUMNS.index("finished_at")]
        records = [
            tuple(datetime.fromtimestamp(v, UTC) if i in ts else v for i, v in enumerate(r))
            for r in rows
        ]
        start, server = cpu(), server_cpu(conn)
        for i in range(0, len(records), 5 * BATCH):
            chunk = records[i : i + 5 * BATCH]
            await conn.copy_records_to_table(
                "query_logs", schema_name="metadata", columns=mod.COLUMNS, records=chunk
            )
    else:
        encoder = mod.CopyEncoder(mod.COLUMNS)
        start, server = cpu(), server_cpu(conn)
        for i in range(0, len(rows), 5 * BATCH):
            columns, encoded = encoder.encode_present(rows[i : i + 5 * BATCH])
            await conn.copy_to_table("query_logs", schema_name="metadata", columns=columns,
                                     source=memoryview(encoded), format="binary")  # fmt: skip
    ours = (cpu() - start) / len(rows) * 1e6
    after = server_cpu(conn)
    theirs = None if server is None or after is None else (after - server) / len(rows) * 1e6
    return ours, theirs


async def snapshot(conn: Any, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    got = await conn.fetch(
        f"SELECT {', '.join(columns)} FROM metadata.query_logs ORDER BY query_id"
    )
    return [tuple(r) for r in got]


async def admin(args: argparse.Namespace, *statements: str) -> None:
    """Run `statements` in the postgres database (to create and drop the scratch one)."""
    conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user,
                                 database="postgres")  # fmt: skip
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    pure, fast = accel.load_source(MODULE), accel.load_compiled(MODULE)
    sessions, records = stream(args.statements, args.seed)
    await admin(args, f'DROP DATABASE IF EXISTS "{DATABASE}"', f'CREATE DATABASE "{DATABASE}"')
    conn = await asyncpg.connect(host=args.host, port=args.port, user=args.user,
                                 database=DATABASE)  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in
                                     ("build source", "build compiled", "write asyncpg",
                                      "write source", "write compiled", "server asyncpg",
                                      "server source", "server compiled")}  # fmt: skip
    same = True
    try:
        await apply_migrations(conn)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=args.rounds)
            for _ in range(args.rounds):
                us, rows = build_side(pure, sessions, records)
                times["build source"].append(us)
                us, rows = build_side(fast, sessions, records)
                times["build compiled"].append(us)
                tables = []
                for name, mod in (("asyncpg", fast), ("source", pure), ("compiled", fast)):
                    ours, server = await write_side(conn, name, mod, rows)
                    times[f"write {name}"].append(ours)
                    if server is not None:
                        times[f"server {name}"].append(server)
                    tables.append(await snapshot(conn, fast.COLUMNS))
                same = same and tables[0] == tables[1] == tables[2]
                progress.advance(task)
    finally:
        await conn.close()
        await admin(args, f'DROP DATABASE IF EXISTS "{DATABASE}"')
    best = {k: min(v) for k, v in times.items() if v}
    return {
        "statements": args.statements,
        "rounds": args.rounds,
        "us_cpu_per_statement": best,
        "rounds_us": times,
        "build_speedup": _ratio(best, "build source", "build compiled"),
        "write_vs_asyncpg": _ratio(best, "write asyncpg", "write compiled"),
        "server_vs_asyncpg": _ratio(best, "server asyncpg", "server compiled"),
        "same_rows": same,
    }


def _ratio(best: dict[str, float], num: str, den: str) -> float | None:
    """best[num] / best[den], or None when either is missing or the denominator read zero (the
    server backend's CPU comes in clock ticks of 10 ms: a short run can read none)."""
    if num not in best or den not in best or best[den] <= 0:
        return None
    return best[num] / best[den]


def _times(ratio: float | None, what: str) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x {what}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--statements", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument("--user", default="postgres")
    ap.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/logrows.json"
    )
    args = ap.parse_args(argv)
    load = warn_if_busy("bench.logrows")
    console = Console(stderr=True)
    try:
        result = asyncio.run(run(args, console))
    except RuntimeError as exc:
        raise SystemExit(f"{exc} (see the warning above)") from None
    doc = {"benchmark": "logrows", "at": datetime.now(UTC).isoformat(timespec="seconds"),
           "loadavg_at_start": load, **result}  # fmt: skip
    best = result["us_cpu_per_statement"]
    table = Table(title="query log worker: µs of CPU per statement (best round)")
    for col in ("step", "asyncpg", "source", "compiled", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("build rows", "", f"{best['build source']:.2f}", f"{best['build compiled']:.2f}",
                  _times(result["build_speedup"], "source/compiled"))  # fmt: skip
    table.add_row("write (COPY)", f"{best['write asyncpg']:.2f}", f"{best['write source']:.2f}",
                  f"{best['write compiled']:.2f}",
                  _times(result["write_vs_asyncpg"], "asyncpg/compiled"))  # fmt: skip
    if "server compiled" in best:
        table.add_row("server backend (COPY)", f"{best['server asyncpg']:.2f}",
                      f"{best['server source']:.2f}", f"{best['server compiled']:.2f}",
                      _times(result["server_vs_asyncpg"], "asyncpg/compiled"))  # fmt: skip
    console.print(table)
    console.print(f"tables read back the same: {result['same_rows']}")
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if not result["same_rows"]:
        raise SystemExit("the encoders wrote different tables")
    return doc


if __name__ == "__main__":
    main()
