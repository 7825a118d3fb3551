//! `md-user trace FROM TO[:PORT][/PROTO]`: what the two arguments say, before anything is looked
//! up. Parsing needs no state and no privileges (unit-tested without root); resolving names
//! against md's state and maps happens in `trace::resolve`.
//!
//! FROM and TO are a container name, `outside:IP`, `host`, or an address (`IP`, and as FROM a
//! published `HOSTIP:PORT`: the container behind it). Keywords and addresses win over container
//! names: a container called `host` is traced by its address.

use std::{fmt, net::Ipv4Addr};

use anyhow::{bail, Result};

/// One end of a trace as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A container by name.
    Container(String),
    /// A machine beyond the host's uplinks.
    Outside(Ipv4Addr),
    /// The host's own processes.
    Host,
    /// An address: a host address, a container's, or one outside (decided by md's maps).
    Addr(Ipv4Addr),
    /// FROM only: the container behind a published `HOSTIP:PORT`.
    Published(Ipv4Addr, u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// TO: where the packet goes, with a port for TCP and UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub peer: Peer,
    /// None for ICMP echo.
    pub port: Option<u16>,
    pub proto: Proto,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Container(n) => f.write_str(n),
            Peer::Outside(ip) => write!(f, "outside:{ip}"),
            Peer::Host => f.write_str("host"),
            Peer::Addr(ip) => write!(f, "{ip}"),
            Peer::Published(ip, port) => write!(f, "{ip}:{port}"),
        }
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.peer)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "/{}", self.proto)
    }
}

fn parse_port(s: &str, spec: &str) -> Result<u16> {
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => bail!("invalid trace spec {spec:?}: {s:?} is not a port (1-65535)"),
    }
}

fn parse_ip(s: &str, spec: &str) -> Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("invalid trace spec {spec:?}: {s:?} is not an IPv4 address"))
}

/// A container name as `run --name` accepts it.
fn check_name(n: &str, spec: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        bail!("invalid trace spec {spec:?}: {n:?} is no container name, outside:IP, host or IP");
    }
    Ok(())
}

/// The peer part of a spec and the port written after it, if any.
fn peer_and_port(body: &str, spec: &str) -> Result<(Peer, Option<u16>)> {
    if body.is_empty() {
        bail!("invalid trace spec {spec:?}: empty");
    }
    if let Some(rest) = body.strip_prefix("outside:") {
        let (ip, port) = match rest.split_once(':') {
            Some((ip, port)) => (ip, Some(parse_port(port, spec)?)),
            None => (rest, None),
        };
        return Ok((Peer::Outside(parse_ip(ip, spec)?), port));
    }
    let (head, port) = match body.split_once(':') {
        Some((h, p)) => (h, Some(parse_port(p, spec)?)),
        None => (body, None),
    };
    if head == "host" {
        return Ok((Peer::Host, port));
    }
    if head == "outside" {
        bail!("invalid trace spec {spec:?}: outside needs an address (outside:IP)");
    }
    if let Ok(ip) = head.parse::<Ipv4Addr>() {
        return Ok((Peer::Addr(ip), port));
    }
    if head.bytes().all(|b| b.is_ascii_digit() || b == b'.') && head.contains('.') {
        bail!("invalid trace spec {spec:?}: {head:?} is not an IPv4 address");
    }
    check_name(head, spec)?;
    Ok((Peer::Container(head.to_string()), port))
}

/// FROM: a container name, `outside:IP`, `host`, an address, or a published `HOSTIP:PORT`.
pub fn parse_from(spec: &str) -> Result<Peer> {
    if spec.contains('/') {
        bail!("invalid trace spec {spec:?}: FROM takes no protocol (give it to TO)");
    }
    match peer_and_port(spec, spec)? {
        (peer, None) => Ok(peer),
        (Peer::Addr(ip), Some(port)) => Ok(Peer::Published(ip, port)),
        (_, Some(_)) => {
            bail!("invalid trace spec {spec:?}: FROM takes a port only as a published HOSTIP:PORT")
        }
    }
}

/// TO: `PEER[:PORT][/PROTO]`. A port without protocol is TCP; no port and no protocol is an
/// ICMP echo; TCP and UDP need a port, ICMP takes none.
pub fn parse_to(spec: &str) -> Result<Dest> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, "tcp")) => (b, Some(Proto::Tcp)),
        Some((b, "udp")) => (b, Some(Proto::Udp)),
        Some((b, "icmp")) => (b, Some(Proto::Icmp)),
        Some((_, p)) => {
            bail!("invalid trace spec {spec:?}: unknown protocol {p:?} (tcp, udp or icmp)")
        }
        None => (spec, None),
    };
    let (peer, port) = peer_and_port(body, spec)?;
    let proto = match (proto, port) {
        (Some(Proto::Icmp), Some(_)) => {
            bail!("invalid trace spec {spec:?}: icmp takes no port")
        }
        (Some(p @ (Proto::Tcp | Proto::Udp)), None) => {
            bail!("invalid trace spec {spec:?}: {p} needs a port (TO:PORT/{p})")
        }
        (Some(p), _) => p,
        (None, Some(_)) => Proto::Tcp,
        (None, None) => Proto::Icmp,
    };
    Ok(Dest { peer, port, proto })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn from_forms() {
        assert_eq!(parse_from("web").unwrap(), Peer::Container("web".into()));
        assert_eq!(
            parse_from("my_db.1-a").unwrap(),
            Peer::Container("my_db.1-a".into())
        );
        assert_eq!(parse_from("host").unwrap(), Peer::Host);
        assert_eq!(
            parse_from("outside:192.0.2.2").unwrap(),
            Peer::Outside(ip("192.0.2.2"))
        );
        assert_eq!(
            parse_from("192.0.2.9").unwrap(),
            Peer::Addr(ip("192.0.2.9"))
        );
        assert_eq!(
            parse_from("192.0.2.1:8080").unwrap(),
            Peer::Published(ip("192.0.2.1"), 8080)
        );
    }

    #[test]
    fn to_forms_and_default_protocols() {
        let d = parse_to("web:80").unwrap();
        assert_eq!(d.peer, Peer::Container("web".into()));
        assert_eq!((d.port, d.proto), (Some(80), Proto::Tcp));
        let d = parse_to("web:5300/udp").unwrap();
        assert_eq!((d.port, d.proto), (Some(5300), Proto::Udp));
        let d = parse_to("web").unwrap();
        assert_eq!((d.port, d.proto), (None, Proto::Icmp));
        let d = parse_to("web/icmp").unwrap();
        assert_eq!((d.port, d.proto), (None, Proto::Icmp));
        let d = parse_to("outside:192.0.2.2:8000").unwrap();
        assert_eq!(d.peer, Peer::Outside(ip("192.0.2.2")));
        assert_eq!((d.port, d.proto), (Some(8000), Proto::Tcp));
        let d = parse_to("outside:192.0.2.2/icmp").unwrap();
        assert_eq!((d.port, d.proto), (None, Proto::Icmp));
        let d = parse_to("192.0.2.1:8080/udp").unwrap();
        assert_eq!(d.peer, Peer::Addr(ip("192.0.2.1")));
        assert_eq!((d.port, d.proto), (Some(8080), Proto::Udp));
        let d = parse_to("host:22").unwrap();
        assert_eq!(d.peer, Peer::Host);
        assert_eq!(d.to_string(), "host:22/tcp");
        assert_eq!(
            parse_to("127.0.0.1:8081").unwrap().peer,
            Peer::Addr(ip("127.0.0.1"))
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, why) in [
            ("", "empty"),
            ("web:0", "not a port"),
            ("web:65536", "not a port"),
            ("web:http", "not a port"),
            ("web:80/sctp", "unknown protocol"),
            ("web:80/icmp", "icmp takes no port"),
            ("web/tcp", "needs a port"),
            ("outside:192.0.2.300", "not an IPv4 address"),
            ("outside:web", "not an IPv4 address"),
            ("outside", "needs an address"),
            ("1.2.3", "not an IPv4 address"),
            ("-web", "no container name"),
            ("we b:80", "no container name"),
            ("web:80:81", "not a port"),
        ] {
            let e = parse_to(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec:?}: {e}");
            assert!(!e.contains('\n'), "{spec:?}: one line: {e}");
        }
        for (spec, why) in [
            ("web:80", "only as a published"),
            ("host:22", "only as a published"),
            ("web/udp", "no protocol"),
            ("outside:1.2.3.4:80", "only as a published"),
        ] {
            let e = parse_from(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec:?}: {e}");
        }
    }
}
