//! The host's interfaces other than md's own (every NIC, VPN and bridge md did not make; md
//! calls them uplinks). Masquerade happens at egress, after the host routed the packet (SNAT
//! earlier would hand the stack a forwarded packet with a local source, dropped as martian);
//! its answers are translated back at ingress, before the stack looks at them. Published ports
//! are translated at ingress too, and their answers at egress. `l3` is where the IP header
//! starts: 14 behind Ethernet, 0 on a layer-3 device (tun, WireGuard).
//!
//! Each network's gateway mode (its NETWORKS flags) decides how it meets the uplinks: `nat`
//! masquerades; `routed` flows leave untranslated and outside clients reach its containers
//! directly, on their published ports only; an internal network (`--internal`, `isolated`)
//! neither leaves nor is reached.

use aya_ebpf::programs::TcContext;
use md_common::{
    Config, Ip4, CT_DIR_REPLY, CT_HOOK_UPLINK, CT_KIND_ROUTED, CT_KIND_SNAT, DROP_FORWARD,
    DROP_ISOLATION, DROP_MALFORMED, DROP_NO_SOURCE, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED,
    IPPROTO_ICMP, NET_INTERNAL, NET_ROUTED4,
};

use crate::{
    csum, ct, frag, fwd,
    nat::{self, Verdict},
    parse::{self, Frag, Parsed, Pkt, L4},
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
pub fn ingress(ctx: &TcContext, cfg: &Config, l3: usize, ifindex: u32) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse_at(ctx, l3) else {
        return Verdict::Pass;
    };
    // An established flow first (its entry can only be an inbound one: see `tracked`), then
    // the source: nothing else from the wire may claim an md address.
    if p.l4 == L4::Ports {
        if let Some(v) = tracked(ctx, &p, cfg, true) {
            return match v {
                Tracked::To(daddr) => fwd::inbound(ctx, cfg, l3, &daddr),
                Tracked::Done(v) => v,
            };
        }
    }
    // Issue 17: a container on another host of a natively routed overlay network.
    if tunnel::native_peer(&p.saddr) {
        return Verdict::Overlay;
    }
    if nat::in_md_subnet(&p.saddr) {
        return Verdict::Drop(DROP_SPOOF);
    }
    if let Some(r) = frag::follow(ctx, &p) {
        return rewritten(r);
    }
    match p.l4 {
        L4::IcmpError => return Verdict::Icmp,
        L4::Ports => {
            // Loopback never is a host address here: a packet from the wire addressed to
            // 127.0.0.1 must not reach a port published on 127.0.0.1.
            if nat::is_host_addr(&p.daddr) && nat::opens_flow(&p) {
                if let Some(target) = nat::port_lookup(&p.daddr, p.dport, p.proto, true) {
                    if route::runtime_reserved(target)
                        || !route::host_socket(ctx, p.proto, p.saddr, p.sport, p.daddr, p.dport)
                    {
                        return nat::dnat_from_uplink(ctx, &p, target);
                    }
                }
            } else if nat::opens_flow(&p) && nat::routed(&p.daddr) {
                return routed_in(ctx, cfg, &p);
            }
        }
        L4::Opaque => {}
    }
    unsolicited(ctx, &p, ifindex)
}

/// An ICMP error arriving on an uplink: about a flow translated here, it is translated back;
/// otherwise it is what it is, unsolicited or not.
#[inline(never)]
pub fn icmp_in(ctx: &TcContext, l3: usize, ifindex: u32) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse_at(ctx, l3) else {
        return Verdict::Pass;
    };
    match nat::icmp_error(ctx, &p, CT_HOOK_UPLINK, false) {
        Some(v) => v,
        None => unsolicited(ctx, &p, ifindex),
    }
}

/// An ICMP error leaving by an uplink: from a container, about a flow translated here.
#[inline(never)]
pub fn icmp_out(ctx: &TcContext, l3: usize, ifindex: u32) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse_at(ctx, l3) else {
        return Verdict::Pass;
    };
    match nat::icmp_error(ctx, &p, CT_HOOK_UPLINK, true) {
        Some(v) => v,
        None => leaving(ctx, &p, ifindex),
    }
}

/// What [`tracked`] did.
enum Tracked {
    /// Rewritten; the packet now goes to this address.
    To(Ip4),
    Done(Verdict),
}

/// A packet of a flow translated at the uplink, in the direction it travels here: rewrite it
/// as its entry says. Inbound only answers of masquerade and a published port's client
/// match; outbound the other halves. So a packet from the wire that carries a container's own
/// tuple is no flow of its, and an established flow needs no source check first.
#[inline(always)]
fn tracked(ctx: &TcContext, p: &Pkt, cfg: &Config, inbound: bool) -> Option<Tracked> {
    let now = ct::now();
    let f = ct::lookup(&p.key(), now)?;
    let e = unsafe { &*f.e };
    if e.hook != CT_HOOK_UPLINK {
        return None;
    }
    // Masquerade and routed flows start leaving; published ports' start coming in.
    let leaves_first = e.kind == CT_KIND_SNAT || e.kind == CT_KIND_ROUTED;
    let way_in = leaves_first == (e.dir == CT_DIR_REPLY);
    if way_in != inbound {
        return None;
    }
    let to = e.nat_tuple(p.proto);
    ct::touch(f, p, now, cfg);
    if csum::rewrite(ctx, p, &to).is_err() {
        return Some(Tracked::Done(Verdict::Drop(DROP_MALFORMED)));
    }
    frag::remember(p, &to);
    Some(Tracked::To(to.daddr))
}

/// What arrives untranslated. Containers are reached from outside only through published
/// ports (as Docker 28 does): a packet routed straight to an md address that is not the host's
/// is dropped. Anything else the host would route out again is dropped too: with forwarding on
/// for md, the host must still not become a router between its other interfaces.
#[inline(always)]
fn unsolicited(ctx: &TcContext, p: &Pkt, ifindex: u32) -> Verdict {
    if nat::is_host_addr(&p.daddr) {
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
pub fn egress(ctx: &TcContext, cfg: &Config, l3: usize, ifindex: u32) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse_at(ctx, l3) else {
        return Verdict::Pass;
    };
    if let Some(r) = frag::follow(ctx, &p) {
        return rewritten(r);
    }
    if p.l4 == L4::IcmpError {
        return Verdict::Icmp;
    }
    if p.l4 == L4::Ports {
        if let Some(v) = tracked(ctx, &p, cfg, false) {
            return match v {
                Tracked::To(_) => Verdict::Pass,
                Tracked::Done(v) => v,
            };
        }
    }
    leaving(ctx, &p, ifindex)
}

/// An md address leaving the host untracked: masquerade, or drop what cannot be translated
/// (fragments of untranslated datagrams, protocols without ports, errors about no flow of
/// md's) rather than leak it. A routed network's flow leaves as it is, tracked so that its
/// answers come back in; an internal network's does not leave.
#[inline(always)]
fn leaving(ctx: &TcContext, p: &Pkt, ifindex: u32) -> Verdict {
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
    if flags & NET_ROUTED4 != 0 {
        nat::routed_out(p, nat::endpoint(&p.saddr));
        return Verdict::Pass;
    }
    let Some(addr) = route::masquerade_source(ctx, p, ifindex) else {
        return Verdict::Drop(DROP_NO_SOURCE);
    };
    nat::snat(ctx, p, nat::endpoint(&p.saddr), addr)
}

/// A new flow from outside straight to a container of a routed network: only to a port it
/// published (PORT_MAP keyed by the container's own address and port) or an ICMP echo
/// request; anything else is unsolicited. Tracked like any flow, so the answers leave
/// untouched.
#[inline(always)]
fn routed_in(ctx: &TcContext, cfg: &Config, p: &Pkt) -> Verdict {
    if p.proto == IPPROTO_ICMP {
        let Some(ep) = nat::endpoint(&p.daddr).filter(|_| p.icmp_type == parse::ICMP_ECHO) else {
            return Verdict::Drop(DROP_UNSOLICITED);
        };
        nat::routed_in(p, &ep);
        return fwd::inbound(ctx, cfg, p.l3_off, &p.daddr);
    }
    match nat::port_lookup(&p.daddr, p.dport, p.proto, false) {
        Some(target) => nat::dnat_from_uplink(ctx, p, target),
        None => Verdict::Drop(DROP_UNSOLICITED),
    }
}
