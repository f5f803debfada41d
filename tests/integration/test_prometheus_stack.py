"""The shipped Prometheus rules and Grafana board against a real pgsage and a real Prometheus.

promtool checks the config and rules and runs the rule unit tests; every metric the rules and the
board query must exist in a scrape of pgsage under traffic; a real Prometheus (Debian's
/usr/bin/prometheus) scrapes the in-process service, evaluates the shipped rules and every board
query; the board's JSON is checked for the structure Grafana needs.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "config" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "pgsage.rules.yml"
RULES_TEST = PROM_DIR / "rules" / "pgsage.rules.test.yml"
DASHBOARD = REPO / "config" / "grafana" / "dashboards" / "pgsage.json"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"

#: metrics the board and rules use that pgsage does not export yet (see metrics.md). The test
#: fails once one of them appears, so that it is taken off this list.
NOT_YET_EXPORTED: set[str] = set()
#: series Prometheus makes itself
SYNTHETIC = {"up", "ALERTS"}

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
            names.update(re.findall(r"label_values\(\s*([\w:]+)\s*,", var["definition"]))
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


def _send_traffic(dsn: str) -> None:
    """One round of the statement kinds the board shows: extended and simple protocol,
    a transaction, COPY, and a division by zero (SQLSTATE class 22)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "create table if not exists stack_t (id int primary key, v text);"
            "insert into stack_t select g, 'v' || g from generate_series(1, 200) g"
            " on conflict do nothing"
        )
        for i in range(20):
            conn.execute("select v from stack_t where id = %s", (i + 1,))
        with conn.transaction():
            conn.execute("update stack_t set v = v where id = 1")
        with conn.cursor() as cur, cur.copy("copy stack_t to stdout") as copy:
            for _ in copy:
                pass
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("select 1 / 0")


@contextlib.contextmanager
def _traffic_in_background(dsn: str) -> Iterator[list[BaseException]]:
    """Rounds of _send_traffic until the block ends; yields the errors seen so far."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                _send_traffic(dsn)
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


def test_every_metric_the_rules_and_board_use_is_exported(service):
    _send_traffic(service.dsn())
    service.flush()
    with urllib.request.urlopen(service.http_url + "/metrics", timeout=5) as resp:
        scrape = Scrape(resp.read().decode())
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


def test_board_and_rule_labels_exist_and_database_variable_is_applied(service):
    _send_traffic(service.dsn())
    service.flush()
    with urllib.request.urlopen(service.http_url + "/metrics", timeout=5) as resp:
        scrape = Scrape(resp.read().decode())
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


def test_real_prometheus_scrapes_pgsage_and_evaluates_rules_and_board(service, tmp_path):
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
                        "static_configs": [{"targets": [f"127.0.0.1:{service.http_port}"]}],
                    }
                ],
            }
        )
    )
    with (
        _traffic_in_background(service.dsn()) as traffic_errors,
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
                prom, f'pgsage:query_duration_seconds:p95_5m{{database="{service.database}"}}'
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
        assert service.database in values, "the $database variable would not list the database"

        with urllib.request.urlopen(service.http_url + "/metrics", timeout=5) as resp:
            scrape = Scrape(resp.read().decode())
        failures = []
        for where, expr in dashboard_exprs(load_dashboard()):
            answer = _query(prom, _board_query(expr, service.database))
            if answer["status"] != "success":
                failures.append(f"{where}: {answer.get('error')}")
                continue
            names = metric_names(expr)
            # data is owed when everything the query selects has series in pgsage's scrape
            owed = all(
                ":" in n
                or scrape.has_series(n)
                or any(scrape.has_series(n + s) for s in ("_bucket", "_count"))
                for n in names
            ) and not (names & (SYNTHETIC | NOT_YET_EXPORTED))
            if owed and not answer["data"]["result"]:
                failures.append(f"{where}: no data for {expr}")
        assert not failures, "\n".join(failures)
    assert time.monotonic() - started < 60


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
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        targets = panel["targets"]
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
    ):
        assert needed in titles, f"no panel about {needed}"
    top = next(p for p in graphs if p["title"].lower().startswith("top fingerprints"))
    assert top["type"] == "table"
    assert all(t.get("instant") and t.get("format") == "table" for t in top["targets"])
    latency = next(p for p in graphs if "p50 / p95 / p99" in p["title"])
    exprs = " ".join(t["expr"] for t in latency["targets"])
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "pgsage_query_duration_seconds_bucket" in exprs
