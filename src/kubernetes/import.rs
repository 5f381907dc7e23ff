//! `egressd import`: Deckhouse `EgressGateway` and `EgressGatewayPolicy` manifests to egressd
//! gateways and policies, offline.
//!
//! The input is what `kubectl get -o yaml` prints or what an operator keeps in git: one or more
//! YAML documents, each an object or a `List` of objects. Reading it has three steps, and every
//! problem of every step is collected, so that one run names them all:
//!
//! 1. **Read**: each document into the typed resources of `types.rs` (`serde_path_to_error`
//!    names the key of a wrong value).
//! 2. **Map**: each resource into the shape of the file's `[[gateway]]` and `[[policy]]` tables
//!    (`config::schema`). A policy selects pods, which cannot be resolved offline: its sources
//!    come from `--sources NAME=CIDR,...` or the annotation [`SOURCES_ANNOTATION`]; every policy
//!    with neither is named in one error.
//! 3. **Check**: the mapped objects go through `config::parse_json_objects`, the reader and
//!    rules of the admin API's bodies, which are the file's, and (unless they are applied to a
//!    cluster that may hold the gateways they name) `config::check_objects` for the references
//!    between them. There is no second validator here: the errors are the file's, with their
//!    keys turned back into the resource's (`gateways[0].source_ip.virtual_ip_address.ip` is
//!    `EgressGateway "my-egressgw": spec.sourceIP.virtualIPAddress.ip`).
//!
//! What comes out is the model's objects; [`to_toml`] prints them as the configuration file's
//! tables, which `egressd check-config` accepts as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Serialize;

use crate::config::schema::{
    ApplySpec, GatewaySpec, Mode, PolicySpec, PrimarySpec, SourceIpSpec, VipSpec,
};
use crate::config::{self, BodyError, ConfigError, rules};
use crate::model::{Gateway, Policy, Selection};

use super::types::{
    API_VERSION, EgressGateway, EgressGatewayPolicy, EgressGatewayPolicySpec, EgressGatewaySpec,
    SourceIpMode,
};

/// The annotation of an `EgressGatewayPolicy` that gives its sources for an offline import:
/// comma-separated CIDRs, e.g. `"10.77.0.0/24, 10.78.0.0/24"`.
pub const SOURCES_ANNOTATION: &str = "egressd.io/source-cidrs";

/// The sources given on the command line (`--sources NAME=CIDR,...`), by policy name. They win
/// over the annotation: the command line is the more deliberate of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources(BTreeMap<String, Vec<String>>);

impl Sources {
    /// Adds one `--sources` value, `NAME=CIDR[,CIDR...]`. The CIDRs are kept as written: the
    /// policy rules check them with the rest of the policy.
    pub fn add(&mut self, arg: &str) -> Result<(), String> {
        let Some((name, cidrs)) = arg.split_once('=') else {
            return Err(format!(
                "--sources {}: expected NAME=CIDR[,CIDR...], e.g. my-policy=10.77.0.0/24",
                rules::quote(arg)
            ));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(format!(
                "--sources {}: the policy name before '=' is empty",
                rules::quote(arg)
            ));
        }
        let cidrs = split_list(cidrs);
        if cidrs.is_empty() {
            return Err(format!(
                "--sources {}: no CIDR after '='",
                rules::quote(arg)
            ));
        }
        if self.0.insert(name.to_string(), cidrs).is_some() {
            return Err(format!(
                "--sources: policy {} is given twice",
                rules::quote(name)
            ));
        }
        Ok(())
    }

    pub fn from_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Sources, String> {
        let mut s = Sources::default();
        for a in args {
            s.add(a)?;
        }
        Ok(s)
    }
}

/// Comma-separated items, trimmed; empty ones (a trailing comma) are dropped.
fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every problem of an import, each on its own line; never empty when returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportErrors(pub Vec<String>);

impl fmt::Display for ImportErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ImportErrors {}

/// The gateways and policies of an import, checked, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub gateways: Vec<Gateway>,
    pub policies: Vec<Policy>,
    /// Per policy (same order): where its sources came from and the pods it selects, for the
    /// comments of [`to_toml`].
    pub policy_notes: Vec<String>,
    /// Fields of the input egressd does not know and so does not use (a Deckhouse setting
    /// such as `virtualIPAddress.routingTableName`): said, not refused, as a Kubernetes client
    /// ignores fields newer than itself.
    pub warnings: Vec<String>,
}

/// Whether the policies must name gateways of the same input: yes when the result is printed
/// as a configuration file; no when it is applied to a cluster, whose committed gateways count
/// (the cluster checks that reference, as for `egressd apply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum References {
    InInput,
    InCluster,
}

/// Reads, maps and checks `text` (named `input` in messages).
pub fn import(
    text: &str,
    input: &str,
    sources: &Sources,
    references: References,
) -> Result<Imported, ImportErrors> {
    let mut errors = Vec::new();
    let read = read_manifests(text, input, &mut errors)?;
    // The problems of the sources concern the whole input: said after those of each object.
    let mut sources_errors = Vec::new();
    let mapped = map(&read, sources, input, &mut sources_errors);
    if mapped.gateways.is_empty()
        && mapped.policies.is_empty()
        && errors.is_empty()
        && sources_errors.is_empty()
    {
        errors.push(format!(
            "{input}: no EgressGateway or EgressGatewayPolicy ({API_VERSION}) found"
        ));
    }
    let checked = check(&mapped, input, references, &mut errors);
    errors.extend(sources_errors);
    match checked {
        Some((gateways, policies)) if errors.is_empty() => Ok(Imported {
            gateways,
            policies,
            policy_notes: mapped.policies.iter().map(|p| p.note.clone()).collect(),
            warnings: read.ignored,
        }),
        _ => Err(ImportErrors(errors)),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Read
// ---------------------------------------------------------------------------------------------

/// The resources of the input, in order.
#[derive(Debug, Default)]
pub struct Manifests {
    pub gateways: Vec<EgressGateway>,
    pub policies: Vec<EgressGatewayPolicy>,
    /// The fields of `spec` no type has, each with its object.
    pub ignored: Vec<String>,
}

/// Every object of every document; a document that is not YAML at all ends the reading (its
/// parser cannot go on past it), any other problem is recorded and the reading goes on.
fn read_manifests(
    text: &str,
    input: &str,
    errors: &mut Vec<String>,
) -> Result<Manifests, ImportErrors> {
    // Into JSON values first: the kind decides the type, and `List`s hold objects of any kind.
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| {
            ImportErrors(vec![format!(
                "{input}: not valid YAML: {}",
                rules::shorten_lines(&e.to_string())
            )])
        })?;
    let mut out = Manifests::default();
    for (d, doc) in documents.into_iter().enumerate() {
        let document = d + 1;
        if is_list(&doc) {
            let items = match doc.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(_) => {
                    errors.push(format!(
                        "{input}: document {document}: a List whose items is not an array"
                    ));
                    continue;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                let at = format!("document {document}, items[{i}]");
                read_object(item, input, &at, &mut out, errors);
            }
        } else {
            read_object(
                doc,
                input,
                &format!("document {document}"),
                &mut out,
                errors,
            );
        }
    }
    Ok(out)
}

/// The YAML reader's limits, raised to egressd's scale (100 000 policies, each a document of
/// some 20 nodes); its defaults (1 024 documents, 250 000 nodes) stop at about a thousand
/// objects. The limits on anchors and aliases, which guard against inputs that expand
/// exponentially, stay as they are.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 50_000_000,
            max_events: 100_000_000,
            max_total_scalar_bytes: 1 << 30,
        },
    }
}

/// `kind: List` (what `kubectl get -o yaml` prints for several objects), or a typed list such
/// as `EgressGatewayList`.
fn is_list(doc: &serde_json::Value) -> bool {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    kind == "List" || (kind.ends_with("List") && doc.get("items").is_some())
}

fn read_object(
    value: serde_json::Value,
    input: &str,
    at: &str,
    out: &mut Manifests,
    errors: &mut Vec<String>,
) {
    let serde_json::Value::Object(map) = &value else {
        errors.push(format!(
            "{input}: {at}: expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
            json_kind(&value)
        ));
        return;
    };
    let text = |k: &str| map.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .map(rules::quote)
        .unwrap_or_else(|| "(no metadata.name)".to_string());
    let ours = matches!(kind, "EgressGateway" | "EgressGatewayPolicy");
    if !ours || api_version != API_VERSION {
        let what = if kind.is_empty() {
            "an object without kind".to_string()
        } else {
            format!("{kind} {name} ({})", rules::quote(api_version))
        };
        errors.push(format!(
            "{input}: {at}: {what} is not a resource egressd imports; expected kind \
             EgressGateway or EgressGatewayPolicy with apiVersion {API_VERSION}"
        ));
        return;
    }
    let label = format!("{input}: {kind} {name} ({at})");
    let mut ignored = Vec::new();
    match kind {
        "EgressGateway" => match typed::<EgressGateway>(value, &mut ignored) {
            Ok(g) => out.gateways.push(g),
            Err(e) => errors.push(format!("{label}: {e}")),
        },
        _ => match typed::<EgressGatewayPolicy>(value, &mut ignored) {
            Ok(p) => out.policies.push(p),
            Err(e) => errors.push(format!("{label}: {e}")),
        },
    }
    out.ignored.extend(
        ignored
            .into_iter()
            .map(|path| format!("{label}: {path}: not an egressd setting; ignored")),
    );
}

/// `value` as `T`, or the key of the first wrong value and what is wrong with it. The keys
/// under `spec` that `T` has no field for go to `ignored` (those of the root are apiVersion and
/// kind, which the caller read; `status` is not input).
fn typed<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    ignored: &mut Vec<String>,
) -> Result<T, String> {
    let mut note = |path: serde_ignored::Path<'_>| {
        // Option fields add a `?` segment; sequences a bare index.
        let path = path.to_string().replace(".?", "");
        if path.starts_with("spec.") {
            ignored.push(path);
        }
    };
    serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note)).map_err(
        |e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            }
        },
    )
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "nothing",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a sequence",
        serde_json::Value::Object(_) => "a mapping",
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Map
// ---------------------------------------------------------------------------------------------

/// The resources in the shape of the file's tables, with what is needed to word their errors.
#[derive(Debug, Default)]
struct Mapped {
    gateways: Vec<MappedGateway>,
    policies: Vec<MappedPolicy>,
}

#[derive(Debug)]
struct MappedGateway {
    spec: GatewaySpec,
    label: String,
}

#[derive(Debug)]
struct MappedPolicy {
    spec: PolicySpec,
    label: String,
    /// Where `source_cidrs` came from, as a key of the input ("--sources my-policy" or the
    /// annotation).
    sources_key: String,
    note: String,
}

fn object_label(kind: &str, meta: &ObjectMeta) -> String {
    match &meta.name {
        Some(n) => format!("{kind} {}", rules::quote(n)),
        None => format!("{kind} (no metadata.name)"),
    }
}

fn map(read: &Manifests, sources: &Sources, input: &str, errors: &mut Vec<String>) -> Mapped {
    let mut out = Mapped::default();
    for g in &read.gateways {
        out.gateways.push(MappedGateway {
            spec: gateway_spec(g.metadata.name.clone().unwrap_or_default(), &g.spec),
            label: format!("{input}: {}", object_label("EgressGateway", &g.metadata)),
        });
    }
    let mut unmapped = Vec::new();
    let mut used = BTreeSet::new();
    for p in &read.policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let annotation = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCES_ANNOTATION));
        let (source_cidrs, sources_key, from) = if let Some(cidrs) = sources.0.get(&name) {
            used.insert(name.clone());
            (
                cidrs.clone(),
                format!("--sources {}", rules::quote(&name)),
                "--sources",
            )
        } else if let Some(text) = annotation {
            (
                split_list(text),
                format!("metadata.annotations[\"{SOURCES_ANNOTATION}\"]"),
                "the annotation",
            )
        } else {
            unmapped.push(name.clone());
            continue;
        };
        let selects = describe_selectors(&p.spec.selectors);
        out.policies.push(MappedPolicy {
            spec: policy_spec(name, &p.spec, source_cidrs),
            label: format!(
                "{input}: {}",
                object_label("EgressGatewayPolicy", &p.metadata)
            ),
            sources_key,
            note: format!("sources from {from}; in Kubernetes it selects {selects}"),
        });
    }
    if !unmapped.is_empty() {
        let names: Vec<String> = unmapped.iter().map(|n| rules::quote(n)).collect();
        errors.push(format!(
            "{input}: {} EgressGatewayPolicy(s) without sources: {}. Their pod selectors cannot be \
             resolved offline; give the source CIDRs with --sources NAME=CIDR[,CIDR...] or the \
             annotation {SOURCES_ANNOTATION}: \"CIDR[,CIDR...]\"",
            names.len(),
            names.join(", ")
        ));
    }
    let unknown: Vec<String> = sources
        .0
        .keys()
        .filter(|n| !used.contains(*n))
        .map(|n| rules::quote(n))
        .collect();
    if !unknown.is_empty() {
        errors.push(format!(
            "--sources names no EgressGatewayPolicy of {input}: {}",
            unknown.join(", ")
        ));
    }
    out
}

/// An `EgressGateway` as a `[[gateway]]` table: Deckhouse's rules, alphabetical selection with
/// preemption, are the defaults, and Deckhouse has no next hop.
pub fn gateway_spec(name: String, spec: &EgressGatewaySpec) -> GatewaySpec {
    let s = &spec.source_ip;
    GatewaySpec {
        name,
        node_selector: spec.node_selector.clone(),
        selection: Selection::Alphabetical,
        preempt: true,
        source_ip: SourceIpSpec {
            mode: match s.mode {
                SourceIpMode::VirtualIPAddress => Mode::VirtualIp,
                SourceIpMode::PrimaryIPFromEgressGatewayNodeInterface => Mode::PrimaryIp,
            },
            virtual_ip_address: s.virtual_ip_address.as_ref().map(|v| VipSpec {
                ip: v.ip.clone(),
                interfaces: v.interfaces.clone(),
            }),
            primary_ip_from_egress_gateway_node_interface: s
                .primary_ip_from_egress_gateway_node_interface
                .as_ref()
                .map(|p| PrimarySpec {
                    interface_name: p.interface_name.clone(),
                }),
        },
        next_hop: None,
        conntrack_sync: false,
    }
}

/// An `EgressGatewayPolicy` as a `[[policy]]` table, its pod selectors replaced by
/// `source_cidrs`.
pub fn policy_spec(
    name: String,
    spec: &EgressGatewayPolicySpec,
    source_cidrs: Vec<String>,
) -> PolicySpec {
    PolicySpec {
        name,
        egress_gateway_name: spec.egress_gateway_name.clone(),
        source_cidrs,
        destination_cidrs: spec.destination_cidrs.clone(),
        excluded_cidrs: spec.excluded_cidrs.clone(),
    }
}

/// The pods a policy selects, for a comment: `app=backend,io.kubernetes.pod.namespace=my-ns`,
/// terms joined with " or ".
fn describe_selectors(selectors: &[super::types::PodSelectorTerm]) -> String {
    if selectors.is_empty() {
        return "no pods".to_string();
    }
    selectors
        .iter()
        .map(|t| describe_selector(&t.pod_selector))
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {op} ({values})", e.key),
        });
    }
    if parts.is_empty() {
        "every pod".to_string()
    } else {
        parts.join(",")
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Check
// ---------------------------------------------------------------------------------------------

/// The mapped objects through the admin API's reader and rules; errors worded for the input.
fn check(
    mapped: &Mapped,
    input: &str,
    references: References,
    errors: &mut Vec<String>,
) -> Option<(Vec<Gateway>, Vec<Policy>)> {
    if mapped.gateways.is_empty() && mapped.policies.is_empty() {
        return None;
    }
    let body = ApplySpec {
        gateways: mapped.gateways.iter().map(|g| g.spec.clone()).collect(),
        policies: mapped.policies.iter().map(|p| p.spec.clone()).collect(),
    };
    let json = match serde_json::to_vec(&body) {
        Ok(j) => j,
        Err(e) => {
            // Strings and maps of strings always serialize; kept as an error, not a panic.
            errors.push(format!("{input}: cannot serialize the mapped objects: {e}"));
            return None;
        }
    };
    let (gateways, policies) = match config::parse_json_objects(&json, input) {
        Ok(o) => o,
        Err(BodyError::Invalid(e)) => {
            errors.extend(e.iter().map(|e| reword(e, mapped)));
            return None;
        }
        Err(BodyError::Syntax(m)) => {
            errors.push(format!("{input}: {m}"));
            return None;
        }
    };
    if references == References::InInput {
        let before = errors.len();
        errors.extend(
            config::check_objects(&gateways, &policies)
                .iter()
                .map(|e| reword(e, mapped)),
        );
        if errors.len() > before {
            return None;
        }
    }
    Some((gateways, policies))
}

/// An error of the rules, its key (`gateways[1].source_ip.mode`, or `gateway[1]...` from the
/// rules between objects) turned into the resource and its field.
fn reword(e: &ConfigError, mapped: &Mapped) -> String {
    let located = locate(&e.key).and_then(|(list, i, rest)| {
        if list.starts_with("gateway") {
            let g = mapped.gateways.get(i)?;
            Some(format!("{}: {}", g.label, field_path(rest, None)))
        } else {
            let p = mapped.policies.get(i)?;
            Some(format!(
                "{}: {}",
                p.label,
                field_path(rest, Some(&p.sources_key))
            ))
        }
    });
    match located {
        Some(at) => format!("{at}: {}", e.message),
        // Not about one object: said as the rules say it.
        None => e.to_string(),
    }
}

/// `gateways[3].source_ip.mode` → ("gateways", 3, "source_ip.mode").
fn locate(key: &str) -> Option<(&str, usize, &str)> {
    let open = key.find('[')?;
    let list = &key[..open];
    if !matches!(list, "gateways" | "gateway" | "policies" | "policy") {
        return None;
    }
    let close = open + key[open..].find(']')?;
    let i = key[open + 1..close].parse().ok()?;
    let rest = key[close + 1..]
        .strip_prefix('.')
        .unwrap_or(&key[close + 1..]);
    Some((list, i, rest))
}

/// A key below one object, in the resource's names.
fn field_path(rest: &str, sources_key: Option<&str>) -> String {
    if rest.is_empty() {
        return "spec".to_string();
    }
    // The first segment ends at a '.' or '[' (a label key after `node_selector.` may hold
    // either, quoted; it is kept as it is).
    let cut = rest.find(['.', '[']).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(cut);
    let renamed = |s: &str| -> String {
        s.replace("virtual_ip_address", "virtualIPAddress")
            .replace(
                "primary_ip_from_egress_gateway_node_interface",
                "primaryIPFromEgressGatewayNodeInterface",
            )
            .replace("interface_name", "interfaceName")
    };
    match head {
        "name" => format!("metadata.name{tail}"),
        "node_selector" => format!("spec.nodeSelector{tail}"),
        "source_ip" => format!("spec.sourceIP{}", renamed(tail)),
        "egress_gateway_name" => format!("spec.egressGatewayName{tail}"),
        "destination_cidrs" => format!("spec.destinationCIDRs{tail}"),
        "excluded_cidrs" => format!("spec.excludedCIDRs{tail}"),
        "source_cidrs" => format!("{}{tail}", sources_key.unwrap_or("sources")),
        _ => format!("spec ({rest})"),
    }
}

// ---------------------------------------------------------------------------------------------
// One object at a time (the live sync)
// ---------------------------------------------------------------------------------------------

/// One `EgressGateway` of a live cluster through the rules, as `import` checks it: the model's
/// gateway, or every problem in one line, worded for the resource.
pub fn checked_gateway(g: &EgressGateway) -> Result<Gateway, String> {
    let name = g.metadata.name.clone().unwrap_or_default();
    let mapped = Mapped {
        gateways: vec![MappedGateway {
            spec: gateway_spec(name, &g.spec),
            label: object_label("EgressGateway", &g.metadata),
        }],
        policies: Vec::new(),
    };
    let mut errors = Vec::new();
    match check(&mapped, "kubernetes", References::InCluster, &mut errors) {
        Some((mut gateways, _)) if errors.is_empty() && gateways.len() == 1 => {
            Ok(gateways.remove(0))
        }
        _ => Err(errors.join("; ")),
    }
}

/// One `EgressGatewayPolicy` through the rules, its pod selectors resolved to `sources` (the
/// selected pods' addresses): the model's policy, or every problem in one line. Whether its
/// gateway exists is the caller's to say (it knows the cluster's).
pub fn checked_policy(p: &EgressGatewayPolicy, sources: Vec<String>) -> Result<Policy, String> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let mapped = Mapped {
        gateways: Vec::new(),
        policies: vec![MappedPolicy {
            spec: policy_spec(name, &p.spec, sources),
            label: object_label("EgressGatewayPolicy", &p.metadata),
            sources_key: "the selected pods' addresses".to_string(),
            note: String::new(),
        }],
    };
    let mut errors = Vec::new();
    match check(&mapped, "kubernetes", References::InCluster, &mut errors) {
        Some((_, mut policies)) if errors.is_empty() && policies.len() == 1 => {
            Ok(policies.remove(0))
        }
        _ => Err(errors.join("; ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// The objects as the configuration file's `[[gateway]]` and `[[policy]]` tables, each policy
/// with a comment saying where its sources came from and what it selects in Kubernetes.
/// `header` lines become comments at the top.
pub fn to_toml(imported: &Imported, header: &[String]) -> Result<String, toml::ser::Error> {
    #[derive(Serialize)]
    struct Gateways<'a> {
        gateway: [&'a GatewaySpec; 1],
    }
    #[derive(Serialize)]
    struct Policies<'a> {
        policy: [&'a PolicySpec; 1],
    }
    let mut out = String::new();
    for line in header {
        out.push_str(&comment(line));
    }
    for g in &imported.gateways {
        let spec = GatewaySpec::from(g);
        out.push('\n');
        out.push_str(&toml::to_string(&Gateways { gateway: [&spec] })?);
    }
    for (i, p) in imported.policies.iter().enumerate() {
        let spec = PolicySpec::from(p);
        out.push('\n');
        if let Some(note) = imported.policy_notes.get(i) {
            out.push_str(&comment(note));
        }
        out.push_str(&toml::to_string(&Policies { policy: [&spec] })?);
    }
    Ok(out)
}

/// `text` as TOML comment lines (a newline in a comment would end it and start a key).
fn comment(text: &str) -> String {
    text.lines().map(|l| format!("# {l}\n")).collect()
}

#[cfg(test)]
mod tests;
