//! Host ports a container publishes. A published port must not take over a port a host process
//! already holds (Docker's proxy would fail to bind it), and while it is published the kernel
//! must not hand it out as a host socket's ephemeral port (the answers to that socket would go
//! to the container). The first is checked on md's host namespace's sockets through sock_diag,
//! as `ss` reads them; the second is `ip_local_reserved_ports` of that namespace (a per-namespace
//! sysctl, written through /proc), which md adds published ports to and gives them back from.

use std::{
    collections::{BTreeSet, HashSet},
    fmt, fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use crate::{
    portmap::{PortMapping, Proto},
    proc,
    state::State,
};

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A socket that receives whatever is sent to its port: a TCP listener or an unconnected UDP
/// socket. (A connected socket only gets its peer's packets, and the datapath never translates
/// packets of a host socket's flow.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub proto: Proto,
    pub addr: SocketAddr,
    /// An IPv6 socket that takes no IPv4 (IPV6_V6ONLY).
    pub v6only: bool,
    pub inode: u32,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.proto {
            Proto::Tcp => "listening on",
            Proto::Udp => "bound to",
        };
        write!(f, "{how} {}", self.addr)
    }
}

impl Holder {
    /// The IPv4 address this socket takes packets for (0.0.0.0: all), None if it takes no
    /// IPv4 at all.
    fn ipv4(&self) -> Option<Ipv4Addr> {
        match self.addr.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) if a.is_unspecified() => (!self.v6only).then_some(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        }
    }

    /// The IPv6 address this socket takes packets for (`::`: all), None if it takes no IPv6.
    fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        match self.addr.ip() {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => None,
            IpAddr::V6(a) => Some(a),
        }
    }

    /// Whether publishing `p` would take packets this socket is waiting for, in either family.
    /// The same rule as bind(2): a wildcard on either side overlaps every address.
    pub fn clashes_with(&self, p: &PortMapping) -> bool {
        if self.proto != p.proto || self.addr.port() != p.host_port {
            return false;
        }
        let v4 = p.applies_v4()
            && match (self.ipv4(), p.host_v4()) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(mine), Some(theirs)) => mine.is_unspecified() || mine == theirs,
            };
        let v6 = p.applies_v6()
            && match (self.ipv6(), p.host_v6()) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(mine), Some(theirs)) => mine.is_unspecified() || mine == theirs,
            };
        v4 || v6
    }
}

/// Every port holder in the calling thread's network namespace (TCP and UDP, IPv4 and IPv6).
pub fn holders() -> Result<Vec<Holder>> {
    let mut out = Vec::new();
    for (proto, states) in [
        (Proto::Tcp, StateFlags::LISTEN),
        // Unconnected UDP sockets are in state CLOSE.
        (Proto::Udp, StateFlags::CLOSE),
    ] {
        for family in [AF_INET, AF_INET6] {
            for r in dump(family, proto, states.clone()).context("reading the host's sockets")? {
                let id = &r.header.socket_id;
                if id.source_port == 0 {
                    continue;
                }
                out.push(Holder {
                    proto,
                    addr: SocketAddr::new(id.source_address, id.source_port),
                    v6only: r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true))),
                    inode: r.header.inode,
                });
            }
        }
    }
    Ok(out)
}

/// One SOCK_DIAG_BY_FAMILY dump.
fn dump(
    family: u8,
    proto: Proto,
    states: StateFlags,
) -> Result<Vec<netlink_packet_sock_diag::inet::InetResponse>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening sock_diag")?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: match proto {
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
            },
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0)?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                .context("parsing a sock_diag answer")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => out.push(*r),
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::from(e)).context("sock_diag dump")
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

/// Socket inodes of md's own resolvers: they listen on each network's gateway, port 53, and
/// must not make `-p 53:53/udp` look taken.
fn own_sockets(state: &State) -> HashSet<u32> {
    let mut inodes = HashSet::new();
    for net in state.networks.values() {
        if !proc::alive(net.dns_pid, net.dns_start) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{}/fd", net.dns_pid)) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(ino) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
            {
                inodes.insert(ino);
            }
        }
    }
    inodes
}

/// The ports host processes hold now, for picking a free one (Docker's `-P` and `-p 80`).
pub struct Held {
    holders: Vec<Holder>,
    own: HashSet<u32>,
}

impl Held {
    pub fn now(state: &State) -> Result<Held> {
        Ok(Held {
            holders: holders()?,
            own: own_sockets(state),
        })
    }

    pub fn holds(&self, p: &PortMapping) -> bool {
        self.holders
            .iter()
            .any(|h| !self.own.contains(&h.inode) && h.clashes_with(p))
    }
}

/// Refuses ports a host process holds in md's host namespace (the calling thread's), with one
/// line naming the first.
pub fn check_free(ports: &[PortMapping], state: &State) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let own = own_sockets(state);
    let held = holders()?;
    for p in ports.iter().filter(|p| p.uses_host_port()) {
        if let Some(h) = held
            .iter()
            .find(|h| !own.contains(&h.inode) && h.clashes_with(p))
        {
            bail!(
                "port {}/{} is in use by a host process ({h})",
                p.host_port,
                p.proto
            );
        }
    }
    Ok(())
}

/// Where random host ports come from: the host's ephemeral range (Docker's choice too), below
/// md's NAT range.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The ephemeral range of md's host namespace, kept below `nat_min`.
fn ephemeral_range(nat_min: u16) -> (u16, u16) {
    let (lo, hi) = fs::read_to_string(LOCAL_PORT_RANGE)
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let hi = hi.min(nat_min.saturating_sub(1));
    if lo > hi {
        (32768, 60999.min(nat_min.saturating_sub(1)))
    } else {
        (lo, hi)
    }
}

/// Gives every mapping without a host port one: a free port of the host's ephemeral range
/// (random start, then the next ones) that `taken` does not claim, no host process holds and
/// the host does not keep reserved. Called under the state lock, so two containers never get
/// the same one.
pub fn pick_random(
    ports: &mut [PortMapping],
    taken: impl Fn(&PortMapping) -> bool,
    nat_min: u16,
) -> Result<()> {
    if !ports.iter().any(|p| p.random()) {
        return Ok(());
    }
    let (lo, hi) = ephemeral_range(nat_min);
    let held = holders()?;
    let reserved = read_reserved().unwrap_or_default();
    let span = u32::from(hi - lo) + 1;
    for i in 0..ports.len() {
        if !ports[i].random() {
            continue;
        }
        let start = (crate::attach::random_u64() % u64::from(span)) as u32;
        let free = (0..span)
            .map(|k| lo + ((start + k) % span) as u16)
            .map(|port| PortMapping {
                host_port: port,
                ..ports[i]
            })
            .find(|cand| {
                !reserved.contains(&cand.host_port)
                    && !held.iter().any(|h| h.clashes_with(cand))
                    && !taken(cand)
                    && !ports.iter().any(|q| !q.random() && q.conflicts_with(cand))
            })
            .with_context(|| {
                format!(
                    "no free host port left in {lo}-{hi} for {}/{}",
                    ports[i].container_port, ports[i].proto
                )
            })?;
        ports[i] = free;
    }
    Ok(())
}

/// `ip_local_reserved_ports` syntax: "8080,40000-40010".
pub fn parse_ranges(s: &str) -> Result<BTreeSet<u16>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let bad = || format!("bad port range {part:?} in {RESERVED_PORTS}");
        let a: u16 = a.parse().with_context(bad)?;
        let b: u16 = b.parse().with_context(bad)?;
        out.extend(a..=b);
    }
    Ok(out)
}

pub fn format_ranges(ports: &BTreeSet<u16>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = ports.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end.wrapping_add(1))) && end != u16::MAX {
            end = it.next().expect("peeked");
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

fn read_reserved() -> Result<BTreeSet<u16>> {
    parse_ranges(
        &fs::read_to_string(RESERVED_PORTS).with_context(|| format!("reading {RESERVED_PORTS}"))?,
    )
}

fn write_reserved(ports: &BTreeSet<u16>) -> Result<()> {
    // An empty write is refused; a newline clears the list.
    let text = format!("{}\n", format_ranges(ports));
    fs::write(RESERVED_PORTS, text).with_context(|| format!("writing {RESERVED_PORTS}"))
}

/// The host ports of `ports` that are not reserved yet: the ones md will add (and record, so it
/// gives back only what it added).
pub fn unreserved(ports: &[PortMapping]) -> Result<BTreeSet<u16>> {
    let now = read_reserved()?;
    Ok(ports
        .iter()
        .filter(|p| p.uses_host_port())
        .map(|p| p.host_port)
        .filter(|p| !now.contains(p))
        .collect())
}

/// Adds ports to the reserved ports, keeping every entry there.
pub fn reserve(ports: &BTreeSet<u16>) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let mut now = read_reserved()?;
    now.extend(ports);
    write_reserved(&now)
}

/// Gives back the ports md reserved that no container publishes any more; entries md did not
/// add stay.
pub fn release(state: &mut State) -> Result<()> {
    let published: BTreeSet<u16> = state
        .containers
        .values()
        .flat_map(|c| {
            c.ports
                .iter()
                .filter(|p| p.uses_host_port())
                .map(|p| p.host_port)
        })
        .collect();
    let back: BTreeSet<u16> = state
        .reserved_ports
        .difference(&published)
        .copied()
        .collect();
    if back.is_empty() {
        return Ok(());
    }
    let mut now = read_reserved()?;
    if back.iter().any(|p| now.contains(p)) {
        now.retain(|p| !back.contains(p));
        write_reserved(&now)?;
    }
    state.reserved_ports.retain(|p| !back.contains(p));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(proto: Proto, addr: &str, v6only: bool) -> Holder {
        Holder {
            proto,
            addr: addr.parse().unwrap(),
            v6only,
            inode: 1,
        }
    }

    /// A mapping as published on an IPv4-only network.
    fn publish(spec: &str) -> PortMapping {
        crate::portmap::for_network(&crate::portmap::parse_spec(spec).unwrap(), false)[0]
    }

    /// A mapping as published on a dual-stack network.
    fn publish_dual(spec: &str) -> PortMapping {
        crate::portmap::for_network(&crate::portmap::parse_spec(spec).unwrap(), true)[0]
    }

    #[test]
    fn clashes_follow_bind_rules() {
        let any = holder(Proto::Tcp, "0.0.0.0:8080", false);
        let lo = holder(Proto::Tcp, "127.0.0.1:8080", false);
        let dual = holder(Proto::Tcp, "[::]:8080", false);
        let v6only = holder(Proto::Tcp, "[::]:8080", true);
        let v6 = holder(Proto::Tcp, "[2001:db8::1]:8080", false);
        let mapped = holder(Proto::Tcp, "[::ffff:192.0.2.1]:8080", false);
        let udp = holder(Proto::Udp, "127.0.0.53:8080", false);
        let wild = publish("8080:80");
        let on_host = publish("192.0.2.1:8080:80");
        for (h, wild_clash, host_clash) in [
            (&any, true, true),
            (&lo, true, false),
            (&dual, true, true),
            (&v6only, false, false),
            (&v6, false, false),
            (&mapped, true, true),
            (&udp, false, false),
        ] {
            assert_eq!(h.clashes_with(&wild), wild_clash, "{h:?} vs {wild}");
            assert_eq!(h.clashes_with(&on_host), host_clash, "{h:?} vs {on_host}");
        }
        assert!(udp.clashes_with(&publish("8080:53/udp")));
        assert!(!udp.clashes_with(&publish("192.0.2.1:8080:53/udp")));
        assert!(!any.clashes_with(&publish("8081:80")));
        // On a dual-stack network a mapping for both families also takes IPv6 sockets, and
        // one bound to an IPv6 address only its own.
        let both = publish_dual("8080:80");
        for (h, clash) in [(&v6only, true), (&v6, true), (&lo, true), (&udp, false)] {
            assert_eq!(h.clashes_with(&both), clash, "{h:?} vs {both} (dual-stack)");
        }
        let on_v6 = publish_dual("[2001:db8::1]:8080:80");
        for (h, clash) in [(&v6only, true), (&v6, true), (&any, false), (&lo, false)] {
            assert_eq!(h.clashes_with(&on_v6), clash, "{h:?} vs {on_v6}");
        }
        assert!(!v6.clashes_with(&publish_dual("[2001:db8::2]:8080:80")));
        assert_eq!(lo.to_string(), "listening on 127.0.0.1:8080");
        assert_eq!(udp.to_string(), "bound to 127.0.0.53:8080");
    }

    #[test]
    fn reserved_port_lists() {
        let s = parse_ranges("8080,40000-40002,50000\n").unwrap();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            [8080, 40000, 40001, 40002, 50000]
        );
        assert_eq!(format_ranges(&s), "8080,40000-40002,50000");
        assert!(parse_ranges("\n").unwrap().is_empty());
        assert_eq!(format_ranges(&BTreeSet::new()), "");
        let top = parse_ranges("65534-65535").unwrap();
        assert_eq!(format_ranges(&top), "65534-65535");
        assert!(parse_ranges("1-x").is_err());
    }

    #[test]
    fn own_listeners_are_seen() {
        // No root needed: sockets of this process in whatever namespace the test runs in.
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (t, u) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let all = holders().unwrap();
        assert!(
            all.iter().any(|h| h.proto == Proto::Tcp && h.addr == t),
            "{t} in {all:?}"
        );
        assert!(
            all.iter().any(|h| h.proto == Proto::Udp && h.addr == u),
            "{u} in {all:?}"
        );
        let p = publish(&format!("{}:80", t.port()));
        let e = check_free(&[p], &State::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "port {}/tcp is in use by a host process (listening on {t})",
                t.port()
            )
        );
    }
}
