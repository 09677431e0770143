"""Prometheus metrics for devicegate: ``pip install 'devicegate[metrics]'``.

The middleware counts in plain integers (:class:`~devicegate.Counters`); the collector here
reads them when Prometheus scrapes, so the request path never calls into the metrics library::

    from prometheus_client import REGISTRY
    from devicegate import Counters, DeviceAuthMiddleware
    from devicegate.metrics import DevicegateCollector

    counters = Counters()
    app = DeviceAuthMiddleware(app, config=config, counters=counters)
    REGISTRY.register(DevicegateCollector(counters, middleware=app))

Names follow Prometheus conventions (``devicegate_`` prefix, ``_total`` counters), and every
label takes a small fixed set of values: never a path, a token, a key or a device id.

References:
    https://prometheus.io/docs/practices/naming/
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "devicegate.metrics needs prometheus_client: pip install 'devicegate[metrics]'"
    ) from exc

from ._counters import UPSTREAM_LATENCY_BUCKETS, Counters
from ._middleware import DeviceAuthMiddleware

__all__ = ["DevicegateCollector"]


class DevicegateCollector(Collector):
    """Exposes a :class:`~devicegate.Counters` (and, given the middleware, its token cache) as
    Prometheus metrics:

    * ``devicegate_requests_total{kind, outcome}``: requests decided, by credential kind
      (``api_key``, ``mobile_api_key``, ``device_token``, or ``none``) and outcome
      (``admitted``, or the reason of the refusal: ``expired``, ``bad_signature``,
      ``wrong_device``, ``revoked``, ``insufficient_scope``, ``no_credential``...);
    * ``devicegate_tokens_minted_total`` and ``devicegate_revocations_total{target}``;
    * for the gateway, ``devicegate_upstream_exchanges_total{outcome}`` (``answered``,
      ``timeout``, ``failed``, ``cut_off``, ``busy``, ``slow_client``) and the histogram
      ``devicegate_upstream_latency_seconds`` (to the response headers);
    * ``devicegate_token_cache_entries``: verified tokens remembered right now;
    * ``devicegate_revocations_entries``: revocations held in memory, and with a shared store
      ``devicegate_revocations_fresh`` (1 or 0) and
      ``devicegate_revocations_last_sync_timestamp_seconds``.

    Args:
        counters: what the middleware counts into.
        middleware: the middleware, for the gauges of its state.
    """

    def __init__(
        self, counters: Counters, *, middleware: DeviceAuthMiddleware | None = None
    ) -> None:
        if not isinstance(counters, Counters):
            raise TypeError(f"counters must be a devicegate.Counters, got {type(counters)}")
        self._counters = counters
        self._middleware = middleware

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
        # Copied first: a request on another thread may add a key while this one reads.
        admitted, refused, revoked = (
            dict(counters.admitted),
            dict(counters.refused),
            dict(counters.revoked),
        )
        requests = CounterMetricFamily(
            "devicegate_requests",
            "Requests devicegate decided, by credential kind and outcome.",
            labels=["kind", "outcome"],
        )
        for kind, count in sorted(admitted.items()):
            requests.add_metric([str(kind), "admitted"], count)
        for (kind, reason), count in sorted(refused.items()):
            requests.add_metric([kind, reason], count)
        yield requests
        yield CounterMetricFamily(
            "devicegate_tokens_minted", "Tokens minted at the token endpoint.", counters.minted
        )
        revocations = CounterMetricFamily(
            "devicegate_revocations",
            "Revocations written, by what they named.",
            labels=["target"],
        )
        for target, count in sorted(revoked.items()):
            revocations.add_metric([target], count)
        yield revocations
        outcomes = dict(counters.upstream)
        if outcomes:
            exchanges = CounterMetricFamily(
                "devicegate_upstream_exchanges",
                "The gateway's exchanges with its upstream, by outcome.",
                labels=["outcome"],
            )
            for outcome, count in sorted(outcomes.items()):
                exchanges.add_metric([outcome], count)
            yield exchanges
            latency = HistogramMetricFamily(
                "devicegate_upstream_latency_seconds",
                "Seconds from sending a request upstream to its response headers.",
            )
            slots, total, cumulative = list(counters.upstream_latency), 0, []
            for bound, count in zip((*UPSTREAM_LATENCY_BUCKETS, math.inf), slots, strict=True):
                total += count
                cumulative.append(("+Inf" if math.isinf(bound) else repr(bound), total))
            latency.add_metric([], cumulative, counters.upstream_latency_sum)
            yield latency
        if self._middleware is None:
            return
        verifier = self._middleware.verifier
        yield GaugeMetricFamily(
            "devicegate_token_cache_entries",
            "Verified tokens remembered right now.",
            verifier.cache_size,
        )
        store: object = verifier.revocations
        if isinstance(store, Sized):  # RevocationList and the Redis replica are
            yield GaugeMetricFamily(
                "devicegate_revocations_entries",
                "Revocations held in memory right now.",
                len(store),
            )
        # A shared store (devicegate.redis) says how fresh its replica is; read by duck typing,
        # so that this module depends on no other integration.
        state = getattr(store, "state", None)
        fresh = getattr(state, "fresh", None)
        if isinstance(fresh, bool):
            yield GaugeMetricFamily(
                "devicegate_revocations_fresh",
                "1 while the revocation replica is confirmed in step with its store, else 0.",
                int(fresh),
            )
            last_sync = getattr(state, "last_sync", None)
            if isinstance(last_sync, (int, float)):
                yield GaugeMetricFamily(
                    "devicegate_revocations_last_sync_timestamp_seconds",
                    "When the revocation replica was last confirmed in step with its store.",
                    last_sync,
                )
