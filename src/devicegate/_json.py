"""Strict JSON for whatever devicegate reads from outside: tokens, request bodies, secrets files."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

__all__ = ["DuplicateMember", "loads_strict_json"]


class DuplicateMember(ValueError):
    """A JSON object names the same member twice. ``name`` is that member's name: a caller
    decides whether it may be shown (a token's content never is)."""

    def __init__(self, name: str) -> None:
        super().__init__("duplicate member")
        self.name = name


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # RFC 7515 §4 / RFC 7519 §4: duplicate member names are refused, so no other parser can
        # read a different instance_id or exp from the same token (or another jwt_secret from
        # the same secrets file: most parsers keep the last one, some the first).
        counts = Counter(name for name, _ in pairs)
        raise DuplicateMember(next(name for name, count in counts.items() if count > 1))
    return obj


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259 §6); Python's parser accepts them by default.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_no_constant)


def loads_strict_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate member names and the non-JSON ``NaN``/``Infinity``.

    A document with no whitespace around it (every token and proof) is read in one call of the
    parser; anything else, an error included, goes through ``decode``, which skips the
    whitespace and raises the error ``json.loads`` would.
    """
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError:
        end = -1
    if end == len(text):
        return value
    return _DECODER.decode(text)
