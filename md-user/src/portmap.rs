//! Port publishing: Docker's `-p` forms, parsed and checked before anything is created.

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
}

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
    pub fn conflicts_with(&self, other: &PortMapping) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Parses one `-p` value: `H:C`, `H:C/tcp`, `H:C/udp`, `IP:H:C`, `H1-H2:C1-C2` (equal length).
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
        [h, c] => (None, *h, *c),
        [ip, h, c] => {
            let ip: Ipv4Addr = ip
                .parse()
                .with_context(|| format!("{}: {ip:?} is not an IPv4 address", bad()))?;
            // 0.0.0.0 means every address, as in Docker.
            (if ip.is_unspecified() { None } else { Some(ip) }, *h, *c)
        }
        [_] => bail!(
            "{}: expected HOST:CONTAINER (md publishes on a host port you choose)",
            bad()
        ),
        _ => bail!("{}: too many ':'", bad()),
    };
    let (h1, h2) = parse_range(host).with_context(bad)?;
    let (c1, c2) = parse_range(container).with_context(bad)?;
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
        })
        .collect())
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
            if let Some(prev) = out.iter().find(|p| p.conflicts_with(&m)) {
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
            "8080",
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
        let e = parse_spec("8080").unwrap_err().to_string();
        assert!(e.contains("expected HOST:CONTAINER"), "{e}");
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
