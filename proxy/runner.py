"""Process-level wiring of `pgsage serve`: event loop, signals, upstream resolution."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

from .embedded import EmbeddedPostgres, upstream_reachable
from .log import get_logger
from .service import Service
from .settings import Settings
from .upstream import Upstream
from .workers import WorkerInfo, supervise, worker_count


def resolve_upstream(settings: Settings) -> tuple[Upstream, EmbeddedPostgres | None]:
    """The configured upstream, or an embedded PostgreSQL when none is configured or reachable."""
    log = get_logger("pgsage")
    if settings.upstream:
        upstream = Upstream.parse(settings.upstream)
        if upstream_reachable(upstream) or not settings.embedded_fallback:
            return upstream, None
        log.warning(
            "upstream unreachable; starting the embedded PostgreSQL", upstream=str(upstream)
        )
    embedded = EmbeddedPostgres(settings.embedded_data_dir)
    upstream = embedded.start()
    log.info("embedded PostgreSQL started", socket=str(upstream), uri=embedded.uri)
    return upstream, embedded


async def _serve(settings: Settings, upstream: Upstream, overrides: dict[str, Any],
                 worker: WorkerInfo | None = None) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = Service(settings, upstream, overrides, worker=worker)
    loop.add_signal_handler(signal.SIGHUP, service.reload_here)
    tune_gc()
    await service.serve_until(stop)


def tune_gc() -> None:
    """The relay allocates a few short-lived objects per statement and keeps up to a second of
    records queued: with the default thresholds the cyclic collector runs thousands of times a
    second, walking those queues. Objects alive at start-up are frozen out of its sight, and it
    runs after 50,000 allocations instead of 700; nothing here relies on it for memory."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_proxy(settings: Settings, overrides: dict[str, Any] | None = None) -> None:
    upstream, embedded = resolve_upstream(settings)
    try:
        count = worker_count(settings.workers)
        if count > 1:
            if supervise(settings, upstream, overrides or {}, count):
                raise RuntimeError("workers kept exiting at start (see their errors above)")
        else:
            _run(_serve(settings, upstream, overrides or {}))
    finally:
        if embedded is not None:
            embedded.stop()


def run_worker(settings: Settings, upstream: Upstream, overrides: dict[str, Any],
               info: WorkerInfo) -> None:  # fmt: skip
    """One worker of multi-worker mode (a forked child of the supervisor)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)  # the supervisor's handlers are not this process's
    _run(_serve(settings, upstream, overrides, info))


def _run(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)
