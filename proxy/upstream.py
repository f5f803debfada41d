"""Where the upstream PostgreSQL is: a TCP address or a Unix socket (the embedded server), and
how to talk TLS to it (libpq's sslmode: disable, prefer, require, verify-ca, verify-full)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SSL_REQUEST = struct.pack("!II", 8, 80877103)
SSL_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


class UpstreamTLSError(OSError):
    """The upstream's TLS could not be set up as the sslmode demands."""


@dataclass(frozen=True)
class UpstreamTLS:
    """TLS towards the upstream, as libpq's sslmode / sslrootcert / sslcert / sslkey."""

    mode: str = "disable"
    context: ssl.SSLContext | None = None

    @classmethod
    def build(
        cls,
        mode: str,
        rootcert: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> UpstreamTLS:
        if mode not in SSL_MODES:
            raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}, got {mode!r}")
        if mode == "disable":
            return cls(mode)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if mode in ("verify-ca", "verify-full"):
            if rootcert is not None:
                ctx.load_verify_locations(cafile=str(rootcert))
            else:
                ctx.load_default_certs()
            ctx.check_hostname = mode == "verify-full"
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:  # prefer / require: encrypted, not authenticated (as libpq without a root cert)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
        return cls(mode, ctx)

    @property
    def enabled(self) -> bool:
        return self.mode != "disable"

    def asyncpg_ssl(self) -> ssl.SSLContext | str | None:
        """The `ssl=` argument for asyncpg connections of pgsage's own."""
        if not self.enabled:
            return None
        return self.context if self.mode != "prefer" else "prefer"


class _Negotiate(asyncio.Protocol):
    """Reads the one-byte answer to SSLRequest ('S' or 'N'); nothing else arrives before TLS."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data[:1])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("upstream closed during SSLRequest"))


@dataclass(frozen=True)
class Upstream:
    host: str | None = None
    port: int | None = None
    unix_socket: Path | None = None

    def __str__(self) -> str:
        return str(self.unix_socket) if self.unix_socket else f"{self.host}:{self.port}"

    async def connect(
        self, factory: Callable[[], asyncio.Protocol], tls: UpstreamTLS | None = None
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        if self.unix_socket is not None:
            t, p = await loop.create_unix_connection(factory, str(self.unix_socket))
            return t, p  # type: ignore[return-value]
        if tls is None or not tls.enabled:
            t, p = await loop.create_connection(factory, self.host, self.port)
            return t, p  # type: ignore[return-value]
        return await self._connect_tls(factory, tls)

    async def _connect_tls(
        self, factory: Callable[[], asyncio.Protocol], tls: UpstreamTLS
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """SSLRequest, then TLS on the same socket (or plaintext if the server declines and the
        mode allows it); the session's protocol gets the finished transport."""
        loop = asyncio.get_running_loop()
        transport, negotiate = await loop.create_connection(_Negotiate, self.host, self.port)
        try:
            transport.write(SSL_REQUEST)
            answer = await negotiate.answer
            if answer == b"S":
                assert tls.context is not None
                try:
                    tls_transport = await loop.start_tls(
                        transport, negotiate, tls.context, server_hostname=self.host
                    )
                except ssl.SSLError as exc:
                    raise UpstreamTLSError(
                        f"TLS to the upstream failed ({tls.mode}): {exc}"
                    ) from None
                assert tls_transport is not None
                transport = tls_transport  # type: ignore[assignment]
            elif answer != b"N":
                raise UpstreamTLSError(f"unexpected answer {answer!r} to SSLRequest")
            elif tls.mode != "prefer":
                raise UpstreamTLSError(
                    f"the upstream does not accept TLS, and upstream_sslmode is {tls.mode}"
                )
        except BaseException:
            transport.close()
            raise
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return transport, protocol

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
