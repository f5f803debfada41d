"""FrameScanner: message boundaries in a byte stream, under size limits, without buffering."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import (
    BACKEND_TYPE_BYTES,
    CLIENT_INTERESTING,
    FRONTEND_TYPE_BYTES,
    SERVER_INTERESTING,
    FrameScanner,
    ProtocolViolation,
)

Frame = tuple[int, bytes | None]


def msg(type_byte: bytes, payload: bytes = b"") -> bytes:
    return type_byte + struct.pack("!I", len(payload) + 4) + payload


def scan(scanner: FrameScanner, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(scanner.receive_data(chunk))
    return [(t, None if p is None else bytes(p)) for t, p in out]


def frontend(interesting: frozenset[int] = CLIENT_INTERESTING, **limits: int) -> FrameScanner:
    return FrameScanner(interesting, FRONTEND_TYPE_BYTES, direction="frontend", **limits)


def backend(interesting: frozenset[int] = SERVER_INTERESTING, **limits: int) -> FrameScanner:
    return FrameScanner(interesting, BACKEND_TYPE_BYTES, direction="backend", **limits)


Q = ord("Q")
ROW_DESCRIPTION = (
    b"T\x00\x00\x00\x1a\x00\x01n\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
)
EXTENDED = (
    b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00"
    + b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"
    + b"D\x00\x00\x00\x06P\x00"
    + b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    + b"S\x00\x00\x00\x04"
)

TABLE: list[tuple[str, bool, bytes, frozenset[int], list[Frame]]] = [
    ("empty stream", True, b"", CLIENT_INTERESTING, []),
    (
        "query then terminate",
        True,
        b"Q\x00\x00\x00\x0eSELECT 1;\x00X\x00\x00\x00\x04",
        CLIENT_INTERESTING,
        [(Q, b"SELECT 1;\x00"), (ord("X"), b"")],
    ),
    (
        "only what is interesting",
        True,
        b"Q\x00\x00\x00\x0eSELECT 1;\x00X\x00\x00\x00\x04",
        frozenset(b"X"),
        [(ord("X"), b"")],
    ),
    ("nothing interesting", True, EXTENDED, frozenset(), []),
    (
        "extended query, Describe skipped",
        True,
        EXTENDED,
        CLIENT_INTERESTING,
        [
            (ord("P"), b"\x00SELECT 1\x00\x00\x00"),
            (ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00"),
            (ord("E"), b"\x00\x00\x00\x00\x00"),
            (ord("S"), b""),
        ],
    ),
    (
        "copy data skipped, its end kept",
        True,
        msg(b"d", b"1\tone\n") * 3 + b"c\x00\x00\x00\x04",
        CLIENT_INTERESTING,
        [(ord("c"), b"")],
    ),
    (
        "result set: rows skipped, tag and status kept",
        False,
        ROW_DESCRIPTION
        + b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011" * 3
        + b"C\x00\x00\x00\rSELECT 3\x00"
        + b"Z\x00\x00\x00\x05I",
        SERVER_INTERESTING,
        [(ord("C"), b"SELECT 3\x00"), (ord("Z"), b"I")],
    ),
    (
        "startup answer",
        False,
        b"R\x00\x00\x00\x08\x00\x00\x00\x00"
        + b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
        + b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x0a\x0b\x0c\x0d"
        + b"N\x00\x00\x00\x14SNOTICE\x00Mhello\x00\x00"
        + b"Z\x00\x00\x00\x05I",
        SERVER_INTERESTING,
        [
            (ord("R"), b"\x00\x00\x00\x00"),
            (ord("S"), b"client_encoding\x00UTF8\x00"),
            (ord("K"), b"\x00\x00\x04\xd2\x0a\x0b\x0c\x0d"),
            (ord("Z"), b"I"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("from_client", "stream", "interesting", "frames"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
@pytest.mark.parametrize("split", ["one chunk", "byte by byte"])
def test_frames_table(
    from_client: bool,
    stream: bytes,
    interesting: frozenset[int],
    frames: list[Frame],
    split: str,
) -> None:
    scanner = frontend(interesting) if from_client else backend(interesting)
    chunks = [stream] if split == "one chunk" else [stream[i : i + 1] for i in range(len(stream))]
    assert scan(scanner, chunks) == frames
    assert scanner.at_boundary


def test_table_streams_are_well_formed() -> None:
    # every literal stream above is a sequence of whole messages of valid types
    for _, from_client, stream, _, _ in TABLE:
        everything = FRONTEND_TYPE_BYTES if from_client else BACKEND_TYPE_BYTES
        scanner = frontend(everything) if from_client else backend(everything)
        frames = scan(scanner, [stream])
        assert scanner.at_boundary
        assert sum(5 + len(p or b"") for _, p in frames) == len(stream)


def test_partial_message_is_not_at_boundary() -> None:
    for cut in (1, 4, 5, 9):
        scanner = frontend()
        assert scanner.receive_data(b"Q\x00\x00\x00\x0eSELECT 1;\x00"[:cut]) == []
        assert not scanner.at_boundary


# ------------------------------------------------------------------ chunking does not matter

_messages = st.lists(
    st.tuples(st.sampled_from(sorted(FRONTEND_TYPE_BYTES)), st.binary(max_size=300)),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(
    messages=_messages,
    interesting=st.frozensets(st.sampled_from(sorted(FRONTEND_TYPE_BYTES))),
    max_read_size=st.sampled_from([4, 16, 100, 64 << 20]),
    data=st.data(),
)
def test_any_chunking_gives_the_frames_of_one_chunk(
    messages: list[tuple[int, bytes]],
    interesting: frozenset[int],
    max_read_size: int,
    data: st.DataObject,
) -> None:
    stream = b"".join(msg(bytes((t,)), p) for t, p in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]

    whole = scan(frontend(interesting, max_read_size=max_read_size), [stream])
    scanner = frontend(interesting, max_read_size=max_read_size)
    assert scan(scanner, chunks) == whole
    assert scanner.at_boundary
    expected = [
        (t, p if len(p) + 4 <= max_read_size else None) for t, p in messages if t in interesting
    ]
    assert whole == expected


# ------------------------------------------------------------------ big messages

MB = 1 << 20


def test_uninteresting_huge_message_is_skipped_without_buffering() -> None:
    scanner = frontend()
    size = 100 * MB
    chunk = bytes(MB)
    tracemalloc.start()
    try:
        assert scanner.receive_data(b"d" + struct.pack("!I", size + 4)) == []
        for _ in range(size // MB - 1):
            assert scanner.receive_data(chunk) == []
            assert scanner._body is None and scanner._hdr == b""
            assert not scanner.at_boundary
        assert scanner.receive_data(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # only bookkeeping, none of the 100 MB
    assert scanner.at_boundary
    assert scanner.receive_data(b"S\x00\x00\x00\x04") == [(ord("S"), b"")]


def test_huge_message_header_split_and_body_in_the_same_chunk() -> None:
    scanner = frontend()
    header = b"d" + struct.pack("!I", 10 * MB + 4)
    assert scanner.receive_data(header[:3]) == []
    assert scanner.receive_data(header[3:] + bytes(MB)) == []
    assert scanner._body is None and len(scanner._hdr) == 0
    rest = bytes(9 * MB) + b"Q\x00\x00\x00\x05\x00"
    assert scanner.receive_data(rest) == [(Q, b"\x00")]


def test_interesting_message_over_max_read_size_across_chunks() -> None:
    scanner = frontend(max_read_size=1024)
    header = b"Q" + struct.pack("!I", 100 * MB + 4)
    # reported at once as seen but unread; its body is then only counted
    assert scanner.receive_data(header + b"SELECT ") == [(Q, None)]
    for _ in range(99):
        assert scanner.receive_data(bytes(MB)) == []
        assert scanner._body is None
    assert scanner.receive_data(bytes(MB - 7) + b"S\x00\x00\x00\x04") == [(ord("S"), b"")]
    assert scanner.at_boundary


def test_interesting_message_over_max_read_size_in_one_chunk() -> None:
    scanner = frontend(max_read_size=20)
    stream = msg(b"Q", b"x" * 16) + msg(b"Q", b"y" * 17) + msg(b"S")
    assert scanner.receive_data(stream) == [(Q, b"x" * 16), (Q, None), (ord("S"), b"")]


@pytest.mark.parametrize("split", [0, 1, 5, 6])
def test_max_read_size_boundary_is_the_same_however_split(split: int) -> None:
    # the limit counts the length field, as the length prefix does
    for body, expected in ((b"x" * 96, b"x" * 96), (b"x" * 97, None)):
        stream = msg(b"Q", body)
        scanner = frontend(max_read_size=100)
        chunks = [stream[:split], stream[split:]] if split else [stream]
        assert scan(scanner, chunks) == [(Q, expected)]


# ------------------------------------------------------------------ violations

VIOLATIONS = [
    pytest.param(b"\x00\x00\x00\x00\x04", id="type-zero"),
    pytest.param(b"Z\x00\x00\x00\x05I", id="backend-type-from-client"),
    pytest.param(b"q\x00\x00\x00\x04", id="unknown-letter"),
    pytest.param(b"Q\x00\x00\x00\x00", id="length-0"),
    pytest.param(b"Q\x00\x00\x00\x03", id="length-3"),
    pytest.param(b"Q\x00\x10\x00\x01", id="over-max-message-size"),
    pytest.param(b"Q\x80\x00\x00\x00", id="2-GiB"),
    pytest.param(b"d\xff\xff\xff\xff", id="4-GiB"),
    pytest.param(b"S\x00\x00\x00\x04Q\x00\x00\x00\x02", id="after-a-good-message"),
]


@pytest.mark.parametrize("stream", VIOLATIONS)
@pytest.mark.parametrize("split", ["one chunk", "byte by byte"])
def test_protocol_violations(stream: bytes, split: str) -> None:
    scanner = frontend(max_message_size=MB)
    chunks = [stream] if split == "one chunk" else [stream[i : i + 1] for i in range(len(stream))]
    with pytest.raises(ProtocolViolation) as info:
        for chunk in chunks:
            scanner.receive_data(chunk)
    assert info.value.sqlstate == "08P01"


def test_max_message_size_is_inclusive() -> None:
    scanner = frontend(max_message_size=100)
    assert scanner.receive_data(msg(b"Q", b"x" * 96)) == [(Q, b"x" * 96)]
    with pytest.raises(ProtocolViolation, match="over the limit of 100"):
        scanner.receive_data(msg(b"Q", b"x" * 97))


def test_default_limit_refuses_a_2_gib_length_prefix() -> None:
    with pytest.raises(ProtocolViolation):
        backend().receive_data(b"D\x80\x00\x00\x00" + bytes(100))


def test_2_gib_message_is_skipped_when_the_limit_allows_it() -> None:
    scanner = backend(max_message_size=2**32 - 1)
    assert scanner.receive_data(b"D\x80\x00\x00\x00" + bytes(MB)) == []
    assert scanner._skip == 2**31 - 4 - MB
    assert scanner._body is None
    assert not scanner.at_boundary


def test_violation_names_the_direction() -> None:
    with pytest.raises(ProtocolViolation, match="backend"):
        backend().receive_data(b"Q\x00\x00\x00\x04")
