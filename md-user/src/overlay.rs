//! Overlay networks across hosts (issue 17), coordinated through etcd (`store`).
//!
//! `network create NAME --driver overlay --store etcd://...` defines the network in the store
//! (or joins it), leases a block of its subnet for this host in a transaction (two hosts never
//! get the same block) and gives the host a bridge whose gateway is the block's first address.
//! Containers are registered in the store (name, address, identity, host) when they start, on
//! the host's lease, and removed when they stop. The watcher (`md-user watch`) keeps the lease
//! alive and follows the store: every host's containers land in REMOTE (the datapath's view),
//! in the resolver's names, and, for natively routed networks, in routes to the other hosts'
//! blocks. A host that dies stops keeping its lease alive: etcd deletes its keys at the TTL and
//! every other host forgets it; its blocks are free again only then.
//!
//! A store that does not answer changes nothing that runs: the watcher keeps what it last
//! knew and tries again; commands that need the store say that it is down and change nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use md_common::{Remote, Tunnel, OVERLAY_NATIVE, OVERLAY_TUNNEL};

use crate::{
    attach::Ctx,
    cli::GlobalOpts,
    datapath::{Datapath, Hook},
    error::one_line,
    ipam::Subnet,
    netlink::Netlink,
    network,
    state::{Cluster, Container, Locked, Network, Overlay, RemoteContainer, State, StateDir},
    store::{self, ContainerRec, HostRef, NetworkDef, Store, View},
};

/// md's VXLAN device (one per host, collect-metadata) and its IANA port.
pub const VXLAN_DEV: &str = "mdvx0";
pub const VXLAN_PORT: u16 = 4789;
/// What VXLAN adds to a container's packet: outer IPv4 (20) + UDP (8) + VXLAN (8) + the inner
/// Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Pin name of the VXLAN device's program.
const TUNNEL_PIN: &str = "tunnel";

/// `network create --driver overlay` options.
pub struct CreateArgs {
    pub name: String,
    pub subnet: Option<Subnet>,
    pub store: Option<String>,
    pub mode: Option<String>,
}

/// The prefix of the blocks a subnet is cut into: /24 for a /16 (256 hosts of 253
/// containers), smaller for smaller subnets, never below /28.
pub fn block_prefix(subnet: &Subnet) -> Result<u8> {
    let p = (subnet.prefix_len + 4).clamp(24, 28);
    if p <= subnet.prefix_len {
        bail!(
            "subnet {subnet} is too small for an overlay (blocks are /28 at least): use /27 or larger"
        );
    }
    Ok(p)
}

/// The blocks of `subnet`, in order.
pub fn blocks(subnet: &Subnet, prefix: u8) -> impl Iterator<Item = Subnet> {
    let start = u32::from(subnet.network);
    let count = 1u32 << (prefix - subnet.prefix_len);
    let step = 1u32 << (32 - prefix);
    (0..count).map(move |i| Subnet::new(Ipv4Addr::from(start + i * step), prefix).expect("valid"))
}

fn mode_value(mode: &str) -> u8 {
    if mode == "native" {
        OVERLAY_NATIVE
    } else {
        OVERLAY_TUNNEL
    }
}

fn random_id() -> String {
    format!("h{:010x}", crate::attach::random_u64() & 0xff_ffff_ffff)
}

/// The host's underlay address: `--advertise-addr`, else the source address of its route to
/// the store (Calico's can-reach detection). With its interface's MTU.
async fn underlay(nl: &Netlink, opts: &GlobalOpts, url: &str) -> Result<(Ipv4Addr, u32)> {
    let addrs = nl.ipv4_addresses().await?;
    let addr = match opts.advertise_addr {
        Some(a) => {
            if !addrs.iter().any(|(_, ip, _)| *ip == a) {
                bail!("--advertise-addr {a} is no address of this host");
            }
            a
        }
        None => {
            let host = store::first_host(url)?;
            let ip = match host.parse::<Ipv4Addr>() {
                Ok(ip) => ip,
                Err(_) => tokio::net::lookup_host((host.as_str(), 0))
                    .await
                    .with_context(|| format!("resolving the store's host {host}"))?
                    .find_map(|a| match a.ip() {
                        std::net::IpAddr::V4(v4) => Some(v4),
                        _ => None,
                    })
                    .with_context(|| format!("the store's host {host} has no IPv4 address"))?,
            };
            nl.route_to(ip)
                .await?
                .and_then(|r| r.source)
                .with_context(|| format!("no route to the store at {ip}; pass --advertise-addr"))?
        }
    };
    let ifindex = addrs
        .iter()
        .find(|(_, ip, _)| *ip == addr)
        .map(|(i, _, _)| *i)
        .with_context(|| format!("{addr} is no address of this host"))?;
    let mtu = nl
        .link_by_index(ifindex)
        .await?
        .and_then(|l| l.mtu)
        .filter(|m| *m > 0)
        .unwrap_or(1500);
    Ok((addr, mtu))
}

/// What this host registers: itself, its blocks, its overlay containers.
fn own_keys(state: &State, cluster: &Cluster) -> Vec<(String, Vec<u8>)> {
    let me = HostRef {
        host: cluster.host_id.clone(),
        addr: cluster.addr,
    };
    let me_json = serde_json::to_vec(&me).expect("json");
    let mut out = vec![(store::host_key(&cluster.host_id), me_json.clone())];
    for (name, net) in &state.networks {
        if net.overlay.is_some() {
            out.push((store::block_key(name, net.subnet.network), me_json.clone()));
        }
    }
    for c in state.containers.values() {
        if let Some(rec) = record(state, cluster, c) {
            out.push((
                store::container_key(&c.name),
                serde_json::to_vec(&rec).expect("json"),
            ));
        }
    }
    out
}

/// A local container's record in the store, if it is on an overlay network.
fn record(state: &State, cluster: &Cluster, c: &Container) -> Option<ContainerRec> {
    let iface = c.interfaces.first()?;
    state.networks.get(&iface.network)?.overlay.as_ref()?;
    Some(ContainerRec {
        host: cluster.host_id.clone(),
        addr: cluster.addr,
        network: iface.network.clone(),
        ip: iface.ip,
        identity: state.identity(&c.name).ok().flatten().unwrap_or(0),
        hostname: c.hostname.clone(),
    })
}

/// A new lease for this host (the old one expired: the host was cut off longer than the TTL),
/// and everything it registers put back on it. A block another host took in the meantime is
/// reported, not fought over.
async fn renew(st: &mut Store, state: &mut State) -> Result<()> {
    let mut cluster = state.cluster.clone().context("not in a cluster")?;
    cluster.lease = st.grant(cluster.ttl).await?;
    state.cluster = Some(cluster.clone());
    reregister(st, state, &cluster, None).await
}

/// Refreshes this host's lease at the end of a command that registered something: the watcher
/// takes over only once the command's state is saved, and a short TTL may run out before that
/// (the first command also loads the datapath). An expired lease is replaced, everything put
/// back on the new one.
async fn refresh(st: &mut Store, state: &mut State) -> Result<()> {
    let lease = state.cluster.as_ref().context("not in a cluster")?.lease;
    if !st.keep_alive(lease).await? {
        renew(st, state).await?;
    }
    Ok(())
}

/// What this host registers and the store lacks or has otherwise (`puts`), and what the
/// store holds for it that it no longer registers (`dels`: a container stopped, or a block
/// given back, while the store was down).
fn own_diff(
    state: &State,
    cluster: &Cluster,
    view: &View,
) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let want = own_keys(state, cluster);
    let wanted: BTreeSet<&str> = want.iter().map(|(k, _)| k.as_str()).collect();
    let mut dels = Vec::new();
    for (name, c) in &view.containers {
        let key = store::container_key(name);
        if c.host == cluster.host_id && !wanted.contains(key.as_str()) {
            dels.push(key);
        }
    }
    for ((net, block), h) in &view.blocks {
        let key = store::block_key(net, *block);
        if h.host == cluster.host_id && !wanted.contains(key.as_str()) {
            dels.push(key);
        }
    }
    // Unchanged keys need no write (every write wakes every host's watcher).
    let puts = want
        .into_iter()
        .filter(|(k, v)| view.raw.get(k) != Some(&(v.clone(), cluster.lease)))
        .collect();
    (puts, dels)
}

/// Makes the store hold what this host registers (see [`own_diff`]). Under the state lock:
/// commands change the store and the state together under it, so this never undoes a command
/// half way (a container registered but not yet recorded, or the reverse).
async fn reregister(
    st: &mut Store,
    state: &State,
    cluster: &Cluster,
    view: Option<&View>,
) -> Result<()> {
    let view = match view {
        Some(v) => v.clone(),
        None => st.view().await?,
    };
    let (puts, dels) = own_diff(state, cluster, &view);
    for (key, value) in &puts {
        let (created, now) = st.create(key, value, Some(cluster.lease)).await?;
        if created {
            continue;
        }
        let mine = now
            .as_deref()
            .and_then(|v| serde_json::from_slice::<HostRefOrRec>(v).ok())
            .is_some_and(|h| h.host() == cluster.host_id);
        if mine {
            // Ours already, maybe on an older lease or with older contents: rewrite it.
            st.put(key, value, Some(cluster.lease)).await?;
        } else {
            eprintln!(
                "md-user watch: {key} belongs to another host now; this host was cut off from the store longer than its TTL"
            );
        }
    }
    for key in &dels {
        st.delete(key).await?;
    }
    Ok(())
}

/// Either kind of leased value: both name their host.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum HostRefOrRec {
    Rec(ContainerRec),
    Host(HostRef),
}

impl HostRefOrRec {
    fn host(&self) -> &str {
        match self {
            HostRefOrRec::Rec(r) => &r.host,
            HostRefOrRec::Host(h) => &h.host,
        }
    }
}

/// The store of this host's cluster (joining one with `url` if the host is in none), its lease
/// alive. Under the state lock.
async fn session(
    nl: &Netlink,
    opts: &GlobalOpts,
    state: &mut State,
    url: Option<&str>,
) -> Result<Store> {
    match (&state.cluster, url) {
        (Some(c), Some(u)) if c.store != u => bail!(
            "this host is in the cluster of store {}; it cannot use {u} too",
            c.store
        ),
        (None, None) => bail!(
            "an overlay network needs a store: pass --store etcd://HOST:PORT[,HOST:PORT...] (or the global --store)"
        ),
        _ => {}
    }
    if let Some(c) = state.cluster.clone() {
        let mut st = Store::connect(&c.store).await?;
        if !st.lease_alive(c.lease).await? {
            renew(&mut st, state).await?;
        }
        return Ok(st);
    }
    let url = url.expect("checked");
    store::parse_url(url)?;
    let (addr, underlay_mtu) = underlay(nl, opts, url).await?;
    let mut st = Store::connect(url).await?;
    let ttl = opts.store_ttl;
    let lease = st.grant(ttl).await?;
    let cluster = Cluster {
        store: url.to_string(),
        host_id: random_id(),
        addr,
        underlay_mtu,
        lease,
        ttl,
    };
    let me = HostRef {
        host: cluster.host_id.clone(),
        addr,
    };
    st.put(
        &store::host_key(&cluster.host_id),
        &serde_json::to_vec(&me)?,
        Some(lease),
    )
    .await?;
    state.cluster = Some(cluster);
    Ok(st)
}

/// `network create NAME --driver overlay`: defines or joins the network in the store, leases a
/// block for this host, makes the bridge (and the VXLAN device in tunnel mode).
pub async fn create_network(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    args: CreateArgs,
) -> Result<()> {
    let name = args.name.as_str();
    let state = &mut locked.state;
    if state.networks.contains_key(name) || matches!(name, "none" | "host") {
        bail!("network {name} already exists");
    }
    let url = args.store.clone().or_else(|| ctx.opts.store.clone());
    let mut st = session(nl, &ctx.opts, state, url.as_deref()).await?;
    let cluster = state.cluster.clone().expect("joined");
    // The network's definition: the first host writes it, the others must agree with it.
    let def = match st.get(&store::network_key(name)).await? {
        Some(v) => {
            let def: NetworkDef = serde_json::from_slice(&v)
                .with_context(|| format!("the store's definition of {name} is unreadable"))?;
            if let Some(s) = args.subnet {
                if s.to_string() != def.subnet {
                    bail!(
                        "overlay network {name} exists in the store with subnet {}, not {s}",
                        def.subnet
                    );
                }
            }
            if let Some(m) = &args.mode {
                if *m != def.mode {
                    bail!(
                        "overlay network {name} exists in the store in {} mode, not {m}",
                        def.mode
                    );
                }
            }
            def
        }
        None => {
            let subnet = args.subnet.with_context(|| {
                format!("overlay network {name} is new: pass --subnet (the whole network's, shared by every host)")
            })?;
            let def = NetworkDef {
                subnet: subnet.to_string(),
                mode: args.mode.clone().unwrap_or_else(|| "tunnel".into()),
                block_prefix: block_prefix(&subnet)?,
            };
            let (_, now) = st
                .create(&store::network_key(name), &serde_json::to_vec(&def)?, None)
                .await?;
            // Someone may have defined it a moment earlier: theirs counts.
            match now.and_then(|v| serde_json::from_slice::<NetworkDef>(&v).ok()) {
                Some(d) if d != def => bail!(
                    "overlay network {name} was just defined by another host with subnet {} ({} mode); run the command again",
                    d.subnet,
                    d.mode
                ),
                _ => def,
            }
        }
    };
    let subnet: Subnet = def.subnet.parse()?;
    for (other, net) in &state.networks {
        if net.span().overlaps(&subnet) {
            bail!("subnet {subnet} overlaps network {other} ({})", net.span());
        }
    }
    // A block of our own, in a transaction: the first free one.
    let me = serde_json::to_vec(&HostRef {
        host: cluster.host_id.clone(),
        addr: cluster.addr,
    })?;
    let mut block = None;
    for b in blocks(&subnet, def.block_prefix) {
        let (won, _) = st
            .create(&store::block_key(name, b.network), &me, Some(cluster.lease))
            .await?;
        if won {
            block = Some(b);
            break;
        }
    }
    let block = block.with_context(|| {
        format!(
            "overlay network {name} has no free /{} block left in {subnet}: every one is held by a live host",
            def.block_prefix
        )
    })?;
    let made = async {
        let mtu = if def.mode == "tunnel" {
            cluster.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
        } else {
            cluster.underlay_mtu
        };
        let mut net = network::add(state, name, network::next_bridge_name(state), block, None)?;
        net.overlay = Some(Overlay {
            subnet,
            mode: def.mode.clone(),
            mtu,
        });
        state.networks.insert(name.to_string(), net.clone());
        crate::host::ensure_datapath(nl, &ctx.dp, state, &ctx.opts).await?;
        if def.mode == "tunnel" {
            ensure_device(nl, &ctx.dp, &cluster).await?;
        }
        network::ensure_bridge(nl, &ctx.dp, &net).await?;
        ensure_span(nl, &ctx.dp, &net).await
    }
    .await;
    if let Err(e) = made {
        let _ = st.delete(&store::block_key(name, block.network)).await;
        if let Some(net) = state.networks.remove(name) {
            let _ = remove_span(nl, &ctx.dp, &net).await;
            let _ = network::remove_bridge(nl, &ctx.dp, &net).await;
        }
        return Err(e);
    }
    refresh(&mut st, state).await
}

/// The whole overlay subnet in the datapath's md subnets (nothing from the wire may claim it)
/// and, in the host's routing, unreachable except for what is known: this host's block (the
/// bridge) and, natively routed, the other hosts' blocks.
async fn ensure_span(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<()> {
    let Some(o) = &net.overlay else {
        return Ok(());
    };
    dp.add_subnet(o.subnet.network, o.subnet.prefix_len, net.id)?;
    nl.set_md_route(o.subnet.network, o.subnet.prefix_len, None)
        .await
}

async fn remove_span(nl: &Netlink, dp: &Datapath, net: &Network) -> Result<()> {
    let Some(o) = &net.overlay else {
        return Ok(());
    };
    if dp.is_loaded() {
        dp.remove_subnet(o.subnet.network, o.subnet.prefix_len)?;
    }
    nl.del_md_route(o.subnet.network, o.subnet.prefix_len, None)
        .await
}

/// md's VXLAN device, its program, and the datapath's TUNNEL slot.
async fn ensure_device(nl: &Netlink, dp: &Datapath, cluster: &Cluster) -> Result<()> {
    let mtu = cluster.underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
    let link = nl.ensure_vxlan(VXLAN_DEV, VXLAN_PORT, mtu).await?;
    if dp.tc_pin_ifindex(TUNNEL_PIN, Hook::Ingress) != Some(link.index) {
        dp.detach_tc(TUNNEL_PIN)?;
        dp.reset_if_stats(link.index)?;
    }
    dp.attach_tc(
        VXLAN_DEV,
        Hook::Ingress,
        md_common::maps::PROG_TUNNEL_INGRESS,
        TUNNEL_PIN,
    )?;
    dp.set_tunnel(&Tunnel {
        ifindex: link.index,
        local: cluster.addr.octets(),
    })
}

/// The VXLAN device's ifindex, while md's program runs there.
pub fn tunnel_ifindex(dp: &Datapath) -> Option<u32> {
    dp.tc_pin_ifindex(TUNNEL_PIN, Hook::Ingress)
}

/// `network rm` of an overlay network: its block goes back to the store.
pub async fn remove_network(
    ctx: &Ctx,
    nl: &Netlink,
    state: &mut State,
    name: &str,
    net: &Network,
) -> Result<()> {
    let mut st = session(nl, &ctx.opts, state, None).await?;
    st.delete(&store::block_key(name, net.subnet.network))
        .await?;
    remove_span(nl, &ctx.dp, net).await?;
    // Its remote peers go with it (the watcher would too, a moment later).
    forget_network(&ctx.dp, state, name)?;
    Ok(())
}

fn forget_network(dp: &Datapath, state: &mut State, name: &str) -> Result<()> {
    let gone: Vec<RemoteContainer> = state
        .remote
        .values()
        .filter(|r| r.network == name)
        .cloned()
        .collect();
    state.remote.retain(|_, r| r.network != name);
    if dp.is_loaded() {
        let mut map = dp.remote()?;
        for r in gone {
            let _ = map.remove(&r.ip.octets());
        }
    }
    Ok(())
}

/// A container about to be recorded (`attach::reserve`): on an overlay network it takes its
/// identity from the store and registers there (its name must be free on every host).
pub async fn register(ctx: &Ctx, nl: &Netlink, state: &mut State, c: &Container) -> Result<()> {
    let Some(iface) = c.interfaces.first() else {
        return Ok(());
    };
    if state
        .networks
        .get(&iface.network)
        .is_none_or(|n| n.overlay.is_none())
    {
        return Ok(());
    }
    let mut st = session(nl, &ctx.opts, state, None).await?;
    let cluster = state.cluster.clone().expect("in a cluster");
    let id = st.identity(&c.name).await?;
    let old = state.set_identity(&c.name, id)?;
    crate::policy::reidentify(&ctx.dp, state, &c.name, old)?;
    let rec = record(state, &cluster, c).expect("on an overlay");
    let key = store::container_key(&c.name);
    let (created, now) = st
        .create(&key, &serde_json::to_vec(&rec)?, Some(cluster.lease))
        .await?;
    if !created {
        let holder = now
            .as_deref()
            .and_then(|v| serde_json::from_slice::<ContainerRec>(v).ok());
        match holder {
            // A record this host left behind (a crash before it was removed): ours to reuse.
            Some(h) if h.host == cluster.host_id => {
                st.put(&key, &serde_json::to_vec(&rec)?, Some(cluster.lease))
                    .await?
            }
            Some(h) => bail!(
                "container name {} is in use on host {} ({})",
                c.name,
                h.host,
                h.addr
            ),
            None => bail!("container name {} is in use in the store", c.name),
        }
    }
    Ok(())
}

/// A container is gone: its record leaves the store. Best effort: with the store down, the
/// watcher removes it once the store is back.
pub async fn unregister(state: &State, c: &Container) {
    let Some(cluster) = &state.cluster else {
        return;
    };
    let on_overlay = c.interfaces.first().is_some_and(|i| {
        state
            .networks
            .get(&i.network)
            .is_some_and(|n| n.overlay.is_some())
    });
    if !on_overlay {
        return;
    }
    let key = store::container_key(&c.name);
    let done = async {
        let mut st = Store::connect(&cluster.store).await?;
        let mine = st
            .get(&key)
            .await?
            .and_then(|v| serde_json::from_slice::<ContainerRec>(&v).ok())
            .is_some_and(|r| r.host == cluster.host_id);
        if mine {
            st.delete(&key).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = done {
        eprintln!(
            "md-user: {} stays registered until the store is back: {}",
            c.name,
            one_line(&e)
        );
    }
}

/// `down`: the host leaves its cluster (its lease revoked, so every key it registered goes at
/// once), its VXLAN device and routes go. Best effort.
pub async fn leave(nl: &Netlink, dp: &Datapath, state: &mut State) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    if let Some(c) = state.cluster.take() {
        let revoked = async {
            let mut st = Store::connect(&c.store).await?;
            st.revoke(c.lease).await
        }
        .await;
        if let Err(e) = revoked {
            errors.push(e.context("leaving the cluster (its registrations expire with the lease)"));
        }
    }
    state.remote.clear();
    if let Ok(routes) = nl.md_routes().await {
        for (dst, prefix, via) in routes {
            if let Err(e) = nl.del_md_route(dst, prefix, via).await {
                errors.push(e);
            }
        }
    }
    if let Err(e) = dp.detach_tc(TUNNEL_PIN) {
        errors.push(e);
    }
    match nl.link_by_name(VXLAN_DEV).await {
        Ok(Some(l)) if l.kind.as_deref() == Some("vxlan") => {
            if let Err(e) = nl.delete_link(l.index).await {
                errors.push(e);
            }
        }
        Ok(_) => {}
        Err(e) => errors.push(e),
    }
    errors
}

/// The VXLAN device is md's own: never an uplink.
pub fn owned_links(state: &State) -> impl Iterator<Item = String> {
    state
        .cluster
        .is_some()
        .then(|| VXLAN_DEV.to_string())
        .into_iter()
}

// ---- the watcher's side ----------------------------------------------------------------------

/// Where the watcher says how the store is doing, for commands to tell (`ok`, or `down
/// since RFC-3339-TIME: WHY`).
pub fn status_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("store.status")
}

/// A warning line when the watcher found the store down.
pub fn store_warning(state: &State, state_dir: &std::path::Path) -> Option<String> {
    let c = state.cluster.as_ref()?;
    let s = std::fs::read_to_string(status_file(state_dir)).ok()?;
    // "down since TIME: WHY": the time is enough here (the watcher logged why).
    let since = s
        .strip_prefix("down ")?
        .split(": ")
        .next()?
        .trim()
        .to_string();
    Some(format!(
        "the store {} is down ({since}); overlay peers are as it last said",
        c.store
    ))
}

fn set_status(state_dir: &std::path::Path, status: &str) {
    let path = status_file(state_dir);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(status) {
        return;
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, status).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// The watcher's overlay task: while the host is in a cluster, keep its lease alive and follow
/// the store. Never returns; errors are reported and retried.
pub async fn follow(opts: GlobalOpts, dp: Datapath) {
    let sd = StateDir::new(&opts.state_dir);
    let mut down_since: Option<std::time::SystemTime> = None;
    loop {
        let cluster = sd.peek().ok().and_then(|s| s.cluster);
        if let Some(cluster) = cluster {
            if let Err(e) = follow_store(&opts, &dp, &cluster, &mut down_since).await {
                if down_since.is_none() {
                    eprintln!("md-user watch: {}", one_line(&e));
                }
                let since = *down_since.get_or_insert_with(std::time::SystemTime::now);
                set_status(
                    &opts.state_dir,
                    &format!(
                        "down since {}: {}",
                        humantime::format_rfc3339_seconds(since),
                        one_line(&e)
                    ),
                );
            }
        }
        if sd.peek().ok().and_then(|s| s.cluster).is_none() {
            down_since = None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One session with the store: sync, then follow its changes, keep the lease alive and sync
/// again when the local state changes. Returns on any store error.
async fn follow_store(
    opts: &GlobalOpts,
    dp: &Datapath,
    cluster: &Cluster,
    down_since: &mut Option<std::time::SystemTime>,
) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut st = Store::connect(&cluster.store).await?;
    let sd = StateDir::new(&opts.state_dir);
    let mut reader = sd.reader();
    let mut rev = sync(&mut st, &nl, dp, opts).await?;
    set_status(&opts.state_dir, "ok");
    if down_since.take().is_some() {
        eprintln!("md-user watch: the store {} is back", cluster.store);
    }
    let mut watch = st.watch(rev + 1).await?;
    let every = Duration::from_secs((cluster.ttl / 3).max(1) as u64);
    let mut keep = tokio::time::interval(every);
    let mut local = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = watch.message() => {
                match msg {
                    Ok(Some(_)) => {
                        // A burst (a host's lease expiring takes all its keys) is handled once.
                        while let Ok(Ok(Some(_))) =
                            tokio::time::timeout(Duration::from_millis(50), watch.message()).await
                        {}
                        rev = sync(&mut st, &nl, dp, opts).await?;
                    }
                    Ok(None) => bail!("the store closed its watch"),
                    Err(e) => return Err(anyhow::anyhow!("the store {} is down or unreachable ({e})", cluster.store)),
                }
            }
            _ = keep.tick() => {
                let state = sd.peek()?;
                let Some(c) = state.cluster else { return Ok(()) };
                if c.store != cluster.store {
                    return Ok(());
                }
                if !st.keep_alive(c.lease).await? {
                    // Expired: cut off longer than the TTL. A new lease, everything put back.
                    let sd2 = StateDir::new(&opts.state_dir);
                    let mut locked = tokio::task::spawn_blocking(move || sd2.lock()).await??;
                    if locked.state.cluster.as_ref().is_some_and(|x| x.lease == c.lease) {
                        renew(&mut st, &mut locked.state).await?;
                        locked.save()?;
                    }
                }
                set_status(&opts.state_dir, "ok");
            }
            _ = local.tick() => {
                if reader.changed().is_some() {
                    let r = sync(&mut st, &nl, dp, opts).await?;
                    rev = rev.max(r);
                }
            }
        }
        let _ = rev;
    }
}

/// Reads the store and makes this host match it: its own registrations put back or removed,
/// REMOTE, routes to natively routed blocks, the names and identities of remote containers.
/// Returns the revision read.
async fn sync(st: &mut Store, nl: &Netlink, dp: &Datapath, opts: &GlobalOpts) -> Result<i64> {
    let view = st.view().await?;
    let sd = StateDir::new(&opts.state_dir);
    let state = sd.peek()?;
    let Some(cluster) = state.cluster.clone() else {
        return Ok(view.revision);
    };
    // This host's own registrations, under the state lock and only when something differs.
    let (puts, dels) = own_diff(&state, &cluster, &view);
    if !puts.is_empty() || !dels.is_empty() {
        let sd2 = StateDir::new(&opts.state_dir);
        let locked = tokio::task::spawn_blocking(move || sd2.lock()).await??;
        if locked.state.cluster.as_ref().map(|c| &c.host_id) == Some(&cluster.host_id) {
            let cluster = locked.state.cluster.clone().expect("checked");
            reregister(st, &locked.state, &cluster, None).await?;
        }
    }
    let want = wanted_remote(&view, &state, &cluster.host_id);
    if dp.is_loaded() {
        // A datapath loaded afresh (another md build) has an empty TUNNEL slot.
        let tunnel = state
            .networks
            .values()
            .any(|n| n.overlay.as_ref().is_some_and(|o| o.mode == "tunnel"));
        if tunnel {
            ensure_device(nl, dp, &cluster).await?;
        }
        sync_map(dp, &state, &want)?;
    }
    sync_routes(nl, &view, &state, &cluster.host_id).await?;
    // Names and identities: written under the lock, only when they changed.
    let mut changed = want != state.remote;
    for (name, r) in &want {
        if !state.containers.contains_key(name) && state.identity(name)? != Some(r.identity) {
            changed = true;
        }
    }
    if changed {
        let sd2 = StateDir::new(&opts.state_dir);
        let mut locked = tokio::task::spawn_blocking(move || sd2.lock()).await??;
        if locked.state.cluster.as_ref().map(|c| &c.host_id) != Some(&cluster.host_id) {
            return Ok(view.revision);
        }
        let want = wanted_remote(&view, &locked.state, &cluster.host_id);
        for (name, r) in &want {
            // A local container of that name (on a network of this host only) keeps its own.
            if locked.state.containers.contains_key(name) {
                continue;
            }
            let old = locked.state.set_identity(name, r.identity)?;
            if old.is_some() || locked.state.identity(name)?.is_some() {
                crate::policy::reidentify(dp, &mut locked.state, name, old)?;
            }
        }
        locked.state.remote = want;
        locked.save()?;
    }
    Ok(view.revision)
}

/// The containers of other hosts on this host's overlay networks.
pub fn wanted_remote(view: &View, state: &State, me: &str) -> BTreeMap<String, RemoteContainer> {
    view.containers
        .iter()
        .filter(|(_, c)| c.host != me)
        .filter(|(_, c)| {
            state
                .networks
                .get(&c.network)
                .is_some_and(|n| n.overlay.is_some())
        })
        // Only hosts that are alive: a container outliving its host's lease cannot happen in
        // etcd (same lease), but a record without a host is no peer.
        .filter(|(_, c)| view.hosts.contains_key(&c.host))
        .map(|(name, c)| {
            (
                name.clone(),
                RemoteContainer {
                    network: c.network.clone(),
                    ip: c.ip,
                    identity: c.identity,
                    host: c.host.clone(),
                    addr: c.addr,
                    hostname: c.hostname.clone(),
                },
            )
        })
        .collect()
}

/// REMOTE holds exactly the wanted remote containers.
fn sync_map(dp: &Datapath, state: &State, want: &BTreeMap<String, RemoteContainer>) -> Result<()> {
    let mut map = dp.remote()?;
    let mut entries: BTreeMap<[u8; 4], Remote> = BTreeMap::new();
    for r in want.values() {
        let Some(net) = state.networks.get(&r.network) else {
            continue;
        };
        let Some(o) = &net.overlay else { continue };
        entries.insert(
            r.ip.octets(),
            Remote {
                host: r.addr.octets(),
                identity: r.identity,
                net_id: net.id,
                mode: mode_value(&o.mode),
                _pad: [0; 3],
            },
        );
    }
    let stale: Vec<[u8; 4]> = map
        .keys()
        .flatten()
        .filter(|k| !entries.contains_key(k))
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    for (k, v) in entries {
        if map.get(&k, 0).ok() != Some(v) {
            map.insert(k, v, 0).context("writing REMOTE")?;
        }
    }
    Ok(())
}

/// md's routes: each overlay's subnet unreachable, and each other host's block of a natively
/// routed overlay via that host.
async fn sync_routes(nl: &Netlink, view: &View, state: &State, me: &str) -> Result<()> {
    let mut want: BTreeSet<(Ipv4Addr, u8, Option<Ipv4Addr>)> = BTreeSet::new();
    for (name, net) in &state.networks {
        let Some(o) = &net.overlay else { continue };
        want.insert((o.subnet.network, o.subnet.prefix_len, None));
        if o.mode != "native" {
            continue;
        }
        let prefix = view
            .networks
            .get(name)
            .map(|d| d.block_prefix)
            .unwrap_or(net.subnet.prefix_len);
        for ((n, block), h) in &view.blocks {
            if n == name && h.host != me && view.hosts.contains_key(&h.host) {
                want.insert((*block, prefix, Some(h.addr)));
            }
        }
    }
    let have: BTreeSet<_> = nl.md_routes().await?.into_iter().collect();
    for r in have.difference(&want) {
        nl.del_md_route(r.0, r.1, r.2).await?;
    }
    for r in want.difference(&have) {
        nl.set_md_route(r.0, r.1, r.2).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        let s = |c: &str| c.parse::<Subnet>().unwrap();
        assert_eq!(block_prefix(&s("172.30.0.0/16")).unwrap(), 24);
        assert_eq!(block_prefix(&s("10.0.0.0/8")).unwrap(), 24);
        assert_eq!(block_prefix(&s("172.30.0.0/22")).unwrap(), 26);
        assert_eq!(block_prefix(&s("172.30.0.0/24")).unwrap(), 28);
        assert_eq!(block_prefix(&s("172.30.0.0/27")).unwrap(), 28);
        assert!(block_prefix(&s("172.30.0.0/28")).is_err());
        let b: Vec<String> = blocks(&s("172.30.0.0/27"), 28)
            .map(|b| b.to_string())
            .collect();
        assert_eq!(b, ["172.30.0.0/28", "172.30.0.16/28"]);
        assert_eq!(blocks(&s("172.30.0.0/16"), 24).count(), 256);
        assert_eq!(
            blocks(&s("172.30.0.0/16"), 24).nth(3).unwrap().to_string(),
            "172.30.3.0/24"
        );
    }

    fn state_with(net: &str, mode: &str) -> State {
        let mut s = State::default();
        s.networks.insert(
            net.into(),
            Network {
                id: 4,
                bridge: "mdn4".into(),
                subnet: "172.30.1.0/24".parse().unwrap(),
                subnet6: None,
                routed6: false,
                dns_pid: 0,
                dns_start: 0,
                overlay: Some(Overlay {
                    subnet: "172.30.0.0/16".parse().unwrap(),
                    mode: mode.into(),
                    mtu: 1450,
                }),
                gateway: None,
                ip_range: None,
                mtu: None,
                internal: false,
                gateway_mode: Default::default(),
                options: Default::default(),
                uid: String::new(),
                created_unix: 0,
            },
        );
        s
    }

    #[test]
    fn remote_containers_are_other_live_hosts_on_our_overlays() {
        let rec = |host: &str, net: &str, ip: &str| ContainerRec {
            host: host.into(),
            addr: "198.51.100.12".parse().unwrap(),
            network: net.into(),
            ip: ip.parse().unwrap(),
            identity: 1 << 20,
            hostname: "x".into(),
        };
        let mut v = View::default();
        let h = |id: &str| HostRef {
            host: id.into(),
            addr: "198.51.100.12".parse().unwrap(),
        };
        v.hosts.insert("me".into(), h("me"));
        v.hosts.insert("h2".into(), h("h2"));
        v.containers
            .insert("mine".into(), rec("me", "ov", "172.30.1.2"));
        v.containers
            .insert("b".into(), rec("h2", "ov", "172.30.2.2"));
        v.containers
            .insert("other".into(), rec("h2", "elsewhere", "172.31.2.2"));
        v.containers
            .insert("orphan".into(), rec("gone", "ov", "172.30.3.2"));
        let s = state_with("ov", "tunnel");
        let w = wanted_remote(&v, &s, "me");
        assert_eq!(w.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(w["b"].ip, "172.30.2.2".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn own_registrations() {
        let mut s = state_with("ov", "native");
        let cluster = Cluster {
            store: "etcd://198.51.100.2:2379".into(),
            host_id: "me".into(),
            addr: "198.51.100.11".parse().unwrap(),
            underlay_mtu: 1500,
            lease: 7,
            ttl: 5,
        };
        s.cluster = Some(cluster.clone());
        let keys: Vec<String> = own_keys(&s, &cluster).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["/md/hosts/me", "/md/blocks/ov/172.30.1.0"]);
        // The store has the host key on our lease, the block on an older one, a container of
        // ours that no longer runs, and another host's container.
        let own = own_keys(&s, &cluster);
        let rec = |host: &str| ContainerRec {
            host: host.into(),
            addr: cluster.addr,
            network: "ov".into(),
            ip: "172.30.1.9".parse().unwrap(),
            identity: 1 << 20,
            hostname: "x".into(),
        };
        let mut v = View::default();
        v.raw.insert(own[0].0.clone(), (own[0].1.clone(), 7));
        v.raw.insert(own[1].0.clone(), (own[1].1.clone(), 6));
        v.containers.insert("gone".into(), rec("me"));
        v.containers.insert("theirs".into(), rec("h2"));
        let (puts, dels) = own_diff(&s, &cluster, &v);
        let puts: Vec<&str> = puts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(puts, ["/md/blocks/ov/172.30.1.0"]);
        assert_eq!(dels, ["/md/containers/gone"]);
    }
}
