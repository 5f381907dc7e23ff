//! The standard lab: client — LAN bridge — gateway node(s) — WAN bridge — server, each in its own
//! namespace, plus helpers to run egressd there and to look at what the kernel holds.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Lab;

pub const LAN_NET: &str = "10.77.0.0/24";
pub const CLIENT_IP: &str = "10.77.0.10";
/// A second client address that no policy selects.
pub const CLIENT_OTHER_IP: &str = "10.77.0.11";
pub const NEXT_HOP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "203.0.113.10";
/// Server addresses that policies exclude or route to another gateway.
pub const SERVER_EXCLUDED_IP: &str = "203.0.113.20";
pub const SERVER_OTHER_IP: &str = "203.0.113.30";
pub const VIP: &str = "203.0.113.50";
pub const SERVER_PORT: u16 = 8080;

/// IPv6 beside the IPv4 addresses (see `Topo::add_ipv6`).
pub const CLIENT6: &str = "fd00:77::10";
pub const SERVER6: &str = "fd00:203::10";
pub const VIP6: &str = "fd00:203::50";
pub const SERVER6_PORT: u16 = 8086;

pub struct Topo {
    pub lab: Lab,
    pub lan: String,
    pub wan: String,
    /// The cluster network (peer traffic), a bridge of its own so that a test can cut a node
    /// from its peers while its LAN and WAN legs stay up.
    pub mgmt: String,
    pub client: String,
    pub server: String,
    /// Gateway node namespaces, in the order given.
    pub nodes: Vec<String>,
    pub dir: tempfile::TempDir,
}

/// LAN address of gateway node `i` (0-based).
pub fn node_lan_ip(i: usize) -> String {
    format!("10.77.0.{}", 2 + i)
}

/// IPv6 LAN and WAN addresses of gateway node `i`.
pub fn node_lan6(i: usize) -> String {
    format!("fd00:77::{}", i + 2)
}

pub fn node_wan6(i: usize) -> String {
    format!("fd00:203::{}", i + 2)
}

/// Cluster (peer) address of gateway node `i`.
pub fn node_mgmt_ip(i: usize) -> String {
    format!("10.78.0.{}", 2 + i)
}

/// WAN (primary) address of gateway node `i`.
pub fn node_wan_ip(i: usize) -> String {
    format!("203.0.113.{}", 2 + i)
}

impl Topo {
    /// Builds the lab with `n` gateway nodes, each with `eth0` on the LAN and `eth1` on the WAN,
    /// forwarding on. The client routes the server's network through `NEXT_HOP`; the server
    /// routes the LAN back through node 0 (only needed for traffic that is not SNATed).
    pub fn new(tag: &str, n: usize) -> Topo {
        let mut lab = Lab::new(tag);
        let lan = lab.ns("lan");
        let wan = lab.ns("wan");
        let mgmt = lab.ns("mgmt");
        let client = lab.ns("cli");
        let server = lab.ns("srv");
        lab.veth(&client, "eth0", &lan, "p-cli");
        lab.veth(&server, "eth0", &wan, "p-srv");
        let mut lan_ports = vec!["p-cli".to_string()];
        let mut wan_ports = vec!["p-srv".to_string()];
        let mut mgmt_ports = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let ns = lab.ns(&format!("gw{}", i + 1));
            let lp = format!("p-gw{}", i + 1);
            lab.veth(&ns, "eth0", &lan, &lp);
            let wp = format!("p-gw{}", i + 1);
            lab.veth(&ns, "eth1", &wan, &wp);
            lab.exec(
                &ns,
                [
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", node_lan_ip(i)),
                    "dev",
                    "eth0",
                ],
            );
            lab.exec(
                &ns,
                [
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", node_wan_ip(i)),
                    "dev",
                    "eth1",
                ],
            );
            let mp = format!("p-gw{}", i + 1);
            lab.veth(&ns, "eth2", &mgmt, &mp);
            let mgmt_addr = format!("{}/24", node_mgmt_ip(i));
            lab.exec(&ns, ["ip", "addr", "add", &mgmt_addr, "dev", "eth2"]);
            mgmt_ports.push(mp);
            lab.exec(&ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            lab.exec(&ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            lan_ports.push(lp);
            wan_ports.push(wp);
            nodes.push(ns);
        }
        let lp: Vec<&str> = lan_ports.iter().map(String::as_str).collect();
        let wp: Vec<&str> = wan_ports.iter().map(String::as_str).collect();
        lab.bridge(&lan, "br0", &lp);
        lab.bridge(&wan, "br1", &wp);
        let mp: Vec<&str> = mgmt_ports.iter().map(String::as_str).collect();
        if !mp.is_empty() {
            lab.bridge(&mgmt, "br2", &mp);
        }

        for ip in [CLIENT_IP, CLIENT_OTHER_IP] {
            lab.exec(
                &client,
                ["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
        }
        lab.exec(
            &client,
            ["ip", "route", "add", "203.0.113.0/24", "via", NEXT_HOP],
        );
        for ip in [SERVER_IP, SERVER_EXCLUDED_IP, SERVER_OTHER_IP] {
            lab.exec(
                &server,
                ["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
        }
        lab.exec(
            &server,
            ["ip", "route", "add", LAN_NET, "via", &node_wan_ip(0)],
        );

        let dir = tempfile::tempdir().expect("temp dir");
        let topo = Topo {
            lab,
            lan,
            wan,
            mgmt,
            client,
            server,
            nodes,
            dir,
        };
        let names: Vec<String> = (1..=n).map(|i| format!("gw{i}")).collect();
        make_certs(topo.dir.path(), &names);
        topo
    }

    /// The `[cluster.tls]` table of node `name`, with the files `make_certs` wrote.
    pub fn tls_table(&self, name: &str) -> String {
        tls_table(self.dir.path(), name)
    }

    /// Starts a server that answers every TCP connection with the peer address it saw.
    pub fn start_echo_server(&mut self) {
        let mut cmd = Command::new("socat");
        cmd.args([
            &format!("TCP-LISTEN:{SERVER_PORT},reuseaddr,fork"),
            "SYSTEM:echo $SOCAT_PEERADDR",
        ]);
        let server = self.server.clone();
        self.lab.spawn(&server, cmd);
        wait_for("echo server listening", Duration::from_secs(5), || {
            let out = self.lab.try_exec(&self.server, ["ss", "-ltnH"]);
            String::from_utf8_lossy(&out.stdout).contains(&format!(":{SERVER_PORT}"))
        });
    }

    /// The source address the server saw for a connection from `src` to `dst`, or None when the
    /// connection failed.
    pub fn seen_source(&self, src: &str, dst: &str) -> Option<String> {
        let out = self.lab.try_exec(
            &self.client,
            [
                "socat",
                "-T2",
                "-",
                &format!("TCP:{dst}:{SERVER_PORT},bind={src},connect-timeout=2"),
            ],
        );
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    }

    /// Adds IPv6 to the lab: the client, the server and every node's LAN and WAN legs get
    /// addresses (without duplicate address detection), the client routes the server's network
    /// through `via`, the server routes the LAN back through node 0, and a TCP6 echo server
    /// answers on `SERVER6_PORT`.
    pub fn add_ipv6(&mut self, via: &str) {
        let mut addrs = vec![
            (self.client.clone(), CLIENT6.to_string(), "eth0"),
            (self.server.clone(), SERVER6.to_string(), "eth0"),
        ];
        for (i, ns) in self.nodes.iter().enumerate() {
            addrs.push((ns.clone(), node_lan6(i), "eth0"));
            addrs.push((ns.clone(), node_wan6(i), "eth1"));
        }
        for (ns, addr, dev) in addrs {
            let addr = format!("{addr}/64");
            self.lab
                .exec(&ns, ["ip", "-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        }
        let route = ["ip", "-6", "route", "add", "fd00:203::/64", "via", via];
        self.lab.exec(&self.client, route);
        let back = node_wan6(0);
        let route = ["ip", "-6", "route", "add", "fd00:77::/64", "via", &back];
        self.lab.exec(&self.server, route);
        let mut cmd = Command::new("socat");
        cmd.args([
            &format!("TCP6-LISTEN:{SERVER6_PORT},reuseaddr,fork"),
            "SYSTEM:echo $SOCAT_PEERADDR",
        ]);
        let server = self.server.clone();
        self.lab.spawn(&server, cmd);
    }

    /// The source address the server saw for an IPv6 connection from `CLIENT6`, or None when
    /// the connection failed.
    pub fn seen_source6(&self) -> Option<std::net::Ipv6Addr> {
        let out = self.lab.try_exec(
            &self.client,
            [
                "socat",
                "-T2",
                "-",
                &format!("TCP6:[{SERVER6}]:{SERVER6_PORT},bind=[{CLIENT6}],connect-timeout=2"),
            ],
        );
        // socat prints the address in full ("[fd00:0203:0000:...]").
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .ok()
    }

    /// Writes a config file for node `i` and returns its path.
    pub fn write_config(&self, i: usize, body: &str) -> PathBuf {
        let path = self.dir.path().join(format!("gw{}.toml", i + 1));
        std::fs::write(&path, body).expect("writing config");
        path
    }

    /// Starts egressd for node `i` with `config`, logging to `log_path(i)`; returns the lab's
    /// child index.
    pub fn start_egressd(&mut self, i: usize, config: &Path) -> usize {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.nodes[i],
            &egressd_bin(),
            "run",
            "--config",
        ])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("EGRESSD_TEST_RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .stdout(log)
        .stderr(err);
        self.lab.spawn_raw(cmd)
    }

    /// The egressd CLI in node `i`'s namespace, against that node's admin endpoint.
    pub fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        let bin = egressd_bin();
        let mut full: Vec<&str> = vec![&bin];
        full.extend(args);
        full.extend(["--admin", "http://127.0.0.1:7481"]);
        self.lab.try_exec(&self.nodes[i], full)
    }

    /// The status node `i`'s admin endpoint serves, through the real CLI; None while it does
    /// not answer.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.cli(i, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The committed active node of `gateway` as node `i` sees it.
    pub fn active(&self, i: usize, gateway: &str) -> Option<String> {
        let s = self.status(i)?;
        s["gateways"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == gateway)?["active"]
            .as_str()
            .map(String::from)
    }

    pub fn leader(&self, i: usize) -> Option<String> {
        self.status(i)?["cluster"]["leader"]
            .as_str()
            .map(String::from)
    }

    /// Whether node `i` holds `gateway` in its data plane (by its own status).
    pub fn node_holds(&self, i: usize, gateway: &str) -> bool {
        self.status(i).is_some_and(|s| {
            s["dataplane"]["held_gateways"]
                .as_array()
                .is_some_and(|a| a.iter().any(|g| g == gateway))
        })
    }

    /// Addresses on `iface` in namespace `ns`.
    pub fn addresses(&self, ns: &str, iface: &str) -> Vec<String> {
        let out = self
            .lab
            .try_exec(ns, ["ip", "-o", "addr", "show", "dev", iface]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                it.position(|w| w == "inet" || w == "inet6")?;
                it.next()
                    .map(|a| a.split('/').next().unwrap_or(a).to_string())
            })
            .collect()
    }

    pub fn holds(&self, ns: &str, iface: &str, ip: &str) -> bool {
        self.addresses(ns, iface).iter().any(|a| a == ip)
    }

    /// The ruleset of `ns` as text.
    pub fn ruleset(&self, ns: &str) -> String {
        let out = self.lab.try_exec(ns, ["nft", "list", "ruleset"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Number of IPv4 SNAT elements (pieces, when an element spans several cells) in egressd's
    /// cell sets (`m4_*`) in `ns`, None when the table is absent.
    pub fn snat4_elements(&self, ns: &str) -> Option<usize> {
        let out = self
            .lab
            .try_exec(ns, ["nft", "-j", "list", "table", "inet", "egressd"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let items = v.get("nftables")?.as_array()?;
        Some(
            items
                .iter()
                .filter_map(|i| i.get("set"))
                .filter(|m| {
                    m.get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| n.starts_with("m4_"))
                })
                .map(|m| {
                    m.get("elem")
                        .and_then(|e| e.as_array())
                        .map_or(0, |a| a.len())
                })
                .sum(),
        )
    }

    /// The address gateway `gateway`'s IPv4 traffic is SNATed to in namespace `ns` (None: the
    /// gateway is not active there, or there is no table). Its chain marks the packets with a
    /// rank, which the SNAT chain maps to the address.
    pub fn gateway_snat(&self, ns: &str, gateway: &str) -> Option<String> {
        let list = |chain: &str| {
            let out = self
                .lab
                .try_exec(ns, ["nft", "-t", "list", "chain", "inet", "egressd", chain]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let chain = list(&format!("g4_{}", egressd::policy::GwId::of(gateway)));
        let mark = chain
            .split("meta mark set ")
            .nth(1)?
            .split(" | ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string();
        let mark_value = u32::from_str_radix(mark.trim_start_matches("0x"), 16).ok()?;
        if mark_value & 0x8000_0000 != 0 {
            return None; // a redirect, not a SNAT
        }
        let snat = list("snat_by_mark");
        let line = snat.lines().find(|l| l.contains("snat ip to"))?;
        line.split(&format!("{mark} : "))
            .nth(1)?
            .split([',', ' ', '}'])
            .next()
            .map(str::to_string)
    }

    /// Whether gateway `gateway`'s IPv4 chain in `ns` exists and only drops (neither SNATs nor
    /// redirects): a failed listing is not taken for a drop.
    pub fn gateway_drops(&self, ns: &str, gateway: &str) -> bool {
        let chain = format!("g4_{}", egressd::policy::GwId::of(gateway));
        let out = self.lab.try_exec(
            ns,
            ["nft", "-t", "list", "chain", "inet", "egressd", &chain],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        out.status.success() && text.contains(" drop") && !text.contains("meta mark set")
    }

    /// Whether egressd's overlay device exists in `ns`, and how many of its `ip rule`s (IPv4
    /// and IPv6, tagged `proto 230`) there are.
    pub fn overlay_objects(&self, ns: &str) -> (bool, usize) {
        let link = self.lab.try_exec(ns, ["ip", "link", "show", "egressd0"]);
        let mut rules = 0;
        for family in ["-4", "-6"] {
            let out = self.lab.try_exec(ns, ["ip", family, "rule"]);
            rules += String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("proto 230"))
                .count();
        }
        (link.status.success(), rules)
    }

    /// The overlay slot gateway `gateway`'s IPv4 chain redirects to in namespace `ns` (None: it
    /// does not redirect).
    pub fn gateway_redirect(&self, ns: &str, gateway: &str) -> Option<u16> {
        let chain = format!("g4_{}", egressd::policy::GwId::of(gateway));
        let out = self.lab.try_exec(
            ns,
            ["nft", "-t", "list", "chain", "inet", "egressd", &chain],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mark = text.split("meta mark set ").nth(1)?.split(" | ").nth(1)?;
        let mark = mark.split_whitespace().next()?.trim_start_matches("0x");
        let mark = u32::from_str_radix(mark, 16).ok()?;
        (mark & 0x8000_0000 != 0).then_some(((mark >> 16) & 0x7fff) as u16)
    }

    /// Starts a capture of ARP on the WAN bridge into a text file, and returns its path. Lines
    /// start with tcpdump's Unix timestamp and carry the sender MAC (`-tt -e`).
    pub fn start_arp_capture(&mut self, name: &str) -> PathBuf {
        self.start_capture(name, "arp")
    }

    /// Like `start_arp_capture`, for neighbour advertisements (ICMPv6 type 136).
    pub fn start_na_capture(&mut self, name: &str) -> PathBuf {
        self.start_capture(name, "icmp6 and ip6[40] == 136")
    }

    fn start_capture(&mut self, name: &str, filter: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.txt"));
        let file = std::fs::File::create(&path).expect("capture file");
        super::tools::need("tcpdump");
        let mut cmd = super::tools::cmd("ip");
        cmd.args([
            "netns", "exec", &self.wan, "tcpdump", "-tt", "-i", "br1", "-n", "-l", "-e", filter,
        ])
        .stdout(file)
        .stderr(Stdio::null());
        self.lab.spawn_raw(cmd);
        // tcpdump needs a moment to attach before the test makes traffic.
        std::thread::sleep(Duration::from_millis(500));
        path
    }

    /// Log file of node `i`'s daemon.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("gw{}.log", i + 1))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }
}

/// The cluster's peer certificates, made by the real `egressd tls` commands as an operator
/// would: a CA in `{dir}/tls/ca` (`ca.pem`, `ca-key.pem`) and for each of `names`
/// `{dir}/tls/certs/NAME.pem` and `NAME-key.pem`.
pub fn make_certs(dir: &Path, names: &[String]) {
    let ca = dir.join("tls/ca");
    egressd_tls(&["init-ca", "--out-dir", &ca.display().to_string()]);
    for n in names {
        issue_cert(dir, n, &[]);
    }
}

/// Issues (or re-issues, `--force`) the certificate of `name` with the lab's CA, with
/// `extra` arguments (`--san`, `--days`).
pub fn issue_cert(dir: &Path, name: &str, extra: &[&str]) {
    let ca = dir.join("tls/ca").display().to_string();
    let certs = dir.join("tls/certs").display().to_string();
    let mut args = vec![
        "issue",
        name,
        "--ca-dir",
        &ca,
        "--out-dir",
        &certs,
        "--force",
    ];
    args.extend(extra);
    egressd_tls(&args);
}

/// The egressd binary the tests and benches run: `EGRESSD_BIN` when set, otherwise the one
/// cargo built with the test or bench target. A `cargo bench` build unifies the
/// dev-dependencies' features into the daemon's dependencies, so to measure the binary a
/// release ships, build it with `cargo build --release` and name a copy of it here.
pub fn egressd_bin() -> String {
    std::env::var("EGRESSD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_egressd").to_string())
}

/// Runs `egressd tls ARGS`, panicking with its output when it fails.
pub fn egressd_tls(args: &[&str]) {
    let out = Command::new(egressd_bin())
        .arg("tls")
        .args(args)
        .output()
        .expect("running egressd tls");
    assert!(
        out.status.success(),
        "egressd tls {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `[cluster.tls]` table of node `name` with the files of `make_certs(dir, ..)`.
pub fn tls_table(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "[cluster.tls]\nca_file = \"{d}/tls/ca/ca.pem\"\ncert_file = \"{d}/tls/certs/{name}.pem\"\nkey_file = \"{d}/tls/certs/{name}-key.pem\"\n"
    )
}

/// Polls `f` every 10 ms until it holds; panics with `what` after `timeout`. This is a liveness
/// bound for the test, not a performance check (those live in the benchmarks).
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status();
}
