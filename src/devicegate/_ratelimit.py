"""Rate limits: tokens minted per server key and per device, failed authentications per address.

The counting is the ``limits`` library's (the ``ratelimit`` extra), with its sliding window
counter: two counters per limited thing, whatever the limit, and no burst of twice the limit
across a window boundary as a fixed window allows. Its storage is memory by default, or a
Redis every instance shares (``redis://...``), so that a limit is one limit across instances.

Only requests that are already slow pay: minting, and refusals. An address over its limit of
failed authentications is remembered here, in memory, until its window lets it in again, and
every request it sends that needs a credential is answered 429 from that memory: an admitted
request never waits on the storage. With a shared storage, the instance that counts the
failure over the limit blocks the address; the others do when they next refuse it.

A storage that cannot be reached fails closed where it decides something (minting is refused
with 503) and is logged where it only counts (a refusal stays a refusal).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._errors import ConfigError, InvalidReason, InvalidToken, Refusal

if TYPE_CHECKING:
    from limits import RateLimitItem

    from ._config import GateConfig

__all__ = ["RateLimiter", "check_limit", "too_many"]

logger = logging.getLogger("devicegate")

RATELIMIT_EXTRA_HINT = "pip install 'devicegate[ratelimit]'"
# Addresses remembered as over their limit at most; beyond, the ones whose time is up go first,
# then all of them (a flood of addresses costs counting, never unbounded memory).
MAX_BLOCKED_ADDRESSES = 10_000
# The namespaces of what is counted, so that a key name and a device id never share a count.
_KEY, _DEVICE, _ADDRESS = "mint-key", "mint-device", "failed-auth"
# Server keys without a name share one count.
_UNNAMED = "(unnamed)"


# The failed authentications counted per address: a credential that was never good here, as
# guessing and forging produce. An expired or revoked token is the normal end of a good one;
# counted, one device holding on to it could block every device behind the same address.
COUNTED_FAILURES = frozenset(InvalidReason) - {
    InvalidReason.EXPIRED,
    InvalidReason.NOT_YET_VALID,
    InvalidReason.ISSUED_IN_FUTURE,
    InvalidReason.REVOKED,
    InvalidReason.BAD_CLOCK,
    InvalidReason.NOT_CONFIGURED,
}


def counts_as_failure(error: Refusal) -> bool:
    """Whether ``error`` is a failed authentication the per-address limit counts."""
    return isinstance(error, InvalidToken) and error.reason in COUNTED_FAILURES


def check_limit(field: str, value: object) -> str | None:
    """``value`` if it is one limit in the ``limits`` notation (``"10/minute"``), or None.

    Raises:
        ConfigError: naming ``field``, for anything else, or without the ``limits`` library.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(field, "must be a limit such as '10/minute', or None")
    _parse(field, value)
    return value


def _parse(field: str, value: str) -> RateLimitItem:
    try:
        import limits
    except ImportError:
        raise ConfigError(
            field, f"rate limits need the limits library: {RATELIMIT_EXTRA_HINT}"
        ) from None
    try:
        items = limits.parse_many(value)
    except ValueError:
        items = []
    if len(items) != 1:  # limits.parse would quietly keep the first of "1/second;5/minute"
        raise ConfigError(
            field, f"must be one limit such as '10/minute' or '600/hour', got {value!r}"
        )
    (item,) = items
    if item.amount < 1:
        raise ConfigError(field, f"must allow at least one, got {value!r}")
    return item


def too_many(retry_after: float, description: str) -> Refusal:
    """429 with ``Retry-After`` in whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return Refusal(
        description,
        status_code=429,
        error="slow_down",
        headers=[(b"retry-after", str(seconds).encode())],
    )


def _unavailable() -> Refusal:
    return Refusal(
        "The rate limits cannot be checked right now.",
        status_code=503,
        error="temporarily_unavailable",
        headers=[(b"retry-after", b"5")],
    )


class RateLimiter:
    """The limits of a :class:`~devicegate.GateConfig`, counted in one storage.

    Args:
        config: its ``mint_limit_per_key``, ``mint_limit_per_device`` and
            ``failure_limit_per_address``.
        storage: a ``limits`` storage URI: ``memory://`` (the default) or
            ``redis://[:password@]host[:port][/db]`` (needs the ``redis`` extra too).
        clock: a monotonic clock in seconds, for the memory of blocked addresses; for tests.

    Raises:
        ConfigError: the storage URI is not one ``limits`` knows.
    """

    def __init__(
        self,
        config: GateConfig,
        storage: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = _item("mint_limit_per_key", config.mint_limit_per_key)
        self.per_device = _item("mint_limit_per_device", config.mint_limit_per_device)
        self.per_address = _item("failure_limit_per_address", config.failure_limit_per_address)
        self.storage_uri = storage or "memory://"
        self.blocked: dict[str, float] = {}
        """Addresses over their limit of failed authentications, and until when (``clock``)."""
        self._clock = clock
        self._limiter: Any = None
        self._in_thread = False
        if self.active:
            self._limiter, self._in_thread = _limiter(self.storage_uri)

    def __repr__(self) -> str:
        # The URI may hold a Redis password: only its scheme is shown.
        scheme = self.storage_uri.partition(":")[0]
        return (
            f"<RateLimiter per_key={self.per_key} per_device={self.per_device} "
            f"per_address={self.per_address} storage={scheme}>"
        )

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(item is not None for item in (self.per_key, self.per_device, self.per_address))

    def same_as(self, config: GateConfig, storage: str | None) -> bool:
        """Whether ``config`` and ``storage`` would build this limiter again (then its counts
        are kept across a reconfiguration)."""
        return (
            (storage or "memory://") == self.storage_uri
            and str(self.per_key) == str(_item("", config.mint_limit_per_key))
            and str(self.per_device) == str(_item("", config.mint_limit_per_device))
            and str(self.per_address) == str(_item("", config.failure_limit_per_address))
        )

    async def check_mint(self, key_name: str | None, instance_id: str | None) -> None:
        """Count one token minted with the server key ``key_name`` for ``instance_id``.

        Raises:
            Refusal: 429 with ``Retry-After`` over a limit (nothing is minted), or 503 when
                the storage cannot be reached.
        """
        if self.per_key is not None:
            wait = await self._hit(self.per_key, _KEY, key_name or _UNNAMED)
            if wait is not None:
                raise too_many(wait, "Too many tokens minted with this key; retry later.")
        if self.per_device is not None and instance_id is not None:
            wait = await self._hit(self.per_device, _DEVICE, instance_id)
            if wait is not None:
                raise too_many(wait, "Too many tokens minted for this device; retry later.")

    async def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``; over the limit, remember the
        address as blocked until its window lets it in again. Never raises."""
        if self.per_address is None:
            return
        try:
            wait = await self._hit(self.per_address, _ADDRESS, address)
        except Refusal:
            return  # logged; the request is refused anyway
        if wait is None:
            return
        blocked = self.blocked
        now = self._clock()
        if address not in blocked and len(blocked) >= MAX_BLOCKED_ADDRESSES:
            for stale in [name for name, until in blocked.items() if until <= now]:
                del blocked[stale]
            if len(blocked) >= MAX_BLOCKED_ADDRESSES:
                blocked.clear()
        blocked[address] = now + wait

    def refuse_blocked(self, address: str) -> None:
        """Raise 429 if ``address`` is over its limit of failed authentications.

        Raises:
            Refusal: 429 with ``Retry-After``.
        """
        until = self.blocked.get(address)
        if until is None:
            return
        wait = until - self._clock()
        if wait <= 0:
            self.blocked.pop(address, None)
            return
        raise too_many(wait, "Too many failed authentications from this address; retry later.")

    async def _hit(self, item: RateLimitItem, *identifiers: str) -> float | None:
        """Count one; ``None`` within the limit, else the seconds until one more is allowed.

        Raises:
            Refusal: 503, the storage cannot be reached.
        """
        limiter = self._limiter

        def hit() -> float | None:
            if limiter.hit(item, *identifiers):
                return None
            reset_at: float = limiter.get_window_stats(item, *identifiers).reset_time
            return max(1.0, reset_at - time.time())

        try:
            if self._in_thread:
                # A network storage blocks: a worker thread keeps the event loop (asyncio or
                # trio) free, as the Redis revocation list does.
                return await anyio.to_thread.run_sync(hit)
            return hit()
        except Exception as exc:
            logger.error(
                "devicegate could not reach the rate-limit storage (%s)", type(exc).__name__
            )
            raise _unavailable() from None


def _item(field: str, value: str | None) -> RateLimitItem | None:
    return None if value is None else _parse(field, value)


def _limiter(uri: str) -> tuple[Any, bool]:
    from limits.storage import MemoryStorage, storage_from_string
    from limits.strategies import SlidingWindowCounterRateLimiter

    try:
        storage = storage_from_string(uri)
    except Exception as exc:
        # The message may quote the URI, password included: only the kind of failure is said.
        raise ConfigError(
            "rate_limit_storage",
            f"is not a storage the limits library can open ({type(exc).__name__}); use "
            "memory:// or redis://host:port/db (with the redis extra)",
        ) from None
    return SlidingWindowCounterRateLimiter(storage), not isinstance(storage, MemoryStorage)
