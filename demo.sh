#!/usr/bin/env bash
# The egressd demo, in network namespaces on this machine (nothing touches the host's own
# interfaces): a client, a LAN bridge, a gateway node running egressd, a WAN bridge and a server.
# It shows the VIP taken and announced, which traffic is SNATed to what, a link failure
# withdrawing everything, its return restoring it, and a clean shutdown. Needs root.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }
scripts/deps.sh
cargo build --release --locked --quiet
BIN=$PWD/target/release/egressd

P="egd$$"                       # unique per run
NS_LAN=$P-lan NS_WAN=$P-wan NS_CLI=$P-cli NS_SRV=$P-srv NS_GW=$P-gw1
WORK=$(mktemp -d)
cleanup() {
  set +e
  for ns in $NS_GW $NS_CLI $NS_SRV $NS_LAN $NS_WAN; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# until DESCRIPTION COMMAND...: polls every 10 ms (at most 10 s) and says how long it took.
until_ok() {
  local what=$1; shift
  local t0; t0=$(date +%s%N)
  for _ in $(seq 1000); do
    if "$@" >/dev/null 2>&1; then
      printf '  %s after %d ms\n' "$what" $((($(date +%s%N) - t0) / 1000000)); return 0
    fi
    sleep 0.01
  done
  echo "  $what: not within 10 s" >&2; return 1
}
holds_vip() { nsx $NS_GW ip -o addr show dev eth1 | grep -q 'inet 203.0.113.50/'; }
lacks_vip() { ! holds_vip; }
snat_empty() { ! nsx $NS_GW nft list map inet egressd snat4 | grep -q 'elements = '; }

say "building the lab: client 10.77.0.10 -> LAN -> gw1 -> WAN -> server 203.0.113.10"
for ns in $NS_LAN $NS_WAN $NS_CLI $NS_SRV $NS_GW; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
nsx $NS_CLI ip link add eth0 type veth peer name p-cli netns $NS_LAN
nsx $NS_SRV ip link add eth0 type veth peer name p-srv netns $NS_WAN
nsx $NS_GW ip link add eth0 type veth peer name p-gw1a netns $NS_LAN
nsx $NS_GW ip link add eth1 type veth peer name p-gw1b netns $NS_WAN
for br in "$NS_LAN br0 p-cli p-gw1a" "$NS_WAN br1 p-srv p-gw1b"; do
  set -- $br; ns=$1 b=$2; shift 2
  nsx "$ns" ip link add "$b" type bridge forward_delay 0
  for p in "$@"; do nsx "$ns" ip link set "$p" master "$b" up; done
  nsx "$ns" ip link set "$b" up
done
nsx $NS_CLI ip addr add 10.77.0.10/24 dev eth0
nsx $NS_CLI ip addr add 10.77.0.11/24 dev eth0
nsx $NS_CLI ip link set eth0 up
nsx $NS_CLI ip route add 203.0.113.0/24 via 10.77.0.1
nsx $NS_SRV ip addr add 203.0.113.10/24 dev eth0
nsx $NS_SRV ip addr add 203.0.113.20/24 dev eth0
nsx $NS_SRV ip link set eth0 up
nsx $NS_SRV ip route add 10.77.0.0/24 via 203.0.113.2
nsx $NS_GW ip addr add 10.77.0.2/24 dev eth0
nsx $NS_GW ip addr add 203.0.113.2/24 dev eth1
nsx $NS_GW ip link set eth0 up
nsx $NS_GW ip link set eth1 up

cat > "$WORK/gw1.toml" <<EOF
[node]
name = "gw1"
labels = { "node-role.deckhouse.io/egress" = "" }

[cluster]
listen = "127.0.0.1:7480"
peers = [{ name = "gw1", address = "127.0.0.1:7480" }]
data_dir = "$WORK/gw1"

[dataplane]
manage_forwarding = true

[[gateway]]
name = "my-egressgw"
node_selector = { "node-role.deckhouse.io/egress" = "" }
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = { ip = "203.0.113.50", interfaces = ["eth1"] }
[gateway.next_hop]
ip = "10.77.0.1"
interface = "eth0"

[[policy]]
name = "my-egressgw-policy"
egress_gateway_name = "my-egressgw"
source_cidrs = ["10.77.0.10/32"]
destination_cidrs = ["0.0.0.0/0"]
excluded_cidrs = ["203.0.113.20/32"]
EOF

say "config check"
$BIN check-config --config "$WORK/gw1.toml"

say "server: answers every connection with the source address it sees"
nsx $NS_SRV socat TCP-LISTEN:8080,reuseaddr,fork 'SYSTEM:echo $SOCAT_PEERADDR' &
nsx $NS_WAN tcpdump -i br1 -n -l arp 2>/dev/null > "$WORK/arp.txt" &
sleep 0.5

say "starting egressd on gw1"
nsx $NS_GW "$BIN" run --config "$WORK/gw1.toml" > "$WORK/gw1.log" 2>&1 &
until_ok "VIP held" holds_vip
sleep 0.1
nsx $NS_GW "$BIN" status --admin http://127.0.0.1:7481

probe() { # src dst
  local seen
  seen=$(nsx $NS_CLI socat -T2 - "TCP:$2:8080,bind=$1,connect-timeout=2" 2>/dev/null || true)
  printf '  %-12s -> %-14s  server sees %s\n' "$1" "$2" "${seen:-(no connection)}"
}
say "traffic: the policy source is SNATed to the VIP, the excluded destination and other sources are not"
probe 10.77.0.10 203.0.113.10
probe 10.77.0.10 203.0.113.20
probe 10.77.0.11 203.0.113.10
say "gratuitous ARP seen on the WAN"
grep "who-has 203.0.113.50 tell 203.0.113.50" "$WORK/arp.txt" | sed 's/^/  /' | head -5

say "cutting gw1's WAN link: the VIP, next hop and SNAT are withdrawn"
nsx $NS_GW ip link set eth1 down
until_ok "VIP withdrawn" lacks_vip
until_ok "SNAT map emptied" snat_empty
nsx $NS_GW "$BIN" status --admin http://127.0.0.1:7481
say "link back: restored and re-announced"
nsx $NS_GW ip link set eth1 up
until_ok "VIP held again" holds_vip
probe 10.77.0.10 203.0.113.10

say "SIGTERM: egressd releases everything"
pkill -TERM -f "$BIN run --config $WORK/gw1.toml" || true
until_ok "VIP released" lacks_vip
for _ in $(seq 100); do pgrep -f "$BIN run --config $WORK/gw1.toml" >/dev/null || break; sleep 0.05; done
echo "  addresses on eth1: $(nsx $NS_GW ip -o addr show dev eth1 | awk '{print $4}' | xargs)"
echo "  egressd table: $(nsx $NS_GW nft list tables | grep -c egressd || true) left"
say "what egressd logged"
sed 's/^/  /' "$WORK/gw1.log"
say "done (the lab is removed on exit)"
