"""The OpenAPI document derived from the models means what the hand-written one meant (``openapi_before.json``).

``openapi_before.json`` is the document as it was built before the field rules and the answers became pydantic
models and typed answers (``shared.model``, ``gateway.responses``), for two configurations: the default one,
and one with API keys, a rate limit and protected docs/metrics (401 and 429 answers, security schemes).
The comparison is by meaning: ``$ref`` resolved, keys unordered, ``required`` a set, ``anyOf``/``oneOf``
branches unordered, ``"type": [a, b]`` read as ``anyOf`` of the two, and what pydantic adds without saying
more is left out (``title``; ``"type"`` beside a ``const`` of that type). Schemas added under new names (the
types answers are made of) are allowed. Everything else — types, constraints, enums, patterns, formats,
descriptions, answers, headers and examples — must be equal.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.openapi import build_openapi
from shared.settings import Settings

BEFORE: dict[str, Any] = orjson.loads((Path(__file__).parent / "openapi_before.json").read_bytes())

SETTINGS = {
    "default": Settings(),
    "keys_limits_protected": Settings(
        api_keys=f"ops:{hashlib.sha256(b'k').hexdigest()}", rate_limit=5, protect_docs=True, protect_metrics=True
    ),
}

# Patterns written differently that accept the same strings, old -> new (each proven below).
# userId's "not blank": Python's \s (str.strip's, and the jsonschema validator's) includes U+001C..U+001F, the
# Rust regex engine pydantic validates with does not, so the model's pattern names them beside \s.
EQUIVALENT_PATTERNS = {
    r"^[^\u0000]*[^\s\u0000][^\u0000]*$": r"^[^\u0000]*[^\s\u0000\u001c-\u001f][^\u0000]*$",
}

_CONST_TYPES = {bool: "boolean", str: "string", int: "integer", float: "number"}


def _canonical(node: Any) -> bytes:
    return orjson.dumps(node, option=orjson.OPT_SORT_KEYS)


def meaning(document: dict[str, Any]) -> Any:
    """The document with every ``$ref`` inlined and what carries no meaning dropped (see the module docstring)."""

    def resolve(pointer: str) -> Any:
        node: Any = document
        for part in pointer.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def normalise(node: Any, in_info: bool = False) -> Any:
        if isinstance(node, list):
            return [normalise(item) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            rest = {key: value for key, value in node.items() if key != "$ref"}
            return normalise({**resolve(node["$ref"]), **rest})
        out = {key: normalise(value, in_info=key == "info") for key, value in node.items()
               if not (key == "title" and not in_info)}
        if isinstance(out.get("pattern"), str):
            out["pattern"] = EQUIVALENT_PATTERNS.get(out["pattern"], out["pattern"])
        if "const" in out and out.get("type") == _CONST_TYPES.get(type(out["const"])):
            del out["type"]
        if isinstance(out.get("type"), list):  # {"type": [a, b]} says what anyOf [{"type": a}, {"type": b}] says
            out["anyOf"] = [{"type": kind} for kind in out.pop("type")]
        if isinstance(out.get("required"), list):
            out["required"] = sorted(out["required"])
        for combinator in ("anyOf", "oneOf"):
            if isinstance(out.get(combinator), list):
                out[combinator] = sorted(out[combinator], key=_canonical)
        return out

    # Named schemas are compared by name too; the set of names may grow (the types the answers are made of).
    return normalise(document)


def named_schemas_kept(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after`` with only the component schemas ``before`` has (both already through ``meaning``)."""
    schemas = after["components"]["schemas"]
    kept = {name: schemas[name] for name in before["components"]["schemas"] if name in schemas}
    return {**after, "components": {**after["components"], "schemas": kept}}


def differences(before: Any, after: Any, where: str = "") -> Iterator[str]:
    """JSON pointers where the two differ, with both values (a readable failure instead of two huge dicts)."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                yield f"{where}/{key}: removed ({before[key]!r:.200})"
            elif key not in before:
                yield f"{where}/{key}: added ({after[key]!r:.200})"
            else:
                yield from differences(before[key], after[key], f"{where}/{key}")
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            yield from differences(old, new, f"{where}/{index}")
    elif before != after:
        yield f"{where}: {before!r:.300} -> {after!r:.300}"


@pytest.mark.parametrize("configuration", sorted(SETTINGS))
def test_the_derived_document_means_what_the_hand_written_one_meant(configuration: str) -> None:
    before = meaning(BEFORE[configuration])
    after = meaning(orjson.loads(orjson.dumps(build_openapi(SETTINGS[configuration]))))
    assert list(differences(before, named_schemas_kept(before, after))) == []


def test_the_user_id_patterns_accept_the_same_strings() -> None:
    # The new class adds U+001C..U+001F to [^\s...]: already in Python's \s, so nothing changes there.
    assert all(re.fullmatch(r"\s", chr(code)) for code in range(0x1C, 0x20))
    for text in ("a", " a ", "\x1c", "\x1ca\x1f", " \t", "\x00", "a\x00", "\u3000", "\ufeff"):
        for old, new in EQUIVALENT_PATTERNS.items():
            assert bool(re.search(old, text)) is bool(re.search(new, text)), repr(text)


def test_the_comparison_can_fail() -> None:
    # A changed constraint deep inside a referenced schema is seen through the $ref.
    document = orjson.loads(orjson.dumps(build_openapi(SETTINGS["default"])))
    status = document["components"]["schemas"]["CustomerIn"]["properties"]["status"]
    next(branch for branch in status["anyOf"] if "maximum" in branch)["maximum"] = 6
    before = meaning(BEFORE["default"])
    found = list(differences(before, named_schemas_kept(before, meaning(document))))
    assert found and all("/status/" in line for line in found), found
