//! A multi-host lab (issue 17): three md hosts, each a [`Lab`] of its own (host and outside
//! namespaces, its own state and pin dirs), on one underlay, and Debian's etcd in a namespace
//! of its own, its data in the first lab's temp dir.
//!
//! ```text
//!   <lab1>-ul (switch): bridge br0
//!     ├── host N: ul0 198.51.100.1N/24 (N = 1, 2, 3), next to up0 to its own outside
//!     └── <lab1>-etcd: eth0 198.51.100.2/24, etcd listening there only (2379, 2380)
//! ```
//! Every link is made inside the namespaces (`ip -n`), never in the root namespace. Dropping
//! the cluster runs `md-user down` on every host while etcd still answers, stops etcd, then
//! drops the labs (which remove their namespaces, the switch's and etcd's included).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use crate::process::{alive, ns_inode, pids_in_netns, run_timeout, show_output};
use crate::{require_tools, wait_until, Bg, Lab, MD_TIMEOUT};

/// etcd's address on the underlay, and the store URL md-user is given.
pub const ETCD_IP: &str = "198.51.100.2";
pub const STORE: &str = "etcd://198.51.100.2:2379";
/// The underlay's prefix length.
const UNDERLAY_PREFIX: u8 = 24;

/// Host `i`'s (0-based) address on the underlay.
pub fn underlay_ip(i: usize) -> String {
    format!("198.51.100.{}", 11 + i)
}

pub struct Cluster {
    pub hosts: Vec<Lab>,
    /// The etcd namespace's /run/netns path.
    etcd_ns: PathBuf,
    etcd: Mutex<Option<Bg>>,
    data_dir: PathBuf,
    ttl: u32,
}

fn ip(args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    let out = run_timeout(&mut c, Duration::from_secs(15));
    assert!(
        out.status.success(),
        "ip {}\n{}",
        args.join(" "),
        show_output(&out)
    );
}

impl Cluster {
    /// Three hosts, the underlay and a running etcd. `ttl`: seconds a host's registrations
    /// outlive it (`MD_STORE_TTL`).
    #[track_caller]
    pub fn new(name: &str, ttl: u32) -> Cluster {
        require_tools(&["etcd", "etcdctl", "ip", "curl", "ping", "python3"]);
        let hosts: Vec<Lab> = (1..=3).map(|i| Lab::new(&format!("{name}-h{i}"))).collect();
        let sw_path = hosts[0].add_netns("ul");
        let sw = ns_name(&sw_path);
        let etcd_ns = hosts[0].add_netns("etcd");
        let etcd_name = ns_name(&etcd_ns);
        let data_dir = hosts[0].dir().join("etcd");
        let c = Cluster {
            hosts,
            etcd_ns,
            etcd: Mutex::new(None),
            data_dir,
            ttl,
        };
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        let link = |ns: &str, dev: &str, port: &str, addr: &str| {
            ip(&[
                "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", &sw,
            ]);
            let cidr = format!("{addr}/{UNDERLAY_PREFIX}");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", &sw, "link", "set", port, "master", "br0", "up"]);
        };
        link(&etcd_name, "eth0", "etcd", ETCD_IP);
        for (i, h) in c.hosts.iter().enumerate() {
            link(h.host_ns(), "ul0", &format!("h{i}"), &underlay_ip(i));
            // The hosts' own resolver has no upstream: names are md's or nothing.
            std::fs::write(h.dir().join("resolv.conf"), "").expect("resolv.conf");
        }
        c.start_etcd();
        c
    }

    pub fn host(&self, i: usize) -> &Lab {
        &self.hosts[i]
    }

    /// md-user on host `i` with the cluster's store, TTL and an upstream-less resolv.conf.
    pub fn md_cmd(&self, i: usize, args: &[&str]) -> Command {
        let h = &self.hosts[i];
        let mut c = h.host_md_cmd(h.md_bin(), args);
        c.env("MD_STORE", STORE)
            .env("MD_STORE_TTL", self.ttl.to_string())
            .env("MD_RESOLV_CONF", h.dir().join("resolv.conf"));
        c
    }

    #[track_caller]
    pub fn md(&self, i: usize, args: &[&str]) -> Output {
        run_timeout(&mut self.md_cmd(i, args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn md_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.md(i, args);
        assert!(
            out.status.success(),
            "host {i}: md-user {}\n{}",
            args.join(" "),
            show_output(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts etcd (again) on the same data dir.
    #[track_caller]
    pub fn start_etcd(&self) {
        let client = format!("http://{ETCD_IP}:2379");
        let peer = format!("http://{ETCD_IP}:2380");
        let data = self.data_dir.to_string_lossy().into_owned();
        let cluster = format!("lab={peer}");
        let bg = self.hosts[0].spawn_in_netns(
            &self.etcd_ns,
            &[
                "etcd",
                "--name",
                "lab",
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
                "--listen-metrics-urls",
                "",
            ],
        );
        self.hosts[0].track_pid(bg.pid());
        *self.etcd.lock().unwrap_or_else(|e| e.into_inner()) = Some(bg);
        wait_until("etcd answers", Duration::from_secs(30), || {
            self.etcdctl(&["endpoint", "health"]).status.success()
        });
    }

    /// Stops etcd (SIGKILL: as abrupt as a crash; its data stays).
    pub fn stop_etcd(&self) {
        let bg = self.etcd.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bg) = bg {
            let pid = bg.pid();
            drop(bg);
            wait_until("etcd exits", Duration::from_secs(10), || !alive(pid));
        }
    }

    /// `etcdctl ARGS` against the lab's etcd, from its namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoint = format!("--endpoints=http://{ETCD_IP}:2379");
        let mut a = vec![
            "etcdctl",
            endpoint.as_str(),
            "--dial-timeout=2s",
            "--command-timeout=3s",
        ];
        a.extend_from_slice(args);
        self.hosts[0].in_netns(&self.etcd_ns, &a)
    }

    /// The store's keys under /md/ (one per line).
    #[track_caller]
    pub fn store_keys(&self, prefix: &str) -> Vec<String> {
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", prefix]);
        assert!(out.status.success(), "etcdctl get\n{}", show_output(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Kills host `i` as a power cut would: every process of its host namespace (its watcher,
    /// the containers' supervisors, resolvers) with SIGKILL; its containers die with their
    /// supervisors. Nothing tells the store.
    pub fn kill_host(&self, i: usize) {
        let h = &self.hosts[i];
        let ino = ns_inode(format!("/run/netns/{}", h.host_ns())).expect("host namespace");
        for _ in 0..5 {
            let pids = pids_in_netns(&[ino].into_iter().collect());
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn ns_name(path: &std::path::Path) -> String {
    path.file_name()
        .expect("netns name")
        .to_string_lossy()
        .into_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // `down` on every host while the store answers (each revokes its lease), then etcd.
        for i in 0..self.hosts.len() {
            let _ = crate::process::try_run_timeout(
                &mut self.md_cmd(i, &["down"]),
                Duration::from_secs(30),
            );
        }
        self.stop_etcd();
    }
}
