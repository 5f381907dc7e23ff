//! One cluster member at run time: the Raft instance, its peer endpoint (Raft RPCs plus node
//! reports and forwarded writes), bootstrap, and the leader's controller loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::campaign::{self, CampaignWatch};
use crate::cluster::codec::Versioned;
use crate::cluster::controller::{ChangeKind, Controller, Reply, Report};
use crate::cluster::state::{AssignChange, ClusterState, Reason};
use crate::cluster::store::{self, Applied};
use crate::cluster::transport::{
    self, ClusterIdFn, Guard, Msg, Network, PeerClient, RouteLimits, TransportError,
};
use crate::cluster::{Command, CommandResponse, Member, NodeId, Raft, node_id};
use crate::config::{ClusterTiming, Config, Peer};
use crate::election::Decision;
use crate::events::EventLog;
use crate::lease;
use crate::model::NodeName;
use crate::tls::{PeerTls, TlsFiles, TlsSummary};

/// At most this many voters; further peers join as learners so the quorum stays small.
pub const MAX_VOTERS: usize = 5;
/// The peer listener's limits (see `tls::server`): a peer's TLS handshake takes about a
/// millisecond on a LAN; members hold a few pooled connections each and open few new ones.
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
const PEER_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const PEER_MAX_PER_SOURCE: usize = 64;
const PEER_NEW_PER_SOURCE_PER_SEC: u32 = 50;
const PEER_EDGE_NICE: i32 = 0;
const MEMBERSHIP_EVERY: Duration = Duration::from_millis(300);
/// A follower's controller loop waits for a change of leadership (Raft's server metrics); this
/// only bounds the wait.
const FOLLOWER_CONTROLLER_CHECK: Duration = Duration::from_secs(1);
/// The longest a node that may not campaign (a leader, a learner) waits between looks.
const NO_CAMPAIGN_CHECK: Duration = Duration::from_secs(1);
/// The longest a leader's controller waits between rounds when no deadline is nearer.
const LEADER_CONTROLLER_CHECK: Duration = Duration::from_secs(1);
/// How long a requested snapshot may take before it is requested again.
const COMPACT_RETRY: Duration = Duration::from_secs(10);
/// How long after openraft's latest undelayed campaign time `run_campaigns` steps in.
const CAMPAIGN_SLACK: Duration = Duration::from_millis(10);
/// How long a write (admin mutation, reload, seed) waits to be committed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one attempt of a write failed: the leader it went to no longer leads (try the next
/// one), or anything else.
enum Attempt {
    NotLeader(anyhow::Error),
    Failed(anyhow::Error),
}

/// Objects per log entry of a large change (~25 KB encoded): small enough for a follower to
/// receive, decode and persist within one heartbeat.
pub const OBJECTS_PER_ENTRY: usize = 500;
/// The CIDRs per fragment of a policy too large for one log entry (~11 bytes each encoded:
/// ~180 KB); see `plan_parts`.
pub const CIDRS_PER_ENTRY: usize = 16_384;

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
    /// Why it is cordoned: `egressd node cordon`, Kubernetes' `spec.unschedulable`, or both.
    /// Last and defaulted: a leader of an older version sends none.
    #[serde(default)]
    pub cordon_reasons: Vec<String>,
}

pub struct ClusterNode {
    pub name: NodeName,
    pub id: NodeId,
    pub raft: Raft,
    pub timing: ClusterTiming,
    client: PeerClient,
    /// The peer TLS identity (`None`: a one-node cluster without `[cluster.tls]`).
    tls: Option<PeerTls>,
    applied: watch::Receiver<Applied>,
    /// The controller of the term this node leads, if it leads.
    controller: Mutex<Option<(u64, Controller)>>,
    controller_wake: Notify,
    /// When voters last accepted this node's leadership (from Raft's own appends).
    acks: transport::Acks,
    /// The heartbeats' answers are stale: ask a quorum directly (`run_confirmations`).
    confirm_wake: Notify,
    /// The controller's last decision, for status pages (see [`ClusterNode::local_view`]).
    last_decision: Mutex<Option<Decision>>,
    /// Committed changes as this node applied them, and the daemon's own events.
    pub events: EventLog,
    /// What this node's vote requests were refused for (see `run_campaigns`).
    pub campaigns: Arc<CampaignWatch>,
    /// A `ClusterFormat` write is under way (one at a time).
    recording_format: AtomicBool,
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
            // Nothing before a snapshot is kept: what a new leader re-sends while it looks for
            // its followers' log position is then only what came after it (see
            // `run_compaction`). A follower behind the snapshot gets the snapshot instead.
            max_in_snapshot_log_to_keep: 0,
            // Every append and snapshot chunk must be taken by a follower within a heartbeat
            // (appends) or this long (chunks), also with 100 000 policies: small ones.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 256 * 1024,
            install_snapshot_timeout: 3000,
            ..Default::default()
        }
        .validate()
        .context("Raft timing settings")?;

        let tls = match &config.cluster.tls {
            Some(files) => Some(
                PeerTls::load(files.clone(), &name)
                    .with_context(|| "loading the peer TLS files of [cluster.tls]".to_string())?,
            ),
            None => None,
        };
        let ids = applied.clone();
        let cluster_id: ClusterIdFn = Arc::new(move || ids.borrow().state.cluster_id.clone());
        let client = PeerClient::new(&name, tls.clone(), cluster_id.clone());
        let campaigns = Arc::new(CampaignWatch::default());
        let acks = transport::Acks::default();
        let raft = Raft::new(
            id,
            Arc::new(raft_config),
            Network::new(client.clone(), campaigns.clone(), acks.clone()),
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
            tls: tls.clone(),
            applied,
            controller: Mutex::new(None),
            controller_wake: Notify::new(),
            acks,
            confirm_wake: Notify::new(),
            last_decision: Mutex::new(None),
            recording_format: AtomicBool::new(false),
            events,
            campaigns,
        });

        match tls {
            Some(tls) => {
                let router = transport::guarded(
                    transport::raft_routes(node.raft.clone()).merge(
                        Router::new()
                            .route(
                                transport::REPORT_PATH,
                                transport::limit_body(post(report_handler), RouteLimits::REPORT),
                            )
                            .route(
                                transport::HELLO_PATH,
                                transport::limit_body(post(hello_handler), RouteLimits::EMPTY),
                            )
                            .route(
                                transport::WRITE_PATH,
                                transport::limit_body(post(write_handler), RouteLimits::WRITE),
                            )
                            .route(
                                transport::VIEW_PATH,
                                transport::limit_body(post(view_handler), RouteLimits::EMPTY),
                            )
                            .with_state(node.clone()),
                    ),
                    Guard::new(&node.name, cluster_id),
                );
                let listen = config.cluster.listen;
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the peer endpoint to {listen}"))?;
                // Normal priority: a member's new connection (a new leader's first heartbeat)
                // must not wait behind the host's other work; the admission limits bound what
                // strangers can make this thread do.
                let edge = crate::tls::server::edge_runtime("peer-edge", PEER_EDGE_NICE)
                    .context("starting the peer listener's accept thread")?;
                let options = crate::tls::server::ServeOptions {
                    handshake_timeout: PEER_HANDSHAKE_TIMEOUT,
                    header_read_timeout: PEER_HEADER_TIMEOUT,
                    max_connections: 1024,
                    max_per_source: PEER_MAX_PER_SOURCE,
                    new_per_source_per_sec: PEER_NEW_PER_SOURCE_PER_SEC,
                    authorize: None,
                    edge: Some(edge),
                    name: "peer",
                }
                .members_only(authorized_names(
                    node.applied.clone(),
                    config.voters().into_iter().map(|p| p.name).collect(),
                ));
                info!(%listen, tls = %tls.summary(), "peer endpoint: mutual TLS");
                tokio::spawn(crate::tls::server::serve(
                    listener,
                    tls,
                    router,
                    options,
                    std::future::pending(),
                ));
            }
            None => info!(
                "a one-node cluster without [cluster.tls]: no peer endpoint (add [cluster.tls] \
                 before this cluster gets a second member)"
            ),
        }

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
        // added (`egressd member add`), not found a cluster of its own. A peer that answers
        // "initialized", or refuses this node as no member of its cluster, runs a cluster.
        for p in peers.iter().filter(|p| node_id(&p.name) != self.id) {
            let addr = p.address.to_string();
            let hello: Result<Hello, _> = self
                .client
                .post(
                    &p.name,
                    &addr,
                    transport::HELLO_PATH,
                    &(),
                    Duration::from_millis(300),
                )
                .await;
            match hello {
                Ok(h) if h.initialized => {
                    info!(
                        peer = %p.name,
                        cluster = h.cluster_id.as_deref().unwrap_or("-"),
                        "joining the running cluster; waiting to be added"
                    );
                    return Ok(());
                }
                Err(TransportError::Refused { message, .. }) => {
                    warn!(
                        peer = %p.name,
                        %message,
                        "a running cluster does not count this node as a member: not founding \
                         a cluster; waiting to be added (`egressd member add {} ADDRESS` on a \
                         member)",
                        self.name
                    );
                    return Ok(());
                }
                _ => {}
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
                &member.name,
                &member.addr,
                transport::REPORT_PATH,
                &report,
                Duration::from_millis(self.timing.report_interval_ms.max(20)),
            )
            .await
            .with_context(|| format!("reporting to leader {}", member.name))
    }

    fn handle_report(&self, report: Report) -> anyhow::Result<Reply> {
        let (state, applied_term) = {
            let a = self.applied.borrow();
            (a.state.clone(), a.term)
        };
        let term = self
            .raft
            .server_metrics()
            .borrow()
            .vote
            .leader_id()
            .get_term();
        let mut guard = self
            .controller
            .lock()
            .map_err(|_| anyhow::anyhow!("controller lock poisoned"))?;
        let Some((t, ctl)) = guard.as_mut().filter(|(t, _)| *t == term) else {
            anyhow::bail!("not the leader (yet)");
        };
        self.confirm(term, applied_term, ctl);
        let grant = ctl.on_report(&report, crate::clock::now(), &state);
        let news = ctl.take_news();
        let term = *t;
        drop(guard);
        if news {
            self.controller_wake.notify_one();
        }
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
            return Ok(self.local_view());
        }
        self.client
            .post(
                &member.name,
                &member.addr,
                transport::VIEW_PATH,
                &(),
                // Status waits for it: an unreachable leader must not make status hang.
                Duration::from_millis(200),
            )
            .await
            .with_context(|| format!("asking leader {} for its view", member.name))
    }

    /// This node's view as the leader: the last controller round's decision, and the members'
    /// liveness as of now (a round runs only when something is due, which may be a few report
    /// intervals ago). Empty on a follower.
    pub fn local_view(&self) -> LeaderView {
        let mut view = LeaderView {
            decision: self.last_decision.lock().ok().and_then(|d| d.clone()),
            members: Vec::new(),
        };
        let applied = self.applied();
        let members = member_names(&applied);
        if let Ok(c) = self.controller.lock()
            && let Some((_, c)) = c.as_ref()
        {
            view.members = member_views(c, &members, &applied.state, crate::clock::now());
        }
        view
    }

    /// Commits a command through the leader, wherever it is. A large object change goes in
    /// parts (`Stage`) and is applied whole, or refused whole, by a final `Commit`, so that no
    /// log entry is large: a follower must take any entry within a heartbeat. No entry is
    /// larger than [`transport::MAX_ENTRY_BYTES`] (the peers' body limit for it).
    pub async fn write(&self, cmd: Command) -> anyhow::Result<CommandResponse> {
        let parts = if cmd.is_object_change() {
            match tokio::task::spawn_blocking(move || plan_parts(cmd))
                .await
                .context("planning the parts of the change")?
            {
                Ok(parts) => parts,
                Err(why) => {
                    return Ok(CommandResponse {
                        refused: Some(why),
                        ..Default::default()
                    });
                }
            }
        } else {
            vec![cmd]
        };
        if parts.len() == 1 {
            let Some(cmd) = parts.into_iter().next() else {
                anyhow::bail!("an empty change");
            };
            return self.write_one(cmd).await;
        }
        let txn = rand_u64() ^ self.id;
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

    /// Commits one entry through the leader. A change of leader between finding it and its
    /// taking the command is retried with the new one until [`WRITE_TIMEOUT`]: openraft refuses
    /// (ForwardToLeader) before appending, so the command was not written.
    async fn write_one(&self, cmd: Command) -> anyhow::Result<CommandResponse> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            let e = match self.write_once(cmd.clone(), deadline).await {
                Ok(r) => return Ok(r),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::NotLeader(e)) => e,
            };
            if Instant::now() >= deadline {
                return Err(e.context(format!(
                    "no leader took the command within {} s",
                    WRITE_TIMEOUT.as_secs()
                )));
            }
            info!(
                error = format!("{e:#}"),
                "the leader changed while committing a write: trying the next one"
            );
            tokio::time::sleep(Duration::from_millis(self.timing.heartbeat_ms)).await;
        }
    }

    async fn write_once(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResponse, Attempt> {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((leader, member)) = self.leader() else {
            return Err(Attempt::NotLeader(anyhow::anyhow!("no leader known")));
        };
        if leader == self.id {
            // Without a quorum a write never commits: give up like a forwarded write does, so
            // that a caller in the agent loop (a reload) cannot stall it.
            return match tokio::time::timeout(left, self.propose(cmd)).await {
                Err(_) => Err(Attempt::Failed(anyhow::anyhow!(
                    "not committed within {} s (no quorum?)",
                    WRITE_TIMEOUT.as_secs()
                ))),
                Ok(Ok(r)) => Ok(r),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    Err(Attempt::NotLeader(anyhow::anyhow!(
                        "this node stopped leading (now: {})",
                        f.leader_node.map_or("unknown".into(), |m| m.name)
                    )))
                }
                Ok(Err(e)) => Err(Attempt::Failed(anyhow::anyhow!("committing: {e}"))),
            };
        }
        let sent = self
            .client
            .post(
                &member.name,
                &member.addr,
                transport::WRITE_PATH,
                &cmd,
                left,
            )
            .await;
        let resp: CommandResponse = match sent {
            Ok(r) => r,
            Err(e) => {
                // Not taken: the node no longer leads (421), or it was never reached (a leader
                // that just died). Either way the command was not written, and can go again.
                let again = matches!(
                    e,
                    transport::TransportError::Status { status: 421, .. }
                        | transport::TransportError::Connect { .. }
                );
                let e = anyhow::Error::new(e)
                    .context(format!("forwarding the write to leader {}", member.name));
                return Err(if again {
                    Attempt::NotLeader(e)
                } else {
                    Attempt::Failed(e)
                });
            }
        };
        if resp.refused.is_some() {
            return Ok(resp);
        }
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
            })
            .and_then(|r| r.map(|_| ()).context("the state machine stopped"))
            .map_err(Attempt::Failed)?;
        Ok(resp)
    }

    /// On the leader: proposes `cmd` once the checks that only the leader can make pass — every
    /// member reads the command's format, and a member change keeps a quorum and waits for the
    /// previous one. A refusal is an answer (`refused`), not an error.
    pub async fn propose(
        &self,
        cmd: Command,
    ) -> Result<CommandResponse, RaftError<NodeId, ClientWriteError<NodeId, Member>>> {
        if let Err(why) = self
            .format_gate(&cmd)
            .and_then(|()| self.check_member_change(&cmd))
        {
            info!(command = cmd.kind(), %why, "write refused by the leader");
            return Ok(CommandResponse {
                refused: Some(why),
                ..Default::default()
            });
        }
        let started = Instant::now();
        let kind = cmd.kind();
        let r = self.raft.client_write(Versioned(cmd)).await?.data;
        debug!(
            command = kind,
            index = r.index,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "committed and applied on the leader"
        );
        Ok(r)
    }

    /// A command of format N is proposed only once every member's latest report to this leader
    /// says it reads format N (a node reading an older format would stop at the entry). The
    /// member a `RemoveMember` removes need not read it.
    fn format_gate(&self, cmd: &Command) -> Result<(), String> {
        let need = cmd.format();
        // Every node that can talk to this one reads the baseline format (older versions spoke
        // another peer protocol), so only newer formats wait for reports. Gating the baseline
        // too made one member that never reported (a node added but not started, a node down
        // since before this leader took over) block every member change, even removing others.
        if need <= crate::cluster::state::BASELINE_FORMAT {
            return Ok(());
        }
        let state = self.applied().state;
        // Every member read it when the cluster recorded it; a member that comes back later
        // runs a version at least as new, or stops at the first entry it cannot read.
        if need <= state.cluster_format {
            return Ok(());
        }
        let exempt = match cmd {
            Command::RemoveMember { name } => Some(name.as_str()),
            _ => None,
        };
        let members: Vec<String> = if state.members.is_empty() {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .map(|(_, m)| m.name.clone())
                .collect()
        } else {
            state.member_names()
        };
        let guard = self
            .controller
            .lock()
            .map_err(|_| "controller lock poisoned".to_string())?;
        let Some((_, ctl)) = guard.as_ref() else {
            return Err("this node is not the leader (yet); try again".into());
        };
        for m in members
            .iter()
            .filter(|m| **m != self.name && Some(m.as_str()) != exempt)
        {
            match ctl.command_format(m) {
                Some(f) if f >= need => {}
                Some(f) => {
                    return Err(format!(
                        "{m} reads command formats up to {f}, and a {} needs format {need}: \
                         upgrade {m} first (every member must run a version that knows the \
                         command before it is used)",
                        cmd.kind()
                    ));
                }
                None => {
                    return Err(format!(
                        "{m} has not reported to the leader since it took over, so the leader \
                         cannot know whether it reads command format {need} (a {}): start {m}, \
                         or remove it with `egressd member remove {m}`",
                        cmd.kind()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The leader's checks of a member change: one voter change at a time, and the voters
    /// after the change must have a quorum of live nodes (the node added counts as live: it
    /// only becomes a voter once it has caught up).
    fn check_member_change(&self, cmd: &Command) -> Result<(), String> {
        let (name, adding) = match cmd {
            Command::AddMember { name, .. } => (name, true),
            Command::RemoveMember { name } => (name, false),
            _ => return Ok(()),
        };
        let state = self.applied().state;
        if adding == state.members.contains_key(name) {
            // Nothing to change, or the state machine refuses it with its own message.
            return Ok(());
        }
        if adding && self.tls.is_none() {
            // Without peer TLS the leader can reach nobody: the member would be added to the
            // list and never caught up (found by schemathesis: replication errors forever).
            return Err(format!(
                "this node runs without [cluster.tls] (a one-node cluster), so it cannot talk to \
                 {name}: give every node its [cluster.tls] files (`egressd tls`) and restart \
                 them, then add members"
            ));
        }
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return Err(
                "a voter change is being committed right now; try again in a moment".into(),
            );
        }
        let voters: BTreeSet<String> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|m| m.name.clone()))
            .collect();
        let wanted = voter_target(state.members.keys());
        let in_progress = wanted != voters;
        // Removing a member that is not a voter (an added node that never caught up) changes
        // no voter, and may cancel an unfinished addition.
        if in_progress && (adding || voters.contains(name)) {
            return Err(format!(
                "the previous member change is not finished: the voters are {}, the member list \
                 wants {} (a new member becomes a voter once it has caught up; is it running?); \
                 try again once `egressd status` shows them equal, or remove the member that \
                 does not come up",
                list(&voters),
                list(&wanted)
            ));
        }
        let mut after: BTreeSet<String> = state.members.keys().cloned().collect();
        if adding {
            after.insert(name.clone());
        } else {
            after.remove(name);
        }
        let target = voter_target(after.iter());
        let now = crate::clock::now();
        let alive: Vec<&String> = {
            let guard = self
                .controller
                .lock()
                .map_err(|_| "controller lock poisoned".to_string())?;
            let Some((_, ctl)) = guard.as_ref() else {
                return Err("this node is not the leader (yet); try again".into());
            };
            target
                .iter()
                .filter(|n| **n == self.name || (adding && *n == name) || ctl.alive(n, now))
                .collect()
        };
        let need = target.len() / 2 + 1;
        if alive.len() < need {
            return Err(format!(
                "{} {name} would leave the voters {} with {} of them alive ({}), and a quorum \
                 of them needs {need}: bring the silent ones back first",
                if adding { "adding" } else { "removing" },
                list(&target),
                alive.len(),
                alive
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }

    /// The peer TLS summary (certificate names, expiry, CAs), if the node has peer TLS.
    pub fn tls_summary(&self) -> Option<TlsSummary> {
        self.tls.as_ref().map(PeerTls::summary)
    }

    /// SIGHUP: re-reads the peer TLS files (possibly new paths). On failure the previous files
    /// stay in use. Adding or removing `[cluster.tls]` needs a restart.
    pub fn reload_tls(&self, files: Option<&TlsFiles>) -> Result<Option<TlsSummary>, String> {
        match (&self.tls, files) {
            (Some(tls), Some(files)) => tls
                .reload_from(files.clone())
                .map(Some)
                .map_err(|e| e.to_string()),
            (None, None) => Ok(None),
            (Some(_), None) => Err(
                "[cluster.tls] was removed from the file: a running node keeps its peer TLS; \
                 restart to run without it (a one-node cluster only)"
                    .into(),
            ),
            (None, Some(_)) => Err(
                "[cluster.tls] was added to the file: restart the node to open its peer \
                 endpoint"
                    .into(),
            ),
        }
    }

    /// How a node's `cluster.peers` differs from the cluster's member list (empty while the
    /// member list is not known yet).
    pub fn member_drift(&self, file_peers: &[Peer]) -> Vec<String> {
        member_drift(&self.applied().state, file_peers)
    }

    /// The leader moves Raft's membership towards the committed member list, one voter at a
    /// time: new members join as learners, the first `MAX_VOTERS` by name vote once they have
    /// caught up, and members no longer listed leave. It also gives a new cluster its id. A
    /// task of its own, so that a slow change never holds up leases.
    pub async fn run_membership(self: Arc<Self>) {
        let mut applied = self.applied.clone();
        let mut id_proposed_in: Option<u64> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(MEMBERSHIP_EVERY) => {}
                r = applied.changed() => if r.is_err() { return },
            }
            let Some(term) = self.leading_term() else {
                continue;
            };
            if self.applied().state.cluster_id.is_none() && id_proposed_in != Some(term) {
                id_proposed_in = Some(term);
                self.init_cluster_id().await;
            }
            if let Err(e) = self.reconcile_membership().await {
                warn!(error = %e, "membership change failed; retrying");
            }
        }
    }

    /// The first leader of a new cluster (or of a cluster made by an older egressd) chooses
    /// the cluster's id. `InitCluster` is format 2, which every node that can talk to this one
    /// reads (the peer protocol of format-1 versions is gone), so it needs no gate.
    async fn init_cluster_id(&self) {
        let id = hex(&random_secret()[..16]);
        match self
            .raft
            .client_write(Versioned(Command::InitCluster { id: id.clone() }))
            .await
        {
            Ok(r) if r.data.refused.is_none() && r.data.changed => {
                info!(cluster = %id, "chose the cluster's id")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "committing the cluster id failed; retrying"),
        }
    }

    async fn reconcile_membership(&self) -> anyhow::Result<()> {
        let state = self.applied().state.clone();
        if state.members.is_empty() {
            return Ok(());
        }
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(());
        }
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
        let target: BTreeSet<NodeId> = voter_target(state.members.keys())
            .iter()
            .map(|n| node_id(n))
            .collect();
        let current: BTreeSet<NodeId> = membership.voter_ids().collect();
        let name_of = |id: &NodeId| {
            membership
                .get_node(id)
                .map_or_else(|| id.to_string(), |m| m.name.clone())
        };
        if target != current {
            // One voter at a time: first one that joins (once it has caught up), then one that
            // leaves, so that the voters never shrink before a newcomer can vote.
            let last = metrics.last_log_index.unwrap_or(0);
            let caught_up = |id: &NodeId| {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .is_some_and(|m| m.index + 10 >= last)
            };
            let mut next = current.clone();
            let joining: Vec<&NodeId> = target.difference(&current).collect();
            let change = if let Some(id) = joining.iter().find(|id| caught_up(id)) {
                next.insert(**id);
                format!("{} joins the voters", name_of(id))
            } else if joining.is_empty()
                && let Some(id) = current.difference(&target).next()
            {
                next.remove(id);
                format!("{} leaves the voters", name_of(id))
            } else {
                return Ok(());
            };
            self.raft.change_membership(next.clone(), false).await?;
            info!(
                voters = ?next.iter().map(name_of).collect::<Vec<_>>(),
                "voters changed: {change}"
            );
            return Ok(());
        }
        let gone: BTreeSet<NodeId> = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !want.contains_key(id) && !current.contains(id))
            .collect();
        if !gone.is_empty() {
            let names: Vec<String> = gone.iter().map(name_of).collect();
            self.raft
                .change_membership(openraft::ChangeMembers::RemoveNodes(gone), false)
                .await?;
            for n in &names {
                self.client.forget(n);
            }
            info!(removed = ?names, "removed members no longer listed");
        }
        Ok(())
    }

    /// The leader's loop: confirm the quorum, decide, commit assignment changes. Runs on every
    /// node and does nothing while the node is not the leader. A new controller (and so a new
    /// settling period) starts with every term this node leads.
    /// Takes a snapshot as soon as the log since the last one carries many objects (a seed, a
    /// large apply), instead of after the next 1 000 entries: until then every new leader
    /// re-sends those entries to its followers before its first commit (openraft looks for a
    /// follower's log position from the middle of the leader's log), and at 100 000 policies
    /// that held a leader's failover back by most of a second.
    pub async fn run_compaction(self: Arc<Self>) {
        let mut applied = self.applied.clone();
        let mut asked: Option<Instant> = None;
        loop {
            let wanted = applied.borrow_and_update().compact;
            // One request per snapshot: building one at 100 000 policies takes a while, and
            // the flag stays up until it is built.
            if wanted && asked.is_none_or(|t| t.elapsed() > COMPACT_RETRY) {
                asked = Some(Instant::now());
                match self.raft.trigger().snapshot().await {
                    Ok(()) => debug!("snapshot requested: the log carries many objects"),
                    Err(e) => warn!(error = %e, "cannot request a snapshot"),
                }
            } else if !wanted {
                asked = None;
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    }

    /// Campaigns when openraft would keep delaying this node's elections for a longer log it
    /// has since caught up with (see [`campaign`]). Runs on every node.
    pub async fn run_campaigns(self: Arc<Self>) {
        let timer = campaign::Timer {
            election_timeout_max: Duration::from_millis(self.timing.election_timeout_max_ms),
            slack: CAMPAIGN_SLACK,
        };
        let min = Duration::from_millis(self.timing.election_timeout_min_ms);
        let mut jitter = (None, timer.jitter(min));
        let mut state = self.raft.server_metrics();
        loop {
            state.borrow_and_update();
            let now = tokio::time::Instant::now();
            let observed = self
                .raft
                .with_raft_state(move |st| campaign::Observed {
                    now,
                    may_campaign: matches!(
                        st.server_state,
                        ServerState::Follower | ServerState::Candidate
                    ),
                    vote_committed: st.vote_ref().is_committed(),
                    vote_changed: st.vote_last_modified(),
                    committed: st.committed,
                })
                .await;
            let Ok(observed) = observed else {
                // Raft has stopped (shutdown or a fatal storage error): nothing to elect.
                return;
            };
            if jitter.0 != observed.vote_changed {
                jitter = (observed.vote_changed, timer.jitter(min));
            }
            let longer = self.campaigns.longer();
            match campaign::next(&observed, longer.as_ref(), &timer, jitter.1) {
                campaign::Next::Campaign => {
                    let waited = observed
                        .vote_changed
                        .map_or(Duration::ZERO, |c| observed.now - c);
                    info!(
                        term = self.raft.metrics().borrow().current_term,
                        waited_ms = waited.as_millis() as u64,
                        refused_for = ?longer,
                        "campaigning: no leader heard from for {} ms, and openraft still delays \
                         this node's elections for a longer log it has caught up with",
                        waited.as_millis()
                    );
                    self.campaigns.started();
                    if let Err(e) = self.raft.trigger().elect().await {
                        warn!(error = %e, "cannot start a campaign");
                        return;
                    }
                    tokio::time::sleep(timer.election_timeout_max).await;
                }
                campaign::Next::CheckAt(at) => tokio::time::sleep_until(at).await,
                // A leader looked every election timeout before: a few wake-ups a second
                // (each a round trip to Raft's core) for nothing.
                campaign::Next::AfterStateChange => {
                    tokio::select! {
                        r = state.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep(NO_CAMPAIGN_CHECK) => {}
                    }
                }
            }
        }
    }

    pub async fn run_controller(self: Arc<Self>) {
        let timing = self.timing.lease_timing();
        // Not `metrics()`: on a leader that changes with every append and heartbeat answer.
        let mut metrics = self.raft.server_metrics();
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
                    // A vote or a membership change: only leadership and term matter here.
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
                // Not the leader: nothing to do until the metrics say this node leads.
                next = now + FOLLOWER_CONTROLLER_CHECK;
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
            // Reports that change nothing do not wake the controller (`take_news`), and
            // `deadline` is when a round could decide differently without one: the next
            // silence to time out, the next hold to end.
            next = deadline.map_or(now + LEADER_CONTROLLER_CHECK, |d| {
                d.min(now + LEADER_CONTROLLER_CHECK)
            });
        }
    }

    /// Dates the controller's grants from the latest instant a quorum is known to have
    /// accepted this leadership of `term`, once the applied state holds everything committed
    /// before it (an entry of this term is applied: a new leader's first entry is its own).
    fn confirm(&self, term: u64, applied_term: u64, ctl: &mut Controller) {
        if applied_term != term {
            return;
        }
        let now = crate::clock::now();
        let at = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let voters = m.membership_config.membership().get_joint_config();
            self.acks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .confirmed(term, &self.id, now, voters)
        };
        if let Some(at) = at {
            ctl.confirmed(at);
        }
        // Heartbeats wait behind a large append to the same follower (a 100 000-policy seed):
        // then a direct round, whose answers the transport records like any other.
        let stale = Duration::from_millis(self.timing.heartbeat_every_ms());
        if at.is_none_or(|a| now.saturating_sub(a) > stale) {
            self.confirm_wake.notify_one();
        }
    }

    /// While this node leads: a quorum round (`ensure_linearizable`, appends of its own beside
    /// the replication streams) whenever `confirm` finds the heartbeats' answers stale; one at
    /// a time.
    pub async fn run_confirmations(self: Arc<Self>) {
        // Said at most every 10 s: many of them mean heartbeats wait behind large appends.
        let mut since = Instant::now();
        let mut rounds = 0u64;
        loop {
            self.confirm_wake.notified().await;
            if self.leading_term().is_none() {
                continue;
            }
            // Raft has stopped (shutdown) but its metrics still name this node leader.
            if let Err(RaftError::Fatal(_)) = self.raft.ensure_linearizable().await {
                return;
            }
            rounds += 1;
            if since.elapsed() >= Duration::from_secs(10) {
                info!(
                    rounds,
                    "confirmed this leadership with {rounds} direct quorum rounds in {:.0} s: \
                     the heartbeats' answers were older than 1.5 heartbeat intervals",
                    since.elapsed().as_secs_f64()
                );
                since = Instant::now();
                rounds = 0;
            }
        }
    }

    /// Commits `ClusterFormat(format)` in the background, one write at a time.
    fn record_format(self: &Arc<Self>, format: u16) {
        if self.recording_format.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(
            async move {
                match me.propose(Command::ClusterFormat(format)).await {
                    Ok(r) if r.refused.is_none() => {
                        info!(
                            format,
                            "recorded: every member reads command format {format}"
                        )
                    }
                    Ok(r) => debug!(format, why = ?r.refused, "cluster format not recorded"),
                    Err(e) => debug!(format, error = %e, "cluster format not recorded"),
                }
                me.recording_format.store(false, Ordering::Release);
            }
            .instrument(tracing::Span::current()),
        );
    }

    /// The term this node leads, if it is the leader.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.server_metrics();
        let m = m.borrow();
        (m.current_leader == Some(self.id)).then(|| m.vote.leader_id().get_term())
    }

    async fn controller_round(self: Arc<Self>, timing: lease::Timing, term: u64) {
        let started = crate::clock::now();
        if let Ok(mut c) = self.controller.lock()
            && c.as_ref().is_none_or(|(t, _)| *t != term)
        {
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
        let members = member_names(&applied);
        let now = crate::clock::now();
        let (changes, decision, silent, format) = {
            let Ok(mut c) = self.controller.lock() else {
                return;
            };
            let Some((t, c)) = c.as_mut() else { return };
            if *t != term {
                return;
            }
            self.confirm(term, applied.term, c);
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
            if let Ok(mut d) = self.last_decision.lock() {
                *d = Some(decision.clone());
            }
            let format = format_to_record(&applied.state, &members, &self.name, |m| {
                c.command_format(m)
            });
            (changes, decision, silent, format)
        };
        if let Some(f) = format {
            self.record_format(f);
        }
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
    #[serde(default)]
    cluster_id: Option<String>,
}

async fn hello_handler(State(node): State<Arc<ClusterNode>>) -> Response {
    let initialized = node.raft.is_initialized().await.unwrap_or(false);
    Msg(Hello {
        initialized,
        cluster_id: node.applied().state.cluster_id.clone(),
    })
    .into_response()
}

/// Whom the peer endpoint lets in: the members of the committed list and of Raft's membership
/// (a member being added or removed is in one of them); while the cluster has no member list
/// (a new node, a new cluster), the peers of this node's file.
fn authorized_names(
    applied: watch::Receiver<Applied>,
    file_peers: Vec<String>,
) -> impl Fn() -> Vec<String> + Send + Sync + 'static {
    move || {
        let a = applied.borrow();
        let mut names: BTreeSet<String> = a.state.members.keys().cloned().collect();
        names.extend(
            a.membership
                .membership()
                .nodes()
                .map(|(_, m)| m.name.clone()),
        );
        if a.state.members.is_empty() {
            names.extend(file_peers.iter().cloned());
        }
        names.into_iter().collect()
    }
}

/// The voters a member list asks for: the first [`MAX_VOTERS`] names.
fn voter_target<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    let mut names: Vec<&String> = names.into_iter().collect();
    names.sort();
    names.into_iter().take(MAX_VOTERS).cloned().collect()
}

fn list(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// How `file_peers` (a node's `cluster.peers`) differs from the committed member list.
pub fn member_drift(state: &ClusterState, file_peers: &[Peer]) -> Vec<String> {
    if state.members.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for p in file_peers {
        let addr = p.address.to_string();
        match state.members.get(&p.name) {
            None => out.push(format!(
                "{} ({addr}) is in this node's cluster.peers but is not a member (`egressd \
                 member add {} {addr}` adds it)",
                p.name, p.name
            )),
            Some(a) if *a != addr => out.push(format!(
                "{}: cluster.peers says {addr}, the member list {a}",
                p.name
            )),
            Some(_) => {}
        }
    }
    for (name, addr) in &state.members {
        if !file_peers.iter().any(|p| p.name == *name) {
            out.push(format!(
                "{name} ({addr}) is a member but not in this node's cluster.peers (`egressd \
                 member remove {name}` removes it)"
            ));
        }
    }
    out
}

/// Splits an object change into entries of at most [`OBJECTS_PER_ENTRY`] objects and
/// [`transport::MAX_ENTRY_BYTES`] bytes (fewer objects per entry when they are large); refuses
/// an object that alone is larger.
fn plan_parts(cmd: Command) -> Result<Vec<Command>, String> {
    // Only a policy too large for one entry travels in fragments (command format 4), so that
    // every change an older version could commit is committed as it would have been.
    let why = match plan_whole_objects(&cmd) {
        Ok(parts) => return Ok(parts),
        Err(why) => why,
    };
    let mut cut = cmd;
    let fragments = cut.cut_large_policies(CIDRS_PER_ENTRY);
    if fragments.is_empty() {
        return Err(why);
    }
    let mut parts = plan_whole_objects(&cut)?;
    parts.extend(fragments);
    Ok(parts)
}

fn plan_whole_objects(cmd: &Command) -> Result<Vec<Command>, String> {
    let fits = |c: &Command| {
        crate::cluster::codec::to_wire(&Versioned(c.clone()))
            .map(|b| b.len() + 64 <= transport::MAX_ENTRY_BYTES)
            .unwrap_or(false)
    };
    let mut per_part = OBJECTS_PER_ENTRY;
    loop {
        let parts = cmd.clone().split(per_part);
        match parts.iter().find(|p| !fits(p)) {
            None => return Ok(parts),
            Some(big) if per_part == 1 || big.object_count() <= 1 => {
                let size = crate::cluster::codec::to_wire(&Versioned(big.clone()))
                    .map(|b| b.len())
                    .unwrap_or(0);
                return Err(format!(
                    "one object of this change takes {size} bytes encoded; at most {} are \
                     replicated as one entry: split it (e.g. a policy with fewer CIDRs)",
                    transport::MAX_ENTRY_BYTES
                ));
            }
            Some(_) => per_part = (per_part / 2).max(1),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    peer: Option<Extension<crate::tls::PeerIdentity>>,
    Msg(report): Msg<Report>,
) -> Response {
    if let Err(why) = transport::caller_is(peer.as_ref(), &report.node) {
        return api_error(StatusCode::FORBIDDEN, why, None);
    }
    match node.handle_report(report) {
        Ok(grant) => Msg(grant).into_response(),
        Err(e) => api_error(
            StatusCode::MISDIRECTED_REQUEST,
            e.to_string(),
            node.leader().map(|(_, m)| m.name),
        ),
    }
}

/// The names of Raft's members as of `applied`.
fn member_names(applied: &Applied) -> Vec<NodeName> {
    applied
        .membership
        .membership()
        .nodes()
        .map(|(_, m)| m.name.clone())
        .collect()
}

/// Every member as the controller `c` sees it at `now`.
fn member_views(
    c: &Controller,
    members: &[NodeName],
    state: &ClusterState,
    now: crate::lease::Time,
) -> Vec<MemberView> {
    c.node_states(members, state, now)
        .into_iter()
        .map(|n| MemberView {
            silent_ms: c.silent_for(&n.name, now).as_millis() as u64,
            cordon_reasons: state.cordon_reasons(&n.name),
            name: n.name,
            alive: n.alive,
            ready: n.ready,
            labels: n.labels,
            cordoned: n.cordoned,
        })
        .collect()
}

async fn view_handler(State(node): State<Arc<ClusterNode>>) -> Response {
    if !node.is_leader_locally() {
        return api_error(
            StatusCode::MISDIRECTED_REQUEST,
            "not the leader".into(),
            node.leader().map(|(_, m)| m.name),
        );
    }
    Msg(node.local_view()).into_response()
}

async fn write_handler(State(node): State<Arc<ClusterNode>>, Msg(cmd): Msg<Command>) -> Response {
    match node.propose(cmd).await {
        Ok(resp) => Msg(resp).into_response(),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => api_error(
            StatusCode::MISDIRECTED_REQUEST,
            "not the leader".into(),
            f.leader_node.map(|m| m.name),
        ),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    }
}

/// The command format the cluster may record now: the oldest any member reported to this leader
/// (this node reads [`COMMAND_FORMAT`](crate::cluster::codec::COMMAND_FORMAT)), once every
/// member has reported, when it is newer than the recorded one and can itself be written
/// (`ClusterFormat` is a format-5 command).
fn format_to_record(
    state: &ClusterState,
    raft_members: &[NodeName],
    me: &str,
    reported: impl Fn(&str) -> Option<u16>,
) -> Option<u16> {
    let names = if state.members.is_empty() {
        raft_members.to_vec()
    } else {
        state.member_names()
    };
    let mut oldest = crate::cluster::codec::COMMAND_FORMAT;
    for m in names.iter().filter(|m| m.as_str() != me) {
        oldest = oldest.min(reported(m)?);
    }
    let own = Command::ClusterFormat(0).format();
    (oldest > state.cluster_format && oldest >= own).then_some(oldest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Policy;

    fn seed_with_destinations(n: u32) -> Command {
        let policy = Policy {
            name: "big".into(),
            egress_gateway_name: "gw".into(),
            source_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
            destination_cidrs: (0..n)
                .map(|i| {
                    let k = 2 * i;
                    format!("{}.{}.{}.0/24", 11 + k / 65_536, (k / 256) % 256, k % 256)
                        .parse()
                        .unwrap()
                })
                .collect(),
            excluded_cidrs: vec![],
        };
        Command::SeedObjects {
            gateways: vec![],
            policies: vec![policy],
        }
    }

    /// Fragments (command format 4) only for a policy too large for one entry: whatever an
    /// older version could commit goes as it did, so a mixed cluster takes it.
    #[test]
    fn only_a_policy_too_large_for_one_entry_is_cut_into_fragments() {
        let fits = plan_parts(seed_with_destinations(50_000)).unwrap();
        assert_eq!(fits.len(), 1);
        assert!(fits.iter().all(|c| c.format() == 1));
        let cut = plan_parts(seed_with_destinations(100_000)).unwrap();
        assert!(cut.len() > 1);
        assert!(cut.iter().any(|c| c.format() == 4));
        for part in &cut {
            let bytes = crate::cluster::codec::to_wire(&Versioned(part.clone())).unwrap();
            assert!(
                bytes.len() + 64 <= transport::MAX_ENTRY_BYTES,
                "{}",
                bytes.len()
            );
        }
        assert_eq!(Command::merge(cut), Some(seed_with_destinations(100_000)));
    }

    #[test]
    fn the_cluster_format_is_recorded_once_every_member_reported_it() {
        let mut state = ClusterState::default();
        for n in ["gw1", "gw2", "gw3"] {
            state.members.insert(n.into(), String::new());
        }
        let now = crate::cluster::codec::COMMAND_FORMAT;
        let reports = |gw2: Option<u16>, gw3: Option<u16>| {
            move |m: &str| match m {
                "gw2" => gw2,
                "gw3" => gw3,
                _ => None,
            }
        };
        // gw1 is the leader; it need not report to itself.
        assert_eq!(
            format_to_record(&state, &[], "gw1", reports(Some(now), Some(now))),
            Some(now)
        );
        assert_eq!(
            format_to_record(&state, &[], "gw1", reports(Some(now), None)),
            None,
            "a member that has not reported holds it up"
        );
        assert_eq!(
            format_to_record(&state, &[], "gw1", reports(Some(now), Some(4))),
            None,
            "a member of a version before ClusterFormat: nothing can be recorded"
        );
        state.cluster_format = now;
        assert_eq!(
            format_to_record(&state, &[], "gw1", reports(Some(now), Some(now))),
            None,
            "recorded already"
        );
        // Before the members are in the state, Raft's membership names them.
        let fresh = ClusterState::default();
        let raft = ["gw1".to_string(), "gw2".to_string()];
        assert_eq!(
            format_to_record(&fresh, &raft, "gw1", reports(Some(now), None)),
            Some(now)
        );
    }
}
