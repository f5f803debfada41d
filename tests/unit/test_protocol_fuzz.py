"""Fuzz of the sans-IO codec with mutated captures of real client traffic (issue 13).

The shipped psql session (tests/data/psql_session.capture) is replayed chunk by chunk, in the
order it was captured, through what the proxy runs per session: a StartupReader for the opening
packets, then a frontend FrameScanner for the client's bytes and a backend FrameScanner for the
server's, both feeding one SessionTracker. Hypothesis mutates the chunks (bit flips,
truncations, wrong and oversized lengths, invalid UTF-8, inserted and repeated bytes) and cuts
them at random places. The only exception allowed is ProtocolViolation (the proxy answers it
with 08P01 and closes); the buffers the codec keeps stay within its configured limits.
"""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import (
    BACKEND_TYPE_BYTES,
    CLIENT_INTERESTING,
    FRONTEND_TYPE_BYTES,
    SERVER_INTERESTING,
    FrameScanner,
    ProtocolViolation,
    SessionTracker,
    StartupMessage,
    StartupReader,
)
from tests.capture import Capture

CAPTURE = Capture.load(
    (Path(__file__).parent.parent / "data" / "psql_session.capture").read_bytes()
)
CHUNKS = CAPTURE.chunks
MAX_MESSAGE = 1 << 16  # small limits, so oversized lengths are reachable
MAX_READ = 4096
MAX_STARTUP = 10_000
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ mutations


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One mutation of `data` (never empty: an empty chunk is no event on a socket)."""
    n = len(data)
    kind = draw(
        st.sampled_from(
            ["flip", "truncate", "length", "huge_length", "utf8", "insert", "repeat", "splice"]
        )
    )
    if kind == "flip":
        pos = draw(st.integers(0, n - 1))
        bit = draw(st.integers(0, 7))
        out = data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :]
    elif kind == "truncate":
        out = data[: draw(st.integers(1, n))]
    elif kind in ("length", "huge_length") and n >= 5:
        # overwrite a 4-byte big-endian field at a message header (offset 1) or anywhere
        pos = draw(st.sampled_from([0, 1, draw(st.integers(0, n - 4))]))
        value = (
            draw(st.integers(0, 2**32 - 1)) if kind == "huge_length" else draw(st.integers(0, 64))
        )
        out = data[:pos] + struct.pack("!I", value) + data[pos + 4 :]
    elif kind == "utf8":
        pos = draw(st.integers(0, n))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        out = data[:pos] + bad + data[pos:]
    elif kind == "insert":
        pos = draw(st.integers(0, n))
        out = data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos:]
    elif kind == "repeat":
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, n))
        out = data[:b] + data[a:b] + data[b:]
    else:  # splice in a chunk of the other direction (a message of the wrong kind)
        other = draw(st.sampled_from([d for _, d in CHUNKS]))
        out = data + other[: draw(st.integers(1, len(other)))]
    return out or data


@st.composite
def mutated_session(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """The capture with a few chunks mutated, and every chunk cut into random pieces."""
    chunks = list(CHUNKS)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chunks) - 1))
        k, d = chunks[i]
        chunks[i] = (k, draw(mutation(d)))
    out: list[tuple[str, bytes]] = []
    for k, d in chunks:
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(d) - 1)), max_size=3)))
        pos = 0
        for c in [*cuts, len(d)]:
            if c > pos:
                out.append((k, d[pos:c]))
                pos = c
    return out


# ------------------------------------------------------------------ the session, as in the proxy


class Session:
    def __init__(self) -> None:
        self.reader: StartupReader | None = StartupReader(MAX_STARTUP)
        self.front = FrameScanner(
            CLIENT_INTERESTING, FRONTEND_TYPE_BYTES, MAX_MESSAGE, "frontend", MAX_READ
        )
        self.back = FrameScanner(
            SERVER_INTERESTING, BACKEND_TYPE_BYTES, MAX_MESSAGE, "backend", MAX_READ
        )
        self.tracker = SessionTracker()
        self.ssl_answer_pending = False
        self.now = 0.0

    def client(self, data: bytes) -> None:
        self.now += 0.001
        if self.reader is not None:
            packet = self.reader.receive_data(data)
            while packet is not None:
                if isinstance(packet, StartupMessage):
                    rest = self.reader.take_remaining()
                    self.reader = None
                    if rest:
                        self.client(rest)
                    return
                self.ssl_answer_pending = True  # the server answers 'N' with one byte
                packet = self.reader.receive_data(b"")
            return
        frames = self.front.receive_data(data)
        self.tracker.client_frames(frames, self.now)
        self.tracker.take_finished()

    def server(self, data: bytes) -> None:
        self.now += 0.001
        if self.ssl_answer_pending and data[:1] in (b"N", b"S"):
            self.ssl_answer_pending = False
            data = data[1:]
            if not data:
                return
        self.tracker.server_frames(self.back.receive_data(data), self.now)

    def check_bounds(self) -> None:
        for scanner in (self.front, self.back):
            assert len(scanner._hdr) < 5
            assert scanner._body is None or len(scanner._body) <= MAX_READ
            assert scanner._skip <= MAX_MESSAGE
        if self.reader is not None:
            assert len(self.reader.remaining) <= MAX_STARTUP + max(len(d) for _, d in CHUNKS) * 2
        t = self.tracker
        assert len(t.statements) <= t.max_statements
        assert len(t.pending) <= 10_000


def replay(chunks: list[tuple[str, bytes]]) -> Session:
    s = Session()
    for direction, data in chunks:
        try:
            s.client(data) if direction == "F" else s.server(data)
        except ProtocolViolation:
            s.check_bounds()
            return s  # the proxy closes this session here
        s.check_bounds()
    return s


def test_unmutated_capture_replays_cleanly() -> None:
    s = replay(CHUNKS)
    assert s.reader is None and s.tracker.backend_pid is not None
    assert s.front.at_boundary and s.back.at_boundary


@FUZZ
@given(mutated_session())
def test_mutated_capture_only_protocol_violations(chunks: list[tuple[str, bytes]]) -> None:
    replay(chunks)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=8))
def test_random_bytes_after_startup(chunks: list[bytes]) -> None:
    """Arbitrary client and server bytes once the session is up."""
    s = replay(CHUNKS[:6])
    for i, data in enumerate(chunks):
        try:
            s.client(data) if i % 2 == 0 else s.server(data)
        except ProtocolViolation:
            break
        s.check_bounds()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(1, 16))
def test_startup_reader_random_packets(data: bytes, step: int) -> None:
    reader = StartupReader(MAX_STARTUP)
    try:
        for i in range(0, len(data), step):
            reader.receive_data(data[i : i + step])
            assert len(reader.remaining) <= len(data)
    except ProtocolViolation:
        pass
