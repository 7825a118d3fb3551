//! The JSON of Docker's remote driver protocols as Docker 20.10's libnetwork sends it
//! (`drivers/remote/api`, `ipams/remote/api`), and Docker's port bindings in md's terms.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    ipam::Subnet,
    portmap::{PortMapping, Proto},
};

/// Option keys libnetwork passes (`netlabel`).
pub const PORT_MAP: &str = "com.docker.network.portmap";
pub const GENERIC: &str = "com.docker.network.generic";
pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
pub const INTERNAL: &str = "com.docker.network.internal";
pub const MAC_ADDRESS: &str = "com.docker.network.endpoint.macaddress";
/// The option of an IPAM address request for a network's gateway.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

/// The host ports `-P` and `-p CONTAINER` get: Docker's dynamic range, stopping below md's NAT
/// ports (61000–65535).
pub const DYNAMIC_PORTS: (u16, u16) = (49153, 60999);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub gateway: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "IPv4Data", default)]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data", default)]
    pub ipv6_data: Option<Vec<IpamData>>,
}

/// A request that names a network (DeleteNetwork).
#[derive(Debug, Deserialize)]
pub struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// A request that names an endpoint (DeleteEndpoint, Leave, EndpointOperInfo,
/// RevokeExternalConnectivity), with the options some carry.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointRef {
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInterface {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(
        rename = "AddressIPv6",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub interface: Option<EndpointInterface>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub sandbox_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPool {
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub sub_pool: String,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolRef {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default)]
    pub address: String,
}

/// libnetwork's `types.PortBinding` as JSON: protocol numbers, addresses as strings ("" for
/// none), a host port range `HostPort`–`HostPortEnd` (0: any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    pub proto: u8,
    #[serde(rename = "IP", default)]
    pub ip: String,
    pub port: u16,
    #[serde(rename = "HostIP", default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub host_port_end: u16,
}

impl PortBinding {
    /// How Docker shows what md published for it.
    pub fn of(p: &PortMapping, container_ip: Ipv4Addr) -> PortBinding {
        PortBinding {
            proto: p.proto.number(),
            ip: container_ip.to_string(),
            port: p.container_port,
            host_ip: p.host_ip.map(|i| i.to_string()).unwrap_or_default(),
            host_port: p.host_port,
            host_port_end: p.host_port,
        }
    }
}

/// The port bindings among libnetwork's options (`com.docker.network.portmap`).
pub fn port_bindings(options: Option<&BTreeMap<String, Value>>) -> Result<Vec<PortBinding>> {
    match options.and_then(|o| o.get(PORT_MAP)) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).context("reading Docker's port bindings"),
    }
}

/// Docker's port bindings as md's published ports. A binding with a host port range (`-p
/// 8000-8010:80`) or none (`-p 80`, `-P`: Docker's dynamic range) gets the first port of it
/// that `free` says nobody holds and that no earlier binding took, as Docker's port allocator
/// would; an explicit port is taken as is (publishing checks it).
pub fn mappings(
    bindings: &[PortBinding],
    free: impl Fn(&PortMapping) -> bool,
) -> Result<Vec<PortMapping>> {
    let mut out: Vec<PortMapping> = Vec::new();
    for b in bindings {
        let proto = match b.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            132 => bail!("port {}/sctp: md publishes tcp and udp ports", b.port),
            n => bail!("port {}: unknown protocol number {n}", b.port),
        };
        let host_ip = match b.host_ip.as_str() {
            "" | "0.0.0.0" => None,
            ip => match ip.parse::<Ipv4Addr>() {
                Ok(ip) => Some(std::net::IpAddr::V4(ip)),
                Err(_) => bail!(
                    "port {}/{proto} on {ip}: md publishes on IPv4 addresses only",
                    b.port
                ),
            },
        };
        if b.port == 0 {
            bail!("container port 0 cannot be published");
        }
        let (first, last) = match (b.host_port, b.host_port_end.max(b.host_port)) {
            (0, _) => DYNAMIC_PORTS,
            range => range,
        };
        let mut m = PortMapping {
            host_ip,
            host_port: first,
            container_port: b.port,
            proto,
            // Docker's networks on md are IPv4-only (the plugin refuses IPv6).
            family: crate::portmap::Family::V4,
            routed: false,
        };
        if first != last {
            m.host_port = (first..=last)
                .find(|&p| {
                    let m = PortMapping { host_port: p, ..m };
                    free(&m) && !out.iter().any(|o| o.conflicts_with(&m))
                })
                .with_context(|| {
                    format!(
                        "no free host port in {first}-{last}/{proto} for port {}",
                        b.port
                    )
                })?;
        }
        out.push(m);
    }
    Ok(out)
}

/// An address in CIDR form (`172.19.0.5/16`) within `subnet`, or bare.
pub fn parse_address(s: &str) -> Result<Ipv4Addr> {
    let ip = s.split('/').next().unwrap_or_default();
    ip.parse()
        .with_context(|| format!("{s:?} is not an IPv4 address"))
}

/// `ip/prefix` for Docker.
pub fn cidr(ip: Ipv4Addr, subnet: &Subnet) -> String {
    format!("{ip}/{}", subnet.prefix_len)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b(v: Value) -> PortBinding {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn docker_forms_become_md_ports() {
        // What Docker 20.10 sends for -p 8080:80, -p 127.0.0.1:9090:80/udp, -p 80 (or -P),
        // -p 8000-8010:81 (a range for one port) and -p 7000-7001:90-91.
        let opts: BTreeMap<String, Value> = [(
            PORT_MAP.to_string(),
            json!([
                {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
                {"Proto": 17, "IP": "", "Port": 80, "HostIP": "127.0.0.1", "HostPort": 9090, "HostPortEnd": 9090},
                {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 0, "HostPortEnd": 0},
                {"Proto": 6, "Port": 81, "HostIP": "", "HostPort": 8000, "HostPortEnd": 8010},
                {"Proto": 6, "Port": 90, "HostPort": 7000, "HostPortEnd": 7000},
                {"Proto": 6, "Port": 91, "HostPort": 7001, "HostPortEnd": 7001}
            ]),
        )]
        .into();
        let bindings = port_bindings(Some(&opts)).unwrap();
        // 49153 and 8000 are held; the range skips them.
        let got = mappings(&bindings, |m| !matches!(m.host_port, 49153 | 8000)).unwrap();
        let shown: Vec<String> = got.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            shown,
            [
                "8080:80/tcp",
                "127.0.0.1:9090:80/udp",
                "49154:80/tcp",
                "8001:81/tcp",
                "7000:90/tcp",
                "7001:91/tcp"
            ]
        );
        assert_eq!(port_bindings(None).unwrap(), vec![]);
    }

    #[test]
    fn dynamic_ports_are_not_handed_out_twice() {
        let two = [
            b(json!({"Proto": 6, "Port": 80})),
            b(json!({"Proto": 6, "Port": 81})),
            b(json!({"Proto": 17, "Port": 81})),
        ];
        let got = mappings(&two, |_| true).unwrap();
        assert_eq!(got[0].host_port, DYNAMIC_PORTS.0);
        assert_eq!(got[1].host_port, DYNAMIC_PORTS.0 + 1);
        // Another protocol is another socket.
        assert_eq!(got[2].host_port, DYNAMIC_PORTS.0);
        let err = mappings(
            &[b(
                json!({"Proto": 6, "Port": 80, "HostPort": 8000, "HostPortEnd": 8001}),
            )],
            |_| false,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free host port in 8000-8001/tcp for port 80"
        );
    }

    #[test]
    fn what_md_cannot_publish_is_refused() {
        for (v, msg) in [
            (
                json!({"Proto": 132, "Port": 80, "HostPort": 80}),
                "port 80/sctp: md publishes tcp and udp ports",
            ),
            (
                json!({"Proto": 6, "Port": 80, "HostIP": "::1", "HostPort": 80}),
                "port 80/tcp on ::1: md publishes on IPv4 addresses only",
            ),
        ] {
            assert_eq!(mappings(&[b(v)], |_| true).unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn md_ports_shown_as_docker_bindings() {
        let m = PortMapping {
            host_ip: Some(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)),
            host_port: 8080,
            container_port: 80,
            proto: Proto::Udp,
            family: crate::portmap::Family::V4,
            routed: false,
        };
        let v = serde_json::to_value(PortBinding::of(&m, Ipv4Addr::new(172, 19, 0, 2))).unwrap();
        assert_eq!(
            v,
            json!({"Proto": 17, "IP": "172.19.0.2", "Port": 80, "HostIP": "127.0.0.1",
                   "HostPort": 8080, "HostPortEnd": 8080})
        );
    }

    #[test]
    fn requests_as_docker_sends_them() {
        let c: CreateNetwork = serde_json::from_value(json!({
            "NetworkID": "n1",
            "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "md", "Pool": "172.19.0.0/16", "Gateway": "172.19.0.1/16", "AuxAddresses": null}],
            "IPv6Data": []
        }))
        .unwrap();
        assert_eq!(c.ipv4_data.unwrap()[0].pool, "172.19.0.0/16");
        let e: CreateEndpoint = serde_json::from_value(json!({
            "NetworkID": "n1", "EndpointID": "e1", "Options": {},
            "Interface": {"Address": "172.19.0.2/16", "AddressIPv6": "", "MacAddress": ""}
        }))
        .unwrap();
        assert_eq!(e.interface.unwrap().address, "172.19.0.2/16");
        // An answer carries only what md sets.
        let answer = EndpointInterface {
            mac_address: format_mac([2, 0x42, 172, 19, 0, 2]),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(answer).unwrap(),
            json!({"MacAddress": "02:42:ac:13:00:02"})
        );
        assert_eq!(
            parse_mac("02:42:AC:13:00:02"),
            Some([2, 0x42, 172, 19, 0, 2])
        );
        assert_eq!(parse_mac("02:42:ac:13:00"), None);
        assert_eq!(
            parse_address("172.19.0.2/16").unwrap(),
            Ipv4Addr::new(172, 19, 0, 2)
        );
    }
}
