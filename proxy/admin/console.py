"""Parses admin commands and answers them; sans-IO (SQL text in, backend messages out)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Iterable
from typing import Any, Protocol

from ..protocol.backend import ReadyForQuery
from . import commands
from .results import error

_SHOW = re.compile(r"^show\s+(\w+)(?:\s+limit\s+(\d+))?$", re.IGNORECASE)
_ACTION = re.compile(r"^(\w+)\s+(\w+)\s+(\d+)$", re.IGNORECASE)
_SET = re.compile(r"^set\s+(\w+)\s*(?:=|\s+to\s+)\s*(.+)$", re.IGNORECASE)
_BARE = {
    "reload": commands.reload,
    "pause": commands.pause,
    "resume": commands.resume,
    "shutdown": commands.shutdown,
}

VALID = (
    "SHOW HELP|STATS|CLIENTS|SERVERS|WORKERS|QUERIES [LIMIT n]|CONFIG|CACHE|LANES|STEERING|"
    "REWRITES|"
    "RECOMMENDATIONS|"
    "VERSION, "
    "SHOW ANOMALIES [LIMIT n]|CLUSTERS, SET key = value, APPLY|REJECT RECOMMENDATION n, "
    "ACK ANOMALY n, RELOAD, PAUSE, RESUME, SHUTDOWN"
)


class AdminContext(Protocol):
    """What the console needs from the running service."""

    admin_database: str
    #: multi-worker mode: SHOW CLIENTS, SERVERS, STATS and WORKERS gather every worker's rows
    has_workers: bool

    async def sibling_rows(self, what: str) -> list[tuple[Any, ...]]: ...
    def worker_row(self) -> tuple[Any, ...]: ...
    async def siblings_told(self) -> None: ...
    def client_sessions(self) -> Iterable[Any]: ...
    def idle_servers(self) -> Iterable[Any]: ...
    def database_stats(self) -> dict[str, dict[str, float]]: ...
    def query_stats(self, limit: int) -> list[Any]: ...
    def config_items(self) -> list[tuple[str, str, str, bool]]: ...
    def cache_stats(self) -> dict[str, Any] | None: ...
    def admission_lanes(self) -> list[tuple[str, Any]] | None: ...
    def steering_rows(self) -> list[tuple[Any, ...]] | None: ...
    def rewrite_rows(self) -> list[tuple[Any, ...]] | None: ...
    @property
    def optimiser(self) -> Any: ...
    def set_setting(self, key: str, value: str) -> str | None: ...
    def reload(self) -> str | None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def request_shutdown(self) -> None: ...


def _statements(sql: str) -> list[str]:
    """Split on semicolons outside '...' and "..." (admin commands are not all valid SQL, so
    libpg_query's splitter, which drops what it cannot scan, does not fit)."""
    out, start, quote = [], 0, ""
    for i, ch in enumerate(sql):
        if quote:
            if ch == quote:
                quote = ""  # a doubled quote closes and reopens: same effect
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            out.append(sql[start:i])
            start = i + 1
    out.append(sql[start:])
    return [s.strip() for s in out if s.strip()]


class AdminConsole:
    def __init__(self, context: AdminContext) -> None:
        self.context = context

    async def run(self, sql: str) -> bytes:
        """Answer one simple Query message: every statement's result, then ReadyForQuery."""
        out = []
        statements = _statements(sql)
        if not statements:
            out.append(b"I\x00\x00\x00\x04")  # EmptyQueryResponse
        for stmt in statements:
            reply = self.execute(stmt)
            if inspect.isawaitable(reply):
                try:
                    reply = await reply
                except Exception as exc:  # the metadata database is down, say
                    reply = error("58000", f"admin command failed: {exc}")
            out.append(reply)
            if reply[:1] == b"E":
                break
        out.append(ReadyForQuery("I").encode())
        return b"".join(out)

    def execute(self, stmt: str) -> bytes | Awaitable[bytes]:
        text = " ".join(stmt.split())
        m = _SHOW.match(text)
        if m:
            fn = commands.SHOW.get(m.group(1).lower())
            if fn is None:
                return error(
                    "42601", f'unknown SHOW subject "{m.group(1)}"', f"valid commands: {VALID}"
                )
            return fn(self.context, {"limit": m.group(2)})
        m = _SET.match(text)
        if m:
            value = m.group(2).strip().strip("'\"")
            return commands.set_setting(self.context, {"key": m.group(1).lower(), "value": value})
        m = _ACTION.match(text)
        if m:
            action = commands.ACTIONS.get((m.group(1).lower(), m.group(2).lower()))
            if action is not None:
                return action(self.context, {"id": m.group(3)})  # type: ignore[no-any-return]
        fn = _BARE.get(text.lower())
        if fn is not None:
            return fn(self.context, {})
        return error("42601", f'unknown admin command "{text[:80]}"', f"valid commands: {VALID}")
