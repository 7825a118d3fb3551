//! Sustained-load soak (issue 20): established flows must survive a tracker at capacity and a
//! SYN flood on top. Run by `cargo xtask test --soak` (ignored otherwise: it takes an hour);
//! `MD_SOAK_SECS` sets the duration (default 3600), `--soak-duration 120s` a short check.
//!
//! In a lab: container `srv` runs a TCP echo published as host port 8080; container `cli` keeps
//! `SESSIONS` masqueraded TCP sessions to an echo server outside, and the outside keeps as many
//! sessions to the published port; each session echoes a line every second for the whole run.
//! Meanwhile `cli` opens new masqueraded flows (TCP connections and UDP exchanges from fresh
//! sockets, about as many as the answered tracker holds over the UDP lifetime) and pings, and
//! the outside floods the published port with spoofed SYNs (unanswered flows, CONNTRACK_NEW).
//! Every 10 s the test records the trackers' occupancy (`md-user stats --json`: conntrack and
//! maps) and memory (MemAvailable, Slab, the BPF maps' memlock). It fails if any established
//! session is lost.

use std::time::{Duration, Instant};

use md_tests::{helpers::run_d, require_e2e, Lab, HOST_UPLINK_IP, OUTSIDE_IP};
use serde_json::Value;

const SESSIONS: usize = 32;
/// New masqueraded flows per second (half TCP, half UDP): 1,200 UDP flows/s with UDP's 60 s
/// lifetime and two entries per flow is 144,000 entries, above the answered tracker's 131,072.
const CHURN_RATE: u64 = 2400;
const SYN_RATE: u64 = 4000;
/// UDP destination ports outside: one masquerade port range per destination port, so the
/// answered tracker fills before NAT ports run out.
const UDP_PORTS: u16 = 64;

fn soak_bin() -> &'static str {
    env!("CARGO_BIN_EXE_md-soak")
}

fn secs() -> u64 {
    std::env::var("MD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600)
}

/// The last JSON line of a client's output.
fn last_json(out: &str) -> Value {
    out.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null)
}

fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Bytes the kernel charges for md's pinned maps (bpftool's memlock).
fn maps_memlock(lab: &Lab) -> u64 {
    let dir = lab.pin_dir().join("maps");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let out = std::process::Command::new("bpftool")
                .args(["map", "show", "pinned"])
                .arg(e.path())
                .arg("-j")
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            v["bytes_memlock"].as_u64()
        })
        .sum()
}

#[test]
#[ignore = "an hour of load: cargo xtask test --soak (MD_SOAK_SECS for a shorter run)"]
fn soak_established_flows_survive_tracker_capacity_and_syn_flood() {
    assert!(
        require_e2e(),
        "the soak needs MD_E2E=1 (root, lab namespaces)"
    );
    let secs = secs();
    let lab = Lab::new("soak");
    let bin = soak_bin();

    // Servers: an echo outside (TCP and UDP), an echo in srv published on 8080.
    let _out_tcp = lab.spawn_outside(&[bin, "tcp-echo", "7001"]);
    let udp_ports = UDP_PORTS.to_string();
    let _out_udp = lab.spawn_outside(&[bin, "udp-echo", "7100", &udp_ports]);
    lab.wait_listening_outside("tcp", 7001);
    lab.wait_listening_outside("udp", 7100);
    run_d(
        &lab,
        "srv",
        &["-p", "8080:7000"],
        &[bin, "tcp-echo", "7000"],
    );
    lab.wait_listening_in("srv", "tcp", 7000);
    run_d(&lab, "cli", &[], &["sleep", "infinity"]);

    // Established flows, both ways, for the whole run (+ a margin for the load to stop).
    let run = (secs + 20).to_string();
    let out_tcp = format!("{OUTSIDE_IP}:7001");
    let published = format!("{HOST_UPLINK_IP}:8080");
    let n = SESSIONS.to_string();
    let mut masq = lab.spawn_exec("cli", &[bin, "sessions", &out_tcp, &n, "1000", &run]);
    let mut dnat = lab.spawn_outside(&[bin, "sessions", &published, &n, "1000", &run]);
    std::thread::sleep(Duration::from_secs(3));

    // Load: new flows at the tracker's capacity, pings, and a SYN flood on the published port.
    let secs_s = secs.to_string();
    let out_udp = format!("{OUTSIDE_IP}:7100");
    let rate = CHURN_RATE.to_string();
    let mut churn = lab.spawn_exec(
        "cli",
        &[bin, "churn", &out_tcp, &out_udp, &udp_ports, &rate, &secs_s],
    );
    let mut ping = lab.spawn_exec(
        "cli",
        &["ping", "-q", "-i", "0.01", "-w", &secs_s, OUTSIDE_IP],
    );
    let syn_rate = SYN_RATE.to_string();
    let mut flood =
        lab.spawn_outside(&[bin, "syn-flood", HOST_UPLINK_IP, "8080", &syn_rate, &secs_s]);

    println!("soak: {secs} s, {SESSIONS}+{SESSIONS} established sessions, {CHURN_RATE} new flows/s, {SYN_RATE} SYN/s");
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>11}",
        "t(s)", "answered", "capacity", "unanswd", "capacity", "MemAvail", "Slab", "maps"
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut peak = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(10).min(
            Duration::from_secs(secs).saturating_sub(started.elapsed()) + Duration::from_millis(1),
        ));
        let st = lab.stats();
        let ct = &st["conntrack"];
        let (a, u) = (
            ct["entries"].as_u64().unwrap_or(0),
            ct["unanswered"].as_u64().unwrap_or(0),
        );
        peak = (peak.0.max(a), peak.1.max(u));
        let row = (
            started.elapsed().as_secs(),
            a,
            ct["capacity"].as_u64().unwrap_or(0),
            u,
            ct["unanswered_capacity"].as_u64().unwrap_or(0),
            meminfo("MemAvailable:"),
            meminfo("Slab:"),
            maps_memlock(&lab),
        );
        println!(
            "{:>6} {:>9} {:>9} {:>9} {:>9} {:>8} kB {:>6} kB {:>8} kB",
            row.0,
            row.1,
            row.2,
            row.3,
            row.4,
            row.5,
            row.6,
            row.7 / 1024
        );
        samples.push(row);
    }

    // md's own counters (drops by reason) say whether a lost exchange was md's doing.
    println!("md-user stats at the end: {}", lab.stats());
    let churned = {
        churn.wait_timeout(Duration::from_secs(60));
        last_json(&churn.stdout())
    };
    flood.wait_timeout(Duration::from_secs(60));
    ping.wait_timeout(Duration::from_secs(60));
    let masq_r = {
        masq.wait_timeout(Duration::from_secs(90));
        last_json(&masq.stdout())
    };
    let dnat_r = {
        dnat.wait_timeout(Duration::from_secs(90));
        last_json(&dnat.stdout())
    };
    println!("churn: {churned}");
    println!("syn flood: {}", last_json(&flood.stdout()));
    println!(
        "ping: {}",
        ping.stdout()
            .lines()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("masqueraded sessions: {masq_r}");
    println!("published-port sessions: {dnat_r}");
    println!(
        "peak occupancy: answered {} entries, unanswered {}",
        peak.0, peak.1
    );
    let first = samples.first().map_or(0, |s| s.5);
    let last = samples.last().map_or(0, |s| s.5);
    println!(
        "MemAvailable: {first} kB at the first sample, {last} kB at the last ({:+} kB)",
        last as i64 - first as i64
    );

    for (what, r) in [("masqueraded", &masq_r), ("published-port", &dnat_r)] {
        assert_eq!(
            r["done"],
            Value::Bool(true),
            "{what} sessions did not finish: {r}\n{}",
            if what == "masqueraded" {
                masq.stderr()
            } else {
                dnat.stderr()
            }
        );
        assert_eq!(
            r["lost"].as_u64(),
            Some(0),
            "{what}: established sessions lost under load: {r}"
        );
    }
    assert!(
        churned["udp_ok"].as_u64().unwrap_or(0) + churned["tcp_ok"].as_u64().unwrap_or(0) > 0,
        "the churn made no flow at all: {churned}"
    );
}
