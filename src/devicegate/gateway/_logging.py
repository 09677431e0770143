"""How ``devicegate serve`` writes its log: uvicorn's lines and devicegate's own (the
``devicegate`` logger and its ``devicegate.audit`` child), at one level, as text or as JSON.

JSON is one object per line, for log pipelines (Loki, Elasticsearch, CloudWatch)::

    {"time": "2026-01-31T09:15:02.114Z", "level": "INFO", "logger": "devicegate.audit",
     "message": "devicegate refused a request: reason=expired ...",
     "devicegate": {"event": "refused", "reason": "expired", "status": 401, ...}}

The audit trail's facts (``record.devicegate``) are nested under ``"devicegate"`` rather than
flattened, so that no fact can overwrite ``time``, ``level`` or ``message``. JSON escapes every
control character, so a value the client chose cannot start a line of its own.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "log_config", "log_line"]

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, the audit facts under ``devicegate`` and, when the record carries
    one, the ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        facts = getattr(record, "devicegate", None)
        if isinstance(facts, Mapping):
            entry["devicegate"] = dict(facts)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: a fact that is an enum or another plain value is written as its text.
        return json.dumps(entry, default=str)


def log_config(log_level: str, log_format: str) -> dict[str, Any]:
    """uvicorn's logging configuration, with devicegate's loggers written the same way at
    ``log_level``, every line in ``log_format`` (``text``: uvicorn's own; ``json``)."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("loggers", {})["devicegate"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    if log_format == "json":
        # Every formatter, uvicorn's access lines included: a pipeline that reads JSON lines
        # must never meet one that is not.
        json_formatter = {"()": f"{__name__}.JsonFormatter"}
        config["formatters"] = dict.fromkeys(config["formatters"], json_formatter)
    return config


def log_line(message: str, log_format: str, *, level: int = logging.INFO) -> str:
    """``message`` as the ``devicegate`` logger would write it in ``log_format``, for what
    ``serve`` says before uvicorn has set logging up (the banner)."""
    if log_format != "json":
        return message if message.endswith("\n") else message + "\n"
    record = logging.LogRecord("devicegate", level, __name__, 0, message.rstrip("\n"), (), None)
    return JsonFormatter().format(record) + "\n"
