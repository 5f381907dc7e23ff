pub mod dataplane;
pub mod election;
pub mod model;
pub mod policy;
