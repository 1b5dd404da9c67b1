#!/usr/bin/env bash
# Debian's chromium renders the static PNG/SVG figures (kaleido) and runs the browser tests.
# Installed only when missing and when we may (root or passwordless sudo); otherwise exit non-zero.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "chromium is missing and we cannot install it (not root): apt-get install chromium" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
