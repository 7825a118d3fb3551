//! BPF_PROG_TEST_RUN tests of md's IPv6 packet logic (issue 14), as `datapath_unit.rs` does
//! for IPv4: each test loads md's eBPF object privately in a network namespace of its own
//! (a small dual-stack host: `up0` with 2001:db8:1::1/64, the IPv6 default route via
//! 2001:db8:1::2, forwarding on), fills the maps, runs crafted Ethernet/IPv6 frames through
//! the TC programs and checks verdicts, rewritten bytes and trackers. Expected frames are
//! built from scratch by `md_tests::pkt` with its own checksums over the IPv6 pseudo-header,
//! so equal bytes mean every checksum is right; TCP/UDP/ICMPv6 checksums are also recomputed
//! on what the program left. One test runs the skb as CHECKSUM_COMPLETE (the kernel checks
//! skb->csum after the program): an IPv6 address change has no header checksum to absorb it.

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues,
    },
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, Pod,
};
use md_common::{
    maps as m, Config, CtEntry6, CtKey6, Endpoint, IfStats, Network, PortKey6, PortTarget6,
    CT_KIND_DNAT, CT_KIND_ROUTED, CT_KIND_SNAT, DATAPATH_STACK, HOST_ADDR_GATEWAY, HOST_ADDR_LOCAL,
    NET_INTERNAL, NET_IPV6, NET_ROUTED6,
};
use md_tests::{
    pkt::{
        fold, pseudo_sum6, sum16, Ext, Ip6, Ipv6Pkt, Mac, View6, ICMP6_DEST_UNREACH,
        ICMP6_PACKET_TOO_BIG, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4, NDP_ROUTER_ADVERT,
        NEXTHDR_DEST, NEXTHDR_HOP, TCP_ACK, TCP_SYN,
    },
    require_e2e,
};

const PASS: u32 = u32::MAX;
const SHOT: u32 = 2;
const LO: u32 = 1;
const SKB_IFINDEX_OFF: usize = 40;
const SKB_CTX_LEN: usize = 192;

const VETH_INGRESS: &str = m::PROG_VETH_INGRESS;
const VETH_EGRESS: &str = m::PROG_VETH_EGRESS;
const UPLINK_INGRESS: &str = m::PROG_UPLINK_INGRESS;
const UPLINK_EGRESS: &str = m::PROG_UPLINK_EGRESS;

fn v6(s: &str) -> Ip6 {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

const HOST6: &str = "2001:db8:1::1";
const OUT6: &str = "2001:db8:1::2";
/// A router further out (sends ICMPv6 errors).
const ROUTER6: &str = "2001:db8:9::1";
const GW6: &str = "fd00:6::1";
const GW_MAC: Mac = [0x0e, 0x6d, 0, 0, 0, 0x01];
const C2: &str = "fd00:6::2";
const C3: &str = "fd00:6::3";
/// A container of a routed network (net 3, 2001:db8:77::/64).
const R2: &str = "2001:db8:77::2";
const NAT_MIN: u16 = 61000;

fn mac(ip: &str) -> Mac {
    let o = v6(ip);
    [0x02, 0x42, 0xac, o[13], o[14], o[15]]
}

fn identity(ip: &str) -> u32 {
    100 + u32::from(v6(ip)[15])
}

/// Moves the calling thread into a new network namespace shaped like a small dual-stack md
/// host; returns up0's ifindex.
fn private_netns() -> u32 {
    // SAFETY: unshare(2) on this thread only.
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
    ip(&["link", "set", "lo", "up"]);
    ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "peer0",
    ]);
    ip(&["link", "set", "peer0", "up"]);
    ip(&["link", "set", "up0", "up"]);
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{HOST6}/64"),
        "dev",
        "up0",
        "nodad",
    ]);
    ip(&["-6", "route", "add", "default", "via", OUT6, "dev", "up0"]);
    ip(&[
        "-6",
        "neigh",
        "add",
        OUT6,
        "lladdr",
        "02:00:00:00:0c:02",
        "dev",
        "up0",
    ]);
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("forwarding");
    let c = std::ffi::CString::new("up0").unwrap();
    // SAFETY: a valid NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

struct Dp {
    ebpf: Ebpf,
    uplink: u32,
    /// The uplink veth's peer: stands for the host-side veth of an IPv4-only container.
    v4only: u32,
}

impl Dp {
    /// The object loaded with the four TC programs; a dual-stack network 1 (fd00:6::/64,
    /// gateway fd00:6::1) with containers C2 (veth ifindex 1, the one tests run on) and C3
    /// (veth 7), a routed network 3
    /// (2001:db8:77::/64) with R2, an IPv4-only network 2 whose container is behind `peer0`; the host's
    /// IPv6 address and the gateways in HOST_ADDRS6.
    fn lab() -> Self {
        let uplink = private_netns();
        let ebpf = md_tests::helpers::load_tc_programs(&[
            VETH_INGRESS,
            VETH_EGRESS,
            UPLINK_INGRESS,
            UPLINK_EGRESS,
        ]);
        let c = std::ffi::CString::new("peer0").unwrap();
        // SAFETY: a valid NUL-terminated name.
        let v4only = unsafe { libc::if_nametoindex(c.as_ptr()) };
        let mut dp = Dp {
            ebpf,
            uplink,
            v4only,
        };
        let mut cfg = Config::defaults();
        cfg.datapath = DATAPATH_STACK;
        let mut arr: Array<_, Config> =
            Array::try_from(dp.ebpf.map_mut(m::CONFIG).unwrap()).unwrap();
        arr.set(0, cfg, 0).unwrap();
        for i in [LO, uplink, v4only] {
            let n = aya::util::nr_cpus().unwrap();
            let zero = PerCpuValues::try_from(vec![IfStats::default(); n]).unwrap();
            let mut s: PerCpuHashMap<_, u32, IfStats> =
                PerCpuHashMap::try_from(dp.ebpf.map_mut(m::IF_STATS).unwrap()).unwrap();
            s.insert(i, zero, 0).unwrap();
        }
        dp.network(1, "fd00:6::", GW6, NET_IPV6);
        dp.network(3, "2001:db8:77::", "2001:db8:77::1", NET_IPV6 | NET_ROUTED6);
        dp.network(2, "::", "::", 0);
        dp.endpoint(C2, 1, LO);
        dp.endpoint(C3, 1, 7);
        dp.endpoint(R2, 3, LO);
        dp.owner(LO, C2);
        // An IPv4-only container behind the peer veth.
        let ep4 = Endpoint {
            ifindex: v4only,
            identity: 9,
            net_id: 2,
            ip: [172, 19, 0, 9],
            mac: [0x02, 0x42, 172, 19, 0, 9],
            ..Default::default()
        };
        dp.hash::<u32, Endpoint>(m::VETH_OWNERS)
            .insert(v4only, ep4, 0)
            .unwrap();
        dp.host_addr(HOST6, HOST_ADDR_LOCAL);
        dp.host_addr(GW6, HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY);
        dp
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    fn network(&mut self, id: u32, subnet: &str, gw: &str, flags: u32) {
        let net = Network {
            gateway: [172, 18, 0, 1],
            subnet: [172, 18, 0, 0],
            prefix_len: 16,
            gateway_mac: GW_MAC,
            bridge_ifindex: LO,
            gateway6: v6(gw),
            flags,
            ..Default::default()
        };
        self.hash::<u32, Network>(m::NETWORKS)
            .insert(id, net, 0)
            .unwrap();
        if flags & NET_IPV6 != 0 {
            let mut t: LpmTrie<_, Ip6, u32> =
                LpmTrie::try_from(self.ebpf.map_mut(m::MD_SUBNETS6).unwrap()).unwrap();
            t.insert(&LpmKey::new(64, v6(subnet)), id, 0).unwrap();
        }
    }

    fn endpoint(&mut self, ip: &str, net_id: u32, ifindex: u32) {
        let ep = Endpoint {
            ifindex,
            identity: identity(ip),
            net_id,
            ip: [172, 18, 0, v6(ip)[15]],
            mac: mac(ip),
            ..Default::default()
        };
        self.hash::<Ip6, Endpoint>(m::ENDPOINTS6)
            .insert(v6(ip), ep, 0)
            .unwrap();
    }

    fn owner(&mut self, ifindex: u32, ip: &str) {
        let ep = self
            .hash::<Ip6, Endpoint>(m::ENDPOINTS6)
            .get(&v6(ip), 0)
            .unwrap();
        self.hash::<u32, Endpoint>(m::VETH_OWNERS)
            .insert(ifindex, ep, 0)
            .unwrap();
    }

    fn host_addr(&mut self, ip: &str, flags: u32) {
        self.hash::<Ip6, u32>(m::HOST_ADDRS6)
            .insert(v6(ip), flags, 0)
            .unwrap();
    }

    fn publish(&mut self, host: Ip6, port: u16, proto: u8, to: &str, to_port: u16) {
        let t = PortTarget6 {
            ip: v6(to),
            port: to_port,
            identity: identity(to),
            ..Default::default()
        };
        self.hash::<PortKey6, PortTarget6>(m::PORT_MAP6)
            .insert(PortKey6::new(host, port, proto), t, 0)
            .unwrap();
    }

    fn ct_get(&mut self, key: &CtKey6) -> Option<CtEntry6> {
        m::TRACKERS6
            .iter()
            .find_map(|map| match self.hash::<CtKey6, CtEntry6>(map).get(key, 0) {
                Ok(e) => Some(e),
                Err(MapError::KeyNotFound) => None,
                Err(e) => panic!("reading {map}: {e:?}"),
            })
    }

    fn stat(&mut self, ifindex: u32, f: impl Fn(&IfStats) -> u64) -> u64 {
        let stats: PerCpuHashMap<_, u32, IfStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(m::IF_STATS).unwrap()).unwrap();
        stats.get(&ifindex, 0).unwrap().iter().map(f).sum()
    }

    fn ctx(&self, prog: &str, ifindex: Option<u32>) -> [u8; SKB_CTX_LEN] {
        let idx = ifindex.unwrap_or(if prog == UPLINK_INGRESS || prog == UPLINK_EGRESS {
            self.uplink
        } else {
            LO
        });
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&idx.to_ne_bytes());
        ctx
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(prog, frame, None)
    }

    fn run_on(&self, prog: &str, frame: &[u8], ifindex: Option<u32>) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 512];
        let ctx = self.ctx(prog, ifindex);
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run of {prog}: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// As [`Dp::run`] with the skb CHECKSUM_COMPLETE (BPF_F_TEST_SKB_CHECKSUM_COMPLETE): the
    /// kernel fails the run with EBADMSG when skb->csum no longer matches the packet.
    fn run_csum_complete(&self, prog: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), i32> {
        use std::os::fd::{AsFd, AsRawFd};
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
        let ctx = self.ctx(prog, None);
        let mut out = vec![0u8; frame.len() + 512];
        let mut attr = TestAttr {
            prog_fd: p.fd().unwrap().as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: 1 << 2,
            ..Default::default()
        };
        // SAFETY: a valid BPF_PROG_TEST_RUN attribute over live buffers.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10,
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

#[track_caller]
fn assert_verdict(got: u32, want: u32, what: &str) {
    assert_eq!(
        got, want,
        "{what}: verdict {}, expected {}",
        got as i32, want as i32
    );
}

#[track_caller]
fn assert_frame_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let diffs: Vec<String> = (0..got.len().max(want.len()))
        .filter(|&i| got.get(i) != want.get(i))
        .take(16)
        .map(|i| format!("@{i}: got {:02x?} want {:02x?}", got.get(i), want.get(i)))
        .collect();
    panic!("{what}: frame differs; {}", diffs.join(", "));
}

/// `p` with its addresses and ports (ICMPv6 echo: identifier) replaced.
fn with(p: &Ipv6Pkt, saddr: &str, sport: u16, daddr: &str, dport: u16) -> Ipv6Pkt {
    let mut q = p.clone();
    q.saddr = v6(saddr);
    q.daddr = v6(daddr);
    match &mut q.l4 {
        L4::Tcp {
            sport: s, dport: d, ..
        }
        | L4::Udp {
            sport: s, dport: d, ..
        } => {
            *s = sport;
            *d = dport;
        }
        L4::Icmp { rest, typ, .. } => {
            let id = if *typ == md_tests::pkt::ICMP6_ECHO {
                sport
            } else {
                dport
            };
            rest[..2].copy_from_slice(&id.to_be_bytes());
        }
        _ => {}
    }
    q
}

/// SNAT at uplink egress: returns the NAT port and checks the rewrite byte for byte.
#[track_caller]
fn expect_snat(dp: &mut Dp, p: &Ipv6Pkt, what: &str) -> u16 {
    let (rc, out) = dp.run(UPLINK_EGRESS, &p.build());
    assert_verdict(rc, PASS, what);
    let v = View6::new(&out);
    v.assert_checksum(what);
    assert_eq!(v.saddr(), v6(HOST6), "{what}: masqueraded behind the host");
    let port = if matches!(p.l4, L4::Icmp { .. }) {
        v.icmp_id()
    } else {
        v.sport()
    };
    assert!(port >= NAT_MIN, "{what}: NAT port {port}");
    let (dport, daddr) = match p.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => (dport, OUT6),
        _ => (0, OUT6),
    };
    let want = with(p, HOST6, port, daddr, dport);
    assert_frame_eq(&out, &want.build(), what);
    port
}

#[test]
fn snat6_tcp_udp_icmp_and_reverse() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let syn = Ipv6Pkt::tcp(v6(C2), 40000, v6(OUT6), 80, TCP_SYN).macs(mac(C2), GW_MAC);
    let port = expect_snat(&mut dp, &syn, "TCP SYN");
    let key = CtKey6::new(v6(C2), v6(OUT6), 40000, 80, IPPROTO_TCP);
    let e = dp.ct_get(&key).expect("tracked in CONNTRACK6_NEW");
    assert_eq!(
        (e.kind, e.nat_saddr, e.nat_sport),
        (CT_KIND_SNAT, v6(HOST6), port)
    );
    // The answer comes back to the container, its checksum right.
    let synack = Ipv6Pkt::tcp(v6(OUT6), 80, v6(HOST6), port, TCP_SYN | TCP_ACK);
    let (rc, out) = dp.run(UPLINK_INGRESS, &synack.build());
    assert_verdict(rc, PASS, "SYN-ACK");
    View6::new(&out).assert_checksum("SYN-ACK");
    assert_frame_eq(
        &out,
        &with(&synack, OUT6, 80, C2, 40000).build(),
        "SYN-ACK back to C2",
    );

    let udp = Ipv6Pkt::udp(v6(C2), 5353, v6(OUT6), 53);
    let uport = expect_snat(&mut dp, &udp, "UDP");
    let answer = Ipv6Pkt::udp(v6(OUT6), 53, v6(HOST6), uport);
    let (rc, out) = dp.run(UPLINK_INGRESS, &answer.build());
    assert_verdict(rc, PASS, "UDP answer");
    assert_frame_eq(&out, &with(&answer, OUT6, 53, C2, 5353).build(), "UDP back");

    let echo = Ipv6Pkt::echo(v6(C2), v6(OUT6), 0x4242, 1);
    let id = expect_snat(&mut dp, &echo, "ICMPv6 echo");
    let reply = Ipv6Pkt::echo_reply(v6(OUT6), v6(HOST6), id, 1);
    let (rc, out) = dp.run(UPLINK_INGRESS, &reply.build());
    assert_verdict(rc, PASS, "echo reply");
    View6::new(&out).assert_checksum("echo reply");
    assert_frame_eq(
        &out,
        &Ipv6Pkt::echo_reply(v6(OUT6), v6(C2), 0x4242, 1).build(),
        "echo reply back to C2 with its identifier",
    );
    assert_eq!(dp.stat(LO, |s| s.snat), 3);
}

#[test]
fn snat6_udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // One NAT port, so the translated datagram is known in advance; a payload word chosen so
    // its checksum computes to 0, which over IPv6 must go out as 0xffff (0 is not allowed).
    let mut cfg = Config::defaults();
    cfg.datapath = DATAPATH_STACK;
    cfg.nat_port_min = NAT_MIN;
    cfg.nat_port_max = NAT_MIN;
    Array::<_, Config>::try_from(dp.ebpf.map_mut(m::CONFIG).unwrap())
        .unwrap()
        .set(0, cfg, 0)
        .unwrap();
    let tail = *b"zz";
    let translated =
        Ipv6Pkt::udp(v6(HOST6), NAT_MIN, v6(OUT6), 53).payload(&[0, 0, tail[0], tail[1]]);
    let mut seg = translated.l4_bytes();
    seg[6] = 0;
    seg[7] = 0;
    let s = fold(sum16(
        &seg,
        pseudo_sum6(v6(HOST6), v6(OUT6), IPPROTO_UDP, seg.len()),
    ));
    let w = (!s).to_be_bytes();
    let q = Ipv6Pkt::udp(v6(C2), 40002, v6(OUT6), 53).payload(&[w[0], w[1], tail[0], tail[1]]);
    let port = expect_snat(&mut dp, &q, "UDP whose translated checksum is 0");
    assert_eq!(port, NAT_MIN);
    // The same datagram again (now an established flow): its checksum field, as sent.
    let (rc, out) = dp.run(UPLINK_EGRESS, &q.build());
    assert_verdict(rc, PASS, "the datagram again");
    assert_eq!(
        View6::new(&out).l4_csum().1,
        0xffff,
        "a computed 0 must be sent as 0xffff"
    );
}

#[test]
fn snat6_through_extension_headers_and_fragments() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // Hop-by-hop and destination options before TCP: the L4 header is found behind them.
    let syn = Ipv6Pkt::tcp(v6(C2), 41000, v6(OUT6), 443, TCP_SYN)
        .ext(Ext::Options(NEXTHDR_HOP, vec![5, 2, 0, 0]))
        .ext(Ext::Options(NEXTHDR_DEST, vec![1, 4, 0, 0, 0, 0]));
    expect_snat(&mut dp, &syn, "TCP behind HOP and DEST");
    // A datagram in two fragments: the first is translated (its checksum covers the whole
    // datagram), the second follows its addresses.
    let first = Ipv6Pkt::udp(v6(C2), 6000, v6(OUT6), 7000).ext(Ext::Fragment {
        offset: 0,
        more: true,
        id: 0xabcd,
    });
    let (rc, out) = dp.run(UPLINK_EGRESS, &first.build());
    assert_verdict(rc, PASS, "first fragment");
    let v = View6::new(&out);
    assert_eq!(v.saddr(), v6(HOST6));
    let nport = v.sport();
    assert!(nport >= NAT_MIN);
    // The checksum of a whole datagram the fragment belongs to: as built, with the new tuple.
    assert_frame_eq(
        &out,
        &with(&first, HOST6, nport, OUT6, 7000).build(),
        "first fragment translated",
    );
    let mut later = Ipv6Pkt::udp(v6(C2), 0, v6(OUT6), 0).ext(Ext::Fragment {
        offset: 3,
        more: false,
        id: 0xabcd,
    });
    later.l4 = L4::RawProto(IPPROTO_UDP, b"rest of the datagram....".to_vec());
    later.payload.clear();
    let (rc, out) = dp.run(UPLINK_EGRESS, &later.build());
    assert_verdict(rc, PASS, "later fragment");
    let mut want = later.clone();
    want.saddr = v6(HOST6);
    assert_frame_eq(&out, &want.build(), "later fragment follows");
    // A later fragment of a datagram md never saw is not md's to translate: dropped rather
    // than leaked with the container's address.
    let mut stray = later.clone();
    stray.ext = vec![Ext::Fragment {
        offset: 3,
        more: false,
        id: 0x9999,
    }];
    let (rc, _) = dp.run(UPLINK_EGRESS, &stray.build());
    assert_verdict(rc, SHOT, "stray later fragment");
}

#[test]
fn dnat6_published_port_and_routed_network() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 16], 8080, IPPROTO_TCP, C3, 80);
    let syn = Ipv6Pkt::tcp(v6(OUT6), 50000, v6(HOST6), 8080, TCP_SYN);
    let (rc, out) = dp.run(UPLINK_INGRESS, &syn.build());
    assert_verdict(rc, PASS, "SYN to [::]:8080");
    View6::new(&out).assert_checksum("DNAT");
    assert_frame_eq(
        &out,
        &with(&syn, OUT6, 50000, C3, 80).build(),
        "DNAT to C3:80",
    );
    let e = dp
        .ct_get(&CtKey6::new(v6(OUT6), v6(HOST6), 50000, 8080, IPPROTO_TCP))
        .unwrap();
    assert_eq!(e.kind, CT_KIND_DNAT);
    // C3's answer leaves from the host's address and port.
    let synack = Ipv6Pkt::tcp(v6(C3), 80, v6(OUT6), 50000, TCP_SYN | TCP_ACK);
    let (rc, out) = dp.run(UPLINK_EGRESS, &synack.build());
    assert_verdict(rc, PASS, "SYN-ACK out");
    assert_frame_eq(
        &out,
        &with(&synack, HOST6, 8080, OUT6, 50000).build(),
        "reverse DNAT",
    );
    // Unpublished, or straight to a container of a NAT network: unsolicited.
    let (rc, _) = dp.run(
        UPLINK_INGRESS,
        &Ipv6Pkt::tcp(v6(OUT6), 1, v6(HOST6), 9999, TCP_SYN).build(),
    );
    assert_verdict(rc, PASS, "unpublished port: the host's own business");
    let (rc, _) = dp.run(
        UPLINK_INGRESS,
        &Ipv6Pkt::tcp(v6(OUT6), 1, v6(C3), 80, TCP_SYN).build(),
    );
    assert_verdict(rc, SHOT, "straight to a NAT network's container");
    // A routed network: the published container port is reached directly and untranslated,
    // other ports are not; the container's flows leave untranslated.
    dp.publish(v6(R2), 80, IPPROTO_TCP, R2, 80);
    let syn = Ipv6Pkt::tcp(v6(OUT6), 50001, v6(R2), 80, TCP_SYN);
    let frame = syn.build();
    let (rc, out) = dp.run(UPLINK_INGRESS, &frame);
    assert_verdict(rc, PASS, "routed: published port");
    assert_frame_eq(&out, &frame, "routed: untouched");
    let (rc, _) = dp.run(
        UPLINK_INGRESS,
        &Ipv6Pkt::tcp(v6(OUT6), 50002, v6(R2), 81, TCP_SYN).build(),
    );
    assert_verdict(rc, SHOT, "routed: unpublished port");
    let out_syn = Ipv6Pkt::tcp(v6(R2), 42000, v6(OUT6), 443, TCP_SYN).build();
    let (rc, out) = dp.run(UPLINK_EGRESS, &out_syn);
    assert_verdict(rc, PASS, "routed: outbound");
    assert_frame_eq(&out, &out_syn, "routed: no NAT66");
    let back = Ipv6Pkt::tcp(v6(OUT6), 443, v6(R2), 42000, TCP_SYN | TCP_ACK).build();
    let (rc, out) = dp.run(UPLINK_INGRESS, &back);
    assert_verdict(rc, PASS, "routed: the answer comes in");
    assert_frame_eq(&out, &back, "routed: answer untouched");
}

#[test]
fn icmp6_error_for_snat_flow_translated_back() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let udp = Ipv6Pkt::udp(v6(C2), 5000, v6(OUT6), 9999);
    let port = expect_snat(&mut dp, &udp, "UDP out");
    // What left, quoted by the outside's port unreachable and by a router's packet too big.
    let sent = with(&udp, HOST6, port, OUT6, 9999).ip_bytes();
    for (from, typ, code) in [
        (OUT6, ICMP6_DEST_UNREACH, 4),
        (ROUTER6, ICMP6_PACKET_TOO_BIG, 0),
    ] {
        let err = Ipv6Pkt::icmp_error(v6(from), v6(HOST6), typ, code, &sent);
        let (rc, out) = dp.run(UPLINK_INGRESS, &err.build());
        assert_verdict(rc, PASS, "ICMPv6 error in");
        let v = View6::new(&out);
        assert_eq!(v.daddr(), v6(C2), "to the container");
        assert_eq!(v.saddr(), v6(from), "from whoever sent it");
        v.assert_checksum("ICMPv6 error (pseudo-header and the rewritten quote)");
        // The quote is what the container sent (its L4 checksum left as it was).
        let quote = &v.l4()[8..];
        assert_eq!(&quote[8..24], &v6(C2), "quoted source");
        assert_eq!(
            u16::from_be_bytes([quote[40], quote[41]]),
            5000,
            "quoted port"
        );
    }
    // An error about no flow of md's: not translated, and nothing leaks in.
    let other = Ipv6Pkt::udp(v6(HOST6), 1234, v6(OUT6), 9).ip_bytes();
    let err = Ipv6Pkt::icmp_error(v6(OUT6), v6(HOST6), ICMP6_DEST_UNREACH, 4, &other).build();
    let (rc, out) = dp.run(UPLINK_INGRESS, &err);
    assert_verdict(rc, PASS, "an error for a host flow");
    assert_frame_eq(&out, &err, "untouched");
}

#[test]
fn icmp6_error_from_container_about_dnat_flow_leaves_translated() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    dp.publish([0; 16], 5353, IPPROTO_UDP, C3, 53);
    let q = Ipv6Pkt::udp(v6(OUT6), 50000, v6(HOST6), 5353);
    let (rc, _) = dp.run(UPLINK_INGRESS, &q.build());
    assert_verdict(rc, PASS, "query to [::]:5353");
    // C3 has nothing on 53: its port unreachable quotes what it received.
    let got = with(&q, OUT6, 50000, C3, 53).ip_bytes();
    let err = Ipv6Pkt::icmp_error(v6(C3), v6(OUT6), ICMP6_DEST_UNREACH, 4, &got);
    let (rc, out) = dp.run(UPLINK_EGRESS, &err.build());
    assert_verdict(rc, PASS, "port unreachable out");
    let v = View6::new(&out);
    assert_eq!(
        v.saddr(),
        v6(HOST6),
        "from the host's address, not the container's"
    );
    assert_eq!(v.daddr(), v6(OUT6));
    v.assert_checksum("ICMPv6 error out");
    let quote = &v.l4()[8..];
    assert_eq!(
        &quote[24..40],
        &v6(HOST6),
        "quoted destination: the published address"
    );
    assert_eq!(u16::from_be_bytes([quote[42], quote[43]]), 5353, "and port");
}

/// Issue 18's gateway modes over IPv6: a routed flow leaving is tracked as CT_KIND_ROUTED (as
/// IPv4's), other networks' containers reach a routed network's published port directly, and an
/// internal network neither leaves nor reaches another network through a published port.
#[test]
fn gateway_modes6_routed_kind_and_internal() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let out_syn = Ipv6Pkt::tcp(v6(R2), 42010, v6(OUT6), 443, TCP_SYN).build();
    let (rc, _) = dp.run(UPLINK_EGRESS, &out_syn);
    assert_verdict(rc, PASS, "routed: outbound");
    let e = dp
        .ct_get(&CtKey6::new(v6(R2), v6(OUT6), 42010, 443, IPPROTO_TCP))
        .expect("tracked");
    assert_eq!(e.kind, CT_KIND_ROUTED, "a routed flow's kind");
    // C2 (net 1, nat) reaches R2's published port on R2's own address; not an unpublished one.
    dp.publish(v6(R2), 80, IPPROTO_TCP, R2, 80);
    let to_port = |sport| Ipv6Pkt::tcp(v6(C2), sport, v6(R2), 80, TCP_SYN).macs(mac(C2), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &to_port(40010).build());
    assert_verdict(
        rc,
        PASS,
        "another network to a routed network's published port",
    );
    let p = Ipv6Pkt::tcp(v6(C2), 40011, v6(R2), 81, TCP_SYN).macs(mac(C2), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "unpublished port of a routed network");
    // Net 1 internal: nothing leaves by the uplink, no other network through any port.
    dp.network(1, "fd00:6::", GW6, NET_IPV6 | NET_INTERNAL);
    dp.publish([0; 16], 8080, IPPROTO_TCP, R2, 80);
    let out = Ipv6Pkt::tcp(v6(C2), 40012, v6(OUT6), 443, TCP_SYN).build();
    let (rc, _) = dp.run(UPLINK_EGRESS, &out);
    assert_verdict(rc, SHOT, "internal: leaving by an uplink");
    let (rc, _) = dp.run(VETH_INGRESS, &to_port(40013).build());
    assert_verdict(rc, SHOT, "internal: a routed network's port");
    let p = Ipv6Pkt::tcp(v6(C2), 40014, v6(HOST6), 8080, TCP_SYN).macs(mac(C2), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(
        rc,
        SHOT,
        "internal: a published port of another network's container",
    );
    assert!(dp.stat(LO, |s| s.drop_isolation) >= 2);
}

#[test]
fn veth6_isolation_and_policy() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    // C2 (net 1) to R2 (net 3): another network.
    let p = Ipv6Pkt::tcp(v6(C2), 40000, v6(R2), 80, TCP_SYN).macs(mac(C2), GW_MAC);
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "across networks");
    assert_eq!(dp.stat(LO, |s| s.drop_isolation), 1);
    // C2 to C3 on its network: allowed, then denied by a rule between their identities.
    let p = Ipv6Pkt::tcp(v6(C2), 40001, v6(C3), 80, TCP_SYN).macs(mac(C2), mac(C3));
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, PASS, "same network");
    let key = md_common::PolicyKey {
        src_identity: identity(C2),
        dst_identity: identity(C3),
    };
    let rule = md_common::PolicyRule {
        verdict: md_common::POLICY_DENY,
        ..Default::default()
    };
    dp.hash::<md_common::PolicyKey, md_common::PolicyRule>(m::POLICY)
        .insert(key, rule, 0)
        .unwrap();
    let p = Ipv6Pkt::tcp(v6(C2), 40002, v6(C3), 80, TCP_SYN).macs(mac(C2), mac(C3));
    let (rc, _) = dp.run(VETH_INGRESS, &p.build());
    assert_verdict(rc, SHOT, "denied by policy");
    assert_eq!(dp.stat(LO, |s| s.drop_policy), 1);
}

#[test]
fn ndp6_passes_and_spoofing_is_dropped() {
    if !require_e2e() {
        return;
    }
    let mut dp = Dp::lab();
    let all_nodes = v6("ff02::1");
    let ll = |ip: &str| {
        let m = mac(ip);
        let mut a = v6("fe80::");
        a[8..].copy_from_slice(&[m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
        a
    };
    // C2's own advertisements (global and link-local) pass, from its MAC.
    for (src, target) in [(v6(C2), v6(C2)), (ll(C2), ll(C2)), (ll(C2), v6(C2))] {
        let na = Ipv6Pkt::neigh_advert(src, all_nodes, target, mac(C2))
            .macs(mac(C2), [0x33, 0x33, 0, 0, 0, 1]);
        let (rc, _) = dp.run(VETH_INGRESS, &na.build());
        assert_verdict(rc, PASS, "C2 advertising itself");
    }
    let spoof0 = dp.stat(LO, |s| s.drop_spoof);
    let cases = [
        (
            Ipv6Pkt::neigh_advert(v6(C2), all_nodes, v6(C3), mac(C2)),
            "NA for C3's address",
        ),
        (
            Ipv6Pkt::neigh_advert(v6(C2), all_nodes, v6(GW6), mac(C2)),
            "NA for the gateway",
        ),
        (
            Ipv6Pkt::neigh_advert(ll(C3), all_nodes, ll(C3), mac(C2)),
            "NA from C3's link-local",
        ),
        (
            Ipv6Pkt::icmp(ll(C2), all_nodes, NDP_ROUTER_ADVERT, 0, [64, 0, 0x07, 0x08]),
            "router advertisement",
        ),
        (
            Ipv6Pkt::udp(ll(C2), 1, v6(C3), 2),
            "UDP from a link-local address",
        ),
        (
            Ipv6Pkt::udp(v6(C3), 1, v6(OUT6), 2),
            "another container's address",
        ),
    ];
    for (i, (p, what)) in cases.iter().enumerate() {
        let (rc, _) = dp.run(VETH_INGRESS, &p.clone().macs(mac(C2), GW_MAC).build());
        assert_verdict(rc, SHOT, what);
        assert_eq!(
            dp.stat(LO, |s| s.drop_spoof),
            spoof0 + i as u64 + 1,
            "{what}"
        );
    }
    // NDP reaches a container whatever policy says; a container of an IPv4-only network
    // sends no IPv6 at all.
    let ns = Ipv6Pkt::icmp(v6(C3), v6("ff02::1:ff00:2"), 135, 0, [0; 4]).payload(&v6(C2));
    let (rc, _) = dp.run(VETH_EGRESS, &ns.build());
    assert_verdict(rc, PASS, "NS to C2");
    let v4only =
        Ipv6Pkt::udp(v6("fd00:9::9"), 1, v6(OUT6), 2).macs([0x02, 0x42, 172, 19, 0, 9], GW_MAC);
    let (rc, _) = dp.run_on(VETH_INGRESS, &v4only.build(), Some(dp.v4only));
    assert_verdict(rc, SHOT, "IPv6 from an IPv4-only network");
    let veth = dp.v4only;
    assert_eq!(dp.stat(veth, |s| s.drop_unsupported), 1);
    let _ = IPPROTO_ICMPV6;
}

#[test]
fn checksum_complete6_skb_csum_maintained() {
    if !require_e2e() {
        return;
    }
    let dp = Dp::lab();
    for p in [
        Ipv6Pkt::tcp(v6(C2), 43000, v6(OUT6), 80, TCP_SYN),
        Ipv6Pkt::udp(v6(C2), 43001, v6(OUT6), 53),
        Ipv6Pkt::echo(v6(C2), v6(OUT6), 77, 1),
    ] {
        match dp.run_csum_complete(UPLINK_EGRESS, &p.build()) {
            Ok((rc, out)) => {
                assert_verdict(rc, PASS, "SNAT (CHECKSUM_COMPLETE)");
                View6::new(&out).assert_checksum("SNAT (CHECKSUM_COMPLETE)");
                assert_eq!(View6::new(&out).saddr(), v6(HOST6));
            }
            Err(e) => panic!("skb->csum out of step after an IPv6 rewrite (errno {e})"),
        }
    }
}
