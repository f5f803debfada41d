"""The index advisor inside `pgsage serve`: real traffic through the proxy is logged, the API
asks for advice, the admin console lists, applies (building and validating the index for real)
and rejects recommendations, and the API shows the history."""

from __future__ import annotations

import json
import random
import urllib.request
from typing import Any

import psycopg

from tests.fix_proxy import direct_dsn

TOKEN = "advisor-token"
SETUP = """
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id bigint PRIMARY KEY, customer_id int NOT NULL,
                          amount numeric NOT NULL, note text);
INSERT INTO shop.orders SELECT i, (i * 7919) % 5000 + 1, (i % 1000) / 10.0, md5(i::text)
FROM generate_series(1, 120000) i;
ANALYZE shop.orders;
"""


def _api(svc: Any, method: str, path: str) -> Any:
    req = urllib.request.Request(
        f"{svc.http_url}/api/v1{path}", method=method,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _logged_lookups(svc: Any, seed: int) -> None:
    """The orders table, and 60 lookups by customer through the proxy (logged, flushed)."""
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
    rng = random.Random(seed)
    with psycopg.connect(svc.dsn(), autocommit=True) as c:
        for _ in range(60):
            c.execute(
                f"SELECT id, amount FROM shop.orders WHERE customer_id = {rng.randint(1, 5000)}"
            ).fetchall()
    svc.flush()


def _customer_indexes(svc: Any) -> list[tuple[str]]:
    """Definitions of the indexes on shop.orders over customer_id."""
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        return c.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'shop' AND tablename = 'orders'"
            " AND indexdef LIKE '%customer_id%'"
        ).fetchall()


def test_advice_apply_and_reject_through_the_service(make_service: Any) -> None:
    svc = make_service(admin_token=TOKEN, log_parameters=True)
    _logged_lookups(svc, seed=5)

    advice = _api(svc, "POST", "/ml/recommend")["recommendations"]
    assert advice, "the advisor found nothing to recommend"
    top = advice[0]
    assert top["table"] == "shop.orders" and top["columns"][0] == "customer_id"

    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        cur = admin.execute("SHOW RECOMMENDATIONS")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        assert rows[0]["table"] == "shop.orders" and rows[0]["status"] == "proposed"
        rec_id = rows[0]["id"]
        applied = admin.execute(f"APPLY RECOMMENDATION {rec_id}").fetchall()
        status = applied[0][names.index("status")]
        assert status == "validated", applied
        assert float(applied[0][names.index("measured_speedup")]) > 2
        bad = admin.execute("SHOW RECOMMENDATIONS").fetchall()
        others = [r for r in bad if r[names.index("status")] == "proposed"]
        if others:
            rejected = admin.execute(f"REJECT RECOMMENDATION {others[0][0]}").fetchall()
            assert rejected[0][names.index("status")] == "rejected"
        missing = None
        try:
            admin.execute("APPLY RECOMMENDATION 999999")
        except psycopg.Error as exc:
            missing = str(exc)
        assert missing is not None and "999999" in missing

    assert len(_customer_indexes(svc)) == 1

    history = _api(svc, "GET", "/optimization/history?kind=index")["history"]
    actions = {(h["action"], h["status"]) for h in history}
    assert ("recommend", "validated") in actions or ("validate", "validated") in actions
    listed = _api(svc, "GET", "/optimization/recommendations")["recommendations"]
    assert any(str(r["id"]) == rec_id and r["status"] == "validated" for r in listed)


def test_automatic_pass_applies_validated_advice_while_traffic_flows(make_service: Any) -> None:
    """advisor_auto's pass (advise, then apply and re-check) runs off the proxy's event loop:
    the index is built and validated while a client's statements keep being answered."""
    import threading
    import time

    svc = make_service(log_parameters=True)
    _logged_lookups(svc, seed=7)

    answered: list[float] = []
    stop = threading.Event()

    def ping() -> None:
        with psycopg.connect(svc.dsn(), autocommit=True) as c:
            while not stop.is_set():
                assert c.execute("SELECT 1").fetchone() == (1,)
                answered.append(time.monotonic())

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        started = time.monotonic()
        result = svc.call(svc.service.optimiser.auto_pass())
        ended = time.monotonic()
    finally:
        stop.set()
        pinger.join(30)
    assert result["applied"], result
    assert svc.service.optimiser.last_auto == result
    assert any(started < t < ended for t in answered)  # the relay answered during the pass
    assert len(_customer_indexes(svc)) == 1
