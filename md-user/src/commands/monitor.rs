//! `md-user monitor`: datapath events from the EVENTS ring buffer, one line each (Cilium's
//! `monitor` is the model). The ring has one reader at a time.

use std::{
    collections::HashMap,
    net::IpAddr,
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use md_common::{
    drop_reason_name, CtKey, CtKey6, CT_KIND_DNAT, CT_KIND_HAIRPIN, CT_KIND_SNAT, EVENT_DROP,
    EVENT_NAT, EVENT_POLICY,
};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use super::Ctx;
use crate::{
    datapath::monotonic_ns,
    flowlog::{self, endpoint, FlowEvent, FlowLog, Rotation, Tuple},
    metrics::proto_name,
};

/// Container names by address, refreshed as containers come and go.
struct Names {
    by_ip: HashMap<IpAddr, String>,
    by_ifindex: HashMap<u32, String>,
    at: Instant,
}

impl Names {
    fn load(ctx: &Ctx) -> Names {
        let state = ctx.state_dir.peek().unwrap_or_default();
        let mut n = Names {
            by_ip: HashMap::new(),
            by_ifindex: HashMap::new(),
            at: Instant::now(),
        };
        for c in state.containers.values() {
            for i in &c.interfaces {
                n.by_ip.insert(i.ip.into(), c.name.clone());
                if let Some(ip6) = i.ip6 {
                    n.by_ip.insert(ip6.into(), c.name.clone());
                }
                n.by_ifindex.insert(i.ifindex, c.name.clone());
            }
        }
        if let Some(d) = &state.datapath {
            n.by_ifindex.insert(d.uplink_ifindex, d.uplink.clone());
        }
        n
    }

    fn ip(&self, ip: IpAddr) -> Option<&str> {
        self.by_ip.get(&ip).map(|s| s.as_str())
    }
}

/// One event as a flow log record: `src`/`dst` as the packet came, `src_after`/`dst_after` as
/// it left (the same unless translated), `time` the wall clock of the datapath's timestamp.
fn describe(ev: &FlowEvent, names: &Names, after: Tuple, time: SystemTime) -> serde_json::Value {
    let (kind, verdict, reason) = match ev.kind {
        EVENT_DROP => ("drop", "dropped", drop_reason_name(ev.reason).to_string()),
        EVENT_POLICY => (
            "policy-deny",
            "dropped",
            drop_reason_name(ev.reason).to_string(),
        ),
        EVENT_NAT => (
            "nat",
            "forwarded",
            match ev.reason {
                CT_KIND_SNAT => "snat".to_string(),
                CT_KIND_DNAT => "dnat".to_string(),
                CT_KIND_HAIRPIN => "hairpin".to_string(),
                r => r.to_string(),
            },
        ),
        _ => ("unknown", "unknown", ev.reason.to_string()),
    };
    let before = Tuple::of_flow(ev);
    // The datapath reports a hairpin to the caller's own port as DNAT; its tuple says more.
    let reason = if ev.kind == EVENT_NAT && after.src != before.src && after.dst != before.dst {
        "hairpin".to_string()
    } else {
        reason
    };
    // A published port's client names no container until translated; a masqueraded one no
    // longer does after.
    let who = |a: (IpAddr, u16), b: (IpAddr, u16)| names.ip(a.0).or_else(|| names.ip(b.0));
    let mut v = json!({
        "time": flowlog::rfc3339(time),
        "ts_ns": ev.ts_ns,
        "event": kind,
        "verdict": verdict,
        "reason": reason,
        "proto": proto_name(ev.proto),
        "src": endpoint(before.src),
        "dst": endpoint(before.dst),
        "src_after": endpoint(after.src),
        "dst_after": endpoint(after.dst),
        "src_container": who(before.src, after.src),
        "dst_container": who(before.dst, after.dst),
        "interface": names.by_ifindex.get(&ev.ifindex),
    });
    if ev.kind == EVENT_NAT {
        v["nat"] = json!(endpoint(ev.nat));
    }
    v
}

fn line(v: &serde_json::Value) -> String {
    let who = |k: &str| v[k].as_str().map(|n| format!(" ({n})")).unwrap_or_default();
    let mut s = format!(
        "{:<11} {:<20} {:<4} {}{} -> {}{}",
        v["event"].as_str().unwrap_or(""),
        v["reason"].as_str().unwrap_or(""),
        v["proto"].as_str().unwrap_or(""),
        v["src"].as_str().unwrap_or(""),
        who("src_container"),
        v["dst"].as_str().unwrap_or(""),
        who("dst_container"),
    );
    if v["src_after"] != v["src"] || v["dst_after"] != v["dst"] {
        s.push_str(&format!(
            " as {} -> {}",
            v["src_after"].as_str().unwrap_or(""),
            v["dst_after"].as_str().unwrap_or("")
        ));
    }
    if let Some(i) = v["interface"].as_str() {
        s.push_str(&format!(" on {i}"));
    }
    s
}

pub async fn monitor(ctx: &Ctx, as_json: bool, output: Option<Rotation>) -> Result<ExitCode> {
    if !ctx.dp.is_loaded() {
        bail!("md's datapath is not loaded (run a container first)");
    }
    let mut out = output.as_ref().map(FlowLog::open).transpose()?;
    let data = MapData::from_pin(ctx.dp.map_pin(md_common::maps::EVENTS))
        .context("opening the EVENTS ring buffer")?;
    let ring = RingBuf::try_from(Map::from_map_data(data)?)?;
    // Where a translated flow went when the event cannot say (a hairpin's new source).
    let trackers = ctx.dp.trackers()?;
    let trackers6 = ctx.dp.trackers6()?;
    // SAFETY: the ring owns its fd and lives inside the AsyncFd until both are dropped.
    let mut ring = ring;
    // Events queued while nobody listened are history, not what is happening now.
    while ring.next().is_some() {}
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut names = Names::load(ctx);
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    if !as_json && out.is_none() {
        eprintln!("md-user: monitoring datapath events (Ctrl-C to stop)");
    }
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                if names.at.elapsed() > Duration::from_millis(500) {
                    names = Names::load(ctx);
                }
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    let Some(ev) = flowlog::parse_event(&item) else {
                        continue;
                    };
                    let time = flowlog::wall_clock(ev.ts_ns, monotonic_ns(), SystemTime::now());
                    // A hairpin's new source, from the tracker entry of the event's tuple.
                    let hairpin_src = if ev.kind != EVENT_NAT {
                        None
                    } else {
                        match (ev.src.0, ev.dst.0) {
                            (IpAddr::V4(s), IpAddr::V4(d)) => {
                                let key = CtKey::new(s.octets(), d.octets(), ev.src.1, ev.dst.1, ev.proto);
                                trackers.iter().find_map(|t| t.get(&key, 0).ok())
                                    .filter(|e| e.kind == CT_KIND_HAIRPIN)
                                    .map(|e| (IpAddr::from(e.nat_saddr), e.nat_sport))
                            }
                            (IpAddr::V6(s), IpAddr::V6(d)) => {
                                let key = CtKey6::new(s.octets(), d.octets(), ev.src.1, ev.dst.1, ev.proto);
                                trackers6.iter().find_map(|t| t.get(&key, 0).ok())
                                    .filter(|e| e.kind == CT_KIND_HAIRPIN)
                                    .map(|e| (IpAddr::from(e.nat_saddr), e.nat_sport))
                            }
                            _ => None,
                        }
                    };
                    let v = describe(&ev, &names, flowlog::translated_flow(&ev, hairpin_src), time);
                    let text = if as_json { v.to_string() } else { line(&v) };
                    match &mut out {
                        Some(log) => log.write_line(&text)?,
                        None => println!("{text}"),
                    }
                }
                guard.clear_ready();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}
