"""The upstream HTTP server of the gateway tests: it answers with what it received.

Run in a real server process (``uvicorn tests.servers.echo:app``). Endpoints:

* any path: JSON with the method, path, raw path, query string, headers (in order, repeats
  kept), client address and the body's length and SHA-256; the response also carries repeated
  and hop-by-hop headers, so that a test can see what a proxy passes back.
* ``/status/<code>``: the same JSON with that status (no body for 204 and 304).
* ``/big?bytes=N``: reads the body (its length and digest go in ``x-received-length`` and
  ``x-received-sha256``), then streams N bytes back in 64 KiB chunks.
* ``/redirect?<path>``: 307 to ``http://<the Host it was asked under>/<path>``.
* ``/slow``: waits until the client goes away (at most 60 s), then answers.
* ``/__seen``: every request target this process has received, and every ``/slow`` request
  whose client went away (``"disconnected <target>"``).
* a websocket on any path: accepted, then one text message with the path and the headers of
  the handshake (as the HTTP echo gives them), then closed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

import anyio
from starlette.types import Receive, Scope, Send

from devicegate._asgi import serve_lifespan

CHUNK_BYTES = 64 * 1024
SLOW_LIMIT_SECONDS = 60
_ZEROS = bytes(CHUNK_BYTES)

SEEN: list[str] = []

# Returned on every echo, so that tests can check what a proxy drops or keeps on the way back.
RESPONSE_EXTRA_HEADERS = [
    (b"x-upstream-multi", b"one"),
    (b"x-upstream-multi", b"two"),
    (b"set-cookie", b"a=1; Path=/"),
    (b"set-cookie", b"b=2; Path=/"),
    # Hop-by-hop: a proxy must drop these, and the header the Connection header names.
    (b"connection", b"x-upstream-hop"),
    (b"x-upstream-hop", b"dropped"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-authenticate", b"Basic realm=upstream"),
    (b"trailer", b"x-upstream-trailer"),
]


def _target(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope["query_string"]
    return (raw + (b"?" + query if query else b"")).decode("latin-1")


async def _read_body(receive: Receive) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        length += len(chunk)
        digest.update(chunk)
        if not message.get("more_body", False):
            break
    return length, digest.hexdigest()


async def _send_json(
    send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = b"" if status in (204, 304) else json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    if status not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]]


async def _echo_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    SEEN.append(_target(scope))
    await send({"type": "websocket.accept"})
    payload = {"path": scope["path"], "headers": _headers(scope)}
    await send({"type": "websocket.send", "text": json.dumps(payload)})
    await send({"type": "websocket.close", "code": 1000})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    if scope["type"] == "websocket":
        await _echo_websocket(scope, receive, send)
        return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    if path == "/__seen":
        await _send_json(send, 200, SEEN)
        return
    target = _target(scope)
    SEEN.append(target)
    length, digest = await _read_body(receive)

    if path == "/redirect":
        # As a framework redirects (Starlette's redirect_slashes, say): an absolute URL built
        # from the Host it was asked under.
        host = dict(scope["headers"]).get(b"host", b"")
        location = b"http://" + host + b"/" + scope["query_string"]
        await _send_json(send, 307, {"location": location.decode()}, [(b"location", location)])
        return

    if path == "/slow":
        disconnected = False
        with anyio.move_on_after(SLOW_LIMIT_SECONDS):
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
        if disconnected:
            SEEN.append(f"disconnected {target}")
            return
        await _send_json(send, 200, {"slow": True})
        return

    if path == "/big":
        size = int(parse_qs(scope["query_string"].decode())["bytes"][0])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(size).encode()),
                    (b"x-received-length", str(length).encode()),
                    (b"x-received-sha256", digest.encode()),
                ],
            }
        )
        remaining = size
        while remaining > 0:
            chunk = _ZEROS if remaining >= CHUNK_BYTES else bytes(remaining)
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return

    status = 200
    if path.startswith("/status/"):
        status = int(path.removeprefix("/status/"))
    client = scope.get("client")
    payload = {
        "method": scope["method"],
        "path": path,
        "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": _headers(scope),
        "client": None if client is None else client[0],
        "body_length": length,
        "body_sha256": digest,
    }
    await _send_json(send, status, payload, RESPONSE_EXTRA_HEADERS)
