"""The bundled Grafana board, as code: `python config/grafana/board.py` writes
config/grafana/dashboards/pgsage.json; `--check` fails if the committed file differs.

Built with grafana-foundation-sdk (the Grafana 11.6 build pinned in pyproject's test extras: a
build-time tool, the service never imports it). Datasources are template variables
(`$datasource` for Prometheus, `$metadata` for the PostgreSQL database holding pgsage's
metadata and ml schemas), never `__inputs`, so the provisioned file works as it is. Edit this
file, never the JSON; tests/integration/test_prometheus_stack.py evaluates every query of the
board against a real Prometheus and the metadata schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, table
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "dashboards" / "pgsage.json"

PROM = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Grafana 11's id of the core PostgreSQL datasource plugin
PG_TYPE = "grafana-postgresql-datasource"
PG = dm.DataSourceRef(type_val=PG_TYPE, uid="${metadata}")
DB = 'database=~"$database"'
RATE = "[$__rate_interval]"

Steps = Sequence[tuple[float | None, str]]
GREEN: Steps = ((None, "green"),)
UP_DOWN = [
    dm.ValueMap(
        options={
            "0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
            "1": dm.ValueMappingResult(text="UP", color="green", index=1),
        }
    )
]


# ---------------------------------------------------------------- queries


def prom(
    expr: str,
    legend: str = "__auto",
    ref: str = "A",
    *,
    instant: bool = False,
    fmt: pm.PromQueryFormat | None = None,
) -> prometheus.Dataquery:
    q = (
        prometheus.Dataquery()
        .ref_id(ref)
        .datasource(PROM)
        .editor_mode(pm.QueryEditorMode.CODE)
        .expr(expr)
        .legend_format(legend)
    )
    q = q.instant() if instant else q.range()
    return q.format(fmt) if fmt is not None else q


class SQLQuery(cogvariants.Dataquery):
    """A query of Grafana's PostgreSQL datasource (the SDK has no builder for it)."""

    def __init__(self, ref: str, sql: str, fmt: str) -> None:
        self.ref, self.sql, self.fmt = ref, sql, fmt

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref,
            "datasource": PG,
            "editorMode": "code",
            "format": self.fmt,
            "rawQuery": True,
            "rawSql": self.sql,
        }


class SQL(cogbuilder.Builder[SQLQuery]):
    def __init__(self, sql: str, ref: str = "A", fmt: str = "table") -> None:
        self._q = SQLQuery(ref, " ".join(sql.split()), fmt)

    def build(self) -> SQLQuery:
        return self._q


# ---------------------------------------------------------------- panels


def thresholds(steps: Steps) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def fixed(color: str) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})


def stat_panel(
    title: str,
    description: str,
    target: cogbuilder.Builder[Any],
    *,
    unit: str = "short",
    steps: Steps = GREEN,
    graph: bool = True,
    text_mode: common.BigValueTextMode = common.BigValueTextMode.AUTO,
    decimals: float | None = None,
    mappings: list[dm.ValueMapping] | None = None,
    datasource: dm.DataSourceRef = PROM,
    extra: Sequence[cogbuilder.Builder[Any]] = (),
) -> stat.Panel:
    p = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(datasource)
        .unit(unit)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds(steps))
        .mappings(mappings or [])
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
        .text_mode(text_mode)
        .wide_layout(True)
        .show_percent_change(False)
        .targets([target, *extra])
        .height(4)
        .span(4)
    )
    return p.decimals(decimals) if decimals is not None else p


def ts_panel(
    title: str,
    description: str,
    targets: Sequence[cogbuilder.Builder[Any]],
    *,
    unit: str = "short",
    stack: bool = False,
    fill: float | None = None,
    steps: Steps = GREEN,
    threshold_line: bool = False,
    min_value: float | None = 0,
    max_value: float | None = None,
    w: int = 12,
    h: int = 8,
) -> ts.Panel:
    p = (
        ts.Panel()
        .title(title)
        .description(description)
        .datasource(PROM)
        .unit(unit)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(common.GraphDrawStyle.LINE)
        .line_interpolation(common.LineInterpolation.LINEAR)
        .line_width(1)
        .fill_opacity(fill if fill is not None else (20 if stack else 5))
        .gradient_mode(common.GraphGradientMode.NONE)
        .show_points(common.VisibilityMode.NEVER)
        .point_size(4)
        .span_nulls(False)
        .axis_placement(common.AxisPlacement.AUTO)
        .stacking(
            cb.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.LINE
                if threshold_line
                else common.GraphThresholdsStyleMode.OFF
            )
        )
        .thresholds(thresholds(steps))
        .legend(
            cb.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs([])
        )
        .tooltip(
            cb.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .targets(list(targets))
        .span(w)
        .height(h)
    )
    if min_value is not None:
        p = p.min(min_value)
    if max_value is not None:
        p = p.max(max_value)
    return p


def sql_table(
    title: str,
    description: str,
    sql: str,
    *,
    units: dict[str, str] | None = None,
    sort_by: str | None = None,
    w: int = 12,
    h: int = 8,
) -> table.Panel:
    p = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(PG)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds(GREEN))
        .align(common.FieldTextAlignment.AUTO)
        .cell_options(common.TableAutoCellOptions())
        .inspect(False)
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .footer(cb.TableFooterOptions().show(False).reducer(["sum"]).fields([]).count_rows(False))
        .targets([SQL(sql)])
        .span(w)
        .height(h)
    )
    for name, unit in (units or {}).items():
        p = p.override_by_name(name, [dm.DynamicConfigValue(id_val="unit", value=unit)])
    if sort_by is not None:
        p = p.sort_by([cb.TableSortByFieldState().display_name(sort_by).desc(True)])
    return p


def quantiles(metric: str, qs: Sequence[str], where: str = "") -> list[prometheus.Dataquery]:
    sel = f"{metric}_bucket{{{where}}}" if where else f"{metric}_bucket"
    return [
        prom(
            f"histogram_quantile({q}, sum by (le) (rate({sel}{RATE})))",
            f"p{q.removeprefix('0.').ljust(2, '0')[:2]}",
            chr(ord("A") + i),
        )
        for i, q in enumerate(qs)
    ]


# ---------------------------------------------------------------- rows


def overview() -> list[cogbuilder.Builder[Any]]:
    errors = f'(sum(rate(pgsage_queries_total{{{DB},status="error"}}{RATE})) or vector(0))'
    total = f"sum(rate(pgsage_queries_total{{{DB}}}{RATE}))"
    hits = f"sum(rate(pgsage_cache_hits_total{RATE}))"
    misses = f"sum(rate(pgsage_cache_misses_total{RATE}))"
    health = (
        "100 * min(pgsage_upstream_up)"
        f" * (1 - 0.4 * clamp_max(({errors} / {total}) / 0.05, 1))"
        f" * (1 - 0.3 * clamp_max(max(pgsage:query_duration_seconds:p95_5m{{{DB}}}) / 1, 1))"
        " * (1 - 0.3 * clamp_max(sum(pgsage_anomaly_incidents_open) / 5, 1))"
    )
    count = f"sum(increase(pgsage_query_duration_seconds_count{{{DB}}}[$__range]))"
    under_1s = f'sum(increase(pgsage_query_duration_seconds_bucket{{{DB},le="1.0"}}[$__range]))'
    today = """
        SELECT count(*) FILTER (WHERE started_at >= date_trunc('day', now())) AS "today",
               count(*) FILTER (WHERE started_at < now() - interval '1 day') AS "yesterday"
        FROM metadata.query_logs
        WHERE started_at >= date_trunc('day', now()) - interval '1 day'
          AND NOT is_catalog
    """
    return [
        db.Row("Overview"),
        stat_panel(
            "Upstream",
            "Last PostgreSQL health probe of every pgsage instance (worst shown).",
            prom("min(pgsage_upstream_up)"),
            steps=((None, "red"), (1, "green")),
            graph=False,
            mappings=list(UP_DOWN),
        ),
        stat_panel(
            "Queries / s",
            "Statements per second through the proxy.",
            prom(total),
            unit="reqps",
        ),
        stat_panel(
            "p95 latency (5m)",
            "Worst per-database p95 statement duration, recording rule"
            " pgsage:query_duration_seconds:p95_5m. The alert fires above 1 s.",
            prom(f"max(pgsage:query_duration_seconds:p95_5m{{{DB}}})"),
            unit="s",
            steps=((None, "green"), (0.5, "yellow"), (1, "red")),
        ),
        stat_panel(
            "Error ratio",
            "Share of statements ending in an ErrorResponse.",
            prom(f"{errors} / {total}"),
            unit="percentunit",
            steps=((None, "green"), (0.01, "yellow"), (0.05, "red")),
            decimals=2,
        ),
        stat_panel(
            "Client connections",
            "Client sessions past startup.",
            prom(f"sum(pgsage_client_connections_active{{{DB}}})"),
        ),
        stat_panel(
            "Version",
            "pgsage build of each scraped instance.",
            prom("count by (version) (pgsage_build_info)", "{{version}}"),
            graph=False,
            text_mode=common.BigValueTextMode.NAME,
        ),
        stat_panel(
            "Queries today vs yesterday",
            "Client statements logged in metadata.query_logs since midnight, and yesterday"
            " up to the same time of day (PostgreSQL datasource: Prometheus may not keep"
            " yesterday).",
            SQL(today),
            graph=False,
            datasource=PG,
        ),
        stat_panel(
            "Result cache hit rate",
            "Cacheable reads answered from pgsage's result cache: hits / (hits + misses).",
            prom(f"{hits} / ({hits} + {misses})"),
            unit="percentunit",
            steps=((None, "red"), (0.5, "yellow"), (0.8, "green")),
            decimals=1,
        ),
        stat_panel(
            "Slow queries (> 1 s)",
            "Statements slower than 1 s in the selected time range.",
            prom(f"{count} - {under_1s}"),
            steps=((None, "green"), (1, "yellow"), (10, "red")),
            decimals=0,
        ),
        stat_panel(
            "Cost model q-error",
            "Model accuracy online: median q-error (max(predicted/actual, actual/predicted))"
            " of the recent cost predictions. 1 is perfect.",
            prom("max(pgsage_cost_prediction_qerror)"),
            steps=((None, "green"), (2, "yellow"), (4, "red")),
            decimals=2,
        ),
        stat_panel(
            "Open anomaly incidents",
            "Incidents the anomaly detector has open (metadata.anomalies).",
            prom("sum(pgsage_anomaly_incidents_open)"),
            steps=((None, "green"), (1, "yellow"), (5, "red")),
        ),
        stat_panel(
            "Health score",
            "100 when healthy. Upstream down gives 0; error ratio towards 5% takes up to 40,"
            " p95 towards 1 s up to 30, open anomaly incidents (up to 5) up to 30 points.",
            prom(health),
            unit="none",
            steps=((None, "red"), (60, "yellow"), (85, "green")),
            decimals=0,
        ),
    ]


def queries() -> list[cogbuilder.Builder[Any]]:
    fast = f'sum(rate(pgsage_query_duration_seconds_bucket{{{DB},le="0.1"}}{RATE}))'
    under_1s = f'sum(rate(pgsage_query_duration_seconds_bucket{{{DB},le="1.0"}}{RATE}))'
    count = f"sum(rate(pgsage_query_duration_seconds_count{{{DB}}}{RATE}))"
    failed = """
        SELECT started_at AS "time", database_name AS "database", application_name AS "app",
               sqlstate, left(error_message, 200) AS "error",
               left(normalized_text, 200) AS "statement", duration_ms / 1000.0 AS "duration"
        FROM metadata.query_logs
        WHERE $__timeFilter(started_at) AND status = 'error'
        ORDER BY started_at DESC LIMIT 100
    """
    return [
        db.Row("Queries"),
        ts_panel(
            "Queries per second by command",
            "Statements per second by command class (first keyword).",
            [prom(f"sum by (command) (rate(pgsage_queries_total{{{DB}}}{RATE}))", "{{command}}")],
            unit="reqps",
            stack=True,
        ),
        ts_panel(
            "Query latency p50 / p95 / p99",
            "Quantiles of pgsage_query_duration_seconds, from the first frame of a statement to"
            " its completion.",
            quantiles("pgsage_query_duration_seconds", ("0.50", "0.95", "0.99"), DB),
            unit="s",
            steps=((None, "green"), (1, "red")),
            threshold_line=True,
        ),
        heatmap.Panel()
        .title("Latency distribution")
        .description("Statements per latency bucket over time.")
        .datasource(PROM)
        .hide_from(cb.HideSeriesConfig().legend(False).tooltip(False).viz(False))
        .scale_distribution(cb.ScaleDistributionConfig().type(common.ScaleDistribution.LINEAR))
        .calculate(False)
        .cell_gap(1)
        .cell_values(heatmap.CellValues().unit("short"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .exponent(0.5)
            .fill("dark-orange")
            .reverse(False)
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .steps(64)
        )
        .exemplars_color("rgba(255,0,255,0.7)")
        .filter_values(heatmap.FilterValueRange().le(1e-09))
        .show_legend()
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .mode(common.TooltipDisplayMode.SINGLE)
        .show_color_scale(False)
        .hide_y_histogram()
        .y_axis(
            heatmap.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).reverse(False).unit("s")
        )
        .targets(
            [
                prom(
                    f"sum by (le) (increase(pgsage_query_duration_seconds_bucket{{{DB}}}{RATE}))",
                    "{{le}}",
                    fmt=pm.PromQueryFormat.HEATMAP,
                )
            ]
        )
        .span(12)
        .height(8),
        ts_panel(
            "Queries per second by client application",
            "application_name mapped to a closed set of client classes.",
            [prom(f"sum by (app) (rate(pgsage_queries_total{{{DB}}}{RATE}))", "{{app}}")],
            unit="reqps",
            stack=True,
        ),
        ts_panel(
            "Errors by SQLSTATE class",
            "Failed statements per second by the 2-character SQLSTATE class (22 data exception,"
            " 23 integrity, 40 rollback, 42 syntax/access, 57 operator intervention...).",
            [
                prom(
                    f"sum by (sqlstate_class) (rate(pgsage_query_errors_total{RATE}))",
                    "{{sqlstate_class}}",
                )
            ],
            unit="reqps",
            stack=True,
            w=8,
        ),
        ts_panel(
            "Error ratio by database",
            "Recording rule pgsage:query_errors:ratio_rate5m; the alert fires above 5%.",
            [prom(f"pgsage:query_errors:ratio_rate5m{{{DB}}}", "{{database}}")],
            unit="percentunit",
            steps=((None, "green"), (0.05, "red")),
            threshold_line=True,
            w=8,
        ),
        ts_panel(
            "Rows returned per second",
            "Rows reported by CommandComplete tags, by command.",
            [
                prom(
                    f"sum by (command) (rate(pgsage_rows_returned_total{{{DB}}}{RATE}))",
                    "{{command}}",
                )
            ],
            stack=True,
            w=8,
        ),
        ts_panel(
            "Transactions per second by outcome",
            "Transactions seen from ReadyForQuery status changes.",
            [
                prom(
                    f"sum by (outcome) (rate(pgsage_transactions_total{{{DB}}}{RATE}))",
                    "{{outcome}}",
                )
            ],
            stack=True,
        ),
        ts_panel(
            "Protocol features in use",
            "Prepared statements parsed, portal suspensions (row-limited fetches) and COPY.",
            [
                prom(
                    f"sum by (kind) (rate(pgsage_prepared_statements_parsed_total{RATE}))",
                    "parse {{kind}}",
                ),
                prom(
                    f"sum(rate(pgsage_portal_suspensions_total{RATE}))", "portal suspensions", "B"
                ),
                prom(
                    f"sum by (direction) (rate(pgsage_copy_operations_total{RATE}))",
                    "COPY {{direction}}",
                    "C",
                ),
            ],
        ),
        ts_panel(
            "Statements by latency class: fast / medium / slow",
            "Statements per second taking under 100 ms (fast), 100 ms to 1 s (medium) and over"
            " 1 s (slow).",
            [
                prom(fast, "fast (< 100 ms)"),
                prom(f"{under_1s} - {fast}", "medium (100 ms - 1 s)", "B"),
                prom(f"{count} - {under_1s}", "slow (> 1 s)", "C"),
            ],
            unit="reqps",
            stack=True,
        ),
        sql_table(
            "Failed statements",
            "The latest failed statements in the time range, from metadata.query_logs"
            " (normalised text: literals are $n unless log_parameters is on).",
            failed,
            units={"duration": "s"},
        ),
    ]


def _top_by(expr: str) -> str:
    return f"{expr} and on (fingerprint) topk(20, {_total_time()})"


def _total_time(where: str = '{fingerprint!="other"}') -> str:
    return (
        "sum by (fingerprint) "
        f"(increase(pgsage_fingerprint_duration_seconds_total{where}[$__range]))"
    )


def top_fingerprints() -> list[cogbuilder.Builder[Any]]:
    calls = "sum by (fingerprint) (increase(pgsage_fingerprint_calls_total[$__range]))"
    rows = "sum by (fingerprint) (increase(pgsage_fingerprint_rows_total[$__range]))"
    mean = (
        f"({_total_time('')} / sum by (fingerprint)"
        " (increase(pgsage_fingerprint_calls_total[$__range]) > 0))"
    )
    table_fmt = pm.PromQueryFormat.TABLE
    by_calls = """
        SELECT fingerprint, calls, total_time_ms / 1000.0 AS "total time",
               mean_time_ms / 1000.0 AS "mean time", p95_ms / 1000.0 AS "p95", errors, rows,
               left(normalized_text, 300) AS "statement"
        FROM metadata.query_stats
        WHERE NOT is_catalog
        ORDER BY calls DESC LIMIT 20
    """
    gauge_cell = dm.DynamicConfigValue(
        id_val="custom.cellOptions", value={"type": "gauge", "mode": "basic"}
    )
    return [
        db.Row("Top fingerprints"),
        table.Panel()
        .title("Top fingerprints by total time")
        .description(
            "Statement shapes (libpg_query fingerprints) with the most execution time in the"
            " selected range. The SQL text is in the admin console (SHOW QUERIES) and"
            " metadata.query_stats, never in a label."
        )
        .datasource(PROM)
        .align(common.FieldTextAlignment.AUTO)
        .cell_options(common.TableAutoCellOptions())
        .inspect(False)
        .thresholds(thresholds(GREEN))
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .override_by_name(
            "total time", [dm.DynamicConfigValue(id_val="unit", value="s"), gauge_cell]
        )
        .override_by_name("mean time", [dm.DynamicConfigValue(id_val="unit", value="s")])
        .override_by_name("calls", [dm.DynamicConfigValue(id_val="unit", value="short")])
        .override_by_name("rows", [dm.DynamicConfigValue(id_val="unit", value="short")])
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .footer(cb.TableFooterOptions().show(False).reducer(["sum"]).fields([]).count_rows(False))
        .sort_by([cb.TableSortByFieldState().display_name("total time").desc(True)])
        .targets(
            [
                prom(f"topk(20, {_total_time()})", instant=True, fmt=table_fmt),
                prom(_top_by(calls), ref="B", instant=True, fmt=table_fmt),
                prom(_top_by(rows), ref="C", instant=True, fmt=table_fmt),
                prom(_top_by(mean), ref="D", instant=True, fmt=table_fmt),
            ]
        )
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "indexByName": {
                        "fingerprint": 0,
                        "Value #A": 1,
                        "Value #B": 2,
                        "Value #D": 3,
                        "Value #C": 4,
                    },
                    "renameByName": {
                        "Value #A": "total time",
                        "Value #B": "calls",
                        "Value #C": "rows",
                        "Value #D": "mean time",
                    },
                },
            )
        )
        .span(16)
        .height(10),
        ts_panel(
            "Fingerprints tracked and evicted",
            "Fingerprints held in memory; evictions mean the per-fingerprint view is truncated"
            " (raise max_fingerprints).",
            [
                prom("sum(pgsage_fingerprints_tracked)", "tracked"),
                prom(f"sum(rate(pgsage_fingerprints_evicted_total{RATE}))", "evicted / s", "B"),
            ],
            w=8,
            h=10,
        ).override_by_name(
            "evicted / s",
            [dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"), fixed("red")],
        ),
        sql_table(
            "Top fingerprints by calls",
            "Most executed statement shapes since they were first seen, with their text"
            " (metadata.query_stats, written by the query log worker).",
            by_calls,
            units={"total time": "s", "mean time": "s", "p95": "s"},
            w=24,
        ),
    ]


def connections_traffic_log() -> list[cogbuilder.Builder[Any]]:
    return [
        db.Row("Connections"),
        ts_panel(
            "Active connections by database",
            "Client sessions and their upstream connections (session mode: one each).",
            [
                prom(
                    f"sum by (database) (pgsage_client_connections_active{{{DB}}})",
                    "client {{database}}",
                ),
                prom(
                    f"sum by (database) (pgsage_server_connections_active{{{DB}}})",
                    "server {{database}}",
                    "B",
                ),
            ],
            w=8,
        ),
        ts_panel(
            "Connections opened and failed",
            "Client sessions admitted per second (by TLS) and failed connections by reason.",
            [
                prom(
                    f"sum by (tls) (rate(pgsage_client_connections_opened_total{RATE}))",
                    "opened tls={{tls}}",
                ),
                prom(
                    f"sum by (reason) (rate(pgsage_client_connection_errors_total{RATE}))",
                    "failed {{reason}}",
                    "B",
                ),
            ],
            w=8,
        ).override_by_regexp("failed .*", [fixed("red")]),
        ts_panel(
            "Upstream connect time",
            "Time to open the upstream connection for a new client session.",
            quantiles("pgsage_server_connect_duration_seconds", ("0.50", "0.99")),
            unit="s",
            w=8,
        ),
        db.Row("Traffic"),
        ts_panel(
            "Client bytes in / out",
            "Bytes received from clients (up) and sent to clients (down).",
            [
                prom(f"sum(rate(pgsage_client_received_bytes_total{RATE}))", "from clients"),
                prom(f"sum(rate(pgsage_client_sent_bytes_total{RATE}))", "to clients", "B"),
            ],
            unit="Bps",
            min_value=None,
        ).override_by_name(
            "to clients", [dm.DynamicConfigValue(id_val="custom.transform", value="negative-Y")]
        ),
        ts_panel(
            "Upstream bytes in / out",
            "Bytes sent to PostgreSQL (up) and received from it (down).",
            [
                prom(f"sum(rate(pgsage_server_sent_bytes_total{RATE}))", "to upstream"),
                prom(f"sum(rate(pgsage_server_received_bytes_total{RATE}))", "from upstream", "B"),
            ],
            unit="Bps",
            min_value=None,
        ).override_by_name(
            "from upstream",
            [dm.DynamicConfigValue(id_val="custom.transform", value="negative-Y")],
        ),
        db.Row("Query log"),
        ts_panel(
            "Query log rows written and dropped",
            "Rows COPYed into metadata.query_logs per second, and records dropped (queue full"
            " or metadata database unreachable). Any drop means the log is incomplete.",
            [
                prom(f"sum(rate(pgsage_querylog_written_total{RATE}))", "written"),
                prom(
                    f"sum by (reason) (rate(pgsage_querylog_dropped_total{RATE}))",
                    "dropped {{reason}}",
                    "B",
                ),
            ],
        ).override_by_regexp("dropped .*", [fixed("red")]),
        ts_panel(
            "Query log queue",
            "Records waiting in memory for the next batched COPY.",
            [prom("sum(pgsage_querylog_queue_records)", "queued")],
        ),
    ]


def models() -> list[cogbuilder.Builder[Any]]:
    ratio = f"sum by (le) (rate(pgsage_cost_prediction_log_ratio_bucket{RATE}))"
    training = """
        SELECT coalesce(training_end, created_at) AS "trained", model_name AS "model", version,
               status, row_count AS "rows",
               coalesce(metrics->>'qerror_p50', metrics->>'test_qerror_p50',
                        metrics->>'wape', metrics->>'silhouette', metrics->>'f1') AS "metric",
               left(reason, 200) AS "reason"
        FROM ml.model_registry
        ORDER BY created_at DESC LIMIT 50
    """
    return [
        db.Row("Models"),
        ts_panel(
            "Cost model: predicted / actual latency",
            "Quantiles of predicted / actual latency of the executions the active cost model"
            " predicted (exp of pgsage_cost_prediction_log_ratio). 1 is exact; above 1 the"
            " model overestimates.",
            [
                prom(f"exp(histogram_quantile(0.10, {ratio}))", "p10"),
                prom(f"exp(histogram_quantile(0.50, {ratio}))", "p50", "B"),
                prom(f"exp(histogram_quantile(0.90, {ratio}))", "p90", "C"),
            ],
            unit="none",
            steps=((None, "green"),),
            min_value=None,
            w=8,
        ),
        ts_panel(
            "Cost model q-error over time",
            "Median q-error of the recent cost predictions (1 = perfect): model drift shows"
            " here first, and the retrainer acts on it.",
            [prom("max by (instance) (pgsage_cost_prediction_qerror)", "q-error {{instance}}")],
            unit="none",
            steps=((None, "green"), (4, "red")),
            threshold_line=True,
            w=8,
        ),
        ts_panel(
            "Workload forecast vs actual",
            "Statements per second the active forecaster expects over the next hour (all"
            " clusters of the logged workload) against the statements per second going"
            " through pgsage to the selected databases.",
            [
                prom(
                    'sum(pgsage_forecast_queries{cluster="total",horizon="1h"}) / 3600',
                    "forecast (next hour)",
                ),
                prom(f"sum(rate(pgsage_queries_total{{{DB}}}{RATE}))", "actual", "B"),
            ],
            unit="reqps",
            w=8,
        ),
        sql_table(
            "Training history",
            "Every model version in ml.model_registry: when it was trained, on how many rows,"
            " its headline test metric, whether it is active and why.",
            training,
            w=24,
        ),
    ]


def optimisation() -> list[cogbuilder.Builder[Any]]:
    recommendations = """
        SELECT id, created_at AS "proposed", target AS "table", status,
               detail->>'ddl' AS "ddl", (detail->>'est_gain_ms')::float8 AS "estimated gain",
               measured_before_ms AS "before", measured_after_ms AS "after",
               (detail->'validation'->>'speedup')::float8 AS "speedup"
        FROM metadata.optimization_history
        WHERE kind = 'index' AND action = 'recommend'
        ORDER BY id DESC LIMIT 50
    """
    applied = """
        SELECT created_at AS "time", kind, action, status, target,
               coalesce(detail->>'ddl', detail->>'arm', detail->>'reason') AS "what",
               measured_before_ms AS "before", measured_after_ms AS "after",
               measured_before_ms / nullif(measured_after_ms, 0) AS "speedup"
        FROM metadata.optimization_history
        WHERE action <> 'recommend'
        ORDER BY created_at DESC, id DESC LIMIT 100
    """
    ms = {"estimated gain": "ms", "before": "ms", "after": "ms", "speedup": "x"}
    return [
        db.Row("Optimisation"),
        sql_table(
            "Index recommendations",
            "The index advisor's recommendations and their status (proposed, applied,"
            " validated, reverted, rejected), from metadata.optimization_history.",
            recommendations,
            units=ms,
        ),
        sql_table(
            "Applied optimisations and measured gains",
            "Applications, validations, reverts and rejections of indexes and plan steering"
            " (A/B results against the holdout), with the measured median before and after.",
            applied,
            units=ms,
        ),
        ts_panel(
            "Plan steering decisions",
            "Steered statements per second by mode: steer (a non-stock arm), stock, holdout"
            " (the stock plan on purpose, for the A/B test), dry_run.",
            [
                prom(
                    f"sum by (mode) (rate(pgsage_steering_decisions_total{RATE}))",
                    "{{mode}}",
                )
            ],
            unit="reqps",
            stack=True,
            w=8,
        ),
        ts_panel(
            "Plan steering events",
            "Arms retired, converged, validated and withdrawn, and templates with steering state.",
            [
                prom(
                    f"sum by (event) (increase(pgsage_steering_events_total{RATE}))",
                    "{{event}}",
                ),
                prom("sum(pgsage_steering_templates)", "templates", "B"),
            ],
            w=8,
        ).override_by_name(
            "templates", [dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right")]
        ),
        ts_panel(
            "Admission: long lane",
            "Concurrent long statements allowed (adaptive limit), running and queued.",
            [
                prom("sum(pgsage_admission_limit)", "limit"),
                prom("sum(pgsage_admission_running)", "running", "B"),
                prom("sum(pgsage_admission_queued)", "queued", "C"),
            ],
            w=8,
        ).override_by_name("limit", [fixed("red")]),
        ts_panel(
            "Admission decisions",
            "Statements per second by lane (short, long) and outcome.",
            [
                prom(
                    f"sum by (lane, outcome) (rate(pgsage_admission_decisions_total{RATE}))",
                    "{{lane}} {{outcome}}",
                )
            ],
            unit="reqps",
            stack=True,
            w=8,
        ),
        ts_panel(
            "Result cache hits, misses and evictions",
            "Cacheable reads answered from the cache or sent upstream, responses stored, and"
            " entries evicted by reason.",
            [
                prom(f"sum(rate(pgsage_cache_hits_total{RATE}))", "hits"),
                prom(f"sum(rate(pgsage_cache_misses_total{RATE}))", "misses", "B"),
                prom(f"sum(rate(pgsage_cache_stores_total{RATE}))", "stores", "C"),
                prom(
                    f"sum by (reason) (rate(pgsage_cache_evictions_total{RATE}))",
                    "evicted {{reason}}",
                    "D",
                ),
            ],
            unit="reqps",
            w=8,
        ).override_by_regexp("evicted .*", [fixed("red")]),
        ts_panel(
            "Result cache memory",
            "Bytes of responses held in memory, and entries.",
            [
                prom("sum(pgsage_cache_bytes)", "bytes"),
                prom("sum(pgsage_cache_entries)", "entries", "B"),
            ],
            unit="bytes",
            w=8,
        ).override_by_name(
            "entries",
            [
                dm.DynamicConfigValue(id_val="unit", value="short"),
                dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            ],
        ),
    ]


def upstream_and_host() -> list[cogbuilder.Builder[Any]]:
    return [
        db.Row("Upstream PostgreSQL"),
        statetimeline.Panel()
        .title("Upstream health")
        .description("pgsage_upstream_up per instance: the last health probe (sampler round trip).")
        .datasource(PROM)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .mappings(list(UP_DOWN))
        .thresholds(thresholds(((None, "red"), (1, "green"))))
        .fill_opacity(70)
        .line_width(0)
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .align_value(common.TimelineValueAlignment.LEFT)
        .row_height(0.9)
        .legend(
            cb.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(False)
        )
        .tooltip(
            cb.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.SINGLE)
            .sort(common.SortOrder.NONE)
        )
        .targets([prom("min by (instance) (pgsage_upstream_up)", "{{instance}}")])
        .span(8)
        .height(8),
        ts_panel(
            "Buffer cache hit ratio",
            "blks_hit / (blks_hit + blks_read) over all databases (pg_stat_database).",
            [prom("avg(pgsage_upstream_cache_hit_ratio)", "hit ratio")],
            unit="percentunit",
            steps=((None, "red"), (0.9, "green")),
            threshold_line=True,
            min_value=None,
            max_value=1,
            w=8,
        ),
        ts_panel(
            "Backends by state",
            "Upstream client backends (pg_stat_activity): active, idle, waiting on locks.",
            [prom("sum by (state) (pgsage_upstream_backends)", "{{state}}")],
            w=8,
        ),
        db.Row("Host and runtime"),
        ts_panel(
            "Host CPU",
            "Host CPU utilisation (psutil).",
            [prom("avg by (instance) (pgsage_host_cpu_ratio)", "{{instance}}")],
            unit="percentunit",
            max_value=1,
            w=6,
        ),
        ts_panel(
            "Memory",
            "Host memory in use, and pgsage's own resident set.",
            [
                prom("sum by (instance) (pgsage_host_memory_used_bytes)", "host used {{instance}}"),
                prom(
                    'sum by (instance) (process_resident_memory_bytes{job="pgsage"})',
                    "pgsage RSS {{instance}}",
                    "B",
                ),
            ],
            unit="bytes",
            w=6,
        ),
        ts_panel(
            "Event loop lag",
            "Delay of a 250 ms asyncio timer: everything on the loop (every client) waits this"
            " long. The alert fires when p99 stays above 100 ms.",
            quantiles("pgsage_event_loop_lag_seconds", ("0.50", "0.99")),
            unit="s",
            steps=((None, "green"), (0.1, "red")),
            threshold_line=True,
            w=6,
        ),
        ts_panel(
            "Proxy overhead",
            "Time spent inside pgsage per relayed chunk (sampled): what the proxy adds to every"
            " statement.",
            quantiles("pgsage_proxy_overhead_seconds", ("0.50", "0.99")),
            unit="s",
            w=6,
        ),
    ]


def anomalies() -> list[cogbuilder.Builder[Any]]:
    incidents = """
        SELECT created_at AS "detected", incident_id AS "incident", kind, severity,
               open, acknowledged, executions, impact_ms AS "impact", score,
               coalesce(model_version, 'cold rules') AS "model", description
        FROM metadata.anomalies
        WHERE $__timeFilter(window_end) OR open
        ORDER BY created_at DESC LIMIT 100
    """
    return [
        db.Row("Anomalies"),
        ts_panel(
            "Anomalies detected",
            "Anomalous executions per second by kind (latency, rate_burst, error_burst,"
            " heavy_unseen) and the severity of their incident.",
            [
                prom(
                    f"sum by (kind, severity) (rate(pgsage_anomalies_total{RATE}))",
                    "{{kind}} {{severity}}",
                )
            ],
            unit="reqps",
            stack=True,
            w=8,
        ),
        ts_panel(
            "Open anomaly incidents",
            "Incidents still open: an incident closes after anomaly_incident_gap without a new"
            " anomalous execution.",
            [prom("sum(pgsage_anomaly_incidents_open)", "open")],
            w=8,
        ),
        sql_table(
            "Anomaly incidents",
            "The anomaly feed from metadata.anomalies: open incidents and those of the time"
            " range. Acknowledge with ACK ANOMALY <incident> in the admin console.",
            incidents,
            units={"impact": "ms"},
            w=8,
        ),
    ]


# ---------------------------------------------------------------- the board


def build() -> dict[str, Any]:
    board = (
        db.Dashboard("pgsage")
        .uid("pgsage-overview")
        .description(
            "pgsage: PostgreSQL wire-protocol proxy. Traffic, latency, errors, query log,"
            " learned models, optimisations, upstream and runtime health."
        )
        .tags(["pgsage", "postgresql", "proxy"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .timepicker(db.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m", "15m"]))
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            db.DatasourceVariable("metadata").label("Metadata (PostgreSQL)").type(PG_TYPE)
        )
        .with_variable(
            db.QueryVariable("database")
            .label("Database")
            .datasource(PROM)
            .query("label_values(pgsage_queries_total, database)")
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
            .multi(True)
        )
        .annotation(
            db.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .built_in(True)
        )
        .annotation(
            db.AnnotationQuery()
            .name("pgsage alerts")
            .datasource(PROM)
            .enable(True)
            .hide(False)
            .icon_color("red")
            .expr('ALERTS{alertname=~"Pgsage.*", alertstate="firing"}')
        )
    )
    for section in (
        overview,
        queries,
        top_fingerprints,
        models,
        optimisation,
        connections_traffic_log,
        upstream_and_host,
        anomalies,
    ):
        for item in section():
            board = board.with_row(item) if isinstance(item, db.Row) else board.with_panel(item)
    model = board.build()
    for i, panel in enumerate(model.panels or [], start=1):
        panel.id_val = i
    out: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    # Prometheus annotation fields the SDK's AnnotationQuery does not model
    out["annotations"]["list"][1].update(
        {"step": "30s", "titleFormat": "{{alertname}}", "textFormat": "{{database}}{{instance}}"}
    )
    return out


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python config/grafana/board.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
