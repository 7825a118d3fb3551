//! Model-based property test of md's TC programs (issue 20).
//!
//! proptest generates a sequence of operations: what md-user does to the maps (run/stop a
//! container, publish/unpublish a port, deny/allow rules, the default verdict, the NAT range),
//! what the kernel does to them (LRU evicts one half of a flow, an entry expires), and packets:
//! random ones (any source, forged or not, any protocol, IP options, fragments, mutated bytes,
//! cut short, broken checksums) and packets of the flows the tracker holds (continuations,
//! answers with any TCP flags and window numbers, ICMP errors quoting them, later fragments,
//! masquerade and published-port round trips). Each packet runs through the loaded programs with
//! BPF_PROG_TEST_RUN and through `md_tests::model`; after every step the verdict, the bytes and
//! every map the programs write (both trackers, FRAGS, IF_STATS, port hits, rule drops) must
//! equal the model's, and these invariants must hold whatever the input:
//! - nothing leaves an uplink (egress) with a source in an md subnet;
//! - a rewritten packet whose checksums were valid still has valid IPv4, L4 and (ICMP errors)
//!   quoted IPv4 checksums, recomputed from scratch by `md_tests::pkt`;
//! - a masqueraded or published-port flow's answer comes back as the original tuple reversed;
//! - tracker entries come in pairs in the same map (each half's translation leads to the other);
//! - a dropped packet is counted in exactly one IF_STATS drop counter, a passed one in none.
//!
//! Everything runs on a thread in a private network namespace (unshare(CLONE_NEWNET)) that the
//! test builds: `up0` (a veth) with 192.0.2.1/24 and 192.0.2.100/24, a default route via
//! 192.0.2.2, forwarding on, and one veth per container slot, so the programs' fib and
//! socket lookups ask that namespace, never the machine's. The namespace dies with the thread.
//!
//! Cases: `MD_PROPTEST_CASES` (default 2000; `cargo xtask test --soak` runs 100,000). The seed
//! is printed; `MD_PROPTEST_SEED=<n>` replays it. A failure is shrunk to a minimal sequence.
//! Needs root (gated by `md_tests::require_e2e()`); the object is `$MD_EBPF_OBJ` or
//! `target/md-ebpf/md-ebpf.o`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, Pod,
};
use md_common::{
    maps as m, Config, CtEntry, CtKey, Endpoint, FragEntry, FragKey, IfStats, Network, PolicyKey,
    PolicyRule, PortKey, PortTarget, CT_DIR_ORIGINAL, CT_HOOK_UPLINK, CT_HOOK_VETH, CT_KIND_SNAT,
    HOST_ADDR_GATEWAY, HOST_ADDR_LOCAL, POLICY_ALLOW, POLICY_DENY,
};
use md_tests::{
    model::{self, ck, k, Ent, Expiry, Hook, Model, Net, Routing, Slot, RC_SHOT},
    pkt::{self, Ipv4Pkt, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IP_DF, IP_MF},
    require_e2e,
};
use proptest::{
    prelude::*,
    test_runner::{
        Config as PtConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
    },
};

type Ip4 = [u8; 4];

const HOST: Ip4 = [192, 0, 2, 1];
const HOST2: Ip4 = [192, 0, 2, 100];
const OUT: Ip4 = [192, 0, 2, 2];
const NET_BCAST: Ip4 = [192, 0, 2, 255];
const ROUTER: Ip4 = [198, 51, 100, 1];
const LOOPBACK: Ip4 = [127, 0, 0, 1];
const GW1: Ip4 = [172, 18, 0, 1];
const GW2: Ip4 = [172, 19, 0, 1];

/// Container slots: four on network 1, one on network 2.
const SLOTS: [(Ip4, u32); 5] = [
    ([172, 18, 0, 2], 1),
    ([172, 18, 0, 3], 1),
    ([172, 18, 0, 4], 1),
    ([172, 18, 0, 5], 1),
    ([172, 19, 0, 6], 2),
];

/// Addresses packets are made of: the host's, the outside's, md's (containers, gateways, an
/// unused one), loopback, broadcast, multicast and 0.0.0.0.
const ADDRS: [Ip4; 17] = [
    [172, 18, 0, 2],
    [172, 18, 0, 3],
    [172, 18, 0, 4],
    [172, 18, 0, 5],
    [172, 19, 0, 6],
    OUT,
    HOST,
    ROUTER,
    HOST2,
    GW1,
    GW2,
    [172, 18, 9, 9],
    LOOPBACK,
    NET_BCAST,
    [255, 255, 255, 255],
    [224, 0, 0, 251],
    [0, 0, 0, 0],
];

const PORTS: [u16; 10] = [40000, 80, 53, 8080, 443, 40001, 61000, 61001, 61002, 1];
const PUBLISHED: [u16; 4] = [8080, 53, 80, 8081];
const BINDS: [Ip4; 5] = [[0; 4], HOST, HOST2, LOOPBACK, GW1];
/// NAT ports: a small range, so clashes and exhaustion happen.
const NAT_MIN: u16 = 61000;

const SKB_IFINDEX_OFF: usize = 40;
const SKB_CTX_LEN: usize = 192;

fn mac(ip: Ip4) -> [u8; 6] {
    [0x02, 0x42, ip[0], ip[1], ip[2], ip[3]]
}

fn gw_mac(net: u32) -> [u8; 6] {
    [0x0e, 0x6d, 0, 0, 0, net as u8]
}

fn identity(ip: Ip4) -> u32 {
    100 + u32::from(ip[3])
}

fn fmt_ip(a: Ip4) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn fmt_key(t: &model::K) -> String {
    format!("{}:{} > {}:{} p{}", fmt_ip(t.0), t.2, fmt_ip(t.1), t.3, t.4)
}

/// CLOCK_MONOTONIC_COARSE: the tracker's clock (`bpf_ktime_get_coarse_ns`, tick resolution),
/// so a step's two readings bound the `now` the programs saw exactly.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// The private namespace

fn sh(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex_of(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no interface {name}");
    i
}

/// Runs `f` on a thread of its own in a fresh network namespace with the uplink, addresses,
/// routes and slot interfaces the model's [`Routing`] describes. Returns the uplink's and the
/// slots' ifindexes to `f`.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce(u32, Vec<u32>) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        sh(&["link", "set", "lo", "up"]);
        // veth pairs: this kernel has no dummy driver; the peers stay unused.
        sh(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
        sh(&["link", "set", "up0p", "up"]);
        sh(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        sh(&["addr", "add", "192.0.2.100/24", "dev", "up0"]);
        sh(&["link", "set", "up0", "up"]);
        sh(&["route", "add", "default", "via", "192.0.2.2"]);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward in the netns");
        let mut veths = Vec::new();
        for (i, _) in SLOTS.iter().enumerate() {
            let name = format!("mdv{i}");
            let peer = format!("{name}p");
            sh(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
            sh(&["link", "set", &name, "up"]);
            sh(&["link", "set", &peer, "up"]);
            veths.push(ifindex_of(&name));
        }
        f(ifindex_of("up0"), veths)
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn routing() -> Routing {
    Routing {
        not_unicast_out: vec![HOST, HOST2, NET_BCAST],
        primary: HOST,
    }
}

// ---------------------------------------------------------------------------------------------
// The loaded datapath

struct Bpf {
    ebpf: Ebpf,
    uplink: u32,
    veths: Vec<u32>,
}

impl Bpf {
    fn load(uplink: u32, veths: Vec<u32>) -> Self {
        let ebpf = md_tests::helpers::load_tc_programs(&[
            m::PROG_VETH_INGRESS,
            m::PROG_VETH_EGRESS,
            m::PROG_UPLINK_INGRESS,
            m::PROG_UPLINK_EGRESS,
        ]);
        let mut b = Bpf {
            ebpf,
            uplink,
            veths,
        };
        for (id, gw, subnet) in [(1, GW1, [172, 18, 0, 0]), (2, GW2, [172, 19, 0, 0])] {
            let net = Network {
                gateway: gw,
                subnet,
                prefix_len: 16,
                gateway_mac: gw_mac(id),
                ..Default::default()
            };
            b.hash::<u32, Network>(m::NETWORKS)
                .insert(id, net, 0)
                .unwrap();
            let mut lpm: LpmTrie<_, Ip4, u32> =
                LpmTrie::try_from(b.ebpf.map_mut(m::MD_SUBNETS).unwrap()).unwrap();
            lpm.insert(&Key::new(16, subnet), id, 0).unwrap();
        }
        for (a, f) in [
            (HOST, HOST_ADDR_LOCAL),
            (HOST2, HOST_ADDR_LOCAL),
            (GW1, HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY),
            (GW2, HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY),
        ] {
            b.hash::<Ip4, u32>(m::HOST_ADDRS).insert(a, f, 0).unwrap();
        }
        b
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    fn clear<K: Pod, V: Pod>(&mut self, name: &str) {
        let mut h = self.hash::<K, V>(name);
        let keys: Vec<K> = h.keys().map(|k| k.unwrap()).collect();
        for key in keys {
            h.remove(&key).unwrap();
        }
    }

    fn interfaces(&self) -> Vec<u32> {
        let mut v = self.veths.clone();
        v.push(self.uplink);
        v
    }

    /// Back to a host with no container, no port, no rule, no flow; counters zeroed.
    fn reset(&mut self, cfg: &Config) {
        self.clear::<Ip4, Endpoint>(m::ENDPOINTS);
        self.clear::<u32, Endpoint>(m::VETH_OWNERS);
        self.clear::<PortKey, PortTarget>(m::PORT_MAP);
        self.clear::<PolicyKey, PolicyRule>(m::POLICY);
        self.clear::<CtKey, CtEntry>(m::CONNTRACK);
        self.clear::<CtKey, CtEntry>(m::CONNTRACK_NEW);
        self.clear::<FragKey, FragEntry>(m::FRAGS);
        self.set_config(cfg);
        let n = aya::util::nr_cpus().expect("nr_cpus");
        for i in self.interfaces() {
            let zero = PerCpuValues::try_from(vec![IfStats::default(); n]).unwrap();
            let mut st: PerCpuHashMap<_, u32, IfStats> =
                PerCpuHashMap::try_from(self.ebpf.map_mut(m::IF_STATS).unwrap()).unwrap();
            st.insert(i, zero, 0).unwrap();
        }
    }

    fn set_config(&mut self, cfg: &Config) {
        let mut a: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(m::CONFIG).unwrap()).unwrap();
        a.set(0, *cfg, 0).unwrap();
    }

    /// None when BPF_PROG_TEST_RUN refuses the frame (EINVAL).
    fn run(&self, hook: Hook, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let (prog, ifindex) = match hook {
            Hook::VethIngress(i) => (m::PROG_VETH_INGRESS, i),
            Hook::VethEgress(i) => (m::PROG_VETH_EGRESS, i),
            Hook::UplinkIngress => (m::PROG_UPLINK_INGRESS, self.uplink),
            Hook::UplinkEgress => (m::PROG_UPLINK_EGRESS, self.uplink),
        };
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 512];
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        });
        let r = match r {
            Ok(r) => r,
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                return None
            }
            Err(e) => panic!("test_run of {prog}: {e:?}"),
        };
        out.truncate(r.data_size_out as usize);
        Some((r.return_value, out))
    }

    fn ct(&mut self, name: &str) -> BTreeMap<model::K, CtEntry> {
        let h = self.hash::<CtKey, CtEntry>(name);
        h.iter()
            .map(|r| r.unwrap())
            .map(|(a, b)| (k(&a), b))
            .collect()
    }

    fn stats(&mut self) -> BTreeMap<u32, IfStats> {
        let ifs = self.interfaces();
        let st: PerCpuHashMap<_, u32, IfStats> =
            PerCpuHashMap::try_from(self.ebpf.map(m::IF_STATS).unwrap()).unwrap();
        ifs.into_iter()
            .map(|i| {
                let v = st.get(&i, 0).unwrap();
                let mut s = IfStats::default();
                for c in v.iter() {
                    sum_stats(&mut s, c);
                }
                (i, s)
            })
            .collect()
    }
}

fn sum_stats(a: &mut IfStats, b: &IfStats) {
    let fa: &mut [u64; STATS_FIELDS] = bytemuck_stats(a);
    let fb: [u64; STATS_FIELDS] = *bytemuck_stats(&mut b.clone());
    for (x, y) in fa.iter_mut().zip(fb) {
        *x += y;
    }
}

const STATS_FIELDS: usize = std::mem::size_of::<IfStats>() / 8;

fn bytemuck_stats(s: &mut IfStats) -> &mut [u64; STATS_FIELDS] {
    // SAFETY: IfStats is #[repr(C)], u64 fields only, no padding (md-common asserts its size).
    unsafe { &mut *(s as *mut IfStats as *mut [u64; STATS_FIELDS]) }
}

fn drops(s: &IfStats) -> u64 {
    s.drop_policy
        + s.drop_spoof
        + s.drop_isolation
        + s.drop_unsupported
        + s.drop_nat_ports
        + s.drop_malformed
        + s.drop_unsolicited
        + s.drop_forward
        + s.drop_no_source
}

// ---------------------------------------------------------------------------------------------
// Operations

/// A packet from the pools: every field an index or raw value, so shrinking goes towards the
/// first entries of each pool.
#[derive(Clone, Debug)]
struct PktSpec {
    src: u8,
    dst: u8,
    /// 0 TCP, 1 UDP, 2 echo, 3 echo reply, 4 ICMP error quoting a random packet, 5 GRE, 6 UDP
    /// without checksum.
    kind: u8,
    sport: u8,
    dport: u8,
    flags: u8,
    seq: u32,
    ack: u32,
    options: u8,
    /// 0-1 none, 2 DF, 3 first fragment, 4 later fragment.
    frag: u8,
    id: u8,
    payload: u8,
    /// Source MAC: the source container's (true) or another's.
    mac_ok: bool,
}

/// Something done to a frame's bytes after it was built.
#[derive(Clone, Debug)]
struct Mutation {
    /// 0-3 nothing, 4 cut short, 5 flip a byte, 6 break the IP checksum, 7 break the L4 checksum.
    kind: u8,
    pos: u16,
    val: u8,
}

/// A packet of tracked flow `idx`: its TCP flags, window numbers picked near what the tracker
/// holds (`seq`, `ack`: which of them), payload length, fragment field, mutation.
#[derive(Clone, Debug)]
struct FollowSpec {
    idx: u16,
    flags: u8,
    seq: u8,
    ack: u8,
    payload: u8,
    frag: u8,
    mutation: Mutation,
}

#[derive(Clone, Debug)]
enum Op {
    Run(u8),
    Stop(u8),
    Publish {
        bind: u8,
        port: u8,
        udp: bool,
        slot: u8,
        cport: u8,
    },
    Unpublish(u8),
    Rule {
        from: u8,
        to: u8,
        deny: bool,
    },
    Default(bool),
    NatRange(u8),
    /// CONFIG.datapath: md delivers itself (redirect) or hands packets to the stack.
    Redirect(bool),
    /// A random packet through a random hook (0-4 veth ingress of a slot, 5-9 veth egress of a
    /// slot, 10 uplink ingress, 11 uplink egress).
    Packet(u8, PktSpec, Mutation),
    /// A packet of a tracked flow (entry `idx` of both trackers), where that flow's packets
    /// arrive.
    Follow(FollowSpec),
    /// An ICMP error quoting what entry `idx` translated, sent back its way.
    IcmpAbout {
        idx: u16,
        typ: u8,
        from_router: bool,
        quote: u8,
        mutation: Mutation,
    },
    /// A container's new flow out (veth ingress, then uplink egress) and its answer.
    Masq {
        slot: u8,
        dst: u8,
        kind: u8,
        sport: u8,
    },
    /// An outside client to a published port (uplink ingress) and the answer (uplink egress).
    Visit {
        port: u8,
        src: u8,
        sport: u8,
    },
    /// A well-formed packet from one container slot to another (or to a port published on a
    /// host address: hairpin) at the sender's veth: policy and isolation paths.
    Talk {
        from: u8,
        to: u8,
        kind: u8,
        sport: u8,
    },
    /// A later fragment of a datagram FRAGS remembers.
    Later(u8, u8),
    /// LRU eviction of one tracker entry.
    Evict(u16),
    /// A tracker entry's lifetime runs out.
    Expire(u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (0u8..8, any::<u16>(), any::<u8>()).prop_map(|(kind, pos, val)| Mutation { kind, pos, val })
}

fn pkt_spec() -> impl Strategy<Value = PktSpec> {
    (
        (0u8..17, 0u8..17, 0u8..7, 0u8..10, 0u8..10),
        (any::<u8>(), any::<u32>(), any::<u32>(), 0u8..12, 0u8..5),
        (0u8..4, 0u8..40, any::<bool>()),
    )
        .prop_map(
            |(
                (src, dst, kind, sport, dport),
                (flags, seq, ack, options, frag),
                (id, payload, mac_ok),
            )| {
                PktSpec {
                    src,
                    dst,
                    kind,
                    sport,
                    dport,
                    flags,
                    seq,
                    ack,
                    options: options.saturating_sub(2),
                    frag,
                    id,
                    payload,
                    mac_ok,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..5).prop_map(Op::Run),
        1 => (0u8..5).prop_map(Op::Stop),
        2 => (0u8..5, 0u8..4, any::<bool>(), 0u8..5, 0u8..3)
            .prop_map(|(bind, port, udp, slot, cport)| Op::Publish { bind, port, udp, slot, cport }),
        1 => any::<u8>().prop_map(Op::Unpublish),
        3 => (0u8..5, 0u8..5, 0u8..3).prop_map(|(from, to, v)| Op::Rule { from, to, deny: v != 0 }),
        1 => any::<bool>().prop_map(Op::Default),
        1 => (1u8..9).prop_map(Op::NatRange),
        1 => any::<bool>().prop_map(Op::Redirect),
        6 => (0u8..12, pkt_spec(), mutation()).prop_map(|(h, p, m)| Op::Packet(h, p, m)),
        8 => (any::<u16>(), any::<u8>(), 0u8..6, 0u8..6, 0u8..30, 0u8..8, mutation()).prop_map(
            |(idx, flags, seq, ack, payload, frag, mutation)| Op::Follow(FollowSpec {
                idx,
                flags,
                seq,
                ack,
                payload,
                frag,
                mutation
            })
        ),
        3 => (any::<u16>(), 0u8..3, any::<bool>(), 0u8..6, mutation()).prop_map(
            |(idx, typ, from_router, quote, mutation)| Op::IcmpAbout {
                idx,
                typ,
                from_router,
                quote,
                mutation
            }
        ),
        3 => (0u8..5, 0u8..17, 0u8..3, 0u8..10)
            .prop_map(|(slot, dst, kind, sport)| Op::Masq { slot, dst, kind, sport }),
        2 => (any::<u8>(), 0u8..17, 0u8..10).prop_map(|(port, src, sport)| Op::Visit { port, src, sport }),
        4 => (0u8..5, 0u8..5, 0u8..5, 0u8..10)
            .prop_map(|(from, to, kind, sport)| Op::Talk { from, to, kind, sport }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(i, o)| Op::Later(i, o)),
        1 => any::<u16>().prop_map(Op::Evict),
        1 => any::<u16>().prop_map(Op::Expire),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..48)
}

// ---------------------------------------------------------------------------------------------
// Building frames

fn tcp(saddr: Ip4, sport: u16, daddr: Ip4, dport: u16, flags: u8, seq: u32, ack: u32) -> Ipv4Pkt {
    let mut p = Ipv4Pkt::tcp(saddr, sport, daddr, dport, flags);
    if let pkt::L4::Tcp { seq: s, ack: a, .. } = &mut p.l4 {
        *s = seq;
        *a = ack;
    }
    p
}

/// A packet with tuple `t` (ICMP: an echo request when `t.sport` is set, else a reply).
fn packet_of(t: &CtKey, flags: u8, seq: u32, ack: u32, payload: usize) -> Ipv4Pkt {
    let body = vec![0x5a; payload];
    match t.proto {
        IPPROTO_TCP => tcp(t.saddr, t.sport, t.daddr, t.dport, flags, seq, ack).payload(&body),
        IPPROTO_UDP => Ipv4Pkt::udp(t.saddr, t.sport, t.daddr, t.dport).payload(&body),
        _ if t.sport != 0 || t.dport == 0 => Ipv4Pkt::echo(t.saddr, t.daddr, t.sport, 1),
        _ => Ipv4Pkt::echo_reply(t.saddr, t.daddr, t.dport, 1),
    }
}

/// Sets the IP protocol byte of a frame and fixes the header checksum.
fn set_proto(frame: &mut [u8], proto: u8) {
    frame[pkt::ETH_HLEN + 9] = proto;
    pkt::fix_ip_csum(&mut frame[pkt::ETH_HLEN..]);
}

fn frag_field(sel: u8, off: u8) -> Option<u16> {
    match sel {
        0 | 1 => None,
        2 => Some(IP_DF),
        3 => Some(IP_MF),
        _ => Some(u16::from(off.max(1)) | if off.is_multiple_of(2) { IP_MF } else { 0 }),
    }
}

/// A later fragment (no L4 header) of datagram (saddr, daddr, id, proto).
fn later_fragment(saddr: Ip4, daddr: Ip4, id: u16, proto: u8, off: u8) -> Vec<u8> {
    let mut p = Ipv4Pkt {
        l4: pkt::L4::Raw(vec![0xab; 24]),
        ..Ipv4Pkt::udp(saddr, 0, daddr, 0).payload(&[])
    };
    p.id = id;
    p.frag = u16::from(off.max(1)) | if off.is_multiple_of(3) { IP_MF } else { 0 };
    let mut f = p.build();
    set_proto(&mut f, proto);
    f
}

fn mutate(frame: &mut Vec<u8>, mu: &Mutation) {
    let len = frame.len();
    match mu.kind {
        4 if len > pkt::ETH_HLEN + 1 => {
            // BPF_PROG_TEST_RUN wants more than an Ethernet header.
            let keep = pkt::ETH_HLEN + 1 + usize::from(mu.pos) % (len - pkt::ETH_HLEN - 1);
            frame.truncate(keep);
        }
        5 => frame[usize::from(mu.pos) % len] ^= mu.val | 1,
        6 if len >= pkt::ETH_HLEN + 12 => frame[pkt::ETH_HLEN + 10] ^= mu.val | 1,
        7 => {
            let ihl = usize::from(frame.get(pkt::ETH_HLEN).copied().unwrap_or(0x45) & 0x0f) * 4;
            let off = match frame.get(pkt::ETH_HLEN + 9) {
                Some(&IPPROTO_TCP) => 16,
                Some(&IPPROTO_UDP) => 6,
                _ => 2,
            };
            if let Some(b) = frame.get_mut(pkt::ETH_HLEN + ihl + off) {
                *b ^= mu.val | 1;
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Checks that do not need the model

/// Whether the checksums a frame carries are right, each None when it has none to check: the
/// IPv4 header; the L4 checksum of a whole, unfragmented datagram; the quoted IPv4 header of an
/// ICMP error.
fn checksums(frame: &[u8]) -> [Option<bool>; 3] {
    let mut r = [None; 3];
    if frame.len() < pkt::ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return r;
    }
    let ip = &frame[pkt::ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return r;
    }
    let (want, got) = pkt::ip_header_csum(ip);
    r[0] = Some(want == got);
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 || tot < ihl || tot > ip.len() {
        return r;
    }
    let seg = &ip[ihl..tot];
    let (saddr, daddr) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    let sum_ok = |proto: u8, off: usize| -> Option<bool> {
        let mut s = seg.to_vec();
        let sent = u16::from_be_bytes([s[off], s[off + 1]]);
        s[off] = 0;
        s[off + 1] = 0;
        let want = if proto == IPPROTO_ICMP {
            pkt::checksum(&s)
        } else {
            pkt::l4_checksum(saddr, daddr, proto, &s)
        };
        Some(want == sent)
    };
    r[1] = match ip[9] {
        IPPROTO_TCP if seg.len() >= 20 => sum_ok(IPPROTO_TCP, 16),
        IPPROTO_UDP if seg.len() >= 8 && seg[6..8] != [0, 0] => sum_ok(IPPROTO_UDP, 6),
        IPPROTO_ICMP if seg.len() >= 4 => sum_ok(IPPROTO_ICMP, 2),
        _ => None,
    };
    if ip[9] == IPPROTO_ICMP && seg.len() >= 28 && matches!(seg[0], 3 | 11 | 12) {
        let inner = &seg[8..];
        let ihl = usize::from(inner[0] & 0x0f) * 4;
        if inner[0] >> 4 == 4 && ihl >= 20 && inner.len() >= ihl {
            let (want, got) = pkt::ip_header_csum(inner);
            r[2] = Some(want == got);
        }
    }
    r
}

/// The IPv4 source of a frame whose header parses (version 4, IHL >= 5).
fn ipv4_source(frame: &[u8]) -> Option<Ip4> {
    if frame.len() < pkt::ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[pkt::ETH_HLEN..];
    (ip[0] >> 4 == 4 && ip[0] & 0x0f >= 5).then(|| ip[12..16].try_into().unwrap())
}

/// The port a translation may have chosen: the output's L4 source port (ICMP: identifier).
fn chosen_port(frame: &[u8]) -> Option<u16> {
    ipv4_source(frame)?;
    let ip = &frame[pkt::ETH_HLEN..];
    let l4 = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
    match ip[9] {
        IPPROTO_ICMP if l4.len() >= 6 => Some(u16::from_be_bytes([l4[4], l4[5]])),
        IPPROTO_TCP | IPPROTO_UDP if l4.len() >= 2 => Some(u16::from_be_bytes([l4[0], l4[1]])),
        _ => None,
    }
}

/// The tuple of a frame as md keys it.
fn tuple_of(frame: &[u8]) -> Option<CtKey> {
    let s = model::Skb {
        data: frame.to_vec(),
    };
    match model::parse(&s) {
        model::Parsed::Ipv4(p) if p.l4 == model::L4::Ports => Some(p.key()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// One case

struct Case<'a> {
    bpf: &'a mut Bpf,
    model: Model,
    /// The keys of flows the test evicted a half of: their pairs are broken on purpose (the
    /// survivor, a restored half, or a new flow reusing the tuple) until those keys are gone.
    evicted_partner: BTreeSet<model::K>,
    log: Vec<String>,
}

macro_rules! ensure {
    ($c:expr, $($fmt:tt)*) => {
        if !$c {
            return Err(TestCaseError::fail(format!($($fmt)*)));
        }
    };
}

type Res = Result<(), TestCaseError>;

impl<'a> Case<'a> {
    fn new(bpf: &'a mut Bpf) -> Self {
        let slots = SLOTS
            .iter()
            .zip(&bpf.veths)
            .map(|(&(ip, net_id), &ifindex)| Slot {
                ip,
                net_id,
                ifindex,
                identity: identity(ip),
                mac: mac(ip),
            })
            .collect();
        let nets = vec![
            Net {
                id: 1,
                gateway: GW1,
                subnet: [172, 18, 0, 0],
                prefix_len: 16,
                gateway_mac: gw_mac(1),
            },
            Net {
                id: 2,
                gateway: GW2,
                subnet: [172, 19, 0, 0],
                prefix_len: 16,
                gateway_mac: gw_mac(2),
            },
        ];
        let mut cfg = Config::defaults();
        cfg.nat_port_min = NAT_MIN;
        cfg.nat_port_max = NAT_MIN + 3;
        cfg.uplink_ip = HOST;
        cfg.uplink_ifindex = bpf.uplink;
        bpf.reset(&cfg);
        let mut model = Model::new(slots, nets, cfg, bpf.uplink, routing());
        for a in [HOST, HOST2] {
            model.host_addrs.insert(a, HOST_ADDR_LOCAL);
        }
        for a in [GW1, GW2] {
            model
                .host_addrs
                .insert(a, HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY);
        }
        for i in bpf.interfaces() {
            model.stats.insert(i, IfStats::default());
        }
        Case {
            bpf,
            model,
            evicted_partner: BTreeSet::new(),
            log: Vec::new(),
        }
    }

    fn slot(&self, i: u8) -> Slot {
        self.model.slots[usize::from(i) % self.model.slots.len()]
    }

    /// Slot `i` among the running ones (any slot when none runs): a sender that exists.
    fn running_slot(&self, i: u8) -> Slot {
        let up: Vec<Slot> = (0..self.model.slots.len())
            .filter(|&n| self.model.running[n])
            .map(|n| self.model.slots[n])
            .collect();
        match up.len() {
            0 => self.slot(i),
            n => up[usize::from(i) % n],
        }
    }

    /// Every tracker entry, answered then unanswered, in key order.
    fn entries(&self) -> Vec<(usize, model::K, Ent)> {
        (0..2)
            .flat_map(|m| self.model.ct[m].iter().map(move |(key, e)| (m, *key, *e)))
            .collect()
    }

    fn pick(&self, idx: u16) -> Option<(usize, model::K, Ent)> {
        let all = self.entries();
        (!all.is_empty()).then(|| all[usize::from(idx) % all.len()])
    }

    /// Where packets with an entry's key arrive.
    fn hook_of(&self, key: &model::K, e: &CtEntry) -> Hook {
        if e.hook == CT_HOOK_VETH {
            let i = self
                .model
                .slots
                .iter()
                .position(|s| s.ip == key.0)
                .unwrap_or(0);
            return Hook::VethIngress(self.model.slots[i].ifindex);
        }
        let outward = (e.kind == CT_KIND_SNAT) == (e.dir == CT_DIR_ORIGINAL);
        if outward {
            Hook::UplinkEgress
        } else {
            Hook::UplinkIngress
        }
    }

    fn hook(&self, h: u8) -> Hook {
        match h {
            0..=4 => Hook::VethIngress(self.slot(h).ifindex),
            5..=9 => Hook::VethEgress(self.slot(h - 5).ifindex),
            10 => Hook::UplinkIngress,
            _ => Hook::UplinkEgress,
        }
    }

    /// The destination of a packet at `hook`: the host delivers md → md packets on its
    /// bridges, so none reaches an uplink's egress (one would be masqueraded over the other
    /// hook's flow of the same tuple: see the README's findings); such a destination becomes
    /// the outside router.
    fn routable(&self, hook: Hook, src: Ip4, dst: Ip4) -> Ip4 {
        if hook == Hook::UplinkEgress
            && self.model.in_md_subnet(&src)
            && self.model.in_md_subnet(&dst)
        {
            ROUTER
        } else {
            dst
        }
    }

    /// A frame as a container or the outside would send it: the sender's MAC when the source is
    /// a slot, the gateway's MAC as destination.
    fn frame(&self, p: Ipv4Pkt) -> Vec<u8> {
        let src = self
            .model
            .slots
            .iter()
            .find(|s| s.ip == p.saddr)
            .map_or([0x02, 0, 0, 0, 0, 0x50], |s| s.mac);
        p.macs(src, gw_mac(1)).build()
    }

    // --- what md-user does

    fn endpoint_value(s: &Slot) -> Endpoint {
        Endpoint {
            ifindex: s.ifindex,
            identity: s.identity,
            net_id: s.net_id,
            ip: s.ip,
            mac: s.mac,
            _pad: [0; 2],
        }
    }

    fn run_slot(&mut self, i: u8) {
        let s = self.slot(i);
        let ep = Self::endpoint_value(&s);
        self.bpf
            .hash::<Ip4, Endpoint>(m::ENDPOINTS)
            .insert(s.ip, ep, 0)
            .unwrap();
        self.bpf
            .hash::<u32, Endpoint>(m::VETH_OWNERS)
            .insert(s.ifindex, ep, 0)
            .unwrap();
        self.model.start(usize::from(i) % self.model.slots.len());
    }

    fn stop_slot(&mut self, i: u8) {
        let n = usize::from(i) % self.model.slots.len();
        let s = self.model.slots[n];
        let _ = self.bpf.hash::<Ip4, Endpoint>(m::ENDPOINTS).remove(&s.ip);
        let _ = self
            .bpf
            .hash::<u32, Endpoint>(m::VETH_OWNERS)
            .remove(&s.ifindex);
        let mut ports = self.bpf.hash::<PortKey, PortTarget>(m::PORT_MAP);
        let gone: Vec<PortKey> = ports
            .iter()
            .map(|r| r.unwrap())
            .filter(|(_, t)| t.ip == s.ip)
            .map(|(k, _)| k)
            .collect();
        for key in gone {
            ports.remove(&key).unwrap();
        }
        for name in m::TRACKERS {
            let mut ct = self.bpf.hash::<CtKey, CtEntry>(name);
            let doomed: Vec<CtKey> = ct
                .iter()
                .map(|r| r.unwrap())
                .filter(|(k, v)| {
                    k.saddr == s.ip || k.daddr == s.ip || v.nat_saddr == s.ip || v.nat_daddr == s.ip
                })
                .map(|(k, _)| k)
                .collect();
            for key in doomed {
                ct.remove(&key).unwrap();
            }
        }
        self.model.stop(n);
    }

    fn publish(&mut self, bind: u8, port: u8, udp: bool, slot: u8, cport: u8) {
        let s = self.slot(slot);
        let n = usize::from(slot) % self.model.slots.len();
        if !self.model.running[n] {
            return; // md-user publishes only for a running container
        }
        let proto = if udp { IPPROTO_UDP } else { IPPROTO_TCP };
        let key = (
            BINDS[usize::from(bind) % BINDS.len()],
            PUBLISHED[usize::from(port) % PUBLISHED.len()],
            proto,
        );
        if self.model.ports.contains_key(&key) {
            return; // md-user refuses a port that is taken
        }
        let t = PortTarget {
            ip: s.ip,
            port: [80, 53, 443][usize::from(cport) % 3],
            identity: s.identity,
            ..Default::default()
        };
        self.bpf
            .hash::<PortKey, PortTarget>(m::PORT_MAP)
            .insert(PortKey::new(key.0, key.1, key.2), t, 0)
            .unwrap();
        self.model.ports.insert(key, t);
    }

    fn unpublish(&mut self, i: u8) {
        let keys: Vec<_> = self.model.ports.keys().copied().collect();
        if keys.is_empty() {
            return;
        }
        let key = keys[usize::from(i) % keys.len()];
        self.bpf
            .hash::<PortKey, PortTarget>(m::PORT_MAP)
            .remove(&PortKey::new(key.0, key.1, key.2))
            .unwrap();
        self.model.ports.remove(&key);
    }

    fn rule(&mut self, from: u8, to: u8, deny: bool) {
        let key = (self.slot(from).identity, self.slot(to).identity);
        let verdict = if deny { POLICY_DENY } else { POLICY_ALLOW };
        let drops = self.model.policy.get(&key).map_or(0, |r| r.drops);
        let rule = PolicyRule {
            verdict,
            _pad: [0; 7],
            drops,
        };
        self.bpf
            .hash::<PolicyKey, PolicyRule>(m::POLICY)
            .insert(
                PolicyKey {
                    src_identity: key.0,
                    dst_identity: key.1,
                },
                rule,
                0,
            )
            .unwrap();
        self.model.policy.insert(key, rule);
    }

    fn config(&mut self, f: impl FnOnce(&mut Config)) {
        f(&mut self.model.cfg);
        let cfg = self.model.cfg;
        self.bpf.set_config(&cfg);
    }

    // --- what the kernel does

    fn evict(&mut self, idx: u16) {
        let Some((map, key, e)) = self.pick(idx) else {
            return;
        };
        self.bpf
            .hash::<CtKey, CtEntry>(m::TRACKERS[map])
            .remove(&ck(&key))
            .unwrap();
        self.model.ct[map].remove(&key);
        let partner = k(&e.e.nat_tuple(key.4).reversed());
        self.evicted_partner.insert(partner);
        self.evicted_partner.insert(key);
    }

    /// A flow's lifetime runs out: its halves' expiries are within a second of each other
    /// (ct::touch), so both die together. Both live in one map (ct::promote moves them
    /// together); a half under the same keys in the other map is another flow's: a dead
    /// answered flow's tuple reopened as a new one leaves the new one alone.
    fn expire(&mut self, idx: u16) {
        let Some((map, key, e)) = self.pick(idx) else {
            return;
        };
        let partner = k(&e.e.nat_tuple(key.4).reversed());
        for half in [key, partner] {
            let Some(m) = self.model.ct[map].get_mut(&half) else {
                continue;
            };
            // Only this flow's halves: another flow may hold the partner's tuple.
            if half != key && k(&m.e.nat_tuple(key.4).reversed()) != key {
                continue;
            }
            m.exp = Expiry::Dead;
            // Written with the model's zero: the next packet refreshes the other half.
            m.pexp = Expiry::Dead;
            let mut v = m.e;
            v.expires_ns = 1;
            self.bpf
                .hash::<CtKey, CtEntry>(m::TRACKERS[map])
                .insert(ck(&half), v, 0)
                .unwrap();
        }
    }

    // --- packets

    /// Runs one frame through the datapath and the model; checks verdict, bytes, maps and
    /// the invariants. Returns the verdict and the frame as the datapath left it.
    fn send(&mut self, hook: Hook, frame: Vec<u8>) -> Result<(u32, Vec<u8>), TestCaseError> {
        let before: u64 = self.bpf.stats().values().map(drops).sum();
        let t0 = mono_ns();
        let Some((rc, out)) = self.bpf.run(hook, &frame) else {
            // The kernel takes only frames with a whole IPv4 header when the EtherType says
            // IPv4: shorter ones never reach a TC program.
            ensure!(
                frame.len() < pkt::ETH_HLEN + 20,
                "{hook:?}: BPF_PROG_TEST_RUN refused a {}-byte frame: {frame:02x?}",
                frame.len()
            );
            return Ok((RC_SHOT, frame));
        };
        let t1 = mono_ns();
        let want = self
            .model
            .run(hook, &frame, (t0, t1), chosen_port(&out))
            .map_err(|e| TestCaseError::fail(format!("{hook:?}: {e}")))?;
        let after: u64 = self.bpf.stats().values().map(drops).sum();
        tally(hook, rc, &frame, &out, want.drop.map(|d| d.0));
        ensure!(
            rc == want.rc,
            "{hook:?}: verdict {} where the model says {} (model drop {:?})\n in: {:02x?}",
            rc as i32,
            want.rc as i32,
            want.drop,
            frame
        );
        if out != want.frame {
            let diffs: Vec<String> = (0..out.len().max(want.frame.len()))
                .filter(|&i| out.get(i) != want.frame.get(i))
                .map(|i| format!("@{i}: {:02x?} want {:02x?}", out.get(i), want.frame.get(i)))
                .collect();
            return Err(TestCaseError::fail(format!(
                "{hook:?}: bytes differ from the model's: {}\n in:  {frame:02x?}\n out: {out:02x?}",
                diffs.join(", ")
            )));
        }
        // No drop without a counted reason, no count without a drop.
        ensure!(
            after - before == u64::from(rc == RC_SHOT),
            "{hook:?}: verdict {} but drop counters moved by {}",
            rc as i32,
            after - before
        );
        // Nothing leaves an uplink with an md source.
        if hook == Hook::UplinkEgress && rc != RC_SHOT {
            if let Some(src) = ipv4_source(&out) {
                ensure!(
                    !self.model.in_md_subnet(&src) || known(hook, &out, "md source"),
                    "uplink egress let {} out: {out:02x?}",
                    fmt_ip(src)
                );
            }
        }
        // A rewrite keeps valid checksums valid.
        if rc != RC_SHOT && out != frame {
            let (a, b) = (checksums(&frame), checksums(&out));
            for (i, what) in ["IPv4 header", "L4", "quoted IPv4 header"]
                .iter()
                .enumerate()
            {
                if a[i] == Some(true) && b[i] != Some(true) && !known(hook, &frame, what) {
                    return Err(TestCaseError::fail(format!(
                        "{hook:?}: rewrite broke the {what} checksum\n in:  {frame:02x?}\n out: {out:02x?}"
                    )));
                }
            }
        }
        self.compare_maps()?;
        Ok((rc, out))
    }

    fn compare_maps(&mut self) -> Res {
        for (map, name) in m::TRACKERS.iter().enumerate() {
            let got = self.bpf.ct(name);
            let want = &self.model.ct[map];
            for (key, e) in &got {
                let Some(w) = want.get(key) else {
                    return Err(TestCaseError::fail(format!(
                        "{name}: entry {} {e:?} the model does not have",
                        fmt_key(key)
                    )));
                };
                let mut a = *e;
                a.expires_ns = 0;
                a.partner_expires_ns = 0;
                ensure!(
                    a == w.e,
                    "{name}[{}]: {a:?}\n model:  {:?}",
                    fmt_key(key),
                    w.e
                );
                ensure!(
                    w.exp.admits(e.expires_ns),
                    "{name}[{}]: expires at {} not in the model's {:?} (state {})",
                    fmt_key(key),
                    e.expires_ns,
                    w.exp,
                    e.tcp_state
                );
                ensure!(
                    w.pexp.admits(e.partner_expires_ns),
                    "{name}[{}]: gave its other half {} where the model says {:?}",
                    fmt_key(key),
                    e.partner_expires_ns,
                    w.pexp
                );
            }
            for key in want.keys() {
                ensure!(
                    got.contains_key(key),
                    "{name}: the model has {} {:?}, the datapath not",
                    fmt_key(key),
                    want[key].e
                );
            }
            // Pairs: each live half's translation, reversed, is the other half's key, in this
            // map. Dead halves wait for the collector, whatever took their keys since.
            for (key, e) in &got {
                // A tuple that is its own reverse (a container to itself, same port) is one
                // entry, both halves at once.
                let own_reverse = k(&ck(key).reversed()) == *key;
                if self.evicted_partner.contains(key) || e.expires_ns <= 1 || own_reverse {
                    continue;
                }
                let partner = k(&e.nat_tuple(key.4).reversed());
                let Some(p) = got.get(&partner) else {
                    return Err(TestCaseError::fail(format!(
                        "{name}: {} has no partner {}",
                        fmt_key(key),
                        fmt_key(&partner)
                    )));
                };
                ensure!(
                    k(&p.nat_tuple(key.4).reversed()) == *key
                        && p.kind == e.kind
                        && p.hook == e.hook
                        && p.dir != e.dir,
                    "{name}: {} {e:?} and its partner {} {p:?} are no pair",
                    fmt_key(key),
                    fmt_key(&partner)
                );
            }
        }
        // An eviction's exemptions end when its keys are gone from both maps.
        let ct = [self.bpf.ct(m::CONNTRACK), self.bpf.ct(m::CONNTRACK_NEW)];
        self.evicted_partner
            .retain(|key| ct.iter().any(|c| c.contains_key(key)));
        // FRAGS, port hits, rule drops, counters.
        let frags: BTreeMap<_, _> = {
            let h = self.bpf.hash::<FragKey, FragEntry>(m::FRAGS);
            h.iter()
                .map(|r| r.unwrap())
                .map(|(k, v)| ((k.saddr, k.daddr, k.id, k.proto), v))
                .collect()
        };
        ensure!(
            frags.keys().eq(self.model.frags.keys()),
            "FRAGS keys {:?}\n model: {:?}",
            frags.keys().collect::<Vec<_>>(),
            self.model.frags.keys().collect::<Vec<_>>()
        );
        for (key, v) in &frags {
            let w = self.model.frags[key];
            ensure!(
                (v.saddr, v.daddr) == (w.saddr, w.daddr) && w.exp.admits(v.expires_ns),
                "FRAGS[{key:?}]: {v:?}, model {w:?}"
            );
        }
        let ports: BTreeMap<_, _> = {
            let h = self.bpf.hash::<PortKey, PortTarget>(m::PORT_MAP);
            h.iter()
                .map(|r| r.unwrap())
                .map(|(k, v)| ((k.ip, k.port, k.proto), v.hits))
                .collect()
        };
        let want: BTreeMap<_, _> = self.model.ports.iter().map(|(k, t)| (*k, t.hits)).collect();
        ensure!(ports == want, "PORT_MAP hits {ports:?}\n model: {want:?}");
        let rules: BTreeMap<_, _> = {
            let h = self.bpf.hash::<PolicyKey, PolicyRule>(m::POLICY);
            h.iter()
                .map(|r| r.unwrap())
                .map(|(k, v)| ((k.src_identity, k.dst_identity), v))
                .collect()
        };
        ensure!(
            rules == self.model.policy,
            "POLICY {rules:?}\n model: {:?}",
            self.model.policy
        );
        let stats = self.bpf.stats();
        ensure!(
            stats == self.model.stats,
            "IF_STATS {stats:#?}\n model: {:#?}",
            self.model.stats
        );
        Ok(())
    }

    fn random_packet(&mut self, h: u8, s: &PktSpec, mu: &Mutation) -> Res {
        let src = ADDRS[usize::from(s.src) % ADDRS.len()];
        let mut hook = self.hook(h);
        // A genuine sender half the time: the source slot's own veth (its MAC is set below).
        if let (Hook::VethIngress(_), true) = (hook, s.mac_ok) {
            if let Some(slot) = self.model.slots.iter().find(|x| x.ip == src) {
                hook = Hook::VethIngress(slot.ifindex);
            }
        }
        let dst = self.routable(hook, src, ADDRS[usize::from(s.dst) % ADDRS.len()]);
        let sport = PORTS[usize::from(s.sport) % PORTS.len()];
        let dport = PORTS[usize::from(s.dport) % PORTS.len()];
        let body = vec![0x33; usize::from(s.payload)];
        let mut p = match s.kind {
            0 => tcp(src, sport, dst, dport, s.flags, s.seq, s.ack).payload(&body),
            1 | 6 => Ipv4Pkt::udp(src, sport, dst, dport).payload(&body),
            2 => Ipv4Pkt::echo(src, dst, sport, 1),
            3 => Ipv4Pkt::echo_reply(src, dst, dport, 1),
            4 => {
                let q = Ipv4Pkt::udp(dst, dport, ADDRS[usize::from(s.flags) % ADDRS.len()], sport);
                Ipv4Pkt::icmp_error(
                    src,
                    dst,
                    [3, 11, 12][usize::from(s.id) % 3],
                    3,
                    &q.ip_bytes(),
                )
            }
            _ => Ipv4Pkt::udp(src, 0, dst, 0).payload(&body),
        };
        if s.kind == 6 {
            p = p.no_udp_csum();
        }
        p.id = 0x1c40 + u16::from(s.id);
        if let Some(f) = frag_field(s.frag, s.payload) {
            p = p.frag(f);
        }
        if s.options > 0 {
            let mut o = vec![1u8; usize::from(s.options) * 4];
            *o.last_mut().unwrap() = 0;
            p = p.options(&o);
        }
        let mut f = self.frame(p);
        if s.kind == 5 {
            set_proto(&mut f, 47);
        }
        if !s.mac_ok {
            f[11] ^= 0x80;
        }
        mutate(&mut f, mu);
        self.send(hook, f).map(|_| ())
    }

    fn follow(&mut self, f: &FollowSpec) -> Res {
        let FollowSpec {
            idx,
            flags,
            seq,
            ack,
            payload,
            frag,
            mutation: ref mu,
        } = *f;
        let Some((map, key, e)) = self.pick(idx) else {
            return Ok(());
        };
        // Window numbers near what the tracker holds, so RSTs land in and out of windows.
        let partner = k(&e.e.nat_tuple(key.4).reversed());
        let other = self.model.ct[map]
            .get(&partner)
            .map(|o| o.e)
            .unwrap_or_default();
        let near = |sel: u8| match sel {
            0 => e.e.seq_next,
            1 => other.ack,
            2 => other.seq_next,
            3 => other.ack.wrapping_add(1000),
            4 => e.e.seq_next.wrapping_sub(1),
            _ => 0x1111_2222,
        };
        let t = ck(&key);
        let mut p = packet_of(&t, flags, near(seq), near(ack), usize::from(payload));
        if let Some(f) = frag_field(frag, payload) {
            p = p.frag(f);
        }
        let mut f = self.frame(p);
        mutate(&mut f, mu);
        let hook = self.hook_of(&key, &e.e);
        let was = (e.e.kind, e.e.dir, e.e.hook);
        let (rc, out) = self.send(hook, f.clone())?;
        // A translated flow's answer comes back as the original tuple, reversed.
        if rc != RC_SHOT
            && was.2 == CT_HOOK_UPLINK
            && was.1 != CT_DIR_ORIGINAL
            && mu.kind < 4
            && e.exp != Expiry::Dead
        {
            if let (Some(got), Some(orig)) = (tuple_of(&out), self.original_of(map, &key, &e.e)) {
                if tuple_of(&f) == Some(t) && !self.after_eviction(&orig) {
                    ensure!(
                        k(&got) == k(&orig.reversed()),
                        "answer {} came out as {}, not the original {} reversed",
                        fmt_key(&key),
                        fmt_key(&k(&got)),
                        fmt_key(&k(&orig))
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether the flow of `orig` lost a half to a test eviction (F4, F5 in the README: its
    /// answers may go elsewhere until it is gone).
    fn after_eviction(&self, orig: &CtKey) -> bool {
        self.evicted_partner.contains(&k(orig))
    }

    /// The original-direction key of the flow whose reply half is `key` (found before the
    /// packet: it may have moved maps since).
    fn original_of(&self, _map: usize, key: &model::K, e: &CtEntry) -> Option<CtKey> {
        let partner = k(&e.nat_tuple(key.4).reversed());
        (0..2)
            .find_map(|m| self.model.ct[m].get(&partner))
            .filter(|p| p.e.dir == CT_DIR_ORIGINAL && p.exp != Expiry::Dead)
            .map(|_| ck(&partner))
    }

    fn icmp_about(
        &mut self,
        idx: u16,
        typ: u8,
        from_router: bool,
        quote: u8,
        mu: &Mutation,
    ) -> Res {
        let Some((_, key, e)) = self.pick(idx) else {
            return Ok(());
        };
        // The packet as translated, and who answers it with an error, from where.
        let t = e.e.nat_tuple(key.4);
        let mut q = packet_of(&t, 0x10, 0x0101_0101, 0x0202_0202, 8);
        let reversed = quote == 1;
        if reversed {
            q = packet_of(&t.reversed(), 0x10, 1, 2, 8);
        }
        if quote == 2 {
            q = q.options(&[1, 1, 1, 0]);
        }
        let mut quoted = q.ip_bytes();
        match quote {
            3 => quoted.truncate(usize::from(quoted[0] & 0x0f) * 4 + 8),
            4 => quoted.truncate(usize::from(quoted[0] & 0x0f) * 4 + 4),
            5 => quoted[22] ^= 0x40, // another source port
            _ => {}
        }
        let sender = if from_router { ROUTER } else { t.daddr };
        let typ = [3, 11, 12][usize::from(typ) % 3];
        let p = Ipv4Pkt::icmp_error(sender, t.saddr, typ, if typ == 3 { 3 } else { 0 }, &quoted);
        let hook = if e.e.hook == CT_HOOK_VETH {
            let i = self
                .model
                .slots
                .iter()
                .position(|s| s.ip == t.daddr)
                .unwrap_or(0);
            Hook::VethIngress(self.model.slots[i].ifindex)
        } else if (e.e.kind == CT_KIND_SNAT) == (e.e.dir == CT_DIR_ORIGINAL) {
            Hook::UplinkIngress // the translated packet went out; its error comes in
        } else {
            Hook::UplinkEgress // it went to a container, whose error goes out
        };
        let mut f = self.frame(p);
        mutate(&mut f, mu);
        self.send(hook, f)?;
        Ok(())
    }

    /// A container's new flow: through its veth, out of the uplink, and the answer back.
    fn masq(&mut self, slot: u8, dst: u8, kind: u8, sport: u8) -> Res {
        let s = self.running_slot(slot);
        let dst = self.routable(
            Hook::UplinkEgress,
            s.ip,
            ADDRS[usize::from(dst) % ADDRS.len()],
        );
        let sport = PORTS[usize::from(sport) % PORTS.len()];
        let orig = match kind {
            0 => CtKey::new(s.ip, dst, sport, 80, IPPROTO_TCP),
            1 => CtKey::new(s.ip, dst, sport, 53, IPPROTO_UDP),
            _ => CtKey::new(s.ip, dst, sport, 0, IPPROTO_ICMP),
        };
        let first = self.frame(packet_of(&orig, 0x02, 1000, 0, 0));
        let (rc, _) = self.send(Hook::VethIngress(s.ifindex), first.clone())?;
        if rc != model::RC_PASS {
            return Ok(());
        }
        let (rc, out) = self.send(Hook::UplinkEgress, first)?;
        if rc == RC_SHOT {
            return Ok(());
        }
        let Some(sent) = tuple_of(&out) else {
            return Ok(());
        };
        if sent == orig {
            return Ok(()); // not md's to translate (e.g. an existing flow at the veth)
        }
        let answer = self.frame(packet_of(&sent.reversed(), 0x12, 5000, 1001, 0));
        let (rc, back) = self.send(Hook::UplinkIngress, answer)?;
        if rc != RC_SHOT && !self.after_eviction(&orig) {
            ensure!(
                tuple_of(&back).map(|t| k(&t)) == Some(k(&orig.reversed())),
                "masquerade round trip: {} left as {}, its answer came back as {:?}",
                fmt_key(&k(&orig)),
                fmt_key(&k(&sent)),
                tuple_of(&back).map(|t| fmt_key(&k(&t)))
            );
        }
        Ok(())
    }

    /// An outside client to a published port, and the container's answer.
    fn visit(&mut self, port: u8, src: u8, sport: u8) -> Res {
        let keys: Vec<_> = self.model.ports.keys().copied().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let (bind, hport, proto) = keys[usize::from(port) % keys.len()];
        let daddr = if bind == [0; 4] { HOST2 } else { bind };
        let src = ADDRS[usize::from(src) % ADDRS.len()];
        let orig = CtKey::new(
            src,
            daddr,
            PORTS[usize::from(sport) % PORTS.len()],
            hport,
            proto,
        );
        let (rc, out) = self.send(
            Hook::UplinkIngress,
            self.frame(packet_of(&orig, 0x02, 7, 0, 0)),
        )?;
        if rc == RC_SHOT {
            return Ok(());
        }
        let Some(sent) = tuple_of(&out) else {
            return Ok(());
        };
        if sent == orig {
            return Ok(());
        }
        let answer = self.frame(packet_of(&sent.reversed(), 0x12, 9, 8, 0));
        let (rc, back) = self.send(Hook::UplinkEgress, answer)?;
        if rc != RC_SHOT && !self.after_eviction(&orig) {
            ensure!(
                tuple_of(&back).map(|t| k(&t)) == Some(k(&orig.reversed())),
                "published-port round trip: {} arrived as {}, its answer left as {:?}",
                fmt_key(&k(&orig)),
                fmt_key(&k(&sent)),
                tuple_of(&back).map(|t| fmt_key(&k(&t)))
            );
        }
        Ok(())
    }

    fn talk(&mut self, from: u8, to: u8, kind: u8, sport: u8) -> Res {
        let (a, b) = (self.running_slot(from), self.slot(to));
        let sport = PORTS[usize::from(sport) % PORTS.len()];
        let t = match kind {
            0 => CtKey::new(a.ip, b.ip, sport, 80, IPPROTO_TCP),
            1 => CtKey::new(a.ip, b.ip, sport, 53, IPPROTO_UDP),
            2 => CtKey::new(a.ip, b.ip, sport, 0, IPPROTO_ICMP),
            // Hairpin: to a published port through a host address.
            _ => {
                let keys: Vec<_> = self.model.ports.keys().copied().collect();
                let Some(&(bind, port, proto)) = keys.get(usize::from(to) % keys.len().max(1))
                else {
                    return Ok(());
                };
                let daddr = if bind == [0; 4] { HOST } else { bind };
                CtKey::new(a.ip, daddr, sport, port, proto)
            }
        };
        let f = self.frame(packet_of(&t, 0x02, 1, 0, 4));
        self.send(Hook::VethIngress(a.ifindex), f).map(|_| ())
    }

    fn later(&mut self, i: u8, off: u8) -> Res {
        let keys: Vec<_> = self.model.frags.keys().copied().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let (saddr, daddr, id, proto) = keys[usize::from(i) % keys.len()];
        let f = later_fragment(saddr, daddr, id, proto, off);
        let hook = if self.model.in_md_subnet(&saddr) {
            Hook::UplinkEgress
        } else {
            Hook::UplinkIngress
        };
        self.send(hook, f).map(|_| ())
    }

    fn apply(&mut self, op: &Op) -> Res {
        match op {
            Op::Run(i) => self.run_slot(*i),
            Op::Stop(i) => self.stop_slot(*i),
            Op::Publish {
                bind,
                port,
                udp,
                slot,
                cport,
            } => self.publish(*bind, *port, *udp, *slot, *cport),
            Op::Unpublish(i) => self.unpublish(*i),
            Op::Rule { from, to, deny } => self.rule(*from, *to, *deny),
            Op::Default(deny) => {
                self.config(|c| c.policy_default = if *deny { POLICY_DENY } else { POLICY_ALLOW })
            }
            Op::NatRange(n) => self.config(|c| c.nat_port_max = NAT_MIN + u16::from(*n) - 1),
            Op::Redirect(on) => self.config(|c| {
                c.datapath = if *on {
                    md_common::DATAPATH_REDIRECT
                } else {
                    md_common::DATAPATH_STACK
                }
            }),
            Op::Packet(h, s, mu) => return self.random_packet(*h, s, mu),
            Op::Follow(f) => return self.follow(f),
            Op::IcmpAbout {
                idx,
                typ,
                from_router,
                quote,
                mutation,
            } => return self.icmp_about(*idx, *typ, *from_router, *quote, mutation),
            Op::Masq {
                slot,
                dst,
                kind,
                sport,
            } => return self.masq(*slot, *dst, *kind, *sport),
            Op::Visit { port, src, sport } => return self.visit(*port, *src, *sport),
            Op::Talk {
                from,
                to,
                kind,
                sport,
            } => return self.talk(*from, *to, *kind, *sport),
            Op::Later(i, off) => return self.later(*i, *off),
            Op::Evict(i) => self.evict(*i),
            Op::Expire(i) => self.expire(*i),
        }
        self.compare_maps()
    }
}

/// Datapath bugs this test found that md-ebpf does not fix yet, each tolerated only in its
/// exact shape and counted (the README's findings); `MD_PROPTEST_STRICT=1` makes them fail.
const KNOWN: &[(&str, &str)] = &[
    (
        "F1",
        "an ICMP error quoting an ICMP echo whose flow holds the identifier as both 'ports' \
         (opened by an untracked echo reply from an md address) gets a wrong ICMP checksum: \
         the quoted rewrite writes both into the one identifier field (the echo reply itself \
         is fixed: csum::set_port updates from the identifier the field holds)",
    ),
    (
        "F2",
        "a port published on a gateway address (-p 172.18.0.1:80:80) is translated for clients \
         on the uplink too, and its answers leave the uplink with the gateway's md address as \
         source",
    ),
];
static KNOWN_HITS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

fn known(hook: Hook, frame: &[u8], what: &str) -> bool {
    if std::env::var("MD_PROPTEST_STRICT").is_ok_and(|v| v == "1") {
        return false;
    }
    let ip = frame.get(pkt::ETH_HLEN..).unwrap_or_default();
    // F1: an ICMP error quoting an echo of such a flow.
    let l4 = ip.get(usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4..);
    let echo = |ip: &[u8], l4: Option<&[u8]>| {
        ip.len() > 20 && ip[9] == IPPROTO_ICMP && matches!(l4.and_then(|l| l.first()), Some(0 | 8))
    };
    let quoted = l4.and_then(|l| l.get(8..)).unwrap_or_default();
    let quoted_l4 = quoted.get(usize::from(quoted.first().copied().unwrap_or(0) & 0x0f) * 4..);
    let f1 = what == "L4" && ip.len() > 20 && ip[9] == IPPROTO_ICMP && echo(quoted, quoted_l4);
    let f2 = hook == Hook::UplinkEgress
        && what == "md source"
        && ip.len() >= 20
        && [GW1, GW2].iter().any(|g| ip[12..16] == g[..]);
    for (i, hit) in [f1, f2].into_iter().enumerate() {
        if hit {
            KNOWN_HITS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    f1 || f2
}

/// What the packets did, over all cases: evidence the generator reaches every path.
static TALLY: std::sync::Mutex<BTreeMap<String, u64>> = std::sync::Mutex::new(BTreeMap::new());

fn tally(hook: Hook, rc: u32, frame: &[u8], out: &[u8], drop: Option<u8>) {
    let hook = match hook {
        Hook::VethIngress(_) => "veth-in",
        Hook::VethEgress(_) => "veth-out",
        Hook::UplinkIngress => "uplink-in",
        Hook::UplinkEgress => "uplink-out",
    };
    let what = match (rc, drop) {
        (_, Some(r)) => format!("drop {}", md_common::drop_reason_name(r)),
        (model::RC_REDIRECT, _) => "redirect".into(),
        _ if out != frame => "pass rewritten".into(),
        _ => "pass".into(),
    };
    *TALLY
        .lock()
        .unwrap()
        .entry(format!("{hook:10} {what}"))
        .or_default() += 1;
}

/// The number of cases (MD_PROPTEST_CASES) and the seed (MD_PROPTEST_SEED, else random).
fn cases_and_seed() -> (u32, u64) {
    let cases = std::env::var("MD_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed = std::env::var("MD_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| mono_ns() ^ u64::from(std::process::id()) << 32);
    (cases, seed)
}

#[test]
fn datapath_matches_model() {
    if !require_e2e() {
        return;
    }
    let (cases, seed) = cases_and_seed();
    println!(
        "datapath_matches_model: {cases} cases, seed {seed} (replay: MD_PROPTEST_SEED={seed})"
    );
    let result = in_private_netns(move |uplink, veths| {
        let bpf = RefCell::new(Bpf::load(uplink, veths));
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = PtConfig {
            cases,
            failure_persistence: None,
            // A mutant run only needs to know that some case fails.
            max_shrink_iters: if std::env::var_os("MD_PROPTEST_NO_SHRINK").is_some() {
                0
            } else {
                20_000
            },
            ..PtConfig::default()
        };
        let mut runner = TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
        );
        let r = runner.run(&ops(), |ops| {
            let mut b = bpf.borrow_mut();
            let mut case = Case::new(&mut b);
            // Kept per case and printed with its failure: the shrunk case's, not every try's.
            let trace = std::env::var("MD_PROPTEST_TRACE").is_ok_and(|v| v == "1");
            let mut steps = String::new();
            for (i, op) in ops.iter().enumerate() {
                if trace {
                    steps += &format!("step {i}: {op:?}\n");
                    for (map, key, e) in case.entries() {
                        steps +=
                            &format!("    {} {} -> {:?}\n", ["CT ", "NEW"][map], fmt_key(&key), e);
                    }
                }
                case.log.push(format!("{op:?}"));
                case.apply(op)
                    .map_err(|e| TestCaseError::fail(format!("step {i} ({op:?}): {e}\n{steps}")))?;
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(()),
            Err(TestError::Fail(why, ops)) => Err(format!(
                "{why}\nminimal failing sequence ({} ops):\n{}",
                ops.len(),
                ops.iter()
                    .map(|o| format!("  {o:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
            Err(e) => Err(format!("{e}")),
        }
    });
    println!("packets by hook and outcome:");
    for (what, n) in TALLY.lock().unwrap().iter() {
        println!("  {what:40} {n}");
    }
    for ((id, what), n) in KNOWN.iter().zip(&KNOWN_HITS) {
        let n = n.load(Ordering::Relaxed);
        if n > 0 {
            println!("known datapath finding {id} hit {n} times (tolerated): {what}");
        }
    }
    if let Err(e) = result {
        panic!("seed {seed} (replay: MD_PROPTEST_SEED={seed}): {e}");
    }
}
