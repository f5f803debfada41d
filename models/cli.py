"""`pgsage train` and `pgsage models ...`: typer apps the proxy's CLI mounts.

    app.command("train")(train)               # pgsage train [MODEL|all]
    app.add_typer(models_app, name="models")  # pgsage models list|show|activate|rollback

The metadata database is ``--dsn`` (env ``PGSAGE_METADATA_DSN``) unless the parent command put
``{"dsn": ..., "warehouse_dsn": ..., "model_dir": ...}`` (or ``"connect_args"``: asyncpg.connect()
keyword arguments instead of ``"dsn"``) in ``ctx.obj``; the warehouse (EXPLAIN,
catalog) defaults to the same database.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")

DsnOpt = Annotated[
    str | None,
    typer.Option("--dsn", envvar="PGSAGE_METADATA_DSN", help="metadata database DSN"),
]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option("--model-dir", envvar="PGSAGE_MODEL_DIR", help="artifact folder"),
]

#: standalone, `train_app` runs `train` directly; mount `train` itself as a command (not a group)
train_app = typer.Typer(help="Train models from the query log.")
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)


def _target(ctx: typer.Context, dsn: str | None, model_dir: Path | None) -> dict[str, Any]:
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    resolved = dsn or obj.get("dsn")
    if not dsn and obj.get("connect_args"):  # asyncpg.connect() keyword arguments
        resolved = None
    elif not resolved:
        typer.echo("pgsage: no metadata database (--dsn or PGSAGE_METADATA_DSN)", err=True)
        raise typer.Exit(2)
    return {
        "dsn": resolved,
        "connect_args": None if resolved else dict(obj["connect_args"]),
        "warehouse_dsn": obj.get("warehouse_dsn"),
        "model_dir": model_dir or obj.get("model_dir"),
    }


async def _with_registry(target: dict[str, Any], fn: Callable[[Any, Any], Awaitable[T]]) -> T:
    import asyncpg

    from .registry import Registry, model_dir

    settings = {"application_name": "pgsage-models"}
    if target["dsn"]:
        conn = await asyncpg.connect(target["dsn"], server_settings=settings)
    else:
        conn = await asyncpg.connect(**_ssl_args(target["connect_args"]), server_settings=settings)
    try:
        return await fn(conn, Registry(conn, model_dir(target["model_dir"])))
    finally:
        await conn.close()


def _ssl_args(args: dict[str, Any]) -> dict[str, Any]:
    """connect_args from `pgsage` carry TLS as {"tls": {mode, rootcert, cert, key}} (JSON-able);
    asyncpg wants `ssl=` (a mode name, or an SSLContext for verify-ca / verify-full)."""
    tls = args.get("tls")
    if not tls:
        return args
    import ssl

    out = {k: v for k, v in args.items() if k != "tls"}
    mode = tls["mode"]
    if mode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=tls.get("rootcert"))
        ctx.check_hostname = mode == "verify-full"
        if tls.get("cert"):
            ctx.load_cert_chain(tls["cert"], tls.get("key"))
        out["ssl"] = ctx
    else:
        out["ssl"] = mode
    return out


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except Exception as exc:
        from .registry import RegistryError

        if isinstance(exc, RegistryError | OSError) or type(exc).__module__.startswith("asyncpg"):
            typer.echo(f"pgsage: {exc}", err=True)
            raise typer.Exit(1) from None
        raise


# ------------------------------------------------------------------------------------ train


@train_app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="model name, or 'all'")] = "all",
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
    since: Annotated[datetime | None, typer.Option(help="first logged start time")] = None,
    until: Annotated[datetime | None, typer.Option(help="logged start times before this")] = None,
    max_rows: Annotated[int, typer.Option(help="latest rows of the log to use")] = 200_000,
    n_iter: Annotated[int, typer.Option(help="hyper-parameter sets to try")] = 8,
    min_rows: Annotated[int, typer.Option(help="fewer rows is a failed run")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
) -> None:
    """Extract, fit, evaluate, gate and register MODEL (or every model)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import TRAINERS, TrainConfig

    names = list(TRAINERS) if model == "all" else [model]
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        typer.echo(f"pgsage: unknown model {unknown[0]!r} (known: {', '.join(TRAINERS)})", err=True)
        raise typer.Exit(2)
    target = _target(ctx, dsn, model_dir)
    config = TrainConfig(since, until, max_rows, n_iter=n_iter, min_rows=min_rows)
    console = Console(stderr=True)

    async def run(conn: Any, registry: Any) -> list[Any]:
        import asyncpg

        wconn = None
        if target["warehouse_dsn"]:
            wconn = await asyncpg.connect(target["warehouse_dsn"])
        results = []
        try:
            with Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=console,
                transient=as_json,
            ) as bars:
                for name in names:
                    tasks: dict[str, Any] = {}

                    def progress(
                        stage: str, fraction: float, name: str = name, tasks: dict[str, Any] = tasks
                    ) -> None:
                        if stage not in tasks:
                            tasks[stage] = bars.add_task(f"{name}: {stage}", total=1.0)
                        bars.update(tasks[stage], completed=fraction)

                    results.append(await TRAINERS[name](conn, wconn, registry, config, progress))
        finally:
            if wconn is not None:
                await wconn.close()
        return results

    results = _run(_with_registry(target, run))
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {"name": r.name, "version": r.version, "status": r.status, "reason": r.reason}
                    for r in results
                ]
            )
        )
    else:
        for r in results:
            metrics = r.card.get("metrics", {})
            p90 = metrics.get("qerror_p90")
            extra = f", q-error p90 {p90:.2f}" if p90 is not None else ""
            console.print(f"{r.name} v{r.version}: [bold]{r.status}[/] ({r.reason}{extra})")
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------- models


@models_app.command("list")
def list_models(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="only this model")] = None,
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Versions of every model (or of NAME), newest first."""
    entries = _run(_with_registry(_target(ctx, dsn, model_dir), lambda c, r: r.list(name)))
    rows = [e.summary() for e in entries]
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "status", "created", "rows", "q-error p90", "R² log", "reason")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["version"]),
            ("* " if r["is_active"] else "") + r["status"],
            r["created_at"][:19],
            str(r["rows"] or ""),
            f"{r['qerror_p90']:.2f}" if r["qerror_p90"] is not None else "",
            f"{r['r2_log']:.3f}" if r["r2_log"] is not None else "",
            (r["reason"] or "")[:60],
        )
    Console().print(table)


@models_app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[int | None, typer.Option(help="a version (default: the active one)")] = None,
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the JSON card")] = False,
) -> None:
    """The card of the active version (or of --version)."""

    async def get(conn: Any, registry: Any) -> Any:
        return await (registry.get(name, version) if version else registry.active(name))

    entry = _run(_with_registry(_target(ctx, dsn, model_dir), get))
    if entry is None:
        typer.echo(f"pgsage: model {name!r} has no active version", err=True)
        raise typer.Exit(1)
    card = {**entry.card, "status": entry.status, "is_active": entry.is_active}
    card["reason"] = entry.reason
    if as_json:
        from .cost import to_json

        typer.echo(to_json(card))
        return
    from rich.console import Console
    from rich.markdown import Markdown

    from .registry import card_markdown

    Console().print(Markdown(card_markdown(card)))


@models_app.command("activate")
def activate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    version: Annotated[int, typer.Argument()],
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """Make VERSION the active version of NAME."""
    entry = _run(
        _with_registry(_target(ctx, dsn, model_dir), lambda c, r: r.activate(name, version))
    )
    typer.echo(f"{entry.name} v{entry.version} is active")


@models_app.command("rollback")
def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """Re-activate the version that was active before the current one."""
    entry = _run(_with_registry(_target(ctx, dsn, model_dir), lambda c, r: r.rollback(name)))
    typer.echo(f"{entry.name} v{entry.version} is active")


def main() -> None:  # `python -m models.cli` until the proxy mounts the apps
    app = typer.Typer(no_args_is_help=True)
    app.command("train")(train)
    app.add_typer(models_app, name="models")
    app(sys.argv[1:])


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------------------------ report


def report(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="folder for report.html, report.md and PNGs")] = Path(
        "report"
    ),
    dsn: DsnOpt = None,
    model_dir: ModelDirOpt = None,
) -> None:
    """The evaluation report: success metrics against the targets, plots, optimisation history."""
    from .report import build_report

    target = _target(ctx, dsn, model_dir)
    md, page = _run(_with_registry(target, lambda conn, reg: build_report(conn, reg, out)))
    typer.echo(f"wrote {page} and {md}")
