//! `md-user monitor`: datapath events from the EVENTS ring buffer, one line each (Cilium's
//! `monitor` is the model). The ring has one reader at a time.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use md_common::{
    drop_reason_name, Event, CT_KIND_DNAT, CT_KIND_HAIRPIN, CT_KIND_SNAT, EVENT_DROP, EVENT_NAT,
    EVENT_POLICY, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use super::Ctx;

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        n => n.to_string(),
    }
}

/// Container names by address, refreshed as containers come and go.
struct Names {
    by_ip: HashMap<Ipv4Addr, String>,
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
                n.by_ip.insert(i.ip, c.name.clone());
                n.by_ifindex.insert(i.ifindex, c.name.clone());
            }
        }
        if let Some(d) = &state.datapath {
            n.by_ifindex.insert(d.uplink_ifindex, d.uplink.clone());
        }
        n
    }

    fn ip(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(|s| s.as_str())
    }
}

fn describe(ev: &Event, names: &Names) -> serde_json::Value {
    let (kind, reason) = match ev.kind {
        EVENT_DROP => ("drop", drop_reason_name(ev.reason).to_string()),
        EVENT_POLICY => ("policy-deny", drop_reason_name(ev.reason).to_string()),
        EVENT_NAT => (
            "nat",
            match ev.reason {
                CT_KIND_SNAT => "snat".to_string(),
                CT_KIND_DNAT => "dnat".to_string(),
                CT_KIND_HAIRPIN => "hairpin".to_string(),
                r => r.to_string(),
            },
        ),
        _ => ("unknown", ev.reason.to_string()),
    };
    let src = Ipv4Addr::from(ev.saddr);
    let dst = Ipv4Addr::from(ev.daddr);
    let mut v = json!({
        "ts_ns": ev.ts_ns,
        "event": kind,
        "reason": reason,
        "proto": proto_name(ev.proto),
        "src": format!("{src}:{}", ev.sport),
        "dst": format!("{dst}:{}", ev.dport),
        "src_container": names.ip(src),
        "dst_container": names.ip(dst),
        "interface": names.by_ifindex.get(&ev.ifindex),
    });
    if ev.kind == EVENT_NAT {
        v["nat"] = json!(format!("{}:{}", Ipv4Addr::from(ev.nat_addr), ev.nat_port));
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
    if let Some(n) = v["nat"].as_str() {
        s.push_str(&format!(" as {n}"));
    }
    if let Some(i) = v["interface"].as_str() {
        s.push_str(&format!(" on {i}"));
    }
    s
}

pub async fn monitor(ctx: &Ctx, as_json: bool) -> Result<ExitCode> {
    if !ctx.dp.is_loaded() {
        bail!("md's datapath is not loaded (run a container first)");
    }
    let data = MapData::from_pin(ctx.dp.map_pin(md_common::maps::EVENTS))
        .context("opening the EVENTS ring buffer")?;
    let ring = RingBuf::try_from(Map::from_map_data(data)?)?;
    // SAFETY: the ring owns its fd and lives inside the AsyncFd until both are dropped.
    let mut ring = ring;
    // Events queued while nobody listened are history, not what is happening now.
    while ring.next().is_some() {}
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut names = Names::load(ctx);
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    if !as_json {
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
                    if item.len() < std::mem::size_of::<Event>() {
                        continue;
                    }
                    let ev: Event = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<Event>()]);
                    let v = describe(&ev, &names);
                    if as_json {
                        println!("{v}");
                    } else {
                        println!("{}", line(&v));
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
