#!/usr/bin/env bash
# The test suite: formatting, lints, unit and property tests, and the end-to-end tests in
# network namespaces. Run as root for the namespace tests (they skip loudly otherwise; with
# EGRESSD_E2E=1 they fail instead of skipping).
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ]; then scripts/deps.sh; fi
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
