"""What devicegate counts, when asked to: plain integers, read by an exporter at scrape time.

The request path pays one dictionary increment per request for them, nothing more: no lock, no
label lookup, no call into a metrics library. :mod:`devicegate.metrics` turns them into
Prometheus metrics when it is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["UPSTREAM_LATENCY_BUCKETS", "Counters"]

# The upper bounds, in seconds, of the gateway's upstream latency histogram (Prometheus' default
# buckets, with the gateway's default timeout of 30 s added).
UPSTREAM_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Counters:
    """Counts of what a middleware (and the endpoints behind it) decided.

    Attributes:
        admitted: requests admitted, by credential kind (``"none"`` for a request admitted
            without any credential, on a public or optional path).
        refused: requests refused, by ``(credential kind or "none", reason)``; the reason is an
            ``InvalidReason`` value or an error code, a small fixed set.
        minted: tokens minted at the token endpoint.
        revoked: revocations, by what they named (``jti``, ``instance_id``, ``sub``, ``all``).
        upstream: the gateway's exchanges with its upstream, by outcome (``answered``,
            ``timeout``, ``failed``, ``cut_off``).
        upstream_latency: how many answered exchanges took at most each bound of
            :data:`UPSTREAM_LATENCY_BUCKETS` to the response headers (not cumulative; the last
            slot counts the slower ones), and ``upstream_latency_sum`` their total in seconds.

    Every key is one of devicegate's own names, never a path, a token, a key or a device id, so
    the label sets stay small whatever the traffic.
    """

    __slots__ = (
        "admitted",
        "minted",
        "refused",
        "revoked",
        "upstream",
        "upstream_latency",
        "upstream_latency_sum",
    )

    def __init__(self) -> None:
        self.admitted: Counter[str] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.minted = 0
        self.revoked: Counter[str] = Counter()
        self.upstream: Counter[str] = Counter()
        self.upstream_latency = [0] * (len(UPSTREAM_LATENCY_BUCKETS) + 1)
        self.upstream_latency_sum = 0.0

    def upstream_answered(self, seconds: float) -> None:
        """Count an exchange whose response headers arrived after ``seconds``."""
        self.upstream["answered"] += 1
        self.upstream_latency[bisect.bisect_left(UPSTREAM_LATENCY_BUCKETS, seconds)] += 1
        self.upstream_latency_sum += seconds

    def __repr__(self) -> str:
        return (
            f"<Counters admitted={sum(self.admitted.values())} "
            f"refused={sum(self.refused.values())} minted={self.minted}>"
        )
