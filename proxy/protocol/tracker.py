"""Session state tracker: follows both directions of one session and yields finished executions.

Pure and clock-free: every call takes `now` (seconds, any monotonic origin). The proxy feeds it the
frames its scanners report (only the types in CLIENT_INTERESTING / SERVER_INTERESTING) and gets
back an `Execution` per statement that finished, to time and log.

How responses are matched to requests (protocol 3.0, "Message Flow"):

* Simple Query: one `_Query` item; each CommandComplete / EmptyQueryResponse / ErrorResponse ends
  one statement of its text, ReadyForQuery ends the item. An error ends the whole string.
* Extended query: only Execute and Sync are queued (ParseComplete & co. need no matching).
  CommandComplete, EmptyQueryResponse and PortalSuspended end the head Execute. An ErrorResponse
  fails the first Execute before the next Sync (whichever message failed, that Execute did not
  run to completion) and the server skips the rest until Sync, so ReadyForQuery drops every
  Execute before its Sync.
* FunctionCall is answered with ReadyForQuery like a Sync.
* In copy-in mode the server ignores Sync and Flush (protocol docs, "COPY Operations"): libpq
  sends Execute, Sync before it knows the statement is a COPY, and Sync again after CopyDone.
  So a CopyInResponse drops the Syncs queued right after the COPY, and Syncs are not queued
  until the client's CopyDone / CopyFail.
* An execution starts at the first Parse/Bind of its group. A Flush also closes the group: the
  client waits for the answers so far (e.g. Parse, Describe, Flush), so that wait is not timed.
* A portal run with max_rows > 0 that is suspended stays open; its legs make one execution,
  finished by its CommandComplete, by Close of the portal, by rebinding the portal, or by the end
  of the transaction (ReadyForQuery 'I'); in the last three cases it ends at its last
  PortalSuspended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from .errors import QUERY_CANCELED, ProtocolViolation

# Type bytes as ints: what each direction's scanner must hand over.
CLIENT_INTERESTING = frozenset(b"QPBECSHXFcf")
SERVER_INTERESTING = frozenset(b"CIsEZKSRGHW1")

_ROW_TAGS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE", "COPY"))

Splitter = Callable[[str], list[str]]


class Protocol(StrEnum):
    SIMPLE = "simple"
    EXTENDED = "extended"


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


class Phase(Enum):
    """Where the session is, as far as the proxy needs to know."""

    #: Startup and authentication: relay until the first ReadyForQuery.
    STARTUP = "startup"
    #: Ready for a new request (no request outstanding).
    IDLE = "idle"
    #: At least one request awaits its response.
    BUSY = "busy"
    #: The server asked for COPY data (CopyInResponse); the client streams CopyData.
    COPY_IN = "copy_in"
    #: The server streams CopyData (CopyOutResponse).
    COPY_OUT = "copy_out"
    #: Terminate received, or the connection is gone.
    CLOSED = "closed"


_EXECUTION_FIELDS = (
    "protocol", "sql", "start", "end", "statement", "portal", "tag", "rows", "status",
    "sqlstate", "error_message", "suspensions", "max_rows", "bytes_sent",
    "transaction_status", "cache_hit", "hint_set", "rewrite_rule",
)  # fmt: skip


class Execution:
    """One statement execution as seen on the wire.

    A plain class, not a dataclass: compiled by mypyc, a dataclass keeps the `__init__` the
    dataclasses module writes at run time, interpreted (1.3 µs a record against 0.2 native)."""

    __slots__ = _EXECUTION_FIELDS

    def __init__(
        self,
        protocol: Protocol,
        sql: str | None,
        start: float,
        end: float = 0.0,
        statement: str | None = None,
        portal: str | None = None,
        tag: str | None = None,
        rows: int | None = None,
        status: Status = Status.OK,
        sqlstate: str | None = None,
        error_message: str | None = None,
        suspensions: int = 0,
        max_rows: int = 0,
        bytes_sent: int | None = None,
        transaction_status: str | None = None,
        cache_hit: bool = False,
        hint_set: str | None = None,
        rewrite_rule: str | None = None,
    ) -> None:
        self.protocol = protocol
        self.sql = sql
        self.start = start
        self.end = end
        self.statement = statement
        self.portal = portal
        self.tag = tag
        self.rows = rows
        self.status = status
        self.sqlstate = sqlstate
        self.error_message = error_message
        self.suspensions = suspensions
        self.max_rows = max_rows
        #: bytes the server sent for this statement (filled by the relay)
        self.bytes_sent = bytes_sent
        #: transaction status after the statement's batch ('I', 'T', 'E'), when known
        self.transaction_status = transaction_status
        #: answered by the proxy's result cache (the server never saw it)
        self.cache_hit = cache_hit
        #: the planner hint set it ran with (plan steering), "holdout", or "dry_run:<arm>"
        self.hint_set = hint_set
        #: the rewrite rule it was sent with, "holdout:<rule>" or "dry_run:<rule>"
        self.rewrite_rule = rewrite_rule

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _EXECUTION_FIELDS)
        return f"Execution({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Execution):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in _EXECUTION_FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value (as a dataclass)


class _Query:
    __slots__ = ("index", "sql", "start", "statements")

    def __init__(self, sql: str | None, start: float) -> None:
        self.sql = sql
        self.start = start
        self.statements: list[str] | None = None
        self.index = 0


class _Sync:
    __slots__ = ()


class _Parse:
    """A Parse awaiting its ParseComplete: if it fails instead, that failure is a record."""

    __slots__ = ("name", "sql", "start")

    def __init__(self, name: str, sql: str | None, start: float) -> None:
        self.name = name
        self.sql = sql
        self.start = start


_SYNC = _Sync()


def rows_from_tag(tag: str) -> int | None:
    """Row count of a CommandComplete tag ("SELECT 5", "INSERT 0 3"), None for tags without one."""
    head, _, tail = tag.partition(" ")
    if head not in _ROW_TAGS or not tail:
        return None
    last = tail.rpartition(" ")[2]
    # isdigit() alone accepts digits such as "²" that int() rejects
    return int(last) if last.isascii() and last.isdigit() else None


#: CommandComplete payloads seen -> (tag, rows): a session sends the same few tags over and over
_TAGS: dict[bytes, tuple[str, int | None]] = {}
_TAGS_MAX = 4096
_TAG_KEY_MAX = 64


def _command_tag(payload: bytes) -> tuple[str, int | None]:
    """A CommandComplete payload's tag and row count, from a bounded cache of payloads seen."""
    hit = _TAGS.get(payload)
    if hit is not None:
        return hit
    tag = _cstr(payload)[0]
    hit = (tag, rows_from_tag(tag))
    if len(payload) <= _TAG_KEY_MAX:
        if len(_TAGS) >= _TAGS_MAX:
            _TAGS.clear()
        _TAGS[payload] = hit
    return hit


def bind_names(payload: bytes) -> tuple[str, str]:
    """Portal and statement name of a Bind payload, without decoding its parameters (hot path:
    here, compiled with the tracker; the empty names drivers use most are not decoded)."""
    first = payload.find(b"\x00")
    second = payload.find(b"\x00", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolViolation("invalid Bind message: names without terminator")
    portal = payload[:first].decode("utf-8", "surrogateescape") if first else ""
    statement = (
        payload[first + 1 : second].decode("utf-8", "surrogateescape") if second > first + 1 else ""
    )
    return portal, statement


def _cstr(payload: bytes, start: int = 0) -> tuple[str, int]:
    end = payload.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation("invalid message: string without terminator")
    return payload[start:end].decode("utf-8", "replace"), end + 1


def _error_fields(payload: bytes | None) -> tuple[str | None, str | None, str | None]:
    """SQLSTATE, message and severity of an ErrorResponse payload."""
    code = message = severity = None
    if payload is None:
        return None, None, None
    pos = 0
    n = len(payload)
    while pos < n and payload[pos] != 0:
        key = payload[pos]
        end = payload.find(b"\x00", pos + 1)
        if end < 0:
            break
        if key == 0x43:  # C
            code = payload[pos + 1 : end].decode("ascii", "replace")
        elif key == 0x4D:  # M
            message = payload[pos + 1 : end].decode("utf-8", "replace")
        elif key == 0x56:  # V
            severity = payload[pos + 1 : end].decode("ascii", "replace")
        pos = end + 1
    return code, message, severity


@dataclass(slots=True)
class SessionTracker:
    """Per-session protocol state: prepared statements, portals, outstanding requests."""

    splitter: Splitter | None = None
    max_statements: int = 10_000
    phase: Phase = Phase.STARTUP
    transaction_status: str = "I"
    backend_pid: int | None = None
    backend_secret: bytes | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    statements: dict[str, str] = field(default_factory=dict)
    portals: dict[str, str | None] = field(default_factory=dict)
    #: the text each portal was bound from (a portal outlives a re-Parse or Close of its statement)
    portal_sql: dict[str, str | None] = field(default_factory=dict)
    #: the last extended Execution completed since the last ReadyForQuery (see _on_error)
    group_last: Execution | None = None
    suspended: dict[str, Execution] = field(default_factory=dict)
    pending: deque[Execution | _Query | _Sync | _Parse] = field(default_factory=deque)
    #: last fatal error seen during startup (authentication failure and the like)
    startup_error: tuple[str | None, str | None] | None = None
    #: the server asked for credentials during startup (any Authentication request but Ok)
    auth_challenged: bool = False
    #: the server sent an ErrorResponse of severity FATAL or PANIC (it closes next)
    fatal: bool = False
    #: the server is in copy-in mode and the client has not sent CopyDone / CopyFail yet
    copy_in: bool = False
    #: Parse messages seen, by kind (pgsage_prepared_statements_parsed_total)
    parses_named: int = 0
    parses_unnamed: int = 0
    #: the first frame of the extended-protocol statement being assembled (Parse/Bind)
    group_start: float | None = None
    #: executions finished but not yet handed out
    finished: list[Execution] = field(default_factory=list)

    # ---------------------------------------------------------------- client to server

    def client_frames(self, frames: list[tuple[int, bytes | None]], now: float) -> None:
        for t, payload in frames:
            # the common types called directly (a native call, compiled), the rest by table
            if t == 0x51:  # Q
                self._on_query(payload, now)
            elif t == 0x42:  # B
                self._on_bind(payload, now)
            elif t == 0x45:  # E
                self._on_execute(payload, now)
            elif t == 0x53:  # S
                self._on_sync(payload, now)
            elif t == 0x50:  # P
                self._on_parse(payload, now)
            else:
                handler = _CLIENT_HANDLERS.get(t)
                if handler is not None:
                    handler(self, payload, now)

    def _on_query(self, payload: bytes | None, now: float) -> None:
        sql = _cstr(payload)[0] if payload is not None else None
        self.pending.append(_Query(sql, now))
        self.phase = Phase.BUSY

    def _on_parse(self, payload: bytes | None, now: float) -> None:
        if self.group_start is None:
            self.group_start = now
        if payload is None:
            self.pending.append(_Parse("", None, now))
            return
        name, pos = _cstr(payload)
        sql, _ = _cstr(payload, pos)
        self.pending.append(_Parse(name, sql, now))
        if name:
            self.parses_named += 1
        else:
            self.parses_unnamed += 1
        if name and name not in self.statements and len(self.statements) >= self.max_statements:
            return  # bounded memory: the server still has it; we only lose its text
        self.statements[name] = sql

    def _on_bind(self, payload: bytes | None, now: float) -> None:
        if self.group_start is None:
            self.group_start = now
        if payload is None:
            # too large to read: which portal it binds is unknown, so no portal's text is
            # trustworthy any more (better no text than another statement's)
            self.portals.clear()
            self.portal_sql.clear()
            return
        portal, statement = bind_names(payload)
        old = self.suspended.pop(portal, None)
        if old is not None:
            self.finished.append(old)  # it ended at its last PortalSuspended
        # bounded memory for named portals; the unnamed one is always tracked
        if not portal or portal in self.portals or len(self.portals) < self.max_statements:
            self.portals[portal] = statement
            self.portal_sql[portal] = self.statements.get(statement)

    def _on_execute(self, payload: bytes | None, now: float) -> None:
        portal, max_rows = "", 0
        if payload is not None:
            if payload[:1] == b"\x00":  # the unnamed portal (what drivers use)
                pos = 1
            else:
                portal, pos = _cstr(payload)
            if pos + 4 <= len(payload):
                rows = (
                    (payload[pos] << 24)
                    | (payload[pos + 1] << 16)
                    | (payload[pos + 2] << 8)
                    | payload[pos + 3]
                )
                max_rows = rows - (1 << 32) if rows & 0x80000000 else rows
        start = self.group_start if self.group_start is not None else now
        self.group_start = None
        resumed = self.suspended.pop(portal, None)
        if resumed is not None:
            resumed.max_rows = max_rows
            self.pending.append(resumed)
        else:
            statement = self.portals.get(portal)
            sql = self.portal_sql.get(portal)
            self.pending.append(
                Execution(
                    Protocol.EXTENDED,
                    sql,
                    start,
                    statement=statement,
                    portal=portal,
                    max_rows=max_rows,
                )
            )
        self.phase = Phase.BUSY

    def _on_close(self, payload: bytes | None, now: float) -> None:
        if not payload:
            return
        kind = payload[0:1]
        name, _ = _cstr(payload, 1)
        if kind == b"S":
            self.statements.pop(name, None)
        elif kind == b"P":
            self.portals.pop(name, None)
            self.portal_sql.pop(name, None)
            old = self.suspended.pop(name, None)
            if old is not None:
                self.finished.append(old)  # it ended at its last PortalSuspended

    def _on_sync(self, payload: bytes | None, now: float) -> None:
        self.group_start = None
        if self.copy_in:
            return  # the server ignores Sync in copy-in mode
        self.pending.append(_SYNC)
        if self.phase is not Phase.STARTUP:
            self.phase = Phase.BUSY

    def _on_flush(self, payload: bytes | None, now: float) -> None:
        self.group_start = None

    def _on_copy_end(self, payload: bytes | None, now: float) -> None:
        self.copy_in = False

    def _on_terminate(self, payload: bytes | None, now: float) -> None:
        self.phase = Phase.CLOSED

    # ---------------------------------------------------------------- server to client

    def server_frames(self, frames: list[tuple[int, bytes | None]], now: float) -> list[Execution]:
        """Advance on the server's frames; return the executions they finished."""
        for t, payload in frames:
            if t == 0x43:  # C
                self._on_complete(payload, now)
            elif t == 0x5A:  # Z
                self._on_ready(payload, now)
            elif t == 0x31:  # 1
                self._on_parse_complete(payload, now)
            else:
                handler = _SERVER_HANDLERS.get(t)
                if handler is not None:
                    handler(self, payload, now)
        if not self.finished:
            return _NO_EXECUTIONS
        out, self.finished = self.finished, []
        return out

    def take_finished(self) -> list[Execution]:
        """Executions finished by client frames (Close or rebinding of a suspended portal)."""
        if not self.finished:
            return _NO_EXECUTIONS
        out, self.finished = self.finished, []
        return out

    def _on_complete(self, payload: bytes | None, now: float) -> None:
        if payload is None:
            self._end_statement(now, None, None, None)
        else:
            tag, rows = _command_tag(payload)
            self._end_statement(now, tag, rows, None)

    def _on_empty(self, payload: bytes | None, now: float) -> None:
        self._end_statement(now, None, None, None)

    def _end_statement(
        self,
        now: float,
        tag: str | None,
        rows: int | None,
        error: tuple[str | None, str | None] | None,
    ) -> None:
        if self.phase in (Phase.COPY_IN, Phase.COPY_OUT):
            self.phase = Phase.BUSY
            self.copy_in = False
        self._drop_parsed()
        if not self.pending:
            return
        head = self.pending[0]
        if isinstance(head, _Query):
            self.finished.append(self._simple_statement(head, now, tag, rows, error))
            return
        if isinstance(head, Execution):
            self.pending.popleft()
            ex = head
            ex.end = now
            ex.tag = tag
            if rows is not None:
                ex.rows = (ex.rows or 0) + rows
            if error is not None:
                self._fail(ex, error)
            self.finished.append(ex)
            self.group_last = ex

    def _simple_statement(
        self,
        q: _Query,
        now: float,
        tag: str | None,
        rows: int | None,
        error: tuple[str | None, str | None] | None,
    ) -> Execution:
        if q.statements is None:
            q.statements = self._split(q.sql)
        sql = q.statements[q.index] if q.index < len(q.statements) else q.sql
        ex = Execution(Protocol.SIMPLE, sql, q.start, now, tag=tag, rows=rows)
        if error is not None:
            self._fail(ex, error)
        q.index += 1
        q.start = now
        return ex

    def _split(self, sql: str | None) -> list[str]:
        if sql is None:
            return []
        if self.splitter is None or ";" not in sql.rstrip().rstrip(";"):
            return [sql]  # one statement (a trailing semicolon is common): no need to lex
        try:
            parts = self.splitter(sql)
        except Exception:  # unsplittable text is still one statement to log
            return [sql]
        return parts or [sql]

    @staticmethod
    def _fail(ex: Execution, error: tuple[str | None, str | None]) -> None:
        ex.sqlstate, ex.error_message = error
        ex.status = Status.CANCELLED if ex.sqlstate == QUERY_CANCELED else Status.ERROR

    def _on_error(self, payload: bytes | None, now: float) -> None:
        code, message, severity = _error_fields(payload)
        if severity in ("FATAL", "PANIC"):
            self.fatal = True
        if self.phase is Phase.STARTUP:
            self.startup_error = (code, message)
            return
        if self.phase in (Phase.COPY_IN, Phase.COPY_OUT):
            self.phase = Phase.BUSY
            self.copy_in = False  # an error ends copy-in mode
        if not self.pending:
            return
        head = self.pending[0]
        if isinstance(head, _Query):
            self.finished.append(self._simple_statement(head, now, None, None, (code, message)))
            head.index = len(head.statements or ())
            return
        # extended: a failed Parse is its own record, and the server skips the rest until Sync
        if isinstance(head, _Parse):
            ex = Execution(Protocol.EXTENDED, head.sql, head.start, now, statement=head.name)
            self._fail(ex, (code, message))
            self.finished.append(ex)
            while self.pending and not isinstance(self.pending[0], _Sync):
                self.pending.popleft()
            return
        # otherwise the first Execute before the next Sync failed (whichever message did)
        for i, item in enumerate(self.pending):
            if isinstance(item, _Sync):
                last = self.group_last
                if last is not None and self.transaction_status == "I":
                    # no Execute left before the Sync: the implicit transaction's COMMIT at
                    # Sync failed (deferred constraint, serialization failure ...), undoing the
                    # statements of the group; record it as a failure of the last one
                    ex = Execution(
                        Protocol.EXTENDED,
                        last.sql,
                        last.end,
                        now,
                        statement=last.statement,
                        portal=last.portal,
                        tag="COMMIT",
                    )
                    self._fail(ex, (code, message))
                    self.finished.append(ex)
                    self.group_last = None
                return
            if isinstance(item, Execution):
                del self.pending[i]
                item.end = now
                self._fail(item, (code, message))
                self.finished.append(item)
                return

    def _on_parse_complete(self, payload: bytes | None, now: float) -> None:
        pending = self.pending
        if pending and isinstance(pending[0], _Parse):
            pending.popleft()
            return
        for i, item in enumerate(pending):
            if isinstance(item, _Parse):
                del pending[i]
                return

    def _drop_parsed(self) -> None:
        """A completion arrived, so any Parse still queued before it succeeded."""
        pending = self.pending
        while pending and isinstance(pending[0], _Parse):
            pending.popleft()

    def _on_suspended(self, payload: bytes | None, now: float) -> None:
        self._drop_parsed()
        if not self.pending or not isinstance(self.pending[0], Execution):
            return
        ex = self.pending.popleft()
        assert isinstance(ex, Execution)
        ex.suspensions += 1
        ex.rows = (ex.rows or 0) + ex.max_rows
        ex.end = now
        self.suspended[ex.portal or ""] = ex

    def _on_ready(self, payload: bytes | None, now: float) -> None:
        status = _STATUS.get(payload) if payload is not None else None
        if status is None:
            status = payload.decode("ascii", "replace") if payload else "I"
        self.transaction_status = status
        self.group_last = None
        # pop through the first Sync / Query / FunctionCall; Executes before it were skipped
        while self.pending:
            item = self.pending.popleft()
            if isinstance(item, (_Sync, _Query)):
                break
        if self.phase is not Phase.CLOSED:  # a Terminate sent behind the request stays final
            self.phase = Phase.BUSY if self.pending else Phase.IDLE
        if status == "I":
            # protocol-level portals do not outlive their transaction
            for ex in self.suspended.values():
                self.finished.append(ex)
            self.suspended.clear()
            if len(self.portals) > 1 or (self.portals and "" not in self.portals):
                unnamed = self.portals.get("")
                unnamed_sql = self.portal_sql.get("")
                self.portals.clear()
                self.portal_sql.clear()
                if unnamed is not None:
                    self.portals[""] = unnamed
                    self.portal_sql[""] = unnamed_sql

    def _on_key(self, payload: bytes | None, now: float) -> None:
        if payload is not None and len(payload) >= 8:
            self.backend_pid = int.from_bytes(payload[:4], "big", signed=True)
            self.backend_secret = bytes(payload[4:])

    def _on_parameter(self, payload: bytes | None, now: float) -> None:
        if payload is None:
            return
        name, pos = _cstr(payload)
        value, _ = _cstr(payload, pos)
        self.parameters[name] = value

    def _on_auth(self, payload: bytes | None, now: float) -> None:
        if payload is None or payload[:4] != b"\x00\x00\x00\x00":
            self.auth_challenged = True

    def _on_copy_in(self, payload: bytes | None, now: float) -> None:
        self._drop_parsed()
        self.phase = Phase.COPY_IN
        self.copy_in = True
        # Syncs sent right after the COPY reach the server in copy-in mode: they get no answer
        while len(self.pending) > 1 and isinstance(self.pending[1], _Sync):
            del self.pending[1]

    def _on_copy_out(self, payload: bytes | None, now: float) -> None:
        self._drop_parsed()
        self.phase = Phase.COPY_OUT

    def abandon(self, now: float, sqlstate: str, message: str) -> list[Execution]:
        """The session ends with requests outstanding: what was running, ended at `now`.

        57014 (the client left; the proxy cancels upstream) records them as cancelled, other
        codes (the upstream was lost) as errors. A simple Query whose statements all ended
        already gives no record; of one still running, only the running statement does.
        """
        status = Status.CANCELLED if sqlstate == QUERY_CANCELED else Status.ERROR
        done: list[Execution] = []
        for item in self.pending:
            if isinstance(item, Execution):
                item.end = now
                item.status = status
                item.sqlstate = sqlstate
                item.error_message = message
                done.append(item)
            elif isinstance(item, _Query) and (
                item.statements is None or item.index < len(item.statements)
            ):
                done.append(self._simple_statement(item, now, None, None, (sqlstate, message)))
        self.pending.clear()
        return done

    def end_suspended(self) -> list[Execution]:
        """Portals still suspended when the session ends (each ended at its last leg)."""
        done = list(self.suspended.values())
        self.suspended.clear()
        return done

    @property
    def in_flight(self) -> bool:
        """A request is outstanding on the server (cancel it if the client goes away)."""
        return bool(self.pending)


_NO_EXECUTIONS: list[Execution] = []
_STATUS = {b"I": "I", b"T": "T", b"E": "E"}

_Handler = Callable[[SessionTracker, bytes | None, float], None]

_CLIENT_HANDLERS: dict[int, _Handler] = {
    ord("Q"): SessionTracker._on_query,
    ord("P"): SessionTracker._on_parse,
    ord("B"): SessionTracker._on_bind,
    ord("E"): SessionTracker._on_execute,
    ord("C"): SessionTracker._on_close,
    ord("S"): SessionTracker._on_sync,
    ord("F"): SessionTracker._on_sync,  # answered by ReadyForQuery, like a Sync
    ord("H"): SessionTracker._on_flush,
    ord("X"): SessionTracker._on_terminate,
    ord("c"): SessionTracker._on_copy_end,  # CopyDone
    ord("f"): SessionTracker._on_copy_end,  # CopyFail
}

_SERVER_HANDLERS: dict[int, _Handler] = {
    ord("C"): SessionTracker._on_complete,
    ord("I"): SessionTracker._on_empty,
    ord("s"): SessionTracker._on_suspended,
    ord("E"): SessionTracker._on_error,
    ord("1"): SessionTracker._on_parse_complete,
    ord("Z"): SessionTracker._on_ready,
    ord("K"): SessionTracker._on_key,
    ord("S"): SessionTracker._on_parameter,
    ord("R"): SessionTracker._on_auth,
    ord("G"): SessionTracker._on_copy_in,
    ord("H"): SessionTracker._on_copy_out,
    ord("W"): SessionTracker._on_copy_out,
}
