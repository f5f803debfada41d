"""bench.datagen without a database: sizes, distributions, dirt counts, determinism."""

from __future__ import annotations

import datetime as dt
from functools import cache

import numpy as np
import pytest

from bench import datagen
from bench.datagen import COLUMNS, DIRT_RATES, NORMALISED, NULL, TABLES, Datagen


@cache
def clean_sales(scale: float = 1.0, seed: int = 7) -> dict[str, np.ndarray]:
    """Every clean sales line of a warehouse, columns as numpy arrays."""
    gen = Datagen(scale, seed)
    chunks = list(gen.chunks("sales", dirty=False))
    cols = {c: np.concatenate([ch.parts[0][c] for ch in chunks]) for c in COLUMNS["sales"]}
    cols["sold_at"] = cols["sold_at"].astype("datetime64[s]")
    for c in ("product_id", "customer_id", "quantity", "transaction_id"):
        cols[c] = cols[c].astype(np.int64)
    return cols


def _blank(values: list[str]) -> int:
    return sum(v.strip() in ("", NULL) for v in values)


def test_sizes_are_linear_in_scale() -> None:
    small, big = Datagen(0.05), Datagen(0.5)
    assert (small.customers, small.products, small.sales) == (500, 50, 5_000)
    assert (big.customers, big.products, big.sales) == (5_000, 500, 50_000)
    assert small.inventory == 50 * 3 * 12 and big.inventory == 500 * 3 * 12
    for table in TABLES:
        assert big.clean_rows(table) == 10 * small.clean_rows(table)


def test_chunks_add_up_to_the_plan_and_the_reported_dirt() -> None:
    gen = Datagen(0.3, seed=3, chunk_rows=2_000)  # several chunks per table but products
    for table in TABLES:
        chunks = list(gen.chunks(table))
        assert len(chunks) == len(gen.chunk_plan(table))
        assert len(chunks) == {"customer": 2, "product": 1, "sales": 15, "inventory": 6}[table]
        assert sum(c.clean_rows for c in chunks) == gen.clean_rows(table)
        assert sum(c.rows for c in chunks) == gen.expected_rows(table)
        merged: dict[str, int] = {}
        for c in chunks:
            for k, v in c.dirt.items():
                merged[k] = merged.get(k, 0) + v
        assert merged == gen.expected_dirt(table)
        assert set(merged) == {*DIRT_RATES[table], NORMALISED}


def test_copy_bytes_are_copy_text_rows() -> None:
    chunk = next(Datagen(0.05).chunks("product"))
    lines = chunk.copy_bytes().decode().splitlines()
    assert len(lines) == chunk.rows
    assert all(line.count("\t") == len(COLUMNS["product"]) for line in lines)  # + _batch_id
    assert all(line.endswith("\t0") for line in lines)


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    def digest(seed: int) -> list[bytes]:
        gen = Datagen(0.05, seed)
        return [c.copy_bytes() for t in TABLES for c in gen.chunks(t)]

    assert digest(11) == digest(11)
    assert digest(11) != digest(12)


def test_dirty_sales_rows_are_countable_by_kind() -> None:
    gen = Datagen(0.2, seed=5)
    chunk = next(gen.chunks("sales"))
    dirt = chunk.dirt
    cust = chunk.column("customer_id")
    prod = chunk.column("product_id")
    sold = chunk.column("sold_at")
    qty = chunk.column("quantity")
    assert _blank(cust) == dirt["missing_customer_id"]
    assert _blank(prod) == dirt["missing_product_id"]
    assert _blank(sold) == dirt["missing_sold_at"]
    assert sum(v.startswith("-") for v in qty) == dirt["negative_quantity"]
    assert sum(v[:2] == "20" and v[:4] >= "2090" for v in sold) == dirt["future_sold_at"]
    assert sum(v in datagen.MALFORMED_TIMESTAMPS for v in sold) == dirt["malformed_sold_at"]
    unknown_c = sum(v.strip().isdigit() and int(v) > gen.customers for v in cust)
    unknown_p = sum(v.strip().isdigit() and int(v) > gen.products for v in prod)
    assert (unknown_c, unknown_p) == (dirt["unknown_customer"], dirt["unknown_product"])
    # the clean part: only case/whitespace spoilt, exactly the reported number of rows
    clean = chunk.parts[0]
    spoilt = ~np.isin(clean["channel"].tolist(), ["online", "store", "mobile"])
    assert int(spoilt.sum()) == dirt[NORMALISED]
    assert chunk.rows == chunk.clean_rows + sum(v for k, v in dirt.items() if k != NORMALISED)


def test_dirty_customers_keep_every_clean_key() -> None:
    chunk = next(Datagen(0.1, seed=9).chunks("customer"))
    dates = chunk.column("signup_date")
    assert sum(v in datagen.MALFORMED_DATES for v in dates) == chunk.dirt["malformed_signup_date"]
    assert sum(v >= "2090" for v in dates) == chunk.dirt["future_signup_date"]
    ids = [v for v in chunk.column("customer_id") if v.strip() not in ("", NULL)]
    assert set(int(v) for v in ids) == set(range(1, 1_001))
    emails = chunk.column("email")
    assert _blank(emails) == chunk.dirt["missing_email"]
    bad = sum("@" in v and ("@@" in v or " at " in v or "@ " in v) for v in emails)
    no_at = sum(v.strip() not in ("", NULL) and "@" not in v for v in emails)
    assert bad + no_at == chunk.dirt["malformed_email"]


def test_product_popularity_follows_zipf() -> None:
    sales = clean_sales()
    counts = np.sort(np.bincount(sales["product_id"]))[::-1]
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.4 < slope < -0.8, slope  # generated with exponent 1.1
    top_decile = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile > 0.5


def test_yearly_weekly_and_hourly_seasonality() -> None:
    ts = clean_sales()["sold_at"]
    sale_ts = ts[ts < np.datetime64(datagen.END + dt.timedelta(days=1))]
    days = sale_ts.astype("datetime64[D]")
    months = (days.astype("datetime64[M]").astype(int) % 12) + 1
    per_day = {m: (months == m).sum() / {2: 29 + 28}.get(m, 62) for m in (2, 12)}
    assert per_day[12] > 1.3 * per_day[2]  # December run-up against February
    weekday = (days.astype(np.int64) + 3) % 7
    assert (weekday == 5).sum() > 1.25 * (weekday == 0).sum()  # Saturday against Monday
    hours = (sale_ts - days).astype(np.int64) // 3600
    assert (hours == 20).sum() > 10 * (hours == 4).sum()


def test_promotion_days_spike_and_carry_discounts() -> None:
    sales = clean_sales()
    days = sales["sold_at"].astype("datetime64[D]")
    black_friday = np.datetime64("2025-11-28")
    fridays = [np.datetime64("2025-11-07"), np.datetime64("2025-11-14")]
    normal = np.mean([(days == d).sum() for d in fridays])
    assert (days == black_friday).sum() > 2.2 * normal
    on_bf = sales["discount_pct"][(days == black_friday) & (sales["transaction_type"] == "sale")]
    assert set(on_bf.tolist()) == {"0.3"}


def test_returns_point_at_earlier_sales_of_the_same_product() -> None:
    sales = clean_sales(0.3)
    is_ret = sales["transaction_type"] == "return"
    assert 0.02 < is_ret.mean() < 0.04
    originals = sales["original_transaction_id"][is_ret].astype(np.int64)
    sale_txn = sales["transaction_id"][~is_ret]
    assert np.isin(originals, sale_txn).all()
    first_seen = {}
    for t, when in zip(sale_txn.tolist(), sales["sold_at"][~is_ret].tolist(), strict=True):
        first_seen.setdefault(t, when)
    later = [
        when > first_seen[o]
        for o, when in zip(originals.tolist(), sales["sold_at"][is_ret].tolist(), strict=True)
    ]
    assert all(later)


def test_customers_buy_only_after_signing_up_and_segments_differ() -> None:
    gen = Datagen(1.0, seed=7)
    sales = clean_sales()
    sale_day = (sales["sold_at"].astype("datetime64[D]") - np.datetime64(datagen.START)).astype(int)
    signup = gen.cust_signup[sales["customer_id"] - 1]
    assert (signup <= sale_day).all()
    per_customer = np.bincount(sales["customer_id"] - 1, minlength=gen.customers)
    vip = per_customer[gen.cust_segment == datagen.SEGMENTS.index("vip")].mean()
    consumer = per_customer[gen.cust_segment == datagen.SEGMENTS.index("consumer")].mean()
    assert vip > 2.5 * consumer


@pytest.mark.parametrize("table", TABLES)
def test_generated_prices_dates_and_ids_parse(table: str) -> None:
    chunk = next(Datagen(0.05, seed=1).chunks(table, dirty=False))
    frame = chunk.parts[0]
    for col, values in frame.items():
        text = values.tolist()
        if col.endswith("_id") and col != "original_transaction_id":
            assert all(v.isdigit() for v in text), col
        if col in ("list_price", "unit_cost", "unit_price"):
            assert all(float(v) >= 0 and len(v.split(".")[1]) == 2 for v in text), col
        if col in ("signup_date", "launched_on", "snapshot_date"):
            assert all(dt.date.fromisoformat(v) for v in text), col
