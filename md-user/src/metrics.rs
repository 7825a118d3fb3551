//! Prometheus metrics: md's counters in the Prometheus text exposition (prometheus-client's
//! `prometheus_text` encoder, through a `Collector` that encodes one snapshot).
//!
//! A snapshot reads the saved state without md's lock (it is replaced by rename, so a read
//! always sees a whole file) and the pinned maps with plain lookups: a scrape never waits for a
//! command holding the lock, and the datapath never waits for a scrape. Nothing is written.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
};

use anyhow::Result;
use aya::{
    maps::{MapData, MapInfo, PerCpuHashMap},
    programs::ProgramInfo,
    Pod,
};
use md_common::{
    drop_reason_name, maps as m, CtEntry, CtKey, Endpoint, IfStats, Ip4, Network, PolicyKey,
    PolicyRule, PortKey, PortTarget, SockRevKey, SockRevValue, CT_DIR_ORIGINAL, CT_KIND_SNAT,
    DROP_FORWARD, DROP_ISOLATION, DROP_MALFORMED, DROP_NAT_PORTS, DROP_NO_SOURCE, DROP_POLICY,
    DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        MetricType::{self, Counter, Gauge},
    },
    registry::Registry,
};

use crate::{
    commands::stats::add,
    datapath::{monotonic_ns, Datapath},
    endpoint::port_hits,
    portmap::PortMapping,
    proc,
    state::StateDir,
};

/// `Content-Type` of what [`encode`] returns.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The hash maps whose fill level is exported (CONFIG is one slot, EVENTS a ring buffer).
const FILLED_MAPS: &[&str] = &[
    m::ENDPOINTS,
    m::VETH_OWNERS,
    m::NETWORKS,
    m::HOST_ADDRS,
    m::PORT_MAP,
    m::CONNTRACK,
    m::CONNTRACK_NEW,
    m::FRAGS,
    m::MD_SUBNETS,
    m::POLICY,
    m::IF_STATS,
    m::SOCK_REV,
];

/// Every program md loads, for run time and run counts.
const PROGRAMS: &[&str] = &[
    m::PROG_VETH_INGRESS,
    m::PROG_VETH_EGRESS,
    m::PROG_UPLINK_INGRESS,
    m::PROG_UPLINK_EGRESS,
    m::PROG_SOCK_CONNECT4,
    m::PROG_SOCK_SENDMSG4,
    m::PROG_SOCK_RECVMSG4,
    m::PROG_SOCK_GETPEERNAME4,
];

/// One container interface: a container on one network.
#[derive(Debug, Clone)]
pub struct Interface {
    pub container: String,
    pub network: String,
    pub stats: IfStats,
}

#[derive(Debug, Clone)]
pub struct PortHits {
    pub container: String,
    pub port: PortMapping,
    pub hits: u64,
}

#[derive(Debug, Clone)]
pub struct RuleDrops {
    pub from: String,
    pub to: String,
    pub drops: u64,
}

#[derive(Debug, Clone)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone)]
pub struct ProgramStats {
    pub program: &'static str,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// What one pass over CONNTRACK found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// Every entry, expired ones included (the map's fill).
    pub entries: u64,
    /// Live entries (two per flow) by IP protocol.
    pub live: BTreeMap<u8, u64>,
    /// Distinct SNAT source ports (ICMP: identifiers) in live flows, by protocol.
    pub nat_ports: BTreeMap<u8, u64>,
    /// By protocol, the most SNAT ports taken toward one destination address and port: a port
    /// is unique per destination, so this is what runs out first.
    pub nat_ports_busiest: BTreeMap<u8, u64>,
}

impl Tracker {
    /// Tallies tracker entries; `now` is CLOCK_MONOTONIC (the datapath's clock).
    pub fn tally(entries: impl IntoIterator<Item = (CtKey, CtEntry)>, now: u64) -> Tracker {
        let mut t = Tracker::default();
        let mut ports: HashSet<(u8, u16)> = HashSet::new();
        let mut per_dest: HashMap<(u8, Ip4, u16), u64> = HashMap::new();
        for (k, v) in entries {
            t.entries += 1;
            if v.expires_ns <= now {
                continue;
            }
            *t.live.entry(k.proto).or_default() += 1;
            // The original half of a masqueraded flow carries the port it was given.
            if v.kind == CT_KIND_SNAT && v.dir == CT_DIR_ORIGINAL {
                ports.insert((k.proto, v.nat_sport));
                *per_dest
                    .entry((k.proto, v.nat_daddr, v.nat_dport))
                    .or_default() += 1;
            }
        }
        for (proto, _) in ports {
            *t.nat_ports.entry(proto).or_default() += 1;
        }
        for ((proto, _, _), n) in per_dest {
            let busiest = t.nat_ports_busiest.entry(proto).or_default();
            *busiest = (*busiest).max(n);
        }
        t
    }
}

/// Everything one scrape exports.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub loaded: bool,
    pub interfaces: Vec<Interface>,
    /// The uplink's name and counters.
    pub uplink: Option<(String, IfStats)>,
    pub ports: Vec<PortHits>,
    pub tracker: Tracker,
    pub tracker_capacity: u64,
    /// Size of the SNAT port range.
    pub nat_port_capacity: u64,
    pub policy: Vec<RuleDrops>,
    pub maps: Vec<MapFill>,
    /// Whether the kernel counts program run time (kernel.bpf_stats_enabled, or this process
    /// turned it on with BPF_ENABLE_STATS).
    pub bpf_stats: bool,
    /// Run counts and time, only while `bpf_stats`.
    pub programs: Vec<ProgramStats>,
}

/// The drop counters of an interface by reason code.
pub fn drops(s: &IfStats) -> [(u8, u64); 9] {
    [
        (DROP_POLICY, s.drop_policy),
        (DROP_SPOOF, s.drop_spoof),
        (DROP_ISOLATION, s.drop_isolation),
        (DROP_UNSUPPORTED, s.drop_unsupported),
        (DROP_NAT_PORTS, s.drop_nat_ports),
        (DROP_MALFORMED, s.drop_malformed),
        (DROP_UNSOLICITED, s.drop_unsolicited),
        (DROP_FORWARD, s.drop_forward),
        (DROP_NO_SOURCE, s.drop_no_source),
    ]
}

pub fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        md_common::IPPROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

fn count_keys<K: Pod, V: Pod>(dp: &Datapath, name: &str) -> Result<u64> {
    Ok(dp.hash::<K, V>(name)?.keys().filter(Result::is_ok).count() as u64)
}

/// Whether kernel.bpf_stats_enabled is on (read only: md never writes it).
pub fn bpf_stats_sysctl() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// Reads a snapshot. `stats_held`: this process holds a BPF_ENABLE_STATS descriptor.
pub fn collect(state_dir: &StateDir, dp: &Datapath, stats_held: bool) -> Result<Snapshot> {
    let state = state_dir.peek()?;
    let mut snap = Snapshot {
        loaded: dp.is_loaded(),
        tracker_capacity: m::CONNTRACK_MAX as u64,
        ..Snapshot::default()
    };
    if !snap.loaded {
        return Ok(snap);
    }
    // A container whose supervisor died is torn down by the next command that takes the
    // lock; until then it is not exported.
    let containers: Vec<_> = state
        .containers
        .values()
        .filter(|c| proc::alive(c.supervisor_pid, c.supervisor_start))
        .collect();

    let if_stats: PerCpuHashMap<MapData, u32, IfStats> = dp.if_stats()?;
    let sum = |ifindex: u32| {
        let mut t = IfStats::default();
        if let Ok(per_cpu) = if_stats.get(&ifindex, 0) {
            per_cpu.iter().for_each(|s| add(&mut t, s));
        }
        t
    };
    for c in &containers {
        for i in &c.interfaces {
            snap.interfaces.push(Interface {
                container: c.name.clone(),
                network: i.network.clone(),
                stats: sum(i.ifindex),
            });
        }
        for p in &c.ports {
            let hits = port_hits(dp, &state, c, p);
            snap.ports.push(PortHits {
                container: c.name.clone(),
                port: *p,
                hits,
            });
        }
    }
    if let Some(d) = &state.datapath {
        snap.uplink = Some((d.uplink.clone(), sum(d.uplink_ifindex)));
    }

    let trackers = dp.trackers()?;
    snap.tracker = Tracker::tally(
        trackers.iter().flat_map(|t| t.iter().flatten()),
        monotonic_ns(),
    );
    let cfg = dp.config()?;
    snap.nat_port_capacity = (cfg.nat_port_max as u64).saturating_sub(cfg.nat_port_min as u64) + 1;

    let policy = dp.policy()?;
    let identities = state.identities()?;
    for r in &state.rules()? {
        let (Some(&src), Some(&dst)) = (identities.get(&r.from), identities.get(&r.to)) else {
            continue;
        };
        let key = PolicyKey {
            src_identity: src,
            dst_identity: dst,
        };
        snap.policy.push(RuleDrops {
            from: r.from.clone(),
            to: r.to.clone(),
            drops: policy.get(&key, 0).map(|v| v.drops).unwrap_or(0),
        });
    }

    for &map in FILLED_MAPS {
        let entries = match map {
            m::CONNTRACK | m::CONNTRACK_NEW | m::FRAGS | m::MD_SUBNETS => dp.map_fill(map)?.0,
            m::ENDPOINTS => count_keys::<Ip4, Endpoint>(dp, map)?,
            m::VETH_OWNERS => count_keys::<u32, Endpoint>(dp, map)?,
            m::NETWORKS => count_keys::<u32, Network>(dp, map)?,
            m::HOST_ADDRS => count_keys::<Ip4, u32>(dp, map)?,
            m::PORT_MAP => count_keys::<PortKey, PortTarget>(dp, map)?,
            m::POLICY => count_keys::<PolicyKey, PolicyRule>(dp, map)?,
            m::SOCK_REV => count_keys::<SockRevKey, SockRevValue>(dp, map)?,
            m::IF_STATS => if_stats.keys().filter(Result::is_ok).count() as u64,
            _ => continue,
        };
        let capacity = MapInfo::from_pin(dp.map_pin(map))?.max_entries() as u64;
        snap.maps.push(MapFill {
            map,
            entries,
            capacity,
        });
    }

    snap.bpf_stats = stats_held || bpf_stats_sysctl();
    if snap.bpf_stats {
        for &program in PROGRAMS {
            if let Ok(info) = ProgramInfo::from_pin(dp.prog_pin(program)) {
                snap.programs.push(ProgramStats {
                    program,
                    runs: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                });
            }
        }
    }
    Ok(snap)
}

/// The snapshot in the Prometheus text format.
pub fn encode(snap: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: skipped when it has no series.
fn family<N: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Vec<(Labels, N)>,
) -> fmt::Result
where
    ConstCounter<N>: EncodeMetric,
    ConstGauge<N>: EncodeMetric,
{
    if series.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in &series {
        let e = metric.encode_family(labels)?;
        match kind {
            Counter => ConstCounter::new(*v).encode(e)?,
            _ => ConstGauge::new(*v).encode(e)?,
        }
    }
    Ok(())
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let enc = &mut enc;
        family(
            enc,
            "md_datapath_loaded",
            "Whether md's eBPF datapath is loaded (1) or not (0).",
            Gauge,
            vec![(vec![], self.loaded as u64)],
        )?;

        // Per container interface; per network is `sum by (network)` of these: a sum computed
        // here would drop when a container leaves, which Prometheus takes for a counter reset.
        let per_if = |f: &dyn Fn(&IfStats) -> Vec<(Labels, u64)>| -> Vec<(Labels, u64)> {
            self.interfaces
                .iter()
                .flat_map(|i| {
                    f(&i.stats).into_iter().map(|(mut extra, v)| {
                        let mut l = labels([("container", &i.container), ("network", &i.network)]);
                        l.append(&mut extra);
                        (l, v)
                    })
                })
                .collect()
        };
        let directed = |eg: u64, ing: u64| {
            vec![
                (labels([("direction", "egress")]), eg),
                (labels([("direction", "ingress")]), ing),
            ]
        };
        let by_reason = |s: &IfStats| -> Vec<(Labels, u64)> {
            drops(s)
                .iter()
                .map(|(r, n)| (labels([("reason", drop_reason_name(*r))]), *n))
                .collect()
        };
        family(
            enc,
            "md_container_packets",
            "Packets through a container's interface; egress leaves the container, ingress enters it.",
            Counter,
            per_if(&|s| directed(s.egress_packets, s.ingress_packets)),
        )?;
        family(
            enc,
            "md_container_bytes",
            "Bytes (IP layer) through a container's interface.",
            Counter,
            per_if(&|s| directed(s.egress_bytes, s.ingress_bytes)),
        )?;
        family(
            enc,
            "md_container_snat",
            "Flows of the container masqueraded behind the uplink address (one per new flow).",
            Counter,
            per_if(&|s| vec![(vec![], s.snat)]),
        )?;
        family(
            enc,
            "md_container_dnat",
            "Flows translated to the container through its published ports (one per new flow).",
            Counter,
            per_if(&|s| vec![(vec![], s.dnat)]),
        )?;
        family(
            enc,
            "md_container_drops",
            "Packets from or to the container the datapath dropped, by reason.",
            Counter,
            per_if(&by_reason),
        )?;

        let uplink = |f: &dyn Fn(&IfStats) -> Vec<(Labels, u64)>| -> Vec<(Labels, u64)> {
            self.uplink
                .iter()
                .flat_map(|(name, s)| {
                    f(s).into_iter().map(move |(mut extra, v)| {
                        let mut l = labels([("interface", name)]);
                        l.append(&mut extra);
                        (l, v)
                    })
                })
                .collect()
        };
        family(
            enc,
            "md_uplink_packets",
            "Packets through the uplink; egress leaves the host, ingress arrives.",
            Counter,
            uplink(&|s| directed(s.egress_packets, s.ingress_packets)),
        )?;
        family(
            enc,
            "md_uplink_bytes",
            "Bytes (IP layer) through the uplink.",
            Counter,
            uplink(&|s| directed(s.egress_bytes, s.ingress_bytes)),
        )?;
        family(
            enc,
            "md_uplink_drops",
            "Packets the datapath dropped at the uplink, by reason.",
            Counter,
            uplink(&by_reason),
        )?;

        family(
            enc,
            "md_port_hits",
            "New connections (UDP: flows) through a published port.",
            Counter,
            self.ports
                .iter()
                .map(|p| {
                    let host_ip = p.port.host_ip_text();
                    let l = labels([
                        ("container", &p.container),
                        ("protocol", &p.port.proto.to_string()),
                        ("host_ip", &host_ip),
                        ("host_port", &p.port.host_port.to_string()),
                        ("container_port", &p.port.container_port.to_string()),
                    ]);
                    (l, p.hits)
                })
                .collect(),
        )?;

        let by_proto = |m: &BTreeMap<u8, u64>| -> Vec<(Labels, u64)> {
            m.iter()
                .map(|(p, n)| (labels([("protocol", &proto_name(*p))]), *n))
                .collect()
        };
        if self.loaded {
            family(
                enc,
                "md_conntrack_entries",
                "Live connection tracker entries (two per flow), by protocol.",
                Gauge,
                by_proto(&self.tracker.live),
            )?;
            family(
                enc,
                "md_conntrack_capacity",
                "Entries the connection tracker holds at most.",
                Gauge,
                vec![(vec![], self.tracker_capacity)],
            )?;
            family(
                enc,
                "md_nat_ports_used",
                "Distinct SNAT source ports (ICMP: identifiers) held by live flows, by protocol.",
                Gauge,
                by_proto(&self.tracker.nat_ports),
            )?;
            family(
                enc,
                "md_nat_ports_used_busiest_destination",
                "SNAT ports held toward the busiest destination address and port, by protocol: \
                 ports are unique per destination, so this is what runs out first.",
                Gauge,
                by_proto(&self.tracker.nat_ports_busiest),
            )?;
            family(
                enc,
                "md_nat_ports_capacity",
                "Size of the SNAT port range.",
                Gauge,
                vec![(vec![], self.nat_port_capacity)],
            )?;
        }

        family(
            enc,
            "md_policy_drops",
            "Packets dropped by the policy rule FROM -> TO (container names).",
            Counter,
            self.policy
                .iter()
                .map(|r| (labels([("from", &r.from), ("to", &r.to)]), r.drops))
                .collect(),
        )?;

        family(
            enc,
            "md_map_entries",
            "Entries in one of md's BPF maps.",
            Gauge,
            self.maps
                .iter()
                .map(|f| (labels([("map", f.map)]), f.entries))
                .collect(),
        )?;
        family(
            enc,
            "md_map_capacity",
            "Entries one of md's BPF maps holds at most.",
            Gauge,
            self.maps
                .iter()
                .map(|f| (labels([("map", f.map)]), f.capacity))
                .collect(),
        )?;

        if self.loaded {
            family(
                enc,
                "md_bpf_stats_enabled",
                "Whether the kernel counts BPF program run time (program run times are exported then).",
                Gauge,
                vec![(vec![], self.bpf_stats as u64)],
            )?;
        }
        family(
            enc,
            "md_program_runs",
            "Runs of one of md's BPF programs while the kernel's BPF statistics were on.",
            Counter,
            self.programs
                .iter()
                .map(|p| (labels([("program", p.program)]), p.runs))
                .collect(),
        )?;
        family(
            enc,
            "md_program_run_time_seconds",
            "Time spent in one of md's BPF programs while the kernel's BPF statistics were on.",
            Counter,
            self.programs
                .iter()
                .map(|p| (labels([("program", p.program)]), p.run_time_ns as f64 / 1e9))
                .collect(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::Proto;
    use md_common::{CT_DIR_REPLY, CT_KIND_DNAT};

    fn iface(container: &str, network: &str, n: u64) -> Interface {
        Interface {
            container: container.into(),
            network: network.into(),
            stats: IfStats {
                egress_packets: n,
                egress_bytes: n * 84,
                ingress_packets: n + 1,
                ingress_bytes: (n + 1) * 84,
                snat: 2,
                dnat: 4,
                drop_policy: 3,
                drop_unsolicited: 1,
                ..IfStats::default()
            },
        }
    }

    fn sample() -> Snapshot {
        let mut live = BTreeMap::new();
        live.insert(IPPROTO_UDP, 2);
        live.insert(IPPROTO_TCP, 4);
        Snapshot {
            loaded: true,
            interfaces: vec![iface("web", "bridge", 5), iface("web", "back", 7)],
            uplink: Some((
                "up0".into(),
                IfStats {
                    egress_packets: 9,
                    drop_unsolicited: 2,
                    ..IfStats::default()
                },
            )),
            ports: vec![PortHits {
                container: "web".into(),
                port: PortMapping {
                    host_ip: None,
                    host_port: 8080,
                    container_port: 80,
                    proto: Proto::Tcp,
                    family: Default::default(),
                    routed: false,
                },
                hits: 4,
            }],
            tracker: Tracker {
                entries: 8,
                live,
                nat_ports: [(IPPROTO_UDP, 1)].into(),
                nat_ports_busiest: [(IPPROTO_UDP, 1)].into(),
            },
            tracker_capacity: 131072,
            nat_port_capacity: 4536,
            policy: vec![RuleDrops {
                from: "a".into(),
                to: "web".into(),
                drops: 7,
            }],
            maps: vec![MapFill {
                map: m::CONNTRACK,
                entries: 8,
                capacity: 131072,
            }],
            bpf_stats: true,
            programs: vec![ProgramStats {
                program: m::PROG_VETH_INGRESS,
                runs: 12,
                run_time_ns: 1_500_000,
            }],
        }
    }

    #[test]
    fn exposition_carries_every_family_with_its_labels() {
        let text = encode(sample());
        for want in [
            "# TYPE md_container_packets_total counter",
            r#"md_container_packets_total{container="web",network="bridge",direction="egress"} 5"#,
            r#"md_container_packets_total{container="web",network="back",direction="ingress"} 8"#,
            r#"md_container_bytes_total{container="web",network="bridge",direction="egress"} 420"#,
            r#"md_container_snat_total{container="web",network="bridge"} 2"#,
            r#"md_container_dnat_total{container="web",network="back"} 4"#,
            r#"md_container_drops_total{container="web",network="bridge",reason="policy"} 3"#,
            r#"md_container_drops_total{container="web",network="bridge",reason="unsolicited"} 1"#,
            r#"md_container_drops_total{container="web",network="bridge",reason="spoofed-source"} 0"#,
            r#"md_uplink_packets_total{interface="up0",direction="egress"} 9"#,
            r#"md_uplink_drops_total{interface="up0",reason="unsolicited"} 2"#,
            r#"md_port_hits_total{container="web",protocol="tcp",host_ip="0.0.0.0",host_port="8080",container_port="80"} 4"#,
            "# TYPE md_conntrack_entries gauge",
            r#"md_conntrack_entries{protocol="tcp"} 4"#,
            r#"md_conntrack_entries{protocol="udp"} 2"#,
            "md_conntrack_capacity 131072",
            r#"md_nat_ports_used{protocol="udp"} 1"#,
            r#"md_nat_ports_used_busiest_destination{protocol="udp"} 1"#,
            "md_nat_ports_capacity 4536",
            r#"md_policy_drops_total{from="a",to="web"} 7"#,
            r#"md_map_entries{map="CONNTRACK"} 8"#,
            r#"md_map_capacity{map="CONNTRACK"} 131072"#,
            "md_bpf_stats_enabled 1",
            r#"md_program_runs_total{program="md_veth_ingress"} 12"#,
            r#"md_program_run_time_seconds_total{program="md_veth_ingress"} 0.0015"#,
            "md_datapath_loaded 1",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing line {want:?} in:\n{text}"
            );
        }
    }

    /// Prometheus's conventions: snake_case names under one prefix, `_total` on counters and
    /// only there, base units (`_bytes`, `_seconds`), snake_case label names, HELP and TYPE
    /// before each family's samples.
    #[test]
    fn names_follow_prometheus_conventions() {
        let text = encode(sample());
        let snake = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# HELP ") {
                helped.push(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(helped.last().map(String::as_str), Some(name), "{l}");
                assert!(name.starts_with("md_") && snake(name), "{name}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
                assert!(!name.contains("milli") && !name.contains("kilo"), "{name}");
                typed.insert(name.to_string(), kind.to_string());
            } else {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains_key(name), "sample before its TYPE: {l}");
                if let Some(labels) = l.split_once('{').map(|(_, r)| r.split_once('}').unwrap().0) {
                    for pair in labels.split("\",") {
                        let key = pair.split('=').next().unwrap();
                        assert!(snake(key), "label {key:?} in {l}");
                    }
                }
                let value = l.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{l}");
            }
        }
        assert!(typed.contains_key("md_container_bytes_total"));
        assert!(typed.contains_key("md_program_run_time_seconds_total"));
    }

    #[test]
    fn program_times_only_while_the_kernel_counts_them() {
        let mut s = sample();
        s.bpf_stats = false;
        s.programs.clear();
        let text = encode(s);
        assert!(
            text.lines().any(|l| l == "md_bpf_stats_enabled 0"),
            "{text}"
        );
        assert!(!text.contains("md_program_"), "{text}");
    }

    #[test]
    fn without_a_datapath_only_that_is_said() {
        let text = encode(Snapshot::default());
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, ["md_datapath_loaded 0"], "{text}");
    }

    #[test]
    fn tracker_tally_counts_live_entries_and_nat_ports_per_destination() {
        let now = 1_000;
        let key =
            |sport: u16, proto: u8| CtKey::new([172, 18, 0, 2], [192, 0, 2, 2], sport, 53, proto);
        let snat = |port: u16, dst: Ip4, expires_ns: u64| CtEntry {
            nat_saddr: [192, 0, 2, 1],
            nat_daddr: dst,
            nat_sport: port,
            nat_dport: 53,
            kind: CT_KIND_SNAT,
            dir: CT_DIR_ORIGINAL,
            expires_ns,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            dir: CT_DIR_REPLY,
            ..snat(61000, [192, 0, 2, 2], 2_000)
        };
        let entries = vec![
            // Three UDP flows to 192.0.2.2:53, one of them on a port another destination
            // also uses; one expired flow; the reply halves; one DNAT flow over TCP.
            (key(1, IPPROTO_UDP), snat(61000, [192, 0, 2, 2], 2_000)),
            (key(2, IPPROTO_UDP), snat(61001, [192, 0, 2, 2], 2_000)),
            (key(3, IPPROTO_UDP), snat(61002, [192, 0, 2, 2], 2_000)),
            (key(4, IPPROTO_UDP), snat(61000, [198, 51, 100, 7], 2_000)),
            (key(5, IPPROTO_UDP), snat(61003, [192, 0, 2, 2], 999)),
            (key(6, IPPROTO_UDP).reversed(), reply),
            (
                key(7, IPPROTO_TCP),
                CtEntry {
                    kind: CT_KIND_DNAT,
                    expires_ns: 5_000,
                    ..CtEntry::default()
                },
            ),
        ];
        let t = Tracker::tally(entries, now);
        assert_eq!(t.entries, 7);
        assert_eq!(t.live, [(IPPROTO_UDP, 5), (IPPROTO_TCP, 1)].into());
        assert_eq!(t.nat_ports, [(IPPROTO_UDP, 3)].into());
        assert_eq!(t.nat_ports_busiest, [(IPPROTO_UDP, 3)].into());
    }
}
