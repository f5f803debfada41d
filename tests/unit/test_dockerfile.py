"""The image the compose file builds exists and carries every package of the distribution."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_builds_the_repository_dockerfile() -> None:
    compose = yaml.safe_load((REPO / "config" / "docker-compose.yml").read_text())
    build = compose["services"]["pgsage"]["build"]
    dockerfile = (REPO / "config" / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == REPO / "Dockerfile" and dockerfile.is_file()


def test_dockerfile_copies_every_package_and_serves() -> None:
    text = (REPO / "Dockerfile").read_text()
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert f"COPY {package} ./{package}" in text, package
    assert 'CMD ["pgsage", "serve"]' in text and "EXPOSE 6432 9930" in text
    assert "USER pgsage" in text  # not root
