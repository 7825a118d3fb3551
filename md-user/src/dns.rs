//! Names: each container's own /etc/hosts and /etc/resolv.conf (bind-mounted in a private
//! mount namespace, rewritten in place as containers come and go), and the per-network
//! resolver Podman's aardvark-dns is the model for: one small process per network, listening
//! on the gateway address in the host namespace, started with the network's first container
//! and gone with its last. It answers container names that share a network with the asker and
//! forwards everything else to the upstream servers of the host's resolv.conf (over IPv4 or
//! IPv6, whichever each server's address is). Containers on dual-stack networks are known by
//! both addresses: A and AAAA records, PTR for both, and both in /etc/hosts.

use std::{
    collections::HashSet,
    fs::{self, OpenOptions},
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, AAAA, PTR},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::state::{
    Container, DnsSettings, ExtraHost, Interface, Network, State, StateDir, StateReader,
};

/// What `run --dns`, `--dns-search` and `--dns-option` asked for (None: the host's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsRequest {
    pub servers: Vec<std::net::IpAddr>,
    pub search: Option<Vec<String>>,
    pub options: Option<Vec<String>>,
}

impl DnsRequest {
    /// Checks the flags' values. `--dns-search .` means no search domains at all (Docker's).
    pub fn parse(servers: &[String], search: &[String], options: &[String]) -> Result<DnsRequest> {
        let servers = servers
            .iter()
            .map(|s| {
                let ip: std::net::IpAddr = s
                    .parse()
                    .with_context(|| format!("--dns {s:?} is not an IP address"))?;
                if ip.is_loopback() || ip.is_unspecified() {
                    // The resolver forwards from the host's namespace: a loopback server
                    // there is the host's, not the container's.
                    bail!("--dns {ip}: md's resolver forwards from the host, give a server the host reaches (not loopback)");
                }
                Ok(ip)
            })
            .collect::<Result<Vec<_>>>()?;
        for d in search {
            let ok = d == "."
                || (d.len() <= 253
                    && d.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    }));
            if !ok {
                bail!("--dns-search {d:?} is not a domain name");
            }
        }
        for o in options {
            if o.is_empty() || !o.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("--dns-option {o:?}: one option without spaces, like ndots:2 or edns0");
            }
            if let Some(n) = o.strip_prefix("ndots:") {
                if n.parse::<u8>().is_err() {
                    bail!("--dns-option {o:?}: ndots takes a number");
                }
            }
        }
        Ok(DnsRequest {
            servers,
            search: (!search.is_empty())
                .then(|| search.iter().filter(|d| *d != ".").cloned().collect()),
            options: (!options.is_empty()).then(|| options.to_vec()),
        })
    }

    /// The container's settings: what was asked for, the rest from the host's resolv.conf
    /// (its search domains and options, as Docker copies them).
    pub fn settings(&self, host_resolv: &Path) -> DnsSettings {
        let host = fs::read_to_string(host_resolv).unwrap_or_default();
        let (mut search, mut options) = (Vec::new(), Vec::new());
        for line in host.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                // The last search (or domain) line wins, options accumulate.
                Some("search" | "domain") => search = w.map(str::to_string).collect(),
                Some("options") => options.extend(w.map(str::to_string)),
                _ => {}
            }
        }
        DnsSettings {
            servers: self.servers.clone(),
            search: self.search.clone().unwrap_or(search),
            options: self.options.clone().unwrap_or(options),
        }
    }
}

/// The address of an `--add-host` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddr {
    Ip(std::net::IpAddr),
    /// The host, as the container reaches it: its network's gateway.
    HostGateway,
}

/// Parses `--add-host NAME:IP` (also `NAME=IP`, `[IPv6]`, and `host-gateway`).
pub fn parse_add_host(s: &str) -> Result<(String, HostAddr)> {
    let (name, addr) = s
        .split_once(['=', ':'])
        .with_context(|| format!("--add-host {s:?} must be NAME:IP"))?;
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !name.starts_with(['-', '.']);
    if !name_ok {
        bail!("--add-host {s:?}: {name:?} is not a host name");
    }
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr = if addr == "host-gateway" {
        HostAddr::HostGateway
    } else {
        HostAddr::Ip(
            addr.parse()
                .with_context(|| format!("--add-host {s:?}: {addr:?} is not an IP address"))?,
        )
    };
    Ok((name.to_string(), addr))
}

/// The `--add-host` lines of a container on `net` (`host-gateway`: its gateway).
pub fn resolve_extra_hosts(
    hosts: &[(String, HostAddr)],
    net: Option<&Network>,
) -> Result<Vec<ExtraHost>> {
    hosts
        .iter()
        .map(|(name, addr)| {
            let ip = match addr {
                HostAddr::Ip(ip) => *ip,
                HostAddr::HostGateway => match net {
                    Some(n) if n.has_gateway() => std::net::IpAddr::V4(n.gateway()),
                    Some(_) => bail!(
                        "--add-host {name}:host-gateway: the host has no address on an isolated network"
                    ),
                    None => bail!("--add-host {name}:host-gateway needs a network to reach the host on"),
                },
            };
            Ok(ExtraHost {
                name: name.clone(),
                ip,
            })
        })
        .collect()
}

/// Nameservers of a resolv.conf.
pub fn upstreams(resolv_conf: &Path) -> Vec<SocketAddr> {
    fs::read_to_string(resolv_conf)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The interface a container knows a peer by: the peer's interface on a network both are on,
/// preferring `network`.
fn shared_iface<'a>(
    peer: &'a Container,
    nets: &[String],
    network: Option<&str>,
) -> Option<&'a Interface> {
    network
        .and_then(|n| {
            peer.interfaces
                .iter()
                .find(|i| i.network == n && nets.iter().any(|m| m == n))
        })
        .or_else(|| peer.interfaces.iter().find(|i| nets.contains(&i.network)))
}

/// An interface's addresses: IPv4, and IPv6 on a dual-stack network.
pub type Addrs = (Ipv4Addr, Option<Ipv6Addr>);

fn addrs(i: &Interface) -> Addrs {
    (i.ip, i.ip6)
}

fn is_a_name(state: &State, name: &str) -> bool {
    state
        .containers
        .values()
        .any(|c| c.name.eq_ignore_ascii_case(name))
}

/// Container names in lower case, so "is this a name" is one lookup, not a scan (a hosts file
/// asks it for every line).
struct NameSet(HashSet<String>);

impl NameSet {
    fn of(state: &State) -> NameSet {
        NameSet(
            state
                .containers
                .keys()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.0.contains(&name.to_ascii_lowercase())
    }
}

/// The hostname `c` is also known by, unless it is just its name or some container's name:
/// names win, so `--hostname web` cannot take the name of a container `web`.
fn alias_in(names: &NameSet, c: &Container) -> Option<String> {
    (!c.hostname.eq_ignore_ascii_case(&c.name) && !names.has(&c.hostname))
        .then(|| c.hostname.clone())
}

/// A container's line in hosts files: "IP\tNAMES".
fn hosts_line(names: &NameSet, ip: impl std::fmt::Display, c: &Container) -> String {
    match alias_in(names, c) {
        Some(h) => format!("{ip}\t{h} {}\n", c.name),
        None => format!("{ip}\t{}\n", c.name),
    }
}

/// The lines of an interface in hosts files: its IPv4 address, and its IPv6 one on a
/// dual-stack network.
fn hosts_lines(names: &NameSet, i: &Interface, c: &Container) -> String {
    let mut s = hosts_line(names, i.ip, c);
    if let Some(ip6) = i.ip6 {
        s.push_str(&hosts_line(names, ip6, c));
    }
    s
}

/// Resolves a name for someone on `nets`: the container of that name (one address), else
/// every container with that network alias, alias or hostname on a network they share (a
/// service scaled to several containers answers with all of them). Names win over aliases and
/// hostnames.
pub fn lookup(state: &State, nets: &[String], network: Option<&str>, name: &str) -> Vec<Addrs> {
    let name = name.trim_end_matches('.');
    let local = local_lookup(state, nets, network, name);
    if !local.is_empty() {
        return local;
    }
    // Overlay networks are IPv4 only: a remote container has no IPv6 address.
    remote_lookup(state, nets, name)
        .map(|ip| (ip, None))
        .into_iter()
        .collect()
}

fn local_lookup(state: &State, nets: &[String], network: Option<&str>, name: &str) -> Vec<Addrs> {
    let is = |s: &str| s.eq_ignore_ascii_case(name);
    if is_a_name(state, name) {
        return state
            .containers
            .values()
            .filter(|c| is(&c.name))
            .filter_map(|c| shared_iface(c, nets, network))
            .map(addrs)
            .take(1)
            .collect();
    }
    let mut out = Vec::new();
    for c in state.containers.values() {
        // A network alias is the address on its own network, for askers on that network
        // (the preferred network first).
        let aliased = c
            .interfaces
            .iter()
            .filter(|i| nets.contains(&i.network) && i.aliases.iter().any(|a| is(a)))
            .min_by_key(|i| Some(i.network.as_str()) != network)
            .map(addrs);
        let ip = aliased.or_else(|| {
            (is(&c.hostname) || c.aliases.iter().any(|a| is(a)))
                .then(|| shared_iface(c, nets, network).map(addrs))
                .flatten()
        });
        if let Some(ip) = ip.filter(|ip| !out.contains(ip)) {
            out.push(ip);
        }
    }
    out
}

/// `NAME.NETWORK` (what PTR answers give) for someone on NETWORK: NAME looked up there.
fn lookup_qualified(state: &State, nets: &[String], name: &str) -> Vec<Addrs> {
    let name = name.trim_end_matches('.');
    for n in nets {
        let Some(short) = name
            .len()
            .checked_sub(n.len() + 1)
            .filter(|&cut| name.is_char_boundary(cut))
            .map(|cut| (&name[..cut], &name[cut..]))
            .filter(|(_, tail)| tail[1..].eq_ignore_ascii_case(n) && tail.starts_with('.'))
            .map(|(short, _)| short)
        else {
            continue;
        };
        let found = lookup(state, std::slice::from_ref(n), Some(n), short);
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa.`, or IPv6's 32 nibbles under
/// `ip6.arpa.`) is about.
fn reverse_addr(name: &str) -> Option<IpAddr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = name.strip_suffix(".ip6.arpa") {
        let nibbles: Vec<u8> = rest
            .split('.')
            .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 1))
            .collect::<Option<_>>()?;
        if nibbles.len() != 32 {
            return None;
        }
        // Least significant nibble first.
        let mut o = [0u8; 16];
        for (k, n) in nibbles.iter().rev().enumerate() {
            o[k / 2] |= if k % 2 == 0 { n << 4 } else { *n };
        }
        return Some(IpAddr::V6(Ipv6Addr::from(o)));
    }
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let o: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match o[..] {
        [a, b, c, d] => Some(IpAddr::V4(Ipv4Addr::new(d, c, b, a))),
        _ => None,
    }
}

/// PTR: a container address on a network the asker is on names `NAME.NETWORK.` (Docker's).
fn reverse(state: &State, nets: &[String], ip: IpAddr) -> Option<String> {
    state
        .containers
        .values()
        .find_map(|c| {
            c.interfaces
                .iter()
                .find(|i| has_ip(i, ip) && nets.contains(&i.network))
                .map(|i| format!("{}.{}.", c.name, i.network))
        })
        .or_else(|| {
            // A container on another host of an overlay network (issue 17).
            state
                .remote
                .iter()
                .find(|(_, r)| IpAddr::V4(r.ip) == ip && nets.contains(&r.network))
                .map(|(n, r)| format!("{n}.{}.", r.network))
        })
}

/// A container on another host of an overlay network the asker is on (issue 17): by name, then
/// by hostname; local containers win.
fn remote_lookup(state: &State, nets: &[String], name: &str) -> Option<Ipv4Addr> {
    let on = |r: &&crate::state::RemoteContainer| nets.contains(&r.network);
    state
        .remote
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, r)| r)
        .find(on)
        .or_else(|| {
            state
                .remote
                .values()
                .filter(|r| r.hostname.eq_ignore_ascii_case(name))
                .find(on)
        })
        .map(|r| r.ip)
}

fn networks_of(c: &Container) -> Vec<String> {
    c.interfaces.iter().map(|i| i.network.clone()).collect()
}

/// /etc/hosts of a container: localhost, itself, and its peers on the networks it is on.
#[cfg(test)]
pub fn render_hosts(state: &State, c: &Container) -> String {
    render_hosts_with(state, &NameSet::of(state), c)
}

fn render_hosts_with(state: &State, names: &NameSet, c: &Container) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    // `--add-host` entries before the container's own, as Docker writes them.
    for h in &c.extra_hosts {
        s.push_str(&format!("{}\t{}\n", h.ip, h.name));
    }
    match c.interfaces.first() {
        Some(i) => s.push_str(&hosts_lines(names, i, c)),
        None => s.push_str(&hosts_line(names, "127.0.1.1", c)),
    }
    let nets = networks_of(c);
    for peer in state.containers.values().filter(|p| p.name != c.name) {
        if let Some(i) = shared_iface(peer, &nets, None) {
            s.push_str(&hosts_lines(names, i, peer));
        }
    }
    s
}

/// /etc/resolv.conf of a container: its network's resolver, then the search domains and
/// options (`--dns-search`/`--dns-option` or the host's), with `ndots:0` unless an option sets
/// ndots, as Docker writes it for a network with its internal resolver (names with dots are
/// tried as they are first).
pub fn render_resolv(state: &State, c: &Container) -> Option<String> {
    let iface = c.interfaces.first()?;
    let net = state.networks.get(&iface.network)?;
    let mut s = if net.has_gateway() {
        format!(
            "# md: the resolver of network {}\nnameserver {}\n",
            iface.network,
            net.gateway()
        )
    } else {
        format!(
            "# md: network {} is isolated, the host has no address on it: no resolver (names are in /etc/hosts)\n",
            iface.network
        )
    };
    if !c.dns.search.is_empty() {
        s.push_str(&format!("search {}\n", c.dns.search.join(" ")));
    }
    let mut options: Vec<&str> = c
        .dns
        .options
        .iter()
        .map(String::as_str)
        // An ndots the resolver library would not take is dropped (Docker does the same).
        .filter(|o| {
            o.strip_prefix("ndots:")
                .is_none_or(|n| n.parse::<u8>().is_ok())
        })
        .collect();
    if !options.iter().any(|o| o.starts_with("ndots:")) {
        options.push("ndots:0");
    }
    s.push_str(&format!("options {}\n", options.join(" ")));
    Some(s)
}

fn write_in_place(path: &Path, content: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    // In place, not rename: the container sees this inode through a bind mount.
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// Paths of a container's hosts and resolv.conf files (resolv.conf only with a network).
pub fn files(dir: &StateDir, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.container_dir(name);
    (d.join("hosts"), d.join("resolv.conf"))
}

/// Whether md writes `c`'s hosts and resolv.conf: not for host and container: modes, and not
/// for a runtime's container (CNI, Docker: the runtime writes its files).
fn has_files(c: &Container) -> bool {
    !(c.mode == "host" || c.mode.starts_with("container:") || c.runtime_owned())
}

/// Rewrites every container's files from the state (containers came or went).
pub fn refresh(dir: &StateDir, state: &State) -> Result<()> {
    let names = NameSet::of(state);
    for c in state.containers.values().filter(|c| has_files(c)) {
        let (hosts, resolv) = files(dir, &c.name);
        fs::create_dir_all(hosts.parent().expect("dir"))?;
        write_in_place(&hosts, &render_hosts_with(state, &names, c))?;
        if let Some(r) = render_resolv(state, c) {
            write_in_place(&resolv, &r)?;
        }
    }
    Ok(())
}

// Container `name` was just added: its own files ([`added_self`]), and one line appended to
// each peer's hosts file ([`added_to_peers`]), instead of rewriting every file (with a
// thousand containers on a network that is a thousand small appends, not thirty megabytes).
// When the new name takes a peer's hostname (names win, so that alias goes), everything is
// rewritten.

/// Whether `c`'s name takes another container's hostname (then every file is rewritten).
fn shadows(state: &State, c: &Container) -> bool {
    state
        .containers
        .values()
        .any(|p| p.name != c.name && p.hostname.eq_ignore_ascii_case(&c.name))
}

/// The first half of [`added`]: the container's own files (what it needs before CMD starts),
/// or every file when its name shadows a hostname.
pub fn added_self(dir: &StateDir, state: &State, name: &str) -> Result<()> {
    let Some(c) = state.containers.get(name) else {
        return Ok(());
    };
    if shadows(state, c) {
        return refresh(dir, state);
    }
    if has_files(c) {
        let names = NameSet::of(state);
        let (hosts, resolv) = files(dir, &c.name);
        fs::create_dir_all(hosts.parent().expect("dir"))?;
        write_in_place(&hosts, &render_hosts_with(state, &names, c))?;
        if let Some(r) = render_resolv(state, c) {
            write_in_place(&resolv, &r)?;
        }
    }
    Ok(())
}

/// The second half of [`added`]: a line for the new container in the hosts file of every
/// container that shares a network with it (nothing when [`added_self`] rewrote them all).
pub fn added_to_peers(dir: &StateDir, state: &State, name: &str) -> Result<()> {
    let Some(c) = state.containers.get(name) else {
        return Ok(());
    };
    if shadows(state, c) {
        return Ok(());
    }
    let names = NameSet::of(state);
    for peer in state
        .containers
        .values()
        .filter(|p| p.name != c.name && has_files(p))
    {
        let Some(i) = shared_iface(c, &networks_of(peer), None) else {
            continue;
        };
        let (hosts, _) = files(dir, &peer.name);
        let line = hosts_lines(&names, i, c);
        let appended = OpenOptions::new()
            .append(true)
            .open(&hosts)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if appended.is_err() {
            // No file yet (a peer being set up): write it whole.
            fs::create_dir_all(hosts.parent().expect("dir"))?;
            write_in_place(&hosts, &render_hosts_with(state, &names, peer))?;
        }
    }
    Ok(())
}

pub fn remove_files(dir: &StateDir, name: &str) {
    let _ = fs::remove_dir_all(dir.container_dir(name));
}

/// Whether interface `i` has address `ip`.
fn has_ip(i: &Interface, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => i.ip == v4,
        IpAddr::V6(v6) => i.ip6 == Some(v6),
    }
}

/// Builds the answer to a query for a container name (A and AAAA: every address of the name,
/// rotated by `turn` so clients of a scaled service spread over its containers) or a container
/// address (PTR), or None to forward it.
pub fn answer(
    state: &State,
    network: &str,
    asker: impl Into<IpAddr>,
    query: &Message,
    turn: usize,
) -> Option<Message> {
    let asker = asker.into();
    let q = query.queries().first()?;
    if q.query_class() != DNSClass::IN {
        return None;
    }
    let asker_nets: Vec<String> = state
        .containers
        .values()
        .find(|c| c.interfaces.iter().any(|i| has_ip(i, asker)))
        .map(networks_of)
        .unwrap_or_else(|| vec![network.to_string()]);
    let name = q.name().to_ascii();
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(ResponseCode::NoError)
        .add_query(q.clone());
    if q.query_type() == RecordType::PTR {
        let target = reverse(state, &asker_nets, reverse_addr(&name)?)?;
        let target = Name::from_ascii(&target).ok()?;
        m.add_answer(Record::from_rdata(
            q.name().clone(),
            0,
            RData::PTR(PTR(target)),
        ));
        return Some(m);
    }
    let mut ips = lookup(state, &asker_nets, Some(network), &name);
    if ips.is_empty() {
        ips = lookup_qualified(state, &asker_nets, &name);
    }
    if ips.is_empty() {
        return None;
    }
    let n = ips.len();
    ips.rotate_left(turn % n);
    let (want_a, want_aaaa) = match q.query_type() {
        RecordType::A => (true, false),
        RecordType::AAAA => (false, true),
        RecordType::ANY => (true, true),
        // The name exists, with no address of that type: NOERROR, empty.
        _ => (false, false),
    };
    for (ip, ip6) in ips {
        if want_a {
            m.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(ip))));
        }
        if let (true, Some(ip6)) = (want_aaaa, ip6) {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                0,
                RData::AAAA(AAAA(ip6)),
            ));
        }
    }
    Some(m)
}

/// How long a TCP client may stay silent before the resolver closes its connection (RFC 7766
/// asks for an idle timeout; 10 s is what it suggests to start from).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once; more are closed at once (the clients retry).
const TCP_MAX: usize = 64;

/// The state as the resolver last read it, read again when the state changed.
struct Names {
    reader: StateReader,
    state: State,
}

impl Names {
    fn new(state_dir: &Path) -> Names {
        Names {
            reader: StateDir::new(state_dir).reader(),
            state: State::default(),
        }
    }

    fn current(&mut self) -> &State {
        if let Some(s) = self.reader.changed() {
            self.state = s;
        }
        &self.state
    }
}

/// What to do with one query.
#[derive(Debug, PartialEq)]
enum Reply {
    Now(Vec<u8>),
    /// To the asker's own servers (`--dns`), or the host's when it has none.
    Forward(Vec<std::net::IpAddr>),
    Nothing,
}

/// The resolver's decision for a query from `asker`, the same over UDP and TCP.
fn reply(
    state: &State,
    network: &str,
    asker: std::net::IpAddr,
    query: &[u8],
    turn: usize,
) -> Reply {
    // An IPv4-mapped address is the IPv4 address it maps.
    let asker = match asker {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(asker),
        v4 => v4,
    };
    // Only md's containers may ask: the gateway address may be reachable from elsewhere, and
    // an open forwarder is not what md runs.
    let Some(c) = state
        .containers
        .values()
        .find(|c| c.interfaces.iter().any(|i| has_ip(i, asker)))
    else {
        return refused(query).map_or(Reply::Nothing, Reply::Now);
    };
    if let Ok(msg) = Message::from_vec(query) {
        if let Some(reply) = answer(state, network, asker, &msg, turn) {
            return reply.to_vec().map_or(Reply::Nothing, Reply::Now);
        }
    }
    // A container with no way out (only internal networks) gets no answers from outside
    // either: DNS would be its way out.
    let outside = c
        .interfaces
        .iter()
        .any(|i| state.networks.get(&i.network).is_some_and(|n| !n.internal));
    if !outside {
        return refused(query).map_or(Reply::Nothing, Reply::Now);
    }
    Reply::Forward(c.dns.servers.clone())
}

/// What every query handler shares.
struct Resolver {
    names: Mutex<Names>,
    network: String,
    resolv_conf: PathBuf,
    own: std::net::IpAddr,
    /// How long a TCP client may stay silent ([`TCP_IDLE`]).
    idle: Duration,
    /// Answers so far: where the next multi-address answer starts (round robin).
    turn: AtomicUsize,
}

impl Resolver {
    fn decide(&self, asker: std::net::IpAddr, query: &[u8]) -> Reply {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        reply(names.current(), &self.network, asker, query, turn)
    }

    /// The upstream servers (the asker's own, else the host's), never ourselves.
    fn upstreams(&self, own: &[std::net::IpAddr]) -> Vec<SocketAddr> {
        let servers = if own.is_empty() {
            upstreams(&self.resolv_conf)
        } else {
            own.iter().map(|ip| SocketAddr::new(*ip, 53)).collect()
        };
        servers.into_iter().filter(|u| u.ip() != self.own).collect()
    }
}

/// The resolver process (`md-user __dns`): UDP and TCP on the same address.
pub async fn serve(
    state_dir: PathBuf,
    network: String,
    listen: SocketAddrV4,
    resolv_conf: PathBuf,
    ready: Option<std::fs::File>,
) -> Result<()> {
    let sock = UdpSocket::bind(listen)
        .await
        .with_context(|| format!("binding the resolver to {listen} (udp)"))?;
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the resolver to {listen} (tcp)"))?;
    if let Some(mut r) = ready {
        let _ = r.write_all(b"ok");
    }
    let sock = Arc::new(sock);
    let dir = StateDir::new(&state_dir);
    let res = Arc::new(Resolver {
        names: Mutex::new(Names::new(&state_dir)),
        network,
        resolv_conf,
        own: std::net::IpAddr::V4(*listen.ip()),
        idle: TCP_IDLE,
        turn: AtomicUsize::new(0),
    });
    let conns = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, peer) = r?;
                let query = &buf[..n];
                match res.decide(peer.ip(), query) {
                    Reply::Now(bytes) => {
                        let _ = sock.send_to(&bytes, peer).await;
                    }
                    Reply::Nothing => {}
                    Reply::Forward(own) => {
                        let (q, sock, ups) = (query.to_vec(), sock.clone(), res.upstreams(&own));
                        tokio::spawn(async move {
                            if let Some(resp) = forward(&q, &ups).await {
                                let _ = sock.send_to(&resp, peer).await;
                            }
                        });
                    }
                }
            }
            r = tcp.accept() => {
                let Ok((stream, peer)) = r else { continue };
                if conns.fetch_add(1, Ordering::Relaxed) >= TCP_MAX {
                    conns.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let (res, conns) = (res.clone(), conns.clone());
                tokio::spawn(async move {
                    serve_tcp(stream, peer, &res).await;
                    conns.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = tick.tick() => {
                // Gone with the network's last container, even if nobody told us.
                let s = dir.peek().unwrap_or_default();
                if !s.containers.values().any(|c| c.on_network(&res.network)) {
                    return Ok(());
                }
            }
        }
    }
}

/// One TCP connection: queries with a two-byte length prefix (RFC 1035 4.2.2), answered in
/// order, until the client closes, stays idle too long, or a query gets no answer.
async fn serve_tcp(mut stream: TcpStream, peer: SocketAddr, res: &Resolver) {
    while let Some(query) = read_framed(&mut stream, res.idle).await {
        let resp = match res.decide(peer.ip(), &query) {
            Reply::Now(bytes) => Some(bytes),
            Reply::Nothing => None,
            Reply::Forward(own) => {
                let ups = res.upstreams(&own);
                match forward_tcp(&query, &ups).await {
                    Some(r) => Some(r),
                    None => forward(&query, &ups).await,
                }
            }
        };
        let Some(resp) = resp else { return };
        if !write_framed(&mut stream, &resp, res.idle).await {
            return;
        }
    }
}

/// One length-prefixed message, or None at EOF, an error or after `idle`.
async fn read_framed<S: AsyncRead + Unpin>(s: &mut S, idle: Duration) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    tokio::time::timeout(idle, s.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    tokio::time::timeout(idle, s.read_exact(&mut msg))
        .await
        .ok()?
        .ok()?;
    Some(msg)
}

async fn write_framed<S: AsyncWrite + Unpin>(s: &mut S, msg: &[u8], idle: Duration) -> bool {
    let Ok(len) = u16::try_from(msg.len()) else {
        return false;
    };
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    matches!(
        tokio::time::timeout(idle, s.write_all(&out)).await,
        Ok(Ok(()))
    )
}

/// Relays a query over TCP to the first upstream that answers (the client asked over TCP,
/// most likely because the UDP answer was truncated).
async fn forward_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(up)).await
        else {
            continue;
        };
        let wait = Duration::from_secs(2);
        if !write_framed(&mut s, query, wait).await {
            continue;
        }
        if let Some(resp) = read_framed(&mut s, wait).await {
            return Some(resp);
        }
    }
    None
}

fn refused(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_response_code(ResponseCode::Refused)
        .add_queries(q.queries().to_vec());
    m.to_vec().ok()
}

/// Relays a query to the first upstream that answers.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(s) = UdpSocket::bind(bind).await else {
            continue;
        };
        if s.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf)).await
        {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ipam::Subnet,
        state::{Interface, Network, Status},
    };
    use hickory_proto::op::Query;
    use std::collections::BTreeSet;

    fn container(name: &str, ifaces: &[(&str, [u8; 4])]) -> Container {
        Container {
            name: name.into(),
            id: "0".into(),
            hostname: name.into(),
            mode: ifaces
                .first()
                .map(|i| i.0.to_string())
                .unwrap_or("none".into()),
            interfaces: ifaces
                .iter()
                .map(|(n, ip)| Interface {
                    network: n.to_string(),
                    ip: Ipv4Addr::from(*ip),
                    ip6: None,
                    mac: [0; 6],
                    veth: String::new(),
                    ifindex: 0,
                    name: "eth0".into(),
                    handover: None,
                    aliases: vec![],
                })
                .collect(),
            ports: vec![],
            cmd: vec![],
            pid: 0,
            pid_start: 0,
            supervisor_pid: 0,
            supervisor_start: 0,
            status: Status::Running,
            detached: true,
            created_unix: 0,
            aliases: vec![],
            cni: None,
            privileged: false,
            docker: None,
            dns: DnsSettings::default(),
            extra_hosts: vec![],
            exposed: vec![],
        }
    }

    fn lab() -> State {
        let mut s = State::default();
        for (n, id, sub) in [("bridge", 1, "172.18.0.0/16"), ("back", 2, "10.9.0.0/24")] {
            s.networks.insert(
                n.into(),
                Network {
                    id,
                    bridge: format!("b{id}"),
                    subnet: sub.parse::<Subnet>().unwrap(),
                    subnet6: None,
                    routed6: false,
                    dns_pid: 0,
                    dns_start: 0,
                    overlay: None,
                    gateway: None,
                    ip_range: None,
                    mtu: None,
                    internal: false,
                    gateway_mode: Default::default(),
                    options: Default::default(),
                    uid: String::new(),
                    created_unix: 0,
                },
            );
        }
        for c in [
            container("a", &[("bridge", [172, 18, 0, 2])]),
            container("b", &[("bridge", [172, 18, 0, 3]), ("back", [10, 9, 0, 3])]),
            container("c", &[("back", [10, 9, 0, 4])]),
        ] {
            s.containers.insert(c.name.clone(), c);
        }
        s
    }

    fn ask(s: &State, net: &str, asker: [u8; 4], name: &str, t: RecordType) -> Option<Message> {
        let mut q = Message::new();
        q.set_id(7)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        answer(s, net, Ipv4Addr::from(asker), &q, 0)
    }

    fn a_record(m: &Message) -> Option<Ipv4Addr> {
        m.answers().iter().find_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
    }

    #[test]
    fn names_resolve_within_shared_networks_only() {
        let s = lab();
        let m = ask(&s, "bridge", [172, 18, 0, 2], "b.", RecordType::A).unwrap();
        assert_eq!(m.id(), 7);
        assert_eq!(a_record(&m), Some(Ipv4Addr::new(172, 18, 0, 3)));
        // a and c share no network: c is not a's to resolve (forwarded upstream instead).
        assert!(ask(&s, "bridge", [172, 18, 0, 2], "c", RecordType::A).is_none());
        // b reaches c on "back", by c's address there.
        let m = ask(&s, "back", [10, 9, 0, 3], "c", RecordType::A).unwrap();
        assert_eq!(a_record(&m), Some(Ipv4Addr::new(10, 9, 0, 4)));
        // c asks for b: b's address on the network they share.
        let m = ask(&s, "back", [10, 9, 0, 4], "B", RecordType::A).unwrap();
        assert_eq!(a_record(&m), Some(Ipv4Addr::new(10, 9, 0, 3)));
        // AAAA for a container: the name exists, no IPv6 address.
        let m = ask(&s, "bridge", [172, 18, 0, 2], "b", RecordType::AAAA).unwrap();
        assert!(m.answers().is_empty());
        assert!(ask(&s, "bridge", [172, 18, 0, 2], "example.org", RecordType::A).is_none());
    }

    #[test]
    fn hosts_file_lists_self_and_peers_on_shared_networks() {
        let s = lab();
        let h = render_hosts(&s, &s.containers["a"]);
        assert!(h.contains("127.0.0.1\tlocalhost"));
        assert!(h.contains("172.18.0.2\ta\n"));
        assert!(h.contains("172.18.0.3\tb\n"));
        assert!(!h.contains("\tc\n"));
        let h = render_hosts(&s, &s.containers["c"]);
        assert!(h.contains("10.9.0.3\tb\n"));
        assert!(!h.contains("\ta\n"));
        let r = render_resolv(&s, &s.containers["c"]).unwrap();
        assert!(r.contains("nameserver 10.9.0.1"));
    }

    #[test]
    fn names_win_over_hostnames() {
        let mut s = lab();
        // d claims a's name as its hostname; e has a hostname of its own.
        let mut d = container("d", &[("bridge", [172, 18, 0, 5])]);
        d.hostname = "A".into();
        let mut e = container("e", &[("bridge", [172, 18, 0, 6])]);
        e.hostname = "mail".into();
        s.containers.insert("d".into(), d);
        s.containers.insert("e".into(), e);
        for asker in [[172, 18, 0, 2], [172, 18, 0, 5]] {
            let m = ask(&s, "bridge", asker, "a", RecordType::A).unwrap();
            assert_eq!(a_record(&m), Some(Ipv4Addr::new(172, 18, 0, 2)));
        }
        let m = ask(&s, "bridge", [172, 18, 0, 2], "mail", RecordType::A).unwrap();
        assert_eq!(a_record(&m), Some(Ipv4Addr::new(172, 18, 0, 6)));
        for c in ["a", "d"] {
            let h = render_hosts(&s, &s.containers[c]);
            assert!(h.contains("172.18.0.2\ta\n"), "{c}: {h}");
            assert!(h.contains("172.18.0.5\td\n"), "{c}: {h}");
            assert!(h.contains("172.18.0.6\tmail e\n"), "{c}: {h}");
        }
        // A name that is nobody's name any more frees the hostname.
        s.containers.remove("a");
        let m = ask(&s, "bridge", [172, 18, 0, 6], "a", RecordType::A).unwrap();
        assert_eq!(a_record(&m), Some(Ipv4Addr::new(172, 18, 0, 5)));
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = Message::new();
        q.set_id(id)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        q.to_vec().unwrap()
    }

    #[test]
    fn same_decision_for_members_only() {
        let s = lab();
        let member = std::net::IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2));
        let Reply::Now(r) = reply(&s, "bridge", member, &query(1, "b"), 0) else {
            panic!("a member asking for a peer gets an answer");
        };
        assert_eq!(
            a_record(&Message::from_vec(&r).unwrap()),
            Some(Ipv4Addr::new(172, 18, 0, 3))
        );
        assert_eq!(
            reply(&s, "bridge", member, &query(2, "example.org"), 0),
            Reply::Forward(vec![])
        );
        let stranger = std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        let Reply::Now(r) = reply(&s, "bridge", stranger, &query(3, "b"), 0) else {
            panic!("a stranger is told no");
        };
        let m = Message::from_vec(&r).unwrap();
        assert_eq!((m.id(), m.response_code()), (3, ResponseCode::Refused));
        assert!(m.answers().is_empty());
    }

    #[tokio::test]
    async fn tcp_answers_several_queries_per_connection_then_times_out() {
        let dir = std::env::temp_dir().join(format!("md-dns-tcp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // The test client is a "container" at 127.0.0.1, next to b.
        let mut s = lab();
        s.containers
            .insert("me".into(), container("me", &[("bridge", [127, 0, 0, 1])]));
        {
            let mut l = StateDir::new(&dir).lock().unwrap();
            l.state.networks = s.networks;
            l.state.containers = s.containers;
            l.save().unwrap();
        }
        let res = Arc::new(Resolver {
            names: Mutex::new(Names::new(&dir)),
            network: "bridge".into(),
            resolv_conf: dir.join("none"),
            own: "127.0.0.1".parse().unwrap(),
            idle: Duration::from_millis(300),
            turn: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            serve_tcp(stream, peer, &res).await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let wait = Duration::from_secs(5);
        // Two queries written back to back, then a third: answered in order.
        let mut both = Vec::new();
        for (id, name) in [(10, "a"), (11, "b")] {
            let q = query(id, name);
            both.extend_from_slice(&(q.len() as u16).to_be_bytes());
            both.extend_from_slice(&q);
        }
        c.write_all(&both).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = Message::from_vec(&read_framed(&mut c, wait).await.unwrap()).unwrap();
            got.push((m.id(), a_record(&m)));
        }
        assert_eq!(
            got,
            [
                (10, Some(Ipv4Addr::new(172, 18, 0, 2))),
                (11, Some(Ipv4Addr::new(172, 18, 0, 3)))
            ]
        );
        // Within the idle time the connection is still served.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(write_framed(&mut c, &query(12, "b"), wait).await);
        let m = Message::from_vec(&read_framed(&mut c, wait).await.unwrap()).unwrap();
        assert_eq!(m.id(), 12);
        // Then silence: the server closes the connection on its own (EOF, not our timeout).
        let mut byte = [0u8; 1];
        let eof = tokio::time::timeout(Duration::from_secs(30), c.read(&mut byte)).await;
        assert!(matches!(eof, Ok(Ok(0))), "{eof:?}");
        server.await.unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    fn with_aliases(mut c: Container, aliases: &[&str]) -> Container {
        c.interfaces[0].aliases = aliases.iter().map(|a| a.to_string()).collect();
        c
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn aliases_answer_with_every_container_in_turn() {
        let mut s = lab();
        for (n, ip) in [("w1", 10), ("w2", 11), ("w3", 12)] {
            let c = with_aliases(container(n, &[("back", [10, 9, 0, ip])]), &["svc"]);
            s.containers.insert(n.into(), c);
        }
        let mut firsts = BTreeSet::new();
        for turn in 0..3 {
            let mut q = Message::new();
            q.add_query(Query::query(
                Name::from_ascii("svc").unwrap(),
                RecordType::A,
            ));
            let m = answer(&s, "back", Ipv4Addr::new(10, 9, 0, 4), &q, turn).unwrap();
            let got = a_records(&m);
            assert_eq!(got.len(), 3, "{got:?}");
            firsts.insert(got[0]);
        }
        assert_eq!(firsts.len(), 3, "each turn starts with another container");
        // A network alias is for its own network: a (on bridge only) does not see it.
        assert!(ask(&s, "bridge", [172, 18, 0, 2], "svc", RecordType::A).is_none());
        // A container named like the alias wins.
        s.containers
            .insert("svc".into(), container("svc", &[("back", [10, 9, 0, 20])]));
        let m = ask(&s, "back", [10, 9, 0, 4], "svc", RecordType::A).unwrap();
        assert_eq!(a_records(&m), [Ipv4Addr::new(10, 9, 0, 20)]);
    }

    #[test]
    fn ptr_and_qualified_names() {
        let s = lab();
        let m = ask(
            &s,
            "back",
            [10, 9, 0, 4],
            "3.0.9.10.in-addr.arpa.",
            RecordType::PTR,
        )
        .unwrap();
        let ptr: Vec<String> = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(ptr, ["b.back."]);
        // The name a PTR gives resolves too.
        let m = ask(&s, "back", [10, 9, 0, 4], "b.back.", RecordType::A).unwrap();
        assert_eq!(a_records(&m), [Ipv4Addr::new(10, 9, 0, 3)]);
        // Not on a shared network, or no container: forwarded.
        assert!(ask(
            &s,
            "bridge",
            [172, 18, 0, 2],
            "4.0.9.10.in-addr.arpa.",
            RecordType::PTR
        )
        .is_none());
        assert!(ask(
            &s,
            "back",
            [10, 9, 0, 4],
            "99.0.9.10.in-addr.arpa.",
            RecordType::PTR
        )
        .is_none());
        assert!(ask(&s, "bridge", [172, 18, 0, 2], "c.back", RecordType::A).is_none());
        assert_eq!(
            reverse_addr("1.2.3.4.IN-ADDR.ARPA"),
            Some(Ipv4Addr::new(4, 3, 2, 1).into())
        );
        assert_eq!(reverse_addr("2.3.4.in-addr.arpa."), None);
    }

    #[test]
    fn dual_stack_names_aaaa_and_ip6_ptr() {
        let mut s = lab();
        let ip6: Ipv6Addr = "fd00:1::3".parse().unwrap();
        let b = s.containers.get_mut("b").unwrap();
        b.interfaces[1].ip6 = Some(ip6);
        b.interfaces[1].aliases = vec!["svc".into()];
        let aaaa = |m: &Message| -> Vec<Ipv6Addr> {
            m.answers()
                .iter()
                .filter_map(|r| match r.data() {
                    RData::AAAA(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        };
        // Asked over IPv4 or IPv6 (c has no IPv6: its IPv4 address asks).
        let m = ask(&s, "back", [10, 9, 0, 4], "b", RecordType::AAAA).unwrap();
        assert_eq!((aaaa(&m), a_records(&m)), (vec![ip6], vec![]));
        let mut q = Message::new();
        q.add_query(Query::query(
            Name::from_ascii("svc").unwrap(),
            RecordType::ANY,
        ));
        let m = answer(&s, "back", ip6, &q, 0).unwrap();
        assert_eq!(
            (aaaa(&m), a_records(&m)),
            (vec![ip6], vec![Ipv4Addr::new(10, 9, 0, 3)])
        );
        // No IPv6 address: the name exists, with no AAAA.
        let m = ask(&s, "back", [10, 9, 0, 3], "c", RecordType::AAAA).unwrap();
        assert!(m.answers().is_empty());
        let rev = "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(reverse_addr(rev), Some(ip6.into()));
        let m = ask(&s, "back", [10, 9, 0, 4], rev, RecordType::PTR).unwrap();
        assert_eq!(m.answers().len(), 1);
        assert!(reverse_addr("1.ip6.arpa.").is_none());
        // Both addresses in the peers' hosts files.
        let hosts = render_hosts(&s, &s.containers["c"]);
        assert!(hosts.contains("fd00:1::3\tb\n"), "{hosts}");
    }

    #[test]
    fn own_upstreams_and_internal_networks() {
        let mut s = lab();
        let mut d = container("d", &[("back", [10, 9, 0, 9])]);
        d.dns.servers = vec!["192.0.2.53".parse().unwrap()];
        s.containers.insert("d".into(), d);
        let asker = |o: u8| std::net::IpAddr::V4(Ipv4Addr::new(10, 9, 0, o));
        assert_eq!(
            reply(&s, "back", asker(9), &query(1, "example.org"), 0),
            Reply::Forward(vec!["192.0.2.53".parse().unwrap()])
        );
        // Only on an internal network: no forwarding, names still answered.
        s.networks.get_mut("back").unwrap().internal = true;
        let Reply::Now(r) = reply(&s, "back", asker(4), &query(2, "example.org"), 0) else {
            panic!("an internal network's container is told no");
        };
        assert_eq!(
            Message::from_vec(&r).unwrap().response_code(),
            ResponseCode::Refused
        );
        assert!(matches!(
            reply(&s, "back", asker(4), &query(3, "b"), 0),
            Reply::Now(_)
        ));
        // b is on bridge too: it has a way out.
        assert_eq!(
            reply(&s, "back", asker(3), &query(4, "example.org"), 0),
            Reply::Forward(vec![])
        );
    }

    #[test]
    fn resolv_conf_like_docker() {
        let mut s = lab();
        let r = render_resolv(&s, &s.containers["a"]).unwrap();
        assert!(r.contains("nameserver 172.18.0.1\n"), "{r}");
        assert!(r.ends_with("options ndots:0\n"), "{r}");
        let c = s.containers.get_mut("a").unwrap();
        c.dns = DnsSettings {
            servers: vec![],
            search: vec!["lab.test".into(), "example.org".into()],
            options: vec!["ndots:3".into(), "edns0".into()],
        };
        let r = render_resolv(&s, &s.containers["a"]).unwrap();
        assert!(r.contains("search lab.test example.org\n"), "{r}");
        assert!(r.contains("options ndots:3 edns0\n"), "{r}");
        assert!(!r.contains("ndots:0"), "{r}");
        // An isolated network: no resolver to name.
        let net = s.networks.get_mut("bridge").unwrap();
        net.internal = true;
        net.gateway_mode = crate::state::GatewayMode::Isolated;
        let r = render_resolv(&s, &s.containers["a"]).unwrap();
        assert!(!r.contains("nameserver"), "{r}");
    }

    #[test]
    fn dns_flags_and_host_settings() {
        let p = std::env::temp_dir().join(format!("md-resolv-host-{}", std::process::id()));
        fs::write(
            &p,
            "nameserver 10.0.0.1\nsearch corp.example\noptions rotate\noptions timeout:2\n",
        )
        .unwrap();
        let none = DnsRequest::parse(&[], &[], &[]).unwrap();
        let got = none.settings(&p);
        assert_eq!(got.search, ["corp.example"]);
        assert_eq!(got.options, ["rotate", "timeout:2"]);
        let own =
            DnsRequest::parse(&["192.0.2.53".into()], &[".".into()], &["ndots:2".into()]).unwrap();
        let got = own.settings(&p);
        assert!(got.search.is_empty(), "`.`: no search domains");
        assert_eq!(got.options, ["ndots:2"]);
        assert_eq!(
            got.servers,
            ["192.0.2.53".parse::<std::net::IpAddr>().unwrap()]
        );
        fs::remove_file(&p).unwrap();
        for (servers, search, options) in [
            (&["x"][..], &[][..], &[][..]),
            (&["127.0.0.1"], &[], &[]),
            (&[], &["bad domain"], &[]),
            (&[], &["a..b"], &[]),
            (&[], &[], &["two words"]),
            (&[], &[], &["ndots:x"]),
        ] {
            let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert!(
                DnsRequest::parse(&v(servers), &v(search), &v(options)).is_err(),
                "{servers:?} {search:?} {options:?}"
            );
        }
    }

    #[test]
    fn add_host_forms() {
        assert_eq!(
            parse_add_host("db:10.1.2.3").unwrap(),
            ("db".into(), HostAddr::Ip("10.1.2.3".parse().unwrap()))
        );
        assert_eq!(
            parse_add_host("db=::1").unwrap().1,
            HostAddr::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            parse_add_host("v6:[2001:db8::1]").unwrap().1,
            HostAddr::Ip("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            parse_add_host("gw:host-gateway").unwrap().1,
            HostAddr::HostGateway
        );
        for bad in [
            "db",
            "db:",
            ":1.2.3.4",
            "d b:1.2.3.4",
            "db:1.2.3",
            "db:host-gw",
        ] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
        let s = lab();
        let net = &s.networks["back"];
        let hosts = resolve_extra_hosts(
            &[
                ("gw".into(), HostAddr::HostGateway),
                parse_add_host("x:1.2.3.4").unwrap(),
            ],
            Some(net),
        )
        .unwrap();
        assert_eq!(hosts[0].ip.to_string(), "10.9.0.1");
        assert!(resolve_extra_hosts(&[("gw".into(), HostAddr::HostGateway)], None).is_err());
        let mut c = s.containers["a"].clone();
        c.extra_hosts = hosts;
        let h = render_hosts(&s, &c);
        let own = h.find("172.18.0.2\ta").unwrap();
        assert!(h.find("1.2.3.4\tx\n").unwrap() < own, "{h}");
        assert!(h.contains("10.9.0.1\tgw\n"), "{h}");
    }

    #[test]
    fn upstreams_from_resolv_conf() {
        let p = std::env::temp_dir().join(format!("md-resolv-{}", std::process::id()));
        fs::write(
            &p,
            "search x\nnameserver 192.0.2.2\n nameserver 10.0.0.1 \noptions ndots:1\n",
        )
        .unwrap();
        assert_eq!(
            upstreams(&p),
            vec![
                "192.0.2.2:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap()
            ]
        );
        fs::remove_file(&p).unwrap();
    }

    /// The IPv4 half of `lookup`'s answers.
    fn v4(v: Vec<(Ipv4Addr, Option<std::net::Ipv6Addr>)>) -> Vec<Ipv4Addr> {
        v.into_iter().map(|(a, _)| a).collect()
    }

    #[test]
    fn only_addresses_on_the_askers_networks() {
        let s = lab();
        // a asks through the "back" resolver but is on "bridge" only: b's bridge address,
        // never its address on a network a is not on.
        assert_eq!(
            v4(lookup(&s, &["bridge".to_string()], Some("back"), "b")),
            vec![Ipv4Addr::new(172, 18, 0, 3)]
        );
        // b is on both: the network the query came in on wins.
        let both = ["bridge".to_string(), "back".to_string()];
        assert_eq!(
            v4(lookup(&s, &both, Some("back"), "b")),
            vec![Ipv4Addr::new(10, 9, 0, 3)]
        );
        assert_eq!(
            v4(lookup(&s, &both, Some("bridge"), "b")),
            vec![Ipv4Addr::new(172, 18, 0, 3)]
        );
        assert_eq!(
            v4(lookup(&s, &["none".to_string()], None, "b")),
            Vec::<Ipv4Addr>::new()
        );
    }

    #[test]
    fn names_and_hostnames_resolve() {
        let mut s = lab();
        s.containers.get_mut("a").unwrap().hostname = "alpha".into();
        let nets = ["bridge".to_string()];
        let a = vec![Ipv4Addr::new(172, 18, 0, 2)];
        assert_eq!(v4(lookup(&s, &nets, None, "a")), a);
        assert_eq!(v4(lookup(&s, &nets, None, "ALPHA.")), a);
        assert_eq!(v4(lookup(&s, &nets, None, "alph")), Vec::<Ipv4Addr>::new());
        let h = render_hosts(&s, &s.containers["b"]);
        assert!(h.contains("172.18.0.2\talpha a\n"), "{h}");
    }

    #[test]
    fn refused_answers_echo_the_query() {
        let mut q = Message::new();
        q.set_id(4242).add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ));
        let r = Message::from_vec(&refused(&q.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(r.id(), 4242);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(r.queries(), q.queries());
        assert!(r.answers().is_empty());
        assert!(refused(b"\x01").is_none(), "not a DNS message");
    }

    fn state_dir() -> (StateDir, PathBuf) {
        let d = std::env::temp_dir().join(format!(
            "md-dns-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        (StateDir::new(&d), d)
    }

    #[test]
    fn container_files_are_written_in_place_and_removed() {
        let (dir, d) = state_dir();
        let (hosts, resolv) = files(&dir, "web");
        assert_eq!(hosts, d.join("containers/web/hosts"));
        assert_eq!(resolv, d.join("containers/web/resolv.conf"));
        fs::create_dir_all(hosts.parent().unwrap()).unwrap();
        write_in_place(&hosts, "one\n").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "one\n");
        use std::os::unix::fs::MetadataExt;
        let inode = fs::metadata(&hosts).unwrap().ino();
        write_in_place(&hosts, "two\n").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "two\n");
        assert_eq!(fs::metadata(&hosts).unwrap().ino(), inode, "same inode");
        // Unchanged content is not rewritten (a read-only file shows it).
        let mut perm = fs::metadata(&hosts).unwrap().permissions();
        perm.set_readonly(true);
        fs::set_permissions(&hosts, perm).unwrap();
        if unsafe { libc::geteuid() } != 0 {
            assert!(write_in_place(&hosts, "three\n").is_err());
        }
        write_in_place(&hosts, "two\n").unwrap();
        remove_files(&dir, "web");
        assert!(!d.join("containers/web").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refresh_writes_files_of_containers_with_their_own_network() {
        let (dir, d) = state_dir();
        let mut s = lab();
        let mut host = container("h", &[]);
        host.mode = "host".into();
        let mut joined = container("j", &[]);
        joined.mode = "container:a".into();
        let none = container("n", &[]);
        for c in [host, joined, none] {
            s.containers.insert(c.name.clone(), c);
        }
        refresh(&dir, &s).unwrap();
        let read =
            |name: &str, f: &str| fs::read_to_string(d.join("containers").join(name).join(f));
        assert_eq!(
            read("a", "hosts").unwrap(),
            render_hosts(&s, &s.containers["a"])
        );
        assert_eq!(
            read("c", "resolv.conf").unwrap(),
            render_resolv(&s, &s.containers["c"]).unwrap()
        );
        assert!(read("n", "hosts").unwrap().contains("127.0.1.1\tn\n"));
        assert!(read("n", "resolv.conf").is_err(), "no network, no resolver");
        assert!(
            !d.join("containers/h").exists(),
            "host mode keeps the host's files"
        );
        assert!(
            !d.join("containers/j").exists(),
            "joined containers share a's"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_are_read_again_when_the_state_changes() {
        let (dir, d) = state_dir();
        {
            let mut l = dir.lock().unwrap();
            l.state.containers = lab().containers;
            l.save().unwrap();
        }
        let mut names = Names::new(&d);
        assert!(names.current().containers.contains_key("a"));
        {
            let mut l = dir.lock().unwrap();
            l.state.containers.remove("a");
            l.save().unwrap();
        }
        assert!(!names.current().containers.contains_key("a"), "read again");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_resolver_never_forwards_to_itself() {
        let (_dir, d) = state_dir();
        let resolv = d.join("resolv.conf");
        fs::write(&resolv, "nameserver 172.18.0.1\nnameserver 192.0.2.2\n").unwrap();
        let r = Resolver {
            names: Mutex::new(Names::new(&d)),
            network: "bridge".into(),
            resolv_conf: resolv,
            own: "172.18.0.1".parse().unwrap(),
            idle: TCP_IDLE,
            turn: AtomicUsize::new(0),
        };
        assert_eq!(
            r.upstreams(&[]),
            ["192.0.2.2:53".parse::<SocketAddr>().unwrap()]
        );
        // A container's own --dns servers replace the host's; still never ourselves.
        let own = ["172.18.0.1".parse().unwrap(), "10.0.0.9".parse().unwrap()];
        assert_eq!(
            r.upstreams(&own),
            ["10.0.0.9:53".parse::<SocketAddr>().unwrap()]
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
