use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{reconcile, Ctx};
use crate::{netlink::Netlink, proc};

/// SIGTERM, then SIGKILL after `grace_secs`; returns once each container's network is gone
/// (its supervisor tears it down when CMD exits).
pub async fn stop(ctx: &Ctx, names: &[String], grace_secs: u64) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    {
        let mut locked = ctx.state_dir.lock()?;
        if !reconcile(ctx, &nl, &mut locked.state).await.is_empty() {
            locked.save()?;
        }
        for n in names {
            match locked.state.containers.get(n) {
                None => bail!("no such container: {n}"),
                Some(c) if c.cni.is_some() => {
                    bail!("container {n} was attached by its runtime (CNI); stop it there")
                }
                Some(_) => {}
            }
        }
    }
    for name in names {
        let state = ctx.state_dir.peek()?;
        let Some(c) = state.containers.get(name) else {
            continue;
        };
        let (pid, start) = (c.pid, c.pid_start);
        proc::signal(pid, start, libc::SIGTERM);
        let gone = wait_gone(ctx, name, Duration::from_secs(grace_secs)).await?;
        if !gone {
            proc::signal(pid, start, libc::SIGKILL);
            if !wait_gone(ctx, name, Duration::from_secs(5)).await? {
                // The supervisor is stuck or gone: reclaim here.
                let mut locked = ctx.state_dir.lock()?;
                if let Some(c) = locked.state.containers.get(name).cloned() {
                    proc::signal(c.supervisor_pid, c.supervisor_start, libc::SIGKILL);
                    std::thread::sleep(Duration::from_millis(50));
                    reconcile(ctx, &nl, &mut locked.state).await;
                    locked.save()?;
                }
            }
        }
        println!("{name}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_gone(ctx: &Ctx, name: &str, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = ctx.state_dir.peek()?;
        match state.containers.get(name) {
            None => return Ok(true),
            Some(c) if !proc::alive(c.supervisor_pid, c.supervisor_start) => return Ok(false),
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
