//! BPF_PROG_TEST_RUN unit tests of md's packet logic.
//!
//! Each test loads md's eBPF object afresh (private maps, nothing pinned, no interface touched),
//! fills the maps, runs crafted frames through a TC program with `SchedClassifier::test_run`,
//! and checks the verdict, the rewritten bytes and the tracker. Expected frames are built from
//! scratch by `md_tests::pkt` (its own RFC 1071 checksums), so an output that equals them has
//! every checksum right. Test-run skbs are CHECKSUM_NONE: the helpers update the full L4
//! checksum, and a correct incremental update equals the recomputation.
//!
//! Every packet runs with `__sk_buff.ifindex = 1` (lo, which is also what the kernel uses when
//! no context is given), so every endpoint a packet comes from has `ifindex = 1`.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN): gated by `md_tests::require_e2e()` like the e2e tests.
//! The object is `target/md-ebpf/md-ebpf.o` (`cargo xtask build-ebpf`) or `$MD_EBPF_OBJ`.

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues,
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, Pod,
};
use md_common::{
    maps as m, Config, CtEntry, CtKey, Endpoint, IfStats, Network, PolicyKey, PolicyRule, PortKey,
    PortTarget, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_HOOK_UPLINK, CT_HOOK_VETH, CT_KIND_DNAT,
    CT_KIND_HAIRPIN, CT_KIND_NONE, CT_KIND_ROUTED, CT_KIND_SNAT, DATAPATH_REDIRECT, DATAPATH_STACK,
    HOST_ADDR_GATEWAY, HOST_ADDR_LOCAL, MARK_TRANSLATED, NET_INTERNAL, NET_ROUTED4, POLICY_ALLOW,
    POLICY_DENY, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_ORIGINAL, TCP_FIN_REPLY, TCP_SYN_RECV,
    TCP_SYN_SENT,
};
use md_tests::{
    pkt::{
        arp_request, fix_ip_csum, fold, poke_addr, poke_port, pseudo_sum, sum16, Ip4, Ipv4Pkt, Mac,
        View, ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IP_MF, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
    },
    require_e2e,
};

/// TCX_NEXT (-1) as the test run reports it.
const PASS: u32 = u32::MAX;
const SHOT: u32 = 2;
/// TC_ACT_REDIRECT: what `bpf_redirect` returns.
const REDIRECT: u32 = 7;

const LO: u32 = 1;
/// `offsetof(struct __sk_buff, ifindex)`; the struct is 192 bytes on 64-bit kernels.
const SKB_IFINDEX_OFF: usize = 40;
/// `__sk_buff.mark`.
const SKB_MARK_OFF: usize = 8;
const SKB_CTX_LEN: usize = 192;

const HOST: Ip4 = [192, 0, 2, 1];
/// A second host address.
const HOST2: Ip4 = [192, 0, 2, 100];
const OUT: Ip4 = [192, 0, 2, 2];
const ROUTER: Ip4 = [198, 51, 100, 1];
const LOOPBACK: Ip4 = [127, 0, 0, 1];
const GW: Ip4 = [172, 18, 0, 1];
const GW_MAC: Mac = [0x0e, 0x6d, 0, 0, 0, 0x01];
const C2: Ip4 = [172, 18, 0, 2];
const C3: Ip4 = [172, 18, 0, 3];
const C4: Ip4 = [172, 18, 0, 4];
const C5: Ip4 = [172, 18, 0, 5];
/// A container on another network (net 2).
const C6: Ip4 = [172, 19, 0, 6];
/// A container whose veth is some other interface (ifindex 7).
const C7: Ip4 = [172, 18, 0, 7];

const NAT_MIN: u16 = 61000;
const NAT_MAX: u16 = 65535;

const VETH_INGRESS: &str = m::PROG_VETH_INGRESS;
const VETH_EGRESS: &str = m::PROG_VETH_EGRESS;
const UPLINK_INGRESS: &str = m::PROG_UPLINK_INGRESS;
const UPLINK_EGRESS: &str = m::PROG_UPLINK_EGRESS;

fn mac(ip: Ip4) -> Mac {
    [0x02, 0x42, ip[0], ip[1], ip[2], ip[3]]
}

fn identity(ip: Ip4) -> u32 {
    100 + u32::from(ip[3])
}

/// md's datapath, loaded privately for one test.
struct Dp {
    ebpf: Ebpf,
    /// The uplink of the test's private network namespace (see [`private_netns`]): uplink
    /// programs run with it as `__sk_buff.ifindex`, so their route lookups (masquerade
    /// source, forwarding) see a host of the test's own making.
    uplink: u32,
}

/// OUT's MAC in each test's private network namespace (a permanent neighbour entry).
const OUT_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x02];
const OUT_MAC_STR: &str = "02:00:00:00:0c:02";

/// Name of the dummy uplink in each test's private network namespace.
const UPLINK_DEV: &str = "up0";

/// Moves the calling thread into a new network namespace made like a small md host: lo up,
/// `up0` (a veth whose peer stays there too: this kernel has no dummy driver) with HOST/24 and HOST2/24, a default route via OUT, forwarding on. The
/// programs' route and socket lookups happen in the namespace of the thread that runs them,
/// so nothing of the machine's own routing can change a verdict. Returns up0's ifindex.
fn private_netns() -> u32 {
    // SAFETY: unshare(2) on this thread only; the test keeps running in the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("running ip");
        assert!(out.status.success(), "ip {}: {:?}", args.join(" "), out);
    };
    let dotted = |a: Ip4| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    ip(&["link", "set", "lo", "up"]);
    ip(&[
        "link", "add", UPLINK_DEV, "type", "veth", "peer", "name", "peer0",
    ]);
    ip(&["link", "set", "peer0", "up"]);
    ip(&[
        "addr",
        "add",
        &format!("{}/24", dotted(HOST)),
        "dev",
        UPLINK_DEV,
    ]);
    ip(&[
        "addr",
        "add",
        &format!("{}/24", dotted(HOST2)),
        "dev",
        UPLINK_DEV,
    ]);
    ip(&["link", "set", UPLINK_DEV, "up"]);
    ip(&["route", "add", "default", "via", &dotted(OUT)]);
    // OUT's MAC is known, so the redirect datapath's FIB lookups resolve a neighbour.
    ip(&[
        "neigh",
        "add",
        &dotted(OUT),
        "lladdr",
        OUT_MAC_STR,
        "dev",
        UPLINK_DEV,
    ]);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward in the test netns");
    std::fs::read_to_string(format!("/sys/class/net/{UPLINK_DEV}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            // /sys shows the namespace it was mounted in: ask the kernel by name instead.
            let c = std::ffi::CString::new(UPLINK_DEV).unwrap();
            // SAFETY: a valid NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        })
}

impl Dp {
    /// The object loaded, the TC programs loaded, CONFIG = defaults with uplink 192.0.2.1 and
    /// counters for ifindex 1. Maps otherwise empty.
    fn bare() -> Self {
        let uplink = private_netns();
        let ebpf = md_tests::helpers::load_tc_programs(&[
            VETH_INGRESS,
            VETH_EGRESS,
            UPLINK_INGRESS,
            UPLINK_EGRESS,
        ]);
        let mut dp = Dp { ebpf, uplink };
        dp.set_config(|_| {});
        dp.add_if_stats(LO);
        dp.add_if_stats(uplink);
        dp
    }

    /// [`Dp::bare`] plus a small host: networks 1 (172.18/16) and 2 (172.19/16), containers
    /// C2..C5 and C7 on net 1 (C7's veth is ifindex 7), C6 on net 2, host addresses HOST and
    /// HOST2.
    fn lab() -> Self {
        let mut dp = Dp::bare();
        dp.network(1, GW, [172, 18, 0, 0], GW_MAC);
        dp.network(
            2,
            [172, 19, 0, 1],
            [172, 19, 0, 0],
            [0x0e, 0x6d, 0, 0, 0, 0x02],
        );
        for ip in [C2, C3, C4, C5] {
            dp.endpoint(ip, 1, LO);
        }
        dp.endpoint(C6, 2, LO);
        dp.endpoint(C7, 1, 7);
        dp.host_addr(HOST);
        dp.host_addr(HOST2);
        // As md-user does: the gateways are host addresses, flagged (their resolver is never
        // translated).
        dp.hash::<Ip4, u32>(m::HOST_ADDRS)
            .insert(GW, HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY, 0)
            .unwrap();
        dp
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    fn set_config(&mut self, f: impl FnOnce(&mut Config)) {
        let mut cfg = Config::defaults();
        cfg.uplink_ip = HOST;
        cfg.uplink_ifindex = LO;
        // The translations are tested where the stack delivers; the redirect datapath has
        // tests of its own (section 9).
        cfg.datapath = DATAPATH_STACK;
        f(&mut cfg);
        let mut arr: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(m::CONFIG).unwrap()).unwrap();
        arr.set(0, cfg, 0).unwrap();
    }

    fn network(&mut self, id: u32, gateway: Ip4, subnet: Ip4, gateway_mac: Mac) {
        let net = Network {
            gateway,
            subnet,
            prefix_len: 16,
            gateway_mac,
            bridge_ifindex: LO,
            ..Default::default()
        };
        self.hash::<u32, Network>(m::NETWORKS)
            .insert(id, net, 0)
            .unwrap();
        let mut subnets: LpmTrie<_, Ip4, u32> =
            LpmTrie::try_from(self.ebpf.map_mut(m::MD_SUBNETS).unwrap()).unwrap();
        subnets.insert(&LpmKey::new(16, subnet), id, 0).unwrap();
    }

    /// Sets network `id`'s NETWORKS flags (its gateway mode).
    fn network_flags(&mut self, id: u32, flags: u32) {
        let mut nets = self.hash::<u32, Network>(m::NETWORKS);
        let mut net = nets.get(&id, 0).expect("a network of the lab");
        net.flags = flags;
        nets.insert(id, net, 0).unwrap();
    }

    fn endpoint(&mut self, ip: Ip4, net_id: u32, ifindex: u32) {
        let ep = Endpoint {
            ifindex,
            identity: identity(ip),
            net_id,
            ip,
            mac: mac(ip),
            ..Default::default()
        };
        self.hash::<Ip4, Endpoint>(m::ENDPOINTS)
            .insert(ip, ep, 0)
            .unwrap();
    }

    fn host_addr(&mut self, ip: Ip4) {
        self.hash::<Ip4, u32>(m::HOST_ADDRS)
            .insert(ip, HOST_ADDR_LOCAL, 0)
            .unwrap();
    }

    /// Publishes `ip:port/proto` (ip 0.0.0.0: every host address) to container `to`:`to_port`.
    fn publish(&mut self, ip: Ip4, port: u16, proto: u8, to: Ip4, to_port: u16) {
        let t = PortTarget {
            ip: to,
            port: to_port,
            identity: identity(to),
            ..Default::default()
        };
        self.hash::<PortKey, PortTarget>(m::PORT_MAP)
            .insert(PortKey::new(ip, port, proto), t, 0)
            .unwrap();
    }

    fn port_hits(&mut self, ip: Ip4, port: u16, proto: u8) -> u64 {
        self.hash::<PortKey, PortTarget>(m::PORT_MAP)
            .get(&PortKey::new(ip, port, proto), 0)
            .unwrap()
            .hits
    }

    fn policy(&mut self, from: Ip4, to: Ip4, verdict: u8) {
        let key = PolicyKey {
            src_identity: identity(from),
            dst_identity: identity(to),
        };
        let rule = PolicyRule {
            verdict,
            ..Default::default()
        };
        self.hash::<PolicyKey, PolicyRule>(m::POLICY)
            .insert(key, rule, 0)
            .unwrap();
    }

    fn policy_drops(&mut self, from: Ip4, to: Ip4) -> u64 {
        let key = PolicyKey {
            src_identity: identity(from),
            dst_identity: identity(to),
        };
        self.hash::<PolicyKey, PolicyRule>(m::POLICY)
            .get(&key, 0)
            .unwrap()
            .drops
    }

    fn ct_insert(&mut self, key: CtKey, e: CtEntry) {
        self.hash::<CtKey, CtEntry>(m::CONNTRACK)
            .insert(key, e, 0)
            .unwrap();
    }

    /// The entry for `key` in either tracker map (answered flows first).
    fn ct_get(&mut self, key: &CtKey) -> Option<CtEntry> {
        m::TRACKERS
            .iter()
            .find_map(|map| match self.hash::<CtKey, CtEntry>(map).get(key, 0) {
                Ok(e) => Some(e),
                Err(MapError::KeyNotFound) => None,
                Err(e) => panic!("reading {map}: {e:?}"),
            })
    }

    /// Which tracker map holds `key`: CONNTRACK (answered) or CONNTRACK_NEW.
    fn ct_map_of(&mut self, key: &CtKey) -> Option<&'static str> {
        m::TRACKERS
            .iter()
            .copied()
            .find(|map| self.hash::<CtKey, CtEntry>(map).get(key, 0).is_ok())
    }

    #[track_caller]
    fn ct_must(&mut self, key: &CtKey) -> CtEntry {
        self.ct_get(key)
            .unwrap_or_else(|| panic!("no tracker entry for {}", fmt_key(key)))
    }

    fn ct_keys(&mut self) -> Vec<CtKey> {
        let mut keys = Vec::new();
        for map in m::TRACKERS {
            let ct = self.hash::<CtKey, CtEntry>(map);
            keys.extend(ct.keys().map(|k| k.unwrap()));
        }
        keys
    }

    /// Counter `f` of ifindex 1, summed over CPUs.
    fn stat(&mut self, f: impl Fn(&IfStats) -> u64) -> u64 {
        self.stat_of(LO, f)
    }

    /// Counter `f` of the uplink, summed over CPUs.
    fn uplink_stat(&mut self, f: impl Fn(&IfStats) -> u64) -> u64 {
        self.stat_of(self.uplink, f)
    }

    /// Counter `f` of `ifindex` (see [`Dp::add_if_stats`]), summed over CPUs.
    fn stat_of(&mut self, ifindex: u32, f: impl Fn(&IfStats) -> u64) -> u64 {
        let stats: PerCpuHashMap<_, u32, IfStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(m::IF_STATS).unwrap()).unwrap();
        stats.get(&ifindex, 0).unwrap().iter().map(f).sum()
    }

    /// Zeroed counters for `ifindex` (md-user adds them for every interface it manages).
    fn add_if_stats(&mut self, ifindex: u32) {
        let n = aya::util::nr_cpus().expect("nr_cpus");
        let zero = PerCpuValues::try_from(vec![IfStats::default(); n]).unwrap();
        let mut stats: PerCpuHashMap<_, u32, IfStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(m::IF_STATS).unwrap()).unwrap();
        stats.insert(ifindex, zero, 0).unwrap();
    }

    /// VETH_OWNERS[ifindex] = the endpoint of container `ip` (its ENDPOINTS entry).
    fn veth_owner(&mut self, ifindex: u32, ip: Ip4) {
        let ep = self
            .hash::<Ip4, Endpoint>(m::ENDPOINTS)
            .get(&ip, 0)
            .expect("the owner is an endpoint");
        self.hash::<u32, Endpoint>(m::VETH_OWNERS)
            .insert(ifindex, ep, 0)
            .unwrap();
    }

    fn config(&self) -> Config {
        let cfg: Array<_, Config> = Array::try_from(self.ebpf.map(m::CONFIG).unwrap()).unwrap();
        cfg.get(&0, 0).unwrap()
    }

    /// `__sk_buff.ifindex` a program runs with: the uplink's for uplink programs, else 1.
    fn ifindex_for(&self, prog: &str) -> u32 {
        if prog == UPLINK_INGRESS || prog == UPLINK_EGRESS {
            self.uplink
        } else {
            LO
        }
    }

    /// Runs `frame` through `prog` (on the uplink for uplink programs, else with
    /// `__sk_buff.ifindex = 1`); returns the verdict and the frame as the program left it.
    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4]
            .copy_from_slice(&self.ifindex_for(prog).to_ne_bytes());
        self.run_ctx(prog, frame, Some(&ctx))
    }

    fn run_ctx(&self, prog: &str, frame: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 512];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run of {prog}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Like [`Dp::run`], but the skb is CHECKSUM_COMPLETE (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`,
    /// Linux 6.11+): the kernel sums the packet into skb->csum before the program and fails the
    /// run with EBADMSG when skb->csum no longer matches the packet afterwards. That catches
    /// checksum-helper misuse CHECKSUM_NONE cannot show (a pseudo-header flag on a port change,
    /// a missing one on an address change). aya 0.14 cannot set test-run flags for skb
    /// programs, so this issues BPF_PROG_TEST_RUN itself.
    fn run_csum_complete(&self, prog: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), i32> {
        use std::os::fd::{AsFd, AsRawFd};
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
        // The `test` member of union bpf_attr.
        #[repr(C)]
        #[derive(Default)]
        struct TestAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let fd = p.fd().unwrap().as_fd().as_raw_fd();
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4]
            .copy_from_slice(&self.ifindex_for(prog).to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 512];
        let mut attr = TestAttr {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
            ..Default::default()
        };
        // SAFETY: attr is a valid BPF_PROG_TEST_RUN attribute whose pointers reference live
        // buffers of the given sizes for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestAttr,
                std::mem::size_of::<TestAttr>() as u32,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        out.truncate(attr.data_size_out as usize);
        Ok((attr.retval, out))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn ip(a: Ip4) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn fmt_key(k: &CtKey) -> String {
    format!(
        "{}:{} -> {}:{} proto {}",
        ip(k.saddr),
        k.sport,
        ip(k.daddr),
        k.dport,
        k.proto
    )
}

fn verdict(v: u32) -> String {
    match v {
        PASS => "TCX_NEXT (pass)".into(),
        SHOT => "TC_ACT_SHOT".into(),
        REDIRECT => "TC_ACT_REDIRECT".into(),
        v => format!("{v} ({})", v as i32),
    }
}

#[track_caller]
fn assert_verdict(got: u32, want: u32, what: &str) {
    assert_eq!(
        got,
        want,
        "{what}: verdict {}, expected {}",
        verdict(got),
        verdict(want)
    );
}

/// The tuple of a packet as md keys it (ICMP echo: identifier as sport of a request, dport
/// of a reply).
fn key_of(p: &Ipv4Pkt) -> CtKey {
    match &p.l4 {
        L4::Tcp { sport, dport, .. } => CtKey::new(p.saddr, p.daddr, *sport, *dport, IPPROTO_TCP),
        L4::Udp { sport, dport, .. } => CtKey::new(p.saddr, p.daddr, *sport, *dport, IPPROTO_UDP),
        L4::Icmp { typ, rest, .. } => {
            let id = u16::from_be_bytes([rest[0], rest[1]]);
            let (s, d) = if *typ == ICMP_ECHO { (id, 0) } else { (0, id) };
            CtKey::new(p.saddr, p.daddr, s, d, IPPROTO_ICMP)
        }
        L4::Raw(_) | L4::RawProto(..) => panic!("no tuple for a raw packet"),
    }
}

/// `p` with its tuple replaced by `t` (everything else, checksums recomputed, the same).
fn with_tuple(p: &Ipv4Pkt, t: CtKey) -> Ipv4Pkt {
    let mut q = p.clone();
    q.saddr = t.saddr;
    q.daddr = t.daddr;
    match &mut q.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => {
            *sport = t.sport;
            *dport = t.dport;
        }
        L4::Icmp { typ, rest, .. } => {
            let id = if *typ == ICMP_ECHO { t.sport } else { t.dport };
            rest[..2].copy_from_slice(&id.to_be_bytes());
        }
        L4::Raw(_) | L4::RawProto(..) => {}
    }
    q
}

/// Byte-for-byte equality, listing the differing bytes.
#[track_caller]
fn assert_frame_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let diffs: Vec<String> = (0..got.len().max(want.len()))
        .filter(|&i| got.get(i) != want.get(i))
        .take(24)
        .map(|i| format!("@{i}: got {:02x?} want {:02x?}", got.get(i), want.get(i)))
        .collect();
    panic!(
        "{what}: frame differs (len {} vs {}); {}\n got: {got:02x?}\nwant: {want:02x?}",
        got.len(),
        want.len(),
        diffs.join(", ")
    );
}

/// Runs a container's first packet `p` through uplink egress and checks the masquerade:
/// source = HOST with a port (ICMP: identifier) from the NAT range, nothing else changed, every
/// checksum right, and both tracker halves. Returns the port and the translated frame.
#[track_caller]
fn expect_snat(dp: &mut Dp, p: &Ipv4Pkt, what: &str) -> (u16, Vec<u8>) {
    let orig = key_of(p);
    let (rc, out) = dp.run(UPLINK_EGRESS, &p.build());
    assert_verdict(rc, PASS, what);
    let v = View::new(&out);
    v.assert_checksums(what);
    assert_eq!(ip(v.saddr()), ip(HOST), "{what}: source address");
    assert_eq!(ip(v.daddr()), ip(p.daddr), "{what}: destination address");
    let port = if p.proto() == IPPROTO_ICMP {
        v.icmp_id()
    } else {
        assert_eq!(v.dport(), orig.dport, "{what}: destination port");
        v.sport()
    };
    let (min, max) = {
        let cfg: Array<_, Config> = Array::try_from(dp.ebpf.map(m::CONFIG).unwrap()).unwrap();
        let c = cfg.get(&0, 0).unwrap();
        (c.nat_port_min, c.nat_port_max)
    };
    assert!(
        (min..=max).contains(&port),
        "{what}: NAT port {port} outside [{min}, {max}]"
    );
    let nat = CtKey {
        saddr: HOST,
        sport: port,
        ..orig
    };
    assert_frame_eq(&out, &with_tuple(p, nat).build(), what);

    let e = dp.ct_must(&orig);
    assert_eq!(
        fmt_key(&e.nat_tuple(orig.proto)),
        fmt_key(&nat),
        "{what}: original half"
    );
    assert_eq!(
        (e.kind, e.dir, e.hook),
        (CT_KIND_SNAT, CT_DIR_ORIGINAL, CT_HOOK_UPLINK),
        "{what}: original half kind/dir/hook"
    );
    let r = dp.ct_must(&nat.reversed());
    assert_eq!(
        fmt_key(&r.nat_tuple(orig.proto)),
        fmt_key(&orig.reversed()),
        "{what}: reply half"
    );
    assert_eq!(
        (r.kind, r.dir, r.hook),
        (CT_KIND_SNAT, CT_DIR_REPLY, CT_HOOK_UPLINK),
        "{what}: reply half kind/dir/hook"
    );
    (port, out)
}

/// Runs `p` through `prog` and expects it to come out as `want` with verdict `rc`.
#[track_caller]
fn expect_rewrite(dp: &Dp, prog: &str, p: &Ipv4Pkt, rc: u32, want: &Ipv4Pkt, what: &str) {
    let (got_rc, out) = dp.run(prog, &p.build());
    assert_verdict(got_rc, rc, what);
    let v = View::new(&out);
    v.assert_checksums(what);
    assert_frame_eq(&out, &want.build(), what);
}

/// Runs `p` through `prog` and expects verdict `rc` with the frame untouched.
#[track_caller]
fn expect_untouched(dp: &Dp, prog: &str, p: &Ipv4Pkt, rc: u32, what: &str) {
    let frame = p.build();
    let (got_rc, out) = dp.run(prog, &frame);
    assert_verdict(got_rc, rc, what);
    assert_frame_eq(&out, &frame, what);
}

/// A live tracker entry that belongs to nobody under test.
fn foreign_entry(nat: CtKey) -> CtEntry {
    CtEntry {
        nat_saddr: nat.saddr,
        nat_daddr: nat.daddr,
        nat_sport: nat.sport,
        nat_dport: nat.dport,
        kind: CT_KIND_SNAT,
        dir: CT_DIR_REPLY,
        hook: CT_HOOK_UPLINK,
        expires_ns: u64::MAX / 2,
        ..Default::default()
    }
}

/// Copies the quoted packet's L4 checksum field from `got_inner` into `want_inner` (IP
/// datagrams): md leaves it alone and receivers ignore it, so the tests do not pin its value
/// (the outer ICMP checksum, which covers it, is still checked from scratch).
fn adopt_quoted_l4_csum(want_inner: &mut [u8], got_inner: &[u8]) {
    let ihl = usize::from(want_inner[0] & 0x0f) * 4;
    let off = ihl
        + match want_inner[9] {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
    if off + 2 <= want_inner.len() && off + 2 <= got_inner.len() {
        want_inner[off..off + 2].copy_from_slice(&got_inner[off..off + 2]);
    }
}

/// The IP datagram an ICMP error in `frame` quotes.
fn quoted(frame: &[u8]) -> Vec<u8> {
    View::new(frame).l4()[8..].to_vec()
}

/// Checks an ICMP error frame: outer IP and ICMP checksums (the whole message) and the quoted
/// IP header checksum, all recomputed from scratch.
#[track_caller]
fn assert_icmp_error_checksums(frame: &[u8], what: &str) {
    let v = View::new(frame);
    v.assert_checksums(what);
    let inner = quoted(frame);
    let (want, got) = md_tests::pkt::ip_header_csum(&inner);
    assert_eq!(
        got, want,
        "{what}: quoted IP header checksum {got:#06x}, recomputed {want:#06x}"
    );
}

// ---------------------------------------------------------------------------------------------
// 0. The test-run context itself

#[test]
fn test_run_context_is_lo() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let p = Ipv4Pkt::udp(C2, 40000, OUT, 53).macs(mac(C2), GW_MAC);
    // Without a context the kernel runs the skb on lo (ifindex 1): C2's port.
    let (rc, _) = dp.run_ctx(VETH_INGRESS, &p.build(), None);
    assert_verdict(rc, PASS, "default context: C2 (ifindex 1) sending");
    // With ifindex 1 in the context: the same.
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, PASS, "ifindex 1: C2 sending");
    // The datapath really compares: C7's veth is ifindex 7.
    let p7 = Ipv4Pkt::udp(C7, 40000, OUT, 53).macs(mac(C7), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &p7.build());
    assert_verdict(rc, SHOT, "C7's packet arriving on ifindex 1");
    assert_eq!(dp.stat(|s| s.drop_spoof), 1);
    assert_eq!(dp.stat(|s| s.egress_packets), 3, "veth ingress counts");
}

// ---------------------------------------------------------------------------------------------
// 1-3. Masquerade

/// F5: after LRU evicted a flow's original half, the same tuple opens a second flow on another
/// NAT port; a late answer to the first must not take the second flow's original half (which
/// sits under the first one's partner tuple) along into the answered tracker, away from its
/// own reply half.
#[test]
fn a_late_answer_leaves_the_flow_that_took_its_tuple_alone() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let q = Ipv4Pkt::udp(C2, 443, OUT, 53);
    let orig = key_of(&q);
    let (a, _) = expect_snat(&mut dp, &q, "first query");
    dp.hash::<CtKey, CtEntry>(m::CONNTRACK_NEW)
        .remove(&orig)
        .expect("evicting the original half");
    let (b, _) = expect_snat(&mut dp, &q, "the same query, a new flow");
    assert_ne!(a, b, "the first flow's reply half still holds port {a}");
    let reply_b = CtKey::new(OUT, HOST, 53, b, IPPROTO_UDP);
    let (rc, _) = dp.run(UPLINK_INGRESS, &Ipv4Pkt::udp(OUT, 53, HOST, a).build());
    assert_verdict(rc, PASS, "the answer to the first query");
    assert_eq!(
        dp.ct_map_of(&orig),
        Some(m::CONNTRACK_NEW),
        "the second flow's original half was promoted by the first flow's answer"
    );
    assert_eq!(dp.ct_map_of(&reply_b), Some(m::CONNTRACK_NEW));
    assert_eq!(dp.ct_must(&orig).nat_sport, b, "the second flow's half");
}

#[test]
fn snat_tcp_and_reverse() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let syn = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    let (port, _) = expect_snat(&mut dp, &syn, "TCP SYN C2:40000 -> OUT:80");
    assert_eq!(dp.ct_keys().len(), 2, "one flow, two tracker entries");
    let orig = key_of(&syn);
    let reply = CtKey::new(OUT, HOST, 80, port, IPPROTO_TCP);
    assert_eq!(dp.ct_must(&orig).tcp_state, TCP_SYN_SENT);
    assert_eq!(dp.ct_must(&reply).tcp_state, TCP_SYN_SENT);
    assert_eq!(dp.stat(|s| s.snat), 1, "snat counter");

    // The SYN-ACK comes back to HOST:port and leaves for C2:40000.
    let synack = Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_SYN | TCP_ACK);
    let want = with_tuple(&synack, orig.reversed());
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &synack,
        PASS,
        &want,
        "SYN-ACK reverse SNAT",
    );
    assert_eq!(dp.ct_must(&orig).tcp_state, TCP_SYN_RECV, "original half");
    assert_eq!(dp.ct_must(&reply).tcp_state, TCP_SYN_RECV, "reply half");
    assert_eq!(dp.ct_map_of(&orig), Some(m::CONNTRACK_NEW));
    // C2's ACK completes the handshake; both halves move to the answered tracker.
    let ack = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_ACK);
    expect_rewrite(
        &dp,
        UPLINK_EGRESS,
        &ack,
        PASS,
        &with_tuple(&ack, CtKey::new(HOST, OUT, port, 80, IPPROTO_TCP)),
        "C2's ACK",
    );
    assert_eq!(
        dp.ct_must(&orig).tcp_state,
        TCP_ESTABLISHED,
        "original half"
    );
    assert_eq!(dp.ct_must(&reply).tcp_state, TCP_ESTABLISHED, "reply half");
    assert_eq!(dp.ct_map_of(&orig), Some(m::CONNTRACK));
    assert_eq!(dp.ct_map_of(&reply), Some(m::CONNTRACK));

    // The next packet of the flow reuses the mapping.
    let ack =
        Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_ACK | TCP_PSH).payload(b"GET / HTTP/1.0\r\n\r\n");
    let want = with_tuple(&ack, CtKey::new(HOST, OUT, port, 80, IPPROTO_TCP));
    expect_rewrite(
        &dp,
        UPLINK_EGRESS,
        &ack,
        PASS,
        &want,
        "data packet, same flow",
    );
    assert_eq!(dp.ct_keys().len(), 2);

    // A packet to a NAT-range port nobody uses is not md's: untouched.
    let stray = Ipv4Pkt::tcp(OUT, 80, HOST, port ^ 1, TCP_ACK);
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &stray,
        PASS,
        "stray packet to an unused port",
    );
}

#[test]
fn snat_udp_and_reverse() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let q = Ipv4Pkt::udp(C2, 40000, OUT, 53);
    let (port, _) = expect_snat(&mut dp, &q, "UDP C2:40000 -> OUT:53");
    assert_eq!(dp.ct_keys().len(), 2);
    let r = Ipv4Pkt::udp(OUT, 53, HOST, port).payload(b"answer");
    let want = with_tuple(&r, key_of(&q).reversed());
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &r,
        PASS,
        &want,
        "UDP reply reverse SNAT",
    );
}

#[test]
fn snat_udp_zero_checksum_stays_zero() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let q = Ipv4Pkt::udp(C2, 40001, OUT, 53).no_udp_csum();
    let (port, out) = expect_snat(&mut dp, &q, "UDP without checksum");
    assert_eq!(View::new(&out).l4_csum_field(), 0, "checksum 0 must stay 0");
    let r = Ipv4Pkt::udp(OUT, 53, HOST, port).no_udp_csum();
    let want = with_tuple(&r, key_of(&q).reversed());
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &r,
        PASS,
        &want,
        "reply without checksum",
    );
}

#[test]
fn snat_udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // One NAT port, so the translated datagram is known in advance; choose a payload word that
    // makes its checksum compute to 0, which UDP must send as 0xffff (0 means "none").
    dp.set_config(|c| {
        c.nat_port_min = NAT_MIN;
        c.nat_port_max = NAT_MIN;
    });
    let tail = *b"zz";
    let translated = Ipv4Pkt::udp(HOST, NAT_MIN, OUT, 53).payload(&[0, 0, tail[0], tail[1]]);
    let seg = &translated.ip_bytes()[20..];
    let mut seg = seg.to_vec();
    seg[6] = 0;
    seg[7] = 0;
    let s = fold(sum16(&seg, pseudo_sum(HOST, OUT, IPPROTO_UDP, seg.len())));
    let w = (!s).to_be_bytes();
    let q = Ipv4Pkt::udp(C2, 40002, OUT, 53).payload(&[w[0], w[1], tail[0], tail[1]]);
    let (port, out) = expect_snat(&mut dp, &q, "UDP whose translated checksum is 0");
    assert_eq!(port, NAT_MIN);
    assert_eq!(
        View::new(&out).l4_csum_field(),
        0xffff,
        "a computed 0 must be sent as 0xffff"
    );
}

#[test]
fn snat_icmp_echo_and_reverse() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let ping = Ipv4Pkt::echo(C2, OUT, 0x1234, 7);
    let (id, _) = expect_snat(&mut dp, &ping, "ICMP echo request");
    assert_eq!(dp.ct_keys().len(), 2);
    // The reply's tuple: identifier as destination "port".
    let reply_key = CtKey::new(OUT, HOST, 0, id, IPPROTO_ICMP);
    assert_eq!(
        fmt_key(&dp.ct_must(&reply_key).nat_tuple(IPPROTO_ICMP)),
        fmt_key(&CtKey::new(OUT, C2, 0, 0x1234, IPPROTO_ICMP))
    );
    let pong = Ipv4Pkt::echo_reply(OUT, HOST, id, 7);
    let want = Ipv4Pkt::echo_reply(OUT, C2, 0x1234, 7);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &pong,
        PASS,
        &want,
        "echo reply reverse SNAT",
    );
}

#[test]
fn snat_two_containers_same_port_get_different_nat_ports() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let a = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    let b = Ipv4Pkt::tcp(C3, 40000, OUT, 80, TCP_SYN);
    let (pa, _) = expect_snat(&mut dp, &a, "C2:40000 -> OUT:80");
    let (pb, _) = expect_snat(&mut dp, &b, "C3:40000 -> OUT:80");
    assert_ne!(pa, pb, "two flows share one NAT tuple");
    assert_eq!(dp.ct_keys().len(), 4);
    // Each answer reaches its own container.
    for (port, c) in [(pa, C2), (pb, C3)] {
        let r = Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_SYN | TCP_ACK);
        let want = with_tuple(&r, CtKey::new(OUT, c, 80, 40000, IPPROTO_TCP));
        expect_rewrite(&dp, UPLINK_INGRESS, &r, PASS, &want, "answer by NAT port");
    }
}

#[test]
fn snat_port_clash_steps_and_never_steals() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // Two NAT ports; 61000 already belongs to a live flow of someone else.
    dp.set_config(|c| {
        c.nat_port_min = NAT_MIN;
        c.nat_port_max = NAT_MIN + 1;
    });
    let taken = CtKey::new(OUT, HOST, 80, NAT_MIN, IPPROTO_TCP);
    let other = CtKey::new(OUT, C5, 80, 33333, IPPROTO_TCP);
    dp.ct_insert(taken, foreign_entry(other));
    let a = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    let (pa, _) = expect_snat(&mut dp, &a, "C2 with 61000 taken");
    assert_eq!(pa, NAT_MIN + 1, "the free port");
    assert_eq!(
        fmt_key(&dp.ct_must(&taken).nat_tuple(IPPROTO_TCP)),
        fmt_key(&other),
        "the existing flow's mapping was overwritten"
    );
    // No port left: the next flow is dropped and counted, nothing half-inserted.
    let b = Ipv4Pkt::tcp(C3, 40000, OUT, 80, TCP_SYN);
    let (rc, _) = dp.run(UPLINK_EGRESS, &b.build());
    assert_verdict(rc, SHOT, "NAT ports exhausted");
    assert_eq!(dp.uplink_stat(|s| s.drop_nat_ports), 1);
    assert_eq!(
        dp.ct_keys().len(),
        3,
        "only the foreign entry and C2's flow"
    );
    assert!(dp.ct_get(&key_of(&b)).is_none());
}

// ---------------------------------------------------------------------------------------------
// 4. Published ports

#[test]
fn dnat_published_port_at_uplink() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    let syn = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN);
    let nat = CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &syn,
        PASS,
        &with_tuple(&syn, nat),
        "OUT:5555 -> HOST:8080 published to C4:80",
    );
    let orig = key_of(&syn);
    let e = dp.ct_must(&orig);
    assert_eq!(fmt_key(&e.nat_tuple(IPPROTO_TCP)), fmt_key(&nat));
    assert_eq!(
        (e.kind, e.dir, e.hook),
        (CT_KIND_DNAT, CT_DIR_ORIGINAL, CT_HOOK_UPLINK)
    );
    let r = dp.ct_must(&nat.reversed());
    assert_eq!(
        fmt_key(&r.nat_tuple(IPPROTO_TCP)),
        fmt_key(&orig.reversed())
    );
    assert_eq!((r.kind, r.dir), (CT_KIND_DNAT, CT_DIR_REPLY));
    assert_eq!(dp.port_hits([0; 4], 8080, IPPROTO_TCP), 1);
    assert_eq!(dp.stat(|s| s.dnat), 1, "dnat counted on the target's veth");

    // The answer leaves with the published address and port.
    let synack = Ipv4Pkt::tcp(C4, 80, OUT, 5555, TCP_SYN | TCP_ACK);
    expect_rewrite(
        &dp,
        UPLINK_EGRESS,
        &synack,
        PASS,
        &with_tuple(&synack, orig.reversed()),
        "reverse DNAT C4:80 -> OUT:5555",
    );
    assert_eq!(dp.ct_must(&orig).tcp_state, TCP_SYN_RECV);
    assert_eq!(
        dp.ct_map_of(&orig),
        Some(m::CONNTRACK_NEW),
        "not answered yet"
    );
    // The client's ACK completes the handshake: the flow is answered.
    let ack = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_ACK);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &ack,
        PASS,
        &with_tuple(&ack, CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP)),
        "client's ACK",
    );
    assert_eq!(dp.ct_must(&orig).tcp_state, TCP_ESTABLISHED);
    assert_eq!(dp.ct_map_of(&orig), Some(m::CONNTRACK), "answered");
    assert_eq!(
        dp.ct_map_of(&CtKey::new(C4, OUT, 80, 5555, IPPROTO_TCP)),
        Some(m::CONNTRACK),
        "both halves move"
    );

    // Not published: untouched. Published for TCP only: UDP untouched.
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 5556, HOST, 9999, TCP_SYN),
        PASS,
        "unpublished port 9999",
    );
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::udp(OUT, 5557, HOST, 8080),
        PASS,
        "UDP to a TCP-only published port",
    );
    // Only host addresses: a packet to some other 8080 is not hijacked (and, being for
    // another host, not forwarded either: the host routes only md's traffic).
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 5558, ROUTER, 8080, TCP_SYN),
        SHOT,
        "port 8080 of an address that is not the host's",
    );
    assert_eq!(
        dp.ct_keys().len(),
        2,
        "nothing tracked for untouched packets"
    );
}

#[test]
fn dnat_loopback_bound_port_unreachable_from_uplink() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish(LOOPBACK, 8081, IPPROTO_TCP, C4, 81);
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 5555, LOOPBACK, 8081, TCP_SYN),
        PASS,
        "a wire packet to 127.0.0.1:8081",
    );
    assert!(dp.ct_keys().is_empty());
    assert_eq!(dp.port_hits(LOOPBACK, 8081, IPPROTO_TCP), 0);
}

#[test]
fn dnat_ip_bound_port_wins_only_on_its_address() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish(HOST, 8082, IPPROTO_TCP, C5, 82);
    dp.publish([0; 4], 8082, IPPROTO_TCP, C4, 83);
    let to_host = Ipv4Pkt::tcp(OUT, 6000, HOST, 8082, TCP_SYN);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &to_host,
        PASS,
        &with_tuple(&to_host, CtKey::new(OUT, C5, 6000, 82, IPPROTO_TCP)),
        "HOST:8082 (bound to HOST)",
    );
    let to_host2 = Ipv4Pkt::tcp(OUT, 6001, HOST2, 8082, TCP_SYN);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &to_host2,
        PASS,
        &with_tuple(&to_host2, CtKey::new(OUT, C4, 6001, 83, IPPROTO_TCP)),
        "HOST2:8082 (wildcard)",
    );
    assert_eq!(dp.port_hits(HOST, 8082, IPPROTO_TCP), 1);
    assert_eq!(dp.port_hits([0; 4], 8082, IPPROTO_TCP), 1);
}

// ---------------------------------------------------------------------------------------------
// 5. ICMP errors

#[test]
fn icmp_error_for_snat_flow_at_uplink_ingress() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let q = Ipv4Pkt::udp(C2, 40000, OUT, 53);
    let (port, sent) = expect_snat(&mut dp, &q, "UDP C2:40000 -> OUT:53");
    let sent_ip = View::new(&sent).ip().to_vec();

    // OUT answers with port unreachable, quoting the datagram as it saw it.
    let err = Ipv4Pkt::icmp_error(OUT, HOST, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &sent_ip);
    let (rc, out) = dp.run(UPLINK_INGRESS, &err.build());
    assert_verdict(rc, PASS, "port unreachable");
    let v = View::new(&out);
    assert_eq!(ip(v.daddr()), ip(C2), "outer destination");
    assert_eq!(ip(v.saddr()), ip(OUT), "outer source");
    let inner = quoted(&out);
    let iv = &inner;
    assert_eq!(ip(iv[12..16].try_into().unwrap()), ip(C2), "quoted source");
    assert_eq!(u16::from_be_bytes([iv[20], iv[21]]), 40000, "quoted sport");
    assert_ne!(port, 40000);
    assert_icmp_error_checksums(&out, "port unreachable after reverse SNAT");

    // Byte for byte: the quote is the container's datagram (but for its UDP checksum).
    let mut want_inner = sent_ip.clone();
    poke_addr(&mut want_inner, true, C2);
    poke_port(&mut want_inner, true, 40000);
    fix_ip_csum(&mut want_inner);
    adopt_quoted_l4_csum(&mut want_inner, &inner);
    let want = Ipv4Pkt::icmp_error(OUT, C2, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &want_inner);
    assert_frame_eq(&out, &want.build(), "port unreachable after reverse SNAT");
}

#[test]
fn icmp_error_from_router_quoting_truncated_tcp() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let syn = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    let (_, sent) = expect_snat(&mut dp, &syn, "TCP SYN");
    // A router quotes the IP header and the first 8 bytes (ports and sequence number).
    let sent_ip = View::new(&sent).ip()[..28].to_vec();
    let err = Ipv4Pkt::icmp_error(ROUTER, HOST, ICMP_TIME_EXCEEDED, 0, &sent_ip);
    let (rc, out) = dp.run(UPLINK_INGRESS, &err.build());
    assert_verdict(rc, PASS, "time exceeded");
    assert_icmp_error_checksums(&out, "time exceeded after reverse SNAT");
    let mut want_inner = sent_ip.clone();
    poke_addr(&mut want_inner, true, C2);
    poke_port(&mut want_inner, true, 40000);
    fix_ip_csum(&mut want_inner);
    // Only the destination changes outside: the router is not the quoted destination.
    let want = Ipv4Pkt::icmp_error(ROUTER, C2, ICMP_TIME_EXCEEDED, 0, &want_inner);
    assert_frame_eq(&out, &want.build(), "time exceeded after reverse SNAT");
}

#[test]
fn icmp_error_quoting_echo_request() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let ping = Ipv4Pkt::echo(C2, OUT, 0x4242, 1);
    let (_, sent) = expect_snat(&mut dp, &ping, "echo request");
    let sent_ip = View::new(&sent).ip().to_vec();
    let err = Ipv4Pkt::icmp_error(ROUTER, HOST, ICMP_DEST_UNREACH, 1, &sent_ip);
    let (rc, out) = dp.run(UPLINK_INGRESS, &err.build());
    assert_verdict(rc, PASS, "host unreachable about a ping");
    assert_icmp_error_checksums(&out, "host unreachable about a ping");
    let inner = quoted(&out);
    let mut want_inner = sent_ip.clone();
    poke_addr(&mut want_inner, true, C2);
    want_inner[24..26].copy_from_slice(&0x4242u16.to_be_bytes());
    fix_ip_csum(&mut want_inner);
    adopt_quoted_l4_csum(&mut want_inner, &inner);
    let want = Ipv4Pkt::icmp_error(ROUTER, C2, ICMP_DEST_UNREACH, 1, &want_inner);
    assert_frame_eq(&out, &want.build(), "host unreachable about a ping");
}

/// A container's own ICMP error about a translated flow leaves through the uplink translated
/// like the flow: source = the host, quote = what the outside sent.
#[test]
fn icmp_error_from_container_at_uplink_egress() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();

    // (a) About an answer of a masqueraded flow: C2 closed its socket before OUT answered.
    let q = Ipv4Pkt::udp(C2, 40000, OUT, 53);
    let (port, _) = expect_snat(&mut dp, &q, "UDP C2:40000 -> OUT:53");
    let answer = Ipv4Pkt::udp(OUT, 53, HOST, port);
    let (rc, delivered) = dp.run(UPLINK_INGRESS, &answer.build());
    assert_verdict(rc, PASS, "answer");
    let delivered_ip = View::new(&delivered).ip().to_vec();
    let err = Ipv4Pkt::icmp_error(C2, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip);
    let (rc, out) = dp.run(UPLINK_EGRESS, &err.build());
    assert_verdict(rc, PASS, "C2's port unreachable about a masqueraded flow");
    assert_icmp_error_checksums(&out, "C2's port unreachable");
    let mut want_inner = delivered_ip.clone();
    poke_addr(&mut want_inner, false, HOST);
    poke_port(&mut want_inner, false, port);
    fix_ip_csum(&mut want_inner);
    adopt_quoted_l4_csum(&mut want_inner, &quoted(&out));
    let want = Ipv4Pkt::icmp_error(HOST, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &want_inner);
    assert_frame_eq(&out, &want.build(), "C2's port unreachable");

    // (b) About a published port: C4 has nothing listening on the UDP port published for it.
    dp.publish([0; 4], 5353, IPPROTO_UDP, C4, 53);
    let ask = Ipv4Pkt::udp(OUT, 7000, HOST, 5353);
    let (rc, delivered) = dp.run(UPLINK_INGRESS, &ask.build());
    assert_verdict(rc, PASS, "UDP to a published port");
    let delivered_ip = View::new(&delivered).ip().to_vec();
    let err = Ipv4Pkt::icmp_error(C4, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip);
    let (rc, out) = dp.run(UPLINK_EGRESS, &err.build());
    assert_verdict(rc, PASS, "C4's port unreachable about a published port");
    assert_icmp_error_checksums(&out, "C4's port unreachable");
    let mut want_inner = delivered_ip.clone();
    poke_addr(&mut want_inner, false, HOST);
    poke_port(&mut want_inner, false, 5353);
    fix_ip_csum(&mut want_inner);
    adopt_quoted_l4_csum(&mut want_inner, &quoted(&out));
    let want = Ipv4Pkt::icmp_error(HOST, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &want_inner);
    assert_frame_eq(&out, &want.build(), "C4's port unreachable");
}

// ---------------------------------------------------------------------------------------------
// 6. Container veth: anti-spoofing, policy, isolation, hairpin

#[test]
fn veth_spoofing_dropped() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cases = [
        (
            Ipv4Pkt::udp([172, 18, 0, 99], 1, OUT, 53).macs(mac(C2), GW_MAC),
            "source IP that is no container's",
        ),
        (
            Ipv4Pkt::udp(C3, 1, OUT, 53).macs(mac(C2), GW_MAC),
            "another container's IP with C2's MAC",
        ),
        (
            Ipv4Pkt::udp(C2, 1, OUT, 53).macs([0x02, 0x42, 0xde, 0xad, 0xbe, 0xef], GW_MAC),
            "C2's IP with a foreign MAC",
        ),
        (
            Ipv4Pkt::udp(C7, 1, OUT, 53).macs(mac(C7), GW_MAC),
            "the IP and MAC of a container on another veth",
        ),
    ];
    for (i, (p, what)) in cases.iter().enumerate() {
        let (rc, _) = dp.run(VETH_INGRESS, &p.build());
        assert_verdict(rc, SHOT, what);
        assert_eq!(
            dp.stat(|s| s.drop_spoof),
            i as u64 + 1,
            "{what}: drop_spoof"
        );
    }
    assert!(dp.ct_keys().is_empty());

    // ARP: the sender must be the port's container, with its MAC.
    let arps = [
        (
            arp_request(mac(C2), mac(C2), C3, GW),
            "ARP claiming C3's IP",
        ),
        (
            arp_request(mac(C2), mac(C2), GW, C3),
            "ARP claiming the gateway",
        ),
        (
            arp_request(mac(C2), mac(C3), C2, GW),
            "ARP with a foreign sender MAC",
        ),
        (
            arp_request(mac(C3), mac(C2), C2, GW),
            "ARP from a foreign Ethernet source",
        ),
    ];
    for (frame, what) in &arps {
        let (rc, _) = dp.run(VETH_INGRESS, frame);
        assert_verdict(rc, SHOT, what);
    }
    assert_eq!(dp.stat(|s| s.drop_spoof), 8);
    let genuine = arp_request(mac(C2), mac(C2), C2, GW);
    let (rc, out) = dp.run(VETH_INGRESS, &genuine);
    assert_verdict(rc, PASS, "genuine ARP");
    assert_eq!(out, genuine);
    assert_eq!(dp.stat(|s| s.drop_spoof), 8);
}

#[test]
fn veth_genuine_traffic_passes_untouched() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // To the outside: masquerade happens at the uplink, not here.
    let p = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN).macs(mac(C2), GW_MAC);
    expect_untouched(&dp, VETH_INGRESS, &p, PASS, "C2 -> OUT");
    // A port number that is published, but on an address that is not the host's: not hijacked.
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    let p = Ipv4Pkt::tcp(C2, 40001, ROUTER, 8080, TCP_SYN).macs(mac(C2), GW_MAC);
    expect_untouched(&dp, VETH_INGRESS, &p, PASS, "C2 -> some server's 8080");
    let drops = dp.stat(|s| {
        s.drop_policy + s.drop_spoof + s.drop_isolation + s.drop_malformed + s.drop_unsupported
    });
    assert_eq!(drops, 0);
}

#[test]
fn veth_policy_deny_and_replies() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.policy(C3, C2, POLICY_DENY);
    // C3 may not open flows to C2.
    let c3_reply = Ipv4Pkt::tcp(C3, 80, C2, 41000, TCP_SYN | TCP_ACK).macs(mac(C3), mac(C2));
    let (rc, _) = dp.run(VETH_INGRESS, &c3_reply.build());
    assert_verdict(rc, SHOT, "C3 -> C2 with no flow (deny C3 -> C2)");
    assert_eq!(dp.stat(|s| s.drop_policy), 1);
    assert_eq!(dp.policy_drops(C3, C2), 1, "the rule counts its drops");

    // C2 opens a flow to C3 (no rule that way: default allow) ...
    let open = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_SYN).macs(mac(C2), mac(C3));
    expect_untouched(&dp, VETH_INGRESS, &open, PASS, "C2 -> C3 SYN");
    let e = dp.ct_must(&key_of(&open));
    assert_eq!(
        (e.kind, e.dir, e.hook),
        (CT_KIND_NONE, CT_DIR_ORIGINAL, CT_HOOK_VETH)
    );
    // ... so C3's answers pass although C3 -> C2 is denied,
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &c3_reply,
        PASS,
        "C3's answer to C2's flow",
    );
    let r = dp.ct_must(&key_of(&c3_reply));
    assert_eq!(r.dir, CT_DIR_REPLY);
    assert_eq!(r.tcp_state, TCP_SYN_RECV);
    // but a new flow from C3 is not.
    let new = Ipv4Pkt::tcp(C3, 5000, C2, 22, TCP_SYN).macs(mac(C3), mac(C2));
    let (rc, _) = dp.run(VETH_INGRESS, &new.build());
    assert_verdict(rc, SHOT, "new flow C3 -> C2");
    assert_eq!(dp.stat(|s| s.drop_policy), 2);
    // UDP and ICMP are subject to it too.
    let (rc, _) = dp.run(
        VETH_INGRESS,
        &Ipv4Pkt::udp(C3, 5000, C2, 53)
            .macs(mac(C3), mac(C2))
            .build(),
    );
    assert_verdict(rc, SHOT, "UDP C3 -> C2");
    let (rc, _) = dp.run(
        VETH_INGRESS,
        &Ipv4Pkt::echo(C3, C2, 9, 1).macs(mac(C3), mac(C2)).build(),
    );
    assert_verdict(rc, SHOT, "ping C3 -> C2");
    assert_eq!(dp.stat(|s| s.drop_policy), 4);

    // Without a rule, C4 -> C2 passes.
    let p = Ipv4Pkt::tcp(C4, 5000, C2, 22, TCP_SYN).macs(mac(C4), mac(C2));
    expect_untouched(&dp, VETH_INGRESS, &p, PASS, "C4 -> C2, no rule");
}

#[test]
fn veth_policy_default_deny() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.set_config(|c| c.policy_default = POLICY_DENY);
    let p = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_SYN).macs(mac(C2), mac(C3));
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "C2 -> C3 under default deny");
    assert_eq!(dp.stat(|s| s.drop_policy), 1);
    dp.policy(C2, C3, POLICY_ALLOW);
    expect_untouched(&dp, VETH_INGRESS, &p, PASS, "C2 -> C3 with an allow rule");
    // The answer passes without a C3 -> C2 rule.
    let r = Ipv4Pkt::tcp(C3, 80, C2, 41000, TCP_SYN | TCP_ACK).macs(mac(C3), mac(C2));
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &r,
        PASS,
        "C3's answer under default deny",
    );
    // Traffic to the outside is not container policy.
    let o = Ipv4Pkt::tcp(C2, 41001, OUT, 80, TCP_SYN).macs(mac(C2), GW_MAC);
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &o,
        PASS,
        "C2 -> outside under default deny",
    );
    assert_eq!(dp.stat(|s| s.drop_policy), 1);
}

#[test]
fn veth_network_isolation() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let p = Ipv4Pkt::tcp(C6, 41000, C2, 80, TCP_SYN).macs(mac(C6), [0x0e, 0x6d, 0, 0, 0, 2]);
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "net 2 -> net 1");
    let p = Ipv4Pkt::udp(C2, 41000, C6, 53).macs(mac(C2), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "net 1 -> net 2");
    assert_eq!(dp.stat(|s| s.drop_isolation), 2);
    assert!(dp.ct_keys().is_empty());
}

#[test]
fn veth_hairpin_to_published_port() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    // C3 calls HOST:8080, which is C4:80: translated and handed to C4 as the bridge would.
    let syn = Ipv4Pkt::tcp(C3, 42000, HOST, 8080, TCP_SYN).macs(mac(C3), GW_MAC);
    let nat = CtKey::new(C3, C4, 42000, 80, IPPROTO_TCP);
    let want = with_tuple(&syn, nat).macs(GW_MAC, mac(C4));
    expect_rewrite(&dp, VETH_INGRESS, &syn, REDIRECT, &want, "C3 -> HOST:8080");
    let (rc, out) = dp.run(VETH_INGRESS, &syn.build());
    assert_verdict(rc, REDIRECT, "retransmitted SYN");
    let v = View::new(&out);
    assert_eq!(
        v.eth_dst(),
        mac(C4),
        "destination MAC: the target container"
    );
    assert_eq!(v.eth_src(), GW_MAC, "source MAC: the gateway");
    let e = dp.ct_must(&key_of(&syn));
    assert_eq!(
        (e.kind, e.hook, e.dir),
        (CT_KIND_DNAT, CT_HOOK_VETH, CT_DIR_ORIGINAL)
    );
    assert_eq!(dp.port_hits([0; 4], 8080, IPPROTO_TCP), 1);

    // C4 answers C3 directly; its veth restores the published address and port.
    let synack = Ipv4Pkt::tcp(C4, 80, C3, 42000, TCP_SYN | TCP_ACK).macs(mac(C4), mac(C3));
    let want =
        with_tuple(&synack, CtKey::new(HOST, C3, 8080, 42000, IPPROTO_TCP)).macs(GW_MAC, mac(C3));
    expect_rewrite(&dp, VETH_INGRESS, &synack, REDIRECT, &want, "C4's answer");
    assert_eq!(dp.ct_must(&key_of(&syn)).tcp_state, TCP_SYN_RECV);
}

#[test]
fn veth_hairpin_to_own_published_port() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    // C4 calls its own published port: the source becomes the gateway (with a NAT port), or
    // C4 would see a packet from itself.
    let syn = Ipv4Pkt::tcp(C4, 43000, HOST, 8080, TCP_SYN).macs(mac(C4), GW_MAC);
    let (rc, out) = dp.run(VETH_INGRESS, &syn.build());
    assert_verdict(rc, REDIRECT, "C4 -> HOST:8080 (itself)");
    let v = View::new(&out);
    v.assert_checksums("self hairpin");
    let port = v.sport();
    assert!((NAT_MIN..=NAT_MAX).contains(&port), "NAT port {port}");
    let nat = CtKey::new(GW, C4, port, 80, IPPROTO_TCP);
    assert_frame_eq(
        &out,
        &with_tuple(&syn, nat).macs(GW_MAC, mac(C4)).build(),
        "self hairpin",
    );
    assert_eq!(dp.ct_must(&key_of(&syn)).kind, CT_KIND_HAIRPIN);
    // C4 answers the gateway: back to C4 as from HOST:8080.
    let synack = Ipv4Pkt::tcp(C4, 80, GW, port, TCP_SYN | TCP_ACK).macs(mac(C4), GW_MAC);
    let want =
        with_tuple(&synack, CtKey::new(HOST, C4, 8080, 43000, IPPROTO_TCP)).macs(GW_MAC, mac(C4));
    expect_rewrite(
        &dp,
        VETH_INGRESS,
        &synack,
        REDIRECT,
        &want,
        "self hairpin answer",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Header shapes: IP options, fragments

/// Router Alert (RFC 2113): 4 bytes, so IHL = 6.
const IP_OPT_RA: [u8; 4] = [0x94, 0x04, 0x00, 0x00];

#[test]
fn ip_options_translated_correctly() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let syn = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN).options(&IP_OPT_RA);
    let (port, out) = expect_snat(&mut dp, &syn, "TCP SYN with IHL 6");
    assert_eq!(View::new(&out).ihl(), 24);
    let synack = Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_SYN | TCP_ACK).options(&IP_OPT_RA);
    let want = with_tuple(&synack, key_of(&syn).reversed());
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &synack,
        PASS,
        &want,
        "SYN-ACK with IHL 6",
    );

    let q = Ipv4Pkt::udp(C2, 40000, OUT, 53).options(&IP_OPT_RA);
    expect_snat(&mut dp, &q, "UDP with IHL 6");
    let ping = Ipv4Pkt::echo(C2, OUT, 77, 1).options(&IP_OPT_RA);
    expect_snat(&mut dp, &ping, "echo with IHL 6");

    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    let d = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN).options(&IP_OPT_RA);
    let want = with_tuple(&d, CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP));
    expect_rewrite(&dp, UPLINK_INGRESS, &d, PASS, &want, "DNAT with IHL 6");
}

/// A fragment after the first of UDP datagram `id` from `saddr` to `daddr`: no L4 header.
fn later_fragment(saddr: Ip4, daddr: Ip4, id: u16) -> Ipv4Pkt {
    Ipv4Pkt {
        l4: L4::RawProto(IPPROTO_UDP, vec![0xaa; 32]),
        id,
        ..Ipv4Pkt::udp(saddr, 0, daddr, 0).payload(&[])
    }
    .frag(185)
}

/// Fragments follow their first fragment's translation both ways (issue 12): the first carries
/// the ports and is translated like any packet; later ones get its addresses. A later fragment
/// whose first was never seen is not translated: from a container it is dropped rather than
/// leak the container's address; from outside it goes to the host untouched.
#[test]
fn fragments_follow_their_first_fragment() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let stray = later_fragment(C2, OUT, 0x0777);
    let frame = stray.build();
    let (rc, out) = dp.run(UPLINK_EGRESS, &frame);
    assert_verdict(
        rc,
        SHOT,
        "later fragment from a container, first never seen",
    );
    assert_frame_eq(&out, &frame, "stray fragment must not be translated");
    assert_eq!(dp.uplink_stat(|s| s.drop_unsupported), 1);

    // Out: the first fragment is masqueraded, the later one follows.
    let first = Ipv4Pkt {
        id: 0x0101,
        ..Ipv4Pkt::udp(C2, 40000, OUT, 53).payload(&[0x55; 64])
    }
    .frag(IP_MF);
    let (port, _) = expect_snat(&mut dp, &first, "first fragment (MF) from a container");
    let later = later_fragment(C2, OUT, 0x0101);
    let want = Ipv4Pkt {
        saddr: HOST,
        ..later.clone()
    };
    expect_rewrite(
        &dp,
        UPLINK_EGRESS,
        &later,
        PASS,
        &want,
        "later fragment out",
    );

    // In: the answer's first fragment is translated back, the later one follows.
    let answer = Ipv4Pkt {
        id: 0x0202,
        ..Ipv4Pkt::udp(OUT, 53, HOST, port).payload(&[0x66; 64])
    }
    .frag(IP_MF);
    let want = with_tuple(&answer, CtKey::new(OUT, C2, 53, 40000, IPPROTO_UDP));
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &answer,
        PASS,
        &want,
        "first fragment in",
    );
    let later = later_fragment(OUT, HOST, 0x0202);
    let want = Ipv4Pkt {
        daddr: C2,
        ..later.clone()
    };
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &later,
        PASS,
        &want,
        "later fragment in",
    );

    // A later fragment of another datagram to the host is the host's.
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &later_fragment(OUT, HOST, 0x0303),
        PASS,
        "fragment of a datagram md did not translate",
    );

    // A published UDP port: fragments of one datagram reach the container together.
    dp.publish([0; 4], 5353, IPPROTO_UDP, C4, 53);
    let first = Ipv4Pkt {
        id: 0x0404,
        ..Ipv4Pkt::udp(OUT, 7000, HOST, 5353).payload(&[0x77; 64])
    }
    .frag(IP_MF);
    let want = with_tuple(&first, CtKey::new(OUT, C4, 7000, 53, IPPROTO_UDP));
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &first,
        PASS,
        &want,
        "first fragment to a published port",
    );
    let later = later_fragment(OUT, HOST, 0x0404);
    let want = Ipv4Pkt {
        daddr: C4,
        ..later.clone()
    };
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &later,
        PASS,
        &want,
        "its later fragment",
    );
}

// ---------------------------------------------------------------------------------------------
// 8. CHECKSUM_COMPLETE: skb->csum stays consistent through every rewrite

/// Runs `p` through `prog` on a CHECKSUM_COMPLETE skb; panics on EBADMSG (skb->csum stale).
#[track_caller]
fn run_complete(dp: &Dp, prog: &str, p: &Ipv4Pkt, what: &str) -> (u32, Vec<u8>) {
    match dp.run_csum_complete(prog, &p.build()) {
        Ok(r) => r,
        Err(libc::EBADMSG) => panic!(
            "{what}: skb->csum (CHECKSUM_COMPLETE) no longer matches the packet after {prog}: \
             a checksum helper was given the wrong BPF_F_PSEUDO_HDR flag"
        ),
        Err(e) => panic!(
            "{what}: BPF_PROG_TEST_RUN with BPF_F_TEST_SKB_CHECKSUM_COMPLETE: {}",
            std::io::Error::from_raw_os_error(e)
        ),
    }
}

#[test]
fn checksum_complete_skb_csum_maintained() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    // The flag exists: a packet md leaves alone runs fine.
    let plain = Ipv4Pkt::tcp(OUT, 1, HOST, 9, TCP_SYN);
    if let Err(libc::EINVAL) = dp.run_csum_complete(UPLINK_INGRESS, &plain.build()) {
        panic!("this kernel rejects BPF_F_TEST_SKB_CHECKSUM_COMPLETE (needs Linux 6.11+)");
    }

    // Masquerade and its answers: TCP, UDP, ICMP echo, IP options. (Not UDP without checksum:
    // bpf_l4_csum_replace leaves skb->csum alone when the field is 0, so the port change is not
    // carried into skb->csum; the stack never consults skb->csum for such datagrams.)
    let flows = [
        Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN),
        Ipv4Pkt::udp(C2, 40000, OUT, 53),
        Ipv4Pkt::echo(C2, OUT, 0x1234, 1),
        Ipv4Pkt::tcp(C3, 40000, OUT, 80, TCP_SYN).options(&IP_OPT_RA),
    ];
    for p in &flows {
        let what = format!("SNAT {}", fmt_key(&key_of(p)));
        let (rc, out) = run_complete(&dp, UPLINK_EGRESS, p, &what);
        assert_verdict(rc, PASS, &what);
        let v = View::new(&out);
        v.assert_checksums(&what);
        assert_eq!(ip(v.saddr()), ip(HOST), "{what}");
        let port = if p.proto() == IPPROTO_ICMP {
            v.icmp_id()
        } else {
            v.sport()
        };
        let orig = key_of(p);
        let nat = CtKey {
            saddr: HOST,
            sport: port,
            ..orig
        };
        let mut answer = p.clone();
        if let L4::Icmp { typ, .. } = &mut answer.l4 {
            *typ = md_tests::pkt::ICMP_ECHO_REPLY;
        }
        let answer = with_tuple(&answer, nat.reversed());
        let what = format!("reverse SNAT {}", fmt_key(&nat.reversed()));
        let (rc, out) = run_complete(&dp, UPLINK_INGRESS, &answer, &what);
        assert_verdict(rc, PASS, &what);
        assert_frame_eq(&out, &with_tuple(&answer, orig.reversed()).build(), &what);
    }

    // Published port and its answer.
    let syn = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN);
    let (rc, out) = run_complete(&dp, UPLINK_INGRESS, &syn, "DNAT");
    assert_verdict(rc, PASS, "DNAT");
    View::new(&out).assert_checksums("DNAT");
    let synack = Ipv4Pkt::tcp(C4, 80, OUT, 5555, TCP_SYN | TCP_ACK);
    let (rc, out) = run_complete(&dp, UPLINK_EGRESS, &synack, "reverse DNAT");
    assert_verdict(rc, PASS, "reverse DNAT");
    assert_frame_eq(
        &out,
        &with_tuple(&synack, key_of(&syn).reversed()).build(),
        "reverse DNAT",
    );

    // An ICMP error about the UDP flow.
    let q = key_of(&flows[1]);
    let nat_port = dp.ct_must(&q).nat_tuple(IPPROTO_UDP).sport;
    let sent = with_tuple(
        &flows[1],
        CtKey {
            saddr: HOST,
            sport: nat_port,
            ..q
        },
    )
    .ip_bytes();
    let err = Ipv4Pkt::icmp_error(OUT, HOST, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &sent);
    let (rc, out) = run_complete(&dp, UPLINK_INGRESS, &err, "ICMP error");
    assert_verdict(rc, PASS, "ICMP error");
    assert_icmp_error_checksums(&out, "ICMP error");
    assert_eq!(ip(View::new(&out).daddr()), ip(C2));

    // Hairpin at the veth.
    let hp = Ipv4Pkt::tcp(C5, 42000, HOST, 8080, TCP_SYN).macs(mac(C5), GW_MAC);
    let (rc, out) = run_complete(&dp, VETH_INGRESS, &hp, "hairpin");
    assert_verdict(rc, REDIRECT, "hairpin");
    assert_frame_eq(
        &out,
        &with_tuple(&hp, CtKey::new(C5, C4, 42000, 80, IPPROTO_TCP))
            .macs(GW_MAC, mac(C4))
            .build(),
        "hairpin",
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Hardening after review (commit 8071171): ICMP errors from containers, traffic flooded or
// misaddressed to a container, unsolicited traffic on the uplink, TCP DNAT only on a SYN,
// tracker lifetimes by TCP state, cut-short L4 headers.

/// A container on network 2 whose veth is ifindex 8.
const C8: Ip4 = [172, 19, 0, 8];
const SUBNET_BCAST: Ip4 = [172, 18, 255, 255];
const LIMITED_BCAST: Ip4 = [255, 255, 255, 255];
const MDNS: Ip4 = [224, 0, 0, 251];

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so of `expires_ns`.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn tcp_state_name(s: u8) -> &'static str {
    match s {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "ESTABLISHED",
        3 => "CLOSING",
        4 => "FIN_ORIGINAL",
        5 => "FIN_REPLY",
        _ => "?",
    }
}

/// Both halves of a flow (`keys`) are in `state` and expire `secs` after the packet that set
/// them, which ran between `before` and `after` (CLOCK_MONOTONIC).
#[track_caller]
fn assert_ct_state(
    dp: &mut Dp,
    keys: &[CtKey],
    state: u8,
    secs: u32,
    (before, after): (u64, u64),
    what: &str,
) {
    let life = u64::from(secs) * 1_000_000_000;
    // The half a packet does not hit is refreshed only when its lifetime falls a second behind
    // (or the state changes): it may trail by up to that, measured on the tracker's coarse
    // clock, which runs up to a tick behind `before`.
    const REFRESH_SLACK: u64 = 1_000_000_000 + 20_000_000;
    for k in keys {
        let e = dp.ct_must(k);
        let left = (i128::from(e.expires_ns) - i128::from(before)) as f64 / 1e9;
        assert_eq!(
            tcp_state_name(e.tcp_state),
            tcp_state_name(state),
            "{what}: tcp_state of {} (expires in {left:.1} s)",
            fmt_key(k)
        );
        assert!(
            e.expires_ns + REFRESH_SLACK >= before + life && e.expires_ns <= after + life,
            "{what}: {} ({}) expires {left:.1} s after the packet, expected {secs} s",
            fmt_key(k),
            tcp_state_name(e.tcp_state)
        );
    }
}

/// Runs `p` through `prog`, expecting `rc`; returns (before, after) CLOCK_MONOTONIC.
#[track_caller]
fn timed_run(dp: &Dp, prog: &str, p: &Ipv4Pkt, rc: u32, what: &str) -> (u64, u64) {
    let before = mono_ns();
    let (got, _) = dp.run(prog, &p.build());
    let after = mono_ns();
    assert_verdict(got, rc, what);
    (before, after)
}

/// `frame` cut after `l4_len` bytes of its L4 header, with IP total length and header
/// checksum made consistent (a well-formed IP packet whose transport header is short).
fn truncate_l4(frame: &[u8], l4_len: usize) -> Vec<u8> {
    let ihl = usize::from(frame[ETH_HLEN_U] & 0x0f) * 4;
    let mut f = frame[..ETH_HLEN_U + ihl + l4_len].to_vec();
    let total = (ihl + l4_len) as u16;
    f[ETH_HLEN_U + 2..ETH_HLEN_U + 4].copy_from_slice(&total.to_be_bytes());
    fix_ip_csum(&mut f[ETH_HLEN_U..]);
    f
}

const ETH_HLEN_U: usize = md_tests::pkt::ETH_HLEN;

/// Runs `frame` through `prog`; expects `rc` and the frame as it was.
#[track_caller]
fn expect_frame_untouched(dp: &Dp, prog: &str, frame: &[u8], rc: u32, what: &str) {
    let (got, out) = dp.run(prog, frame);
    assert_verdict(got, rc, what);
    assert_frame_eq(&out, frame, what);
}

/// A container is no router: an ICMP error it sends is only about a packet that was sent to
/// it (quoted destination = the error's source). One quoting somebody else's flow must not be
/// translated and handed to that flow's peer.
#[test]
fn hardening_container_icmp_error_about_a_flow_not_its_own_is_not_translated() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();

    // (a) A tracked C3 -> C4 flow between containers. C2 forges C4's "port unreachable" about
    // it and sends it to C3.
    let c3c4 = Ipv4Pkt::udp(C3, 41000, C4, 5300).macs(mac(C3), mac(C4));
    expect_untouched(&dp, VETH_INGRESS, &c3c4, PASS, "C3 -> C4 (tracked)");
    dp.ct_must(&key_of(&c3c4).reversed());
    let forged = Ipv4Pkt::icmp_error(
        C2,
        C3,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &c3c4.ip_bytes(),
    )
    .macs(mac(C2), mac(C3));
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &forged,
        PASS,
        "C2's error quoting C3 -> C4, to C3 (no rule): plain C2 -> C3 traffic, untranslated",
    );

    // (b) A flow through a published port: C3 -> HOST:5353, which is C4:53. C2 quotes the
    // datagram as C4 received it; translated, it would tell C3 that HOST:5353 is unreachable.
    dp.publish([0; 4], 5353, IPPROTO_UDP, C4, 53);
    let hp = Ipv4Pkt::udp(C3, 42000, HOST, 5353).macs(mac(C3), GW_MAC);
    let (rc, delivered) = dp.run(VETH_INGRESS, &hp.build());
    assert_verdict(rc, REDIRECT, "C3 -> HOST:5353 (C4:53)");
    let delivered_ip = View::new(&delivered).ip().to_vec();
    let forged_hp =
        Ipv4Pkt::icmp_error(C2, C3, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip)
            .macs(mac(C2), mac(C3));
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &forged_hp,
        PASS,
        "C2's error quoting C3 -> C4:53 (published), to C3 (no rule)",
    );

    // With deny C2 -> C3 neither may reach C3 at all.
    dp.policy(C2, C3, POLICY_DENY);
    for (p, what) in [
        (&forged, "C2's error quoting C3 -> C4 under deny C2 -> C3"),
        (
            &forged_hp,
            "C2's error quoting C3 -> C4:53 under deny C2 -> C3",
        ),
    ] {
        let frame = p.build();
        let (rc, out) = dp.run(VETH_INGRESS, &frame);
        assert_ne!(
            rc,
            REDIRECT,
            "{what}: delivered into C3 (verdict {})",
            verdict(rc)
        );
        assert_verdict(rc, SHOT, what);
        assert_frame_eq(&out, &frame, what);
    }
    assert_eq!(dp.stat(|s| s.drop_policy), 2);

    // (c) At the uplink: C3's masqueraded flow C3:40000 -> OUT:53. C2 quotes the answer C3
    // received and sends the error out: it must not be turned into an error about HOST:port.
    let q = Ipv4Pkt::udp(C3, 40000, OUT, 53);
    let (port, _) = expect_snat(&mut dp, &q, "UDP C3:40000 -> OUT:53");
    let (rc, delivered) = dp.run(UPLINK_INGRESS, &Ipv4Pkt::udp(OUT, 53, HOST, port).build());
    assert_verdict(rc, PASS, "OUT's answer to C3");
    let delivered_ip = View::new(&delivered).ip().to_vec();
    let forged_up =
        Ipv4Pkt::icmp_error(C2, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip);
    // Dropped like anything else from a container that cannot be masqueraded.
    expect_frame_untouched(
        &dp,
        UPLINK_EGRESS,
        &forged_up.build(),
        SHOT,
        "C2's error quoting C3's masqueraded flow, at uplink egress",
    );
    // A flow published to C4 from outside: OUT:7000 -> HOST:5353 = C4:53. C2 quotes it.
    let (rc, delivered) = dp.run(UPLINK_INGRESS, &Ipv4Pkt::udp(OUT, 7000, HOST, 5353).build());
    assert_verdict(rc, PASS, "OUT -> HOST:5353 (C4:53)");
    let delivered_ip4 = View::new(&delivered).ip().to_vec();
    let forged_up4 = Ipv4Pkt::icmp_error(
        C2,
        OUT,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &delivered_ip4,
    );
    expect_frame_untouched(
        &dp,
        UPLINK_EGRESS,
        &forged_up4.build(),
        SHOT,
        "C2's error quoting a flow published to C4, at uplink egress",
    );
    assert_eq!(dp.uplink_stat(|s| s.drop_unsupported), 2);

    // Control: C3's own error about the answer it got is still translated.
    let own = Ipv4Pkt::icmp_error(C3, OUT, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip);
    let (rc, out) = dp.run(UPLINK_EGRESS, &own.build());
    assert_verdict(rc, PASS, "C3's own error about its masqueraded flow");
    assert_icmp_error_checksums(&out, "C3's own error");
    let v = View::new(&out);
    assert_eq!(
        (ip(v.saddr()), ip(v.daddr())),
        (ip(HOST), ip(OUT)),
        "C3's own error leaves masqueraded"
    );
}

/// A genuine ICMP error from a container (about a packet sent to it) is translated and
/// delivered; when it travels in the original direction of a flow (the erring container
/// opened it) it is subject to policy like the flow's other packets, and to isolation.
#[test]
fn hardening_container_icmp_error_policy_and_isolation() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();

    // (a) C2 opened a UDP flow to C3; C3's port unreachable travels the flow's reply way:
    // delivered to C2, even under deny C3 -> C2 (like any answer).
    let q = Ipv4Pkt::udp(C2, 40000, C3, 5300).macs(mac(C2), mac(C3));
    expect_untouched(&dp, VETH_INGRESS, &q, PASS, "C2 -> C3");
    dp.policy(C3, C2, POLICY_DENY);
    let err = Ipv4Pkt::icmp_error(C3, C2, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &q.ip_bytes())
        .macs(mac(C3), mac(C2));
    expect_rewrite(
        &dp,
        VETH_INGRESS,
        &err,
        REDIRECT,
        &err.clone().macs(GW_MAC, mac(C2)),
        "C3's error about C2's datagram (reply direction) under deny C3 -> C2",
    );

    // (b) C4 opened a UDP flow to C5 and C5 answered; C4's error about that answer travels
    // the flow's original direction (C4 -> C5): delivered while allowed, dropped once
    // deny C4 -> C5 is in place.
    let ask = Ipv4Pkt::udp(C4, 5000, C5, 53).macs(mac(C4), mac(C5));
    expect_untouched(&dp, VETH_INGRESS, &ask, PASS, "C4 -> C5");
    let answer = Ipv4Pkt::udp(C5, 53, C4, 5000).macs(mac(C5), mac(C4));
    expect_untouched(&dp, VETH_INGRESS, &answer, PASS, "C5's answer");
    let err = Ipv4Pkt::icmp_error(
        C4,
        C5,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &answer.ip_bytes(),
    )
    .macs(mac(C4), mac(C5));
    expect_rewrite(
        &dp,
        VETH_INGRESS,
        &err,
        REDIRECT,
        &err.clone().macs(GW_MAC, mac(C5)),
        "C4's error about C5's answer (original direction), allowed",
    );
    dp.policy(C4, C5, POLICY_DENY);
    let (rc, _) = dp.run(VETH_INGRESS, &err.build());
    assert_verdict(
        rc,
        SHOT,
        "C4's error about C5's answer (original direction) under deny C4 -> C5",
    );
    assert_eq!(dp.stat(|s| s.drop_policy), 1);
    assert_eq!(dp.policy_drops(C4, C5), 1);

    // (c) Through a published port (hairpin): C2 -> HOST:5353 = C3:53. C3's genuine error
    // comes back translated: from HOST, quoting C2 -> HOST:5353.
    dp.publish([0; 4], 5353, IPPROTO_UDP, C3, 53);
    let hp = Ipv4Pkt::udp(C2, 42000, HOST, 5353).macs(mac(C2), GW_MAC);
    let (rc, delivered) = dp.run(VETH_INGRESS, &hp.build());
    assert_verdict(rc, REDIRECT, "C2 -> HOST:5353 (C3:53)");
    let delivered_ip = View::new(&delivered).ip().to_vec();
    let err = Ipv4Pkt::icmp_error(C3, C2, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &delivered_ip)
        .macs(mac(C3), mac(C2));
    let (rc, out) = dp.run(VETH_INGRESS, &err.build());
    assert_verdict(rc, REDIRECT, "C3's error about C2's datagram via HOST:5353");
    assert_icmp_error_checksums(&out, "C3's error via HOST:5353");
    let mut want_inner = delivered_ip.clone();
    poke_addr(&mut want_inner, false, HOST);
    poke_port(&mut want_inner, false, 5353);
    fix_ip_csum(&mut want_inner);
    adopt_quoted_l4_csum(&mut want_inner, &quoted(&out));
    let want = Ipv4Pkt::icmp_error(HOST, C2, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &want_inner)
        .macs(GW_MAC, mac(C2));
    assert_frame_eq(&out, &want.build(), "C3's error via HOST:5353");
    // C3 answers; C2's error about that answer goes the flow's original way (to C3, after
    // translation) and is dropped once deny C2 -> C3 is in place.
    let reply = Ipv4Pkt::udp(C3, 53, C2, 42000).macs(mac(C3), mac(C2));
    let (rc, got) = dp.run(VETH_INGRESS, &reply.build());
    assert_verdict(rc, REDIRECT, "C3's answer to C2 (as HOST:5353)");
    let got_ip = View::new(&got).ip().to_vec();
    let err = Ipv4Pkt::icmp_error(C2, HOST, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &got_ip)
        .macs(mac(C2), GW_MAC);
    let (rc, out) = dp.run(VETH_INGRESS, &err.build());
    assert_verdict(rc, REDIRECT, "C2's error about HOST:5353's answer, allowed");
    let v = View::new(&out);
    assert_eq!(
        (ip(v.saddr()), ip(v.daddr()), v.eth_dst()),
        (ip(C2), ip(C3), mac(C3)),
        "C2's error about HOST:5353's answer goes to C3"
    );
    dp.policy(C2, C3, POLICY_DENY);
    let (rc, _) = dp.run(VETH_INGRESS, &err.build());
    assert_verdict(
        rc,
        SHOT,
        "C2's error about HOST:5353's (C3's) answer under deny C2 -> C3",
    );
    assert_eq!(dp.stat(|s| s.drop_policy), 2);

    // (d) Isolation: a tracked direct flow C2 -> C6 (net 1 -> net 2; inserted by hand: the
    // datapath itself never tracks one). C6's error about it is not delivered.
    let x = CtKey::new(C2, C6, 40000, 5300, IPPROTO_UDP);
    let mut e = foreign_entry(x);
    (e.kind, e.dir, e.hook, e.identity) =
        (CT_KIND_NONE, CT_DIR_ORIGINAL, CT_HOOK_VETH, identity(C6));
    dp.ct_insert(x, e);
    let mut r = foreign_entry(x.reversed());
    (r.kind, r.dir, r.hook, r.identity) = (CT_KIND_NONE, CT_DIR_REPLY, CT_HOOK_VETH, identity(C2));
    dp.ct_insert(x.reversed(), r);
    let sent = Ipv4Pkt::udp(C2, 40000, C6, 5300);
    let err = Ipv4Pkt::icmp_error(
        C6,
        C2,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &sent.ip_bytes(),
    )
    .macs(mac(C6), [0x0e, 0x6d, 0, 0, 0, 0x02]);
    let (rc, _) = dp.run(VETH_INGRESS, &err.build());
    assert_verdict(rc, SHOT, "C6's (net 2) error about a flow from C2 (net 1)");
    assert_eq!(dp.stat(|s| s.drop_isolation), 1);
}

/// What one container sends that reaches another without being addressed to that container's
/// IP (broadcast, multicast, or such an IP destination in a frame unicast to its MAC) is
/// checked at the receiver's veth egress, against the sender, and counted on the sender.
#[test]
fn hardening_veth_egress_checks_misaddressed_ip_per_receiver() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // The receiver is C3 behind ifindex 1; senders: C7 (net 1, veth 7), C8 (net 2, veth 8).
    dp.veth_owner(LO, C3);
    dp.endpoint(C8, 2, 8);
    dp.add_if_stats(7);
    dp.add_if_stats(8);
    let dsts = [
        (SUBNET_BCAST, "subnet broadcast"),
        (LIMITED_BCAST, "255.255.255.255"),
        (MDNS, "multicast 224.0.0.251"),
    ];
    let to_c3 = |src: Ip4, dst: Ip4| Ipv4Pkt::udp(src, 40000, dst, 5300).macs(mac(src), mac(C3));

    for (d, what) in dsts {
        let what = format!("C7 -> {what} in a frame to C3's MAC, no rule");
        expect_untouched(&dp, VETH_EGRESS, &to_c3(C7, d), PASS, &what);
    }
    dp.policy(C7, C3, POLICY_DENY);
    for (d, what) in dsts {
        let what = format!("C7 -> {what} in a frame to C3's MAC, deny C7 -> C3");
        let (rc, _) = dp.run(VETH_EGRESS, &to_c3(C7, d).build());
        assert_verdict(rc, SHOT, &what);
    }
    // The same in a group-addressed frame.
    let flooded = to_c3(C7, SUBNET_BCAST).macs(mac(C7), [0xff; 6]);
    let (rc, _) = dp.run(VETH_EGRESS, &flooded.build());
    assert_verdict(rc, SHOT, "C7's broadcast frame, deny C7 -> C3");
    assert_eq!(dp.stat_of(7, |s| s.drop_policy), 4, "counted on C7's veth");
    assert_eq!(
        dp.stat_of(LO, |s| s.drop_policy),
        0,
        "not on the receiver's"
    );
    assert_eq!(dp.policy_drops(C7, C3), 4);
    // Unicast to C3's own address was checked where it entered (veth ingress): passes here.
    expect_untouched(
        &dp,
        VETH_EGRESS,
        &to_c3(C7, C3),
        PASS,
        "C7 -> C3's own address at C3's veth egress",
    );
    // Another container: not subject to C7 -> C3.
    expect_untouched(
        &dp,
        VETH_EGRESS,
        &to_c3(C4, SUBNET_BCAST),
        PASS,
        "C4 -> subnet broadcast in a frame to C3's MAC",
    );

    // A sender on another network: isolation.
    for (d, what) in dsts {
        let what = format!("C8 (net 2) -> {what} in a frame to C3's MAC");
        let (rc, _) = dp.run(VETH_EGRESS, &to_c3(C8, d).build());
        assert_verdict(rc, SHOT, &what);
    }
    assert_eq!(
        dp.stat_of(8, |s| s.drop_isolation),
        3,
        "counted on C8's veth"
    );
    assert_eq!(dp.stat_of(LO, |s| s.drop_isolation), 0);
    assert_eq!(
        dp.stat_of(LO, |s| s.ingress_packets),
        12,
        "C3's veth counts every frame it saw (12)"
    );
}

/// Containers are reached from the uplink only through published ports: a packet routed
/// straight to a container address without a tracked flow is dropped (unsolicited), one
/// claiming a container source is dropped (spoof); answers of masqueraded flows still pass.
#[test]
fn hardening_uplink_drops_unsolicited_and_spoofed() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let unsolicited = [
        (
            Ipv4Pkt::tcp(OUT, 5555, C2, 80, TCP_SYN),
            "TCP SYN OUT -> C2:80",
        ),
        (Ipv4Pkt::udp(OUT, 5555, C2, 53), "UDP OUT -> C2:53"),
        (Ipv4Pkt::echo(OUT, C2, 7, 1), "ping OUT -> C2"),
        (
            Ipv4Pkt::icmp_error(
                ROUTER,
                C2,
                ICMP_DEST_UNREACH,
                ICMP_PORT_UNREACH,
                &Ipv4Pkt::udp(C2, 1234, OUT, 53).ip_bytes(),
            ),
            "ICMP error to C2 about no tracked flow",
        ),
        (
            Ipv4Pkt {
                l4: L4::Raw(vec![0; 24]),
                ..Ipv4Pkt::udp(OUT, 0, C2, 0).payload(&[])
            }
            .frag(185),
            "a fragment OUT -> C2",
        ),
    ];
    for (i, (p, what)) in unsolicited.iter().enumerate() {
        let frame = p.build();
        let (rc, _) = dp.run(UPLINK_INGRESS, &frame);
        assert_verdict(rc, SHOT, what);
        assert_eq!(
            dp.uplink_stat(|s| s.drop_unsolicited),
            i as u64 + 1,
            "{what}: drop_unsolicited"
        );
    }
    // From the wire with a container source address.
    let spoofed = [
        (
            Ipv4Pkt::tcp(C3, 80, HOST, 61000, TCP_SYN | TCP_ACK),
            "C3:80 -> HOST",
        ),
        (Ipv4Pkt::udp(C3, 53, C2, 4000), "C3 -> C2 from the wire"),
    ];
    for (i, (p, what)) in spoofed.iter().enumerate() {
        let (rc, _) = dp.run(UPLINK_INGRESS, &p.build());
        assert_verdict(rc, SHOT, what);
        assert_eq!(
            dp.uplink_stat(|s| s.drop_spoof),
            i as u64 + 1,
            "{what}: drop_spoof"
        );
    }
    assert!(dp.ct_keys().is_empty(), "nothing tracked for drops");

    // The answer of a masqueraded flow still passes, translated.
    let syn = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    let (port, _) = expect_snat(&mut dp, &syn, "C2 -> OUT:80");
    let synack = Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_SYN | TCP_ACK);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &synack,
        PASS,
        &with_tuple(&synack, key_of(&syn).reversed()),
        "answer of a masqueraded flow",
    );
    // From the wire with the container's own tuple of that flow: not the flow's (its entry
    // is for the way out), so no masquerade for it: dropped as spoofed.
    let forged = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_ACK);
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &forged,
        SHOT,
        "C2's own tuple from the wire",
    );
    // A published port still works; the host's own addresses (the gateway too) are not md's.
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    let d = Ipv4Pkt::tcp(OUT, 5556, HOST, 8080, TCP_SYN);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &d,
        PASS,
        &with_tuple(&d, CtKey::new(OUT, C4, 5556, 80, IPPROTO_TCP)),
        "published port",
    );
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::udp(OUT, 5557, GW, 53),
        PASS,
        "OUT -> the gateway",
    );
    assert_eq!(dp.uplink_stat(|s| s.drop_unsolicited), 5);
    assert_eq!(dp.uplink_stat(|s| s.drop_spoof), 3);
}

/// A TCP segment opens a published port's translation only as a SYN: anything else without a
/// tracked flow is some host connection's business, at the uplink and for hairpin alike.
#[test]
fn hardening_tcp_dnat_opens_only_on_syn() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    let others = [
        (TCP_ACK, "ACK"),
        (TCP_SYN | TCP_ACK, "SYN-ACK"),
        (TCP_ACK | TCP_PSH, "ACK+PSH"),
        (TCP_RST, "RST"),
        (TCP_FIN | TCP_ACK, "FIN-ACK"),
    ];
    for (flags, what) in others {
        expect_untouched(
            &dp,
            UPLINK_INGRESS,
            &Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, flags),
            PASS,
            &format!("{what} OUT -> HOST:8080 (published), no flow"),
        );
        expect_untouched(
            &dp,
            VETH_INGRESS,
            &Ipv4Pkt::tcp(C3, 42000, HOST, 8080, flags).macs(mac(C3), GW_MAC),
            PASS,
            &format!("{what} C3 -> HOST:8080 (hairpin), no flow"),
        );
    }
    assert!(dp.ct_keys().is_empty(), "no flow opened by a non-SYN");
    assert_eq!(dp.port_hits([0; 4], 8080, IPPROTO_TCP), 0);
    // A SYN opens it, at both places.
    let syn = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &syn,
        PASS,
        &with_tuple(&syn, CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP)),
        "SYN OUT -> HOST:8080",
    );
    let hp = Ipv4Pkt::tcp(C3, 42000, HOST, 8080, TCP_SYN).macs(mac(C3), GW_MAC);
    expect_rewrite(
        &dp,
        VETH_INGRESS,
        &hp,
        REDIRECT,
        &with_tuple(&hp, CtKey::new(C3, C4, 42000, 80, IPPROTO_TCP)).macs(GW_MAC, mac(C4)),
        "SYN C3 -> HOST:8080",
    );
    assert_eq!(dp.port_hits([0; 4], 8080, IPPROTO_TCP), 2);
    // ... after which the flow's other segments follow it.
    let ack = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_ACK);
    expect_rewrite(
        &dp,
        UPLINK_INGRESS,
        &ack,
        PASS,
        &with_tuple(&ack, CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP)),
        "ACK of the opened flow",
    );
}

/// An answered flow that only sends one way (a UDP stream its peer answered once) keeps its
/// reply half alive: a packet refreshes the other half once its lifetime moved a second past
/// what it last gave it. Before, a packet compared with its own previous expiry, so packets
/// under a second apart never refreshed the reply half: it died under a live original half,
/// and with it the late answers (or another flow took its NAT tuple).
#[test]
fn a_one_way_flow_keeps_its_reply_half_alive() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cfg = dp.config();
    let q = Ipv4Pkt::udp(C2, 40000, OUT, 53);
    let (port, _) = expect_snat(&mut dp, &q, "UDP C2:40000 -> OUT:53");
    let answer = Ipv4Pkt::udp(OUT, 53, HOST, port).payload(b"answer");
    timed_run(&dp, UPLINK_INGRESS, &answer, PASS, "the one answer");
    // Two seconds of datagrams 100 ms apart, all one way.
    let mut t = (0, 0);
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        t = timed_run(&dp, UPLINK_EGRESS, &q, PASS, "C2's next datagram");
    }
    let flow = [key_of(&q), CtKey::new(OUT, HOST, 53, port, IPPROTO_UDP)];
    assert_ct_state(&mut dp, &flow, 0, cfg.ct_udp_secs, t, "after 2 s one way");
}

/// A flow first seen mid-stream (no SYN) is not known to be alive: it gets the SYN lifetime,
/// not the established one (6 h), until the other side answers.
#[test]
fn hardening_ct_mid_stream_pickup_gets_syn_lifetime() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cfg = dp.config();
    // A container's ACK at uplink egress: masqueraded, tracked.
    let ack = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_ACK);
    let before = mono_ns();
    let (port, _) = expect_snat(&mut dp, &ack, "mid-stream ACK C2 -> OUT:80");
    let t = (before, mono_ns());
    let flow = [key_of(&ack), CtKey::new(OUT, HOST, 80, port, IPPROTO_TCP)];
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_SYN_SENT,
        cfg.ct_tcp_syn_secs,
        t,
        "masqueraded mid-stream ACK",
    );
    // The other side answers, and the container acknowledges: now it is established.
    let t = timed_run(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_ACK | TCP_PSH).payload(b"data"),
        PASS,
        "OUT's answer",
    );
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_SYN_RECV,
        cfg.ct_tcp_syn_secs,
        t,
        "after the answer",
    );
    let t = timed_run(&dp, UPLINK_EGRESS, &ack, PASS, "C2's next ACK");
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_ESTABLISHED,
        cfg.ct_tcp_established_secs,
        t,
        "after both sides spoke",
    );

    // Between containers at the veth.
    let p = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_ACK | TCP_PSH)
        .payload(b"x")
        .macs(mac(C2), mac(C3));
    let t = timed_run(&dp, VETH_INGRESS, &p, PASS, "mid-stream C2 -> C3");
    assert_ct_state(
        &mut dp,
        &[key_of(&p), key_of(&p).reversed()],
        TCP_SYN_SENT,
        cfg.ct_tcp_syn_secs,
        t,
        "container-to-container mid-stream pickup",
    );
}

/// Opens C2:sport -> OUT:80 (SYN, SYN-ACK, ACK, with consistent sequence numbers: C2 starts at
/// 1000, OUT at 5000); returns the flow's two tracker keys and the NAT port.
#[track_caller]
fn established_snat_flow(dp: &mut Dp, sport: u16) -> ([CtKey; 2], u16) {
    let syn = Ipv4Pkt::tcp(C2, sport, OUT, 80, TCP_SYN).seq_ack(1000, 0);
    let (port, _) = expect_snat(dp, &syn, "SYN");
    let (rc, _) = dp.run(
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_SYN | TCP_ACK)
            .seq_ack(5000, 1001)
            .build(),
    );
    assert_verdict(rc, PASS, "SYN-ACK");
    let (rc, _) = dp.run(
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, sport, OUT, 80, TCP_ACK)
            .seq_ack(1001, 5001)
            .build(),
    );
    assert_verdict(rc, PASS, "ACK");
    let flow = [key_of(&syn), CtKey::new(OUT, HOST, 80, port, IPPROTO_TCP)];
    assert_eq!(dp.ct_must(&flow[0]).tcp_state, TCP_ESTABLISHED);
    assert_eq!(dp.ct_map_of(&flow[0]), Some(m::CONNTRACK));
    (flow, port)
}

/// A FIN one way is a half-close: the other side may talk for long, so the flow keeps the
/// established lifetime; only FIN both ways (or RST) shortens it to the closing lifetime.
#[test]
fn hardening_ct_half_close_keeps_established_lifetime() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cfg = dp.config();
    let (est, closing) = (cfg.ct_tcp_established_secs, cfg.ct_tcp_closing_secs);

    // (a) The container (original side) closes first.
    let (flow, port) = established_snat_flow(&mut dp, 40001);
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40001, OUT, 80, TCP_FIN | TCP_ACK),
        PASS,
        "C2's FIN",
    );
    assert_ct_state(&mut dp, &flow, TCP_FIN_ORIGINAL, est, t, "after C2's FIN");
    let t = timed_run(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_ACK | TCP_PSH).payload(b"late answer"),
        PASS,
        "OUT still sends",
    );
    assert_ct_state(&mut dp, &flow, TCP_FIN_ORIGINAL, est, t, "OUT still sends");
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40001, OUT, 80, TCP_ACK),
        PASS,
        "C2 acknowledges",
    );
    assert_ct_state(&mut dp, &flow, TCP_FIN_ORIGINAL, est, t, "C2 acknowledges");
    let t = timed_run(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_FIN | TCP_ACK),
        PASS,
        "OUT's FIN",
    );
    assert_ct_state(&mut dp, &flow, TCP_CLOSING, closing, t, "FIN both ways");

    // (b) The outside (reply side) closes first.
    let (flow, port) = established_snat_flow(&mut dp, 40002);
    let t = timed_run(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_FIN | TCP_ACK),
        PASS,
        "OUT's FIN",
    );
    assert_ct_state(&mut dp, &flow, TCP_FIN_REPLY, est, t, "after OUT's FIN");
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40002, OUT, 80, TCP_ACK | TCP_PSH).payload(b"more"),
        PASS,
        "C2 still sends",
    );
    assert_ct_state(&mut dp, &flow, TCP_FIN_REPLY, est, t, "C2 still sends");
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40002, OUT, 80, TCP_FIN | TCP_ACK),
        PASS,
        "C2's FIN",
    );
    assert_ct_state(&mut dp, &flow, TCP_CLOSING, closing, t, "FIN both ways");

    // (c) Between containers at the veth: C2 -> C3, C2 half-closes.
    let syn = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_SYN).macs(mac(C2), mac(C3));
    expect_untouched(&dp, VETH_INGRESS, &syn, PASS, "C2 -> C3 SYN");
    let synack = Ipv4Pkt::tcp(C3, 80, C2, 41000, TCP_SYN | TCP_ACK).macs(mac(C3), mac(C2));
    expect_untouched(&dp, VETH_INGRESS, &synack, PASS, "C3's SYN-ACK");
    let ack = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_ACK).macs(mac(C2), mac(C3));
    expect_untouched(&dp, VETH_INGRESS, &ack, PASS, "C2's ACK");
    let flow = [key_of(&syn), key_of(&synack)];
    let fin = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_FIN | TCP_ACK).macs(mac(C2), mac(C3));
    let t = timed_run(&dp, VETH_INGRESS, &fin, PASS, "C2's FIN to C3");
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_FIN_ORIGINAL,
        est,
        t,
        "C2 -> C3 half-closed",
    );
}

/// A flow nobody answered keeps the SYN lifetime whatever it sends (a SYN then a FIN used to
/// get the 6 h half-closed lifetime) and stays with the unanswered flows.
#[test]
fn hardening_ct_unanswered_flow_stays_short() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cfg = dp.config();
    let syn = Ipv4Pkt::tcp(C2, 40005, OUT, 80, TCP_SYN).seq_ack(1000, 0);
    let (port, _) = expect_snat(&mut dp, &syn, "SYN");
    let flow = [key_of(&syn), CtKey::new(OUT, HOST, 80, port, IPPROTO_TCP)];
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40005, OUT, 80, TCP_FIN | TCP_ACK).seq_ack(1001, 0),
        PASS,
        "FIN without an answer",
    );
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_SYN_SENT,
        cfg.ct_tcp_syn_secs,
        t,
        "SYN then FIN, unanswered",
    );
    assert_eq!(dp.ct_map_of(&flow[0]), Some(m::CONNTRACK_NEW));
    assert_eq!(dp.ct_map_of(&flow[1]), Some(m::CONNTRACK_NEW));
}

/// RST closes at once (closing lifetime), from either side.
#[test]
fn hardening_ct_rst_closes() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let cfg = dp.config();
    let (flow, port) = established_snat_flow(&mut dp, 40003);
    // A blind RST, off the window, changes nothing (it passes: the receiver drops it too).
    for (seq, what) in [(4000, "RST below the window"), (900_000, "RST far ahead")] {
        let t = timed_run(
            &dp,
            UPLINK_INGRESS,
            &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_RST).seq_ack(seq, 0),
            PASS,
            what,
        );
        assert_ct_state(
            &mut dp,
            &flow,
            TCP_ESTABLISHED,
            cfg.ct_tcp_established_secs,
            t,
            what,
        );
    }
    // At the edge C2 acknowledged (OUT's next sequence number): closes.
    let t = timed_run(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 80, HOST, port, TCP_RST | TCP_ACK).seq_ack(5001, 1001),
        PASS,
        "OUT's RST",
    );
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_CLOSING,
        cfg.ct_tcp_closing_secs,
        t,
        "RST",
    );
    // After a half-close too.
    let (flow, _) = established_snat_flow(&mut dp, 40004);
    let (rc, _) = dp.run(
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40004, OUT, 80, TCP_FIN | TCP_ACK).build(),
    );
    assert_verdict(rc, PASS, "C2's FIN");
    let t = timed_run(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 40004, OUT, 80, TCP_RST).seq_ack(1001, 0),
        PASS,
        "C2's RST",
    );
    assert_ct_state(
        &mut dp,
        &flow,
        TCP_CLOSING,
        cfg.ct_tcp_closing_secs,
        t,
        "RST after a half-close",
    );
}

/// A packet of its own whose TCP/UDP header is cut short has no checksum field to update and
/// no ports to trust: never translated, never tracked.
#[test]
fn hardening_cut_short_l4_header_not_translated() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    dp.publish([0; 4], 5353, IPPROTO_UDP, C4, 53);
    let tcp8 = truncate_l4(&Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN).build(), 8);
    let tcp19 = truncate_l4(&Ipv4Pkt::tcp(C2, 40001, OUT, 80, TCP_SYN).build(), 19);
    let udp6 = truncate_l4(&Ipv4Pkt::udp(C2, 40002, OUT, 53).payload(&[]).build(), 6);
    for (f, what) in [
        (&tcp8, "8 bytes of TCP from C2"),
        (&tcp19, "19 bytes of TCP from C2"),
        (&udp6, "6 bytes of UDP from C2"),
    ] {
        // Dropped like anything else a container sends that cannot be masqueraded.
        expect_frame_untouched(
            &dp,
            UPLINK_EGRESS,
            f,
            SHOT,
            &format!("{what}, uplink egress"),
        );
    }
    assert!(
        dp.ct_keys().is_empty(),
        "cut-short packets left tracker entries"
    );
    // Hairpin to a published port and DNAT from outside: not translated either.
    let hp = truncate_l4(
        &Ipv4Pkt::tcp(C3, 42000, HOST, 8080, TCP_SYN)
            .macs(mac(C3), GW_MAC)
            .build(),
        8,
    );
    expect_frame_untouched(
        &dp,
        VETH_INGRESS,
        &hp,
        PASS,
        "8 bytes of TCP C3 -> HOST:8080",
    );
    let up = truncate_l4(&Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN).build(), 8);
    expect_frame_untouched(
        &dp,
        UPLINK_INGRESS,
        &up,
        PASS,
        "8 bytes of TCP OUT -> HOST:8080",
    );
    let upu = truncate_l4(&Ipv4Pkt::udp(OUT, 5555, HOST, 5353).payload(&[]).build(), 4);
    expect_frame_untouched(
        &dp,
        UPLINK_INGRESS,
        &upu,
        PASS,
        "4 bytes of UDP OUT -> HOST:5353",
    );
    assert!(
        dp.ct_keys().is_empty(),
        "cut-short packets left tracker entries"
    );
    assert_eq!(dp.port_hits([0; 4], 8080, IPPROTO_TCP), 0);
    assert_eq!(dp.port_hits([0; 4], 5353, IPPROTO_UDP), 0);
}

// ---------------------------------------------------------------------------------------------
// 9. The redirect datapath: md delivers what it decided itself

/// The uplink's MAC in the test namespace.
fn uplink_mac() -> Mac {
    let s = std::fs::read_to_string(format!("/sys/class/net/{UPLINK_DEV}/address"))
        .ok()
        .filter(|s| !s.trim().is_empty());
    let s = match s {
        Some(s) => s,
        // /sys may show another namespace: ask ip.
        None => {
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", UPLINK_DEV])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split("link/ether ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        }
    };
    let b: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// From an uplink into a container, from a container out of the uplink and between two
/// containers: redirected (TC_ACT_REDIRECT), with the MACs the next hop expects, the TTL down
/// by one where the host routes, and the container's receive counted at the sender (its veth's
/// egress program is skipped).
#[test]
fn redirect_datapath_delivers_itself() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.set_config(|c| c.datapath = DATAPATH_REDIRECT);
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);

    // Outside -> published port: translated and redirected into C4, as if the bridge had
    // routed it: C4's MAC, the gateway's, TTL 63.
    let syn = Ipv4Pkt::tcp(OUT, 5555, HOST, 8080, TCP_SYN);
    let want = Ipv4Pkt {
        ttl: 63,
        ..with_tuple(&syn, CtKey::new(OUT, C4, 5555, 80, IPPROTO_TCP)).macs(GW_MAC, mac(C4))
    };
    expect_rewrite(&dp, UPLINK_INGRESS, &syn, REDIRECT, &want, "DNAT into C4");
    assert_eq!(dp.stat(|s| s.redirected), 1, "counted as C4's (ifindex 1)");
    assert_eq!(
        dp.stat(|s| s.ingress_packets),
        1,
        "C4's receive, counted at the uplink"
    );

    // C2 -> outside: straight to the uplink's egress with the FIB's MACs, TTL 63 (the
    // uplink's egress program masquerades it there).
    let out = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN).macs(mac(C2), GW_MAC);
    let want = Ipv4Pkt {
        ttl: 63,
        ..out.clone().macs(uplink_mac(), OUT_MAC)
    };
    expect_rewrite(&dp, VETH_INGRESS, &out, REDIRECT, &want, "C2 -> OUT");
    assert_eq!(dp.stat(|s| s.redirected), 2);
    // A flow masqueraded at the uplink (opened in the stack mode, where the helper expects the
    // answers to pass): its next packets take the same way out, masqueraded at the veth
    // already, and the uplink's egress lets them by on the mark the veth set.
    dp.set_config(|c| c.datapath = DATAPATH_STACK);
    let (flow, port) = established_snat_flow(&mut dp, 40400);
    dp.set_config(|c| c.datapath = DATAPATH_REDIRECT);
    let next = Ipv4Pkt::tcp(C2, 40400, OUT, 80, TCP_ACK | TCP_PSH)
        .seq_ack(1001, 5001)
        .payload(b"more")
        .macs(mac(C2), GW_MAC);
    let want = Ipv4Pkt {
        ttl: 63,
        ..with_tuple(&next, CtKey::new(HOST, OUT, port, 80, IPPROTO_TCP))
            .macs(uplink_mac(), OUT_MAC)
    };
    let packets = dp.ct_must(&flow[0]).packets;
    let before = dp.stat(|s| s.redirected);
    expect_rewrite(
        &dp,
        VETH_INGRESS,
        &next,
        REDIRECT,
        &want,
        "C2's masqueraded flow",
    );
    assert_eq!(dp.stat(|s| s.redirected), before + 1);
    assert_eq!(
        dp.ct_must(&flow[0]).packets,
        packets + 1,
        "accounted at the veth"
    );
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&dp.uplink.to_ne_bytes());
    ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&MARK_TRANSLATED.to_ne_bytes());
    let frame = want.build();
    let (rc, out) = dp.run_ctx(UPLINK_EGRESS, &frame, Some(&ctx));
    assert_verdict(rc, PASS, "marked at the veth: let by");
    assert_frame_eq(&out, &frame, "marked at the veth: untouched");
    assert_eq!(
        dp.ct_must(&flow[0]).packets,
        packets + 1,
        "not accounted twice"
    );

    // C2 -> C3 on the same network, to C3's MAC: into C3, untouched.
    let c2c3 = Ipv4Pkt::tcp(C2, 41000, C3, 80, TCP_SYN).macs(mac(C2), mac(C3));
    let before = dp.stat(|s| s.redirected);
    expect_untouched(&dp, VETH_INGRESS, &c2c3, REDIRECT, "C2 -> C3");
    assert_eq!(dp.stat(|s| s.redirected), before + 1);
    // The flow's next packets (tracked now) take the same way, the answer included.
    let answer = Ipv4Pkt::tcp(C3, 80, C2, 41000, TCP_SYN | TCP_ACK).macs(mac(C3), mac(C2));
    expect_untouched(&dp, VETH_INGRESS, &answer, REDIRECT, "C3 -> C2, tracked");
    assert_eq!(dp.stat(|s| s.redirected), before + 2);

    // Whatever the host must handle takes the stack: to the host itself, broadcast, a TTL
    // that would run out (the stack sends time-exceeded).
    for (p, what) in [
        (
            Ipv4Pkt::udp(C2, 40001, HOST, 9999).macs(mac(C2), GW_MAC),
            "C2 -> the host",
        ),
        (
            Ipv4Pkt::udp(C2, 40002, [255, 255, 255, 255], 67).macs(mac(C2), [0xff; 6]),
            "C2 -> broadcast",
        ),
        (
            Ipv4Pkt {
                ttl: 1,
                ..Ipv4Pkt::udp(C2, 40003, OUT, 53).macs(mac(C2), GW_MAC)
            },
            "C2 -> OUT with TTL 1",
        ),
    ] {
        expect_untouched(&dp, VETH_INGRESS, &p, PASS, what);
    }

    // The same packets in the stack datapath are left to the bridge and the stack.
    dp.set_config(|c| c.datapath = DATAPATH_STACK);
    let again = Ipv4Pkt::tcp(C2, 41001, C3, 80, TCP_SYN).macs(mac(C2), mac(C3));
    let before = dp.stat(|s| s.redirected);
    expect_untouched(&dp, VETH_INGRESS, &again, PASS, "C2 -> C3, stack");
    assert_eq!(
        dp.stat(|s| s.redirected),
        before,
        "nothing redirected in the stack datapath"
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway modes (issue 18): the NETWORKS flags the uplink programs read.

/// A routed network (gateway_mode_ipv4=routed): its flows leave untranslated and tracked, their
/// answers come back in; from outside only a port the container publishes (keyed by its own
/// address and port) and ICMP echo reach it, directly; nothing is masqueraded.
#[test]
fn gateway_mode_routed_at_the_uplink() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.network_flags(1, NET_ROUTED4);
    // Leaving: untouched, both halves tracked at the uplink without a translation.
    let syn = Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN);
    expect_untouched(
        &dp,
        UPLINK_EGRESS,
        &syn,
        PASS,
        "C2 -> OUT:80 leaves as it is",
    );
    let e = dp.ct_must(&key_of(&syn));
    assert_eq!(
        (e.kind, e.dir, e.hook),
        (CT_KIND_ROUTED, CT_DIR_ORIGINAL, CT_HOOK_UPLINK),
        "original half of a routed flow"
    );
    assert_eq!(fmt_key(&e.nat_tuple(IPPROTO_TCP)), fmt_key(&key_of(&syn)));
    let synack = Ipv4Pkt::tcp(OUT, 80, C2, 40000, TCP_SYN | TCP_ACK);
    expect_untouched(&dp, UPLINK_INGRESS, &synack, PASS, "its answer comes in");
    assert_eq!(dp.stat(|s| s.snat), 0, "nothing masqueraded");
    // UDP and ping the same way.
    expect_untouched(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::udp(C2, 5353, OUT, 53),
        PASS,
        "UDP leaves",
    );
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::udp(OUT, 53, C2, 5353),
        PASS,
        "UDP answer",
    );
    expect_untouched(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::echo(C2, OUT, 9, 1),
        PASS,
        "ping leaves",
    );
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::echo_reply(OUT, C2, 9, 1),
        PASS,
        "ping answer",
    );

    // From outside: only what C2 publishes, at its own address and port.
    let unsolicited = dp.uplink_stat(|s| s.drop_unsolicited);
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 5555, C2, 80, TCP_SYN),
        SHOT,
        "OUT -> C2:80 before C2 publishes it",
    );
    dp.publish(C2, 80, IPPROTO_TCP, C2, 80);
    let inbound = Ipv4Pkt::tcp(OUT, 5556, C2, 80, TCP_SYN);
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &inbound,
        PASS,
        "OUT -> C2:80 published",
    );
    let e = dp.ct_must(&key_of(&inbound));
    assert_eq!((e.kind, e.hook), (CT_KIND_DNAT, CT_HOOK_UPLINK));
    assert_eq!(
        fmt_key(&e.nat_tuple(IPPROTO_TCP)),
        fmt_key(&key_of(&inbound))
    );
    assert_eq!(dp.port_hits(C2, 80, IPPROTO_TCP), 1);
    expect_untouched(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::tcp(C2, 80, OUT, 5556, TCP_SYN | TCP_ACK),
        PASS,
        "the published port's answer leaves as it is",
    );
    for (p, what) in [
        (
            Ipv4Pkt::tcp(OUT, 5557, C2, 81, TCP_SYN),
            "OUT -> C2:81 (not published)",
        ),
        (Ipv4Pkt::udp(OUT, 5557, C2, 80), "UDP to a TCP-only port"),
        (
            Ipv4Pkt::tcp(OUT, 5558, C3, 80, TCP_SYN),
            "OUT -> C3:80 (C2's port, not C3's)",
        ),
        (
            Ipv4Pkt::tcp(OUT, 5559, C2, 80, TCP_ACK),
            "a mid-stream segment opens nothing",
        ),
        (
            Ipv4Pkt::echo_reply(OUT, C3, 10, 1),
            "an echo reply nobody asked for",
        ),
    ] {
        expect_untouched(&dp, UPLINK_INGRESS, &p, SHOT, what);
    }
    assert_eq!(dp.uplink_stat(|s| s.drop_unsolicited), unsolicited + 6);
    // ICMP echo reaches a routed container, and its reply leaves.
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::echo(OUT, C3, 11, 1),
        PASS,
        "OUT pings C3",
    );
    expect_untouched(
        &dp,
        UPLINK_EGRESS,
        &Ipv4Pkt::echo_reply(C3, OUT, 11, 1),
        PASS,
        "C3's echo reply",
    );
    // A network in nat mode still masquerades, next to the routed one.
    dp.endpoint([172, 19, 0, 9], 2, LO);
    expect_snat(
        &mut dp,
        &Ipv4Pkt::tcp([172, 19, 0, 9], 40001, OUT, 80, TCP_SYN),
        "net 2 (nat) still masquerades",
    );
}

/// An internal network (`--internal`, gateway mode isolated): nothing of it leaves by an uplink
/// (counted as network isolation), nothing from an uplink reaches it.
#[test]
fn gateway_mode_internal_at_the_uplink() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.network_flags(1, NET_INTERNAL);
    for (i, (p, what)) in [
        (Ipv4Pkt::tcp(C2, 40000, OUT, 80, TCP_SYN), "TCP C2 -> OUT"),
        (Ipv4Pkt::udp(C2, 5353, OUT, 53), "UDP C2 -> OUT"),
        (Ipv4Pkt::echo(C2, OUT, 9, 1), "ping C2 -> OUT"),
        (
            Ipv4Pkt {
                l4: L4::Raw(vec![0; 24]),
                ..Ipv4Pkt::udp(C2, 0, OUT, 0).payload(&[])
            }
            .frag(185),
            "a fragment C2 -> OUT",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        expect_untouched(&dp, UPLINK_EGRESS, &p, SHOT, what);
        assert_eq!(dp.uplink_stat(|s| s.drop_isolation), i as u64 + 1, "{what}");
    }
    expect_untouched(
        &dp,
        UPLINK_INGRESS,
        &Ipv4Pkt::tcp(OUT, 5555, C2, 80, TCP_SYN),
        SHOT,
        "OUT -> C2",
    );
    assert_eq!(dp.uplink_stat(|s| s.drop_unsolicited), 1);
    assert!(
        dp.ct_keys().is_empty(),
        "nothing tracked, nothing masqueraded"
    );
    assert_eq!(dp.stat(|s| s.snat), 0);
    // The other network is not internal.
    dp.endpoint([172, 19, 0, 9], 2, LO);
    expect_snat(
        &mut dp,
        &Ipv4Pkt::tcp([172, 19, 0, 9], 40001, OUT, 80, TCP_SYN),
        "net 2 still masquerades",
    );
}

/// An internal network's container reaches no other network's container, not through a
/// published port at a host address, nor a routed network's port at its own address: both
/// dropped at its veth as network isolation, nothing tracked. Inside the network all is as
/// before.
#[test]
fn gateway_mode_internal_reaches_no_other_network() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 4], 8080, IPPROTO_TCP, C4, 80);
    dp.publish(C2, 80, IPPROTO_TCP, C2, 80);
    dp.network_flags(1, NET_ROUTED4);
    let c6_mac = [0x0e, 0x6d, 0, 0, 0, 2];
    let via_host = Ipv4Pkt::tcp(C6, 42000, HOST, 8080, TCP_SYN).macs(mac(C6), c6_mac);
    let routed = Ipv4Pkt::tcp(C6, 42001, C2, 80, TCP_SYN).macs(mac(C6), c6_mac);
    // Net 2 in nat mode: both open.
    let (rc, _) = dp.run(VETH_INGRESS, &via_host.build());
    assert_verdict(rc, REDIRECT, "C6 -> HOST:8080 from a nat network");
    expect_untouched(&dp, VETH_INGRESS, &routed, PASS, "C6 -> C2:80 (routed)");
    assert_eq!(dp.stat(|s| s.drop_isolation), 0);
    let tracked = dp.ct_keys().len();
    dp.network_flags(2, NET_INTERNAL);
    let via_host = Ipv4Pkt::tcp(C6, 42002, HOST, 8080, TCP_SYN).macs(mac(C6), c6_mac);
    let routed = Ipv4Pkt::tcp(C6, 42003, C2, 80, TCP_SYN).macs(mac(C6), c6_mac);
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &via_host,
        SHOT,
        "internal C6 -> HOST:8080",
    );
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &routed,
        SHOT,
        "internal C6 -> C2:80 (routed)",
    );
    assert_eq!(dp.stat(|s| s.drop_isolation), 2);
    assert_eq!(dp.ct_keys().len(), tracked, "nothing more tracked");
}

/// A routed network's published port is open to containers of other networks too, on the
/// container's own address (Docker's direct routing); its other ports stay isolated, and
/// policy still applies.
#[test]
fn gateway_mode_routed_port_open_to_other_networks() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish(C2, 80, IPPROTO_TCP, C2, 80);
    let to_port = Ipv4Pkt::tcp(C6, 41000, C2, 80, TCP_SYN).macs(mac(C6), [0x0e, 0x6d, 0, 0, 0, 2]);
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &to_port,
        SHOT,
        "net 1 in nat mode: isolated",
    );
    dp.network_flags(1, NET_ROUTED4);
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &to_port,
        PASS,
        "net 1 routed: its published port",
    );
    let e = dp.ct_must(&key_of(&to_port));
    assert_eq!((e.kind, e.hook), (CT_KIND_NONE, CT_HOOK_VETH));
    // The answer passes C2's veth as a tracked flow.
    let answer = Ipv4Pkt::tcp(C2, 80, C6, 41000, TCP_SYN | TCP_ACK).macs(mac(C2), GW_MAC);
    expect_untouched(&dp, VETH_INGRESS, &answer, PASS, "C2's answer to C6");
    let other = Ipv4Pkt::tcp(C6, 41001, C2, 81, TCP_SYN).macs(mac(C6), [0x0e, 0x6d, 0, 0, 0, 2]);
    expect_untouched(
        &dp,
        VETH_INGRESS,
        &other,
        SHOT,
        "an unpublished port stays isolated",
    );
    assert_eq!(dp.stat(|s| s.drop_isolation), 2);
    dp.policy(C6, C2, POLICY_DENY);
    let denied = Ipv4Pkt::tcp(C6, 41002, C2, 80, TCP_SYN).macs(mac(C6), [0x0e, 0x6d, 0, 0, 0, 2]);
    expect_untouched(&dp, VETH_INGRESS, &denied, SHOT, "policy still applies");
    assert_eq!(dp.policy_drops(C6, C2), 1);
}
