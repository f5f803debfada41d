"""Reading and writing the primitive field types of protocol 3.0 payloads."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from .errors import ProtocolViolation

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")


class PayloadReader:
    """Cursor over one message payload; every read checks bounds and raises ProtocolViolation."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _fail(self, problem: str) -> ProtocolViolation:
        return ProtocolViolation(f"invalid {self._what} message: {problem}")

    def int8(self) -> int:
        if self._pos + 1 > len(self._data):
            raise self._fail("truncated")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def int16(self) -> int:
        if self._pos + 2 > len(self._data):
            raise self._fail("truncated")
        (value,) = _I16.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(value)

    def uint16(self) -> int:
        if self._pos + 2 > len(self._data):
            raise self._fail("truncated")
        (value,) = _U16.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(value)

    def int32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise self._fail("truncated")
        (value,) = _I32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def count16(self) -> int:
        value = self.int16()
        if value < 0:
            raise self._fail("negative count")
        return value

    def cstring_bytes(self) -> bytes:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            raise self._fail("string without terminator")
        value = self._data[self._pos : end]
        self._pos = end + 1
        return bytes(value)

    def cstring(self) -> str:
        return self.cstring_bytes().decode("utf-8", "surrogateescape")

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise self._fail("truncated")
        value = self._data[self._pos : self._pos + n]
        self._pos += n
        return bytes(value)

    def nullable_bytes(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < -1:
            raise self._fail("negative length")
        return self.take(n)

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return bytes(value)

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise self._fail(f"{len(self._data) - self._pos} unexpected trailing bytes")


class PayloadWriter:
    """Builds one payload; `frame(type)` wraps it with the type byte and length."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def int8(self, value: int) -> PayloadWriter:
        self._parts.append(bytes((value & 0xFF,)))
        return self

    def int16(self, value: int) -> PayloadWriter:
        self._parts.append(_I16.pack(value))
        return self

    def uint16(self, value: int) -> PayloadWriter:
        self._parts.append(_U16.pack(value))
        return self

    def int32(self, value: int) -> PayloadWriter:
        self._parts.append(_I32.pack(value))
        return self

    def cstring(self, value: str | bytes) -> PayloadWriter:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if b"\x00" in raw:
            raise ValueError("a protocol string cannot contain a NUL byte")
        self._parts.append(raw + b"\x00")
        return self

    def raw(self, value: bytes) -> PayloadWriter:
        self._parts.append(value)
        return self

    def nullable_bytes(self, value: bytes | None) -> PayloadWriter:
        if value is None:
            return self.int32(-1)
        self.int32(len(value))
        self._parts.append(value)
        return self

    def payload(self) -> bytes:
        return b"".join(self._parts)

    def frame(self, type_byte: bytes) -> bytes:
        body = self.payload()
        return _HDR.pack(type_byte, len(body) + 4) + body


def frame(type_byte: bytes, payload: bytes = b"") -> bytes:
    """One message: type byte, int32 length (counting itself), payload."""
    return _HDR.pack(type_byte, len(payload) + 4) + payload


def expect_empty(name: str, payload: bytes) -> None:
    """Messages without a payload: any byte is the peer's protocol violation."""
    if payload:
        raise ProtocolViolation(f"invalid {name} message: {len(payload)} unexpected bytes")


def decode_with(table: Mapping[bytes, Any], type_byte: int, payload: bytes, direction: str) -> Any:
    """Decode one payload with the class the direction's table holds for its type byte."""
    cls = table.get(bytes((type_byte,)))
    if cls is None:
        raise ProtocolViolation(f"invalid {direction} message type {type_byte!r}")
    return cls.decode(payload)
