"""Runtime changes of settings: `SET key = value` in the admin console, RELOAD and SIGHUP.

Only keys in RELOADABLE change at run time; the others need a restart (RELOAD says which).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .settings import Settings, SettingsError, load_settings

RELOADABLE = frozenset(
    (
        "max_client_connections",
        "connect_timeout",
        "startup_timeout",
        "idle_timeout",
        "shutdown_timeout",
        "log_parameters",
        "querylog_flush_interval",
        "stats_flush_interval",
        "system_sample_interval",
        "index_sample_interval",
        "top_k_fingerprints",
        "querylog_retention_days",
        "admin_users",
        "clock_speed",
        "retrain_interval",
        "retrain_qerror_threshold",
        "retrain_min_gap",
        "retrain_models",
        "clock_start",
        "cache_ttl",
        "cache_min_ms",
        "cache_admit_after",
        "admission_short_ms",
        "admission_short_quantile",
        "admission_min_short_ms",
        "admission_max_short_ms",
        "admission_min_observations",
        "admission_min_limit",
        "admission_max_limit",
        "admission_queue_size",
        "admission_queue_timeout",
        "admission_adjust_interval",
        "admission_slowdown",
        "admission_saturation",
        "admission_upstream_cores",
        "admission_probe_interval",
        "forecast_refresh_interval",
        "rewrite_active",
        "rewrite_context_interval",
        "rewrite_dry_run",
        "rewrite_holdout",
        "rewrite_disabled_rules",
        "rewrite_exclude",
        "rewrite_literal_sets",
        "steering_active",
        "steering_dry_run",
        "steering_warm_start",
        "steering_holdout",
        "steering_trial_holdout",
        "steering_min_ms",
        "steering_disabled_arms",
        "steering_exclude",
        "steering_ab_min_samples",
        "steering_ab_min_holdout",
        "steering_ab_alpha",
        "steering_min_gain",
        "steering_eval_interval",
        "advisor_auto",
        "advisor_interval",
        "advisor_budget_share",
    )
)
_SECRET_WORDS = ("password", "token", "secret")


def _shown(key: str, value: Any) -> str:
    if any(w in key for w in _SECRET_WORDS) and value:
        return "********"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def config_items(settings: Settings) -> list[tuple[str, str, str, bool]]:
    items = []
    for key, field in type(settings).model_fields.items():
        default = field.get_default(call_default_factory=True)
        items.append(
            (key, _shown(key, getattr(settings, key)), _shown(key, default), key in RELOADABLE)
        )
    return items


def set_setting(settings: Settings, key: str, value: str | list[str]) -> str | None:
    """Validate and apply one key; the problem as one line, or None."""
    if key not in type(settings).model_fields:
        return f"unknown setting {key!r}"
    if key not in RELOADABLE:
        return f"{key} cannot be changed at run time; restart pgsage to change it"
    parsed: Any = value
    annotation = str(type(settings).model_fields[key].annotation)
    if annotation.startswith("list[") and isinstance(value, str):
        try:  # ["a", "b"] as JSON, else a,b,c (or empty)
            parsed = json.loads(value) if value.lstrip().startswith("[") else None
        except ValueError:
            return f"{key}: not a JSON list: {value[:60]!r}"
        if parsed is None:
            parsed = [v.strip() for v in value.split(",") if v.strip()]
    try:
        checked = Settings.model_validate({**settings.model_dump(), key: parsed})
    except ValidationError as exc:
        err = exc.errors()[0]
        return f"{key}: {err['msg']}"
    setattr(settings, key, getattr(checked, key))
    return None


def reload(
    settings: Settings,
    overrides: dict[str, Any],
    adjust: Callable[[Settings], Settings] | None = None,
) -> tuple[str | None, list[str]]:
    """Re-read file and environment (CLI flags still win); apply reloadable changes.
    `adjust`: what this process makes of the configuration (a worker's share and port)."""
    try:
        fresh = load_settings(None, **overrides)
    except SettingsError as exc:
        return f"configuration not reloaded: {exc}", []
    if adjust is not None:
        fresh = adjust(fresh)
    changed, restart = [], []
    for key in type(settings).model_fields:
        new, old = getattr(fresh, key), getattr(settings, key)
        if new == old:
            continue
        if key in RELOADABLE:
            setattr(settings, key, new)
            changed.append(key)
        else:
            restart.append(key)
    if restart:
        return f"reloaded {changed}; restart needed for {sorted(restart)}", changed
    return None, changed
