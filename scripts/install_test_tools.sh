#!/usr/bin/env bash
# System tools some tests use, installed where missing and where we may (root with apt-get, as in CI):
#   faketime        libfaketime: runs a gateway with its wall clock shifted (tests/test_causal_order.py)
#   promtool        checks the Prometheus alert rules (Debian package prometheus)
#   docker-compose  `docker-compose config` validates docker-compose.yml without a Docker engine
#   chromium        Debian's browser, driven by Playwright in tests/test_console.py (no browser is downloaded)
#   fonts-wqy-microhei  a CJK font, so the console's Chinese text renders (and its screenshots show it)
# Elsewhere the tests that need them skip, saying which tool is missing.
set -uo pipefail
missing=()
command -v faketime >/dev/null || missing+=(faketime)
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v chromium >/dev/null || missing+=(chromium)
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not installing ${missing[*]} (needs root and apt-get); the tests that use them will skip" >&2
    exit 0
fi
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "could not install ${missing[*]}; the tests that use them will skip" >&2
exit 0
