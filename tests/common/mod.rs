pub mod arp;
pub mod netns;
pub mod topo;
