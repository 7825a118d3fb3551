//! The container's host-side veth.
//! Ingress of the veth = packets leaving the container: anti-spoofing, policy, hairpin DNAT.
//! Egress of the veth = packets entering the container: counting, and policy for what the
//! bridge floods (broadcast, multicast), which has no single destination to check at ingress.
//! Both families go through the same code (`A`: `Ip4` or `Ip6`); IPv6's link plumbing (NDP,
//! MLD) is screened first (`ndp`).

use aya_ebpf::programs::TcContext;
use md_common::{
    Config, Endpoint, CT_DIR_ORIGINAL, CT_HOOK_VETH, CT_KIND_NONE, DROP_ISOLATION, DROP_MALFORMED,
    DROP_POLICY, DROP_SPOOF,
};

use crate::{
    csum,
    ct::{self, Spec},
    family::Addr,
    frag, fwd,
    nat::{self, Verdict},
    ndp,
    parse::{self, Pkt, L4},
    policy, route, tunnel, VETH_OWNERS,
};

/// What a container sends. ICMP errors come back as [`Verdict::Icmp`]: the entry point hands
/// them to [`icmp`], on a stack frame of their own (the verifier allows 512 bytes for a whole
/// call chain).
#[inline(never)]
pub fn ingress<A: Addr>(ctx: &TcContext, ifindex: u32, cfg: &Config) -> Verdict {
    match parse::packet::<A>(ctx, parse::ETH_HLEN) {
        Some(p) => match A::screen(ctx, ifindex, p) {
            Some(v) => v,
            None => from_container(ctx, ifindex, p, cfg),
        },
        None => Verdict::Drop(DROP_MALFORMED),
    }
}

/// Anti-spoofing: the source address must be this port's container, with its MAC.
#[inline(always)]
pub fn sender<A: Addr>(ctx: &TcContext, ifindex: u32, p: &Pkt<A>) -> Option<Endpoint> {
    match nat::endpoint(&p.saddr) {
        Some(ep) if ep.ifindex == ifindex && Some(ep.mac) == parse::eth_src(ctx) => Some(ep),
        _ => None,
    }
}

/// An ICMP error a container sends. About a tracked flow, it goes where the quoted packet came
/// from, the flow's peer, so isolation and policy apply as to that peer; otherwise it is
/// checked like any packet to its destination.
#[inline(never)]
pub fn icmp<A: Addr>(ctx: &TcContext, ifindex: u32, cfg: &Config) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, parse::ETH_HLEN) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    let Some(src) = sender(ctx, ifindex, p) else {
        return Verdict::Drop(DROP_SPOOF);
    };
    if let Some(f) = nat::icmp_error_flow(ctx, p, CT_HOOK_VETH, true) {
        if let Some(dst) = nat::endpoint(&f.e.nat_daddr) {
            if f.e.kind == CT_KIND_NONE && dst.net_id != src.net_id {
                return Verdict::Drop(DROP_ISOLATION);
            }
            if f.e.dir == CT_DIR_ORIGINAL && !policy::allowed(cfg, src.identity, dst.identity) {
                return Verdict::Drop(DROP_POLICY);
            }
        }
        return nat::translate_icmp_error(ctx, p, &f);
    }
    match nat::endpoint(&p.daddr) {
        Some(dst) => between(&src, &dst, cfg).unwrap_or(Verdict::Pass),
        None => Verdict::Pass,
    }
}

/// Network isolation and policy from one container to another: a drop, or None.
#[inline(always)]
fn between(src: &Endpoint, dst: &Endpoint, cfg: &Config) -> Option<Verdict> {
    if dst.net_id != src.net_id {
        return Some(Verdict::Drop(DROP_ISOLATION));
    }
    if !policy::allowed(cfg, src.identity, dst.identity) {
        return Some(Verdict::Drop(DROP_POLICY));
    }
    None
}

/// Returns the verdict and the interface a drop is counted on: the sender's, as at ingress.
/// Unicast to this container was checked where it entered; anything else a container sent
/// that reaches this one (broadcast, multicast, or a frame whose IP destination is not this
/// container's, e.g. a broadcast address in a unicast frame) is checked here, per receiver.
///
/// NDP and MLD pass whoever sent them, as ARP does: the sender was checked where it entered.
#[inline(always)]
pub fn egress<A: Addr>(ctx: &TcContext, ifindex: u32, cfg: &Config) -> (Verdict, u32) {
    let Some(p) = parse::packet::<A>(ctx, parse::ETH_HLEN) else {
        return (Verdict::Pass, ifindex);
    };
    if ndp::link_plumbing(p) {
        return (Verdict::Pass, ifindex);
    }
    let Some(me) = (unsafe { VETH_OWNERS.get(ifindex) }) else {
        return (Verdict::Pass, ifindex);
    };
    if A::is_owner(&p.daddr, me, ifindex) {
        return (Verdict::Pass, ifindex);
    }
    let Some(src) = nat::endpoint(&p.saddr) else {
        return (Verdict::Pass, ifindex);
    };
    if src.net_id != me.net_id {
        return (Verdict::Drop(DROP_ISOLATION), src.ifindex);
    }
    if !policy::allowed(cfg, src.identity, me.identity) {
        return (Verdict::Drop(DROP_POLICY), src.ifindex);
    }
    (Verdict::Pass, ifindex)
}

/// ARP from a container must claim its own address and MAC, or it could steal another's.
#[inline(never)]
pub fn check_arp(ctx: &TcContext, ifindex: u32) -> Verdict {
    let (Some((sha, spa)), Some(eth_src)) = (parse::arp_sender(ctx), parse::eth_src(ctx)) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    match nat::endpoint(&spa) {
        Some(ep) if ep.ifindex == ifindex && ep.mac == sha && ep.mac == eth_src => Verdict::Pass,
        _ => Verdict::Drop(DROP_SPOOF),
    }
}

#[inline(always)]
fn from_container<A: Addr>(ctx: &TcContext, ifindex: u32, p: &Pkt<A>, cfg: &Config) -> Verdict {
    let Some(src) = sender(ctx, ifindex, p) else {
        return Verdict::Drop(DROP_SPOOF);
    };
    if p.l4 == L4::IcmpError {
        return Verdict::Icmp;
    }
    if p.l4 == L4::Ports {
        let now = ct::now();
        if let Some(f) = ct::lookup(&p.tuple, now) {
            let e = unsafe { &*f.e };
            if e.hook != CT_HOOK_VETH {
                // Translated at the uplink (masquerade, or an answer to an outside client):
                // on its way there, to an address that is neither the host's nor md's.
                return if fwd::redirecting(cfg) {
                    leave(ctx, p, &src, f, now, cfg)
                } else {
                    Verdict::Pass
                };
            }
            if e.dir == CT_DIR_ORIGINAL && !policy::allowed(cfg, src.identity, e.identity) {
                return Verdict::Drop(DROP_POLICY);
            }
            ct::touch(f, p, now, cfg);
            if e.kind == CT_KIND_NONE {
                // Issue 17: a flow to a container on another host goes on through the overlay.
                return tunnel::onward(ctx, cfg, p, &src);
            }
            if csum::rewrite_entry(ctx, p, e).is_err() {
                return Verdict::Drop(DROP_MALFORMED);
            }
            return nat::deliver(ctx, &e.nat_daddr);
        }
        if nat::is_host_addr(&p.daddr) && nat::opens_flow(p) {
            let target = nat::port_lookup(&p.daddr, p.dport, p.proto, true);
            let reserved = target.is_some_and(|t| route::runtime_reserved::<A>(t));
            if reserved || !route::host_socket(ctx, p.proto, p.saddr, p.sport, p.daddr, p.dport) {
                if let Some(target) = target {
                    let (t_ip, _, identity) = A::target(target);
                    // An internal network reaches no other network, published ports
                    // included (Docker drops what it forwards to another bridge).
                    if nat::internal(src.net_id)
                        && nat::endpoint(&t_ip).map(|d| d.net_id) != Some(src.net_id)
                    {
                        return Verdict::Drop(DROP_ISOLATION);
                    }
                    if !policy::allowed(cfg, src.identity, identity) {
                        return Verdict::Drop(DROP_POLICY);
                    }
                    return nat::dnat_from_container(ctx, p, &src, target);
                }
                return Verdict::Pass;
            }
        }
    }
    if let Some(dst) = nat::endpoint(&p.daddr) {
        return match to_container(p, &src, &dst, cfg) {
            Verdict::Pass => fwd::between_containers(ctx, cfg, &dst),
            v => v,
        };
    }
    // Issue 17: a container on another host of an overlay network.
    if tunnel::remote(&p.daddr).is_some() {
        return Verdict::Overlay;
    }
    outbound(ctx, p, &src, cfg)
}

/// A container's packet for a routed destination: straight to the uplink's egress in the
/// redirect datapath, through the bridge and the host stack otherwise.
#[inline(always)]
fn outbound<A: Addr>(ctx: &TcContext, p: &Pkt<A>, src: &Endpoint, cfg: &Config) -> Verdict {
    if fwd::redirecting(cfg)
        && !p.daddr.link_scoped()
        && !nat::is_host_addr(&p.daddr)
        && !nat::in_md_subnet(&p.daddr)
    {
        return fwd::outbound(ctx, p, src);
    }
    Verdict::Pass
}

/// Redirect datapath: a packet of flow `f`, translated at the uplink, on its way there. When
/// the FIB sends it straight to the uplink, its half of the flow is applied here (the uplink's
/// egress then lets it by, [`md_common::MARK_TRANSLATED`]): one tracker lookup on the way out, not
/// two. Otherwise (no way out yet, or the half that comes in) the uplink does as it always
/// does.
#[inline(always)]
fn leave<A: Addr>(
    ctx: &TcContext,
    p: &Pkt<A>,
    src: &Endpoint,
    f: ct::Found<A>,
    now: u64,
    cfg: &Config,
) -> Verdict {
    let v = fwd::outbound(ctx, p, src);
    let e = unsafe { &*f.e };
    if !matches!(v, Verdict::Redirect(_)) || crate::uplink::inbound_half(e) {
        return v;
    }
    ct::touch(f, p, now, cfg);
    if csum::rewrite_entry(ctx, p, e).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    frag::remember(p, &e.nat_saddr, &e.nat_daddr);
    ctx.set_mark(md_common::MARK_TRANSLATED);
    v
}

/// Container → container on md's bridges: network isolation, policy, and tracking so answers
/// to an allowed flow pass even where the other direction is denied. A published port of a
/// routed network is open to the containers of other (not internal) networks too, on the
/// container's own address (Docker's direct routing in `routed` mode).
#[inline(always)]
fn to_container<A: Addr>(p: &Pkt<A>, src: &Endpoint, dst: &Endpoint, cfg: &Config) -> Verdict {
    if dst.net_id != src.net_id && !nat::internal(src.net_id) && routed_port(p) {
        if !policy::allowed(cfg, src.identity, dst.identity) {
            return Verdict::Drop(DROP_POLICY);
        }
    } else if let Some(drop) = between(src, dst, cfg) {
        return drop;
    }
    if p.l4 == L4::Ports && ct::nat_tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto).is_some() {
        let spec = Spec {
            kind: CT_KIND_NONE,
            hook: CT_HOOK_VETH,
            port: ct::PORT_KEEP,
            orig_ifindex: src.ifindex,
            reply_ifindex: dst.ifindex,
            orig_identity: dst.identity,
            reply_identity: src.identity,
        };
        // A clash only means the flow is already known the other way round.
        let _ = ct::open(p, &spec);
    }
    Verdict::Pass
}

/// Whether `p` goes to a port its destination publishes on a routed network (keyed by the
/// container's own address and port).
#[inline(always)]
fn routed_port<A: Addr>(p: &Pkt<A>) -> bool {
    p.l4 == L4::Ports
        && nat::routed(&p.daddr)
        && nat::port_lookup(&p.daddr, p.dport, p.proto, false).is_some()
}
