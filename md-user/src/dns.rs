//! Names: each container's own /etc/hosts and /etc/resolv.conf (bind-mounted in a private
//! mount namespace, rewritten in place as containers come and go), and the per-network
//! resolver Podman's aardvark-dns is the model for: one small process per network, listening
//! on the gateway address in the host namespace, started with the network's first container
//! and gone with its last. It answers container names that share a network with the asker and
//! forwards everything else to the upstream servers of the host's resolv.conf (over IPv4 or
//! IPv6, whichever each server's address is). Containers on dual-stack networks are known by
//! both addresses: A and AAAA records, and both in /etc/hosts.

use std::{
    collections::HashSet,
    fs::{self, OpenOptions},
    io::Write,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        DNSClass, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::state::{Container, Interface, State, StateDir, StateReader};

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

/// The interface a container name (or hostname) resolves to for someone on `nets`.
fn lookup<'a>(
    state: &'a State,
    nets: &[String],
    network: Option<&str>,
    name: &str,
) -> Option<&'a Interface> {
    let name = name.trim_end_matches('.');
    let by_name = is_a_name(state, name);
    state
        .containers
        .values()
        .filter(|c| {
            if by_name {
                c.name.eq_ignore_ascii_case(name)
            } else {
                // Hostnames and aliases, unless a container has that name (names win).
                c.hostname.eq_ignore_ascii_case(name)
                    || c.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            }
        })
        .find_map(|c| shared_iface(c, nets, network))
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

/// /etc/resolv.conf of a container: its network's resolver.
pub fn render_resolv(state: &State, c: &Container) -> Option<String> {
    let net = state.networks.get(&c.interfaces.first()?.network)?;
    Some(format!(
        "# md: the resolver of network {}\nnameserver {}\n",
        c.interfaces[0].network,
        net.subnet.gateway()
    ))
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
/// for a CNI container (the runtime writes its files).
fn has_files(c: &Container) -> bool {
    !(c.mode == "host" || c.mode.starts_with("container:") || c.cni.is_some())
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

/// Container `name` was just added: its own files, and one line appended to each peer's hosts
/// file, instead of rewriting every file (with a thousand containers on a network that is a
/// thousand small appends, not thirty megabytes). When the new name takes a peer's hostname
/// (names win, so that alias goes), everything is rewritten.
pub fn added(dir: &StateDir, state: &State, name: &str) -> Result<()> {
    let Some(c) = state.containers.get(name) else {
        return Ok(());
    };
    let names = NameSet::of(state);
    let shadows = state
        .containers
        .values()
        .any(|p| p.name != c.name && p.hostname.eq_ignore_ascii_case(&c.name));
    if shadows {
        return refresh(dir, state);
    }
    if has_files(c) {
        let (hosts, resolv) = files(dir, &c.name);
        fs::create_dir_all(hosts.parent().expect("dir"))?;
        write_in_place(&hosts, &render_hosts_with(state, &names, c))?;
        if let Some(r) = render_resolv(state, c) {
            write_in_place(&resolv, &r)?;
        }
    }
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

/// Builds the answer to a query for a container name, or None to forward it.
pub fn answer(
    state: &State,
    network: &str,
    asker: impl Into<IpAddr>,
    query: &Message,
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
    let iface = lookup(state, &asker_nets, Some(network), &name)?;
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(ResponseCode::NoError)
        .add_query(q.clone());
    let a = || Record::from_rdata(q.name().clone(), 0, RData::A(A(iface.ip)));
    let aaaa = |ip6| Record::from_rdata(q.name().clone(), 0, RData::AAAA(AAAA(ip6)));
    match (q.query_type(), iface.ip6) {
        (RecordType::A, _) => {
            m.add_answer(a());
        }
        (RecordType::AAAA, Some(ip6)) => {
            m.add_answer(aaaa(ip6));
        }
        (RecordType::ANY, ip6) => {
            m.add_answer(a());
            if let Some(ip6) = ip6 {
                m.add_answer(aaaa(ip6));
            }
        }
        // The name exists, with no address of that type: NOERROR, empty.
        _ => {}
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
    Forward,
    Nothing,
}

/// The resolver's decision for a query from `asker`, the same over UDP and TCP.
fn reply(state: &State, network: &str, asker: std::net::IpAddr, query: &[u8]) -> Reply {
    // An IPv4-mapped address is the IPv4 address it maps.
    let asker = match asker {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(asker),
        v4 => v4,
    };
    // Only md's containers may ask: the gateway address may be reachable from elsewhere, and
    // an open forwarder is not what md runs.
    if !state
        .containers
        .values()
        .any(|c| c.interfaces.iter().any(|i| has_ip(i, asker)))
    {
        return refused(query).map_or(Reply::Nothing, Reply::Now);
    }
    if let Ok(msg) = Message::from_vec(query) {
        if let Some(reply) = answer(state, network, asker, &msg) {
            return reply.to_vec().map_or(Reply::Nothing, Reply::Now);
        }
    }
    Reply::Forward
}

/// What every query handler shares.
struct Resolver {
    names: Mutex<Names>,
    network: String,
    resolv_conf: PathBuf,
    own: std::net::IpAddr,
    /// How long a TCP client may stay silent ([`TCP_IDLE`]).
    idle: Duration,
}

impl Resolver {
    fn decide(&self, asker: std::net::IpAddr, query: &[u8]) -> Reply {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        reply(names.current(), &self.network, asker, query)
    }

    /// The upstream servers, never ourselves.
    fn upstreams(&self) -> Vec<SocketAddr> {
        upstreams(&self.resolv_conf)
            .into_iter()
            .filter(|u| u.ip() != self.own)
            .collect()
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
                    Reply::Forward => {
                        let (q, sock, ups) = (query.to_vec(), sock.clone(), res.upstreams());
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
            Reply::Forward => {
                let ups = res.upstreams();
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
    use hickory_proto::{op::Query, rr::Name};
    use std::net::Ipv4Addr;

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
        answer(s, net, Ipv4Addr::from(asker), &q)
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
        let Reply::Now(r) = reply(&s, "bridge", member, &query(1, "b")) else {
            panic!("a member asking for a peer gets an answer");
        };
        assert_eq!(
            a_record(&Message::from_vec(&r).unwrap()),
            Some(Ipv4Addr::new(172, 18, 0, 3))
        );
        assert_eq!(
            reply(&s, "bridge", member, &query(2, "example.org")),
            Reply::Forward
        );
        let stranger = std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        let Reply::Now(r) = reply(&s, "bridge", stranger, &query(3, "b")) else {
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
}
