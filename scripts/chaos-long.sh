#!/usr/bin/env bash
# The long chaos soak (tests/chaos.rs, chaos_long): five egressd daemons in network namespaces
# under random faults for EGRESSD_CHAOS_SECS seconds (default 600), with the invariant checker
# outside the nodes. Root only (network namespaces, tmpfs mounts). Release build.
#
#   scripts/chaos-long.sh                              ten minutes, a new seed
#   EGRESSD_CHAOS_SECS=3600 scripts/chaos-long.sh      an hour
#   EGRESSD_CHAOS_SEED=123456 scripts/chaos-long.sh    replays the fault schedule of seed 123456
#
# Other knobs: EGRESSD_CHAOS_FAULTS (stop after this many faults), EGRESSD_CHAOS_NODES (default
# 5), EGRESSD_CHAOS_CONCURRENT (faults in force at once, default 2), EGRESSD_CHAOS_KEEP=1 (keep
# the daemons' logs, the captures and the timeline in target/tmp/chaos-SEED-PID even on success;
# they are always kept on failure, and the path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/chaos-long.sh: needs root (network namespaces, tmpfs mounts)" >&2
  exit 1
fi
scripts/deps.sh test
export EGRESSD_E2E=1
exec cargo test --release --locked --test chaos -- --ignored chaos_long --nocapture
