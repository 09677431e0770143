"""Rule validation and route-path matching, alone and through DeviceAuthMiddleware."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.authentication import UnauthenticatedUser
from starlette.routing import Mount
from starlette.types import Message

from devicegate import ConfigError, CredentialKind, DeviceAuthMiddleware, GateConfig, Rule
from devicegate._rules import RuleTable
from tests.helpers import (
    FORBIDDEN,
    REALM_ONLY,
    UNSAFE_PATH,
    Keys,
    RecordingApp,
    call_asgi,
    challenge,
    client,
    http_scope,
    make_token,
    raw_headers,
)

pytestmark = pytest.mark.anyio

API_KEY = CredentialKind.API_KEY
MOBILE_API_KEY = CredentialKind.MOBILE_API_KEY
DEVICE_TOKEN = CredentialKind.DEVICE_TOKEN

# -- Rule validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "accept", "field"),
    [
        # Not an absolute path.
        pytest.param("health", None, "Rule.path", id="relative"),
        pytest.param("", None, "Rule.path", id="empty"),
        pytest.param("*", None, "Rule.path", id="bare-star"),
        pytest.param(b"/health", None, "Rule.path", id="bytes"),
        pytest.param(None, None, "Rule.path", id="none"),
        # '*' only as a final '/*'.
        pytest.param("/a*", None, "Rule.path", id="star-glued-to-a-name"),
        pytest.param("/a/*/b", None, "Rule.path", id="star-in-the-middle"),
        pytest.param("/a/**", None, "Rule.path", id="double-star"),
        pytest.param("/*/*", None, "Rule.path", id="two-stars"),
        pytest.param("/a/*x", None, "Rule.path", id="star-prefix"),
        # Paths no request can have once the middleware has refused unsafe ones.
        pytest.param("/a/../b", None, "Rule.path", id="dot-dot"),
        pytest.param("/a/./b", None, "Rule.path", id="dot"),
        pytest.param("/..", None, "Rule.path", id="root-dot-dot"),
        pytest.param("//a", None, "Rule.path", id="leading-double-slash"),
        pytest.param("/a//b", None, "Rule.path", id="inner-double-slash"),
        pytest.param("/a//*", None, "Rule.path", id="double-slash-prefix"),
        pytest.param("/a/../*", None, "Rule.path", id="dot-dot-prefix"),
        pytest.param("/a\\..\\b", None, "Rule.path", id="backslash-dot-dot"),
        # accept must name at least one credential kind.
        pytest.param("/a", [], "Rule.accept", id="accept-empty"),
        pytest.param("/a", ["password"], "Rule.accept", id="accept-unknown-kind"),
        pytest.param("/a", "api_key", "Rule.accept", id="accept-a-bare-string"),
        pytest.param("/a", [API_KEY, "session"], "Rule.accept", id="accept-one-unknown"),
    ],
)
def test_invalid_rule_is_a_config_error(path: Any, accept: Any, field: str) -> None:
    options: dict[str, Any] = {} if accept is None else {"accept": accept}
    with pytest.raises(ConfigError) as info:
        Rule(path, **options)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_rule_defaults_accept_every_kind() -> None:
    rule = Rule("/a")
    assert rule.accept == frozenset(CredentialKind)
    assert rule.public is False
    assert rule.path == "/a"


def test_rule_accepts_kind_names() -> None:
    assert Rule("/a", accept=["api_key", "device_token"]) == Rule(
        "/a", accept=[API_KEY, DEVICE_TOKEN]
    )


def test_rule_is_immutable_and_hashable() -> None:
    rule = Rule("/a/*", accept=[API_KEY])
    with pytest.raises(AttributeError):
        rule.public = True
    assert rule.public is False
    assert {rule, Rule("/a/*", accept=[API_KEY])} == {rule}
    assert rule != Rule("/a/*", accept=[MOBILE_API_KEY])
    assert rule != Rule("/a/*", public=True)
    assert rule != "/a/*"


def test_rule_repr() -> None:
    assert repr(Rule("/health", public=True)) == "Rule('/health', public=True)"
    assert repr(Rule("/m/*", accept=[MOBILE_API_KEY, API_KEY])) == (
        "Rule('/m/*', accept={api_key, mobile_api_key})"
    )


@pytest.mark.parametrize("path", ["/", "/*", "/a/", "/a/*", "/a.b/c", "/.well-known/x", "/a/b.."])
def test_valid_rule_paths(path: str) -> None:
    assert Rule(path).path == path


def test_middleware_refuses_a_rule_that_nothing_could_pass(keys: Keys, app: RecordingApp) -> None:
    only_api_key = GateConfig(api_keys=keys.api_key)
    with pytest.raises(ConfigError) as info:
        DeviceAuthMiddleware(
            app, config=only_api_key, rules=[Rule("/m/*", accept=[MOBILE_API_KEY, DEVICE_TOKEN])]
        )
    assert info.value.field == "rules"
    # A public rule needs no credential kind, and a rule with one configured kind is fine.
    DeviceAuthMiddleware(app, config=only_api_key, rules=[Rule("/m/*", public=True)])
    DeviceAuthMiddleware(
        app, config=only_api_key, rules=[Rule("/m/*", accept=[API_KEY, "mobile_api_key"])]
    )


def test_middleware_refuses_what_is_not_a_rule(keys: Keys, app: RecordingApp) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceAuthMiddleware(app, config=keys.config(), rules=["/health"])  # type: ignore[list-item]
    assert info.value.field == "rules"


# -- Rule.matches -----------------------------------------------------------------------------

# rule path, route path, whether the rule applies.
MATCHES = [
    # Exact rules match the path with or without one trailing slash (routers serve or redirect
    # one to the other), but no prefix and no case folding.
    ("/health", "/health", True),
    ("/health", "/health/", True),
    ("/health", "/health//", False),
    ("/health", "/healthz", False),
    ("/health", "/health/x", False),
    ("/health", "/Health", False),
    ("/health", "/", False),
    ("/health/", "/health/", True),
    ("/health/", "/health", True),
    ("/", "/", True),
    ("/", "/x", False),
    # Prefix rules match the directory, its bare name and everything below it.
    ("/mobile/*", "/mobile/", True),
    ("/mobile/*", "/mobile/x", True),
    ("/mobile/*", "/mobile/x/y/z", True),
    ("/mobile/*", "/mobile/x/", True),
    ("/mobile/*", "/mobile", True),
    ("/mobile/*", "/mobilex", False),
    ("/mobile/*", "/mobilex/y", False),
    ("/mobile/*", "/mobil", False),
    ("/mobile/*", "/Mobile/x", False),
    ("/mobile/*", "/x/mobile/y", False),
    ("/a/b/*", "/a/b/c", True),
    ("/a/b/*", "/a/bc", False),
    ("/a/b/*", "/a/", False),
    ("/*", "/", True),
    ("/*", "/anything/at/all", True),
]


@pytest.mark.parametrize(("rule_path", "path", "expected"), MATCHES)
def test_rule_matches(rule_path: str, path: str, expected: bool) -> None:
    assert Rule(rule_path).matches(path) is expected


# -- RuleTable: the rules compiled for the middleware -----------------------------------------


def first_match(rules: list[Rule], path: str) -> int | None:
    """What a RuleTable must answer: the index of the first rule that matches, by hand."""
    return next((index for index, rule in enumerate(rules) if rule.matches(path)), None)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a", 0),  # two exact rules in one run: the earlier keeps the paths they share
        ("/a/", 0),
        ("/b", 2),
        ("/c/x", 3),  # a prefix rule between two runs of exact rules...
        ("/c/d", 3),  # ...wins over a later exact rule for the same path
        ("/c", 3),
        ("/e/", 5),
        ("/f", None),
        ("/", None),
    ],
)
def test_rule_table_answers_the_first_matching_rule(path: str, expected: int | None) -> None:
    rules = [Rule("/a"), Rule("/a/"), Rule("/b"), Rule("/c/*"), Rule("/c/d"), Rule("/e")]
    table = RuleTable(((rule, index) for index, rule in enumerate(rules)), default=None)
    assert table.lookup(path) == expected == first_match(rules, path)


def test_an_empty_rule_table_answers_its_default() -> None:
    assert RuleTable((), default="default").lookup("/anything") == "default"


class CaseBlindRule(Rule):
    """A rule of a user's own: it matches whatever the path's case."""

    __slots__ = ()

    def matches(self, path: str) -> bool:
        return super().matches(path.lower())


def test_rule_table_asks_a_rule_with_its_own_matches() -> None:
    rules = [Rule("/a"), CaseBlindRule("/admin/*"), Rule("/ADMIN/x"), Rule("/b/*")]
    table = RuleTable(((rule, index) for index, rule in enumerate(rules)), default=None)
    for path, expected in [("/a", 0), ("/ADMIN/x", 1), ("/Admin", 1), ("/b/c", 3), ("/c", None)]:
        assert table.lookup(path) == expected == first_match(rules, path)


async def test_middleware_honours_a_rule_with_its_own_matches(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    rule = CaseBlindRule("/admin/*", accept=[API_KEY])
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=[rule])) as http:
        refused = await http.get("/ADMIN/users", headers=headers["mobile_api_key"])
        admitted = await http.get("/ADMIN/users", headers=headers["api_key"])
    assert refused.status_code == 403
    assert kind_seen(admitted) == "api_key"


# Few names, so that generated rules overlap and shadow each other and paths hit them.
_NAMES = st.lists(st.sampled_from(["a", "b", "ab"]), max_size=3)
_RULE_PATHS = st.builds(
    lambda names, ending: ("/" + "/".join(names)).rstrip("/") + ending or "/",
    _NAMES,
    st.sampled_from(["", "/", "/*"]),
)


@given(
    rule_paths=st.lists(_RULE_PATHS, max_size=6),
    path=st.lists(st.sampled_from(["a", "b", "ab", ""]), max_size=4).map(
        lambda segments: "/" + "/".join(segments)
    ),
)
def test_rule_table_agrees_with_walking_the_rules(rule_paths: list[str], path: str) -> None:
    rules = [Rule(rule_path) for rule_path in rule_paths]
    table = RuleTable(((rule, index) for index, rule in enumerate(rules)), default=None)
    assert table.lookup(path) == first_match(rules, path)


# -- Rules through the middleware -------------------------------------------------------------


def status_of(sent: list[Message]) -> int:
    """The status of a whole HTTP response (start, then one body message)."""
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    status: int = sent[0]["status"]
    return status


def kind_seen(response: httpx.Response) -> str | None:
    assert response.status_code == 200, response.text
    kind: str | None = response.json()["kind"]
    return kind


@pytest.fixture
def headers(keys: Keys) -> dict[str, dict[str, str]]:
    return {
        "none": {},
        "api_key": {"x-api-key": keys.api_key},
        "mobile_api_key": {"authorization": keys.mobile_api_key},
        "device_token": {"authorization": f"Bearer {make_token(keys.jwt_secret)}"},
    }


async def test_exact_rule(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    gate = DeviceAuthMiddleware(
        app, config=keys.config(), rules=[Rule("/server", accept=[API_KEY])]
    )
    async with client(gate) as http:
        admitted = await http.get("/server", headers=headers["api_key"])
        refused = await http.get("/server", headers=headers["mobile_api_key"])
        other = await http.get("/serverx", headers=headers["mobile_api_key"])
    assert kind_seen(admitted) == "api_key"
    assert refused.status_code == 403
    assert refused.headers["www-authenticate"] == challenge(FORBIDDEN)
    assert kind_seen(other) == "mobile_api_key"
    assert [scope["path"] for scope in app.calls] == ["/server", "/serverx"]


async def test_prefix_rule(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    rules = [Rule("/mobile/*", accept=[MOBILE_API_KEY, DEVICE_TOKEN])]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    async with client(gate) as http:
        for path in ("/mobile", "/mobile/", "/mobile/x", "/mobile/x/y/"):
            refused = await http.get(path, headers=headers["api_key"])
            assert refused.status_code == 403, path
            assert kind_seen(await http.get(path, headers=headers["device_token"])) == (
                "device_token"
            )
        # Not /mobile nor below it: the rule does not apply and every configured kind is accepted.
        for path in ("/mobilex", "/mobilex/y", "/x/mobile/y"):
            assert kind_seen(await http.get(path, headers=headers["api_key"])) == "api_key", path
    assert len(app.calls) == 7


async def test_first_matching_rule_wins(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    rules = [
        Rule("/a/b", accept=[API_KEY]),
        Rule("/a/*", accept=[MOBILE_API_KEY]),
        Rule("/a/c", accept=[API_KEY]),  # shadowed by /a/*
        Rule("/*", accept=[DEVICE_TOKEN]),
    ]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    # path, credential, status
    cases = [
        ("/a/b", "api_key", 200),
        ("/a/b", "mobile_api_key", 403),
        ("/a/c", "mobile_api_key", 200),
        ("/a/c", "api_key", 403),
        ("/a/", "mobile_api_key", 200),
        ("/a", "mobile_api_key", 200),  # /a/* covers the bare /a too
        ("/a", "device_token", 403),
        ("/b", "device_token", 200),
        ("/b", "mobile_api_key", 403),
        ("/", "device_token", 200),
        ("/", "api_key", 403),
    ]
    async with client(gate) as http:
        for path, credential, status in cases:
            response = await http.get(path, headers=headers[credential])
            assert response.status_code == status, (path, credential)
    assert len(app.calls) == 6


async def test_public_rule_listed_first_wins_over_a_later_restriction(
    keys: Keys, app: RecordingApp
) -> None:
    rules = [Rule("/docs/*", public=True), Rule("/docs/secret", accept=[API_KEY])]
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=rules)) as http:
        response = await http.get("/docs/secret")
    assert kind_seen(response) is None


async def test_trailing_slash_spelling_cannot_escape_a_restriction(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    # Litestar (and others) serve /admin/ with the /admin handler: a rule that covered only one
    # spelling would let a refused credential in through the other.
    rules = [Rule("/admin", accept=[API_KEY]), Rule("/ops/*", accept=[API_KEY])]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    async with client(gate) as http:
        for path in ("/admin", "/admin/", "/ops", "/ops/", "/ops/x"):
            refused = await http.get(path, headers=headers["mobile_api_key"])
            assert refused.status_code == 403, path
            assert kind_seen(await http.get(path, headers=headers["api_key"])) == "api_key"
    assert len(app.calls) == 5


async def test_public_path_covers_both_slash_spellings_only(keys: Keys, app: RecordingApp) -> None:
    rules = [Rule("/health", public=True), Rule("/status/", public=True)]
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=rules)) as http:
        admitted = [await http.get(path) for path in ("/health", "/health/", "/status", "/status/")]
        refused = await http.get("/health/x")
    assert all(kind_seen(response) is None for response in admitted)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == REALM_ONLY
    assert len(app.calls) == 4


@pytest.mark.parametrize(
    "path",
    [
        # Look-alikes of the public prefix /public/* and the public path /health.
        "/publicx",
        "/publicity/x",
        "/Public/x",
        "/x/public/y",
        "/healthz",
        "/health.json",
        "/health/x",
        "/HEALTH",
        "/health%2f",
        "/health ",
    ],
)
async def test_public_look_alikes_need_credentials(
    keys: Keys, app: RecordingApp, path: str
) -> None:
    rules = [Rule("/public/*", public=True), Rule("/health", public=True)]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    assert status_of(await call_asgi(gate, http_scope(path))) == 401
    assert not app.ran


# Refused with 400 before any rule is consulted: a proxy or app further on may normalise
# these into a path no rule here saw (RFC 3986 §5.2.4 dot removal, nginx merge_slashes).
UNSAFE_PATHS = [
    "/public/../admin",
    "/public/..",
    "/public/./admin",
    "/public/.",
    "/./public/x",
    "/..",
    "/.",
    "/../public/x",
    "//admin",
    "//",
    "/public//admin",
    "/public//",
    "/admin//",
    "/admin/x//y",
    # A backslash is a separator for some servers and frameworks.
    "/public\\..\\admin",
    "/public\\admin",
    "/admin\\",
    "/admin\\x",
    "\\admin",
    # A semicolon starts a path parameter that Servlet containers and Spring strip:
    # /docs/..;/admin is /admin to Tomcat.
    "/public/..;/admin",
    "/public/.;/admin",
    "/admin;x",
    "/public/x;jsessionid=1",
    # Control characters: some servers cut the path at a NUL or treat others oddly.
    "/health\x00",
    "/admin\x00.json",
    "/public/x\n/admin",
    "/public/\x7f",
    # Other non-printable characters: a C1 control, an invisible zero-width space.
    "/public/\x85/admin",
    "/admin\u200b",
    # Not absolute at all.
    "",
    "admin",
    "public/x",
]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
@pytest.mark.parametrize("credential", ["none", "api_key", "mobile_api_key"])
async def test_unsafe_paths_are_refused_before_rules(
    keys: Keys,
    app: RecordingApp,
    headers: dict[str, dict[str, str]],
    path: str,
    credential: str,
) -> None:
    rules = [
        Rule("/public/*", public=True),
        Rule("/admin/*", accept=[API_KEY]),
        Rule("/admin", accept=[API_KEY]),
    ]
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=rules)
    sent = await call_asgi(gate, http_scope(path, headers[credential]))
    assert status_of(sent) == 400
    assert json.loads(sent[1]["body"]) == {
        "error": "invalid_request",
        "error_description": UNSAFE_PATH,
    }
    assert not app.ran


@pytest.mark.parametrize(
    "path", ["/a.b", "/.well-known/openid", "/a/..b", "/a/b..", "/a/.../b", "/...", "/a/"]
)
async def test_dots_inside_a_segment_are_fine(keys: Keys, app: RecordingApp, path: str) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    sent = await call_asgi(gate, http_scope(path, [(b"x-api-key", keys.api_key.encode())]))
    assert status_of(sent) == 200
    assert app.calls[0]["path"] == path


async def test_unsafe_path_is_refused_even_on_the_token_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config())
    key = [(b"x-api-key", keys.api_key.encode())]
    for path in ("/x/../gen-jwt", "//gen-jwt", "/./gen-jwt"):
        assert status_of(await call_asgi(gate, http_scope(path, key, method="POST"))) == 400
    assert not app.ran


# -- root_path mounting -----------------------------------------------------------------------

ROOT_RULES = (Rule("/health", public=True), Rule("/server/*", accept=[API_KEY]))


@pytest.mark.parametrize(
    ("root_path", "path", "credential", "status"),
    [
        # Rules match the route path: the path below root_path.
        ("/api", "/api/health", "none", 200),
        ("/api", "/api/server/x", "api_key", 200),
        ("/api", "/api/server/x", "mobile_api_key", 403),
        ("/api", "/api/other", "mobile_api_key", 200),
        # A rule written with the mount point in it does not match anything mounted.
        ("/api", "/api/api/health", "none", 401),
        # Servers that leave root_path out of path: the path is already the route path.
        ("/api", "/health", "none", 200),
        ("/api", "/server/x", "mobile_api_key", 403),
        # Only a whole segment is a mount point: /apix is not below /api.
        ("/api", "/apix/health", "none", 401),
        ("/api", "/api", "none", 401),
        ("/a/b", "/a/b/health", "none", 200),
        ("/a/b", "/a/b/server/", "mobile_api_key", 403),
        # The unsafe-path check looks at the whole path, mount point included.
        ("/api", "/api/../health", "none", 400),
        ("/api", "/api//health", "none", 400),
    ],
)
async def test_root_path(
    keys: Keys,
    app: RecordingApp,
    headers: dict[str, dict[str, str]],
    root_path: str,
    path: str,
    credential: str,
    status: int,
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=ROOT_RULES)
    sent = await call_asgi(gate, http_scope(path, headers[credential], root_path=root_path))
    assert status_of(sent) == status
    assert app.ran is (status == 200)


async def test_rules_match_below_a_starlette_mount(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=ROOT_RULES)
    outer = Starlette(routes=[Mount("/api", app=gate)])
    async with client(outer) as http:
        health = await http.get("/api/health")
        server_mobile = await http.get("/api/server/x", headers=headers["mobile_api_key"])
        server_key = await http.get("/api/server/x", headers=headers["api_key"])
        minted = await http.post("/api/gen-jwt", headers=headers["api_key"])
        not_mounted_token_path = await http.post("/gen-jwt", headers=headers["api_key"])
    assert kind_seen(health) is None
    assert server_mobile.status_code == 403
    assert kind_seen(server_key) == "api_key"
    assert minted.status_code == 200
    assert minted.json()["token_type"] == "Bearer"
    assert not_mounted_token_path.status_code == 404
    assert [(scope["root_path"], scope["path"]) for scope in app.calls] == [
        ("/api", "/api/health"),
        ("/api", "/api/server/x"),
    ]


async def test_httpx_root_path(keys: Keys, app: RecordingApp) -> None:
    gate = DeviceAuthMiddleware(app, config=keys.config(), rules=ROOT_RULES)
    transport = httpx.ASGITransport(app=gate, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await http.get("/api/health")
    assert kind_seen(response) is None


# -- Methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "GET", "POST", "PUT", "DELETE", "TRACE"])
async def test_every_method_needs_credentials(keys: Keys, app: RecordingApp, method: str) -> None:
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        refused = await http.request(method, "/x", headers={"origin": "https://example.com"})
        admitted = await http.request(method, "/x", headers={"x-api-key": keys.api_key})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == REALM_ONLY
    assert admitted.status_code == 200
    assert [scope["method"] for scope in app.calls] == [method]


async def test_head_and_options_respect_rules(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    rules = [Rule("/server/*", accept=[API_KEY])]
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=rules)) as http:
        for method in ("HEAD", "OPTIONS"):
            response = await http.request(method, "/server/x", headers=headers["mobile_api_key"])
            assert response.status_code == 403, method
    assert not app.ran


# -- Public paths -----------------------------------------------------------------------------

BAD_CREDENTIALS: list[list[tuple[str, str]]] = [
    [],
    [("authorization", "Bearer not.a.token")],
    [("authorization", "Basic dXNlcjpwYXNz")],
    [("authorization", "Bearer")],
    [("x-api-key", "wrong-key-0123456789")],
    [("x-api-key", "a"), ("x-api-key", "b")],
    [("x-api-key", "a"), ("authorization", "b")],
    [("authorization", "a"), ("authorization", "b")],
    [("x-instance-id", "a"), ("x-instance-id", "b")],
]


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
async def test_public_path_skips_credential_checks(
    keys: Keys, app: RecordingApp, credentials: list[tuple[str, str]]
) -> None:
    rules = [Rule("/health", public=True), Rule("/open/*", public=True)]
    raw = raw_headers(credentials)
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=rules)) as http:
        health = await http.get("/health", headers=raw)
        below = await http.get("/open/x", headers=raw)
    for response in (health, below):
        assert response.json() == {
            "kind": None,
            "instance_id": None,
            "authenticated": False,
            "scopes": [],
        }
    for scope in app.calls:
        assert isinstance(scope["user"], UnauthenticatedUser)
        assert scope["auth"].scopes == []
    assert len(app.calls) == 2


async def test_public_path_with_a_valid_credential_carries_no_principal(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    rules = [Rule("/health", public=True)]
    async with client(DeviceAuthMiddleware(app, config=keys.config(), rules=rules)) as http:
        response = await http.get("/health", headers=headers["api_key"])
    assert kind_seen(response) is None


async def test_no_rules_accepts_every_configured_kind(
    keys: Keys, app: RecordingApp, headers: dict[str, dict[str, str]]
) -> None:
    async with client(DeviceAuthMiddleware(app, config=keys.config())) as http:
        kinds = [
            kind_seen(await http.get("/any/path", headers=headers[name]))
            for name in ("api_key", "mobile_api_key", "device_token")
        ]
    assert kinds == ["api_key", "mobile_api_key", "device_token"]


def test_a_public_rule_takes_no_accept() -> None:
    # Nothing is checked on a public path: an accept list there would promise a check.
    with pytest.raises(ConfigError) as info:
        Rule("/health", accept=[API_KEY], public=True)
    assert info.value.field == "Rule.accept"


def test_rule_attributes_cannot_be_deleted() -> None:
    rule = Rule("/a/*", accept=[API_KEY])
    for name in ("path", "accept", "public"):
        with pytest.raises(AttributeError):
            delattr(rule, name)
    assert rule.matches("/a/b")
