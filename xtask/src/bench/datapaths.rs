//! The four datapaths, each built on a fresh lab with the same topology: a server container
//! `c1` (echo on 7000, iperf3 on 5201), a second container `c2`, and for the port-scaling runs
//! a helper container `c3` that publishes N more ports.
//!
//! - plain: routing only, no NAT; the outside reaches the containers' subnet through the host.
//! - docker-iptables: the rules Docker Engine 28 writes for a user-defined bridge (raw, nat and
//!   filter tables, DOCKER-USER/DOCKER-FORWARD/DOCKER-CT/DOCKER-BRIDGE/DOCKER chains), loaded
//!   with iptables-restore into the lab's host namespace only.
//! - podman-netavark: netavark 2.x itself, `setup`/`teardown` with NETAVARK_FW=nftables, run in
//!   the lab's host namespace; or, when no netavark binary is at hand, the nftables ruleset it
//!   writes (same tables, chains and rule order), on hand-made containers.
//! - cni-reference: the reference CNI plugins from Debian's containernetworking-plugins, the
//!   stack kubenet-style Kubernetes nodes run (bridge + host-local IPAM + portmap, iptables),
//!   called through the CNI protocol as a runtime does, in the lab's host namespace.
//! - docker-daemon: Debian's Docker 20.10 daemon itself, in the lab's host namespace (and a
//!   mount namespace of its own): its bridge driver makes the bridge and veths and writes its
//!   iptables rules (`--userland-proxy=false`: published ports are DNAT rules only); the
//!   containers are `docker run` busybox containers whose network namespaces the servers run in.
//! - md: `md-user run -d -p ...` in the host namespace.
//! - docker-md: the same Docker daemon with `--iptables=false` and md as its network and IPAM
//!   driver (`md-user docker-plugin`): md's datapath as a Docker user gets it.
//!
//! The IPv6 scenario ([`Extra::Ipv6`]) makes the lab dual-stack (uplink 2001:db8::/64,
//! containers fd00:88::/64) and measures over IPv6 what the base measures over IPv4: plain
//! routing, Docker's ip6tables rules (NAT66 and DNAT, as Docker 27+ writes them beside the
//! IPv4 ones), netavark's dual-stack network, md with its default network dual-stack.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::lab::{
    Lab, Ns, BRIDGE, DOCKER_IMAGE, GATEWAY, GATEWAY6, HOST_IP, HOST_IP6, OUTSIDE_IP, OUTSIDE_IP6,
    SUBNET, SUBNET6,
};
use super::sys::{in_ns, run_ok, sh};

/// Container-side ports of the server, and the host ports they are published on.
pub const ECHO_PORT: u16 = 7000;
pub const ECHO_PUBLISHED: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// iperf3 server in the outside namespace (container → outside).
pub const OUTSIDE_IPERF_PORT: u16 = 5202;
/// First host port of the helper's N extra published ports.
pub const EXTRA_PORTS_BASE: u16 = 20000;

const C1_IP: &str = "10.88.0.2";
const C2_IP: &str = "10.88.0.3";
const C3_IP: &str = "10.88.0.4";
const C1_IP6: &str = "fd00:88::2";
const C2_IP6: &str = "fd00:88::3";
const NETAVARK_NET_ID: &str = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dp {
    Plain,
    Docker,
    Netavark,
    CniRef,
    /// md in its default (fastest) datapath mode, redirect.
    Md,
    /// md with `--datapath stack`.
    MdStack,
    /// Debian's Docker 20.10 daemon itself, with its bridge driver and iptables.
    DockerDaemon,
    /// The same daemon with `--iptables=false` and md as its network driver (`md-user
    /// docker-plugin`, redirect mode): what a Docker user gets from md.
    DockerMd,
}

pub const ALL: [Dp; 8] = [
    Dp::Plain,
    Dp::Docker,
    Dp::DockerDaemon,
    Dp::Netavark,
    Dp::CniRef,
    Dp::Md,
    Dp::MdStack,
    Dp::DockerMd,
];

impl Dp {
    pub fn name(self) -> &'static str {
        match self {
            Dp::Plain => "plain",
            Dp::Docker => "docker-iptables",
            Dp::Netavark => "podman-netavark",
            Dp::CniRef => "cni-reference",
            Dp::Md => "md",
            Dp::MdStack => "md-stack",
            Dp::DockerDaemon => "docker-daemon",
            Dp::DockerMd => "docker-md",
        }
    }

    pub fn is_md(self) -> bool {
        matches!(self, Dp::Md | Dp::MdStack)
    }
}

/// What the scaling runs add on top of the base setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    None,
    /// N more published ports (to the helper container c3).
    Ports(usize),
    /// N inter-container policy rules between addresses/names that carry no measured traffic.
    Policies(usize),
    /// The base over IPv6: a dual-stack lab and network, every measurement to IPv6 addresses.
    Ipv6,
}

impl Extra {
    pub fn scenario(self) -> String {
        match self {
            Extra::None => "base".into(),
            Extra::Ports(n) => format!("{} ports", thousands(n)),
            Extra::Policies(n) => format!("{} policies", thousands(n)),
            Extra::Ipv6 => "IPv6".into(),
        }
    }
}

fn thousands(n: usize) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How podman-netavark is run.
#[derive(Clone, Debug)]
pub enum NetavarkMode {
    Binary(PathBuf),
    /// No binary: the nftables ruleset netavark 2.1 writes, loaded with `nft -f`.
    Rules,
}

pub struct Env {
    pub tool: PathBuf,
    pub md_bin: PathBuf,
    pub netavark: NetavarkMode,
    /// The CPU every server and load generator is pinned to (None: unpinned).
    pub cpu: Option<usize>,
    /// What md-user was built from.
    pub md_rev: String,
}

impl Env {
    /// `bench-tool [--cpu N] args...`
    pub fn tool_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec!["bench-tool".to_string()];
        if let Some(c) = self.cpu {
            v.extend(["--cpu".to_string(), c.to_string()]);
        }
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }
}

/// A datapath ready to measure.
pub struct Setup {
    pub dp: Dp,
    pub lab: Lab,
    pub c1: Ns,
    pub c2: Ns,
    pub c1_ip: String,
    /// What the outside connects to: the published port (the container itself for plain).
    pub echo: SocketAddr,
    pub iperf: SocketAddr,
    /// Where containers send to: the outside namespace's iperf3 server.
    pub outside_iperf: SocketAddr,
    /// Seconds to install the extra ports/rules (None when nothing extra), and how.
    pub install_secs: Option<f64>,
    pub install_how: &'static str,
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("valid address"), port)
}

pub fn supports(dp: Dp, extra: Extra) -> bool {
    match extra {
        Extra::None => true,
        // portmap took 106 s to install 1,000 ports here: 10,000 would take longer than the
        // rest of the bench together.
        // md's stack mode is measured at the base; scaling is about the default mode.
        // Docker 20.10 runs iptables several times per port: 10,000 would take minutes too.
        Extra::Ports(n) => {
            let too_slow = matches!(dp, Dp::CniRef | Dp::DockerDaemon | Dp::DockerMd) && n > 1_000;
            !(matches!(dp, Dp::Plain | Dp::MdStack) || too_slow)
        }
        // Neither plain routing nor netavark has inter-container policy.
        Extra::Policies(_) => matches!(dp, Dp::Docker | Dp::Md),
        // The reference CNI stack is IPv4-only here as md's CNI plugin is; md's stack mode
        // is measured at the base.
        Extra::Ipv6 => matches!(dp, Dp::Plain | Dp::Docker | Dp::Netavark | Dp::Md),
    }
}

pub fn build(dp: Dp, env: &Env, extra: Extra) -> Result<Setup> {
    let mut lab = Lab::new(&format!("{} {}", dp.name(), extra.scenario()))?;
    let v6 = extra == Extra::Ipv6;
    if v6 {
        lab.enable_ipv6()?;
    }
    let tool = env.tool.to_string_lossy().into_owned();
    let outside = lab.outside.clone();
    let mut iperf_s = vec![
        "-s".to_string(),
        "-p".into(),
        OUTSIDE_IPERF_PORT.to_string(),
    ];
    if let Some(cpu) = env.cpu {
        iperf_s.extend(["-A".into(), cpu.to_string()]);
    }
    let iperf_refs: Vec<&str> = iperf_s.iter().map(String::as_str).collect();
    lab.spawn(&outside, Path::new("iperf3"), &iperf_refs)?;
    let host_ip = if v6 { HOST_IP6 } else { HOST_IP };
    let published = |ip: &str| (addr(ip, ECHO_PUBLISHED), addr(ip, IPERF_PORT));
    let (echo_s, iperf_p) = (ECHO_PORT.to_string(), IPERF_PORT.to_string());
    let serve_c1 = env.tool_args(&["serve", "--echo", &echo_s, "--iperf", &iperf_p]);
    let serve_c2 = env.tool_args(&["serve", "--echo", &echo_s]);
    let c1_refs: Vec<&str> = serve_c1.iter().map(String::as_str).collect();
    let c2_refs: Vec<&str> = serve_c2.iter().map(String::as_str).collect();
    let mut install_secs = None;
    let mut install_how = match (dp, extra) {
        (Dp::Docker, Extra::Ipv6) => "iptables-restore and ip6tables-restore",
        (Dp::Docker, _) => "one iptables-restore",
        (Dp::Netavark, _) => "netavark setup of the helper container",
        (Dp::CniRef, _) => "CNI ADD (bridge, portmap) of the helper container",
        (Dp::DockerDaemon | Dp::DockerMd, _) => "docker run -d -p RANGE of the helper container",
        (Dp::Md, Extra::Ports(_)) => "md-user run -d -p RANGE of the helper container",
        _ => "",
    };

    let (c1, c2, c1_ip, echo, iperf) = match dp {
        Dp::Plain | Dp::Docker => {
            lab.add_bridge()?;
            let c2 = lab.add_container("c2", C2_IP)?;
            if let Extra::Ports(_) = extra {
                lab.add_container("c3", C3_IP)?;
            }
            let c1 = lab.add_container("c1", C1_IP)?;
            if v6 {
                lab.add_bridge_ip6()?;
                lab.add_container_ip6(&c1, C1_IP6)?;
                lab.add_container_ip6(&c2, C2_IP6)?;
            }
            let c1_ip = if v6 { C1_IP6 } else { C1_IP };
            if dp == Dp::Plain {
                let o = lab.outside.name.clone();
                sh(&["ip", "-n", &o, "route", "add", SUBNET, "via", HOST_IP])?;
                if v6 {
                    sh(&[
                        "ip", "-n", &o, "-6", "route", "add", SUBNET6, "via", HOST_IP6,
                    ])?;
                }
                (
                    c1,
                    c2,
                    c1_ip.to_string(),
                    addr(c1_ip, ECHO_PORT),
                    addr(c1_ip, IPERF_PORT),
                )
            } else {
                let t = Instant::now();
                restore(&lab, "iptables-restore", &docker_rules(extra))?;
                if v6 {
                    restore(&lab, "ip6tables-restore", &docker_rules6())?;
                }
                if !matches!(extra, Extra::None | Extra::Ipv6) {
                    install_secs = Some(t.elapsed().as_secs_f64());
                }
                let (e, i) = published(host_ip);
                (c1, c2, c1_ip.to_string(), e, i)
            }
        }
        Dp::Netavark => {
            let (c1, c2) = netavark_setup(&mut lab, &env.netavark, extra, &mut install_secs)?;
            let (e, i) = published(host_ip);
            let c1_ip = if v6 { C1_IP6 } else { C1_IP };
            (c1, c2, c1_ip.to_string(), e, i)
        }
        Dp::CniRef => {
            let (c1, c2) = cni_reference_setup(&mut lab, extra, &mut install_secs)?;
            let (e, i) = published(HOST_IP);
            (c1, c2, C1_IP.to_string(), e, i)
        }
        Dp::DockerDaemon | Dp::DockerMd => {
            if dp == Dp::DockerMd {
                lab.enable_md_mode(&env.md_bin, Some("redirect"));
            }
            let (c1, c2) = docker_daemon_setup(&mut lab, dp, extra, &mut install_secs)?;
            let (e, i) = published(HOST_IP);
            (c1, c2, C1_IP.to_string(), e, i)
        }
        Dp::Md | Dp::MdStack => {
            lab.enable_md_with(
                &env.md_bin,
                Some(if dp == Dp::Md { "redirect" } else { "stack" }),
                v6.then_some(SUBNET6),
            );
            let mut c2_args = vec!["run", "-d", "--name", "c2", "--", tool.as_str()];
            c2_args.extend_from_slice(&c2_refs);
            lab.md(&c2_args)?;
            match extra {
                Extra::Ports(n) => {
                    let spec = format!(
                        "{a}-{b}:{a}-{b}",
                        a = EXTRA_PORTS_BASE,
                        b = EXTRA_PORTS_BASE as usize + n - 1
                    );
                    let t = Instant::now();
                    lab.md(&[
                        "run", "-d", "--name", "c3", "-p", &spec, "--", "sleep", "infinity",
                    ])?;
                    install_secs = Some(t.elapsed().as_secs_f64());
                }
                Extra::Policies(n) => {
                    let t = Instant::now();
                    install_how = md_policies(&lab, n)?;
                    install_secs = Some(t.elapsed().as_secs_f64());
                }
                Extra::None | Extra::Ipv6 => {}
            }
            let p1 = format!("{ECHO_PUBLISHED}:{ECHO_PORT}");
            let p2 = format!("{IPERF_PORT}:{IPERF_PORT}");
            let mut c1_args = vec![
                "run",
                "-d",
                "--name",
                "c1",
                "-p",
                &p1,
                "-p",
                &p2,
                "--",
                tool.as_str(),
            ];
            c1_args.extend_from_slice(&c1_refs);
            lab.md(&c1_args)?;
            let (c1, mut ip) = lab.md_container("c1")?;
            let (c2, _) = lab.md_container("c2")?;
            if v6 {
                ip = lab.md_ip6("c1")?;
            }
            let (e, i) = published(host_ip);
            (c1, c2, ip, e, i)
        }
    };
    if !dp.is_md() {
        lab.spawn(&c1, &env.tool, &c1_refs)?;
        lab.spawn(&c2, &env.tool, &c2_refs)?;
    }
    let setup = Setup {
        dp,
        lab,
        c1,
        c2,
        c1_ip,
        echo,
        iperf,
        outside_iperf: addr(
            if v6 { OUTSIDE_IP6 } else { OUTSIDE_IP },
            OUTSIDE_IPERF_PORT,
        ),
        install_secs,
        install_how,
    };
    wait_ready(&setup, env)?;
    Ok(setup)
}

/// Docker's own datapath (docker-daemon): a user-defined bridge network (`br-bench`,
/// 10.88.0.0/16) made by dockerd's bridge driver, every rule written by Docker itself. Or
/// md's (docker-md): `-d md --ipam-driver md` on md's network of that subnet. Containers c2,
/// c3 (with the extra ports) and c1 at the addresses the others use.
fn docker_daemon_setup(
    lab: &mut Lab,
    dp: Dp,
    extra: Extra,
    install_secs: &mut Option<f64>,
) -> Result<(Ns, Ns)> {
    lab.enable_docker(dp == Dp::DockerMd)?;
    let bridge = format!("com.docker.network.bridge.name={BRIDGE}");
    let mut create = vec!["network", "create", "--subnet", SUBNET];
    if dp == Dp::DockerMd {
        create.extend(["-d", "md", "--ipam-driver", "md"]);
    } else {
        create.extend(["--gateway", GATEWAY, "-o", &bridge]);
    }
    create.push("bench");
    lab.docker(&create)?;
    let run = |lab: &Lab, name: &str, ip: &str, ports: &[String]| -> Result<()> {
        let mut a = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "bench",
            "--ip",
            ip,
        ];
        for p in ports {
            a.extend(["-p", p.as_str()]);
        }
        a.extend([DOCKER_IMAGE, "sleep", "10000000"]);
        lab.docker(&a).map(|_| ())
    };
    run(lab, "c2", C2_IP, &[])?;
    if let Extra::Ports(n) = extra {
        let spec = format!(
            "{a}-{b}:{a}-{b}",
            a = EXTRA_PORTS_BASE,
            b = EXTRA_PORTS_BASE as usize + n - 1
        );
        let t = Instant::now();
        run(lab, "c3", C3_IP, &[spec])?;
        *install_secs = Some(t.elapsed().as_secs_f64());
    }
    run(
        lab,
        "c1",
        C1_IP,
        &[
            format!("{ECHO_PUBLISHED}:{ECHO_PORT}"),
            format!("{IPERF_PORT}:{IPERF_PORT}"),
        ],
    )?;
    Ok((lab.docker_container("c1")?, lab.docker_container("c2")?))
}

/// Waits until the echo server answers through the datapath and iperf3 accepts connections.
fn wait_ready(s: &Setup, env: &Env) -> Result<()> {
    for (a, only_connect) in [(s.echo, false), (s.iperf, true)] {
        let a = a.to_string();
        let mut args = vec![
            "bench-tool",
            "wait-ok",
            "--addr",
            &a,
            "--timeout-ms",
            "15000",
        ];
        if only_connect {
            args.push("--connect-only");
        }
        run_ok(
            &mut in_ns(&s.lab.outside.path, &env.tool, &args),
            Duration::from_secs(30),
        )
        .with_context(|| format!("waiting for {a} from outside"))?;
    }
    let a = s.outside_iperf.to_string();
    run_ok(
        &mut in_ns(
            &s.lab.outside.path,
            &env.tool,
            &[
                "bench-tool",
                "wait-ok",
                "--addr",
                &a,
                "--timeout-ms",
                "15000",
                "--connect-only",
            ],
        ),
        Duration::from_secs(30),
    )
    .context("waiting for the outside iperf3 server")?;
    Ok(())
}

/// Feeds `rules` to `iptables-restore`/`nft -f -` inside the lab's host namespace.
fn restore(lab: &Lab, program: &str, rules: &str) -> Result<()> {
    let file = lab.dir.join(format!("{program}.rules"));
    std::fs::write(&file, rules)?;
    let f = file.to_string_lossy().into_owned();
    let args: Vec<&str> = if program == "nft" {
        vec!["-f", &f]
    } else {
        vec![&f]
    };
    run_ok(
        &mut in_ns(&lab.host.path, program, &args),
        Duration::from_secs(120),
    )
    .with_context(|| format!("{program} in {}", lab.host.name))?;
    Ok(())
}

/// Address of the i-th fake container in a policy rule pair (never c1/c2/c3).
fn policy_pair(i: usize) -> (String, String) {
    let ip = |base: usize| {
        let n = base + i;
        format!("10.88.{}.{}", n / 256, n % 256)
    };
    (ip(128 * 256), ip(192 * 256))
}

/// One published port as Docker programs it: DNAT in nat/DOCKER, ACCEPT in filter/DOCKER.
struct DockerPort {
    host: u16,
    ip: &'static str,
    port: u16,
}

/// The iptables-restore input Docker Engine 28 leaves behind for one user-defined bridge
/// (`br-bench`, 10.88.0.0/16) with containers c1..c3 and their published ports, containers
/// created in the order c2, c3, c1 (so c1's DNAT rules are last in nat/DOCKER, as for the
/// newest container, while its filter ACCEPTs are first: Docker appends DNATs and inserts
/// ACCEPTs at the head). Policy rules go where Docker tells users to put theirs: DOCKER-USER.
pub fn docker_rules(extra: Extra) -> String {
    docker_rules_for(extra, &V4)
}

/// The ip6tables-restore input Docker 27+ writes beside the IPv4 rules when the same bridge
/// is dual-stack (same chains; NAT66 masquerade and DNAT to the containers' IPv6 addresses).
pub fn docker_rules6() -> String {
    docker_rules_for(Extra::None, &V6)
}

/// What differs between Docker's iptables and ip6tables rules.
struct Family {
    subnet: &'static str,
    /// c1, c2, c3
    ips: [&'static str; 3],
    host_len: &'static str,
    loopback: &'static str,
    v6: bool,
}

const V4: Family = Family {
    subnet: SUBNET,
    ips: [C1_IP, C2_IP, C3_IP],
    host_len: "/32",
    loopback: "127.0.0.0/8",
    v6: false,
};

const V6: Family = Family {
    subnet: SUBNET6,
    ips: [C1_IP6, C2_IP6, "fd00:88::4"],
    host_len: "/128",
    loopback: "::1/128",
    v6: true,
};

fn docker_rules_for(extra: Extra, f: &Family) -> String {
    let [c1_ip, c2_ip, c3_ip] = f.ips;
    let hl = f.host_len;
    let mut ports: Vec<DockerPort> = Vec::new();
    let mut ctrs = vec![c2_ip];
    if let Extra::Ports(n) = extra {
        ctrs.push(c3_ip);
        for i in 0..n {
            let p = EXTRA_PORTS_BASE + i as u16;
            ports.push(DockerPort {
                host: p,
                ip: c3_ip,
                port: p,
            });
        }
    }
    ctrs.push(c1_ip);
    for (host, port) in [(ECHO_PUBLISHED, ECHO_PORT), (IPERF_PORT, IPERF_PORT)] {
        ports.push(DockerPort {
            host,
            ip: c1_ip,
            port,
        });
    }
    let br = BRIDGE;
    let mut s = String::new();
    // raw: direct routing to a container address from outside the bridge is dropped (28.0+).
    s += "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n";
    for ip in &ctrs {
        let _ = writeln!(s, "-A PREROUTING -d {ip}{hl} ! -i {br} -j DROP");
    }
    s += "COMMIT\n";
    s += "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
          :POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n";
    s += "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n";
    let _ = writeln!(
        s,
        "-A OUTPUT ! -d {} -m addrtype --dst-type LOCAL -j DOCKER",
        f.loopback
    );
    let _ = writeln!(s, "-A POSTROUTING -s {} ! -o {br} -j MASQUERADE", f.subnet);
    let _ = writeln!(s, "-A DOCKER -i {br} -j RETURN");
    for p in &ports {
        let to = if f.v6 {
            format!("[{}]:{}", p.ip, p.port)
        } else {
            format!("{}:{}", p.ip, p.port)
        };
        let _ = writeln!(
            s,
            "-A DOCKER ! -i {br} -p tcp -m tcp --dport {} -j DNAT --to-destination {to}",
            p.host
        );
    }
    s += "COMMIT\n";
    s += "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
          :DOCKER - [0:0]\n:DOCKER-BRIDGE - [0:0]\n:DOCKER-CT - [0:0]\n:DOCKER-FORWARD - [0:0]\n\
          :DOCKER-INTERNAL - [0:0]\n:DOCKER-USER - [0:0]\n";
    s += "-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-FORWARD\n";
    for p in ports.iter().rev() {
        let _ = writeln!(
            s,
            "-A DOCKER -d {}{hl} ! -i {br} -o {br} -p tcp -m tcp --dport {} -j ACCEPT",
            p.ip, p.port
        );
    }
    let _ = writeln!(s, "-A DOCKER ! -i {br} -o {br} -j DROP");
    let _ = writeln!(s, "-A DOCKER-BRIDGE -o {br} -j DOCKER");
    let _ = writeln!(
        s,
        "-A DOCKER-CT -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    s += "-A DOCKER-FORWARD -j DOCKER-CT\n-A DOCKER-FORWARD -j DOCKER-INTERNAL\n\
          -A DOCKER-FORWARD -j DOCKER-BRIDGE\n";
    let _ = writeln!(s, "-A DOCKER-FORWARD -i {br} -j ACCEPT");
    if let Extra::Policies(n) = extra {
        for i in 0..n {
            let (a, b) = policy_pair(i);
            let _ = writeln!(s, "-A DOCKER-USER -s {a}/32 -d {b}/32 -j DROP");
        }
    }
    s += "COMMIT\n";
    s
}

/// One container as netavark sees it.
struct NvCtr {
    name: &'static str,
    ip: &'static str,
    /// Its IPv6 address on a dual-stack network.
    ip6: Option<&'static str>,
    /// (host port, container port, range)
    ports: Vec<(u16, u16, u16)>,
}

fn netavark_ctrs(extra: Extra) -> Vec<NvCtr> {
    let v6 = |ip: &'static str| (extra == Extra::Ipv6).then_some(ip);
    let mut v = vec![NvCtr {
        name: "c2",
        ip: C2_IP,
        ip6: v6(C2_IP6),
        ports: vec![],
    }];
    if let Extra::Ports(n) = extra {
        v.push(NvCtr {
            name: "c3",
            ip: C3_IP,
            ip6: None,
            ports: vec![(EXTRA_PORTS_BASE, EXTRA_PORTS_BASE, n as u16)],
        });
    }
    v.push(NvCtr {
        name: "c1",
        ip: C1_IP,
        ip6: v6(C1_IP6),
        ports: vec![(ECHO_PUBLISHED, ECHO_PORT, 1), (IPERF_PORT, IPERF_PORT, 1)],
    });
    v
}

/// netavark's network options for one container on the `bench` bridge network.
fn netavark_json(c: &NvCtr) -> String {
    let id = format!(
        "{:0>64}",
        c.name
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let ports: Vec<_> = c
        .ports
        .iter()
        .map(|&(h, p, r)| {
            json!({"host_ip": "", "host_port": h, "container_port": p, "range": r, "protocol": "tcp"})
        })
        .collect();
    let mut ips = vec![c.ip];
    let mut subnets = vec![json!({"subnet": SUBNET, "gateway": GATEWAY})];
    if let Some(ip6) = c.ip6 {
        ips.push(ip6);
        subnets.push(json!({"subnet": SUBNET6, "gateway": GATEWAY6}));
    }
    json!({
        "container_id": id,
        "container_name": c.name,
        "port_mappings": ports,
        "networks": {"bench": {"static_ips": ips, "interface_name": "eth0"}},
        "network_info": {"bench": {
            "name": "bench",
            "id": NETAVARK_NET_ID,
            "driver": "bridge",
            "network_interface": BRIDGE,
            "subnets": subnets,
            "ipv6_enabled": c.ip6.is_some(),
            "internal": false,
            "dns_enabled": false,
            "ipam_options": {"driver": "host-local"}
        }}
    })
    .to_string()
}

fn netavark_setup(
    lab: &mut Lab,
    mode: &NetavarkMode,
    extra: Extra,
    install_secs: &mut Option<f64>,
) -> Result<(Ns, Ns)> {
    let ctrs = netavark_ctrs(extra);
    let mut nss = Vec::new();
    match mode {
        NetavarkMode::Binary(bin) => {
            let cfg = lab.dir.join("netavark");
            std::fs::create_dir_all(&cfg)?;
            for c in &ctrs {
                let ns = lab.add_netns(c.name)?;
                let file = lab.dir.join(format!("netavark-{}.json", c.name));
                std::fs::write(&file, netavark_json(c))?;
                let nv =
                    |verb: &str| netavark_cmd(&lab.host.path, bin, &cfg, &file, verb, &ns.path);
                let t = Instant::now();
                run_ok(&mut nv("setup"), Duration::from_secs(120))
                    .with_context(|| format!("netavark setup {}", c.name))?;
                if c.name == "c3" {
                    *install_secs = Some(t.elapsed().as_secs_f64());
                }
                lab.on_teardown(nv("teardown"));
                nss.push(ns);
            }
        }
        NetavarkMode::Rules => {
            lab.add_bridge()?;
            if extra == Extra::Ipv6 {
                lab.add_bridge_ip6()?;
            }
            for c in &ctrs {
                let ns = lab.add_container(c.name, c.ip)?;
                if let Some(ip6) = c.ip6 {
                    lab.add_container_ip6(&ns, ip6)?;
                }
                nss.push(ns);
            }
            let t = Instant::now();
            restore(lab, "nft", &netavark_nft_rules(&ctrs))?;
            if !matches!(extra, Extra::None | Extra::Ipv6) {
                *install_secs = Some(t.elapsed().as_secs_f64());
            }
        }
    }
    let c2 = nss.remove(0);
    let c1 = nss.pop().context("no c1")?;
    Ok((c1, c2))
}

/// Where Debian's containernetworking-plugins installs the reference plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The reference conflist: a bridge with host-local IPAM (its allocations in the lab), masquerade
/// and the gateway on the bridge, then portmap for published ports.
fn cni_reference_conflist(lab: &Lab) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": lab.dir.join("cni-ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// One plugin call the way libcni makes it: the plugin's entry with the list's name and
/// version, the previous plugin's result and the runtime's capability arguments on stdin.
/// One container as the runtime names it to the plugins: CNI_CONTAINERID, its namespace,
/// CNI_ARGS and its published ports (host, container).
struct CniCtr<'a> {
    id: &'a str,
    ns: &'a Ns,
    args: &'a str,
    ports: &'a [(u16, u16)],
}

fn cni_call(
    lab: &Lab,
    plugin: &serde_json::Value,
    prev: Option<&serde_json::Value>,
    verb: &str,
    c: &CniCtr,
) -> Result<std::process::Command> {
    let (id, ns, args, ports) = (c.id, c.ns, c.args, c.ports);
    let list = cni_reference_conflist(lab);
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    if plugin["capabilities"]["portMappings"] == true {
        let pm: Vec<_> = ports
            .iter()
            .map(|&(h, c)| json!({"hostPort": h, "containerPort": c, "protocol": "tcp"}))
            .collect();
        conf["runtimeConfig"] = json!({"portMappings": pm});
    }
    let ty = plugin["type"].as_str().context("plugin type")?;
    let file = lab.dir.join(format!("cni-{id}-{ty}-{verb}.json"));
    std::fs::write(&file, conf.to_string())?;
    let plugin = Path::new(CNI_PLUGIN_DIR).join(ty);
    let (plugin, file) = (plugin.to_string_lossy(), file.to_string_lossy());
    // The configuration on stdin (the bench's runner gives commands none of their own).
    let mut cmd = in_ns(
        &lab.host.path,
        "sh",
        &["-c", "exec \"$0\" < \"$1\"", &plugin, &file],
    );
    cmd.env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", &ns.path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", CNI_PLUGIN_DIR);
    Ok(cmd)
}

/// ADD of one container through the whole list (DEL in reverse order at teardown).
fn cni_reference_add(lab: &mut Lab, name: &str, ip: &str, ports: &[(u16, u16)]) -> Result<Ns> {
    let ns = lab.add_netns(name)?;
    let list = cni_reference_conflist(lab);
    let plugins = list["plugins"].as_array().context("plugins")?.clone();
    let args = format!("IgnoreUnknown=1;IP={ip}");
    let c = CniCtr {
        id: name,
        ns: &ns,
        args: &args,
        ports,
    };
    let mut prev: Option<serde_json::Value> = None;
    for p in &plugins {
        let mut add = cni_call(lab, p, prev.as_ref(), "ADD", &c)?;
        let out = run_ok(&mut add, Duration::from_secs(600))
            .with_context(|| format!("CNI ADD {} of {name}", p["type"]))?;
        prev = Some(serde_json::from_str(&out).with_context(|| format!("CNI result {out:?}"))?);
    }
    for p in plugins.iter().rev() {
        let del = cni_call(lab, p, prev.as_ref(), "DEL", &c)?;
        lab.on_teardown(del);
    }
    Ok(ns.clone())
}

fn cni_reference_setup(
    lab: &mut Lab,
    extra: Extra,
    install_secs: &mut Option<f64>,
) -> Result<(Ns, Ns)> {
    let c2 = cni_reference_add(lab, "c2", C2_IP, &[])?;
    if let Extra::Ports(n) = extra {
        let ports: Vec<(u16, u16)> = (0..n as u16)
            .map(|i| (EXTRA_PORTS_BASE + i, EXTRA_PORTS_BASE + i))
            .collect();
        let t = Instant::now();
        cni_reference_add(lab, "c3", C3_IP, &ports)?;
        *install_secs = Some(t.elapsed().as_secs_f64());
    }
    let c1 = cni_reference_add(
        lab,
        "c1",
        C1_IP,
        &[(ECHO_PUBLISHED, ECHO_PORT), (IPERF_PORT, IPERF_PORT)],
    )?;
    Ok((c1, c2))
}

/// The ruleset netavark 2.1 (nftables driver) leaves in `table inet netavark` after `setup` of
/// `ctrs` in order on one bridge network (read off `nft list ruleset` after the real thing).
fn netavark_nft_rules(ctrs: &[NvCtr]) -> String {
    let net = "nv_2f259bab_10_88_0_0_nm16";
    let net6 = "nv_2f259bab_fd00_88__nm64";
    let v6 = ctrs.iter().any(|c| c.ip6.is_some());
    let mut dnat = String::new();
    let mut hostport = String::new();
    // A dual-stack network's IPv6 half: the same rules with `ip6`, in the same chains.
    let (mut input6, mut forward6, mut post6, mut chain6) =
        (String::new(), String::new(), String::new(), String::new());
    if v6 {
        input6 =
            format!("\n    ip6 saddr {SUBNET6} meta l4proto {{ tcp, udp }} th dport 53 accept");
        forward6 = format!(
            "\n    ip6 daddr {SUBNET6} ct state established,related accept\n    ip6 saddr {SUBNET6} accept"
        );
        post6 = format!("\n    ip6 saddr {SUBNET6} jump {net6}");
        chain6 = format!(
            "  chain {net6} {{\n    ip6 daddr {SUBNET6} accept\n    ip6 daddr != ff00::/8 masquerade\n  }}\n"
        );
    }
    for c in ctrs {
        for &(h, p, r) in &c.ports {
            let dport = if r > 1 {
                format!("{h}-{}", h + r - 1)
            } else {
                h.to_string()
            };
            let _ = writeln!(hostport, "    tcp dport {dport} jump {net}_dnat");
            let _ = writeln!(
                dnat,
                "    ip saddr {SUBNET} tcp dport {dport} jump NETAVARK-HOSTPORT-SETMARK\n    \
                 ip saddr 127.0.0.1 tcp dport {dport} jump NETAVARK-HOSTPORT-SETMARK"
            );
            if c.ip6.is_some() {
                let _ = writeln!(
                    dnat,
                    "    ip6 saddr {SUBNET6} tcp dport {dport} jump NETAVARK-HOSTPORT-SETMARK\n    \
                     ip6 saddr ::1 tcp dport {dport} jump NETAVARK-HOSTPORT-SETMARK"
                );
            }
            for i in 0..r {
                let _ = writeln!(
                    dnat,
                    "    tcp dport {} ct mark set meta mark | 0x00001000 dnat ip to {}:{}",
                    h + i,
                    c.ip,
                    p + i
                );
                if let Some(ip6) = c.ip6 {
                    let _ = writeln!(
                        dnat,
                        "    tcp dport {} ct mark set meta mark | 0x00001000 dnat ip6 to [{ip6}]:{}",
                        h + i,
                        p + i
                    );
                }
            }
        }
    }
    format!(
        "table inet netavark {{
  chain INPUT {{
    type filter hook input priority filter; policy accept;
    ip saddr {SUBNET} meta l4proto {{ tcp, udp }} th dport 53 accept{input6}
  }}
  chain FORWARD {{
    type filter hook forward priority filter; policy accept;
    ct state invalid drop
    ct mark & 0x00001000 == 0x00001000 accept
    jump NETAVARK-ISOLATION-1
    ip daddr {SUBNET} ct state established,related accept
    ip saddr {SUBNET} accept{forward6}
  }}
  chain POSTROUTING {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x00002000 == 0x00002000 masquerade
    ip saddr {SUBNET} jump {net}{post6}
  }}
  chain PREROUTING {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump NETAVARK-HOSTPORT-DNAT
  }}
  chain OUTPUT {{
    type nat hook output priority -100; policy accept;
    fib daddr type local jump NETAVARK-HOSTPORT-DNAT
  }}
  chain NETAVARK-HOSTPORT-DNAT {{
{hostport}  }}
  chain NETAVARK-HOSTPORT-SETMARK {{
    meta mark set meta mark | 0x00002000
  }}
  chain NETAVARK-ISOLATION-1 {{
    iifname \"{BRIDGE}\" oifname != \"{BRIDGE}\" jump NETAVARK-ISOLATION-3
  }}
  chain NETAVARK-ISOLATION-2 {{
    oifname \"{BRIDGE}\" drop
  }}
  chain NETAVARK-ISOLATION-3 {{
    jump NETAVARK-ISOLATION-2
  }}
  chain {net} {{
    ip daddr {SUBNET} accept
    ip daddr != 224.0.0.0/4 masquerade
  }}
{chain6}  chain {net}_dnat {{
{dnat}  }}
}}
"
    )
}

/// For the control-plane timing: a new container namespace, its echo server, and
/// `netavark setup` publishing `port`; returns CLOCK_MONOTONIC when setup returned.
pub fn netavark_control_container(lab: &mut Lab, env: &Env, bin: &Path, port: u16) -> Result<u64> {
    let c = NvCtr {
        name: "a",
        ip: C1_IP,
        ip6: None,
        ports: vec![(port, ECHO_PORT, 1)],
    };
    let cfg = lab.dir.join("netavark");
    std::fs::create_dir_all(&cfg)?;
    let file = lab.dir.join("netavark-a.json");
    std::fs::write(&file, netavark_json(&c))?;
    let ns = lab.add_netns("a")?;
    let echo = ECHO_PORT.to_string();
    lab.spawn(&ns, &env.tool, &["bench-tool", "serve", "--echo", &echo])?;
    let nv = |verb: &str| netavark_cmd(&lab.host.path, bin, &cfg, &file, verb, &ns.path);
    run_ok(&mut nv("setup"), Duration::from_secs(60)).context("netavark setup")?;
    let done = super::sys::mono_ns();
    lab.on_teardown(nv("teardown"));
    Ok(done)
}

/// Policy rules `deny xI yI` for I in 0..n, names that need not run: one `md-user policy
/// import` when md-user has it (one lock, one save), else one `policy deny` per rule.
fn md_policies(lab: &Lab, n: usize) -> Result<&'static str> {
    let help = lab.md(&["policy", "--help"]).unwrap_or_default();
    if help.contains("import") {
        let file = lab.dir.join("policies.txt");
        let body: String = (0..n).map(|i| format!("deny x{i} y{i}\n")).collect();
        std::fs::write(&file, body)?;
        let f = file.to_string_lossy().into_owned();
        run_ok(
            &mut lab.md_cmd(&["policy", "import", &f]),
            Duration::from_secs(600),
        )?;
        return Ok("one md-user policy import");
    }
    for i in 0..n {
        super::sys::check_interrupt()?;
        md_deny(lab, &format!("x{i}"), &format!("y{i}"))?;
    }
    Ok("one md-user policy deny per rule")
}

fn md_deny(lab: &Lab, a: &str, b: &str) -> Result<()> {
    let out = super::sys::run_timeout(
        &mut lab.md_cmd(&["policy", "deny", a, b]),
        Duration::from_secs(60),
    )?;
    if !out.status.success() {
        bail!(
            "md-user policy deny {a} {b}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Seconds to add the i-th extra policy rule with the datapath's own one-rule command, on top
/// of what is installed: `iptables -A DOCKER-USER ...` (as a user would), `md-user policy deny`.
pub fn add_one_rule(s: &Setup, i: usize) -> Result<f64> {
    let (a, b) = policy_pair(16_000 + i);
    let t = Instant::now();
    match s.dp {
        Dp::Docker => {
            let (a, b) = (format!("{a}/32"), format!("{b}/32"));
            run_ok(
                &mut in_ns(
                    &s.lab.host.path,
                    "iptables",
                    &["-A", "DOCKER-USER", "-s", &a, "-d", &b, "-j", "DROP"],
                ),
                Duration::from_secs(120),
            )?;
        }
        Dp::Md => md_deny(&s.lab, &format!("z{i}"), &format!("w{i}"))?,
        _ => bail!("{} has no policy rules", s.dp.name()),
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `netavark --config CFG -f FILE VERB NETNS` with the nftables driver, run in the lab's host
/// namespace (netavark writes its rules into the namespace it runs in).
fn netavark_cmd(
    host_ns: &std::path::Path,
    bin: &std::path::Path,
    cfg: &std::path::Path,
    file: &std::path::Path,
    verb: &str,
    container_ns: &std::path::Path,
) -> std::process::Command {
    let mut cmd = in_ns(host_ns, bin, &[]);
    cmd.env("NETAVARK_FW", "nftables")
        .arg("--config")
        .arg(cfg)
        .arg("-f")
        .arg(file)
        .arg(verb)
        .arg(container_ns);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules_put_the_measured_dnat_last_and_its_accept_first() {
        let r = docker_rules(Extra::Ports(3));
        let nat: Vec<&str> = r.lines().filter(|l| l.contains("-j DNAT")).collect();
        assert_eq!(nat.len(), 5);
        assert!(nat[0].contains("--dport 20000 ") && nat[0].contains("10.88.0.4:20000"));
        assert!(nat[3].contains("--dport 8080 ") && nat[3].ends_with("10.88.0.2:7000"));
        let acc: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A DOCKER -d") && l.ends_with("-j ACCEPT"))
            .collect();
        assert_eq!(acc.len(), 5);
        assert!(acc[0].contains("10.88.0.2/32") && acc[0].contains("--dport 5201"));
        assert_eq!(r.matches("COMMIT").count(), 3);
        assert!(r.contains("-A POSTROUTING -s 10.88.0.0/16 ! -o br-bench -j MASQUERADE"));
        assert!(r.contains(":FORWARD DROP"));
    }

    #[test]
    fn docker_policies_go_to_docker_user_and_never_match_the_measured_containers() {
        let r = docker_rules(Extra::Policies(10_000));
        let p: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A DOCKER-USER"))
            .collect();
        assert_eq!(p.len(), 10_000);
        for ip in [C1_IP, C2_IP, C3_IP, OUTSIDE_IP] {
            assert!(!p.iter().any(|l| l.contains(&format!("{ip}/"))), "{ip}");
        }
        assert_eq!(policy_pair(0), ("10.88.128.0".into(), "10.88.192.0".into()));
        assert_eq!(policy_pair(9_999).0, "10.88.167.15");
    }

    #[test]
    fn docker_daemon_scales_as_far_as_docker_does() {
        assert!(supports(Dp::DockerDaemon, Extra::None));
        assert!(supports(Dp::DockerDaemon, Extra::Ports(1_000)));
        // Several iptables runs per port: 10,000 ports would take minutes.
        assert!(!supports(Dp::DockerDaemon, Extra::Ports(10_000)));
        // Docker has no inter-container policy of its own (DOCKER-USER is the user's).
        assert!(!supports(Dp::DockerDaemon, Extra::Policies(10)));
        assert_eq!(Dp::DockerDaemon.name(), "docker-daemon");
        // Docker with md scales as Docker does, for a like-for-like comparison.
        assert!(supports(Dp::DockerMd, Extra::Ports(1_000)));
        assert!(!supports(Dp::DockerMd, Extra::Ports(10_000)));
        assert!(!supports(Dp::DockerMd, Extra::Policies(10)));
        assert!(
            !Dp::DockerMd.is_md(),
            "its servers start in Docker's containers"
        );
    }

    #[test]
    fn scenarios_read_well() {
        assert_eq!(Extra::Ports(10_000).scenario(), "10,000 ports");
        assert_eq!(Extra::Policies(10).scenario(), "10 policies");
        assert_eq!(Extra::None.scenario(), "base");
    }

    #[test]
    fn netavark_json_and_rules_carry_every_port() {
        let ctrs = netavark_ctrs(Extra::Ports(4));
        assert_eq!(
            ctrs.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["c2", "c3", "c1"]
        );
        let v: serde_json::Value = serde_json::from_str(&netavark_json(&ctrs[1])).unwrap();
        assert_eq!(v["container_id"].as_str().unwrap().len(), 64);
        assert_eq!(v["port_mappings"][0]["range"], 4);
        assert_eq!(v["networks"]["bench"]["static_ips"][0], C3_IP);
        let r = netavark_nft_rules(&ctrs);
        assert_eq!(r.matches("dnat ip to").count(), 6);
        assert!(r.contains("tcp dport 20000-20003 jump"));
        let last = r.lines().rfind(|l| l.contains("dnat ip to")).unwrap();
        assert!(last.contains("10.88.0.2:5201"), "{last}");
        assert!(!r.contains("ip6"));
    }

    #[test]
    fn ipv6_rules_are_the_ipv4_ones_in_ipv6_terms() {
        let r = docker_rules6();
        assert!(r.contains("-A POSTROUTING -s fd00:88::/64 ! -o br-bench -j MASQUERADE"));
        assert!(r.contains("-A OUTPUT ! -d ::1/128 -m addrtype"));
        let last = r.lines().rfind(|l| l.contains("-j DNAT")).unwrap();
        assert!(last.contains("--dport 5201 ") && last.ends_with("[fd00:88::2]:5201"));
        assert!(r.contains("-A DOCKER -d fd00:88::2/128 ! -i br-bench -o br-bench"));
        assert!(!r.contains("10.88."));
        let ctrs = netavark_ctrs(Extra::Ipv6);
        let v: serde_json::Value = serde_json::from_str(&netavark_json(&ctrs[1])).unwrap();
        assert_eq!(v["networks"]["bench"]["static_ips"][1], C1_IP6);
        assert_eq!(v["network_info"]["bench"]["ipv6_enabled"], true);
        let n = netavark_nft_rules(&ctrs);
        assert_eq!(n.matches("dnat ip to").count(), 2);
        assert_eq!(n.matches("dnat ip6 to").count(), 2);
        assert!(n.contains("dnat ip6 to [fd00:88::2]:7000"));
        assert!(n.contains("ip6 saddr fd00:88::/64 jump nv_2f259bab_fd00_88__nm64"));
        assert_eq!(Extra::Ipv6.scenario(), "IPv6");
    }
}
