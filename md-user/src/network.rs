//! md networks: a bridge and a subnet each, their NETWORKS entry (the datapath isolates
//! networks from each other by id), and their DNS resolver.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use md_common::Network as NetworkEntry;

use crate::{
    cli::GlobalOpts,
    datapath::Datapath,
    dns,
    ipam::{mac_for, Subnet, Subnet6},
    netlink::Netlink,
    proc,
    state::{GatewayMode, Network, State, StateDir, DEFAULT_NETWORK},
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
pub type V6 = Option<(Option<Subnet6>, bool)>;

pub fn add(
    state: &mut State,
    name: &str,
    bridge: String,
    subnet: Subnet,
    v6: V6,
) -> Result<Network> {
    add_with(
        state,
        name,
        Settings {
            subnet: Some(subnet),
            bridge: Some(bridge),
            v6,
            ..Settings::default()
        },
    )
}

/// What `network create` may set besides the name (Docker's flags and `--opt`s).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub subnet: Option<Subnet>,
    pub gateway: Option<Ipv4Addr>,
    /// Checked against the subnet once it is known.
    pub ip_range: Option<String>,
    pub mtu: Option<u32>,
    pub internal: bool,
    pub gateway_mode: GatewayMode,
    pub bridge: Option<String>,
    /// The `--opt`s as given, for `network inspect`.
    pub options: BTreeMap<String, String>,
    /// Dual-stack (`--ipv6`, `--subnet6`, `--gateway-mode-ipv6`).
    pub v6: V6,
}

/// Docker's bridge driver options md understands.
pub const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
pub const OPT_GATEWAY_MODE: &str = "com.docker.network.bridge.gateway_mode_ipv4";
/// Shown by `network inspect` for a routed IPv6 side (set with `--gateway-mode-ipv6`).
pub const OPT_GATEWAY_MODE6: &str = "com.docker.network.bridge.gateway_mode_ipv6";

impl Settings {
    /// Settings from `network create`'s flags and `--opt KEY=VALUE`s; a flag and the option
    /// that says the same must agree. Everything is checked here except what needs the state
    /// (overlaps, names taken).
    pub fn parse(
        subnet: Option<&str>,
        gateway: Option<Ipv4Addr>,
        ip_range: Option<&str>,
        mtu: Option<u32>,
        internal: bool,
        gateway_mode: Option<&str>,
        opts: &[String],
    ) -> Result<Settings> {
        let mut options = BTreeMap::new();
        for o in opts {
            let (k, v) = o
                .split_once('=')
                .with_context(|| format!("option {o:?} must be KEY=VALUE"))?;
            if options.insert(k.to_string(), v.to_string()).is_some() {
                bail!("option {k} is given twice");
            }
        }
        for k in options.keys() {
            if ![OPT_BRIDGE_NAME, OPT_MTU, OPT_GATEWAY_MODE].contains(&k.as_str()) {
                bail!(
                    "unknown option {k} (md knows {OPT_BRIDGE_NAME}, {OPT_MTU}, {OPT_GATEWAY_MODE})"
                );
            }
        }
        let agree = |flag: &str, a: Option<String>, key: &str| -> Result<Option<String>> {
            match (a, options.get(key)) {
                (Some(a), Some(b)) if a != *b => {
                    bail!("{flag} {a} and --opt {key}={b} disagree")
                }
                (a, b) => Ok(a.or_else(|| b.cloned())),
            }
        };
        let mtu = agree("--mtu", mtu.map(|m| m.to_string()), OPT_MTU)?
            .map(|m| {
                m.parse::<u32>()
                    .ok()
                    .filter(|m| (68..=65535).contains(m))
                    .with_context(|| format!("MTU {m:?} must be a number from 68 to 65535"))
            })
            .transpose()?;
        let gateway_mode: GatewayMode = agree(
            "--gateway-mode",
            gateway_mode.map(str::to_string),
            OPT_GATEWAY_MODE,
        )?
        .as_deref()
        .map(str::parse)
        .transpose()?
        .unwrap_or_default();
        match gateway_mode {
            GatewayMode::Isolated if !internal => {
                bail!("gateway mode isolated needs --internal (as in Docker)")
            }
            GatewayMode::Routed if internal => {
                bail!("an --internal network has no way out to route: gateway mode routed does not apply")
            }
            _ => {}
        }
        let bridge = options.get(OPT_BRIDGE_NAME).cloned();
        if let Some(b) = &bridge {
            validate_bridge_name(b)?;
        }
        let subnet = subnet.map(str::parse::<Subnet>).transpose()?;
        if subnet.is_none() && (gateway.is_some() || ip_range.is_some()) {
            bail!("--gateway and --ip-range need --subnet");
        }
        if let (Some(s), Some(gw)) = (&subnet, gateway) {
            s.check_gateway(gw)?;
        }
        if let (Some(s), Some(r)) = (&subnet, ip_range) {
            s.parse_range(r)?;
        }
        Ok(Settings {
            subnet,
            gateway,
            ip_range: ip_range.map(str::to_string),
            mtu,
            internal,
            gateway_mode,
            bridge,
            options,
            v6: None,
        })
    }
}

/// A bridge name of the user's (`--opt com.docker.network.bridge.name`): a valid interface
/// name that is none of md's container veths (`md` + 8 hex digits).
pub fn validate_bridge_name(b: &str) -> Result<()> {
    let ok = !b.is_empty()
        && b.len() < 16
        && b != "."
        && b != ".."
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if !ok {
        bail!("invalid bridge name {b:?}: up to 15 letters, digits, '_', '-', '.'");
    }
    if crate::host::is_md_veth_name(b) {
        bail!("bridge name {b} looks like one of md's container veths (md + 8 hex digits)");
    }
    Ok(())
}

fn add_with(state: &mut State, name: &str, set: Settings) -> Result<Network> {
    let subnet = set.subnet.context("a network needs a subnet")?;
    let bridge = set.bridge.context("a network needs a bridge")?;
    for (other, net) in &state.networks {
        // An overlay takes its whole subnet on every host, not just this host's block.
        let taken = net.span();
        if taken.overlaps(&subnet) {
            bail!("subnet {subnet} overlaps network {other} ({taken})");
        }
        if net.bridge == bridge {
            bail!("bridge {bridge} is already used by network {other}");
        }
    }
    // A pool md's IPAM driver gave Docker is taken, except by the network made for it.
    if let Some(pool) = state
        .docker
        .pools
        .values()
        .find(|p| p.overlaps(&subnet) && **p != subnet)
    {
        bail!("subnet {subnet} overlaps {pool}, a pool md's IPAM driver gave Docker");
    }
    let taken: Vec<Subnet6> = state.networks.values().filter_map(|n| n.subnet6).collect();
    let (subnet6, routed6) = match set.v6 {
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
    let ip_range = set
        .ip_range
        .as_deref()
        .map(|r| subnet.parse_range(r))
        .transpose()?;
    if let Some(gw) = set.gateway {
        subnet.check_gateway(gw)?;
    }
    state.next_network_id = state.next_network_id.max(1);
    let id = state.next_network_id;
    state.next_network_id += 1;
    let uid = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        crate::attach::random_u64(),
        crate::attach::random_u64(),
        crate::attach::random_u64(),
        crate::attach::random_u64()
    );
    let net = Network {
        id,
        bridge,
        subnet,
        subnet6,
        routed6,
        dns_pid: 0,
        dns_start: 0,
        overlay: None,
        gateway: set.gateway,
        ip_range,
        mtu: set.mtu,
        internal: set.internal,
        gateway_mode: set.gateway_mode,
        options: set.options,
        uid,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    };
    state.networks.insert(name.to_string(), net.clone());
    Ok(net)
}

/// A user-defined network, with the first free 172.19-31.0.0/16 when no subnet is given.
pub fn create(state: &mut State, name: &str, subnet: Option<Subnet>, v6: V6) -> Result<Network> {
    create_with(
        state,
        name,
        Settings {
            subnet,
            v6,
            ..Settings::default()
        },
    )
}

/// [`create`] with Docker's settings (`network create` flags and options).
pub fn create_with(state: &mut State, name: &str, mut set: Settings) -> Result<Network> {
    if state.networks.contains_key(name)
        || matches!(name, "none" | "host")
        || name.starts_with("container:")
    {
        bail!("network {name} already exists");
    }
    if set.subnet.is_none() {
        set.subnet = Some(
            (19..=31)
                .map(|b| Subnet::new(std::net::Ipv4Addr::new(172, b, 0, 0), 16).expect("valid"))
                .find(|s| {
                    !state.networks.values().any(|n| n.span().overlaps(s))
                        && !state.docker.pools.values().any(|p| p.overlaps(s))
                })
                .context("no free 172.19-31.0.0/16 subnet left; pass --subnet")?,
        );
    }
    if set.bridge.is_none() {
        set.bridge = Some(next_bridge_name(state));
    }
    add_with(state, name, set)
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

/// Bridge names are short (IFNAMSIZ) and never clash with md's veths (md + 8 hex): the first
/// mdnN no network uses (a user may have named a bridge so).
pub fn next_bridge_name(state: &State) -> String {
    let taken = |b: &str| state.networks.values().any(|n| n.bridge == b);
    (state.next_network_id.max(1)..)
        .map(|i| format!("mdn{i}"))
        .find(|b| !taken(b))
        .expect("a free name")
}

/// Creates the network's bridge if needed and publishes it to the datapath.
pub async fn ensure_bridge(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<u32> {
    let gw = net.gateway();
    let mac = mac_for(gw);
    let link = nl
        .ensure_bridge(
            &net.bridge,
            net.has_gateway().then_some((gw, net.subnet.prefix_len)),
            mac,
            net.mtu,
        )
        .await?;
    if let Some(s6) = net.subnet6 {
        // No DAD on md's addresses (the gateway answers at once) and no router
        // advertisements taken from containers (CVE-2020-13401); the host forwards IPv6.
        let conf = format!("/proc/sys/net/ipv6/conf/{}", net.bridge);
        crate::netns::write_sysctl(&format!("{conf}/disable_ipv6"), "0")?;
        crate::netns::write_sysctl(&format!("{conf}/accept_dad"), "0")?;
        crate::netns::write_sysctl(&format!("{conf}/accept_ra"), "0")?;
        // An isolated network's bridge has no address in either family.
        if net.has_gateway() {
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
        }
        crate::host::ipv6_forwarding()?;
    }
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
                gateway6: net
                    .subnet6
                    .map(|s| s.gateway().octets())
                    .unwrap_or_default(),
                flags: net.datapath_flags(),
            },
            0,
        )
        .context("writing NETWORKS")?;
    dp.add_subnet(net.subnet.network, net.subnet.prefix_len, net.id)?;
    if let Some(s6) = net.subnet6 {
        dp.add_subnet6(s6.network, s6.prefix_len, net.id)?;
    }
    // An overlay's whole subnet too (issue 17).
    let span = net.span();
    dp.add_subnet(span.network, span.prefix_len, net.id)?;
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
    if !net.has_gateway() {
        // An isolated network: the host has no address on it to listen on. Names come from
        // the containers' hosts files.
        return Ok(());
    }
    let listen = format!("{}:53", net.gateway());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(opts: &[&str]) -> Result<Settings> {
        let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        Settings::parse(None, None, None, None, false, None, &opts)
    }

    #[test]
    fn docker_options_and_flags() {
        let s = parse(&[
            "com.docker.network.bridge.name=br-web",
            "com.docker.network.driver.mtu=1450",
            "com.docker.network.bridge.gateway_mode_ipv4=routed",
        ])
        .unwrap();
        assert_eq!(s.bridge.as_deref(), Some("br-web"));
        assert_eq!(s.mtu, Some(1450));
        assert_eq!(s.gateway_mode, GatewayMode::Routed);
        assert_eq!(s.options.len(), 3);
        // Flag and option agree, or it is an error.
        let o = vec!["com.docker.network.driver.mtu=1450".to_string()];
        assert!(Settings::parse(None, None, None, Some(1450), false, None, &o).is_ok());
        assert!(Settings::parse(None, None, None, Some(1400), false, None, &o).is_err());
        let s = Settings::parse(
            Some("10.7.0.0/24"),
            Some("10.7.0.254".parse().unwrap()),
            Some("10.7.0.128/25"),
            Some(9000),
            true,
            Some("isolated"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (s.mtu, s.internal, s.gateway_mode),
            (Some(9000), true, GatewayMode::Isolated)
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            &["com.docker.network.bridge.enable_icc=false"][..],
            &["nokey"],
            &["com.docker.network.driver.mtu=67"],
            &["com.docker.network.driver.mtu=65536"],
            &["com.docker.network.driver.mtu=x"],
            &["com.docker.network.bridge.name=a-name-far-too-long"],
            &["com.docker.network.bridge.name=md0123abcd"],
            &["com.docker.network.bridge.name=br/0"],
            &["com.docker.network.bridge.gateway_mode_ipv4=nat-unprotected"],
            &["com.docker.network.bridge.gateway_mode_ipv4=isolated"],
            &[
                "com.docker.network.driver.mtu=1400",
                "com.docker.network.driver.mtu=1400",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let gw = Some("10.7.0.1".parse().unwrap());
        assert!(Settings::parse(None, gw, None, None, false, None, &[]).is_err());
        assert!(Settings::parse(None, None, Some("10.7.0.0/25"), None, false, None, &[]).is_err());
        let out = Some("10.8.0.1".parse().unwrap());
        assert!(Settings::parse(Some("10.7.0.0/24"), out, None, None, false, None, &[]).is_err());
        assert!(Settings::parse(
            Some("10.7.0.0/24"),
            None,
            Some("10.8.0.0/25"),
            None,
            false,
            None,
            &[]
        )
        .is_err());
        assert!(Settings::parse(None, None, None, None, true, Some("routed"), &[]).is_err());
    }

    #[test]
    fn networks_get_their_settings_and_free_bridge_names() {
        let mut state = State::default();
        let set = Settings {
            bridge: Some("mdn1".into()),
            subnet: Some("10.7.0.0/24".parse().unwrap()),
            gateway: Some("10.7.0.254".parse().unwrap()),
            ip_range: Some("10.7.0.128/25".into()),
            mtu: Some(1400),
            internal: true,
            ..Settings::default()
        };
        let a = create_with(&mut state, "a", set).unwrap();
        assert_eq!(a.gateway().to_string(), "10.7.0.254");
        assert_eq!(a.ip_range.unwrap().to_string(), "10.7.0.128/25");
        assert_eq!(a.default_route(), None, "internal: no way out");
        assert_eq!(a.datapath_flags(), md_common::NET_INTERNAL);
        assert_eq!(a.docker_id().len(), 64);
        // The next network's bridge skips the name the user took.
        let b = create(&mut state, "b", None, None).unwrap();
        assert_eq!(b.bridge, "mdn2");
        assert_eq!(b.default_route(), Some(b.subnet.gateway()));
        let c = create_with(
            &mut state,
            "c",
            Settings {
                gateway_mode: GatewayMode::Routed,
                ..Settings::default()
            },
        )
        .unwrap();
        assert_eq!(c.datapath_flags(), md_common::NET_ROUTED4);
        // Each family's gateway mode is its own flag; internal holds for both.
        let v6 = |internal| Settings {
            internal,
            v6: Some((None, true)),
            ..Settings::default()
        };
        let d = create_with(&mut state, "v6", v6(false)).unwrap();
        assert_eq!(
            d.datapath_flags(),
            md_common::NET_IPV6 | md_common::NET_ROUTED6
        );
        let i = create_with(&mut state, "v6i", v6(true)).unwrap();
        assert_eq!(
            i.datapath_flags(),
            md_common::NET_IPV6 | md_common::NET_INTERNAL
        );
        for n in ["v6", "v6i"] {
            state.networks.remove(n);
        }
        // A bridge name another network has, a subnet that overlaps: refused.
        let dup = Settings {
            bridge: Some("mdn1".into()),
            ..Settings::default()
        };
        assert!(create_with(&mut state, "d", dup).is_err());
        let overlap = Settings {
            subnet: Some("10.7.0.0/16".parse().unwrap()),
            ..Settings::default()
        };
        assert!(create_with(&mut state, "e", overlap).is_err());
        assert_eq!(state.networks.len(), 3);
    }
}
