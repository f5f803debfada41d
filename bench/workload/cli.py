"""`pgsage workload run`: the workload simulator's command line, and its end-of-run summary."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table

from .plan import PlanConfig
from .roles import ROLE_BY_NAME
from .runner import DEFAULT_DSN, RunConfig, RunResult, run_workload

workload_app = typer.Typer(help="Simulated warehouse users, with labelled anomalies.")

DEFAULT_START = "2026-01-26T00:00:00+00:00"  # a Monday; a 5-minute run at 2000x spans month end
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """'5m', '90s', '1.5h', '300' (seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise typer.BadParameter(f"not a duration: {text!r} (try 90s, 5m, 1h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_start(text: str) -> datetime:
    try:
        start = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not an ISO timestamp: {text!r}") from exc
    return start if start.tzinfo else start.replace(tzinfo=UTC)


@workload_app.callback()
def _group() -> None:
    """Simulated warehouse users, with labelled anomalies."""


@workload_app.command("run")
def run(
    dsn: str = typer.Option(DEFAULT_DSN, help="pgsage's listen address and warehouse database"),
    duration: str = typer.Option("5m", help="real run time: 90s, 5m, 1h"),
    clock_speed: float = typer.Option(2000.0, min=0.001, help="simulated seconds per real second"),
    clock_start: str = typer.Option(DEFAULT_START, help="simulated time at the start (ISO 8601)"),
    qps: float = typer.Option(80.0, min=0.0, help="average statements per real second"),
    seed: int = typer.Option(7, help="the plan (templates, parameters, anomalies) per seed"),
    dashboards: int = typer.Option(ROLE_BY_NAME["dashboard"].users, min=0, help="BI users"),
    analysts: int = typer.Option(ROLE_BY_NAME["analyst"].users, min=0, help="ad-hoc users"),
    apps: int = typer.Option(ROLE_BY_NAME["app"].users, min=0, help="application users"),
    etl: int = typer.Option(ROLE_BY_NAME["etl"].users, min=0, help="ETL writers"),
    anomalies: bool = typer.Option(True, help="inject labelled anomalies"),
    anomalies_per_day: float = typer.Option(4.0, min=0.0, help="per simulated day (>= 1 each)"),
    set_clock: bool = typer.Option(True, help="set pgsage's clock through its admin console"),
    progress: bool = typer.Option(True, help="live progress on stderr"),
    templates_shown: int = typer.Option(60, help="rows of the per-template summary"),
) -> None:
    """Drive pgsage with simulated users for DURATION, then print a summary."""
    plan = PlanConfig(
        seed=seed,
        start=parse_start(clock_start),
        speed=clock_speed,
        duration=parse_duration(duration),
        qps=qps,
        users={"dashboard": dashboards, "analyst": analysts, "app": apps, "etl": etl},
        anomalies=anomalies,
        anomalies_per_day=anomalies_per_day,
    )
    config = RunConfig(dsn=dsn, plan=plan, set_proxy_clock=set_clock, progress=progress)
    console = Console()
    result = run_workload(config, Console(stderr=True))
    for table in render_summary(result, templates_shown):
        console.print(table)


def render_summary(result: RunResult, templates_shown: int = 60) -> list[Table]:
    """Tables per role, template, protocol path and status, plus the anomaly labels."""
    tables = [
        _group(result, 0, "role"),
        _group(result, 1, "template", templates_shown),
        _group(result, 2, "protocol path"),
        _group(result, 3, "status"),
    ]
    labels = Table(title="injected anomalies (metadata.workload_labels)")
    for col in ("label", "kind", "simulated window", "templates", "planned", "sent"):
        labels.add_column(col, justify="right" if col in ("planned", "sent") else "left")
    for a in result.schedule:
        planned, sent = result.labels.get(a.label, (0, 0))
        start, end = a.window
        labels.add_row(a.label, a.kind, f"{start:%a %m-%d %H:%M}-{end:%H:%M}",
                       ", ".join(a.templates[:3]) + (" ..." if len(a.templates) > 3 else ""),
                       f"{planned:,}", f"{sent:,}")  # fmt: skip
    tables.append(labels)
    head = Table(title=f"workload run {result.run_id}", show_header=False)
    rate = result.executed / result.elapsed if result.elapsed else 0.0
    for k, v in (
        ("real time", f"{result.elapsed:.1f}s"),
        ("simulated", f"{result.sim_start:%Y-%m-%d %H:%M} .. {result.sim_end:%Y-%m-%d %H:%M}"),
        ("planned statements", f"{result.planned:,}"),
        ("executed", f"{result.executed:,} ({rate:,.1f}/s)"),
        ("errors", f"{result.errors:,}"),
        ("not sent (behind at the end)", f"{result.dropped:,}"),
        ("worst dispatch lag", f"{result.max_lag:.2f}s"),
        ("pgsage clock set", "yes" if result.proxy_clock else "no"),
    ):
        head.add_row(k, v)
    tables.append(head)
    return tables


def _group(result: RunResult, index: int, title: str, limit: int | None = None) -> Table:
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for key, (count, seconds) in result.stats.items():
        row = agg[key[index]]
        row[0] += count
        row[1] += count if key[3] != "ok" else 0
        row[2] += seconds
    table = Table(title=f"per {title}")
    table.add_column(title)
    for col in ("executed", "errors", "mean ms", "share"):
        table.add_column(col, justify="right")
    total = sum(r[0] for r in agg.values()) or 1
    rows = sorted(agg.items(), key=lambda kv: (-kv[1][0], kv[0]))
    for name, (count, errors, seconds) in rows[:limit]:
        mean = seconds / count * 1000 if count else 0.0
        table.add_row(name, f"{count:,.0f}", f"{errors:,.0f}", f"{mean:.1f}",
                      f"{count / total:.1%}")  # fmt: skip
    return table


if __name__ == "__main__":
    workload_app()
