"""Anomaly alerts end to end: a running pgsage with the detector on, a trained model, a local
webhook receiver; one execution of a warm template blocked by a lock becomes an incident row, a
webhook POST (retried after a failure) and a Prometheus count within 10 seconds of completing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from models.anomaly import list_anomalies, train_anomaly
from models.registry import Registry
from models.train import TrainConfig
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn


class Receiver:
    """A webhook endpoint on a thread: answers the first POST with 500, then 200."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver.attempts == 1:
                    self.send_response(500)  # the sender must retry
                else:
                    receiver.posts.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/pgsage"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_slow_execution_raises_incident_webhook_and_metrics(
    make_service: Any, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(tmp_path / "models"))
    svc = make_service(
        anomaly_webhook_url=receiver.url, anomaly_refresh_interval=0.3, cost_serving=False
    )

    async def warm_traffic() -> None:
        conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            await conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            await conn.execute(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g"
            )
            for i in range(240):
                await conn.fetchval("SELECT v FROM t WHERE id = $1", i % 2000 + 1)
                if i % 2 == 0:
                    await conn.fetchval("SELECT count(*) FROM t WHERE id < $1", i % 20 + 10)
        finally:
            await conn.close()

    async def train() -> str:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            result = await train_anomaly(conn, None, Registry(conn, tmp_path / "models"),
                                         TrainConfig(min_rows=100))  # fmt: skip
            return str(result.status)
        finally:
            await conn.close()

    asyncio.run(warm_traffic())
    svc.flush()
    assert asyncio.run(train()) == "active"
    time.sleep(1.5)  # the worker checks the registry every 0.3 s

    # ---- one execution of a warm template waits ~0.7 s for a lock held by another session
    with psycopg.connect(direct_dsn(svc.database)) as holder:
        holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(0.7, holder.commit)
        release.start()
        with psycopg.connect(svc.dsn(), autocommit=True) as conn:
            conn.execute("SELECT v FROM t WHERE id = %s", (7,))
        release.join()
    done = time.monotonic()

    incident = None
    posted: list[dict[str, Any]] = []
    metrics = ""
    while time.monotonic() - done < 10.0:
        with psycopg.connect(direct_dsn(svc.database)) as conn:
            row = conn.execute(
                "SELECT a.incident_id, a.kind, a.severity, a.executions, a.model_version,"
                " a.description FROM metadata.anomalies a WHERE a.kind = 'latency' AND"
                " EXISTS (SELECT 1 FROM metadata.query_logs q WHERE q.fingerprint ="
                " ANY (a.fingerprints) AND q.duration_ms > 500"
                " AND q.started_at BETWEEN a.window_start AND a.window_end)"
            ).fetchone()
        if row is not None:
            incident = row
            posted = [p for p in receiver.posts if p.get("incident_id") == row[0]]
            metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
            if posted and _metric(metrics, 'pgsage_anomalies_total{kind="latency"') >= 1:
                break
        time.sleep(0.2)
    elapsed = time.monotonic() - done
    print(f"detected and alerted {elapsed:.2f}s after completion")
    assert incident is not None, "no latency incident for the blocked execution"
    incident_id, kind, severity, executions, version, description = incident
    assert kind == "latency" and severity in ("low", "medium", "high") and executions >= 1
    assert version == "anomaly:v1", "the incident was not scored by the trained model"
    assert "slower than expected" in description
    assert posted, f"no webhook POST for incident {incident_id} ({receiver.attempts} attempts)"
    assert receiver.attempts >= 2  # the first POST got a 500 and was retried
    hook = posted[0]
    assert hook["event"] == "incident_opened" and hook["kind"] == "latency"
    # the webhook tells the severity the incident opened with; later flags may raise it
    order = ("low", "medium", "high")
    assert order.index(hook["severity"]) <= order.index(severity) and hook["fingerprints"]
    assert _metric(metrics, 'pgsage_anomalies_total{kind="latency"') >= 1
    assert _metric(metrics, "pgsage_anomaly_incidents_open ") >= 1
    assert elapsed < 10.0, f"detected {elapsed:.1f}s after the execution completed"

    # ---- the admin side: the console lists and acknowledges, the API lists
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        cur = admin.execute("SHOW ANOMALIES LIMIT 10")
        names = [d.name for d in cur.description or []]
        listed = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        assert str(incident_id) in [r["incident"] for r in listed]
        admin.execute(f"ACK ANOMALY {incident_id}")
        with pytest.raises(psycopg.Error, match="no anomaly incident"):
            admin.execute(f"ACK ANOMALY {10**9}")

    async def via_functions() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            return await list_anomalies(conn, 10)
        finally:
            await conn.close()

    assert any(r["incident_id"] == incident_id and r["acknowledged"]
               for r in asyncio.run(via_functions()))  # fmt: skip
    with psycopg.connect(direct_dsn(svc.database)) as conn:
        flag = conn.execute(
            "SELECT acknowledged FROM metadata.anomalies WHERE incident_id = %s", (incident_id,)
        ).fetchone()
    assert flag == (True,)
