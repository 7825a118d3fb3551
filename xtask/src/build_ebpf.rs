//! `cargo xtask build-ebpf`: build `md-ebpf` for `bpfel-unknown-none` and copy
//! the object to `target/md-ebpf/md-ebpf.o`, where md-user's build.rs embeds it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::toolchain::{self, Toolchain};
use crate::util;

pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// BTF for maps and programs comes from bpf-linker's `--btf`, which needs debuginfo.
pub const BPF_RUSTFLAGS: &str = "-C debuginfo=2 -C link-arg=--btf";

/// Where the object ends up, relative to the workspace root (md-user's build.rs reads it).
pub fn object_path() -> PathBuf {
    util::workspace_root().join("target/md-ebpf/md-ebpf.o")
}

/// Ensure the toolchain, build, copy. Returns the object's path.
pub fn run() -> Result<PathBuf> {
    let tc = toolchain::ensure()?;
    build(&tc)
}

/// Build md-ebpf with `tc` (release profile) and copy the object when it changed.
pub fn build(tc: &Toolchain) -> Result<PathBuf> {
    let root = util::workspace_root();
    let started = Instant::now();
    // A separate target dir: the BPF build's flags and toolchain must not
    // invalidate the host build in target/debug.
    let obj = build_object(tc, &root, &root.join("target/bpf"))?;
    let dest = object_path();
    let changed = copy_if_changed(&obj, &dest)?;
    println!(
        "build-ebpf: {} {} ({} bytes, {:.1}s)",
        dest.strip_prefix(&root).unwrap_or(&dest).display(),
        if changed { "updated" } else { "unchanged" },
        obj.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(dest)
}

/// Builds md-ebpf of the workspace at `root` into `target_dir` and returns the object (also
/// used on mutated copies of the workspace: `cargo xtask datapath-mutants`).
pub fn build_object(tc: &Toolchain, root: &Path, target_dir: &Path) -> Result<Vec<u8>> {
    let mut cmd = util::command("rustup");
    toolchain::sanitize(&mut cmd);
    cmd.current_dir(root)
        // Debian's rustc is a stable compiler; -Z build-std needs this (harmless on nightly).
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", BPF_RUSTFLAGS)
        .args([
            "run",
            tc.rustup_name(),
            "cargo",
            "build",
            "-p",
            "md-ebpf",
            "--release",
        ])
        .args([
            "--target",
            BPF_TARGET,
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(target_dir);
    util::run(&mut cmd).context("building md-ebpf")?;

    let built = target_dir.join(BPF_TARGET).join("release/md-ebpf");
    let obj = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    check_bpf_elf(&obj)
        .with_context(|| format!("{} is not what bpf-linker should produce", built.display()))?;
    Ok(obj)
}

/// ELF64, little-endian, relocatable, machine EM_BPF (247).
pub fn check_bpf_elf(b: &[u8]) -> Result<()> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF");
    }
    let e_type = u16::from_le_bytes([b[16], b[17]]);
    let e_machine = u16::from_le_bytes([b[18], b[19]]);
    if e_machine != 247 {
        bail!("ELF machine is {e_machine}, not BPF (247)");
    }
    if e_type != 1 {
        bail!("ELF type is {e_type}, not relocatable (1)");
    }
    Ok(())
}

/// Write `content` to `dest` only when it differs, so the mtime stays stable and
/// md-user's build.rs (rerun-if-changed) does not rebuild needlessly. Atomic.
pub fn copy_if_changed(content: &[u8], dest: &Path) -> Result<bool> {
    if std::fs::read(dest).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = dest.parent().context("destination has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dest.with_extension("o.tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, e_type: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b
    }

    #[test]
    fn accepts_only_bpf_relocatable_objects() {
        assert!(check_bpf_elf(&elf(247, 1)).is_ok());
        assert!(check_bpf_elf(&elf(62, 1)).is_err()); // x86-64
        assert!(check_bpf_elf(&elf(247, 2)).is_err()); // executable
        assert!(check_bpf_elf(b"not an elf").is_err());
    }

    #[test]
    fn copies_only_when_content_changes() {
        let dir = std::env::temp_dir().join(format!("xtask-copy-test-{}", std::process::id()));
        let dest = dir.join("sub/md-ebpf.o");
        assert!(copy_if_changed(b"one", &dest).unwrap());
        let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!copy_if_changed(b"one", &dest).unwrap());
        assert_eq!(std::fs::metadata(&dest).unwrap().modified().unwrap(), mtime);
        assert!(copy_if_changed(b"two", &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
