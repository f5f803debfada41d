"""One client session in session mode: the client socket, its upstream socket, and the relay.

Both sides are asyncio Protocols, so bytes move from one transport to the other inside the
data_received callback: no task switch and no copy. The only decoding is what the frame scanners
report (the types the tracker needs); the chunk itself is forwarded exactly as received.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .protocol import (
    BACKEND_TYPE_BYTES,
    CLIENT_INTERESTING,
    FRONTEND_TYPE_BYTES,
    SERVER_INTERESTING,
    CancelRequest,
    DirectTLS,
    Execution,
    FrameScanner,
    GSSENCRequest,
    Phase,
    ProtocolViolation,
    SessionTracker,
    SSLRequest,
    StartupMessage,
    StartupReader,
    Status,
    error_response,
)
from .protocol.errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    PROTOCOL_VIOLATION,
    QUERY_CANCELED,
    TOO_MANY_CONNECTIONS,
)
from .records import SessionInfo, StatementRecord

if TYPE_CHECKING:
    from .server import ProxyServer

monotonic = time.monotonic
TERMINATE = b"X\x00\x00\x00\x04"
IDLE_SESSION_TIMEOUT = "57P05"


class ClientConnection(asyncio.Protocol):
    """The client side of a session; owns the session's state."""

    def __init__(self, server: ProxyServer, session_id: int) -> None:
        self.server = server
        settings = server.settings
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.reader: StartupReader | None = StartupReader(settings.max_startup_packet_size)
        self.scanner = FrameScanner(
            CLIENT_INTERESTING,
            FRONTEND_TYPE_BYTES,
            settings.max_message_size,
            "frontend",
            settings.max_read_size,
        )
        self.tracker = SessionTracker(splitter=server.splitter)
        self.info = SessionInfo(session_id, "")
        self.connected_at = self.last_activity = monotonic()
        self.started = False  # startup and authentication finished
        self.counted = False  # counts against max_client_connections
        self.closed = False
        self._early: list[bytes] = []  # client bytes that arrive while upstream connects
        self._cancel_key: tuple[int, bytes] | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.info.client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.clients.add(self)

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = monotonic()
        up = self.upstream
        if up is not None:
            try:
                frames = self.scanner.receive_data(data)
            except ProtocolViolation as exc:
                self.protocol_error(exc)
                return
            if frames:
                tracker = self.tracker
                tracker.client_frames(frames, now)
                if tracker.finished:
                    self.emit(tracker.take_finished())
            up.transport.write(data)
        elif self.reader is not None:
            self._startup_data(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self)
        up = self.upstream
        if up is not None and not up.transport.is_closing():
            tracker = self.tracker
            if tracker.in_flight and tracker.phase is not Phase.STARTUP:
                self.server.cancel_upstream(tracker)
                self._abandon_pending()
            else:
                up.transport.write(TERMINATE)
            up.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.transport.is_closing():
            self.upstream.transport.resume_reading()

    # ------------------------------------------------------------------ startup phase

    def _startup_data(self, data: bytes) -> None:
        reader = self.reader
        assert reader is not None
        try:
            packet = reader.receive_data(data)
            while packet is not None:
                if isinstance(packet, StartupMessage):
                    self.reader = None
                    self._begin(packet, reader.last_packet, reader.take_remaining())
                    return
                if isinstance(packet, SSLRequest):
                    if reader.remaining:
                        # bytes after SSLRequest before the handshake: refuse (CVE-2021-23222)
                        raise ProtocolViolation("received unencrypted data after SSL request")
                    self.server.metrics.startup_request("ssl")
                    if self.server.ssl_context is not None and not self.info.tls:
                        self._write(b"S")
                        asyncio.ensure_future(self._start_tls())
                        return
                    self.server.metrics.startup_request("ssl_refused")
                    self._write(b"N")
                elif isinstance(packet, GSSENCRequest):
                    self.server.metrics.startup_request("gssenc_refused")
                    self._write(b"N")
                elif isinstance(packet, CancelRequest):
                    self.server.metrics.startup_request("cancel")
                    self.server.forward_cancel(packet, reader.last_packet)
                    self._close()
                    return
                elif isinstance(packet, DirectTLS):
                    self.server.metrics.startup_request("direct_tls")
                    self._close()
                    return
                packet = reader.receive_data(b"")
        except ProtocolViolation as exc:
            self.protocol_error(exc)

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.server.ssl_context is not None
        try:
            tls_transport = await loop.start_tls(
                self.transport,
                self,
                self.server.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.server.settings.startup_timeout,
            )
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            self.server.metrics.connection_error("tls_error")
            self.server.log.info("tls handshake failed", client=self.info.client_addr, error=str(exc))
            self._close()
            return
        if tls_transport is None:
            self._close()
            return
        self.transport = tls_transport  # type: ignore[assignment]
        self.info.tls = True

    def _begin(self, startup: StartupMessage, raw: bytes, early: bytes) -> None:
        info = self.info
        info.user = startup.user
        info.database = startup.database
        info.application_name = startup.parameters.get("application_name")
        if early:
            self._early.append(early)
        if not self.server.admit(self):
            self.server.metrics.connection_error("too_many_connections")
            self.fatal(TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            return
        self.server.metrics.client_opened(info.tls)
        asyncio.ensure_future(self._connect_upstream(raw))

    async def _connect_upstream(self, startup_packet: bytes) -> None:
        server = self.server
        started = monotonic()
        try:
            transport, up = await asyncio.wait_for(
                server.upstream.connect(lambda: UpstreamConnection(self)),
                server.settings.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            server.metrics.connection_error("upstream_unreachable")
            reason = str(exc) or type(exc).__name__
            self.fatal(
                CONNECTION_FAILURE,
                f"pgsage could not connect to the upstream server at {server.upstream}: {reason}",
            )
            return
        server.metrics.server_connected(monotonic() - started)
        if self.closed:
            transport.write(TERMINATE)
            transport.close()
            return
        self.upstream = up
        transport.write(startup_packet)
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)

    def after_server_startup_frames(self) -> None:
        """Called while the session is in STARTUP after the server's frames were tracked."""
        tracker = self.tracker
        if self._cancel_key is None and tracker.backend_pid is not None:
            assert tracker.backend_secret is not None
            self._cancel_key = (tracker.backend_pid, tracker.backend_secret)
            self.server.cancel_keys[self._cancel_key] = self
        if tracker.phase is not Phase.STARTUP and not self.started:
            self.started = True
            self.server.metrics.session_started(self.info)
        elif tracker.startup_error is not None and not self.started:
            code = tracker.startup_error[0] or ""
            if code.startswith("28"):
                self.server.metrics.connection_error("auth_failed")

    # ------------------------------------------------------------------ relay helpers

    def emit(self, executions: list[Execution]) -> None:
        sink = self.server.sink
        if sink is None:
            return
        info = self.info
        for ex in executions:
            sink(StatementRecord(info, ex))

    def _abandon_pending(self) -> None:
        """The client left with requests outstanding: record them as cancelled."""
        now = monotonic()
        done = [item for item in self.tracker.pending if isinstance(item, Execution)]
        for ex in done:
            ex.end = now
            ex.status = Status.CANCELLED
            ex.sqlstate = QUERY_CANCELED
            ex.error_message = "client disconnected"
        self.tracker.pending.clear()
        if done:
            self.emit(done)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def can_inject(self) -> bool:
        """True if a message of ours can go to the client without splitting a server message."""
        up = self.upstream
        return up is None or up.scanner.at_boundary

    def fatal(self, sqlstate: str, message: str) -> None:
        """Send a FATAL ErrorResponse (if the stream allows it) and close the session."""
        if self.can_inject() and not self.tracker.fatal:
            self._write(error_response("FATAL", sqlstate, message))
        self._close()

    def protocol_error(self, exc: ProtocolViolation) -> None:
        self.server.metrics.connection_error("protocol_error")
        self.server.log.info(
            "client protocol violation", client=self.info.client_addr, error=exc.message
        )
        self.fatal(PROTOCOL_VIOLATION, exc.message)

    def terminate(self, sqlstate: str = ADMIN_SHUTDOWN, message: str | None = None) -> None:
        self.fatal(sqlstate, message or "terminating connection due to administrator command")

    def idle_timeout(self) -> None:
        self.fatal(IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout")

    def upstream_lost(self) -> None:
        if self.closed:
            return
        if self.tracker.phase is not Phase.CLOSED:
            self._abandon_pending()
            self.fatal(
                CONNECTION_FAILURE,
                "server closed the connection unexpectedly (pgsage lost its upstream connection)",
            )
        else:
            self._close()


class UpstreamConnection(asyncio.Protocol):
    """The server side of a session: relays to the client, feeding the tracker on the way."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        settings = client.server.settings
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scanner = FrameScanner(
            SERVER_INTERESTING,
            BACKEND_TYPE_BYTES,
            settings.max_message_size,
            "backend",
            settings.max_read_size,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        try:
            frames = self.scanner.receive_data(data)
        except ProtocolViolation as exc:
            client.server.log.error("upstream protocol violation", error=exc.message)
            self.transport.close()
            client.fatal(CONNECTION_FAILURE, f"upstream server broke the protocol: {exc.message}")
            return
        if frames:
            now = client.last_activity = monotonic()
            tracker = client.tracker
            in_startup = tracker.phase is Phase.STARTUP
            executions = tracker.server_frames(frames, now)
            if in_startup:
                client.after_server_startup_frames()
            if executions:
                client.emit(executions)
        transport = client.transport
        if transport is not None:
            transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.resume_reading()
