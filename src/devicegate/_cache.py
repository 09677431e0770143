"""The verified-token cache: what a request needs to decide a token again without its signature.

The request path looks a token up here on every request, so the seam is small and synchronous:
:class:`TokenCache` is a protocol of five methods, and :class:`MemoryTokenCache`, the default,
answers them from a bounded dictionary in memory. A cache never decides anything itself: the
verifier stores only tokens it verified, and re-checks the clock, the revocations and the device
header on every hit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Protocol, runtime_checkable

from ._errors import ConfigError
from ._principal import Principal

__all__ = ["CachedToken", "MemoryTokenCache", "TokenCache"]


class CachedToken(NamedTuple):
    """What a cache hit needs to decide a token again without touching its signature."""

    expires_at: float
    """``exp`` plus the leeway: refused at or after this instant."""
    valid_from: float
    """``max(nbf, iat)`` minus the leeway: refused before this instant."""
    bound: bytes | None
    """The ``instance_id`` the device header must equal, as bytes; ``None`` for a generic token."""
    principal: Principal
    """The principal every admitted request with this token gets."""
    revocations_version: int
    """The :attr:`~devicegate.RevocationCheck.version` the token was last checked against."""


@runtime_checkable
class TokenCache(Protocol):
    """Where a :class:`~devicegate.TokenVerifier` remembers the tokens it verified.

    Every method is called on the request path and must not block: keep what is needed in
    memory. ``get`` and ``put`` may be called from several threads at once (a synchronous view
    verifying in a worker thread); an implementation must stay consistent, and may forget an
    entry at any time.
    """

    def get(self, token: bytes, /) -> CachedToken | None:
        """The entry for ``token``, or ``None``."""

    def put(self, token: bytes, entry: CachedToken, /) -> None:
        """Remember ``entry`` for ``token``, forgetting others if the cache is full."""

    def discard(self, token: bytes, /) -> None:
        """Forget ``token`` if it is remembered."""

    def clear(self) -> None:
        """Forget every token."""

    def __len__(self) -> int:
        """How many tokens are remembered."""


class MemoryTokenCache:
    """A bounded :class:`TokenCache` in memory, forgetting the longest-held token first.

    First in, first out rather than least recently used: device tokens are short-lived, so the
    token held longest is the one closest to its expiry, and a hit costs one dictionary lookup
    with no reordering. Only verified tokens enter (a flood of junk tokens never reaches the
    cache), so the bound is what a caller able to mint tokens could fill.

    Args:
        max_size: how many tokens to hold (0: none; every token is verified in full).

    Raises:
        ConfigError: ``max_size`` is not a non-negative integer.
    """

    __slots__ = ("_entries", "get", "max_size")

    def __init__(self, max_size: int) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ConfigError("token_cache_size", f"must be an integer >= 0, got {max_size!r}")
        self.max_size = max_size
        self._entries: OrderedDict[bytes, CachedToken] = OrderedDict()
        # The dictionary's own lookup, bound once: a hit costs no Python-level call.
        self.get = self._entries.get

    def __repr__(self) -> str:
        return f"<MemoryTokenCache {len(self._entries)}/{self.max_size}>"

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, token: bytes, entry: CachedToken, /) -> None:
        if not self.max_size:
            return
        entries = self._entries
        entries[token] = entry
        if len(entries) > self.max_size:
            # try/except, not contextlib.suppress: free when nothing is raised.
            try:  # noqa: SIM105
                entries.popitem(last=False)
            except KeyError:  # emptied meanwhile by clear() in another thread
                pass

    def discard(self, token: bytes, /) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        self._entries.clear()
