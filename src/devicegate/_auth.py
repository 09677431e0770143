"""Deciding who a request's credential belongs to. An ASGI scope in, a Principal or an error out.

Shared by the middleware and the token endpoint so that both apply the same rules. It reads
what it needs from the scope (today the headers; proof of possession will add the method and
URL) and knows nothing else of ASGI: it sends nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, MutableMapping
from typing import Any

from ._config import GateConfig
from ._credentials import match_key, read_credential
from ._dpop import InvalidDpopProof, Nonces, ProofChecker, ReplayCache, nonce_key, replayed
from ._errors import AuthError, InvalidReason, InvalidToken
from ._principal import API_KEY, DEVICE_TOKEN, CredentialKind, Principal
from ._tokens import TokenVerifier

__all__ = ["DPOP_NONCE", "DPOP_REPLAY_KEY", "Authenticator"]

DPOP_REPLAY_KEY = "devicegate.dpop_replay_key"
"""Where an accepted DPoP proof's replay key is left in the scope, for a shared replay store."""
_ONE_PROOF = "Send exactly one DPoP header with the proof."
DPOP_NONCE = "devicegate.dpop_nonce"
"""Where a newer server nonce is left in the scope when an admitted proof's has aged, for the
middleware to offer in the answer's ``DPoP-Nonce`` header."""


class Authenticator:
    """Checks the single credential of a request against a :class:`GateConfig`.

    Args:
        config: the keys, secrets and claim rules.
        verifier: the device-token verifier (default: one built from ``config``).
        replay: where accepted DPoP proofs are remembered (default: a memory of its own); a
            middleware keeps one across reconfigurations, so that a reload forgets none.
    """

    __slots__ = (
        "_api_key_header",
        "_api_key_principals",
        "_api_keys",
        "_device_header",
        "_dpop",
        "_dpop_algs",
        "_mobile_api_key_principals",
        "_mobile_api_keys",
        "_verifier",
        "configured_kinds",
        "nonces",
    )

    def __init__(
        self,
        config: GateConfig,
        *,
        verifier: TokenVerifier | None = None,
        replay: ReplayCache | None = None,
    ) -> None:
        self._api_keys = tuple(key.encode() for key in config.api_keys)
        self._mobile_api_keys = tuple(key.encode() for key in config.mobile_api_keys)
        # One principal per key, built once: it names the key when the configuration does.
        self._api_key_principals = _key_principals(CredentialKind.API_KEY, config.api_key_names)
        self._mobile_api_key_principals = _key_principals(
            CredentialKind.MOBILE_API_KEY, config.mobile_api_key_names
        )
        self._api_key_header = config.api_key_header.encode("latin-1")
        self._device_header = config.device_header.encode("latin-1")
        self._verifier = TokenVerifier(config) if verifier is None else verifier
        self.nonces = (
            Nonces(nonce_key(_server_secrets(config)))
            if config.dpop_nonce and config.public_url is not None
            else None
        )
        self._dpop = (
            None
            if config.public_url is None
            else ProofChecker(
                config.public_url,
                algorithms=config.dpop_algorithms,
                max_age_seconds=config.dpop_proof_max_age_seconds,
                leeway_seconds=config.leeway_seconds,
                replay=replay,
                nonces=self.nonces,
            )
        )
        self._dpop_algs = (("algs", " ".join(config.dpop_algorithms)),)
        kinds = set()
        if self._api_keys:
            kinds.add(CredentialKind.API_KEY)
        if self._mobile_api_keys:
            kinds.add(CredentialKind.MOBILE_API_KEY)
        if config.key_ring or config.jwks_url is not None:
            kinds.add(CredentialKind.DEVICE_TOKEN)
        self.configured_kinds = frozenset(kinds)

    @property
    def takes_proofs(self) -> bool:
        """Whether DPoP proofs are checked here (the configuration has a public URL)."""
        return self._dpop is not None

    @property
    def dpop_proof_lifetime(self) -> float:
        """How long an accepted DPoP proof must be remembered, here and in a shared store: as
        long as it could be accepted (0 when this server takes no proofs)."""
        return 0.0 if self._dpop is None else self._dpop.proof_lifetime

    @property
    def verifier(self) -> TokenVerifier:
        """The device-token verifier; fixed for the life of this authenticator."""
        return self._verifier

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(kind.value for kind in self.configured_kinds))
        return f"<Authenticator kinds={{{kinds}}}>"

    def authenticate(self, scope: Mapping[str, Any]) -> Principal:
        """Return the principal for the request's one credential.

        Raises:
            MissingCredentials, InvalidRequest, InvalidToken: see :mod:`devicegate._errors`;
            or any :class:`~devicegate.Refusal` a revocation check raises.
        """
        kind, value, device, dpop = read_credential(
            scope["headers"], self._api_key_header, self._device_header
        )
        try:
            if kind is DEVICE_TOKEN:
                principal = self._verifier.check(value, device)
                if dpop or "cnf" in principal.claims:
                    self._check_possession(scope, value, principal, dpop)
                return principal
            if kind is API_KEY:
                keys, principals = self._api_keys, self._api_key_principals
            else:
                keys, principals = self._mobile_api_keys, self._mobile_api_key_principals
            if not keys:
                raise InvalidToken(InvalidReason.NOT_CONFIGURED)
            index = match_key(value, keys)
            if index < 0:
                raise InvalidToken(InvalidReason.UNKNOWN_KEY)
            return principals[index]
        except AuthError as error:
            error.credential_kind = kind.value  # for the audit log: which kind was refused
            raise

    def _check_possession(
        self, scope: Mapping[str, Any], token: bytes, principal: Principal, dpop: bool
    ) -> None:
        """A DPoP-bound token comes with the DPoP scheme and a proof signed by its key, and the
        DPoP scheme only with such a token (RFC 9449 §7.1)."""
        jkt = principal.dpop_jkt
        if not dpop or jkt is None:
            raise self.dpop_required(
                InvalidReason.DPOP_REQUIRED if jkt is not None else InvalidReason.NOT_DPOP_BOUND
            )
        try:
            if self._dpop is None:
                raise InvalidDpopProof(
                    "This server takes no DPoP proofs: it has no public URL configured."
                )
            proof = None
            for name, value in scope["headers"]:
                if name == b"dpop":
                    if proof is not None:
                        raise InvalidDpopProof(_ONE_PROOF)
                    proof = value
            if proof is None:
                raise InvalidDpopProof(_ONE_PROOF)
            root_path: str = scope.get("root_path") or ""
            path: str = scope["path"]
            if root_path and not path.startswith(root_path):
                path = root_path + path
            method = scope.get("method", "GET")  # a websocket handshake is a GET
            proven, replay_key, fresh_nonce = self._dpop.check(
                proof, method=method, path=path, token=token
            )
            if not hmac.compare_digest(proven, jkt):
                raise InvalidDpopProof(
                    "The DPoP proof is signed by a key the token is not bound to."
                )
        except InvalidDpopProof as error:
            error.challenge_params = self._dpop_algs
            raise
        # For a store every instance shares, asked by the middleware (it may await): this
        # process has seen the proof once, the others may not have.
        if type(scope) is dict or isinstance(scope, MutableMapping):
            scope[DPOP_REPLAY_KEY] = replay_key
            if fresh_nonce is not None:
                scope[DPOP_NONCE] = fresh_nonce

    def dpop_required(self, reason: InvalidReason = InvalidReason.NOT_DPOP_BOUND) -> InvalidToken:
        """The refusal of a token that should have come with a DPoP proof (RFC 9449 §7.1)."""
        error = InvalidToken(reason)
        error.scheme = "DPoP"
        error.challenge_params = self._dpop_algs
        error.credential_kind = DEVICE_TOKEN.value
        return error

    def replayed_proof(self) -> InvalidDpopProof:
        """The refusal of a DPoP proof used before (on another instance, say)."""
        error = replayed()
        error.challenge_params = self._dpop_algs
        error.credential_kind = DEVICE_TOKEN.value
        return error

    def authenticate_known(self, scope: Mapping[str, Any]) -> Principal:
        """:meth:`authenticate`, for a credential that needs no new verification work: a key,
        or a token verified before and still remembered. For a client over its limit of
        failed authentications, whose new tokens wait until the limit lets it in again.

        Raises:
            MissingCredentials: no credential.
            Refusal: anything else :meth:`authenticate` would not admit without verifying a
                token in full.
        """
        kind, value, _, _ = read_credential(
            scope["headers"], self._api_key_header, self._device_header
        )
        if kind is DEVICE_TOKEN and not self._verifier.remembers(value):
            raise InvalidToken(InvalidReason.UNKNOWN_KEY)
        return self.authenticate(scope)


def _server_secrets(config: GateConfig) -> list[str]:
    # What only servers hold: mobile API keys ship inside apps, so nonces never derive from
    # them.
    secrets = [*config.api_keys, *config.jwt_secrets]
    if config.jwt_private_key is not None:
        secrets.append(config.jwt_private_key)
    return secrets


def _key_principals(kind: CredentialKind, names: tuple[str | None, ...]) -> tuple[Principal, ...]:
    # A key principal carries no claims and is immutable, so one instance serves every request
    # with that key; unnamed keys share one.
    unnamed = Principal(kind)
    return tuple(unnamed if name is None else Principal(kind, key_name=name) for name in names)
