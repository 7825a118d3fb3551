//! md's saved state: networks, containers, identities and rules, in a SQLite database
//! (`state.db`, Podman's choice too) under an exclusive lock. Every command reads the small part
//! every command needs (networks, containers, counters), reconciles it with what is actually
//! running and writes back only what changed; identities and rules stay in their tables and are
//! read and written one by one, so one policy change costs the same at 10 rules and at 10,000.
//! Everything a command writes commits at once (`Locked::save`) or not at all (a command that
//! fails or dies before saving leaves the state as it was). A `state.json` of an earlier md is
//! taken over on first use.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::{self, DirBuilder, File, OpenOptions, Permissions},
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{
    ipam::{Subnet, Subnet6},
    policy::{PolicyState, Rule, Verdict},
    portmap::PortMapping,
};

pub const DEFAULT_NETWORK: &str = "bridge";

/// What every command reads: networks, containers and counters. Identities and rules are in
/// the store (see [`Locked`]).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    /// Stored one row each: a command writes only the containers it changed.
    #[serde(skip)]
    pub containers: BTreeMap<String, Container>,
    pub next_identity: u32,
    pub next_network_id: u32,
    pub policy: PolicyState,
    pub datapath: Option<DatapathState>,
    /// Host ports md added to `ip_local_reserved_ports` (and gives back when no container
    /// publishes them any more); entries that were there before are not md's to remove.
    pub reserved_ports: BTreeSet<u16>,
    /// What Docker knows md by (`md-user docker-plugin`): its networks, pools, addresses and
    /// endpoints.
    #[serde(default, skip_serializing_if = "DockerState::is_empty")]
    pub docker: DockerState,
    /// Where identities and rules are read and written (inside the lock's transaction).
    #[serde(skip)]
    pub store: Store,
    /// This host's membership of a cluster of hosts sharing overlay networks (issue 17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    /// Containers on other hosts of this host's overlay networks, as the store last said
    /// (written by the watcher; the resolver answers their names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote: BTreeMap<String, RemoteContainer>,
}

/// This host in a cluster: the store, its id and underlay address, and the lease its
/// registrations hang on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cluster {
    /// `etcd://HOST:PORT[,...]`.
    pub store: String,
    pub host_id: String,
    /// The underlay address: VXLAN packets come from and go to it, native routes point to it.
    pub addr: Ipv4Addr,
    /// Its interface's MTU.
    pub underlay_mtu: u32,
    pub lease: i64,
    /// Seconds the lease lives without a keep-alive.
    pub ttl: u32,
}

/// A container on another host, as the store said (see [`State::remote`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteContainer {
    pub network: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub host: String,
    pub addr: Ipv4Addr,
    pub hostname: String,
}

/// What makes a network an overlay across hosts; its `subnet` is then this host's block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Overlay {
    /// The whole network's subnet, shared by every host.
    pub subnet: Subnet,
    /// `tunnel` or `native`.
    pub mode: String,
    /// The MTU its containers get: the underlay's less the encapsulation (tunnel mode).
    pub mtu: u32,
}

/// A handle on the database that holds identities and rules. A state that was never stored
/// (unit tests) gets a private in-memory database on first use.
#[derive(Clone, Default)]
pub struct Store(Arc<Mutex<Option<Connection>>>);

impl Store {
    fn new(conn: Connection) -> Store {
        Store(Arc::new(Mutex::new(Some(conn))))
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let conn = Connection::open_in_memory().map_err(sql_context("opening"))?;
            conn.execute_batch(SCHEMA)
                .map_err(sql_context("creating tables"))?;
            *slot = Some(conn);
        }
        f(slot.as_ref().expect("just set"))
    }
}

impl PartialEq for Store {
    /// The handle is not part of what is compared (what changed is the data).
    fn eq(&self, _: &Store) -> bool {
        true
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Set for an overlay network spanning hosts (issue 17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Overlay>,
    /// `--gateway`: the bridge's address [default: the subnet's first].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// `--ip-range`: where addresses are allocated from [default: the whole subnet].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Subnet>,
    /// `--mtu`: of the bridge, the veths and the containers' interfaces [default: the
    /// kernel's, 1500].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `--internal`: no way out, no published ports.
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub gateway_mode: GatewayMode,
    /// The `--opt`s as given (Docker's `Options` in `network inspect`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Docker-style network id (64 hex digits) and creation time, for `network inspect`.
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub created_unix: u64,
}

/// How a network meets the world beyond the host (Docker 28's `gateway_mode_ipv4`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayMode {
    /// Masquerade outbound, published ports on host addresses.
    #[default]
    Nat,
    /// No masquerade: container addresses are routed; from outside only published container
    /// ports are reachable, on the container's own address and port.
    Routed,
    /// Internal and without an address on the bridge: not even the host is reachable.
    Isolated,
}

impl GatewayMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayMode::Nat => "nat",
            GatewayMode::Routed => "routed",
            GatewayMode::Isolated => "isolated",
        }
    }
}

impl std::str::FromStr for GatewayMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "nat" => GatewayMode::Nat,
            "routed" => GatewayMode::Routed,
            "isolated" => GatewayMode::Isolated,
            // Docker's nat-unprotected opens every container port to direct routing, the one
            // thing md's datapath is there to prevent.
            _ => anyhow::bail!("unknown gateway mode {s:?} (nat, routed or isolated)"),
        })
    }
}

impl Network {
    /// The gateway address: the bridge's, the containers' default route and where the
    /// resolver listens. An isolated network reserves it but the bridge does not take it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway.unwrap_or_else(|| self.subnet.gateway())
    }

    /// Whether the bridge has an address (all but isolated networks).
    pub fn has_gateway(&self) -> bool {
        self.gateway_mode != GatewayMode::Isolated
    }

    /// The containers' default route: none on an internal network (no way out).
    pub fn default_route(&self) -> Option<Ipv4Addr> {
        (!self.internal).then(|| self.gateway())
    }

    pub fn routed(&self) -> bool {
        self.gateway_mode == GatewayMode::Routed && !self.internal
    }

    /// The datapath's flags for this network (NETWORKS).
    pub fn datapath_flags(&self) -> u32 {
        let mut f = 0;
        if self.internal {
            f |= md_common::NET_INTERNAL;
        }
        if self.routed() {
            f |= md_common::NET_ROUTED4;
        }
        if self.subnet6.is_some() {
            f |= md_common::NET_IPV6;
            if self.routed6 && !self.internal {
                f |= md_common::NET_ROUTED6;
            }
        }
        f
    }

    /// The Docker-style id shown by `network inspect`.
    pub fn docker_id(&self) -> String {
        if self.uid.is_empty() {
            format!("{:064x}", self.id)
        } else {
            self.uid.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// The container end's name in md's host namespace, for an interface md hands over to a
    /// runtime that moves it into its sandbox and configures it itself (Docker); `md` + 8 hex
    /// digits, so the watcher never takes it for an uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<String>,
    /// Names the container also answers to on this interface's network (`run
    /// --network-alias`, `network connect --alias`), shared by any number of containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Extra names the container answers to on every network it is on: only in the records
    /// of earlier mds (CNI `aliases` now go on the interface, network by network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Set when a runtime attached the container through md's CNI plugin: no supervisor then,
    /// the container lives as long as its network namespace (and so its veths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniOwner>,
    /// `run --privileged`: CMD (and `exec`) keep every capability and the host's PID
    /// namespace.
    #[serde(default)]
    pub privileged: bool,
    /// The container's resolv.conf settings (`--dns`, `--dns-search`, `--dns-option`).
    #[serde(default, skip_serializing_if = "DnsSettings::is_empty")]
    pub dns: DnsSettings,
    /// `--add-host` entries of its /etc/hosts (`host-gateway` already resolved).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<ExtraHost>,
    /// `--expose`d ports (published on random host ports with `-P`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed: Vec<(u16, crate::portmap::Proto)>,
    /// Set when Docker attached the container through `md-user docker-plugin`: no supervisor
    /// either; it lives while its veths do, until Docker deletes its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerOwner>,
}

/// Who attached a Docker container, as Docker names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerOwner {
    /// Docker's sandbox key (`<exec-root>/netns/<id>`): one md container per sandbox.
    pub sandbox: String,
    /// Docker's container id, when its API told it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The host-side veth of each joined Docker endpoint, by endpoint id.
    pub endpoints: BTreeMap<String, String>,
    /// How many interfaces Docker has moved into the sandbox (it names the next `eth<N>`).
    #[serde(default)]
    pub next_if: u32,
}

/// md's side of Docker's networks (see `docker/`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerState {
    /// Docker network id → md network.
    pub networks: BTreeMap<String, String>,
    /// md networks the plugin made for Docker: removed once no Docker network, pool or
    /// container uses them.
    pub made: BTreeSet<String>,
    /// Pools md's IPAM driver handed out: pool id → subnet.
    pub pools: BTreeMap<String, Subnet>,
    /// Addresses md's IPAM driver handed out and Docker has not released, by pool id. They
    /// count as taken for every allocation on that subnet (`md-user run` included).
    pub leases: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Endpoints Docker created, by endpoint id.
    pub endpoints: BTreeMap<String, DockerEndpoint>,
}

impl DockerState {
    pub fn is_empty(&self) -> bool {
        self == &DockerState::default()
    }

    /// Addresses leased from pools of exactly `subnet`.
    pub fn leased_in<'a>(&'a self, subnet: &'a Subnet) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.pools
            .iter()
            .filter(move |(_, s)| *s == subnet)
            .filter_map(|(id, _)| self.leases.get(id))
            .flatten()
            .copied()
    }
}

/// An endpoint as Docker created it (before and after it joins a sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    /// Docker network id.
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// What a container's resolv.conf says besides its network's resolver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsSettings {
    /// `--dns`: where the resolver forwards this container's other names [default: the
    /// host's nameservers].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<std::net::IpAddr>,
    /// `search` domains: `--dns-search`, else the host's (read when the container started).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// `options`: `--dns-option`, else the host's; `ndots:0` added when none sets ndots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl DnsSettings {
    pub fn is_empty(&self) -> bool {
        *self == DnsSettings::default()
    }
}

/// One `--add-host NAME:IP` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraHost {
    pub name: String,
    pub ip: std::net::IpAddr,
}

/// Who attached a CNI container, as the runtime names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniOwner {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS at ADD time.
    pub netns: String,
    /// The CNI network (configuration `name`) of each interface, by interface name.
    pub networks: BTreeMap<String, String>,
}

fn default_mode() -> String {
    DEFAULT_NETWORK.to_string()
}

impl Network {
    /// The addresses this network takes on every host: an overlay's whole subnet, else its own.
    pub fn span(&self) -> Subnet {
        self.overlay.as_ref().map_or(self.subnet, |o| o.subnet)
    }
}

impl Container {
    pub fn primary_ip(&self) -> Option<Ipv4Addr> {
        self.interfaces.first().map(|i| i.ip)
    }

    pub fn primary_ip6(&self) -> Option<Ipv6Addr> {
        self.interfaces.first().and_then(|i| i.ip6)
    }

    /// Every alias the container answers to on some network, each once (`ps` and `inspect`
    /// list them all; the per-network lists are under each network).
    pub fn all_aliases(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for a in self
            .aliases
            .iter()
            .chain(self.interfaces.iter().flat_map(|i| &i.aliases))
        {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        all
    }

    pub fn on_network(&self, network: &str) -> bool {
        self.interfaces.iter().any(|i| i.network == network)
    }

    /// Attached by a runtime (CNI or Docker): no supervisor, no command of md's; the runtime
    /// writes its files and stops it.
    pub fn runtime_owned(&self) -> bool {
        self.cni.is_some() || self.docker.is_some()
    }
}

impl State {
    /// Every address handed out on `network`: on interfaces, leased to Docker by md's IPAM
    /// driver on its subnet, and given to Docker endpoints that have not joined yet.
    pub fn used_ips(&self, network: &str) -> HashSet<Ipv4Addr> {
        let mut used = self.interface_ips(network);
        if let Some(net) = self.networks.get(network) {
            used.extend(self.docker.leased_in(&net.subnet));
        }
        used.extend(
            self.docker
                .endpoints
                .values()
                .filter(|e| {
                    self.docker.networks.get(&e.network).map(String::as_str) == Some(network)
                })
                .map(|e| e.ip),
        );
        used
    }

    /// The addresses of interfaces on `network`.
    pub fn interface_ips(&self, network: &str) -> HashSet<Ipv4Addr> {
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

    /// The identity of a name, if it has one.
    pub fn identity(&self, name: &str) -> Result<Option<u32>> {
        self.store.with(|c| {
            c.prepare_cached("SELECT id FROM identities WHERE name = ?1")
                .and_then(|mut s| s.query_row(params![name], |r| r.get(0)).optional())
                .map_err(sql_context("reading an identity"))
        })
    }

    /// The identity of a name, assigned on first use. Identities are stable per name across
    /// restarts so rules follow names; 0 means "no identity" in the datapath.
    pub fn identity_for(&mut self, name: &str) -> Result<u32> {
        if let Some(id) = self.identity(name)? {
            return Ok(id);
        }
        self.next_identity = self.next_identity.max(1);
        let id = self.next_identity;
        self.next_identity += 1;
        self.store.with(|c| {
            c.prepare_cached("INSERT INTO identities (name, id) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![name, id]))
                .map_err(sql_context("writing an identity"))
        })?;
        Ok(id)
    }

    /// Gives `name` the identity `id` (one the store handed out, the same on every host);
    /// returns the one it had before, if it differs.
    pub fn set_identity(&mut self, name: &str, id: u32) -> Result<Option<u32>> {
        let old = self.identity(name)?;
        if old == Some(id) {
            return Ok(None);
        }
        self.store.with(|c| {
            // Another name holding `id` (a local identity counted up to the cluster range)
            // gives it up: the store's word wins.
            c.prepare_cached("DELETE FROM identities WHERE id = ?1 AND name != ?2")
                .and_then(|mut s| s.execute(params![id, name]))
                .and_then(|_| {
                    c.prepare_cached(
                        "INSERT INTO identities (name, id) VALUES (?1, ?2)
                         ON CONFLICT (name) DO UPDATE SET id = excluded.id",
                    )
                })
                .and_then(|mut s| s.execute(params![name, id]))
                .map_err(sql_context("writing an identity"))
        })?;
        Ok(old)
    }

    /// Every identity by name.
    pub fn identities(&self) -> Result<BTreeMap<String, u32>> {
        self.store.with(|c| Ok(read_policy(c)?.identities))
    }

    /// Every rule, in the order they were first set.
    pub fn rules(&self) -> Result<Vec<Rule>> {
        self.store.with(|c| rules_where(c, "", []))
    }

    /// The rules that name `name` on either side.
    pub fn rules_of(&self, name: &str) -> Result<Vec<Rule>> {
        self.store
            .with(|c| rules_where(c, "WHERE src = ?1 OR dst = ?1", params![name]))
    }

    /// The verdict of the rule FROM → TO, if there is one.
    pub fn rule(&self, from: &str, to: &str) -> Result<Option<Verdict>> {
        self.store.with(|c| {
            c.prepare_cached("SELECT verdict FROM rules WHERE src = ?1 AND dst = ?2")
                .and_then(|mut s| {
                    s.query_row(params![from, to], |r| r.get::<_, String>(0))
                        .optional()
                })
                .map(|v| v.map(|v| verdict_of(&v)))
                .map_err(sql_context("reading a rule"))
        })
    }

    /// Sets a rule; returns whether it changed anything.
    pub fn put_rule(&mut self, r: &Rule) -> Result<bool> {
        if self.rule(&r.from, &r.to)? == Some(r.verdict) {
            return Ok(false);
        }
        self.store.with(|c| {
            c.prepare_cached(
                "INSERT INTO rules (src, dst, verdict) VALUES (?1, ?2, ?3)
                 ON CONFLICT (src, dst) DO UPDATE SET verdict = excluded.verdict",
            )
            .and_then(|mut s| s.execute(params![r.from, r.to, r.verdict.to_string()]))
            .map_err(sql_context("writing a rule"))
        })?;
        Ok(true)
    }

    /// Forgets the identity of `name` when no container and no rule uses it any more.
    pub fn prune_identity(&mut self, name: &str) -> Result<()> {
        if self.containers.contains_key(name) {
            return Ok(());
        }
        self.store.with(|c| {
            c.prepare_cached(
                "DELETE FROM identities WHERE name = ?1
                 AND NOT EXISTS (SELECT 1 FROM rules WHERE src = ?1 OR dst = ?1)",
            )
            .and_then(|mut s| s.execute(params![name]))
            .map_err(sql_context("forgetting an identity"))
        })?;
        Ok(())
    }
}

/// An earlier md's `state.json`: everything in one document, identities and rules included.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LegacyState {
    #[serde(flatten)]
    state: State,
    containers: BTreeMap<String, Container>,
    identities: BTreeMap<String, u32>,
    policy: LegacyPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LegacyPolicy {
    default: Verdict,
    rules: Vec<Rule>,
}

/// Policy as stored: identities by name and rules.
#[derive(Debug, Default, Clone)]
struct PolicySnapshot {
    identities: BTreeMap<String, u32>,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS doc (key TEXT PRIMARY KEY, json TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS containers (name TEXT PRIMARY KEY, json TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS identities (name TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE);
    CREATE TABLE IF NOT EXISTS rules (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        src TEXT NOT NULL, dst TEXT NOT NULL, verdict TEXT NOT NULL,
        UNIQUE (src, dst));
    CREATE INDEX IF NOT EXISTS rules_dst ON rules (dst);
";

fn verdict_of(s: &str) -> Verdict {
    if s == "deny" {
        Verdict::Deny
    } else {
        Verdict::Allow
    }
}

fn sql_context(what: &'static str) -> impl FnOnce(rusqlite::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("md state ({what}): {e}")
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

    fn db(&self) -> PathBuf {
        self.dir.join("state.db")
    }

    fn legacy_file(&self) -> PathBuf {
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

    /// Opens the database for writing (root-only, WAL), creating its tables.
    fn open_rw(&self) -> Result<Connection> {
        let db = self.db();
        if !db.exists() {
            // SQLite gives its -wal and -shm files the database's mode: make it root-only.
            drop(private_file(&db)?);
        }
        let conn = Connection::open(&db)
            .map_err(sql_context("opening"))
            .with_context(|| format!("opening {}", db.display()))?;
        // WAL, no fsync per commit (synchronous NORMAL: durable at checkpoints, never torn),
        // and no checkpoint when a command closes the database: a policy change then costs a
        // few page writes, not four fsyncs.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;",
        )
        .map_err(sql_context("configuring"))?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(sql_context("configuring"))?;
        conn.execute_batch(SCHEMA)
            .map_err(sql_context("creating tables"))?;
        Ok(conn)
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
        // No database yet: work in memory and create the file only when something is saved,
        // so a command that only looks (a supervisor waking up after `down`) leaves nothing.
        let fresh = !self.db().exists();
        let store = if fresh {
            Store::default()
        } else {
            let conn = self.open_rw()?;
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(sql_context("beginning"))?;
            Store::new(conn)
        };
        let mut locked = Locked {
            state: State {
                store: store.clone(),
                ..State::default()
            },
            saved: State::default(),
            store: store.clone(),
            db: self.db(),
            dir: StateDir::new(&self.dir),
            fresh,
            _lock: lock,
        };
        self.migrate(&mut locked)?;
        locked.state = store.with(read_state)?;
        locked.state.store = store;
        locked.saved = locked.state.clone();
        Ok(locked)
    }

    /// Takes over an earlier md's state.json (once: it is removed after the move commits).
    fn migrate(&self, locked: &mut Locked) -> Result<()> {
        let file = self.legacy_file();
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let legacy: LegacyState = if bytes.is_empty() {
            LegacyState::default()
        } else {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", file.display()))?
        };
        let store = locked.state.store.clone();
        let mut state = legacy.state;
        state.containers = legacy.containers;
        state.policy.default = legacy.policy.default;
        state.store = store.clone();
        locked.state = state;
        locked.saved = State::default();
        for (name, id) in &legacy.identities {
            store.with(|c| {
                c.execute(
                    "INSERT OR REPLACE INTO identities (name, id) VALUES (?1, ?2)",
                    params![name, id],
                )
                .map_err(sql_context("migrating identities"))
            })?;
        }
        for r in &legacy.policy.rules {
            locked.state.put_rule(r)?;
        }
        locked.save()?;
        fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        Ok(())
    }

    fn open_ro(&self) -> Result<Option<Connection>> {
        if !self.db().exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            self.db(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_context("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql_context("configuring"))?;
        Ok(Some(conn))
    }

    /// Reads the state without the lock (for read-only views while a setup is running).
    pub fn peek(&self) -> Result<State> {
        match self.open_ro()? {
            Some(conn) => {
                let mut state = read_state(&conn)?;
                state.store = Store::new(conn);
                Ok(state)
            }
            None => Ok(State::default()),
        }
    }

    /// A reader that can tell cheaply whether the state changed since it last looked.
    pub fn reader(&self) -> StateReader {
        StateReader {
            dir: StateDir::new(&self.dir),
            conn: None,
            version: None,
        }
    }
}

fn read_state(conn: &Connection) -> Result<State> {
    let doc: Option<String> = conn
        .query_row("SELECT json FROM doc WHERE key = 'state'", [], |r| r.get(0))
        .optional()
        .map_err(sql_context("reading"))?;
    let mut state: State = match doc {
        Some(j) => serde_json::from_str(&j).context("parsing md's state")?,
        None => State::default(),
    };
    let mut stmt = conn
        .prepare_cached("SELECT name, json FROM containers")
        .map_err(sql_context("reading containers"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(sql_context("reading containers"))?;
    for row in rows {
        let (name, json) = row.map_err(sql_context("reading containers"))?;
        let c: Container = serde_json::from_str(&json)
            .with_context(|| format!("parsing container {name} in md's state"))?;
        state.containers.insert(name, c);
    }
    Ok(state)
}

fn read_policy(conn: &Connection) -> Result<PolicySnapshot> {
    let mut out = PolicySnapshot::default();
    let mut stmt = conn
        .prepare_cached("SELECT name, id FROM identities")
        .map_err(sql_context("reading identities"))?;
    for row in stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))
        .map_err(sql_context("reading identities"))?
    {
        let (n, id) = row.map_err(sql_context("reading identities"))?;
        out.identities.insert(n, id);
    }
    Ok(out)
}

fn rules_where<P: rusqlite::Params>(conn: &Connection, cond: &str, p: P) -> Result<Vec<Rule>> {
    let sql = format!("SELECT src, dst, verdict FROM rules {cond} ORDER BY seq");
    let mut stmt = conn
        .prepare_cached(&sql)
        .map_err(sql_context("reading rules"))?;
    let rows = stmt
        .query_map(p, |r| {
            Ok(Rule {
                from: r.get(0)?,
                to: r.get(1)?,
                verdict: verdict_of(&r.get::<_, String>(2)?),
            })
        })
        .map_err(sql_context("reading rules"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_context("reading rules"))
}

/// See [`StateDir::reader`].
pub struct StateReader {
    dir: StateDir,
    conn: Option<Connection>,
    version: Option<i64>,
}

impl StateReader {
    /// The state when it changed since the last call (or on the first), else None.
    pub fn changed(&mut self) -> Option<State> {
        if self.conn.is_none() || !self.dir.db().exists() {
            self.conn = self.dir.open_ro().ok().flatten();
            self.version = None;
        }
        let conn = self.conn.as_ref()?;
        // data_version changes when another connection commits to the database.
        let v: i64 = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .ok()?;
        if self.version == Some(v) {
            return None;
        }
        self.version = Some(v);
        read_state(conn).ok()
    }
}

/// The state with the lock held; released on drop. Changes are written by [`Locked::save`];
/// whatever was not saved when it drops (a failed command) is rolled back.
pub struct Locked {
    pub state: State,
    /// The state as stored, to write only what changed.
    saved: State,
    /// The connection (and its transaction), also when `state` was taken out.
    store: Store,
    db: PathBuf,
    dir: StateDir,
    /// The database file does not exist yet: `store` is in memory until the first save.
    fresh: bool,
    _lock: File,
}

impl Locked {
    /// Deletes the state (`down`): the next command starts from nothing.
    pub fn remove(&mut self) -> Result<()> {
        let store = self.store.clone();
        if self.fresh {
            self.state = State {
                store,
                ..State::default()
            };
            self.saved = self.state.clone();
            return Ok(());
        }
        self.state = State {
            store: store.clone(),
            ..State::default()
        };
        self.saved = self.state.clone();
        store.with(|c| {
            let _ = c.execute_batch("ROLLBACK");
            for t in ["doc", "containers", "identities", "rules"] {
                c.execute(&format!("DELETE FROM {t}"), [])
                    .map_err(sql_context("clearing"))?;
            }
            let _ = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            Ok(())
        })?;
        for ext in ["", "-wal", "-shm"] {
            let p = PathBuf::from(format!("{}{ext}", self.db.display()));
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", p.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Commits what changed: the document (networks, counters…) when it did, each container
    /// added, changed or removed, and every identity and rule written since the last save.
    pub fn save(&mut self) -> Result<()> {
        if self.fresh {
            // The first save: the in-memory database (identities and rules so far) becomes
            // the file, and the rest is written to it below.
            let db = self.db.to_string_lossy().into_owned();
            self.store.with(|c| {
                c.execute("VACUUM INTO ?1", params![db])
                    .map_err(sql_context("creating"))
            })?;
            fs::set_permissions(&self.db, Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", self.db.display()))?;
            let conn = self.dir.open_rw()?;
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(sql_context("beginning"))?;
            *self.store.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
            self.fresh = false;
        }
        let (state, saved) = (&self.state, &self.saved);
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        state.store.with(|conn| {
            let json = serde_json::to_string(state)?;
            if json != serde_json::to_string(saved)? {
                conn.execute(
                    "INSERT OR REPLACE INTO doc (key, json) VALUES ('state', ?1)",
                    params![json],
                )
                .map_err(sql_context("writing"))?;
            }
            for (name, c) in &state.containers {
                if saved.containers.get(name) != Some(c) {
                    conn.execute(
                        "INSERT OR REPLACE INTO containers (name, json) VALUES (?1, ?2)",
                        params![name, serde_json::to_string(c)?],
                    )
                    .map_err(sql_context("writing a container"))?;
                    changed.push(name.clone());
                }
            }
            for name in saved.containers.keys() {
                if !state.containers.contains_key(name) {
                    conn.execute("DELETE FROM containers WHERE name = ?1", params![name])
                        .map_err(sql_context("removing a container"))?;
                    removed.push(name.clone());
                }
            }
            conn.execute_batch("COMMIT")
                .map_err(sql_context("committing"))?;
            // The first command to open the database reads the whole WAL to rebuild its index
            // (nothing checkpoints on close): keep it short, so one change stays a few pages.
            if wal_len(&self.db) > WAL_CHECKPOINT_BYTES {
                let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            }
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(sql_context("beginning"))
        })?;
        // The stored copy follows by the containers that changed: cloning a thousand
        // unchanged ones on every save cost milliseconds.
        let mut containers = std::mem::take(&mut self.saved.containers);
        for name in removed {
            containers.remove(&name);
        }
        for name in changed {
            containers.insert(name.clone(), self.state.containers[&name].clone());
        }
        let current = std::mem::take(&mut self.state.containers);
        self.saved = self.state.clone();
        self.state.containers = current;
        self.saved.containers = containers;
        Ok(())
    }
}

/// Past this, a save checkpoints the WAL into the database and empties it.
const WAL_CHECKPOINT_BYTES: u64 = 256 << 10;

fn wal_len(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
}

impl Drop for Locked {
    /// What was not saved is rolled back; a state taken out of the lock (`reconciled`) keeps
    /// reading through the same connection, outside any transaction.
    fn drop(&mut self) {
        let _ = self.store.with(|c| Ok(c.execute_batch("ROLLBACK")));
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
    use crate::policy::Verdict;

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
            let id = l.state.identity_for("web").unwrap();
            assert_eq!(id, 1);
            assert_eq!(l.state.identity_for("web").unwrap(), 1);
            assert_eq!(l.state.identity_for("db").unwrap(), 2);
            l.save().unwrap();
        }
        let l = sd.lock().unwrap();
        assert_eq!(l.state.identities().unwrap().len(), 2);
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
        let mut l = sd.lock().unwrap();
        l.save().unwrap();
        sd.create_log("new").unwrap();
        sd.create_log("old").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("state.db")), 0o600);
        assert_eq!(mode(&dir.join("state.db-wal")), 0o600);
        assert_eq!(mode(&dir.join("lock")), 0o600);
        assert_eq!(mode(&dir.join("logs")), 0o700);
        assert_eq!(mode(&sd.log_file("new")), 0o600);
        assert_eq!(mode(&sd.log_file("old")), 0o600);
        assert_eq!(fs::read(sd.log_file("old")).unwrap(), b"", "truncated");
        drop(l);
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_earlier_state_json_is_taken_over_once() {
        let dir = tempdir();
        let legacy = serde_json::json!({
            "networks": {"bridge": {"id": 1, "bridge": "md0",
                "subnet": {"network": "172.18.0.0", "prefix_len": 16}}},
            "containers": {},
            "identities": {"web": 1, "db": 2},
            "next_identity": 3,
            "next_network_id": 2,
            "policy": {"default": "deny", "rules": [
                {"from": "web", "to": "db", "verdict": "deny"}]},
        });
        fs::write(dir.join("state.json"), legacy.to_string()).unwrap();
        let sd = StateDir::new(&dir);
        {
            let l = sd.lock().unwrap();
            assert_eq!(l.state.networks["bridge"].bridge, "md0");
            assert_eq!(l.state.policy.default, Verdict::Deny);
            assert_eq!(l.state.next_identity, 3);
            assert_eq!(l.state.identity("db").unwrap(), Some(2));
            assert_eq!(l.state.rule("web", "db").unwrap(), Some(Verdict::Deny));
        }
        assert!(!dir.join("state.json").exists(), "taken over");
        let l = sd.lock().unwrap();
        assert_eq!(l.state.rules().unwrap().len(), 1, "kept across locks");
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_big_change_is_checkpointed_so_the_next_command_reads_little() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        let mut l = sd.lock().unwrap();
        l.save().unwrap();
        for i in 0..5_000 {
            let r = Rule {
                from: format!("x{i}"),
                to: format!("y{i}"),
                verdict: crate::policy::Verdict::Deny,
            };
            l.state.put_rule(&r).unwrap();
            l.state.identity_for(&r.from).unwrap();
        }
        l.save().unwrap();
        // Without the checkpoint every page written stays in the WAL, and the next command
        // to open the database reads all of it to rebuild the WAL index.
        assert!(wal_len(&dir.join("state.db")) <= WAL_CHECKPOINT_BYTES);
        drop(l);
        let l = sd.lock().unwrap();
        assert_eq!(l.state.rules().unwrap().len(), 5_000, "nothing lost");
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_writes_only_what_changed_and_unsaved_changes_roll_back() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        // Looking creates nothing.
        drop(sd.lock().unwrap());
        assert!(!dir.join("state.db").exists());
        let mut l = sd.lock().unwrap();
        l.state.identity_for("early").unwrap();
        l.state.next_network_id = 7;
        l.save().unwrap();
        assert_eq!(
            l.state.identity("early").unwrap(),
            Some(1),
            "kept by the first save"
        );
        l.state.next_network_id = 9;
        l.state.identity_for("ghost").unwrap();
        drop(l); // not saved
        let l = sd.lock().unwrap();
        assert_eq!(l.state.next_network_id, 7);
        assert_eq!(l.state.identity("ghost").unwrap(), None);
        // A reader without the lock sees the saved state; it notices changes cheaply.
        let mut r = sd.reader();
        assert_eq!(r.changed().map(|s| s.next_network_id), Some(7));
        assert!(r.changed().is_none(), "nothing changed since");
        drop(l);
        let mut l = sd.lock().unwrap();
        l.state.next_network_id = 8;
        l.save().unwrap();
        assert_eq!(r.changed().map(|s| s.next_network_id), Some(8));
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rules_of_a_name_and_identities_pruned_only_when_unused() {
        let mut s = State::default();
        for (from, to) in [("web", "db"), ("db", "cache"), ("cache", "web")] {
            let r = Rule {
                from: from.into(),
                to: to.into(),
                verdict: Verdict::Deny,
            };
            assert!(s.put_rule(&r).unwrap());
        }
        let pairs = |rs: Vec<Rule>| -> Vec<(String, String)> {
            rs.into_iter().map(|r| (r.from, r.to)).collect()
        };
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            pairs(s.rules_of("db").unwrap()),
            [p("web", "db"), p("db", "cache")]
        );
        assert!(s.rules_of("nobody").unwrap().is_empty());
        for name in ["web", "gone", "running"] {
            s.identity_for(name).unwrap();
        }
        s.containers
            .insert("running".into(), container("running", vec![]));
        for name in ["web", "gone", "running"] {
            s.prune_identity(name).unwrap();
        }
        assert!(s.identity("web").unwrap().is_some(), "named by a rule");
        assert!(s.identity("running").unwrap().is_some(), "a container's");
        assert_eq!(s.identity("gone").unwrap(), None, "unused: forgotten");
    }

    /// Whether the lock's own connection (not a copy of the state's) holds `name`'s identity.
    fn lock_has_identity(l: &Locked, name: &str) -> bool {
        l.store
            .with(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM identities WHERE name = ?1",
                    params![name],
                    |r| r.get::<_, u32>(0),
                )
                .map_err(sql_context("counting"))
            })
            .unwrap()
            == 1
    }

    #[test]
    fn remove_forgets_everything_and_keeps_the_lock_usable() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        // Never saved (`down` on a fresh state): the state keeps the lock's store.
        let mut l = sd.lock().unwrap();
        l.state.next_network_id = 3;
        l.remove().unwrap();
        assert_eq!(l.state, State::default());
        l.state.identity_for("late").unwrap();
        assert!(lock_has_identity(&l, "late"));
        drop(l);
        assert!(!dir.join("state.db").exists());
        // Saved: the files go; a file already gone (a crash between the unlinks) is no error.
        let mut l = sd.lock().unwrap();
        l.state.next_network_id = 5;
        l.state.identity_for("web").unwrap();
        l.save().unwrap();
        fs::remove_file(dir.join("state.db-shm")).unwrap();
        l.remove().unwrap();
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            assert!(!dir.join(f).exists(), "{f}");
        }
        assert_eq!(l.state, State::default());
        assert!(!lock_has_identity(&l, "web"), "tables cleared");
        l.state.identity_for("after").unwrap();
        assert!(
            lock_has_identity(&l, "after"),
            "state writes through the lock"
        );
        drop(l);
        let l = sd.lock().unwrap();
        assert_eq!(
            l.state,
            State::default(),
            "the next command starts from nothing"
        );
        assert_eq!(l.state.identity("web").unwrap(), None);
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peek_reads_the_saved_state_without_the_lock() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        assert_eq!(sd.peek().unwrap(), State::default(), "no database yet");
        let mut l = sd.lock().unwrap();
        l.state.next_network_id = 4;
        l.state.identity_for("web").unwrap();
        l.save().unwrap();
        l.state.next_network_id = 6; // not saved
        let seen = sd.peek().unwrap();
        assert_eq!(seen.next_network_id, 4);
        assert_eq!(seen.identity("web").unwrap(), Some(1));
        drop(l);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_taken_out_of_the_lock_loses_what_was_not_saved() {
        let dir = tempdir();
        let sd = StateDir::new(&dir);
        let mut l = sd.lock().unwrap();
        l.state.identity_for("kept").unwrap();
        l.save().unwrap();
        l.state.identity_for("ghost").unwrap();
        let taken = l.state.clone();
        drop(l);
        assert_eq!(taken.identity("kept").unwrap(), Some(1));
        assert_eq!(
            taken.identity("ghost").unwrap(),
            None,
            "rolled back on drop"
        );
        drop(taken);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_state_json_is_an_error_not_a_fresh_start() {
        let dir = tempdir();
        fs::create_dir(dir.join("state.json")).unwrap();
        assert!(StateDir::new(&dir).lock().is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn states_compare_by_data_not_by_database_handle() {
        let a = State::default();
        let b = State::default();
        assert_eq!(a, b);
        let c = State {
            next_identity: 2,
            ..State::default()
        };
        assert_ne!(a, c);
        assert!(format!("{a:?}").contains("store: Store"));
        // A state saved before `--datapath` existed ran the stack datapath.
        let d: DatapathState = serde_json::from_value(serde_json::json!({
            "uplink": "up0", "uplink_ifindex": 2, "uplink_ip": "192.0.2.1",
            "netns_cookie": 1, "object_digest": "x"
        }))
        .unwrap();
        assert_eq!(d.mode, "stack");
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

    fn iface(network: &str, ip: [u8; 4]) -> Interface {
        Interface {
            network: network.into(),
            ip: Ipv4Addr::from(ip),
            mac: [0; 6],
            veth: String::new(),
            ifindex: 0,
            name: "eth0".into(),
            handover: None,
            aliases: vec![],
            ip6: None,
        }
    }

    fn container(name: &str, ifaces: Vec<Interface>) -> Container {
        let json = serde_json::json!({
            "name": name, "id": "x", "hostname": name, "interfaces": [], "ports": [],
            "cmd": [], "pid": 0, "pid_start": 0, "supervisor_pid": 0, "supervisor_start": 0,
            "status": "running", "detached": true, "created_unix": 0
        });
        let mut c: Container = serde_json::from_value(json).unwrap();
        c.interfaces = ifaces;
        c
    }

    #[test]
    fn containers_and_their_addresses() {
        let c = container(
            "web",
            vec![iface("a", [10, 0, 0, 2]), iface("b", [10, 1, 0, 2])],
        );
        assert_eq!(
            c.mode, "bridge",
            "a saved container without a mode is on the default network"
        );
        assert_eq!(c.primary_ip(), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(c.on_network("a") && c.on_network("b") && !c.on_network("c"));
        assert_eq!(container("none", vec![]).primary_ip(), None);
        let mut s = State::default();
        s.containers.insert("web".into(), c);
        let db = container("db", vec![iface("a", [10, 0, 0, 3])]);
        s.containers.insert("db".into(), db);
        let a: HashSet<_> = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)].into();
        assert_eq!(s.used_ips("a"), a);
        assert_eq!(s.used_ips("b"), [Ipv4Addr::new(10, 1, 0, 2)].into());
        assert!(s.used_ips("c").is_empty());
    }

    #[test]
    fn paths_under_the_state_directory() {
        let sd = StateDir::new(Path::new("/x/state"));
        assert_eq!(sd.db(), Path::new("/x/state/state.db"));
        assert_eq!(sd.legacy_file(), Path::new("/x/state/state.json"));
        assert_eq!(sd.log_file("web"), Path::new("/x/state/logs/web.log"));
        assert_eq!(
            sd.container_dir("web"),
            Path::new("/x/state/containers/web")
        );
    }
}
