"""RedisRevocationList: revocations every instance sees, through Redis, read from memory.

Each instance keeps a local replica (a :class:`~devicegate.RevocationList`) that the request path
reads; a background thread keeps it in step with Redis:

* a revocation is written to one sorted set and published on one channel, atomically (one Lua
  script); every instance's thread is subscribed and applies it to its replica on arrival;
* on every (re)connection the thread subscribes first, then reads the whole set (a full resync:
  nothing published while it was cut off is missed) and writes back what its replica holds and
  Redis lacks: a Redis that came back empty is re-seeded by the instances that remember;
* every ``staleness / 4`` seconds (at most one) it checks the epoch key (gone or changed: Redis
  lost its data, resync) and sends a ``PING`` down the subscription; the answer proves that every
  message published before it was received. That moment is the replica's freshness.

When freshness is older than ``staleness``, :meth:`RedisRevocationList.is_revoked` refuses every
token that its replica does not already refuse with a 503 and ``Retry-After``
(fail closed), unless ``fail_open=True``.

Layout in Redis, with the default prefix ``devicegate``::

    devicegate:revocations        sorted set: member "<kind>:<name>" ("jti:...",
                                  "instance_id:...", "sub:...") or "all"; score: the cutoff
                                  (``before``, or the time of revocation for a jti). The key
                                  expires ``retention`` after its highest score.
    devicegate:revocations:epoch  string: a random marker, set when the set was (re)started
    channel devicegate:revocations  one JSON message per revocation:
                                  {"entry": "instance_id:device-123", "cutoff": 1700000000.0}

References:
    https://redis.io/docs/latest/develop/interact/pubsub/ (delivery: at most once, hence resync)
    https://redis.io/docs/latest/commands/ping/ (PING in subscribed mode)
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread

from ._errors import ConfigError, unavailable
from ._revocation import (
    DEFAULT_RETENTION_SECONDS,
    REVOCATION_KINDS,
    RevocationEntry,
    RevocationKind,
    RevocationList,
    RevocationState,
)

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra only
    raise ModuleNotFoundError(
        "devicegate.redis needs the 'redis' package: pip install 'devicegate[redis]'"
    ) from exc

__all__ = [
    "DEFAULT_STALENESS_SECONDS",
    "RedisRevocationList",
    "RevocationState",
]

logger = logging.getLogger("devicegate.redis")

DEFAULT_STALENESS_SECONDS = 5.0
DEFAULT_SOCKET_TIMEOUT_SECONDS = 1.0
DEFAULT_PREFIX = "devicegate"
_MIN_BACKOFF_SECONDS = 0.05
_MAX_BACKOFF_SECONDS = 2.0
_MAX_HEARTBEAT_SECONDS = 1.0
# How long the thread waits for a message before it looks at the clock and its stop flag.
_POLL_SECONDS = 0.05

UNAVAILABLE = "Revocations cannot be confirmed right now; try again shortly."
"""The description of the 503 sent while the replica is stale (fail closed)."""
NOT_SHARED = (
    "The revocation holds on this instance but could not be shared yet; send it again shortly."
)
"""The description of the 503 a revocation gets when Redis could not be written."""

# Insert or raise one entry's cutoff, forget what is past retention, keep the key only as long
# as its newest entry matters, and tell every instance: atomically, in one round trip.
_WRITE = """
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not held) or tonumber(held) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
local retention = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[3]) - retention))
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] then
  redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(newest[2]) + retention))
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""


class RedisRevocationList:
    """Revocations shared by every instance through Redis; a
    :class:`~devicegate.RevocationStore` the request path reads from memory.

    A revocation written through any instance reaches every other instance's replica as soon
    as Redis delivers the message (milliseconds), and an instance that was cut off catches up
    in full when it reconnects. Construction starts a background thread (and no connection is
    made on the caller's thread): call :meth:`close` (or use the store as a context manager)
    when done; :meth:`wait_fresh` waits for the first synchronisation.

    While the replica cannot be confirmed in step with Redis for ``staleness`` seconds,
    :meth:`is_revoked` raises a 503 :class:`~devicegate.Refusal` with ``Retry-After`` for every
    token the replica does not already refuse, and :attr:`version` moves so that cached tokens
    are asked too. Recovery is automatic.

    Every instance must use the same ``retention`` and ``prefix``, and clocks kept in step
    (NTP): cutoffs are Unix times.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` or
            ``unix:///path``. Never logged.
        staleness: seconds the replica may go unconfirmed before tokens are refused.
        fail_open: admit tokens (on the replica's word) while not fresh. Each instance then
            says so in its log and its :attr:`state`; a revocation made meanwhile may be
            missed until Redis returns.
        prefix: the start of every key and channel name.
        retention: seconds an entry is kept, as for :class:`~devicegate.RevocationList`.
        socket_timeout: seconds any one Redis operation may take; at most half of
            ``staleness``.
        clock: returns the current Unix time; for tests.

    Raises:
        ConfigError: an option out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        staleness: float = DEFAULT_STALENESS_SECONDS,
        fail_open: bool = False,
        prefix: str = DEFAULT_PREFIX,
        retention: float = DEFAULT_RETENTION_SECONDS,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("url", "must be a redis://, rediss:// or unix:// URL")
        if not _is_positive(staleness):
            raise ConfigError(
                "staleness", f"must be a positive number of seconds, got {staleness!r}"
            )
        if not _is_positive(socket_timeout) or socket_timeout > staleness / 2:
            raise ConfigError(
                "socket_timeout",
                f"must be a positive number of seconds, at most half of staleness ({staleness}), "
                f"got {socket_timeout!r}",
            )
        if not isinstance(fail_open, bool):
            raise ConfigError("fail_open", f"must be True or False, got {fail_open!r}")
        if not isinstance(prefix, str) or not prefix.isprintable() or not prefix.strip() == prefix:
            raise ConfigError("prefix", "must be printable text without surrounding spaces")
        self._replica = RevocationList(retention=retention, clock=clock)
        self._retention = float(retention)
        self._clock = clock
        self._staleness = float(staleness)
        self._fail_open = fail_open
        self._socket_timeout = float(socket_timeout)
        self._heartbeat = min(self._staleness / 4, _MAX_HEARTBEAT_SECONDS)
        self._retry_after = max(1, math.ceil(self._staleness))
        self.key = f"{prefix}:revocations"
        self.epoch_key = f"{prefix}:revocations:epoch"
        self.channel = f"{prefix}:revocations"
        options: dict[str, Any] = {
            "socket_timeout": self._socket_timeout,
            "socket_connect_timeout": self._socket_timeout,
            # Our thread reconnects, with backoff and a full resync: the client must not
            # reconnect behind its back (a silent resubscription would miss messages).
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        try:
            # Writes, from worker threads (the pool is thread-safe); the listener thread has a
            # client of its own, so that a slow write never delays a message.
            self._writer = redis.Redis.from_url(url, **options)
            self._reader = redis.Redis.from_url(url, **options)
        except ValueError:
            # The message may quote the URL, and with it a password.
            raise ConfigError("url", "is not a Redis URL this client can use") from None
        self._write_script = self._writer.register_script(_WRITE)
        self._reseed_script = self._reader.register_script(_WRITE)
        # Monotonic time of the last confirmation, and until when it keeps the replica fresh
        # (read on the request path, without a lock: a float is replaced whole).
        self._confirmed_at = -math.inf
        self._fresh_until = -math.inf
        self._confirmed_wall: float | None = None
        self._epoch: bytes | None = None
        self._connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="devicegate-redis-revocations", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        state = "fresh" if self.fresh else "stale"
        return f"<RedisRevocationList {self.key!r} {len(self._replica)} entries, {state}>"

    def __len__(self) -> int:
        return len(self._replica)

    # -- the request path: memory only ----------------------------------------------------------

    @property
    def fresh(self) -> bool:
        """Whether the replica was confirmed in step with Redis within ``staleness`` seconds."""
        return time.monotonic() <= self._fresh_until

    @property
    def version(self) -> int:
        # Read on every cached token: one clock read and one comparison, no call besides.
        version: int = self._replica.version
        # A stale view answers otherwise than a fresh one (a refusal, or a fail-open admission
        # to ask about again): its versions are the negative ones, so each flip moves it.
        return version if time.monotonic() <= self._fresh_until else -1 - version

    def is_revoked(self, claims: Mapping[str, Any], /) -> bool:
        if self._replica.is_revoked(claims):
            return True
        if not self._fail_open and not self.fresh:
            raise unavailable(UNAVAILABLE, self._retry_after)
        return False

    @property
    def state(self) -> RevocationState:
        """Freshness, last synchronisation and size, for a health endpoint."""
        return RevocationState(
            fresh=self.fresh,
            last_sync=self._confirmed_wall,
            entries=len(self._replica),
            fail_open=self._fail_open,
        )

    async def wait_fresh(self) -> None:
        """Return once the replica is fresh (bound the wait with ``anyio.fail_after``)."""
        # Freshness is set by a thread and lapses with the clock alone: nothing to wait on.
        while not self.fresh:  # noqa: ASYNC110
            await anyio.sleep(0.01)

    # -- writing ---------------------------------------------------------------------------------

    async def revoke_token(self, jti: str) -> None:
        """Revoke the one token whose ``jti`` claim is ``jti``, on every instance.

        Raises:
            Refusal: 503, Redis could not be written; the revocation holds on this instance
                and is shared when Redis returns (or this instance stops), so send it again.
        """
        await self._revoke("jti", jti, None)

    async def revoke_device(self, instance_id: str, *, before: float | None = None) -> None:
        """Revoke every token bound to ``instance_id`` issued at or before ``before`` (now)."""
        await self._revoke("instance_id", instance_id, before)

    async def revoke_subject(self, subject: str, *, before: float | None = None) -> None:
        """Revoke every token whose ``sub`` is ``subject`` issued at or before ``before`` (now)."""
        await self._revoke("sub", subject, before)

    async def revoke_all(self, *, before: float | None = None) -> None:
        """Revoke every token issued at or before ``before`` (default: now)."""
        await self._revoke("all", None, before)

    async def _revoke(self, kind: RevocationKind, name: str | None, before: float | None) -> None:
        cutoff = self._clock() if before is None else before
        # Here first, at once: this instance refuses the token even if Redis cannot be told.
        self._replica.record(kind, name, cutoff)  # raises ValueError for a bad name or time
        try:
            await anyio.to_thread.run_sync(self._write, (kind, name, float(cutoff)))
        except (redis.RedisError, OSError) as exc:
            logger.warning(
                "devicegate could not write a %s revocation to Redis (%s); it holds here and "
                "is shared on reconnection",
                kind,
                type(exc).__name__,
            )
            raise unavailable(NOT_SHARED, self._retry_after) from None

    def _write(self, entry: RevocationEntry) -> None:
        member, message = _encode(entry)
        self._write_script(
            keys=[self.key],
            args=[
                member,
                repr(entry[2]),
                repr(self._clock()),
                repr(self._retention),
                self.channel,
                message,
            ],
        )

    # -- stopping --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the background thread and close every connection. The store is stale
        afterwards: it refuses every token (unless ``fail_open``)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # Each step of the thread is bounded by socket_timeout; a resync by a few of them.
            self._thread.join(timeout=10 * self._socket_timeout + 1)
        self._confirmed_at = self._fresh_until = -math.inf
        self._writer.close()
        self._reader.close()

    async def aclose(self) -> None:
        """:meth:`close`, from async code, without blocking the event loop."""
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> RedisRevocationList:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisRevocationList:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the background thread -------------------------------------------------------------------

    def _run(self) -> None:
        delay = _MIN_BACKOFF_SECONDS
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.RedisError, OSError) as exc:
                self._lost(type(exc).__name__)
            except Exception:  # a bug here must not stop revocations silently: keep trying
                logger.exception("devicegate's Redis revocation thread failed; reconnecting")
                self._lost("an error")
            if self.fresh:
                delay = _MIN_BACKOFF_SECONDS  # it worked for a while: reconnect at once
            # Jitter, so that instances cut off together do not reconnect together.
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):  # noqa: S311 - not secret
                break
            delay = min(delay * 2, _MAX_BACKOFF_SECONDS)

    def _lost(self, why: str) -> None:
        if self._connected:
            self._connected = False
            if self._fail_open:
                logger.warning(
                    "devicegate lost contact with Redis (%s): admitting tokens without "
                    "confirming revocations (fail_open) until it returns",
                    why,
                )
            else:
                logger.warning(
                    "devicegate lost contact with Redis (%s): tokens are refused with 503 "
                    "after %s s unless it returns",
                    why,
                    self._staleness,
                )

    def _listen(self) -> None:
        """One connection's life: subscribe, resync, then apply messages and heartbeat until
        an error or :meth:`close`."""
        pubsub = self._reader.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.channel)
            deadline = time.monotonic() + self._socket_timeout
            while True:
                message = pubsub.get_message(timeout=_POLL_SECONDS)
                if message is not None and message["type"] == "subscribe":
                    break
                if time.monotonic() > deadline or self._stop.is_set():
                    raise redis.TimeoutError("no answer to SUBSCRIBE")
            # Subscribed before reading: whatever is published from now on arrives as a
            # message, and whatever was published before is in the set.
            self._resync()
            if not self._connected:
                self._connected = True
                logger.info("devicegate is in step with Redis (%d revocations)", len(self))
            ping: tuple[bytes, float] | None = None
            next_ping = time.monotonic() + self._heartbeat
            while not self._stop.is_set():
                now = time.monotonic()
                if ping is None and now >= next_ping:
                    if self._reader.get(self.epoch_key) != self._epoch:
                        # Redis lost its data (a restart without persistence, a failover, a
                        # flush) without this connection noticing: put ours back.
                        self._resync()
                    payload = secrets.token_hex(8).encode()
                    ping = (payload, time.monotonic())
                    pubsub.ping(payload.decode())
                    next_ping = ping[1] + self._heartbeat
                elif ping is not None and now - ping[1] > self._socket_timeout:
                    raise redis.TimeoutError("no answer to PING")
                message = pubsub.get_message(timeout=_POLL_SECONDS)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "message":
                    self._apply(message["data"])
                elif kind == "pong":
                    if ping is not None and message["data"] == ping[0]:
                        # Redis answers in order: every message published before the PING
                        # was sent has been applied.
                        self._confirm(ping[1])
                        ping = None
                elif kind == "subscribe":  # resubscribed: something may have been missed
                    self._resync()
        finally:
            pubsub.close()

    def _resync(self) -> None:
        """Read the whole set into the replica, and write back what Redis lacks."""
        started = time.monotonic()
        with self._reader.pipeline(transaction=True) as pipe:
            pipe.get(self.epoch_key)
            pipe.zrange(self.key, 0, -1, withscores=True)
            epoch, members = pipe.execute()
        if epoch is None:
            # A new Redis, or one that lost its data: start a new epoch, so that every
            # instance notices and writes back what it remembers.
            self._reader.set(self.epoch_key, secrets.token_hex(16), nx=True)
            epoch = self._reader.get(self.epoch_key)
            if len(self._replica):
                logger.warning(
                    "devicegate found Redis without its revocations; writing back the %d "
                    "this instance holds",
                    len(self._replica),
                )
        held: dict[tuple[str, str | None], float] = {}
        for member, cutoff in members:
            entry = _decode(member, cutoff)
            if entry is None:
                logger.warning("devicegate ignored an unreadable entry in Redis")
                continue
            held[entry[0], entry[1]] = entry[2]
            self._replica.record(*entry)
        missing = [
            entry
            for entry in self._replica.entries()
            if held.get((entry[0], entry[1]), -math.inf) < entry[2]
        ]
        if missing:
            with self._reader.pipeline(transaction=False) as pipe:
                now = repr(self._clock())
                for entry in missing:
                    member, message = _encode(entry)
                    self._reseed_script(
                        keys=[self.key],
                        args=[
                            member,
                            repr(entry[2]),
                            now,
                            repr(self._retention),
                            self.channel,
                            message,
                        ],
                        client=pipe,
                    )
                pipe.execute()
        self._epoch = epoch
        self._confirm(started)

    def _apply(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, (bytes, str)) else None
            entry = (
                _decode(message["entry"].encode(), message.get("cutoff"))
                if isinstance(message, dict) and isinstance(message.get("entry"), str)
                else None
            )
        except (ValueError, RecursionError):
            entry = None
        if entry is None:
            logger.warning("devicegate ignored an unreadable revocation message")
            return
        self._replica.record(*entry)

    def _confirm(self, as_of: float) -> None:
        if as_of > self._confirmed_at:
            self._confirmed_wall = self._clock() - (time.monotonic() - as_of)
            self._confirmed_at = as_of
            self._fresh_until = as_of + self._staleness


def _encode(entry: RevocationEntry) -> tuple[str, str]:
    """The sorted-set member and the channel message of ``entry``."""
    kind, name, cutoff = entry
    member = "all" if name is None else f"{kind}:{name}"
    return member, json.dumps({"entry": member, "cutoff": cutoff}, separators=(",", ":"))


def _decode(member: object, cutoff: object) -> RevocationEntry | None:
    """The entry a sorted-set member and score stand for, or ``None`` if they are not one."""
    if not isinstance(member, bytes) or not _is_number(cutoff):
        return None
    try:
        text = member.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text == "all":
        return ("all", None, float(cutoff))  # type: ignore[arg-type]
    prefix, _, name = text.partition(":")
    kind = _NAMED_KINDS.get(prefix)
    if kind is None or not name:
        return None
    return (kind, name, float(cutoff))  # type: ignore[arg-type]


_NAMED_KINDS: dict[str, RevocationKind] = {kind: kind for kind in REVOCATION_KINDS if kind != "all"}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive(value: object) -> bool:
    return _is_number(value) and value > 0  # type: ignore[operator]
