"""Assembling the ASGI app ``devicegate serve`` runs: the gate, the token and revocation
endpoints, the demo or a reverse proxy, and optionally a forward-auth endpoint.

``build_app`` takes ready values; :class:`ServeSettings` carries what the command line resolved
and round-trips through ``DEVICEGATE_*`` environment variables, so that every uvicorn worker
process (which imports :func:`app_from_env` by name) builds the same app as the parent. Secrets
never travel that way: only the path of the secrets file and the *name* of the variable that
holds the forward-auth secret do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .._asgi import send_json, send_refusal
from .._config import (
    CREDENTIAL_VARIABLES,
    GateConfig,
    env_bool,
    env_int,
    env_list,
    env_seconds,
    env_str,
    opens_a_door_of,
    read_env,
    read_secrets_document,
)
from .._counters import Counters
from .._dpop import SharedReplayStore
from .._errors import ConfigError
from .._middleware import DeviceAuthMiddleware
from .._principal import CredentialKind
from .._revocation import ReportingRevocationStore, RevocationList, RevocationStore
from .._rules import Rule, has_unsafe_segments, route_path
from ._demo import HEALTH_PATH, demo_app, health_app
from ._policy import DEFAULT_TIMEOUT, ProxyLimits
from ._refusals import RevocationOff
from ._reload import ReloadableApp

if TYPE_CHECKING:
    from ..redis import RedisRevocationList

__all__ = [
    "DEFAULT_FORWARD_AUTH_PATH",
    "DEFAULT_REVOKE_PATH",
    "DEFAULT_TOKEN_PATH",
    "ReloadableApp",
    "ServeSettings",
    "app_from_env",
    "build_app",
    "has_env_credentials",
    "load_config",
    "parse_rule",
    "parse_timeout",
    "read_upstream_secrets",
]

logger = logging.getLogger("devicegate")

DEFAULT_TOKEN_PATH = "/gen-jwt"  # noqa: S105 - a path, not a secret
DEFAULT_FORWARD_AUTH_PATH = "/_devicegate/auth"
DEFAULT_REVOKE_PATH = "/revoke"

_DISABLED = "none"
# Between the rules of DEVICEGATE_RULES (a path may hold ',', which separates kinds).
RULE_SEPARATOR = ";"


def has_env_credentials(environ: Mapping[str, str]) -> bool:
    """Whether the environment itself configures a key or a secret (then no secrets.json is
    needed)."""
    return any(read_env(environ, name, env_str) for name in CREDENTIAL_VARIABLES)


def load_config(
    secrets_file: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> GateConfig:
    """The gate's configuration: ``secrets_file`` (when given) plus ``DEVICEGATE_*`` overrides.

    Raises:
        ConfigError: as :meth:`GateConfig.from_env`.
    """
    if secrets_file is not None:
        environ = {**environ, "DEVICEGATE_SECRETS_FILE": os.fspath(secrets_file)}
    return GateConfig.from_env(environ)


def read_upstream_secrets(
    path: str | os.PathLike[str], gate: GateConfig | None = None
) -> tuple[str | None, str | None]:
    """Read ``(api_key, mobile_api_key)`` from the upstream's SenseCrypt ``secrets.json``.

    These are the upstream's own credentials, injected into forwarded requests; their strength
    is the upstream's business, so they are not checked here. A list (rotation) yields its
    first value. With ``gate``, no value the upstream accepts (every key of a rotation list,
    and its ``jwt_secret``) may also be one of the gate's keys or its secret: devices would
    then hold something the upstream takes directly.

    Raises:
        ConfigError: the file is missing, unreadable, not a JSON object, holds neither key, or
            shares a value with ``gate``.
    """
    field = "upstream_secrets_file"
    file = Path(path)
    data = read_secrets_document(file, field)
    keys = (_first_key(field, data, "api_key"), _first_key(field, data, "mobile_api_key"))
    if keys == (None, None):
        raise ConfigError(field, f"{file} holds neither api_key nor mobile_api_key")
    if gate is not None:
        for name in ("api_key", "mobile_api_key", "jwt_secret"):
            value = data.get(name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(item, str) and opens_a_door_of(gate, item) for item in values):
                raise _shared_with_upstream(f"upstream {name}")
    return keys


def _shared_with_upstream(what: str) -> ConfigError:
    # Devices would hold the upstream's own key and could call it directly, which is what the
    # gateway exists to prevent.
    return ConfigError(
        "upstream_secrets_file",
        f"the {what} is also a key or secret of this gateway; give the gateway keys of its own "
        "(devicegate init), so that devices never hold the upstream's",
    )


def _first_key(field: str, data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if isinstance(value, list) and value:
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(field, f"{name} must be a non-empty string or a list of them")
    return value


def _check_path(field: str, path: str) -> None:
    if "*" in path or has_unsafe_segments(path):
        raise ConfigError(field, f"must be a clean absolute path such as '/health', got {path!r}")


def parse_rule(text: str, source: str = "rules") -> Rule:
    """A rule as the command line spells it, ``PATH=KINDS``: ``/admin/*=api_key`` or
    ``/mobile/*=mobile_api_key,device_token``. The kind ``dpop`` stands for device tokens
    with a DPoP proof (:attr:`Rule.dpop`): ``/payments/*=api_key,dpop``.

    Raises:
        ConfigError: named after ``source`` (the flag or the variable the rule came from), with
            the rule and what is wrong with it.
    """
    path, equals, kinds = text.strip().rpartition("=")
    path, names = path.strip(), [name.strip() for name in kinds.split(",")]
    if not equals or not path or not all(names):
        raise ConfigError(
            source,
            f"{text!r}: expected PATH=KINDS, such as '/admin/*=api_key' (kinds: {_KIND_NAMES})",
        )
    unknown = [name for name in names if name not in _KINDS]
    if unknown:
        raise ConfigError(
            source, f"{text!r}: unknown kind {unknown[0]!r}; the kinds are {_KIND_NAMES}"
        )
    dpop = _DPOP in names
    if dpop and CredentialKind.DEVICE_TOKEN.value in names:
        raise ConfigError(
            source,
            f"{text!r}: name device_token or dpop, not both (dpop is device tokens with a proof)",
        )
    try:
        return Rule(path, accept=[_KINDS[name] for name in names], dpop=dpop)
    except ConfigError as exc:
        raise ConfigError(source, f"{text!r}: {str(exc).removeprefix(exc.field + ': ')}") from None


_DPOP = "dpop"
_KINDS = {kind.value: kind for kind in CredentialKind} | {_DPOP: CredentialKind.DEVICE_TOKEN}
_KIND_NAMES = ", ".join(_KINDS)


def _covers(earlier: Rule, later: Rule) -> bool:
    """Whether ``earlier`` matches every path ``later`` does, so that ``later`` never applies."""
    if later.path.endswith("/*"):
        return earlier.path.endswith("/*") and earlier.matches(later.path[:-2] or "/")
    return earlier.matches(later.path)


class _PathSwitch:
    """Send one route path (both slash spellings, as a :class:`~devicegate.Rule` matches it)
    to ``endpoint`` and everything else (lifespan too) to ``app``.

    Only the scope types in ``scope_types`` go to ``endpoint``: an endpoint that speaks HTTP
    alone must never be handed a websocket handshake.
    """

    def __init__(
        self,
        path: str,
        endpoint: ASGIApp,
        app: ASGIApp,
        *,
        scope_types: frozenset[str] = frozenset({"http"}),
    ) -> None:
        self.path = path
        self._rule = Rule(path)
        self.endpoint = endpoint
        self.app = app
        self._scope_types = scope_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in self._scope_types and self._rule.matches(route_path(scope)):
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _health_reporting(store: ReportingRevocationStore) -> ASGIApp:
    """``/health`` with the state of a shared revocation store: 200 ``"ok"`` while it is fresh,
    200 ``"degraded"`` while stale but failing open, 503 ``"unavailable"`` while it refuses."""

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        state = store.state
        if state.fresh:
            status, word = 200, "ok"
        else:
            status, word = (200, "degraded") if state.fail_open else (503, "unavailable")
        await send_json(scope, send, status, {"status": word, "revocations": state.as_dict()})

    return health


async def _revocation_off(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer at the revocation path when revocation cannot hold in every process."""
    await send_refusal(scope, send, RevocationOff())


def build_app(
    config: GateConfig,
    *,
    upstream: str | None = None,
    upstream_api_key: str | None = None,
    upstream_mobile_api_key: str | None = None,
    upstream_timeout: float = DEFAULT_TIMEOUT,
    public: Sequence[str] = (),
    rules: Sequence[Rule] = (),
    forward_auth_path: str | None = None,
    forward_auth_secret: str | None = None,
    token_path: str | None = DEFAULT_TOKEN_PATH,
    revoke_path: str | None = DEFAULT_REVOKE_PATH,
    workers: int = 1,
    revocations: RevocationStore | None = None,
    reload: Callable[[], GateConfig] | None = None,
    reload_source: str = "the configuration",
    counters: Counters | None = None,
    rate_limit_storage: str | None = None,
    on_shutdown: Sequence[Callable[[], None]] = (),
    dpop_replay: SharedReplayStore | None = None,
    proxy_limits: ProxyLimits | None = None,
) -> ReloadableApp:
    """Build the app ``devicegate serve`` runs.

    :class:`~devicegate.DeviceAuthMiddleware` guards the embedded demo app, or a
    :class:`~devicegate.gateway.proxy.ReverseProxy` to ``upstream`` when given. ``/health`` is
    public and answered by the gateway itself (never forwarded). ``public`` adds public paths.
    ``forward_auth_path`` is answered by :class:`~devicegate.gateway.forward_auth.ForwardAuth`,
    which applies the same ``public`` rules to the URI the proxy asks about.

    Args:
        config: keys and secrets of the gate.
        upstream: the base URL to forward admitted requests to.
        upstream_api_key: the upstream's server key, injected into forwarded server calls.
        upstream_mobile_api_key: the upstream's mobile key, injected into forwarded mobile calls.
        upstream_timeout: seconds to wait for the upstream to connect, accept the body or
            answer before a 504, and for the client's body to go on before a 408.
        public: route paths (exact, or prefixes ending in ``/*``) that need no credential.
        rules: what other paths accept, after ``/health`` and ``public`` (first match wins).
        forward_auth_path: the path of the forward-auth endpoint, or ``None``.
        forward_auth_secret: a shared secret the proxy must send to the forward-auth endpoint.
        token_path: the path of the token endpoint, or ``None``.
        revoke_path: the path of the revocation endpoint (server API key only), or ``None``.
            Revocations are kept in a :class:`~devicegate.RevocationList` in this process,
            which the gate and the forward-auth endpoint both consult.
        workers: how many processes serve this app. Above 1 an in-memory list would hold in
            one of them only, so without a shared ``revocations`` store revocation is off:
            ``revoke_path`` answers 501 to the server API key (and is never forwarded).
        revocations: a store every process and instance shares
            (:class:`~devicegate.redis.RedisRevocationList`), used instead of an in-memory
            list, with any number of workers; ``/health`` then reports its state.
        reload: reads the configuration again; with it, SIGHUP puts what it returns in force
            (see :meth:`ReloadableApp.reconfigure`). ``None``: SIGHUP is left alone.
        reload_source: what ``reload`` reads, for the log line.
        counters: where the gate and the forward-auth endpoint count what they decide (for
            :mod:`devicegate.metrics`).
        rate_limit_storage: where the configuration's rate limits are counted (a ``limits``
            storage URI; default: in this process's memory).
        on_shutdown: what to close when the server shuts down (the shared store it was given,
            when nobody else uses it).
        dpop_replay: where accepted DPoP proofs are remembered for every instance (default:
            in this process).
        proxy_limits: what the gateway's clients may hold (default: ``ProxyLimits()``).

    Raises:
        ConfigError: a path or URL is unusable, or an option needs another one (the reverse
            proxy and the forward-auth endpoint validate their own arguments too).
        ImportError: ``upstream`` is given but httpx (the ``server`` extra) is missing.
    """
    public_rules = [Rule(path, public=True) for path in public]
    health_rule = Rule(HEALTH_PATH, public=True)
    # /health is public in the gate only; the forward-auth endpoint judges the API's own.
    covering = public_rules if forward_auth_path is not None else [health_rule, *public_rules]
    for rule in rules:
        # First match wins, and public paths come first: a rule they cover would be a silent
        # no-op, which an operator who typed it cannot have meant.
        for earlier in covering:
            if _covers(earlier, rule):
                raise ConfigError(
                    "rules",
                    f"{rule.path!r} never applies: the public path {earlier.path!r} covers it",
                )
    if token_path is not None and Rule(HEALTH_PATH).matches(token_path):
        raise ConfigError("token_path", f"{token_path!r} is already served; choose another")
    if revoke_path is not None:
        _check_path("revoke_path", revoke_path)
        if any(
            path is not None and Rule(revoke_path).matches(path)
            for path in (HEALTH_PATH, token_path)
        ):
            raise ConfigError("revoke_path", f"{revoke_path!r} is already served; choose another")
    inner: ASGIApp
    if upstream is None:
        if upstream_api_key is not None or upstream_mobile_api_key is not None:
            raise ConfigError("upstream_secrets_file", "upstream credentials need an upstream")
        inner = demo_app
    else:
        _check_upstream_keys(config, upstream_api_key, upstream_mobile_api_key)
        from .proxy import ReverseProxy  # lazy: httpx is in the server extra

        # The gateway answers its own health check: an unauthenticated probe must not reach
        # the upstream through the public /health rule, in either slash spelling the rule
        # covers. A websocket handshake there goes on to the proxy, which refuses it.
        inner = _PathSwitch(
            HEALTH_PATH,
            health_app,
            ReverseProxy(
                upstream,
                upstream_api_key=upstream_api_key,
                upstream_mobile_api_key=upstream_mobile_api_key,
                timeout=upstream_timeout,
                # The client's credential headers, whatever their configured names, never
                # reach the upstream.
                api_key_header=config.api_key_header,
                device_header=config.device_header,
                counters=counters,
                limits=proxy_limits,
            ),
        )
    user_rules = [*public_rules, *rules]
    gate_rules = [health_rule, *user_rules]
    if isinstance(revocations, ReportingRevocationStore):
        # A shared store can be cut off: /health says so (and answers 503 while it refuses
        # tokens), so that a load balancer stops sending this instance traffic.
        inner = _PathSwitch(HEALTH_PATH, _health_reporting(revocations), inner)
    # A shared store holds in every process, whatever their number; a list in memory does not.
    if revocations is None and revoke_path is not None and workers > 1:
        if config.api_keys:
            # Refused to the server key alone, as the endpoint itself would be; everyone else
            # gets the usual 401/403. Never forwarded: the switch answers before the app.
            gate_rules.insert(1, Rule(revoke_path, accept=[CredentialKind.API_KEY]))
            inner = _PathSwitch(revoke_path, _revocation_off, inner)
        revoke_path = None
    elif revocations is None and revoke_path is not None:
        revocations = RevocationList()
    gate = DeviceAuthMiddleware(
        inner,
        config=config,
        rules=gate_rules,
        token_path=token_path,
        revocations=revocations,
        revoke_path=revoke_path,
        counters=counters,
        rate_limit_storage=rate_limit_storage,
        dpop_replay=dpop_replay,
    )

    def check(new: GateConfig) -> None:
        _check_upstream_keys(new, upstream_api_key, upstream_mobile_api_key)

    options: dict[str, Any] = {
        "check": check,
        "load": reload,
        "source": reload_source,
        "on_shutdown": on_shutdown,
    }
    if forward_auth_path is None:
        if forward_auth_secret is not None:
            raise ConfigError("forward_auth_secret", "a shared secret needs a forward-auth path")
        return ReloadableApp(gate, gate=gate, **options)
    _check_path("forward_auth_path", forward_auth_path)
    # The switch below matches as a Rule does (both slash spellings), so the clash check must
    # too: "/gen-jwt/" would otherwise hide the token endpoint.
    if any(
        path is not None and Rule(forward_auth_path).matches(path)
        for path in (HEALTH_PATH, token_path, revoke_path)
    ):
        raise ConfigError(
            "forward_auth_path", f"{forward_auth_path!r} is already served; choose another path"
        )
    from .forward_auth import ForwardAuth

    # Only the user's public paths and rules: /health is the gateway's own, and making the
    # protected server's /health public behind the proxy is a decision for its operator. The same
    # revocations as the gate's: a token revoked through /revoke is refused here too.
    endpoint = ForwardAuth(
        config,
        rules=user_rules,
        shared_secret=forward_auth_secret,
        revocations=revocations,
        counters=counters,
    )
    # ForwardAuth answers websocket handshakes itself (with a refusal).
    app = _PathSwitch(
        forward_auth_path, endpoint, gate, scope_types=frozenset({"http", "websocket"})
    )
    return ReloadableApp(app, gate=gate, forward_auth=endpoint, **options)


def _check_upstream_keys(
    config: GateConfig, upstream_api_key: str | None, upstream_mobile_api_key: str | None
) -> None:
    for what, key in (
        ("upstream api_key", upstream_api_key),
        ("upstream mobile_api_key", upstream_mobile_api_key),
    ):
        if key is not None and opens_a_door_of(config, key):
            raise _shared_with_upstream(what)


# A timeout in seconds, from a variable or a command-line flag: the environment's parser.
parse_timeout = env_seconds


@dataclass(frozen=True)
class ServeSettings:
    """What ``devicegate serve`` needs to build its app, as read from the environment.

    Attributes:
        secrets_file: the gate's ``secrets.json``; ``None`` when the environment holds the keys.
        upstream: the URL to forward to, or ``None`` for the demo app.
        upstream_secrets_file: the upstream's ``secrets.json`` (its credentials to inject).
        upstream_timeout: seconds before an unanswering upstream becomes a 504.
        public: extra public route paths.
        rules: what other paths accept, as the command line spells it (``/admin/*=api_key``).
        forward_auth_path: where the forward-auth endpoint answers, or ``None``.
        forward_auth_secret_env: the name of the variable holding the forward-auth secret.
        token_path: where the token endpoint answers, or ``None``.
        revoke_path: where the revocation endpoint answers, or ``None``.
        workers: how many worker processes serve the app (revocation is off above 1, unless
            ``redis_url`` is set).
        redis_url: the Redis every worker and instance shares revocations through, or
            ``None`` for a list in this process's memory.
        redis_fail_open: admit tokens while Redis cannot be confirmed in step (default: refuse
            them with 503).
        redis_staleness: seconds without confirmation before that happens.
        proxy_limits: what the gateway's clients may hold (upstream connections, requests at
            once, buffers, the time to send a body or read a response).
    """

    secrets_file: str | None = None
    upstream: str | None = None
    upstream_secrets_file: str | None = None
    upstream_timeout: float = DEFAULT_TIMEOUT
    public: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    forward_auth_path: str | None = None
    forward_auth_secret_env: str | None = None
    token_path: str | None = DEFAULT_TOKEN_PATH
    revoke_path: str | None = DEFAULT_REVOKE_PATH
    workers: int = 1
    redis_url: str | None = None
    redis_fail_open: bool = False
    redis_staleness: float | None = None
    proxy_limits: ProxyLimits = dataclasses.field(default_factory=ProxyLimits)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServeSettings:
        """Read ``DEVICEGATE_SECRETS_FILE``, ``DEVICEGATE_UPSTREAM``, ``DEVICEGATE_PUBLIC``
        (comma-separated) and friends; empty values count as unset."""

        def get(name: str) -> str | None:
            return read_env(environ, f"DEVICEGATE_{name}", env_str)

        timeout = read_env(environ, "DEVICEGATE_UPSTREAM_TIMEOUT", env_seconds)
        token_path = get("TOKEN_PATH") or DEFAULT_TOKEN_PATH
        revoke_path = get("REVOKE_PATH") or DEFAULT_REVOKE_PATH
        workers = read_env(environ, "DEVICEGATE_WORKERS", env_int) or 1
        fail_open = read_env(environ, "DEVICEGATE_REDIS_FAIL_OPEN", env_bool)
        return cls(
            secrets_file=get("SECRETS_FILE"),
            upstream=get("UPSTREAM"),
            upstream_secrets_file=get("UPSTREAM_SECRETS_FILE"),
            upstream_timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            public=read_env(environ, "DEVICEGATE_PUBLIC", env_list) or (),
            rules=tuple(
                rule.strip() for rule in (get("RULES") or "").split(RULE_SEPARATOR) if rule.strip()
            ),
            forward_auth_path=get("FORWARD_AUTH_PATH"),
            forward_auth_secret_env=get("FORWARD_AUTH_SECRET_ENV"),
            token_path=None if token_path.lower() == _DISABLED else token_path,
            revoke_path=None if revoke_path.lower() == _DISABLED else revoke_path,
            workers=workers,
            redis_url=read_env(environ, "DEVICEGATE_REDIS_URL", env_str),
            redis_fail_open=bool(fail_open),
            redis_staleness=read_env(environ, "DEVICEGATE_REDIS_STALENESS", env_seconds),
            proxy_limits=ProxyLimits.from_env(environ),
        )

    def to_env(self) -> dict[str, str]:
        """The variables that make :meth:`from_env` return these settings again."""
        for path in self.public:
            if "," in path:
                raise ConfigError("public", f"{path!r}: a public path cannot contain ','")
        return {
            "DEVICEGATE_SECRETS_FILE": self.secrets_file or "",
            "DEVICEGATE_UPSTREAM": self.upstream or "",
            "DEVICEGATE_UPSTREAM_SECRETS_FILE": self.upstream_secrets_file or "",
            "DEVICEGATE_UPSTREAM_TIMEOUT": repr(self.upstream_timeout),
            "DEVICEGATE_PUBLIC": ",".join(self.public),
            # A rule's path never holds ';' (Rule refuses it), nor do kinds.
            "DEVICEGATE_RULES": RULE_SEPARATOR.join(self.rules),
            "DEVICEGATE_FORWARD_AUTH_PATH": self.forward_auth_path or "",
            "DEVICEGATE_FORWARD_AUTH_SECRET_ENV": self.forward_auth_secret_env or "",
            "DEVICEGATE_TOKEN_PATH": self.token_path or _DISABLED,
            "DEVICEGATE_REVOKE_PATH": self.revoke_path or _DISABLED,
            "DEVICEGATE_WORKERS": str(self.workers),
            "DEVICEGATE_REDIS_URL": self.redis_url or "",
            "DEVICEGATE_REDIS_FAIL_OPEN": "true" if self.redis_fail_open else "false",
            "DEVICEGATE_REDIS_STALENESS": ""
            if self.redis_staleness is None
            else repr(self.redis_staleness),
            **self.proxy_limits.to_env(),
        }

    def load_config(self, environ: Mapping[str, str]) -> GateConfig:
        """The gate's configuration (see :func:`load_config`)."""
        return load_config(self.secrets_file, environ)

    def build(
        self,
        environ: Mapping[str, str],
        config: GateConfig | None = None,
        *,
        counters: Counters | None = None,
    ) -> ReloadableApp:
        """Build the app; ``environ`` supplies the configuration and the forward-auth secret.

        On SIGHUP the app reads the configuration again (the secrets file, then ``environ``'s
        ``DEVICEGATE_*`` overrides) and puts it in force; the upstream's secrets file and the
        forward-auth secret are read here only.

        Raises:
            ConfigError: anything in the settings or the files they name is unusable.
        """
        if config is None:
            config = self.load_config(environ)
        api_key = mobile_api_key = None
        if self.upstream_secrets_file is not None:
            api_key, mobile_api_key = read_upstream_secrets(self.upstream_secrets_file, config)
        secret = None
        if self.forward_auth_secret_env is not None:
            secret = environ.get(self.forward_auth_secret_env) or None
            if secret is None:
                raise ConfigError(
                    "forward_auth_secret_env",
                    f"the environment variable {self.forward_auth_secret_env} is not set or empty",
                )
        store = self.shared_revocations()
        # DPoP proofs seen by any instance, in the same Redis.
        replay = None if self.redis_url is None else SharedReplayStore(self.redis_url)
        closers = [each.close for each in (store, replay) if each is not None]
        try:
            return build_app(
                config,
                upstream=self.upstream,
                upstream_api_key=api_key,
                upstream_mobile_api_key=mobile_api_key,
                upstream_timeout=self.upstream_timeout,
                public=self.public,
                rules=[parse_rule(rule) for rule in self.rules],
                forward_auth_path=self.forward_auth_path,
                forward_auth_secret=secret,
                token_path=self.token_path,
                revoke_path=self.revoke_path,
                workers=self.workers,
                revocations=store,
                reload=lambda: self.load_config(environ),
                reload_source=self.secrets_file or "the DEVICEGATE_* variables",
                counters=counters,
                # One limit across workers and instances when they share a Redis.
                rate_limit_storage=self.redis_url,
                dpop_replay=replay,
                proxy_limits=self.proxy_limits,
                # The stores are this app's alone: their threads and connections end with it.
                on_shutdown=closers,
            )
        except BaseException:
            for close in closers:
                close()  # their threads and connections are nobody's now
            raise

    def shared_revocations(self) -> RedisRevocationList | None:
        """The Redis revocation store ``redis_url`` names (its thread started), or ``None``.

        Raises:
            ConfigError: an option is unusable, or the ``redis`` extra is not installed.
        """
        if self.redis_url is None:
            return None
        try:
            from ..redis import RedisRevocationList  # lazy: the redis extra
        except ImportError:
            raise ConfigError(
                "redis_url", "needs the redis package: pip install 'devicegate[redis]'"
            ) from None
        options: dict[str, Any] = {"fail_open": self.redis_fail_open}
        if self.redis_staleness is not None:
            options["staleness"] = self.redis_staleness
            # Each Redis operation must fit, twice, in the staleness bound.
            options["socket_timeout"] = min(1.0, self.redis_staleness / 2)
        return RedisRevocationList(self.redis_url, **options)


def app_from_env() -> ASGIApp:
    """The uvicorn factory each worker of ``devicegate serve --workers N`` imports.

    Reads :class:`ServeSettings` and the gate's configuration from ``os.environ``, where the
    parent process put them. A configuration refused here (a secrets file broken since the
    parent checked it, say, when uvicorn replaces the workers on SIGHUP) is logged in one
    line, and the worker exits with status 1: uvicorn then keeps the workers that run.
    """
    try:
        return ServeSettings.from_env(os.environ).build(os.environ)
    except ConfigError as exc:
        logger.error("devicegate: this worker cannot start, the configuration is refused: %s", exc)
        # Status 1, not uvicorn's "startup failure" (3): a worker replaced after a crash while
        # the file is broken would otherwise make uvicorn stop every worker.
        raise SystemExit(1) from None
