"""Frontend and backend message codecs: round-trips, documented bytes, malformed payloads."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import (
    ProtocolViolation,
    bind_names,
    decode_backend,
    decode_frontend,
    error_response,
)
from proxy.protocol import backend as be
from proxy.protocol import frontend as fe

ROUND_TRIP = settings(max_examples=100, deadline=None)

# ------------------------------------------------------------------ strategies

_plain_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)))
# bytes that are not UTF-8 survive as surrogate escapes
_raw_text = st.binary(max_size=40).map(
    lambda b: b.replace(b"\x00", b"").decode("utf-8", "surrogateescape")
)
text = st.one_of(_plain_text, _raw_text)
int8u = st.integers(0, 255)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
oid = st.integers(0, 2**32 - 1)
nullable = st.none() | st.binary(max_size=64)


def small_tuple(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(elements, max_size=8).map(tuple)


FRONTEND_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    fe.Query: st.builds(fe.Query, text),
    fe.Parse: st.builds(fe.Parse, text, text, small_tuple(oid)),
    fe.Bind: st.builds(
        fe.Bind, text, text, small_tuple(int16), small_tuple(nullable), small_tuple(int16)
    ),
    fe.Execute: st.builds(fe.Execute, text, int32),
    fe.Describe: st.builds(fe.Describe, st.sampled_from("SP"), text),
    fe.Close: st.builds(fe.Close, st.sampled_from("SP"), text),
    fe.Sync: st.just(fe.Sync()),
    fe.Flush: st.just(fe.Flush()),
    fe.Terminate: st.just(fe.Terminate()),
    fe.CopyData: st.builds(fe.CopyData, st.binary(max_size=200)),
    fe.CopyDone: st.just(fe.CopyDone()),
    fe.CopyFail: st.builds(fe.CopyFail, text),
    fe.FunctionCall: st.builds(
        fe.FunctionCall, oid, small_tuple(int16), small_tuple(nullable), int16
    ),
    fe.AuthenticationResponse: st.builds(fe.AuthenticationResponse, st.binary(max_size=200)),
}

_field_code = st.characters(min_codepoint=1, max_codepoint=127)
_fields = small_tuple(st.tuples(_field_code, text))
_field_description = st.builds(be.FieldDescription, text, oid, int16, oid, int16, int32, int16)

BACKEND_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    be.Authentication: st.builds(be.Authentication, int32, st.binary(max_size=64)),
    be.BackendKeyData: st.builds(be.BackendKeyData, int32, st.binary(min_size=4, max_size=256)),
    be.BindComplete: st.just(be.BindComplete()),
    be.CloseComplete: st.just(be.CloseComplete()),
    be.CommandComplete: st.builds(be.CommandComplete, text),
    be.CopyData: st.builds(be.CopyData, st.binary(max_size=200)),
    be.CopyDone: st.just(be.CopyDone()),
    be.CopyInResponse: st.builds(be.CopyInResponse, int8u, small_tuple(int16)),
    be.CopyOutResponse: st.builds(be.CopyOutResponse, int8u, small_tuple(int16)),
    be.CopyBothResponse: st.builds(be.CopyBothResponse, int8u, small_tuple(int16)),
    be.DataRow: st.builds(be.DataRow, small_tuple(nullable)),
    be.EmptyQueryResponse: st.just(be.EmptyQueryResponse()),
    be.ErrorResponse: st.builds(be.ErrorResponse, _fields),
    be.FunctionCallResponse: st.builds(be.FunctionCallResponse, nullable),
    be.NegotiateProtocolVersion: st.builds(be.NegotiateProtocolVersion, int32, small_tuple(text)),
    be.NoData: st.just(be.NoData()),
    be.NoticeResponse: st.builds(be.NoticeResponse, _fields),
    be.NotificationResponse: st.builds(be.NotificationResponse, int32, text, text),
    be.ParameterDescription: st.builds(be.ParameterDescription, small_tuple(oid)),
    be.ParameterStatus: st.builds(be.ParameterStatus, text, text),
    be.ParseComplete: st.just(be.ParseComplete()),
    be.PortalSuspended: st.just(be.PortalSuspended()),
    be.ReadyForQuery: st.builds(be.ReadyForQuery, st.sampled_from("ITE")),
    be.RowDescription: st.builds(be.RowDescription, small_tuple(_field_description)),
}


def _split_frame(encoded: bytes, type_byte: bytes) -> bytes:
    """Check the 5-byte header of one encoded message and return its payload."""
    assert encoded[:1] == type_byte
    (length,) = struct.unpack_from("!I", encoded, 1)
    assert length == len(encoded) - 1
    return encoded[5:]


# ------------------------------------------------------------------ round-trips


def test_every_frontend_type_has_a_strategy() -> None:
    assert set(FRONTEND_STRATEGIES) == set(fe.FRONTEND_TYPES.values())
    assert {t[0] for t in fe.FRONTEND_TYPES} == fe.FRONTEND_TYPE_BYTES


def test_every_backend_type_has_a_strategy() -> None:
    assert set(BACKEND_STRATEGIES) == set(be.BACKEND_TYPES.values())
    assert {t[0] for t in be.BACKEND_TYPES} == be.BACKEND_TYPE_BYTES


@pytest.mark.parametrize("cls", list(FRONTEND_STRATEGIES), ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_frontend_round_trip(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(FRONTEND_STRATEGIES[cls])
    payload = _split_frame(message.encode(), cls.type_byte)
    assert decode_frontend(cls.type_byte[0], payload) == message
    assert cls.decode(payload) == message


@ROUND_TRIP
@given(st.builds(fe.SASLInitialResponse, text, nullable))
def test_sasl_initial_response_round_trip(message: fe.SASLInitialResponse) -> None:
    payload = _split_frame(message.encode(), b"p")
    assert fe.SASLInitialResponse.decode(payload) == message


@pytest.mark.parametrize("cls", list(BACKEND_STRATEGIES), ids=lambda c: c.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_backend_round_trip(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(BACKEND_STRATEGIES[cls])
    payload = _split_frame(message.encode(), cls.type_byte)
    assert decode_backend(cls.type_byte[0], payload) == message
    assert cls.decode(payload) == message


def test_parameter_counts_are_unsigned() -> None:
    # The server reads these counts as uint16 (up to 65535 parameters, libpq's limit).
    params = tuple(b"%d" % i for i in range(40_000))
    bind = fe.Bind("", "s", (0,) * 40_000, params, (1,))
    assert fe.Bind.decode(_split_frame(bind.encode(), b"B")) == bind
    parse = fe.Parse("s", "INSERT ...", (23,) * 40_000)
    assert fe.Parse.decode(_split_frame(parse.encode(), b"P")) == parse
    description = be.ParameterDescription((2**32 - 1,) * 65_535)
    decoded = be.ParameterDescription.decode(_split_frame(description.encode(), b"t"))
    assert decoded == description


# ------------------------------------------------------------------ documented bytes

FRONTEND_KNOWN: list[tuple[bytes, Any]] = [
    (b"Q\x00\x00\x00\x0eSELECT 1;\x00", fe.Query("SELECT 1;")),
    (b"Q\x00\x00\x00\x05\x00", fe.Query("")),
    (
        b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
        fe.Parse("s1", "SELECT $1", (23,)),
    ),
    (
        b"P\x00\x00\x00\x15\x00SELECT $1\x00\x00\x01\xff\xff\xff\xff",
        fe.Parse("", "SELECT $1", (2**32 - 1,)),
    ),
    (b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00", fe.Parse("", "SELECT 1")),
    (
        b"B\x00\x00\x00\x16\x00s1\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00",
        fe.Bind("", "s1", (0,), (b"42",), ()),
    ),
    (
        b"B\x00\x00\x00\x13p\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x01\x00\x01",
        fe.Bind("p", "", (), (None,), (1,)),
    ),
    (b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00", fe.Execute("", 0)),
    (b"E\x00\x00\x00\x0bc1\x00\x00\x00\x00d", fe.Execute("c1", 100)),
    (b"D\x00\x00\x00\x08Ss1\x00", fe.Describe("S", "s1")),
    (b"D\x00\x00\x00\x06P\x00", fe.Describe("P", "")),
    (b"C\x00\x00\x00\x08Pc1\x00", fe.Close("P", "c1")),
    (b"C\x00\x00\x00\x08Ss1\x00", fe.Close("S", "s1")),
    (b"S\x00\x00\x00\x04", fe.Sync()),
    (b"H\x00\x00\x00\x04", fe.Flush()),
    (b"X\x00\x00\x00\x04", fe.Terminate()),
    (b"d\x00\x00\x00\x0a1\tone\n", fe.CopyData(b"1\tone\n")),
    (b"c\x00\x00\x00\x04", fe.CopyDone()),
    (b"f\x00\x00\x00\x08bad\x00", fe.CopyFail("bad")),
    (
        b"F\x00\x00\x00\x18\x00\x00\x00\x10\x00\x01\x00\x01\x00\x01\x00\x00\x00\x04"
        b"\x00\x00\x00\x07\x00\x01",
        fe.FunctionCall(16, (1,), (b"\x00\x00\x00\x07",), 1),
    ),
    (b"p\x00\x00\x00\x0bsecret\x00", fe.AuthenticationResponse(b"secret\x00")),
]

BACKEND_KNOWN: list[tuple[bytes, Any]] = [
    (b"R\x00\x00\x00\x08\x00\x00\x00\x00", be.Authentication(be.AUTH_OK)),
    (b"R\x00\x00\x00\x08\x00\x00\x00\x03", be.Authentication(be.AUTH_CLEARTEXT)),
    (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
        be.Authentication(be.AUTH_MD5, b"\x01\x02\x03\x04"),
    ),
    (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
        be.Authentication(be.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"),
    ),
    (b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x", be.Authentication(be.AUTH_SASL_FINAL, b"v=x")),
    (
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x0a\x0b\x0c\x0d",
        be.BackendKeyData(1234, b"\x0a\x0b\x0c\x0d"),
    ),
    (
        b"K\x00\x00\x00\x28\x00\x00\x04\xd2" + bytes(range(32)),
        be.BackendKeyData(1234, bytes(range(32))),
    ),
    (
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
        be.ParameterStatus("client_encoding", "UTF8"),
    ),
    (b"Z\x00\x00\x00\x05I", be.ReadyForQuery("I")),
    (b"Z\x00\x00\x00\x05T", be.ReadyForQuery("T")),
    (b"Z\x00\x00\x00\x05E", be.ReadyForQuery("E")),
    (
        b"T\x00\x00\x00!\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04"
        b"\xff\xff\xff\xff\x00\x00",
        be.RowDescription((be.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
    ),
    (b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011", be.DataRow((b"1",))),
    (b"D\x00\x00\x00\x0e\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00", be.DataRow((None, b""))),
    (b"C\x00\x00\x00\rSELECT 1\x00", be.CommandComplete("SELECT 1")),
    (b"C\x00\x00\x00\x0fINSERT 0 5\x00", be.CommandComplete("INSERT 0 5")),
    (b"I\x00\x00\x00\x04", be.EmptyQueryResponse()),
    (
        b"E\x00\x00\x00(SERROR\x00VERROR\x00C42601\x00Msyntax error\x00\x00",
        be.ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42601"), ("M", "syntax error"))),
    ),
    (
        b"N\x00\x00\x00\x14SNOTICE\x00Mhello\x00\x00",
        be.NoticeResponse((("S", "NOTICE"), ("M", "hello"))),
    ),
    (b"1\x00\x00\x00\x04", be.ParseComplete()),
    (b"2\x00\x00\x00\x04", be.BindComplete()),
    (b"3\x00\x00\x00\x04", be.CloseComplete()),
    (b"n\x00\x00\x00\x04", be.NoData()),
    (b"s\x00\x00\x00\x04", be.PortalSuspended()),
    (b"c\x00\x00\x00\x04", be.CopyDone()),
    (b"d\x00\x00\x00\x07abc", be.CopyData(b"abc")),
    (b"G\x00\x00\x00\x09\x00\x00\x01\x00\x00", be.CopyInResponse(0, (0,))),
    (b"H\x00\x00\x00\x0b\x01\x00\x02\x00\x01\x00\x01", be.CopyOutResponse(1, (1, 1))),
    (b"W\x00\x00\x00\x07\x00\x00\x00", be.CopyBothResponse(0, ())),
    (
        b"V\x00\x00\x00\x0c\x00\x00\x00\x04\x00\x00\x00\x01",
        be.FunctionCallResponse(b"\x00\x00\x00\x01"),
    ),
    (b"V\x00\x00\x00\x08\xff\xff\xff\xff", be.FunctionCallResponse(None)),
    (
        b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00",
        be.NegotiateProtocolVersion(0, ("_pq_.foo",)),
    ),
    (
        b"A\x00\x00\x00\x10\x00\x00\x10\xe1chan\x00hi\x00",
        be.NotificationResponse(4321, "chan", "hi"),
    ),
    (
        b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
        be.ParameterDescription((23, 25)),
    ),
]


@pytest.mark.parametrize(("raw", "message"), FRONTEND_KNOWN, ids=lambda v: repr(v)[:40])
def test_frontend_known_bytes(raw: bytes, message: Any) -> None:
    payload = _split_frame(raw, type(message).type_byte)
    assert decode_frontend(raw[0], payload) == message
    assert message.encode() == raw


def test_sasl_initial_response_known_bytes() -> None:
    raw = b"p\x00\x00\x00!SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc"
    message = fe.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert fe.SASLInitialResponse.decode(_split_frame(raw, b"p")) == message
    assert message.encode() == raw
    without_data = b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xff"
    assert fe.SASLInitialResponse.decode(without_data[5:]) == fe.SASLInitialResponse(
        "SCRAM-SHA-256", None
    )


@pytest.mark.parametrize(("raw", "message"), BACKEND_KNOWN, ids=lambda v: repr(v)[:40])
def test_backend_known_bytes(raw: bytes, message: Any) -> None:
    payload = _split_frame(raw, type(message).type_byte)
    assert decode_backend(raw[0], payload) == message
    assert message.encode() == raw


def test_authentication_sasl_mechanisms() -> None:
    sasl = be.Authentication.decode(b"\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00")
    assert sasl.sasl_mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert be.Authentication(be.AUTH_MD5, b"salt").sasl_mechanisms == ()


def test_error_fields() -> None:
    err = be.ErrorResponse.decode(b"SERREUR\x00VERROR\x00C42601\x00Msyntax error\x00\x00")
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "42601", "syntax error")
    assert err.field("D") is None
    old_server = be.NoticeResponse.decode(b"SNOTICE\x00Mhello\x00\x00")  # no V before 9.6
    assert (old_server.severity, old_server.sqlstate) == ("NOTICE", None)


def test_error_response_helper_matches_the_server_layout() -> None:
    assert error_response("FATAL", "08P01", "bad") == (
        b"E\x00\x00\x00\x1fSFATAL\x00VFATAL\x00C08P01\x00Mbad\x00\x00"
    )
    with_detail = be.ErrorResponse.decode(error_response("ERROR", "XX000", "m", "d")[5:])
    assert with_detail.fields[-1] == ("D", "d")


def test_bind_names_reads_only_the_names() -> None:
    raw = FRONTEND_KNOWN[5][0]
    assert bind_names(raw[5:]) == ("", "s1")
    assert bind_names(b"portal\x00stmt\x00\xff\xff") == ("portal", "stmt")
    for bad in (b"", b"portal", b"portal\x00stmt"):
        with pytest.raises(ProtocolViolation):
            bind_names(bad)


def test_authentication_response_repr_hides_the_secret() -> None:
    assert "secret" not in repr(fe.AuthenticationResponse(b"secret\x00"))


def test_encoding_a_nul_inside_a_string_is_our_bug() -> None:
    with pytest.raises(ValueError):
        fe.Query("SELECT 1\x00; DROP TABLE t").encode()


# ------------------------------------------------------------------ malformed payloads

Decoder = Callable[[bytes], Any]

MALFORMED: list[tuple[Decoder, bytes]] = [
    # truncated
    (fe.Parse.decode, b"s1\x00SELECT 1\x00\x00"),
    (fe.Parse.decode, b"s1\x00SELECT 1\x00\x00\x01\x00\x00"),
    (fe.Bind.decode, b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),
    (fe.Bind.decode, b"\x00s1\x00\x00\x00\xff\xff"),
    (fe.Execute.decode, b"\x00\x00\x00"),
    (fe.Describe.decode, b""),
    (fe.FunctionCall.decode, b"\x00\x00\x00\x10\x00\x00\x00\x00\x00"),
    (fe.SASLInitialResponse.decode, b"SCRAM-SHA-256\x00\x00\x00\x00\x05ab"),
    (be.Authentication.decode, b"\x00\x00"),
    (be.BackendKeyData.decode, b"\x00\x00"),
    (be.DataRow.decode, b"\x00\x01\x00\x00\x00\x05ab"),
    (be.DataRow.decode, b"\x00"),
    (be.RowDescription.decode, b"\x00\x01a\x00\x00\x00\x00\x00\x00\x00"),
    (be.CopyInResponse.decode, b"\x00\x00\x01"),
    (be.CopyOutResponse.decode, b""),
    (be.NotificationResponse.decode, b"\x00\x00\x10"),
    (be.ParameterDescription.decode, b"\x00\x02\x00\x00\x00\x17"),
    (be.NegotiateProtocolVersion.decode, b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),
    (be.FunctionCallResponse.decode, b"\x00\x00\x00\x04\x00"),
    # string without its NUL terminator
    (fe.Query.decode, b"SELECT 1"),
    (fe.Query.decode, b""),
    (fe.Parse.decode, b"s1\x00SELECT 1"),
    (fe.Execute.decode, b"portal"),
    (fe.Describe.decode, b"Ss1"),
    (fe.Close.decode, b"P"),
    (fe.CopyFail.decode, b"oops"),
    (be.CommandComplete.decode, b"SELECT 1"),
    (be.ParameterStatus.decode, b"a\x00b"),
    (be.ErrorResponse.decode, b"SERROR"),
    (be.ErrorResponse.decode, b"SERROR\x00"),  # fields without the final terminator
    (be.NoticeResponse.decode, b""),
    # trailing bytes
    (fe.Query.decode, b"SELECT 1\x00x"),
    (fe.Parse.decode, b"\x00SELECT 1\x00\x00\x00\x00"),
    (fe.Bind.decode, b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
    (fe.Execute.decode, b"\x00\x00\x00\x00\x00\x00"),
    (fe.Describe.decode, b"Ss1\x00\x00"),
    (fe.Sync.decode, b"\x00"),
    (fe.Flush.decode, b"x"),
    (fe.Terminate.decode, b"x"),
    (fe.CopyDone.decode, b"x"),
    (fe.CopyFail.decode, b"oops\x00\x00"),
    (be.CommandComplete.decode, b"SELECT 1\x00\x00"),
    (be.ParseComplete.decode, b"\x00"),
    (be.BindComplete.decode, b"\x00"),
    (be.CloseComplete.decode, b"\x00"),
    (be.NoData.decode, b"\x00"),
    (be.PortalSuspended.decode, b"\x00"),
    (be.EmptyQueryResponse.decode, b"\x00"),
    (be.CopyDone.decode, b"\x00"),
    (be.DataRow.decode, b"\x00\x00\x00"),
    (be.ErrorResponse.decode, b"SERROR\x00\x00\x00"),
    (be.CopyBothResponse.decode, b"\x00\x00\x00\x00"),
    # bad ReadyForQuery status
    (be.ReadyForQuery.decode, b""),
    (be.ReadyForQuery.decode, b"X"),
    (be.ReadyForQuery.decode, b"i"),
    (be.ReadyForQuery.decode, b"II"),
    (be.ReadyForQuery.decode, b"\x00"),
    # negative counts and lengths
    (fe.Bind.decode, b"\x00\x00\x00\x00\x00\x00\xff\xff"),  # result-format count
    (fe.Bind.decode, b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # value length -2
    (fe.FunctionCall.decode, b"\x00\x00\x00\x10\xff\xff"),
    (fe.FunctionCall.decode, b"\x00\x00\x00\x10\x00\x00\x80\x00"),
    (fe.SASLInitialResponse.decode, b"SCRAM-SHA-256\x00\xff\xff\xff\xfe"),
    (be.DataRow.decode, b"\xff\xff"),
    (be.DataRow.decode, b"\x00\x01\xff\xff\xff\xfe"),
    (be.RowDescription.decode, b"\x80\x00"),
    (be.CopyInResponse.decode, b"\x00\xff\xff"),
    (be.CopyOutResponse.decode, b"\x01\x80\x00"),
    (be.NegotiateProtocolVersion.decode, b"\x00\x00\x00\x00\xff\xff\xff\xff"),
    (be.FunctionCallResponse.decode, b"\xff\xff\xff\xfe"),
    # values out of their domain
    (fe.Describe.decode, b"X\x00"),
    (fe.Close.decode, b"Q\x00"),
    (be.BackendKeyData.decode, b"\x00\x00\x04\xd2\x01\x02\x03"),
    (be.BackendKeyData.decode, b"\x00\x00\x04\xd2" + bytes(257)),
]


@pytest.mark.parametrize(
    ("decode", "payload"),
    MALFORMED,
    ids=[f"{d.__qualname__.split('.')[0]}-{p!r}"[:60] for d, p in MALFORMED],
)
def test_malformed_payload_is_a_protocol_violation(decode: Decoder, payload: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode(payload)
    assert info.value.sqlstate == "08P01"
    assert info.value.message


@pytest.mark.parametrize("type_byte", [b"A", b"Z", b"T", b"\x00", b"1"])
def test_unknown_frontend_type(type_byte: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_frontend(type_byte[0], b"")


@pytest.mark.parametrize("type_byte", [b"Q", b"P", b"B", b"X", b"\x00", b"p"])
def test_unknown_backend_type(type_byte: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_backend(type_byte[0], b"")


@settings(max_examples=200, deadline=None)
@given(
    type_byte=st.sampled_from(sorted(fe.FRONTEND_TYPE_BYTES | be.BACKEND_TYPE_BYTES)),
    payload=st.binary(max_size=64),
)
def test_arbitrary_payload_decodes_or_is_a_violation(type_byte: int, payload: bytes) -> None:
    # Whatever the peer sends, decoding either succeeds or raises ProtocolViolation: no crash.
    for decode, types in (
        (decode_frontend, fe.FRONTEND_TYPE_BYTES),
        (decode_backend, be.BACKEND_TYPE_BYTES),
    ):
        if type_byte not in types:
            continue
        try:
            decoded = decode(type_byte, payload)
        except ProtocolViolation:
            continue
        assert type(decoded).type_byte[0] == type_byte
