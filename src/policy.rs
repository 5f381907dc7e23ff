//! The policy compiler: policies plus the gateways this node is active for → the SNAT map.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// One element of a SNAT interval map: traffic from `src` to `dst` (inclusive address ranges)
/// leaves with source address `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SnatElement<A> {
    pub src: (A, A),
    pub dst: (A, A),
    pub to: A,
}

/// The whole SNAT decision of a node, one map per address family. Elements are sorted and never
/// overlap (nftables rejects overlapping elements in an interval map).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnatMap {
    pub v4: Vec<SnatElement<Ipv4Addr>>,
    pub v6: Vec<SnatElement<Ipv6Addr>>,
}

impl SnatMap {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
