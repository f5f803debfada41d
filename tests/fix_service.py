"""Fixtures: the whole `pgsage serve` service (proxy, query log, sampler, HTTP) in-process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from proxy.service import Service
from proxy.settings import Settings
from proxy.telemetry.querylog import QueryLogRecorder
from proxy.upstream import Upstream
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database

T = TypeVar("T")


class RunningService:
    """A Service on a private event loop thread, with its own warehouse database."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("http", "127.0.0.1:0")
        settings.setdefault("upstream", f"{PG_HOST}:{PG_PORT}")
        settings.setdefault("querylog_flush_interval", 0.2)
        settings.setdefault("stats_flush_interval", 0.5)
        self.own_db = "warehouse_database" not in settings
        if self.own_db:
            settings["warehouse_database"] = create_database("pgsage_wh")
        self.settings = Settings(**settings)
        self.overrides = dict(settings)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.stop_event: asyncio.Event = self.call(self._make_event())
        self.service = Service(
            self.settings, Upstream.parse(self.settings.upstream), cli_overrides=self.overrides
        )
        self.service._stop_event = self.stop_event
        self.call(self.service.start())
        self.host, self.port = self.service.proxy.host, self.service.proxy.port
        self.http_port = self.service.http_port
        self.stopped = False

    @staticmethod
    async def _make_event() -> asyncio.Event:
        return asyncio.Event()

    @property
    def database(self) -> str:
        return self.settings.warehouse_database

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def dsn(self, dbname: str | None = None, **extra: Any) -> str:
        parts = {
            "host": self.host,
            "port": self.port,
            "user": PG_USER,
            "dbname": dbname or self.database,
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def flush(self) -> None:
        """Write everything queued so far (as shutdown would)."""

        async def _flush() -> None:
            rec = self.service.recorder
            if isinstance(rec, QueryLogRecorder):  # the worker resets its own on a forced flush
                rec._retry_at = 0.0
            while rec.queue:
                await rec.flush_once(force_stats=True)
            await rec.flush_stats()

        self.call(_flush())

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.call(self.service.stop(), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            if self.own_db:
                drop_database(self.database)


@pytest.fixture
def make_service() -> Iterator[Callable[..., RunningService]]:
    started: list[RunningService] = []

    def factory(**settings: Any) -> RunningService:
        s = RunningService(**settings)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def service(make_service: Callable[..., RunningService]) -> RunningService:
    return make_service()
