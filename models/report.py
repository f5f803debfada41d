"""`pgsage report`: the evaluation report, from the metadata schema, the registry and the
benchmarks' JSON, as self-contained HTML and as Markdown with PNGs.

Sections (each says "no data" rather than failing when its source is empty): the success
metrics against the seed's targets, each with the command that measured it; the cost model
(predicted vs actual with R², residuals, feature importance); forecast vs actual; the index
advisor's before/after; plan steering's A/B results; the anomaly timeline against the
simulator's labels; recent latency and throughput.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .registry import Registry

BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"

#: (metric, target as text, how to read it from the gathered facts, command that measures it)
TARGETS: list[tuple[str, str, str, Callable[[float], bool], str]] = [
    ("cost model R² (log latency)", ">= 0.9", "cost_r2", lambda v: v >= 0.9,
     "pgsage train cost / python -m bench.accuracy"),
    ("cost model q-error p50", "<= 1.3", "cost_qerror_p50", lambda v: v <= 1.3,
     "pgsage train cost / python -m bench.accuracy"),
    ("cost model MAE share", "(lower is better)", "cost_mae_share", lambda v: True,
     "pgsage train cost"),
    ("forecast MAPE, 1 h", "<= 10%", "forecast_mape_1h", lambda v: v <= 0.10,
     "pgsage train forecast / python -m bench.accuracy --forecast"),
    ("anomaly F1", ">= 0.9", "anomaly_f1", lambda v: v >= 0.9,
     "pgsage train anomaly / python -m bench.accuracy --anomaly"),
    ("anomaly false-positive rate", "<= 2%", "anomaly_fpr", lambda v: v <= 0.02,
     "pgsage train anomaly / python -m bench.accuracy --anomaly"),
    ("index advisor precision@5", ">= 0.8", "advisor_precision_at_5", lambda v: v >= 0.8,
     "python -m bench.gain --advisor"),
    ("index advisor mean speedup", ">= 2x", "advisor_mean_speedup", lambda v: v >= 2,
     "python -m bench.gain --advisor"),
    ("optimisation success rate", ">= 90%", "optimisation_success_rate", lambda v: v >= 0.9,
     "metadata.optimization_history (validated / applied)"),
    ("average gain of applied optimisations", "> 20%", "optimisation_avg_gain",
     lambda v: v > 0.2, "metadata.optimization_history (measured before / after)"),
    ("steering time reduction", ">= 30%", "steering_time_reduction", lambda v: v >= 0.3,
     "python -m bench.gain --steering"),
    ("result cache p50 speedup", "(higher is better)", "cache_p50_speedup", lambda v: v > 1,
     "python -m bench.gain --cache"),
    ("result cache stale reads", "0", "cache_stale_reads", lambda v: v == 0,
     "python -m bench.gain --cache"),
    ("admission: short-query p95 off/on", ">= 3x", "admission_short_p95_ratio",
     lambda v: v >= 3, "python -m bench.gain --admission"),
    ("query response time p95 (ms, last day)", "(lower is better)", "latency_p95_ms",
     lambda v: True, "metadata.query_logs"),
    ("throughput (statements / minute, last day)", "(higher is better)", "throughput_per_min",
     lambda v: True, "metadata.query_logs"),
]  # fmt: skip


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _bench(name: str) -> dict[str, Any] | None:
    path = BENCH_RESULTS / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def gather(conn: Any, registry: Registry) -> dict[str, Any]:
    """Every fact the report shows, read once."""
    facts: dict[str, Any] = {"generated_at": datetime.now(UTC).isoformat()}
    for name in ("cost", "forecast", "anomaly", "clusters", "advisor_rank"):
        entry = await registry.active(name)
        facts[f"{name}_card"] = entry.card if entry is not None else None
    cost = facts["cost_card"] or {}
    m = (cost.get("metrics") or {}).get("test", cost.get("metrics") or {})
    facts["cost_r2"] = m.get("r2_log")
    facts["cost_qerror_p50"] = m.get("qerror_p50")
    facts["cost_mae_share"] = m.get("mae_share")
    fm = (facts["forecast_card"] or {}).get("metrics") or {}
    facts["forecast_mape_1h"] = fm.get("mape_1h")
    am = (facts["anomaly_card"] or {}).get("metrics") or {}
    facts["anomaly_f1"] = am.get("f1")
    facts["anomaly_fpr"] = am.get("fpr")

    facts["pred_actual"] = [
        (float(r[0]), float(r[1]))
        for r in await conn.fetch(
            "SELECT predicted_cost_ms, duration_ms FROM metadata.query_logs"
            " WHERE predicted_cost_ms IS NOT NULL AND status = 'ok'"
            " ORDER BY started_at DESC LIMIT 20000"
        )
    ]
    row = await conn.fetchrow(
        "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95,"
        " count(*) / greatest(extract(epoch FROM max(started_at) - min(started_at)) / 60, 1)"
        " AS per_min FROM metadata.query_logs"
        " WHERE started_at > (SELECT max(started_at) FROM metadata.query_logs) - interval '1 day'"
    )
    facts["latency_p95_ms"] = row["p95"] if row else None
    facts["throughput_per_min"] = float(row["per_min"]) if row and row["per_min"] else None

    hist = await conn.fetch(
        "SELECT kind, action, status, target, detail, measured_before_ms, measured_after_ms"
        " FROM metadata.optimization_history ORDER BY id"
    )
    facts["history"] = [dict(h) for h in hist]
    applied = [h for h in facts["history"] if h["status"] in ("validated", "reverted")]
    good = [h for h in applied if h["status"] == "validated"]
    facts["optimisation_success_rate"] = len(good) / len(applied) if applied else None
    gains = [
        1 - h["measured_after_ms"] / h["measured_before_ms"]
        for h in good
        if h["measured_before_ms"] and h["measured_after_ms"] is not None
    ]
    facts["optimisation_avg_gain"] = float(np.mean(gains)) if gains else None

    forecast_sql = (
        "SELECT window_start, predicted FROM metadata.workload_forecasts WHERE cluster = 'total'"
        " AND made_at = (SELECT max(made_at) FROM metadata.workload_forecasts)"
        " ORDER BY window_start"
    )
    actual_sql = (
        "SELECT date_bin('5 minutes', started_at, timestamptz '2000-01-01') AS w, count(*)"
        " FROM metadata.query_logs WHERE started_at > (SELECT max(started_at)"
        " FROM metadata.query_logs) - interval '1 day' GROUP BY 1 ORDER BY 1"
    )
    has_fc = await conn.fetchval("SELECT to_regclass('metadata.workload_forecasts') IS NOT NULL")
    facts["forecast_rows"] = [tuple(r) for r in await conn.fetch(forecast_sql)] if has_fc else []
    facts["actual_rows"] = [tuple(r) for r in await conn.fetch(actual_sql)]

    has_an = await conn.fetchval("SELECT to_regclass('metadata.anomalies') IS NOT NULL")
    facts["anomalies"] = (
        [dict(r) for r in await conn.fetch(
            "SELECT kind, severity, window_start, window_end FROM metadata.anomalies"
            " ORDER BY window_start")]
        if has_an else []
    )  # fmt: skip
    facts["labels"] = [
        dict(r)
        for r in await conn.fetch(
            "SELECT kind, window_start, window_end FROM metadata.workload_labels"
            " ORDER BY window_start"
        )
    ]
    advisor = _bench("advisor") or {}
    facts["advisor_precision_at_5"] = advisor.get("precision_at_5")
    facts["advisor_mean_speedup"] = advisor.get("mean_speedup")
    steering = _bench("gain") or {}
    facts["steering_time_reduction"] = steering.get("time_reduction_workload")
    cache = _bench("cache") or {}
    facts["cache_p50_speedup"] = cache.get("p50_speedup")
    facts["cache_stale_reads"] = cache.get("stale_reads")
    adm = _bench("admission") or {}
    facts["admission_short_p95_ratio"] = adm.get("short_p95_ratio")
    return facts


def _plots(facts: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    pa = facts["pred_actual"]
    if pa:
        pred = np.log10(np.maximum([p for p, _ in pa], 1e-3))
        act = np.log10(np.maximum([a for _, a in pa], 1e-3))
        ss_res = float(np.sum((act - pred) ** 2))
        ss_tot = float(np.sum((act - act.mean()) ** 2)) or 1.0
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(act, pred, s=3, alpha=0.3)
        lo, hi = float(min(act.min(), pred.min())), float(max(act.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=1)
        ax.set_xlabel("actual log10 ms")
        ax.set_ylabel("predicted log10 ms")
        ax.set_title(f"cost model, live predictions (R² {1 - ss_res / ss_tot:.3f})")
        out["cost_scatter"] = _fig_png(fig)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(pred - act, bins=60)
        ax.set_xlabel("log10(predicted / actual)")
        ax.set_title("residuals")
        out["cost_residuals"] = _fig_png(fig)
    imp = (facts.get("cost_card") or {}).get("feature_importance") or {}
    if imp:
        top = sorted(imp.items(), key=lambda kv: -kv[1])[:15][::-1]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set_title("cost model: feature importance (gain)")
        out["cost_importance"] = _fig_png(fig)
    if facts["forecast_rows"] or facts["actual_rows"]:
        fig, ax = plt.subplots(figsize=(8, 3))
        if facts["actual_rows"]:
            ax.plot([r[0] for r in facts["actual_rows"]], [r[1] for r in facts["actual_rows"]],
                    label="actual", lw=1)  # fmt: skip
        if facts["forecast_rows"]:
            ax.plot([r[0] for r in facts["forecast_rows"]],
                    [r[1] for r in facts["forecast_rows"]], label="forecast", lw=1)  # fmt: skip
        ax.legend()
        ax.set_title("statements per 5 minutes: forecast vs actual")
        out["forecast"] = _fig_png(fig)
    measured = [h for h in facts["history"]
                if h["measured_before_ms"] and h["measured_after_ms"] is not None]  # fmt: skip
    if measured:
        labels = [f"{h['kind']}:{str(h['target'])[:18]}" for h in measured][-15:]
        before = [h["measured_before_ms"] for h in measured][-15:]
        after = [h["measured_after_ms"] for h in measured][-15:]
        y = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1))
        ax.barh(y + 0.2, before, 0.4, label="before")
        ax.barh(y - 0.2, after, 0.4, label="after")
        ax.set_yticks(y, labels)
        ax.set_xscale("log")
        ax.set_xlabel("ms (median, measured)")
        ax.legend()
        ax.set_title("optimisations: measured before / after")
        out["optimisations"] = _fig_png(fig)
    if facts["anomalies"] or facts["labels"]:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        for lab in facts["labels"]:
            ax.axvspan(lab["window_start"], lab["window_end"], color="orange", alpha=0.3)
        for a in facts["anomalies"]:
            ax.plot([a["window_start"], a["window_end"]], [1, 1], lw=6, color="red")
        ax.set_yticks([])
        ax.set_title("anomaly incidents (red) against injected labels (orange)")
        out["anomalies"] = _fig_png(fig)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "no data"
    if isinstance(v, float):
        if math.isnan(v):
            return "no data"
        return f"{v:.3g}"
    return str(v)


def _ab_test(h: dict[str, Any]) -> tuple[str, str]:
    """The statistical test behind an outcome and its p-value, from the history's detail."""
    detail = h.get("detail") or {}
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            detail = {}
    p = detail.get("p_value")
    if p is None:
        p = (detail.get("validation") or {}).get("p_value")
    if p is None:
        return "", ""
    return "Mann-Whitney U (one-sided)", f"{float(p):.2g}"


def success_rows(facts: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, target, key, ok, command in TARGETS:
        v = facts.get(key)
        informative = target.startswith("(")
        verdict = "" if v is None or informative else ("met" if ok(float(v)) else "not met")
        rows.append((name, target, _fmt(v), verdict, command))
    return rows


def render(facts: dict[str, Any], plots: dict[str, bytes], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = success_rows(facts)
    md = [f"# pgsage evaluation report\n\nGenerated {facts['generated_at']}.\n\n",
          "## Success metrics\n\n| metric | target | measured | | measured by |\n",
          "|---|---|---|---|---|\n"]  # fmt: skip
    md += [f"| {a} | {b} | {c} | {d} | `{e}` |\n" for a, b, c, d, e in rows]
    titles = {
        "cost_scatter": "Cost model: predicted vs actual",
        "cost_residuals": "Cost model: residuals",
        "cost_importance": "Cost model: feature importance",
        "forecast": "Forecast vs actual",
        "optimisations": "Optimisations: before / after",
        "anomalies": "Anomaly timeline",
    }
    for key, title in titles.items():
        md.append(f"\n## {title}\n\n")
        if key in plots:
            (out / f"{key}.png").write_bytes(plots[key])
            md.append(f"![{title}]({key}.png)\n")
        else:
            md.append("no data\n")
    md.append(
        "\n## Optimisations and their A/B tests\n\n| kind | target | action | status |"
        " before ms | after ms | test | p-value |\n|---|---|---|---|---|---|---|---|\n"
    )
    for h in facts["history"][-50:]:
        before, after = _fmt(h["measured_before_ms"]), _fmt(h["measured_after_ms"])
        test, p = _ab_test(h)
        cells = (h["kind"], h["target"], h["action"], h["status"], before, after, test, p)
        md.append("| " + " | ".join(str(c) for c in cells) + " |\n")
    md_path = out / "report.md"
    md_path.write_text("".join(md))

    h = ["<!doctype html><meta charset=utf-8><title>pgsage report</title>",
         "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:"
         "collapse}td,th{border:1px solid #ccc;padding:.2em .5em}</style>",
         f"<h1>pgsage evaluation report</h1><p>Generated {html.escape(facts['generated_at'])}."
         "</p><h2>Success metrics</h2><table><tr><th>metric<th>target<th>measured<th><th>"
         "measured by</tr>"]  # fmt: skip
    for row in rows:
        h.append("<tr>" + "".join(f"<td>{html.escape(c)}" for c in row) + "</tr>")
    h.append("</table>")
    for key, title in titles.items():
        h.append(f"<h2>{html.escape(title)}</h2>")
        if key in plots:
            data = base64.b64encode(plots[key]).decode()
            h.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
        else:
            h.append("<p>no data</p>")
    html_path = out / "report.html"
    html_path.write_text("".join(h))
    return md_path, html_path


async def build_report(conn: Any, registry: Registry, out: Path) -> tuple[Path, Path]:
    facts = await gather(conn, registry)
    return render(facts, _plots(facts), out)
