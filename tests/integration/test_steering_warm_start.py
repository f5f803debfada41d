"""Bao's warm start in `pgsage serve`: once a cost model is active in the registry, a template
that becomes eligible for steering has each of its distinct arm plans priced by the model, and
the arms' posteriors start from those predictions (SHOW STEERING shows them, the event is
counted). Before any model is active the arms start from the stock plan's mean, as before."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pandas as pd
import psycopg
import pytest

from bench.costload import create_tables, run_traffic
from models.dataset import StaticFeatures
from models.registry import Registry
from models.serve import serving_features
from models.train import TrainConfig, load_active_cost_model, train_cost
from optimizer.features import plan_features
from optimizer.fingerprint import compute_fingerprint
from proxy.steering import error_sd, explain_arms
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn
from tests.integration.test_steering import JOIN_TABLES

JOIN = "SELECT one.v, two.id FROM one JOIN two ON two.one_id = one.id WHERE one.id < {}"


def _wait(cond: Any, what: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


def test_an_active_cost_model_warm_starts_the_arms(
    make_service: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(models))
    svc = make_service(steering_enabled=True, steering_min_ms=0.1, steering_seed=3,
                       cost_refresh_interval=0.3, log_parameters=True)  # fmt: skip
    ctl = svc.service.proxy.steering
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(JOIN_TABLES)

    def run(sql: str, n: int) -> None:
        with psycopg.connect(svc.dsn(svc.database), autocommit=True) as c:
            for _ in range(n):
                c.execute(sql, prepare=False)

    def state(prefix: str) -> Any:
        (st,) = [st for k, st in ctl.states.items() if k.startswith(prefix)]
        return st

    # no model yet: the join's arms are compared (same plans retired) but start cold
    run(JOIN.format(500), 4)
    first = "SELECT one.v, two.id FROM one"
    _wait(lambda: state(first).plans_checked and not ctl.plans.qsize(), ctl.rows)
    time.sleep(0.5)  # the comparison task finishes the template it took off the queue
    assert ctl.warm_started == 0 and not state(first).prior

    # a cost model trained on the proxy's own log becomes active
    async def traffic_and_train() -> str:
        conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            await create_tables(conn, 0.1)
            await run_traffic(conn, 600, seed=1, scale=0.1)
        finally:
            await conn.close()
        svc.flush()
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            result = await train_cost(conn, None, Registry(conn, models), TrainConfig(n_iter=2))
            return result.status
        finally:
            await conn.close()

    assert asyncio.run(traffic_and_train()) == "active"

    # a new template (another literal class: a different text) is warm-started
    sql = "SELECT one.v, two.id FROM two JOIN one ON one.id = two.one_id WHERE two.id < 900"
    run(sql, 4)
    _wait(
        lambda: state("SELECT one.v, two.id FROM two").predicted,
        lambda: (ctl.warm_started, ctl.plans.qsize(), ctl._model_version, ctl.rows()),
    )
    st = state("SELECT one.v, two.id FROM two")
    live = [a for a in st.arms if a != "stock" and a not in st.retired]
    assert live and set(st.predicted) == set(live)
    # only the arms predicted faster are brought forward
    assert st.prior == {a: r for a, r in st.predicted.items() if r < 0}

    # the offsets are the active model's predicted log-ratios of each arm's plan to stock's
    async def expected() -> tuple[dict[str, float], float]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            loaded = await load_active_cost_model(Registry(conn, models))
            assert loaded is not None
            model, entry = loaded
            plans = await explain_arms(conn, sql)
            fp = compute_fingerprint(sql)
            static = await StaticFeatures(None, conn).features(fp.id, sql, fp.normalized)
        finally:
            await conn.close()
        arms = ["stock", *live]
        now = datetime.now(UTC)
        rows = [serving_features({**static, **plan_features(plans[a])}, None, now) for a in arms]
        frame = pd.DataFrame(rows).reindex(columns=list(model.feature_names_)).astype(float)
        ms = dict(zip(arms, model.predict(frame), strict=True))
        clip = math.log(4.0)
        ratios = {a: max(-clip, min(clip, math.log(ms[a] / ms["stock"]))) for a in live}
        return ratios, error_sd(entry.metrics)

    want, sd = asyncio.run(expected())
    # the calendar features are of the moment of prediction: equal but for an hour boundary
    assert st.predicted == pytest.approx(want, abs=0.2)
    assert st.prior_sd == pytest.approx(sd) and 0.05 < sd < 2

    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        rows = admin.execute("SHOW STEERING").fetchall()
    (row,) = [r for r in rows if r[0] == st.fingerprint]
    assert "(model x" in row[2], row
    metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    (count,) = [ln for ln in metrics.splitlines()
                if ln.startswith('pgsage_steering_events_total{event="warm_start"}')]  # fmt: skip
    assert float(count.split()[-1]) >= 1
