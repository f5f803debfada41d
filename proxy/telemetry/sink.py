"""The part of a query log recorder the relay touches: a bounded queue and a flush loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from ..log import get_logger
from ..protocol import Execution
from ..records import SessionInfo
from ..settings import Settings

#: what the relay queued in one call: the session, its finished statements, whether their texts
#: may keep their literals (flattened into rows only when a batch is shipped: logrows.flatten)
Group = tuple[SessionInfo, list[Execution], bool]


class BatchingSink:
    """A RecordSink: `__call__` appends a request's statements to a bounded deque (counting the
    statements that do not fit); `run()` calls `flush_once()` every `querylog_flush_interval`,
    or as soon as a batch is full.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue: deque[Group] = deque()
        #: statements in `queue` (the bound, `querylog_queue_size`, counts statements)
        self.queued = 0
        self.max_queue = settings.querylog_queue_size
        self.batch_size = settings.querylog_batch_size
        self.wake = asyncio.Event()
        self.log = get_logger("pgsage.querylog")
        self.dropped_full = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def __call__(self, info: SessionInfo, executions: list[Execution], keep_text: bool) -> None:
        before = self.queued
        after = before + len(executions)
        if after > self.max_queue:  # what fits is kept, the rest counted
            fit = self.max_queue - before
            if fit <= 0:
                self.dropped_full += len(executions)
                return
            self.dropped_full += len(executions) - fit
            executions = executions[:fit]
            after = self.max_queue
        self.queue.append((info, executions, keep_text))
        self.queued = after
        if before < self.batch_size <= after:
            self.wake.set()

    def take(self, limit: int | None = None) -> list[Group]:
        """Queued groups, oldest first, up to `limit` statements (a group is never split: one
        more group may pass the limit), or all of them."""
        q = self.queue
        if limit is None or limit >= self.queued:
            out = list(q)
            q.clear()
            self.queued = 0
            return out
        out = []
        n = 0
        while q and n < limit:
            group = q.popleft()
            n += len(group[1])
            out.append(group)
        self.queued -= n
        return out

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
