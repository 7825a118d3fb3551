//! The host namespace side: forwarding, the datapath on the uplink and at the cgroup root.
//! Set up on first use, torn down by `down`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use md_common::Config;

use crate::{
    cli::GlobalOpts,
    datapath::{Datapath, Hook},
    netlink::Netlink,
    netns,
    state::{DatapathState, State},
};

/// Pin name of the uplink's TC links.
pub const UPLINK_PIN: &str = "uplink";

/// Loads and attaches the datapath if it is not, and refreshes what it knows about the host.
pub async fn ensure_datapath(
    nl: &Netlink,
    dp: &Datapath,
    state: &mut State,
    opts: &GlobalOpts,
) -> Result<()> {
    let digest = crate::datapath::object_digest()?;
    let cookie = netns::current_netns_cookie()?;
    if let Some(d) = &state.datapath {
        if d.netns_cookie != cookie && dp.is_loaded() {
            bail!(
                "md's datapath in {} belongs to another network namespace; run md-user there (or `md-user down` there first)",
                dp.pin_dir.display()
            );
        }
    }
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
    set_host_addrs(dp, &addrs)?;
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

/// Tells the datapath the host's addresses (published ports answer on them). Never loopback:
/// a packet from the wire to 127.0.0.1 must not reach a port published on 127.0.0.1.
pub async fn refresh_host_addrs(nl: &Netlink, dp: &Datapath) -> Result<()> {
    set_host_addrs(dp, &nl.ipv4_addresses().await?)
}

fn set_host_addrs(dp: &Datapath, addrs: &[(u32, Ipv4Addr, u8)]) -> Result<()> {
    let ips: Vec<Ipv4Addr> = addrs
        .iter()
        .map(|(_, ip, _)| *ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    dp.set_host_addrs(&ips)
}

/// Removes the whole datapath (the networks go first: `network::remove_all`). Best effort;
/// idempotent.
pub fn teardown(dp: &Datapath, state: &mut State) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    if let Err(e) = dp.detach_tc(UPLINK_PIN) {
        errors.push(e);
    }
    if let Err(e) = dp.unload() {
        errors.push(e);
    }
    state.datapath = None;
    errors
}
