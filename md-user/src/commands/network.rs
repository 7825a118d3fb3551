use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{reconcile, run::validate_name, Ctx};
use crate::{
    attach::{self, IfaceSpec},
    cli::NetworkCmd,
    host,
    ipam::Subnet,
    netlink::Netlink,
    netns::Netns,
    network, proc,
    state::{Status, DEFAULT_NETWORK},
};

pub async fn network(ctx: &Ctx, cmd: NetworkCmd) -> Result<ExitCode> {
    // Parse before taking the lock or creating anything.
    let subnet = match &cmd {
        NetworkCmd::Create {
            name,
            subnet,
            driver,
            store,
            mode,
        } => {
            validate_name(name)?;
            if driver != "overlay" && (store.is_some() || mode.is_some()) {
                bail!("--store and --mode are options of --driver overlay");
            }
            if let Some(s) = store {
                crate::store::parse_url(s)?;
            }
            let subnet = subnet.as_deref().map(str::parse::<Subnet>).transpose()?;
            if driver == "overlay" {
                if let Some(s) = &subnet {
                    crate::overlay::block_prefix(s)?;
                }
            }
            subnet
        }
        _ => None,
    };
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    reconcile(ctx, &nl, &mut locked.state).await;
    network::ensure_default(&mut locked.state, &ctx.opts)?;
    let state = &mut locked.state;
    match cmd {
        NetworkCmd::Create {
            name,
            driver,
            store,
            mode,
            ..
        } if driver == "overlay" => {
            let args = crate::overlay::CreateArgs {
                name: name.clone(),
                subnet,
                store,
                mode,
            };
            crate::overlay::create_network(ctx, &nl, &mut locked, args).await?;
            println!("{name}");
        }
        NetworkCmd::Create { name, .. } => {
            let net = network::create(state, &name, subnet)?;
            host::ensure_datapath(&nl, &ctx.dp, state, &ctx.opts).await?;
            if let Err(e) = network::ensure_bridge(&nl, &ctx.dp, &net).await {
                let _ = network::remove_bridge(&nl, &ctx.dp, &net).await;
                state.networks.remove(&name);
                return Err(e);
            }
            println!("{name}");
        }
        NetworkCmd::Ls { json } => {
            // Issue 17: overlay peers listed here are as the store last said.
            if let Some(w) = crate::overlay::store_warning(state, &ctx.state_dir.dir) {
                eprintln!("md-user: warning: {w}");
            }
            let rows: Vec<_> = state
                .networks
                .iter()
                .map(|(name, n)| {
                    let members: Vec<&str> = state
                        .containers
                        .values()
                        .filter(|c| c.on_network(name))
                        .map(|c| c.name.as_str())
                        .collect();
                    let remote: Vec<&str> = state
                        .remote
                        .iter()
                        .filter(|(_, r)| &r.network == name)
                        .map(|(n, _)| n.as_str())
                        .collect();
                    json!({
                        "name": name,
                        "id": n.id,
                        "bridge": n.bridge,
                        "driver": if n.overlay.is_some() { "overlay" } else { "bridge" },
                        "subnet": n.span().to_string(),
                        // Overlay: this host's block of the subnet.
                        "block": n.overlay.as_ref().map(|_| n.subnet.to_string()),
                        "mode": n.overlay.as_ref().map(|o| o.mode.clone()),
                        "mtu": n.overlay.as_ref().map(|o| o.mtu),
                        "gateway": n.subnet.gateway().to_string(),
                        "containers": members,
                        "remote": remote,
                        "dns": proc::alive(n.dns_pid, n.dns_start),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<16} {:<8} {:<8} {:<18} {:<16} CONTAINERS",
                    "NAME", "DRIVER", "BRIDGE", "SUBNET", "GATEWAY"
                );
                let names = |k: &str, r: &serde_json::Value| -> Vec<String> {
                    r[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                for r in rows {
                    let mut members = names("containers", &r);
                    // Containers on other hosts, marked as such.
                    members.extend(
                        names("remote", &r)
                            .into_iter()
                            .map(|n| format!("{n}(remote)")),
                    );
                    println!(
                        "{:<16} {:<8} {:<8} {:<18} {:<16} {}",
                        r["name"].as_str().unwrap_or(""),
                        r["driver"].as_str().unwrap_or(""),
                        r["bridge"].as_str().unwrap_or(""),
                        r["subnet"].as_str().unwrap_or(""),
                        r["gateway"].as_str().unwrap_or(""),
                        members.join(",")
                    );
                }
            }
        }
        NetworkCmd::Rm { names } => {
            for name in &names {
                if name == DEFAULT_NETWORK {
                    bail!("the default network {DEFAULT_NETWORK} cannot be removed (md-user down removes everything)");
                }
                let Some(net) = state.networks.get(name) else {
                    bail!("no such network: {name}");
                };
                let users: Vec<&str> = state
                    .containers
                    .values()
                    .filter(|c| c.on_network(name))
                    .map(|c| c.name.as_str())
                    .collect();
                if !users.is_empty() {
                    bail!("network {name} is in use by {}", users.join(", "));
                }
                let mut net = net.clone();
                if net.overlay.is_some() {
                    crate::overlay::remove_network(ctx, &nl, state, name, &net).await?;
                }
                network::stop_resolver(&mut net);
                network::remove_bridge(&nl, &ctx.dp, &net).await?;
                state.networks.remove(name);
                println!("{name}");
            }
        }
        NetworkCmd::Connect {
            network: net_name,
            container,
            ip,
        } => {
            if !state.networks.contains_key(&net_name) {
                bail!("no such network: {net_name}");
            }
            if state.networks[&net_name].overlay.is_some() {
                bail!("overlay network {net_name} takes containers when they start (run --network {net_name}), not by connect");
            }
            let c = state
                .containers
                .get(&container)
                .with_context(|| format!("no such container: {container}"))?
                .clone();
            if c.status != Status::Running || !proc::alive(c.pid, c.pid_start) {
                bail!("container {container} is not running");
            }
            if c.mode == "host" || c.mode == "none" || c.mode.starts_with("container:") {
                bail!(
                    "container {container} runs with --network {}; it cannot join networks",
                    c.mode
                );
            }
            let name = (0..)
                .map(|i| format!("eth{i}"))
                .find(|n| !c.interfaces.iter().any(|i| &i.name == n))
                .expect("a free name");
            let netns = Netns::of_pid(c.pid)?;
            let want = IfaceSpec {
                network: net_name,
                ip,
                mac: None,
                name,
            };
            attach::add_interface(ctx, &nl, &mut locked, &container, want, &netns).await?;
        }
        NetworkCmd::Disconnect {
            network: net_name,
            container,
        } => {
            if state
                .networks
                .get(&net_name)
                .is_some_and(|n| n.overlay.is_some())
            {
                bail!(
                    "containers leave overlay network {net_name} when they stop, not by disconnect"
                );
            }
            attach::remove_interface(ctx, &nl, state, &container, &net_name).await?
        }
    }
    locked.save()?;
    Ok(ExitCode::SUCCESS)
}
