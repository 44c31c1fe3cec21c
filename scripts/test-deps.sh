#!/usr/bin/env bash
# System packages the test suite needs beyond Python (a real headless browser for the HTML report).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test-deps] installing Debian chromium for the HTML report test" >&2
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq chromium >/dev/null
fi
