//! Loading: the file and the `EGRESSD_` environment merged by figment (which remembers where
//! each value came from), read into the types of `schema.rs` by the reader of `de.rs` (every
//! unknown key, wrong type and missing key at once, with its key path), then turned into the
//! effective [`Config`] and model objects while the rules of `rules.rs` are applied field by
//! field. Every problem becomes a [`ConfigError`] naming the file or the variable, the key and
//! what is expected. The admin API's bodies go through the same reader and rules.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Provider, Source};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::de::{self, Problem};
use super::rules::{self, GatewayEntry, Issue, PolicyEntry, index, quote, sub};
use super::schema::{
    self, AdminSpec, ClusterSpec, DataplaneSpec, GatewaySpec, LabelChange, LogSpec, Mode, NodeSpec,
    PRIMARY_MODE, PRIMARY_TABLE, PolicySpec, SourceIpSpec, VIP_MODE, VIP_TABLE,
};
use super::{
    AdminConfig, BodyError, ClusterConfig, Config, ConfigError, ConfigErrors, DataplaneConfig,
    ENV_PREFIX, KubernetesConfig, LogConfig, NodeConfig, Peer, TimingOverrides,
};
use crate::cluster::state::CidrLists;
use crate::model::{Gateway, NextHop, Policy, SourceIp};

const ENV_METADATA_NAME: &str = "environment variable";

// ---------------------------------------------------------------------------------------------
// Sources: the file and the environment as figment providers
// ---------------------------------------------------------------------------------------------

/// One already-parsed source. figment's own `Toml::file` silently yields nothing for a missing
/// file and searches parent directories for relative paths; `Env` can only read the process
/// environment. Reading both ourselves avoids the first two and makes the environment
/// injectable, while figment still does the merging and remembers which source set each value.
struct Layer {
    metadata: Metadata,
    /// Taken by figment's one call of `data` (a copy would double a 100 000-policy tree).
    dict: std::cell::Cell<Dict>,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.take()))
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
        // Scalars stay strings (so `EGRESSD_NODE__NAME=007` keeps its zeros); the reader parses
        // numbers and booleans from environment strings. Arrays and tables use figment's
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

pub(super) fn system_hostname() -> Option<String> {
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

fn toml_dict(text: &str, file: &str) -> Result<Dict, ConfigErrors> {
    toml::from_str::<Dict>(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            key: String::new(),
            message: format!(
                "not valid TOML: {}",
                rules::shorten_lines(e.to_string().trim_end()).replace('\n', "\n    ")
            ),
        }])
    })
}

/// Reads the file's text and the environment into a [`Config`], or every problem.
pub(super) fn load_inner(
    source: Source,
    file_name: &str,
    text: &str,
    env: &[(String, String)],
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let file_dict = toml_dict(text, file_name)?;
    load_dict(source, file_name, file_dict, env, hostname)
}

/// [`load_inner`] after the file's text has been read into a tree.
fn load_dict(
    source: Source,
    file_name: &str,
    file_dict: Dict,
    env: &[(String, String)],
    hostname: &dyn Fn() -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let (env_dict, env_vars) = env_layer(env);
    let figment = Figment::new()
        .merge(Layer {
            metadata: Metadata::from("TOML file", source),
            dict: file_dict.into(),
        })
        .merge(Layer {
            metadata: Metadata::named(ENV_METADATA_NAME),
            dict: env_dict.into(),
        });
    let root = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(Dict::new()));
    let from_env = |tag: Tag| {
        figment
            .get_metadata(tag)
            .is_some_and(|md| md.name == ENV_METADATA_NAME)
    };
    let mut reader = Reader::new(&from_env);
    let config = reader.config(&root, hostname);
    let issues = reader.finish();
    if issues.is_empty()
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
    Err(errors(issues, |key| locator.source_of(key)))
}

/// [`super::load_for_run`]: [`load_inner`], except that a file whose only problems are in its
/// `[[gateway]]` and `[[policy]]` tables yields its other sections (with no gateways and no
/// policies) beside those problems.
pub(super) fn load_for_run_inner(
    source: Source,
    file_name: &str,
    text: &str,
    env: &[(String, String)],
    hostname: &dyn Fn() -> Option<String>,
) -> Result<(Config, Option<ConfigErrors>), ConfigErrors> {
    let errors = match load_inner(source.clone(), file_name, text, env, hostname) {
        Ok(config) => return Ok((config, None)),
        Err(errors) => errors,
    };
    if !errors.iter().all(|e| is_object_key(&e.key)) {
        return Err(errors);
    }
    // The same file and environment without their gateways and policies.
    let Ok(mut dict) = toml_dict(text, file_name) else {
        return Err(errors);
    };
    dict.remove("gateway");
    dict.remove("policy");
    let env: Vec<(String, String)> = env
        .iter()
        .filter(|(name, _)| !is_object_var(name))
        .cloned()
        .collect();
    match load_dict(source, file_name, dict, &env, hostname) {
        Ok(config) => Ok((config, Some(errors))),
        Err(more) => Err(ConfigErrors(errors.0.into_iter().chain(more).collect())),
    }
}

/// Whether an error's key lies in a `[[gateway]]` or `[[policy]]` table (`gateway[2].name`,
/// `policy[0].source_cidrs[1]`, `gateway`).
fn is_object_key(key: &str) -> bool {
    let head = key.split(['[', '.', ' ']).next().unwrap_or_default();
    head == "gateway" || head == "policy"
}

/// Whether an `EGRESSD_…` variable sets a key of the gateways or policies.
fn is_object_var(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX)
        .and_then(|rest| rest.split("__").next())
        .is_some_and(|s| s.eq_ignore_ascii_case("gateway") || s.eq_ignore_ascii_case("policy"))
}

/// Issues as errors; never empty.
fn errors(issues: Vec<Issue>, file_of: impl Fn(&str) -> String) -> ConfigErrors {
    let mut errors: Vec<ConfigError> = issues
        .into_iter()
        .map(|i| ConfigError {
            file: file_of(&i.key),
            key: i.key,
            message: i.message,
        })
        .collect();
    if errors.is_empty() {
        // Unreachable by construction (every missing piece comes with an issue), but never
        // report failure without a reason.
        errors.push(ConfigError {
            file: file_of(""),
            key: String::new(),
            message: "the input is invalid".to_string(),
        });
    }
    ConfigErrors(errors)
}

/// `egressd apply` input: `[[gateway]]` and `[[policy]]` tables in the file's syntax; a policy
/// may name a gateway that is not in the document (the cluster checks that reference against
/// the committed objects).
pub(super) fn parse_objects(
    text: &str,
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), ConfigErrors> {
    let dict = toml_dict(text, source_name)?;
    objects_body(&dict, &["gateway", "policy"], source_name)
}

/// The TOML body of `POST /v1/apply`: unreadable text is a syntax error, the rest as
/// [`parse_objects`].
pub(super) fn parse_toml_body(
    body: &[u8],
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| BodyError::Syntax(format!("the TOML body is not UTF-8: {e}")))?;
    let dict = toml_dict(text, source_name).map_err(|e| BodyError::Syntax(e.to_string()))?;
    objects_body(&dict, &["gateway", "policy"], source_name).map_err(BodyError::Invalid)
}

/// The JSON body of `POST /v1/apply`: `{"gateways": [...], "policies": [...]}`.
pub(super) fn parse_json_objects(
    body: &[u8],
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), BodyError> {
    let value = json_value(body)?;
    let Value::Dict(_, dict) = &value else {
        return Err(BodyError::Invalid(one_error(
            source_name,
            "",
            format!(
                "expected a JSON object {{\"gateways\": [...], \"policies\": [...]}}, found {}",
                describe(&value)
            ),
        )));
    };
    objects_body(dict, &["gateways", "policies"], source_name).map_err(BodyError::Invalid)
}

/// The body of `POST /v1/nodes/{name}/labels`, with the label rules applied.
pub(super) fn parse_label_change(body: &[u8], source_name: &str) -> Result<LabelChange, BodyError> {
    let value = json_value(body)?;
    let no_env = |_: Tag| false;
    let mut reader = Reader::new(&no_env);
    let change = reader.read::<LabelChange>(&value, "");
    if let Some(c) = &change {
        reader.check("key", rules::label_key(&c.key));
        if let Some(v) = &c.value {
            reader.check("value", rules::label_value(v));
        }
    }
    let issues = reader.finish();
    match change {
        Some(c) if issues.is_empty() => Ok(c),
        _ => Err(BodyError::Invalid(errors(issues, |_| {
            source_name.to_string()
        }))),
    }
}

/// The body of `POST /v1/policies/{name}/cidrs`: each CIDR checked as in a policy, none both
/// added and removed, and something to change.
pub(super) fn parse_cidr_edit(
    body: &[u8],
    source_name: &str,
) -> Result<(CidrLists, CidrLists), BodyError> {
    let value = json_value(body)?;
    let no_env = |_: Tag| false;
    let mut reader = Reader::new(&no_env);
    let edit = reader.read::<schema::CidrEdit>(&value, "");
    let mut lists = |spec: &schema::CidrListsSpec, at: &str| CidrLists {
        source_cidrs: reader
            .cidrs(&spec.source_cidrs, &sub(at, "source_cidrs"), false)
            .unwrap_or_default(),
        destination_cidrs: reader
            .cidrs(
                &spec.destination_cidrs,
                &sub(at, "destination_cidrs"),
                false,
            )
            .unwrap_or_default(),
        excluded_cidrs: reader
            .cidrs(&spec.excluded_cidrs, &sub(at, "excluded_cidrs"), false)
            .unwrap_or_default(),
    };
    let parsed = edit
        .as_ref()
        .map(|e| (lists(&e.add, "add"), lists(&e.remove, "remove")));
    if let Some((add, remove)) = &parsed {
        for ((key, a), (_, r)) in add.named().into_iter().zip(remove.named()) {
            let removed: BTreeSet<&IpNet> = r.iter().collect();
            for (j, net) in a.iter().enumerate() {
                if removed.contains(net) {
                    reader.push(
                        index(&sub("add", key), j),
                        format!("{net} is both added and removed"),
                    );
                }
            }
        }
        // Said only of an edit that names no CIDR at all, not of one whose CIDRs were refused.
        if edit
            .as_ref()
            .is_some_and(|e| e.add.is_empty() && e.remove.is_empty())
        {
            reader.push(
                "",
                "nothing to change: name CIDRs to add or to remove".to_string(),
            );
        }
    }
    let issues = reader.finish();
    match parsed {
        Some(edit) if issues.is_empty() => Ok(edit),
        _ => Err(BodyError::Invalid(errors(issues, |_| {
            source_name.to_string()
        }))),
    }
}

/// The body of `POST /v1/members`, with the name and address rules applied; the address comes
/// back normalized.
pub(super) fn parse_member_add(
    body: &[u8],
    source_name: &str,
) -> Result<schema::MemberAdd, BodyError> {
    let value = json_value(body)?;
    let no_env = |_: Tag| false;
    let mut reader = Reader::new(&no_env);
    let mut add = reader.read::<schema::MemberAdd>(&value, "");
    if let Some(a) = &mut add {
        reader.check("name", rules::object_name(&a.name));
        match rules::socket_addr(&a.address) {
            Ok(s) if s.ip().is_unspecified() || s.port() == 0 => reader.push(
                "address",
                format!(
                    "{s} cannot be connected to; expected the new node's peer address and port \
                     (its cluster.listen)"
                ),
            ),
            Ok(s) => a.address = s.to_string(),
            Err(m) => reader.push("address", m),
        }
    }
    let issues = reader.finish();
    match add {
        Some(a) if issues.is_empty() => Ok(a),
        _ => Err(BodyError::Invalid(errors(issues, |_| {
            source_name.to_string()
        }))),
    }
}

fn json_value(body: &[u8]) -> Result<Value, BodyError> {
    serde_json::from_slice::<Value>(body)
        .map_err(|e| BodyError::Syntax(rules::shorten_lines(&format!("not valid JSON: {e}"))))
}

fn one_error(file: &str, key: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.to_string(),
        key: key.to_string(),
        message,
    }])
}

/// The objects of a body; `known` are the keys of its two lists.
fn objects_body(
    dict: &Dict,
    known: &'static [&'static str; 2],
    source_name: &str,
) -> Result<(Vec<Gateway>, Vec<Policy>), ConfigErrors> {
    let no_env = |_: Tag| false;
    let mut reader = Reader::new(&no_env);
    reader.unknown_keys(dict, "", known);
    let keys = (known[0], known[1]);
    let (gateways, policies) = reader.objects(dict, keys, false);
    let issues = reader.finish();
    if !issues.is_empty() {
        return Err(errors(issues, |_| source_name.to_string()));
    }
    if gateways.is_empty() && policies.is_empty() {
        return Err(one_error(
            source_name,
            "",
            format!(
                "nothing to apply: expected {} or {}",
                if keys.0 == "gateway" {
                    "[[gateway]]"
                } else {
                    "\"gateways\""
                },
                if keys.1 == "policy" {
                    "[[policy]] tables"
                } else {
                    "\"policies\""
                }
            ),
        ));
    }
    Ok((gateways, policies))
}

// ---------------------------------------------------------------------------------------------
// Where a value came from
// ---------------------------------------------------------------------------------------------

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
// Problems as messages
// ---------------------------------------------------------------------------------------------

/// The key path as a pattern of [`schema::expected`]: indices become `[]`, label keys `*`.
fn pattern(key: &str) -> String {
    let mut out = String::new();
    let mut prev: Option<String> = None;
    for seg in parse_key_path(key) {
        match seg {
            Seg::Index(_) => out.push_str("[]"),
            Seg::Key(k) => {
                let k = match (prev.as_deref(), k.as_str()) {
                    (Some("labels" | "node_selector"), _) => "*".to_string(),
                    (None, "gateways") => "gateway".to_string(),
                    (None, "policies") => "policy".to_string(),
                    _ => k,
                };
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&k);
                prev = Some(k);
            }
        }
    }
    out
}

/// serde's wording of a type, as a person would say it.
fn plain(expected: &str) -> String {
    match expected {
        "a boolean" => "true or false".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        "a borrowed string" | "a string" => "a string".into(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "i8" | "i16" | "i32" | "i64" | "i128" => {
            "an integer".into()
        }
        e if e.starts_with("struct ") => "a table".into(),
        e => e.to_string(),
    }
}

fn last_key(key: &str) -> String {
    match parse_key_path(key).pop() {
        Some(Seg::Key(k)) => k,
        _ => "value".to_string(),
    }
}

fn message(key: &str, problem: Problem) -> String {
    let pattern = pattern(key);
    let hint = schema::expected(&pattern);
    let is_label_value = pattern.ends_with("labels.*") || pattern.ends_with("node_selector.*");
    match problem {
        Problem::UnknownKey { .. } if key == "cluster.secret_file" => "removed: peers no \
             longer share a secret but authenticate each other with mutual TLS; replace it \
             with [cluster.tls] (ca_file, cert_file, key_file; made by `egressd tls init-ca` \
             and `egressd tls issue NODE`), see the README's upgrade notes"
            .to_string(),
        Problem::UnknownKey { known } => {
            let hint = match rules::suggest(&last_key(key), known) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => String::new(),
            };
            format!("unknown key{hint} (known keys here: {})", known.join(", "))
        }
        Problem::Missing => match hint {
            Some(h) => format!("missing; expected {h}"),
            None => "missing".to_string(),
        },
        Problem::WrongType { found, .. } if is_label_value && found == "a table" => {
            "expected a string, found a table; quote label keys that contain dots, e.g. \"node-role.deckhouse.io/egress\" = \"\"".to_string()
        }
        Problem::WrongType { found, expected } => {
            // A hint that describes the content rather than the kind gets the kind in front.
            let kind = plain(&expected);
            let expected = match hint {
                None => kind,
                Some(h) if kind == "an array" && !h.starts_with("an array") => {
                    format!("an array ({h})")
                }
                Some(h) if kind == "a table" && !h.starts_with('a') => format!("a table ({h})"),
                Some(h) => h,
            };
            format!("expected {expected}, found {found}")
        }
        Problem::OutOfRange { found, expected } => format!(
            "{found} is out of range; expected {}",
            hint.unwrap_or_else(|| plain(&expected))
        ),
        Problem::Invalid { found, expected } => format!(
            "{found} is not valid here; expected {}",
            hint.unwrap_or_else(|| plain(&expected))
        ),
        Problem::UnknownVariant { value, expected } => {
            let what = last_key(key);
            let case = expected
                .iter()
                .find(|k| k.eq_ignore_ascii_case(&value))
                .map(|k| format!(" ({what}s are case-sensitive: did you mean {k:?}?)"))
                .unwrap_or_default();
            let listed = expected
                .iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(" or ");
            format!(
                "unknown {what} {}{case}; expected {}",
                quote(&value),
                hint.unwrap_or(listed)
            )
        }
        Problem::NotAnInteger(s) => format!(
            "{} is not an integer; expected {}",
            quote(&s),
            hint.unwrap_or_else(|| "an integer".to_string())
        ),
        Problem::NotABoolean(s) => {
            format!("{} is not a boolean; expected true or false", quote(&s))
        }
        Problem::Custom(m) => m,
    }
}

/// How a value is described in "found ..." when the reader cannot even start on it.
fn describe(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("the string {}", quote(s)),
        Value::Char(_, c) => format!("the character {c:?}"),
        Value::Bool(_, b) => format!("the boolean {b}"),
        Value::Num(_, n) => match n.to_f64() {
            Some(f) => format!("the number {f}"),
            None => match (n.to_i128(), n.to_u128()) {
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

// ---------------------------------------------------------------------------------------------
// The reader: schema types in, configuration and model objects out
// ---------------------------------------------------------------------------------------------

/// Collects every issue. Problems of the reader (unknown keys, wrong types, missing keys) are
/// kept; issues of the rules are dropped where they concern a placeholder the reader put in
/// place of a broken value.
pub(super) struct Reader<'a> {
    from_env: &'a dyn Fn(Tag) -> bool,
    issues: Vec<(Issue, bool)>,
    broken: BTreeSet<String>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(from_env: &'a dyn Fn(Tag) -> bool) -> Self {
        Reader {
            from_env,
            issues: Vec::new(),
            broken: BTreeSet::new(),
        }
    }

    /// Every issue, in the order found, without those about placeholders.
    pub(super) fn finish(self) -> Vec<Issue> {
        let broken = self.broken;
        self.issues
            .into_iter()
            .filter(|(i, from_rules)| !from_rules || !de::is_below_any(&broken, &i.key))
            .map(|(i, _)| i)
            .collect()
    }

    fn read<T: DeserializeOwned>(&mut self, value: &Value, at: &str) -> Option<T> {
        let read = de::read::<T>(value, at, self.from_env);
        for (key, problem) in read.problems {
            let message = message(&key, problem);
            self.issues.push((Issue::new(key, message), false));
        }
        self.broken.extend(read.broken);
        read.value
    }

    fn is_broken(&self, key: &str) -> bool {
        de::is_below_any(&self.broken, key)
    }

    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push((Issue::new(key, message), true));
    }

    fn check(&mut self, key: impl Into<String>, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => true,
            Err(m) => {
                self.push(key, m);
                false
            }
        }
    }

    /// [`Self::check`] of `at.field`, the key made only when there is an issue.
    fn check_at(&mut self, at: &str, field: &str, result: Result<(), String>) -> bool {
        result.map_err(|m| self.push(sub(at, field), m)).is_ok()
    }

    fn extend(&mut self, issues: Vec<Issue>) -> bool {
        let ok = issues.is_empty();
        self.issues.extend(issues.into_iter().map(|i| (i, true)));
        ok
    }

    fn parse<T>(&mut self, key: impl Into<String>, result: Result<T, String>) -> Option<T> {
        result.map_err(|m| self.push(key, m)).ok()
    }

    /// Keys of a table that are none of `known` (the root of a file or a body).
    fn unknown_keys(&mut self, dict: &Dict, at: &str, known: &'static [&'static str]) {
        for k in dict.keys() {
            if !known.contains(&k.as_str()) {
                let key = rules::map_key(at, k);
                let message = message(&key, Problem::UnknownKey { known });
                self.issues.push((Issue::new(key, message), false));
            }
        }
    }

    // ---- the file ----

    pub(super) fn config(
        &mut self,
        root: &Value,
        hostname: &dyn Fn() -> Option<String>,
    ) -> Option<Config> {
        let Value::Dict(_, dict) = root else {
            self.push("", format!("expected a table, found {}", describe(root)));
            return None;
        };
        self.unknown_keys(dict, "", de::fields_of::<schema::FileSpec>());
        let empty = Value::from(Dict::new());
        let section = |name: &str| dict.get(name).unwrap_or(&empty);

        let node = self
            .read::<NodeSpec>(section("node"), "node")
            .and_then(|s| self.node(s, hostname));
        let cluster = self
            .read::<ClusterSpec>(section("cluster"), "cluster")
            .and_then(|s| self.cluster(s));
        let admin = self
            .read::<AdminSpec>(section("admin"), "admin")
            .and_then(|s| self.admin(s));
        let dataplane = self
            .read::<DataplaneSpec>(section("dataplane"), "dataplane")
            .and_then(|s| self.dataplane(s));
        let log = self
            .read::<LogSpec>(section("log"), "log")
            .and_then(|s| self.log(s));
        let kubernetes = self
            .read::<schema::KubernetesSpec>(section("kubernetes"), "kubernetes")
            .and_then(|s| self.kubernetes(s));
        if let (Some(node), Some(cluster)) = (&node, &cluster) {
            self.membership(node, cluster);
        }
        let (gateways, policies) = self.objects(dict, ("gateway", "policy"), true);
        Some(Config {
            node: node?,
            cluster: cluster?,
            admin: admin?,
            dataplane: dataplane?,
            log: log?,
            kubernetes: kubernetes?,
            gateways,
            policies,
        })
    }

    fn node(
        &mut self,
        spec: NodeSpec,
        hostname: &dyn Fn() -> Option<String>,
    ) -> Option<NodeConfig> {
        let name = match spec.name {
            Some(n) => self.check("node.name", rules::object_name(&n)).then_some(n),
            None => match hostname() {
                Some(h) => match rules::object_name(&h) {
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
        let labels_ok = self.extend(rules::labels(&spec.labels, "node.labels"));
        Some(NodeConfig {
            name: name?,
            labels: labels_ok.then_some(spec.labels)?,
        })
    }

    fn path(&mut self, key: &str, p: Option<PathBuf>) -> Option<Option<PathBuf>> {
        match p {
            Some(p) if p.as_os_str().is_empty() => {
                self.push(key, "must not be empty; expected a path");
                None
            }
            p => Some(p),
        }
    }

    fn range(
        &mut self,
        key: &str,
        value: Option<u64>,
        range: &std::ops::RangeInclusive<u64>,
    ) -> Option<Option<u64>> {
        match value {
            Some(n) if !range.contains(&n) => {
                let expected = schema::expected(&pattern(key)).unwrap_or_default();
                self.push(key, format!("{n} is out of range; expected {expected}"));
                None
            }
            v => Some(v),
        }
    }

    fn cluster(&mut self, spec: ClusterSpec) -> Option<ClusterConfig> {
        let defaults = ClusterConfig::default();
        let listen = match &spec.listen {
            Some(s) => self.parse("cluster.listen", rules::socket_addr(s)),
            None => Some(defaults.listen),
        };
        let peers = self.peers(&spec.peers);
        let data_dir = self.path("cluster.data_dir", spec.data_dir);
        let tls = match spec.tls {
            None => Some(None),
            Some(t) => {
                let ca = self.path("cluster.tls.ca_file", Some(t.ca_file));
                let cert = self.path("cluster.tls.cert_file", Some(t.cert_file));
                let key = self.path("cluster.tls.key_file", Some(t.key_file));
                match (ca, cert, key) {
                    (Some(Some(ca_file)), Some(Some(cert_file)), Some(Some(key_file))) => {
                        Some(Some(crate::tls::TlsFiles {
                            ca_file,
                            cert_file,
                            key_file,
                        }))
                    }
                    _ => None,
                }
            }
        };
        let mut timing = TimingOverrides::default();
        let mut timing_ok = true;
        for (key, value, slot) in [
            ("heartbeat_ms", spec.heartbeat_ms, &mut timing.heartbeat_ms),
            (
                "election_timeout_min_ms",
                spec.election_timeout_min_ms,
                &mut timing.election_timeout_min_ms,
            ),
            (
                "election_timeout_max_ms",
                spec.election_timeout_max_ms,
                &mut timing.election_timeout_max_ms,
            ),
            (
                "report_interval_ms",
                spec.report_interval_ms,
                &mut timing.report_interval_ms,
            ),
            ("lease_ms", spec.lease_ms, &mut timing.lease_ms),
            (
                "failover_timeout_ms",
                spec.failover_timeout_ms,
                &mut timing.failover_timeout_ms,
            ),
        ] {
            let key = format!("cluster.{key}");
            match self.range(&key, value, &schema::TIMING_MS) {
                Some(v) => *slot = v,
                None => timing_ok = false,
            }
            timing_ok &= !self.is_broken(&key);
        }
        let cluster = ClusterConfig {
            listen: listen?,
            peers: peers?,
            data_dir: data_dir?.unwrap_or(defaults.data_dir),
            tls: tls?,
            profile: spec.profile,
            timing,
        };
        if timing_ok && !self.is_broken("cluster.profile") {
            self.timing_order(&cluster);
        }
        if cluster.peers.len() > 1 && cluster.tls.is_none() && !self.is_broken("cluster.tls") {
            self.push(
                "cluster.tls",
                "is required when cluster.peers lists more than one node: peers authenticate \
                 each other with mutual TLS; add [cluster.tls] with ca_file, cert_file and \
                 key_file (made by `egressd tls init-ca` and `egressd tls issue NODE`)",
            );
        }
        Some(cluster)
    }

    fn timing_order(&mut self, cluster: &ClusterConfig) {
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
        // Grants are dated from the last heartbeat a quorum answered: openraft sends one every
        // 1.5 intervals, and the leader asks directly past that; the node renews one report
        // interval later.
        if t.heartbeat_every_ms() + t.report_interval_ms >= t.lease_ms {
            self.push(
                "cluster.heartbeat_ms",
                format!(
                    "1.5 x heartbeat_ms ({}) + report_interval_ms ({}) must be below lease_ms \
                     ({}): the leader's grants last lease_ms from the last heartbeat a quorum \
                     answered (openraft sends one every 1.5 heartbeat intervals), and a lease \
                     that ends before the next report renews it makes the node drop its \
                     gateways between reports",
                    t.heartbeat_every_ms(),
                    t.report_interval_ms,
                    t.lease_ms
                ),
            );
        }
        // The lease protocol's own relations (src/lease.rs): they decide how fast failover
        // is; safety does not depend on them.
        let lease = t.lease_timing();
        for problem in lease.check(std::time::Duration::from_millis(t.report_interval_ms)) {
            let key = if problem.starts_with("report_interval_ms") {
                "cluster.lease_ms"
            } else if problem.starts_with("failover_timeout_ms") {
                "cluster.failover_timeout_ms"
            } else {
                "cluster"
            };
            self.push(key, problem);
        }
    }

    fn peers(&mut self, specs: &[schema::PeerSpec]) -> Option<Vec<Peer>> {
        let mut out = Vec::new();
        let mut ok = true;
        let mut names: std::collections::HashMap<&str, usize> = Default::default();
        let mut addrs: std::collections::HashMap<SocketAddr, usize> = Default::default();
        for (i, p) in specs.iter().enumerate() {
            let key = index("cluster.peers", i);
            let name_key = sub(&key, "name");
            let address_key = sub(&key, "address");
            let name = self
                .check(&name_key, rules::object_name(&p.name))
                .then_some(p.name.as_str());
            let address = self.parse(&address_key, rules::socket_addr(&p.address));
            if let Some(n) = name {
                if let Some(first) = names.get(n) {
                    self.push(
                        &name_key,
                        format!(
                            "duplicate peer name {}; already used by cluster.peers[{first}]",
                            quote(n)
                        ),
                    );
                } else {
                    names.insert(n, i);
                }
            }
            if let Some(a) = &address {
                if a.ip().is_unspecified() || a.port() == 0 {
                    self.push(
                        &address_key,
                        format!("{a} cannot be connected to; expected the peer's reachable address and port"),
                    );
                } else if let Some(first) = addrs.get(a) {
                    self.push(
                        &address_key,
                        format!(
                            "duplicate peer address {a}; already used by cluster.peers[{first}]"
                        ),
                    );
                } else {
                    addrs.insert(*a, i);
                }
            }
            match (name, address) {
                (Some(name), Some(address)) if !self.is_broken(&key) => out.push(Peer {
                    name: name.to_string(),
                    address,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn membership(&mut self, node: &NodeConfig, cluster: &ClusterConfig) {
        if cluster.peers.is_empty() {
            return;
        }
        let listed: Vec<&str> = cluster.peers.iter().map(|p| p.name.as_str()).collect();
        let Some(me) = cluster.peers.iter().find(|p| p.name == node.name) else {
            self.push(
                "node.name",
                format!(
                    "{} is not among cluster.peers ({}); list every voter, this node included, or set node.name to this node's peer name",
                    quote(&node.name),
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

    fn admin(&mut self, spec: AdminSpec) -> Option<AdminConfig> {
        let listen = match &spec.listen {
            Some(s) => self.parse("admin.listen", rules::socket_addr(s)),
            None => Some(AdminConfig::default().listen),
        };
        let token_file = self.path("admin.token_file", spec.token_file);
        let tls = match spec.tls {
            None => Some(None),
            Some(t) => {
                let cert = self.path("admin.tls.cert_file", Some(t.cert_file));
                let key = self.path("admin.tls.key_file", Some(t.key_file));
                let ca = self.path("admin.tls.ca_file", t.ca_file);
                match (cert, key, ca) {
                    (Some(Some(cert_file)), Some(Some(key_file)), Some(ca_file)) => {
                        Some(Some(super::AdminTlsConfig {
                            cert_file,
                            key_file,
                            ca_file,
                        }))
                    }
                    _ => None,
                }
            }
        };
        Some(AdminConfig {
            listen: listen?,
            token_file: token_file?,
            tls: tls?,
        })
    }

    fn dataplane(&mut self, spec: DataplaneSpec) -> Option<DataplaneConfig> {
        let d = DataplaneConfig::default();
        let nft_table = match spec.nft_table {
            Some(t) => self
                .check("dataplane.nft_table", rules::nft_table(&t))
                .then_some(t),
            None => Some(d.nft_table),
        };
        let garp_count = self.range("dataplane.garp_count", spec.garp_count, &schema::GARP_COUNT);
        let garp_interval_ms = self.range(
            "dataplane.garp_interval_ms",
            spec.garp_interval_ms,
            &schema::GARP_INTERVAL_MS,
        );
        let garp_refresh_secs = self.range(
            "dataplane.garp_refresh_secs",
            spec.garp_refresh_secs,
            &schema::GARP_REFRESH_SECS,
        );
        let tcp_on_policy_change = match spec.tcp_on_policy_change {
            None => Some(d.tcp_on_policy_change),
            Some(s) => {
                let p = crate::dataplane::conntrack::TcpPolicy::parse(&s);
                if p.is_none() {
                    self.push(
                        "dataplane.tcp_on_policy_change",
                        format!(
                            "{} is not a choice; expected \"keep\" (running TCP connections \
                             keep their translation) or \"reset\" (they are ended with a reset)",
                            rules::quote(&s)
                        ),
                    );
                }
                p
            }
        };
        let v4 = |s: &str| match rules::ip(s)? {
            IpAddr::V4(a) => Ok(a),
            IpAddr::V6(_) => Err(format!(
                "{} is IPv6; expected an IPv4 address",
                rules::quote(s)
            )),
        };
        let conntrack_sync_address = match &spec.conntrack_sync_address {
            None => Some(None),
            Some(a) => self
                .parse("dataplane.conntrack_sync_address", v4(a))
                .map(Some),
        };
        let conntrack_sync_port = self.range(
            "dataplane.conntrack_sync_port",
            spec.conntrack_sync_port,
            &schema::SYNC_PORT,
        );
        Some(DataplaneConfig {
            conntrack_sync_address: conntrack_sync_address?,
            conntrack_sync_port: conntrack_sync_port?
                .map_or(Some(d.conntrack_sync_port), |n| u16::try_from(n).ok())?,
            conntrackd: spec.conntrackd.unwrap_or(d.conntrackd),
            tcp_on_policy_change: tcp_on_policy_change?,
            nft_table: nft_table?,
            garp_count: garp_count?.map_or(Some(d.garp_count), |n| u32::try_from(n).ok())?,
            garp_interval_ms: garp_interval_ms?.unwrap_or(d.garp_interval_ms),
            garp_refresh_secs: garp_refresh_secs?.unwrap_or(d.garp_refresh_secs),
            manage_forwarding: spec.manage_forwarding.unwrap_or(d.manage_forwarding),
        })
    }

    fn log(&mut self, spec: LogSpec) -> Option<LogConfig> {
        let d = LogConfig::default();
        let level = match spec.level {
            None => Some(d.level),
            Some(s) if s.trim().is_empty() => {
                self.push("log.level", "must not be empty; expected a level such as \"info\" or a filter such as \"egressd=debug,info\"");
                None
            }
            Some(s) => match tracing_subscriber::EnvFilter::builder().parse(&s) {
                Ok(_) => Some(s),
                Err(e) => {
                    self.push(
                        "log.level",
                        format!("{} is not a valid log filter ({e}); expected a level such as \"info\" or a filter such as \"egressd=debug,info\"", quote(&s)),
                    );
                    None
                }
            },
        };
        Some(LogConfig {
            format: spec.format.unwrap_or(d.format),
            level: level?,
        })
    }

    fn kubernetes(&mut self, spec: schema::KubernetesSpec) -> Option<KubernetesConfig> {
        let enabled = spec.enabled.unwrap_or(false);
        if enabled && !cfg!(feature = "kubernetes") {
            self.push(
                "kubernetes.enabled",
                "this egressd was built without the Kubernetes adapter (cargo feature \
                 `kubernetes`); use the released binary or the .deb, which have it, or set \
                 enabled = false",
            );
            return None;
        }
        if let Some(c) = &spec.context
            && c.trim().is_empty()
        {
            self.push(
                "kubernetes.context",
                "must not be empty; leave it out for the kubeconfig's current context",
            );
            return None;
        }
        if spec.context.is_some() && spec.kubeconfig.is_none() {
            self.push(
                "kubernetes.context",
                "a context needs kubernetes.kubeconfig (the in-cluster service account has none)",
            );
            return None;
        }
        Some(KubernetesConfig {
            enabled,
            kubeconfig: spec.kubeconfig,
            context: spec.context,
        })
    }

    // ---- gateways and policies ----

    /// The lists of gateways and policies under `keys` in `root`, each object read and checked
    /// on its own, then the rules between them (references to a missing gateway only if
    /// `references`). Returns the objects that could be read whole.
    fn objects(
        &mut self,
        root: &Dict,
        keys: (&str, &str),
        references: bool,
    ) -> (Vec<Gateway>, Vec<Policy>) {
        let (gateway_key, policy_key) = keys;
        let mut gateway_specs = Vec::new();
        let mut gateways = Vec::new();
        for (i, item) in self.list(root, gateway_key).iter().enumerate() {
            let at = index(gateway_key, i);
            if let Some(spec) = self.read::<GatewaySpec>(item, &at) {
                gateways.push((i, self.gateway(&spec, &at)));
                gateway_specs.push((i, spec));
            }
        }
        let mut policy_specs = Vec::new();
        let mut policies = Vec::new();
        for (i, item) in self.list(root, policy_key).iter().enumerate() {
            let at = index(policy_key, i);
            if let Some(spec) = self.read::<PolicySpec>(item, &at) {
                policies.push((i, self.policy(&spec, &at)));
                policy_specs.push((i, spec));
            }
        }

        let nothing_broken = self.broken.is_empty();
        let readable = |at: &str, i: usize, field: &str| {
            nothing_broken || !self.is_broken(&sub(&index(at, i), field))
        };
        let gateway_entries: Vec<GatewayEntry<'_>> = gateway_specs
            .iter()
            .zip(&gateways)
            .map(|((i, spec), (_, g))| GatewayEntry {
                index: *i,
                name: readable(gateway_key, *i, "name").then_some(spec.name.as_str()),
                gateway: g.as_ref(),
            })
            .collect();
        let policy_entries: Vec<PolicyEntry<'_>> = policy_specs
            .iter()
            .zip(&policies)
            .map(|((i, spec), (_, p))| PolicyEntry {
                index: *i,
                name: readable(policy_key, *i, "name").then_some(spec.name.as_str()),
                gateway_name: readable(policy_key, *i, "egress_gateway_name")
                    .then_some(spec.egress_gateway_name.as_str()),
                policy: p.as_ref(),
            })
            .collect();
        let between = rules::between(&gateway_entries, &policy_entries, references, keys);
        drop(gateway_entries);
        drop(policy_entries);
        self.extend(between);
        (
            gateways.into_iter().filter_map(|(_, g)| g).collect(),
            policies.into_iter().filter_map(|(_, p)| p).collect(),
        )
    }

    /// The elements of the array at `key` in `root` (each object is then read on its own, so
    /// that a broken one costs only itself).
    fn list<'v>(&mut self, root: &'v Dict, key: &str) -> &'v [Value] {
        match root.get(key) {
            None => &[],
            Some(Value::Array(_, items)) => items,
            Some(v) => {
                let expected = schema::expected(&pattern(key)).unwrap_or_else(|| "an array".into());
                self.issues.push((
                    Issue::new(key, format!("expected {expected}, found {}", describe(v))),
                    false,
                ));
                &[]
            }
        }
    }

    /// A gateway from its spec, with the field rules applied field by field (so that one broken
    /// field does not hide the others) and, once whole, [`rules::gateway_coherence`].
    fn gateway(&mut self, spec: &GatewaySpec, at: &str) -> Option<Gateway> {
        if self.is_broken(at) {
            return None;
        }
        let name_ok = self.check_at(at, "name", rules::object_name(&spec.name));
        if !spec.node_selector.is_empty() {
            self.extend(rules::labels(
                &spec.node_selector,
                &sub(at, "node_selector"),
            ));
        }
        let source_ip = self.source_ip(&spec.source_ip, &sub(at, "source_ip"));
        let next_hop = match &spec.next_hop {
            None => Some(None),
            Some(nh) => {
                let key = sub(at, "next_hop");
                let ip = self
                    .parse(sub(&key, "ip"), rules::ip(&nh.ip))
                    .filter(|ip| self.check(sub(&key, "ip"), rules::unicast(ip)));
                let iface_ok =
                    self.check(sub(&key, "interface"), rules::interface_name(&nh.interface));
                ip.filter(|_| iface_ok).map(|ip| {
                    Some(NextHop {
                        ip,
                        interface: nh.interface.clone(),
                    })
                })
            }
        };
        let g = Gateway {
            name: spec.name.clone(),
            node_selector: spec.node_selector.clone(),
            selection: spec.selection,
            preempt: spec.preempt,
            source_ip: source_ip?,
            next_hop: next_hop?,
            conntrack_sync: spec.conntrack_sync,
        };
        self.extend(rules::gateway_coherence(&g, at));
        name_ok.then_some(g)
    }

    fn source_ip(&mut self, spec: &SourceIpSpec, at: &str) -> Option<SourceIp> {
        if self.is_broken(&sub(at, "mode")) {
            return None;
        }
        let (mode, table, other, other_mode) = match spec.mode {
            Mode::VirtualIp => (VIP_MODE, VIP_TABLE, PRIMARY_TABLE, PRIMARY_MODE),
            Mode::PrimaryIp => (PRIMARY_MODE, PRIMARY_TABLE, VIP_TABLE, VIP_MODE),
        };
        let other_given = match spec.mode {
            Mode::VirtualIp => spec.primary_ip_from_egress_gateway_node_interface.is_some(),
            Mode::PrimaryIp => spec.virtual_ip_address.is_some(),
        };
        if other_given {
            self.push(
                sub(at, other),
                format!(
                    "belongs to mode \"{other_mode}\", but mode is \"{mode}\"; remove it or change the mode"
                ),
            );
        }
        let key = sub(at, table);
        let missing = |r: &mut Self| {
            let example = if table == VIP_TABLE {
                format!("{table} = {{ ip = \"198.18.0.50\", interfaces = [\"eth1\"] }}")
            } else {
                format!("{table} = {{ interface_name = \"eth1\" }}")
            };
            r.push(
                &key,
                format!("missing; mode \"{mode}\" needs its settings: {example}"),
            );
            None
        };
        match spec.mode {
            Mode::VirtualIp => {
                let Some(v) = &spec.virtual_ip_address else {
                    return missing(self);
                };
                let ip = self
                    .parse(sub(&key, "ip"), rules::ip(&v.ip))
                    .filter(|ip| self.check(sub(&key, "ip"), rules::unicast(ip)));
                let ifaces_ok =
                    self.extend(rules::interfaces(&v.interfaces, &sub(&key, "interfaces")));
                Some(SourceIp::VirtualIp {
                    ip: ip?,
                    interfaces: ifaces_ok.then(|| v.interfaces.clone())?,
                })
            }
            Mode::PrimaryIp => {
                let Some(p) = &spec.primary_ip_from_egress_gateway_node_interface else {
                    return missing(self);
                };
                self.check(
                    sub(&key, "interface_name"),
                    rules::interface_name(&p.interface_name),
                )
                .then(|| SourceIp::PrimaryIp {
                    interface: p.interface_name.clone(),
                })
            }
        }
    }

    /// A policy from its spec: field rules, then, once whole, [`rules::policy_coherence`].
    fn policy(&mut self, spec: &PolicySpec, at: &str) -> Option<Policy> {
        if self.is_broken(at) {
            return None;
        }
        let name_ok = self.check_at(at, "name", rules::object_name(&spec.name));
        let ref_ok = self.check_at(
            at,
            "egress_gateway_name",
            rules::object_name(&spec.egress_gateway_name),
        );
        let source_cidrs = self.cidrs(&spec.source_cidrs, &sub(at, "source_cidrs"), true);
        let destination_cidrs =
            self.cidrs(&spec.destination_cidrs, &sub(at, "destination_cidrs"), true);
        let excluded_cidrs = self.cidrs(&spec.excluded_cidrs, &sub(at, "excluded_cidrs"), false);
        let p = Policy {
            name: spec.name.clone(),
            egress_gateway_name: spec.egress_gateway_name.clone(),
            source_cidrs: source_cidrs?,
            destination_cidrs: destination_cidrs?,
            excluded_cidrs: excluded_cidrs?,
        };
        self.extend(rules::policy_coherence(&p, at));
        (name_ok && ref_ok).then_some(p)
    }

    /// A list of CIDR strings: each parsed, then the list rules on those that parsed.
    fn cidrs(&mut self, list: &[String], at: &str, required: bool) -> Option<Vec<IpNet>> {
        if required && let Some(i) = rules::required_cidrs(list.len(), at) {
            self.extend(vec![i]);
            return None;
        }
        let parsed: Vec<(usize, IpNet)> = list
            .iter()
            .enumerate()
            .filter_map(|(j, s)| self.parse(index(at, j), rules::cidr(s)).map(|n| (j, n)))
            .collect();
        let ok = self.extend(rules::cidrs(parsed.iter().map(|(j, n)| (*j, n)), at));
        (ok && parsed.len() == list.len()).then(|| parsed.into_iter().map(|(_, n)| n).collect())
    }
}

/// `path` read, or why not.
pub(super) fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        one_error(
            &path.display().to_string(),
            "",
            format!("cannot read the configuration file: {e}"),
        )
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, Profile, load_with_env};
    use crate::model::{Gateway, Policy, Selection};

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

    fn load_for_run_env(
        text: &str,
        env: &[(&str, &str)],
    ) -> Result<(Config, Option<ConfigErrors>), ConfigErrors> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_for_run_inner(Source::File(PathBuf::from(FILE)), FILE, text, &env, &|| {
            Some("gw1".to_string())
        })
    }

    // ---- the daemon's start ----

    #[test]
    fn run_starts_without_the_objects_when_only_they_break_a_rule() {
        let text = [
            BASE,
            "[admin]\nlisten = \"127.0.0.1:7000\"\n",
            VIP_GATEWAY,
            r#"
[[policy]]
name = "p"
egress_gateway_name = "missing"
source_cidrs = ["10.0.0.1/33"]
destination_cidrs = ["0.0.0.0/0"]
"#,
        ]
        .concat();
        let env = [
            ("EGRESSD_CLUSTER__LISTEN", "127.0.0.1:7999"),
            ("EGRESSD_GATEWAY__NAME", "x"),
        ];
        let (config, errors) = load_for_run_env(&text, &env).expect("starts");
        let errors = errors.expect("the object errors").0;
        assert!(config.gateways.is_empty() && config.policies.is_empty());
        assert_eq!(config.node.name, "gw1");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.cluster.listen.to_string(), "127.0.0.1:7999");
        // Every error is reported, as `check-config` reports them.
        let all = parse_env(&text, &env).expect_err("load refuses the file").0;
        assert_eq!(errors, all);
        assert!(!errors.is_empty());
        assert!(errors.iter().all(|e| is_object_key(&e.key)));
        // Without the variable: the file's own two policy errors.
        let (_, errors) = load_for_run_env(&text, &[]).expect("starts");
        let errors = errors.expect("the object errors").0;
        assert_error(&errors, "policy[0].source_cidrs[0]", "");
        assert!(errors.len() >= 2, "{}", ConfigErrors(errors.clone()));
    }

    #[test]
    fn run_refuses_a_file_whose_other_sections_break_a_rule() {
        let text = [
            BASE,
            "[admin]\nlisten = \"nowhere\"\n",
            r#"
[[policy]]
name = "p"
egress_gateway_name = "missing"
source_cidrs = ["10.0.0.1/32"]
destination_cidrs = ["0.0.0.0/0"]
"#,
        ]
        .concat();
        let errors = load_for_run_env(&text, &[]).expect_err("refused").0;
        assert_error(&errors, "admin.listen", "");
        assert!(errors.iter().any(|e| e.key.starts_with("policy")));
        // Not valid TOML at all: refused.
        assert!(load_for_run_env("[node\n", &[]).is_err());
        // A valid file: as `load`.
        let (c, errors) = load_for_run_env(&[BASE, VIP_GATEWAY].concat(), &[]).expect("valid");
        assert!(errors.is_none());
        assert_eq!(c.gateways.len(), 1);
    }

    #[test]
    fn object_keys_and_variables() {
        for k in [
            "gateway",
            "gateway[0].name",
            "policy[3].source_cidrs[1]",
            "policy.x",
        ] {
            assert!(is_object_key(k), "{k}");
        }
        for k in ["", "node.name", "gateways", "policyx", "cluster.peers[0]"] {
            assert!(!is_object_key(k), "{k}");
        }
        assert!(is_object_var("EGRESSD_GATEWAY__NAME"));
        assert!(is_object_var("EGRESSD_policy__x"));
        assert!(!is_object_var("EGRESSD_NODE__NAME"));
        assert!(!is_object_var("EGRESSD_GATEWAYS__NAME"));
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

    fn policy(src: &str, dst: &str, excl: &str, gateway: &str) -> String {
        format!(
            "[[policy]]\nname = \"p\"\negress_gateway_name = \"{gateway}\"\nsource_cidrs = [{src}]\ndestination_cidrs = [{dst}]\nexcluded_cidrs = [{excl}]\n"
        )
    }

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
        let no_env = |_: Tag| false;
        let mut reader = Reader::new(&no_env);
        let again = reader.config(&root, &|| None);
        assert_eq!(reader.finish(), vec![]);
        assert_eq!(again, Some(original));
    }

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

    #[test]
    fn tcp_on_policy_change_is_keep_or_reset() {
        let e = errors_with(&[BASE, "[dataplane]\ntcp_on_policy_change = \"rst\"\n"]);
        assert_error(
            &e,
            "dataplane.tcp_on_policy_change",
            "\"rst\" is not a choice; expected \"keep\"",
        );
        let e = errors_with(&[BASE, "[dataplane]\ntcp_on_policy_change = true\n"]);
        assert_error(&e, "dataplane.tcp_on_policy_change", "expected a string");
        let c = ok(&[BASE, "[dataplane]\ntcp_on_policy_change = \"reset\"\n"].concat());
        assert_eq!(
            c.dataplane.tcp_on_policy_change,
            crate::dataplane::conntrack::TcpPolicy::Reset
        );
        let c = ok(BASE);
        assert_eq!(
            c.dataplane.tcp_on_policy_change,
            crate::dataplane::conntrack::TcpPolicy::Keep
        );
    }

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

    #[test]
    fn cluster_timing_profiles_and_overrides() {
        let c = ok(BASE);
        assert_eq!(c.cluster.profile, Profile::Default);
        assert_eq!(c.cluster.timing().failover_timeout_ms, 200);
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
        assert_error(&e, "cluster.failover_timeout_ms", "must be above lease_ms");
        let e = errors_with(&[BASE, "[cluster]\nreport_interval_ms = 200\n"]);
        assert_error(&e, "cluster.lease_ms", "must be below lease_ms");
        // A failover timeout just above the lease is not enough: the lease is stretched for
        // clock drift and timers (lease_ms * 1.002 + 10 ms).
        let e = errors_with(&[
            BASE,
            "[cluster]\nlease_ms = 400\nfailover_timeout_ms = 405\n",
        ]);
        assert_error(&e, "cluster.failover_timeout_ms", "410 ms");
        ok(&[
            BASE,
            "[cluster]\nlease_ms = 400\nfailover_timeout_ms = 500\n",
        ]
        .concat());
        let e = errors_with(&[BASE, "[cluster]\nheartbeat_ms = 200\n"]);
        assert_error(&e, "cluster.election_timeout_min_ms", "heartbeat");
        let e = errors_with(&[BASE, "[cluster]\nheartbeat_ms = 70\n"]);
        assert_error(
            &e,
            "cluster.heartbeat_ms",
            "1.5 x heartbeat_ms (105) + report_interval_ms (50)",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        ok(&[BASE, "[cluster]\nheartbeat_ms = 60\n"].concat());
        let e = errors_with(&[BASE, "[cluster]\nprofile = \"turbo\"\nlease_ms = 1\n"]);
        assert_error(&e, "cluster.profile", "unknown profile");
        assert_error(&e, "cluster.lease_ms", "out of range");
    }

    #[test]
    fn a_multi_node_cluster_needs_peer_tls() {
        let peers = "[cluster]\npeers = [{ name = \"gw1\", address = \"10.0.0.1:7480\" }, { name = \"gw2\", address = \"10.0.0.2:7480\" }]\nlisten = \"10.0.0.1:7480\"\n";
        let e = errors_with(&[BASE, peers]);
        assert_error(&e, "cluster.tls", "is required");
        assert_error(&e, "cluster.tls", "egressd tls init-ca");
        let tls = "[cluster.tls]\nca_file = \"/etc/egressd/tls/ca.pem\"\ncert_file = \"/etc/egressd/tls/node.pem\"\nkey_file = \"/etc/egressd/tls/node-key.pem\"\n";
        let c = ok(&[BASE, peers, tls].concat());
        let files = c.cluster.tls.expect("tls");
        assert_eq!(
            files.key_file,
            PathBuf::from("/etc/egressd/tls/node-key.pem")
        );
        // Every missing or empty file key is named; an unknown one too.
        let e = errors_with(&[BASE, peers, "[cluster.tls]\nca_file = \"\"\ncert = \"x\"\n"]);
        assert_error(&e, "cluster.tls.cert_file", "missing");
        assert_error(&e, "cluster.tls.key_file", "missing");
        assert_error(
            &e,
            "cluster.tls.cert",
            "unknown key (known keys here: ca_file, cert_file",
        );
        // The secret of earlier versions is gone, and says what replaces it.
        let e = errors_with(&[
            BASE,
            "[cluster]\nsecret_file = \"/etc/egressd/cluster.secret\"\n",
        ]);
        assert_error(&e, "cluster.secret_file", "mutual TLS");
    }

    #[test]
    fn admin_tls_is_optional_and_makes_the_url_https() {
        let c = ok(BASE);
        assert_eq!(c.admin.url(), "http://127.0.0.1:7481");
        let c = ok(&[
            BASE,
            "[admin]\nlisten = \"0.0.0.0:9443\"\n[admin.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
        ]
        .concat());
        assert_eq!(c.admin.url(), "https://127.0.0.1:9443");
        assert_eq!(c.admin.tls.as_ref().unwrap().ca_file, None);
        let e = errors_with(&[BASE, "[admin.tls]\ncert_file = \"/c.pem\"\n"]);
        assert_error(&e, "admin.tls.key_file", "missing");
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

    // ---- issue 18: one schema, label rules, short quotes ----

    #[test]
    fn the_root_keys_are_the_schema_s() {
        assert_eq!(
            de::fields_of::<schema::FileSpec>(),
            [
                "node",
                "cluster",
                "admin",
                "dataplane",
                "log",
                "kubernetes",
                "gateway",
                "policy"
            ]
        );
    }

    #[test]
    fn label_rules_apply_to_node_labels_and_selectors() {
        let e = errors_with(&[
            "[node]\nname = \"gw1\"\nlabels = { \"bad key!\" = \"\", zone = \"a\\nb\", \"Example.com/x\" = \"y\" }\n",
            &VIP_GATEWAY.replace(
                "name = \"vip\"",
                "name = \"vip\"\nnode_selector = { \"egress/\" = \"\", ok = \"-x\" }",
            ),
        ]);
        assert_error(&e, "node.labels.\"bad key!\"", "contains ' '");
        assert_error(
            &e,
            "node.labels.zone",
            "the label value \"a\\nb\" contains '\\n'",
        );
        assert_error(&e, "node.labels.\"Example.com/x\"", "prefix");
        assert_error(
            &e,
            "gateway[0].node_selector.\"egress/\"",
            "no name after '/'",
        );
        assert_error(&e, "gateway[0].node_selector.ok", "start and end");
        assert_eq!(e.len(), 5, "{}", ConfigErrors(e.clone()));
    }

    #[test]
    fn a_long_name_is_not_echoed_whole() {
        let long = "p".repeat(100_000);
        let e = errors_with(&[
            BASE,
            &VIP_GATEWAY.replace("name = \"vip\"", &format!("name = \"{long}\"")),
            &format!("{long} = 1\n"),
        ]);
        let shown = ConfigErrors(e.clone()).to_string();
        assert!(
            shown.len() < 1_000,
            "{} characters:\n{}",
            shown.len(),
            &shown[..2000]
        );
        assert_error(&e, "gateway[0].name", "is 100000 characters long");
        assert!(shown.contains("…(99936 more characters)"), "{shown}");
        let body = format!(
            r#"{{"policies": [{{"name": "{long}", "egress_gateway_name": "{long}", "source_cidrs": ["{long}"], "destination_cidrs": ["0.0.0.0/0"], "{long}": 1}}]}}"#
        );
        let Err(BodyError::Invalid(e)) = parse_json_objects(body.as_bytes(), "request body") else {
            panic!("refused")
        };
        let shown = e.to_string();
        assert!(shown.len() < 2_000, "{} characters", shown.len());
        assert_eq!(e.len(), 4, "{shown}");
    }

    const JSON_APPLY: &str = r#"{
  "gateways": [{
    "name": "vip",
    "node_selector": {"egress": ""},
    "source_ip": {"mode": "VirtualIPAddress", "virtual_ip_address": {"ip": "198.18.0.50", "interfaces": ["eth1"]}},
    "next_hop": {"ip": "10.77.0.1", "interface": "eth0"}
  }],
  "policies": [{
    "name": "p",
    "egress_gateway_name": "vip",
    "source_cidrs": ["10.77.0.0/24"],
    "destination_cidrs": ["0.0.0.0/0"]
  }]
}"#;

    const TOML_APPLY: &str = r#"
[[gateway]]
name = "vip"
node_selector = { egress = "" }
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = { ip = "198.18.0.50", interfaces = ["eth1"] }
[gateway.next_hop]
ip = "10.77.0.1"
interface = "eth0"

[[policy]]
name = "p"
egress_gateway_name = "vip"
source_cidrs = ["10.77.0.0/24"]
destination_cidrs = ["0.0.0.0/0"]
"#;

    fn json_errors(body: &str) -> Vec<ConfigError> {
        match parse_json_objects(body.as_bytes(), "request body") {
            Err(BodyError::Invalid(e)) => e.0,
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn json_and_toml_bodies_read_the_same_objects_with_the_same_defaults() {
        let from_json = parse_json_objects(JSON_APPLY.as_bytes(), "request body").unwrap();
        let from_toml = parse_objects(TOML_APPLY, "apply.toml").unwrap();
        assert_eq!(from_json, from_toml);
        let (g, p) = from_json;
        assert_eq!(g[0].selection, Selection::Alphabetical);
        assert!(g[0].preempt);
        assert!(p[0].excluded_cidrs.is_empty());
        // Objects as the admin API lists them apply again, null next_hop included.
        let listed = serde_json::json!({
            "gateways": g.iter().map(schema::GatewaySpec::from).collect::<Vec<_>>(),
            "policies": p.iter().map(schema::PolicySpec::from).collect::<Vec<_>>(),
        });
        let again = parse_json_objects(listed.to_string().as_bytes(), "request body").unwrap();
        assert_eq!(again, (g, p));
        let with_null = JSON_APPLY.replace(
            r#""next_hop": {"ip": "10.77.0.1", "interface": "eth0"}"#,
            r#""next_hop": null, "selection": "spread", "preempt": false"#,
        );
        let (g, _) = parse_json_objects(with_null.as_bytes(), "request body").unwrap();
        assert_eq!(
            (g[0].next_hop.clone(), g[0].selection, g[0].preempt),
            (None, Selection::Spread, false)
        );
    }

    #[test]
    fn json_bodies_refuse_unknown_fields_with_path_and_suggestion() {
        let e = json_errors(&JSON_APPLY.replace(
            r#""destination_cidrs": ["0.0.0.0/0"]"#,
            r#""destination_cidrs": ["0.0.0.0/0"], "exclude_cidrs": ["198.18.0.100/32"]"#,
        ));
        assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
        assert_eq!(e[0].key, "policies[0].exclude_cidrs");
        assert_eq!(e[0].file, "request body");
        assert!(
            e[0].message.contains("did you mean `excluded_cidrs`"),
            "{}",
            e[0]
        );
        for (from, to, key) in [
            (
                r#""name": "vip","#,
                r#""name": "vip", "nodeSelector": {},"#,
                "gateways[0].nodeSelector",
            ),
            (
                r#""mode": "VirtualIPAddress","#,
                r#""mode": "VirtualIPAddress", "extra": 1,"#,
                "gateways[0].source_ip.extra",
            ),
            (
                r#""ip": "198.18.0.50","#,
                r#""ip": "198.18.0.50", "prefix": 24,"#,
                "gateways[0].source_ip.virtual_ip_address.prefix",
            ),
            (
                r#""interface": "eth0""#,
                r#""interface": "eth0", "iface": "eth0""#,
                "gateways[0].next_hop.iface",
            ),
            (
                r#""gateways": ["#,
                r#""gateway": [], "gateways": ["#,
                "gateway",
            ),
        ] {
            let e = json_errors(&JSON_APPLY.replace(from, to));
            assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
            assert_eq!(e[0].key, key);
            assert!(e[0].message.starts_with("unknown key"), "{}", e[0]);
        }
        let e = json_errors(
            &JSON_APPLY.replace(r#""mode": "VirtualIPAddress""#, r#""mode": "VirtualIP""#),
        );
        assert_eq!(e[0].key, "gateways[0].source_ip.mode");
        assert!(
            e[0].message.contains("unknown mode \"VirtualIP\""),
            "{}",
            e[0]
        );
    }

    #[test]
    fn json_bodies_report_every_problem_at_once() {
        let e = json_errors(
            r#"{"policies": [{"name": 5, "egress_gateway_name": "g", "source_cidrs": [1, "10.0.0.0/8", "x"]}, {"name": "q"}]}"#,
        );
        let keys: Vec<&str> = e.iter().map(|x| x.key.as_str()).collect();
        for key in [
            "policies[0].name",
            "policies[0].source_cidrs[0]",
            "policies[0].source_cidrs[2]",
            "policies[0].destination_cidrs",
            "policies[1].egress_gateway_name",
            "policies[1].source_cidrs",
            "policies[1].destination_cidrs",
        ] {
            assert!(
                keys.contains(&key),
                "no error at {key}: {}",
                ConfigErrors(e.clone())
            );
        }
        assert_eq!(e.len(), 7, "{}", ConfigErrors(e.clone()));
    }

    #[test]
    fn unreadable_bodies_are_syntax_errors() {
        for body in ["", "{", "[1]x", "not json"] {
            assert!(
                matches!(
                    parse_json_objects(body.as_bytes(), "b"),
                    Err(BodyError::Syntax(_))
                ),
                "{body:?}"
            );
        }
        assert!(matches!(
            parse_apply_body(b"[[gateway]\n", true),
            Err(BodyError::Syntax(m)) if m.contains("not valid TOML")
        ));
        assert!(matches!(
            parse_apply_body(&[0xff, 0xfe], true),
            Err(BodyError::Syntax(m)) if m.contains("not UTF-8")
        ));
        let Err(BodyError::Invalid(e)) = parse_json_objects(b"[]", "b") else {
            panic!("an array is no body")
        };
        assert!(e.0[0].message.contains("expected a JSON object"), "{e}");
        let Err(BodyError::Invalid(e)) = parse_json_objects(b"{}", "b") else {
            panic!("nothing to apply")
        };
        assert!(e.0[0].message.contains("nothing to apply"), "{e}");
        let Err(BodyError::Invalid(e)) = parse_apply_body(b"[node]\nname = \"x\"\n", true) else {
            panic!("not an apply body")
        };
        assert_eq!(e.0[0].key, "node");
    }

    fn parse_apply_body(body: &[u8], toml: bool) -> Result<(Vec<Gateway>, Vec<Policy>), BodyError> {
        crate::config::parse_apply_body(body, toml, "request body")
    }

    #[test]
    fn label_change_bodies() {
        let ok = |body: &str| parse_label_change(body.as_bytes(), "request body").unwrap();
        let c = ok(r#"{"key": "node-role.deckhouse.io/egress", "value": ""}"#);
        assert_eq!(
            (c.key.as_str(), c.value.as_deref()),
            ("node-role.deckhouse.io/egress", Some(""))
        );
        assert_eq!(ok(r#"{"key": "zone", "value": null}"#).value, None);
        assert_eq!(ok(r#"{"key": "zone"}"#).value, None);
        let refused = |body: &str| match parse_label_change(body.as_bytes(), "request body") {
            Err(BodyError::Invalid(e)) => e,
            other => panic!("{body}: {other:?}"),
        };
        let e = refused(r#"{"key": "bad key!", "value": "x"}"#);
        assert_eq!(e.0[0].key, "key");
        assert!(e.to_string().contains("contains ' '"), "{e}");
        let e = refused(r#"{"key": "zone", "value": "a\nb"}"#);
        assert_eq!(e.0[0].key, "value");
        assert!(e.to_string().contains("contains '\\n'"), "{e}");
        let e = refused(r#"{"key": "zone", "valeu": "a"}"#);
        assert_eq!(e.0[0].key, "valeu");
        assert!(e.to_string().contains("did you mean `value`"), "{e}");
        let e = refused(r#"{"value": "a"}"#);
        assert_eq!(e.0[0].key, "key");
        assert!(e.to_string().contains("missing"), "{e}");
        let e = refused(&format!(r#"{{"key": "{}"}}"#, "k".repeat(100_000)));
        assert!(e.to_string().len() < 1_000, "{e}");
        assert!(matches!(
            parse_label_change(b"key=value", "request body"),
            Err(BodyError::Syntax(_))
        ));
    }

    #[test]
    fn cidr_edit_bodies() {
        let (add, remove) = parse_cidr_edit(
            br#"{"add": {"destination_cidrs": ["192.0.2.0/24"]}, "remove": {"source_cidrs": ["10.0.0.0/24", "fd00::/64"]}}"#,
            "request body",
        )
        .unwrap();
        assert_eq!(
            add.destination_cidrs,
            ["192.0.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(remove.source_cidrs.len(), 2);
        assert!(add.source_cidrs.is_empty() && remove.destination_cidrs.is_empty());
        let refused = |body: &str| match parse_cidr_edit(body.as_bytes(), "request body") {
            Err(BodyError::Invalid(e)) => e.to_string(),
            other => panic!("{body}: {other:?}"),
        };
        let e = refused(r#"{"add": {"destination_cidrs": ["192.0.2.1/24"]}}"#);
        assert!(!e.contains("nothing to change"), "{e}");
        for (body, says) in [
            (
                r#"{"add": {"destination_cidrs": ["192.0.2.1/24"]}}"#,
                "add.destination_cidrs[0]",
            ),
            (
                r#"{"add": {"destination_cidrs": ["192.0.2.0/33"]}}"#,
                "add.destination_cidrs[0]",
            ),
            (
                r#"{"remove": {"excluded_cidrs": ["10.0.0.0/8", "10.0.0.0/8"]}}"#,
                "listed twice",
            ),
            (
                r#"{"add": {"source_cidrs": ["10.1.0.0/16"]}, "remove": {"source_cidrs": ["10.1.0.0/16"]}}"#,
                "both added and removed",
            ),
            (
                r#"{"add": {"destination_cidr": ["192.0.2.0/24"]}}"#,
                "destination_cidrs",
            ),
            (r#"{}"#, "nothing to change"),
            (r#"{"add": {}, "remove": {}}"#, "nothing to change"),
        ] {
            let e = refused(body);
            assert!(e.contains(says), "{body}: {e}");
        }
        assert!(matches!(
            parse_cidr_edit(b"add 192.0.2.0/24", "request body"),
            Err(BodyError::Syntax(_))
        ));
    }

    #[test]
    fn two_gateways_with_one_next_hop_are_refused_in_the_file() {
        let e = errors_with(&[
            BASE,
            VIP_GATEWAY,
            "[gateway.next_hop]\nip = \"10.77.0.1\"\ninterface = \"eth0\"\n",
            &VIP_GATEWAY
                .replace("name = \"vip\"", "name = \"vip2\"")
                .replace("198.18.0.50", "198.18.0.51"),
            "[gateway.next_hop]\nip = \"10.77.0.1\"\ninterface = \"eth0\"\n",
        ]);
        assert_error(
            &e,
            "gateway[1].next_hop.ip",
            "10.77.0.1 is already the next hop of gateway \"vip\" (gateway[0]); two gateways cannot share one next hop",
        );
        assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
    }

    #[test]
    fn placeholders_keep_the_indices_of_a_list() {
        let e = errors_with(&[
            BASE,
            "[cluster]\npeers = [{ name = 1, address = \"10.0.0.1:7480\" }, { name = \"gw1\", address = 2 }, { name = \"gw1\", address = \"10.0.0.3:7480\" }]\n",
        ]);
        assert_error(&e, "cluster.peers[0].name", "found the integer 1");
        assert_error(&e, "cluster.peers[1].address", "found the integer 2");
        assert_error(
            &e,
            "cluster.peers[2].name",
            "duplicate peer name \"gw1\"; already used by cluster.peers[1]",
        );
        assert_eq!(e.len(), 3, "{}", ConfigErrors(e.clone()));
    }
}
