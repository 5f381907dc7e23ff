//! One node holding a `VirtualIPAddress` gateway with a foreign table beside egressd's, a UDP
//! probe through it, and outside changes of its nftables (issue 16): shared by
//! `tests/e2e_heal.rs` and `benches/heal.rs`.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::leak::{LeakProbe, Leaks};
use super::topo::*;

pub const WAIT: Duration = Duration::from_secs(10);
/// The liveness bound of the test: SNAT back within this after an outside change. The
/// performance figure (median and max of 20 trials) is the benchmark's: `cargo bench --bench
/// heal`.
pub const BOUND: Duration = Duration::from_secs(1);
pub const PROBE_PORT: u16 = 9999;
/// The long flow's client port.
pub const LONG_PORT: u16 = 40000;
/// Packets sent this long after the repair event must all be SNATed: the event is written once
/// the repair's last transaction committed, so this only covers the clock reading and the
/// packet in flight.
pub const AFTER_REPAIR: Duration = Duration::from_millis(5);

/// The lab's gateway and policy, and `policies`, on a one-node cluster.
pub fn config(topo: &Topo, policies: &str) -> String {
    node_config(
        topo,
        "",
        &format!("{}{policies}", super::cluster::lab_objects()),
    )
}

/// A one-node cluster (`gw1`, the admin token in the lab's directory) with `dataplane` lines in
/// its `[dataplane]` table, and `objects` after it.
pub fn node_config(topo: &Topo, dataplane: &str, objects: &str) -> String {
    format!(
        r#"
[admin]
token_file = "{dir}/token"

[node]
name = "gw1"
labels = {{ egress = "" }}

[cluster]
listen = "127.0.0.1:7480"
peers = [{{ name = "gw1", address = "127.0.0.1:7480" }}]
data_dir = "{dir}/gw1"

[dataplane]
garp_count = 1
{dataplane}
{objects}
"#,
        dir = topo.dir.path().display(),
    )
}

/// One node running egressd, with a foreign table of the operator's beside egressd's.
pub struct Node {
    pub topo: Topo,
    pub gw: String,
    /// The daemon's index among the lab's children.
    pub daemon: usize,
    /// Too many policies to list the gateway chain with nft (which reads every element of the
    /// table first, even with `-t`: minutes at 100 000): the daemon's status is trusted instead
    /// (it claims no gateway held while the SNAT table is being repaired).
    pub big: bool,
}

pub const TOKEN: &str = "e2e-heal-admin-token-0123456789";

pub const FOREIGN: &str = "table ip foreign {\n\
    \tset allowed {\n\t\ttype ipv4_addr\n\t\telements = { 10.99.0.1, 10.99.0.2 }\n\t}\n\
    \tchain c_forward {\n\t\ttype filter hook forward priority 10; policy accept;\n\
    \t\tip saddr @allowed counter accept\n\t}\n}\n";

impl Node {
    pub fn start(tag: &str, extra_policies: usize) -> Node {
        Node::start_within(tag, extra_policies, WAIT)
    }

    /// `start` with a longer wait for the gateway (100 000 policies take a while).
    pub fn start_within(tag: &str, extra_policies: usize, wait: Duration) -> Node {
        let topo = Topo::new(tag, 1);
        let gw = topo.nodes[0].clone();
        let token = topo.dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
        // A token file others can read is refused at start.
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("token mode");
        let policies = super::cluster::many_sources(extra_policies);
        let cfg = topo.write_config(0, &config(&topo, &policies));
        let mut node = Node {
            topo,
            gw,
            daemon: 0,
            big: extra_policies > 10_000,
        };
        node.nft_file("foreign", FOREIGN);
        node.daemon = node.topo.start_egressd(0, &cfg);
        node.wait_held_within(wait);
        node
    }

    pub fn wait_held(&self) {
        self.wait_held_within(WAIT);
    }

    pub fn wait_held_within(&self, wait: Duration) {
        wait_for("VIP held and SNAT installed", wait, || {
            self.topo.holds(&self.gw, "eth1", VIP)
                && self.topo.node_holds(0, "vip")
                && (self.big || self.gateway_snat().as_deref() == Some(VIP))
        });
    }

    /// Runs `nft -f` on `script` inside the node's namespace (as an operator or a
    /// configuration-management run would); panics when nft refuses it.
    pub fn nft_file(&self, name: &str, script: &str) {
        let path = self.topo.dir.path().join(format!("{name}.nft"));
        std::fs::write(&path, script).expect("nft file");
        self.topo
            .lab
            .exec(&self.gw, ["nft", "-f", &path.display().to_string()]);
    }

    pub fn nft(&self, command: &str) {
        self.topo.lab.exec(&self.gw, ["nft", command]);
    }

    pub fn ruleset(&self) -> String {
        self.topo.ruleset(&self.gw)
    }

    /// The address the gateway's IPv4 traffic is SNATed to (slow with many policies, see
    /// `big`).
    pub fn gateway_snat(&self) -> Option<String> {
        self.topo.gateway_snat(&self.gw, "vip")
    }

    /// The ruleset without the elements of sets and maps (`nft -t`).
    pub fn terse_ruleset(&self) -> String {
        let out = self
            .topo
            .lab
            .try_exec(&self.gw, ["nft", "-t", "list", "ruleset"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The foreign table as nft prints it (counters zeroed: traffic moves them).
    pub fn foreign(&self) -> String {
        let out = self
            .topo
            .lab
            .try_exec(&self.gw, ["nft", "list", "table", "ip", "foreign"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .map(|l| match l.find("counter packets") {
                Some(i) => format!("{}counter", &l[..i]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn status(&self) -> serde_json::Value {
        let mut s = None;
        wait_for("status", WAIT, || {
            s = self.topo.status(0);
            s.is_some()
        });
        s.unwrap_or_default()
    }

    /// Every event the node keeps (its log holds the last 512; `status --events` shows only 50,
    /// fewer than a benchmark's repairs).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let out = self.topo.lab.try_exec(
            &self.gw,
            [
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://127.0.0.1:7481/v1/events?limit=512",
            ],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The repair events, oldest first.
    pub fn repairs(&self) -> Vec<(u64, String)> {
        self.events()
            .iter()
            .filter(|e| e["kind"] == "repair")
            .map(|e| {
                (
                    e["at_unix_ms"].as_u64().unwrap_or(0),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// The value of one metric series (e.g. `egressd_dataplane_repairs_total{object="inet
    /// egressd"}`), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let out = self.topo.lab.try_exec(
            &self.gw,
            [
                "curl",
                "-s",
                "--max-time",
                "2",
                "http://127.0.0.1:7481/metrics",
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The addresses the ARP fence holds a lease element for, sorted.
    pub fn arp_leases(&self) -> Vec<String> {
        let out = self
            .topo
            .lab
            .try_exec(&self.gw, ["nft", "list", "table", "arp", "egressd"]);
        let text = String::from_utf8_lossy(&out.stdout);
        // One block per lease set: `set lease_<hex> {` up to its closing brace.
        let mut l: Vec<String> = text
            .split("\tset lease_")
            .skip(1)
            .filter_map(|block| {
                let (hex, rest) = block.split_once(' ')?;
                let body = rest.split("\n\t}").next()?;
                body.contains("elements = {")
                    .then(|| u32::from_str_radix(hex, 16).ok())
                    .flatten()
                    .map(|a| Ipv4Addr::from(a).to_string())
            })
            .collect();
        l.sort();
        l
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which of egressd's tables a test waits to see repaired.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    Snat,
    Fence,
}

impl Part {
    /// What the repair event says of it.
    pub fn mark(self) -> &'static str {
        match self {
            Part::Snat => "; SNAT back ",
            Part::Fence => "; fence back ",
        }
    }
}

/// What one outside change cost, seen from the server.
#[derive(Debug)]
pub struct Outcome {
    pub leaks: Leaks,
    /// The repair event's time after the change was started.
    pub repaired_after: Duration,
    pub message: String,
}

/// Makes one outside change with `act` while the probe runs, waits for the repair, and reads
/// what the server saw.
pub fn outside_change(node: &Node, what: &str, part: Part, act: impl FnOnce(&Node)) -> Outcome {
    let mark = part.mark();
    let before = node.repairs().len();
    let probe = LeakProbe::start(
        &node.topo.client,
        CLIENT_IP.parse().expect("ip"),
        LONG_PORT,
        &node.topo.server,
        format!("{SERVER_IP}:{PROBE_PORT}").parse().expect("addr"),
        Duration::from_millis(1),
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let t0_unix = unix_ms();
    act(node);
    let mut event = None;
    wait_for(&format!("the repair event after {what}"), WAIT, || {
        event = node
            .repairs()
            .into_iter()
            .skip(before)
            .find(|(_, m)| m.contains(mark));
        event.is_some()
    });
    node.wait_held();
    std::thread::sleep(Duration::from_millis(100));
    let log = probe.stop();
    let (at, message) = event.unwrap_or_default();
    let repaired_after = Duration::from_millis(at.saturating_sub(t0_unix));
    let leaks = log.leaks(
        CLIENT_IP.parse().expect("ip"),
        t0,
        t0 + repaired_after + AFTER_REPAIR,
    );
    Outcome {
        leaks,
        repaired_after,
        message,
    }
}

/// The name of the first chain or map of egressd's inet table whose name starts with `prefix`
/// (names carry a generation number).
/// The cell chain whose rule looks up cell set `set` (`m4_G_C_<gateway id>` → `c4_G_C`).
pub fn cell_chain(set: &str) -> String {
    let cell = set.rsplit_once('_').map_or(set, |(cell, _)| cell);
    cell.replacen('m', "c", 1)
}

pub fn object_named(ruleset: &str, kind: &str, prefix: &str) -> String {
    let mut in_ours = false;
    for line in ruleset.lines() {
        let l = line.trim();
        if l.starts_with("table ") {
            in_ours = l == "table inet egressd {";
        }
        if let Some(name) = l.strip_prefix(&format!("{kind} {prefix}"))
            && in_ours
        {
            let rest = name.split_whitespace().next().unwrap_or("");
            return format!("{prefix}{rest}");
        }
    }
    panic!("no {kind} {prefix}* in egressd's inet table:\n{ruleset}")
}

/// The fence's leases of the node holding the gateway: its VIP and its next hop, sorted.
pub fn leases() -> Vec<String> {
    let mut l = vec![VIP.to_string(), NEXT_HOP.to_string()];
    l.sort();
    l
}
