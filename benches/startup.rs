//! Start-up benchmark (root only; `cargo bench --bench startup`): from spawning `egressd run` on a
//! single node to its first gratuitous ARP for the VIP on the wire, as timestamped by tcpdump on
//! the WAN bridge, and to the VIP being visible in `ip addr`. Several trials, each in a fresh lab.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::topo::{Topo, VIP, wait_for};

const TRIALS: usize = 10;

fn config(topo: &Topo) -> String {
    format!(
        r#"
[node]
name = "gw1"
labels = {{ egress = "" }}
[cluster]
listen = "127.0.0.1:7480"
peers = [{{ name = "gw1", address = "127.0.0.1:7480" }}]
data_dir = "{dir}/gw1"
[[gateway]]
name = "vip"
node_selector = {{ egress = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP}", interfaces = ["eth1"] }}
[[policy]]
name = "all"
egress_gateway_name = "vip"
source_cidrs = ["10.77.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
"#,
        dir = topo.dir.path().display()
    )
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED benches/startup.rs: needs root for network namespaces");
        return;
    }
    let mut to_arp = Vec::new();
    let mut to_addr = Vec::new();
    for trial in 0..TRIALS {
        let mut topo = Topo::new(&format!("st{trial}"), 1);
        let cap = topo.start_arp_capture("arp");
        let cfg = topo.write_config(0, &config(&topo));
        let gw = topo.nodes[0].clone();
        let t0_wall = SystemTime::now();
        let t0 = Instant::now();
        topo.start_egressd(0, &cfg);
        wait_for("VIP held", Duration::from_secs(10), || {
            topo.holds(&gw, "eth1", VIP)
        });
        to_addr.push(t0.elapsed());
        let garp = format!("who-has {VIP} tell {VIP}");
        let mut line = String::new();
        wait_for("gratuitous ARP captured", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&cap).unwrap_or_default();
            match text.lines().find(|l| l.contains(&garp)) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        });
        let stamp: f64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("tcpdump -tt timestamp");
        let start = t0_wall
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        to_arp.push(Duration::from_secs_f64((stamp - start).max(0.0)));
    }
    let stats = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1], v[0])
    };
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!("\n| from `egressd run` to | trials | median | min | max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let (m, x, n) = stats(to_arp);
    println!(
        "| first gratuitous ARP on the wire (tcpdump) | {TRIALS} | {} | {} | {} |",
        ms(m),
        ms(n),
        ms(x)
    );
    let (m, x, n) = stats(to_addr);
    println!(
        "| VIP seen in `ip addr` (10 ms polling) | {TRIALS} | {} | {} | {} |",
        ms(m),
        ms(n),
        ms(x)
    );
}
