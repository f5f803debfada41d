"""Settings precedence (file < environment < flags) and one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import SettingsError, load_settings


def test_defaults_file_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "pgsage.toml"
    cfg.write_text('listen = "127.0.0.1:7001"\nmax_client_connections = 7\n')
    s = load_settings(cfg)
    assert s.listen_address == ("127.0.0.1", 7001)
    assert s.max_client_connections == 7
    monkeypatch.setenv("PGSAGE_LISTEN", "127.0.0.1:7002")
    assert load_settings(cfg).listen == "127.0.0.1:7002"
    assert load_settings(cfg, listen="127.0.0.1:7003").listen == "127.0.0.1:7003"
    # a flag left unset (None) does not override
    assert load_settings(cfg, listen=None).listen == "127.0.0.1:7002"


def test_upstream_forms() -> None:
    assert load_settings(upstream="db.example:5433").upstream_address == ("db.example", 5433)
    assert load_settings(upstream="").upstream_address is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"listen": "nonsense"}, "listen"),
        ({"upstream": "host:99999"}, "upstream"),
        ({"max_client_connections": 0}, "max_client_connections"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"log_level": "loud"}, "log_level"),
        ({"tls_cert": "/nonexistent.crt", "tls_key": "/nonexistent.key"}, "tls_cert"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pgsage.toml"
    cfg.write_text('lissen = "127.0.0.1:1"\n')
    with pytest.raises(SettingsError, match="lissen: unknown setting"):
        load_settings(cfg)


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {"PGSAGE_LISTEN": "nonsense", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "listen" in lines[0] and "nonsense" in lines[0]


def test_shipped_config_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    s = load_settings(root / "config" / "pgsage.toml")
    assert s.listen == "127.0.0.1:6432"
    assert s.http == "127.0.0.1:9930"


def test_reloadable_set_and_refusals() -> None:
    from proxy.reload import set_setting

    s = load_settings()
    assert set_setting(s, "idle_timeout", "12.5") is None
    assert s.idle_timeout == 12.5
    assert "idle_timeout" in (set_setting(s, "idle_timeout", "-1") or "")
    assert "restart" in (set_setting(s, "listen", "127.0.0.1:1") or "")
    assert "unknown" in (set_setting(s, "nope", "1") or "")
    assert set_setting(s, "admin_users", "alice, bob") is None
    assert s.admin_users == ["alice", "bob"]


def test_simulated_clock_maps_monotonic_to_simulated_epoch() -> None:
    import time
    from datetime import UTC, datetime

    from proxy.clock import SimClock

    start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    clock = SimClock(speed=2000, start=start)
    t0 = time.monotonic()
    assert abs(clock.epoch(t0) - start.timestamp()) < 2000 * 0.05
    # one real second is 2000 simulated seconds
    assert clock.epoch(t0 + 1.0) - clock.epoch(t0) == pytest.approx(2000.0)
    assert clock.simulated
    assert not SimClock().simulated


def test_readings_before_a_reanchor_keep_their_segment() -> None:
    import time
    from datetime import UTC, datetime

    from proxy.clock import SimClock

    clock = SimClock()
    before = time.monotonic()
    real = clock.epoch(before)
    clock.set(3600.0, datetime(2026, 1, 5, tzinfo=UTC))
    assert abs(clock.epoch(before) - real) < 1e-6  # stamped with the clock of its time
    assert clock.epoch(time.monotonic()) >= datetime(2026, 1, 5, tzinfo=UTC).timestamp()
    for _ in range(200):
        clock.set(1.0, None)
    assert len(clock.segments) <= 64


def test_clock_table_in_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "pgsage.toml"
    cfg.write_text('[clock]\nspeed = 2000\nstart = "2026-01-05T00:00:00Z"\n')
    s = load_settings(cfg)
    assert s.clock_speed == 2000
    assert s.clock_start is not None and s.clock_start.year == 2026
    cfg.write_text("[clock]\nsped = 2\n")
    with pytest.raises(SettingsError, match="clock"):
        load_settings(cfg)
