"""Which credentials a path accepts, and how a request's route path is found and checked."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from ._errors import ConfigError
from ._principal import ALL_KINDS, CredentialKind

__all__ = [
    "Rule",
    "RuleTable",
    "has_unsafe_segments",
    "route_path",
    "strip_root_path",
]

V = TypeVar("V")


class Rule:
    """Which credential kinds a path accepts.

    Args:
        path: an exact route path (``"/health"``, which also matches ``"/health/"``) or a
            prefix ending in ``/*`` (``"/mobile/*"`` matches ``/mobile``, ``/mobile/`` and
            everything below it, but not ``/mobilex``).
        accept: the credential kinds admitted (default: all of them).
        public: admit requests without any credential. Nothing is checked on a public path,
            so ``accept`` cannot be given with it.
        optional: admit a request that carries no credential at all as unauthenticated, as a
            public path does, but check one that does carry a credential as anywhere else: a
            valid one gives its principal, an invalid one is refused. For pages that greet a
            signed-in caller and serve everyone else too.
        dpop: device tokens on this path must be bound to a key and come with a DPoP proof
            (RFC 9449); a token bound to no key is refused here (keys are still governed by
            ``accept``).

    Raises:
        ConfigError: the path is not absolute, contains ``.``/``..`` or empty segments or a
            backslash, a semicolon or a non-printable character, a ``*`` anywhere but a final
            ``/*``, or ``accept`` is empty (or given with ``public=True``), or ``public`` and
            ``optional`` are both true, or ``dpop`` is given where no device token is checked.
    """

    __slots__ = ("_exact", "_prefix", "_root", "accept", "dpop", "optional", "path", "public")

    path: str
    accept: frozenset[CredentialKind]
    public: bool
    optional: bool
    dpop: bool
    _exact: frozenset[str]
    _prefix: str | None
    _root: str

    def __init__(
        self,
        path: str,
        *,
        accept: Iterable[CredentialKind | str] | None = None,
        public: bool = False,
        optional: bool = False,
        dpop: bool = False,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError("Rule.path", f"must start with '/', got {path!r}")
        prefix = path[:-1] if path.endswith("/*") else None
        body = prefix if prefix is not None else path
        if "*" in body:
            raise ConfigError("Rule.path", "'*' is allowed only as a final '/*' segment")
        if has_unsafe_segments(body):
            raise ConfigError(
                "Rule.path",
                f"{path!r} has '.', '..' or empty segments, a backslash, a semicolon or a "
                "non-printable character",
            )
        if public and optional:
            raise ConfigError(
                "Rule.optional",
                "a public rule checks no credential at all; choose public or optional",
            )
        if public and accept is not None:
            raise ConfigError(
                "Rule.accept", "a public rule checks no credential; drop accept or public=True"
            )
        if accept is None:
            accept = ALL_KINDS
        try:
            kinds = frozenset(CredentialKind(kind) for kind in accept)
        except ValueError:
            raise ConfigError(
                "Rule.accept", f"must hold CredentialKind values, got {accept!r}"
            ) from None
        if not kinds:
            raise ConfigError(
                "Rule.accept", "is empty, so nothing could pass; use public=True or remove it"
            )
        if dpop and (public or CredentialKind.DEVICE_TOKEN not in kinds):
            raise ConfigError(
                "Rule.dpop", "requires device tokens to be proven, so the rule must accept them"
            )
        set_ = object.__setattr__
        set_(self, "path", path)
        set_(self, "accept", kinds)
        set_(self, "public", bool(public))
        set_(self, "optional", bool(optional))
        set_(self, "dpop", bool(dpop))
        # A trailing slash does not make another resource: most routers serve or redirect
        # "/admin/" to "/admin" (Litestar serves both), so a rule covers both spellings. A
        # looser reading would let a credential the rule refuses in through the other one.
        stem = body.rstrip("/") or "/"
        set_(self, "_exact", frozenset() if prefix is not None else frozenset({stem, stem + "/"}))
        set_(self, "_prefix", prefix)
        # What a prefix rule matches besides what starts with its prefix (an exact rule matches
        # its _exact alone).
        set_(self, "_root", stem if prefix is not None else "")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Rule is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Rule is immutable")

    def __repr__(self) -> str:
        if self.public:
            return f"Rule({self.path!r}, public=True)"
        optional = ", optional=True" if self.optional else ""
        dpop = ", dpop=True" if self.dpop else ""
        kinds = ", ".join(sorted(kind.value for kind in self.accept))
        return f"Rule({self.path!r}, accept={{{kinds}}}{optional}{dpop})"

    def _key(self) -> tuple[str, frozenset[CredentialKind], bool, bool, bool]:
        return (self.path, self.accept, self.public, self.optional, self.dpop)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def matches(self, path: str) -> bool:
        """Whether this rule applies to the route path ``path``."""
        if self._prefix is not None:
            return path.startswith(self._prefix) or path == self._root
        return path in self._exact


class RuleTable(Generic[V]):
    """Rules in order, each with a value, compiled once for deciding paths.

    :meth:`lookup` answers what walking the rules with :meth:`Rule.matches` would answer (the
    value of the first rule that matches, else ``default``), without a method call per rule:
    a run of exact rules becomes one dictionary, and a prefix rule two string tests. A rule
    with a ``matches`` of its own (a subclass's) is asked through it instead.
    """

    __slots__ = ("_default", "_steps")

    def __init__(self, pairs: Iterable[tuple[Rule, V]], default: V) -> None:
        # A step is (prefix, root, None, None, value) for a prefix rule, ("", "", paths, None,
        # default) for a run of consecutive exact rules, where an earlier rule keeps a path it
        # shares, and ("", "", None, matches, value) for a rule with a matches() of its own.
        steps: list[tuple[str, str, dict[str, V] | None, Callable[[str], bool] | None, V]] = []
        run: dict[str, V] | None = None
        for rule, value in pairs:
            if type(rule).matches is not Rule.matches:
                steps.append(("", "", None, rule.matches, value))
                run = None
            elif rule._prefix is not None:
                steps.append((rule._prefix, rule._root, None, None, value))
                run = None
            else:
                if run is None:
                    run = {}
                    steps.append(("", "", run, None, default))
                for path in rule._exact:
                    run.setdefault(path, value)
        self._steps = tuple(steps)
        self._default = default

    def lookup(self, path: str) -> V:
        """The value of the first rule matching the route path ``path``, else the default."""
        for prefix, root, exact, matches, value in self._steps:
            if exact is not None:
                if path in exact:
                    return exact[path]
            elif matches is not None:
                if matches(path):
                    return value
            elif path.startswith(prefix) or path == root:
                return value
        return self._default


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below ``root_path``: what the app's router will match on.

    ASGI puts the full path in ``scope["path"]`` and the mount point in ``root_path``; rules are
    written against the app's own routes, so they match the remainder.
    """
    return strip_root_path(scope["path"], scope.get("root_path", ""))


def strip_root_path(path: str, root_path: str) -> str:
    """:func:`route_path` for a path and mount point already read from the scope."""
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


def has_unsafe_segments(path: str) -> bool:
    """Whether ``path`` could mean another path to a server further on.

    Refused: ``.``, ``..`` and empty segments (a final ``/`` is fine), which dot removal
    (RFC 3986 §5.2.4) or nginx's ``merge_slashes`` rewrite into a path no rule here saw; a
    backslash, which some servers treat as a separator (``/admin\\x`` as ``/admin/x``); a
    semicolon, which Servlet containers and Spring strip as a path parameter
    (``/docs/..;/admin`` is ``/admin`` to Tomcat); and non-printable characters (controls, NUL
    included, which some servers cut the path at, and invisible formatting characters).
    """
    if not path.startswith("/") or not path.isprintable() or ";" in path or "\\" in path:
        return True
    if "//" not in path and "/." not in path:
        return False  # the common case, decided with C-level scans (a regex costs twice as much)
    segments = path[1:].split("/")
    if segments and segments[-1] == "":
        segments.pop()
    return any(segment in ("", ".", "..") for segment in segments)
