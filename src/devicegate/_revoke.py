"""RevocationEndpoint: the ASGI app behind ``POST /revoke``."""

from __future__ import annotations

import math
import time
from typing import Any

from ._audit import log_revocation
from ._config import GateConfig
from ._counters import Counters
from ._endpoint import ServerKeyEndpoint
from ._errors import DEFAULT_REALM, ConfigError, Refusal
from ._principal import Principal
from ._revocation import RevocationStore

__all__ = ["RevocationEndpoint"]


# Each target a body may name, and the RevocationStore method that revokes it.
_TARGETS = {
    "jti": "revoke_token",
    "instance_id": "revoke_device",
    "sub": "revoke_subject",
    "all": "revoke_all",
}
_MEMBERS = frozenset({*_TARGETS, "before"})
_MAX_NAME_LENGTH = 256

_ONE_TARGET = "The body must name exactly one of jti, instance_id, sub or all (and may add before)."
_BAD_NAME = "The value to revoke must be a string of 1 to 256 printable characters."
_BAD_ALL = 'To revoke every token, send "all": true.'
_BAD_BEFORE = "before must be a Unix time (a number)."
_BEFORE_WITH_JTI = "A jti names one token: before does not apply to it."


class RevocationEndpoint(ServerKeyEndpoint):
    """An ASGI app that revokes device tokens for callers holding the server API key.

    ``POST`` a JSON object naming exactly one target: ``{"jti": "..."}`` (one token),
    ``{"instance_id": "..."}`` (every token of a device), ``{"sub": "..."}`` (every token of a
    subject) or ``{"all": true}`` (every token), the last three optionally with ``"before"``
    (a Unix time, default now: tokens issued later are not affected). The answer, 200, says
    what was revoked and the cutoff that applied:
    ``{"revoked": "instance_id", "instance_id": "...", "before": 1764700000.5}``.
    A revoked token is refused on its next request.

    Mounted alone, it authenticates the caller itself; behind
    :class:`~devicegate.DeviceAuthMiddleware` (at its ``revoke_path``) the middleware does.

    Args:
        config: needs ``api_keys``.
        revocations: where revocations are written (a :class:`~devicegate.RevocationList`,
            or a shared store).
        realm: the realm of ``WWW-Authenticate`` challenges.

    Raises:
        ConfigError: the configuration has no API key, or ``revocations`` cannot be written to.
    """

    kind = "revocation"

    def __init__(
        self,
        config: GateConfig,
        revocations: RevocationStore,
        *,
        realm: str = DEFAULT_REALM,
        counters: Counters | None = None,
    ) -> None:
        if not isinstance(revocations, RevocationStore):
            raise ConfigError(
                "revocations",
                "must be a RevocationStore such as RevocationList, got "
                f"{type(revocations).__name__}",
            )
        super().__init__(config, realm=realm, counters=counters)
        self.revocations = revocations

    def __repr__(self) -> str:
        return f"<RevocationEndpoint {self.revocations!r}>"

    async def answer(self, data: dict[str, Any], caller: Principal | None) -> dict[str, Any]:
        targets = [name for name in _TARGETS if name in data]
        if len(targets) != 1 or not data.keys() <= _MEMBERS:
            raise Refusal(_ONE_TARGET)
        target = targets[0]
        value = data[target]
        options: dict[str, float] = {}
        if "before" in data:
            before = data["before"]
            if target == "jti":
                raise Refusal(_BEFORE_WITH_JTI)
            if (
                isinstance(before, bool)
                or not isinstance(before, (int, float))
                or not math.isfinite(before)
            ):
                raise Refusal(_BAD_BEFORE)
            options["before"] = before
        if target != "jti" and "before" not in options:
            # Decided here rather than by the store, so that the answer can say what applied.
            options["before"] = time.time()
        revoke = getattr(self.revocations, _TARGETS[target])
        if target == "all":
            if value is not True:
                raise Refusal(_BAD_ALL)
            await revoke(**options)
        else:
            if (
                not isinstance(value, str)
                or not 1 <= len(value) <= _MAX_NAME_LENGTH
                or not value.isprintable()
            ):
                raise Refusal(_BAD_NAME)
            await revoke(value, **options)
        if self._counters is not None:
            self._counters.revoked[target] += 1
        log_revocation(target, None if caller is None else caller.key_name)
        answer: dict[str, Any] = {"revoked": target, target: value}
        if options:
            answer["before"] = options["before"]
        return answer
