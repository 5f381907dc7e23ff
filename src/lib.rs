pub mod config;
pub mod dataplane;
pub mod model;
pub mod policy;
