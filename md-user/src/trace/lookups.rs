//! The map entries a packet meets, shown before each program runs, and what the program
//! changed in the (private) maps, found by comparing them before and after: counters, port
//! hits, policy drops, tracker entries, events.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::lpm_trie::Key as LpmKey;
use md_common::{
    drop_reason_name, maps as m, tcp_state_name, CtEntry, CtKey, Event, IfStats, Ip4, PolicyKey,
    PolicyRule, PortKey, PortTarget, CT_DIR_ORIGINAL, CT_HOOK_UPLINK, CT_KIND_DNAT,
    CT_KIND_HAIRPIN, CT_KIND_SNAT, EVENT_DROP, EVENT_NAT, EVENT_POLICY, IPPROTO_ICMP, POLICY_DENY,
    RESOLVER_PORT,
};
use serde::Serialize;

use super::{
    packet::{Headers, ICMP_ECHO, ICMP_ECHO_REPLY, L4},
    sandbox::Sandbox,
    topo::Topo,
};
use crate::metrics::proto_name;

/// One map entry a packet meets (or misses).
#[derive(Debug, Clone, Serialize)]
pub struct Lookup {
    pub map: String,
    pub key: String,
    /// What the entry says, or why there is none.
    pub value: String,
    pub hit: bool,
}

/// A counter a program moved.
#[derive(Debug, Clone, Serialize)]
pub struct Counter {
    pub interface: String,
    pub ifindex: u32,
    pub counter: String,
    pub delta: u64,
}

fn ip4(a: Ip4) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// The tracker key of a packet as md keys it (ICMP echo: the identifier as the request's
/// source port, the reply's destination port).
pub fn ct_key(h: &Headers) -> Option<CtKey> {
    let (s, d) = (h.saddr.octets(), h.daddr.octets());
    match h.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => {
            Some(CtKey::new(s, d, sport, dport, h.l4.proto()))
        }
        L4::Icmp {
            typ: ICMP_ECHO, id, ..
        } => Some(CtKey::new(s, d, id, 0, IPPROTO_ICMP)),
        L4::Icmp {
            typ: ICMP_ECHO_REPLY,
            id,
            ..
        } => Some(CtKey::new(s, d, 0, id, IPPROTO_ICMP)),
        _ => None,
    }
}

pub fn fmt_key(k: &CtKey) -> String {
    if k.proto == IPPROTO_ICMP {
        let id = k.sport.max(k.dport);
        return format!("{} > {} icmp id {id}", ip4(k.saddr), ip4(k.daddr));
    }
    format!(
        "{}:{} > {}:{} {}",
        ip4(k.saddr),
        k.sport,
        ip4(k.daddr),
        k.dport,
        proto_name(k.proto)
    )
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        CT_KIND_SNAT => "snat",
        CT_KIND_DNAT => "dnat",
        CT_KIND_HAIRPIN => "hairpin",
        md_common::CT_KIND_ROUTED => "routed (no translation)",
        _ => "no translation",
    }
}

/// One tracker entry for people: what the packet becomes, the flow's kind and state.
pub fn fmt_entry(topo: &Topo, key: &CtKey, e: &CtEntry, now_ns: u64) -> String {
    let becomes = e.nat_tuple(key.proto);
    let to = if becomes == *key {
        "stays as it is".to_string()
    } else {
        format!("becomes {}", fmt_key(&becomes))
    };
    let life = if e.expires_ns > now_ns {
        format!("expires in {}s", (e.expires_ns - now_ns) / 1_000_000_000)
    } else {
        "expired".into()
    };
    let mut s = format!(
        "{to}; {} flow, {} direction, translated at the {}",
        kind_name(e.kind),
        if e.dir == CT_DIR_ORIGINAL {
            "original"
        } else {
            "reply"
        },
        if e.hook == CT_HOOK_UPLINK {
            "uplink"
        } else {
            "veth"
        }
    );
    if key.proto == md_common::IPPROTO_TCP {
        s.push_str(&format!(", {}", tcp_state_name(e.tcp_state)));
    }
    if e.identity != 0 {
        s.push_str(&format!(", towards {}", topo.identity_name(e.identity)));
    }
    s.push_str(&format!(", {} packets, {life}", e.packets));
    s
}

/// The live entry for `key` in either tracker map (answered flows first).
pub fn ct_find(sb: &Sandbox, key: &CtKey) -> Option<(&'static str, CtEntry)> {
    m::TRACKERS
        .iter()
        .find_map(|map| sb.get::<CtKey, CtEntry>(map, key).map(|e| (*map, e)))
}

fn endpoint_text(topo: &Topo, ip: Ipv4Addr) -> Option<String> {
    let p = topo.port_by_ip(ip)?;
    Some(format!(
        "{} (veth {}, network {}, identity {}, MAC {})",
        p.container.clone().unwrap_or_else(|| "unnamed".into()),
        p.veth,
        topo.network_name(p.ep.net_id),
        p.ep.identity,
        super::packet::mac_str(&p.ep.mac),
    ))
}

fn port_text(topo: &Topo, t: &PortTarget) -> String {
    format!(
        "{}:{} ({}), {} hits",
        ip4(t.ip),
        t.port,
        topo.identity_name(t.identity),
        t.hits
    )
}

/// The published port a packet to `h.daddr` meets, as md's datapath looks it up: an entry
/// bound to the address wins over one on every address (which answers on host addresses).
pub fn port_entry(sb: &Sandbox, topo: &Topo, h: &Headers) -> Option<(PortKey, PortTarget)> {
    let (_, dport) = h.l4.ports()?;
    if dport == RESOLVER_PORT && topo.is_gateway_addr(h.daddr) {
        return None;
    }
    let proto = h.l4.proto();
    let exact = PortKey::new(h.daddr.octets(), dport, proto);
    if let Some(t) = sb.get::<PortKey, PortTarget>(m::PORT_MAP, &exact) {
        return Some((exact, t));
    }
    if !(topo.is_host_addr(h.daddr) || h.daddr.is_loopback()) {
        return None;
    }
    let any = PortKey::new([0; 4], dport, proto);
    sb.get::<PortKey, PortTarget>(m::PORT_MAP, &any)
        .map(|t| (any, t))
}

fn fmt_port_key(k: &PortKey) -> String {
    let ip = if k.ip == [0; 4] {
        "*".to_string()
    } else {
        ip4(k.ip).to_string()
    };
    format!("{ip}:{}/{}", k.port, proto_name(k.proto))
}

/// The policy between two identities as the datapath decides it.
pub fn policy_text(sb: &Sandbox, src: u32, dst: u32) -> (String, bool) {
    if src == dst || src == 0 || dst == 0 {
        return ("not subject to policy".into(), true);
    }
    let key = PolicyKey {
        src_identity: src,
        dst_identity: dst,
    };
    match sb.get::<PolicyKey, PolicyRule>(m::POLICY, &key) {
        Some(r) if r.verdict == POLICY_DENY => ("rule deny".into(), false),
        Some(_) => ("rule allow".into(), true),
        None => {
            let deny = sb
                .config()
                .map(|c| c.policy_default == POLICY_DENY)
                .unwrap_or(false);
            (
                format!("no rule, default {}", if deny { "deny" } else { "allow" }),
                !deny,
            )
        }
    }
}

/// The map entries a packet meets: who its addresses belong to, the published port and the
/// tracker entry it matches, and the policy between the containers involved.
pub fn lookups(sb: &Sandbox, topo: &Topo, h: &Headers, now_ns: u64) -> Vec<Lookup> {
    let mut out = Vec::new();
    let mut push = |map: &str, key: String, value: Option<String>, miss: &str| {
        out.push(Lookup {
            map: map.into(),
            key,
            hit: value.is_some(),
            value: value.unwrap_or_else(|| miss.into()),
        })
    };
    for ip in [h.saddr, h.daddr] {
        match endpoint_text(topo, ip) {
            Some(t) => push(m::ENDPOINTS, ip.to_string(), Some(t), ""),
            None => {
                let subnet = sb
                    .lpm::<Ip4, u32>(m::MD_SUBNETS)
                    .ok()
                    .and_then(|t| t.get(&LpmKey::new(32, ip.octets()), 0).ok());
                let host = topo.host_addrs.get(&ip).map(|f| {
                    if f & md_common::HOST_ADDR_GATEWAY != 0 {
                        "host address (gateway of an md network)".to_string()
                    } else {
                        "host address".to_string()
                    }
                });
                match (subnet, host) {
                    (_, Some(hst)) => push(m::HOST_ADDRS, ip.to_string(), Some(hst), ""),
                    (Some(net), None) => push(
                        m::MD_SUBNETS,
                        ip.to_string(),
                        Some(format!(
                            "in network {}, but no container has it",
                            topo.network_name(net)
                        )),
                        "",
                    ),
                    (None, None) => push(
                        m::ENDPOINTS,
                        ip.to_string(),
                        None,
                        "no container, no host address, not in md's networks",
                    ),
                }
            }
        }
    }
    if let Some(key) = ct_key(h) {
        let found = ct_find(sb, &key);
        match found {
            Some((map, e)) => push(
                map,
                fmt_key(&key),
                Some(fmt_entry(topo, &key, &e, now_ns)),
                "",
            ),
            None => push(
                m::CONNTRACK,
                fmt_key(&key),
                None,
                "no tracked flow (in either tracker): a new flow",
            ),
        }
    }
    let target = port_entry(sb, topo, h);
    if let Some((k, t)) = &target {
        push(m::PORT_MAP, fmt_port_key(k), Some(port_text(topo, t)), "");
    } else if let (Some((_, dport)), true) = (
        h.l4.ports(),
        topo.is_host_addr(h.daddr) || h.daddr.is_loopback(),
    ) {
        push(
            m::PORT_MAP,
            format!("{}:{dport}/{}", h.daddr, proto_name(h.l4.proto())),
            None,
            "no published port there",
        );
    }
    let src = topo.port_by_ip(h.saddr).map(|p| p.ep.identity);
    let dst = target
        .map(|(_, t)| t.identity)
        .or_else(|| topo.port_by_ip(h.daddr).map(|p| p.ep.identity));
    if let (Some(s), Some(d)) = (src, dst) {
        let (mut text, _) = policy_text(sb, s, d);
        let answer = ct_key(h)
            .and_then(|k| ct_find(sb, &k))
            .is_some_and(|(_, e)| e.dir != CT_DIR_ORIGINAL);
        if answer {
            text.push_str(" (not applied: answers of a tracked flow pass)");
        }
        let key = format!("{} → {}", topo.identity_name(s), topo.identity_name(d));
        out.push(Lookup {
            map: m::POLICY.into(),
            key,
            value: text,
            hit: true,
        });
    }
    out
}

/// The maps a program can change, as they were at one moment.
pub struct Snapshot {
    stats: BTreeMap<u32, IfStats>,
    ports: Vec<(PortKey, PortTarget)>,
    policy: Vec<(PolicyKey, PolicyRule)>,
    ct: Vec<(CtKey, Option<(&'static str, CtEntry)>)>,
}

impl Snapshot {
    pub fn take(sb: &Sandbox, keys: &[CtKey]) -> Snapshot {
        Snapshot {
            stats: sb.if_stats().unwrap_or_default(),
            ports: sb
                .entries::<PortKey, PortTarget>(m::PORT_MAP)
                .unwrap_or_default(),
            policy: sb
                .entries::<PolicyKey, PolicyRule>(m::POLICY)
                .unwrap_or_default(),
            ct: keys.iter().map(|k| (*k, ct_find(sb, k))).collect(),
        }
    }

    /// Adds a tracker key known to have had no entry when the snapshot was taken.
    pub fn add_missing(&mut self, key: CtKey) {
        self.ct.push((key, None));
    }
}

fn stat_fields(s: &IfStats) -> [(&'static str, u64); 7] {
    [
        ("egress_packets", s.egress_packets),
        ("egress_bytes", s.egress_bytes),
        ("ingress_packets", s.ingress_packets),
        ("ingress_bytes", s.ingress_bytes),
        ("snat", s.snat),
        ("dnat", s.dnat),
        ("redirected", s.redirected),
    ]
}

/// What moved between two snapshots.
pub struct Changes {
    pub counters: Vec<Counter>,
    pub changes: Vec<String>,
    /// The drop reason whose counter moved, and where.
    pub drop: Option<(u8, u32)>,
    /// Policy rules whose drop counter moved.
    pub rules: Vec<PolicyKey>,
}

pub fn diff(topo: &Topo, a: &Snapshot, b: &Snapshot, now_ns: u64) -> Changes {
    let mut c = Changes {
        counters: Vec::new(),
        changes: Vec::new(),
        drop: None,
        rules: Vec::new(),
    };
    for (idx, after) in &b.stats {
        let before = a.stats.get(idx).copied().unwrap_or_default();
        let mut moved: Vec<(String, u64)> = stat_fields(after)
            .iter()
            .zip(stat_fields(&before).iter())
            .filter(|((_, x), (_, y))| x > y)
            .map(|((n, x), (_, y))| (n.to_string(), x - y))
            .collect();
        for ((reason, x), (_, y)) in crate::metrics::drops(after)
            .iter()
            .zip(crate::metrics::drops(&before).iter())
        {
            if x > y {
                moved.push((format!("drops.{}", drop_reason_name(*reason)), x - y));
                c.drop.get_or_insert((*reason, *idx));
            }
        }
        for (counter, delta) in moved {
            c.counters.push(Counter {
                interface: topo.if_name(*idx),
                ifindex: *idx,
                counter,
                delta,
            });
        }
    }
    for (k, t) in &b.ports {
        let before = a
            .ports
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, t)| t.hits)
            .unwrap_or(0);
        if t.hits > before {
            c.changes.push(format!(
                "PORT_MAP {} hits +{} (→ {}:{} of {})",
                fmt_port_key(k),
                t.hits - before,
                ip4(t.ip),
                t.port,
                topo.identity_name(t.identity)
            ));
        }
    }
    for (k, r) in &b.policy {
        let before = a
            .policy
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, r)| r.drops)
            .unwrap_or(0);
        if r.drops > before {
            c.rules.push(*k);
            c.changes.push(format!(
                "POLICY deny {} → {} drops +{}",
                topo.identity_name(k.src_identity),
                topo.identity_name(k.dst_identity),
                r.drops - before
            ));
        }
    }
    for ((k, before), (_, after)) in a.ct.iter().zip(b.ct.iter()) {
        match (before, after) {
            (None, Some((map, e))) => c.changes.push(format!(
                "{map} new {}: {}",
                fmt_key(k),
                fmt_entry(topo, k, e, now_ns)
            )),
            (Some((m1, e1)), Some((m2, e2))) if m1 != m2 => c.changes.push(format!(
                "{m2} {} moved from {m1} (the flow is answered): {}",
                fmt_key(k),
                fmt_entry(topo, k, e2, now_ns)
            )),
            (Some((_, e1)), Some((map, e2))) if e1.packets != e2.packets => {
                c.changes.push(format!(
                    "{map} {} refreshed: {}",
                    fmt_key(k),
                    fmt_entry(topo, k, e2, now_ns)
                ))
            }
            (Some((map, _)), None) => c.changes.push(format!("{map} {} removed", fmt_key(k))),
            _ => {}
        }
    }
    c
}

/// An event as `monitor` would print it.
pub fn fmt_event(topo: &Topo, ev: &Event) -> String {
    let k = CtKey::new(ev.saddr, ev.daddr, ev.sport, ev.dport, ev.proto);
    let at = if ev.ifindex != 0 {
        format!(" on {}", topo.if_name(ev.ifindex))
    } else {
        String::new()
    };
    match ev.kind {
        EVENT_POLICY => format!("policy-deny {}{at}", fmt_key(&k)),
        EVENT_DROP => format!("drop {} {}{at}", drop_reason_name(ev.reason), fmt_key(&k)),
        EVENT_NAT => format!(
            "nat {} {} as {}:{}{at}",
            kind_name(ev.reason),
            fmt_key(&k),
            ip4(ev.nat_addr),
            ev.nat_port
        ),
        other => format!("event {other} {}", fmt_key(&k)),
    }
}
