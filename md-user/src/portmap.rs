//! Port publishing: Docker's `-p` forms, parsed and checked before anything is created. A
//! mapping without a host port (`-p 80`, `-p 127.0.0.1::80`, `-P` with `--expose`) gets a
//! random free one when the container is created (under the state lock).

use std::{fmt, net::Ipv4Addr};

use anyhow::{bail, Context, Result};
use md_common::{IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

/// One published port (a range expands to one mapping per port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `None` publishes on every host address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
    /// Published on a routed network: reachable at the container's own address and port
    /// (`host_ip` and `host_port` say so), no host port is taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routed: bool,
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
            if let Some(ip) = self.host_ip {
                write!(f, "{ip}:")?;
            }
            return write!(f, "{}/{} (routed)", self.container_port, self.proto);
        }
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
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
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
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

    /// The host address as Docker prints it (`0.0.0.0`: every address).
    pub fn host_ip_text(&self) -> String {
        self.host_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "0.0.0.0".into())
    }
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
    let parts: Vec<&str> = body.split(':').collect();
    let (host_ip, host, container) = match parts.as_slice() {
        [c] => (None, "", *c),
        [h, c] => (None, *h, *c),
        [ip, h, c] => {
            let ip: Ipv4Addr = ip
                .parse()
                .with_context(|| format!("{}: {ip:?} is not an IPv4 address", bad()))?;
            // 0.0.0.0 means every address, as in Docker.
            (if ip.is_unspecified() { None } else { Some(ip) }, *h, *c)
        }
        _ => bail!("{}: too many ':'", bad()),
    };
    let (c1, c2) = parse_range(container).with_context(bad)?;
    if host.is_empty() {
        if parts.len() == 2 {
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
            (Some(Ipv4Addr::LOCALHOST), 0, 80, Proto::Udp)
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
            host_ip: Some(Ipv4Addr::new(172, 19, 0, 2)),
            host_port: 80,
            container_port: 80,
            proto: Proto::Tcp,
            routed: true,
        };
        assert_eq!(routed.to_string(), "172.19.0.2:80/tcp (routed)");
        assert!(!routed.conflicts_with(&one("80:80")));
    }

    #[test]
    fn duplicates_within_one_run() {
        assert!(parse_all(&["8080:80".into(), "8080:81".into()]).is_err());
        assert!(parse_all(&["8080:80".into(), "8080:80/udp".into()]).is_ok());
        assert!(parse_all(&["127.0.0.1:8080:80".into(), "8080:81".into()]).is_err());
        assert!(parse_all(&["127.0.0.1:8080:80".into(), "127.0.0.2:8080:81".into()]).is_ok());
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
            host_ip: ip.map(Ipv4Addr::from),
            host_port: port,
            container_port: 1,
            proto,
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
