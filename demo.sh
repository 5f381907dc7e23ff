#!/usr/bin/env bash
# The egressd demo, in network namespaces on this machine (nothing touches the host's own
# interfaces): a client, a LAN bridge, three gateway nodes running egressd as a Raft cluster
# (their peer traffic on a bridge of its own), a WAN bridge and a server. It shows who is active
# and which traffic is SNATed to what, kills the active node's daemon (kill -9), prints how long
# the failover took on the wire and for the client, then hands over in a planned way (SIGTERM)
# and cleans up. Needs root.
set -euo pipefail
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates network namespaces)" >&2; exit 1; }
scripts/deps.sh demo
echo "building egressd (release)..."
cargo build --release --locked --quiet
BIN=$PWD/target/release/egressd

P="egd$$"                       # unique per run
NS_LAN=$P-lan NS_WAN=$P-wan NS_MGMT=$P-mgmt NS_CLI=$P-cli NS_SRV=$P-srv
NODES=(gw1 gw2 gw3)
WORK=$(mktemp -d)
cleanup() {
  set +e
  disown -a 2>/dev/null
  for ns in "${NODES[@]/#/$P-}" $NS_CLI $NS_SRV $NS_LAN $NS_WAN $NS_MGMT; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
ms_now() { date +%s%3N; }

say "building the lab: client 10.77.0.10 -> LAN -> gw1..gw3 -> WAN -> server 203.0.113.10"
for ns in $NS_LAN $NS_WAN $NS_MGMT $NS_CLI $NS_SRV "${NODES[@]/#/$P-}"; do
  ip netns add "$ns"; nsx "$ns" ip link set lo up
done
nsx $NS_CLI ip link add eth0 type veth peer name p-cli netns $NS_LAN
nsx $NS_SRV ip link add eth0 type veth peer name p-srv netns $NS_WAN
lan_ports=(p-cli) wan_ports=(p-srv) mgmt_ports=()
for i in 0 1 2; do
  n=${NODES[$i]} ns=$P-${NODES[$i]}
  nsx "$ns" ip link add eth0 type veth peer name "p-$n" netns $NS_LAN
  nsx "$ns" ip link add eth1 type veth peer name "p-$n" netns $NS_WAN
  nsx "$ns" ip link add eth2 type veth peer name "p-$n" netns $NS_MGMT
  nsx "$ns" ip addr add "10.77.0.$((2 + i))/24" dev eth0
  nsx "$ns" ip addr add "203.0.113.$((2 + i))/24" dev eth1
  nsx "$ns" ip addr add "10.78.0.$((2 + i))/24" dev eth2
  for d in eth0 eth1 eth2; do nsx "$ns" ip link set $d up; done
  lan_ports+=("p-$n") wan_ports+=("p-$n") mgmt_ports+=("p-$n")
done
bridge() { # ns name ports...
  local ns=$1 b=$2; shift 2
  nsx "$ns" ip link add "$b" type bridge forward_delay 0
  for p in "$@"; do nsx "$ns" ip link set "$p" master "$b" up; done
  nsx "$ns" ip link set "$b" up
}
bridge $NS_LAN br0 "${lan_ports[@]}"
bridge $NS_WAN br1 "${wan_ports[@]}"
bridge $NS_MGMT br2 "${mgmt_ports[@]}"
nsx $NS_CLI ip addr add 10.77.0.10/24 dev eth0
nsx $NS_CLI ip link set eth0 up
nsx $NS_CLI ip route add 203.0.113.0/24 via 10.77.0.1
nsx $NS_SRV ip addr add 203.0.113.10/24 dev eth0
nsx $NS_SRV ip link set eth0 up

say "peer certificates: a cluster CA and one certificate per node (egressd tls)"
"$BIN" tls init-ca --out-dir "$WORK/ca" >/dev/null
for n in "${NODES[@]}"; do
  "$BIN" tls issue "$n" --ca-dir "$WORK/ca" --out-dir "$WORK/certs" >/dev/null
done
for i in 0 1 2; do
  n=${NODES[$i]}
  cat > "$WORK/$n.toml" <<EOF
[node]
name = "$n"
labels = { "node-role.deckhouse.io/egress" = "" }

[cluster]
listen = "10.78.0.$((2 + i)):7480"
peers = [
  { name = "gw1", address = "10.78.0.2:7480" },
  { name = "gw2", address = "10.78.0.3:7480" },
  { name = "gw3", address = "10.78.0.4:7480" },
]
data_dir = "$WORK/data-$n"

[cluster.tls]
ca_file = "$WORK/ca/ca.pem"
cert_file = "$WORK/certs/$n.pem"
key_file = "$WORK/certs/$n-key.pem"

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
source_cidrs = ["10.77.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
EOF
done

say "config check"
$BIN check-config --config "$WORK/gw1.toml"

say "server: answers every TCP connection with the source address it sees"
nsx $NS_SRV socat TCP-LISTEN:8080,reuseaddr,fork 'SYSTEM:echo $SOCAT_PEERADDR' &
nsx $NS_WAN tcpdump -tt -e -i br1 -n -l arp 2>/dev/null > "$WORK/wan-arp.txt" &
sleep 0.5

say "starting egressd on gw1, gw2, gw3"
for n in "${NODES[@]}"; do
  nsx "$P-$n" "$BIN" run --config "$WORK/$n.toml" > "$WORK/$n.log" 2>&1 &
done
status() { nsx "$P-$1" "$BIN" status --admin http://127.0.0.1:7481; }
active_of() { nsx "$P-$1" "$BIN" status --json --admin http://127.0.0.1:7481 2>/dev/null \
  | grep -o '"held_gateways":\[[^]]*\]' | grep -q my-egressgw; }
for _ in $(seq 500); do active_of gw1 && break; sleep 0.02; done
status gw1

probe() {
  local seen
  seen=$(nsx $NS_CLI socat -T2 - "TCP:203.0.113.10:8080,connect-timeout=2" 2>/dev/null || true)
  echo "  client 10.77.0.10 -> server: the server sees ${seen:-(no connection)}"
}
say "traffic: SNATed to the VIP"
probe

outage() { # ping log, start time
  awk -v t0="$2" -F'[][]' '/bytes from/ { t = $2; if (p && t >= t0 - 0.05 && t - p > gap) gap = t - p; p = t }
    END { printf "  client-visible outage: %.0f ms\n", gap * 1000 }' "$1"
}

# disrupt NAME SUCCESSOR COMMAND...: runs COMMAND while the client pings the server every 10 ms,
# waits until SUCCESSOR holds the gateway, and prints the client-visible outage. Sets T0.
disrupt() {
  local name=$1 next=$2; shift 2
  nsx $NS_CLI ping -D -n -i 0.01 -W 1 203.0.113.10 > "$WORK/ping-$name.txt" 2>/dev/null &
  local ping=$!
  sleep 0.5
  T0=$(date +%s.%N)
  "$@"
  for _ in $(seq 1000); do active_of "$next" && break; sleep 0.01; done
  sleep 1
  kill $ping 2>/dev/null || true
  outage "$WORK/ping-$name.txt" "$T0"
}
start_gw1() { nsx "$P-gw1" "$BIN" run --config "$WORK/gw1.toml" >> "$WORK/gw1.log" 2>&1 & }

say "kill -9 of the active node's daemon (gw1), with the client pinging the server every 10 ms"
disrupt kill gw2 pkill -KILL -f "$BIN run --config $WORK/gw1.toml"
MAC2=$(nsx "$P-gw2" cat /sys/class/net/eth1/address)
awk -v t0="$T0" -v mac="$MAC2" '$0 ~ "who-has 203.0.113.50 tell 203.0.113.50" && index($0, mac) && $1 >= t0 {
  printf "  gw2 took the VIP: first gratuitous ARP on the wire %.0f ms after the kill\n", ($1 - t0) * 1000; exit }' "$WORK/wan-arp.txt"
grep -h "assignment change" "$WORK"/gw[23].log | sed 's/^/  leader log: /' | tail -1
status gw2
probe

say "gw1 comes back: first in order, it takes the role back (preemption, a planned handover)"
disrupt rejoin gw1 start_gw1
status gw1

say "planned handover: SIGTERM on gw1 (the leader moves the gateway before gw1 exits)"
disrupt term gw2 pkill -TERM -f "$BIN run --config $WORK/gw1.toml"
status gw2
probe

say "what the leaders decided, from the daemons' logs"
grep -h "assignment change" "$WORK"/gw*.log | sed -E 's/^([^ ]+) +INFO /\1 /' | cut -c1-220 | sed 's/^/  /'
say "done (the lab is removed on exit)"
