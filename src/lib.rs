//! egressd: a high-availability egress gateway. `model`, `election` and `policy` are pure;
//! `dataplane` touches the kernel; `reconciler` and `daemon` wire them; `admin` serves HTTP.

pub mod admin;
pub mod admin_client;
pub mod agent;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod election;
pub mod events;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod reconciler;
pub mod secrets;
pub mod status;
pub mod tls;

/// Sets the calling thread's nice value (only that thread's, and what it starts from then on:
/// threads, `nft`); `name` is for the warning when it cannot.
pub(crate) fn lower_thread_priority(name: &str, nice: i32) {
    // SAFETY: gettid and setpriority have no memory effects; with PRIO_PROCESS and a thread id,
    // Linux changes that thread's nice value only.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if r != 0 {
        tracing::warn!(
            thread = name,
            error = %std::io::Error::last_os_error(),
            "cannot lower the thread's priority"
        );
    }
}

/// Runs a computation that may take long (a change of 100 000 objects) on this runtime thread
/// while the runtime moves its other tasks (heartbeats, votes, renewals) to another thread.
/// Outside a multi-threaded runtime (unit tests, the simulation) it simply runs.
pub(crate) fn heavy<R>(f: impl FnOnce() -> R) -> R {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
