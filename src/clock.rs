//! The clocks leases are measured on.
//!
//! - [`now`]: CLOCK_BOOTTIME, the lease clock. Unlike CLOCK_MONOTONIC it keeps counting while
//!   the host is suspended, so a host that resumes finds its leases over instead of resuming
//!   them.
//! - [`wall`]: CLOCK_REALTIME, for the kernel fence: its elements end at an absolute wall-clock
//!   time (`meta time`), so a daemon paused between computing an element and writing it cannot
//!   extend a lease by the length of the pause.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lease::Time;

fn read(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; both clocks exist on every Linux kernel egressd
    // supports, so the call cannot fail (and a zero reading would only shorten leases).
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The lease clock (CLOCK_BOOTTIME).
pub fn now() -> Time {
    read(libc::CLOCK_BOOTTIME)
}

/// Wall-clock time since the Unix epoch (CLOCK_REALTIME).
pub fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// The wall-clock moment at which the lease clock reaches `until`. The wall clock is read first:
/// a pause between the two readings then makes the result earlier, never later.
pub fn wall_at(until: Time) -> Duration {
    let wall = wall();
    let now = now();
    wall + until.saturating_sub(now)
}

/// A tokio deadline for a moment on the lease clock (for timers; tokio counts on
/// CLOCK_MONOTONIC, which only lags the lease clock, so the timer never fires late).
pub fn deadline(at: Time) -> tokio::time::Instant {
    tokio::time::Instant::now() + at.saturating_sub(now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_advance_and_convert() {
        let a = now();
        let w = wall_at(a + Duration::from_secs(5));
        let b = now();
        assert!(b >= a);
        let expect = wall() + Duration::from_secs(5);
        assert!(
            w <= expect && w + Duration::from_millis(100) > expect,
            "{w:?} {expect:?}"
        );
    }
}
