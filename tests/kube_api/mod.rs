//! A small Kubernetes API server for the tests, speaking the real protocol for what egressd
//! uses: discovery (`/version`, `/api`, `/apis`, the group/version resource lists), `list`
//! with `resourceVersion` (and `limit`/`continue`), `watch` streams with bookmarks and
//! `410 Gone` for a resourceVersion older than its history, JSON merge (and, for `kubectl
//! cordon`, strategic merge as merge) patches, the `/status` subresource, and server-side
//! tables (`kubectl get`'s columns, those of egressd's CRDs for the two resources).
//!
//! Resources: Nodes and Pods (core/v1), EgressGateways and EgressGatewayPolicies
//! (network.deckhouse.io/v1alpha1, cluster-scoped, with status). `kubectl` (Debian's
//! kubernetes-client) checks that it stays faithful (tests/kubernetes.rs).
//!
//! `stop` drops the listener and every open connection; `start` serves the same objects again
//! with its watch history gone, as a restarted API server's watch cache is: a watch resumed
//! from an older resourceVersion is answered with 410 Gone and the client must relist.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const GROUP: &str = "network.deckhouse.io";
pub const GROUP_VERSION: &str = "network.deckhouse.io/v1alpha1";

/// The resources served: plural, kind, namespaced, API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Pod,
    EgressGateway,
    EgressGatewayPolicy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Node,
        Kind::Pod,
        Kind::EgressGateway,
        Kind::EgressGatewayPolicy,
    ];

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::EgressGateway => "egressgateways",
            Kind::EgressGatewayPolicy => "egressgatewaypolicies",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::EgressGateway => "EgressGateway",
            Kind::EgressGatewayPolicy => "EgressGatewayPolicy",
        }
    }

    fn singular(self) -> String {
        self.kind().to_lowercase()
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Pod => "v1",
            _ => GROUP_VERSION,
        }
    }

    fn namespaced(self) -> bool {
        self == Kind::Pod
    }

    fn has_status(self) -> bool {
        true
    }

    fn short_names(self) -> Vec<&'static str> {
        match self {
            Kind::Node => vec!["no"],
            Kind::Pod => vec!["po"],
            _ => vec![],
        }
    }

    fn from_plural(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == group_version && k.plural() == plural)
    }

    /// Whether a change of `spec` bumps `metadata.generation` (custom resources and pods do;
    /// kept simple: every kind here).
    fn has_generation(self) -> bool {
        matches!(self, Kind::EgressGateway | Kind::EgressGatewayPolicy)
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

/// The objects and their history.
pub struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: VecDeque<WatchEvent>,
    /// Watches from a resourceVersion below this are too old (410).
    oldest: u64,
    events: broadcast::Sender<WatchEvent>,
    uid: u64,
    /// Seconds between bookmarks on a watch that asked for them.
    pub bookmark_every: Duration,
}

const HISTORY: usize = 100_000;

fn key_of(kind: Kind, obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if kind.namespaced() {
        format!(
            "{}/{name}",
            obj["metadata"]["namespace"].as_str().unwrap_or("default")
        )
    } else {
        name.to_string()
    }
}

fn now_rfc3339() -> String {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

impl Store {
    fn new() -> Store {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest: 1,
            events: broadcast::channel(1 << 16).0,
            uid: 0,
            bookmark_every: Duration::from_secs(1),
        }
    }

    fn record(&mut self, kind: Kind, type_: &'static str, object: Value) {
        let ev = WatchEvent {
            rv: self.rv,
            kind,
            type_,
            object,
        };
        if self.history.len() >= HISTORY
            && let Some(old) = self.history.pop_front()
        {
            self.oldest = old.rv + 1;
        }
        self.history.push_back(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Creates or replaces an object (as `kubectl apply` would), keeping what the server owns
    /// (uid, creation time; the status unless `obj` has one). Returns it as stored.
    pub fn put(&mut self, kind: Kind, mut obj: Value) -> Value {
        let key = key_of(kind, &obj);
        self.rv += 1;
        let old = self.objects.get(&(kind, key.clone())).cloned();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind());
        if kind.namespaced() && obj["metadata"]["namespace"].is_null() {
            obj["metadata"]["namespace"] = json!("default");
        }
        let spec_changed = old.as_ref().is_some_and(|o| o["spec"] != obj["spec"]);
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(self.rv.to_string());
        match &old {
            Some(o) => {
                meta["uid"] = o["metadata"]["uid"].clone();
                meta["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                let generation = o["metadata"]["generation"].as_i64().unwrap_or(1);
                if kind.has_generation() {
                    meta["generation"] = json!(if spec_changed {
                        generation + 1
                    } else {
                        generation
                    });
                }
                if obj.get("status").is_none()
                    && let Some(s) = o.get("status")
                {
                    obj["status"] = s.clone();
                }
            }
            None => {
                self.uid += 1;
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.uid));
                meta["creationTimestamp"] = json!(now_rfc3339());
                if kind.has_generation() {
                    meta["generation"] = json!(1);
                }
            }
        }
        self.objects.insert((kind, key), obj.clone());
        self.record(
            kind,
            if old.is_some() { "MODIFIED" } else { "ADDED" },
            obj.clone(),
        );
        obj
    }

    /// Deletes an object; returns it (with a new resourceVersion) if it existed.
    pub fn delete(&mut self, kind: Kind, key: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&(kind, key.to_string()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(kind, "DELETED", obj.clone());
        Some(obj)
    }

    pub fn get(&self, kind: Kind, key: &str) -> Option<Value> {
        self.objects.get(&(kind, key.to_string())).cloned()
    }

    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Applies a JSON merge patch to an object, or to its `status` only.
    fn patch(&mut self, kind: Kind, key: &str, patch: &Value, status: bool) -> Option<Value> {
        let mut obj = self.get(kind, key)?;
        if status {
            if let Some(s) = patch.get("status") {
                let mut cur = obj.get("status").cloned().unwrap_or(json!({}));
                merge(&mut cur, s);
                obj["status"] = cur;
            }
        } else {
            let keep_status = obj.get("status").cloned();
            merge(&mut obj, patch);
            // The main resource does not change the status (the subresource does).
            if kind != Kind::Node && kind != Kind::Pod {
                match keep_status {
                    Some(s) => obj["status"] = s,
                    None => {
                        if let Some(o) = obj.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
        }
        Some(self.put(kind, obj))
    }

    fn current_rv(&self) -> u64 {
        self.rv
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The server: a store shared with the test, served on `addr` while started.
pub struct KubeApi {
    pub store: Arc<Mutex<Store>>,
    pub addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    serving: Option<tokio::task::JoinHandle<()>>,
    /// Every connection's task, aborted by `stop`.
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The network namespace to listen in (None: this process's).
    netns: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a response")
}

fn status_error(code: u16, reason: &str, message: String) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Binds `addr` inside network namespace `netns` (a thread enters it for the bind only).
fn bind_in(netns: Option<&str>, addr: SocketAddr) -> std::net::TcpListener {
    let Some(ns) = netns else {
        return std::net::TcpListener::bind(addr).expect("binding the test API server");
    };
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind(addr).expect("binding the test API server")
        })
        .join()
        .expect("the bind thread")
    })
}

impl KubeApi {
    /// A server on `addr` (port 0: any) in `netns`, empty.
    pub fn new(netns: Option<&str>, addr: SocketAddr) -> KubeApi {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let mut api = KubeApi {
            store: Arc::new(Mutex::new(Store::new())),
            addr,
            rt,
            serving: None,
            conns: Arc::new(Mutex::new(Vec::new())),
            netns: netns.map(str::to_string),
        };
        api.start();
        api
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.store.lock().expect("store"))
    }

    /// Starts serving (again). A restart forgets the watch history: older resourceVersions
    /// are answered with 410 Gone.
    pub fn start(&mut self) {
        assert!(self.serving.is_none(), "already serving");
        {
            let mut s = self.store.lock().expect("store");
            s.history.clear();
            s.rv += 1;
            s.oldest = s.rv;
        }
        let std_listener = bind_in(self.netns.as_deref(), self.addr);
        std_listener.set_nonblocking(true).expect("nonblocking");
        self.addr = std_listener.local_addr().expect("local addr");
        let store = self.store.clone();
        let conns = self.conns.clone();
        let handle = self.rt.handle().clone();
        self.serving = Some(self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                let conn = handle.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let svc = hyper::service::service_fn(move |req| {
                        let store = store.clone();
                        async move { Ok::<_, Infallible>(handle_request(store, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
                let mut c = conns.lock().expect("conns");
                c.retain(|h| !h.is_finished());
                c.push(conn);
            }
        }));
    }

    /// Stops serving: the listener and every connection (watches included) go away.
    pub fn stop(&mut self) {
        if let Some(s) = self.serving.take() {
            s.abort();
        }
        for c in self.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
        // Let the aborts land before a restart binds the port again.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: http://{addr}
contexts:
- name: test
  context:
    cluster: test
    user: test
current-context: test
users:
- name: test
  user: {{}}
"#,
            addr = self.addr
        )
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn discovery_resources(group_version: &str) -> Value {
    let mut resources = Vec::new();
    for k in Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == group_version)
    {
        resources.push(json!({
            "name": k.plural(), "singularName": k.singular(), "namespaced": k.namespaced(),
            "kind": k.kind(),
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names(),
        }));
        if k.has_status() {
            resources.push(json!({
                "name": format!("{}/status", k.plural()), "singularName": "",
                "namespaced": k.namespaced(), "kind": k.kind(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
           "resources": resources})
}

async fn handle_request(store: Arc<Mutex<Store>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["version"]) => {
            return full(
                StatusCode::OK,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-egressd-test",
                       "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                       "goVersion": "", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        (Method::GET, ["api"]) => {
            return full(
                StatusCode::OK,
                json!({"kind": "APIVersions", "versions": ["v1"],
                       "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                       "serverAddress": ""}]}),
            );
        }
        (Method::GET, ["apis"]) => {
            let gv = json!({"groupVersion": GROUP_VERSION, "version": "v1alpha1"});
            return full(
                StatusCode::OK,
                json!({"kind": "APIGroupList", "apiVersion": "v1",
                       "groups": [{"name": GROUP, "versions": [gv], "preferredVersion": gv}]}),
            );
        }
        (Method::GET, ["apis", g]) if *g == GROUP => {
            let gv = json!({"groupVersion": GROUP_VERSION, "version": "v1alpha1"});
            return full(
                StatusCode::OK,
                json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
                       "versions": [gv], "preferredVersion": gv}),
            );
        }
        (Method::GET, ["api", "v1"]) => return full(StatusCode::OK, discovery_resources("v1")),
        (Method::GET, ["apis", g, "v1alpha1"]) if *g == GROUP => {
            return full(StatusCode::OK, discovery_resources(GROUP_VERSION));
        }
        _ => {}
    }
    // /api/v1[/namespaces/NS]/PLURAL[/NAME[/status]] and /apis/G/V/PLURAL[/NAME[/status]]
    let (gv, rest): (String, &[&str]) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return status_error(404, "NotFound", format!("the server could not find {path}")),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(*s)),
        _ => return status_error(404, "NotFound", format!("the server could not find {path}")),
    };
    let Some(kind) = Kind::from_plural(&gv, plural) else {
        return status_error(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({gv} {plural})"),
        );
    };
    if sub.is_some_and(|s| s != "status") {
        return status_error(404, "NotFound", format!("no subresource {sub:?}"));
    }
    let key = name
        .as_ref()
        .map(|n| match (&namespace, kind.namespaced()) {
            (Some(ns), true) => format!("{ns}/{n}"),
            (None, true) => format!("default/{n}"),
            _ => n.clone(),
        });
    let q = query(&req);
    let table = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let not_found = |k: &str| {
        status_error(
            404,
            "NotFound",
            format!("{}.{} \"{}\" not found", kind.plural(), group_of(kind), k),
        )
    };
    match (method, key) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(store, kind, namespace, &q, table)
        }
        (Method::GET, None) => {
            let s = store.lock().expect("store");
            let mut items: Vec<Value> = s
                .list(kind)
                .into_iter()
                .filter(|o| {
                    namespace.is_none()
                        || o["metadata"]["namespace"].as_str() == namespace.as_deref()
                })
                .collect();
            let rv = s.current_rv();
            drop(s);
            // Pages by name: `continue` is the last name of the previous page.
            let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
            if let Some(after) = q.get("continue").filter(|c| !c.is_empty()) {
                items.retain(|o| key_of(kind, o).as_str() > after.as_str());
            }
            let mut cont = String::new();
            if limit > 0 && items.len() > limit {
                items.truncate(limit);
                cont = items.last().map(|o| key_of(kind, o)).unwrap_or_default();
            }
            if table {
                return full(
                    StatusCode::OK,
                    to_table(kind, &items, &rv.to_string(), &cont),
                );
            }
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if !cont.is_empty() {
                meta["continue"] = json!(cont);
            }
            full(
                StatusCode::OK,
                json!({"kind": format!("{}List", kind.kind()), "apiVersion": kind.api_version(),
                       "metadata": meta, "items": items}),
            )
        }
        (Method::GET, Some(k)) => match store.lock().expect("store").get(kind, &k) {
            Some(o) if table => {
                let rv = o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                full(StatusCode::OK, to_table(kind, &[o], &rv, ""))
            }
            Some(o) => full(StatusCode::OK, o),
            None => not_found(&k),
        },
        (Method::PATCH, Some(k)) => {
            let Ok(body) = req.into_body().collect().await else {
                return status_error(400, "BadRequest", "unreadable body".into());
            };
            let patch: Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(p) => p,
                Err(e) => return status_error(400, "BadRequest", format!("not JSON: {e}")),
            };
            if !(content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json"))
            {
                return status_error(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type})"
                    ),
                );
            }
            match store
                .lock()
                .expect("store")
                .patch(kind, &k, &patch, sub == Some("status"))
            {
                Some(o) => full(StatusCode::OK, o),
                None => not_found(&k),
            }
        }
        (Method::PUT, Some(k)) | (Method::POST, Some(k)) if sub.is_some() => {
            let Ok(body) = req.into_body().collect().await else {
                return status_error(400, "BadRequest", "unreadable body".into());
            };
            let obj: Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(p) => p,
                Err(e) => return status_error(400, "BadRequest", format!("not JSON: {e}")),
            };
            let status = json!({"status": obj.get("status").cloned().unwrap_or(json!({}))});
            match store.lock().expect("store").patch(kind, &k, &status, true) {
                Some(o) => full(StatusCode::OK, o),
                None => not_found(&k),
            }
        }
        (Method::POST, None) | (Method::PUT, Some(_)) => {
            let Ok(body) = req.into_body().collect().await else {
                return status_error(400, "BadRequest", "unreadable body".into());
            };
            let mut obj: Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(p) => p,
                Err(e) => return status_error(400, "BadRequest", format!("not JSON: {e}")),
            };
            if let Some(ns) = &namespace {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let o = store.lock().expect("store").put(kind, obj);
            full(StatusCode::CREATED, o)
        }
        (Method::DELETE, Some(k)) => match store.lock().expect("store").delete(kind, &k) {
            Some(o) => full(StatusCode::OK, o),
            None => not_found(&k),
        },
        (m, _) => status_error(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported here"),
        ),
    }
}

fn group_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Node | Kind::Pod => "",
        _ => GROUP,
    }
}

/// A watch: from `resourceVersion` (410 if older than the history; unset or "0": synthetic
/// ADDED events of the current objects first), then live events, bookmarks if asked, until
/// `timeoutSeconds`.
fn watch(
    store: Arc<Mutex<Store>>,
    kind: Kind,
    namespace: Option<String>,
    q: &BTreeMap<String, String>,
    table: bool,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let from: Option<u64> = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let in_ns = move |o: &Value| {
        namespace.is_none() || o["metadata"]["namespace"].as_str() == namespace.as_deref()
    };
    let line = move |type_: &str, object: &Value| -> Bytes {
        let object = if table && type_ != "BOOKMARK" && type_ != "ERROR" {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            to_table(kind, std::slice::from_ref(object), &rv, "")
        } else {
            object.clone()
        };
        Bytes::from(format!("{}\n", json!({"type": type_, "object": object})))
    };
    let (initial, mut live, every, mut last_rv) = {
        let s = store.lock().expect("store");
        let live = s.events.subscribe();
        let mut initial = Vec::new();
        match from {
            Some(rv) if rv + 1 < s.oldest => {
                initial.push(line(
                    "ERROR",
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": format!("too old resource version: {rv} ({})", s.oldest - 1)}),
                ));
                let body = futures::stream::iter(
                    initial
                        .into_iter()
                        .map(|b| Ok::<_, Infallible>(Frame::data(b))),
                );
                return Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(body).boxed())
                    .expect("a response");
            }
            Some(rv) => {
                for e in s.history.iter().filter(|e| e.rv > rv && e.kind == kind) {
                    if in_ns(&e.object) {
                        initial.push(line(e.type_, &e.object));
                    }
                }
            }
            None => {
                for o in s.list(kind).iter().filter(|o| in_ns(o)) {
                    initial.push(line("ADDED", o));
                }
            }
        }
        (initial, live, s.bookmark_every, s.current_rv())
    };
    let bookmark = move |rv: u64| -> Bytes {
        Bytes::from(format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {"kind": kind.kind(),
                   "apiVersion": kind.api_version(),
                   "metadata": {"resourceVersion": rv.to_string()}}})
        ))
    };
    tokio::spawn(async move {
        for b in initial {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let end = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return,
                _ = tick.tick(), if bookmarks => {
                    if tx.send(bookmark(last_rv)).await.is_err() { return }
                }
                ev = live.recv() => match ev {
                    Ok(e) => {
                        last_rv = e.rv;
                        if e.kind == kind
                            && in_ns(&e.object)
                            && tx.send(line(e.type_, &e.object)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Fell behind: end the watch, the client resumes from its last version.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(body).boxed())
        .expect("a response")
}

fn age(o: &Value) -> String {
    // kubectl formats the age from the timestamp itself; a string cell is shown as it is.
    let created = o["metadata"]["creationTimestamp"].as_str().unwrap_or("");
    let Ok(t) = created.parse::<Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (Timestamp::now().as_second() - t.as_second()).max(0);
    if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m", secs / 60)
    } else {
        format!("{}h", secs / 3600)
    }
}

/// The columns `kubectl get` shows: the CRDs' printer columns for the two resources (see
/// `packaging/kubernetes/crds.yaml`), kubectl's usual ones for Nodes and Pods.
fn to_table(kind: Kind, items: &[Value], rv: &str, cont: &str) -> Value {
    let col = |name: &str, type_: &str| json!({"name": name, "type": type_, "format": "", "description": "", "priority": 0});
    type Cells = Box<dyn Fn(&Value) -> Vec<Value>>;
    let (columns, cells): (Vec<Value>, Cells) = match kind {
        Kind::EgressGateway => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Mode", "string"),
                col("Active", "string"),
                col("Ready Nodes", "integer"),
                col("Age", "date"),
            ],
            Box::new(|o: &Value| {
                let ready = o["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                    .map(|c| c["status"].clone())
                    .unwrap_or(Value::Null);
                vec![
                    o["metadata"]["name"].clone(),
                    ready,
                    o["spec"]["sourceIP"]["mode"].clone(),
                    o["status"]["activeNodeName"].clone(),
                    o["status"]["readyNodes"].clone(),
                    json!(age(o)),
                ]
            }),
        ),
        Kind::EgressGatewayPolicy => (
            vec![
                col("Name", "string"),
                col("Gateway", "string"),
                col("Age", "date"),
            ],
            Box::new(|o: &Value| {
                vec![
                    o["metadata"]["name"].clone(),
                    o["spec"]["egressGatewayName"].clone(),
                    json!(age(o)),
                ]
            }),
        ),
        Kind::Node => (
            vec![
                col("Name", "string"),
                col("Status", "string"),
                col("Roles", "string"),
                col("Age", "string"),
                col("Version", "string"),
            ],
            Box::new(|o: &Value| {
                let status = if o["spec"]["unschedulable"] == true {
                    "Ready,SchedulingDisabled"
                } else {
                    "Ready"
                };
                vec![
                    o["metadata"]["name"].clone(),
                    json!(status),
                    json!("<none>"),
                    json!(age(o)),
                    json!("v1.33.0"),
                ]
            }),
        ),
        Kind::Pod => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Status", "string"),
                col("Restarts", "integer"),
                col("Age", "string"),
                col("IP", "string"),
            ],
            Box::new(|o: &Value| {
                vec![
                    o["metadata"]["name"].clone(),
                    json!("1/1"),
                    o["status"]["phase"].clone(),
                    json!(0),
                    json!(age(o)),
                    o["status"]["podIP"].clone(),
                ]
            }),
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({"cells": cells(o), "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"].clone()}})
        })
        .collect();
    let mut meta = json!({"resourceVersion": rv});
    if !cont.is_empty() {
        meta["continue"] = json!(cont);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
           "columnDefinitions": columns, "rows": rows})
}

/// The objects of `yaml` (documents of the Deckhouse resources, Nodes and Pods), put in the
/// store.
pub fn seed(store: &mut Store, objects: &[Value]) {
    for o in objects {
        let kind = match o["kind"].as_str() {
            Some("Node") => Kind::Node,
            Some("Pod") => Kind::Pod,
            Some("EgressGateway") => Kind::EgressGateway,
            Some("EgressGatewayPolicy") => Kind::EgressGatewayPolicy,
            other => panic!("seed: kind {other:?} is not served"),
        };
        store.put(kind, o.clone());
    }
}

/// A Node with labels.
pub fn node(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": labels},
           "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
}

/// A running Pod with labels and one address.
pub fn pod(namespace: &str, name: &str, labels: Value, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "example"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}
