//! A user-space model of md's datapath decisions, for the model-based property test
//! (`tests/datapath_model.rs`).
//!
//! The model holds what md-user puts in the maps (endpoints, networks, host addresses,
//! published ports, policy rules, CONFIG) and the state the programs keep (the two trackers,
//! FRAGS, per-interface counters, port hits, rule drop counters), and runs a frame through the
//! same decisions as md-ebpf's TC programs (uplink.rs, veth.rs, nat.rs, ct.rs, frag.rs,
//! route.rs), on a copy of the frame with the same helper semantics (bounds-checked loads and
//! stores, the kernel's incremental checksum arithmetic for `bpf_l3/l4_csum_replace` on a
//! CHECKSUM_NONE skb). The property test compares verdict, bytes and every map after each step.
//!
//! Two things the model cannot know are handed to it: the clock (each step runs between two
//! readings of the tracker's clock, CLOCK_MONOTONIC_COARSE, so expiries are windows) and the
//! NAT port the datapath picked at random (read from the real output; the model checks it was
//! free and in range). The host's routing is the private namespace the test builds (see
//! [`Routing`]).

use std::collections::BTreeMap;

use md_common::{
    Config, CtEntry, CtKey, IfStats, Ip4, PolicyRule, PortTarget, CT_DIR_ORIGINAL, CT_DIR_REPLY,
    CT_HOOK_UPLINK, CT_HOOK_VETH, CT_KIND_DNAT, CT_KIND_HAIRPIN, CT_KIND_NONE, CT_KIND_SNAT,
    DATAPATH_REDIRECT, DROP_FORWARD, DROP_ISOLATION, DROP_MALFORMED, DROP_NAT_PORTS,
    DROP_NO_SOURCE, DROP_POLICY, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, HOST_ADDR_GATEWAY,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, POLICY_DENY, RESOLVER_PORT, TCP_CLOSING,
    TCP_ESTABLISHED, TCP_FIN_ORIGINAL, TCP_FIN_REPLY, TCP_NONE, TCP_SYN_RECV, TCP_SYN_SENT,
};

pub const ETH_HLEN: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS: u64 = 1_000_000_000;
/// Linux keeps an incomplete datagram 30 s (frag.rs).
const FRAG_LIFETIME_NS: u64 = 30 * NS;
const NAT_PORT_TRIES: u32 = 32;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// TC return codes as BPF_PROG_TEST_RUN reports them.
pub const RC_PASS: u32 = u32::MAX; // TCX_NEXT (-1)
pub const RC_SHOT: u32 = 2;
pub const RC_REDIRECT: u32 = 7;

/// A map key as an ordered tuple (md_common's keys are not `Ord`).
pub type K = (Ip4, Ip4, u16, u16, u8);

pub fn k(c: &CtKey) -> K {
    (c.saddr, c.daddr, c.sport, c.dport, c.proto)
}

pub fn ck(t: &K) -> CtKey {
    CtKey::new(t.0, t.1, t.2, t.3, t.4)
}

/// When an entry dies: a window of CLOCK_MONOTONIC_COARSE nanoseconds (the step that set it ran
/// between two clock readings), or already dead (the test aged it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Dead,
    Window(u64, u64),
}

impl Expiry {
    fn live(self) -> bool {
        self != Expiry::Dead
    }
    /// Whether a map's `expires_ns` is what the model expects.
    pub fn admits(self, ns: u64) -> bool {
        match self {
            Expiry::Dead => ns <= 1,
            Expiry::Window(lo, hi) => (lo..=hi).contains(&ns),
        }
    }
}

/// One tracker entry: the map's value (its `expires_ns` and `partner_expires_ns` unused), its
/// expiry and the expiry it last gave its other half.
#[derive(Clone, Copy, Debug)]
pub struct Ent {
    pub e: CtEntry,
    pub exp: Expiry,
    pub pexp: Expiry,
}

impl Ent {
    /// An entry that has just given its other half its own expiry.
    fn synced(e: CtEntry, exp: Expiry) -> Self {
        Ent { e, exp, pexp: exp }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct FragM {
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub exp: Expiry,
}

// ---------------------------------------------------------------------------------------------
// The skb and the helpers

/// A frame as the helpers see it: loads and stores fail past its end.
pub struct Skb {
    pub data: Vec<u8>,
}

/// A helper failed (the kernel's -EFAULT: past the end, an odd checksum offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault;

type R = Result<(), Fault>;

fn add32(a: u32, b: u32) -> u32 {
    let (r, c) = a.overflowing_add(b);
    r.wrapping_add(c as u32)
}

/// The kernel's csum_fold: 32-bit ones' complement sum folded to 16 bits, complemented.
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

impl Skb {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.data.get(off..off + N).map(|b| b.try_into().unwrap())
    }

    pub fn store(&mut self, off: usize, b: &[u8]) -> R {
        let d = self.data.get_mut(off..off + b.len()).ok_or(Fault)?;
        d.copy_from_slice(b);
        Ok(())
    }

    fn sum_field(&mut self, off: usize) -> Result<&mut [u8], Fault> {
        if off & 1 != 0 {
            return Err(Fault);
        }
        self.data.get_mut(off..off + 2).ok_or(Fault)
    }

    /// csum_replace4 on the field at `off` (values as the helpers take them: raw network
    /// order bytes read as a native integer).
    fn replace4(f: &mut [u8], from: u32, to: u32) {
        let sum = u16::from_ne_bytes([f[0], f[1]]);
        // csum_fold(csum_add(csum_sub(~csum_unfold(sum), from), to))
        let s = add32(add32(!(sum as u32) & 0xffff, !from), to);
        f.copy_from_slice(&fold(s).to_ne_bytes());
    }

    /// csum_replace2: 16-bit arithmetic.
    fn replace2(f: &mut [u8], old: u16, new: u16) {
        fn add16(a: u16, b: u16) -> u16 {
            let r = a.wrapping_add(b);
            r.wrapping_add((r < b) as u16)
        }
        let sum = u16::from_ne_bytes([f[0], f[1]]);
        let r = !add16(add16(!sum, !old), new);
        f.copy_from_slice(&r.to_ne_bytes());
    }

    /// bpf_l3_csum_replace (size 2 or 4).
    pub fn l3_csum_replace(&mut self, off: usize, from: u64, to: u64, size: u64) -> R {
        let f = self.sum_field(off)?;
        match size {
            2 => Self::replace2(f, from as u16, to as u16),
            4 => Self::replace4(f, from as u32, to as u32),
            _ => return Err(Fault),
        }
        Ok(())
    }

    /// bpf_l4_csum_replace on a CHECKSUM_NONE skb: the pseudo-header flag changes nothing
    /// there; MARK_MANGLED_0 keeps a zero (UDP "no checksum") and never produces one.
    pub fn l4_csum_replace(&mut self, off: usize, from: u64, to: u64, flags: u64) -> R {
        let mm0 = flags & BPF_F_MARK_MANGLED_0 != 0;
        let f = self.sum_field(off)?;
        if mm0 && f == [0, 0] {
            return Ok(());
        }
        match flags & 0xf {
            2 => Self::replace4(f, from as u16 as u32, to as u16 as u32),
            4 => Self::replace4(f, from as u32, to as u32),
            _ => return Err(Fault),
        }
        if mm0 && f == [0, 0] {
            f.copy_from_slice(&[0xff, 0xff]);
        }
        Ok(())
    }
}

fn raw32(a: Ip4) -> u64 {
    u32::from_ne_bytes(a) as u64
}

fn raw16(port: u16) -> u64 {
    u16::from_ne_bytes(port.to_be_bytes()) as u64
}

// ---------------------------------------------------------------------------------------------
// Parsing (parse.rs)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Ports,
    IcmpError,
    Opaque,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    None,
    First,
    Later,
}

#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    pub l3_off: usize,
    pub l4_off: usize,
    pub len: u32,
    pub proto: u8,
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub l4: L4,
    pub frag: Frag,
    pub ip_id: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub seq_len: u32,
    pub truncated: bool,
}

impl Pkt {
    pub fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }
}

pub enum Parsed {
    Ipv4(Pkt),
    Arp,
    Other,
    Malformed,
}

pub fn parse_ipv4_at(s: &Skb, l3: usize) -> Option<Pkt> {
    let ip: [u8; 20] = s.load(l3)?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = frag & 0x1fff;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let mut p = Pkt {
        l3_off: l3,
        l4_off: l3 + ihl,
        len: s.len() as u32,
        proto: ip[9],
        saddr: ip[12..16].try_into().unwrap(),
        daddr: ip[16..20].try_into().unwrap(),
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        l4: L4::Opaque,
        frag: if offset != 0 {
            Frag::Later
        } else if frag & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::None
        },
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
        seq: 0,
        ack_seq: 0,
        seq_len: 0,
        truncated: false,
    };
    if p.frag == Frag::Later {
        return Some(p);
    }
    let l4 = p.l4_off;
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            if let Some(ports) = s.load::<4>(l4) {
                p.sport = u16::from_be_bytes([ports[0], ports[1]]);
                p.dport = u16::from_be_bytes([ports[2], ports[3]]);
                p.l4 = L4::Ports;
            }
            let full = if p.proto == IPPROTO_TCP { 20 } else { 8 };
            match s.load::<1>(l4 + full - 1) {
                Some(_) if p.proto == IPPROTO_TCP => {
                    let t: [u8; 14] = s.load(l4).unwrap();
                    p.seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                    p.ack_seq = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
                    p.tcp_flags = t[13];
                    let doff = ((t[12] >> 4) as u32) * 4;
                    let data = tot_len.saturating_sub(ihl as u32 + doff);
                    p.seq_len = data
                        + (p.tcp_flags & TCP_SYN != 0) as u32
                        + (p.tcp_flags & TCP_FIN != 0) as u32;
                }
                Some(_) => {}
                None => p.truncated = true,
            }
        }
        IPPROTO_ICMP => {
            if let Some(h) = s.load::<6>(l4) {
                p.icmp_type = h[0];
                let id = u16::from_be_bytes([h[4], h[5]]);
                match h[0] {
                    8 => {
                        p.sport = id;
                        p.l4 = L4::Ports;
                    }
                    0 => {
                        p.dport = id;
                        p.l4 = L4::Ports;
                    }
                    3 | 11 | 12 => p.l4 = L4::IcmpError,
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Some(p)
}

pub fn parse(s: &Skb) -> Parsed {
    match s.load::<2>(12).map(u16::from_be_bytes) {
        Some(0x0800) => match parse_ipv4_at(s, ETH_HLEN) {
            Some(mut p) => {
                if p.truncated {
                    p.l4 = L4::Opaque;
                }
                Parsed::Ipv4(p)
            }
            None => Parsed::Malformed,
        },
        Some(0x0806) => Parsed::Arp,
        _ => Parsed::Other,
    }
}

// ---------------------------------------------------------------------------------------------
// Rewrites (csum.rs)

fn l4_csum(p: &Pkt) -> Option<(usize, u64)> {
    if p.l4 != L4::Ports {
        return None;
    }
    match p.proto {
        IPPROTO_TCP => Some((p.l4_off + 16, 0)),
        IPPROTO_UDP => Some((p.l4_off + 6, BPF_F_MARK_MANGLED_0)),
        _ => None,
    }
}

fn set_addr(s: &mut Skb, p: &Pkt, src: bool, from: Ip4, to: Ip4) -> R {
    if let Some((off, flags)) = l4_csum(p) {
        s.l4_csum_replace(off, raw32(from), raw32(to), flags | BPF_F_PSEUDO_HDR | 4)?;
    }
    s.l3_csum_replace(p.l3_off + 10, raw32(from), raw32(to), 4)?;
    s.store(p.l3_off + if src { 12 } else { 16 }, &to)
}

fn set_port(s: &mut Skb, p: &Pkt, src: bool, from: u16, to: u16) -> R {
    match p.proto {
        IPPROTO_ICMP => {
            // As csum::set_port: from the identifier the field holds.
            let cur = u16::from_be_bytes(s.load::<2>(p.l4_off + 4).ok_or(Fault)?);
            s.l4_csum_replace(p.l4_off + 2, raw16(cur), raw16(to), 2)?;
            s.store(p.l4_off + 4, &to.to_be_bytes())
        }
        _ => {
            let (off, flags) = l4_csum(p).ok_or(Fault)?;
            s.l4_csum_replace(off, raw16(from), raw16(to), flags | 2)?;
            s.store(p.l4_off + if src { 0 } else { 2 }, &to.to_be_bytes())
        }
    }
}

pub fn rewrite(s: &mut Skb, p: &Pkt, to: &CtKey) -> R {
    if to.saddr != p.saddr {
        set_addr(s, p, true, p.saddr, to.saddr)?;
    }
    if to.daddr != p.daddr {
        set_addr(s, p, false, p.daddr, to.daddr)?;
    }
    if to.sport != p.sport {
        set_port(s, p, true, p.sport, to.sport)?;
    }
    if to.dport != p.dport {
        set_port(s, p, false, p.dport, to.dport)?;
    }
    Ok(())
}

fn rewrite_quoted(s: &mut Skb, outer: &Pkt, inner: &Pkt, to: &CtKey) -> R {
    let icmp_csum = outer.l4_off + 2;
    let l3 = inner.l3_off;
    for (from, new, field) in [(inner.saddr, to.saddr, 12), (inner.daddr, to.daddr, 16)] {
        if from != new {
            let before: [u8; 2] = s.load(l3 + 10).ok_or(Fault)?;
            s.l3_csum_replace(l3 + 10, raw32(from), raw32(new), 4)?;
            let after: [u8; 2] = s.load(l3 + 10).ok_or(Fault)?;
            s.store(l3 + field, &new)?;
            s.l4_csum_replace(icmp_csum, raw32(from), raw32(new), 4)?;
            s.l4_csum_replace(
                icmp_csum,
                u16::from_ne_bytes(before) as u64,
                u16::from_ne_bytes(after) as u64,
                2,
            )?;
        }
    }
    for (from, new, field) in [(inner.sport, to.sport, 0), (inner.dport, to.dport, 2)] {
        if from != new {
            let off = if inner.proto == IPPROTO_ICMP {
                4
            } else {
                field
            };
            s.store(inner.l4_off + off, &new.to_be_bytes())?;
            s.l4_csum_replace(icmp_csum, raw16(from), raw16(new), 2)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The world md-user describes

/// A container slot: fixed address, MAC, identity and host-side veth; running or not.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub ip: Ip4,
    pub net_id: u32,
    pub ifindex: u32,
    pub identity: u32,
    pub mac: [u8; 6],
}

#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub id: u32,
    pub gateway: Ip4,
    pub subnet: Ip4,
    pub prefix_len: u8,
    pub gateway_mac: [u8; 6],
}

impl Net {
    pub fn contains(&self, ip: &Ip4) -> bool {
        let mask = u32::MAX << (32 - self.prefix_len as u32);
        u32::from_be_bytes(*ip) & mask == u32::from_be_bytes(self.subnet) & mask
    }
}

/// What the test namespace's routing answers (route.rs asks it through bpf_fib_lookup): the
/// uplink has the host addresses, a connected /24 and a default route; forwarding is on.
#[derive(Clone, Debug)]
pub struct Routing {
    /// Addresses the uplink's lookups see as local or broadcast (not unicast routes).
    pub not_unicast_out: Vec<Ip4>,
    /// The source address a lookup out of the uplink picks.
    pub primary: Ip4,
}

impl Routing {
    /// `masquerade_source`: the source for a packet to `d` out of the uplink.
    pub fn fib_src(&self, d: &Ip4) -> Option<Ip4> {
        (!self.not_unicast_out.contains(d)).then_some(self.primary)
    }

    /// `forwarded`: whether the host would route a packet arriving on the uplink out again.
    pub fn forwarded(&self, d: &Ip4) -> bool {
        !(self.not_unicast_out.contains(d) || d[0] == 127)
    }
}

/// The decision for one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub rc: u32,
    /// The frame as the program leaves it.
    pub frame: Vec<u8>,
    /// Drop reason and the interface it is counted on.
    pub drop: Option<(u8, u32)>,
}

pub enum Verdict {
    Pass,
    Redirect(u32),
    Drop(u8),
    Icmp,
}

/// Which TC program a frame runs through, and the skb's ifindex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    VethIngress(u32),
    VethEgress(u32),
    UplinkIngress,
    UplinkEgress,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub slots: Vec<Slot>,
    pub running: Vec<bool>,
    pub nets: Vec<Net>,
    pub host_addrs: BTreeMap<Ip4, u32>,
    pub ports: BTreeMap<(Ip4, u16, u8), PortTarget>,
    pub policy: BTreeMap<(u32, u32), PolicyRule>,
    pub cfg: Config,
    /// [answered (CONNTRACK), unanswered (CONNTRACK_NEW)].
    pub ct: [BTreeMap<K, Ent>; 2],
    pub frags: BTreeMap<(Ip4, Ip4, u16, u8), FragM>,
    pub stats: BTreeMap<u32, IfStats>,
    pub uplink_ifindex: u32,
    pub routing: Routing,
    /// The clock window of the current step.
    now: (u64, u64),
    /// The NAT port the datapath chose in this step, read from its output.
    oracle: Option<u16>,
}

const ANSWERED: usize = 0;
const NEW: usize = 1;

/// A live entry found by lookup: its map and key.
#[derive(Clone, Copy)]
struct Found {
    map: usize,
    key: K,
}

struct Spec {
    kind: u8,
    hook: u8,
    port: u8,
    orig_ifindex: u32,
    reply_ifindex: u32,
    orig_identity: u32,
    reply_identity: u32,
}

const PORT_KEEP: u8 = 0;
const PORT_KEEP_OR_REMAP: u8 = 1;
const PORT_ALLOCATE: u8 = 2;

fn entry(nat: &CtKey, kind: u8, dir: u8, hook: u8, ifindex: u32, identity: u32) -> CtEntry {
    CtEntry {
        nat_saddr: nat.saddr,
        nat_daddr: nat.daddr,
        nat_sport: nat.sport,
        nat_dport: nat.dport,
        kind,
        dir,
        hook,
        ifindex,
        identity,
        ..Default::default()
    }
}

fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

fn track_seq(me: &mut CtEntry, p: &Pkt) {
    if p.tcp_flags & TCP_RST != 0 {
        return;
    }
    let end = p.seq.wrapping_add(p.seq_len);
    if me.seq_next == 0 || !seq_ge(me.seq_next, end) {
        me.seq_next = end;
    }
    if p.tcp_flags & TCP_ACK != 0 && (me.ack == 0 || !seq_ge(me.ack, p.ack_seq)) {
        me.ack = p.ack_seq;
    }
}

fn rst_in_window(p: &Pkt, me: &CtEntry, other: Option<&CtEntry>) -> bool {
    let Some(o) = other else {
        return true;
    };
    if p.tcp_flags & TCP_ACK != 0 && o.seq_next != 0 && p.ack_seq == o.seq_next {
        return true;
    }
    if o.ack == 0 {
        return false;
    }
    let hi = if me.seq_next != 0 && seq_ge(me.seq_next, o.ack) {
        me.seq_next
    } else {
        o.ack
    };
    seq_ge(p.seq, o.ack) && seq_ge(hi, p.seq)
}

fn next_state(state: u8, dir: u8, p: &Pkt, me: &CtEntry, other: Option<&CtEntry>) -> u8 {
    let flags = p.tcp_flags;
    if flags & TCP_RST != 0 {
        return if rst_in_window(p, me, other) {
            TCP_CLOSING
        } else {
            state
        };
    }
    let mut s = state;
    if s == TCP_SYN_SENT && dir == CT_DIR_REPLY && flags & TCP_ACK != 0 {
        s = TCP_SYN_RECV;
    } else if s == TCP_SYN_RECV
        && dir == CT_DIR_ORIGINAL
        && flags & TCP_ACK != 0
        && flags & TCP_SYN == 0
    {
        s = TCP_ESTABLISHED;
    }
    if flags & TCP_FIN != 0 {
        let fin_here = if dir == CT_DIR_ORIGINAL {
            TCP_FIN_ORIGINAL
        } else {
            TCP_FIN_REPLY
        };
        s = match s {
            TCP_ESTABLISHED => fin_here,
            TCP_FIN_ORIGINAL | TCP_FIN_REPLY if s != fin_here => TCP_CLOSING,
            _ => s,
        };
    } else if s == TCP_CLOSING
        && dir == CT_DIR_ORIGINAL
        && flags & TCP_SYN != 0
        && flags & TCP_ACK == 0
    {
        s = TCP_SYN_SENT;
    }
    s
}

fn initial_state(p: &Pkt) -> u8 {
    if p.proto != IPPROTO_TCP {
        TCP_NONE
    } else if p.tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        TCP_CLOSING
    } else {
        TCP_SYN_SENT
    }
}

fn answered_by(proto: u8, state: u8, dir: u8) -> bool {
    if proto == IPPROTO_TCP {
        matches!(state, TCP_ESTABLISHED | TCP_FIN_ORIGINAL | TCP_FIN_REPLY)
    } else {
        dir == CT_DIR_REPLY
    }
}

fn opens_flow(p: &Pkt) -> bool {
    p.proto != IPPROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

impl Model {
    pub fn new(
        slots: Vec<Slot>,
        nets: Vec<Net>,
        cfg: Config,
        uplink_ifindex: u32,
        routing: Routing,
    ) -> Self {
        let running = vec![false; slots.len()];
        Model {
            slots,
            running,
            nets,
            host_addrs: BTreeMap::new(),
            ports: BTreeMap::new(),
            policy: BTreeMap::new(),
            cfg,
            ct: [BTreeMap::new(), BTreeMap::new()],
            frags: BTreeMap::new(),
            stats: BTreeMap::new(),
            uplink_ifindex,
            routing,
            now: (0, 0),
            oracle: None,
        }
    }

    /// The endpoint at `ip`: a running slot.
    pub fn endpoint(&self, ip: &Ip4) -> Option<Slot> {
        self.slots
            .iter()
            .zip(&self.running)
            .find(|(s, r)| **r && s.ip == *ip)
            .map(|(s, _)| *s)
    }

    fn owner(&self, ifindex: u32) -> Option<Slot> {
        self.slots
            .iter()
            .zip(&self.running)
            .find(|(s, r)| **r && s.ifindex == ifindex)
            .map(|(s, _)| *s)
    }

    pub fn in_md_subnet(&self, ip: &Ip4) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    fn net(&self, id: u32) -> Option<Net> {
        self.nets.iter().find(|n| n.id == id).copied()
    }

    fn is_host_addr(&self, ip: &Ip4) -> bool {
        self.host_addrs.contains_key(ip)
    }

    fn is_gateway(&self, ip: &Ip4) -> bool {
        self.host_addrs
            .get(ip)
            .is_some_and(|f| f & HOST_ADDR_GATEWAY != 0)
    }

    fn count(&mut self, ifindex: u32, f: impl FnOnce(&mut IfStats)) {
        if let Some(s) = self.stats.get_mut(&ifindex) {
            f(s);
        }
    }

    fn lifetime_ns(&self, proto: u8, state: u8) -> u64 {
        let c = &self.cfg;
        let secs = match (proto, state) {
            (IPPROTO_TCP, TCP_SYN_SENT | TCP_SYN_RECV) => c.ct_tcp_syn_secs,
            (IPPROTO_TCP, TCP_CLOSING) => c.ct_tcp_closing_secs,
            (IPPROTO_TCP, _) => c.ct_tcp_established_secs,
            (IPPROTO_ICMP, _) => c.ct_icmp_secs,
            _ => c.ct_udp_secs,
        };
        secs as u64 * NS
    }

    fn expiry(&self, proto: u8, state: u8) -> Expiry {
        let l = self.lifetime_ns(proto, state);
        Expiry::Window(self.now.0 + l, self.now.1 + l)
    }

    // --- policy.rs

    fn allowed(&mut self, src: u32, dst: u32) -> bool {
        if src == dst || src == 0 || dst == 0 {
            return true;
        }
        match self.policy.get_mut(&(src, dst)) {
            Some(rule) if rule.verdict == POLICY_DENY => {
                rule.drops += 1;
                false
            }
            Some(_) => true,
            None => self.cfg.policy_default != POLICY_DENY,
        }
    }

    // --- ct.rs

    fn lookup(&self, key: &CtKey) -> Option<Found> {
        let key = k(key);
        for map in [ANSWERED, NEW] {
            if let Some(e) = self.ct[map].get(&key) {
                if e.exp.live() {
                    return Some(Found { map, key });
                }
            }
        }
        None
    }

    fn get(&self, f: Found) -> CtEntry {
        self.ct[f.map][&f.key].e
    }

    /// ct::touch. The other half is looked up for a RST, an unanswered flow, a state change, or
    /// when the lifetime moved more than REFRESH_NS (1 s) since the last refresh; a steady flow
    /// leaves it alone.
    fn touch(&mut self, f: Found, p: &Pkt) {
        let mut entry = self.ct[f.map][&f.key].e;
        let old_pexp = self.ct[f.map][&f.key].pexp;
        let answered = f.map == ANSWERED;
        let partner = entry.nat_tuple(p.proto).reversed();
        let rst = p.proto == IPPROTO_TCP && p.tcp_flags & TCP_RST != 0;
        // Only an entry that leads back is the other half (ct::other_half).
        let key = p.key();
        let lookup_other = |m: &Model| {
            m.ct[f.map]
                .get(&k(&partner))
                .map(|o| o.e)
                .filter(|o| o.nat_tuple(p.proto).reversed() == key)
        };
        let other = if rst || !answered {
            lookup_other(self)
        } else {
            None
        };
        let state = if p.proto == IPPROTO_TCP {
            let s = next_state(entry.tcp_state, entry.dir, p, &entry, other.as_ref());
            track_seq(&mut entry, p);
            s
        } else {
            TCP_NONE
        };
        let exp = self.expiry(p.proto, state);
        // Steps run in milliseconds: a lifetime moving more than a second past what the other
        // half was given means a new class (that is a state change anyway) or an entry set
        // long ago.
        let aged = match (old_pexp, exp) {
            (Expiry::Window(_, hi), Expiry::Window(lo, _)) => lo > hi + NS,
            _ => true,
        };
        let refresh = !answered || rst || state != entry.tcp_state || aged;
        entry.tcp_state = state;
        entry.packets += 1;
        entry.bytes += p.len as u64;
        self.ct[f.map].insert(
            f.key,
            Ent {
                e: entry,
                exp,
                pexp: if refresh { exp } else { old_pexp },
            },
        );
        if !refresh {
            return;
        }
        let other = other.or_else(|| lookup_other(self));
        match other {
            Some(_) => {
                let o = self.ct[f.map].get_mut(&k(&partner)).unwrap();
                o.e.tcp_state = state;
                o.exp = exp;
                o.pexp = exp;
            }
            None if entry.dir == CT_DIR_ORIGINAL => {
                let mut back = self::entry(
                    &p.key().reversed(),
                    entry.kind,
                    CT_DIR_REPLY,
                    entry.hook,
                    entry.ifindex,
                    0,
                );
                back.tcp_state = state;
                self.ct[f.map]
                    .entry(k(&partner))
                    .or_insert(Ent::synced(back, exp));
            }
            None => {}
        }
        if !answered && answered_by(p.proto, state, entry.dir) {
            let mut halves = vec![k(&p.key())];
            if self.ct[NEW]
                .get(&k(&partner))
                .is_some_and(|o| o.e.nat_tuple(p.proto).reversed() == key)
            {
                halves.push(k(&partner));
            }
            for h in halves {
                if let Some(e) = self.ct[NEW].remove(&h) {
                    self.ct[ANSWERED].insert(h, e);
                }
            }
        }
    }

    /// ct::create: both halves into CONNTRACK_NEW, or Err on a clash.
    fn create(
        &mut self,
        orig: &CtKey,
        orig_e: &mut CtEntry,
        reply: &CtKey,
        reply_e: &mut CtEntry,
        p: &Pkt,
    ) -> R {
        let (ko, kr) = (k(orig), k(reply));
        if self.ct[ANSWERED].get(&kr).is_some_and(|e| e.exp.live()) {
            return Err(Fault);
        }
        let state = initial_state(p);
        let exp = self.expiry(p.proto, state);
        orig_e.tcp_state = state;
        orig_e.packets = 1;
        orig_e.bytes = p.len as u64;
        if p.proto == IPPROTO_TCP {
            track_seq(orig_e, p);
        }
        reply_e.tcp_state = state;
        if self.ct[NEW].get(&kr).is_some_and(|e| e.exp.live()) {
            return Err(Fault);
        }
        self.ct[NEW].insert(kr, Ent::synced(*reply_e, exp));
        self.ct[NEW].insert(ko, Ent::synced(*orig_e, exp));
        Ok(())
    }

    /// ct::open. With PORT_ALLOCATE (or a clash under PORT_KEEP_OR_REMAP) the port is the one
    /// the datapath reported (`oracle`): it must be in range and free, and it can only be
    /// missing when every port of the range (at most 32, all tried) is taken.
    fn open(&mut self, p: &Pkt, nat: &mut CtKey, spec: &Spec) -> Result<bool, String> {
        let orig = p.key();
        let mut reply = nat.reversed();
        let mut orig_e = entry(
            nat,
            spec.kind,
            CT_DIR_ORIGINAL,
            spec.hook,
            spec.orig_ifindex,
            spec.orig_identity,
        );
        let mut reply_e = entry(
            &orig.reversed(),
            spec.kind,
            CT_DIR_REPLY,
            spec.hook,
            spec.reply_ifindex,
            spec.reply_identity,
        );
        if spec.port != PORT_ALLOCATE
            && self
                .create(&orig, &mut orig_e, &reply, &mut reply_e, p)
                .is_ok()
        {
            return Ok(true);
        }
        if spec.port == PORT_KEEP {
            return Ok(false);
        }
        let (min, max) = (self.cfg.nat_port_min as u32, self.cfg.nat_port_max as u32);
        let span = max.saturating_sub(min) + 1;
        assert!(
            span <= NAT_PORT_TRIES,
            "the model needs a NAT range of at most 32 ports"
        );
        let free = |m: &Model, port: u16| {
            let mut r = reply;
            r.dport = port;
            let kr = k(&r);
            !(m.ct[ANSWERED].get(&kr).is_some_and(|e| e.exp.live())
                || m.ct[NEW].get(&kr).is_some_and(|e| e.exp.live()))
        };
        let any_free = (min..=max).any(|port| free(self, port as u16));
        match self.oracle {
            Some(port) if any_free => {
                if !(min..=max).contains(&(port as u32)) {
                    return Err(format!("NAT port {port} outside {min}-{max}"));
                }
                if !free(self, port) {
                    return Err(format!(
                        "NAT port {port} chosen but its reply tuple is taken"
                    ));
                }
                reply.dport = port;
                orig_e.nat_sport = port;
                self.create(&orig, &mut orig_e, &reply, &mut reply_e, p)
                    .map_err(|_| "create failed on a free port".to_string())?;
                nat.sport = port;
                Ok(true)
            }
            _ if any_free => Err("a NAT port was free but the datapath took none".into()),
            _ => Ok(false),
        }
    }

    // --- frag.rs

    fn remember(&mut self, p: &Pkt, to: &CtKey) {
        if p.frag != Frag::First {
            return;
        }
        self.frags.insert(
            (p.saddr, p.daddr, p.ip_id, p.proto),
            FragM {
                saddr: to.saddr,
                daddr: to.daddr,
                exp: Expiry::Window(self.now.0 + FRAG_LIFETIME_NS, self.now.1 + FRAG_LIFETIME_NS),
            },
        );
    }

    fn follow(&self, s: &mut Skb, p: &Pkt) -> Option<R> {
        if p.frag != Frag::Later {
            return None;
        }
        let e = self.frags.get(&(p.saddr, p.daddr, p.ip_id, p.proto))?;
        if !e.exp.live() {
            return None;
        }
        let mut to = p.key();
        to.saddr = e.saddr;
        to.daddr = e.daddr;
        Some(rewrite(s, p, &to))
    }

    // --- nat.rs

    fn port_lookup(&self, ip: &Ip4, port: u16, proto: u8) -> Option<(Ip4, u16, u8)> {
        if port == RESOLVER_PORT && self.is_gateway(ip) {
            return None;
        }
        [(*ip, port, proto), ([0; 4], port, proto)]
            .into_iter()
            .find(|key| self.ports.contains_key(key))
    }

    // --- fwd.rs (CONFIG.datapath)

    fn redirecting(&self) -> bool {
        self.cfg.datapath == DATAPATH_REDIRECT
    }

    /// ttl_down: false when the TTL would reach 0 (the stack answers then).
    fn ttl_down(s: &mut Skb, l3: usize) -> Result<bool, Fault> {
        let w: [u8; 2] = s.load(l3 + 8).ok_or(Fault)?;
        if w[0] <= 1 {
            return Ok(false);
        }
        let new = [w[0] - 1, w[1]];
        s.l3_csum_replace(
            l3 + 10,
            u16::from_ne_bytes(w) as u64,
            u16::from_ne_bytes(new) as u64,
            2,
        )?;
        s.store(l3 + 8, &new[..1])?;
        Ok(true)
    }

    fn count_in(&mut self, len: usize, ep: &Slot) {
        self.count(ep.ifindex, |st| {
            st.ingress_packets += 1;
            st.ingress_bytes += len as u64;
            st.redirected += 1;
        });
    }

    /// fwd::into_container.
    fn deliver_to(&mut self, s: &mut Skb, ep: &Slot, from_ingress: bool, routed: bool) -> Verdict {
        let Some(net) = self.net(ep.net_id) else {
            return Verdict::Pass;
        };
        if routed {
            match Self::ttl_down(s, ETH_HLEN) {
                Ok(true) => {}
                Ok(false) => return Verdict::Pass,
                Err(_) => return Verdict::Drop(DROP_MALFORMED),
            }
        }
        if s.store(0, &ep.mac).is_err() || s.store(6, &net.gateway_mac).is_err() {
            return Verdict::Drop(DROP_MALFORMED);
        }
        if from_ingress && self.redirecting() {
            self.count_in(s.len(), ep);
        }
        Verdict::Redirect(RC_REDIRECT)
    }

    /// fwd::inbound, at uplink ingress (Ethernet uplinks only here).
    fn inbound(&mut self, s: &mut Skb, daddr: &Ip4) -> Verdict {
        if !self.redirecting() {
            return Verdict::Pass;
        }
        match self.endpoint(daddr) {
            Some(ep) => self.deliver_to(s, &ep, true, true),
            None => Verdict::Pass,
        }
    }

    fn between_containers(&mut self, s: &Skb, dst: &Slot) -> Verdict {
        if !self.redirecting() || s.load::<6>(0) != Some(dst.mac) {
            return Verdict::Pass;
        }
        self.count_in(s.len(), dst);
        Verdict::Redirect(RC_REDIRECT)
    }

    /// fwd::outbound: the test's NETWORKS carry no bridge ifindex, so the FIB lookup from the
    /// bridge fails and the packet takes the stack (tests/fastpath.rs covers this redirect end
    /// to end).
    fn outbound(&self) -> Verdict {
        Verdict::Pass
    }

    fn deliver(&mut self, s: &mut Skb, daddr: &Ip4) -> Verdict {
        let Some(ep) = self.endpoint(daddr) else {
            return Verdict::Pass;
        };
        self.deliver_to(s, &ep, true, false)
    }

    fn count_dnat(&mut self, key: (Ip4, u16, u8)) {
        let t = self.ports.get_mut(&key).unwrap();
        t.hits += 1;
        let ip = t.ip;
        if let Some(ep) = self.endpoint(&ip) {
            self.count(ep.ifindex, |s| s.dnat += 1);
        }
    }

    fn dnat_from_uplink(
        &mut self,
        s: &mut Skb,
        p: &Pkt,
        key: (Ip4, u16, u8),
    ) -> Result<Verdict, String> {
        let t = self.ports[&key];
        let mut nat = CtKey::new(p.saddr, t.ip, p.sport, t.port, p.proto);
        let spec = Spec {
            kind: CT_KIND_DNAT,
            hook: CT_HOOK_UPLINK,
            port: PORT_KEEP_OR_REMAP,
            orig_ifindex: 0,
            reply_ifindex: 0,
            orig_identity: t.identity,
            reply_identity: 0,
        };
        if !self.open(p, &mut nat, &spec)? {
            return Ok(Verdict::Drop(DROP_NAT_PORTS));
        }
        self.count_dnat(key);
        if rewrite(s, p, &nat).is_err() {
            return Ok(Verdict::Drop(DROP_MALFORMED));
        }
        self.remember(p, &nat);
        Ok(self.inbound(s, &nat.daddr))
    }

    fn dnat_from_container(
        &mut self,
        s: &mut Skb,
        p: &Pkt,
        src: &Slot,
        key: (Ip4, u16, u8),
    ) -> Result<Verdict, String> {
        let t = self.ports[&key];
        let (mut nat, kind, port) = if t.ip == p.saddr {
            let Some(net) = self.net(src.net_id) else {
                return Ok(Verdict::Drop(DROP_MALFORMED));
            };
            (
                CtKey::new(net.gateway, t.ip, 0, t.port, p.proto),
                CT_KIND_HAIRPIN,
                PORT_ALLOCATE,
            )
        } else {
            (
                CtKey::new(p.saddr, t.ip, p.sport, t.port, p.proto),
                CT_KIND_DNAT,
                PORT_KEEP_OR_REMAP,
            )
        };
        let spec = Spec {
            kind,
            hook: CT_HOOK_VETH,
            port,
            orig_ifindex: src.ifindex,
            reply_ifindex: src.ifindex,
            orig_identity: t.identity,
            reply_identity: src.identity,
        };
        if !self.open(p, &mut nat, &spec)? {
            return Ok(Verdict::Drop(DROP_NAT_PORTS));
        }
        self.count_dnat(key);
        if rewrite(s, p, &nat).is_err() {
            return Ok(Verdict::Drop(DROP_MALFORMED));
        }
        Ok(self.deliver(s, &nat.daddr))
    }

    fn snat(&mut self, s: &mut Skb, p: &Pkt, addr: Ip4) -> Result<Verdict, String> {
        let (ifindex, identity) = self
            .endpoint(&p.saddr)
            .map(|e| (e.ifindex, e.identity))
            .unwrap_or((0, 0));
        let mut nat = CtKey::new(addr, p.daddr, 0, p.dport, p.proto);
        let spec = Spec {
            kind: CT_KIND_SNAT,
            hook: CT_HOOK_UPLINK,
            port: PORT_ALLOCATE,
            orig_ifindex: ifindex,
            reply_ifindex: ifindex,
            orig_identity: 0,
            reply_identity: identity,
        };
        if !self.open(p, &mut nat, &spec)? {
            return Ok(Verdict::Drop(DROP_NAT_PORTS));
        }
        self.count(ifindex, |s| s.snat += 1);
        if rewrite(s, p, &nat).is_err() {
            return Ok(Verdict::Drop(DROP_MALFORMED));
        }
        self.remember(p, &nat);
        Ok(Verdict::Pass)
    }

    /// icmp_error_flow: the quoted packet and what its flow's half says.
    fn icmp_error_flow(
        &self,
        s: &Skb,
        outer: &Pkt,
        hook: u8,
        from_container: bool,
    ) -> Option<(Pkt, CtEntry, CtKey)> {
        let inner = parse_ipv4_at(s, outer.l4_off + 8)?;
        if inner.l4 != L4::Ports || (from_container && inner.daddr != outer.saddr) {
            return None;
        }
        let f = self.lookup(&inner.key().reversed())?;
        let e = self.get(f);
        if e.hook != hook {
            return None;
        }
        Some((inner, e, e.nat_tuple(inner.proto).reversed()))
    }

    fn translate_icmp_error(
        &mut self,
        s: &mut Skb,
        outer: &Pkt,
        inner: &Pkt,
        hook: u8,
        quoted: &CtKey,
    ) -> Verdict {
        if rewrite_quoted(s, outer, inner, quoted).is_err() {
            return Verdict::Drop(DROP_MALFORMED);
        }
        let mut to = outer.key();
        to.daddr = quoted.saddr;
        if outer.saddr == inner.daddr {
            to.saddr = quoted.daddr;
        }
        if rewrite(s, outer, &to).is_err() {
            return Verdict::Drop(DROP_MALFORMED);
        }
        if hook == CT_HOOK_VETH {
            self.deliver(s, &to.daddr)
        } else {
            Verdict::Pass
        }
    }

    // --- uplink.rs

    /// uplink::tracked: Err(verdict) when done, Ok(daddr) when rewritten for `daddr`.
    fn tracked(&mut self, s: &mut Skb, p: &Pkt) -> Option<Result<Ip4, Verdict>> {
        let f = self.lookup(&p.key())?;
        let e = self.get(f);
        if e.hook != CT_HOOK_UPLINK {
            return None;
        }
        let to = e.nat_tuple(p.proto);
        self.touch(f, p);
        if rewrite(s, p, &to).is_err() {
            return Some(Err(Verdict::Drop(DROP_MALFORMED)));
        }
        self.remember(p, &to);
        Some(Ok(to.daddr))
    }

    fn unsolicited(&self, p: &Pkt) -> Verdict {
        if self.is_host_addr(&p.daddr) {
            return Verdict::Pass;
        }
        if self.in_md_subnet(&p.daddr) {
            return Verdict::Drop(DROP_UNSOLICITED);
        }
        if self.routing.forwarded(&p.daddr) {
            return Verdict::Drop(DROP_FORWARD);
        }
        Verdict::Pass
    }

    fn uplink_ingress(&mut self, s: &mut Skb) -> Result<Verdict, String> {
        let Parsed::Ipv4(p) = parse(s) else {
            return Ok(Verdict::Pass);
        };
        if self.in_md_subnet(&p.saddr) {
            return Ok(Verdict::Drop(DROP_SPOOF));
        }
        if let Some(r) = self.follow(s, &p) {
            return Ok(rewritten(r));
        }
        match p.l4 {
            L4::IcmpError => {
                return Ok(match self.icmp_error_flow(s, &p, CT_HOOK_UPLINK, false) {
                    Some((inner, e, quoted)) => {
                        self.translate_icmp_error(s, &p, &inner, e.hook, &quoted)
                    }
                    None => self.unsolicited(&p),
                });
            }
            L4::Ports => {
                if let Some(v) = self.tracked(s, &p) {
                    return Ok(match v {
                        Ok(daddr) => self.inbound(s, &daddr),
                        Err(v) => v,
                    });
                }
                if self.is_host_addr(&p.daddr) && opens_flow(&p) {
                    if let Some(key) = self.port_lookup(&p.daddr, p.dport, p.proto) {
                        return self.dnat_from_uplink(s, &p, key);
                    }
                }
            }
            L4::Opaque => {}
        }
        Ok(self.unsolicited(&p))
    }

    fn leaving(&mut self, s: &mut Skb, p: &Pkt) -> Result<Verdict, String> {
        if !self.in_md_subnet(&p.saddr) {
            return Ok(Verdict::Pass);
        }
        if p.l4 != L4::Ports || p.frag == Frag::Later {
            return Ok(Verdict::Drop(DROP_UNSUPPORTED));
        }
        let Some(addr) = self.routing.fib_src(&p.daddr) else {
            return Ok(Verdict::Drop(DROP_NO_SOURCE));
        };
        self.snat(s, p, addr)
    }

    fn uplink_egress(&mut self, s: &mut Skb) -> Result<Verdict, String> {
        let Parsed::Ipv4(p) = parse(s) else {
            return Ok(Verdict::Pass);
        };
        if let Some(r) = self.follow(s, &p) {
            return Ok(rewritten(r));
        }
        if p.l4 == L4::IcmpError {
            return match self.icmp_error_flow(s, &p, CT_HOOK_UPLINK, true) {
                Some((inner, e, quoted)) => {
                    Ok(self.translate_icmp_error(s, &p, &inner, e.hook, &quoted))
                }
                None => self.leaving(s, &p),
            };
        }
        if p.l4 == L4::Ports {
            if let Some(v) = self.tracked(s, &p) {
                return Ok(match v {
                    Ok(_) => Verdict::Pass,
                    Err(v) => v,
                });
            }
        }
        self.leaving(s, &p)
    }

    // --- veth.rs

    fn sender(&self, s: &Skb, ifindex: u32, p: &Pkt) -> Option<Slot> {
        match self.endpoint(&p.saddr) {
            Some(ep) if ep.ifindex == ifindex && s.load::<6>(6) == Some(ep.mac) => Some(ep),
            _ => None,
        }
    }

    fn between(&mut self, src: &Slot, dst: &Slot) -> Option<Verdict> {
        if dst.net_id != src.net_id {
            return Some(Verdict::Drop(DROP_ISOLATION));
        }
        if !self.allowed(src.identity, dst.identity) {
            return Some(Verdict::Drop(DROP_POLICY));
        }
        None
    }

    fn veth_ingress(&mut self, s: &mut Skb, ifindex: u32) -> Result<Verdict, String> {
        match parse(s) {
            Parsed::Ipv4(p) => self.container_packet(s, ifindex, &p),
            Parsed::Arp => Ok(self.check_arp(s, ifindex)),
            Parsed::Other => Ok(Verdict::Drop(DROP_UNSUPPORTED)),
            Parsed::Malformed => Ok(Verdict::Drop(DROP_MALFORMED)),
        }
    }

    fn check_arp(&self, s: &Skb, ifindex: u32) -> Verdict {
        let (Some(a), Some(eth_src)) = (s.load::<18>(ETH_HLEN), s.load::<6>(6)) else {
            return Verdict::Drop(DROP_MALFORMED);
        };
        if a[4] != 6 || a[5] != 4 {
            return Verdict::Drop(DROP_MALFORMED);
        }
        let sha: [u8; 6] = a[8..14].try_into().unwrap();
        let spa: Ip4 = a[14..18].try_into().unwrap();
        match self.endpoint(&spa) {
            Some(ep) if ep.ifindex == ifindex && ep.mac == sha && ep.mac == eth_src => {
                Verdict::Pass
            }
            _ => Verdict::Drop(DROP_SPOOF),
        }
    }

    fn container_packet(&mut self, s: &mut Skb, ifindex: u32, p: &Pkt) -> Result<Verdict, String> {
        let Some(src) = self.sender(s, ifindex, p) else {
            return Ok(Verdict::Drop(DROP_SPOOF));
        };
        if p.l4 == L4::IcmpError {
            return Ok(Verdict::Icmp);
        }
        if p.l4 == L4::Ports {
            if let Some(f) = self.lookup(&p.key()) {
                let e = self.get(f);
                if e.hook != CT_HOOK_VETH {
                    // On its way to the uplink: fwd::outbound in the redirect datapath (a
                    // Pass here, see `outbound`), the stack otherwise.
                    return Ok(self.outbound());
                }
                if e.dir == CT_DIR_ORIGINAL && !self.allowed(src.identity, e.identity) {
                    return Ok(Verdict::Drop(DROP_POLICY));
                }
                let to = e.nat_tuple(p.proto);
                self.touch(f, p);
                if e.kind == CT_KIND_NONE {
                    // tunnel::onward: straight into a container of this host (no overlay
                    // in the model).
                    return Ok(match self.endpoint(&p.daddr) {
                        Some(dst) => self.between_containers(s, &dst),
                        None => Verdict::Pass,
                    });
                }
                if rewrite(s, p, &to).is_err() {
                    return Ok(Verdict::Drop(DROP_MALFORMED));
                }
                return Ok(self.deliver(s, &to.daddr));
            }
            if self.is_host_addr(&p.daddr) && opens_flow(p) {
                if let Some(key) = self.port_lookup(&p.daddr, p.dport, p.proto) {
                    let t = self.ports[&key];
                    if !self.allowed(src.identity, t.identity) {
                        return Ok(Verdict::Drop(DROP_POLICY));
                    }
                    return self.dnat_from_container(s, p, &src, key);
                }
                return Ok(Verdict::Pass);
            }
        }
        if let Some(dst) = self.endpoint(&p.daddr) {
            if let Some(drop) = self.between(&src, &dst) {
                return Ok(drop);
            }
            let redirect = |m: &mut Model, s: &Skb| m.between_containers(s, &dst);
            if p.l4 == L4::Ports {
                let mut same = p.key();
                let spec = Spec {
                    kind: CT_KIND_NONE,
                    hook: CT_HOOK_VETH,
                    port: PORT_KEEP,
                    orig_ifindex: src.ifindex,
                    reply_ifindex: dst.ifindex,
                    orig_identity: dst.identity,
                    reply_identity: src.identity,
                };
                let _ = self.open(p, &mut same, &spec)?;
            }
            return Ok(redirect(self, s));
        }
        if self.redirecting() && !self.is_host_addr(&p.daddr) && !self.in_md_subnet(&p.daddr) {
            return Ok(self.outbound());
        }
        Ok(Verdict::Pass)
    }

    fn veth_icmp(&mut self, s: &mut Skb, ifindex: u32) -> Verdict {
        let Parsed::Ipv4(p) = parse(s) else {
            return Verdict::Drop(DROP_MALFORMED);
        };
        let Some(src) = self.sender(s, ifindex, &p) else {
            return Verdict::Drop(DROP_SPOOF);
        };
        if let Some((inner, e, quoted)) = self.icmp_error_flow(s, &p, CT_HOOK_VETH, true) {
            if let Some(dst) = self.endpoint(&quoted.saddr) {
                if e.kind == CT_KIND_NONE && dst.net_id != src.net_id {
                    return Verdict::Drop(DROP_ISOLATION);
                }
                if e.dir == CT_DIR_ORIGINAL && !self.allowed(src.identity, dst.identity) {
                    return Verdict::Drop(DROP_POLICY);
                }
            }
            return self.translate_icmp_error(s, &p, &inner, e.hook, &quoted);
        }
        match self.endpoint(&p.daddr) {
            Some(dst) => self.between(&src, &dst).unwrap_or(Verdict::Pass),
            None => Verdict::Pass,
        }
    }

    /// veth::egress: the verdict and the interface a drop is counted on.
    fn veth_egress(&mut self, s: &Skb, ifindex: u32) -> (Verdict, u32) {
        let Parsed::Ipv4(p) = parse(s) else {
            return (Verdict::Pass, ifindex);
        };
        let Some(me) = self.owner(ifindex) else {
            return (Verdict::Pass, ifindex);
        };
        if p.daddr == me.ip {
            return (Verdict::Pass, ifindex);
        }
        let Some(src) = self.endpoint(&p.saddr) else {
            return (Verdict::Pass, ifindex);
        };
        if src.net_id != me.net_id {
            return (Verdict::Drop(DROP_ISOLATION), src.ifindex);
        }
        if !self.allowed(src.identity, me.identity) {
            return (Verdict::Drop(DROP_POLICY), src.ifindex);
        }
        (Verdict::Pass, ifindex)
    }

    // --- main.rs: entry points

    /// Runs `frame` through `hook` between clock readings `now`; `oracle` is the NAT port
    /// the datapath chose (its output's source port or ICMP identifier), if it chose one.
    /// Err: the datapath did something the model says it must not (e.g. took a busy port).
    pub fn run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        now: (u64, u64),
        oracle: Option<u16>,
    ) -> Result<Outcome, String> {
        self.now = now;
        self.oracle = oracle;
        let mut s = Skb {
            data: frame.to_vec(),
        };
        let len = frame.len() as u64;
        let (ifindex, v) = match hook {
            Hook::VethIngress(i) => {
                self.count(i, |st| {
                    st.egress_packets += 1;
                    st.egress_bytes += len;
                });
                let v = match self.veth_ingress(&mut s, i)? {
                    Verdict::Icmp => self.veth_icmp(&mut s, i),
                    v => v,
                };
                (i, v)
            }
            Hook::VethEgress(i) => {
                self.count(i, |st| {
                    st.ingress_packets += 1;
                    st.ingress_bytes += len;
                });
                self.veth_egress(&s, i).pipe(|(v, blame)| (blame, v))
            }
            Hook::UplinkIngress => {
                let i = self.uplink_ifindex;
                self.count(i, |st| {
                    st.ingress_packets += 1;
                    st.ingress_bytes += len;
                });
                (i, self.uplink_ingress(&mut s)?)
            }
            Hook::UplinkEgress => {
                let i = self.uplink_ifindex;
                self.count(i, |st| {
                    st.egress_packets += 1;
                    st.egress_bytes += len;
                });
                (i, self.uplink_egress(&mut s)?)
            }
        };
        let (rc, drop) = match v {
            Verdict::Pass | Verdict::Icmp => (RC_PASS, None),
            Verdict::Redirect(rc) => (rc, None),
            Verdict::Drop(reason) => {
                self.count(ifindex, |st| match reason {
                    DROP_POLICY => st.drop_policy += 1,
                    DROP_SPOOF => st.drop_spoof += 1,
                    DROP_ISOLATION => st.drop_isolation += 1,
                    DROP_UNSUPPORTED => st.drop_unsupported += 1,
                    DROP_NAT_PORTS => st.drop_nat_ports += 1,
                    DROP_UNSOLICITED => st.drop_unsolicited += 1,
                    DROP_FORWARD => st.drop_forward += 1,
                    DROP_NO_SOURCE => st.drop_no_source += 1,
                    _ => st.drop_malformed += 1,
                });
                (RC_SHOT, Some((reason, ifindex)))
            }
        };
        Ok(Outcome {
            rc,
            frame: s.data,
            drop,
        })
    }

    // --- what md-user does to the maps

    /// `run`: the endpoint appears (ENDPOINTS, VETH_OWNERS).
    pub fn start(&mut self, slot: usize) {
        self.running[slot] = true;
    }

    /// `stop`: the endpoint, its published ports and every tracker entry involving its
    /// address go (datapath.rs purge_conntrack).
    pub fn stop(&mut self, slot: usize) {
        self.running[slot] = false;
        let ip = self.slots[slot].ip;
        self.ports.retain(|_, t| t.ip != ip);
        for m in &mut self.ct {
            m.retain(|key, v| {
                !(key.0 == ip || key.1 == ip || v.e.nat_saddr == ip || v.e.nat_daddr == ip)
            });
        }
    }
}

fn rewritten(r: R) -> Verdict {
    match r {
        Ok(()) => Verdict::Pass,
        Err(Fault) => Verdict::Drop(DROP_MALFORMED),
    }
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pkt::{self, View};

    /// The helpers' incremental arithmetic agrees with a recomputation from scratch.
    #[test]
    fn incremental_checksums_match_recomputation() {
        let mut x: u32 = 0x1234_5678;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..2000 {
            let a: Ip4 = rnd().to_be_bytes();
            let b: Ip4 = rnd().to_be_bytes();
            let (sp, dp) = (rnd() as u16, rnd() as u16);
            let base = match rnd() % 3 {
                0 => pkt::Ipv4Pkt::tcp([10, 0, 0, 1], sp, [10, 0, 0, 2], dp, 0x12),
                1 => pkt::Ipv4Pkt::udp([10, 0, 0, 1], sp, [10, 0, 0, 2], dp),
                _ => pkt::Ipv4Pkt::echo([10, 0, 0, 1], [10, 0, 0, 2], sp, dp),
            };
            let mut s = Skb { data: base.build() };
            let Parsed::Ipv4(p) = parse(&s) else { panic!() };
            let to = CtKey::new(a, b, rnd() as u16, p.dport, p.proto);
            rewrite(&mut s, &p, &to).unwrap();
            View::new(&s.data).assert_checksums("model rewrite");
        }
    }

    #[test]
    fn parse_reads_tuples_and_fragments() {
        let f = pkt::Ipv4Pkt::tcp([10, 0, 0, 1], 1000, [10, 0, 0, 2], 80, TCP_SYN)
            .options(&[1, 1, 1, 0])
            .build();
        let Parsed::Ipv4(p) = parse(&Skb { data: f.clone() }) else {
            panic!()
        };
        assert_eq!(
            (p.sport, p.dport, p.l4, p.l4_off),
            (1000, 80, L4::Ports, 38)
        );
        assert_eq!(p.seq_len, 1);
        // Cut after the ports: truncated, no ports to trust.
        let Parsed::Ipv4(p) = parse(&Skb {
            data: f[..42].to_vec(),
        }) else {
            panic!()
        };
        assert_eq!((p.l4, p.truncated), (L4::Opaque, true));
        let later = pkt::Ipv4Pkt::udp([1, 1, 1, 1], 5, [2, 2, 2, 2], 6)
            .frag(3)
            .build();
        let Parsed::Ipv4(p) = parse(&Skb { data: later }) else {
            panic!()
        };
        assert_eq!((p.frag, p.l4, p.sport), (Frag::Later, L4::Opaque, 0));
        let mut bad = f.clone();
        bad[ETH_HLEN] = 0x44;
        assert!(matches!(parse(&Skb { data: bad }), Parsed::Malformed));
    }
}
