"""Revocation: the seam where a token that verified can still be refused, and the in-memory list.

The request path asks a :class:`RevocationCheck` about a token only when the check's
:attr:`~RevocationCheck.version` differs from the one the token was last checked against, so a
cached token costs one attribute read while nothing is revoked, however long the list. Whatever
changes what the check answers (a revocation here, or one a shared store brings in) changes the
version, and every cached token is checked again on its next request.

References:
    https://www.rfc-editor.org/rfc/rfc7009 (token revocation, for the vocabulary)
    https://www.rfc-editor.org/rfc/rfc7519#section-4.1.6 (iat)
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ._errors import ConfigError

__all__ = [
    "REVOCATION_KINDS",
    "ReportingRevocationStore",
    "RevocationCheck",
    "RevocationEntry",
    "RevocationKind",
    "RevocationList",
    "RevocationState",
    "RevocationStore",
]

# A token minted by devicegate lives at most a day (GateConfig caps jwt_expire_seconds), plus the
# largest leeway: an entry is kept that long after the last token it can cover was minted.
DEFAULT_RETENTION_SECONDS = 86_400 + 60
_SWEEP_SECONDS = 60.0

RevocationKind = Literal["jti", "instance_id", "sub", "all"]
"""What a revocation names: one token, a device, a subject, or every token (named ``None``)."""
REVOCATION_KINDS: tuple[RevocationKind, ...] = ("jti", "instance_id", "sub", "all")

RevocationEntry = tuple[RevocationKind, "str | None", float]
"""``(kind, name, cutoff)``: one revocation as a replica copies it. ``cutoff`` is ``before`` for a
device, a subject or every token, and the time of revocation for a ``jti``; the entry is kept
``retention`` seconds after it."""


@runtime_checkable
class RevocationCheck(Protocol):
    """What the verifier asks before admitting a token that verified.

    Both members are read on the request path and must not block or await: keep the answer in
    memory and bring it up to date in the background.
    """

    @property
    def version(self) -> int:
        """A number that changes whenever :meth:`is_revoked` could answer otherwise."""

    def is_revoked(self, claims: Mapping[str, Any], /) -> bool:
        """Whether the token with these verified ``claims`` is revoked.

        Raise a :class:`~devicegate.Refusal` (a 503 with ``Retry-After``, say) when the answer
        cannot be known: the request is refused with it, never admitted.
        """


@runtime_checkable
class RevocationStore(RevocationCheck, Protocol):
    """A :class:`RevocationCheck` that revocations can be written to: what ``POST /revoke`` and
    ``devicegate revoke`` need. ``before`` is a Unix time (default: now); every token issued at
    or before it is covered."""

    async def revoke_token(self, jti: str) -> None: ...

    async def revoke_device(self, instance_id: str, *, before: float | None = None) -> None: ...

    async def revoke_subject(self, subject: str, *, before: float | None = None) -> None: ...

    async def revoke_all(self, *, before: float | None = None) -> None: ...


@dataclass(frozen=True)
class RevocationState:
    """How far an instance can vouch for the revocations of a shared store, for a health
    endpoint.

    Attributes:
        fresh: whether the replica was confirmed in step with the store within its staleness
            bound.
        last_sync: the Unix time of that last confirmation, or ``None`` before the first.
        entries: how many revocations the replica holds.
        fail_open: whether tokens are admitted while not fresh.
    """

    fresh: bool
    last_sync: float | None
    entries: int
    fail_open: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "fresh": self.fresh,
            "last_sync": self.last_sync,
            "entries": self.entries,
            "fail_open": self.fail_open,
        }


@runtime_checkable
class ReportingRevocationStore(RevocationStore, Protocol):
    """A :class:`RevocationStore` shared by several instances that can say how fresh its local
    replica is: ``devicegate serve`` then reports that on ``/health``, answering 503 while the
    store refuses tokens."""

    @property
    def state(self) -> RevocationState: ...


class RevocationList:
    """Revocations held in this process's memory: a :class:`RevocationCheck` with a way to add.

    A token is revoked when its ``jti`` was revoked, or when a revocation of its device
    (``instance_id``), of its subject (``sub``) or of every token has a ``before`` at or after
    the token's ``iat``: tokens minted afterwards are not affected. A token without ``iat`` is
    refused while any such revocation might cover it, since nothing says when it was minted.

    An entry is forgotten ``retention`` seconds after the last token it can cover was minted
    (revocation time for a ``jti``, ``before`` for the others): by then every such token minted
    by devicegate has expired. Memory is bounded by what was revoked in that window.

    It lives in one process: with several worker processes or instances, use a shared store.

    Args:
        retention: seconds an entry is kept (default: a day and a minute, the longest lifetime
            plus leeway of a token devicegate mints).
        clock: returns the current Unix time; for tests.

    Raises:
        ConfigError: ``retention`` is not a positive number.
    """

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _is_number(retention) or retention <= 0:
            raise ConfigError(
                "retention", f"must be a positive number of seconds, got {retention!r}"
            )
        self._retention = float(retention)
        self._clock = clock
        # jti -> (revoked at, when to forget it), in that order; device or subject -> (before,
        # when to forget it).
        self._tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._devices: dict[str, tuple[float, float]] = {}
        self._subjects: dict[str, tuple[float, float]] = {}
        self._all: tuple[float, float] | None = None
        self._next_sweep = 0.0
        # Writes may come from more than one thread (a shared store's replica is fed by a
        # background thread); reads take no lock and see each entry whole or not at all.
        self._lock = threading.Lock()
        self.version = 0

    def __repr__(self) -> str:
        return f"<RevocationList {len(self)} entries>"

    def __len__(self) -> int:
        return (
            len(self._tokens) + len(self._devices) + len(self._subjects) + (self._all is not None)
        )

    def is_revoked(self, claims: Mapping[str, Any], /) -> bool:
        jti = claims.get("jti")
        if jti is not None and jti in self._tokens:
            return True
        issued_at = claims.get("iat")
        if self._all is not None and _covers(self._all, issued_at):
            return True
        # One lookup each, never "in" then "[]": another thread may forget an entry in between.
        device = claims.get("instance_id")
        if type(device) is str:
            entry = self._devices.get(device)
            if entry is not None and _covers(entry, issued_at):
                return True
        subject = claims.get("sub")
        if type(subject) is str:
            entry = self._subjects.get(subject)
            if entry is not None and _covers(entry, issued_at):
                return True
        return False

    async def revoke_token(self, jti: str) -> None:
        """Revoke the one token whose ``jti`` claim is ``jti``."""
        self.record("jti", jti, self._now())

    async def revoke_device(self, instance_id: str, *, before: float | None = None) -> None:
        """Revoke every token bound to ``instance_id`` issued at or before ``before`` (now)."""
        self.record("instance_id", instance_id, self._before(before))

    async def revoke_subject(self, subject: str, *, before: float | None = None) -> None:
        """Revoke every token whose ``sub`` is ``subject`` issued at or before ``before`` (now)."""
        self.record("sub", subject, self._before(before))

    async def revoke_all(self, *, before: float | None = None) -> None:
        """Revoke every token issued at or before ``before`` (default: now)."""
        self.record("all", None, self._before(before))

    def record(self, kind: RevocationKind, name: str | None, cutoff: float) -> bool:
        """Add one entry as a replica receives it (what the ``revoke_*`` methods do, with the
        cutoff given rather than taken from the clock). Safe to call from any thread.

        An entry already past retention is ignored, and so is one that an entry held already
        covers (a later cutoff covers everything an earlier one did).

        Returns:
            whether the list changed (its :attr:`version` moved).

        Raises:
            ValueError: an unknown ``kind``, a ``name`` that is not a non-empty string (or not
                ``None`` for ``"all"``), or a ``cutoff`` that is not a finite Unix time.
        """
        if kind not in REVOCATION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(REVOCATION_KINDS)}")
        if kind == "all" and name is not None:
            raise ValueError("a revocation of every token must have no name")
        if kind != "all" and (not isinstance(name, str) or not name):
            raise ValueError(f"{kind} must be a non-empty string")
        if not _is_number(cutoff):
            raise ValueError("before must be a finite Unix time")
        now = self._now()
        cutoff = float(cutoff)
        until = cutoff + self._retention
        with self._lock:
            if until <= now:
                changed = False
            elif name is None:
                changed = self._all is None or self._all[0] < cutoff
                if changed:
                    self._all = (cutoff, until)
            elif kind == "jti":
                held = self._tokens.get(name)
                changed = held is None or held[0] < cutoff
                if changed:
                    # Kept in the order they were added, which is the order they expire in
                    # unless a replica brings an older one late: that one is forgotten late.
                    self._tokens[name] = (cutoff, until)
                    self._tokens.move_to_end(name)
            else:
                table = self._devices if kind == "instance_id" else self._subjects
                held = table.get(name)
                # A later cutoff covers everything an earlier one did; an earlier one adds
                # nothing.
                changed = held is None or held[0] < cutoff
                if changed:
                    table[name] = (cutoff, until)
            self._forget(now)
            if changed:
                self.version += 1
        return changed

    def entries(self) -> list[RevocationEntry]:
        """Every entry held, as ``(kind, name, cutoff)``: what a shared store copies back when
        it lost its own."""
        now = self._now()
        found: list[RevocationEntry] = []
        with self._lock:
            for kind, table in (
                ("jti", self._tokens),
                ("instance_id", self._devices),
                ("sub", self._subjects),
            ):
                found += [
                    (kind, name, cutoff)  # type: ignore[misc]
                    for name, (cutoff, until) in table.items()
                    if until > now
                ]
            if self._all is not None and self._all[1] > now:
                found.append(("all", None, self._all[0]))
        return found

    def _now(self) -> float:
        now = self._clock()
        if not _is_number(now):
            raise ValueError("the clock returned no usable time")
        return float(now)

    def _before(self, before: float | None) -> float:
        if before is None:
            return self._now()
        if not _is_number(before):
            raise ValueError("before must be a finite Unix time")
        return float(before)

    def _forget(self, now: float) -> None:
        """Forget what can no longer cover a valid token (the caller holds the lock)."""
        tokens = self._tokens
        # Held in the order they expire: the oldest first, each forgotten in constant time.
        while tokens:
            jti, (_, until) = next(iter(tokens.items()))
            if until > now:
                break
            del tokens[jti]
        if now >= self._next_sweep:
            # Cutoffs come in any order: these tables are swept whole, at most once a minute.
            self._next_sweep = now + _SWEEP_SECONDS
            for table in (self._devices, self._subjects):
                for name in [name for name, (_, until) in table.items() if until <= now]:
                    del table[name]
            if self._all is not None and self._all[1] <= now:
                self._all = None


def _covers(entry: tuple[float, float], issued_at: object) -> bool:
    """Whether a revocation ``(before, _)`` covers a token issued at ``issued_at``."""
    # No iat: nothing says the token was minted after the cutoff, so it is covered.
    return not _is_number(issued_at) or issued_at <= entry[0]  # type: ignore[operator]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
