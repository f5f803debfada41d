"""The generated references in docs/reference are current: every setting and every metric of
the code is documented (regenerate with `pgsage docs` after adding one)."""

from __future__ import annotations

from pathlib import Path

from proxy.docs import all_metrics, configuration_md, metrics_md
from proxy.settings import Settings

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference"


def test_configuration_reference_is_current() -> None:
    committed = (REFERENCE / "configuration.md").read_text()
    assert committed == configuration_md(), "docs/reference/configuration.md is stale: pgsage docs"
    for key in Settings.model_fields:
        assert f"| `{key}` |" in committed, f"setting {key} is not documented"


def test_metrics_reference_is_current() -> None:
    committed = (REFERENCE / "metrics.md").read_text()
    assert committed == metrics_md(), "docs/reference/metrics.md is stale: run pgsage docs"
    families, _ = all_metrics()
    names = [f.name for f in families if f.name.startswith("pgsage_")]
    assert len(names) > 50
    for name in names:
        assert f"`{name}" in committed, f"metric {name} is not documented"
