//! Gratuitous ARP and unsolicited IPv6 neighbour advertisements, so that the LAN learns at once
//! which MAC now answers for a virtual IP. Frames are built here (pure, tested) and sent through a
//! raw packet socket (ARP) or a raw ICMPv6 socket (NA, whose checksum the kernel fills in).

use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Error, Result};

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];

/// An Ethernet frame carrying a gratuitous ARP request: sender and target protocol address are
/// both the VIP, so every host with a neighbour entry for it updates that entry to `mac`.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request, as keepalived sends
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero: it is unknown in a request.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// The ICMPv6 part of an unsolicited neighbour advertisement (RFC 4861 §7.2.6): override flag set,
/// solicited clear, with the target link-layer address option. Checksum left zero for the kernel.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // neighbour advertisement
    p[4] = 0x20; // O (override)
    p[8..24].copy_from_slice(&ip.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// Sends one gratuitous ARP on the interface with index `ifindex`.
pub fn send_garp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<()> {
    let io = |source| Error::Io {
        op: "sending gratuitous ARP",
        source,
    };
    let sock = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))),
    )
    .map_err(io)?;
    // SAFETY: sockaddr_ll is plain old data; an all-zero value is valid before we fill it.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&BROADCAST);
    let frame = garp_frame(mac, ip);
    // SAFETY: the pointers are valid for the lengths given for the duration of the call.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sends one unsolicited neighbour advertisement for `ip` to all nodes (ff02::1) on `ifindex`.
pub fn send_na(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> Result<()> {
    let io = |source| Error::Io {
        op: "sending unsolicited neighbour advertisement",
        source,
    };
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(io)?;
    // Receivers drop neighbour discovery that did not come with hop limit 255 (RFC 4861).
    sock.set_multicast_hops_v6(255).map_err(io)?;
    sock.set_unicast_hops_v6(255).map_err(io)?;
    sock.set_multicast_if_v6(ifindex).map_err(io)?;
    let dst = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
    sock.send_to(&unsolicited_na(mac, ip), &SockAddr::from(dst))
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_has_vip_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = garp_frame(mac, Ipv4Addr::new(198, 18, 0, 50));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[198, 18, 0, 50]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[198, 18, 0, 50]);
    }

    #[test]
    fn na_sets_override_and_target_option() {
        let mac = [2, 0, 0, 0, 0, 9];
        let ip: Ipv6Addr = "2001:db8::50".parse().unwrap();
        let p = unsolicited_na(mac, ip);
        assert_eq!(p[0], 136);
        assert_eq!(p[4], 0x20, "override set, solicited and router clear");
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &mac);
    }
}
