"""The learned parts. Some modules may be served by a compiled build (`models.accel`)."""

from .accel import install as _install_accel

_install_accel()
