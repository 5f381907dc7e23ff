//! The live sync (`[kubernetes] enabled = true`): the Deckhouse resources, the Nodes named as
//! egressd's members and the Pods the policies select, watched in a Kubernetes cluster and
//! written into the Raft state as objects of origin `kubernetes`; the gateways' status written
//! back through the `/status` subresource.
//!
//! Every node watches (so that a new leader starts with a warm cache); only the Raft leader
//! writes. What it writes is always a change — the objects whose desired form differs from the
//! committed one — never the whole set:
//!
//! - a pod event touches only the policies whose selectors can match the pod (an index by one
//!   `matchLabels` pair of each selector term), and only those whose address list changed are
//!   written;
//! - an object that breaks a rule is not imported (and is named in `egressd status` and in its
//!   resource's status); the others go on.
//!
//! Safety: nothing is written until every watcher has completed its first list; a relist (after
//! a 410 Gone, or the API server's return) replaces a cache only once the list is complete
//! (`Event::InitDone`), so a list cut short deletes nothing. While the API server is away the
//! caches, and so the committed objects, stay as they are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, utils::Backoff};
use kube::{Client, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::node::ClusterNode;
use crate::cluster::state::{ClusterState, Command, KubeNode, ObjectRef};
use crate::config::KubernetesConfig;
use crate::model::{Gateway, Policy, SourceIp};
use crate::status::{KubernetesStatus, StatusBoard};

use super::import::{checked_gateway, checked_policy};
use super::types::{
    Condition, EgressGateway, EgressGatewayPolicy, EgressGatewayStatus, NAMESPACE_LABEL, READY,
    ReadyReason,
};

/// How often the leader compares the gateways' status with what it last wrote.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// Events closer than this to the previous one join its write, for at most `BATCH_MAX`.
const BATCH_GAP: Duration = Duration::from_millis(2);
const BATCH_MAX: Duration = Duration::from_millis(50);
/// How long after a write that was not committed the next is tried.
const RETRY_WRITE: Duration = Duration::from_secs(1);

/// Connects to the API server the configuration names.
pub async fn client(config: &KubernetesConfig) -> anyhow::Result<Client> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?;
            let options = KubeConfigOptions {
                context: config.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no kubernetes.kubeconfig, and not in a pod (the in-cluster service account)",
        )?,
    };
    Client::try_from(kube_config).context("building the Kubernetes client")
}

/// Runs the sync until the process ends. Errors of the API server are retried (with backoff);
/// only a configuration that cannot give a client ends it.
pub async fn run(node: Arc<ClusterNode>, config: KubernetesConfig, board: Arc<StatusBoard>) {
    let span = info_span!("kubernetes");
    async move {
        let client = match client(&config).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = format!("{e:#}"), "the Kubernetes sync cannot start");
                board.update(|s| {
                    s.kubernetes = Some(KubernetesStatus {
                        state: format!("not started: {e:#}"),
                        ..Default::default()
                    })
                });
                return;
            }
        };
        info!("watching EgressGateways, EgressGatewayPolicies, Nodes and Pods");
        Sync::new(node, client, board).run().await;
    }
    .instrument(span)
    .await
}

/// Retries after an error of the API server: 200 ms doubling to 5 s (an egress gateway wants
/// its pods' addresses soon after the API server is back; the watch is four streams, not a
/// fleet of controllers).
struct Retry {
    next: Duration,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Retry {
        Retry { next: Retry::FIRST }
    }
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(Retry::MAX);
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = Retry::FIRST;
    }
}

/// One watcher's event. Boxed: a Pod is large, and the stream moves every event.
enum Ev {
    Gateway(Box<Result<Event<EgressGateway>, watcher::Error>>),
    Policy(Box<Result<Event<EgressGatewayPolicy>, watcher::Error>>),
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
}

fn streams(client: &Client) -> BoxStream<'static, Ev> {
    let cfg = watcher::Config::default();
    let s = [
        watcher::watcher(Api::<EgressGateway>::all(client.clone()), cfg.clone())
            .backoff(Retry::new())
            .map(|e| Ev::Gateway(Box::new(e)))
            .boxed(),
        watcher::watcher(Api::<EgressGatewayPolicy>::all(client.clone()), cfg.clone())
            .backoff(Retry::new())
            .map(|e| Ev::Policy(Box::new(e)))
            .boxed(),
        watcher::watcher(Api::<Node>::all(client.clone()), cfg.clone())
            .backoff(Retry::new())
            .map(|e| Ev::Node(Box::new(e)))
            .boxed(),
        watcher::watcher(Api::<Pod>::all(client.clone()), cfg)
            .backoff(Retry::new())
            .map(|e| Ev::Pod(Box::new(e)))
            .boxed(),
    ];
    futures::stream::select_all(s).boxed()
}

// ---------------------------------------------------------------------------------------------
// Caches
// ---------------------------------------------------------------------------------------------

/// The objects of one resource as the watcher reported them, and a relist in progress.
struct Cache<T> {
    items: HashMap<String, T>,
    /// Objects of a relist (after `Init`), swapped in at `InitDone`.
    relist: Option<HashMap<String, T>>,
    /// The first list has completed.
    listed: bool,
}

impl<T: Clone + PartialEq> Cache<T> {
    fn new() -> Cache<T> {
        Cache {
            items: HashMap::new(),
            relist: None,
            listed: false,
        }
    }

    /// Applies one watcher event; returns the changes it makes, as (key, old, new).
    fn apply<K>(
        &mut self,
        ev: Event<K>,
        key: impl Fn(&K) -> String,
        convert: impl Fn(&K) -> Option<T>,
    ) -> Vec<(String, Option<T>, Option<T>)> {
        let mut out = Vec::new();
        match ev {
            Event::Apply(k) => {
                let (name, new) = (key(&k), convert(&k));
                let old = match &new {
                    Some(v) => self.items.insert(name.clone(), v.clone()),
                    None => self.items.remove(&name),
                };
                if old != new {
                    out.push((name, old, new));
                }
            }
            Event::Delete(k) => {
                let name = key(&k);
                if let Some(old) = self.items.remove(&name) {
                    out.push((name, Some(old), None));
                }
            }
            Event::Init => self.relist = Some(HashMap::new()),
            Event::InitApply(k) => {
                if let Some(v) = convert(&k) {
                    self.relist
                        .get_or_insert_with(HashMap::new)
                        .insert(key(&k), v);
                }
            }
            Event::InitDone => {
                // Only now, with the list complete, do objects missing from it count as gone.
                let new = self.relist.take().unwrap_or_default();
                for (name, old) in &self.items {
                    if !new.contains_key(name) {
                        out.push((name.clone(), Some(old.clone()), None));
                    }
                }
                for (name, v) in &new {
                    let old = self.items.get(name);
                    if old != Some(v) {
                        out.push((name.clone(), old.cloned(), Some(v.clone())));
                    }
                }
                self.items = new;
                self.listed = true;
            }
        }
        out
    }
}

/// What the sync keeps of a pod: its labels (with the namespace pseudo-label) and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodInfo {
    labels: BTreeMap<String, String>,
    ips: Vec<IpAddr>,
}

/// A pod whose traffic a policy can carry: it has addresses, is not finished and is not on the
/// host network (its address would be the node's).
fn pod_info(p: &Pod) -> Option<PodInfo> {
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return None;
    }
    ips.sort();
    ips.dedup();
    let mut labels = p.metadata.labels.clone().unwrap_or_default();
    labels.insert(
        NAMESPACE_LABEL.to_string(),
        p.metadata.namespace.clone().unwrap_or_default(),
    );
    Some(PodInfo { labels, ips })
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

fn kube_node(n: &Node) -> Option<KubeNode> {
    Some(KubeNode {
        labels: n.metadata.labels.clone().unwrap_or_default(),
        unschedulable: n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true),
    })
}

// ---------------------------------------------------------------------------------------------
// Pod selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// A `podSelector`, ready to match.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    labels: Vec<(String, String)>,
    exprs: Vec<(String, Op)>,
}

impl Selector {
    /// Kubernetes' rules: an empty selector matches every pod; `In`/`NotIn` need values,
    /// `Exists`/`DoesNotExist` take none.
    pub fn compile(s: &LabelSelector) -> Result<Selector, String> {
        let labels = s
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut exprs = Vec::new();
        for e in s.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {}: operator {} needs values",
                        e.key, e.operator
                    ));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {}: operator {} takes no values",
                        e.key, e.operator
                    ));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(format!(
                        "matchExpressions {}: unknown operator {other:?}; expected In, NotIn, \
                         Exists or DoesNotExist",
                        e.key
                    ));
                }
            };
            exprs.push((e.key.clone(), op));
        }
        Ok(Selector { labels, exprs })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|(k, op)| match op {
                Op::In(vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Op::NotIn(vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Op::Exists => labels.contains_key(k),
                Op::DoesNotExist => !labels.contains_key(k),
            })
    }
}

/// A policy's selector terms (any may match), or why they cannot be used.
type Terms = Result<Vec<Selector>, String>;

fn compile_terms(p: &EgressGatewayPolicy) -> Terms {
    p.spec
        .selectors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Selector::compile(&t.pod_selector)
                .map_err(|e| format!("spec.selectors[{i}].podSelector: {e}"))
        })
        .collect()
}

/// Which policies a pod may match: by one `matchLabels` pair of each term, or every pod.
#[derive(Default)]
struct PodIndex {
    by_label: HashMap<(String, String), HashSet<String>>,
    any_pod: HashSet<String>,
}

impl PodIndex {
    fn keys(terms: &Terms) -> Vec<Option<(String, String)>> {
        match terms {
            Ok(t) => t.iter().map(|s| s.labels.first().cloned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn add(&mut self, policy: &str, terms: &Terms) {
        for k in PodIndex::keys(terms) {
            match k {
                Some(k) => self.by_label.entry(k).or_default().insert(policy.into()),
                None => self.any_pod.insert(policy.into()),
            };
        }
    }

    fn remove(&mut self, policy: &str, terms: &Terms) {
        for k in PodIndex::keys(terms) {
            match k {
                Some(k) => {
                    if let Some(s) = self.by_label.get_mut(&k) {
                        s.remove(policy);
                        if s.is_empty() {
                            self.by_label.remove(&k);
                        }
                    }
                }
                None => {
                    self.any_pod.remove(policy);
                }
            }
        }
    }

    fn candidates(&self, labels: &BTreeMap<String, String>, out: &mut BTreeSet<String>) {
        out.extend(self.any_pod.iter().cloned());
        for (k, v) in labels {
            if let Some(s) = self.by_label.get(&(k.clone(), v.clone())) {
                out.extend(s.iter().cloned());
            }
        }
    }
}

fn selects(terms: &Terms, labels: &BTreeMap<String, String>) -> bool {
    terms
        .as_ref()
        .is_ok_and(|t| t.iter().any(|s| s.matches(labels)))
}

// ---------------------------------------------------------------------------------------------
// The sync
// ---------------------------------------------------------------------------------------------

/// The caches, the pod matching, and what changed since the last write. Pure: no I/O, so that
/// tests and the bench drive it with events.
pub struct Mirror {
    gateways: Cache<EgressGateway>,
    policies: Cache<EgressGatewayPolicy>,
    nodes: Cache<KubeNode>,
    pods: Cache<PodInfo>,
    terms: HashMap<String, Terms>,
    index: PodIndex,
    /// Per policy, the addresses of each selected pod.
    matched: HashMap<String, BTreeMap<String, Vec<IpAddr>>>,
    dirty_gateways: BTreeSet<String>,
    dirty_policies: BTreeSet<String>,
    dirty_nodes: bool,
    /// Compare everything (a new leader, a relist).
    full: bool,
    /// Objects not imported, with why (by object).
    rejected: BTreeMap<ObjectRef, String>,
}

impl Default for Mirror {
    fn default() -> Self {
        Mirror::new()
    }
}

/// The change the leader writes, and what could not be imported.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub objects: Option<Command>,
    pub nodes: Option<Command>,
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror {
            gateways: Cache::new(),
            policies: Cache::new(),
            nodes: Cache::new(),
            pods: Cache::new(),
            terms: HashMap::new(),
            index: PodIndex::default(),
            matched: HashMap::new(),
            dirty_gateways: BTreeSet::new(),
            dirty_policies: BTreeSet::new(),
            dirty_nodes: false,
            full: true,
            rejected: BTreeMap::new(),
        }
    }

    /// Every watcher has completed a first list: the caches may be trusted for deletions.
    pub fn listed(&self) -> bool {
        self.gateways.listed && self.policies.listed && self.nodes.listed && self.pods.listed
    }

    /// Something to compare with the committed state.
    pub fn dirty(&self) -> bool {
        self.full
            || self.dirty_nodes
            || !self.dirty_gateways.is_empty()
            || !self.dirty_policies.is_empty()
    }

    /// Compare everything at the next plan.
    pub fn mark_full(&mut self) {
        self.full = true;
    }

    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.gateways.items.len(),
            self.policies.items.len(),
            self.nodes.items.len(),
            self.pods.items.len(),
        )
    }

    pub fn rejected(&self) -> Vec<String> {
        self.rejected
            .iter()
            .map(|(r, why)| format!("{r}: {why}"))
            .collect()
    }

    pub fn gateway(&self, name: &str) -> Option<&EgressGateway> {
        self.gateways.items.get(name)
    }

    pub fn gateway_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.gateways.items.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn on_gateway(&mut self, ev: Event<EgressGateway>) {
        let changes = self
            .gateways
            .apply(ev, |g| g.name_any(), |g| Some(g.clone()));
        for (name, old, new) in changes {
            // The policies of a gateway depend on its spec (the rules between them), not on
            // its status, which egressd itself writes.
            let spec_changed = old.as_ref().map(|g| &g.spec) != new.as_ref().map(|g| &g.spec);
            if spec_changed {
                self.dirty_gateways.insert(name.clone());
                for (p, pol) in &self.policies.items {
                    if pol.spec.egress_gateway_name == name {
                        self.dirty_policies.insert(p.clone());
                    }
                }
            }
        }
    }

    pub fn on_policy(&mut self, ev: Event<EgressGatewayPolicy>) {
        let changes = self
            .policies
            .apply(ev, |p| p.name_any(), |p| Some(p.clone()));
        for (name, old, new) in changes {
            if old.as_ref().map(|p| &p.spec) == new.as_ref().map(|p| &p.spec) {
                continue;
            }
            if let Some(t) = self.terms.remove(&name) {
                self.index.remove(&name, &t);
            }
            self.matched.remove(&name);
            if let Some(p) = &new {
                let terms = compile_terms(p);
                self.index.add(&name, &terms);
                let mut m = BTreeMap::new();
                if terms.is_ok() {
                    for (key, pod) in &self.pods.items {
                        if selects(&terms, &pod.labels) {
                            m.insert(key.clone(), pod.ips.clone());
                        }
                    }
                }
                self.matched.insert(name.clone(), m);
                self.terms.insert(name.clone(), terms);
            }
            self.dirty_policies.insert(name);
        }
    }

    pub fn on_node(&mut self, ev: Event<Node>) {
        let changes = self.nodes.apply(ev, |n| n.name_any(), kube_node);
        if !changes.is_empty() {
            self.dirty_nodes = true;
        }
    }

    pub fn on_pod(&mut self, ev: Event<Pod>) {
        let changes = self.pods.apply(ev, pod_key, pod_info);
        let mut candidates = BTreeSet::new();
        for (key, old, new) in changes {
            candidates.clear();
            for p in old.iter().chain(new.iter()) {
                self.index.candidates(&p.labels, &mut candidates);
            }
            for policy in &candidates {
                let Some(terms) = self.terms.get(policy) else {
                    continue;
                };
                let now = new
                    .as_ref()
                    .filter(|p| selects(terms, &p.labels))
                    .map(|p| &p.ips);
                let m = self.matched.entry(policy.clone()).or_default();
                let changed = match now {
                    Some(ips) => m.insert(key.clone(), ips.clone()).as_ref() != Some(ips),
                    None => m.remove(&key).is_some(),
                };
                if changed {
                    self.dirty_policies.insert(policy.clone());
                }
            }
        }
    }

    /// The addresses of the pods `policy` selects, as source CIDRs, in order.
    pub fn sources(&self, policy: &str) -> Vec<String> {
        let mut ips: Vec<IpAddr> = self
            .matched
            .get(policy)
            .map(|m| m.values().flatten().copied().collect())
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        ips.iter()
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            })
            .collect()
    }

    /// The change that brings the committed Kubernetes objects and Node facts to what the
    /// caches say, for what changed since the last plan (everything after `mark_full`). Clears
    /// the marks; the caller calls `mark_full` if the change is not committed.
    pub fn plan(&mut self, state: &ClusterState, members: &[String]) -> Plan {
        let full = std::mem::take(&mut self.full);
        let gateway_names: BTreeSet<String> = if full {
            self.gateways
                .items
                .keys()
                .cloned()
                .chain(state.kube_objects.iter().filter_map(|r| match r {
                    ObjectRef::Gateway(n) => Some(n.clone()),
                    ObjectRef::Policy(_) => None,
                }))
                .collect()
        } else {
            std::mem::take(&mut self.dirty_gateways)
        };
        let policy_names: BTreeSet<String> = if full {
            self.policies
                .items
                .keys()
                .cloned()
                .chain(state.kube_objects.iter().filter_map(|r| match r {
                    ObjectRef::Policy(n) => Some(n.clone()),
                    ObjectRef::Gateway(_) => None,
                }))
                .collect()
        } else {
            std::mem::take(&mut self.dirty_policies)
        };
        self.dirty_gateways.clear();
        self.dirty_policies.clear();

        let mut gateways = Vec::new();
        let mut delete_gateways = Vec::new();
        for name in &gateway_names {
            let r = ObjectRef::Gateway(name.clone());
            self.rejected.remove(&r);
            let desired: Option<Gateway> = match self.gateways.items.get(name) {
                None => None,
                Some(g) => match checked_gateway(g) {
                    Ok(g) => Some(g),
                    Err(why) => {
                        self.rejected.insert(r.clone(), why);
                        None
                    }
                },
            };
            let owned = state.kube_objects.contains(&r);
            match desired {
                Some(g) if !owned || state.gateways.get(name) != Some(&g) => gateways.push(g),
                Some(_) => {}
                None if owned => delete_gateways.push(name.clone()),
                None => {}
            }
        }
        let gone: BTreeSet<&str> = delete_gateways.iter().map(String::as_str).collect();
        let upserted: BTreeSet<&str> = gateways.iter().map(|g| g.name.as_str()).collect();
        let gateway_exists =
            |n: &str| upserted.contains(n) || (state.gateways.contains_key(n) && !gone.contains(n));

        let mut policies = Vec::new();
        let mut delete_policies = Vec::new();
        for name in &policy_names {
            let r = ObjectRef::Policy(name.clone());
            self.rejected.remove(&r);
            let desired: Option<Policy> = match self.policies.items.get(name) {
                None => None,
                Some(p) => match self.terms.get(name) {
                    Some(Err(why)) => {
                        self.rejected.insert(r.clone(), why.clone());
                        None
                    }
                    _ if !gateway_exists(&p.spec.egress_gateway_name) => {
                        self.rejected.insert(
                            r.clone(),
                            format!(
                                "waits for its gateway: no gateway {}",
                                p.spec.egress_gateway_name
                            ),
                        );
                        None
                    }
                    _ => {
                        let sources = self.sources(name);
                        if sources.is_empty() {
                            // It would match nothing: not committed until a pod is selected.
                            // Named, so that `egressd status` says why it is not there.
                            self.rejected.insert(
                                r.clone(),
                                "selects no Pod yet: committed once it selects one that has \
                                 an address"
                                    .into(),
                            );
                            None
                        } else {
                            match checked_policy(p, sources) {
                                Ok(p) => Some(p),
                                Err(why) => {
                                    self.rejected.insert(r.clone(), why);
                                    None
                                }
                            }
                        }
                    }
                },
            };
            let owned = state.kube_objects.contains(&r);
            match desired {
                Some(p) if !owned || state.policies.get(name).is_none_or(|c| **c != p) => {
                    policies.push(p)
                }
                Some(_) => {}
                None if owned => delete_policies.push(name.clone()),
                None => {}
            }
        }
        // A gateway gone from Kubernetes takes its imported policies along.
        for p in state.policies.values() {
            let r = ObjectRef::Policy(p.name.clone());
            if gone.contains(p.egress_gateway_name.as_str())
                && state.kube_objects.contains(&r)
                && !delete_policies.contains(&p.name)
                && !policies.iter().any(|q| q.name == p.name)
            {
                delete_policies.push(p.name.clone());
            }
        }

        let objects = (!gateways.is_empty()
            || !policies.is_empty()
            || !delete_gateways.is_empty()
            || !delete_policies.is_empty())
        .then_some(Command::KubeObjects {
            gateways,
            policies,
            delete_gateways,
            delete_policies,
        });

        let mut node_changes = Vec::new();
        if full || std::mem::take(&mut self.dirty_nodes) {
            for m in members {
                let desired = self.nodes.items.get(m);
                if state.kube_nodes.get(m) != desired {
                    node_changes.push((m.clone(), desired.cloned()));
                }
            }
            for n in state.kube_nodes.keys() {
                if !members.contains(n) {
                    node_changes.push((n.clone(), None));
                }
            }
        }
        self.dirty_nodes = false;
        Plan {
            objects,
            nodes: (!node_changes.is_empty()).then_some(Command::KubeNodes(node_changes)),
        }
    }

    /// Records an object of a refused change as not imported.
    pub fn reject(&mut self, r: ObjectRef, why: String) {
        self.rejected.insert(r, why);
    }
}

/// The `status` of gateway `name` as the leader sees it: the committed active node, the
/// eligible nodes, and the `Ready` condition with Deckhouse's reasons.
pub fn gateway_status(
    name: &str,
    generation: Option<i64>,
    state: &ClusterState,
    decision: Option<&crate::election::GatewayDecision>,
    members: &[crate::cluster::node::MemberView],
    rejected: Option<&str>,
) -> (EgressGatewayStatus, String) {
    let active = state.assignment.get(name).cloned();
    let eligible = decision.map(|d| d.eligible.len()).unwrap_or(0);
    let (reason, message) = match (state.gateways.get(name), &active, rejected) {
        (_, _, Some(why)) => (
            ReadyReason::ElectionFailed,
            format!("not imported by egressd: {why}"),
        ),
        (None, _, None) => (
            ReadyReason::ElectionFailed,
            "not committed in the egressd cluster yet".to_string(),
        ),
        (Some(_), None, None) => {
            let why: Vec<String> = decision
                .map(|d| {
                    d.ineligible
                        .iter()
                        .map(|(n, r)| format!("{n}: {r}"))
                        .collect()
                })
                .unwrap_or_default();
            (
                ReadyReason::ElectionFailed,
                if why.is_empty() {
                    "no eligible node".to_string()
                } else {
                    format!("no eligible node ({})", why.join("; "))
                },
            )
        }
        (Some(g), Some(a), None) => match &g.source_ip {
            SourceIp::PrimaryIp { interface } => (
                ReadyReason::ElectionSucceed,
                format!("{a} is active; its {interface} address is the source"),
            ),
            SourceIp::VirtualIp { ip, .. } => {
                let holds = members.iter().any(|m| &m.name == a && m.alive && m.ready);
                if holds {
                    (
                        ReadyReason::ElectionSucceedAndVirtualIPAnnounced,
                        format!("{a} is active and holds {ip}"),
                    )
                } else {
                    (
                        ReadyReason::VirtualIPAnnouncingFailed,
                        format!("{a} is active but not alive and ready: {ip} may not be held"),
                    )
                }
            }
        },
    };
    let status = EgressGatewayStatus {
        observed_generation: generation,
        ready_nodes: Some(eligible as i64),
        active_node_name: active,
        conditions: vec![Condition {
            type_: READY.to_string(),
            status: reason.status().to_string(),
            reason: reason.as_str().to_string(),
            message: message.clone(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            last_heartbeat_time: None,
            observed_generation: generation,
        }],
    };
    (status, message)
}

/// The parts of a status that matter for a write (not the times).
fn status_key(s: &EgressGatewayStatus) -> String {
    let c = s.conditions.iter().find(|c| c.type_ == READY);
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.observed_generation,
        s.ready_nodes,
        s.active_node_name,
        c.map(|c| &c.status),
        c.map(|c| &c.reason),
        c.map(|c| &c.message)
    )
}

struct Sync {
    node: Arc<ClusterNode>,
    client: Client,
    board: Arc<StatusBoard>,
    mirror: Mirror,
    leader: bool,
    members: Vec<String>,
    last_error: Option<String>,
    /// Per gateway, the status last written (its key).
    written: HashMap<String, String>,
    published: Option<KubernetesStatus>,
    /// No write before this (the last one was not committed).
    retry_at: Option<tokio::time::Instant>,
}

impl Sync {
    fn new(node: Arc<ClusterNode>, client: Client, board: Arc<StatusBoard>) -> Sync {
        Sync {
            node,
            client,
            board,
            mirror: Mirror::new(),
            leader: false,
            members: Vec::new(),
            last_error: None,
            written: HashMap::new(),
            published: None,
            retry_at: None,
        }
    }

    async fn run(mut self) {
        let mut events = streams(&self.client);
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied = self.node.subscribe();
        loop {
            tokio::select! {
                ev = events.next() => {
                    let Some(ev) = ev else { break };
                    self.on(ev);
                    // What follows closely goes into the same write: the body of a watch is
                    // read a chunk at a time as it is asked for, so a burst (a thousand
                    // policies created at once) would otherwise become one write per event.
                    let until = tokio::time::Instant::now() + BATCH_MAX;
                    while let Ok(Some(ev)) = tokio::time::timeout(BATCH_GAP, events.next()).await {
                        self.on(ev);
                        if tokio::time::Instant::now() >= until {
                            break;
                        }
                    }
                }
                r = applied.changed() => {
                    if r.is_err() { break }
                }
                _ = status_tick.tick() => {
                    self.write_status().await;
                }
            }
            self.follow_leadership();
            self.flush().await;
            self.publish();
        }
        warn!("the Kubernetes watch streams ended");
    }

    fn on(&mut self, ev: Ev) {
        // Feeds one watcher's event to the mirror; `Ok(true)` when it completed a list.
        fn feed<K>(
            r: Result<Event<K>, watcher::Error>,
            on: impl FnOnce(Event<K>),
        ) -> Result<bool, watcher::Error> {
            let done = matches!(r, Ok(Event::InitDone));
            r.map(|e| {
                on(e);
                done
            })
        }
        let m = &mut self.mirror;
        let result = match ev {
            Ev::Gateway(r) => feed(*r, |e| m.on_gateway(e)),
            Ev::Policy(r) => feed(*r, |e| m.on_policy(e)),
            Ev::Node(r) => feed(*r, |e| m.on_node(e)),
            Ev::Pod(r) => feed(*r, |e| m.on_pod(e)),
        };
        match result {
            Ok(done) => {
                if done {
                    debug!("a list completed");
                    if self.last_error.take().is_some() {
                        info!("the Kubernetes API server answers again; resynced");
                    }
                }
            }
            Err(e) => {
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    warn!(
                        error = %text,
                        "Kubernetes watch: keeping the last imported state and retrying"
                    );
                }
                self.last_error = Some(text);
            }
        }
    }

    fn follow_leadership(&mut self) {
        let leader = self.node.raft.metrics().borrow().current_leader == Some(self.node.id);
        if leader != self.leader {
            self.leader = leader;
            if leader {
                info!("this node leads: it writes the Kubernetes objects and status");
                self.mirror.mark_full();
                self.written.clear();
            }
        }
        let members = self.node.applied().state.member_names();
        if members != self.members {
            self.members = members;
            self.mirror.mark_full();
        }
    }

    /// On the leader, once every watcher has listed: writes what changed.
    async fn flush(&mut self) {
        if !self.leader || !self.mirror.listed() || !self.mirror.dirty() {
            return;
        }
        if self
            .retry_at
            .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            return;
        }
        self.retry_at = None;
        let state = self.node.applied().state;
        let members = self.members.clone();
        let mirror = &mut self.mirror;
        let plan = crate::heavy(|| mirror.plan(&state, &members));
        let mut ok = true;
        if let Some(cmd) = plan.objects {
            ok &= self.write_objects(cmd).await;
        }
        if let Some(cmd) = plan.nodes {
            // The state machine refuses no node change: a refusal is the leader's (a member
            // that has not reported its command format yet), and passes.
            ok &= self.write(cmd).await == Some(None);
        }
        if !ok {
            self.mirror.mark_full();
            self.retry_at = Some(tokio::time::Instant::now() + RETRY_WRITE);
        }
    }

    /// Whether the state machine itself refuses `cmd` (and so every node would): applied to a
    /// copy of the committed state (persistent maps: the copy is free). A refusal that the
    /// state machine would not make is the leader's — a member that has not reported its
    /// command format since the leader took over — and passes with time.
    fn refused_by_rules(&self, cmd: &Command) -> Option<String> {
        let mut state = ClusterState::clone(&self.node.applied().state);
        crate::heavy(|| state.apply(cmd).refused)
    }

    /// Writes a command; `None` if it was not committed (logged), the refusal if refused.
    async fn write(&mut self, cmd: Command) -> Option<Option<String>> {
        let kind = cmd.kind();
        match self.node.write(cmd).await {
            Ok(r) => Some(r.refused),
            Err(e) => {
                warn!(error = format!("{e:#}"), kind, "not committed; retried");
                None
            }
        }
    }

    /// The change as one command; if the rules refuse it, each object alone, so that one bad
    /// object does not hold the others back.
    async fn write_objects(&mut self, cmd: Command) -> bool {
        let n = cmd.object_count();
        match self.write(cmd.clone()).await {
            None => return false,
            Some(None) => {
                debug!(objects = n, "Kubernetes objects committed");
                return true;
            }
            Some(Some(why)) if self.refused_by_rules(&cmd).is_none() => {
                debug!(refused = %why, "the leader cannot write the change yet; retried");
                return false;
            }
            Some(Some(why)) if n == 1 => {
                warn!(refused = %why, "a Kubernetes object was not imported");
                if let Some(r) = single_ref(&cmd) {
                    self.mirror.reject(r, why);
                }
                return true;
            }
            Some(Some(why)) => {
                warn!(refused = %why, objects = n, "the change was refused; writing its objects one by one");
            }
        }
        let Command::KubeObjects {
            gateways,
            policies,
            delete_gateways,
            delete_policies,
        } = cmd
        else {
            return true;
        };
        let one = |g: Vec<Gateway>, p: Vec<Policy>, dg: Vec<String>, dp: Vec<String>| {
            Command::KubeObjects {
                gateways: g,
                policies: p,
                delete_gateways: dg,
                delete_policies: dp,
            }
        };
        let mut singles = Vec::new();
        singles.extend(
            delete_policies
                .into_iter()
                .map(|n| one(vec![], vec![], vec![], vec![n])),
        );
        singles.extend(
            gateways
                .into_iter()
                .map(|g| one(vec![g], vec![], vec![], vec![])),
        );
        singles.extend(
            policies
                .into_iter()
                .map(|p| one(vec![], vec![p], vec![], vec![])),
        );
        singles.extend(
            delete_gateways
                .into_iter()
                .map(|n| one(vec![], vec![], vec![n], vec![])),
        );
        let mut ok = true;
        for c in singles {
            let r = single_ref(&c);
            match self.write(c.clone()).await {
                None => ok = false,
                Some(None) => {}
                Some(Some(_)) if self.refused_by_rules(&c).is_none() => ok = false,
                Some(Some(why)) => {
                    warn!(refused = %why, "a Kubernetes object was not imported");
                    if let Some(r) = r {
                        self.mirror.reject(r, why);
                    }
                }
            }
        }
        ok
    }

    /// On the leader: the status of every EgressGateway, written where it changed.
    async fn write_status(&mut self) {
        if !self.leader || !self.mirror.listed() {
            return;
        }
        let state = self.node.applied().state;
        let view = self.node.local_view();
        let api: Api<EgressGateway> = Api::all(self.client.clone());
        let rejected: HashMap<String, String> = self
            .mirror
            .rejected
            .iter()
            .filter_map(|(r, why)| match r {
                ObjectRef::Gateway(n) => Some((n.clone(), why.clone())),
                ObjectRef::Policy(_) => None,
            })
            .collect();
        for name in self.mirror.gateway_names() {
            let Some(g) = self.mirror.gateway(&name) else {
                continue;
            };
            let decision = view.decision.as_ref().and_then(|d| d.gateways.get(&name));
            let (mut status, _) = gateway_status(
                &name,
                g.metadata.generation,
                &state,
                decision,
                &view.members,
                rejected.get(&name).map(String::as_str),
            );
            let key = status_key(&status);
            let current = g.status.as_ref().map(status_key);
            if self.written.get(&name) == Some(&key) && current.as_ref() == Some(&key) {
                continue;
            }
            if current.as_ref() == Some(&key) {
                self.written.insert(name, key);
                continue;
            }
            // The transition time stays while the condition's status does.
            if let (Some(old), Some(new)) = (
                g.status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY)),
                status.conditions.first_mut(),
            ) && old.status == new.status
            {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if let Some(c) = status.conditions.first_mut() {
                c.last_heartbeat_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            }
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(
                        gateway = %name,
                        active = ?status.active_node_name,
                        ready_nodes = ?status.ready_nodes,
                        reason = %status.conditions.first().map(|c| c.reason.as_str()).unwrap_or_default(),
                        "status written to Kubernetes"
                    );
                    self.written.insert(name, key);
                }
                Err(e) => {
                    debug!(gateway = %name, error = %e, "writing the status failed; retried");
                }
            }
        }
    }

    fn publish(&mut self) {
        let (gateways, policies, nodes, pods) = self.mirror.counts();
        let state = self.node.applied().state;
        let imported = |gw: bool| {
            state
                .kube_objects
                .iter()
                .filter(|r| matches!(r, ObjectRef::Gateway(_)) == gw)
                .count()
        };
        let s = KubernetesStatus {
            state: match (&self.last_error, self.mirror.listed()) {
                (Some(e), _) => format!("API server unreachable, last imported state kept: {e}"),
                (None, false) => "listing".to_string(),
                (None, true) => "synced".to_string(),
            },
            writer: self.leader,
            seen_gateways: gateways,
            seen_policies: policies,
            seen_nodes: nodes,
            seen_pods: pods,
            imported_gateways: imported(true),
            imported_policies: imported(false),
            not_imported: self.mirror.rejected(),
        };
        if self.published.as_ref() != Some(&s) {
            self.published = Some(s.clone());
            self.board.update(|st| st.kubernetes = Some(s));
        }
    }
}

fn single_ref(cmd: &Command) -> Option<ObjectRef> {
    let Command::KubeObjects {
        gateways,
        policies,
        delete_gateways,
        delete_policies,
    } = cmd
    else {
        return None;
    };
    gateways
        .first()
        .map(|g| ObjectRef::Gateway(g.name.clone()))
        .or_else(|| policies.first().map(|p| ObjectRef::Policy(p.name.clone())))
        .or_else(|| {
            delete_gateways
                .first()
                .map(|n| ObjectRef::Gateway(n.clone()))
        })
        .or_else(|| {
            delete_policies
                .first()
                .map(|n| ObjectRef::Policy(n.clone()))
        })
}

#[cfg(test)]
mod tests;
