//! `cargo xtask bench [--quick]`: placeholder.

use anyhow::{bail, Result};

pub fn run(quick: bool) -> Result<()> {
    let _ = quick;
    bail!("bench: not yet implemented")
}
