"""Unpadded base64url (RFC 7515 §2, RFC 4648 §5), canonical only: one text per value.

Every JWS segment, JWK member and ``base64url:`` secret devicegate reads goes through
:func:`decode`. Two texts that decode to the same bytes (stray low bits in the last character,
RFC 4648 §3.5) would be two tokens for one: the second is refused.
"""

from __future__ import annotations

import binascii

__all__ = ["decode", "encode", "encode_text"]

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# One pass both maps base64url to the standard alphabet ("-" to "+", "_" to "/") and marks
# every byte that is not base64url (the standard "+" and "/", "=", anything else) as "!",
# which no alphabet has: finding none then checks the whole text.
_INVALID = ord("!")  # searched for as an int: a one-byte bytes needle costs a failed int try
_STANDARD = ALPHABET.translate(bytes.maketrans(b"-_", b"+/"))  # the same order, "+/" last
_TO_STANDARD = bytes(
    _STANDARD[ALPHABET.index(byte)] if byte in ALPHABET else _INVALID for byte in range(256)
)
_FROM_STANDARD = bytes.maketrans(b"+/", b"-_")
# By the length modulo 4: the padding that completes the last quantum, and the characters the
# last one may be. Two characters carry one byte (4 bits unused), three carry two (2 unused):
# the canonical character has those bits zero.
_PADDING = {0: b"", 2: b"==", 3: b"="}
_CANONICAL_LAST = {
    2: frozenset(ALPHABET[::16]),
    3: frozenset(ALPHABET[::4]),
}


def decode(text: bytes | str) -> bytes | None:
    """The bytes that canonical, unpadded base64url ``text`` encodes; ``None`` for anything
    else (padding, another alphabet, a length no encoding has, stray low bits)."""
    if isinstance(text, str):
        if not text.isascii():
            return None
        text = text.encode("ascii")
    remainder = len(text) % 4
    padding = _PADDING.get(remainder)
    if padding is None:
        return None
    standard = text.translate(_TO_STANDARD)
    if _INVALID in standard:
        return None
    if remainder and text[-1] not in _CANONICAL_LAST[remainder]:
        return None
    return binascii.a2b_base64(standard + padding)


def encode(raw: bytes) -> bytes:
    """``raw`` as unpadded base64url."""
    return binascii.b2a_base64(raw, newline=False).translate(_FROM_STANDARD).rstrip(b"=")


def encode_text(raw: bytes) -> str:
    """``raw`` as unpadded base64url text."""
    return encode(raw).decode("ascii")
