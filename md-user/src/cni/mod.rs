//! md as a CNI plugin (spec 0.3.0 to 1.1.0): md-user answers the CNI protocol when it is
//! called as `md` (or `md-cni`), the `type` a conflist names. Each verb is a short translation
//! onto the core in `attach.rs`, on the same state, maps and IPAM as `md-user run`.
//!
//! A CNI container has no supervisor: once ADD has finished it lives as long as its network
//! namespace, which the host-side veths tell (they vanish with it), and until the runtime's DEL
//! or GC. A plugin killed mid-ADD leaves a `Creating` record owned by its dead pid, which the
//! next command reclaims like a killed `md-user run`.

pub mod config;
pub mod error;
pub mod result;
pub mod version;

use std::{io::Read, path::Path, process::ExitCode};

use serde_json::{json, Value};

use crate::{
    attach::{self, Ctx, IfaceSpec, Spec},
    netlink::Netlink,
    netns::Netns,
    network,
    state::{CniOwner, Locked, State, Status},
};
use config::{Env, NetConf};
use error::{CniError, Code};
use version::Version;

/// Whether md-user was called as the CNI plugin: by its file name in a CNI plugin directory.
pub fn called_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n == "md" || n == "md-cni")
        })
        .unwrap_or(false)
}

/// The plugin's entry point: a result, nothing, or an error object on stdout.
pub fn main() -> ExitCode {
    let env = Env::from_process();
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let out = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(Code::Io, format!("reading stdin: {e}"))),
    };
    match out {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json());
            ExitCode::FAILURE
        }
    }
}

fn run(env: &Env, stdin: &str) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => {
            return Ok(Some(json!({
                "cniVersion": Version::LATEST.to_string(),
                "supportedVersions": version::supported_list(),
            })))
        }
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {}
        "" => return Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
        other => {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("unknown CNI_COMMAND {other:?}"),
            ))
        }
    }
    let (conf, v) = config::parse(stdin)?;
    crate::error::require_privileges().map_err(|e| CniError::from(e).version(v))?;
    let rt = crate::commands::runtime().map_err(|e| CniError::from(e).version(v))?;
    rt.block_on(async {
        let ctx = Ctx::new(conf.opts());
        match env.command.as_str() {
            "ADD" => add(&ctx, &conf, v, env).await.map(Some),
            "DEL" => del(&ctx, &conf, env).await.map(|_| None),
            "CHECK" => check(&ctx, &conf, v, env).await.map(|_| None),
            "STATUS" => status(&ctx, v).await.map(|_| None),
            _ => gc(&ctx, &conf, v).await.map(|_| None),
        }
    })
    .map_err(|e| e.version(v))
}

/// The md container a runtime's container id names.
fn by_id<'a>(state: &'a State, id: &str) -> Option<&'a crate::state::Container> {
    state
        .containers
        .values()
        .find(|c| c.cni.as_ref().is_some_and(|o| o.container_id == id))
}

async fn add(ctx: &Ctx, conf: &NetConf, v: Version, env: &Env) -> Result<Value, CniError> {
    env.require_attachment(true)?;
    let req = config::request(conf, env)?;
    let netns = Netns::open(Path::new(&env.netns))
        .map_err(|e| CniError::new(Code::UnknownContainer, crate::error::one_line(&e)))?;
    let nl = Netlink::connect()?;
    let mut locked = attach::lock(ctx, &nl).await?;
    let md_net = conf.md_network();
    ensure_network(&mut locked, conf, &md_net)?;
    let want = IfaceSpec {
        network: md_net.clone(),
        ip: req.ip,
        // The CNI plugin attaches IPv4 only (no ranges of type IPv6 in its configuration).
        ip6: None,
        mac: req.mac,
        name: env.ifname.clone(),
        reserved: false,
        handover: false,
        // CNI aliases are per network: this interface's.
        aliases: req.aliases.clone(),
    };
    let name = match by_id(&locked.state, &env.container_id) {
        Some(c) if c.interfaces.iter().any(|i| i.name == env.ifname) => {
            return Err(CniError::new(
                Code::Internal,
                format!(
                    "container {} already has {} on md (container {}); DEL it first",
                    env.container_id, env.ifname, c.name
                ),
            ))
        }
        // One more network for a container md knows (Podman's second --network): one more
        // interface of the same md container. Ports go with the first.
        Some(c) => {
            let name = c.name.clone();
            attach::add_interface(ctx, &nl, &mut locked, &name, want, Some(&netns)).await?;
            let c = locked.state.containers.get_mut(&name).expect("present");
            if let Some(o) = c.cni.as_mut() {
                o.networks.insert(env.ifname.clone(), conf.name.clone());
            }
            locked.save()?;
            name
        }
        None => {
            let spec = Spec {
                name: req.name.clone(),
                hostname: req.name.clone(),
                mode: md_net.clone(),
                iface: Some(want),
                ports: req.ports.clone(),
                cmd: Vec::new(),
                detached: true,
                cni: Some(CniOwner {
                    container_id: env.container_id.clone(),
                    netns: env.netns.clone(),
                    networks: [(env.ifname.clone(), conf.name.clone())].into(),
                }),
                privileged: false,
                docker: None,
                dns: Default::default(),
                extra_hosts: Vec::new(),
                exposed: Vec::new(),
            };
            attach::create(ctx, &nl, &mut locked, spec, Some(&netns)).await?;
            // Attached: from now on the namespace, not this process, keeps it alive.
            let c = locked.state.containers.get_mut(&req.name).expect("created");
            c.status = Status::Running;
            c.supervisor_pid = 0;
            c.supervisor_start = 0;
            locked.save()?;
            req.name
        }
    };
    let state = &locked.state;
    let c = &state.containers[&name];
    let iface = c
        .interfaces
        .iter()
        .find(|i| i.name == env.ifname)
        .expect("attached");
    let net = &state.networks[&iface.network];
    let host_mac = nl
        .link_by_name(&iface.veth)
        .await?
        .map(|l| l.mac)
        .unwrap_or_default();
    let out = result::Attached {
        host_veth: iface.veth.clone(),
        host_mac,
        ifname: iface.name.clone(),
        mac: iface.mac,
        sandbox: env.netns.clone(),
        ip: iface.ip,
        prefix_len: net.subnet.prefix_len,
        gateway: net.subnet.gateway(),
        default_route: c.interfaces[0].name == iface.name,
    };
    Ok(result::build(
        v,
        conf.prev_result.as_ref(),
        &out,
        &result::dns(conf),
    ))
}

/// Creates a non-default md network named in the configuration on first use, when the
/// configuration gives its subnet (the default network is made by the core).
fn ensure_network(locked: &mut Locked, conf: &NetConf, md_net: &str) -> Result<(), CniError> {
    let state = &mut locked.state;
    if md_net == crate::state::DEFAULT_NETWORK || state.networks.contains_key(md_net) {
        return Ok(());
    }
    let Some(subnet) = &conf.subnet else {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "no md network {md_net}: create it (md-user network create) or give its subnet"
            ),
        ));
    };
    let subnet = subnet.parse().map_err(CniError::from)?;
    network::create(state, md_net, Some(subnet), None)?;
    locked.save()?;
    Ok(())
}

/// Removes one attachment (container id, interface). The container goes with its last
/// interface, or with its first (its ports and default route are there).
async fn remove_attachment(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    name: &str,
    ifname: &str,
) -> anyhow::Result<()> {
    let Some(c) = locked.state.containers.get(name) else {
        return Ok(());
    };
    let Some(pos) = c.interfaces.iter().position(|i| i.name == ifname) else {
        return Ok(());
    };
    if pos == 0 || c.interfaces.len() == 1 {
        return attach::discard(ctx, nl, locked, name).await;
    }
    let network = c.interfaces[pos].network.clone();
    attach::remove_interface(ctx, nl, &mut locked.state, name, &network).await?;
    if let Some(o) = locked
        .state
        .containers
        .get_mut(name)
        .and_then(|c| c.cni.as_mut())
    {
        o.networks.remove(ifname);
    }
    locked.save()
}

/// DEL: succeeds when there is nothing (left) to remove, namespace gone included.
async fn del(ctx: &Ctx, _conf: &NetConf, env: &Env) -> Result<(), CniError> {
    env.require_attachment(false)?;
    let nl = Netlink::connect()?;
    let mut locked = attach::lock(ctx, &nl).await?;
    let Some(name) = by_id(&locked.state, &env.container_id).map(|c| c.name.clone()) else {
        return Ok(());
    };
    remove_attachment(ctx, &nl, &mut locked, &name, &env.ifname).await?;
    Ok(())
}

/// CHECK: an error unless everything ADD made is still there and as ADD left it.
async fn check(ctx: &Ctx, conf: &NetConf, v: Version, env: &Env) -> Result<(), CniError> {
    v.require(Version(0, 4, 0), "CHECK")?;
    env.require_attachment(true)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(Code::InvalidConfig, "CHECK needs the prevResult of the ADD")
    })?;
    let nl = Netlink::connect()?;
    let locked = attach::lock(ctx, &nl).await?;
    let unknown = || {
        CniError::new(
            Code::UnknownContainer,
            format!(
                "md has no attachment {} {} (gone, or never added)",
                env.container_id, env.ifname
            ),
        )
    };
    let c = by_id(&locked.state, &env.container_id).ok_or_else(unknown)?;
    let iface = c
        .interfaces
        .iter()
        .find(|i| i.name == env.ifname)
        .ok_or_else(unknown)?;
    let netns = Netns::open(Path::new(&env.netns))
        .map_err(|e| CniError::new(Code::UnknownContainer, crate::error::one_line(&e)))?;
    let mut drift = attach::check(ctx, &nl, &locked.state, c, &env.ifname, &netns).await?;
    let prefix = locked.state.networks[&iface.network].subnet.prefix_len;
    let mine = format!("{}/{prefix}", iface.ip);
    let listed = result::addresses_of(prev, &env.ifname);
    if !listed.contains(&mine) {
        drift.push(format!(
            "prevResult lists {listed:?} on {}, md has {mine}",
            env.ifname
        ));
    }
    if drift.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        Code::Drift,
        format!("{} {}: {}", env.container_id, env.ifname, drift.join("; ")),
    ))
}

/// STATUS: ready unless md's recorded datapath is broken or there is no uplink to attach it to.
async fn status(ctx: &Ctx, v: Version) -> Result<(), CniError> {
    v.require(Version(1, 1, 0), "STATUS")?;
    let nl = Netlink::connect()?;
    let locked = attach::lock(ctx, &nl).await?;
    let unavailable = |m: String| CniError::new(Code::NotAvailable, m);
    if locked.state.datapath.is_some() && !ctx.dp.is_loaded() {
        return Err(unavailable(format!(
            "md's datapath is recorded in {} but not pinned in {}; run `md-user down`",
            ctx.state_dir.dir.display(),
            ctx.dp.pin_dir.display()
        )));
    }
    let uplink = match &ctx.opts.uplink {
        Some(u) => nl.link_by_name(u).await?.is_some(),
        None => nl.default_route_link().await?.is_some(),
    };
    if !uplink {
        return Err(unavailable(match &ctx.opts.uplink {
            Some(u) => format!("uplink {u} does not exist"),
            None => "no uplink: no IPv4 default route; set uplink in the configuration".into(),
        }));
    }
    Ok(())
}

/// GC: removes this CNI network's attachments the runtime no longer lists.
async fn gc(ctx: &Ctx, conf: &NetConf, v: Version) -> Result<(), CniError> {
    v.require(Version(1, 1, 0), "GC")?;
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "GC needs cni.dev/valid-attachments"))?;
    let nl = Netlink::connect()?;
    let mut locked = attach::lock(ctx, &nl).await?;
    let stale: Vec<(String, String)> = locked
        .state
        .containers
        .values()
        .filter_map(|c| Some((c, c.cni.as_ref()?)))
        .flat_map(|(c, o)| {
            o.networks
                .iter()
                .filter(|(_, net)| **net == conf.name)
                .filter(|(ifname, _)| {
                    !valid
                        .iter()
                        .any(|a| a.container_id == o.container_id && a.ifname == **ifname)
                })
                .map(|(ifname, _)| (c.name.clone(), ifname.clone()))
        })
        .collect();
    for (name, ifname) in stale {
        remove_attachment(ctx, &nl, &mut locked, &name, &ifname).await?;
    }
    Ok(())
}
