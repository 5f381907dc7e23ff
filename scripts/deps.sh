#!/usr/bin/env bash
# Installs the system packages egressd's demo, tests and benchmarks use, when any is missing.
# Debian/Ubuntu; needs root. Rust itself comes from rustup (https://rustup.rs).
set -euo pipefail
# curl: the admin API tests; prometheus: promtool for the alert rules; debootstrap,
# systemd-container: the package install test; systemd: systemd-analyze; binutils: strip and
# objdump for packaging/build-deb.sh.
pkgs=(nftables iproute2 tcpdump socat procps curl prometheus debootstrap systemd-container systemd
  binutils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
