"""One client session in session mode: the client socket, its upstream socket, and the relay.

Both sides are asyncio Protocols, so bytes move from one transport to the other inside the
data_received callback: no task switch and no copy. The only decoding is what the frame scanners
report (the types the tracker needs); the chunk itself is forwarded exactly as received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .admin import AdminConsole
from .admin.results import admin_simple_only, admin_unavailable
from .admission import LONG, AdmissionController, Waiter
from .cache import Entry, MemoryBackend, Miss, ResultCache
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
    Protocol,
    ProtocolViolation,
    SessionTracker,
    SSLRequest,
    StartupMessage,
    StartupReader,
    Status,
    error_response,
)
from .protocol.batch import (
    Batch,
    bind_parameters,
    extended_request,
    parse_then_sync,
    read_batch,
    request_sql,
)
from .protocol.errors import (
    ADMIN_SHUTDOWN,
    CANNOT_CONNECT_NOW,
    CONNECTION_FAILURE,
    INVALID_AUTHORIZATION,
    PROTOCOL_VIOLATION,
    QUERY_CANCELED,
    TOO_MANY_CONNECTIONS,
)
from .protocol.frontend import Parse, Query
from .records import SessionInfo
from .rewriting import APPLY as REWRITE_APPLY
from .rewriting import Decision as RewriteDecision
from .rewriting import RewriteController
from .steering import DRY_RUN, HOLDOUT, PIN, SteeringController
from .telemetry.apps import app_class

if TYPE_CHECKING:
    from .pool import ParkedServer
    from .server import ProxyServer

monotonic = time.monotonic
TERMINATE = b"X\x00\x00\x00\x04"
IDLE_SESSION_TIMEOUT = "57P05"
#: the proxy's own time is measured on one chunk in 64 (keeps the hot path lean)
OVERHEAD_SAMPLE_MASK = 63


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
        self._tls_handshake = False  # 'S' sent, TLS not yet up: no plaintext may be written
        self._cancel_key: tuple[int, bytes] | None = None
        self.rx = 0  # bytes received from the client
        self.tx = 0  # bytes sent to the client
        self.is_admin = False
        self.admin_mode = False  # authenticated admin: the proxy answers its queries
        self.admin: AdminConsole | None = None
        self._admin_last: asyncio.Future[None] | None = None
        self.txn_started: float | None = None
        self._chunks = 0  # for sampling the proxy's own time per chunk
        #: result cache: startup parameters and SET commands shape how values are rendered
        self.startup_params: dict[str, str] = {}
        self.set_history: list[str] = []
        #: tables written in the open transaction (invalidated again when it ends)
        self.txn_writes: set[str] | None = set()
        #: admission control: the lane of the request in flight, a held slot, a queued request
        self.adm_lane: str | None = None
        self.adm_slot = False
        self.adm_waiter: Waiter | None = None
        self._adm_timer: asyncio.TimerHandle | None = None
        #: plan steering: the decision for the request in flight, the RESET owed after it, and
        #: whether the session changed planner switches itself (then it is never steered)
        self.steer: tuple[str, str, str] | None = None
        self.steer_reset: str | None = None
        self.steer_blocked = False
        #: rewrite decision for the request in flight: (text sent or None, rule, mode)
        self.rewrite: RewriteDecision | None = None
        #: per prepared statement name: its Parse's (text, declared types) and rewrite decision
        self.rw_statements: dict[str, tuple[tuple[str, tuple[int, ...]], RewriteDecision | None]]
        self.rw_statements = {}
        #: the startup packet, when the server connection may be kept for the next client with
        #: the same one (server_pool_size); None for the admin console and replication
        self.pool_key: bytes | None = None
        #: server-side bytes of an upstream handed back to the pool (traffic totals)
        self.parked_rx = 0
        self.parked_tx = 0

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        idle = self.server.settings.tcp_keepalive_idle
        sock = transport.get_extra_info("socket")
        if idle and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # a client that vanished without FIN or RST (half-open) is noticed and dropped
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 6))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        peer = transport.get_extra_info("peername")
        self.info.client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.clients.add(self)

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = monotonic()
        up = self.upstream
        if up is not None:
            self._chunks += 1
            sampled = not self._chunks & OVERHEAD_SAMPLE_MASK
            if sampled:
                t0 = perf_counter()
            server = self.server
            cache = server.cache
            if cache is None or not self._from_cache(data, now, up, cache):
                adm = server.admission
                if adm is None or not self._queued(data, adm):
                    self._forward(data, now, up)
            if sampled:
                self.server.metrics.proxy_overhead.observe((), perf_counter() - t0)
        elif self.admin_mode:
            self._admin_data(data)
        elif self.reader is not None:
            self._startup_data(data)
        else:
            self._early.append(data)

    def _relay(
        self, data: bytes, now: float, up: UpstreamConnection, wire: bytes | None = None
    ) -> None:
        """Track the client's frames and forward the chunk as received (or `wire` instead: the
        same request with another text; the tracker still sees what the client sent)."""
        pool_it = self.pool_key is not None and data == TERMINATE and self.scanner.at_boundary
        if pool_it and self._park(up):  # the server connection waits for the next client
            self.rx += len(data)
            self._close()
            return
        try:
            frames = self.scanner.receive_data(data)
            if frames:
                tracker = self.tracker
                tracker.client_frames(frames, now)
                if tracker.finished:
                    self.emit(tracker.take_finished())
        except ProtocolViolation as exc:
            self.protocol_error(exc)
            return
        self.rx += len(data)
        if wire is not None:
            data = wire
        up.tx += len(data)
        up.transport.write(data)

    def _idle_sql(self, data: bytes) -> str | None:
        """The first statement's text of `data` when the session is idle outside a transaction
        and `data` is one whole request: one the proxy may hold, steer or answer itself."""
        tracker = self.tracker
        if (
            tracker.transaction_status != "I"
            or tracker.phase is not Phase.IDLE
            or tracker.pending
            or not self.scanner.at_boundary
            or data[0] not in (0x51, 0x50, 0x42)  # Q, P, B
        ):
            return None
        return request_sql(data, tracker.statements)

    def _forward(self, data: bytes, now: float, up: UpstreamConnection) -> None:
        server = self.server
        rewriter = server.rewriter
        self.rewrite = None
        if rewriter is not None and data[0] == 0x51:  # a simple Query
            sql = self._idle_sql(data)
            decision = rewriter.decide(sql, self.info.database) if sql is not None else None
            if decision is not None:
                self.rewrite = decision
                if decision[0] is not None:  # sent rewritten (the client's text is logged)
                    self._relay(data, now, up, Query(decision[0]).encode())
                    return
        elif (
            rewriter is not None
            and data[0] in (0x50, 0x42)  # Parse or Bind
            and self._rewrite_extended(data, now, up, rewriter)
        ):
            return
        steering = server.steering
        if steering is None:
            self._relay(data, now, up)
        else:
            self._steered(data, now, up, steering)

    def _rewrite_extended(
        self, data: bytes, now: float, up: UpstreamConnection, rewriter: RewriteController
    ) -> bool:
        """An extended-protocol request: its Parse sent with a proven rewrite in its place
        (True: relayed here), and its Bind's values lent to a text being proven. Outside
        transaction blocks only, as for a simple Query."""
        if self.tracker.transaction_status != "I" or not self.scanner.at_boundary:
            return False
        req = extended_request(data)
        if req is None:
            return False
        parse = req.parse
        decision = None
        if parse is not None:
            key = (parse.sql, parse.param_types)
            decision = rewriter.decide(parse.sql, self.info.database, parse.param_types)
            self.rw_statements[parse.name] = (key, decision)
        if req.bind_statement is not None:
            entry = self.rw_statements.get(req.bind_statement)
            if entry is not None:
                if entry[1] is not None:
                    self.rewrite = entry[1]  # this execution is observed for the A/B
                elif rewriter.wants(entry[0]):
                    bind = req.bind(data)  # its values, decoded only while they are wanted
                    if bind is not None:
                        rewriter.offer(entry[0], bind)
        if parse is None or decision is None or decision[0] is None:
            return False
        start, end = req.parse_span
        sent = Parse(parse.name, decision[0], parse.param_types).encode()
        self._relay(data, now, up, data[:start] + sent + data[end:])
        return True

    # ------------------------------------------------------------------ plan steering

    def _steered(
        self, data: bytes, now: float, up: UpstreamConnection, ctl: SteeringController
    ) -> None:
        """Relay `data`, first setting the planner switches of the arm chosen for it."""
        self.steer = None
        sql = None if self.steer_blocked else self._idle_sql(data)
        if sql is not None:
            # a prepared statement (Bind without Parse) keeps plans across settings: one
            # without parameters always reuses its first plan, so steering cannot reach it
            # (nor learn from it); one with parameters is made to plan afresh each time
            prepared = data[0] == 0x42
            nparams = bind_parameters(data) if prepared else None
            if prepared and not nparams:
                self.steer = ("", "", "skip")
                sql = None
            decision = ctl.decide(sql, self.info.database) if sql is not None else None
            if decision is not None and ctl.awaiting and decision[0] in ctl.awaiting:
                req = extended_request(data)  # a template with $n: its plans need values
                bind = req.bind(data) if req is not None else None
                if req is not None and bind is not None:
                    declared = req.parse.param_types if req.parse is not None else ()
                    ctl.lend_values(decision[0], declared, (bind.param_formats, bind.params))
            if decision is not None:
                self.steer = decision
                arm, mode = decision[1], decision[2]
                # (the stock plan needs nothing: steered runs force custom plans, so no plan
                # made under an arm's settings is ever cached for the stock runs to reuse)
                if mode not in (HOLDOUT, DRY_RUN) and arm != "stock":
                    from models.steering import reset_sql, set_sql

                    up.inject(Query(set_sql(arm, prepared)).encode(), "set")
                    self.steer_reset = reset_sql(arm, prepared)
                    assert self.transport is not None
                    self.transport.pause_reading()  # nothing may run before the RESET
        self._relay(data, now, up)

    def steering_done(self) -> None:
        """The steered request finished: restore the switches (its reply is swallowed)."""
        reset, self.steer_reset = self.steer_reset, None
        up = self.upstream
        if reset is not None and up is not None and not up.transport.is_closing():
            up.inject(Query(reset).encode(), "reset", reset)
            self.release()

    def note_sets(self, executions: list[Execution]) -> None:
        """SET/RESET/DISCARD the client ran: part of the cache key, and planner switches the
        client set itself are never overridden by steering."""
        for ex in executions:
            tag = ex.tag
            if tag is not None and tag.startswith(("SET", "RESET", "DISCARD")) and ex.sql:
                self.set_history.append(ex.sql)
                if "enable_" in ex.sql.lower():
                    self.steer_blocked = True

    # ------------------------------------------------------------------ admission control

    def _queued(self, data: bytes, adm: AdmissionController) -> bool:
        """Short lane: False (relay now). Long lane: take a slot (False), or hold the request
        until one frees (True; reading from the client pauses meanwhile)."""
        self.adm_lane = None
        sql = None if self.adm_slot else self._idle_sql(data)
        if sql is None:
            return False
        lane = self.adm_lane = adm.lane(sql)
        if lane != LONG:
            adm.short()
            return False
        granted = adm.acquire(self.info.app, lambda: self._admitted(data))
        if granted is True:
            self.adm_slot = True
            return False
        if granted is False:
            self._refuse(
                "53000",
                f"pgsage admission control: the queue for long statements is full "
                f"({adm.settings.admission_queue_size} waiting, limit {adm.limit} running)",
                sql,
            )
            return True
        assert self.transport is not None
        self.transport.pause_reading()
        self.adm_waiter = granted
        loop = asyncio.get_running_loop()
        self._adm_timer = loop.call_later(
            adm.settings.admission_queue_timeout, self._admission_timeout, sql
        )
        return True

    def _admitted(self, data: bytes) -> None:
        """A slot for the held request: send it on."""
        self.adm_waiter = None
        if self._adm_timer is not None:
            self._adm_timer.cancel()
            self._adm_timer = None
        up = self.upstream
        if self.closed or up is None or up.transport.is_closing():
            adm = self.server.admission
            if adm is not None:
                adm.release()
            return
        self.adm_slot = True
        self._forward(data, monotonic(), up)
        if self.steer_reset is None:
            self.release()  # (a steered request resumes reading after its RESET)

    def _admission_timeout(self, sql: str) -> None:
        adm = self.server.admission
        waiter = self.adm_waiter
        self._adm_timer = None
        if waiter is None or adm is None:
            return
        adm.cancel(waiter, timed_out=True)
        self.adm_waiter = None
        timeout = adm.settings.admission_queue_timeout
        self._refuse(
            QUERY_CANCELED,
            f"canceling statement: pgsage admission control found no slot for a long statement "
            f"within {timeout:g} s (limit {adm.limit} concurrent long statements, "
            f"{adm.running} running)",
            sql,
        )
        self.release()

    def _refuse(self, sqlstate: str, message: str, sql: str) -> None:
        """Answer a held request with an error, as the server would have (it never saw it)."""
        now = monotonic()
        self._write(error_response("ERROR", sqlstate, message) + b"Z\x00\x00\x00\x05I")
        ex = Execution(Protocol.SIMPLE, sql, now, now, status=Status.ERROR, sqlstate=sqlstate,
                       error_message=message, transaction_status="I")  # fmt: skip
        self.emit([ex])

    def admission_done(self) -> None:
        """The request holding a long-lane slot finished (or the session ended)."""
        adm = self.server.admission
        if self.adm_slot:
            self.adm_slot = False
            if adm is not None:
                adm.release()
        if self.adm_waiter is not None:
            if adm is not None:
                adm.cancel(self.adm_waiter, timed_out=False)
            self.adm_waiter = None
        if self._adm_timer is not None:
            self._adm_timer.cancel()
            self._adm_timer = None

    # ------------------------------------------------------------------ result cache

    def _from_cache(
        self, data: bytes, now: float, up: UpstreamConnection, cache: ResultCache
    ) -> bool:
        """Answer `data` from the cache (True), or arm the capture of a cacheable miss."""
        if up.capture is not None:
            up.capture = None  # another request while one is captured: its response is mixed
        tracker = self.tracker
        if (
            data[0] not in (0x51, 0x42, 0x50)  # Q, B, P
            or tracker.phase is not Phase.IDLE
            or tracker.transaction_status != "I"
            or tracker.pending
            or len(data) > 65536
            or not self.scanner.at_boundary
        ):
            return False
        batch = read_batch(data)
        if batch is None:
            return False
        sql = batch.sql if batch.kind != "bind" else tracker.statements.get(batch.statement)
        if sql is None:
            return False
        info = cache.info(sql)
        if not info.cacheable:
            return False
        key = self._cache_key(batch, sql, data)
        tables = info.bare_tables()
        backend = cache.backend
        if not isinstance(backend, MemoryBackend):
            assert self.transport is not None
            self.transport.pause_reading()
            self.server.spawn(self._from_shared_cache(data, batch, sql, key, tables, cache))
            return True
        entry = backend.get(key, now, cache.settings.cache_ttl)
        if entry is not None:
            self._serve_hit(data, batch, sql, entry, now, up, cache)
            return True
        cache.miss()
        up.capture = Miss(key, tables, backend.ticket(tables), now, [])
        return False

    async def _from_shared_cache(
        self,
        data: bytes,
        batch: Batch,
        sql: str,
        key: bytes,
        tables: tuple[str, ...],
        cache: ResultCache,
    ) -> None:
        """The Redis path: look up, then serve or forward; the client's reading is paused."""
        backend = cache.backend
        entry = ticket = None
        try:
            entry = await backend.get(key, monotonic(), cache.settings.cache_ttl)  # type: ignore[misc]
            if entry is None:
                ticket = await backend.ticket(tables)  # type: ignore[misc]
        except Exception as exc:  # Redis down: behave as if there were no cache
            self.server.log.warning("result cache unavailable", error=str(exc))
        up = self.upstream
        if self.closed or up is None or up.transport.is_closing():
            return
        now = monotonic()
        if entry is not None:
            self._serve_hit(data, batch, sql, entry, now, up, cache)
        else:
            cache.miss()
            if ticket is not None:
                up.capture = Miss(key, tables, ticket, now, [])
            self._relay(data, now, up)
        self.release()

    def _cache_key(self, batch: Batch, sql: str, data: bytes) -> bytes:
        info = self.info
        params = self.tracker.parameters
        ident = (
            info.database,
            info.user,
            sorted((k, v) for k, v in self.startup_params.items() if k != "application_name"),
            sorted((k, v) for k, v in params.items() if k != "application_name"),
            self.set_history,
        )
        head = repr(ident).encode("utf-8", "replace") + b"\x00"
        if batch.kind == "bind":
            return head + sql.encode("utf-8", "replace") + b"\x00" + data
        return head + data

    def _serve_hit(
        self,
        data: bytes,
        batch: Batch,
        sql: str,
        entry: Entry,
        now: float,
        up: UpstreamConnection,
        cache: ResultCache,
    ) -> None:
        cache.hit()
        if batch.kind == "parse":
            # the server must still end up with this unnamed statement, as if it had seen it
            up.inject(parse_then_sync(batch.parse), "parse")
            self.tracker.statements[""] = sql
        response = entry.response
        self.rx += len(data)
        self.tx += len(response)
        self._write(response)
        simple = batch.kind == "query"
        ex = Execution(
            Protocol.SIMPLE if simple else Protocol.EXTENDED,
            sql,
            now,
            monotonic(),
            statement=None if simple else batch.statement,
            portal=None if simple else "",
            tag=entry.tag,
            rows=entry.rows,
            bytes_sent=len(response),
            suspensions=0 if entry.tag is not None else 1,
            transaction_status="I",
            cache_hit=True,
        )
        self.emit([ex])

    def finish_miss(self, miss: Miss, now: float) -> None:
        """The response of a cacheable miss is complete: store it if it qualifies."""
        cache = self.server.cache
        if cache is None:
            return
        entry = cache.entry_from(miss, now)
        if entry is None:
            return
        backend = cache.backend
        if isinstance(backend, MemoryBackend):
            cache.stored(backend.put(miss.key, entry, miss.ticket))
        else:
            self.server.spawn(self._store_shared(miss, entry, cache))

    async def _store_shared(self, miss: Miss, entry: Entry, cache: ResultCache) -> None:
        try:
            ok = await cache.backend.put(  # type: ignore[misc,call-arg]
                miss.key, entry, miss.ticket, cache.settings.cache_ttl
            )
        except Exception as exc:
            self.server.log.warning("result cache store failed", error=str(exc))
            return
        cache.stored(bool(ok))

    def cache_writes(
        self, executions: list[Execution], status: str
    ) -> list[tuple[str, ...] | None]:
        """Tables the finished executions may have written (None: any); SETs are remembered."""
        cache = self.server.cache
        assert cache is not None
        out: list[tuple[str, ...] | None] = []
        for ex in executions:
            tag = ex.tag
            written = cache.writes_of(tag, ex.sql, ex.status is not Status.OK)
            if written is None or written:
                out.append(written)
                if status != "I":
                    if written is None:
                        self.txn_writes = None
                    elif self.txn_writes is not None:
                        self.txn_writes.update(written)
        return out

    def eof_received(self) -> bool:
        # the client half-closed; a message (or startup packet) it began will never be complete
        if self.upstream is not None:
            if not self.scanner.at_boundary:
                self.protocol_error(ProtocolViolation("incomplete message from client"))
            # (a client that half-closes with requests in flight is treated as gone: its
            # statements are cancelled upstream, as for one that vanished mid-query)
        elif self.reader is not None and self.reader.remaining:
            self.protocol_error(ProtocolViolation("incomplete startup packet"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self)
        if self.adm_slot or self.adm_waiter is not None:
            self.admission_done()
        up = self.upstream
        if up is not None and not up.transport.is_closing():
            tracker = self.tracker
            if tracker.in_flight and tracker.phase is not Phase.STARTUP:
                self.server.cancel_upstream(tracker)
                self._abandon_pending()
            elif self.scanner.at_boundary:
                up.transport.write(TERMINATE)
            # else: the client left mid-message; a Terminate would land inside that message
            up.transport.close()
        self._end_suspended()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.transport.is_closing():
            self.upstream.transport.resume_reading()

    @property
    def state(self) -> str:
        """For SHOW CLIENTS: startup, active (a request outstanding), idle or paused."""
        if not self.started:
            return "startup"
        if self.tracker.in_flight:
            return "active"
        return "paused" if self.server.paused else "idle"

    def hold(self) -> None:
        """PAUSE: read nothing more from this client (a COPY IN in progress is left to end)."""
        t = self.transport
        if t is not None and not t.is_closing() and self.tracker.phase is not Phase.COPY_IN:
            t.pause_reading()

    def release(self) -> None:
        t = self.transport
        up = self.upstream
        if t is not None and not t.is_closing() and (up is None or not up.write_paused):
            t.resume_reading()

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
                    if self.server.ssl_context is not None and not self.info.tls:
                        self.server.metrics.startup_request("ssl_accepted")
                        self._write(b"S")
                        # no plaintext byte may reach us between 'S' and the TLS layer
                        assert self.transport is not None
                        self.transport.pause_reading()
                        self._tls_handshake = True
                        self.server.spawn(self._start_tls())
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
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.server.metrics.connection_error("tls_error")
            self.server.log.info(
                "tls handshake failed", client=self.info.client_addr, error=str(exc)
            )
            tls_transport = None
        except Exception as exc:  # e.g. the transport was closed under the handshake
            self.server.metrics.connection_error("tls_error")
            self.server.log.warning(
                "tls handshake aborted", client=self.info.client_addr, error=repr(exc)
            )
            tls_transport = None
        finally:
            self._tls_handshake = False
        if tls_transport is None or tls_transport.is_closing():
            # closed under the handshake (the startup sweeper, a shutdown): asyncio then ends
            # start_tls without an error (returning None or a closed transport) and never calls
            # our connection_lost, so call it here
            self._close()
            self.connection_lost(None)
            return
        self.transport = tls_transport  # type: ignore[assignment]
        self.info.tls = True

    def _begin(self, startup: StartupMessage, raw: bytes, early: bytes) -> None:
        info = self.info
        info.user = startup.user
        info.database = startup.database
        info.application_name = startup.parameters.get("application_name")
        info.app = app_class(info.application_name)
        self.startup_params = startup.parameters
        self.steer_blocked = "enable_" in startup.parameters.get("options", "").lower()
        if early:
            self._early.append(early)
        if self.server.shutting_down:
            self.server.metrics.connection_error("shutting_down")
            self.fatal(CANNOT_CONNECT_NOW, "the database system is shutting down")
            return
        settings = self.server.settings
        if info.database == settings.admin_database:
            if info.user not in settings.admin_users:
                self.server.metrics.connection_error("auth_failed")
                self.fatal(
                    INVALID_AUTHORIZATION,
                    f'pgsage admin console: user "{info.user}" is not an admin user '
                    "(admin_users in the configuration)",
                )
                return
            self.is_admin = True
            # authenticate with the upstream's own methods, against a real database
            params = {**startup.parameters, "database": settings.admin_auth_database}
            raw = StartupMessage(startup.protocol, params).encode()
        elif self.server.pool is not None and not early and "replication" not in startup.parameters:
            self.pool_key = raw
        if not self.server.admit(self):
            self.server.metrics.connection_error("too_many_connections")
            self.fatal(TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            return
        self.server.metrics.client_opened(info.tls)
        # nothing more is read from the client until its bytes have somewhere to go: without
        # this, a client could pile up unbounded data in `_early` while the upstream connects
        assert self.transport is not None
        self.transport.pause_reading()
        self.server.spawn(self._connect_upstream(raw))

    async def _connect_upstream(self, startup_packet: bytes) -> None:
        server = self.server
        if server.pool is not None and self.pool_key is not None:
            parked = server.pool.take(self.pool_key)
            if parked is not None:
                await self._reuse(parked)
                return
        started = monotonic()
        try:
            transport, up = await asyncio.wait_for(
                server.upstream.connect(lambda: UpstreamConnection(self), server.upstream_tls),
                server.settings.connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            server.metrics.connection_error("upstream_unreachable")
            reason = str(exc) or type(exc).__name__
            self.fatal(
                CONNECTION_FAILURE,
                f"pgsage could not connect to the upstream server at {server.upstream}: {reason}",
            )
            return
        except Exception as exc:  # a bug of ours must not leave the client waiting for startup
            server.metrics.connection_error("upstream_unreachable")
            server.log.error("upstream connect failed", error=repr(exc))
            self.fatal(
                CONNECTION_FAILURE, f"pgsage could not connect to the upstream server: {exc}"
            )
            return
        server.metrics.server_connected(monotonic() - started)
        if server.paused and not self.is_admin:
            await server.resumed.wait()  # PAUSE holds new sessions too
        if self.closed:
            transport.close()  # nothing sent yet: a Terminate would be read as a startup packet
            return
        self.upstream = up
        transport.write(startup_packet)
        self._resume(up)

    async def _reuse(self, parked: ParkedServer) -> None:
        """Take a reset server connection from the pool: the client gets the server's welcome
        as recorded when that connection started, and the session goes on as if new."""
        server = self.server
        if server.paused:
            await server.resumed.wait()  # PAUSE holds new sessions too
        if self.closed or parked.transport.is_closing():
            parked.close()
            if not self.closed:
                self.fatal(CONNECTION_FAILURE, "pgsage lost the server connection it reused")
            return
        up = UpstreamConnection(self)
        up.opened_at = parked.connected_at
        parked.transport.set_protocol(up)
        up.connection_made(parked.transport)
        self.upstream = up
        self.server.metrics.server_connected(0.0)
        up.data_received(parked.welcome)  # as if the server said it now (and recorded again)
        self._resume(up)

    def _resume(self, up: UpstreamConnection) -> None:
        """The session has its upstream: replay what the client sent meanwhile, then read
        from the client again (unless the replay filled the upstream's buffer)."""
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)
        client = self.transport
        if client is not None and not client.is_closing() and not up.write_paused:
            client.resume_reading()

    def _park(self, up: UpstreamConnection) -> bool:
        """The client said goodbye with nothing outstanding: hand its server connection to the
        pool (reset there) instead of closing it. False when it cannot be kept."""
        pool = self.server.pool
        tracker = self.tracker
        welcome = up.welcome
        if (
            pool is None
            or self.pool_key is None
            or welcome is None
            or not self.started
            or self.server.shutting_down
            or tracker.phase is not Phase.IDLE
            or tracker.transaction_status != "I"
            or tracker.pending
            or tracker.copy_in
            or tracker.suspended
            or up.swallow
            or up.capture is not None
            or self.steer_reset is not None
            or not up.scanner.at_boundary
        ):
            return False
        owner = (self.info.user, self.info.database, tracker.backend_pid, up.opened_at)
        if not pool.park(self.pool_key, up.transport, bytes(welcome), owner):
            return False
        self.parked_rx, self.parked_tx = up.rx, up.tx
        self.upstream = None
        return True

    def after_server_startup_frames(self) -> None:
        """Called while the session is in STARTUP after the server's frames were tracked."""
        tracker = self.tracker
        if self._cancel_key is None and tracker.backend_pid is not None:
            assert tracker.backend_secret is not None
            self._cancel_key = (tracker.backend_pid, tracker.backend_secret)
            self.server.cancel_keys[self._cancel_key] = self
        if tracker.phase is not Phase.STARTUP and not self.started:
            self.started = True
            if self.is_admin:
                self._become_admin()
                return
            self.server.metrics.session_started(self.info)
        elif tracker.startup_error is not None and not self.started:
            code = tracker.startup_error[0] or ""
            if code.startswith("28"):
                self.server.metrics.connection_error("auth_failed")

    # ------------------------------------------------------------------ admin console

    def _become_admin(self) -> None:
        """The upstream accepted the admin's credentials: from now on the proxy answers."""
        up = self.upstream
        if up is not None:
            up.detached = True
            up.transport.write(TERMINATE)
            up.transport.close()
        self.upstream = None
        context = self.server.admin_context
        self.admin = AdminConsole(context) if context is not None else None
        self.admin_mode = True

    def _admin_data(self, data: bytes) -> None:
        self.last_activity = monotonic()
        try:
            frames = self.scanner.receive_data(data)
        except ProtocolViolation as exc:
            self.protocol_error(exc)
            return
        for t, payload in frames:
            if t == 0x51:  # Query
                sql = (payload or b"").split(b"\x00", 1)[0].decode("utf-8", "replace")
                if self.admin is None:
                    self._admin_reply(admin_unavailable())
                else:
                    self._admin_reply(self.admin.run(sql))
            elif t == 0x53:  # Sync: the extended protocol is not served here
                self._admin_reply(admin_simple_only())
            elif t == 0x58:  # Terminate
                self._admin_reply(None)
                return

    def _admin_reply(self, reply: bytes | Coroutine[Any, Any, bytes] | None) -> None:
        """Write replies in request order; some commands read the metadata database first."""
        previous = self._admin_last

        async def answer() -> None:
            if previous is not None:
                await asyncio.shield(previous)
            if reply is None:
                self._close()
            elif isinstance(reply, bytes):
                self._write(reply)
            else:
                self._write(await reply)

        task = asyncio.ensure_future(answer())
        self._admin_last = task
        self.server.spawn(_quiet(task))

    # ------------------------------------------------------------------ relay helpers

    def transaction_edge(self, before: str, after: str, now: float) -> None:
        """ReadyForQuery changed the transaction status: a block began or ended."""
        if before == "I":
            self.txn_started = now
            return
        if after != "I":
            return  # T -> E: the block failed; it ends with the ROLLBACK
        metrics = self.server.metrics
        outcome = "rollback" if before == "E" else "commit"
        metrics.transactions.labels(self.info.database or "", outcome).inc()
        if self.txn_started is not None:
            metrics.transaction_duration.observe(now - self.txn_started)
            self.txn_started = None

    def emit(self, executions: list[Execution]) -> None:
        server = self.server
        rewriter = server.rewriter
        if rewriter is not None and self.rewrite is not None:
            decision, self.rewrite = self.rewrite, None
            rule, mode = decision[1], decision[2]
            for ex in executions[:1]:
                ex.rewrite_rule = rule if mode == REWRITE_APPLY else f"{mode}:{rule}"
                if ex.status is Status.OK:
                    rewriter.observe(ex.sql, decision, (ex.end - ex.start) * 1000.0)
        steering = server.steering
        if steering is not None:
            decision = self.steer
            for ex in executions:
                if ex.cache_hit or ex.status is not Status.OK:
                    continue
                if decision is not None and decision[2] == "skip":
                    self.steer = decision = None
                    continue
                if decision is not None:
                    arm, mode = decision[1], decision[2]
                    ex.hint_set = mode if mode == HOLDOUT else (
                        f"{mode}:{arm}" if mode in (DRY_RUN, PIN) else arm
                    )  # fmt: skip
                    self.steer = None
                if decision is not None or self.tracker.transaction_status == "I":
                    steering.observe(ex.sql, decision, (ex.end - ex.start) * 1000.0)
                decision = None
        adm = server.admission
        if adm is not None:
            lane = self.adm_lane
            for ex in executions:
                if not ex.cache_hit and ex.status is Status.OK:
                    adm.observe(ex.sql, ex.end - ex.start, lane)
        sink = server.sink
        if sink is None:
            return
        # log_parameters as it is now, not when the batch is written
        sink(self.info, executions, server.settings.log_parameters)

    def _abandon_pending(
        self, sqlstate: str = QUERY_CANCELED, message: str = "client disconnected"
    ) -> None:
        """The session ends with requests outstanding: record what was running as ended.

        The client left (57014, cancelled: the proxy cancels it upstream) or the upstream
        connection was lost (an error). Each statement is recorded once: a simple Query whose
        statements all ended already (e.g. on the server's FATAL) gives no record.
        """
        done = self.tracker.abandon(monotonic(), sqlstate, message)
        if done:
            self.emit(done)
        self._end_suspended()

    def _end_suspended(self) -> None:
        """The session is over: portals still suspended ended at their last PortalSuspended."""
        done = self.tracker.end_suspended()
        if done:
            self.emit(done)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def can_inject(self) -> bool:
        """True if a message of ours can go to the client without splitting a server message
        (nor land as plaintext in the middle of a TLS handshake)."""
        up = self.upstream
        return not self._tls_handshake and (up is None or up.scanner.at_boundary)

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
        if self.closed or self.admin_mode:
            return
        if self.tracker.phase is not Phase.CLOSED:
            self._abandon_pending(CONNECTION_FAILURE, "upstream connection lost")
            self.fatal(
                CONNECTION_FAILURE,
                "server closed the connection unexpectedly (pgsage lost its upstream connection)",
            )
        else:
            self._close()


async def _quiet(task: asyncio.Future[None]) -> None:
    """Await a task for the server's bookkeeping; its failure is the session's, logged there."""
    with contextlib.suppress(Exception):
        await task


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
        #: our writes to the server are paused (its buffer is full): the client must not read
        self.write_paused = False
        #: closed on purpose (the admin console authenticated through it)
        self.detached = False
        self.rx = 0  # bytes received from the server
        self.tx = 0  # bytes sent to the server
        self._mark = 0  # rx when the last statement completed (bytes per statement)
        self._chunks = 0
        #: responses of requests the proxy sent itself, still to be dropped (ReadyForQuery count)
        self.swallow = 0
        self._sw_head = b""
        self._sw_rest = 0
        self._sw_type = 0
        #: what each injected request was, oldest first: (kind, sql to re-send if it fails)
        self._injected: deque[tuple[str, str | None]] = deque()
        self._sw_failed = False
        #: a cacheable request's response being collected
        self.capture: Miss | None = None
        #: the server's startup response as received (replayed to a client that reuses this
        #: connection); None when the connection may not be kept (see ClientConnection._park)
        self.welcome: bytearray | None = bytearray() if client.pool_key is not None else None
        #: when the server connection was opened (a reused one keeps its first client's time)
        self.opened_at = monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.swallow:
            data = self._swallowed(data)
            if not data:
                return
        n = len(data)
        self.rx += n
        self._chunks += 1
        sampled = not self._chunks & OVERHEAD_SAMPLE_MASK
        if sampled:
            t0 = perf_counter()
        cache = client.server.cache
        invalidate: list[tuple[str, ...] | None] | None = None
        try:
            frames = self.scanner.receive_data(data)
            if not frames and self.welcome is not None and client.tracker.phase is Phase.STARTUP:
                self.welcome += data  # a piece of the welcome without a whole message
            if frames:
                now = client.last_activity = monotonic()
                tracker = client.tracker
                in_startup = tracker.phase is Phase.STARTUP
                status = tracker.transaction_status
                executions = tracker.server_frames(frames, now)
                if in_startup:
                    if self.welcome is not None:
                        self._record_welcome(data, tracker)
                    client.after_server_startup_frames()
                    if self.detached:
                        client.tx += n
                        client._write(data)  # the server's welcome reaches the admin client
                        return
                if executions:
                    executions[0].bytes_sent = self.rx - self._mark
                    self._mark = self.rx
                    if cache is not None or client.server.steering is not None:
                        client.note_sets(executions)  # only the cache key and steering use it
                    if cache is not None:
                        invalidate = client.cache_writes(executions, tracker.transaction_status)
                    client.emit(executions)
                if tracker.transaction_status != status:
                    client.transaction_edge(status, tracker.transaction_status, now)
                    if cache is not None and tracker.transaction_status == "I":
                        ended = client.txn_writes
                        if ended is None or ended:
                            invalidate = invalidate or []
                            invalidate.append(None if ended is None else tuple(ended))
                        client.txn_writes = set()
            if client.tracker.phase is Phase.IDLE:
                if client.adm_slot:
                    client.admission_done()
                if client.steer_reset is not None:
                    client.steering_done()
            if cache is not None:
                miss = self.capture
                if miss is not None:
                    miss.parts.append(data)
                    miss.size += n
                    if miss.size > cache.settings.cache_max_entry_bytes:
                        self.capture = None
                    elif client.tracker.phase is Phase.IDLE:
                        self.capture = None
                        client.finish_miss(miss, monotonic())
                if invalidate and self._invalidate(cache, invalidate, data):
                    return  # the chunk goes to the client once the invalidation is written
        except ProtocolViolation as exc:
            client.server.log.error("upstream protocol violation", error=exc.message)
            self.transport.close()
            client.fatal(CONNECTION_FAILURE, f"upstream server broke the protocol: {exc.message}")
            return
        transport = client.transport
        if transport is not None:
            client.tx += n
            transport.write(data)
        if sampled:
            client.server.metrics.proxy_overhead.observe((), perf_counter() - t0)

    def _record_welcome(self, data: bytes, tracker: SessionTracker) -> None:
        """Keep the startup response; give up on it when the startup asked for credentials,
        failed, or the chunk that ended it carries more than the welcome."""
        assert self.welcome is not None
        self.welcome += data
        refused = tracker.auth_challenged or tracker.startup_error is not None
        ended = tracker.phase is not Phase.STARTUP
        if refused or (ended and (
            tracker.phase is not Phase.IDLE or tracker.pending or not self.scanner.at_boundary
            or not self.welcome.endswith(b"Z\x00\x00\x00\x05I")
        )):  # fmt: skip
            self.welcome = None

    def inject(self, message: bytes, kind: str, retry_sql: str | None = None) -> None:
        """Send a request of the proxy's own on the session's connection; its replies (through
        its ReadyForQuery) never reach the client. A failed one with `retry_sql` is re-sent
        (a RESET must not be lost to a cancel that arrived late)."""
        self.swallow += 1
        self._injected.append((kind, retry_sql))
        self.tx += len(message)
        self.transport.write(message)

    def _swallowed(self, data: bytes) -> bytes:
        """Drop the replies to requests the proxy injected (through `swallow` ReadyForQuerys).

        They are always a prefix of the stream: the proxy injects only while the session is idle.
        """
        pos = 0
        n = len(data)
        while self.swallow and pos < n:
            if self._sw_rest:
                take = min(self._sw_rest, n - pos)
                pos += take
                self._sw_rest -= take
                if not self._sw_rest and self._sw_type == 0x5A:
                    self._swallowed_one()
                continue
            need = 5 - len(self._sw_head)
            self._sw_head += data[pos : pos + need]
            pos += min(need, n - pos)
            if len(self._sw_head) < 5:
                break
            self._sw_type = self._sw_head[0]
            self._sw_rest = int.from_bytes(self._sw_head[1:5], "big") - 4
            self._sw_head = b""
            if self._sw_type == 0x45:  # ErrorResponse
                self._sw_failed = True
        return data[pos:]

    def _swallowed_one(self) -> None:
        self.swallow -= 1
        kind, retry = self._injected.popleft() if self._injected else ("", None)
        failed, self._sw_failed = self._sw_failed, False
        if failed:
            log = self.client.server.log
            log.warning("pgsage's own request on a client connection failed", kind=kind)
            if retry is not None and not self.transport.is_closing():
                self.inject(Query(retry).encode(), kind, retry)

    def _invalidate(
        self, cache: ResultCache, tables: list[tuple[str, ...] | None], data: bytes
    ) -> bool:
        """Drop cached results of written tables before the client learns the write finished.

        In memory that is immediate (False: forward now). With Redis, reading from the server
        pauses and the chunk is forwarded once Redis has the new generations (True)."""
        merged: tuple[str, ...] | None
        if any(t is None for t in tables):
            merged = None
        else:
            merged = tuple(sorted({name for t in tables if t for name in t}))
        backend = cache.backend
        if isinstance(backend, MemoryBackend):
            cache.invalidated("write", backend.invalidate(merged))
            return False
        self.transport.pause_reading()
        self.client.server.spawn(self._invalidate_then_forward(cache, merged, data))
        return True

    async def _invalidate_then_forward(
        self, cache: ResultCache, tables: tuple[str, ...] | None, data: bytes
    ) -> None:
        try:
            await cache.invalidate(tables, "write")
        except Exception as exc:
            # the write happened; serving what it changed would be wrong: stop using the cache
            self.client.server.log.error("result cache invalidation failed", error=str(exc))
            self.client.server.disable_cache(str(exc))
        client = self.client
        if client.transport is not None and not client.transport.is_closing():
            client.tx += len(data)
            client.transport.write(data)
        if not self.transport.is_closing() and not (
            client.transport is not None and client.transport.is_closing()
        ):
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        t = self.client.transport
        if t is not None and not t.is_closing() and not self.client.server.paused:
            t.resume_reading()
