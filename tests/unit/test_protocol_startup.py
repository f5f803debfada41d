"""Startup-phase packets: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, direct TLS."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import (
    CancelRequest,
    DirectTLS,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    StartupReader,
    parse_startup_packet,
)
from proxy.protocol.startup import PROTOCOL_3_0, PROTOCOL_3_2, StartupPacket

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # 8, 1234 << 16 | 5679
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"  # 8, 1234 << 16 | 5680
CANCEL_4 = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef"  # pid 12345
STARTUP_MINIMAL = b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"

# 3.0, with parameters PostgreSQL knows but a proxy must pass through in order
STARTUP_30_BODY = (
    b"user\x00alice\x00"
    b"database\x00sales\x00"
    b"options\x00-c geqo=off\x00"
    b"extra_float_digits\x002\x00"
    b"replication\x00database\x00"
    b"_pq_.custom\x00x\x00"
    b"\x00"
)
STARTUP_30 = struct.pack("!II", 8 + len(STARTUP_30_BODY), 0x00030000) + STARTUP_30_BODY
STARTUP_32_BODY = b"application_name\x00app\x00user\x00bob\x00options\x00\x00\x00"
STARTUP_32 = struct.pack("!II", 8 + len(STARTUP_32_BODY), 0x00030002) + STARTUP_32_BODY
# the first bytes of a TLS 1.3 ClientHello record
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


def _cancel(pid: int, key: bytes) -> bytes:
    return struct.pack("!IIi", 12 + len(key), 80877102, pid) + key


# ------------------------------------------------------------------ parse_startup_packet

KNOWN: list[tuple[bytes, StartupPacket]] = [
    (SSL_REQUEST, SSLRequest()),
    (GSSENC_REQUEST, GSSENCRequest()),
    (CANCEL_4, CancelRequest(12345, b"\xde\xad\xbe\xef")),
    (STARTUP_MINIMAL, StartupMessage(PROTOCOL_3_0, {"user": "u"})),
    (b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", StartupMessage(PROTOCOL_3_0, {})),
]


@pytest.mark.parametrize(("raw", "packet"), KNOWN, ids=lambda v: repr(v)[:40])
def test_known_packets(raw: bytes, packet: StartupPacket) -> None:
    assert parse_startup_packet(raw) == packet
    assert packet.encode() == raw


@pytest.mark.parametrize("key_size", [4, 32, 256])
def test_cancel_request_key_sizes(key_size: int) -> None:
    # 4 bytes in protocol 3.0; protocol 3.2 allows secret keys of up to 256 bytes
    key = bytes(range(key_size))
    raw = _cancel(-7, key)
    packet = parse_startup_packet(raw)
    assert packet == CancelRequest(-7, key)
    assert CancelRequest(-7, key).encode() == raw
    reader = StartupReader()
    assert reader.receive_data(raw) == packet
    assert reader.last_packet == raw


@pytest.mark.parametrize("key_size", [0, 3, 257])
def test_cancel_request_bad_key_size(key_size: int) -> None:
    with pytest.raises(ProtocolViolation):
        parse_startup_packet(_cancel(1, bytes(key_size)))


@pytest.mark.parametrize(
    ("raw", "protocol", "parameters"),
    [
        (
            STARTUP_30,
            PROTOCOL_3_0,
            [
                ("user", "alice"),
                ("database", "sales"),
                ("options", "-c geqo=off"),
                ("extra_float_digits", "2"),
                ("replication", "database"),
                ("_pq_.custom", "x"),
            ],
        ),
        (STARTUP_32, PROTOCOL_3_2, [("application_name", "app"), ("user", "bob"), ("options", "")]),
    ],
    ids=["3.0", "3.2"],
)
def test_startup_message_keeps_every_parameter_in_order(
    raw: bytes, protocol: int, parameters: list[tuple[str, str]]
) -> None:
    packet = parse_startup_packet(raw)
    assert isinstance(packet, StartupMessage)
    assert packet.protocol == protocol
    assert (packet.major, packet.minor) == (3, protocol & 0xFFFF)
    assert list(packet.parameters.items()) == parameters
    assert packet.encode() == raw  # relayed byte for byte


def test_startup_message_user_and_database() -> None:
    with_db = parse_startup_packet(STARTUP_30)
    assert isinstance(with_db, StartupMessage)
    assert (with_db.user, with_db.database) == ("alice", "sales")
    without_db = parse_startup_packet(STARTUP_MINIMAL)
    assert isinstance(without_db, StartupMessage)
    assert (without_db.user, without_db.database) == ("u", "u")  # database defaults to user
    anonymous = StartupMessage()
    assert (anonymous.user, anonymous.database) == (None, None)


def test_startup_parameter_bytes_that_are_not_utf8_survive() -> None:
    raw = STARTUP_MINIMAL[:-3] + b"\xe9\x00\x00"  # user "\xe9" in Latin-1
    raw = struct.pack("!I", len(raw)) + raw[4:]
    packet = parse_startup_packet(raw)
    assert isinstance(packet, StartupMessage)
    assert packet.user == "\udce9"
    assert packet.encode() == raw


MALFORMED = [
    pytest.param(b"\x00\x00\x00\x08\x04\xd2", id="shorter-than-8"),
    pytest.param(b"\x00\x00\x00\x07\x04\xd2\x16\x2f", id="length-mismatch"),
    pytest.param(b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00", id="ssl-request-too-long"),
    pytest.param(b"\x00\x00\x00\x0c\x04\xd2\x16\x30\x00\x00\x00\x00", id="gssenc-too-long"),
    pytest.param(b"\x00\x00\x00\x08\x00\x03\x00\x00", id="no-terminator-at-all"),
    pytest.param(b"\x00\x00\x00\x0f\x00\x03\x00\x00user\x00u\x00", id="no-final-terminator"),
    pytest.param(b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00u", id="value-without-nul"),
    pytest.param(b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00", id="parameter-without-value"),
    pytest.param(b"\x00\x00\x00\x0c\x00\x03\x00\x00\x00u\x00\x00", id="empty-parameter-name"),
    pytest.param(b"\x00\x00\x00\x09\x00\x02\x00\x00\x00", id="protocol-2.0"),
    pytest.param(b"\x00\x00\x00\x09\x00\x04\x00\x00\x00", id="protocol-4.0"),
    pytest.param(b"\x00\x00\x00\x09\x00\x00\x00\x00\x00", id="protocol-0.0"),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_packet(raw: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_startup_packet(raw)


def test_unsupported_major_version_names_it() -> None:
    with pytest.raises(ProtocolViolation, match=r"2\.0"):
        parse_startup_packet(b"\x00\x00\x00\x09\x00\x02\x00\x00\x00")


# ------------------------------------------------------------------ StartupReader

NEGOTIATION = SSL_REQUEST + GSSENC_REQUEST + STARTUP_30
EXPECTED = [SSLRequest(), GSSENCRequest(), parse_startup_packet(STARTUP_30)]


def test_reader_negotiation_in_one_chunk() -> None:
    reader = StartupReader()
    packets = [reader.receive_data(NEGOTIATION)]
    assert reader.last_packet == SSL_REQUEST
    assert reader.remaining == GSSENC_REQUEST + STARTUP_30
    # later packets come out of what is left, without new bytes
    packets.append(reader.receive_data(b""))
    assert reader.last_packet == GSSENC_REQUEST
    packets.append(reader.receive_data(b""))
    assert reader.last_packet == STARTUP_30
    assert packets == EXPECTED
    assert reader.remaining == b""
    assert reader.receive_data(b"") is None


def test_reader_negotiation_byte_by_byte() -> None:
    reader = StartupReader()
    seen: list[tuple[int, StartupPacket]] = []
    for i in range(len(NEGOTIATION)):
        packet = reader.receive_data(NEGOTIATION[i : i + 1])
        if packet is not None:
            seen.append((i, packet))
    ends = [len(SSL_REQUEST) - 1, len(SSL_REQUEST + GSSENC_REQUEST) - 1, len(NEGOTIATION) - 1]
    assert seen == list(zip(ends, EXPECTED, strict=True))
    assert reader.remaining == b""


def test_reader_keeps_bytes_after_the_startup_message() -> None:
    query = b"Q\x00\x00\x00\x0eSELECT 1;\x00"
    reader = StartupReader()
    assert reader.receive_data(STARTUP_MINIMAL + query) == parse_startup_packet(STARTUP_MINIMAL)
    assert reader.take_remaining() == query
    assert reader.remaining == b""


def test_reader_direct_tls() -> None:
    reader = StartupReader()
    assert reader.receive_data(CLIENT_HELLO[:1]) == DirectTLS()
    reader = StartupReader()
    assert reader.receive_data(CLIENT_HELLO) == DirectTLS()
    # the ClientHello is not lost: it is what the TLS layer must read first
    assert reader.take_remaining() == CLIENT_HELLO


def test_reader_direct_tls_after_gssenc_refusal() -> None:
    reader = StartupReader()
    assert reader.receive_data(GSSENC_REQUEST) == GSSENCRequest()
    assert reader.receive_data(CLIENT_HELLO) == DirectTLS()


def test_reader_oversize_length_fails_on_the_header_alone() -> None:
    reader = StartupReader(max_size=10_000)
    # 100 MB declared: refused as soon as the length is readable, nothing waits for the body
    with pytest.raises(ProtocolViolation, match="10000"):
        reader.receive_data(struct.pack("!I", 100_000_000))


def test_reader_oversize_length_split_header() -> None:
    reader = StartupReader(max_size=10_000)
    assert reader.receive_data(b"\x00\x00") is None
    with pytest.raises(ProtocolViolation):
        reader.receive_data(b"\x27\x11" + bytes(100))  # 10001


def test_reader_accepts_exactly_max_size() -> None:
    body = b"user\x00u\x00options\x00" + b"x" * (100 - 8 - 16 - 1) + b"\x00\x00"
    raw = struct.pack("!II", 8 + len(body), PROTOCOL_3_0) + body
    assert len(raw) == 100
    assert isinstance(StartupReader(max_size=100).receive_data(raw), StartupMessage)
    with pytest.raises(ProtocolViolation):
        StartupReader(max_size=99).receive_data(raw)


@pytest.mark.parametrize("length", [0, 4, 7])
def test_reader_length_below_8(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        StartupReader().receive_data(struct.pack("!I", length) + bytes(8))


def test_reader_waits_for_a_complete_packet() -> None:
    reader = StartupReader()
    assert reader.receive_data(b"") is None
    assert reader.receive_data(STARTUP_30[:3]) is None
    assert reader.receive_data(STARTUP_30[3:-1]) is None
    assert reader.remaining == STARTUP_30[:-1]
    assert reader.receive_data(STARTUP_30[-1:]) == EXPECTED[2]


def test_reader_packet_without_terminator() -> None:
    raw = b"\x00\x00\x00\x0f\x00\x03\x00\x00user\x00u\x00"
    with pytest.raises(ProtocolViolation):
        StartupReader().receive_data(raw)


def test_reader_unsupported_major_version() -> None:
    with pytest.raises(ProtocolViolation, match="unsupported frontend protocol"):
        StartupReader().receive_data(b"\x00\x00\x00\x09\x00\x02\x00\x00\x00")
