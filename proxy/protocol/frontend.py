"""Frontend (client to server) messages of protocol 3.0, as frozen dataclasses named as in the spec.

Each class knows its type byte, decodes its payload (`decode`) and encodes itself back to the full
frame (`encode`). The proxy decodes only what it must read; tests round-trip every type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from ._buffer import PayloadReader, PayloadWriter, decode_with, expect_empty, frame
from .errors import ProtocolViolation


class FrontendMessage(Protocol):
    type_byte: ClassVar[bytes]

    def encode(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Query:
    """Simple query: one string, possibly several statements separated by semicolons."""

    type_byte: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.sql).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        r = PayloadReader(payload, "Query")
        sql = r.cstring()
        r.finish()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse:
    type_byte: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        w = PayloadWriter().cstring(self.name).cstring(self.sql).uint16(len(self.param_types))
        for oid in self.param_types:
            w.int32(_s32(oid))
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Parse:
        r = PayloadReader(payload, "Parse")
        name = r.cstring()
        sql = r.cstring()
        # counts are unsigned on the server (pq_getmsgint): up to 65535 parameters
        types = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.uint16()))
        r.finish()
        return cls(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:
    type_byte: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        w = PayloadWriter().cstring(self.portal).cstring(self.statement)
        w.uint16(len(self.param_formats))
        for f in self.param_formats:
            w.int16(f)
        w.uint16(len(self.params))
        for p in self.params:
            w.nullable_bytes(p)
        w.int16(len(self.result_formats))
        for f in self.result_formats:
            w.int16(f)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Bind:
        r = PayloadReader(payload, "Bind")
        portal = r.cstring()
        statement = r.cstring()
        pf = tuple(r.int16() for _ in range(r.uint16()))
        params = tuple(r.nullable_bytes() for _ in range(r.uint16()))
        rf = tuple(r.int16() for _ in range(r.count16()))
        r.finish()
        return cls(portal, statement, pf, params, rf)


@dataclass(frozen=True, slots=True)
class Execute:
    type_byte: ClassVar[bytes] = b"E"
    portal: str = ""
    max_rows: int = 0

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.portal).int32(self.max_rows).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Execute:
        r = PayloadReader(payload, "Execute")
        portal = r.cstring()
        max_rows = r.int32()
        r.finish()
        return cls(portal, max_rows)


def _kind_and_name(payload: bytes, what: str) -> tuple[str, str]:
    r = PayloadReader(payload, what)
    kind = chr(r.int8())
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"invalid {what} message: kind {kind!r} is neither 'S' nor 'P'")
    name = r.cstring()
    r.finish()
    return kind, name


@dataclass(frozen=True, slots=True)
class Describe:
    type_byte: ClassVar[bytes] = b"D"
    kind: str  # 'S' statement or 'P' portal
    name: str = ""

    def encode(self) -> bytes:
        return PayloadWriter().raw(self.kind.encode()).cstring(self.name).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Describe:
        return cls(*_kind_and_name(payload, "Describe"))


@dataclass(frozen=True, slots=True)
class Close:
    type_byte: ClassVar[bytes] = b"C"
    kind: str  # 'S' statement or 'P' portal
    name: str = ""

    def encode(self) -> bytes:
        return PayloadWriter().raw(self.kind.encode()).cstring(self.name).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        return cls(*_kind_and_name(payload, "Close"))


def _s32(oid: int) -> int:
    """An OID (unsigned 32-bit) as the signed int32 the writer packs."""
    return oid - 2**32 if oid >= 2**31 else oid


@dataclass(frozen=True, slots=True)
class Sync:
    type_byte: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Sync:
        expect_empty("Sync", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class Flush:
    type_byte: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Flush:
        expect_empty("Flush", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class Terminate:
    type_byte: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Terminate:
        expect_empty("Terminate", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class CopyData:
    type_byte: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.type_byte, self.data)

    @classmethod
    def decode(cls, payload: bytes) -> CopyData:
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class CopyDone:
    type_byte: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> CopyDone:
        expect_empty("CopyDone", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class CopyFail:
    type_byte: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.message).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> CopyFail:
        r = PayloadReader(payload, "CopyFail")
        message = r.cstring()
        r.finish()
        return cls(message)


@dataclass(frozen=True, slots=True)
class FunctionCall:
    type_byte: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def encode(self) -> bytes:
        w = PayloadWriter().int32(_s32(self.function_oid)).int16(len(self.arg_formats))
        for f in self.arg_formats:
            w.int16(f)
        w.int16(len(self.args))
        for a in self.args:
            w.nullable_bytes(a)
        return w.int16(self.result_format).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCall:
        r = PayloadReader(payload, "FunctionCall")
        oid = r.int32() & 0xFFFFFFFF
        formats = tuple(r.int16() for _ in range(r.count16()))
        args = tuple(r.nullable_bytes() for _ in range(r.count16()))
        result_format = r.int16()
        r.finish()
        return cls(oid, formats, args, result_format)


@dataclass(frozen=True, slots=True)
class AuthenticationResponse:
    """PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse all share type 'p'.

    Which one it is depends on the authentication request that preceded it, so the payload is
    kept opaque; a relay never needs to read it (and must not log it).
    """

    type_byte: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(self.type_byte, self.data)

    @classmethod
    def decode(cls, payload: bytes) -> AuthenticationResponse:
        return cls(bytes(payload))

    def __repr__(self) -> str:  # never show secrets
        return f"AuthenticationResponse(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """The first 'p' message of a SASL exchange: mechanism name and initial client response."""

    type_byte: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.mechanism).nullable_bytes(self.data).frame(b"p")

    @classmethod
    def decode(cls, payload: bytes) -> SASLInitialResponse:
        r = PayloadReader(payload, "SASLInitialResponse")
        mechanism = r.cstring()
        data = r.nullable_bytes()
        r.finish()
        return cls(mechanism, data)


FRONTEND_TYPES: dict[bytes, type[FrontendMessage]] = {
    cls.type_byte: cls
    for cls in (
        Query,
        Parse,
        Bind,
        Execute,
        Describe,
        Close,
        Sync,
        Flush,
        Terminate,
        CopyData,
        CopyDone,
        CopyFail,
        FunctionCall,
        AuthenticationResponse,
    )
}

FRONTEND_TYPE_BYTES: frozenset[int] = frozenset(t[0] for t in FRONTEND_TYPES)


def decode_frontend(type_byte: int, payload: bytes) -> FrontendMessage:
    """Decode one frontend message payload given its type byte."""
    decoded: FrontendMessage = decode_with(FRONTEND_TYPES, type_byte, payload, "frontend")
    return decoded
