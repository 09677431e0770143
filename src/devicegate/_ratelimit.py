"""Rate limits: tokens minted per server key and per device, failed authentications per address.

The counting is the ``limits`` library's (the ``ratelimit`` extra), with its sliding window
counter: two counters per limited thing, whatever the limit, and no burst of twice the limit
across a window boundary as a fixed window allows. Its storage is memory by default, or a
Redis every instance shares (``redis://...``), so that a limit is one limit across instances.

Only requests that are already slow pay: minting, and refusals. An address over its limit of
failed authentications is remembered here, in memory, until its window lets it in again; while
it is, the middleware admits from it only credentials that need no new verification work (a
key, a token already verified), so that a guesser costs nothing and its neighbours behind one
NAT go on. An admitted request never waits on the storage. With a shared storage, the instance
that counts the failure over the limit blocks the address; the others do when they next
refuse it.

A storage that cannot be reached fails closed where it decides something (minting is refused
with 503) and is skipped where it only counts (a refusal stays a refusal).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from ._bounded import drop_expired
from ._errors import ConfigError, InvalidReason, InvalidToken, Refusal, unavailable

if TYPE_CHECKING:
    from limits import RateLimitItem

    from ._config import GateConfig

__all__ = ["RateLimiter", "address_group", "blocked_refusal", "check_limit", "too_many"]

logger = logging.getLogger("devicegate")

T = TypeVar("T")
_NO_LIMITS = {
    "mint_limit_per_key": None,
    "mint_limit_per_device": None,
    "failure_limit_per_address": None,
}

RATELIMIT_EXTRA_HINT = "pip install 'devicegate[ratelimit]'"
# Addresses remembered as over their limit at most; beyond, the ones whose time is up go first,
# then all of them (a flood of addresses costs counting, never unbounded memory).
MAX_BLOCKED_ADDRESSES = 10_000
# "255.255.255.255": a client address without a colon and no longer is taken as the IPv4 address
# it is, unparsed (it may be asked for on every request while an address is blocked); a longer
# one is no address.
_LONGEST_IPV4 = 15
_FIRST_64_BITS = ((1 << 64) - 1) << 64
_NAT64_PREFIX = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
# The namespaces of what is counted, so that a key name and a device id never share a count.
_KEY, _DEVICE, _ADDRESS = "mint-key", "mint-device", "failed-auth"
# A network storage is asked from at most this many threads of devicegate's own, each wait
# bounded by the timeout.
_STORAGE_THREADS = 4
STORAGE_TIMEOUT_SECONDS = 1.0


# The failed authentications counted per address: a credential that does not verify here, as
# guessing and forging produce (and, alas, a retired key). An expired or revoked token is the
# normal end of a good one; counted, one device holding on to it would block the rest of its
# NAT from new tokens.
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
    return unavailable("The rate limits cannot be checked right now.", 5)


class RateLimiter:
    """The limits of a :class:`~devicegate.GateConfig`, counted in one storage.

    Args:
        config: its ``mint_limit_per_key``, ``mint_limit_per_device`` and
            ``failure_limit_per_address``.
        storage: a ``limits`` storage URI: ``memory://`` (the default) or
            ``redis://[:password@]host[:port][/db]`` (``rediss://`` and ``unix://`` too; needs
            the ``redis`` extra).
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
        self.storage_uri = storage or "memory://"
        self.blocked: dict[str, float] = {}
        """Address groups over their limit of failed authentications (an IPv4 address, an
        IPv6 /64), and until when (``clock``)."""
        self._clock = clock
        self.per_key = _item("mint_limit_per_key", config.mint_limit_per_key)
        self.per_device = _item("mint_limit_per_device", config.mint_limit_per_device)
        self.per_address = _item("failure_limit_per_address", config.failure_limit_per_address)
        self._counter = _Counter(self.storage_uri) if self.active else None

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

    def reconfigured(self, config: GateConfig, storage: str | None) -> RateLimiter:
        """The limiter for ``config``: this one with its limits changed when ``storage`` is
        the same (counts, blocked addresses and connections are kept), else a new one.

        Raises:
            ConfigError: as the constructor.
        """
        if (storage or "memory://") != self.storage_uri:
            return RateLimiter(config, storage, clock=self._clock)
        # Built without a storage, then given this one's: nothing changes here, so that the
        # configuration in force keeps its limiter whole if the new one is refused later.
        new = RateLimiter(config.replace(**_NO_LIMITS), storage, clock=self._clock)
        new.per_key = _item("mint_limit_per_key", config.mint_limit_per_key)
        new.per_device = _item("mint_limit_per_device", config.mint_limit_per_device)
        new.per_address = _item("failure_limit_per_address", config.failure_limit_per_address)
        new.blocked = self.blocked
        new._counter = self._counter
        if new.active and new._counter is None:
            new._counter = _Counter(new.storage_uri)
        return new

    async def check_mint(self, key_name: str | None, instance_id: str | None) -> None:
        """Count one token minted with the server key ``key_name`` for ``instance_id``: both
        limits are tested first, and charged only when both allow it, so that a refused mint
        uses up nothing (under concurrency a limit may be passed by the few requests tested
        at the same moment).

        Raises:
            Refusal: 429 with ``Retry-After`` over a limit (mint nothing then), or 503 when the
                storage cannot be reached.
        """
        checks: list[tuple[RateLimitItem, tuple[str, ...], str]] = []
        if self.per_key is not None:
            # Named keys count apart; every unnamed key shares one count. The number of parts
            # keeps a name from ever meaning the unnamed keys.
            who = (_KEY, "unnamed") if key_name is None else (_KEY, "named", key_name)
            checks.append((self.per_key, who, "Too many tokens minted with this key"))
        if self.per_device is not None and instance_id is not None:
            checks.append(
                (self.per_device, (_DEVICE, instance_id), "Too many tokens minted for this device")
            )
        if not checks or self._counter is None:
            return
        refused = await self._counter.run(_test_then_hit, checks)
        if refused is not None:
            wait, description = refused
            raise too_many(wait, f"{description}; retry later.")

    async def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``; over the limit, remember the
        address as blocked until its window lets it in again. Never raises, and never waits
        on a storage that is slow: the count is then skipped (the request is refused anyway)."""
        if self.per_address is None or self._counter is None:
            return
        group = address_group(address)
        try:
            refused = await self._counter.run(
                _test_then_hit, [(self.per_address, (_ADDRESS, group), "")], wait=False
            )
        except Refusal:
            return  # the storage is down or busy: logged once
        if refused is None:
            return
        blocked = self.blocked
        now = self._clock()
        if group not in blocked and len(blocked) >= MAX_BLOCKED_ADDRESSES:
            drop_expired(blocked, now)
            if len(blocked) >= MAX_BLOCKED_ADDRESSES:
                return  # full of live blocks: keep them rather than lift them all
        blocked[group] = now + refused[0]

    def blocked_for(self, address: str) -> float | None:
        """The seconds ``address`` stays blocked for its failed authentications, or ``None``."""
        group = address_group(address)
        until = self.blocked.get(group)
        if until is None:
            return None
        wait = until - self._clock()
        if wait <= 0:
            self.blocked.pop(group, None)
            return None
        return wait


def blocked_refusal(wait: float) -> Refusal:
    """The answer to a blocked address whose credential is not one known good already."""
    return too_many(wait, "Too many failed authentications from this address; retry later.")


def address_group(address: str) -> str:
    """What the failure limit counts by: an IPv4 address (given as such, or within an IPv6 one
    that stands for it), or the /64 of an IPv6 one (one subscriber's network; counting each
    /128 would let one client be 2**64 clients). Anything else (a forwarded-for value trusted
    from anyone, say) is counted by a digest of it, so that its length costs no memory."""
    if ":" not in address:
        if len(address) <= _LONGEST_IPV4:
            return address
        return _digest(address)
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return _digest(address)
    ipv4 = _embedded_ipv4(ip)
    if ipv4 is not None:
        return str(ipv4)
    # The /64 from the address's number: a network built from the text would parse it again.
    return f"{ipaddress.IPv6Address(int(ip) & _FIRST_64_BITS)}/64"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client an IPv6 address stands for, if any: counted by its /64, every such client
    of one scheme would be one client (or, for 6to4, each one 65,536 clients)."""
    if ip.ipv4_mapped is not None:  # "::ffff:192.0.2.1": a server listening on "::"
        return ip.ipv4_mapped
    if int(ip) >> 32 == _NAT64_PREFIX:  # "64:ff9b::192.0.2.1": translated (RFC 6052)
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip.sixtofour is not None:  # "2002:c000:0201::/48": a 6to4 site (RFC 3056)
        return ip.sixtofour
    if ip.teredo is not None:  # "2001:0::/32": a Teredo client, by its own address (RFC 4380)
        return ip.teredo[1]
    return None


def _digest(address: str) -> str:
    digest = hashlib.blake2b(address.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"#{digest.hexdigest()}"


Check = tuple["RateLimitItem", tuple[str, ...], str]


def _test_then_hit(limiter: Any, checks: list[Check]) -> tuple[float, str] | None:
    """``None`` when every limit allows one more (then each is charged one), else the seconds
    until the first that refuses allows one, and its description."""
    for item, identifiers, description in checks:
        if not limiter.test(item, *identifiers):
            reset_at: float = limiter.get_window_stats(item, *identifiers).reset_time
            return max(1.0, reset_at - time.time()), description
    for item, identifiers, _ in checks:
        limiter.hit(item, *identifiers)
    return None


class _Counter:
    """The ``limits`` limiter on one storage, and how it is called: directly in memory, from a
    few worker threads of its own for a network storage (a blocking client must not hold the
    event loop, asyncio or trio, nor the threads the app's own sync code runs in)."""

    def __init__(self, uri: str) -> None:
        self.limiter, self.in_thread = _limiter(uri)
        self._threads = anyio.CapacityLimiter(_STORAGE_THREADS)
        self._down = False

    async def run(
        self, call: Callable[[Any, list[Check]], T], checks: list[Check], *, wait: bool = True
    ) -> T:
        """``call(limiter, checks)``; without ``wait``, refuse at once rather than queue for a
        thread.

        Raises:
            Refusal: 503, the storage cannot be reached (or, without ``wait``, is busy).
        """
        try:
            if not self.in_thread:
                result = call(self.limiter, checks)
            elif not wait and self._threads.available_tokens < 1:
                raise _unavailable()
            else:
                result = await anyio.to_thread.run_sync(
                    call, self.limiter, checks, limiter=self._threads
                )
        except Refusal:
            raise
        except Exception as exc:
            if not self._down:  # once per outage, not once per request
                self._down = True
                logger.error(
                    "devicegate cannot reach the rate-limit storage (%s); minting is refused "
                    "until it answers",
                    type(exc).__name__,
                )
            raise _unavailable() from None
        if self._down:
            self._down = False
            logger.info("devicegate reaches the rate-limit storage again")
        return result


def _item(field: str, value: str | None) -> RateLimitItem | None:
    return None if value is None else _parse(field, value)


def _limiter(uri: str) -> tuple[Any, bool]:
    from limits.storage import MemoryStorage, storage_from_string
    from limits.strategies import SlidingWindowCounterRateLimiter

    options: dict[str, Any] = {}
    if uri.startswith(("redis://", "rediss://", "unix://")):
        # The same URLs the revocation store takes (limits spells a socket redis+unix://),
        # and bounded waits: a hung Redis must not hold a thread for ever.
        if uri.startswith("unix://"):
            uri = "redis+" + uri
        options = {
            "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
        }
    try:
        storage = storage_from_string(uri, **options)
    except Exception as exc:
        # The message may quote the URI, password included: only the kind of failure is said.
        raise ConfigError(
            "rate_limit_storage",
            f"is not a storage the limits library can open ({type(exc).__name__}); use "
            "memory:// or redis://host:port/db (with the redis extra)",
        ) from None
    return SlidingWindowCounterRateLimiter(storage), not isinstance(storage, MemoryStorage)
