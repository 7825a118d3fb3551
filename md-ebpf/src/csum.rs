//! Every header rewrite and its checksum update, in one place.
//!
//! Rules (DATAPATH-NOTES): an address change updates the IP checksum and, through the
//! pseudo-header, the TCP/UDP checksum (`BPF_F_PSEUDO_HDR`); a port change is a separate
//! update without the pseudo flag (on CHECKSUM_PARTIAL skbs the kernel then leaves the field
//! alone, as it must); UDP adds `BPF_F_MARK_MANGLED_0` so a zero ("no checksum") stays zero.
//! ICMP has no pseudo-header; its echo identifier is covered by the ICMP checksum.

use aya_ebpf::programs::TcContext;
use md_common::{CtKey, Ip4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::parse::{Pkt, ICMP_CSUM, ICMP_ID, IP_CSUM, IP_DADDR, IP_SADDR, L4, TCP_CSUM, UDP_CSUM};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

type R = Result<(), i64>;

#[inline(always)]
fn raw32(a: Ip4) -> u64 {
    u32::from_ne_bytes(a) as u64
}

#[inline(always)]
fn raw16(port: u16) -> u64 {
    u16::from_ne_bytes(port.to_be_bytes()) as u64
}

/// Offset and flags of the L4 checksum that covers the addresses, if any.
#[inline(always)]
fn l4_csum(p: &Pkt) -> Option<(usize, u64)> {
    if p.l4 != L4::Ports {
        return None;
    }
    match p.proto {
        IPPROTO_TCP => Some((p.l4_off + TCP_CSUM, 0)),
        IPPROTO_UDP => Some((p.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)),
        _ => None,
    }
}

/// Rewrites the source (`src == true`) or destination address of the outer IPv4 header.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, p: &Pkt, src: bool, from: Ip4, to: Ip4) -> R {
    if let Some((off, flags)) = l4_csum(p) {
        ctx.l4_csum_replace(off, raw32(from), raw32(to), flags | BPF_F_PSEUDO_HDR | 4)?;
    }
    ctx.l3_csum_replace(p.l3_off + IP_CSUM, raw32(from), raw32(to), 4)?;
    let off = p.l3_off + if src { IP_SADDR } else { IP_DADDR };
    ctx.store(off, &to, 0)?;
    Ok(())
}

/// Rewrites a port (TCP/UDP) or the ICMP echo identifier.
#[inline(always)]
pub fn set_port(ctx: &TcContext, p: &Pkt, src: bool, from: u16, to: u16) -> R {
    let to_be = to.to_be_bytes();
    match p.proto {
        IPPROTO_ICMP => {
            ctx.l4_csum_replace(p.l4_off + ICMP_CSUM, raw16(from), raw16(to), 2)?;
            ctx.store(p.l4_off + ICMP_ID, &to_be, 0)?;
        }
        _ => {
            let (off, flags) = l4_csum(p).ok_or(-1i64)?;
            ctx.l4_csum_replace(off, raw16(from), raw16(to), flags | 2)?;
            ctx.store(p.l4_off + if src { 0 } else { 2 }, &to_be, 0)?;
        }
    }
    Ok(())
}

/// Turns the packet's tuple into `to`, field by field.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Pkt, to: &CtKey) -> R {
    if to.saddr != p.saddr {
        set_addr(ctx, p, true, p.saddr, to.saddr)?;
    }
    if to.daddr != p.daddr {
        set_addr(ctx, p, false, p.daddr, to.daddr)?;
    }
    if to.sport != p.sport {
        set_port(ctx, p, true, p.sport, to.sport)?;
    }
    if to.dport != p.dport {
        set_port(ctx, p, false, p.dport, to.dport)?;
    }
    Ok(())
}

/// Rewrites the packet an ICMP error quotes (at `inner_l3`) into tuple `to`, folding every
/// changed 16-bit word, the quoted IP checksum included, into the outer ICMP checksum. The
/// quoted L4 checksum is left alone: it is often cut off and receivers do not check it.
#[inline(always)]
pub fn rewrite_quoted(ctx: &TcContext, outer: &Pkt, inner: &Pkt, inner_l3: usize, to: &CtKey) -> R {
    let icmp_csum = outer.l4_off + ICMP_CSUM;
    let addr_fields = [
        (inner.saddr, to.saddr, IP_SADDR),
        (inner.daddr, to.daddr, IP_DADDR),
    ];
    for (from, new, field) in addr_fields {
        if from != new {
            let before: [u8; 2] = ctx.load(inner_l3 + IP_CSUM)?;
            ctx.l3_csum_replace(inner_l3 + IP_CSUM, raw32(from), raw32(new), 4)?;
            let after: [u8; 2] = ctx.load(inner_l3 + IP_CSUM)?;
            ctx.store(inner_l3 + field, &new, 0)?;
            ctx.l4_csum_replace(icmp_csum, raw32(from), raw32(new), 4)?;
            ctx.l4_csum_replace(
                icmp_csum,
                u16::from_ne_bytes(before) as u64,
                u16::from_ne_bytes(after) as u64,
                2,
            )?;
        }
    }
    let port_fields = [
        (inner.sport, to.sport, 0usize),
        (inner.dport, to.dport, 2usize),
    ];
    for (from, new, field) in port_fields {
        if from != new {
            // The quoted ICMP echo keeps its identifier at offset 4; TCP/UDP ports at 0 and 2.
            let off = if inner.proto == IPPROTO_ICMP {
                ICMP_ID
            } else {
                field
            };
            ctx.store(inner.l4_off + off, &new.to_be_bytes(), 0)?;
            ctx.l4_csum_replace(icmp_csum, raw16(from), raw16(new), 2)?;
        }
    }
    Ok(())
}

/// Sets the Ethernet addresses (before a redirect into a container).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> R {
    ctx.store(0, dst, 0)?;
    ctx.store(6, src, 0)?;
    Ok(())
}
