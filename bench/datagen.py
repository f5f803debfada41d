"""Synthetic bronze data for the warehouse: vectorised, deterministic per seed, streamed by COPY.

Scale 1 is 10,000 customers, 1,000 products, 100,000 sales lines (grouped into transactions of
1-8 lines, returns included) and inventory snapshots of every product in 3 of 5 warehouses at 12
month ends; every table grows linearly with the scale, which may be fractional (0.05 is handy in
tests). The structure is realistic on purpose, because it is what pgsage learns from: customer
segments and regions, Zipf product popularity, prices by category, yearly seasonality with a
December peak, weekly and hourly patterns, promotion spikes (Black Friday, summer sale, flash
days) with discounts, and returns.

The bronze layer is dirty on purpose, with known counts: duplicates, NULLs and blanks in required
fields, malformed emails and dates, negative quantities, future timestamps, unknown keys, and
inconsistent case and whitespace. Every dirty row is a corrupted copy of a clean row, so the clean
rows reach silver untouched and the ETL's rejects per reason equal the counts reported here.

Rows are generated in chunks of ``chunk_rows`` with numpy only, encoded as COPY text and streamed
into PostgreSQL, so memory stays bounded at any scale. A chunk's random stream depends only on
(seed, table, batch, chunk), so the output is identical for a given seed and scale.

Run as the generator benchmark::

    .venv/bin/python -m bench.datagen --scale 10            # generate + load + ETL, JSON + table
    .venv/bin/python -m bench.datagen --scale 50 --no-load  # generator alone: rows/s, peak RSS
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import resource
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.dtypes import StringDType

# --------------------------------------------------------------------------- the shape

START = dt.date(2024, 1, 1)
END = dt.date(2025, 12, 31)
DAYS = (END - START).days + 1
CUSTOMERS_PER_SCALE = 10_000
PRODUCTS_PER_SCALE = 1_000
SALES_PER_SCALE = 100_000
WAREHOUSES = ("WH-NORTH", "WH-SOUTH", "WH-EAST", "WH-WEST", "WH-CENTRAL")
WAREHOUSES_PER_PRODUCT = 3
SNAPSHOTS = 12  # month ends of the last year of the window
INCREMENT_DAYS = 7  # an increment batch is one more week of trading after END
CHUNK_ROWS = 100_000
RETURN_RATE = 0.03
ZIPF_EXPONENT = 1.1
NORMALISE_RATE = 0.05
NULL = "\\N"  # COPY text format's NULL

TABLES = ("customer", "product", "sales", "inventory")  # load order: dimensions first

COLUMNS: dict[str, tuple[str, ...]] = {
    "customer": (
        "customer_id",
        "first_name",
        "last_name",
        "email",
        "segment",
        "region",
        "city",
        "signup_date",
    ),
    "product": (
        "product_id",
        "sku",
        "name",
        "category",
        "brand",
        "list_price",
        "unit_cost",
        "launched_on",
        "is_active",
    ),
    "sales": (
        "transaction_id",
        "line_no",
        "transaction_type",
        "original_transaction_id",
        "customer_id",
        "product_id",
        "warehouse_id",
        "channel",
        "sold_at",
        "quantity",
        "unit_price",
        "discount_pct",
    ),
    "inventory": (
        "warehouse_id",
        "warehouse_code",
        "product_id",
        "snapshot_date",
        "quantity_on_hand",
        "reorder_point",
        "unit_cost",
    ),
}

#: dirty copies injected per clean row, by the reject reason the ETL must give them
DIRT_RATES: dict[str, dict[str, float]] = {
    "customer": {
        "duplicate": 0.010,
        "missing_customer_id": 0.002,
        "missing_email": 0.003,
        "malformed_email": 0.005,
        "malformed_signup_date": 0.003,
        "future_signup_date": 0.002,
    },
    "product": {
        "duplicate": 0.010,
        "missing_name": 0.005,
        "negative_price": 0.005,
    },
    "sales": {
        "duplicate": 0.010,
        "missing_customer_id": 0.002,
        "missing_product_id": 0.002,
        "missing_sold_at": 0.001,
        "malformed_sold_at": 0.003,
        "future_sold_at": 0.002,
        "negative_quantity": 0.003,
        "unknown_customer": 0.001,
        "unknown_product": 0.001,
    },
    "inventory": {
        "duplicate": 0.010,
        "missing_product_id": 0.002,
        "negative_quantity": 0.003,
        "malformed_snapshot_date": 0.002,
        "future_snapshot_date": 0.001,
        "unknown_product": 0.001,
    },
}
#: the dirt key for clean rows whose case/whitespace was spoilt (normalised, never rejected)
NORMALISED = "inconsistent_case_whitespace"
#: what malformed dates and timestamps look like (each must fail the ETL's strict ISO parse)
MALFORMED_DATES = ("2023-02-30", "2025-02-29", "31/01/2023", "2023-13-01", "2025-00-10",
                   "12/31/2025", "unknown", "20230512", "?")  # fmt: skip
MALFORMED_TIMESTAMPS = ("2025-02-30 10:15:00", "2025-13-01 09:00:00", "31/12/2024 18:30",
                        "yesterday", "2025-06-15 25:61:00", "N/A", "2025-06-15T10:60")  # fmt: skip

SEGMENTS = ("consumer", "small_business", "corporate", "vip")
SEGMENT_P = (0.70, 0.15, 0.10, 0.05)
SEGMENT_ACTIVITY = (1.0, 1.6, 2.2, 5.0)
REGIONS = ("north", "south", "east", "west", "central")
REGION_P = (0.22, 0.24, 0.20, 0.21, 0.13)
CITIES = (
    ("Boston", "Chicago", "Detroit", "Minneapolis"),
    ("Atlanta", "Dallas", "Houston", "Miami"),
    ("New York", "Philadelphia", "Baltimore", "Newark"),
    ("Seattle", "Portland", "San Francisco", "Los Angeles"),
    ("Denver", "Kansas City", "Omaha", "Wichita"),
)
FIRST_NAMES = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
    "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark",
    "Margaret", "Steven", "Sandra", "Paul", "Ashley", "Andrew", "Emily", "Joshua", "Donna",
    "Kevin", "Michelle", "Brian", "Carol", "George", "Amanda", "Edward", "Melissa", "Ronald",
    "Deborah", "Timothy", "Stephanie", "Jason", "Rebecca"
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez",
    "Clark", "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright",
    "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall",
    "Rivera", "Campbell", "Mitchell", "Carter", "Roberts"
)  # fmt: skip
EMAIL_DOMAINS = ("example.com", "mail.test", "inbox.test", "corp.example")
#: category -> (median list price in dollars, lognormal sigma, share of the catalogue)
CATEGORIES: dict[str, tuple[float, float, float]] = {
    "electronics": (240.0, 0.8, 0.14),
    "home_garden": (60.0, 0.7, 0.16),
    "toys": (28.0, 0.6, 0.10),
    "books": (18.0, 0.4, 0.14),
    "clothing": (45.0, 0.6, 0.18),
    "sports": (70.0, 0.7, 0.10),
    "beauty": (24.0, 0.5, 0.10),
    "grocery": (7.0, 0.5, 0.08),
}
BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne", "Tyrell")
CHANNELS = ("online", "store", "mobile")
CHANNEL_P = (0.45, 0.40, 0.15)
WEEKDAY_WEIGHT = (0.90, 0.92, 0.95, 1.00, 1.12, 1.30, 1.15)  # Monday first
HOUR_WEIGHT = (
    0.20, 0.10, 0.07, 0.05, 0.05, 0.10, 0.30, 0.60, 0.90, 1.00, 1.10, 1.30,
    1.50, 1.30, 1.10, 1.00, 1.05, 1.20, 1.50, 1.80, 1.90, 1.60, 1.00, 0.50,
)  # fmt: skip
_TABLE_CODE = {name: i + 1 for i, name in enumerate(TABLES)}
_S = StringDType()


def _strs(values: Any) -> np.ndarray:
    return np.asarray(values).astype(_S)


def _choice_strings(options: tuple[str, ...], idx: np.ndarray) -> np.ndarray:
    return np.array(options, dtype=_S)[idx]


def _cents_to_text(cents: np.ndarray) -> np.ndarray:
    """123456 -> '1234.56' without a per-element Python format call."""
    cents = np.asarray(cents, dtype=np.int64)
    sign = np.where(cents < 0, "-", "").astype(_S)
    mag = np.abs(cents)
    whole = (mag // 100).astype(_S)
    frac = np.strings.zfill((mag % 100).astype(_S), 2)
    return np.strings.add(np.strings.add(np.strings.add(sign, whole), "."), frac)


def _date_text(day_index: np.ndarray) -> np.ndarray:
    return (np.datetime64(START, "D") + day_index.astype("timedelta64[D]")).astype(_S)


def _ts_text(seconds: np.ndarray) -> np.ndarray:
    # ISO 8601 with the "T", as the source systems export it; PostgreSQL reads it as is
    return (np.datetime64(START, "s") + seconds.astype("timedelta64[s]")).astype(_S)


# --------------------------------------------------------------------------- calendar


def _is_promo(day_index: np.ndarray, seed: int) -> np.ndarray:
    """Promotion multiplier per day: Black Friday week, Cyber Monday, summer sale, flash days."""
    dates = np.datetime64(START, "D") + day_index.astype("timedelta64[D]")
    years = dates.astype("datetime64[Y]")
    month = (dates.astype("datetime64[M]") - years.astype("datetime64[M]")).astype(int) + 1
    dom = (dates - dates.astype("datetime64[M]").astype("datetime64[D]")).astype(int) + 1
    weekday = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    mult = np.ones(len(day_index))
    # Black Friday: the Friday after the fourth Thursday of November (day 23..29)
    nov = month == 11
    black_friday = nov & (weekday == 4) & (dom >= 23) & (dom <= 29)
    mult[black_friday] = 3.0
    thanksgiving_weekend = nov & (dom >= 24) & (dom <= 30) & ((weekday == 5) | (weekday == 6))
    mult[thanksgiving_weekend & ~black_friday] = 1.8
    cyber_monday = ((nov & (dom >= 26)) | ((month == 12) & (dom <= 2))) & (weekday == 0)
    mult[cyber_monday] = 2.4
    mult[(month == 7) & (dom >= 10) & (dom <= 16)] = 1.7  # summer sale
    mult[(month == 3) & (dom >= 20) & (dom <= 23)] = 1.5  # spring sale
    # four flash-sale days a year, chosen by the seed
    year_num = years.astype(int) + 1970
    for year in np.unique(year_num):
        flash = np.random.default_rng([seed, 7, int(year)]).choice(365, 4, replace=False) + 1
        doy = (dates - years.astype("datetime64[D]")).astype(int) + 1
        mult[(year_num == year) & np.isin(doy, flash)] = 2.0
    return mult


def day_weights(day_index: np.ndarray, seed: int) -> np.ndarray:
    """Relative sales volume per day: growth trend x yearly x weekly x promotions."""
    dates = np.datetime64(START, "D") + day_index.astype("timedelta64[D]")
    doy = (dates - dates.astype("datetime64[Y]").astype("datetime64[D]")).astype(int) + 1
    weekday = (dates.astype(np.int64) + 3) % 7
    trend = 1.0 + 0.25 * day_index / DAYS
    yearly = 1.0 + 0.22 * np.cos(2 * np.pi * (doy - 355) / 365.25)
    yearly = yearly + np.where((doy >= 335) & (doy <= 358), 0.35, 0.0)  # December run-up
    weekly = np.asarray(WEEKDAY_WEIGHT)[weekday]
    return trend * yearly * weekly * _is_promo(day_index, seed)


def promo_discount(day_index: np.ndarray, seed: int) -> np.ndarray:
    """The site-wide discount of a day: 0 outside promotions, 15-30 % on promotion days."""
    mult = _is_promo(day_index, seed)
    return np.where(mult >= 2.4, 0.30, np.where(mult >= 1.7, 0.20, np.where(mult > 1, 0.15, 0.0)))


# --------------------------------------------------------------------------- plan

Frame = dict[str, np.ndarray]


@dataclass(frozen=True)
class ChunkSlot:
    """Where a chunk sits: its load batch, its index among `chunks`, and its rows."""

    batch: int
    index: int
    chunks: int
    offset: int
    rows: int


FrameMaker = Callable[[np.random.Generator, ChunkSlot], Frame]
Spoiler = Callable[[np.random.Generator, Frame, str, np.ndarray], None]


@dataclass(frozen=True)
class Chunk:
    """One chunk of one bronze table: clean rows plus dirty copies, and the order they land in.

    `parts[0]` holds the clean rows (some with spoilt case/whitespace), the other parts the
    corrupted copies; `order` interleaves them. Rows stay columnar until `copy_bytes`, because
    reordering numpy string arrays is much slower than reordering row tuples once.
    """

    table: str
    batch: int
    index: int
    parts: tuple[Frame, ...]
    order: np.ndarray | None
    clean_rows: int
    dirt: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(len(part[COLUMNS[self.table][0]]) for part in self.parts)

    def column(self, name: str) -> list[str]:
        """One column as landed, in load order."""
        values = [v for part in self.parts for v in part[name].tolist()]
        return values if self.order is None else [values[i] for i in self.order.tolist()]

    def copy_bytes(self) -> bytes:
        """COPY text format: tab-separated, `\\N` for NULL, one row a line, `_batch_id` last."""
        cols = []
        for name in COLUMNS[self.table]:
            values = self.parts[0][name].tolist()
            for part in self.parts[1:]:
                values += part[name].tolist()
            cols.append(values)
        cols.append([str(self.batch)] * self.rows)
        rows = list(zip(*cols, strict=True))
        if self.order is not None:
            rows = [rows[i] for i in self.order.tolist()]
        body = "\n".join(map("\t".join, rows))
        return (body + "\n").encode() if body else b""


@dataclass
class GenerationResult:
    """What a load put into bronze: rows per table, clean rows, and dirt by reason."""

    scale: float
    seed: int
    batch: int
    rows: dict[str, int] = field(default_factory=dict)
    clean: dict[str, int] = field(default_factory=dict)
    dirt: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def rejects(self, table: str) -> int:
        return sum(n for k, n in self.dirt.get(table, {}).items() if k != NORMALISED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "seed": self.seed,
            "batch": self.batch,
            "rows": self.rows,
            "clean": self.clean,
            "dirt": self.dirt,
        }


def _split(total: int, size: int) -> list[int]:
    """`total` rows as near-equal chunks of at most `size`."""
    if total <= 0:
        return []
    n = math.ceil(total / size)
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def planned_dirt(table: str, clean_rows: int) -> dict[str, int]:
    """Dirty copies for a chunk of `clean_rows` clean rows (at least one of each kind)."""
    if clean_rows <= 0:
        return {}
    dirt = {k: max(1, round(rate * clean_rows)) for k, rate in DIRT_RATES[table].items()}
    dirt[NORMALISED] = max(1, round(NORMALISE_RATE * clean_rows))
    return dirt


class Datagen:
    """The synthetic warehouse for one (scale, seed): dimensions up front, facts by chunk."""

    def __init__(self, scale: float = 1.0, seed: int = 42, chunk_rows: int = CHUNK_ROWS) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.customers = max(1, round(CUSTOMERS_PER_SCALE * scale))
        self.products = max(1, round(PRODUCTS_PER_SCALE * scale))
        self.sales = max(1, round(SALES_PER_SCALE * scale))
        self.inventory = self.products * min(WAREHOUSES_PER_PRODUCT, len(WAREHOUSES)) * SNAPSHOTS
        self._dims()

    # ---- dimensions shared by every table (small: one value per customer or product)

    def _rng(self, table: str, batch: int, chunk: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _TABLE_CODE.get(table, 99), batch, chunk])

    def _dims(self) -> None:
        rng = self._rng("dims", 0, 0)
        n = self.customers
        # 70 % signed up before the window, the rest during it; ids follow signup order
        before = rng.random(n) < 0.7
        signup = np.where(
            before,
            rng.integers(-5 * 365, 0, n),
            (rng.random(n) ** 0.8 * (DAYS - 1)).astype(np.int64),
        )
        signup.sort()
        signup[0] = min(signup[0], -1)  # somebody can always buy on day 0
        self.cust_signup = signup
        self.cust_segment = rng.choice(len(SEGMENTS), n, p=SEGMENT_P)
        self.cust_region = rng.choice(len(REGIONS), n, p=REGION_P)
        activity = rng.lognormal(0.0, 0.9, n) * np.asarray(SEGMENT_ACTIVITY)[self.cust_segment]
        self.cust_cum_weight = np.cumsum(activity)

        p = self.products
        names = tuple(CATEGORIES)
        share = np.array([CATEGORIES[c][2] for c in names])
        self.prod_category = rng.choice(len(names), p, p=share / share.sum())
        median = np.array([CATEGORIES[c][0] for c in names])[self.prod_category]
        sigma = np.array([CATEGORIES[c][1] for c in names])[self.prod_category]
        price = np.round(median * rng.lognormal(0.0, sigma) * 100).astype(np.int64)
        self.prod_price_cents = np.maximum(price // 100 * 100 + 99, 99)  # $x.99 pricing
        margin = rng.uniform(0.45, 0.75, p)
        self.prod_cost_cents = np.round(self.prod_price_cents * margin).astype(np.int64)
        self.prod_brand = rng.integers(0, len(BRANDS), p)
        rank = rng.permutation(p) + 1  # product id -> popularity rank (1 = best seller)
        self.prod_popularity = 1.0 / rank**ZIPF_EXPONENT
        self.prod_cum_weight = np.cumsum(self.prod_popularity)
        self.prod_launch = rng.integers(-3 * 365, DAYS // 2, p)
        self.prod_active = rng.random(p) < 0.95

    # ---- the plan: how many rows each chunk has, and the dirt in it

    def chunk_plan(self, table: str, batch: int = 0) -> list[int]:
        """Clean rows of each chunk of `table` in load `batch` (0 = initial load)."""
        if batch == 0:
            if table == "inventory":
                per_product = self.inventory // self.products
                step = max(1, self.chunk_rows // per_product)
                return [n * per_product for n in _split(self.products, step)]
            total = {"customer": self.customers, "product": self.products, "sales": self.sales}
            return _split(total[table], self.chunk_rows)
        return _split(self.increment_rows(batch), self.chunk_rows) if table == "sales" else []

    def increment_rows(self, batch: int) -> int:
        """Sales lines in increment `batch` >= 1: one more week of trading."""
        return max(1, round(self.sales * INCREMENT_DAYS / DAYS)) if batch >= 1 else 0

    def clean_rows(self, table: str, batch: int = 0) -> int:
        return sum(self.chunk_plan(table, batch))

    def expected_dirt(self, table: str, batch: int = 0) -> dict[str, int]:
        total: dict[str, int] = {}
        for n in self.chunk_plan(table, batch):
            for k, v in planned_dirt(table, n).items():
                total[k] = total.get(k, 0) + v
        return total

    def expected_rows(self, table: str, batch: int = 0) -> int:
        dirt = self.expected_dirt(table, batch)
        return self.clean_rows(table, batch) + sum(v for k, v in dirt.items() if k != NORMALISED)

    # ---- chunks

    def chunks(self, table: str, batch: int = 0, dirty: bool = True) -> Iterator[Chunk]:
        """The chunks of `table` in load `batch`, clean rows first spoilt and copied if `dirty`."""
        make: FrameMaker = getattr(self, f"_{table}_frame")
        plan = self.chunk_plan(table, batch)
        offset = 0
        for index, n in enumerate(plan):
            rng = self._rng(table, batch, index)
            frame = make(rng, ChunkSlot(batch, index, len(plan), offset, n))
            offset += n
            if dirty:
                parts, order, dirt = self._inject(rng, table, frame)
                yield Chunk(table, batch, index, parts, order, n, dirt)
            else:
                yield Chunk(table, batch, index, (frame,), None, n, {})

    def _inject(
        self, rng: np.random.Generator, table: str, frame: Frame
    ) -> tuple[tuple[Frame, ...], np.ndarray, dict[str, int]]:
        """Spoil case/whitespace in place, make corrupted copies, and mix them in."""
        n = len(frame[COLUMNS[table][0]])
        dirt = planned_dirt(table, n)
        spoil: Spoiler = getattr(self, f"_{table}_dirt")
        victims = rng.choice(n, dirt[NORMALISED], replace=False)
        spoil(rng, frame, NORMALISED, victims)
        parts = [frame]
        for kind in DIRT_RATES[table]:
            rows = rng.integers(0, n, dirt[kind])
            copy = {c: v[rows] for c, v in frame.items()}
            if kind != "duplicate":
                spoil(rng, copy, kind, np.arange(len(rows)))
            parts.append(copy)
        # dirty rows land between the clean ones, which keep their (time) order
        extra = sum(v for k, v in dirt.items() if k != NORMALISED)
        position = np.concatenate([np.arange(n, dtype=float), rng.uniform(0, n, extra)])
        return tuple(parts), np.argsort(position, kind="stable"), dirt

    # ---- customers

    def _customer_frame(self, rng: np.random.Generator, slot: ChunkSlot) -> Frame:
        n = slot.rows
        idx = np.arange(slot.offset, slot.offset + n)
        first = _choice_strings(FIRST_NAMES, rng.integers(0, len(FIRST_NAMES), n))
        last = _choice_strings(LAST_NAMES, rng.integers(0, len(LAST_NAMES), n))
        domain = _choice_strings(EMAIL_DOMAINS, rng.integers(0, len(EMAIL_DOMAINS), n))
        ids = _strs(idx + 1)
        local = np.strings.add(np.strings.add(np.strings.lower(first), "."), np.strings.lower(last))
        email = np.strings.add(np.strings.add(np.strings.add(local, ids), "@"), domain)
        region = self.cust_region[idx]
        city_idx = rng.integers(0, 4, n)
        cities = np.array([c for group in CITIES for c in group], dtype=_S)
        return {
            "customer_id": ids,
            "first_name": first,
            "last_name": last,
            "email": email,
            "segment": _choice_strings(SEGMENTS, self.cust_segment[idx]),
            "region": _choice_strings(REGIONS, region),
            "city": cities[region * 4 + city_idx],
            "signup_date": _date_text(self.cust_signup[idx]),
        }

    def _customer_dirt(
        self, rng: np.random.Generator, f: dict[str, np.ndarray], kind: str, rows: np.ndarray
    ) -> None:
        k = len(rows)
        if kind == NORMALISED:
            f["email"][rows] = np.strings.add(
                np.strings.add("  ", np.strings.upper(f["email"][rows])), " "
            )
            f["first_name"][rows] = np.strings.upper(f["first_name"][rows])
            f["last_name"][rows] = np.strings.add(f["last_name"][rows], "  ")
            f["segment"][rows] = np.strings.add(" ", np.strings.upper(f["segment"][rows]))
            f["region"][rows] = np.strings.capitalize(f["region"][rows])
        elif kind == "missing_customer_id":
            f["customer_id"][rows] = _pick(rng, (NULL, "", "  "), k)
        elif kind == "missing_email":
            f["email"][rows] = _pick(rng, (NULL, "", " "), k)
        elif kind == "malformed_email":
            at = np.strings.replace(f["email"][rows], "@", _pick(rng, ("", "@@", " at ", "@ "), k))
            f["email"][rows] = at
        elif kind == "malformed_signup_date":
            f["signup_date"][rows] = _pick(rng, MALFORMED_DATES, k)
        elif kind == "future_signup_date":
            f["signup_date"][rows] = _date_text(rng.integers(70 * 365, 75 * 365, k))

    # ---- products

    def _product_frame(self, rng: np.random.Generator, slot: ChunkSlot) -> Frame:
        n = slot.rows
        idx = np.arange(slot.offset, slot.offset + n)
        cats = tuple(CATEGORIES)
        category = _choice_strings(cats, self.prod_category[idx])
        brand = _choice_strings(BRANDS, self.prod_brand[idx])
        model = _strs(rng.integers(100, 1000, n))
        noun = np.strings.replace(np.strings.capitalize(category), "_", " & ")
        name = np.strings.add(
            np.strings.add(np.strings.add(np.strings.add(brand, " "), noun), " "), model
        )
        return {
            "product_id": _strs(idx + 1),
            "sku": np.strings.add("SKU-", np.strings.zfill(_strs(idx + 1), 7)),
            "name": name,
            "category": category,
            "brand": brand,
            "list_price": _cents_to_text(self.prod_price_cents[idx]),
            "unit_cost": _cents_to_text(self.prod_cost_cents[idx]),
            "launched_on": _date_text(self.prod_launch[idx]),
            "is_active": np.where(self.prod_active[idx], "true", "false").astype(_S),
        }

    def _product_dirt(
        self, rng: np.random.Generator, f: dict[str, np.ndarray], kind: str, rows: np.ndarray
    ) -> None:
        k = len(rows)
        if kind == NORMALISED:
            f["category"][rows] = np.strings.add(np.strings.upper(f["category"][rows]), " ")
            f["brand"][rows] = np.strings.add("  ", np.strings.upper(f["brand"][rows]))
            f["name"][rows] = np.strings.replace(f["name"][rows], " ", "  ")
        elif kind == "missing_name":
            f["name"][rows] = _pick(rng, (NULL, "", "   "), k)
        elif kind == "negative_price":
            f["list_price"][rows] = np.strings.add("-", f["list_price"][rows])

    # ---- sales

    def _sales_frame(self, rng: np.random.Generator, slot: ChunkSlot) -> Frame:
        batch, index, n = slot.batch, slot.index, slot.rows
        if batch == 0:
            days = np.arange(DAYS)
        else:
            days = np.arange(DAYS + INCREMENT_DAYS * (batch - 1), DAYS + INCREMENT_DAYS * batch)
        w = day_weights(days, self.seed)
        cdf = np.cumsum(w) / w.sum()
        n_ret = round(n * RETURN_RATE)
        n_base = n - n_ret
        sizes = _transaction_sizes(rng, n_base)
        n_txn = len(sizes)
        # chunk i takes the i-th quantile slice of the day distribution: bronze lands in time order
        u = (index + rng.random(n_txn)) / slot.chunks
        day = days[np.minimum(np.searchsorted(cdf, u, side="right"), len(days) - 1)]
        hour = np.searchsorted(np.cumsum(HOUR_WEIGHT) / sum(HOUR_WEIGHT), rng.random(n_txn))
        sec = day * 86400 + hour * 3600 + rng.integers(0, 3600, n_txn)
        order = np.argsort(sec, kind="stable")
        day, sec = day[order], sec[order]
        # customers who had signed up by then, weighted by activity
        eligible = np.searchsorted(self.cust_signup, day, side="right")
        eligible = np.maximum(eligible, 1)
        cw = self.cust_cum_weight
        cust = np.searchsorted(cw, rng.random(n_txn) * cw[eligible - 1], side="right")
        cust = np.minimum(cust, eligible - 1)
        channel = rng.choice(len(CHANNELS), n_txn, p=CHANNEL_P)
        home = self.cust_region[cust]
        warehouse = np.where(rng.random(n_txn) < 0.8, home, rng.integers(0, len(WAREHOUSES), n_txn))
        discount = promo_discount(day, self.seed)
        coupon = (discount == 0) & (rng.random(n_txn) < 0.08)
        discount = np.where(coupon, rng.choice([0.05, 0.10], n_txn), discount)
        txn_id = batch * 10**11 + index * self.chunk_rows + np.arange(1, n_txn + 1)
        # lines
        line_txn = np.repeat(np.arange(n_txn), sizes)
        starts = np.cumsum(sizes) - sizes
        line_no = np.arange(n_base) - np.repeat(starts, sizes) + 1
        pcw = self.prod_cum_weight
        product = np.minimum(np.searchsorted(pcw, rng.random(n_base) * pcw[-1]), self.products - 1)
        qty = rng.geometric(0.6, n_base)
        bulk = self.cust_segment[cust[line_txn]] == SEGMENTS.index("corporate")
        qty = np.where(bulk, qty * rng.integers(1, 6, n_base), qty)
        # returns: a later transaction of its own, pointing at the original
        ret = np.sort(rng.choice(n_base, n_ret, replace=False))
        ret_txn = txn_id[-1] + np.arange(1, n_ret + 1) if n_txn else np.arange(1, n_ret + 1)
        ret_sec = (
            sec[line_txn[ret]]
            + rng.integers(1, 31, n_ret) * 86400
            + rng.integers(-3600 * 6, 3600 * 6, n_ret)
        )
        cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
        all_txn = cat(txn_id[line_txn], ret_txn)
        return {
            "transaction_id": _strs(all_txn),
            "line_no": _strs(cat(line_no, np.ones(n_ret, dtype=np.int64))),
            "transaction_type": np.array(["sale"] * n_base + ["return"] * n_ret, dtype=_S),
            "original_transaction_id": cat(
                np.full(n_base, NULL, dtype=_S), _strs(txn_id[line_txn[ret]])
            ),
            "customer_id": _strs(cat(cust[line_txn], cust[line_txn[ret]]) + 1),
            "product_id": _strs(cat(product, product[ret]) + 1),
            "warehouse_id": _strs(cat(warehouse[line_txn], warehouse[line_txn[ret]]) + 1),
            "channel": _choice_strings(CHANNELS, cat(channel[line_txn], channel[line_txn[ret]])),
            "sold_at": _ts_text(cat(sec[line_txn], ret_sec)),
            "quantity": _strs(cat(qty, qty[ret])),
            "unit_price": _cents_to_text(self.prod_price_cents[cat(product, product[ret])]),
            "discount_pct": _strs(np.round(cat(discount[line_txn], discount[line_txn[ret]]), 2)),
        }

    def _sales_dirt(
        self, rng: np.random.Generator, f: dict[str, np.ndarray], kind: str, rows: np.ndarray
    ) -> None:
        k = len(rows)
        if kind == NORMALISED:
            f["channel"][rows] = _pick_fn(
                rng,
                (np.strings.upper, np.strings.capitalize, lambda a: np.strings.add(" ", a)),
                f["channel"][rows],
            )
            f["transaction_type"][rows] = np.strings.add(
                np.strings.capitalize(f["transaction_type"][rows]), " "
            )
        elif kind in ("missing_customer_id", "missing_product_id", "missing_sold_at"):
            col = kind.removeprefix("missing_")
            f[col][rows] = _pick(rng, (NULL, "", " "), k)
        elif kind == "malformed_sold_at":
            f["sold_at"][rows] = _pick(rng, MALFORMED_TIMESTAMPS, k)
        elif kind == "future_sold_at":
            f["sold_at"][rows] = _ts_text(rng.integers(70 * 365 * 86400, 75 * 365 * 86400, k))
        elif kind == "negative_quantity":
            f["quantity"][rows] = np.strings.add("-", f["quantity"][rows])
        elif kind == "unknown_customer":
            f["customer_id"][rows] = _strs(self.customers + rng.integers(1, 10**6, k))
        elif kind == "unknown_product":
            f["product_id"][rows] = _strs(self.products + rng.integers(1, 10**6, k))

    # ---- inventory

    def _inventory_frame(self, rng: np.random.Generator, slot: ChunkSlot) -> Frame:
        per_product = self.inventory // self.products
        n_prod = slot.rows // per_product
        first = slot.offset // per_product
        prod = np.arange(first, first + n_prod)
        k = min(WAREHOUSES_PER_PRODUCT, len(WAREHOUSES))
        stocked = np.argsort(rng.random((n_prod, len(WAREHOUSES))), axis=1)[:, :k]
        stocked.sort(axis=1)
        month_ends = (
            np.array(
                [(dt.date(END.year, m, 1) - START).days for m in range(2, 13)] + [DAYS],
                dtype=np.int64,
            )
            - 1
        )
        # rows ordered snapshot, product, warehouse
        snap = np.repeat(month_ends, n_prod * k)
        p = np.tile(np.repeat(prod, k), SNAPSHOTS)
        wh = np.tile(stocked.reshape(-1), SNAPSHOTS)
        share = self.prod_popularity[p] / self.prod_popularity.sum()
        daily = share * self.sales * 1.6 / DAYS / k  # units per day at one warehouse
        reorder = np.ceil(daily * 14).astype(np.int64) + 5
        on_hand = np.maximum(0, np.round(rng.normal(2.2 * reorder, 1.0 * reorder))).astype(np.int64)
        on_hand[rng.random(len(on_hand)) < 0.04] = 0  # stock-outs
        return {
            "warehouse_id": _strs(wh + 1),
            "warehouse_code": _choice_strings(WAREHOUSES, wh),
            "product_id": _strs(p + 1),
            "snapshot_date": _date_text(snap),
            "quantity_on_hand": _strs(on_hand),
            "reorder_point": _strs(reorder),
            "unit_cost": _cents_to_text(self.prod_cost_cents[p]),
        }

    def _inventory_dirt(
        self, rng: np.random.Generator, f: dict[str, np.ndarray], kind: str, rows: np.ndarray
    ) -> None:
        k = len(rows)
        if kind == NORMALISED:
            f["warehouse_code"][rows] = np.strings.add(
                " ", np.strings.lower(f["warehouse_code"][rows])
            )
        elif kind == "missing_product_id":
            f["product_id"][rows] = _pick(rng, (NULL, "", " "), k)
        elif kind == "negative_quantity":
            f["quantity_on_hand"][rows] = _strs(-rng.integers(1, 50, k))
        elif kind == "malformed_snapshot_date":
            f["snapshot_date"][rows] = _pick(rng, MALFORMED_DATES, k)
        elif kind == "future_snapshot_date":
            f["snapshot_date"][rows] = _date_text(rng.integers(70 * 365, 75 * 365, k))
        elif kind == "unknown_product":
            f["product_id"][rows] = _strs(self.products + rng.integers(1, 10**6, k))


def _pick(rng: np.random.Generator, options: tuple[str, ...], k: int) -> np.ndarray:
    return _choice_strings(options, rng.integers(0, len(options), k))


def _pick_fn(
    rng: np.random.Generator, fns: tuple[Callable[[np.ndarray], np.ndarray], ...], a: np.ndarray
) -> np.ndarray:
    which = rng.integers(0, len(fns), len(a))
    out = a.copy()
    for i, fn in enumerate(fns):
        sel = which == i
        if sel.any():
            out[sel] = fn(a[sel])
    return out


def _transaction_sizes(rng: np.random.Generator, lines: int) -> np.ndarray:
    """Lines per transaction (1-8, mean about 2.2), summing exactly to `lines`."""
    if lines <= 0:
        return np.zeros(0, dtype=np.int64)
    sizes = 1 + np.minimum(rng.poisson(1.2, lines // 2 + 16), 7)
    while sizes.sum() < lines:
        sizes = np.concatenate([sizes, 1 + np.minimum(rng.poisson(1.2, lines // 2 + 16), 7)])
    cs = np.cumsum(sizes)
    last = int(np.searchsorted(cs, lines))
    sizes = sizes[: last + 1].copy()
    sizes[-1] -= cs[last] - lines
    return sizes


# --------------------------------------------------------------------------- loading


def make_progress(console: Any = None) -> Any:
    """Rich progress bars, one task per table (rows)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>12}"),
        TimeElapsedColumn(),
        console=console,
    )


@dataclass
class _TableLoad:
    rows: int = 0
    dirt: dict[str, int] = field(default_factory=dict)

    def add(self, chunk: Chunk) -> None:
        self.rows += chunk.rows
        for k, v in chunk.dirt.items():
            self.dirt[k] = self.dirt.get(k, 0) + v


async def _encoded_ahead(
    gen: Datagen, table: str, batch: int
) -> AsyncIterator[tuple[Chunk, bytes]]:
    """Chunks with their COPY bytes, the next one generated in a worker thread meanwhile.

    The server parses one chunk while numpy builds the next, which is what two cores buy.
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = iter(gen.chunks(table, batch))

    def step() -> tuple[Chunk, bytes] | None:
        chunk = next(chunks, None)
        return None if chunk is None else (chunk, chunk.copy_bytes())

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="datagen") as pool:
        pending = loop.run_in_executor(pool, step)
        while (item := await pending) is not None:
            pending = loop.run_in_executor(pool, step)
            yield item


async def _copy_source(
    gen: Datagen, table: str, batch: int, stats: _TableLoad, progress: Any, task: Any
) -> AsyncIterator[bytes]:
    started = time.perf_counter()
    async for chunk, data in _encoded_ahead(gen, table, batch):
        stats.add(chunk)
        yield data
        if progress is not None:
            rate = stats.rows / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=chunk.rows, rate=f"{rate:,.0f} rows/s")


async def load_bronze(
    conn: Any, gen: Datagen, batch: int = 0, progress: Any = None
) -> GenerationResult:
    """Generate load `batch` and COPY it into bronze on an asyncpg connection.

    Runs in the caller's transaction, if any. Returns rows, clean rows and dirt per table.
    """
    result = GenerationResult(gen.scale, gen.seed, batch)
    for table in TABLES:
        plan = gen.chunk_plan(table, batch)
        if not plan:
            continue
        task = None
        if progress is not None:
            task = progress.add_task(
                f"bronze.{table}_raw", total=gen.expected_rows(table, batch), rate=""
            )
        stats = _TableLoad()
        t0 = time.perf_counter()
        await conn.copy_to_table(
            f"{table}_raw",
            schema_name="bronze",
            source=_copy_source(gen, table, batch, stats, progress, task),
            columns=[*COLUMNS[table], "_batch_id"],
            format="text",
        )
        result.seconds[table] = time.perf_counter() - t0
        result.rows[table] = stats.rows
        result.clean[table] = sum(plan)
        result.dirt[table] = stats.dirt
    return result


async def record_batch(conn: Any, result: GenerationResult) -> None:
    """The manifest row of a load in bronze.load_batches."""
    await conn.execute(
        "INSERT INTO bronze.load_batches (batch_id, scale, seed, rows, dirt)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
        result.batch,
        result.scale,
        result.seed,
        json.dumps({"bronze": result.rows, "clean": result.clean}),
        json.dumps(result.dirt),
    )


# --------------------------------------------------------------------------- benchmark

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GOAL_SECONDS_SCALE_10 = 60.0
GOAL_PEAK_RSS = 1 << 30
DEFAULT_DSN = os.environ.get("PGSAGE_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def generate_only(gen: Datagen, progress: Any = None) -> dict[str, dict[str, float]]:
    """Generate and encode every table without a database: rows, bytes and rows/s per table."""
    out: dict[str, dict[str, float]] = {}
    for table in TABLES:
        task = None
        if progress is not None:
            task = progress.add_task(f"bronze.{table}_raw", total=gen.expected_rows(table), rate="")
        rows = nbytes = 0
        t0 = time.perf_counter()
        for chunk in gen.chunks(table):
            nbytes += len(chunk.copy_bytes())
            rows += chunk.rows
            if progress is not None:
                rate = rows / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=chunk.rows, rate=f"{rate:,.0f} rows/s")
        secs = time.perf_counter() - t0
        out[table] = {"rows": rows, "bytes": nbytes, "seconds": round(secs, 3),
                      "rows_per_s": round(rows / secs)}  # fmt: skip
    return out


async def _bench_with_database(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    # bench may import warehouse_sql (and never proxy); bench.warehouse holds the plumbing
    from bench import warehouse

    database = args.database or f"pgsage_datagen_{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    result = await warehouse.init_warehouse_async(
        args.dsn,
        scale=args.scale,
        seed=args.seed,
        database=database,
        etl=not args.no_etl,
        reset=True,
        progress=progress,
        chunk_rows=args.chunk_rows,
    )
    total = time.perf_counter() - t0
    try:
        version = await warehouse.server_version(args.dsn, database)
    finally:
        if not args.keep and not args.database:
            await warehouse.drop_database_async(args.dsn, database)
    gen = result.generation
    assert gen is not None
    tables = {
        t: {
            "rows": gen.rows[t],
            "clean_rows": gen.clean[t],
            "injected_rejects": gen.rejects(t),
            "seconds": round(gen.seconds[t], 3),
            "rows_per_s": round(gen.rows[t] / gen.seconds[t]),
        }
        for t in gen.rows
    }
    etl = result.etl.as_dict() if result.etl else None
    return {
        "mode": "generate+load" + ("" if args.no_etl else "+etl"),
        "database": database if args.keep or args.database else None,
        "postgres": version,
        "tables": tables,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()} | {"total": round(total, 3)},
        "etl": etl,
    }


def _render(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"bench.datagen scale {report['scale']} ({report['mode']})")
    for col in ("table", "rows", "seconds", "rows/s"):
        table.add_column(col, justify="left" if col == "table" else "right")
    for name, t in report["tables"].items():
        table.add_row(f"bronze.{name}_raw", f"{t['rows']:,}", f"{t['seconds']:.2f}",
                      f"{t['rows_per_s']:,}")  # fmt: skip
    for phase, secs in report.get("seconds", {}).items():
        table.add_row(f"[italic]{phase}", "", f"{secs:.2f}", "")
    table.add_row("[bold]peak RSS", f"{report['peak_rss_bytes'] / 2**20:,.0f} MiB", "", "")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.datagen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="server to load into (any database)")
    parser.add_argument("--database", help="load into this database and keep it")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--no-load", action="store_true", help="generator alone, no database")
    parser.add_argument("--no-etl", action="store_true", help="load bronze but skip the ETL")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "datagen-latest.json")
    args = parser.parse_args(argv)

    from rich.console import Console

    err = Console(stderr=True)
    progress = None if args.quiet else make_progress(err)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    if progress is not None:
        progress.start()
    try:
        if args.no_load:
            t0 = time.perf_counter()
            gen = Datagen(args.scale, args.seed, args.chunk_rows)
            tables = generate_only(gen, progress)
            body: dict[str, Any] = {
                "mode": "generate",
                "tables": tables,
                "seconds": {"total": round(time.perf_counter() - t0, 3)},
            }
        else:
            body = asyncio.run(_bench_with_database(args, progress))
    finally:
        if progress is not None:
            progress.stop()
    rss = peak_rss_bytes()
    report: dict[str, Any] = {
        "benchmark": "datagen",
        "started_at": started.isoformat(),
        "scale": args.scale,
        "seed": args.seed,
        "chunk_rows": args.chunk_rows,
        **body,
        "peak_rss_bytes": rss,
        "machine": {
            "cpus": os.cpu_count(),
            # other work on the machine skews the timings: the 1-minute load around the run
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
    }
    goals: dict[str, Any] = {
        "peak_rss_bytes_max": GOAL_PEAK_RSS,
        "peak_rss_ok": rss <= GOAL_PEAK_RSS,
    }
    if body["mode"] == "generate+load+etl" and args.scale <= 10:
        goals["total_seconds_max_at_scale_10"] = GOAL_SECONDS_SCALE_10
        goals["total_seconds_ok"] = body["seconds"]["total"] <= GOAL_SECONDS_SCALE_10
    report["goals"] = goals
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    err.print(_render(report))
    err.print(f"wrote {args.output}")
    return 0 if all(v for k, v in goals.items() if k.endswith("_ok")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
