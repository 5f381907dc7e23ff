//! Elections on time after openraft's "shorter log" back-off has outlived its cause.
//!
//! When a vote request of this node is refused by a node with a longer log, openraft 0.9 adds
//! `2 × election_timeout_max` (300 ms with the default profile) to this node's election
//! timeout, and clears that only when this node campaigns again (openraft#2087, fixed after
//! 0.9.25). A node that once lost such a vote (typically after its links were cut and came
//! back) therefore campaigns 300 ms late in every later election, including ones where its log
//! is as long as anyone's; and since a delayed node never campaigns first, it never campaigns
//! at all, so the delay never ends. With two such nodes out of three, a dead leader is replaced
//! 300 ms later than the leader failover budget allows.
//!
//! The fix follows upstream's: the delay applies only while this node's log is still behind
//! the longest log it was refused for. This module remembers that log id from the vote
//! answers (the transport sees each), and [`next`] decides, from openraft's own election timer
//! (the time the vote last changed, refreshed by every heartbeat), when a node that is no
//! longer behind is overdue: then the node campaigns through `Raft::trigger().elect()`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::LogId;
use tokio::time::Instant;

use super::NodeId;

/// The longest log id this node's current campaign was refused for, and how many campaigns
/// [`next`] started.
#[derive(Debug, Default)]
pub struct CampaignWatch {
    refused: Mutex<Refused>,
    overdue: AtomicU64,
}

#[derive(Debug, Default)]
struct Refused {
    /// The term of this node's latest campaign.
    term: u64,
    /// The longest log a vote of that campaign was refused for, if longer than this node's.
    longer: Option<LogId<NodeId>>,
}

impl CampaignWatch {
    /// This node asks for votes in `term`: a new campaign forgets what the last one learnt,
    /// as openraft does.
    pub fn asking(&self, term: u64) {
        let mut r = self.lock();
        if term > r.term {
            *r = Refused { term, longer: None };
        }
    }

    /// A vote of `term` was refused by a node whose last log id is `theirs`; this node's was
    /// `ours` when it asked.
    pub fn refused(&self, term: u64, theirs: Option<LogId<NodeId>>, ours: Option<LogId<NodeId>>) {
        if theirs <= ours {
            return;
        }
        let mut r = self.lock();
        if term == r.term && theirs > r.longer {
            r.longer = theirs;
        }
    }

    /// The longest log this node's latest campaign was refused for.
    pub fn longer(&self) -> Option<LogId<NodeId>> {
        self.lock().longer
    }

    pub fn started(&self) {
        self.overdue.fetch_add(1, Ordering::Relaxed);
    }

    /// Campaigns started because openraft's back-off had outlived its cause.
    pub fn overdue_campaigns(&self) -> u64 {
        self.overdue.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Refused> {
        // The guarded data is two plain values, consistent after any panic.
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What this node's Raft state says, read in one call.
#[derive(Debug, Clone)]
pub struct Observed {
    pub now: Instant,
    /// A follower or a candidate: a node that may campaign.
    pub may_campaign: bool,
    /// The vote is committed (a leader was known): openraft then waits its leader lease too.
    pub vote_committed: bool,
    /// When the vote last changed: openraft's election timer starts there.
    pub vote_changed: Option<Instant>,
    /// The last log id known committed: once past the longer log, this node has caught up.
    pub committed: Option<LogId<NodeId>>,
}

/// openraft's timer settings (`Config`), as they bound its election timer.
#[derive(Debug, Clone, Copy)]
pub struct Timer {
    pub election_timeout_max: Duration,
    /// After the latest time openraft itself would campaign: so that a node openraft does
    /// not delay always campaigns by itself, and this module only acts on a delayed one.
    pub slack: Duration,
}

impl Timer {
    /// A random wait past the slack, drawn afresh for each election timer: two delayed nodes
    /// that heard the same last heartbeat must not campaign at the same instant (a split
    /// vote, again and again), which is what openraft's random election timeout is for.
    pub fn jitter(&self, election_timeout_min: Duration) -> Duration {
        use rand::Rng;
        let spread = self
            .election_timeout_max
            .saturating_sub(election_timeout_min);
        rand::thread_rng().gen_range(Duration::ZERO..=spread)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Campaign now.
    Campaign,
    /// Look again then.
    CheckAt(Instant),
    /// This node may not campaign (a leader, a learner): look again when its Raft state
    /// changes.
    AfterStateChange,
}

/// Whether a node is overdue for a campaign that openraft holds back only because of a log it
/// has since caught up with.
/// `jitter` is [`Timer::jitter`], the same for as long as `o.vote_changed` stays.
pub fn next(o: &Observed, longer: Option<&LogId<NodeId>>, t: &Timer, jitter: Duration) -> Next {
    let later = o.now + t.election_timeout_max;
    if !o.may_campaign {
        return Next::AfterStateChange;
    }
    let Some(changed) = o.vote_changed else {
        return Next::CheckAt(later);
    };
    // openraft's election timeout is random in [min, max), plus its leader lease (= max) when
    // a leader was known.
    let lease = if o.vote_committed {
        t.election_timeout_max
    } else {
        Duration::ZERO
    };
    let due = changed + lease + t.election_timeout_max + t.slack + jitter;
    if o.now < due {
        return Next::CheckAt(due);
    }
    // Still behind the log it was refused for: openraft's back-off lets the longer log win.
    if longer.is_some_and(|l| o.committed.as_ref() < Some(l)) {
        return Next::CheckAt(later);
    }
    Next::Campaign
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    const MAX: Duration = Duration::from_millis(150);
    const SLACK: Duration = Duration::from_millis(10);
    const T: Timer = Timer {
        election_timeout_max: MAX,
        slack: SLACK,
    };

    fn log(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn observed(
        after: Duration,
        committed_vote: bool,
        committed: Option<LogId<NodeId>>,
    ) -> Observed {
        let changed = Instant::now();
        Observed {
            now: changed + after,
            may_campaign: true,
            vote_committed: committed_vote,
            vote_changed: Some(changed),
            committed,
        }
    }

    fn changed_of(o: &Observed) -> Instant {
        o.vote_changed.unwrap_or(o.now)
    }

    #[test]
    fn waits_as_long_as_openraft_would_at_most_then_campaigns() {
        let ms = Duration::from_millis;
        // A leader was known: lease 150 + timeout < 150 + slack.
        for (after, campaign) in [
            (0, false),
            (200, false),
            (309, false),
            (310, true),
            (900, true),
        ] {
            let o = observed(ms(after), true, Some(log(3, 9)));
            assert_eq!(
                next(&o, None, &T, Duration::ZERO) == Next::Campaign,
                campaign,
                "{after} ms"
            );
        }
        // A candidate (vote not committed): no lease.
        for (after, campaign) in [(159, false), (160, true)] {
            let o = observed(ms(after), false, Some(log(3, 9)));
            assert_eq!(
                next(&o, None, &T, Duration::ZERO) == Next::Campaign,
                campaign,
                "{after} ms"
            );
        }
        let o = observed(ms(100), true, None);
        let changed = o.vote_changed.unwrap_or(o.now);
        assert_eq!(
            next(&o, None, &T, Duration::ZERO),
            Next::CheckAt(changed + ms(310))
        );
        assert_eq!(next(&o, None, &T, ms(30)), Next::CheckAt(changed + ms(340)));
        let o = observed(ms(330), true, None);
        assert_eq!(
            next(&o, None, &T, ms(30)),
            Next::CheckAt(changed_of(&o) + ms(340))
        );
        assert_eq!(next(&o, None, &T, ms(20)), Next::Campaign);
        for _ in 0..1000 {
            assert!(T.jitter(ms(100)) <= ms(50));
        }
    }

    #[test]
    fn a_node_still_behind_the_longer_log_keeps_openrafts_back_off() {
        let late = Duration::from_millis(400);
        let longer = log(4, 20);
        for (committed, campaign) in [
            (None, false),
            (Some(log(4, 19)), false),
            (Some(log(3, 25)), false),
            (Some(log(4, 20)), true),
            (Some(log(5, 21)), true),
        ] {
            let o = observed(late, true, committed);
            assert_eq!(
                next(&o, Some(&longer), &T, Duration::ZERO) == Next::Campaign,
                campaign,
                "{committed:?}"
            );
            assert_eq!(next(&o, None, &T, Duration::ZERO), Next::Campaign);
        }
    }

    #[test]
    fn leaders_learners_and_nodes_without_a_vote_time_never_campaign() {
        let mut o = observed(Duration::from_secs(5), true, None);
        o.may_campaign = false;
        assert_eq!(next(&o, None, &T, Duration::ZERO), Next::AfterStateChange);
        let mut o = observed(Duration::from_secs(5), true, None);
        o.vote_changed = None;
        assert!(matches!(
            next(&o, None, &T, Duration::ZERO),
            Next::CheckAt(_)
        ));
    }

    #[test]
    fn remembers_the_longest_refusal_of_the_latest_campaign_only() {
        let w = CampaignWatch::default();
        w.asking(5);
        // Refused by a node no longer than this one: nothing learnt.
        w.refused(5, Some(log(4, 10)), Some(log(4, 10)));
        assert_eq!(w.longer(), None);
        w.refused(5, Some(log(4, 12)), Some(log(4, 10)));
        w.refused(5, Some(log(4, 11)), Some(log(4, 10)));
        assert_eq!(w.longer(), Some(log(4, 12)));
        // A late answer to an older campaign changes nothing.
        w.asking(6);
        assert_eq!(w.longer(), None);
        w.refused(5, Some(log(4, 30)), Some(log(4, 10)));
        assert_eq!(w.longer(), None);
        // The same campaign's other requests do not forget it.
        w.refused(6, Some(log(4, 13)), Some(log(4, 10)));
        w.asking(6);
        assert_eq!(w.longer(), Some(log(4, 13)));
    }
}
