"""A recording TCP relay: captures both directions of real client/server traffic for codec tests.

`python -m tests.capture OUT.bin -- psql ...` records one session to a file: a sequence of
records `direction (1 byte: 'F' frontend, 'B' backend) + int32 length + bytes`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Capture:
    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, direction: str, data: bytes) -> None:
        with self.lock:
            self.chunks.append((direction, data))

    def stream(self, direction: str) -> bytes:
        return b"".join(d for k, d in self.chunks if k == direction)

    def dump(self) -> bytes:
        return b"".join(k.encode() + struct.pack("!I", len(d)) + d for k, d in self.chunks)

    @classmethod
    def load(cls, raw: bytes) -> Capture:
        cap = cls()
        pos = 0
        while pos < len(raw):
            k = raw[pos : pos + 1].decode()
            (n,) = struct.unpack_from("!I", raw, pos + 1)
            cap.chunks.append((k, raw[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        return cap


class RecordingRelay:
    """Listens on a free port and relays every connection to (host, port), recording it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.captures: list[Capture] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            cap = Capture()
            self.captures.append(cap)
            for src, dst, k in ((client, server, "F"), (server, client, "B")):
                t = threading.Thread(target=self._pump, args=(src, dst, k, cap), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, k: str, cap: Capture) -> None:
        try:
            while data := src.recv(65536):
                cap.add(k, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()
        for t in self._threads:
            t.join(5)
