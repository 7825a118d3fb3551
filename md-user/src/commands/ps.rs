use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use super::{reconcile, Ctx};
use crate::{netlink::Netlink, state::Status};

pub async fn ps(ctx: &Ctx, as_json: bool) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    if !reconcile(ctx, &nl, &mut locked.state).await.is_empty() {
        locked.save()?;
    }
    if let Some(w) = crate::overlay::store_warning(&locked.state, &ctx.state_dir.dir) {
        eprintln!("md-user: warning: {w}");
    }
    let rows: Vec<serde_json::Value> = locked
        .state
        .containers
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "id": c.id,
                "ip": c.primary_ip().map(|i| i.to_string()),
                "ip6": c.primary_ip6().map(|i| i.to_string()),
                "network": c.mode,
                "networks": c.interfaces.iter().map(|i| json!({"network": i.network, "ip": i.ip.to_string(), "ip6": i.ip6.map(|a| a.to_string()), "aliases": i.aliases})).collect::<Vec<_>>(),
                "hostname": c.hostname,
                "pid": c.pid,
                "ports": c.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "status": match c.status { Status::Running => "running", Status::Creating => "creating" },
                "detached": c.detached,
                "command": c.cmd.join(" "),
                "created": c.created_unix,
                "aliases": c.all_aliases(),
                // Attached by a runtime through the CNI plugin: its container id and namespace.
                "cni": c.cni.as_ref().map(|o| json!({"container_id": o.container_id, "netns": o.netns})),
                // Attached by Docker: its container id (when its API told) and sandbox.
                "docker": c.docker.as_ref().map(|o| json!({"container_id": o.container_id, "sandbox": o.sandbox})),
            })
        })
        .collect();
    drop(locked);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<12} {:<16} {:<8} {:<9} {:<30} COMMAND",
        "NAME", "ID", "IP", "PID", "STATUS", "PORTS"
    );
    for r in rows {
        let ports: Vec<&str> = r["ports"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<20} {:<12} {:<16} {:<8} {:<9} {:<30} {}",
            r["name"].as_str().unwrap_or(""),
            r["id"].as_str().unwrap_or(""),
            r["ip"].as_str().unwrap_or("-"),
            r["pid"],
            r["status"].as_str().unwrap_or(""),
            if ports.is_empty() {
                "-".to_string()
            } else {
                ports.join(",")
            },
            // A runtime's container: md knows no command, only who attached it.
            if let Some(id) = r["cni"]["container_id"].as_str() {
                format!("(cni {})", &id[..id.len().min(12)])
            } else if !r["docker"].is_null() {
                let id = r["docker"]["container_id"].as_str().unwrap_or("?");
                format!("(docker {})", &id[..id.len().min(12)])
            } else {
                r["command"].as_str().unwrap_or("").to_string()
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}
