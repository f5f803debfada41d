"""pgsage's own Python children import pgsage, not a folder of the directory it runs in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from proxy.child import PYTHON

CHECK = (
    "import models.train, models.cost, proxy.telemetry.logworker as w; "
    "print(models.cost.CostModel.__name__, w.__name__)"
)


def _decoys(cwd: Path) -> None:
    # what a model directory called `models` holds after `pgsage train cost` (the benchmark's
    # is its working directory's models/), and a stray `proxy` folder
    (cwd / "models" / "cost" / "v1").mkdir(parents=True)
    (cwd / "models" / "cost" / "v1" / "model.txt").write_text("tree\n")
    (cwd / "proxy" / "telemetry").mkdir(parents=True)


def test_a_child_started_among_decoy_folders_imports_the_real_packages(tmp_path: Path) -> None:
    _decoys(tmp_path)
    out = subprocess.run(
        [*PYTHON, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["CostModel", "proxy.telemetry.logworker"]


def test_without_safe_path_the_decoys_shadow_the_packages(tmp_path: Path) -> None:
    """What `python -m` did before: the current directory first on sys.path."""
    _decoys(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr, out.stderr[-2000:]
