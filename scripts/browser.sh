#!/usr/bin/env bash
# Headless Chromium and ChromeDriver for the browser test (tests/test_ui.py), from Debian's
# packages, where this machine can install them (root and apt-get). Elsewhere it says how,
# and the browser test skips.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "browser: installing chromium and chromium-driver for the browser test (once)"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium chromium-driver >/tmp/cogpipe-browser-install.log 2>&1 ||
     { apt-get update -q >>/tmp/cogpipe-browser-install.log 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
         chromium chromium-driver >>/tmp/cogpipe-browser-install.log 2>&1; }; then
    exit 0
  fi
  echo "browser: install failed (see /tmp/cogpipe-browser-install.log); the browser test will skip"
else
  echo "browser: no chromium/chromedriver; the browser test will skip" \
       "(sudo apt-get install chromium chromium-driver)"
fi
