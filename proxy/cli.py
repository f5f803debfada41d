"""The `pgsage` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="pgsage: a self-optimising PostgreSQL warehouse proxy.", no_args_is_help=True
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default config/pgsage.toml)"),
]


def _settings_or_exit(config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        typer.echo(f"pgsage: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    listen: Annotated[str | None, typer.Option(help="host:port clients connect to")] = None,
    upstream: Annotated[
        str | None, typer.Option(help="host:port (or socket path) of PostgreSQL; '' = embedded")
    ] = None,
    http: Annotated[str | None, typer.Option(help="host:port of the HTTP API")] = None,
    max_client_connections: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[
        int | None, typer.Option(help="relay processes on the listen port; 0 = one per core")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option()] = None,
    tls_key: Annotated[Path | None, typer.Option()] = None,
    clock_speed: Annotated[
        float | None, typer.Option(help="simulated seconds per real second (workload bench)")
    ] = None,
    clock_start: Annotated[str | None, typer.Option(help="simulated start, ISO 8601")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto|json|console")] = None,
    log_level: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Run the proxy in front of the configured upstream (or an embedded PostgreSQL)."""
    flags = {
        "listen": listen,
        "upstream": upstream,
        "http": http,
        "max_client_connections": max_client_connections,
        "workers": workers,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "log_format": log_format,
        "log_level": log_level,
        "clock_speed": clock_speed,
        "clock_start": clock_start,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    settings = _settings_or_exit(config, **overrides)
    from .log import configure_logging, get_logger
    from .runner import run_proxy

    configure_logging(settings.log_format, settings.log_level)
    log = get_logger("pgsage")
    try:
        run_proxy(settings, overrides)
    except RuntimeError as exc:
        log.error("cannot start", error=str(exc))
        raise typer.Exit(1) from None


@app.command()
def migrate(
    config: ConfigOpt = None,
    upstream: Annotated[str | None, typer.Option(help="host:port or socket path")] = None,
    database: Annotated[str | None, typer.Option(help="warehouse database name")] = None,
) -> None:
    """Create the warehouse database if needed and apply pending schema migrations."""
    settings = _settings_or_exit(config, upstream=upstream, warehouse_database=database)
    from .log import configure_logging
    from .metadata import migrate as run_migrations
    from .runner import resolve_upstream

    configure_logging(settings.log_format, settings.log_level)
    target, embedded = resolve_upstream(settings)
    try:
        applied = asyncio.run(run_migrations(settings, target))
    except Exception as exc:
        typer.echo(f"pgsage: migration failed: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if embedded is not None:
            embedded.stop()
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Shared context for subcommands that talk to the metadata database (train, models)."""
    try:
        settings = load_settings()
    except SettingsError:
        return  # commands that load settings themselves report the problem
    if not settings.upstream and not settings.metadata_dsn:
        return
    from .metadata import metadata_connect_args
    from .upstream import Upstream

    args = metadata_connect_args(settings, Upstream.parse(settings.upstream or "127.0.0.1:5432"))
    ctx.obj = {"connect_args": args} if "dsn" not in args else {"dsn": args["dsn"]}


warehouse_app = typer.Typer(help="The bundled warehouse: generate data, run the ETL.",
                            no_args_is_help=True)  # fmt: skip


def _warehouse_dsn(config: Path | None, upstream: str | None) -> tuple[Settings, str, object]:
    """A libpq DSN for the upstream (starting the embedded server if that is what is used)."""
    settings = _settings_or_exit(config, upstream=upstream)
    from .runner import resolve_upstream

    target, embedded = resolve_upstream(settings)
    user = settings.metadata_user
    if target.unix_socket is not None:
        port = target.unix_socket.name.rsplit(".", 1)[-1]
        dsn = f"postgresql://{user}@/postgres?host={target.unix_socket.parent}&port={port}"
    else:
        dsn = f"postgresql://{user}@{target.host}:{target.port}/postgres"
    return settings, dsn, embedded


@warehouse_app.command("init")
def warehouse_init(
    config: ConfigOpt = None,
    scale: Annotated[float, typer.Option(help="1 = 10k customers, 100k sales; linear")] = 1.0,
    seed: Annotated[int, typer.Option(help="same seed, same data")] = 42,
    database: Annotated[str | None, typer.Option(help="default: warehouse_database")] = None,
    upstream: Annotated[str | None, typer.Option(help="host:port or socket path")] = None,
    reset: Annotated[bool, typer.Option(help="drop and rebuild the data")] = False,
    etl: Annotated[bool, typer.Option(help="run the ETL after loading")] = True,
) -> None:
    """Create the warehouse database, apply migrations, generate and load data, run the ETL."""
    from bench.warehouse import init_warehouse

    settings, dsn, embedded = _warehouse_dsn(config, upstream)
    try:
        init_warehouse(dsn, scale, seed, database or settings.warehouse_database,
                       etl=etl, reset=reset)  # fmt: skip
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]


@warehouse_app.command("etl")
def warehouse_etl(
    config: ConfigOpt = None,
    database: Annotated[str | None, typer.Option(help="default: warehouse_database")] = None,
    upstream: Annotated[str | None, typer.Option(help="host:port or socket path")] = None,
) -> None:
    """Bronze -> silver -> gold, incrementally; prints the data-quality summary."""
    from bench.warehouse import run_etl

    settings, dsn, embedded = _warehouse_dsn(config, upstream)
    try:
        run_etl(dsn, database or settings.warehouse_database)
    finally:
        if embedded is not None:
            embedded.stop()  # type: ignore[attr-defined]


app.add_typer(warehouse_app, name="warehouse")


def _mount_models() -> None:
    from models.cli import models_app, report, train

    app.command("train", help="Train models from the query log (MODEL or 'all').")(train)
    app.add_typer(models_app, name="models", help="The model registry: list, show, activate.")
    app.command("report", help="The evaluation report (HTML and Markdown with plots).")(report)
    from bench.workload.cli import workload_app

    app.add_typer(workload_app, name="workload", help="Simulated users, clock and anomalies.")
    from models.advisor_cli import advise

    app.command("advise", help="Ranked index recommendations from the query log.")(advise)


_mount_models()


@app.command()
def demo(
    config: ConfigOpt = None,
    quick: Annotated[bool, typer.Option(help="small and short (about 3 minutes)")] = False,
    scale: Annotated[float | None, typer.Option(help="warehouse scale")] = None,
    duration: Annotated[float | None, typer.Option(help="real seconds of simulated users")] = None,
    database: Annotated[str, typer.Option(help="demo warehouse database")] = "pgsage_demo",
    wait: Annotated[bool, typer.Option(help="keep pgsage running until Ctrl-C")] = True,
) -> None:
    """The whole loop: warehouse, pgsage, simulated users, a trained model, a report."""
    from rich.console import Console

    from .demo import DemoConfig, run_demo

    settings = _settings_or_exit(config)
    cfg = DemoConfig(database=database, wait=wait)
    if quick:
        cfg.scale, cfg.duration, cfg.qps = 0.05, 60.0, 40.0
    if scale is not None:
        cfg.scale = scale
    if duration is not None:
        cfg.duration = duration
    raise typer.Exit(run_demo(settings, cfg, Console()))


@app.command()
def docs(
    out: Annotated[Path, typer.Option(help="folder for the generated references")] = Path(
        "docs/reference"
    ),
) -> None:
    """Regenerate the configuration and metrics references from the code."""
    from .docs import write

    for path in write(out):
        typer.echo(f"wrote {path}")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    # SIGPIPE stays ignored, as Python sets it: `pgsage serve` and the demo's simulated users write
    # to sockets whose peer may be gone, which must be an EPIPE error, not the process's death.
    # (Click already turns a closed stdout, `pgsage ... | head`, into a quiet exit.)
    app()


if __name__ == "__main__":
    main()
    sys.exit(0)
