//! The host watcher: reads every interface and address at start, again after each burst of
//! rtnetlink link/address events, and once a second as a backstop, and publishes what it read.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, warn};

use crate::dataplane::host::HostEvents;
use crate::dataplane::{Host, HostState};

/// Runs until the event socket closes or every subscriber is gone.
pub async fn run<H: Host>(
    mut host: H,
    mut events: HostEvents,
    tx: watch::Sender<Arc<HostState>>,
) -> anyhow::Result<()> {
    loop {
        match host.observe().await {
            Ok(state) => {
                if **tx.borrow() != state {
                    tx.send_replace(Arc::new(state));
                }
            }
            Err(e) => error!(error = %e, "cannot read interfaces; keeping the last view"),
        }
        tokio::select! {
            ev = events.next() => {
                if ev.is_none() {
                    anyhow::bail!("the rtnetlink event socket closed");
                }
                // Coalesce the burst of events one change makes (link + addresses).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tx.closed() => {
                warn!("host watcher: nobody listens any more");
                return Ok(());
            }
        }
    }
}
