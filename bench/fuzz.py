"""Wire-protocol fuzz of pgsage: mutated captures of real client traffic (issue 13). Two modes.

Codec mode, `python -m bench.fuzz --codec --inputs 1000000`, runs in process and needs no server:
each input is one recorded session (tests/data/*.capture, the psql session, and three sessions
recorded below: psycopg, asyncpg and psql large objects, i.e. extended protocol, SCRAM, COPY
in, out and fail, portals with a row limit, pipelines and fastpath function calls), mutated with
the live mode's mutations (on the client's chunks, the server's, or both, stacked up to three)
plus codec ones: chunks cut at random places or into single bytes, client requests pipelined,
bytes of the other direction spliced in, random tails. It is replayed in capture order through
what pgsage runs per session (proxy/session.py): a StartupReader for the opening packets
(StartupMessage accessors and re-encoding included), then batch.read_batch, request_sql and
bind_parameters on each whole client request, the frontend FrameScanner and
SessionTracker.client_frames; on the server side batch.replayable, the backend FrameScanner and
SessionTracker.server_frames; tracker.abandon and end_suspended at the end. Every frontend and
backend message is also decoded (decode_frontend, decode_backend, bind_names,
SASLInitialResponse) and the frontend ones re-encoded (encode(decode(x)) must give x back). With
pgsage's default limits or small ones (64 KiB messages, 4 KiB reads), so the oversize paths run.

The codec's documented errors are the expected ends of a session: ProtocolViolation (pgsage
answers 08P01, or 08006 for an upstream's) and LocalProtocolError (counted apart). Anything else
is a crash, as is ProtocolViolation out of an entry point pgsage calls without catching it (the
batch helpers, replayable, the tracker's end-of-session calls), a buffer over its limit, or an
input running over 5 s. A crash is recorded with its input index, mutations, bytes and traceback;
`--replay INDEX` (same --seed) re-runs one input and raises its exception. Memory: each worker's
RSS after every batch of inputs (growth after a warm-up of 10% of the inputs), and with
`--tracemalloc` the traced current and peak too. Inputs run in --workers processes. Writes
bench/results/fuzz_codec.json.

Live mode, `python -m bench.fuzz --inputs 2000`, starts `pgsage serve` (a subprocess, as
bench/overhead.py does) in front of the upstream and opens one connection per input. Each input
is the shipped psql session (tests/data/psql_session.capture, read as data) with its startup
packet rewritten to an unprivileged scratch role and database, then mutated: bit flips,
truncations, wrong and oversized lengths, invalid UTF-8, random bytes, dropped or repeated
chunks, mutated startup packets. The client sends its chunks and reads until pgsage closes
(half-closing after a moment of silence, for inputs whose Terminate was mutated away).

Every connection must end in one of the expected ways: normal answers (the server's own, errors
included) and a close at the client's EOF, or an ErrorResponse FATAL 08P01 as the last message
and a close (or a silent close, for a CancelRequest or a TLS ClientHello). Failures: a
connection left open (`hang`), a backend stream that does not frame (`bad_framing`), messages
after a FATAL (`after_fatal`). Meanwhile a control client runs a query every 0.2 s and the RSS of
the pgsage process is sampled. Outcomes `fatal_<sqlstate>` are the server's own answers
(a mutated user name: 28000) or pgsage's (08006 after a pipelined Terminate: a known issue);
`reset` is a close while the client was still sending (TCP then drops the unread FATAL).
Live mode is slow (a connection and a server backend per input): 1,000,000 inputs take hours.
Writes bench/results/fuzz.json.

In both modes input i uses Random(seed * 1e9 + i), so every input is reproducible. bench never
imports proxy (an import-linter contract); codec mode, white-box by nature, imports the codec
in `load_codec` (a declared exception to that contract in pyproject.toml).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.overhead import RESULTS_DIR, BenchError, Upstream, free_port, start_pgsage, tail

CAPTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "psql_session.capture"
SSL_REQUEST = struct.pack("!II", 8, 80877103)
BACKEND_TYPES = frozenset(b"123ACDEGHIKNRSTVWZcdnstv")
#: seconds of silence after which the fuzz client half-closes (its input may lack a Terminate)
IDLE = 0.3
MUTATIONS = (
    "none", "flip", "truncate", "length", "huge_length", "utf8", "insert", "drop", "repeat",
    "startup", "startup_length", "garbage_first",
)  # fmt: skip


# --------------------------------------------------------------------------- the capture


def load_capture(path: Path = CAPTURE) -> list[tuple[str, bytes]]:
    return parse_capture(path.read_bytes())


def parse_capture(raw: bytes) -> list[tuple[str, bytes]]:
    """(direction, bytes) chunks: F frontend, B backend (format of tests/capture.py)."""
    out, pos = [], 0
    while pos < len(raw):
        kind = raw[pos : pos + 1].decode()
        (n,) = struct.unpack_from("!I", raw, pos + 1)
        out.append((kind, raw[pos + 5 : pos + 5 + n]))
        pos += 5 + n
    return out


def startup_packet(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), 3 << 16) + body


def client_script(capture: list[tuple[str, bytes]], user: str, database: str) -> list[bytes]:
    """The client's chunks, the StartupMessage rewritten to `user` / `database`."""
    out: list[bytes] = []
    for kind, data in capture:
        if kind != "F":
            continue
        if len(data) >= 8 and struct.unpack_from("!I", data, 4)[0] == 3 << 16:
            parts = data[8:-2].split(b"\0")
            params = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}
            params.update(user=user, database=database, application_name="pgsage-fuzz")
            data = startup_packet(params)
        out.append(data)
    return out


# --------------------------------------------------------------------------- mutations


def mutate(chunks: list[bytes], rng: random.Random, startup: int = 1) -> tuple[str, list[bytes]]:
    """One mutation of the session; returns its kind and the chunks to send.

    `startup` is the index of the StartupMessage (1: after an SSLRequest); codec mode also
    mutates the server's chunks with it (the index of the server's first answer then).
    """
    kind = rng.choice(MUTATIONS)
    chunks = list(chunks)
    if kind == "none":
        return kind, chunks
    # mutations after startup pick a chunk past the SSLRequest and the StartupMessage
    i = (
        rng.randrange(startup + 1, len(chunks))
        if kind not in ("startup", "startup_length")
        else startup
    )
    data = bytearray(chunks[i])
    n = len(data)
    if kind == "startup" and n <= 8:
        return "none", chunks  # (a chunk cut short by an earlier mutation)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        chunks = [*chunks[:i], bytes(data[: rng.randrange(n)] or data[:1])]
        return kind, chunks
    elif kind in ("length", "huge_length") and n >= 5:
        value = rng.randrange(0, 64) if kind == "length" else rng.randrange(1 << 30, 1 << 32)
        struct.pack_into("!I", data, 1, value)
    elif kind == "utf8":
        pos = rng.randrange(5, n) if n > 5 else n
        data[pos:pos] = rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"])
        if n >= 5:  # keep the frame's length right, so the server reads the bad text
            struct.pack_into("!I", data, 1, len(data) - 1)
    elif kind == "insert":
        pos = rng.randrange(n + 1)
        data[pos:pos] = rng.randbytes(rng.randint(1, 64))
    elif kind == "drop":
        del chunks[i]
        return kind, chunks
    elif kind == "repeat":
        chunks.insert(i, bytes(data))
    elif kind == "startup":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(8, n)] ^= 1 << rng.randrange(8)
    elif kind == "startup_length":
        struct.pack_into("!I", data, 0, rng.choice([0, 4, 7, n - 1, n + 1, 10_001, 1 << 31]))
    elif kind == "garbage_first":
        chunks = [rng.randbytes(rng.randint(1, 64)), *chunks[1:]]
        return kind, chunks
    chunks[i] = bytes(data)
    return kind, chunks


# --------------------------------------------------------------------------- one connection


def judge(raw: bytes, sent_ssl: bool, closed: bool) -> str:
    """Outcome of one connection from what pgsage sent back."""
    if not closed:
        return "hang"
    if sent_ssl and raw[:1] == b"N":
        raw = raw[1:]
    pos, fatal_at, last = 0, -1, ""
    messages = 0
    while pos < len(raw):
        if len(raw) - pos < 5:
            return "bad_framing"
        t = raw[pos]
        (length,) = struct.unpack_from("!I", raw, pos + 1)
        if t not in BACKEND_TYPES or length < 4 or pos + 1 + length > len(raw):
            return "bad_framing"
        if t == ord("E"):
            fields = {p[:1]: p[1:] for p in raw[pos + 5 : pos + 1 + length].split(b"\0") if p}
            if fields.get(b"S") in (b"FATAL", b"PANIC"):
                fatal_at = messages
                code = fields.get(b"C", b"?????").decode("ascii", "replace")
                last = "08P01" if code == "08P01" else f"fatal_{code}"
        messages += 1
        pos += 1 + length
    if fatal_at >= 0 and fatal_at != messages - 1:
        return "after_fatal"
    if fatal_at >= 0:
        return last
    return "answered" if messages else "silent"


async def one(host: str, port: int, chunks: list[bytes], timeout: float) -> tuple[str, bytes]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return "connect_failed", str(exc).encode()
    received = bytearray()
    closed = reset = False

    async def read_all() -> None:
        """Read until pgsage closes. A session that ends with its Terminate is closed by then;
        one whose end was mutated away gets a half-close after `IDLE` s of silence."""
        nonlocal closed, reset
        half_closed = False
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), IDLE)
                except TimeoutError:
                    if half_closed:
                        continue
                    half_closed = True
                    if writer.can_write_eof():
                        writer.write_eof()
                    continue
                if not chunk:
                    break
                received.extend(chunk)
                if len(received) > 64 << 20:
                    return
            closed = True
        except (ConnectionResetError, BrokenPipeError):
            closed = reset = True

    sent_ssl = bool(chunks) and chunks[0] == SSL_REQUEST
    if sent_ssl:  # as libpq does: wait for the one-byte answer before the StartupMessage
        writer.write(chunks[0])
        try:
            received.extend(await asyncio.wait_for(reader.readexactly(1), timeout))
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            writer.close()
            return "hang", bytes(received)
        chunks = chunks[1:]
    reading = asyncio.ensure_future(read_all())
    try:
        for data in chunks:
            writer.write(data)
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError, OSError):
        pass  # pgsage closed on us: what it sent says why
    try:
        await asyncio.wait_for(reading, timeout)
    except TimeoutError:
        reading.cancel()
    writer.close()
    outcome = judge(bytes(received), sent_ssl, closed)
    if outcome == "silent" and reset:
        # pgsage closed while the client was still sending: TCP resets the connection and
        # drops what pgsage had sent (its FATAL included) before the client read it
        outcome = "reset"
    return outcome, bytes(received[:200])


# --------------------------------------------------------------------------- watchers


class Control(threading.Thread):
    """A well-behaved client querying every 0.2 s (and reconnecting every 25 queries)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or self.ok % 25 == 0:
                    if conn is not None:
                        conn.close()
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                n = self.ok
                row = conn.execute("select %s::int, repeat('c', 100)", (n,)).fetchone()
                if row is None or row[0] != n:
                    raise RuntimeError(f"wrong answer {row!r}")
                self.ok += 1
            except Exception as exc:  # counted, the run goes on
                self.errors.append(repr(exc))
                conn = None
            self.stop.wait(0.2)
        if conn is not None:
            conn.close()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, int]] = []  # (t, rss, fds)
        self.stop = threading.Event()

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            rss, fds = self.proc.memory_info().rss, self.proc.num_fds()
            self.samples.append((time.monotonic(), rss, fds))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.5)


# --------------------------------------------------------------------------- the run


def scratch(up: Upstream, say: Any) -> tuple[str, str, str]:
    """An unprivileged role, a database it may use, and a warehouse database for pgsage."""
    tag = uuid.uuid4().hex[:8]
    role, db, wh = f"pgsage_fuzz_{tag}", f"pgsage_fuzz_{tag}", f"pgsage_fuzz_wh_{tag}"
    say(f"creating role {role} and databases {db}, {wh}")
    up.psql(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    up.psql(f'CREATE DATABASE "{db}"')
    up.psql(f'CREATE DATABASE "{wh}"')
    return role, db, wh


def cleanup(up: Upstream, role: str, db: str, wh: str) -> None:
    for name in (db, wh):
        up.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    up.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    up.psql(f'DROP ROLE IF EXISTS "{role}"')


async def drive(
    host: str, port: int, script: list[bytes], args: argparse.Namespace, err: Console
) -> tuple[Counter[str], Counter[tuple[str, str]], list[dict[str, Any]]]:
    outcomes: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    failures: list[dict[str, Any]] = []
    next_input = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_input
        while next_input < args.inputs:
            i = next_input
            next_input += 1
            rng = random.Random(args.seed * 1_000_000_000 + i)
            kind, chunks = mutate(script, rng)
            outcome, head = await one(host, port, chunks, args.timeout)
            outcomes[outcome] += 1
            by_kind[(kind, outcome)] += 1
            bad = outcome in ("hang", "bad_framing", "after_fatal", "connect_failed")
            if bad and len(failures) < 20:
                failures.append({"input": i, "mutation": kind, "outcome": outcome,
                                 "reply_head": head.hex()})  # fmt: skip
            done = sum(outcomes.values())
            if done % max(1, args.inputs // 20) == 0:
                rate = done / (time.monotonic() - started)
                err.print(f"  {done:,}/{args.inputs:,} inputs ({rate:,.0f}/s) {dict(outcomes)}")

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return outcomes, by_kind, failures


def benchmark(args: argparse.Namespace, err: Console) -> dict[str, Any]:
    up = Upstream(args.upstream.rpartition(":")[0], int(args.upstream.rpartition(":")[2]),
                  args.user)  # fmt: skip
    role, db, wh = scratch(up, err.print)
    workdir = Path(tempfile.mkdtemp(prefix="pgsage_fuzz_"))
    port, http_port = free_port(), free_port()
    child = start_pgsage(up, workdir, port, http_port, args.pgsage_bin, wh, None, {})
    control = sampler = None
    try:

        def check() -> None:
            # a slow start (pgsage's loop busy loading right after it listens) is retried
            # until wait_ready's deadline, not taken for a failure
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=args.user, dbname=db,
                                     connect_timeout=10) as c:  # fmt: skip
                    c.execute("select 1")
            except psycopg.OperationalError as exc:
                raise BenchError(str(exc)) from exc

        try:
            child.wait_ready("127.0.0.1", port, check, timeout=60)
        except psycopg.Error as exc:
            raise BenchError(f"pgsage not ready: {exc}\n{tail(child.log)}") from exc
        script = client_script(load_capture(), role, db)
        control = Control(f"host=127.0.0.1 port={port} user={args.user} dbname={db}")
        control.start()
        sampler = RssSampler(child.proc.pid)
        sampler.start()
        err.print(f"fuzzing pgsage on port {port} with {args.inputs:,} inputs "
                  f"({args.concurrency} at a time, seed {args.seed})")  # fmt: skip
        t0 = time.monotonic()
        outcomes, by_kind, failures = asyncio.run(drive("127.0.0.1", port, script, args, err))
        seconds = time.monotonic() - t0
        time.sleep(1.0)
        sampler.sample()
        alive = child.proc.poll() is None
    finally:
        for t in (control, sampler):
            if t is not None:
                t.stop.set()
                t.join(10)
        child.stop()
        cleanup(up, role, db, wh)
    samples = sampler.samples if sampler else []
    rss = [r for _, r, _ in samples]
    warm = rss[max(0, len(rss) // 10)] if rss else 0
    growth_mib = (max(rss) - warm) / 2**20 if rss else None
    bad = sum(outcomes[k] for k in ("hang", "bad_framing", "after_fatal", "connect_failed"))
    ok = (
        alive and bad == 0 and not (control and control.errors)
        and growth_mib is not None and growth_mib <= args.max_rss_growth_mib
    )  # fmt: skip
    return {
        "benchmark": "fuzz",
        "mode": "live",
        "inputs": sum(outcomes.values()),
        "seconds": round(seconds, 1),
        "inputs_per_second": round(sum(outcomes.values()) / seconds, 1),
        "seed": args.seed,
        "concurrency": args.concurrency,
        "outcomes": dict(outcomes),
        "by_mutation": {f"{k}/{o}": n for (k, o), n in sorted(by_kind.items())},
        "failures": failures,
        "proxy_alive": alive,
        "control_queries": control.ok if control else 0,
        "control_errors": control.errors[:10] if control else [],
        "rss_start_mib": round(rss[0] / 2**20, 1) if rss else None,
        "rss_after_warmup_mib": round(warm / 2**20, 1) if rss else None,
        "rss_peak_mib": round(max(rss) / 2**20, 1) if rss else None,
        "rss_end_mib": round(rss[-1] / 2**20, 1) if rss else None,
        "rss_growth_mib": round(growth_mib, 1) if growth_mib is not None else None,
        "fds_start": samples[0][2] if samples else None,
        "fds_end": samples[-1][2] if samples else None,
        "max_rss_growth_mib": args.max_rss_growth_mib,
        "ok": ok,
    }


def render(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pgsage wire fuzz: {doc['inputs']:,} inputs in {doc['seconds']} s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for outcome, n in sorted(doc["outcomes"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"outcome {outcome}", f"{n:,}")
    for key in ("proxy_alive", "control_queries", "rss_after_warmup_mib", "rss_peak_mib",
                "rss_growth_mib", "fds_start", "fds_end", "ok"):  # fmt: skip
        table.add_row(key.replace("_", " "), str(doc[key]))
    table.add_row("control errors", str(len(doc["control_errors"])))
    return table


# --------------------------------------------------------------------------- codec mode

CAPTURE_DIR = CAPTURE.parent
#: (max_message_size, max_read_size, max_startup_packet_size) of each input's codec
CODEC_LIMITS: dict[str, tuple[int, int, int]] = {
    "default": ((1 << 30) - 1, 64 << 20, 10_000),  # pgsage's defaults (proxy/settings.py)
    "small": (1 << 16, 4096, 10_000),  # oversized lengths reachable, long messages unread
}
#: codec mutations, each applied to an input with this probability (after MUTATIONS)
CODEC_EXTRA: dict[str, float] = {
    "payload": 0.6,  # 1-3 messages' payloads changed inside a valid frame (for the decoders)
    "rechunk": 0.4,  # every chunk cut at up to 3 random places (a TCP read boundary anywhere)
    "bytewise": 0.02,  # one chunk fed a byte at a time
    "pipeline": 0.1,  # 2-4 client requests sent at once, their answers after
    "splice": 0.1,  # the head of a chunk of the other direction appended to a chunk
    "random_tail": 0.03,  # the session cut anywhere and continued with random bytes
}
#: entry points pgsage calls without catching ProtocolViolation: any exception is a crash there
TOTAL_STAGES = frozenset({
    "batch.read_batch", "batch.request_sql", "batch.bind_parameters", "batch.replayable",
    "StartupMessage", "SessionTracker.take_finished", "SessionTracker.abandon",
    "SessionTracker.end_suspended",
})  # fmt: skip
HANG_SECONDS = 5.0
#: share of inputs that are a whole session; the others are its startup and a window of chunks
FULL_SESSIONS = 0.15
WINDOW = 12


class CodecHang(Exception):
    """One input ran for more than HANG_SECONDS."""


class BoundExceeded(Exception):
    """A codec buffer or table grew past its configured limit."""


def load_codec() -> SimpleNamespace:
    """proxy.protocol's entry points.

    bench measures pgsage from outside and never imports proxy (the import-linter contract
    "bench never imports proxy"), with this one declared exception (`ignore_imports` in
    pyproject.toml): codec mode is white-box by nature and feeds the sans-IO codec directly,
    in process. The imports stay inside this function.
    """
    import proxy.protocol as p
    from optimizer.sqltext import split_statements  # the tracker's splitter in pgsage
    from proxy.protocol import batch
    from proxy.protocol import frontend as front

    names = ("ProtocolViolation", "LocalProtocolError", "FrameScanner", "StartupReader",
             "SessionTracker", "StartupMessage", "SSLRequest", "CancelRequest", "DirectTLS",
             "decode_frontend", "decode_backend", "CLIENT_INTERESTING", "SERVER_INTERESTING",
             "FRONTEND_TYPE_BYTES", "BACKEND_TYPE_BYTES")  # fmt: skip
    codec = SimpleNamespace(**{n: getattr(p, n) for n in names})
    for n in ("read_batch", "request_sql", "bind_parameters", "replayable"):
        setattr(codec, n, getattr(batch, n))
    codec.bind_names = p.bind_names
    codec.SASLInitialResponse = front.SASLInitialResponse
    codec.split_statements = split_statements
    return codec


def codec_sessions() -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Every capture in tests/data, then the sessions recorded in this file."""
    out = [(path.stem, load_capture(path)) for path in sorted(CAPTURE_DIR.glob("*.capture"))]
    for name, text in RECORDED.items():
        raw = zlib.decompress(base64.b64decode("".join(text)))
        out.append((name, parse_capture(raw)))
    return out


# --------------------------------------------------------------------------- codec mutations


def _interleave(
    chunks: list[tuple[str, bytes]], direction: str, mine: list[bytes]
) -> list[tuple[str, bytes]]:
    """`chunks` with the `direction` ones replaced, in order, by `mine` (extra ones at the end)."""
    out: list[tuple[str, bytes]] = []
    k = 0
    for d, data in chunks:
        if d != direction:
            out.append((d, data))
        elif k < len(mine):
            out.append((d, mine[k]))
            k += 1
    out += [(direction, data) for data in mine[k:]]
    return out


def _rechunk(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    out = []
    for d, data in chunks:
        n = len(data)
        k = rng.randint(0, 3) if n > 1 else 0
        if not k:
            out.append((d, data))
            continue
        pos = 0
        for c in sorted({rng.randrange(1, n) for _ in range(k)}):
            out.append((d, data[pos:c]))
            pos = c
        out.append((d, data[pos:]))
    return out


def _bytewise(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    i = rng.randrange(len(chunks))
    d, data = chunks[i]
    return [*chunks[:i], *((d, data[j : j + 1]) for j in range(len(data))), *chunks[i + 1 :]]


def _pipeline(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    client = [i for i, (d, _) in enumerate(chunks) if d == "F"][2:]  # past the startup
    if len(client) < 2:
        return chunks
    a = rng.randrange(len(client) - 1)
    b = min(len(client) - 1, a + rng.randint(1, 3))
    lo, hi = client[a], client[b]
    merged = b"".join(data for d, data in chunks[lo : hi + 1] if d == "F")
    answers = [(d, data) for d, data in chunks[lo : hi + 1] if d != "F"]
    return [*chunks[:lo], ("F", merged), *answers, *chunks[hi + 1 :]]


def _splice(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    i = rng.randrange(len(chunks))
    d, data = chunks[i]
    others = [x for k, x in chunks if k != d]
    if not others:
        return chunks
    other = rng.choice(others)
    out = list(chunks)
    out[i] = (d, data + other[: rng.randint(1, len(other))])
    return out


def _random_tail(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    out = chunks[: rng.randrange(3, len(chunks))] if len(chunks) > 3 else list(chunks)
    types = b"QPBEDCSHXFdcfp" + b"123ACDEGHIKNRSTVWZcdnstv"
    for _ in range(rng.randint(1, 8)):
        data = bytearray(rng.randbytes(rng.randint(1, 512)))
        if rng.random() < 0.7:  # a valid type byte and a plausible length, to get further
            data[0] = rng.choice(types)
            if len(data) >= 5:
                struct.pack_into("!I", data, 1, rng.choice([len(data) - 1, rng.randrange(4, 600)]))
        out.append((rng.choice("FB"), bytes(data)))
    return out


_TYPED = frozenset(b"QPBEDCSHXFdcfp123ACDEGHIKNRSTVWZnstv")
_DIGITS = re.compile(rb"[0-9]+")
#: a dictionary for the payload mutation, as fuzzers keep one: characters that str.isdigit()
#: accepts and int() does not (superscripts), digits of other scripts (int() takes those, the
#: server never sends them), numbers at the edges, command-tag words, separators, bad UTF-8
TOKENS = (
    "\u00b2".encode(), "\u00b9".encode(), "\u2460".encode(),  # superscripts, circled
    "\u0663".encode(), "\uff11".encode(), "\U0001d7d7".encode(),  # Nd: int() takes them
    b"0", b"-1", b"+1", b"4294967296", b"99999999999999999999", b"1e3", b"0x10", b" ",
    b"  ", b";", b"SELECT ", b"INSERT 0 ", b"FETCH ", b"COPY ", b"MOVE ", b"\x00", b"\xff",
    b"\xed\xa0\x80", b"\xc0\x80",
)  # fmt: skip


def _payload(chunks: list[tuple[str, bytes]], rng: random.Random) -> list[tuple[str, bytes]]:
    """Change one message's payload and fix its length: the frame stays valid, so the bytes
    reach the decoders (counts and lengths at extremes, strings without their NUL, ...)."""
    typed = [i for i, (_, data) in enumerate(chunks) if len(data) >= 5 and data[0] in _TYPED]
    if not typed:
        return chunks
    out = list(chunks)
    for _ in range(rng.randint(1, 3)):
        i = rng.choice(typed)
        d, data = out[i]
        frames, pos = [], 0
        while pos + 5 <= len(data):
            (length,) = struct.unpack_from("!I", data, pos + 1)
            if length < 4 or pos + 1 + length > len(data):
                break
            frames.append((pos, pos + 1 + length))
            pos += 1 + length
        if not frames:
            continue
        a, b = rng.choice(frames)
        body = bytearray(data[a + 5 : b])
        n = len(body)
        op = rng.randrange(8)
        if op == 0 and n:  # random bytes
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(n)] = rng.randrange(256)
        elif op == 1:  # cut short
            del body[rng.randrange(n + 1) :]
        elif op == 2:  # bytes added
            at = rng.randrange(n + 1)
            body[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and n >= 2:  # a 16-bit count or format at an extreme
            value = rng.choice([0xFFFF, 0x7FFF, 0x8000, 0, 1, 2])
            struct.pack_into("!H", body, rng.randrange(n - 1), value)
        elif op == 4 and n >= 4:  # a 32-bit length or oid at an extreme
            value = rng.choice([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0, n, n + 1])
            struct.pack_into("!I", body, rng.randrange(n - 3), value)
        elif op == 5 and b"\x00" in body:  # a string loses its terminator
            nuls = [k for k, v in enumerate(body) if v == 0]
            body[rng.choice(nuls)] = rng.choice(b"x\xff")
        elif op == 6:  # a token inserted anywhere
            at = rng.randrange(n + 1)
            body[at:at] = rng.choice(TOKENS)
        elif op == 7 and (runs := [m.span() for m in _DIGITS.finditer(body)]):
            a0, b0 = rng.choice(runs)  # a number (a row count, a length in text) replaced
            body[a0:b0] = rng.choice(TOKENS)
        frame = data[a : a + 1] + struct.pack("!I", len(body) + 4) + bytes(body)
        out[i] = (d, data[:a] + frame + data[b:])
    return out


EXTRA_MUTATIONS = {
    "payload": _payload,
    "rechunk": _rechunk,
    "bytewise": _bytewise,
    "pipeline": _pipeline,
    "splice": _splice,
    "random_tail": _random_tail,
}


def mutate_session(
    chunks: list[tuple[str, bytes]], rng: random.Random
) -> tuple[list[str], list[tuple[str, bytes]]]:
    """The live mode's mutations on one direction's chunks (or both), then the codec's."""
    startup = 1 if chunks[0] == ("F", SSL_REQUEST) else 0
    r = rng.random()
    directions = ("F",) if r < 0.55 else ("B",) if r < 0.85 else ("F", "B")
    kinds: list[str] = []
    for direction in directions:
        mine = [data for d, data in chunks if d == direction]
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            if len(mine) <= startup + 1:
                break
            kind, mine = mutate(mine, rng, startup)
            kinds.append(f"{direction}:{kind}")
        chunks = _interleave(chunks, direction, mine)
    for name, p in CODEC_EXTRA.items():
        if chunks and rng.random() < p:
            chunks = EXTRA_MUTATIONS[name](chunks, rng)
            kinds.append(name)
    return kinds, [(d, data) for d, data in chunks if data]  # an empty read is no event


def startup_chunks(chunks: list[tuple[str, bytes]]) -> int:
    """How many chunks the session's startup takes: through the first ReadyForQuery."""
    for i, (d, data) in enumerate(chunks):
        if d == "B" and len(data) >= 6 and data[-6:-1] == b"Z\x00\x00\x00\x05":
            return i + 1
    return len(chunks)


def codec_input(
    sessions: list[tuple[str, list[tuple[str, bytes]]]], seed: int, i: int
) -> tuple[str, str, list[str], list[tuple[str, bytes]]]:
    """Input i: (session, limits, mutations, chunks).

    Most inputs are the session's startup and a window of up to WINDOW consecutive chunks of the
    rest, from anywhere in it (as if the client had skipped what came before); FULL_SESSIONS of
    them are the whole session. Then mutate_session.
    """
    rng = random.Random(seed * 1_000_000_000 + i)
    name, chunks = sessions[rng.randrange(len(sessions))]
    limits = rng.choice(tuple(CODEC_LIMITS))
    prefix = startup_chunks(chunks)
    if rng.random() >= FULL_SESSIONS and prefix < len(chunks):
        start = rng.randrange(prefix, len(chunks))
        chunks = chunks[:prefix] + chunks[start : start + rng.randint(1, WINDOW)]
    kinds, chunks = mutate_session(chunks, rng)
    return name, limits, kinds, chunks


# --------------------------------------------------------------------------- codec replay


class Pristine:
    """What the unmutated sessions hold: their chunks and messages.

    The decoders, batch.read_batch, bind_parameters and replayable are pure functions of their
    bytes, checked once on each pristine chunk and message here; in the inputs they run on
    every other chunk and message (the stateful path, scanners and tracker, runs on all).
    """

    def __init__(self) -> None:
        self.client: set[bytes] = set()
        self.server: set[bytes] = set()
        self.front: set[tuple[int, bytes]] = set()
        self.back: set[tuple[int, bytes]] = set()


def pristine(codec: Any, sessions: list[tuple[str, list[tuple[str, bytes]]]]) -> Pristine:
    seen = Pristine()
    for _name, chunks in sessions:
        for limits in CODEC_LIMITS.values():
            s = CodecSession(codec, limits, None, seen)
            for d, data in chunks:
                s.client(data) if d == "F" else s.server(data)
        seen.client.update(data for d, data in chunks if d == "F")
        seen.server.update(data for d, data in chunks if d == "B")
    return seen


class CodecSession:
    """One session's codec state, driven as proxy/session.py drives it."""

    def __init__(
        self,
        codec: Any,
        limits: tuple[int, int, int],
        known: Pristine | None = None,
        collect: Pristine | None = None,
    ) -> None:
        c = self.c = codec
        self.max_message, self.max_read, self.max_startup = limits
        self.known = known or Pristine()
        self.collect = collect
        self.reader: Any = c.StartupReader(self.max_startup)
        front, back = c.FRONTEND_TYPE_BYTES, c.BACKEND_TYPE_BYTES
        scanner = c.FrameScanner
        # what pgsage runs: only the types the tracker reads are handed over
        self.front = scanner(c.CLIENT_INTERESTING, front, self.max_message, "frontend",
                             self.max_read)  # fmt: skip
        self.back = scanner(c.SERVER_INTERESTING, back, self.max_message, "backend", self.max_read)
        # and every message, for the decoders
        self.front_all = scanner(front, front, self.max_message, "frontend", self.max_read)
        self.back_all = scanner(back, back, self.max_message, "backend", self.max_read)
        self.tracker = c.SessionTracker(splitter=c.split_statements)
        self.ssl_pending = False
        self.sasl_started = False
        self.now = 0.0
        self.stage = ""
        self.direction = "startup"
        self.calls: Counter[str] = Counter()
        self.decoded = self.skipped = self.violations = self.executions = 0
        self.roundtrip: list[tuple[int, bytes]] = []

    # ---------------------------------------------------------------- client to server

    def client(self, data: bytes) -> str | None:
        """Feed one client chunk; the outcome if the session ends here."""
        c = self.c
        self.now += 0.001
        if self.reader is not None:
            return self._startup(data)
        self.direction = "client"
        tracker = self.tracker
        # Q, P, B at a message boundary: what pgsage's cache, steering and rewriter look at
        if self.front.at_boundary and data[0] in (0x51, 0x50, 0x42):
            pure = data not in self.known.client
            calls = self.calls
            calls["request_sql"] += 1
            if pure:
                calls["read_batch"] += 1
                self.stage = "batch.read_batch"
                if c.read_batch(data) is not None:
                    self.calls["read_batch_hit"] += 1
            self.stage = "batch.request_sql"
            if c.request_sql(data, tracker.statements) is not None:
                self.calls["request_sql_hit"] += 1
            if data[0] == 0x42 and pure:
                calls["bind_parameters"] += 1
                self.stage = "batch.bind_parameters"
                if c.bind_parameters(data) is not None:
                    self.calls["bind_parameters_hit"] += 1
        self.stage = "FrameScanner.receive_data(frontend)"
        frames = self.front.receive_data(data)
        self.stage = "SessionTracker.client_frames"
        tracker.client_frames(frames, self.now)
        self.stage = "SessionTracker.take_finished"
        self.executions += len(tracker.take_finished())
        self.stage = "FrameScanner.receive_data(frontend, all)"
        known = self.known.front
        for t, payload in self.front_all.receive_data(data):
            if payload is None:
                continue
            if t == 0x70 and not self.sasl_started:
                self.sasl_started = True
                t = 0x00  # (the first 'p' of an exchange: SASLInitialResponse)
            if (t, payload) in known:
                self.skipped += 1
            else:
                self._decode_frontend(t, payload)
        return None

    def _startup(self, data: bytes) -> str | None:
        c = self.c
        self.stage = "StartupReader.receive_data"
        packet = self.reader.receive_data(data)
        while packet is not None:
            if isinstance(packet, c.StartupMessage):
                self.stage = "StartupMessage"
                _ = (packet.user, packet.database, packet.major, packet.minor)
                packet.encode()  # the admin console's re-encoded startup
                self.calls["startup_message"] += 1
                rest = self.reader.take_remaining()
                self.reader = None
                return self.client(rest) if rest else None
            if isinstance(packet, c.SSLRequest):
                if self.reader.remaining:  # pgsage refuses it (CVE-2021-23222)
                    return "startup_violation"
                self.ssl_pending = True
            elif isinstance(packet, c.CancelRequest):
                return "cancel_request"
            elif isinstance(packet, c.DirectTLS):
                return "direct_tls"
            else:  # GSSENCRequest: answered 'N'
                self.ssl_pending = True
            self.stage = "StartupReader.receive_data"
            packet = self.reader.receive_data(b"")
        return None

    def _decode_frontend(self, t: int, payload: bytes) -> None:
        """Decode one frontend message (t 0: a SASLInitialResponse) and encode it back."""
        c = self.c
        self.decoded += 1
        if self.collect is not None:
            self.collect.front.add((t, payload))
        try:
            if t == 0x00:
                self.stage = "SASLInitialResponse.decode"
                c.SASLInitialResponse.decode(payload)
                t = 0x70
            if t == 0x42:  # B
                self.stage = "bind_names"
                c.bind_names(payload)
            self.stage = "decode_frontend"
            message = c.decode_frontend(t, payload)
        except c.ProtocolViolation:
            self.violations += 1
            return
        self.stage = "encode(decode_frontend)"
        framed = bytes((t,)) + struct.pack("!I", len(payload) + 4) + payload
        if message.encode() != framed and len(self.roundtrip) < 3:
            self.roundtrip.append((t, payload))

    # ---------------------------------------------------------------- server to client

    def server(self, data: bytes) -> str | None:
        c = self.c
        self.now += 0.001
        if self.ssl_pending and data[:1] in (b"N", b"S"):  # the answer to SSLRequest
            self.ssl_pending = False
            data = data[1:]
        if not data or self.reader is not None:
            return None  # no upstream connection before the StartupMessage
        self.direction = "server"
        if data not in self.known.server:
            self.calls["replayable"] += 1
            self.stage = "batch.replayable"
            if c.replayable(data) is not None:
                self.calls["replayable_hit"] += 1
        self.stage = "FrameScanner.receive_data(backend)"
        frames = self.back.receive_data(data)
        self.stage = "SessionTracker.server_frames"
        self.executions += len(self.tracker.server_frames(frames, self.now))
        self.stage = "FrameScanner.receive_data(backend, all)"
        known = self.known.back
        decode = c.decode_backend
        for t, payload in self.back_all.receive_data(data):
            if payload is None:
                continue
            if (t, payload) in known:
                self.skipped += 1
                continue
            self.stage = "decode_backend"
            self.decoded += 1
            if self.collect is not None:
                self.collect.back.add((t, payload))
            try:
                decode(t, payload)
            except c.ProtocolViolation:
                self.violations += 1
        return None

    # ---------------------------------------------------------------- the end, bounds

    def finish(self) -> None:
        """The connection closes: what pgsage's connection_lost does with the tracker."""
        self.stage = "SessionTracker.abandon"
        self.executions += len(self.tracker.abandon(self.now, "57014", "client left"))
        self.stage = "SessionTracker.end_suspended"
        self.executions += len(self.tracker.end_suspended())

    def check_bounds(self, data: bytes) -> None:
        for sc in (self.front, self.back, self.front_all, self.back_all):
            body = sc._body
            if (
                len(sc._hdr) >= 5
                or sc._skip > self.max_message
                or (body is not None and len(body) > self.max_read)
            ):
                raise BoundExceeded(
                    f"{sc.direction} scanner: header {len(sc._hdr)}, skip {sc._skip}, "
                    f"body {None if body is None else len(body)}"
                )
        if self.reader is not None and len(self.reader.remaining) > self.max_startup + len(data):
            raise BoundExceeded(f"startup reader holds {len(self.reader.remaining)} bytes")
        t = self.tracker
        if len(t.statements) > t.max_statements or len(t.portals) > t.max_statements + 1:
            raise BoundExceeded(
                f"tracker: {len(t.statements)} statements, {len(t.portals)} portals"
            )


def _on_alarm(signum: int, frame: Any) -> None:
    raise CodecHang(f"input still running after {HANG_SECONDS} s")


def replay_input(
    codec: Any, chunks: list[tuple[str, bytes]], limits: str, known: Pristine | None = None
) -> tuple[str, CodecSession]:
    """(outcome, session); raises what the codec raised where that is a crash."""
    s = CodecSession(codec, CODEC_LIMITS[limits], known)
    try:
        for direction, data in chunks:
            end = s.client(data) if direction == "F" else s.server(data)
            s.check_bounds(data)
            if end is not None:
                return end, s
        s.finish()
    except codec.ProtocolViolation:
        if s.stage in TOTAL_STAGES:
            raise
        # pgsage answers 08P01 (the client's), 08006 (the upstream's) and closes the session
        return f"{s.direction}_violation", s
    except codec.LocalProtocolError:
        return "local_protocol_error", s
    return "clean", s


def _signature(exc: BaseException, stage: str) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/proxy/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where} ({stage})"


# --------------------------------------------------------------------------- codec workers

_WORKER: dict[str, Any] = {}


def _codec_init(trace: bool) -> None:
    codec = _WORKER["codec"] = load_codec()
    sessions = _WORKER["sessions"] = codec_sessions()
    _WORKER["known"] = pristine(codec, sessions)
    _WORKER["trace"] = trace
    if trace and not tracemalloc.is_tracing():
        tracemalloc.start()
    # the hang alarm, unless SIGALRM is someone else's (pytest-timeout's, in the unit test)
    alarm = threading.current_thread() is threading.main_thread() and signal.getsignal(
        signal.SIGALRM
    ) in (signal.SIG_DFL, _on_alarm)
    if alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    _WORKER["alarm"] = alarm


def codec_task(task: tuple[int, int, int]) -> dict[str, Any]:
    """Inputs [start, end) of seed `seed`, in this process; their counts and crashes."""
    seed, start, end = task
    codec, sessions, known = _WORKER["codec"], _WORKER["sessions"], _WORKER["known"]
    alarm = _WORKER["alarm"]
    outcomes: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    crashes: list[dict[str, Any]] = []
    signatures: Counter[str] = Counter()
    roundtrip: list[dict[str, Any]] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(start, end):
        name, limits, kinds, chunks = codec_input(sessions, seed, i)
        s: CodecSession | None = None
        try:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            try:
                outcome, s = replay_input(codec, chunks, limits, known)
            finally:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except Exception as exc:  # a crash: anything the codec should not raise
            outcome = "bound" if isinstance(exc, BoundExceeded) else "crash"
            stage = _stage_of(exc)
            sig = _signature(exc, stage)
            signatures[sig] += 1
            if len(crashes) < 5:
                crashes.append({
                    "input": i, "seed": seed, "session": name, "limits": limits,
                    "mutations": kinds, "stage": stage, "signature": sig,
                    "exception": f"{type(exc).__name__}: {exc}"[:500],
                    "traceback": "".join(traceback.format_exception(exc))[-4000:],
                    "reproduce": f"python -m bench.fuzz --codec --seed {seed} --replay {i}",
                    "chunks": [(d, data.hex()) for d, data in chunks],
                })  # fmt: skip
        outcomes[outcome] += 1
        for kind in kinds or ["none"]:
            by_kind[f"{kind}/{outcome}"] += 1
        if s is not None:
            calls.update(s.calls)
            calls["messages_decoded"] += s.decoded
            calls["messages_pristine_not_redecoded"] += s.skipped
            calls["decode_violations"] += s.violations
            calls["executions"] += s.executions
            if s.roundtrip and len(roundtrip) < 3:
                t, payload = s.roundtrip[0]
                roundtrip.append({"input": i, "type": chr(t), "payload": payload.hex()[:400]})
    doc: dict[str, Any] = {
        "pid": os.getpid(),
        "start": start,
        "end": end,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "outcomes": outcomes,
        "by_kind": by_kind,
        "calls": calls,
        "crashes": crashes,
        "signatures": signatures,
        "roundtrip": roundtrip,
        "rss": psutil.Process().memory_info().rss,
    }
    if _WORKER["trace"]:
        doc["traced"] = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
    return doc


def _stage_of(exc: BaseException) -> str:
    """The entry point that raised: the innermost CodecSession frame's `stage`."""
    tb = exc.__traceback__
    stage = "?"
    while tb is not None:
        s = tb.tb_frame.f_locals.get("self")
        if isinstance(s, CodecSession):
            stage = s.stage
        tb = tb.tb_next
    return stage


# --------------------------------------------------------------------------- codec run


def codec_fuzz(
    inputs: int,
    seed: int = 1,
    workers: int = 1,
    batch: int = 1000,
    trace: bool = False,
    max_rss_growth_mib: float = 16.0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run inputs [0, inputs) of `seed` through the codec; the JSON document of the run."""
    tasks = [(seed, a, min(a + batch, inputs)) for a in range(0, inputs, batch)]
    outcomes: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    signatures: Counter[str] = Counter()
    crashes: list[dict[str, Any]] = []
    roundtrip: list[dict[str, Any]] = []
    memory: dict[int, list[tuple[int, int, Any]]] = {}  # pid -> [(inputs done, rss, traced)]
    done = 0
    cpu = 0.0
    next_line = 0
    progress = Progress(
        TextColumn("codec fuzz"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8,.0f} inputs/s"),
        TextColumn("[red]{task.fields[crashes]} crashes[/red]"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console or Console(stderr=True), disable=console is None,
    )  # fmt: skip
    pool = None
    if workers > 1:  # forked before the progress bar's thread starts
        pool = multiprocessing.get_context("fork").Pool(workers, _codec_init, (trace,))
        results: Iterator[dict[str, Any]] = pool.imap_unordered(codec_task, tasks)
    else:
        _codec_init(trace)
        results = map(codec_task, tasks)
    t0 = time.perf_counter()
    try:
        with progress:
            bar = progress.add_task("fuzz", total=inputs, rate=0.0, crashes=0)
            for r in results:
                done += r["end"] - r["start"]
                cpu += r["cpu_seconds"]
                outcomes.update(r["outcomes"])
                by_kind.update(r["by_kind"])
                calls.update(r["calls"])
                signatures.update(r["signatures"])
                crashes += r["crashes"][: max(0, 20 - len(crashes))]
                roundtrip += r["roundtrip"][: max(0, 5 - len(roundtrip))]
                memory.setdefault(r["pid"], []).append((done, r["rss"], r.get("traced")))
                rate = done / (time.perf_counter() - t0)
                failed = outcomes["crash"] + outcomes["bound"]
                progress.update(bar, completed=done, rate=rate, crashes=failed)
                if console is not None and not console.is_terminal and done >= next_line:
                    next_line += max(batch, inputs // 20)  # a log, not a bar: a line per 5%
                    console.print(f"  {done:,}/{inputs:,} inputs ({rate:,.0f}/s), "
                                  f"{failed} crashes, {len(memory)} workers")  # fmt: skip
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    mem = memory_summary(memory, inputs)
    failed = outcomes["crash"] + outcomes["bound"]
    bounded = mem["rss_growth_mib_max"] <= max_rss_growth_mib
    return {
        "benchmark": "fuzz",
        "mode": "codec",
        "inputs": done,
        "seconds": round(seconds, 1),
        "inputs_per_second": round(done / seconds, 1) if seconds else None,
        # CPU time of the workers (the wall clock also counts what else the machine runs)
        "cpu_seconds": round(cpu, 1),
        "microseconds_per_input_cpu": round(cpu / done * 1e6, 1) if done else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "seed": seed,
        "workers": workers,
        "sessions": {name: len(chunks) for name, chunks in codec_sessions()},
        "limits": {k: list(v) for k, v in CODEC_LIMITS.items()},
        "outcomes": dict(outcomes.most_common()),
        "crashes": failed,
        "crash_signatures": dict(signatures.most_common()),
        "crash_samples": crashes,
        "entry_points": dict(sorted(calls.items())),
        "roundtrip_mismatches": roundtrip,
        "by_mutation": dict(sorted(by_kind.items())),
        "memory": mem,
        "max_rss_growth_mib": max_rss_growth_mib,
        "ok": failed == 0 and bounded,
    }


def memory_summary(memory: dict[int, list[tuple[int, int, Any]]], inputs: int) -> dict[str, Any]:
    """Per worker: RSS once 10% of the inputs are done (the warm-up), at the end, and the peak."""
    workers = []
    for pid, series in sorted(memory.items()):
        warm = next((m for m in series if m[0] >= inputs // 10), series[-1])
        after = [m for m in series if m[0] >= warm[0]]
        w: dict[str, Any] = {
            "pid": pid,
            "batches": len(series),
            "rss_first_mib": round(series[0][1] / 2**20, 1),
            "rss_after_warmup_mib": round(warm[1] / 2**20, 1),
            "rss_peak_mib": round(max(m[1] for m in after) / 2**20, 1),
            "rss_end_mib": round(series[-1][1] / 2**20, 1),
            "rss_growth_mib": round((max(m[1] for m in after) - warm[1]) / 2**20, 2),
        }
        if series[-1][2] is not None:
            w["traced_first_mib"] = round(series[0][2][0] / 2**20, 2)
            w["traced_end_mib"] = round(series[-1][2][0] / 2**20, 2)
            w["traced_peak_mib"] = round(max(m[2][1] for m in series) / 2**20, 2)
        workers.append(w)
    return {
        "workers": workers,
        "rss_growth_mib_max": max((w["rss_growth_mib"] for w in workers), default=0.0),
        "rss_peak_mib_max": max((w["rss_peak_mib"] for w in workers), default=0.0),
    }


def replay_one(seed: int, i: int, err: Console) -> int:
    """Re-run input i in this process and show it; its exception propagates (a crash)."""
    codec = load_codec()
    sessions = codec_sessions()
    name, limits, kinds, chunks = codec_input(sessions, seed, i)
    err.print(f"input {i} (seed {seed}): session {name}, limits {limits}, mutations {kinds}")
    for d, data in chunks:
        err.print(f"  {d} {len(data):5d} {data[:64]!r}{' ...' if len(data) > 64 else ''}")
    outcome, s = replay_input(codec, chunks, limits, pristine(codec, sessions))
    err.print(f"outcome: {outcome} (last entry point {s.stage})")
    return 0


def render_codec(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pgsage codec fuzz: {doc['inputs']:,} inputs in {doc['seconds']} s "
                  f"({doc['inputs_per_second']:,.0f}/s, {doc['workers']} workers, "
                  f"{doc['microseconds_per_input_cpu']} us CPU per input)")  # fmt: skip
    table.add_column("measure")
    table.add_column("value", justify="right")
    for outcome, n in doc["outcomes"].items():
        table.add_row(f"outcome {outcome}", f"{n:,}")
    for sig, n in doc["crash_signatures"].items():
        table.add_row(f"[red]crash {sig}[/red]", f"{n:,}")
    for key, n in doc["entry_points"].items():
        table.add_row(f"entry point {key.replace('_', ' ')}", f"{n:,}")
    table.add_row("round-trip mismatches (samples)", str(len(doc["roundtrip_mismatches"])))
    mem = doc["memory"]
    for w in mem["workers"]:
        text = (f"{w['rss_after_warmup_mib']} -> {w['rss_end_mib']} MiB "
                f"(growth {w['rss_growth_mib']})")  # fmt: skip
        if "traced_peak_mib" in w:
            text += f", traced peak {w['traced_peak_mib']} MiB"
        table.add_row(f"worker {w['pid']} RSS", text)
    table.add_row("ok", str(doc["ok"]))
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument(
        "--codec",
        action="store_true",
        help="in-process fuzz of the codec (no server); default: a live pgsage",
    )
    p.add_argument(
        "--inputs",
        type=int,
        default=None,
        help="inputs to fuzz (default 2000 live, 100000 codec; the issue's full run: 1000000)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=None,
        help="RSS growth allowed after warm-up (default 100 live, 16 per codec worker)",
    )
    p.add_argument(
        "--no-save",
        action="store_true",
        help="do not write bench/results/fuzz.json (fuzz_codec.json)",
    )
    codec = p.add_argument_group("codec mode")
    codec.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)"
    )
    codec.add_argument("--batch", type=int, default=1000, help="inputs per task")
    codec.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also trace allocations (slower): traced current and peak",
    )
    codec.add_argument(
        "--replay",
        type=int,
        metavar="INDEX",
        help="re-run input INDEX of --seed in process, raising its exception",
    )
    live = p.add_argument_group("live mode")
    live.add_argument("--concurrency", type=int, default=8)
    live.add_argument("--timeout", type=float, default=15.0, help="seconds before a 'hang'")
    live.add_argument("--upstream", default="127.0.0.1:5432")
    live.add_argument("--user", default="postgres")
    live.add_argument("--pgsage-bin", default=str(Path(sys.executable).with_name("pgsage")))
    args = p.parse_args(argv)
    if args.inputs is None:
        args.inputs = 100_000 if args.codec else 2000
    if args.max_rss_growth_mib is None:
        args.max_rss_growth_mib = 16.0 if args.codec else 100.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    if args.codec:
        if args.replay is not None:
            return replay_one(args.seed, args.replay, err)
        doc = codec_fuzz(args.inputs, args.seed, args.workers, args.batch, args.tracemalloc,
                         args.max_rss_growth_mib, err)  # fmt: skip
        name = "fuzz_codec.json"
        Console().print(render_codec(doc))
    else:
        try:
            doc = benchmark(args, err)
        except BenchError as exc:
            err.print(f"[red]fuzz failed:[/red] {exc}")
            return 2
        name = "fuzz.json"
        Console().print(render(doc))
    print(json.dumps(doc, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / name).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["ok"] else 1


# --------------------------------------------------------------------------- recorded sessions

#: Real client sessions (zlib + base64 of the tests/capture.py format), recorded through
#: tests.capture.RecordingRelay against a PostgreSQL 15 cluster with a SCRAM user (a throw-away
#: password): psycopg 3.3 (extended protocol, prepared and binary statements, executemany,
#: a pipeline, COPY in, out and failed, savepoints, a notice, a named cursor, LISTEN/NOTIFY,
#: SET, an empty query), asyncpg 0.32 (named statements with Describe, executemany, a cursor
#: fetching 10 rows at a time: Execute with a row limit and PortalSuspended, binary COPY, Close)
#: and psql 15 importing a large object (fastpath FunctionCall). They would fit tests/data too.
RECORDED: dict[str, tuple[str, ...]] = {
    "psycopg": (
        "eNrFGEtv28h55DppHGfjTWMncdqmA9eJ7US2RcpyvN4KW5mibDV6mZKc2MiCpaiRzbVEMnzYlgsU6KW3Ar11bwsUeyja"
        "n9Bj/0GBHvoD9t5/kH7fkLJoxdJusgVKgENyvvdzZpgjhNzAe/yf91a34CVWysH4Gb9/QIjvMoe0/PNz0tQ8raG5LPjS"
        "bLtt6JpnWKZqap1gdlnXbM93GCHI6YECw324b1YlJVNcru5klsXUOiEo4LkNw/oAgBBqxuNmOu6kV8+eC4LbeZU9OJGU"
        "nVql2to9zKwWbGT8OTJ+DffkcLxXxfpeonCaz7hvWtmifbB/fJbfPj05iLvp+l5G39jLne+eiZ1GPfvsfH+1vXGaTseN"
        "9Frik3XUroPatfV0wzh14x8gxE5/seGVKl9U9hrlZkveMoovulLtV1WrJTDv+Fh4eeRkS+JaeZcJCTcNNsX+jTahC26d"
        "pE+PkuVidkfZevamuepuJKqnhVq1VSgpYt1r7mZrrUw94Z/r9UplI62E8SNVuOdGRwVRZvW2wUxPZaZuNQ3zkNRruQ0O"
        "uZ/VPFb1um1G8tVynBaz+3z+SZO1NL/tqZ6jma6mc+YO05qqZba7xGq1AnLDVI8sT3U9zWw2+vOzhumxQ+aokD/MMzrM"
        "JZbJIT/OA8Q50dqBUNtyvUMHwAibNlzV9W3m8PwLCWbh/QQ4vau7GELgdkE9IqRWxARdzLKGoZmUfy0nnjVZQxB9YYmT"
        "/MxlLuKqmu8dWY5xzr0WJDfCf84N0Zymqltmy3I6IBCMc+BxYcFMDew5sExGZE9frdck8gIjSEjym9/9a/GbA/i4lsd8"
        "+uUu1pMOXvMY9VjHplBLbXilixoFB1HbMTqa06XHrBunDUA58+JUp6bfYY6hLwX1JMFwR1LkTE2mtcxWQSZ9CX+owCAT"
        "l7WZ7tF5YXMT2MbpvLi5GTCbT25uhuzitFQvFAIAwSInM4Rf179GOQmCkzE+g8Ax/j6p2c4//uLS/3z1xy8RIKykcD6L"
        "ZBWQTMgE6eXhOLL5q4BvIg41GBgZB43WyMV1n4y/hYuQQI3eNfv2bTAdKnsBuP51DzKEAFV5TMaxhwlXK4x46MSPqnJB"
        "lmpUiDhwDR24otqHSTXRc2ODthyrA1E6PWIOoxpNg2cJd8fMhZ2T3M4+oyRO/oSEnAA5xgnGgudwf61duOohiTUwacaB"
        "KGJfVPME+T8KbKGrng7k2kaQbI2uxzTC+UxjuqKg+QttxoJuFevFboy8xfnhOnYuJ1GKjKGofvCnyQ2uayyU27vuhDZw"
        "1g+ukjssD36Bxn3KnSkQw4TG4mGFWpAF0Kp85tLFeQFtxZJaGigfZHCAeu+QkMMVlTTmoFGPEivJEdeVoftW9mOcvRiw"
        "Xx9+PR/KHhcj8mwIez46yaDChnG4xoPH33Z6Ydzvh9HEAZ0/lS9VZQUyC9z/IZB+yD7DkD3q5aNu+aa3+HQprF0SbEZu"
        "h5EfpvWvK7zz+XaTt2jqMix/rPdo8YtBZuM1g1x/SoKJILNjfhiE93FN63KGPyIxbsC7Kc5ZTvJ4xJKXs/cK735Ur2Rx"
        "nYj66T6uQvd0y+6Cgdw7rgfraOCfbSQKAh1qS5vYGoTExNlrrzvxunRTEGCcEFfE1E29p/6PUNikVK7sUzEi6h6KmglF"
        "QfGAIMv3uKQ/71yShEIWhQlHmBhdEDcRcTI54SQnBP6+IE74E6OznONNRSwIvgfM6FuQ+nBnrbewPTHHsZwAu9KFbYW5"
        "SRUIJuwSZA5ZplrDgobiHTGKrDm3LzFJ/gR5rZQVshc8pNTzhLBGilytvnTa0ow2a27S9xb0knOCfUDbMBlkRQ5nkd7W"
        "HJet6KSQFFJEkWB2m3mwFdSCurne98g2lshsr8wEutpfDBHzHomuPWT02pPnKYsAacBwUUwIIik2jRMDt2e00aXnzLFI"
        "DpowqikI4nOi4FZCBJx3lJzEsN3ckrfzJQ66I/W/OVYNsV7zxX5Ee1/wzhbiNLE01L7p0fY9/paG11flASp8v5rZkyvl"
        "fKlG53jrFee49jNId/sCGCH7HC1YHWVB07e/lwl/HzABUf42GKxkKpGCYPnBsYPh/jXQgp4YVhtmXOqbxhsfs9CE3bOG"
        "m905T7UBcY5kXwD6oraUXhQTS1Rr46miS9mZ4XruCnHtQxX3ymqSeB4xAyKSMxteYDVmw/r6GlHUhqfqR0w/VgNZ0aSQ"
        "0VkP0cezSrlQ2MpIL2itfNnL07xh9sARJwddTIE2m6nKl2nuIs2tEBQhmUaSu1k5UyiUJWzA8MIJHkpXAPp0t3aDLlQs"
        "5msk2lj5RD+/VxBvuWnR+XnaYIfQEsCnLqOm5Rk6owtHrN22Fj6lzGwCCuf0mxIM59VSuZaXZLIXPqUEXqTICcjLSmHV"
        "PqzuFmjLN/kRD3IKWwWcfppMbbQt/ThsHVTzqJLJg9U5u62yM6bz7vFJAsoSv+CQ1PFUrlW49KIlP8yWyftW6W8xx3dJ"
        "VpYKGQX8jydaOI75zhyV6kq1rNAc3GE/OmQmcyDhVEgNg7mLUAKppTjfnQbnBb6R2Qp3a7He7Y4ugqUr6vhuT6FAiYjC"
        "M8hoqnKhZ59PrsZ/qIwNaPndT0N9IU/Qd49zck3aQftfZpQsFWlOKRejHuKW+t9XKtrzcdDNBe6tyITIJ3gZBMqIESUX"
        "UcmFy0pCwl+t5u//h2omB9VcG5xIDeqdjOgdrPpSoVyV31EzPH9z2Duh/671O4V4t9vQ4ZhJ9aMIaiFfrcmlCGrQtbCw"
        "W11AhZZua922pTUXONUTToXVnNsnGcxL/O8ALEOsCKdnyOkpbmkHfxDBpnaB/yNyGLc2YC0i6xtVuTbqr1JIERHzMYqZ"
        "Wl7GZnSE/2f48Th/+Xh87RV+/xemOC1L"
    ),
    "asyncpg": (
        "eNqtVuty00YUXudCaS5QQiCknZZtyBSbOMSS41sYE3xNXOI48SXgTKlGlte2GlkyuiSxZ/oufZDyCP3Tf/3RB+hTpHtW"
        "8UXCBobWnl1J3+6ey3fO2d0sQugmtJk/728l6YvnMEv7GGvTCEmKTFRTIKqk1WW1iR5bZmMz+hhZBtFRw+r1UF00xZpo"
        "EPsLgYwHRdqt0DZXShUT+c3SfmKTD4URAtGpDu2SrgGE/Krfr8ZBhl+P917Xu4FsrloIJ9/GLoIlSy10LiOxs5LaKW1k"
        "z7OghICSOm3zH5+/oZzsmxW5lK/ky+VwOVm9bG1kXr3i/Ua8cpKQoifZ3vEl365V0hu96pYSvYjH/XJ8OxALg8UWWGxK"
        "8Zp8Yfj/g7JOPLt/Fn2bVDdq1YgRTCQujuv7Yqda/XFfeZW75GIHBxuR4nH2rJPMn8Wpj54/wEegZ+E83k12O+nTaFN7"
        "eRpsK8k6l26d/tI6qZ1l1Eg2xKW2FbNwcLanXra0ePE6qqhE232x01FkSTRlTRVUsU1seNUd2ko5G2UjK2nRJCWzqxCU"
        "KxX8OJ+uMvyHOmmIlmIKpi6qhigxgToR64KmKl2kNRr2clkVWpopGKao1mtDfFVWTdIkukAzhphymxhIU9nINzk6op+L"
        "iq20oxlmU6fDMLYsG4JhdYjOMu56wSp9P6eS3redvx6hzaDmIS70lA9gb5rUZFHF7GszsFEnNY63OB9b8tAgBswVRMts"
        "abrcY0zZ6Qzjj5gjol4XJE1taHqbKqTO6fQx8OBemfpzqqkEZUxpq1JOoZcQNYSC/8SfvX1zSj9mc5BL0WPaRSTKmkmw"
        "SdodTKtHIdjCXhFTgvy4RuFL+pQw48gU2x2z57PrKkW7O6liJlHO4HIieZBBQ8lvjmj3XBBEo6tKHbCwbQqcICCDKEQy"
        "8Tq3s8MUrPM7O7aK9eDOTkPRRDNKl6ZBQWnM+n06MAPqGxy8mbRbgq2BVfgqQlPvyvQlj6ap9G00+K2gmSv6o5VDdQ3h"
        "1asrGx4otn9T79BNewCcKYC+XTTGGqrZw/5gwQxsWNAuIeFfzFzLosMZ+vgS9UuAmR/j4Q3cfPiBxUDxYilzkEmVMfcx"
        "enlqkKzSlDMhdhqNIk1iixjYu84B0X6sahden28SvfwovasDem+hqT69KmCg/3eYwqMxAuhk4GPq2iVG5nnAScKnLvaw"
        "xdznLZ5ii/kJ9GcY/UDv7dxhKVMs4wAl+NPBYSgWoIbmk5m93OEzZtwdmDvHAHtaGaa1IGI5l9nBYUE0/bhpVwJu6Fob"
        "N4lKdFqWAo2nTAwvjSAf8uHmpOAFR4P3bBC8GwhBPTxFU80xxdAcUwlg7CkICQ81dDTdFBVhm+oYo5bRPsjzb8cuY8dv"
        "37y/Brl/1xFrD+fE4OnhnRjUiifoxNj6bSc2C1jIid0ALOzEvgAs4sTgsPJEnRjkjycG2PIAmwMbuYABn8NIP/pEFv52"
        "CptnwjgnuMBA3gkuMjDoBG8xcNsJ3mZgyAl+xcCwE7zDwIgTXGJg1AneZaCLiWUA+c9l4lensHtMmIuJ+wx0MbHCQBcT"
        "DxjoYmKVgaHR/TQ0Up0YBr4+GmvqwMz5oNO9Raj8hVQhn8+V7dJfAjHzNjKyRfwMtb/rqpwQiLYtWRPX/HitBp20hrPF"
        "Qh6vWWv4IEfFYG5SxYdGK77grvgkmhbp48U8q6xBxddsbGq04iUbo5U189vosRcD/6KpwlEVzPE6rPTZZpbK6dwh9mYL"
        "xXyijGuyKupdH2Zc3NoDijz9ExIEbsIF2X+0ByLnrhbnhrvP9Gg1SrZhsGJW6jvYp5YaM7r7Vo6cOxVjJjzcVp/Yu6mF"
        "L1pEJ1jEcXr1mMRoeJTR0oDROZvC/4nVHRD+BI1RfX2V6DMxenB5BknoHeydK2NYGxYgY+clsON3qYq8dwvDWzgwiZPI"
        "KCf8OE6+R55dSVOstro75oiZ7HLE7bJnwlmdBCxBj95ioYhO7EeK5wMcj/J1+VyG6zKudXGP6BrKUn+eSuggGo6hItwB"
        "6Qz70nBjyMtPwEvcZU90yIukWarpfeJzJ8/zDyRPdJSorXFEfUeDBIKHLC1/PDGibpbQhMR4NEiMJTb3Zr+0XDkx+xq+"
        "/wUJFA0R"
    ),
    "psql_lo": (
        "eNqdVd1y20QUXidpCUnLAC2UUKBiOkMS4jSWHP/kQpM4lt2Y1k0T2yE2ZTSytHbUyLuKdh3/XHHFe3DLE5RheAh4CW54"
        "B9izkiO7pEMHzax09nznd885qzJCaBHWwh8fb+0LIvGsLN45ueYR6jMcoE5/PEaOxa22xXC4s3zfc22Lu5SYxOph5LML"
        "DyGw8MmxeN0Ta6lWPC5UN2sHhU0tk0VIGvbFK/sagJBCkkmiJwO95bS1QXmEO/l9km+W6njsqePnw30w/D0YfiHW8pvl"
        "SraaH3ZSp8ZZvaplBs5BrtZ6Osq1k0xvnBTs/El5fDTUeu2GsTFubnn5ga4nXX07tZOF6HoQnWfrbXfAkv/Dia8Pt8q5"
        "b5q1ynmpXzm+xO3R+eW3o96+PxhWDh6/HD43Bjxdc+yL7VFBFzklfoec4AhuXer20Wnt8KSlHpx3NrSyyi4MyooGbal+"
        "L2UEjWY56D65qO503YuCfhzVDdXE+vT6agC0YnsuJtzExKaOS7qoUS/nJXLPsDiu8ZGHUaV2mFSqRlPyv3Jwx+p73OSB"
        "RZhlS6MBthyTEm+EaKcTqrvEPKPcZNwiTjvmr7iE4y4OTNEvmLs9zBAlErlfEUhwaXmhU58y3g0EDNhdl5ms7+NA9luk"
        "sCLoS2Hp37FrESIWE+EhNfNISylrBm67FlHkbjO14eC2qvXVdanygGEGsqbV52c0cMfytMJmBvyhTMQKHNOmpEODnnAo"
        "kgvE5yqDj+oinxYlGJW4vdWoF9ETqBxC6b9e/fTjDy2xuVGBPlo+gvbfLz2uPJMj8UEx3kupupBKFIRUYo9hD9tc8QMK"
        "lUsq1HWUTkB7it81RUktj3YfCVLgtjI4wwGeiCouUdZWPWpSH5PVpAKk7VGGJ7QoGp+mJ0CfeC45jzYew3iGzm5HO449"
        "b4qM+UGf2LG1yXaCQ6uE1CBwhdS6Is51EjPzLRsrurIWZf2GZGPRMGPCfJmxrqzGgqvrcLaJn+tyguYiD2Kz8CeaE587"
        "aO9v8SAknITcBMwKWgi5BlxVUvCd6AwFOb+T0QBYkcDi5ERDJG3Iiw2Qm2GeIX97xpTMOgQys6bk8YZIFpDPJLIUHzxE"
        "mVZzqdcigNqFajlDZgDIu1dVBSinZmbzgYqFOnkA7l/phKWMPKmAfS6x5alSAqqmUjKvBxK9PVPoSFubjSZsK+k0uw0N"
        "/16t9LRUrCtqOm56tFKWcaL530Q5ErIkC+gm/HhgUO6chAMleGjv/VjrS3gpQuuV1JmbSMjv3HXaaMrnC3h9J7R/ndaW"
        "z65nBV2s0PZLaEcx+lzclktvz7zG8e41yf4ylSz6r3Bvwe2xXDysVit1eX18WJxixLeMBnJqNEk27RO+9vX61TjJcMNo"
        "zR7mFvy/pbVdGJgvUEJqoKvnLlqMB2NZxppQwfHtSRmnXN84hbD/ARHO/eI="
    ),
}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
