//! Fragmented datagrams (Cilium's ipfrag.h): the first fragment carries the ports and is
//! translated like any packet, and remembered; later fragments carry no L4 header and get the
//! addresses their first fragment got. Fragments that arrive before their first one are not
//! translated.

use aya_ebpf::programs::TcContext;

use crate::{
    csum, ct,
    family::Addr,
    parse::{Frag, Pkt},
};

/// Linux keeps an incomplete datagram 30 s (ipfrag_time).
const FRAG_LIFETIME_NS: u64 = 30_000_000_000;

/// After a first fragment was translated to `saddr` → `daddr`: its followers get the same
/// addresses (FRAGS, FRAGS6: keyed by the datagram's addresses, identification and protocol).
#[inline(always)]
pub fn remember<A: Addr>(p: &Pkt<A>, saddr: &A, daddr: &A) {
    if p.frag != Frag::First {
        return;
    }
    A::frag_put(p, *saddr, *daddr, ct::now() + FRAG_LIFETIME_NS);
}

/// A later fragment of a translated datagram: rewrites its addresses. None when its first
/// fragment was not translated here (or not seen).
#[inline(always)]
pub fn follow<A: Addr>(ctx: &TcContext, p: &Pkt<A>) -> Option<Result<(), i64>> {
    if p.frag != Frag::Later {
        return None;
    }
    let (saddr, daddr, expires_ns) = A::frag_get(p)?;
    if expires_ns <= ct::now() {
        return None;
    }
    Some(csum::rewrite_addrs(ctx, p, &saddr, &daddr))
}
