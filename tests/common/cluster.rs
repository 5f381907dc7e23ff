//! A running egressd cluster in a lab, for the cluster tests and benchmarks.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::arp::{self, ArpProber, Probe};
use super::topo::*;

pub const WAIT: Duration = Duration::from_secs(20);
pub const GW: &str = "vip";

pub fn name(i: usize) -> String {
    format!("gw{}", i + 1)
}

/// The config of node `i` in an `n`-node cluster; `labelled` says whether it carries the
/// gateway's selector label.
pub fn config(topo: &Topo, n: usize, i: usize, labelled: bool, cluster_extra: &str) -> String {
    let peers: Vec<String> = (0..n)
        .map(|j| {
            format!(
                "{{ name = \"{}\", address = \"{}:7480\" }}",
                name(j),
                node_mgmt_ip(j)
            )
        })
        .collect();
    let labels = if labelled { r#"{ egress = "" }"# } else { "{}" };
    format!(
        r#"
[node]
name = "{me}"
labels = {labels}

[cluster]
listen = "{listen}:7480"
peers = [{peers}]
data_dir = "{dir}/data-{me}"
{cluster_extra}
{tls}

[dataplane]
garp_count = 3
{objects}"#,
        objects = lab_objects(),
        me = name(i),
        listen = node_mgmt_ip(i),
        peers = peers.join(", "),
        dir = topo.dir.path().display(),
        tls = topo.tls_table(&name(i)),
    )
}

/// The lab's gateway (`GW`: the VIP on eth1, the next hop on eth0), as a config file table.
pub fn lab_gateway() -> String {
    format!(
        r#"
[[gateway]]
name = "{GW}"
node_selector = {{ egress = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP}", interfaces = ["eth1"] }}
[gateway.next_hop]
ip = "{NEXT_HOP}"
interface = "eth0"
"#
    )
}

/// The lab's gateway and its policy (the client toward the server's network), as config file
/// tables.
pub fn lab_objects() -> String {
    format!(
        r#"{}
[[policy]]
name = "to-wan"
egress_gateway_name = "{GW}"
source_cidrs = ["{CLIENT_IP}/32"]
destination_cidrs = ["203.0.113.0/24"]
"#,
        lab_gateway()
    )
}

/// A file holding `token`, and the config lines that make the nodes require it for mutations
/// (the `extra` of `Cluster::start_with`). Keep the file alive while the cluster runs.
pub fn admin_token(token: &str) -> (tempfile::NamedTempFile, String) {
    let file = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(file.path(), format!("{token}\n")).expect("token");
    let extra = format!("[admin]\ntoken_file = \"{}\"", file.path().display());
    (file, extra)
}

pub struct Cluster {
    pub topo: Topo,
    pub n: usize,
    pub children: Vec<Option<usize>>,
    pub configs: Vec<PathBuf>,
    /// Extra `[cluster]` lines of every node's config (e.g. a timing profile).
    pub extra: String,
    /// More gateways and policies (TOML) at the end of every node's config.
    pub objects: String,
}

impl Cluster {
    pub fn start(tag: &str, n: usize) -> Cluster {
        Cluster::start_with(tag, n, "")
    }

    pub fn start_with(tag: &str, n: usize, extra: &str) -> Cluster {
        Cluster::start_full(tag, n, extra, "")
    }

    /// A cluster whose nodes' files also hold `objects` (TOML gateways and policies).
    pub fn start_full(tag: &str, n: usize, extra: &str, objects: &str) -> Cluster {
        Cluster::start_prepared(tag, n, extra, objects, |_| {})
    }

    /// Like `start_full`, running `prepare` on the lab before any daemon starts (e.g. to put a
    /// node's `data_dir`, `{topo.dir}/data-gwN`, on a file system of its own).
    pub fn start_prepared(
        tag: &str,
        n: usize,
        extra: &str,
        objects: &str,
        prepare: impl FnOnce(&Topo),
    ) -> Cluster {
        let c = Cluster::launch(tag, n, extra, objects, prepare);
        c.wait_active("gw1");
        c
    }

    /// Starts the lab and the daemons without waiting for anything (benchmarks time the start).
    pub fn launch(
        tag: &str,
        n: usize,
        extra: &str,
        objects: &str,
        prepare: impl FnOnce(&Topo),
    ) -> Cluster {
        Cluster::launch_edited(tag, n, extra, objects, prepare, |_, body| body)
    }

    /// Like `launch`, with each node's config file passed through `edit` (node index, text)
    /// before it is written.
    pub fn launch_edited(
        tag: &str,
        n: usize,
        extra: &str,
        objects: &str,
        prepare: impl FnOnce(&Topo),
        edit: impl Fn(usize, String) -> String,
    ) -> Cluster {
        // Topo::new made every node's certificate with `egressd tls`.
        let mut topo = Topo::new(tag, n);
        prepare(&topo);
        topo.start_echo_server();
        let configs: Vec<PathBuf> = (0..n)
            .map(|i| {
                let body = edit(i, config(&topo, n, i, true, extra) + objects);
                topo.write_config(i, &body)
            })
            .collect();
        let children = (0..n)
            .map(|i| Some(topo.start_egressd(i, &configs[i])))
            .collect();
        Cluster {
            topo,
            n,
            children,
            configs,
            extra: extra.to_string(),
            objects: objects.to_string(),
        }
    }

    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n).filter(|i| self.children[*i].is_some())
    }

    /// Waits until every live node sees `node` as the committed active node and that node's
    /// data plane holds the gateway.
    pub fn wait_active(&self, node: &str) {
        self.wait_active_within(node, WAIT);
    }

    /// `wait_active` with a time limit of its own (a start with 100 000 policies takes longer).
    pub fn wait_active_within(&self, node: &str, limit: Duration) {
        let i = self.index(node);
        let start = std::time::Instant::now();
        while !(self
            .live()
            .all(|j| self.topo.active(j, GW).as_deref() == Some(node))
            && self.topo.node_holds(i, GW))
        {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {node} active and holding the gateway\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn index(&self, node: &str) -> usize {
        node.trim_start_matches("gw")
            .parse::<usize>()
            .expect("node name")
            - 1
    }

    pub fn leader(&self) -> String {
        let mut leader = None;
        wait_for("a leader", WAIT, || {
            leader = self.live().find_map(|j| self.topo.leader(j));
            leader.is_some()
        });
        leader.unwrap_or_default()
    }

    /// Restarts the leader until it is not `node` (elections pick a random winner), so that a
    /// test can make a chosen node the active one and still have a successor after it.
    pub fn ensure_leader_is_not(&mut self, node: &str) {
        for _ in 0..10 {
            let l = self.leader();
            if l != node {
                return;
            }
            let i = self.index(&l);
            self.signal(&l, "KILL");
            wait_for("a new leader", WAIT, || {
                self.live()
                    .any(|j| self.topo.leader(j).is_some_and(|x| x != l))
            });
            let cfg = self.configs[i].clone();
            self.children[i] = Some(self.topo.start_egressd(i, &cfg));
            wait_for("the restarted node back in the cluster", WAIT, || {
                self.topo.leader(i).is_some()
            });
        }
        panic!("{node} kept winning the election");
    }

    /// The packets node `i`'s nftables dropped for a gateway not held there.
    pub fn dropped(&self, i: usize) -> u64 {
        self.counter(i, "dropped")
    }

    /// The packets node `i`'s nftables redirected to the active node.
    pub fn redirected(&self, i: usize) -> u64 {
        self.counter(i, "redirected")
    }

    fn counter(&self, i: usize, name: &str) -> u64 {
        let out = self.topo.lab.try_exec(
            &self.topo.nodes[i],
            ["nft", "-j", "list", "counter", "inet", "egressd", name],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|i| i.get("counter")?.get("packets")?.as_u64())
            .unwrap_or(0)
    }

    /// Cuts every link of `node` (LAN, WAN and cluster network): to the rest of the lab the
    /// host is gone, though its daemon runs on.
    pub fn cut_links(&self, node: &str) {
        let port = format!("p-{node}");
        for ns in [&self.topo.lan, &self.topo.wan, &self.topo.mgmt] {
            self.topo.lab.exec(ns, ["ip", "link", "set", &port, "down"]);
        }
    }

    /// Brings every link of `node` back up (undoes `cut_links`).
    pub fn restore_links(&self, node: &str) {
        let port = format!("p-{node}");
        for ns in [&self.topo.lan, &self.topo.wan, &self.topo.mgmt] {
            self.topo.lab.exec(ns, ["ip", "link", "set", &port, "up"]);
        }
    }

    /// Makes `node` the active one by removing the selector label from every node before it in
    /// alphabetical order (their config files change and they get SIGHUP).
    pub fn make_active(&mut self, node: &str) {
        let target = self.index(node);
        for i in 0..target {
            let body = config(&self.topo, self.n, i, false, &self.extra) + &self.objects;
            std::fs::write(&self.configs[i], body).expect("config");
            let c = self.children[i].expect("running");
            signal(self.topo.lab.child(c), "HUP");
        }
        self.wait_active(node);
    }

    pub fn signal(&mut self, node: &str, sig: &str) {
        let i = self.index(node);
        let c = self.children[i].expect("running");
        signal(self.topo.lab.child(c), sig);
        if sig == "KILL" {
            let _ = self.topo.lab.child(c).wait();
            self.children[i] = None;
        }
    }

    pub fn prober(&self) -> ArpProber {
        ArpProber::start(
            &self.topo.server,
            "eth0",
            SERVER_IP.parse::<Ipv4Addr>().expect("ip"),
            VIP.parse::<Ipv4Addr>().expect("ip"),
            Duration::from_millis(10),
        )
    }

    pub fn macs(&self) -> Vec<[u8; 6]> {
        (0..self.n)
            .map(|i| arp::mac(&self.topo.nodes[i], "eth1"))
            .collect()
    }

    pub fn logs(&self) -> String {
        (0..self.n)
            .map(|i| format!("---- {} ----\n{}", name(i), self.topo.log(i)))
            .collect()
    }

    /// The VIP is served end to end: the client's traffic reaches the server from the VIP.
    pub fn assert_traffic_via_vip(&self) {
        let mut seen = None;
        wait_for("client traffic SNATed to the VIP", WAIT, || {
            seen = self.topo.seen_source(CLIENT_IP, SERVER_IP);
            seen.as_deref() == Some(VIP)
        });
    }
}

/// Checks the probes: never two answers at once. Returns the index of the node whose MAC
/// answered last.
pub fn check_probes(c: &Cluster, probes: &[Probe]) -> Option<usize> {
    let macs = c.macs();
    let doubles = arp::double_answers(probes);
    assert!(
        doubles.is_empty(),
        "{} of {} probes were answered by two nodes at once (first at {:?})\n{}",
        doubles.len(),
        probes.len(),
        doubles.first().map(|p| p.at.elapsed()),
        c.logs()
    );
    probes
        .iter()
        .rev()
        .find_map(|p| p.answered_by.iter().next())
        .and_then(|m| macs.iter().position(|x| x == m))
}

impl Cluster {
    /// Like `wait_active`, asking only the given nodes (others may be stopped).
    pub fn wait_active_among(&self, nodes: &[usize], node: &str) {
        let i = self.index(node);
        wait_for(&format!("{node} active (asking {nodes:?})"), WAIT, || {
            nodes
                .iter()
                .all(|j| self.topo.active(*j, GW).as_deref() == Some(node))
                && self.topo.node_holds(i, GW)
        });
    }
}

/// Samples, every `interval` until stopped, which nodes have the VIP on eth1 (`ip addr`); returns
/// the samples in which more than one did.
pub struct AddressSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<AddressSamples>>,
}

/// What an [`AddressSampler`] saw, sweep by sweep.
#[derive(Debug, Default)]
pub struct AddressSamples {
    pub sweeps: usize,
    /// Sweeps in which two or more nodes had the VIP on `eth1` (the node indexes).
    pub on_two: Vec<Vec<usize>>,
    /// Sweeps in which two or more nodes had the VIP *and* a live fence element for it: two
    /// nodes the kernel lets answer for it.
    pub answering_two: Vec<Vec<usize>>,
    /// Sweeps in which exactly one node answered: the fence read is not vacuous.
    pub answering_one: usize,
}

impl AddressSampler {
    /// Every `interval`, one sweep over `nodes` in order: per node its VIP address, then its
    /// ARP fence's lease set (the kernel lists only unexpired elements). The two reads of one
    /// node are back to back, the nodes one after the other, so a sweep is not one instant: an
    /// address on two nodes whose fences were not both live is the lag of the old holder's
    /// removal after its lease ended, which the design allows (the fence, not the address,
    /// decides who answers).
    pub fn start(nodes: Vec<String>, interval: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let out = |ns: &str, args: &[&str]| {
            std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let set = egressd::dataplane::fence::lease_set(VIP.parse().expect("ip"));
        let handle = std::thread::spawn(move || {
            let mut seen = AddressSamples::default();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let t = std::time::Instant::now();
                let (mut holding, mut answering) = (Vec::new(), Vec::new());
                for (i, ns) in nodes.iter().enumerate() {
                    let addr = out(ns, &["ip", "-o", "addr", "show", "dev", "eth1"]);
                    if !addr.contains(&format!("inet {VIP}/")) {
                        continue;
                    }
                    holding.push(i);
                    let lease = out(ns, &["nft", "list", "set", "arp", "egressd", &set]);
                    if lease.contains("elements = {") {
                        answering.push(i);
                    }
                }
                seen.sweeps += 1;
                if holding.len() > 1 {
                    seen.on_two.push(holding);
                }
                match answering.len() {
                    0 => {}
                    1 => seen.answering_one += 1,
                    _ => seen.answering_two.push(answering),
                }
                std::thread::sleep(interval.saturating_sub(t.elapsed()));
            }
            seen
        });
        AddressSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> AddressSamples {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().expect("sampler thread"))
            .unwrap_or_default()
    }
}

impl Drop for AddressSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `n` policies of the gateway `vip`, each selecting one /32 source (every other address from
/// 10.100.0.0, so that none merge; never the test clients) to everywhere: an allow-list of many
/// client hosts.
pub fn many_sources(n: usize) -> String {
    let mut s = String::with_capacity(n * 130);
    for i in 0..n {
        s.push_str(&format!(
            "[[policy]]\nname = \"src-{i:06}\"\negress_gateway_name = \"{GW}\"\n\
             source_cidrs = [\"{}/32\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
            many_sources_address(i)
        ));
    }
    s
}

/// The source of policy `i` of `many_sources`.
pub fn many_sources_address(i: usize) -> String {
    let k = 2 * i;
    format!("10.{}.{}.{}", 100 + (k >> 16), (k >> 8) & 255, k & 255)
}

/// One policy of the gateway `vip` from the client's LAN to `n` distinct /24 destinations, every
/// other /24 from 100.0.0.0 (so that none merge; never the server's network): an allow-list
/// of cloud ranges.
pub fn many_destinations(n: usize) -> String {
    let dests: Vec<String> = (0..n)
        .map(|i| {
            let k = 2 * i;
            format!(
                "\"{}.{}.{}.0/24\"",
                100 + (k >> 16),
                (k >> 8) & 255,
                k & 255
            )
        })
        .collect();
    format!(
        "[[policy]]\nname = \"cloud\"\negress_gateway_name = \"{GW}\"\n\
         source_cidrs = [\"{LAN_NET}\"]\ndestination_cidrs = [{}]\n",
        dests.join(", ")
    )
}
