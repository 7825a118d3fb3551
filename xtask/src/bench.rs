//! `cargo xtask bench [--quick]`: md's datapath against plain routing, Docker-style iptables,
//! Docker's own daemon (20.10, bridge driver and iptables), Podman's netavark and the reference
//! CNI plugins (bridge + host-local + portmap), on the same lab topology, in one run (issues
//! 8, 15 and 16); the base again over IPv6 (issue 14); and containers across two hosts over
//! md's overlay (VXLAN and native routing) against plain routing between them (issue 17).
//!
//! Every measurement runs inside network namespaces the bench makes and removes itself (see
//! `bench/lab.rs`); nothing touches the machine's interfaces, routes or firewall. Output: a
//! table on stdout and in `target/bench/table.md`, samples in `target/bench/results.jsonl`,
//! medians in `target/bench/summary.jsonl`, a chart in `target/bench/chart.svg`, and the
//! machine in `target/bench/machine.txt`; the same under `target/bench/full/` or
//! `target/bench/quick/`, so a quick run does not replace the last full one.
//!
//! Method, for a shared 2-vCPU VM:
//! - servers and load generators are pinned to one CPU (a cross-CPU wakeup through the
//!   hypervisor costs ~90 µs here and made every latency bimodal);
//! - base rounds rebuild every datapath per round in a rotated order; the scaling labs of one
//!   scenario stay up side by side and are measured in turns;
//! - in new-connection runs the server closes first, so the client never runs out of ports
//!   in TIME_WAIT (which slowed connect() by 40x mid-run);
//! - a failed round is retried once; md-user and the tool run from a private copy.
//!
//! Timings are never pass/fail: the bench fails only when a datapath cannot be set up or a
//! measurement cannot run.

mod datapaths;
mod hosts;
mod lab;
mod report;
mod stats;
mod sys;
pub mod tool;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use datapaths::{Dp, Env, Extra, NetavarkMode, Setup, ALL, ECHO_PORT};
use lab::{Lab, HOST_IP};
use stats::Results;
use sys::{check_interrupt, in_ns, mono_ns, run_ok, Bg, SysctlGuard};

use crate::{build_ebpf, util};

/// netavark from crates.io, built once into target/bench/tools (full runs only).
const NETAVARK_VERSION: &str = "2.1.0";

/// Tools the bench runs, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    // Building md-user (etcd-client's gRPC code, issue 17).
    ("protoc", "protobuf-compiler"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("iperf3", "iperf3"),
    // The overlay's store across hosts (bench/hosts.rs).
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("ip6tables-restore", "iptables"),
    // The reference CNI stack (cni-reference): bridge, host-local, portmap.
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    // Docker's own daemon (docker-daemon) and the image its containers run.
    ("/usr/sbin/dockerd", "docker.io"),
    ("/usr/bin/docker", "docker.io"),
    ("busybox", "busybox-static"),
];

/// How long and how often: `--quick` is a smoke run of a couple of minutes.
pub struct Plan {
    pub quick: bool,
    pub reps: usize,
    pub iperf_secs: u32,
    pub rr_secs: f64,
    pub crr_secs: f64,
    pub scale_secs: f64,
    pub port_scales: Vec<usize>,
    pub policy_scales: Vec<usize>,
    /// How many containers the control plane is measured with at scale.
    pub containers: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 3,
                iperf_secs: 2,
                rr_secs: 0.5,
                crr_secs: 0.5,
                scale_secs: 0.5,
                port_scales: vec![10, 1_000],
                policy_scales: vec![10, 1_000],
                containers: containers(50),
            }
        } else {
            Plan {
                quick,
                reps: 5,
                iperf_secs: 5,
                rr_secs: 3.0,
                crr_secs: 3.0,
                scale_secs: 2.0,
                port_scales: vec![10, 1_000, 10_000],
                policy_scales: vec![10, 1_000, 10_000],
                containers: containers(1_000),
            }
        }
    }
}

/// `MD_BENCH_CONTAINERS=N` overrides the count (memory: each container is three processes).
fn containers(default: usize) -> usize {
    std::env::var("MD_BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n >= 2)
        .unwrap_or(default)
}

pub fn run(quick: bool) -> Result<()> {
    if !util::is_root() {
        bail!("bench needs root (network namespaces, iptables, BPF): run it with sudo");
    }
    let started = Instant::now();
    let plan = Plan::new(quick);
    ensure_tools()?;
    let md_rev = match std::env::var_os("MD_USER_BIN") {
        Some(p) => format!("{} (MD_USER_BIN)", Path::new(&p).display()),
        None => report::md_revision(),
    };
    let (tool, md_bin) = build()?;
    let mut results = Results::default();
    let netavark = find_netavark(quick, &mut results);
    sys::install_signal_handlers();
    lab::sweep_stale(Some(&md_bin));
    let env = Env {
        tool,
        md_bin,
        netavark,
        cpu: bench_cpu(),
        md_rev,
    };
    let out_dir = util::host_target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;

    let outcome = measure_all(&plan, &env, &mut results);
    if let Err(e) = &outcome {
        results.error(format!("stopped early: {e:#}"));
    }
    let machine = report::machine(&env, &plan);
    // The latest run in target/bench, and per mode, so a --quick run keeps the last full one.
    let mode_dir = out_dir.join(if quick { "quick" } else { "full" });
    std::fs::create_dir_all(&mode_dir)?;
    report::write_all(&mode_dir, &results, &machine, &plan, false)?;
    report::write_all(&out_dir, &results, &machine, &plan, true)?;
    let left = lab::leftovers();
    if !left.is_empty() {
        eprintln!("bench: WARNING: left behind: {}", left.join(" "));
    }
    eprintln!(
        "bench: done in {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    outcome?;
    if results.errors > 0 {
        bail!("{} measurement(s) failed (see the notes)", results.errors);
    }
    Ok(())
}

/// One CPU for every server and load generator: on a VM a wakeup across CPUs costs tens of
/// microseconds (an IPI through the hypervisor) and makes latencies bimodal, drowning the
/// datapath. `MD_BENCH_CPU=N` picks another, `MD_BENCH_CPU=none` leaves them unpinned.
fn bench_cpu() -> Option<usize> {
    match std::env::var("MD_BENCH_CPU") {
        Ok(v) if v == "none" => None,
        Ok(v) => v.parse().ok(),
        Err(_) => std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() - 1),
    }
}

fn ensure_tools() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for &(cmd, pkg) in TOOLS {
        if util::which(cmd).is_none() && !missing.contains(&pkg) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_debian() {
        bail!(
            "missing tools; install (Debian names): {}",
            missing.join(" ")
        );
    }
    util::apt_install(&missing)
}

/// build-ebpf, then md-user and xtask itself in release (the measuring tool runs as
/// `xtask bench-tool`; a debug build would measure itself), copied to target/bench/bin.
/// `MD_USER_BIN` overrides md-user.
fn build() -> Result<(PathBuf, PathBuf)> {
    let md_override = std::env::var_os("MD_USER_BIN").map(PathBuf::from);
    let mut cmd = util::host_cargo();
    cmd.args(["build", "--release", "-p", "xtask"]);
    if md_override.is_none() {
        build_ebpf::run()?;
        cmd.args(["-p", "md-user"]);
    }
    util::run(&mut cmd)?;
    let rel = util::host_target_dir().join("release");
    let tool = rel.join("xtask");
    let md = md_override.unwrap_or_else(|| rel.join("md-user"));
    // A private copy: someone rebuilding target/release during the run would otherwise mix
    // two builds in one run (and md-user refuses a datapath loaded by another build).
    let dir = util::host_target_dir().join("bench/bin");
    std::fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    for (p, name) in [(&tool, "xtask"), (&md, "md-user")] {
        if !p.is_file() {
            bail!("{} is missing after the build", p.display());
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(p, &tmp).with_context(|| format!("copying {}", p.display()))?;
        std::fs::rename(&tmp, dir.join(name))?;
        out.push(dir.join(name));
    }
    let md = out.pop().expect("two binaries");
    let tool = out.pop().expect("two binaries");
    Ok((tool, md))
}

fn netavark_version(bin: &Path) -> Option<(u32, String)> {
    let out = util::output_of(util::command(bin).arg("--version"))?;
    let v = out.split_whitespace().last()?.to_string();
    let major = v.split('.').next()?.parse().ok()?;
    Some((major, v))
}

/// netavark 2.x (nftables driver): `NETAVARK_BIN`, target/bench/tools, PATH; built with
/// `cargo install` in full runs when absent. Otherwise the nftables rules it would write.
fn find_netavark(quick: bool, results: &mut Results) -> NetavarkMode {
    let tools = util::host_target_dir().join("bench/tools");
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NETAVARK_BIN") {
        candidates.push(p.into());
    }
    candidates.push(tools.join("bin/netavark"));
    if let Some(p) = util::which("netavark") {
        candidates.push(p);
    }
    candidates.push("/usr/libexec/podman/netavark".into());
    let usable = |p: &Path| match netavark_version(p) {
        Some((major, v)) if major >= 2 => Some(v),
        _ => None,
    };
    for c in &candidates {
        if let Some(v) = usable(c) {
            results.note(format!(
                "podman-netavark: netavark {v} ({}), nftables driver",
                c.display()
            ));
            return NetavarkMode::Binary(c.clone());
        }
    }
    let why = if quick {
        "no netavark 2.x binary present and --quick never builds it".to_string()
    } else {
        match install_netavark(&tools) {
            Ok(()) => {
                match usable(&tools.join("bin/netavark")) {
                    Some(v) => {
                        results.note(format!("podman-netavark: netavark {v} (built with cargo install), nftables driver"));
                        return NetavarkMode::Binary(tools.join("bin/netavark"));
                    }
                    None => "cargo install netavark produced no usable binary".to_string(),
                }
            }
            Err(e) => format!("cargo install netavark failed: {e:#}"),
        }
    };
    results.note(format!(
        "podman-netavark: {why}; using the nftables ruleset netavark {NETAVARK_VERSION} writes \
         (table inet netavark, same chains and rule order) on hand-made containers"
    ));
    NetavarkMode::Rules
}

fn install_netavark(root: &Path) -> Result<()> {
    if util::which("protoc").is_none() {
        util::apt_install(&["protobuf-compiler"])?;
    }
    eprintln!("bench: building netavark {NETAVARK_VERSION} once (several minutes on 2 cores)");
    util::run(
        util::command("cargo")
            .args([
                "install",
                "netavark",
                "--locked",
                "--version",
                NETAVARK_VERSION,
                "--root",
            ])
            .arg(root),
    )
}

/// Runs one round into a scratch result set and keeps its samples only when the whole round
/// worked; a failed round is tried once more (the machine is shared: another process can kill
/// or starve a step), and a second failure is reported as an error.
fn attempt(
    r: &mut Results,
    what: &str,
    mut f: impl FnMut(&mut Results) -> Result<()>,
) -> Result<()> {
    for n in 1..=2 {
        check_interrupt()?;
        let mut scratch = Results::default();
        match f(&mut scratch) {
            Ok(()) => {
                r.samples.append(&mut scratch.samples);
                r.notes.append(&mut scratch.notes);
                return Ok(());
            }
            Err(e) => {
                check_interrupt()?;
                if n == 1 {
                    r.note(format!("{what}: retried once after: {e:#}"));
                } else {
                    r.error(format!("{what}: {e:#}"));
                }
            }
        }
    }
    Ok(())
}

/// `MD_BENCH_ONLY` narrows a run, for working on one part of it: datapath names
/// (`docker-daemon,md`) measure those datapaths only (md's own sections run when md is among
/// them); section names (`base`, `ipv6`, `hosts`, `scaling`, `control`, `bpf`) run those
/// sections only; the two combine. A full comparison names nothing.
const SECTIONS: [&str; 6] = ["base", "ipv6", "hosts", "scaling", "control", "bpf"];

fn only() -> String {
    std::env::var("MD_BENCH_ONLY").unwrap_or_default()
}

fn items(only: &str) -> impl Iterator<Item = &str> {
    only.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn selected() -> Vec<Dp> {
    pick(&only())
}

fn pick(only: &str) -> Vec<Dp> {
    let names: Vec<&str> = items(only).filter(|s| !SECTIONS.contains(s)).collect();
    ALL.into_iter()
        .filter(|d| names.is_empty() || names.contains(&d.name()))
        .collect()
}

fn wanted(section: &str) -> bool {
    let only = only();
    let sections: Vec<&str> = items(&only).filter(|s| SECTIONS.contains(s)).collect();
    sections.is_empty() || sections.contains(&section)
}

fn measure_all(plan: &Plan, env: &Env, r: &mut Results) -> Result<()> {
    let all = selected();
    if all.is_empty() {
        bail!(
            "MD_BENCH_ONLY names no datapath (they are: {}) and no section (they are: {})",
            pick("")
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(", "),
            SECTIONS.join(", ")
        );
    }
    if !only().is_empty() {
        r.note(format!("only what MD_BENCH_ONLY={} names", only()));
    }
    // 1. The datapaths themselves, interleaved: each round builds every datapath afresh, in a
    //    rotated order, so slow drift of a shared machine spreads over all of them.
    for rep in (0..plan.reps).filter(|_| wanted("base")) {
        for i in 0..all.len() {
            let dp = all[(i + rep) % all.len()];
            eprintln!("bench: base round {}/{} {}", rep + 1, plan.reps, dp.name());
            attempt(r, &format!("{} base round {}", dp.name(), rep + 1), |r| {
                let s = datapaths::build(dp, env, Extra::None)?;
                measure_base(plan, env, &s, r, rep, Extra::None)
            })?;
        }
    }
    // 1b. The same over IPv6 (a dual-stack lab; md's NAT66 against Docker's ip6tables rules
    //     and netavark's dual-stack network), rebuilt per round like the base.
    if wanted("ipv6") {
        ipv6_rounds(plan, env, r)?;
    }
    // 1c. Across hosts (issue 17): plain routing, md's VXLAN overlay and md's native routing
    //     between containers on two hosts, rotated likewise.
    for rep in (0..plan.reps).filter(|_| wanted("hosts")) {
        for i in 0..3 {
            let which = (i + rep) % 3;
            let what = ["plain", "md vxlan", "md native"][which];
            eprintln!("bench: across hosts round {}/{} {what}", rep + 1, plan.reps);
            attempt(r, &format!("across hosts {what} round {}", rep + 1), |r| {
                hosts::round(plan, env, r, rep, which)
            })?;
        }
    }
    // 2. Scaling: published ports and policy rules. The datapaths of one scenario stay up
    //    side by side (separate labs) and are measured in turns, again against drift.
    let extras: Vec<Extra> = plan
        .port_scales
        .iter()
        .map(|&n| Extra::Ports(n))
        .chain(plan.policy_scales.iter().map(|&n| Extra::Policies(n)))
        .filter(|_| wanted("scaling"))
        .collect();
    for extra in extras {
        let sc = extra.scenario();
        let mut up: Vec<Setup> = Vec::new();
        for dp in all
            .iter()
            .copied()
            .filter(|&d| datapaths::supports(d, extra))
        {
            eprintln!("bench: scaling {} {sc}: setting up", dp.name());
            attempt(r, &format!("{} {sc} setup", dp.name()), |r| {
                let s = datapaths::build(dp, env, extra)?;
                if let Some(t) = s.install_secs {
                    r.add(dp.name(), &sc, "install time", t, "s", 0);
                    if extra == Extra::Ports(plan.port_scales[0])
                        || extra == Extra::Policies(plan.policy_scales[0])
                    {
                        r.note(format!(
                            "{} {sc}: installed with {}",
                            dp.name(),
                            s.install_how
                        ));
                    }
                }
                if let Extra::Policies(_) = extra {
                    for i in 0..5 {
                        let t = datapaths::add_one_rule(&s, i)?;
                        r.add(dp.name(), &sc, "add one more rule", t * 1e3, "ms", i);
                    }
                }
                up.push(s);
                Ok(())
            })?;
        }
        for rep in 0..plan.reps {
            for i in 0..up.len() {
                let s = &up[(i + rep) % up.len()];
                let dp = s.dp.name();
                attempt(r, &format!("{dp} {sc} round {}", rep + 1), |r| {
                    let o = &s.lab.outside.path;
                    let rr = client(env, o, "rr", s.echo, plan.scale_secs)?;
                    r.add(dp, &sc, "rr p50", rr.p50_us, "µs", rep);
                    r.add(dp, &sc, "rr p99", rr.p99_us, "µs", rep);
                    let crr = client(env, o, "crr", s.echo, plan.scale_secs)?;
                    r.add(dp, &sc, "new connections", crr.rate, "conn/s", rep);
                    Ok(())
                })?;
            }
        }
    }
    if !all.contains(&Dp::Md) {
        return Ok(());
    }
    // 3. Control plane.
    if !wanted("control") {
        return bpf_section(plan, env, r);
    }
    for rep in 0..plan.reps {
        attempt(r, &format!("md control plane round {}", rep + 1), |r| {
            control_md(env, r, rep)
        })?;
        if let NetavarkMode::Binary(bin) = &env.netavark {
            attempt(
                r,
                &format!("netavark control plane round {}", rep + 1),
                |r| control_netavark(env, bin, r, rep),
            )?;
        }
    }
    attempt(r, "md control plane at scale", |r| {
        control_md_many(env, r, plan.containers)
    })?;
    bpf_section(plan, env, r)
}

/// 4. Where md's time goes: per-program BPF run time.
fn bpf_section(plan: &Plan, env: &Env, r: &mut Results) -> Result<()> {
    if wanted("bpf") {
        attempt(r, "md BPF run-time stats", |r| bpf_cost(plan, env, r))?;
    }
    Ok(())
}

/// What `bench-tool rr|crr` reports.
struct Client {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    n: f64,
}

fn client(
    env: &Env,
    ns: &Path,
    kind: &str,
    addr: std::net::SocketAddr,
    secs: f64,
) -> Result<Client> {
    let a = addr.to_string();
    let s = format!("{secs}");
    let args = env.tool_args(&[kind, "--addr", &a, "--secs", &s]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok(
        &mut in_ns(ns, &env.tool, &refs),
        Duration::from_secs_f64(secs + 30.0),
    )?;
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .with_context(|| format!("bench-tool {kind} printed {out:?}"))?;
    let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {v}"));
    Ok(Client {
        rate: f("rate")?,
        p50_us: f("p50_us")?,
        p99_us: f("p99_us")?,
        n: f("n")?,
    })
}

/// iperf3 from `ns` to `addr`; receiver-side Gbit/s.
fn iperf(env: &Env, ns: &Path, addr: std::net::SocketAddr, secs: u32) -> Result<f64> {
    let ip = addr.ip().to_string();
    let port = addr.port().to_string();
    let t = secs.to_string();
    let cpu = env.cpu.map(|c| c.to_string());
    let mut args = vec!["-c", &ip, "-p", &port, "-t", &t, "-J"];
    if let Some(c) = &cpu {
        args.extend(["-A", c]);
    }
    let mut last = None;
    // The server handles one test at a time; a rare "server busy" gets one retry.
    for _ in 0..2 {
        let out = sys::run_timeout(
            &mut in_ns(ns, "iperf3", &args),
            Duration::from_secs(secs as u64 + 30),
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            if out.status.success() {
                return Ok(bps / 1e9);
            }
        }
        last = Some(format!(
            "iperf3 -c {addr}: {} {}",
            v["error"].as_str().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("{}", last.unwrap_or_default())
}

/// The base rounds over IPv6, for the datapaths that have it.
fn ipv6_rounds(plan: &Plan, env: &Env, r: &mut Results) -> Result<()> {
    let v6: Vec<Dp> = ALL
        .into_iter()
        .filter(|&d| datapaths::supports(d, Extra::Ipv6))
        .collect();
    for rep in 0..plan.reps {
        for i in 0..v6.len() {
            let dp = v6[(i + rep) % v6.len()];
            eprintln!("bench: IPv6 round {}/{} {}", rep + 1, plan.reps, dp.name());
            attempt(r, &format!("{} IPv6 round {}", dp.name(), rep + 1), |r| {
                let s = datapaths::build(dp, env, Extra::Ipv6)?;
                measure_base(plan, env, &s, r, rep, Extra::Ipv6)
            })?;
        }
    }
    Ok(())
}

fn measure_base(
    plan: &Plan,
    env: &Env,
    s: &Setup,
    r: &mut Results,
    rep: usize,
    extra: Extra,
) -> Result<()> {
    let dp = s.dp.name();
    let o = s.lab.outside.path.as_path();
    let sc = &extra.scenario();
    let g = iperf(env, o, s.iperf, plan.iperf_secs)?;
    r.add(
        dp,
        sc,
        "throughput outside → published port",
        g,
        "Gbit/s",
        rep,
    );
    check_interrupt()?;
    let g = iperf(env, &s.c1.path, s.outside_iperf, plan.iperf_secs)?;
    r.add(dp, sc, "throughput container → outside", g, "Gbit/s", rep);
    check_interrupt()?;
    let rr = client(env, o, "rr", s.echo, plan.rr_secs)?;
    r.add(dp, sc, "request/response rate", rr.rate, "req/s", rep);
    r.add(dp, sc, "rr p50", rr.p50_us, "µs", rep);
    r.add(dp, sc, "rr p99", rr.p99_us, "µs", rep);
    check_interrupt()?;
    let crr = client(env, o, "crr", s.echo, plan.crr_secs)?;
    r.add(dp, sc, "new connections", crr.rate, "conn/s", rep);
    r.add(dp, sc, "connection p50", crr.p50_us, "µs", rep);
    check_interrupt()?;
    // East-west: container to container over the bridge (md's veth programs, no NAT).
    let c2c = std::net::SocketAddr::new(s.c1_ip.parse()?, ECHO_PORT);
    let rr = client(env, &s.c2.path, "rr", c2c, plan.rr_secs)?;
    r.add(dp, sc, "container → container rr p50", rr.p50_us, "µs", rep);
    Ok(())
}

/// A probe started before the change; returns (probe, t0) with t0 taken after it is ready.
fn start_probe(lab: &mut Lab, ns: &Path, env: &Env, args: &[&str]) -> Result<Bg> {
    let log = lab.log("probe");
    let mut full = vec!["bench-tool"];
    full.extend_from_slice(args);
    let mut p = Bg::spawn(&mut in_ns(ns, &env.tool, &full), &log, true)?;
    let line = p.read_line()?;
    if line != "ready" {
        bail!("probe said {line:?}");
    }
    Ok(p)
}

fn probe_result(p: Bg, key: &str) -> Result<u64> {
    let (st, out) = p.finish(Duration::from_secs(30))?;
    if !st.success() {
        bail!("probe failed ({st}): {out}");
    }
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .with_context(|| format!("probe printed {out:?}"))?;
    v[key].as_u64().with_context(|| format!("no {key} in {v}"))
}

fn ms(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e6
}

/// md's datapath loaded at boot: `md-user watch` (md-watch.service) loads and attaches it
/// before any container; returns how long that took (until the uplink is covered).
fn preload_md(lab: &mut Lab) -> Result<f64> {
    let links = lab.md.as_ref().context("md lab")?.pin_dir.join("links");
    let t0 = mono_ns();
    lab.spawn_md(&["watch"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let covered = std::fs::read_dir(&links)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("if"))
                    .count()
            })
            .unwrap_or(0);
        if covered >= 2 {
            return Ok(ms(t0, mono_ns()));
        }
        if std::time::Instant::now() > deadline {
            bail!("md-user watch did not load the datapath within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `md-user run -d -p PORT:ECHO NAME -- bench-tool serve`: (ms until the port answers from
/// outside, ms until run -d returned).
fn md_run_answered(lab: &mut Lab, env: &Env, name: &str, port: u16) -> Result<(f64, f64)> {
    let tool = env.tool.to_string_lossy().into_owned();
    let echo = ECHO_PORT.to_string();
    let target = format!("{HOST_IP}:{port}");
    let o = lab.outside.path.clone();
    let probe = start_probe(lab, &o, env, &["wait-ok", "--addr", &target])?;
    let publish = format!("{port}:{ECHO_PORT}");
    let t0 = mono_ns();
    lab.md(&[
        "run",
        "-d",
        "--name",
        name,
        "-p",
        &publish,
        "--",
        &tool,
        "bench-tool",
        "serve",
        "--echo",
        &echo,
    ])?;
    let t_ret = mono_ns();
    let ok = probe_result(probe, "ok_ns")?;
    Ok((ms(t0, ok), ms(t0, t_ret)))
}

/// md with `n - 1` containers already running: `run -d` of the n-th (how the control plane
/// scales with the containers a host has).
fn control_md_many(env: &Env, r: &mut Results, n: usize) -> Result<()> {
    let mut lab = Lab::new("md control plane at scale")?;
    lab.enable_md(&env.md_bin);
    preload_md(&mut lab)?;
    for i in 1..n {
        lab.md(&[
            "run",
            "-d",
            "--name",
            &format!("s{i}"),
            "--",
            "sleep",
            "infinity",
        ])?;
    }
    let (answered, returned) = md_run_answered(&mut lab, env, "last", 9000)?;
    let sc = "control plane";
    let ord = thousands_ord(n);
    r.add(
        "md",
        sc,
        &format!("run -d → answered ({ord} container)"),
        answered,
        "ms",
        0,
    );
    r.add(
        "md",
        sc,
        &format!("run -d returns ({ord} container)"),
        returned,
        "ms",
        0,
    );
    Ok(())
}

fn thousands_ord(n: usize) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    let suffix = match (n % 10, n % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    out + suffix
}

/// md: the datapath loaded at boot (md-user watch), `run -d` → first answer from outside
/// (first container, and a later one), and `policy deny` → first refused connection.
fn control_md(env: &Env, r: &mut Results, rep: usize) -> Result<()> {
    let mut lab = Lab::new("md control plane")?;
    lab.enable_md(&env.md_bin);
    let sc = "control plane";
    let boot = preload_md(&mut lab)?;
    r.add(
        "md",
        sc,
        "datapath load at boot (md-user watch)",
        boot,
        "ms",
        rep,
    );
    for (name, port, metric) in [
        ("a", 9000u16, "first container"),
        ("b", 9001, "next container"),
    ] {
        let (answered, returned) = md_run_answered(&mut lab, env, name, port)?;
        r.add(
            "md",
            sc,
            &format!("run -d → answered ({metric})"),
            answered,
            "ms",
            rep,
        );
        r.add(
            "md",
            sc,
            &format!("run -d returns ({metric})"),
            returned,
            "ms",
            rep,
        );
    }
    let (a_ns, _) = lab.md_container("a")?;
    let (_, b_ip) = lab.md_container("b")?;
    let target = format!("{b_ip}:{ECHO_PORT}");
    let probe = start_probe(&mut lab, &a_ns.path, env, &["wait-fail", "--addr", &target])?;
    let t0 = mono_ns();
    lab.md(&["policy", "deny", "a", "b"])?;
    let t_ret = mono_ns();
    let fail = probe_result(probe, "fail_ns")?;
    r.add("md", sc, "policy deny → refused", ms(t0, fail), "ms", rep);
    r.add("md", sc, "policy deny returns", ms(t0, t_ret), "ms", rep);
    Ok(())
}

/// netavark: netns + server + `netavark setup` → first answer from outside.
fn control_netavark(env: &Env, bin: &Path, r: &mut Results, rep: usize) -> Result<()> {
    let mut lab = Lab::new("netavark control plane")?;
    let target = format!("{HOST_IP}:9000");
    let o = lab.outside.path.clone();
    let probe = start_probe(&mut lab, &o, env, &["wait-ok", "--addr", &target])?;
    let t0 = mono_ns();
    let t_ret = datapaths::netavark_control_container(&mut lab, env, bin, 9000)?;
    let ok = probe_result(probe, "ok_ns")?;
    let sc = "control plane";
    r.add(
        "podman-netavark",
        sc,
        "run -d → answered (first container)",
        ms(t0, ok),
        "ms",
        rep,
    );
    r.add(
        "podman-netavark",
        sc,
        "run -d returns (first container)",
        ms(t0, t_ret),
        "ms",
        rep,
    );
    Ok(())
}

/// Per-program BPF run time (kernel.bpf_stats_enabled, restored afterwards) during an rr and
/// a crr run on md: what md's programs cost per request and per new connection.
fn bpf_cost(plan: &Plan, env: &Env, r: &mut Results) -> Result<()> {
    let s = datapaths::build(Dp::Md, env, Extra::None)?;
    let pin = s.lab.md.as_ref().context("md lab")?.pin_dir.join("progs");
    let progs: Vec<String> = std::fs::read_dir(&pin)
        .with_context(|| format!("{}", pin.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let read = || -> Result<Vec<(u64, u64)>> {
        progs
            .iter()
            .map(|p| {
                let out = run_ok(
                    util::command("bpftool")
                        .args(["-j", "prog", "show", "pinned"])
                        .arg(pin.join(p)),
                    Duration::from_secs(10),
                )?;
                let v: Value = serde_json::from_str(&out)?;
                Ok((
                    v["run_time_ns"].as_u64().unwrap_or(0),
                    v["run_cnt"].as_u64().unwrap_or(0),
                ))
            })
            .collect()
    };
    let _stats = SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    let o = s.lab.outside.path.as_path();
    let sc = "md BPF cost";
    for rep in 0..if plan.quick { 1 } else { 3 } {
        for kind in ["rr", "crr", "iperf"] {
            check_interrupt()?;
            let before = read()?;
            let t = Instant::now();
            // Operations: requests, connections; for iperf3 only the CPU share is reported.
            let ops = match kind {
                "iperf" => {
                    iperf(env, o, s.iperf, plan.iperf_secs)?;
                    None
                }
                _ => Some(client(env, o, kind, s.echo, plan.rr_secs)?.n.max(1.0)),
            };
            let wall_ns = t.elapsed().as_nanos() as f64;
            let after = read()?;
            let what = match kind {
                "rr" => "request",
                "crr" => "connection",
                _ => "iperf3 outside → published",
            };
            let mut total = 0.0;
            for (i, p) in progs.iter().enumerate() {
                let dt = after[i].0.saturating_sub(before[i].0) as f64;
                let dn = after[i].1.saturating_sub(before[i].1) as f64;
                total += dt;
                if let Some(ops) = ops {
                    // Programs not on this path (socket hooks run for every process on the
                    // machine) are left out.
                    if dn / ops >= 0.5 {
                        let m = format!("{p} per {what} ({:.0} runs)", dn / ops);
                        r.add("md", sc, &m, dt / ops, "ns", rep);
                    }
                }
            }
            match ops {
                Some(ops) => r.add(
                    "md",
                    sc,
                    &format!("all programs per {what}"),
                    total / ops,
                    "ns",
                    rep,
                ),
                None => r.add(
                    "md",
                    sc,
                    &format!("CPU in md programs during {what}"),
                    total / wall_ns * 100.0,
                    "% of a CPU",
                    rep,
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_picks_the_named_datapaths_in_bench_order() {
        assert_eq!(pick(""), ALL.to_vec());
        assert_eq!(pick("md, docker-daemon"), [Dp::DockerDaemon, Dp::Md]);
        assert!(pick("dokker").is_empty());
    }
}
