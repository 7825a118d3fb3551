use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::Ctx;
use crate::state::Status;

use crate::ipam::format_mac as mac;

/// Docker-inspect-like network settings of one container.
pub async fn inspect(ctx: &Ctx, name: &str, as_json: bool) -> Result<ExitCode> {
    let state = super::reconciled(ctx).await?;
    let c = state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?;
    let mut networks = serde_json::Map::new();
    for i in &c.interfaces {
        let net = state.networks.get(&i.network);
        networks.insert(
            i.network.clone(),
            json!({
                "IPAddress": i.ip.to_string(),
                "IPPrefixLen": net.map(|n| n.subnet.prefix_len),
                "Gateway": net.and_then(|n| n.default_route()).map(|g| g.to_string()),
                "GlobalIPv6Address": i.ip6.map(|a| a.to_string()).unwrap_or_default(),
                "GlobalIPv6PrefixLen": net.and_then(|n| n.subnet6).map(|s| s.prefix_len).unwrap_or(0),
                "IPv6Gateway": net.filter(|n| !n.internal).and_then(|n| n.subnet6).map(|s| s.gateway().to_string()).unwrap_or_default(),
                "Aliases": i.aliases,
                "MTU": net.and_then(|n| n.mtu),
                "MacAddress": mac(&i.mac),
                "Interface": i.name,
                "HostVeth": i.veth,
                "HostIfindex": i.ifindex,
                "Bridge": net.map(|n| n.bridge.clone()),
            }),
        );
    }
    let mut ports = serde_json::Map::new();
    for p in &c.ports {
        let key = format!("{}/{}", p.container_port, p.proto);
        let entry = ports.entry(key).or_insert_with(|| json!([]));
        if let Value::Array(a) = entry {
            a.push(json!({
                "HostIp": p.host_ip_text(),
                // Routed: the container's own address and port, no host port (Docker's "").
                "HostPort": if p.routed { String::new() } else { p.host_port.to_string() },
            }));
        }
    }
    let policies: Vec<Value> = state
        .rules_of(&c.name)?
        .iter()
        .map(|r| json!({"from": r.from, "to": r.to, "verdict": r.verdict.to_string()}))
        .collect();
    let out = json!({
        "Name": c.name,
        "Id": c.id,
        "Hostname": c.hostname,
        "Command": c.cmd,
        "State": {
            "Status": match c.status { Status::Running => "running", Status::Creating => "creating" },
            "Pid": c.pid,
            "Detached": c.detached,
        },
        "HostConfig": {
            "Privileged": c.privileged,
            "Dns": c.dns.servers,
            "DnsSearch": c.dns.search,
            "DnsOptions": c.dns.options,
            "ExtraHosts": c.extra_hosts.iter().map(|h| format!("{}:{}", h.name, h.ip)).collect::<Vec<_>>(),
        },
        "Config": {
            "ExposedPorts": c.exposed.iter().map(|(p, proto)| (format!("{p}/{proto}"), json!({}))).collect::<serde_json::Map<_, _>>(),
        },
        "NetworkSettings": {
            "Networks": networks,
            "Ports": ports,
        },
        "Aliases": c.all_aliases(),
        "Cni": c.cni.as_ref().map(|o| json!({
            "ContainerID": o.container_id,
            "Netns": o.netns,
            "Networks": o.networks,
        })),
        // Attached by Docker through `md-user docker-plugin`.
        "Docker": c.docker.as_ref().map(|o| json!({
            "ContainerID": o.container_id,
            "SandboxKey": o.sandbox,
            "Endpoints": o.endpoints,
        })),
        "Policies": policies,
        "PolicyDefault": state.policy.default.to_string(),
        "Datapath": state.datapath.as_ref().map(|d| d.mode.clone()),
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("Name:      {}", c.name);
    println!("Id:        {}", c.id);
    println!("Hostname:  {}", c.hostname);
    println!("Pid:       {}", c.pid);
    println!("Privileged: {}", c.privileged);
    for (net, n) in out["NetworkSettings"]["Networks"].as_object().unwrap() {
        println!("Network:   {net}");
        println!(
            "  IP:        {}/{}",
            n["IPAddress"].as_str().unwrap_or(""),
            n["IPPrefixLen"]
        );
        println!("  Gateway:   {}", n["Gateway"].as_str().unwrap_or(""));
        if let Some(ip6) = n["GlobalIPv6Address"].as_str().filter(|s| !s.is_empty()) {
            println!("  IPv6:      {ip6}/{}", n["GlobalIPv6PrefixLen"]);
            println!("  Gateway6:  {}", n["IPv6Gateway"].as_str().unwrap_or(""));
        }
        println!("  MAC:       {}", n["MacAddress"].as_str().unwrap_or(""));
        println!(
            "  Interface: {} (host side {} on {})",
            n["Interface"].as_str().unwrap_or(""),
            n["HostVeth"].as_str().unwrap_or(""),
            n["Bridge"].as_str().unwrap_or("")
        );
    }
    for p in &c.ports {
        println!("Port:      {p}");
    }
    if let Some(d) = out["Datapath"].as_str() {
        println!("Datapath:  {d}");
    }
    for r in &policies {
        println!(
            "Policy:    {} {} -> {}",
            r["verdict"].as_str().unwrap_or(""),
            r["from"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
