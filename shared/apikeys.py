"""API keys: the configured entries, how they are parsed, and the constant-time lookup. Pure: no I/O.

An entry is ``name:sha256hex`` or ``name:sha256hex:rate:burst`` (a per-key rate limit, see
``gateway.token_bucket``). Entries come one per line from ``API_KEYS_FILE`` (``#`` comments and blank lines
allowed) or comma-separated from ``API_KEYS``. Only the SHA-256 of a key is ever configured or held; the key
itself exists in the caller's header and, for one ``hashlib`` call, here.

Lookup (``KeyRing.find``): hash what the caller presented, then ``hmac.compare_digest`` it against *every*
configured digest and remember the match without stopping early, so the time taken says neither whether a key
matched nor which one. A parse error names the line (or entry) number and what is wrong, never the line's
text: a line that does not parse may well be a raw key pasted by mistake.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# Key names become log fields and metric label values: short, and nothing that needs quoting anywhere.
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGEST_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")
NEW_KEY_BYTES: Final = 32  # secrets.token_urlsafe(32): 256 random bits, 43 characters


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its name, the SHA-256 digest of the key, and an optional rate-limit override.

    ``rate`` None: the gateway's RATE_LIMIT applies; 0: this key is never limited; otherwise requests/s with a
    bucket of ``burst`` (0 = ceil(rate)).
    """

    name: str
    digest: bytes
    rate: float | None = None
    burst: int | None = None


class KeyRing:
    """The configured keys, looked up in constant time."""

    __slots__ = ("keys", "names")

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        self.names: frozenset[str] = frozenset(key.name for key in keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest is SHA-256(``presented``), or None; compares against every key, always."""
        digest = hash_key(presented)
        found: ApiKey | None = None
        for key in self.keys:
            # No early exit: every digest is compared whatever matched, so timing reveals nothing.
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def hash_key(key: str) -> bytes:
    """SHA-256 of a key as presented in a header (any text: surrogatepass never fails to encode)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    """A fresh random key (URL-safe text, 256 bits)."""
    return secrets.token_urlsafe(NEW_KEY_BYTES)


def key_line(name: str, key: str) -> str:
    """The ``name:sha256hex`` entry that configures ``key`` under ``name``."""
    check_name(name)
    return f"{name}:{hash_key(key).hex()}"


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            "key name must be 1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
        )


def parse_entry(entry: str) -> ApiKey:
    """One ``name:sha256hex[:rate:burst]`` entry; ValueError says what is wrong (never echoing the entry)."""
    parts = entry.strip().split(":")
    if len(parts) not in (2, 4):
        raise ValueError("expected name:sha256hex or name:sha256hex:rate:burst")
    name, digest_hex = parts[0].strip(), parts[1].strip()
    check_name(name)
    if not _DIGEST_HEX.fullmatch(digest_hex):
        raise ValueError("the second field must be the key's SHA-256 as 64 hex digits (not the key itself)")
    rate: float | None = None
    burst: int | None = None
    if len(parts) == 4:
        try:
            rate = float(parts[2])
        except ValueError:
            raise ValueError("rate must be a number of requests per second") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError("rate must be a finite number >= 0 (0 = this key is not limited)")
        try:
            burst = int(parts[3])
        except ValueError:
            raise ValueError("burst must be a whole number of requests") from None
        if burst < 0:
            raise ValueError("burst must be >= 0 (0 = ceil(rate))")
    return ApiKey(name=name, digest=bytes.fromhex(digest_hex), rate=rate, burst=burst)


def parse_entries(entries: Iterable[tuple[int, str]], unit: str) -> KeyRing:
    """A KeyRing from numbered entries; ``unit`` ("line", "entry") prefixes the number in error messages.

    The same name may appear on several lines (a client's old and new key during a rotation) with the same
    rate override; the same digest twice is a mistake.
    """
    keys: list[ApiKey] = []
    seen_digest: dict[bytes, int] = {}
    limits: dict[str, tuple[int, float | None, int | None]] = {}
    for number, text in entries:
        try:
            key = parse_entry(text)
        except ValueError as exc:
            raise ValueError(f"{unit} {number}: {exc}") from None
        if key.digest in seen_digest:
            raise ValueError(f"{unit} {number}: the same key hash as {unit} {seen_digest[key.digest]}")
        first = limits.setdefault(key.name, (number, key.rate, key.burst))
        if (first[1], first[2]) != (key.rate, key.burst):
            raise ValueError(f"{unit} {number}: key name {key.name!r} has a different rate:burst on {unit} {first[0]}")
        seen_digest[key.digest] = number
        keys.append(key)
    return KeyRing(keys)


def parse_keys_file(text: str) -> KeyRing:
    """The keys of an API_KEYS_FILE's text: one entry per line, ``#`` comments and blank lines skipped."""
    numbered = ((number, line.split("#", 1)[0]) for number, line in enumerate(text.splitlines(), start=1))
    return parse_entries(((number, line) for number, line in numbered if line.strip()), "line")


def parse_keys_variable(value: str) -> KeyRing:
    """The keys of API_KEYS: entries separated by commas (empty entries skipped)."""
    entries = ((number, entry) for number, entry in enumerate(value.split(","), start=1) if entry.strip())
    return parse_entries(entries, "entry")
