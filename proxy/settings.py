"""pgsage settings: `config/pgsage.toml` < `PGSAGE_*` environment variables < CLI flags.

Loaded with pydantic-settings. A bad value raises `SettingsError` whose one-line message names
the key and the problem; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG = Path("config/pgsage.toml")


#: BI tools' dashboards go first in the admission queue
_DASHBOARDS = {"metabase": 0, "superset": 0, "tableau": 0, "powerbi": 0, "grafana": 0}


class SettingsError(Exception):
    """A configuration value is invalid; the message names the key."""


def parse_address(value: str, key: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') to a tuple, with a clear error naming the key."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key} must be host:port, got {value!r}")
    return host.strip("[]"), int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PGSAGE_",
        extra="forbid",
        validate_default=True,
    )

    #: where clients connect (PgBouncer's listen_addr:listen_port)
    listen: str = "127.0.0.1:6432"
    #: the PostgreSQL server in front of which pgsage sits; empty means embedded (pgserver)
    upstream: str = "127.0.0.1:5432"
    #: HTTP endpoint for /metrics, /healthz and the admin API ("": none)
    http: str = "127.0.0.1:9930"
    #: use an embedded PostgreSQL (pgserver) when the upstream is empty or unreachable
    embedded_fallback: bool = True
    embedded_data_dir: Path = Path.home() / ".local/share/pgsage/embedded"

    max_client_connections: int = Field(default=1000, ge=1)
    #: relay processes accepting on the listen port (SO_REUSEPORT; proxy/workers.py); 0: one
    #: per core. Learned state is per worker, so the default stays one process
    workers: int = Field(default=1, ge=0, le=256)
    #: seconds of silence before TCP keepalive probes a client socket (0: no keepalive);
    #: a client gone without FIN or RST is dropped about a minute after that
    tcp_keepalive_idle: int = Field(default=60, ge=0)
    #: seconds to open the upstream TCP connection
    connect_timeout: float = Field(default=5.0, gt=0)
    #: seconds a client has to finish startup and authentication
    startup_timeout: float = Field(default=60.0, gt=0)
    #: server connections kept for reuse after their client said goodbye (PgBouncer's session
    #: pooling): one whose client ended idle and outside a transaction, and whose startup the
    #: upstream trusted (no password asked), is reset with DISCARD ALL and handed to the next
    #: client with the very same startup packet. 0 closes every server connection with its client
    server_pool_size: int = Field(default=20, ge=0)
    #: seconds a reset server connection waits for a client before it is closed
    server_idle_timeout: float = Field(default=60.0, gt=0)
    #: close a client idle (no request outstanding) for this long; 0 disables
    idle_timeout: float = Field(default=0.0, ge=0)
    #: on SIGTERM/SIGINT, seconds in-flight statements get to finish
    shutdown_timeout: float = Field(default=30.0, ge=0)

    #: largest message a client may send (PostgreSQL's own limit is 1 GiB - 1)
    max_message_size: int = Field(default=(1 << 30) - 1, ge=1024)
    #: largest message the proxy buffers to read (Query, Parse, Bind); larger ones pass unread
    max_read_size: int = Field(default=64 << 20, ge=1024)
    max_startup_packet_size: int = Field(default=10_000, ge=64)

    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify client certificates with (client-facing TLS)
    tls_client_ca: Path | None = None
    #: client certificates: none (not asked), optional (checked if sent), required
    tls_client_verify: Literal["none", "optional", "required"] = "none"
    #: TLS towards the upstream, as libpq's sslmode (disable, prefer, require, verify-ca,
    #: verify-full); it covers client sessions and pgsage's own connections
    upstream_sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = (
        "disable"
    )
    #: CA certificate(s) the upstream's certificate must chain to (verify-ca, verify-full)
    upstream_sslrootcert: Path | None = None
    #: pgsage's client certificate and key for the upstream (certificate authentication)
    upstream_sslcert: Path | None = None
    upstream_sslkey: Path | None = None

    #: keep a record per executed statement
    record_statements: bool = True

    # ---- the warehouse and pgsage's metadata (query log, stats, models)
    #: database on the upstream holding the warehouse and the metadata/ml schemas
    warehouse_database: str = "warehouse"
    #: role pgsage uses for its own work on the upstream (logging, sampling, EXPLAIN)
    metadata_user: str = "postgres"
    #: full DSN for the metadata database when it is not the warehouse database
    metadata_dsn: str | None = None
    #: apply migrations when `serve` starts
    auto_migrate: bool = True
    #: persist the query log to metadata.query_logs
    querylog_enabled: bool = True
    #: fingerprint, aggregate and write the log in a child process, off the relay's core
    querylog_worker: bool = True
    #: store SQL with its literal values; by default only the normalised text ($n) is stored
    log_parameters: bool = False
    querylog_queue_size: int = Field(default=200_000, ge=100)
    querylog_batch_size: int = Field(default=5_000, ge=1)
    querylog_flush_interval: float = Field(default=1.0, gt=0)
    querylog_retention_days: int = Field(default=14, ge=0)
    stats_flush_interval: float = Field(default=10.0, gt=0)
    system_sample_interval: float = Field(default=10.0, gt=0)
    index_sample_interval: float = Field(default=60.0, gt=0)
    #: per-fingerprint Prometheus series are kept for the top K by total time
    top_k_fingerprints: int = Field(default=100, ge=1, le=10_000)
    max_fingerprints: int = Field(default=5_000, ge=10)
    #: name of this instance in the query log
    instance_name: str = "pgsage"

    # ---- clock of logged timestamps: real (speed 1, no start) or simulated (the workload bench)
    clock_speed: float = Field(default=1.0, gt=0)
    clock_start: datetime | None = None

    # ---- the cost model in the proxy (predictions attached to logged executions)
    cost_serving: bool = True
    cost_cache_ttl: float = Field(default=120.0, gt=0)
    cost_refresh_interval: float = Field(default=5.0, gt=0)
    cost_explain_timeout_ms: int = Field(default=2000, ge=10)
    #: retrain the cost model every this many seconds (0: never on a schedule)
    retrain_interval: float = Field(default=6 * 3600.0, ge=0)
    #: ... and when the online median q-error exceeds this (0: never on drift)
    retrain_qerror_threshold: float = Field(default=3.0, ge=0)
    retrain_min_gap: float = Field(default=600.0, ge=0)
    #: what a scheduled run retrains, in this order (drift retrains the cost model alone)
    retrain_models: list[Literal["cost", "clusters", "forecast", "anomaly", "advisor_rank"]] = (
        Field(default_factory=lambda: ["cost", "clusters", "forecast", "anomaly"])
    )

    # ---- result cache for repeated read-only SELECTs (see proxy/cache.py)
    cache_enabled: bool = False
    #: only statements whose every table is schema-qualified in one of these schemas are cached
    cache_schemas: list[str] = Field(default_factory=lambda: ["gold"])
    #: memory bound of the in-process cache (the LRU evicts beyond it)
    cache_max_bytes: int = Field(default=64 << 20, ge=1024)
    #: responses larger than this are never cached
    cache_max_entry_bytes: int = Field(default=1 << 20, ge=64)
    #: seconds an entry lives even if nothing invalidates it
    cache_ttl: float = Field(default=300.0, gt=0)
    #: an upstream execution faster than this (ms) is not worth caching
    cache_min_ms: float = Field(default=0.5, ge=0)
    #: a key is stored on its n-th miss within the TTL (1: at once; 2: once it repeats)
    cache_admit_after: int = Field(default=2, ge=1)
    #: redis://host:port/db shares the cache between pgsage instances (empty: in memory)
    cache_redis_url: str | None = None

    # ---- anomaly detection in the query log worker (models/anomaly.py -> metadata.anomalies);
    # the worker reads these when it starts, so changing them needs a restart
    anomaly_enabled: bool = True
    #: POST new and escalated incidents as JSON to this http(s) URL (unset: no webhook)
    anomaly_webhook_url: str | None = None
    anomaly_webhook_timeout: float = Field(default=5.0, gt=0)
    #: retries of a failed POST, with exponential backoff (0.5 s, 1 s, 2 s ...)
    anomaly_webhook_retries: int = Field(default=3, ge=0, le=10)
    anomaly_webhook_min_severity: Literal["low", "medium", "high"] = "low"
    #: seconds of the proxy's clock without a new anomaly after which an incident closes
    anomaly_incident_gap: float = Field(default=900.0, gt=0)
    #: real seconds between checks of the registry for a newly active anomaly model
    anomaly_refresh_interval: float = Field(default=10.0, gt=0)

    # ---- admission control (proxy/admission.py): short lane, adaptive slots for long statements
    admission_enabled: bool = False
    #: fixed short/long boundary in ms (0: learned from the latency distribution)
    admission_short_ms: float = Field(default=0.0, ge=0)
    admission_short_quantile: float = Field(default=0.8, gt=0, lt=1)
    admission_min_short_ms: float = Field(default=50.0, ge=0)
    admission_max_short_ms: float = Field(default=2000.0, gt=0)
    #: executions of a template before its prediction is trusted (unknown ones are short)
    admission_min_observations: int = Field(default=2, ge=1)
    #: concurrent long statements: starts at the initial limit (0: the maximum), then adapts
    admission_initial_limit: int = Field(default=0, ge=0)
    admission_min_limit: int = Field(default=1, ge=1)
    admission_max_limit: int = Field(default=4, ge=1)
    admission_queue_size: int = Field(default=1000, ge=0)
    #: seconds a long statement waits for a slot before failing with SQLSTATE 57014
    admission_queue_timeout: float = Field(default=60.0, gt=0)
    admission_adjust_interval: float = Field(default=2.0, gt=0)
    #: long statements this many times slower than usual mean the database is saturated
    admission_slowdown: float = Field(default=2.0, gt=1)
    #: active upstream backends per core above which the limit shrinks (0: no load probe)
    admission_saturation: float = Field(default=1.0, ge=0)
    #: cores of the upstream database server (0: this machine's, right when it runs here)
    admission_upstream_cores: int = Field(default=0, ge=0)
    #: seconds between samples of the upstream's active backends
    admission_probe_interval: float = Field(default=0.5, gt=0)
    #: queue priority by application class (lower first; unlisted classes get 1)
    admission_priorities: dict[str, int] = Field(default_factory=lambda: dict(_DASHBOARDS))

    # ---- plan steering (models/steering.py, proxy/steering.py): Bao-style hint sets per template
    steering_enabled: bool = False
    #: runtime kill switch (SET steering_active = false in the admin console)
    steering_active: bool = True
    #: decide and log the would-be arm, but run every statement with the stock plan
    steering_dry_run: bool = False
    #: share of eligible executions that run the stock plan regardless (the A/B control)
    steering_holdout: float = Field(default=0.1, ge=0, le=0.9)
    #: holdout share of a template whose converged arm the A/B test has not judged yet: the
    #: trial runs stock and arm side by side, under the same load, until the test decides
    steering_trial_holdout: float = Field(default=0.5, ge=0, le=0.9)
    #: only templates whose stock runs take at least this long are steered
    steering_min_ms: float = Field(default=20.0, ge=0)
    #: arms never used (per-rule kill switch), e.g. ["no_indexscan"]
    steering_disabled_arms: list[str] = Field(default_factory=list)
    #: fingerprints never steered (per-fingerprint kill switch)
    steering_exclude: list[str] = Field(default_factory=list)
    steering_seed: int = 0
    steering_max_templates: int = Field(default=5000, ge=10)
    #: the A/B test: executions of the chosen arm and of the holdout before it is judged
    steering_ab_min_samples: int = Field(default=20, ge=3)
    steering_ab_min_holdout: int = Field(default=8, ge=3)
    steering_ab_alpha: float = Field(default=0.05, gt=0, lt=1)
    #: an arm must cut the median by at least this share to stay
    steering_min_gain: float = Field(default=0.05, ge=0, lt=1)
    steering_eval_interval: float = Field(default=30.0, ge=1)
    #: centre each arm's posterior on the active cost model's prediction for the arm's plan
    #: (Bao's warm start; nothing changes while no cost model is active)
    steering_warm_start: bool = True

    # ---- rewrites (optimizer/rules, proxy/rewriting.py): proven equivalent before use
    rewrite_enabled: bool = False
    #: seconds between re-reads of the rules' catalog facts and gold watermarks
    rewrite_context_interval: float = Field(default=60.0, gt=0)
    #: runtime kill switch
    rewrite_active: bool = True
    #: log the would-be rewrite, send the original
    rewrite_dry_run: bool = False
    #: share of rewritable executions sent as written (the A/B control)
    rewrite_holdout: float = Field(default=0.1, ge=0, le=0.9)
    #: rules never used (per-rule kill switch)
    rewrite_disabled_rules: list[str] = Field(default_factory=list)
    #: fingerprints never rewritten (per-fingerprint kill switch)
    rewrite_exclude: list[str] = Field(default_factory=list)
    #: statement_timeout (ms) of the shadow runs that prove a rewrite
    rewrite_timeout_ms: int = Field(default=10_000, ge=100)
    #: value sets a parameterised (extended-protocol) text is proven with before it is rewritten
    rewrite_literal_sets: int = Field(default=3, ge=1, le=20)

    # ---- workload forecast (models/forecast.py): re-forecast with the active model and
    # publish pgsage_forecast_queries{cluster,horizon} every this many seconds
    forecast_refresh_interval: float = Field(default=300.0, ge=5)

    # ---- index advisor (models/advisor.py): `pgsage advise`, SHOW RECOMMENDATIONS
    #: automatic mode: every advisor_interval, advise, apply validated indexes, drop stale ones
    advisor_auto: bool = False
    advisor_interval: float = Field(default=3600.0, ge=10)
    #: storage budget for recommended indexes, as a share of the database size
    advisor_budget_share: float = Field(default=0.2, gt=0, le=1)
    #: keep an index that slows at most this many fingerprints when a steering hint set restores
    #: each (the proxy pins it; only with steering_enabled, which applies the pins)
    advisor_max_pins: int = Field(default=3, ge=0)
    #: limit of each what-if and replayed run; a replay cut by it counts as the limit
    advisor_statement_timeout_ms: int = Field(default=60_000, ge=100)

    # ---- the HTTP admin API (/api/v1) answers only `Authorization: Bearer <admin_token>`;
    # PGSAGE_ADMIN_TOKEN, or PGSAGE_ADMIN_TOKEN_FILE naming a file that holds it
    admin_token: SecretStr | None = None
    #: browser origins allowed to call /api/v1 (CORS), e.g. ["https://grafana.example"]; "*": any
    api_cors_origins: list[str] = Field(default_factory=list)
    #: requests per minute per client address on /api/v1 (a token bucket; 0: no limit)
    api_rate_limit_per_minute: int = Field(default=0, ge=0)

    # ---- admin console: `psql -d pgsage -U <admin user>`
    admin_database: str = "pgsage"
    admin_users: list[str] = Field(default_factory=lambda: ["postgres"])
    #: admins authenticate against this upstream database with the upstream's own methods
    admin_auth_database: str = "postgres"

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="before")
    @classmethod
    def _clock_table(cls, data: Any) -> Any:
        """`[clock] speed = ..., start = ...` in the TOML file means clock_speed / clock_start."""
        if isinstance(data, dict) and isinstance(data.get("clock"), dict):
            data = dict(data)
            clock = data.pop("clock")
            for key in ("speed", "start"):
                if key in clock:
                    data.setdefault(f"clock_{key}", clock[key])
            unknown = set(clock) - {"speed", "start"}
            if unknown:
                raise ValueError(f"clock: unknown setting {sorted(unknown)[0]!r}")
        return data

    @field_validator("listen", "http")
    @classmethod
    def _address(cls, value: str, info: Any) -> str:
        if value or info.field_name != "http":  # http = "": no HTTP endpoint
            parse_address(value, info.field_name)
        return value

    @field_validator("anomaly_webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"anomaly_webhook_url must be an http(s) URL, got {value!r}")
        return value or None

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        if value:
            parse_address(value, "upstream")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_verify != "none" and self.tls_client_ca is None:
            raise ValueError("tls_client_verify needs tls_client_ca")
        for key in ("tls_client_ca", "upstream_sslrootcert", "upstream_sslcert", "upstream_sslkey"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: file {path} does not exist")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: file {path} does not exist")
        return self

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen, "listen")

    @property
    def upstream_address(self) -> tuple[str, int] | None:
        return parse_address(self.upstream, "upstream") if self.upstream else None

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_address(self.http, "http")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


_config_override: Path | None = None


def _config_path() -> Path | None:
    if _config_override is not None:
        return _config_override
    env = os.environ.get("PGSAGE_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from file, environment and explicit overrides (CLI flags)."""
    global _config_override
    if config is not None and not config.is_file():
        raise SettingsError(f"config: file {config} does not exist")
    _config_override = config
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(_one_line(exc)) from None
    except ValueError as exc:  # TOML syntax errors and the like
        raise SettingsError(f"config: {exc}") from None
    finally:
        _config_override = None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "settings"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    if msg.startswith(key):
        return f"{msg}"
    return f"{key}: {msg}{shown}"
