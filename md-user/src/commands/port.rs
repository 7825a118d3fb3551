//! `md-user port NAME [PRIVATE_PORT[/PROTO]]`: a container's published ports, as `docker port`
//! prints them (`80/tcp -> 0.0.0.0:8080`, sorted naturally; with a port, only its host
//! addresses).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use super::Ctx;
use std::net::IpAddr;

use crate::portmap::{Family, PortMapping, Proto};

pub async fn port(ctx: &Ctx, name: &str, which: Option<&str>) -> Result<ExitCode> {
    let want = which.map(parse_private).transpose()?;
    let state = super::reconciled(ctx).await?;
    let c = state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?;
    let lines = render(&c.ports, want);
    if let (Some(w), true) = (which, lines.is_empty()) {
        bail!("no public port '{w}' published for {name}");
    }
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `80` or `80/udp` (TCP when no protocol is given, as in Docker).
fn parse_private(s: &str) -> Result<(u16, Proto)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        p => bail!("invalid protocol {p:?} in {s:?} (tcp or udp)"),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("invalid port {port:?}"))?;
    Ok((port, proto))
}

/// Where a mapping is reached: the host address and port, or (routed) the container's own;
/// both families' for a mapping of both (stored only on a dual-stack network), IPv6 in
/// brackets, as Docker prints them.
fn frontends(p: &PortMapping) -> Vec<String> {
    match (p.host_ip, p.family) {
        (None, Family::Both) => vec![
            format!("0.0.0.0:{}", p.host_port),
            format!("[::]:{}", p.host_port),
        ],
        (Some(IpAddr::V6(ip)), _) => vec![format!("[{ip}]:{}", p.host_port)],
        (None, Family::V6) => vec![format!("[::]:{}", p.host_port)],
        _ => vec![format!("{}:{}", p.host_ip_text(), p.host_port)],
    }
}

fn render(ports: &[PortMapping], want: Option<(u16, Proto)>) -> Vec<String> {
    let mut out: Vec<String> = match want {
        Some((port, proto)) => ports
            .iter()
            .filter(|p| p.container_port == port && p.proto == proto)
            .flat_map(frontends)
            .collect(),
        None => ports
            .iter()
            .flat_map(|p| {
                frontends(p)
                    .into_iter()
                    .map(move |f| format!("{}/{} -> {f}", p.container_port, p.proto))
            })
            .collect(),
    };
    out.sort_by(|a, b| natural_cmp(a, b));
    out
}

/// Natural order: digit runs compare as numbers (`9/tcp` before `10/tcp`), as Docker sorts.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::parse_all;

    #[test]
    fn docker_port_output() {
        let specs = [
            "8080:80".into(),
            "127.0.0.1:9000:9/udp".into(),
            "10443:443".into(),
        ];
        // As stored for a container of an IPv4-only network.
        let mut ports = crate::portmap::for_network(&parse_all(&specs).unwrap(), false);
        ports.push(PortMapping {
            host_ip: Some("172.19.0.2".parse().unwrap()),
            host_port: 53,
            container_port: 53,
            proto: Proto::Udp,
            family: crate::portmap::Family::V4,
            routed: true,
        });
        assert_eq!(
            render(&ports, None),
            [
                "9/udp -> 127.0.0.1:9000",
                "53/udp -> 172.19.0.2:53",
                "80/tcp -> 0.0.0.0:8080",
                "443/tcp -> 0.0.0.0:10443"
            ]
        );
        assert_eq!(render(&ports, Some((80, Proto::Tcp))), ["0.0.0.0:8080"]);
        assert!(render(&ports, Some((80, Proto::Udp))).is_empty());
        // On a dual-stack network a mapping without an address is both families'.
        let mut dual = crate::portmap::for_network(&parse_all(&specs[..1]).unwrap(), true);
        dual.extend(parse_all(&["[::1]:9001:9".into()]).unwrap());
        assert_eq!(
            render(&dual, None),
            [
                "9/tcp -> [::1]:9001",
                "80/tcp -> 0.0.0.0:8080",
                "80/tcp -> [::]:8080"
            ]
        );
        assert_eq!(parse_private("80").unwrap(), (80, Proto::Tcp));
        assert_eq!(parse_private("53/udp").unwrap(), (53, Proto::Udp));
        for bad in ["", "x", "0", "80/sctp", "70000"] {
            assert!(parse_private(bad).is_err(), "{bad}");
        }
    }
}
