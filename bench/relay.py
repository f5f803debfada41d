"""A pure byte relay on asyncio + uvloop: the floor a Python proxy can reach.

    python -m bench.relay --listen 127.0.0.1:6433 --upstream 127.0.0.1:5432

Every accepted client connection gets one upstream TCP connection; bytes go both ways untouched
(no parsing at all), a close on either side closes the other. uvloop sets TCP_NODELAY on its
TCP transports (accepted and connected alike), as pgsage and PgBouncer do. Flow control: when
a transport's write buffer passes HIGH_WATER, its protocol's `pause_writing` pauses reading on
the other side until `resume_writing`, so a large result never piles up in memory. bench.overhead
runs it as the `relay` target; it must not import the `proxy` package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import cast

import uvloop

#: write buffer size (bytes) above which the source side stops reading
HIGH_WATER = 256 * 1024


class Side(asyncio.Protocol):
    """One end of a relayed connection; `peer` is the other end once both are connected."""

    #: every open end, so a stop closes them all
    live: set[Side] = set()

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []  # bytes that arrived before the peer existed
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no asyncio subclass
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        Side.live.add(self)

    def link(self, peer: Side) -> None:
        self.peer, peer.peer = peer, self
        for side in (self, peer):
            if side.pending and side.peer is not None and side.peer.transport is not None:
                side.peer.transport.write(b"".join(side.pending))
                side.pending.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        Side.live.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # after it has written what it still buffers

    def pause_writing(self) -> None:  # my write buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Client(Side):
    """The client's end: connects its upstream end when the client connects."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.ensure_future(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, server = await loop.create_connection(Side, *self.upstream)
        except OSError as exc:
            print(f"relay: upstream {self.upstream}: {exc}", file=sys.stderr)
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed or server.closed:  # one of them went away meanwhile
            transport.close()
            if self.transport is not None:
                self.transport.close()
            return
        self.link(server)


def hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Client(upstream), *listen, reuse_address=True)
    print(f"relay: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", file=sys.stderr)
    await stop.wait()
    server.close()
    for side in list(Side.live):
        if side.transport is not None:
            side.transport.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
    print("relay: stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--upstream", type=hostport, required=True, metavar="HOST:PORT")
    args = ap.parse_args(argv)
    uvloop.run(serve(args.listen, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
