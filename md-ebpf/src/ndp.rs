//! What an IPv6 container sends on its link besides ordinary traffic: neighbour discovery and
//! multicast listener reports pass (IPv6's ARP: the bridge and the host need them), checked
//! like ARP is: from the container's own MAC, claiming only its own addresses. A neighbour
//! advertisement for another container's (or the gateway's) address would steal its traffic;
//! router advertisements and redirects would make a container everyone's router
//! (CVE-2020-13401); queries are a router's too. Everything else from a link-local or
//! unspecified source is dropped: container to container over fe80:: would bypass policy.

use aya_ebpf::programs::TcContext;
use md_common::{Endpoint, Ip6, DROP_MALFORMED, DROP_SPOOF, DROP_UNSUPPORTED, NET_IPV6};

use crate::{
    family::{is_link_local6, Addr},
    nat::Verdict,
    parse::{self, Pkt},
    parse6::{
        is_ndp_or_mld, MLD2_REPORT, MLD_DONE, MLD_REPORT, NDP_NEIGH_ADVERT, NDP_NEIGH_SOLICIT,
        NDP_ROUTER_SOLICIT,
    },
    NETWORKS, VETH_OWNERS,
};

/// The link-local address the kernel gives an interface with `mac` (EUI-64, the default
/// addr_gen_mode, which md-user sets on container interfaces).
#[inline(always)]
fn eui64_link_local(mac: &[u8; 6]) -> Ip6 {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// Whether `a` is one of the addresses of `me`, the container behind veth `ifindex`.
#[inline(always)]
fn own(a: &Ip6, me: &Endpoint, ifindex: u32) -> bool {
    *a == eui64_link_local(&me.mac) || Ip6::is_owner(a, me, ifindex)
}

/// IPv6 from the container behind veth `ifindex`: none at all unless its network is
/// dual-stack (md switches IPv6 off in the others' namespaces).
#[inline(always)]
pub fn from_container(ctx: &TcContext, ifindex: u32, p: &Pkt<Ip6>) -> Option<Verdict> {
    let Some(me) = (unsafe { VETH_OWNERS.get(ifindex) }) else {
        return Some(Verdict::Drop(DROP_SPOOF));
    };
    let dual_stack = unsafe { NETWORKS.get(me.net_id) }.is_some_and(|n| n.flags & NET_IPV6 != 0);
    if !dual_stack {
        return Some(Verdict::Drop(DROP_UNSUPPORTED));
    }
    let unspecified = p.saddr == [0; 16];
    if !is_ndp_or_mld(p) {
        if unspecified || is_link_local6(&p.saddr) {
            return Some(Verdict::Drop(DROP_SPOOF));
        }
        return None;
    }
    if parse::eth_src(ctx) != Some(me.mac) || !(unspecified || own(&p.saddr, me, ifindex)) {
        return Some(Verdict::Drop(DROP_SPOOF));
    }
    match p.icmp_type {
        NDP_ROUTER_SOLICIT | NDP_NEIGH_SOLICIT | MLD_REPORT | MLD_DONE | MLD2_REPORT => {
            Some(Verdict::Pass)
        }
        NDP_NEIGH_ADVERT => {
            // The target address follows the 4 bytes of flags.
            let Ok(target) = ctx.load::<Ip6>(p.l4_off + 8) else {
                return Some(Verdict::Drop(DROP_MALFORMED));
            };
            if own(&target, me, ifindex) {
                Some(Verdict::Pass)
            } else {
                Some(Verdict::Drop(DROP_SPOOF))
            }
        }
        _ => Some(Verdict::Drop(DROP_SPOOF)),
    }
}

/// NDP and MLD reach a container whoever sent them (the sender was checked where it entered,
/// as for ARP): policy is about connections, not the link's plumbing.
#[inline(always)]
pub fn link_plumbing<A: Addr>(p: &Pkt<A>) -> bool {
    A::V6
        && p.proto == A::ICMP
        && !matches!(p.l4, parse::L4::Ports | parse::L4::IcmpError)
        && p.icmp_type >= 130
        && p.icmp_type <= 143
}
