#!/usr/bin/env bash
# Builds the Debian packages of edgeloop-agent and edgeloop-control-plane with cargo-deb, installs them with
# dpkg, checks what they installed, and removes and purges them again, checking that nothing is left behind.
# Prints each package's size.
#
#   scripts/packages.sh                 release packages: the agent with the `device` profile (size-optimised,
#                                       stripped), the control plane with `release`; left in target/debian
#   scripts/packages.sh --prebuilt-dev  packages of the debug binaries `cargo test --workspace` already built:
#                                       checks the packaging in CI without a second build. Not for shipping.
#
# Needs root (or sudo) for dpkg. Installs cargo-deb if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --locked --version "=$CARGO_DEB_VERSION"
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

out=target/debian
rm -rf "$out"
if [ "${1:-}" = --prebuilt-dev ]; then
    test -x target/debug/edgeloop-agent && test -x target/debug/edgeloop-control-plane
    agent_args=(--no-build --profile dev --fast)
    cp_args=(--no-build --profile dev --fast)
else
    agent_args=(--profile device)
    cp_args=()
fi
cargo deb -p edgeloop-agent "${agent_args[@]}" -o "$out"
cargo deb -p edgeloop-control-plane "${cp_args[@]}" -o "$out"
echo "== packages"
for deb in "$out"/*.deb; do
    printf '%s: %s bytes, installed size %s KiB\n' "$(basename "$deb")" "$(stat -c %s "$deb")" \
        "$(dpkg-deb -f "$deb" Installed-Size)"
done

fail() { echo "packages: $*" >&2; exit 1; }

echo "== dpkg -i"
$SUDO dpkg -i "$out"/edgeloop-agent_*.deb "$out"/edgeloop-control-plane_*.deb
getent passwd edgeloop | grep -q ':/nonexistent:/usr/sbin/nologin$' || fail "the edgeloop system user was not created"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[ "$(/usr/bin/edgeloop-agent --version)" = "edgeloop-agent $version" ] || fail "edgeloop-agent --version"
[ "$(/usr/bin/edgeloop-control-plane --version)" = "edgeloop-control-plane $version" ] \
    || fail "edgeloop-control-plane --version"
for f in /etc/edgeloop/agent.toml /etc/edgeloop/factory-vibration.toml /etc/edgeloop/control-plane.toml \
    /etc/edgeloop/firmware-configs/city-traffic.toml; do
    dpkg-query -S "$f" >/dev/null || fail "$f is not installed by a package"
done
dpkg-query -W -f='${Conffiles}\n' edgeloop-agent | grep -q ' /etc/edgeloop/agent.toml ' \
    || fail "/etc/edgeloop/agent.toml is not a conffile"
dpkg-query -W -f='${Conffiles}\n' edgeloop-control-plane | grep -q ' /etc/edgeloop/control-plane.toml ' \
    || fail "/etc/edgeloop/control-plane.toml is not a conffile"
[ "$(stat -c %U:%a /var/backups/edgeloop)" = "edgeloop:750" ] || fail "/var/backups/edgeloop"
grep -q '^LimitNOFILE=65536$' /lib/systemd/system/edgeloop-control-plane.service || fail "LimitNOFILE"

echo "== systemd-analyze verify"
systemd-analyze verify /lib/systemd/system/edgeloop-agent.service /lib/systemd/system/edgeloop-control-plane.service

echo "== dpkg -r, then dpkg -P"
$SUDO dpkg -r edgeloop-agent edgeloop-control-plane
for f in /usr/bin/edgeloop-agent /usr/bin/edgeloop-control-plane /lib/systemd/system/edgeloop-agent.service \
    /lib/systemd/system/edgeloop-control-plane.service; do
    [ ! -e "$f" ] || fail "$f is left after dpkg -r"
done
[ -e /etc/edgeloop/agent.toml ] || fail "dpkg -r removed a conffile (only a purge should)"
$SUDO dpkg -P edgeloop-agent edgeloop-control-plane
for f in /etc/edgeloop/agent.toml /etc/edgeloop/control-plane.toml /etc/edgeloop/firmware-configs; do
    [ ! -e "$f" ] || fail "$f is left after dpkg -P"
done
if dpkg-query -W edgeloop-agent >/dev/null 2>&1 && dpkg-query -W -f='${Status}' edgeloop-agent | grep -q installed; then
    fail "edgeloop-agent is still installed"
fi
echo "packages: built, installed, checked, removed and purged"
