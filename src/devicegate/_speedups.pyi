from collections.abc import Callable, Iterable
from typing import Any

from ._principal import Principal
from ._tokens import TokenVerifier

MAX_CREDENTIAL_BYTES: int

def _comparisons() -> tuple[int, int]: ...

class FastPath:
    verifier: TokenVerifier | None
    def __init__(
        self,
        check: Callable[..., Any],
        api_key_header: bytes,
        device_header: bytes,
        api_keys: tuple[bytes, ...],
        mobile_keys: tuple[bytes, ...],
        api_principal: Principal,
        mobile_principal: Principal,
    ) -> None: ...
    def admit(self, headers: Iterable[tuple[bytes, bytes]], /) -> Principal | None: ...
