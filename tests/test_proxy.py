"""devicegate.gateway.proxy against a real upstream HTTP server (uvicorn in a subprocess).

The gateway runs in-process behind DeviceAuthMiddleware (httpx.ASGITransport) or is driven as a
raw ASGI app; the upstream is ``tests/servers/echo.py``, which answers with what it received.
The end-to-end tests at the bottom run ``devicegate serve --upstream`` as a real process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import anyio
import h11
import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Message, Receive, Scope, Send
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from devicegate import ConfigError, CredentialKind, DeviceAuthMiddleware, Principal, Rule
from devicegate.gateway._app import build_app
from devicegate.gateway.proxy import ProxyLimits, ReverseProxy
from tests.helpers import (
    DENIAL_EXTENSION,
    REALM_ONLY,
    Keys,
    bearer,
    call_asgi,
    client,
    fresh_keys,
    http_scope,
    make_token,
    mint,
    no_receive,
    no_send,
    write_secrets,
)
from tests.servers.process import (
    HOST,
    Server,
    async_client,
    bound_port,
    devicegate_command,
    peak_rss_bytes,
    seen_by,
    serve,
    uvicorn_command,
)

UPSTREAM_API_KEY = "upstream-server-" + secrets.token_urlsafe(24)
UPSTREAM_MOBILE_KEY = "upstream-mobile-" + secrets.token_urlsafe(24)
CLIENT_ADDRESS = ("203.0.113.7", 50000)
MIB = 1024 * 1024
BIG = 20 * MIB
CHUNK = bytes(range(256)) * 256  # 64 KiB
# The gateway's memory may grow by buffers and allocator slack, never by the body itself.
MEMORY_ALLOWANCE = BIG // 4
# A hang guard for tests that wait on real processes; reaching it is a failure, not a timing.
HANG_GUARD_SECONDS = 60


@pytest.fixture(scope="module")
def upstream(starts_a_process: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("upstream") / "echo.log"
    with serve(uvicorn_command("tests.servers.echo:app"), log) as server:
        yield server


@dataclass
class Echo:
    """What the upstream received, from its JSON answer."""

    data: dict[str, Any]

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.data["headers"]]

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name} arrived {len(values)} times"
        return values[0] if values else None

    def values(self) -> str:
        return "\n".join(value for _, value in self.headers)


def echo(response: httpx.Response) -> Echo:
    assert response.status_code < 500, response.text
    return Echo(response.json())


def proxy_for(upstream: Server, **options: Any) -> ReverseProxy:
    options.setdefault("upstream_api_key", UPSTREAM_API_KEY)
    options.setdefault("upstream_mobile_api_key", UPSTREAM_MOBILE_KEY)
    return ReverseProxy(upstream.url, **options)


@contextlib.asynccontextmanager
async def gateway(
    proxy: ReverseProxy, keys: Keys, rules: Sequence[Rule] = ()
) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy behind the middleware, as a client would call it (cookies not kept)."""
    app = DeviceAuthMiddleware(proxy, config=keys.config(), rules=rules)
    transport = httpx.ASGITransport(app=app, client=CLIENT_ADDRESS)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="https://gateway.example"
        ) as http:
            http.cookies.jar.set_policy(_NO_COOKIES)
            yield http
    finally:
        await proxy.aclose()


_NO_COOKIES = DefaultCookiePolicy(allowed_domains=[])


async def echoed(
    upstream: Server,
    keys: Keys,
    path: str,
    *,
    headers: Mapping[str, str] | Sequence[tuple[str, str]],
) -> Echo:
    """What the upstream received for ``GET path`` with ``headers``, through the gateway."""
    async with gateway(proxy_for(upstream), keys) as http:
        return echo(await http.get(path, headers=headers))


def request_scope(
    path: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query: bytes = b"",
    user: Principal | None = None,
) -> Scope:
    scope = http_scope(
        path,
        headers,
        method=method,
        query=query,
        client=CLIENT_ADDRESS,
        server=("gateway.example", 80),
    )
    if user is not None:
        scope["user"] = user
    return scope


def websocket_scope(path: str, denial_extension: bool) -> Scope:
    """A websocket handshake to the gateway, from a server that may offer the denial response."""
    scope = {**request_scope(path), "type": "websocket", "scheme": "ws"}
    if denial_extension:
        scope["extensions"] = DENIAL_EXTENSION
    return scope


@dataclass
class Exchange:
    """A raw ASGI conversation: what the app sent, and the body it streamed back."""

    messages: list[Message]
    body_bytes: int = 0

    @property
    def start(self) -> Message:
        return self.messages[0]

    @property
    def status(self) -> int:
        status: int = self.start["status"]
        return status

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.start["headers"])

    @property
    def complete(self) -> bool:
        last = self.messages[-1]
        return last["type"] == "http.response.body" and not last.get("more_body", False)

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


async def drive(
    app: Callable[[Scope, Receive, Send], Any],
    scope: Scope,
    body: Sequence[bytes] = (),
    *,
    after_body: Callable[[], Any] | None = None,
    keep: bool = True,
) -> Exchange:
    """Call ``app`` as a server would: feed ``body``, then wait for the response to end (or
    for ``after_body`` to return) and report a disconnect. With ``keep=False`` body chunks
    are counted, not kept."""
    chunks = list(body)
    done = anyio.Event()
    exchange = Exchange([])
    index = 0

    async def receive() -> Message:
        nonlocal index
        if index < len(chunks):
            index += 1
            return {
                "type": "http.request",
                "body": chunks[index - 1],
                "more_body": index < len(chunks),
            }
        if index == len(chunks) and not chunks:
            index += 1
            return {"type": "http.request", "body": b"", "more_body": False}
        if after_body is not None:
            await after_body()
        else:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            exchange.body_bytes += len(message.get("body", b""))
            if not keep:
                message = {**message, "body": b""}
            if not message.get("more_body", False):
                done.set()
        exchange.messages.append(message)

    with anyio.fail_after(HANG_GUARD_SECONDS):
        await app(scope, receive, send)
    return exchange


async def through_proxy(
    upstream: Server, scope: Scope, body: Sequence[bytes] = (), **options: Any
) -> Exchange:
    """:func:`drive` a new proxy to ``upstream`` (:func:`proxy_for` ``options``), then close it."""
    proxy = proxy_for(upstream, **options)
    try:
        return await drive(proxy, scope, body)
    finally:
        await proxy.aclose()


async def through_mock_upstream(
    handler: Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]],
    scope: Scope,
    upstream: str = "http://upstream.invalid",
    limits: ProxyLimits | None = None,
    body: Sequence[bytes] = (),
    **client_options: Any,
) -> Exchange:
    """:func:`drive` a new proxy to ``upstream`` (with ``limits``) whose requests ``handler``
    answers in-process (an httpx client with ``client_options``), then close it."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), **client_options) as pool:
        proxy = ReverseProxy(
            upstream, upstream_api_key=UPSTREAM_API_KEY, client=pool, limits=limits
        )
        try:
            return await drive(proxy, scope, body)
        finally:
            await proxy.aclose()


# -- credential translation and identity ----------------------------------------------------------


async def test_server_key_becomes_the_upstream_server_key(upstream: Server, keys: Keys) -> None:
    got = await echoed(upstream, keys, "/v1/enroll", headers={"x-api-key": keys.api_key})
    assert got.get("x-api-key") == UPSTREAM_API_KEY
    assert got.get("authorization") is None
    assert got.get("x-devicegate-kind") == "api_key"
    assert got.get("x-devicegate-instance-id") is None
    assert keys.api_key not in got.values()


async def test_mobile_key_becomes_the_upstream_mobile_key(upstream: Server, keys: Keys) -> None:
    got = await echoed(upstream, keys, "/v1/verify", headers={"authorization": keys.mobile_api_key})
    # The SenseCrypt mobile SDK form: the raw key in Authorization.
    assert got.get("authorization") == UPSTREAM_MOBILE_KEY
    assert got.get("x-api-key") is None
    assert got.get("x-devicegate-kind") == "mobile_api_key"
    assert keys.mobile_api_key not in got.values()


async def test_device_token_becomes_the_upstream_mobile_key(upstream: Server, keys: Keys) -> None:
    token = make_token(keys.jwt_secret, instance_id="device-7")
    headers = bearer(token, "device-7")
    got = await echoed(upstream, keys, "/v1/verify", headers=headers)
    assert got.get("authorization") == UPSTREAM_MOBILE_KEY
    assert got.get("x-devicegate-kind") == "device_token"
    assert got.get("x-devicegate-instance-id") == "device-7"
    # The client's device header is not forwarded: only the verified id is.
    assert got.get("x-instance-id") is None
    assert token not in got.values()


async def test_generic_token_carries_no_instance_id(upstream: Server, keys: Keys) -> None:
    token = make_token(keys.jwt_secret)
    headers = bearer(token, "claimed-by-client")
    got = await echoed(upstream, keys, "/", headers=headers)
    assert got.get("x-devicegate-kind") == "device_token"
    assert got.get("x-devicegate-instance-id") is None
    assert "claimed-by-client" not in got.values()


async def test_client_sent_identity_headers_are_replaced(upstream: Server, keys: Keys) -> None:
    headers = [
        ("authorization", keys.mobile_api_key),
        ("x-devicegate-kind", "api_key"),
        ("X-Devicegate-Instance-Id", "victim-device"),
        ("x-devicegate-forward-secret", "guess"),
        ("x-devicegate-anything", "else"),
    ]
    got = await echoed(upstream, keys, "/", headers=headers)
    devicegate_headers = [(n, v) for n, v in got.headers if n.startswith("x-devicegate-")]
    assert devicegate_headers == [("x-devicegate-kind", "mobile_api_key")]


async def test_public_path_is_forwarded_without_any_credential(
    upstream: Server, keys: Keys
) -> None:
    rules = [Rule("/open", public=True)]
    async with gateway(proxy_for(upstream), keys, rules) as http:
        anonymous = echo(await http.get("/open"))
        # Whatever the client sends on a public path is not checked, and not forwarded either.
        offered = echo(
            await http.get(
                "/open", headers={"authorization": "Bearer not.a.token", "x-api-key": "k"}
            )
        )
    for got in (anonymous, offered):
        assert got.get("authorization") is None
        assert got.get("x-api-key") is None
        assert got.get("x-devicegate-kind") is None


async def test_without_upstream_keys_nothing_is_injected(upstream: Server, keys: Keys) -> None:
    proxy = proxy_for(upstream, upstream_api_key=None, upstream_mobile_api_key=None)
    async with gateway(proxy, keys) as http:
        server = echo(await http.get("/", headers={"x-api-key": keys.api_key}))
        mobile = echo(await http.get("/", headers={"authorization": keys.mobile_api_key}))
    assert (server.get("x-api-key"), server.get("authorization")) == (None, None)
    assert (mobile.get("x-api-key"), mobile.get("authorization")) == (None, None)
    assert mobile.get("x-devicegate-kind") == "mobile_api_key"


async def test_configured_header_names_are_removed(upstream: Server, keys: Keys) -> None:
    config = keys.config(api_key_header="x-server-key", device_header="x-device")
    proxy = proxy_for(upstream, api_key_header="x-server-key", device_header="x-device")
    app = DeviceAuthMiddleware(proxy, config=config)
    token = make_token(keys.jwt_secret, instance_id="d1")
    try:
        async with client(app, "http://gateway.example") as http:
            server = echo(await http.get("/", headers={"x-server-key": keys.api_key}))
            device = echo(
                await http.get("/", headers={"authorization": f"Bearer {token}", "x-device": "d1"})
            )
    finally:
        await proxy.aclose()
    assert server.get("x-server-key") is None
    assert server.get("x-api-key") == UPSTREAM_API_KEY
    assert device.get("x-device") is None
    assert device.get("x-devicegate-instance-id") == "d1"


# -- the request and the response, intact ---------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_and_query_arrive_byte_for_byte(
    upstream: Server, keys: Keys, method: str
) -> None:
    # Percent-encodings, an encoded '+', repeated and empty parameters, '+' and '%20': a
    # proxy that re-quotes or re-parses would change one of them. (No ';' or encoded slash:
    # the gateway refuses them in a path.)
    url = "/items/%7E/caf%C3%A9/a%2Bb?b=2&a=1&a=3&e=%20+&empty=&flag"
    async with gateway(proxy_for(upstream), keys) as http:
        got = echo(await http.request(method, url, headers={"x-api-key": keys.api_key}))
    assert got.data["method"] == method
    assert got.data["raw_path"] == "/items/%7E/caf%C3%A9/a%2Bb"
    assert got.data["query_string"] == "b=2&a=1&a=3&e=%20+&empty=&flag"


@pytest.mark.parametrize("status", [200, 201, 202, 204, 301, 400, 404, 409, 418, 429, 500, 503])
async def test_upstream_status_is_kept(upstream: Server, keys: Keys, status: int) -> None:
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.get(f"/status/{status}", headers={"x-api-key": keys.api_key})
    assert response.status_code == status
    if status not in (204, 304):
        assert response.json()["path"] == f"/status/{status}"


async def test_head_answers_headers_without_body(upstream: Server, keys: Keys) -> None:
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.head("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


async def test_repeated_request_headers_keep_their_order(upstream: Server, keys: Keys) -> None:
    headers = [
        ("x-api-key", keys.api_key),
        ("x-multi", "first"),
        ("accept", "application/json"),
        ("x-multi", "second"),
        ("x-multi", "third, fourth"),
    ]
    got = await echoed(upstream, keys, "/", headers=headers)
    assert got.get_all("x-multi") == ["first", "second", "third, fourth"]
    assert got.get("accept") == "application/json"


async def test_hop_by_hop_request_headers_are_removed(upstream: Server, keys: Keys) -> None:
    headers = [
        ("x-api-key", keys.api_key),
        ("connection", "keep-alive, X-Hop-Named"),
        ("connection", "x-hop-second"),
        ("x-hop-named", "must not pass"),
        ("x-hop-second", "must not pass"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("upgrade", "h2c"),
        ("proxy-authorization", "Basic dXNlcjpwYXNz"),
        ("x-end-to-end", "kept"),
    ]
    got = await echoed(upstream, keys, "/", headers=headers)
    names = {name for name, _ in got.headers}
    for hop in (
        "x-hop-named",
        "x-hop-second",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "transfer-encoding",
    ):
        assert hop not in names
    assert "must not pass" not in got.values()
    assert got.get("connection") is None
    assert got.get("x-end-to-end") == "kept"


async def test_response_headers_hop_by_hop_removed_repeats_kept(
    upstream: Server, keys: Keys
) -> None:
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.get("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 200
    assert response.headers.get_list("x-upstream-multi") == ["one", "two"]
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    for hop in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer", "connection"):
        assert hop not in response.headers


async def test_forwarded_headers(upstream: Server, keys: Keys) -> None:
    headers = [
        ("x-api-key", keys.api_key),
        ("x-forwarded-for", "198.51.100.1"),
        ("x-forwarded-for", "198.51.100.2"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-host", "spoofed.example"),
    ]
    got = await echoed(upstream, keys, "/", headers=headers)
    # Earlier hops are kept (they are the client's claims) and the client we saw is appended.
    assert got.get("x-forwarded-for") == "198.51.100.1, 198.51.100.2, 203.0.113.7"
    assert got.get("x-forwarded-proto") == "https"
    assert got.get("x-forwarded-host") == "gateway.example"
    # Host is the upstream's own: the client's went into X-Forwarded-Host.
    assert got.get("host") == f"{HOST}:{upstream.port}"


async def test_upstream_base_path_and_root_path(upstream: Server, keys: Keys) -> None:
    proxy = proxy_for(upstream)
    based = ReverseProxy(upstream.url + "/base/", upstream_api_key=UPSTREAM_API_KEY)
    try:
        mounted = await drive(
            proxy,
            {**request_scope("/gw/x/y"), "root_path": "/gw", "raw_path": b"/gw/x/y"},
        )
        prefixed = await drive(based, request_scope("/x/y", query=b"q=1"))
    finally:
        await proxy.aclose()
        await based.aclose()
    # Mounted under /gw, the proxy forwards what is below its mount point.
    assert mounted.json()["raw_path"] == "/x/y"
    assert prefixed.json()["raw_path"] == "/base/x/y"
    assert prefixed.json()["query_string"] == "q=1"


async def test_request_bodies_are_forwarded_intact(upstream: Server, keys: Keys) -> None:
    payload = secrets.token_bytes(3 * MIB + 17)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    async with gateway(proxy_for(upstream), keys) as http:
        sized = echo(await http.post("/", content=payload, headers={"x-api-key": keys.api_key}))
        streamed = echo(await http.put("/", content=chunked(), headers={"x-api-key": keys.api_key}))
        empty = echo(await http.post("/", content=b"", headers={"x-api-key": keys.api_key}))
    digest = hashlib.sha256(payload).hexdigest()
    assert (sized.data["body_length"], sized.data["body_sha256"]) == (len(payload), digest)
    assert sized.get("content-length") == str(len(payload))
    assert (streamed.data["body_length"], streamed.data["body_sha256"]) == (len(payload), digest)
    assert streamed.get("transfer-encoding") == "chunked"
    assert empty.data["body_length"] == 0
    assert empty.get("content-length") == "0"


async def test_a_get_without_body_is_not_sent_chunked(upstream: Server, keys: Keys) -> None:
    got = await echoed(upstream, keys, "/", headers={"x-api-key": keys.api_key})
    assert got.get("transfer-encoding") is None
    assert got.get("content-length") is None


# -- failures: 413, 400, 502, 504 -----------------------------------------------------------------


async def test_body_over_the_limit_by_content_length_is_413(upstream: Server, keys: Keys) -> None:
    marker = secrets.token_hex(8)
    async with gateway(proxy_for(upstream, max_body_bytes=1024), keys) as http:
        response = await http.post(
            f"/upload?marker={marker}", content=b"x" * 1025, headers={"x-api-key": keys.api_key}
        )
        at_limit = echo(
            await http.post("/upload", content=b"x" * 1024, headers={"x-api-key": keys.api_key})
        )
    assert response.status_code == 413
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "The request body is larger than this gateway accepts.",
    }
    assert response.headers["connection"] == "close"
    assert at_limit.data["body_length"] == 1024
    # Refused up front: the upstream never heard of it.
    assert not [target for target in await seen_by(upstream) if marker in target]


async def test_chunked_body_over_the_limit_is_413_while_streaming(upstream: Server) -> None:
    # No Content-Length: the limit can only be enforced as the bytes arrive. (Driven as raw
    # ASGI: httpx's test transport would leave its own body generator unfinished.)
    proxy = proxy_for(upstream, max_body_bytes=2048)
    scope = request_scope(
        "/upload",
        method="POST",
        headers=[(b"transfer-encoding", b"chunked")],
        user=Principal(CredentialKind.API_KEY),
    )
    try:
        result = await drive(proxy, scope, [b"y" * 512] * 8)
    finally:
        await proxy.aclose()
    assert result.status == 413
    assert result.json()["error"] == "invalid_request"
    assert result.headers[b"connection"] == b"close"


@pytest.mark.parametrize(
    "lengths",
    [[b"abc"], [b"-1"], [b"+5"], [b""], [b"5", b"6"], [b"1e3"]],
    ids=["letters", "negative", "plus", "empty", "disagreeing", "exponent"],
)
async def test_bad_content_length_is_400(upstream: Server, lengths: list[bytes]) -> None:
    headers = [(b"content-length", value) for value in lengths]
    result = await through_proxy(
        upstream, request_scope("/", method="POST", headers=headers), [b"12345"]
    )
    assert result.status == 400
    assert result.json()["error"] == "invalid_request"


async def test_a_content_length_of_thousands_of_digits_is_413_not_500(upstream: Server) -> None:
    # int() refuses more than 4,300 digits: that ValueError escaped as a 500.
    headers = [(b"content-length", b"9" * 5000)]
    result = await through_proxy(upstream, request_scope("/", method="POST", headers=headers))
    assert result.status == 413
    assert result.headers[b"connection"] == b"close"


@pytest.mark.parametrize("zeros", [40, 5000])
async def test_leading_zeros_in_content_length_are_only_zeros(upstream: Server, zeros: int) -> None:
    headers = [(b"content-length", b"0" * zeros + b"5")]
    scope = {**request_scope("/", method="POST", headers=headers), "user": api_key_user()}
    result = await through_proxy(upstream, scope, [b"12345"])
    assert result.status == 200
    received = result.json()
    assert received["body_length"] == 5
    assert received["body_sha256"] == hashlib.sha256(b"12345").hexdigest()
    # The upstream gets the length as a number, not the client's spelling.
    assert [value for name, value in received["headers"] if name == "content-length"] == ["5"]


async def test_body_despite_zero_content_length_is_400(upstream: Server) -> None:
    scope = request_scope("/", method="POST", headers=[(b"content-length", b"0")])
    result = await through_proxy(upstream, scope, [b"smuggled"])
    assert result.status == 400
    assert result.headers[b"connection"] == b"close"


async def test_client_gone_while_uploading_sends_nothing(upstream: Server) -> None:
    proxy = proxy_for(upstream)
    sent: list[Message] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    for headers in ([(b"content-length", b"100")], [(b"transfer-encoding", b"chunked")]):
        incoming[:] = [
            {"type": "http.request", "body": b"part", "more_body": True},
            {"type": "http.disconnect"},
        ]
        scope = request_scope("/", method="POST", headers=headers)
        with anyio.fail_after(HANG_GUARD_SECONDS):
            await proxy(scope, receive, send)
    # Gone before its body ended: nothing to answer, and nothing half-sent upstream counts.
    incoming[:] = [{"type": "http.disconnect"}]
    await proxy(request_scope("/", method="POST"), receive, send)
    await proxy.aclose()
    assert sent == []


async def test_single_chunk_bodies(upstream: Server) -> None:
    proxy = proxy_for(upstream, max_body_bytes=10)
    chunked = [(b"transfer-encoding", b"chunked")]
    try:
        small = await drive(proxy, request_scope("/", method="POST", headers=chunked), [b"12345"])
        large = await drive(proxy, request_scope("/", method="POST", headers=chunked), [b"x" * 11])
    finally:
        await proxy.aclose()
    assert small.json()["body_length"] == 5
    assert large.status == 413


async def test_scope_without_raw_path_client_or_host(upstream: Server) -> None:
    scope = request_scope("/caf\u00e9 menu", query=b"a=1")
    del scope["raw_path"]
    scope["client"] = None
    scope["root_path"] = "/elsewhere"
    result = await through_proxy(upstream, scope)
    got = result.json()
    assert got["raw_path"] == "/caf%C3%A9%20menu"
    names = [name for name, _ in got["headers"]]
    assert "x-forwarded-for" not in names
    assert "x-forwarded-host" not in names


async def test_target_that_cannot_be_forwarded_is_400(upstream: Server) -> None:
    scope = {**request_scope("/x"), "raw_path": "/caf\u00e9".encode()}
    result = await through_proxy(upstream, scope)
    assert result.status == 400
    assert result.json()["error_description"] == "The request target cannot be forwarded."


async def test_unknown_scope_type_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="scope type"):
        await ReverseProxy("http://127.0.0.1:9")({"type": "webtransport"}, no_receive, no_send)


async def test_upstream_down_is_502(keys: Keys) -> None:
    # A bound socket that never listens: connecting to it is refused, and nobody else can
    # take the port meanwhile.
    with bound_port() as port:
        proxy = ReverseProxy(f"http://{HOST}:{port}", upstream_api_key=UPSTREAM_API_KEY)
        async with gateway(proxy, keys) as http:
            response = await http.get("/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 502
    assert response.json() == {
        "error": "bad_gateway",
        "error_description": "The upstream server could not be reached.",
    }
    assert response.headers["content-type"] == "application/json"


async def test_slow_upstream_is_504(upstream: Server, keys: Keys) -> None:
    async with gateway(proxy_for(upstream, timeout=0.5), keys) as http:
        response = await http.get(
            f"/slow?id={secrets.token_hex(4)}", headers={"x-api-key": keys.api_key}
        )
    assert response.status_code == 504
    assert response.json() == {
        "error": "gateway_timeout",
        "error_description": "The upstream server did not answer in time.",
    }


@pytest.mark.parametrize(
    "error",
    [httpx.ReadError("connection reset"), h11.RemoteProtocolError("malformed chunk")],
    ids=["reset", "protocol-error"],
)
async def test_response_cut_off_upstream_ends_unfinished(error: Exception) -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"first part"
            raise error

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-length": "100"}, stream=Broken())

    # Read ahead whole (the default buffer): nothing was sent yet, so the client gets a 502.
    buffered = await through_mock_upstream(handler, request_scope("/"))
    assert buffered.status == 502
    assert buffered.complete
    # Streamed (a buffer smaller than the first part): the status line is gone already.
    streamed = await through_mock_upstream(
        handler, request_scope("/"), limits=ProxyLimits(buffer_bytes=4)
    )
    assert streamed.status == 200
    assert streamed.body_bytes == len(b"first part")
    # No final body message: the server drops the connection, the client sees a short body.
    assert not streamed.complete


async def test_client_disconnect_ends_the_upstream_exchange(upstream: Server) -> None:
    target = f"/slow?id={secrets.token_hex(8)}"
    proxy = proxy_for(upstream, timeout=3600)

    async def upstream_got_it() -> None:
        for _ in range(600):
            if target in await seen_by(upstream):
                return
            await anyio.sleep(0.05)
        raise AssertionError("the request never reached the upstream")

    try:
        scope = request_scope("/slow", query=target.split("?")[1].encode())
        result = await drive(proxy, scope, after_body=upstream_got_it)
    finally:
        await proxy.aclose()
    assert result.messages == []
    for _ in range(600):
        if f"disconnected {target}" in await seen_by(upstream):
            break
        await anyio.sleep(0.05)
    else:
        raise AssertionError("the upstream connection was left open")


# -- websockets, lifespan, the pooled client ------------------------------------------------------


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websockets_are_not_forwarded(upstream: Server, denial_extension: bool) -> None:
    proxy = proxy_for(upstream)
    sent = await call_asgi(proxy, websocket_scope("/ws", denial_extension))
    if denial_extension:
        assert sent[0]["type"] == "websocket.http.response.start"
        assert sent[0]["status"] == 501
        assert json.loads(sent[1]["body"])["error"] == "invalid_request"
    else:
        assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_lifespan_opens_and_closes_the_pooled_client(upstream: Server, keys: Keys) -> None:
    proxy = proxy_for(upstream)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []
    started = anyio.Event()
    shutdown = anyio.Event()
    clients: list[httpx.AsyncClient] = []

    async def receive() -> Message:
        if len(sent) == 1:
            started.set()
            await shutdown.wait()
        return messages[len(sent)]

    async def send(message: Message) -> None:
        sent.append(message)

    app = DeviceAuthMiddleware(proxy, config=keys.config())
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        await started.wait()
        clients.append(proxy._get_client())
        first = await drive(
            app, request_scope("/", headers=[(b"x-api-key", keys.api_key.encode())])
        )
        second = await drive(
            app, request_scope("/", headers=[(b"x-api-key", keys.api_key.encode())])
        )
        clients.append(proxy._get_client())
        shutdown.set()
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert (first.status, second.status) == (200, 200)
    assert clients[0] is clients[1]  # one pooled client for every request
    assert clients[0].is_closed


async def test_a_client_passed_in_is_used_and_left_open() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), headers={"x-client-default": "not applied"}
    ) as pool:
        proxy = ReverseProxy("http://upstream.invalid:8080/api", client=pool)
        scope = {**request_scope("/a b", query=b"x=%41"), "raw_path": b"/a%20b"}
        result = await drive(proxy, scope)
        await proxy.aclose()
        assert not pool.is_closed
    assert result.status == 200
    (request,) = requests
    assert request.extensions["target"] == b"/api/a%20b?x=%41"
    assert request.url.host == "upstream.invalid"
    assert "x-client-default" not in request.headers


async def test_an_upstream_content_length_beside_transfer_encoding_is_dropped() -> None:
    # RFC 9112 §6.3: the length is wrong when Transfer-Encoding is present; relayed, it told the
    # client 100 bytes were coming where 2 came, and a lenient server would desync.
    def handler(request: httpx.Request) -> httpx.Response:
        headers = [(b"transfer-encoding", b"chunked"), (b"content-length", b"100")]
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"ok"))

    result = await through_mock_upstream(handler, {**request_scope("/a"), "user": api_key_user()})
    assert result.status == 200
    assert b"content-length" not in result.headers
    assert b"transfer-encoding" not in result.headers
    assert b"".join(m.get("body", b"") for m in result.messages[1:]) == b"ok"


async def redirected(upstream: str, location: str, root_path: str = "") -> bytes:
    """The ``Location`` a client gets through a proxy to ``upstream`` answering a 302 there."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": location})

    scope = {**request_scope("/a"), "root_path": root_path, "user": api_key_user()}
    result = await through_mock_upstream(handler, scope, upstream)
    assert result.status == 302
    return result.headers[b"location"]


@pytest.mark.parametrize(
    ("location", "root_path", "expected"),
    [
        # To the upstream itself: the same place through the gateway, as a path.
        ("http://upstream.invalid:8080/api/items/", "", "/items/"),
        ("http://upstream.invalid:8080/api/items/?page=2#top", "", "/items/?page=2#top"),
        ("HTTP://Upstream.Invalid:8080/api", "", "/"),
        ("http://upstream.invalid:8080/api?next=1", "", "/?next=1"),
        ("/api/items/", "", "/items/"),
        ("/api/items/", "/gw", "/gw/items/"),
        ("http://upstream.invalid:8080/api/x", "/g w", "/g%20w/x"),
        # Anywhere else: left as it is.
        ("http://elsewhere.example/api/x", "", "http://elsewhere.example/api/x"),
        ("http://upstream.invalid:8081/api/x", "", "http://upstream.invalid:8081/api/x"),
        ("/apix", "", "/apix"),
        ("/other", "/gw", "/other"),
        ("items/", "", "items/"),
        ("//upstream.invalid:8080/api/x", "", "//upstream.invalid:8080/api/x"),
        # Never cut down to another site, nor out of the mount point: relayed as written.
        ("http://upstream.invalid:8080/api//evil.example/", "", None),
        ("http://upstream.invalid:8080/api/\\evil.example", "", None),
        ("http://upstream.invalid:8080/api/%5Cevil.example", "", None),
        ("http://upstream.invalid:8080/api/%09/evil.example", "", None),
        ("/api//evil.example", "", None),
        ("/api/../../x", "/gw", None),
        ("/api/%2e%2e/x", "/gw", None),
        # A mount point written with its trailing slash does not double it.
        ("/api/x", "/gw/", "/gw/x"),
    ],
)
async def test_a_redirect_to_the_upstream_leads_back_through_the_gateway(
    location: str, root_path: str, expected: str | None
) -> None:
    # Relayed as they were, these leaked the upstream's internal address to the client and sent
    # it where it cannot go (or past the gateway's base path). None: relayed unchanged.
    got = await redirected("http://upstream.invalid:8080/api", location, root_path)
    assert got == (location if expected is None else expected).encode()


async def test_a_real_upstreams_redirect_comes_back_as_a_gateway_path(
    upstream: Server, keys: Keys
) -> None:
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.get("/redirect?items/", headers={"x-api-key": keys.api_key})
    assert response.status_code == 307
    # The upstream built http://127.0.0.1:<its port>/items/ from the Host the gateway sent.
    assert response.json()["location"].startswith(upstream.url)
    assert response.headers["location"] == "/items/"
    # An upstream that puts a "local" next= path after its own origin stays on its own host:
    # cut down to a path, "//evil.example/" would be an open redirect through the gateway.
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.get("/redirect?/evil.example/", headers={"x-api-key": keys.api_key})
    assert response.headers["location"] == response.json()["location"]
    assert response.headers["location"].startswith(upstream.url)


@pytest.mark.parametrize(
    ("upstream", "location", "root_path", "expected"),
    [
        ("http://upstream.invalid", "http://upstream.invalid:80/x", "", "/x"),
        ("http://upstream.invalid", "http://upstream.invalid/x", "/gw", "/gw/x"),
        ("https://upstream.invalid", "https://upstream.invalid:443/", "", "/"),
        ("http://upstream.invalid", "/x", "/gw", "/gw/x"),
        ("http://upstream.invalid", "/x", "", "/x"),
        ("http://[::1]:9000", "http://[::1]:9000/x", "", "/x"),
    ],
)
async def test_redirects_to_an_upstream_without_a_base_path(
    upstream: str, location: str, root_path: str, expected: str
) -> None:
    assert await redirected(upstream, location, root_path) == expected.encode()


async def test_a_client_that_follows_redirects_never_follows_one_here(keys: Keys) -> None:
    # httpx strips only Authorization when a redirect changes origin: following one would hand
    # the injected upstream key, and the original path, to whatever host the upstream named.
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(302, headers={"location": "http://elsewhere.invalid/x"})

    scope = {**request_scope("/a"), "user": api_key_user()}
    result = await through_mock_upstream(handler, scope, follow_redirects=True)
    assert result.status == 302
    assert result.headers[b"location"] == b"http://elsewhere.invalid/x"
    assert [request.url.host for request in requests] == ["upstream.invalid"]
    assert requests[0].headers["x-api-key"] == UPSTREAM_API_KEY


# -- configuration --------------------------------------------------------------------------------


def test_repr_hides_the_upstream_keys() -> None:
    proxy = ReverseProxy(
        "http://127.0.0.1:9000", upstream_api_key=UPSTREAM_API_KEY, upstream_mobile_api_key=None
    )
    text = repr(proxy)
    assert UPSTREAM_API_KEY not in text
    assert "upstream_api_key=<hidden>" in text
    assert "upstream_mobile_api_key=None" in text
    assert "http://127.0.0.1:9000" in text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"upstream": "127.0.0.1:9000"}, "upstream"),
        ({"upstream": b"http://127.0.0.1:9000"}, "upstream"),
        ({"upstream": "http://[::1"}, "upstream"),
        ({"upstream": "ftp://127.0.0.1"}, "upstream"),
        ({"upstream": "http://"}, "upstream"),
        ({"upstream": "http://user:secret-password@127.0.0.1:9000"}, "upstream"),
        ({"upstream": "http://127.0.0.1:9000/?x=1"}, "upstream"),
        ({"upstream": "http://127.0.0.1:9000/#frag"}, "upstream"),
        ({"upstream": "http://127.0.0.1:99999"}, "upstream"),
        ({"upstream_api_key": ""}, "upstream_api_key"),
        ({"upstream_api_key": "two words"}, "upstream_api_key"),
        ({"upstream_mobile_api_key": "line\r\nbreak"}, "upstream_mobile_api_key"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"max_body_bytes": 1.5}, "max_body_bytes"),
        ({"api_key_header": "bad header"}, "api_key_header"),
        ({"device_header": "authorization"}, "device_header"),
        ({"client": object()}, "client"),
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"upstream": "http://127.0.0.1:9000", **options}
    upstream_url = arguments.pop("upstream")
    with pytest.raises(ConfigError) as caught:
        ReverseProxy(upstream_url, **arguments)
    assert caught.value.field == field
    assert "secret-password" not in str(caught.value)


def test_the_old_module_paths_name_the_same_objects() -> None:
    # The gateway lived in devicegate.proxy and devicegate.forward_auth before it had a package
    # of its own; imports written against those paths keep working.
    import devicegate.forward_auth
    import devicegate.gateway.forward_auth
    import devicegate.gateway.proxy
    import devicegate.proxy

    for old, new in (
        (devicegate.proxy, devicegate.gateway.proxy),
        (devicegate.forward_auth, devicegate.gateway.forward_auth),
    ):
        assert old.__all__ == new.__all__
        for name in old.__all__:
            assert getattr(old, name) is getattr(new, name)


# -- memory: a 20 MB body both ways ---------------------------------------------------------------


async def test_20mb_streams_both_ways_without_buffering(upstream: Server) -> None:
    proxy = proxy_for(upstream)
    chunks = [CHUNK] * (BIG // len(CHUNK))
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    user = Principal(CredentialKind.API_KEY)
    scope = request_scope(
        "/big",
        method="POST",
        query=f"bytes={BIG}".encode(),
        headers=[(b"content-length", str(BIG).encode())],
        user=user,
    )
    try:
        # Warm up: the pooled client and its connection exist before measuring.
        await drive(proxy, {**scope, "query_string": b"bytes=10", "headers": []})
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            result = await drive(proxy, scope, chunks, keep=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await proxy.aclose()
    assert result.status == 200
    assert result.complete
    assert result.headers[b"x-received-length"] == str(BIG).encode()
    assert result.headers[b"x-received-sha256"] == digest.hexdigest().encode()
    assert result.body_bytes == BIG
    assert peak < MEMORY_ALLOWANCE, f"peak {peak} bytes while streaming {BIG}"


# -- end to end: `devicegate serve --upstream` ----------------------------------------------------


@dataclass
class Gateway:
    server: Server
    keys: Keys

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def cli_gateway(upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gateway")
    keys = fresh_keys()
    gate_secrets = write_secrets(directory / "secrets.json", keys)
    upstream_secrets = write_secrets(
        directory / "upstream-secrets.json",
        api_key=UPSTREAM_API_KEY,
        mobile_api_key=UPSTREAM_MOBILE_KEY,
        jwt_secret=secrets.token_urlsafe(32),
        issuers_private_key="ignored",
    )

    command = devicegate_command(
        "--upstream", upstream.url,
        "--upstream-secrets", str(upstream_secrets),
        "--secrets", str(gate_secrets),
        "--log-level", "warning",
    )  # fmt: skip
    with serve(command, directory / "gateway.log") as server:
        yield Gateway(server, keys)


async def test_cli_gateway_device_token_end_to_end(cli_gateway: Gateway) -> None:
    keys = cli_gateway.keys
    async with async_client(cli_gateway.url) as http:
        token = await mint(http, keys.api_key, "phone-42")
        response = await http.post(
            "/v1/verify?mode=strict",
            headers=bearer(token, "phone-42"),
            content=b'{"selfie": "..."}',
        )
        other_device = await http.get("/v1/verify", headers=bearer(token, "phone-43"))
        anonymous = await http.get("/v1/verify")
    got = echo(response)
    assert got.data["method"] == "POST"
    assert got.data["raw_path"] == "/v1/verify"
    assert got.data["query_string"] == "mode=strict"
    assert got.data["body_length"] == len(b'{"selfie": "..."}')
    assert got.get("authorization") == UPSTREAM_MOBILE_KEY
    assert got.get("x-api-key") is None
    assert got.get("x-devicegate-kind") == "device_token"
    assert got.get("x-devicegate-instance-id") == "phone-42"
    assert got.get("x-instance-id") is None
    assert got.get("x-forwarded-for") == HOST
    assert token not in got.values()
    assert other_device.status_code == 401
    assert 'error="invalid_token"' in other_device.headers["www-authenticate"]
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == REALM_ONLY


async def test_cli_gateway_server_key_end_to_end(cli_gateway: Gateway) -> None:
    keys = cli_gateway.keys
    async with async_client(cli_gateway.url) as http:
        server = echo(await http.get("/v1/enroll", headers={"x-api-key": keys.api_key}))
        mobile = echo(await http.get("/v1/enroll", headers={"authorization": keys.mobile_api_key}))
    assert server.get("x-api-key") == UPSTREAM_API_KEY
    assert server.get("authorization") is None
    assert server.get("x-devicegate-kind") == "api_key"
    assert keys.api_key not in server.values()
    assert mobile.get("authorization") == UPSTREAM_MOBILE_KEY
    assert keys.mobile_api_key not in mobile.values()


async def test_cli_gateway_streams_20mb_without_growing(cli_gateway: Gateway) -> None:
    keys = cli_gateway.keys
    pid = cli_gateway.server.process.pid
    digest = hashlib.sha256()
    count = BIG // len(CHUNK)
    for _ in range(count):
        digest.update(CHUNK)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield CHUNK

    headers = {"x-api-key": keys.api_key, "content-length": str(BIG)}
    async with httpx.AsyncClient(base_url=cli_gateway.url, trust_env=False, timeout=60) as http:
        # Warm up: imports, the pooled client and a first small streamed exchange.
        warm = await http.post(
            "/big?bytes=65536", content=CHUNK, headers={"x-api-key": keys.api_key}
        )
        assert warm.status_code == 200
        before = peak_rss_bytes(pid)
        received = 0
        async with http.stream(
            "POST", f"/big?bytes={BIG}", content=body(), headers=headers
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received += len(chunk)
        after = peak_rss_bytes(pid)
    assert response.headers["x-received-length"] == str(BIG)
    assert response.headers["x-received-sha256"] == digest.hexdigest()
    assert received == BIG
    assert after - before < MEMORY_ALLOWANCE, f"peak RSS grew by {after - before} bytes"


async def test_cli_gateway_upstream_down_is_502(tmp_path: Path, cli_gateway: Gateway) -> None:
    keys = cli_gateway.keys
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    with bound_port() as dead:  # bound, never listening: the upstream is down
        # The upstream is down after start: --no-upstream-check lets serve start without it.
        command = devicegate_command(
            "--upstream", f"http://{HOST}:{dead}", "--no-upstream-check",
            "--secrets", str(secrets_file),
            "--log-level", "warning",
        )  # fmt: skip
        with serve(command, tmp_path / "gateway.log") as server:
            async with async_client(server.url) as http:
                response = await http.get("/v1/enroll", headers={"x-api-key": keys.api_key})
    assert response.status_code == 502
    assert response.json()["error"] == "bad_gateway"


def stalling(messages: Sequence[Message]) -> Receive:
    """A client that sends ``messages``, then nothing more, and never hangs up."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


def body_of(exchange: Exchange) -> Any:
    """The JSON an exchange's response carried."""
    return json.loads(b"".join(m.get("body", b"") for m in exchange.messages[1:]))


# A client that stopped sending its body held a pooled upstream connection for as long as it
# liked: a hundred of them took the default pool.
@pytest.mark.parametrize(
    ("framing", "first"),
    [
        pytest.param((b"content-length", b"100"), b"x" * 10, id="declared-length"),
        pytest.param((b"transfer-encoding", b"chunked"), b"x" * 10, id="chunked"),
        pytest.param((b"transfer-encoding", b"chunked"), b"", id="chunked-nothing-yet"),
    ],
)
async def test_a_stalled_request_body_is_408_and_frees_the_upstream(
    upstream: Server, framing: tuple[bytes, bytes], first: bytes
) -> None:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as pool:
        proxy = proxy_for(upstream, timeout=0.3, client=pool)
        scope = request_scope("/v1/enroll", method="POST", headers=[framing], user=api_key_user())
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.fail_after(HANG_GUARD_SECONDS):
            await proxy(
                scope, stalling([{"type": "http.request", "body": first, "more_body": True}]), send
            )
        # The pool's one connection is free again, and the next request is what the upstream
        # reads: not the rest of a half-sent one.
        after = await drive(proxy, request_scope("/v1/next", user=api_key_user()))
    assert sent[0]["status"] == 408
    assert dict(sent[0]["headers"])[b"connection"] == b"close"
    assert json.loads(b"".join(message.get("body", b"") for message in sent[1:])) == {
        "error": "request_timeout",
        "error_description": "The request body stopped arriving, or arrives too slowly.",
    }
    assert after.status == 200
    assert body_of(after)["path"] == "/v1/next"


async def test_a_body_that_keeps_arriving_is_not_cut(upstream: Server) -> None:
    # The limit is on each pause, not on the whole body: five parts, each well within the
    # timeout, together take longer than it.
    parts = [secrets.token_bytes(1000) for _ in range(5)]

    async def receive() -> Message:
        if not parts:  # the whole body is in: the client waits for the answer
            await anyio.sleep_forever()
        await anyio.sleep(0.12)
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    proxy = proxy_for(upstream, timeout=0.3)
    scope = request_scope(
        "/v1/upload", method="POST", headers=[(b"content-length", b"5000")], user=api_key_user()
    )
    try:
        with anyio.fail_after(HANG_GUARD_SECONDS):
            await proxy(scope, receive, send)
    finally:
        await proxy.aclose()
    assert sent[0]["status"] == 200
    assert body_of(Exchange(sent))["body_length"] == 5000


@contextlib.contextmanager
def impatient_cli_gateway(tmp_path: Path, upstream: Server) -> Iterator[tuple[Server, Keys]]:
    """A real ``devicegate serve --upstream`` with ``--upstream-timeout 0.5``, and its keys."""
    keys = fresh_keys()
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    command = devicegate_command(
        "--upstream", upstream.url, "--upstream-timeout", "0.5",
        "--secrets", str(secrets_file),
        "--log-level", "warning",
    )  # fmt: skip
    with serve(command, tmp_path / "gateway.log") as server:
        yield server, keys


async def test_cli_gateway_answers_a_stalled_body_with_408(
    tmp_path: Path, upstream: Server
) -> None:
    def stall(port: int, api_key: str) -> bytes:
        # Send part of the body, then wait for the whole answer: the gateway closes after it.
        request = (
            b"POST /v1/enroll HTTP/1.1\r\nHost: gateway\r\nX-API-Key: "
            + api_key.encode()
            + b"\r\nContent-Length: 100\r\n\r\n"
            + b"x" * 10
        )
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    with impatient_cli_gateway(tmp_path, upstream) as (server, keys):
        answer = await anyio.to_thread.run_sync(stall, server.port, keys.api_key)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"error":"request_timeout"' in answer


async def test_cli_gateway_slow_upstream_is_504(tmp_path: Path, upstream: Server) -> None:
    # End to end: a real `devicegate serve --upstream-timeout` in front of the real echo
    # upstream, whose /slow never answers while the client waits.
    with impatient_cli_gateway(tmp_path, upstream) as (server, keys):
        async with async_client(server.url) as http:
            response = await http.get("/slow", headers={"x-api-key": keys.api_key})
    assert response.status_code == 504
    assert response.json() == {
        "error": "gateway_timeout",
        "error_description": "The upstream server did not answer in time.",
    }


async def test_a_failing_send_raises_its_own_exception(upstream: Server) -> None:
    # The server's error reaches the server as itself, not wrapped in an exception group.
    proxy = proxy_for(upstream)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise OSError("client connection lost")

    try:
        with pytest.raises(OSError, match="client connection lost"):
            await proxy(request_scope("/"), receive, send)
    finally:
        await proxy.aclose()


# -- regressions: attacks on the gateway ----------------------------------------------------------
#
# One test per attack found in the security review of the gateway, named after it.


def folded(name: str) -> str:
    """A field name as CGI, WSGI and PHP read it: X_Api.Key is X-Api-Key to them."""
    return re.sub(r"[^a-z0-9]", "-", name.lower())


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` byte for byte to a real server and read its answer to the end (the
    request must say ``Connection: close``)."""
    answer = b""
    with anyio.fail_after(HANG_GUARD_SECONDS):
        async with await anyio.connect_tcp(HOST, port) as stream:
            await stream.send(request)
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    answer += await stream.receive()
    return answer


def api_key_user() -> Principal:
    return Principal(CredentialKind.API_KEY)


# TRACE (and IIS's TRACK) echo the request: a reflecting upstream would hand its own key, which
# the gateway injected, back to the device. CONNECT asks for a tunnel the gateway never opens.
@pytest.mark.parametrize("method", ["TRACE", "TRACK", "CONNECT"])
async def test_trace_reflecting_the_injected_upstream_key_is_405(
    upstream: Server, keys: Keys, method: str
) -> None:
    marker = secrets.token_hex(8)
    async with gateway(proxy_for(upstream), keys) as http:
        response = await http.request(
            method, f"/reflect?marker={marker}", headers={"x-api-key": keys.api_key}
        )
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert response.json() == {
        "error": "method_not_allowed",
        "error_description": "This gateway does not forward this method.",
    }
    assert UPSTREAM_API_KEY not in response.text
    assert not [target for target in await seen_by(upstream) if marker in target]


@pytest.mark.parametrize(
    ("method", "override"),
    [
        ("trace", None),  # methods are case-sensitive, but some servers fold them
        ("GET", (b"x-http-method-override", b"TRACE")),
        ("POST", (b"x_http_method", b" trace")),
        ("GET", (b"x-method-override", b"CONNECT")),
    ],
    ids=["lower-case", "override", "look-alike-override", "override-connect"],
)
async def test_trace_by_another_spelling_or_a_method_override_is_405(
    upstream: Server, method: str, override: tuple[bytes, bytes] | None
) -> None:
    proxy = proxy_for(upstream)
    marker = secrets.token_hex(8)
    headers = [override] if override is not None else []
    scope = request_scope(
        "/reflect", method=method, query=f"marker={marker}".encode(), headers=headers
    )
    scope["user"] = api_key_user()
    try:
        result = await drive(proxy, scope)
    finally:
        await proxy.aclose()
    assert result.status == 405
    assert not [target for target in await seen_by(upstream) if marker in target]


async def test_cli_gateway_trace_reflecting_the_injected_upstream_key_is_405(
    cli_gateway: Gateway, upstream: Server
) -> None:
    marker = secrets.token_hex(8)
    async with async_client(cli_gateway.url) as http:
        response = await http.request(
            "TRACE", f"/reflect?marker={marker}", headers={"x-api-key": cli_gateway.keys.api_key}
        )
    assert response.status_code == 405
    assert UPSTREAM_API_KEY not in response.text
    assert not [target for target in await seen_by(upstream) if marker in target]


# Content-Length and Transfer-Encoding together: which framing the ASGI server used is not the
# gateway's to guess (RFC 9112 §6.1). Forwarding the declared length with the decoded body gave
# a 500 from h11, or a request upstream whose body was not the client's.
async def test_content_length_with_transfer_encoding_smuggling_is_400(upstream: Server) -> None:
    proxy = proxy_for(upstream)
    marker = secrets.token_hex(8)
    headers = [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")]
    scope = request_scope(
        "/smuggle", method="POST", query=f"marker={marker}".encode(), headers=headers
    )
    scope["user"] = api_key_user()
    try:
        result = await drive(proxy, scope, [b"0\r\n\r\n"])
    finally:
        await proxy.aclose()
    assert result.status == 400
    assert result.json() == {
        "error": "invalid_request",
        "error_description": "The request has both Content-Length and Transfer-Encoding.",
    }
    assert result.headers[b"connection"] == b"close"
    assert not [target for target in await seen_by(upstream) if marker in target]


async def test_cli_gateway_content_length_with_transfer_encoding_smuggling_is_400(
    cli_gateway: Gateway, upstream: Server
) -> None:
    marker = secrets.token_hex(8)
    request = (
        f"POST /smuggle?marker={marker} HTTP/1.1\r\n"
        f"Host: gateway.example\r\n"
        f"X-API-Key: {cli_gateway.keys.api_key}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "Content-Length: 5\r\n"
        "Connection: close\r\n"
        "\r\n"
        "0\r\n\r\n"
    ).encode()
    answer = await raw_exchange(cli_gateway.server.port, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Content-Length and Transfer-Encoding" in answer
    assert not [target for target in await seen_by(upstream) if marker in target]


@pytest.mark.parametrize(
    ("declared", "body"),
    [(b"5", [b"abc"]), (b"3", [b"abc", b"def"])],
    ids=["short", "long"],
)
async def test_body_that_disagrees_with_its_content_length_is_400(
    upstream: Server, declared: bytes, body: list[bytes]
) -> None:
    # An ASGI server that framed the body otherwise than it declared: before, h11 raised
    # LocalProtocolError ("Too little data for declared Content-Length") and the client got 500.
    scope = request_scope("/", method="POST", headers=[(b"content-length", declared)])
    scope["user"] = api_key_user()
    result = await through_proxy(upstream, scope, body)
    assert result.status == 400
    assert result.json()["error_description"] == "The Content-Length header is invalid."


@pytest.mark.parametrize(
    "error",
    [
        h11.LocalProtocolError("Too little data for declared Content-Length"),
        httpcore.LocalProtocolError("illegal header"),
        httpx.DecodingError("bad bytes"),
        RuntimeError("a bug further down"),
    ],
    ids=["h11", "httpcore", "httpx", "other"],
)
async def test_any_upstream_failure_before_the_response_is_a_502_not_a_500(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with caplog.at_level(logging.WARNING, logger="devicegate"):
        result = await through_mock_upstream(handler, request_scope("/"))
    assert result.status == 502
    assert result.json() == {
        "error": "bad_gateway",
        "error_description": "The upstream server could not be reached.",
    }
    assert [record.levelno for record in caplog.records] == [logging.WARNING]


# CGI, WSGI and PHP upstreams read X_Devicegate_Kind (or X.Devicegate.Kind) as
# X-Devicegate-Kind: a look-alike the gateway let through would state an identity it never
# verified, or carry a credential it meant to remove.
LOOK_ALIKES = [
    ("x_devicegate_kind", "claimed-kind"),
    ("X.Devicegate.Kind", "claimed-kind"),
    ("x-devicegate_instance-id", "victim-device"),
    ("x~devicegate~instance~id", "victim-device"),
    ("x_devicegate_forward_secret", "guess"),
    ("x_api_key", "client-supplied-key"),
    ("x.api.key", "client-supplied-key"),
    ("x_instance_id", "victim-device"),
    ("x.instance+id", "victim-device"),
]


async def test_look_alike_identity_and_credential_headers_are_removed(
    upstream: Server, keys: Keys
) -> None:
    headers = [("authorization", keys.mobile_api_key), *LOOK_ALIKES]
    got = await echoed(upstream, keys, "/", headers=headers)
    as_read = [(folded(name), value) for name, value in got.headers]
    assert [(n, v) for n, v in as_read if n.startswith("x-devicegate-")] == [
        ("x-devicegate-kind", "mobile_api_key")
    ]
    assert "x-api-key" not in [name for name, _ in as_read]
    assert "x-instance-id" not in [name for name, _ in as_read]
    assert got.get_all("authorization") == [UPSTREAM_MOBILE_KEY]
    for _, value in LOOK_ALIKES:
        assert value not in got.values()


async def test_look_alikes_of_configured_credential_headers_are_removed(upstream: Server) -> None:
    headers = [(b"x_server_key", b"client-supplied-key"), (b"x.device", b"victim-device")]
    scope = request_scope("/", headers=headers, user=api_key_user())
    result = await through_proxy(
        upstream, scope, api_key_header="X-Server-Key", device_header="x-device"
    )
    names = [folded(name) for name, _ in result.json()["headers"]]
    assert "x-server-key" not in names
    assert "x-device" not in names


@pytest.mark.parametrize("kind", [CredentialKind.API_KEY, CredentialKind.MOBILE_API_KEY])
async def test_client_x_api_key_never_rides_along_under_a_renamed_gate_header(
    upstream: Server, kind: CredentialKind
) -> None:
    # The gate reads its key from X-Server-Key, but the upstream's key is injected as
    # X-API-Key: a client's own X-API-Key must not reach the upstream beside (or instead of) it.
    headers = [(b"x-api-key", b"client-chosen-guess"), (b"x_api_key", b"client-chosen-guess")]
    scope = request_scope("/", headers=headers, user=Principal(kind))
    result = await through_proxy(upstream, scope, api_key_header="x-server-key")
    received = result.json()["headers"]
    assert all(value != "client-chosen-guess" for _, value in received)
    api_keys = [value for name, value in received if folded(name) == "x-api-key"]
    assert api_keys == ([UPSTREAM_API_KEY] if kind is CredentialKind.API_KEY else [])


async def test_client_forwarding_claims_are_dropped(upstream: Server, keys: Keys) -> None:
    # Who the client is and what it asked for are facts the gateway states, not claims it
    # passes on: an upstream trusting X-Real-IP, Forwarded or X-Forwarded-Prefix would
    # believe the client, and X-Original-URL would route to a path no rule judged.
    claims = [
        ("forwarded", "for=198.51.100.9;proto=https;host=admin.example"),
        ("x-real-ip", "198.51.100.9"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/claimed-prefix"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-client-cert", "Subject=claimed-subject"),
        ("x_forwarded_for", "198.51.100.9"),
        ("x.forwarded.proto", "claimed-proto"),
        ("x_forwarded_host", "admin.example"),
        ("x-original-url", "/claimed-path"),
        ("x_original_url", "/claimed-path"),
        ("x-rewrite-url", "/claimed-path"),
        ("x-original-uri", "/claimed-path"),
        ("x-original-host", "admin.example"),
    ]
    got = await echoed(upstream, keys, "/", headers=[("x-api-key", keys.api_key), *claims])
    dropped = ("forwarded", "x-real-ip", "x-original-url", "x-original-uri", "x-original-host")
    forwarding = [
        (name, value)
        for name, value in got.headers
        if folded(name).startswith("x-forwarded-") or folded(name) in (*dropped, "x-rewrite-url")
    ]
    assert forwarding == [
        ("x-forwarded-for", CLIENT_ADDRESS[0]),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "gateway.example"),
    ]


# The middleware judges the decoded route path; the proxy forwards raw bytes. Under a Mount
# whose prefix the client percent-encodes, the raw prefix did not match the mount point and
# the upstream received the whole encoded path; a layer that rewrites scope["path"] but not
# raw_path had the rules judge one path while the upstream got another.
async def test_encoded_mount_prefix_forwards_the_path_the_rules_judged(
    upstream: Server, keys: Keys
) -> None:
    proxy = proxy_for(upstream)
    gate = DeviceAuthMiddleware(proxy, config=keys.config(), rules=[Rule("/docs/*", public=True)])
    app = Starlette(routes=[Mount("/api", app=gate)])
    try:
        async with client(app, "http://gateway.example") as http:
            encoded = echo(await http.get("/%61pi/docs/x%2By?q=%41"))
            plain = echo(await http.get("/api/docs/x%2By?q=%41"))
            private = await http.get("/%61pi/private")
    finally:
        await proxy.aclose()
    # Exact bytes below the mount point: the encoded '+' and the query survive.
    assert encoded.data["raw_path"] == plain.data["raw_path"] == "/docs/x%2By"
    assert encoded.data["query_string"] == "q=%41"
    assert private.status_code == 401


async def test_path_rewritten_without_its_raw_path_is_400(upstream: Server, keys: Keys) -> None:
    proxy = proxy_for(upstream)
    gate = DeviceAuthMiddleware(proxy, config=keys.config(), rules=[Rule("/public/*", public=True)])

    async def rewriting(scope: Scope, receive: Receive, send: Send) -> None:
        # An outer layer that maps /internal/... onto /public/... for routing, but leaves
        # raw_path as the client sent it.
        if scope["type"] == "http":
            scope = {**scope, "path": scope["path"].replace("/internal/", "/public/", 1)}
        await gate(scope, receive, send)

    marker = secrets.token_hex(8)
    try:
        async with client(rewriting, "http://gateway.example") as http:
            response = await http.get(f"/internal/secret?marker={marker}")
    finally:
        await proxy.aclose()
    assert response.status_code == 400
    assert response.json()["error_description"] == "The request target cannot be forwarded."
    assert not [target for target in await seen_by(upstream) if marker in target]


@pytest.mark.parametrize(
    ("path", "raw_path", "root_path"),
    [
        ("/a", b"/b", ""),
        ("/gw/a", b"/gw/b", "/gw"),
        ("/gw/a", b"/gx/a", "/gw"),  # another mount point in the raw path
        ("/a b", b"/a+b", ""),  # '+' is not a space in a path
        ("/a/b", b"/a%252Fb", ""),  # decoded twice by the rules, once by the upstream
    ],
)
async def test_raw_path_that_disagrees_with_the_judged_path_is_400(
    upstream: Server, path: str, raw_path: bytes, root_path: str
) -> None:
    scope = {**request_scope(path), "raw_path": raw_path, "root_path": root_path}
    scope["user"] = api_key_user()
    result = await through_proxy(upstream, scope)
    assert result.status == 400
    assert result.json()["error_description"] == "The request target cannot be forwarded."


# The upstream may route on the raw path: "/public%2Facme/reports" was judged as
# /public/acme/reports (under a public rule) and served by the upstream's /{tenant}/reports.
@pytest.mark.parametrize(
    ("path", "raw_path"),
    [
        ("/public/acme/reports", b"/public%2Facme/reports"),
        ("/public/acme/reports", b"/public%2facme/reports"),
        ("/public\\x", b"/public%5Cx"),
        ("/admin#x", b"/admin#x"),
        ("/gw/a/b", b"/gw/a%2Fb"),
    ],
)
async def test_a_path_the_upstream_may_split_otherwise_is_400(
    upstream: Server, path: str, raw_path: bytes
) -> None:
    root_path = "/gw" if path.startswith("/gw") else ""
    scope = {**request_scope(path), "raw_path": raw_path, "root_path": root_path}
    scope["user"] = api_key_user()
    result = await through_proxy(upstream, scope)
    assert result.status == 400
    assert result.json()["error_description"] == (
        "The request path has an encoded slash or backslash, or a '#'."
    )
    assert not [target for target in await seen_by(upstream) if "acme" in target or "#" in target]


async def test_an_encoded_slash_behind_a_public_rule_is_400_through_the_gateway(
    upstream: Server, keys: Keys
) -> None:
    proxy = proxy_for(upstream)
    gate = DeviceAuthMiddleware(proxy, config=keys.config(), rules=[Rule("/public/*", public=True)])
    marker = secrets.token_hex(8)
    try:
        async with client(gate, "http://gateway.example") as http:
            smuggled = await http.get(f"/public%2F{marker}/reports")
            public = await http.get(f"/public/{marker}/reports")
    finally:
        await proxy.aclose()
    assert smuggled.status_code == 400
    assert public.status_code == 200
    assert len([target for target in await seen_by(upstream) if marker in target]) == 1


# ReverseProxy's configuration errors repeated the upstream URL, which may hold a password or
# a token; the messages name the part that is wrong instead.
@pytest.mark.parametrize(
    "url",
    [
        "ftp://upstream.example/?token=tok3n-s3cret",
        "http://127.0.0.1:9000/?token=tok3n-s3cret",
        "http://127.0.0.1:9000/api#tok3n-s3cret",
        "http://[::1/tok3n-s3cret",
        "http://127.0.0.1:99999/tok3n-s3cret",
        "http://127.0.0.1:tok3n-s3cret/",
        "http:///tok3n-s3cret",
        "tok3n-s3cret",
        "http://user:tok3n-s3cret@127.0.0.1:9000",
        "http://127.0.0.1:9000/tok3n-s3cret\n",
    ],
)
def test_config_errors_never_echo_the_upstream_url(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ReverseProxy(url)
    assert caught.value.field == "upstream"
    assert "tok3n" not in str(caught.value)
    assert "tok3n" not in repr(caught.value)


# /health is answered by the gateway itself; /health/ (the same rule) went to the upstream
# without a credential, and a websocket handshake to /health reached an HTTP-only app, which
# made the server answer 500 with a traceback.
async def test_health_with_a_trailing_slash_is_never_forwarded(
    upstream: Server, keys: Keys
) -> None:
    app = build_app(keys.config(), upstream=upstream.url, upstream_api_key=UPSTREAM_API_KEY)
    marker = secrets.token_hex(8)
    async with client(app, "http://gateway.example") as http:
        for path in ("/health", "/health/"):
            response = await http.get(f"{path}?marker={marker}")
            assert response.json() == {"status": "ok"}
    assert not [target for target in await seen_by(upstream) if marker in target]


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websocket_to_health_is_refused_not_a_500(
    upstream: Server, keys: Keys, denial_extension: bool
) -> None:
    app = build_app(keys.config(), upstream=upstream.url)
    for path in ("/health", "/health/"):
        sent = await call_asgi(app, websocket_scope(path, denial_extension))
        assert not [m for m in sent if m["type"].startswith("http.")]
        if denial_extension:
            assert sent[0]["type"] == "websocket.http.response.start"
            assert sent[0]["status"] == 501
        else:
            assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_cli_gateway_health_variants_are_never_forwarded(
    cli_gateway: Gateway, upstream: Server
) -> None:
    marker = secrets.token_hex(8)
    async with async_client(cli_gateway.url) as http:
        slash = await http.get(f"/health/?marker={marker}")
    assert slash.json() == {"status": "ok"}
    assert not [target for target in await seen_by(upstream) if marker in target]

    def handshake() -> int:
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://{HOST}:{cli_gateway.server.port}/health", open_timeout=30, proxy=None)
        return info.value.response.status_code

    assert await anyio.to_thread.run_sync(handshake) == 501
    assert "Traceback" not in cli_gateway.server.output()


# The upstream's Date and the serving server's own made two Date headers (RFC 9110 §6.6.1
# allows one); the upstream's Server named its software. The proxy drops both.
async def test_upstream_date_and_server_headers_are_not_duplicated(upstream: Server) -> None:
    result = await through_proxy(upstream, request_scope("/", user=api_key_user()))
    assert result.status == 200
    names = [name for name, _ in result.start["headers"]]
    assert b"date" not in names
    assert b"server" not in names


async def test_cli_gateway_sends_one_date_header(cli_gateway: Gateway) -> None:
    async with async_client(cli_gateway.url) as http:
        response = await http.get("/v1/enroll", headers={"x-api-key": cli_gateway.keys.api_key})
    assert response.status_code == 200
    assert len(response.headers.get_list("date")) == 1
    assert "server" not in response.headers
