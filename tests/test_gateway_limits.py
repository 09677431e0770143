"""The gateway under slow clients, with real sockets against a real ``devicegate serve
--upstream`` in front of a real uvicorn.

The attack: many clients each send a request with a valid credential and then a body one byte
at a time (or ask for a large response and never read it). Without limits they held every
pooled upstream connection, and every other request waited and got 504. With the gateway's
limits (``ProxyLimits``), small bodies and responses are buffered, large ones take at most half
the pool, and a client that falls behind its deadline is cut off: legitimate requests are
answered promptly throughout, and the attackers end up holding nothing.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.types import Message

from devicegate import ConfigError
from devicegate.gateway._app import ServeSettings
from devicegate.gateway.proxy import ProxyLimits, ReverseProxy
from tests.helpers import Keys, write_secrets
from tests.servers.process import (
    HOST,
    Server,
    answers,
    devicegate_command,
    serve,
    sync_client,
    uvicorn_command,
)
from tests.test_proxy import Exchange, drive, request_scope, through_mock_upstream

CONNECTIONS = 8  # the gateway's upstream pool: small, so that a few attackers could fill it
ATTACKERS = 3 * CONNECTIONS
CLIENT_SECONDS = 4  # how long a client has, before its rate is counted
UPSTREAM = "http://upstream.invalid"


# -- in process: each limit, and the answer it gives -----------------------------------------------


async def two_held_then_a_third(limits: ProxyLimits, body: list[bytes]) -> list[Exchange]:
    """Two requests with ``body`` held by the upstream, then a third sent while they are: the
    three answers (the third first), and how many reached the upstream."""
    release, two_in = anyio.Event(), anyio.Event()
    reached: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        reached.append(request)
        if len(reached) == 2:
            two_in.set()
        await release.wait()
        await request.aread()
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as pool:
        proxy = ReverseProxy(UPSTREAM, client=pool, limits=limits)
        results: list[Exchange] = []

        async def one() -> None:
            results.append(await drive(proxy, request_scope("/", method="POST"), body))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(one)
            tasks.start_soon(one)
            await two_in.wait()
            third = await drive(proxy, request_scope("/", method="POST"), body)
            release.set()
    assert len(reached) == 2  # the third never reached the upstream
    return [third, *results]


async def test_requests_beyond_the_concurrency_limit_get_503_at_once() -> None:
    refused, *admitted = await two_held_then_a_third(ProxyLimits(concurrent=2), [])
    assert refused.status == 503
    assert refused.headers[b"retry-after"] == b"1"
    assert [result.status for result in admitted] == [200, 200]
    after = await through_mock_upstream(lambda request: httpx.Response(204), request_scope("/"))
    assert after.status == 204


async def test_a_small_body_is_read_whole_before_the_upstream_is_asked() -> None:
    # Sent in three parts without a length (chunked): the upstream gets one body with its
    # length, as nginx's request buffering sends it.
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        return httpx.Response(200)

    scope = request_scope("/upload", method="POST")
    result = await through_mock_upstream(handler, scope, body=[b"ab", b"cd", b"ef"])
    assert result.status == 200
    (request,) = seen
    assert request.content == b"abcdef"
    assert request.headers["content-length"] == "6"
    assert "transfer-encoding" not in request.headers


async def test_large_bodies_stream_through_half_the_pool_at_most() -> None:
    # With a pool of 4, two large bodies may stream at once; the third gets 503 (its body
    # unread, the connection closed).
    limits = ProxyLimits(connections=4, buffer_bytes=4)
    refused, *admitted = await two_held_then_a_third(limits, [b"0123456789", b"more"])
    assert refused.status == 503
    assert (b"connection", b"close") in refused.start["headers"]
    assert [result.status for result in admitted] == [200, 200]


async def test_a_large_upload_with_a_large_answer_takes_one_streaming_slot() -> None:
    # A pool of 2 streams one exchange at a time: the upload's slot carries its response too.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"y" * 1000)

    scope = request_scope("/upload", method="POST")
    limits = ProxyLimits(connections=2, buffer_bytes=4)
    result = await through_mock_upstream(handler, scope, limits=limits, body=[b"0123456789", b"x"])
    assert result.status == 200
    assert result.body_bytes == 1000
    assert result.complete


class Held(httpx.AsyncByteStream):
    """An upstream body of unknown length: one part, then the rest once ``go`` is set."""

    def __init__(self, go: anyio.Event) -> None:
        self.go = go

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first event\n"
        await self.go.wait()
        yield b"second event\n"


async def test_a_stream_of_unknown_length_is_relayed_as_it_comes() -> None:
    # Server-sent events, say: the first part reaches the client before the upstream sends the
    # next one (a gateway that buffered it would wait for ever).
    go = anyio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Held(go))

    bodies: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message.get("body", b""))
            go.set()  # the client has the first part: only now does the upstream go on

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as pool:
        proxy = ReverseProxy(UPSTREAM, client=pool)
        with anyio.fail_after(5):
            await proxy(request_scope("/events"), receive, send)
    assert bodies == [b"first event\n", b"second event\n", b""]


async def test_with_every_slot_taken_a_read_is_told_to_retry_but_a_write_is_answered() -> None:
    # One slot (a pool of 2), held by a stream; then a GET and a POST whose answers are long
    # streams too. The upstream has handled both: the GET may be repeated (503, Retry-After),
    # the POST may have changed something, so its answer is relayed all the same.
    go = anyio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Held(go))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as pool:
        proxy = ReverseProxy(UPSTREAM, client=pool, limits=ProxyLimits(connections=2))
        holder: list[Exchange] = []
        async with anyio.create_task_group() as tasks:

            async def hold() -> None:
                holder.append(await drive(proxy, request_scope("/events")))

            tasks.start_soon(hold)
            while proxy._streaming == 0:
                await anyio.lowlevel.checkpoint()
            read = await drive(proxy, request_scope("/events"))
            written: list[Exchange] = []

            async def write() -> None:
                written.append(await drive(proxy, request_scope("/orders", method="POST")))

            tasks.start_soon(write)
            await anyio.sleep(0.1)
            go.set()
    assert read.status == 503
    assert read.headers[b"retry-after"] == b"1"
    assert [exchange.status for exchange in holder + written] == [200, 200]
    assert proxy._streaming == 0


async def test_a_body_that_falls_behind_its_deadline_gets_408() -> None:
    # One byte every 0.1 s: never idle for the 10 s timeout, but far below 1 KiB/s, so past
    # the 0.5 s the client has it is answered 408 and its connection closed.
    async def receive() -> Message:
        await anyio.sleep(0.1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    limits = ProxyLimits(client_seconds=0.5)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200))
    ) as pool:
        proxy = ReverseProxy(UPSTREAM, client=pool, timeout=10, limits=limits)
        started = anyio.current_time()
        await proxy(request_scope("/upload", method="POST"), receive, send)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert anyio.current_time() - started < 2


async def test_a_client_that_stops_reading_is_cut_off() -> None:
    # A response larger than the buffer, to a client that takes the first parts and then no
    # more: after client_seconds without taking one, the response ends unfinished.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 100_000)

    taken: list[Message] = []

    async def send(message: Message) -> None:
        if len(taken) >= 2:
            await anyio.sleep_forever()  # a full socket buffer, as the server sees it
        taken.append(message)

    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()  # no disconnect: the client is there, just not reading
        raise AssertionError

    limits = ProxyLimits(buffer_bytes=10, client_seconds=0.3)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as pool:
        proxy = ReverseProxy(UPSTREAM, client=pool, limits=limits)
        started = anyio.current_time()
        await proxy(request_scope("/big"), receive, send)
        assert proxy._streaming == 0  # the streaming slot is free again
    assert taken[0]["status"] == 200
    assert len(taken) == 2  # the start and one part: never the end of the body
    assert anyio.current_time() - started < 2


def test_the_limits_refuse_nonsense_by_name() -> None:
    for options, says in (
        ({"connections": 1}, r"^connections: must be an integer from 2 to 100000, got 1$"),
        ({"concurrent": True}, r"^concurrent: must be an integer"),
        ({"client_seconds": 0}, r"^client_seconds: must be a positive number of seconds$"),
        ({"client_seconds": float("nan")}, r"^client_seconds: "),
        ({"min_client_rate": -1}, r"^min_client_rate: "),
    ):
        with pytest.raises(ConfigError, match=says):
            ProxyLimits(**options)
    with pytest.raises(ConfigError, match=r"^DEVICEGATE_BUFFER_BYTES: must be an integer$"):
        ProxyLimits.from_env({"DEVICEGATE_BUFFER_BYTES": "lots"})
    with pytest.raises(ConfigError, match=r"^DEVICEGATE_MAX_CONCURRENT: must be an integer from"):
        ProxyLimits.from_env({"DEVICEGATE_MAX_CONCURRENT": "0"})
    limits = ProxyLimits(connections=10, client_seconds=2.5, min_client_rate=0)
    assert ProxyLimits.from_env(limits.to_env()) == limits
    assert (
        ServeSettings.from_env(ServeSettings(proxy_limits=limits).to_env()).proxy_limits == limits
    )
    assert limits.time_left(10**9, 0.5) == 2.0  # no rate: the time given is all there is


# -- real sockets against a real serve --upstream ------------------------------------------------


@pytest.fixture
def gateway(starts_a_process: None, tmp_path: Path, keys: Keys) -> Iterator[Server]:
    secrets_file = write_secrets(tmp_path / "secrets.json", keys)
    with (
        serve(uvicorn_command("tests.servers.echo:app"), tmp_path / "echo.log") as upstream,
        serve(
            devicegate_command(
                "--secrets", str(secrets_file),
                "--upstream", upstream.url,
                "--upstream-connections", str(CONNECTIONS),
                "--client-timeout", str(CLIENT_SECONDS),
                "--min-client-rate", "1024",
                "--log-level", "warning",
            ),
            tmp_path / "gateway.log",
            cwd=tmp_path,
            ready=answers("/health"),
        ) as gateway,
    ):  # fmt: skip
        yield gateway


def open_request(server: Server, head: str) -> socket.socket:
    """A connection that has sent ``head`` (a request line and fields) and nothing more."""
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window (set before connecting, when it is negotiated), so that a
    # response the client never reads backs up quickly.
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(10)
    connection.connect((HOST, server.port))
    connection.sendall(head.encode() + b"\r\n")
    return connection


def legit_requests_are_answered_promptly(server: Server, api_key: str, count: int) -> None:
    with sync_client(server.url) as http:
        for _ in range(count):
            started = time.monotonic()
            response = http.get("/items", headers={"x-api-key": api_key}, timeout=3)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 2
            time.sleep(0.2)


def read_until_closed(connection: socket.socket, seconds: float) -> bytes:
    """Everything the gateway sends until it closes the connection (fails after ``seconds``)."""
    connection.settimeout(seconds)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


@pytest.mark.integration
def test_slow_request_bodies_hold_no_upstream_connection(gateway: Server, keys: Keys) -> None:
    head = (
        "POST /upload HTTP/1.1\r\nHost: gateway\r\n"
        f"X-API-Key: {keys.api_key}\r\nContent-Length: 1000\r\n"
    )
    with ExitStack() as stack:
        attackers = [stack.enter_context(open_request(gateway, head)) for _ in range(ATTACKERS)]
        started = time.monotonic()
        for second in range(3):  # one byte a second from each: never idle long enough for 408
            for attacker in attackers:
                attacker.sendall(b"x")
            if second == 1:
                legit_requests_are_answered_promptly(gateway, keys.api_key, 3)
            time.sleep(1)
        # Past their deadline (4 s plus a second per KiB: nothing earned), each is answered
        # 408 and its connection closed: they hold nothing any more.
        for attacker in attackers:
            answer = read_until_closed(attacker, CLIENT_SECONDS + 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"request_timeout" in answer
        assert time.monotonic() - started < CLIENT_SECONDS + 5
    legit_requests_are_answered_promptly(gateway, keys.api_key, 2)


@pytest.mark.integration
def test_slow_readers_of_large_responses_are_cut_off(gateway: Server, keys: Keys) -> None:
    size = 8 * 1024 * 1024  # far above the buffer: streamed, and never read by the attackers
    target = f"/big?bytes={size}"
    head = f"GET {target} HTTP/1.1\r\nHost: gateway\r\nX-API-Key: {keys.api_key}\r\n"
    credential = {"x-api-key": keys.api_key}
    with ExitStack() as stack, sync_client(gateway.url) as http:
        attackers = [stack.enter_context(open_request(gateway, head)) for _ in range(ATTACKERS)]
        time.sleep(1)
        # Half the pool streams to the attackers at most: the other half serves everyone
        # else, while the streaming slots are all taken.
        legit_requests_are_answered_promptly(gateway, keys.api_key, 3)
        assert http.get(target, headers=credential).status_code == 503
        # Once the attackers have not read for CLIENT_SECONDS, they are cut off, and the
        # slots and connections they held are free again.
        time.sleep(CLIENT_SECONDS + 2)
        downloaded = http.get(target, headers=credential, timeout=30)
        assert downloaded.status_code == 200
        assert len(downloaded.content) == size
        legit_requests_are_answered_promptly(gateway, keys.api_key, 2)
        # What each attacker got: a 503, or the part of the response sent before the cut.
        answers_ = [read_until_closed(attacker, 30) for attacker in attackers]
    busy = [answer for answer in answers_ if answer.startswith(b"HTTP/1.1 503 ")]
    streamed = [answer for answer in answers_ if answer.startswith(b"HTTP/1.1 200 ")]
    assert len(streamed) + len(busy) == ATTACKERS
    assert 1 <= len(streamed) <= CONNECTIONS // 2
    assert all(b"retry-after: 1" in answer.lower() for answer in busy)
    assert all(len(answer) < size for answer in streamed)
