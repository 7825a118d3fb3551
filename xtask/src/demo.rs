//! `cargo xtask demo`: placeholder until the demo body is written.

use anyhow::Result;

pub fn run() -> Result<()> {
    crate::build_ebpf::run()?;
    crate::util::cargo_host_build_md_user()?;
    println!("demo: not yet implemented");
    Ok(())
}
