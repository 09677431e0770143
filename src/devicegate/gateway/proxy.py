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
from collections.abc import AsyncIterator
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
    ProxyLimits,
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
    GatewayBusy,
    GatewayTimeout,
    MethodNotAllowed,
    UnforwardableTarget,
    WebsocketNotForwarded,
)
from ._request_line import is_unforwarded

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "ProxyLimits", "ReverseProxy"]

logger = logging.getLogger("devicegate")


class _ClientGone(Exception):
    pass


class _ClientTooSlow(Exception):
    pass


# The safe methods (RFC 9110 §9.2.1), which change nothing upstream: after the upstream has
# answered one, a busy gateway may still tell the client to retry it.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _Slot:
    """One of the proxy's streaming slots, taken on creation and given back once."""

    def __init__(self, proxy: ReverseProxy) -> None:
        self._proxy = proxy
        self._held = True
        proxy._streaming += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._proxy._streaming -= 1


class _RequestBody:
    """The client's body as an async iterator over ``receive()``: what :meth:`read_ahead` read
    first, then the rest as httpx pulls it.

    A plain iterator class rather than an async generator, so that an upstream that stops
    reading early leaves no unfinished generator behind. ``length`` is the declared
    Content-Length, which the body must match exactly (see check_body_complete). Every part
    must come within the idle timeout and the body's deadline (see :class:`ProxyLimits`).
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
        limits: ProxyLimits,
        spent: float = 0.0,
    ) -> None:
        self._receive = receive
        self._idle_seconds = idle_seconds
        self._limits = limits
        # Seconds spent waiting for the client's parts: only its own time counts against it
        # (not the wait for an upstream connection, nor an upstream that reads slowly).
        self._spent = spent
        self._pending = first
        self._more = more
        self._size = len(first)
        self._limit = limit
        self._length = length
        self.done = anyio.Event()
        if not more:
            self.done.set()

    async def read_ahead(self, buffer_bytes: int) -> bytes | None:
        """Read the body into memory until it ends (then return it whole) or holds more than
        ``buffer_bytes`` (then return ``None``: the rest is streamed, after what was read)."""
        parts = [self._pending]
        while self._more and self._size <= buffer_bytes:
            parts.append(await self._next_part())
        self._pending = b"".join(parts)
        if self._more:
            return None
        check_body_complete(self._size, declared=self._length)
        body, self._pending = self._pending, b""
        return body

    async def _next_part(self) -> bytes:
        allowed = min(self._idle_seconds, self._limits.time_left(self._size, self._spent))
        began = anyio.current_time()
        message = await _receive_within(self._receive, allowed)
        self._spent += anyio.current_time() - began
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        self._more = bool(message.get("more_body", False))
        self._size += len(chunk)
        check_body_size(self._size, max_body_bytes=self._limit, declared=self._length)
        if not self._more:
            self.done.set()
        return chunk

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
            self._pending = await self._next_part()


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
      than ``timeout`` or falls behind its deadline, 502 when the upstream cannot be reached
      or the exchange fails before the response started, 503 with ``Retry-After`` when a
      limit of ``limits`` is reached, and 504 when the upstream is too slow, with a JSON
      ``{"error": ..., "error_description": ...}`` body of fixed text;
    * bounds what clients hold (see :class:`~devicegate.gateway._policy.ProxyLimits`): small
      bodies and responses are buffered, so that only the upstream's own time holds an
      upstream connection; large ones are streamed, half the pool at most; a client that
      sends or reads too slowly is cut off.

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
        limits: what clients may hold: upstream connections, requests at once, buffers and
            the time to send a body or read a response (default: :class:`ProxyLimits`()).
            The pool size applies to the client created here, not to one passed in.

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
        limits: ProxyLimits | None = None,
    ) -> None:
        self.upstream = _check_upstream(upstream)
        if limits is not None and not isinstance(limits, ProxyLimits):
            raise ConfigError("limits", f"must be a ProxyLimits, got {type(limits).__name__}")
        self.limits = ProxyLimits() if limits is None else limits
        # Requests in the gateway, and bodies or responses being streamed: counted on the
        # event loop, with no await between a check and its change.
        self._active = 0
        self._streaming = 0
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
            f"timeout={self.timeout!r}, max_body_bytes={self.max_body_bytes!r}, "
            f"limits={self.limits!r})"
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
                limits=httpx.Limits(
                    max_connections=self.limits.connections,
                    max_keepalive_connections=self.limits.connections,
                ),
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
        if self._active >= self.limits.concurrent:
            self._count("busy")
            await send_refusal(scope, send, GatewayBusy())
            return
        self._active += 1
        try:
            await self._forward_one(scope, receive, send)
        finally:
            self._active -= 1

    def _count(self, outcome: str) -> None:
        if self._counters is not None:
            self._counters.upstream[outcome] += 1

    async def _forward_one(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = anyio.current_time()
        slot: _Slot | None = None
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
                first, more = await _first_part(receive, self.timeout, self.limits, start)
            framing = body_framing(declared, first, more, max_body_bytes=self.max_body_bytes)
            content_length = framing.content_length
            body: _RequestBody | None = None
            content: bytes | _RequestBody | None = None
            if framing.streamed:
                body = _RequestBody(
                    receive,
                    first,
                    more,
                    self.max_body_bytes,
                    declared,
                    idle_seconds=self.timeout,
                    limits=self.limits,
                    spent=anyio.current_time() - start,
                )
                # A small body is read whole before an upstream connection is taken: a slow
                # client holds a buffer, not a connection. A large one takes a streaming slot.
                content = await body.read_ahead(self.limits.buffer_bytes)
                if content is None:
                    content = body
                    if self._streaming >= self.limits.streams:
                        self._count("busy")
                        raise GatewayBusy()
                    slot = _Slot(self)
                else:
                    content_length = len(content)
        except Refusal as refusal:
            await send_refusal(scope, send, refusal)
            return
        except _ClientGone:
            return

        try:
            if content_length is not None:
                headers.append((b"content-length", str(content_length).encode()))
            request = httpx.Request(
                scope["method"],
                url,
                headers=headers,
                content=content,
                # httpcore writes ``target`` verbatim as the request-target: the path and
                # query reach the upstream byte for byte, with no re-quoting or normalisation.
                extensions={"target": target, "timeout": self._timeouts},
            )
            await self._exchange(scope, receive, send, request, body, slot)
        finally:
            if slot is not None:
                slot.release()

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: httpx.Request,
        body: _RequestBody | None,
        slot: _Slot | None,
    ) -> None:
        exchange = anyio.CancelScope()
        error: Exception | None = None
        async with anyio.create_task_group() as watchers:
            # Once the body is read, a disconnect from the client ends the upstream exchange
            # instead of leaving it to run (and hold a pooled connection) for nobody.
            watchers.start_soon(_watch_disconnect, receive, body, exchange)
            try:
                with exchange:
                    await self._send_upstream(scope, send, request, slot)
            except Exception as exc:
                error = exc  # raised below as itself, not wrapped in an exception group
            finally:
                watchers.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _send_upstream(
        self, scope: Scope, send: Send, request: httpx.Request, slot: _Slot | None
    ) -> None:
        """Send ``request`` and relay the answer; ``slot``: the streaming slot the request's
        body holds, which a large response goes on using."""
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
        except httpx.PoolTimeout:
            # Every pooled connection stayed busy for the whole timeout: the gateway is
            # saturated, the upstream not necessarily slow.
            logger.warning("devicegate: no upstream connection came free in time")
            self._count("busy")
            await send_refusal(scope, send, GatewayBusy())
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
            await self._relay(scope, send, response, slot)
        finally:
            # Shielded: after a client disconnect cancelled the exchange, the connection must
            # still be released (or closed) properly.
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(
        self, scope: Scope, send: Send, response: httpx.Response, slot: _Slot | None
    ) -> None:
        headers = response_headers(response.headers.raw)
        for index, (name, value) in enumerate(headers):
            if name == b"location":
                location = client_location(
                    value,
                    origins=self._origins,
                    base_path=self._base_path,
                    root_path=scope.get("root_path", ""),
                )
                headers[index] = (name, location)
        start_message = {"type": "http.response.start", "status": response.status_code}
        start_message["headers"] = headers
        rest: AsyncIterator[bytes] | None = None
        parts: list[bytes] = []
        if response.is_stream_consumed:
            # Only test transports (httpx.MockTransport) hand back a response already read.
            parts = [response.content]
        elif _declares_at_most(response, self.limits.buffer_bytes):
            # Small and of known length: read whole, and the connection goes back to the
            # pool before the client reads a byte (and the request's slot with it).
            try:
                parts = [part async for part in response.aiter_raw()]
            except Exception as exc:
                # Nothing is sent yet: the client still gets a proper answer.
                logger.warning("devicegate: the upstream response failed (%s)", type(exc).__name__)
                self._count("cut_off")
                timed_out = isinstance(exc, httpx.TimeoutException)
                await send_refusal(scope, send, GatewayTimeout() if timed_out else BadGateway())
                return
            await response.aclose()
            if slot is not None:
                slot.release()
        else:
            # Large, or of unknown length (a stream of events, say): relayed as it comes,
            # through a streaming slot. The request's, if its body took one; else a new one,
            # unless all are taken: then a read may be retried (503), but a request that may
            # have changed something upstream is answered all the same.
            rest = response.aiter_raw()
            if slot is None:
                busy = self._streaming >= self.limits.streams
                if busy and scope["method"] in _SAFE_METHODS:
                    self._count("busy")
                    await send_refusal(scope, send, GatewayBusy())
                    return
                slot = _Slot(self)
        try:
            await self._to_client(send, start_message, parts, rest)
        except _ClientTooSlow:
            # The response is left unfinished, so that the server drops the connection; the
            # upstream's is closed by the caller. Nothing stays held.
            logger.warning("devicegate: a client read its response too slowly; cut off")
            self._count("slow_client")
        finally:
            if slot is not None:
                slot.release()

    async def _to_client(
        self,
        send: Send,
        start_message: Message,
        parts: list[bytes],
        rest: AsyncIterator[bytes] | None,
    ) -> None:
        """Send the response: the parts read ahead, then ``rest`` as it comes. Only the time
        the client takes to read counts against it (a long stream from a slow upstream is
        fine): at most ``client_seconds`` plus a second per ``min_client_rate`` bytes sent, and
        never ``client_seconds`` for one part (as nginx's ``send_timeout``: the server's and
        the kernel's buffers take megabytes before a client that reads nothing blocks)."""
        limits = self.limits
        sent = 0
        spent = 0.0  # seconds spent waiting for the client to take what was sent

        async def deliver(message: Message) -> None:
            nonlocal spent
            began = anyio.current_time()
            allowed = min(limits.client_seconds, limits.time_left(sent, spent))
            with anyio.move_on_after(allowed):
                await send(message)
                spent += anyio.current_time() - began
                return
            raise _ClientTooSlow

        # The status line goes out unbounded: servers buffer it without waiting, and a
        # response that never started would become the server's own 500.
        await send(start_message)
        for part in parts:
            if part:
                await deliver({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part)
        while rest is not None:
            try:
                chunk = await rest.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                # The status line is gone already: the only honest signal left is to end the
                # response unfinished, so that the server drops the connection and the client
                # sees a truncated body rather than a complete-looking one. (Only the upstream
                # read is guarded here: a failing ``send`` reaches the server as itself.)
                logger.warning("devicegate: upstream response cut off (%s)", type(exc).__name__)
                self._count("cut_off")
                return
            await deliver({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
        await deliver({"type": "http.response.body", "body": b"", "more_body": False})


def _declares_at_most(response: httpx.Response, size: int) -> bool:
    """Whether the upstream's response declares a body of at most ``size`` bytes (by
    ``Content-Length``, or by having none: a ``HEAD``, a 204, a 304)."""
    if response.request.method == "HEAD" or response.status_code in (204, 304):
        return True
    if "transfer-encoding" in response.headers:
        return False
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= size


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
    """The client's next message, or a 408 when it does not come within ``seconds`` (the
    smaller of the idle timeout, as nginx's ``client_body_timeout``, and what is left of the
    body's deadline, see :meth:`ProxyLimits.time_left`): a client that stops sending its body,
    or trickles it, must not hold what others need."""
    with anyio.move_on_after(seconds):
        return await receive()
    # Reached only when our own deadline passed (a TimeoutError from receive() itself passes
    # through as itself).
    raise BodyTimeout()


async def _first_part(
    receive: Receive, idle_seconds: float, limits: ProxyLimits, start: float
) -> tuple[bytes, bool]:
    """The client's first body part with data and whether more follows; ``(b"", False)`` for
    an empty body. All the time since ``start`` (an event-loop time) is the client's."""
    chunk, more = b"", True
    while more and not chunk:
        left = min(idle_seconds, limits.time_left(0, anyio.current_time() - start))
        message = await _receive_within(receive, left)
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
