"""The request lines the gateway refuses to pass on: some methods, and some raw paths.

The reverse proxy forwards a request's method and raw path to another server, and forward-auth
judges them on another server's behalf. Both refuse what that server could read otherwise than
the rules here did.

References:
    https://www.rfc-editor.org/rfc/rfc9110#section-9.3.6 (CONNECT)
    https://www.rfc-editor.org/rfc/rfc9110#section-9.3.8 (TRACE)
    https://www.rfc-editor.org/rfc/rfc3986#section-3.3 (path segments)
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

__all__ = [
    "FORWARDED_METHODS",
    "METHOD_OVERRIDES",
    "UNFORWARDED_METHODS",
    "decode_path",
    "has_ambiguous_separators",
    "is_unforwarded",
    "overrides_to_unforwarded",
]

# Methods neither the reverse proxy nor forward-auth lets through, whatever their case.
# RFC 9110 §9.3.8: TRACE echoes the request it received, headers included, so a key injected on
# the way would travel back to the client; TRACK is IIS's TRACE. CONNECT asks for a tunnel
# (§9.3.6), and its target is a host and port, not a path any rule could judge.
UNFORWARDED_METHODS = frozenset({b"TRACE", b"TRACK", b"CONNECT"})
# Also refused when named in the method-override fields some frameworks honour.
METHOD_OVERRIDES = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})
# What their 405 names as allowed (RFC 9110 §15.5.6); which of these the app behind serves is
# the app's to say.
FORWARDED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def is_unforwarded(method: str) -> bool:
    """Whether ``method``, in any case, is one of UNFORWARDED_METHODS."""
    return method.upper().encode() in UNFORWARDED_METHODS


def overrides_to_unforwarded(name: bytes, value: bytes) -> bool:
    """Whether the header ``name: value`` overrides the method with one of UNFORWARDED_METHODS."""
    return name in METHOD_OVERRIDES and value.strip().upper() in UNFORWARDED_METHODS


def has_ambiguous_separators(raw: bytes) -> bool:
    """Whether the raw request path ``raw`` may be split into segments otherwise by a server it
    is passed on to than by the rules here, which judge it decoded.

    An encoded slash or backslash (``%2F``, ``%5C``) is a separator once decoded
    but part of one segment to routers that match the raw path (Express, Fastify, Rails, Go's
    ServeMux), so ``/public%2Fx/reports`` would be judged under ``/public/*`` and served as
    ``/{tenant}/reports``; and a raw ``#`` starts a fragment to a URL parser, which drops it and
    what follows (``/admin#x`` judged as no rule's path, routed to ``/admin``).
    """
    if b"#" in raw:
        return True
    lowered = raw.lower()
    return b"%2f" in lowered or b"%5c" in lowered


def decode_path(raw: bytes) -> str:
    """``raw`` decoded as ASGI servers decode a request path: percent-decoding, then UTF-8 with
    replacement. What the rules judge is what a server would have put in ``scope["path"]``."""
    return unquote_to_bytes(raw).decode("utf-8", "replace")
