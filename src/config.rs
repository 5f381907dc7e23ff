//! Loading and validating `egressd.toml`.
//!
//! `check-config` has to print *every* mistake at once, each naming the file (or environment
//! variable), the key and what is expected. serde stops at the first error and
//! `deny_unknown_fields` reports only one unknown key, so the file and the environment are merged
//! by figment into an untyped value tree (which keeps, for every value, the provider it came
//! from) and that tree is walked by hand here, collecting every problem before giving up.
//!
//! The checks that concern gateways and policies as model objects (name rules, CIDR families,
//! shared VIPs, missing gateways) live in [`check_objects`] too, so that objects arriving through
//! the admin API or the Kubernetes adapter are held to the same rules as the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Provider, Source};
use ipnet::IpNet;
use serde::{Serialize, Serializer};

use crate::model::{Gateway, Labels, NextHop, Policy, Selection, SourceIp};

/// Where `egressd` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/egressd/egressd.toml";

/// Environment variables `EGRESSD_<SECTION>__<KEY>` override single keys of the file.
pub const ENV_PREFIX: &str = "EGRESSD_";

const ENV_METADATA_NAME: &str = "environment variable";
const CLUSTER_KEYS: &[&str] = &[
    "listen",
    "peers",
    "data_dir",
    "secret_file",
    "profile",
    "heartbeat_ms",
    "election_timeout_min_ms",
    "election_timeout_max_ms",
    "report_interval_ms",
    "lease_ms",
    "failover_timeout_ms",
];
const VIP_MODE: &str = "VirtualIPAddress";
const PRIMARY_MODE: &str = "PrimaryIPFromEgressGatewayNodeInterface";
const VIP_TABLE: &str = "virtual_ip_address";
const PRIMARY_TABLE: &str = "primary_ip_from_egress_gateway_node_interface";

// ---------------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------------

/// The effective configuration of one node. Serializes back to the shape of the TOML file, so
/// that `egressd` can show what it is actually running with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    pub dataplane: DataplaneConfig,
    pub log: LogConfig,
    #[serde(rename = "gateway", serialize_with = "serialize_gateways")]
    pub gateways: Vec<Gateway>,
    #[serde(rename = "policy")]
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// As written: empty means a single-node cluster (see [`Config::voters`]).
    pub peers: Vec<Peer>,
    pub data_dir: PathBuf,
    /// File holding the cluster's shared secret (every peer request is signed with it).
    /// Required when there is more than one peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    pub profile: Profile,
    /// Overrides of the profile's timing, milliseconds.
    #[serde(skip_serializing_if = "TimingOverrides::is_empty")]
    pub timing: TimingOverrides,
}

/// A set of timing defaults: `default` targets a failover of about a quarter second on ordinary
/// hosts; `fast` halves everything, for quiet, well-connected machines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Default,
    Fast,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TimingOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_min_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_timeout_ms: Option<u64>,
}

impl TimingOverrides {
    pub fn is_empty(&self) -> bool {
        *self == TimingOverrides::default()
    }
}

/// The resolved timing of the cluster (profile plus overrides), milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClusterTiming {
    /// Raft heartbeat from the leader.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in this range starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// How often a node reports its facts to the leader and renews its lease.
    pub report_interval_ms: u64,
    /// How long a grant lets a node hold its gateways without a renewal. A node that cannot
    /// renew (no quorum, dead or hung daemon) stops answering for its VIPs after this long.
    pub lease_ms: u64,
    /// How long the leader waits for a silent node before giving its gateways away. Must exceed
    /// `lease_ms`: that margin is what keeps two nodes from holding a VIP at once.
    pub failover_timeout_ms: u64,
}

impl ClusterConfig {
    pub fn timing(&self) -> ClusterTiming {
        let base = match self.profile {
            // openraft 0.9 adds its leader lease (= election_timeout_max) to a follower's
            // election timeout, so a dead leader is replaced after max + rand(min, max).
            Profile::Default => ClusterTiming {
                heartbeat_ms: 50,
                election_timeout_min_ms: 100,
                election_timeout_max_ms: 150,
                report_interval_ms: 50,
                lease_ms: 150,
                failover_timeout_ms: 250,
            },
            Profile::Fast => ClusterTiming {
                heartbeat_ms: 25,
                election_timeout_min_ms: 50,
                election_timeout_max_ms: 75,
                report_interval_ms: 20,
                lease_ms: 70,
                failover_timeout_ms: 110,
            },
        };
        let o = &self.timing;
        ClusterTiming {
            heartbeat_ms: o.heartbeat_ms.unwrap_or(base.heartbeat_ms),
            election_timeout_min_ms: o
                .election_timeout_min_ms
                .unwrap_or(base.election_timeout_min_ms),
            election_timeout_max_ms: o
                .election_timeout_max_ms
                .unwrap_or(base.election_timeout_max_ms),
            report_interval_ms: o.report_interval_ms.unwrap_or(base.report_interval_ms),
            lease_ms: o.lease_ms.unwrap_or(base.lease_ms),
            failover_timeout_ms: o.failover_timeout_ms.unwrap_or(base.failover_timeout_ms),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataplaneConfig {
    pub nft_table: String,
    pub garp_count: u32,
    pub garp_interval_ms: u64,
    /// 0 turns the periodic re-announcement off.
    pub garp_refresh_secs: u64,
    /// Off by default: forwarding is a host-wide setting an operator may want to own.
    pub manage_forwarding: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive string such as `info` or `egressd=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7480)),
            peers: Vec::new(),
            data_dir: PathBuf::from("/var/lib/egressd"),
            secret_file: None,
            profile: Profile::Default,
            timing: TimingOverrides::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7481)),
            token_file: None,
        }
    }
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            nft_table: "egressd".to_string(),
            garp_count: 5,
            garp_interval_ms: 10,
            garp_refresh_secs: 0,
            manage_forwarding: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

impl Config {
    /// Every Raft voter, this node included. An empty `peers` list means a single-node cluster
    /// whose only member is this node at `cluster.listen`.
    pub fn voters(&self) -> Vec<Peer> {
        if self.cluster.peers.is_empty() {
            vec![Peer {
                name: self.node.name.clone(),
                address: self.cluster.listen,
            }]
        } else {
            self.cluster.peers.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem in the configuration. `file` is the path of the TOML file or
/// `environment variable EGRESSD_X__Y`; it is empty for objects that came from elsewhere (the
/// admin API), and `key` is empty for problems with the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}: ", self.file)?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, in file order as far as possible; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A problem before it is attributed to a file or variable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issue {
    key: String,
    message: String,
}

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

/// Loads `path` with the process environment's `EGRESSD_<SECTION>__<KEY>` overrides.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// Like [`load`], with the environment given explicitly so tests need not touch the process
/// environment. Variables without the prefix, or without `__` after it (`EGRESSD_CONFIG`,
/// `EGRESSD_E2E`), are not configuration keys and are ignored.
pub fn load_with_env<I, K, V>(path: &Path, env: I) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            key: String::new(),
            message: format!("cannot read the configuration file: {e}"),
        }])
    })?;
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    load_inner(
        Source::File(path.to_path_buf()),
        &file,
        &text,
        &env,
        &system_hostname,
    )
}

/// Parses configuration text that did not come from a file (tests, `egressd apply` input kept
/// in memory). `source_name` stands in for the file name in errors. No environment overrides.
pub fn parse_str(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
    load_inner(
        Source::Custom(source_name.to_string()),
        source_name,
        text,
        &[],
        &system_hostname,
    )
}

/// Parses the input of `egressd apply`: a TOML document of `[[gateway]]` and `[[policy]]`
/// tables only, in the configuration file's syntax, checked by the same rules except that a
/// policy may name a gateway that is not in the document (the server checks it against the
/// committed objects). `source_name` names the input in errors.
pub fn parse_objects(
    text: &str,
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), ConfigErrors> {
    let error = |key: &str, message: String| ConfigError {
        file: source_name.to_string(),
        key: key.to_string(),
        message,
    };
    let dict: Dict = Toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![error(
            "",
            format!(
                "not valid TOML: {}",
                e.to_string().trim_end().replace('\n', "\n    ")
            ),
        )])
    })?;
    let figment = Figment::new().merge(Layer {
        metadata: Metadata::from("TOML file", Source::Custom(source_name.to_string())),
        dict,
    });
    let root = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(Dict::new()));
    let mut walker = Walker {
        figment: &figment,
        issues: Vec::new(),
    };
    let parsed = walker
        .table(&root, "", &["gateway", "policy"])
        .map(|t| walker.objects(t, false));
    match parsed {
        Some((Some(g), Some(p))) if walker.issues.is_empty() => {
            if g.is_empty() && p.is_empty() {
                return Err(ConfigErrors(vec![error(
                    "",
                    "nothing to apply: expected [[gateway]] or [[policy]] tables".into(),
                )]));
            }
            Ok((g, p))
        }
        _ => {
            let mut errors: Vec<ConfigError> = walker
                .issues
                .into_iter()
                .map(|i| error(&i.key, i.message))
                .collect();
            if errors.is_empty() {
                errors.push(error("", "the objects could not be read".into()));
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// The object-level rules for gateways and policies that did not come from the file (admin API,
/// Kubernetes adapter, the merge of several sources): names, interfaces, CIDRs, address
/// families, duplicates, shared VIPs and references. Key paths use the slice indices.
pub fn check_objects(gateways: &[Gateway], policies: &[Policy]) -> Vec<ConfigError> {
    let mut issues = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        let key = format!("gateway[{i}]");
        field_check(&mut issues, &sub(&key, "name"), check_object_name(&g.name));
        for k in g.node_selector.keys() {
            if k.is_empty() {
                issues.push(issue(
                    sub(&key, "node_selector"),
                    "a label key must not be empty",
                ));
            }
        }
        match &g.source_ip {
            SourceIp::PrimaryIp { interface } => field_check(
                &mut issues,
                &format!("{key}.source_ip.{PRIMARY_TABLE}.interface_name"),
                check_interface_name(interface),
            ),
            SourceIp::VirtualIp { interfaces, .. } => check_interface_list(
                &mut issues,
                &format!("{key}.source_ip.{VIP_TABLE}.interfaces"),
                interfaces.iter().map(String::as_str).enumerate(),
            ),
        }
        if let Some(nh) = &g.next_hop {
            field_check(
                &mut issues,
                &format!("{key}.next_hop.interface"),
                check_interface_name(&nh.interface),
            );
        }
    }
    for (i, p) in policies.iter().enumerate() {
        let key = format!("policy[{i}]");
        field_check(&mut issues, &sub(&key, "name"), check_object_name(&p.name));
        for (field, list) in [
            ("source_cidrs", &p.source_cidrs),
            ("destination_cidrs", &p.destination_cidrs),
            ("excluded_cidrs", &p.excluded_cidrs),
        ] {
            for (j, net) in list.iter().enumerate() {
                field_check(
                    &mut issues,
                    &format!("{key}.{field}[{j}]"),
                    check_network_address(net),
                );
            }
        }
    }
    let gws: Vec<(usize, &Gateway)> = gateways.iter().enumerate().collect();
    let pols: Vec<(usize, &Policy)> = policies.iter().enumerate().collect();
    let names: Vec<(usize, String)> = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| (i, g.name.clone()))
        .collect();
    let headers: Vec<PolicyHeader<'_>> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| PolicyHeader {
            index: i,
            name: Some(&p.name),
            gateway_name: Some(&p.egress_gateway_name),
        })
        .collect();
    object_checks(&mut issues, &gws, &pols, &names, &headers);
    issues
        .into_iter()
        .map(|i| ConfigError {
            file: String::new(),
            key: i.key,
            message: i.message,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sources: the file and the environment as figment providers
// ---------------------------------------------------------------------------------------------

/// One already-parsed source. figment's own `Toml::file` silently yields nothing for a missing
/// file and searches parent directories for relative paths; `Env` can only read the process
/// environment. Reading both ourselves avoids the first two and makes the environment
/// injectable, while figment still does the merging and remembers which source set each value.
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

/// Turns `EGRESSD_SECTION__KEY=value` pairs into a nested dict. Returns the dict and, for each
/// variable, the key path it sets (to name the variable in errors).
fn env_layer(env: &[(String, String)]) -> (Dict, Vec<(Vec<String>, String)>) {
    let mut dict = Dict::new();
    let mut vars = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            continue;
        }
        // Scalars stay strings (so `EGRESSD_NODE__NAME=007` keeps its zeros); typed getters
        // parse numbers and booleans from environment strings. Arrays and tables use figment's
        // inline syntax: `EGRESSD_NODE__LABELS={zone=a}`.
        let trimmed = value.trim_start();
        let parsed = if trimmed.starts_with('[') || trimmed.starts_with('{') {
            Value::from_str(value).unwrap_or_else(|e| match e {})
        } else {
            Value::from(value.clone())
        };
        insert_nested(&mut dict, &keys, parsed);
        vars.push((keys, name.clone()));
    }
    (dict, vars)
}

fn insert_nested(dict: &mut Dict, keys: &[String], value: Value) {
    match keys {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

fn system_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if name.is_some() {
        return name;
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn load_inner(
    source: Source,
    file_name: &str,
    text: &str,
    env: &[(String, String)],
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let file_dict: Dict = Toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file_name.to_string(),
            key: String::new(),
            message: format!(
                "not valid TOML: {}",
                e.to_string().trim_end().replace('\n', "\n    ")
            ),
        }])
    })?;
    let (env_dict, env_vars) = env_layer(env);
    let figment = Figment::new()
        .merge(Layer {
            metadata: Metadata::from("TOML file", source),
            dict: file_dict,
        })
        .merge(Layer {
            metadata: Metadata::named(ENV_METADATA_NAME),
            dict: env_dict,
        });
    let root = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(Dict::new()));
    let mut walker = Walker {
        figment: &figment,
        issues: Vec::new(),
    };
    let config = walker.config(&root, hostname);
    if walker.issues.is_empty()
        && let Some(config) = config
    {
        return Ok(config);
    }
    let locator = Locator {
        figment: &figment,
        root: &root,
        file_name,
        env_vars: &env_vars,
    };
    let mut errors: Vec<ConfigError> = walker
        .issues
        .into_iter()
        .map(|i| ConfigError {
            file: locator.source_of(&i.key),
            key: i.key,
            message: i.message,
        })
        .collect();
    if errors.is_empty() {
        // Unreachable by construction (every `None` comes with an issue), but never report
        // failure without a reason.
        errors.push(ConfigError {
            file: file_name.to_string(),
            key: String::new(),
            message: "the configuration is invalid".to_string(),
        });
    }
    Err(ConfigErrors(errors))
}

/// Finds which source set the value at a key path, for the `file` part of an error.
struct Locator<'a> {
    figment: &'a Figment,
    root: &'a Value,
    file_name: &'a str,
    env_vars: &'a [(Vec<String>, String)],
}

enum Seg {
    Key(String),
    Index(usize),
}

fn parse_key_path(key: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    let mut chars = key.chars().peekable();
    let mut cur = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '.' => {
                if !cur.is_empty() {
                    segs.push(Seg::Key(std::mem::take(&mut cur)));
                }
            }
            '[' => {
                if !cur.is_empty() {
                    segs.push(Seg::Key(std::mem::take(&mut cur)));
                }
                let mut digits = String::new();
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    digits.push(c);
                }
                if let Ok(i) = digits.parse() {
                    segs.push(Seg::Index(i));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        segs.push(Seg::Key(cur));
    }
    segs
}

impl Locator<'_> {
    fn source_of(&self, key: &str) -> String {
        let mut value = self.root;
        let mut tag = value.tag();
        let mut dict_path: Vec<String> = Vec::new();
        let mut in_array = false;
        for seg in parse_key_path(key) {
            let next = match (&seg, value) {
                (Seg::Key(k), Value::Dict(_, d)) => d.get(k),
                (Seg::Index(i), Value::Array(_, a)) => a.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            match seg {
                Seg::Key(k) if !in_array => dict_path.push(k),
                Seg::Index(_) => in_array = true,
                Seg::Key(_) => {}
            }
            value = next;
            if !value.tag().is_default() {
                tag = value.tag();
            }
        }
        match self.figment.get_metadata(tag) {
            Some(md) if md.name == ENV_METADATA_NAME => {
                let var = self
                    .env_vars
                    .iter()
                    .filter(|(keys, _)| dict_path.starts_with(keys) || keys.starts_with(&dict_path))
                    .max_by_key(|(keys, _)| keys.len())
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| format!("{ENV_PREFIX}*"));
                format!("{ENV_METADATA_NAME} {var}")
            }
            _ => self.file_name.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The walk over the merged value tree
// ---------------------------------------------------------------------------------------------

struct Walker<'a> {
    figment: &'a Figment,
    issues: Vec<Issue>,
}

fn issue(key: impl Into<String>, message: impl Into<String>) -> Issue {
    Issue {
        key: key.into(),
        message: message.into(),
    }
}

fn sub(key: &str, field: &str) -> String {
    if key.is_empty() {
        field.to_string()
    } else {
        format!("{key}.{field}")
    }
}

/// A map key as it appears in a key path; quoted unless it is a bare TOML key.
fn map_key(key: &str, field: &str) -> String {
    let bare = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        sub(key, field)
    } else {
        format!("{key}.\"{}\"", field.replace('"', "\\\""))
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("the string {s:?}"),
        Value::Char(_, c) => format!("the character {c:?}"),
        Value::Bool(_, b) => format!("the boolean {b}"),
        Value::Num(_, n) => match n.to_f64() {
            Some(f) if n.to_i128().is_none() && n.to_u128().is_none() => format!("the number {f}"),
            _ => match (n.to_i128(), n.to_u128()) {
                (Some(i), _) => format!("the integer {i}"),
                (_, Some(u)) => format!("the integer {u}"),
                _ => "a number".to_string(),
            },
        },
        Value::Empty(_, _) => "nothing".to_string(),
        Value::Dict(_, _) => "a table".to_string(),
        Value::Array(_, _) => "an array".to_string(),
    }
}

fn field_check(issues: &mut Vec<Issue>, key: &str, result: Result<(), String>) {
    if let Err(message) = result {
        issues.push(issue(key, message));
    }
}

/// What a raw policy yields: the model object when every part parsed, plus its name and
/// gateway reference on their own, so duplicates and dangling references are reported even for
/// a policy with other mistakes.
struct ParsedPolicy {
    index: usize,
    name: Option<String>,
    gateway_name: Option<String>,
    policy: Option<Policy>,
}

/// A policy's name and gateway reference, for the checks that need only those.
struct PolicyHeader<'a> {
    index: usize,
    name: Option<&'a str>,
    gateway_name: Option<&'a str>,
}

/// What a raw gateway yields: the model object when every part parsed, and its name when at
/// least that did (so policies naming it are not also reported as dangling).
struct ParsedGateway {
    index: usize,
    name: Option<String>,
    gateway: Option<Gateway>,
}

impl Walker<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(issue(key, message));
    }

    fn is_from_env(&self, v: &Value) -> bool {
        self.figment
            .get_metadata(v.tag())
            .is_some_and(|md| md.name == ENV_METADATA_NAME)
    }

    /// Checks that `v` is a table and reports each key outside `known`.
    fn table<'v>(&mut self, v: &'v Value, key: &str, known: &[&str]) -> Option<&'v Dict> {
        let Value::Dict(_, dict) = v else {
            self.push(
                key,
                format!(
                    "expected a table (with keys {}), found {}",
                    known.join(", "),
                    describe(v)
                ),
            );
            return None;
        };
        for k in dict.keys() {
            if !known.contains(&k.as_str()) {
                let hint = match suggest(k, known) {
                    Some(s) => format!("; did you mean `{s}`?"),
                    None => String::new(),
                };
                self.push(
                    map_key(key, k),
                    format!("unknown key{hint} (known keys here: {})", known.join(", ")),
                );
            }
        }
        Some(dict)
    }

    fn string(&mut self, v: &Value, key: &str, expected: &str) -> Option<String> {
        match v {
            Value::String(_, s) => Some(s.clone()),
            Value::Char(_, c) => Some(c.to_string()),
            other => {
                self.push(
                    key,
                    format!("expected {expected}, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn uint(
        &mut self,
        v: &Value,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        unit: &str,
    ) -> Option<u64> {
        let expected = format!(
            "an integer between {} and {}{unit}",
            range.start(),
            range.end()
        );
        let n: Option<i128> = match v {
            Value::Num(_, n) => n
                .to_u128()
                .map(|u| i128::try_from(u).unwrap_or(i128::MAX))
                .or_else(|| n.to_i128()),
            Value::String(_, s) if self.is_from_env(v) => match s.trim().parse::<i128>() {
                Ok(n) => Some(n),
                Err(_) => {
                    self.push(key, format!("{s:?} is not an integer; expected {expected}"));
                    return None;
                }
            },
            _ => None,
        };
        match n {
            Some(n) if n >= i128::from(*range.start()) && n <= i128::from(*range.end()) => {
                u64::try_from(n).ok()
            }
            Some(n) if n == i128::MAX => {
                self.push(key, format!("the value is too large; expected {expected}"));
                None
            }
            Some(n) => {
                self.push(key, format!("{n} is out of range; expected {expected}"));
                None
            }
            None => {
                self.push(key, format!("expected {expected}, found {}", describe(v)));
                None
            }
        }
    }

    fn boolean(&mut self, v: &Value, key: &str) -> Option<bool> {
        match v {
            Value::Bool(_, b) => Some(*b),
            Value::String(_, s) if self.is_from_env(v) => match s.trim() {
                "true" => Some(true),
                "false" => Some(false),
                _ => {
                    self.push(
                        key,
                        format!("{s:?} is not a boolean; expected true or false"),
                    );
                    None
                }
            },
            other => {
                self.push(
                    key,
                    format!("expected true or false, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn array<'v>(&mut self, v: &'v Value, key: &str, expected: &str) -> Option<&'v [Value]> {
        match v {
            Value::Array(_, a) => Some(a),
            other => {
                self.push(
                    key,
                    format!("expected an array of {expected}, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// A string → string table (labels, node selectors). Label keys may contain dots and
    /// slashes, so they must be quoted in TOML; an unquoted dotted key shows up here as a nested
    /// table and is reported as such.
    fn string_map(&mut self, v: &Value, key: &str) -> Option<Labels> {
        let Value::Dict(_, dict) = v else {
            self.push(
                key,
                format!(
                    "expected a table of strings such as {{ \"node-role.deckhouse.io/egress\" = \"\" }}, found {}",
                    describe(v)
                ),
            );
            return None;
        };
        let mut out = Labels::new();
        let mut ok = true;
        for (k, val) in dict {
            let vkey = map_key(key, k);
            if k.is_empty() {
                self.push(key, "a label key must not be empty");
                ok = false;
            }
            match val {
                Value::String(_, s) => {
                    out.insert(k.clone(), s.clone());
                }
                Value::Dict(_, _) => {
                    self.push(
                        vkey,
                        "expected a string, found a table; quote label keys that contain dots, e.g. \"node-role.deckhouse.io/egress\" = \"\"",
                    );
                    ok = false;
                }
                other => {
                    self.push(
                        vkey,
                        format!(
                            "expected a string (label values are strings; use \"\" for an empty value), found {}",
                            describe(other)
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A string value run through `parse`, whose error message is recorded under `key`.
    fn parsed<T>(
        &mut self,
        v: &Value,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(v, key, expected)?;
        parse(&s).map_err(|m| self.push(key, m)).ok()
    }

    fn socket_addr(&mut self, v: &Value, key: &str) -> Option<SocketAddr> {
        self.parsed(v, key, "an address:port string", parse_socket_addr)
    }

    fn ip(&mut self, v: &Value, key: &str) -> Option<IpAddr> {
        self.parsed(v, key, "an IP address string", parse_ip)
    }

    fn interface(&mut self, v: &Value, key: &str) -> Option<String> {
        self.parsed(v, key, "an interface name string", |s| {
            check_interface_name(s).map(|()| s.to_string())
        })
    }

    fn object_name(&mut self, v: &Value, key: &str) -> Option<String> {
        let s = self.string(v, key, "a name string")?;
        match check_object_name(&s) {
            Ok(()) => Some(s),
            Err(m) => {
                self.push(key, m);
                None
            }
        }
    }

    fn required<'v>(
        &mut self,
        dict: &'v Dict,
        key: &str,
        field: &str,
        what: &str,
    ) -> Option<&'v Value> {
        let v = dict.get(field);
        if v.is_none() {
            self.push(sub(key, field), format!("missing; expected {what}"));
        }
        v
    }

    // ---- sections ----

    /// The `[[gateway]]` and `[[policy]]` tables of `root`, checked as a set.
    fn objects(
        &mut self,
        root: &Dict,
        check_references: bool,
    ) -> (Option<Vec<Gateway>>, Option<Vec<Policy>>) {
        let mut parsed_gateways = Vec::new();
        if let Some(v) = root.get("gateway")
            && let Some(items) = self.array(v, "gateway", "tables ([[gateway]])")
        {
            for (i, item) in items.iter().enumerate() {
                parsed_gateways.push(self.gateway(item, i));
            }
        }
        let mut parsed_policies = Vec::new();
        if let Some(v) = root.get("policy")
            && let Some(items) = self.array(v, "policy", "tables ([[policy]])")
        {
            for (i, item) in items.iter().enumerate() {
                parsed_policies.push(self.policy(item, i));
            }
        }

        let names: Vec<(usize, String)> = parsed_gateways
            .iter()
            .filter_map(|p| p.name.clone().map(|n| (p.index, n)))
            .collect();
        let gws: Vec<(usize, &Gateway)> = parsed_gateways
            .iter()
            .filter_map(|p| p.gateway.as_ref().map(|g| (p.index, g)))
            .collect();
        let pols: Vec<(usize, &Policy)> = parsed_policies
            .iter()
            .filter_map(|p| p.policy.as_ref().map(|pol| (p.index, pol)))
            .collect();
        let headers: Vec<PolicyHeader<'_>> = parsed_policies
            .iter()
            .map(|p| PolicyHeader {
                index: p.index,
                name: p.name.as_deref(),
                // An applied policy may name a gateway the cluster already has: the server
                // checks that reference against the committed objects.
                gateway_name: p.gateway_name.as_deref().filter(|_| check_references),
            })
            .collect();
        object_checks(&mut self.issues, &gws, &pols, &names, &headers);

        let gateways: Option<Vec<Gateway>> =
            parsed_gateways.into_iter().map(|p| p.gateway).collect();
        let policies: Option<Vec<Policy>> = parsed_policies.into_iter().map(|p| p.policy).collect();
        (gateways, policies)
    }

    fn config(&mut self, root: &Value, hostname: &dyn Fn() -> Option<String>) -> Option<Config> {
        let root = self.table(
            root,
            "",
            &[
                "node",
                "cluster",
                "admin",
                "dataplane",
                "log",
                "gateway",
                "policy",
            ],
        )?;
        let node = self.node(root.get("node"), hostname);
        let cluster = self.cluster(root.get("cluster"));
        let admin = self.admin(root.get("admin"));
        let dataplane = self.dataplane(root.get("dataplane"));
        let log = self.log(root.get("log"));
        if let (Some(node), Some(cluster)) = (&node, &cluster) {
            self.check_membership(node, cluster);
        }

        let (gateways, policies) = self.objects(root, true);
        Some(Config {
            node: node?,
            cluster: cluster?,
            admin: admin?,
            dataplane: dataplane?,
            log: log?,
            gateways: gateways?,
            policies: policies?,
        })
    }

    fn node(
        &mut self,
        v: Option<&Value>,
        hostname: &dyn Fn() -> Option<String>,
    ) -> Option<NodeConfig> {
        let empty = Dict::new();
        let dict = match v {
            Some(v) => self.table(v, "node", &["name", "labels"])?,
            None => &empty,
        };
        let name = match dict.get("name") {
            Some(v) => self.object_name(v, "node.name"),
            None => match hostname() {
                Some(h) => match check_object_name(&h) {
                    Ok(()) => Some(h),
                    Err(m) => {
                        self.push(
                            "node.name",
                            format!(
                                "not set, and the host name cannot be used: {m}; set node.name"
                            ),
                        );
                        None
                    }
                },
                None => {
                    self.push(
                        "node.name",
                        "not set, and the host name could not be read; set node.name",
                    );
                    None
                }
            },
        };
        let labels = match dict.get("labels") {
            Some(v) => self.string_map(v, "node.labels"),
            None => Some(Labels::new()),
        };
        Some(NodeConfig {
            name: name?,
            labels: labels?,
        })
    }

    fn cluster(&mut self, v: Option<&Value>) -> Option<ClusterConfig> {
        let defaults = ClusterConfig::default();
        let empty = Dict::new();
        let dict = match v {
            Some(v) => self.table(v, "cluster", CLUSTER_KEYS)?,
            None => &empty,
        };
        let secret_file = match dict.get("secret_file") {
            Some(v) => self.path(v, "cluster.secret_file").map(Some),
            None => Some(None),
        };
        let profile = match dict.get("profile") {
            Some(v) => match self
                .string(v, "cluster.profile", "\"default\" or \"fast\"")?
                .as_str()
            {
                "default" => Some(Profile::Default),
                "fast" => Some(Profile::Fast),
                other => {
                    self.push(
                        "cluster.profile",
                        format!("unknown profile {other:?}; expected \"default\" or \"fast\""),
                    );
                    None
                }
            },
            None => Some(Profile::Default),
        };
        let mut timing = TimingOverrides::default();
        let mut timing_ok = true;
        for (key, slot) in [
            ("heartbeat_ms", &mut timing.heartbeat_ms),
            (
                "election_timeout_min_ms",
                &mut timing.election_timeout_min_ms,
            ),
            (
                "election_timeout_max_ms",
                &mut timing.election_timeout_max_ms,
            ),
            ("report_interval_ms", &mut timing.report_interval_ms),
            ("lease_ms", &mut timing.lease_ms),
            ("failover_timeout_ms", &mut timing.failover_timeout_ms),
        ] {
            if let Some(v) = dict.get(key) {
                match self.uint(v, &format!("cluster.{key}"), 5..=60_000, " milliseconds") {
                    Some(n) => *slot = Some(n),
                    None => timing_ok = false,
                }
            }
        }
        let listen = match dict.get("listen") {
            Some(v) => self.socket_addr(v, "cluster.listen"),
            None => Some(defaults.listen),
        };
        let data_dir = match dict.get("data_dir") {
            Some(v) => self.path(v, "cluster.data_dir"),
            None => Some(defaults.data_dir),
        };
        let mut peers = Some(Vec::new());
        if let Some(v) = dict.get("peers") {
            peers = self.peers(v);
        }
        let cluster = ClusterConfig {
            listen: listen?,
            peers: peers?,
            data_dir: data_dir?,
            secret_file: secret_file?,
            profile: profile?,
            timing,
        };
        if !timing_ok {
            return None;
        }
        let t = cluster.timing();
        if t.election_timeout_min_ms <= t.heartbeat_ms
            || t.election_timeout_max_ms <= t.election_timeout_min_ms
        {
            self.push(
                "cluster.election_timeout_min_ms",
                format!(
                    "heartbeat {} ms < election timeout min {} ms < max {} ms is required",
                    t.heartbeat_ms, t.election_timeout_min_ms, t.election_timeout_max_ms
                ),
            );
        }
        if t.lease_ms <= t.report_interval_ms {
            self.push(
                "cluster.lease_ms",
                format!(
                    "{} ms must exceed report_interval_ms ({} ms), or leases lapse between renewals",
                    t.lease_ms, t.report_interval_ms
                ),
            );
        }
        if t.failover_timeout_ms <= t.lease_ms {
            self.push(
                "cluster.failover_timeout_ms",
                format!(
                    "{} ms must exceed lease_ms ({} ms): a silent node must have stopped \
                     answering for its VIPs before they are given away",
                    t.failover_timeout_ms, t.lease_ms
                ),
            );
        }
        if cluster.peers.len() > 1 && cluster.secret_file.is_none() {
            self.push(
                "cluster.secret_file",
                "is required when cluster.peers lists more than one node: peers sign every \
                 request with the shared secret in this file",
            );
        }
        Some(cluster)
    }

    fn path(&mut self, v: &Value, key: &str) -> Option<PathBuf> {
        let s = self.string(v, key, "a path string")?;
        if s.is_empty() {
            self.push(key, "must not be empty; expected a path");
            return None;
        }
        Some(PathBuf::from(s))
    }

    fn peers(&mut self, v: &Value) -> Option<Vec<Peer>> {
        let items = self.array(
            v,
            "cluster.peers",
            "tables such as { name = \"gw1\", address = \"10.77.0.11:7480\" }",
        )?;
        let mut out = Vec::new();
        let mut ok = true;
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut addrs: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let key = format!("cluster.peers[{i}]");
            let Some(d) = self.table(item, &key, &["name", "address"]) else {
                ok = false;
                continue;
            };
            let name = self
                .required(d, &key, "name", "the peer's node name")
                .and_then(|v| self.object_name(v, &sub(&key, "name")));
            let address = self
                .required(
                    d,
                    &key,
                    "address",
                    "the peer's address:port, e.g. \"10.77.0.12:7480\"",
                )
                .and_then(|v| self.socket_addr(v, &sub(&key, "address")));
            if let Some(n) = &name {
                if let Some(first) = names.get(n) {
                    self.push(
                        sub(&key, "name"),
                        format!(
                            "duplicate peer name {n:?}; already used by cluster.peers[{first}]"
                        ),
                    );
                } else {
                    names.insert(n.clone(), i);
                }
            }
            if let Some(a) = &address {
                if a.ip().is_unspecified() || a.port() == 0 {
                    self.push(
                        sub(&key, "address"),
                        format!("{a} cannot be connected to; expected the peer's reachable address and port"),
                    );
                } else if let Some(first) = addrs.get(a) {
                    self.push(
                        sub(&key, "address"),
                        format!(
                            "duplicate peer address {a}; already used by cluster.peers[{first}]"
                        ),
                    );
                } else {
                    addrs.insert(*a, i);
                }
            }
            match (name, address) {
                (Some(name), Some(address)) => out.push(Peer { name, address }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn check_membership(&mut self, node: &NodeConfig, cluster: &ClusterConfig) {
        if cluster.peers.is_empty() {
            return;
        }
        let listed: Vec<&str> = cluster.peers.iter().map(|p| p.name.as_str()).collect();
        let Some(me) = cluster.peers.iter().find(|p| p.name == node.name) else {
            self.push(
                "node.name",
                format!(
                    "{:?} is not among cluster.peers ({}); list every voter, this node included, or set node.name to this node's peer name",
                    node.name,
                    listed.join(", ")
                ),
            );
            return;
        };
        let listen = cluster.listen;
        let differs = if listen.ip().is_unspecified() {
            listen.port() != me.address.port()
        } else {
            listen != me.address
        };
        if differs {
            self.push(
                "cluster.listen",
                format!(
                    "{listen} does not match this node's own entry in cluster.peers ({} = {}); peers would connect to an address this node does not listen on",
                    me.name, me.address
                ),
            );
        }
    }

    fn admin(&mut self, v: Option<&Value>) -> Option<AdminConfig> {
        let defaults = AdminConfig::default();
        let empty = Dict::new();
        let dict = match v {
            Some(v) => self.table(v, "admin", &["listen", "token_file"])?,
            None => &empty,
        };
        let listen = match dict.get("listen") {
            Some(v) => self.socket_addr(v, "admin.listen"),
            None => Some(defaults.listen),
        };
        let token_file = match dict.get("token_file") {
            Some(v) => self.path(v, "admin.token_file").map(Some),
            None => Some(None),
        };
        Some(AdminConfig {
            listen: listen?,
            token_file: token_file?,
        })
    }

    fn dataplane(&mut self, v: Option<&Value>) -> Option<DataplaneConfig> {
        let d = DataplaneConfig::default();
        let empty = Dict::new();
        let dict = match v {
            Some(v) => self.table(
                v,
                "dataplane",
                &[
                    "nft_table",
                    "garp_count",
                    "garp_interval_ms",
                    "garp_refresh_secs",
                    "manage_forwarding",
                ],
            )?,
            None => &empty,
        };
        let nft_table = match dict.get("nft_table") {
            Some(v) => self
                .string(v, "dataplane.nft_table", "a table name string")
                .and_then(|s| match check_nft_identifier(&s) {
                    Ok(()) => Some(s),
                    Err(m) => {
                        self.push("dataplane.nft_table", m);
                        None
                    }
                }),
            None => Some(d.nft_table),
        };
        let garp_count = match dict.get("garp_count") {
            Some(v) => self
                .uint(v, "dataplane.garp_count", 1..=100, "")
                .and_then(|n| u32::try_from(n).ok()),
            None => Some(d.garp_count),
        };
        let garp_interval_ms = match dict.get("garp_interval_ms") {
            Some(v) => self.uint(v, "dataplane.garp_interval_ms", 0..=10_000, " milliseconds"),
            None => Some(d.garp_interval_ms),
        };
        let garp_refresh_secs = match dict.get("garp_refresh_secs") {
            Some(v) => self.uint(
                v,
                "dataplane.garp_refresh_secs",
                0..=86_400,
                " seconds (0 turns it off)",
            ),
            None => Some(d.garp_refresh_secs),
        };
        let manage_forwarding = match dict.get("manage_forwarding") {
            Some(v) => self.boolean(v, "dataplane.manage_forwarding"),
            None => Some(d.manage_forwarding),
        };
        Some(DataplaneConfig {
            nft_table: nft_table?,
            garp_count: garp_count?,
            garp_interval_ms: garp_interval_ms?,
            garp_refresh_secs: garp_refresh_secs?,
            manage_forwarding: manage_forwarding?,
        })
    }

    fn log(&mut self, v: Option<&Value>) -> Option<LogConfig> {
        let d = LogConfig::default();
        let empty = Dict::new();
        let dict = match v {
            Some(v) => self.table(v, "log", &["format", "level"])?,
            None => &empty,
        };
        let format = match dict.get("format") {
            Some(v) => self
                .string(v, "log.format", "\"text\" or \"json\"")
                .and_then(|s| match s.as_str() {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => {
                        self.push(
                            "log.format",
                            format!("unknown format {s:?}; expected \"text\" or \"json\""),
                        );
                        None
                    }
                }),
            None => Some(d.format),
        };
        let level = match dict.get("level") {
            Some(v) => self
                .string(v, "log.level", "a log filter string such as \"info\"")
                .and_then(|s| {
                    match tracing_subscriber::EnvFilter::builder().parse(&s) {
                        Ok(_) if !s.trim().is_empty() => Some(s),
                        Ok(_) => {
                            self.push("log.level", "must not be empty; expected a level such as \"info\" or a filter such as \"egressd=debug,info\"");
                            None
                        }
                        Err(e) => {
                            self.push(
                                "log.level",
                                format!("{s:?} is not a valid log filter ({e}); expected a level such as \"info\" or a filter such as \"egressd=debug,info\""),
                            );
                            None
                        }
                    }
                }),
            None => Some(d.level),
        };
        Some(LogConfig {
            format: format?,
            level: level?,
        })
    }

    fn gateway(&mut self, v: &Value, i: usize) -> ParsedGateway {
        let key = format!("gateway[{i}]");
        let mut out = ParsedGateway {
            index: i,
            name: None,
            gateway: None,
        };
        let Some(d) = self.table(
            v,
            &key,
            &[
                "name",
                "node_selector",
                "selection",
                "preempt",
                "source_ip",
                "next_hop",
            ],
        ) else {
            return out;
        };
        out.name = self
            .required(d, &key, "name", "the gateway's name")
            .and_then(|v| self.object_name(v, &sub(&key, "name")));
        let node_selector = match d.get("node_selector") {
            Some(v) => self.string_map(v, &sub(&key, "node_selector")),
            None => Some(Labels::new()),
        };
        let selection = match d.get("selection") {
            Some(v) => {
                let k = sub(&key, "selection");
                self.string(v, &k, "\"alphabetical\" or \"spread\"")
                    .and_then(|s| match s.as_str() {
                        "alphabetical" => Some(Selection::Alphabetical),
                        "spread" => Some(Selection::Spread),
                        _ => {
                            self.push(k, format!("unknown selection {s:?}; expected \"alphabetical\" (the default) or \"spread\""));
                            None
                        }
                    })
            }
            None => Some(Selection::Alphabetical),
        };
        let preempt = match d.get("preempt") {
            Some(v) => self.boolean(v, &sub(&key, "preempt")),
            None => Some(true),
        };
        let source_ip = self
            .required(
                d,
                &key,
                "source_ip",
                &format!(
                    "a [gateway.source_ip] table with mode = \"{VIP_MODE}\" or \"{PRIMARY_MODE}\""
                ),
            )
            .and_then(|v| self.source_ip(v, &sub(&key, "source_ip")));
        let next_hop = match d.get("next_hop") {
            Some(v) => self.next_hop(v, &sub(&key, "next_hop")).map(Some),
            None => Some(None),
        };
        if let (
            Some(name),
            Some(node_selector),
            Some(selection),
            Some(preempt),
            Some(source_ip),
            Some(next_hop),
        ) = (
            out.name.clone(),
            node_selector,
            selection,
            preempt,
            source_ip,
            next_hop,
        ) {
            out.gateway = Some(Gateway {
                name,
                node_selector,
                selection,
                preempt,
                source_ip,
                next_hop,
            });
        }
        out
    }

    fn source_ip(&mut self, v: &Value, key: &str) -> Option<SourceIp> {
        let d = self.table(v, key, &["mode", VIP_TABLE, PRIMARY_TABLE])?;
        let modes = format!("\"{VIP_MODE}\" or \"{PRIMARY_MODE}\"");
        let mode_key = sub(key, "mode");
        let mode = self
            .required(d, key, "mode", &modes)
            .and_then(|v| self.string(v, &mode_key, &modes));
        let (table, other) = match mode.as_deref() {
            Some(VIP_MODE) => (VIP_TABLE, PRIMARY_TABLE),
            Some(PRIMARY_MODE) => (PRIMARY_TABLE, VIP_TABLE),
            Some(m) => {
                let hint = [VIP_MODE, PRIMARY_MODE]
                    .into_iter()
                    .find(|k| k.eq_ignore_ascii_case(m))
                    .map(|k| format!(" (modes are case-sensitive: did you mean {k:?}?)"))
                    .unwrap_or_default();
                self.push(
                    &mode_key,
                    format!("unknown mode {m:?}{hint}; expected {modes}"),
                );
                return None;
            }
            None => return None,
        };
        let mode = mode.unwrap_or_default();
        if d.contains_key(other) {
            self.push(
                sub(key, other),
                format!(
                    "belongs to mode \"{}\", but mode is \"{mode}\"; remove it or change the mode",
                    if other == VIP_TABLE {
                        VIP_MODE
                    } else {
                        PRIMARY_MODE
                    }
                ),
            );
        }
        let settings_key = sub(key, table);
        let Some(settings) = d.get(table) else {
            let example = if table == VIP_TABLE {
                format!("{table} = {{ ip = \"198.18.0.50\", interfaces = [\"eth1\"] }}")
            } else {
                format!("{table} = {{ interface_name = \"eth1\" }}")
            };
            self.push(
                settings_key,
                format!("missing; mode \"{mode}\" needs its settings: {example}"),
            );
            return None;
        };
        if table == VIP_TABLE {
            let s = self.table(settings, &settings_key, &["ip", "interfaces"])?;
            let ip = self
                .required(
                    s,
                    &settings_key,
                    "ip",
                    "the virtual IP address, e.g. \"198.18.0.50\"",
                )
                .and_then(|v| self.ip(v, &sub(&settings_key, "ip")));
            let ifaces_key = sub(&settings_key, "interfaces");
            let interfaces = self
                .required(
                    s,
                    &settings_key,
                    "interfaces",
                    "the interfaces to hold the VIP on, e.g. [\"eth1\"]",
                )
                .and_then(|v| self.array(v, &ifaces_key, "interface names such as [\"eth1\"]"))
                .and_then(|items| {
                    let mut names = Vec::new();
                    let mut ok = true;
                    for (j, item) in items.iter().enumerate() {
                        match self.string(
                            item,
                            &format!("{ifaces_key}[{j}]"),
                            "an interface name string",
                        ) {
                            Some(n) => names.push((j, n)),
                            None => ok = false,
                        }
                    }
                    let before = self.issues.len();
                    check_interface_list(
                        &mut self.issues,
                        &ifaces_key,
                        names.iter().map(|(j, n)| (*j, n.as_str())),
                    );
                    (ok && self.issues.len() == before)
                        .then(|| names.into_iter().map(|(_, n)| n).collect())
                });
            Some(SourceIp::VirtualIp {
                ip: ip?,
                interfaces: interfaces?,
            })
        } else {
            let s = self.table(settings, &settings_key, &["interface_name"])?;
            let interface = self
                .required(
                    s,
                    &settings_key,
                    "interface_name",
                    "the interface whose primary IPv4 address is used, e.g. \"eth1\"",
                )
                .and_then(|v| self.interface(v, &sub(&settings_key, "interface_name")))?;
            Some(SourceIp::PrimaryIp { interface })
        }
    }

    fn next_hop(&mut self, v: &Value, key: &str) -> Option<NextHop> {
        let d = self.table(v, key, &["ip", "interface"])?;
        let ip = self
            .required(
                d,
                key,
                "ip",
                "the next-hop address clients route through, e.g. \"10.77.0.1\"",
            )
            .and_then(|v| self.ip(v, &sub(key, "ip")));
        let interface = self
            .required(
                d,
                key,
                "interface",
                "the interface to hold the next-hop address on, e.g. \"eth0\"",
            )
            .and_then(|v| self.interface(v, &sub(key, "interface")));
        Some(NextHop {
            ip: ip?,
            interface: interface?,
        })
    }

    fn policy(&mut self, v: &Value, i: usize) -> ParsedPolicy {
        let key = format!("policy[{i}]");
        let mut out = ParsedPolicy {
            index: i,
            name: None,
            gateway_name: None,
            policy: None,
        };
        let Some(d) = self.table(
            v,
            &key,
            &[
                "name",
                "egress_gateway_name",
                "source_cidrs",
                "destination_cidrs",
                "excluded_cidrs",
            ],
        ) else {
            return out;
        };
        out.name = self
            .required(d, &key, "name", "the policy's name")
            .and_then(|v| self.object_name(v, &sub(&key, "name")));
        let gw_key = sub(&key, "egress_gateway_name");
        out.gateway_name = self
            .required(d, &key, "egress_gateway_name", "the name of a [[gateway]]")
            .and_then(|v| self.string(v, &gw_key, "a gateway name string"));
        let source_cidrs = self
            .required(
                d,
                &key,
                "source_cidrs",
                "the CIDRs of the traffic's sources, e.g. [\"10.77.0.0/24\"]",
            )
            .and_then(|v| self.cidr_list(v, &sub(&key, "source_cidrs"), true));
        let destination_cidrs = self
            .required(
                d,
                &key,
                "destination_cidrs",
                "the CIDRs of the traffic's destinations, e.g. [\"0.0.0.0/0\"]",
            )
            .and_then(|v| self.cidr_list(v, &sub(&key, "destination_cidrs"), true));
        let excluded_cidrs = match d.get("excluded_cidrs") {
            Some(v) => self.cidr_list(v, &sub(&key, "excluded_cidrs"), false),
            None => Some(Vec::new()),
        };
        if let (
            Some(name),
            Some(egress_gateway_name),
            Some(source_cidrs),
            Some(destination_cidrs),
            Some(excluded_cidrs),
        ) = (
            out.name.clone(),
            out.gateway_name.clone(),
            source_cidrs,
            destination_cidrs,
            excluded_cidrs,
        ) {
            out.policy = Some(Policy {
                name,
                egress_gateway_name,
                source_cidrs,
                destination_cidrs,
                excluded_cidrs,
            });
        }
        out
    }

    fn cidr_list(&mut self, v: &Value, key: &str, non_empty: bool) -> Option<Vec<IpNet>> {
        let items = self.array(v, key, "CIDR strings such as [\"10.0.0.0/24\"]")?;
        if non_empty && items.is_empty() {
            self.push(
                key,
                "must not be empty; list at least one CIDR (0.0.0.0/0 or ::/0 for everything)",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut seen: BTreeMap<IpNet, usize> = BTreeMap::new();
        let mut ok = true;
        for (j, item) in items.iter().enumerate() {
            let k = format!("{key}[{j}]");
            let Some(s) = self.string(item, &k, "a CIDR string such as \"10.0.0.0/24\"") else {
                ok = false;
                continue;
            };
            match parse_cidr(&s).and_then(|n| check_network_address(&n).map(|()| n)) {
                Ok(net) => {
                    if let Some(first) = seen.get(&net) {
                        self.push(k, format!("{net} is listed twice (also at {key}[{first}])"));
                        ok = false;
                    } else {
                        seen.insert(net, j);
                        out.push(net);
                    }
                }
                Err(m) => {
                    self.push(k, m);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks on model objects (shared by the file and `check_objects`)
// ---------------------------------------------------------------------------------------------

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn net_family(n: &IpNet) -> &'static str {
    family(&n.addr())
}

fn vip_key(i: usize) -> String {
    format!("gateway[{i}].source_ip.{VIP_TABLE}.ip")
}

/// Rules that involve more than one field or object. `gateway_names` lists every declared
/// gateway name, also of gateways that failed to parse, so that their policies are not reported
/// as dangling too.
fn object_checks(
    issues: &mut Vec<Issue>,
    gateways: &[(usize, &Gateway)],
    policies: &[(usize, &Policy)],
    gateway_names: &[(usize, String)],
    policy_headers: &[PolicyHeader<'_>],
) {
    let mut first_name: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, n) in gateway_names {
        if let Some(first) = first_name.get(n.as_str()) {
            issues.push(issue(
                format!("gateway[{i}].name"),
                format!("duplicate gateway name {n:?}; already used by gateway[{first}]"),
            ));
        } else {
            first_name.insert(n, *i);
        }
    }

    let mut vips: BTreeMap<IpAddr, (usize, &str)> = BTreeMap::new();
    for (i, g) in gateways {
        if let SourceIp::VirtualIp { ip, .. } = &g.source_ip {
            field_check(issues, &vip_key(*i), check_unicast(ip));
            if let Some((first, name)) = vips.get(ip) {
                issues.push(issue(
                    vip_key(*i),
                    format!(
                        "{ip} is already the VIP of gateway {name:?} (gateway[{first}]); two gateways cannot share one VIP"
                    ),
                ));
            } else {
                vips.insert(*ip, (*i, g.name.as_str()));
            }
        }
    }
    for (i, g) in gateways {
        let Some(nh) = &g.next_hop else { continue };
        let key = format!("gateway[{i}].next_hop.ip");
        field_check(issues, &key, check_unicast(&nh.ip));
        if let Some((j, name)) = vips.get(&nh.ip) {
            let whose = if j == i {
                "this gateway's own VIP".to_string()
            } else {
                format!("the VIP of gateway {name:?} (gateway[{j}])")
            };
            issues.push(issue(
                key,
                format!(
                    "{} is {whose}; the next hop must be a different address",
                    nh.ip
                ),
            ));
        }
    }

    let mut first_policy: BTreeMap<&str, usize> = BTreeMap::new();
    let mut defined: Vec<&str> = gateway_names.iter().map(|(_, n)| n.as_str()).collect();
    defined.sort_unstable();
    defined.dedup();
    for h in policy_headers {
        let key = format!("policy[{}]", h.index);
        if let Some(name) = h.name {
            if let Some(first) = first_policy.get(name) {
                issues.push(issue(
                    sub(&key, "name"),
                    format!("duplicate policy name {name:?}; already used by policy[{first}]"),
                ));
            } else {
                first_policy.insert(name, h.index);
            }
        }
        if let Some(gw) = h.gateway_name
            && !defined.contains(&gw)
        {
            let known = if defined.is_empty() {
                "no gateways are defined".to_string()
            } else {
                format!("defined gateways: {}", defined.join(", "))
            };
            issues.push(issue(
                sub(&key, "egress_gateway_name"),
                format!("no gateway named {gw:?}; {known}"),
            ));
        }
    }
    for (i, p) in policies {
        let key = format!("policy[{i}]");
        if p.source_cidrs.is_empty() {
            issues.push(issue(
                sub(&key, "source_cidrs"),
                "must not be empty; list at least one CIDR",
            ));
        }
        if p.destination_cidrs.is_empty() {
            issues.push(issue(
                sub(&key, "destination_cidrs"),
                "must not be empty; list at least one CIDR (0.0.0.0/0 or ::/0 for everything)",
            ));
        }
        let traffic = policy_families(issues, &key, p);
        let gateway = gateways
            .iter()
            .find(|(_, g)| g.name == p.egress_gateway_name)
            .map(|(j, g)| (*j, *g));
        if let Some((j, g)) = gateway {
            match &g.source_ip {
                SourceIp::PrimaryIp { .. } if traffic.contains("IPv6") => issues.push(issue(
                    sub(&key, "egress_gateway_name"),
                    format!(
                        "gateway {:?} (gateway[{j}]) uses mode \"{PRIMARY_MODE}\", which SNATs to the interface's primary IPv4 address only, but this policy matches IPv6 traffic; use a gateway with an IPv6 VirtualIPAddress for it",
                        g.name
                    ),
                )),
                SourceIp::VirtualIp { ip, .. } => {
                    let vip_family = family(ip);
                    for f in &traffic {
                        if *f != vip_family {
                            issues.push(issue(
                                sub(&key, "egress_gateway_name"),
                                format!(
                                    "gateway {:?} (gateway[{j}]) has the {vip_family} VIP {ip}, but this policy matches {f} traffic, which cannot be SNATed to it; use a gateway with an {f} VIP for that traffic",
                                    g.name
                                ),
                            ));
                        }
                    }
                }
                SourceIp::PrimaryIp { .. } => {}
            }
        }
    }
}

/// Reports CIDRs whose family cannot match anything and returns the families of the traffic the
/// policy can actually match (a source and a destination of the same family).
fn policy_families(issues: &mut Vec<Issue>, key: &str, p: &Policy) -> BTreeSet<&'static str> {
    let src: BTreeSet<&str> = p.source_cidrs.iter().map(net_family).collect();
    let dst: BTreeSet<&str> = p.destination_cidrs.iter().map(net_family).collect();
    let traffic: BTreeSet<&'static str> = src.intersection(&dst).copied().collect();
    if src.is_empty() || dst.is_empty() {
        return traffic;
    }
    if traffic.is_empty() {
        let s = src.iter().copied().collect::<Vec<_>>().join("/");
        let d = dst.iter().copied().collect::<Vec<_>>().join("/");
        issues.push(issue(
            sub(key, "destination_cidrs"),
            format!(
                "source_cidrs are all {s} but destination_cidrs are all {d}; a packet's source and destination have the same address family, so this policy matches nothing"
            ),
        ));
        return traffic;
    }
    for (field, list, other, other_name) in [
        ("source_cidrs", &p.source_cidrs, &dst, "destination_cidrs"),
        (
            "destination_cidrs",
            &p.destination_cidrs,
            &src,
            "source_cidrs",
        ),
    ] {
        for (j, n) in list.iter().enumerate() {
            let f = net_family(n);
            if !other.contains(f) {
                issues.push(issue(
                    format!("{key}.{field}[{j}]"),
                    format!("{n} is {f}, but no {other_name} are {f}, so it matches nothing"),
                ));
            }
        }
    }
    for (j, n) in p.excluded_cidrs.iter().enumerate() {
        let f = net_family(n);
        if !traffic.contains(f) {
            issues.push(issue(
                format!("{key}.excluded_cidrs[{j}]"),
                format!("{n} is {f}, but the policy matches no {f} traffic (no {f} destination_cidrs with {f} source_cidrs), so excluding it has no effect"),
            ));
        }
    }
    traffic
}

fn check_unicast(ip: &IpAddr) -> Result<(), String> {
    let bad = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback() || v6.is_multicast(),
    };
    if bad {
        Err(format!(
            "{ip} is not a usable unicast address; expected an address on the gateway's network, such as 198.18.0.50"
        ))
    } else {
        Ok(())
    }
}

fn check_interface_list<'a>(
    issues: &mut Vec<Issue>,
    key: &str,
    names: impl Iterator<Item = (usize, &'a str)>,
) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut any = false;
    for (j, n) in names {
        any = true;
        let k = format!("{key}[{j}]");
        if let Err(m) = check_interface_name(n) {
            issues.push(issue(k, m));
        } else if let Some(first) = seen.get(n) {
            issues.push(issue(
                k,
                format!("interface {n:?} is listed twice (also at {key}[{first}])"),
            ));
        } else {
            seen.insert(n, j);
        }
    }
    if !any {
        issues.push(issue(
            key,
            "must not be empty; list the interface(s) to hold the VIP on, e.g. [\"eth1\"]",
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Field rules
// ---------------------------------------------------------------------------------------------

/// Node, gateway and policy names end up in logs, metrics labels and file names.
fn check_object_name(name: &str) -> Result<(), String> {
    let expected = "expected 1 to 63 characters from A-Z, a-z, 0-9, '.', '_' and '-'";
    if name.is_empty() {
        return Err(format!("must not be empty; {expected}"));
    }
    if name.len() > 63 {
        return Err(format!(
            "{name:?} is {} characters long; {expected}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("{name:?} contains {c:?}; {expected}"));
    }
    Ok(())
}

/// The kernel's rules (`dev_valid_name`): 1 to 15 bytes, no '/', no whitespace, not "." or "..".
fn check_interface_name(name: &str) -> Result<(), String> {
    let expected = "expected a Linux interface name: 1 to 15 bytes, no '/' and no whitespace, such as \"eth1\"";
    if name.is_empty() {
        return Err(format!("must not be empty; {expected}"));
    }
    if name.len() > 15 {
        return Err(format!("{name:?} is {} bytes long; {expected}", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "{name:?} is not a valid interface name; {expected}"
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c == '\0')
    {
        return Err(format!(
            "{name:?} contains '/', whitespace or NUL; {expected}"
        ));
    }
    Ok(())
}

fn check_nft_identifier(name: &str) -> Result<(), String> {
    let ok = name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid nftables table name; expected a letter followed by up to 62 letters, digits or '_', such as \"egressd\""
        ))
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let expected = "expected an IPv4 or IPv6 address such as 198.18.0.50";
    match IpAddr::from_str(s.trim()) {
        Ok(ip) if s.trim() == s => Ok(ip),
        Ok(_) => Err(format!("{s:?} has surrounding whitespace; {expected}")),
        Err(_) if s.contains('/') => Err(format!(
            "{s:?} is a CIDR, not an IP address; {expected} (without a prefix length)"
        )),
        Err(_) => Err(format!("{s:?} is not an IP address; {expected}")),
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let expected = "expected a CIDR such as 10.0.0.0/24 or fd00::/64";
    if let Ok(net) = IpNet::from_str(s) {
        return Ok(net);
    }
    if let Ok(ip) = IpAddr::from_str(s) {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        return Err(format!(
            "{s:?} has no prefix length; {expected}, or {ip}/{len} for this single address"
        ));
    }
    Err(format!("{s:?} is not a CIDR; {expected}"))
}

fn check_network_address(net: &IpNet) -> Result<(), String> {
    let trunc = net.trunc();
    if trunc.addr() == net.addr() {
        Ok(())
    } else {
        Err(format!(
            "{net} has host bits set; did you mean {trunc}? (or {}/{} for the single address)",
            net.addr(),
            net.max_prefix_len()
        ))
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let expected =
        "expected an address:port such as 10.77.0.11:7480 (IPv6 in brackets: [fd00::11]:7480)";
    if let Ok(a) = SocketAddr::from_str(s) {
        return Ok(a);
    }
    if IpAddr::from_str(s).is_ok() {
        return Err(format!("{s:?} has no port; {expected}"));
    }
    Err(format!(
        "{s:?} is not an address:port (host names are not resolved); {expected}"
    ))
}

/// The closest known key to an unknown one, when the mistake looks like a typo or a Deckhouse
/// camelCase name (`nodeSelector` → `node_selector`).
fn suggest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let u = norm(unknown);
    if let Some(k) = known.iter().find(|k| norm(k) == u) {
        return Some(k);
    }
    // Plurals and singulars: `gateways` for `gateway`, `peer` for `peers`.
    if let Some(k) = known
        .iter()
        .find(|k| u.trim_end_matches('s') == norm(k).trim_end_matches('s'))
    {
        return Some(k);
    }
    let limit = if unknown.len() <= 4 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (levenshtein(&u, &norm(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Serialization in the file's shape
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct GatewayOut<'a> {
    name: &'a str,
    node_selector: &'a Labels,
    selection: Selection,
    preempt: bool,
    source_ip: SourceIpOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_hop: Option<&'a NextHop>,
}

#[derive(Serialize)]
struct SourceIpOut<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_ip_address: Option<VipOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_ip_from_egress_gateway_node_interface: Option<PrimaryOut<'a>>,
}

#[derive(Serialize)]
struct VipOut<'a> {
    ip: IpAddr,
    interfaces: &'a [String],
}

#[derive(Serialize)]
struct PrimaryOut<'a> {
    interface_name: &'a str,
}

fn serialize_gateways<S: Serializer>(gateways: &[Gateway], s: S) -> Result<S::Ok, S::Error> {
    let out: Vec<GatewayOut<'_>> = gateways
        .iter()
        .map(|g| GatewayOut {
            name: &g.name,
            node_selector: &g.node_selector,
            selection: g.selection,
            preempt: g.preempt,
            source_ip: match &g.source_ip {
                SourceIp::VirtualIp { ip, interfaces } => SourceIpOut {
                    mode: VIP_MODE,
                    virtual_ip_address: Some(VipOut {
                        ip: *ip,
                        interfaces,
                    }),
                    primary_ip_from_egress_gateway_node_interface: None,
                },
                SourceIp::PrimaryIp { interface } => SourceIpOut {
                    mode: PRIMARY_MODE,
                    virtual_ip_address: None,
                    primary_ip_from_egress_gateway_node_interface: Some(PrimaryOut {
                        interface_name: interface,
                    }),
                },
            },
            next_hop: g.next_hop.as_ref(),
        })
        .collect();
    out.serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/egressd/egressd.toml";

    /// Enough for a valid file; tests append the part they are about.
    const BASE: &str = r#"
[node]
name = "gw1"
labels = { "node-role.deckhouse.io/egress" = "" }
"#;

    const VIP_GATEWAY: &str = r#"
[[gateway]]
name = "vip"
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = { ip = "198.18.0.50", interfaces = ["eth1"] }
"#;

    const PRIMARY_GATEWAY: &str = r#"
[[gateway]]
name = "basic"
[gateway.source_ip]
mode = "PrimaryIPFromEgressGatewayNodeInterface"
primary_ip_from_egress_gateway_node_interface = { interface_name = "eth1" }
"#;

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_inner(Source::File(PathBuf::from(FILE)), FILE, text, &env, &|| {
            Some("gw1".to_string())
        })
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_env(text, &[])
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse(text) {
            Ok(c) => panic!("expected errors, got a valid config: {c:#?}"),
            Err(e) => e.0,
        }
    }

    fn errors_with(parts: &[&str]) -> Vec<ConfigError> {
        errors(&parts.concat())
    }

    #[track_caller]
    fn assert_error(errs: &[ConfigError], key: &str, fragment: &str) {
        assert!(
            errs.iter()
                .any(|e| e.key == key && e.message.contains(fragment) && e.file == FILE),
            "no error at {key:?} containing {fragment:?}; got:\n{}",
            ConfigErrors(errs.to_vec())
        );
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    // ---- valid input ----

    #[test]
    fn every_example_config_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let no_env: [(String, String); 0] = [];
            if let Err(e) = load_with_env(&path, no_env) {
                panic!("{} does not validate:\n{e}", path.display());
            }
            n += 1;
        }
        assert!(n >= 5, "expected the five example configs, found {n}");
    }

    #[test]
    fn contract_example_is_read_as_written() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egressd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(c.node.name, "gw1");
        assert_eq!(
            c.node.labels.get("node-role.deckhouse.io/egress"),
            Some(&String::new())
        );
        assert_eq!(c.cluster.listen, "10.77.0.11:7480".parse().unwrap());
        assert_eq!(c.cluster.peers.len(), 3);
        assert_eq!(c.cluster.peers[2].name, "gw3");
        assert_eq!(c.voters().len(), 3);
        assert_eq!(c.admin.listen, "127.0.0.1:7481".parse().unwrap());
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(
            c.gateways[0].source_ip,
            SourceIp::VirtualIp {
                ip: "198.18.0.50".parse().unwrap(),
                interfaces: vec!["eth1".to_string()]
            }
        );
        assert_eq!(
            c.gateways[0].next_hop,
            Some(NextHop {
                ip: "10.77.0.1".parse().unwrap(),
                interface: "eth0".to_string()
            })
        );
        assert_eq!(
            c.gateways[1].source_ip,
            SourceIp::PrimaryIp {
                interface: "eth1".to_string()
            }
        );
        assert_eq!(c.policies[0].egress_gateway_name, "my-egressgw");
        assert_eq!(
            c.policies[0].destination_cidrs,
            vec!["0.0.0.0/0".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = ok("");
        assert_eq!(c.node.name, "gw1", "node.name defaults to the host name");
        assert!(c.node.labels.is_empty());
        assert_eq!(c.cluster, ClusterConfig::default());
        assert_eq!(c.cluster.listen, "0.0.0.0:7480".parse().unwrap());
        assert_eq!(c.cluster.data_dir, PathBuf::from("/var/lib/egressd"));
        assert_eq!(c.admin.listen, "127.0.0.1:7481".parse().unwrap());
        assert_eq!(c.admin.token_file, None);
        assert_eq!(c.dataplane, DataplaneConfig::default());
        assert_eq!(c.dataplane.garp_count, 5);
        assert_eq!(c.log, LogConfig::default());
        assert!(c.gateways.is_empty() && c.policies.is_empty());
        assert_eq!(
            c.voters(),
            vec![Peer {
                name: "gw1".to_string(),
                address: c.cluster.listen
            }]
        );
    }

    #[test]
    fn gateway_defaults() {
        let c = ok(&[BASE, VIP_GATEWAY].concat());
        let g = &c.gateways[0];
        assert!(g.node_selector.is_empty());
        assert_eq!(g.selection, Selection::Alphabetical);
        assert!(g.preempt);
        assert_eq!(g.next_hop, None);
    }

    #[test]
    fn interface_names_may_contain_colons() {
        let text = [BASE, VIP_GATEWAY]
            .concat()
            .replace("[\"eth1\"]", "[\"eth1:0\"]");
        let c = ok(&text);
        let SourceIp::VirtualIp { interfaces, .. } = &c.gateways[0].source_ip else {
            panic!("not a VIP gateway");
        };
        assert_eq!(interfaces, &vec!["eth1:0".to_string()]);
    }

    #[test]
    fn ipv6_policy_with_ipv6_vip_is_accepted() {
        ok(&[
            BASE,
            &VIP_GATEWAY.replace("198.18.0.50", "2001:db8::50"),
            r#"
[[policy]]
name = "v6"
egress_gateway_name = "vip"
source_cidrs = ["fd00::/64"]
destination_cidrs = ["::/0"]
excluded_cidrs = ["2001:db8:1::/48"]
"#,
        ]
        .concat());
    }

    #[test]
    fn effective_config_serializes_back_to_the_file_shape() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egressd.toml");
        let original = parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let figment = Figment::from(figment::providers::Serialized::defaults(&original));
        let root = figment.find_value("").unwrap();
        let mut walker = Walker {
            figment: &figment,
            issues: Vec::new(),
        };
        let again = walker.config(&root, &|| None);
        assert_eq!(walker.issues, vec![]);
        assert_eq!(again, Some(original));
    }

    // ---- sources ----

    #[test]
    fn missing_file_names_the_path() {
        let path = Path::new("/nonexistent/egressd-test/egressd.toml");
        let no_env: [(String, String); 0] = [];
        let e = load_with_env(path, no_env).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e.0[0].file, path.display().to_string());
        assert!(e.0[0].message.contains("cannot read"), "{e}");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/egressd-test/egressd.toml: ")
        );
    }

    #[test]
    fn toml_syntax_error_names_the_file_and_line() {
        let e = errors("[node]\nname = \"gw1\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].file, FILE);
        assert!(e[0].message.contains("not valid TOML"), "{}", e[0]);
        assert!(e[0].message.contains("line 2"), "{}", e[0]);
    }

    #[test]
    fn environment_overrides_single_keys() {
        let c = parse_env(
            BASE,
            &[
                ("EGRESSD_ADMIN__LISTEN", "127.0.0.1:9000"),
                ("EGRESSD_NODE__NAME", "gw2"),
                ("EGRESSD_DATAPLANE__GARP_COUNT", "7"),
                ("EGRESSD_DATAPLANE__MANAGE_FORWARDING", "true"),
                ("EGRESSD_LOG__FORMAT", "json"),
                ("EGRESSD_ADMIN__TOKEN_FILE", "/run/token"),
                // Not config keys: no `__` after the prefix, or another prefix.
                ("EGRESSD_E2E", "1"),
                ("EGRESSD_CONFIG", "/tmp/x.toml"),
                ("PATH", "/usr/bin"),
                ("NODE__NAME", "nope"),
            ],
        )
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.node.name, "gw2");
        assert_eq!(c.node.labels.len(), 1, "the file's other node keys stay");
        assert_eq!(c.dataplane.garp_count, 7);
        assert!(c.dataplane.manage_forwarding);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.admin.token_file, Some(PathBuf::from("/run/token")));
    }

    #[test]
    fn environment_can_set_tables_and_arrays() {
        let c = parse_env(
            BASE,
            &[
                ("EGRESSD_NODE__LABELS", "{zone=a}"),
                ("EGRESSD_NODE__NAME", "007"),
            ],
        )
        .unwrap();
        assert_eq!(c.node.labels.get("zone"), Some(&"a".to_string()));
        assert_eq!(
            c.node.name, "007",
            "scalars from the environment stay strings"
        );
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let e = parse_env(
            BASE,
            &[
                ("EGRESSD_ADMIN__LISTEN", "localhost"),
                ("EGRESSD_ADMIN__LISTN", "127.0.0.1:1"),
                ("EGRESSD_DATAPLANE__GARP_COUNT", "many"),
            ],
        )
        .unwrap_err()
        .0;
        let find = |key: &str| {
            e.iter()
                .find(|x| x.key == key)
                .unwrap_or_else(|| panic!("no error at {key}: {e:?}"))
        };
        assert_eq!(
            find("admin.listen").file,
            "environment variable EGRESSD_ADMIN__LISTEN"
        );
        assert_eq!(
            find("admin.listn").file,
            "environment variable EGRESSD_ADMIN__LISTN"
        );
        assert!(
            find("admin.listn")
                .message
                .contains("did you mean `listen`")
        );
        assert_eq!(
            find("dataplane.garp_count").file,
            "environment variable EGRESSD_DATAPLANE__GARP_COUNT"
        );
        assert!(
            find("dataplane.garp_count")
                .message
                .contains("not an integer")
        );
    }

    // ---- unknown keys and types ----

    #[test]
    fn unknown_keys_are_reported_at_every_level() {
        let e = errors(
            r#"
colour = "blue"
[node]
name = "gw1"
lables = {}
[cluster]
listen = "10.77.0.11:7480"
peer = []
peers = [{ name = "gw1", address = "10.77.0.11:7480", weight = 1 }]
[admin]
listen = "127.0.0.1:7481"
token = "x"
[dataplane]
garp_cont = 3
[log]
levle = "debug"
[[gateway]]
name = "a"
nodeSelector = {}
[gateway.source_ip]
mode = "VirtualIPAddress"
extra = 1
virtual_ip_address = { ip = "198.18.0.50", interfaces = ["eth1"], prefix = 24 }
[gateway.next_hop]
ip = "10.77.0.1"
interface = "eth0"
iface = "eth0"
[[gateway]]
name = "b"
[gateway.source_ip]
mode = "PrimaryIPFromEgressGatewayNodeInterface"
primary_ip_from_egress_gateway_node_interface = { interfaceName = "eth1" }
[[policy]]
name = "p"
egress_gateway_name = "a"
source_cidrs = ["10.0.0.0/8"]
destination_cidrs = ["0.0.0.0/0"]
destinationCIDRs = []
"#,
        );
        assert_error(&e, "colour", "unknown key");
        assert_error(&e, "node.lables", "did you mean `labels`");
        assert_error(&e, "cluster.peer", "did you mean `peers`");
        assert_error(&e, "cluster.peers[0].weight", "unknown key");
        assert_error(&e, "admin.token", "unknown key");
        assert_error(&e, "dataplane.garp_cont", "did you mean `garp_count`");
        assert_error(&e, "log.levle", "did you mean `level`");
        assert_error(
            &e,
            "gateway[0].nodeSelector",
            "did you mean `node_selector`",
        );
        assert_error(&e, "gateway[0].source_ip.extra", "unknown key");
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.prefix",
            "known keys here: ip, interfaces",
        );
        assert_error(&e, "gateway[0].next_hop.iface", "unknown key");
        assert_error(
            &e,
            "gateway[1].source_ip.primary_ip_from_egress_gateway_node_interface.interfaceName",
            "did you mean `interface_name`",
        );
        assert_error(
            &e,
            "policy[0].destinationCIDRs",
            "did you mean `destination_cidrs`",
        );
    }

    #[test]
    fn wrong_types_are_reported_without_stopping() {
        let e = errors(
            r#"
gateway = "x"
[node]
name = 5
labels = { a = 1 }
[cluster]
peers = "gw1"
[dataplane]
garp_count = "5"
manage_forwarding = "yes"
[[policy]]
name = "p"
egress_gateway_name = "x"
source_cidrs = "10.0.0.0/8"
destination_cidrs = [1]
"#,
        );
        assert_error(&e, "gateway", "expected an array of tables");
        assert_error(&e, "node.name", "found the integer 5");
        assert_error(&e, "node.labels.a", "label values are strings");
        assert_error(&e, "cluster.peers", "expected an array");
        assert_error(&e, "dataplane.garp_count", "found the string \"5\"");
        assert_error(&e, "dataplane.manage_forwarding", "expected true or false");
        assert_error(&e, "policy[0].source_cidrs", "expected an array");
        assert_error(
            &e,
            "policy[0].destination_cidrs[0]",
            "expected a CIDR string",
        );
    }

    #[test]
    fn unquoted_dotted_label_key_gets_a_hint() {
        let e =
            errors("[node]\nname = \"gw1\"\nlabels = { node-role.deckhouse.io/egress = \"\" }\n");
        // `/` is not allowed in a bare key, so this is a TOML syntax error; the dotted form
        // without the slash becomes a nested table.
        assert_eq!(e.len(), 1);
        let e = errors("[node]\nname = \"gw1\"\nlabels = { egress.example = \"\" }\n");
        assert_error(&e, "node.labels.egress", "quote label keys");
    }

    // ---- addresses ----

    #[test]
    fn malformed_vip_is_reported_with_file_key_and_expectation() {
        let e = errors_with(&[BASE, &VIP_GATEWAY.replace("198.18.0.50", "198.18.0.500")]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.ip",
            "\"198.18.0.500\" is not an IP address; expected an IPv4 or IPv6 address such as 198.18.0.50",
        );
        assert_eq!(
            e[0].to_string(),
            "/etc/egressd/egressd.toml: gateway[0].source_ip.virtual_ip_address.ip: \"198.18.0.500\" is not an IP address; expected an IPv4 or IPv6 address such as 198.18.0.50"
        );
    }

    #[test]
    fn vip_given_as_cidr_is_reported() {
        let e = errors_with(&[BASE, &VIP_GATEWAY.replace("198.18.0.50", "198.18.0.50/24")]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.ip",
            "is a CIDR, not an IP address",
        );
    }

    #[test]
    fn unusable_vip_is_reported() {
        let e = errors_with(&[BASE, &VIP_GATEWAY.replace("198.18.0.50", "0.0.0.0")]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.ip",
            "not a usable unicast address",
        );
    }

    #[test]
    fn malformed_cidrs_are_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            r#"
[[policy]]
name = "p"
egress_gateway_name = "vip"
source_cidrs = ["10.0.0.0/8", "10.1.0.0/16", "10.0.0.1/24"]
destination_cidrs = ["0.0.0.0/33", "8.8.8.8", "banana"]
excluded_cidrs = ["192.168.1.1/16"]
"#,
        ]);
        assert_error(
            &e,
            "policy[0].source_cidrs[2]",
            "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?",
        );
        assert_error(&e, "policy[0].destination_cidrs[0]", "is not a CIDR");
        assert_error(&e, "policy[0].destination_cidrs[1]", "no prefix length");
        assert_error(&e, "policy[0].destination_cidrs[1]", "8.8.8.8/32");
        assert_error(
            &e,
            "policy[0].destination_cidrs[2]",
            "\"banana\" is not a CIDR",
        );
        assert_error(
            &e,
            "policy[0].excluded_cidrs[0]",
            "did you mean 192.168.0.0/16?",
        );
    }

    #[test]
    fn duplicate_cidr_in_a_list_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            "[[policy]]\nname = \"p\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
        ]);
        assert_error(&e, "policy[0].source_cidrs[1]", "listed twice");
    }

    #[test]
    fn malformed_socket_addresses_are_reported() {
        let e = errors(
            r#"
[node]
name = "gw1"
[cluster]
listen = "10.77.0.11"
peers = [{ name = "gw1", address = "gw1.example:7480" }]
[admin]
listen = "127.0.0.1:99999"
"#,
        );
        assert_error(&e, "cluster.listen", "has no port");
        assert_error(
            &e,
            "cluster.peers[0].address",
            "host names are not resolved",
        );
        assert_error(&e, "admin.listen", "is not an address:port");
    }

    // ---- address families ----

    fn policy(src: &str, dst: &str, excl: &str, gateway: &str) -> String {
        format!(
            "[[policy]]\nname = \"p\"\negress_gateway_name = \"{gateway}\"\nsource_cidrs = [{src}]\ndestination_cidrs = [{dst}]\nexcluded_cidrs = [{excl}]\n"
        )
    }

    #[test]
    fn policy_with_no_common_family_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &policy("\"10.0.0.0/8\"", "\"::/0\"", "", "vip"),
        ]);
        assert_error(
            &e,
            "policy[0].destination_cidrs",
            "source_cidrs are all IPv4 but destination_cidrs are all IPv6",
        );
    }

    #[test]
    fn lone_cidr_of_an_unmatched_family_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &policy("\"10.0.0.0/8\", \"fd00::/64\"", "\"0.0.0.0/0\"", "", "vip"),
        ]);
        assert_error(
            &e,
            "policy[0].source_cidrs[1]",
            "fd00::/64 is IPv6, but no destination_cidrs are IPv6",
        );
    }

    #[test]
    fn excluded_cidr_of_a_family_without_destination_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &policy(
                "\"10.0.0.0/8\"",
                "\"0.0.0.0/0\"",
                "\"10.0.0.0/8\", \"fd00::/8\"",
                "vip",
            ),
        ]);
        assert_error(
            &e,
            "policy[0].excluded_cidrs[1]",
            "fd00::/8 is IPv6, but the policy matches no IPv6 traffic",
        );
        assert!(!e.iter().any(|x| x.key == "policy[0].excluded_cidrs[0]"));
    }

    #[test]
    fn ipv6_policy_on_primary_ip_gateway_is_reported() {
        let e = errors_with(&[
            BASE,
            PRIMARY_GATEWAY,
            &policy("\"fd00::/64\"", "\"::/0\"", "", "basic"),
        ]);
        assert_error(
            &e,
            "policy[0].egress_gateway_name",
            "SNATs to the interface's primary IPv4 address only",
        );
    }

    #[test]
    fn ipv6_traffic_on_ipv4_vip_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &policy("\"fd00::/64\"", "\"::/0\"", "", "vip"),
        ]);
        assert_error(
            &e,
            "policy[0].egress_gateway_name",
            "has the IPv4 VIP 198.18.0.50, but this policy matches IPv6 traffic",
        );
    }

    #[test]
    fn ipv4_traffic_on_ipv6_vip_is_reported() {
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("198.18.0.50", "2001:db8::50"),
            &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "vip"),
        ]);
        assert_error(
            &e,
            "policy[0].egress_gateway_name",
            "has the IPv6 VIP 2001:db8::50, but this policy matches IPv4 traffic",
        );
    }

    #[test]
    fn dual_stack_policy_on_single_family_vip_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &policy(
                "\"10.0.0.0/8\", \"fd00::/64\"",
                "\"0.0.0.0/0\", \"::/0\"",
                "",
                "vip",
            ),
        ]);
        assert_error(&e, "policy[0].egress_gateway_name", "matches IPv6 traffic");
        assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
    }

    #[test]
    fn empty_cidr_lists_are_reported() {
        let e = errors_with(&[BASE, VIP_GATEWAY, &policy("", "", "", "vip")]);
        assert_error(&e, "policy[0].source_cidrs", "must not be empty");
        assert_error(&e, "policy[0].destination_cidrs", "must not be empty");
    }

    #[test]
    fn missing_policy_keys_are_reported() {
        let e = errors_with(&[BASE, "[[policy]]\nexcluded_cidrs = []\n"]);
        assert_error(&e, "policy[0].name", "missing");
        assert_error(&e, "policy[0].egress_gateway_name", "missing");
        assert_error(&e, "policy[0].source_cidrs", "missing");
        assert_error(&e, "policy[0].destination_cidrs", "missing");
    }

    // ---- duplicates and references ----

    #[test]
    fn duplicate_gateway_and_policy_names_are_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &VIP_GATEWAY.replace("198.18.0.50", "198.18.0.51"),
            &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "vip"),
            &policy("\"10.1.0.0/16\"", "\"0.0.0.0/0\"", "", "vip"),
        ]);
        assert_error(
            &e,
            "gateway[1].name",
            "duplicate gateway name \"vip\"; already used by gateway[0]",
        );
        assert_error(
            &e,
            "policy[1].name",
            "duplicate policy name \"p\"; already used by policy[0]",
        );
    }

    #[test]
    fn duplicate_peer_names_and_addresses_are_reported() {
        let e = errors(
            r#"
[node]
name = "gw1"
[cluster]
peers = [
  { name = "gw1", address = "10.77.0.11:7480" },
  { name = "gw1", address = "10.77.0.12:7480" },
  { name = "gw3", address = "10.77.0.11:7480" },
  { name = "gw4", address = "0.0.0.0:7480" },
]
"#,
        );
        assert_error(
            &e,
            "cluster.peers[1].name",
            "duplicate peer name \"gw1\"; already used by cluster.peers[0]",
        );
        assert_error(
            &e,
            "cluster.peers[2].address",
            "duplicate peer address 10.77.0.11:7480",
        );
        assert_error(&e, "cluster.peers[3].address", "cannot be connected to");
    }

    #[test]
    fn policy_naming_a_missing_gateway_lists_the_gateways() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            PRIMARY_GATEWAY,
            &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "nope"),
        ]);
        assert_error(
            &e,
            "policy[0].egress_gateway_name",
            "no gateway named \"nope\"; defined gateways: basic, vip",
        );
        let e = errors_with(&[BASE, &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "nope")]);
        assert_error(
            &e,
            "policy[0].egress_gateway_name",
            "no gateways are defined",
        );
    }

    #[test]
    fn policy_of_a_broken_gateway_is_not_called_dangling() {
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("198.18.0.50", "nope"),
            &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "vip"),
        ]);
        assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
    }

    #[test]
    fn shared_vip_names_both_gateways() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            &VIP_GATEWAY.replace("name = \"vip\"", "name = \"vip2\""),
        ]);
        assert_error(
            &e,
            "gateway[1].source_ip.virtual_ip_address.ip",
            "198.18.0.50 is already the VIP of gateway \"vip\" (gateway[0]); two gateways cannot share one VIP",
        );
    }

    #[test]
    fn next_hop_equal_to_a_vip_is_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            "[gateway.next_hop]\nip = \"198.18.0.50\"\ninterface = \"eth0\"\n",
        ]);
        assert_error(&e, "gateway[0].next_hop.ip", "this gateway's own VIP");
    }

    #[test]
    fn next_hop_needs_both_keys() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            "[gateway.next_hop]\nip = \"10.77.0.1\"\n",
        ]);
        assert_error(&e, "gateway[0].next_hop.interface", "missing");
    }

    // ---- source_ip modes ----

    #[test]
    fn missing_mode_is_reported() {
        let e = errors_with(&[
            BASE,
            "[[gateway]]\nname = \"g\"\n[gateway.source_ip]\nvirtual_ip_address = { ip = \"198.18.0.50\", interfaces = [\"eth1\"] }\n",
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.mode",
            "missing; expected \"VirtualIPAddress\" or \"PrimaryIPFromEgressGatewayNodeInterface\"",
        );
    }

    #[test]
    fn missing_source_ip_is_reported() {
        let e = errors_with(&[BASE, "[[gateway]]\nname = \"g\"\n"]);
        assert_error(&e, "gateway[0].source_ip", "missing");
    }

    #[test]
    fn unknown_mode_lists_the_valid_ones() {
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("mode = \"VirtualIPAddress\"", "mode = \"VirtualIP\""),
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.mode",
            "unknown mode \"VirtualIP\"; expected \"VirtualIPAddress\" or \"PrimaryIPFromEgressGatewayNodeInterface\"",
        );
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("mode = \"VirtualIPAddress\"", "mode = \"virtualipaddress\""),
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.mode",
            "did you mean \"VirtualIPAddress\"",
        );
    }

    #[test]
    fn mode_without_its_settings_is_reported() {
        let e = errors_with(&[
            BASE,
            "[[gateway]]\nname = \"g\"\n[gateway.source_ip]\nmode = \"VirtualIPAddress\"\n",
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address",
            "missing; mode \"VirtualIPAddress\" needs its settings",
        );
        let e = errors_with(&[
            BASE,
            "[[gateway]]\nname = \"g\"\n[gateway.source_ip]\nmode = \"PrimaryIPFromEgressGatewayNodeInterface\"\n",
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.primary_ip_from_egress_gateway_node_interface",
            "missing; mode \"PrimaryIPFromEgressGatewayNodeInterface\" needs its settings",
        );
    }

    #[test]
    fn settings_of_the_other_mode_are_reported() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            "primary_ip_from_egress_gateway_node_interface = { interface_name = \"eth1\" }\n",
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.primary_ip_from_egress_gateway_node_interface",
            "belongs to mode \"PrimaryIPFromEgressGatewayNodeInterface\", but mode is \"VirtualIPAddress\"",
        );
    }

    #[test]
    fn empty_and_duplicate_interfaces_are_reported() {
        let e = errors_with(&[BASE, &VIP_GATEWAY.replace("[\"eth1\"]", "[]")]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.interfaces",
            "must not be empty",
        );
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("[\"eth1\"]", "[\"eth1\", \"eth2\", \"eth1\"]"),
        ]);
        assert_error(
            &e,
            "gateway[0].source_ip.virtual_ip_address.interfaces[2]",
            "\"eth1\" is listed twice (also at gateway[0].source_ip.virtual_ip_address.interfaces[0])",
        );
    }

    #[test]
    fn invalid_interface_names_are_reported_everywhere() {
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace(
                "[\"eth1\"]",
                "[\"a-very-long-interface-name\", \"eth/1\", \"..\", \"eth 1\", \"\"]",
            ),
            "[gateway.next_hop]\nip = \"10.77.0.1\"\ninterface = \"bond0/x\"\n",
            &PRIMARY_GATEWAY.replace("\"eth1\"", "\"\""),
        ]);
        let k = "gateway[0].source_ip.virtual_ip_address.interfaces";
        assert_error(&e, &format!("{k}[0]"), "is 26 bytes long");
        assert_error(&e, &format!("{k}[1]"), "contains '/'");
        assert_error(&e, &format!("{k}[2]"), "not a valid interface name");
        assert_error(&e, &format!("{k}[3]"), "whitespace");
        assert_error(&e, &format!("{k}[4]"), "must not be empty");
        assert_error(&e, "gateway[0].next_hop.interface", "contains '/'");
        assert_error(
            &e,
            "gateway[1].source_ip.primary_ip_from_egress_gateway_node_interface.interface_name",
            "must not be empty",
        );
    }

    // ---- names, enums and ranges ----

    #[test]
    fn invalid_names_are_reported() {
        let long = "p".repeat(64);
        let e = errors_with(&[
            "[node]\nname = \"gw 1\"\nlabels = { \"\" = \"x\" }\n",
            &VIP_GATEWAY.replace("name = \"vip\"", "name = \"vip!\""),
            &policy("\"10.0.0.0/8\"", "\"0.0.0.0/0\"", "", "vip!")
                .replace("name = \"p\"", &format!("name = \"{long}\"")),
            "[[gateway]]\nname = \"\"\n[gateway.source_ip]\nmode = \"PrimaryIPFromEgressGatewayNodeInterface\"\nprimary_ip_from_egress_gateway_node_interface = { interface_name = \"eth1\" }\n",
        ]);
        assert_error(&e, "node.name", "\"gw 1\" contains ' '");
        assert_error(&e, "node.labels", "a label key must not be empty");
        assert_error(&e, "gateway[0].name", "\"vip!\" contains '!'");
        assert_error(&e, "policy[0].name", "is 64 characters long");
        assert_error(&e, "gateway[1].name", "must not be empty");
    }

    #[test]
    fn unknown_selection_and_log_settings_are_reported() {
        let e = errors_with(&[
            BASE,
            "[log]\nformat = \"yaml\"\nlevel = \"egressd=loud\"\n",
            &VIP_GATEWAY.replace(
                "name = \"vip\"",
                "name = \"vip\"\nselection = \"random\"\npreempt = \"no\"",
            ),
        ]);
        assert_error(
            &e,
            "log.format",
            "unknown format \"yaml\"; expected \"text\" or \"json\"",
        );
        assert_error(&e, "log.level", "is not a valid log filter");
        assert_error(
            &e,
            "gateway[0].selection",
            "unknown selection \"random\"; expected \"alphabetical\" (the default) or \"spread\"",
        );
        assert_error(&e, "gateway[0].preempt", "expected true or false");
    }

    #[test]
    fn dataplane_ranges_are_checked() {
        let e = errors_with(&[
            BASE,
            "[dataplane]\nnft_table = \"1egress-d\"\ngarp_count = 0\ngarp_interval_ms = 10001\ngarp_refresh_secs = -1\n",
        ]);
        assert_error(&e, "dataplane.nft_table", "not a valid nftables table name");
        assert_error(
            &e,
            "dataplane.garp_count",
            "0 is out of range; expected an integer between 1 and 100",
        );
        assert_error(
            &e,
            "dataplane.garp_interval_ms",
            "10001 is out of range; expected an integer between 0 and 10000 milliseconds",
        );
        assert_error(&e, "dataplane.garp_refresh_secs", "-1 is out of range");
        let e = errors_with(&[
            BASE,
            "[dataplane]\ngarp_count = 101\ngarp_interval_ms = 1.5\n",
        ]);
        assert_error(&e, "dataplane.garp_count", "101 is out of range");
        assert_error(&e, "dataplane.garp_interval_ms", "found the number 1.5");
        let c = ok(&[
            BASE,
            "[dataplane]\ngarp_count = 100\ngarp_interval_ms = 0\nmanage_forwarding = true\n",
        ]
        .concat());
        assert_eq!(
            (c.dataplane.garp_count, c.dataplane.garp_interval_ms),
            (100, 0)
        );
    }

    // ---- membership ----

    #[test]
    fn node_must_be_among_its_peers() {
        let e = errors(
            "[node]\nname = \"gw4\"\n[cluster]\npeers = [{ name = \"gw1\", address = \"10.77.0.11:7480\" }, { name = \"gw2\", address = \"10.77.0.12:7480\" }]\n",
        );
        assert_error(
            &e,
            "node.name",
            "\"gw4\" is not among cluster.peers (gw1, gw2)",
        );
    }

    #[test]
    fn hostname_default_must_be_among_peers_too() {
        // The test host name is "gw1".
        let e = errors("[cluster]\npeers = [{ name = \"gw2\", address = \"10.77.0.12:7480\" }]\n");
        assert_error(&e, "node.name", "\"gw1\" is not among cluster.peers (gw2)");
    }

    #[test]
    fn listen_must_match_own_peer_address() {
        let e = errors(
            "[node]\nname = \"gw1\"\n[cluster]\nlisten = \"10.77.0.99:7480\"\npeers = [{ name = \"gw1\", address = \"10.77.0.11:7480\" }]\n",
        );
        assert_error(
            &e,
            "cluster.listen",
            "does not match this node's own entry in cluster.peers (gw1 = 10.77.0.11:7480)",
        );
        let e = errors(
            "[node]\nname = \"gw1\"\n[cluster]\nlisten = \"0.0.0.0:7490\"\npeers = [{ name = \"gw1\", address = \"10.77.0.11:7480\" }]\n",
        );
        assert_error(&e, "cluster.listen", "does not match");
        ok(
            "[node]\nname = \"gw1\"\n[cluster]\nlisten = \"0.0.0.0:7480\"\npeers = [{ name = \"gw1\", address = \"10.77.0.11:7480\" }]\n",
        );
    }

    // ---- everything at once ----

    #[test]
    fn several_errors_are_all_reported() {
        let e = errors(
            r#"
[node]
name = "gw 1"
[cluster]
listen = "nope"
[admin]
listen = "127.0.0.1"
[dataplane]
garp_count = 0
[log]
format = "xml"
[[gateway]]
name = "a"
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = { ip = "198.18.0.500", interfaces = [] }
[[gateway]]
name = "b"
[gateway.source_ip]
mode = "Bogus"
[[policy]]
name = "p"
egress_gateway_name = "missing"
source_cidrs = ["10.0.0.1/24"]
destination_cidrs = []
bogus = true
"#,
        );
        let expected = [
            "node.name",
            "cluster.listen",
            "admin.listen",
            "dataplane.garp_count",
            "log.format",
            "gateway[0].source_ip.virtual_ip_address.ip",
            "gateway[0].source_ip.virtual_ip_address.interfaces",
            "gateway[1].source_ip.mode",
            "policy[0].bogus",
            "policy[0].source_cidrs[0]",
            "policy[0].destination_cidrs",
            "policy[0].egress_gateway_name",
        ];
        for key in expected {
            assert!(
                e.iter().any(|x| x.key == key),
                "no error at {key}; got:\n{}",
                ConfigErrors(e.clone())
            );
        }
        assert_eq!(e.len(), expected.len(), "{}", ConfigErrors(e.clone()));
        let shown = ConfigErrors(e).to_string();
        assert_eq!(shown.lines().count(), expected.len());
        assert!(shown.lines().all(|l| l.starts_with(FILE)));
    }

    // ---- objects from elsewhere ----

    #[test]
    fn check_objects_applies_the_same_rules() {
        let g = Gateway {
            name: "g".to_string(),
            node_selector: Labels::new(),
            selection: Selection::Alphabetical,
            preempt: true,
            source_ip: SourceIp::VirtualIp {
                ip: "198.18.0.50".parse().unwrap(),
                interfaces: vec!["eth1".to_string(), "eth1".to_string()],
            },
            next_hop: None,
        };
        let p = Policy {
            name: "p".to_string(),
            egress_gateway_name: "other".to_string(),
            source_cidrs: vec!["10.0.0.1/24".parse().unwrap()],
            destination_cidrs: vec![],
            excluded_cidrs: vec![],
        };
        let e = check_objects(&[g.clone(), g], &[p]);
        let keys: Vec<&str> = e.iter().map(|x| x.key.as_str()).collect();
        for key in [
            "gateway[0].source_ip.virtual_ip_address.interfaces[1]",
            "gateway[1].name",
            "gateway[1].source_ip.virtual_ip_address.ip",
            "policy[0].source_cidrs[0]",
            "policy[0].destination_cidrs",
            "policy[0].egress_gateway_name",
        ] {
            assert!(keys.contains(&key), "no error at {key}: {keys:?}");
        }
        assert!(e.iter().all(|x| x.file.is_empty()));
        assert!(check_objects(&[], &[]).is_empty());
    }

    #[test]
    fn suggestions() {
        let known = [
            "node",
            "cluster",
            "admin",
            "dataplane",
            "log",
            "gateway",
            "policy",
        ];
        assert_eq!(suggest("gateways", &known), Some("gateway"));
        assert_eq!(suggest("policies", &known), None);
        assert_eq!(suggest("clutser", &known), Some("cluster"));
        assert_eq!(suggest("completely-different", &known), None);
    }

    #[test]
    fn cluster_timing_profiles_and_overrides() {
        let c = ok(BASE);
        assert_eq!(c.cluster.profile, Profile::Default);
        assert_eq!(c.cluster.timing().failover_timeout_ms, 250);
        let c = ok(&[BASE, "[cluster]\nprofile = \"fast\"\nlease_ms = 80\n"].concat());
        let t = c.cluster.timing();
        assert_eq!(
            (t.report_interval_ms, t.lease_ms, t.failover_timeout_ms),
            (20, 80, 110)
        );
    }

    #[test]
    fn cluster_timing_must_keep_the_fencing_margin() {
        let e = errors_with(&[
            BASE,
            "[cluster]\nlease_ms = 300\nfailover_timeout_ms = 250\n",
        ]);
        assert_error(&e, "cluster.failover_timeout_ms", "must exceed lease_ms");
        let e = errors_with(&[BASE, "[cluster]\nreport_interval_ms = 200\n"]);
        assert_error(&e, "cluster.lease_ms", "must exceed report_interval_ms");
        let e = errors_with(&[BASE, "[cluster]\nheartbeat_ms = 200\n"]);
        assert_error(&e, "cluster.election_timeout_min_ms", "heartbeat");
        let e = errors_with(&[BASE, "[cluster]\nprofile = \"turbo\"\nlease_ms = 1\n"]);
        assert_error(&e, "cluster.profile", "unknown profile");
        assert_error(&e, "cluster.lease_ms", "out of range");
    }

    #[test]
    fn a_multi_node_cluster_needs_a_secret() {
        let peers = "[cluster]\npeers = [{ name = \"gw1\", address = \"10.0.0.1:7480\" }, { name = \"gw2\", address = \"10.0.0.2:7480\" }]\nlisten = \"10.0.0.1:7480\"\n";
        let e = errors_with(&[BASE, peers]);
        assert_error(&e, "cluster.secret_file", "is required");
        let c = ok(&[
            BASE,
            peers,
            "secret_file = \"/etc/egressd/cluster.secret\"\n",
        ]
        .concat());
        assert!(c.cluster.secret_file.is_some());
    }

    #[test]
    fn apply_input_takes_objects_only_and_defers_gateway_references() {
        let text = r#"
[[policy]]
name = "p"
egress_gateway_name = "committed-elsewhere"
source_cidrs = ["10.0.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
"#;
        let (g, p) = parse_objects(text, "apply.toml").unwrap();
        assert!(g.is_empty());
        assert_eq!(p[0].egress_gateway_name, "committed-elsewhere");

        let errs = parse_objects("[node]\nname = \"x\"\n", "apply.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].key, "node");
        assert_eq!(errs.0[0].file, "apply.toml");

        let errs = parse_objects("", "apply.toml").unwrap_err();
        assert!(errs.to_string().contains("nothing to apply"), "{errs}");

        let bad = r#"
[[policy]]
name = "p"
egress_gateway_name = "g"
source_cidrs = ["10.0.0.0/33"]
destination_cidrs = ["0.0.0.0/0"]
"#;
        let errs = parse_objects(bad, "apply.toml").unwrap_err();
        assert!(
            errs.0.iter().any(|e| e.key == "policy[0].source_cidrs[0]"),
            "{errs}"
        );
        assert!(parse_objects("[[gateway]\n", "apply.toml").is_err());
    }
}
