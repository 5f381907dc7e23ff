//! nftables data-plane benchmark (root only; `cargo bench --bench nft`).
//!
//! 1. Full apply of N elements through `NftFirewall` (native syntax) and, for comparison, the
//!    same table as one JSON batch (`nft -j -f -`), each trial in a fresh namespace.
//! 2. One element changed (delete one + add one) with N elements installed.
//! 3. New TCP connections per second through a gateway namespace with 1 vs 10 000 elements.
//!
//! A full run takes about 15 minutes here, most of it the 100 000-element "Dests" cases (the
//! kernel inserts those quadratically, ~31 s per load).
//!
//! The binary re-executes itself inside namespaces as the TCP server or client of part 3
//! (hidden first argument `--egressd-nft-server` / `--egressd-nft-client`).

#[path = "../tests/common/netns.rs"]
mod netns;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egressd::dataplane::Firewall;
use egressd::dataplane::nft::NftFirewall;
use egressd::policy::{SnatElement, SnatMap};
use netns::Lab;
use serde_json::{Value, json};

const SERVER_ARG: &str = "--egressd-nft-server";
const CLIENT_ARG: &str = "--egressd-nft-client";
const MEASURE_ARG: &str = "--egressd-nft-measure";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(SERVER_ARG) => return server(&args[2..]),
        Some(CLIENT_ARG) => return client(&args[2..]),
        Some(MEASURE_ARG) => return measure(&args[2..]),
        _ => {}
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED benches/nft.rs: needs root for network namespaces and nft.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut rows: Vec<Row> = Vec::new();
    full_apply(&rt, &mut rows);
    incremental(&rt, &mut rows);
    conn_rate(&rt, &mut rows);

    println!("\n| measurement | elements | trials | median | max | nft peak RSS |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.what, r.n, r.trials, r.median, r.max, r.rss
        );
    }
}

struct Row {
    what: String,
    n: usize,
    trials: usize,
    median: String,
    max: String,
    rss: String,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

fn nft_cmd(ns: &str) -> Vec<String> {
    ["ip", "netns", "exec", ns, "nft"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Distinct /32 sources × 0.0.0.0/0.
    Sources,
    /// 10.244.0.0/16 × distinct destination /24s.
    Dests,
}

fn element(shape: Shape, i: u32) -> SnatElement<Ipv4Addr> {
    let to = Ipv4Addr::new(192, 0, 2, 1);
    match shape {
        Shape::Sources => {
            let s = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
            SnatElement {
                src: (s, s),
                dst: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
                to,
            }
        }
        Shape::Dests => {
            let d = u32::from(Ipv4Addr::new(100, 0, 0, 0)) + (i << 8);
            SnatElement {
                src: (
                    Ipv4Addr::new(10, 244, 0, 0),
                    Ipv4Addr::new(10, 244, 255, 255),
                ),
                dst: (Ipv4Addr::from(d), Ipv4Addr::from(d | 0xff)),
                to,
            }
        }
    }
}

fn map(shape: Shape, n: usize) -> SnatMap {
    let mut v4: Vec<_> = (0..n as u32).map(|i| element(shape, i)).collect();
    v4.sort();
    SnatMap { v4, v6: vec![] }
}

/// Runs `nft ARGS` in namespace `ns` with `script` on stdin; returns its wall time and its peak
/// RSS (KiB).
///
/// Linux carries a process's RSS high-water mark across fork and exec (the pre-exec mm's
/// high-water mark is folded into `ru_maxrss`), so a child forked straight from this bench,
/// which holds 100 000-element maps, would report the bench's size. A freshly exec'd copy of
/// the bench binary (`--egressd-nft-measure`) is small, and forks nft for the measurement.
fn run_measured(ns: &str, nft_args: &[&str], script: &str) -> (Duration, i64) {
    let mut input = tempfile::NamedTempFile::new().expect("temp file");
    input.write_all(script.as_bytes()).expect("write temp file");
    let me = std::env::current_exe().expect("current exe");
    let out = Command::new(me)
        .arg(MEASURE_ARG)
        .arg(input.path())
        .args(["ip", "netns", "exec", ns, "nft"])
        .args(nft_args)
        .output()
        .expect("run the measuring helper");
    assert!(
        out.status.success(),
        "nft {nft_args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|w| w.parse::<i64>().expect("number"));
    let micros = it.next().expect("micros");
    let rss = it.next().expect("maxrss");
    (Duration::from_micros(micros as u64), rss)
}

/// `--egressd-nft-measure SCRIPT CMD...`: runs CMD with SCRIPT on stdin, prints
/// "microseconds maxrss_kib" of that child (wait4), and fails like it.
fn measure(args: &[String]) {
    let input = File::open(&args[0]).expect("open script");
    let start = Instant::now();
    // Reaped below with wait4, which std's Child does not know about.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&args[1])
        .args(&args[2..])
        .stdin(input)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: a plain syscall on our own child; both out pointers are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let took = start.elapsed();
    assert_eq!(pid, child.id() as i32, "wait4");
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        std::process::exit(1);
    }
    println!("{} {}", took.as_micros(), usage.ru_maxrss);
}

fn json_batch(table: &str, m: &SnatMap) -> String {
    let range = |(a, b): (Ipv4Addr, Ipv4Addr)| -> Value {
        if a == b {
            json!(a.to_string())
        } else {
            json!({"range": [a.to_string(), b.to_string()]})
        }
    };
    let elems: Vec<Value> =
        m.v4.iter()
            .map(|e| json!([{"concat": [range(e.src), range(e.dst)]}, e.to.to_string()]))
            .collect();
    let snat = |fam: &str, map: &str| {
        json!({"add": {"rule": {"family": "inet", "table": table, "chain": "postrouting",
            "expr": [{"snat": {"family": fam, "addr": {"map": {
                "key": {"concat": [{"payload": {"protocol": fam, "field": "saddr"}},
                                   {"payload": {"protocol": fam, "field": "daddr"}}]},
                "data": format!("@{map}")}}}}]}}})
    };
    let doc = json!({"nftables": [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},
        {"add": {"table": {"family": "inet", "name": table}}},
        {"add": {"map": {"family": "inet", "table": table, "name": "snat4",
            "type": ["ipv4_addr", "ipv4_addr"], "map": "ipv4_addr", "flags": ["interval"]}}},
        {"add": {"map": {"family": "inet", "table": table, "name": "snat6",
            "type": ["ipv6_addr", "ipv6_addr"], "map": "ipv6_addr", "flags": ["interval"]}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        snat("ip", "snat4"),
        snat("ip6", "snat6"),
        {"add": {"element": {"family": "inet", "table": table, "name": "snat4", "elem": elems}}},
    ]});
    doc.to_string()
}

fn full_apply(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    for shape in [Shape::Sources, Shape::Dests] {
        for (n, trials) in [(1, 5), (1_000, 5), (10_000, 5), (100_000, 3)] {
            let m = map(shape, n);
            let mut times = Vec::new();
            for _ in 0..trials {
                let mut lab = Lab::new("bfull");
                let ns = lab.ns("a");
                let mut fw = NftFirewall::with_command("egressd", nft_cmd(&ns));
                let start = Instant::now();
                rt.block_on(fw.apply(&m)).expect("apply");
                times.push(start.elapsed());
            }
            // Peak RSS of nft for the same script, in one more fresh namespace.
            let mut lab = Lab::new("bfrss");
            let ns = lab.ns("a");
            let fw = NftFirewall::with_command("egressd", nft_cmd(&ns));
            let script = fw.replace_script(&m);
            let (_, rss) = run_measured(&ns, &["-f", "-"], &script);
            let (median, max) = median_max(times);
            eprintln!("full apply native {shape:?} {n}: {median:?} {max:?} {rss} KiB");
            rows.push(Row {
                what: format!("full apply, native `nft -f -`, {shape:?}"),
                n,
                trials,
                median: ms(median),
                max: ms(max),
                rss: format!("{} MiB", rss / 1024),
            });
        }
    }
    for shape in [Shape::Sources, Shape::Dests] {
        for (n, trials) in [(1_000, 5), (10_000, 5), (50_000, 3), (100_000, 2)] {
            let m = map(shape, n);
            let batch = json_batch("egressd", &m);
            let mut times = Vec::new();
            let mut peak = 0;
            for _ in 0..trials {
                let mut lab = Lab::new("bjson");
                let ns = lab.ns("a");
                let (t, rss) = run_measured(&ns, &["-j", "-f", "-"], &batch);
                times.push(t);
                peak = peak.max(rss);
            }
            let (median, max) = median_max(times);
            eprintln!("full apply json {shape:?} {n}: {median:?} {max:?} {peak} KiB");
            rows.push(Row {
                what: format!("full apply, JSON `nft -j -f -`, {shape:?}"),
                n,
                trials,
                median: ms(median),
                max: ms(max),
                rss: format!("{} MiB", peak / 1024),
            });
        }
    }
}

fn incremental(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    const TRIALS: usize = 20;
    let cases = [
        (Shape::Sources, 1),
        (Shape::Sources, 1_000),
        (Shape::Sources, 10_000),
        (Shape::Sources, 100_000),
        (Shape::Dests, 10_000),
    ];
    for (shape, n) in cases {
        let a = map(shape, n);
        // `b`: the middle element replaced by one with a source outside the others.
        let mut b = a.clone();
        let mid = n / 2;
        let s = Ipv4Addr::new(10, 200, 0, 1);
        b.v4[mid].src = (s, s);
        b.v4[mid].dst = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
        b.v4.sort();
        let mut lab = Lab::new("binc");
        let ns = lab.ns("a");
        let mut fw = NftFirewall::with_command("egressd", nft_cmd(&ns));
        rt.block_on(fw.apply(&a)).expect("apply");
        let mut times = Vec::new();
        for t in 0..TRIALS {
            let m = if t % 2 == 0 { &b } else { &a };
            let before = fw.transactions();
            let start = Instant::now();
            rt.block_on(fw.apply(m)).expect("incremental apply");
            times.push(start.elapsed());
            assert_eq!(fw.transactions(), before + 1);
        }
        let listed = rt.block_on(fw.list_elements()).expect("list");
        assert_eq!(listed.v4.len(), n);
        let (median, max) = median_max(times);
        eprintln!("incremental {shape:?} {n}: {median:?} {max:?}");
        rows.push(Row {
            what: format!("change one element (delete 1 + add 1), {shape:?}"),
            n,
            trials: TRIALS,
            median: ms(median),
            max: ms(max),
            rss: "".into(),
        });
    }
}

const CLIENT_SRC: &str = "10.201.0.2";
const SERVER: &str = "10.202.0.2:7000";
const SNAT_TO: &str = "10.202.0.1";

fn conn_rate(rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    const ROUNDS: usize = 5;
    const SECS: &str = "3";
    let mut lab = Lab::new("bconn");
    let (cli, gw, srv) = lab.three_hop();

    let me = std::env::current_exe().expect("current exe");
    let mut server = Command::new(&me);
    server.args([SERVER_ARG, SERVER, SNAT_TO]);
    lab.spawn(&srv, server);

    let client_el = |to: &str| SnatElement {
        src: (CLIENT_SRC.parse().unwrap(), CLIENT_SRC.parse().unwrap()),
        dst: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
        to: to.parse().unwrap(),
    };
    let one = SnatMap {
        v4: vec![client_el(SNAT_TO)],
        v6: vec![],
    };
    let mut many = map(Shape::Sources, 9_999);
    many.v4.push(client_el(SNAT_TO));
    many.v4.sort();

    let mut fw = NftFirewall::with_command("egressd", nft_cmd(&gw));
    let run_client = |lab: &Lab, secs: &str| -> (u64, u64) {
        let out = lab.exec(
            &cli,
            [
                me.to_str().expect("utf-8 path"),
                CLIENT_ARG,
                SERVER,
                CLIENT_SRC,
                secs,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text
            .split_whitespace()
            .map(|w| w.parse::<u64>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    // Wait for the server, and warm up.
    rt.block_on(fw.apply(&one)).expect("apply");
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_client(&lab, "0.3").0 == 0 {
        assert!(Instant::now() < deadline, "the bench server never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (k, m) in [&one, &many].into_iter().enumerate() {
            rt.block_on(fw.apply(m)).expect("apply");
            let c0 = rt.block_on(fw.counters()).expect("counters");
            let (total, snated) = run_client(&lab, SECS);
            let c1 = rt.block_on(fw.counters()).expect("counters");
            assert!(total > 0, "no connection went through");
            assert_eq!(snated, total, "every connection must be SNATed");
            // The chain counter misses the few connections whose 4-tuple reuses a conntrack
            // entry still in CLOSE state (ports wrap during a run): conntrack keeps that
            // entry's NAT binding without a new pass through the nat chain. The server's
            // per-connection answer above is the real check.
            let by_rule = c1.snated() - c0.snated();
            assert!(
                by_rule * 100 >= total * 99,
                "rule counter {by_rule} vs {total}"
            );
            let rate = total as f64 / SECS.parse::<f64>().unwrap_or(3.0);
            eprintln!(
                "conn/s with {} elements: {rate:.0} ({snated}/{total} SNATed)",
                m.v4.len()
            );
            rates[k].push(rate);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (m1, lo1, hi1) = med(&mut rates[0]);
    let (m2, lo2, hi2) = med(&mut rates[1]);
    for (n, m, lo, hi) in [(1, m1, lo1, hi1), (10_000, m2, lo2, hi2)] {
        rows.push(Row {
            what: format!(
                "new TCP conn/s through gw, {SECS} s runs, all SNATed (min–max {lo:.0}–{hi:.0})"
            ),
            n,
            trials: ROUNDS,
            median: format!("{m:.0} conn/s"),
            max: format!("{hi:.0} conn/s"),
            rss: "".into(),
        });
    }
    rows.push(Row {
        what: "conn/s ratio 10 000 / 1 element (medians)".into(),
        n: 10_000,
        trials: ROUNDS,
        median: format!("{:.3}", m2 / m1),
        max: "".into(),
        rss: "".into(),
    });
}

/// `--egressd-nft-server ADDR SNAT_IP`: accepts forever; answers each connection with one byte,
/// 1 when the peer address is SNAT_IP (the connection was SNATed), else 0, then closes.
fn server(args: &[String]) {
    let addr: SocketAddr = args[0].parse().expect("server address");
    let snat: std::net::IpAddr = args[1].parse().expect("snat address");
    let listener = TcpListener::bind(addr).expect("bind");
    loop {
        let Ok((mut s, peer)) = listener.accept() else {
            continue;
        };
        let _ = s.write_all(&[u8::from(peer.ip() == snat)]);
    }
}

/// `--egressd-nft-client SERVER SRC SECS`: connects from SRC sequentially for SECS seconds;
/// prints "connections snated".
fn client(args: &[String]) {
    use socket2::{Domain, Socket, Type};
    let server: SocketAddr = args[0].parse().expect("server address");
    let src: Ipv4Addr = args[1].parse().expect("source address");
    let secs: f64 = args[2].parse().expect("seconds");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let bind = SocketAddr::from((src, 0));
    let (mut total, mut snated) = (0u64, 0u64);
    while Instant::now() < deadline {
        let Ok(sock) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
            continue;
        };
        if sock.bind(&bind.into()).is_err()
            || sock
                .connect_timeout(&server.into(), Duration::from_secs(1))
                .is_err()
        {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut s: std::net::TcpStream = sock.into();
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            total += 1;
            snated += u64::from(b[0] == 1);
        }
        // Abort with RST: no TIME_WAIT on either side, and conntrack forgets the entry in
        // seconds, so long runs do not fill the port range or the conntrack table.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
    println!("{total} {snated}");
}
