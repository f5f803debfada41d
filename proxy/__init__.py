"""pgsage proxy: the service (wire protocol relay, admin console, HTTP API, telemetry)."""

from models.accel import install as _install_accel

__version__ = "0.1.0"

# compiled builds of hot modules are used only while they match their source (models/accel.py)
_install_accel()
