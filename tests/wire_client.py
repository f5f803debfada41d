"""A tiny blocking PostgreSQL protocol 3.0 client over a plain socket, for tests.

Drivers hide the message sequence; this client sends exactly the frontend messages a test builds
(from `proxy.protocol.frontend`) and hands back every backend message decoded, in order, so a test
can assert on the exact flow (PortalSuspended, Flush without Sync, extended-protocol COPY ...)
and compare the proxy's stream with the server's own.
Only trust authentication is supported (the test server's setting).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from proxy.protocol.backend import (
    Authentication,
    BackendKeyData,
    BackendMessage,
    ErrorResponse,
    ParameterStatus,
    ReadyForQuery,
    decode_backend,
)
from proxy.protocol.frontend import FrontendMessage, Query, Sync, Terminate
from proxy.protocol.startup import StartupMessage

_HDR = struct.Struct("!cI")


class WireError(Exception):
    """The server's answer was not what the client can go on with."""


class WireClient:
    """One connection: `send` messages, `recv` backend messages one at a time or up to a Z."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str = "postgres",
        database: str = "postgres",
        timeout: float = 10.0,
        **parameters: str,
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self.parameters: dict[str, str] = {}
        self.backend_key: BackendKeyData | None = None
        self.transaction_status = "I"
        self.startup_messages: list[BackendMessage] = []
        params = {"user": user, "database": database, **parameters}
        self.sock.sendall(StartupMessage(parameters=params).encode())
        for msg in self.until_ready():
            self.startup_messages.append(msg)
            if isinstance(msg, Authentication) and msg.code != 0:
                raise WireError(f"authentication code {msg.code} is not supported")
            if isinstance(msg, ErrorResponse):
                raise WireError(f"startup failed: {msg.sqlstate} {msg.message}")

    # ------------------------------------------------------------------ sending

    def send(self, *messages: FrontendMessage) -> None:
        """Send the messages in one write (so they travel pipelined, as drivers do)."""
        self.sock.sendall(b"".join(m.encode() for m in messages))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    # ------------------------------------------------------------------ receiving

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete message from the server in time")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk

    def recv_frame(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """The next message as (type byte, raw payload)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buf) < 5:
            self._fill(deadline)
        t, length = _HDR.unpack_from(self._buf)
        while len(self._buf) < 1 + length:
            self._fill(deadline)
        payload = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return t, payload

    def recv(self, timeout: float | None = None) -> BackendMessage:
        """The next backend message, decoded (ParameterStatus & co. are also remembered)."""
        t, payload = self.recv_frame(timeout)
        msg = decode_backend(t[0], payload)
        if isinstance(msg, ParameterStatus):
            self.parameters[msg.name] = msg.value
        elif isinstance(msg, BackendKeyData):
            self.backend_key = msg
        elif isinstance(msg, ReadyForQuery):
            self.transaction_status = msg.status
        return msg

    def recv_n(self, n: int, timeout: float | None = None) -> list[BackendMessage]:
        return [self.recv(timeout) for _ in range(n)]

    def until(self, kind: type, timeout: float | None = None) -> list[BackendMessage]:
        """Messages up to and including the first one of type `kind`."""
        out: list[BackendMessage] = []
        while True:
            msg = self.recv(timeout)
            out.append(msg)
            if isinstance(msg, kind):
                return out

    def until_ready(self, timeout: float | None = None) -> list[BackendMessage]:
        return self.until(ReadyForQuery, timeout)

    def nothing_pending(self, wait: float = 0.2) -> bool:
        """True if the server sends nothing within `wait` seconds."""
        if self._buf:
            return False
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk
        return False

    # ------------------------------------------------------------------ conveniences

    def query(self, sql: str) -> list[BackendMessage]:
        """Simple query: every message up to ReadyForQuery."""
        self.send(Query(sql))
        return self.until_ready()

    def exchange(self, *messages: FrontendMessage) -> list[BackendMessage]:
        """Send messages (the last is normally a Sync) and read up to ReadyForQuery."""
        self.send(*messages)
        return self.until_ready()

    def exchange_raw(self, *messages: FrontendMessage) -> bytes:
        """Send the messages in one write; the raw bytes of every reply up to ReadyForQuery."""
        self.send(*messages)
        out = bytearray()
        while True:
            t, payload = self.recv_frame()
            out += t + (len(payload) + 4).to_bytes(4, "big") + payload
            if t == b"Z":
                return bytes(out)

    def sync(self) -> list[BackendMessage]:
        return self.exchange(Sync())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(Terminate().encode())
        self.sock.close()

    def abort(self) -> None:
        """Drop the connection without Terminate (a client that vanishes)."""
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def kinds(messages: Iterable[BackendMessage]) -> list[str]:
    """Class names of the messages, for readable sequence assertions."""
    return [type(m).__name__ for m in messages]
