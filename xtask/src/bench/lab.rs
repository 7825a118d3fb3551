//! The benchmark's lab: throwaway namespaces, and a guard that removes all of them.
//!
//! ```text
//!   mdb-<key>-h (host)                         mdb-<key>-o (outside)
//!   up0 192.0.2.1/24  <------- veth ------->   eth0 192.0.2.2/24
//!   default via 192.0.2.2                      (plain routing only: 10.88.0.0/16 via 192.0.2.1)
//!   br-bench 10.88.0.1/16
//!     +-- vb-c1 <-> eth0 10.88.0.2  mdb-<key>-c1 (container)
//!     +-- vb-c2 <-> eth0 10.88.0.3  mdb-<key>-c2
//! ```
//! A dual-stack lab ([`Lab::enable_ipv6`], the IPv6 scenario) adds 2001:db8::1/64 and ::2/64 on
//! the uplink, and fd00:88::1/64 (gateway), ::2, ::3 (c1, c2) on the bridge side.
//!
//! Both uplink ends are created directly inside their namespaces, so no interface of the lab
//! ever exists in the root namespace, and nothing is sent anywhere but between them. For md the
//! bridge and containers are md's own (`md-user run` in the host namespace); netavark creates
//! its own bridge and veths too; the addresses and names are the same in every case.
//!
//! Dropping the lab runs its teardown commands (md-user down, netavark teardown), kills every
//! process left in its namespaces, deletes the namespaces, the pin dir and the temp dir. Labs of
//! an xtask that was killed before its guards ran are swept at the next start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::sys::{in_ns, kill_in_netns, ns_inode, run_ok, run_timeout, sh, Bg};
use crate::util;

pub const UPLINK: &str = "up0";
pub const HOST_IP: &str = "192.0.2.1";
pub const OUTSIDE_IP: &str = "192.0.2.2";
pub const SUBNET: &str = "10.88.0.0/16";
pub const GATEWAY: &str = "10.88.0.1";
pub const BRIDGE: &str = "br-bench";
/// The IPv6 side of a dual-stack lab ([`Lab::enable_ipv6`]): the uplink's /64 and the
/// containers' ULA /64.
pub const HOST_IP6: &str = "2001:db8::1";
pub const OUTSIDE_IP6: &str = "2001:db8::2";
pub const SUBNET6: &str = "fd00:88::/64";
pub const GATEWAY6: &str = "fd00:88::1";

const PREFIX: &str = "mdb-";
const PIN_PREFIX: &str = "md-bench-";
const NETNS_DIR: &str = "/run/netns";
const BPFFS: &str = "/sys/fs/bpf";
const STEP: Duration = Duration::from_secs(60);

/// A network namespace: a name for messages and a path for `nsenter --net=`.
#[derive(Clone, Debug)]
pub struct Ns {
    pub name: String,
    pub path: PathBuf,
}

/// md-user's environment inside one lab.
pub struct MdEnv {
    pub bin: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// `--datapath` of every command (None: md's default).
    pub datapath: Option<&'static str>,
    /// The default network dual-stack on this IPv6 subnet (`MD_SUBNET6`).
    pub subnet6: Option<&'static str>,
}

pub struct Lab {
    pub key: String,
    pub dir: PathBuf,
    pub host: Ns,
    pub outside: Ns,
    /// `/run/netns` names this lab created.
    created: Vec<String>,
    /// Namespaces whose processes die with the lab (its own and md's containers'), held open:
    /// a namespace's inode number is recycled once it is freed, and killing by a stale number
    /// would hit whatever namespace got it next.
    held: Vec<(u64, std::fs::File)>,
    bg: Vec<Bg>,
    /// Best-effort teardown commands, run in reverse order before anything is killed.
    teardown: Vec<Command>,
    pub md: Option<MdEnv>,
    /// Debian's dockerd in this lab (docker-daemon), once started.
    pub docker: Option<DockerEnv>,
    log_seq: u32,
}

/// dockerd's files (all in the lab's dir) and the private mount namespace it runs in.
pub struct DockerEnv {
    pub dir: PathBuf,
    /// The process holding the mount namespace.
    holder: u32,
}

/// The image the docker-daemon containers run (they only hold a network namespace; the
/// bench's servers are started in it from outside, as for every datapath).
pub const DOCKER_IMAGE: &str = "md-bench-busybox";
/// Debian's daemon and client by path (another `docker` on PATH may be another client).
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";

/// A private mount namespace for dockerd: /etc, /var/lib and /run are overlays whose upper
/// layers are on a tmpfs of that namespace (containerd's shim sockets in /run/containerd,
/// /etc/docker, /run/docker never reach the machine); then sleep.
const DOCKER_HOLDER: &str = r#"set -e
mount -t tmpfs md-bench-overlays "$1"
for d in etc var/lib run; do
  n=$(echo "$d" | tr / _)
  mkdir -p "$1/$n/up" "$1/$n/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$1/$n/up,workdir=$1/$n/work" "/$d"
done
echo ready
exec sleep 86400
"#;

/// Removes every container (so their processes go with them), then stops dockerd and waits
/// until it has exited (a zombie then: the bench, its parent, reaps it when the lab drops).
const DOCKER_STOP: &str = r#"D="/usr/bin/docker -H unix://$1"
ids=$($D ps -aq)
[ -z "$ids" ] || $D rm -f $ids >/dev/null
pid=$(cat "$2") || exit 0
kill "$pid" 2>/dev/null || exit 0
while grep -qs '^State:[[:space:]]*[^Z[:space:]]' "/proc/$pid/status"; do sleep 0.1; done
"#;

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

impl Lab {
    /// Host and outside namespaces with the uplink between them; `tag` labels messages.
    pub fn new(tag: &str) -> Result<Lab> {
        static N: AtomicU32 = AtomicU32::new(0);
        let key = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("{PREFIX}{key}"));
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let placeholder = Ns {
            name: String::new(),
            path: PathBuf::new(),
        };
        let mut lab = Lab {
            key: key.clone(),
            dir,
            host: placeholder.clone(),
            outside: placeholder,
            created: Vec::new(),
            held: Vec::new(),
            bg: Vec::new(),
            teardown: Vec::new(),
            md: None,
            docker: None,
            log_seq: 0,
        };
        // From here on an error drops `lab`, which removes what was made.
        lab.host = lab.add_netns("h")?;
        lab.outside = lab.add_netns("o")?;
        let (h, o) = (lab.host.name.clone(), lab.outside.name.clone());
        sh(&[
            "ip", "-n", &h, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns",
            &o,
        ])?;
        sh(&[
            "ip",
            "-n",
            &h,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            UPLINK,
        ])?;
        sh(&["ip", "-n", &h, "link", "set", UPLINK, "up"])?;
        sh(&[
            "ip",
            "-n",
            &o,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &o, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip", "-n", &h, "route", "add", "default", "via", OUTSIDE_IP, "dev", UPLINK,
        ])?;
        lab.sysctl(&lab.host.clone(), "net.ipv4.ip_forward", "1")?;
        // The load generator opens tens of thousands of short connections per run.
        lab.sysctl(
            &lab.outside.clone(),
            "net.ipv4.ip_local_port_range",
            "1024 65000",
        )?;
        lab.sysctl(&lab.outside.clone(), "net.ipv4.tcp_tw_reuse", "1")?;
        eprintln!("bench: lab {tag}: {h} / {o}");
        Ok(lab)
    }

    /// A new namespace `mdb-<key>-<suffix>` with `lo` up.
    pub fn add_netns(&mut self, suffix: &str) -> Result<Ns> {
        let name = format!("{PREFIX}{}-{suffix}", self.key);
        sh(&["ip", "netns", "add", &name])?;
        self.created.push(name.clone());
        let path = netns_path(&name);
        self.track_ns(&path);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(Ns { name, path })
    }

    /// Sets a sysctl inside `ns` (per-namespace sysctls only).
    pub fn sysctl(&self, ns: &Ns, key: &str, value: &str) -> Result<()> {
        run_ok(
            &mut in_ns(&ns.path, "sysctl", &["-qw", &format!("{key}={value}")]),
            STEP,
        )?;
        Ok(())
    }

    /// Makes the lab dual-stack: IPv6 on the uplink (no DAD: the addresses answer at once),
    /// the host's IPv6 default route via the outside, IPv6 forwarding in the host namespace.
    pub fn enable_ipv6(&self) -> Result<()> {
        let (h, o) = (self.host.name.as_str(), self.outside.name.as_str());
        for (ns, ip, dev) in [(h, HOST_IP6, UPLINK), (o, OUTSIDE_IP6, "eth0")] {
            let a = format!("{ip}/64");
            sh(&["ip", "-n", ns, "-6", "addr", "add", &a, "dev", dev, "nodad"])?;
        }
        sh(&[
            "ip",
            "-n",
            h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            OUTSIDE_IP6,
            "dev",
            UPLINK,
        ])?;
        self.sysctl(&self.host, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(())
    }

    /// IPv6 on a hand-made bridge (after [`Lab::add_bridge`]).
    pub fn add_bridge_ip6(&self) -> Result<()> {
        let h = self.host.name.as_str();
        let a = format!("{GATEWAY6}/64");
        sh(&[
            "ip", "-n", h, "-6", "addr", "add", &a, "dev", BRIDGE, "nodad",
        ])?;
        Ok(())
    }

    /// IPv6 in a hand-made container: `ip6`/64 and the IPv6 default route via the gateway.
    pub fn add_container_ip6(&self, ns: &Ns, ip6: &str) -> Result<()> {
        let n = ns.name.as_str();
        let a = format!("{ip6}/64");
        sh(&[
            "ip", "-n", n, "-6", "addr", "add", &a, "dev", "eth0", "nodad",
        ])?;
        sh(&[
            "ip", "-n", n, "-6", "route", "add", "default", "via", GATEWAY6,
        ])?;
        Ok(())
    }

    /// The bridge for hand-made containers (plain routing, Docker-style iptables).
    pub fn add_bridge(&self) -> Result<()> {
        let h = self.host.name.as_str();
        sh(&["ip", "-n", h, "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            h,
            "addr",
            "add",
            &format!("{GATEWAY}/16"),
            "dev",
            BRIDGE,
        ])?;
        sh(&["ip", "-n", h, "link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    /// A hand-made container: its own namespace, a veth whose host end is on the bridge,
    /// `ip`/16 with the gateway as default route.
    pub fn add_container(&mut self, name: &str, ip: &str) -> Result<Ns> {
        let ns = self.add_netns(name)?;
        let h = self.host.name.clone();
        let veth = format!("vb-{name}");
        sh(&[
            "ip", "-n", &h, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ])?;
        sh(&["ip", "-n", &h, "link", "set", &veth, "master", BRIDGE, "up"])?;
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip", "-n", &ns.name, "route", "add", "default", "via", GATEWAY,
        ])?;
        Ok(ns)
    }

    /// A fresh log file path under the lab dir.
    pub fn log(&mut self, tag: &str) -> PathBuf {
        self.log_seq += 1;
        self.dir
            .join("logs")
            .join(format!("{:02}-{tag}", self.log_seq))
    }

    /// Starts a background process in `ns`; it dies with the lab.
    pub fn spawn(&mut self, ns: &Ns, program: &Path, args: &[&str]) -> Result<()> {
        let log = self.log("bg");
        let bg = Bg::spawn(&mut in_ns(&ns.path, program, args), &log, false)?;
        self.bg.push(bg);
        Ok(())
    }

    /// Starts `md-user ARGS` in the background (e.g. `watch`); it dies with the lab.
    pub fn spawn_md(&mut self, args: &[&str]) -> Result<()> {
        let log = self.log("md-bg");
        let bg = Bg::spawn(&mut self.md_cmd(args), &log, false)?;
        self.bg.push(bg);
        Ok(())
    }

    /// Registers a command to run (best effort) when the lab is dropped, before the kill.
    pub fn on_teardown(&mut self, cmd: Command) {
        self.teardown.push(cmd);
    }

    /// Makes the lab kill whatever runs in `ns` when it is dropped.
    pub fn track_ns(&mut self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(f) = std::fs::File::open(path) else {
            return;
        };
        let Ok(ino) = f.metadata().map(|m| m.ino()) else {
            return;
        };
        if !self.held.iter().any(|(i, _)| *i == ino) {
            self.held.push((ino, f));
        }
    }

    // ---- md-user ------------------------------------------------------------------------

    /// Uses md in this lab: state and pin dirs of its own; `md-user down` on drop.
    pub fn enable_md(&mut self, bin: &Path) {
        self.enable_md_mode(bin, None);
    }

    /// [`Lab::enable_md`] with md's datapath mode (`redirect`, `stack`) for every command.
    pub fn enable_md_mode(&mut self, bin: &Path, datapath: Option<&'static str>) {
        self.enable_md_with(bin, datapath, None);
    }

    /// [`Lab::enable_md_mode`], the default network dual-stack on `subnet6` when given.
    pub fn enable_md_with(
        &mut self,
        bin: &Path,
        datapath: Option<&'static str>,
        subnet6: Option<&'static str>,
    ) {
        let env = MdEnv {
            bin: bin.to_path_buf(),
            state_dir: self.dir.join("md-state"),
            pin_dir: Path::new(BPFFS).join(format!("{PIN_PREFIX}{}", self.key)),
            datapath,
            subnet6,
        };
        self.md = Some(env);
        let down = self.md_cmd(&["down"]);
        self.on_teardown(down);
    }

    /// `md-user args...` in the host namespace with the lab's environment.
    pub fn md_cmd(&self, args: &[&str]) -> Command {
        let md = self.md.as_ref().expect("enable_md first");
        md_command(md, &self.host.path, args)
    }

    /// Runs md-user; returns stdout, failing with its output unless it exits 0.
    pub fn md(&self, args: &[&str]) -> Result<String> {
        run_ok(&mut self.md_cmd(args), STEP)
    }

    /// The IPv6 address of md container `name` (`ps --json`'s `ip6`).
    pub fn md_ip6(&self, name: &str) -> Result<String> {
        let out = self.md(&["ps", "--json"])?;
        let v: Value = serde_json::from_str(&out).context("md-user ps --json")?;
        v.as_array()
            .context("ps --json is not an array")?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["ip6"].as_str())
            .map(str::to_string)
            .with_context(|| format!("md-user ps shows no IPv6 address for {name}"))
    }

    /// `md-user ps --json`: (name, ip, pid) of each container; remembers their namespaces.
    pub fn md_ps(&mut self) -> Result<Vec<(String, String, i32)>> {
        let out = self.md(&["ps", "--json"])?;
        let v: Value = serde_json::from_str(&out).context("md-user ps --json")?;
        let mut list = Vec::new();
        for c in v.as_array().context("ps --json is not an array")? {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let ip = c["ip"].as_str().unwrap_or_default().to_string();
            let pid = c["pid"].as_i64().unwrap_or(0) as i32;
            if pid > 1 {
                self.track_ns(Path::new(&format!("/proc/{pid}/ns/net")));
            }
            list.push((name, ip, pid));
        }
        Ok(list)
    }

    /// The namespace of md container `name` (through its process).
    pub fn md_container(&mut self, name: &str) -> Result<(Ns, String)> {
        let (_, ip, pid) = self
            .md_ps()?
            .into_iter()
            .find(|(n, _, _)| n == name)
            .with_context(|| format!("md-user ps does not list {name}"))?;
        Ok((
            Ns {
                name: name.to_string(),
                path: PathBuf::from(format!("/proc/{pid}/ns/net")),
            },
            ip,
        ))
    }
}

impl Lab {
    /// Starts Debian's dockerd in the lab's host namespace and a private mount namespace of
    /// its own, with everything in the lab's dir (data root, exec root, pid file, API socket)
    /// and a busybox image. Without `md_plugin`: its bridge driver and its iptables rules (in
    /// the lab's host namespace only; no IPv6). With it (after `enable_md_mode`): `md-user
    /// docker-plugin --name md` first, in the same mount namespace (so its socket in
    /// /run/docker/plugins never reaches the machine), and `--iptables=false`. Stopped, its
    /// containers removed, when the lab is dropped.
    pub fn enable_docker(&mut self, md_plugin: bool) -> Result<()> {
        let dir = self.dir.join("docker");
        let tmpfs = dir.join("overlays");
        std::fs::create_dir_all(&tmpfs)?;
        let log = self.log("mount-holder");
        let mut holder = Bg::spawn(
            Command::new("unshare")
                .args(["-m", "--propagation", "slave", "--", "sh", "-c"])
                .args([DOCKER_HOLDER, "holder"])
                .arg(&tmpfs),
            &log,
            true,
        )?;
        let ready = holder.read_line()?;
        if ready != "ready" {
            bail!("the mount namespace for dockerd is not ready: {ready}");
        }
        self.docker = Some(DockerEnv {
            dir: dir.clone(),
            holder: holder.pid(),
        });
        self.bg.push(holder);
        std::fs::write(dir.join("daemon.json"), "{}")?;
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        if md_plugin {
            let md = self.md.as_ref().context("enable_md_mode first")?;
            let mut plugin = self.docker_cmd(&md.bin.to_string_lossy());
            plugin
                .args(["docker-plugin", "--name", "md", "--docker-host", &sock])
                .env("MD_STATE_DIR", &md.state_dir)
                .env("MD_BPF_PIN_DIR", &md.pin_dir)
                .env("MD_UPLINK", UPLINK)
                .env("MD_BRIDGE", BRIDGE)
                .env("MD_SUBNET", SUBNET);
            if let Some(d) = md.datapath {
                plugin.env("MD_DATAPATH", d);
            }
            let log = self.log("docker-plugin");
            self.bg.push(Bg::spawn(&mut plugin, &log, false)?);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !std::fs::read_to_string(&log)?.contains("serving Docker's") {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "md-user docker-plugin does not serve (see {})",
                        log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let mut dockerd = self.docker_cmd(DOCKERD);
        dockerd
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["-H", &sock])
            .arg(format!("--iptables={}", !md_plugin))
            .args([
                "--ip6tables=false",
                "--bridge=none",
                // Published ports are DNAT rules only (no docker-proxy per port).
                "--userland-proxy=false",
                "--storage-driver=vfs",
                "--default-ulimit",
                "nofile=1024:1024",
                "--default-ulimit",
                "nproc=4096:4096",
            ]);
        let log = self.log("dockerd");
        self.bg.push(Bg::spawn(&mut dockerd, &log, false)?);
        let mut stop = self.docker_cmd("sh");
        stop.args(["-c", DOCKER_STOP, "stop"])
            .arg(dir.join("docker.sock"))
            .arg(dir.join("docker.pid"));
        self.on_teardown(stop);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.docker(&["version"]).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("dockerd did not come up (see {})", log.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The image: busybox-static alone, imported.
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        let busybox = util::which("busybox").context("busybox (busybox-static)")?;
        std::fs::copy(&busybox, rootfs.join("bin/busybox"))?;
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep"))?;
        let tar = dir.join("rootfs.tar");
        sh(&[
            "tar",
            "-C",
            &rootfs.to_string_lossy(),
            "-cf",
            &tar.to_string_lossy(),
            ".",
        ])?;
        self.docker(&["import", &tar.to_string_lossy(), DOCKER_IMAGE])?;
        Ok(())
    }

    /// `program` in dockerd's mount namespace and the lab's host namespace.
    pub fn docker_cmd(&self, program: &str) -> Command {
        let d = self.docker.as_ref().expect("enable_docker first");
        let mut c = util::command("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", d.holder))
            .arg(format!("--net={}", self.host.path.display()))
            .arg("--")
            .arg(program);
        c
    }

    /// `docker ARGS` against the lab's dockerd; its stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let d = self.docker.as_ref().context("enable_docker first")?;
        let mut c = self.docker_cmd(DOCKER);
        c.env("DOCKER_CONFIG", d.dir.join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", d.dir.join("docker.sock").display()))
            .args(args);
        run_ok(&mut c, Duration::from_secs(300))
    }

    /// The network namespace of Docker container `name` (through its process).
    pub fn docker_container(&mut self, name: &str) -> Result<Ns> {
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", name])?;
        let pid: i32 = pid
            .trim()
            .parse()
            .with_context(|| format!("docker inspect {name}: pid {pid:?}"))?;
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        self.track_ns(&path);
        Ok(Ns {
            name: name.to_string(),
            path,
        })
    }
}

fn md_command(md: &MdEnv, host: &Path, args: &[&str]) -> Command {
    let mut c = in_ns(host, &md.bin, args);
    c.env("MD_STATE_DIR", &md.state_dir)
        .env("MD_BPF_PIN_DIR", &md.pin_dir)
        .env("MD_UPLINK", UPLINK)
        .env("MD_BRIDGE", BRIDGE)
        .env("MD_SUBNET", SUBNET);
    if let Some(d) = md.datapath {
        c.env("MD_DATAPATH", d);
    }
    if let Some(s) = md.subnet6 {
        c.env("MD_SUBNET6", s);
    }
    c
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Learn md's container namespaces before md-user down forgets them.
        if self.md.is_some() && self.host.path.exists() {
            let _ = self.md_ps();
        }
        for mut c in std::mem::take(&mut self.teardown).into_iter().rev() {
            let shown = util::show(&c);
            match run_timeout(&mut c, Duration::from_secs(60)) {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "bench: teardown `{shown}` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("bench: teardown `{shown}`: {e:#}"),
            }
        }
        self.bg.clear();
        let inodes: Vec<u64> = self.held.iter().map(|(i, _)| *i).collect();
        kill_in_netns(&inodes);
        for name in self.created.iter().rev() {
            if netns_path(name).exists() {
                if let Err(e) = sh(&["ip", "netns", "del", name]) {
                    eprintln!("bench: {e:#}");
                }
            }
        }
        if let Some(md) = &self.md {
            remove_pin_dir(&md.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Only now may the namespaces (and their inode numbers) go.
        self.held.clear();
    }
}

fn remove_pin_dir(p: &Path) {
    if p.exists() {
        if let Err(e) = std::fs::remove_dir_all(p) {
            eprintln!("bench: removing {}: {e}", p.display());
        }
    }
}

fn entries(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid in a `<pid>-<n>...` key, when that process is gone.
fn dead_owner(rest: &str) -> Option<String> {
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let n: u32 = parts.next()?.parse().ok()?;
    (!Path::new(&format!("/proc/{pid}")).exists()).then(|| format!("{pid}-{n}"))
}

/// Removes labs whose xtask died before its guards ran (SIGKILL): md-user down with their
/// pin dir, kill what runs in their namespaces, delete the namespaces and directories.
pub fn sweep_stale(md_bin: Option<&Path>) {
    let mut keys: Vec<String> = Vec::new();
    let mut add = |k: Option<String>| {
        if let Some(k) = k {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    };
    for n in entries(NETNS_DIR) {
        add(n.strip_prefix(PREFIX).and_then(dead_owner));
    }
    for n in entries(BPFFS) {
        add(n.strip_prefix(PIN_PREFIX).and_then(dead_owner));
    }
    let tmp = std::env::temp_dir();
    for n in entries(&tmp.to_string_lossy()) {
        add(n.strip_prefix(PREFIX).and_then(dead_owner));
    }
    for key in keys {
        eprintln!("bench: removing stale lab {key}");
        let host = netns_path(&format!("{PREFIX}{key}-h"));
        let pin = Path::new(BPFFS).join(format!("{PIN_PREFIX}{key}"));
        let dir = tmp.join(format!("{PREFIX}{key}"));
        if let (Some(bin), true) = (md_bin, pin.exists()) {
            let md = MdEnv {
                bin: bin.to_path_buf(),
                state_dir: dir.join("md-state"),
                pin_dir: pin.clone(),
                datapath: None,
                subnet6: None,
            };
            let mut c = if host.exists() {
                md_command(&md, &host, &["down"])
            } else {
                let mut c = util::command(bin);
                c.arg("down")
                    .env("MD_STATE_DIR", &md.state_dir)
                    .env("MD_BPF_PIN_DIR", &md.pin_dir);
                c
            };
            let _ = run_timeout(&mut c, Duration::from_secs(60));
        }
        let mine: Vec<String> = entries(NETNS_DIR)
            .into_iter()
            .filter(|n| n.starts_with(&format!("{PREFIX}{key}-")))
            .collect();
        let inodes: Vec<u64> = mine
            .iter()
            .filter_map(|n| ns_inode(netns_path(n)))
            .collect();
        kill_in_netns(&inodes);
        for n in mine {
            let _ = sh(&["ip", "netns", "del", &n]);
        }
        remove_pin_dir(&pin);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The namespaces, pin dirs and processes this xtask made that still exist (for the final check).
pub fn leftovers() -> Vec<String> {
    let me = format!("{PREFIX}{}-", std::process::id());
    let pin = format!("{PIN_PREFIX}{}-", std::process::id());
    let mut v: Vec<String> = entries(NETNS_DIR)
        .into_iter()
        .filter(|n| n.starts_with(&me))
        .collect();
    v.extend(entries(BPFFS).into_iter().filter(|n| n.starts_with(&pin)));
    v
}
