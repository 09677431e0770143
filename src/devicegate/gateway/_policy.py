"""What the reverse proxy passes on, decided over bytes with no I/O.

:class:`~devicegate.gateway.proxy.ReverseProxy` does the ASGI and httpx work; each decision
about what crosses it is a pure function here, so that it can be read, and tested, alone:

* :func:`request_headers`: which of the client's fields reach the upstream, the
  Content-Length and Transfer-Encoding checks, and what the gateway adds (``X-Forwarded-*``,
  the upstream's own credential, ``X-Devicegate-*``);
* :func:`upstream_target`: the raw path and query the upstream is sent;
* :func:`body_framing` and :func:`check_body_size`: how the body is framed upstream, and its
  bounds;
* :func:`response_headers` and :func:`client_location`: which of the upstream's fields reach
  the client, and where its redirects point.

Each raises a refusal from :mod:`devicegate.gateway._refusals` when the request cannot be
forwarded.

References:
    https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1 (hop-by-hop fields)
    https://www.rfc-editor.org/rfc/rfc9110#section-8.6 (Content-Length)
    https://www.rfc-editor.org/rfc/rfc9112#section-6.1 (Transfer-Encoding)
    https://www.rfc-editor.org/rfc/rfc9110#section-10.2.2 (Location)
    https://www.rfc-editor.org/rfc/rfc7239#section-1 (the X-Forwarded-* fields it replaced)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple
from urllib.parse import quote

from .._config import env_int, env_seconds, read_env
from .._errors import ConfigError
from .._principal import CredentialKind, Principal
from .._rules import has_unsafe_segments
from ._refusals import (
    AmbiguousTarget,
    BadContentLength,
    BodyTooLarge,
    ConflictingFraming,
    MethodNotAllowed,
    UnforwardableTarget,
)
from ._request_line import decode_path, has_ambiguous_separators, overrides_to_unforwarded

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_TIMEOUT",
    "BodyFraming",
    "Headers",
    "ProxyLimits",
    "body_framing",
    "caller_headers",
    "check_body_complete",
    "check_body_size",
    "client_credential_fields",
    "client_location",
    "request_headers",
    "response_headers",
    "upstream_target",
]

# Here rather than in proxy.py so that the command line, which must start without httpx, and
# the proxy share one value.
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ProxyLimits:
    """What one gateway process lets its clients hold, so that no number of slow or idle
    clients can take what the others need (the upstream's connections above all).

    * Request bodies up to ``buffer_bytes`` are read whole before an upstream connection is
      taken, and responses that declare a length up to it are read whole before the client
      gets the first byte, the upstream connection going back to the pool at once. A slow
      client then holds a buffer and a task, never an upstream connection.
    * Larger bodies and responses, and responses of unknown length (a stream of events), are
      streamed as they come, at most ``connections // 2`` at a time, so that the other half of
      the pool is always free for the small requests. Beyond that a request is answered 503
      with ``Retry-After``, and so is a ``GET``, ``HEAD`` or ``OPTIONS`` whose answer would need
      a slot; any other method's answer is relayed all the same, since the upstream may have
      acted on it already.
    * A client must send its body, and read its response, within ``client_seconds`` plus one
      second for every ``min_client_rate`` bytes (Apache's ``mod_reqtimeout`` model: a slow
      phone uploading a large file gets time in proportion, a client trickling a byte now and
      then does not); and a response part it does not take within ``client_seconds`` ends it
      (nginx's ``send_timeout``). A body that falls behind gets 408; a response that falls
      behind is cut off, and what the gateway held for it (an upstream connection, a
      streaming slot, a task) is freed. The socket itself stays with the ASGI server until
      the client reads what the server already buffered, or goes away.
    * At most ``concurrent`` requests are in the gateway at once; the next gets 503 with
      ``Retry-After`` at once instead of queueing.

    Attributes:
        connections: the most upstream connections, pooled (default 100).
        concurrent: the most requests in the gateway at once (default 1000).
        buffer_bytes: the largest body or response read whole (default 256 KiB).
        client_seconds: the time a client has to send a body or read a response, before its
            rate is counted (default 30).
        min_client_rate: the bytes per second a client earns one more second with (default
            1024; 0: ``client_seconds`` is all there is).
    """

    connections: int = 100
    concurrent: int = 1000
    buffer_bytes: int = 256 * 1024
    client_seconds: float = DEFAULT_TIMEOUT
    min_client_rate: int = 1024

    def __post_init__(self) -> None:
        for name, low, high in (
            ("connections", 2, 100_000),
            ("concurrent", 1, 1_000_000),
            ("buffer_bytes", 0, 1 << 30),
            ("min_client_rate", 0, 1 << 30),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(name, f"must be an integer from {low} to {high}, got {value!r}")
        seconds = self.client_seconds
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ConfigError("client_seconds", "must be a positive number of seconds")

    @property
    def streams(self) -> int:
        """How many bodies or responses may be streamed at once: half the pool."""
        return self.connections // 2

    def time_left(self, moved: int, spent: float) -> float:
        """How many more seconds a client may take over a transfer that has moved ``moved``
        bytes in ``spent`` seconds of the client's own: ``client_seconds`` plus a second per
        ``min_client_rate`` bytes, less what it spent."""
        extra = moved / self.min_client_rate if self.min_client_rate else 0.0
        return self.client_seconds + extra - spent

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProxyLimits:
        """Read ``DEVICEGATE_UPSTREAM_CONNECTIONS``, ``DEVICEGATE_MAX_CONCURRENT``,
        ``DEVICEGATE_BUFFER_BYTES``, ``DEVICEGATE_CLIENT_TIMEOUT`` and
        ``DEVICEGATE_MIN_CLIENT_RATE``; unset ones keep their defaults.

        Raises:
            ConfigError: named after the variable.
        """
        given: dict[str, object] = {}
        for field in fields(cls):
            variable = _LIMIT_VARIABLES[field.name]
            parse = env_seconds if field.name == "client_seconds" else env_int
            value = read_env(environ, variable, parse)
            if value is not None:
                given[field.name] = value
        try:
            return cls(**given)  # type: ignore[arg-type]
        except ConfigError as exc:
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise ConfigError(_LIMIT_VARIABLES[exc.field], message) from None

    def to_env(self) -> dict[str, str]:
        """The variables :meth:`from_env` reads these limits back from."""
        return {
            _LIMIT_VARIABLES[field.name]: repr(getattr(self, field.name)) for field in fields(self)
        }


_LIMIT_VARIABLES = {
    "connections": "DEVICEGATE_UPSTREAM_CONNECTIONS",
    "concurrent": "DEVICEGATE_MAX_CONCURRENT",
    "buffer_bytes": "DEVICEGATE_BUFFER_BYTES",
    "client_seconds": "DEVICEGATE_CLIENT_TIMEOUT",
    "min_client_rate": "DEVICEGATE_MIN_CLIENT_RATE",
}

# RFC 9110 §7.6.1: hop-by-hop fields describe one connection and are never forwarded, nor is
# any field the Connection header names. Proxy-Connection is the pre-standard spelling.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"trailer",
    }
)
# Request fields this proxy rewrites itself: Host becomes the upstream's (the client's goes to
# X-Forwarded-Host), Content-Length is set from the framing we checked, and Expect: 100-continue
# was answered by our own server on this hop.
_REWRITTEN = frozenset({b"host", b"content-length", b"expect"})
# Fields that tell the upstream who the client is or what it asked for. Coming from the client
# they are claims, not facts: X-Forwarded-Proto and -Host are set here and X-Forwarded-For gets
# the address we saw appended; every other X-Forwarded-* (Port, Prefix, Ssl, Client-Cert...),
# Forwarded (RFC 7239) and X-Real-IP is dropped, and so are the path overrides some frameworks
# route by (X-Original-URL, X-Rewrite-URL) and the X-Original-URI of forward-auth set-ups:
# each would name a path the rules never judged.
_CLIENT_CLAIMS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-original-url",
        b"x-original-uri",
        b"x-original-host",
        b"x-rewrite-url",
    }
)
_FORWARDED_FOR = b"x-forwarded-for"
# Any X-Devicegate-* (the identity this proxy states) and any other X-Forwarded-*.
_REMOVED_PREFIXES = (b"x-devicegate-", b"x-forwarded-")
_KIND_HEADER = b"x-devicegate-kind"
_INSTANCE_ID_HEADER = b"x-devicegate-instance-id"
_AUTHORIZATION = b"authorization"
_UPSTREAM_API_KEY_HEADER = b"x-api-key"
# CGI, WSGI, PHP and nginx (underscores_in_headers) read a field name upper-cased with every
# character but letters and digits turned into "_": to them X_Devicegate_Kind and
# X.Devicegate.Kind are X-Devicegate-Kind. Request field names are compared in that folded
# form (lower case, "-" for every other character), so that no look-alike of a field removed
# here reaches the upstream.
_FOLD = bytes(
    ord(char.lower()) if char.isascii() and char.isalnum() else ord("-")
    for char in map(chr, range(256))
)
_MAX_LENGTH_DIGITS = 18  # without leading zeros: up to an exabyte
# Response fields the serving ASGI server sets itself: passing the upstream's on would send
# the client two Date headers (RFC 9110 §6.6.1 allows one) and name the upstream's software.
_SERVER_SET = frozenset({b"date", b"server"})

# The characters RFC 3986 §3.3 allows unencoded in a path segment, and "/".
_PATH_SAFE = "/!$&'()*+,;=:@"
_URL_PART_ENDS = (b"", b"/", b"?", b"#")


def client_credential_fields(api_key_header: str, device_header: str) -> frozenset[bytes]:
    """The client's credential fields, in the folded form request field names are compared in.

    Authorization, a DPoP proof, and the gate's own header names, and the field the upstream
    key is injected under too, whatever the gate's header is called: a client's value must
    never stand next to (or in for) the injected one.
    """
    names = (
        "authorization",
        "dpop",
        _UPSTREAM_API_KEY_HEADER.decode(),
        api_key_header,
        device_header,
    )
    return frozenset(name.encode("latin-1").translate(_FOLD) for name in names)


def caller_headers(principal: Principal) -> Headers:
    """``X-Devicegate-Kind`` and, for a device-bound token, ``X-Devicegate-Instance-Id``: who
    the gate admitted, stated to the server behind it."""
    headers = [(_KIND_HEADER, principal.kind.value.encode())]
    if principal.instance_id is not None:
        headers.append((_INSTANCE_ID_HEADER, principal.instance_id.encode()))
    return headers


def request_headers(
    fields: Iterable[tuple[bytes, bytes]],
    *,
    client_host: str | None,
    scheme: str,
    principal: Principal | None,
    removed: frozenset[bytes],
    upstream_api_key: str | None,
    upstream_mobile_api_key: str | None,
    max_body_bytes: int,
) -> tuple[Headers, int | None]:
    """The headers to send upstream, and the body length the client declared.

    Args:
        fields: the client's request header fields, as ASGI gives them.
        client_host: the address the client connected from, appended to X-Forwarded-For.
        scheme: the scheme the client used, sent as X-Forwarded-Proto.
        principal: whom the gate admitted, or ``None`` on a public path.
        removed: the client's credential fields (see :func:`client_credential_fields`).
        upstream_api_key: sent as ``X-API-Key`` for a caller with a server API key.
        upstream_mobile_api_key: sent raw in ``Authorization`` for a caller with a mobile key
            or a device token.
        max_body_bytes: the largest body forwarded.

    Raises:
        BadContentLength: Content-Length is not a number, or repeated with another value.
        BodyTooLarge: Content-Length declares more than ``max_body_bytes``.
        ConflictingFraming: Content-Length comes with Transfer-Encoding.
        MethodNotAllowed: a method-override field names a method the gateway refuses.
    """
    fields = list(fields)
    named = _connection_tokens(fields)
    headers: Headers = []
    content_length: int | None = None
    transfer_encoding = False
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    for name, value in fields:
        name = name.lower()
        if name == b"content-length":
            # RFC 9110 §8.6: a repeated Content-Length must agree; anything else is refused.
            digits = value.strip()
            if not digits.isdigit():
                raise BadContentLength()
            # Without its leading zeros: int() refuses over 4,300 digits, zeros included.
            digits = digits.lstrip(b"0") or b"0"
            if len(digits) > _MAX_LENGTH_DIGITS:
                raise BodyTooLarge()  # beyond any body we forward
            length = int(digits)
            if content_length is not None and length != content_length:
                raise BadContentLength()
            content_length = length
            continue
        if name == b"transfer-encoding":
            transfer_encoding = True
            continue
        if name == b"host":
            if host is None:
                host = value
            continue
        if name == _FORWARDED_FOR:
            forwarded_for.append(value.strip())
            continue
        key = name.translate(_FOLD)
        if (
            key in _HOP_BY_HOP
            or key in _REWRITTEN
            or key in named
            or key in removed
            or key in _CLIENT_CLAIMS
            or key.startswith(_REMOVED_PREFIXES)
        ):
            continue
        if overrides_to_unforwarded(key, value):
            raise MethodNotAllowed()
        headers.append((name, value))
    if transfer_encoding and content_length is not None:
        # RFC 9112 §6.1: a request with both is a smuggling attempt or a broken client;
        # which framing the server used is not ours to guess, so it is refused, and the
        # connection closed.
        raise ConflictingFraming()
    if content_length is not None and content_length > max_body_bytes:
        raise BodyTooLarge()

    if client_host is not None:
        forwarded_for.append(client_host.encode())
    if forwarded_for:
        headers.append((_FORWARDED_FOR, b", ".join(part for part in forwarded_for if part)))
    headers.append((b"x-forwarded-proto", scheme.encode()))
    if host:
        headers.append((b"x-forwarded-host", host))

    if principal is not None:
        if principal.kind is CredentialKind.API_KEY:
            if upstream_api_key is not None:
                headers.append((_UPSTREAM_API_KEY_HEADER, upstream_api_key.encode()))
        elif upstream_mobile_api_key is not None:
            headers.append((_AUTHORIZATION, upstream_mobile_api_key.encode()))
        headers.extend(caller_headers(principal))
    return headers, content_length


def upstream_target(
    route: str, raw_path: bytes | None, root_path: str, query_string: bytes, *, base_path: bytes
) -> bytes:
    """The request-target sent upstream: ``base_path``, the raw path below ``root_path``, and
    the query, byte for byte as the client sent them.

    A proxy mounted under a prefix forwards what is below its mount point, as the app it stands
    for would see it. The middleware judged the decoded route path ``route``, so the raw bytes
    are forwarded only when they decode to exactly that path. Without ``raw_path`` (it is
    optional in ASGI) the route path is percent-encoded.

    Raises:
        UnforwardableTarget: the raw path does not decode to ``route`` (an outer layer
            rewrote ``scope["path"]`` but not ``raw_path``, or a server decoded them
            otherwise): the upstream must never receive a path no rule saw.
        AmbiguousTarget: the raw path holds ``%2F``, ``%5C`` or ``#``.
    """
    if raw_path is None:
        path = quote(route, safe=_PATH_SAFE).encode("ascii")
    else:
        # A "?" ends the path on the wire; older httpx ASGITransports left the query in
        # (encode/httpx#2810).
        path = _below_root_path(raw_path.partition(b"?")[0], root_path)
        if decode_path(path) != route:
            raise UnforwardableTarget()
    if has_ambiguous_separators(path):
        raise AmbiguousTarget()
    target = base_path + path
    if query_string:
        target += b"?" + query_string
    return target


class BodyFraming(NamedTuple):
    """How a request body goes upstream.

    Attributes:
        content_length: the Content-Length sent upstream, or ``None`` for none (the body, if
            any, then goes chunked).
        streamed: whether a body follows the headers.
    """

    content_length: int | None
    streamed: bool


def body_framing(
    declared: int | None, first: bytes, more: bool, *, max_body_bytes: int
) -> BodyFraming:
    """Frame the body upstream as the client did.

    With a declared length above zero, the body is streamed under that length (and must match
    it, see :func:`check_body_complete`); ``first`` and ``more`` are not looked at, as nothing
    needs to be read before the request starts. Otherwise they are the first part of the body
    with data (``b""`` and ``False`` when none came), which tells whether there is a body at
    all: a GET must not go upstream with a chunked empty body.

    Raises:
        BadContentLength: a declared length of zero, but a body arrived.
        BodyTooLarge: the first part alone is larger than ``max_body_bytes``.
    """
    if declared:
        return BodyFraming(declared, streamed=True)
    has_body = bool(first) or more
    if declared == 0:
        if has_body:
            raise BadContentLength(close=True)
        return BodyFraming(0, streamed=False)
    if has_body and len(first) > max_body_bytes:
        raise BodyTooLarge()
    return BodyFraming(None, streamed=has_body)


def check_body_size(size: int, *, max_body_bytes: int, declared: int | None) -> None:
    """Check ``size``, the bytes of body received so far, as each part arrives (a chunked body
    has no length to check up front).

    Raises:
        BodyTooLarge: ``size`` is beyond ``max_body_bytes``.
        BadContentLength: ``size`` is beyond the declared length.
    """
    if size > max_body_bytes:
        raise BodyTooLarge()
    if declared is not None and size > declared:
        raise BadContentLength(close=True)


def check_body_complete(size: int, *, declared: int | None) -> None:
    """Check the size of a body read to its end against the declared length, which it must
    match exactly: an ASGI server that framed the body otherwise would have the upstream read
    a different request.

    Raises:
        BadContentLength: the body is shorter than declared.
    """
    if declared is not None and size != declared:
        raise BadContentLength(close=True)


def response_headers(fields: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream's response header fields to relay to the client, in their order.

    Hop-by-hop fields and those the Connection header names are dropped (RFC 9110 §7.6.1),
    and so are Date and Server, which the serving ASGI server sets itself.
    """
    fields = list(fields)
    named = _connection_tokens(fields)
    # RFC 9112 §6.3: with Transfer-Encoding, a Content-Length is wrong and a proxy must drop it
    # (the body is relayed as it comes; the client's server frames it anew).
    if any(name.lower() == b"transfer-encoding" for name, _ in fields):
        named |= {b"content-length"}
    headers: Headers = []
    for name, value in fields:
        name = name.lower()
        if name in _HOP_BY_HOP or name in _SERVER_SET or name.translate(_FOLD) in named:
            continue
        headers.append((name, value))
    return headers


def client_location(
    location: bytes, *, origins: Iterable[bytes], base_path: bytes, root_path: str
) -> bytes:
    """``location`` as the client must follow it: a redirect to the upstream itself becomes
    one to the same place through this gateway, as nginx's default ``proxy_redirect`` does.

    Given as a path (RFC 9110 §10.2.2 allows a relative reference), never with the host the
    client sent: that would put a header the client chose into the response. Any other
    location (another host, a path outside the upstream's base path) is left as it is.

    Args:
        location: the upstream's Location value.
        origins: the spellings of the upstream's origin, lower case (``http://host:port``).
        base_path: the upstream's base path without its final ``/`` (``b""`` for none).
        root_path: where the gateway is mounted (ASGI ``root_path``).
    """
    value = location.strip()
    lowered = value.lower()
    for origin in origins:
        if _has_prefix(lowered, origin):
            value = value[len(origin) :]
            break
    else:
        if not value.startswith(b"/") or value.startswith(b"//"):
            return location
    if base_path:
        if not _has_prefix(value, base_path):
            return location
        value = value[len(base_path) :]
    if not value.startswith(b"/"):
        value = b"/" + value
    # What is left must be a plain path: "http://upstream//evil.example/" cut down to
    # "//evil.example/" (or "/\\evil.example", which browsers read alike) would send the
    # client to another site, and dot segments could climb out of the mount point. Such a
    # location is relayed as the upstream wrote it, on the upstream's own host.
    path = value.split(b"?", 1)[0].split(b"#", 1)[0]
    if has_unsafe_segments(decode_path(path)):
        return location
    if root_path:
        value = quote(root_path.rstrip("/"), safe=_PATH_SAFE).encode("ascii") + value
    return value


def _connection_tokens(fields: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names every ``Connection`` header lists (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            tokens.update(token.strip().translate(_FOLD) for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def _has_prefix(value: bytes, prefix: bytes) -> bool:
    """Whether ``value`` starts with ``prefix`` as a whole (``/api`` in ``/api/x``, ``/api?q``
    and ``/api``, not in ``/apix``)."""
    return value.startswith(prefix) and value[len(prefix) : len(prefix) + 1] in _URL_PART_ENDS


def _below_root_path(raw: bytes, root_path: str) -> bytes:
    """``raw`` without the leading segments that decode to ``root_path`` (``/%61pi`` is
    ``/api`` too), or all of it when none do."""
    if not root_path:
        return raw
    end = raw.find(b"/", 1)
    while True:
        stop = len(raw) if end < 0 else end
        if decode_path(raw[:stop]) == root_path:
            return raw[stop:] or b"/"
        if end < 0:
            return raw
        end = raw.find(b"/", end + 1)
