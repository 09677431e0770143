"""Kept for existing imports: forward-auth lives in :mod:`devicegate.gateway.forward_auth`."""

from .gateway.forward_auth import FORWARD_SECRET_HEADER, ForwardAuth

__all__ = ["FORWARD_SECRET_HEADER", "ForwardAuth"]
