//! A real three-node Raft cluster in one process: durable stores in temp dirs, the mutual-TLS
//! transport on loopback. Checks election, replication, failover, snapshot transfer, and that a
//! node whose certificate comes from another CA can neither vote its way in nor receive
//! entries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressd::cluster::codec::Versioned;
use egressd::cluster::store::{self, StateMachineStore};
use egressd::cluster::transport::{
    ClusterIdFn, Guard, Network, PeerClient, TransportError, VOTE_PATH, guarded, raft_routes,
};
use egressd::cluster::{Command, Member, NodeId, Raft, node_id};
use egressd::tls::pki::{self, Pem};
use egressd::tls::server::{ServeOptions, serve};
use egressd::tls::{PeerTls, TlsFiles};
use openraft::error::{InitializeError, RaftError};
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{Config, ServerState, Vote};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A cluster CA and the node files it issued, in a temporary directory.
struct Ca {
    pem: Pem,
    dir: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        Ca {
            pem: pki::new_ca(30).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `name`'s peer TLS identity, loaded.
    fn node(&self, name: &str) -> PeerTls {
        use std::os::unix::fs::PermissionsExt;
        let issued = pki::issue(name, &self.pem.cert, &self.pem.key, 30).unwrap();
        let p = |f: &str| self.dir.path().join(f);
        let files = TlsFiles {
            ca_file: p("ca.pem"),
            cert_file: p(&format!("{name}.pem")),
            key_file: p(&format!("{name}-key.pem")),
        };
        std::fs::write(&files.ca_file, &self.pem.cert).unwrap();
        std::fs::write(&files.cert_file, &issued.cert).unwrap();
        std::fs::write(&files.key_file, &issued.key).unwrap();
        std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        PeerTls::load(files, name).unwrap()
    }
}

/// Everyone may talk to everyone in this test (membership is `ClusterNode`'s business); the
/// certificates' CA decides.
const MEMBERS: [&str; 5] = ["n1", "n2", "n3", "n5", "intruder"];

fn no_id() -> ClusterIdFn {
    Arc::new(|| None)
}

struct Node {
    name: String,
    id: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Shuts Raft down and closes the HTTP server (listener and connections), as if the process
    /// had exited.
    async fn stop(&mut self) {
        self.raft.shutdown().await.unwrap();
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(2), h).await;
            assert!(stopped.is_ok(), "{}'s server did not stop", self.name);
        }
    }
}

fn config() -> Arc<Config> {
    Arc::new(
        Config {
            cluster_name: "egressd-test".to_owned(),
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

async fn start(name: &str, listener: TcpListener, ca: &Ca) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = store::open(dir.path()).unwrap();
    let tls = ca.node(name);
    let network = Network::new(
        PeerClient::new(name, Some(tls.clone()), no_id()),
        Default::default(),
        Default::default(),
    );
    let id = node_id(name);
    let raft = Raft::new(id, config(), network, log, sm.clone())
        .await
        .unwrap();
    let app = guarded(raft_routes(raft.clone()), Guard::new(name, no_id()));
    let (tx, rx) = oneshot::channel::<()>();
    let options = ServeOptions::default().members_only(|| MEMBERS.map(String::from));
    let server = tokio::spawn(serve(listener, tls, app, options, async move {
        let _ = rx.await;
    }));
    Node {
        name: name.to_owned(),
        id,
        raft,
        sm,
        stop_server: Some(tx),
        server: Some(server),
        _dir: dir,
    }
}

async fn initialize(node: &Node, members: &BTreeMap<NodeId, Member>) {
    match node.raft.initialize(members.clone()).await {
        Ok(()) => {}
        // Another node's initialize reached this one first: the documented, harmless outcome.
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
        Err(e) => panic!("initialize {}: {e}", node.name),
    }
}

/// Waits until every node in `nodes` names the same leader, one of them; returns its id.
async fn agreed_leader(nodes: &[&Node], not: Option<NodeId>, within: Duration) -> NodeId {
    let deadline = Instant::now() + within;
    loop {
        let leaders: Vec<Option<NodeId>> = nodes
            .iter()
            .map(|n| n.raft.metrics().borrow().current_leader)
            .collect();
        if let Some(Some(l)) = leaders.first() {
            let l = *l;
            if leaders.iter().all(|x| *x == Some(l))
                && Some(l) != not
                && nodes.iter().any(|n| n.id == l)
            {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader within {within:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_cordoned(node: &Node, name: &str, within: Duration) {
    let mut rx = node.sm.subscribe();
    let res = tokio::time::timeout(within, rx.wait_for(|a| a.state.cordoned.contains(name))).await;
    assert!(
        matches!(res, Ok(Ok(_))),
        "{} did not apply Cordon({name}) within {within:?}; applied: {:?}",
        node.name,
        node.sm.current()
    );
}

fn by_id(nodes: &[Node], id: NodeId) -> &Node {
    nodes.iter().find(|n| n.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_replicate_fail_over_and_refuse_another_ca() {
    let ca = Ca::new();
    let other_ca = Ca::new();
    // --- Three nodes, initialized all alike.
    let names = ["n1", "n2", "n3"];
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for name in names {
        let (l, addr) = bind().await;
        members.insert(
            node_id(name),
            Member {
                name: name.to_owned(),
                addr,
            },
        );
        listeners.push(l);
    }
    let mut nodes = Vec::new();
    for (name, l) in names.into_iter().zip(listeners) {
        nodes.push(start(name, l, &ca).await);
    }
    let t0 = Instant::now();
    futures::future::join_all(nodes.iter().map(|n| initialize(n, &members))).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, None, Duration::from_secs(5)).await;
    println!(
        "leader {} elected after {:?}",
        by_id(&nodes, leader).name,
        t0.elapsed()
    );

    // --- A write on the leader is applied everywhere.
    let resp = by_id(&nodes, leader)
        .raft
        .client_write(Versioned(Command::Cordon("x".to_owned())))
        .await
        .unwrap();
    assert!(resp.data.changed);
    for n in &nodes {
        wait_cordoned(n, "x", Duration::from_secs(2)).await;
    }

    // Latency of a committed write: leader fsync, one append round trip, follower fsync.
    let mut lat = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        by_id(&nodes, leader)
            .raft
            .client_write(Versioned(Command::SetLabel {
                node: "n1".to_owned(),
                key: "k".to_owned(),
                value: Some(i.to_string()),
            }))
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "client_write on loopback: median {:?}, p90 {:?}, max {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() - 1]
    );

    // --- A fourth node with a certificate of another CA tries to vote its way in, and the
    // leader tries to replicate to it: both directions fail in the TLS handshake.
    let term_before = by_id(&nodes, leader).raft.metrics().borrow().current_term;
    let (l4, addr4) = bind().await;
    let intruder_member = Member {
        name: "intruder".to_owned(),
        addr: addr4.clone(),
    };
    let intruder = start("intruder", l4, &other_ca).await;
    let mut with_intruder = members.clone();
    with_intruder.insert(intruder.id, intruder_member.clone());
    // It believes it is one of four voters, so it campaigns (needs 2 of the other 3 votes).
    intruder.raft.initialize(with_intruder).await.unwrap();
    by_id(&nodes, leader)
        .raft
        .add_learner(intruder.id, intruder_member, false)
        .await
        .unwrap();
    for _ in 0..5 {
        intruder.raft.trigger().elect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let im = intruder.raft.metrics().borrow().clone();
    println!(
        "intruder: term {}, state {:?}, last log {:?}",
        im.current_term, im.state, im.last_log_index
    );
    assert_ne!(im.state, ServerState::Leader, "the intruder became leader");
    assert!(
        im.current_term > 1,
        "the intruder should have campaigned (term {})",
        im.current_term
    );
    // Only its own initial membership entry (index 0); nothing from the cluster.
    assert_eq!(im.last_log_index, Some(0), "the intruder got entries");
    assert!(intruder.sm.current().state.cordoned.is_empty());
    for n in &nodes {
        let m = n.raft.metrics().borrow().clone();
        assert_eq!(
            m.current_term, term_before,
            "{}'s term rose because of the intruder",
            n.name
        );
        assert_eq!(m.current_leader, Some(leader), "{}", n.name);
    }
    let repl = by_id(&nodes, leader)
        .raft
        .metrics()
        .borrow()
        .replication
        .clone()
        .unwrap();
    assert_eq!(
        repl.get(&intruder.id).cloned().flatten(),
        None,
        "the leader replicated to the intruder"
    );
    // What the intruder's vote requests get: no connection, saying why.
    let e = PeerClient::new("intruder", Some(other_ca.node("intruder")), no_id())
        .post::<_, Result<VoteResponse<NodeId>, RaftError<NodeId>>>(
            &members[&leader].name,
            &members[&leader].addr,
            VOTE_PATH,
            &VoteRequest::new(Vote::new(term_before + 100, intruder.id), None),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, TransportError::Connect { detail, .. } if detail.contains("UnknownIssuer")),
        "{e}"
    );
    assert!(e.is_unreachable());
    assert_eq!(
        by_id(&nodes, leader).raft.metrics().borrow().current_term,
        term_before
    );

    // --- The leader goes away; the other two elect a new one and accept writes.
    let old = leader;
    let t = Instant::now();
    nodes.iter_mut().find(|n| n.id == old).unwrap().stop().await;
    let rest: Vec<&Node> = nodes.iter().filter(|n| n.id != old).collect();
    let leader = agreed_leader(&rest, Some(old), Duration::from_secs(5)).await;
    println!(
        "new leader {} agreed {:?} after the old one stopped",
        by_id(&nodes, leader).name,
        t.elapsed()
    );
    by_id(&nodes, leader)
        .raft
        .client_write(Versioned(Command::Cordon("y".to_owned())))
        .await
        .unwrap();
    for n in &rest {
        wait_cordoned(n, "y", Duration::from_secs(2)).await;
    }
    assert_eq!(intruder.raft.metrics().borrow().last_log_index, Some(0));

    // --- Snapshot transfer: the leader snapshots and purges its log, so a new member can only
    // catch up by InstallSnapshot over /raft/snapshot.
    let lead = by_id(&nodes, leader);
    // The snapshot covers whatever is applied when it is built, which may be past what we read
    // here (the new leader's own entries can still be applying), so wait for "at least".
    let floor = lead.raft.metrics().borrow().last_applied.unwrap().index;
    lead.raft.trigger().snapshot().await.unwrap();
    let applied = lead
        .raft
        .wait(Some(Duration::from_secs(5)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= floor),
            "leader snapshot",
        )
        .await
        .unwrap()
        .snapshot
        .unwrap();
    lead.raft.trigger().purge_log(applied.index).await.unwrap();
    lead.raft
        .wait(Some(Duration::from_secs(5)))
        .purged(Some(applied), "leader purge")
        .await
        .unwrap();
    let (l5, addr5) = bind().await;
    let late = start("n5", l5, &ca).await;
    let t = Instant::now();
    lead.raft
        .add_learner(
            late.id,
            Member {
                name: "n5".to_owned(),
                addr: addr5,
            },
            true,
        )
        .await
        .unwrap();
    wait_cordoned(&late, "y", Duration::from_secs(5)).await;
    assert!(late.sm.current().state.cordoned.contains("x"));
    // It got the leader's snapshot (not entries: those were purged) and installed it;
    // its state has both writes (checked above through the state machine).
    late.raft
        .wait(Some(Duration::from_secs(5)))
        .snapshot(applied, "n5 installed the leader's snapshot")
        .await
        .unwrap();
    println!("n5 caught up by snapshot in {:?}", t.elapsed());
    let mut late = late;
    late.stop().await;

    // Tidy up.
    let mut intruder = intruder;
    intruder.stop().await;
    for n in nodes.iter_mut().filter(|n| n.id != old) {
        n.stop().await;
    }
}
