//! md-user: the CLI and loader of md, container networking whose datapath is eBPF.
//!
//! There is no daemon: every command takes the state lock, reconciles what it finds, does its
//! work and exits. What the datapath needs outlives the command because it is pinned.

mod attach;
mod caps;
mod cli;
mod cni;
mod commands;
mod datapath;
mod dns;
mod endpoint;
mod error;
mod flowlog;
mod host;
mod hostports;
mod init;
mod ipam;
mod metrics;
mod netlink;
mod netns;
mod network;
mod overlay;
mod policy;
mod portmap;
mod proc;
mod state;
mod store;
mod timing;
mod trace;

use std::process::ExitCode;

use clap::Parser;

/// `md-user --version`: the package version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("MD_GIT_REVISION"),
    ")"
);

fn main() -> ExitCode {
    timing::start();
    if cni::called_as_plugin() {
        return cni::main();
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Bad input gets one line, not a usage dump.
            let msg = e.to_string();
            let what: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            eprintln!(
                "md-user: {} (see md-user --help)",
                what.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("md-user: {}", error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
