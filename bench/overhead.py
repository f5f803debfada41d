"""Throughput/latency overhead of pgsage versus direct PostgreSQL and PgBouncer.

Run from the repository root with the project's interpreter::

    .venv/bin/python -m bench.overhead            # full matrix, 15 s per target per cell
    .venv/bin/python -m bench.overhead --quick    # 3 s, simple+extended at 8 clients only

The benchmark creates its own database on the upstream, starts PgBouncer (session mode) and
``pgsage serve`` as child processes on free ports, and drives all three targets with
``pgbench -S`` (read-only point selects). Within each (protocol mode, clients) cell the targets
are interleaved in rotating order over several rounds, so drift (thermal, cache, noisy
neighbours) is spread over all of them. pgsage is only ever talked to over the wire: this module
must not import the ``proxy`` package (an import-linter contract enforces it).
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

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: pgsage-nolog is pgsage with per-statement records off: the pair prices the query log,
#: fingerprints and per-statement metrics (issue "Query log ...": cost <= 5% of TPS)
TARGETS = ("direct", "pgsage", "pgsage-nolog", "pgbouncer")
NOLOG_ENV = {"PGSAGE_RECORD_STATEMENTS": "false"}
MODES = ("simple", "extended", "prepared")
#: (clients, threads) pairs
CLIENT_LEVELS = ((1, 1), (8, 2))
#: pgsage should reach at least this fraction of PgBouncer's TPS at 8 clients (simple, extended)
GOAL_RATIO = 0.75
GOAL_CELLS = {("simple", 8), ("extended", 8)}
#: restarts of a proxy killed from outside (shared machines) before the benchmark gives up
MAX_RESTARTS = 3

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
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
default_pool_size = 20
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


@dataclass
class TargetResult:
    runs: list[RunResult] = field(default_factory=list)

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
        return {
            "tps": round(self.tps, 2),
            "latency_ms": round(self.latency_ms, 4),
            "transactions": sum(r.transactions for r in self.runs),
            "failed": sum(r.failed for r in self.runs),
            "seconds": self.seconds,
            "tps_min": round(min(tps), 2),
            "tps_max": round(max(tps), 2),
            "runs": [r.__dict__ for r in self.runs],
        }


def pgbench(
    ep: Endpoint, user: str, dbname: str, mode: str, clients: int, threads: int, seconds: int
) -> tuple[float, float, int, int]:
    cmd = [
        "pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(threads),
        "-T", str(seconds), "-h", ep.host, "-p", str(ep.port), "-U", user, dbname,
    ]  # fmt: skip
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
    return (
        float(tps.group(1)),
        float(lat.group(1)),
        int(txn.group(1)) if txn else 0,
        int(failed.group(1)) if failed else 0,
    )


def split_seconds(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


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


def cell_json(mode: str, clients: int, threads: int, res: dict[str, TargetResult]) -> dict:
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
        },
    }
    if (mode, clients) in GOAL_CELLS:
        r = out["ratios"]["pgsage_vs_pgbouncer"]
        out["goal"] = {
            "pgsage_vs_pgbouncer_min": GOAL_RATIO,
            "met": r is not None and r >= GOAL_RATIO,
        }
    return out


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
            f"ratios. * = goal cell, pgsage/pgbouncer >= {GOAL_RATIO}."
        ),
    )
    table.add_column("mode")
    table.add_column("-c/-j", justify="right")
    for t in TARGETS:
        table.add_column(f"{t}\nTPS / lat", justify="right")
    table.add_column("pgsage/\ndirect", justify="right")
    table.add_column("pgbouncer/\ndirect", justify="right")
    table.add_column("pgsage/\npgbouncer", justify="right")
    table.add_column("log on/\nlog off", justify="right")

    def fmt(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f}"

    for i, cell in enumerate(doc["cells"]):
        tg, rt = cell["targets"], cell["ratios"]
        row = [cell["mode"], f"{cell['clients']}/{cell['threads']}"]
        for t in TARGETS:
            row.append(f"{tg[t]['tps']:,.0f}\n[dim]{tg[t]['latency_ms']:.3f} ms[/dim]")
        sb_text = fmt(rt["pgsage_vs_pgbouncer"])
        if "goal" in cell:
            style = "bold green" if cell["goal"]["met"] else "bold red"
            sb_text = f"[{style}]{sb_text}*[/{style}]"
        row += [
            fmt(rt["pgsage_vs_direct"]),
            fmt(rt["pgbouncer_vs_direct"]),
            sb_text,
            fmt(rt["logging_on_vs_off"]),
        ]
        table.add_row(*row, end_section=i < len(doc["cells"]) - 1)
    return table


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="pgbench -S against direct PostgreSQL, pgsage and PgBouncer (session mode).",
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
        "--json-only",
        action="store_true",
        help="stdout gets only the JSON document (table and progress go to stderr)",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
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
    say = lambda msg: err.log(msg)  # noqa: E731

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
    if load and load[0] > 0.5 * cpus:
        say(
            f"[yellow]warning: 1-minute load average is {load[0]:.2f} on {cpus} CPUs; other "
            "work on this machine will depress (and add noise to) every target's numbers[/yellow]"
        )
    cells = cells_for(args.quick)
    durations = split_seconds(args.seconds, args.rounds)

    started = dt.datetime.now(dt.UTC)
    children: list[Child] = []
    restarts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgsage-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        try:
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
                args.pgsage_env,
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
                {**args.pgsage_env, **NOLOG_ENV},
                name="pgsage-nolog",
            )
            children.append(nolog)
            say(f"starting pgbouncer on 127.0.0.1:{bouncer_port}")
            bouncer = start_pgbouncer(up, args.dbname, workdir, bouncer_port, args.pgbouncer_bin)
            children.append(bouncer)
            endpoints = {
                "direct": Endpoint("direct", up.host, up.port),
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
                t: str, mode: str, clients: int, threads: int, seconds: int
            ) -> tuple[float, float, int, int]:
                for attempt in (1, 2):
                    ensure_alive()
                    try:
                        return pgbench(
                            endpoints[t], up.user, args.dbname, mode, clients, threads, seconds
                        )
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
            total_runs = len(cells) * len(durations) * len(TARGETS)
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
                            tps, lat, txn, failed = measure(t, mode, clients, threads, seconds)
                            cell[t].runs.append(RunResult(tps, lat, txn, failed, seconds, rnd, pos))
                            progress.advance(task)
                    sb = ratio(cell["pgsage"].tps, cell["pgbouncer"].tps)
                    progress.console.log(
                        f"-M {mode} -c {clients}: "
                        + ", ".join(f"{t} {cell[t].tps:,.0f} tps" for t in TARGETS)
                        + f"; pgsage/pgbouncer {sb}"
                    )
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
            "pgbench": "pgbench -n -S -M <mode> -c <clients> -j <threads> -T <round seconds>",
            "targets": list(TARGETS),
            "cells": [{"mode": m, "clients": c, "threads": j} for m, c, j in cells],
            "pgbouncer": {
                "pool_mode": "session",
                "auth_type": "trust",
                "max_client_conn": 100,
                "default_pool_size": 20,
            },
            "pgsage": {
                "log_level": "warning",
                "embedded_fallback": False,
                "warehouse_database": args.pgsage_warehouse_db,
                "config": str(args.pgsage_config) if args.pgsage_config else None,
                "env": args.pgsage_env,
            },
            "goal": {
                "pgsage_vs_pgbouncer_min": GOAL_RATIO,
                "cells": sorted(f"{m}/c{c}" for m, c in GOAL_CELLS),
            },
        },
        "restarts": restarts,
        "cells": [cell_json(m, c, j, results[(m, c)]) for m, c, j in cells if (m, c) in results],
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
    width = None if sys.stdout.isatty() else 120
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
