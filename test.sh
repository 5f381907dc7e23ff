#!/usr/bin/env bash
# The test suite: formatting, lints, unit and property tests, and the end-to-end tests in
# network namespaces. Run as root for the namespace tests (they skip loudly otherwise; with
# EGRESSD_E2E=1 they fail instead of skipping).
set -euo pipefail
cd "$(dirname "$0")"
# cargo test shows a passing test's output only with --nocapture, so the skip is also said here.
skipping() {
  if [ "$(id -u)" != 0 ] && [ "${EGRESSD_E2E:-}" != 1 ]; then
    echo "!!! NOT ROOT: the end-to-end, nftables, systemd and package tests are SKIPPED (they pass" >&2
    echo "!!! without checking anything). Run ./test.sh as root to run them." >&2
  fi
}
if [ "$(id -u)" = 0 ]; then scripts/deps.sh test; else scripts/deps.sh --check test || true; fi
skipping
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The Kubernetes adapter (cargo feature `kubernetes`): its code and its tests only, so that the
# feature costs one more build of the crate and not of every test target.
k8s=(--locked --features kubernetes --lib --bins --test kubernetes)
cargo clippy "${k8s[@]}" -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
cargo test --locked --features kubernetes --lib kubernetes:: 2>&1 | tee -a "$log"
cargo test --locked --features kubernetes --test kubernetes 2>&1 | tee -a "$log"
# Fuzzing, a few seconds per target (scripts/fuzz.sh: the nightly toolchain and cargo-fuzz).
if cargo +nightly fuzz --version >/dev/null 2>&1; then
  FUZZ_SECS=${FUZZ_SECS:-5} scripts/fuzz.sh short
else
  echo "!!! cargo-fuzz or the nightly toolchain is missing: the fuzz targets are SKIPPED" >&2
fi
skipping
# One closing line for the whole run (cargo prints one summary per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
  END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
