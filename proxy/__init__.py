"""pgsage proxy: the service (wire protocol relay, admin console, HTTP API, telemetry)."""

__version__ = "0.1.0"
