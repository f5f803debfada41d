"""`pgsage demo`: the whole loop in one command, with what exists today.

PostgreSQL (configured, or embedded) -> the bundled warehouse -> `pgsage serve` with the result
cache, admission control, plan steering and rewrites on -> simulated users through it on a simulated
clock with labelled anomalies -> every model trained from the proxy's own log -> the index
advisor with validation by real builds -> `pgsage report` and where everything is. Ctrl-C stops
everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from rich.console import Console
from rich.table import Table

from .child import PYTHON
from .settings import Settings
from .upstream import Upstream

T = TypeVar("T")


@dataclass
class DemoConfig:
    scale: float = 0.2
    duration: float = 240.0
    qps: float = 60.0
    database: str = "pgsage_demo"
    seed: int = 7
    wait: bool = True
    report_dir: str = "report"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _libpq_dsn(upstream: Upstream, user: str, database: str) -> str:
    if upstream.unix_socket is not None:
        port = upstream.unix_socket.name.rsplit(".", 1)[-1]
        return f"postgresql://{user}@/{database}?host={upstream.unix_socket.parent}&port={port}"
    return f"postgresql://{user}@{upstream.host}:{upstream.port}/{database}"


def run_demo(settings: Settings, cfg: DemoConfig, console: Console) -> int:
    from bench.warehouse import init_warehouse
    from bench.workload.plan import PlanConfig
    from bench.workload.runner import RunConfig, run_workload

    from .runner import resolve_upstream

    upstream, embedded = resolve_upstream(settings)
    user = settings.metadata_user
    listen, http = _free_port(), _free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        console.rule("1/7 the warehouse")
        init_warehouse(_libpq_dsn(upstream, user, "postgres"), cfg.scale, cfg.seed, cfg.database)

        console.rule("2/7 pgsage serve (cache, admission, plan steering and rewrites on)")
        env = {
            **os.environ,
            "PGSAGE_LISTEN": f"127.0.0.1:{listen}",
            "PGSAGE_HTTP": f"127.0.0.1:{http}",
            "PGSAGE_UPSTREAM": str(upstream),
            "PGSAGE_WAREHOUSE_DATABASE": cfg.database,
            "PGSAGE_LOG_LEVEL": "warning",
            "PGSAGE_LOG_FORMAT": "json",
            "PGSAGE_EMBEDDED_FALLBACK": "false",
            "PGSAGE_LOG_PARAMETERS": "true",  # literal samples: the advisor replays them
            "PGSAGE_CACHE_ENABLED": "true",
            "PGSAGE_ADMISSION_ENABLED": "true",
            "PGSAGE_STEERING_ENABLED": "true",
            "PGSAGE_REWRITE_ENABLED": "true",
            "PGSAGE_STEERING_EVAL_INTERVAL": "10",
        }
        proc = subprocess.Popen(
            [*PYTHON, "-m", "proxy.cli", "serve"], env=env, stderr=subprocess.DEVNULL
        )
        _wait_ready(f"http://127.0.0.1:{http}/readyz", proc)
        proxy_dsn = f"postgresql://{user}@127.0.0.1:{listen}/{cfg.database}"
        console.print(f"pgsage is up: [bold]{proxy_dsn}[/]")

        console.rule("3/7 simulated users")
        plan = PlanConfig(seed=cfg.seed, start=datetime(2026, 1, 26, tzinfo=UTC),
                          speed=2000.0, duration=cfg.duration, qps=cfg.qps)  # fmt: skip
        result = _interruptible(
            lambda: run_workload(RunConfig(dsn=proxy_dsn, plan=plan), Console(stderr=True))
        )
        console.print(f"{result.executed:,} statements, {result.errors:,} errors, "
                      f"{len(result.labels)} labelled anomalies, simulated "
                      f"{result.sim_start:%a %d %b} to {result.sim_end:%a %d %b}")  # fmt: skip

        console.rule("4/7 every model, from the proxy's own log")
        meta_dsn = _libpq_dsn(upstream, user, cfg.database)
        train = subprocess.run(
            [*PYTHON, "-m", "proxy.cli", "train", "all", "--json", "--dsn", meta_dsn],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        trained = json.loads(train.stdout or "[]")
        cost = [t for t in trained if t.get("name") == "cost"]
        card = _card(meta_dsn) if cost and cost[0]["status"] != "failed" else {}

        console.rule("5/7 the index advisor (validated by real builds)")
        advise = subprocess.run(
            [*PYTHON, "-m", "proxy.cli", "advise", "--validate", "--dsn", meta_dsn],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        console.print(advise.stdout[-4000:] or advise.stderr[-2000:])

        console.rule("6/7 the cost model")
        console.print(_report(meta_dsn, cost, card))
        console.print(_models_table(trained))

        console.rule("7/7 report")
        out = cfg.report_dir
        report = subprocess.run(
            [*PYTHON, "-m", "proxy.cli", "report", "--dsn", meta_dsn, "--out", out],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        console.print(report.stdout.strip() or report.stderr[-2000:])
        if cfg.wait:
            # blocked before the prompt, so a Ctrl-C right after it is waited for, not raised
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        console.print(_where(user, listen, http, cfg.database))
        if cfg.wait:
            console.print("[dim]pgsage keeps running; Ctrl-C stops everything.[/]")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if embedded is not None:
            embedded.stop()


def _interruptible(run: Callable[[], T]) -> T:
    """`run()`, with Ctrl-C a KeyboardInterrupt whatever the interrupted code raised instead.

    A terminal's Ctrl-C reaches the whole process group: pgsage serve stops and closes the
    simulated users' connections at the moment asyncio cancels their tasks here, and a task's
    cleanup on a closed connection raised InterfaceError in place of the cancellation (the demo
    then exited 1 with a traceback, not 130). While `run` runs, SIGINT sets a flag and raises
    KeyboardInterrupt at once (asyncio installs its own handler only over the default one)."""
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is not threading.main_thread():
        return run()  # (signal handlers belong to the main thread)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return run()
    except Exception:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgsage serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("pgsage serve did not become ready")


def _card(dsn: str) -> dict[str, Any]:
    out = subprocess.run(
        [*PYTHON, "-m", "proxy.cli", "models", "show", "cost", "--json", "--dsn", dsn],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        return dict(json.loads(out.stdout))
    except (json.JSONDecodeError, TypeError):
        return {}


def _report(dsn: str, trained: list[dict[str, Any]], card: dict[str, Any]) -> Table:
    table = Table(title="what pgsage saw and learned", show_header=False)
    with psycopg.connect(dsn) as conn:
        logged, fps, errors, labelled = conn.execute(
            "select count(*), count(distinct fingerprint), count(*) filter (where status <> 'ok'),"
            " count(*) filter (where label is not null) from metadata.query_logs"
        ).fetchone() or (0, 0, 0, 0)
        top = conn.execute(
            "select left(normalized_text, 70), calls, round(mean_time_ms::numeric, 2)"
            " from metadata.query_stats where command <> 'CATALOG'"
            " order by total_time_ms desc limit 3"
        ).fetchall()
    table.add_row("statements logged", f"{logged:,} ({fps} fingerprints, {errors:,} errors)")
    table.add_row("labelled anomalous executions", f"{labelled:,}")
    for text, calls, mean in top:
        table.add_row("top by total time", f"{text} — {calls:,} calls, {mean} ms mean")
    if trained:
        t = trained[0]
        table.add_row("cost model", f"v{t.get('version')} {t['status']}: {t.get('reason')}")
    metrics = card.get("metrics", {})
    if metrics:
        row = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("r2_log", "qerror_p50", "qerror_p90")
                        if isinstance(metrics.get(k), int | float))  # fmt: skip
        table.add_row("model accuracy (held-out time split)", row)
        for name, m in (metrics.get("baselines") or {}).items():
            if isinstance(m.get("qerror_p90"), int | float):
                table.add_row(f"baseline {name}", f"qerror_p90 {m['qerror_p90']:.2f}")
    return table


def _models_table(trained: list[dict[str, Any]]) -> Table:
    t = Table(title="models trained from the log")
    for col in ("model", "version", "status", "reason"):
        t.add_column(col)
    for r in trained:
        t.add_row(str(r.get("name")), str(r.get("version")), str(r.get("status")),
                  str(r.get("reason") or "")[:80])  # fmt: skip
    return t


def _where(user: str, listen: int, http: int, database: str) -> Table:
    table = Table(title="where everything is", show_header=False)
    table.add_row("psql", f"psql 'host=127.0.0.1 port={listen} user={user} dbname={database}'")
    table.add_row("admin console", f"psql -h 127.0.0.1 -p {listen} -U {user} pgsage")
    table.add_row("metrics", f"http://127.0.0.1:{http}/metrics")
    table.add_row("API docs", f"http://127.0.0.1:{http}/docs")
    table.add_row(
        "Grafana board",
        "config/grafana/dashboards/pgsage.json (provisioned by config/grafana/provisioning; "
        "or: docker compose -f config/docker-compose.yml up)",
    )
    return table
