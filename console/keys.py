"""Who may use the console: keys by name with a role, or nobody's keys on a loopback address. Pure: no I/O.

An entry is ``name:sha256hex:role`` — the ``name:sha256hex`` line that ``python -m gateway.keys new NAME`` prints,
with ``:viewer`` (read) or ``:operator`` (read, replay, drop, reveal) appended — one per line of
``CONSOLE_KEYS_FILE`` (``#`` comments and blank lines allowed) or comma-separated in ``CONSOLE_KEYS``. Parsing
and the constant-time lookup are the gateway's (``shared.apikeys``); a parse error names the line, never its
text. One name may have several keys (a rotation), all with the same role.

Without keys the console is open — everyone an operator — and so it listens on a loopback address only: a
``CONSOLE_HOST`` anyone else can reach refuses to start (``access_for``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from shared.apikeys import KeyRing, parse_entries

Role = Literal["viewer", "operator"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "operator")
# The actor named in audit rows when the console runs without keys.
OPEN_ACTOR: Final = "console (no keys)"


@dataclass(frozen=True)
class ConsoleKeys:
    ring: KeyRing
    roles: dict[str, Role]

    def __len__(self) -> int:
        return len(self.ring)

    def find(self, presented: str) -> tuple[str, Role] | None:
        """(name, role) of the key whose SHA-256 is that of ``presented``, or None (constant time)."""
        key = self.ring.find(presented)
        return (key.name, self.roles[key.name]) if key is not None else None

    def role_of(self, name: str) -> Role | None:
        """The role ``name`` has now (None: no longer configured)."""
        return self.roles.get(name)


def parse_console_entries(entries: Iterable[tuple[int, str]], unit: str) -> ConsoleKeys:
    numbered = list(entries)
    roles: dict[str, Role] = {}
    first_line: dict[str, int] = {}
    without_roles: list[tuple[int, str]] = []
    for number, text in numbered:
        head, colon, role = text.strip().rpartition(":")
        if not colon or role not in ROLES or head.count(":") != 1:
            raise ValueError(f"{unit} {number}: expected name:sha256hex:role with role viewer or operator")
        name = head.split(":", 1)[0].strip()
        if roles.setdefault(name, "operator" if role == "operator" else "viewer") != role:
            raise ValueError(f"{unit} {number}: key name {name!r} has another role on {unit} {first_line[name]}")
        first_line.setdefault(name, number)
        without_roles.append((number, head))
    return ConsoleKeys(parse_entries(without_roles, unit), roles)


def parse_console_keys_file(text: str) -> ConsoleKeys:
    numbered = ((number, line.split("#", 1)[0]) for number, line in enumerate(text.splitlines(), start=1))
    return parse_console_entries(((n, line) for n, line in numbered if line.strip()), "line")


def parse_console_keys_variable(value: str) -> ConsoleKeys:
    return parse_console_entries(
        ((number, entry) for number, entry in enumerate(value.split(","), start=1) if entry.strip()), "entry")


def load_console_keys(keys: str, keys_file: str) -> ConsoleKeys:
    """The keys of CONSOLE_KEYS or CONSOLE_KEYS_FILE (ValueError naming the setting and the line)."""
    if keys_file.strip():
        try:
            text = Path(keys_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"CONSOLE_KEYS_FILE {keys_file}: {exc.strerror or exc}") from None
        try:
            return parse_console_keys_file(text)
        except ValueError as exc:
            raise ValueError(f"CONSOLE_KEYS_FILE {keys_file}: {exc}") from None
    try:
        return parse_console_keys_variable(keys)
    except ValueError as exc:
        raise ValueError(f"CONSOLE_KEYS: {exc}") from None


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: 127.0.0.0/8, ::1 or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_open_console(host: str, keys: ConsoleKeys) -> None:
    """Refuse (ValueError) a console without keys on an address others can reach."""
    if not len(keys) and not is_loopback(host):
        raise ValueError(
            f"CONSOLE_HOST={host} is not a loopback address and no console keys are set: set CONSOLE_KEYS or "
            "CONSOLE_KEYS_FILE (name:sha256hex:role lines), or listen on 127.0.0.1")
