"""Binary-format parameter values (a Bind's format code 1) as text PostgreSQL reads back to the
same value: for proving a rewrite with the values a client bound (asyncpg binds everything in
binary). Scalars of the common built-in types only; anything else raises `Unsupported`, and the
statement is then simply not proven with that value set."""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal


class Unsupported(ValueError):
    """No text rendering for this type (or a malformed value)."""


_DATE_EPOCH = dt.date(2000, 1, 1).toordinal()
_TS_EPOCH = dt.datetime(2000, 1, 1)
_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")


def _int(fmt: str) -> Callable[[bytes], str]:
    s = struct.Struct(fmt)
    return lambda raw: str(s.unpack(raw)[0])


def _float(fmt: str) -> Callable[[bytes], str]:
    s = struct.Struct(fmt)

    def render(raw: bytes) -> str:
        v = s.unpack(raw)[0]
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)  # shortest text that reads back to the same double (float4: its value)

    return render


def _text(raw: bytes) -> str:
    return raw.decode("utf-8")


def _date(raw: bytes) -> str:
    days = _I32.unpack(raw)[0]
    if days in (0x7FFFFFFF, -0x80000000):
        return "infinity" if days > 0 else "-infinity"
    return dt.date.fromordinal(_DATE_EPOCH + days).isoformat()


def _timestamp(zone: str) -> Callable[[bytes], str]:
    def render(raw: bytes) -> str:
        us = _I64.unpack(raw)[0]
        if us in (0x7FFFFFFFFFFFFFFF, -0x8000000000000000):
            return "infinity" if us > 0 else "-infinity"
        try:
            return (_TS_EPOCH + dt.timedelta(microseconds=us)).isoformat(sep=" ") + zone
        except OverflowError as exc:  # before year 1 or after 9999: Python cannot say it
            raise Unsupported("timestamp out of Python's range") from exc

    return render


def _time(raw: bytes) -> str:
    us = _I64.unpack(raw)[0]
    seconds, micro = divmod(us, 1_000_000)
    h, rest = divmod(seconds, 3600)
    return f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}.{micro:06d}"


def _numeric(raw: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHH", raw)
    if sign == 0xC000:
        return "NaN"
    if sign in (0xD000, 0xF000):
        return "Infinity" if sign == 0xD000 else "-Infinity"
    if sign not in (0, 0x4000) or len(raw) != 8 + 2 * ndigits:
        raise Unsupported("malformed numeric")
    groups = struct.unpack_from(f"!{ndigits}H", raw, 8)
    digits = tuple(int(c) for g in groups for c in f"{g:04d}")
    value = Decimal((1 if sign == 0x4000 else 0, digits or (0,), (weight - ndigits + 1) * 4))
    return f"{value:.{dscale}f}"  # the scale the client sent: 1.50 stays 1.50


def _bool(raw: bytes) -> str:
    if len(raw) != 1:
        raise Unsupported("malformed bool")
    return "true" if raw[0] else "false"


def _jsonb(raw: bytes) -> str:
    if not raw or raw[0] != 1:
        raise Unsupported("unknown jsonb version")
    return raw[1:].decode("utf-8")


RENDER: dict[int, Callable[[bytes], str]] = {
    16: _bool,
    17: lambda raw: "\\x" + raw.hex(),  # bytea
    18: _text,  # "char"
    19: _text,  # name
    20: _int("!q"),  # int8
    21: _int("!h"),  # int2
    23: _int("!i"),  # int4
    25: _text,
    26: _int("!I"),  # oid
    114: _text,  # json
    700: _float("!f"),
    701: _float("!d"),
    1042: _text,  # bpchar
    1043: _text,  # varchar
    1082: _date,
    1083: _time,
    1114: _timestamp(""),
    1184: _timestamp("+00"),  # sent as UTC microseconds
    1700: _numeric,
    2950: lambda raw: str(uuid.UUID(bytes=raw)),
    3802: _jsonb,
}


def as_text(type_oid: int, raw: bytes) -> str:
    """The text form of a binary parameter of type `type_oid`."""
    render = RENDER.get(type_oid)
    if render is None:
        raise Unsupported(f"no text rendering for binary values of type {type_oid}")
    try:
        return render(raw)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, Unsupported):
            raise
        raise Unsupported(f"malformed binary value of type {type_oid}: {exc}") from exc
