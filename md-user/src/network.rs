//! md networks: a bridge and a subnet each, their NETWORKS entry (the datapath isolates
//! networks from each other by id), and their DNS resolver.

use std::{net::Ipv6Addr, time::Duration};

use anyhow::{bail, Context, Result};
use md_common::{Network as NetworkEntry, NET_IPV6, NET_ROUTED6};

use crate::{
    cli::GlobalOpts,
    datapath::Datapath,
    dns,
    ipam::{mac_for, Subnet, Subnet6},
    netlink::Netlink,
    proc,
    state::{Network, State, StateDir, DEFAULT_NETWORK},
};

/// Makes sure the default network exists in the state with the configured bridge and subnet,
/// dual-stack when `--ipv6` (or `--subnet6`) says so.
pub fn ensure_default(state: &mut State, opts: &GlobalOpts) -> Result<()> {
    let subnet: Subnet = opts.subnet.parse()?;
    let subnet6 = opts
        .subnet6
        .as_deref()
        .map(str::parse::<Subnet6>)
        .transpose()?;
    let ipv6 = opts.ipv6 || subnet6.is_some();
    if let Some(net) = state.networks.get(DEFAULT_NETWORK) {
        let same6 = match (net.subnet6, subnet6) {
            (Some(have), Some(want)) => have == want,
            (have, None) => have.is_some() == ipv6,
            (None, Some(_)) => false,
        };
        if net.subnet == subnet && net.bridge == opts.bridge && same6 && !net.routed6 {
            return Ok(());
        }
        if state
            .containers
            .values()
            .any(|c| c.on_network(DEFAULT_NETWORK))
        {
            bail!(
                "the default network is {} on {}; stop its containers or run `md-user down` before changing --bridge, --subnet, --ipv6 or --subnet6",
                net.subnet,
                net.bridge
            );
        }
        state.networks.remove(DEFAULT_NETWORK);
    }
    let v6 = ipv6.then_some((subnet6, false));
    add(state, DEFAULT_NETWORK, opts.bridge.clone(), subnet, v6)?;
    Ok(())
}

/// The IPv6 side of a new network: its subnet (the given one, else the next free /64 of the
/// host's ULA /48) and whether it is routed.
type V6 = Option<(Option<Subnet6>, bool)>;

fn add(state: &mut State, name: &str, bridge: String, subnet: Subnet, v6: V6) -> Result<Network> {
    for (other, net) in &state.networks {
        if net.subnet.overlaps(&subnet) {
            bail!("subnet {subnet} overlaps network {other} ({})", net.subnet);
        }
        if net.bridge == bridge {
            bail!("bridge {bridge} is already used by network {other}");
        }
    }
    let taken: Vec<Subnet6> = state.networks.values().filter_map(|n| n.subnet6).collect();
    let (subnet6, routed6) = match v6 {
        None => (None, false),
        Some((Some(s), routed)) => {
            if let Some((other, n)) = state
                .networks
                .iter()
                .find(|(_, n)| n.subnet6.is_some_and(|t| t.overlaps(&s)))
            {
                bail!(
                    "subnet {s} overlaps network {other} ({})",
                    n.subnet6.expect("checked")
                );
            }
            (Some(s), routed)
        }
        Some((None, routed)) => {
            let base = crate::ipam::ula_base(&crate::ipam::host_id());
            (Some(crate::ipam::next_ula64(base, &taken)?), routed)
        }
    };
    state.next_network_id = state.next_network_id.max(1);
    let id = state.next_network_id;
    state.next_network_id += 1;
    let net = Network {
        id,
        bridge,
        subnet,
        subnet6,
        routed6,
        dns_pid: 0,
        dns_start: 0,
    };
    state.networks.insert(name.to_string(), net.clone());
    Ok(net)
}

/// A user-defined network, with the first free 172.19-31.0.0/16 when no subnet is given.
pub fn create(state: &mut State, name: &str, subnet: Option<Subnet>, v6: V6) -> Result<Network> {
    if state.networks.contains_key(name)
        || matches!(name, "none" | "host")
        || name.starts_with("container:")
    {
        bail!("network {name} already exists");
    }
    let subnet = match subnet {
        Some(s) => s,
        None => (19..=31)
            .map(|b| Subnet::new(std::net::Ipv4Addr::new(172, b, 0, 0), 16).expect("valid"))
            .find(|s| !state.networks.values().any(|n| n.subnet.overlaps(s)))
            .context("no free 172.19-31.0.0/16 subnet left; pass --subnet")?,
    };
    // Bridge names are short (IFNAMSIZ) and never clash with md's veths (md + 8 hex).
    let bridge = format!("mdn{}", state.next_network_id.max(1));
    add(state, name, bridge, subnet, v6)
}

/// A container's IPv6 address on `net` (None on an IPv4-only network): `want` if it is free,
/// else the lowest free one.
pub fn allocate6(
    state: &State,
    net: &Network,
    name: &str,
    want: Option<Ipv6Addr>,
) -> Result<Option<Ipv6Addr>> {
    let Some(s6) = net.subnet6 else {
        if want.is_some() {
            bail!("network {name} has no IPv6 (create it with --ipv6)");
        }
        return Ok(None);
    };
    let used = state.used_ips6(name);
    Ok(Some(match want {
        Some(ip) => {
            s6.check_static(ip, &used)?;
            ip
        }
        None => s6.allocate(&used)?,
    }))
}

/// Creates the network's bridge if needed and publishes it to the datapath.
pub async fn ensure_bridge(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<u32> {
    let gw = net.subnet.gateway();
    let mac = mac_for(gw);
    let link = nl
        .ensure_bridge(&net.bridge, gw, net.subnet.prefix_len, mac)
        .await?;
    if let Some(s6) = net.subnet6 {
        // No DAD on md's addresses (the gateway answers at once) and no router
        // advertisements taken from containers (CVE-2020-13401); the host forwards IPv6.
        let conf = format!("/proc/sys/net/ipv6/conf/{}", net.bridge);
        crate::netns::write_sysctl(&format!("{conf}/disable_ipv6"), "0")?;
        crate::netns::write_sysctl(&format!("{conf}/accept_dad"), "0")?;
        crate::netns::write_sysctl(&format!("{conf}/accept_ra"), "0")?;
        nl.ensure_address6(link.index, s6.gateway(), s6.prefix_len)
            .await
            .with_context(|| {
                format!(
                    "adding {}/{} to {}",
                    s6.gateway(),
                    s6.prefix_len,
                    net.bridge
                )
            })?;
        crate::host::ipv6_forwarding()?;
    }
    let mut networks = dp.networks()?;
    let flags = match (net.subnet6, net.routed6) {
        (None, _) => 0,
        (Some(_), false) => NET_IPV6,
        (Some(_), true) => NET_IPV6 | NET_ROUTED6,
    };
    networks
        .insert(
            net.id,
            NetworkEntry {
                gateway: gw.octets(),
                subnet: net.subnet.network.octets(),
                prefix_len: net.subnet.prefix_len,
                _pad: [0],
                gateway_mac: mac,
                bridge_ifindex: link.index,
                gateway6: net
                    .subnet6
                    .map(|s| s.gateway().octets())
                    .unwrap_or_default(),
                flags,
            },
            0,
        )
        .context("writing NETWORKS")?;
    dp.add_subnet(net.subnet.network, net.subnet.prefix_len, net.id)?;
    if let Some(s6) = net.subnet6 {
        dp.add_subnet6(s6.network, s6.prefix_len, net.id)?;
    }
    crate::host::refresh_host_addrs(nl, dp).await?;
    Ok(link.index)
}

/// Deletes a network's bridge and datapath entry.
pub async fn remove_bridge(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<()> {
    if dp.is_loaded() {
        let _ = dp.networks()?.remove(&net.id);
        dp.remove_subnet(net.subnet.network, net.subnet.prefix_len)?;
        if let Some(s6) = net.subnet6 {
            dp.remove_subnet6(s6.network, s6.prefix_len)?;
        }
    }
    if let Some(link) = nl.link_by_name(&net.bridge).await? {
        if link.kind.as_deref() == Some("bridge") {
            nl.delete_link(link.index).await?;
        }
    }
    // Its gateway is no host address any more: published ports must not answer there.
    if dp.is_loaded() {
        crate::host::refresh_host_addrs(nl, dp).await?;
    }
    Ok(())
}

/// Removes every network (resolver, bridge, datapath entry). Best effort; idempotent.
pub async fn remove_all(nl: &Netlink, dp: &Datapath, state: &mut State) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    for net in state.networks.values_mut() {
        stop_resolver(net);
        if let Err(e) = remove_bridge(nl, dp, net).await {
            errors.push(e);
        }
    }
    state.networks.clear();
    errors
}

/// Starts the network's resolver if it is not running (it listens on the gateway, port 53).
pub fn ensure_resolver(opts: &GlobalOpts, state: &mut State, name: &str) -> Result<()> {
    let net = state
        .networks
        .get_mut(name)
        .with_context(|| format!("no such network: {name}"))?;
    if proc::alive(net.dns_pid, net.dns_start) {
        return Ok(());
    }
    let listen = format!("{}:53", net.subnet.gateway());
    let mut cmd = opts.self_command();
    cmd.arg("__dns")
        .arg("--network")
        .arg(name)
        .arg("--listen")
        .arg(&listen);
    let (child, msg) = proc::spawn_with_ready_pipe(cmd, |cmd, fd| {
        cmd.arg("--ready-fd").arg(fd.to_string());
    })
    .context("starting the network's resolver")?;
    if !msg.starts_with("ok") {
        bail!(
            "the resolver of network {name} did not start: {}",
            msg.trim()
        );
    }
    net.dns_pid = child.id();
    net.dns_start = proc::start_time(child.id()).unwrap_or(0);
    std::mem::forget(child);
    Ok(())
}

/// Stops resolvers of networks that have no container left and waits for them to exit (a new
/// one binds the same address).
pub fn stop_idle_resolvers(state: &mut State) {
    let idle: Vec<String> = state
        .networks
        .keys()
        .filter(|n| !state.containers.values().any(|c| c.on_network(n)))
        .cloned()
        .collect();
    for name in idle {
        if let Some(net) = state.networks.get_mut(&name) {
            stop_resolver(net);
        }
    }
}

pub fn stop_resolver(net: &mut Network) {
    if proc::signal(net.dns_pid, net.dns_start, libc::SIGTERM) {
        for _ in 0..100 {
            if !proc::alive(net.dns_pid, net.dns_start) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    net.dns_pid = 0;
    net.dns_start = 0;
}

/// After containers came or went: peers' hosts files, resolvers of networks left empty, host
/// ports nobody publishes any more.
pub fn containers_changed(dir: &StateDir, state: &mut State) {
    if let Err(e) = dns::refresh(dir, state) {
        eprintln!(
            "md-user: updating hosts files: {}",
            crate::error::one_line(&e)
        );
    }
    stop_idle_resolvers(state);
    if let Err(e) = crate::hostports::release(state) {
        eprintln!(
            "md-user: giving back reserved ports: {}",
            crate::error::one_line(&e)
        );
    }
}
