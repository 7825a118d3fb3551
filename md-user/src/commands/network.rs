use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{reconcile, run::validate_name, Ctx};
use crate::{
    attach::{self, IfaceSpec},
    cli::NetworkCmd,
    host,
    ipam::{Subnet, Subnet6},
    netlink::Netlink,
    netns::Netns,
    network, proc,
    state::{Status, DEFAULT_NETWORK},
};

pub async fn network(ctx: &Ctx, cmd: NetworkCmd) -> Result<ExitCode> {
    // Parse before taking the lock or creating anything.
    let (subnet, v6) = match &cmd {
        NetworkCmd::Create {
            name,
            subnet,
            ipv6,
            subnet6,
            gateway_mode_ipv6,
        } => {
            validate_name(name)?;
            let subnet6 = subnet6.as_deref().map(str::parse::<Subnet6>).transpose()?;
            let routed = gateway_mode_ipv6 == "routed";
            if routed && !ipv6 && subnet6.is_none() {
                bail!("--gateway-mode-ipv6 routed needs --ipv6");
            }
            (
                subnet.as_deref().map(str::parse::<Subnet>).transpose()?,
                (*ipv6 || subnet6.is_some()).then_some((subnet6, routed)),
            )
        }
        _ => (None, None),
    };
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    reconcile(ctx, &nl, &mut locked.state).await;
    network::ensure_default(&mut locked.state, &ctx.opts)?;
    let state = &mut locked.state;
    match cmd {
        NetworkCmd::Create { name, .. } => {
            let net = network::create(state, &name, subnet, v6)?;
            host::ensure_datapath(&nl, &ctx.dp, state, &ctx.opts).await?;
            if let Err(e) = network::ensure_bridge(&nl, &ctx.dp, &net).await {
                let _ = network::remove_bridge(&nl, &ctx.dp, &net).await;
                state.networks.remove(&name);
                return Err(e);
            }
            println!("{name}");
        }
        NetworkCmd::Ls { json } => {
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
                    json!({
                        "name": name,
                        "id": n.id,
                        "bridge": n.bridge,
                        "subnet": n.subnet.to_string(),
                        "gateway": n.subnet.gateway().to_string(),
                        "subnet6": n.subnet6.map(|s| s.to_string()),
                        "gateway6": n.subnet6.map(|s| s.gateway().to_string()),
                        "gateway_mode_ipv6": n.subnet6.map(|_| if n.routed6 { "routed" } else { "nat" }),
                        "containers": members,
                        "dns": proc::alive(n.dns_pid, n.dns_start),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<16} {:<8} {:<18} {:<16} {:<24} CONTAINERS",
                    "NAME", "BRIDGE", "SUBNET", "GATEWAY", "SUBNET6"
                );
                for r in rows {
                    let members: Vec<&str> = r["containers"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                        .unwrap_or_default();
                    println!(
                        "{:<16} {:<8} {:<18} {:<16} {:<24} {}",
                        r["name"].as_str().unwrap_or(""),
                        r["bridge"].as_str().unwrap_or(""),
                        r["subnet"].as_str().unwrap_or(""),
                        r["gateway"].as_str().unwrap_or(""),
                        r["subnet6"].as_str().unwrap_or("-"),
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
            ip6,
        } => {
            if !state.networks.contains_key(&net_name) {
                bail!("no such network: {net_name}");
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
                ip6,
                mac: None,
                name,
            };
            attach::add_interface(ctx, &nl, &mut locked, &container, want, &netns).await?;
        }
        NetworkCmd::Disconnect {
            network: net_name,
            container,
        } => attach::remove_interface(ctx, &nl, state, &container, &net_name).await?,
    }
    locked.save()?;
    Ok(ExitCode::SUCCESS)
}
