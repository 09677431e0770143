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
from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from .._asgi import send_refusal, serve_lifespan
from .._config import DEFAULT_UPSTREAM_TIMEOUT, VISIBLE_ASCII, check_header_name
from .._errors import ConfigError, Refusal
from .._principal import CredentialKind, get_principal
from .._rules import has_unsafe_segments, route_path
from ._refusals import (
    AmbiguousTarget,
    BadContentLength,
    BadGateway,
    BodyTimeout,
    BodyTooLarge,
    ConflictingFraming,
    GatewayTimeout,
    MethodNotAllowed,
    UnforwardableTarget,
    WebsocketNotForwarded,
)
from ._request_line import (
    decode_path,
    has_ambiguous_separators,
    is_unforwarded,
    overrides_to_unforwarded,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "ReverseProxy"]

logger = logging.getLogger("devicegate")

DEFAULT_TIMEOUT = DEFAULT_UPSTREAM_TIMEOUT
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
# Response fields the serving ASGI server sets itself: passing the upstream's on would send
# the client two Date headers (RFC 9110 §6.6.1 allows one) and name the upstream's software.
_SERVER_SET = frozenset({b"date", b"server"})

# The characters RFC 3986 §3.3 allows unencoded in a path segment, and "/".
_PATH_SAFE = "/!$&'()*+,;=:@"
_URL_PART_ENDS = (b"", b"/", b"?", b"#")

_MAX_LENGTH_DIGITS = 18  # without leading zeros: up to an exabyte


class _ClientGone(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterator over ``receive()``: httpx pulls, nothing buffers.

    A plain iterator class rather than an async generator, so that an upstream that stops
    reading early leaves no unfinished generator behind. ``length`` is the declared
    Content-Length, which the body must match exactly (an ASGI server that framed the body
    otherwise would have the upstream read a different request).
    """

    def __init__(
        self,
        receive: Receive,
        first: bytes,
        more: bool,
        limit: int,
        length: int | None = None,
        *,
        idle_seconds: float,
    ) -> None:
        self._receive = receive
        self._idle_seconds = idle_seconds
        self._pending = first
        self._more = more
        self._size = len(first)
        self._limit = limit
        self._length = length
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
                if self._length is not None and self._size != self._length:
                    raise BadContentLength(close=True)
                raise StopAsyncIteration
            message = await _receive_within(self._receive, self._idle_seconds)
            if message["type"] == "http.disconnect":
                raise _ClientGone
            self._pending = message.get("body", b"")
            self._more = bool(message.get("more_body", False))
            self._size += len(self._pending)
            if self._size > self._limit:
                # Checked as the bytes arrive: a chunked body has no length to check up front.
                raise BodyTooLarge()
            if self._length is not None and self._size > self._length:
                raise BadContentLength(close=True)
            if not self._more:
                self.done.set()


class ReverseProxy:
    """Forward every request to ``upstream``, streaming bodies both ways.

    Put it behind :class:`~devicegate.DeviceAuthMiddleware`, which only lets authenticated
    requests through; on its own the proxy forwards anything. For each request it:

    * keeps the method, the status, the path and query exactly as received (``raw_path`` and
      ``query_string`` bytes), and repeated headers in order. The raw path is forwarded only
      when it decodes to the route path the middleware judged (400 otherwise: a layer that
      rewrites ``scope["path"]`` must rewrite or remove ``raw_path`` too), and never when it
      holds ``%2F``, ``%5C`` or ``#``, which the upstream may split otherwise (400);
    * never follows a redirect, and turns one to the upstream itself into a path through the
      gateway (the upstream's base path off, ``root_path`` on), as nginx's default
      ``proxy_redirect`` does;
    * refuses ``TRACE``, ``TRACK`` and ``CONNECT`` with 405, also when named in a
      method-override header: a reflected request would carry the injected upstream key back
      to the client;
    * removes hop-by-hop headers (RFC 9110 §7.6.1) both ways, and the upstream's ``Date`` and
      ``Server`` (the serving ASGI server sets its own). It appends the client address to
      ``X-Forwarded-For`` and sets ``X-Forwarded-Proto`` and ``X-Forwarded-Host``; the
      client's ``Forwarded``, ``X-Real-IP``, other ``X-Forwarded-*``, ``X-Original-URL``,
      ``X-Original-URI``, ``X-Original-Host`` and ``X-Rewrite-URL`` are dropped;
    * translates credentials: the client's ``Authorization``, API key and device headers are
      removed, and the upstream's own key is injected for the principal the middleware stored:
      ``X-API-Key: <upstream_api_key>`` for a server API key, ``Authorization:
      <upstream_mobile_api_key>`` (as the SenseCrypt mobile SDK sends it) for a mobile key or a
      device token. A public path gets no upstream credential;
    * states who called: any ``X-Devicegate-*`` header the client sent is dropped, then
      ``X-Devicegate-Kind`` and, for a device-bound token, ``X-Devicegate-Instance-Id`` are set.
      Every removal also applies to look-alike names (``X_Devicegate_Kind``,
      ``X.Api.Key``), which CGI, WSGI and PHP upstreams read as the dashed name;
    * refuses a request with both ``Content-Length`` and ``Transfer-Encoding`` (400, RFC 9112
      §6.1), bounds the request body (413, by ``Content-Length`` up front and while
      streaming), answers 408 (and closes the connection) when the body pauses for longer
      than ``timeout``, 502 when the upstream cannot be reached or the exchange fails before
      the response started, and 504 when it is too slow, with a JSON ``{"error": ...,
      "error_description": ...}`` body of fixed text.

    Websockets are not forwarded: the handshake is denied (501 with the websocket
    denial-response extension, else a 1008 close). A client that disconnects ends the upstream
    exchange too.

    One pooled :class:`httpx.AsyncClient` serves the whole process: created at lifespan startup
    (or on the first request) and closed at lifespan shutdown or by :meth:`aclose`. A
    ``client`` you pass is used as is and never closed here; its default headers, cookies,
    base URL and redirect settings are not applied (requests are built here and sent with
    ``client.send``, never following a redirect: the client gets the upstream's 3xx), but its
    transport, pool limits, TLS and proxy settings are.

    Args:
        upstream: the upstream's base URL (``http://`` or ``https://``); a path in it is put
            before every forwarded path.
        upstream_api_key: the upstream's server key, sent as ``X-API-Key`` for callers that
            presented a server API key.
        upstream_mobile_api_key: the upstream's mobile key, sent raw in ``Authorization`` for
            callers that presented a mobile key or a device token.
        timeout: seconds allowed to connect, to send each part of the request, to wait for
            each part of the response, and to get a pooled connection; also the longest the
            client's body may pause between two parts before a 408.
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
        self._origins = _origins(self._base_url)
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
        # The client's credentials, in the folded form names are compared in; the header the
        # upstream key is injected under goes too, whatever the gate's own header is called,
        # so that a client's value never stands next to (or in for) the injected one.
        self._removed = frozenset(
            name.encode("latin-1").translate(_FOLD)
            for name in (
                "authorization",
                _UPSTREAM_API_KEY_HEADER.decode(),
                check_header_name("api_key_header", api_key_header),
                check_header_name("device_header", device_header),
            )
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
            await serve_lifespan(receive, send, startup=self._open, shutdown=self.aclose)
        elif scope_type == "websocket":
            await send_refusal(scope, send, WebsocketNotForwarded())
        else:
            raise RuntimeError(f"devicegate's proxy cannot handle ASGI scope type {scope_type!r}")

    async def _open(self) -> None:
        self._get_client()

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if is_unforwarded(scope["method"]):
                raise MethodNotAllowed()
            headers, content_length = self._request_headers(scope)
            if content_length is not None and content_length > self.max_body_bytes:
                raise BodyTooLarge()
            route = _raw_route_path(scope)
            if route is None:
                raise UnforwardableTarget()
            if has_ambiguous_separators(route):
                raise AmbiguousTarget()
            target = self._base_path + route
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            try:
                url = self._base_url.copy_with(raw_path=target)
            except (httpx.InvalidURL, UnicodeDecodeError):
                raise UnforwardableTarget() from None
        except Refusal as refusal:
            await send_refusal(scope, send, refusal)
            return

        body: _RequestBody | None = None
        if content_length:
            body = _RequestBody(
                receive,
                b"",
                True,
                self.max_body_bytes,
                content_length,
                idle_seconds=self.timeout,
            )
            headers.append((b"content-length", str(content_length).encode()))
        else:
            # No declared length (a chunked body, an HTTP/2 body, or none at all), or zero:
            # the first message with data tells which, so that a GET is not sent upstream
            # with a chunked empty body. Either way the body is read up to its end before the
            # disconnect watcher starts listening.
            chunk, more = b"", True
            while more and not chunk:
                try:
                    message = await _receive_within(receive, self.timeout)
                except Refusal as refusal:
                    await send_refusal(scope, send, refusal)
                    return
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                more = bool(message.get("more_body", False))
            if content_length == 0:
                if chunk or more:
                    await send_refusal(scope, send, BadContentLength(close=True))
                    return
                headers.append((b"content-length", b"0"))
            elif chunk or more:
                if len(chunk) > self.max_body_bytes:
                    await send_refusal(scope, send, BodyTooLarge())
                    return
                body = _RequestBody(
                    receive, chunk, more, self.max_body_bytes, idle_seconds=self.timeout
                )

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
            # Never followed, whatever the client says: httpx would carry the injected upstream
            # key (only Authorization is stripped) and the original path to another host.
            response = await self._get_client().send(request, stream=True, follow_redirects=False)
        except Refusal as refusal:
            await send_refusal(scope, send, refusal)
            return
        except _ClientGone:
            return
        except httpx.TimeoutException as exc:
            logger.warning("devicegate: the upstream timed out (%s)", type(exc).__name__)
            await send_refusal(scope, send, GatewayTimeout())
            return
        except Exception as exc:
            # Nothing has been sent to the client yet, so it gets a proper answer: an
            # unreachable upstream (httpx.TransportError), or anything httpx, httpcore or h11
            # raise on the way there (h11.LocalProtocolError escapes httpx unwrapped), is a
            # 502 rather than the server's bare 500.
            logger.warning("devicegate: the upstream exchange failed (%s)", type(exc).__name__)
            await send_refusal(scope, send, BadGateway())
            return
        try:
            await self._relay(send, response, scope.get("root_path", ""))
        finally:
            # Shielded: after a client disconnect cancelled the exchange, the connection must
            # still be released (or closed) properly.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(self, send: Send, response: httpx.Response, root_path: str) -> None:
        headers = _response_headers(response.headers.raw)
        for index, (name, value) in enumerate(headers):
            if name == b"location":
                headers[index] = (name, self._client_location(value, root_path))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        if response.is_stream_consumed:
            # Only test transports (httpx.MockTransport) hand back a response already read.
            await send({"type": "http.response.body", "body": response.content})
            return
        chunks = response.aiter_raw()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                # The status line is gone already: the only honest signal left is to end the
                # response unfinished, so that the server drops the connection and the client
                # sees a truncated body rather than a complete-looking one. (Only the upstream
                # read is guarded here: a failing ``send`` reaches the server as itself.)
                logger.warning("devicegate: upstream response cut off (%s)", type(exc).__name__)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _client_location(self, location: bytes, root_path: str) -> bytes:
        """``location`` as the client must follow it: a redirect to the upstream itself becomes
        one to the same place through this gateway, as nginx's default ``proxy_redirect`` does.

        Given as a path (RFC 9110 §10.2.2 allows a relative reference), never with the host the
        client sent: that would put a header the client chose into the response. Any other
        location (another host, a path outside the upstream's base path) is left as it is.
        """
        value = location.strip()
        lowered = value.lower()
        for origin in self._origins:
            if _has_prefix(lowered, origin):
                value = value[len(origin) :]
                break
        else:
            if not value.startswith(b"/") or value.startswith(b"//"):
                return location
        base = self._base_path
        if base:
            if not _has_prefix(value, base):
                return location
            value = value[len(base) :]
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

    def _request_headers(self, scope: Scope) -> tuple[Headers, int | None]:
        """The headers to send upstream, and the body length the client declared.

        Raises:
            Refusal: the Content-Length header is repeated with other values or not a
                number, or comes with Transfer-Encoding; a method override names a refused
                method.
        """
        raw: Iterable[tuple[bytes, bytes]] = scope["headers"]
        named = _connection_tokens(raw)
        headers: Headers = []
        content_length: int | None = None
        transfer_encoding = False
        forwarded_for: list[bytes] = []
        host: bytes | None = None
        for name, value in raw:
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
                or key in self._removed
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

        client_address = scope.get("client")
        if client_address:
            forwarded_for.append(str(client_address[0]).encode())
        if forwarded_for:
            headers.append((_FORWARDED_FOR, b", ".join(part for part in forwarded_for if part)))
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
            tokens.update(token.strip().translate(_FOLD) for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    raw = list(raw)
    named = _connection_tokens(raw)
    # RFC 9112 §6.3: with Transfer-Encoding, a Content-Length is wrong and a proxy must drop it
    # (the body is relayed as it comes; the client's server frames it anew).
    if any(name.lower() == b"transfer-encoding" for name, _ in raw):
        named |= {b"content-length"}
    headers: Headers = []
    for name, value in raw:
        name = name.lower()
        if name in _HOP_BY_HOP or name in _SERVER_SET or name.translate(_FOLD) in named:
            continue
        headers.append((name, value))
    return headers


def _has_prefix(value: bytes, prefix: bytes) -> bool:
    """Whether ``value`` starts with ``prefix`` as a whole (``/api`` in ``/api/x``, ``/api?q``
    and ``/api``, not in ``/apix``)."""
    return value.startswith(prefix) and value[len(prefix) : len(prefix) + 1] in _URL_PART_ENDS


def _origins(url: httpx.URL) -> tuple[bytes, ...]:
    """The spellings of ``url``'s origin a redirect may use: lower case, with and without a
    default port."""
    scheme = url.scheme.encode("ascii")
    netloc = url.netloc.lower()
    default_port = b":443" if scheme == b"https" else b":80"
    if url.port is None:
        return (scheme + b"://" + netloc, scheme + b"://" + netloc + default_port)
    return (scheme + b"://" + netloc,)


def _raw_route_path(scope: Scope) -> bytes | None:
    """The request path as the client sent it (percent-encoding intact), below ``root_path``.

    A proxy mounted under a prefix forwards what is below its mount point, as the app it stands
    for would see it. The middleware judged the decoded route path, so the raw bytes are
    forwarded only when they decode to exactly that path; ``None`` when they do not (an outer
    layer rewrote ``scope["path"]`` but not ``raw_path``, or a server decoded them otherwise):
    the upstream must never receive a path no rule saw.
    """
    path = route_path(scope)
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return quote(path, safe=_PATH_SAFE).encode("ascii")
    # A "?" ends the path on the wire; older httpx ASGITransports left the query in
    # (encode/httpx#2810).
    raw = raw.partition(b"?")[0]
    rest = _below_root_path(raw, scope.get("root_path", ""))
    if decode_path(rest) != path:
        return None
    return rest


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


async def _receive_within(receive: Receive, seconds: float) -> Message:
    """The client's next message, or a 408 when its body pauses for ``seconds``: a client that
    stops sending its body must not hold a pooled upstream connection. (Each part resets the
    wait, as nginx's ``client_body_timeout`` does: a client that keeps trickling is not cut.)"""
    with anyio.move_on_after(seconds):
        return await receive()
    # Reached only when our own deadline passed (a TimeoutError from receive() itself passes
    # through as itself).
    raise BodyTimeout()


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


def _check_upstream(upstream: object) -> str:
    # The URL itself is never echoed: it may hold a password or a token. Each message names
    # the part that is wrong instead.
    field = "upstream"
    if not isinstance(upstream, str):
        raise ConfigError(field, f"must be a URL string, got {type(upstream).__name__}")
    try:
        parts = urlsplit(upstream)
    except ValueError:
        raise ConfigError(
            field, "is not a valid URL: its host cannot be read (check the [] of an IPv6 address)"
        ) from None
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(
            field, "is not a valid URL: its port is not a number from 0 to 65535"
        ) from None
    example = "such as http://127.0.0.1:9000"
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            field, f"must be an http:// or https:// URL {example}; its scheme is neither"
        )
    if not parts.hostname:
        raise ConfigError(field, f"must be an http:// or https:// URL {example}; it has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            field, "must not carry credentials; use upstream_api_key / upstream_mobile_api_key"
        )
    if parts.query or "?" in upstream:
        raise ConfigError(field, "must not have a query ('?...'); put the path only")
    if parts.fragment or "#" in upstream:
        raise ConfigError(field, "must not have a fragment ('#...')")
    try:
        httpx.URL(upstream)
    except httpx.InvalidURL:
        raise ConfigError(
            field, "is not a valid URL: httpx refuses it (spaces or control characters?)"
        ) from None
    return upstream


def _check_key(field: str, key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not VISIBLE_ASCII.fullmatch(key):
        raise ConfigError(
            field, "must be a non-empty string of visible ASCII (it travels in a header)"
        )
    return key
