"""Hot-path frame scanner: find message boundaries in a byte stream without copying it.

The proxy forwards chunks exactly as received. It only needs the few messages it must read (a
Query's text, a CommandComplete's tag ...). `FrameScanner` walks the type byte and length of every
message, hands back the payloads of the *interesting* types, and skips all others by counting
bytes, so a 1 GiB DataRow costs no memory. Lengths above `max_message_size` or unknown type bytes
are the peer's protocol violation. An interesting message longer than `max_read_size` is still
forwarded but not buffered: it is reported with payload None ("seen, too large to read").
"""

from __future__ import annotations

import struct

from .errors import ProtocolViolation

_U32 = struct.Struct("!I")
unpack_u32 = _U32.unpack_from

Frame = tuple[int, bytes | None]


class FrameScanner:
    """Incremental message framer for one direction of a connection.

    `receive_data(chunk)` returns `[(type_byte, payload), ...]` for each completed message whose
    type is in `interesting`; partial messages carry over to the next call.
    """

    __slots__ = (
        "_body",
        "_body_len",
        "_body_type",
        "_hdr",
        "_skip",
        "_valid_table",
        "_want_table",
        "direction",
        "interesting",
        "max_message_size",
        "max_read_size",
        "valid_types",
    )

    def __init__(
        self,
        interesting: frozenset[int],
        valid_types: frozenset[int],
        max_message_size: int = (1 << 30) - 1,
        direction: str = "frontend",
        max_read_size: int = 64 << 20,
    ) -> None:
        self.interesting = interesting
        self.valid_types = valid_types
        # the same sets as 256-byte tables: indexing bytes is a native operation once compiled,
        # a frozenset lookup is a call into the interpreter
        self._want_table = bytes(1 if t in interesting else 0 for t in range(256))
        self._valid_table = bytes(1 if t in valid_types else 0 for t in range(256))
        self.max_message_size = max_message_size
        self.direction = direction
        self.max_read_size = max_read_size
        self._skip = 0
        self._hdr = b""
        self._body: bytearray | None = None
        self._body_len = 0
        self._body_type = 0

    @property
    def at_boundary(self) -> bool:
        """True when no message is partially received."""
        return not self._skip and not self._hdr and self._body is None

    def _check(self, t: int, length: int) -> None:
        if t not in self.valid_types:
            raise ProtocolViolation(f"invalid {self.direction} message type {t}")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for type {chr(t)!r}")
        if length > self.max_message_size:
            raise ProtocolViolation(
                f"message of type {chr(t)!r} is {length} bytes, over the limit of "
                f"{self.max_message_size}"
            )

    def receive_data(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        n = len(data)
        pos = 0
        if self._skip or self._body is not None or self._hdr:
            pos = self._carry_over(data, out)
        # the common case: whole messages, walked with locals only
        want = self._want_table
        valid = self._valid_table
        limit = self.max_message_size
        readable = self.max_read_size
        while n - pos >= 5:
            t = data[pos]
            # big-endian int32, by hand: native integer operations once compiled
            length = (
                (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            )
            if not valid[t] or length < 4 or length > limit:
                self._check(t, length)
            end = pos + 1 + length
            if end > n:
                self._start(t, length, out)
                return self._continue(data, pos + 5, out)
            if want[t]:
                out.append((t, data[pos + 5 : end] if length <= readable else None))
            pos = end
        if pos < n:
            self._hdr = data[pos:]
        return out

    def _continue(self, data: bytes, pos: int, out: list[Frame]) -> list[Frame]:
        """A message's body runs past this chunk: keep (or skip) what is here of it."""
        self._carry_over(data[pos:], out)
        return out

    def _carry_over(self, data: bytes, out: list[Frame]) -> int:
        """Finish the message left over from the previous chunk; returns where data resumes."""
        pos = 0
        n = len(data)
        while pos < n and (self._skip or self._body is not None or self._hdr):
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
            elif self._body is not None:
                take = min(self._body_len - len(self._body), n - pos)
                self._body += data[pos : pos + take]
                pos += take
                if len(self._body) == self._body_len:
                    out.append((self._body_type, bytes(self._body)))
                    self._body = None
            else:
                need = 5 - len(self._hdr)
                self._hdr += data[pos : pos + need]
                pos += min(need, n - pos)
                if len(self._hdr) < 5:
                    break
                t = self._hdr[0]
                (length,) = unpack_u32(self._hdr, 1)
                self._hdr = b""
                self._start(t, length, out)
        return pos

    def _start(self, t: int, length: int, out: list[Frame]) -> None:
        """A header is read and the body is not yet (fully) here."""
        self._check(t, length)
        if t in self.interesting and length > self.max_read_size:
            out.append((t, None))
            self._skip = length - 4
        elif t in self.interesting:
            if length == 4:
                out.append((t, b""))
            else:
                self._body = bytearray()
                self._body_len = length - 4
                self._body_type = t
        else:
            self._skip = length - 4
