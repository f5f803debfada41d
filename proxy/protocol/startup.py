"""The packets that open a connection: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.

They have no type byte: int32 length, int32 code, payload. `StartupReader` collects one such
packet from a byte stream under a size limit and also recognises a direct-TLS ClientHello
(PostgreSQL 17's `sslnegotiation=direct`), which starts with the TLS record type 0x16.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .errors import ProtocolViolation

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2

_II = struct.Struct("!II")
_TLS_HANDSHAKE = 0x16


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _II.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _II.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        # length counts itself, the code, the process id and the key
        return (
            _II.pack(12 + len(self.secret_key), CANCEL_REQUEST_CODE)
            + struct.pack("!i", self.process_id)
            + self.secret_key
        )


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol version (major << 16 | minor) and the parameters, in the order the client sent."""

    protocol: int = PROTOCOL_3_0
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        return self.parameters.get("database") or self.parameters.get("user")

    def encode(self) -> bytes:
        body = b"".join(
            k.encode("utf-8", "surrogateescape")
            + b"\x00"
            + v.encode("utf-8", "surrogateescape")
            + b"\x00"
            for k, v in self.parameters.items()
        )
        body += b"\x00"
        return _II.pack(8 + len(body), self.protocol) + body


@dataclass(frozen=True, slots=True)
class DirectTLS:
    """The client opened with a TLS ClientHello instead of an SSLRequest."""


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage | DirectTLS


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one complete startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolViolation("invalid startup packet: shorter than 8 bytes")
    length, code = _II.unpack_from(packet)
    if length != len(packet):
        raise ProtocolViolation("invalid startup packet: length does not match")
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid SSLRequest: wrong length")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation("invalid GSSENCRequest: wrong length")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 16 <= length <= 8 + 4 + 256:
            raise ProtocolViolation("invalid CancelRequest: wrong length")
        (pid,) = struct.unpack_from("!i", packet, 8)
        return CancelRequest(pid, bytes(packet[12:]))
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.2"
        )
    return StartupMessage(code, _parse_parameters(packet[8:]))


def _parse_parameters(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\x00")
    if parts == [b""]:
        return {}
    if len(parts) % 2 != 1 or parts[-1] != b"":
        raise ProtocolViolation("invalid startup packet layout: parameter without value")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        name = parts[i].decode("utf-8", "surrogateescape")
        if not name:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        params[name] = parts[i + 1].decode("utf-8", "surrogateescape")
    return params


class StartupReader:
    """Collects one startup-phase packet from a stream of bytes, within `max_size` bytes.

    `receive_data` returns the decoded packet once complete, else None; bytes past the packet
    stay in `remaining` (a client may pipeline its Startup after an SSLRequest 'N').
    """

    __slots__ = ("_buf", "last_packet", "max_size")

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        #: the raw bytes of the packet last returned (relayed untouched to the server)
        self.last_packet = b""

    def receive_data(self, data: bytes) -> StartupPacket | None:
        self._buf += data
        if self._buf and self._buf[0] == _TLS_HANDSHAKE:
            # the ClientHello stays in `remaining`: the caller hands it to its TLS layer
            return DirectTLS()
        if len(self._buf) < 4:
            return None
        (length,) = struct.unpack_from("!I", self._buf)
        if length < 8:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if length > self.max_size:
            raise ProtocolViolation(
                f"invalid length of startup packet: {length} exceeds the limit of {self.max_size}"
            )
        if len(self._buf) < length:
            return None
        packet = bytes(self._buf[:length])
        del self._buf[:length]
        self.last_packet = packet
        return parse_startup_packet(packet)

    @property
    def remaining(self) -> bytes:
        return bytes(self._buf)

    def take_remaining(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data
