//! md's network driver for Docker: each call of libnetwork's remote driver protocol as a short
//! translation onto the core in `attach.rs` (as the CNI plugin's verbs are).
//!
//! - A Docker network is an md network: the one whose subnet is the pool (so a Docker network
//!   can share md's default network or one from `md-user network create`), else a new one the
//!   plugin makes and removes when Docker is done with it.
//! - A Docker sandbox is an md container named as Docker names the container; each endpoint
//!   that joins it is one interface. Docker moves the interface into the sandbox itself, so
//!   Join hands over the container end of a veth created in md's host namespace (md's
//!   programs and map entries are all on the host end, which stays); it lives until Docker
//!   deletes the endpoint.
//! - ProgramExternalConnectivity publishes the container's ports on that endpoint's interface
//!   (the one its default route goes through), RevokeExternalConnectivity takes them back.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    api::Names,
    ipam,
    protocol::{self as p, PortBinding},
    Plugin,
};
use crate::{
    attach::{self, IfaceSpec, Spec},
    commands::run::validate_name,
    host,
    hostports::Held,
    netlink::Netlink,
    network,
    state::{DockerEndpoint, DockerOwner, Locked, State, Status},
};

/// The name md gives a Docker network's md network until Docker's API tells it.
fn placeholder(nid: &str) -> String {
    format!("docker-{}", &nid[..nid.len().min(12)])
}

/// The md network of Docker network `nid`.
fn md_network<'a>(state: &'a State, nid: &str) -> Result<&'a String> {
    state.docker.networks.get(nid).with_context(|| {
        format!("Docker network {nid} is unknown to md (created while md's plugin state was lost? remove and create it again)")
    })
}

/// The md container an endpoint joined, and that endpoint's host veth.
fn joined(state: &State, eid: &str) -> Option<(String, String)> {
    state.containers.values().find_map(|c| {
        let veth = c.docker.as_ref()?.endpoints.get(eid)?;
        Some((c.name.clone(), veth.clone()))
    })
}

pub async fn create_network(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::CreateNetwork = serde_json::from_value(body)?;
    let opts = req.options.unwrap_or_default();
    if opts.get(p::ENABLE_IPV6).and_then(Value::as_bool) == Some(true)
        || req.ipv6_data.as_ref().is_some_and(|d| !d.is_empty())
    {
        bail!("md's networks are IPv4: leave --ipv6 out");
    }
    if opts.get(p::INTERNAL).and_then(Value::as_bool) == Some(true) {
        bail!("md has no --internal networks yet");
    }
    if let Some(generic) = opts.get(p::GENERIC).and_then(Value::as_object) {
        if let Some(k) = generic.keys().next() {
            bail!("md takes no driver options (-o {k})");
        }
    }
    let data = req.ipv4_data.unwrap_or_default();
    let [pool] = data.as_slice() else {
        bail!(
            "md's networks have one IPv4 subnet, Docker gave {}",
            data.len()
        );
    };
    let subnet: crate::ipam::Subnet = pool.pool.parse()?;
    if !pool.gateway.is_empty() && p::parse_address(&pool.gateway)? != subnet.gateway() {
        bail!(
            "md's gateway is the subnet's first address, {}: leave --gateway out",
            subnet.gateway()
        );
    }
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    let state = &mut locked.state;
    network::ensure_default(state, &pl.ctx.opts)?;
    if let Some(other) = state
        .docker
        .networks
        .iter()
        .find(|(id, n)| {
            **id != req.network_id && state.networks.get(*n).is_some_and(|n| n.subnet == subnet)
        })
        .map(|(id, _)| id.clone())
    {
        bail!("subnet {subnet} is Docker network {other}'s already");
    }
    let name = match state.networks.iter().find(|(_, n)| n.subnet == subnet) {
        Some((name, _)) => name.clone(),
        None => {
            let name = placeholder(&req.network_id);
            network::create(state, &name, Some(subnet), None)?;
            state.docker.made.insert(name.clone());
            name
        }
    };
    state
        .docker
        .networks
        .insert(req.network_id.clone(), name.clone());
    let net = state.networks[&name].clone();
    let made = async {
        host::ensure_datapath(&nl, &pl.ctx.dp, &mut locked.state, &pl.ctx.opts).await?;
        network::ensure_bridge(&nl, &pl.ctx.dp, &net).await
    }
    .await;
    if let Err(e) = made {
        locked.state.docker.networks.remove(&req.network_id);
        gc_networks(pl, &nl, &mut locked).await;
        return Err(e);
    }
    locked.save()?;
    eprintln!(
        "md-user docker-plugin: network {} is md network {name} ({subnet})",
        short(&req.network_id)
    );
    Ok(json!({}))
}

pub async fn delete_network(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::NetworkRef = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    locked.state.docker.networks.remove(&req.network_id);
    locked
        .state
        .docker
        .endpoints
        .retain(|_, e| e.network != req.network_id);
    gc_networks(pl, &nl, &mut locked).await;
    locked.save()?;
    Ok(json!({}))
}

/// Removes the md networks the plugin made that no Docker network, pool or container uses.
pub async fn gc_networks(pl: &Plugin, nl: &Netlink, locked: &mut Locked) {
    let state = &mut locked.state;
    let idle: Vec<String> = state
        .docker
        .made
        .iter()
        .filter(|name| {
            let Some(net) = state.networks.get(*name) else {
                return true;
            };
            !state.docker.networks.values().any(|n| n == *name)
                && !state.docker.pools.values().any(|s| *s == net.subnet)
                && !state.containers.values().any(|c| c.on_network(name))
        })
        .cloned()
        .collect();
    for name in idle {
        state.docker.made.remove(&name);
        if let Some(mut net) = state.networks.remove(&name) {
            network::stop_resolver(&mut net);
            if let Err(e) = network::remove_bridge(nl, &pl.ctx.dp, &net).await {
                eprintln!(
                    "md-user docker-plugin: removing network {name}: {}",
                    crate::error::one_line(&e)
                );
            }
        }
    }
}

/// Gives the md network the plugin made for Docker network `nid` Docker's name, once known,
/// while no container uses it (a name in use by md stays the placeholder).
pub fn adopt_network_name(state: &mut State, nid: &str, docker_name: &str) -> bool {
    let Some(current) = state.docker.networks.get(nid).cloned() else {
        return false;
    };
    if current == docker_name
        || current != placeholder(nid)
        || !state.docker.made.contains(&current)
        || state.networks.contains_key(docker_name)
        || matches!(docker_name, "none" | "host")
        || validate_name(docker_name).is_err()
        || state.containers.values().any(|c| c.on_network(&current))
    {
        return false;
    }
    let Some(net) = state.networks.remove(&current) else {
        return false;
    };
    state.networks.insert(docker_name.to_string(), net);
    state.docker.made.remove(&current);
    state.docker.made.insert(docker_name.to_string());
    state
        .docker
        .networks
        .insert(nid.to_string(), docker_name.to_string());
    true
}

pub async fn create_endpoint(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::CreateEndpoint = serde_json::from_value(body)?;
    let iface = req.interface.unwrap_or_default();
    if !iface.address_ipv6.is_empty() {
        bail!("md's networks are IPv4: no IPv6 address");
    }
    if iface.address.is_empty() {
        bail!("endpoint {} has no IPv4 address", short(&req.endpoint_id));
    }
    let ip = p::parse_address(&iface.address)?;
    let given_mac = match iface.mac_address.as_str() {
        "" => None,
        m => Some(p::parse_mac(m).with_context(|| format!("{m:?} is not a MAC address"))?),
    };
    let names = pl.docker.names(&req.network_id, None).await.ok();
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    if let Some(n) = names.and_then(|n| n.network) {
        adopt_network_name(&mut locked.state, &req.network_id, &n);
    }
    let state = &mut locked.state;
    let net_name = md_network(state, &req.network_id)?.clone();
    let net = &state.networks[&net_name];
    if !net.subnet.contains(ip) || ip == net.subnet.gateway() {
        bail!("address {ip} is not a container address of {}", net.subnet);
    }
    if state.interface_ips(&net_name).contains(&ip)
        || state
            .docker
            .endpoints
            .iter()
            .any(|(id, e)| *id != req.endpoint_id && e.network == req.network_id && e.ip == ip)
    {
        bail!("address {ip} is already in use on md network {net_name}");
    }
    let mac = given_mac.unwrap_or_else(|| crate::ipam::mac_for(ip));
    state.docker.endpoints.insert(
        req.endpoint_id.clone(),
        DockerEndpoint {
            network: req.network_id.clone(),
            ip,
            mac,
        },
    );
    locked.save()?;
    // Docker takes what it did not give (a MAC); it refuses an answer that repeats a value.
    let answer = p::EndpointInterface {
        mac_address: if given_mac.is_none() {
            p::format_mac(mac)
        } else {
            String::new()
        },
        ..Default::default()
    };
    Ok(json!({ "Interface": answer }))
}

pub async fn delete_endpoint(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::EndpointRef = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    if let Some((name, veth)) = joined(&locked.state, &req.endpoint_id) {
        remove_iface(pl, &nl, &mut locked, &name, &veth).await?;
    }
    locked.state.docker.endpoints.remove(&req.endpoint_id);
    locked.save()?;
    Ok(json!({}))
}

/// Takes interface `veth` off container `name` (the container goes with its last one).
async fn remove_iface(
    pl: &Plugin,
    nl: &Netlink,
    locked: &mut Locked,
    name: &str,
    veth: &str,
) -> Result<()> {
    let c = &locked.state.containers[name];
    let Some(pos) = c.interfaces.iter().position(|i| i.veth == veth) else {
        return Ok(());
    };
    if c.interfaces.len() == 1 {
        eprintln!("md-user docker-plugin: {name} leaves md");
        return attach::discard(&pl.ctx, nl, locked, name).await;
    }
    if pos == 0 {
        attach::unpublish_ports(&pl.ctx, locked, name)?;
    }
    let network = locked.state.containers[name].interfaces[pos]
        .network
        .clone();
    attach::remove_interface(&pl.ctx, nl, &mut locked.state, name, &network).await?;
    if let Some(o) = locked
        .state
        .containers
        .get_mut(name)
        .and_then(|c| c.docker.as_mut())
    {
        o.endpoints.retain(|_, v| v != veth);
    }
    locked.save()
}

pub async fn join(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::Join = serde_json::from_value(body)?;
    // Docker's names first, outside md's lock (Docker answers them without calling md).
    let names = match pl
        .docker
        .names(&req.network_id, Some(&req.endpoint_id))
        .await
    {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "md-user docker-plugin: Docker's API did not name endpoint {}: {}",
                short(&req.endpoint_id),
                crate::error::one_line(&e)
            );
            Names::default()
        }
    };
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    if let Some(n) = &names.network {
        adopt_network_name(&mut locked.state, &req.network_id, n);
    }
    let state = &locked.state;
    let ep = state
        .docker
        .endpoints
        .get(&req.endpoint_id)
        .with_context(|| format!("no such endpoint: {}", req.endpoint_id))?
        .clone();
    if let Some((name, _)) = joined(state, &req.endpoint_id) {
        bail!(
            "endpoint {} has joined container {name} already",
            short(&req.endpoint_id)
        );
    }
    let net_name = md_network(state, &ep.network)?.clone();
    let gateway = state.networks[&net_name].subnet.gateway();
    let sandbox = state
        .containers
        .values()
        .find(|c| {
            c.docker
                .as_ref()
                .is_some_and(|o| o.sandbox == req.sandbox_key)
        })
        .map(|c| c.name.clone());
    let want = |n: u32| IfaceSpec {
        network: net_name.clone(),
        ip: Some(ep.ip),
        ip6: None,
        mac: Some(ep.mac),
        name: format!("eth{n}"),
        reserved: true,
        handover: true,
        aliases: Vec::new(),
    };
    let (name, iface) = match sandbox {
        // One more network for a running container (`docker network connect`).
        Some(name) => {
            let next = locked.state.containers[&name]
                .docker
                .as_ref()
                .map_or(0, |o| o.next_if);
            let iface =
                attach::add_interface(&pl.ctx, &nl, &mut locked, &name, want(next), None).await?;
            let o = locked
                .state
                .containers
                .get_mut(&name)
                .and_then(|c| c.docker.as_mut())
                .expect("a Docker container");
            o.endpoints
                .insert(req.endpoint_id.clone(), iface.veth.clone());
            o.next_if += 1;
            locked.save()?;
            (name, iface)
        }
        None => {
            let name = container_name(&names, &req.sandbox_key)?;
            let spec = Spec {
                name: name.clone(),
                hostname: name.clone(),
                mode: net_name.clone(),
                iface: Some(want(0)),
                ports: Vec::new(),
                cmd: Vec::new(),
                detached: true,
                cni: None,
                privileged: false,
                // Docker writes the container's resolv.conf and hosts file itself.
                dns: Default::default(),
                extra_hosts: Vec::new(),
                exposed: Vec::new(),
                docker: Some(DockerOwner {
                    sandbox: req.sandbox_key.clone(),
                    container_id: names.container_id.clone(),
                    endpoints: Default::default(),
                    next_if: 1,
                }),
            };
            let c = attach::create(&pl.ctx, &nl, &mut locked, spec, None).await?;
            let iface = c.interfaces[0].clone();
            // Attached: from now on its veths, not this process, keep it alive.
            let c = locked.state.containers.get_mut(&name).expect("created");
            c.status = Status::Running;
            c.supervisor_pid = 0;
            c.supervisor_start = 0;
            if let Some(o) = c.docker.as_mut() {
                o.endpoints
                    .insert(req.endpoint_id.clone(), iface.veth.clone());
            }
            locked.save()?;
            (name, iface)
        }
    };
    eprintln!(
        "md-user docker-plugin: {name} joins md network {net_name} as {} ({}, veth {})",
        iface.name, iface.ip, iface.veth
    );
    Ok(json!({
        "InterfaceName": {
            "SrcName": iface.handover.expect("handed over"),
            "DstPrefix": "eth",
        },
        "Gateway": gateway.to_string(),
    }))
}

/// The md name of a Docker container: Docker's name, else `docker-` and its sandbox's id.
fn container_name(names: &Names, sandbox_key: &str) -> Result<String> {
    if let Some(n) = names
        .container
        .as_deref()
        .filter(|n| validate_name(n).is_ok())
    {
        return Ok(n.to_string());
    }
    let id = std::path::Path::new(sandbox_key)
        .file_name()
        .and_then(|f| f.to_str())
        .filter(|f| !f.is_empty())
        .with_context(|| format!("sandbox key {sandbox_key:?} names no sandbox"))?;
    let name = format!("docker-{}", &id[..id.len().min(12)]);
    validate_name(&name)?;
    Ok(name)
}

pub async fn leave(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::EndpointRef = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    // Its ports go now (Docker revokes them first anyway); the veth stays until Docker deletes
    // the endpoint: Docker moves the container end back to the host namespace first.
    if let Some((name, veth)) = joined(&locked.state, &req.endpoint_id) {
        if locked.state.containers[&name].interfaces[0].veth == veth {
            attach::unpublish_ports(&pl.ctx, &mut locked, &name)?;
        }
    }
    Ok(json!({}))
}

pub async fn program_external_connectivity(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::EndpointRef = serde_json::from_value(body)?;
    let bindings = p::port_bindings(req.options.as_ref())?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    let (name, veth) = joined(&locked.state, &req.endpoint_id)
        .with_context(|| format!("endpoint {} has not joined", short(&req.endpoint_id)))?;
    let ports = {
        let state = &locked.state;
        let held = if bindings
            .iter()
            .any(|b| b.host_port_end != b.host_port || b.host_port == 0)
        {
            Some(Held::now(state)?)
        } else {
            None
        };
        p::mappings(&bindings, |m| {
            !held.as_ref().is_some_and(|h| h.holds(m))
                && !state
                    .containers
                    .values()
                    .filter(|c| c.name != name)
                    .any(|c| c.ports.iter().any(|q| q.conflicts_with(m)))
        })?
    };
    attach::publish_ports(&pl.ctx, &mut locked, &name, &veth, ports)?;
    let c = &locked.state.containers[&name];
    if !c.ports.is_empty() {
        let shown: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
        eprintln!(
            "md-user docker-plugin: {name} publishes {}",
            shown.join(", ")
        );
    }
    Ok(json!({}))
}

pub async fn revoke_external_connectivity(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::EndpointRef = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    if let Some((name, veth)) = joined(&locked.state, &req.endpoint_id) {
        if locked.state.containers[&name].interfaces[0].veth == veth {
            attach::unpublish_ports(&pl.ctx, &mut locked, &name)?;
        }
    }
    Ok(json!({}))
}

/// What md did for an endpoint: its interface and, on the endpoint the ports went to, the ports
/// as published (host ports chosen for `-P` included).
pub async fn endpoint_oper_info(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::EndpointRef = serde_json::from_value(body)?;
    let _serial = pl.serial.lock().await;
    let state = pl.ctx.state_dir.peek()?;
    let mut value = serde_json::Map::new();
    if let Some(ep) = state.docker.endpoints.get(&req.endpoint_id) {
        value.insert(p::MAC_ADDRESS.into(), json!(p::format_mac(ep.mac)));
    }
    if let Some((name, veth)) = joined(&state, &req.endpoint_id) {
        let c = &state.containers[&name];
        value.insert("md.container".into(), json!(name));
        value.insert("md.veth".into(), json!(veth));
        if c.interfaces[0].veth == veth {
            let ip = c.interfaces[0].ip;
            let ports: Vec<PortBinding> = c.ports.iter().map(|m| PortBinding::of(m, ip)).collect();
            value.insert(p::PORT_MAP.into(), json!(ports));
        }
    }
    Ok(json!({ "Value": value }))
}

// ---- IPAM ------------------------------------------------------------------------------------

pub async fn request_pool(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::RequestPool = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    let (id, subnet) = ipam::request_pool(&mut locked.state, &pl.ctx.opts, &req)?;
    locked.save()?;
    Ok(json!({"PoolID": id, "Pool": subnet.to_string(), "Data": {}}))
}

pub async fn release_pool(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::PoolRef = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    ipam::release_pool(&mut locked.state, &req.pool_id);
    gc_networks(pl, &nl, &mut locked).await;
    locked.save()?;
    Ok(json!({}))
}

pub async fn request_address(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::RequestAddress = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    let (ip, subnet) = ipam::request_address(&mut locked.state, &req)?;
    locked.save()?;
    Ok(json!({"Address": p::cidr(ip, &subnet), "Data": {}}))
}

pub async fn release_address(pl: &Plugin, body: Value) -> Result<Value> {
    let req: p::ReleaseAddress = serde_json::from_value(body)?;
    let nl = Netlink::connect()?;
    let (_serial, mut locked) = pl.lock(&nl).await?;
    ipam::release_address(&mut locked.state, &req)?;
    locked.save()?;
    Ok(json!({}))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_network_takes_dockers_name_while_unused() {
        let mut s = State::default();
        let nid = "0123456789abcdef";
        let ph = placeholder(nid);
        assert_eq!(ph, "docker-0123456789ab");
        network::create(&mut s, &ph, Some("10.8.0.0/24".parse().unwrap()), None).unwrap();
        s.docker.made.insert(ph.clone());
        s.docker.networks.insert(nid.into(), ph.clone());
        network::create(&mut s, "taken", None, None).unwrap();
        assert!(!adopt_network_name(&mut s, nid, "taken"));
        assert!(!adopt_network_name(&mut s, nid, "no/slash"));
        assert!(adopt_network_name(&mut s, nid, "web"));
        assert_eq!(s.docker.networks[nid], "web");
        assert!(s.docker.made.contains("web") && !s.networks.contains_key(&ph));
        // Named once: a later name does not move it again.
        assert!(!adopt_network_name(&mut s, nid, "other"));
    }

    #[test]
    fn containers_are_named_as_docker_names_them() {
        let named = Names {
            container: Some("web".into()),
            ..Names::default()
        };
        assert_eq!(container_name(&named, "/x/netns/abc").unwrap(), "web");
        let key = "/tmp/d/exec/netns/0a1b2c3d4e5f";
        assert_eq!(
            container_name(&Names::default(), key).unwrap(),
            "docker-0a1b2c3d4e5f"
        );
    }
}
