//! Translations: published ports (DNAT), masquerade (SNAT), hairpin, and ICMP errors that
//! quote a translated packet. Each creates both tracker halves, then rewrites the packet.

use aya_ebpf::programs::TcContext;
use md_common::{
    CtEntryOf, Endpoint, PortKeyOf, CT_HOOK_UPLINK, CT_HOOK_VETH, CT_KIND_DNAT, CT_KIND_HAIRPIN,
    CT_KIND_ROUTED, CT_KIND_SNAT, DROP_MALFORMED, DROP_NAT_PORTS, EVENT_NAT, HOST_ADDR_GATEWAY,
    NET_INTERNAL, NET_ROUTED4, NET_ROUTED6, RESOLVER_PORT,
};

use crate::{
    csum,
    ct::{self, Spec},
    family::Addr,
    frag, fwd,
    parse::{Pkt, L4, TCP_ACK, TCP_SYN},
    stats, NETWORKS,
};

/// What the hook should do with the packet.
pub enum Verdict {
    Pass,
    Redirect(i32),
    Drop(u8),
    /// An ICMP error: the entry point runs the hook's ICMP handler on a frame of its own.
    Icmp,
    /// Between a container here and one on another host (issue 17): the entry point hands it
    /// to `tunnel`, on a frame of its own.
    Overlay,
}

/// The published port a packet to `ip`:`port` reaches: a mapping bound to that exact address
/// wins over one published on every host address, which answers only on the host's own
/// addresses (`wildcard_ok`: the caller checked that `ip` is one). A network's resolver
/// (gateway:53) is never translated, whatever is published on 53.
#[inline(always)]
pub fn port_lookup<A: Addr>(
    ip: &A,
    port: u16,
    proto: u8,
    wildcard_ok: bool,
) -> Option<*mut A::Target> {
    if port == RESOLVER_PORT && is_gateway(ip) {
        return None;
    }
    if let Some(t) = A::port(PortKeyOf::new(*ip, port, proto)) {
        return Some(t);
    }
    if !wildcard_ok {
        return None;
    }
    A::port(PortKeyOf::new(A::default(), port, proto))
}

/// Whether a packet may open a translated flow: for TCP only a SYN. Anything else to a
/// published port is an answer to a connection the host itself made from that port.
#[inline(always)]
pub fn opens_flow<A>(p: &Pkt<A>) -> bool {
    p.proto != md_common::IPPROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
pub fn is_host_addr<A: Addr>(ip: &A) -> bool {
    A::host_flags(ip).is_some()
}

#[inline(always)]
fn is_gateway<A: Addr>(ip: &A) -> bool {
    A::host_flags(ip).is_some_and(|f| f & HOST_ADDR_GATEWAY != 0)
}

/// Whether `ip` lies in one of md's networks (a container's, the gateway's, or an unused one).
#[inline(always)]
pub fn in_md_subnet<A: Addr>(ip: &A) -> bool {
    A::subnet(ip).is_some()
}

/// The NETWORKS flags of the md network `ip` lies in (its gateway modes); None outside md's
/// networks.
#[inline(always)]
pub fn network_flags<A: Addr>(ip: &A) -> Option<u32> {
    let id = A::subnet(ip)?;
    Some(unsafe { NETWORKS.get(id) }.map_or(0, |n| n.flags))
}

/// The flag that routes (rather than masquerades) family `A` of a network.
#[inline(always)]
pub fn routed_flag<A: Addr>() -> u32 {
    if A::V6 {
        NET_ROUTED6
    } else {
        NET_ROUTED4
    }
}

/// Whether network `net_id` is internal: nothing of it leaves, nor reaches another network.
#[inline(always)]
pub fn internal(net_id: u32) -> bool {
    unsafe { NETWORKS.get(net_id) }.is_some_and(|n| n.flags & NET_INTERNAL != 0)
}

/// Whether `ip` lies in a network whose family `A` is routed, not masqueraded.
#[inline(always)]
pub fn routed<A: Addr>(ip: &A) -> bool {
    network_flags(ip).is_some_and(|f| f & routed_flag::<A>() != 0)
}

#[inline(always)]
pub fn endpoint<A: Addr>(ip: &A) -> Option<Endpoint> {
    A::endpoint(ip)
}

/// Hands a frame whose destination is (now) a container to it (see [`fwd::into_container`]):
/// translated at a container's veth ingress, not routed by the host (no TTL change).
#[inline(always)]
pub fn deliver<A: Addr>(ctx: &TcContext, daddr: &A) -> Verdict {
    let (Some(ep), Some(cfg)) = (endpoint(daddr), crate::config()) else {
        return Verdict::Pass;
    };
    fwd::into_container::<A>(ctx, cfg, &ep, true, false)
}

#[inline(always)]
fn count_dnat<A: Addr>(ip: &A, target: *mut A::Target) {
    A::count_hit(target);
    if let Some(ep) = endpoint(ip) {
        stats::count(ep.ifindex, |s| s.dnat += 1);
    }
}

/// Outside → a published port on a host address (at uplink ingress). The answer is translated
/// back at uplink egress. On a routed network the "port" is the container's own address and
/// port, and the tuple stays as it is.
#[inline(always)]
pub fn dnat_from_uplink<A: Addr>(ctx: &TcContext, p: &Pkt<A>, target: *mut A::Target) -> Verdict {
    let (t_ip, t_port, t_identity) = A::target(target);
    let Some(nat) = ct::nat_tuple(&p.saddr, &t_ip, p.sport, t_port, p.proto) else {
        return Verdict::Drop(DROP_NAT_PORTS);
    };
    let spec = Spec {
        kind: CT_KIND_DNAT,
        hook: CT_HOOK_UPLINK,
        port: ct::PORT_KEEP_OR_REMAP,
        orig_ifindex: 0,
        reply_ifindex: 0,
        orig_identity: t_identity,
        reply_identity: 0,
    };
    if !ct::open(p, &spec) {
        return Verdict::Drop(DROP_NAT_PORTS);
    }
    count_dnat(&t_ip, target);
    stats::emit(EVENT_NAT, CT_KIND_DNAT, 0, p, t_ip, t_port);
    let nat = unsafe { &*nat };
    if csum::rewrite(ctx, p, nat).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    frag::remember(p, &nat.saddr, &nat.daddr);
    match crate::config() {
        Some(cfg) => fwd::inbound::<A>(ctx, cfg, p.l3_off, &nat.daddr),
        None => Verdict::Pass,
    }
}

/// A container → a published port through a host address (hairpin, at the container's veth
/// ingress). The target answers the caller directly, so the reverse translation happens at
/// the target's veth. A container calling its own port would see its own address as the
/// source, which Linux drops: that case is also translated to come from the gateway.
#[inline(always)]
pub fn dnat_from_container<A: Addr>(
    ctx: &TcContext,
    p: &Pkt<A>,
    src: &Endpoint,
    target: *mut A::Target,
) -> Verdict {
    let (t_ip, t_port, t_identity) = A::target(target);
    let (nat, kind, port) = if t_ip == p.saddr {
        let Some(net) = (unsafe { NETWORKS.get(src.net_id) }) else {
            return Verdict::Drop(DROP_MALFORMED);
        };
        (
            ct::nat_tuple(&A::gateway(net), &t_ip, 0, t_port, p.proto),
            CT_KIND_HAIRPIN,
            ct::PORT_ALLOCATE,
        )
    } else {
        (
            ct::nat_tuple(&p.saddr, &t_ip, p.sport, t_port, p.proto),
            CT_KIND_DNAT,
            ct::PORT_KEEP_OR_REMAP,
        )
    };
    let Some(nat) = nat else {
        return Verdict::Drop(DROP_NAT_PORTS);
    };
    let spec = Spec {
        kind,
        hook: CT_HOOK_VETH,
        port,
        orig_ifindex: src.ifindex,
        reply_ifindex: src.ifindex,
        orig_identity: t_identity,
        reply_identity: src.identity,
    };
    if !ct::open(p, &spec) {
        return Verdict::Drop(DROP_NAT_PORTS);
    }
    count_dnat(&t_ip, target);
    stats::emit(EVENT_NAT, CT_KIND_DNAT, src.ifindex, p, t_ip, t_port);
    let nat = unsafe { &*nat };
    if csum::rewrite(ctx, p, nat).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    deliver(ctx, &nat.daddr)
}

/// A container's new flow leaving the host: masquerade behind `uplink_ip` (the address the
/// host's routing picks for the way out) with a port from md's NAT range. `src` is None for an
/// address of an md subnet that is no container (the gateway, a stale address).
#[inline(always)]
pub fn snat<A: Addr>(ctx: &TcContext, p: &Pkt<A>, src: Option<Endpoint>, uplink_ip: A) -> Verdict {
    let (ifindex, identity) = src.map(|s| (s.ifindex, s.identity)).unwrap_or((0, 0));
    let Some(nat) = ct::nat_tuple(&uplink_ip, &p.daddr, 0, p.dport, p.proto) else {
        return Verdict::Drop(DROP_NAT_PORTS);
    };
    let spec = Spec {
        kind: CT_KIND_SNAT,
        hook: CT_HOOK_UPLINK,
        port: ct::PORT_ALLOCATE,
        orig_ifindex: ifindex,
        reply_ifindex: ifindex,
        orig_identity: 0,
        reply_identity: identity,
    };
    if !ct::open(p, &spec) {
        return Verdict::Drop(DROP_NAT_PORTS);
    }
    let nat = unsafe { &*nat };
    stats::count(ifindex, |s| s.snat += 1);
    stats::emit(EVENT_NAT, CT_KIND_SNAT, ifindex, p, uplink_ip, nat.sport);
    if csum::rewrite(ctx, p, nat).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    frag::remember(p, &nat.saddr, &nat.daddr);
    Verdict::Pass
}

/// Tracks a routed network's flow leaving by an uplink, untranslated, so its answers pass
/// (like a masqueraded flow's: the original half goes out).
#[inline(always)]
pub fn routed_out<A: Addr>(p: &Pkt<A>, ep: Option<Endpoint>) {
    let (ifindex, identity) = ep.map(|s| (s.ifindex, s.identity)).unwrap_or((0, 0));
    if ct::nat_tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto).is_none() {
        return;
    }
    let spec = Spec {
        kind: CT_KIND_ROUTED,
        hook: CT_HOOK_UPLINK,
        port: ct::PORT_KEEP,
        orig_ifindex: ifindex,
        reply_ifindex: ifindex,
        orig_identity: 0,
        reply_identity: identity,
    };
    // A clash only means the flow is already known the other way round.
    let _ = ct::open(p, &spec);
}

/// Tracks a new flow from outside into container `ep` of a routed network, untranslated (an
/// ICMP echo: its ports go through [`dnat_from_uplink`] with their own address and port).
#[inline(always)]
pub fn routed_in<A: Addr>(p: &Pkt<A>, ep: &Endpoint) {
    if ct::nat_tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto).is_none() {
        return;
    }
    let spec = Spec {
        kind: CT_KIND_DNAT,
        hook: CT_HOOK_UPLINK,
        port: ct::PORT_KEEP,
        orig_ifindex: ep.ifindex,
        reply_ifindex: ep.ifindex,
        orig_identity: ep.identity,
        reply_identity: 0,
    };
    let _ = ct::open(p, &spec);
}

/// An ICMP error about a translated flow: the quoted packet is that flow's packet as it was
/// sent, so the reversed quote is a tracker key for packets travelling the error's way. The
/// quote is translated back and the outer header with it (destination = the quote's source;
/// the source too when the error comes from the quoted destination itself).
/// Returns None when the error is about no flow md translated at `hook`.
#[inline(always)]
pub fn icmp_error<A: Addr>(
    ctx: &TcContext,
    outer: &Pkt<A>,
    hook: u8,
    from_container: bool,
) -> Option<Verdict> {
    let e = icmp_error_flow(ctx, outer, hook, from_container)?;
    Some(translate_icmp_error(ctx, outer, &e))
}

/// The flow an ICMP error is about.
pub struct QuotedFlow<A: 'static> {
    /// The quoted packet (its IP header at `inner.l3_off`).
    pub inner: &'static Pkt<A>,
    /// The tracker entry of the quoted packet's flow half. Its reply tuple is what the quoted
    /// packet becomes (its source is where the error goes); not copied, for the stack's sake.
    pub e: &'static CtEntryOf<A>,
}

/// Finds the tracked flow an ICMP error quotes. A container is no router: its errors are only
/// about packets sent to it (`from_container`), or it could aim them at anyone's flows.
#[inline(always)]
pub fn icmp_error_flow<A: Addr>(
    ctx: &TcContext,
    outer: &Pkt<A>,
    hook: u8,
    from_container: bool,
) -> Option<QuotedFlow<A>> {
    let inner_l3 = outer.l4_off + 8;
    let inner = crate::parse::quote::<A>(ctx, inner_l3)?;
    if inner.l4 != L4::Ports || (from_container && inner.daddr != outer.saddr) {
        return None;
    }
    let f = ct::lookup(&inner.reply, ct::now())?;
    let e = unsafe { &*f.e };
    if e.hook != hook {
        return None;
    }
    Some(QuotedFlow { inner, e })
}

#[inline(always)]
pub fn translate_icmp_error<A: Addr>(
    ctx: &TcContext,
    outer: &Pkt<A>,
    f: &QuotedFlow<A>,
) -> Verdict {
    let (inner, e) = (f.inner, f.e);
    if csum::rewrite_quoted(ctx, outer, inner, e).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    // To where the quoted packet came from; from where it went, when the error comes from
    // its destination itself.
    let daddr = e.nat_daddr;
    if daddr != outer.daddr && csum::set_addr(ctx, outer, false, outer.daddr, daddr).is_err() {
        return Verdict::Drop(DROP_MALFORMED);
    }
    if outer.saddr == inner.daddr
        && e.nat_saddr != outer.saddr
        && csum::set_addr(ctx, outer, true, outer.saddr, e.nat_saddr).is_err()
    {
        return Verdict::Drop(DROP_MALFORMED);
    }
    if e.hook == CT_HOOK_VETH {
        deliver(ctx, &daddr)
    } else {
        Verdict::Pass
    }
}
