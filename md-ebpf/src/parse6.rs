//! IPv6 parsing: the fixed header, the extension headers a router may meet (hop-by-hop,
//! routing, destination options, authentication, fragment: Cilium's `ipv6_hdrlen_offset`),
//! then the L4 header as for IPv4.

use aya_ebpf::programs::TcContext;
use md_common::{Ip6, IPPROTO_ICMPV6};

use crate::parse::{Frag, Pkt};

pub const IP6_HLEN: usize = 40;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up on finding the L4 header (Cilium walks 4).
const MAX_EXT_HEADERS: usize = 4;

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_PARAM_PROB: u8 = 4;
pub const ICMP6_ECHO: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const MLD_QUERY: u8 = 130;
pub const MLD_REPORT: u8 = 131;
pub const MLD_DONE: u8 = 132;
pub const NDP_ROUTER_SOLICIT: u8 = 133;
pub const NDP_ROUTER_ADVERT: u8 = 134;
pub const NDP_NEIGH_SOLICIT: u8 = 135;
pub const NDP_NEIGH_ADVERT: u8 = 136;
pub const NDP_REDIRECT: u8 = 137;
pub const MLD2_REPORT: u8 = 143;

/// Where the headers after the fixed one end, and what follows them.
struct Walk {
    next: u8,
    off: usize,
    frag: Frag,
    id: u32,
}

/// Walks the extension headers after the fixed header at `l3`. A non-first fragment stops at
/// its fragment header (what follows is payload, not a header).
#[inline(always)]
fn walk(ctx: &TcContext, l3: usize, first: u8) -> Option<Walk> {
    let mut w = Walk {
        next: first,
        off: l3 + IP6_HLEN,
        frag: Frag::None,
        id: 0,
    };
    for _ in 0..MAX_EXT_HEADERS {
        match w.next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = ctx.load(w.off).ok()?;
                w.next = h[0];
                w.off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = ctx.load(w.off).ok()?;
                w.next = h[0];
                w.off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let h: [u8; 8] = ctx.load(w.off).ok()?;
                w.next = h[0];
                w.off += 8;
                let fo = u16::from_be_bytes([h[2], h[3]]);
                w.id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if fo >> 3 != 0 {
                    w.frag = Frag::Later;
                    return Some(w);
                }
                if fo & 1 != 0 {
                    w.frag = Frag::First;
                }
            }
            _ => return Some(w),
        }
    }
    Some(w)
}

/// The IPv6 header at `l3` and its extension headers: fills `p`'s network-layer fields and
/// returns the L4 part's length (what the header says), or None when it is no IPv6 header.
#[inline(always)]
pub fn ipv6_header(ctx: &TcContext, l3: usize, p: &mut Pkt<Ip6>) -> Option<u32> {
    let h: [u8; 8] = ctx.load(l3).ok()?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as u32;
    p.saddr = ctx.load(l3 + 8).ok()?;
    p.daddr = ctx.load(l3 + 24).ok()?;
    let w = walk(ctx, l3, h[6])?;
    p.l4_off = w.off;
    p.proto = w.next;
    p.frag = w.frag;
    p.ip_id = w.id;
    Some(payload_len.saturating_sub((w.off - l3 - IP6_HLEN) as u32))
}

#[inline(always)]
pub fn is_icmp6_error(t: u8) -> bool {
    matches!(
        t,
        ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAM_PROB
    )
}

/// An NDP or MLD message: link-scoped control traffic that is not md's to translate.
#[inline(always)]
pub fn is_ndp_or_mld(p: &Pkt<Ip6>) -> bool {
    p.proto == IPPROTO_ICMPV6
        && p.frag == Frag::None
        && matches!(
            p.icmp_type,
            MLD_QUERY
                | MLD_REPORT
                | MLD_DONE
                | MLD2_REPORT
                | NDP_ROUTER_SOLICIT
                | NDP_ROUTER_ADVERT
                | NDP_NEIGH_SOLICIT
                | NDP_NEIGH_ADVERT
                | NDP_REDIRECT
        )
}
