"""The shipped Prometheus rules and Grafana board against a real pgsage and a real Prometheus.

promtool checks the config and rules and runs the rule unit tests. One pgsage runs with every
part the board shows (result cache, admission, plan steering, the served cost model, the
anomaly detector); the setup trains the cost model, clusters and forecaster, has the index
advisor recommend and validate an index and provokes an anomaly, all through pgsage's own code.
Every metric the rules and board use must exist in its scrape; a real Prometheus (Debian's
/usr/bin/prometheus) scrapes it, evaluates the rules and every board query, which must return
data; every SQL panel must return rows from the metadata schema; the board's JSON is checked
for the structure Grafana needs and must be exactly what config/grafana/board.py generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models.clusters import train_clusters
from models.forecast import train_forecast
from models.registry import Registry
from models.train import TrainConfig, train_cost
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn
from tests.fix_service import RunningService

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "config" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "pgsage.rules.yml"
RULES_TEST = PROM_DIR / "rules" / "pgsage.rules.test.yml"
DASHBOARD = REPO / "config" / "grafana" / "dashboards" / "pgsage.json"
BOARD_PY = REPO / "config" / "grafana" / "board.py"
PG_TYPE = "grafana-postgresql-datasource"
PG_SOURCE = {"type": PG_TYPE, "uid": "${metadata}"}
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"

#: metrics the board and rules use that pgsage does not export yet (see metrics.md). The test
#: fails once one of them appears, so that it is taken off this list.
NOT_YET_EXPORTED: set[str] = set()
#: series Prometheus makes itself
SYNTHETIC = {"up", "ALERTS"}
#: counters of failures a healthy run does not have (no series until the first one): a board
#: query selecting only these is owed no data; every other board query must return data
QUIET = {"pgsage_querylog_dropped_total", "pgsage_client_connection_errors_total"}

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# an identifier that is not a function call, not part of a number, duration or $variable
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_LABEL_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---------------------------------------------------------------- PromQL and file helpers


def metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names a PromQL expression selects."""
    bare = _STRING.sub('""', expr)
    bare = _MATCHERS.sub("", bare)
    bare = _RANGE.sub("", bare)
    bare = _GROUPING.sub("", bare)
    return {m for m in _IDENT.findall(bare) if m.lower() not in _KEYWORDS}


def selector_labels(expr: str, name: str) -> list[set[str]]:
    """For each place `name` is selected in `expr`, the label names of its matchers."""
    found = []
    pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])\s*(\{{[^}}]*\}})?"
    for m in re.finditer(pattern, expr):
        found.append(set(_LABEL_MATCHER.findall(m.group(1) or "")))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in _GROUPING.findall(expr):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    return labels


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation query of the board."""
    exprs = []
    for panel in all_panels(board):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for ann in board["annotations"]["list"]:
        if ann.get("expr"):
            exprs.append((f"annotation {ann['name']!r}", ann["expr"]))
    return exprs


def variable_metrics(board: dict[str, Any]) -> set[str]:
    """Metrics the template variables query (label_values(metric, label))."""
    names = set()
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            names.update(re.findall(r"label_values\(\s*([\w:]+)\s*,", query))
    return names


class Scrape:
    """A /metrics exposition: declared families, their types, and the series present."""

    def __init__(self, text: str) -> None:
        self.types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
        self.labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)

    def _histogram_base(self, name: str) -> str | None:
        for suffix in _HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return base
        return None

    def declares(self, name: str) -> bool:
        return name in self.types or name in self.labels or self._histogram_base(name) is not None

    def has_series(self, name: str) -> bool:
        return name in self.labels

    def label_names(self, name: str) -> set[str]:
        return self.labels.get(name, set())


def _run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"
    return output


SETUP = """
create table stack_t (id int primary key, v text);
insert into stack_t select g, 'v' || g from generate_series(1, 200) g;
create table lookup_t (id int primary key, code text not null, note text);
insert into lookup_t select g, md5(g::text), repeat('x', 40) from generate_series(1, 40000) g;
create table lock_t (id int primary key, v text);
insert into lock_t select g, md5(g::text) from generate_series(1, 500) g;
create schema if not exists gold;
create table gold.stack_daily (day int primary key, total numeric not null);
insert into gold.stack_daily select g, g * 10 from generate_series(1, 5) g;
analyze stack_t; analyze lookup_t; analyze lock_t; analyze gold.stack_daily;
"""
#: the statement the admission controller learns is long (admission_short_ms below)
LONG = "select pg_sleep(0.03) from stack_t where id = 1"
#: a read-only join the steering controller explores arms on (steering_min_ms below)
JOIN = "select count(*) from stack_t a join stack_t b on a.id = b.id where a.id < %s"


def _send_traffic(dsn: str, transaction: bool = True) -> None:
    """One round of _round on a new connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _round(conn, transaction)


def _round(conn: psycopg.Connection[Any], transaction: bool = True) -> None:
    """One round of the statement kinds the board shows: extended and simple protocol, a
    transaction, COPY, a division by zero (SQLSTATE class 22), repeated gold reads (result
    cache hits; an update through pgsage invalidates), a long statement (admission long lane),
    a steerable join, lookups on an unindexed column (the index advisor's work) and a warm
    template on lock_t (the anomaly the setup provokes). `transaction=False` leaves out the
    explicit transaction (see _prepare)."""
    for i in range(20):
        conn.execute("select v from stack_t where id = %s", (i + 1,))
    if transaction:
        with conn.transaction():
            conn.execute("update stack_t set v = v where id = 1")
    with conn.cursor() as cur, cur.copy("copy stack_t to stdout") as copy:
        for _ in copy:
            pass
    with contextlib.suppress(psycopg.errors.DivisionByZero):
        conn.execute("select 1 / 0")
    for day in (1, 2, 3) * 3:  # stored at the second miss (cache_admit_after), then hits
        # (unprepared: psycopg would switch to a named statement, another cache key, midway)
        conn.execute(
            "select day, total from gold.stack_daily where day = %s", (day,), prepare=False
        )
    conn.execute("update gold.stack_daily set total = total where day = 3")
    conn.execute(LONG)
    conn.execute(JOIN, (150,))
    for i in (7, 1234):
        # literals in the text: the advisor replays logged statements to validate an index
        code = hashlib.md5(str(i).encode()).hexdigest()
        conn.execute(f"select id, note from lookup_t where code = '{code}'")
    for i in range(3):
        conn.execute("select v from lock_t where id = %s", (i + 1,))


@contextlib.contextmanager
def _traffic_in_background(dsn: str) -> Iterator[list[BaseException]]:
    """Rounds of _send_traffic until the block ends; yields the errors seen so far."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            # one long session: the proxy samples its overhead every 64th chunk of a session
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not stop.is_set():
                    _round(conn)
                    stop.wait(0.05)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(10)
    assert not errors, f"traffic through the proxy failed: {errors[0]!r}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(url: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(url, data=body, timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus reports bad queries as 4xx with JSON
        return json.load(exc)


@contextlib.contextmanager
def _prometheus(config: Path, workdir: Path) -> Iterator[str]:
    """A real Prometheus on a free port; always stopped on the way out."""
    port = _free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(url + "/-/ready", timeout=1) as resp,
                ):
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, "prometheus not ready within 15 s"
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _query(prom: str, expr: str) -> dict[str, Any]:
    return _http_json(prom + "/api/v1/query", {"query": expr})


# ---------------------------------------------------------------- the service under test

#: pgsage with every part the board shows: result cache, admission, plan steering, the cost
#: model served (log_parameters lets the trainer EXPLAIN the logged statements), anomalies
SERVICE: dict[str, Any] = {
    "log_parameters": True,
    "cost_refresh_interval": 0.3,
    "cache_enabled": True,
    "cache_min_ms": 0,
    "admission_enabled": True,
    "admission_short_ms": 20,  # LONG (30 ms) takes the long lane, everything else the short
    "steering_enabled": True,
    "steering_min_ms": 0.2,  # JOIN takes a few ms: steerable
    "steering_eval_interval": 1,
}
HISTORY_DAYS = 3
#: simulated history: (application, [(template, table)], busy hours, ms, per busy 5 minutes)
HISTORY = [
    ("pgsage-app", [("select v from stack_t where id = $1", "stack_t"),
                    ("select day, total from gold.stack_daily where day = $1", "gold.stack_daily")],
     range(8, 18), 1.0, 4.0),
    ("pgsage-etl", [("update stack_t set v = v where id = $1", "stack_t")], range(1, 5), 3.0, 3.0),
    ("pgsage-analyst", [(JOIN.replace("%s", "$1"), "stack_t")], range(13, 17), 40.0, 1.0),
]  # fmt: skip
HISTORY_COLUMNS = [
    "started_at", "finished_at", "duration_ms", "fingerprint", "normalized_text", "command",
    "protocol", "status", "application_name", "app_class", "rows_returned", "database_name",
    "tables_used",
]  # fmt: skip


def _history(database: str) -> list[tuple[Any, ...]]:
    """HISTORY_DAYS of logged statements up to ten minutes ago, Poisson per 5-minute window."""
    rng = np.random.default_rng(0)
    windows = HISTORY_DAYS * 288
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    start = end - timedelta(minutes=5 * windows)
    hours = np.array([(start + timedelta(minutes=5 * w)).hour for w in range(windows)])
    rows = []
    for app, texts, busy, ms, rate in HISTORY:
        mu = np.where(np.isin(hours, list(busy)), rate, rate * 0.05)
        for i, (text, table) in enumerate(texts):
            fingerprint = f"{app[7:10]}{i:013x}"
            counts = rng.poisson(mu)
            for w in np.flatnonzero(counts):
                for _ in range(int(counts[w])):
                    at = start + timedelta(seconds=float(w) * 300 + float(rng.uniform(0, 300)))
                    d = float(ms * rng.lognormal(0, 0.3))
                    rows.append((at, at + timedelta(milliseconds=d), d, fingerprint, text,
                                 text.split()[0].upper(), "extended", "ok", app, "other", 1,
                                 database, [table]))  # fmt: skip
    return rows


async def _train(database: str, models: Path, since: datetime) -> dict[str, Any]:
    """The cost model on the live traffic, clusters and the forecaster on the history."""
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        registry = Registry(conn, models)
        out = {
            "clusters": await train_clusters(conn, None, registry, TrainConfig()),
            "forecast": await train_forecast(conn, None, registry, TrainConfig()),
            "cost": await train_cost(
                conn, None, registry, TrainConfig(since=since, n_iter=2, min_rows=100)
            ),
        }
        forecast = out["forecast"]
        if forecast.status == "candidate":
            # the gate compares with seasonal naive over half a day of a 3-day history that
            # ends now, so it depends on the time of day; the panel needs an active forecaster,
            # so activate the trained version as an operator would (POST .../activate)
            await registry.activate(forecast.name, forecast.version, "activated by the test")
            forecast.status = "active"
        return out
    finally:
        await conn.close()


def _scrape(svc: RunningService) -> Scrape:
    with urllib.request.urlopen(svc.http_url + "/metrics", timeout=5) as resp:
        return Scrape(resp.read().decode())


def _predictions(svc: RunningService) -> float:
    """Executions the served cost model has predicted (the log ratio histogram's +Inf)."""
    with urllib.request.urlopen(svc.http_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = 'pgsage_cost_prediction_log_ratio_bucket{le="+Inf"}'
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def _provoke_anomaly(svc: RunningService) -> tuple[Any, ...]:
    """One execution of lock_t's warm template waits 0.6 s for a lock: the detector (cold
    rules, no anomaly model) opens a latency incident in metadata.anomalies."""
    with (
        psycopg.connect(svc.dsn(), autocommit=True) as conn,
        psycopg.connect(direct_dsn(svc.database)) as holder,
    ):
        holder.execute("lock table lock_t in access exclusive mode")
        release = threading.Timer(0.6, holder.commit)
        release.start()
        conn.execute("select v from lock_t where id = %s", (2,))
        release.join()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        svc.flush()
        with psycopg.connect(direct_dsn(svc.database)) as conn:
            row = conn.execute(
                "select a.incident_id, a.kind, a.severity from metadata.anomalies a"
                " where a.kind = 'latency' and exists (select 1 from metadata.query_logs q"
                " where q.fingerprint = any (a.fingerprints) and q.duration_ms > 400"
                " and q.normalized_text like '%lock_t%')"
            ).fetchone()
        if row is not None:
            return tuple(row)
        time.sleep(0.3)
    with psycopg.connect(direct_dsn(svc.database)) as conn:
        seen = conn.execute(
            "select kind, fingerprints, description from metadata.anomalies"
        ).fetchall()
        slow = conn.execute(
            "select fingerprint, duration_ms, predicted_cost_ms from metadata.query_logs"
            " where normalized_text like '%lock_t%' and duration_ms > 100"
        ).fetchall()
    raise AssertionError(f"no latency incident for the blocked execution {slow}: {seen}")


def _prepare(svc: RunningService, models: Path) -> dict[str, Any]:
    """Data for every panel, through the real code paths; returns what each step produced."""
    out: dict[str, Any] = {}
    clock = time.monotonic()

    def took(step: str) -> None:
        nonlocal clock
        out.setdefault("seconds", {})[step] = round(time.monotonic() - clock, 2)
        clock = time.monotonic()

    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as conn:
        conn.execute(SETUP)
        # the past cannot go through the proxy: yesterday's statements are written straight
        # into the query log, as the recorder would have (the forecaster learns from them, and
        # "Queries today vs yesterday" compares with them)
        with (
            conn.cursor() as cur,
            cur.copy(f"copy metadata.query_logs ({', '.join(HISTORY_COLUMNS)}) from stdin") as copy,
        ):
            for row in _history(svc.database):
                copy.write_row(row)
    since = datetime.now(UTC)
    # explicit transactions included: the advisor's workload must cope with logged BEGIN/COMMIT
    for _ in range(8):
        _send_traffic(svc.dsn())
    svc.flush()
    took("tables, history and warm-up traffic")
    out["trained"] = asyncio.run(_train(svc.database, models, since))
    for name, result in out["trained"].items():
        assert result.status == "active", (name, result.reason)
    took("training")
    out["forecasts"] = svc.call(svc.service.optimiser.refresh_forecast())
    assert out["forecasts"] > 0

    # the index advisor on the logged lookups, and one recommendation applied and validated
    recs = svc.call(svc.service.optimiser.advise())
    top = next(r for r in recs if r["table"].endswith("lookup_t") and "code" in r["columns"])
    out["applied"] = svc.call(svc.service.optimiser.apply(top["id"]))
    assert out["applied"]["status"] == "validated", (
        out["applied"]["reason"],
        out["applied"]["detail"],
    )
    took("forecast and advisor")

    # the worker serves the new cost model: wait for predictions on live traffic
    deadline = time.monotonic() + 20
    while _predictions(svc) < 20:
        assert time.monotonic() < deadline, "the served cost model predicted nothing"
        _send_traffic(svc.dsn())
        svc.flush()
    took("cost model served")
    out["incident"] = _provoke_anomaly(svc)
    took("anomaly")
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    models = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGSAGE_MODEL_DIR", str(models))
        svc = RunningService(**SERVICE)
        try:
            started = time.monotonic()
            svc.prepared = _prepare(svc, models)  # type: ignore[attr-defined]
            print(f"prepared in {time.monotonic() - started:.1f}s: {svc.prepared['seconds']}")
            yield svc
        finally:
            svc.stop()


# ---------------------------------------------------------------- (1) promtool


def test_promtool_accepts_config_rules_and_rule_unit_tests():
    out = _run(PROMTOOL, "check", "config", str(PROM_CONFIG))
    assert "SUCCESS: 1 rule files found" in out
    out = _run(PROMTOOL, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(load_rules())} rules found" in out
    out = _run(PROMTOOL, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in out


def test_rule_unit_tests_cover_every_alert_and_a_recording_rule():
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested_alerts = {t["alertname"] for g in tests for t in g.get("alert_rule_test", [])}
    firing = {
        t["alertname"] for g in tests for t in g.get("alert_rule_test", []) if t["exp_alerts"]
    }
    tested_exprs = {t["expr"] for g in tests for t in g.get("promql_expr_test", [])}
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert alerts == tested_alerts == firing, "every alert needs a test in which it fires"
    assert "pgsage:query_duration_seconds:p95_5m" in tested_exprs


# ---------------------------------------------------------------- (2) names in a real scrape


def test_every_metric_the_rules_and_board_use_is_exported(stack):
    _send_traffic(stack.dsn())
    stack.flush()
    scrape = _scrape(stack)
    assert scrape.has_series("pgsage_queries_total"), "the traffic did not reach the metrics"

    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    board = load_dashboard()
    used: dict[str, set[str]] = {}  # name -> where
    for rule in rules:
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule.get('record') or rule.get('alert')}")
    for where, expr in dashboard_exprs(board):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    for name in variable_metrics(board):
        used.setdefault(name, set()).add("template variable")

    assert {"pgsage_queries_total", "pgsage_query_duration_seconds_bucket"} <= set(used)
    undefined = {n: w for n, w in used.items() if ":" in n and n not in recorded}
    assert not undefined, f"recording rules used but not defined: {undefined}"
    missing = {
        n: sorted(w)
        for n, w in used.items()
        if ":" not in n and n not in SYNTHETIC | NOT_YET_EXPORTED and not scrape.declares(n)
    }
    assert not missing, f"not in pgsage's /metrics: {missing}"
    now_exported = {n for n in NOT_YET_EXPORTED if scrape.declares(n)}
    assert not now_exported, f"exported now, take them off NOT_YET_EXPORTED: {now_exported}"
    assert set(used) >= NOT_YET_EXPORTED, "the allow-list names only metrics something uses"


def _totals(svc: RunningService) -> dict[str, float]:
    """Sum of every sample of /metrics by sample name and selected label values."""
    with urllib.request.urlopen(svc.http_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key in (sample.name, *(f"{sample.name}:{v}" for v in sample.labels.values())):
                out[key] = out.get(key, 0.0) + sample.value
    return out


def test_the_learned_parts_on_the_board_are_at_work(stack):
    """What the new panels show is real: the setup's traffic and models moved these."""
    _send_traffic(stack.dsn())
    stack.flush()
    m = _totals(stack)
    assert m["pgsage_cache_hits_total"] > 0 and m["pgsage_cache_misses_total"] > 0
    assert m["pgsage_cache_evictions_total:invalidated"] > 0  # the gold update through pgsage
    assert m["pgsage_admission_decisions_total:long"] > 0  # LONG
    assert m["pgsage_admission_decisions_total:short"] > 0
    assert m["pgsage_admission_limit"] >= 1
    assert m["pgsage_steering_decisions_total"] > 0 and m["pgsage_steering_templates"] > 0
    # the bandit's events on JOIN: arms no better than stock retired, or (on a quiet machine,
    # where every arm of this join runs alike) a leader converged on before any was retired:
    # which comes first is chance, that the panel's series moves is not
    events = {k.split(":", 1)[1]: v for k, v in m.items()
              if k.startswith("pgsage_steering_events_total:")}  # fmt: skip
    assert m["pgsage_steering_events_total"] > 0 and events, events
    assert set(events) <= {"retired", "converged", "validate", "revert", "same_plan"}, events
    assert m["pgsage_anomalies_total:latency"] > 0 and m["pgsage_anomaly_incidents_open"] > 0
    assert m["pgsage_forecast_queries:total"] > 0
    assert 1.0 <= m["pgsage_cost_prediction_qerror"] < 100
    assert m["pgsage_cost_prediction_log_ratio_bucket:+Inf"] >= 20


def test_board_and_rule_labels_exist_and_database_variable_is_applied(stack):
    _send_traffic(stack.dsn())
    stack.flush()
    scrape = _scrape(stack)
    rules = load_rules()
    # labels a recording rule keeps: those of its outermost `by (...)`
    rule_labels = {r["record"]: grouping_labels(r["expr"]) - {"le"} for r in rules if "record" in r}
    target_labels = {"instance", "job"}
    problems = []
    exprs = [(f"rule {r.get('record') or r.get('alert')}", r["expr"], False) for r in rules]
    exprs += [(where, e, True) for where, e in dashboard_exprs(load_dashboard())]
    for where, expr, on_board in exprs:
        known: set[str] = set(target_labels)
        for name in metric_names(expr):
            labels = rule_labels.get(name) or scrape.label_names(name)
            known |= labels
            if not labels:
                continue  # no series yet: nothing to compare with
            for matcher in selector_labels(expr, name):
                unknown = matcher - labels - target_labels - {"alertname", "alertstate"}
                if unknown:
                    problems.append(f"{where}: {name} has no label {sorted(unknown)}")
                if on_board and "database" in labels and 'database=~"$database"' not in expr:
                    problems.append(f"{where}: {name} is not filtered by $database")
        if known != target_labels:
            for label in grouping_labels(expr) - known:
                problems.append(f"{where}: groups by {label!r}, which no selected metric has")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- (3) a real Prometheus


def _board_query(expr: str, database: str) -> str:
    out = (
        expr.replace("$database", re.escape(database))
        .replace("$__rate_interval", "5s")
        .replace("$__range", "1m")
    )
    assert "$" not in out, f"unknown template variable in {expr!r}"
    return out


def test_real_prometheus_scrapes_pgsage_and_evaluates_rules_and_board(stack, tmp_path):
    started = time.monotonic()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "900ms",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "pgsage",
                        "static_configs": [{"targets": [f"127.0.0.1:{stack.http_port}"]}],
                    }
                ],
            }
        )
    )
    with (
        _traffic_in_background(stack.dsn()) as traffic_errors,
        _prometheus(config, tmp_path) as prom,
    ):
        deadline = time.monotonic() + 30
        p95: float | None = None
        while p95 is None:
            assert not traffic_errors, f"traffic through the proxy failed: {traffic_errors[0]!r}"
            assert time.monotonic() < deadline, "no queries or no p95 in Prometheus after 30 s"
            time.sleep(0.5)
            total = _query(prom, "sum(pgsage_queries_total)")["data"]["result"]
            if not total or float(total[0]["value"][1]) <= 0:
                continue
            rule = _query(
                prom, f'pgsage:query_duration_seconds:p95_5m{{database="{stack.database}"}}'
            )["data"]["result"]
            if rule and math.isfinite(value := float(rule[0]["value"][1])):
                p95 = value
        # statements here take well under a second: the bucket the p95 falls in says so too
        assert 0 < p95 < 1, p95

        targets = _http_json(prom + "/api/v1/targets")["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets

        groups = _http_json(prom + "/api/v1/rules")["data"]["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        assert len(evaluated) == len(load_rules())
        bad = [(r["name"], r["health"], r.get("lastError")) for r in evaluated]
        bad = [b for b in bad if b[1] != "ok"]
        assert not bad, f"rules not evaluating cleanly: {bad}"

        values = _http_json(
            prom
            + "/api/v1/label/database/values?"
            + urllib.parse.urlencode({"match[]": "pgsage_queries_total"})
        )["data"]
        assert stack.database in values, "the $database variable would not list the database"

        failures = []
        quiet = []
        for where, expr in dashboard_exprs(load_dashboard()):
            answer = _query(prom, _board_query(expr, stack.database))
            if answer["status"] != "success":
                failures.append(f"{where}: {answer.get('error')}")
                continue
            names = metric_names(expr)
            if names & (SYNTHETIC | NOT_YET_EXPORTED) or names <= QUIET:
                quiet.append(where)
            elif not answer["data"]["result"]:
                failures.append(f"{where}: no data for {expr}")
        assert not failures, "\n".join(failures)
        # only the alerts annotation and the two failure counters' targets may stay empty
        assert len(quiet) == 3, quiet
    assert time.monotonic() - started < 60


def sql_panels(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, SQL) of every PostgreSQL-datasource target of the board."""
    return [
        (panel["title"], target["rawSql"])
        for panel in all_panels(board)
        for target in panel.get("targets", [])
        if target.get("rawSql")
    ]


def _panel_sql(sql: str) -> str:
    """A panel's SQL as Grafana would send it for the last hour."""
    out = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN now() - interval '1 hour' AND now()", sql)
    assert "$" not in out, f"unknown Grafana macro in {sql!r}"
    return out


def test_every_sql_panel_returns_rows_from_the_metadata_schema(stack):
    panels = sql_panels(load_dashboard())
    assert len(panels) >= 7
    answers: dict[str, list[dict[str, Any]]] = {}
    with psycopg.connect(direct_dsn(stack.database), autocommit=True) as conn:
        conn.execute("set default_transaction_read_only = on")  # the board only reads
        for title, sql in panels:
            cur = conn.execute(_panel_sql(sql))
            names = [d.name for d in cur.description or []]
            answers[title] = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    empty = [t for t, rows in answers.items() if not any(v for r in rows for v in r.values())]
    assert not empty, f"SQL panels without data: {empty}"

    # and the rows are the ones the setup produced through pgsage's own code paths
    assert answers["Queries today vs yesterday"][0]["today"] > 0
    trained = {(r["model"], r["status"]) for r in answers["Training history"]}
    assert {("cost", "active"), ("clusters", "active"), ("forecast", "active")} <= trained
    assert all(r["metric"] is not None for r in answers["Training history"])
    (rec,) = [r for r in answers["Index recommendations"] if r["table"] == "public.lookup_t"]
    assert rec["status"] == "validated" and rec["speedup"] > 1 and "code" in rec["ddl"]
    applied = answers["Applied optimisations and measured gains"]
    assert any(r["action"] == "validate" and r["speedup"] > 1 for r in applied), applied
    incident_id = stack.prepared["incident"][0]
    assert any(r["incident"] == incident_id for r in answers["Anomaly incidents"])
    assert {r["sqlstate"] for r in answers["Failed statements"]} == {"22012"}
    assert any("lookup_t" in r["statement"] for r in answers["Top fingerprints by calls"])


# ---------------------------------------------------------------- (4) the board's structure


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_dashboard_is_a_well_formed_grafana_board():
    board = load_dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    assert "__inputs" not in board, "datasources are template variables, not __inputs"

    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["metadata"]["type"] == "datasource"
    assert variables["metadata"]["query"] == PG_TYPE
    database = variables["database"]
    assert database["type"] == "query"
    assert database["datasource"]["uid"] == "${datasource}"
    assert database["includeAll"] and database["multi"] and database["allValue"] == ".*"

    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p for p in panels if p["type"] == "row"]
    assert len(rows) >= 5, "panels are grouped in rows"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in panels:
        pos = panel["gridPos"]
        assert set(pos) >= {"x", "y", "w", "h"}, panel["title"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} is wider than the grid"
    for row in rows:
        assert row["gridPos"]["w"] == 24 and row["gridPos"]["h"] == 1
    for panel in graphs:
        targets = panel["targets"]
        if panel["datasource"] == PG_SOURCE:
            assert targets and all(t.get("rawSql") and t["rawQuery"] for t in targets), panel
            assert all(t["datasource"] == PG_SOURCE for t in targets), panel["title"]
        else:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
            assert targets and all(t.get("expr") for t in targets), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
    for i, a in enumerate(panels):
        for b in panels[i + 1 :]:
            assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])

    # Grafana puts a panel in the row above it: no panel may sit above the first row
    ordered = sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert ordered[0]["type"] == "row"
    titles = " ".join(p["title"].lower() for p in graphs)
    for needed in (
        "connections",
        "queries per second by command",
        "latency",
        "sqlstate",
        "top fingerprints",
        "rows returned",
        "bytes",
        "query log",
        "upstream",
        "cache hit ratio",
        "backends by state",
        "host cpu",
        "memory",
        "event loop lag",
        "proxy overhead",
        # the pages: overview, query analytics, models, optimisation, system health
        "queries today vs yesterday",
        "result cache hit rate",
        "slow queries",
        "q-error",
        "health score",
        "fast / medium / slow",
        "failed statements",
        "top fingerprints by calls",
        "predicted / actual",
        "q-error over time",
        "forecast vs actual",
        "training history",
        "index recommendations",
        "measured gains",
        "plan steering decisions",
        "plan steering events",
        "admission",
        "result cache hits, misses and evictions",
        "anomalies detected",
        "anomaly incidents",
    ):
        assert needed in titles, f"no panel about {needed}"
    row_titles = [r["title"] for r in rows]
    for row in ("Overview", "Queries", "Models", "Optimisation", "Anomalies"):
        assert row in row_titles
    top = next(p for p in graphs if p["title"].lower().startswith("top fingerprints"))
    assert top["type"] == "table"
    assert all(t.get("instant") and t.get("format") == "table" for t in top["targets"])
    latency = next(p for p in graphs if "p50 / p95 / p99" in p["title"])
    exprs = " ".join(t["expr"] for t in latency["targets"])
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "pgsage_query_duration_seconds_bucket" in exprs


def test_board_json_is_generated_by_board_py(tmp_path):
    """The board is code (config/grafana/board.py, grafana-foundation-sdk); the committed JSON
    is its output, byte for byte, and never edited by hand."""

    def board_py(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(BOARD_PY), *args], capture_output=True, text=True, timeout=60
        )

    proc = board_py("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout
    edited = tmp_path / "pgsage.json"
    edited.write_text(DASHBOARD.read_text().replace('"title": "pgsage"', '"title": "edited"'))
    proc = board_py("--check", "--out", str(edited))
    assert proc.returncode == 1 and "out of date" in proc.stderr
    assert board_py("--out", str(edited)).returncode == 0
    assert edited.read_text() == DASHBOARD.read_text()
