//! `cargo xtask ...`: developer tasks for md (alias in `.cargo/config.toml`).
//!
//! xtask is a developer tool, so unlike md-user it may shell out to anything
//! (apt-get, rustup, cargo, ...).

mod bench;
mod build_ebpf;
mod demo;
mod install;
mod test;
mod toolchain;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "md developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the eBPF crate (md-ebpf, release profile) into target/md-ebpf/md-ebpf.o,
    /// installing the BPF toolchain first if it is missing.
    BuildEbpf,
    /// Run the whole test suite as root: install missing tools, build-ebpf, build
    /// md-user, unit tests, then the end-to-end tests (md-tests with MD_E2E=1).
    Test(test::Options),
    /// Show what the BPF toolchain detection found and what would be installed
    /// (changes nothing).
    Toolchain,
    /// Run the demo.
    Demo,
    /// Install md-user (release build), its shell completions, man pages and systemd unit
    /// under PREFIX, or staged under DESTDIR.
    Install(install::Options),
    /// Run the benchmarks.
    Bench {
        /// Short runs, for a smoke test.
        #[arg(long)]
        quick: bool,
    },
    /// The benchmark's load generator and servers (run by `bench` inside its namespaces).
    #[command(hide = true)]
    BenchTool(bench::tool::ToolArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::BuildEbpf => build_ebpf::run().map(|_| ()),
        Command::Test(opts) => test::run(&opts),
        Command::Toolchain => toolchain::show(),
        Command::Demo => demo::run(),
        Command::Install(opts) => install::run(&opts),
        Command::Bench { quick } => bench::run(quick),
        Command::BenchTool(cmd) => bench::tool::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
