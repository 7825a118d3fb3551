//! Socket programs at the cgroup-v2 root: host processes reaching published ports through
//! 127.0.0.1 or the host's own addresses never cross a veth or the uplink, so they are
//! translated when they connect (Cilium's socket-LB). Only sockets of md's host network
//! namespace are touched: every other namespace keeps its own localhost.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use md_common::{Ip4, SockRevKey, SockRevValue, IPPROTO_TCP, IPPROTO_UDP};

use crate::{config, nat, route, stats, SOCK_REV};

/// Cgroup sock_addr programs return 1 to let the call proceed.
pub const ALLOW: i32 = 1;

#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext) -> bool {
    match config() {
        Some(cfg) => {
            cfg.host_netns_cookie != 0
                && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == cfg.host_netns_cookie
        }
        None => false,
    }
}

/// connect4 and sendmsg4: a published port becomes the container's address and port; the
/// original is remembered for recvmsg4/getpeername4. A port published on every address answers
/// on 127.0.0.1 and the host's own addresses only (not on 127.0.0.53, a stub resolver's), one
/// bound to an address only there; and a destination a host socket listens on is the host's.
#[inline(always)]
pub fn translate_destination(ctx: &SockAddrContext) -> i32 {
    if !in_host_netns(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let (proto, ip, port) = unsafe {
        (
            (*sa).protocol as u8,
            (*sa).user_ip4.to_ne_bytes(),
            u16::from_be((*sa).user_port as u16),
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let wildcard_ok = ip == [127, 0, 0, 1] || nat::is_host_addr(&ip);
    let Some(target) = nat::port_lookup(&ip, port, proto, wildcard_ok) else {
        return ALLOW;
    };
    if !route::runtime_reserved(target) && route::host_socket(ctx, proto, [0; 4], 0, ip, port) {
        return ALLOW;
    }
    let t = unsafe { *target };
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(t.ip);
        (*sa).user_port = t.port.to_be() as u32;
    }
    // One hit per socket and destination (a connection, or a UDP socket's first datagram),
    // as the TC paths count one per flow.
    let key = rev_key(ctx, t.ip, t.port);
    let rev = SockRevValue { ip, port, _pad: 0 };
    if SOCK_REV.insert(key, rev, BPF_NOEXIST as u64).is_ok() {
        unsafe { (*target).hits += 1 };
        if let Some(ep) = nat::endpoint(&t.ip) {
            stats::count(ep.ifindex, |s| s.dnat += 1);
        }
    } else {
        let _ = SOCK_REV.insert(key, rev, BPF_ANY as u64);
    }
    ALLOW
}

#[inline(always)]
fn rev_key(ctx: &SockAddrContext, ip: Ip4, port: u16) -> SockRevKey {
    SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        ip,
        port,
        _pad: 0,
    }
}

/// recvmsg4 and getpeername4: show the address the program connected to, not the container.
/// A miss leaves the address alone.
#[inline(always)]
pub fn restore_source(ctx: &SockAddrContext) -> i32 {
    if !in_host_netns(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let (ip, port) = unsafe {
        (
            (*sa).user_ip4.to_ne_bytes(),
            u16::from_be((*sa).user_port as u16),
        )
    };
    if let Some(orig) = unsafe { SOCK_REV.get(rev_key(ctx, ip, port)) } {
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(orig.ip);
            (*sa).user_port = orig.port.to_be() as u32;
        }
    }
    ALLOW
}
