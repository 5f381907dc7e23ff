pub mod arp;
pub mod bench;
pub mod capture;
pub mod cluster;
pub mod netns;
pub mod probe;
pub mod tools;
pub mod topo;
