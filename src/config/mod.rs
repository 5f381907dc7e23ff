//! The configuration: `egressd.toml` and the `EGRESSD_<SECTION>__<KEY>` environment, and the
//! rules every gateway and policy follows wherever it comes from.
//!
//! - `schema.rs` — every key as it is written: the file's sections, gateways and policies
//!   (also the objects of `egressd apply` and of the admin API's JSON and TOML bodies), with
//!   what is required and the defaults. Start here.
//! - `load.rs` — figment merges the file and the environment; the reader of `de.rs` reads the
//!   result into the schema types, finding every unknown key (with a "did you mean"), wrong
//!   type and missing key at once; the effective [`Config`] and the model objects are built
//!   from them while the rules are applied. Every problem is a [`ConfigError`] naming the file
//!   or variable, the key and what is expected, so that `check-config` lists them all.
//! - `rules.rs` — the checks shared by the file, the admin API, the Kubernetes adapter and the
//!   Raft state machine: per field, per object, and between objects, the latter also against a
//!   lookup (an index of the committed set) so that one changed object can be checked alone.
//! - `de.rs` — the serde `Deserializer` over figment's values behind the reader.

mod de;
mod load;
pub mod rules;
pub mod schema;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Source;
use serde::{Serialize, Serializer};

use crate::model::{Gateway, Labels, Policy};

pub use schema::{LabelChange, LogFormat, Profile};

/// Where `egressd` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/egressd/egressd.toml";

/// Environment variables `EGRESSD_<SECTION>__<KEY>` override single keys of the file.
pub const ENV_PREFIX: &str = "EGRESSD_";

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
    pub kubernetes: KubernetesConfig,
    #[serde(rename = "gateway", serialize_with = "serialize_gateways")]
    pub gateways: Vec<Gateway>,
    #[serde(rename = "policy", serialize_with = "serialize_policies")]
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
    /// `[cluster.tls]`: the PEM files of this node's peer TLS identity. Required when there is
    /// more than one peer; a single-node cluster without it opens no peer endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsFiles>,
    pub profile: Profile,
    /// Overrides of the profile's timing, milliseconds (flat in `[cluster]`, as in the file).
    #[serde(flatten)]
    pub timing: TimingOverrides,
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

impl ClusterTiming {
    /// How often openraft 0.9 actually sends a heartbeat: at each tick, every 1.5 heartbeat
    /// intervals. The leader's grants are dated by the heartbeats' answers, so this is how old
    /// that date gets before the leader asks a quorum directly.
    pub fn heartbeat_every_ms(&self) -> u64 {
        self.heartbeat_ms.saturating_mul(3) / 2
    }

    /// The lease protocol's timing: clocks may drift apart by 1 ms per second (a hundred times
    /// what NTP-disciplined clocks do), and 10 ms cover timers and scheduling.
    pub fn lease_timing(&self) -> crate::lease::Timing {
        crate::lease::Timing {
            lease: std::time::Duration::from_millis(self.lease_ms),
            failover_timeout: std::time::Duration::from_millis(self.failover_timeout_ms),
            drift: 0.001,
            margin: std::time::Duration::from_millis(10),
        }
    }
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
                failover_timeout_ms: 200,
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
    /// `[admin.tls]`: HTTPS with this certificate and key instead of HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<AdminTlsConfig>,
}

/// `[admin.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// For the command-line client only: the CA it verifies the endpoint with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl AdminConfig {
    /// The URL clients reach the endpoint at: `https://` with `[admin.tls]`; a wildcard listen
    /// address is reached on loopback.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("{scheme}://{addr}")
    }
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
    /// Running TCP connections a policy change reclassifies: kept with their old translation
    /// (default), or ended with a reset. Read at start.
    pub tcp_on_policy_change: crate::dataplane::conntrack::TcpPolicy,
    /// Flow-state replication (`dataplane::ctsync`): this node's peer-network address (None:
    /// `cluster.listen`'s, when it names one), the first port of the links, the program.
    pub conntrack_sync_address: Option<std::net::Ipv4Addr>,
    pub conntrack_sync_port: u16,
    pub conntrackd: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive string such as `info` or `egressd=debug,info`.
    pub level: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7480)),
            peers: Vec::new(),
            data_dir: PathBuf::from("/var/lib/egressd"),
            tls: None,
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
            tls: None,
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
            tcp_on_policy_change: crate::dataplane::conntrack::TcpPolicy::Keep,
            conntrack_sync_address: None,
            conntrack_sync_port: 3780,
            conntrackd: PathBuf::from("/usr/sbin/conntrackd"),
        }
    }
}

/// `[kubernetes]` (see `schema::KubernetesSpec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KubernetesConfig {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
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

// ---------------------------------------------------------------------------------------------
// Entry points
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
    let text = load::read_file(path)?;
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    load::load_inner(
        Source::File(path.to_path_buf()),
        &path.display().to_string(),
        &text,
        &env,
        &load::system_hostname,
    )
}

/// `egressd run`'s loader: [`load`], except that a file whose only problems are in its
/// `[[gateway]]` and `[[policy]]` tables still starts the node (a restart must not take a
/// healthy gateway node down). Its other sections then come back, with no gateways and no
/// policies, beside those problems; the daemon runs the cluster's committed objects and reports
/// the problems as a rejected reload does. Any other problem stops the start, as with [`load`].
pub fn load_for_run(path: &Path) -> Result<(Config, Option<ConfigErrors>), ConfigErrors> {
    let text = load::read_file(path)?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    load::load_for_run_inner(
        Source::File(path.to_path_buf()),
        &path.display().to_string(),
        &text,
        &env,
        &load::system_hostname,
    )
}

/// Parses configuration text that did not come from a file (tests, `egressd apply` input kept
/// in memory). `source_name` stands in for the file name in errors. No environment overrides.
pub fn parse_str(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
    load::load_inner(
        Source::Custom(source_name.to_string()),
        source_name,
        text,
        &[],
        &load::system_hostname,
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
    load::parse_objects(text, source_name)
}

/// Why a request body was refused: it could not be read at all (HTTP 400), or it breaks the
/// schema or a rule (422).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    Syntax(String),
    Invalid(ConfigErrors),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Syntax(m) => f.write_str(m),
            BodyError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The JSON body of `POST /v1/apply`, `{"gateways": [...], "policies": [...]}` with the objects
/// in the file's shape ([`schema::GatewaySpec`], [`schema::PolicySpec`]), held to the same
/// schema and rules as [`parse_objects`].
pub fn parse_json_objects(
    body: &[u8],
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), BodyError> {
    load::parse_json_objects(body, source_name)
}

/// The body of `POST /v1/apply`: JSON ([`parse_json_objects`]) or, with `toml`, the TOML of
/// [`parse_objects`].
pub fn parse_apply_body(
    body: &[u8],
    toml: bool,
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), BodyError> {
    if toml {
        load::parse_toml_body(body, source_name)
    } else {
        load::parse_json_objects(body, source_name)
    }
}

/// The JSON body of `POST /v1/nodes/{name}/labels`, with the label rules applied.
pub fn parse_label_change(body: &[u8], source_name: &str) -> Result<LabelChange, BodyError> {
    load::parse_label_change(body, source_name)
}

/// The JSON body of `POST /v1/policies/{name}/cidrs`: the CIDRs to add and to remove, each
/// checked as in a policy.
pub fn parse_cidr_edit(
    body: &[u8],
    source_name: &str,
) -> Result<
    (
        crate::cluster::state::CidrLists,
        crate::cluster::state::CidrLists,
    ),
    BodyError,
> {
    load::parse_cidr_edit(body, source_name)
}

/// The JSON body of `POST /v1/members`, with the name and address rules applied.
pub fn parse_member_add(body: &[u8], source_name: &str) -> Result<schema::MemberAdd, BodyError> {
    load::parse_member_add(body, source_name)
}

/// The rules for gateways and policies that did not come through the reader (the committed
/// set in the state machine, the merge of several sources): each object and the rules between
/// them ([`rules::objects`]). Key paths use the slice indices; `file` is empty.
pub fn check_objects(gateways: &[Gateway], policies: &[Policy]) -> Vec<ConfigError> {
    check_objects_with(gateways, policies, false)
}

/// [`check_objects`] with the policies' CIDR lists known to be well-formed (see
/// `rules::objects_with`).
pub fn check_objects_with(
    gateways: &[Gateway],
    policies: &[Policy],
    lists_checked: bool,
) -> Vec<ConfigError> {
    rules::objects_with(gateways, policies, lists_checked)
        .into_iter()
        .map(|i| ConfigError {
            file: String::new(),
            key: i.key,
            message: i.message,
        })
        .collect()
}

fn serialize_gateways<S: Serializer>(gateways: &[Gateway], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(gateways.iter().map(schema::GatewaySpec::from))
}

fn serialize_policies<S: Serializer>(policies: &[Policy], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(policies.iter().map(schema::PolicySpec::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Selection, SourceIp};

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
            conntrack_sync: false,
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
}
