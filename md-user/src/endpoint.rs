//! A container's interface on an md network: the veth pair, its addresses, its TC programs and
//! its map entries. Setup and teardown side by side; teardown is best effort and undoes setup
//! in reverse order (map entries, programs, link).

use anyhow::{Context, Result};
use md_common::{Endpoint, PortKey, PortTarget};

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
/// host side. Returns the host side's ifindex. On failure it removes what it made: the caller
/// does not know the ifindex yet, so it could not find the map entries keyed by it.
pub async fn setup(
    nl: &Netlink,
    dp: &Datapath,
    netns: &Netns,
    net: &Network,
    iface: &Interface,
    identity: u32,
    primary: bool,
) -> Result<u32> {
    let bridge = network::ensure_bridge(nl, dp, net).await?;
    crate::timing::mark("bridge");
    let host = nl
        .create_veth(
            &iface.veth,
            bridge,
            &iface.name,
            iface.mac,
            netns.raw_fd(),
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
    netns: &Netns,
    net: &Network,
    iface: &Interface,
    identity: u32,
    primary: bool,
    host_index: u32,
) -> Result<()> {
    crate::netlink::configure_container_side(
        netns,
        Some((iface.name.clone(), iface.ip, net.subnet.prefix_len)),
        // An internal network has no way out: no default route.
        primary.then(|| net.default_route()).flatten(),
    )?;
    crate::timing::mark("container side");
    dp.reset_if_stats(host_index)?;
    crate::timing::mark("stats");
    dp.attach_tc(
        &iface.veth,
        Hook::Ingress,
        md_common::maps::PROG_VETH_INGRESS,
        &iface.veth,
    )?;
    dp.attach_tc(
        &iface.veth,
        Hook::Egress,
        md_common::maps::PROG_VETH_EGRESS,
        &iface.veth,
    )?;
    crate::timing::mark("tc");
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
    for p in &c.ports {
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
    Ok(())
}

pub fn port_key(p: &PortMapping) -> PortKey {
    PortKey::new(
        p.host_ip.map(|i| i.octets()).unwrap_or([0; 4]),
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
    if dp.is_loaded() {
        if let Ok(mut map) = dp.port_map() {
            for p in &c.ports {
                let _ = map.remove(&port_key(p));
            }
        }
    }
    for iface in &c.interfaces {
        errors.extend(teardown_iface(nl, dp, iface).await);
    }
    errors
}
