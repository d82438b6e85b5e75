#!/usr/bin/env bash
# The browser for `make test-browser`: Debian's chromium, driven by Playwright (which cannot
# download its own browsers on every machine). Idempotent: returns at once when it is there.
#   CHROMIUM   the browser to use (default /usr/bin/chromium); one that runs is left alone
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ] && version=$("$CHROMIUM" --version 2>/dev/null); then
    echo "browser: $version ($CHROMIUM)"
    exit 0
fi
if [ "$CHROMIUM" != /usr/bin/chromium ]; then
    echo "CHROMIUM=$CHROMIUM does not run; point CHROMIUM at a Chromium or Chrome executable" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "no $CHROMIUM and no apt-get here: install Chromium, then run again with CHROMIUM=/path/to/it" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null; then
    as_root=(sudo)
else
    echo "chromium is missing and installing it needs root: apt-get install chromium (as root), then run again" >&2
    exit 1
fi
echo "installing chromium (Debian package) for the browser test ..."
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
# No recommends: a headless browser needs neither desktop integration nor extra fonts.
"${as_root[@]}" apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
echo "browser: $("$CHROMIUM" --version)"
