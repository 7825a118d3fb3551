//! ADD's result in the configuration's version, with a chained plugin's `prevResult` kept in
//! front of md's own interfaces, addresses and routes.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::{config::NetConf, version::Version};

/// What md attached, for the result.
#[derive(Debug, Clone)]
pub struct Attached {
    pub host_veth: String,
    pub host_mac: Vec<u8>,
    pub ifname: String,
    pub mac: [u8; 6],
    pub sandbox: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub default_route: bool,
}

fn mac_str(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The result's `dns`: the network's resolver (md answers container names on the gateway and
/// forwards the rest), with the configuration's and the runtime's search domains and options.
pub fn dns(conf: &NetConf) -> Value {
    let mut search: Vec<String> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut domain = None;
    if let Some(d) = &conf.dns {
        search.extend(d.search.iter().cloned());
        options.extend(d.options.iter().cloned());
        domain = d.domain.clone();
    }
    if let Some(d) = &conf.runtime_config.dns {
        search.extend(d.searches.iter().cloned());
        options.extend(d.options.iter().cloned());
    }
    let mut v = json!({});
    if !search.is_empty() {
        v["search"] = json!(search);
    }
    if !options.is_empty() {
        v["options"] = json!(options);
    }
    if let Some(d) = domain {
        v["domain"] = json!(d);
    }
    v
}

/// The result: `prev`'s entries (reshaped for `v`) followed by md's.
pub fn build(v: Version, prev: Option<&Value>, a: &Attached, dns: &Value) -> Value {
    let list = |k: &str| -> Vec<Value> {
        prev.and_then(|p| p.get(k))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut interfaces = list("interfaces");
    let mut ips: Vec<Value> = list("ips").into_iter().map(|ip| shape_ip(v, ip)).collect();
    let mut routes = list("routes");
    let base = interfaces.len();
    interfaces.push(json!({"name": a.host_veth, "mac": mac_str(&a.host_mac)}));
    interfaces.push(json!({"name": a.ifname, "mac": mac_str(&a.mac), "sandbox": a.sandbox}));
    ips.push(shape_ip(
        v,
        json!({
            "address": format!("{}/{}", a.ip, a.prefix_len),
            "gateway": a.gateway.to_string(),
            "interface": base + 1,
        }),
    ));
    if a.default_route {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}));
    }
    let mut dns_out = prev
        .and_then(|p| p.get("dns"))
        .cloned()
        .filter(|d| d.as_object().is_some_and(|o| !o.is_empty()))
        .unwrap_or_else(|| dns.clone());
    if dns_out.get("nameservers").is_none() {
        dns_out["nameservers"] = json!([a.gateway.to_string()]);
    }
    json!({
        "cniVersion": v.to_string(),
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns_out,
    })
}

/// Before 1.0.0 each address says its family ("version"); 1.0.0 dropped the field.
fn shape_ip(v: Version, mut ip: Value) -> Value {
    if let Some(o) = ip.as_object_mut() {
        if v < Version(1, 0, 0) {
            let six = o
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.contains(':'));
            o.entry("version")
                .or_insert_with(|| json!(if six { "6" } else { "4" }));
        } else {
            o.remove("version");
        }
    }
    ip
}

/// The addresses a result lists on the container interface `ifname`.
pub fn addresses_of(result: &Value, ifname: &str) -> Vec<String> {
    let interfaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|ip| {
            ip.get("interface")
                .and_then(Value::as_u64)
                .and_then(|i| interfaces.get(i as usize))
                .is_some_and(|i| {
                    i.get("name").and_then(Value::as_str) == Some(ifname)
                        && i.get("sandbox")
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                })
        })
        .filter_map(|ip| ip.get("address").and_then(Value::as_str).map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached() -> Attached {
        Attached {
            host_veth: "md0a0b0c0d".into(),
            host_mac: vec![2, 0, 0, 0, 0, 1],
            ifname: "eth0".into(),
            mac: [2, 0x42, 172, 18, 0, 2],
            sandbox: "/run/netns/x".into(),
            ip: Ipv4Addr::new(172, 18, 0, 2),
            prefix_len: 16,
            gateway: Ipv4Addr::new(172, 18, 0, 1),
            default_route: true,
        }
    }

    #[test]
    fn result_in_1_0_and_0_4() {
        let r = build(Version(1, 0, 0), None, &attached(), &json!({}));
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["mac"], "02:42:ac:12:00:02");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(r["ips"][0]["address"], "172.18.0.2/16");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["dns"]["nameservers"][0], "172.18.0.1");
        let r = build(Version(0, 4, 0), None, &attached(), &json!({}));
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(addresses_of(&r, "eth0"), ["172.18.0.2/16"]);
        assert!(addresses_of(&r, "eth1").is_empty());
    }

    #[test]
    fn prev_result_comes_first() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "lo", "sandbox": "/run/netns/x"}],
            "ips": [{"version": "4", "address": "10.0.0.2/8", "interface": 0}],
            "dns": {"nameservers": ["10.0.0.53"]},
        });
        let r = build(Version(1, 0, 0), Some(&prev), &attached(), &json!({}));
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][0]["address"], "10.0.0.2/8");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"]["nameservers"][0], "10.0.0.53");
    }
}
