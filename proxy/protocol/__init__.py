"""Sans-IO codec and state tracker for the PostgreSQL wire protocol 3.0 (stdlib only).

No sockets, asyncio or clocks here: bytes go in, events and encoded bytes come out.
"""

from __future__ import annotations

from .backend import BACKEND_TYPE_BYTES, decode_backend, error_response
from .errors import LocalProtocolError, ProtocolViolation
from .framing import FrameScanner
from .frontend import FRONTEND_TYPE_BYTES, decode_frontend
from .startup import (
    CancelRequest,
    DirectTLS,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
    parse_startup_packet,
)
from .tracker import (
    CLIENT_INTERESTING,
    SERVER_INTERESTING,
    Execution,
    Phase,
    Protocol,
    SessionTracker,
    Status,
    bind_names,
    rows_from_tag,
)

__all__ = [
    "BACKEND_TYPE_BYTES",
    "CLIENT_INTERESTING",
    "FRONTEND_TYPE_BYTES",
    "SERVER_INTERESTING",
    "CancelRequest",
    "DirectTLS",
    "Execution",
    "FrameScanner",
    "GSSENCRequest",
    "LocalProtocolError",
    "Phase",
    "Protocol",
    "ProtocolViolation",
    "SSLRequest",
    "SessionTracker",
    "StartupMessage",
    "StartupReader",
    "Status",
    "bind_names",
    "decode_backend",
    "decode_frontend",
    "error_response",
    "parse_startup_packet",
    "rows_from_tag",
]
