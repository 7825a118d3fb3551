//! Per-interface counters and datapath events.

use md_common::{Event, Event6, IfStats, Ip4, Ip6};

use crate::{family::Addr, parse::Pkt, EVENTS, IF_STATS};

#[inline(always)]
pub fn count(ifindex: u32, f: impl FnOnce(&mut IfStats)) {
    if let Some(s) = IF_STATS.get_ptr_mut(ifindex) {
        f(unsafe { &mut *s });
    }
}

/// Sends an event to `md-user monitor`; dropped silently when the ring is full. Written in place
/// in the ring (reserve/submit), not built on the stack. IPv6 packets make an [`Event6`].
#[inline(always)]
pub fn emit<A: Addr>(kind: u8, reason: u8, ifindex: u32, p: &Pkt<A>, nat_addr: A, nat_port: u16) {
    A::emit(kind, reason, ifindex, p, nat_addr, nat_port)
}

#[inline(always)]
pub fn emit4(kind: u8, reason: u8, ifindex: u32, p: &Pkt<Ip4>, nat_addr: Ip4, nat_port: u16) {
    let Some(mut slot) = EVENTS.reserve(0) else {
        return;
    };
    slot.write(Event {
        ts_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        kind,
        reason,
        proto: p.proto,
        _pad: 0,
        ifindex,
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        nat_addr,
        nat_port,
        _pad2: 0,
        _pad3: 0,
    });
    slot.submit(0);
}

#[inline(always)]
pub fn emit6(kind: u8, reason: u8, ifindex: u32, p: &Pkt<Ip6>, nat_addr: Ip6, nat_port: u16) {
    let Some(mut slot) = EVENTS.reserve_untyped::<Event6>(0) else {
        return;
    };
    slot.write(Event6 {
        ts_ns: crate::ct::now(),
        kind,
        reason,
        proto: p.proto,
        _pad: 0,
        ifindex,
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        nat_addr,
        nat_port,
        _pad2: 0,
    });
    slot.submit(0);
}
