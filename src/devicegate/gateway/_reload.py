"""New keys and secrets in a running ``devicegate serve``, without a restart: on SIGHUP.

:class:`ReloadableApp` is the app ``build_app`` returns: the assembled gateway plus the parts a
new configuration must reach (the gate, and the forward-auth endpoint when there is one), so
that :meth:`~ReloadableApp.reconfigure` puts a configuration in force in all of them or in none.
Given a way to read the configuration again, it listens for SIGHUP for as long as the server's
lifespan runs, reads the file in a worker thread and puts it in force for new requests; a file
the configuration refuses is logged in one line and the configuration in force stays. Requests
under way finish under the configuration they started with.

Only anyio is used, so the listener runs under asyncio and trio alike.

References:
    https://pubs.opengroup.org/onlinepubs/9799919799/basedefs/signal.h.html (SIGHUP)
    https://asgi.readthedocs.io/en/latest/specs/lifespan.html
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._config import GateConfig
from .._errors import ConfigError
from .._middleware import DeviceAuthMiddleware

if TYPE_CHECKING:
    from .forward_auth import ForwardAuth

__all__ = ["ReloadableApp", "can_receive_hangup"]

logger = logging.getLogger("devicegate")


def can_receive_hangup() -> bool:
    """Whether this platform has SIGHUP and this is the main thread (the only one that may
    install a signal handler)."""
    return hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()


class ReloadableApp:
    """The app ``devicegate serve`` runs, which a new configuration reaches as a whole.

    Args:
        app: the assembled ASGI app (what every scope is handed to).
        gate: the middleware inside ``app``.
        forward_auth: the forward-auth endpoint inside ``app``, if any.
        check: raises :class:`~devicegate.ConfigError` for a configuration this app cannot
            take (one that shares a value with the upstream's keys, say).
        load: reads the configuration again; with it, SIGHUP puts what it returns in force.
        source: what ``load`` reads, for the log line ("/etc/devicegate/secrets.json").
        on_shutdown: called (in a worker thread) when the server shuts down, before it is told
            the app is done: a shared store's thread and connections are closed there.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: DeviceAuthMiddleware,
        forward_auth: ForwardAuth | None = None,
        check: Callable[[GateConfig], None] | None = None,
        load: Callable[[], GateConfig] | None = None,
        source: str = "the configuration",
        on_shutdown: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.app = app
        self._on_shutdown = tuple(on_shutdown)
        self.gate = gate
        self.forward_auth = forward_auth
        self._check = check
        self._load = load
        self._source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}(app={self.app!r})"

    @property
    def config(self) -> GateConfig:
        """The configuration in force."""
        return self.gate.config

    def reconfigure(self, config: GateConfig) -> None:
        """Put ``config`` in force for every request that starts from now on, in the gate and
        the forward-auth endpoint together; revocations are kept.

        Raises:
            ConfigError: ``config`` does not fit; nothing has changed.
        """
        if self._check is not None:
            self._check(config)
        before, verifier = self.gate.config, self.gate.verifier
        self.gate.reconfigure(config)
        if self.forward_auth is not None:
            try:
                self.forward_auth.reconfigure(config)
            except BaseException:
                # Both or neither: the gate goes back to exactly what it had, cache included.
                self.gate.reconfigure(before, verifier=verifier)
                raise

    async def reload(self) -> bool:
        """Read the configuration again and put it in force; log one line either way.

        Returns whether the new configuration is in force. Never raises for a bad file: the
        configuration in force stays, so a typo cannot take the server down.
        """
        if self._load is None:
            return False
        try:
            # A file read (and the key checks) off the event loop: requests go on meanwhile.
            config = await anyio.to_thread.run_sync(self._load)
            self.reconfigure(config)
        except ConfigError as exc:
            # ConfigError messages name the field and never hold a secret value.
            logger.error("devicegate: reload refused, the configuration in force stays: %s", exc)
            return False
        except Exception as exc:
            logger.error(
                "devicegate: reload failed (%s), the configuration in force stays",
                type(exc).__name__,
            )
            return False
        logger.info(
            "devicegate: reloaded %s: new keys and secrets apply to new requests", self._source
        )
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self._on_shutdown:
            send = self._closing_first(send)
        if scope["type"] == "lifespan" and self._load is not None and can_receive_hangup():
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _closing_first(self, send: Send) -> Send:
        async def send_after_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                for close in self._on_shutdown:
                    try:
                        await anyio.to_thread.run_sync(close)
                    except Exception as exc:
                        logger.error(
                            "devicegate: closing at shutdown failed (%s)", type(exc).__name__
                        )
            await send(message)

        return send_after_closing

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            # Listening before startup completes: a SIGHUP sent once the server answers is
            # never the default action (which ends the process).
            await tasks.start(self._listen)
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                error = exc  # raised below as itself, not wrapped in an exception group
            finally:
                tasks.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _listen(self, *, task_status: TaskStatus[None]) -> None:
        with contextlib.ExitStack() as stack:
            try:
                hangups = stack.enter_context(anyio.open_signal_receiver(signal.SIGHUP))
            except (NotImplementedError, RuntimeError, ValueError) as exc:
                # An event loop that cannot take signal handlers: serve on, without reloads.
                logger.warning(
                    "devicegate: cannot listen for SIGHUP here (%s); restart to reload the "
                    "configuration",
                    type(exc).__name__,
                )
                task_status.started()
                return
            task_status.started()
            async for _ in hangups:
                await self.reload()
