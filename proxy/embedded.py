"""The embedded default: a private PostgreSQL (pgserver) when no upstream is reachable."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from .upstream import Upstream


def upstream_reachable(upstream: Upstream, timeout: float = 2.0) -> bool:
    """A TCP (or Unix socket) connect succeeds; says nothing of authentication."""
    try:
        if upstream.unix_socket is not None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(timeout)
                s.connect(str(upstream.unix_socket))
        else:
            with socket.create_connection((upstream.host, upstream.port), timeout=timeout):
                pass
    except OSError:
        return False
    return True


class EmbeddedPostgres:
    """Owns a pgserver instance; `upstream` is its Unix socket. Stopped on `stop()` or at exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> Upstream:
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "no upstream is reachable and the embedded server needs pgserver: "
                "pip install 'pgsage[embedded]'"
            ) from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        info = self._server.get_postmaster_info()
        if info.socket_dir is not None:
            return Upstream(unix_socket=Path(info.socket_dir) / f".s.PGSQL.{info.port or 5432}")
        return Upstream(host=info.hostname or "127.0.0.1", port=info.port)

    @property
    def uri(self) -> str:
        return str(self._server.get_uri()) if self._server is not None else ""

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
