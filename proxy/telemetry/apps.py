"""Map the client-supplied, unbounded `application_name` to a closed set usable as a label."""

from __future__ import annotations

import re

APP_CLASSES = (
    "metabase",
    "superset",
    "tableau",
    "powerbi",
    "grafana",
    "dbeaver",
    "psql",
    "jdbc",
    "pgbench",
    "other",
)

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), app)
    for pattern, app in (
        (r"metabase", "metabase"),
        (r"superset", "superset"),
        (r"tableau", "tableau"),
        (r"power ?bi|npgsql|mashup", "powerbi"),
        (r"grafana", "grafana"),
        (r"dbeaver", "dbeaver"),
        (r"^psql$", "psql"),
        (r"jdbc|pgjdbc", "jdbc"),
        (r"^pgbench$", "pgbench"),
    )
)

_cache: dict[str | None, str] = {}
_CACHE_MAX = 4096


def app_class(application_name: str | None) -> str:
    """'Metabase v0.49 [uuid]' -> 'metabase'; anything unknown -> 'other'."""
    cls = _cache.get(application_name)
    if cls is not None:
        return cls
    cls = "other"
    if application_name:
        for pattern, app in _RULES:
            if pattern.search(application_name):
                cls = app
                break
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[application_name] = cls
    return cls
