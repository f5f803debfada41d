"""`pgsage advise`: ranked index recommendations from the query log (and `--validate`).

    app.command("advise", help=...)(advise)   # mounted by proxy/cli.py

The metadata database is ``--dsn`` (env ``PGSAGE_METADATA_DSN``) or the parent command's
``ctx.obj`` (see models.cli); the indexes go to the warehouse DSN when the parent set one, else
to the same database.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .cli import DsnOpt, ModelDirOpt, _run, _target, _with_registry


def _fmt_bytes(n: float | None) -> str:
    if n is None or n < 0:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _fmt_gain(rec: dict[str, Any]) -> tuple[str, str]:
    est = rec.get("est_gain_share")
    est_s = f"{est * 100:.0f}% ({rec.get('est_gain_ms') or 0:.0f} ms)" if est is not None else ""
    speed = rec.get("measured_speedup")
    meas = f"{speed:.2f}x" if speed else ""
    if rec.get("p_value") is not None and meas:
        meas += f" (p={rec['p_value']:.2g})"
    return est_s, meas


def render(recs: list[dict[str, Any]], title: str = "Index recommendations") -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "id",
        "rank",
        "table",
        "columns",
        "size",
        "fingerprints",
        "est. gain",
        "measured",
        "status",
    ):
        table.add_column(col)
    for r in recs:
        cols = ", ".join(r.get("columns") or [])
        if r.get("include"):
            cols += f" INCLUDE ({', '.join(r['include'])})"
        if r.get("predicate"):
            col, op, lit = r["predicate"]
            cols += f" WHERE {col} {op} {lit}".rstrip()
        if r.get("op") == "drop":
            cols = f"DROP {r.get('index_name')}"
        est, meas = _fmt_gain(r)
        table.add_row(
            str(r.get("id") or ""),
            str(r.get("rank") or ""),
            str(r.get("table") or ""),
            cols,
            _fmt_bytes(r.get("size_bytes")),
            str(len(r.get("fingerprints") or [])),
            est,
            meas,
            str(r.get("status") or ""),
        )
    return table


def advise(
    ctx: typer.Context,
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
    validate: Annotated[
        bool, typer.Option("--validate", help="build, replay, keep only significant gains")
    ] = False,
    budget_share: Annotated[
        float, typer.Option(help="storage budget as a share of the database size")
    ] = 0.2,
    since_days: Annotated[float, typer.Option(help="workload window in days")] = 7.0,
    database: Annotated[str | None, typer.Option(help="only this logged database")] = None,
    max_candidates: Annotated[int, typer.Option(help="candidates costed by what-if")] = 40,
    min_rows: Annotated[float, typer.Option(help="skip tables with fewer rows")] = 10_000,
    no_hypopg: Annotated[bool, typer.Option("--no-hypopg", help="force the fallback")] = False,
    pin_regressions: Annotated[
        int,
        typer.Option(
            help="keep an index that slows at most this many fingerprints when a steering hint"
            " set restores each (pinned for proxies with steering on)"
        ),
    ] = 0,
    statement_timeout_ms: Annotated[
        int,
        typer.Option(
            min=100,
            help="limit of each what-if and replayed run (a replay cut by it counts as the limit)",
        ),
    ] = 60_000,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Recommend indexes for the logged workload; with --validate, build and measure them."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .advisor import AdvisorConfig, apply_recommendation
    from .advisor import advise as run_advise

    target = _target(ctx, dsn, model_dir)
    config = AdvisorConfig(
        window_days=since_days,
        database=database,
        budget_share=budget_share,
        max_candidates=max_candidates,
        min_rows=min_rows,
        hypopg=False if no_hypopg else None,
        max_pins=pin_regressions,
        statement_timeout_ms=statement_timeout_ms,
    )
    console = Console(stderr=True)

    async def run(conn: Any, registry: Any) -> dict[str, Any]:
        import asyncpg

        wconn = await asyncpg.connect(target["warehouse_dsn"]) if target["warehouse_dsn"] else None
        try:
            with Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=console,
                transient=as_json,
            ) as bars:
                tasks: dict[str, Any] = {}

                def progress(stage: str, fraction: float) -> None:
                    if stage not in tasks:
                        tasks[stage] = bars.add_task(stage, total=1.0)
                    bars.update(tasks[stage], completed=fraction)

                from .advisor_rank import load_active_ranker

                ranker = await load_active_ranker(conn, registry.root)
                report = await run_advise(conn, wconn, config, progress, ranker=ranker)
                recs = report.recommendations
                if validate:
                    done = []
                    for i, rec in enumerate(recs):
                        if rec.get("status") == "proposed" and rec.get("id"):
                            rec = await apply_recommendation(
                                conn, rec["id"], warehouse=wconn, config=config
                            )
                        done.append(rec)
                        progress("validate", (i + 1) / len(recs))
                    recs = done
            out = report.to_dict()
            out["recommendations"] = recs
            return out
        finally:
            if wconn is not None:
                await wconn.close()

    result = _run(_with_registry(target, run))
    if as_json:
        for rec in result["recommendations"]:
            rec.pop("detail", None)
        typer.echo(json.dumps(result, default=str))
        return
    out = Console()
    out.print(render(result["recommendations"]))
    out.print(
        f"{result['fingerprints']} fingerprints, {result['candidates']} candidates,"
        f" {result['evaluated']} costed by {result['method']}; budget"
        f" {_fmt_bytes(result['budget_bytes'])} of {_fmt_bytes(result['database_bytes'])};"
        f" ordered by {result['ranker']}"
    )
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {note}")
