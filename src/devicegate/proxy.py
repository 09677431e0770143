"""ReverseProxy: forward admitted requests to an upstream HTTP server, streaming both ways.

Put it behind :class:`~devicegate.DeviceAuthMiddleware`: the middleware decides who may pass, the
proxy translates the caller's credential into the upstream's own and forwards the request. It
needs httpx (the ``devicegate[server]`` extra), which is imported here and nowhere else.

References:
    https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1
    https://www.rfc-editor.org/rfc/rfc9110#section-7.6.3
    https://asgi.readthedocs.io/en/latest/specs/www.html
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from ._asgi import json_body, send_response
from ._config import _check_header
from ._errors import ConfigError
from ._principal import CredentialKind, get_principal

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "ReverseProxy"]

logger = logging.getLogger("devicegate")

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

Headers = list[tuple[bytes, bytes]]

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
_REWRITTEN = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host"}
)
_IDENTITY_PREFIX = b"x-devicegate-"
_KIND_HEADER = b"x-devicegate-kind"
_INSTANCE_ID_HEADER = b"x-devicegate-instance-id"
_AUTHORIZATION = b"authorization"
_UPSTREAM_API_KEY_HEADER = b"x-api-key"

# Upstream keys travel as header values: visible ASCII only, so nothing can split a header.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")

_ERROR_HEADERS = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))
_BAD_GATEWAY = (502, "bad_gateway", "The upstream server could not be reached.")
_GATEWAY_TIMEOUT = (504, "gateway_timeout", "The upstream server did not answer in time.")
_TOO_LARGE = (413, "invalid_request", "The request body is larger than this gateway accepts.")
_BAD_LENGTH = (400, "invalid_request", "The Content-Length header is invalid.")
_BAD_TARGET = (400, "invalid_request", "The request target cannot be forwarded.")
_NO_WEBSOCKETS = (501, "invalid_request", "This gateway does not forward websockets.")


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterator over ``receive()``: httpx pulls, nothing buffers.

    A plain iterator class rather than an async generator, so that an upstream that stops
    reading early leaves no unfinished generator behind.
    """

    def __init__(self, receive: Receive, first: bytes, more: bool, limit: int) -> None:
        self._receive = receive
        self._pending = first
        self._more = more
        self._size = len(first)
        self._limit = limit
        self.done = anyio.Event()
        if not more:
            self.done.set()

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            if not self._more:
                raise StopAsyncIteration
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            self._pending = message.get("body", b"")
            self._more = bool(message.get("more_body", False))
            self._size += len(self._pending)
            if self._size > self._limit:
                # Checked as the bytes arrive: a chunked body has no length to check up front.
                raise _BodyTooLarge
            if not self._more:
                self.done.set()


class ReverseProxy:
    """Forward every request to ``upstream``, streaming bodies both ways.

    Put it behind :class:`~devicegate.DeviceAuthMiddleware`, which only lets authenticated
    requests through; on its own the proxy forwards anything. For each request it:

    * keeps the method, the status, the path and query exactly as received (``raw_path`` and
      ``query_string`` bytes), and repeated headers in order;
    * removes hop-by-hop headers (RFC 9110 §7.6.1) both ways, and adds ``X-Forwarded-For``
      (appending the client address), ``X-Forwarded-Proto`` and ``X-Forwarded-Host``;
    * translates credentials: the client's ``Authorization``, API key and device headers are
      removed, and the upstream's own key is injected for the principal the middleware stored:
      ``X-API-Key: <upstream_api_key>`` for a server API key, ``Authorization:
      <upstream_mobile_api_key>`` (as the SenseCrypt mobile SDK sends it) for a mobile key or a
      device token. A public path gets no upstream credential;
    * states who called: any ``X-Devicegate-*`` header the client sent is dropped, then
      ``X-Devicegate-Kind`` and, for a device-bound token, ``X-Devicegate-Instance-Id`` are set;
    * bounds the request body (413, by ``Content-Length`` up front and while streaming), and
      answers 502 when the upstream cannot be reached and 504 when it is too slow, with a JSON
      ``{"error": ..., "error_description": ...}`` body of fixed text.

    Websockets are not forwarded: the handshake is denied (501 with the websocket
    denial-response extension, else a 1008 close). A client that disconnects ends the upstream
    exchange too.

    One pooled :class:`httpx.AsyncClient` serves the whole process: created at lifespan startup
    (or on the first request) and closed at lifespan shutdown or by :meth:`aclose`. A
    ``client`` you pass is used as is and never closed here; its default headers, cookies,
    base URL and redirect settings are not applied (requests are built here and sent with
    ``client.send``), but its transport, pool limits, TLS and proxy settings are.

    Args:
        upstream: the upstream's base URL (``http://`` or ``https://``); a path in it is put
            before every forwarded path.
        upstream_api_key: the upstream's server key, sent as ``X-API-Key`` for callers that
            presented a server API key.
        upstream_mobile_api_key: the upstream's mobile key, sent raw in ``Authorization`` for
            callers that presented a mobile key or a device token.
        timeout: seconds allowed to connect, to send each part of the request, to wait for
            each part of the response, and to get a pooled connection.
        max_body_bytes: the largest request body forwarded.
        client: the httpx client to send with (see above).
        api_key_header: the header the gate reads the server API key from (removed).
        device_header: the header the gate reads the device id from (removed: the verified id
            travels in ``X-Devicegate-Instance-Id``).

    Raises:
        ConfigError: the URL is not an absolute http(s) URL, carries credentials, a query or a
            fragment; a key is empty or not visible ASCII; a number is out of range.

    References:
        https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1
        https://www.rfc-editor.org/rfc/rfc7239#section-1 (the X-Forwarded-* fields it replaced)
        https://asgi.readthedocs.io/en/latest/specs/lifespan.html
    """

    def __init__(
        self,
        upstream: str,
        *,
        upstream_api_key: str | None = None,
        upstream_mobile_api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        client: httpx.AsyncClient | None = None,
        api_key_header: str = "x-api-key",
        device_header: str = "x-instance-id",
    ) -> None:
        self.upstream = _check_upstream(upstream)
        self._base_url = httpx.URL(self.upstream)
        self._base_path = self._base_url.raw_path.rstrip(b"/")
        self._upstream_api_key = _check_key("upstream_api_key", upstream_api_key)
        self._upstream_mobile_api_key = _check_key(
            "upstream_mobile_api_key", upstream_mobile_api_key
        )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigError("timeout", f"must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
            raise ConfigError("max_body_bytes", "must be an integer")
        if max_body_bytes < 0:
            raise ConfigError("max_body_bytes", f"must be at least 0, got {max_body_bytes}")
        self.max_body_bytes = max_body_bytes
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise ConfigError(
                "client", f"must be an httpx.AsyncClient, got {type(client).__name__}"
            )
        self._client = client
        self._owns_client = client is None
        self._removed = frozenset(
            {
                _AUTHORIZATION,
                _check_header("api_key_header", api_key_header).encode("latin-1"),
                _check_header("device_header", device_header).encode("latin-1"),
            }
        )
        self._timeouts = httpx.Timeout(self.timeout).as_dict()

    def __repr__(self) -> str:
        def hidden(key: str | None) -> str:
            return "None" if key is None else "<hidden>"

        return (
            f"{type(self).__name__}(upstream={self.upstream!r}, "
            f"upstream_api_key={hidden(self._upstream_api_key)}, "
            f"upstream_mobile_api_key={hidden(self._upstream_mobile_api_key)}, "
            f"timeout={self.timeout!r}, max_body_bytes={self.max_body_bytes!r})"
        )

    def _get_client(self) -> httpx.AsyncClient:
        # No await between the check and the assignment: concurrent first requests share one.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=False,
                # Deterministic routing: no HTTP(S)_PROXY or .netrc from the environment.
                trust_env=False,
                # Responses belong to the client that asked; a shared jar would collect every
                # caller's cookies. This policy refuses to store any.
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the pooled client this proxy created (a client passed in is left open)."""
        client, owned = self._client, self._owns_client
        if owned:
            self._client = None
        if client is not None and owned:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            await self._forward(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(receive, send)
        elif scope_type == "websocket":
            await _send_error(scope, send, _NO_WEBSOCKETS)
        else:
            raise RuntimeError(f"devicegate's proxy cannot handle ASGI scope type {scope_type!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._get_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers, content_length = self._request_headers(scope)
        except ValueError:
            await _send_error(scope, send, _BAD_LENGTH)
            return
        if content_length is not None and content_length > self.max_body_bytes:
            await _send_error(scope, send, _TOO_LARGE, close=True)
            return
        target = self._base_path + _raw_route_path(scope)
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            url = self._base_url.copy_with(raw_path=target)
        except (httpx.InvalidURL, UnicodeDecodeError):
            await _send_error(scope, send, _BAD_TARGET)
            return

        body: _RequestBody | None = None
        if content_length:
            body = _RequestBody(receive, b"", True, self.max_body_bytes)
            headers.append((b"content-length", str(content_length).encode()))
        else:
            # No declared length (a chunked body, an HTTP/2 body, or none at all), or zero:
            # the first message with data tells which, so that a GET is not sent upstream
            # with a chunked empty body. Either way the body is read up to its end before the
            # disconnect watcher starts listening.
            chunk, more = b"", True
            while more and not chunk:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                more = bool(message.get("more_body", False))
            if content_length == 0:
                if chunk or more:
                    await _send_error(scope, send, _BAD_LENGTH, close=True)
                    return
                headers.append((b"content-length", b"0"))
            elif chunk or more:
                if len(chunk) > self.max_body_bytes:
                    await _send_error(scope, send, _TOO_LARGE, close=True)
                    return
                body = _RequestBody(receive, chunk, more, self.max_body_bytes)

        request = httpx.Request(
            scope["method"],
            url,
            headers=headers,
            content=body,
            # httpcore writes ``target`` verbatim as the request-target: the path and query
            # reach the upstream byte for byte, with no re-quoting or normalisation.
            extensions={"target": target, "timeout": self._timeouts},
        )
        await self._exchange(scope, receive, send, request, body)

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: httpx.Request,
        body: _RequestBody | None,
    ) -> None:
        exchange = anyio.CancelScope()
        error: Exception | None = None
        async with anyio.create_task_group() as watchers:
            # Once the body is read, a disconnect from the client ends the upstream exchange
            # instead of leaving it to run (and hold a pooled connection) for nobody.
            watchers.start_soon(_watch_disconnect, receive, body, exchange)
            try:
                with exchange:
                    await self._send_upstream(scope, send, request)
            except Exception as exc:
                error = exc  # raised below as itself, not wrapped in an exception group
            finally:
                watchers.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _send_upstream(self, scope: Scope, send: Send, request: httpx.Request) -> None:
        try:
            response = await self._get_client().send(request, stream=True)
        except _BodyTooLarge:
            await _send_error(scope, send, _TOO_LARGE, close=True)
            return
        except _ClientGone:
            return
        except httpx.TimeoutException as exc:
            logger.warning("devicegate: the upstream timed out (%s)", type(exc).__name__)
            await _send_error(scope, send, _GATEWAY_TIMEOUT)
            return
        except httpx.TransportError as exc:
            logger.warning("devicegate: the upstream is unreachable (%s)", type(exc).__name__)
            await _send_error(scope, send, _BAD_GATEWAY)
            return
        try:
            await self._relay(send, response)
        finally:
            # Shielded: after a client disconnect cancelled the exchange, the connection must
            # still be released (or closed) properly.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(self, send: Send, response: httpx.Response) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _response_headers(response.headers.raw),
            }
        )
        if response.is_stream_consumed:
            # Only test transports (httpx.MockTransport) hand back a response already read.
            await send({"type": "http.response.body", "body": response.content})
            return
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as exc:
            # The status line is gone already: the only honest signal left is to end the
            # response unfinished, so that the server drops the connection and the client
            # sees a truncated body rather than a complete-looking one.
            logger.warning("devicegate: upstream response cut off (%s)", type(exc).__name__)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _request_headers(self, scope: Scope) -> tuple[Headers, int | None]:
        """The headers to send upstream, and the body length the client declared.

        Raises:
            ValueError: the Content-Length header is repeated with other values or not a
                number.
        """
        raw: Iterable[tuple[bytes, bytes]] = scope["headers"]
        named = _connection_tokens(raw)
        headers: Headers = []
        content_length: int | None = None
        forwarded_for: list[bytes] = []
        host: bytes | None = None
        for name, value in raw:
            name = name.lower()
            if name == b"content-length":
                # RFC 9110 §8.6: a repeated Content-Length must agree; anything else is refused.
                if not value.strip().isdigit():
                    raise ValueError("Content-Length is not a number")
                length = int(value)
                if content_length is not None and length != content_length:
                    raise ValueError("Content-Length values disagree")
                content_length = length
            elif name == b"host":
                if host is None:
                    host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value.strip())
            elif (
                name in _HOP_BY_HOP
                or name in _REWRITTEN
                or name in named
                or name in self._removed
                or name.startswith(_IDENTITY_PREFIX)
            ):
                continue
            else:
                headers.append((name, value))

        client_address = scope.get("client")
        if client_address:
            forwarded_for.append(str(client_address[0]).encode())
        if forwarded_for:
            headers.append((b"x-forwarded-for", b", ".join(part for part in forwarded_for if part)))
        headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode()))
        if host:
            headers.append((b"x-forwarded-host", host))

        principal = get_principal(scope)
        if principal is not None:
            if principal.kind is CredentialKind.API_KEY:
                if self._upstream_api_key is not None:
                    headers.append((_UPSTREAM_API_KEY_HEADER, self._upstream_api_key.encode()))
            elif self._upstream_mobile_api_key is not None:
                headers.append((_AUTHORIZATION, self._upstream_mobile_api_key.encode()))
            headers.append((_KIND_HEADER, principal.kind.value.encode()))
            if principal.instance_id is not None:
                headers.append((_INSTANCE_ID_HEADER, principal.instance_id.encode()))
        return headers, content_length


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names every ``Connection`` header lists (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    raw = list(raw)
    named = _connection_tokens(raw)
    headers: Headers = []
    for name, value in raw:
        name = name.lower()
        if name in _HOP_BY_HOP or name in named:
            continue
        headers.append((name, value))
    return headers


def _raw_route_path(scope: Scope) -> bytes:
    """The request path as the client sent it (percent-encoding intact), below ``root_path``.

    A proxy mounted under a prefix forwards what is below its mount point, as the app it stands
    for would see it.
    """
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        raw = quote(scope["path"], safe="/!$&'()*+,;=:@").encode("ascii")
    root_path = scope.get("root_path", "")
    if root_path:
        prefix = quote(root_path, safe="/!$&'()*+,;=:@").encode("ascii")
        if raw.startswith(prefix) and raw[len(prefix) : len(prefix) + 1] in (b"", b"/"):
            raw = raw[len(prefix) :] or b"/"
    return raw


async def _watch_disconnect(
    receive: Receive, body: _RequestBody | None, exchange: anyio.CancelScope
) -> None:
    if body is not None:
        await body.done.wait()
    # The body has been read to its end: the next message an ASGI server sends is the
    # disconnect, whenever it happens. Anything else breaks the protocol; stop listening then
    # rather than spin on a receive() that never waits.
    message: Message = await receive()
    if message["type"] == "http.disconnect":
        exchange.cancel()


async def _send_error(
    scope: Scope, send: Send, error: tuple[int, str, str], *, close: bool = False
) -> None:
    status, code, description = error
    body = json_body({"error": code, "error_description": description})
    headers = [*_ERROR_HEADERS, (b"content-length", str(len(body)).encode())]
    if close:
        # The client may still be sending a body we will not read; end the connection after
        # the answer rather than parse the rest as a next request.
        headers.append((b"connection", b"close"))
    await send_response(scope, send, status, headers, body)


def _check_upstream(upstream: object) -> str:
    if not isinstance(upstream, str):
        raise ConfigError("upstream", f"must be a URL string, got {type(upstream).__name__}")
    try:
        parts = urlsplit(upstream)
        _ = parts.port  # raises for a port that is not a number in range
    except ValueError:
        raise ConfigError("upstream", f"is not a valid URL: {upstream!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "upstream",
            f"must be an http:// or https:// URL such as http://127.0.0.1:9000, got {upstream!r}",
        )
    if parts.username is not None or parts.password is not None:
        # Never echo it: the URL holds a password.
        raise ConfigError(
            "upstream", "must not carry credentials; use upstream_api_key / upstream_mobile_api_key"
        )
    if parts.query or parts.fragment or "?" in upstream or "#" in upstream:
        raise ConfigError("upstream", f"must not have a query or fragment, got {upstream!r}")
    try:
        httpx.URL(upstream)
    except httpx.InvalidURL:
        raise ConfigError("upstream", f"is not a valid URL: {upstream!r}") from None
    return upstream


def _check_key(field: str, key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not _VISIBLE_ASCII.fullmatch(key):
        raise ConfigError(
            field, "must be a non-empty string of visible ASCII (it travels in a header)"
        )
    return key
