pub mod arp;
pub mod cluster;
pub mod netns;
pub mod tools;
pub mod topo;
