//! md's saved state: networks, containers, identities and rules, in one JSON file under an
//! exclusive lock. Every command reads it, reconciles it with what is actually running and
//! writes it back, so the state survives crashes and lets teardown find what setup created.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::{self, DirBuilder, File, OpenOptions, Permissions},
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    ipam::{Subnet, Subnet6},
    policy::PolicyState,
    portmap::PortMapping,
};

pub const DEFAULT_NETWORK: &str = "bridge";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    pub containers: BTreeMap<String, Container>,
    /// Policy identity per container name: stable across restarts so rules follow names.
    pub identities: BTreeMap<String, u32>,
    pub next_identity: u32,
    pub next_network_id: u32,
    pub policy: PolicyState,
    pub datapath: Option<DatapathState>,
    /// Host ports md added to `ip_local_reserved_ports` (and gives back when no container
    /// publishes them any more); entries that were there before are not md's to remove.
    pub reserved_ports: BTreeSet<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Network {
    pub id: u32,
    pub bridge: String,
    pub subnet: Subnet,
    /// Dual-stack networks: the IPv6 subnet (`--ipv6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Subnet6>,
    /// IPv6 routed, not masqueraded (Docker's gateway_mode_ipv6=routed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routed6: bool,
    /// The network's DNS resolver (md-user __dns), while it has containers.
    #[serde(default)]
    pub dns_pid: u32,
    #[serde(default)]
    pub dns_start: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatapathState {
    pub uplink: String,
    pub uplink_ifindex: u32,
    pub uplink_ip: Ipv4Addr,
    pub netns_cookie: u64,
    /// Digest of the eBPF object that is loaded, to refuse mixing builds.
    pub object_digest: String,
    /// `redirect` or `stack` (see `--datapath`).
    #[serde(default = "default_datapath_mode")]
    pub mode: String,
}

fn default_datapath_mode() -> String {
    "stack".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Setup in progress (the supervisor holds the lock).
    Creating,
    Running,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Interface {
    pub network: String,
    pub ip: Ipv4Addr,
    /// The interface's IPv6 address on a dual-stack network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
    /// Host-side veth and its ifindex.
    pub veth: String,
    pub ifindex: u32,
    /// Name inside the container (eth0, eth1, ...).
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub id: String,
    pub hostname: String,
    /// Network mode as given to `run --network`: a network name, `none`, `host` or
    /// `container:NAME`.
    #[serde(default = "default_mode")]
    pub mode: String,
    pub interfaces: Vec<Interface>,
    pub ports: Vec<PortMapping>,
    pub cmd: Vec<String>,
    /// The container's process (CMD), once started.
    pub pid: u32,
    pub pid_start: u64,
    /// The md-user process that waits for CMD and tears down: the foreground run itself or
    /// the detached supervisor.
    pub supervisor_pid: u32,
    pub supervisor_start: u64,
    pub status: Status,
    pub detached: bool,
    pub created_unix: u64,
    /// `run --privileged`: CMD (and `exec`) keep every capability and the host's PID
    /// namespace.
    #[serde(default)]
    pub privileged: bool,
}

fn default_mode() -> String {
    DEFAULT_NETWORK.to_string()
}

impl Container {
    pub fn primary_ip(&self) -> Option<Ipv4Addr> {
        self.interfaces.first().map(|i| i.ip)
    }

    pub fn primary_ip6(&self) -> Option<Ipv6Addr> {
        self.interfaces.first().and_then(|i| i.ip6)
    }

    pub fn on_network(&self, network: &str) -> bool {
        self.interfaces.iter().any(|i| i.network == network)
    }
}

impl State {
    /// Every address handed out on `network`.
    pub fn used_ips(&self, network: &str) -> HashSet<Ipv4Addr> {
        self.containers
            .values()
            .flat_map(|c| c.interfaces.iter())
            .filter(|i| i.network == network)
            .map(|i| i.ip)
            .collect()
    }

    /// Every IPv6 address handed out on `network`.
    pub fn used_ips6(&self, network: &str) -> HashSet<Ipv6Addr> {
        self.containers
            .values()
            .flat_map(|c| c.interfaces.iter())
            .filter(|i| i.network == network)
            .filter_map(|i| i.ip6)
            .collect()
    }

    /// The identity of a name, assigned on first use.
    pub fn identity_for(&mut self, name: &str) -> u32 {
        if let Some(id) = self.identities.get(name) {
            return *id;
        }
        // 0 means "no identity" in the datapath.
        self.next_identity = self.next_identity.max(1);
        let id = self.next_identity;
        self.next_identity += 1;
        self.identities.insert(name.to_string(), id);
        id
    }

    /// Forgets identities no container and no rule uses any more.
    pub fn prune_identities(&mut self) {
        let mut keep: HashSet<&str> = self.containers.keys().map(|s| s.as_str()).collect();
        for r in &self.policy.rules {
            keep.insert(&r.from);
            keep.insert(&r.to);
        }
        let keep: HashSet<String> = keep.into_iter().map(str::to_string).collect();
        self.identities.retain(|name, _| keep.contains(name));
    }
}

/// Paths under the state directory.
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> Self {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Creates (or truncates) a detached container's log, readable by root only: what CMD
    /// prints is the container's business, as in Docker's json-file logs.
    pub fn create_log(&self, name: &str) -> Result<File> {
        let path = self.log_file(name);
        private_dir(path.parent().expect("log dir"))?;
        private_file(&path)
    }

    /// The container's own /etc/hosts and /etc/resolv.conf live here (bind-mounted inside).
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.dir.join("containers").join(name)
    }

    /// Takes the exclusive lock (blocking) and reads the state.
    pub fn lock(&self) -> Result<Locked> {
        private_dir(&self.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join("lock"))
            .with_context(|| format!("opening lock in {}", self.dir.display()))?;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking md state");
        }
        let state = match fs::read(self.file()) {
            Ok(bytes) if !bytes.is_empty() => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", self.file().display()))?,
            Ok(_) => State::default(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.file().display())),
        };
        Ok(Locked {
            state,
            path: self.file(),
            _lock: lock,
        })
    }

    /// Reads the state without the lock (for read-only views while a setup is running).
    pub fn peek(&self) -> Result<State> {
        match fs::read(self.file()) {
            Ok(bytes) if !bytes.is_empty() => Ok(serde_json::from_slice(&bytes)?),
            _ => Ok(State::default()),
        }
    }
}

/// The state with the lock held; released on drop.
pub struct Locked {
    pub state: State,
    path: PathBuf,
    _lock: File,
}

impl Locked {
    /// Deletes the state file (`down`): the next command starts from nothing.
    pub fn remove(&mut self) -> Result<()> {
        self.state = State::default();
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Writes the state atomically (temp file + rename) so a crash never leaves half a file.
    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f = private_file(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.state)?)?;
        f.sync_data().ok();
        fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// A directory only root may enter (0700, like /var/lib/docker's): created if missing, its
/// mode fixed if it exists with another.
fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))
}

/// Creates or truncates a file that only root may read (0600), fixing the mode of one that was
/// there before.
fn private_file(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "md-state-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn round_trip_under_lock() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        {
            let mut l = sd.lock().unwrap();
            assert!(l.state.containers.is_empty());
            let id = l.state.identity_for("web");
            assert_eq!(id, 1);
            assert_eq!(l.state.identity_for("web"), 1);
            assert_eq!(l.state.identity_for("db"), 2);
            l.save().unwrap();
        }
        let l = sd.lock().unwrap();
        assert_eq!(l.state.identities.len(), 2);
        assert_eq!(l.state.next_identity, 3);
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_and_logs_are_root_only() {
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempdir().join("state");
        fs::create_dir_all(&dir).unwrap();
        // An existing, world-readable dir and log get their modes fixed.
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        let sd = StateDir::new(&dir);
        fs::create_dir_all(dir.join("logs")).unwrap();
        fs::write(sd.log_file("old"), "x").unwrap();
        fs::set_permissions(sd.log_file("old"), Permissions::from_mode(0o644)).unwrap();
        let l = sd.lock().unwrap();
        l.save().unwrap();
        sd.create_log("new").unwrap();
        sd.create_log("old").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("state.json")), 0o600);
        assert_eq!(mode(&dir.join("lock")), 0o600);
        assert_eq!(mode(&dir.join("logs")), 0o700);
        assert_eq!(mode(&sd.log_file("new")), 0o600);
        assert_eq!(mode(&sd.log_file("old")), 0o600);
        assert_eq!(fs::read(sd.log_file("old")).unwrap(), b"", "truncated");
        drop(l);
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn lock_is_exclusive_across_threads() {
        let dir = tempdir();
        let counter_file = dir.join("n");
        fs::write(&counter_file, "0").unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                let counter_file = counter_file.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _l = StateDir::new(&dir).lock().unwrap();
                        let n: u32 = fs::read_to_string(&counter_file).unwrap().parse().unwrap();
                        std::thread::yield_now();
                        fs::write(&counter_file, (n + 1).to_string()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read_to_string(&counter_file).unwrap(), "160");
        fs::remove_dir_all(&dir).unwrap();
    }
}
