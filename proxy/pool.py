"""Server connections kept for the next client (session pooling, as PgBouncer does it).

A client that says goodbye (Terminate) while idle and outside a transaction leaves a perfectly
good backend behind. If the upstream let that session in without asking for a password, any
client with the very same startup packet would be let in the same way (the upstream sees
pgsage's address and the same user, database and options), so the backend is reset with
`DISCARD ALL` (temporary tables, prepared statements, LISTEN, advisory locks, session settings
back to their startup values) and parked. The next client with that startup packet gets it at
once: pgsage replays the server's recorded welcome (AuthenticationOk, ParameterStatus,
BackendKeyData, ReadyForQuery) instead of paying for a new backend process.

A session whose startup involved an authentication exchange is never parked; neither is one
that ended in a transaction, mid-request or after a protocol error.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from .log import get_logger
from .protocol import BACKEND_TYPE_BYTES, FrameScanner, ProtocolViolation
from .protocol.frontend import Query

if TYPE_CHECKING:
    from .settings import Settings
    from .telemetry.metrics import ProxyMetrics

TERMINATE = b"X\x00\x00\x00\x04"
#: (user, database, backend pid, monotonic time the server connection was opened)
Owner = tuple[str | None, str | None, int | None, float]
RESET = Query("DISCARD ALL").encode()
_Z, _E, _C = ord("Z"), ord("E"), ord("C")


class ParkedServer(asyncio.Protocol):
    """A server connection between two clients: resetting, then idle until taken."""

    def __init__(self, pool: ServerPool, key: bytes, transport: asyncio.Transport,
                 welcome: bytes, owner: Owner) -> None:  # fmt: skip
        self.pool = pool
        self.key = key
        self.transport = transport
        self.welcome = welcome
        #: who it serves (SHOW SERVERS): user, database, backend pid, when it was opened
        self.user, self.database, self.backend_pid, self.connected_at = owner
        self.ready = False
        self.since = time.monotonic()
        self._ok = False
        self._scanner = FrameScanner(frozenset((_Z, _E, _C)), BACKEND_TYPE_BYTES,
                                     direction="backend")  # fmt: skip

    def start(self) -> None:
        self.transport.set_protocol(self)
        self.transport.write(RESET)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._scanner.receive_data(data)
        except ProtocolViolation:
            self.close()
            return
        for t, payload in frames:
            if t == _C and payload == b"DISCARD ALL\x00":
                self._ok = True
            elif t == _E:
                self._ok = False
                if self.ready:  # a FATAL out of the blue (terminated by an administrator)
                    self.close()
                    return
            elif t == _Z and not self.ready:
                if self._ok and payload == b"I":
                    self.ready = True
                    self.since = time.monotonic()
                    self.pool._ready(self)
                else:
                    self.close()
                    return

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._gone(self)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(TERMINATE)
            self.transport.close()
        self.pool._gone(self)


class ServerPool:
    def __init__(self, settings: Settings, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = get_logger("pgsage.pool")
        #: startup packet -> idle servers, most recently parked last
        self.idle: OrderedDict[bytes, deque[ParkedServer]] = OrderedDict()
        self.resetting: set[ParkedServer] = set()

    def park(self, key: bytes, transport: asyncio.Transport, welcome: bytes, owner: Owner
             ) -> bool:  # fmt: skip
        """Take over a server connection whose client is gone; False when the pool is full."""
        if self.count >= self.settings.server_pool_size or transport.is_closing():
            return False
        server = ParkedServer(self, key, transport, welcome, owner)
        self.resetting.add(server)
        server.start()
        self.metrics.server_pool_events.labels("parked").inc()
        return True

    def take(self, key: bytes) -> ParkedServer | None:
        """An idle, reset server for this startup packet, or None."""
        servers = self.idle.get(key)
        while servers:
            server = servers.pop()
            if not servers:
                del self.idle[key]
            if server.transport.is_closing():
                continue
            self.metrics.server_pool_events.labels("reused").inc()
            self.metrics.server_connections_idle.set(self._idle_count())
            return server
        return None

    def sweep(self, now: float) -> None:
        """Close servers idle longer than server_idle_timeout (and any over a smaller size)."""
        limit = self.settings.server_idle_timeout
        over = max(0, self.count - self.settings.server_pool_size)
        for servers in list(self.idle.values()):
            for server in list(servers):
                if over > 0 or now - server.since > limit:
                    over -= 1
                    server.close()  # -> _gone

    def servers(self) -> list[ParkedServer]:
        """Every kept server connection, resetting or idle."""
        return [*self.resetting, *(s for q in self.idle.values() for s in q)]

    def close_all(self) -> None:
        for server in [*self.resetting, *(s for q in self.idle.values() for s in q)]:
            server.close()

    # ------------------------------------------------------------------ ParkedServer's calls

    def _ready(self, server: ParkedServer) -> None:
        self.resetting.discard(server)
        self.idle.setdefault(server.key, deque()).append(server)
        self.metrics.server_connections_idle.set(self._idle_count())

    def _gone(self, server: ParkedServer) -> None:
        if server in self.resetting:
            self.resetting.discard(server)
            self.metrics.server_pool_events.labels("closed").inc()
            return
        servers = self.idle.get(server.key)
        if servers is not None and server in servers:
            servers.remove(server)
            if not servers:
                del self.idle[server.key]
            self.metrics.server_pool_events.labels("closed").inc()
            self.metrics.server_connections_idle.set(self._idle_count())

    @property
    def count(self) -> int:
        """Server connections kept: resetting and idle."""
        return len(self.resetting) + self._idle_count()

    def _idle_count(self) -> int:
        return sum(len(q) for q in self.idle.values())
