#!/usr/bin/env bash
# The headless browser the HTML report's test opens reports in: Debian's chromium and chromium-driver (a tool that
# downloads its own browser build cannot work on a closed network). Idempotent and quiet: nothing to do when both are
# there; `apt-get update` only when the package lists do not know them yet. Needs root (or passwordless sudo).
# When they cannot be installed: an error under CI=true (CI must run the browser test), else a warning (the test
# then skips with that reason).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
give_up() {
  echo "install_browser: $1; tests/test_html_report.py's browser test will $([ "${CI:-}" = true ] && echo fail || echo skip)" >&2
  [ "${CI:-}" = true ] && exit 1 || exit 0
}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || give_up "chromium missing and not root (no sudo)"
  SUDO="sudo -n"
fi
command -v apt-get >/dev/null 2>&1 || give_up "no apt-get: install chromium and chromium-driver yourself"
echo "install_browser: installing chromium and chromium-driver (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
# fonts-dejavu-core: a font for the page text (the recommended fonts-liberation and desktop extras are not needed).
PACKAGES="chromium chromium-driver fonts-dejavu-core"
if ! apt-cache show $PACKAGES >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null || give_up "apt-get update failed"
fi
$SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null || give_up "apt-get install failed"
command -v chromium >/dev/null && command -v chromedriver >/dev/null || give_up "still missing after apt-get install"
