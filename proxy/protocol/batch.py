"""Whole request batches and whole responses, for the result cache.

The relay forwards chunks without looking inside most messages. When a chunk is exactly one
request batch that could be answered from the cache (a simple Query, or Bind/Execute/Sync of a
read), these helpers read it completely: what is asked (`read_batch`), and whether a captured
response is one a cache may replay byte for byte (`replayable`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolViolation
from .frontend import Bind, Parse

SYNC = b"S\x00\x00\x00\x04"
_REPLAYABLE = frozenset(b"12tTnDCsZ")


@dataclass(frozen=True, slots=True)
class Batch:
    """One cacheable request: a simple Query, or an extended-protocol read ending in Sync."""

    kind: str  #: "query" | "bind" (a named statement) | "parse" (unnamed Parse, then Bind)
    sql: str | None  #: the text (None for "bind": the session knows the statement's text)
    statement: str  #: the statement name ("" for unnamed)
    parse: bytes = b""  #: the Parse message ("parse" kind), to re-create the unnamed statement


def _cstr(data: bytes, start: int, end: int) -> tuple[str, int] | None:
    nul = data.find(b"\x00", start, end)
    if nul < 0:
        return None
    try:
        return data[start:nul].decode("utf-8"), nul + 1
    except UnicodeDecodeError:
        return None


def _messages(data: bytes, limit: int) -> list[tuple[int, int, int]] | None:
    """(type, payload start, payload end) of each message, if `data` is whole messages only."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if pos + 5 > n or len(out) >= limit:
            return None
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        end = pos + 1 + length
        if length < 4 or end > n:
            return None
        out.append((data[pos], pos + 5, end))
        pos = end
    return out


def read_batch(data: bytes) -> Batch | None:
    """The batch `data` holds, if it is exactly one cacheable-shaped request.

    Shapes: `Q`; `B D? E S` binding a named statement to the unnamed portal; `P B D? E S` with
    the unnamed statement and portal. Execute must fetch all rows (max_rows 0).
    """
    msgs = _messages(data, 5)
    if not msgs:
        return None
    types = bytes(t for t, _, _ in msgs)
    if types == b"Q":
        text = _cstr(data, msgs[0][1], msgs[0][2])
        return Batch("query", text[0], "") if text is not None else None
    if not types.endswith(b"ES") or data[-5:] != SYNC:
        return None
    if types not in (b"BES", b"BDES", b"PBES", b"PBDES"):
        return None
    parse: tuple[str, str] | None = None
    parse_bytes = b""
    index = 0
    if types[0] == 0x50:  # P
        _, start, end = msgs[0]
        name = _cstr(data, start, end)
        if name is None or name[0]:
            return None  # named Parse: the server must see it (the client will Bind it later)
        text = _cstr(data, name[1], end)
        if text is None:
            return None
        parse = ("", text[0])
        parse_bytes = data[start - 5 : end]
        index = 1
    _, start, end = msgs[index]
    portal = _cstr(data, start, end)
    if portal is None or portal[0]:
        return None
    statement = _cstr(data, portal[1], end)
    if statement is None:
        return None
    if parse is not None and statement[0] != "":
        return None
    if parse is None and statement[0] == "":
        return None  # Bind of the unnamed statement without its Parse: text unknown here
    if types[index + 1] == 0x44:  # D: Describe of the unnamed portal or statement only
        _, dstart, dend = msgs[index + 1]
        if dend - dstart != 2 or data[dstart + 1] != 0:
            return None
    _, estart, eend = msgs[-2]
    if eend - estart != 5 or data[estart] != 0:
        return None  # a named portal (it could be resumed later)
    # a row limit is fine: the Sync right after ends the portal, and the key holds the limit
    if parse is not None:
        return Batch("parse", parse[1], "", parse_bytes)
    return Batch("bind", None, statement[0])


def request_sql(data: bytes, statements: dict[str, str]) -> str | None:
    """The text of the first statement `data` executes, if it is whole messages ending with a
    simple Query or a Sync (a request the proxy could answer with ErrorResponse and
    ReadyForQuery instead of the server). `statements` resolves a Bind's statement name."""
    msgs = _messages(data, 64)
    if not msgs or msgs[-1][0] not in (0x51, 0x53):  # Q, S
        return None
    for t, start, end in msgs:
        if t == 0x51:
            text = _cstr(data, start, end)
            return text[0] if text is not None else None
        if t == 0x50:  # P: name, text
            name = _cstr(data, start, end)
            text = _cstr(data, name[1], end) if name is not None else None
            return text[0] if text is not None else None
        if t == 0x42:  # B: portal, statement
            portal = _cstr(data, start, end)
            stmt = _cstr(data, portal[1], end) if portal is not None else None
            return statements.get(stmt[0]) if stmt is not None else None
    return None


def bind_parameters(data: bytes) -> int | None:
    """Number of parameters of the first Bind in `data` (None: no readable Bind)."""
    msgs = _messages(data, 64)
    if not msgs:
        return None
    for t, start, end in msgs:
        if t != 0x42:
            continue
        portal = _cstr(data, start, end)
        stmt = _cstr(data, portal[1], end) if portal is not None else None
        if stmt is None:
            return None
        pos = stmt[1]
        if pos + 2 > end:
            return None
        nformats = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2 + 2 * nformats
        if pos + 2 > end:
            return None
        return int.from_bytes(data[pos : pos + 2], "big")
    return None


def replayable(response: bytes) -> tuple[str | None, int | None] | None:
    """(command tag, rows) if `response` is a complete successful read ending the batch idle.

    The tag is None when the Execute's row limit suspended the portal (the Sync after it
    closed the portal, so the reply is as final as a CommandComplete). Anything else (an error,
    a notice, an asynchronous message, a transaction left open, a second ReadyForQuery) makes
    it unfit for replay: None.
    """
    msgs = _messages(response, 1 << 62)
    if not msgs:
        return None
    tag: str | None = None
    ends = rows = 0
    last = len(msgs) - 1
    for i, (t, start, end) in enumerate(msgs):
        if t not in _REPLAYABLE:
            return None
        if t == 0x44:  # D
            rows += 1
        elif t == 0x5A:  # Z
            if i != last or end - start != 1 or response[start] != 0x49:  # 'I'
                return None
        elif t == 0x43:  # C
            ends += 1
            text = _cstr(response, start, end)
            if text is None or not text[0].startswith("SELECT "):
                return None
            tag = text[0]
        elif t == 0x73:  # s
            ends += 1
    if ends != 1 or msgs[last][0] != 0x5A:
        return None
    if tag is None:
        return None, rows
    count = tag[7:]
    # isdigit() alone accepts digits such as "²" that int() rejects (found by bench.fuzz --codec)
    return tag, int(count) if count.isascii() and count.isdigit() else None


def parse_then_sync(parse_message: bytes) -> bytes:
    """The Parse a cache hit skipped, and a Sync: its two replies are swallowed by the relay."""
    return parse_message + SYNC


__all__ = [
    "SYNC",
    "Batch",
    "bind_parameters",
    "parse_then_sync",
    "read_batch",
    "replayable",
    "request_sql",
]


@dataclass(frozen=True, slots=True)
class ExtendedRequest:
    """An extended-protocol request ending in Sync, read for a rewrite: its one Parse (with the
    Parse message's bounds in the chunk, to send another text in its place) and the statement
    its one Bind binds. The Bind's values are decoded only when asked for (`bind`)."""

    parse: Parse | None
    parse_span: tuple[int, int]  #: (first byte, end) of the Parse message in the chunk
    bind_statement: str | None  #: the statement name of its Bind (None: no Bind)
    bind_span: tuple[int, int]  #: (payload start, end) of the Bind in the chunk

    def bind(self, data: bytes) -> Bind | None:
        """The Bind of `data` (the chunk this was read from), decoded in full."""
        if self.bind_statement is None:
            return None
        start, end = self.bind_span
        try:
            return Bind.decode(data[start:end])
        except ProtocolViolation:
            return None


def extended_request(data: bytes) -> ExtendedRequest | None:
    """The Parse and Bind of `data` if it is whole messages ending with Sync or Flush (asyncpg
    prepares with Parse, Describe, Flush) holding at most one of each (a pipeline of several
    statements, or a batch binding one statement many times, is left alone: None)."""
    msgs = _messages(data, 16)
    if not msgs or msgs[-1][0] not in (0x53, 0x48):  # S, H
        return None
    parse: Parse | None = None
    statement: str | None = None
    span = bind_span = (0, 0)
    for t, start, end in msgs:
        if t == 0x50:
            if parse is not None:
                return None
            try:
                parse = Parse.decode(data[start:end])
            except ProtocolViolation:
                return None  # the server says what is wrong with it
            span = (start - 5, end)
        elif t == 0x42:
            portal = _cstr(data, start, end)
            name = _cstr(data, portal[1], end) if portal is not None else None
            if statement is not None or name is None:
                return None
            statement, bind_span = name[0], (start, end)
    return ExtendedRequest(parse, span, statement, bind_span)
