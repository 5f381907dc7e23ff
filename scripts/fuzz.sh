#!/usr/bin/env bash
# Fuzzing with cargo-fuzz on the nightly toolchain (`cargo install cargo-fuzz`).
#   scripts/fuzz.sh short        every target for FUZZ_SECS seconds (default 10): the CI step
#   scripts/fuzz.sh long [SECS]  every target for SECS seconds (default 3600), one after another
#   scripts/fuzz.sh TARGET SECS  one target
# Targets (fuzz/fuzz_targets/): config_loader, admin_bodies, peer_rpc, nft_listing. The corpus
# grows in fuzz/corpus/TARGET (not committed); it starts from the seeds in fuzz/seeds/TARGET.
# A crash leaves its input in fuzz/artifacts/TARGET/ and fails the run: turn it into a
# regression test (a unit test with the input) before fixing it. Prints executions per target.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(config_loader admin_bodies peer_rpc nft_listing)
mode=${1:-short}
case "$mode" in
  short) secs=${FUZZ_SECS:-10}; run=("${targets[@]}") ;;
  long) secs=${2:-3600}; run=("${targets[@]}") ;;
  *) secs=${2:-60}; run=("$mode") ;;
esac
cargo +nightly fuzz build -O
status=0
for t in "${run[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  if [ -d "fuzz/seeds/$t" ]; then cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true; fi
  log=$(mktemp)
  if cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
      -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED; status=1
    tail -40 "$log" >&2
  fi
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
  echo "fuzz $t: $result, $execs executions in ${secs}s"
  rm -f "$log"
done
exit $status
