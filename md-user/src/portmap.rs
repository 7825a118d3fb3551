//! Port publishing: Docker's `-p` forms, parsed and checked before anything is created. As in
//! Docker 27+, a mapping without an address publishes one host port on both families (on a
//! dual-stack network), `0.0.0.0:` only on IPv4, `[::]:` only on IPv6, and an address only on
//! its own family. A mapping without a host port (`-p 80`, `-p 127.0.0.1::80`, `-P` with
//! `--expose`) gets a random free one when the container is created (under the state lock).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Context, Result};
use md_common::{IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

/// One published port (a range expands to one mapping per port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `None` publishes on every host address (of `family`).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
    /// Which families a mapping without an address covers: both, or only one (`0.0.0.0:`,
    /// `[::]:`).
    #[serde(default, skip_serializing_if = "Family::is_both")]
    pub family: Family,
    /// Published on a routed network: reachable at the container's own address and port
    /// (`host_ip` and `host_port` say so), no host port is taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Both,
    V4,
    V6,
}

impl Family {
    fn is_both(&self) -> bool {
        *self == Family::Both
    }
}

/// `host_port` of a mapping whose host port is still to be chosen.
pub const RANDOM_PORT: u16 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.routed {
            match self.host_ip {
                Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
                Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
                None => {}
            }
            return write!(f, "{}/{} (routed)", self.container_port, self.proto);
        }
        match (self.host_ip, self.family) {
            (Some(IpAddr::V4(ip)), _) => write!(f, "{ip}:")?,
            (Some(IpAddr::V6(ip)), _) => write!(f, "[{ip}]:")?,
            (None, Family::V6) => write!(f, "[::]:")?,
            // Every IPv4 address: shown as before IPv6 existed (0.0.0.0 is the default).
            (None, Family::V4 | Family::Both) => {}
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

impl PortMapping {
    /// Whether two mappings claim the same host socket (same proto and port, overlapping IPs).
    /// A routed mapping claims none.
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.uses_host_port()
            && other.uses_host_port()
            && self.proto == other.proto
            && self.host_port == other.host_port
            && ((self.applies_v4() && other.applies_v4())
                || (self.applies_v6() && other.applies_v6()))
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    pub fn applies_v4(&self) -> bool {
        match self.host_ip {
            Some(ip) => ip.is_ipv4(),
            None => self.family != Family::V6,
        }
    }

    pub fn applies_v6(&self) -> bool {
        match self.host_ip {
            Some(ip) => ip.is_ipv6(),
            None => self.family != Family::V4,
        }
    }

    /// The IPv4 host address it is bound to (None: every address).
    pub fn host_v4(&self) -> Option<Ipv4Addr> {
        match self.host_ip {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }

    pub fn host_v6(&self) -> Option<Ipv6Addr> {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        }
    }

    /// Whether the mapping takes a host port (all but routed ones).
    pub fn uses_host_port(&self) -> bool {
        !self.routed
    }

    /// Whether its host port is still to be chosen.
    pub fn random(&self) -> bool {
        self.uses_host_port() && self.host_port == RANDOM_PORT
    }

    /// The host address as Docker prints it (`0.0.0.0` and `::` for every address of a
    /// family; a mapping for both families shows as `0.0.0.0`).
    pub fn host_ip_text(&self) -> String {
        match (self.host_ip, self.family) {
            (Some(ip), _) => ip.to_string(),
            (None, Family::V6) => "::".into(),
            (None, _) => "0.0.0.0".into(),
        }
    }
}

/// The mappings as published on a network: for both families only on a dual-stack one, else
/// IPv4 only.
pub fn for_network(ports: &[PortMapping], ipv6: bool) -> Vec<PortMapping> {
    ports
        .iter()
        .map(|p| match p.family {
            Family::Both if !ipv6 => PortMapping {
                family: Family::V4,
                ..*p
            },
            _ => *p,
        })
        .collect()
}

/// Refuses IPv6-only mappings on a network without IPv6 (a mapping for both families only
/// publishes IPv4 there, as Docker does for an IPv4-only network).
pub fn check_families(ports: &[PortMapping], network: &str, ipv6: bool) -> Result<()> {
    if let Some(p) = ports.iter().find(|p| !ipv6 && !p.applies_v4()) {
        bail!("port {p} is IPv6-only, and network {network} has no IPv6 (create it with --ipv6)");
    }
    Ok(())
}

/// Splits `[IPv6]:rest` or `IPv4:rest`: the address (if any) and what follows it.
fn host_part(body: &str) -> Result<(Option<IpAddr>, Option<Family>, &str)> {
    if let Some(rest) = body.strip_prefix('[') {
        let (ip, rest) = rest
            .split_once("]:")
            .context("an IPv6 address goes in brackets: [::1]:8080:80")?;
        let ip: Ipv6Addr = ip
            .parse()
            .with_context(|| format!("{ip:?} is not an IPv6 address"))?;
        // [::] means every IPv6 address, as in Docker.
        return Ok(if ip.is_unspecified() {
            (None, Some(Family::V6), rest)
        } else {
            (Some(IpAddr::V6(ip)), Some(Family::V6), rest)
        });
    }
    Ok((None, None, body))
}

/// The mappings of a container on a network whose IPv4 is routed (Docker's routed mode): the
/// IPv4 side at the container's own address and port, no host port; a mapping that covers
/// IPv6 too keeps its IPv6 side as it is (published by the network's IPv6 mode).
pub fn routed4(ports: &[PortMapping], ip: Ipv4Addr) -> Vec<PortMapping> {
    let mut out = Vec::new();
    for p in ports {
        if p.applies_v6() {
            out.push(PortMapping {
                family: Family::V6,
                ..*p
            });
        }
        if p.applies_v4() {
            out.push(PortMapping {
                host_ip: Some(IpAddr::V4(ip)),
                host_port: p.container_port,
                family: Family::V4,
                routed: true,
                ..*p
            });
        }
    }
    out
}

/// Parses one `-p` value: `H:C`, `H:C/tcp`, `H:C/udp`, `IP:H:C`, `H1-H2:C1-C2` (equal length),
/// and without a host port (a random free one): `C`, `C1-C2`, `IP::C`.
pub fn parse_spec(spec: &str) -> Result<Vec<PortMapping>> {
    let bad = || format!("invalid port spec {spec:?}");
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, "tcp")) => (b, Proto::Tcp),
        Some((b, "udp")) => (b, Proto::Udp),
        Some((_, p)) => bail!("invalid port spec {spec:?}: unknown protocol {p:?} (tcp or udp)"),
        None => (spec, Proto::Tcp),
    };
    let (ip6, family6, body) = host_part(body).with_context(bad)?;
    let parts: Vec<&str> = body.split(':').collect();
    let (host_ip, family, host, container) = match (parts.as_slice(), family6) {
        ([c], None) => (None, Family::Both, "", *c),
        ([h, c], Some(f)) => (ip6, f, *h, *c),
        ([h, c], None) => (None, Family::Both, *h, *c),
        ([ip, h, c], None) => {
            let ip: Ipv4Addr = ip
                .parse()
                .with_context(|| format!("{}: {ip:?} is not an IPv4 address", bad()))?;
            // 0.0.0.0 means every IPv4 address, as in Docker.
            let host_ip = (!ip.is_unspecified()).then_some(IpAddr::V4(ip));
            (host_ip, Family::V4, *h, *c)
        }
        (_, Some(_)) => bail!("{}: expected [IPv6]:HOST:CONTAINER", bad()),
        (_, None) => bail!("{}: too many ':' (an IPv6 address goes in brackets)", bad()),
    };
    let (c1, c2) = parse_range(container).with_context(bad)?;
    if host.is_empty() {
        if parts.len() == 2 && family6.is_none() {
            bail!(
                "{}: no host port before ':' (leave out HOST: for a random one)",
                bad()
            );
        }
        return Ok((c1..=c2)
            .map(|c| PortMapping {
                host_ip,
                host_port: RANDOM_PORT,
                container_port: c,
                proto,
                family,
                routed: false,
            })
            .collect());
    }
    let (h1, h2) = parse_range(host).with_context(bad)?;
    if h2 - h1 != c2 - c1 {
        bail!(
            "{}: host range {h1}-{h2} and container range {c1}-{c2} differ in length",
            bad()
        );
    }
    Ok((0..=(h2 - h1))
        .map(|i| PortMapping {
            host_ip,
            host_port: h1 + i,
            container_port: c1 + i,
            proto,
            family,
            routed: false,
        })
        .collect())
}

/// Parses one `--expose` value: `C`, `C/tcp|udp`, `C1-C2[/proto]`.
pub fn parse_expose(spec: &str) -> Result<Vec<(u16, Proto)>> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, "tcp")) => (b, Proto::Tcp),
        Some((b, "udp")) => (b, Proto::Udp),
        Some((_, p)) => bail!("invalid --expose {spec:?}: unknown protocol {p:?} (tcp or udp)"),
        None => (spec, Proto::Tcp),
    };
    let (a, b) = parse_range(body).with_context(|| format!("invalid --expose {spec:?}"))?;
    Ok((a..=b).map(|p| (p, proto)).collect())
}

/// `-P`: every exposed port not published yet, on a random host port of every address.
pub fn publish_all(exposed: &[(u16, Proto)], ports: &mut Vec<PortMapping>) {
    for &(port, proto) in exposed {
        if !ports
            .iter()
            .any(|p| p.container_port == port && p.proto == proto)
        {
            ports.push(PortMapping {
                host_ip: None,
                host_port: RANDOM_PORT,
                container_port: port,
                proto,
                family: Family::Both,
                routed: false,
            });
        }
    }
}

fn parse_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => {
            let p = parse_port(s)?;
            (p, p)
        }
    };
    if b < a {
        bail!("range {a}-{b} ends before it starts");
    }
    Ok((a, b))
}

fn parse_port(s: &str) -> Result<u16> {
    let n: u32 = s
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a port number"))?;
    if n == 0 || n > 65535 {
        bail!("port {n} is out of range 1-65535");
    }
    Ok(n as u16)
}

/// Parses every `-p` and refuses duplicates within the same run.
pub fn parse_all(specs: &[String]) -> Result<Vec<PortMapping>> {
    let mut out: Vec<PortMapping> = Vec::new();
    for spec in specs {
        for m in parse_spec(spec)? {
            if let Some(prev) = out.iter().find(|p| !m.random() && p.conflicts_with(&m)) {
                bail!("port {m} is published twice (also as {prev})");
            }
            out.push(m);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> PortMapping {
        let v = parse_spec(spec).unwrap();
        assert_eq!(v.len(), 1);
        v[0]
    }

    #[test]
    fn docker_forms() {
        assert_eq!(one("8080:80").to_string(), "8080:80/tcp");
        assert_eq!(one("8080:80/tcp").to_string(), "8080:80/tcp");
        assert_eq!(one("5353:53/udp").to_string(), "5353:53/udp");
        assert_eq!(
            one("127.0.0.1:8081:80").to_string(),
            "127.0.0.1:8081:80/tcp"
        );
        assert_eq!(one("0.0.0.0:8081:80").host_ip, None);
        assert!(one("0.0.0.0:8081:80").applies_v4() && !one("0.0.0.0:8081:80").applies_v6());
        assert!(one("8081:80").applies_v4() && one("8081:80").applies_v6());
        let v6 = one("[::1]:8080:80/udp");
        assert_eq!(v6.to_string(), "[::1]:8080:80/udp");
        assert!(v6.applies_v6() && !v6.applies_v4());
        assert_eq!(v6.host_v6(), Some(Ipv6Addr::LOCALHOST));
        let any6 = one("[::]:8080:80");
        assert_eq!(
            (any6.host_ip, any6.to_string().as_str()),
            (None, "[::]:8080:80/tcp")
        );
        assert!(!any6.applies_v4());
        assert_eq!(
            one("[2001:db8:1::1]:9000:90").to_string(),
            "[2001:db8:1::1]:9000:90/tcp"
        );
        assert!(one("127.0.0.1:8081:80").applies_v4() && !one("127.0.0.1:8081:80").applies_v6());
        let r = parse_spec("9000-9002:7000-7002/udp").unwrap();
        assert_eq!(
            r.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            ["9000:7000/udp", "9001:7001/udp", "9002:7002/udp"]
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "0:80",
            "80:0",
            "65536:80",
            "99999:80",
            "8080:80/sctp",
            ":80",
            "a:b",
            "1.2.3:80:80",
            "1:2:3:4",
            "9000-9002:7000-7001",
            "9002-9000:7000-7002",
            "",
            ":80",
            "::1:8080:80",
            "[::1:8080:80",
            "[x]:8080:80",
            "[127.0.0.1]:8080:80",
            "[::1]:1:8080:80",
        ] {
            assert!(parse_spec(bad).is_err(), "{bad} should be refused");
        }
        let e = parse_spec("8080:80/sctp").unwrap_err().to_string();
        assert!(e.contains("unknown protocol"), "{e}");
    }

    #[test]
    fn random_host_ports() {
        let m = one("8080");
        assert_eq!((m.host_ip, m.host_port, m.container_port), (None, 0, 8080));
        assert!(m.random());
        let m = one("127.0.0.1::80/udp");
        assert_eq!(
            (m.host_ip, m.host_port, m.container_port, m.proto),
            (Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0, 80, Proto::Udp)
        );
        let m = one("[::1]::80");
        assert_eq!(
            (m.host_ip, m.host_port, m.applies_v4()),
            (Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), 0, false)
        );
        assert_eq!(parse_spec("8000-8002").unwrap().len(), 3);
        assert!(parse_spec("0.0.0.0::80").unwrap()[0].host_ip.is_none());
        // Two random ports for the same container port are fine; so are the same one twice
        // by address.
        assert!(parse_all(&["80".into(), "127.0.0.1::81".into()]).is_ok());
    }

    #[test]
    fn expose_and_publish_all() {
        assert_eq!(
            parse_expose("8000-8001/udp").unwrap(),
            [(8000, Proto::Udp), (8001, Proto::Udp)]
        );
        assert_eq!(parse_expose("80").unwrap(), [(80, Proto::Tcp)]);
        for bad in ["", "0", "x", "80/sctp", "9-8", "70000"] {
            assert!(parse_expose(bad).is_err(), "{bad}");
        }
        let mut ports = parse_all(&["8080:80".into()]).unwrap();
        publish_all(
            &[(80, Proto::Tcp), (81, Proto::Tcp), (80, Proto::Udp)],
            &mut ports,
        );
        let shown: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["8080:80/tcp", "0:81/tcp", "0:80/udp"]);
        let routed = PortMapping {
            host_ip: Some(Ipv4Addr::new(172, 19, 0, 2).into()),
            host_port: 80,
            container_port: 80,
            proto: Proto::Tcp,
            family: Family::V4,
            routed: true,
        };
        assert_eq!(routed.to_string(), "172.19.0.2:80/tcp (routed)");
        assert!(!routed.conflicts_with(&one("80:80")));
        // On a routed IPv4 network a mapping for both families keeps its IPv6 side.
        let split = routed4(&[one("8080:80")], Ipv4Addr::new(172, 19, 0, 2));
        let shown: Vec<String> = split.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["[::]:8080:80/tcp", "172.19.0.2:80/tcp (routed)"]);
        assert_eq!(
            routed4(&[one("[::1]:8080:80")], Ipv4Addr::LOCALHOST).len(),
            1
        );
    }

    #[test]
    fn duplicates_within_one_run() {
        assert!(parse_all(&["8080:80".into(), "8080:81".into()]).is_err());
        assert!(parse_all(&["8080:80".into(), "8080:80/udp".into()]).is_ok());
        assert!(parse_all(&["127.0.0.1:8080:80".into(), "8080:81".into()]).is_err());
        assert!(parse_all(&["127.0.0.1:8080:80".into(), "127.0.0.2:8080:81".into()]).is_ok());
        // One host port, both families; or each family to its own container port.
        assert!(parse_all(&["[::1]:8080:80".into(), "8080:81".into()]).is_err());
        assert!(parse_all(&["0.0.0.0:8080:80".into(), "[::]:8080:81".into()]).is_ok());
        assert!(parse_all(&["127.0.0.1:8080:80".into(), "[::1]:8080:81".into()]).is_ok());
        assert!(
            check_families(&parse_all(&["[::1]:8080:80".into()]).unwrap(), "n", false).is_err()
        );
        assert!(check_families(&parse_all(&["8080:80".into()]).unwrap(), "n", false).is_ok());
    }

    #[test]
    fn protocols() {
        assert_eq!(Proto::Tcp.number(), IPPROTO_TCP);
        assert_eq!(Proto::Udp.number(), IPPROTO_UDP);
        assert_eq!(format!("{}/{}", Proto::Tcp, Proto::Udp), "tcp/udp");
    }

    #[test]
    fn edges_of_the_port_range() {
        assert_eq!(one("65535:1").to_string(), "65535:1/tcp");
        assert_eq!(one("1:65535/udp").to_string(), "1:65535/udp");
        assert_eq!(one("8080-8080:80-80").to_string(), "8080:80/tcp");
        let r = parse_spec("65534-65535:1-2").unwrap();
        assert_eq!((r[1].host_port, r[1].container_port), (65535, 2));
        let e = parse_spec(":80").unwrap_err().to_string();
        assert!(e.contains("no host port before ':'"), "{e}");
        let e = format!("{:#}", parse_spec("70000:80").unwrap_err());
        assert!(e.contains("out of range"), "{e}");
        let e = format!("{:#}", parse_spec("0:80").unwrap_err());
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn conflicts_need_same_proto_port_and_overlapping_address() {
        let m = |ip: Option<[u8; 4]>, port, proto| PortMapping {
            host_ip: ip.map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            host_port: port,
            container_port: 1,
            proto,
            family: Family::Both,
            routed: false,
        };
        let (a, b) = (Some([127, 0, 0, 1]), Some([10, 0, 0, 1]));
        let table = [
            (m(None, 80, Proto::Tcp), m(None, 80, Proto::Tcp), true),
            (m(None, 80, Proto::Tcp), m(None, 80, Proto::Udp), false),
            (m(None, 80, Proto::Tcp), m(None, 81, Proto::Tcp), false),
            (m(a, 80, Proto::Tcp), m(None, 80, Proto::Tcp), true),
            (m(None, 80, Proto::Tcp), m(b, 80, Proto::Tcp), true),
            (m(a, 80, Proto::Tcp), m(a, 80, Proto::Tcp), true),
            (m(a, 80, Proto::Tcp), m(b, 80, Proto::Tcp), false),
            (m(a, 80, Proto::Tcp), m(a, 80, Proto::Udp), false),
            (m(a, 80, Proto::Tcp), m(a, 81, Proto::Tcp), false),
        ];
        for (x, y, want) in table {
            assert_eq!(x.conflicts_with(&y), want, "{x} vs {y}");
            assert_eq!(y.conflicts_with(&x), want, "{y} vs {x}");
        }
    }
}
