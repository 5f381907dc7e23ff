//! systemd integration (`Type=notify`): readiness, a one-line status, reload and stop markers,
//! and a watchdog that is fed only while the agent loop makes progress.
//!
//! Messages (sd_notify(3)), all no-ops when `NOTIFY_SOCKET` is not set:
//! - `STATUS=` whenever the one-line summary of the node's role changes (not every round), e.g.
//!   `active for 2 of 3 gateways (a, b), leader gw1, term 7`, followed by what of the node's
//!   config file does not run: `; config rejected: 2 errors (egressd status)` (the last load
//!   was rejected) and `; config drift: 3 objects differ from the file (egressd status)`;
//! - `READY=1` once, after the first round that converged the data plane with a cluster leader
//!   known (the node has joined the cluster);
//! - `RELOADING=1` (with `MONOTONIC_USEC=`) and `READY=1` around a SIGHUP reload;
//! - `STOPPING=1` when SIGTERM/SIGINT starts the planned handover;
//! - `WATCHDOG=1` every quarter of `WATCHDOG_USEC`, but only while the agent loop's heartbeat
//!   (recorded after every finished round) is younger than half of it. A loop stuck in a data
//!   plane call, in the cluster, or a runtime whose workers are all blocked stops the pings, and
//!   systemd restarts the daemon after `WatchdogSec=`;
//! - `EXTEND_TIMEOUT_USEC=` while the node waits for the cluster (not yet ready) and its loop is
//!   healthy, so that `systemctl start` waits for a quorum as long as the daemon is alive and
//!   fails after `TimeoutStartSec=` when it is not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, error, info, warn};

use crate::status::Status;

/// Without a watchdog, the loop counts as stuck (for start-up extensions) after this.
const STALE_WITHOUT_WATCHDOG: Duration = Duration::from_secs(10);
/// While not ready: how often the start timeout is extended, and by how much.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY: Duration = Duration::from_secs(15);

/// When the agent loop last finished a round, in milliseconds since `epoch`.
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat (or since creation).
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

/// The daemon's side of the systemd notification protocol. Call sites: `round_done` whenever the
/// status changes, `reloading`/`reloaded` around a reload, `stopping` on SIGTERM/SIGINT. The
/// agent's tasks beat their own heartbeats; the watchdog is fed while all of them are fresh.
pub struct Notifier {
    enabled: bool,
    ready: Arc<std::sync::atomic::AtomicBool>,
    status: String,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`; when notifications are on,
    /// spawns the watchdog task (call inside the tokio runtime).
    pub fn from_env(heartbeats: Vec<Arc<Heartbeat>>) -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let notifier = Notifier {
            enabled,
            ready: Arc::default(),
            status: String::new(),
        };
        if enabled {
            let watchdog = sd_notify::watchdog_enabled();
            info!(watchdog = ?watchdog, "systemd notifications on");
            tokio::spawn(supervise(heartbeats, notifier.ready.clone(), watchdog));
            notifier.send(&[NotifyState::Status("starting: joining the cluster")]);
        }
        notifier
    }

    /// After a status change: updates `STATUS=` when the summary changed, and sends `READY=1`
    /// the first time the node has converged with a leader known.
    pub fn round_done(&mut self, status: &Status) {
        if !self.enabled {
            return;
        }
        let line = status_line(status);
        let became_ready = !self.ready.load(Ordering::Relaxed) && joined(status);
        if line == self.status && !became_ready {
            return;
        }
        let mut msg = vec![NotifyState::Status(&line)];
        if became_ready {
            msg.push(NotifyState::Ready);
        }
        self.send(&msg);
        if became_ready {
            self.ready.store(true, Ordering::Relaxed);
            info!(status = %line, "ready: joined the cluster and converged the data plane");
        }
        self.status = line;
    }

    /// Before re-reading the config on SIGHUP. Before the first `READY=1` nothing is sent (the
    /// start job is still running; a reload must not complete it).
    pub fn reloading(&self) {
        if !self.ready.load(Ordering::Relaxed) {
            return;
        }
        let mut msg = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ];
        // systemd 253+ wants the time of the reload request beside RELOADING=1.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            msg.push(now);
        }
        self.send(&msg);
    }

    /// After the reload, successful or rejected (a rejected file keeps the running config).
    pub fn reloaded(&mut self) {
        if !self.ready.load(Ordering::Relaxed) {
            return;
        }
        // The next round_done re-sends the summary.
        self.status.clear();
        self.send(&[NotifyState::Ready]);
    }

    /// On SIGTERM/SIGINT, before the planned handover.
    pub fn stopping(&mut self) {
        self.status = "stopping: handing gateways over".into();
        self.send(&[NotifyState::Stopping, NotifyState::Status(&self.status)]);
    }

    fn send(&self, msg: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(msg) {
            warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// What the daemon's loop passes on to systemd: the status line and whether the node has joined.
pub fn summary(s: &Status) -> (String, bool) {
    (status_line(s), joined(s))
}

/// The node has joined the cluster (a leader is known) and the last round converged the data
/// plane. Readiness for gateways (forwarding, interfaces) is the cluster's business and shows in
/// the status line; it does not hold up the service start.
fn joined(s: &Status) -> bool {
    s.cluster.leader.is_some() && s.dataplane.last_error.is_none()
}

/// The one-line summary for `STATUS=`: role, leader and term, or why the node is not ready.
/// Only slowly changing facts, so that it changes when the role does.
pub fn status_line(s: &Status) -> String {
    let leader = match &s.cluster.leader {
        Some(l) => format!("leader {l}, term {}", s.cluster.term),
        None => format!("no leader, term {}", s.cluster.term),
    };
    let total = s.cluster.gateways;
    let held = &s.dataplane.held_gateways;
    let role = if held.is_empty() {
        format!(
            "standby for {total} gateway{}",
            if total == 1 { "" } else { "s" }
        )
    } else {
        format!("active for {} of {total} ({})", held.len(), held.join(", "))
    };
    let mut line = if s.not_ready.is_empty() {
        format!("{role}, {leader}")
    } else {
        format!("not ready: {}; {role}, {leader}", s.not_ready.join("; "))
    };
    // What this node's file does not run: an operator looks here after a restart or reload.
    let rejected = s.config.last_reload_errors.len();
    if rejected > 0 {
        line.push_str(&format!(
            "; config rejected: {rejected} error{} (egressd status)",
            if rejected == 1 { "" } else { "s" }
        ));
    }
    let drift = s.config.drift.len();
    if drift > 0 {
        line.push_str(&format!(
            "; config drift: {drift} object{} from the file (egressd status)",
            if drift == 1 { " differs" } else { "s differ" }
        ));
    }
    line
}

/// The watchdog and start-up extension task: pings only while the heartbeat is fresh.
async fn supervise(
    heartbeats: Vec<Arc<Heartbeat>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    watchdog: Option<Duration>,
) {
    let stale_after = watchdog.map_or(STALE_WITHOUT_WATCHDOG, |w| w / 2);
    let tick = watchdog.map_or(EXTEND_EVERY, |w| {
        (w / 4).clamp(Duration::from_millis(10), EXTEND_EVERY)
    });
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    let mut last_extend: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let age = heartbeats.iter().map(|h| h.age()).max().unwrap_or_default();
        let fresh = age < stale_after;
        if fresh != healthy {
            healthy = fresh;
            if fresh {
                info!("agent loop progressing again: watchdog pings resumed");
            } else {
                error!(
                    stalled_ms = age.as_millis() as u64,
                    "agent loop has not finished a round for {} ms: withholding watchdog pings \
                     (systemd restarts egressd after WatchdogSec)",
                    age.as_millis()
                );
            }
        }
        if !fresh {
            continue;
        }
        let mut msg = Vec::new();
        if watchdog.is_some() {
            msg.push(NotifyState::Watchdog);
        }
        if !ready.load(Ordering::Relaxed) && last_extend.is_none_or(|t| t.elapsed() >= EXTEND_EVERY)
        {
            last_extend = Some(Instant::now());
            msg.push(NotifyState::ExtendTimeoutUsec(EXTEND_BY.as_micros() as u32));
        }
        if msg.is_empty() {
            continue;
        }
        if let Err(e) = sd_notify::notify(&msg) {
            debug!(error = %e, "cannot notify systemd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ClusterStatus, DataplaneStatus};

    fn status(leader: Option<&str>, held: &[&str], not_ready: &[&str]) -> Status {
        Status {
            node: "gw1".into(),
            ready: not_ready.is_empty(),
            not_ready: not_ready.iter().map(|s| s.to_string()).collect(),
            cluster: ClusterStatus {
                leader: leader.map(Into::into),
                term: 7,
                gateways: 3,
                ..Default::default()
            },
            gateways: Vec::new(),
            dataplane: DataplaneStatus {
                held_gateways: held.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn status_line_says_role_leader_and_term() {
        assert_eq!(
            status_line(&status(Some("gw1"), &["a", "b"], &[])),
            "active for 2 of 3 (a, b), leader gw1, term 7"
        );
        assert_eq!(
            status_line(&status(Some("gw2"), &[], &[])),
            "standby for 3 gateways, leader gw2, term 7"
        );
        assert_eq!(
            status_line(&status(None, &[], &["no cluster leader known"])),
            "not ready: no cluster leader known; standby for 3 gateways, no leader, term 7"
        );
    }

    #[test]
    fn status_line_says_what_of_the_file_does_not_run() {
        let mut s = status(Some("gw1"), &["a"], &[]);
        s.config.drift = vec!["gateway a: the file differs from the committed one".into()];
        assert_eq!(
            status_line(&s),
            "active for 1 of 3 (a), leader gw1, term 7; config drift: 1 object differs from \
             the file (egressd status)"
        );
        s.config
            .drift
            .push("policy p: in the file, not committed".into());
        s.config.last_reload_errors = vec!["x".into(), "y".into()];
        assert_eq!(
            status_line(&s),
            "active for 1 of 3 (a), leader gw1, term 7; config rejected: 2 errors (egressd \
             status); config drift: 2 objects differ from the file (egressd status)"
        );
    }

    #[test]
    fn joined_needs_a_leader_and_a_converged_data_plane() {
        assert!(joined(&status(Some("gw1"), &[], &["forwarding off"])));
        assert!(!joined(&status(None, &[], &[])));
        let mut s = status(Some("gw1"), &[], &[]);
        s.dataplane.last_error = Some("nft failed".into());
        assert!(!joined(&s));
    }

    #[test]
    fn heartbeat_ages_and_beats() {
        let h = Heartbeat::new();
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.age() >= Duration::from_millis(20));
        h.beat();
        assert!(h.age() < Duration::from_millis(20));
    }
}
