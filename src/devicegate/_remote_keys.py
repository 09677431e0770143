"""Keys from a remote JWK Set (``jwks_url``): tokens minted by another service.

A :class:`RemoteKeySet` keeps the last good set in memory and refreshes it from a worker
thread, so that verification (synchronous, on the event loop) never waits on the network and
works the same under asyncio and trio. The rules that keep a remote set from becoming an
attack surface (SECURITY.md, guarantee 14):

* only ``https://`` URLs, or ``http://`` on a loopback address (a sidecar on the same host);
  no redirects, no proxy from the environment;
* a bounded document (64 KiB), a bounded fetch (5 s);
* only public Ed25519 and P-256 keys with a ``kid`` are taken; symmetric (``oct``) or private
  keys and keys for another ``use`` are skipped: a remote party never supplies an HMAC secret;
* an unknown ``kid`` asks for a refetch, at most one per ``min_refetch_seconds``: a stream of
  fresh key ids is a stream of refusals, never a stream of fetches. The request itself is
  refused at once; it does not wait for the fetch;
* a set that could not be refreshed for ``max_stale_seconds`` is dropped: its keys verify
  nothing more, and tokens that need them get 503 with ``Retry-After`` until a fetch succeeds.

``httpx`` (the ``server`` extra) is imported only when a ``jwks_url`` is configured.

References:
    https://www.rfc-editor.org/rfc/rfc7517#section-5
    https://www.rfc-editor.org/rfc/rfc8725#section-3.10 (do not trust received claims / keys)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ._errors import ConfigError, Refusal, unavailable
from ._json import loads_strict_json
from ._keys import Key, jwk_key

if TYPE_CHECKING:
    import httpx

__all__ = ["RemoteKeySet", "check_jwks_url"]

logger = logging.getLogger("devicegate")

MAX_DOCUMENT_BYTES = 64 * 1024
MAX_KEYS = 100
MAX_KID_LENGTH = 256
FETCH_TIMEOUT_SECONDS = 5.0
# The set is refreshed this often in any case: about as often as publishers are told to wait
# between publishing a key and signing with it (devicegate's own JWKS says max-age=300).
REFRESH_SECONDS = 300.0
# Unknown kids ask for a refetch at most this often.
MIN_REFETCH_SECONDS = 30.0
# A set that cannot be refreshed is trusted this long after its last good fetch, then dropped.
MAX_STALE_SECONDS = 3600.0
# A failed fetch is retried after this long (and sooner never).
RETRY_SECONDS = 10.0

_LOOPBACK_NAMES = frozenset({"localhost"})


def check_jwks_url(field: str, url: object) -> str:
    """Return ``url`` if it may serve keys: ``https://``, or ``http://`` on loopback.

    Raises:
        ConfigError: naming ``field``, for any other URL.
    """
    if not isinstance(url, str):
        raise ConfigError(field, "must be a URL string or None")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(field, "is not a valid URL") from None
    if not host or parts.username is not None or parts.password is not None:
        raise ConfigError(field, "must be an absolute URL with a host and no credentials")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    raise ConfigError(
        field,
        "must be an https:// URL (or http:// on 127.0.0.1, ::1 or localhost): keys fetched "
        "in the clear could be swapped by anyone on the path",
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unavailable() -> Refusal:
    return unavailable("The keys that verify this token cannot be fetched right now.", 10)


def parse_jwks(body: bytes) -> dict[str, Key]:
    """The usable keys of a JWK Set document, by ``kid``.

    Raises:
        ValueError: the document is not a JSON object with a ``keys`` list.
    """
    document = loads_strict_json(body.decode("utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys: dict[str, Key] = {}
    repeated: set[str] = set()
    for jwk in document["keys"][:MAX_KEYS]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        # Without a kid a key could only be tried blindly; with a kid seen twice, which one
        # is meant is unknown: both are skipped.
        if not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KID_LENGTH:
            continue
        try:
            key = jwk_key(jwk)
        except ValueError:
            continue
        if kid in keys:
            repeated.add(kid)
        keys[kid] = key
    return {kid: key for kid, key in keys.items() if kid not in repeated}


Fetch = Callable[[str], bytes]


class RemoteKeySet:
    """The keys of a remote JWK Set, fetched and refreshed in the background.

    Args:
        url: where the set is served (``https://``, or ``http://`` on loopback).
        refresh_seconds: how often the set is fetched again in any case.
        min_refetch_seconds: the shortest time between two fetches asked for by unknown kids.
        max_stale_seconds: how long the last good set is used when fetches fail.
        fetch_timeout_seconds: how long one fetch may take in all, connecting and reading the
            document included (a server dripping it byte by byte is cut off then).
        clock: returns a monotonic time in seconds; for tests.
        fetch: ``fetch(url)`` returns the document's bytes (default: httpx, bounded); for tests.

    Raises:
        ConfigError: the URL is not acceptable, or ``httpx`` is missing.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        min_refetch_seconds: float = MIN_REFETCH_SECONDS,
        max_stale_seconds: float = MAX_STALE_SECONDS,
        fetch_timeout_seconds: float = FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch | None = None,
    ) -> None:
        self.url = check_jwks_url("jwks_url", url)
        for name, value in (
            ("refresh_seconds", refresh_seconds),
            ("min_refetch_seconds", min_refetch_seconds),
            ("max_stale_seconds", max_stale_seconds),
            ("fetch_timeout_seconds", fetch_timeout_seconds),
        ):
            if not 0 < value < float("inf"):
                raise ConfigError(name, "must be a number of seconds above zero")
        if fetch is None:
            fetch = _http_fetcher(fetch_timeout_seconds)
        self._fetch = fetch
        self._refresh = refresh_seconds
        self._min_refetch = min_refetch_seconds
        self._max_stale = max_stale_seconds
        self._clock = clock
        self._keys: Mapping[str, Key] = {}
        self._fetched_at: float | None = None  # last good fetch
        self._asked_at = float("-inf")  # last fetch asked for by an unknown kid
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fetches = 0
        """How many fetches were made (good or not)."""

    def __repr__(self) -> str:
        return f"<RemoteKeySet {self.url!r} keys={len(self._keys)}>"

    @property
    def kids(self) -> frozenset[str]:
        """The key ids of the set in use."""
        return frozenset(self._keys)

    def get(self, kid: str) -> Key | None:
        """The key ``kid`` selects, or ``None`` (a refetch is then asked for, within limits).

        Raises:
            Refusal: 503, the set was never fetched or is too old to trust.
        """
        self._start()
        fetched_at = self._fetched_at
        now = self._clock()
        if fetched_at is None or now - fetched_at > self._max_stale:
            self._wake.set()
            raise _unavailable()
        key = self._keys.get(kid)
        if key is None and now - self._asked_at >= self._min_refetch:
            self._asked_at = now
            self._wake.set()
        return key

    def refresh(self) -> bool:
        """Fetch the set now, in this thread; whether it succeeded. Failures keep the last
        good set."""
        self.fetches += 1
        try:
            keys = parse_jwks(self._fetch(self.url))
        except Exception as exc:
            logger.warning(
                "devicegate could not refresh the JWK Set at %s (%s)", self.url, type(exc).__name__
            )
            return False
        with self._lock:
            self._keys = keys
            self._fetched_at = self._clock()
        return True

    def close(self) -> None:
        """Stop refreshing. Idempotent."""
        self._stop.set()
        self._wake.set()

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(
                    target=_refresh_loop,
                    args=(weakref.ref(self), self._wake, self._stop),
                    name="devicegate-jwks",
                    daemon=True,
                )
                self._thread = thread
                thread.start()


def _refresh_loop(
    ref: weakref.ref[RemoteKeySet], wake: threading.Event, stop: threading.Event
) -> None:
    # Holds the set weakly: a verifier that is dropped (reconfigure) takes its thread with it.
    wait = 0.0
    while not stop.is_set():
        wake.wait(wait)
        wake.clear()
        if stop.is_set():
            return
        key_set = ref()
        if key_set is None:
            return
        good = key_set.refresh()
        floor = key_set._min_refetch
        wait = max(0.0, (key_set._refresh if good else RETRY_SECONDS) - floor)
        del key_set
        # Whatever asks, never fetch more often than the refetch limit.
        if stop.wait(floor):
            return


def _http_fetcher(timeout: float) -> Fetch:
    try:
        import httpx
    except ImportError:
        raise ConfigError(
            "jwks_url", "fetching a JWK Set needs httpx: pip install 'devicegate[server]'"
        ) from None

    def fetch(url: str) -> bytes:
        # httpx's timeout bounds each step; a server dripping a byte at a time needs a deadline.
        deadline = time.monotonic() + timeout
        with (
            httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout) as client,
            client.stream("GET", url, headers={"accept": "application/json"}) as response,
        ):
            return _read_bounded(response, deadline)

    return fetch


def _read_bounded(response: httpx.Response, deadline: float) -> bytes:
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise ValueError("document too large")
        if time.monotonic() > deadline:
            raise TimeoutError("document too slow")
        chunks.append(chunk)
    return b"".join(chunks)
