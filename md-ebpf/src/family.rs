//! The two address families as one trait, implemented by the address types themselves (`Ip4`,
//! `Ip6`): the maps each family keys by its own addresses, and the few header facts that
//! differ. The tracker, the translations and the hooks are written once, generic over it, and
//! compiled once per family (each instance a function, and a stack frame, of its own).

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_sock_addr, bpf_sock_tuple},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use md_common::{
    CtEntryOf, CtKeyOf, Endpoint, FragEntry, FragEntry6, FragKey, FragKey6, Ip4, Ip6, Network,
    PortKeyOf, PortTarget, PortTarget6, Remote, SockRevKey, SockRevKey6, SockRevValue,
    SockRevValue6, IPPROTO_ICMP, IPPROTO_ICMPV6,
};

use crate::{
    ct::NewFlow,
    nat::Verdict,
    ndp,
    parse::{self, Pkt},
    parse6, stats, CONNTRACK, CONNTRACK6, CONNTRACK6_NEW, CONNTRACK_NEW, ENDPOINTS, ENDPOINTS6,
    FLOW_SCRATCH, FLOW_SCRATCH6, FRAGS, FRAGS6, HOST_ADDRS, HOST_ADDRS6, MD_SUBNETS, MD_SUBNETS6,
    PKT_SCRATCH, PKT_SCRATCH6, PORT_MAP, PORT_MAP6, REMOTE, SOCK_REV, SOCK_REV6,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// bpf_skb_store_bytes: keep a CHECKSUM_COMPLETE skb's csum in step with the bytes written.
/// IPv6 has no header checksum to absorb a changed address, so its stores need it.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;

pub trait Addr: Copy + PartialEq + Default + 'static {
    const V6: bool;
    /// Where the source and destination addresses sit in the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// ICMP's protocol number and echo types in this family.
    const ICMP: u8;
    const ECHO: u8;
    const ECHO_REPLY: u8;
    /// 32-bit words in an address (what checksum updates go by).
    const WORDS: usize;
    /// Flags for storing an address into the IP header.
    const STORE_FLAGS: u64;

    /// Word `i` of the address as the checksum helpers take it (the wire bytes read natively).
    fn word(&self, i: usize) -> u64;
    fn is_loopback(&self) -> bool;
    /// Never routed, so never md's to translate or forward: IPv6 link-local and multicast
    /// addresses (IPv4's broadcast and multicast are left to the FIB, as before).
    fn link_scoped(&self) -> bool;

    // Maps keyed by addresses of this family.
    type Target: Copy;
    fn ct_get(answered: bool, k: &CtKeyOf<Self>) -> Option<*mut CtEntryOf<Self>>;
    fn ct_insert(
        answered: bool,
        k: &CtKeyOf<Self>,
        e: &CtEntryOf<Self>,
        flags: u64,
    ) -> Result<(), i32>;
    fn ct_remove(answered: bool, k: &CtKeyOf<Self>);
    fn scratch() -> Option<*mut NewFlow<Self>>;
    fn endpoint(a: &Self) -> Option<Endpoint>;
    /// A container on another host of an overlay network (issue 17: IPv4 only, so always None
    /// for IPv6).
    fn remote(a: &Self) -> Option<Remote>;
    fn host_flags(a: &Self) -> Option<u32>;
    /// The md network whose subnet holds `a`.
    fn subnet(a: &Self) -> Option<u32>;
    fn port(k: PortKeyOf<Self>) -> Option<*mut Self::Target>;
    /// A published port's container address, port and identity.
    fn target(t: *mut Self::Target) -> (Self, u16, u32);
    fn count_hit(t: *mut Self::Target);
    /// A published port's PORT_* flags.
    fn target_flags(t: *mut Self::Target) -> u16;
    /// The network's gateway address in this family.
    fn gateway(n: &Network) -> Self;
    /// Whether `a` is the address of `me`, the container behind veth `ifindex`.
    fn is_owner(a: &Self, me: &Endpoint, ifindex: u32) -> bool;
    /// A datagram's remembered translation: (saddr, daddr, expiry).
    fn frag_get(p: &Pkt<Self>) -> Option<(Self, Self, u64)>;
    fn frag_put(p: &Pkt<Self>, saddr: Self, daddr: Self, expires_ns: u64);
    fn emit(kind: u8, reason: u8, ifindex: u32, p: &Pkt<Self>, nat_addr: Self, nat_port: u16);

    /// The per-CPU slot parsed packets go to ([`parse::SLOT_PACKET`], [`parse::SLOT_QUOTE`]).
    fn pkt_slot(slot: u32) -> Option<*mut Pkt<Self>>;
    /// The IP header at `l3` (and IPv6's extension headers): fills `p`'s network-layer
    /// fields; returns the length of what follows, or None when the header is broken.
    fn header(ctx: &TcContext, l3: usize, p: &mut Pkt<Self>) -> Option<u32>;
    fn is_icmp_error(icmp_type: u8) -> bool;
    /// A verdict on what a container sends, before anything else, for what IPv4 has no
    /// counterpart of (IPv6: a network without IPv6, NDP, MLD, link-local sources); None for
    /// ordinary traffic.
    fn screen(ctx: &TcContext, ifindex: u32, p: &Pkt<Self>) -> Option<Verdict>;
    /// Lowers the TTL / hop limit as a router does; false when it would reach 0.
    fn hop_down(ctx: &TcContext, l3: usize) -> Result<bool, i64>;

    fn fib_set(f: &mut bpf_fib_lookup, src: Option<&Self>, dst: &Self);
    fn fib_src(f: &bpf_fib_lookup) -> Self;
    /// Fills a socket lookup tuple; returns its size.
    fn sock_tuple(t: &mut bpf_sock_tuple, s: &Self, sport: u16, d: &Self, dport: u16) -> u32;

    /// A socket address program's address and port (host byte order).
    fn sock_get(sa: *mut bpf_sock_addr) -> (Self, u16);
    fn sock_set(sa: *mut bpf_sock_addr, ip: &Self, port: u16);
    /// SOCK_REV: what a socket whose destination became `to`:`to_port` asked for.
    fn rev_put(cookie: u64, to: &Self, to_port: u16, ip: &Self, port: u16, flags: u64) -> bool;
    fn rev_get(cookie: u64, to: &Self, to_port: u16) -> Option<(Self, u16)>;
}

#[inline(always)]
fn ne32(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

impl Addr for Ip4 {
    const V6: bool = false;
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const ICMP: u8 = IPPROTO_ICMP;
    const ECHO: u8 = parse::ICMP_ECHO;
    const ECHO_REPLY: u8 = parse::ICMP_ECHO_REPLY;
    const WORDS: usize = 1;
    const STORE_FLAGS: u64 = 0;

    #[inline(always)]
    fn word(&self, _i: usize) -> u64 {
        ne32(*self) as u64
    }
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        *self == [127, 0, 0, 1]
    }
    #[inline(always)]
    fn link_scoped(&self) -> bool {
        false
    }

    type Target = PortTarget;
    #[inline(always)]
    fn ct_get(answered: bool, k: &CtKeyOf<Ip4>) -> Option<*mut CtEntryOf<Ip4>> {
        if answered {
            CONNTRACK.get_ptr_mut(k)
        } else {
            CONNTRACK_NEW.get_ptr_mut(k)
        }
    }
    #[inline(always)]
    fn ct_insert(
        answered: bool,
        k: &CtKeyOf<Ip4>,
        e: &CtEntryOf<Ip4>,
        flags: u64,
    ) -> Result<(), i32> {
        if answered {
            CONNTRACK.insert(k, e, flags)
        } else {
            CONNTRACK_NEW.insert(k, e, flags)
        }
    }
    #[inline(always)]
    fn ct_remove(answered: bool, k: &CtKeyOf<Ip4>) {
        let _ = if answered {
            CONNTRACK.remove(k)
        } else {
            CONNTRACK_NEW.remove(k)
        };
    }
    #[inline(always)]
    fn scratch() -> Option<*mut NewFlow<Ip4>> {
        FLOW_SCRATCH.get_ptr_mut(0)
    }
    #[inline(always)]
    fn endpoint(a: &Ip4) -> Option<Endpoint> {
        unsafe { ENDPOINTS.get(a) }.copied()
    }
    #[inline(always)]
    fn remote(a: &Ip4) -> Option<Remote> {
        unsafe { REMOTE.get(a) }.copied()
    }
    #[inline(always)]
    fn host_flags(a: &Ip4) -> Option<u32> {
        unsafe { HOST_ADDRS.get(a) }.copied()
    }
    #[inline(always)]
    fn subnet(a: &Ip4) -> Option<u32> {
        MD_SUBNETS.get(&Key::new(32, *a)).copied()
    }
    #[inline(always)]
    fn port(k: PortKeyOf<Ip4>) -> Option<*mut PortTarget> {
        PORT_MAP.get_ptr_mut(k)
    }
    #[inline(always)]
    fn target(t: *mut PortTarget) -> (Ip4, u16, u32) {
        let t = unsafe { &*t };
        (t.ip, t.port, t.identity)
    }
    #[inline(always)]
    fn count_hit(t: *mut PortTarget) {
        unsafe { (*t).hits += 1 };
    }
    #[inline(always)]
    fn target_flags(t: *mut PortTarget) -> u16 {
        unsafe { (*t).flags }
    }
    #[inline(always)]
    fn gateway(n: &Network) -> Ip4 {
        n.gateway
    }
    #[inline(always)]
    fn is_owner(a: &Ip4, me: &Endpoint, _ifindex: u32) -> bool {
        *a == me.ip
    }
    #[inline(always)]
    fn frag_get(p: &Pkt<Ip4>) -> Option<(Ip4, Ip4, u64)> {
        let e = unsafe { FRAGS.get(frag_key4(p)) }?;
        Some((e.saddr, e.daddr, e.expires_ns))
    }
    #[inline(always)]
    fn frag_put(p: &Pkt<Ip4>, saddr: Ip4, daddr: Ip4, expires_ns: u64) {
        let e = FragEntry {
            saddr,
            daddr,
            expires_ns,
        };
        let _ = FRAGS.insert(frag_key4(p), e, 0);
    }
    #[inline(always)]
    fn emit(kind: u8, reason: u8, ifindex: u32, p: &Pkt<Ip4>, nat_addr: Ip4, nat_port: u16) {
        stats::emit4(kind, reason, ifindex, p, nat_addr, nat_port)
    }
    #[inline(always)]
    fn pkt_slot(slot: u32) -> Option<*mut Pkt<Ip4>> {
        PKT_SCRATCH.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn header(ctx: &TcContext, l3: usize, p: &mut Pkt<Ip4>) -> Option<u32> {
        parse::ipv4_header(ctx, l3, p)
    }
    #[inline(always)]
    fn is_icmp_error(icmp_type: u8) -> bool {
        parse::is_icmp4_error(icmp_type)
    }
    #[inline(always)]
    fn screen(_ctx: &TcContext, _ifindex: u32, _p: &Pkt<Ip4>) -> Option<Verdict> {
        None
    }
    #[inline(always)]
    fn hop_down(ctx: &TcContext, l3: usize) -> Result<bool, i64> {
        const IP_TTL: usize = 8;
        let w: [u8; 2] = ctx.load(l3 + IP_TTL)?;
        if w[0] <= 1 {
            return Ok(false);
        }
        let new = [w[0] - 1, w[1]];
        ctx.l3_csum_replace(
            l3 + parse::IP_CSUM,
            u16::from_ne_bytes(w) as u64,
            u16::from_ne_bytes(new) as u64,
            2,
        )?;
        ctx.store(l3 + IP_TTL, &new[0], 0)?;
        Ok(true)
    }
    #[inline(always)]
    fn fib_set(f: &mut bpf_fib_lookup, src: Option<&Ip4>, dst: &Ip4) {
        f.family = AF_INET;
        if let Some(s) = src {
            f.__bindgen_anon_3.ipv4_src = ne32(*s);
        }
        f.__bindgen_anon_4.ipv4_dst = ne32(*dst);
    }
    #[inline(always)]
    fn fib_src(f: &bpf_fib_lookup) -> Ip4 {
        unsafe { f.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
    }
    #[inline(always)]
    fn sock_tuple(t: &mut bpf_sock_tuple, s: &Ip4, sport: u16, d: &Ip4, dport: u16) -> u32 {
        unsafe {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = ne32(*s);
            v4.daddr = ne32(*d);
            v4.sport = sport.to_be();
            v4.dport = dport.to_be();
        }
        core::mem::size_of::<u32>() as u32 * 3
    }
    #[inline(always)]
    fn sock_get(sa: *mut bpf_sock_addr) -> (Ip4, u16) {
        unsafe {
            (
                (*sa).user_ip4.to_ne_bytes(),
                u16::from_be((*sa).user_port as u16),
            )
        }
    }
    #[inline(always)]
    fn sock_set(sa: *mut bpf_sock_addr, ip: &Ip4, port: u16) {
        unsafe {
            (*sa).user_ip4 = ne32(*ip);
            (*sa).user_port = port.to_be() as u32;
        }
    }
    #[inline(always)]
    fn rev_put(cookie: u64, to: &Ip4, to_port: u16, ip: &Ip4, port: u16, flags: u64) -> bool {
        let key = SockRevKey {
            cookie,
            ip: *to,
            port: to_port,
            _pad: 0,
        };
        let rev = SockRevValue {
            ip: *ip,
            port,
            _pad: 0,
        };
        SOCK_REV.insert(key, rev, flags).is_ok()
    }
    #[inline(always)]
    fn rev_get(cookie: u64, to: &Ip4, to_port: u16) -> Option<(Ip4, u16)> {
        let key = SockRevKey {
            cookie,
            ip: *to,
            port: to_port,
            _pad: 0,
        };
        unsafe { SOCK_REV.get(key) }.map(|v| (v.ip, v.port))
    }
}

#[inline(always)]
fn frag_key4(p: &Pkt<Ip4>) -> FragKey {
    FragKey {
        saddr: p.saddr,
        daddr: p.daddr,
        id: p.ip_id as u16,
        proto: p.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn frag_key6(p: &Pkt<Ip6>) -> FragKey6 {
    FragKey6 {
        saddr: p.saddr,
        daddr: p.daddr,
        id: p.ip_id,
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn words6(a: &Ip6) -> [u32; 4] {
    [
        ne32([a[0], a[1], a[2], a[3]]),
        ne32([a[4], a[5], a[6], a[7]]),
        ne32([a[8], a[9], a[10], a[11]]),
        ne32([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn from_words6(w: [u32; 4]) -> Ip6 {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// fe80::/10.
#[inline(always)]
pub fn is_link_local6(a: &Ip6) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

impl Addr for Ip6 {
    const V6: bool = true;
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const ICMP: u8 = IPPROTO_ICMPV6;
    const ECHO: u8 = parse6::ICMP6_ECHO;
    const ECHO_REPLY: u8 = parse6::ICMP6_ECHO_REPLY;
    const WORDS: usize = 4;
    const STORE_FLAGS: u64 = BPF_F_RECOMPUTE_CSUM;

    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        let a = self;
        let b = [a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]];
        ne32(b) as u64
    }
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        *self == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    }
    #[inline(always)]
    fn link_scoped(&self) -> bool {
        self[0] == 0xff || is_link_local6(self)
    }

    type Target = PortTarget6;
    #[inline(always)]
    fn ct_get(answered: bool, k: &CtKeyOf<Ip6>) -> Option<*mut CtEntryOf<Ip6>> {
        if answered {
            CONNTRACK6.get_ptr_mut(k)
        } else {
            CONNTRACK6_NEW.get_ptr_mut(k)
        }
    }
    #[inline(always)]
    fn ct_insert(
        answered: bool,
        k: &CtKeyOf<Ip6>,
        e: &CtEntryOf<Ip6>,
        flags: u64,
    ) -> Result<(), i32> {
        if answered {
            CONNTRACK6.insert(k, e, flags)
        } else {
            CONNTRACK6_NEW.insert(k, e, flags)
        }
    }
    #[inline(always)]
    fn ct_remove(answered: bool, k: &CtKeyOf<Ip6>) {
        let _ = if answered {
            CONNTRACK6.remove(k)
        } else {
            CONNTRACK6_NEW.remove(k)
        };
    }
    #[inline(always)]
    fn scratch() -> Option<*mut NewFlow<Ip6>> {
        FLOW_SCRATCH6.get_ptr_mut(0)
    }
    #[inline(always)]
    fn endpoint(a: &Ip6) -> Option<Endpoint> {
        unsafe { ENDPOINTS6.get(a) }.copied()
    }
    #[inline(always)]
    fn remote(_a: &Ip6) -> Option<Remote> {
        None
    }
    #[inline(always)]
    fn host_flags(a: &Ip6) -> Option<u32> {
        unsafe { HOST_ADDRS6.get(a) }.copied()
    }
    #[inline(always)]
    fn subnet(a: &Ip6) -> Option<u32> {
        MD_SUBNETS6.get(&Key::new(128, *a)).copied()
    }
    #[inline(always)]
    fn port(k: PortKeyOf<Ip6>) -> Option<*mut PortTarget6> {
        PORT_MAP6.get_ptr_mut(k)
    }
    #[inline(always)]
    fn target(t: *mut PortTarget6) -> (Ip6, u16, u32) {
        let t = unsafe { &*t };
        (t.ip, t.port, t.identity)
    }
    #[inline(always)]
    fn count_hit(t: *mut PortTarget6) {
        unsafe { (*t).hits += 1 };
    }
    #[inline(always)]
    fn target_flags(t: *mut PortTarget6) -> u16 {
        unsafe { (*t).flags }
    }
    #[inline(always)]
    fn gateway(n: &Network) -> Ip6 {
        n.gateway6
    }
    #[inline(always)]
    fn is_owner(a: &Ip6, _me: &Endpoint, ifindex: u32) -> bool {
        Self::endpoint(a).is_some_and(|e| e.ifindex == ifindex)
    }
    #[inline(always)]
    fn frag_get(p: &Pkt<Ip6>) -> Option<(Ip6, Ip6, u64)> {
        let e = unsafe { FRAGS6.get(frag_key6(p)) }?;
        Some((e.saddr, e.daddr, e.expires_ns))
    }
    #[inline(always)]
    fn frag_put(p: &Pkt<Ip6>, saddr: Ip6, daddr: Ip6, expires_ns: u64) {
        let e = FragEntry6 {
            saddr,
            daddr,
            expires_ns,
        };
        let _ = FRAGS6.insert(frag_key6(p), e, 0);
    }
    #[inline(always)]
    fn emit(kind: u8, reason: u8, ifindex: u32, p: &Pkt<Ip6>, nat_addr: Ip6, nat_port: u16) {
        stats::emit6(kind, reason, ifindex, p, nat_addr, nat_port)
    }
    #[inline(always)]
    fn pkt_slot(slot: u32) -> Option<*mut Pkt<Ip6>> {
        PKT_SCRATCH6.get_ptr_mut(slot)
    }
    #[inline(always)]
    fn header(ctx: &TcContext, l3: usize, p: &mut Pkt<Ip6>) -> Option<u32> {
        parse6::ipv6_header(ctx, l3, p)
    }
    #[inline(always)]
    fn is_icmp_error(icmp_type: u8) -> bool {
        parse6::is_icmp6_error(icmp_type)
    }
    #[inline(always)]
    fn screen(ctx: &TcContext, ifindex: u32, p: &Pkt<Ip6>) -> Option<Verdict> {
        ndp::from_container(ctx, ifindex, p)
    }
    #[inline(always)]
    fn hop_down(ctx: &TcContext, l3: usize) -> Result<bool, i64> {
        const HOP_LIMIT: usize = 7;
        let h: u8 = ctx.load(l3 + HOP_LIMIT)?;
        if h <= 1 {
            return Ok(false);
        }
        ctx.store(l3 + HOP_LIMIT, &(h - 1), BPF_F_RECOMPUTE_CSUM)?;
        Ok(true)
    }
    #[inline(always)]
    fn fib_set(f: &mut bpf_fib_lookup, src: Option<&Ip6>, dst: &Ip6) {
        f.family = AF_INET6;
        if let Some(s) = src {
            f.__bindgen_anon_3.ipv6_src = words6(s);
        }
        f.__bindgen_anon_4.ipv6_dst = words6(dst);
    }
    #[inline(always)]
    fn fib_src(f: &bpf_fib_lookup) -> Ip6 {
        from_words6(unsafe { f.__bindgen_anon_3.ipv6_src })
    }
    #[inline(always)]
    fn sock_tuple(t: &mut bpf_sock_tuple, s: &Ip6, sport: u16, d: &Ip6, dport: u16) -> u32 {
        unsafe {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            v6.saddr = words6(s);
            v6.daddr = words6(d);
            v6.sport = sport.to_be();
            v6.dport = dport.to_be();
        }
        core::mem::size_of::<u32>() as u32 * 9
    }
    #[inline(always)]
    fn sock_get(sa: *mut bpf_sock_addr) -> (Ip6, u16) {
        unsafe {
            let w = [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ];
            (from_words6(w), u16::from_be((*sa).user_port as u16))
        }
    }
    #[inline(always)]
    fn sock_set(sa: *mut bpf_sock_addr, ip: &Ip6, port: u16) {
        let w = words6(ip);
        unsafe {
            (*sa).user_ip6[0] = w[0];
            (*sa).user_ip6[1] = w[1];
            (*sa).user_ip6[2] = w[2];
            (*sa).user_ip6[3] = w[3];
            (*sa).user_port = port.to_be() as u32;
        }
    }
    #[inline(always)]
    fn rev_put(cookie: u64, to: &Ip6, to_port: u16, ip: &Ip6, port: u16, flags: u64) -> bool {
        let key = SockRevKey6 {
            cookie,
            ip: *to,
            port: to_port,
            _pad: [0; 6],
        };
        let rev = SockRevValue6 {
            ip: *ip,
            port,
            _pad: 0,
        };
        SOCK_REV6.insert(key, rev, flags).is_ok()
    }
    #[inline(always)]
    fn rev_get(cookie: u64, to: &Ip6, to_port: u16) -> Option<(Ip6, u16)> {
        let key = SockRevKey6 {
            cookie,
            ip: *to,
            port: to_port,
            _pad: [0; 6],
        };
        unsafe { SOCK_REV6.get(key) }.map(|v| (v.ip, v.port))
    }
}
