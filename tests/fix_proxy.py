"""Fixtures: a real pgsage proxy in front of a real PostgreSQL, and throwaway databases.

The proxy runs in-process on its own uvloop event loop in a background thread, so tests can use
blocking drivers (psycopg, subprocesses) against it and still read its records and state.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
import uvloop

from proxy.records import MemorySink
from proxy.server import ProxyServer
from proxy.settings import Settings
from proxy.upstream import Upstream

T = TypeVar("T")

#: the PostgreSQL the tests use (trust auth), overridable for other machines
PG_HOST = os.environ.get("PGSAGE_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGSAGE_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("PGSAGE_TEST_PGUSER", "postgres")


def direct_dsn(dbname: str = "postgres", **extra: Any) -> str:
    parts = {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "dbname": dbname, **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


class RunningProxy:
    """A ProxyServer on a private event loop thread."""

    def __init__(self, upstream: Upstream | None = None, **settings: Any) -> None:
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("upstream", f"{PG_HOST}:{PG_PORT}")
        self.settings = Settings(**settings)
        self.sink = MemorySink()
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = ProxyServer(self.settings, upstream=upstream, sink=self.sink)
        self.call(self.server.start())
        self.host, self.port = self.server.host, self.server.port
        self.stopped = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper())

    def dsn(self, dbname: str = "postgres", **extra: Any) -> str:
        parts = {"host": self.host, "port": self.port, "user": PG_USER, "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    @property
    def records(self) -> list[Any]:
        return list(self.sink.records)

    def stop(self, timeout: float = 5) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.call(self.server.shutdown(timeout), timeout + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def factory(**settings: Any) -> RunningProxy:
        p = RunningProxy(**settings)
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return make_proxy()


def create_database(prefix: str = "pgsage_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(direct_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(direct_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def test_db() -> Iterator[str]:
    """A database of its own for the whole test session, dropped at the end."""
    name = create_database()
    yield name
    drop_database(name)


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """A database for one test, dropped after it."""
    name = create_database()
    yield name
    drop_database(name)
