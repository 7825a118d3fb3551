//! The core every front end calls: attach a network namespace to an md network (its interface,
//! address, published ports, names and policy identity), detach it, and reclaim what a dead
//! owner left behind. `md-user run` and the CNI plugin are thin translations of their own
//! protocol onto these calls (netavark's commands and its network-driver trait are the model).
//!
//! Every call runs under the state lock. A container is recorded (status `Creating`, owned by
//! the calling process) before anything exists for it, so a crash at any point leaves a record
//! that the next command's [`reconcile`] tears down.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use crate::{
    cli::GlobalOpts,
    datapath::{Datapath, Hook},
    dns, endpoint,
    error::one_line,
    host,
    ipam::mac_for,
    netlink::{Link, Netlink},
    netns::Netns,
    network, proc,
    state::{CniOwner, Container, DockerOwner, Interface, Locked, State, StateDir, Status},
};

/// What every front end works with: its options, the state directory and the datapath.
pub struct Ctx {
    pub opts: GlobalOpts,
    pub state_dir: StateDir,
    pub dp: Datapath,
}

impl Ctx {
    pub fn new(opts: GlobalOpts) -> Ctx {
        Ctx {
            state_dir: StateDir::new(&opts.state_dir),
            dp: Datapath::new(&opts.pin_dir),
            opts,
        }
    }
}

/// A container as a front end describes it. The core allocates what is left open (address,
/// MAC, host-side veth, id, policy identity).
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub hostname: String,
    /// Network mode in `run --network` words: a network name, `none`, `host`, `container:NAME`.
    pub mode: String,
    /// The interface on an md network, for modes that have one.
    pub iface: Option<IfaceSpec>,
    pub ports: Vec<crate::portmap::PortMapping>,
    pub cmd: Vec<String>,
    pub detached: bool,
    /// The runtime that attached it through the CNI plugin, if one did.
    pub cni: Option<CniOwner>,
    /// `run --privileged`.
    pub privileged: bool,
    /// Docker's sandbox and endpoints, when Docker attached it (`md-user docker-plugin`).
    pub docker: Option<DockerOwner>,
    /// `--dns`, `--dns-search`, `--dns-option` (the rest of resolv.conf comes from the host's).
    pub dns: dns::DnsRequest,
    /// `--add-host NAME:IP` (or `NAME:host-gateway`).
    pub extra_hosts: Vec<(String, dns::HostAddr)>,
    /// `--expose`d ports (already published when `-P` asked for it).
    pub exposed: Vec<(u16, crate::portmap::Proto)>,
}

/// One interface on an md network.
#[derive(Debug, Clone)]
pub struct IfaceSpec {
    pub network: String,
    /// A static address (checked against the subnet and the addresses in use).
    pub ip: Option<Ipv4Addr>,
    /// A static IPv6 address on a dual-stack network.
    pub ip6: Option<Ipv6Addr>,
    /// A static MAC; by default derived from the address.
    pub mac: Option<[u8; 6]>,
    /// Name inside the namespace (eth0, ...).
    pub name: String,
    /// `ip` was reserved for this interface beforehand (by md's IPAM driver for Docker, or by
    /// Docker's own): only addresses on interfaces count as taken.
    pub reserved: bool,
    /// Leave the container end in md's host namespace, unconfigured, for the runtime to move
    /// into its sandbox (Docker does); no network namespace is needed then.
    pub handover: bool,
    /// Names it answers to on this network besides its own (`--network-alias`, `--alias`).
    pub aliases: Vec<String>,
}

/// Takes the state lock and reconciles (saving when something was reclaimed).
pub async fn lock(ctx: &Ctx, nl: &Netlink) -> Result<Locked> {
    lock_reclaiming(ctx, nl, |_| true).await
}

/// [`lock`], reclaiming only the dead containers `concerns` picks (those in the way of what
/// the command is about to do): a look at every container's owner costs milliseconds per
/// thousand, which `run` spends after its container is up ([`settle`]).
pub async fn lock_reclaiming(
    ctx: &Ctx,
    nl: &Netlink,
    concerns: impl Fn(&Container) -> bool,
) -> Result<Locked> {
    crate::timing::mark("start");
    let mut locked = ctx.state_dir.lock()?;
    crate::timing::mark("locked");
    if !reconcile_some(ctx, nl, &mut locked.state, concerns)
        .await
        .is_empty()
    {
        locked.save()?;
    }
    crate::timing::mark("reconciled");
    Ok(locked)
}

/// What [`create_quietly`] left for later: the hosts files of the new container's peers, and
/// the containers whose owners died (whatever [`lock_reclaiming`] did not look at).
pub async fn settle(ctx: &Ctx, nl: &Netlink, locked: &mut Locked, name: &str) -> Result<()> {
    dns::added_to_peers(&ctx.state_dir, &locked.state, name)?;
    if !reconcile(ctx, nl, &mut locked.state).await.is_empty() {
        locked.save()?;
    }
    Ok(())
}

/// Validates a spec and records the container (status `Creating`, owned by this process) with
/// its address allocated and the datapath loaded. Fails without recording anything.
pub async fn reserve(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    spec: Spec,
) -> Result<Container> {
    let state = &mut locked.state;
    let name = spec.name.as_str();
    if state.containers.contains_key(name) {
        bail!("container name {name} is already in use");
    }
    network::ensure_default(state, &ctx.opts)?;
    let mut ports = spec.ports.clone();
    let iface = spec
        .iface
        .as_ref()
        .map(|want| allocate(state, want, &new_veth_name()))
        .transpose()?;
    let net = iface.as_ref().map(|i| state.networks[&i.network].clone());
    if let (Some(net), Some(iface)) = (&net, &iface) {
        if net.internal && !ports.is_empty() {
            bail!(
                "network {} is internal: it publishes no ports",
                iface.network
            );
        }
        // A mapping for both families publishes only IPv4 on an IPv4-only network.
        let ipv6 = net.subnet6.is_some();
        crate::portmap::check_families(&ports, &iface.network, ipv6)?;
        ports = crate::portmap::for_network(&ports, ipv6);
        if net.routed() {
            // Docker's routed mode: the container's own address and port, no host port (for
            // IPv4; the IPv6 side keeps its own mode).
            ports = crate::portmap::routed4(&ports, iface.ip);
        }
    }
    let nat_min = if ctx.dp.is_loaded() {
        ctx.dp.config().map(|c| c.nat_port_min)
    } else {
        Ok(md_common::Config::defaults().nat_port_min)
    }?;
    crate::hostports::pick_random(
        &mut ports,
        |p| {
            state
                .containers
                .values()
                .any(|c| c.ports.iter().any(|q| q.conflicts_with(p)))
        },
        nat_min,
    )?;
    check_ports(state, name, &ports)?;
    // A runtime may hold its ports itself (Podman's conmon does, to reserve them).
    if spec.cni.is_none() {
        crate::hostports::check_free(&ports, state)?;
    }
    let extra_hosts = dns::resolve_extra_hosts(&spec.extra_hosts, net.as_ref())?;
    let dns_settings = if spec.iface.is_some() && spec.cni.is_none() {
        spec.dns.settings(&ctx.opts.resolv_conf)
    } else {
        Default::default()
    };
    let mut interfaces = Vec::new();
    if let Some(iface) = iface {
        host::ensure_datapath(nl, &ctx.dp, state, &ctx.opts).await?;
        crate::timing::mark("datapath");
        interfaces.push(iface);
    }
    let id = format!("{:012x}", random_u64() & 0xffff_ffff_ffff);
    let (supervisor_pid, supervisor_start) = proc::self_identity();
    let container = Container {
        name: name.to_string(),
        id,
        hostname: spec.hostname,
        mode: spec.mode,
        interfaces,
        ports,
        cmd: spec.cmd,
        pid: 0,
        pid_start: 0,
        supervisor_pid,
        supervisor_start,
        status: Status::Creating,
        detached: spec.detached,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        aliases: Vec::new(),
        cni: spec.cni,
        privileged: spec.privileged,
        docker: spec.docker,
        dns: dns_settings,
        extra_hosts,
        exposed: spec.exposed,
    };
    // Issue 17: on an overlay network, the identity comes from the store and the name is
    // registered there (free on every host).
    crate::overlay::register(ctx, nl, state, &container).await?;
    state.identity_for(name)?;
    // Recorded before anything exists, so a crash mid-setup is reclaimed by the next command.
    state.containers.insert(name.to_string(), container.clone());
    locked.save()?;
    Ok(container)
}

/// Refuses ports another container already publishes.
pub fn check_ports(state: &State, name: &str, ports: &[crate::portmap::PortMapping]) -> Result<()> {
    for c in state.containers.values().filter(|c| c.name != name) {
        for p in ports {
            if let Some(q) = c.ports.iter().find(|q| q.conflicts_with(p)) {
                bail!(
                    "port {p} is already published by container {} ({q})",
                    c.name
                );
            }
        }
    }
    Ok(())
}

/// An interface on `want.network` with its address (static or the lowest free one).
fn allocate(state: &State, want: &IfaceSpec, veth: &str) -> Result<Interface> {
    let net = state
        .networks
        .get(&want.network)
        .with_context(|| format!("no such network: {}", want.network))?;
    let used = if want.reserved {
        state.interface_ips(&want.network)
    } else {
        state.used_ips(&want.network)
    };
    let gw = net.gateway();
    let ip = match want.ip {
        Some(ip) => {
            net.subnet.check_static_with(ip, gw, &used)?;
            ip
        }
        None => net.subnet.allocate_in(net.ip_range.as_ref(), gw, &used)?,
    };
    let macs: HashSet<[u8; 6]> = state
        .containers
        .values()
        .flat_map(|c| c.interfaces.iter())
        .filter(|i| i.network == want.network)
        .map(|i| i.mac)
        .chain([mac_for(gw)])
        .collect();
    let mac = match want.mac {
        Some(m) if macs.contains(&m) => bail!(
            "MAC address {} is already in use on network {}",
            crate::ipam::format_mac(&m),
            want.network
        ),
        Some(m) => m,
        // Derived from the address, unless a static MAC took that one: then a random one.
        None => std::iter::once(mac_for(ip))
            .chain(std::iter::repeat_with(|| {
                let r = random_u64().to_ne_bytes();
                [0x02, r[0], r[1], r[2], r[3], r[4]]
            }))
            .find(|m| !macs.contains(m))
            .expect("an unused MAC"),
    };
    let ip6 = network::allocate6(state, net, &want.network, want.ip6)?;
    Ok(Interface {
        network: want.network.clone(),
        ip,
        ip6,
        mac,
        veth: veth.to_string(),
        ifindex: 0,
        name: want.name.clone(),
        handover: want.handover.then(|| {
            std::iter::repeat_with(new_veth_name)
                .find(|n| n != veth)
                .expect("an endless supply of names")
        }),
        aliases: want.aliases.clone(),
    })
}

/// Host-side veth names: `md` + 8 hex digits (never a bridge name, which is `md0` or `mdnN`).
fn new_veth_name() -> String {
    format!("md{:08x}", random_u64() as u32)
}

/// Attaches a reserved container's primary interface inside `netns` (or hands it over, see
/// [`IfaceSpec::handover`]) and publishes it: veth, address and route, programs, map entries,
/// ports, the network's resolver, hosts files. On error the caller [`discard`]s the container.
pub async fn attach(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    name: &str,
    netns: Option<&Netns>,
) -> Result<()> {
    let c = locked
        .state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?
        .clone();
    let Some(iface) = c.interfaces.first() else {
        return Ok(());
    };
    let identity = locked.state.identity_for(name)?;
    let net = locked.state.networks[&iface.network].clone();
    let ifindex = endpoint::setup(nl, &ctx.dp, netns, &net, iface, identity, true).await?;
    crate::timing::mark("endpoint");
    if let Some(c) = locked.state.containers.get_mut(name) {
        c.interfaces[0].ifindex = ifindex;
    }
    locked.save()?;
    endpoint::publish(&ctx.dp, locked, name, identity)?;
    crate::timing::mark("published");
    network::ensure_resolver(&ctx.opts, &mut locked.state, &iface.network)?;
    crate::timing::mark("resolver");
    Ok(())
}

/// [`reserve`] and [`attach`] (when the mode has an interface), then the hosts files of every
/// container that now sees this one. On failure nothing is left, not even the record.
pub async fn create(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    spec: Spec,
    netns: Option<&Netns>,
) -> Result<Container> {
    let name = spec.name.clone();
    let c = create_quietly(ctx, nl, locked, spec, netns).await?;
    if let Err(e) = dns::added_to_peers(&ctx.state_dir, &locked.state, &name) {
        discard(ctx, nl, locked, &name).await?;
        return Err(e);
    }
    Ok(c)
}

/// [`create`] up to the container's own hosts files: its peers learn of it in [`settle`].
pub async fn create_quietly(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    spec: Spec,
    netns: Option<&Netns>,
) -> Result<Container> {
    let name = spec.name.clone();
    let has_iface = spec.iface.is_some();
    reserve(ctx, nl, locked, spec).await?;
    let attached = async {
        if has_iface {
            attach(ctx, nl, locked, &name, netns).await?;
        }
        let names = dns::added_self(&ctx.state_dir, &locked.state, &name);
        crate::timing::mark("names");
        names
    }
    .await;
    match attached {
        Ok(()) => Ok(locked.state.containers[&name].clone()),
        Err(e) => {
            discard(ctx, nl, locked, &name).await?;
            Err(e)
        }
    }
}

/// Forgets a container and removes everything made for it; saves the state.
pub async fn discard(ctx: &Ctx, nl: &Netlink, locked: &mut Locked, name: &str) -> Result<()> {
    if let Some(c) = locked.state.containers.remove(name) {
        detach(ctx, nl, &mut locked.state, &c).await;
    }
    locked.save()
}

/// Undoes a container (already taken out of the state): its network, its files, and what its
/// going changes for the others (hosts files, an idle resolver). Best effort: errors are
/// reported and the rest goes on.
pub async fn detach(ctx: &Ctx, nl: &Netlink, state: &mut State, c: &Container) {
    for e in endpoint::teardown(nl, &ctx.dp, c).await {
        eprintln!("md-user: tearing down {}: {}", c.name, one_line(&e));
    }
    dns::remove_files(&ctx.state_dir, &c.name);
    crate::overlay::unregister(state, c).await;
    if let Err(e) = state.prune_identity(&c.name) {
        eprintln!(
            "md-user: forgetting {}'s identity: {}",
            c.name,
            one_line(&e)
        );
    }
    network::containers_changed(&ctx.state_dir, state);
}

/// Gives a running container one more interface, on `network`, inside `netns` (`network
/// connect`). The interface is recorded as soon as it exists.
pub async fn add_interface(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    name: &str,
    want: IfaceSpec,
    netns: Option<&Netns>,
) -> Result<Interface> {
    let state = &mut locked.state;
    let c = state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?
        .clone();
    if c.on_network(&want.network) {
        bail!("container {name} is already on network {}", want.network);
    }
    let mut iface = allocate(state, &want, &new_veth_name())?;
    host::ensure_datapath(nl, &ctx.dp, state, &ctx.opts).await?;
    let net = state.networks[&want.network].clone();
    let identity = state.identity_for(name)?;
    // Without an interface yet the container has no default route: this one gets it.
    let primary = c.interfaces.is_empty();
    match endpoint::setup(nl, &ctx.dp, netns, &net, &iface, identity, primary).await {
        Ok(ifindex) => iface.ifindex = ifindex,
        Err(e) => {
            for te in endpoint::teardown_iface(nl, &ctx.dp, &iface).await {
                eprintln!("md-user: cleaning up: {}", one_line(&te));
            }
            return Err(e);
        }
    }
    state
        .containers
        .get_mut(name)
        .expect("checked")
        .interfaces
        .push(iface.clone());
    // Recorded first: whatever fails next, the interface is known and torn down later.
    locked.save()?;
    let state = &mut locked.state;
    network::containers_changed(&ctx.state_dir, state);
    network::ensure_resolver(&ctx.opts, state, &want.network)?;
    Ok(iface)
}

/// Removes a container's interface on `network` (`network disconnect`).
pub async fn remove_interface(
    ctx: &Ctx,
    nl: &Netlink,
    state: &mut State,
    name: &str,
    network: &str,
) -> Result<()> {
    let c = state
        .containers
        .get_mut(name)
        .with_context(|| format!("no such container: {name}"))?;
    let Some(pos) = c.interfaces.iter().position(|i| i.network == network) else {
        bail!("container {name} is not on network {network}");
    };
    if pos == 0 && !c.ports.is_empty() {
        bail!("container {name} publishes its ports on network {network}; stop it instead");
    }
    let iface = c.interfaces.remove(pos);
    for e in endpoint::teardown_iface(nl, &ctx.dp, &iface).await {
        eprintln!("md-user: disconnecting: {}", one_line(&e));
    }
    network::containers_changed(&ctx.state_dir, state);
    Ok(())
}

/// Publishes `ports` for a running container on its interface whose host veth is `veth`, which
/// becomes its primary one (Docker programs ports on the endpoint its default route goes
/// through). What it published before is unpublished first. Refused like `run -p`: a port
/// another container publishes or a host process holds; on failure it publishes nothing.
pub fn publish_ports(
    ctx: &Ctx,
    locked: &mut Locked,
    name: &str,
    veth: &str,
    ports: Vec<crate::portmap::PortMapping>,
) -> Result<()> {
    let c = locked
        .state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?;
    let pos = c
        .interfaces
        .iter()
        .position(|i| i.veth == veth)
        .with_context(|| format!("container {name} has no interface {veth}"))?;
    check_ports(&locked.state, name, &ports)?;
    unpublish_ports(ctx, locked, name)?;
    let c = locked.state.containers.get_mut(name).expect("checked");
    let iface = c.interfaces.remove(pos);
    c.interfaces.insert(0, iface);
    c.ports = ports;
    let identity = locked.state.identity_for(name)?;
    if let Err(e) = endpoint::publish(&ctx.dp, locked, name, identity) {
        unpublish_ports(ctx, locked, name)?;
        return Err(e);
    }
    locked.save()
}

/// Unpublishes a running container's ports (Docker revokes an endpoint's external
/// connectivity); its host ports go back to the host.
pub fn unpublish_ports(ctx: &Ctx, locked: &mut Locked, name: &str) -> Result<()> {
    let Some(c) = locked.state.containers.get_mut(name) else {
        return Ok(());
    };
    let ip6 = c.primary_ip6();
    let ports = std::mem::take(&mut c.ports);
    endpoint::unpublish(&ctx.dp, &ports, ip6);
    if let Err(e) = crate::hostports::release(&mut locked.state) {
        eprintln!(
            "md-user: giving back reserved ports: {}",
            crate::error::one_line(&e)
        );
    }
    locked.save()
}

/// Compares what exists with what the state says for the interface `ifname` of a container:
/// the host-side veth on its bridge, the interface, its address and default route inside
/// `netns`, the datapath's map entries and published ports, and md's programs on the veth and
/// the uplink. Returns every difference found (empty: no drift).
pub async fn check(
    ctx: &Ctx,
    nl: &Netlink,
    state: &State,
    c: &Container,
    ifname: &str,
    netns: &Netns,
) -> Result<Vec<String>> {
    use md_common::maps as m;
    let mut drift = Vec::new();
    let (pos, iface) = c
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname)
        .with_context(|| format!("container {} has no interface {ifname}", c.name))?;
    let net = state
        .networks
        .get(&iface.network)
        .with_context(|| format!("network {} is gone", iface.network))?;
    let gw = net.default_route();
    match nl.link_by_name(&iface.veth).await? {
        None => drift.push(format!("host veth {} is missing", iface.veth)),
        Some(l) if l.index != iface.ifindex => drift.push(format!(
            "host veth {} has index {}, not {}",
            iface.veth, l.index, iface.ifindex
        )),
        Some(l) => {
            let bridge = nl.link_by_name(&net.bridge).await?;
            if bridge.is_none() || l.controller != bridge.map(|b| b.index) {
                drift.push(format!(
                    "host veth {} is not on bridge {}",
                    iface.veth, net.bridge
                ));
            }
            if !l.up {
                drift.push(format!("host veth {} is down", iface.veth));
            }
            for (hook, prog) in [
                (Hook::Ingress, m::PROG_VETH_INGRESS),
                (Hook::Egress, m::PROG_VETH_EGRESS),
            ] {
                if !veth_runs(ctx, nl, &l, hook, prog).await {
                    drift.push(format!("program {prog} is not attached to {}", iface.veth));
                }
            }
        }
    }
    match crate::netlink::inspect_container_side(netns, ifname)? {
        None => drift.push(format!("interface {ifname} is missing in the container")),
        Some(side) => {
            if side.mac != iface.mac {
                drift.push(format!("{ifname} has another MAC address"));
            }
            if !side.up {
                drift.push(format!("{ifname} is down"));
            }
            if !side.addresses.contains(&(iface.ip, net.subnet.prefix_len)) {
                drift.push(format!(
                    "address {}/{} is missing on {ifname}",
                    iface.ip, net.subnet.prefix_len
                ));
            }
            if pos == 0 && side.default_gateway != gw {
                match gw {
                    Some(gw) => drift.push(format!("the default route via {gw} is missing")),
                    None => {
                        drift.push("an internal network's container has a default route".into())
                    }
                }
            }
        }
    }
    if !ctx.dp.is_loaded() {
        drift.push("md's datapath is not loaded".to_string());
        return Ok(drift);
    }
    let ep = ctx.dp.endpoints()?.get(&iface.ip.octets(), 0).ok();
    if ep.is_none_or(|e| e.ifindex != iface.ifindex) {
        drift.push(format!("ENDPOINTS has no entry for {}", iface.ip));
    }
    if ctx.dp.veth_owners()?.get(&iface.ifindex, 0).is_err() {
        drift.push(format!("VETH_OWNERS has no entry for {}", iface.veth));
    }
    if ctx.dp.networks()?.get(&net.id, 0).is_err() {
        drift.push(format!(
            "NETWORKS has no entry for network {}",
            iface.network
        ));
    }
    if pos == 0 {
        let ports = ctx.dp.port_map()?;
        for p in &c.ports {
            let t = ports.get(&endpoint::port_key(p), 0).ok();
            if t.is_none_or(|t| t.ip != iface.ip.octets() || t.port != p.container_port) {
                drift.push(format!("published port {p} is missing from PORT_MAP"));
            }
        }
    }
    if let Some(d) = &state.datapath {
        // Ethernet uplinks run the uplink programs, layer-3 ones (tun, WireGuard) the L3 ones.
        for (hook, progs) in [
            (Hook::Ingress, [m::PROG_UPLINK_INGRESS, m::PROG_L3_INGRESS]),
            (Hook::Egress, [m::PROG_UPLINK_EGRESS, m::PROG_L3_EGRESS]),
        ] {
            if !progs
                .iter()
                .any(|p| ctx.dp.tc_attached(&d.uplink, hook, p).unwrap_or(false))
            {
                drift.push(format!(
                    "program {} is not attached to uplink {}",
                    progs[0], d.uplink
                ));
            }
        }
    }
    Ok(drift)
}

/// Whether `prog` runs at `hook` of a container's host veth: a clsact filter, or a TCX link
/// (what md attached before it used filters on its own veths).
async fn veth_runs(ctx: &Ctx, nl: &Netlink, veth: &Link, hook: Hook, prog: &str) -> bool {
    let filter = match ctx.dp.program_id(prog) {
        Ok(id) => nl
            .tc_filter_programs(veth.index, matches!(hook, Hook::Ingress))
            .await
            .is_ok_and(|ids| ids.contains(&id)),
        Err(_) => false,
    };
    filter || ctx.dp.tc_attached(&veth.name, hook, prog).unwrap_or(false)
}

/// Tears down containers whose owner is gone (a foreground run killed with -9 included).
/// Returns their names.
pub async fn reconcile(ctx: &Ctx, nl: &Netlink, state: &mut State) -> Vec<String> {
    reconcile_some(ctx, nl, state, |_| true).await
}

/// [`reconcile`] among the containers `concerns` picks.
async fn reconcile_some(
    ctx: &Ctx,
    nl: &Netlink,
    state: &mut State,
    concerns: impl Fn(&Container) -> bool,
) -> Vec<String> {
    let mut dead = Vec::new();
    for c in state.containers.values().filter(|c| concerns(c)) {
        if !owner_alive(nl, c).await {
            dead.push(c.name.clone());
        }
    }
    for name in &dead {
        let c = state.containers.remove(name).expect("listed above");
        if c.status == Status::Running {
            // CMD normally dies with its supervisor (parent-death signal); make sure.
            proc::signal(c.pid, c.pid_start, libc::SIGKILL);
        }
        detach(ctx, nl, state, &c).await;
    }
    dead
}

/// A container lives while its supervisor does, or, once a runtime attached it (a CNI ADD or
/// Docker's Join finished: there is no supervisor then), while its network namespace does. A
/// veth pair goes with the namespace of either end, so the host-side veths tell without
/// holding the namespace open (Docker deletes them with its endpoints).
async fn owner_alive(nl: &Netlink, c: &Container) -> bool {
    if !c.runtime_owned() || c.status == Status::Creating {
        return proc::alive(c.supervisor_pid, c.supervisor_start);
    }
    for i in &c.interfaces {
        match nl.link_by_name(&i.veth).await {
            Ok(Some(l)) if l.index == i.ifindex => return true,
            Ok(_) => {}
            // Unsure: keep it, the next command looks again.
            Err(_) => return true,
        }
    }
    false
}

pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(b)
}
