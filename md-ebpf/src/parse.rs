//! Packet parsing. Reads go through `bpf_skb_load_bytes` (ctx.load), which is bounds-checked by
//! the kernel and works on non-linear skbs, so no pointer survives a later rewrite.

use aya_ebpf::programs::TcContext;
use md_common::{CtKey, Ip4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::eth::EthHdr;

pub const ETH_HLEN: usize = EthHdr::LEN;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

// IPv4 header field offsets from the start of the IP header.
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;

pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
pub const ICMP_CSUM: usize = 2;
pub const ICMP_ID: usize = 4;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the L4 part of a packet is, as far as translation is concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or ICMP echo: ports (or the echo identifier) are known.
    Ports,
    /// An ICMP error quoting another packet's header.
    IcmpError,
    /// A non-first fragment, an unknown protocol or a truncated header: no ports.
    Opaque,
}

/// Whether a packet is part of a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    None,
    /// Offset 0 with more to come: carries the ports.
    First,
    /// Offset > 0: no L4 header; follows its first fragment's translation.
    Later,
}

/// The parsed IPv4 packet whose header starts at `l3_off` (14 behind Ethernet, 0 on a layer-3
/// device).
#[derive(Clone, Copy)]
pub struct Pkt {
    pub l3_off: usize,
    pub l4_off: usize,
    pub len: u32,
    pub proto: u8,
    pub saddr: Ip4,
    pub daddr: Ip4,
    /// Host byte order. ICMP echo: the identifier is `sport` of a request, `dport` of a reply.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub l4: L4,
    pub frag: Frag,
    /// The IP identification (fragments of one datagram share it).
    pub ip_id: u16,
    /// TCP: sequence and acknowledgement numbers, and the segment's length in sequence space
    /// (data + SYN + FIN).
    pub seq: u32,
    pub ack_seq: u32,
    pub seq_len: u32,
    /// The L4 header is cut short (fine in an ICMP error's quote, not for a packet of its own).
    pub truncated: bool,
}

impl Pkt {
    pub fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }
}

pub enum Parsed {
    Ipv4(Pkt),
    Arp,
    /// IPv6 or anything else.
    Other,
    /// Claims to be IPv4 but its header is broken.
    Malformed,
}

#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Option<u16> {
    let p: [u8; 2] = ctx.load(12).ok()?;
    Some(u16::from_be_bytes(p))
}

/// Parses an IPv4 header whose first byte is at `l3` and the L4 header after it. Used for the
/// outer packet and for the packet an ICMP error quotes (where the L4 part may be cut short).
#[inline(always)]
pub fn parse_ipv4_at(ctx: &TcContext, l3: usize) -> Option<Pkt> {
    let ip: [u8; 20] = ctx.load(l3).ok()?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let mut p = Pkt {
        l3_off: l3,
        l4_off: l3 + ihl,
        len: ctx.len(),
        proto: ip[9],
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        l4: L4::Opaque,
        frag: if offset != 0 {
            Frag::Later
        } else if more_fragments {
            Frag::First
        } else {
            Frag::None
        },
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
        seq: 0,
        ack_seq: 0,
        seq_len: 0,
        truncated: false,
    };
    // Later fragments carry no L4 header: they stay Opaque and follow their first fragment.
    if p.frag == Frag::Later {
        return Some(p);
    }
    let l4 = p.l4_off;
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
                p.sport = u16::from_be_bytes([ports[0], ports[1]]);
                p.dport = u16::from_be_bytes([ports[2], ports[3]]);
                p.l4 = L4::Ports;
            }
            // The whole header must be there for a translation (its checksum is at the end);
            // a quoted header inside an ICMP error may stop after the ports (see `quoted`).
            let full = if p.proto == IPPROTO_TCP { 20 } else { 8 };
            match ctx.load::<u8>(l4 + full - 1) {
                Ok(_) if p.proto == IPPROTO_TCP => {
                    if let Ok(t) = ctx.load::<[u8; 14]>(l4) {
                        p.seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                        p.ack_seq = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
                        p.tcp_flags = t[13];
                        let doff = ((t[12] >> 4) as u32) * 4;
                        let data = tot_len.saturating_sub(ihl as u32 + doff);
                        p.seq_len = data
                            + (p.tcp_flags & TCP_SYN != 0) as u32
                            + (p.tcp_flags & TCP_FIN != 0) as u32;
                    }
                }
                Ok(_) => {}
                Err(_) => p.truncated = true,
            }
        }
        IPPROTO_ICMP => {
            if let Ok(h) = ctx.load::<[u8; 6]>(l4) {
                p.icmp_type = h[0];
                let id = u16::from_be_bytes([h[4], h[5]]);
                match h[0] {
                    ICMP_ECHO => {
                        p.sport = id;
                        p.l4 = L4::Ports;
                    }
                    ICMP_ECHO_REPLY => {
                        p.dport = id;
                        p.l4 = L4::Ports;
                    }
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB => {
                        p.l4 = L4::IcmpError;
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Some(p)
}

/// Parses a frame behind an Ethernet header.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    match eth_proto(ctx) {
        Some(ETH_P_IP) => ipv4(ctx, ETH_HLEN),
        Some(ETH_P_ARP) => Parsed::Arp,
        _ => Parsed::Other,
    }
}

/// Parses a packet on a device with `l3` bytes of link header: 14 (Ethernet) or 0 (a
/// layer-3 device such as tun or WireGuard, whose packets start with the IP header).
#[inline(always)]
pub fn parse_at(ctx: &TcContext, l3: usize) -> Parsed {
    if l3 == ETH_HLEN {
        return parse(ctx);
    }
    if u16::from_be(ctx.skb.protocol() as u16) == ETH_P_IP {
        ipv4(ctx, l3)
    } else {
        Parsed::Other
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) -> Parsed {
    match parse_ipv4_at(ctx, l3) {
        // A packet of its own with a cut-short header has no ports to trust.
        Some(mut p) => {
            if p.truncated {
                p.l4 = L4::Opaque;
            }
            Parsed::Ipv4(p)
        }
        None => Parsed::Malformed,
    }
}

/// The sender hardware and protocol address of an Ethernet/IPv4 ARP packet.
#[inline(always)]
pub fn arp_sender(ctx: &TcContext) -> Option<([u8; 6], Ip4)> {
    // htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4)
    let a: [u8; 18] = ctx.load(ETH_HLEN).ok()?;
    if a[4] != 6 || a[5] != 4 {
        return None;
    }
    Some((
        [a[8], a[9], a[10], a[11], a[12], a[13]],
        [a[14], a[15], a[16], a[17]],
    ))
}

#[inline(always)]
pub fn eth_src(ctx: &TcContext) -> Option<[u8; 6]> {
    ctx.load(6).ok()
}
