//! The daemon: wires the fence, the cluster member, the agent's tasks and the admin endpoint
//! together, and handles signals (reload, stop). No decisions are made here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::agent::{self, AgentConfig, Facts, Leased, Ready};
use crate::cluster::node::ClusterNode;
use crate::cluster::state::{ObjectRef, file_digest};
use crate::cluster::{ClusterState, Command};
use crate::config::{Config, ConfigErrors};
use crate::dataplane::fence::{Fence, NftFence};
use crate::dataplane::host::{HostEvents, NetlinkHost};
use crate::dataplane::nft::NftFirewall;
use crate::dataplane::watch::{Heal, Watcher};
use crate::dataplane::{Firewall, Host, RawAnnouncer};
use crate::events::EventKind;
use crate::model::{Gateway, Policy};
use crate::notify::{Heartbeat, Notifier};
use crate::reconciler::Reconciler;
use crate::secrets::{AdminToken, TokenCell};
use crate::status::{ClusterStatus, StatusBoard};
use crate::tls::admin::{AdminTls, AdminTlsFiles};

/// The members of the config file, as the cluster holds them.
fn peer_list(config: &Config) -> Vec<(String, String)> {
    config
        .voters()
        .into_iter()
        .map(|p| (p.name, p.address.to_string()))
        .collect()
}

/// The gateways and policies of the config file, as the cluster would hold them.
/// Sorts the file's gateways by name and takes its policies out of `config`, sorted by name:
/// the committed state and the drift compare them in that order (sorted once per load: with
/// 100 000 policies a sorted copy at every drift check cost more than the check). Each policy
/// is behind an `Arc` so that, once committed unchanged, it shares the committed copy (see
/// [`share_committed`]): the file's policies are kept as long as the daemon runs.
fn take_file_objects(config: &mut Config) -> Vec<Arc<Policy>> {
    config.gateways.sort_by(|a, b| a.name.cmp(&b.name));
    let mut policies = std::mem::take(&mut config.policies);
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    policies.into_iter().map(Arc::new).collect()
}

/// Points every file policy that equals its committed definition at the committed copy, so
/// that one copy of it is kept, not two (at 100 000 policies the file's copy was a sixth of an
/// idle node's heap).
fn share_committed(file: &mut [Arc<Policy>], committed: &imbl::OrdMap<String, Arc<Policy>>) {
    for f in file {
        if let Some(c) = committed.get(&f.name)
            && !Arc::ptr_eq(c, f)
            && **c == **f
        {
            *f = c.clone();
        }
    }
}

/// How long a stopping daemon waits for the leader to move its gateways before it releases
/// them anyway (e.g. when there is no quorum to ask).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the main loop refreshes the status when nothing wakes it.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGTERM or SIGINT, then releases everything it holds.
/// `object_errors`: the file's gateways and policies break a rule (its other sections are
/// valid, see `config::load_for_run`); `config` then has none, and the node runs the cluster's
/// committed objects and reports the errors, as a rejected reload does.
pub async fn run(
    config: Config,
    config_path: PathBuf,
    object_errors: Option<ConfigErrors>,
) -> anyhow::Result<()> {
    let span = info_span!("egressd", node = %config.node.name);
    run_inner(config, config_path, object_errors)
        .instrument(span)
        .await
}

/// Before anything else: the fence covers every address this node may still hold (the store's
/// last committed gateways, the file's, and every address tagged as egressd's on the host), and
/// answers for none. A start-up that fails after this leaves the fence in place.
async fn fence_first(
    config: &Config,
    host: &mut NetlinkHost,
) -> anyhow::Result<(u64, NftFence, ClusterState)> {
    let observed = host.observe().await.context("reading interfaces")?;
    let (epoch, state) = crate::cluster::store::startup(&config.cluster.data_dir)
        .context("reading the store before start-up")?;
    let committed = state.gateway_list();
    let managed = agent::managed(&committed, &config.gateways, &observed);
    let devices = agent::fence_devices(&committed, &config.gateways, &observed);
    let mut fence = NftFence::new(&config.dataplane.nft_table);
    fence
        .rebuild(&managed, &devices)
        .await
        .context("installing the fence tables")?;
    info!(
        epoch,
        fenced = managed.len(),
        devices = ?devices,
        "fence in place: answering for no managed address until a lease is granted"
    );
    Ok((epoch, fence, state))
}

async fn run_inner(
    config: Config,
    config_path: PathBuf,
    object_errors: Option<ConfigErrors>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // First: a reload or stop request during start-up must not kill the process (the default
    // action); it is handled once the loop runs.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let lease_beat = Arc::new(Heartbeat::new());
    let dataplane_beat = Arc::new(Heartbeat::new());
    let mut notifier = Notifier::from_env(vec![lease_beat.clone(), dataplane_beat.clone()]);

    info!(
        gateways = config.gateways.len(),
        policies = config.policies.len(),
        config = %config_path.display(),
        timing = ?config.cluster.timing(),
        "starting"
    );

    let mut watcher_host = NetlinkHost::new().context("opening rtnetlink")?;
    let (epoch, fence, _) = fence_first(&config, &mut watcher_host).await?;
    let events = HostEvents::subscribe().context("subscribing to link events")?;
    let mut firewall = NftFirewall::new(&config.dataplane.nft_table).with_ended(
        config.dataplane.tcp_on_policy_change == crate::dataplane::conntrack::TcpPolicy::Reset,
    );
    // Replace whatever a crashed run left, and prove that nft works before the node claims to
    // be ready.
    let firewall_ok = match firewall
        .apply(&Default::default(), &Default::default())
        .await
    {
        Ok(()) => true,
        Err(e) => {
            error!(error = %e, "cannot install the nftables table; not ready");
            false
        }
    };

    let node = ClusterNode::start(&config).await?;
    tokio::spawn(node.clone().run_controller());
    tokio::spawn(node.clone().run_confirmations());
    tokio::spawn(node.clone().run_membership());
    tokio::spawn(node.clone().run_compaction());
    tokio::spawn(node.clone().run_campaigns());

    let (board, status_rx) = StatusBoard::new(&config.node.name);
    let board = Arc::new(board);
    let prometheus = Arc::new(crate::metrics::Metrics::new());
    prometheus.init_repairs(&config.dataplane.nft_table);
    // Outside changes of egressd's nftables tables: noticed by the watcher, repaired by the
    // task that owns the table (see `dataplane::watch`).
    let heal = Heal::new(agent::heal_report(
        board.clone(),
        node.events.clone(),
        prometheus.clone(),
    ));
    let nft_watcher = match Watcher::start(&config.dataplane.nft_table, None, heal.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            error!(
                error = %e,
                "cannot watch the nftables tables: changes made to them from outside will not \
                 be repaired"
            );
            None
        }
    };
    let admin_addr = config.admin.listen;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {admin_addr}"))?;
    // Checked by `egressd run` before start-up (`secrets::check_files`); read here for use.
    let token = TokenCell::new(match &config.admin.token_file {
        Some(path) => {
            Some(AdminToken::load(path).map_err(|e| anyhow::anyhow!("admin.token_file: {e}"))?)
        }
        None => None,
    });
    let admin_tls = match &config.admin.tls {
        Some(t) => Some(
            AdminTls::load(AdminTlsFiles {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            })
            .context("loading the admin endpoint's [admin.tls] files")?,
        ),
        None => None,
    };
    // The admin endpoint on a thread and runtime of its own: a flood of requests there never
    // takes the threads that carry Raft's heartbeats and the lease renewals.
    let admin_rt = crate::tls::server::edge_runtime("admin", 10)
        .context("starting the admin endpoint's thread")?;
    info!(
        url = %config.admin.url(),
        mutations = if token.get().is_some() { "with the token of admin.token_file" } else { "disabled (no admin.token_file)" },
        "admin endpoint"
    );
    admin_rt.spawn(crate::admin::serve(
        listener,
        crate::admin::AdminState {
            status: status_rx.clone(),
            node: node.clone(),
            token: token.clone(),
            metrics: prometheus.clone(),
            main: tokio::runtime::Handle::current(),
        },
        admin_tls.clone(),
    ));

    #[cfg(feature = "kubernetes")]
    if config.kubernetes.enabled {
        tokio::spawn(crate::kubernetes::sync::run(
            node.clone(),
            config.kubernetes.clone(),
            board.clone(),
        ));
    }

    // The channels between the tasks.
    let (config_tx, config_rx) = watch::channel(AgentConfig::from_config(&config));
    let (host_tx, host_rx) = watch::channel(Arc::new(
        watcher_host.observe().await.context("reading interfaces")?,
    ));
    let (leased_tx, leased_rx) = watch::channel(Leased::new());
    let (contact_tx, contact_rx) = watch::channel(false);
    let (facts_tx, facts_rx) = watch::channel(Facts::default());
    let (ready_tx, ready_rx) = watch::channel(Ready::new());
    let (leaving_tx, leaving_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let leader_rx = leader_watch(&node);

    let watcher = tokio::spawn(agent::host::run(watcher_host, events, host_tx));
    let mut lease = agent::lease::LeaseTask::new(
        node.clone(),
        epoch,
        fence,
        RawAnnouncer,
        agent::lease::Channels {
            config: config_rx.clone(),
            facts: facts_rx,
            ready: ready_rx,
            host: host_rx.clone(),
            applied: node.subscribe(),
            leader: leader_rx,
            stop: stop_rx.clone(),
            leased: leased_tx,
            contact: contact_tx,
        },
        board.clone(),
        prometheus.clone(),
        lease_beat,
        Duration::from_millis(config.cluster.timing().report_interval_ms),
    )
    .with_heal(heal.clone());
    let lease_task: JoinHandle<_> = tokio::spawn(
        async move {
            lease.run().await;
            lease
        }
        .instrument(info_span!("lease")),
    );
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let dataplane_task = spawn_dataplane(
        firewall,
        firewall_ok,
        agent::dataplane::Channels {
            config: config_rx,
            leased: leased_rx.clone(),
            contact: contact_rx,
            host: host_rx,
            applied: node.subscribe(),
            leaving: leaving_rx,
            stop: stop_rx,
            facts: facts_tx,
            ready: ready_tx,
        },
        board.clone(),
        node.events.clone(),
        dataplane_beat,
        prometheus.clone(),
        heal,
        crate::dataplane::conntrack::Settings {
            netns: None,
            tcp: config.dataplane.tcp_on_policy_change,
            table: config.dataplane.nft_table.clone(),
        },
        release_rx,
    )?;

    let mut config = config;
    let file_policies = take_file_objects(&mut config);
    let mut main = Main {
        config,
        file_policies,
        config_path,
        node: node.clone(),
        board: board.clone(),
        config_tx,
        file_valid: object_errors.is_none(),
        started: false,
        starting: None,
        reload_pending: false,
        token,
        admin_tls,
        reloading: None,
        drift_of: None,
        drift: BTreeMap::new(),
        last_leader: None,
        prometheus,
    };
    if let Some(errors) = object_errors {
        main.config_rejected(
            Load::Start,
            errors.iter().map(ToString::to_string).collect(),
        );
    }
    let mut status = status_rx;
    let mut applied = node.subscribe();
    // Leadership and membership only: the full metrics change with every heartbeat answer.
    let mut metrics = node.raft.server_metrics();
    let mut leave_by: Option<Instant> = None;
    // Fast while something is under way that only polling notices (the start-up commit, a
    // reload, leaving); otherwise the loop is woken by what it watches, and the slow tick only
    // refreshes the status' slowly moving figures (campaigns, the leader's view): at rest, a
    // wake-up every report interval was a sizeable part of an idle node's CPU.
    let fast = Duration::from_millis(main.config.cluster.timing().report_interval_ms);
    let mut next_tick = tokio::time::Instant::now() + fast;
    info!(
        since_start_ms = started.elapsed().as_secs_f64() * 1e3,
        "running"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_tick) => {
                next_tick = tokio::time::Instant::now() + IDLE_TICK;
            }
            r = applied.changed() => if r.is_err() { anyhow::bail!("the Raft state machine stopped") },
            r = metrics.changed() => {
                if r.is_err() { anyhow::bail!("Raft stopped") }
                let leader = metrics.borrow_and_update().current_leader;
                if leader != main.last_leader {
                    main.last_leader = leader;
                    main.prometheus.raft_leader_changes.inc();
                }
            }
            r = status.changed() => {
                if r.is_err() { anyhow::bail!("the status board is gone") }
                notifier.round_done(&status.borrow_and_update());
                continue;
            }
            _ = sighup.recv() => {
                notifier.reloading();
                main.reload().await;
                notifier.reloaded();
            }
            _ = sigterm.recv() => {
                info!("SIGTERM: handing gateways over before exiting");
                notifier.stopping();
                leaving_tx.send_replace(true);
                leave_by.get_or_insert(Instant::now() + LEAVE_TIMEOUT);
            }
            _ = sigint.recv() => {
                info!("SIGINT: handing gateways over before exiting");
                notifier.stopping();
                leaving_tx.send_replace(true);
                leave_by.get_or_insert(Instant::now() + LEAVE_TIMEOUT);
            }
        }
        if watcher.is_finished() {
            anyhow::bail!("the host watcher stopped");
        }
        main.round().await;
        if !main.started || main.reloading.is_some() || leave_by.is_some() {
            next_tick = next_tick.min(tokio::time::Instant::now() + fast);
        }
        if let Some(by) = leave_by
            && (leased_rx.borrow().is_empty() || Instant::now() >= by)
        {
            break;
        }
    }
    // Stop answering first (the fence), then the addresses and SNAT. The watcher goes first:
    // the tables are about to be removed on purpose.
    if let Some(w) = nft_watcher {
        w.stop();
    }
    stop_tx.send_replace(true);
    let held = board.get().dataplane.held_addresses;
    info!(held = ?held, "shutting down: releasing addresses and removing the nftables tables");
    let mut first_err: Option<anyhow::Error> = None;
    match lease_task.await {
        Ok(mut lease) => {
            if let Err(e) = lease.release().await {
                first_err.get_or_insert(anyhow::Error::new(e).context("removing the fence"));
            }
        }
        Err(e) => {
            first_err.get_or_insert(anyhow::anyhow!("the lease task failed: {e}"));
        }
    }
    let _ = release_tx.send(());
    match dataplane_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            first_err.get_or_insert(anyhow::Error::new(e).context("releasing the data plane"));
        }
        Err(_) => {
            first_err.get_or_insert(anyhow::anyhow!("the data-plane thread stopped"));
        }
    }
    let _ = node.raft.shutdown().await;
    match first_err {
        None => {
            info!("released everything; bye");
            Ok(())
        }
        Some(e) => {
            warn!(error = %e, "shutdown left something behind");
            Err(e)
        }
    }
}

/// The data-plane task on a thread of its own, with a runtime of its own, at a lower scheduling
/// priority: compiling and loading 100 000 policies must never take CPU from Raft's heartbeats
/// and votes or from lease renewals. After `stop`, it waits for `release` (the fence first) and
/// then gives up its addresses and SNAT table.
#[allow(clippy::too_many_arguments)]
fn spawn_dataplane(
    firewall: NftFirewall,
    firewall_ok: bool,
    ch: agent::dataplane::Channels,
    board: Arc<StatusBoard>,
    events: crate::events::EventLog,
    heartbeat: Arc<Heartbeat>,
    metrics: Arc<crate::metrics::Metrics>,
    heal: Arc<Heal>,
    flows: crate::dataplane::conntrack::Settings,
    release: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<crate::dataplane::Result<()>>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let _enter = span.enter();
            // Compiling 100 000 policies must never delay a heartbeat, a vote or a renewal.
            crate::lower_thread_priority("dataplane", 10);
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot start the data-plane runtime");
                    return;
                }
            };
            let result = rt.block_on(
                async move {
                    let host = NetlinkHost::new()?;
                    let rec = Reconciler::new(host, firewall).with_metrics(metrics.clone());
                    // Started here: the sweeper's thread inherits this thread's lower priority.
                    let sweeper = agent::flows_sweeper(flows, metrics, events.clone());
                    let mut task = agent::dataplane::DataplaneTask::new(
                        rec,
                        firewall_ok,
                        ch,
                        board,
                        events,
                        heartbeat,
                    )
                    .with_heal(heal);
                    if let Some(s) = sweeper {
                        task = task.with_flows(s);
                    }
                    task.run().await;
                    let _ = release.await;
                    task.into_reconciler().release_all().await
                }
                .instrument(info_span!("dataplane")),
            );
            let _ = done_tx.send(result);
        })
        .context("starting the data-plane thread")?;
    Ok(done_rx)
}

/// The current leader's id, changing only when the leader does.
fn leader_watch(node: &Arc<ClusterNode>) -> watch::Receiver<Option<u64>> {
    let mut metrics = node.raft.server_metrics();
    let (tx, rx) = watch::channel(metrics.borrow().current_leader);
    tokio::spawn(async move {
        while metrics.changed().await.is_ok() {
            let leader = metrics.borrow_and_update().current_leader;
            tx.send_if_modified(|l| {
                let changed = *l != leader;
                *l = leader;
                changed
            });
        }
    });
    rx
}

/// Which load of the config file a rejection concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// The daemon's start: the file's gateways and policies broke a rule.
    Start,
    /// A SIGHUP reload.
    Reload,
}

/// What the start-up commit of the config file did (see [`start_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Started {
    /// The file's gateways and policies break a rule: none of them was committed.
    Invalid,
    /// This node's file seeded the cluster (and its digest is recorded).
    Seeded,
    /// The cluster was seeded already and this node had no digest yet (a new member, or the
    /// first start of a version that keeps them): the file's digest is recorded, nothing of it
    /// applied.
    Recorded,
    /// The file is the one this node last applied: nothing committed.
    Unchanged,
    /// The file changed since this node last applied it: its change was committed, as a reload
    /// commits it, or the cluster refused it (`Some(why)`).
    Applied(Option<String>),
}

/// The start-up commit of the config file, once a leader is known: seeds a cluster that was
/// never seeded; then applies the file if it differs from the one this node last applied (by
/// the digest the state keeps per node), records its digest if the node has none, and does
/// nothing if it is the same file. `objects`: the file's gateways and policies, `None` when
/// they break a rule.
async fn start_file(
    node: Arc<ClusterNode>,
    objects: Option<(Vec<Gateway>, Vec<Arc<Policy>>)>,
    members: Vec<(String, String)>,
) -> anyhow::Result<Started> {
    let mut seeded_here = false;
    let mut seed_refused = None;
    if let Some((gateways, policies)) = &objects
        && !node.applied().state.seeded
    {
        let seed = Command::SeedObjects {
            gateways: gateways.clone(),
            policies: policies.iter().map(|p| (**p).clone()).collect(),
        };
        let r = node.write(seed).await?;
        seeded_here = r.changed;
        seed_refused = r.refused;
    }
    // Also a barrier: a write answers once this node has applied it, so from here on the
    // local state holds everything committed before it (a restarted node's store may lag).
    node.write(Command::SeedMembers(members)).await?;
    // Not seeded, and nothing recorded: the next start (or a reload) tries again.
    if let Some(why) = seed_refused {
        return Ok(Started::Applied(Some(why)));
    }
    let Some((gateways, policies)) = objects else {
        return Ok(Started::Invalid);
    };
    let state = node.applied().state;
    let digest = file_digest(&gateways, &policies);
    match state.file_digests.get(&node.name) {
        Some(last) if *last == digest => Ok(Started::Unchanged),
        Some(_) => match state.file_change(&node.name, &gateways, &policies) {
            Some(change) => Ok(Started::Applied(node.write(change).await?.refused)),
            None => Ok(Started::Unchanged),
        },
        None => {
            // No object changes, the digest only.
            let record = Command::FileObjects {
                node: node.name.clone(),
                gateways: Vec::new(),
                policies: Vec::new(),
                delete_gateways: Vec::new(),
                delete_policies: Vec::new(),
                digest,
            };
            if let Some(why) = node.write(record).await?.refused {
                anyhow::bail!("recording the file's digest was refused: {why}");
            }
            Ok(if seeded_here {
                Started::Seeded
            } else {
                Started::Recorded
            })
        }
    }
}

/// The committed objects a drift was computed from (persistent maps: comparing is free).
struct DriftInputs {
    gateways: imbl::OrdMap<String, Gateway>,
    policies: imbl::OrdMap<String, Arc<Policy>>,
    api: imbl::OrdSet<ObjectRef>,
    kube: imbl::OrdSet<ObjectRef>,
    seeded: bool,
}

impl DriftInputs {
    fn of(s: &ClusterState) -> DriftInputs {
        DriftInputs {
            gateways: s.gateways.clone(),
            policies: s.policies.clone(),
            api: s.api_objects.clone(),
            kube: s.kube_objects.clone(),
            seeded: s.seeded,
        }
    }

    fn same(&self, s: &ClusterState) -> bool {
        self.gateways.ptr_eq(&s.gateways)
            && self.policies.ptr_eq(&s.policies)
            && self.api.ptr_eq(&s.api_objects)
            && self.kube.ptr_eq(&s.kube_objects)
            && self.seeded == s.seeded
    }
}

/// At most this many drift lines in the log at a time; `egressd status` lists them all.
const DRIFT_LOG_LINES: usize = 10;

/// The daemon's own round: the cluster part of the status, the start-up commit of the config
/// file, reloads.
struct Main {
    /// The config file as loaded, without its policies (in `file_policies`).
    config: Config,
    /// The file's policies, sorted by name.
    file_policies: Vec<Arc<Policy>>,
    config_path: PathBuf,
    node: Arc<ClusterNode>,
    board: Arc<StatusBoard>,
    config_tx: watch::Sender<Arc<AgentConfig>>,
    /// The file's gateways and policies passed the rules (at start, or at the last reload that
    /// was not rejected). When they did not at start, `config` has none: nothing of the file is
    /// committed and no drift is computed until a reload brings valid ones.
    file_valid: bool,
    /// The start-up commit of the file is done.
    started: bool,
    starting: Option<JoinHandle<anyhow::Result<Started>>>,
    /// A reload came before the start-up commit was done: its commit follows the start-up one.
    reload_pending: bool,
    /// The admin token in force (replaced by a reload).
    token: TokenCell,
    /// The admin endpoint's TLS (reloaded with the file).
    admin_tls: Option<AdminTls>,
    /// The commit of the last reload: `Some(problem)` when it did not happen.
    reloading: Option<JoinHandle<Option<String>>>,
    /// What the drift was computed from (`None`: compute it all again).
    drift_of: Option<DriftInputs>,
    /// One line per object whose file and committed definitions differ.
    drift: BTreeMap<ObjectRef, String>,
    last_leader: Option<u64>,
    prometheus: Arc<crate::metrics::Metrics>,
}

impl Main {
    async fn round(&mut self) {
        if !self.started {
            self.start().await;
            if self.started && std::mem::take(&mut self.reload_pending) {
                self.commit_file();
            }
        }
        self.reload_committed().await;
        self.publish();
    }

    /// Brings the drift up to date when the committed objects or the file changed: not at
    /// every applied index (grants, assignments and staged parts move it many times a second),
    /// and, while the file stays, only for the policies that changed since (the persistent
    /// maps' diff skips what they share): with 100 000 policies a full comparison took a tenth
    /// of a second of CPU at every apply.
    fn refresh_drift(&mut self) {
        let applied = self.node.applied();
        let state = &applied.state;
        if self.drift_of.as_ref().is_some_and(|d| d.same(state)) {
            return;
        }
        let before = self.drift_of.replace(DriftInputs::of(state));
        if !(state.seeded && self.file_valid) {
            self.drift.clear();
            return;
        }
        let (gateways, policies) = (&self.config.gateways, &mut self.file_policies);
        match before.filter(|b| b.seeded) {
            Some(b) => state.update_drift(
                &b.policies,
                &b.api,
                &b.kube,
                gateways,
                policies,
                &mut self.drift,
            ),
            None => {
                self.drift = crate::heavy(|| {
                    share_committed(policies, &state.policies);
                    state.drift_map(gateways, policies)
                })
            }
        }
    }

    /// After a start or a reload: the drift that remains goes to the log, loudly.
    fn log_drift(&mut self, after: Load) {
        self.drift_of = None;
        self.refresh_drift();
        // The member list changes only by `egressd member add/remove`; a file that differs
        // from it is reported, never applied.
        for d in self.node.member_drift(&self.config.voters()) {
            warn!(
                drift = %d,
                "member drift: this node's cluster.peers differs from the cluster's member list \
                 (`egressd member add/remove` changes the members; the file only reports)"
            );
        }
        if self.drift.is_empty() {
            return;
        }
        let after = match after {
            Load::Start => "start",
            Load::Reload => "reload",
        };
        let n = self.drift.len();
        warn!(
            objects = n,
            config = %self.config_path.display(),
            "config drift after {after}: this node's file differs from the committed gateways \
             and policies, which the node runs, in {n} object{} (`egressd status` lists them; \
             `systemctl reload` commits an edited file)",
            if n == 1 { "" } else { "s" }
        );
        for d in self.drift.values().take(DRIFT_LOG_LINES) {
            warn!(drift = %d, "config drift");
        }
        if self.drift.len() > DRIFT_LOG_LINES {
            warn!(
                more = self.drift.len() - DRIFT_LOG_LINES,
                "config drift: more objects differ (see `egressd status`)"
            );
        }
    }

    fn publish(&mut self) {
        self.refresh_drift();
        let applied = self.node.applied();
        let state = applied.state.clone();
        let metrics = self.node.raft.metrics().borrow().clone();
        let members = metrics.membership_config.membership();
        let leader_name = metrics
            .current_leader
            .and_then(|l| members.get_node(&l).map(|m| m.name.clone()));
        let cluster = ClusterStatus {
            leader: leader_name.clone(),
            term: metrics.current_term,
            members: members.nodes().map(|(_, m)| m.name.clone()).collect(),
            voters: members
                .voter_ids()
                .filter_map(|id| members.get_node(&id).map(|m| m.name.clone()))
                .collect(),
            applied_index: applied.index,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map_or(0, |s| s.index),
            overdue_campaigns: self.node.campaigns.overdue_campaigns(),
            command_format: state.cluster_format,
            gateways: state.gateways.len(),
            policies: state.policies.len(),
            lease_remaining_ms: 0,
            config_drift: !self.drift.is_empty(),
            id: state.cluster_id.clone(),
            peer_tls: self.node.tls_summary().map(|s| s.to_string()),
        };
        let member_drift = crate::cluster::node::member_drift(&state, &self.config.voters());
        let path = self.config_path.display().to_string();
        let drift: Vec<String> = self.drift.values().cloned().collect();
        self.board.update(|s| {
            let lease_remaining = s.cluster.lease_remaining_ms;
            s.cluster = cluster;
            s.cluster.lease_remaining_ms = lease_remaining;
            s.config.path = path;
            s.config.drift = drift;
            s.config.member_drift = member_drift;
            let reasons = if leader_name.is_none() {
                vec!["no cluster leader known".to_string()]
            } else {
                Vec::new()
            };
            s.set_not_ready("cluster", reasons);
        });
    }

    /// The start-up commit of the config file (see [`start_file`]). It waits for a leader and
    /// a quorum, so it runs in a task of its own; each round looks at the result, and a failed
    /// attempt is tried again.
    async fn start(&mut self) {
        match self.starting.take() {
            Some(task) if task.is_finished() => match task.await {
                Ok(Ok(outcome)) => {
                    self.started = true;
                    self.started_with(outcome);
                }
                Ok(Err(e)) => debug!(error = %e, "start-up commit deferred"),
                Err(e) => debug!(error = %e, "start-up commit task failed"),
            },
            Some(task) => self.starting = Some(task),
            None => {
                if self.node.leader().is_none() {
                    return;
                }
                let objects = self
                    .file_valid
                    .then(|| (self.config.gateways.clone(), self.file_policies.clone()));
                let members = peer_list(&self.config);
                let node = self.node.clone();
                self.starting = Some(tokio::spawn(
                    start_file(node, objects, members).instrument(tracing::Span::current()),
                ));
            }
        }
    }

    fn started_with(&mut self, outcome: Started) {
        let path = self.config_path.display().to_string();
        match outcome {
            Started::Invalid => warn!(
                config = %path,
                "running the cluster's committed gateways and policies: those of this node's file \
                 break a rule (see the errors above; fix the file and reload)"
            ),
            Started::Seeded => info!(
                config = %path,
                "seeded the cluster with this node's gateways, policies and members"
            ),
            Started::Recorded => info!(
                config = %path,
                "the cluster was seeded already (by another node's file, or before this node \
                 kept a file digest): recorded this file's digest and applied nothing (a reload \
                 applies this file, and so does a restart after an edit)"
            ),
            Started::Unchanged => info!(
                config = %path,
                "the file's gateways and policies are those this node last applied: nothing \
                 to commit (a restart never undoes a runtime change)"
            ),
            Started::Applied(None) => info!(
                config = %path,
                "the file's gateways and policies changed since this node last applied them: \
                 committed the change, as a reload does"
            ),
            Started::Applied(Some(why)) => {
                self.config_rejected(Load::Start, vec![format!("refused by the cluster: {why}")])
            }
        }
        self.log_drift(Load::Start);
    }

    /// The file was rejected (an invalid file, or objects the cluster refused): the committed
    /// config stays; say so in the log, the status and the events.
    fn config_rejected(&mut self, load: Load, errors: Vec<String>) {
        let path = self.config_path.display();
        let message = match load {
            Load::Start => {
                for e in &errors {
                    error!(
                        error = %e,
                        "configuration file's gateways and policies rejected at start; running \
                         the cluster's committed ones"
                    );
                }
                format!(
                    "the gateways and policies of {path} were rejected at start ({} errors); the \
                     node runs the cluster's committed ones: {}",
                    errors.len(),
                    errors.first().cloned().unwrap_or_default()
                )
            }
            Load::Reload => {
                for e in &errors {
                    error!(error = %e, "configuration reload rejected; keeping the running config");
                }
                format!(
                    "reload of {path} rejected ({} errors); the running config stays: {}",
                    errors.len(),
                    errors.first().cloned().unwrap_or_default()
                )
            }
        };
        self.node
            .events
            .local(EventKind::ConfigRejected, None, message);
        self.board.update(|s| s.config.last_reload_errors = errors);
    }

    /// Looks at the commit of the last reload, once it has finished.
    async fn reload_committed(&mut self) {
        let Some(task) = self.reloading.take_if(|t| t.is_finished()) else {
            return;
        };
        match task.await {
            Ok(None) => {}
            Ok(Some(problem)) => self.config_rejected(Load::Reload, vec![problem]),
            Err(e) => {
                self.config_rejected(Load::Reload, vec![format!("the reload task failed: {e}")])
            }
        }
        self.log_drift(Load::Reload);
    }

    async fn reload(&mut self) {
        let now = crate::events::unix_ms();
        self.board
            .update(|s| s.config.last_reload_unix_ms = Some(now));
        // A file of 100 000 policies takes a while to parse: not on the async threads.
        let path = self.config_path.clone();
        let loaded = match tokio::task::spawn_blocking(move || crate::config::load(&path)).await {
            Ok(r) => r,
            Err(e) => {
                self.config_rejected(Load::Reload, vec![format!("the config loader failed: {e}")]);
                self.log_drift(Load::Reload);
                return;
            }
        };
        let path = self.config_path.display().to_string();
        let loaded = loaded.and_then(|new| crate::secrets::check_files(&new, &path).map(|()| new));
        match loaded {
            Ok(new) => {
                // Identities first: a file that cannot be used changes nothing.
                if let Err(why) = self.reload_identities(&new) {
                    self.config_rejected(Load::Reload, vec![why]);
                    self.log_drift(Load::Reload);
                    return;
                }
                self.board.update(|s| s.config.last_reload_errors.clear());
                info!(
                    gateways = new.gateways.len(),
                    policies = new.policies.len(),
                    "configuration reloaded; committing its gateways and policies"
                );
                // Identity, listeners and timing need a restart; labels, objects, the TLS files
                // and the admin token do not. The member list is the cluster's: `cluster.peers`
                // is compared with it (drift), not committed.
                self.config.cluster.peers = new.cluster.peers.clone();
                self.config.cluster.tls = new.cluster.tls.clone();
                self.config.admin.token_file = new.admin.token_file.clone();
                self.config.admin.tls = new.admin.tls.clone();
                self.config.gateways = new.gateways;
                self.config.policies = new.policies;
                self.file_policies = take_file_objects(&mut self.config);
                self.file_valid = true;
                self.config.node.labels = new.node.labels;
                self.config.dataplane = new.dataplane;
                self.config_tx
                    .send_replace(AgentConfig::from_config(&self.config));
                // The drift against the new file is computed afresh.
                self.drift_of = None;
                if self.started {
                    self.commit_file();
                } else {
                    // The start-up commit is under way (or waits for a leader): this reload's
                    // commit follows it, so that the newest file wins.
                    info!("the start-up commit of the file is not done yet; committing after it");
                    self.reload_pending = true;
                }
            }
            Err(errors) => {
                self.config_rejected(
                    Load::Reload,
                    errors.0.iter().map(|e| e.to_string()).collect(),
                );
                self.log_drift(Load::Reload);
            }
        }
    }

    /// The peer TLS files, the admin endpoint's TLS files and the admin token of a reloaded
    /// file (all checked already): in force from the next connection and request on.
    fn reload_identities(&mut self, new: &Config) -> Result<(), String> {
        match (&self.admin_tls, &new.admin.tls) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(
                    "[admin.tls] was added or removed: the admin endpoint changes between HTTP \
                     and HTTPS only on a restart"
                        .into(),
                );
            }
            _ => {}
        }
        if let Some(summary) = self
            .node
            .reload_tls(new.cluster.tls.as_ref())
            .map_err(|e| format!("cluster.tls: {e}"))?
        {
            info!(tls = %summary, "peer TLS files reloaded: new connections use them");
        }
        if let (Some(tls), Some(t)) = (&self.admin_tls, &new.admin.tls) {
            tls.reload_from(AdminTlsFiles {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            })
            .map_err(|e| format!("admin.tls: {e}"))?;
            info!("admin endpoint TLS files reloaded");
        }
        let token = match &new.admin.token_file {
            Some(path) => {
                Some(AdminToken::load(path).map_err(|e| format!("admin.token_file: {e}"))?)
            }
            None => None,
        };
        if token.is_some() != self.token.get().is_some() || token != self.token.get() {
            info!(
                mutations = if token.is_some() {
                    "need the new token"
                } else {
                    "disabled"
                },
                "admin token reloaded"
            );
        }
        self.token.set(token);
        Ok(())
    }

    /// Commits the difference between the (reloaded) file's gateways and policies and the
    /// committed file objects.
    fn commit_file(&mut self) {
        let objects = self.node.applied().state.file_change(
            &self.config.node.name,
            &self.config.gateways,
            &self.file_policies,
        );
        let count = self.file_policies.len();
        // Committing waits for a quorum (up to the write timeout): not in the main loop, which
        // must keep handling signals meanwhile.
        let node = self.node.clone();
        let task = async move {
            let Some(objects) = objects else {
                info!("the file's gateways and policies are committed already");
                return None;
            };
            match node.write(objects).await {
                Ok(r) => match r.refused {
                    Some(why) => Some(format!("refused by the cluster: {why}")),
                    None => {
                        info!(
                            changed = r.changed,
                            policies = count,
                            "committed the reloaded objects"
                        );
                        None
                    }
                },
                Err(e) => Some(format!("not committed: {e:#}")),
            }
        };
        self.reloading = Some(tokio::spawn(task.instrument(tracing::Span::current())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::tests::policy;

    #[test]
    fn a_file_policy_shares_the_committed_copy_only_when_they_are_equal() {
        let committed: imbl::OrdMap<String, Arc<Policy>> = ["a", "b"]
            .into_iter()
            .map(|n| (n.to_string(), Arc::new(policy(n, "g"))))
            .collect();
        // "a" as committed, "b" edited in the file, "c" not committed.
        let mut file = vec![
            Arc::new(policy("a", "g")),
            Arc::new(policy("b", "other")),
            Arc::new(policy("c", "g")),
        ];
        let before = file.clone();
        share_committed(&mut file, &committed);
        assert!(Arc::ptr_eq(&file[0], &committed["a"]));
        assert!(Arc::ptr_eq(&file[1], &before[1]));
        assert!(Arc::ptr_eq(&file[2], &before[2]));
        // The file's contents are unchanged: the drift still sees "b" differ.
        let contents: Vec<Policy> = file.iter().map(|p| (**p).clone()).collect();
        let was: Vec<Policy> = before.iter().map(|p| (**p).clone()).collect();
        assert_eq!(contents, was);
    }

    #[test]
    fn the_file_policies_are_taken_out_of_the_config_sorted_by_name() {
        let mut config = crate::config::parse_str("[node]\nname = \"gw1\"\n", "test.toml")
            .expect("a minimal config");
        config.policies = vec![policy("b", "g"), policy("a", "g")];
        let taken = take_file_objects(&mut config);
        assert!(config.policies.is_empty());
        let names: Vec<&str> = taken.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
