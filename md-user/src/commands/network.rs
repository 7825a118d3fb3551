use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    reconcile,
    run::{validate_hostname, validate_name},
    Ctx,
};
use crate::{
    attach::{self, IfaceSpec},
    cli::NetworkCmd,
    host,
    ipam::{format_mac, Subnet, Subnet6},
    netlink::Netlink,
    netns::Netns,
    network::{self, Settings, OPT_BRIDGE_NAME, OPT_GATEWAY_MODE, OPT_GATEWAY_MODE6, OPT_MTU},
    proc,
    state::{GatewayMode, Network, State, Status, DEFAULT_NETWORK},
};

pub async fn network(ctx: &Ctx, cmd: NetworkCmd) -> Result<ExitCode> {
    // Parse before taking the lock or creating anything.
    let (settings, overlay_subnet) = match &cmd {
        NetworkCmd::Create {
            name,
            subnet,
            driver,
            store,
            mode,
            gateway,
            ip_range,
            mtu,
            internal,
            gateway_mode,
            opt,
            ipv6,
            subnet6,
            gateway_mode_ipv6,
        } => {
            validate_name(name)?;
            if driver != "overlay" && (store.is_some() || mode.is_some()) {
                bail!("--store and --mode are options of --driver overlay");
            }
            if driver == "overlay" {
                if gateway.is_some()
                    || ip_range.is_some()
                    || mtu.is_some()
                    || *internal
                    || gateway_mode.is_some()
                    || !opt.is_empty()
                {
                    bail!("--gateway, --ip-range, --mtu, --internal, --gateway-mode and --opt are options of --driver bridge (an overlay's MTU is the underlay's less VXLAN's)");
                }
                if *ipv6 || subnet6.is_some() || gateway_mode_ipv6 != "nat" {
                    bail!("overlay networks are IPv4 only: --ipv6, --subnet6 and --gateway-mode-ipv6 are options of --driver bridge");
                }
                if let Some(s) = store {
                    crate::store::parse_url(s)?;
                }
                let subnet = subnet.as_deref().map(str::parse::<Subnet>).transpose()?;
                if let Some(s) = &subnet {
                    crate::overlay::block_prefix(s)?;
                }
                (None, subnet)
            } else {
                let mut settings = Settings::parse(
                    subnet.as_deref(),
                    *gateway,
                    ip_range.as_deref(),
                    *mtu,
                    *internal,
                    gateway_mode.as_deref(),
                    opt,
                )?;
                let subnet6 = subnet6.as_deref().map(str::parse::<Subnet6>).transpose()?;
                let routed = gateway_mode_ipv6 == "routed";
                if routed && !ipv6 && subnet6.is_none() {
                    bail!("--gateway-mode-ipv6 routed needs --ipv6");
                }
                if routed && *internal {
                    bail!("an --internal network has no way out to route: --gateway-mode-ipv6 routed does not apply");
                }
                settings.v6 = (*ipv6 || subnet6.is_some()).then_some((subnet6, routed));
                (Some(settings), None)
            }
        }
        NetworkCmd::Connect { aliases, .. } => {
            for a in aliases {
                validate_hostname(a).with_context(|| format!("--alias {a:?}"))?;
            }
            (None, None)
        }
        _ => (None, None),
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
                subnet: overlay_subnet,
                store,
                mode,
            };
            crate::overlay::create_network(ctx, &nl, &mut locked, args).await?;
            println!("{name}");
        }
        NetworkCmd::Create { name, .. } => {
            let settings = settings.expect("parsed above");
            if let Some(b) = &settings.bridge {
                // A bridge md did not make is not md's to take over (nor to delete later).
                if nl.link_by_name(b).await?.is_some() {
                    bail!("interface {b} exists already: md makes its network's bridge itself");
                }
            }
            let net = network::create_with(state, &name, settings)?;
            // Recorded before the bridge exists: the watcher never takes it for an uplink,
            // and a crash leaves a network `network rm` removes.
            locked.save()?;
            let state = &mut locked.state;
            let made = async {
                host::ensure_datapath(&nl, &ctx.dp, state, &ctx.opts).await?;
                network::ensure_bridge(&nl, &ctx.dp, &net).await
            }
            .await;
            if let Err(e) = made {
                let _ = network::remove_bridge(&nl, &ctx.dp, &net).await;
                state.networks.remove(&name);
                locked.save()?;
                return Err(e);
            }
            println!("{name}");
        }
        NetworkCmd::Inspect { names, json } => {
            let mut out = Vec::new();
            for name in &names {
                let net = state
                    .networks
                    .get(name)
                    .with_context(|| format!("no such network: {name}"))?;
                out.push(inspect_json(state, name, net));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for n in &out {
                    print_inspect(n);
                }
            }
            return Ok(ExitCode::SUCCESS);
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
                        "mtu": n.overlay.as_ref().map(|o| o.mtu).or(n.mtu),
                        "gateway": n.gateway().to_string(),
                        "internal": n.internal,
                        "gateway_mode": n.gateway_mode.as_str(),
                        "subnet6": n.subnet6.map(|s| s.to_string()),
                        "gateway6": n.subnet6.map(|s| s.gateway().to_string()),
                        "gateway_mode_ipv6": n.subnet6.map(|_| if n.routed6 { "routed" } else { "nat" }),
                        "containers": members,
                        "remote": remote,
                        "dns": proc::alive(n.dns_pid, n.dns_start),
                        // Docker's networks on it (md-user docker-plugin) and the addresses
                        // md's IPAM driver has leased to Docker on its subnet.
                        "docker_networks": state.docker.networks.iter()
                            .filter(|(_, m)| *m == name).map(|(id, _)| id).collect::<Vec<_>>(),
                        "docker_leases": state.docker.leased_in(&n.subnet)
                            .map(|ip| ip.to_string()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<16} {:<8} {:<8} {:<18} {:<16} {:<24} CONTAINERS",
                    "NAME", "DRIVER", "BRIDGE", "SUBNET", "GATEWAY", "SUBNET6"
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
                        "{:<16} {:<8} {:<8} {:<18} {:<16} {:<24} {}",
                        r["name"].as_str().unwrap_or(""),
                        r["driver"].as_str().unwrap_or(""),
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
            ip6,
            aliases,
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
                ip6,
                mac: None,
                name,
                reserved: false,
                handover: false,
                aliases,
            };
            attach::add_interface(ctx, &nl, &mut locked, &container, want, Some(&netns)).await?;
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

/// `docker network inspect`'s object for one network.
fn inspect_json(state: &State, name: &str, net: &Network) -> Value {
    let mut ipam = json!({
        "Subnet": net.span().to_string(),
        "Gateway": net.gateway().to_string(),
    });
    if let Some(r) = &net.ip_range {
        ipam["IPRange"] = json!(r.to_string());
    }
    // An overlay allocates from this host's block (issue 17).
    if net.overlay.is_some() {
        ipam["IPRange"] = json!(net.subnet.to_string());
    }
    let containers: serde_json::Map<String, Value> = state
        .containers
        .values()
        .filter_map(|c| {
            let i = c.interfaces.iter().find(|i| i.network == name)?;
            Some((
                c.id.clone(),
                json!({
                    "Name": c.name,
                    "EndpointID": i.veth,
                    "MacAddress": format_mac(&i.mac),
                    "IPv4Address": format!("{}/{}", i.ip, net.subnet.prefix_len),
                    "IPv6Address": match (i.ip6, net.subnet6) {
                        (Some(ip6), Some(s6)) => format!("{ip6}/{}", s6.prefix_len),
                        _ => String::new(),
                    },
                }),
            ))
        })
        .collect();
    // The options as given, and what md chose where they were not (the bridge's name), in
    // Docker's keys.
    let mut options = net.options.clone();
    options.insert(OPT_BRIDGE_NAME.into(), net.bridge.clone());
    if let Some(m) = net.overlay.as_ref().map(|o| o.mtu).or(net.mtu) {
        options.insert(OPT_MTU.into(), m.to_string());
    }
    if net.gateway_mode != GatewayMode::Nat {
        options.insert(OPT_GATEWAY_MODE.into(), net.gateway_mode.as_str().into());
    }
    if net.routed6 {
        options.insert(OPT_GATEWAY_MODE6.into(), "routed".into());
    }
    let mut config = vec![ipam];
    if let Some(s6) = net.subnet6 {
        config.push(json!({
            "Subnet": s6.to_string(),
            "Gateway": s6.gateway().to_string(),
        }));
    }
    let created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(net.created_unix);
    json!({
        "Name": name,
        "Id": net.docker_id(),
        "Created": humantime::format_rfc3339_seconds(created).to_string(),
        // Docker's multi-host overlay on an external store was "global" too.
        "Scope": if net.overlay.is_some() { "global" } else { "local" },
        "Driver": if net.overlay.is_some() { "overlay" } else { "bridge" },
        "EnableIPv4": true,
        "EnableIPv6": net.subnet6.is_some(),
        "IPAM": {
            "Driver": "default",
            "Options": {},
            "Config": config,
        },
        "Internal": net.internal,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": containers,
        "Options": options,
        "Labels": {},
    })
}

fn print_inspect(n: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let cfg = &n["IPAM"]["Config"][0];
    let opt = &n["Options"];
    println!("Name:        {}", s(&n["Name"]));
    println!("Id:          {}", s(&n["Id"]));
    println!("Created:     {}", s(&n["Created"]));
    println!("Driver:      {}", s(&n["Driver"]));
    println!("Bridge:      {}", s(&opt[OPT_BRIDGE_NAME]));
    println!("Subnet:      {}", s(&cfg["Subnet"]));
    if cfg["IPRange"].is_string() {
        println!("IPRange:     {}", s(&cfg["IPRange"]));
    }
    println!("Gateway:     {}", s(&cfg["Gateway"]));
    let cfg6 = &n["IPAM"]["Config"][1];
    if cfg6["Subnet"].is_string() {
        println!("Subnet6:     {}", s(&cfg6["Subnet"]));
        println!("Gateway6:    {}", s(&cfg6["Gateway"]));
    }
    if opt[OPT_MTU].is_string() {
        println!("MTU:         {}", s(&opt[OPT_MTU]));
    }
    println!("Internal:    {}", n["Internal"]);
    let mode = opt[OPT_GATEWAY_MODE].as_str().unwrap_or("nat");
    println!("GatewayMode: {mode}");
    for (k, v) in n["Options"].as_object().into_iter().flatten() {
        println!("Option:      {k}={}", s(v));
    }
    for (id, c) in n["Containers"].as_object().into_iter().flatten() {
        println!(
            "Container:   {} {} {} {}",
            s(&c["Name"]),
            &id[..id.len().min(12)],
            s(&c["IPv4Address"]),
            s(&c["MacAddress"])
        );
    }
}
