//! The host's interfaces other than md's own (every NIC, VPN and bridge md did not make; md
//! calls them uplinks). Masquerade happens at egress, after the host routed the packet (SNAT
//! earlier would hand the stack a forwarded packet with a local source, dropped as martian);
//! its answers are translated back at ingress, before the stack looks at them. Published ports
//! are translated at ingress too, and their answers at egress. `l3` is where the IP header
//! starts: 14 behind Ethernet, 0 on a layer-3 device (tun, WireGuard).
//!
//! Both families go through the same code (`A`: `Ip4` or `Ip6`). IPv6 adds link-scoped
//! traffic (NDP, multicast, link-local), which is the host's and passes.
//!
//! Each network's gateway mode (its NETWORKS flags, one routed flag per family) decides how
//! it meets the uplinks: `nat` masquerades; `routed` flows leave untranslated and outside
//! clients reach its containers directly, on their published ports only; an internal network
//! (`--internal`, `isolated`) neither leaves nor is reached, in either family.

use aya_ebpf::programs::TcContext;
use md_common::{
    Config, CtEntryOf, CT_DIR_REPLY, CT_HOOK_UPLINK, CT_KIND_ROUTED, CT_KIND_SNAT, DROP_FORWARD,
    DROP_ISOLATION, DROP_MALFORMED, DROP_NO_SOURCE, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED,
    NET_INTERNAL,
};

use crate::{
    csum, ct,
    family::Addr,
    frag, fwd,
    nat::{self, Verdict},
    parse::{self, Frag, Pkt, L4},
    route, tunnel,
};

#[inline(always)]
fn rewritten(r: Result<(), i64>) -> Verdict {
    match r {
        Ok(()) => Verdict::Pass,
        Err(_) => Verdict::Drop(DROP_MALFORMED),
    }
}

/// What arrives on an uplink. ICMP errors come back as [`Verdict::Icmp`] for [`icmp_in`].
#[inline(never)]
pub fn ingress<A: Addr>(ctx: &TcContext, cfg: &Config, l3: usize, ifindex: u32) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, l3) else {
        return Verdict::Pass;
    };
    // An established flow first (its entry can only be an inbound one: see `tracked`), then
    // the source: nothing else from the wire may claim an md address.
    if p.l4 == L4::Ports {
        if let Some(v) = tracked(ctx, p, cfg, Some(l3)) {
            return v;
        }
    }
    // Issue 17: a container on another host of a natively routed overlay network.
    if tunnel::native_peer(&p.saddr) {
        return Verdict::Overlay;
    }
    if nat::in_md_subnet(&p.saddr) {
        return Verdict::Drop(DROP_SPOOF);
    }
    if let Some(r) = frag::follow(ctx, p) {
        return rewritten(r);
    }
    match p.l4 {
        L4::IcmpError => return Verdict::Icmp,
        L4::Ports => {
            // Loopback never is a host address here: a packet from the wire addressed to
            // 127.0.0.1 must not reach a port published on 127.0.0.1.
            if nat::is_host_addr(&p.daddr) && nat::opens_flow(p) {
                if let Some(target) = nat::port_lookup(&p.daddr, p.dport, p.proto, true) {
                    if route::runtime_reserved::<A>(target)
                        || !route::host_socket(ctx, p.proto, p.saddr, p.sport, p.daddr, p.dport)
                    {
                        return nat::dnat_from_uplink(ctx, p, target);
                    }
                }
            } else if nat::opens_flow(p) && nat::routed(&p.daddr) {
                return routed_in(ctx, cfg, p);
            }
        }
        L4::Opaque => {}
    }
    unsolicited(ctx, p, ifindex)
}

/// An ICMP error arriving on an uplink: about a flow translated here, it is translated back;
/// otherwise it is what it is, unsolicited or not.
#[inline(never)]
pub fn icmp_in<A: Addr>(ctx: &TcContext, l3: usize, ifindex: u32) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, l3) else {
        return Verdict::Pass;
    };
    match nat::icmp_error(ctx, p, CT_HOOK_UPLINK, false) {
        Some(v) => v,
        None => unsolicited(ctx, p, ifindex),
    }
}

/// An ICMP error leaving by an uplink: from a container, about a flow translated here.
#[inline(never)]
pub fn icmp_out<A: Addr>(ctx: &TcContext, l3: usize, ifindex: u32) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, l3) else {
        return Verdict::Pass;
    };
    match nat::icmp_error(ctx, p, CT_HOOK_UPLINK, true) {
        Some(v) => v,
        None => leaving(ctx, p, ifindex),
    }
}

/// A packet of a flow translated at the uplink, in the direction it travels here: rewrite it
/// as its entry says; arriving (`l3`: Some), it may then go straight into its container.
/// Inbound only answers of masquerade (and of routed flows) and a published port's client
/// match; outbound the other halves. So a packet from the wire that carries a container's own
/// tuple is no flow of its, and an established flow needs no source check first.
#[inline(always)]
fn tracked<A: Addr>(
    ctx: &TcContext,
    p: &Pkt<A>,
    cfg: &Config,
    l3: Option<usize>,
) -> Option<Verdict> {
    let now = ct::now();
    let f = ct::lookup(&p.tuple, now)?;
    let e = unsafe { &*f.e };
    if e.hook != CT_HOOK_UPLINK {
        return None;
    }
    if inbound_half(e) != l3.is_some() {
        return None;
    }
    ct::touch(f, p, now, cfg);
    if csum::rewrite_entry(ctx, p, e).is_err() {
        return Some(Verdict::Drop(DROP_MALFORMED));
    }
    frag::remember(p, &e.nat_saddr, &e.nat_daddr);
    Some(match l3 {
        Some(l3) => fwd::inbound::<A>(ctx, cfg, l3, &e.nat_daddr),
        None => Verdict::Pass,
    })
}

/// Whether a tracker half translated at the uplink is one that comes in from the wire (rather
/// than leaves by it): masquerade and routed flows start leaving, published ports' start
/// coming in.
#[inline(always)]
pub fn inbound_half<A>(e: &CtEntryOf<A>) -> bool {
    let leaves_first = e.kind == CT_KIND_SNAT || e.kind == CT_KIND_ROUTED;
    leaves_first == (e.dir == CT_DIR_REPLY)
}

/// What arrives untranslated. Containers are reached from outside only through published
/// ports (as Docker 28 does): a packet routed straight to an md address that is not the host's
/// is dropped. Anything else the host would route out again is dropped too: with forwarding on
/// for md, the host must still not become a router between its other interfaces. Link-scoped
/// IPv6 (NDP, multicast, link-local) is the host's own business and never routed.
#[inline(always)]
fn unsolicited<A: Addr>(ctx: &TcContext, p: &Pkt<A>, ifindex: u32) -> Verdict {
    if p.daddr.link_scoped() || nat::is_host_addr(&p.daddr) {
        return Verdict::Pass;
    }
    if nat::in_md_subnet(&p.daddr) {
        return Verdict::Drop(DROP_UNSOLICITED);
    }
    if route::forwarded(ctx, p, ifindex) {
        return Verdict::Drop(DROP_FORWARD);
    }
    Verdict::Pass
}

/// What leaves by an uplink. ICMP errors come back as [`Verdict::Icmp`] for [`icmp_out`].
#[inline(never)]
pub fn egress<A: Addr>(ctx: &TcContext, cfg: &Config, l3: usize, ifindex: u32) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, l3) else {
        return Verdict::Pass;
    };
    if let Some(r) = frag::follow(ctx, p) {
        return rewritten(r);
    }
    if p.l4 == L4::IcmpError {
        return Verdict::Icmp;
    }
    if p.l4 == L4::Ports {
        if let Some(v) = tracked(ctx, p, cfg, None) {
            return v;
        }
    }
    leaving(ctx, p, ifindex)
}

/// An md address leaving the host untracked: masquerade, or drop what cannot be translated
/// (fragments of untranslated datagrams, protocols without ports, errors about no flow of
/// md's) rather than leak it. A routed network's flow leaves as it is, tracked so that its
/// answers come back in; an internal network's does not leave.
#[inline(always)]
fn leaving<A: Addr>(ctx: &TcContext, p: &Pkt<A>, ifindex: u32) -> Verdict {
    let Some(flags) = nat::network_flags(&p.saddr) else {
        return Verdict::Pass;
    };
    if flags & NET_INTERNAL != 0 {
        return Verdict::Drop(DROP_ISOLATION);
    }
    // Issue 17: natively routed to a container on another host: untranslated.
    if tunnel::native_peer(&p.daddr) {
        return Verdict::Pass;
    }
    if p.l4 != L4::Ports || p.frag == Frag::Later {
        return Verdict::Drop(DROP_UNSUPPORTED);
    }
    if flags & nat::routed_flag::<A>() != 0 {
        nat::routed_out(p, nat::endpoint(&p.saddr));
        return Verdict::Pass;
    }
    let Some(addr) = route::masquerade_source(ctx, p, ifindex) else {
        return Verdict::Drop(DROP_NO_SOURCE);
    };
    nat::snat(ctx, p, nat::endpoint(&p.saddr), addr)
}

/// A new flow from outside straight to a container of a routed network: only to a port it
/// published (PORT_MAP/PORT_MAP6 keyed by the container's own address and port) or an ICMP
/// echo request; anything else is unsolicited. Tracked like any flow, so the answers leave
/// untouched.
#[inline(always)]
fn routed_in<A: Addr>(ctx: &TcContext, cfg: &Config, p: &Pkt<A>) -> Verdict {
    if p.proto == A::ICMP {
        let Some(ep) = nat::endpoint(&p.daddr).filter(|_| p.icmp_type == A::ECHO) else {
            return Verdict::Drop(DROP_UNSOLICITED);
        };
        nat::routed_in(p, &ep);
        return fwd::inbound::<A>(ctx, cfg, p.l3_off, &p.daddr);
    }
    match nat::port_lookup(&p.daddr, p.dport, p.proto, false) {
        Some(target) => nat::dnat_from_uplink(ctx, p, target),
        None => Verdict::Drop(DROP_UNSOLICITED),
    }
}
