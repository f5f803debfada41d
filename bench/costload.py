"""A small, varied query workload for the cost model, until the workload simulator (issue 5) lands.

`create_tables` builds four tables of very different sizes (and one log table for DML);
`run_traffic` sends a seeded mix of ~30 templates through a connection (pgsage's, so that it is
logged): point lookups, ranges of widely varying width on indexed and unindexed columns,
aggregates, joins, sorts with limits, DISTINCT, windows, subqueries, INSERT / UPDATE / DELETE.
Literals are inlined (simple protocol), so the log holds them with ``log_parameters = true``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

#: table -> rows at scale 1
TABLES = {"cm_tiny": 500, "cm_small": 5_000, "cm_medium": 40_000, "cm_large": 200_000}


def table_sql(scale: float = 1.0) -> list[str]:
    """DDL and data for the workload's tables (idempotent: drops them first)."""
    out = []
    for name, rows in TABLES.items():
        n = max(int(rows * scale), 100)
        out += [
            f"DROP TABLE IF EXISTS {name}",
            f"CREATE TABLE {name} (id int PRIMARY KEY, grp int NOT NULL, val float8 NOT NULL,"
            " cat int NOT NULL, note text NOT NULL)",
            f"INSERT INTO {name} SELECT g, g % 100, (g * 7919 % 10007)::float8 / 10, g % 7,"
            f" md5(g::text) FROM generate_series(1, {n}) g",
        ]
    out += [
        "CREATE INDEX ON cm_medium (grp)",
        "CREATE INDEX ON cm_large (cat, grp)",
        "DROP TABLE IF EXISTS cm_dim",
        "CREATE TABLE cm_dim (id int PRIMARY KEY, name text NOT NULL)",
        "INSERT INTO cm_dim SELECT g, 'name' || g FROM generate_series(0, 99) g",
        "DROP TABLE IF EXISTS cm_events",
        "CREATE TABLE cm_events (id bigserial PRIMARY KEY, grp int, val float8)",
        "ANALYZE",
    ]
    return out


def _templates(scale: float) -> list[Callable[[random.Random], str]]:
    sizes = {name: max(int(rows * scale), 100) for name, rows in TABLES.items()}
    out: list[Callable[[random.Random], str]] = []
    for t, n in sizes.items():

        def point(r: random.Random, t: str = t, n: int = n) -> str:
            return f"SELECT * FROM {t} WHERE id = {r.randint(1, n)}"

        def id_range(r: random.Random, t: str = t, n: int = n) -> str:
            width = int(n ** r.random())
            lo = r.randint(1, max(n - width, 1))
            return f"SELECT count(*), avg(val) FROM {t} WHERE id BETWEEN {lo} AND {lo + width}"

        def group_scan(r: random.Random, t: str = t) -> str:
            return f"SELECT count(*), sum(val) FROM {t} WHERE grp = {r.randint(0, 99)}"

        def top(r: random.Random, t: str = t) -> str:
            return f"SELECT id, val FROM {t} ORDER BY val DESC LIMIT {r.choice((1, 10, 100))}"

        out += [point, id_range, group_scan, top]

    def agg_join(r: random.Random) -> str:
        t = r.choice(("cm_small", "cm_medium", "cm_large"))
        cut = int(sizes[t] * r.random())
        return (
            f"SELECT d.name, count(*), sum(f.val) FROM {t} f JOIN cm_dim d ON d.id = f.grp"
            f" WHERE f.id < {cut} GROUP BY d.name ORDER BY 2 DESC LIMIT 5"
        )

    def left_join(r: random.Random) -> str:
        return (
            "SELECT s.id, m.val FROM cm_small s LEFT JOIN cm_medium m ON m.id = s.id * 7"
            f" WHERE s.grp = {r.randint(0, 99)}"
        )

    def distinct(r: random.Random) -> str:
        return f"SELECT DISTINCT note FROM cm_medium WHERE id > {r.randint(1, sizes['cm_medium'])}"

    def window(r: random.Random) -> str:
        lo = r.randint(1, sizes["cm_large"] - 5_000)
        return (
            "SELECT id, sum(val) OVER (PARTITION BY grp ORDER BY id) FROM cm_large"
            f" WHERE id BETWEEN {lo} AND {lo + r.choice((100, 1000, 5000))}"
        )

    def subquery(r: random.Random) -> str:
        return (
            "SELECT count(*) FROM cm_large WHERE grp IN"
            f" (SELECT id FROM cm_dim WHERE name LIKE 'name{r.randint(1, 9)}%')"
        )

    def cat_filter(r: random.Random) -> str:
        return (
            "SELECT grp, count(*) FROM cm_large"
            f" WHERE cat = {r.randint(0, 6)} AND grp < {r.randint(1, 100)} GROUP BY grp"
        )

    def like_scan(r: random.Random) -> str:
        pattern = f"%{r.choice('abcdef')}{r.randint(0, 9)}%"
        return f"SELECT count(*) FROM cm_medium WHERE note LIKE '{pattern}'"

    def correlated(r: random.Random) -> str:
        return (
            "SELECT s.id FROM cm_tiny s WHERE s.val >"
            f" (SELECT avg(val) FROM cm_small x WHERE x.grp = s.grp) AND s.cat = {r.randint(0, 6)}"
        )

    def insert(r: random.Random) -> str:
        return f"INSERT INTO cm_events (grp, val) VALUES ({r.randint(0, 99)}, {r.random():.4f})"

    def insert_select(r: random.Random) -> str:
        return (
            "INSERT INTO cm_events (grp, val) SELECT grp, val FROM cm_small"
            f" WHERE id <= {r.choice((10, 100, 1000))}"
        )

    def update(r: random.Random) -> str:
        return f"UPDATE cm_small SET val = val + 1 WHERE id = {r.randint(1, sizes['cm_small'])}"

    def delete(r: random.Random) -> str:
        return f"DELETE FROM cm_events WHERE grp = {r.randint(0, 99)}"

    return [
        *out,
        agg_join,
        left_join,
        distinct,
        window,
        subquery,
        cat_filter,
        like_scan,
        correlated,
        insert,
        insert_select,
        update,
        delete,
    ]


def statements(n: int, seed: int = 0, scale: float = 1.0) -> list[str]:
    """`n` statements drawn from the templates with skewed popularity (a few are frequent)."""
    rng = random.Random(seed)
    templates = _templates(scale)
    weights = [1.0 / (1 + (i * 7) % len(templates)) ** 0.5 for i in range(len(templates))]
    return [rng.choices(templates, weights)[0](rng) for _ in range(n)]


async def run_traffic(conn: Any, n: int, seed: int = 0, scale: float = 1.0) -> int:
    """Send `n` statements through an asyncpg connection (simple protocol, literals inlined)."""
    for sql in statements(n, seed, scale):
        await conn.execute(sql)
    return n


async def create_tables(conn: Any, scale: float = 1.0) -> None:
    for sql in table_sql(scale):
        await conn.execute(sql)
