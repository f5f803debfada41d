"""Accuracy of the anomaly detectors on the workload simulator's labels (`accuracy --anomaly`).

    python -m bench.accuracy_anomaly                       # warehouse + pgsage + simulated run
    python -m bench.accuracy_anomaly --dsn postgresql://postgres@127.0.0.1:5432/pgsage_demo

Without --dsn: (re)creates the warehouse database (--database, dropped first; --scale), starts
`pgsage serve` in front of it as a separate process, drives the workload simulator through it
(--duration real seconds at --speed, labelled anomalies on), stops pgsage (which flushes the
query log), then scores. With --dsn it scores the run(s) already logged there. Scoring
(models/anomaly.py): executions in time order, the first --train-share fit the Isolation Forests
(on the executions not labelled anomalous) and the baselines and calibrate thresholds on their
labels; the rest is scored as the online detector would, beside the per-fingerprint z-score
(calibrated the same way). Execution-level F1, precision, recall and false-positive rate overall
and per label kind, over the simulated users' statements (not the simulator's bookkeeping).
--train-share takes a comma-separated list (e.g. 0.5,0.3): the first is the reported split, the
others are scored too and summarised under "by_train_share" (how much the split matters). The
calibrated latency thresholds ("calibration" -> "iforest" -> "threshold") are per view of
models.anomaly.IF_VIEWS (spike, level shift), in training ranks; null means the view is off.

The label audit ("label_audit") says, per kind, how many of the test split's labelled executions
the log shows outside their anomaly's window (a statement the simulator dispatched inside the
window but that waited in its simulated user's queue, e.g. behind one blocked by the lock, starts
after it), for lock_contention how many did not overlap the lock as the log shows it held (from
the holder's LOCK TABLE completing to its COMMIT) and how many unlabelled statements it held up
(started while it was held, finished after: "unlabelled_waits"), and how many were no slower
than twice their template's running median: what a latency detector cannot see, so the recall
it bounds. It reads the log and the labels only.
Prints JSON and a table; writes bench/results/anomaly.json. Nothing is registered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from models.anomaly import (
    CAUSE_OF_LABEL,
    LABEL_KINDS,
    Execution,
    fetch_executions,
    fetch_intervals,
    fit_and_evaluate,
    scored,
    simulated_users,
)
from models.cost import to_json
from models.train import library_versions

TARGETS = {"f1": 0.9, "fpr": 0.02}
RESULTS = Path(__file__).parent / "results" / "anomaly.json"
DETECTORS = (
    ("test", "isolation forest + workload rules"),
    ("iforest_latency_only", "isolation forest alone (latency)"),
    ("zscore", "z-score per fingerprint (baseline)"),
    ("zscore_with_workload_rules", "z-score + the same workload rules"),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulate(
    args: argparse.Namespace, anomalies: bool = True, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """Warehouse, pgsage serve, a simulated run (with labelled anomalies unless `anomalies` is
    False; `env_extra`: more of pgsage's settings); returns run facts."""
    from rich.console import Console

    from bench.warehouse import drop_database_async, init_warehouse
    from bench.workload.plan import PlanConfig
    from bench.workload.runner import RunConfig, run_workload

    base = f"postgresql://{args.user}@{args.upstream}"
    # a fresh database: a reset warehouse keeps its metadata schema, and the query log and
    # labels of an earlier run on the same simulated week would be scored with this one's
    asyncio.run(drop_database_async(f"{base}/postgres", args.database))
    init_warehouse(f"{base}/postgres", args.scale, args.seed, args.database, reset=True,
                   progress=False, show=False)  # fmt: skip
    listen, http = _free_port(), _free_port()
    env = {
        **os.environ,
        "PGSAGE_LISTEN": f"127.0.0.1:{listen}",
        "PGSAGE_HTTP": f"127.0.0.1:{http}",
        "PGSAGE_UPSTREAM": args.upstream,
        "PGSAGE_WAREHOUSE_DATABASE": args.database,
        "PGSAGE_LOG_LEVEL": "warning",
        "PGSAGE_LOG_FORMAT": "json",
        "PGSAGE_EMBEDDED_FALLBACK": "false",
        "PGSAGE_RETRAIN_INTERVAL": "0",
        "PGSAGE_RETRAIN_QERROR_THRESHOLD": "0",
        "PGSAGE_MODEL_DIR": tempfile.mkdtemp(prefix="pgsage-anomaly-bench-"),
        **(env_extra or {}),
    }
    log = open(Path(tempfile.gettempdir()) / "pgsage-anomaly-bench.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], env=env,
                            stdout=log, stderr=log, cwd=tempfile.gettempdir())  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{http}/readyz", proc)
        plan = PlanConfig(seed=args.seed, start=datetime(2026, 1, 26, tzinfo=UTC),
                          speed=args.speed, duration=args.duration, qps=args.qps,
                          anomalies=anomalies)  # fmt: skip
        result = run_workload(
            RunConfig(dsn=f"postgresql://{args.user}@127.0.0.1:{listen}/{args.database}",
                      plan=plan, progress=False),
            Console(stderr=True, quiet=True),
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return {
        "run_id": result.run_id,
        "executed": result.executed,
        "errors": result.errors,
        "anomalies": len(result.schedule),
        "database": args.database,
        "real_seconds": round(result.elapsed, 1),
        "simulated": f"{result.sim_start:%Y-%m-%d %H:%M} .. {result.sim_end:%Y-%m-%d %H:%M}",
        "speed": args.speed,
        "qps": args.qps,
        "scale": args.scale,
        "seed": args.seed,
    }


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgsage serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("pgsage serve did not become ready")


def label_audit(
    executions: list[Execution],
    kinds: dict[str, str],
    windows: dict[str, tuple[float, float]],
    start: int = 0,
    lock_missed: int | None = None,
) -> dict[str, dict[str, int]]:
    """Per label kind, over the labelled executions from `start` on (the test split): how many
    the log has outside their anomaly's window, and, for the kinds a latency detector is to find,
    how many were no slower than twice their template's running median (of its last 64
    successful executions, once it has 5)."""
    history: dict[str, list[float]] = {}
    scope = simulated_users(executions)
    out: dict[str, dict[str, int]] = {}
    for i, e in enumerate(executions):
        if not scored(e):
            continue
        past = history.setdefault(e.fingerprint, [])
        kind = kinds.get(e.label) if e.label else None
        if kind is not None and i >= start and scope[i]:
            row = out.setdefault(kind, {"executions": 0, "logged_outside_window": 0})
            if CAUSE_OF_LABEL[kind] == "latency":
                row.setdefault("not_slower_than_2x_median", 0)
            row["executions"] += 1
            lo, hi = windows.get(e.label or "", (float("-inf"), float("inf")))
            row["logged_outside_window"] += int(not lo <= e.ts < hi)
            if CAUSE_OF_LABEL[kind] == "latency" and len(past) >= 5 and not e.error:
                median = sorted(past[-64:])[len(past[-64:]) // 2]
                row["not_slower_than_2x_median"] += int(e.duration_ms <= 2 * median)
        if not e.error:
            past.append(e.duration_ms)
    if "lock_contention" in out and lock_missed is not None:
        out["lock_contention"]["not_overlapping_lock"] = lock_missed
    return {kind: out[kind] for kind in LABEL_KINDS if kind in out}


_LOCK_MISSED = """
WITH holder AS (
    SELECT started_at, finished_at, command, normalized_text,
           lead(started_at) OVER (ORDER BY started_at, query_id) AS next_started
    FROM metadata.query_logs WHERE application_name = 'pgsage-workload-anomaly'
), holds AS (  -- from LOCK TABLE completing to the COMMIT (or ROLLBACK) that follows it
    SELECT finished_at AS locked, next_started AS released FROM holder
    WHERE normalized_text ILIKE 'LOCK TABLE%'
)
SELECT count(*) FILTER (WHERE w.kind = 'lock_contention' AND NOT EXISTS (
           SELECT 1 FROM holds h WHERE q.started_at < coalesce(h.released, 'infinity')
                                   AND q.finished_at > h.locked)) AS missed,
       -- unlabelled statements held until the lock went (started under it, ended after it)
       count(*) FILTER (WHERE q.label IS NULL AND EXISTS (
           SELECT 1 FROM holds h WHERE q.started_at >= h.locked AND q.started_at < h.released
                                   AND q.finished_at >= h.released)) AS unlabelled
FROM metadata.query_logs q LEFT JOIN metadata.workload_labels w USING (label)
WHERE q.started_at >= to_timestamp($1) AND q.application_name LIKE 'pgsage-workload-%'
  AND q.application_name NOT IN ('pgsage-workload-control', 'pgsage-workload-anomaly')
"""


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    t = info["test"]
    return {
        "split": info["split"],
        "f1": t["f1"], "fpr": t["fpr"], "precision": t["precision"], "recall": t["recall"],
        "f1_zscore": info["zscore"]["f1"],
        "recall_per_kind": {k: round(v["recall"], 3) for k, v in t["per_kind"].items()},
        "detected_per_kind": {k: f"{v['detected']}/{v['executions']}"
                              for k, v in t["per_kind"].items()},
        "calibration": info.get("calibration"),
    }  # fmt: skip


async def score(dsn: str, train_shares: list[float], seed: int) -> dict[str, Any]:
    train_share = train_shares[0]
    conn = await asyncpg.connect(dsn)
    try:
        executions, kinds = await fetch_executions(conn, max_rows=1_000_000)
        intervals, cluster_of, source = await fetch_intervals(conn)
        windows: dict[str, tuple[float, float]] = {}
        if kinds:
            rows = await conn.fetch(
                "SELECT label, extract(epoch FROM window_start)::float8 AS s,"
                " extract(epoch FROM window_end)::float8 AS e FROM metadata.workload_labels"
            )
            windows = {r["label"]: (r["s"], r["e"]) for r in rows}
        cut = executions[int(len(executions) * train_share)].ts if executions else 0.0
        lock_missed, lock_unlabelled = await conn.fetchrow(_LOCK_MISSED, cut)
        online = (
            await conn.fetchval("SELECT count(*) FROM metadata.anomalies")
            if await conn.fetchval("SELECT to_regclass('metadata.anomalies') IS NOT NULL")
            else 0
        )
    finally:
        await conn.close()
    if not kinds:
        raise SystemExit("no labels in metadata.workload_labels: run the workload simulator")
    started = time.perf_counter()
    info = fit_and_evaluate(executions, kinds, train_share=train_share, seed=seed,
                            forecasts=(intervals, cluster_of)).info  # fmt: skip
    elapsed = round(time.perf_counter() - started, 2)
    out: dict[str, Any] = {
        "executions": len(executions),
        "labelled": sum(1 for e in executions if e.label in kinds),
        "split": info["split"],
        "interval_source": source,
        "fit_and_score_seconds": elapsed,
        "calibration": info.get("calibration"),
        "online_incidents_during_run": online,
    }
    for key, _ in DETECTORS:
        out[key] = info[key]
    out["events"] = info["events"]
    t = info["test"]
    out["metrics"] = {"f1": t["f1"], "fpr": t["fpr"], "precision": t["precision"],
                      "recall": t["recall"], "f1_zscore": info["zscore"]["f1"]}  # fmt: skip
    out["targets_met"] = {"f1": t["f1"] >= TARGETS["f1"], "fpr": t["fpr"] <= TARGETS["fpr"]}
    out["label_audit"] = label_audit(
        executions, kinds, windows, int(len(executions) * train_share), int(lock_missed)
    )
    if "lock_contention" in out["label_audit"]:
        out["label_audit"]["lock_contention"]["unlabelled_waits"] = int(lock_unlabelled)
    by_share = {str(train_share): _summary(info)}
    for share in train_shares[1:]:
        other = fit_and_evaluate(executions, kinds, train_share=share, seed=seed,
                                 forecasts=(intervals, cluster_of)).info  # fmt: skip
        by_share[str(share)] = _summary(other)
    out["by_train_share"] = by_share
    return out


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"anomaly detection on labelled test executions ({result['split']})")
    for col in ("detector", "F1", "precision", "recall", "FPR", "TP", "FP", "FN"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for key, name in DETECTORS:
        r = result[key]
        table.add_row(name, f"{r['f1']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                      f"{r['fpr']:.4f}", str(r["tp"]), str(r["fp"]), str(r["fn"]))  # fmt: skip
    console.print(table)
    kinds = Table(title="per label kind (recall / precision; precision shares a cause's FPs)")
    kinds.add_column("kind")
    kinds.add_column("executions", justify="right")
    for _, name in DETECTORS[::2]:
        kinds.add_column(name, justify="right")
    for kind in LABEL_KINDS:
        rows = [result[key]["per_kind"].get(kind) for key, _ in DETECTORS[::2]]
        if rows[0] is None:
            continue
        kinds.add_row(kind, str(rows[0]["executions"]),
                      *(f"{r['recall']:.2f} / {r['precision']:.2f}" for r in rows))  # fmt: skip
    console.print(kinds)
    audit = Table(title="label audit of the test split (what a latency detector cannot see)")
    for col in ("kind", "executions", "logged outside window", "lock not overlapped",
                "<= 2x template median"):  # fmt: skip
        audit.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in result.get("label_audit", {}).items():
        audit.add_row(kind, str(row["executions"]), str(row["logged_outside_window"]),
                      str(row.get("not_overlapping_lock", "-")),
                      str(row.get("not_slower_than_2x_median", "-")))  # fmt: skip
    console.print(audit)
    shares = result.get("by_train_share", {})
    if len(shares) > 1:
        split = Table(title="by train share (isolation forest + workload rules)")
        for col in ("train share", "F1", "precision", "recall", "FPR", "detected per kind"):
            split.add_column(col, justify="left" if col == "detected per kind" else "right")
        for share, r in shares.items():
            split.add_row(share, f"{r['f1']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                          f"{r['fpr']:.4f}", " ".join(f"{k}={v}" for k, v in
                                                      r["detected_per_kind"].items()))  # fmt: skip
        console.print(split)
    e = result["events"]
    console.print(
        f"labels detected {e['labels_detected']}/{e['labels']}; {e['incidents']} incidents,"
        f" {e['incidents_without_label']} without a label; targets F1 >= {TARGETS['f1']}:"
        f" {result['targets_met']['f1']}, FPR <= {TARGETS['fpr']}: {result['targets_met']['fpr']}"
    )


def _shares(text: str) -> list[float]:
    shares = [float(x) for x in text.split(",") if x.strip()]
    if not shares or not all(0.0 < x < 1.0 for x in shares):
        raise argparse.ArgumentTypeError(f"train shares must be in (0, 1), got {text!r}")
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="score the run logged in this database (no simulation)")
    parser.add_argument("--upstream", default="127.0.0.1:5432", help="PostgreSQL host:port")
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", default="pgsage_anomaly_bench")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=240.0, help="real seconds")
    parser.add_argument("--speed", type=float, default=2000.0, help="simulated s per real s")
    parser.add_argument("--qps", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--train-share", type=_shares, default=[0.5],
                        help="share of the run (in time) to fit on; a comma-separated list scores"
                             " each, the first is the one reported")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"bench": "accuracy_anomaly", "targets": TARGETS,
                              "libraries": library_versions()}  # fmt: skip
    if args.dsn:
        dsn = args.dsn
        result["run"] = {"source": "logged run", "dsn": dsn.split("@")[-1]}
    else:
        from bench.machine import load_average, warn_if_busy

        load_start = warn_if_busy("the latencies the detectors judge")
        result["run"] = simulate(args)
        result["run"]["loadavg_at_start"] = load_start
        result["run"]["loadavg_at_end"] = load_average()
        dsn = f"postgresql://{args.user}@{args.upstream}/{args.database}"
    result.update(asyncio.run(score(dsn, args.train_share, args.seed)))
    text = to_json(result)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print_table(json.loads(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
