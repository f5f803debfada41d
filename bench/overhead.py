"""Throughput/latency overhead of pgsage versus direct PostgreSQL and PgBouncer.

Run from the repository root with the project's interpreter::

    .venv/bin/python -m bench.overhead            # full matrix, 15 s per target per cell
    .venv/bin/python -m bench.overhead --quick    # 3 s, simple+extended at 8 clients only

The benchmark creates its own database on the upstream, starts PgBouncer (session mode),
``pgsage serve`` (twice: query log on and off) and ``bench.relay`` (a pure byte relay, the floor
of a Python proxy) as child processes on free ports, and drives them and PostgreSQL itself with
``pgbench -S`` (read-only point selects). Before measuring it trains a cost model on pgsage's
query log and waits until pgsage attaches predictions to logged rows (``--no-predictions``
skips this), so pgsage is measured with its query log, metrics and predictions on. Within each
(protocol mode, clients) cell the targets are interleaved in rotating order over several
rounds, so drift (thermal, cache, noisy neighbours) is spread over all of them. pgsage is only
ever talked to over the wire: this module must not import the ``proxy`` package (an
import-linter contract enforces it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.machine import busy_warning
from bench.relay import HIGH_WATER as RELAY_HIGH_WATER

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: pgsage-nolog is pgsage with per-statement records off: the pair prices the query log,
#: fingerprints and per-statement metrics (issue "Query log ...": cost <= 5% of TPS)
#: relay is bench/relay.py, a pure asyncio + uvloop byte relay (no parsing at all): the floor a
#: Python proxy can reach
TARGETS = ("direct", "relay", "pgsage", "pgsage-nolog", "pgbouncer")
NOLOG_ENV = {"PGSAGE_RECORD_STATEMENTS": "false"}
MODES = ("simple", "extended", "prepared")
#: (clients, threads) pairs
CLIENT_LEVELS = ((1, 1), (8, 2), (32, 2))
#: pgsage should reach at least this fraction of PgBouncer's TPS at 8 clients (simple, extended)
GOAL_RATIO = 0.75
GOAL_CELLS = {("simple", 8), ("extended", 8)}
#: seconds PgBouncer and pgsage keep an idle server connection for the next client
SERVER_IDLE_TIMEOUT = 5
#: restarts of a proxy killed from outside (shared machines) before the benchmark gives up
MAX_RESTARTS = 3

#: "without initial connection time"; with -C (a connection per transaction) "including
#: reconnection times"
TPS_RE = re.compile(
    r"^tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)",
    re.MULTILINE,
)
LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
TXN_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


class Terminated(Exception):
    """SIGTERM arrived; unwind and clean up like Ctrl-C."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def run(cmd: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a short command, return stdout; raise BenchError with stderr on failure."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except FileNotFoundError as exc:
        raise BenchError(f"{cmd[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(cmd)}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {detail}")
    return proc.stdout


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Endpoint:
    name: str
    host: str
    port: int


@dataclass
class Upstream:
    host: str
    port: int
    user: str

    def psql(self, sql: str, dbname: str = "postgres", port: int | None = None) -> str:
        return run(
            [
                "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(port or self.port), "-U", self.user,
                "-d", dbname, "-c", sql,
            ],
            timeout=120,
        ).strip()  # fmt: skip


# --------------------------------------------------------------------------- database setup


def prepare_database(up: Upstream, dbname: str, scale: int, reinit: bool, say: Any) -> None:
    exists = up.psql(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'") == "1"
    if exists and reinit:
        say(f"dropping database {dbname} (--reinit)")
        up.psql(f'DROP DATABASE "{dbname}" WITH (FORCE)')
        exists = False
    if not exists:
        say(f"creating database {dbname}")
        up.psql(f'CREATE DATABASE "{dbname}"')
    ready = False
    if exists:
        tables = up.psql(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN "
            "('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history')",
            dbname,
        )
        if tables == "4":
            ready = up.psql("SELECT count(*) FROM pgbench_branches", dbname) == str(scale)
    if ready:
        say(f"database {dbname} already initialised at scale {scale}; skipping pgbench -i")
        return
    say(f"pgbench -i -s {scale} {dbname}")
    run(
        ["pgbench", "-i", "-q", "-s", str(scale), "-h", up.host, "-p", str(up.port),
         "-U", up.user, dbname],
        timeout=1800,
    )  # fmt: skip
    up.psql("VACUUM ANALYZE", dbname)


# --------------------------------------------------------------------------- child processes


class Child:
    """A long-running child process in its own session, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, **popen: Any) -> None:
        self.name = name
        self.log = log
        self.cmd = cmd
        self.popen = popen
        self.starts = 0
        self._start()

    def _start(self) -> None:
        self._log_fh = self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal must not reach it directly
                **self.popen,
            )
        except FileNotFoundError as exc:
            self._log_fh.close()
            raise BenchError(f"{self.name}: {self.cmd[0]} not found") from exc
        self.starts += 1

    def restart(self) -> None:
        self.stop()
        self._start()

    def wait_ready(self, host: str, port: int, check: Any, timeout: float = 30.0) -> None:
        """Wait until the port accepts TCP connections and `check()` (a real query) succeeds."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n"
                    f"{tail(self.log)}"
                )
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    pass
                check()
                return
            except (OSError, BenchError) as exc:
                last = str(exc)
                time.sleep(0.2)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s ({last}):\n{tail(self.log)}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log_fh.close()

    def exit_text(self) -> str:
        rc = self.proc.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with {rc}" + (
            " (clean shutdown: it was sent SIGTERM/SIGINT)" if rc == 0 else ""
        )


def pgbouncer_user() -> dict[str, Any]:
    """PgBouncer refuses to run as root: drop to the postgres OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def start_pgbouncer(
    up: Upstream, dbname: str, workdir: Path, port: int, pgbouncer_bin: str
) -> Child:
    bdir = workdir / "pgbouncer"
    bdir.mkdir()
    (bdir / "userlist.txt").write_text(f'"{up.user}" ""\n')
    ini = bdir / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{dbname} = host={up.host} port={up.port} dbname={dbname} user={up.user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {bdir / "userlist.txt"}
pool_mode = session
max_client_conn = 100
default_pool_size = 100
server_idle_timeout = {SERVER_IDLE_TIMEOUT}
logfile = {bdir / "pgbouncer.log"}
pidfile = {bdir / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
log_stats = 0
stats_period = 3600
ignore_startup_parameters = extra_float_digits
"""
    )
    if os.geteuid() == 0:
        for path in (workdir, bdir, *bdir.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    return Child(
        "pgbouncer",
        [pgbouncer_bin, "-q", str(ini)],
        workdir / "pgbouncer-stdout.log",
        **pgbouncer_user(),
    )


def start_pgsage(
    up: Upstream,
    workdir: Path,
    port: int,
    http_port: int,
    pgsage_bin: str,
    warehouse_db: str,
    config: Path | None,
    extra_env: dict[str, str],
    name: str = "pgsage",
) -> Child:
    env = dict(os.environ)
    # measure against the given upstream, never silently against an embedded server
    env["PGSAGE_EMBEDDED_FALLBACK"] = "false"
    # pgsage's own query log / metadata goes to a database of the benchmark's, so the run
    # neither fills the real warehouse's query log nor is disturbed by what happens there
    env["PGSAGE_WAREHOUSE_DATABASE"] = warehouse_db
    # both proxies keep server connections for the next client; both let them go soon, or the
    # targets' idle backends together pass max_connections at 32 clients
    env["PGSAGE_SERVER_IDLE_TIMEOUT"] = str(SERVER_IDLE_TIMEOUT)
    env.update(extra_env)
    cmd = [
        pgsage_bin, "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"{up.host}:{up.port}",
        "--http", f"127.0.0.1:{http_port}",
        "--log-level", "warning",
    ]  # fmt: skip
    if config is not None:
        cmd += ["--config", str(config.resolve())]
    # cwd is the scratch directory: a config/pgsage.toml lying around must not change the setup
    return Child(name, cmd, workdir / f"{name}.log", env=env, cwd=workdir)


def start_relay(up: Upstream, workdir: Path, port: int, repo: Path) -> Child:
    """bench/relay.py, the pure byte relay; cwd is the repository root so `bench` imports."""
    cmd = [
        sys.executable, "-m", "bench.relay",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"{up.host}:{up.port}",
    ]  # fmt: skip
    return Child("relay", cmd, workdir / "relay.log", cwd=repo)


# --------------------------------------------------------------------------- predictions

PREDICTED_SQL = (
    "SELECT count(*), coalesce(max(model_version), '') FROM metadata.query_logs"
    " WHERE predicted_cost_ms IS NOT NULL AND model_version IS NOT NULL"
)


def enable_predictions(
    up: Upstream, args: argparse.Namespace, ep: Endpoint, model_dir: Path, say: Any,
    wait: float = 60.0,
) -> dict[str, Any]:  # fmt: skip
    """Turn the cost model's predictions on in pgsage, as a deployment has them: traffic
    through pgsage for its query log, `pgsage train cost` on that log (the new version becomes
    active in the registry), then traffic until the log worker, which re-checks the registry
    every `cost_refresh_interval`, writes rows with a prediction and the model version. Never
    raises: what failed is in `error` (and `enabled` is False)."""
    out: dict[str, Any] = {
        "requested": True, "enabled": False, "model_version": None, "trained_version": None,
        "rows_with_prediction": 0, "seconds": None, "error": None,
    }  # fmt: skip
    started = time.monotonic()
    try:
        if args.pgsage_env.get("PGSAGE_COST_SERVING", "").lower() in {"0", "false", "no", "off"}:
            raise BenchError("PGSAGE_COST_SERVING is off: pgsage serves no predictions")
        say("predictions: pgbench -S -c 4 for 3 s through pgsage so its query log has rows")
        pgbench(ep, up.user, args.dbname, "simple", 4, 2, 3)
        time.sleep(2.0)  # the log worker flushes every querylog_flush_interval (1 s)
        dsn = f"postgresql://{up.user}@{up.host}:{up.port}/{args.pgsage_warehouse_db}"
        say(f"predictions: pgsage train cost (model dir {model_dir})")
        text = run(
            [args.pgsage_bin, "train", "cost", "--dsn", dsn, "--model-dir", str(model_dir),
             "--max-rows", "20000", "--n-iter", "2", "--json"],
            timeout=300,
        )  # fmt: skip
        try:
            trained = json.loads(text.strip().splitlines()[-1])[0]
            out["trained_version"] = f"{trained['name']}:v{trained['version']}"
        except (ValueError, LookupError, TypeError) as exc:
            raise BenchError(f"pgsage train cost: unexpected output {text[-300:]!r}") from exc
        if trained["status"] != "active":
            raise BenchError(
                f"pgsage train cost: {out['trained_version']} is {trained['status']} "
                f"({trained.get('reason')}), not active"
            )
        say(f"predictions: {out['trained_version']} active; waiting for predicted log rows")
        deadline = time.monotonic() + wait
        while True:
            pgbench(ep, up.user, args.dbname, "simple", 4, 2, 1)
            count, _, version = up.psql(PREDICTED_SQL, args.pgsage_warehouse_db).partition("|")
            if int(count) > 0:
                out.update(enabled=True, model_version=version, rows_with_prediction=int(count))
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"no query log rows with a prediction {wait:.0f} s after "
                    f"{out['trained_version']} became active"
                )
    except (BenchError, ValueError) as exc:  # ValueError: psql printed no count
        out["error"] = str(exc) or type(exc).__name__
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


# --------------------------------------------------------------------------- pgbench


@dataclass
class RunResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    seconds: int
    round: int
    position: int
    #: user + system CPU seconds of the proxy's processes (itself and its children) in the run
    cpu_s: float | None = None
    cpu_main_s: float | None = None


@dataclass
class Pgbench:
    """One pgbench run's summary and every transaction's latency (µs, from its -l log)."""

    tps: float
    latency_ms: float
    transactions: int
    failed: int
    latencies_us: list[int] = field(default_factory=list)


@dataclass
class TargetResult:
    runs: list[RunResult] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list)

    def quantile_ms(self, q: float) -> float | None:
        lat = self.latencies_us
        if not lat:
            return None
        lat.sort()
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0

    def cpu_us_per_txn(self, main_only: bool = False) -> float | None:
        cpu = [r.cpu_main_s if main_only else r.cpu_s for r in self.runs]
        txns = sum(r.transactions for r in self.runs)
        if not txns or any(c is None for c in cpu):
            return None
        return sum(c for c in cpu if c is not None) / txns * 1e6

    @property
    def seconds(self) -> int:
        return sum(r.seconds for r in self.runs)

    @property
    def tps(self) -> float:
        # duration-weighted mean of the per-run TPS
        return sum(r.tps * r.seconds for r in self.runs) / self.seconds

    @property
    def latency_ms(self) -> float:
        txns = sum(r.transactions for r in self.runs)
        if not txns:
            return sum(r.latency_ms for r in self.runs) / len(self.runs)
        return sum(r.latency_ms * r.transactions for r in self.runs) / txns

    def as_json(self) -> dict[str, Any]:
        tps = [r.tps for r in self.runs]
        cpu, cpu_main = self.cpu_us_per_txn(), self.cpu_us_per_txn(main_only=True)
        p50, p99 = self.quantile_ms(0.5), self.quantile_ms(0.99)
        return {
            "tps": round(self.tps, 2),
            "latency_ms": round(self.latency_ms, 4),
            "lat_p50_ms": None if p50 is None else round(p50, 4),
            "lat_p99_ms": None if p99 is None else round(p99, 4),
            "cpu_us_per_txn": None if cpu is None else round(cpu, 2),
            "cpu_us_per_txn_main": None if cpu_main is None else round(cpu_main, 2),
            "transactions": sum(r.transactions for r in self.runs),
            "failed": sum(r.failed for r in self.runs),
            "seconds": self.seconds,
            "tps_min": round(min(tps), 2),
            "tps_max": round(max(tps), 2),
            "runs": [r.__dict__ for r in self.runs],
        }


def pgbench(
    ep: Endpoint, user: str, dbname: str, mode: str, clients: int, threads: int, seconds: int,
    *, connect: bool = False, log_dir: Path | None = None,
) -> Pgbench:  # fmt: skip
    """`pgbench -S` against one target; with `log_dir`, every transaction's latency is read
    back from pgbench's per-transaction log (-l); `connect` opens a connection per transaction
    (-C: the connection setup rate)."""
    cmd = [
        "pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(threads),
        "-T", str(seconds), "-h", ep.host, "-p", str(ep.port), "-U", user,
    ]  # fmt: skip
    if connect:
        cmd.append("-C")
    prefix = None
    if log_dir is not None:
        prefix = log_dir / f"pgbench-{ep.name}-{time.monotonic_ns()}"
        cmd += ["-l", f"--log-prefix={prefix}"]
    cmd.append(dbname)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    tps, lat = TPS_RE.search(out), LAT_RE.search(out)
    if proc.returncode != 0 or tps is None or lat is None:
        detail = "\n".join((err.strip() + "\n" + out.strip()).strip().splitlines()[-15:])
        raise BenchError(f"pgbench against {ep.name} failed (exit {proc.returncode}):\n{detail}")
    txn, failed = TXN_RE.search(out), FAILED_RE.search(out)
    latencies: list[int] = []
    if prefix is not None:
        for path in prefix.parent.glob(prefix.name + ".*"):
            latencies += transaction_latencies(path.read_text())
            path.unlink()
    return Pgbench(
        float(tps.group(1)),
        float(lat.group(1)),
        int(txn.group(1)) if txn else 0,
        int(failed.group(1)) if failed else 0,
        latencies,
    )


def transaction_latencies(log: str) -> list[int]:
    """Latencies (µs) from a pgbench -l log: `client_id transaction_no time script_no
    time_epoch time_us [schedule_lag ...]`; a failed or skipped transaction has no number."""
    out = []
    for line in log.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) >= 3 and parts[2].isdigit():
            out.append(int(parts[2]))
    return out


def wait_for_slots(up: Upstream, clients: int, timeout: float = 3 * SERVER_IDLE_TIMEOUT) -> None:
    """Wait until the upstream has room for `clients` more connections (and a few to spare):
    the proxies' idle server connections of the previous run go after SERVER_IDLE_TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free = int(up.psql(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int - count(*)"
            " FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ))  # fmt: skip
        if free >= clients + 4:
            return
        time.sleep(0.5)


def settle(pid: int, idle_share: float = 0.1, timeout: float = 90.0) -> float:
    """Wait until the process tree of `pid` uses less than `idle_share` of a core over a
    second (pgsage imports its models and starts its log worker after it first listens);
    returns the seconds waited. Start-up work must not be billed to the first cell."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    while last is not None and time.monotonic() - started < timeout:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now is None or now[0] - last[0] < idle_share:
            break
        last = now
    return time.monotonic() - started


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user + system CPU seconds of `pid` and every process below it, of `pid` alone), or
    None when it is gone. Children that exited are not counted (their time was not reaped by
    us); pgsage's query log worker and PgBouncer live for the whole run."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        main = t.user + t.system
        total = main
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
    except psutil.Error:
        return None
    return total, main


def split_seconds(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


# --------------------------------------------------------------------------- transfers

#: bulk transfers measured beside pgbench (issue "Proxy performance"): the connection setup
#: rate, a large SELECT result, COPY out and COPY in, each in MB/s (connections/s)
TRANSFERS = ("connect", "large_result", "copy_out", "copy_in")
TRANSFER_TARGETS = ("direct", "relay", "pgsage", "pgbouncer")
COPY_TABLE = "overhead_copy_in"


def _rows_sql(rows: int) -> str:
    return f"SELECT g, md5(g::text) AS h FROM generate_series(1, {int(rows)}) g"


def psql_transfer(
    ep: Endpoint, user: str, dbname: str, sql: str, stdin: Path | None = None
) -> tuple[float, int]:
    """Run one statement through psql against `ep`; (wall seconds, bytes it printed or read)."""
    cmd = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", ep.host,
           "-p", str(ep.port), "-U", user, "-d", dbname, "-c", sql]  # fmt: skip
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(stdin.open("rb")) if stdin is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        size = 0
        while chunk := proc.stdout.read(1 << 20):
            size += len(chunk)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait(600)
    seconds = time.perf_counter() - started
    if rc != 0:
        raise BenchError(f"psql against {ep.name} failed (exit {rc}): {err.strip()[-500:]}")
    if stdin is not None:
        size = stdin.stat().st_size
    return seconds, size


def run_transfers(
    up: Upstream, args: argparse.Namespace, endpoints: dict[str, Endpoint], measure: Any,
    by_name: dict[str, Child], workdir: Path, rounds: int, progress: Progress, task: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each transfer against direct, pgsage and PgBouncer, `rounds` times interleaved; the
    median run of each counts. COPY in loads the rows COPY out produced (from a file)."""
    rows = args.transfer_rows
    data = workdir / "copy-in.tsv"
    up.psql(f"DROP TABLE IF EXISTS {COPY_TABLE}; CREATE UNLOGGED TABLE {COPY_TABLE} "
            "(g int, h text)", args.dbname)  # fmt: skip
    with data.open("wb") as fh:
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", up.host, "-p", str(up.port),
             "-U", up.user, "-d", args.dbname, "-c", f"COPY ({_rows_sql(rows)}) TO STDOUT"],
            stdout=fh, check=True, timeout=600,
        )  # fmt: skip
    data.chmod(0o644)
    seconds = max(2, min(5, args.seconds // max(rounds, 1)))
    runs: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for rnd in range(rounds):
        for ki, kind in enumerate(TRANSFERS):
            shift = (ki + rnd) % len(TRANSFER_TARGETS)
            order = TRANSFER_TARGETS[shift:] + TRANSFER_TARGETS[:shift]
            for t in order:
                progress.update(task, description=f"{kind} round {rnd + 1}/{rounds} → {t:<9}")
                ep, child = endpoints[t], by_name.get(t)
                if kind == "connect":
                    got, used = measure(t, "simple", 8, 2, seconds, connect=True)
                    rate = got.transactions / seconds
                    cpu = used[0] / got.transactions * 1e6 if used and got.transactions else None
                    runs.setdefault((kind, t), []).append((rate, cpu))
                    progress.advance(task)
                    continue
                if kind == "copy_in":
                    up.psql(f"TRUNCATE {COPY_TABLE}", args.dbname)
                before = cpu_seconds(child.proc.pid) if child is not None else None
                if kind == "large_result":
                    wall, size = psql_transfer(ep, up.user, args.dbname, _rows_sql(rows))
                elif kind == "copy_out":
                    wall, size = psql_transfer(
                        ep, up.user, args.dbname, f"COPY ({_rows_sql(rows)}) TO STDOUT"
                    )
                else:
                    wall, size = psql_transfer(
                        ep, up.user, args.dbname, f"COPY {COPY_TABLE} FROM STDIN", stdin=data
                    )
                after = cpu_seconds(child.proc.pid) if child is not None else None
                cpu = after[0] - before[0] if before and after else None
                runs.setdefault((kind, t), []).append((size / wall / 1e6, cpu))
                progress.advance(task)
    up.psql(f"DROP TABLE IF EXISTS {COPY_TABLE}", args.dbname)
    out = []
    for kind in TRANSFERS:
        value = {t: sorted(runs[(kind, t)])[len(runs[(kind, t)]) // 2] for t in TRANSFER_TARGETS}
        for t in TRANSFER_TARGETS:
            rate, cpu = value[t]
            out.append({
                "kind": kind, "target": t, "rows": None if kind == "connect" else rows,
                "unit": "connections/s" if kind == "connect" else "MB/s",
                "value": round(rate, 2),
                "proxy_cpu": None if cpu is None else round(cpu, 3),
                "proxy_cpu_unit": "us per connection" if kind == "connect" else "s",
                "runs": [round(r, 2) for r, _ in runs[(kind, t)]],
                "vs_direct": ratio(rate, value["direct"][0]),
                "vs_pgbouncer": ratio(rate, value["pgbouncer"][0]),
                "vs_relay": ratio(rate, value["relay"][0]),
            })  # fmt: skip
    return out


def profile_pgsage(
    up: Upstream, args: argparse.Namespace, ep: Endpoint, pgsage: Child
) -> dict[str, Any] | None:
    """py-spy's flame graph of `pgsage serve` and its query log worker (--subprocesses) during
    `pgbench -S -M simple -c 8`, written beside the results, with the functions that hold the
    most samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"error": "py-spy not found (pip install py-spy)"}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    svg, raw = RESULTS_DIR / "overhead-profile.svg", RESULTS_DIR / "overhead-profile.txt"
    seconds = max(5, min(args.seconds, 20))
    outs = []
    for path, fmt in ((svg, "flamegraph"), (raw, "raw")):
        outs.append(subprocess.Popen(
            [spy, "record", "-p", str(pgsage.proc.pid), "-o", str(path), "-f", fmt,
             "-d", str(seconds), "-r", "200", "--nonblocking", "--subprocesses"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        if fmt == "flamegraph":
            time.sleep(0.5)
    got = pgbench(ep, up.user, args.dbname, "simple", 8, 2, seconds)
    errors = [p.communicate(timeout=60)[1] for p in outs]
    if not raw.exists():
        return {"error": " ".join(e.strip() for e in errors)[-500:]}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(n)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return {
        "command": f"py-spy record -p PID --subprocesses -r 200 -d {seconds}"
        " during pgbench -S -M simple -c 8",
        "tps": got.tps,
        "flamegraph": str(svg.relative_to(RESULTS_DIR.parent.parent)),
        "samples": total,
        "top_self": [{"frame": f, "share": round(n / total, 4)} for f, n in top] if total else [],
    }


# --------------------------------------------------------------------------- reporting


def version_of(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_info(up: Upstream, pgsage_bin: str, pgbouncer_bin: str, repo: Path) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    commit = version_of(["git", "-C", str(repo), "rev-parse", "HEAD"])
    dirty = version_of(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "nproc_available": affinity,
        "loadavg_at_start": load,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pgbouncer": version_of([pgbouncer_bin, "--version"]),
        "pgbench": version_of(["pgbench", "--version"]),
        "postgres": up.psql("SELECT version()"),
        "postgres_server_version": up.psql("SHOW server_version"),
        "pgsage": version_of([pgsage_bin, "version"]),
        "git_commit": commit,
        "git_dirty": bool(dirty),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def cell_json(
    mode: str, clients: int, threads: int, res: dict[str, TargetResult]
) -> dict[str, Any]:
    tps = {t: res[t].tps for t in TARGETS}
    out: dict[str, Any] = {
        "mode": mode,
        "clients": clients,
        "threads": threads,
        "targets": {t: res[t].as_json() for t in TARGETS},
        "ratios": {
            "pgsage_vs_direct": ratio(tps["pgsage"], tps["direct"]),
            "pgbouncer_vs_direct": ratio(tps["pgbouncer"], tps["direct"]),
            "pgsage_vs_pgbouncer": ratio(tps["pgsage"], tps["pgbouncer"]),
            "pgsage_nolog_vs_pgbouncer": ratio(tps["pgsage-nolog"], tps["pgbouncer"]),
            "logging_on_vs_off": ratio(tps["pgsage"], tps["pgsage-nolog"]),
            "relay_vs_pgbouncer": ratio(tps["relay"], tps["pgbouncer"]),
            "pgsage_vs_relay": ratio(tps["pgsage"], tps["relay"]),
        },
    }
    if (mode, clients) in GOAL_CELLS:
        r = out["ratios"]["pgsage_vs_pgbouncer"]
        out["goal"] = {
            "pgsage_vs_pgbouncer_min": GOAL_RATIO,
            "met": r is not None and r >= GOAL_RATIO,
        }
    return out


def cell_rows(
    mode: str, clients: int, threads: int, res: dict[str, TargetResult]
) -> list[dict[str, Any]]:
    """One row per target of a cell: TPS, latency (mean, p50, p99), proxy CPU per transaction,
    and TPS ratios to direct PostgreSQL and to PgBouncer."""
    rows = []
    for t in TARGETS:
        j = res[t].as_json()
        rows.append({
            "target": t, "mode": mode, "clients": clients, "threads": threads,
            "tps": j["tps"], "lat_mean_ms": j["latency_ms"], "lat_p50_ms": j["lat_p50_ms"],
            "lat_p99_ms": j["lat_p99_ms"], "cpu_us_per_txn": j["cpu_us_per_txn"],
            "vs_direct": ratio(res[t].tps, res["direct"].tps),
            "vs_pgbouncer": ratio(res[t].tps, res["pgbouncer"].tps),
            "vs_relay": ratio(res[t].tps, res["relay"].tps),
        })  # fmt: skip
    return rows


def checks(
    results: dict[tuple[str, int], dict[str, TargetResult]], transfers: list[dict[str, Any]]
) -> dict[str, bool | None]:
    """The issue's targets, each True / False (None when this run did not measure it)."""
    out: dict[str, bool | None] = {}
    for mode in MODES:
        cell = results.get((mode, 8))
        if cell is None:
            continue
        s, b = cell["pgsage"], cell["pgbouncer"]
        out[f"{mode} -c 8: TPS >= PgBouncer"] = s.tps >= b.tps
        cs, cb = s.cpu_us_per_txn(), b.cpu_us_per_txn()
        out[f"{mode} -c 8: CPU per txn <= PgBouncer"] = (
            None if cs is None or cb is None else cs <= cb
        )
        one = results.get((mode, 1))
        if one is not None:
            out[f"{mode} -c 1: mean latency <= PgBouncer + 10 us"] = (
                one["pgsage"].latency_ms <= one["pgbouncer"].latency_ms + 0.010
            )
    for row in transfers:
        if row["target"] != "pgsage":
            continue
        if row["kind"] == "connect":
            out["connection rate >= PgBouncer"] = (row["vs_pgbouncer"] or 0) >= 1.0
        else:
            out[f"{row['kind']} >= 80% of direct"] = (row["vs_direct"] or 0) >= 0.8
    return out


def render_transfers(doc: dict[str, Any]) -> Table | None:
    rows = doc.get("transfers") or []
    if not rows:
        return None
    table = Table(title=f"transfers ({doc['parameters']['transfer_rows']:,} rows; median run)")
    table.add_column("kind")
    for t in TRANSFER_TARGETS:
        table.add_column(t, justify="right")
    table.add_column("pgsage/\ndirect", justify="right")
    table.add_column("pgsage/\npgbouncer", justify="right")
    table.add_column("pgsage/\nrelay", justify="right")
    for kind in TRANSFERS:
        got = {r["target"]: r for r in rows if r["kind"] == kind}
        unit = got["direct"]["unit"]
        table.add_row(
            f"{kind} ({unit})",
            *(f"{got[t]['value']:,.1f}" for t in TRANSFER_TARGETS),
            f"{got['pgsage']['vs_direct']:.2f}",
            f"{got['pgsage']['vs_pgbouncer']:.2f}",
            fmt_ratio(got["pgsage"].get("vs_relay")),
        )
    return table


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def render_checks(doc: dict[str, Any]) -> Table:
    table = Table(title="targets (issue: proxy performance)")
    table.add_column("target")
    table.add_column("met")
    for name, met in doc["checks"].items():
        table.add_row(name, "-" if met is None else ("[green]yes[/]" if met else "[red]no[/]"))
    return table


def predictions_text(doc: dict[str, Any]) -> str:
    pred = doc.get("predictions") or {}
    if pred.get("enabled"):
        return (
            f"pgsage ran with predictions on ({pred['model_version']}; "
            f"{pred['rows_with_prediction']:,} log rows with a prediction before measuring)."
        )
    if pred.get("error"):
        return f"[yellow]pgsage ran WITHOUT predictions: {pred['error']}[/yellow]"
    return "pgsage ran without predictions (--no-predictions)."


def render_table(doc: dict[str, Any]) -> Table:
    p = doc["parameters"]
    rounds = f"{p['rounds']} interleaved round{'s' if p['rounds'] != 1 else ''}"
    table = Table(
        title=(
            f"pgbench -S overhead — {p['seconds']} s per target per cell "
            f"({rounds}), scale {p['scale']}"
        ),
        caption=(
            "TPS excludes initial connection time; lat = average latency. Ratios are TPS "
            f"ratios. * = goal cell, pgsage/pgbouncer >= {GOAL_RATIO}. relay = a pure byte "
            "relay (asyncio + uvloop, no parsing), the floor of a Python proxy.\n"
            + predictions_text(doc)
        ),
    )
    table.add_column("mode")
    table.add_column("-c/-j", justify="right")
    for t in TARGETS:
        table.add_column(f"{t}\nTPS / lat / p99\nCPU per txn", justify="right")
    table.add_column("pgsage/\ndirect", justify="right")
    table.add_column("pgbouncer/\ndirect", justify="right")
    table.add_column("pgsage/\npgbouncer", justify="right")
    table.add_column("log on/\nlog off", justify="right")
    table.add_column("pgsage/\nrelay", justify="right")

    def fmt(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f}"

    for i, cell in enumerate(doc["cells"]):
        tg, rt = cell["targets"], cell["ratios"]
        row = [cell["mode"], f"{cell['clients']}/{cell['threads']}"]
        for t in TARGETS:
            cpu = tg[t].get("cpu_us_per_txn")
            p99 = tg[t].get("lat_p99_ms")
            row.append(
                f"{tg[t]['tps']:,.0f}\n[dim]{tg[t]['latency_ms']:.3f} ms"
                + ("" if p99 is None else f"\np99 {p99:.3f} ms")
                + ("" if cpu is None else f"\n{cpu:.1f} µs CPU")
                + "[/dim]"
            )
        sb_text = fmt(rt["pgsage_vs_pgbouncer"])
        if "goal" in cell:
            style = "bold green" if cell["goal"]["met"] else "bold red"
            sb_text = f"[{style}]{sb_text}*[/{style}]"
        row += [
            fmt(rt["pgsage_vs_direct"]),
            fmt(rt["pgbouncer_vs_direct"]),
            sb_text,
            fmt(rt["logging_on_vs_off"]),
            fmt(rt.get("pgsage_vs_relay")),
        ]
        table.add_row(*row, end_section=i < len(doc["cells"]) - 1)
    return table


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="pgbench -S against direct PostgreSQL, a pure byte relay, pgsage and "
        "PgBouncer (session mode).",
    )
    ap.add_argument(
        "--upstream",
        type=parse_hostport,
        default=("127.0.0.1", 5432),
        metavar="HOST:PORT",
        help="PostgreSQL server (default 127.0.0.1:5432)",
    )
    ap.add_argument("--user", default="postgres", help="database user (trust auth assumed)")
    ap.add_argument("--dbname", default="pgsage_bench", help="benchmark database (created)")
    ap.add_argument("--scale", type=int, default=1, help="pgbench -i scale factor (default 1)")
    ap.add_argument("--reinit", action="store_true", help="drop and re-create the database")
    ap.add_argument(
        "--seconds",
        type=int,
        default=None,
        help="pgbench seconds per target per cell (default 15; 3 with --quick)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="split each target's seconds into this many interleaved runs "
        "(default: as many as give runs of >= 3 s, at most 3)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 s, only simple and extended at 8 clients"
    )
    ap.add_argument("--no-warmup", action="store_true", help="skip the 2 s warm-up per target")
    ap.add_argument(
        "--no-transfers",
        dest="transfers",
        action="store_false",
        help="skip the connection rate, large result and COPY in/out measurements",
    )
    ap.add_argument(
        "--transfer-rows",
        type=int,
        default=None,
        help="rows of the large result and of COPY in/out (default 1,000,000; 100,000 --quick)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also record a py-spy flame graph of pgsage under pgbench -S -c 8 "
        "(bench/results/overhead-profile.svg)",
    )
    ap.add_argument(
        "--json-only",
        action="store_true",
        help="stdout gets only the JSON document (table and progress go to stderr)",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    ap.add_argument(
        "--no-predictions",
        dest="predictions",
        action="store_false",
        help="do not train a cost model before measuring (pgsage then runs without predictions)",
    )
    ap.add_argument("--pgsage-bin", default=None, help="pgsage executable (default: the venv's)")
    ap.add_argument(
        "--pgsage-config", type=Path, default=None, help="TOML settings for pgsage (default: none)"
    )
    ap.add_argument(
        "--pgsage-env",
        action="append",
        default=[],
        metavar="PGSAGE_X=VALUE",
        help="extra environment for pgsage, e.g. PGSAGE_QUERYLOG_ENABLED=false (repeatable)",
    )
    ap.add_argument(
        "--pgsage-warehouse-db",
        default=None,
        help="database pgsage keeps its query log/metadata in; dropped at the start of every run "
        "(default: <dbname>_meta)",
    )
    ap.add_argument("--pgbouncer-bin", default=shutil.which("pgbouncer") or "/usr/sbin/pgbouncer")
    args = ap.parse_args(argv)  # fmt: skip
    if args.seconds is None:
        args.seconds = 3 if args.quick else 15
    if args.seconds < 1:
        ap.error("--seconds must be >= 1")
    if args.transfer_rows is None:
        args.transfer_rows = 100_000 if args.quick else 1_000_000
    if args.transfer_rows < 1:
        ap.error("--transfer-rows must be >= 1")
    if args.rounds is None:
        args.rounds = max(1, min(3, args.seconds // 3))
    args.rounds = max(1, min(args.rounds, args.seconds))
    env: dict[str, str] = {}
    for item in args.pgsage_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("PGSAGE_"):
            ap.error(f"--pgsage-env wants PGSAGE_NAME=VALUE, got {item!r}")
        env[key] = value
    args.pgsage_env = env
    if args.pgsage_warehouse_db is None:
        args.pgsage_warehouse_db = f"{args.dbname}_meta"
    if args.pgsage_warehouse_db in {args.dbname, "postgres", "template0", "template1"}:
        ap.error("--pgsage-warehouse-db must be a database of its own (it is dropped)")
    if args.pgsage_bin is None:
        beside = Path(sys.executable).parent / "pgsage"
        args.pgsage_bin = str(beside) if beside.exists() else (shutil.which("pgsage") or "pgsage")
    return args


def cells_for(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [(mode, 8, 2) for mode in ("simple", "extended")]
    return [(mode, c, j) for mode in MODES for c, j in CLIENT_LEVELS]


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def benchmark(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    up = Upstream(args.upstream[0], args.upstream[1], args.user)

    def say(msg: str) -> None:
        err.log(msg)

    for tool in ("psql", "pgbench"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")
    try:
        up.psql("SELECT 1")
    except BenchError as exc:
        raise BenchError(f"upstream {up.host}:{up.port} not usable: {exc}") from None

    prepare_database(up, args.dbname, args.scale, args.reinit, say)
    say(f"dropping pgsage's metadata database {args.pgsage_warehouse_db} (pgsage re-creates it)")
    up.psql(f'DROP DATABASE IF EXISTS "{args.pgsage_warehouse_db}" WITH (FORCE)')
    info = machine_info(up, args.pgsage_bin, args.pgbouncer_bin, repo)
    load, cpus = info["loadavg_at_start"], info["nproc_available"] or info["nproc"] or 1
    warning = busy_warning("every target's numbers", load, cpus) if load else None
    if warning:
        say(f"[yellow]{warning}[/yellow]")
    cells = cells_for(args.quick)
    durations = split_seconds(args.seconds, args.rounds)

    started = dt.datetime.now(dt.UTC)
    children: list[Child] = []
    restarts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgsage-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        # both pgsage targets load the cost model's artifacts from here (training writes them)
        model_dir = Path(args.pgsage_env.get("PGSAGE_MODEL_DIR") or workdir / "models")
        pgsage_env = {"PGSAGE_MODEL_DIR": str(model_dir), **args.pgsage_env}
        predictions: dict[str, Any] = {
            "requested": False, "enabled": False, "model_version": None,
            "rows_with_prediction": 0, "error": None,
        }  # fmt: skip
        try:
            relay_port = free_port()
            say(f"starting relay on 127.0.0.1:{relay_port} (bench/relay.py: bytes only)")
            children.append(start_relay(up, workdir, relay_port, repo))
            pgsage_port, http_port, bouncer_port = free_port(), free_port(), free_port()
            say(f"starting pgsage on 127.0.0.1:{pgsage_port} (http {http_port})")
            pgsage = start_pgsage(
                up,
                workdir,
                pgsage_port,
                http_port,
                args.pgsage_bin,
                args.pgsage_warehouse_db,
                args.pgsage_config,
                pgsage_env,
            )
            children.append(pgsage)
            nolog_port, nolog_http = free_port(), free_port()
            say(f"starting pgsage-nolog on 127.0.0.1:{nolog_port} (records off)")
            nolog = start_pgsage(
                up,
                workdir,
                nolog_port,
                nolog_http,
                args.pgsage_bin,
                args.pgsage_warehouse_db,
                args.pgsage_config,
                {**pgsage_env, **NOLOG_ENV},
                name="pgsage-nolog",
            )
            children.append(nolog)
            say(f"starting pgbouncer on 127.0.0.1:{bouncer_port}")
            bouncer = start_pgbouncer(up, args.dbname, workdir, bouncer_port, args.pgbouncer_bin)
            children.append(bouncer)
            endpoints = {
                "direct": Endpoint("direct", up.host, up.port),
                "relay": Endpoint("relay", "127.0.0.1", relay_port),
                "pgsage": Endpoint("pgsage", "127.0.0.1", pgsage_port),
                "pgsage-nolog": Endpoint("pgsage-nolog", "127.0.0.1", nolog_port),
                "pgbouncer": Endpoint("pgbouncer", "127.0.0.1", bouncer_port),
            }
            by_name = {child.name: child for child in children}

            def ready_check(name: str) -> None:
                ep = endpoints[name]
                by_name[name].wait_ready(
                    ep.host, ep.port, lambda: up.psql("SELECT 1", args.dbname, ep.port)
                )

            for child in children:
                ready_check(child.name)
            say("all targets accept connections")
            if args.predictions:
                predictions = enable_predictions(up, args, endpoints["pgsage"], model_dir, say)
                if predictions["enabled"]:
                    say(
                        f"predictions on: {predictions['model_version']} "
                        f"({predictions['rows_with_prediction']} log rows with a prediction)"
                    )
                else:
                    say(
                        "[yellow]warning: predictions could not be turned on; pgsage runs "
                        f"without them: {predictions['error']}[/yellow]"
                    )
            else:
                say("predictions off (--no-predictions)")
            for child in children:
                settled = settle(child.proc.pid)
                say(f"{child.name} settled after {settled:.1f} s (its start-up work done)")

            def ensure_alive() -> None:
                """Restart (a few times at most) a proxy that something outside killed."""
                for child in children:
                    if child.proc.poll() is None:
                        continue
                    what = child.exit_text()
                    restarts.append(
                        {"target": child.name, "why": what, "at": dt.datetime.now(dt.UTC)
                         .isoformat(timespec="seconds"), "log_tail": tail(child.log, 10)}
                    )  # fmt: skip
                    if len(restarts) > MAX_RESTARTS:
                        raise BenchError(
                            f"{child.name} {what}; giving up after {MAX_RESTARTS} restarts:\n"
                            f"{tail(child.log)}"
                        )
                    say(f"[yellow]warning: {child.name} {what}; restarting it[/yellow]")
                    child.restart()
                    ready_check(child.name)

            def measure(
                t: str, mode: str, clients: int, threads: int, seconds: int, **kw: Any
            ) -> tuple[Pgbench, tuple[float, float] | None]:
                """One pgbench run against target `t`, and the CPU seconds (all processes,
                the main one) the proxy used meanwhile (None for direct PostgreSQL)."""
                wait_for_slots(up, clients)
                for attempt in (1, 2):
                    ensure_alive()
                    child = by_name.get(t)
                    try:
                        before = cpu_seconds(child.proc.pid) if child is not None else None
                        run_ = pgbench(
                            endpoints[t], up.user, args.dbname, mode, clients, threads, seconds,
                            log_dir=workdir, **kw,
                        )  # fmt: skip
                        after = cpu_seconds(child.proc.pid) if child is not None else None
                        used = None
                        if before is not None and after is not None:
                            used = (after[0] - before[0], after[1] - before[1])
                        return run_, used
                    except BenchError as exc:
                        child = by_name.get(t)
                        if child is None:
                            raise
                        time.sleep(0.5)
                        if child.proc.poll() is not None and attempt == 1:
                            continue  # the proxy died under pgbench: restart it, redo the run
                        raise BenchError(
                            f"{exc}\n{t} is {child.exit_text()}; last lines of its log:\n"
                            f"{tail(child.log)}"
                        ) from None
                raise AssertionError("unreachable")

            results: dict[tuple[str, int], dict[str, TargetResult]] = {}
            transfers: list[dict[str, Any]] = []
            profile: dict[str, Any] | None = None
            total_runs = len(cells) * len(durations) * len(TARGETS)
            if args.transfers:
                total_runs += len(TRANSFERS) * len(durations) * len(TRANSFER_TARGETS)
            warmups = 0 if args.no_warmup else len(TARGETS)
            progress = Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err,
            )
            with progress:
                task = progress.add_task("pgbench", total=total_runs + warmups)
                if warmups:
                    for t in TARGETS:
                        progress.update(task, description=f"warm-up {t}")
                        measure(t, "simple", 8, 2, 2)
                        progress.advance(task)
                for ci, (mode, clients, threads) in enumerate(cells):
                    cell = {t: TargetResult() for t in TARGETS}
                    results[(mode, clients)] = cell
                    for rnd, seconds in enumerate(durations):
                        shift = (ci + rnd) % len(TARGETS)
                        order = TARGETS[shift:] + TARGETS[:shift]
                        for pos, t in enumerate(order):
                            progress.update(
                                task,
                                description=(
                                    f"-M {mode:<8} -c {clients} round {rnd + 1}/{len(durations)}"
                                    f" → {t:<9}"
                                ),
                            )
                            got, used = measure(t, mode, clients, threads, seconds)
                            cell[t].runs.append(
                                RunResult(got.tps, got.latency_ms, got.transactions, got.failed,
                                          seconds, rnd, pos, *(used or (None, None)))
                            )  # fmt: skip
                            cell[t].latencies_us += got.latencies_us
                            progress.advance(task)
                    sb = ratio(cell["pgsage"].tps, cell["pgbouncer"].tps)
                    sr = ratio(cell["pgsage"].tps, cell["relay"].tps)
                    progress.console.log(
                        f"-M {mode} -c {clients}: "
                        + ", ".join(f"{t} {cell[t].tps:,.0f} tps" for t in TARGETS)
                        + f"; pgsage/pgbouncer {sb}, pgsage/relay {sr}"
                    )
                if args.transfers:
                    transfers = run_transfers(
                        up, args, endpoints, measure, by_name, workdir, len(durations),
                        progress, task,
                    )  # fmt: skip
            if args.profile:
                say("profiling pgsage (py-spy) under pgbench -S -M simple -c 8")
                profile = profile_pgsage(up, args, endpoints["pgsage"], pgsage)
        finally:
            for child in reversed(children):
                child.stop()

    finished = dt.datetime.now(dt.UTC)
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "overhead",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "machine": info,
        "parameters": {
            "upstream": f"{up.host}:{up.port}",
            "user": up.user,
            "dbname": args.dbname,
            "scale": args.scale,
            "seconds": args.seconds,
            "rounds": len(durations),
            "round_seconds": durations,
            "quick": args.quick,
            "warmup": not args.no_warmup,
            "pgbench": "pgbench -n -S -M <mode> -c <clients> -j <threads> -T <round seconds>"
            " -l (latency quantiles from the per-transaction log)",
            "transfer_rows": args.transfer_rows if args.transfers else None,
            "targets": list(TARGETS),
            "cells": [{"mode": m, "clients": c, "threads": j} for m, c, j in cells],
            "pgbouncer": {
                "pool_mode": "session",
                "auth_type": "trust",
                "max_client_conn": 100,
                "default_pool_size": 100,
                "server_idle_timeout": SERVER_IDLE_TIMEOUT,
            },
            "pgsage": {
                "log_level": "warning",
                "embedded_fallback": False,
                "warehouse_database": args.pgsage_warehouse_db,
                "config": str(args.pgsage_config) if args.pgsage_config else None,
                "env": args.pgsage_env,
                "server_idle_timeout": SERVER_IDLE_TIMEOUT,
                "model_dir": str(model_dir),
            },
            "relay": {"module": "bench.relay", "high_water_bytes": RELAY_HIGH_WATER},
            "goal": {
                "pgsage_vs_pgbouncer_min": GOAL_RATIO,
                "cells": sorted(f"{m}/c{c}" for m, c in GOAL_CELLS),
            },
        },
        "restarts": restarts,
        "predictions": predictions,
        "cells": [cell_json(m, c, j, results[(m, c)]) for m, c, j in cells if (m, c) in results],
        "rows": [
            row
            for m, c, j in cells
            if (m, c) in results
            for row in cell_rows(m, c, j, results[(m, c)])
        ],
        "transfers": transfers,
        "checks": checks(results, transfers),
        "profile": profile,
    }


def save(doc: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2) + "\n"
    path = RESULTS_DIR / f"overhead-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "overhead-latest.json").write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    # a pipe or file gets a wide enough table rather than rich's 80-column default
    width = None if sys.stdout.isatty() else 150
    out = err if args.json_only else Console(width=width)
    try:
        with sigterm_as_exception():
            doc = benchmark(args, err)
    except (KeyboardInterrupt, Terminated):
        err.print("[yellow]interrupted; everything started was stopped[/yellow]")
        return 130
    except BenchError as exc:
        err.print(f"[bold red]benchmark failed:[/bold red] {exc}")
        return 1
    out.print(render_table(doc))
    transfers = render_transfers(doc)
    if transfers is not None:
        out.print(transfers)
    out.print(render_checks(doc))
    if doc.get("profile"):
        p = doc["profile"]
        err.print(f"profile: {p.get('flamegraph') or p.get('error')}")
    for r in doc["restarts"]:
        err.print(f"[yellow]note: {r['target']} {r['why']} at {r['at']} and was restarted[/yellow]")
    if not args.no_save:
        path = save(doc)
        err.print(f"results written to {path} and {path.parent / 'overhead-latest.json'}")
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
