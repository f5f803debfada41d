"""The admin HTTP API under /api/v1: real service, real PostgreSQL, bearer-token auth."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from proxy.api import make_router
from proxy.api.auth import NOT_CONFIGURED
from tests.fix_proxy import direct_dsn

TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime.now(UTC).replace(microsecond=0)


async def _on_loop(fn: Any) -> None:
    fn()


def _client(service) -> httpx.Client:
    """The router mounted on the running service's own app, so handlers run on its loop."""
    app = service.service.http.config.app
    if not any(getattr(r, "path", "").startswith("/api/v1/") for r in app.routes):
        app.include_router(make_router(service.service), prefix="/api/v1")
    return httpx.Client(base_url=service.http_url, timeout=30)


def _seed(service) -> None:
    rows = [
        # started_at offset (minutes ago), duration, command, status, tables, normalized
        (5, 12.5, "SELECT", "ok", ["gold.sales_summary"], "select * from gold.sales_summary"),
        (4, 950.0, "SELECT", "ok", ["silver.sales_cleaned"], "select sum(x) from silver.sales"),
        (3, 3.0, "INSERT", "ok", ["bronze.sales_raw"], "insert into bronze.sales_raw values ($1)"),
        (2, 40.0, "SELECT", "error", ["gold.customer_360"], "select nope from gold.customer_360"),
        (125, 7.0, "UPDATE", "ok", ["gold.sales_summary"], "update gold.sales_summary set a = $1"),
    ]
    with psycopg.connect(direct_dsn(service.database), autocommit=True) as conn:
        for ago, ms, command, status, tables, text in rows:
            started = NOW - timedelta(minutes=ago)
            conn.execute(
                "insert into metadata.query_logs (started_at, finished_at, duration_ms,"
                " fingerprint, normalized_text, command, tables_used, protocol, status,"
                " database_name, user_name, sqlstate)"
                " values (%s, %s, %s, md5(%s), %s, %s, %s, 'simple', %s, 'wh', 'postgres', %s)",
                (
                    started,
                    started + timedelta(milliseconds=ms),
                    ms,
                    text,
                    text,
                    command,
                    tables,
                    status,
                    "42703" if status == "error" else None,
                ),
            )
        for ago in (3, 2, 1):
            conn.execute(
                "insert into metadata.system_metrics (sampled_at, cpu_percent, memory_percent,"
                " proxy_clients) values (%s, %s, 50, 2)",
                (NOW - timedelta(minutes=ago, seconds=7), 10.0 * ago),
            )
        for version, status, active in ((1, "retired", False), (2, "active", True)):
            conn.execute(
                "insert into ml.model_registry (model_name, version, status, is_active, metrics,"
                " params, reason) values ('cost', %s, %s, %s, %s, '{}', 'test')",
                (version, status, active, json.dumps({"qerror_p50": 1.0 + version})),
            )


@pytest.fixture
def api(service, monkeypatch):
    monkeypatch.delenv("PGSAGE_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.setenv("PGSAGE_ADMIN_TOKEN", TOKEN)
    _seed(service)
    with _client(service) as client:
        yield client


def _items(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["items"]


# ---------------------------------------------------------------------- auth


def test_no_token_configured_answers_503_with_how_to(service, monkeypatch):
    monkeypatch.delenv("PGSAGE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PGSAGE_ADMIN_TOKEN_FILE", raising=False)
    with _client(service) as client:
        for path in ("/api/v1/queries", "/api/v1/admin/status", "/api/v1/optimization/x"):
            r = client.get(path, headers=AUTH)
            assert r.status_code == 503
            assert r.json()["detail"] == NOT_CONFIGURED
            assert "PGSAGE_ADMIN_TOKEN" in r.json()["detail"]
        # health and metrics stay open
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_wrong_or_missing_token_is_401_and_right_token_200(api):
    assert api.get("/api/v1/admin/status").status_code == 401
    r = api.get("/api/v1/admin/status", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in r.text
    assert api.get("/api/v1/admin/status", headers={"Authorization": TOKEN}).status_code == 401
    assert api.get("/api/v1/admin/status", headers=AUTH).status_code == 200


def test_token_from_file(service, monkeypatch, tmp_path):
    monkeypatch.delenv("PGSAGE_ADMIN_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    monkeypatch.setenv("PGSAGE_ADMIN_TOKEN_FILE", str(path))
    with _client(service) as client:
        ok = client.get("/api/v1/queries", headers={"Authorization": "Bearer from-a-file"})
        assert ok.status_code == 200
        assert client.get("/api/v1/queries", headers=AUTH).status_code == 401


# ---------------------------------------------------------------------- queries


def test_queries_history_and_filters(api):
    everything = _items(api.get("/api/v1/queries", headers=AUTH))
    assert len(everything) == 5
    starts = [q["started_at"] for q in everything]
    assert starts == sorted(starts, reverse=True)

    slow = _items(api.get("/api/v1/queries", params={"min_duration_ms": 100}, headers=AUTH))
    assert [q["duration_ms"] for q in slow] == [950.0]

    selects = _items(api.get("/api/v1/queries", params={"command": "select"}, headers=AUTH))
    assert {q["command"] for q in selects} == {"SELECT"} and len(selects) == 3

    errors = _items(api.get("/api/v1/queries", params={"status": "error"}, headers=AUTH))
    assert len(errors) == 1 and errors[0]["sqlstate"] == "42703"

    on_table = _items(
        api.get("/api/v1/queries", params={"table": "gold.sales_summary"}, headers=AUTH)
    )
    assert {q["command"] for q in on_table} == {"SELECT", "UPDATE"}

    text = _items(api.get("/api/v1/queries", params={"q": "SUM(X)"}, headers=AUTH))
    assert len(text) == 1 and "silver.sales" in text[0]["normalized_text"]

    start = (NOW - timedelta(minutes=60)).isoformat()
    end = (NOW - timedelta(minutes=2, seconds=30)).isoformat()
    window = _items(api.get("/api/v1/queries", params={"start": start, "end": end}, headers=AUTH))
    assert [q["command"] for q in window] == ["INSERT", "SELECT", "SELECT"]


def test_queries_paging(api):
    page1 = api.get("/api/v1/queries", params={"limit": 2}, headers=AUTH).json()
    page2 = api.get("/api/v1/queries", params={"limit": 2, "offset": 2}, headers=AUTH).json()
    page3 = api.get("/api/v1/queries", params={"limit": 2, "offset": 4}, headers=AUTH).json()
    ids = [q["query_id"] for p in (page1, page2, page3) for q in p["items"]]
    assert len(ids) == len(set(ids)) == 5
    assert page1["next_offset"] == 2 and page3["next_offset"] is None
    for bad in ({"limit": 0}, {"limit": 100000}, {"offset": -1}, {"limit": "ten"}):
        r = api.get("/api/v1/queries", params=bad, headers=AUTH)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"][-1] in bad


def test_one_query_and_unknown_id(api):
    first = _items(api.get("/api/v1/queries", params={"limit": 1}, headers=AUTH))[0]
    r = api.get(f"/api/v1/queries/{first['query_id']}", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["fingerprint"] == first["fingerprint"]
    assert "error_message" in r.json()
    missing = api.get("/api/v1/queries/999999999", headers=AUTH)
    assert missing.status_code == 404 and "999999999" in missing.json()["detail"]
    assert api.get("/api/v1/queries/1;drop", headers=AUTH).status_code == 422


def test_hostile_inputs_are_data_not_sql(api, service):
    attacks = [
        "' OR 1=1 --",
        "x'); DROP TABLE metadata.query_logs; --",
        "%",
        "s_l",  # a LIKE wildcard would match "sel"/"sal"; text search is literal
        "\\",
        "gold.sales_summary' OR 'a'='a",
    ]
    for attack in attacks:
        assert _items(api.get("/api/v1/queries", params={"q": attack}, headers=AUTH)) == []
        assert _items(api.get("/api/v1/queries", params={"table": attack}, headers=AUTH)) == []
        r = api.get("/api/v1/queries", params={"command": attack}, headers=AUTH)
        if attack.replace("_", "").isalpha():
            assert _items(r) == []
        else:
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "command"
    r = api.get("/api/v1/queries", params={"status": "ok' or '1'='1"}, headers=AUTH)
    assert r.status_code == 422
    r = api.get("/api/v1/queries", params={"start": "yesterday; drop"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "start"
    # the table is still there, with every row
    assert len(_items(api.get("/api/v1/queries", headers=AUTH))) == 5
    with psycopg.connect(direct_dsn(service.database)) as conn:
        assert conn.execute("select count(*) from metadata.query_logs").fetchone()[0] == 5


def test_stats_from_real_traffic(api, service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("create table api_t (id int primary key)")
        conn.execute("insert into api_t select generate_series(1, 50)")
        for i in range(30):
            conn.execute("select id from api_t where id = %s", (i + 1,))
    service.flush()
    items = _items(api.get("/api/v1/queries/stats", params={"limit": 50}, headers=AUTH))
    mine = [s for s in items if "api_t where id" in (s["normalized"] or "")]
    assert len(mine) == 1
    assert mine[0]["calls"] == 30 and mine[0]["command"] == "SELECT"
    assert mine[0]["max_time"] >= mine[0]["min_time"] > 0
    totals = [s["total_time"] for s in items]
    assert totals == sorted(totals, reverse=True)
    # and the same statements are in the history, found by table
    logged = _items(api.get("/api/v1/queries", params={"q": "from api_t where"}, headers=AUTH))
    assert len(logged) == 30
    assert api.get("/api/v1/queries/stats?limit=0", headers=AUTH).status_code == 422


# ---------------------------------------------------------------------- metrics history


def test_metrics_history_buckets(api):
    params = {
        "start": (NOW - timedelta(minutes=10)).isoformat(),
        "end": NOW.isoformat(),  # the live sampler's own rows come later
        "granularity": "minute",
    }
    body = api.get("/api/v1/metrics/history", params=params, headers=AUTH).json()
    assert body["granularity"] == "minute"
    assert [round(b["cpu_percent"]) for b in body["system"]] == [30, 20, 10]
    assert sum(b["queries"] for b in body["queries"]) == 4
    assert sum(b["errors"] for b in body["queries"]) == 1

    params["start"] = (NOW - timedelta(hours=5)).isoformat()
    hourly = api.get(
        "/api/v1/metrics/history", params={**params, "granularity": "hour"}, headers=AUTH
    ).json()
    assert sum(b["queries"] for b in hourly["queries"]) == 5
    assert len(hourly["queries"]) in (2, 3)


def test_metrics_history_rejects_bad_granularity_and_ranges(api):
    for bad in ("second", "minute'); drop table metadata.system_metrics; --", "MINUTE", ""):
        r = api.get("/api/v1/metrics/history", params={"granularity": bad}, headers=AUTH)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"][-1] == "granularity"
    backwards = {"start": NOW.isoformat(), "end": (NOW - timedelta(hours=1)).isoformat()}
    r = api.get("/api/v1/metrics/history", params=backwards, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "start"
    assert "before" in r.json()["detail"][0]["msg"]
    huge = {"start": (NOW - timedelta(days=400)).isoformat(), "granularity": "minute"}
    r = api.get("/api/v1/metrics/history", params=huge, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "granularity"
    assert "buckets" in r.json()["detail"][0]["msg"]
    daily = api.get("/api/v1/metrics/history", params={**huge, "granularity": "day"}, headers=AUTH)
    assert daily.status_code == 200


# ---------------------------------------------------------------------- models


def test_models_list_and_detail(api):
    models = _items(api.get("/api/v1/ml/models", headers=AUTH))
    assert len(models) == 1
    assert models[0]["model_name"] == "cost" and models[0]["version"] == 2
    assert models[0]["metrics"] == {"qerror_p50": 3.0}
    detail = api.get("/api/v1/ml/models/cost", headers=AUTH).json()
    assert [v["version"] for v in detail["versions"]] == [2, 1]
    assert detail["active"]["version"] == 2
    missing = api.get("/api/v1/ml/models/' or '1'='1", headers=AUTH)
    assert missing.status_code == 404 and "no model named" in missing.json()["detail"]


# ---------------------------------------------------------------------- admin


def test_admin_status(api, service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        body = api.get("/api/v1/admin/status", headers=AUTH).json()
        assert body["clients"] == 1
    assert body["paused"] is False
    assert body["ready"] == {"upstream": True, "migrations": True}
    # transports belong to the service's event loop: pause and resume from that thread only
    service.call(_on_loop(service.service.pause))
    try:
        assert api.get("/api/v1/admin/status", headers=AUTH).json()["paused"] is True
    finally:
        service.call(_on_loop(service.service.resume))


def test_admin_config_get_and_put(api, service):
    items = {i["key"]: i for i in _items(api.get("/api/v1/admin/config", headers=AUTH))}
    assert items["top_k_fingerprints"]["reloadable"] is True
    assert items["listen"]["reloadable"] is False

    r = api.put(
        "/api/v1/admin/config", json={"key": "top_k_fingerprints", "value": 7}, headers=AUTH
    )
    assert r.status_code == 200 and r.json()["value"] == "7"
    assert service.service.settings.top_k_fingerprints == 7
    items = {i["key"]: i for i in _items(api.get("/api/v1/admin/config", headers=AUTH))}
    assert items["top_k_fingerprints"]["value"] == "7"

    refused = [
        ({"key": "listen", "value": "0.0.0.0:1"}, "key", "restart"),
        ({"key": "no_such_key", "value": "1"}, "key", "unknown setting"),
        ({"key": "top_k_fingerprints", "value": "many"}, "value", "top_k_fingerprints"),
    ]
    for body, field, message in refused:
        r = api.put("/api/v1/admin/config", json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field
        assert message in r.json()["detail"][0]["msg"]
    assert service.service.settings.top_k_fingerprints == 7
    r = api.put("/api/v1/admin/config", json={"value": 1}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "key"
    r = api.put("/api/v1/admin/config", json={"key": "top_k_fingerprints", "value": 3})
    assert r.status_code == 401
    assert service.service.settings.top_k_fingerprints == 7


# ---------------------------------------------------------------------- not configured


def test_parts_not_configured_answer_404_with_a_message(api):
    r = api.get("/api/v1/optimization/ab", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["detail"].startswith("not configured: plan steering is off")
    r = api.get("/api/v1/admin/cache", headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"].startswith("not configured:")
    r = api.get("/api/v1/nothing/here", headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"] == "no such endpoint: /api/v1/nothing/here"
    assert api.get("/api/v1/optimization/recommendations").status_code == 401
