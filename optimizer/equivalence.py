"""Proof by execution that a rewrite returns what the original returns (no IO of its own).

The caller passes ``run(sql, params) -> rows`` (e.g. an asyncpg connection's ``fetch`` on a
read-only connection with a statement_timeout) and several literal sets for the statement's
parameters. Results are compared as multisets of rows (or as sequences with ``ordered=True``).
Values are compared with their Python type, so a bigint that became numeric, or 5.0 that became
5.00, is a difference, as a client would see it; floats are compared to 12 significant digits,
since summing in a different order moves the last bits.

>>> checksum([(1, "a"), (2, None)]) == checksum([(2, None), (1, "a")])
True
>>> checksum([(1,)]) == checksum([(1,), (1,)])
False
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Run = Callable[[str, Sequence[Any]], Awaitable[Sequence[Any]]]

#: at most this many differing rows are kept per side of a mismatch
EXAMPLES = 5


@dataclass(frozen=True)
class Mismatch:
    """The first literal set on which the two statements differ."""

    params: tuple[Any, ...]
    #: rows (normalised) the original returned and the rewrite did not, and the reverse
    only_original: list[Any] = field(default_factory=list)
    only_rewritten: list[Any] = field(default_factory=list)
    original_rows: int = 0
    rewritten_rows: int = 0
    #: "original: <error>" or "rewritten: <error>" when one of them failed
    error: str | None = None


@dataclass(frozen=True)
class EquivalenceResult:
    equivalent: bool
    #: literal sets run on both sides and found equal
    checked: int
    mismatch: Mismatch | None = None
    #: multiset checksums of the original's results, one per literal set checked
    checksums: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        if self.equivalent:
            return f"equal on {self.checked} literal sets"
        assert self.mismatch is not None
        m = self.mismatch
        if m.error:
            return f"params {m.params!r}: {m.error}"
        return (
            f"params {m.params!r}: {m.original_rows} rows vs {m.rewritten_rows};"
            f" only in original {m.only_original[:1]!r}, only in rewrite {m.only_rewritten[:1]!r}"
        )


def normalise(value: Any) -> Any:
    """A hashable, type-tagged form of a result value, equal exactly when a client sees equal."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", float(f"{value:.12g}"))
    if isinstance(value, decimal.Decimal):
        return ("numeric", str(value))  # keeps the scale: 5.0 and 5.00 print differently
    if isinstance(value, (dt.datetime, dt.date, dt.time, dt.timedelta, uuid.UUID)):
        return (type(value).__name__, str(value))
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), normalise(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)) or _is_record(value):
        return tuple(normalise(v) for v in value)
    return (type(value).__name__, repr(value))


def _is_record(value: Any) -> bool:
    # asyncpg's Record: a sequence without being a list or tuple
    return hasattr(value, "values") and hasattr(value, "__getitem__") and hasattr(value, "keys")


def normalise_row(row: Any) -> tuple[Any, ...]:
    if _is_record(row):
        row = tuple(row.values())
    return tuple(normalise(v) for v in row)


def _digest(row: tuple[Any, ...]) -> bytes:
    return hashlib.blake2b(repr(row).encode(), digest_size=16).digest()


def checksum(rows: Iterable[Any], ordered: bool = False) -> str:
    """A hex digest of a result: of its rows as a multiset, or as a sequence when `ordered`."""
    digests = [_digest(normalise_row(r)) for r in rows]
    if not ordered:
        digests.sort()
    h = hashlib.blake2b(digest_size=16)
    h.update(len(digests).to_bytes(8, "big"))
    for d in digests:
        h.update(d)
    return h.hexdigest()


def compare(
    original_rows: Sequence[Any], rewritten_rows: Sequence[Any], ordered: bool = False
) -> tuple[list[Any], list[Any]]:
    """(rows only in the original, rows only in the rewrite), at most EXAMPLES each; two empty
    lists when the results are equal."""
    a = [normalise_row(r) for r in original_rows]
    b = [normalise_row(r) for r in rewritten_rows]
    if ordered:
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return [(i, x)], [(i, y)]
        if len(a) != len(b):
            n = min(len(a), len(b))
            return [(i, x) for i, x in enumerate(a)][n : n + EXAMPLES], [
                (i, y) for i, y in enumerate(b)
            ][n : n + EXAMPLES]
        return [], []
    ca, cb = Counter(a), Counter(b)
    return list((ca - cb).elements())[:EXAMPLES], list((cb - ca).elements())[:EXAMPLES]


async def shadow_check(
    run: Run,
    original: str,
    rewritten: str,
    literal_sets: Sequence[Sequence[Any]],
    ordered: bool = False,
) -> EquivalenceResult:
    """Run `original` and `rewritten` with each literal set; equivalent only if every result
    matches. The first mismatch, or any error on either side (a timeout too), ends the check:
    an error proves nothing, so it counts against the rewrite."""
    if not literal_sets:
        raise ValueError("shadow_check needs at least one literal set (use [()] for none)")
    sums: list[str] = []
    for params in literal_sets:
        args = tuple(params)
        results = []
        for side, sql in (("original", original), ("rewritten", rewritten)):
            try:
                results.append(list(await run(sql, args)))
            except Exception as exc:  # the database's verdict, whatever the driver calls it
                error = f"{side}: {type(exc).__name__}: {exc}".strip()
                return EquivalenceResult(False, len(sums), Mismatch(args, error=error), sums)
        first, second = results
        only_a, only_b = compare(first, second, ordered)
        if only_a or only_b:
            mismatch = Mismatch(args, only_a, only_b, len(first), len(second))
            return EquivalenceResult(False, len(sums), mismatch, sums)
        sums.append(checksum(first, ordered))
    return EquivalenceResult(True, len(sums), None, sums)
