#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs `cargo test --workspace`.
# - Debian's mosquitto (and mosquitto-clients): the external-broker ACL test starts its own instance on a free
#   loopback port;
# - Debian's chromium and chromium-driver: the dashboard's browser tests drive headless Chromium through
#   chromedriver;
# - Debian's prometheus: `promtool check metrics` reads a live scrape of `/metrics`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -x /usr/sbin/mosquitto ] || ! command -v mosquitto_passwd >/dev/null \
  || ! [ -x /usr/bin/chromium ] || ! command -v chromedriver >/dev/null || ! command -v promtool >/dev/null || ! command -v strip >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends \
    mosquitto mosquitto-clients chromium chromium-driver prometheus binutils
fi
/usr/sbin/mosquitto -h | head -1 || true
chromium --version || true
chromedriver --version || true
promtool --version | head -1 || true

cargo test --workspace "$@"
