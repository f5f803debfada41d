"""The relay's side of the query log: one call per request, a bound counted in statements."""

from __future__ import annotations

import asyncio

from proxy.protocol import Execution, Protocol, Status
from proxy.records import SessionInfo
from proxy.settings import Settings
from proxy.telemetry.logrows import flatten
from proxy.telemetry.sink import BatchingSink


def _ex(i: int, status: Status = Status.OK) -> Execution:
    return Execution(Protocol.SIMPLE, f"select {i}", float(i), float(i) + 0.5, rows=1,
                     status=status, bytes_sent=10 + i)  # fmt: skip


def _sink(queue: int, batch: int) -> BatchingSink:
    async def make() -> BatchingSink:  # (the sink's Event wants a running loop on 3.11)
        return BatchingSink(Settings(querylog_queue_size=queue, querylog_batch_size=batch))

    return asyncio.run(make())


def test_the_bound_counts_statements_and_keeps_what_fits() -> None:
    sink = _sink(queue=100, batch=1000)
    info = SessionInfo(1, "127.0.0.1:5000", "db")
    sink(info, [_ex(i) for i in range(98)], False)
    sink(info, [_ex(98), _ex(99), _ex(100), _ex(101)], False)  # two fit, two do not
    sink(info, [_ex(102)], False)  # full: counted
    assert sink.queued == 100 and sink.dropped_full == 3
    groups = sink.take()
    assert [ex.sql for g in groups for ex in g[1]] == [f"select {i}" for i in range(100)]
    assert sink.queued == 0 and not sink.queue


def test_a_full_batch_wakes_the_flusher_once_when_crossed() -> None:
    sink = _sink(queue=100, batch=4)
    info = SessionInfo(1, "127.0.0.1:5000")
    sink(info, [_ex(0), _ex(1), _ex(2)], False)
    assert not sink.wake.is_set()
    sink(info, [_ex(3), _ex(4)], False)  # 3 -> 5 crosses 4
    assert sink.wake.is_set()
    sink.wake.clear()
    sink(info, [_ex(5)], False)
    assert not sink.wake.is_set()


def test_take_stops_at_the_limit_without_splitting_a_request() -> None:
    sink = _sink(queue=100, batch=100)
    a, b = SessionInfo(1, "a"), SessionInfo(2, "b")
    sink(a, [_ex(0), _ex(1)], False)
    sink(b, [_ex(2), _ex(3)], True)
    sink(a, [_ex(4)], False)
    first = sink.take(3)  # the second request passes the limit and comes whole
    assert [len(g[1]) for g in first] == [2, 2] and sink.queued == 1
    assert [len(g[1]) for g in sink.take(3)] == [1] and sink.queued == 0


def test_flatten_gives_one_row_per_statement_and_the_sessions_they_mention() -> None:
    a, b = SessionInfo(7, "a", "db1"), SessionInfo(9, "b", "db2")
    sessions, rows = flatten([(a, [_ex(0), _ex(1, Status.ERROR)], False), (b, [_ex(2)], True)])
    assert sessions == {7: a, 9: b}
    assert [(r[0], r[2], r[7], r[11], r[15]) for r in rows] == [
        (7, "select 0", Status.OK, 10, False),
        (7, "select 1", Status.ERROR, 11, False),
        (9, "select 2", Status.OK, 12, True),
    ]
    assert rows[0][1] == "simple" and rows[0][4:6] == (0.0, 0.5)
