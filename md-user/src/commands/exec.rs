use std::{
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

use super::Ctx;
use crate::{
    caps::Keep,
    netns::JoinPid,
    proc,
    state::{State, Status},
};

/// Runs a command in a running container's namespaces (PID, network, UTS, mount) with its
/// capabilities.
pub fn exec(state: &State, name: &str, cmd: &[String]) -> Result<ExitCode> {
    let c = state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))?;
    if c.cni.is_some() {
        bail!("container {name} was attached by its runtime (CNI); exec through the runtime");
    }
    if c.status != Status::Running || !proc::alive(c.pid, c.pid_start) {
        bail!("container {name} is not running");
    }
    let (join, _files) = JoinPid::open(c.pid)?;
    join.enter_pid_ns()?;
    // The same capabilities as the container's CMD.
    let keep = (!c.privileged).then(Keep::docker_default);
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    unsafe {
        command.pre_exec(move || {
            join.apply()?;
            if let Some(k) = &keep {
                k.apply()?;
            }
            Ok(())
        });
    }
    let status = command
        .status()
        .with_context(|| format!("running {} in {name}", cmd[0]))?;
    Ok(exit_code(status))
}

/// A child's status as our exit code: its code, or 128+signal as shells do.
pub fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128u8.wrapping_add(s as u8)),
        _ => ExitCode::FAILURE,
    }
}

pub fn logs(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let path = ctx.state_dir.log_file(name);
    let data = std::fs::read(&path).with_context(|| format!("no logs for {name}"))?;
    use std::io::Write;
    std::io::stdout().write_all(&data)?;
    Ok(ExitCode::SUCCESS)
}
