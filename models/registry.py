"""The model registry: `ml.model_registry` rows plus an artifact folder outside the code.

Each version of a model lives in ``<model_dir>/<name>/v<version>/``: ``model.txt`` (LightGBM's
text format), ``card.json`` (features, params, metrics, data window, library versions) and
``card.md`` (the same, for people). The folder is `model_dir()`: an explicit argument, else
``$PGSAGE_MODEL_DIR``, else ``$XDG_DATA_HOME/pgsage/models`` (``~/.local/share/pgsage/models``).

Life cycle (`status`): ``candidate`` (registered, not serving: `reason` says why), ``active``
(the one serving; `is_active` mirrors it), ``retired`` (was active, superseded: `rollback`
returns to the latest of these) and ``failed`` (a training run that produced no model; the active
version keeps serving). All changes of the active version happen in one transaction.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_KEEP = 5


def model_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where artifacts live (never inside the code packages)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("PGSAGE_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgsage" / "models"


@dataclass(frozen=True)
class Entry:
    """One row of ml.model_registry."""

    model_id: int
    name: str
    version: int
    status: str
    is_active: bool
    created_at: datetime
    artifact_path: str | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    features: list[str]
    card: dict[str, Any]
    training_start: datetime | None
    training_end: datetime | None
    row_count: int | None
    reason: str | None

    def summary(self) -> dict[str, Any]:
        m = self.metrics.get("test", self.metrics)
        return {
            "model_id": self.model_id,
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "is_active": self.is_active,
            "created_at": self.created_at.isoformat(),
            "rows": self.row_count,
            "qerror_p90": m.get("qerror_p90"),
            "r2_log": m.get("r2_log"),
            "reason": self.reason,
        }


_COLUMNS = (
    "model_id, model_name, version, status, is_active, created_at, artifact_path, metrics,"
    " params, features, card, training_start, training_end, row_count, reason"
)


def _entry(row: Any) -> Entry:
    def js(v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    return Entry(
        model_id=row["model_id"],
        name=row["model_name"],
        version=row["version"],
        status=row["status"],
        is_active=row["is_active"],
        created_at=row["created_at"],
        artifact_path=row["artifact_path"],
        metrics=js(row["metrics"]) or {},
        params=js(row["params"]) or {},
        features=js(row["features"]) or [],
        card=js(row["card"]) or {},
        training_start=row["training_start"],
        training_end=row["training_end"],
        row_count=row["row_count"],
        reason=row["reason"],
    )


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, no artifact...)."""


class Registry:
    """ml.model_registry over an asyncpg connection, with artifacts under `root`."""

    def __init__(self, conn: Any, root: Path | None = None, keep: int = DEFAULT_KEEP) -> None:
        self.conn = conn
        self.root = root if root is not None else model_dir()
        self.keep = keep

    def artifact_dir(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version}"

    async def next_version(self, name: str) -> int:
        v = await self.conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM ml.model_registry WHERE model_name = $1",
            name,
        )
        return int(v)

    async def list(self, name: str | None = None) -> list[Entry]:
        rows = await self.conn.fetch(
            f"SELECT {_COLUMNS} FROM ml.model_registry"
            " WHERE $1::text IS NULL OR model_name = $1 ORDER BY model_name, version DESC",
            name,
        )
        return [_entry(r) for r in rows]

    async def get(self, name: str, version: int) -> Entry:
        row = await self.conn.fetchrow(
            f"SELECT {_COLUMNS} FROM ml.model_registry WHERE model_name = $1 AND version = $2",
            name,
            version,
        )
        if row is None:
            raise RegistryError(f"no version {version} of model {name!r}")
        return _entry(row)

    async def active(self, name: str) -> Entry | None:
        row = await self.conn.fetchrow(
            f"SELECT {_COLUMNS} FROM ml.model_registry WHERE model_name = $1 AND is_active",
            name,
        )
        return None if row is None else _entry(row)

    async def register(
        self,
        name: str,
        version: int,
        card: dict[str, Any],
        *,
        activate: bool,
        reason: str,
        status: str | None = None,
    ) -> Entry:
        """Insert a version whose artifacts are already written (or a failed run, without)."""
        window = card.get("data_window") or {}
        art = self.artifact_dir(name, version)
        state = status or ("active" if activate else "candidate")
        async with self.conn.transaction():
            if activate:
                await self._deactivate(name)
            await self.conn.execute(
                """
                INSERT INTO ml.model_registry (model_name, version, status, is_active,
                    artifact_path, metrics, params, features, data_snapshot, card,
                    training_start, training_end, row_count, reason, activated_at)
                VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9::jsonb,
                        $10::jsonb, $11::timestamptz, $12::timestamptz, $13, $14,
                        CASE WHEN $4 THEN now() END)
                """,
                name,
                version,
                state,
                activate,
                str(art) if art.exists() else None,
                _dumps(card.get("metrics", {})),
                _dumps(card.get("params", {})),
                _dumps(card.get("features", [])),
                _dumps(window),
                _dumps(card),
                _ts(window.get("start")),
                _ts(window.get("end")),
                window.get("rows"),
                reason,
            )
        await self.prune(name)
        return await self.get(name, version)

    async def activate(self, name: str, version: int, reason: str = "activated by hand") -> Entry:
        entry = await self.get(name, version)
        if entry.status == "failed" or not entry.artifact_path:
            raise RegistryError(f"{name} v{version} has no model to activate")
        if not Path(entry.artifact_path).exists():
            raise RegistryError(f"{name} v{version}: artifact {entry.artifact_path} is missing")
        async with self.conn.transaction():
            await self._deactivate(name)
            await self.conn.execute(
                "UPDATE ml.model_registry SET status = 'active', is_active = true,"
                " activated_at = now(), reason = $3 WHERE model_name = $1 AND version = $2",
                name,
                version,
                reason,
            )
        return await self.get(name, version)

    async def rollback(self, name: str) -> Entry:
        """Re-activate the most recently active version before the current one."""
        current = await self.active(name)
        row = await self.conn.fetchrow(
            "SELECT version FROM ml.model_registry WHERE model_name = $1 AND status = 'retired'"
            " AND artifact_path IS NOT NULL AND ($2::int IS NULL OR version <> $2)"
            " ORDER BY activated_at DESC NULLS LAST, version DESC LIMIT 1",
            name,
            current.version if current else None,
        )
        if row is None:
            raise RegistryError(f"model {name!r} has no earlier active version to roll back to")
        entry = await self.activate(name, row["version"], "rollback")
        if current is not None:
            # the version rolled away from must not be the next rollback target
            await self.conn.execute(
                "UPDATE ml.model_registry SET status = 'candidate', reason = 'rolled back'"
                " WHERE model_name = $1 AND version = $2",
                name,
                current.version,
            )
        return entry

    async def _deactivate(self, name: str) -> None:
        await self.conn.execute(
            "UPDATE ml.model_registry SET status = 'retired', is_active = false"
            " WHERE model_name = $1 AND is_active",
            name,
        )

    async def prune(self, name: str) -> list[int]:
        """Keep the newest `keep` versions (and always the active one); drop the rest."""
        rows = await self.conn.fetch(
            "DELETE FROM ml.model_registry WHERE model_name = $1 AND NOT is_active"
            " AND version NOT IN (SELECT version FROM ml.model_registry WHERE model_name = $1"
            " ORDER BY version DESC LIMIT $2) RETURNING version, artifact_path",
            name,
            self.keep,
        )
        for r in rows:
            if r["artifact_path"] and Path(r["artifact_path"]).is_relative_to(self.root):
                shutil.rmtree(r["artifact_path"], ignore_errors=True)
        return sorted(r["version"] for r in rows)


def _dumps(value: Any) -> str:
    from .cost import to_json

    return to_json(value)


def _ts(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def card_markdown(card: dict[str, Any]) -> str:
    """The model card for people: what it is, what it was trained on, how good it is."""
    m = card.get("metrics", {})
    lines = [
        f"# {card.get('name')} v{card.get('version')}",
        "",
        f"{card.get('description', '')}",
        "",
        f"- created: {card.get('created_at')}",
        f"- status: {card.get('status', '')} ({card.get('reason', '')})",
        f"- data window: {card.get('data_window', {}).get('start')} .."
        f" {card.get('data_window', {}).get('end')}, {card.get('data_window', {}).get('rows')}"
        f" rows, {card.get('data_window', {}).get('fingerprints')} templates",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in card.get('libraries', {}).items())}",
        "",
        "## Accuracy (time split, test rows)",
        "",
        "| predictor | R² log | MAE share | q-error p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(card.get("name", "model"), m), *m.get("baselines", {}).items()]
    lines += [_md_row(n, r) for n, r in rows]
    held = card.get("held_out_templates", {})
    if held:
        lines += [
            "",
            f"## Held-out templates ({held.get('rows')} rows of"
            f" {len(held.get('fingerprints', []))} templates never trained on)",
            "",
            "| predictor | R² log | MAE share | q-error p50 | p90 | p99 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [_md_row(card.get("name", "model"), held)]
        lines += [_md_row(n, r) for n, r in held.get("baselines", {}).items()]
    conf = m.get("confusion")
    if conf:
        labels = conf["labels"]
        lines += ["", f"## Confusion (edges {conf['edges_ms']} ms; rows actual)", ""]
        lines += ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [
            f"| {lab} | " + " | ".join(str(v) for v in row) + " |"
            for lab, row in zip(labels, conf["matrix"], strict=True)
        ]
    imp = list(card.get("feature_importance", {}).items())[:10]
    if imp:
        lines += ["", "## Top features (gain share)", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in imp]
    worst = m.get("worst_fingerprints", [])
    if worst:
        lines += ["", "## Where it fails (worst templates)", ""]
        lines += [
            f"- `{w['fingerprint']}` q-error p50 {w['qerror_p50']} over {w['rows']} rows"
            f" (median {w['median_ms']} ms): `{w['text']}`"
            for w in worst[:5]
        ]
    lines += ["", "## Parameters", "", "```json", json.dumps(card.get("params", {})), "```", ""]
    return "\n".join(lines)


def _md_row(name: str, m: dict[str, Any]) -> str:
    def f(key: str) -> str:
        v = m.get(key)
        return "—" if v is None else f"{v:.3f}"

    keys = ("r2_log", "mae_share", "qerror_p50", "qerror_p90", "qerror_p99")
    return f"| {name} | " + " | ".join(f(k) for k in keys) + " |"
