"""Where the upstream PostgreSQL is: a TCP address or a Unix socket (the embedded server)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Upstream:
    host: str | None = None
    port: int | None = None
    unix_socket: Path | None = None

    def __str__(self) -> str:
        return str(self.unix_socket) if self.unix_socket else f"{self.host}:{self.port}"

    async def connect(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        if self.unix_socket is not None:
            t, p = await loop.create_unix_connection(factory, str(self.unix_socket))
        else:
            t, p = await loop.create_connection(factory, self.host, self.port)
        return t, p  # type: ignore[return-value]

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_socket is not None:
            return await asyncio.open_unix_connection(str(self.unix_socket))
        return await asyncio.open_connection(self.host, self.port)

    @classmethod
    def parse(cls, value: str) -> Upstream:
        """'host:port', or a Unix socket: a socket file, or a directory holding .s.PGSQL.5432."""
        if value.startswith("/"):
            path = Path(value)
            if path.is_dir():
                path = path / ".s.PGSQL.5432"
            return cls(unix_socket=path)
        host, _, port = value.rpartition(":")
        return cls(host=host.strip("[]"), port=int(port))
