"""ReverseProxy: forward admitted requests to an upstream HTTP server, streaming both ways.

Put it behind :class:`~devicegate.DeviceAuthMiddleware`: the middleware decides who may pass, the
proxy translates the caller's credential into the upstream's own and forwards the request. It
needs httpx (the ``devicegate[server]`` extra), which is imported here and nowhere else.

This module does the ASGI and httpx work: streaming, deadlines, the pooled client, failures.
What crosses the gateway (which fields, which target, how the body is framed, where a redirect
points) is decided by the pure functions of :mod:`devicegate.gateway._policy`.

References:
    https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1
    https://www.rfc-editor.org/rfc/rfc9110#section-7.6.3
    https://asgi.readthedocs.io/en/latest/specs/www.html
"""

from __future__ import annotations

import logging
import math
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from .._asgi import send_refusal, serve_lifespan
from .._config import VISIBLE_ASCII, check_header_name
from .._counters import Counters
from .._errors import ConfigError, Refusal
from .._principal import get_principal
from .._rules import route_path
from ._policy import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TIMEOUT,
    body_framing,
    check_body_complete,
    check_body_size,
    client_credential_fields,
    client_location,
    request_headers,
    response_headers,
    upstream_target,
)
from ._refusals import (
    BadGateway,
    BodyTimeout,
    GatewayTimeout,
    MethodNotAllowed,
    UnforwardableTarget,
    WebsocketNotForwarded,
)
from ._request_line import is_unforwarded

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "ReverseProxy"]

logger = logging.getLogger("devicegate")


class _ClientGone(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterator over ``receive()``: httpx pulls, nothing buffers.

    A plain iterator class rather than an async generator, so that an upstream that stops
    reading early leaves no unfinished generator behind. ``length`` is the declared
    Content-Length, which the body must match exactly (see check_body_complete).
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
                check_body_complete(self._size, declared=self._length)
                raise StopAsyncIteration
            message = await _receive_within(self._receive, self._idle_seconds)
            if message["type"] == "http.disconnect":
                raise _ClientGone
            self._pending = message.get("body", b"")
            self._more = bool(message.get("more_body", False))
            self._size += len(self._pending)
            check_body_size(self._size, max_body_bytes=self._limit, declared=self._length)
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
        counters: where to count the exchanges with the upstream and their latency (for
            :mod:`devicegate.metrics`); ``None`` counts nothing.

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
        counters: Counters | None = None,
    ) -> None:
        self.upstream = _check_upstream(upstream)
        self._counters = counters
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
        self._removed = client_credential_fields(
            check_header_name("api_key_header", api_key_header),
            check_header_name("device_header", device_header),
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
            client = scope.get("client")
            headers, declared = request_headers(
                scope["headers"],
                client_host=str(client[0]) if client else None,
                scheme=str(scope.get("scheme", "http")),
                principal=get_principal(scope),
                removed=self._removed,
                upstream_api_key=self._upstream_api_key,
                upstream_mobile_api_key=self._upstream_mobile_api_key,
                max_body_bytes=self.max_body_bytes,
            )
            target = upstream_target(
                route_path(scope),
                scope.get("raw_path"),
                scope.get("root_path", ""),
                scope.get("query_string") or b"",
                base_path=self._base_path,
            )
            try:
                url = self._base_url.copy_with(raw_path=target)
            except (httpx.InvalidURL, UnicodeDecodeError):
                raise UnforwardableTarget() from None
            first, more = b"", True
            if not declared:
                # No declared length (a chunked body, an HTTP/2 body, or none at all), or
                # zero: the first part with data tells which. Either way the body is read up
                # to its end before the disconnect watcher starts listening.
                first, more = await _first_part(receive, self.timeout)
            framing = body_framing(declared, first, more, max_body_bytes=self.max_body_bytes)
        except Refusal as refusal:
            await send_refusal(scope, send, refusal)
            return
        except _ClientGone:
            return

        if framing.content_length is not None:
            headers.append((b"content-length", str(framing.content_length).encode()))
        body: _RequestBody | None = None
        if framing.streamed:
            body = _RequestBody(
                receive, first, more, self.max_body_bytes, declared, idle_seconds=self.timeout
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
        counters = self._counters
        started = time.monotonic()
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
            if counters is not None:
                counters.upstream["timeout"] += 1
            await send_refusal(scope, send, GatewayTimeout())
            return
        except Exception as exc:
            # Nothing has been sent to the client yet, so it gets a proper answer: an
            # unreachable upstream (httpx.TransportError), or anything httpx, httpcore or h11
            # raise on the way there (h11.LocalProtocolError escapes httpx unwrapped), is a
            # 502 rather than the server's bare 500.
            logger.warning("devicegate: the upstream exchange failed (%s)", type(exc).__name__)
            if counters is not None:
                counters.upstream["failed"] += 1
            await send_refusal(scope, send, BadGateway())
            return
        if counters is not None:
            counters.upstream_answered(time.monotonic() - started)
        try:
            await self._relay(send, response, scope.get("root_path", ""))
        finally:
            # Shielded: after a client disconnect cancelled the exchange, the connection must
            # still be released (or closed) properly.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(self, send: Send, response: httpx.Response, root_path: str) -> None:
        headers = response_headers(response.headers.raw)
        for index, (name, value) in enumerate(headers):
            if name == b"location":
                location = client_location(
                    value, origins=self._origins, base_path=self._base_path, root_path=root_path
                )
                headers[index] = (name, location)
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
                if self._counters is not None:
                    self._counters.upstream["cut_off"] += 1
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _origins(url: httpx.URL) -> tuple[bytes, ...]:
    """The spellings of ``url``'s origin a redirect may use: lower case, with and without a
    default port."""
    scheme = url.scheme.encode("ascii")
    netloc = url.netloc.lower()
    default_port = b":443" if scheme == b"https" else b":80"
    if url.port is None:
        return (scheme + b"://" + netloc, scheme + b"://" + netloc + default_port)
    return (scheme + b"://" + netloc,)


async def _receive_within(receive: Receive, seconds: float) -> Message:
    """The client's next message, or a 408 when its body pauses for ``seconds``: a client that
    stops sending its body must not hold a pooled upstream connection. (Each part resets the
    wait, as nginx's ``client_body_timeout`` does: a client that keeps trickling is not cut.)"""
    with anyio.move_on_after(seconds):
        return await receive()
    # Reached only when our own deadline passed (a TimeoutError from receive() itself passes
    # through as itself).
    raise BodyTimeout()


async def _first_part(receive: Receive, seconds: float) -> tuple[bytes, bool]:
    """The client's first body part with data and whether more follows; ``(b"", False)`` for
    an empty body."""
    chunk, more = b"", True
    while more and not chunk:
        message = await _receive_within(receive, seconds)
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
    return chunk, more


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
