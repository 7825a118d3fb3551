//! The host namespace side: networks (bridges), forwarding, the datapath on the uplink and at
//! the cgroup root. Set up on first use, torn down by `down`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use md_common::{Config, Network as NetworkEntry};

use crate::{
    cli::GlobalOpts,
    datapath::{Datapath, Hook},
    ipam::{mac_for, Subnet},
    netlink::Netlink,
    netns,
    state::{DatapathState, Network, State, DEFAULT_NETWORK},
};

/// Pin name of the uplink's TC links.
const UPLINK_PIN: &str = "uplink";

/// Makes sure the default network exists in the state with the configured bridge and subnet.
pub fn ensure_default_network(state: &mut State, opts: &GlobalOpts) -> Result<()> {
    let subnet: Subnet = opts.subnet.parse()?;
    if let Some(net) = state.networks.get(DEFAULT_NETWORK) {
        if net.subnet == subnet && net.bridge == opts.bridge {
            return Ok(());
        }
        if state.containers.is_empty() {
            state.networks.remove(DEFAULT_NETWORK);
        } else {
            bail!(
                "the default network is {} on {}; run `md-user down` before changing --bridge or --subnet",
                net.subnet,
                net.bridge
            );
        }
    }
    for (name, net) in &state.networks {
        if net.subnet.overlaps(&subnet) {
            bail!("subnet {subnet} overlaps network {name} ({})", net.subnet);
        }
    }
    let id = next_network_id(state);
    state.networks.insert(
        DEFAULT_NETWORK.to_string(),
        Network {
            id,
            bridge: opts.bridge.clone(),
            subnet,
        },
    );
    Ok(())
}

fn next_network_id(state: &mut State) -> u32 {
    state.next_network_id = state.next_network_id.max(1);
    let id = state.next_network_id;
    state.next_network_id += 1;
    id
}

/// Creates the network's bridge if needed and publishes it to the datapath.
pub async fn ensure_bridge(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<u32> {
    let gw = net.subnet.gateway();
    let mac = mac_for(gw);
    let link = nl
        .ensure_bridge(&net.bridge, gw, net.subnet.prefix_len, mac)
        .await?;
    let mut networks = dp.networks()?;
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
            },
            0,
        )
        .context("writing NETWORKS")?;
    Ok(link.index)
}

/// Loads and attaches the datapath if it is not, and refreshes what it knows about the host.
pub async fn ensure_datapath(
    nl: &Netlink,
    dp: &Datapath,
    state: &mut State,
    opts: &GlobalOpts,
) -> Result<()> {
    let digest = crate::datapath::object_digest()?;
    if let Some(d) = &state.datapath {
        if d.object_digest != digest && dp.is_loaded() {
            if !state.containers.is_empty() {
                bail!("the loaded datapath comes from another md build; stop the containers or run `md-user down` first");
            }
            dp.unload()?;
            state.datapath = None;
        }
    }
    let uplink = match &opts.uplink {
        Some(name) => nl
            .link_by_name(name)
            .await?
            .with_context(|| format!("uplink {name} does not exist"))?,
        None => {
            let idx = nl.default_route_link().await?.context(
                "no uplink: this namespace has no IPv4 default route; pass --uplink IFACE",
            )?;
            nl.link_by_index(idx)
                .await?
                .context("the default route's interface vanished")?
        }
    };
    if let Some(d) = &state.datapath {
        if d.uplink != uplink.name && dp.is_loaded() {
            bail!(
                "md's datapath is attached to uplink {}; run `md-user down` before using {}",
                d.uplink,
                uplink.name
            );
        }
    }
    let addrs = nl.ipv4_addresses().await?;
    let uplink_ip = addrs
        .iter()
        .find(|(idx, _, _)| *idx == uplink.index)
        .map(|(_, ip, _)| *ip)
        .with_context(|| format!("uplink {} has no IPv4 address", uplink.name))?;

    let fresh = !dp.is_loaded();
    if fresh {
        dp.load()?;
    }
    // Forwarding between the bridge and the uplink; written through procfs in this namespace.
    netns::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    dp.attach_tc(
        &uplink.name,
        Hook::Ingress,
        md_common::maps::PROG_UPLINK_INGRESS,
        UPLINK_PIN,
    )?;
    dp.attach_tc(
        &uplink.name,
        Hook::Egress,
        md_common::maps::PROG_UPLINK_EGRESS,
        UPLINK_PIN,
    )?;
    let cookie = netns::current_netns_cookie()?;
    let mut cfg = if fresh {
        Config::defaults()
    } else {
        dp.config()?
    };
    cfg.host_netns_cookie = cookie;
    cfg.uplink_ifindex = uplink.index;
    cfg.uplink_ip = uplink_ip.octets();
    cfg.policy_default = state.policy.default.map_value();
    dp.set_config(&cfg)?;
    if fresh {
        crate::policy::sync(dp, state)?;
    }
    dp.attach_cgroup()?;
    // Never loopback: a packet from the wire to 127.0.0.1 must not reach a published port.
    let host_ips: Vec<Ipv4Addr> = addrs
        .iter()
        .map(|(_, ip, _)| *ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    dp.set_host_addrs(&host_ips)?;
    if fresh {
        dp.reset_if_stats(uplink.index)?;
    }
    state.datapath = Some(DatapathState {
        uplink: uplink.name.clone(),
        uplink_ifindex: uplink.index,
        uplink_ip,
        netns_cookie: cookie,
        object_digest: digest,
    });
    Ok(())
}

/// Removes every bridge md created and the whole datapath. Best effort; idempotent.
pub async fn teardown(nl: &Netlink, dp: &Datapath, state: &mut State) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    for net in state.networks.values() {
        match nl.link_by_name(&net.bridge).await {
            Ok(Some(link)) if link.kind.as_deref() == Some("bridge") => {
                if let Err(e) = nl.delete_link(link.index).await {
                    errors.push(e);
                }
            }
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = dp.detach_tc(UPLINK_PIN) {
        errors.push(e);
    }
    if let Err(e) = dp.unload() {
        errors.push(e);
    }
    state.networks.clear();
    state.datapath = None;
    errors
}
