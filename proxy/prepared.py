"""Statements a client prepares, re-made on pgsage's own connection: PREPARE with the types its
Parse declared (unknown where it declared none), and the values it bound as EXECUTE arguments.
The rewrites prove equivalence with them, plan steering compares the arms' plans with them."""

from __future__ import annotations

import contextlib
from typing import Any

from optimizer.whatif import quote_literal

from .protocol.binary import Unsupported, as_text

#: one Bind's values as sent: (format codes, values)
ValueSet = tuple[tuple[int, ...], tuple[bytes | None, ...]]


class Prepared:
    """PREPAREd statements on `conn` with the parameter types `declared` (Parse's OIDs, 0 for
    none); `async with` deallocates every one made."""

    def __init__(self, conn: Any, declared: tuple[int, ...]) -> None:
        self.conn = conn
        self.declared = declared
        self.names: list[str] = []
        self._types: str | None = None

    async def __aenter__(self) -> Prepared:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in self.names:
            with contextlib.suppress(Exception):
                await self.conn.execute(f"DEALLOCATE {name}")

    async def prepare(self, name: str, text: str) -> list[int] | None:
        """PREPARE `text` as `name` (pgsage's own constant names); the parameter type OIDs the
        server resolved, or None if it does not prepare."""
        if self._types is None:
            names = await self.conn.fetchval(
                "SELECT array_agg(CASE WHEN o = 0 THEN 'unknown' ELSE format_type(o, NULL) END"
                " ORDER BY n) FROM unnest($1::oid[]) WITH ORDINALITY AS t(o, n)",
                list(self.declared),
            )  # fmt: skip
            self._types = f" ({', '.join(names)})" if self.declared else ""
        try:
            await self.conn.execute(f"PREPARE {name}{self._types} AS {text}")
        except Exception:
            return None
        self.names.append(name)
        oids = await self.conn.fetchval(
            "SELECT parameter_types::oid[] FROM pg_prepared_statements WHERE name = $1", name
        )
        return list(oids or [])


def literal_sets(sets: list[ValueSet], types: list[int]) -> list[str]:
    """Each value set as EXECUTE's argument list, '(lit, ...)' ('' without parameters); sets
    with a binary value of a type without a text rendering, or of the wrong arity, are left
    out."""
    out: list[str] = []
    for formats, values in sets:
        if len(values) != len(types):
            continue
        try:
            lits = []
            for i, raw in enumerate(values):
                fmt = formats[i] if len(formats) > 1 else formats[0] if formats else 0
                if raw is None:
                    lits.append("NULL")
                elif fmt == 1:
                    lits.append(quote_literal(as_text(types[i], raw)))
                else:
                    lits.append(quote_literal(raw.decode("utf-8")))
        except (Unsupported, UnicodeDecodeError, ValueError):
            continue
        args = f"({', '.join(lits)})" if lits else ""
        if args not in out:
            out.append(args)
    return out
