"""Accuracy of the cost model against its baselines, on a logged workload.

    python -m bench.accuracy --workload 300     # the simulated users' workload (issue targets)
    python -m bench.accuracy --dsn postgresql://postgres@127.0.0.1:5432/warehouse
    # generate a workload through a running pgsage first (serve with log_parameters = true):
    python -m bench.accuracy --dsn ...:5432/warehouse \
        --traffic-dsn postgresql://postgres@127.0.0.1:6432/warehouse --statements 3000

--workload SECONDS creates a fresh warehouse database (--database, dropped first;
--warehouse-scale), starts `pgsage serve` in front of it with `log_parameters` on, drives the
workload simulator through it for SECONDS real seconds (--qps, --speed, --workload-seed; no
injected anomalies: the model predicts ordinary latency), stops pgsage and scores that log.

Reads `metadata.query_logs` at --dsn (or the --workload run's database), builds the features,
fits the cost model (bounded random search, time split 70/15/15), and scores it beside the
baselines (per-template median, EXPLAIN total cost fitted per template and globally, log-log) on
the same test rows, then on held-out templates. Prints JSON (and writes it with --out), a table
and the issue's targets (`checks`). Nothing is registered.

History and load features are online: a test row sees the latencies of executions that finished
before it started, test rows included, as the proxy does when it serves. Two stricter scores go
beside them: `time_split_frozen_history` (history and load only from training rows, as known when
training ended) and `held_out_templates_cold` (the held-out templates never executed before: no
history of their own at all). The baselines use no history, so theirs are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import asyncpg
import numpy as np

from bench.costload import create_tables, run_traffic
from bench.machine import load_average, warn_if_busy
from models.cost import CostModel, regression_metrics, to_json
from models.dataset import Dataset, add_history, build_dataset, time_split
from models.train import TrainConfig, fit_cost_model, library_versions

KEYS = ("rows", "r2_log", "mae_share", "qerror_p50", "qerror_p90", "qerror_p99")
TARGETS = {"r2_log": 0.9, "qerror_p50": 1.3, "qerror_p90": 2.5}
SPLITS = (
    "time_split",
    "held_out_templates",
    "time_split_frozen_history",
    "held_out_templates_cold",
)


async def _traffic(dsn: str, statements: int, scale: float, seed: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await create_tables(conn, scale)
        await run_traffic(conn, statements, seed=seed, scale=scale)
        return time.perf_counter() - started
    finally:
        await conn.close()


def simulate_workload(args: argparse.Namespace) -> dict[str, Any]:
    """The workload simulator's users through a pgsage of the bench's own (see the module doc)."""
    from bench.accuracy_anomaly import simulate

    run = argparse.Namespace(
        user=args.user, upstream=args.upstream, database=args.database,
        scale=args.warehouse_scale, seed=args.workload_seed, speed=args.speed,
        duration=args.workload, qps=args.qps,
    )  # fmt: skip
    return simulate(run, anomalies=False, env_extra={"PGSAGE_LOG_PARAMETERS": "true"})


async def measure(
    args: argparse.Namespace, workload: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "accuracy", "libraries": library_versions()}
    if workload is not None:
        out["workload"] = workload
    if args.traffic_dsn:
        out["traffic_seconds"] = await _traffic(
            args.traffic_dsn, args.statements, args.scale, args.seed
        )
        await asyncio.sleep(args.settle)  # the query log flushes in the background
    conn = await asyncpg.connect(args.dsn)
    try:
        started = time.perf_counter()
        data = await build_dataset(conn, max_rows=args.max_rows, store=False)
        out["features_seconds"] = time.perf_counter() - started
    finally:
        await conn.close()
    config = TrainConfig(n_iter=args.n_iter, seed=args.seed, n_jobs=args.jobs)
    started = time.perf_counter()
    model, info = fit_cost_model(data, config)
    out["fit_seconds"] = time.perf_counter() - started
    out["data_window"] = data.window()
    out["split"] = {k: v for k, v in info["split"].items() if k != "test_query_ids"}
    out["params"] = info["params"]
    out["time_split"] = _summary(info["metrics"])
    out["held_out_templates"] = _summary(info["held_out_templates"])
    out["held_out_templates"]["fingerprints"] = len(info["held_out_templates"]["fingerprints"])
    out.update(strict_scores(data, model, info, config))
    out["feature_importance"] = dict(list(info["feature_importance"].items())[:10])
    out["worst_fingerprints"] = info["metrics"].get("worst_fingerprints", [])[:5]
    out["confusion"] = info["metrics"].get("confusion")
    out["targets"] = TARGETS
    out["checks"] = checks(out)
    return out


def strict_scores(
    data: Dataset, model: CostModel, info: dict[str, Any], config: TrainConfig
) -> dict[str, Any]:
    """The model again without online history: `time_split_frozen_history` scores the same
    model on the same test rows with history and load computed from training rows only;
    `held_out_templates_cold` scores the held-out model (the same fit as in `fit_cost_model`)
    on the same rows as if their templates had never run before (no history of their own)."""
    frame, out = data.frame, {}
    train, val, test = time_split(len(frame))
    position = np.arange(len(frame))
    fit = position < len(train) + len(val)
    frozen = add_history(frame, known=fit)
    out["time_split_frozen_history"] = _with_baselines(
        frame, test, model.predict(frozen.iloc[test][model.feature_names_]), info["metrics"]
    )
    held_out = info["held_out_templates"]
    is_held = frame["fingerprint"].isin(set(held_out["fingerprints"])).to_numpy()
    held_rows = position[is_held & (position >= len(train))]
    seen_rows = position[fit & ~is_held]
    if len(held_rows) and len(seen_rows) and "baselines" in held_out:
        unseen = CostModel(random_state=config.seed, n_jobs=config.n_jobs, **info["params"])
        unseen.fit(data.X.iloc[seen_rows], data.y[seen_rows])
        cold = add_history(frame, known=~is_held)
        predicted = unseen.predict(cold.iloc[held_rows][unseen.feature_names_])
        out["held_out_templates_cold"] = _with_baselines(frame, held_rows, predicted, held_out)
    return out


def _with_baselines(
    frame: Any, rows: np.ndarray, predicted: np.ndarray, scored: dict[str, Any]
) -> dict[str, Any]:
    metrics = regression_metrics(frame["duration_ms"].iloc[rows], predicted)
    return _summary({**metrics, "baselines": scored.get("baselines", {})})


def checks(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets on the time split, and the cost model's q-error p90 below every
    baseline's on each split."""
    out: dict[str, bool] = {}
    model = result["time_split"]["cost_model"]
    for key, target in TARGETS.items():
        value = model.get(key)
        higher = key == "r2_log"
        met = value is not None and bool(value >= target if higher else value <= target)
        out[f"time_split {key} {'>=' if higher else '<='} {target}"] = met
    for split in SPLITS:
        rows = result.get(split)
        if not rows:
            continue
        ours = rows["cost_model"].get("qerror_p90")
        for name, m in rows.items():
            if name == "cost_model" or not isinstance(m, dict):
                continue
            theirs = m.get("qerror_p90")
            out[f"{split} qerror_p90 < {name}"] = bool(
                ours is not None and theirs is not None and ours < theirs
            )
    return out


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {"cost_model": {k: m.get(k) for k in KEYS}}
    for name, b in m.get("baselines", {}).items():
        res[name] = {k: b.get(k) for k in KEYS}
    return res


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    for split in SPLITS:
        rows = result.get(split)
        if not rows:
            continue
        table = Table(title=f"{split} ({rows['cost_model']['rows']} rows)")
        for col in ("predictor", "R² log", "MAE share", "q p50", "q p90", "q p99"):
            table.add_column(col, justify="right" if col != "predictor" else "left")
        for name, m in rows.items():
            if not isinstance(m, dict):
                continue
            cells = [m.get(k) for k in KEYS[1:]]
            table.add_row(name, *("—" if v is None else f"{v:.3f}" for v in cells))
        console.print(table)
    for name, ok in result.get("checks", {}).items():
        console.print(f"{'[green]met[/green]' if ok else '[red]NOT met[/red]'}  {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--anomaly" in argv:  # the anomaly detectors (bench/accuracy_anomaly.py)
        from bench import accuracy_anomaly

        return int(accuracy_anomaly.main([a for a in argv if a != "--anomaly"]) or 0)
    if "--forecast" in argv:  # clustering and the forecaster (bench/accuracy_forecast.py)
        from bench import accuracy_forecast

        return int(accuracy_forecast.main([a for a in argv if a != "--forecast"]) or 0)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="--anomaly and --forecast run the anomaly and forecast benchmarks instead.",
    )
    parser.add_argument("--dsn", help="database holding metadata.query_logs")
    parser.add_argument("--workload", type=float, default=0.0, metavar="SECONDS",
                        help="first run the workload simulator for SECONDS real seconds through "
                             "a pgsage of the bench's own, and score its log")  # fmt: skip
    parser.add_argument("--upstream", default="127.0.0.1:5432", help="PostgreSQL host:port "
                        "(--workload)")  # fmt: skip
    parser.add_argument("--user", default="postgres")
    parser.add_argument(
        "--database",
        default="pgsage_cost_bench",
        help="the --workload run's warehouse (dropped and created)",
    )
    parser.add_argument("--warehouse-scale", type=float, default=1.0)
    parser.add_argument("--qps", type=float, default=80.0)
    parser.add_argument("--speed", type=float, default=2000.0, help="simulated s per real s")
    parser.add_argument("--workload-seed", type=int, default=7)
    parser.add_argument("--traffic-dsn", help="send a generated workload through this pgsage")
    parser.add_argument("--statements", type=int, default=3000)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--max-rows", type=int, default=200_000)
    parser.add_argument("--n-iter", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not args.dsn and not args.workload:
        parser.error("give --dsn (a logged workload) or --workload SECONDS")
    if args.workload and (args.dsn or args.traffic_dsn):
        parser.error("--workload scores its own run: leave out --dsn and --traffic-dsn")
    workload = None
    measuring = bool(args.workload or args.traffic_dsn)  # (latencies are taken now)
    load_start = warn_if_busy("the latencies the model learns from") if measuring else None
    if args.workload:  # (the simulation runs event loops of its own)
        workload = simulate_workload(args)
        args.dsn = f"postgresql://{args.user}@{args.upstream}/{args.database}"
    result = asyncio.run(measure(args, workload))
    if load_start is not None:
        result["loadavg_at_start"], result["loadavg_at_end"] = load_start, load_average()
    text = to_json(result)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print_table(json.loads(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
