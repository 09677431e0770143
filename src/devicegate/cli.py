"""The ``devicegate`` command line: ``init``, ``serve``, ``token``, ``verify`` and ``revoke``.

Every failure the user can cause (a missing or weak secrets file, a port in use, a bad flag or
environment value) ends in one line on stderr and a non-zero exit status, never a traceback:

    0  success (``verify``: the token is valid)
    1  the operation failed (``verify``: the token is invalid; a file exists; a port is in use;
       the upstream is unreachable; ``revoke``: the server refused or cannot be reached)
    2  usage or configuration error (bad flags or environment, ConfigError, missing extra)
  130  interrupted (Ctrl-C)

No command ever prints a key or a secret: ``serve`` prints a shell line that reads the API key
from the secrets file on the user's side.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import http.client
import json
import math
import os
import secrets
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import __version__
from ._claims import ClaimError
from ._config import GateConfig, env_variable
from ._counters import Counters
from ._dpop import check_public_url
from ._errors import ConfigError, InvalidReason, InvalidRequest, InvalidToken
from ._json import loads_strict_json
from ._keys import generate_private_key_pem
from ._middleware import DeviceAuthMiddleware
from ._ratelimit import check_limit
from ._remote_keys import check_jwks_url
from ._rules import has_unsafe_segments
from ._tokens import TokenIssuer, TokenVerifier, unverified_claims
from .gateway._app import (
    DEFAULT_FORWARD_AUTH_PATH,
    DEFAULT_REVOKE_PATH,
    DEFAULT_TOKEN_PATH,
    ServeSettings,
    has_env_credentials,
    load_config,
    parse_rule,
    parse_timeout,
)
from .gateway._logging import LOG_FORMATS, log_config, log_line
from .gateway._policy import ProxyLimits

__all__ = ["main", "write_secrets_file"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_SECRETS_FILE = "secrets.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SERVER_EXTRA_HINT = "pip install 'devicegate[server]'"
METRICS_EXTRA_HINT = "pip install 'devicegate[metrics]'"
DEMO_INSTANCE_ID = "demo-device"
# How long ``revoke`` waits for the server, and how much of its answer it reads.
REVOKE_TIMEOUT_SECONDS = 30.0
_MAX_ANSWER_BYTES = 64 * 1024
# Which flag of ``token`` each member a ClaimError names came from.
_CLAIM_FLAGS = {"sub": "--sub", "claims": "--claim", "expires_in": "--lifetime"}
# The flag that sets a claim --claim may not, where there is one.
_RESERVED_CLAIM_HINTS = {
    "sub": "use --sub",
    "instance_id": "use --instance-id",
    "exp": "use --lifetime",
}
# The import string uvicorn workers load; they rebuild the app from the environment.
WORKER_FACTORY = "devicegate.gateway._app:app_from_env"

_SECRET_BYTES = 32
_PRETTY_HEADERS = {"x-api-key": "X-API-Key", "x-instance-id": "X-Instance-ID"}

# Plain words for operators; InvalidReason values are terse identifiers.
REASON_WORDS: Mapping[InvalidReason, str] = {
    InvalidReason.MALFORMED: "malformed: not a compact JWT (three base64url segments of JSON)",
    InvalidReason.BAD_HEADER: "unacceptable header (a 'crit' or 'b64' extension, or a bad 'typ' "
    "or 'kid')",
    InvalidReason.UNSUPPORTED_ALGORITHM: (
        "unsupported algorithm: not the algorithm of a configured key (HS256 for a jwt_secret, "
        "EdDSA or ES256 for a key pair)"
    ),
    InvalidReason.BAD_SIGNATURE: "bad signature: signed with another key, or tampered with",
    InvalidReason.BAD_CLAIMS: (
        "bad claims: 'exp' missing or not a number, or another claim of the wrong type"
    ),
    InvalidReason.EXPIRED: "expired",
    InvalidReason.NOT_YET_VALID: "not valid yet ('nbf' is in the future)",
    InvalidReason.ISSUED_IN_FUTURE: "issued in the future ('iat' is ahead of this clock)",
    InvalidReason.WRONG_ISSUER: "wrong issuer ('iss' does not match the configured issuer)",
    InvalidReason.WRONG_AUDIENCE: "wrong audience ('aud' does not match the configured audience)",
    InvalidReason.WRONG_DEVICE: "wrong device: the token is bound to another instance_id",
    InvalidReason.REVOKED: "revoked: its jti, device, subject or issue time was revoked",
    InvalidReason.BAD_CLOCK: "this machine's clock gives no usable time (NaN or infinite)",
    InvalidReason.UNBOUND: (
        "not bound to a device, and this configuration requires device binding"
    ),
    InvalidReason.UNKNOWN_KEY: (
        "unknown key: its 'kid' names no configured key (an EdDSA or ES256 token must name one)"
    ),
    InvalidReason.DPOP_REQUIRED: (
        "bound to a key (cnf.jkt): send it as 'Authorization: DPoP' with a DPoP proof"
    ),
    InvalidReason.NOT_DPOP_BOUND: (
        "bound to no key (no cnf.jkt), but sent with the DPoP scheme or where DPoP is required"
    ),
    InvalidReason.NOT_CONFIGURED: (
        "no key verifies tokens here (jwt_secret, jwt_private_key, jwt_public_keys or jwks_url), "
        "so no token can be valid"
    ),
}


class CommandError(Exception):
    """A failure reported as one line on stderr with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- secrets.json -------------------------------------------------------------------------------


def _random_key() -> str:
    return base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def write_secrets_file(path: str | os.PathLike[str], algorithm: str = "HS256") -> None:
    """Create a SenseCrypt-format ``secrets.json`` with fresh random keys, mode 0600: a
    ``jwt_secret`` for HS256, or a ``jwt_private_key`` (PEM) for ``EdDSA`` or ``ES256``.

    The file is created with ``O_EXCL``, so an existing file (or a symlink planted in its
    place) is never overwritten or followed, and it is never readable by others, not even for
    an instant.

    Raises:
        FileExistsError: ``path`` already exists.
        OSError: the file cannot be created or written.
        ConfigError: an asymmetric algorithm without the ``crypto`` extra.
    """
    document: dict[str, Any] = {"api_key": _random_key(), "mobile_api_key": _random_key()}
    if algorithm == "HS256":
        document["jwt_secret"] = _random_key()
    else:
        document["jwt_private_key"] = generate_private_key_pem(algorithm)
    document["jwt_expire_seconds"] = 300
    _write_private(path, (json.dumps(document, indent=2) + "\n").encode("ascii"))


# The variable the forward-auth secret file sets, as docs/deployment.md names it.
FORWARD_SECRET_VARIABLE = "DEVICEGATE_FORWARD_SECRET"  # noqa: S105 - a variable's name


def write_forward_secret_file(path: str | os.PathLike[str]) -> None:
    """Create an environment file, mode 0600, that sets ``DEVICEGATE_FORWARD_SECRET`` to a fresh
    random secret: for systemd's ``EnvironmentFile=``, ``docker run --env-file`` or a shell's
    ``set -a; . FILE; set +a``, and ``serve --forward-auth-secret-env DEVICEGATE_FORWARD_SECRET``.

    A file rather than a line on the terminal or a member of ``secrets.json``: the secret is
    never printed (no scrollback, no CI log), and the proxy's configuration and devicegate's
    environment can both be filled from it, while ``secrets.json`` stays in the SenseCrypt
    format that other tools read.

    Raises:
        FileExistsError: ``path`` already exists.
        OSError: the file cannot be created or written.
    """
    # URL-safe base64: visible ASCII without quotes or spaces, so the line needs no quoting in
    # an env file, a shell or an nginx string.
    line = f"{FORWARD_SECRET_VARIABLE}={secrets.token_urlsafe(_SECRET_BYTES)}\n"
    _write_private(path, line.encode("ascii"))


def _write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` with ``data``, mode 0600, never over an existing file or through a
    symlink (``O_EXCL``), and never readable by others, not even for an instant."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # the umask may only remove bits; make it exact
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _create(path: Path, write: Callable[[Path], None], flag: str) -> None:
    try:
        write(path)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    except FileExistsError:
        raise CommandError(
            f"{path} already exists; refusing to overwrite it (remove it first or choose "
            f"another {flag})"
        ) from None
    except OSError as exc:
        raise CommandError(f"cannot create {path}: {exc.strerror or exc}") from None


def _init(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    path = Path(args.path).absolute()
    secret_path = None
    if args.forward_auth_secret is not None:
        secret_path = Path(args.forward_auth_secret).absolute()
        if secret_path == path:
            raise CommandError(
                "--forward-auth-secret: must be another file than --path", EXIT_USAGE
            )
    _create(path, lambda where: write_secrets_file(where, args.algorithm), "--path")
    print(path)
    if secret_path is not None:
        try:
            _create(secret_path, write_forward_secret_file, "--forward-auth-secret")
        except CommandError:
            # Both files or neither: a rerun must not find half of what it asked for.
            path.unlink()
            raise
        print(secret_path)
    return EXIT_OK


# -- configuration shared by token and verify ----------------------------------------------------


def _config(secrets_file: str | None, environ: Mapping[str, str]) -> GateConfig:
    if secrets_file is None and not (
        environ.get("DEVICEGATE_SECRETS_FILE", "").strip() or has_env_credentials(environ)
    ):
        secrets_file = DEFAULT_SECRETS_FILE
    return load_config(secrets_file, environ)


# -- token ---------------------------------------------------------------------------------------


def _claim_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--claim NAME=JSON`` options as claims; a usage error names the claim."""
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        shown = _shown(name)
        if not equals or not name:
            where = f" {shown}" if name else ""
            raise CommandError(
                f"--claim{where}: expected NAME=JSON, such as --claim tier=2", EXIT_USAGE
            )
        if name in claims:
            raise CommandError(f"--claim {shown}: given more than once", EXIT_USAGE)
        try:
            claims[name] = loads_strict_json(text)
        except (ValueError, RecursionError):
            # The value is not echoed: it may be something the user would not want on screen.
            raise CommandError(
                f"--claim {shown}: the value is not JSON (a string needs quotes: "
                f"--claim {shlex.quote(name)}='\"text\"')",
                EXIT_USAGE,
            ) from None
    return claims


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = _config(args.secrets, environ)
    claims = _claim_options(args.claim or ())
    issuer = TokenIssuer(config)
    try:
        issued = issuer.issue(
            args.instance_id,
            subject=args.sub,
            claims=claims or None,
            lifetime=args.lifetime,
        )
    except ClaimError as exc:
        if exc.member in claims:  # a reserved name given to --claim
            hint = _RESERVED_CLAIM_HINTS.get(exc.member)
            raise CommandError(
                f"--claim {exc.member}: {exc}" + (f"; {hint}" if hint else ""), EXIT_USAGE
            ) from None
        if exc.member == "expires_in":
            raise CommandError(
                f"--lifetime: must be from 1 to {config.jwt_expire_seconds} seconds, the "
                "configured jwt_expire_seconds (a token never outlives it)",
                EXIT_USAGE,
            ) from None
        raise CommandError(
            f"{_CLAIM_FLAGS.get(exc.member, '--claim')}: {exc}", EXIT_USAGE
        ) from None
    except ValueError as exc:
        raise CommandError(f"--instance-id: {exc}", EXIT_USAGE) from None
    print(issued.access_token)
    return EXIT_OK


# -- verify --------------------------------------------------------------------------------------


def _when(timestamp: object, now: float) -> str:
    if type(timestamp) is not int:
        return "unknown"
    try:
        moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):
        return str(timestamp)
    delta = int(timestamp - now)
    relative = f"in {delta} s" if delta >= 0 else f"{-delta} s ago"
    return f"{moment.strftime('%Y-%m-%dT%H:%M:%SZ')} ({relative})"


def _shown(value: str) -> str:
    """``value`` fit for a terminal: as is when printable, else escaped.

    Token claims come from whoever signed the token: an escape sequence in one must not
    reach the operator's terminal raw.
    """
    return value if value.isprintable() else ascii(value)


def _read_token(value: str) -> str:
    token = sys.stdin.read() if value == "-" else value
    token = token.strip()
    scheme, _, rest = token.partition(" ")
    # Accept a pasted "Bearer <token>" header value as well as the bare token.
    return rest.strip() if scheme.lower() == "bearer" else token


def _verify(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = _config(args.secrets, environ)
    token = _read_token(args.token)
    device = None if args.instance_id is None else args.instance_id.encode()
    now = time.time()
    try:
        principal = TokenVerifier(config, clock=lambda: now).verify(token, device)
    except InvalidToken as exc:
        words = REASON_WORDS.get(exc.reason, exc.reason.value)
        claims = unverified_claims(token)
        if exc.reason is InvalidReason.EXPIRED:
            words = f"expired at {_when(claims.get('exp'), now)}"
        elif exc.reason is InvalidReason.WRONG_DEVICE:
            words = (
                f"wrong device: the token is bound to {claims.get('instance_id')!r}, "
                f"not {args.instance_id!r}"
            )
        print(f"invalid: {words}")
        return EXIT_FAILURE
    except InvalidRequest:
        bound = unverified_claims(token).get("instance_id")
        print(f"invalid: the token is bound to a device ({bound!r}): pass --instance-id")
        return EXIT_FAILURE
    print("valid")
    print(f"kind: {principal.kind.value}")
    if principal.instance_id is None:
        print("instance_id: none (a generic token, accepted from any device)")
    else:
        print(f"instance_id: {_shown(principal.instance_id)}")
    print(f"expires: {_when(principal.claims.get('exp'), now)}")
    return EXIT_OK


# -- revoke --------------------------------------------------------------------------------------

# Each target flag, the member of the /revoke body it becomes, and how the answer is told.
_REVOKE_TARGETS = {
    "jti": ("jti", "the token with jti {value}"),
    "device": ("instance_id", "every token of the device {value}"),
    "sub": ("sub", "every token of the subject {value}"),
    "all": ("all", "every token"),
}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        # A redirect would carry the server API key to wherever the answer points: refused,
        # and reported as the server's answer (urllib raises HTTPError with its status).
        return None


def _before_argument(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            "must be a Unix time (seconds since 1970), such as 1700000000"
        )
    return int(value) if value.is_integer() else value


def _server_url(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The revocation endpoint: ``--url`` (or ``DEVICEGATE_URL``, else where ``serve`` with this
    environment listens) plus the revocation path."""
    base = args.url or environ.get("DEVICEGATE_URL", "").strip()
    field = "--url" if args.url else "DEVICEGATE_URL"
    if not base:
        host = environ.get("DEVICEGATE_HOST", "").strip() or DEFAULT_HOST
        port = _env_int(environ, "DEVICEGATE_PORT", 1, 65535) or DEFAULT_PORT
        base, field = f"http://{_display_host(host)}:{port}", "DEVICEGATE_HOST/DEVICEGATE_PORT"
    # The URL itself is not echoed in errors: it may carry a password.
    try:
        parts = urlsplit(base)
        _ = parts.port
    except ValueError:
        raise CommandError(f"{field}: not a valid URL", EXIT_USAGE) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(
            f"{field}: must be the server's http:// or https:// URL, such as "
            f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",
            EXIT_USAGE,
        )
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise CommandError(
            f"{field}: must be the server's URL alone, without credentials, query or fragment",
            EXIT_USAGE,
        )
    path = args.revoke_path or environ.get("DEVICEGATE_REVOKE_PATH", "").strip()
    path = path or DEFAULT_REVOKE_PATH
    if path.lower() == "none":
        raise CommandError(
            "the revocation endpoint is off (DEVICEGATE_REVOKE_PATH=none); name its path with "
            "--revoke-path",
            EXIT_USAGE,
        )
    if not path.startswith("/") or has_unsafe_segments(path):
        raise CommandError(
            f"--revoke-path: must be an absolute path such as {DEFAULT_REVOKE_PATH}", EXIT_USAGE
        )
    return base.rstrip("/") + path


def _post_json(url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
    """POST ``body`` to ``url``; the status and the start of the answer, whatever the status."""
    # No proxy from the environment and no redirects: the server key goes to ``url`` alone.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 - the scheme was checked
    where = urlsplit(url).netloc.rpartition("@")[2]
    try:
        with opener.open(request, timeout=REVOKE_TIMEOUT_SECONDS) as response:
            status: int = response.status
            return status, response.read(_MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(_MAX_ANSWER_BYTES)
    except urllib.error.URLError as exc:
        reason = exc.reason
        words = reason.strerror or str(reason) if isinstance(reason, OSError) else str(reason)
        raise CommandError(f"cannot reach the server at {where} ({words})") from None
    except TimeoutError:
        raise CommandError(
            f"the server at {where} did not answer within {REVOKE_TIMEOUT_SECONDS:g} s"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CommandError(f"the exchange with {where} failed ({type(exc).__name__})") from None


def _answer(raw: bytes) -> dict[str, Any]:
    try:
        data = loads_strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _moment(timestamp: object) -> str:
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return "now"
    try:
        moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    except (OverflowError, ValueError, OSError):
        return repr(timestamp)
    # Cut to the millisecond, never rounded up: the cutoff shown is never later than the
    # server's (":g" would show 1.7e+09, a cutoff off by minutes).
    shown = f"{math.floor(timestamp * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{moment.strftime('%Y-%m-%dT%H:%M:%SZ')} ({shown})"


def _revoke(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    (flag,) = [name for name in _REVOKE_TARGETS if getattr(args, name) not in (None, False)]
    member, told = _REVOKE_TARGETS[flag]
    if args.before is not None and flag == "jti":
        raise CommandError(
            "--before applies to --device, --sub and --all: a jti names one token", EXIT_USAGE
        )
    url = _server_url(args, environ)
    config = _config(args.secrets, environ)
    if not config.api_keys:
        raise CommandError(
            "revoke needs the server API key (api_key in the secrets file, or DEVICEGATE_API_KEYS)",
            EXIT_USAGE,
        )
    value = True if flag == "all" else getattr(args, flag)
    body: dict[str, Any] = {member: value}
    if args.before is not None:
        body["before"] = args.before
    # With several (named or rotated) keys, the first is the one in force, as for ``token``.
    headers = {config.api_key_header: config.api_keys[0], "content-type": "application/json"}
    status, raw = _post_json(url, headers, json.dumps(body).encode())
    answer = _answer(raw)
    if status != 200 or answer.get("revoked") != member:
        raise CommandError(_refused(status, answer, url))
    what = told.format(value=_shown(repr(value)))
    if flag == "jti":
        print(f"revoked {what}")
    else:
        print(f"revoked {what} issued at or before {_moment(answer.get('before'))}")
    return EXIT_OK


def _refused(status: int, answer: Mapping[str, Any], url: str) -> str:
    """One line saying why the server did not revoke, with what to check."""
    where = urlsplit(url).netloc.rpartition("@")[2]
    error, description = answer.get("error"), answer.get("error_description")
    said = ""
    if isinstance(error, str) and isinstance(description, str):
        # The server's own fixed text; kept short and printable all the same.
        said = f": {_shown(error[:64])}: {_shown(description[:300])}"
    line = f"the server at {where} did not revoke ({status}{said})"
    if status == 404:
        return f"{line}; check --url and --revoke-path (serve --revoke-path names it)"
    if status in (401, 403):
        return f"{line}; --secrets must name the server's secrets file (its api_key)"
    if status == 200:
        return f"{line}; its answer is not a revocation: is --url a devicegate server?"
    return line


# -- serve ---------------------------------------------------------------------------------------


def _int_in_range(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an integer from ``low`` to ``high``, or ``None`` when it is not one."""
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _env_choice(
    flag: str | None,
    environ: Mapping[str, str],
    variable: str,
    choices: tuple[str, ...],
    default: str,
) -> str:
    """The flag's value, else the variable's (in any case), else ``default``: one of ``choices``."""
    value = flag or environ.get(variable, "").strip() or default
    if value.lower() not in choices:
        raise ConfigError(variable, f"must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _env_int(environ: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    value = _int_in_range(raw, low, high)
    if value is None:
        raise ConfigError(name, f"must be an integer from {low} to {high}, got {raw!r}")
    return value


def _int_arg(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _int_in_range(raw, low, high)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}")
        return value

    return parse


def _display_host(host: str) -> str:
    """The host a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapping the wildcard to loopback, not binding
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _check_port(host: str, port: int, flag: str = "--port") -> None:
    """Fail with one line if uvicorn could not bind ``host:port`` (as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn does: a port left in TIME_WAIT is free, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            where = "--host" if flag == "--port" else flag
            raise CommandError(f"cannot resolve {where} {host!r}: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is already in use (is another server running?); "
                    f"choose another {flag}"
                ) from None
            if exc.errno == errno.EACCES:
                raise CommandError(
                    f"permission denied to listen on {host}:{port} (ports below 1024 need "
                    f"privileges); choose another {flag}"
                ) from None
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _metrics_address(raw: str, source: str) -> tuple[str, int]:
    """``[ADDRESS:]PORT`` as ``(host, port)``; without an address, 127.0.0.1 (an IPv6 address
    goes in brackets: ``[::1]:9100``)."""
    host, _, number = raw.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = _int_in_range(number, 1, 65535)
    # An IPv6 address without brackets: which colon ends it is anyone's guess.
    unbracketed = ":" in host and not raw.strip().startswith("[")
    if port is None or unbracketed:
        raise ConfigError(
            source,
            f"must be [ADDRESS:]PORT, such as 9100 or 127.0.0.1:9100 ([::1]:9100 for IPv6); "
            f"got {raw!r}",
        )
    return host or DEFAULT_HOST, port


def _metrics_option(
    args: argparse.Namespace, environ: Mapping[str, str], *, port: int, workers: int
) -> tuple[str, int] | None:
    """Where ``--metrics`` (or ``DEVICEGATE_METRICS``) asks for the metrics listener."""
    raw = args.metrics or environ.get("DEVICEGATE_METRICS", "").strip()
    if not raw:
        return None
    source = "--metrics" if args.metrics else "DEVICEGATE_METRICS"
    address = _metrics_address(raw, source)
    if workers > 1:
        # Each worker counts its own requests in its own memory, and one listener can live in
        # one process only: it would show one worker's share as if it were the whole.
        raise CommandError(
            f"{source} needs one worker: each of the {workers} workers counts its own "
            "requests, so one listener would show a part as the whole; run one worker per "
            "instance, and scrape each instance",
            EXIT_USAGE,
        )
    if address[1] == port:
        raise CommandError(
            f"{source}: port {port} is the API's own; give the metrics a port of their own",
            EXIT_USAGE,
        )
    try:
        import prometheus_client  # noqa: F401 - only whether it is there
    except ImportError:
        raise CommandError(
            f"{source} needs prometheus_client: {METRICS_EXTRA_HINT}", EXIT_USAGE
        ) from None
    return address


def _serve_metrics(counters: Counters, gate: DeviceAuthMiddleware, host: str, port: int) -> None:
    """Serve devicegate's metrics, and the process's, for Prometheus on ``host:port``, from a
    thread of this process (prometheus_client's own server)."""
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
        start_http_server,
    )

    from .metrics import DevicegateCollector

    registry = CollectorRegistry()
    registry.register(DevicegateCollector(counters, middleware=gate))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    start_http_server(port, addr=host, registry=registry)


def _check_upstream_reachable(url: str, timeout: float) -> None:
    """Fail with one line if nothing accepts a TCP connection at the upstream's address
    within ``timeout`` seconds (the upstream timeout: a slow upstream is given as long)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"{_display_host(host)}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise CommandError(
            f"cannot resolve the upstream host {host!r}: {exc.strerror}; check --upstream"
        ) from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise CommandError(
            f"cannot reach the upstream at {where} ({reason}); start it first, fix --upstream, "
            "or pass --no-upstream-check if it starts later"
        ) from None


def _api_key_expression(settings: ServeSettings, environ: Mapping[str, str]) -> str:
    """A shell expression that yields the server API key on the user's machine."""
    if environ.get("DEVICEGATE_API_KEYS", "").strip() or settings.secrets_file is None:
        return '"${DEVICEGATE_API_KEYS%%,*}"'
    # python3 rather than jq: present wherever devicegate was installed.
    # The first key of a rotation list or of named keys: the one devicegate token uses.
    program = (
        'import json,sys; k=json.load(open(sys.argv[1]))["api_key"]; '
        "k=list(k.values()) if isinstance(k, dict) else k; "
        "print(k if isinstance(k, str) else k[0])"
    )
    return f'"$(python3 -c {shlex.quote(program)} {shlex.quote(settings.secrets_file)})"'


def serve_banner(
    settings: ServeSettings,
    config: GateConfig,
    environ: Mapping[str, str],
    *,
    host: str,
    port: int,
    workers: int,
    metrics: tuple[str, int] | None = None,
) -> str:
    """What ``serve`` prints at start: where it listens and paste-ready ``curl`` lines.

    Never a key or a secret: the API key is read from the secrets file by the printed command.
    """
    base = f"http://{_display_host(host)}:{port}"
    # What answers behind the gate, in each mode: the upstream, else the demo app (which a
    # forward-auth deployment still serves, beside the endpoint its proxy asks).
    if settings.upstream:
        what = f"forwarding to {settings.upstream}"
    elif settings.forward_auth_path is not None:
        what = "answering forward-auth requests, and serving the demo app,"
    else:
        what = "serving the demo app"
    plural = "s" if workers > 1 else ""
    lines = [f"devicegate {__version__}: {what} on {base} ({workers} worker{plural})"]
    if settings.secrets_file is not None:
        lines.append(f"  secrets: {settings.secrets_file}")
    else:
        lines.append("  secrets: from DEVICEGATE_* environment variables")
    lines.append(f"  public paths: {', '.join(('/health', *settings.public))}")
    if settings.rules:
        lines.append(f"  rules (first match wins): {', '.join(settings.rules)}")
    if settings.forward_auth_path is not None:
        lines.append(f"  forward-auth endpoint: {base}{settings.forward_auth_path}")
    lines.append(f"  {_revocation_line(settings, config, base, workers)}")
    lines.append(f"  {_rate_limit_line(settings, config, workers)}")
    if settings.upstream:
        limits = settings.proxy_limits
        rate = f" plus 1 s per {limits.min_client_rate} bytes" if limits.min_client_rate else ""
        lines.append(
            f"  gateway limits: {limits.connections} upstream connections, "
            f"{limits.concurrent} requests at once, bodies and responses up to "
            f"{limits.buffer_bytes} bytes buffered; a client has {limits.client_seconds:g} s"
            f"{rate} to send or read one"
        )
    if metrics is not None:
        metrics_host, metrics_port = metrics
        lines.append(
            f"  metrics: http://{_display_host(metrics_host)}:{metrics_port}/metrics "
            "(Prometheus, on a listener of its own)"
        )
    if config.public_url is not None:
        nonces = ", with server nonces" if config.dpop_nonce else ""
        lines.append(f"  DPoP: proofs must name {config.public_url}/...{nonces}")
    device_header = _PRETTY_HEADERS.get(config.device_header, config.device_header)
    target = f"{base}/" if settings.upstream else f"{base}/whoami"
    if config.jwks_url is not None:
        lines.append(
            f"  remote keys: device tokens signed by a key of {config.jwks_url} are accepted "
            "too (the set is refreshed in the background)"
        )
    if settings.token_path is None or not (config.api_keys and config.key_ring.signing_key):
        lines.append(
            "  token endpoint: off (needs --token-path, an api_key, and a jwt_secret or "
            "jwt_private_key to sign with)"
        )
        return "\n".join(lines) + "\n"
    api_key_header = _PRETTY_HEADERS.get(config.api_key_header, config.api_key_header)
    body = json.dumps({"instance_id": DEMO_INSTANCE_ID})
    read_token = 'import json,sys; print(json.load(sys.stdin)["access_token"])'  # noqa: S105
    lines += [
        f"  token endpoint: POST {base}{settings.token_path} (server API key only)",
        "",
        f"Mint a token for the device {DEMO_INSTANCE_ID!r} (the API key is read from the "
        "secrets file, never printed):",
        f"  API_KEY={_api_key_expression(settings, environ)}",
        f'  TOKEN="$(curl -fsS -X POST -H "{api_key_header}: $API_KEY" '
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)} "
        f'{base}{settings.token_path} | python3 -c {shlex.quote(read_token)})"',
        "Call the app as that device:",
        f'  curl -fsS -H "Authorization: Bearer $TOKEN" '
        f"-H {shlex.quote(f'{device_header}: {DEMO_INSTANCE_ID}')} {target}",
    ]
    if settings.forward_auth_path is not None:
        secret, from_where = "", ""
        if settings.forward_auth_secret_env is not None:
            # The variable's name, never its value: the user's shell holds the secret.
            name = settings.forward_auth_secret_env
            secret = f'-H "X-Devicegate-Forward-Secret: ${{{name}}}" '
            from_where = f", with the secret from ${name} in your shell"
        lines += [
            f"Ask the forward-auth endpoint as a proxy would{from_where} (204 and "
            "X-Devicegate-Kind when admitted):",
            f'  curl -sS -o /dev/null -D - -H "Authorization: Bearer $TOKEN" '
            f"-H {shlex.quote(f'{device_header}: {DEMO_INSTANCE_ID}')} "
            f"-H 'X-Original-URI: /' {secret}{base}{settings.forward_auth_path}",
        ]
    return "\n".join(lines) + "\n"


# The rate limits serve applies unless told otherwise: generous for an app server minting for
# a fleet, tight for one device (which needs a token every few minutes) and for guessing.
SERVE_RATE_LIMITS = {
    "mint_limit_per_key": "6000/minute",
    "mint_limit_per_device": "10/minute",
    "failure_limit_per_address": "100/minute",
}


def _rate_limit_env(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit variables a flag sets, and serve's defaults for those nobody set."""
    try:
        import limits  # noqa: F401 - only whether it is there
    except ImportError:
        has_limits = False
    else:
        has_limits = True
    env = {}
    for field, default in SERVE_RATE_LIMITS.items():
        variable = env_variable(field)
        given = getattr(args, field)
        if given is not None:
            flag = "--" + field.replace("_", "-")
            value = given.strip()
            check_limit(flag, None if value.lower() == "none" else value)
            env[variable] = value
        elif has_limits and not environ.get(variable, "").strip():
            env[variable] = default
    return env


def _rate_limit_line(settings: ServeSettings, config: GateConfig, workers: int) -> str:
    limits = [
        f"minting {config.mint_limit_per_key} per server key"
        if config.mint_limit_per_key
        else None,
        f"{config.mint_limit_per_device} per device" if config.mint_limit_per_device else None,
        f"{config.failure_limit_per_address} failed authentications per client address"
        if config.failure_limit_per_address
        else None,
    ]
    shown = [limit for limit in limits if limit is not None]
    if not shown:
        return "rate limits: off"
    if settings.redis_url is not None:
        where = "counted in Redis, one limit across workers and instances"
    elif workers > 1:
        where = f"counted in memory by each of the {workers} workers (--redis for one limit)"
    else:
        where = "counted in memory"
    return f"rate limits: {', '.join(shown)} ({where}; 429 with Retry-After)"


def _revocation_line(settings: ServeSettings, config: GateConfig, base: str, workers: int) -> str:
    if settings.revoke_path is None:
        return "revocation endpoint: off (--revoke-path none)"
    if not config.api_keys:
        return "revocation endpoint: off (needs an api_key)"
    if settings.redis_url is not None:
        return (
            f"revocation endpoint: POST {base}{settings.revoke_path} (server API key only; "
            "devicegate revoke), shared with every worker and instance through Redis"
        )
    if workers > 1:
        # Said once at start, and answered 501 at the path: never a silent disagreement.
        return (
            f"revocation endpoint: off with {workers} workers: an in-memory revocation list "
            "lives in one process, so a revocation would hold in one worker only (a shared "
            f"store is needed: --redis URL); POST {settings.revoke_path} answers 501"
        )
    return (
        f"revocation endpoint: POST {base}{settings.revoke_path} (server API key only; "
        "devicegate revoke)"
    )


# The settings a user names on the command line: the argument that sets it, its flag, and the
# variable read without it.
_SERVE_OPTIONS = {
    "token_path": ("token_path", "--token-path", "DEVICEGATE_TOKEN_PATH"),
    "revoke_path": ("revoke_path", "--revoke-path", "DEVICEGATE_REVOKE_PATH"),
    "forward_auth_path": (
        "forward_auth_path",
        "--forward-auth-path",
        "DEVICEGATE_FORWARD_AUTH_PATH",
    ),
    "rules": ("rule", "--rule", "DEVICEGATE_RULES"),
    "public": ("public", "--public", "DEVICEGATE_PUBLIC"),
}


def _serve_sources(args: argparse.Namespace) -> dict[str, str]:
    """Each setting by the name the user gave it: its flag when given, else its variable."""
    return {
        field: flag if getattr(args, argument) is not None else variable
        for field, (argument, flag, variable) in _SERVE_OPTIONS.items()
    }


def _check_serve_paths(settings: ServeSettings, sources: Mapping[str, str]) -> None:
    """Refuse, in the user's words, the paths and rules ``build_app`` would refuse in its own:
    the flag or variable, and ``none`` rather than Python's ``None``."""
    for field, example, may_be_off in (
        ("token_path", DEFAULT_TOKEN_PATH, True),
        ("revoke_path", DEFAULT_REVOKE_PATH, True),
        ("forward_auth_path", DEFAULT_FORWARD_AUTH_PATH, False),
    ):
        path = getattr(settings, field)
        if path is not None and ("*" in path or has_unsafe_segments(path)):
            off = ", or none to turn it off" if may_be_off else ""
            raise ConfigError(
                sources[field], f"must be an absolute path such as {example}{off}; got {path!r}"
            )
    for rule in settings.rules:
        parse_rule(rule, sources["rules"])


def _in_user_words(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """``exc`` named after the flag or variable of its setting, when it has one."""
    shown = sources.get(exc.field)
    if shown is None:
        return exc
    return ConfigError(shown, str(exc).removeprefix(f"{exc.field}: "))


def _serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str], log_format: str = "text"
) -> ServeSettings:
    if args.upstream_timeout is not None:  # the flag wins: its variable is not even read
        environ = {k: v for k, v in environ.items() if k != "DEVICEGATE_UPSTREAM_TIMEOUT"}
    settings = ServeSettings.from_env(environ)
    flags: dict[str, Any] = {
        "secrets_file": args.secrets,
        "upstream": args.upstream,
        "upstream_secrets_file": args.upstream_secrets,
        "upstream_timeout": None
        if args.upstream_timeout is None
        else parse_timeout("--upstream-timeout", args.upstream_timeout),
        "forward_auth_path": args.forward_auth_path,
        "forward_auth_secret_env": args.forward_auth_secret_env,
    }
    changes = {name: value for name, value in flags.items() if value is not None}
    if args.public is not None:
        changes["public"] = tuple(args.public)
    if args.rule is not None:
        changes["rules"] = tuple(args.rule)
    if args.token_path is not None:
        changes["token_path"] = None if args.token_path.lower() == "none" else args.token_path
    if args.revoke_path is not None:
        changes["revoke_path"] = None if args.revoke_path.lower() == "none" else args.revoke_path
    if args.redis is not None:
        changes["redis_url"] = args.redis
    if args.redis_fail_open:
        changes["redis_fail_open"] = True
    settings = dataclasses.replace(settings, **changes)
    _check_serve_paths(settings, _serve_sources(args))
    if settings.secrets_file is None and not has_env_credentials(environ):
        path = Path(DEFAULT_SECRETS_FILE).absolute()
        try:
            write_secrets_file(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CommandError(f"cannot create {path}: {exc.strerror or exc}") from None
        else:
            notice = f"devicegate: created {path} with fresh random keys (mode 0600)"
            sys.stderr.write(log_line(notice, log_format))
        settings = dataclasses.replace(settings, secrets_file=str(path))
    elif settings.secrets_file is not None:
        # Absolute, so that the printed command works from any directory.
        settings = dataclasses.replace(
            settings, secrets_file=os.path.abspath(settings.secrets_file)
        )
    return settings


# The gateway's limits: each flag, and the variable it stands for.
_PROXY_LIMIT_FLAGS = {
    "upstream_connections": ("--upstream-connections", "DEVICEGATE_UPSTREAM_CONNECTIONS"),
    "max_concurrent": ("--max-concurrent", "DEVICEGATE_MAX_CONCURRENT"),
    "buffer_bytes": ("--buffer-bytes", "DEVICEGATE_BUFFER_BYTES"),
    "client_timeout": ("--client-timeout", "DEVICEGATE_CLIENT_TIMEOUT"),
    "min_client_rate": ("--min-client-rate", "DEVICEGATE_MIN_CLIENT_RATE"),
}


def _proxy_limit_env(args: argparse.Namespace) -> dict[str, str]:
    """The gateway limits given as flags, as the variables they stand for; checked here, so
    that a bad value is named by its flag."""
    given = {
        variable: getattr(args, argument)
        for argument, (_, variable) in _PROXY_LIMIT_FLAGS.items()
        if getattr(args, argument) is not None
    }
    for flag, variable in _PROXY_LIMIT_FLAGS.values():
        if variable in given and not given[variable].strip():
            # A blank variable counts as unset; a blank flag is a mistake, not a default.
            raise ConfigError(flag, "needs a value")
    try:
        ProxyLimits.from_env(given)
    except ConfigError as exc:
        flags = {variable: flag for flag, variable in _PROXY_LIMIT_FLAGS.values()}
        raise _in_user_words(exc, flags) from None
    return given


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CommandError(f"serve needs uvicorn: {SERVER_EXTRA_HINT}", EXIT_USAGE) from None
    # Flags and serve's own defaults, read as their variables are, by the start-up, every SIGHUP
    # reload and every worker.
    flag_env: dict[str, str] = {}
    if args.jwks_url is not None:
        flag_env[env_variable("jwks_url")] = check_jwks_url("--jwks-url", args.jwks_url)
    if args.public_url is not None:
        try:
            check_public_url(args.public_url)
        except ConfigError as exc:
            raise _in_user_words(exc, {"public_url": "--public-url"}) from None
        flag_env[env_variable("public_url")] = args.public_url
    if args.dpop_nonce:
        flag_env[env_variable("dpop_nonce")] = "true"
    flag_env.update(_rate_limit_env(args, environ))
    flag_env.update(_proxy_limit_env(args))
    environ = {**environ, **flag_env}
    host = args.host or environ.get("DEVICEGATE_HOST", "").strip() or DEFAULT_HOST
    port = args.port or _env_int(environ, "DEVICEGATE_PORT", 1, 65535) or DEFAULT_PORT
    workers = args.workers or _env_int(environ, "DEVICEGATE_WORKERS", 1, 1024) or 1
    log_level = _env_choice(args.log_level, environ, "DEVICEGATE_LOG_LEVEL", LOG_LEVELS, "info")
    log_format = _env_choice(args.log_format, environ, "DEVICEGATE_LOG_FORMAT", LOG_FORMATS, "text")
    settings = dataclasses.replace(_serve_settings(args, environ, log_format), workers=workers)
    config = settings.load_config(environ)
    metrics = _metrics_option(args, environ, port=port, workers=workers)
    counters = None if metrics is None else Counters()
    try:
        app = settings.build(environ, config, counters=counters)
    except ConfigError as exc:
        raise _in_user_words(exc, _serve_sources(args)) from None
    except ImportError as exc:
        if exc.name == "httpx":
            raise CommandError(f"--upstream needs httpx: {SERVER_EXTRA_HINT}", EXIT_USAGE) from None
        raise CommandError(f"cannot load {exc.name}: {exc}", EXIT_USAGE) from None
    worker_env = {**settings.to_env(), **flag_env} if workers > 1 else {}
    if workers > 1 and settings.redis_url is not None:
        # Built here only to check the settings: each worker opens its own connections.
        app.gate.verifier.revocations.close()  # type: ignore[union-attr]
    _check_port(host, port)
    if metrics is not None:
        _check_port(*metrics, flag="--metrics")
    if settings.upstream is not None and not args.no_upstream_check:
        _check_upstream_reachable(settings.upstream, settings.upstream_timeout)
    banner = serve_banner(
        settings, config, environ, host=host, port=port, workers=workers, metrics=metrics
    )
    sys.stderr.write(log_line(banner, log_format))
    if settings.redis_url is not None and settings.redis_fail_open:
        sys.stderr.write(
            log_line(
                "devicegate: WARNING: fail-open is on: while Redis cannot be reached, tokens "
                "are admitted without checking revocations made meanwhile",
                log_format,
            )
        )
    sys.stderr.flush()
    if metrics is not None and counters is not None:
        _serve_metrics(counters, app.gate, *metrics)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "lifespan": "on",
        "server_header": False,
        "log_config": log_config(log_level, log_format),
    }
    if workers > 1:
        # Workers are fresh processes that import the app by name; they read the same
        # settings from the environment (paths and variable names only, never secrets).
        os.environ.update(worker_env)
        uvicorn.run(WORKER_FACTORY, factory=True, workers=workers, **options)
    else:
        uvicorn.run(app, **options)
    return EXIT_OK


# -- argument parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own format (usage, then "prog: error: ..."), with our exit status.
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _secrets_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secrets",
        metavar="FILE",
        help="the secrets.json to use (env DEVICEGATE_SECRETS_FILE; default ./secrets.json, or "
        "DEVICEGATE_API_KEYS / DEVICEGATE_JWT_SECRET when set)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``devicegate`` argument parser."""
    parser = _Parser(
        prog="devicegate",
        description="Device-bound JWT and API-key authentication for ASGI apps.",
        epilog="Exit status: 0 success, 1 failure (verify: invalid token; revoke: refused or "
        "unreachable), 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"devicegate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="write a secrets.json with fresh random keys",
        description="Write a SenseCrypt-format secrets.json (api_key, mobile_api_key, "
        "jwt_secret: 32 random bytes each, base64) with file mode 0600. Never overwrites.",
    )
    init.add_argument(
        "--path", default=DEFAULT_SECRETS_FILE, help="where to write it (default: %(default)s)"
    )
    init.add_argument(
        "--algorithm",
        choices=["HS256", "EdDSA", "ES256"],
        default="HS256",
        help="how tokens are signed: HS256 writes a jwt_secret; EdDSA (Ed25519) and ES256 "
        "(P-256) write a jwt_private_key and need devicegate[crypto] (default: %(default)s)",
    )
    init.add_argument(
        "--forward-auth-secret",
        metavar="FILE",
        nargs="?",
        const="forward-secret.env",
        help=f"also write FILE (mode 0600; without a value: %(const)s) setting "
        f"{FORWARD_SECRET_VARIABLE} to a fresh secret for the forward-auth endpoint, for "
        "systemd's EnvironmentFile=, docker --env-file or 'set -a; . FILE; set +a'; use it with "
        f"serve --forward-auth-secret-env {FORWARD_SECRET_VARIABLE}. Never printed",
    )
    init.set_defaults(handler=_init)

    serve = commands.add_parser(
        "serve",
        help="run the gateway (the token endpoint plus the demo app or an upstream)",
        description="Run the gateway with uvicorn: the token endpoint, and behind the "
        "middleware the built-in demo app or, with --upstream, a reverse proxy. Every option "
        "can also come from the environment variable named in its help; flags win. Without "
        "--secrets or credentials in the environment, ./secrets.json is used and created with "
        "fresh keys when missing.",
    )
    _secrets_argument(serve)
    serve.add_argument(
        "--host", help=f"address to listen on (env DEVICEGATE_HOST; default {DEFAULT_HOST})"
    )
    serve.add_argument(
        "--port",
        type=_int_arg(1, 65535),
        help=f"port (env DEVICEGATE_PORT; default {DEFAULT_PORT})",
    )
    serve.add_argument(
        "--workers",
        type=_int_arg(1, 1024),
        help="worker processes (env DEVICEGATE_WORKERS; default 1)",
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="forward admitted requests to this URL instead of serving the demo app "
        "(env DEVICEGATE_UPSTREAM)",
    )
    serve.add_argument(
        "--upstream-timeout",
        metavar="SECONDS",
        help="how long to wait for the upstream to connect, take the body or answer before "
        "answering 504, and for the client's body to go on before answering 408 "
        "(env DEVICEGATE_UPSTREAM_TIMEOUT; default 30)",
    )
    serve.add_argument(
        "--upstream-connections",
        metavar="N",
        help="the most connections to the upstream, pooled; half of them at most stream large "
        "bodies or responses (env DEVICEGATE_UPSTREAM_CONNECTIONS; default 100)",
    )
    serve.add_argument(
        "--max-concurrent",
        metavar="N",
        help="the most requests in the gateway at once; the next gets 503 with Retry-After "
        "(env DEVICEGATE_MAX_CONCURRENT; default 1000)",
    )
    serve.add_argument(
        "--buffer-bytes",
        metavar="N",
        help="request bodies and responses up to this size are read whole, so that a slow "
        "client never holds an upstream connection (env DEVICEGATE_BUFFER_BYTES; default "
        "262144)",
    )
    serve.add_argument(
        "--client-timeout",
        metavar="SECONDS",
        help="the time a client has to send a body (else 408) or read a response (else it is "
        "cut off), plus a second per --min-client-rate bytes (env DEVICEGATE_CLIENT_TIMEOUT; "
        "default 30)",
    )
    serve.add_argument(
        "--min-client-rate",
        metavar="BYTES",
        help="bytes per second that earn a client one more second; 0: --client-timeout is "
        "all there is (env DEVICEGATE_MIN_CLIENT_RATE; default 1024)",
    )
    serve.add_argument(
        "--no-upstream-check",
        action="store_true",
        help="start even when the upstream does not accept connections yet (by default serve "
        "stops with an error)",
    )
    serve.add_argument(
        "--upstream-secrets",
        metavar="FILE",
        help="the upstream's secrets.json: its api_key and mobile_api_key are injected into "
        "forwarded requests (env DEVICEGATE_UPSTREAM_SECRETS_FILE)",
    )
    serve.add_argument(
        "--public",
        metavar="PATH",
        nargs="+",
        action="extend",
        help="route paths that need no credential, exact or ending in /* (env DEVICEGATE_PUBLIC, "
        "comma-separated; /health is always public)",
    )
    serve.add_argument(
        "--rule",
        metavar="PATH=KINDS",
        action="append",
        help="what a path accepts, repeatable: --rule '/admin/*=api_key', --rule "
        "'/mobile/*=mobile_api_key,device_token', the kind dpop for device tokens with a DPoP "
        "proof (env DEVICEGATE_RULES, ';' between rules); "
        "the first match wins, after /health and --public; paths without a rule accept every "
        "kind",
    )
    serve.add_argument(
        "--forward-auth-path",
        metavar="PATH",
        nargs="?",
        const=DEFAULT_FORWARD_AUTH_PATH,
        help="answer forward-auth requests (nginx auth_request, Traefik, Caddy) on this path "
        f"(env DEVICEGATE_FORWARD_AUTH_PATH; without a value: {DEFAULT_FORWARD_AUTH_PATH})",
    )
    serve.add_argument(
        "--forward-auth-secret-env",
        metavar="NAME",
        help="the name of an environment variable holding a secret the proxy must send to the "
        "forward-auth endpoint (env DEVICEGATE_FORWARD_AUTH_SECRET_ENV)",
    )
    serve.add_argument(
        "--token-path",
        metavar="PATH",
        help=f"path of the token endpoint, or 'none' (env DEVICEGATE_TOKEN_PATH; default "
        f"{DEFAULT_TOKEN_PATH})",
    )
    serve.add_argument(
        "--revoke-path",
        metavar="PATH",
        help=f"path of the revocation endpoint, or 'none' (env DEVICEGATE_REVOKE_PATH; default "
        f"{DEFAULT_REVOKE_PATH}; off with --workers above 1 unless --redis is given)",
    )
    serve.add_argument(
        "--jwks-url",
        metavar="URL",
        help="also accept device tokens signed by the keys of this JWK Set, minted by another "
        "issuer: https://, or http:// on loopback (env DEVICEGATE_JWKS_URL)",
    )
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="the URL clients reach this server at (https://api.example.com): DPoP proofs "
        "must name it; without it DPoP requests are refused (env DEVICEGATE_PUBLIC_URL)",
    )
    serve.add_argument(
        "--dpop-nonce",
        action="store_true",
        help="require a server nonce in DPoP proofs, given out in DPoP-Nonce headers, so that "
        "no proof can be signed ahead of time (env DEVICEGATE_DPOP_NONCE)",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="share revocations with every worker and instance through this Redis, "
        "redis://[:password@]host[:port][/db] (env DEVICEGATE_REDIS_URL; needs the redis extra)",
    )
    serve.add_argument(
        "--redis-fail-open",
        action="store_true",
        help="admit tokens while Redis is unreachable instead of answering 503 (env "
        "DEVICEGATE_REDIS_FAIL_OPEN; DEVICEGATE_REDIS_STALENESS sets after how many seconds, "
        "default 5)",
    )
    for field, default in SERVE_RATE_LIMITS.items():
        what = {
            "mint_limit_per_key": "tokens minted per server API key (keys without a name share "
            "one count)",
            "mint_limit_per_device": "tokens minted per instance_id",
            "failure_limit_per_address": "failed authentications per client address; past it "
            "the address gets 429 until its window lets it in again",
        }[field]
        serve.add_argument(
            "--" + field.replace("_", "-"),
            metavar="LIMIT",
            help=f"at most this many {what}, as '10/minute', or 'none' (env "
            f"{env_variable(field)}; default {default}; counted in Redis with --redis)",
        )
    serve.add_argument(
        "--metrics",
        metavar="[ADDRESS:]PORT",
        help="serve Prometheus metrics on a listener of their own, never the API's "
        f"(env DEVICEGATE_METRICS; the address defaults to {DEFAULT_HOST}; one worker only; "
        f"needs {METRICS_EXTRA_HINT})",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="the log level of uvicorn and of devicegate's own lines, the audit trail of "
        "refusals, mints and revocations included (env DEVICEGATE_LOG_LEVEL; default info)",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text, or json: one JSON object per line with time, level, logger, message and "
        "the audit trail's facts under 'devicegate' (env DEVICEGATE_LOG_FORMAT; default text)",
    )
    serve.set_defaults(handler=_serve)

    token = commands.add_parser(
        "token",
        help="print a fresh access token",
        description="Print a fresh access token, and nothing else, on one line.",
    )
    token.add_argument("--instance-id", metavar="ID", help="bind the token to this device id")
    token.add_argument("--sub", metavar="SUBJECT", help="the token's subject (a user id, say)")
    token.add_argument(
        "--claim",
        metavar="NAME=JSON",
        action="append",
        help="add an application claim, its value as JSON (repeatable): --claim tier=2, "
        "--claim roles='[\"reader\"]', --claim team='\"blue\"'",
    )
    token.add_argument(
        "--lifetime",
        metavar="SECONDS",
        type=int,
        help="seconds until the token expires, at most the configured jwt_expire_seconds "
        "(the default)",
    )
    _secrets_argument(token)
    token.set_defaults(handler=_token)

    verify = commands.add_parser(
        "verify",
        help="say whether a token is valid, and if not why",
        description="Say whether TOKEN is valid for this configuration. Valid: print its kind, "
        "device and expiry, exit 0. Invalid: print why, exit 1. Prefer 'devicegate verify -' "
        "with the token on stdin: a token on the command line shows in ps and in the shell "
        "history.",
    )
    verify.add_argument(
        "token",
        metavar="TOKEN",
        help="the token, or '-' to read it from stdin (keeps it out of ps and shell history)",
    )
    verify.add_argument("--instance-id", metavar="ID", help="the device id the request would carry")
    _secrets_argument(verify)
    verify.set_defaults(handler=_verify)

    revoke = commands.add_parser(
        "revoke",
        help="revoke tokens on a running server",
        description="Ask a running 'devicegate serve' to revoke one token, every token of a "
        "device or a subject, or every token, with the server API key from the secrets file. "
        "A revoked token is refused on its next request. Prints what was revoked; exit 1 when "
        "the server refuses or cannot be reached.",
    )
    targets = revoke.add_mutually_exclusive_group(required=True)
    targets.add_argument("--jti", metavar="ID", help="the one token with this jti")
    targets.add_argument("--device", metavar="ID", help="every token bound to this instance_id")
    targets.add_argument("--sub", metavar="SUBJECT", help="every token of this subject")
    targets.add_argument("--all", action="store_true", help="every token")
    revoke.add_argument(
        "--before",
        metavar="UNIXTIME",
        type=_before_argument,
        help="only tokens issued at or before this Unix time (default: now; not with --jti)",
    )
    revoke.add_argument(
        "--url",
        help="the server (env DEVICEGATE_URL; default http://DEVICEGATE_HOST:DEVICEGATE_PORT, "
        f"that is http://{DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    revoke.add_argument(
        "--revoke-path",
        metavar="PATH",
        help=f"the server's revocation path (env DEVICEGATE_REVOKE_PATH; default "
        f"{DEFAULT_REVOKE_PATH})",
    )
    _secrets_argument(revoke)
    revoke.set_defaults(handler=_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, os.environ)
    except CommandError as exc:
        print(f"devicegate: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"devicegate: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
