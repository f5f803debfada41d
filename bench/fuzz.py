"""Wire-protocol fuzz of a running pgsage: mutated captures of real client traffic (issue 13).

`python -m bench.fuzz --inputs 1000000` starts `pgsage serve` (a subprocess, as
bench/overhead.py does; bench never imports proxy) in front of the upstream and opens one
connection per input. Each input is the shipped psql session (tests/data/psql_session.capture,
read as data) with its startup packet rewritten to an unprivileged scratch role and database,
then mutated: bit flips, truncations, wrong and oversized lengths, invalid UTF-8, random bytes,
dropped or repeated chunks, mutated startup packets. The client sends its chunks and
reads until pgsage closes (half-closing after a moment of silence, for inputs whose Terminate
was mutated away).

Every connection must end in one of the expected ways: normal answers (the server's own, errors
included) and a close at the client's EOF, or an ErrorResponse FATAL 08P01 as the last message
and a close (or a silent close, for a CancelRequest or a TLS ClientHello). Failures: a
connection left open (`hang`), a backend stream that does not frame (`bad_framing`), messages
after a FATAL (`after_fatal`). Meanwhile a control client runs a query every 0.2 s and the RSS of
the pgsage process is sampled. Outcomes `fatal_<sqlstate>` are the server's own answers
(a mutated user name: 28000) or pgsage's (08006 after a pipelined Terminate: a known issue);
`reset` is a close while the client was still sending (TCP then drops the unread FATAL).
Inputs are reproducible: input i uses Random(seed * 1e9 + i).

Prints a rich table and JSON and writes bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg
from rich.console import Console
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
    """(direction, bytes) chunks: F frontend, B backend (format of tests/capture.py)."""
    raw = path.read_bytes()
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


def mutate(chunks: list[bytes], rng: random.Random) -> tuple[str, list[bytes]]:
    """One mutation of the session; returns its kind and the chunks to send."""
    kind = rng.choice(MUTATIONS)
    chunks = list(chunks)
    if kind == "none":
        return kind, chunks
    # mutations after startup pick a chunk past the SSLRequest and the StartupMessage
    i = rng.randrange(2, len(chunks)) if kind not in ("startup", "startup_length") else 1
    data = bytearray(chunks[i])
    n = len(data)
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
            with psycopg.connect(host="127.0.0.1", port=port, user=args.user, dbname=db,
                                 connect_timeout=5) as c:  # fmt: skip
                c.execute("select 1")

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=2000,
                   help="connections to fuzz (the issue's full run: 1000000)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before a 'hang'")
    p.add_argument("--upstream", default="127.0.0.1:5432")
    p.add_argument("--user", default="postgres")
    p.add_argument("--pgsage-bin", default=str(Path(sys.executable).with_name("pgsage")))
    p.add_argument("--max-rss-growth-mib", type=float, default=100.0)
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/fuzz.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    try:
        doc = benchmark(args, err)
    except BenchError as exc:
        err.print(f"[red]fuzz failed:[/red] {exc}")
        return 2
    Console().print(render(doc))
    print(json.dumps(doc, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "fuzz.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
