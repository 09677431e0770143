"""The reverse proxy's policies as pure functions (devicegate.gateway._policy), with no ASGI.

Each table row is one client (or upstream) input and what crosses the gateway. The same
behaviours are checked end to end, through a real upstream, in test_proxy.py; these tables pin
the decisions themselves, including corners an HTTP client will not produce (two disagreeing
Content-Lengths, look-alike field names, a raw path an outer layer did not rewrite).
"""

from __future__ import annotations

import pytest

from devicegate import CredentialKind, Principal, Refusal
from devicegate._asgi import refusal_parts
from devicegate.gateway._policy import (
    BodyFraming,
    Headers,
    body_framing,
    caller_headers,
    check_body_complete,
    check_body_size,
    client_credential_fields,
    client_location,
    request_headers,
    response_headers,
    upstream_target,
)
from devicegate.gateway._refusals import (
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

UPSTREAM_KEY = "upstream-server-key"
UPSTREAM_MOBILE_KEY = "upstream-mobile-key"
MAX_BODY = 1000
# The gate's defaults, plus a renamed device header to show that the configured names count.
REMOVED = client_credential_fields("x-api-key", "x-device")
SERVER = Principal(CredentialKind.API_KEY)
MOBILE = Principal(CredentialKind.MOBILE_API_KEY)
DEVICE = Principal(CredentialKind.DEVICE_TOKEN, instance_id="device-A")
GENERIC_TOKEN = Principal(CredentialKind.DEVICE_TOKEN)


def forward(
    fields: Headers,
    *,
    principal: Principal | None = None,
    client_host: str | None = None,
    upstream_api_key: str | None = UPSTREAM_KEY,
    upstream_mobile_api_key: str | None = UPSTREAM_MOBILE_KEY,
) -> tuple[Headers, int | None]:
    """request_headers with the gate's usual settings."""
    return request_headers(
        fields,
        client_host=client_host,
        scheme="https",
        principal=principal,
        removed=REMOVED,
        upstream_api_key=upstream_api_key,
        upstream_mobile_api_key=upstream_mobile_api_key,
        max_body_bytes=MAX_BODY,
    )


def client_fields(fields: Headers) -> Headers:
    """What request_headers forwards of the client's own fields (not what the gateway adds)."""
    added = {b"x-forwarded-proto", b"x-forwarded-for", b"x-forwarded-host"}
    return [(name, value) for name, value in forward(fields)[0] if name not in added]


# -- request headers: what the client sent ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "forwarded"),
    [
        # Plain end-to-end fields pass, lower-cased, repeats in order.
        ([(b"Accept", b"*/*")], [(b"accept", b"*/*")]),
        ([(b"x-tag", b"1"), (b"x-tag", b"2")], [(b"x-tag", b"1"), (b"x-tag", b"2")]),
        # RFC 9110 §7.6.1: hop-by-hop fields stop here...
        ([(b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5")], []),
        ([(b"te", b"trailers"), (b"trailer", b"x-sum"), (b"upgrade", b"h2c")], []),
        ([(b"proxy-authorization", b"Basic eA=="), (b"proxy-connection", b"close")], []),
        # ...and so does every field the Connection header names, in any case and spacing.
        ([(b"connection", b"X-Secret , x-other"), (b"x-secret", b"1"), (b"x-other", b"2")], []),
        # Fields the proxy sets itself: Host (to X-Forwarded-Host), Content-Length, Expect.
        ([(b"host", b"gate.example"), (b"expect", b"100-continue")], []),
        # Client claims about where the request came from or what it asked for.
        ([(b"forwarded", b"for=1.2.3.4"), (b"x-real-ip", b"1.2.3.4")], []),
        ([(b"x-original-url", b"/admin"), (b"x-rewrite-url", b"/admin")], []),
        ([(b"x-original-uri", b"/admin"), (b"x-original-host", b"internal")], []),
        ([(b"x-forwarded-port", b"443"), (b"x-forwarded-prefix", b"/admin")], []),
        ([(b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"evil.example")], []),
        # The identity the gateway states: never the client's copy, nor a look-alike a CGI,
        # WSGI or PHP upstream reads as the dashed name.
        ([(b"x-devicegate-kind", b"api_key"), (b"X_Devicegate_Kind", b"api_key")], []),
        ([(b"x.devicegate.instance-id", b"device-B")], []),
        # The client's credentials, under the gate's configured names and their look-alikes.
        ([(b"authorization", b"Bearer x"), (b"x-api-key", b"k"), (b"x-device", b"d")], []),
        ([(b"X_Api_Key", b"k"), (b"x.device", b"d")], []),
        # A DPoP proof is part of the credential (RFC 9449): it stops here as the token does.
        ([(b"dpop", b"e30.e30.sig"), (b"DPoP", b"e30.e30.sig")], []),
        # A field name is compared folded, never trimmed into another: these are other fields.
        ([(b"x-api-keys", b"k")], [(b"x-api-keys", b"k")]),
        ([(b"xapi-key", b"k")], [(b"xapi-key", b"k")]),
    ],
)
def test_request_fields_forwarded(fields: Headers, forwarded: Headers) -> None:
    assert client_fields(fields) == forwarded


@pytest.mark.parametrize(
    ("fields", "declared"),
    [
        ([], None),
        ([(b"content-length", b"0")], 0),
        ([(b"content-length", b" 12 ")], 12),
        # RFC 9110 §8.6: a repeated Content-Length that agrees is one length.
        ([(b"content-length", b"12"), (b"Content-Length", b"012")], 12),
        # Leading zeros do not count toward the digit bound.
        ([(b"content-length", b"0" * 5000 + b"7")], 7),
        ([(b"content-length", str(MAX_BODY).encode())], MAX_BODY),
        # Without a length, Transfer-Encoding frames the body (it is not forwarded as a field).
        ([(b"transfer-encoding", b"chunked")], None),
    ],
)
def test_declared_length(fields: Headers, declared: int | None) -> None:
    headers, length = forward(fields)
    assert length == declared
    assert all(name not in (b"content-length", b"transfer-encoding") for name, _ in headers)


@pytest.mark.parametrize(
    ("fields", "refusal", "close"),
    [
        # Not a number, or repeated with another value.
        ([(b"content-length", b"")], BadContentLength, False),
        ([(b"content-length", b"-1")], BadContentLength, False),
        ([(b"content-length", b"1e3")], BadContentLength, False),
        ([(b"content-length", b"0x10")], BadContentLength, False),
        ([(b"content-length", b"5, 5")], BadContentLength, False),
        ([(b"content-length", b"5"), (b"content-length", b"6")], BadContentLength, False),
        # Larger than the gateway forwards: by value, or by its sheer number of digits.
        ([(b"content-length", str(MAX_BODY + 1).encode())], BodyTooLarge, True),
        ([(b"content-length", b"9" * 19)], BodyTooLarge, True),
        # RFC 9112 §6.1: both framings at once is a smuggling attempt.
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], ConflictingFraming, True),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], ConflictingFraming, True),
        # A method override naming a method the gateway refuses.
        ([(b"x-http-method-override", b"TRACE")], MethodNotAllowed, False),
        ([(b"X-HTTP-Method", b" track ")], MethodNotAllowed, False),
        ([(b"x_method_override", b"CONNECT")], MethodNotAllowed, False),
    ],
)
def test_request_refused(fields: Headers, refusal: type[Refusal], close: bool) -> None:
    with pytest.raises(refusal) as caught:
        forward(fields)
    assert caught.value.close is close


def test_a_harmless_method_override_is_forwarded() -> None:
    assert client_fields([(b"x-http-method-override", b"PATCH")]) == [
        (b"x-http-method-override", b"PATCH")
    ]


# -- request headers: what the gateway adds -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "client_host", "added"),
    [
        # The scheme the client used is stated, whatever it claimed.
        ([], None, [(b"x-forwarded-proto", b"https")]),
        # The address the gateway saw is appended to the chain, never replacing it.
        (
            [],
            "203.0.113.7",
            [(b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-proto", b"https")],
        ),
        (
            [(b"x-forwarded-for", b" 10.0.0.1 "), (b"X-Forwarded-For", b"10.0.0.2")],
            "203.0.113.7",
            [
                (b"x-forwarded-for", b"10.0.0.1, 10.0.0.2, 203.0.113.7"),
                (b"x-forwarded-proto", b"https"),
            ],
        ),
        # Empty links are dropped from the chain.
        (
            [(b"x-forwarded-for", b""), (b"x-forwarded-for", b"10.0.0.1")],
            None,
            [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"https")],
        ),
        # The client's Host becomes X-Forwarded-Host; only the first of repeated ones.
        (
            [(b"host", b"gate.example"), (b"host", b"evil.example")],
            None,
            [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"gate.example")],
        ),
    ],
)
def test_forwarded_fields(fields: Headers, client_host: str | None, added: Headers) -> None:
    assert forward(fields, client_host=client_host)[0] == added


@pytest.mark.parametrize(
    ("principal", "upstream_api_key", "upstream_mobile_api_key", "credential"),
    [
        # A server key becomes the upstream's server key, in X-API-Key.
        (SERVER, UPSTREAM_KEY, UPSTREAM_MOBILE_KEY, [(b"x-api-key", UPSTREAM_KEY.encode())]),
        # A mobile key or a device token becomes the upstream's mobile key, raw in
        # Authorization (as the SenseCrypt mobile SDK sends it).
        (
            MOBILE,
            UPSTREAM_KEY,
            UPSTREAM_MOBILE_KEY,
            [(b"authorization", UPSTREAM_MOBILE_KEY.encode())],
        ),
        (
            DEVICE,
            UPSTREAM_KEY,
            UPSTREAM_MOBILE_KEY,
            [(b"authorization", UPSTREAM_MOBILE_KEY.encode())],
        ),
        # Without the matching upstream key, nothing is injected (never the other key).
        (SERVER, None, UPSTREAM_MOBILE_KEY, []),
        (MOBILE, UPSTREAM_KEY, None, []),
        # A public path (no principal) gets no upstream credential and no identity.
        (None, UPSTREAM_KEY, UPSTREAM_MOBILE_KEY, []),
    ],
)
def test_credential_translation(
    principal: Principal | None,
    upstream_api_key: str | None,
    upstream_mobile_api_key: str | None,
    credential: Headers,
) -> None:
    client_credentials = [(b"authorization", b"Bearer client-token"), (b"x-api-key", b"client")]
    headers, _ = forward(
        client_credentials,
        principal=principal,
        upstream_api_key=upstream_api_key,
        upstream_mobile_api_key=upstream_mobile_api_key,
    )
    identity = [] if principal is None else caller_headers(principal)
    assert headers == [(b"x-forwarded-proto", b"https"), *credential, *identity]


@pytest.mark.parametrize(
    ("principal", "identity"),
    [
        (SERVER, [(b"x-devicegate-kind", b"api_key")]),
        (MOBILE, [(b"x-devicegate-kind", b"mobile_api_key")]),
        # Only a device-bound token names its device.
        (
            DEVICE,
            [(b"x-devicegate-kind", b"device_token"), (b"x-devicegate-instance-id", b"device-A")],
        ),
        (GENERIC_TOKEN, [(b"x-devicegate-kind", b"device_token")]),
    ],
)
def test_caller_headers(principal: Principal, identity: Headers) -> None:
    assert caller_headers(principal) == identity


# -- the request target ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "raw_path", "root_path", "query", "base_path", "target"),
    [
        # The raw bytes go as the client sent them, percent-encoding and query intact.
        ("/a b/é", b"/a%20b/%C3%A9", "", b"x=%2F&y", b"", b"/a%20b/%C3%A9?x=%2F&y"),
        ("/items", b"/items", "", b"", b"/api", b"/api/items"),
        # Without raw_path (optional in ASGI), the route path is encoded.
        ("/a b", None, "", b"", b"", b"/a%20b"),
        # Mounted under root_path, what is below the mount point goes, however it was spelled.
        ("/items", b"/gw/items", "/gw", b"", b"", b"/items"),
        ("/items", b"/%67w/items", "/gw", b"", b"", b"/items"),
        ("/", b"/gw", "/gw", b"", b"/api", b"/api/"),
        # A query left in raw_path by an older httpx ASGITransport is not part of the path.
        ("/items", b"/items?x=1", "", b"x=1", b"", b"/items?x=1"),
    ],
)
def test_upstream_target(
    route: str,
    raw_path: bytes | None,
    root_path: str,
    query: bytes,
    base_path: bytes,
    target: bytes,
) -> None:
    assert upstream_target(route, raw_path, root_path, query, base_path=base_path) == target


@pytest.mark.parametrize(
    ("route", "raw_path", "root_path", "refusal"),
    [
        # An outer layer rewrote scope["path"] but not raw_path: the upstream would receive a
        # path no rule judged.
        ("/public", b"/admin", "", UnforwardableTarget),
        ("/items", b"/other/items", "/gw", UnforwardableTarget),
        # Encoded separators and a raw "#" split otherwise on an upstream that routes raw.
        ("/public/x/reports", b"/public%2Fx/reports", "", AmbiguousTarget),
        ("/public\\x", b"/public%5cx", "", AmbiguousTarget),
        ("/admin#x", b"/admin#x", "", AmbiguousTarget),
        # Also when the route path itself is encoded for want of raw_path.
        ("/a\\b", None, "", AmbiguousTarget),
    ],
)
def test_upstream_target_refused(
    route: str, raw_path: bytes | None, root_path: str, refusal: type[Refusal]
) -> None:
    with pytest.raises(refusal):
        upstream_target(route, raw_path, root_path, b"", base_path=b"")


# -- body framing and bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "first", "more", "framing"),
    [
        # A declared length is kept, and the body streamed under it, read as it is pulled.
        (12, b"", True, BodyFraming(12, streamed=True)),
        (MAX_BODY, b"", True, BodyFraming(MAX_BODY, streamed=True)),
        # Content-Length: 0 with no body stays a zero-length request.
        (0, b"", False, BodyFraming(0, streamed=False)),
        # No length and no body (a GET): no framing at all, never a chunked empty body.
        (None, b"", False, BodyFraming(None, streamed=False)),
        # No length but a body (chunked, or HTTP/2): streamed chunked.
        (None, b"abc", False, BodyFraming(None, streamed=True)),
        (None, b"abc", True, BodyFraming(None, streamed=True)),
        (None, b"x" * MAX_BODY, False, BodyFraming(None, streamed=True)),
    ],
)
def test_body_framing(declared: int | None, first: bytes, more: bool, framing: BodyFraming) -> None:
    assert body_framing(declared, first, more, max_body_bytes=MAX_BODY) == framing


@pytest.mark.parametrize(
    ("declared", "first", "more", "refusal"),
    [
        # Content-Length: 0, then a body anyway.
        (0, b"x", False, BadContentLength),
        (0, b"", True, BadContentLength),
        # A first part that alone is over the bound.
        (None, b"x" * (MAX_BODY + 1), True, BodyTooLarge),
    ],
)
def test_body_framing_refused(
    declared: int | None, first: bytes, more: bool, refusal: type[Refusal]
) -> None:
    with pytest.raises(refusal) as caught:
        body_framing(declared, first, more, max_body_bytes=MAX_BODY)
    assert caught.value.close  # the rest of the body is not read


@pytest.mark.parametrize(
    ("size", "declared", "refusal"),
    [
        (MAX_BODY, None, None),
        (MAX_BODY + 1, None, BodyTooLarge),
        (10, 10, None),
        (11, 10, BadContentLength),
        # Over both: the bound is named first.
        (MAX_BODY + 1, 10, BodyTooLarge),
    ],
)
def test_body_size_as_it_arrives(
    size: int, declared: int | None, refusal: type[Refusal] | None
) -> None:
    if refusal is None:
        check_body_size(size, max_body_bytes=MAX_BODY, declared=declared)
        return
    with pytest.raises(refusal) as caught:
        check_body_size(size, max_body_bytes=MAX_BODY, declared=declared)
    assert caught.value.close


@pytest.mark.parametrize(
    ("size", "declared", "complete"),
    [(10, 10, True), (0, None, True), (99, None, True), (9, 10, False), (0, 10, False)],
)
def test_body_complete(size: int, declared: int | None, complete: bool) -> None:
    if complete:
        check_body_complete(size, declared=declared)
        return
    with pytest.raises(BadContentLength) as caught:
        check_body_complete(size, declared=declared)
    assert caught.value.close


# -- response headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "relayed"),
    [
        ([(b"Content-Type", b"text/plain")], [(b"content-type", b"text/plain")]),
        (
            [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
            [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
        ),
        # Hop-by-hop fields, and any the Connection header names, stay on the upstream's hop.
        ([(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"keep-alive", b"5")], []),
        ([(b"proxy-authenticate", b"Basic"), (b"upgrade", b"h2c")], []),
        # The serving ASGI server sets its own Date and Server.
        ([(b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"), (b"server", b"upstream/1.0")], []),
        # RFC 9112 §6.3: with Transfer-Encoding, a Content-Length is wrong and is dropped.
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"5")], []),
        ([(b"content-length", b"5")], [(b"content-length", b"5")]),
    ],
)
def test_response_headers(fields: Headers, relayed: Headers) -> None:
    assert response_headers(fields) == relayed


# -- Location -------------------------------------------------------------------------------------

ORIGINS = (b"http://upstream.test", b"http://upstream.test:80")


@pytest.mark.parametrize(
    ("location", "base_path", "root_path", "relayed"),
    [
        # A redirect to the upstream itself becomes a path through the gateway, in any case
        # and with or without the default port.
        (b"http://upstream.test/items/", b"", "", b"/items/"),
        (b"HTTP://Upstream.Test:80/items?x=1#y", b"", "", b"/items?x=1#y"),
        (b"http://upstream.test", b"", "", b"/"),
        (b"http://upstream.test?x=1", b"", "", b"/?x=1"),
        # The upstream's base path comes off, the gateway's mount point goes on (encoded).
        (b"http://upstream.test/api/items", b"/api", "", b"/items"),
        (b"/api/items", b"/api", "/gate way/", b"/gate%20way/items"),
        (b"/items", b"", "/gw", b"/gw/items"),
        # Another host, a look-alike host, or a path outside the base path: left as it is.
        (b"https://other.example/x", b"", "", b"https://other.example/x"),
        (b"http://upstream.test.evil/x", b"", "", b"http://upstream.test.evil/x"),
        (b"http://upstream.test:8080/x", b"", "", b"http://upstream.test:8080/x"),
        (b"/apix/items", b"/api", "", b"/apix/items"),
        (b"relative/path", b"", "", b"relative/path"),
        # Cut down, these would leave the gateway for another site or climb out of the mount
        # point: relayed as the upstream wrote them, on the upstream's own host.
        (b"//evil.example/", b"", "", b"//evil.example/"),
        (
            b"http://upstream.test//evil.example/",
            b"",
            "/gw",
            b"http://upstream.test//evil.example/",
        ),
        (b"http://upstream.test/\\evil.example", b"", "", b"http://upstream.test/\\evil.example"),
        (b"/api/../admin", b"/api", "", b"/api/../admin"),
        (b"/api/%2e%2e/admin", b"/api", "/gw", b"/api/%2e%2e/admin"),
    ],
)
def test_client_location(location: bytes, base_path: bytes, root_path: str, relayed: bytes) -> None:
    assert (
        client_location(location, origins=ORIGINS, base_path=base_path, root_path=root_path)
        == relayed
    )


# -- the refusals ---------------------------------------------------------------------------------

ALLOW = (b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
CLOSE = (b"connection", b"close")


@pytest.mark.parametrize(
    ("refusal", "status", "error", "description", "extra"),
    [
        (BadContentLength(), 400, "invalid_request", "The Content-Length header is invalid.", []),
        (
            BadContentLength(close=True),
            400,
            "invalid_request",
            "The Content-Length header is invalid.",
            [CLOSE],
        ),
        (
            ConflictingFraming(),
            400,
            "invalid_request",
            "The request has both Content-Length and Transfer-Encoding.",
            [CLOSE],
        ),
        (
            UnforwardableTarget(),
            400,
            "invalid_request",
            "The request target cannot be forwarded.",
            [],
        ),
        (
            AmbiguousTarget(),
            400,
            "invalid_request",
            "The request path has an encoded slash or backslash, or a '#'.",
            [],
        ),
        (
            MethodNotAllowed(),
            405,
            "method_not_allowed",
            "This gateway does not forward this method.",
            [ALLOW],
        ),
        (
            BodyTimeout(),
            408,
            "request_timeout",
            "The request body stopped arriving, or arrives too slowly.",
            [CLOSE],
        ),
        (
            BodyTooLarge(),
            413,
            "invalid_request",
            "The request body is larger than this gateway accepts.",
            [CLOSE],
        ),
        (
            WebsocketNotForwarded(),
            501,
            "invalid_request",
            "This gateway does not forward websockets.",
            [],
        ),
        (BadGateway(), 502, "bad_gateway", "The upstream server could not be reached.", []),
        (
            GatewayTimeout(),
            504,
            "gateway_timeout",
            "The upstream server did not answer in time.",
            [],
        ),
    ],
)
def test_refusal_answers(
    refusal: Refusal, status: int, error: str, description: str, extra: Headers
) -> None:
    answer_status, headers, body = refusal_parts(refusal)
    assert answer_status == status
    assert body == (f'{{"error":"{error}","error_description":"{description}"}}').encode()
    # Fixed text, no credential challenge: none of these is about the credential.
    assert headers[3:] == extra
