"""The part of a query log recorder the relay touches: a bounded queue and a flush loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from ..log import get_logger
from ..records import StatementRecord
from ..settings import Settings


class BatchingSink:
    """A RecordSink: `__call__` appends to a bounded deque (counting what does not fit);
    `run()` calls `flush_once()` every `querylog_flush_interval`, or as soon as a batch is full.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue: deque[StatementRecord] = deque()
        self.max_queue = settings.querylog_queue_size
        self.batch_size = settings.querylog_batch_size
        self.wake = asyncio.Event()
        self.log = get_logger("pgsage.querylog")
        self.dropped_full = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def __call__(self, record: StatementRecord) -> None:
        q = self.queue
        if len(q) < self.max_queue:
            q.append(record)
            if len(q) == self.batch_size:
                self.wake.set()
        else:
            self.dropped_full += 1

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        interval = self.settings.querylog_flush_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)
            self.wake.clear()
            try:
                await self.flush_once()
            except Exception:  # never let the logger's failure reach the relay
                self.log.exception("query log flush failed")

    async def flush_once(self, force_stats: bool = False) -> None:
        raise NotImplementedError

    async def _stop_loop(self, timeout: float) -> None:
        self._stopping = True
        self.wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
