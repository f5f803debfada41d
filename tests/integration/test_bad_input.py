"""Hostile and broken clients: random bytes, truncated and oversized frames, absurd lengths.

Each bad client must get an ErrorResponse with SQLSTATE 08P01 where the protocol allows one
and then be closed; nobody else may notice. A psycopg "bystander" session, opened before the
attack, runs queries in a thread the whole time and must never see an error. The proxy runs in
this process, so its memory is this process's RSS: a 2 GiB length prefix must not make it
allocate anything.

The random clients log in as an unprivileged role so that no random message can do harm.
"""

from __future__ import annotations

import contextlib
import fcntl
import struct
import termios
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fix_pgcluster import (
    RawClient,
    error_fields,
    errors_in,
    frame,
    startup_packet,
    wait_until,
)
from tests.fix_proxy import create_database, direct_dsn, drop_database

#: protocol 3.0 message types (after startup), per the PostgreSQL docs
FRONTEND_TYPES = b"BCcdDEfFHpPQSX"
BACKEND_TYPES = b"123ACDEGHIKNRSTVWZcdnstv"
INVALID_TYPES = bytes(t for t in range(256) if t not in FRONTEND_TYPES)
MAX_MESSAGE = 1 << 20  # the proxy under test is configured with this max_message_size
MAX_STARTUP = 10_000  # the default max_startup_packet_size
TWO_GIB = struct.pack("!I", 1 << 31)

HYPOTHESIS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[str, str]]:
    """(database, role): a scratch database and a login role without privileges."""
    role = f"pgsage_fuzz_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(direct_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    db = create_database("pgsage_fuzz")
    try:
        yield db, role
    finally:
        drop_database(db)
        with psycopg.connect(direct_dsn(), autocommit=True) as conn:
            conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                (role,),
            )
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def hostile_proxy(make_proxy):
    return make_proxy(max_message_size=MAX_MESSAGE)


class Bystander:
    """A well-behaved psycopg session querying in a loop while the attack goes on."""

    def __init__(self, p, dbname: str) -> None:
        self.conn = psycopg.connect(p.dsn(dbname, application_name="bystander"), autocommit=True)
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.count
                row = self.conn.execute("select %s::int, repeat('x', 1000)", (n,)).fetchone()
                assert row is not None and row[0] == n and len(row[1]) == 1000
                self.count += 1
            except BaseException as exc:
                self.errors.append(exc)
                return
            time.sleep(0.002)

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            if exc_type is None:
                assert not self._thread.is_alive()
                assert not self.errors, self.errors
                assert self.count > 0
                assert self.conn.execute("select 'bystander ok'").fetchone() == ("bystander ok",)
        finally:
            self.conn.close()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Growth of this process's peak RSS (VmHWM) over a block, in MiB.

    Writing 5 to /proc/self/clear_refs resets the peak to the current RSS, so transient
    buffers count too, not just what is still held at the end.
    """

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = _status_kib("VmRSS")
        self.grown_mib = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.grown_mib = (_status_kib("VmHWM") - self.before) / 1024


def attacker(p, db: str, role: str) -> RawClient:
    """A raw client past startup, as the unprivileged role."""
    c = RawClient(p.host, p.port)
    msgs = c.startup(user=role, database=db, application_name="attacker")
    assert msgs and msgs[-1] == (b"Z", b"I"), msgs
    return c


def expect_08p01_and_close(c: RawClient) -> dict[str, str]:
    msgs, closed = c.read_until_closed()
    assert closed, "the proxy kept a broken client open"
    assert len(msgs) == 1 and msgs[0][0] == b"E", msgs
    err = error_fields(msgs[0][1])
    assert err["S"] == "FATAL" and err["C"] == "08P01", err
    return err


def send_quietly(c: RawClient, data: bytes) -> None:
    """Send what the proxy may refuse to read to the end (it closes on us): ignore resets."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send(data)


# ------------------------------------------------------------------ strategies

_tail = st.binary(max_size=300)

#: frames the proxy must refuse at their header, with whatever follows
invalid_first_frame = st.one_of(
    st.builds(
        lambda t, n, tail: bytes([t]) + struct.pack("!I", n) + tail,
        st.sampled_from(INVALID_TYPES),
        st.integers(0, 2**32 - 1),
        _tail,
    ),
    st.builds(
        lambda t, n, tail: bytes([t]) + struct.pack("!I", n) + tail,
        st.sampled_from(FRONTEND_TYPES),
        st.integers(0, 3),  # a length must count at least itself
        _tail,
    ),
    st.builds(
        lambda t, n, tail: bytes([t]) + struct.pack("!I", n) + tail,
        st.sampled_from(FRONTEND_TYPES),
        st.integers(MAX_MESSAGE + 1, 2**32 - 1),  # over max_message_size
        st.binary(max_size=4096),
    ),
)


@st.composite
def truncated_frame(draw: st.DrawFn) -> bytes:
    """A frame cut short: header (or part of it) and less body than it announces."""
    whole = frame(
        draw(st.sampled_from([b"Q", b"P", b"B", b"D", b"d"])),
        draw(st.binary(min_size=1, max_size=2000)),
    )
    return whole[: draw(st.integers(1, len(whole) - 1))]


@st.composite
def bad_startup(draw: st.DrawFn) -> bytes:
    """The first packet of a connection, broken in one of the ways the startup reader checks."""
    kind = draw(st.sampled_from(["short", "long", "protocol", "no_terminator", "no_value"]))
    if kind == "short":
        return struct.pack("!I", draw(st.integers(0, 7))) + draw(st.binary(max_size=50))
    if kind == "long":
        # (a first byte 0x16 would be a TLS ClientHello, closed without a word: test_tls)
        length = draw(st.integers(MAX_STARTUP + 1, 2**32 - 1).filter(lambda n: n >> 24 != 0x16))
        return struct.pack("!I", length) + draw(st.binary(max_size=2000))
    if kind == "protocol":
        code = draw(st.integers(0, 2**32 - 1).filter(lambda c: c >> 16 != 3 and c >> 16 != 1234))
        body = draw(st.binary(max_size=100))
        return struct.pack("!II", 8 + len(body), code) + body
    params = draw(
        st.lists(
            st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=1, max_size=20),
            min_size=1,
            max_size=6,
        )
    )
    raw = b"\x00".join(p.encode() for p in params)
    if kind == "no_terminator":
        body = raw + b"\x00" + b"x"  # no final NUL
    else:  # a parameter name without a value
        body = b"".join(p.encode() + b"\x00" + b"v\x00" for p in params) + b"dangling\x00\x00"
    return struct.pack("!II", 8 + len(body), 3 << 16) + body


# ------------------------------------------------------------------ after startup


def test_random_invalid_frames_after_startup(hostile_proxy, fuzz_target):
    db, role = fuzz_target
    with Bystander(hostile_proxy, db):
        runs: list[bytes] = []

        @HYPOTHESIS
        @given(data=invalid_first_frame)
        def attack(data: bytes) -> None:
            runs.append(data)
            with attacker(hostile_proxy, db, role) as c:
                send_quietly(c, data)
                expect_08p01_and_close(c)

        attack()
    assert len(runs) >= 40, f"only {len(runs)} examples ran"
    wait_until(lambda: len(hostile_proxy.server.clients) == 0, what="all attackers forgotten")


def test_truncated_frames_then_half_close(hostile_proxy, fuzz_target):
    db, role = fuzz_target
    with Bystander(hostile_proxy, db):
        runs: list[bytes] = []

        @HYPOTHESIS
        @given(data=truncated_frame())
        def attack(data: bytes) -> None:
            runs.append(data)
            with attacker(hostile_proxy, db, role) as c:
                c.send(data)
                c.shutdown_write()  # the rest of the frame will never come
                err = expect_08p01_and_close(c)
                assert err["M"] == "incomplete message from client"

        attack()
    assert len(runs) >= 40, f"only {len(runs)} examples ran"
    wait_until(lambda: len(hostile_proxy.server.clients) == 0, what="all attackers forgotten")


def test_random_bytes_after_startup(hostile_proxy, fuzz_target):
    """Arbitrary bytes: whatever happens, the client is closed cleanly and nobody else notices.

    Bytes that happen to form valid messages reach the server, which answers for itself; a
    first header the proxy must refuse is always its 08P01.
    """
    db, role = fuzz_target
    with Bystander(hostile_proxy, db):
        runs: list[bytes] = []

        @HYPOTHESIS
        @given(data=st.binary(min_size=1, max_size=400))
        def attack(data: bytes) -> None:
            runs.append(data)
            with attacker(hostile_proxy, db, role) as c:
                send_quietly(c, data)
                with contextlib.suppress(OSError):  # maybe already closed on us
                    c.shutdown_write()
                msgs, closed = c.read_until_closed()
            assert closed
            for t, _ in msgs:
                assert t in BACKEND_TYPES, (t, msgs)
            errs = errors_in(msgs)
            for e in errs:
                assert e.get("C") and e.get("S") in ("ERROR", "FATAL"), e
            header_bad = len(data) >= 5 and (
                data[0] not in FRONTEND_TYPES
                or not 4 <= struct.unpack_from("!I", data, 1)[0] <= MAX_MESSAGE
            )
            if header_bad:
                assert [(e["S"], e["C"]) for e in errs] == [("FATAL", "08P01")]

        attack()
    assert len(runs) >= 40, f"only {len(runs)} examples ran"
    wait_until(lambda: len(hostile_proxy.server.clients) == 0, what="all attackers forgotten")


def test_malformed_query_body_is_refused_by_the_proxy(hostile_proxy, fuzz_target):
    """A Query whose text lacks its terminator: the proxy reads Query texts, so it refuses it."""
    db, role = fuzz_target
    with attacker(hostile_proxy, db, role) as c:
        c.send(frame(b"Q", b"select 1"))  # no NUL
        err = expect_08p01_and_close(c)
    assert "terminator" in err["M"]


def test_valid_frames_then_garbage_answers_the_valid_ones(hostile_proxy, fuzz_target):
    db, role = fuzz_target
    with attacker(hostile_proxy, db, role) as c:
        rows = [p for t, p in c.query("select 'before garbage'") if t == b"D"]
        assert rows and rows[0].endswith(b"before garbage")
        c.send(b"\x00garbage!")
        expect_08p01_and_close(c)


# ------------------------------------------------------------------ before startup


def test_garbage_before_startup(hostile_proxy, fuzz_target):
    db, _ = fuzz_target
    with Bystander(hostile_proxy, db):
        runs: list[bytes] = []

        @HYPOTHESIS
        @given(data=bad_startup())
        def attack(data: bytes) -> None:
            runs.append(data)
            with RawClient(hostile_proxy.host, hostile_proxy.port) as c:
                send_quietly(c, data)
                expect_08p01_and_close(c)

        attack()
    assert len(runs) >= 40, f"only {len(runs)} examples ran"
    wait_until(lambda: len(hostile_proxy.server.clients) == 0, what="all attackers forgotten")
    assert not hostile_proxy.server.admitted


def startup_expectation(data: bytes) -> str:
    """What the protocol says must happen to a connection that opens with `data`, then EOF.

    "08P01": the proxy's own FATAL 08P01; "silent": closed without a word (a TLS ClientHello or
    a CancelRequest); "fatal": a StartupMessage, refused by the proxy or the server with some
    FATAL; "answer": an SSL/GSSENC request, answered with one byte (not checked here).
    """
    if data[0] == 0x16:
        return "silent"
    if len(data) < 4:
        return "08P01"
    (length,) = struct.unpack_from("!I", data)
    if length < 8 or length > MAX_STARTUP or len(data) < length:
        return "08P01"
    (code,) = struct.unpack_from("!I", data, 4)
    if code in (80877103, 80877104):
        return "answer" if length == 8 else "08P01"
    if code == 80877102:
        return "silent" if 16 <= length <= 268 else "08P01"
    return "fatal" if code >> 16 == 3 else "08P01"


def test_random_bytes_before_startup(hostile_proxy, fuzz_target):
    db, _ = fuzz_target
    with Bystander(hostile_proxy, db):
        runs: list[bytes] = []

        @HYPOTHESIS
        @given(data=st.binary(min_size=1, max_size=300))
        def attack(data: bytes) -> None:
            runs.append(data)
            expected = startup_expectation(data)
            if expected == "answer":
                return  # one-byte answers are the subject of test_tls
            with RawClient(hostile_proxy.host, hostile_proxy.port) as c:
                send_quietly(c, data)
                with contextlib.suppress(OSError):
                    c.shutdown_write()
                msgs, closed = c.read_until_closed()
            assert closed
            errs = errors_in(msgs)
            if expected == "silent":
                assert msgs == []
            elif expected == "08P01":
                assert [(e["S"], e["C"]) for e in errs] == [("FATAL", "08P01")], msgs
            else:
                assert errs and errs[-1]["S"] == "FATAL", msgs

        attack()
    assert len(runs) >= 40, f"only {len(runs)} examples ran"
    wait_until(lambda: len(hostile_proxy.server.clients) == 0, what="all attackers forgotten")


def test_startup_packet_without_terminator(hostile_proxy):
    body = b"user\x00postgres\x00database\x00postgres"  # the final NULs are missing
    with RawClient(hostile_proxy.host, hostile_proxy.port) as c:
        c.send(struct.pack("!II", 8 + len(body), 3 << 16) + body)
        err = expect_08p01_and_close(c)
    assert "terminator" in err["M"]


def test_incomplete_startup_packet_then_half_close(hostile_proxy):
    with RawClient(hostile_proxy.host, hostile_proxy.port) as c:
        c.send(startup_packet()[:20])
        c.shutdown_write()
        err = expect_08p01_and_close(c)
    assert err["M"] == "incomplete startup packet"


def test_incomplete_startup_packet_times_out(make_proxy):
    p = make_proxy(startup_timeout=1)
    with RawClient(p.host, p.port) as c:
        c.send(startup_packet()[:20])  # and then nothing
        started = time.monotonic()
        msgs, closed = c.read_until_closed()
    assert closed and time.monotonic() - started < 5
    assert [e["S"] for e in errors_in(msgs)] == ["FATAL"]
    wait_until(lambda: not p.server.clients, what="the stalled client to be forgotten")


# ------------------------------------------------------------------ absurd lengths and memory


#: 2 GiB announced, then 4 MiB of it: built once, so the test itself holds one copy of each
_TAIL = bytes(range(256)) * (16 * 1024)
TWO_GIB_QUERY = b"Q" + TWO_GIB + _TAIL
TWO_GIB_STARTUP = TWO_GIB + struct.pack("!I", 3 << 16) + _TAIL


def _two_gib_after_startup(p, db: str, role: str) -> None:
    with attacker(p, db, role) as c:
        sender = threading.Thread(target=send_quietly, args=(c, TWO_GIB_QUERY))
        sender.start()
        err = expect_08p01_and_close(c)
        sender.join(10)
    assert "over the limit" in err["M"]


def _two_gib_startup(p) -> None:
    with RawClient(p.host, p.port) as c:
        sender = threading.Thread(target=send_quietly, args=(c, TWO_GIB_STARTUP))
        sender.start()
        err = expect_08p01_and_close(c)
        sender.join(10)
    assert "invalid length of startup packet" in err["M"]


def test_two_gib_length_prefix_memory_bounded(make_proxy, fuzz_target):
    """The default limits (1 GiB - 1 per message): a 2 GiB prefix is refused at its header,
    after startup and as the startup packet's length, by a dozen clients at once."""
    db, role = fuzz_target
    p = make_proxy()
    with Bystander(p, db):
        _two_gib_after_startup(p, db, role)  # warm up
        _two_gib_startup(p)
        with PeakRSS() as peak:
            threads = [
                threading.Thread(target=_two_gib_after_startup, args=(p, db, role))
                for _ in range(6)
            ] + [threading.Thread(target=_two_gib_startup, args=(p,)) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            wait_until(lambda: len(p.server.clients) == 1, what="all attackers forgotten")
    assert peak.grown_mib < 50, f"peak RSS grew by {peak.grown_mib:.0f} MiB"


def _unread_bytes(p, c: RawClient) -> int:
    """Bytes sent by `c` that the proxy has not read yet (both kernel queues)."""
    unsent = struct.unpack("i", fcntl.ioctl(c.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    port = c.sock.getsockname()[1]
    for session in list(p.server.clients):
        if session.info.client_addr.endswith(f":{port}") and session.transport is not None:
            fd = session.transport.get_extra_info("socket").fileno()
            queued = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            return int(unsent) + int(queued)
    raise AssertionError("the attacker's session is not in the proxy")


@pytest.mark.parametrize(
    ("declared", "limit_mib"),
    [(60 << 20, 50), (200 << 20, 4)],
    ids=["read-by-proxy", "relayed-unread"],
)
def test_large_declared_query_partly_sent_memory_bounded(
    make_proxy, fuzz_target, declared, limit_mib
):
    """A Query announcing a large length of which only 8 MiB ever come.

    Under max_read_size (64 MiB) the proxy keeps the Query text it reads: what arrived, not
    what was announced. Over it, the proxy relays the bytes without keeping them (the peak
    stays well under the 8 MiB that passed through). The client
    then goes away mid-message and the upstream session ends with it.
    """
    db, role = fuzz_target
    p = make_proxy()
    with Bystander(p, db):
        c = attacker(p, db, role)
        data = b"Q" + struct.pack("!I", declared) + b"select " + b"1" * (8 << 20)
        with PeakRSS() as peak:
            c.send(data)
            wait_until(lambda: _unread_bytes(p, c) == 0, 20, "the proxy to read all bytes")
        c.close()
        wait_until(lambda: len(p.server.clients) == 1, what="the attacker to be forgotten")
    assert peak.grown_mib < limit_mib, f"peak RSS grew by {peak.grown_mib:.1f} MiB"


def test_oversized_frame_under_configured_limit(hostile_proxy, fuzz_target):
    """max_message_size is honoured for every type, read or not (Query and CopyData)."""
    db, role = fuzz_target
    for type_byte in (b"Q", b"d"):
        with attacker(hostile_proxy, db, role) as c:
            payload = b"x" * (MAX_MESSAGE + 10)
            send_quietly(c, type_byte + struct.pack("!I", len(payload) + 4) + payload)
            err = expect_08p01_and_close(c)
            assert "over the limit" in err["M"]
    # a message just under the limit is fine
    with attacker(hostile_proxy, db, role) as c:
        msgs = c.query("select length('" + "y" * (MAX_MESSAGE - 40) + "')")
        assert not errors_in(msgs)
        rows = [p for t, p in msgs if t == b"D"]
        assert rows and rows[0].endswith(str(MAX_MESSAGE - 40).encode())
