"""Soak and fuzz: devicegate under hostile and legitimate load, over real sockets.

Three campaigns, each against real servers on 127.0.0.1 started here and stopped after:

* **hostile**: generated requests (header shapes, credentials, tokens, paths, methods, bodies,
  websocket handshakes) sent to uvicorn serving :mod:`benchmarks.soak_app` (devicegate with a
  full revocation list). Each answer is judged against :func:`model_admits`, a reference model
  of the rules in SECURITY.md written here independently of devicegate (it verifies tokens
  with PyJWT): no 500 may come back, and nothing the model refuses may be admitted.
* **legit**: keys, cached and fresh tokens and minting from many connections over several
  worker processes, after a warm-up that fills every worker's token cache: no error, the
  latency percentiles, and the workers' memory after warm-up and at the end.
* **gateway** and **nginx**: the same credentials through ``devicegate serve --upstream`` and
  through nginx ``auth_request`` (``docs/nginx.conf.example``), to an upstream that answers
  slowly, never, with garbage, or by resetting the connection: no 500 from devicegate, no
  client credential reaching the upstream, and no upstream connection left open after.

Run from the repository root::

    python -m benchmarks.soak                 # the full campaign (several minutes)
    python -m benchmarks.soak --short         # the short form the test suite runs

It prints Markdown, and with ``--json FILE`` writes the figures as JSON too. Exit status 1
when a guarantee failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import platform
import random
import secrets
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.abc
import jwt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import Keys, fresh_keys, write_secrets  # noqa: E402
from tests.servers.process import (  # noqa: E402
    HOST,
    Server,
    answers,
    devicegate_command,
    serve,
)

DEVICE_HEADER = b"x-instance-id"
SOAK_MARK = b"x-soak-app"
PUBLIC = ("/health",)
ADMIN_PREFIX = "/admin"
TOKEN_PATH = "/gen-jwt"
SERVER_KEY_ENDPOINTS = (TOKEN_PATH,)
MAX_CREDENTIAL_BYTES = 8192
LAST_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z (rule 5)
REQUEST_SECONDS = 15.0
PROXIED_SECONDS = 5.0
POOL = 100  # the gateway's default pool of upstream connections
CACHE_SIZE = 10_000  # devicegate's default token cache
WARMUP_RECONNECT = 50
CACHE_PATH = "/__soak/cache"


# -- a raw HTTP/1.1 client: hostile requests must go out byte for byte ---------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    seconds: float


class Dropped(Exception):
    """The server closed the connection without a complete answer."""


class Connection:
    """One keep-alive connection, reopened whenever the server closes it."""

    def __init__(self, port: int, seconds: float = REQUEST_SECONDS) -> None:
        self._port = port
        self._seconds = seconds
        self._stream: anyio.abc.SocketStream | None = None
        self._buffer = b""

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        self._stream, self._buffer = None, b""

    async def _read(self) -> bytes:
        assert self._stream is not None
        try:
            return await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            raise Dropped from None

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._buffer += await self._read()
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += await self._read()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def send(self, raw: bytes, *, head_only: bool = False) -> Answer:
        """Send ``raw`` (a whole request) and read the answer."""
        started = time.perf_counter()
        if self._stream is None:
            self._stream = await anyio.connect_tcp(HOST, self._port)
        try:
            with anyio.fail_after(self._seconds):
                await self._stream.send(raw)
                answer = await self._answer(head_only)
        except BaseException:
            await self.close()
            raise
        answer.seconds = time.perf_counter() - started
        if answer.status == 101 or answer.headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return answer

    async def _answer(self, head_only: bool) -> Answer:
        head = await self._read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if head_only or status in (101, 204, 304) or 100 <= status < 200:
            body = b""
        elif b"content-length" in headers:
            body = await self._read_exactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int((await self._read_until(b"\r\n")).split(b";")[0], 16):
                parts.append(await self._read_exactly(size))
                await self._read_exactly(2)
            await self._read_until(b"\r\n")
            body = b"".join(parts)
        else:  # delimited by the end of the connection
            with contextlib.suppress(Dropped):
                while True:
                    self._buffer += await self._read()
            body, self._buffer = self._buffer, b""
            await self.close()
        return Answer(status, headers, body, 0.0)


def encode(
    method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"host: soak.test"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- tokens, minted here with PyJWT (not with devicegate) ----------------------------------------


class Minter:
    def __init__(self, keys: Keys) -> None:
        self.secret = keys.jwt_secret
        self.other_secret = secrets.token_urlsafe(48)

    def token(self, device: str | None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iat": now, "exp": now + 300, "jti": secrets.token_hex(8)}
        if device is not None:
            body["instance_id"] = device
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None}
        return jwt.encode(body, self.secret, algorithm="HS256")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(
    header: dict[str, Any],
    payload: dict[str, Any],
    secret: str | None,
    digest: Callable[..., Any] = hashlib.sha256,
) -> str:
    """A token built by hand, for shapes PyJWT will not make."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return signing_input + "." + b64(mac)


# -- the reference model -------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    websocket: bool = False
    label: str = ""

    def raw(self) -> bytes:
        return encode(self.method, self.target, self.headers, self.body)


class Model:
    """What SECURITY.md says devicegate admits, decided from the request as sent. Independent of
    devicegate's code: tokens are checked with PyJWT."""

    def __init__(self, keys: Keys, revoked_before: float) -> None:
        self.api_key = keys.api_key.encode()
        self.mobile_key = keys.mobile_api_key.encode()
        self.secret = keys.jwt_secret
        self.revoked_before = revoked_before

    def admits(self, request: Request) -> bool:
        headers = [(name.lower(), value.strip(b" \t")) for name, value in request.headers]
        if any(b"\0" in v or b"\r" in v or b"\n" in v for _, v in headers):
            return False  # not HTTP: the server refuses it before devicegate
        path = self.route_path(request.target)
        if path is None:
            return False
        if path in PUBLIC or path.rstrip("/") in PUBLIC:
            return True
        kind = self.credential(headers)
        if kind is None:
            return False
        if path in SERVER_KEY_ENDPOINTS:
            return kind == "api_key" and request.method == "POST"
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return kind == "api_key"
        return True

    @staticmethod
    def route_path(target: str) -> str | None:
        """The decoded path, or None for one devicegate refuses (rule 2)."""
        raw = target.split("?", 1)[0]
        if not raw.startswith("/"):
            return None
        try:
            raw.encode("ascii")
        except UnicodeEncodeError:
            return None
        path = unquote(raw) if "%" in raw else raw  # as the server decodes it for the app
        segments = path.split("/")[1:]
        if any(segment in (".", "..") for segment in segments):
            return None
        if "" in segments[:-1] or (path != "/" and path.endswith("//")):
            return None
        if "\\" in path or ";" in path or not path.isprintable():
            return None
        return path

    def credential(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The kind of the one valid credential (rule 6), or None."""
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            found.setdefault(name, []).append(value)
        authorization = found.get(b"authorization", [])
        api_keys = found.get(b"x-api-key", [])
        devices = found.get(DEVICE_HEADER, [])
        if len(authorization) > 1 or len(api_keys) > 1 or len(devices) > 1:
            return None
        if api_keys:
            if authorization:
                return None
            return "api_key" if hmac.compare_digest(api_keys[0], self.api_key) else None
        if not authorization:
            return None
        value = authorization[0]
        if len(value) > MAX_CREDENTIAL_BYTES or b"\t" in value:
            return None
        if value == self.mobile_key:
            return "mobile_api_key"
        scheme, space, token = value.partition(b" ")
        if not space or scheme.lower() != b"bearer" or not token or b" " in token:
            return None
        device = devices[0] if devices else None
        return "device_token" if self.token_ok(token, device) else None

    def token_ok(self, token: bytes, device: bytes | None) -> bool:
        # Three unpadded base64url segments (rule 6), then PyJWT's checks.
        if token.count(b".") != 2 or not all(
            segment and segment.replace(b"-", b"a").replace(b"_", b"a").isalnum()
            for segment in token.split(b".")
        ):
            return False
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                options={"require": ["exp"], "verify_aud": False},
            )
        except (jwt.PyJWTError, ValueError):
            return False
        if header.get("alg") != "HS256" or "crit" in header or "kid" in header:
            return False
        if "aud" in claims:  # no audience configured: a token meant for one is refused
            return False
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                return False
        if claims.get("iat", 0) > time.time() or claims["exp"] > LAST_NUMERIC_DATE:
            return False
        bound = claims.get("instance_id")
        if bound is not None:
            if not isinstance(bound, str) or not bound or device != bound.encode():
                return False
            if bound.startswith("gone-") and claims.get("iat", 0) <= self.revoked_before:
                return False
        jti = claims.get("jti")
        return not (isinstance(jti, str) and jti.startswith("rv-"))


# -- the hostile generator -----------------------------------------------------------------------


PATHS = [
    "/whoami", "/items/42", "/admin/users", "/admin", "/health", "/health/", TOKEN_PATH,
    "/revoke", "/.well-known/jwks.json", "/a/../admin", "/admin/../whoami", "//admin",
    "/%2e%2e/admin", "/admin%2Fx", "/ADMIN/x", "/admin;x", "/admin\\x", "/whoami?x=1&y=%00",
    "/whoami#frag", "/%00", "/%ff%fe", "/health/../admin", "/./whoami", "/whoami/",
    "/" + "a" * 3000, "*", "http://evil.example/whoami", "/%61dmin/users", "/health%2F..%2Fadmin",
]  # fmt: skip
METHODS = ["GET"] * 8 + ["POST"] * 4 + ["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FOO"]


class Hostile:
    def __init__(self, keys: Keys, rng: random.Random) -> None:
        self.keys = keys
        self.rng = rng
        self.minter = Minter(keys)
        self.device = "phone-1"
        # A few valid tokens made once (minting every time would make the client the bottleneck).
        self.good = self.minter.token(self.device)
        self.unbound = self.minter.token(None)
        self.revoked = self.minter.token(self.device, jti=f"rv-{rng.randrange(100_000)}")
        old = int(time.time()) - 3600
        self.gone = self.minter.token("gone-7", iat=old, exp=old + 7200)
        self.credentials = self._credentials()

    def _credentials(self) -> list[tuple[str, Callable[[], list[tuple[bytes, bytes]]]]]:
        keys, mint, device = self.keys, self.minter, self.device
        now = int(time.time())

        def bearer(
            token: str, dev: str | None = device, scheme: str = "Bearer "
        ) -> Callable[[], list[tuple[bytes, bytes]]]:
            headers = [(b"authorization", (scheme + token).encode())]
            if dev is not None:
                headers.append((DEVICE_HEADER, dev.encode()))
            return lambda: headers

        def fixed(*headers: tuple[bytes, bytes]) -> Callable[[], list[tuple[bytes, bytes]]]:
            return lambda: list(headers)

        api, mobile = keys.api_key.encode(), keys.mobile_api_key.encode()
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"instance_id": device, "exp": now + 300, "iat": now}
        return [
            ("none", fixed()),
            ("api key", fixed((b"x-api-key", api))),
            ("api key, trailing space", fixed((b"x-api-key", api + b" "))),
            ("api key, one bit off", fixed((b"x-api-key", api[:-1] + bytes([api[-1] ^ 1])))),
            ("api key, lower case", fixed((b"x-api-key", api.lower()))),
            ("empty api key", fixed((b"x-api-key", b""))),
            ("api key twice", fixed((b"x-api-key", api), (b"x-api-key", api))),
            ("API key header in capitals", fixed((b"X-API-KEY", api))),
            ("api key and mobile key", fixed((b"x-api-key", api), (b"authorization", mobile))),
            ("mobile key", fixed((b"authorization", mobile))),
            ("mobile key as Bearer", fixed((b"authorization", b"Bearer " + mobile))),
            ("mobile key, truncated", fixed((b"authorization", mobile[:-1]))),
            ("mobile key twice", fixed((b"authorization", mobile), (b"authorization", mobile))),
            ("mobile key, non-ASCII prefix", fixed((b"authorization", b"\xff\xfe" + mobile))),
            ("token", bearer(self.good)),
            ("token, other device", bearer(self.good, "phone-2")),
            ("token, no device header", bearer(self.good, None)),
            ("token, scheme lower case", bearer(self.good, scheme="bearer ")),
            ("token, scheme upper case", bearer(self.good, scheme="BEARER ")),
            ("token, two spaces", bearer(self.good, scheme="Bearer  ")),
            ("token as DPoP", bearer(self.good, scheme="DPoP ")),
            ("token as Basic", bearer(self.good, scheme="Basic ")),
            ("token, trailing word", bearer(self.good + " x")),
            ("token, padded", bearer(self.good + "=")),
            ("token, truncated signature", bearer(self.good[:-2])),
            ("unbound token, any device", bearer(self.unbound, "anything")),
            ("revoked token", bearer(self.revoked)),
            ("token of a revoked device", bearer(self.gone, "gone-7")),
            ("expired token", bearer(mint.token(device, exp=now - 10))),
            ("token not yet valid", bearer(mint.token(device, nbf=now + 600))),
            ("token issued in the future", bearer(mint.token(device, iat=now + 600))),
            ("token with an audience", bearer(mint.token(device, aud="someone"))),
            ("token, exp a string", bearer(mint.token(device, exp=str(now + 300)))),
            ("token, exp true", bearer(mint.token(device, exp=True))),
            ("token, exp past year 9999", bearer(mint.token(device, exp=253402300800 + 10))),
            ("token, instance_id a number", bearer(mint.token(device, instance_id=7), "7")),
            (
                "token signed HS512",
                bearer(hand_made({"alg": "HS512"}, claims, mint.secret, hashlib.sha512)),
            ),
            (
                "token signed with another secret",
                bearer(jwt.encode(claims, mint.other_secret, algorithm="HS256")),
            ),
            ("alg none", bearer(hand_made({"alg": "none", "typ": "JWT"}, claims, None))),
            ("alg NoNe", bearer(hand_made({"alg": "NoNe"}, claims, None))),
            ("alg RS256 over the HMAC", bearer(hand_made({"alg": "RS256"}, claims, mint.secret))),
            (
                "kid pointing at a file",
                bearer(hand_made({**header, "kid": "../../etc/passwd"}, claims, mint.secret)),
            ),
            ("crit header", bearer(hand_made({**header, "crit": ["exp"]}, claims, mint.secret))),
            (
                "jwk header",
                bearer(
                    hand_made({**header, "jwk": {"kty": "oct", "k": "eA"}}, claims, mint.secret)
                ),
            ),
            (
                "token claiming another device, signed",
                bearer(
                    hand_made(header, {**claims, "instance_id": "phone-2"}, mint.secret), "phone-2"
                ),
            ),
            ("payload swapped, signature kept", bearer(self._tampered(), "phone-9")),
            ("9 KB token", bearer("a" * 9000)),
            ("empty JSON segments", bearer("e30.e30.e30")),
            ("two segments", bearer("x.y")),
            ("four segments", bearer("a.b.c.d")),
            (
                "token and api key",
                fixed((b"authorization", b"Bearer " + self.good.encode()), (b"x-api-key", api)),
            ),
            (
                "token, device header twice",
                fixed(
                    (b"authorization", b"Bearer " + self.good.encode()),
                    (DEVICE_HEADER, b"phone-1"),
                    (DEVICE_HEADER, b"phone-1"),
                ),
            ),
            (
                "token after a tab",
                fixed(
                    (b"authorization", b"Bearer\t" + self.good.encode()),
                    (DEVICE_HEADER, b"phone-1"),
                ),
            ),
            (
                "Bearer alone",
                fixed(
                    (b"authorization", b"Bearer"),
                ),
            ),
        ]

    def secrets(self) -> list[bytes]:
        """Every credential this generator sends (keys, tokens, with and without their
        scheme), long enough to be one: none may ever reach an upstream."""
        found: set[bytes] = set()
        for _, make in self.credentials:
            for name, value in make():
                if name.lower() in (b"authorization", b"x-api-key"):
                    found.update((value, value.rpartition(b" ")[2]))
        return sorted(value for value in found if len(value) >= 16)

    def _tampered(self) -> str:
        head, payload, signature = self.good.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["instance_id"] = "phone-9"
        return ".".join([head, b64(json.dumps(claims).encode()), signature])

    def request(self) -> Request:
        rng = self.rng
        label, make = rng.choice(self.credentials)
        headers = make()
        if rng.random() < 0.02:
            key = base64.b64encode(os.urandom(16))
            upgrade = [
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-key", key),
                (b"sec-websocket-version", b"13"),
            ]
            target = rng.choice(["/ws", "/admin/ws", "/../ws"])
            return Request("GET", target, upgrade + headers, websocket=True, label=label)
        method = rng.choice(METHODS)
        path = rng.choice(PATHS)
        if path == TOKEN_PATH and rng.random() < 0.7:
            method = "POST"
        body = b""
        if method in ("POST", "PUT", "PATCH"):
            body = rng.choice(
                [b"", b"{}", b'{"instance_id": "phone-1"}', b'{"instance_id": 5}',
                 os.urandom(64), b"[" * 2000, b'{"instance_id": "a", "instance_id": "b"}']
            )  # fmt: skip
        if rng.random() < 0.05:
            headers = [
                *headers,
                (b"x-junk-" + str(rng.randrange(99)).encode(), os.urandom(8).hex().encode()),
            ]
        return Request(method, path, headers, body, label=label)


def admitted(request: Request, answer: Answer) -> bool:
    """Whether the request got past devicegate, by what came back."""
    if request.websocket:
        return answer.status == 101
    if answer.headers.get(SOAK_MARK) == b"admitted":
        return True
    return request.target in SERVER_KEY_ENDPOINTS and answer.status == 200


# -- the campaigns -------------------------------------------------------------------------------


@contextlib.contextmanager
def soak_server(keys: Keys, workers: int, directory: Path) -> Iterator[Server]:
    env = {
        "DEVICEGATE_API_KEYS": keys.api_key,
        "DEVICEGATE_MOBILE_API_KEYS": keys.mobile_api_key,
        "DEVICEGATE_JWT_SECRET": keys.jwt_secret,
    }

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "benchmarks.soak_app:create_app", "--factory",
            "--host", HOST, "--port", str(port), "--workers", str(workers),
            "--lifespan", "off", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip

    with serve(
        command, directory / "soak-server.log", env=env, cwd=ROOT, ready=answers("/health")
    ) as server:
        yield server


def worker_pids(server: Server) -> list[int]:
    """The uvicorn worker processes (children of the master), or the server itself."""
    children: list[int] = []
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    # Not multiprocessing's resource tracker: only the processes that serve.
    workers = [
        pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return workers or [server.process.pid]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def on_connections(
    worker: Callable[[], Coroutine[Any, Any, None]], connections: int
) -> float:
    """Run ``worker`` once per connection, all at once; the seconds it took."""
    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(connections):
            tasks.start_soon(worker)
    return time.perf_counter() - started


async def run_hostile(
    server: Server, keys: Keys, model: Model, count: int, connections: int, seed: int
) -> dict[str, Any]:
    generator = Hostile(keys, random.Random(seed))
    statuses: Counter[int] = Counter()
    violations: list[str] = []
    disagreements: Counter[str] = Counter()
    dropped = 0
    done = 0

    async def worker() -> None:
        nonlocal dropped, done
        connection = Connection(server.port)
        try:
            while done < count:
                done += 1
                request = generator.request()
                try:
                    answer = await connection.send(
                        request.raw(), head_only=request.method == "HEAD"
                    )
                except Dropped:
                    dropped += 1
                    continue
                statuses[answer.status] += 1
                got_in = admitted(request, answer)
                if got_in != model.admits(request):
                    summary = f"{request.label}: {request.method} {request.target[:40]}"
                    if got_in:
                        violations.append(summary)
                    elif Model.route_path(request.target) not in SERVER_KEY_ENDPOINTS:
                        # (An endpoint also refuses a bad body, which the model does not read.)
                        why = answer.body[:90].decode("latin-1")
                        disagreements[
                            f"refused but the model admits: {summary} -> {answer.status} {why}"
                        ] += 1
        finally:
            await connection.close()

    seconds = await on_connections(worker, connections)
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    return {
        "requests": done,
        "seconds": round(seconds, 1),
        "statuses": dict(sorted(statuses.items())),
        "dropped": dropped,
        "server_errors": server_errors,
        "admitted_but_model_refuses": len(violations),
        "violations": violations[:10],
        "refused_but_model_admits": sum(disagreements.values()),
        "disagreements": dict(disagreements.most_common(5)),
    }


async def run_legit(
    server: Server, keys: Keys, count: int, warmup: int, connections: int
) -> dict[str, Any]:
    minter = Minter(keys)
    cached = [(f"device-{n}", minter.token(f"device-{n}")) for n in range(200)]
    api = keys.api_key.encode()
    mobile = keys.mobile_api_key.encode()
    errors: list[str] = []
    latencies: list[float] = []
    counts: Counter[str] = Counter()
    rng = random.Random(7)

    def one(fresh_only: bool) -> tuple[str, bytes]:
        roll = 0.0 if fresh_only else rng.random()
        if roll < 0.25:
            device = f"fresh-{secrets.token_hex(6)}"
            token = minter.token(device)
            headers = [
                (b"authorization", b"Bearer " + token.encode()),
                (DEVICE_HEADER, device.encode()),
            ]
            return "fresh token", encode("GET", "/whoami", headers)
        if roll < 0.60:
            device, token = rng.choice(cached)
            headers = [
                (b"authorization", b"Bearer " + token.encode()),
                (DEVICE_HEADER, device.encode()),
            ]
            return "cached token", encode("GET", "/items/7", headers)
        if roll < 0.75:
            return "server key", encode("GET", "/admin/users", [(b"x-api-key", api)])
        if roll < 0.90:
            return "mobile key", encode("GET", "/whoami", [(b"authorization", mobile)])
        body = json.dumps({"instance_id": f"mint-{rng.randrange(10**6)}"}).encode()
        headers = [(b"x-api-key", api), (b"content-type", b"application/json")]
        return "minting", encode("POST", TOKEN_PATH, headers, body)

    async def drive(total: int, fresh_only: bool, record: bool) -> None:
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            connection = Connection(server.port)
            try:
                while remaining > 0:
                    remaining -= 1
                    if fresh_only and remaining % WARMUP_RECONNECT == 0:
                        # Warming up: a new connection now and then, which the kernel may hand
                        # to any worker, so that none is left with a cache half full.
                        await connection.close()
                    kind, raw = one(fresh_only)
                    try:
                        answer = await connection.send(raw)
                    except (Dropped, TimeoutError, OSError) as exc:
                        errors.append(f"{kind}: {type(exc).__name__}")
                        continue
                    if answer.status != 200:
                        errors.append(f"{kind}: {answer.status} {answer.body[:120]!r}")
                    if record:
                        latencies.append(answer.seconds)
                        counts[kind] += 1
            finally:
                await connection.close()

        await on_connections(worker, connections)

    pids = worker_pids(server)
    before = {pid: rss_mib(pid) for pid in pids}
    # Fresh tokens until every worker's cache is full (each new connection may land on any
    # worker, so the warm-up goes on in rounds until all of them say so).
    await drive(warmup, fresh_only=True, record=False)
    for _ in range(20):
        caches = await cache_entries(server, len(pids))
        if len(caches) == len(pids) and min(caches.values()) >= CACHE_SIZE:
            break
        await drive(warmup // 4, fresh_only=True, record=False)
    else:
        raise RuntimeError(f"the workers' token caches did not fill: {caches}")
    warm = {pid: rss_mib(pid) for pid in pids}
    samples = []
    started = time.perf_counter()
    step = max(1, count // 10)
    for _ in range(0, count, step):
        await drive(step, fresh_only=False, record=True)
        samples.append(round(sum(rss_mib(pid) for pid in pids) / len(pids), 1))
    seconds = time.perf_counter() - started
    end = {pid: rss_mib(pid) for pid in pids}
    growth = max(end[pid] - warm[pid] for pid in pids)
    latencies.sort()
    return {
        "requests": len(latencies),
        "connections": connections,
        "workers": len(pids),
        "seconds": round(seconds, 1),
        "requests_per_second": round(len(latencies) / seconds),
        "mix": dict(counts),
        "errors": len(errors),
        "error_examples": errors[:5],
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "rss_mib_start": round(sum(before.values()) / len(pids), 1),
        "rss_mib_after_warmup": round(sum(warm.values()) / len(pids), 1),
        "token_cache_entries_after_warmup": caches,
        "rss_mib_end": round(sum(end.values()) / len(pids), 1),
        "rss_mib_samples": samples,
        "worst_worker_growth_mib": round(growth, 1),
        # Flat: no worker grew by more than 5 % of its size after warm-up (nor 4 MiB).
        "memory_flat": all(end[pid] - warm[pid] <= max(4.0, 0.05 * warm[pid]) for pid in pids),
    }


# -- through the gateway and through nginx, to an upstream that misbehaves ------------------------


class HostileUpstream:
    """An HTTP/1.1 upstream that answers normally, slowly, never, with garbage, with a body cut
    short, or by resetting the connection, and notes every client credential it receives."""

    BEHAVIOURS = ["ok"] * 12 + ["slow", "slow", "hang", "garbage", "partial", "reset", "reset"]

    def __init__(self, forbidden: list[bytes], seed: int) -> None:
        self.forbidden = [value for value in forbidden if value]
        self.rng = random.Random(seed)
        self.port = 0
        self.open = 0
        self.requests = 0
        self.credentials_seen: list[str] = []
        self.behaviours: Counter[str] = Counter()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        async with listener:
            task_status.started()
            await listener.serve(self.handle)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.open += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive(65536)
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive(65536)
                buffer = buffer[length:]
                self.requests += 1
                for value in self.forbidden:
                    if value in head:
                        self.credentials_seen.append(head.split(b"\r\n")[0].decode("latin-1"))
                behaviour = self.rng.choice(self.BEHAVIOURS)
                self.behaviours[behaviour] += 1
                if not await self.answer(stream, behaviour):
                    return
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        finally:
            self.open -= 1
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def answer(self, stream: anyio.abc.SocketStream, behaviour: str) -> bool:
        """Answer one request; whether the connection goes on."""
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
        if behaviour == "slow":
            await anyio.sleep(self.rng.uniform(0.2, 1.0))
        elif behaviour == "hang":
            await anyio.sleep(3600)
        elif behaviour == "garbage":
            await stream.send(os.urandom(self.rng.randrange(1, 300)))
            return False
        elif behaviour == "partial":
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly this")
            return False
        elif behaviour == "reset":
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        await stream.send(ok)
        return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def through(
    front: Server,
    watched: list[Server],
    upstream: HostileUpstream,
    generator: Hostile,
    count: int,
    connections: int,
) -> dict[str, Any]:
    """``count`` requests of ``generator`` (the one whose credentials ``upstream`` watches
    for) through ``front``."""
    statuses: Counter[int] = Counter()
    dropped = 0
    done = 0
    fds_before = {server.port: open_fds(server.process.pid) for server in watched}

    async def worker() -> None:
        nonlocal dropped, done
        # nginx waits 60 s for an upstream that never answers; the client gives up sooner.
        connection = Connection(front.port, PROXIED_SECONDS)
        try:
            while done < count:
                done += 1
                request = generator.request()
                if request.websocket:
                    continue
                try:
                    answer = await connection.send(
                        request.raw(), head_only=request.method == "HEAD"
                    )
                except (Dropped, TimeoutError):
                    dropped += 1
                    continue
                statuses[answer.status] += 1
        finally:
            await connection.close()

    seconds = await on_connections(worker, connections)
    await anyio.sleep(4)  # past the upstream timeout: whatever was waiting has given up
    return {
        "requests": sum(statuses.values()) + dropped,
        "seconds": round(seconds, 1),
        "statuses": dict(sorted(statuses.items())),
        "dropped": dropped,
        "status_500": statuses[500],
        "upstream_requests": upstream.requests,
        "upstream_behaviours": dict(upstream.behaviours),
        "credentials_forwarded": len(upstream.credentials_seen),
        "credential_examples": upstream.credentials_seen[:5],
        "upstream_connections_open_after": upstream.open,
        "open_files_before_after": [
            (fds_before[server.port], open_fds(server.process.pid)) for server in watched
        ],
    }


async def run_gateway(
    keys: Keys, count: int, connections: int, seed: int, directory: Path
) -> dict[str, Any]:
    generator = Hostile(keys, random.Random(seed))
    upstream = HostileUpstream(generator.secrets(), seed)
    upstream_keys = fresh_keys()
    secrets_file = write_secrets(directory / "gateway-secrets.json", keys)
    upstream_secrets = write_secrets(directory / "upstream-secrets.json", upstream_keys)
    async with anyio.create_task_group() as tasks:
        await tasks.start(upstream.run)
        command = devicegate_command(
            "--secrets", str(secrets_file),
            "--upstream", f"http://{HOST}:{upstream.port}",
            "--upstream-secrets", str(upstream_secrets),
            "--upstream-timeout", "2",
            # Hostile input is to be judged, not turned away at the address's limit.
            "--failure-limit-per-address", "none",
            "--log-level", "error",
        )  # fmt: skip
        with serve(
            command, directory / "gateway.log", cwd=directory, ready=answers("/health")
        ) as gateway:
            result = await through(gateway, [gateway], upstream, generator, count, connections)
        tasks.cancel_scope.cancel()
    return result


async def run_nginx(
    keys: Keys, count: int, connections: int, seed: int, directory: Path
) -> dict[str, Any]:
    from tests.test_auth_proxies import running_nginx

    generator = Hostile(keys, random.Random(seed))
    upstream = HostileUpstream(generator.secrets(), seed)
    secret = secrets.token_urlsafe(32)
    secrets_file = write_secrets(directory / "forward-secrets.json", keys)
    async with anyio.create_task_group() as tasks:
        await tasks.start(upstream.run)
        command = devicegate_command(
            "--secrets", str(secrets_file),
            "--forward-auth-path", "/_devicegate/auth",
            "--forward-auth-secret-env", "SOAK_FORWARD_SECRET",
            "--failure-limit-per-address", "none",
            "--log-level", "error",
        )  # fmt: skip
        with (
            serve(
                command, directory / "forward-auth.log", cwd=directory,
                env={"SOAK_FORWARD_SECRET": secret}, ready=answers("/health"),
            ) as devicegate,
            running_nginx(
                directory / "nginx",
                devicegate_port=devicegate.port,
                api_port=upstream.port,
                secret=secret,
            ) as nginx,
        ):  # fmt: skip
            result = await through(nginx, [devicegate], upstream, generator, count, connections)
        tasks.cancel_scope.cancel()
    return result


async def cache_entries(server: Server, workers: int) -> dict[int, int]:
    """Each worker's token cache size, asked on new connections until every worker answered."""
    caches: dict[int, int] = {}
    for _ in range(50 * workers):
        connection = Connection(server.port)
        try:
            answer = await connection.send(encode("GET", CACHE_PATH, []))
        finally:
            await connection.close()
        report = json.loads(answer.body)
        caches[report["pid"]] = report["entries"]
        if len(caches) == workers:
            break
    return caches


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} CPUs, {python}"


async def campaign(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    keys = fresh_keys()
    revoked_before = time.time()
    results: dict[str, Any] = {"machine": machine()}
    with soak_server(keys, args.workers, directory) as server:
        model = Model(keys, revoked_before)
        results["hostile"] = await run_hostile(
            server, keys, model, args.hostile, args.connections, args.seed
        )
        results["legit"] = await run_legit(server, keys, args.legit, args.warmup, args.connections)
    results["gateway"] = await run_gateway(
        keys, args.proxied, args.connections, args.seed, directory
    )
    results["nginx"] = await run_nginx(keys, args.proxied, args.connections, args.seed, directory)
    return results


def report(results: dict[str, Any]) -> tuple[str, bool]:
    hostile, legit = results["hostile"], results["legit"]
    checks = [
        ("hostile: no 5xx", hostile["server_errors"] == 0),
        (
            "hostile: nothing admitted that the model refuses",
            hostile["admitted_but_model_refuses"] == 0,
        ),
        ("legit: no error", legit["errors"] == 0),
        ("legit: memory flat after warm-up", legit["memory_flat"]),
    ]
    for name in ("gateway", "nginx"):
        proxied = results[name]
        (before, after), *_ = proxied["open_files_before_after"]
        checks += [
            (f"{name}: no 500", proxied["status_500"] == 0),
            (
                f"{name}: no client credential reached the upstream",
                proxied["credentials_forwarded"] == 0,
            ),
            # devicegate's own files: its listening socket and logs, plus at most its pool of
            # kept-alive upstream connections (the gateway) or nginx's to it (16).
            (f"{name}: no connection left open by devicegate", after <= before + POOL),
        ]
    gateway_open = results["gateway"]["upstream_connections_open_after"]
    checks.append(
        ("gateway: upstream connections open after within its pool", gateway_open <= POOL)
    )
    lines = [
        f"Machine: {results['machine']}",
        "",
        f"Hostile: {hostile['requests']:,} requests in {hostile['seconds']} s; statuses "
        f"{hostile['statuses']}; dropped by the server {hostile['dropped']}; 5xx "
        f"{hostile['server_errors']}; admitted but refused by the model "
        f"{hostile['admitted_but_model_refuses']}; refused but admitted by the model "
        f"{hostile['refused_but_model_admits']}.",
        "",
        f"Legitimate: {legit['requests']:,} requests from {legit['connections']} connections over "
        f"{legit['workers']} workers in {legit['seconds']} s ({legit['requests_per_second']:,}/s): "
        f"errors {legit['errors']}, p50 {legit['p50_ms']} ms, p99 {legit['p99_ms']} ms; RSS per "
        f"worker {legit['rss_mib_start']} MiB at start, {legit['rss_mib_after_warmup']} MiB after "
        f"warm-up (token caches full), {legit['rss_mib_end']} MiB at the end (worst worker "
        f"+{legit['worst_worker_growth_mib']} MiB).",
        "",
    ]
    for name, what in (("gateway", "devicegate serve --upstream"), ("nginx", "nginx auth_request")):
        proxied = results[name]
        lines += [
            f"Through {what}, to an upstream answering {proxied['upstream_behaviours']}: "
            f"{proxied['requests']:,} requests in {proxied['seconds']} s; statuses "
            f"{proxied['statuses']}; dropped {proxied['dropped']}; client credentials at the "
            f"upstream {proxied['credentials_forwarded']}; upstream connections open after "
            f"{proxied['upstream_connections_open_after']}; open files of devicegate before and "
            f"after {proxied['open_files_before_after']}.",
            "",
        ]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks]
    for name in ("violations", "disagreements"):
        if hostile[name]:
            lines += ["", f"{name}:", *[f"  {item}" for item in hostile[name]]]
    if legit["error_examples"]:
        lines += ["", "legit errors:", *[f"  {item}" for item in legit["error_examples"]]]
    return "\n".join(lines), all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form the tests run")
    parser.add_argument("--hostile", type=int, help="hostile requests (1,000,000; short 20,000)")
    parser.add_argument("--legit", type=int, help="legitimate requests (100,000; short 5,000)")
    parser.add_argument(
        "--warmup",
        type=int,
        help="fresh tokens sent first, more until every cache is full (30,000; short 24,000)",
    )
    parser.add_argument(
        "--proxied", type=int, help="requests through each proxy (20,000; short 1,000)"
    )
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (4; short 2)")
    parser.add_argument("--connections", type=int, default=32, help="client connections (32)")
    parser.add_argument("--seed", type=int, default=1, help="the hostile generator's seed")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE as JSON too")
    args = parser.parse_args(argv)
    for name, full, short in (
        ("hostile", 1_000_000, 20_000),
        ("legit", 100_000, 5_000),
        ("warmup", 30_000, 24_000),
        ("proxied", 20_000, 1_000),
        ("workers", 4, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    with tempfile.TemporaryDirectory(prefix="devicegate-soak-") as directory:
        results = anyio.run(campaign, args, Path(directory))
    text, passed = report(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
