"""Everything `pgsage serve` runs, wired together: proxy, query log, sampler, HTTP.

Start order: migrations (if the metadata database is reachable; otherwise the proxy still
serves), the proxy's listener, the recorder and sampler tasks, the HTTP endpoint. Stop order:
the proxy (drains clients, see server.py), the recorder (flushes the queue), the sampler, HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from functools import partial
from typing import Any

from prometheus_client import generate_latest

from . import __version__, metadata
from . import reload as reload_
from .admission import LoadProbe
from .api import make_router
from .cache import RefreshListener
from .clock import CLOCK
from .http import create_app, make_http_server
from .log import get_logger
from .optimise import Optimiser
from .retrain import Retrainer
from .server import ProxyServer
from .settings import Settings
from .telemetry.collectors import TopFingerprints, TrafficCollector
from .telemetry.logclient import WorkerRecorder
from .telemetry.metrics import ProxyMetrics
from .telemetry.querylog import QueryLogRecorder
from .telemetry.sampler import SystemSampler
from .upstream import Upstream
from .workers import (
    ControlServer,
    WorkerInfo,
    ask_siblings,
    merged_exposition,
    rows_json,
    sibling_rows,
    worker_settings,
)


class Service:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        cli_overrides: dict[str, Any] | None = None,
        worker: WorkerInfo | None = None,
    ) -> None:
        self.settings = settings
        #: multi-worker mode (proxy/workers.py): which worker this is; None for one process
        self.worker = worker
        self.primary = worker is None or worker.primary
        self.cli_overrides = cli_overrides or {}
        self.upstream = upstream
        self.log = get_logger("pgsage")
        self.metrics = ProxyMetrics(version=__version__)
        self.metadata_args = metadata.metadata_connect_args(settings, upstream)
        self.recorder: QueryLogRecorder | WorkerRecorder
        if settings.querylog_worker:
            self.recorder = WorkerRecorder(settings, self.metrics, self.metadata_args)
        else:
            self.recorder = QueryLogRecorder(
                settings,
                self.metrics,
                partial(metadata.connect, self.metadata_args, "pgsage-querylog"),
            )
        self.metrics.registry.register(
            TopFingerprints(self.recorder.stats, lambda: self.settings.top_k_fingerprints)
        )
        self.proxy = ProxyServer(
            settings, upstream=upstream, sink=self.recorder, metrics=self.metrics
        )
        self.control: ControlServer | None = None
        self._telling = []
        self._loop: asyncio.AbstractEventLoop | None = None
        if worker is not None:
            self.proxy.worker = worker
            self.control = ControlServer(worker, self.control_answer)
        self.proxy.admin_context = self
        self.metrics.registry.register(TrafficCollector(self.proxy.traffic))
        self.sampler = SystemSampler(
            settings,
            self.metrics,
            partial(metadata.connect, self.metadata_args, "pgsage-sampler"),
            clients=lambda: len(self.proxy.admitted),
            executed=lambda: self.recorder.executed,
        )
        self.retrainer = Retrainer(settings, self.metrics, self.metadata_args)
        self.refresh_listener = (
            RefreshListener(
                self.proxy.cache,
                partial(metadata.connect, self.metadata_args, "pgsage-cache"),
                self.log,
            )
            if self.proxy.cache is not None
            else None
        )
        self.optimiser = Optimiser(settings, self.metadata_args, self.metrics.registry)
        self.optimiser.admission = self.proxy.admission
        self.load_probe = (
            LoadProbe(
                self.proxy.admission,
                partial(metadata.connect, self.metadata_args, "pgsage-admission"),
                self.log,
            )
            if self.proxy.admission is not None
            else None
        )
        if self.proxy.rewriter is not None:
            self.proxy.rewriter.connect = partial(
                metadata.connect, self.metadata_args, "pgsage-rewrite"
            )
        if self.proxy.steering is not None:
            self.proxy.steering.connect = partial(
                metadata.connect, self.metadata_args, "pgsage-steering"
            )
        self.migrations_applied: list[str] | None = None
        self.capabilities: dict[str, bool] = {}
        self.http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    def readiness(self) -> dict[str, Any]:
        return {
            "upstream": self.metrics.upstream_up._value.get() == 1,
            "migrations": self.migrations_applied is not None,
        }

    async def migrate(self) -> None:
        try:
            applied = await metadata.migrate(self.settings, self.upstream)
        except Exception as exc:
            self.log.warning(
                "metadata database unavailable; migrations not applied",
                target=metadata.describe(self.metadata_args),
                error=str(exc),
            )
            return
        self.migrations_applied = applied
        if applied:
            self.log.info("migrations applied", migrations=applied)
        await self.check_capabilities()

    async def check_capabilities(self) -> None:
        """Report missing optional extensions once, as reduced capability (never an error)."""
        try:
            self.capabilities = await metadata.capabilities(self.metadata_args)
        except Exception as exc:
            self.log.warning("could not read the upstream's extensions", error=str(exc))
            return
        missing = [name for name, ok in self.capabilities.items() if not ok]
        if missing:
            self.log.warning(
                "reduced capability: extensions not available on the upstream",
                missing=missing,
                effects={name: metadata.OPTIONAL_EXTENSIONS[name] for name in missing},
            )

    async def start(self) -> None:
        if self.settings.clock_speed != 1.0 or self.settings.clock_start is not None:
            self.apply_clock()
        if self.settings.auto_migrate:
            await self.migrate()
        self._loop = asyncio.get_running_loop()
        if self.control is not None:
            await self.control.start()
        await self.proxy.start()
        self.recorder.start()
        if self.primary:  # multi-worker mode: the primary alone samples, retrains, advises
            self.sampler.start()
            self.retrainer.start()
        if self.refresh_listener is not None:
            self.refresh_listener.start()
        self.optimiser.start(self.proxy.steering, self.proxy.rewriter, auto=self.primary)
        if self.load_probe is not None:
            self.load_probe.start()
        if self.proxy.rewriter is not None:
            self.proxy.rewriter.start()
        if self.proxy.steering is not None:
            self.proxy.steering.start()
        if self.primary:
            await self.sampler.sample()  # a first probe, so /readyz is meaningful at once
        if self.settings.http:
            host, port = self.settings.http_address
            app = create_app(self.metrics, self.readiness, self.exposition)
            app.include_router(make_router(self), prefix="/api/v1")
            self.http = make_http_server(app, host, port)
            self._http_task = asyncio.ensure_future(self.http.serve())
            while not self.http.started:
                if self._http_task.done():
                    self._http_task.result()  # raises the bind error
                    raise RuntimeError(f"HTTP server did not start on {host}:{port}")
                await asyncio.sleep(0.01)
            self.http_port = self.http.servers[0].sockets[0].getsockname()[1]
            self.log.info("http listening", http=f"{host}:{self.http_port}")

    #: the HTTP API's background jobs (training, data generation, ETL)
    api_jobs: Any = None

    async def stop(self) -> None:
        if self.api_jobs is not None:
            await self.api_jobs.cancel_all()
        await self.proxy.shutdown()
        await self.recorder.stop()
        await self.sampler.stop()
        await self.retrainer.stop()
        if self.refresh_listener is not None:
            await self.refresh_listener.stop()
        await self.optimiser.stop()
        if self.load_probe is not None:
            await self.load_probe.stop()
        if self.proxy.rewriter is not None:
            await self.proxy.rewriter.stop()
        if self.proxy.steering is not None:
            await self.proxy.steering.stop()
        if self.http is not None and self._http_task is not None:
            self.http.should_exit = True
            await asyncio.wait([self._http_task], timeout=5)
        if self.control is not None:
            await self.control.stop()

    async def serve_until(self, stop: asyncio.Event) -> None:
        self._stop_event = stop
        await self.start()
        await stop.wait()
        await self.stop()

    # ---------------------------------------------------------------- AdminContext

    _stop_event: asyncio.Event | None = None

    @property
    def admin_database(self) -> str:
        return self.settings.admin_database

    def client_sessions(self) -> list[Any]:
        return [c for c in self.proxy.clients if not c.is_admin]

    def idle_servers(self) -> list[Any]:
        pool = self.proxy.pool
        return [] if pool is None else pool.servers()

    def database_stats(self) -> dict[str, dict[str, float]]:
        stats = {db: dict(v) for db, v in self.recorder.db_stats.items()}
        for db, (rx, tx) in self.proxy.traffic_by_database().items():
            entry = stats.setdefault(db, {"queries": 0, "seconds": 0.0, "errors": 0})
            entry["received"], entry["sent"] = rx, tx
        return stats

    def query_stats(self, limit: int) -> list[Any]:
        return self.recorder.stats.top(limit)

    def config_items(self) -> list[tuple[str, str, str, bool]]:
        return reload_.config_items(self.settings)

    def set_setting(self, key: str, value: str) -> str | None:
        problem = self._set_setting(key, value)
        if problem is None:
            self._tell_siblings("set " + json.dumps([key, value]))
        return problem

    def _set_setting(self, key: str, value: str) -> str | None:
        problem = reload_.set_setting(self.settings, key, value)
        if problem is None and key.startswith("clock_"):
            self.apply_clock()
        return problem

    def apply_clock(self) -> None:
        CLOCK.set(self.settings.clock_speed, self.settings.clock_start)

    def reload(self) -> str | None:
        """RELOAD in the admin console (or the API): this process and every other worker."""
        self._tell_siblings("reload")
        return self.reload_here()

    def reload_here(self) -> str | None:
        """Re-read the configuration in this process (SIGHUP: in multi-worker mode the
        supervisor sends it to every worker)."""
        worker, adjust = self.worker, None
        if worker is not None:  # a worker's port, share of the client limit and role stay
            listen = self.settings.listen
            adjust = partial(worker_settings, info=worker, listen=listen)
        problem, changed = reload_.reload(self.settings, self.cli_overrides, adjust)
        if any(k.startswith("clock_") for k in changed):
            self.apply_clock()
        if changed:
            self.log.info("configuration reloaded", changed=changed)
        return problem

    def cache_stats(self) -> dict[str, Any] | None:
        cache = self.proxy.cache
        if cache is None:
            return None
        stats = cache.stats()
        if self.refresh_listener is not None:
            stats["listening"] = self.refresh_listener.listening
        return stats

    def admission_lanes(self) -> list[tuple[str, Any]] | None:
        adm = self.proxy.admission
        return None if adm is None else adm.lanes()

    def rewrite_rows(self) -> list[tuple[Any, ...]] | None:
        rewriter = self.proxy.rewriter
        return None if rewriter is None else rewriter.rows()

    def steering_rows(self) -> list[tuple[Any, ...]] | None:
        steering = self.proxy.steering
        return None if steering is None else steering.rows()

    async def clear_cache(self) -> int | None:
        cache = self.proxy.cache
        return None if cache is None else await cache.clear()

    def pause(self) -> None:
        self.proxy.pause()
        self._tell_siblings("pause")

    def resume(self) -> None:
        self.proxy.resume()
        self._tell_siblings("resume")

    def request_shutdown(self) -> None:
        if self.worker is not None:  # the supervisor stops every worker (and none restarts)
            os.kill(os.getppid(), signal.SIGTERM)
        elif self._stop_event is not None:
            self._stop_event.set()

    # ---------------------------------------------------------------- multi-worker mode

    @property
    def has_workers(self) -> bool:
        return self.worker is not None and self.worker.count > 1

    async def sibling_rows(self, what: str) -> list[tuple[Any, ...]]:
        return [] if self.worker is None else await sibling_rows(self.worker, what)

    def worker_row(self) -> tuple[Any, ...]:
        role = "single" if self.worker is None else "primary" if self.primary else "worker"
        return (0 if self.worker is None else self.worker.index, os.getpid(), role,
                len(self.client_sessions()), self.recorder.executed,
                f"{self.proxy.host}:{self.proxy.port}")  # fmt: skip

    def exposition(self) -> bytes:
        """/metrics: this process's registry, or every worker's with a `worker` label. Called
        from the HTTP server's thread pool: the siblings are asked on the event loop."""
        own = generate_latest(self.metrics.registry)
        if self.worker is None or not self.has_workers or self._loop is None:
            return own
        asked = ask_siblings(self.worker, "metrics")
        theirs = asyncio.run_coroutine_threadsafe(asked, self._loop).result(10)
        return merged_exposition({self.worker.index: own, **theirs})

    def control_answer(self, command: str, arg: str) -> bytes:
        """A sibling's request on this worker's control socket (see proxy/workers.py)."""
        if command == "cancel":
            return b"1" if self.proxy.accept_relayed_cancel(bytes.fromhex(arg)) else b"0"
        if command == "metrics":
            return generate_latest(self.metrics.registry)
        if command == "rows":
            from .admin.commands import LOCAL_ROWS

            local = LOCAL_ROWS.get(arg)
            return rows_json(local(self)) if local is not None else b"[]"
        if command == "set":
            key, value = json.loads(arg)
            return (self._set_setting(key, value) or "").encode()
        if command == "reload":
            return (self.reload_here() or "").encode()
        if command == "pause":
            self.proxy.pause()
        elif command == "resume":
            self.proxy.resume()
        return b""

    def _tell_siblings(self, request: str) -> None:
        """Pass an admin change (SET, RELOAD, PAUSE, RESUME) on to every other worker; the
        admin command completes once they have it (`siblings_told`)."""
        if self.worker is not None and self.has_workers:
            self._telling = [f for f in self._telling if not f.done()]
            self._telling.append(asyncio.ensure_future(ask_siblings(self.worker, request)))

    _telling: list[asyncio.Future[Any]]

    async def siblings_told(self) -> None:
        pending, self._telling = self._telling, []
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
