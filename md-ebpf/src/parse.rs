//! Packet parsing. Reads go through `bpf_skb_load_bytes` (ctx.load), which is bounds-checked by
//! the kernel and works on non-linear skbs, so no pointer survives a later rewrite.

use aya_ebpf::programs::TcContext;
use md_common::{CtKeyOf, Ip4, IPPROTO_TCP, IPPROTO_UDP};
use network_types::eth::EthHdr;

use crate::family::Addr;

pub const ETH_HLEN: usize = EthHdr::LEN;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

// IPv4 header field offsets from the start of the IP header.
pub const IP_CSUM: usize = 10;

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

/// The parsed IP packet (IPv4: `Pkt<Ip4>`, IPv6: `Pkt<Ip6>`) whose header starts at `l3_off`
/// (14 behind Ethernet, 0 on a layer-3 device).
#[derive(Clone, Copy)]
pub struct Pkt<A> {
    pub l3_off: usize,
    pub l4_off: usize,
    pub len: u32,
    /// The L4 protocol (IPv6: the header after the extension headers).
    pub proto: u8,
    pub saddr: A,
    pub daddr: A,
    /// Host byte order. ICMP echo: the identifier is `sport` of a request, `dport` of a reply.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub l4: L4,
    pub frag: Frag,
    /// The IP identification (IPv6: the fragment header's; fragments of one datagram share it).
    pub ip_id: u32,
    /// TCP: sequence and acknowledgement numbers, and the segment's length in sequence space
    /// (data + SYN + FIN).
    pub seq: u32,
    pub ack_seq: u32,
    pub seq_len: u32,
    /// The L4 header is cut short (fine in an ICMP error's quote, not for a packet of its own).
    pub truncated: bool,
    /// The packet's tuple as the tracker keys it, and the tuple of the packets answering it:
    /// built once here (in the scratch slot), so lookups need no key on the stack.
    pub tuple: CtKeyOf<A>,
    pub reply: CtKeyOf<A>,
}

/// Sets a tuple field by field (a tuple built on the stack first would cost its size).
#[inline(always)]
pub fn set_tuple<A: Copy>(
    t: &mut CtKeyOf<A>,
    saddr: &A,
    daddr: &A,
    sport: u16,
    dport: u16,
    proto: u8,
) {
    t.saddr = *saddr;
    t.daddr = *daddr;
    t.sport = sport;
    t.dport = dport;
    t.proto = proto;
    t._pad = 0;
    t._pad2 = 0;
}

/// What a frame carries, as far as md's programs tell them apart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Ipv4,
    Ipv6,
    Arp,
    Other,
}

#[inline(always)]
pub fn eth_proto(ctx: &TcContext) -> Option<u16> {
    let p: [u8; 2] = ctx.load(12).ok()?;
    Some(u16::from_be_bytes(p))
}

/// Which per-CPU slot a parsed packet goes to (PKT_SCRATCH, PKT_SCRATCH6): the packet a
/// program works on, and the one an ICMP error quotes. Parsed packets are too big to keep on
/// the 512-byte stack of an IPv6 call chain (FLOW_SCRATCH is the precedent).
pub const SLOT_PACKET: u32 = 0;
pub const SLOT_QUOTE: u32 = 1;

/// The IPv4 header at `l3`: fills `p`'s network-layer fields and returns the L4 part's length
/// (what the header says), or None when it is no IPv4 header.
#[inline(always)]
pub fn ipv4_header(ctx: &TcContext, l3: usize, p: &mut Pkt<Ip4>) -> Option<u32> {
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
    p.l4_off = l3 + ihl;
    p.proto = ip[9];
    p.saddr = [ip[12], ip[13], ip[14], ip[15]];
    p.daddr = [ip[16], ip[17], ip[18], ip[19]];
    p.frag = if offset != 0 {
        Frag::Later
    } else if more_fragments {
        Frag::First
    } else {
        Frag::None
    };
    p.ip_id = u16::from_be_bytes([ip[4], ip[5]]) as u32;
    Some(tot_len.saturating_sub(ihl as u32))
}

#[inline(always)]
pub fn is_icmp4_error(t: u8) -> bool {
    matches!(
        t,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
    )
}

/// Parses the IP header (of family `A`) whose first byte is at `l3` and the L4 header after
/// it into `p`. Used for the outer packet and for the packet an ICMP error quotes (where the
/// L4 part may be cut short). False when the IP header is broken.
#[inline(always)]
fn parse_into<A: Addr>(ctx: &TcContext, l3: usize, p: &mut Pkt<A>) -> bool {
    p.l3_off = l3;
    p.len = ctx.len();
    p.sport = 0;
    p.dport = 0;
    p.tcp_flags = 0;
    p.icmp_type = 0;
    p.l4 = L4::Opaque;
    p.seq = 0;
    p.ack_seq = 0;
    p.seq_len = 0;
    p.truncated = false;
    let Some(l4_len) = A::header(ctx, l3, p) else {
        return false;
    };
    // Later fragments carry no L4 header: they stay Opaque and follow their first fragment.
    if p.frag != Frag::Later {
        l4_header(ctx, p, l4_len);
    }
    set_tuple(&mut p.tuple, &p.saddr, &p.daddr, p.sport, p.dport, p.proto);
    set_tuple(&mut p.reply, &p.daddr, &p.saddr, p.dport, p.sport, p.proto);
    true
}

/// The L4 header at `p.l4_off`, `l4_len` bytes long with what follows.
#[inline(always)]
fn l4_header<A: Addr>(ctx: &TcContext, p: &mut Pkt<A>, l4_len: u32) {
    let l4 = p.l4_off;
    // The whole header in one read: the common case, one helper call rather than three.
    if p.proto == IPPROTO_TCP {
        if let Ok(t) = ctx.load::<[u8; 20]>(l4) {
            tcp_header(p, &t, l4_len);
            return;
        }
    } else if p.proto == IPPROTO_UDP {
        if let Ok(u) = ctx.load::<[u8; 8]>(l4) {
            p.sport = u16::from_be_bytes([u[0], u[1]]);
            p.dport = u16::from_be_bytes([u[2], u[3]]);
            p.l4 = L4::Ports;
            return;
        }
    }
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Ok(ports) = ctx.load::<[u8; 4]>(l4) {
                p.sport = u16::from_be_bytes([ports[0], ports[1]]);
                p.dport = u16::from_be_bytes([ports[2], ports[3]]);
                p.l4 = L4::Ports;
            }
            // Here the whole header is not there (its read above failed), which a translation
            // needs (the checksum is at its end); a quoted header inside an ICMP error may stop
            // after the ports (see `quoted`).
            p.truncated = true;
        }
        proto if proto == A::ICMP => {
            if let Ok(h) = ctx.load::<[u8; 6]>(l4) {
                p.icmp_type = h[0];
                let id = u16::from_be_bytes([h[4], h[5]]);
                if h[0] == A::ECHO {
                    p.sport = id;
                    p.l4 = L4::Ports;
                } else if h[0] == A::ECHO_REPLY {
                    p.dport = id;
                    p.l4 = L4::Ports;
                } else if A::is_icmp_error(h[0]) {
                    p.l4 = L4::IcmpError;
                }
            }
        }
        _ => {}
    }
}

/// The fields of a whole TCP header `t`, `l4_len` bytes long with its data.
#[inline(always)]
fn tcp_header<A>(p: &mut Pkt<A>, t: &[u8; 20], l4_len: u32) {
    p.sport = u16::from_be_bytes([t[0], t[1]]);
    p.dport = u16::from_be_bytes([t[2], t[3]]);
    p.l4 = L4::Ports;
    p.seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    p.ack_seq = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    p.tcp_flags = t[13];
    let doff = ((t[12] >> 4) as u32) * 4;
    let data = l4_len.saturating_sub(doff);
    p.seq_len = data + (p.tcp_flags & TCP_SYN != 0) as u32 + (p.tcp_flags & TCP_FIN != 0) as u32;
}

/// Parses the packet at `l3` into the per-CPU slot `slot`.
#[inline(always)]
fn parse_slot<A: Addr>(ctx: &TcContext, l3: usize, slot: u32) -> Option<&'static mut Pkt<A>> {
    let p = unsafe { &mut *A::pkt_slot(slot)? };
    parse_into(ctx, l3, p).then_some(p)
}

/// What the packet at `l3` is: behind Ethernet (`l3` = 14) the EtherType says; on a layer-3
/// device (`l3` = 0: tun, WireGuard, whose packets start with the IP header) the skb's
/// protocol does.
#[inline(always)]
pub fn proto_at(ctx: &TcContext, l3: usize) -> Proto {
    let p = if l3 == ETH_HLEN {
        eth_proto(ctx)
    } else {
        Some(u16::from_be(ctx.skb.protocol() as u16))
    };
    match p {
        Some(ETH_P_IP) => Proto::Ipv4,
        Some(ETH_P_IPV6) => Proto::Ipv6,
        Some(ETH_P_ARP) if l3 == ETH_HLEN => Proto::Arp,
        _ => Proto::Other,
    }
}

/// Parses a packet of its own (not a quote) of family `A` at `l3`: None when its header is
/// broken. A cut-short L4 header leaves no ports to trust.
#[inline(always)]
pub fn packet<A: Addr>(ctx: &TcContext, l3: usize) -> Option<&'static Pkt<A>> {
    let p = parse_slot::<A>(ctx, l3, SLOT_PACKET)?;
    if p.truncated {
        p.l4 = L4::Opaque;
    }
    Some(p)
}

/// Parses the packet an ICMP error quotes, at `l3` (its L4 header may be cut short).
#[inline(always)]
pub fn quote<A: Addr>(ctx: &TcContext, l3: usize) -> Option<&'static Pkt<A>> {
    parse_slot::<A>(ctx, l3, SLOT_QUOTE).map(|p| &*p)
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
