"""Errors of the wire protocol: the peer broke it, versus we did."""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"
TOO_MANY_CONNECTIONS = "53300"
CONNECTION_FAILURE = "08006"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
INVALID_AUTHORIZATION = "28000"


class ProtocolViolation(Exception):
    """The peer sent bytes that break protocol 3.0 (or a configured size limit).

    The right answer is an ErrorResponse with SQLSTATE 08P01 (where the protocol still allows
    one) and closing that peer's connection; no other connection is affected.
    """

    sqlstate = PROTOCOL_VIOLATION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalProtocolError(Exception):
    """We asked the codec to do something the protocol does not allow (a bug on our side)."""
