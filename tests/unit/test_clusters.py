"""Query clustering without a database: planted groups, k by silhouette, online assignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from models.clusters import (
    ClusterModel,
    aggregate_templates,
    fit_clusters,
    gate,
    history_matrix,
    template_features,
)

HOURS = 24 * 7
START = pd.Timestamp("2026-03-02", tz="UTC")  # a Monday

#: three planted groups: what they run, who runs it, and when (hours of the day busy)
GROUPS = {
    "app": (
        [
            "SELECT * FROM silver.customers_cleaned WHERE customer_id = $1",
            "SELECT name, email FROM silver.customers_cleaned WHERE customer_id = $1",
            "SELECT * FROM silver.products_cleaned WHERE product_id = $1",
            "SELECT price FROM silver.products_cleaned WHERE sku = $1",
            "SELECT * FROM gold.customer_360 WHERE customer_id = $1",
            "SELECT qty FROM silver.inventory_cleaned WHERE product_id = $1",
        ],
        range(8, 18),
        2.0,
    ),
    "etl": (
        [
            "INSERT INTO bronze.sales_raw (a, b, c) VALUES ($1, $2, $3)",
            "INSERT INTO bronze.inventory_raw (a, b) VALUES ($1, $2)",
            "UPDATE silver.inventory_cleaned SET qty = qty - $1 WHERE product_id = $2",
            "UPDATE silver.products_cleaned SET price = $1 WHERE product_id = $2",
            "DELETE FROM bronze.sales_raw WHERE batch_id = $1",
            "INSERT INTO bronze.customer_raw (a) VALUES ($1)",
        ],
        range(0, 5),
        20.0,
    ),
    "analyst": (
        [
            "SELECT c.region, sum(s.amount) FROM silver.sales_cleaned s JOIN"
            " silver.customers_cleaned c ON c.customer_id = s.customer_id"
            " WHERE s.sold_at > $1 GROUP BY c.region ORDER BY 2 DESC",
            "SELECT p.category, count(DISTINCT s.customer_id), avg(s.amount) FROM"
            " silver.sales_cleaned s JOIN silver.products_cleaned p ON p.product_id ="
            " s.product_id GROUP BY p.category HAVING count(*) > $1",
            "SELECT customer_id, sum(amount) OVER (PARTITION BY customer_id ORDER BY sold_at)"
            " FROM silver.sales_cleaned s JOIN silver.customers_cleaned c USING (customer_id)"
            " WHERE c.segment = $1",
            "WITH t AS (SELECT customer_id, sum(amount) a FROM silver.sales_cleaned GROUP BY 1)"
            " SELECT c.city, avg(t.a) FROM t JOIN silver.customers_cleaned c USING"
            " (customer_id) GROUP BY c.city ORDER BY 2 DESC LIMIT 10",
            "SELECT p.name, sum(s.qty) FROM silver.sales_cleaned s JOIN silver.products_cleaned"
            " p USING (product_id) JOIN silver.customers_cleaned c USING (customer_id) WHERE"
            " c.region = $1 GROUP BY p.name ORDER BY 2 DESC LIMIT 20",
            "SELECT date_trunc('month', sold_at), count(*), sum(amount) FROM"
            " silver.sales_cleaned s JOIN silver.products_cleaned p USING (product_id) WHERE"
            " p.category = $1 GROUP BY 1 ORDER BY 1",
        ],
        range(13, 17),
        900.0,
    ),
}


def planted(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(by_role rows, hourly arrivals, fingerprint -> group) of the planted workload."""
    rng = np.random.default_rng(seed)
    by_role, hourly, truth = [], [], {}
    for group, (texts, busy, ms) in GROUPS.items():
        for i, text in enumerate(texts):
            fp = f"{group[:3]}{i:013d}"
            truth[fp] = group
            rate = np.where(np.isin(np.arange(HOURS) % 24, list(busy)), 30.0, 0.3)
            counts = rng.poisson(rate * rng.uniform(0.5, 2.0))
            for h in np.flatnonzero(counts):
                hourly.append((fp, START + pd.Timedelta(hours=int(h)), int(counts[h])))
            n = int(counts.sum())
            role_runs = {group: n - n // 10, "other": n // 10}
            for role, k in role_runs.items():
                by_role.append((fp, role, k, k * ms * rng.uniform(0.8, 1.2), 1.0, text))
    cols = ["fingerprint", "role", "executions", "total_ms", "mean_rows", "normalized_text"]
    return (
        pd.DataFrame(by_role, columns=cols),
        pd.DataFrame(hourly, columns=["fingerprint", "hour", "n"]),
        truth,
    )


def test_clustering_recovers_planted_groups_and_profiles_them():
    by_role, hourly, truth = planted()
    model, templates, info = fit_clusters(by_role, hourly)
    expected = [truth[fp] for fp in templates.index]
    assert adjusted_rand_score(expected, model.labels_) == pytest.approx(1.0)
    assert model.k_ == 3
    assert max(model.silhouettes_by_k_, key=model.silhouettes_by_k_.get) == 3
    assert info["metrics"]["silhouette"] > 0.3
    assert info["metrics"]["davies_bouldin"] < 1.0
    profiles = info["profiles"]
    assert [p["cluster"] for p in profiles] == [0, 1, 2]
    assert sum(p["share_executions"] for p in profiles) == pytest.approx(1.0)
    assert sum(p["share_time"] for p in profiles) == pytest.approx(1.0)
    by_role_name = {p["dominant_role"]: p for p in profiles}
    assert set(by_role_name) == {"app", "etl", "analyst"}
    # clusters are numbered by executions, busiest first
    shares = [p["share_executions"] for p in profiles]
    assert shares == sorted(shares, reverse=True)
    analyst = by_role_name["analyst"]
    assert analyst["mean_latency_ms"] > 100 * by_role_name["app"]["mean_latency_ms"]
    assert analyst["share_time"] > 0.9
    assert "silver.sales_cleaned" in analyst["tables"]
    assert analyst["role_share"] == pytest.approx(0.9, abs=0.02)
    assert "bronze.sales_raw" in by_role_name["etl"]["tables"]
    assert analyst["templates"] == 6 and len(analyst["fingerprints"]) == 6


def test_history_shape_alone_separates_same_sql_with_different_arrival_times():
    """Identical SQL features, two arrival shapes: only the cosine block can split them."""
    rng = np.random.default_rng(3)
    fps = [f"{i:016d}" for i in range(12)]
    feats = pd.DataFrame({"n_tables": 1.0, "n_joins": 0.0, "log_mean_ms": 1.0}, index=fps)
    day = np.arange(HOURS) % 24
    morning = np.where((day >= 6) & (day < 10), 20.0, 0.5)
    evening = np.where((day >= 18) & (day < 22), 20.0, 0.5)
    H = np.array([rng.poisson(morning if i < 6 else evening) for i in range(12)], float)
    model = ClusterModel().fit(feats, H)
    assert model.k_ == 2
    assert adjusted_rand_score([i < 6 for i in range(12)], model.labels_) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_silhouette_chooses_the_number_of_blobs(k):
    rng = np.random.default_rng(k)
    centers = rng.normal(0, 10, size=(k, 5))
    X = np.vstack([c + rng.normal(0, 0.3, size=(8, 5)) for c in centers])
    feats = pd.DataFrame(X, columns=[f"f{i}" for i in range(5)])
    model = ClusterModel(k_max=10).fit(feats)
    assert model.k_ == k
    truth = np.repeat(np.arange(k), 8)
    assert adjusted_rand_score(truth, model.labels_) == pytest.approx(1.0)
    ok, reason = gate(model, len(X))
    assert ok and f"k={k}" in reason


def test_new_templates_are_assigned_to_the_nearest_cluster_and_survive_a_round_trip(
    tmp_path: Path,
):
    by_role, hourly, truth = planted(seed=1)
    model, templates, _ = fit_clusters(by_role, hourly)
    cluster_of = {truth[fp]: c for fp, c in zip(templates.index, model.labels_, strict=True)}
    new_texts = [
        "SELECT * FROM silver.customers_cleaned WHERE email = $1",
        "INSERT INTO bronze.product_raw (a, b, c) VALUES ($1, $2, $3)",
        "SELECT c.segment, sum(s.amount), count(DISTINCT s.product_id) FROM silver.sales_cleaned"
        " s JOIN silver.customers_cleaned c USING (customer_id) GROUP BY c.segment ORDER BY 2",
    ]
    feats, _ = template_features(new_texts, ["n1", "n2", "n3"], [2.0, 20.0, 900.0], [1, 1, 1])
    labels = model.assign(feats)
    assert list(labels) == [cluster_of["app"], cluster_of["etl"], cluster_of["analyst"]]
    model.save(tmp_path / "model.json")
    loaded = ClusterModel.load(tmp_path / "model.json")
    assert list(loaded.assign(feats)) == list(labels)
    assert loaded.silhouette_ == pytest.approx(model.silhouette_)
    one = loaded.assign({**feats.iloc[2].to_dict()})
    assert int(one[0]) == cluster_of["analyst"]


def test_unparsable_text_and_too_few_templates_give_one_cluster():
    feats, tables = template_features(["SELECT (((", None], ["a", "b"], [1.0, 2.0], [0, 0])
    assert np.isnan(feats.loc["a", "n_tables"]) and tables == [(), ()]
    model = ClusterModel().fit(feats)
    assert model.k_ == 1 and list(model.labels_) == [0, 0]
    assert gate(model, 2)[0]


def test_history_matrix_places_counts_in_hour_bins():
    hourly = pd.DataFrame(
        [("a", START, 3), ("a", START + pd.Timedelta(hours=5), 2), ("b", START, 1)],
        columns=["fingerprint", "hour", "n"],
    )
    H = history_matrix(hourly, ["b", "a", "c"])
    assert H.shape == (3, 6)
    assert H[1, 0] == 3 and H[1, 5] == 2 and H[0, 0] == 1 and H[2].sum() == 0


def test_aggregate_templates_weights_rows_and_picks_the_dominant_role():
    by_role = pd.DataFrame(
        [("f", "app", 30, 60.0, 2.0, "q"), ("f", "analyst", 10, 100.0, 10.0, "q")],
        columns=["fingerprint", "role", "executions", "total_ms", "mean_rows", "normalized_text"],
    )
    t = aggregate_templates(by_role)
    assert t.loc["f", "executions"] == 40
    assert t.loc["f", "mean_ms"] == pytest.approx(4.0)
    assert t.loc["f", "mean_rows"] == pytest.approx((30 * 2 + 10 * 10) / 40)
    assert t.loc["f", "role"] == "app"
