"""``python -m gateway.keys new NAME``: make an API key, print it once and the line that configures it.

The key (``secrets.token_urlsafe(32)``, 256 random bits) goes to the client and nowhere else; the gateway is
given only ``NAME:sha256hex`` (a line of API_KEYS_FILE, or an entry of API_KEYS). Nothing is written to disk
and no setting is read. To rotate a client's key: add a new line with the same name, let the client switch
(the gateway re-reads the file by itself, or on SIGHUP), then delete the old line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.apikeys import check_name, key_line, new_key
from shared.cli import EXIT_OK

DESCRIPTION = "Make an API key for the gateway: print the key once, and the line to add to API_KEYS_FILE."
EPILOG = """\
example:
  python -m gateway.keys new crm-bot-1
  then give the key to the client and append the line to API_KEYS_FILE; the line is NAME:SHA256HEX, and
  NAME:SHA256HEX:RATE:BURST gives this key its own rate limit (requests/s, bucket size; RATE 0 = unlimited)

exit codes:
  0  key printed
  2  bad command-line arguments (a name is 1-64 letters, digits, '_', '.', '-')"""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m gateway.keys", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = commands.add_parser("new", help="make a key named NAME", description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("name", metavar="NAME", help="the key's name: in logs, metrics and the processed records")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        check_name(arguments.name)
    except ValueError as exc:
        parser().error(str(exc))
    key = new_key()
    print(f"API key for {arguments.name} (shown once: give it to the client, keep no copy):")
    print(f"  {key}")
    print("Line to add to API_KEYS_FILE (or an entry of API_KEYS):")
    print(f"  {key_line(arguments.name, key)}")
    print("Clients send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
