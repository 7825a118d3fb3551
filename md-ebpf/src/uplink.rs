//! The uplink. Masquerade happens at egress, after the host routed the packet (SNAT earlier
//! would hand the stack a forwarded packet with a local source, dropped as martian); its
//! answers are translated back at ingress, before the stack looks at them. Published ports
//! are translated at ingress too, and their answers at egress.

use aya_ebpf::programs::TcContext;
use md_common::{Config, CT_HOOK_UPLINK, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED};

use crate::{
    csum, ct,
    nat::{self, Verdict},
    parse::{self, Parsed, Pkt, L4},
};

#[inline(always)]
pub fn ingress(ctx: &TcContext, cfg: &Config) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse(ctx) else {
        return Verdict::Pass;
    };
    match p.l4 {
        L4::IcmpError => match nat::icmp_error(ctx, &p, CT_HOOK_UPLINK, false) {
            Some(v) => v,
            None => unsolicited(&p),
        },
        L4::Ports => {
            if let Some(v) = tracked(ctx, &p, cfg) {
                return v;
            }
            // Loopback never is a host address here: a packet from the wire addressed to
            // 127.0.0.1 must not reach a port published on 127.0.0.1.
            if nat::is_host_addr(&p.daddr) && nat::opens_flow(&p) {
                if let Some(target) = nat::port_lookup(&p.daddr, p.dport, p.proto) {
                    return nat::dnat_from_uplink(ctx, &p, target);
                }
            }
            unsolicited(&p)
        }
        L4::Opaque => unsolicited(&p),
    }
}

/// A packet of a flow translated at the uplink (either way): rewrite it as its entry says.
#[inline(always)]
fn tracked(ctx: &TcContext, p: &Pkt, cfg: &Config) -> Option<Verdict> {
    let now = ct::now();
    let e = ct::lookup(&p.key(), now)?;
    let entry = unsafe { *e };
    if entry.hook != CT_HOOK_UPLINK {
        return None;
    }
    ct::touch(e, p, now, cfg);
    if csum::rewrite(ctx, p, &entry.nat_tuple(p.proto)).is_err() {
        return Some(Verdict::Drop(md_common::DROP_MALFORMED));
    }
    Some(Verdict::Pass)
}

/// What the uplink lets through untranslated. Containers are reached from outside only
/// through published ports (as Docker 28 does): a packet routed straight to a container
/// address is dropped, and so is one claiming to come from a container.
#[inline(always)]
fn unsolicited(p: &Pkt) -> Verdict {
    if nat::endpoint(&p.saddr).is_some() {
        return Verdict::Drop(DROP_SPOOF);
    }
    if nat::endpoint(&p.daddr).is_some() {
        return Verdict::Drop(DROP_UNSOLICITED);
    }
    Verdict::Pass
}

#[inline(always)]
pub fn egress(ctx: &TcContext, cfg: &Config) -> Verdict {
    let Parsed::Ipv4(p) = parse::parse(ctx) else {
        return Verdict::Pass;
    };
    if p.l4 == L4::IcmpError {
        // An error from a container about a flow translated here; other errors from a
        // container are dropped below like anything else without ports.
        if let Some(v) = nat::icmp_error(ctx, &p, CT_HOOK_UPLINK, true) {
            return v;
        }
    } else if p.l4 == L4::Ports {
        if let Some(v) = tracked(ctx, &p, cfg) {
            return v;
        }
    }
    // A container's packet leaving the host: masquerade, or drop what cannot be translated
    // (fragments, protocols without ports) rather than leak a container address.
    let Some(src) = nat::endpoint(&p.saddr) else {
        return Verdict::Pass;
    };
    if p.l4 != L4::Ports || p.fragment {
        return Verdict::Drop(DROP_UNSUPPORTED);
    }
    nat::snat(ctx, &p, &src, cfg.uplink_ip)
}
