//! md's datapath: maps and entry points. Entry points only dispatch; the logic lives in one
//! module per attach point (`veth`, `uplink`, `sock`) and shared libraries (`parse`, `csum`,
//! `ct`, `nat`, `policy`, `stats`).
#![no_std]
#![no_main]

mod csum;
mod ct;
mod family;
mod frag;
mod fwd;
mod nat;
mod ndp;
mod parse;
mod parse6;
mod policy;
mod route;
mod sock;
mod stats;
mod tunnel;
mod uplink;
mod veth;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::{btf_map, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use family::Addr;
use md_common::{
    maps as m, Config, CtEntry, CtEntry6, CtKey, CtKey6, Endpoint, Event, FragEntry, FragEntry6,
    FragKey, FragKey6, IfStats, Ip4, Ip6, Network, PolicyKey, PolicyRule, PortKey, PortKey6,
    PortTarget, PortTarget6, Remote, SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, Tunnel,
    DROP_FORWARD, DROP_ISOLATION, DROP_MALFORMED, DROP_NAT_PORTS, DROP_NO_SOURCE, DROP_POLICY,
    DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, EVENT_DROP, EVENT_POLICY,
};
use nat::Verdict;
use parse::Proto;

#[btf_map]
static ENDPOINTS: HashMap<Ip4, Endpoint, { m::ENDPOINTS_MAX }> = HashMap::new();
#[btf_map]
static VETH_OWNERS: HashMap<u32, Endpoint, { m::ENDPOINTS_MAX }> = HashMap::new();
#[btf_map]
static NETWORKS: HashMap<u32, Network, { m::NETWORKS_MAX }> = HashMap::new();
#[btf_map]
static HOST_ADDRS: HashMap<Ip4, u32, { m::HOST_ADDRS_MAX }> = HashMap::new();
#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
static PORT_MAP: HashMap<PortKey, PortTarget, { m::PORT_MAP_MAX }> = HashMap::new();
#[btf_map]
static CONNTRACK: LruHashMap<CtKey, CtEntry, { m::CONNTRACK_MAX }> = LruHashMap::new();
#[btf_map]
static CONNTRACK_NEW: LruHashMap<CtKey, CtEntry, { m::CONNTRACK_NEW_MAX }> = LruHashMap::new();
/// One per CPU: where a new flow's two halves are built (too big for the stack).
#[btf_map]
static FLOW_SCRATCH: PerCpuArray<ct::NewFlow<Ip4>, 1> = PerCpuArray::new();
/// One per CPU: the packet being handled and the one an ICMP error quotes, parsed.
#[btf_map]
static PKT_SCRATCH: PerCpuArray<parse::Pkt<Ip4>, 2> = PerCpuArray::new();
#[btf_map]
static FRAGS: LruHashMap<FragKey, FragEntry, { m::FRAGS_MAX }> = LruHashMap::new();
#[btf_map]
static MD_SUBNETS: LpmTrie<Ip4, u32, { m::NETWORKS_MAX }> = LpmTrie::new();
#[btf_map]
static POLICY: HashMap<PolicyKey, PolicyRule, { m::POLICY_MAX }> = HashMap::new();
#[btf_map]
static IF_STATS: PerCpuHashMap<u32, IfStats, { m::IF_STATS_MAX }, { BPF_F_NO_PREALLOC as usize }> =
    PerCpuHashMap::new();
#[btf_map]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { m::SOCK_REV_MAX }> = LruHashMap::new();
#[btf_map]
static EVENTS: RingBuf<Event, { m::EVENTS_BYTES }> = RingBuf::new();
/// Issue 17: containers on other hosts of overlay networks, and this host's VXLAN device.
#[btf_map]
static REMOTE: HashMap<Ip4, Remote, { m::REMOTE_MAX }> = HashMap::new();
#[btf_map]
static TUNNEL: Array<Tunnel, 1> = Array::new();

// IPv6: the same roles, keyed by 16-byte addresses (md_common::maps).
#[btf_map]
static ENDPOINTS6: HashMap<Ip6, Endpoint, { m::ENDPOINTS_MAX }> = HashMap::new();
#[btf_map]
static HOST_ADDRS6: HashMap<Ip6, u32, { m::HOST_ADDRS_MAX }> = HashMap::new();
#[btf_map]
static PORT_MAP6: HashMap<PortKey6, PortTarget6, { m::PORT_MAP_MAX }> = HashMap::new();
#[btf_map]
static CONNTRACK6: LruHashMap<CtKey6, CtEntry6, { m::CONNTRACK6_MAX }> = LruHashMap::new();
#[btf_map]
static CONNTRACK6_NEW: LruHashMap<CtKey6, CtEntry6, { m::CONNTRACK6_NEW_MAX }> = LruHashMap::new();
#[btf_map]
static FLOW_SCRATCH6: PerCpuArray<ct::NewFlow<Ip6>, 1> = PerCpuArray::new();
#[btf_map]
static PKT_SCRATCH6: PerCpuArray<parse::Pkt<Ip6>, 2> = PerCpuArray::new();
#[btf_map]
static FRAGS6: LruHashMap<FragKey6, FragEntry6, { m::FRAGS_MAX }> = LruHashMap::new();
#[btf_map]
static MD_SUBNETS6: LpmTrie<Ip6, u32, { m::NETWORKS_MAX }> = LpmTrie::new();
#[btf_map]
static SOCK_REV6: LruHashMap<SockRevKey6, SockRevValue6, { m::SOCK_REV_MAX }> = LruHashMap::new();

/// TCX: hand the packet on (to the next program, then the stack).
const TCX_NEXT: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Turns a verdict into a TC return code, counting drops and reporting them.
#[inline(always)]
fn finish(ctx: &TcContext, l3: usize, ifindex: u32, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TCX_NEXT,
        Verdict::Redirect(code) => code,
        Verdict::Drop(reason) => drop_packet(ctx, l3, ifindex, reason),
        // Handled before: an entry point never finishes with them.
        Verdict::Icmp | Verdict::Overlay => TCX_NEXT,
    }
}

/// Counts and reports a drop. Out of line: it parses the packet again for the event, which
/// must not cost the hot paths' stack.
#[inline(never)]
fn drop_packet(ctx: &TcContext, l3: usize, ifindex: u32, reason: u8) -> i32 {
    stats::count(ifindex, |s| match reason {
        DROP_POLICY => s.drop_policy += 1,
        DROP_SPOOF => s.drop_spoof += 1,
        DROP_ISOLATION => s.drop_isolation += 1,
        DROP_UNSUPPORTED => s.drop_unsupported += 1,
        DROP_NAT_PORTS => s.drop_nat_ports += 1,
        DROP_UNSOLICITED => s.drop_unsolicited += 1,
        DROP_FORWARD => s.drop_forward += 1,
        DROP_NO_SOURCE => s.drop_no_source += 1,
        _ => s.drop_malformed += 1,
    });
    let kind = if reason == DROP_POLICY {
        EVENT_POLICY
    } else {
        EVENT_DROP
    };
    match parse::proto_at(ctx, l3) {
        Proto::Ipv4 => report::<Ip4>(ctx, l3, kind, reason, ifindex),
        Proto::Ipv6 => report::<Ip6>(ctx, l3, kind, reason, ifindex),
        _ => {}
    }
    TC_ACT_SHOT
}

#[inline(always)]
fn report<A: Addr>(ctx: &TcContext, l3: usize, kind: u8, reason: u8, ifindex: u32) {
    if let Some(p) = parse::packet::<A>(ctx, l3) {
        stats::emit(kind, reason, ifindex, p, A::default(), 0);
    }
}

/// Ingress of a container's host-side veth: packets the container sends.
#[classifier]
pub fn md_veth_ingress(ctx: TcContext) -> i32 {
    let ifindex = ifindex(&ctx);
    let len = ctx.len() as u64;
    stats::count(ifindex, |s| {
        s.egress_packets += 1;
        s.egress_bytes += len;
    });
    let v = match config() {
        Some(cfg) => match parse::proto_at(&ctx, parse::ETH_HLEN) {
            Proto::Ipv4 => from_container::<Ip4>(&ctx, ifindex, cfg),
            Proto::Ipv6 => from_container::<Ip6>(&ctx, ifindex, cfg),
            Proto::Arp => veth::check_arp(&ctx, ifindex),
            Proto::Other => Verdict::Drop(DROP_UNSUPPORTED),
        },
        None => Verdict::Drop(DROP_MALFORMED),
    };
    finish(&ctx, parse::ETH_HLEN, ifindex, v)
}

#[inline(always)]
fn from_container<A: Addr>(ctx: &TcContext, ifindex: u32, cfg: &Config) -> Verdict {
    match veth::ingress::<A>(ctx, ifindex, cfg) {
        Verdict::Icmp => veth::icmp::<A>(ctx, ifindex, cfg),
        Verdict::Overlay => tunnel::from_container::<A>(ctx, ifindex, cfg),
        v => v,
    }
}

/// Egress of a container's host-side veth: packets the container receives.
#[classifier]
pub fn md_veth_egress(ctx: TcContext) -> i32 {
    let ifindex = ifindex(&ctx);
    let len = ctx.len() as u64;
    stats::count(ifindex, |s| {
        s.ingress_packets += 1;
        s.ingress_bytes += len;
    });
    let (v, blame) = match (config(), parse::proto_at(&ctx, parse::ETH_HLEN)) {
        (Some(cfg), Proto::Ipv4) => veth::egress::<Ip4>(&ctx, ifindex, cfg),
        (Some(cfg), Proto::Ipv6) => veth::egress::<Ip6>(&ctx, ifindex, cfg),
        _ => (Verdict::Pass, ifindex),
    };
    finish(&ctx, parse::ETH_HLEN, blame, v)
}

/// Ingress of an uplink (any host interface md did not make): answers to masqueraded flows,
/// outside clients of published ports, and what must not reach containers or be forwarded.
#[classifier]
pub fn md_uplink_ingress(ctx: TcContext) -> i32 {
    on_uplink(&ctx, true, parse::ETH_HLEN)
}

/// Egress of an uplink: masquerade, answers of published ports.
#[classifier]
pub fn md_uplink_egress(ctx: TcContext) -> i32 {
    on_uplink(&ctx, false, parse::ETH_HLEN)
}

/// The same on a layer-3 device (no Ethernet header: tun, WireGuard).
#[classifier]
pub fn md_l3_ingress(ctx: TcContext) -> i32 {
    on_uplink(&ctx, true, 0)
}

#[classifier]
pub fn md_l3_egress(ctx: TcContext) -> i32 {
    on_uplink(&ctx, false, 0)
}

#[inline(always)]
fn on_uplink(ctx: &TcContext, ingress: bool, l3: usize) -> i32 {
    let ifindex = ifindex(ctx);
    let len = ctx.len() as u64;
    stats::count(ifindex, |s| {
        if ingress {
            s.ingress_packets += 1;
            s.ingress_bytes += len;
        } else {
            s.egress_packets += 1;
            s.egress_bytes += len;
        }
    });
    if !ingress && unsafe { (*ctx.skb.skb).mark } == md_common::MARK_TRANSLATED {
        ctx.skb.set_mark(0);
        return TCX_NEXT;
    }
    let v = match (config(), parse::proto_at(ctx, l3)) {
        (Some(cfg), Proto::Ipv4) => uplink_family::<Ip4>(ctx, cfg, ingress, l3, ifindex),
        (Some(cfg), Proto::Ipv6) => uplink_family::<Ip6>(ctx, cfg, ingress, l3, ifindex),
        _ => Verdict::Pass,
    };
    finish(ctx, l3, ifindex, v)
}

#[inline(always)]
fn uplink_family<A: Addr>(
    ctx: &TcContext,
    cfg: &Config,
    ingress: bool,
    l3: usize,
    ifindex: u32,
) -> Verdict {
    if ingress {
        match uplink::ingress::<A>(ctx, cfg, l3, ifindex) {
            Verdict::Icmp => uplink::icmp_in::<A>(ctx, l3, ifindex),
            Verdict::Overlay => tunnel::native_in::<A>(ctx, cfg, l3),
            v => v,
        }
    } else {
        match uplink::egress::<A>(ctx, cfg, l3, ifindex) {
            Verdict::Icmp => uplink::icmp_out::<A>(ctx, l3, ifindex),
            v => v,
        }
    }
}

/// Ingress of md's VXLAN device (overlay tunnel mode): decapsulated packets from containers on
/// other hosts, the sender's identity in the tunnel key.
#[classifier]
pub fn md_tunnel_ingress(ctx: TcContext) -> i32 {
    let ifindex = ifindex(&ctx);
    let len = ctx.len() as u64;
    stats::count(ifindex, |s| {
        s.ingress_packets += 1;
        s.ingress_bytes += len;
    });
    let v = match config() {
        Some(cfg) => tunnel::ingress(&ctx, cfg),
        None => Verdict::Drop(DROP_MALFORMED),
    };
    finish(&ctx, parse::ETH_HLEN, ifindex, v)
}

#[cgroup_sock_addr(connect4)]
pub fn md_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination::<Ip4>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn md_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination::<Ip4>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn md_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_source::<Ip4>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn md_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_source::<Ip4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn md_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate_destination::<Ip6>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn md_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate_destination::<Ip6>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn md_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore_source::<Ip6>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn md_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore_source::<Ip6>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
