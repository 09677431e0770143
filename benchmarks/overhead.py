"""What devicegate costs per request, measured side by side with its peers in one run.

Run it from the repository root::

    python benchmarks/overhead.py            # the full run (about four minutes)
    python benchmarks/overhead.py --quick    # a fast smoke run; the numbers are rough

It prints Markdown: the machine, then tables of microseconds per request (the median of several
repetitions, every case interleaved in each repetition so that drift hits all of them alike),
the overhead over each case's baseline and ratios, the HTTP throughput through uvicorn (beside
an identical unprotected server as a control) and the time each request spends inside it, the
token endpoint's rate and the memory of a full token cache, and finally the targets of issue 3
with the measured value next to each. ``--help`` lists the knobs. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio
import jwt
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicegate import DeviceAuthMiddleware, GateConfig, Rule, TokenIssuer, TokenVerifier
from devicegate import _auth as devicegate_auth

DEVICE_ID = "device-0123456789abcdef"
PATH = "/items"
TOKEN_PATH = "/gen-jwt"
# The rules of every devicegate under test, in process and over HTTP: a typical set. A path seen
# before has its route remembered; a new one is walked through these.
BENCH_RULES = (
    Rule("/health", public=True),
    Rule("/admin/*", accept={"api_key"}),
    Rule("/devices/*", accept={"device_token", "mobile_api_key"}),
)
# What curl sends; every in-process request carries these besides its credential.
BASE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"curl/8.5.0"),
    (b"accept", b"*/*"),
)


# --- the apps under test -------------------------------------------------------------------


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The smallest useful ASGI app: answers every request with 200 and a short body."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello"})


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello")


def starlette_app(middleware: Sequence[Middleware] = ()) -> Starlette:
    return Starlette(routes=[Route(PATH, _hello)], middleware=list(middleware))


class PyJWTBackend(AuthenticationBackend):
    """A typical Starlette backend doing devicegate's checks with PyJWT.

    ``Bearer`` scheme, HS256 signature, ``exp`` required and checked, and a bound
    ``instance_id`` compared in constant time with the device header.
    """

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        authorization = conn.headers.get("authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("bad authorization header")
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("invalid token") from exc
        instance_id = claims.get("instance_id")
        if instance_id is not None:
            device = conn.headers.get("x-instance-id")
            if not isinstance(instance_id, str) or device is None:
                raise AuthenticationError("device header required")
            if not hmac.compare_digest(instance_id.encode(), device.encode()):
                raise AuthenticationError("wrong device")
        return AuthCredentials(["device_token"]), SimpleUser(instance_id or "device")


def litestar_apps(secret: str) -> tuple[ASGIApp, ASGIApp, str]:
    """Litestar hello-world without and with ``JWTAuth``, and a token for the latter."""
    from litestar import Litestar, get
    from litestar.connection import ASGIConnection
    from litestar.security.jwt import JWTAuth, Token

    @get(PATH, sync_to_thread=False)  # type: ignore[untyped-decorator]  # litestar: not followed
    def hello() -> str:
        return "Hello"

    async def retrieve_user(
        token: Token, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> str | None:
        # The same device binding as devicegate: the subject must equal the device header.
        device = connection.headers.get("x-instance-id")
        if device is None or not hmac.compare_digest(token.sub.encode(), device.encode()):
            return None
        return str(token.sub)

    auth = JWTAuth[str, Token](retrieve_user_handler=retrieve_user, token_secret=secret)
    plain: ASGIApp = Litestar(route_handlers=[hello], openapi_config=None, logging_config=None)
    protected: ASGIApp = Litestar(
        route_handlers=[hello],
        on_app_init=[auth.on_app_init],
        openapi_config=None,
        logging_config=None,
    )
    token = auth.create_token(identifier=DEVICE_ID, token_expiration=timedelta(minutes=5))
    return plain, protected, str(token)


def bench_config(**options: Any) -> GateConfig:
    return GateConfig(
        api_keys=secrets.token_urlsafe(32),
        mobile_api_keys=secrets.token_urlsafe(32),
        jwt_secret=secrets.token_urlsafe(32),
        **options,
    )


# --- driving an ASGI app in-process ---------------------------------------------------------


def http_scope(
    headers: Sequence[tuple[bytes, bytes]] = (), *, method: str = "GET", path: str = PATH
) -> dict[str, Any]:
    """A scope shaped like the one uvicorn builds."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [*BASE_HEADERS, *headers],
        "state": {},
    }


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode()), (b"x-instance-id", DEVICE_ID.encode())]


def _receiver(body: bytes) -> Receive:
    message: Message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> Message:
        return message

    return receive


async def _discard(message: Message) -> None:
    pass


@dataclass
class AsgiCase:
    """One in-process row: an ASGI app and the request scopes it is driven with.

    ``scopes`` returns the scope templates of one repetition: one per request. A warm case
    repeats one template; the cold case gives a fresh token to every request.
    """

    name: str
    app: ASGIApp
    scopes: Callable[[int], list[dict[str, Any]]]
    body: bytes = b""
    expect: int = 200


def fresh_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``scope`` with new path and header objects, as a server builds every request:
    no hash cached by one request can speed up the next one's dictionary lookups."""
    return {
        **scope,
        "path": scope["path"].encode().decode(),
        "raw_path": bytes(bytearray(scope["raw_path"])),
        "headers": [
            (bytes(bytearray(name)), bytes(bytearray(value))) for name, value in scope["headers"]
        ],
    }


def repeat_scope(scope: dict[str, Any]) -> Callable[[int], list[dict[str, Any]]]:
    return lambda n: [fresh_scope(scope) for _ in range(n)]


async def _status_of(case: AsgiCase) -> int:
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await case.app({**case.scopes(1)[0], "state": {}}, _receiver(case.body), send)
    return statuses[0] if statuses else 0


async def _time_case(case: AsgiCase, n: int) -> float:
    """Seconds per request over ``n`` requests."""
    templates = case.scopes(n)
    app = case.app
    receive = _receiver(case.body)
    gc.collect()
    start = time.perf_counter()
    for template in templates:
        # A fresh scope per request, as a server builds one (the apps write into it).
        await app({**template, "state": {}}, receive, _discard)
    return (time.perf_counter() - start) / n


def _time_sync(function: Callable[[], None], n: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        function()
    return (time.perf_counter() - start) / n


@dataclass
class Result:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def us(self) -> float:
        return statistics.median(self.samples) * 1e6


@dataclass
class InProcess:
    """The medians of every in-process case, keyed by name."""

    results: dict[str, Result]

    def us(self, name: str) -> float:
        return self.results[name].us


# Row names; the README and the smoke test refer to these.
RAW = "raw ASGI app"
DG_CACHED = "raw + devicegate, cached device token"
DG_API_KEY = "raw + devicegate, API key"
DG_MOBILE = "raw + devicegate, mobile API key"
DG_COLD = "raw + devicegate, never-seen token (cold)"
DG_NEW_PATHS = "raw + devicegate, cached device token, a new path every request"
PY_CACHED = "raw + devicegate, pure Python, cached device token"
PY_API_KEY = "raw + devicegate, pure Python, API key"
PY_MOBILE = "raw + devicegate, pure Python, mobile API key"
STARLETTE = "Starlette hello-world"
STARLETTE_DG = "Starlette + devicegate, cached device token"
STARLETTE_PYJWT = "Starlette + AuthenticationMiddleware + PyJWT"
LITESTAR = "Litestar hello-world"
LITESTAR_JWT = "Litestar + JWTAuth"
JWT_DECODE = "bare jwt.decode (HS256)"
MINT = "token endpoint, POST /gen-jwt through devicegate"

IN_PROCESS_ROWS = (
    RAW,
    DG_CACHED,
    DG_API_KEY,
    DG_MOBILE,
    DG_COLD,
    DG_NEW_PATHS,
    PY_CACHED,
    PY_API_KEY,
    PY_MOBILE,
    STARLETTE,
    STARLETTE_DG,
    STARLETTE_PYJWT,
    LITESTAR,
    LITESTAR_JWT,
    JWT_DECODE,
    MINT,
)
# Each row's overhead is measured against this baseline.
BASELINES = {
    DG_CACHED: RAW,
    DG_API_KEY: RAW,
    DG_MOBILE: RAW,
    DG_COLD: RAW,
    DG_NEW_PATHS: RAW,
    PY_CACHED: RAW,
    PY_API_KEY: RAW,
    PY_MOBILE: RAW,
    STARLETTE_DG: STARLETTE,
    STARLETTE_PYJWT: STARLETTE,
    LITESTAR_JWT: LITESTAR,
}


WARM_UP = 200


@contextmanager
def pure_python() -> Iterator[None]:
    """Middlewares built inside authenticate in pure Python, as on an install without a C
    compiler (or on PyPy, or with DEVICEGATE_NO_EXTENSIONS=1)."""
    saved = devicegate_auth.FastPath
    devicegate_auth.FastPath = None
    try:
        yield
    finally:
        devicegate_auth.FastPath = saved


def build_cases(cold_requests: int) -> tuple[list[AsgiCase], Callable[[], None]]:
    """Every in-process ASGI case, and the bare ``jwt.decode`` call.

    ``cold_requests`` fresh tokens are minted for the cold case, besides those of the warm-up
    and the status check.
    """
    config = bench_config()
    secret = config.jwt_secrets[0]
    issuer = TokenIssuer(config)
    token = issuer.issue(DEVICE_ID).access_token
    gate = DeviceAuthMiddleware(raw_app, config=config, rules=BENCH_RULES, token_path=TOKEN_PATH)
    with pure_python():
        pure_gate = DeviceAuthMiddleware(
            raw_app, config=config, rules=BENCH_RULES, token_path=TOKEN_PATH
        )

    # The cold path: a token never seen before on every request, all minted beforehand.
    fresh_tokens = iter(
        [issuer.issue(DEVICE_ID).access_token for _ in range(cold_requests + WARM_UP + 1)]
    )

    def cold_scopes(count: int) -> list[dict[str, Any]]:
        return [fresh_scope(http_scope(bearer(next(fresh_tokens)))) for _ in range(count)]

    # Ids in the path, as in most APIs: every request's path is one the gate has not seen.
    device_numbers = iter(range(10**12))

    def new_path_scopes(count: int) -> list[dict[str, Any]]:
        return [
            fresh_scope(
                http_scope(bearer(token), path=f"/devices/{next(device_numbers):012d}/events")
            )
            for _ in range(count)
        ]

    starlette_plain = starlette_app()
    starlette_gate = DeviceAuthMiddleware(starlette_app(), config=config)
    starlette_pyjwt = starlette_app(
        [Middleware(AuthenticationMiddleware, backend=PyJWTBackend(secret))]
    )
    litestar_plain, litestar_jwt, litestar_token = litestar_apps(secret)
    mint_scope = http_scope(
        [
            (b"x-api-key", config.api_keys[0].encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"32"),
        ],
        method="POST",
        path=TOKEN_PATH,
    )
    api_key = repeat_scope(http_scope([(b"x-api-key", config.api_keys[0].encode())]))
    mobile_key = repeat_scope(http_scope([(b"authorization", config.mobile_api_keys[0].encode())]))
    cases = [
        AsgiCase(RAW, raw_app, repeat_scope(http_scope())),
        AsgiCase(DG_CACHED, gate, repeat_scope(http_scope(bearer(token)))),
        AsgiCase(DG_API_KEY, gate, api_key),
        AsgiCase(DG_MOBILE, gate, mobile_key),
        AsgiCase(DG_COLD, gate, cold_scopes),
        AsgiCase(DG_NEW_PATHS, gate, new_path_scopes),
        AsgiCase(PY_CACHED, pure_gate, repeat_scope(http_scope(bearer(token)))),
        AsgiCase(PY_API_KEY, pure_gate, api_key),
        AsgiCase(PY_MOBILE, pure_gate, mobile_key),
        AsgiCase(STARLETTE, starlette_plain, repeat_scope(http_scope())),
        AsgiCase(STARLETTE_DG, starlette_gate, repeat_scope(http_scope(bearer(token)))),
        AsgiCase(STARLETTE_PYJWT, starlette_pyjwt, repeat_scope(http_scope(bearer(token)))),
        AsgiCase(LITESTAR, litestar_plain, repeat_scope(http_scope())),
        AsgiCase(
            LITESTAR_JWT,
            litestar_jwt,
            repeat_scope(
                http_scope(
                    [
                        (b"authorization", b"Bearer " + litestar_token.encode()),
                        (b"x-instance-id", DEVICE_ID.encode()),
                    ]
                )
            ),
        ),
        AsgiCase(
            MINT,
            gate,
            repeat_scope(mint_scope),
            body=json.dumps({"instance_id": DEVICE_ID}).encode(),
        ),
    ]

    def decode() -> None:
        jwt.decode(token, secret, algorithms=["HS256"])

    return cases, decode


async def run_in_process(repeats: int, n: int, slow_n: int) -> InProcess:
    """Time every in-process case ``repeats`` times, interleaved; ``slow_n`` requests per
    repetition for the cases that cost tens of microseconds, ``n`` for the others."""
    cases, decode = build_cases(repeats * slow_n)
    for case in cases:
        status = await _status_of(case)
        if status != case.expect:
            raise RuntimeError(f"{case.name!r} answered {status}, expected {case.expect}")
    slow = {DG_COLD, STARLETTE_PYJWT, LITESTAR, LITESTAR_JWT, MINT}
    results = {name: Result(name) for name in IN_PROCESS_ROWS}
    for case in cases:
        await _time_case(case, WARM_UP)
    for _ in range(repeats):
        for case in cases:
            count = slow_n if case.name in slow else n
            results[case.name].samples.append(await _time_case(case, count))
        results[JWT_DECODE].samples.append(_time_sync(decode, slow_n))
    return InProcess(results)


# --- over HTTP ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def split_cpus() -> tuple[int | None, set[int] | None]:
    """One CPU for the servers and the rest for the load generator, when this machine lets a
    process choose (Linux) and has at least two; else ``(None, None)``.

    Kept apart, the server and the load generator do not take turns on one core, which on a
    2-core machine is most of the noise between rounds.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], set(cpus[1:])


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run this process (and what it starts meanwhile, the load generator) on ``cpus``."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def uvicorn_server(kind: str, env: dict[str, str], cpu: int | None = None) -> Iterator[str]:
    """Serve the raw app (``kind`` "raw") or devicegate around it ("devicegate") with uvicorn
    in a subprocess on 127.0.0.1, on CPU ``cpu`` when given; yields the base URL."""
    port = free_port()
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    process = subprocess.Popen(command, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn ({kind}) did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


TIMINGS_PATH = "/_bench/timings"


class Timed:
    """Times every request inside the server, around the app it wraps.

    ``GET /_bench/timings`` answers the median of the requests since the previous such call, in
    µs, and starts over. This is what the app costs in situ: between two requests the server's
    own work evicts the app's code and data from the CPU caches, which a tight in-process loop
    never does. Wrapped around both the raw app and devicegate, its own cost cancels out.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.samples: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == TIMINGS_PATH:
            samples, self.samples = self.samples, []
            body = json.dumps({"median_us": statistics.median(samples) / 1000 if samples else 0})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        start = time.perf_counter_ns()
        await self.app(scope, receive, send)
        self.samples.append(time.perf_counter_ns() - start)


def serve(kind: str, port: int, cpu: int | None) -> None:
    import uvicorn

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    app: ASGIApp = raw_app
    if kind == "devicegate":
        app = DeviceAuthMiddleware(
            raw_app, config=GateConfig.from_env(), rules=BENCH_RULES, token_path=TOKEN_PATH
        )
    uvicorn.run(Timed(app), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def app_time(base_url: str) -> float:
    """The median µs a server spent in its app since the last call (see :class:`Timed`)."""
    import httpx

    response = httpx.get(base_url + TIMINGS_PATH, timeout=10)
    response.raise_for_status()
    return float(response.json()["median_us"])


@dataclass
class Load:
    requests_per_second: float
    p99_ms: float
    errors: int


_WRK_DURATION = re.compile(r"([\d.]+)(us|ms|s|m)\b")


def _wrk_ms(text: str) -> float:
    match = _WRK_DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[match.group(2)]
    return float(match.group(1)) * scale


def run_wrk(
    url: str, headers: Sequence[tuple[str, str]], seconds: float, connections: int, body: str
) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n')
        for name, value in headers:
            script.write(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n")
    try:
        output = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if rate is None or p99 is None:
        raise RuntimeError(f"cannot read the wrk output:\n{output}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(float(rate.group(1)), _wrk_ms(p99.group(1)), int(errors.group(1)) if errors else 0)


def run_python_load(
    url: str, headers: Sequence[tuple[str, str]], seconds: float, connections: int, body: str
) -> Load:
    """The fallback when wrk is not installed: an anyio/httpx client in a subprocess."""
    command = [
        sys.executable,
        __file__,
        "--load",
        json.dumps(
            {
                "url": url,
                "headers": headers,
                "seconds": seconds,
                "connections": connections,
                "body": body,
            }
        ),
    ]
    output = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    data = json.loads(output)
    return Load(data["requests_per_second"], data["p99_ms"], data["errors"])


async def python_load(spec: dict[str, Any]) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    headers = dict(spec["headers"])
    body: str = spec["body"]
    deadline = time.perf_counter() + spec["seconds"]
    limits = httpx.Limits(max_connections=spec["connections"])
    async with httpx.AsyncClient(base_url=spec["url"], limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                if body:
                    response = await client.post("", headers=headers, content=body)
                else:
                    response = await client.get("", headers=headers)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(spec["connections"]):
                group.start_soon(worker)
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    return {"requests_per_second": len(latencies) / elapsed, "p99_ms": p99 * 1000, "errors": errors}


@dataclass
class HttpResults:
    tool: str
    loads: dict[str, list[Load]]
    # Per round, the median µs each server spent in its app (see Timed).
    app_us: dict[str, list[float]]

    def median_rate(self, name: str) -> float:
        return statistics.median(load.requests_per_second for load in self.loads[name])

    def median_p99(self, name: str) -> float:
        return statistics.median(load.p99_ms for load in self.loads[name])

    def shares(self, name: str) -> list[float]:
        """Per round, ``name``'s requests/s over the raw app's in the same round."""
        return [
            other.requests_per_second / raw.requests_per_second
            for raw, other in zip(self.loads[HTTP_RAW], self.loads[name], strict=True)
        ]

    def median_app_us(self, name: str) -> float:
        return statistics.median(self.app_us[name])

    def app_us_over_raw(self, name: str) -> float:
        """The median over rounds of ``name``'s µs in the app minus the raw app's."""
        return statistics.median(
            other - raw for raw, other in zip(self.app_us[HTTP_RAW], self.app_us[name], strict=True)
        )

    @property
    def in_situ_share(self) -> float:
        """The share of the unprotected requests/s that devicegate's time inside the server
        leaves: each request takes ``1 / rate`` of the server's time, plus devicegate's."""
        return 1 / (1 + self.app_us_over_raw(HTTP_DG) * self.median_rate(HTTP_RAW) / 1e6)

    @property
    def protected_share(self) -> float:
        """The median over rounds of devicegate's requests/s over the raw app's."""
        return statistics.median(self.shares(HTTP_DG))

    @property
    def control_share(self) -> float:
        """The same for the second unprotected server: 100 % but for the noise."""
        return statistics.median(self.shares(HTTP_CONTROL))


HTTP_RAW = "uvicorn, raw ASGI app"
HTTP_CONTROL = "uvicorn, raw ASGI app again (control)"
HTTP_DG = "uvicorn, raw + devicegate, cached device token"
HTTP_MINT = "uvicorn, POST /gen-jwt through devicegate"


def run_http(rounds: int, seconds: float, connections: int) -> HttpResults:
    config = bench_config()
    env = {
        "DEVICEGATE_API_KEYS": config.api_keys[0],
        "DEVICEGATE_MOBILE_API_KEYS": config.mobile_api_keys[0],
        "DEVICEGATE_JWT_SECRET": config.jwt_secrets[0],
    }
    token = TokenIssuer(config).issue(DEVICE_ID).access_token
    use_wrk = shutil.which("wrk") is not None
    load = run_wrk if use_wrk else run_python_load
    loads: dict[str, list[Load]] = {HTTP_RAW: [], HTTP_CONTROL: [], HTTP_DG: [], HTTP_MINT: []}
    app_us: dict[str, list[float]] = {name: [] for name in loads}
    token_headers = [("Authorization", f"Bearer {token}"), ("X-Instance-Id", DEVICE_ID)]
    mint_headers = [("X-API-Key", config.api_keys[0]), ("Content-Type", "application/json")]
    mint_body = json.dumps({"instance_id": DEVICE_ID})
    server_cpu, load_cpus = split_cpus()
    with (
        uvicorn_server("raw", env, server_cpu) as raw_url,
        # The same unprotected app in a second server: how far apart two identical servers
        # measure is the noise that any share below must be read against.
        uvicorn_server("raw", env, server_cpu) as control_url,
        uvicorn_server("devicegate", env, server_cpu) as gate_url,
        pinned(load_cpus),
    ):
        servers = [(HTTP_RAW, raw_url), (HTTP_CONTROL, control_url), (HTTP_DG, gate_url)]
        # A short warm-up of every server (its timings dropped), then the rounds.
        for _, url in servers:
            load(url + PATH, token_headers, 1, connections, "")
            app_time(url)
        for round_number in range(rounds):
            # Each round starts with a different server, so that a slow patch of a shared
            # machine does not always hit the same one.
            start = round_number % len(servers)
            for name, url in servers[start:] + servers[:start]:
                loads[name].append(load(url + PATH, token_headers, seconds, connections, ""))
                app_us[name].append(app_time(url))
        for _ in range(rounds):
            loads[HTTP_MINT].append(
                load(gate_url + TOKEN_PATH, mint_headers, seconds, connections, mint_body)
            )
            app_us[HTTP_MINT].append(app_time(gate_url))
    for name, runs in loads.items():
        if any(run.errors for run in runs):
            raise RuntimeError(f"{name}: the server answered errors under load")
    tool = "wrk" if use_wrk else "anyio/httpx load generator"
    where = (
        f", servers on CPU {server_cpu}, load on CPU {', '.join(map(str, sorted(load_cpus)))}"
        if server_cpu is not None and load_cpus
        else ""
    )
    return HttpResults(
        f"{tool}, {connections} connections, {seconds:g} s per round{where}", loads, app_us
    )


# --- memory ---------------------------------------------------------------------------------


@dataclass
class Memory:
    entries: int
    bytes_total: int

    @property
    def mb(self) -> float:
        return self.bytes_total / 1e6

    @property
    def per_entry(self) -> float:
        return self.bytes_total / self.entries


def measure_cache_memory(entries: int) -> Memory:
    """Fill a cache of ``entries`` with realistic bound tokens; measure what it holds."""
    config = bench_config(token_cache_size=entries)
    issuer = TokenIssuer(config)
    devices = [f"device-{index:016x}" for index in range(entries)]
    tokens = [issuer.issue(device).access_token for device in devices]
    verifier = TokenVerifier(config)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for token, device in zip(tokens, devices, strict=True):
            # The token bytes are created here, as a request's header value would be: the
            # cache keeps them as its key.
            verifier.verify(token.encode(), device.encode())
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if verifier.cache_size != entries:
        raise RuntimeError(f"the cache holds {verifier.cache_size} tokens, expected {entries}")
    return Memory(entries, after - before)


# --- the report -----------------------------------------------------------------------------


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fast_path = (
        "compiled (devicegate._speedups)"
        if devicegate_auth.compiled_fast_path()
        else "pure Python (no compiled module)"
    )
    packages = ", ".join(
        f"{name} {_package(name)}"
        for name in ("devicegate", "starlette", "litestar", "pyjwt", "uvicorn", "anyio")
    )
    return (
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; {platform.system()} {platform.release()}\n"
        f"- Python {platform.python_version()} ({platform.python_implementation()})\n"
        f"- {packages}\n"
        f"- devicegate's fast path: {fast_path}\n"
        f"- load generator: {'wrk' if shutil.which('wrk') else 'anyio/httpx (wrk not found)'}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def in_process_table(measured: InProcess) -> str:
    cached = measured.us(DG_CACHED) - measured.us(RAW)
    rows = []
    for name in IN_PROCESS_ROWS:
        us = measured.us(name)
        baseline = BASELINES.get(name)
        if baseline is None:
            overhead, ratio = "", ""
        else:
            extra = us - measured.us(baseline)
            overhead = f"{extra:+.2f}"
            ratio = f"{extra / cached:.1f}x" if cached > 0 else "n/a"
        rows.append([name, f"{us:.2f}", overhead, ratio])
    return table(
        [
            "in-process case",
            "µs / request",
            "overhead over its baseline (µs)",
            "overhead ÷ devicegate cached-token overhead",
        ],
        rows,
    )


def http_table(results: HttpResults) -> str:
    rows = []
    for name in (HTTP_RAW, HTTP_CONTROL, HTTP_DG, HTTP_MINT):
        rate = results.median_rate(name)
        shares = results.shares(name) if name in (HTTP_CONTROL, HTTP_DG) else []
        share = f"{statistics.median(shares):.1%}" if shares else ""
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{results.median_p99(name):.2f}",
                share,
                f"{results.median_app_us(name):.2f}",
            ]
        )
    return table(
        [
            "over HTTP",
            "requests / s",
            "p99 latency (ms)",
            "of unprotected req/s (paired)",
            "µs in the app, inside uvicorn",
        ],
        rows,
    )


def targets_table(
    measured: InProcess, http: HttpResults | None, memory: Memory | None
) -> tuple[str, bool]:
    raw = measured.us(RAW)
    cached = measured.us(DG_CACHED) - raw
    starlette_peer = measured.us(STARLETTE_PYJWT) - measured.us(STARLETTE)
    api_key = measured.us(DG_API_KEY) - raw
    mobile = measured.us(DG_MOBILE) - raw
    cold = (measured.us(DG_COLD) - raw) / measured.us(JWT_DECODE)
    tokens_per_second = 1e6 / measured.us(MINT)
    rows: list[tuple[str, str, bool]] = [
        ("cached device token ≤ 1.5 µs overhead", f"{cached:.2f} µs", cached <= 1.5),
        (
            "cached token ≥ 20x less overhead than Starlette AuthenticationMiddleware + PyJWT",
            f"{starlette_peer / cached:.0f}x" if cached > 0 else "n/a",
            cached > 0 and starlette_peer / cached >= 20,
        ),
        ("API key ≤ 1 µs overhead", f"{api_key:.2f} µs", api_key <= 1.0),
        ("mobile API key ≤ 1 µs overhead", f"{mobile:.2f} µs", mobile <= 1.0),
        ("cold path ≤ 1.15x bare jwt.decode", f"{cold:.2f}x", cold <= 1.15),
        (
            "token endpoint ≥ 20,000 tokens/s in-process",
            f"{tokens_per_second:,.0f} tokens/s",
            tokens_per_second >= 20_000,
        ),
    ]
    if http is not None:
        # Judged on what devicegate costs inside the server: two identical servers' requests/s
        # differ by more than the 3 points at stake (see the control), the time inside does not.
        estimate = http.in_situ_share
        rows.append(
            (
                "≥ 97 % of the unprotected requests/s over uvicorn",
                f"{estimate:.1%} from the time inside uvicorn "
                f"({http.protected_share:.1%} by requests/s, control {http.control_share:.1%})",
                estimate >= 0.97,
            )
        )
    if memory is not None:
        rows.append(
            (
                f"a full cache ({memory.entries:,} tokens) < 30 MB",
                f"{memory.mb:.1f} MB",
                memory.mb < 30,
            )
        )
    text = table(
        ["target (issue 3)", "measured", "met"],
        [[goal, value, "yes" if met else "**no**"] for goal, value, met in rows],
    )
    return text, all(met for _, _, met in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run; rough numbers")
    parser.add_argument("--repeats", type=int, help="repetitions of every case (median taken)")
    parser.add_argument("--requests", type=int, help="requests per repetition, fast cases")
    parser.add_argument("--slow-requests", type=int, help="requests per repetition, slow cases")
    parser.add_argument("--no-http", action="store_true", help="skip the runs through uvicorn")
    parser.add_argument("--seconds", type=float, help="duration of one HTTP load round")
    parser.add_argument("--rounds", type=int, help="HTTP load rounds per server")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections")
    parser.add_argument("--cache-entries", type=int, default=10_000, help="for the memory row")
    parser.add_argument("--serve", choices=["raw", "devicegate"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None:
        serve(args.serve, args.port, args.cpu)
        return 0
    if args.load is not None:
        print(json.dumps(anyio.run(python_load, json.loads(args.load))))
        return 0

    # Many short repetitions rather than a few long ones: on a shared machine a burst of
    # someone else's work then spoils a few samples, which the median ignores.
    repeats = args.repeats or (3 if args.quick else 21)
    n = args.requests or (2_000 if args.quick else 20_000)
    slow_n = args.slow_requests or (200 if args.quick else 1_000)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = args.rounds or (2 if args.quick else 10)

    print("# devicegate overhead benchmark\n")
    print(machine())
    print(
        f"- {repeats} repetitions, medians; {n:,} requests per repetition "
        f"({slow_n:,} for the slow cases)\n"
    )
    measured = anyio.run(run_in_process, repeats, n, slow_n)
    print(in_process_table(measured))
    print()
    print(f"The token endpoint mints {1e6 / measured.us(MINT):,.0f} tokens/s in-process.\n")

    memory = measure_cache_memory(args.cache_entries)
    print(
        f"A full token cache of {memory.entries:,} bound tokens holds {memory.mb:.1f} MB "
        f"(tracemalloc), {memory.per_entry:,.0f} bytes per entry.\n"
    )
    http: HttpResults | None = None
    if not args.no_http:
        http = run_http(rounds=rounds, seconds=seconds, connections=args.connections)
        print(f"Over HTTP ({http.tool}; medians of {rounds} rounds):\n")
        print(http_table(http))
        control = http.shares(HTTP_CONTROL)
        print(
            f"\nThe control serves the unprotected app again: its rounds measured "
            f"{min(control):.1%} to {max(control):.1%} of the first server's. That spread is "
            "this run's noise; a share difference smaller than it is not a measurement.\n"
        )
        print(
            f"Timed inside uvicorn, devicegate with a cached token adds "
            f"{http.app_us_over_raw(HTTP_DG):+.2f} µs per request (median of paired rounds; "
            f"the control: {http.app_us_over_raw(HTTP_CONTROL):+.2f} µs), against "
            f"{measured.us(DG_CACHED) - measured.us(RAW):+.2f} µs in the in-process loop.\n"
        )
    text, _ = targets_table(measured, http, memory)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
