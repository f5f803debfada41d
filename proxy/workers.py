"""Multi-worker mode: `workers` processes accepting clients on one port (SO_REUSEPORT).

One Python process relays at most one core's worth of traffic. With `workers = N` (0: one per
core) `pgsage serve` becomes a supervisor that reserves the listen port and forks N workers;
each worker is a whole `Service` (relay, query log worker, steering, rewrites, admission) that
binds the same port with SO_REUSEPORT, so the kernel spreads new connections across them. A
client's session lives in one worker for its life.

* Worker 0 is the primary: it applies migrations and alone runs the HTTP endpoint (/metrics
  and the admin API), the system sampler, scheduled retraining and the automatic optimiser.
  The others run the relay and what a session needs. Learned state (steering posteriors,
  proven rewrites, admission lanes, the in-memory result cache) is per worker: each learns
  from the sessions it holds. `max_client_connections` is shared out (ceil(max / N) each).
* Each worker listens on a control socket (a Unix socket in a private directory) that its
  siblings use. A CancelRequest carries the key of a session that may live in another worker
  (a cancel is a new connection, and the kernel picks its worker): a worker that does not
  know the key relays the packet to its siblings, and the one that owns the session sends it
  upstream. The key is PostgreSQL's own, checked against the owner's live sessions, exactly as
  in a single process.
* /metrics on the primary gathers every worker's registry through the control sockets and
  exposes each sample with a `worker` label (sum by the other labels for totals); the admin
  console's SHOW CLIENTS, SERVERS and STATS include every worker's sessions, and SHOW WORKERS
  lists the workers.
* The supervisor forwards SIGTERM/SIGINT (graceful shutdown) and SIGHUP (reload) to the
  workers, and starts a worker again if one dies while serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from .log import get_logger
from .settings import Settings
from .upstream import Upstream

#: a control request is one line; a reply at most this many bytes (a metrics exposition)
MAX_LINE = 4096
MAX_REPLY = 64 * 1024 * 1024
RESTART_DELAY = 1.0
#: a worker that exits sooner than this after its start failed to start; this many such exits
#: in a row (a bad TLS key, say) stop the supervisor instead of restarting forever
QUICK_EXIT = 10.0
MAX_QUICK_EXITS = 3


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is, and where its siblings listen."""

    index: int
    count: int
    run_dir: Path

    @property
    def primary(self) -> bool:
        return self.index == 0

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.sock"

    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


def worker_count(configured: int) -> int:
    """`workers` resolved: 0 means one per core."""
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------ control sockets


class ControlServer:
    """A worker's control socket: one request line in, one reply out, then the connection
    closes. Requests: `cancel <hex>` (a relayed CancelRequest: b"1" if this worker owns the
    session and sent it upstream), `metrics` (this worker's exposition), `rows <what>` (JSON
    rows for the admin console: clients, servers, stats, worker)."""

    def __init__(self, info: WorkerInfo, answer: Callable[[str, str], bytes]) -> None:
        self.info = info
        self.answer = answer
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.info.socket_path(self.info.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(path),
                                                       limit=MAX_LINE)  # fmt: skip

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            command, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            try:
                reply = self.answer(command, arg)
            except Exception as exc:  # a sibling's request never takes this worker down
                get_logger("pgsage.workers").warning("control request failed",
                                                     command=command, error=str(exc))  # fmt: skip
                reply = b""
            writer.write(reply)
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.info.socket_path(self.info.index).unlink()


async def ask_siblings(info: WorkerInfo, request: str, timeout: float = 2.0) -> dict[int, bytes]:
    """Send `request` to every sibling; their replies by index (a sibling that is restarting
    or does not answer in time is left out)."""

    async def one(i: int) -> tuple[int, bytes | None]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(info.socket_path(i)), limit=MAX_LINE), timeout
            )
        except (TimeoutError, OSError):
            return i, None
        try:
            writer.write(request.encode("ascii") + b"\n")
            await writer.drain()
            return i, await asyncio.wait_for(reader.read(MAX_REPLY), timeout)
        except (TimeoutError, OSError):
            return i, None
        finally:
            writer.close()

    replies = await asyncio.gather(*(one(i) for i in info.siblings()))
    return {i: r for i, r in replies if r is not None}


def rows_json(rows: Iterable[Iterable[Any]]) -> bytes:
    return json.dumps([list(r) for r in rows], default=str).encode()


async def sibling_rows(info: WorkerInfo, what: str) -> list[tuple[Any, ...]]:
    """The admin console's rows of `what` from every sibling, in worker order."""
    replies = await ask_siblings(info, f"rows {what}")
    out: list[tuple[Any, ...]] = []
    for i in sorted(replies):
        with contextlib.suppress(ValueError):
            out.extend(tuple(r) for r in json.loads(replies[i]))
    return out


# ------------------------------------------------------------------------------ metrics


def merged_exposition(texts: dict[int, bytes]) -> bytes:
    """Every worker's metrics (exposition by worker index) in one exposition, each sample
    labelled with its `worker`."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    families: dict[str, Metric] = {}
    for index in sorted(texts):
        try:
            parsed = list(text_string_to_metric_families(texts[index].decode()))
        except Exception:  # a truncated reply: that worker is left out of this scrape
            continue
        for fam in parsed:
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                     fam.unit)  # fmt: skip
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value,
                                  s.timestamp, s.exemplar)  # fmt: skip

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


# ------------------------------------------------------------------------------ the supervisor


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the listen address with SO_REUSEPORT: it fixes the
    port (port 0 becomes a real one) and keeps it while workers come and go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def worker_settings(settings: Settings, info: WorkerInfo, listen: str) -> Settings:
    """A worker's settings: the resolved port, its share of the client limit, and for all but
    the primary no HTTP endpoint and no migrations."""
    update: dict[str, Any] = {
        "listen": listen,
        "max_client_connections": math.ceil(settings.max_client_connections / info.count),
    }
    if not info.primary:
        update.update(http="", auto_migrate=False)
    return settings.model_copy(update=update)


def _worker_main(settings: Settings, upstream: Upstream, overrides: dict[str, Any],
                 info: WorkerInfo) -> None:  # fmt: skip
    from .runner import run_worker

    run_worker(settings, upstream, overrides, info)


def supervise(settings: Settings, upstream: Upstream, overrides: dict[str, Any],
              count: int) -> int:  # fmt: skip
    """Run `count` workers until SIGTERM/SIGINT; returns the exit code."""
    log = get_logger("pgsage")
    host, port = settings.listen_address
    try:
        reserved = _reserve(host, port)
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc}") from None
    port = reserved.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    run_dir = Path(tempfile.mkdtemp(prefix="pgsage-workers-"))
    ctx = multiprocessing.get_context("fork")
    procs: dict[int, Any] = {}
    started: dict[int, float] = {}
    stopping = False
    quick_exits, code = 0, 0

    def start(i: int) -> None:
        info = WorkerInfo(i, count, run_dir)
        own = worker_settings(settings, info, listen)
        p = ctx.Process(target=_worker_main, name=f"pgsage-worker-{i}",
                        args=(own, upstream, overrides, info))  # fmt: skip
        p.start()
        procs[i] = p
        started[i] = time.monotonic()

    def forward(sig: int, _frame: Any = None) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for i in range(count):
            start(i)
        log.info("workers started", workers=count, listen=listen,
                 pids=[p.pid for p in procs.values()])  # fmt: skip
        while not stopping:
            wait([p.sentinel for p in procs.values()], timeout=0.5)
            for i, p in list(procs.items()):
                if p.is_alive() or stopping:
                    continue
                quick = time.monotonic() - started[i] < QUICK_EXIT
                quick_exits = quick_exits + 1 if quick else 0
                if quick_exits >= MAX_QUICK_EXITS:
                    log.error("workers keep exiting at start; stopping", worker=i,
                              exitcode=p.exitcode)  # fmt: skip
                    code = 1
                    forward(signal.SIGTERM)
                    break
                log.error("worker exited; starting it again", worker=i, exitcode=p.exitcode)
                time.sleep(RESTART_DELAY)
                if not stopping:
                    start(i)
        deadline = time.monotonic() + settings.shutdown_timeout + 10
        for p in procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        log.info("workers stopped")
        return code
    finally:
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)
