use std::process::ExitCode;

use anyhow::Result;
use md_common::{drop_reason_name, maps as m, IfStats};
use serde_json::{json, Value};

use super::{reconcile, Ctx};
use crate::{datapath::Datapath, endpoint::port_hits, netlink::Netlink};

/// Sum of an interface's per-CPU counters.
pub fn if_stats(dp: &Datapath, ifindex: u32) -> IfStats {
    let mut t = IfStats::default();
    let Ok(map) = dp.if_stats() else {
        return t;
    };
    if let Ok(per_cpu) = map.get(&ifindex, 0) {
        for s in per_cpu.iter() {
            add(&mut t, s);
        }
    }
    t
}

pub fn add(a: &mut IfStats, b: &IfStats) {
    a.egress_packets += b.egress_packets;
    a.egress_bytes += b.egress_bytes;
    a.ingress_packets += b.ingress_packets;
    a.ingress_bytes += b.ingress_bytes;
    a.snat += b.snat;
    a.dnat += b.dnat;
    a.drop_policy += b.drop_policy;
    a.drop_spoof += b.drop_spoof;
    a.drop_isolation += b.drop_isolation;
    a.drop_unsupported += b.drop_unsupported;
    a.drop_nat_ports += b.drop_nat_ports;
    a.drop_malformed += b.drop_malformed;
    a.drop_unsolicited += b.drop_unsolicited;
    a.drop_forward += b.drop_forward;
    a.drop_no_source += b.drop_no_source;
    a.redirected += b.redirected;
}

fn counters(s: &IfStats) -> Value {
    let drops: serde_json::Map<String, Value> = crate::metrics::drops(s)
        .iter()
        .map(|(r, n)| (drop_reason_name(*r).to_string(), json!(n)))
        .collect();
    json!({
        "egress_packets": s.egress_packets,
        "egress_bytes": s.egress_bytes,
        "ingress_packets": s.ingress_packets,
        "ingress_bytes": s.ingress_bytes,
        "snat": s.snat,
        "dnat": s.dnat,
        "redirected": s.redirected,
        "drops": drops,
    })
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

pub async fn stats(ctx: &Ctx, as_json: bool, prometheus: bool) -> Result<ExitCode> {
    if prometheus {
        // What a scrape of `md-user metrics` returns: read-only, no lock, no collection.
        let snap = crate::metrics::collect(&ctx.state_dir, &ctx.dp, false)?;
        print!("{}", crate::metrics::encode(snap));
        return Ok(ExitCode::SUCCESS);
    }
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    if !reconcile(ctx, &nl, &mut locked.state).await.is_empty() {
        locked.save()?;
    }
    let state = &locked.state;
    let dp = &ctx.dp;
    let loaded = dp.is_loaded();
    let mut containers = Vec::new();
    let mut ports = Vec::new();
    for c in state.containers.values() {
        let mut total = IfStats::default();
        if loaded {
            for i in &c.interfaces {
                add(&mut total, &if_stats(dp, i.ifindex));
            }
        }
        let mut row = counters(&total);
        row["name"] = json!(c.name);
        row["ip"] = json!(c.primary_ip().map(|i| i.to_string()));
        row["ip6"] = json!(c.primary_ip6().map(|i| i.to_string()));
        containers.push(row);
        for p in &c.ports {
            let hits = if loaded {
                port_hits(dp, state, c, p)
            } else {
                0
            };
            ports.push(json!({"container": c.name, "port": p.to_string(), "hits": hits}));
        }
    }
    // Expired tracker entries are collected here too (the watcher does it every 30 s).
    let per_map = if loaded {
        dp.gc_conntrack()?
    } else {
        Vec::new()
    };
    let live = |i: usize| per_map.get(i).map(|(_, live)| *live).unwrap_or(0);
    let (entries, unanswered) = (live(0), live(1));
    let collected: usize = per_map.iter().map(|(c, _)| c).sum();
    let uplink = match (&state.datapath, loaded) {
        (Some(d), true) => {
            let mut u = counters(&if_stats(dp, d.uplink_ifindex));
            u["name"] = json!(d.uplink);
            u
        }
        _ => Value::Null,
    };
    // Every host interface md covers, by name.
    let mut uplinks = Vec::new();
    if loaded {
        // Issue 17: the overlay's VXLAN device counts (and drops) what other hosts send.
        let tunnel = crate::overlay::tunnel_ifindex(dp);
        for idx in crate::host::uplink_ifindexes(dp).into_iter().chain(tunnel) {
            let name = match nl.link_by_index(idx).await {
                Ok(Some(l)) => l.name,
                _ => format!("if{idx}"),
            };
            let mut u = counters(&if_stats(dp, idx));
            u["name"] = json!(name);
            u["ifindex"] = json!(idx);
            uplinks.push(u);
        }
    }
    let mut maps = serde_json::Map::new();
    if loaded {
        for name in m::ALL_MAPS {
            if let Ok((n, cap)) = dp.map_fill(name) {
                maps.insert(name.to_string(), json!({"entries": n, "capacity": cap}));
            }
        }
    }
    let out = json!({
        "datapath": state.datapath.as_ref().map(|d| d.mode.clone()),
        "containers": containers,
        "uplink": uplink,
        "uplinks": uplinks,
        "conntrack": {
            "entries": entries,
            "unanswered": unanswered,
            "collected": collected,
            "capacity": m::CONNTRACK_MAX,
            "unanswered_capacity": m::CONNTRACK_NEW_MAX,
        },
        "ports": ports,
        "maps": maps,
    });
    drop(locked);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:>10} {:>12} {:>10} {:>12} {:>7} {:>7}  DROPS",
        "CONTAINER", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "SNAT", "DNAT"
    );
    let rows = out["containers"].as_array().cloned().unwrap_or_default();
    let uplink_rows = out["uplinks"].as_array().cloned().unwrap_or_default();
    for r in rows.iter().chain(uplink_rows.iter()) {
        if r.is_null() {
            continue;
        }
        let drops: Vec<String> = r["drops"]
            .as_object()
            .map(|d| {
                d.iter()
                    .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<20} {:>10} {:>12} {:>10} {:>12} {:>7} {:>7}  {}",
            r["name"].as_str().unwrap_or(""),
            n(&r["egress_packets"]),
            n(&r["egress_bytes"]),
            n(&r["ingress_packets"]),
            n(&r["ingress_bytes"]),
            n(&r["snat"]),
            n(&r["dnat"]),
            if drops.is_empty() {
                "-".into()
            } else {
                drops.join(" ")
            }
        );
    }
    println!();
    for p in out["ports"].as_array().cloned().unwrap_or_default() {
        println!(
            "port {:<28} {:<20} hits {}",
            p["port"].as_str().unwrap_or(""),
            p["container"].as_str().unwrap_or(""),
            p["hits"]
        );
    }
    println!(
        "conntrack: {} answered flows' entries (capacity {}), {} unanswered (capacity {}), {} expired collected",
        entries,
        m::CONNTRACK_MAX,
        unanswered,
        m::CONNTRACK_NEW_MAX,
        collected,
    );
    let fill: Vec<String> = maps
        .iter()
        .map(|(k, v)| format!("{k} {}/{}", v["entries"], v["capacity"]))
        .collect();
    println!("maps: {}", fill.join(", "));
    if let Some(d) = out["datapath"].as_str() {
        println!("datapath: {d}");
    }
    Ok(ExitCode::SUCCESS)
}
