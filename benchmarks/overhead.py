"""What devicegate costs per request, side by side with its peers, in one run.

    python benchmarks/overhead.py                  # the full run, a few minutes
    python benchmarks/overhead.py --quick          # a smoke run: rough numbers
    python benchmarks/overhead.py --json out.json  # the same figures as JSON besides
    python benchmarks/overhead.py --instructions   # instructions per request, with valgrind

Prints Markdown: the machine, the in-process rows, the minting rate, the memory of a full token
cache, the uvicorn rows (when wrk is installed) and the targets. An overhead is the median over
many short rounds of a row's time minus its baseline's, the two timed one right after the other:
on a shared machine a baseline timed on its own drifts by more than the differences at stake.
``--instructions`` counts the CPU instructions of a request instead of timing it, which the
machine's load cannot move. A new row is one line in ``in_process_rows`` or ``http_rows``. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hmac
import itertools
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
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple

import anyio
import jwt
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devicegate import (
    Counters,
    DeviceAuthMiddleware,
    GateConfig,
    RevocationList,
    Rule,
    TokenIssuer,
    TokenVerifier,
)

DEVICE_ID = "device-0123456789abcdef"
PATH = "/items"
RULES = (  # a typical set: a path seen before has its decision remembered, a new one walks them
    Rule("/health", public=True),
    Rule("/admin/*", accept={"api_key"}),
    Rule("/devices/*", accept={"device_token", "mobile_api_key"}),
)
CURL_HEADERS = ((b"host", b"127.0.0.1:8000"), (b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*"))
Headers = tuple[tuple[bytes, bytes], ...]


# --- the apps under test -------------------------------------------------------------------------


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"Hello"})


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello")


def starlette_app(*middleware: Middleware) -> Starlette:
    return Starlette(routes=[Route(PATH, _hello)], middleware=middleware)


class PyJWTBackend(AuthenticationBackend):
    """devicegate's checks the usual Starlette way: Bearer, HS256, ``exp`` required, and the bound
    ``instance_id`` compared in constant time with the device header."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("bad authorization header")
        try:
            claims = jwt.decode(token, self.secret, ["HS256"], options={"require": ["exp"]})
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("invalid token") from exc
        device = conn.headers.get("x-instance-id", "")
        if not hmac.compare_digest(str(claims.get("instance_id")).encode(), device.encode()):
            raise AuthenticationError("wrong device")
        return AuthCredentials(["device_token"]), SimpleUser(device)


def litestar_apps(secret: str) -> tuple[ASGIApp, ASGIApp, str]:
    """Litestar hello-world, the same with ``JWTAuth`` binding the subject to the device header,
    and a token for the latter."""
    from litestar import Litestar, get
    from litestar.connection import ASGIConnection
    from litestar.security.jwt import JWTAuth, Token

    @get(PATH, sync_to_thread=False)  # type: ignore[untyped-decorator]  # litestar: not followed
    def hello() -> str:
        return "Hello"

    async def retrieve_user(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> Any:
        device = connection.headers.get("x-instance-id", "")
        return device if hmac.compare_digest(token.sub.encode(), device.encode()) else None

    auth = JWTAuth[str, Token](retrieve_user_handler=retrieve_user, token_secret=secret)
    options: Any = {"route_handlers": [hello], "openapi_config": None, "logging_config": None}
    token = auth.create_token(identifier=DEVICE_ID, token_expiration=timedelta(minutes=5))
    return Litestar(**options), Litestar(on_app_init=[auth.on_app_init], **options), str(token)


# --- the rows ------------------------------------------------------------------------------------

Make = Callable[[], Any]  # builds the input of one request, before the clock starts
Drive = Callable[[list[Any], Send], Awaitable[None]]  # runs a batch of inputs through the row


class Row(NamedTuple):
    name: str
    drive: Drive
    make: Make
    baseline: str | None = None  # the row timed beside it, whose time its overhead is over


def new_scope(headers: Headers = (), path: str = PATH, method: str = "GET") -> Scope:
    """A scope like uvicorn's, of new objects: no hash cached in one request's path or header
    strings can make the next request's dictionary lookups cheaper than in a server."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "method": method,
        "root_path": "",
        "path": path.encode().decode(),
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(bytes(bytearray(n)), bytes(bytearray(v))) for n, v in CURL_HEADERS + headers],
        "state": {},
    }


def same(headers: Headers = (), path: str = PATH, method: str = "GET") -> Make:
    return lambda: new_scope(headers, path, method)


def bearer(token: str) -> Headers:
    return (b"authorization", b"Bearer " + token.encode()), (b"x-instance-id", DEVICE_ID.encode())


def asgi(app: ASGIApp, body: bytes = b"") -> Drive:
    message: Message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> Message:
        return message

    async def drive(scopes: list[Any], send: Send) -> None:
        for scope in scopes:
            await app(scope, receive, send)

    return drive


def call(function: Callable[[Any], object]) -> Drive:
    async def drive(arguments: list[Any], send: Send) -> None:
        for argument in arguments:
            function(argument)

    return drive


class Bench:
    """What the rows share: new keys and secret, a device token, middlewares built from them."""

    def __init__(self) -> None:
        key, mobile_key, secret = (secrets.token_urlsafe(32) for _ in range(3))
        self.config = GateConfig(api_keys=key, mobile_api_keys=mobile_key, jwt_secret=secret)
        self.secret = self.config.jwt_secrets[0]
        self.api_key = ((b"x-api-key", self.config.api_keys[0].encode()),)
        self.mobile_key = ((b"authorization", self.config.mobile_api_keys[0].encode()),)
        self.mint_headers = ((b"content-type", b"application/json"), *self.api_key)
        self.mint_body = json.dumps({"instance_id": DEVICE_ID}).encode()
        self.issuer = TokenIssuer(self.config)
        self.token = self.mint()
        self.asymmetric = {name: Asymmetric(self, name) for name in ASYMMETRIC}
        self.redis_store: Any = None  # a RedisRevocationList in step with a real Redis, if any
        self.dpop = Dpop(self)

    def mint(self, device: str = DEVICE_ID) -> str:
        return self.issuer.issue(device).access_token

    def gate(
        self,
        app: ASGIApp = raw_app,
        revocations: RevocationList | None = None,
        counters: Counters | None = None,
        **options: Any,
    ) -> DeviceAuthMiddleware:
        """devicegate with the rules around ``app``; ``options`` change fields of the config."""
        config = self.config.replace(**options)
        return DeviceAuthMiddleware(
            app, config=config, rules=RULES, revocations=revocations, counters=counters
        )

    def revocations(self, count: int) -> RevocationList:
        """A revocation list holding ``count`` live entries, none of them covering the token:
        tokens by jti, devices and subjects, a third each."""

        async def fill() -> RevocationList:
            revocations = RevocationList()
            for index in range(count):
                name = f"other-{index}"
                kind = index % 3
                if kind == 0:
                    await revocations.revoke_token(name)
                elif kind == 1:
                    await revocations.revoke_device(name)
                else:
                    await revocations.revoke_subject(name)
            return revocations

        return anyio.run(fill)

    def env(self) -> dict[str, str]:
        """The same configuration for a server in a subprocess."""
        keys = self.config.api_keys[0], self.config.mobile_api_keys[0], self.secret
        names = "DEVICEGATE_API_KEYS", "DEVICEGATE_MOBILE_API_KEYS", "DEVICEGATE_JWT_SECRET"
        return {**os.environ, **dict(zip(names, keys, strict=True))}


class Asymmetric:
    """An instance minting and verifying tokens with a private key of ``algorithm`` (EdDSA or
    ES256) beside the bench's keys, and the bare ``cryptography`` verification of its tokens."""

    def __init__(self, b: Bench, algorithm: str) -> None:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

        private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        if algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
            public = private.public_key()

            def bare_verify(pair: tuple[bytes, bytes]) -> None:
                public.verify(pair[1], pair[0])

        else:
            private = ec.generate_private_key(ec.SECP256R1())
            ec_public, ecdsa = private.public_key(), ec.ECDSA(hashes.SHA256())

            def bare_verify(pair: tuple[bytes, bytes]) -> None:
                # What JWS asks of any ES256 verifier: the raw R||S made DER for OpenSSL.
                r, s = int.from_bytes(pair[1][:32], "big"), int.from_bytes(pair[1][32:], "big")
                ec_public.verify(utils.encode_dss_signature(r, s), pair[0], ecdsa)

        self.bare_verify = bare_verify
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.config = b.config.replace(jwt_private_key=pem)
        self.issuer = TokenIssuer(self.config)
        self.token = self.mint()
        self.gate = b.gate(jwt_private_key=pem)
        # A verifier of its own, with the default cache: what verifying a new token costs.
        verifier = TokenVerifier(self.config)
        device = DEVICE_ID.encode()
        self.verify: Callable[[str], object] = lambda token: verifier.verify(token, device)

    def mint(self, device: str = DEVICE_ID) -> str:
        return self.issuer.issue(device).access_token

    def signed(self) -> tuple[bytes, bytes]:
        """A new token's signing input and raw signature, decoded before the clock starts."""
        signing_input, _, signature = self.mint().encode().rpartition(b".")
        return signing_input, base64.urlsafe_b64decode(signature + b"==")


class Dpop:
    """A device holding a P-256 key, a token bound to it, and a fresh proof for each request
    (made before the clock starts, as the device makes it)."""

    def __init__(self, b: Bench) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        from devicegate.client import DPoPAuth

        private = ec.generate_private_key(ec.SECP256R1())
        self.auth = DPoPAuth(lambda: "", private_key=private)
        config = b.config.replace(public_url="http://127.0.0.1:8000")
        self.gate = b.gate(public_url="http://127.0.0.1:8000")
        self.token = TokenIssuer(config).issue(DEVICE_ID, dpop_jkt=self.auth.jkt).access_token
        public, ecdsa = private.public_key(), ec.ECDSA(hashes.SHA256())

        def bare_verify(pair: tuple[bytes, bytes]) -> None:
            r, s = int.from_bytes(pair[1][:32], "big"), int.from_bytes(pair[1][32:], "big")
            public.verify(utils.encode_dss_signature(r, s), pair[0], ecdsa)

        self.bare_verify = bare_verify

    def proof(self) -> str:
        return self.auth.proof("GET", f"http://127.0.0.1:8000{PATH}", self.token)

    def scope(self) -> Scope:
        headers = (
            (b"authorization", b"DPoP " + self.token.encode()),
            (b"x-instance-id", DEVICE_ID.encode()),
            (b"dpop", self.proof().encode()),
        )
        return new_scope(headers)

    def signed(self) -> tuple[bytes, bytes]:
        """A proof's signing input and raw signature, decoded before the clock starts."""
        signing_input, _, signature = self.proof().encode().rpartition(b".")
        return signing_input, base64.urlsafe_b64decode(signature + b"==")


ASYMMETRIC = ("EdDSA", "ES256")
RAW, CACHED = "raw ASGI app", "raw + devicegate, cached device token"
API_KEY, MOBILE = "raw + devicegate, API key", "raw + devicegate, mobile API key"
COLD = "raw + devicegate, never-seen token (full verification)"
REVOKED = f"{CACHED}, 100,000 revocations"
REDIS_REVOKED = f"{CACHED}, 100,000 revocations in a Redis replica"
COUNTED = f"{CACHED}, metrics on"
STARLETTE, PYJWT = "Starlette hello-world", "Starlette + AuthenticationMiddleware + PyJWT"
LITESTAR, DECODE, ISSUE = "Litestar hello-world", "bare jwt.decode (HS256)", "TokenIssuer.issue"


BARE_PROOF = "bare cryptography P-256 ECDSA verify of a DPoP proof"
DPOP = "raw + devicegate, DPoP request (cached ES256-proven token, a new proof)"


def cold_row(algorithm: str) -> str:
    return f"raw + devicegate, never-seen {algorithm} token (full verification)"


def verify_row(algorithm: str) -> str:
    return f"TokenVerifier.verify, never-seen {algorithm} token"


def cached_row(algorithm: str) -> str:
    return f"raw + devicegate, cached {algorithm} device token"


def bare_row(algorithm: str) -> str:
    curve = "Ed25519" if algorithm == "EdDSA" else "P-256 ECDSA"
    return f"bare cryptography {curve} verify ({algorithm})"


def issue_row(algorithm: str) -> str:
    return f"{ISSUE}, {algorithm}"


def basic_rows(b: Bench, gate: DeviceAuthMiddleware) -> list[Row]:
    """The raw app, and devicegate in front of it with each kind of credential."""
    return [
        Row(RAW, asgi(raw_app), same()),
        Row(CACHED, asgi(gate), same(bearer(b.token)), RAW),
        Row(API_KEY, asgi(gate), same(b.api_key), RAW),
        Row(MOBILE, asgi(gate), same(b.mobile_key), RAW),
    ]


def in_process_rows(b: Bench) -> list[Row]:
    """Every in-process row: name, what runs a batch, what builds a request, baseline."""
    gate, cached, mint = b.gate(), same(bearer(b.token)), same(b.mint_headers, "/gen-jwt", "POST")
    pyjwt = starlette_app(Middleware(AuthenticationMiddleware, backend=PyJWTBackend(b.secret)))
    litestar, litestar_jwt, litestar_token = litestar_apps(b.secret)
    starlette_gate = b.gate(starlette_app())
    ids = itertools.count()
    # An id in the path, as in most APIs: a path devicegate has not seen, so it walks the rules.
    new_path = lambda: new_scope(bearer(b.token), f"/devices/{next(ids)}/events")  # noqa: E731
    decode = lambda token: jwt.decode(token, b.secret, algorithms=["HS256"])  # noqa: E731
    return [
        *basic_rows(b, gate),
        Row(COLD, asgi(gate), lambda: new_scope(bearer(b.mint())), RAW),
        Row(f"{CACHED}, a new path every request", asgi(gate), new_path, RAW),
        # Paired with the row without revocations: the difference is what the list costs.
        Row(REVOKED, asgi(b.gate(revocations=b.revocations(100_000))), cached, CACHED),
        # The same entries in the local replica of a Redis store, paired with the list in
        # memory: what sharing revocations costs the request path (present with redis-server).
        *(
            [Row(REDIS_REVOKED, asgi(b.gate(revocations=b.redis_store)), cached, REVOKED)]
            if b.redis_store is not None
            else []
        ),
        # Counting for Prometheus, paired likewise: what metrics cost a request.
        Row(COUNTED, asgi(b.gate(counters=Counters())), cached, CACHED),
        Row(STARLETTE, asgi(starlette_app()), same()),
        Row("Starlette + devicegate, cached device token", asgi(starlette_gate), cached, STARLETTE),
        Row(PYJWT, asgi(pyjwt), cached, STARLETTE),
        Row(LITESTAR, asgi(litestar), same()),
        Row("Litestar + JWTAuth", asgi(litestar_jwt), same(bearer(litestar_token)), LITESTAR),
        Row(DECODE, call(decode), lambda: b.token.encode().decode()),
        Row(ISSUE, call(b.issuer.issue), lambda: DEVICE_ID.encode().decode()),
        Row("token endpoint, POST /gen-jwt through devicegate", asgi(gate, b.mint_body), mint),
        *asymmetric_rows(b),
        Row(BARE_PROOF, call(b.dpop.bare_verify), b.dpop.signed),
        # Paired with the bare check of a proof: all that a DPoP request adds to it (the
        # token is cached; the proof is new, as every request's is).
        Row(DPOP, asgi(b.dpop.gate), b.dpop.scope, BARE_PROOF),
    ]


def cold_scope(a: Asymmetric) -> Scope:
    return new_scope(bearer(a.mint()))


def asymmetric_rows(b: Bench) -> list[Row]:
    """Per algorithm: a never-seen token verified, and through the middleware, each paired
    with the bare signature check it contains; a cached token paired with the HS256 cached
    row (the difference should be nothing); and minting."""
    rows = []
    for algorithm, a in b.asymmetric.items():
        rows += [
            Row(bare_row(algorithm), call(a.bare_verify), a.signed),
            # Paired with the bare check: the overhead is all that devicegate's verification
            # adds to it (parsing, header, claims, binding, caching) ...
            Row(verify_row(algorithm), call(a.verify), a.mint, bare_row(algorithm)),
            # ... and all that a request through the middleware adds to it.
            Row(cold_row(algorithm), asgi(a.gate), partial(cold_scope, a), bare_row(algorithm)),
            Row(cached_row(algorithm), asgi(a.gate), same(bearer(a.token)), CACHED),
            Row(issue_row(algorithm), call(a.issuer.issue), lambda: DEVICE_ID.encode().decode()),
        ]
    return rows


# --- the paired in-process harness ---------------------------------------------------------------


async def _discard(message: Message) -> None:
    pass


async def per_request_us(row: Row, count: int, send: Send = _discard) -> float:
    inputs = [row.make() for _ in range(count)]
    gc.collect()
    start = time.perf_counter_ns()
    await row.drive(inputs, send)
    return (time.perf_counter_ns() - start) / count / 1000


async def batch_size(row: Row, batch_seconds: float) -> int:
    """How many requests last ``batch_seconds``, found once the row is warm and has answered
    200 (a misconfigured row would otherwise be timed as a fast refusal)."""

    async def send(message: Message) -> None:
        if message.get("status", 200) != 200:
            raise RuntimeError(f"{row.name!r} answered {message['status']}, not 200")

    return max(10, int(batch_seconds * 1e6 / await per_request_us(row, 200, send)))


IN_PROCESS_COLUMNS = ("row", "µs / request", "baseline", "overhead (µs)", "its quartiles (µs)")


async def measure(rows: list[Row], rounds: int, batch_seconds: float) -> list[dict[str, Any]]:
    """Per row, µs per request (median batch) and, given a baseline, the overhead: the median
    of the per-round differences, the row timed right beside its baseline (first in one round,
    second in the next) in every round."""
    by_name = {row.name: row for row in rows}
    sizes = {row.name: await batch_size(row, batch_seconds) for row in rows}
    samples: dict[str, list[float]] = {row.name: [] for row in rows}
    differences: dict[str, list[float]] = {row.name: [] for row in rows}
    for round_number in range(rounds):
        for row in rows:
            pair = [row] if row.baseline is None else [row, by_name[row.baseline]]
            if round_number % 2:
                pair.reverse()
            us = {each.name: await per_request_us(each, sizes[each.name]) for each in pair}
            for name, value in us.items():
                samples[name].append(value)
            if row.baseline is not None:
                differences[row.name].append(us[row.name] - us[row.baseline])
    table = []
    for row in rows:
        paired: list[Any] = [None, None]
        if row.baseline:  # the quartiles of the differences say how far to trust their median
            diffs = differences[row.name]
            low, median, high = (
                statistics.quantiles(diffs, method="inclusive") if rounds > 1 else diffs * 3
            )
            paired = [median, [low, high]]
        values = [row.name, statistics.median(samples[row.name]), row.baseline, *paired]
        table.append(dict(zip(IN_PROCESS_COLUMNS, values, strict=True)))
    return table


# --- instructions: the basic rows counted by valgrind -------------------------------------------

# What --instructions names each basic row by on the command line.
COUNTABLE = {"raw": RAW, "cached": CACHED, "api-key": API_KEY, "mobile-key": MOBILE}
# Each row is counted twice with this many requests, and twice building them only: the
# differences leave out the start-up, the imports and the building of the requests.
FEWER, MORE = 1000, 3000


def run_requests(key: str, count: int, build_only: bool) -> None:
    """Build ``count`` requests of one basic row and, unless ``build_only``, run them: what
    ``--instructions`` runs under valgrind."""
    b = Bench()
    row = {row.name: row for row in basic_rows(b, b.gate())}[COUNTABLE[key]]

    async def run() -> None:
        await batch_size(row, 0.001)  # warm, and every answer a 200
        inputs = [row.make() for _ in range(count)]
        gc.collect()
        # Off while the requests run, as it would otherwise count scans of the requests built
        # in advance, which more requests make longer.
        gc.disable()
        if not build_only:
            await row.drive(inputs, _discard)

    anyio.run(run)


def instructions(keys: list[str]) -> list[dict[str, Any]]:
    """Per basic row, the CPU instructions of one request, and how many more than the raw
    app's. valgrind counts every instruction the process runs, so the figures do not move
    with the machine's load: they show a change in the code where timings show noise."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")

    # A fixed hash seed (the same dictionary probes in every process, though each draws its
    # own keys and token), and no bytecode written: a process that compiled and wrote a module
    # another then read would count the compiling alone, and the differences with it.
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    child = (sys.executable, __file__, "--run-requests")

    def counted(run: tuple[str, int, bool]) -> int:
        key, count, build_only = run
        command = [
            *(valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"),
            *(*child, key, "--count", str(count)),
            *(["--build-only"] if build_only else []),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
        if result.returncode or found is None:
            raise RuntimeError(f"counting {key} failed:\n{result.stderr[-2000:]}")
        return int(found[1].replace(",", ""))

    keys = ["raw", *dict.fromkeys(key for key in keys if key != "raw")]  # raw: the baseline
    # Once without valgrind: a setup problem (a missing package, a row that does not answer
    # 200) shows in seconds, with its own message.
    for key in keys:
        trial = subprocess.run([*child, key, "--count", "1"], capture_output=True, text=True)
        if trial.returncode:
            raise RuntimeError(f"{key} does not run:\n{trial.stderr[-2000:]}")
    runs = [(key, n, build) for key in keys for n in (FEWER, MORE) for build in (False, True)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        total = dict(zip(runs, pool.map(counted, runs), strict=True))
    per = {
        key: round(
            (
                (total[key, MORE, False] - total[key, FEWER, False])
                - (total[key, MORE, True] - total[key, FEWER, True])
            )
            / (MORE - FEWER)
        )
        for key in keys
    }
    return [
        {
            "row": COUNTABLE[key],
            "instructions / request": per[key],
            "over the raw app": None if key == "raw" else per[key] - per["raw"],
        }
        for key in keys
    ]


# --- over HTTP: uvicorn on one CPU, wrk on the others --------------------------------------------

TIMINGS_PATH = "/_bench/timings"
SERVERS = {"raw": "raw", "control": "raw", "devicegate": "devicegate"}  # name: what it serves
HTTP_RAW, HTTP_GATE = "uvicorn, raw ASGI app", "uvicorn, raw + devicegate, cached device token"


class HttpRow(NamedTuple):
    name: str
    server: str
    path: str
    headers: Headers = ()
    body: bytes = b""
    baseline: str | None = None


def http_rows(b: Bench) -> list[HttpRow]:
    """Every HTTP row: name, server, path, headers, body, baseline."""
    return [
        HttpRow(HTTP_RAW, "raw", PATH),
        # The same app again: how far apart two identical servers measure is the noise.
        HttpRow("uvicorn, raw ASGI app again (control)", "control", PATH, baseline=HTTP_RAW),
        HttpRow(HTTP_GATE, "devicegate", PATH, bearer(b.token), baseline=HTTP_RAW),
        HttpRow("uvicorn, POST /gen-jwt", "devicegate", "/gen-jwt", b.mint_headers, b.mint_body),
    ]


class Timed:
    """Times each request inside the server, around its app; ``GET /_bench/timings`` answers the
    median µs since the previous such call. Around the raw app and devicegate alike, its own cost
    cancels out of their difference, which is then what devicegate costs among uvicorn's work
    (that evicts its code and data from the CPU caches, as a tight in-process loop never does).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.samples: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == TIMINGS_PATH:
            samples, self.samples = self.samples, []
            body = json.dumps(statistics.median(samples) / 1000).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        start = time.perf_counter_ns()
        await self.app(scope, receive, send)
        self.samples.append(time.perf_counter_ns() - start)


def serve(server: str, port: int, cpu: int | None) -> None:
    import uvicorn

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    app = raw_app
    if SERVERS[server] == "devicegate":
        app = DeviceAuthMiddleware(raw_app, config=GateConfig.from_env(), rules=RULES)
    uvicorn.run(Timed(app), port=port, log_level="warning", access_log=False, lifespan="off")


@contextmanager
def redis_replica(count: int) -> Iterator[Any]:
    """A ``RedisRevocationList`` whose replica holds ``count`` revocations, in step with a
    redis-server started here (none: ``None``). The entries are written the documented way, by
    a tool, and reach the replica through its resync, as they would in production."""
    executable = shutil.which("redis-server")
    if executable is None:
        yield None
        return
    import redis

    from devicegate.redis import RedisRevocationList

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        arguments = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory]
        process = subprocess.Popen([executable, *arguments], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(400):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            now = time.time()
            kinds = ("jti", "instance_id", "sub")
            entries = {f"{kinds[i % 3]}:other-{i}": now for i in range(count)}
            client.zadd("devicegate:revocations", entries)
            with RedisRevocationList(f"redis://127.0.0.1:{port}", staleness=30) as store:
                for _ in range(600):
                    if store.fresh and len(store) == count:
                        break
                    time.sleep(0.05)
                else:
                    raise RuntimeError("the Redis replica did not fill")
                yield store
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextmanager
def uvicorn_server(server: str, env: dict[str, str], cpu: int | None) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, "--serve", server, "--port", str(port)]
    process = subprocess.Popen(command + ([] if cpu is None else ["--cpu", str(cpu)]), env=env)
    try:
        for _ in range(400):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    yield f"http://127.0.0.1:{port}"
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the {server} server did not start")
    finally:
        process.terminate()
        process.wait(timeout=10)


def wrk(url: str, row: HttpRow, seconds: int, connections: int) -> tuple[float, float]:
    """Requests/s and p99 latency in ms, as wrk measures them."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        for name, value in row.headers:
            script.write(
                f"wrk.headers[{json.dumps(name.decode())}] = {json.dumps(value.decode())}\n"
            )
        if row.body:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(row.body.decode())}\n')
        script.flush()
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s"]
        output = subprocess.run(
            [*command, script.name, url], capture_output=True, text=True, check=True
        ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", output, re.MULTILINE)
    if rate is None or p99 is None or "Non-2xx" in output:
        raise RuntimeError(f"wrk saw errors, or its output is not as expected:\n{output}")
    return float(rate[1]), float(p99[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99[2]]


HTTP_COLUMNS = (
    *("row", "requests / s", "p99 (ms)", "µs inside uvicorn", "baseline", "µs inside, over it"),
    *("% of its requests/s (range)", "% of its requests/s by time inside"),
)


def run_http(b: Bench, rounds: int, seconds: int, connections: int) -> list[dict[str, Any]]:
    """Per HTTP row, the medians over ``rounds`` rounds (every row once in a round, starting with
    another each round) and, given a baseline, of the per-round ratios and differences to it."""
    # One CPU for the servers, the others for wrk, so that they never take turns on one core.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu = cpus[0] if len(cpus) > 1 else None
    rows = http_rows(b)
    runs: dict[str, list[tuple[float, float, float]]] = {row.name: [] for row in rows}
    with ExitStack() as stack:
        urls = {
            name: stack.enter_context(uvicorn_server(name, b.env(), server_cpu)) for name in SERVERS
        }
        if server_cpu is not None:
            os.sched_setaffinity(0, cpus[1:])  # this process, and the wrk it starts
            stack.callback(os.sched_setaffinity, 0, cpus)
        for round_number in range(rounds + 1):  # the first round warms up, and is dropped
            for row in rows[round_number % len(rows) :] + rows[: round_number % len(rows)]:
                rate, p99 = wrk(urls[row.server] + row.path, row, seconds, connections)
                with urllib.request.urlopen(urls[row.server] + TIMINGS_PATH) as timings:  # noqa: S310
                    runs[row.name].append((rate, p99, float(timings.read())))
    table = []
    for row in rows:
        mine, theirs = runs[row.name][1:], runs[row.baseline or row.name][1:]
        rate, p99, inside = (statistics.median(column) for column in zip(*mine, strict=True))
        extra = statistics.median(a[2] - b[2] for a, b in zip(mine, theirs, strict=True))
        shares = [100 * a[0] / b[0] for a, b in zip(mine, theirs, strict=True)]
        # A request takes 1 / rate of the baseline server's time, and `extra` more here.
        by_time = 100 / (1 + extra * statistics.median(run[0] for run in theirs) / 1e6)
        share = [statistics.median(shares), min(shares), max(shares)]
        paired = [extra, share, by_time] if row.baseline else [None] * 3
        values = [row.name, rate, p99, inside, row.baseline, *paired]
        table.append(dict(zip(HTTP_COLUMNS, values, strict=True)))
    return table


# --- memory, the machine, the report -------------------------------------------------------------


def cache_memory() -> dict[str, int]:
    """What a full default token cache of device-bound tokens holds, by tracemalloc."""
    b = Bench()
    entries = b.config.token_cache_size
    devices = [f"device-{number:016x}" for number in range(entries)]
    tokens = [b.mint(device).encode() for device in devices]  # the cache keeps them as its keys
    verifier = TokenVerifier(b.config)
    gc.collect()
    tracemalloc.start()
    for token, device in zip(tokens, devices, strict=True):
        verifier.verify(token, device.encode())
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if verifier.cache_size != entries:
        raise RuntimeError(f"the cache holds {verifier.cache_size} tokens, not {entries}")
    return {"entries": entries, "bytes": held}


def package(name: str) -> str:
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"no {name}"


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read(), re.MULTILINE)
    names = ("devicegate", "starlette", "litestar", "pyjwt", "uvicorn", "h11", "httptools")
    wrk_version = (
        subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
        if shutil.which("wrk")
        else "no wrk"
    )
    return {
        "cpu": f"{cpu[1] if cpu else platform.machine()}, {os.cpu_count()} logical CPUs",
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(map(package, names)) + ", " + wrk_version.split(" [")[0],
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    us = {row["row"]: row["µs / request"] for row in report["in process"]}
    over = {row["row"]: row["overhead (µs)"] for row in report["in process"]}
    cached, cold = over[CACHED], over[COLD] / us[DECODE]
    found = [
        ("cached device token ≤ 1.8 µs overhead (aim 1.5)", f"{cached:.2f} µs", cached <= 1.8),
        (
            "≥ 20 times less than Starlette + PyJWT",
            f"{over[PYJWT] / cached:.0f} times",
            over[PYJWT] >= 20 * cached,
        ),
        ("API key ≤ 1.3 µs overhead", f"{over[API_KEY]:.2f} µs", over[API_KEY] <= 1.3),
        ("mobile API key ≤ 1.3 µs overhead", f"{over[MOBILE]:.2f} µs", over[MOBILE] <= 1.3),
        ("cold path ≤ 0.6 of a bare jwt.decode", f"{cold:.2f}", cold <= 0.6),
        (
            "100,000 revocations cost ≤ 0.2 µs on a cached token",
            f"{over[REVOKED]:+.2f} µs",
            over[REVOKED] <= 0.2,
        ),
        ("metrics cost ≤ 0.3 µs a request", f"{over[COUNTED]:+.2f} µs", over[COUNTED] <= 0.3),
    ]
    if REDIS_REVOKED in over:
        shared = over[REDIS_REVOKED]
        found.append(
            (
                "a Redis replica of 100,000 revocations within 0.2 µs of the list in memory",
                f"{shared:+.2f} µs",
                shared <= 0.2,
            )
        )
    for algorithm in ASYMMETRIC:
        ratio = 1 + over[verify_row(algorithm)] / us[bare_row(algorithm)]
        extra = over[cached_row(algorithm)]
        found += [
            (
                f"verifying a new {algorithm} token ≤ 1.3 times its bare signature check",
                f"{ratio:.2f} times",
                ratio <= 1.3,
            ),
            (
                f"cached {algorithm} token within 0.1 µs of HS256",
                f"{extra:+.2f} µs",
                abs(extra) <= 0.1,
            ),
        ]
    dpop = 1 + over[DPOP] / us[BARE_PROOF]
    found.append(
        ("a DPoP request ≤ 1.3 times a bare check of its proof", f"{dpop:.2f} times", dpop <= 1.3)
    )
    rate = 1e6 / us[issue_row("EdDSA")]
    found.append(("≥ 10,000 EdDSA tokens/s minted", f"{rate:,.0f} tokens/s", rate >= 10_000))
    for row in report["over HTTP"] or ():
        if row["row"] == HTTP_GATE:
            share = row[HTTP_COLUMNS[-1]]
            found.append(
                ("uvicorn ≥ 96 % of unprotected requests/s", f"{share:.1f} %", share >= 96)
            )
    return [{"target": target, "measured": value, "met": met} for target, value, met in found]


def cell(value: Any) -> str:
    if isinstance(value, list):
        first, *rest = map(cell, value)
        return f"{first} ({' to '.join(rest)})" if len(value) == 3 else " to ".join([first, *rest])
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return {None: "", True: "yes", False: "**no**"}.get(value, str(value))


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|---" + "|---:" * (len(table[0]) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row.values())) + " |" for row in table])


def main() -> int:
    parser = argparse.ArgumentParser(description="What devicegate costs per request.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: rough numbers")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE as JSON too")
    parser.add_argument("--rounds", type=int, help="in-process rounds (41; quick: 3)")
    parser.add_argument("--http-rounds", type=int, help="HTTP rounds (10; quick: 1; 0: none)")
    parser.add_argument("--seconds", type=int, help="seconds of one HTTP load (3; quick: 1)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections (32)")
    parser.add_argument(
        "--instructions",
        nargs="*",
        choices=COUNTABLE,
        metavar="ROW",
        help="count the CPU instructions of a request with valgrind instead of timing it, for "
        f"the rows given ({', '.join(COUNTABLE)}; default: all)",
    )
    parser.add_argument("--run-requests", choices=COUNTABLE, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=FEWER, help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # run one server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.cpu)
        return 0
    if args.run_requests:
        run_requests(args.run_requests, args.count, args.build_only)
        return 0
    if args.instructions is not None:
        counts = instructions(args.instructions or list(COUNTABLE))
        on = machine()
        found = {"machine": on, "requests": [FEWER, MORE], "instructions": counts}
        print("\n".join(f"- {value}" for value in on.values()))
        print(f"- instructions counted by valgrind, {FEWER:,} and {MORE:,} requests a row\n")
        print(markdown(counts))
        if args.json:
            with open(args.json, "w") as file:
                json.dump(found, file, indent=1, ensure_ascii=False)
        return 0
    rounds = args.rounds or (3 if args.quick else 41)
    http_rounds = (1 if args.quick else 10) if args.http_rounds is None else args.http_rounds
    seconds = args.seconds or (1 if args.quick else 3)
    report: dict[str, Any] = {"machine": machine()}
    with redis_replica(100_000) as redis_store:
        bench = Bench()
        bench.redis_store = redis_store
        rows = in_process_rows(bench)
        report["in process"] = anyio.run(measure, rows, rounds, 0.001 if args.quick else 0.01)
    report["tokens / s"] = 1e6 / {r["row"]: r for r in report["in process"]}[ISSUE]["µs / request"]
    report["cache"] = cache_memory()
    report["over HTTP"] = None
    if http_rounds and shutil.which("wrk"):
        report["over HTTP"] = run_http(Bench(), http_rounds, seconds, args.connections)
    report["targets"] = targets(report)

    print("\n".join(f"- {value}" for value in report["machine"].values()))
    print(f"- {rounds} in-process rounds; {http_rounds} HTTP rounds of {seconds} s\n")
    print(markdown(report["in process"]) + "\n")
    cache = report["cache"]
    print(f"{ISSUE} mints {report['tokens / s']:,.0f} tokens/s. A full default cache holds")
    print(f"{cache['entries']:,} tokens in {cache['bytes'] / 1e6:.1f} MB (tracemalloc).\n")
    if report["over HTTP"]:
        print(markdown(report["over HTTP"]))
    else:
        print("No HTTP rows: " + ("wrk not found." if http_rounds else "--http-rounds 0."))
    print("\n" + markdown(report["targets"]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
