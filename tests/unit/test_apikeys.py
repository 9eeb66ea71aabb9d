"""API keys without a gateway: parsing the keys file and API_KEYS, the constant-time lookup, the key tool,
the protected paths, the keys-file reload rules and the OpenAPI description."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import keys as keys_tool
from gateway.app import create_app
from gateway.middleware.auth import ApiKeys
from gateway.openapi import build_openapi, external_operations
from shared.apikeys import ApiKey, KeyRing, hash_key, key_line, parse_keys_file, parse_keys_variable
from shared.cli import StartupError
from shared.settings import Settings


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_file_lines_are_name_and_sha256_with_optional_rate_and_burst() -> None:
    text = f"""
# partners
alpha:{sha("ka")}
beta:{sha("kb")}:2.5:10   # its own limit

"""
    ring = parse_keys_file(text)
    assert [(k.name, k.rate, k.burst) for k in ring.keys] == [("alpha", None, None), ("beta", 2.5, 10)]
    assert ring.keys[0].digest == hashlib.sha256(b"ka").digest()


def test_api_keys_variable_holds_the_same_entries_separated_by_commas() -> None:
    ring = parse_keys_variable(f"alpha:{sha('ka')}, beta:{sha('kb')}:0:0,")
    assert [(k.name, k.rate, k.burst) for k in ring.keys] == [("alpha", None, None), ("beta", 0.0, 0)]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alpha", "expected name:sha256hex"),
        ("alpha:abc", "64 hex digits"),
        ("alpha:" + "g" * 64, "64 hex digits"),
        (f"al pha:{sha('k')}", "key name"),
        (f":{sha('k')}", "key name"),
        (f"alpha:{sha('k')}:fast:10", "rate must be a number"),
        (f"alpha:{sha('k')}:-1:10", "rate must be a finite number >= 0"),
        (f"alpha:{sha('k')}:nan:10", "rate must be a finite number >= 0"),
        (f"alpha:{sha('k')}:1:1.5", "burst must be a whole number"),
        (f"alpha:{sha('k')}:1", "expected name:sha256hex"),
    ],
)
def test_malformed_line_names_its_number_and_never_its_text(line: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_keys_file(f"# header\nok:{sha('other')}\n{line}\n")
    message = str(caught.value)
    assert message.startswith("line 3: ")
    assert problem in message
    for second_field in line.split(":")[1:2]:
        assert not second_field or second_field not in message  # the hash (or a pasted key) is not echoed


def test_a_raw_key_pasted_instead_of_its_hash_is_refused_without_echoing_it() -> None:
    key = "POJY5UOiK-cmaiP1HNNpNSVppD0QB-5HC8WLWLb-WOA"
    with pytest.raises(ValueError) as caught:
        parse_keys_file(f"alpha:{key}\n")
    assert key not in str(caught.value)
    assert "not the key itself" in str(caught.value)


def test_the_same_hash_twice_is_an_error_naming_both_lines() -> None:
    with pytest.raises(ValueError, match="line 2: the same key hash as line 1"):
        parse_keys_file(f"a:{sha('k')}\nb:{sha('k')}\n")


def test_one_name_may_have_two_keys_during_a_rotation_but_one_limit() -> None:
    ring = parse_keys_file(f"a:{sha('old')}:5:5\na:{sha('new')}:5:5\n")
    assert len(ring) == 2 and ring.names == {"a"}
    with pytest.raises(ValueError, match="line 2: key name 'a' has a different rate:burst on line 1"):
        parse_keys_file(f"a:{sha('old')}:5:5\na:{sha('new')}\n")


def test_lookup_finds_the_key_by_its_sha256() -> None:
    ring = parse_keys_file(f"alpha:{sha('ka')}\nbeta:{sha('kb')}\n")
    found = ring.find("kb")
    assert found is not None and found.name == "beta"
    assert ring.find("kc") is None
    assert ring.find("") is None
    assert ring.find("\udcff") is None  # any header text hashes: never an exception


def test_lookup_is_constant_time_compare_digest_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)  # as shared.apikeys calls it
    ring = KeyRing([ApiKey(name, hash_key(name + "-key")) for name in ("first", "second", "third")])
    for presented in ("first-key", "third-key", "nobody"):
        calls.clear()
        ring.find(presented)
        # Every configured digest is compared, in full, whether the first, the last or none matches.
        assert [b for _, b in calls] == [key.digest for key in ring.keys]
        assert all(a == hash_key(presented) for a, _ in calls)


def test_keys_tool_prints_a_new_key_once_and_the_line_that_configures_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_tool.main(["new", "crm-bot-1"]) == 0
    out = capsys.readouterr().out.splitlines()
    key, line = out[1].strip(), out[3].strip()
    assert len(key) >= 43 and key not in line
    assert line == key_line("crm-bot-1", key) == f"crm-bot-1:{sha(key)}"
    assert parse_keys_file(line + "\n").find(key) is not None
    keys_tool.main(["new", "crm-bot-1"])
    assert key not in capsys.readouterr().out  # a fresh key every time


def test_keys_tool_refuses_a_bad_name_with_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        keys_tool.main(["new", "bad name"])
    assert caught.value.code == 2


def test_keys_tool_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        keys_tool.main(["--help"])
    assert caught.value.code == 0
    assert "new" in capsys.readouterr().out


# ---- the gateway's key ring: what is protected, start-up and reload rules ------------------------------


def settings(**values: object) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


async def test_external_api_is_protected_health_always_open_docs_and_metrics_only_when_asked() -> None:
    key = "k"
    paths = {"/api/external/customers/x": "GET", "/api/external/requests/x": "GET", "/healthz": "GET",
             "/readyz": "GET", "/metrics": "GET", "/docs": "GET", "/openapi.json": "GET"}

    async def statuses(**values: object) -> dict[str, bool]:
        """Which paths answer 401 without a key (the real app, its resources not opened: no broker, no
        database — a route that needs one fails with 500, which is not a 401)."""
        app = create_app(settings(api_keys=f"a:{sha(key)}", **values))
        app.cleanup_ctx.clear()
        async with TestClient(TestServer(app)) as client:
            refused = {}
            for path in paths:
                async with client.get(path) as response:
                    refused[path] = response.status == 401
            return refused

    default = await statuses()
    assert [path for path, refused in default.items() if refused] == [
        "/api/external/customers/x", "/api/external/requests/x"]
    strict = await statuses(protect_docs=True, protect_metrics=True)
    assert [path for path, refused in strict.items() if refused] == [
        "/api/external/customers/x", "/api/external/requests/x", "/metrics", "/docs", "/openapi.json"]


def test_no_keys_configured_means_open() -> None:
    keys = ApiKeys(settings())
    keys.load()
    assert keys.ring is None


def test_a_malformed_keys_file_stops_start_up_with_one_line_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"a:{sha('k')}\n\nb:nothex\n")
    with pytest.raises(StartupError) as caught:
        ApiKeys(settings(api_keys_file=str(path))).load()
    assert str(caught.value).startswith(f"invalid API_KEYS_FILE {path}: line 3: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [None, "", "# only comments\n\n"])
def test_a_keys_file_that_is_missing_or_empty_stops_start_up_rather_than_opening(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StartupError, match="API_KEYS_FILE"):
        ApiKeys(settings(api_keys_file=str(path))).load()


def test_settings_refuse_both_sources_of_keys() -> None:
    with pytest.raises(ValueError, match="set API_KEYS_FILE or API_KEYS, not both"):
        settings(api_keys_file="/x", api_keys=f"a:{sha('k')}")


def test_a_bad_new_keys_file_keeps_the_old_keys_and_logs_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"old:{sha('old-key')}\n")
    keys = ApiKeys(settings(api_keys_file=str(path)))
    keys.load()
    path.write_text(f"new:{sha('new-key')}\nbroken\n")
    with caplog.at_level(logging.ERROR, logger="gateway.middleware.auth"):
        keys.check_file()
    assert keys.ring is not None and keys.ring.find("old-key") is not None
    assert "line 2" in caplog.text and "keeping the 1 keys in force" in caplog.text
    caplog.clear()
    keys.check_file()  # unchanged since: not reported again every second
    assert caplog.text == ""
    path.write_text(f"new:{sha('new-key')}\n# fixed\n")
    keys.check_file()
    assert keys.ring.find("new-key") is not None and keys.ring.find("old-key") is None


def test_an_unchanged_keys_file_is_not_reread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text(f"a:{sha('k')}\n")
    keys = ApiKeys(settings(api_keys_file=str(path)))
    keys.load()
    ring = keys.ring
    with caplog.at_level(logging.INFO, logger="gateway.middleware.auth"):
        keys.check_file()
    assert keys.ring is ring and caplog.text == ""


# ---- the OpenAPI document ------------------------------------------------------------------------------


def test_openapi_describes_the_key_schemes_and_401_only_when_keys_are_configured() -> None:
    open_document = build_openapi(settings())
    assert "securitySchemes" not in open_document["components"]
    assert all("401" not in op["responses"] for op in external_operations(open_document))

    document = build_openapi(settings(api_keys=f"a:{sha('k')}", protect_metrics=True))
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {**schemes["bearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["in"] == "header" and schemes["apiKeyHeader"]["name"] == "X-API-Key"
    for operation in [*external_operations(document), document["paths"]["/metrics"]["get"]]:
        assert operation["security"] == [{"bearerKey": []}, {"apiKeyHeader": []}]
        assert "401" in operation["responses"]
    assert all("429" in operation["responses"] for operation in external_operations(document))
    assert "429" not in document["paths"]["/metrics"]["get"]["responses"]  # only the external API is limited
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert "security" not in document["paths"][path]["get"]
