//! Connection tracker: two entries per flow (original tuple, reply tuple), each saying what a
//! packet with that tuple becomes. Entries carry their own expiry, refreshed on both halves by
//! every packet, so a dead flow is a miss even before anyone deletes it.
//!
//! New flows start in CONNTRACK_NEW and move to CONNTRACK once answered (TCP: handshake
//! complete; UDP/ICMP: a reply seen). Both are LRU maps, so a flood of flows that are never
//! answered (spoofed SYNs) only evicts its own kind, never an answered flow (Linux conntrack
//! drops unassured entries first for the same reason).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
};
use md_common::{
    Config, CtEntryOf, CtKeyOf, CT_DIR_ORIGINAL, CT_DIR_REPLY, IPPROTO_TCP, TCP_CLOSING,
    TCP_ESTABLISHED, TCP_FIN_ORIGINAL, TCP_FIN_REPLY, TCP_NONE, TCP_SYN_RECV, TCP_SYN_SENT,
};

use crate::{
    family::Addr,
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// How far a flow's other half may lag behind in lifetime before a packet refreshes it
/// (measured from what this half last gave it: `partner_expires_ns`).
const REFRESH_NS: u64 = 1_000_000_000;

/// How many ports SNAT tries before giving up on a flow (Cilium uses 32-128).
const NAT_PORT_TRIES: u32 = 32;

/// The tracker's clock: CLOCK_MONOTONIC at tick resolution. Lifetimes are seconds, and the
/// precise clock reads the TSC, which costs a VM more than the rest of a lookup.
#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A live entry and the map it lives in.
#[derive(Clone, Copy)]
pub struct Found<A> {
    pub e: *mut CtEntryOf<A>,
    /// In CONNTRACK (answered) rather than CONNTRACK_NEW (CONNTRACK6 and CONNTRACK6_NEW).
    pub answered: bool,
}

#[inline(always)]
fn live<A>(e: *mut CtEntryOf<A>, now: u64) -> bool {
    unsafe { (*e).expires_ns > now }
}

/// A live entry for `key`, answered flows first.
#[inline(always)]
pub fn lookup<A: Addr>(key: &CtKeyOf<A>, now: u64) -> Option<Found<A>> {
    if let Some(e) = A::ct_get(true, key) {
        if live(e, now) {
            return Some(Found { e, answered: true });
        }
    }
    let e = A::ct_get(false, key)?;
    if !live(e, now) {
        return None;
    }
    Some(Found { e, answered: false })
}

#[inline(always)]
fn lifetime_ns<A: Addr>(cfg: &Config, proto: u8, state: u8) -> u64 {
    let secs = match (proto, state) {
        // Unanswered flows keep the short lifetime whatever else they send (a SYN then a FIN
        // must not hold an entry for hours).
        (IPPROTO_TCP, TCP_SYN_SENT | TCP_SYN_RECV) => cfg.ct_tcp_syn_secs,
        (IPPROTO_TCP, TCP_CLOSING) => cfg.ct_tcp_closing_secs,
        (IPPROTO_TCP, _) => cfg.ct_tcp_established_secs,
        (p, _) if p == A::ICMP => cfg.ct_icmp_secs,
        _ => cfg.ct_udp_secs,
    };
    secs as u64 * 1_000_000_000
}

/// TCP state of a flow's first packet. A flow picked up mid-stream gets the short SYN lifetime
/// too until the other side answers, so stray ACKs cannot fill the tracker for hours.
#[inline(always)]
pub fn initial_state<A>(p: &Pkt<A>) -> u8 {
    if p.proto != IPPROTO_TCP {
        TCP_NONE
    } else if p.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        TCP_CLOSING
    } else {
        TCP_SYN_SENT
    }
}

/// `a` is at or after `b` in sequence space.
#[inline(always)]
fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Whether a RST from the direction `me` describes hits the receiver's window edge: its sequence
/// number lies between what the receiver last acknowledged and what this side has sent, or it
/// acknowledges exactly what the receiver sent (the answer to a SYN). A blind RST has to guess
/// a 32-bit number; without the other half there is nothing to check against.
#[inline(always)]
fn rst_in_window<A>(p: &Pkt<A>, me: &CtEntryOf<A>, other: Option<*mut CtEntryOf<A>>) -> bool {
    let Some(o) = other else {
        return true;
    };
    let (o_ack, o_next) = unsafe { ((*o).ack, (*o).seq_next) };
    if p.tcp_flags & TCP_ACK != 0 && o_next != 0 && p.ack_seq == o_next {
        return true;
    }
    if o_ack == 0 {
        return false;
    }
    let hi = if me.seq_next != 0 && seq_ge(me.seq_next, o_ack) {
        me.seq_next
    } else {
        o_ack
    };
    seq_ge(p.seq, o_ack) && seq_ge(hi, p.seq)
}

#[inline(always)]
fn next_state<A>(
    state: u8,
    dir: u8,
    p: &Pkt<A>,
    me: &CtEntryOf<A>,
    other: Option<*mut CtEntryOf<A>>,
) -> u8 {
    let flags = p.tcp_flags;
    if flags & TCP_RST != 0 {
        // Shorten the lifetime, don't delete: the last segments must still pass. A RST off the
        // window changes nothing (the receiver drops it too).
        return if rst_in_window(p, me, other) {
            TCP_CLOSING
        } else {
            state
        };
    }
    let mut s = state;
    if s == TCP_SYN_SENT && dir == CT_DIR_REPLY && flags & TCP_ACK != 0 {
        s = TCP_SYN_RECV;
    } else if s == TCP_SYN_RECV
        && dir == CT_DIR_ORIGINAL
        && flags & TCP_ACK != 0
        && flags & TCP_SYN == 0
    {
        s = TCP_ESTABLISHED;
    }
    if flags & TCP_FIN != 0 {
        // Closing only once both sides sent FIN: a half-closed flow may stay quiet for long.
        let fin_here = if dir == CT_DIR_ORIGINAL {
            TCP_FIN_ORIGINAL
        } else {
            TCP_FIN_REPLY
        };
        s = match s {
            TCP_ESTABLISHED => fin_here,
            TCP_FIN_ORIGINAL | TCP_FIN_REPLY if s != fin_here => TCP_CLOSING,
            _ => s,
        };
    } else if s == TCP_CLOSING
        && dir == CT_DIR_ORIGINAL
        && flags & TCP_SYN != 0
        && flags & TCP_ACK == 0
    {
        // A SYN on a closing flow starts it again.
        s = TCP_SYN_SENT;
    }
    s
}

/// Records how far this direction has sent and acknowledged (TCP).
#[inline(always)]
fn track_seq<A>(me: &mut CtEntryOf<A>, p: &Pkt<A>) {
    if p.tcp_flags & TCP_RST != 0 {
        return;
    }
    let end = p.seq.wrapping_add(p.seq_len);
    if me.seq_next == 0 || !seq_ge(me.seq_next, end) {
        me.seq_next = end;
    }
    if p.tcp_flags & TCP_ACK != 0 && (me.ack == 0 || !seq_ge(me.ack, p.ack_seq)) {
        me.ack = p.ack_seq;
    }
}

#[inline(always)]
fn answered_by(proto: u8, state: u8, dir: u8) -> bool {
    if proto == IPPROTO_TCP {
        matches!(state, TCP_ESTABLISHED | TCP_FIN_ORIGINAL | TCP_FIN_REPLY)
    } else {
        dir == CT_DIR_REPLY
    }
}

/// Accounts a packet to its live entry (found under `p.tuple`) and refreshes both halves of the
/// flow; the flow moves to CONNTRACK when this packet answers it.
#[inline(never)]
pub fn touch<A: Addr>(f: Found<A>, p: &Pkt<A>, now: u64, cfg: &Config) {
    let entry = unsafe { &mut *f.e };
    // The other half is keyed by what this packet becomes, reversed. It is looked up only when
    // something needs it: a RST to check against its window, a flow not answered yet, a state
    // change, or its lifetime falling a second behind what this half last gave it (not behind
    // this half's previous expiry: packets under a second apart would then never refresh it,
    // and a one-way flow's reply half would die under a live original half); a steady flow
    // costs one lookup a packet.
    let partner = entry.reply_tuple(p.proto);
    let rst = p.proto == IPPROTO_TCP && p.tcp_flags & TCP_RST != 0;
    // Null for none: an Option's pointer is undefined when None, and the verifier refuses
    // the spill of an undefined register once the pointer lives across a call.
    let mut other = if rst || !f.answered {
        other_half(f.answered, &partner, &p.tuple).unwrap_or(core::ptr::null_mut())
    } else {
        core::ptr::null_mut()
    };
    let state = if p.proto == IPPROTO_TCP {
        let known = (!other.is_null()).then_some(other);
        let s = next_state(entry.tcp_state, entry.dir, p, entry, known);
        track_seq(entry, p);
        s
    } else {
        TCP_NONE
    };
    let expires = now + lifetime_ns::<A>(cfg, p.proto, state);
    let refresh = !f.answered
        || rst
        || state != entry.tcp_state
        || expires > entry.partner_expires_ns.saturating_add(REFRESH_NS);
    entry.tcp_state = state;
    entry.expires_ns = expires;
    entry.packets += 1;
    entry.bytes += p.len as u64;
    if !refresh {
        return;
    }
    if other.is_null() {
        other = other_half(f.answered, &partner, &p.tuple).unwrap_or(core::ptr::null_mut());
    }
    // Answered now: both halves move to CONNTRACK as found above (the other one only if it
    // leads back here), without looking them up again.
    let promoting = !f.answered && answered_by(p.proto, state, entry.dir);
    match (!other.is_null()).then_some(other) {
        Some(o) => unsafe {
            (*o).tcp_state = state;
            (*o).expires_ns = expires;
            (*o).partner_expires_ns = expires;
            if promoting {
                promote(&partner, o);
            }
        },
        // Put back where the flow is headed.
        None if entry.dir == CT_DIR_ORIGINAL => {
            restore_reply(f.answered || promoting, &partner, entry, p)
        }
        None => {}
    }
    entry.partner_expires_ns = expires;
    if promoting {
        promote(&p.tuple, f.e);
    }
}

/// The entry under a flow's partner tuple, if it is the flow's other half: it leads back to
/// `key`. After LRU evicted a half, another flow may hold the tuple (F5 in the README); its
/// entry is not ours to refresh or promote.
#[inline(always)]
fn other_half<A: Addr>(
    answered: bool,
    partner: &CtKeyOf<A>,
    key: &CtKeyOf<A>,
) -> Option<*mut CtEntryOf<A>> {
    let o = A::ct_get(answered, partner)?;
    (unsafe { (*o).reply_tuple(key.proto) } == *key).then_some(o)
}

/// LRU eviction (or a collector racing us) took a flow's reply half: put it back, or the
/// answers of a live flow would go nowhere. It leads back to the tuple of `p`, the original
/// direction's packet. Out of line, and built in the per-CPU scratch slot: its entry must not
/// cost every packet's stack.
#[inline(never)]
fn restore_reply<A: Addr>(answered: bool, partner: &CtKeyOf<A>, orig: &CtEntryOf<A>, p: &Pkt<A>) {
    let Some(scratch) = A::scratch() else {
        return;
    };
    let back = unsafe { &mut (*scratch).reply_e };
    fill(
        back,
        &p.reply,
        orig.kind,
        CT_DIR_REPLY,
        orig.hook,
        orig.ifindex,
        0,
    );
    back.tcp_state = orig.tcp_state;
    back.expires_ns = orig.expires_ns;
    back.partner_expires_ns = orig.expires_ns;
    let _ = A::ct_insert(answered, partner, back, BPF_NOEXIST as u64);
}

/// Moves one half of a flow, `e` under `key`, from CONNTRACK_NEW to CONNTRACK.
#[inline(never)]
fn promote<A: Addr>(key: &CtKeyOf<A>, e: *mut CtEntryOf<A>) {
    let copy = unsafe { *e };
    if A::ct_insert(true, key, &copy, BPF_ANY as u64).is_ok() {
        A::ct_remove(false, key);
    }
}

#[inline(always)]
fn fill<A: Copy>(
    e: &mut CtEntryOf<A>,
    nat: &CtKeyOf<A>,
    kind: u8,
    dir: u8,
    hook: u8,
    ifindex: u32,
    identity: u32,
) {
    e.nat_saddr = nat.saddr;
    e.nat_daddr = nat.daddr;
    e.nat_sport = nat.sport;
    e.nat_dport = nat.dport;
    e.kind = kind;
    e.dir = dir;
    e.tcp_state = 0;
    e.hook = hook;
    e.ifindex = ifindex;
    e.identity = identity;
    // Volatile: neighbouring zero stores are otherwise merged into calls to the eBPF side's
    // byte-at-a-time memset, on every new flow.
    unsafe {
        core::ptr::write_volatile(&mut e.expires_ns, 0);
        core::ptr::write_volatile(&mut e.packets, 0);
        core::ptr::write_volatile(&mut e.bytes, 0);
        core::ptr::write_volatile(&mut e.seq_next, 0);
        core::ptr::write_volatile(&mut e.ack, 0);
        core::ptr::write_volatile(&mut e.partner_expires_ns, 0);
    }
}

/// Both halves of a new flow about to be tracked. Built in a per-CPU scratch slot
/// (FLOW_SCRATCH, FLOW_SCRATCH6), not on the 512-byte stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NewFlow<A> {
    pub orig: CtKeyOf<A>,
    pub orig_e: CtEntryOf<A>,
    pub reply: CtKeyOf<A>,
    pub reply_e: CtEntryOf<A>,
    /// What the new flow's packets become: set by the caller (see [`nat_tuple`]) before
    /// [`open`], which fills in the source port it picks.
    pub nat: CtKeyOf<A>,
}

/// The tuple a new flow's packets are to become, in the scratch slot [`open`] reads it from
/// (and leaves the chosen port in): None only if the per-CPU slot is missing.
#[inline(always)]
pub fn nat_tuple<A: Addr>(
    saddr: &A,
    daddr: &A,
    sport: u16,
    dport: u16,
    proto: u8,
) -> Option<*const CtKeyOf<A>> {
    let f = A::scratch()?;
    let nat = unsafe { &mut (*f).nat };
    crate::parse::set_tuple(nat, saddr, daddr, sport, dport, proto);
    Some(nat)
}

/// How a new flow's translated source port is chosen.
pub const PORT_KEEP: u8 = 0;
/// Keep it when its reply tuple is free, else take one from the NAT range (Linux NAT does the
/// same: two flows of one client port to two addresses of one published port must not share a
/// reply tuple).
pub const PORT_KEEP_OR_REMAP: u8 = 1;
/// Always from the NAT range (masquerade, hairpin to oneself).
pub const PORT_ALLOCATE: u8 = 2;

/// What a new flow is, besides its tuples.
pub struct Spec {
    pub kind: u8,
    pub hook: u8,
    pub port: u8,
    /// Host-side veth the original direction is counted on; the reply's.
    pub orig_ifindex: u32,
    pub reply_ifindex: u32,
    /// Identity the original direction is headed to; the reply's.
    pub orig_identity: u32,
    pub reply_identity: u32,
}

/// Tracks a new flow whose packets (`p`'s tuple) become the scratch slot's `nat` (set with
/// [`nat_tuple`]), and their answers the reverse. With PORT_KEEP_OR_REMAP/PORT_ALLOCATE,
/// `nat.sport` is set to the port chosen. Returns false when no reply tuple is free (a clash
/// with a live flow, or NAT ports exhausted).
#[inline(never)]
pub fn open<A: Addr>(p: &Pkt<A>, spec: &Spec) -> bool {
    let Some(f) = A::scratch() else {
        return false;
    };
    let f = unsafe { &mut *f };
    // Field by field into the scratch slot: keys and entries built on the stack first would
    // cost the call chain their size twice.
    f.orig = p.tuple;
    let n = &f.nat;
    crate::parse::set_tuple(&mut f.reply, &n.daddr, &n.saddr, n.dport, n.sport, n.proto);
    fill(
        &mut f.orig_e,
        &f.nat,
        spec.kind,
        CT_DIR_ORIGINAL,
        spec.hook,
        spec.orig_ifindex,
        spec.orig_identity,
    );
    fill(
        &mut f.reply_e,
        &p.reply,
        spec.kind,
        CT_DIR_REPLY,
        spec.hook,
        spec.reply_ifindex,
        spec.reply_identity,
    );
    if spec.port != PORT_ALLOCATE && create(f, p) == 0 {
        return true;
    }
    if spec.port == PORT_KEEP {
        return false;
    }
    match create_with_port(f, p) {
        Some(port) => {
            f.nat.sport = port;
            true
        }
        None => false,
    }
}

/// Inserts both halves of a new flow (into CONNTRACK_NEW) with the first packet's state and
/// lifetime. The reply half goes in with NOEXIST: a live entry there, in either map, belongs to
/// another flow (inserting over it would steal that flow's mapping). Returns 0, or a negative
/// errno on such a clash.
#[inline(never)]
fn create<A: Addr>(f: &mut NewFlow<A>, p: &Pkt<A>) -> i64 {
    let now = now();
    let Some(cfg) = crate::config() else {
        return -1;
    };
    if let Some(e) = A::ct_get(true, &f.reply) {
        if live(e, now) {
            return -17;
        }
    }
    let state = initial_state(p);
    let expires = now + lifetime_ns::<A>(cfg, p.proto, state);
    f.orig_e.tcp_state = state;
    f.orig_e.expires_ns = expires;
    f.orig_e.partner_expires_ns = expires;
    f.orig_e.packets = 1;
    f.orig_e.bytes = p.len as u64;
    if p.proto == IPPROTO_TCP {
        track_seq(&mut f.orig_e, p);
    }
    f.reply_e.tcp_state = state;
    f.reply_e.expires_ns = expires;
    f.reply_e.partner_expires_ns = expires;
    if A::ct_insert(false, &f.reply, &f.reply_e, BPF_NOEXIST as u64).is_err() {
        if let Some(old) = A::ct_get(false, &f.reply) {
            if live(old, now) {
                return -17;
            }
        }
        if let Err(e) = A::ct_insert(false, &f.reply, &f.reply_e, BPF_ANY as u64) {
            return e as i64;
        }
    }
    if let Err(e) = A::ct_insert(false, &f.orig, &f.orig_e, BPF_ANY as u64) {
        A::ct_remove(false, &f.reply);
        return e as i64;
    }
    0
}

/// The state of a NAT port search, shared with [`try_port`] through bpf_loop.
struct PortSearch<A> {
    f: *mut NewFlow<A>,
    p: *const Pkt<A>,
    min: u32,
    span: u32,
    start: u32,
    /// The port found, or 0.
    found: u32,
}

/// One try of the NAT port search: port `min + (start + i) % span`; stops the loop (1) when
/// the flow went in with it.
extern "C" fn try_port<A: Addr>(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let s = unsafe { &mut *(ctx as *mut PortSearch<A>) };
    if s.span == 0 {
        return 1;
    }
    let port = (s.min + (s.start.wrapping_add(i as u32)) % s.span) as u16;
    let (f, p) = unsafe { (&mut *s.f, &*s.p) };
    f.reply.dport = port;
    f.orig_e.nat_sport = port;
    if create(f, p) == 0 {
        s.found = port as u32;
        return 1;
    }
    0
}

/// Picks a source port (or ICMP identifier) for a translated flow whose original half says
/// "becomes (nat address, port)" and whose reply tuple carries that port as destination.
/// Starts at a random port in CONFIG's range and steps on clashes. The tries run under
/// bpf_loop: an unrolled loop would have the verifier walk `create` once per try.
#[inline(always)]
fn create_with_port<A: Addr>(f: &mut NewFlow<A>, p: &Pkt<A>) -> Option<u16> {
    let cfg = crate::config()?;
    let min = cfg.nat_port_min as u32;
    let span = (cfg.nat_port_max as u32)
        .saturating_sub(min)
        .saturating_add(1);
    let mut s = PortSearch {
        f,
        p,
        min,
        span,
        start: unsafe { bpf_get_prandom_u32() } % span,
        found: 0,
    };
    unsafe {
        bpf_loop(
            NAT_PORT_TRIES,
            try_port::<A> as *mut core::ffi::c_void,
            &mut s as *mut PortSearch<A> as *mut core::ffi::c_void,
            0,
        )
    };
    (s.found != 0).then_some(s.found as u16)
}
