//! md's datapath: maps and entry points. Entry points only dispatch; the logic lives in one
//! module per attach point (`veth`, `uplink`, `sock`) and shared libraries (`parse`, `csum`,
//! `ct`, `nat`, `policy`, `stats`).
#![no_std]
#![no_main]

mod csum;
mod ct;
mod frag;
mod fwd;
mod nat;
mod parse;
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
use md_common::{
    maps as m, Config, CtEntry, CtKey, Endpoint, Event, FragEntry, FragKey, IfStats, Ip4, Network,
    PolicyKey, PolicyRule, PortKey, PortTarget, Remote, SockRevKey, SockRevValue, Tunnel,
    DROP_FORWARD, DROP_ISOLATION, DROP_MALFORMED, DROP_NAT_PORTS, DROP_NO_SOURCE, DROP_POLICY,
    DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, EVENT_DROP, EVENT_POLICY,
};
use nat::Verdict;

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
static FLOW_SCRATCH: PerCpuArray<ct::NewFlow, 1> = PerCpuArray::new();
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
    if let parse::Parsed::Ipv4(p) = parse::parse_at(ctx, l3) {
        let kind = if reason == DROP_POLICY {
            EVENT_POLICY
        } else {
            EVENT_DROP
        };
        stats::emit(kind, reason, ifindex, &p, [0; 4], 0);
    }
    TC_ACT_SHOT
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
        Some(cfg) => match veth::ingress(&ctx, ifindex, cfg) {
            Verdict::Icmp => veth::icmp(&ctx, ifindex, cfg),
            Verdict::Overlay => tunnel::from_container(&ctx, ifindex, cfg),
            v => v,
        },
        None => Verdict::Drop(DROP_MALFORMED),
    };
    finish(&ctx, parse::ETH_HLEN, ifindex, v)
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
    let (v, blame) = match config() {
        Some(cfg) => veth::egress(&ctx, ifindex, cfg),
        None => (Verdict::Pass, ifindex),
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
    let v = match (config(), ingress) {
        (Some(cfg), true) => match uplink::ingress(ctx, cfg, l3, ifindex) {
            Verdict::Icmp => uplink::icmp_in(ctx, l3, ifindex),
            Verdict::Overlay => tunnel::native_in(ctx, cfg, l3),
            v => v,
        },
        (Some(cfg), false) => match uplink::egress(ctx, cfg, l3, ifindex) {
            Verdict::Icmp => uplink::icmp_out(ctx, l3, ifindex),
            v => v,
        },
        (None, _) => Verdict::Pass,
    };
    finish(ctx, l3, ifindex, v)
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
    sock::translate_destination(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn md_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn md_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_source(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn md_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_source(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
