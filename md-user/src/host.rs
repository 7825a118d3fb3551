//! The host namespace side: forwarding, the datapath on every host interface md did not make
//! (its "uplinks": NICs, VPN devices, other bridges) and at the cgroup root, and the watcher
//! that follows the host as interfaces and addresses come and go. Set up on first use, torn
//! down by `down`.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{bail, Context, Result};
use md_common::{maps as m, Config};

use crate::{
    cli::GlobalOpts,
    datapath::{Datapath, Hook},
    netlink::{Layer, Link, Netlink},
    netns, proc,
    state::{DatapathState, State, StateDir},
};

/// Pin name prefix of an uplink's TC links: `if<ifindex>`, so an interface recreated under the
/// same name is a new attachment and a renamed one keeps its own.
const UPLINK_PIN: &str = "if";

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
    let addrs = nl.ipv4_addresses().await?;
    let uplink_ip = addrs
        .iter()
        .find(|(idx, _, _)| *idx == uplink.index)
        .map(|(_, ip, _)| *ip)
        .with_context(|| format!("uplink {} has no IPv4 address", uplink.name))?;

    let fresh = !dp.is_loaded();
    // Uplinks and host addresses follow the host through the watcher; without one (or on a
    // fresh load) they are set here. With a thousand containers that saves dumps of a
    // thousand links and their IPv6 addresses per container.
    let sync = fresh || !watcher_running(&opts.state_dir);
    let addrs6 = if sync {
        nl.ipv6_addresses().await?
    } else {
        Vec::new()
    };
    if fresh {
        dp.load(addrs.len().max(addrs6.len()))?;
    }
    // Forwarding between the bridges and the uplinks; written through procfs in this
    // namespace. The uplink programs keep the host from forwarding anything else.
    netns::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    let mut cfg = if fresh {
        Config::defaults()
    } else {
        dp.config()?
    };
    cfg.host_netns_cookie = cookie;
    cfg.uplink_ifindex = uplink.index;
    cfg.uplink_ip = uplink_ip.octets();
    cfg.policy_default = state.policy.default.map_value();
    let mode = datapath_mode(opts, state.datapath.as_ref().map(|d| d.mode.as_str()))?;
    cfg.datapath = if mode == "redirect" {
        md_common::DATAPATH_REDIRECT
    } else {
        md_common::DATAPATH_STACK
    };
    dp.set_config(&cfg)?;
    if fresh {
        crate::policy::sync(dp, state)?;
    }
    if sync {
        sync_uplinks(nl, dp, &owned_links(state), &opts.state_dir).await?;
        dp.attach_cgroup()?;
        set_host_addrs(dp, &addrs)?;
        set_host_addrs6(dp, &addrs6)?;
    }
    state.datapath = Some(DatapathState {
        uplink: uplink.name.clone(),
        uplink_ifindex: uplink.index,
        uplink_ip,
        netns_cookie: cookie,
        object_digest: digest,
        mode: mode.to_string(),
    });
    ensure_watcher(opts)?;
    Ok(())
}

/// Turns IPv6 forwarding on in md's host namespace (for its first dual-stack network), as
/// Docker does. A forwarding host ignores router advertisements on interfaces whose accept_ra
/// is 1, which would take a SLAAC host's default route away: those are set to 2 (accept them
/// while forwarding), what Docker's documentation asks of its users.
pub fn ipv6_forwarding() -> Result<()> {
    let all = "/proc/sys/net/ipv6/conf/all/forwarding";
    if fs::read_to_string(all).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    for e in fs::read_dir("/proc/sys/net/ipv6/conf")
        .context("reading /proc/sys/net/ipv6/conf")?
        .flatten()
    {
        let ra = e.path().join("accept_ra");
        let name = e.file_name();
        if name == "all" || name == "default" || name == "lo" {
            continue;
        }
        if fs::read_to_string(&ra).is_ok_and(|v| v.trim() == "1") {
            netns::write_sysctl(&ra.to_string_lossy(), "2")?;
        }
    }
    netns::write_sysctl(all, "1")
}

/// Whether this kernel can deliver packets itself: bpf_redirect_peer and bpf_redirect_neigh
/// came in Linux 5.10.
pub fn redirect_supported() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 10, 0))
}

/// The datapath mode to run: the one asked for, else the one in use, else the fastest this
/// kernel has. The seam for another mode (netkit, where kernels have it) is here and in
/// `endpoint::setup`, which picks the device pair.
fn datapath_mode(opts: &GlobalOpts, current: Option<&str>) -> Result<&'static str> {
    let want = opts.datapath.as_deref().or(current);
    match want {
        Some("redirect") | None if redirect_supported() => Ok("redirect"),
        Some("redirect") if opts.datapath.is_some() => {
            bail!("--datapath redirect needs bpf_redirect_peer (Linux 5.10); this kernel has none")
        }
        _ => Ok("stack"),
    }
}

/// Names of the links md made (bridges, container veths), from the state: they are recorded
/// before they are created, so a link event never sees one of them unaccounted for.
pub fn owned_links(state: &State) -> HashSet<String> {
    state
        .networks
        .values()
        .map(|n| n.bridge.clone())
        .chain(
            state
                .containers
                .values()
                .flat_map(|c| c.interfaces.iter().map(|i| i.veth.clone())),
        )
        // Issue 17: the overlay's VXLAN device.
        .chain(crate::overlay::owned_links(state))
        .collect()
}

/// Whether md leaves a link alone: loopback, its own links, ports of its bridges, and devices
/// whose frames it cannot parse.
fn skipped(link: &Link, owned: &HashSet<String>, bridges: &HashSet<u32>) -> bool {
    matches!(link.layer, Layer::Loopback | Layer::Other)
        || owned.contains(&link.name)
        || bridges.contains(&link.index)
        || link.controller.is_some_and(|c| bridges.contains(&c))
        || is_md_veth_name(&link.name)
}

/// md's container veths are `md` + 8 hex digits (the id's first 8).
pub fn is_md_veth_name(name: &str) -> bool {
    name.len() == 10
        && name
            .strip_prefix("md")
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Attaches md's uplink programs to every host interface md did not make and removes the
/// attachments of interfaces that are gone (an interface recreated under the same name is a
/// new one). Idempotent; serialized with a lock so the watcher and a command never race.
pub async fn sync_uplinks(
    nl: &Netlink,
    dp: &Datapath,
    owned: &HashSet<String>,
    state_dir: &Path,
) -> Result<Vec<Link>> {
    let _lock = lock_file(&state_dir.join("uplinks.lock"), true)?;
    let links = nl.links().await?;
    let owned_bridges: HashSet<String> = owned.clone();
    let bridges: HashSet<u32> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge") && owned_bridges.contains(&l.name))
        .map(|l| l.index)
        .collect();
    let uplinks: Vec<Link> = links
        .into_iter()
        .filter(|l| !skipped(l, owned, &bridges))
        .collect();
    let mut want = HashSet::new();
    for l in &uplinks {
        let pin = format!("{UPLINK_PIN}{}", l.index);
        let (ingress, egress) = match l.layer {
            Layer::Ip => (m::PROG_L3_INGRESS, m::PROG_L3_EGRESS),
            _ => (m::PROG_UPLINK_INGRESS, m::PROG_UPLINK_EGRESS),
        };
        let new = dp.tc_pin_ifindex(&pin, Hook::Ingress).is_none();
        if new {
            dp.reset_if_stats(l.index)?;
        }
        dp.attach_tc(&l.name, Hook::Ingress, ingress, &pin)
            .with_context(|| format!("covering interface {}", l.name))?;
        dp.attach_tc(&l.name, Hook::Egress, egress, &pin)
            .with_context(|| format!("covering interface {}", l.name))?;
        want.insert(pin);
    }
    for pin in dp.tc_pins() {
        let Some(idx) = pin
            .strip_prefix(UPLINK_PIN)
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        if !want.contains(&pin) {
            dp.detach_tc(&pin)?;
            if let Ok(mut stats) = dp.if_stats() {
                let _ = stats.remove(&idx);
            }
        }
    }
    Ok(uplinks)
}

/// The uplinks md has attached to (ifindex, pin present), for stats and monitor.
pub fn uplink_ifindexes(dp: &Datapath) -> Vec<u32> {
    dp.tc_pins()
        .iter()
        .filter_map(|p| p.strip_prefix(UPLINK_PIN)?.parse().ok())
        .collect()
}

/// Tells the datapath the host's addresses (published ports answer on them). Never loopback:
/// a packet from the wire to 127.0.0.1 must not reach a port published on 127.0.0.1.
pub async fn refresh_host_addrs(nl: &Netlink, dp: &Datapath) -> Result<Vec<Ipv4Addr>> {
    set_host_addrs6(dp, &nl.ipv6_addresses().await?)?;
    set_host_addrs(dp, &nl.ipv4_addresses().await?)
}

/// The host's IPv6 addresses that went away since the last refresh are returned by
/// [`set_host_addrs6`]; the watcher forgets their flows.
async fn refresh_host_addrs6(nl: &Netlink, dp: &Datapath) -> Result<Vec<std::net::Ipv6Addr>> {
    set_host_addrs6(dp, &nl.ipv6_addresses().await?)
}

fn set_host_addrs6(
    dp: &Datapath,
    addrs: &[(u32, std::net::Ipv6Addr, u8)],
) -> Result<Vec<std::net::Ipv6Addr>> {
    let ips: Vec<std::net::Ipv6Addr> = addrs.iter().map(|(_, ip, _)| *ip).collect();
    dp.set_host_addrs6(&ips)
}

fn set_host_addrs(dp: &Datapath, addrs: &[(u32, Ipv4Addr, u8)]) -> Result<Vec<Ipv4Addr>> {
    let ips: Vec<Ipv4Addr> = addrs
        .iter()
        .map(|(_, ip, _)| *ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    dp.set_host_addrs(&ips)
}

/// An exclusive flock on `path`, blocking or not; None when `wait` is false and someone else
/// holds it.
fn lock_file(path: &Path, wait: bool) -> Result<Option<File>> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("locking {}", path.display()));
    }
    Ok(Some(f))
}

fn watcher_lock(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("watch.lock")
}

fn watcher_pid(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("watch.pid")
}

/// Whether a watcher holds `watch.lock` (it does while it lives).
fn watcher_running(state_dir: &Path) -> bool {
    matches!(lock_file(&watcher_lock(state_dir), false), Ok(None))
}

/// Starts the watcher unless one runs (it holds `watch.lock` while it lives, whoever started
/// it: this command, or systemd's md-watch.service).
pub fn ensure_watcher(opts: &GlobalOpts) -> Result<()> {
    if lock_file(&watcher_lock(&opts.state_dir), false)?.is_none() {
        return Ok(());
    }
    let mut cmd = opts.self_command();
    cmd.arg("watch");
    let (child, msg) = proc::spawn_with_ready_pipe(cmd, |cmd, fd| {
        cmd.arg("--ready-fd").arg(fd.to_string());
    })
    .context("starting md's host watcher")?;
    if !msg.starts_with("ok") {
        bail!("md's host watcher did not start: {}", msg.trim());
    }
    std::mem::forget(child);
    Ok(())
}

/// Stops the watcher (for `down`) and waits for it to go.
pub fn stop_watcher(state_dir: &Path) {
    let Ok(text) = fs::read_to_string(watcher_pid(state_dir)) else {
        return;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return;
    };
    if proc::signal(pid, start, libc::SIGTERM) {
        for _ in 0..200 {
            if !proc::alive(pid, start) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let _ = fs::remove_file(watcher_pid(state_dir));
}

/// `md-user watch`: follows the host. On every link or IPv4 address change it covers new
/// interfaces, drops the attachments of vanished ones and refreshes the host's addresses
/// (flows masqueraded behind an address that went away are forgotten, as Linux's MASQUERADE
/// does); every 30 s it collects expired tracker entries. One per state directory; `down`
/// stops it.
pub async fn watch(opts: &GlobalOpts, dp: &Datapath, ready: Option<File>) -> Result<()> {
    use futures_util::StreamExt;
    use rtnetlink::MulticastGroup;
    let Some(_lock) = lock_file(&watcher_lock(&opts.state_dir), false)? else {
        // Another watcher runs already: nothing to do.
        if let Some(mut r) = ready {
            std::io::Write::write_all(&mut r, b"ok")?;
        }
        return Ok(());
    };
    let (me, start) = proc::self_identity();
    fs::write(watcher_pid(&opts.state_dir), format!("{me} {start}\n"))?;
    let (conn, _, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
    ])
    .context("subscribing to link, address and route events")?;
    tokio::spawn(conn);
    let nl = Netlink::connect()?;
    let state_dir = StateDir::new(&opts.state_dir);
    // Started before any container (systemd at boot): load and attach now, so the first
    // container pays no verification. Until the host has a default route this may fail; it
    // is tried again on every event.
    let mut preload_error = None;
    if !dp.is_loaded() {
        preload_error = preload(&nl, dp, &state_dir, opts).await.err();
    }
    if let Some(mut r) = ready {
        std::io::Write::write_all(&mut r, b"ok")?;
    }
    if let Some(e) = preload_error {
        eprintln!(
            "md-user watch: loading the datapath: {}",
            crate::error::one_line(&e)
        );
    }
    // Issue 17: the lease and the store's view of the other hosts, while in a cluster.
    tokio::spawn(crate::overlay::follow(
        opts.clone(),
        Datapath::new(&dp.pin_dir),
    ));
    let mut gc = tokio::time::interval(std::time::Duration::from_secs(30));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.next() => {
                if ev.is_none() {
                    bail!("the netlink event stream ended");
                }
                // A burst (an interface and its addresses) is handled once.
                while let Ok(Some(_)) =
                    tokio::time::timeout(std::time::Duration::from_millis(20), events.next()).await
                {}
            }
            _ = gc.tick() => {
                if dp.is_loaded() {
                    let _ = dp.gc_conntrack();
                }
                continue;
            }
            _ = term.recv() => break,
        }
        if !dp.is_loaded() {
            if let Err(e) = preload(&nl, dp, &state_dir, opts).await {
                eprintln!(
                    "md-user watch: loading the datapath: {}",
                    crate::error::one_line(&e)
                );
            }
            continue;
        }
        if let Err(e) = follow_host(&nl, dp, &state_dir, &opts.state_dir).await {
            eprintln!("md-user watch: {}", crate::error::one_line(&e));
        }
    }
    let _ = fs::remove_file(watcher_pid(&opts.state_dir));
    Ok(())
}

/// Loads and attaches the datapath as the first `run` would (under the state lock).
async fn preload(nl: &Netlink, dp: &Datapath, sd: &StateDir, opts: &GlobalOpts) -> Result<()> {
    let mut locked = sd.lock()?;
    ensure_datapath(nl, dp, &mut locked.state, opts).await?;
    locked.save()
}

async fn follow_host(nl: &Netlink, dp: &Datapath, sd: &StateDir, state_dir: &Path) -> Result<()> {
    let state = sd.peek()?;
    sync_uplinks(nl, dp, &owned_links(&state), state_dir).await?;
    for gone in refresh_host_addrs6(nl, dp).await? {
        dp.purge_conntrack6(gone)?;
    }
    for gone in refresh_host_addrs(nl, dp).await? {
        dp.purge_conntrack(gone)?;
    }
    Ok(())
}

/// Removes the whole datapath: the watcher, the uplinks' attachments and the pins (the
/// networks go first: `network::remove_all`). Best effort; idempotent.
pub fn teardown(dp: &Datapath, state: &mut State, state_dir: &Path) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    stop_watcher(state_dir);
    for pin in dp.tc_pins() {
        if pin.starts_with(UPLINK_PIN) {
            if let Err(e) = dp.detach_tc(&pin) {
                errors.push(e);
            }
        }
    }
    if let Err(e) = dp.unload() {
        errors.push(e);
    }
    state.datapath = None;
    errors
}
