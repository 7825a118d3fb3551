//! Where a packet goes once md has decided about it. In the stack datapath it goes on through
//! the bridge and the host's IP stack; in the redirect datapath (CONFIG.datapath) md delivers
//! it itself, as Cilium's host routing does:
//! - into a container with `bpf_redirect_peer` (from TC ingress: uplink or another container's
//!   veth), MACs rewritten first (a frame still carrying the uplink's MACs would be dropped as
//!   PACKET_OTHERHOST), counted here because the container's veth egress program is skipped;
//! - from a container to the uplink the FIB names with `bpf_redirect` to its egress, where the
//!   uplink program still masquerades; what the FIB cannot resolve at once (no neighbour yet,
//!   too big for the way out) is left to the stack, which sorts it out for the next packets.
//!
//! Only unicast to a container or from one to a routed destination is redirected; host-local,
//! broadcast and multicast traffic always takes the stack. Policy a redirect skips (the target
//! veth's egress) is only about group-addressed frames: unicast was checked at the sender.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
    EbpfContext,
};
use md_common::{Config, Endpoint, DATAPATH_REDIRECT, DROP_MALFORMED};

use crate::{
    csum,
    family::Addr,
    nat::Verdict,
    parse::{Pkt, ETH_HLEN},
    stats, NETWORKS,
};

#[inline(always)]
pub fn redirecting(cfg: &Config) -> bool {
    cfg.datapath == DATAPATH_REDIRECT
}

/// Counts a packet md delivers into container `ep` itself.
#[inline(always)]
fn count_in(ctx: &TcContext, ep: &Endpoint) {
    let len = ctx.len() as u64;
    stats::count(ep.ifindex, |s| {
        s.ingress_packets += 1;
        s.ingress_bytes += len;
        s.redirected += 1;
    });
}

/// Delivers an Ethernet frame whose destination is (now) container `ep`, with the gateway as
/// its source, as if the host had routed it (`routed`: the TTL goes down by one). From TC
/// ingress in the redirect datapath: straight into the container's namespace; otherwise out
/// of its host-side veth, whose egress program counts it. A TTL (hop limit) that would reach 0
/// is left to the stack, which sends the ICMP time-exceeded.
#[inline(always)]
pub fn into_container<A: Addr>(
    ctx: &TcContext,
    cfg: &Config,
    ep: &Endpoint,
    from_ingress: bool,
    routed: bool,
) -> Verdict {
    let Some(net) = (unsafe { NETWORKS.get(ep.net_id) }) else {
        return Verdict::Pass;
    };
    if routed {
        match A::hop_down(ctx, ETH_HLEN) {
            Ok(true) => {}
            Ok(false) => return Verdict::Pass,
            Err(_) => return Verdict::Drop(DROP_MALFORMED),
        }
    }
    if csum::set_macs(ctx, &ep.mac, &net.gateway_mac).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    if from_ingress && redirecting(cfg) {
        count_in(ctx, ep);
        return Verdict::Redirect(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32);
    }
    Verdict::Redirect(unsafe { bpf_redirect(ep.ifindex, 0) } as i32)
}

/// Redirect datapath, at an uplink's ingress: a packet just translated for container `daddr`
/// goes straight into it. Layer-3 uplinks (no Ethernet header to rewrite) and anything that is
/// not a container's take the stack.
#[inline(always)]
pub fn inbound<A: Addr>(ctx: &TcContext, cfg: &Config, l3: usize, daddr: &A) -> Verdict {
    if !redirecting(cfg) || l3 != ETH_HLEN {
        return Verdict::Pass;
    }
    match crate::nat::endpoint(daddr) {
        Some(ep) => into_container::<A>(ctx, cfg, &ep, true, true),
        None => Verdict::Pass,
    }
}

/// Redirect datapath, at a container's veth ingress: a frame for a container of the same
/// network (addressed to its MAC: no routing involved) goes straight into it.
#[inline(always)]
pub fn between_containers(ctx: &TcContext, cfg: &Config, dst: &Endpoint) -> Verdict {
    if !redirecting(cfg) {
        return Verdict::Pass;
    }
    let Ok(mac) = ctx.load::<[u8; 6]>(0) else {
        return Verdict::Pass;
    };
    if mac != dst.mac {
        return Verdict::Pass;
    }
    count_in(ctx, dst);
    Verdict::Redirect(unsafe { bpf_redirect_peer(dst.ifindex, 0) } as i32)
}

/// Redirect datapath, at a container's veth ingress: a packet from container `src` to a
/// routed destination goes straight to the egress of the interface the FIB names (as if the
/// bridge had handed it to the host and the host had routed it).
#[inline(never)]
pub fn outbound<A: Addr>(ctx: &TcContext, p: &Pkt<A>, src: &Endpoint) -> Verdict {
    let Some(net) = (unsafe { NETWORKS.get(src.net_id) }) else {
        return Verdict::Pass;
    };
    // Only frames sent to the gateway are routed (broadcast and multicast are not, whatever
    // the FIB says about their address).
    if ctx.load::<[u8; 6]>(0).ok() != Some(net.gateway_mac) {
        return Verdict::Pass;
    }
    let bridge_ifindex = net.bridge_ifindex;
    let mut slot = core::mem::MaybeUninit::uninit();
    let f = crate::route::zeroed_in::<bpf_fib_lookup>(&mut slot);
    f.l4_protocol = p.proto;
    f.sport = p.sport.to_be();
    f.dport = p.dport.to_be();
    f.ifindex = bridge_ifindex;
    A::fib_set(f, Some(&p.saddr), &p.daddr);
    let ret = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.as_ptr(),
            f,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Verdict::Pass;
    }
    match A::hop_down(ctx, ETH_HLEN) {
        Ok(true) => {}
        Ok(false) => return Verdict::Pass,
        Err(_) => return Verdict::Drop(DROP_MALFORMED),
    }
    if csum::set_macs(ctx, &f.dmac, &f.smac).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    let ifindex = f.ifindex;
    stats::count(src.ifindex, |s| s.redirected += 1);
    Verdict::Redirect(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
