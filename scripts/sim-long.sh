#!/usr/bin/env bash
# The long simulation of the lease protocol: EGRESSD_SIM_SEEDS seeds (default 200) of
# EGRESSD_SIM_EVENTS events each (default 1 000 000), from seed EGRESSD_SIM_FIRST (default 1000),
# every fault's probability scaled by EGRESSD_SIM_FAULTS (default 1).
# A failing seed is printed with the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
export EGRESSD_SIM_SEEDS="${EGRESSD_SIM_SEEDS:-200}"
export EGRESSD_SIM_EVENTS="${EGRESSD_SIM_EVENTS:-1000000}"
export EGRESSD_SIM_FIRST="${EGRESSD_SIM_FIRST:-1000}"
exec cargo test --release --locked --test sim -- --ignored long --nocapture
