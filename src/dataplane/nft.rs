//! nftables firewall (to be written)
