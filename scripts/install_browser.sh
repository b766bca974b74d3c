#!/usr/bin/env bash
# The headless browser the HTML report's test opens reports in: Debian's chromium and chromium-driver (a tool that
# downloads its own browser build cannot work on a closed network). Idempotent and quiet: nothing to do when both are
# there; `apt-get update` only when the package lists do not know them yet. Needs root (or sudo) to install.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_browser: chromium/chromedriver missing and not root (no sudo): tests/test_html_report.py will" \
      "skip outside CI and fail under CI=true" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get; install chromium and chromium-driver with your package manager" >&2
  exit 0
fi
echo "install_browser: installing chromium and chromium-driver (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium chromium-driver fonts-dejavu-core >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null
fi
# A font for the page text (the recommended fonts-liberation and the rest of the desktop are not needed).
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null \
  || { echo "install_browser: chromium/chromedriver still missing after apt-get install" >&2; exit 1; }
