"""What devicegate counts, when asked to: plain integers, read by an exporter at scrape time.

The request path pays one dictionary increment per request for them, nothing more: no lock, no
label lookup, no call into a metrics library. :mod:`devicegate.metrics` turns them into
Prometheus metrics when it is scraped.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Counts of what a middleware (and the endpoints behind it) decided.

    Attributes:
        admitted: requests admitted, by credential kind (``"none"`` for a request admitted
            without any credential, on a public or optional path).
        refused: requests refused, by ``(credential kind or "none", reason)``; the reason is an
            ``InvalidReason`` value or an error code, a small fixed set.
        minted: tokens minted at the token endpoint.
        revoked: revocations, by what they named (``jti``, ``instance_id``, ``sub``, ``all``).

    Every key is one of devicegate's own names, never a path, a token, a key or a device id, so
    the label sets stay small whatever the traffic.
    """

    __slots__ = ("admitted", "minted", "refused", "revoked")

    def __init__(self) -> None:
        self.admitted: Counter[str] = Counter()
        self.refused: Counter[tuple[str, str]] = Counter()
        self.minted = 0
        self.revoked: Counter[str] = Counter()

    def __repr__(self) -> str:
        return (
            f"<Counters admitted={sum(self.admitted.values())} "
            f"refused={sum(self.refused.values())} minted={self.minted}>"
        )
