//! Every header rewrite and its checksum update, in one place.
//!
//! Rules (DATAPATH-NOTES): an address change updates the IP checksum and, through the
//! pseudo-header, the TCP/UDP checksum (`BPF_F_PSEUDO_HDR`); a port change is a separate
//! update without the pseudo flag (on CHECKSUM_PARTIAL skbs the kernel then leaves the field
//! alone, as it must); UDP adds `BPF_F_MARK_MANGLED_0` so a zero ("no checksum") stays zero.
//! ICMP has no pseudo-header; its echo identifier is covered by the ICMP checksum.
//!
//! IPv6 has no header checksum: an address change only goes into the L4 checksum through the
//! pseudo-header, word by word, and ICMPv6's checksum has a pseudo-header too (so an ICMPv6
//! error's outer addresses go into it, and the quote's are folded in as plain bytes). The
//! address itself is stored with BPF_F_RECOMPUTE_CSUM: nothing else absorbs its change in a
//! CHECKSUM_COMPLETE skb's sum.

use aya_ebpf::programs::TcContext;
use md_common::{CtEntryOf, CtKeyOf, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    family::Addr,
    parse::{Pkt, ICMP_CSUM, ICMP_ID, IP_CSUM, L4, TCP_CSUM, UDP_CSUM},
};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

type R = Result<(), i64>;

#[inline(always)]
fn raw16(port: u16) -> u64 {
    u16::from_ne_bytes(port.to_be_bytes()) as u64
}

/// Offset and flags of the L4 checksum that covers the addresses, if any: TCP's and UDP's,
/// and ICMPv6's (but not ICMPv4's, which has no pseudo-header).
#[inline(always)]
fn l4_csum<A: Addr>(p: &Pkt<A>) -> Option<(usize, u64)> {
    if A::V6 && p.proto == A::ICMP && p.l4 != L4::Opaque {
        return Some((p.l4_off + ICMP_CSUM, 0));
    }
    if p.l4 != L4::Ports {
        return None;
    }
    match p.proto {
        IPPROTO_TCP => Some((p.l4_off + TCP_CSUM, 0)),
        IPPROTO_UDP => Some((p.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)),
        _ => None,
    }
}

/// Rewrites the source (`src == true`) or destination address of the outer IP header.
#[inline(always)]
pub fn set_addr<A: Addr>(ctx: &TcContext, p: &Pkt<A>, src: bool, from: A, to: A) -> R {
    if let Some((off, flags)) = l4_csum(p) {
        for i in 0..A::WORDS {
            let (f, t) = (from.word(i), to.word(i));
            if f != t {
                ctx.l4_csum_replace(off, f, t, flags | BPF_F_PSEUDO_HDR | 4)?;
            }
        }
    }
    if !A::V6 {
        ctx.l3_csum_replace(p.l3_off + IP_CSUM, from.word(0), to.word(0), 4)?;
    }
    let off = p.l3_off + if src { A::SADDR } else { A::DADDR };
    ctx.store(off, &to, A::STORE_FLAGS)?;
    Ok(())
}

/// Rewrites a port (TCP/UDP) or the ICMP echo identifier.
#[inline(always)]
pub fn set_port<A: Addr>(ctx: &TcContext, p: &Pkt<A>, src: bool, from: u16, to: u16) -> R {
    let to_be = to.to_be_bytes();
    match p.proto {
        proto if proto == A::ICMP => {
            // The checksum follows the identifier the field holds: an echo's flow carries it as
            // either "port", and an untracked reply's `from` is the other one (0).
            let cur = u16::from_be_bytes(ctx.load::<[u8; 2]>(p.l4_off + ICMP_ID)?);
            ctx.l4_csum_replace(p.l4_off + ICMP_CSUM, raw16(cur), raw16(to), 2)?;
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
pub fn rewrite<A: Addr>(ctx: &TcContext, p: &Pkt<A>, to: &CtKeyOf<A>) -> R {
    rewrite_addrs(ctx, p, &to.saddr, &to.daddr)?;
    rewrite_ports(ctx, p, to.sport, to.dport)
}

/// Turns the packet's tuple into what tracker entry `e` says it becomes.
#[inline(always)]
pub fn rewrite_entry<A: Addr>(ctx: &TcContext, p: &Pkt<A>, e: &CtEntryOf<A>) -> R {
    rewrite_addrs(ctx, p, &e.nat_saddr, &e.nat_daddr)?;
    rewrite_ports(ctx, p, e.nat_sport, e.nat_dport)
}

#[inline(always)]
pub fn rewrite_addrs<A: Addr>(ctx: &TcContext, p: &Pkt<A>, saddr: &A, daddr: &A) -> R {
    if *saddr != p.saddr {
        set_addr(ctx, p, true, p.saddr, *saddr)?;
    }
    if *daddr != p.daddr {
        set_addr(ctx, p, false, p.daddr, *daddr)?;
    }
    Ok(())
}

#[inline(always)]
fn rewrite_ports<A: Addr>(ctx: &TcContext, p: &Pkt<A>, sport: u16, dport: u16) -> R {
    if sport != p.sport {
        set_port(ctx, p, true, p.sport, sport)?;
    }
    if dport != p.dport {
        set_port(ctx, p, false, p.dport, dport)?;
    }
    Ok(())
}

/// Rewrites the packet an ICMP error quotes into what its flow's entry `e` says the quoted
/// packet becomes (the entry's reply tuple), folding every changed word, the quoted IPv4
/// checksum included, into the outer ICMP checksum. The quoted L4 checksum is left alone: it
/// is often cut off and receivers do not check it.
#[inline(always)]
pub fn rewrite_quoted<A: Addr>(
    ctx: &TcContext,
    outer: &Pkt<A>,
    inner: &Pkt<A>,
    e: &CtEntryOf<A>,
) -> R {
    let icmp_csum = outer.l4_off + ICMP_CSUM;
    quoted_addr(
        ctx,
        icmp_csum,
        inner.l3_off,
        A::SADDR,
        &inner.saddr,
        &e.nat_daddr,
    )?;
    quoted_addr(
        ctx,
        icmp_csum,
        inner.l3_off,
        A::DADDR,
        &inner.daddr,
        &e.nat_saddr,
    )?;
    // The quoted ICMP echo keeps its identifier at offset 4; TCP/UDP ports at 0 and 2.
    let (sport_off, dport_off) = if inner.proto == A::ICMP {
        (ICMP_ID, ICMP_ID)
    } else {
        (0, 2)
    };
    quoted_port(
        ctx,
        icmp_csum,
        inner.l4_off + sport_off,
        inner.sport,
        e.nat_dport,
    )?;
    quoted_port(
        ctx,
        icmp_csum,
        inner.l4_off + dport_off,
        inner.dport,
        e.nat_sport,
    )?;
    Ok(())
}

#[inline(always)]
fn quoted_addr<A: Addr>(
    ctx: &TcContext,
    icmp_csum: usize,
    inner_l3: usize,
    field: usize,
    from: &A,
    to: &A,
) -> R {
    if from == to {
        return Ok(());
    }
    if !A::V6 {
        let before: [u8; 2] = ctx.load(inner_l3 + IP_CSUM)?;
        ctx.l3_csum_replace(inner_l3 + IP_CSUM, from.word(0), to.word(0), 4)?;
        let after: [u8; 2] = ctx.load(inner_l3 + IP_CSUM)?;
        ctx.l4_csum_replace(
            icmp_csum,
            u16::from_ne_bytes(before) as u64,
            u16::from_ne_bytes(after) as u64,
            2,
        )?;
    }
    ctx.store(inner_l3 + field, to, 0)?;
    for i in 0..A::WORDS {
        let (f, t) = (from.word(i), to.word(i));
        if f != t {
            ctx.l4_csum_replace(icmp_csum, f, t, 4)?;
        }
    }
    Ok(())
}

#[inline(always)]
fn quoted_port(ctx: &TcContext, icmp_csum: usize, off: usize, from: u16, to: u16) -> R {
    if from == to {
        return Ok(());
    }
    ctx.store(off, &to.to_be_bytes(), 0)?;
    ctx.l4_csum_replace(icmp_csum, raw16(from), raw16(to), 2)
}

/// Sets the Ethernet addresses (before a redirect into a container).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> R {
    // One helper call for both: each store makes the skb writable again.
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    ctx.store(0, &macs, 0)?;
    Ok(())
}
