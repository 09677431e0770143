"""The audit trail: one line per refusal, per token minted and per revocation, on the
``devicegate.audit`` logger at INFO.

Each line says why, in words an operator can search for (``reason=expired``), and carries the
same facts as a mapping under the record's ``devicegate`` attribute for structured formatters.
Never a key, a token or a secret: a refused token is named by its ``jti`` and its device only,
and only once its signature verified (an unverified claim is whatever the client wrote).
Values from the request (the path, the method) are shown with ``repr``, so that no client can
write a line of its own into the log.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

from ._errors import AuthError, InvalidToken, Refusal

__all__ = ["audit", "log_mint", "log_refusal", "log_revocation", "refusal_reason"]

audit = logging.getLogger("devicegate.audit")


def refusal_reason(refusal: Refusal) -> str:
    """Why ``refusal`` was made, in one word of a small fixed set: an ``InvalidReason`` value,
    else the error code (``no_credential`` when no credential was sent)."""
    if isinstance(refusal, InvalidToken):
        return refusal.reason.value
    return refusal.error or "no_credential"


def _write(message: str, facts: dict[str, Any]) -> None:
    shown = " ".join(
        f"{name}={value!r}" if name in _FROM_REQUEST else f"{name}={value}"
        for name, value in facts.items()
        if value is not None and name != "event"
    )
    audit.info("%s: %s", message, shown, extra={"devicegate": facts})


def log_mint(token_id: str, instance_id: str | None, key_name: str | None, lifetime: int) -> None:
    """Write the line of a token minted at the token endpoint."""
    if audit.isEnabledFor(logging.INFO):
        facts = {
            "event": "minted",
            "jti": token_id,
            "instance_id": instance_id,
            "key": key_name,
            "expires_in": lifetime,
        }
        _write("devicegate minted a token", facts)


def log_revocation(target: str, key_name: str | None) -> None:
    """Write the line of a revocation: what kind was revoked (never the value) and which
    named server key asked."""
    if audit.isEnabledFor(logging.INFO):
        _write("devicegate revoked tokens", {"event": "revoked", "by": target, "key": key_name})


def log_refusal(scope: Scope, refusal: Refusal, route_path: str | None = None) -> None:
    """Write the line of a refused request (when INFO is enabled on the audit logger)."""
    if not audit.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    facts: dict[str, Any] = {
        "event": "refused",
        "reason": refusal_reason(refusal),
        "status": refusal.status_code,
        "kind": None,
        "method": scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET",
        "path": route_path if route_path is not None else scope.get("path"),
        "client": client[0] if client else None,
    }
    if isinstance(refusal, AuthError):
        facts["kind"] = refusal.credential_kind
        facts["jti"] = refusal.token_id
        facts["instance_id"] = refusal.instance_id
    _write("devicegate refused a request", facts)


# What the client chose, shown quoted and escaped.
_FROM_REQUEST = frozenset({"method", "path", "jti", "instance_id"})
