//! Set element changes as hand-built nfnetlink batches, on one persistent socket.
//!
//! Only element messages (`NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`) are built here; tables,
//! sets, chains and rules are made by `nft` from native syntax (see `nft.rs`). Element messages
//! are simple (a key, a key end, a value or verdict, a timeout) and are what grows with the
//! number of policies, so building them by hand removes nft's parser (about half the time of a
//! 100 000-element load), the process spawn, and the wait for the kernel's deferred destroy work
//! that closing a netfilter socket after a deletion costs (about 15 ms).
//!
//! A batch is one kernel transaction: `BATCH_BEGIN`, the messages, `BATCH_END`. The kernel
//! processes it synchronously inside `sendmsg`; if any message fails, the whole batch is
//! aborted and an error is queued for each failing message. The last message asks for an
//! acknowledgement, so success is positive: that acknowledgement and no error.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
/// In an error message's flags: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

/// Netfilter protocol families of the tables egressd owns.
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_ARP: u8 = 3;
pub const NFPROTO_NETDEV: u8 = 5;
pub const NFPROTO_IPV6: u8 = 10;

/// Largest element list in one message: an attribute's length is 16 bits.
const MAX_ELEMENTS_BYTES: usize = 60_000;
/// How long to wait for the kernel's answer once a batch is sent (it is normally already queued
/// when `sendmsg` returns).
const ANSWER_TIMEOUT_MS: libc::c_int = 10_000;

/// An address as the bytes of a set key (network order).
pub trait KeyBytes: Copy {
    fn put(self, out: &mut Vec<u8>);
    /// Width in bytes, and the address read back from `b` (exactly that width).
    const WIDTH: usize;
    fn show(b: &[u8]) -> String;
}

impl KeyBytes for Ipv4Addr {
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }
    const WIDTH: usize = 4;
    fn show(b: &[u8]) -> String {
        <[u8; 4]>::try_from(b)
            .map_or_else(|_| format!("{b:02x?}"), |a| Ipv4Addr::from(a).to_string())
    }
}

impl KeyBytes for Ipv6Addr {
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }
    const WIDTH: usize = 16;
    fn show(b: &[u8]) -> String {
        <[u8; 16]>::try_from(b)
            .map_or_else(|_| format!("{b:02x?}"), |a| Ipv6Addr::from(a).to_string())
    }
}

/// A wall-clock time (nanoseconds since the Unix epoch), big-endian as nft keeps `meta time`
/// in an interval set: the keys of the fence's lease sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallTime(pub u64);

impl KeyBytes for WallTime {
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
    const WIDTH: usize = 8;
    fn show(b: &[u8]) -> String {
        let ns = <[u8; 8]>::try_from(b).map_or(0, u64::from_be_bytes);
        format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
    }
}

/// The value of a map element.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a, A> {
    /// No value (a plain set, or a delete).
    None,
    /// An address (the SNAT maps).
    Addr(A),
    /// `jump CHAIN` (the selector verdict maps).
    Jump(&'a str),
}

/// One element: `key` (a concatenation of one or two addresses) up to `key_end` when the set has
/// intervals, with its value and timeout. An interval of a set with one field (the kernel keeps
/// it in an rbtree) is instead two elements: its start, and its end (exclusive) marked
/// `interval_end`.
#[derive(Debug, Clone, Copy)]
pub struct Element<'a, A> {
    pub key: (A, Option<A>),
    pub key_end: Option<(A, Option<A>)>,
    pub data: Data<'a, A>,
    pub timeout_ms: Option<u64>,
    pub interval_end: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add; with `exclusive` an element that already exists is an error ("File exists").
    Add {
        exclusive: bool,
    },
    Delete,
}

/// What a message was about, to name it (and the bad element in it) in an error.
#[derive(Debug)]
struct MsgInfo {
    seq: u32,
    /// Start of the message within the batch buffer.
    start: usize,
    what: String,
    /// Width of the elements' key parts and how to print one, for naming an element the
    /// kernel points at.
    width: usize,
    show: fn(&[u8]) -> String,
}

/// One transaction under construction.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    msgs: Vec<MsgInfo>,
    seq: u32,
    /// Start of the open element message and of its element list attribute, if any.
    open: Option<(usize, usize)>,
    /// Elements in the batch.
    elements: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            msgs: Vec::new(),
            seq: 0,
            open: None,
            elements: 0,
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0);
        b.nfgen(0, NFNL_SUBSYS_NFTABLES);
        b.finish_msg(0);
        b
    }

    /// Element count so far.
    pub fn len(&self) -> usize {
        self.elements
    }

    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }

    /// Appends `elements` of set `table`/`set` (family `family`), split into as many messages as
    /// the attribute size limit needs.
    pub fn elements<'e, A: KeyBytes + 'e>(
        &mut self,
        op: Op,
        family: u8,
        table: &str,
        set: &str,
        elements: impl IntoIterator<Item = Element<'e, A>>,
    ) {
        let mut el = Vec::with_capacity(128);
        for e in elements {
            el.clear();
            encode_element(&mut el, &e);
            if let Some((_, list)) = self.open
                && self.buf.len() - list + el.len() > MAX_ELEMENTS_BYTES
            {
                self.close_elements();
            }
            if self.open.is_none() {
                self.open_elements::<A>(op, family, table, set);
            }
            self.buf.extend_from_slice(&el);
            self.elements += 1;
        }
        self.close_elements();
    }

    fn open_elements<A: KeyBytes>(&mut self, op: Op, family: u8, table: &str, set: &str) {
        let (ty, flags, verb) = match op {
            Op::Add { exclusive: true } => (
                NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
                "adding to",
            ),
            Op::Add { exclusive: false } => (
                NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_CREATE,
                "adding to",
            ),
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST, "deleting from"),
        };
        self.seq += 1;
        let start = self.buf.len();
        self.header((NFNL_SUBSYS_NFTABLES << 8) | ty, flags, self.seq);
        self.nfgen(family, 0);
        put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        let list = self.buf.len();
        put_attr_header(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
        self.msgs.push(MsgInfo {
            seq: self.seq,
            start,
            what: format!("{verb} set {table} {set}"),
            width: A::WIDTH,
            show: A::show,
        });
        self.open = Some((start, list));
    }

    fn close_elements(&mut self) {
        if let Some((start, list)) = self.open.take() {
            set_len(&mut self.buf, list);
            self.finish_msg(start);
        }
    }

    fn header(&mut self, ty: u16, flags: u16, seq: u32) {
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
    }

    fn nfgen(&mut self, family: u8, res_id: u16) {
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    fn finish_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// The finished batch: the last element message asks for an acknowledgement.
    fn finish(mut self) -> (Vec<u8>, Vec<MsgInfo>, u32) {
        self.close_elements();
        let last = self.msgs.last().map(|m| (m.start, m.seq));
        if let Some((start, _)) = last {
            let flags = u16::from_ne_bytes([self.buf[start + 6], self.buf[start + 7]]) | NLM_F_ACK;
            self.buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        let end_seq = self.seq + 1;
        let start = self.buf.len();
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq);
        self.nfgen(0, NFNL_SUBSYS_NFTABLES);
        self.finish_msg(start);
        (self.buf, self.msgs, last.map_or(0, |(_, s)| s))
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn put_attr_header(buf: &mut Vec<u8>, ty: u16) {
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
}

/// Sets the length of the attribute starting at `at` to the end of `buf`, and pads `buf`.
fn set_len(buf: &mut Vec<u8>, at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let at = buf.len();
    put_attr_header(buf, ty);
    buf.extend_from_slice(payload);
    set_len(buf, at);
}

fn put_value<A: KeyBytes>(buf: &mut Vec<u8>, ty: u16, (a, b): (A, Option<A>)) {
    let outer = buf.len();
    put_attr_header(buf, ty | NLA_F_NESTED);
    let inner = buf.len();
    put_attr_header(buf, NFTA_DATA_VALUE);
    a.put(buf);
    if let Some(b) = b {
        b.put(buf);
    }
    set_len(buf, inner);
    set_len(buf, outer);
}

fn encode_element<A: KeyBytes>(buf: &mut Vec<u8>, e: &Element<'_, A>) {
    let at = buf.len();
    put_attr_header(buf, NFTA_LIST_ELEM | NLA_F_NESTED);
    if e.interval_end {
        put_attr(
            buf,
            NFTA_SET_ELEM_FLAGS,
            &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
        );
    }
    put_value(buf, NFTA_SET_ELEM_KEY, e.key);
    if let Some(end) = e.key_end {
        put_value(buf, NFTA_SET_ELEM_KEY_END, end);
    }
    match e.data {
        Data::None => {}
        Data::Addr(a) => put_value(buf, NFTA_SET_ELEM_DATA, (a, None)),
        Data::Jump(chain) => {
            let data = buf.len();
            put_attr_header(buf, NFTA_SET_ELEM_DATA | NLA_F_NESTED);
            let verdict = buf.len();
            put_attr_header(buf, NFTA_DATA_VERDICT | NLA_F_NESTED);
            put_attr(buf, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
            put_attr(buf, NFTA_VERDICT_CHAIN, &cstr(chain));
            set_len(buf, verdict);
            set_len(buf, data);
        }
    }
    if let Some(ms) = e.timeout_ms {
        put_attr(buf, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
    }
    set_len(buf, at);
}

/// Iterates the attributes in `b`: (type without flags, payload, offset of the attribute in `b`).
pub(crate) fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8], usize)> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > b.len() {
            return None;
        }
        let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & 0x3fff;
        if len < 4 || off + len > b.len() {
            return None;
        }
        let item = (ty, &b[off + 4..off + len], off);
        off += (len + 3) & !3;
        Some(item)
    })
}

/// Names the element at `at` (an offset into `msg`) as nft would print it, e.g.
/// `10.0.0.1 . 0.0.0.0-255.255.255.255 : 192.0.2.1`.
fn describe_element(
    msg: &[u8],
    at: usize,
    width: usize,
    show: fn(&[u8]) -> String,
) -> Option<String> {
    // The element list attribute holds NFTA_LIST_ELEM attributes; find the one spanning `at`.
    let body = msg.get(20..)?;
    let (_, list, list_off) = attrs(body).find(|(t, _, _)| *t == NFTA_SET_ELEM_LIST_ELEMENTS)?;
    let base = 20 + list_off + 4;
    let (_, elem, _) = attrs(list).find(|(_, p, o)| {
        let start = base + o;
        at >= start && at < start + 4 + p.len()
    })?;
    let value = |ty: u16| -> Option<&[u8]> {
        let (_, nested, _) = attrs(elem).find(|(t, _, _)| *t == ty)?;
        attrs(nested)
            .find(|(t, _, _)| *t == NFTA_DATA_VALUE)
            .map(|(_, v, _)| v)
    };
    let key = value(NFTA_SET_ELEM_KEY)?;
    let end = value(NFTA_SET_ELEM_KEY_END);
    let mut s = String::new();
    for (i, part) in key.chunks(width).enumerate() {
        if i > 0 {
            s.push_str(" . ");
        }
        s.push_str(&show(part));
        if let Some(e) = end.and_then(|e| e.chunks(width).nth(i))
            && e != part
        {
            let _ = write!(s, "-{}", show(e));
        }
    }
    if let Some(v) = value(NFTA_SET_ELEM_DATA) {
        let _ = write!(s, " : {}", show(v));
    }
    let flags = attrs(elem).find(|(t, _, _)| *t == NFTA_SET_ELEM_FLAGS);
    if let Some((_, f, _)) = flags
        && f == NFT_SET_ELEM_INTERVAL_END.to_be_bytes()
    {
        s.push_str(" (interval end)");
    }
    Some(s)
}

/// A netfilter netlink socket, bound to the network namespace it was opened in. Its port id is
/// registered as egressd's own (`watch::own`) while it is open, so that the watcher tells the
/// transactions it sends from outside ones.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    sndbuf: usize,
    portid: u32,
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        super::watch::own().socket_closed(self.portid);
    }
}

impl Socket {
    /// Opens a socket in this process's network namespace, or in the named one
    /// (`/run/netns/NAME`, as `ip netns` makes them; the socket stays bound to it).
    pub fn open(netns: Option<&str>) -> io::Result<Socket> {
        match netns {
            None => Socket::open_here(),
            Some(name) => {
                let path = format!("/run/netns/{name}");
                // setns affects only the calling thread: do it on a thread of its own.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let ns = std::fs::File::open(&path)?;
                        // SAFETY: setns on a valid namespace fd, on this short-lived thread only.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Socket::open_here()
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")))
                })
            }
        }
    }

    fn open_here() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the result is checked before it is wrapped.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh socket owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid; the kernel picks the port id.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_nl is valid; getsockname fills it in.
        let mut bound: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `bound` is a sockaddr_nl of the size given in `len`.
        let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut bound).cast(), &mut len) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = Socket {
            fd,
            sndbuf: 0,
            portid: bound.nl_pid,
        };
        super::watch::own().socket_opened(sock.portid);
        // Errors without the echoed request (a request can be 60 KB), with the kernel's message
        // and the offset of the bad attribute.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)?;
        sock.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 4 << 20)?;
        Ok(sock)
    }

    /// The port id the kernel gave this socket: the `nlmsg_pid` of the notifications of the
    /// transactions it sends.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    pub(crate) fn setsockopt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: `value` is a c_int of the size given.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends `batch` as one transaction and waits for the kernel's verdict: `Ok` once the
    /// kernel acknowledged it; `Rejected` (nothing changed) naming the failing message's set
    /// and, when the kernel points at one, the element; `Socket` when the socket failed (the
    /// outcome is unknown, and the socket should be reopened).
    pub fn send(&mut self, batch: Batch) -> Result<(), SendError> {
        let (buf, msgs, ack_seq) = batch.finish();
        if msgs.is_empty() {
            return Ok(());
        }
        self.drain();
        if buf.len() + 4096 > self.sndbuf {
            let want = (buf.len() + 4096).next_power_of_two();
            let want_int = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
            self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want_int)
                .map_err(|e| SendError::Socket(format!("setting the send buffer: {e}")))?;
            self.sndbuf = want;
        }
        // SAFETY: `buf` is valid for its length; the kernel is the destination (bound socket,
        // default peer).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if sent < 0 {
            return Err(SendError::Socket(format!(
                "sending a {} byte batch: {}",
                buf.len(),
                io::Error::last_os_error()
            )));
        }
        let first_seq = msgs.first().map_or(0, |m| m.seq);
        let mut errors: Vec<String> = Vec::new();
        let mut acked = false;
        let mut rx = vec![0u8; 65536];
        loop {
            // SAFETY: `rx` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    rx.as_mut_ptr().cast(),
                    rx.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        if acked || !errors.is_empty() {
                            break;
                        }
                        if !self.wait_readable()? {
                            return Err(SendError::Socket(
                                "no answer from the kernel to a batch".to_owned(),
                            ));
                        }
                        continue;
                    }
                    // Too many errors to queue: the batch failed, say so with what we have.
                    Some(libc::ENOBUFS) => {
                        errors.push("(more errors were dropped)".to_owned());
                        break;
                    }
                    _ => return Err(SendError::Socket(format!("reading the answer: {e}"))),
                }
            }
            let n = n as usize;
            let mut off = 0;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes([rx[off], rx[off + 1], rx[off + 2], rx[off + 3]]) as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let ty = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
                let flags = u16::from_ne_bytes([rx[off + 6], rx[off + 7]]);
                let m = &rx[off..off + len];
                off += (len + 3) & !3;
                if ty != NLMSG_ERROR || m.len() < 36 {
                    continue;
                }
                let code = i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
                // The echoed request header: its sequence number says which message.
                let seq = u32::from_ne_bytes([m[28], m[29], m[30], m[31]]);
                if seq < first_seq || seq > ack_seq + 1 {
                    continue; // not ours (a batch from before)
                }
                if code == 0 {
                    if seq == ack_seq {
                        acked = true;
                    }
                    continue;
                }
                let mut text = None;
                let mut offset = None;
                if flags & NLM_F_ACK_TLVS != 0 {
                    for (t, p, _) in attrs(&m[36..]) {
                        match t {
                            NLMSGERR_ATTR_MSG => {
                                text = Some(
                                    String::from_utf8_lossy(p.strip_suffix(&[0]).unwrap_or(p))
                                        .into_owned(),
                                )
                            }
                            NLMSGERR_ATTR_OFFS if p.len() == 4 => {
                                offset = Some(u32::from_ne_bytes([p[0], p[1], p[2], p[3]]) as usize)
                            }
                            _ => {}
                        }
                    }
                }
                let os = io::Error::from_raw_os_error(-code);
                let mut line = match msgs.iter().find(|i| i.seq == seq) {
                    Some(info) => {
                        let mut l = info.what.clone();
                        let msg_end = msgs
                            .iter()
                            .find(|i| i.seq == seq + 1)
                            .map_or(buf.len(), |i| i.start);
                        if let Some(el) = offset.and_then(|o| {
                            describe_element(&buf[info.start..msg_end], o, info.width, info.show)
                        }) {
                            let _ = write!(l, ", element {el}");
                        }
                        l
                    }
                    None => "the transaction".to_owned(),
                };
                let _ = write!(line, ": {os}");
                if let Some(t) = text {
                    let _ = write!(line, " ({t})");
                }
                errors.push(line);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            errors.truncate(10);
            Err(SendError::Rejected(errors.join("; ")))
        }
    }

    /// Discards anything queued from an earlier batch.
    fn drain(&self) {
        let mut rx = [0u8; 4096];
        loop {
            // SAFETY: `rx` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    rx.as_mut_ptr().cast(),
                    rx.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n <= 0 {
                return;
            }
        }
    }

    fn wait_readable(&self) -> Result<bool, SendError> {
        wait_readable(self.fd.as_raw_fd(), ANSWER_TIMEOUT_MS)
            .map_err(|e| SendError::Socket(format!("waiting for the answer: {e}")))
    }
}

/// Whether `fd` became readable within `timeout_ms` (a signal does not cut the wait short).
pub(super) fn wait_readable(fd: RawFd, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Why a batch did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The kernel refused it (nothing changed): which message, element and why.
    Rejected(String),
    /// The socket failed; whether the batch committed is unknown.
    Socket(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Rejected(s) => write!(f, "the kernel rejected the transaction: {s}"),
            SendError::Socket(s) => write!(f, "netfilter netlink socket: {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn element_encoding_and_description() {
        let mut b = Batch::new();
        let els = [Element {
            key: (ip("10.0.0.1"), Some(ip("0.0.0.0"))),
            key_end: Some((ip("10.0.0.1"), Some(ip("255.255.255.255")))),
            data: Data::Addr(ip("192.0.2.1")),
            timeout_ms: None,
            interval_end: false,
        }];
        b.elements(
            Op::Add { exclusive: true },
            NFPROTO_INET,
            "egressd",
            "m4",
            els,
        );
        assert_eq!(b.len(), 1);
        let (buf, msgs, ack) = b.finish();
        assert_eq!(msgs.len(), 1);
        assert_eq!(ack, 1);
        let m = &buf[msgs[0].start..];
        let len = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize;
        let flags = u16::from_ne_bytes([m[6], m[7]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK);
        // Offset of the first element: header 16 + nfgen 4 + table 12 + set 8 + list header 4.
        let first = 16 + 4 + 12 + 8 + 4;
        assert_eq!(
            describe_element(&m[..len], first + 8, 4, Ipv4Addr::show).as_deref(),
            Some("10.0.0.1 . 0.0.0.0-255.255.255.255 : 192.0.2.1")
        );
        // Batch begin (20 bytes) + the message + batch end (20 bytes).
        assert_eq!(buf.len(), 20 + len + 20);
    }

    #[test]
    fn long_lists_are_split_into_messages() {
        let mut b = Batch::new();
        let els = (0..5000u32).map(|i| Element {
            key: (Ipv4Addr::from(i), Some(Ipv4Addr::UNSPECIFIED)),
            key_end: Some((Ipv4Addr::from(i), Some(Ipv4Addr::BROADCAST))),
            data: Data::Addr(Ipv4Addr::LOCALHOST),
            timeout_ms: None,
            interval_end: false,
        });
        b.elements(Op::Add { exclusive: true }, NFPROTO_INET, "t", "s", els);
        let (buf, msgs, _) = b.finish();
        assert!(msgs.len() >= 4, "{}", msgs.len());
        for w in msgs.windows(2) {
            assert!(w[1].start - w[0].start <= MAX_ELEMENTS_BYTES + 100);
        }
        assert!(buf.len() > 5000 * 40);
    }
}
