use std::{fs, process::ExitCode, time::Duration};

use anyhow::Result;

use super::Ctx;
use crate::{endpoint, error::one_line, host, hostports, netlink::Netlink, network, proc};

/// Removes every container, bridge, program, pinned object and state md created. Idempotent.
pub async fn down(ctx: &Ctx) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    let mut errors = Vec::new();
    let containers: Vec<_> = std::mem::take(&mut locked.state.containers)
        .into_values()
        .collect();
    for c in &containers {
        proc::signal(c.pid, c.pid_start, libc::SIGKILL);
    }
    for c in &containers {
        errors.extend(endpoint::teardown(&nl, &ctx.dp, c).await);
    }
    if let Err(e) = hostports::release(&mut locked.state) {
        errors.push(e);
    }
    errors.extend(crate::overlay::leave(&nl, &ctx.dp, &mut locked.state).await);
    errors.extend(network::remove_all(&nl, &ctx.dp, &mut locked.state).await);
    errors.extend(host::teardown(
        &ctx.dp,
        &mut locked.state,
        &ctx.state_dir.dir,
    ));
    // Nothing may outlive `down`, not even a pin dir someone else's state forgot.
    if let Err(e) = ctx.dp.unload() {
        errors.push(e);
    }
    locked.remove()?;
    drop(locked);
    // Supervisors wake up to find their container gone; give them a moment to exit.
    for c in &containers {
        for _ in 0..100 {
            if !proc::alive(c.supervisor_pid, c.supervisor_start) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = fs::remove_dir_all(ctx.state_dir.dir.join("logs"));
    let _ = fs::remove_dir_all(ctx.state_dir.dir.join("containers"));
    let _ = fs::remove_file(crate::overlay::status_file(&ctx.state_dir.dir));
    for e in &errors {
        eprintln!("md-user: down: {}", one_line(e));
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
