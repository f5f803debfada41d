"""Backend (server to client) messages of protocol 3.0: frozen dataclasses named as in the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from ._buffer import PayloadReader, PayloadWriter, decode_with, expect_empty, frame
from .errors import ProtocolViolation
from .frontend import CopyData, CopyDone


class BackendMessage(Protocol):
    type_byte: ClassVar[bytes]

    def encode(self) -> bytes: ...


# Authentication request codes (the int32 after 'R').
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:
    """Every AuthenticationXxx message: the request code plus its code-specific data.

    `data` is the MD5 salt, the SASL mechanism list (NUL-terminated names and a final NUL), or the
    SASL/GSS continuation bytes.
    """

    type_byte: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return PayloadWriter().int32(self.code).raw(self.data).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> Authentication:
        r = PayloadReader(payload, "Authentication")
        code = r.int32()
        return cls(code, r.rest())

    @property
    def sasl_mechanisms(self) -> tuple[str, ...]:
        if self.code != AUTH_SASL:
            return ()
        return tuple(m.decode() for m in self.data.split(b"\x00") if m)


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """Process id and secret key for CancelRequest (4 bytes in 3.0; up to 256 bytes in 3.2)."""

    type_byte: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return PayloadWriter().int32(self.process_id).raw(self.secret_key).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        r = PayloadReader(payload, "BackendKeyData")
        pid = r.int32()
        secret = r.rest()
        if not 4 <= len(secret) <= 256:
            raise ProtocolViolation("invalid BackendKeyData message: secret key length")
        return cls(pid, secret)


@dataclass(frozen=True, slots=True)
class ParseComplete:
    type_byte: ClassVar[bytes] = b"1"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> ParseComplete:
        expect_empty("ParseComplete", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class BindComplete:
    type_byte: ClassVar[bytes] = b"2"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> BindComplete:
        expect_empty("BindComplete", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class CloseComplete:
    type_byte: ClassVar[bytes] = b"3"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> CloseComplete:
        expect_empty("CloseComplete", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class NoData:
    type_byte: ClassVar[bytes] = b"n"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> NoData:
        expect_empty("NoData", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    type_byte: ClassVar[bytes] = b"s"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> PortalSuspended:
        expect_empty("PortalSuspended", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    type_byte: ClassVar[bytes] = b"I"

    def encode(self) -> bytes:
        return frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> EmptyQueryResponse:
        expect_empty("EmptyQueryResponse", payload)
        return cls()


@dataclass(frozen=True, slots=True)
class CommandComplete:
    type_byte: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.tag).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> CommandComplete:
        r = PayloadReader(payload, "CommandComplete")
        tag = r.cstring()
        r.finish()
        return cls(tag)


def _copy_response(payload: bytes, what: str) -> tuple[int, tuple[int, ...]]:
    r = PayloadReader(payload, what)
    overall = r.int8()
    formats = tuple(r.int16() for _ in range(r.count16()))
    r.finish()
    return overall, formats


def _encode_copy_response(type_byte: bytes, overall: int, formats: tuple[int, ...]) -> bytes:
    w = PayloadWriter().int8(overall).int16(len(formats))
    for f in formats:
        w.int16(f)
    return w.frame(type_byte)


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    type_byte: ClassVar[bytes] = b"G"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(self.type_byte, self.format, self.column_formats)

    @classmethod
    def decode(cls, payload: bytes) -> CopyInResponse:
        return cls(*_copy_response(payload, "CopyInResponse"))


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    type_byte: ClassVar[bytes] = b"H"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(self.type_byte, self.format, self.column_formats)

    @classmethod
    def decode(cls, payload: bytes) -> CopyOutResponse:
        return cls(*_copy_response(payload, "CopyOutResponse"))


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    type_byte: ClassVar[bytes] = b"W"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _encode_copy_response(self.type_byte, self.format, self.column_formats)

    @classmethod
    def decode(cls, payload: bytes) -> CopyBothResponse:
        return cls(*_copy_response(payload, "CopyBothResponse"))


@dataclass(frozen=True, slots=True)
class DataRow:
    type_byte: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        w = PayloadWriter().int16(len(self.values))
        for v in self.values:
            w.nullable_bytes(v)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> DataRow:
        r = PayloadReader(payload, "DataRow")
        values = tuple(r.nullable_bytes() for _ in range(r.count16()))
        r.finish()
        return cls(values)


def _decode_fields(payload: bytes, what: str) -> tuple[tuple[str, str], ...]:
    r = PayloadReader(payload, what)
    fields: list[tuple[str, str]] = []
    while True:
        code = r.int8()
        if code == 0:
            break
        fields.append((chr(code), r.cstring()))
    r.finish()
    return tuple(fields)


def _encode_fields(type_byte: bytes, fields: tuple[tuple[str, str], ...]) -> bytes:
    w = PayloadWriter()
    for code, value in fields:
        w.raw(code.encode("ascii")).cstring(value)
    return w.int8(0).frame(type_byte)


class _FieldsMixin:
    fields: tuple[tuple[str, str], ...]

    def field(self, code: str) -> str | None:
        for c, v in self.fields:
            if c == code:
                return v
        return None

    @property
    def severity(self) -> str | None:
        return self.field("V") or self.field("S")

    @property
    def sqlstate(self) -> str | None:
        return self.field("C")

    @property
    def message(self) -> str | None:
        return self.field("M")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsMixin):
    """Error with its fields as (code letter, value) pairs: S/V severity, C SQLSTATE, M message."""

    type_byte: ClassVar[bytes] = b"E"
    fields: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        return _encode_fields(self.type_byte, self.fields)

    @classmethod
    def decode(cls, payload: bytes) -> ErrorResponse:
        return cls(_decode_fields(payload, "ErrorResponse"))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsMixin):
    type_byte: ClassVar[bytes] = b"N"
    fields: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        return _encode_fields(self.type_byte, self.fields)

    @classmethod
    def decode(cls, payload: bytes) -> NoticeResponse:
        return cls(_decode_fields(payload, "NoticeResponse"))


def error_response(severity: str, sqlstate: str, message: str, detail: str | None = None) -> bytes:
    """Encoded ErrorResponse as PostgreSQL itself would send it (S, V, C, M and optional D)."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail:
        fields.append(("D", detail))
    return ErrorResponse(tuple(fields)).encode()


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    type_byte: ClassVar[bytes] = b"V"
    result: bytes | None

    def encode(self) -> bytes:
        return PayloadWriter().nullable_bytes(self.result).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCallResponse:
        r = PayloadReader(payload, "FunctionCallResponse")
        result = r.nullable_bytes()
        r.finish()
        return cls(result)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    type_byte: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized_options: tuple[str, ...] = ()

    def encode(self) -> bytes:
        w = PayloadWriter().int32(self.newest_minor).int32(len(self.unrecognized_options))
        for o in self.unrecognized_options:
            w.cstring(o)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> NegotiateProtocolVersion:
        r = PayloadReader(payload, "NegotiateProtocolVersion")
        minor = r.int32()
        n = r.int32()
        if n < 0 or n > len(payload):
            raise ProtocolViolation("invalid NegotiateProtocolVersion message: option count")
        options = tuple(r.cstring() for _ in range(n))
        r.finish()
        return cls(minor, options)


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    type_byte: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        w = PayloadWriter().int32(self.process_id).cstring(self.channel).cstring(self.payload)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> NotificationResponse:
        r = PayloadReader(payload, "NotificationResponse")
        pid = r.int32()
        channel = r.cstring()
        text = r.cstring()
        r.finish()
        return cls(pid, channel, text)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_byte: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        w = PayloadWriter().uint16(len(self.type_oids))
        for oid in self.type_oids:
            w.int32(oid if oid < 2**31 else oid - 2**32)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> ParameterDescription:
        r = PayloadReader(payload, "ParameterDescription")
        oids = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.uint16()))
        r.finish()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    type_byte: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return PayloadWriter().cstring(self.name).cstring(self.value).frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        r = PayloadReader(payload, "ParameterStatus")
        name = r.cstring()
        value = r.cstring()
        r.finish()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """Transaction status: 'I' idle, 'T' in a transaction block, 'E' in a failed transaction."""

    type_byte: ClassVar[bytes] = b"Z"
    status: str = "I"

    def encode(self) -> bytes:
        return frame(self.type_byte, self.status.encode("ascii"))

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1 or payload not in (b"I", b"T", b"E"):
            raise ProtocolViolation("invalid ReadyForQuery message: status")
        return cls(payload.decode("ascii"))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription:
    type_byte: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        w = PayloadWriter().int16(len(self.fields))
        for f in self.fields:
            w.cstring(f.name).int32(_s32(f.table_oid)).int16(f.column_number)
            w.int32(_s32(f.type_oid)).int16(f.type_size).int32(f.type_modifier).int16(f.format)
        return w.frame(self.type_byte)

    @classmethod
    def decode(cls, payload: bytes) -> RowDescription:
        r = PayloadReader(payload, "RowDescription")
        fields = []
        for _ in range(r.count16()):
            name = r.cstring()
            table_oid = r.int32() & 0xFFFFFFFF
            column = r.int16()
            type_oid = r.int32() & 0xFFFFFFFF
            fields.append(
                FieldDescription(name, table_oid, column, type_oid, r.int16(), r.int32(), r.int16())
            )
        r.finish()
        return cls(tuple(fields))


def _s32(oid: int) -> int:
    return oid - 2**32 if oid >= 2**31 else oid


BACKEND_TYPES: dict[bytes, type[BackendMessage]] = {
    cls.type_byte: cls
    for cls in (
        Authentication,
        BackendKeyData,
        BindComplete,
        CloseComplete,
        CommandComplete,
        CopyData,
        CopyDone,
        CopyInResponse,
        CopyOutResponse,
        CopyBothResponse,
        DataRow,
        EmptyQueryResponse,
        ErrorResponse,
        FunctionCallResponse,
        NegotiateProtocolVersion,
        NoData,
        NoticeResponse,
        NotificationResponse,
        ParameterDescription,
        ParameterStatus,
        ParseComplete,
        PortalSuspended,
        ReadyForQuery,
        RowDescription,
    )
}

BACKEND_TYPE_BYTES: frozenset[int] = frozenset(t[0] for t in BACKEND_TYPES)


def decode_backend(type_byte: int, payload: bytes) -> BackendMessage:
    """Decode one backend message payload given its type byte."""
    decoded: BackendMessage = decode_with(BACKEND_TYPES, type_byte, payload, "backend")
    return decoded
