"""Per-statement records the proxy hands to its sinks (the query log recorder, tests, metrics).

A record is the session's identity plus the tracker's `Execution`; wall-clock (or simulated) times
are derived from the monotonic times the hot path takes, so it reads one clock once per chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .clock import CLOCK
from .protocol import Execution


@dataclass(slots=True)
class SessionInfo:
    id: int
    client_addr: str
    database: str | None = None
    user: str | None = None
    application_name: str | None = None
    tls: bool = False
    #: application_name mapped to a closed set (a label value), set once per session
    app: str = "other"


@dataclass(slots=True)
class StatementRecord:
    session: SessionInfo
    execution: Execution
    #: log_parameters when the statement finished: its text may be stored with its literals
    keep_text: bool = False

    @property
    def started_at(self) -> float:
        return CLOCK.epoch(self.execution.start)

    @property
    def finished_at(self) -> float:
        return CLOCK.epoch(self.execution.end)

    @property
    def duration(self) -> float:
        return self.execution.end - self.execution.start

    @property
    def protocol(self) -> str:
        return self.execution.protocol.value

    @property
    def sql(self) -> str | None:
        return self.execution.sql

    @property
    def rows(self) -> int | None:
        return self.execution.rows

    @property
    def status(self) -> str:
        return self.execution.status.value

    @property
    def sqlstate(self) -> str | None:
        return self.execution.sqlstate


#: what the relay hands a finished request's statements to: one call per request (the
#: session, its executions in order, and whether their texts may keep their literals), not
#: one per statement: on `pgbench -S` a record object and a call per statement were a tenth of
#: the relay's Python work
RecordSink = Callable[[SessionInfo, list[Execution], bool], None]


class MemorySink:
    """Keeps the last `maxlen` records in memory (tests, the admin console's recent view)."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.records: deque[StatementRecord] = deque(maxlen=maxlen)

    def __call__(self, info: SessionInfo, executions: list[Execution], keep_text: bool) -> None:
        self.records.extend([StatementRecord(info, ex, keep_text) for ex in executions])

    def clear(self) -> None:
        self.records.clear()
