//! egressd's nftables table, driven through the `nft` command in its native syntax.
//!
//! Why `nft -f -` with native syntax rather than the JSON API or netlink crates: the netlink
//! crates cannot express concatenated interval maps, the `nftables` crate hides nft's stderr
//! (the only place that says *which* element was rejected and why), and the native parser is
//! faster and leaner than the JSON one for large element lists (see `benches/nft.rs`).
//!
//! The table (family `inet`, name from the config, default `egressd`):
//!
//! ```text
//! table inet egressd {
//!   map snat4 { type ipv4_addr . ipv4_addr : ipv4_addr; flags interval; }
//!   map snat6 { type ipv6_addr . ipv6_addr : ipv6_addr; flags interval; }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     counter comment "seen"
//!     snat ip to ip saddr . ip daddr map @snat4
//!     snat ip6 to ip6 saddr . ip6 daddr map @snat6
//!     counter comment "not-snated"
//!   }
//! }
//! ```
//!
//! A nat chain sees only the first packet of each connection, so the counters count new
//! connections. A `snat` whose map lookup succeeds ends the chain, and one whose lookup fails
//! falls through; so "seen" minus "not-snated" is the number of connections egressd SNATed. (A
//! counter on the snat rule itself would run before the lookup and count everything.)
//!
//! Measured costs (kernel 6.18, nft 1.0.6, `benches/nft.rs`): the kernel's pipapo set backend
//! copies the whole map on every transaction, so even a one-element change costs time growing
//! with the map (about 20 ms at 1 000 elements, 70 ms at 10 000, 90 ms at 100 000). Inserting
//! many elements that share the same *first* key field (one source range × many destinations)
//! is quadratic in the kernel (10 000: 0.45 s, 100 000: 31 s), while distinct first fields are
//! linear (100 000: 1.4 s); the key order `saddr . daddr` therefore favours many sources.
//!
//! Every change is one `nft -f -` script, and nft applies a script as one kernel transaction:
//! a rejected element leaves the previous ruleset untouched.

use std::collections::BTreeSet;
use std::fmt::{self, Display, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Instant;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::{Error, Firewall, Result};
use crate::policy::{SnatElement, SnatMap};

/// Name of the IPv4 map inside egressd's table.
pub const MAP4: &str = "snat4";
/// Name of the IPv6 map inside egressd's table.
pub const MAP6: &str = "snat6";
/// Name of the nat chain inside egressd's table.
pub const CHAIN: &str = "postrouting";
/// A script for nft's stdin: ready, or made at the moment it is written.
enum Script<'a> {
    Text(&'a str),
    Late(Box<dyn FnOnce() -> String + Send + 'a>),
}

/// Sets of the ARP fence table (`arp <table>`).
pub const MANAGED: &str = "managed";
pub const LEASE: &str = "lease";

/// Elements per `add element`/`delete element` statement. nft accepts much longer statements
/// (100 000 elements in one statement loaded fine here), but bounded statements keep nft's
/// memory per statement bounded. Elements are written one per line so that nft's error message,
/// which echoes the offending line, names one element instead of a megabyte of them.
const CHUNK: usize = 1024;

/// Longest nft stderr kept in an error: enough for a few error messages, not for a flood.
const MAX_DETAIL: usize = 4000;

/// An address family's address type as nft writes it.
trait NftAddr: Copy + Ord + Display + FromStr {
    /// The last address of `self/len`.
    fn prefix_last(self, len: u32) -> Option<Self>;
}

impl NftAddr for Ipv4Addr {
    fn prefix_last(self, len: u32) -> Option<Self> {
        if len > 32 {
            return None;
        }
        let host = u32::MAX.checked_shr(len).unwrap_or(0);
        Some(Ipv4Addr::from(u32::from(self) | host))
    }
}

impl NftAddr for Ipv6Addr {
    fn prefix_last(self, len: u32) -> Option<Self> {
        if len > 128 {
            return None;
        }
        let host = u128::MAX.checked_shr(len).unwrap_or(0);
        Some(Ipv6Addr::from(u128::from(self) | host))
    }
}

/// What this struct last installed successfully; `None` in `NftFirewall` means "unknown", so the
/// next apply replaces the whole table.
#[derive(Debug, Clone, Default)]
struct Installed {
    v4: BTreeSet<SnatElement<Ipv4Addr>>,
    v6: BTreeSet<SnatElement<Ipv6Addr>>,
}

/// The two chain counters (new connections, i.e. packets through the nat chain).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NftCounters {
    /// New connections (IPv4 and IPv6) that went through egressd's postrouting chain.
    pub seen: u64,
    /// Of those, the ones no map element matched.
    pub not_snated: u64,
}

impl NftCounters {
    /// New connections SNATed by egressd.
    pub fn snated(&self) -> u64 {
        self.seen.saturating_sub(self.not_snated)
    }
}

/// The nftables [`Firewall`]: owns one `inet` table and nothing else.
#[derive(Debug)]
pub struct NftFirewall {
    table: String,
    /// Program and leading arguments; `["nft"]` for the daemon, e.g.
    /// `["ip", "netns", "exec", NS, "nft"]` for tests and benchmarks.
    command: Vec<String>,
    installed: Option<Installed>,
    /// The managed set of the installed ARP fence table, `None` when not installed.
    fence: Option<BTreeSet<IpAddr>>,
    leased: BTreeSet<IpAddr>,
    transactions: u64,
}

/// Checks that `name` can be written into an nft script as a table name as is: a letter, then
/// letters, digits or underscores, at most 64 characters. Config validation can call this so
/// that a bad name is refused at startup rather than at the first apply.
pub fn validate_table_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Nft {
            op: "validate table name",
            detail: format!(
                "{name:?} is not a valid table name: expected a letter followed by up to 63 \
                 letters, digits or underscores"
            ),
        })
    }
}

impl NftFirewall {
    /// The daemon's firewall: runs `nft` from `PATH` on table `inet <table>`.
    pub fn new(table: &str) -> NftFirewall {
        NftFirewall::with_command(table, vec!["nft".to_owned()])
    }

    /// Runs `command[0] command[1..] -f -` instead of `nft -f -`, e.g.
    /// `["ip", "netns", "exec", "lab", "nft"]` so tests and benchmarks act in a namespace.
    pub fn with_command(table: &str, command: Vec<String>) -> NftFirewall {
        NftFirewall {
            table: table.to_owned(),
            command,
            installed: None,
            fence: None,
            leased: BTreeSet::new(),
            transactions: 0,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// How many nft transactions (scripts) this struct has sent, successful or not. Tests use it
    /// to check that an unchanged map costs no nft call.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// The script that replaces the whole table with one holding exactly `map`. `add table`
    /// before `delete table` makes the delete succeed whether or not a (stale) table exists, and
    /// since the script is one transaction a failure leaves the old table in place.
    pub fn replace_script(&self, map: &SnatMap) -> String {
        let t = &self.table;
        let mut s = String::with_capacity(256 + 60 * map.len());
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "add table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tmap {MAP4} {{ type ipv4_addr . ipv4_addr : ipv4_addr; flags interval; }}\n\
             \tmap {MAP6} {{ type ipv6_addr . ipv6_addr : ipv6_addr; flags interval; }}\n\
             \tchain {CHAIN} {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tcounter comment \"seen\"\n\
             \t\tsnat ip to ip saddr . ip daddr map @{MAP4}\n\
             \t\tsnat ip6 to ip6 saddr . ip6 daddr map @{MAP6}\n\
             \t\tcounter comment \"not-snated\"\n\
             \t}}\n\
             }}\n"
        );
        push_elements(&mut s, "add", t, MAP4, map.v4.iter(), true);
        push_elements(&mut s, "add", t, MAP6, map.v6.iter(), true);
        s
    }

    /// Runs the nft command with `args`, feeding `stdin` when given; returns stdout.
    async fn run(&self, op: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        self.run_script(op, args, stdin.map(Script::Text)).await
    }

    /// Like `run`, with a script that may be written only once nft has started (see `Script`).
    async fn run_script(
        &self,
        op: &'static str,
        args: &[&str],
        stdin: Option<Script<'_>>,
    ) -> Result<String> {
        let Some((program, prefix)) = self.command.split_first() else {
            return Err(Error::Nft {
                op,
                detail: "the nft command is empty".to_owned(),
            });
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(prefix)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| Error::Nft {
            op,
            detail: format!("cannot start {}: {e}", self.command.join(" ")),
        })?;
        let input = child.stdin.take();
        // Feed stdin while collecting output: nft may report an error (and fill the stderr
        // pipe) before it has read the whole script.
        let write = async {
            if let (Some(mut pipe), Some(script)) = (input, stdin) {
                let text = match script {
                    Script::Text(t) => std::borrow::Cow::Borrowed(t),
                    Script::Late(f) => std::borrow::Cow::Owned(f()),
                };
                // A write error (broken pipe) means nft exited early; its exit status and
                // stderr below say why, so this error is only kept when nft "succeeded".
                let r = pipe.write_all(text.as_bytes()).await;
                drop(pipe);
                r
            } else {
                Ok(())
            }
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        let output = output.map_err(|e| Error::Nft {
            op,
            detail: format!("waiting for {}: {e}", self.command.join(" ")),
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Error::Nft {
                op,
                detail: format!(
                    "{} ({}): {}",
                    self.command.join(" "),
                    output.status,
                    clip(stderr.trim())
                ),
            });
        }
        if let Err(e) = written {
            return Err(Error::Nft {
                op,
                detail: format!("writing the script to {}: {e}", self.command.join(" ")),
            });
        }
        String::from_utf8(output.stdout).map_err(|e| Error::Nft {
            op,
            detail: format!("nft printed non-UTF-8 output: {e}"),
        })
    }

    /// Sends one script (one transaction) and counts it.
    async fn transaction(&mut self, op: &'static str, script: &str) -> Result<()> {
        self.transactions += 1;
        self.run(op, &["-f", "-"], Some(script)).await.map(|_| ())
    }

    /// The elements now in the kernel's maps, read back with `nft -j list map`. Ranges that nft
    /// prints as prefixes are turned back into first/last addresses, so the result compares
    /// equal to the map that was applied (sorted).
    pub async fn list_elements(&self) -> Result<SnatMap> {
        let v4 = self.list_map::<Ipv4Addr>(MAP4).await?;
        let v6 = self.list_map::<Ipv6Addr>(MAP6).await?;
        Ok(SnatMap { v4, v6 })
    }

    async fn list_map<A: NftAddr>(&self, map: &str) -> Result<Vec<SnatElement<A>>> {
        let out = self
            .run(
                "list map",
                &["-j", "list", "map", "inet", &self.table, map],
                None,
            )
            .await?;
        parse_map_json(&out).map_err(|detail| Error::Nft {
            op: "list map",
            detail: format!("map {map}: {detail}"),
        })
    }

    /// Reads the chain's two counters.
    pub async fn counters(&self) -> Result<NftCounters> {
        let out = self
            .run(
                "list chain",
                &["-j", "list", "chain", "inet", &self.table, CHAIN],
                None,
            )
            .await?;
        parse_counters_json(&out).map_err(|detail| Error::Nft {
            op: "list chain",
            detail,
        })
    }
}

impl Firewall for NftFirewall {
    async fn apply(&mut self, map: &SnatMap) -> Result<()> {
        validate_table_name(&self.table)?;
        let wanted = Installed {
            v4: map.v4.iter().copied().collect(),
            v6: map.v6.iter().copied().collect(),
        };
        let (op, script) = match &self.installed {
            None => ("replace table", self.replace_script(map)),
            Some(old) => {
                let mut s = String::new();
                let t = &self.table;
                // Deletes first: an element whose target changed is deleted and re-added with
                // the same key, which must not collide with the old one.
                push_elements(
                    &mut s,
                    "delete",
                    t,
                    MAP4,
                    old.v4.difference(&wanted.v4),
                    false,
                );
                push_elements(
                    &mut s,
                    "delete",
                    t,
                    MAP6,
                    old.v6.difference(&wanted.v6),
                    false,
                );
                push_elements(&mut s, "add", t, MAP4, wanted.v4.difference(&old.v4), true);
                push_elements(&mut s, "add", t, MAP6, wanted.v6.difference(&old.v6), true);
                if s.is_empty() {
                    return Ok(());
                }
                ("update elements", s)
            }
        };
        // Until the script succeeds the kernel's state is not known to be `old` (e.g. a timeout
        // could kill nft after the commit): forget it, so that the next apply replaces all.
        self.installed = None;
        self.transaction(op, &script).await?;
        self.installed = Some(wanted);
        Ok(())
    }

    async fn lease(
        &mut self,
        managed: &BTreeSet<IpAddr>,
        leased: &BTreeSet<IpAddr>,
        until: Instant,
    ) -> Result<()> {
        validate_table_name(&self.table)?;
        let wanted: BTreeSet<IpAddr> = leased.intersection(managed).copied().collect();
        let replace = self.fence.as_ref() != Some(managed);
        if !replace && wanted.is_empty() && self.leased.is_empty() {
            return Ok(());
        }
        let t = self.table.clone();
        let previous = self.leased.clone();
        let written: std::sync::Mutex<BTreeSet<IpAddr>> = std::sync::Mutex::new(BTreeSet::new());
        // The timeout is computed when the script is written to nft, not before nft starts: a
        // daemon paused in between (SIGSTOP, an overloaded host) must not wake up and hand its
        // kernel a lease that was computed before the pause.
        let script = || {
            let ttl_ms = until
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(u128::from(u32::MAX)) as u64;
            let leased = if ttl_ms == 0 {
                BTreeSet::new()
            } else {
                wanted.clone()
            };
            let mut s = String::new();
            if replace {
                s.push_str(&fence_script(&t, managed));
            } else {
                // `add` first so that `delete` cannot fail on an element that already expired.
                for ip in previous.difference(&leased) {
                    let (family, key) = fence_key(ip);
                    let _ = writeln!(
                        s,
                        "add element {family} {t} {LEASE} {{ {key} timeout 1ms }}\n\
                         delete element {family} {t} {LEASE} {{ {key} }}"
                    );
                }
            }
            // Re-adding an element does not restart its timeout; delete and add again does.
            for ip in &leased {
                let (family, key) = fence_key(ip);
                let _ = writeln!(
                    s,
                    "add element {family} {t} {LEASE} {{ {key} timeout {ttl_ms}ms }}\n\
                     delete element {family} {t} {LEASE} {{ {key} }}\n\
                     add element {family} {t} {LEASE} {{ {key} timeout {ttl_ms}ms }}"
                );
            }
            if s.is_empty() {
                // Nothing to change after all; an empty script is a valid no-op for nft.
                s.push('\n');
            }
            if let Ok(mut w) = written.lock() {
                *w = leased;
            }
            s
        };
        self.fence = None;
        self.transactions += 1;
        self.run_script("lease", &["-f", "-"], Some(Script::Late(Box::new(script))))
            .await?;
        self.fence = Some(managed.clone());
        self.leased = written.into_inner().unwrap_or_default();
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        validate_table_name(&self.table)?;
        self.installed = None;
        self.fence = None;
        self.leased.clear();
        // `add` then `delete` in one transaction: succeeds whether or not the table exists,
        // without parsing nft's "No such file or directory" message.
        let t = &self.table;
        let script = format!(
            "add table inet {t}\ndelete table inet {t}\nadd table arp {t}\ndelete table arp {t}\n\
             add table ip6 {t}\ndelete table ip6 {t}\n"
        );
        self.transaction("delete table", &script).await
    }
}

/// The fence tables, replacing any earlier ones. `arp <t>`: ARP requests for a managed IPv4
/// address are dropped unless the address is in the lease set, whose elements time out by
/// themselves; and this host never sends ARP with a managed sender address it has no lease for,
/// so a fenced node cannot poison its neighbours' caches either. `ip6 <t>`: the same for
/// neighbour solicitations and advertisements, keyed by their target address (nft 1.0.6 has no
/// named field for it, hence the raw payload: bytes 8 to 23 of the ICMPv6 message).
fn fence_script(t: &str, managed: &BTreeSet<IpAddr>) -> String {
    let mut s = format!(
        "add table arp {t}\n\
         delete table arp {t}\n\
         table arp {t} {{\n\
         \tset {MANAGED} {{ type ipv4_addr; }}\n\
         \tset {LEASE} {{ type ipv4_addr; flags timeout; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tarp operation request arp daddr ip @{MANAGED} arp daddr ip != @{LEASE} drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\tarp saddr ip @{MANAGED} arp saddr ip != @{LEASE} drop\n\
         \t}}\n\
         }}\n\
         add table ip6 {t}\n\
         delete table ip6 {t}\n\
         table ip6 {t} {{\n\
         \tset {MANAGED} {{ typeof @th,64,128; }}\n\
         \tset {LEASE} {{ typeof @th,64,128; flags timeout; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\ticmpv6 type nd-neighbor-solicit @th,64,128 @{MANAGED} @th,64,128 != @{LEASE} drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\ticmpv6 type nd-neighbor-advert @th,64,128 @{MANAGED} @th,64,128 != @{LEASE} drop\n\
         \t}}\n\
         }}\n"
    );
    for ip in managed {
        let (family, key) = fence_key(ip);
        let _ = writeln!(s, "add element {family} {t} {MANAGED} {{ {key} }}");
    }
    s
}

/// The fence table family and set key of an address: IPv4 as is, IPv6 as the 128-bit integer the
/// raw-payload sets hold.
fn fence_key(ip: &IpAddr) -> (&'static str, String) {
    match ip {
        IpAddr::V4(v4) => ("arp", v4.to_string()),
        IpAddr::V6(v6) => ("ip6", format!("0x{:032x}", u128::from(*v6))),
    }
}

/// Appends `verb element inet T M { e1,\n e2,\n ... }` statements, [`CHUNK`] elements each.
/// With `with_value` false only the keys are written (what `delete element` takes).
fn push_elements<'a, A: NftAddr + 'a>(
    s: &mut String,
    verb: &str,
    table: &str,
    map: &str,
    elements: impl Iterator<Item = &'a SnatElement<A>>,
    with_value: bool,
) {
    let mut in_chunk = 0;
    for e in elements {
        if in_chunk == 0 {
            let _ = writeln!(s, "{verb} element inet {table} {map} {{");
        } else {
            s.push_str(",\n");
        }
        let _ = write!(s, "{} . {}", Range(e.src), Range(e.dst));
        if with_value {
            let _ = write!(s, " : {}", e.to);
        }
        in_chunk += 1;
        if in_chunk == CHUNK {
            s.push_str("\n}\n");
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        s.push_str("\n}\n");
    }
}

/// An inclusive range written as nft wants it: `a` when it is one address, else `a-b`.
struct Range<A>((A, A));

impl<A: NftAddr> Display for Range<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.0;
        if a == b {
            write!(f, "{a}")
        } else {
            write!(f, "{a}-{b}")
        }
    }
}

/// Keeps the start of a long stderr (the first errors are the useful ones).
fn clip(s: &str) -> String {
    if s.len() <= MAX_DETAIL {
        return s.to_owned();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} […{} more bytes]", &s[..end], s.len() - end)
}

/// Parses `nft -j list map` output into sorted elements.
fn parse_map_json<A: NftAddr>(text: &str) -> std::result::Result<Vec<SnatElement<A>>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("bad JSON from nft: {e}"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array in nft's output")?;
    let mut out = Vec::new();
    for item in items {
        let Some(map) = item.get("map") else { continue };
        let Some(elems) = map.get("elem") else {
            continue;
        };
        let elems = elems.as_array().ok_or("\"elem\" is not an array")?;
        for elem in elems {
            out.push(parse_elem(elem).map_err(|e| format!("element {elem}: {e}"))?);
        }
    }
    out.sort();
    Ok(out)
}

fn parse_elem<A: NftAddr>(elem: &Value) -> std::result::Result<SnatElement<A>, String> {
    let pair = elem.as_array().ok_or("not a [key, value] pair")?;
    let [key, value] = pair.as_slice() else {
        return Err("not a [key, value] pair".to_owned());
    };
    let parts = key
        .get("concat")
        .and_then(Value::as_array)
        .ok_or("key is not a concatenation")?;
    let [src, dst] = parts.as_slice() else {
        return Err("key does not have two parts".to_owned());
    };
    let to = value.as_str().ok_or("value is not an address")?;
    Ok(SnatElement {
        src: parse_range(src)?,
        dst: parse_range(dst)?,
        to: parse_addr(to)?,
    })
}

/// One part of a key: `"a"`, `{"prefix": {"addr": "a", "len": n}}` or `{"range": ["a", "b"]}`.
fn parse_range<A: NftAddr>(v: &Value) -> std::result::Result<(A, A), String> {
    if let Some(s) = v.as_str() {
        let a = parse_addr(s)?;
        return Ok((a, a));
    }
    if let Some(p) = v.get("prefix") {
        let addr = p
            .get("addr")
            .and_then(Value::as_str)
            .ok_or("prefix without addr")?;
        let len = p
            .get("len")
            .and_then(Value::as_u64)
            .ok_or("prefix without len")?;
        let a: A = parse_addr(addr)?;
        let len = u32::try_from(len).map_err(|_| format!("bad prefix length {len}"))?;
        let b = a
            .prefix_last(len)
            .ok_or_else(|| format!("bad prefix length {len}"))?;
        return Ok((a, b));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array)
        && let [a, b] = r.as_slice()
    {
        let a = parse_addr(a.as_str().ok_or("range bound is not a string")?)?;
        let b = parse_addr(b.as_str().ok_or("range bound is not a string")?)?;
        return Ok((a, b));
    }
    Err(format!("unexpected key part {v}"))
}

fn parse_addr<A: NftAddr>(s: &str) -> std::result::Result<A, String> {
    s.parse().map_err(|_| format!("bad address {s:?}"))
}

/// Finds the chain's two counters by their comments in `nft -j list chain` output.
fn parse_counters_json(text: &str) -> std::result::Result<NftCounters, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("bad JSON from nft: {e}"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array in nft's output")?;
    let mut seen = None;
    let mut not_snated = None;
    for item in items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let packets = rule
            .get("expr")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter")?.get("packets")?.as_u64());
        match (rule.get("comment").and_then(Value::as_str), packets) {
            (Some("seen"), Some(p)) => seen = Some(p),
            (Some("not-snated"), Some(p)) => not_snated = Some(p),
            _ => {}
        }
    }
    match (seen, not_snated) {
        (Some(seen), Some(not_snated)) => Ok(NftCounters { seen, not_snated }),
        _ => Err("the chain lacks egressd's counters".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str, d: (&str, &str), to: &str) -> SnatElement<Ipv4Addr> {
        let p = |x: &str| -> Ipv4Addr { x.parse().unwrap() };
        SnatElement {
            src: (p(s), p(s)),
            dst: (p(d.0), p(d.1)),
            to: p(to),
        }
    }

    #[test]
    fn replace_script_shape() {
        let fw = NftFirewall::new("egressd");
        let map = SnatMap {
            v4: vec![
                v4("10.0.0.1", ("0.0.0.0", "255.255.255.255"), "192.0.2.1"),
                v4("10.0.0.2", ("8.8.8.8", "8.8.8.8"), "192.0.2.1"),
            ],
            v6: vec![],
        };
        let s = fw.replace_script(&map);
        assert!(s.starts_with("add table inet egressd\ndelete table inet egressd\n"));
        assert!(s.contains(
            "add element inet egressd snat4 {\n\
             10.0.0.1 . 0.0.0.0-255.255.255.255 : 192.0.2.1,\n\
             10.0.0.2 . 8.8.8.8 : 192.0.2.1\n}\n"
        ));
        assert!(!s.contains("snat6 {\n"));
    }

    #[test]
    fn chunks() {
        let els: Vec<_> = (0..(CHUNK as u32 * 2 + 1))
            .map(|i| SnatElement {
                src: (Ipv4Addr::from(i), Ipv4Addr::from(i)),
                dst: (Ipv4Addr::from(0), Ipv4Addr::from(u32::MAX)),
                to: Ipv4Addr::from(1),
            })
            .collect();
        let mut s = String::new();
        push_elements(&mut s, "delete", "t", MAP4, els.iter(), false);
        assert_eq!(s.matches("delete element").count(), 3);
        assert!(!s.contains(" : "));
    }

    #[test]
    fn table_names() {
        assert!(validate_table_name("egressd").is_ok());
        assert!(validate_table_name("egress_d2").is_ok());
        for bad in ["", "1x", "a b", "a;b", "a}", "a\nb"] {
            assert!(validate_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_listing() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"map": {"family": "inet", "name": "snat4",
          "elem": [[{"concat": ["10.0.0.1", {"prefix": {"addr": "0.0.0.0", "len": 0}}]}, "1.2.3.4"],
                   [{"concat": [{"prefix": {"addr": "10.0.1.0", "len": 24}}, {"range": ["1.0.0.0", "1.0.0.5"]}]}, "1.2.3.5"]]}}]}"#;
        let got: Vec<SnatElement<Ipv4Addr>> = parse_map_json(json).unwrap();
        assert_eq!(
            got,
            vec![
                v4("10.0.0.1", ("0.0.0.0", "255.255.255.255"), "1.2.3.4"),
                SnatElement {
                    src: ("10.0.1.0".parse().unwrap(), "10.0.1.255".parse().unwrap()),
                    dst: ("1.0.0.0".parse().unwrap(), "1.0.0.5".parse().unwrap()),
                    to: "1.2.3.5".parse().unwrap(),
                }
            ]
        );
        let empty: Vec<SnatElement<Ipv6Addr>> =
            parse_map_json(r#"{"nftables": [{"map": {"name": "snat6"}}]}"#).unwrap();
        assert!(empty.is_empty());
        assert_eq!(
            Ipv6Addr::UNSPECIFIED.prefix_last(0),
            Some(Ipv6Addr::from(u128::MAX))
        );
        assert_eq!(
            "10.1.2.3".parse::<Ipv4Addr>().unwrap().prefix_last(32),
            Some("10.1.2.3".parse().unwrap())
        );
    }
}
