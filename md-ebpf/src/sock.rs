//! Socket programs at the cgroup-v2 root: host processes reaching published ports through
//! 127.0.0.1 or the host's own addresses never cross a veth or the uplink, so they are
//! translated when they connect (Cilium's socket-LB). Only sockets of md's host network
//! namespace are touched: every other namespace keeps its own localhost.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use md_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{config, family::Addr, nat, route, stats};

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

/// connect4/6 and sendmsg4/6: a published port becomes the container's address and port; the
/// original is remembered (SOCK_REV, SOCK_REV6) for recvmsg and getpeername. A port published
/// on every address answers on loopback (127.0.0.1, ::1) and the host's own addresses only
/// (not on 127.0.0.53, a stub resolver's), one bound to an address only there; and a
/// destination a host socket listens on is the host's.
#[inline(always)]
pub fn translate_destination<A: Addr>(ctx: &SockAddrContext) -> i32 {
    if !in_host_netns(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let proto = unsafe { (*sa).protocol as u8 };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (ip, port) = A::sock_get(sa);
    let wildcard_ok = ip.is_loopback() || nat::is_host_addr(&ip);
    let Some(target) = nat::port_lookup(&ip, port, proto, wildcard_ok) else {
        return ALLOW;
    };
    if !route::runtime_reserved::<A>(target)
        && route::host_socket(ctx, proto, A::default(), 0, ip, port)
    {
        return ALLOW;
    }
    let (t_ip, t_port, _) = A::target(target);
    A::sock_set(sa, &t_ip, t_port);
    // One hit per socket and destination (a connection, or a UDP socket's first datagram),
    // as the TC paths count one per flow.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if A::rev_put(cookie, &t_ip, t_port, &ip, port, BPF_NOEXIST as u64) {
        A::count_hit(target);
        if let Some(ep) = nat::endpoint(&t_ip) {
            stats::count(ep.ifindex, |s| s.dnat += 1);
        }
    } else {
        A::rev_put(cookie, &t_ip, t_port, &ip, port, BPF_ANY as u64);
    }
    ALLOW
}

/// recvmsg4/6 and getpeername4/6: show the address the program connected to, not the
/// container. A miss leaves the address alone.
#[inline(always)]
pub fn restore_source<A: Addr>(ctx: &SockAddrContext) -> i32 {
    if !in_host_netns(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let (ip, port) = A::sock_get(sa);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some((orig, orig_port)) = A::rev_get(cookie, &ip, port) {
        A::sock_set(sa, &orig, orig_port);
    }
    ALLOW
}
