#!/usr/bin/env bash
# API robustness: schemathesis (PyPI) against the admin endpoint of a running one-node egressd,
# with the OpenAPI document the endpoint implements (docs/openapi.json; a unit test holds it to
# the served routes). Root: the node runs in a network namespace of its own with a veth eth1.
#   scripts/schemathesis.sh [MAX_EXAMPLES]      (default 50 per operation)
# Checks: all but positive_data_acceptance — the document says what JSON shape a body has, the
# server also applies the configuration rules (names, label keys, CIDRs, addresses, references
# between objects), which JSON Schema cannot express, so "schema-valid" bodies are refused (422)
# by design.
# SCHEMATHESIS names the schemathesis executable (default: schemathesis on PATH; e.g.
# `python3 -m venv /tmp/st && /tmp/st/bin/pip install schemathesis`, then
# SCHEMATHESIS=/tmp/st/bin/schemathesis). Exits non-zero when schemathesis reports a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
st=${SCHEMATHESIS:-schemathesis}
examples=${1:-50}
bin=${EGRESSD_BIN:-target/debug/egressd}
[ -x "$bin" ] || cargo build --bin egressd
ns=egressd-st-$$
dir=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth1 type veth peer name eth1p
ip -n "$ns" link set eth1p up
ip -n "$ns" addr add 198.18.0.2/24 dev eth1
ip -n "$ns" link set eth1 up
token=schemathesis-admin-token-0123456789
printf '%s\n' "$token" > "$dir/token"
chmod 600 "$dir/token"
cat > "$dir/egressd.toml" <<TOML
[node]
name = "gw1"
labels = { egress = "" }
[cluster]
listen = "127.0.0.1:7480"
data_dir = "$dir/data"
[admin]
listen = "127.0.0.1:7481"
token_file = "$dir/token"
[dataplane]
manage_forwarding = true
[[gateway]]
name = "vip"
node_selector = { egress = "" }
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = { ip = "198.18.0.50", interfaces = ["eth1"] }
[[policy]]
name = "p"
egress_gateway_name = "vip"
source_cidrs = ["10.0.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
TOML
ip netns exec "$ns" "$bin" run --config "$dir/egressd.toml" > "$dir/egressd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  ip netns exec "$ns" curl -sf http://127.0.0.1:7481/readyz >/dev/null && break
  sleep 0.2
done
status=0
ip netns exec "$ns" "$st" run docs/openapi.json --url http://127.0.0.1:7481 \
  -H "Authorization: Bearer $token" --checks all --max-examples "$examples" \
  --exclude-checks positive_data_acceptance \
  --report-dir "$dir/report" --seed 14 || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  echo "egressd died during the run:" >&2; tail -50 "$dir/egressd.log" >&2; status=1
fi
echo "egressd log: $(grep -c ' ERROR ' "$dir/egressd.log" || true) ERROR lines, by message:"
grep ' ERROR ' "$dir/egressd.log" | sed -E 's/^[^ ]+ +ERROR +//; s/[0-9]+/N/g' | cut -c1-160 | sort | uniq -c | sort -rn | head -10
exit $status
