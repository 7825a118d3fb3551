//! Overlay networks across hosts (issue 17): containers on other hosts, listed in REMOTE by the
//! watcher from the store.
//!
//! Tunnel mode (Cilium's): a packet for a remote container gets a tunnel key (the remote host's
//! underlay address, the sender's identity as VNI) and is redirected to md's collect-metadata
//! VXLAN device, which encapsulates it. On the receiving host the program at that device's
//! ingress reads the key back, checks that the source lives on the host that sent it, then
//! isolation and policy with the carried identity, and delivers into the container.
//!
//! Native routing: the packet leaves untranslated through the host's routing (a route per remote
//! block via its host); the receiving uplink recognises a registered remote source and delivers,
//! the identity taken from the registry (Cilium's ipcache does the same without a tunnel).
//!
//! Both ends check: the sender with its rules and the receiver's registered identity, the
//! receiver with its own rules and the identity the packet carries; replies of a flow the
//! receiver's container opened pass through its tracker.
//!
//! IPv4 only: REMOTE is keyed by IPv4 addresses, so for IPv6 `A::remote` is always None and
//! an IPv6 packet never takes these paths (the functions are generic only so that the hooks,
//! written once for both families, can call them).

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    helpers::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use md_common::{
    Config, Endpoint, Remote, CT_DIR_ORIGINAL, CT_HOOK_VETH, CT_KIND_NONE, DROP_ISOLATION,
    DROP_MALFORMED, DROP_POLICY, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, OVERLAY_NATIVE,
    OVERLAY_TUNNEL,
};

use crate::{
    ct::{self, Spec},
    family::Addr,
    fwd,
    nat::{self, Verdict},
    parse::{self, Pkt, ETH_HLEN, L4},
    policy, veth, TUNNEL,
};

/// The outer UDP checksum is left zero (allowed for IPv4; the inner packet has its own).
const BPF_F_ZERO_CSUM_TX: u64 = 1 << 1;
const TUNNEL_TTL: u8 = 64;
const VNI_MASK: u32 = 0x00ff_ffff;

#[inline(always)]
pub fn remote<A: Addr>(ip: &A) -> Option<Remote> {
    A::remote(ip)
}

/// Whether `ip` is a container reached by native routing: its packets leave untranslated.
#[inline(always)]
pub fn native_peer<A: Addr>(ip: &A) -> bool {
    remote(ip).is_some_and(|r| r.mode == OVERLAY_NATIVE)
}

/// A container sends to a container on another host (handed over by the veth's ingress as
/// [`Verdict::Overlay`]): the sender checked again, isolation and policy as between local
/// containers (the destination's identity from the registry), the flow tracked so its answers
/// pass whatever the rules say the other way, then on its way.
#[inline(never)]
pub fn from_container<A: Addr>(ctx: &TcContext, ifindex: u32, cfg: &Config) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, ETH_HLEN) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    let Some(src) = veth::sender(ctx, ifindex, p) else {
        return Verdict::Drop(DROP_SPOOF);
    };
    let Some(dst) = remote(&p.daddr) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    to_remote(ctx, cfg, p, &src, &dst)
}

#[inline(always)]
fn to_remote<A: Addr>(
    ctx: &TcContext,
    cfg: &Config,
    p: &Pkt<A>,
    src: &Endpoint,
    dst: &Remote,
) -> Verdict {
    if dst.net_id != src.net_id {
        return Verdict::Drop(DROP_ISOLATION);
    }
    if !policy::allowed(cfg, src.identity, dst.identity) {
        return Verdict::Drop(DROP_POLICY);
    }
    if p.l4 == L4::Ports && ct::nat_tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto).is_some() {
        let spec = Spec {
            kind: CT_KIND_NONE,
            hook: CT_HOOK_VETH,
            port: ct::PORT_KEEP,
            orig_ifindex: src.ifindex,
            reply_ifindex: src.ifindex,
            orig_identity: dst.identity,
            reply_identity: src.identity,
        };
        // A clash only means the flow is already known the other way round.
        let _ = ct::open(p, &spec);
    }
    send(ctx, cfg, p, src, dst)
}

/// A packet of a tracked flow (already allowed): to a remote container it goes on its way; to
/// a container of this host's (in the redirect datapath) straight into it, as the flow's first
/// packet did; anything else is left as it is.
#[inline(always)]
pub fn onward<A: Addr>(ctx: &TcContext, cfg: &Config, p: &Pkt<A>, src: &Endpoint) -> Verdict {
    if let Some(dst) = crate::nat::endpoint(&p.daddr) {
        return fwd::between_containers(ctx, cfg, &dst);
    }
    match remote(&p.daddr) {
        Some(dst) if dst.net_id == src.net_id => send(ctx, cfg, p, src, &dst),
        _ => Verdict::Pass,
    }
}

#[inline(always)]
fn send<A: Addr>(
    ctx: &TcContext,
    cfg: &Config,
    p: &Pkt<A>,
    src: &Endpoint,
    dst: &Remote,
) -> Verdict {
    if dst.mode == OVERLAY_TUNNEL {
        return encap(ctx, u32::from_be_bytes(dst.host), src.identity);
    }
    // Native: the host routes it (a route per remote block); the redirect datapath goes
    // straight to the interface its FIB names.
    if fwd::redirecting(cfg) {
        return fwd::outbound(ctx, p, src);
    }
    Verdict::Pass
}

/// Sets the tunnel key (remote host, VNI = the sender's identity, this host's underlay address
/// as the outer source) and hands the frame to the VXLAN device, which encapsulates it.
#[inline(never)]
fn encap(ctx: &TcContext, host: u32, identity: u32) -> Verdict {
    let Some(t) = TUNNEL.get(0) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    if t.ifindex == 0 {
        return Verdict::Drop(DROP_UNSUPPORTED);
    }
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity & VNI_MASK;
    key.__bindgen_anon_1.remote_ipv4 = host;
    key.tunnel_ttl = TUNNEL_TTL;
    key.__bindgen_anon_3.local_ipv4 = u32::from_be_bytes(t.local);
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            BPF_F_ZERO_CSUM_TX,
        )
    };
    if ret < 0 {
        return Verdict::Drop(DROP_MALFORMED);
    }
    Verdict::Redirect(unsafe { bpf_redirect(t.ifindex, 0) } as i32)
}

/// The tunnel key of a decapsulated packet: the sending host's underlay address (host byte
/// order) in the high half, the VNI in the low one; 0 when there is none.
#[inline(never)]
fn tunnel_key(ctx: &TcContext) -> u64 {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let ret = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if ret < 0 {
        return 0;
    }
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 } as u64;
    (remote << 32) | (key.tunnel_id & VNI_MASK) as u64
}

/// Ingress of md's VXLAN device: what containers on other hosts send to ours.
#[inline(never)]
pub fn ingress(ctx: &TcContext, cfg: &Config) -> Verdict {
    if parse::proto_at(ctx, ETH_HLEN) != parse::Proto::Ipv4 {
        return Verdict::Drop(DROP_UNSUPPORTED);
    }
    let Some(p) = parse::packet::<md_common::Ip4>(ctx, ETH_HLEN) else {
        return Verdict::Drop(DROP_UNSUPPORTED);
    };
    let key = tunnel_key(ctx);
    if key == 0 {
        return Verdict::Drop(DROP_MALFORMED);
    }
    let (from, identity) = ((key >> 32) as u32, key as u32);
    // The source must be a container the store says lives on the host that sent it.
    let Some(src) = remote(&p.saddr) else {
        return Verdict::Drop(DROP_SPOOF);
    };
    if src.mode != OVERLAY_TUNNEL || u32::from_be_bytes(src.host) != from {
        return Verdict::Drop(DROP_SPOOF);
    }
    deliver(ctx, cfg, p, src.net_id, identity, false)
}

/// A registered remote container's packet arriving on an uplink (native routing), handed over
/// by the uplink's ingress as [`Verdict::Overlay`].
#[inline(never)]
pub fn native_in<A: Addr>(ctx: &TcContext, cfg: &Config, l3: usize) -> Verdict {
    let Some(p) = parse::packet::<A>(ctx, l3) else {
        return Verdict::Drop(DROP_MALFORMED);
    };
    match remote(&p.saddr) {
        Some(src) if src.mode == OVERLAY_NATIVE => {
            deliver(ctx, cfg, p, src.net_id, src.identity, true)
        }
        _ => Verdict::Drop(DROP_SPOOF),
    }
}

/// Isolation and policy at the receiver (`identity`: the sender's), then into the container.
#[inline(always)]
fn deliver<A: Addr>(
    ctx: &TcContext,
    cfg: &Config,
    p: &Pkt<A>,
    net_id: u32,
    identity: u32,
    routed: bool,
) -> Verdict {
    let Some(dst) = nat::endpoint(&p.daddr) else {
        return Verdict::Drop(DROP_UNSOLICITED);
    };
    if dst.net_id != net_id {
        return Verdict::Drop(DROP_ISOLATION);
    }
    if p.l4 == L4::Ports {
        let now = ct::now();
        if let Some(f) = ct::lookup(&p.tuple, now) {
            let e = unsafe { &*f.e };
            if e.dir == CT_DIR_ORIGINAL && !policy::allowed(cfg, identity, e.identity) {
                return Verdict::Drop(DROP_POLICY);
            }
            ct::touch(f, p, now, cfg);
        } else {
            if !policy::allowed(cfg, identity, dst.identity) {
                return Verdict::Drop(DROP_POLICY);
            }
            let spec = Spec {
                kind: CT_KIND_NONE,
                hook: CT_HOOK_VETH,
                port: ct::PORT_KEEP,
                orig_ifindex: dst.ifindex,
                reply_ifindex: dst.ifindex,
                orig_identity: dst.identity,
                reply_identity: identity,
            };
            if ct::nat_tuple(&p.saddr, &p.daddr, p.sport, p.dport, p.proto).is_some() {
                let _ = ct::open(p, &spec);
            }
        }
    } else if p.l4 != L4::IcmpError && !policy::allowed(cfg, identity, dst.identity) {
        return Verdict::Drop(DROP_POLICY);
    }
    if p.l3_off != ETH_HLEN {
        // A layer-3 uplink: the host routes it to the bridge.
        return Verdict::Pass;
    }
    fwd::into_container::<A>(ctx, cfg, &dst, true, routed)
}
