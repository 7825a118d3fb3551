//! A container's interface on an md network: the veth pair, its addresses, its TC programs and
//! its map entries. Setup and teardown side by side; teardown is best effort and undoes setup
//! in reverse order (map entries, programs, link).

use anyhow::{Context, Result};
use md_common::{Endpoint, PortKey, PortKey6, PortTarget, PortTarget6};

use crate::{
    datapath::{Datapath, Hook},
    hostports,
    netlink::Netlink,
    netns::Netns,
    network,
    portmap::PortMapping,
    state::{Container, Interface, Locked, Network},
};

/// Creates the veth pair (peer as `iface.name` inside `netns`), configures the container side
/// (the default route only through the primary interface) and attaches md's programs to the
/// host side. An interface handed over (`iface.handover`) keeps its peer in md's host
/// namespace under that name, with its MAC and nothing else: the runtime moves it into its
/// sandbox, renames it and configures it (md's programs and map entries are all on the host
/// side, so they do not care where the peer goes). Returns the host side's ifindex. On failure
/// it removes what it made: the caller does not know the ifindex yet, so it could not find the
/// map entries keyed by it.
pub async fn setup(
    nl: &Netlink,
    dp: &Datapath,
    netns: Option<&Netns>,
    net: &Network,
    iface: &Interface,
    identity: u32,
    primary: bool,
) -> Result<u32> {
    let netns = match (&iface.handover, netns) {
        (Some(_), _) => None,
        (None, Some(ns)) => Some(ns),
        (None, None) => anyhow::bail!("an interface needs a network namespace"),
    };
    let bridge = network::ensure_bridge(nl, dp, net).await?;
    crate::timing::mark("bridge");
    let peer = iface.handover.as_deref().unwrap_or(&iface.name);
    let host = nl
        .create_veth(
            &iface.veth,
            bridge,
            peer,
            iface.mac,
            netns.map(|ns| ns.raw_fd()),
            // An overlay's containers get the underlay MTU less the encapsulation.
            net.overlay.as_ref().map(|o| o.mtu).or(net.mtu),
        )
        .await?;
    crate::timing::mark("veth");
    match attach(dp, netns, net, iface, identity, primary, host.index) {
        Ok(()) => Ok(host.index),
        Err(e) => {
            let made = Interface {
                ifindex: host.index,
                ..iface.clone()
            };
            for te in teardown_iface(nl, dp, &made).await {
                eprintln!(
                    "md-user: cleaning up {}: {}",
                    iface.veth,
                    crate::error::one_line(&te)
                );
            }
            Err(e)
        }
    }
}

/// The part of `setup` after the veth exists.
fn attach(
    dp: &Datapath,
    netns: Option<&Netns>,
    net: &Network,
    iface: &Interface,
    identity: u32,
    primary: bool,
    host_index: u32,
) -> Result<()> {
    // Map entries first, then programs, then the container's side up: the first frames a
    // container sends (IPv6 sends MLD reports as its link comes up) must meet a complete
    // datapath, not be dropped as spoofed.
    dp.reset_if_stats(host_index)?;
    crate::timing::mark("stats");
    let ep = Endpoint {
        ifindex: host_index,
        identity,
        net_id: net.id,
        ip: iface.ip.octets(),
        mac: iface.mac,
        _pad: [0; 2],
    };
    dp.veth_owners()?
        .insert(host_index, ep, 0)
        .context("writing VETH_OWNERS")?;
    dp.endpoints()?
        .insert(iface.ip.octets(), ep, 0)
        .context("writing ENDPOINTS")?;
    if let Some(ip6) = iface.ip6 {
        dp.endpoints6()?
            .insert(ip6.octets(), ep, 0)
            .context("writing ENDPOINTS6")?;
    }
    dp.attach_owned(
        &iface.veth,
        Hook::Ingress,
        md_common::maps::PROG_VETH_INGRESS,
    )?;
    dp.attach_owned(&iface.veth, Hook::Egress, md_common::maps::PROG_VETH_EGRESS)?;
    crate::timing::mark("tc");
    // An interface handed over to Docker is configured by Docker in its container.
    let Some(netns) = netns else {
        return Ok(());
    };
    crate::netlink::configure_container_side(
        netns,
        Some(crate::netlink::ContainerIface {
            name: iface.name.clone(),
            ip: iface.ip,
            prefix_len: net.subnet.prefix_len,
            ip6: iface.ip6.zip(net.subnet6.map(|s| s.prefix_len)),
        }),
        // An internal network has no way out: no default route, in either family.
        primary.then(|| crate::netlink::Gateways {
            v4: net.default_route(),
            v6: net.subnet6.filter(|_| !net.internal).map(|s| s.gateway()),
        }),
    )?;
    crate::timing::mark("container side");
    Ok(())
}

/// Publishes a container's ports: refused if a host process holds one (unless a runtime
/// attached it through CNI); kept out of the host's
/// ephemeral range (recorded and saved before the sysctl is written, so a crash leaves
/// nothing md would not give back); then PORT_MAP.
pub fn publish(dp: &Datapath, locked: &mut Locked, name: &str, identity: u32) -> Result<()> {
    let c = locked
        .state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?
        .clone();
    let Some(ip) = c.primary_ip() else {
        return Ok(());
    };
    let ip6 = c.primary_ip6();
    let routed6 = c
        .interfaces
        .first()
        .and_then(|i| locked.state.networks.get(&i.network))
        .is_some_and(|n| n.routed6);
    // A gateway or container address is not the host's to publish on: its answers would
    // leave the uplink with an md source (the datapath translates what PORT_MAP says).
    for p in c.ports.iter().filter(|p| !p.routed) {
        let Some(h) = p.host_ip else { continue };
        let inside = |n: &crate::state::Network| match h {
            std::net::IpAddr::V4(a) => n.span().contains(a),
            std::net::IpAddr::V6(a) => n.subnet6.is_some_and(|s| s.contains(a)),
        };
        if let Some((name, _)) = locked.state.networks.iter().find(|(_, n)| inside(n)) {
            anyhow::bail!(
                "port {p}: {h} is in md network {name}; publish on one of the host's own addresses"
            );
        }
    }
    // A runtime may hold its ports itself (Podman's conmon does, to reserve them).
    if c.cni.is_none() {
        hostports::check_free(&c.ports, &locked.state)?;
    }
    let add = hostports::unreserved(&c.ports)?;
    if !add.is_empty() {
        locked.state.reserved_ports.extend(&add);
        locked.save()?;
        hostports::reserve(&add)?;
    }
    let mut map = dp.port_map()?;
    for p in c.ports.iter().filter(|p| p.applies_v4()) {
        map.insert(
            port_key(p),
            PortTarget {
                ip: ip.octets(),
                port: p.container_port,
                identity,
                // A runtime's port (Podman's conmon holds it open to reserve it).
                flags: if c.cni.is_some() {
                    md_common::PORT_RUNTIME_RESERVED
                } else {
                    0
                },
                ..Default::default()
            },
            0,
        )
        .with_context(|| format!("publishing {p}"))?;
    }
    if let Some(ip6) = ip6 {
        let mut map6 = dp.port_map6()?;
        for p in c.ports.iter().filter(|p| p.applies_v6()) {
            map6.insert(
                port_key6(p, ip6, routed6),
                PortTarget6 {
                    ip: ip6.octets(),
                    port: p.container_port,
                    identity,
                    ..Default::default()
                },
                0,
            )
            .with_context(|| format!("publishing {p} over IPv6"))?;
        }
    }
    Ok(())
}

/// Removes published ports from PORT_MAP (best effort: a missing entry is fine). The host ports
/// are given back once no container publishes them (`network::containers_changed`).
/// Removes `ports` from PORT_MAP, and from PORT_MAP6 for a container whose address there is
/// `ip6`.
pub fn unpublish(dp: &Datapath, ports: &[PortMapping], ip6: Option<std::net::Ipv6Addr>) {
    if !dp.is_loaded() {
        return;
    }
    if let Ok(mut map) = dp.port_map() {
        for p in ports.iter().filter(|p| p.applies_v4()) {
            let _ = map.remove(&port_key(p));
        }
    }
    if let (Some(ip6), Ok(mut map6)) = (ip6, dp.port_map6()) {
        for p in ports.iter().filter(|p| p.applies_v6()) {
            // Both key shapes: whichever the network's mode made, only ours.
            for routed in [false, true] {
                let k = port_key6(p, ip6, routed);
                if map6.get(&k, 0).is_ok_and(|t| t.ip == ip6.octets()) {
                    let _ = map6.remove(&k);
                }
            }
        }
    }
}

pub fn port_key(p: &PortMapping) -> PortKey {
    PortKey::new(
        p.host_v4().map(|i| i.octets()).unwrap_or([0; 4]),
        p.host_port,
        p.proto.number(),
    )
}

/// Connections translated through a published port, in both families.
pub fn port_hits(
    dp: &Datapath,
    state: &crate::state::State,
    c: &Container,
    p: &PortMapping,
) -> u64 {
    let mut hits = 0;
    if p.applies_v4() {
        if let Ok(map) = dp.port_map() {
            hits += map.get(&port_key(p), 0).map(|t| t.hits).unwrap_or(0);
        }
    }
    if let (true, Some(ip6), Ok(map6)) = (p.applies_v6(), c.primary_ip6(), dp.port_map6()) {
        let routed = c
            .interfaces
            .first()
            .and_then(|i| state.networks.get(&i.network))
            .is_some_and(|n| n.routed6);
        hits += map6
            .get(&port_key6(p, ip6, routed), 0)
            .map(|t| t.hits)
            .unwrap_or(0);
    }
    hits
}

/// A mapping's PORT_MAP6 key: the host address (`::` for all) and port; on a routed network
/// the container's own address and port (reachable directly; the host part only picks the
/// family, as in Docker's routed mode).
pub fn port_key6(p: &PortMapping, container_ip6: std::net::Ipv6Addr, routed: bool) -> PortKey6 {
    if routed {
        return PortKey6::new(container_ip6.octets(), p.container_port, p.proto.number());
    }
    PortKey6::new(
        p.host_v6().map(|i| i.octets()).unwrap_or([0; 16]),
        p.host_port,
        p.proto.number(),
    )
}

/// Removes one interface: its map entries, its tracked flows, its programs and the veth.
pub async fn teardown_iface(nl: &Netlink, dp: &Datapath, iface: &Interface) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    if dp.is_loaded() {
        // The interface's index, or, when setup was killed before recording it, the indexes
        // the datapath lists for its address and MAC (still ours: the address is recorded).
        let ifindexes: Vec<u32> = if iface.ifindex != 0 {
            vec![iface.ifindex]
        } else {
            dp.veth_owners()
                .map(|m| {
                    m.iter()
                        .flatten()
                        .filter(|(_, e)| e.ip == iface.ip.octets() && e.mac == iface.mac)
                        .map(|(k, _)| k)
                        .collect()
                })
                .unwrap_or_default()
        };
        if let Ok(mut eps) = dp.endpoints() {
            // Only our entry: the address may already belong to someone else.
            if eps
                .get(&iface.ip.octets(), 0)
                .is_ok_and(|e| ifindexes.contains(&e.ifindex))
            {
                let _ = eps.remove(&iface.ip.octets());
            }
        }
        if let (Some(ip6), Ok(mut eps)) = (iface.ip6, dp.endpoints6()) {
            if eps
                .get(&ip6.octets(), 0)
                .is_ok_and(|e| ifindexes.contains(&e.ifindex))
            {
                let _ = eps.remove(&ip6.octets());
            }
        }
        for ifindex in &ifindexes {
            if let Ok(mut owners) = dp.veth_owners() {
                let _ = owners.remove(ifindex);
            }
            if let Ok(mut stats) = dp.if_stats() {
                let _ = stats.remove(ifindex);
            }
        }
        if let Err(e) = dp.purge_conntrack(iface.ip) {
            errors.push(e);
        }
        if let Some(ip6) = iface.ip6 {
            if let Err(e) = dp.purge_conntrack6(ip6) {
                errors.push(e);
            }
        }
    }
    if let Err(e) = dp.detach_tc(&iface.veth) {
        errors.push(e);
    }
    // By name: the index may have been reused since the veth went away with its namespace.
    match nl.link_by_name(&iface.veth).await {
        Ok(Some(link)) => {
            if let Err(e) = nl.delete_link(link.index).await {
                errors.push(e);
            }
        }
        Ok(None) => {}
        Err(e) => errors.push(e),
    }
    errors
}

/// Removes everything `setup`/`publish` created for a container. Keeps going on errors and
/// returns them all. Its reserved host ports are given back once it is out of the state
/// (`network::containers_changed`).
pub async fn teardown(nl: &Netlink, dp: &Datapath, c: &Container) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    unpublish(dp, &c.ports, c.primary_ip6());
    for iface in &c.interfaces {
        errors.extend(teardown_iface(nl, dp, iface).await);
    }
    errors
}
