pub mod arp;
pub mod cluster;
pub mod netns;
pub mod topo;
