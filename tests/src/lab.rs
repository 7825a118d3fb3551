//! The lab: a "host" namespace where md-user runs, an "outside" namespace behind its uplink, and
//! a cleanup that leaves nothing behind.
//!
//! ```text
//!   <prefix>-h (host)                          <prefix>-o (outside)
//!   up0 192.0.2.1/24  <------- veth ------->   eth0 192.0.2.2/24
//!       2001:db8:1::1/64                            2001:db8:1::2/64
//!   default via 192.0.2.2, 2001:db8:1::2       no route to md's subnets
//!   md-user, bridge md0, containers
//! ```
//! Both sides are dual-stack; their IPv6 addresses skip duplicate address detection, so they
//! answer at once.
//! Both ends of the uplink are created directly inside their namespaces, so no interface of the
//! lab ever exists in the root namespace.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::ffi::CString;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::process::{
    alive, descendants, ns_inode, pids_in_netns, run_timeout, show_cmd, show_output, start_time,
    try_run_timeout, Bg,
};
use crate::{md_user_bin, wait_for};

/// Host-side name of the uplink (in the host namespace).
pub const UPLINK: &str = "up0";
/// The host namespace's address on the uplink: what masqueraded traffic comes from.
pub const HOST_UPLINK_IP: &str = "192.0.2.1";
/// The outside namespace's address (the host's default gateway).
pub const OUTSIDE_IP: &str = "192.0.2.2";
/// The host namespace's IPv6 address on the uplink.
pub const HOST_UPLINK_IP6: &str = "2001:db8:1::1";
/// The outside namespace's IPv6 address (the host's IPv6 default gateway).
pub const OUTSIDE_IP6: &str = "2001:db8:1::2";
/// md's bridge gateway with the default subnet.
pub const GATEWAY: &str = "172.18.0.1";
/// Default deadline of one md-user command.
pub const MD_TIMEOUT: Duration = Duration::from_secs(60);

const BRIDGE: &str = "md0";
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
const NETNS_RUN_DIR: &str = "/run/netns";
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// True for a host-side container veth: `md` followed by hex digits (the bridge `md0` excluded).
pub fn is_md_veth(name: &str) -> bool {
    name != BRIDGE
        && name
            .strip_prefix("md")
            .is_some_and(|hex| hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A throwaway host + outside network namespace pair; see the module docs. Dropping it runs
/// `md-user down`, kills every process left in the lab's namespaces (and the containers' ones it
/// saw), removes the pin dir, the namespaces and the lab's temp dir.
pub struct Lab {
    name: String,
    host_ns: String,
    outside_ns: String,
    dir: PathBuf,
    state_dir: PathBuf,
    pin_dir: PathBuf,
    md_bin: PathBuf,
    /// Clock ticks since boot when the lab was made: pids that started earlier are not ours.
    born: u64,
    netns_inodes: Mutex<HashSet<u64>>,
    /// Open handles on the containers' network namespaces: a namespace stays alive (and its
    /// inode number is not reused by another lab's) while we hold it, so killing whatever is
    /// in a namespace with that inode can only hit this lab's processes.
    netns_handles: Mutex<Vec<std::fs::File>>,
    tracked: Mutex<Vec<(i32, u64)>>,
    log_seq: AtomicUsize,
    /// Namespaces added by [`Lab::add_segment`]/[`Lab::add_tun_segment`], deleted on drop.
    extra_ns: Mutex<Vec<String>>,
    /// Background helpers of the lab itself (the tun relay), killed on drop.
    helpers: Mutex<Vec<Bg>>,
}

/// One more network behind a host interface (see [`Lab::add_segment`]).
#[derive(Debug, Clone)]
pub struct Segment {
    /// The namespace at the far end.
    pub ns: String,
    /// The host namespace's interface and address on it.
    pub host_if: String,
    pub host_ip: String,
    /// The far end's address.
    pub peer_ip: String,
}

fn unique_key() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{}-{n}{:04x}", std::process::id(), h.finish() as u16)
}

fn ticks_now() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (up * hz) as u64
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// True when `ss`, run by `run` where it should look, lists a listener on `proto` ("tcp"/"udp")
/// port `port`.
fn listens(proto: &str, port: u16, run: impl FnOnce(&[&str]) -> Output) -> bool {
    let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
    let filter = format!("sport = :{port}");
    let out = run(&["ss", flag, &filter]);
    out.status.success() && !out.stdout.is_empty()
}

#[track_caller]
fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed\n{}",
        show_output(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    /// Creates the lab (see the module docs). `name` labels logs and messages.
    #[track_caller]
    pub fn new(name: &str) -> Lab {
        sweep_stale_labs();
        let lab = Lab::with_key(name, &unique_key(), md_user_bin());
        std::fs::create_dir_all(lab.dir.join("logs"))
            .unwrap_or_else(|e| panic!("create {}: {e}", lab.dir.display()));
        // From here on a panic drops `lab`, which removes whatever was made.
        lab.setup();
        eprintln!(
            "lab {name}: namespaces {} / {}, state {}, pins {}",
            lab.host_ns,
            lab.outside_ns,
            lab.state_dir.display(),
            lab.pin_dir.display()
        );
        lab
    }

    fn with_key(name: &str, key: &str, md_bin: PathBuf) -> Lab {
        let dir = std::env::temp_dir().join(format!("mdt-{key}"));
        Lab {
            name: name.to_string(),
            host_ns: format!("mdt-{key}-h"),
            outside_ns: format!("mdt-{key}-o"),
            state_dir: dir.join("state"),
            dir,
            pin_dir: Path::new(BPFFS_ROOT).join(format!("md-test-{key}")),
            md_bin,
            born: ticks_now().saturating_sub(1),
            netns_inodes: Mutex::new(HashSet::new()),
            netns_handles: Mutex::new(Vec::new()),
            tracked: Mutex::new(Vec::new()),
            log_seq: AtomicUsize::new(0),
            extra_ns: Mutex::new(Vec::new()),
            helpers: Mutex::new(Vec::new()),
        }
    }

    /// A lab shaped like a real Docker host (issue 12): besides `up0` to the outside
    /// namespace, a second Ethernet uplink `up1` (198.51.100.1/24) to another namespace
    /// (198.51.100.2), and a layer-3 VPN device `tun0` (203.0.113.1/25, a tun driven by
    /// `fixtures/tun_relay.py`) whose far end (203.0.113.2) is a tun in a third namespace,
    /// routed by the host through tun0 only. Returns the lab and the two segments.
    #[track_caller]
    pub fn real_host(name: &str) -> (Lab, Segment, Segment) {
        let lab = Lab::new(name);
        let second = lab.add_segment("o2", "up1", "198.51.100.1", "198.51.100.2", 24);
        let vpn = lab.add_tun_segment("v", "tun0", "203.0.113.1", "203.0.113.2", 25);
        (lab, second, vpn)
    }

    fn add_ns(&self, tag: &str) -> String {
        let ns = format!("{}-{tag}", self.host_ns.trim_end_matches("-h"));
        self.sh(&["ip", "netns", "add", &ns]);
        self.extra_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns.clone());
        let ino = ns_inode(self.netns_path(&ns)).expect("netns file just created");
        self.netns_inodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ino);
        self.sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Adds a namespace `<lab>-TAG` behind a new Ethernet interface HOST_IF of the host
    /// namespace (HOST_IP/PREFIX), its end `eth0` at PEER_IP/PREFIX; the far end routes
    /// nothing further. Works at any time, also after md started (an interface that appears
    /// later).
    #[track_caller]
    pub fn add_segment(
        &self,
        tag: &str,
        host_if: &str,
        host_ip: &str,
        peer_ip: &str,
        prefix: u8,
    ) -> Segment {
        let ns = self.add_ns(tag);
        let h = self.host_ns.as_str();
        self.sh(&[
            "ip", "-n", h, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        self.sh(&[
            "ip",
            "-n",
            h,
            "addr",
            "add",
            &format!("{host_ip}/{prefix}"),
            "dev",
            host_if,
        ]);
        self.sh(&["ip", "-n", h, "link", "set", host_if, "up"]);
        self.sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{peer_ip}/{prefix}"),
            "dev",
            "eth0",
        ]);
        self.sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        Segment {
            ns,
            host_if: host_if.to_string(),
            host_ip: host_ip.to_string(),
            peer_ip: peer_ip.to_string(),
        }
    }

    /// Like [`Lab::add_segment`] with a layer-3 device: HOST_IF is a tun (no Ethernet header,
    /// as a WireGuard or OpenVPN device) and so is the far end's `tun1`; a small relay program
    /// carries packets between the two. The far end's default route is its tun.
    #[track_caller]
    pub fn add_tun_segment(
        &self,
        tag: &str,
        host_if: &str,
        host_ip: &str,
        peer_ip: &str,
        prefix: u8,
    ) -> Segment {
        let ns = self.add_ns(tag);
        let ns_path = self.netns_path(&ns).to_string_lossy().into_owned();
        let relay = crate::fixture("tun_relay.py");
        let mut bg = self.spawn_host(&[
            "python3",
            relay.to_str().expect("utf-8"),
            host_if,
            &ns_path,
            "tun1",
        ]);
        bg.wait_for_line("ready", Duration::from_secs(20));
        self.track_pid(bg.pid());
        self.helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bg);
        let h = self.host_ns.as_str();
        let cidr = |ip: &str| format!("{ip}/{prefix}");
        self.sh(&["ip", "-n", h, "addr", "add", &cidr(host_ip), "dev", host_if]);
        self.sh(&["ip", "-n", h, "link", "set", host_if, "up"]);
        self.sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &cidr(peer_ip),
            "dev",
            "tun1",
        ]);
        self.sh(&["ip", "-n", &ns, "link", "set", "tun1", "up"]);
        self.sh(&["ip", "-n", &ns, "route", "add", "default", "dev", "tun1"]);
        Segment {
            ns,
            host_if: host_if.to_string(),
            host_ip: host_ip.to_string(),
            peer_ip: peer_ip.to_string(),
        }
    }

    /// Runs a command in namespace `ns` (one of [`Segment::ns`]) via `ip netns exec`.
    #[track_caller]
    pub fn in_ns(&self, ns: &str, args: &[&str]) -> Output {
        run_timeout(&mut self.netns_exec(ns, args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn in_ns_ok(&self, ns: &str, args: &[&str]) -> String {
        ok(self.in_ns(ns, args), &format!("[{ns}] {}", args.join(" ")))
    }

    /// Starts a background process in namespace `ns`; killed when the guard drops.
    pub fn spawn_in_ns(&self, ns: &str, args: &[&str]) -> Bg {
        Bg::spawn(&mut self.netns_exec(ns, args), &self.log_path(ns))
    }

    /// Waits until something listens on `proto` port `port` in namespace `ns`.
    #[track_caller]
    pub fn wait_listening_ns(&self, ns: &str, proto: &str, port: u16) {
        wait_for(
            &format!("{proto}/{port} listens in {ns}"),
            Duration::from_secs(10),
            || listens(proto, port, |ss| self.in_ns(ns, ss)).then_some(()),
        )
    }

    fn setup(&self) {
        let (h, o) = (self.host_ns.as_str(), self.outside_ns.as_str());
        for ns in [h, o] {
            self.sh(&["ip", "netns", "add", ns]);
            let ino = ns_inode(self.netns_path(ns)).expect("netns file just created");
            self.netns_inodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ino);
        }
        let ip4 = |ns: &str, rest: &[&str]| {
            let mut a = vec!["ip", "-n", ns];
            a.extend_from_slice(rest);
            self.sh(&a);
        };
        ip4(
            h,
            &[
                "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", o,
            ],
        );
        ip4(
            h,
            &[
                "addr",
                "add",
                &format!("{HOST_UPLINK_IP}/24"),
                "dev",
                UPLINK,
            ],
        );
        ip4(h, &["link", "set", "lo", "up"]);
        ip4(h, &["link", "set", UPLINK, "up"]);
        ip4(
            o,
            &["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"],
        );
        ip4(o, &["link", "set", "lo", "up"]);
        ip4(o, &["link", "set", "eth0", "up"]);
        ip4(
            h,
            &["route", "add", "default", "via", OUTSIDE_IP, "dev", UPLINK],
        );
        ip4(
            h,
            &[
                "-6",
                "addr",
                "add",
                &format!("{HOST_UPLINK_IP6}/64"),
                "dev",
                UPLINK,
                "nodad",
            ],
        );
        ip4(
            o,
            &[
                "-6",
                "addr",
                "add",
                &format!("{OUTSIDE_IP6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip4(
            h,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                OUTSIDE_IP6,
                "dev",
                UPLINK,
            ],
        );
    }

    #[track_caller]
    fn sh(&self, args: &[&str]) -> String {
        let mut c = cmd(args[0], &args[1..]);
        let what = show_cmd(&c);
        ok(run_timeout(&mut c, SETUP_TIMEOUT), &what)
    }

    fn netns_path(&self, ns: &str) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes one more network namespace of the lab, `mdt-<key>-<tag>` (what a container runtime
    /// makes before it calls a CNI plugin); deleted with the lab. Returns its /run/netns path.
    #[track_caller]
    pub fn add_netns(&self, tag: &str) -> PathBuf {
        let name = self.add_ns(tag);
        self.netns_path(&name)
    }

    /// Deletes a namespace made with [`Lab::add_netns`] (a runtime removing a container).
    #[track_caller]
    pub fn del_netns(&self, path: &Path) {
        let name = path.file_name().expect("netns name").to_string_lossy();
        self.sh(&["ip", "netns", "del", &name]);
        self.extra_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|n| *n != name);
    }

    /// Runs a command inside a namespace made with [`Lab::add_netns`] (`ip netns exec`).
    #[track_caller]
    pub fn in_netns(&self, path: &Path, args: &[&str]) -> Output {
        let name = path.file_name().expect("netns name").to_string_lossy();
        run_timeout(&mut self.netns_exec(&name, args), MD_TIMEOUT)
    }

    /// Starts a background process inside a namespace made with [`Lab::add_netns`].
    pub fn spawn_in_netns(&self, path: &Path, args: &[&str]) -> Bg {
        let name = path.file_name().expect("netns name").to_string_lossy();
        Bg::spawn(
            &mut self.netns_exec(&name, args),
            &self.log_path(&format!("ns-{name}")),
        )
    }
    pub fn host_ns(&self) -> &str {
        &self.host_ns
    }
    pub fn outside_ns(&self) -> &str {
        &self.outside_ns
    }
    /// The lab's temp dir (holds `state/` and `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `MD_STATE_DIR` of this lab.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    /// `MD_BPF_PIN_DIR` of this lab.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
    pub fn md_bin(&self) -> &Path {
        &self.md_bin
    }

    /// A fresh path under the lab's log dir (`NN-tag`), for files a test writes (strace output…).
    pub fn log_path(&self, tag: &str) -> PathBuf {
        let n = self.log_seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join("logs").join(format!("{n:02}-{tag}"))
    }

    // ---- md-user -------------------------------------------------------------------------

    /// `program args...` in the host namespace via `nsenter --net` (the mount namespace is kept,
    /// so /sys/fs/bpf stays visible), with the lab's md environment.
    pub fn host_md_cmd(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!(
            "--net={}",
            self.netns_path(&self.host_ns).display()
        ))
        .arg("--")
        .arg(program)
        .args(args)
        .env_remove("MD_BRIDGE")
        .env_remove("MD_SUBNET")
        .env("MD_STATE_DIR", &self.state_dir)
        .env("MD_BPF_PIN_DIR", &self.pin_dir)
        .env("MD_UPLINK", UPLINK);
        c
    }

    /// Runs md-user in the host namespace (deadline [`MD_TIMEOUT`]).
    #[track_caller]
    pub fn md(&self, args: &[&str]) -> Output {
        self.md_timeout(args, MD_TIMEOUT)
    }

    #[track_caller]
    pub fn md_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        run_timeout(&mut self.host_md_cmd(&self.md_bin, args), timeout)
    }

    /// Runs md-user, asserts success, returns stdout.
    #[track_caller]
    pub fn md_ok(&self, args: &[&str]) -> String {
        ok(self.md(args), &format!("md-user {}", args.join(" ")))
    }

    /// Starts md-user in the background (e.g. a foreground `run`); killed when the guard drops.
    pub fn spawn_md(&self, args: &[&str]) -> Bg {
        let log = self.log_path("md-user");
        Bg::spawn(&mut self.host_md_cmd(&self.md_bin, args), &log)
    }

    /// `md-user exec CONTAINER -- args...`.
    #[track_caller]
    pub fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", container, "--"];
        a.extend_from_slice(args);
        self.md(&a)
    }

    /// [`Lab::exec`], asserting success; returns stdout.
    #[track_caller]
    pub fn exec_ok(&self, container: &str, args: &[&str]) -> String {
        let out = self.exec(container, args);
        ok(
            out,
            &format!("md-user exec {container} -- {}", args.join(" ")),
        )
    }

    /// `md-user ps --json`, parsed. Also remembers the containers' processes and namespaces so
    /// that the lab's cleanup can kill whatever md-user would leave behind.
    #[track_caller]
    pub fn ps(&self) -> Vec<Value> {
        let out = self.md_ok(&["ps", "--json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("md-user ps --json is not JSON ({e}):\n{out}"));
        let Value::Array(list) = v else {
            panic!("md-user ps --json is not an array:\n{out}");
        };
        for c in &list {
            if let Some(pid) = c.get("pid").and_then(Value::as_i64) {
                self.track_container(pid as i32);
            }
        }
        list
    }

    /// Names listed by `ps`, sorted.
    #[track_caller]
    pub fn ps_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ps()
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    }

    /// The `ps` entry of `name`, if listed.
    #[track_caller]
    pub fn container(&self, name: &str) -> Option<Value> {
        self.ps()
            .into_iter()
            .find(|c| c["name"].as_str() == Some(name))
    }

    /// Waits until `ps` lists `name` with status "running"; returns its entry.
    #[track_caller]
    pub fn wait_running(&self, name: &str, timeout: Duration) -> Value {
        wait_for(&format!("ps shows {name} running"), timeout, || {
            self.container(name)
                .filter(|c| c["status"].as_str() == Some("running"))
        })
    }

    /// [`Lab::wait_running`] for a container whose md-user runs in the foreground as `fg`:
    /// fails at once, with its output, if `fg` exits first.
    #[track_caller]
    pub fn wait_running_fg(&self, name: &str, fg: &mut Bg, timeout: Duration) -> Value {
        wait_for(&format!("ps shows {name} running"), timeout, || {
            if let Some(st) = fg.try_status() {
                panic!(
                    "md-user for {name} exited ({st}) before ps showed it running\n\
                     --- stdout ---\n{}--- stderr ---\n{}",
                    fg.stdout(),
                    fg.stderr()
                );
            }
            self.container(name)
                .filter(|c| c["status"].as_str() == Some("running"))
        })
    }

    /// The `ps` entry of `name`; panics if not listed.
    #[track_caller]
    pub fn ps_entry(&self, name: &str) -> Value {
        self.container(name)
            .unwrap_or_else(|| panic!("{name} is not in ps"))
    }

    /// The IP `ps` shows for `name` (panics if not listed).
    #[track_caller]
    pub fn ip_of(&self, name: &str) -> String {
        let c = self.ps_entry(name);
        c["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("ps entry of {name} has no string ip: {c}"))
            .to_string()
    }

    /// The host-side veth of a container: the peer index of its `eth0`, looked up in the host ns.
    #[track_caller]
    pub fn host_veth_of(&self, container: &str) -> String {
        let out = self.exec_ok(container, &["ip", "-o", "link", "show", "eth0"]);
        // "2: eth0@if7: <BROADCAST,..."
        let idx: u32 = out
            .split_once("@if")
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no peer index in {container}'s eth0: {out}"));
        self.link_table()
            .into_iter()
            .find(|(i, _)| *i == idx)
            .map(|(_, n)| n)
            .unwrap_or_else(|| {
                panic!("{container}'s eth0 peer (ifindex {idx}) is not in the host ns")
            })
    }

    // ---- namespaces ----------------------------------------------------------------------

    fn netns_exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = cmd("ip", &["netns", "exec", ns]);
        c.args(args);
        c
    }

    /// Runs a (non-md) command in the host namespace via `ip netns exec`.
    #[track_caller]
    pub fn host(&self, args: &[&str]) -> Output {
        run_timeout(&mut self.netns_exec(&self.host_ns, args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn host_ok(&self, args: &[&str]) -> String {
        ok(self.host(args), &format!("[host] {}", args.join(" ")))
    }

    /// Runs a command in the outside namespace via `ip netns exec`.
    #[track_caller]
    pub fn outside(&self, args: &[&str]) -> Output {
        run_timeout(&mut self.netns_exec(&self.outside_ns, args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn outside_ok(&self, args: &[&str]) -> String {
        ok(self.outside(args), &format!("[outside] {}", args.join(" ")))
    }

    /// Starts a background process in the host namespace; killed when the guard drops.
    pub fn spawn_host(&self, args: &[&str]) -> Bg {
        Bg::spawn(
            &mut self.netns_exec(&self.host_ns, args),
            &self.log_path("host"),
        )
    }

    /// Starts a background process in the outside namespace; killed when the guard drops.
    pub fn spawn_outside(&self, args: &[&str]) -> Bg {
        Bg::spawn(
            &mut self.netns_exec(&self.outside_ns, args),
            &self.log_path("outside"),
        )
    }

    /// Waits until something listens on `proto` ("tcp"/"udp") port `port` in the outside ns.
    #[track_caller]
    pub fn wait_listening_outside(&self, proto: &str, port: u16) {
        wait_for(
            &format!("{proto}/{port} listens outside"),
            Duration::from_secs(10),
            || listens(proto, port, |ss| self.outside(ss)).then_some(()),
        )
    }

    /// Waits until something listens on `proto` ("tcp"/"udp") port `port` in the host ns.
    #[track_caller]
    pub fn wait_listening_host(&self, proto: &str, port: u16) {
        wait_for(
            &format!("{proto}/{port} listens in the host ns"),
            Duration::from_secs(10),
            || listens(proto, port, |ss| self.host(ss)).then_some(()),
        )
    }

    /// Waits (up to 30 s: python starts slowly on a loaded machine) until something listens on
    /// `proto` ("tcp"/"udp") port `port` inside `container`; on timeout the panic shows the
    /// container's `ps` entry and `md-user logs`.
    #[track_caller]
    pub fn wait_listening_in(&self, container: &str, proto: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if listens(proto, port, |ss| self.exec(container, ss)) {
                return;
            }
            if Instant::now() >= deadline {
                let logs = self.md(&["logs", container]);
                panic!(
                    "timed out after 30s waiting until {proto}/{port} listens in {container}\n\
                     ps entry: {:?}\nmd-user logs {container}:\n{}",
                    self.container(container),
                    show_output(&logs)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `md-user exec CONTAINER -- args...` in the background; killed when the guard drops
    /// (what it started inside the container dies with the lab).
    pub fn spawn_exec(&self, container: &str, args: &[&str]) -> Bg {
        let mut a = vec!["exec", container, "--"];
        a.extend_from_slice(args);
        Bg::spawn(
            &mut self.host_md_cmd(&self.md_bin, &a),
            &self.log_path(&format!("exec-{container}")),
        )
    }

    /// Entries of the pinned map `<pin dir>/maps/<map>` as `bpftool map dump -j` shows them
    /// (run from the root namespace: pin paths are global). Empty if the map is not pinned.
    #[track_caller]
    pub fn map_dump(&self, map: &str) -> Vec<Value> {
        let path = self.pin_dir.join("maps").join(map);
        if !path.exists() {
            return Vec::new();
        }
        let p = path.to_string_lossy();
        let out = self.sh(&["bpftool", "map", "dump", "pinned", &p, "-j"]);
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            _ => panic!("bpftool map dump {p}: not a JSON array:\n{out}"),
        }
    }

    /// `md-user stats --json`, parsed (an object; see md-user's stats contract).
    #[track_caller]
    pub fn stats(&self) -> Value {
        let out = self.md_ok(&["stats", "--json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("md-user stats --json is not JSON ({e}):\n{out}"));
        assert!(
            v.is_object(),
            "md-user stats --json is not an object:\n{out}"
        );
        v
    }

    /// `(ifindex, name)` of every link in the host namespace.
    #[track_caller]
    pub fn link_table(&self) -> Vec<(u32, String)> {
        let out = self.sh(&["ip", "-n", &self.host_ns, "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ": ");
                let idx = f.next()?.trim().parse().ok()?;
                let name = f.next()?.split('@').next()?.to_string();
                Some((idx, name))
            })
            .collect()
    }

    /// Link names in the host namespace, sorted.
    #[track_caller]
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = self.link_table().into_iter().map(|(_, n)| n).collect();
        v.sort();
        v
    }

    /// Host-side container veths (`md` + hex) in the host namespace, sorted.
    #[track_caller]
    pub fn md_veths(&self) -> Vec<String> {
        self.links().into_iter().filter(|n| is_md_veth(n)).collect()
    }

    /// True if the bridge (md0) exists in the host namespace.
    #[track_caller]
    pub fn has_bridge(&self) -> bool {
        self.links().iter().any(|n| n == BRIDGE)
    }

    /// Entries of the state dir, lock files (`lock`, `*.lock`) excluded; empty if it is gone.
    pub fn state_entries(&self) -> Vec<String> {
        dir_entries(&self.state_dir)
            .into_iter()
            .filter(|n| n != "lock" && !n.ends_with(".lock"))
            .collect()
    }

    /// Entries of the pin dir; empty if it is gone.
    pub fn pin_entries(&self) -> Vec<String> {
        dir_entries(&self.pin_dir)
    }

    // ---- cleanup bookkeeping -------------------------------------------------------------

    /// Makes the lab's cleanup kill `pid` (if it is still the same process then).
    pub fn track_pid(&self, pid: i32) {
        if let Some(st) = start_time(pid) {
            if st >= self.born {
                let mut t = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
                if !t.contains(&(pid, st)) {
                    t.push((pid, st));
                }
            }
        }
    }

    /// Remembers a container's process tree and network namespace for cleanup. Only processes
    /// born after the lab, outside the root and the test's own namespaces, are taken.
    fn track_container(&self, pid: i32) {
        if pid <= 1 || start_time(pid).is_none_or(|st| st < self.born) {
            return;
        }
        for p in descendants(pid) {
            self.track_pid(p);
        }
        let foreign = [ns_inode("/proc/1/ns/net"), ns_inode("/proc/self/ns/net")];
        let path = format!("/proc/{pid}/ns/net");
        // Open first, then check it is still the process we looked at: the handle then pins
        // that process's namespace.
        let Ok(handle) = std::fs::File::open(&path) else {
            return;
        };
        if start_time(pid).is_none_or(|st| st < self.born) {
            return;
        }
        if let Some(ino) = handle
            .metadata()
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        {
            if !foreign.contains(&Some(ino)) {
                self.netns_inodes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ino);
                self.netns_handles
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(handle);
            }
        }
    }

    fn leftover_pids(&self) -> Vec<i32> {
        let inodes = self
            .netns_inodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut pids = pids_in_netns(&inodes);
        for &(pid, st) in self
            .tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if start_time(pid) == Some(st) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids.retain(|&p| alive(p));
        pids
    }

    fn kill_leftovers(&self) {
        for _ in 0..5 {
            let pids = self.leftover_pids();
            if pids.is_empty() {
                return;
            }
            for &p in &pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let left = self.leftover_pids();
        if !left.is_empty() {
            eprintln!("lab {}: could not kill {left:?}", self.name);
        }
    }

    fn dump_logs(&self) {
        let mut files = dir_entries(&self.dir.join("logs"));
        files.sort();
        for f in files {
            let p = self.dir.join("logs").join(&f);
            let s = std::fs::read_to_string(&p).unwrap_or_default();
            if s.trim().is_empty() {
                continue;
            }
            let tail: String = if s.len() > 4000 {
                let mut i = s.len() - 4000;
                while !s.is_char_boundary(i) {
                    i += 1;
                }
                format!("...{}", &s[i..])
            } else {
                s
            };
            eprintln!("--- lab {} log {f} ---\n{tail}", self.name);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let host_alive = self.netns_path(&self.host_ns).exists();
        if host_alive {
            // Learn the containers' processes first, then let md-user tear down (best effort).
            // Nothing here may panic: this can run while a failed test is unwinding.
            let ps = try_run_timeout(
                &mut self.host_md_cmd(&self.md_bin, &["ps", "--json"]),
                Duration::from_secs(15),
            );
            if let Ok(Value::Array(list)) = ps
                .as_ref()
                .map_err(|_| ())
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).map_err(|_| ()))
            {
                for c in list {
                    if let Some(pid) = c.get("pid").and_then(Value::as_i64) {
                        self.track_container(pid as i32);
                    }
                }
            }
            let down = try_run_timeout(
                &mut self.host_md_cmd(&self.md_bin, &["down"]),
                Duration::from_secs(30),
            );
            match down {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "lab {}: md-user down failed\n{}",
                    self.name,
                    show_output(&out)
                ),
                Err(e) => eprintln!("lab {}: md-user down: {e}", self.name),
            }
        }
        self.helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.kill_leftovers();
        if let Err(e) = remove_pin_dir(&self.pin_dir) {
            eprintln!(
                "lab {}: removing {}: {e}",
                self.name,
                self.pin_dir.display()
            );
        }
        let extra = std::mem::take(&mut *self.extra_ns.lock().unwrap_or_else(|e| e.into_inner()));
        for ns in extra.iter().chain([&self.host_ns, &self.outside_ns]) {
            if self.netns_path(ns).exists() {
                let out = Command::new("ip")
                    .args(["netns", "del", ns.as_str()])
                    .output();
                match out {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => eprintln!("lab {}: ip netns del {ns}\n{}", self.name, show_output(&o)),
                    Err(e) => eprintln!("lab {}: ip netns del {ns}: {e}", self.name),
                }
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                eprintln!("lab {}: removing {}: {e}", self.name, self.dir.display());
            }
        }
    }
}

fn dir_entries(p: &Path) -> Vec<String> {
    match std::fs::read_dir(p) {
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// True if something is mounted exactly at `p` (from /proc/self/mountinfo).
pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == want)
}

/// Removes a pin dir: deletes everything inside, unmounts it if a filesystem (bpffs) is mounted
/// exactly there, then removes the directory. A missing dir is fine.
pub fn remove_pin_dir(p: &Path) -> std::io::Result<()> {
    if !p.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(p)?.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL");
    for _ in 0..8 {
        if !is_mountpoint(p) {
            break;
        }
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    std::fs::remove_dir(p)
}

/// Removes labs left by test processes that died without running their `Drop` (SIGKILL, abort):
/// namespaces `mdt-<pid>-*`, pin dirs `md-test-<pid>-*` and temp dirs `mdt-<pid>-*` whose pid is
/// gone. Runs once per test process.
fn sweep_stale_labs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut keys: Vec<String> = Vec::new();
        let mut consider = |key: &str| {
            let Some(pid) = key.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                return;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() && !keys.iter().any(|k| k == key) {
                keys.push(key.to_string());
            }
        };
        let mut extra_ns: Vec<(String, String)> = Vec::new();
        for n in dir_entries(Path::new(NETNS_RUN_DIR)) {
            // mdt-<pid>-<n><hex>-<tag>: the lab's host (h), outside (o) and added namespaces.
            let Some(rest) = n.strip_prefix("mdt-") else {
                continue;
            };
            let parts: Vec<&str> = rest.splitn(3, '-').collect();
            if let [pid, seq, tag] = parts.as_slice() {
                let k = format!("{pid}-{seq}");
                consider(&k);
                if *tag != "h" && *tag != "o" {
                    extra_ns.push((k, n.clone()));
                }
            }
        }
        for n in dir_entries(Path::new(BPFFS_ROOT)) {
            if let Some(k) = n.strip_prefix("md-test-") {
                consider(k);
            }
        }
        for n in dir_entries(&std::env::temp_dir()) {
            if let Some(k) = n.strip_prefix("mdt-") {
                consider(k);
            }
        }
        for key in keys {
            eprintln!("removing stale lab {key}");
            let mut stale = Lab::with_key("stale", &key, md_user_bin());
            *stale.extra_ns.lock().unwrap_or_else(|e| e.into_inner()) = extra_ns
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, n)| n.clone())
                .collect();
            // Its pids are unknown and may have been reused: track nothing from `ps`, only
            // the processes still inside its own namespaces.
            stale.born = u64::MAX;
            let extra = stale
                .extra_ns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for ns in extra.iter().chain([&stale.host_ns, &stale.outside_ns]) {
                if let Some(ino) = ns_inode(stale.netns_path(ns)) {
                    stale
                        .netns_inodes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(ino);
                }
            }
            drop(stale);
        }
    });
}
