//! The bounded in-memory event list behind `/v1/events` and `egressd status --events`. Every
//! event is also one structured log line (target `egressd::event`), so JSON logs carry the same
//! record.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use crate::cluster::state::{EventDraft, EventKind};

/// How many events a node keeps; older ones are dropped first.
pub const CAPACITY: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event on this node (since it started).
    pub seq: u64,
    pub at_unix_ms: u64,
    /// The Raft log index of the committed change, for cluster-wide events; `None` for what
    /// only this node saw (its data plane, a rejected reload).
    pub index: Option<u64>,
    pub kind: EventKind,
    pub node: Option<String>,
    pub gateway: Option<String>,
    pub message: String,
}

#[derive(Default)]
struct Inner {
    next: u64,
    list: VecDeque<Event>,
}

/// Cheap to clone; clones share the list.
#[derive(Clone, Default)]
pub struct EventLog {
    inner: Arc<Mutex<Inner>>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl EventLog {
    pub fn push(&self, draft: EventDraft, index: Option<u64>) {
        tracing::info!(
            target: "egressd::event",
            kind = draft.kind.as_str(),
            node = draft.node.as_deref(),
            gateway = draft.gateway.as_deref(),
            index,
            "{}",
            draft.message
        );
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seq = inner.next;
        inner.next += 1;
        if inner.list.len() == CAPACITY {
            inner.list.pop_front();
        }
        inner.list.push_back(Event {
            seq,
            at_unix_ms: unix_ms(),
            index,
            kind: draft.kind,
            node: draft.node,
            gateway: draft.gateway,
            message: draft.message,
        });
    }

    /// A local event of this node.
    pub fn local(&self, kind: EventKind, gateway: Option<&str>, message: String) {
        self.push(
            EventDraft {
                kind,
                node: None,
                gateway: gateway.map(str::to_owned),
                message,
            },
            None,
        );
    }

    /// The events after `since` (all with `None`), oldest first, at most `limit`, the newest.
    pub fn list(&self, since: Option<u64>, limit: usize) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let newer: Vec<&Event> = inner
            .list
            .iter()
            .filter(|e| since.is_none_or(|s| e.seq > s))
            .collect();
        let skip = newer.len().saturating_sub(limit);
        newer.into_iter().skip(skip).cloned().collect()
    }
}

/// `2026-11-26T16:37:37.123Z` for a time in ms since the Unix epoch (UTC, proleptic Gregorian).
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: u64) -> EventDraft {
        EventDraft {
            kind: EventKind::Cordon,
            node: Some(format!("gw{n}")),
            gateway: None,
            message: format!("event {n}"),
        }
    }

    #[test]
    fn bounded_oldest_dropped_and_since_filters() {
        let log = EventLog::default();
        for n in 0..(CAPACITY as u64 + 10) {
            log.push(draft(n), Some(n));
        }
        let all = log.list(None, usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 10);
        assert_eq!(all.last().map(|e| e.seq), Some(CAPACITY as u64 + 9));
        let newest = log.list(None, 3);
        assert_eq!(
            newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [
                CAPACITY as u64 + 7,
                CAPACITY as u64 + 8,
                CAPACITY as u64 + 9
            ]
        );
        assert_eq!(log.list(Some(CAPACITY as u64 + 8), 100).len(), 1);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc(1_795_710_257_123), "2026-11-26T16:24:17.123Z");
    }
}
