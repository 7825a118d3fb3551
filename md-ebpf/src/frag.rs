//! Fragmented datagrams (Cilium's ipfrag.h): the first fragment carries the ports and is
//! translated like any packet, and remembered; later fragments carry no L4 header and get the
//! addresses their first fragment got. Fragments that arrive before their first one are not
//! translated.

use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use md_common::{CtKey, FragEntry, FragKey};

use crate::{
    csum, ct,
    parse::{Frag, Pkt},
    FRAGS,
};

/// Linux keeps an incomplete datagram 30 s (ipfrag_time).
const FRAG_LIFETIME_NS: u64 = 30_000_000_000;

#[inline(always)]
fn key(p: &Pkt) -> FragKey {
    FragKey {
        saddr: p.saddr,
        daddr: p.daddr,
        id: p.ip_id,
        proto: p.proto,
        _pad: 0,
    }
}

/// After a first fragment was translated into `to`: its followers get the same addresses.
#[inline(always)]
pub fn remember(p: &Pkt, to: &CtKey) {
    if p.frag != Frag::First {
        return;
    }
    let e = FragEntry {
        saddr: to.saddr,
        daddr: to.daddr,
        expires_ns: ct::now() + FRAG_LIFETIME_NS,
    };
    let _ = FRAGS.insert(key(p), e, BPF_ANY as u64);
}

/// A later fragment of a translated datagram: rewrites its addresses. None when its first
/// fragment was not translated here (or not seen).
#[inline(always)]
pub fn follow(ctx: &TcContext, p: &Pkt) -> Option<Result<(), i64>> {
    if p.frag != Frag::Later {
        return None;
    }
    let e = unsafe { FRAGS.get(key(p)) }.copied()?;
    if e.expires_ns <= ct::now() {
        return None;
    }
    let mut to = p.key();
    to.saddr = e.saddr;
    to.daddr = e.daddr;
    Some(csum::rewrite(ctx, p, &to))
}
