"""CI's short version of the codec fuzz (bench/fuzz.py --codec, issue 13).

A few thousand mutated captures of real client traffic through the codec entry points pgsage
runs per session: no crash (an exception other than ProtocolViolation / LocalProtocolError where
pgsage catches them), no buffer over its limit, and memory flat. The full run is
`python -m bench.fuzz --codec --inputs 1000000`.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from bench import fuzz

SEED = 13  # a different slice of inputs than the full run's seed 1


def test_recorded_sessions_replay_cleanly() -> None:
    codec = fuzz.load_codec()
    sessions = fuzz.codec_sessions()
    names = {name for name, _ in sessions}
    assert {"psql_session", "psycopg", "asyncpg", "psql_lo"} <= names
    known = fuzz.pristine(codec, sessions)
    for name, chunks in sessions:
        for limits in fuzz.CODEC_LIMITS:
            outcome, s = fuzz.replay_input(codec, chunks, limits, known)
            assert outcome == "clean", (name, limits)
            assert s.tracker.backend_pid is not None and s.executions > 0, name
            assert s.front.at_boundary and s.back.at_boundary, name


def test_inputs_are_reproducible() -> None:
    sessions = fuzz.codec_sessions()
    for i in (0, 1, 977, 123_456):
        assert fuzz.codec_input(sessions, SEED, i) == fuzz.codec_input(sessions, SEED, i)
    assert fuzz.codec_input(sessions, SEED, 0) != fuzz.codec_input(sessions, SEED + 1, 0)


def test_codec_fuzz_short_run() -> None:
    doc = fuzz.codec_fuzz(2000, seed=SEED, workers=1, batch=500)
    assert doc["inputs"] == 2000
    assert doc["crashes"] == 0, doc["crash_samples"][:1]
    assert "crash" not in doc["outcomes"] and "bound" not in doc["outcomes"]
    # the inputs reach every layer: sessions end cleanly and by protocol violations of both
    # sides, and mutated messages get past the framing into the decoders
    for outcome in ("clean", "client_violation", "server_violation", "startup_violation"):
        assert doc["outcomes"].get(outcome, 0) > 100, doc["outcomes"]
    calls = doc["entry_points"]
    for key in ("read_batch", "request_sql", "bind_parameters", "replayable"):
        assert calls.get(key, 0) > 0, calls
    assert calls["messages_decoded"] > 1000 and calls["decode_violations"] > 100
    assert doc["roundtrip_mismatches"] == []
    assert doc["memory"]["rss_growth_mib_max"] <= 16
    assert doc["ok"]


def test_codec_memory_is_flat() -> None:
    """Traced allocations: the codec state of one input never outlives it."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        doc = fuzz.codec_fuzz(300, seed=SEED + 2, workers=1, batch=50, trace=True)
    finally:
        if started:
            tracemalloc.stop()
    (worker,) = doc["memory"]["workers"]
    assert doc["crashes"] == 0
    assert worker["traced_peak_mib"] < 16
    assert worker["traced_end_mib"] - worker["traced_first_mib"] < 1.0


def test_a_crash_is_recorded_and_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec entry point raising something else than ProtocolViolation is a crash, recorded
    with its input and traceback; --replay raises it again."""
    real = fuzz.load_codec
    pristine = {data for _, chunks in fuzz.codec_sessions() for _, data in chunks}

    def broken() -> Any:
        codec = real()
        read_batch = codec.read_batch

        def read_batch_with_a_bug(data: bytes) -> Any:
            if data.startswith(b"Q") and data not in pristine:  # some mutated Query
                raise KeyError("planted bug")
            return read_batch(data)

        codec.read_batch = read_batch_with_a_bug
        return codec

    monkeypatch.setattr(fuzz, "load_codec", broken)
    doc = fuzz.codec_fuzz(300, seed=SEED, workers=1, batch=100)
    assert doc["crashes"] > 0 and not doc["ok"]
    sample = doc["crash_samples"][0]
    assert sample["stage"] == "batch.read_batch"
    assert "KeyError: 'planted bug'" in sample["exception"]
    assert "read_batch_with_a_bug" in sample["traceback"]
    assert sample["chunks"] and sample["reproduce"].endswith(f"--replay {sample['input']}")
    with pytest.raises(KeyError, match="planted bug"):
        fuzz.replay_one(SEED, sample["input"], fuzz.Console(stderr=True, quiet=True))


def _frame(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + (len(payload) + 4).to_bytes(4, "big") + payload


def test_replayable_with_a_superscript_in_the_row_count() -> None:
    """Found by bench.fuzz --codec: a row count str.isdigit() accepts but int() does not."""
    codec = fuzz.load_codec()
    tag = "SELECT 1\u00b2"
    reply = _frame(b"T", b"\x00\x00") + _frame(b"C", tag.encode() + b"\x00") + _frame(b"Z", b"I")
    assert codec.replayable(reply) in (None, (tag, None))
