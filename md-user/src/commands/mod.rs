//! One module per command. Every command that touches state first reconciles (`attach::lock`):
//! containers whose owner is gone (a foreground run killed with -9 included) lose their network.

mod down;
mod exec;
mod inspect;
mod metrics;
mod monitor;
mod network;
mod policy;
mod port;
mod ps;
pub mod run;
pub mod stats;
mod stop;
mod trace;

use std::process::ExitCode;

use anyhow::Result;

pub use crate::attach::{reconcile, Ctx};
use crate::{
    cli::{Cli, Command},
    error::require_privileges,
    netlink::Netlink,
    state::State,
};

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    let ctx = Ctx::new(cli.global);
    let tells_store = tells_store(&cli.command);
    let code = command(&ctx, cli.command)?;
    if tells_store {
        store_down_warning(&ctx);
    }
    Ok(code)
}

/// Commands that say, once they have succeeded, that the overlay's store is down (issue 17:
/// every command says so; one that fails names the store in its error instead). Not the
/// long-running ones, nor those whose output is a container's (`exec`, `logs`, a foreground
/// `run`), nor `ps` and `network ls`, which say it before their listing.
fn tells_store(command: &Command) -> bool {
    match command {
        Command::Run(args) => args.detach && args.ready_fd.is_none(),
        Command::Network(crate::cli::NetworkCmd::Ls { .. }) => false,
        Command::Stop { .. }
        | Command::Policy(_)
        | Command::Stats { .. }
        | Command::Inspect { .. }
        | Command::Trace { .. }
        | Command::Port { .. }
        | Command::Network(_) => true,
        _ => false,
    }
}

fn store_down_warning(ctx: &Ctx) {
    // No watcher status, no cluster: spare the state read.
    if !crate::overlay::status_file(&ctx.state_dir.dir).exists() {
        return;
    }
    let Ok(state) = ctx.state_dir.peek() else {
        return;
    };
    if let Some(w) = crate::overlay::store_warning(&state, &ctx.state_dir.dir) {
        eprintln!("md-user: warning: {w}");
    }
}

fn command(ctx: &Ctx, command: Command) -> Result<ExitCode> {
    match command {
        // `run` validates its arguments before checking privileges, so bad input gets the
        // precise message even without root.
        Command::Run(args) => run::run(ctx, args),
        // So does `trace`: a bad spec is named before anything else.
        Command::Trace { from, to, json } => {
            let (from, to) = (
                crate::trace::spec::parse_from(&from)?,
                crate::trace::spec::parse_to(&to)?,
            );
            require_privileges()?;
            block_on(trace::trace(ctx, from, to, json))
        }
        Command::Init {
            ready_fd,
            program,
            cmd,
        } => crate::init::main(ready_fd, &program, &cmd),
        // Generated from the CLI definition; nothing is touched.
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "md-user", &mut script);
            // Into a pipe that may close early (`| head`): no panic, just stop.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages to {}: {e}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            require_privileges()?;
            match command {
                Command::Run(_)
                | Command::Init { .. }
                | Command::Trace { .. }
                | Command::Completion { .. }
                | Command::Man { .. } => unreachable!(),
                Command::Port { name, port } => block_on(port::port(ctx, &name, port.as_deref())),
                Command::Ps { json } => block_on(ps::ps(ctx, json)),
                Command::Stop { names, time } => block_on(stop::stop(ctx, &names, time)),
                Command::Exec { name, cmd } => {
                    let state = block_on_state(ctx)?;
                    exec::exec(&state, &name, &cmd)
                }
                Command::Logs { name } => {
                    block_on_state(ctx)?;
                    exec::logs(ctx, &name)
                }
                Command::Down => block_on(down::down(ctx)),
                Command::Policy(cmd) => block_on(policy::policy(ctx, cmd)),
                Command::Stats { json, prometheus } => {
                    block_on(stats::stats(ctx, json, prometheus))
                }
                Command::Monitor {
                    json,
                    output,
                    max_size,
                    max_files,
                } => {
                    let out = output.map(|path| crate::flowlog::Rotation {
                        path,
                        max_size,
                        max_files,
                    });
                    block_on(monitor::monitor(ctx, json, out))
                }
                Command::Metrics { listen, bpf_stats } => {
                    block_on(metrics::metrics(ctx, listen, bpf_stats))
                }
                Command::Inspect { name, json } => block_on(inspect::inspect(ctx, &name, json)),
                Command::Network(cmd) => block_on(network::network(ctx, cmd)),
                Command::Watch { ready_fd } => {
                    let ready = ready_fd.map(|fd| unsafe {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
                    });
                    block_on(async {
                        crate::host::watch(&ctx.opts, &ctx.dp, ready).await?;
                        Ok(ExitCode::SUCCESS)
                    })
                }
                Command::Dns {
                    network,
                    listen,
                    ready_fd,
                } => {
                    let ready = ready_fd.map(|fd| unsafe {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
                    });
                    block_on(async {
                        crate::dns::serve(
                            ctx.opts.state_dir.clone(),
                            network,
                            listen,
                            ctx.opts.resolv_conf.clone(),
                            ready,
                        )
                        .await?;
                        Ok(ExitCode::SUCCESS)
                    })
                }
            }
        }
    }
}

/// md-user is single-threaded: one current-thread runtime (also so CMD's parent-death signal
/// is tied to the thread that lives as long as the supervisor).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn block_on_state(ctx: &Ctx) -> Result<State> {
    runtime()?.block_on(reconciled(ctx))
}

fn block_on<F: std::future::Future<Output = Result<ExitCode>>>(f: F) -> Result<ExitCode> {
    runtime()?.block_on(f)
}

/// The state after reconciling, for commands that only read it.
pub async fn reconciled(ctx: &Ctx) -> Result<State> {
    let nl = Netlink::connect()?;
    let mut locked = crate::attach::lock(ctx, &nl).await?;
    Ok(std::mem::take(&mut locked.state))
}
