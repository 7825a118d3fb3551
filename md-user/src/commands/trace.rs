//! `md-user trace FROM TO[:PORT][/PROTO] [--json]`: what md's datapath does to a packet, hop by
//! hop, on a private copy of it (see `crate::trace`).

use std::{io::Write, process::ExitCode};

use anyhow::{bail, Result};

use super::Ctx;
use crate::{
    netlink::Netlink,
    trace::{
        self,
        spec::{Dest, Peer},
    },
};

pub async fn trace(ctx: &Ctx, from: Peer, to: Dest, json: bool) -> Result<ExitCode> {
    if !ctx.dp.is_loaded() {
        bail!("md's datapath is not loaded (run a container first)");
    }
    // Read without the lock and without reconciling: a trace changes nothing, not even the
    // state of containers that died.
    let state = ctx.state_dir.peek()?;
    let Some(d) = &state.datapath else {
        bail!("md's state has no datapath (run a container first)");
    };
    let digest = crate::datapath::object_digest()?;
    if d.object_digest != digest {
        bail!("the loaded datapath comes from another md build: trace it with the md-user that loaded it");
    }
    let nl = Netlink::connect()?;
    let report = trace::trace(&ctx.dp, state, &nl, &from, &to).await?;
    let text = if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        trace::report::text(&report)
    };
    // A reader that stops early (`| head`) is no error.
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
