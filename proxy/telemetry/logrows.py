"""The query log worker's per-statement work: flat records -> query_logs rows -> binary COPY.

Compiled with mypyc (models/accel.py; the source serves when no build matches it), because on
`pgbench -S` this runs once per statement on the same cores as the relay (issue "Query log":
the whole log may cost at most 5% of the proxy's TPS).

- `flatten` makes the flat records the proxy ships (querylog.`Row`); `build` turns them into
  `metadata.query_logs` rows (tuples in `COLUMNS` order; times as epoch seconds) and collects
  what the metrics and the per-fingerprint aggregates need, grouped, for the caller to apply in
  bulk.
- `CopyEncoder` writes those rows in PostgreSQL's binary COPY format. asyncpg's
  `copy_records_to_table` encodes every value of every row through its generic codecs (a text[]
  alone cost a microsecond a row); here the encodings of the values that repeat (fingerprints,
  normalised texts, session identity, small counts) are memoised, so a typical row is a few
  dictionary lookups and three `struct` packs.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from typing import Any, Final

# ---------------------------------------------------------------------------------- encoding

#: value kinds of the binary COPY encoder (Final: mypyc compiles them in as constants)
TEXT: Final = 0
TEXT_MEMO: Final = 1
BOOL: Final = 2
INT8: Final = 3
INT4: Final = 4
FLOAT8: Final = 5
TIMESTAMPTZ: Final = 6
TEXT_ARRAY: Final = 7

#: the type of each query_logs column (warehouse_sql/migrations/0020_metadata.sql), in the
#: order of the rows `build` makes; TEXT_MEMO
#: for text that repeats from row to row, TEXT for text that rarely does (it is not memoised)
KINDS: dict[str, int] = {
    "started_at": TIMESTAMPTZ,
    "finished_at": TIMESTAMPTZ,
    "duration_ms": FLOAT8,
    "fingerprint": TEXT_MEMO,
    "query_text": TEXT,
    "normalized_text": TEXT_MEMO,
    "command": TEXT_MEMO,
    "is_catalog": BOOL,
    "parsed": BOOL,
    "tables_used": TEXT_ARRAY,
    "database_name": TEXT_MEMO,
    "user_name": TEXT_MEMO,
    "application_name": TEXT_MEMO,
    "app_class": TEXT_MEMO,
    "client_addr": TEXT_MEMO,
    "protocol": TEXT_MEMO,
    "statement_name": TEXT_MEMO,
    "rows_returned": INT8,
    "status": TEXT_MEMO,
    "sqlstate": TEXT_MEMO,
    "error_message": TEXT,
    "bytes_sent": INT8,
    "session_id": INT8,
    "transaction_status": TEXT_MEMO,
    "portal_suspensions": INT4,
    "proxy_instance": TEXT_MEMO,
    "label": TEXT,
    "predicted_cost_ms": FLOAT8,
    "model_version": TEXT_MEMO,
    "cache_hit": BOOL,
    "hint_set": TEXT_MEMO,
    "rewrite_rule": TEXT_MEMO,
}
#: the query_logs columns in the order of the rows `build` makes
COLUMNS: Final = tuple(KINDS)

#: the columns without a NOT NULL or a default (0020_metadata.sql): leaving one out of a COPY
#: stores the NULL that writing it would
NULL_DEFAULT: Final = frozenset(
    (
        "query_text",
        "normalized_text",
        "tables_used",
        "database_name",
        "user_name",
        "application_name",
        "app_class",
        "client_addr",
        "statement_name",
        "rows_returned",
        "sqlstate",
        "error_message",
        "bytes_sent",
        "session_id",
        "transaction_status",
        "proxy_instance",
        "predicted_cost_ms",
        "model_version",
        "hint_set",
        "rewrite_rule",
        "label",
    )
)

#: PostgreSQL's timestamps count microseconds from 2000-01-01 00:00 UTC
PG_EPOCH_SECONDS: Final = 946_684_800
TEXT_OID: Final = 25
COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
COPY_TRAILER: Final = b"\xff\xff"
NULL: Final = b"\xff\xff\xff\xff"
TRUE: Final = b"\x00\x00\x00\x01\x01"
FALSE: Final = b"\x00\x00\x00\x01\x00"
#: memoised encodings kept at most (the memo starts afresh beyond)
MEMO_MAX: Final = 50_000
#: integers memoised: the small counts and sizes that repeat (rows, bytes, suspensions)
SMALL_INT: Final = 4096
#: texts longer than this are encoded afresh each time, never kept
MEMO_TEXT_MAX: Final = 512
#: encoded runs of columns kept at most, per run (the memo starts afresh beyond), and the
#: longest kept
SEGMENT_MEMO_MAX: Final = 4096
SEGMENT_BYTES_MAX: Final = 1024

_LEN = struct.Struct("!i")
_INT8 = struct.Struct("!iq")
_INT4 = struct.Struct("!ii")
_FLOAT8 = struct.Struct("!id")
_ARRAY_HEAD = struct.Struct("!iiiii")  # ndim, has nulls, element oid, size, lower bound


def _unix_micros(t: float) -> int:
    """Epoch second `t` in whole microseconds, rounded as `datetime.fromtimestamp` rounds (half
    to even, on the exact fraction)."""
    # by hand, with native float -> int truncations once compiled: math.floor and round() are
    # calls into the interpreter, and this runs four times for each logged row
    whole = int(t)
    if whole > t:  # negative, with a fraction: truncation went up
        whole -= 1
    frac = (t - whole) * 1e6  # in [0, 1e6); its fraction below is exact
    micros = int(frac)
    rest = frac - micros
    if rest > 0.5 or (rest == 0.5 and micros & 1):
        micros += 1
    return whole * 1_000_000 + micros


def _micros(t: float) -> int:
    """Microseconds from PostgreSQL's epoch to epoch second `t` (a timestamptz's binary value)."""
    return _unix_micros(t) - PG_EPOCH_SECONDS * 1_000_000


def to_micro(t: float) -> float:
    """`t` rounded to the microsecond, as the float `datetime.timestamp()` gives for it: every
    reader then agrees on the microsecond (the COPY here, `to_timestamp()` in SQL, which rounds
    a finer float its own way: an anomaly's window must hold its execution's started_at)."""
    return _unix_micros(t) / 1e6


class EncodeError(ValueError):
    """A value the binary COPY format (or the column) cannot take; names the column."""


class CopyEncoder:
    """Rows as a binary COPY payload (header, tuples, trailer) for the columns given."""

    def __init__(self, columns: tuple[str, ...] = COLUMNS) -> None:
        self.columns = columns
        self.kinds = [KINDS[c] for c in columns]
        self._text: dict[str, bytes] = {}
        self._arrays: dict[tuple[str, ...], bytes] = {}
        self._int8: dict[int, bytes] = {}
        self._int4: dict[int, bytes] = {}
        #: encodings of runs of columns (`_steps`) by their values, per run
        self._segments: dict[tuple[int, ...], dict[tuple[Any, ...], bytes]] = {}

    def encode(self, rows: list[tuple[Any, ...]]) -> bytes:
        """Every column of every row."""
        return self._encode(rows, list(range(len(self.kinds))))

    def encode_present(self, rows: list[tuple[Any, ...]]) -> tuple[tuple[str, ...], bytes]:
        """The columns to COPY and their payload: a column whose default is NULL and that is
        NULL in every row is left out (PostgreSQL fills in the same NULL; a field fewer per
        row to encode, send and parse: 11 of the 32 on a pgbench -S batch)."""
        keep: list[int] = []
        columns = self.columns
        for i in range(len(columns)):
            if columns[i] in NULL_DEFAULT:
                for row in rows:
                    if row[i] is not None:
                        keep.append(i)
                        break
            else:
                keep.append(i)
        return tuple([columns[i] for i in keep]), self._encode(rows, keep)

    def _encode(self, rows: list[tuple[Any, ...]], keep: list[int]) -> bytes:
        parts: list[bytes] = [COPY_HEADER]
        kinds = self.kinds
        width = len(kinds)
        count = struct.pack("!h", len(keep))
        steps = self._steps(keep)
        none: dict[tuple[Any, ...], bytes] = {}
        memos = [self._segments.setdefault(tuple(step), {}) if len(step) > 1 else none
                 for step in steps]  # fmt: skip
        for row in rows:
            if len(row) != width:
                raise EncodeError(f"a row has {len(row)} values for {width} columns")
            parts.append(count)
            for k in range(len(steps)):
                step = steps[k]
                if len(step) == 1:
                    parts.append(self._field(step[0], row[step[0]]))
                    continue
                # a run of columns that repeat together (a session's and a template's): one
                # lookup for all of them
                key = row[step[0] : step[-1] + 1]
                memo = memos[k]
                try:
                    b = memo.get(key)
                except TypeError:  # an unhashable value (a list for an array): not memoised
                    parts.extend([self._field(i, row[i]) for i in step])
                    continue
                if b is None:
                    b = b"".join([self._field(i, row[i]) for i in step])
                    if len(b) <= SEGMENT_BYTES_MAX:
                        if len(memo) >= SEGMENT_MEMO_MAX:
                            memo.clear()
                        memo[key] = b
                parts.append(b)
        parts.append(COPY_TRAILER)
        return b"".join(parts)

    def _steps(self, keep: list[int]) -> list[list[int]]:
        """`keep` in steps: single columns, and runs of two or more adjacent columns whose values
        repeat from row to row together (memoised texts, booleans, arrays), encoded as one."""
        steps: list[list[int]] = []
        run: list[int] = []
        for i in keep:
            if self.kinds[i] in (TEXT_MEMO, BOOL, TEXT_ARRAY):
                if run and run[-1] != i - 1:  # a run is contiguous: its key is a slice
                    steps.extend([run] if len(run) > 1 else [[j] for j in run])
                    run = []
                run.append(i)
                continue
            steps.extend([run] if len(run) > 1 else [[j] for j in run])
            run = []
            steps.append([i])
        steps.extend([run] if len(run) > 1 else [[j] for j in run])
        return steps

    def _field(self, i: int, v: Any) -> bytes:
        """One value of column `i` as a binary COPY field (length and bytes)."""
        if v is None:
            return NULL
        kind = self.kinds[i]
        if kind == TEXT_MEMO:
            memo = self._text
            b = memo.get(v)
            if b is None:
                b = self._text_of(i, v)
                if len(b) <= MEMO_TEXT_MAX:
                    if len(memo) >= MEMO_MAX:
                        memo.clear()
                    memo[v] = b
            return b
        if kind == TIMESTAMPTZ:
            return _INT8.pack(8, _micros(float(v)))
        if kind == FLOAT8:
            return _FLOAT8.pack(8, float(v))
        if kind == BOOL:
            return TRUE if v else FALSE
        if kind == INT8:
            return self._int8_of(i, v)
        if kind == INT4:
            return self._int4_of(i, v)
        if kind == TEXT_ARRAY:
            return self._array_of(i, v)
        return self._text_of(i, v)

    def _text_of(self, i: int, v: object) -> bytes:
        if not isinstance(v, str):
            raise EncodeError(f"{self.columns[i]}: expected text, got {type(v).__name__}")
        # (a lone surrogate is a byte the relay could not decode as UTF-8: "?" in its place,
        # not a failed COPY that would lose the batch)
        data = v.encode("utf-8", "replace")
        return _LEN.pack(len(data)) + data

    def _int8_of(self, i: int, v: object) -> bytes:
        if not isinstance(v, int):
            raise EncodeError(f"{self.columns[i]}: expected an integer, got {type(v).__name__}")
        small = -SMALL_INT < v < SMALL_INT
        if small:
            b = self._int8.get(v)
            if b is not None:
                return b
        try:
            b = _INT8.pack(8, v)
        except struct.error as exc:
            raise EncodeError(f"{self.columns[i]}: {v} is out of range for bigint") from exc
        if small:
            if len(self._int8) >= MEMO_MAX:
                self._int8.clear()
            self._int8[v] = b
        return b

    def _int4_of(self, i: int, v: object) -> bytes:
        if not isinstance(v, int):
            raise EncodeError(f"{self.columns[i]}: expected an integer, got {type(v).__name__}")
        b = self._int4.get(v)
        if b is None:
            try:
                b = _INT4.pack(4, v)
            except struct.error as exc:
                raise EncodeError(f"{self.columns[i]}: {v} is out of range for integer") from exc
            if -SMALL_INT < v < SMALL_INT:
                if len(self._int4) >= MEMO_MAX:
                    self._int4.clear()
                self._int4[v] = b
        return b

    def _array_of(self, i: int, v: object) -> bytes:
        if not isinstance(v, tuple | list):
            raise EncodeError(f"{self.columns[i]}: expected a sequence, got {type(v).__name__}")
        key = tuple(v)
        b = self._arrays.get(key)
        if b is not None:
            return b
        if not key:
            body = struct.pack("!iii", 0, 0, TEXT_OID)
        else:
            elements = [self._text_of(i, e) for e in key]
            body = _ARRAY_HEAD.pack(1, 0, TEXT_OID, len(key), 1) + b"".join(elements)
        b = _LEN.pack(len(body)) + body
        if len(self._arrays) >= MEMO_MAX:
            self._arrays.clear()
        self._arrays[key] = b
        return b


# ---------------------------------------------------------------------------------- building


def flatten(
    groups: list[tuple[Any, list[Any], bool]],
) -> tuple[dict[int, Any], list[tuple[Any, ...]]]:
    """What the relay queued (sink.Group: a session, its executions, whether their texts may
    keep their literals) as flat rows (querylog.Row) plus the sessions they mention: what
    crosses to the log worker."""
    sessions: dict[int, Any] = {}
    rows: list[tuple[Any, ...]] = []
    for group in groups:
        info = group[0]
        keep: bool = group[2]
        sid: int = info.id
        sessions[sid] = info
        for ex in group[1]:
            rows.append(
                (sid, ex.protocol, ex.sql, ex.statement, ex.start, ex.end, ex.rows, ex.status,
                 ex.sqlstate, ex.error_message, ex.suspensions, ex.bytes_sent, ex.cache_hit,
                 ex.hint_set, ex.rewrite_rule, keep)
            )  # fmt: skip
    return sessions, rows


_QUOTED = re.compile(r'"[^"]*"')
_LABEL = re.compile(r"/\*\s*pgsage:label=([\w.:-]{1,64})\s*\*/")


def label_of(sql: str) -> str | None:
    """The workload simulator marks injected executions with /* pgsage:label=KIND:ID */."""
    if "pgsage:label=" not in sql:
        return None
    m = _LABEL.search(sql)
    return m.group(1) if m else None


def copy_direction(sql: str | None) -> str:
    if not sql:
        return "file"
    upper = sql.upper()
    if "FROM STDIN" in upper:
        return "in"
    if "TO STDOUT" in upper:
        return "out"
    return "file"


class Built:
    """What `build` made of a slice of records: the rows, and the metric inputs grouped."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        #: (database, command, protocol, status, app class) -> durations in seconds
        self.groups: dict[tuple[str, str, str, str, str], list[float]] = {}
        #: fingerprint id -> (Fingerprint, durations, row counts with None for each error)
        self.by_fp: dict[str, tuple[Any, list[float], list[int | None]]] = {}
        self.rows_by: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.copies: dict[str, int] = {}
        self.suspensions = 0
        #: log(predicted / actual) of the successful executions with a prediction
        self.log_ratios: list[float] = []
        #: monotonic start of the last record (0.0 with none)
        self.last_start = 0.0


def build(
    sessions: dict[int, Any],
    records: list[tuple[Any, ...]],
    fingerprint: Callable[[str], Any],
    epoch: Callable[[float], float],
    anchor: tuple[float, float, float],
    instance: str | None,
    predictor: Callable[[str, str, str | None, str, str | None], float | None] | None,
    version: str | None,
) -> Built:
    """query_logs rows for flat records (querylog.Row), times as epoch seconds.

    `anchor` is the clock's current segment (monotonic, epoch, speed): readings after it are
    mapped inline, older ones through `epoch`.
    """
    out = Built()
    rows = out.rows
    groups = out.groups
    by_fp = out.by_fp
    a_mono, a_epoch, speed = anchor
    for rec in records:
        sid: int = rec[0]
        protocol: str = rec[1]
        sql: str | None = rec[2]
        start: float = rec[4]
        end: float = rec[5]
        nrows: int | None = rec[6]
        status: str = rec[7]
        sqlstate: str | None = rec[8]
        msg: str | None = rec[9]
        susp: int = rec[10]
        keep_text: bool = rec[15]
        info = sessions[sid]
        fp = fingerprint(sql if sql is not None else "")
        seconds = end - start
        out.last_start = start
        command: str = fp.command
        fid: str = fp.id
        database: str = info.database or ""
        key = (database, command, protocol, status, info.app)
        durations = groups.get(key)
        if durations is None:
            durations = groups[key] = []
        durations.append(seconds)
        group = by_fp.get(fid)
        if group is None:
            group = by_fp[fid] = (fp, [], [])
        group[1].append(seconds)
        if nrows:
            rk = (database, command)
            out.rows_by[rk] = out.rows_by.get(rk, 0) + nrows
            group[2].append(nrows)
        if status != "ok":
            group[2].append(None)
            if sqlstate:
                cls = sqlstate[:2]
                out.errors[cls] = out.errors.get(cls, 0) + 1
        if susp:
            out.suspensions += susp
        if command == "COPY":
            direction = copy_direction(sql)
            out.copies[direction] = out.copies.get(direction, 0) + 1
        predicted: float | None = None
        if predictor is not None:
            p: Any = predictor(fid, command, sql, fp.normalized, info.database)  # (NumPy, say)
            predicted = None if p is None else float(p)
            if predicted is not None and status == "ok":
                out.log_ratios.append(math.log(max(predicted, 1e-3) / max(seconds * 1e3, 1e-3)))
        if msg and not keep_text:
            msg = _QUOTED.sub('"?"', msg)
        started = to_micro(a_epoch + (start - a_mono) * speed if start >= a_mono else epoch(start))
        finished = to_micro(a_epoch + (end - a_mono) * speed if end >= a_mono else epoch(end))
        rows.append(
            (
                started,
                finished,
                seconds * 1000.0,
                fid,
                sql if keep_text else None,
                fp.normalized,
                command,
                fp.is_catalog,
                fp.parsed,
                fp.tables,
                info.database,
                info.user,
                info.application_name,
                info.app,
                info.client_addr,
                protocol,
                rec[3],
                nrows,
                status,
                sqlstate,
                msg,
                rec[11],
                sid,
                None,
                susp,
                instance,
                label_of(sql) if sql is not None else None,
                predicted,
                version if predicted is not None else None,
                rec[12],
                rec[13],
                rec[14],
            )
        )
    return out


#: the query_logs columns an anomaly detector's Execution is made of, in its fields' order
#: (models.anomaly.Execution: ts, fingerprint, command, duration_ms, rows, error, bytes,
#: predicted_ms, is_catalog, label, app, machinery)
EX_TS: Final = 0
EX_MS: Final = 2
EX_FP: Final = 3
EX_CMD: Final = 6
EX_CAT: Final = 7
EX_APP: Final = 12
EX_ROWS: Final = 17
EX_STATUS: Final = 18
EX_BYTES: Final = 21
EX_LABEL: Final = 26
EX_PRED: Final = 27


def executions(rows: list[tuple[Any, ...]], cls: type) -> list[Any]:
    """`rows` (query_logs rows as `build` makes them) as the anomaly detector's `cls`
    (models.anomaly.Execution) named tuples, in time order. Built with tuple.__new__, compiled:
    the named tuple's own constructor (a Python function with defaults) was a tenth of the
    scoring, and the loop itself another tenth."""
    new = tuple.__new__
    out: list[Any] = []
    for r in rows:
        fields = (r[EX_TS], r[EX_FP], r[EX_CMD], r[EX_MS], r[EX_ROWS], r[EX_STATUS] != "ok",
                  r[EX_BYTES], r[EX_PRED], r[EX_CAT], r[EX_LABEL], r[EX_APP], False)  # fmt: skip
        out.append(new(cls, fields))
    out.sort(key=_start)
    return out


def _start(e: tuple[Any, ...]) -> float:
    t: float = e[0]
    return t
