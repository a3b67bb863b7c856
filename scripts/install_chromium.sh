#!/usr/bin/env bash
# The browser the web-page tests drive (Playwright, through its executable path):
# Debian's `chromium`, installed with apt when it is not on PATH. Playwright's own
# browser downloads are not used.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no chromium on PATH and no apt-get; install Chromium and put it on PATH" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
