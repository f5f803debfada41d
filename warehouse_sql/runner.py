"""Applies `migrations/NNNN_name.sql` in order, once each, under an advisory lock.

Each file runs in its own transaction and is recorded in `public.pgsage_schema_migrations`
(version, name, checksum). Files are written idempotently too (IF NOT EXISTS), so a database
built by hand converges. Numbering: 0001 schemas; 0010-0019 bronze/silver/gold; 0020-0029
metadata and ml; 0030+ later parts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock key: "pgsage" in ASCII, so concurrent `serve` starts don't race
LOCK_KEY = 0x70677361676500
LEDGER = "public.pgsage_schema_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def load_migrations() -> list[Migration]:
    """Every migration shipped in the package, sorted by version."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


async def applied_versions(conn: Any) -> set[int]:
    """Versions recorded in the ledger (empty if it does not exist yet)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEDGER)
    if not exists:
        return set()
    rows = await conn.fetch(f"SELECT version FROM {LEDGER}")
    return {r["version"] for r in rows}


async def apply_migrations(conn: Any, upto: int | None = None) -> list[Migration]:
    """Apply pending migrations on an asyncpg connection; returns those applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {LEDGER} ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await applied_versions(conn)
        applied = []
        for mig in load_migrations():
            if mig.version in done or (upto is not None and mig.version > upto):
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    f"INSERT INTO {LEDGER} (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                )
            applied.append(mig)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
