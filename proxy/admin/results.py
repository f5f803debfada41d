"""Encoding a result set as backend messages, the way PostgreSQL would send it (text format)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..protocol.backend import (
    CommandComplete,
    DataRow,
    FieldDescription,
    NoticeResponse,
    RowDescription,
    error_response,
)

INT8, FLOAT8, TEXT, BOOL = 20, 701, 25, 16


def _oid(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT8
    if isinstance(value, float):
        return FLOAT8
    return TEXT


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, float):
        return repr(round(value, 6)).encode()
    return str(value).encode("utf-8")


def result_set(columns: Sequence[str], rows: Iterable[Sequence[Any]], tag: str = "SHOW") -> bytes:
    """RowDescription + DataRows + CommandComplete; column types from the first non-NULL value."""
    rows = [tuple(r) for r in rows]
    oids = []
    for i in range(len(columns)):
        sample = next((r[i] for r in rows if r[i] is not None), "")
        oids.append(_oid(sample))
    out = [
        RowDescription(
            tuple(
                FieldDescription(name, type_oid=oid)
                for name, oid in zip(columns, oids, strict=True)
            )
        ).encode()
    ]
    out.extend(DataRow(tuple(_text(v) for v in r)).encode() for r in rows)
    out.append(CommandComplete(tag).encode())
    return b"".join(out)


def command_complete(tag: str) -> bytes:
    return CommandComplete(tag).encode()


def notice(message: str) -> bytes:
    return NoticeResponse(
        (("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", message))
    ).encode()


def error(sqlstate: str, message: str, detail: str | None = None) -> bytes:
    return error_response("ERROR", sqlstate, message, detail)


def admin_simple_only() -> bytes:
    """Answer to a Sync: the console speaks the simple query protocol only."""
    from ..protocol.backend import ReadyForQuery

    return (
        error(
            "0A000",
            "the pgsage admin console supports the simple query protocol only",
            "use psql, or a driver's simple-query mode",
        )
        + ReadyForQuery("I").encode()
    )


def admin_unavailable() -> bytes:
    from ..protocol.backend import ReadyForQuery

    return (
        error("55000", "the admin console is not available in this process")
        + ReadyForQuery("I").encode()
    )
