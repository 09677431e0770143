"""Kept for existing imports: the reverse proxy lives in :mod:`devicegate.gateway.proxy`."""

from .gateway.proxy import DEFAULT_MAX_BODY_BYTES, DEFAULT_TIMEOUT, ProxyLimits, ReverseProxy

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "ProxyLimits", "ReverseProxy"]
