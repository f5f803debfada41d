"""Deployment files: docker compose, Grafana provisioning and the systemd unit agree with each
other and with pgsage's settings and CLI."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from proxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
COMPOSE = CONFIG / "docker-compose.yml"
DATASOURCES = CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
METADATA_DATASOURCE = CONFIG / "grafana" / "provisioning" / "datasources" / "postgresql.yml"
DASHBOARD_PROVIDERS = CONFIG / "grafana" / "provisioning" / "dashboards" / "pgsage.yml"
DASHBOARD = CONFIG / "grafana" / "dashboards" / "pgsage.json"
PROMETHEUS_CONFIG = CONFIG / "prometheus" / "prometheus.yml"
UNIT = CONFIG / "systemd" / "pgsage.service"
PGSAGE = Path(sys.executable).with_name("pgsage")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (resolved against the compose file) of bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = str((COMPOSE.parent / source).resolve())
    return out


def _pgsage_env_keys(env: dict[str, str]) -> set[str]:
    return {k.removeprefix("PGSAGE_").lower() for k in env if k.startswith("PGSAGE_")}


def _unit() -> dict[str, dict[str, list[str]]]:
    """systemd unit as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{UNIT.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{UNIT.name}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# ---------------------------------------------------------------- docker compose


def test_compose_file_has_the_four_services():
    compose = _compose()
    assert set(compose["services"]) == {"postgres", "pgsage", "prometheus", "grafana"}
    pgsage = compose["services"]["pgsage"]
    assert pgsage["command"][:2] == ["pgsage", "serve"]
    assert pgsage["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "postgres" in str(compose["services"]["postgres"]["build"]["dockerfile_inline"])
    assert "hypopg" in compose["services"]["postgres"]["build"]["dockerfile_inline"]


def test_compose_pgsage_environment_names_real_settings():
    env = _compose()["services"]["pgsage"]["environment"]
    keys = _pgsage_env_keys(env)
    assert keys, "pgsage is configured through PGSAGE_* variables"
    assert keys <= set(Settings.model_fields), keys - set(Settings.model_fields)
    upstream_host = env["PGSAGE_UPSTREAM"].rpartition(":")[0]
    assert upstream_host in _compose()["services"]


def test_compose_prometheus_config_is_the_shipped_one_but_for_the_target():
    compose = _compose()
    prometheus = compose["services"]["prometheus"]
    (config_ref,) = prometheus["configs"]
    assert config_ref["target"] == "/etc/prometheus/prometheus.yml"
    inline = yaml.safe_load(compose["configs"][config_ref["source"]]["content"])
    shipped = _yaml(PROMETHEUS_CONFIG)

    (inline_target,) = inline["scrape_configs"][0]["static_configs"][0]["targets"]
    host, _, port = inline_target.rpartition(":")
    assert host == "pgsage"
    http_port = compose["services"]["pgsage"]["environment"]["PGSAGE_HTTP"].rpartition(":")[2]
    assert port == http_port, "Prometheus scrapes the port pgsage's HTTP listens on"

    inline["scrape_configs"][0]["static_configs"][0]["targets"] = ["127.0.0.1:9930"]
    assert inline == shipped

    # rule files resolve against the config's directory, where the rules are mounted
    mounts = _mounts(prometheus)
    for rule_file in inline["rule_files"]:
        container_path = str(Path("/etc/prometheus") / rule_file)
        mount = next(t for t in mounts if container_path.startswith(t + "/"))
        host_path = Path(mounts[mount]) / Path(container_path).relative_to(mount)
        assert host_path.is_file(), host_path


def test_grafana_gets_the_provisioning_and_the_board():
    grafana = _compose()["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    assert provisioning == DATASOURCES.parent.parent
    (provider,) = _yaml(DASHBOARD_PROVIDERS)["providers"]
    board_dir = provider["options"]["path"]
    assert Path(mounts[board_dir]) == DASHBOARD.parent, "the provider reads the mounted board"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(mounts[board_dir], Path(home).relative_to(board_dir)) == DASHBOARD


# ---------------------------------------------------------------- Grafana provisioning


def test_datasource_provisioning():
    doc = _yaml(DATASOURCES)
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["uid"]
    assert ds["url"].rpartition(":")[0] == "http://prometheus"
    assert "prometheus" in _compose()["services"]
    # Grafana's $__rate_interval assumes the scrape interval it is told
    scrape_interval = _yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval


def test_metadata_datasource_provisioning_matches_the_board_and_compose():
    """The board's SQL panels read pgsage's metadata schema through $metadata: a provisioned
    PostgreSQL datasource of the type the variable asks for, on compose's database."""
    (ds,) = _yaml(METADATA_DATASOURCE)["datasources"]
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert ds["type"] == variables["metadata"]["query"] == "grafana-postgresql-datasource"
    compose = _compose()["services"]
    host, _, port = ds["url"].rpartition(":")
    assert host in compose and port == "5432"
    postgres_env = compose["postgres"]["environment"]
    assert ds["jsonData"]["database"] == postgres_env["POSTGRES_DB"]
    assert ds["user"] == postgres_env["POSTGRES_USER"]
    # the password comes from Grafana's environment, the same default as the database's
    password = ds["secureJsonData"]["password"]
    assert password.startswith("$")
    grafana_env = compose["grafana"]["environment"]
    assert grafana_env[password.lstrip("${").rstrip("}")] == postgres_env["POSTGRES_PASSWORD"]
    sql_panels = [p for p in board["panels"] if p.get("datasource", {}).get("uid") == "${metadata}"]
    assert sql_panels, "the board has panels on the metadata datasource"


def test_dashboard_provisioning():
    doc = _yaml(DASHBOARD_PROVIDERS)
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["schemaVersion"] >= 39


# ---------------------------------------------------------------- systemd


def test_systemd_unit_runs_pgsage_serve():
    unit = _unit()
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "pgsage" and argv[0].startswith("/")
    assert argv[1] == "serve"
    assert re.search(r"\bpgsage serve\b", exec_start)
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["User"] != ["root"] and service["NoNewPrivileges"] == ["yes"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    keys = _pgsage_env_keys(env)
    assert keys and keys <= set(Settings.model_fields), keys - set(Settings.model_fields)


def test_systemd_unit_flags_are_pgsage_serve_options():
    (exec_start,) = _unit()["Service"]["ExecStart"]
    flags = [a.split("=")[0] for a in shlex.split(exec_start)[2:] if a.startswith("--")]
    assert flags, "the unit names its config file"
    helptext = subprocess.run(
        [str(PGSAGE), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), flag


def test_systemd_unit_verifies_cleanly(tmp_path):
    # systemd-analyze verify wants ExecStart to exist: point it at this venv's pgsage
    text = UNIT.read_text()
    (exec_start,) = _unit()["Service"]["ExecStart"]
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(shlex.split(exec_start)[0], str(PGSAGE)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_systemd_unit_is_hardened():
    service = _unit()["Service"]
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
    }.items():
        assert service.get(key) == [value], f"{key}={value} expected, got {service.get(key)}"
    assert "@system-service" in service["SystemCallFilter"]
    # exposure 0.0 (locked down) .. 10.0 (unprotected), x10 for --threshold
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert overall, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exposure {overall.group(1)} is above 2.0"
