"""The answers the gateway gives instead of the upstream's.

    Refusal (devicegate._errors)
    ├── BadContentLength         400 invalid_request
    ├── ConflictingFraming       400 invalid_request, connection closed
    ├── UnforwardableTarget      400 invalid_request
    ├── AmbiguousTarget          400 invalid_request
    ├── MethodNotAllowed         405 method_not_allowed, with Allow
    ├── BodyTimeout              408 request_timeout, connection closed
    ├── BodyTooLarge             413 invalid_request, connection closed
    ├── WebsocketNotForwarded    501 invalid_request
    ├── RevocationOff            501 revocation_off, connection closed
    ├── BadGateway               502 bad_gateway
    ├── GatewayBusy              503 temporarily_unavailable, with Retry-After, connection closed
    └── GatewayTimeout           504 gateway_timeout

Each is raised as a fresh instance and rendered like every other refusal, by
:func:`devicegate._asgi.send_refusal`: a JSON body of fixed text, no ``WWW-Authenticate``
challenge (none of them is about the credential). "Connection closed" marks the answers given
while the client may still be sending a body the gateway will not read: the server must not
parse the rest of it as a next request.

References:
    https://www.rfc-editor.org/rfc/rfc9110#section-15.5.6 (405 and Allow)
    https://www.rfc-editor.org/rfc/rfc9112#section-6.1 (Content-Length with Transfer-Encoding)
    https://www.rfc-editor.org/rfc/rfc9110#section-15.6.3 (502)
"""

from __future__ import annotations

from .._errors import Refusal
from ._request_line import FORWARDED_METHODS

__all__ = [
    "AmbiguousTarget",
    "BadContentLength",
    "BadGateway",
    "BodyTimeout",
    "BodyTooLarge",
    "ConflictingFraming",
    "GatewayBusy",
    "GatewayTimeout",
    "MethodNotAllowed",
    "RevocationOff",
    "UnforwardableTarget",
    "WebsocketNotForwarded",
]


class BadContentLength(Refusal):
    """The Content-Length is not a number, is repeated with another value, or is not the length
    of the body that arrived (which closes the connection: the body was not read to its end)."""

    description = "The Content-Length header is invalid."


class ConflictingFraming(Refusal):
    """The request has both Content-Length and Transfer-Encoding (RFC 9112 §6.1)."""

    description = "The request has both Content-Length and Transfer-Encoding."

    def __init__(self) -> None:
        super().__init__(close=True)


class UnforwardableTarget(Refusal):
    """The raw path does not decode to the route path the rules judged, or makes no URL."""

    description = "The request target cannot be forwarded."


class AmbiguousTarget(Refusal):
    """The raw path holds ``%2F``, ``%5C`` or ``#``, which the upstream may split otherwise
    (see :func:`~devicegate.gateway._request_line.has_ambiguous_separators`)."""

    description = "The request path has an encoded slash or backslash, or a '#'."


class MethodNotAllowed(Refusal):
    """TRACE, TRACK or CONNECT, asked for directly or through a method-override field."""

    status_code = 405
    error = "method_not_allowed"
    description = "This gateway does not forward this method."

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, headers=[(b"allow", FORWARDED_METHODS)])


class BodyTimeout(Refusal):
    """The request body paused for longer than the gateway's timeout."""

    status_code = 408
    error = "request_timeout"
    description = "The request body stopped arriving, or arrives too slowly."

    def __init__(self) -> None:
        super().__init__(close=True)


class BodyTooLarge(Refusal):
    """The request body is, or says it is, larger than the gateway forwards."""

    status_code = 413
    description = "The request body is larger than this gateway accepts."

    def __init__(self) -> None:
        super().__init__(close=True)


class WebsocketNotForwarded(Refusal):
    """A websocket handshake: the reverse proxy forwards HTTP only."""

    status_code = 501
    description = "This gateway does not forward websockets."


class RevocationOff(Refusal):
    """``POST /revoke`` to ``devicegate serve --workers N``: an in-memory revocation list lives
    in one worker process, so a revocation would hold in whichever worker took the request and
    silently not in the others. Refused rather than half done, and never forwarded."""

    status_code = 501
    error = "revocation_off"
    description = (
        "Revocation is off: this server runs several worker processes and has no shared "
        "revocation store, so a revocation would hold in one of them only."
    )

    def __init__(self) -> None:
        super().__init__(close=True)  # the body was not read


class BadGateway(Refusal):
    """The upstream could not be reached, or the exchange failed before the response began."""

    status_code = 502
    error = "bad_gateway"
    description = "The upstream server could not be reached."


class GatewayBusy(Refusal):
    """The gateway holds as many requests, or streams as many large bodies, as its limits
    allow (:class:`~devicegate.gateway._policy.ProxyLimits`), or no upstream connection came
    free in time: try again shortly."""

    status_code = 503
    error = "temporarily_unavailable"
    description = "The gateway is busy; retry shortly."

    def __init__(self) -> None:
        super().__init__(headers=[(b"retry-after", b"1")], close=True)


class GatewayTimeout(Refusal):
    """The upstream did not answer within the gateway's timeout."""

    status_code = 504
    error = "gateway_timeout"
    description = "The upstream server did not answer in time."
