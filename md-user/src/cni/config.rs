//! What a runtime hands the plugin: the `CNI_*` environment and the network configuration on
//! stdin, checked and turned into md's own terms (a container name, an interface spec, ports).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{
    error::{CniError, Code},
    version::Version,
};
use crate::{
    cli::GlobalOpts,
    portmap::{PortMapping, Proto},
    state::DEFAULT_NETWORK,
};

/// The `CNI_*` environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Env {
        let v = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: v("CNI_COMMAND"),
            container_id: v("CNI_CONTAINERID"),
            netns: v("CNI_NETNS"),
            ifname: v("CNI_IFNAME"),
            args: v("CNI_ARGS"),
        }
    }

    /// Checks what ADD, DEL and CHECK need: a container id as the spec defines it, an
    /// interface name Linux accepts, and (`need_netns`) a namespace path.
    pub fn require_attachment(&self, need_netns: bool) -> Result<(), CniError> {
        let bad = |m: String| CniError::new(Code::InvalidEnv, m);
        let id = &self.container_id;
        let id_ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !id_ok {
            return Err(bad(format!("invalid CNI_CONTAINERID {id:?}")));
        }
        let n = &self.ifname;
        if n.is_empty()
            || n.len() > 15
            || n == "."
            || n == ".."
            || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(bad(format!("invalid CNI_IFNAME {n:?}")));
        }
        if need_netns && self.netns.is_empty() {
            return Err(bad("CNI_NETNS is required".into()));
        }
        Ok(())
    }

    /// `CNI_ARGS`: `K=V` pairs separated by `;`.
    pub fn cni_args(&self) -> Result<BTreeMap<String, String>, CniError> {
        let mut out = BTreeMap::new();
        for pair in self.args.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnv,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                )
            })?;
            out.insert(k.to_string(), v.to_string());
        }
        Ok(out)
    }
}

/// The plugin's network configuration (one entry of a conflist, as the runtime passes it).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The CNI network's name.
    pub name: String,
    /// The md network to attach to [default: md's default network, `bridge`].
    #[serde(default)]
    pub network: Option<String>,
    /// The default network's subnet and bridge (as `md-user --subnet/--bridge`); for another
    /// network, the subnet it is created with on first use.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub bridge: Option<String>,
    /// md's state and pin directories, uplink and upstream resolv.conf (as md-user's options).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    #[serde(default)]
    pub uplink: Option<String>,
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
    /// md-user's `--datapath`: `redirect` or `stack`.
    #[serde(default)]
    pub datapath: Option<String>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub dns: Option<Dns>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Capability arguments the runtime fills in (`capabilities` in the conflist).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMap>,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    /// Aliases per CNI network name.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub dns: Option<RuntimeDns>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMap {
    pub host_port: u32,
    pub container_port: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeDns {
    #[serde(default)]
    pub searches: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Parses stdin: undecodable JSON is code 6, an unsupported `cniVersion` code 1, a config
/// that does not fit the schema code 7.
pub fn parse(stdin: &str) -> Result<(NetConf, Version), CniError> {
    let v: Value = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(Code::Decode, "cannot decode the network configuration")
            .details(e.to_string())
    })?;
    let ver = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let version = Version::negotiate(ver)?;
    let conf: NetConf = serde_json::from_value(v).map_err(|e| {
        CniError::new(
            Code::InvalidConfig,
            format!("invalid network configuration: {e}"),
        )
        .version(version)
    })?;
    conf.validate().map_err(|e| e.version(version))?;
    Ok((conf, version))
}

impl NetConf {
    fn validate(&self) -> Result<(), CniError> {
        let bad = |m: String| CniError::new(Code::InvalidConfig, m);
        if self.name.is_empty() {
            return Err(bad("the network configuration has no name".into()));
        }
        if let Some(ipam) = &self.ipam {
            let other = ipam
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| *t != "md");
            if let Some(t) = other {
                return Err(CniError::new(
                    Code::UnsupportedField,
                    format!("ipam type {t:?}: md allocates addresses itself (leave ipam out)"),
                ));
            }
        }
        if let Some(s) = &self.subnet {
            s.parse::<crate::ipam::Subnet>()
                .map_err(|e| bad(format!("subnet: {}", crate::error::one_line(&e))))?;
        }
        if let Some(d) = self.datapath.as_deref() {
            if d != "redirect" && d != "stack" {
                return Err(bad(format!("datapath {d:?}: redirect or stack")));
            }
        }
        if let Some(n) = &self.network {
            crate::commands::run::validate_name(n)
                .map_err(|e| bad(format!("network: {}", crate::error::one_line(&e))))?;
        }
        Ok(())
    }

    /// The md network this configuration attaches to.
    pub fn md_network(&self) -> String {
        self.network
            .clone()
            .unwrap_or_else(|| DEFAULT_NETWORK.to_string())
    }

    /// md-user's options for this configuration: the configuration's own, else md-user's
    /// environment, else md-user's defaults.
    pub fn opts(&self) -> GlobalOpts {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let default_net = self.md_network() == DEFAULT_NETWORK;
        GlobalOpts {
            // The plugin attaches IPv4 only: the default network keeps what md-user made it.
            ipv6: env("MD_IPV6").is_some_and(|v| v != "0" && v != "false"),
            subnet6: env("MD_SUBNET6"),
            state_dir: self
                .state_dir
                .clone()
                .or_else(|| env("MD_STATE_DIR").map(PathBuf::from))
                .unwrap_or_else(|| "/run/md".into()),
            pin_dir: self
                .pin_dir
                .clone()
                .or_else(|| env("MD_BPF_PIN_DIR").map(PathBuf::from))
                .unwrap_or_else(|| "/sys/fs/bpf/md".into()),
            uplink: self.uplink.clone().or_else(|| env("MD_UPLINK")),
            bridge: self
                .bridge
                .clone()
                .filter(|_| default_net)
                .or_else(|| env("MD_BRIDGE"))
                .unwrap_or_else(|| "md0".into()),
            subnet: self
                .subnet
                .clone()
                .filter(|_| default_net)
                .or_else(|| env("MD_SUBNET"))
                .unwrap_or_else(|| "172.18.0.0/16".into()),
            resolv_conf: self
                .resolv_conf
                .clone()
                .or_else(|| env("MD_RESOLV_CONF").map(PathBuf::from))
                .unwrap_or_else(|| "/etc/resolv.conf".into()),
            datapath: self.datapath.clone().or_else(|| env("MD_DATAPATH")),
            // An overlay network the host joined keeps its store in md's state.
            store: env("MD_STORE"),
            store_ttl: env("MD_STORE_TTL")
                .and_then(|t| t.parse().ok())
                .unwrap_or(15),
            advertise_addr: env("MD_ADVERTISE_ADDR").and_then(|a| a.parse().ok()),
        }
    }
}

/// What ADD asks of md, in md's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The container's md name: the runtime's name for it (K8S_POD_NAME, with its namespace
    /// unless "default"), else its id.
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    pub ports: Vec<PortMapping>,
    pub aliases: Vec<String>,
}

pub fn request(conf: &NetConf, env: &Env) -> Result<Request, CniError> {
    let bad = |m: String| CniError::new(Code::InvalidConfig, m);
    let args = env.cni_args()?;
    let name = match args.get("K8S_POD_NAME").filter(|n| !n.is_empty()) {
        Some(pod) => match args.get("K8S_POD_NAMESPACE").map(String::as_str) {
            None | Some("") | Some("default") => pod.clone(),
            Some(ns) => format!("{pod}.{ns}"),
        },
        // Docker-style short id when the whole id is too long for a name.
        None if env.container_id.len() > 63 => env.container_id[..12].to_string(),
        None => env.container_id.clone(),
    };
    crate::commands::run::validate_name(&name)
        .map_err(|e| CniError::new(Code::InvalidEnv, crate::error::one_line(&e)))?;

    let rc = &conf.runtime_config;
    let mut ips: Vec<&str> = rc.ips.iter().map(String::as_str).collect();
    if let Some(ip) = args.get("IP") {
        ips.push(ip);
    }
    let ip = match ips.as_slice() {
        [] => None,
        [one] => {
            let addr = one.split('/').next().unwrap_or_default();
            Some(addr.parse::<Ipv4Addr>().map_err(|_| {
                bad(format!(
                    "ips: {one:?} is not an IPv4 address (md's networks are IPv4)"
                ))
            })?)
        }
        _ => {
            return Err(bad(format!(
                "ips: {ips:?}: md gives an interface one address"
            )))
        }
    };
    let mac = match rc.mac.as_deref().or(args.get("MAC").map(String::as_str)) {
        None => None,
        Some(m) => {
            Some(parse_mac(m).ok_or_else(|| bad(format!("mac: {m:?} is not a MAC address")))?)
        }
    };
    let mut ports: Vec<PortMapping> = Vec::new();
    for p in &rc.port_mappings {
        let proto = match p
            .protocol
            .as_deref()
            .unwrap_or("tcp")
            .to_ascii_lowercase()
            .as_str()
        {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => {
                return Err(CniError::new(
                    Code::UnsupportedField,
                    format!("portMappings: protocol {other:?} (md publishes tcp and udp)"),
                ))
            }
        };
        let port = |n: u32, what: &str| {
            u16::try_from(n)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| bad(format!("portMappings: {what} {n} is not a port")))
        };
        let host_ip = match p.host_ip.as_deref().unwrap_or("") {
            "" | "0.0.0.0" => None,
            s => match s.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => Some(std::net::IpAddr::V4(ip)),
                // md's datapath is IPv4: mappings on IPv6 host addresses are not md's to make.
                Ok(std::net::IpAddr::V6(_)) => continue,
                Err(_) => return Err(bad(format!("portMappings: hostIP {s:?}"))),
            },
        };
        let m = PortMapping {
            host_ip,
            host_port: port(p.host_port, "hostPort")?,
            container_port: port(p.container_port, "containerPort")?,
            proto,
            family: crate::portmap::Family::V4,
            routed: false,
        };
        if let Some(q) = ports.iter().find(|q| q.conflicts_with(&m) && **q != m) {
            return Err(bad(format!("portMappings: {m} conflicts with {q}")));
        }
        if !ports.contains(&m) {
            ports.push(m);
        }
    }
    let aliases = rc.aliases.get(&conf.name).cloned().unwrap_or_default();
    for a in &aliases {
        crate::commands::run::validate_hostname(a)
            .map_err(|e| bad(format!("aliases: {}", crate::error::one_line(&e))))?;
    }
    Ok(Request {
        name,
        ip,
        mac,
        ports,
        aliases,
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2))
        .collect::<Option<_>>()?;
    let mac: [u8; 6] = parts.try_into().ok()?;
    // A unicast address: the datapath keys on it and bridges would not forward to multicast.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(args: &str) -> Env {
        Env {
            command: "ADD".into(),
            container_id: "c0ffee".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: args.into(),
        }
    }

    fn conf(extra: &str) -> NetConf {
        let json = format!(r#"{{"cniVersion":"1.0.0","name":"mdnet","type":"md"{extra}}}"#);
        parse(&json).unwrap().0
    }

    #[test]
    fn codes_for_bad_input() {
        assert_eq!(parse("{nope").unwrap_err().code, Code::Decode as u32);
        let e = parse(r#"{"cniVersion":"9.9.9","name":"n","type":"md"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion as u32);
        let e = parse(r#"{"cniVersion":"1.0.0","type":"md"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig as u32);
        let e =
            parse(r#"{"cniVersion":"1.0.0","name":"n","type":"md","ipam":{"type":"host-local"}}"#)
                .unwrap_err();
        assert_eq!(e.code, Code::UnsupportedField as u32);
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"md","subnet":"10.0.0.0/33"}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig as u32);
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"md","datapath":"fast"}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig as u32);
    }

    #[test]
    fn names_come_from_the_runtime_else_the_id() {
        let c = conf("");
        assert_eq!(request(&c, &env("")).unwrap().name, "c0ffee");
        let r = request(&c, &env("IgnoreUnknown=1;K8S_POD_NAME=web")).unwrap();
        assert_eq!(r.name, "web");
        let r = request(&c, &env("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")).unwrap();
        assert_eq!(r.name, "web.shop");
        let mut long = env("");
        long.container_id = "a".repeat(64);
        assert_eq!(request(&c, &long).unwrap().name, "a".repeat(12));
        assert_eq!(
            request(&c, &env("K8S_POD_NAME")).unwrap_err().code,
            Code::InvalidEnv as u32
        );
    }

    #[test]
    fn capabilities_become_md_terms() {
        let c = conf(
            r#","runtimeConfig":{
                "portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""},
                                {"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"::"},
                                {"hostPort":53,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.1"}],
                "ips":["172.18.0.9/16"],
                "mac":"02:00:00:00:00:09",
                "aliases":{"mdnet":["www"],"other":["no"]}}"#,
        );
        let r = request(&c, &env("")).unwrap();
        assert_eq!(r.ip, Some(Ipv4Addr::new(172, 18, 0, 9)));
        assert_eq!(r.mac, Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(r.aliases, ["www"]);
        let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["8080:80/tcp", "192.0.2.1:53:53/udp"]);
        // Podman passes a single static address and MAC through CNI_ARGS.
        let r = request(&conf(""), &env("IP=172.18.0.7;MAC=02:00:00:00:00:07")).unwrap();
        assert_eq!(r.ip, Some(Ipv4Addr::new(172, 18, 0, 7)));
        assert_eq!(r.mac, Some([2, 0, 0, 0, 0, 7]));
        for bad in [
            r#","runtimeConfig":{"ips":["fd00::1/64"]}"#,
            r#","runtimeConfig":{"mac":"01:00:00:00:00:01"}"#,
            r#","runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80}]}"#,
            r#","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":80,"protocol":"sctp"}]}"#,
        ] {
            assert!(request(&conf(bad), &env("")).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_is_checked() {
        assert!(env("").require_attachment(true).is_ok());
        let mut e = env("");
        e.ifname = "a/b".into();
        assert_eq!(
            e.require_attachment(true).unwrap_err().code,
            Code::InvalidEnv as u32
        );
        let mut e = env("");
        e.netns.clear();
        assert!(e.require_attachment(true).is_err());
        assert!(e.require_attachment(false).is_ok());
        let mut e = env("");
        e.container_id = "-x".into();
        assert!(e.require_attachment(false).is_err());
    }
}
