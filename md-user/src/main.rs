//! md-user: the CLI and loader of md, container networking whose datapath is eBPF.
//!
//! There is no daemon: every command takes the state lock, reconciles what it finds, does its
//! work and exits. What the datapath needs outlives the command because it is pinned.

mod cli;
mod commands;
mod datapath;
mod dns;
mod endpoint;
mod error;
mod host;
mod ipam;
mod netlink;
mod netns;
mod network;
mod policy;
mod portmap;
mod proc;
mod state;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("md-user: {}", error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
