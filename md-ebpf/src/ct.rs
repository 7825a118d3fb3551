//! Connection tracker: two entries per flow (original tuple, reply tuple), each saying what a
//! packet with that tuple becomes. Entries carry their own expiry, refreshed on both halves by
//! every packet, so a dead flow is a miss even before anyone deletes it; the LRU map bounds
//! the total and md-user collects what expired.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use md_common::{
    Config, CtEntry, CtKey, CT_DIR_ORIGINAL, CT_DIR_REPLY, IPPROTO_ICMP, IPPROTO_TCP, TCP_CLOSING,
    TCP_ESTABLISHED, TCP_FIN_ORIGINAL, TCP_FIN_REPLY, TCP_NONE, TCP_SYN_SENT,
};

use crate::{
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    CONNTRACK,
};

/// How many ports SNAT tries before giving up on a flow (Cilium uses 32-128).
const NAT_PORT_TRIES: u32 = 32;

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// A live entry for `key`.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    if unsafe { (*e).expires_ns } <= now {
        return None;
    }
    Some(e)
}

#[inline(always)]
fn lifetime_ns(cfg: &Config, proto: u8, state: u8) -> u64 {
    let secs = match (proto, state) {
        (IPPROTO_TCP, TCP_SYN_SENT) => cfg.ct_tcp_syn_secs,
        (IPPROTO_TCP, TCP_CLOSING) => cfg.ct_tcp_closing_secs,
        (IPPROTO_TCP, _) => cfg.ct_tcp_established_secs,
        (IPPROTO_ICMP, _) => cfg.ct_icmp_secs,
        _ => cfg.ct_udp_secs,
    };
    secs as u64 * 1_000_000_000
}

/// TCP state of a flow's first packet. A flow picked up mid-stream gets the short SYN lifetime
/// too until the other side answers, so stray ACKs cannot fill the tracker for hours.
#[inline(always)]
pub fn initial_state(p: &Pkt) -> u8 {
    if p.proto != IPPROTO_TCP {
        TCP_NONE
    } else if p.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        TCP_CLOSING
    } else {
        TCP_SYN_SENT
    }
}

#[inline(always)]
fn next_state(state: u8, dir: u8, flags: u8) -> u8 {
    let fin_here = if dir == CT_DIR_ORIGINAL {
        TCP_FIN_ORIGINAL
    } else {
        TCP_FIN_REPLY
    };
    if flags & TCP_RST != 0 {
        // Shorten the lifetime, don't delete: the last segments must still pass.
        TCP_CLOSING
    } else if flags & TCP_FIN != 0 {
        // Closing only once both sides sent FIN: a half-closed flow may stay quiet for long.
        match state {
            TCP_CLOSING => TCP_CLOSING,
            TCP_FIN_ORIGINAL | TCP_FIN_REPLY if state != fin_here => TCP_CLOSING,
            _ => fin_here,
        }
    } else if state == TCP_CLOSING
        && dir == CT_DIR_ORIGINAL
        && flags & TCP_SYN != 0
        && flags & TCP_ACK == 0
    {
        // A SYN on a closing flow starts it again.
        TCP_SYN_SENT
    } else if state == TCP_SYN_SENT && dir == CT_DIR_REPLY && flags & TCP_ACK != 0 {
        TCP_ESTABLISHED
    } else {
        state
    }
}

/// Accounts a packet to its live entry and refreshes both halves of the flow.
#[inline(always)]
pub fn touch(e: *mut CtEntry, p: &Pkt, now: u64, cfg: &Config) {
    let entry = unsafe { &mut *e };
    let state = if p.proto == IPPROTO_TCP {
        next_state(entry.tcp_state, entry.dir, p.tcp_flags)
    } else {
        TCP_NONE
    };
    let expires = now + lifetime_ns(cfg, p.proto, state);
    entry.tcp_state = state;
    entry.expires_ns = expires;
    entry.packets += 1;
    entry.bytes += p.len as u64;
    // The other half is keyed by what this packet becomes, reversed.
    let partner = entry.nat_tuple(p.proto).reversed();
    match CONNTRACK.get_ptr_mut(&partner) {
        Some(other) => unsafe {
            (*other).tcp_state = state;
            (*other).expires_ns = expires;
        },
        // LRU eviction (or a collector racing us) took the reply half: put it back, or the
        // answers of a live flow would go nowhere. It leads back to this packet's tuple.
        None if entry.dir == CT_DIR_ORIGINAL => {
            let mut back = self::entry(
                &p.key().reversed(),
                entry.kind,
                CT_DIR_REPLY,
                entry.hook,
                entry.ifindex,
                0,
            );
            back.tcp_state = state;
            back.expires_ns = expires;
            let _ = CONNTRACK.insert(&partner, &back, BPF_NOEXIST as u64);
        }
        None => {}
    }
}

/// An entry saying "becomes `nat`".
#[inline(always)]
pub fn entry(nat: &CtKey, kind: u8, dir: u8, hook: u8, ifindex: u32, identity: u32) -> CtEntry {
    CtEntry {
        nat_saddr: nat.saddr,
        nat_daddr: nat.daddr,
        nat_sport: nat.sport,
        nat_dport: nat.dport,
        kind,
        dir,
        tcp_state: 0,
        hook,
        expires_ns: 0,
        packets: 0,
        bytes: 0,
        ifindex,
        identity,
    }
}

/// Both halves of a flow about to be tracked.
pub struct NewFlow {
    pub orig: CtKey,
    pub orig_e: CtEntry,
    pub reply: CtKey,
    pub reply_e: CtEntry,
}

/// Inserts both halves of a new flow with the first packet's state and lifetime. The reply
/// half goes in with NOEXIST: a live entry there belongs to another flow (inserting over it
/// would steal that flow's mapping). Returns 0, or a negative errno on such a clash.
#[inline(never)]
pub fn create(f: &mut NewFlow, p: &Pkt) -> i64 {
    let now = now();
    let Some(cfg) = crate::config() else {
        return -1;
    };
    let state = initial_state(p);
    let expires = now + lifetime_ns(cfg, p.proto, state);
    f.orig_e.tcp_state = state;
    f.orig_e.expires_ns = expires;
    f.orig_e.packets = 1;
    f.orig_e.bytes = p.len as u64;
    f.reply_e.tcp_state = state;
    f.reply_e.expires_ns = expires;
    if CONNTRACK
        .insert(&f.reply, &f.reply_e, BPF_NOEXIST as u64)
        .is_err()
    {
        if let Some(old) = CONNTRACK.get_ptr(&f.reply) {
            if unsafe { (*old).expires_ns } > now {
                return -17;
            }
        }
        if let Err(e) = CONNTRACK.insert(&f.reply, &f.reply_e, BPF_ANY as u64) {
            return e as i64;
        }
    }
    if let Err(e) = CONNTRACK.insert(&f.orig, &f.orig_e, BPF_ANY as u64) {
        let _ = CONNTRACK.remove(&f.reply);
        return e as i64;
    }
    0
}

/// Picks a source port (or ICMP identifier) for a translated flow whose original half says
/// "becomes (nat address, port)" and whose reply tuple carries that port as destination.
/// Starts at a random port in CONFIG's range and steps on clashes.
#[inline(always)]
pub fn create_with_port(f: &mut NewFlow, p: &Pkt) -> Option<u16> {
    let cfg = crate::config()?;
    let min = cfg.nat_port_min as u32;
    let span = (cfg.nat_port_max as u32).saturating_sub(min) + 1;
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..NAT_PORT_TRIES {
        let port = (min + (start + i) % span) as u16;
        f.reply.dport = port;
        f.orig_e.nat_sport = port;
        if create(f, p) == 0 {
            return Some(port);
        }
    }
    None
}
