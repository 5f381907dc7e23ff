//! One cluster member at run time: the Raft instance, its peer endpoint (Raft RPCs plus node
//! reports and forwarded writes), bootstrap, and the leader's controller loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::SnapshotPolicy;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::codec::Versioned;
use crate::cluster::controller::{ChangeKind, Controller, Reply, Report};
use crate::cluster::state::{AssignChange, Reason};
use crate::cluster::store::{self, Applied};
use crate::cluster::transport::{self, Auth, Msg, Network, PeerClient};
use crate::cluster::{Command, CommandResponse, Member, NodeId, Raft, node_id};
use crate::config::{ClusterTiming, Config, Peer};
use crate::election::Decision;
use crate::events::EventLog;
use crate::lease;
use crate::model::NodeName;

/// At most this many voters; further peers join as learners so the quorum stays small.
pub const MAX_VOTERS: usize = 5;
const MEMBERSHIP_EVERY: Duration = Duration::from_millis(300);
/// How long a write (admin mutation, reload, seed) waits to be committed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Objects per log entry of a large change (~25 KB encoded): small enough for a follower to
/// receive, decode and persist within one heartbeat.
pub const OBJECTS_PER_ENTRY: usize = 500;

/// What the leader last decided, for status pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaderView {
    pub decision: Option<Decision>,
    /// Every member as the leader sees it.
    pub members: Vec<MemberView>,
}

/// A member as the leader sees it: liveness and readiness from its reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: NodeName,
    /// Reported within the failure timeout.
    pub alive: bool,
    /// Its daemon said it is ready in its last report.
    pub ready: bool,
    /// Since its last report (since this leader took over, if none yet).
    pub silent_ms: u64,
    /// Its file's labels with the runtime overrides.
    pub labels: crate::model::Labels,
    pub cordoned: bool,
}

pub struct ClusterNode {
    pub name: NodeName,
    pub id: NodeId,
    pub raft: Raft,
    pub timing: ClusterTiming,
    client: PeerClient,
    applied: watch::Receiver<Applied>,
    /// The controller of the term this node leads, if it leads.
    controller: Mutex<Option<(u64, Controller)>>,
    controller_wake: Notify,
    pub leader_view: Mutex<LeaderView>,
    /// Committed changes as this node applied them, and the daemon's own events.
    pub events: EventLog,
}

#[derive(Debug, Serialize, Deserialize)]
struct ApiError {
    error: String,
    leader: Option<String>,
}

fn api_error(status: StatusCode, error: String, leader: Option<String>) -> Response {
    (status, Json(ApiError { error, leader })).into_response()
}

impl ClusterNode {
    /// Opens the store, starts Raft and the peer endpoint, and bootstraps a fresh cluster.
    pub async fn start(config: &Config) -> anyhow::Result<Arc<ClusterNode>> {
        let timing = config.cluster.timing();
        let name = config.node.name.clone();
        let id = node_id(&name);
        let (log, sm) = store::open(&config.cluster.data_dir).with_context(|| {
            format!(
                "opening the Raft store in {}",
                config.cluster.data_dir.display()
            )
        })?;
        let applied = sm.subscribe();
        let events = sm.events();

        let raft_config = openraft::Config {
            cluster_name: "egressd".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_timeout_min_ms,
            election_timeout_max: timing.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
            // Every append and snapshot chunk must be taken by a follower within a heartbeat
            // (appends) or this long (chunks), also with 100 000 policies: small ones.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 256 * 1024,
            install_snapshot_timeout: 3000,
            ..Default::default()
        }
        .validate()
        .context("Raft timing settings")?;

        let auth = match &config.cluster.secret_file {
            Some(path) => Auth::from_file(path)
                .with_context(|| format!("reading the cluster secret {}", path.display()))?,
            // A one-node cluster talks to nobody: a secret nobody else knows keeps it that way.
            None => Auth::new(&random_secret()).context("generating a secret")?,
        };
        let client = PeerClient::new(auth.clone()).context("building the peer HTTP client")?;
        let raft = Raft::new(
            id,
            Arc::new(raft_config),
            Network::new(client.clone()),
            log,
            sm,
        )
        .await
        .context("starting Raft")?;

        let node = Arc::new(ClusterNode {
            name,
            id,
            raft,
            timing,
            client,
            applied,
            controller: Mutex::new(None),
            controller_wake: Notify::new(),
            leader_view: Mutex::new(LeaderView::default()),
            events,
        });

        let router = transport::authenticated(
            transport::raft_routes(node.raft.clone()).merge(
                Router::new()
                    .route("/cluster/report", post(report_handler))
                    .route("/cluster/hello", post(hello_handler))
                    .route("/cluster/write", post(write_handler))
                    .route("/cluster/view", post(view_handler))
                    .with_state(node.clone()),
            ),
            auth,
        );
        let listen = config.cluster.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the peer endpoint to {listen}"))?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!(error = %e, "peer endpoint stopped");
            }
        });

        node.bootstrap(&config.voters()).await?;
        Ok(node)
    }

    /// Initializes a fresh cluster with the configured voters. Every node does this with the same
    /// member set, which openraft documents as safe; whichever start order, one initialization
    /// wins and the others find the cluster already initialized.
    async fn bootstrap(&self, peers: &[Peer]) -> anyhow::Result<()> {
        if self
            .raft
            .is_initialized()
            .await
            .context("reading Raft state")?
        {
            return Ok(());
        }
        let mut sorted: Vec<&Peer> = peers.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let voters: BTreeMap<NodeId, Member> = sorted
            .iter()
            .take(MAX_VOTERS)
            .map(|p| (node_id(&p.name), member(p)))
            .collect();
        if !voters.contains_key(&self.id) {
            // A learner never initializes; the leader adds it.
            return Ok(());
        }
        // A node added to a running cluster starts with an empty store too: it must wait to be
        // added, not found a cluster of its own.
        for p in peers.iter().filter(|p| node_id(&p.name) != self.id) {
            let addr = p.address.to_string();
            let hello: Result<Hello, _> = self
                .client
                .post(&addr, "/cluster/hello", &(), Duration::from_millis(300))
                .await;
            if hello.is_ok_and(|h| h.initialized) {
                info!(peer = %p.name, "joining the running cluster; waiting to be added");
                return Ok(());
            }
        }
        match self.raft.initialize(voters).await {
            Ok(()) => info!(
                voters = peers.len().min(MAX_VOTERS),
                "initialized a new cluster"
            ),
            // Another node's initialization reached us first: the same outcome.
            Err(RaftError::APIError(e)) => debug!(error = %e, "cluster already initialized"),
            Err(e) => return Err(e).context("initializing the cluster"),
        }
        Ok(())
    }

    pub fn applied(&self) -> Applied {
        self.applied.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Applied> {
        self.applied.clone()
    }

    /// The leader's id and peer address, if one is known.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let member = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, member))
    }

    fn is_leader_locally(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Sends a report to the leader (in-process when that is us) and returns its reply.
    pub async fn report(&self, report: Report) -> anyhow::Result<Reply> {
        let (leader, member) = self.leader().context("no leader known")?;
        if leader == self.id {
            return self.handle_report(report);
        }
        self.client
            .post(
                &member.addr,
                "/cluster/report",
                &report,
                Duration::from_millis(self.timing.report_interval_ms.max(20)),
            )
            .await
            .with_context(|| format!("reporting to leader {}", member.name))
    }

    fn handle_report(&self, report: Report) -> anyhow::Result<Reply> {
        let state = self.applied.borrow().state.clone();
        let term = self.raft.metrics().borrow().current_term;
        let mut guard = self
            .controller
            .lock()
            .map_err(|_| anyhow::anyhow!("controller lock poisoned"))?;
        let Some((t, ctl)) = guard.as_mut().filter(|(t, _)| *t == term) else {
            anyhow::bail!("not the leader (yet)");
        };
        let grant = ctl.on_report(&report, crate::clock::now(), &state);
        let term = *t;
        drop(guard);
        // A report may confirm a release the controller is waiting for.
        self.controller_wake.notify_one();
        Ok(Reply {
            grant,
            leader: self.name.clone(),
            term,
        })
    }

    /// The leader's view (decision, members' liveness), from wherever the leader is.
    pub async fn leader_view(&self) -> anyhow::Result<LeaderView> {
        let (leader, member) = self.leader().context("no leader known")?;
        if leader == self.id {
            return self
                .leader_view
                .lock()
                .map(|v| v.clone())
                .map_err(|_| anyhow::anyhow!("leader view lock poisoned"));
        }
        self.client
            .post(
                &member.addr,
                "/cluster/view",
                &(),
                // Status waits for it: an unreachable leader must not make status hang.
                Duration::from_millis(200),
            )
            .await
            .with_context(|| format!("asking leader {} for its view", member.name))
    }

    /// Commits a command through the leader, wherever it is. A large object change goes in
    /// parts (`Stage`) and is applied whole, or refused whole, by a final `Commit`, so that no
    /// log entry is large: a follower must take any entry within a heartbeat.
    pub async fn write(&self, cmd: Command) -> anyhow::Result<CommandResponse> {
        if !cmd.is_object_change() || cmd.object_count() <= OBJECTS_PER_ENTRY {
            return self.write_one(cmd).await;
        }
        let txn = rand_u64() ^ self.id;
        let parts = cmd.split(OBJECTS_PER_ENTRY);
        let n = parts.len() as u32;
        for (i, part) in parts.into_iter().enumerate() {
            let r = self
                .write_one(Command::Stage {
                    txn,
                    part: i as u32,
                    command: Box::new(part),
                })
                .await
                .with_context(|| format!("staging part {} of {n}", i + 1))?;
            if r.refused.is_some() {
                return Ok(r);
            }
        }
        self.write_one(Command::Commit { txn, parts: n }).await
    }

    async fn write_one(&self, cmd: Command) -> anyhow::Result<CommandResponse> {
        let (leader, member) = self.leader().context("no leader known")?;
        if leader == self.id {
            // Without a quorum a write never commits: give up like a forwarded write does, so
            // that a caller in the agent loop (a reload) cannot stall it.
            let resp = tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(Versioned(cmd)))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "not committed within {} s (no quorum?)",
                        WRITE_TIMEOUT.as_secs()
                    )
                })?
                .context("committing")?;
            return Ok(resp.data);
        }
        let resp: CommandResponse = self
            .client
            .post(&member.addr, "/cluster/write", &cmd, WRITE_TIMEOUT)
            .await
            .with_context(|| format!("forwarding the write to leader {}", member.name))?;
        // Committed on the leader; answer once this node has applied it too, so that a read
        // here right after (`egressd apply`, then `get` or `delete`) sees the change.
        let mut applied = self.applied.clone();
        tokio::time::timeout(WRITE_TIMEOUT, applied.wait_for(|a| a.index >= resp.index))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "committed as entry {}, but not applied on this node within {} s",
                    resp.index,
                    WRITE_TIMEOUT.as_secs()
                )
            })?
            .context("the state machine stopped")?;
        Ok(resp)
    }

    /// The leader moves Raft's membership towards the committed member list: new members join
    /// as learners, the first `MAX_VOTERS` by name vote once they have caught up, and members
    /// no longer listed leave. A task of its own, so that a slow change never holds up leases.
    pub async fn run_membership(self: Arc<Self>) {
        let mut applied = self.applied.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(MEMBERSHIP_EVERY) => {}
                r = applied.changed() => if r.is_err() { return },
            }
            if self.is_leader_locally()
                && let Err(e) = self.reconcile_membership().await
            {
                warn!(error = %e, "membership change failed; retrying");
            }
        }
    }

    async fn reconcile_membership(&self) -> anyhow::Result<()> {
        let state = self.applied().state.clone();
        if state.members.is_empty() {
            return Ok(());
        }
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let want: BTreeMap<NodeId, Member> = state
            .members
            .iter()
            .map(|(name, addr)| {
                let m = Member {
                    name: name.clone(),
                    addr: addr.clone(),
                };
                (node_id(name), m)
            })
            .collect();
        for (id, m) in &want {
            if membership.get_node(id).is_none() {
                self.raft.add_learner(*id, m.clone(), false).await?;
                info!(member = %m.name, "added as a learner");
                return Ok(());
            }
        }
        let mut names: Vec<&String> = state.members.keys().collect();
        names.sort();
        let target: BTreeSet<NodeId> = names.iter().take(MAX_VOTERS).map(|n| node_id(n)).collect();
        let current: BTreeSet<NodeId> = membership.voter_ids().collect();
        if target != current {
            let last = metrics.last_log_index.unwrap_or(0);
            let caught_up = |id: &NodeId| {
                current.contains(id)
                    || metrics
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .is_some_and(|m| m.index + 10 >= last)
            };
            if target.iter().all(caught_up) {
                self.raft.change_membership(target.clone(), false).await?;
                info!(voters = ?names.iter().take(MAX_VOTERS).collect::<Vec<_>>(), "voters changed");
            }
            return Ok(());
        }
        let gone: BTreeSet<NodeId> = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !want.contains_key(id) && !current.contains(id))
            .collect();
        if !gone.is_empty() {
            self.raft
                .change_membership(openraft::ChangeMembers::RemoveNodes(gone), false)
                .await?;
            info!("removed members no longer listed");
        }
        Ok(())
    }

    /// The leader's loop: confirm the quorum, decide, commit assignment changes. Runs on every
    /// node and does nothing while the node is not the leader. A new controller (and so a new
    /// settling period) starts with every term this node leads.
    pub async fn run_controller(self: Arc<Self>) {
        let tick = Duration::from_millis(self.timing.report_interval_ms);
        let timing = self.timing.lease_timing();
        let mut metrics = self.raft.metrics();
        let mut applied = self.applied.clone();
        let mut next = Instant::now();
        let mut led: Option<u64> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.controller_wake.notified() => {}
                r = applied.changed() => if r.is_err() { return },
                r = metrics.changed() => {
                    if r.is_err() { return }
                    // Replication progress changes the metrics all the time; only a change of
                    // leadership or term matters here.
                    if self.leading_term() == led {
                        continue;
                    }
                }
            }
            let now = Instant::now();
            led = self.leading_term();
            let Some(term) = led else {
                if let Ok(mut c) = self.controller.lock() {
                    *c = None;
                }
                next = now + tick;
                continue;
            };
            let span = info_span!("controller", node = %self.name, term);
            self.clone()
                .controller_round(timing, term)
                .instrument(span)
                .await;
            let at = crate::clock::now();
            let deadline = self.controller.lock().ok().and_then(|c| {
                c.as_ref()
                    .and_then(|(_, c)| c.next_deadline(at))
                    .map(|d| Instant::now() + d.saturating_sub(at))
            });
            next = deadline.map_or(now + tick, |d| d.min(now + tick));
        }
    }

    /// While this node leads `term`: a quorum round every `every`. A quorum's answer proves this
    /// leadership and that the applied state holds everything committed before it; grants may
    /// last `lease` from the start of the round.
    async fn confirm_loop(self: Arc<Self>, term: u64, every: Duration) {
        while self.leading_term() == Some(term) {
            let begun = Instant::now();
            let started = crate::clock::now();
            if self.raft.ensure_linearizable().await.is_ok()
                && let Ok(mut c) = self.controller.lock()
                && let Some((t, c)) = c.as_mut()
                && *t == term
            {
                c.confirmed(started);
            }
            tokio::time::sleep_until((begun + every).into()).await;
        }
    }

    /// The term this node leads, if it is the leader.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    async fn controller_round(self: Arc<Self>, timing: lease::Timing, term: u64) {
        let started = crate::clock::now();
        if let Ok(mut c) = self.controller.lock()
            && c.as_ref().is_none_or(|(t, _)| *t != term)
        {
            // Twice per report interval: a grant is never much shorter than the lease.
            let every = Duration::from_millis(self.timing.report_interval_ms.max(2) / 2);
            tokio::spawn(
                self.clone()
                    .confirm_loop(term, every)
                    .instrument(tracing::Span::current()),
            );
            self.events.local(
                crate::events::EventKind::Leadership,
                None,
                format!(
                    "{} became leader (term {term}): taking over the controller; assignments \
                     wait {} ms for the previous leader's grants to end",
                    self.name,
                    timing.settle().as_millis()
                ),
            );
            *c = Some((term, Controller::new(timing, started)));
        }
        let applied = self.applied();
        let membership = applied.membership.membership().clone();
        let members: Vec<NodeName> = membership.nodes().map(|(_, m)| m.name.clone()).collect();
        let now = crate::clock::now();
        let (changes, decision, silent) = {
            let Ok(mut c) = self.controller.lock() else {
                return;
            };
            let Some((t, c)) = c.as_mut() else { return };
            if *t != term {
                return;
            }
            c.lease.applied(applied.index);
            let (changes, decision) = c.tick(&members, &applied.state, now);
            let silent: BTreeMap<String, u64> = changes
                .iter()
                .filter(|ch| ch.kind == ChangeKind::Failover)
                .filter_map(|ch| {
                    let from = ch.from.as_ref()?;
                    Some((
                        ch.gateway.clone(),
                        c.silent_for(from, now).as_millis() as u64,
                    ))
                })
                .collect();
            // Granted to nobody from here until the change is applied.
            for ch in &changes {
                c.lease.start_move(&ch.gateway);
            }
            let views = c
                .node_states(&members, &applied.state, now)
                .into_iter()
                .map(|n| MemberView {
                    silent_ms: c.silent_for(&n.name, now).as_millis() as u64,
                    name: n.name,
                    alive: n.alive,
                    ready: n.ready,
                    labels: n.labels,
                    cordoned: n.cordoned,
                })
                .collect();
            if let Ok(mut v) = self.leader_view.lock() {
                v.decision = Some(decision.clone());
                v.members = views;
            }
            (changes, decision, silent)
        };
        if changes.is_empty() {
            return;
        }
        let mut assign = Vec::new();
        for ch in &changes {
            let from = ch.from.clone().unwrap_or_default();
            let reason = match ch.kind {
                ChangeKind::Failover => Reason::Failover {
                    from,
                    silent_ms: silent.get(&ch.gateway).copied().unwrap_or(0),
                },
                ChangeKind::Release => Reason::Handover {
                    from,
                    why: ch
                        .from
                        .as_ref()
                        .and_then(|f| decision.gateways.get(&ch.gateway)?.ineligible.get(f))
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| {
                            "a node earlier in the selection order is eligible".into()
                        }),
                },
                ChangeKind::Assign => Reason::Elected,
            };
            let why = match &reason {
                Reason::Failover { from, silent_ms } => format!(
                    "{from} went silent (no report for {silent_ms} ms, or none since this \
                     leader took over; its lease has expired)"
                ),
                Reason::Handover { why, .. } => {
                    format!("planned handover: {why}; releasing first")
                }
                Reason::Elected => "the gateway is free and this node is the choice".into(),
            };
            info!(
                gateway = %ch.gateway,
                from = ch.from.as_deref().unwrap_or("-"),
                to = ch.to.as_deref().unwrap_or("-"),
                kind = ?ch.kind,
                why,
                "assignment change"
            );
            assign.push(AssignChange {
                gateway: ch.gateway.clone(),
                to: ch.to.clone(),
                reason,
            });
        }
        let cmd = Command::Assign {
            changes: assign,
            at_unix_ms: crate::events::unix_ms(),
        };
        // Committing waits for a quorum: in a task of its own, so that the loop keeps deciding
        // (the gateways in flight are skipped until the change is applied).
        let node = self.clone();
        let gateways: Vec<String> = changes.iter().map(|c| c.gateway.clone()).collect();
        tokio::spawn(
            async move {
                let t = Instant::now();
                match node.raft.client_write(Versioned(cmd)).await {
                    Ok(resp) => {
                        debug!(
                            commit_ms = t.elapsed().as_secs_f64() * 1e3,
                            "assignment committed"
                        );
                        if let Ok(mut c) = node.controller.lock()
                            && let Some((t, c)) = c.as_mut()
                            && *t == term
                        {
                            for g in &gateways {
                                c.lease.move_logged(g, resp.log_id.index);
                            }
                        }
                        node.controller_wake.notify_one();
                    }
                    // Leadership is lost: the next controller starts afresh.
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
                    Err(e) => warn!(error = %e, "committing the assignment failed"),
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

/// A peer's answer to a node that starts with an empty store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    initialized: bool,
}

async fn hello_handler(State(node): State<Arc<ClusterNode>>) -> Response {
    let initialized = node.raft.is_initialized().await.unwrap_or(false);
    Msg(Hello { initialized }).into_response()
}

fn member(p: &Peer) -> Member {
    Member {
        name: p.name.clone(),
        addr: p.address.to_string(),
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&random_secret()[..8]);
    u64::from_ne_bytes(b)
}

fn random_secret() -> Vec<u8> {
    let mut buf = vec![0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    buf
}

async fn report_handler(
    State(node): State<Arc<ClusterNode>>,
    Msg(report): Msg<Report>,
) -> Response {
    match node.handle_report(report) {
        Ok(grant) => Msg(grant).into_response(),
        Err(e) => api_error(
            StatusCode::MISDIRECTED_REQUEST,
            e.to_string(),
            node.leader().map(|(_, m)| m.name),
        ),
    }
}

async fn view_handler(State(node): State<Arc<ClusterNode>>) -> Response {
    if !node.is_leader_locally() {
        return api_error(
            StatusCode::MISDIRECTED_REQUEST,
            "not the leader".into(),
            node.leader().map(|(_, m)| m.name),
        );
    }
    match node.leader_view.lock() {
        Ok(v) => Msg(v.clone()).into_response(),
        Err(_) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "view lock poisoned".into(),
            None,
        ),
    }
}

async fn write_handler(State(node): State<Arc<ClusterNode>>, Msg(cmd): Msg<Command>) -> Response {
    match node.raft.client_write(Versioned(cmd)).await {
        Ok(resp) => Msg(resp.data).into_response(),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => api_error(
            StatusCode::MISDIRECTED_REQUEST,
            "not the leader".into(),
            f.leader_node.map(|m| m.name),
        ),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    }
}
