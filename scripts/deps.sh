#!/usr/bin/env bash
# Installs the system packages that egressd's demo or tests use, when any is missing, then checks
# that every program they run is on PATH. Debian/Ubuntu; installing needs root. Rust itself comes
# from rustup (https://rustup.rs).
#
#   scripts/deps.sh demo       what ./demo.sh runs
#   scripts/deps.sh test       what ./test.sh, the benchmarks and the package test run (default)
#   scripts/deps.sh --list P   prints the programs of profile P, one per line (the tests read
#                              this list: a test helper refuses to run a program not listed here)
#   scripts/deps.sh --check P  checks only; exits 1 naming every missing program and its package
set -euo pipefail

# program:package, one per line. A program the demo or a test runs must be listed under its
# profile, or the helpers that run it fail at once ("not listed in scripts/deps.sh").
DEMO_TOOLS="
ip:iproute2
ping:iputils-ping
socat:socat
tcpdump:tcpdump
pkill:procps
kill:procps
awk:mawk
cat:coreutils
"
TEST_TOOLS="
ip:iproute2
ss:iproute2
tc:iproute2
ping:iputils-ping
socat:socat
tcpdump:tcpdump
nft:nftables
sysctl:procps
kill:procps
pkill:procps
curl:curl
promtool:prometheus
debootstrap:debootstrap
systemd-nspawn:systemd-container
systemd-analyze:systemd
dpkg-deb:dpkg
strip:binutils
objdump:binutils
chmod:coreutils
cp:coreutils
timeout:coreutils
sh:dash
conntrackd:conntrackd
conntrack:conntrack
keepalived:keepalived
kubectl:kubernetes-client
"

mode=install
profile=test
case "${1:-}" in
  --list) mode=list; profile=${2:-test} ;;
  --check) mode=check; profile=${2:-test} ;;
  demo|test) profile=$1 ;;
  "") ;;
  *) echo "usage: scripts/deps.sh [demo|test] | --list PROFILE | --check PROFILE" >&2; exit 2 ;;
esac
case "$profile" in
  demo) table=$DEMO_TOOLS ;;
  test) table=$TEST_TOOLS ;;
  *) echo "scripts/deps.sh: unknown profile $profile (demo or test)" >&2; exit 2 ;;
esac

tools=() pkgs=()
for entry in $table; do
  tools+=("${entry%%:*}") pkgs+=("${entry#*:}")
done

if [ "$mode" = list ]; then
  printf '%s\n' "${tools[@]}"
  exit 0
fi

missing_tools() {
  local i out=()
  for i in "${!tools[@]}"; do
    command -v "${tools[$i]}" >/dev/null 2>&1 || out+=("${tools[$i]} (package ${pkgs[$i]})")
  done
  printf '%s\n' "${out[@]}"
}

if [ "$mode" = install ]; then
  need=()
  for i in "${!tools[@]}"; do
    command -v "${tools[$i]}" >/dev/null 2>&1 || need+=("${pkgs[$i]}")
  done
  if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    [ "$(id -u)" = 0 ] || { echo "scripts/deps.sh: missing ${need[*]}; run as root to install" >&2; exit 1; }
    echo "installing: ${need[*]}"
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
      cat "$log" >&2
      echo "scripts/deps.sh: installing ${need[*]} failed" >&2
      rm -f "$log"
      exit 1
    fi
    rm -f "$log"
  fi
fi

mapfile -t gone < <(missing_tools | sed '/^$/d')
if ((${#gone[@]})); then
  echo "scripts/deps.sh: these programs of the $profile profile are missing:" >&2
  printf '  %s\n' "${gone[@]}" >&2
  exit 1
fi
if [ "$mode" = install ]; then
  command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
fi
