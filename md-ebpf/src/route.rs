//! What the host's routing and sockets say about a packet: the source address masquerade
//! takes, whether the host would forward a packet, and whether a host socket owns it.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_sock_tuple, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC,
    },
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
    EbpfContext,
};
use md_common::{IPPROTO_TCP, IPPROTO_UDP};

use core::mem::MaybeUninit;

use crate::{family::Addr, parse::Pkt};

/// Look sockets up in the namespace of the packet's device (BPF_F_CURRENT_NETNS).
const CURRENT_NETNS: u64 = u64::MAX;

/// `slot` zeroed in place, with word stores: a zeroed() (or a block zeroed elsewhere and moved
/// here) becomes a call to the byte-at-a-time memset. For helper parameter blocks whose size
/// is a multiple of 4 (checked when the program is built), all zeroes being a valid value.
#[inline(always)]
pub fn zeroed_in<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(core::mem::size_of::<T>() % 4 == 0) };
    let w = slot.as_mut_ptr() as *mut u32;
    for i in 0..core::mem::size_of::<T>() / 4 {
        // Volatile, or LLVM folds the stores back into that memset.
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
    unsafe { slot.assume_init_mut() }
}

#[inline(always)]
fn fib_params<'a, A: Addr>(
    slot: &'a mut MaybeUninit<bpf_fib_lookup>,
    p: &Pkt<A>,
    ifindex: u32,
    src: bool,
) -> &'a mut bpf_fib_lookup {
    let f = zeroed_in(slot);
    f.l4_protocol = p.proto;
    f.sport = p.sport.to_be();
    f.dport = p.dport.to_be();
    f.ifindex = ifindex;
    A::fib_set(f, src.then_some(&p.saddr), &p.daddr);
    f
}

/// The address the host would give a packet to `p.daddr` leaving by `ifindex` (what iptables'
/// MASQUERADE picks), asked at the moment of each new flow so a changed address (DHCP) is
/// followed at once. Never an IPv6 link-local address: that is no source for a routed flow.
#[inline(always)]
pub fn masquerade_source<A: Addr>(ctx: &TcContext, p: &Pkt<A>, ifindex: u32) -> Option<A> {
    let mut src = A::default();
    if !fib_source(ctx, p, ifindex, &mut src) || src == A::default() {
        return None;
    }
    if src.link_scoped() {
        return None;
    }
    Some(src)
}

/// Out of line: the lookup's 64-byte parameter block stays off the callers' frames. False when
/// the host has no route or no address for it.
#[inline(never)]
fn fib_source<A: Addr>(ctx: &TcContext, p: &Pkt<A>, ifindex: u32, out: &mut A) -> bool {
    let mut slot = MaybeUninit::uninit();
    let f = fib_params(&mut slot, p, ifindex, false);
    let flags = BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC;
    let ret = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.as_ptr(),
            f,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return false;
    }
    *out = A::fib_src(f);
    true
}

/// Whether the host would route a packet that arrived on `ifindex` out again (to anything
/// but itself: local, broadcast and multicast addresses are not forwarded).
#[inline(never)]
pub fn forwarded<A: Addr>(ctx: &TcContext, p: &Pkt<A>, ifindex: u32) -> bool {
    let mut slot = MaybeUninit::uninit();
    let f = fib_params(&mut slot, p, ifindex, true);
    let ret = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.as_ptr(),
            f,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    ret == BPF_FIB_LKUP_RET_SUCCESS as i64
        || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64
        || ret == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64
}

/// Whether the runtime that published a port holds the host port with a socket of its own
/// (Podman's conmon): such a port does not give way to host sockets.
#[inline(always)]
pub fn runtime_reserved<A: Addr>(target: *mut A::Target) -> bool {
    A::target_flags(target) & md_common::PORT_RUNTIME_RESERVED != 0
}

/// Whether a socket of the host (a listener, or a socket this packet answers) owns the tuple
/// `saddr:sport → daddr:dport`. Such a packet is never translated: a published port must not
/// take over a host service or the answers to the host's own connections.
#[inline(always)]
pub fn host_socket<C: EbpfContext, A: Addr>(
    ctx: &C,
    proto: u8,
    saddr: A,
    sport: u16,
    daddr: A,
    dport: u16,
) -> bool {
    let mut slot = MaybeUninit::<bpf_sock_tuple>::uninit();
    let t = zeroed_in(&mut slot);
    let size = A::sock_tuple(t, &saddr, sport, &daddr, dport);
    let sk = unsafe {
        match proto {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx.as_ptr(), t, size, CURRENT_NETNS, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.as_ptr(), t, size, CURRENT_NETNS, 0),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
