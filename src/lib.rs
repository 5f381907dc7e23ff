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
pub mod lease;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod reconciler;
pub mod secrets;
pub mod status;
pub mod tls;
