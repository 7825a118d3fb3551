//! Container to container across hosts (issue 17): two bench labs as two hosts, joined by an
//! underlay (a bridge in a namespace of its own, 198.51.100.0/24), a server container on host B
//! and a client container on host A. Compared, each built afresh per round:
//! - `plain`: hand-made bridges and containers (10.90.1.0/24 on A, 10.90.2.0/24 on B), each
//!   host routing the other's subnet via its underlay address, no md, no encapsulation;
//! - `md`: md on both hosts, an overlay network through Debian's etcd (in its own namespace on
//!   the underlay), in `tunnel` mode (VXLAN) for scenario "across hosts (vxlan)" and `native`
//!   mode (routes over the underlay) for "across hosts (native)". Plain routing is measured
//!   once per round and reported in both scenarios.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::datapaths::{Env, ECHO_PORT, IPERF_PORT};
use super::lab::{Lab, Ns};
use super::stats::Results;
use super::sys::{check_interrupt, in_ns, run_ok, run_timeout, sh};
use super::{client, iperf, Plan};

const ETCD_IP: &str = "198.51.100.2";
const STORE: &str = "etcd://198.51.100.2:2379";
const OVERLAY_SUBNET: &str = "10.91.0.0/16";
const STEP: Duration = Duration::from_secs(60);

fn underlay_ip(i: usize) -> String {
    format!("198.51.100.{}", 11 + i)
}

/// What one build measures against.
struct Pair {
    /// Host A then host B; B is dropped first (md-user down there while etcd, on A, lives).
    labs: Vec<Lab>,
    client: Ns,
    server: String,
}

/// Joins the two hosts' `ul0` through a bridge in a namespace of lab A; with `etcd`, starts
/// etcd on the underlay too.
fn underlay(labs: &mut [Lab], etcd: bool) -> Result<()> {
    let sw = labs[0].add_netns("ul")?;
    sh(&["ip", "-n", &sw.name, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &sw.name, "link", "set", "br0", "up"])?;
    let link = |ns: &str, dev: &str, port: &str, addr: &str| -> Result<()> {
        sh(&[
            "ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns",
            &sw.name,
        ])?;
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ])?;
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        sh(&[
            "ip", "-n", &sw.name, "link", "set", port, "master", "br0", "up",
        ])?;
        Ok(())
    };
    for (i, l) in labs.iter().enumerate() {
        link(&l.host.name, "ul0", &format!("h{i}"), &underlay_ip(i))?;
    }
    if etcd {
        let e = labs[0].add_netns("etcd")?;
        link(&e.name, "eth0", "etcd", ETCD_IP)?;
        let client = format!("http://{ETCD_IP}:2379");
        let peer = format!("http://{ETCD_IP}:2380");
        let data = labs[0].dir.join("etcd").to_string_lossy().into_owned();
        let cluster = format!("b={peer}");
        labs[0].spawn(
            &e,
            Path::new("etcd"),
            &[
                "--name",
                "b",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
            ],
        )?;
        let endpoint = format!("--endpoints={client}");
        for _ in 0..100 {
            let out = run_timeout(
                &mut in_ns(&e.path, "etcdctl", &[&endpoint, "endpoint", "health"]),
                Duration::from_secs(10),
            )?;
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        anyhow::bail!("etcd did not start on the bench underlay");
    }
    Ok(())
}

/// Plain routing: a bridge and a container per host, each host routing the other's subnet.
fn plain(env: &Env) -> Result<Pair> {
    let mut labs = vec![Lab::new("hosts plain A")?, Lab::new("hosts plain B")?];
    underlay(&mut labs, false)?;
    let mut ns = Vec::new();
    for (i, l) in labs.iter_mut().enumerate() {
        let n = i + 1;
        let h = l.host.name.clone();
        sh(&["ip", "-n", &h, "link", "add", "br-pl", "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            &h,
            "addr",
            "add",
            &format!("10.90.{n}.1/24"),
            "dev",
            "br-pl",
        ])?;
        sh(&["ip", "-n", &h, "link", "set", "br-pl", "up"])?;
        let c = l.add_netns("pc")?;
        sh(&[
            "ip", "-n", &h, "link", "add", "vb-pc", "type", "veth", "peer", "name", "eth0",
            "netns", &c.name,
        ])?;
        sh(&[
            "ip", "-n", &h, "link", "set", "vb-pc", "master", "br-pl", "up",
        ])?;
        sh(&[
            "ip",
            "-n",
            &c.name,
            "addr",
            "add",
            &format!("10.90.{n}.2/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &c.name, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &c.name,
            "route",
            "add",
            "default",
            "via",
            &format!("10.90.{n}.1"),
        ])?;
        let other = 3 - n;
        sh(&[
            "ip",
            "-n",
            &h,
            "route",
            "add",
            &format!("10.90.{other}.0/24"),
            "via",
            &underlay_ip(other - 1),
        ])?;
        ns.push(c);
    }
    let serve = serve_args(env);
    let refs: Vec<&str> = serve.iter().map(String::as_str).collect();
    let server_ns = ns[1].clone();
    labs[1].spawn(&server_ns, &env.tool, &refs)?;
    Ok(Pair {
        labs,
        client: ns[0].clone(),
        server: "10.90.2.2".into(),
    })
}

fn serve_args(env: &Env) -> Vec<String> {
    let (e, i) = (ECHO_PORT.to_string(), IPERF_PORT.to_string());
    env.tool_args(&["serve", "--echo", &e, "--iperf", &i])
}

/// md on both hosts, one overlay network in `mode`.
fn md(env: &Env, mode: &str) -> Result<Pair> {
    let mut labs = vec![
        Lab::new(&format!("hosts md {mode} A"))?,
        Lab::new(&format!("hosts md {mode} B"))?,
    ];
    underlay(&mut labs, true)?;
    for l in labs.iter_mut() {
        l.enable_md(&env.md_bin);
    }
    let run = |l: &Lab, args: &[&str]| -> Result<String> {
        let mut c = l.md_cmd(args);
        c.env("MD_STORE", STORE);
        run_ok(&mut c, STEP)
    };
    for l in &labs {
        run(
            l,
            &[
                "network",
                "create",
                "ov",
                "--driver",
                "overlay",
                "--mode",
                mode,
                "--subnet",
                OVERLAY_SUBNET,
            ],
        )?;
    }
    let tool = env.tool.to_string_lossy().into_owned();
    let serve = serve_args(env);
    let mut srv = vec![
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "ov",
        "--",
        tool.as_str(),
    ];
    srv.extend(serve.iter().map(String::as_str));
    run(&labs[1], &srv)?;
    run(
        &labs[0],
        &[
            "run",
            "-d",
            "--name",
            "cli",
            "--network",
            "ov",
            "--",
            "sleep",
            "infinity",
        ],
    )?;
    let (_, server) = labs[1].md_container("srv")?;
    let (client, _) = labs[0].md_container("cli")?;
    Ok(Pair {
        labs,
        client,
        server,
    })
}

fn addr(ip: &str, port: u16) -> Result<SocketAddr> {
    format!("{ip}:{port}").parse().context("address")
}

/// Waits until the server answers the client through the datapath (md: once the watcher
/// installed the other host's container).
fn wait_ready(p: &Pair, env: &Env) -> Result<()> {
    for (port, only_connect) in [(ECHO_PORT, false), (IPERF_PORT, true)] {
        let a = addr(&p.server, port)?.to_string();
        let mut args = vec![
            "bench-tool",
            "wait-ok",
            "--addr",
            &a,
            "--timeout-ms",
            "20000",
        ];
        if only_connect {
            args.push("--connect-only");
        }
        run_ok(
            &mut in_ns(&p.client.path, &env.tool, &args),
            Duration::from_secs(40),
        )
        .with_context(|| format!("waiting for {a} across hosts"))?;
    }
    Ok(())
}

fn measure_pair(
    plan: &Plan,
    env: &Env,
    p: &Pair,
    r: &mut Results,
    dp: &str,
    scenarios: &[&str],
    rep: usize,
) -> Result<()> {
    wait_ready(p, env)?;
    let c = p.client.path.as_path();
    let g = iperf(env, c, addr(&p.server, IPERF_PORT)?, plan.iperf_secs)?;
    check_interrupt()?;
    let rr = client(env, c, "rr", addr(&p.server, ECHO_PORT)?, plan.rr_secs)?;
    check_interrupt()?;
    let crr = client(env, c, "crr", addr(&p.server, ECHO_PORT)?, plan.crr_secs)?;
    for sc in scenarios {
        r.add(dp, sc, "throughput container → container", g, "Gbit/s", rep);
        r.add(dp, sc, "request/response rate", rr.rate, "req/s", rep);
        r.add(dp, sc, "rr p50", rr.p50_us, "µs", rep);
        r.add(dp, sc, "rr p99", rr.p99_us, "µs", rep);
        r.add(dp, sc, "new connections", crr.rate, "conn/s", rep);
        r.add(dp, sc, "connection p50", crr.p50_us, "µs", rep);
    }
    Ok(())
}

pub const VXLAN: &str = "across hosts (vxlan)";
pub const NATIVE: &str = "across hosts (native)";

/// One round: plain routing, md's VXLAN overlay, md's native routing, in a rotated order.
pub fn round(plan: &Plan, env: &Env, r: &mut Results, rep: usize, which: usize) -> Result<()> {
    match which {
        0 => {
            let p = plain(env)?;
            measure_pair(plan, env, &p, r, "plain", &[VXLAN, NATIVE], rep)?;
            drop_pair(p);
        }
        1 => {
            let p = md(env, "tunnel")?;
            measure_pair(plan, env, &p, r, "md", &[VXLAN], rep)?;
            drop_pair(p);
        }
        _ => {
            let p = md(env, "native")?;
            measure_pair(plan, env, &p, r, "md", &[NATIVE], rep)?;
            drop_pair(p);
        }
    }
    Ok(())
}

/// Host B first: its `md-user down` revokes its lease while etcd (on A) still answers.
fn drop_pair(mut p: Pair) {
    while let Some(l) = p.labs.pop() {
        drop(l);
    }
}
